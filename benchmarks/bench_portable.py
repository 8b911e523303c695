"""The portable CoupledScan (issue 21, item 5): the ONNX function's Scan over chunks of time against
the one-step-per-iteration Scan it replaced, on ONNX Runtime (CPU here; the CUDA provider where
onnxruntime-gpu is installed: --device cuda).

    python3 benchmarks/bench_portable.py --out DIR [--device cpu|cuda] [--shapes 1x500,8x500] [--iters 3]
    python3 benchmarks/bench_portable.py --out DIR --model --shapes 1x500,8x500   # whole paper model

One CoupledScan node (M = 3, E = 256, N = 64, softplus, kappa = 1/M: the paper model's layer) as a
graph of its own, with the portable function of each variant:
  * chunk T    : this tree's function with T steps per Scan iteration (--chunks)
  * LABEL      : the function of portable.py at a commit (--rev LABEL=REV[:key=value...], the keys
                 passed to its coupled_scan_function; REV may also be a path to such a file, e.g.
                 `git show a115b47:cm_deploy/export/portable.py > old.py` for a tree without .git);
                 default step=a115b47, the function before issue 21 (one Scan iteration per step).
--model: the paper model exported once (model.onnx), made portable with each function, timed as
whole graphs. Every run is checked against the first variant's output (max relative error).
Latency: median (and min) wall clock of `--iters` synchronous calls after one warm-up, variants
interleaved round by round (the CPU machine is shared); on CUDA the inputs are bound on the device
and the (small) output copied back. Writes portable.json and PORTABLE.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, env_info, err_str, log, write_json  # noqa: E402

M, E, N = 3, 256, 64
PAPER = dict(modalities={"text": 768, "audio": 74, "vision": 35}, d_model=128, n_layers=3, d_state=64)


def old_portable(rev):
    """cm_deploy/export/portable.py as of commit `rev` (or the file at path `rev`, for a copy of the
    tree without its git history), as a module (its relative imports resolved)."""
    if os.path.isfile(rev):
        with open(rev) as f:
            src = f.read()
    else:
        src = subprocess.run(["git", "-C", REPO, "show", f"{rev}:cm_deploy/export/portable.py"], capture_output=True,
                             text=True, check=True).stdout
    mod = types.ModuleType("cm_deploy.export._portable_old")
    mod.__package__ = "cm_deploy.export"
    exec(compile(src, f"{rev}:portable.py", "exec"), mod.__dict__)   # noqa: S102 (our own file at a commit)
    return mod


def scan_model(function):
    import onnx
    from onnx import TensorProto, helper
    shapes = {"u": ["b", M, "L", E], "delta": ["b", M, "L", E], "A": [M, E, N], "B": ["b", M, "L", N],
              "C": ["b", M, "L", N], "D": [M, E], "z": ["b", M, "L", E], "delta_bias": [M, E]}
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    node = helper.make_node("CoupledScan", list(shapes), ["y"], domain="cm_deploy", delta_softplus=1,
                            coupling_scale=1.0 / M, has_final_state=0)
    g = helper.make_graph([node], "scan", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes["u"])])
    m = helper.make_model(g, functions=[function], ir_version=10,
                          opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("cm_deploy", 1)])
    onnx.checker.check_model(m, full_check=True)
    return m.SerializeToString()


def scan_feeds(b, L, seed=0):
    """The model's statistics: S4D-real A, dt_bias giving dt in [1e-3, 1e-1] (Mamba's init)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (M, E))).astype(np.float32)
    return {"u": f(b, M, L, E), "delta": 0.1 * f(b, M, L, E),
            "A": -np.tile(np.arange(1, N + 1, dtype=np.float32), (M, E, 1)),
            "B": f(b, M, L, N), "C": f(b, M, L, N), "D": f(M, E), "z": f(b, M, L, E),
            "delta_bias": (dt + np.log(-np.expm1(-dt))).astype(np.float32)}


def runner(session, feeds, device):
    """A synchronous call of `session` returning its first output. On CUDA the inputs are copied to
    the device once and bound there (IOBinding), so that only the graph is timed."""
    if device != "cuda":
        return lambda: session.run(None, feeds)[0]
    import onnxruntime as ort
    binding = session.io_binding()
    for name, v in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
    for o in session.get_outputs():
        binding.bind_output(o.name, "cuda", 0)

    def call():
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()
    return call


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", default="1x64,1x500,8x500", help="batch x L, comma separated")
    p.add_argument("--chunks", default="8", help="chunk sizes T of this tree's function")
    p.add_argument("--rev", action="append", default=None, metavar="LABEL=REV[:key=value...]",
                   help="the function at a commit (repeatable; default step=a115b47)")
    p.add_argument("--model", action="store_true", help="the whole paper model instead of one CoupledScan node")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)

    import numpy as np
    import onnxruntime as ort

    from cm_deploy.export import portable
    if a.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        p.error("--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    providers = (["CUDAExecutionProvider"] if a.device == "cuda" else []) + ["CPUExecutionProvider"]
    fn, revs = {}, {}
    for spec in a.rev if a.rev is not None else ["step=a115b47"]:
        label, _, rest = spec.partition("=")
        rev, *kv = rest.split(":")
        kw = {k: int(v) if v.isdigit() else v for k, v in (x.split("=", 1) for x in kv)}
        try:
            mod = old_portable(rev)
        except (OSError, subprocess.CalledProcessError) as e:     # a copy of the tree without its git history
            log(f"no variant {label!r}: cannot read portable.py at {rev} ({err_str(e)[:200]})")
            continue
        revs[label] = spec
        fn[label] = lambda stateful, mod=mod, kw=kw: mod.coupled_scan_function(18, stateful, **kw)
    for t in filter(None, a.chunks.split(",")):
        fn[f"chunk {t}"] = lambda stateful, t=int(t): portable.coupled_scan_function(18, stateful, chunk=t)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    res = {"kind": "portable", "device": a.device, "ort": ort.__version__, "env": env_info(), "model": a.model,
           "scan": {"M": M, "E": E, "N": N}, "revs": revs, "threads": a.threads, "rows": []}

    if a.model:
        import onnx
        import torch

        from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
        from cm_deploy.export import export_checkpoint
        torch.manual_seed(0)
        ckpt = save_checkpoint(CoupledMamba(CoupledMambaConfig(**PAPER)), os.path.join(a.out, "ckpt.pt"))
        export_checkpoint(ckpt, os.path.join(a.out, "export"))
        trt = onnx.load(os.path.join(a.out, "export", "model.onnx"))
        models = {}
        for name, make in fn.items():
            m = onnx.ModelProto()
            m.CopyFrom(trt)
            m.functions.append(make(False))
            models[name] = m.SerializeToString()
        res["config"] = PAPER
    else:
        models = {name: scan_model(make(False)) for name, make in fn.items()}

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if a.threads:
        opts.intra_op_num_threads = a.threads
    sessions = {name: ort.InferenceSession(m, opts, providers=providers) for name, m in models.items()}
    for b, L in shapes:
        if a.model:
            rng = np.random.default_rng(b * 1000 + L)
            feeds = {n: rng.standard_normal((b, L, f), dtype=np.float32) for n, f in PAPER["modalities"].items()}
            feeds.update({f"{n}_lengths": np.full(b, L, np.int64) for n in PAPER["modalities"]})
        else:
            feeds = scan_feeds(b, L)
        run = {name: runner(s, feeds, a.device) for name, s in sessions.items()}
        outs, lat = {}, {name: [] for name in sessions}
        for name, call in run.items():               # warm-up, and the output every variant is checked against
            try:
                outs[name] = call()
            except Exception as e:  # noqa: BLE001
                res["rows"].append({"batch": b, "L": L, "variant": name, "error": err_str(e)})
                log(f"{b}x{L} {name}: {err_str(e)}")
        for _ in range(a.iters):
            for name in outs:
                t0 = time.perf_counter()
                run[name]()
                lat[name].append((time.perf_counter() - t0) * 1e3)
        if not outs:
            continue
        base = next(iter(outs.values()))
        for name in outs:
            err = float(np.abs(outs[name] - base).max() / max(float(np.abs(base).max()), 1e-30))
            row = {"batch": b, "L": L, "variant": name, "p50_ms": statistics.median(lat[name]),
                   "min_ms": min(lat[name]), "n": len(lat[name]), "rel_err_vs_first": err}
            res["rows"].append(row)
            log(f"{b}x{L} {name}: {row['p50_ms']:.1f} ms (min {row['min_ms']:.1f}), rel err {err:.1e}")
    write_json(os.path.join(a.out, "portable.json"), res)
    with open(os.path.join(a.out, "PORTABLE.md"), "w") as f:
        f.write(render_md(res))
    log(f"wrote {a.out}/portable.json and PORTABLE.md")


def render_md(res):
    e = res["env"]
    what = ("paper model (3 layers), model.portable.onnx" if res["model"] else
            f"one CoupledScan node, M {res['scan']['M']}, E {res['scan']['E']}, N {res['scan']['N']}")
    lines = [f"# Portable CoupledScan on ONNX Runtime ({res['device'].upper()}): {what}", "",
             f"ORT {res['ort']}, commit {e.get('commit')}, {e.get('time_utc')}, host {e.get('host')}, "
             f"intra-op threads {res['threads'] or 'default'}; 'chunk T': this commit's function, T steps per Scan "
             "iteration; " + "; ".join(f"'{k}': portable.py at {v.split('=', 1)[1]}" for k, v in res["revs"].items()),
             "",
             "| b x L | variant | p50 ms | min ms | vs step | rel err vs first |", "|---|---|---|---|---|---|"]
    step = {(r["batch"], r["L"]): r["p50_ms"] for r in res["rows"] if r["variant"] == "step" and "p50_ms" in r}
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['batch']}x{r['L']} | {r['variant']} | error: {r['error'][:100]} | | | |")
            continue
        s = step.get((r["batch"], r["L"]))
        lines.append(f"| {r['batch']}x{r['L']} | {r['variant']} | {r['p50_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{(s / r['p50_ms']):.2f}x | {r['rel_err_vs_first']:.1e} |" if s else
                     f"| {r['batch']}x{r['L']} | {r['variant']} | {r['p50_ms']:.1f} | {r['min_ms']:.1f} | - | "
                     f"{r['rel_err_vs_first']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
