"""Peak activation memory of one inference call, measured on the CPU from the C allocator (issue 12):
glibc's mallinfo2() (bytes in use, heap and mmap) is read after every PyTorch op of the call; the
peak over the call minus what was in use before it (weights, inputs) is the call's activation peak.

The fused Triton kernels do not run: their launches are replaced by no-ops, so that everything the
GPU path allocates around them (outputs, scratch) is allocated exactly as there, at the GPU's shapes,
in seconds. What this does not see: memory inside one op (cuBLAS workspaces, an op's own
temporaries) and the CUDA caching allocator's rounding. Same setting as bench_model.py: bf16
autocast, float32 weights and inputs, inference mode, paper config.

    python benchmarks/cpu_memory.py [--batch 64] [--length 500] [--chunk 64] [--transformer] [--train] [--out FILE]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")     # lets the Triton path be chosen on the CPU

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from common import emit_text  # noqa: E402

PAPER = dict(modalities={"text": 768, "audio": 74, "vision": 35}, d_model=128, n_layers=3, d_state=64)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def in_use() -> int:
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


class Peak(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.base = in_use()
        self.peak = self.base

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, in_use())
        return out


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


def stub_kernels():
    import importlib
    mods = []
    for name in ("triton_scan", "triton_conv"):       # an older tree has no triton_conv
        try:
            mods.append(importlib.import_module(f"cm_deploy.ops.{name}"))
        except ImportError:
            pass
    for mod in mods:
        for name in dir(mod):
            if name.startswith(("_fwd", "_bwd", "_conv_")) and name.endswith("kernel"):
                setattr(mod, name, _NoLaunch())


def activation_peak(fn) -> int:
    fn()                       # warm-up: lazy initialisation is not the call's memory
    with Peak() as p:
        fn()
    return p.peak - p.base


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--transformer", action="store_true", help="also the Transformer of bench_model.py")
    ap.add_argument("--train", action="store_true",
                    help="one training step instead (forward, backward, AdamW; train mode, unfolded weights)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    from cm_deploy import CoupledMamba, CoupledMambaConfig
    stub_kernels()
    torch.manual_seed(0)
    model = CoupledMamba(CoupledMambaConfig(**PAPER)).set_scan_impl("triton")
    if a.train:
        model.train()
    else:
        model.eval()
        if hasattr(model, "fold_for_inference"):
            model.fold_for_inference()
    xs = [torch.randn(a.batch, a.length, f) for f in PAPER["modalities"].values()]

    def call(m, **kw):
        if a.train:     # as bench_model.Runner.train: the warm-up step creates AdamW's state
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                    out = m(xs, **kw)
                out.float().square().mean().backward()
                opt.step()
            return step

        def fn():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                return m(xs, **kw)
        return fn
    res = {"what": "activation peak (bytes in use above the call's start), C allocator, CPU; Triton launches "
                   "stubbed", "batch": a.batch, "L": a.length, "precision": "bf16 autocast, fp32 weights and inputs",
           "call": "training step (fwd, bwd, AdamW)" if a.train else "inference"}
    res["cm_whole"] = activation_peak(call(model))
    if not a.train:
        try:
            res[f"cm_chunk{a.chunk}"] = activation_peak(call(model, chunk=a.chunk))
        except TypeError:          # a model from before chunked inference
            pass
    if a.transformer:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_model import build_transformer
        tf = build_transformer(PAPER["modalities"], PAPER["d_model"], PAPER["n_layers"])
        tf.train(a.train)
        res["tf"] = activation_peak(call(tf))
    res["MiB"] = {k: round(v / 2**20, 1) for k, v in res.items() if isinstance(v, int) and k not in ("batch", "L")}
    emit_text(json.dumps(res, indent=1), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
