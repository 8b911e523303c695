#!/usr/bin/env python3
"""Parse and build CoupledScan ONNX graphs with TensorRT-RTX's Python bindings and the plugin library.

TensorRT-RTX builds engines on an H100 (it cannot run them there: compute capability 9.0 is not among
the ones it supports), so this checks what can be checked: the library loads into the global plugin
registry, the ONNX parser finds the creator and imports the node, and engines build (float32,
float16, bfloat16; with and without the initial_state/final_state variant). Extra ONNX files given on
the command line (e.g. the exported model.onnx) are parsed and built too.

Every parse/build runs in a child process: an abort inside TensorRT is recorded with the last plugin
calls (CM_DEPLOY_PLUGIN_TRACE=1 in the child) instead of killing the script.

Known TensorRT-RTX 1.7 (pip wheels) problem, worked around here: for a plugin node its ONNX parser
dlopen()s "libtensorrt_rtx.so", a name the wheel does not ship (only libtensorrt_rtx.so.1); the
std::runtime_error it throws crosses a noexcept frame and the process dies with "terminate called
without an active exception" right after createPlugin. The children get a folder holding the symlink
libtensorrt_rtx.so -> libtensorrt_rtx.so.1 on LD_LIBRARY_PATH (--no-soname-fix shows the abort).
Applications using the wheels need the same symlink (or LD_LIBRARY_PATH entry).

    # TensorRT-RTX via shared/tools/trt-rtx-carry; then:
    PYTHONPATH=/tmp/trt-rtx:$PYTHONPATH python trt_rtx_check.py --plugin build/.../libcoupled_scan_plugin.so \\
        --out rtx.json [model.onnx ...]

Exit status: 0 when every check passed, 1 when one failed, 2 when TensorRT-RTX cannot be imported.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

RESULT_MARK = "@@CM_RTX_RESULT@@"


def import_trt():
    import tensorrt_rtx_libs  # noqa: F401  (loads the native libraries first)
    import tensorrt_rtx_bindings as trt
    return trt


# ------------------------------------------------------------------------------------------------
# Synthetic one-node graph

def make_onnx(path: Path, dtype: str, streaming: bool, M=3, E=64, N=16, softplus=1, kappa=None):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}[dtype]
    rng = np.random.default_rng(0)
    A = (-np.exp(rng.uniform(np.log(0.5), np.log(0.5) + 2.5, size=(M, E, N)))).astype(np.float32)
    D = rng.standard_normal((M, E)).astype(np.float32)
    bias = (0.3 * rng.standard_normal((M, E))).astype(np.float32)
    inits = [numpy_helper.from_array(A, "A"), numpy_helper.from_array(D, "D"), numpy_helper.from_array(bias, "delta_bias")]
    act = ["batch", M, "L", E]
    bc = ["batch", M, "L", N]
    graph_inputs = [helper.make_tensor_value_info("u", elem, act), helper.make_tensor_value_info("delta", elem, act),
                    helper.make_tensor_value_info("B", elem, bc), helper.make_tensor_value_info("C", elem, bc),
                    helper.make_tensor_value_info("z", elem, act)]
    node_inputs = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    outputs = [helper.make_tensor_value_info("y", elem, act)]
    node_outputs = ["y"]
    if streaming:
        graph_inputs.append(helper.make_tensor_value_info("initial_state", TensorProto.FLOAT, ["batch", E, N]))
        node_inputs.append("initial_state")
        outputs.append(helper.make_tensor_value_info("final_state", TensorProto.FLOAT, ["batch", E, N]))
        node_outputs.append("final_state")
    node = helper.make_node("CoupledScan", node_inputs, node_outputs, name="coupled_scan_0", domain="cm_deploy",
                            delta_softplus=int(softplus), coupling_scale=float(kappa if kappa else 1.0 / M),
                            has_final_state=int(streaming))
    graph = helper.make_graph([node], "coupled_scan_check", graph_inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("cm_deploy", 1)],
                              producer_name="cm-deploy trt_rtx_check")
    model.ir_version = 8  # what TensorRT's parsers accept everywhere
    onnx.save(model, str(path))
    return dict(M=M, E=E, N=N)


# ------------------------------------------------------------------------------------------------
# Child: one parse + build

class Collect:
    """A TensorRT logger keeping every message."""

    def __init__(self, trt):
        base = trt.ILogger

        class _L(base):
            def __init__(self):
                base.__init__(self)
                self.lines = []

            def log(self, severity, msg):
                self.lines.append((str(severity).split(".")[-1], msg))

        self.logger = _L()


def child(spec: dict) -> dict:
    res = dict(spec=spec, stage="import")
    trt = import_trt()
    res["trt_version"] = getattr(trt, "__version__", "?")
    col = Collect(trt)
    logger = col.logger
    try:
        if hasattr(trt, "init_libnvinfer_plugins"):
            try:
                trt.init_libnvinfer_plugins(logger, "")
            except Exception:
                pass
        res["stage"] = "load_library"
        registry = trt.get_plugin_registry()
        handle = registry.load_library(spec["plugin"])
        res["library_loaded"] = handle is not None
        creator = None
        for getter in ("get_creator", "get_plugin_creator"):
            if creator is None and hasattr(registry, getter):
                try:
                    creator = getattr(registry, getter)("CoupledScan", "1", "")
                except Exception as exc:
                    res.setdefault("creator_lookup_errors", []).append(f"{getter}: {exc}")
        res["creator_found"] = creator is not None

        res["stage"] = "network"
        flags = 0
        ndf = getattr(trt, "NetworkDefinitionCreationFlag", None)
        if ndf is not None and hasattr(ndf, "STRONGLY_TYPED"):
            flags |= 1 << int(ndf.STRONGLY_TYPED)
            res["strongly_typed"] = True
        if ndf is not None and hasattr(ndf, "EXPLICIT_BATCH"):
            flags |= 1 << int(ndf.EXPLICIT_BATCH)
        builder = trt.Builder(logger)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)

        res["stage"] = "parse"
        path = spec["onnx"]
        ok = parser.parse_from_file(path) if hasattr(parser, "parse_from_file") else parser.parse(Path(path).read_bytes())
        res["parse_ok"] = bool(ok)
        res["parser_errors"] = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        if not ok:
            return res
        res["network_inputs"] = [dict(name=network.get_input(i).name, shape=list(network.get_input(i).shape),
                                      dtype=str(network.get_input(i).dtype)) for i in range(network.num_inputs)]
        res["network_outputs"] = [dict(name=network.get_output(i).name, shape=list(network.get_output(i).shape),
                                       dtype=str(network.get_output(i).dtype)) for i in range(network.num_outputs)]
        res["layers"] = [str(network.get_layer(i).type) for i in range(network.num_layers)]

        res["stage"] = "config"
        config = builder.create_builder_config()
        if spec.get("fp16_flag") and hasattr(trt, "BuilderFlag") and hasattr(trt.BuilderFlag, "FP16") \
                and not res.get("strongly_typed"):
            config.set_flag(trt.BuilderFlag.FP16)
            res["fp16_flag"] = True
        profile = builder.create_optimization_profile()
        b_max, l_max = spec.get("max_batch", 8), spec.get("max_len", 256)
        for i in range(network.num_inputs):
            t = network.get_input(i)
            shape = list(t.shape)
            mins, opts, maxs = [], [], []
            for k, d in enumerate(shape):
                if d >= 0:
                    mins.append(d), opts.append(d), maxs.append(d)
                else:  # axis 0 is batch, the next dynamic axis a length
                    hi = b_max if k == 0 else l_max
                    mins.append(1), opts.append(max(1, hi // 2)), maxs.append(hi)
            profile.set_shape(t.name, mins, opts, maxs)
        config.add_optimization_profile(profile)

        res["stage"] = "build"
        t0 = time.time()
        engine = builder.build_serialized_network(network, config)
        res["build_seconds"] = round(time.time() - t0, 3)
        res["build_ok"] = engine is not None
        if engine is not None:
            res["engine_bytes"] = int(engine.nbytes) if hasattr(engine, "nbytes") else len(bytes(engine))
            out = spec.get("save_engine")
            if out:
                Path(out).write_bytes(bytes(engine))
                res["engine_path"] = out
        res["stage"] = "done"
    except Exception as exc:
        res["exception"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc(limit=5)
    finally:
        keep = [f"[{s}] {m}" for s, m in col.logger.lines
                if s in ("INTERNAL_ERROR", "ERROR", "WARNING") or "lugin" in m or "CoupledScan" in m]
        res["log"] = keep[-60:]
    return res


def soname_fix_dir(work: Path):
    """A folder with libtensorrt_rtx.so -> <tensorrt_rtx_libs>/libtensorrt_rtx.so.1, or None."""
    probe = subprocess.run([sys.executable, "-c", "import os, tensorrt_rtx_libs as l; print(os.path.dirname(l.__file__))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return None
    libs = Path(probe.stdout.strip())
    real = libs / "libtensorrt_rtx.so.1"
    if (libs / "libtensorrt_rtx.so").exists() or not real.exists():
        return None
    d = work / "rtx_soname_fix"
    d.mkdir(parents=True, exist_ok=True)
    link = d / "libtensorrt_rtx.so"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(real)
    return d


def run_child(spec: dict, trace: bool, timeout: float, lib_dir: Path | None = None) -> dict:
    env = dict(os.environ)
    if trace:
        env["CM_DEPLOY_PLUGIN_TRACE"] = "1"
    if lib_dir is not None:
        env["LD_LIBRARY_PATH"] = f"{lib_dir}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else str(lib_dir)
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return dict(spec=spec, ok=False, returncode=None, error=f"timeout after {timeout} s",
                    stderr_tail=(exc.stderr or "")[-4000:] if isinstance(exc.stderr, str) else "")
    res = None
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
    stderr_lines = p.stderr.splitlines()
    trace_lines = [l for l in stderr_lines if "[CoupledScan trace]" in l]
    if res is None:
        # The child died before reporting: an abort inside TensorRT or the plugin.
        res = dict(spec=spec, stage="died")
        res["error"] = f"child exited with {p.returncode} without a result" + (
            " (SIGABRT)" if p.returncode in (-6, 134) else "")
    res["returncode"] = p.returncode
    res["seconds"] = round(time.time() - t0, 2)
    res["last_plugin_calls"] = trace_lines[-15:]
    res["stderr_tail"] = "\n".join(l for l in stderr_lines if "[CoupledScan trace]" not in l)[-3000:]
    want_build = spec.get("build", True)
    res["ok"] = bool(p.returncode == 0 and res.get("parse_ok") and (res.get("build_ok") or not want_build))
    return res


def summarize(r: dict) -> str:
    s = r["spec"]
    label = s.get("label", s.get("onnx"))
    if r.get("ok"):
        return f"PASS  {label}: parsed, built in {r.get('build_seconds')} s ({r.get('engine_bytes')} bytes)"
    why = (r.get("error") or r.get("exception") or "; ".join(r.get("parser_errors", [])[:2])
           or f"stage {r.get('stage')}")
    return f"FAIL  {label}: {why} [stage {r.get('stage')}, rc {r.get('returncode')}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx", nargs="*", type=Path, help="extra ONNX files to parse and build (e.g. model.onnx)")
    ap.add_argument("--plugin", type=Path, help="libcoupled_scan_plugin.so")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--workdir", type=Path, help="where generated ONNX files (and engines with --save-engines) go")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--no-trace", action="store_true", help="do not set CM_DEPLOY_PLUGIN_TRACE=1 in the children")
    ap.add_argument("--save-engines", action="store_true")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--no-soname-fix", action="store_true",
                    help="do not put libtensorrt_rtx.so on LD_LIBRARY_PATH (reproduces RTX 1.7's abort)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(args.child)
        res = child(spec)
        print(RESULT_MARK + json.dumps(res), flush=True)
        return 0

    if args.plugin is None or not args.plugin.is_file():
        ap.error("--plugin must name the built libcoupled_scan_plugin.so")
    report = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), plugin=str(args.plugin.resolve()), checks=[])
    probe = subprocess.run([sys.executable, "-c", "import tensorrt_rtx_libs, tensorrt_rtx_bindings as t; print(t.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        print("trt_rtx_check: cannot import tensorrt_rtx_bindings:\n" + probe.stderr[-2000:], file=sys.stderr)
        report["error"] = "TensorRT-RTX not importable"
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        return 2
    report["trt_rtx_version"] = probe.stdout.strip()
    print(f"TensorRT-RTX {report['trt_rtx_version']}, plugin {report['plugin']}", flush=True)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cm_rtx_"))
    work.mkdir(parents=True, exist_ok=True)
    fix = None if args.no_soname_fix else soname_fix_dir(work)
    report["soname_fix"] = str(fix) if fix else None
    if fix:
        print(f"LD_LIBRARY_PATH gets {fix} (libtensorrt_rtx.so -> libtensorrt_rtx.so.1) for the children", flush=True)
    specs = []
    for dtype in [d for d in args.dtypes.split(",") if d]:
        for streaming in (False, True):
            label = f"synthetic {dtype} {'streaming (9 in, 2 out)' if streaming else 'plain (8 in, 1 out)'}"
            path = work / f"coupled_scan_{dtype}_{'stream' if streaming else 'plain'}.onnx"
            try:
                make_onnx(path, dtype, streaming)
            except Exception as exc:
                report["checks"].append(dict(spec=dict(label=label), ok=False, error=f"ONNX generation: {exc}"))
                continue
            spec = dict(label=label, onnx=str(path), plugin=str(args.plugin.resolve()), max_batch=args.max_batch,
                        max_len=args.max_len)
            if args.save_engines:
                spec["save_engine"] = str(path.with_suffix(".engine"))
            specs.append(spec)
    # A float32 graph with the FP16 builder flag too, for builders that still have it.
    specs.append(dict(specs[0], label="synthetic float32 + BuilderFlag.FP16 (if any)", fp16_flag=True)
                 if specs else None)
    for extra in args.onnx:
        specs.append(dict(label=str(extra), onnx=str(extra.resolve()), plugin=str(args.plugin.resolve()),
                          max_batch=args.max_batch, max_len=args.max_len))
    for spec in [s for s in specs if s]:
        print(f"-- {spec['label']}", flush=True)
        r = run_child(spec, trace=not args.no_trace, timeout=args.timeout, lib_dir=fix)
        report["checks"].append(r)
        print("   " + summarize(r), flush=True)
        for line in r.get("parser_errors", [])[:5]:
            print(f"   parser: {line}", flush=True)
        for line in r.get("log", [])[-8:]:
            print(f"   log: {line}", flush=True)
        if not r.get("ok"):
            for line in r.get("last_plugin_calls", [])[-6:]:
                print(f"   trace: {line}", flush=True)
            if r.get("stderr_tail"):
                print("   stderr: " + r["stderr_tail"][-600:].replace("\n", "\n           "), flush=True)
    report["passed"] = all(c.get("ok") for c in report["checks"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    n_ok = sum(bool(c.get("ok")) for c in report["checks"])
    print(f"{n_ok}/{len(report['checks'])} checks passed", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
