"""cm-deploy command line (DESIGN.md section 5).

    cm-deploy export  ckpt.pt [-o DIR]        DIR/model.onnx (TensorRT), DIR/model.portable.onnx, DIR/manifest.json
    cm-deploy build   DIR/model.onnx          TensorRT engine + <engine>.json, with the plugin library
    cm-deploy run     MODEL --inputs x.npz    outputs to the screen or -o out.npz
    cm-deploy parity  ckpt.pt MODEL           exit 0 only within the precision's tolerance
    cm-deploy profile MODEL [MODEL...]        latency: trtexec for engines when present, else a timer
    cm-deploy inspect MODEL                   inputs, outputs, profile, precision

MODEL is an engine (.engine/.plan/.trt), an ONNX file or a checkpoint (.pt). Exit status: 0 ok,
1 a check failed (parity), 2 bad input or usage, with one line on stderr and no traceback; 3 an
internal error (a bug: one line, the traceback with CM_DEPLOY_DEBUG=1). Importing this module
imports no torch: only `export` and checkpoint models load it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings
from pathlib import Path

import click
import numpy as np

from . import __version__
from .errors import CheckFailed, UserError

DEBUG_ENV = "CM_DEPLOY_DEBUG"
PRECISION_CHOICES = ["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]


def _die_line(msg: str) -> str:
    text = " ".join(str(msg).split())
    return text if len(text) <= 600 else text[:597] + "..."


# ---------------------------------------------------------------------------- shared options

def _trt_options(f):
    """--plugin, --device, --trt-module: where a model runs (build takes these only)."""
    f = click.option("--plugin", type=click.Path(dir_okay=False), default=None,
                     help="CoupledScan plugin library (default: $CM_DEPLOY_PLUGIN, the path recorded at build, "
                          "build/ folders).")(f)
    f = click.option("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's: CUDA when "
                                                    "available; engines always run on CUDA).")(f)
    f = click.option("--trt-module", default=None, metavar="NAME",
                     help="TensorRT Python module: tensorrt (default, or $CM_DEPLOY_TRT_MODULE), tensorrt_rtx, "
                          "tensorrt_rtx_bindings.")(f)
    return f


def _model_options(f):
    """_trt_options plus the options of commands that run a model (run, parity, profile)."""
    f = _trt_options(f)
    # kept in the click context for _open, so that every command takes them without naming them
    f = click.option("--ort-ops", type=click.Path(dir_okay=False), default=None, expose_value=False,
                     callback=_remember, help="CoupledScan ONNX Runtime op library, registered for any ONNX file "
                                              "when given (then it runs CoupledScan in model.portable.onnx too); "
                                              "without it, only for files that need it (model.onnx), found in "
                                              "$CM_DEPLOY_ORT_OP_LIBRARY, the package's lib/, build/ folders.")(f)
    f = click.option("--check-finite/--no-check-finite", default=True, expose_value=False, callback=_remember,
                     help="Refuse inputs holding NaN/Inf within their valid steps (padding may hold anything).",
                     show_default=True)(f)
    f = click.option("--chunk", type=click.IntRange(min=1), default=None, expose_value=False, callback=_remember,
                     metavar="T", help="Checkpoints: run the layers over time chunks of T steps with the state "
                                       "carried (same outputs, activation memory bounded by T instead of L).")(f)
    f = click.option("--tf32", is_flag=True, default=False, expose_value=False, callback=_remember,
                     help="ONNX Runtime on CUDA: allow TF32 in float32 MatMul/Gemm (faster, ~1e-4 relative error "
                          "and batch-dependent results; default exact float32, as engines built without --tf32).")(f)
    f = click.option("--backend", type=click.Choice(["ort", "trt", "torch"]), default=None, expose_value=False,
                     callback=_remember, help="Override the backend the file type picks (.engine: trt, .onnx: "
                                              "ort, .pt: torch); trt on an .onnx builds an engine first.")(f)
    return f


def _remember(ctx, param, value):
    ctx.meta[f"cm_deploy.{param.name}"] = value
    return value


def _open(path, plugin=None, device=None, trt_module=None, dtype=None, cuda_graph=False, scan_impl=None):
    from .runtime import load
    meta = click.get_current_context().meta
    b = load(path, plugin=plugin, device=device, trt_module=trt_module, dtype=dtype,
             cuda_graph=cuda_graph, scan_impl=scan_impl, backend=meta.get("cm_deploy.backend"),
             ort_ops=meta.get("cm_deploy.ort_ops"), chunk=meta.get("cm_deploy.chunk"),
             tf32=meta.get("cm_deploy.tf32", False))
    b.check_finite = meta.get("cm_deploy.check_finite", True)
    return b


def _read_npz(path, specs=None) -> dict:
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise UserError(f"{path}: cannot read it: {e.strerror or e}") from None
    if head[:2] != b"PK" and head != b"\x93NUMPY":   # neither a zip (.npz, empty ones too) nor an .npy
        raise UserError(f"{path}: not an .npz archive (write one with numpy.savez(path, name=array, ...))")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npz archive: {_die_line(e)}") from None
    except Exception as e:   # zipfile.BadZipFile and friends from a damaged archive
        raise UserError(f"{path}: not a readable .npz archive: {type(e).__name__}: {_die_line(e)}") from None
    if not hasattr(z, "files"):   # a .npy file: one bare array
        raise UserError(f"{path}: expected an .npz archive with one array per input name, got a single array")
    try:
        with z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:   # e.g. object arrays, refused without pickle
        raise UserError(f"{path}: not a readable .npz archive: {_die_line(e)}") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz archive: {type(e).__name__}: {_die_line(e)}") from None
    if not data:
        raise UserError(f"{path}: the archive holds no arrays")
    odd = [k for k, v in data.items() if not isinstance(v, np.ndarray)]
    if odd:     # numpy hands back raw bytes for members that are not .npy arrays
        raise UserError(f"{path}: not a readable .npz archive: member {odd[0]!r} is not a numpy array")
    if specs:   # bfloat16 is stored as 2-byte void by numpy; give it its type back
        from .runtime.specs import np_dtype
        for s in specs:
            a = data.get(s.name)
            if s.dtype == "bfloat16" and a is not None and a.dtype.kind == "V" and a.dtype.itemsize == 2:
                data[s.name] = a.view(np_dtype("bfloat16"))
    return data


def _write_npz(path, arrays: dict) -> None:
    from .runtime.trt import atomic_write
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write(path, buf.getvalue())


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _table(rows, header) -> str:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------- the group

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cm-deploy")
def cli():
    """Coupled Mamba (NeurIPS 2024) from PyTorch to TensorRT: export, build, run, check, profile.

    MODEL is a TensorRT engine (.engine/.plan/.trt), an ONNX file (.onnx, run by ONNX Runtime) or a
    checkpoint (.pt, run by PyTorch). Exit status: 0 ok, 1 a check failed, 2 bad input or usage,
    3 an internal error (a bug: CM_DEPLOY_DEBUG=1 prints its traceback).
    """


# ---------------------------------------------------------------------------- export

@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: <checkpoint stem>_export beside the checkpoint).")
@click.option("--dtype", type=click.Choice(PRECISION_CHOICES), default="float32", show_default=True,
              help="Precision of the exported graphs (a TensorRT engine built from them keeps it).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Fix the batch size (default: dynamic).")
@click.option("--length", "lengths", multiple=True, metavar="[NAME=]L",
              help="Fix a modality's sequence length (repeatable); a bare L fixes every modality.")
@click.option("--streaming", is_flag=True, help="Also write model.stream.onnx and model.stream.portable.onnx: one "
                                                "chunk of a stream per call, the state carried by the caller.")
@click.option("--quiet", is_flag=True, help="No progress lines (they go to stderr, on a terminal only).")
@click.option("--arch", type=click.Choice(["cm-deploy", "coupled-mamba-official"]), default="cm-deploy",
              show_default=True, help="What CHECKPOINT holds: a cm-deploy checkpoint, or a state_dict of the official "
                                      "Coupled Mamba code's MutiMamba (config read from its shapes; "
                                      "docs/bring_your_own_model.md).")
@click.option("--norm-eps", type=float, default=None, help="coupled-mamba-official: the norms' eps (not stored in a "
                                                           "state_dict) [default 1e-5, the official default].")
def export(checkpoint, output, dtype, opset, batch, lengths, streaming, quiet, arch, norm_eps):
    """Export CHECKPOINT to ONNX: model.onnx (CoupledScan nodes: TensorRT with the plugin, ONNX
    Runtime with the op library), model.portable.onnx (stock ONNX Runtime) and manifest.json."""
    try:
        from .export import export_checkpoint
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise UserError(f"export needs PyTorch and onnx (missing {missing}): pip install 'cm-deploy[model]'") from None
    ckpt = Path(checkpoint)
    out = Path(output) if output else ckpt.with_name(f"{ckpt.stem}_export")
    from .contract import FILES, MANIFEST_NAME, STREAM_FILES
    from .runtime.specs import refuse_overwrite
    for name in [*FILES.values(), *STREAM_FILES.values(), MANIFEST_NAME]:
        refuse_overwrite(out / name, ckpt)
    if arch == "cm-deploy" and norm_eps is not None:
        raise UserError("--norm-eps applies to --arch coupled-mamba-official only")
    if arch == "coupled-mamba-official" and lengths:
        raise UserError("--length: the official architecture's three inputs share one dynamic length; it is not fixed")
    fixed = None
    if lengths:
        fixed = {}
        for item in lengths:
            name, eq, value = item.partition("=")
            if not eq:
                name, value = "*", item
            try:
                n = int(value)
            except ValueError:
                raise UserError(f"--length: expected NAME=L or L with an integer L, got {item!r}") from None
            if n < 1:
                raise UserError(f"--length: L must be positive, got {item!r}")
            fixed[name.strip()] = n
        if "*" in fixed:
            from .checkpoint import read_checkpoint
            config, _, _ = read_checkpoint(ckpt)
            every = fixed.pop("*")
            fixed = {**{m: every for m in config.modalities}, **fixed}
    from .contract import BF16_RUNS_ON, normalize_precision
    from .progress import Progress
    dtype = normalize_precision(dtype)
    if arch == "coupled-mamba-official":     # docs/bring_your_own_model.md
        from .export.modules import export_official
        manifest = export_official(ckpt, out, norm_eps=1e-5 if norm_eps is None else norm_eps, dtype=dtype,
                                   opset=opset, batch=batch, streaming=streaming, progress=Progress(quiet))
    else:
        manifest = export_checkpoint(ckpt, out, dtype=dtype, opset=opset, batch=batch, lengths=fixed,
                                     streaming=streaming, progress=Progress(quiet))
    files = (manifest or {}).get("files", {})
    click.echo(f"exported {ckpt} -> {out}/")
    for role, name in files.items():
        click.echo(f"  {role:15s} {out / name}")
    click.echo(f"  {'manifest':15s} {out / 'manifest.json'}")
    replaced = (manifest or {}).get("_replaced") or {}
    for name in replaced.get("removed", []):
        click.echo(f"  {'removed':15s} {out / name} (the previous export's; this one does not write it)")
    for e in replaced.get("stale_engines", []):
        click.echo(f"note: {out / e['engine']} was built from the previous {e['onnx']}: rebuild it with "
                   f"cm-deploy build {out / e['onnx']} -o {out / e['engine']}")
    if dtype == "bfloat16":
        click.echo(f"note: {BF16_RUNS_ON}")


# ---------------------------------------------------------------------------- build

@cli.command()
@click.argument("onnx", type=click.Path(exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Engine file (default: <onnx stem>.engine beside it); <engine>.json describes it.")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES),
              default=None, help="Default: the ONNX file's (strongly typed network). Another precision needs "
                                 "TensorRT 10's FP16/BF16 builder flags (weak typing).")
@click.option("--batch", default=None, metavar="MIN:OPT:MAX",
              help="Batch range of the optimisation profile, or N for a fixed batch [default 1:8:32].")
@click.option("--length", "lengths", multiple=True, metavar="[NAME=]MIN:OPT:MAX",
              help="Sequence length range of every modality, or of one (repeatable) [default 1:128:1024].")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file: loaded when present, saved after the build.")
@click.option("--workspace", type=click.IntRange(min=1), default=None, metavar="MiB", help="Workspace limit.")
@click.option("--tf32/--no-tf32", default=False, show_default=True,
              help="Allow TF32 math in float32 engines (faster, ~1e-3 relative error).")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="Builder optimisation level.")
@click.option("--quiet", is_flag=True, help="No build progress.")
@click.option("--verbose", is_flag=True, help="TensorRT's verbose log.")
@_trt_options
def build(onnx, output, precision, batch, lengths, timing_cache, workspace, tf32, opt_level, quiet, verbose,
          plugin, device, trt_module):
    """Build a TensorRT engine from ONNX (a file, or an export folder) with the CoupledScan plugin."""
    from .runtime.builder import build_engine, parse_range
    length, per = None, {}
    for item in lengths:
        if "=" in item:
            k, _, v = item.partition("=")
            per[k.strip()] = parse_range(v, f"--length {k}")
        else:
            length = parse_range(item, "--length")
    sc = build_engine(onnx, output, plugin=plugin, precision=precision,
                      batch=parse_range(batch, "--batch") if batch else None, length=length, lengths=per or None,
                      timing_cache=timing_cache, workspace_mb=workspace, tf32=tf32, opt_level=opt_level,
                      trt_module=trt_module, progress=not quiet and sys.stderr.isatty(), verbose=verbose,
                      device=device)
    eng = sc["engine"]
    click.echo(f"engine {eng['path']} ({eng['bytes'] / 2**20:.1f} MiB, {sc['precision']}, {sc['typing']}ly typed, "
               f"{sc['tensorrt']['module']} {sc['tensorrt']['version']}, built in {sc['build']['seconds']:.1f} s)")
    for name, p in sc["profiles"][0].items():
        click.echo(f"  profile {name}: min {p['min']} opt {p['opt']} max {p['max']}")


# ---------------------------------------------------------------------------- run

@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help=".npz archive with one array per input name.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the outputs to this .npz.")
@click.option("--dtype", default=None, help="Precision of a checkpoint model (default float32).")
@click.option("--cuda-graph", is_flag=True, help="Replay CUDA graphs (engines, checkpoints on CUDA, ONNX on "
                                                 "ORT's CUDA provider).")
@_model_options
def run(model, inputs_path, output, dtype, cuda_graph, plugin, device, trt_module):
    """Run MODEL on the arrays of an .npz archive (np.savez(path, text=..., audio=...); inputs
    <name>_lengths left out mean full length)."""
    from .runtime.specs import refuse_overwrite
    if output:
        refuse_overwrite(output, model, inputs_path)
    with _open(model, plugin, device, trt_module, dtype, cuda_graph) as m:
        feeds = _read_npz(inputs_path, m.inputs)
        outs = m.run(feeds)
    if output:
        _write_npz(output, outs)
        click.echo(f"wrote {', '.join(f'{k} {tuple(np.shape(v))}' for k, v in outs.items())} to {output}")
        return
    for k, v in outs.items():
        v = np.asarray(v)
        click.echo(f"{k}: shape {tuple(v.shape)} {v.dtype}")
        shown = v.astype(np.float32) if v.dtype.kind == "V" or v.dtype.name == "bfloat16" else v
        click.echo(np.array2string(shown, precision=6, threshold=64, suppress_small=False))


# ---------------------------------------------------------------------------- parity

def _shape_choices(specs, batch, lengths):
    from .runtime.specs import parse_int_list, parse_length_options, shape_grid
    if not batch and not lengths:
        return None
    bs = parse_int_list(batch, "--batch") if batch else [2]
    ls = parse_length_options(lengths) if lengths else [16]
    return shape_grid(specs, bs, ls)


@cli.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Check on these inputs (.npz) instead of random ones.")
@click.option("--batch", default=None, metavar="B[,B...]", help="Batch sizes to check (with --length: a grid).")
@click.option("--length", "lengths", multiple=True, metavar="[NAME=]L[,L...]",
              help="Sequence lengths to check (repeatable). Default: a few shapes inside every profile.")
@click.option("--atol", type=float, default=None, help="Absolute tolerance (default by precision: 1e-4 / 1e-2 / 6e-2).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default by precision: 1e-4 / 1e-2 / 6e-2).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--dtype", default=None, help="Precision of MODEL when it is a checkpoint (default float32).")
@click.option("--ref-device", default="cpu", show_default=True, help="Device of the float32 reference.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (for scripts).")
@_model_options
def parity(checkpoint, model, inputs_path, batch, lengths, atol, rtol, seed, dtype, ref_device, as_json,
           plugin, device, trt_module):
    """Compare MODEL with CHECKPOINT's PyTorch reference (float32, reference scan). Exit 1 when any
    output is out of tolerance."""
    from .runtime.parity import default_shapes, format_report, run_parity
    from .contract import STATE_PREFIX
    from .runtime.torch_backend import TorchBackend
    # a streaming graph (state.* inputs) is compared with the checkpoint's streaming step
    with _open(model, plugin, device, trt_module, dtype) as m, \
            TorchBackend(checkpoint, device=ref_device, dtype="float32", scan_impl="reference",
                         streaming=any(s.name.startswith(STATE_PREFIX) for s in m.inputs)) as ref:
        if inputs_path:
            cases = [(Path(inputs_path).name, _read_npz(inputs_path, m.inputs))]
        else:
            cases = _shape_choices(m.inputs, batch, lengths) or default_shapes([m])
        report = run_parity(ref, m, cases, atol=atol, rtol=rtol, seed=seed)
    if as_json:
        _echo_json(report)
    else:
        click.echo(format_report(report))
    if not report["ok"]:
        worst = max((o for c in report["cases"] for o in c["outputs"]), key=lambda o: o["score"])
        raise CheckFailed(f"parity failed: {model} differs from {checkpoint} beyond tolerance "
                          f"(worst max abs {worst['max_abs']:.3e}, score {worst['score']:.3g} > 1)")


# ---------------------------------------------------------------------------- profile

@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--batch", default="1,8", show_default=True, metavar="B[,B...]", help="Batch sizes.")
@click.option("--length", "lengths", multiple=True, metavar="[NAME=]L[,L...]",
              help="Sequence lengths (repeatable) [default 128].")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs (built-in timer).")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs.")
@click.option("--timer", type=click.Choice(["auto", "builtin", "trtexec"]), default="auto", show_default=True,
              help="auto: trtexec for engines when it is on PATH ($CM_DEPLOY_TRTEXEC), else the built-in timer.")
@click.option("--cuda-graph", is_flag=True, help="CUDA graph replay (engines, checkpoints and ONNX on CUDA, trtexec).")
@click.option("--dtype", default=None, help="Precision of checkpoint models (default float32).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write latency vs batch size (or vs length when one batch is given) to this PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--streaming", is_flag=True, help="MODEL is a streaming graph (model.stream*.onnx): time one chunk "
                                                "per push with the state carried; --length is the chunk size "
                                                "[default 1].")
@click.option("--quiet", is_flag=True, help="No progress lines (they go to stderr, on a terminal only).")
@_model_options
def profile(models, batch, lengths, warmup, iters, timer, cuda_graph, dtype, plot_path, as_json, streaming, quiet,
            plugin, device, trt_module):
    """Latency of one or more MODELs (side by side) over batch sizes and lengths (chunk sizes with
    --streaming)."""
    from .progress import Progress
    from .runtime.profiling import plot, profile_models
    from .runtime.specs import parse_int_list, parse_length_options, refuse_overwrite
    if plot_path:
        refuse_overwrite(plot_path, *models)
    bs = parse_int_list(batch, "--batch")
    ls = parse_length_options(lengths) if lengths else [1 if streaming else 128]
    results = profile_models(models, bs, ls, open_model=lambda p: _open(p, plugin, device, trt_module, dtype, cuda_graph),
                             warmup=warmup, iters=iters, timer=timer, cuda_graph=cuda_graph, streaming=streaming,
                             plugin=plugin, progress=Progress(quiet))
    timed = [r for r in results if "p50_ms" in r]
    if plot_path and timed:
        x = "batch" if len(bs) > 1 else "length"
        series = []
        for r in timed:
            r2 = dict(r)
            if len(bs) > 1 and len(ls) > 1:
                r2["model"] = f"{r['model']} {('L=' + str(r['length'])) if r['length'] else r['shape']}"
            series.append(r2)
        plot(series, plot_path, x=x)
    if as_json:
        _echo_json(results)
    else:
        rows = []
        order = {m: i for i, m in enumerate(dict.fromkeys(r["model"] for r in results))}
        # grouped by shape, models side by side
        for r in sorted(results, key=lambda r: (r["batch"], r["shape"], order[r["model"]])):
            if "skipped" in r:
                rows.append((r["model"], r["batch"], r["length"] or r["shape"], "-", "-", "-", "-", "-", r["skipped"]))
                continue
            tp = f"{r['throughput']:.1f}" if r.get("throughput") else "-"
            rows.append((r["model"], r["batch"], r["length"] or r["shape"], f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}",
                         f"{r['p99_ms']:.3f}", f"{r['mean_ms']:.3f}", tp, r["timer"]))
        click.echo(_table(rows, ("model", "batch", "length", "p50 ms", "p90 ms", "p99 ms", "mean ms", "samples/s",
                                 "timer")))
        for r in results:
            prof = r.get("profile")
            if prof and prof.get("layers"):
                click.echo(f"\nslowest layers of {r['model']} at {r['shape']} (trtexec, {prof.get('count')} iterations):")
                click.echo(_table([(lay["name"][:60], f"{lay['average_ms'] or 0:.4f}", f"{lay['percentage'] or 0:.1f}")
                                   for lay in prof["layers"][:5]], ("layer", "avg ms", "%")))
        if plot_path and timed:
            click.echo(f"plot: {plot_path}")


# ---------------------------------------------------------------------------- inspect

@cli.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def inspect(model, as_json):
    """Describe MODEL without running it: inputs, outputs, precision; ONNX: opsets, CoupledScan
    nodes and their attributes, what runs it; engines: the build's profile (from the sidecar)."""
    from .runtime.describe import describe_file
    d = describe_file(model)
    if as_json:
        _echo_json(d)
        return
    click.echo(f"{d['name']}  ({d['kind']}, {d.get('precision', 'float32')})")
    click.echo(_table([("in", s["name"], s["shape"], s["dtype"]) for s in d["inputs"]] +
                      [("out", s["name"], s["shape"], s["dtype"]) for s in d["outputs"]],
                      ("", "name", "shape", "dtype")))
    for name, p in (d.get("profile") or {}).items():
        click.echo(f"profile {name}: min {p['min']} opt {p['opt']} max {p['max']}")
    if d["kind"] == "onnx":
        click.echo(f"opsets {d['opsets']}; {d['nodes']} nodes, {len(d['coupled_scan_nodes'])} CoupledScan")
        for n in d["coupled_scan_nodes"]:
            attrs = ", ".join(f"{k}={v}" for k, v in sorted(n["attributes"].items()))
            click.echo(f"  {n['name']}: {n['inputs']} inputs, {n['outputs']} outputs, {attrs}")
        click.echo(f"runs on: {d['runs_on']}")
    if d["kind"] == "checkpoint":
        click.echo(f"{d['parameters']} parameters; config {json.dumps(d['config'])}")


# ---------------------------------------------------------------------------- serve-repo

@cli.command("serve-repo")
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(), required=True, help="The model repository folder to write.")
@click.option("--backends", default=None, metavar="B[,B...]",
              help="onnxruntime, tensorrt, python, stream (the streaming models of onnxruntime/python) "
                   "[default: every one the export allows].")
@click.option("--name", default="coupled_mamba", show_default=True, help="Prefix of the model names.")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="max_batch_size (TensorRT: at most the engine profile's).")
@click.option("--preferred-batch", default="", metavar="B[,B...]", help="Dynamic batcher's preferred sizes.")
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=500, show_default=True,
              help="How long the batcher waits to fill a batch.")
@click.option("--dynamic-batching/--no-dynamic-batching", default=True, show_default=True)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances per device.")
@click.option("--kind", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
              help="Instance kind (auto: GPUs where the server has them).")
@click.option("--gpus", default="", metavar="I[,I...]", help="GPU ids of the instances (implies --kind gpu).")
@click.option("--max-sequences", type=click.IntRange(min=1), default=16, show_default=True,
              help="Streaming models: sequences batched together.")
@click.option("--sequence-idle-us", type=click.IntRange(min=1), default=60_000_000, show_default=True,
              help="Streaming models: a sequence idle this long is ended.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Python backend: ONNX Runtime threads "
                                                                           "per instance.")
@click.option("--engine", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TensorRT engine (default: one in EXPORT_DIR).")
@click.option("--ort-ops", "op_library", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CoupledScan ONNX Runtime op library to ship (default: as `run` finds it).")
@click.option("--plugin", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CoupledScan TensorRT plugin to ship beside the engine.")
@click.option("--server-path", default=None, metavar="PATH",
              help="Where the server sees the repository, e.g. /models in a container (absolute paths in "
                   "config.pbtxt use it) [default: the output's absolute path].")
@click.option("--force", is_flag=True, help="Replace this command's model folders in an existing repository.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def serve_repo(export_dir, output, backends, name, max_batch, preferred_batch, queue_delay_us, dynamic_batching,
               instances, kind, gpus, max_sequences, sequence_idle_us, threads, engine, op_library, plugin,
               server_path, force, as_json):
    """Write a Triton Inference Server model repository from EXPORT_DIR (cm-deploy export): one model
    folder per backend, config.pbtxt in Triton's schema (docs/serving.md)."""
    from .runtime.specs import parse_int_list
    from .serving.repository import RepoOptions, write_repository
    opts = RepoOptions(
        backends=tuple(b.strip() for b in backends.split(",") if b.strip()) if backends else None, name=name,
        max_batch=max_batch, preferred_batch=tuple(parse_int_list(preferred_batch, "--preferred-batch"))
        if preferred_batch else (), queue_delay_us=queue_delay_us, dynamic_batching=dynamic_batching,
        instances=instances, kind=kind, gpus=tuple(int(g) for g in gpus.split(",") if g.strip().isdigit())
        if gpus else (), max_sequences=max_sequences, sequence_idle_us=sequence_idle_us, threads=threads,
        engine=engine, op_library=op_library, plugin=plugin, server_path=server_path)
    if gpus and len(opts.gpus) != len([g for g in gpus.split(",") if g.strip()]):
        raise UserError(f"--gpus: expected GPU ids (integers >= 0) separated by commas, got {gpus!r}")
    summary = write_repository(export_dir, output, opts, force=force)
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"wrote {summary['repository']}/")
    click.echo(_table([(m["name"], m["backend"], m["what"]) for m in summary["models"]], ("model", "backend", "what")))
    for note in summary["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"start: {summary['start']}")


# ---------------------------------------------------------------------------- entry point

def main(argv=None) -> int:
    """Entry point: run the CLI and turn every error into an exit status and one stderr line."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = "cm-deploy"
    debug = os.environ.get(DEBUG_ENV) == "1"
    try:
        if not args:
            args = ["--help"]
        with _notes(prog):
            rv = cli.main(args=args, prog_name=prog, standalone_mode=False)
        return _exit(rv if isinstance(rv, int) else 0)
    except click.exceptions.Exit as e:
        return _exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        return _exit(130)
    except click.ClickException as e:     # usage errors: one line, not click's usage block
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else prog
        hint = f" (see '{where} --help')" if isinstance(e, click.UsageError) else ""
        click.echo(f"{where}: error: {_die_line(e.format_message())}{hint}", err=True)
        return _exit(e.exit_code if e.exit_code else 2)
    except CheckFailed as e:
        click.echo(f"{prog}: {_die_line(e)}", err=True)
        return _exit(1)
    except UserError as e:
        if debug:
            import traceback
            traceback.print_exc()
        click.echo(f"{prog}: error: {_die_line(e)}", err=True)
        return _exit(2)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        return _exit(130)
    except BrokenPipeError:
        return _exit(0)
    except (OSError, MemoryError) as e:   # unreadable/unwritable files, full disks: the user's to fix
        if debug:
            import traceback
            traceback.print_exc()
        click.echo(f"{prog}: error: {_die_line(e)}", err=True)
        return _exit(2)
    except Exception as e:                # a bug: still one line; the traceback on request
        if debug:
            import traceback
            traceback.print_exc()
        click.echo(f"{prog}: internal error (a bug in cm-deploy; please report it with the traceback that "
                   f"{DEBUG_ENV}=1 prints): {type(e).__name__}: {_die_line(e)}", err=True)
        return _exit(3)


@contextlib.contextmanager
def _notes(prog):
    """The runtime's InputCastWarning (inputs cast to the graph's types) as one stderr line each time."""
    from .errors import InputCastWarning
    shown = warnings.showwarning

    def show(message, category, *args, **kw):
        if issubclass(category, InputCastWarning):
            click.echo(f"{prog}: note: {_die_line(message)}", err=True)
        else:
            shown(message, category, *args, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("always", InputCastWarning)
        warnings.showwarning = show
        yield


def _exit(code) -> int:
    # the console-script wrapper passes main()'s return value to sys.exit
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
