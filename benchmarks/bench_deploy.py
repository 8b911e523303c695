"""The deployed model (issue 11, items 5 and 6): parity and latency of the exported graphs in ONNX
Runtime against PyTorch, measured side by side in one run.

    python3 benchmarks/bench_deploy.py --out DIR [--ort-ops LIB] [--budget 600]   # GPU: onnxruntime-gpu
    python3 benchmarks/bench_deploy.py --out /tmp/smoke --smoke                   # CPU: checks the script

Paper config (text 768, audio 74, vision 35; d_model 128, 3 layers, d_state 64), one checkpoint
(seed 0), exported at float32, float16 and bfloat16. At 64 x 500 and 1 x 500, per precision:
  * torch eager / torch CUDA graph : cm_deploy.runtime.TorchBackend (the Triton scan), inputs on the GPU
  * ort+op / ort+op graph          : model.onnx on ORT's CUDA provider with the CoupledScan op library,
                                     without and with enable_cuda_graph (float32 exact: no TF32)
  * ort+op tf32 (float32)          : the same with TF32 allowed in float32 GEMMs, ORT's own default
  * ort portable                   : model.portable.onnx on ORT's CUDA provider: its own function (the
                                     ONNX Scan over chunks of time), the op library not registered
Latency: median wall clock of one synchronous call (inputs already on the GPU, bound by pointer;
the (batch, 1) output copied back), after warm-up. Each row names what ran (the backend's name:
provider, and for ONNX Runtime "custom op" or "function"). Parity: max abs and relative (to the reference's
max |y|) error of every backend against the float32 PyTorch reference scan on the same inputs.
Goal (issue 11): the deployed graph (best of ort+op, ort+op graph) <= 1.2x PyTorch's CUDA-graph
latency. Outputs: deploy.json, DEPLOY.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Budget, err_str, log, ort_bench_args, ort_bench_record, synchronous_latency, write_json  # noqa: E402

PAPER = dict(modalities={"text": 768, "audio": 74, "vision": 35}, d_model=128, n_layers=3, d_state=64)
SHAPES = [(64, 500), (1, 500)]
DTYPES = ["float32", "float16", "bfloat16"]
SMOKE = dict(config=dict(modalities={"text": 12, "audio": 7, "vision": 5}, d_model=16, n_layers=2, d_state=4),
             shapes=[(2, 16), (1, 16)], dtypes=["float32", "float16"])
GOAL = 1.2
PORTABLE_GOAL = 3.0     # issue 21 item 5: model.portable.onnx (its ONNX Scan) <= 3x PyTorch's CUDA graph at 64 x 500


def main():
    a = ort_bench_args(__doc__, budget=600.0, iters=50)
    budget = Budget(a.budget)

    import numpy as np
    import torch

    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    from cm_deploy.export import export_checkpoint
    from cm_deploy.runtime import load
    from cm_deploy.runtime.torch_backend import TorchBackend

    cuda = torch.cuda.is_available() and not a.smoke
    dev = "cuda" if cuda else "cpu"
    cfg_kw = SMOKE["config"] if a.smoke else PAPER
    shapes = SMOKE["shapes"] if a.smoke else SHAPES
    dtypes = SMOKE["dtypes"] if a.smoke else DTYPES
    res, lib = ort_bench_record("deploy", a, cfg_kw, parity=[], nodes={}, goal=GOAL)

    torch.manual_seed(0)
    ckpt = save_checkpoint(CoupledMamba(CoupledMambaConfig(**cfg_kw)), os.path.join(a.out, "ckpt.pt"))
    exports = {}
    for dt in dtypes:
        d = os.path.join(a.out, f"export_{dt}")
        try:
            export_checkpoint(ckpt, d, dtype=dt)
            exports[dt] = d
        except Exception as e:  # noqa: BLE001
            res["parity"].append({"dtype": dt, "error": f"export: {err_str(e)}"})
    if "float32" in exports:
        import onnx
        for f in ("model.onnx", "model.portable.onnx"):
            m = onnx.load(os.path.join(exports["float32"], f))
            res["nodes"][f] = {"graph": len(m.graph.node),
                               "function": sum(len(fn.node) for fn in m.functions)}

    ref = TorchBackend(ckpt, device=dev, dtype="float32", scan_impl="reference")
    for dt in exports:
        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dt]
        for batch, L in shapes:
            if budget.left() < 30:
                log("budget spent: stopping")
                break
            g = torch.Generator(device="cpu").manual_seed(batch * 1000 + L)
            x32 = {n: torch.randn(batch, L, f, generator=g) for n, f in cfg_kw["modalities"].items()}
            feeds = {n: v.to(dev, tdt).contiguous() for n, v in x32.items()}
            with torch.no_grad():
                want = ref.run({n: v.to(dev).contiguous() for n, v in x32.items()})["output"].astype(np.float64)
            scale = max(float(np.abs(want).max()), 1e-6)
            variants = [("torch eager", lambda: TorchBackend(ckpt, device=dev, dtype=dt)),
                        ("torch CUDA graph", lambda: TorchBackend(ckpt, device=dev, dtype=dt, cuda_graph=True)),
                        ("ort+op", lambda: load(os.path.join(exports[dt], "model.onnx"), device=dev, ort_ops=lib)),
                        ("ort+op graph", lambda: load(os.path.join(exports[dt], "model.onnx"), device=dev,
                                                      ort_ops=lib, cuda_graph=True)),
                        ("ort portable", lambda: load(os.path.join(exports[dt], "model.portable.onnx"), device=dev))]
            if dt == "float32":     # ORT's own default: TF32 in float32 GEMMs (the runtime's default is exact)
                variants.insert(4, ("ort+op tf32", lambda: load(os.path.join(exports[dt], "model.onnx"), device=dev,
                                                                ort_ops=lib, tf32=True)))
            for name, make in variants:
                if not cuda and "graph" in name:
                    continue
                row = {"dtype": dt, "batch": batch, "L": L, "backend": name}
                try:
                    b = make()
                    row["name"] = b.name          # what ran: provider, and custom op or function
                    try:
                        out = b.run(feeds)["output"]
                        err = np.abs(np.asarray(out, dtype=np.float64) - want)
                        row.update(max_abs=float(err.max()), max_rel=float(err.max() / scale),
                                   finite=bool(np.isfinite(np.asarray(out, dtype=np.float64)).all()))
                        row.update(synchronous_latency(lambda: b.run(feeds), warmup=5 if cuda else 1,
                                         iters=a.iters if cuda else 3, budget_s=min(20.0, budget.left() / 8)))
                    finally:
                        b.close()
                except Exception as e:  # noqa: BLE001
                    row["error"] = err_str(e)
                log(f"{dt} {batch}x{L} {name} ({row.get('name', '?')}): "
                    + (f"{row['p50_ms']:.3f} ms, err {row['max_rel']:.2e}" if "p50_ms" in row
                       else row.get("error", "?")))
                res["rows"].append(row)
    summarize(res)
    summarize_portable(res)
    write_json(os.path.join(a.out, "deploy.json"), res)
    with open(os.path.join(a.out, "DEPLOY.md"), "w") as f:
        f.write(render_md(res))
    log(f"wrote {a.out}/deploy.json and DEPLOY.md")


def rows_by_shape(res) -> dict:
    """{(dtype, batch, L): {backend: row}}"""
    by = {}
    for r in res["rows"]:
        by.setdefault((r["dtype"], r["batch"], r["L"]), {})[r["backend"]] = r
    return by


def summarize(res):
    res["targets"] = []
    for (dt, b, L), rows in rows_by_shape(res).items():
        deployed = [rows[k]["p50_ms"] for k in ("ort+op", "ort+op graph") if "p50_ms" in rows.get(k, {})]
        base = rows.get("torch CUDA graph", rows.get("torch eager", {})).get("p50_ms")
        t = {"dtype": dt, "batch": b, "L": L, "deployed_ms": min(deployed) if deployed else None, "torch_graph_ms": base}
        if deployed and base:
            t["ratio"] = min(deployed) / base
            t["met"] = t["ratio"] <= GOAL
        res["targets"].append(t)


def summarize_portable(res):
    """Issue 21 item 5: the portable graph (its own Scan, no op library) against PyTorch's CUDA graph."""
    res["portable_targets"] = []
    for (dt, b, L), rows in rows_by_shape(res).items():
        p = rows.get("ort portable", {}).get("p50_ms")
        base = rows.get("torch CUDA graph", rows.get("torch eager", {})).get("p50_ms")
        if p and base:
            res["portable_targets"].append({"dtype": dt, "batch": b, "L": L, "portable_ms": p, "torch_graph_ms": base,
                                            "ratio": p / base, "met": p / base <= PORTABLE_GOAL})


def render_md(res):
    e = res["env"]
    lines = ["# Deployed model: ONNX Runtime (+ CoupledScan op library) vs PyTorch",
             "", f"device {e.get('device')}, torch {e.get('torch')}, ORT {res['ort']}, commit {e.get('commit')}, "
             f"{e.get('time_utc')}; config {res['config']}; smoke {res['smoke']}", "",
             "| dtype | b x L | backend | ran | p50 ms | max abs err | max rel err |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['batch']}x{r['L']} | {r['backend']} | {r.get('name', '-')} | "
                         f"error: {r['error'][:120]} | | |")
        else:
            lines.append(f"| {r['dtype']} | {r['batch']}x{r['L']} | {r['backend']} | {r['name']} | "
                         f"{r['p50_ms']:.3f} | "
                         f"{r['max_abs']:.2e} | {r['max_rel']:.2e} |")
    lines += ["", f"Target: deployed graph (best of ort+op, ort+op graph) <= {GOAL}x PyTorch CUDA graph "
              "(eager where no graph ran).", "", "| dtype | b x L | deployed ms | torch graph ms | ratio | met |",
              "|---|---|---|---|---|---|"]
    for t in res["targets"]:
        ratio = f"{t['ratio']:.2f}" if "ratio" in t else "-"
        ms = [f"{v:.3f}" if v is not None else "-" for v in (t["deployed_ms"], t["torch_graph_ms"])]
        lines.append(f"| {t['dtype']} | {t['batch']}x{t['L']} | {ms[0]} | {ms[1]} | {ratio} | {t.get('met', '-')} |")
    if res.get("portable_targets"):
        lines += ["", f"Portable graph (ort portable: its own Scan, no op library) <= {PORTABLE_GOAL}x PyTorch "
                  "CUDA graph (goal at 64x500).", "", "| dtype | b x L | portable ms | torch graph ms | ratio | met |",
                  "|---|---|---|---|---|---|"]
        for t in res["portable_targets"]:
            lines.append(f"| {t['dtype']} | {t['batch']}x{t['L']} | {t['portable_ms']:.3f} | "
                         f"{t['torch_graph_ms']:.3f} | {t['ratio']:.2f} | {t['met']} |")
    if res["nodes"]:
        lines += ["", "Graph nodes (float32 export): " + ", ".join(f"{k}: {v['graph']} (+{v['function']} in the "
                                                                   f"function)" for k, v in res["nodes"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
