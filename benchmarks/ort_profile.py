"""Where the deployed graph spends its GPU time (issue 21, item 2): model.onnx on ONNX Runtime's CUDA
provider with the CoupledScan op library, and the PyTorch model it came from, kernel by kernel.

    python3 benchmarks/ort_profile.py --export DIR/export_float32 [--export ...] --ckpt DIR/ckpt.pt \
        --ort-ops LIB --out DIR                       # GPU: onnxruntime-gpu; bench_deploy.py's exports

The kernels are recorded with torch.profiler (CUPTI sees every CUDA kernel of the process, ONNX
Runtime's included) over a few synchronous runs after warm-up, at 64 x 500 and 1 x 500, and
grouped: scan (the op library's coupledScan*Kernel, PyTorch's Triton _fwd*_kernel), GEMM (cuBLAS /
CUTLASS), conv (PyTorch's fused Triton conv), layer norm, and the rest (elementwise, gathers, copies,
casts). GPU time only: launch overhead (what CUDA graphs remove) is the difference between these
totals and the wall-clock latencies of bench_deploy.py. Outputs: profile.json, PROFILE.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, err_str, log, md_table, write_json  # noqa: E402

SHAPES = [(64, 500), (1, 500)]
RUNS = 10
GROUPS = [("scan", re.compile(r"coupledScan|_fwd_kernel|_fwd_combine_kernel", re.I)),
          ("gemm", re.compile(r"gemm|cutlass|xmma|cublas|sm\d+_", re.I)),
          ("conv", re.compile(r"_conv_fwd_kernel", re.I)),
          ("layer norm", re.compile(r"layernorm|layer_norm", re.I))]


def group_of(name: str) -> str:
    return next((g for g, rx in GROUPS if rx.search(name)), "other")


def kernels(run, runs=RUNS):
    """{kernel name: GPU ms per run} of `run()` (synchronous), from a CUPTI trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            run()
        torch.cuda.synchronize()
    out = collections.Counter()
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        t = e.cuda_time_total if t is None else t
        if t and getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            out[e.key] += t / 1e3 / runs
    return dict(out)


def summarize(ks: dict) -> dict:
    groups = collections.Counter()
    for name, ms in ks.items():
        groups[group_of(name)] += ms
    top = sorted(ks.items(), key=lambda kv: -kv[1])[:8]
    return {"total_ms": sum(ks.values()), "groups": dict(groups), "kernels": len(ks),
            "top": [{"kernel": k[:120], "ms": v, "group": group_of(k)} for k, v in top]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", action="append", required=True, help="an export folder (model.onnx, manifest.json)")
    p.add_argument("--ckpt", default=None, help="the checkpoint they came from (PyTorch rows)")
    p.add_argument("--ort-ops", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)

    import torch
    from cm_deploy.runtime import load
    from cm_deploy.runtime.torch_backend import TorchBackend
    res = {"kind": "ort_profile", "env": env_info(), "rows": []}
    for d in a.export:
        manifest = json.load(open(os.path.join(d, "manifest.json")))
        dt, mods = manifest["dtype"], manifest["config"]["modalities"]
        tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dt]
        for batch, L in SHAPES:
            g = torch.Generator(device="cpu").manual_seed(batch * 1000 + L)
            feeds = {n: torch.randn(batch, L, f, generator=g).to("cuda", tdt).contiguous() for n, f in mods.items()}
            makers = [("ort+op", lambda: load(os.path.join(d, "model.onnx"), device="cuda", ort_ops=a.ort_ops))]
            if a.ckpt:
                makers.append(("torch eager", lambda: TorchBackend(a.ckpt, device="cuda", dtype=dt)))
            for name, make in makers:
                row = {"dtype": dt, "batch": batch, "L": L, "backend": name}
                try:
                    with make() as b:
                        row.update(summarize(kernels(lambda: b.run(feeds))))
                except Exception as e:  # noqa: BLE001
                    row["error"] = err_str(e)
                log(f"{dt} {batch}x{L} {name}: " + (f"{row['total_ms']:.3f} ms GPU, groups {row['groups']}"
                                                    if "total_ms" in row else row.get("error", "?")))
                res["rows"].append(row)
    write_json(os.path.join(a.out, "profile.json"), res)
    with open(os.path.join(a.out, "PROFILE.md"), "w") as f:
        f.write(render_md(res))
    log(f"wrote {a.out}/profile.json and PROFILE.md")


def render_md(res):
    names = ["scan", "gemm", "conv", "layer norm", "other"]
    rows = [[r["dtype"], f"{r['batch']}x{r['L']}", r["backend"], r.get("total_ms"),
             *[r.get("groups", {}).get(n, 0.0) for n in names], r.get("kernels")] if "error" not in r else
            [r["dtype"], f"{r['batch']}x{r['L']}", r["backend"], "error: " + r["error"][:100]] + [""] * 6
            for r in res["rows"]]
    lines = ["# GPU time by kernel group: ONNX Runtime (model.onnx + op library) vs PyTorch", "",
             f"device {res['env'].get('device')}, commit {res['env'].get('commit')}; ms per run (CUPTI kernel time)",
             "", md_table(["dtype", "b x L", "backend", "GPU ms", *[n + " ms" for n in names], "kernels"], rows), ""]
    for r in res["rows"]:
        if "top" in r:
            lines += [f"Top kernels, {r['dtype']} {r['batch']}x{r['L']} {r['backend']}:", "",
                      md_table(["kernel", "group", "ms"], [[k["kernel"], k["group"], k["ms"]] for k in r["top"]]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
