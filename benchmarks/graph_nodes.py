"""Node counts of the exported graphs (issue 12, deliverable 3): how many ONNX nodes, by op type,
TensorRT and ONNX Runtime get for the paper's model. Runs on the CPU (export needs no GPU).

    python benchmarks/graph_nodes.py [--out benchmarks/results/graph_nodes.json] [--label NAME]

The same script run at an older commit (git worktree) gives the "before" column; --compare
merges two result files into a table.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

PAPER = dict(modalities={"text": 768, "audio": 74, "vision": 35}, d_model=128, n_layers=3, d_state=64)


def count(proto):
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    # nodes inside functions (the portable graph's CoupledScan body) are counted apart
    inner = sum(len(f.node) for f in proto.functions)
    return {"nodes": sum(ops.values()), "function_nodes": inner, "by_op": dict(sorted(ops.items()))}


def measure(dtype):
    import torch
    from cm_deploy import CoupledMamba, CoupledMambaConfig
    from cm_deploy.export.exporter import build_onnx
    torch.manual_seed(0)
    model = CoupledMamba(CoupledMambaConfig(**PAPER)).eval()
    trt, portable, _ = build_onnx(model, dtype=dtype)
    return {"model.onnx": count(trt), "model.portable.onnx": count(portable)}


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


def compare(before_path, after_path):
    b, a = (json.load(open(p)) for p in (before_path, after_path))
    lines = [f"| graph | dtype | nodes {b['label']} ({b['commit']}) | nodes {a['label']} ({a['commit']}) | ratio |",
             "|---|---|---|---|---|"]
    for dtype in a["results"]:
        for g in a["results"][dtype]:
            nb = b["results"][dtype][g]["nodes"]
            na = a["results"][dtype][g]["nodes"]
            lines.append(f"| {g} | {dtype} | {nb} | {na} | {na / nb:.2f} |")
    ops = sorted(set(b["results"]["float16"]["model.onnx"]["by_op"]) | set(a["results"]["float16"]["model.onnx"]["by_op"]))
    lines += ["", "model.onnx, float16, by op type:", "", "| op | before | after |", "|---|---|---|"]
    for op in ops:
        lines.append(f"| {op} | {b['results']['float16']['model.onnx']['by_op'].get(op, 0)} | "
                     f"{a['results']['float16']['model.onnx']['by_op'].get(op, 0)} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--label", default="after")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    res = {"label": args.label, "commit": commit(), "config": PAPER,
           "results": {dt: measure(dt) for dt in ("float32", "float16")}}
    text = json.dumps(res, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
