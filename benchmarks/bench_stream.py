"""Streaming per token (issue 21, item 3): one Stream.push on ONNX Runtime's CUDA provider
(model.stream.onnx with the CoupledScan op library, CUDA graphs, the state on the device) against
PyTorch's CoupledMamba.step captured in a CUDA graph, side by side in one run.

    python3 benchmarks/bench_stream.py --out DIR [--ort-ops LIB] [--budget 240]   # GPU: onnxruntime-gpu
    python3 benchmarks/bench_stream.py --out /tmp/smoke --smoke                   # CPU: checks the script

Paper config (text 768, audio 74, vision 35; d_model 128, 3 layers, d_state 64), one random
checkpoint (seed 0), float32 exact on both sides (no TF32), chunks of T = 1 and 16 steps, batch 1
and 64. Per push (the chunks already on the GPU; one synchronous push, its prediction copied to the
host):
  * ort stream graph : Stream.push on model.stream.onnx, cuda_graph=True: the chunk copied into the
                       capture's buffers, the state in two sets of CUDA OrtValues used in turn (two
                       captures per chunk shape), no host copy of the state
  * ort stream       : the same without CUDA graphs
  * torch step graph : CoupledMamba.step (Triton kernels) captured in a CUDA graph with its state in
                       static buffers (the next state copied back into them inside the graph); the
                       chunk copied into static inputs, replay
  * torch step       : the same step, eager
Latency: median wall clock after warm-up. Parity: each row's predictions over the first pushes of
one chunk sequence from zero state, against the torch step graph row (max |a - b| / max |b|).
Goal (issue 21): ort stream graph <= 1.2x torch step graph. Outputs: stream.json, STREAM.md.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Budget, err_str, log, md_table, ort_bench_args, ort_bench_record, synchronous_latency, write_json  # noqa: E402

PAPER = dict(modalities={"text": 768, "audio": 74, "vision": 35}, d_model=128, n_layers=3, d_state=64)
CASES = [(1, 1), (1, 16), (64, 1), (64, 16)]          # (batch, T)
SMOKE = dict(config=dict(modalities={"text": 12, "audio": 7, "vision": 5}, d_model=16, n_layers=2, d_state=4),
             cases=[(1, 1), (2, 4)])
GOAL = 1.2
PARITY_PUSHES = 6


class TorchStepper:
    """CoupledMamba.step with its state carried, eager or captured in one CUDA graph (the state in
    static buffers, updated in place by the graph)."""

    def __init__(self, model, batch, T, graph):
        import torch
        self.torch, self.model = torch, model
        dev = model.head.weight.device
        self.state = model.initial_state(batch, dev)
        self.x = {n: torch.zeros(batch, T, f, device=dev) for n, f in model.config.modalities.items()}
        self.graph = None
        if graph:
            with torch.inference_mode():
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):       # Triton compiles and autotunes outside the capture
                        model.step(self.x, self.state)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.y, new = model.step(self.x, self.state)
                    for k, v in self.state.items():
                        v.copy_(new[k])

    def push(self, chunk):
        with self.torch.inference_mode():
            if self.graph is None:
                y, self.state = self.model.step(chunk, self.state)
                return y.cpu().numpy()
            for n, v in chunk.items():
                self.x[n].copy_(v)
            self.graph.replay()
            return self.y.cpu().numpy()


def main():
    a = ort_bench_args(__doc__, budget=240.0, iters=200)
    budget = Budget(a.budget)

    import numpy as np
    import torch

    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    from cm_deploy.export import export_checkpoint
    from cm_deploy.runtime import open_stream
    from cm_deploy.runtime.placement import predict_cuda_placement
    from cm_deploy.runtime.torch_backend import TorchBackend

    cuda = torch.cuda.is_available() and not a.smoke
    dev = "cuda" if cuda else "cpu"
    cfg_kw = SMOKE["config"] if a.smoke else PAPER
    cases = SMOKE["cases"] if a.smoke else CASES
    res, lib = ort_bench_record("stream", a, cfg_kw, goal=GOAL)

    torch.manual_seed(0)
    ckpt = save_checkpoint(CoupledMamba(CoupledMambaConfig(**cfg_kw)), os.path.join(a.out, "ckpt.pt"))
    export = os.path.join(a.out, "export")
    export_checkpoint(ckpt, export, streaming=True)
    graph_file = os.path.join(export, "model.stream.onnx" if lib else "model.stream.portable.onnx")
    res["graph"] = {"file": os.path.basename(graph_file), "placement": predict_cuda_placement(graph_file).to_dict()}
    model = TorchBackend(ckpt, device=dev, dtype="float32").model      # folded, Triton kernels on CUDA

    for batch, T in cases:
        if budget.left() < 20:
            log("budget spent: stopping")
            break
        g = torch.Generator(device="cpu").manual_seed(batch * 100 + T)
        chunks = [{n: torch.randn(batch, T, f, generator=g).to(dev) for n, f in cfg_kw["modalities"].items()}
                  for _ in range(8)]
        # ONNX Runtime takes the CUDA tensors as they are (__cuda_array_interface__), host arrays on the CPU
        as_ort = (lambda c: c) if cuda else (lambda c: {k: v.numpy() for k, v in c.items()})  # noqa: E731
        variants = [("torch step graph", lambda: TorchStepper(model, batch, T, graph=True), cuda),
                    ("torch step", lambda: TorchStepper(model, batch, T, graph=False), True),
                    ("ort stream graph", lambda: open_stream(graph_file, batch=batch, device=dev, ort_ops=lib,
                                                             cuda_graph=True), cuda),
                    ("ort stream", lambda: open_stream(graph_file, batch=batch, device=dev, ort_ops=lib), True)]
        ref = None
        for name, make, runs in variants:
            if not runs:
                continue
            row = {"backend": name, "batch": batch, "T": T}
            try:
                s = make()
                try:
                    push = s.push if name.startswith("torch") else (lambda c, s=s: s.push(as_ort(c)))
                    ys = [np.asarray(push(c)) for c in chunks[:PARITY_PUSHES]]
                    if ref is None:
                        ref, res["parity_reference"] = ys, name
                    row["max_rel_vs_ref"] = max(
                        float(np.abs(y - r).max() / max(np.abs(r).max(), 1e-30)) for y, r in zip(ys, ref))
                    if hasattr(s, "state_device"):
                        row["state_device"] = s.state_device
                        row["name"] = s.backend.name
                    k = iter(range(1 << 30))
                    row.update(synchronous_latency(lambda: push(chunks[next(k) % len(chunks)]), warmup=10 if cuda else 1,
                                     iters=a.iters if cuda else 3, budget_s=min(15.0, budget.left() / 8), min_iters=5))
                    if hasattr(s, "backend") and getattr(s.backend, "cuda_graph", False):
                        row["captured_shapes"] = s.backend.captured_shapes
                finally:
                    if hasattr(s, "close"):
                        s.close()
            except Exception as e:  # noqa: BLE001
                row["error"] = err_str(e)
            log(f"b{batch} T{T} {name}: " + (f"{row['p50_ms']:.3f} ms" if "p50_ms" in row else row.get("error", "?")))
            res["rows"].append(row)
    summarize(res)
    write_json(os.path.join(a.out, "stream.json"), res)
    with open(os.path.join(a.out, "STREAM.md"), "w") as f:
        f.write(render_md(res))
    log(f"wrote {a.out}/stream.json and STREAM.md")


def summarize(res):
    by = {}
    for r in res["rows"]:
        by.setdefault((r["batch"], r["T"]), {})[r["backend"]] = r
    res["targets"] = []
    for (b, T), rows in by.items():
        ort_ms = rows.get("ort stream graph", rows.get("ort stream", {})).get("p50_ms")
        base = rows.get("torch step graph", rows.get("torch step", {})).get("p50_ms")
        t = {"batch": b, "T": T, "ort_ms": ort_ms, "torch_graph_ms": base}
        if ort_ms and base:
            t["ratio"] = ort_ms / base
            t["met"] = t["ratio"] <= GOAL
        res["targets"].append(t)


def render_md(res):
    e = res["env"]
    lines = ["# Streaming per push: ONNX Runtime (CUDA graphs, state on the device) vs PyTorch step (CUDA graph)",
             "", f"device {e.get('device')}, torch {e.get('torch')}, ORT {res['ort']}, commit {e.get('commit')}, "
             f"{e.get('time_utc')}; config {res['config']}; float32 exact; smoke {res['smoke']}",
             "", f"Graph {res['graph']['file']}: " + (
                 f"{res['graph']['placement']['nodes']} nodes, {len(res['graph']['placement']['host_nodes'])} on the "
                 f"CPU (predicted), {len(res['graph']['placement']['copies'])} host<->device copies"), ""]
    rows = []
    for r in res["rows"]:
        parity = r.get("max_rel_vs_ref")
        rows.append([f"{r['batch']}", f"{r['T']}", r["backend"],
                     r.get("p50_ms") if "error" not in r else "error: " + r["error"][:100],
                     r.get("min_ms"), parity, r.get("state_device", "-"), r.get("captured_shapes", "-")])
    lines.append(md_table(["batch", "T", "backend", "p50 ms", "min ms", f"max rel vs {res.get('parity_reference')}", "state on",
                           "captures"], rows))
    lines += ["", f"Target: ort stream graph <= {GOAL}x torch step graph (eager rows where no graph ran).", "",
              md_table(["batch", "T", "ort ms", "torch graph ms", "ratio", "met"],
                       [[t["batch"], t["T"], t["ort_ms"], t["torch_graph_ms"], t.get("ratio"),
                         {True: "yes", False: "NO"}.get(t.get("met"), "-")] for t in res["targets"]])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
