"""Timing sweep of the CoupledScan Triton FORWARD (inference path, no grad) on one GPU.

    TRITON_INTERPRET=0 python3 benchmarks/tune_triton_fwd.py [--old .carry/old_triton_scan.py]

Times launch configurations (`triton_scan.tuning` keys) with triton.testing.do_bench at the paper
shape (64 x M 3 x L 500 x E 256 x N 64) in float32 and bfloat16, at 8 x 4096 and at 1 x 16384, and
checks each configuration first against the PyTorch reference on a small shape (same constexprs,
so no extra compile). `--old` times a previous triton_scan.py (a copy of the file) for a
before/after comparison in the same process. Items past --budget seconds are skipped (compiles
take 3-10 s each). Prints one line per measurement, as it goes.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

SMOKE = "--smoke" in sys.argv  # CPU check of this script: interpreter, tiny shapes
os.environ.setdefault("TRITON_INTERPRET", "1" if SMOKE else "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402

from cm_deploy.ops import coupled_scan_reference  # noqa: E402
from cm_deploy.ops import triton_scan as ts  # noqa: E402

T0 = time.time()
DEV = torch.device("cpu" if SMOKE else "cuda")


def inputs(b, M, L, E, N, dtype, seed=0):
    # Mamba-like magnitudes (as tests/gpu/check_ops.py): dt = softplus(delta + bias) in ~[1e-3, 0.1]
    g = torch.Generator().manual_seed(seed)
    dt0 = torch.exp(torch.rand(M, E, generator=g) * (math.log(0.1) - math.log(1e-3))
                    + math.log(1e-3))
    t = dict(u=torch.randn(b, M, L, E, generator=g),
             delta=torch.randn(b, M, L, E, generator=g) * 0.5,
             A=-torch.arange(1, N + 1, dtype=torch.float32).repeat(M, E, 1),
             B=torch.randn(b, M, L, N, generator=g), C=torch.randn(b, M, L, N, generator=g),
             D=torch.ones(M, E), z=torch.randn(b, M, L, E, generator=g),
             delta_bias=dt0 + torch.log(-torch.expm1(-dt0)))
    act = ("u", "delta", "B", "C", "z")
    return {k: (v.to(dtype) if k in act else v).to(DEV) for k, v in t.items()}


ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def call(mod, inp, tune):
    with mod.tuning(**tune):
        return mod.coupled_scan_triton(*[inp[k] for k in ORDER], delta_softplus=True)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


_SMALL = {}


def check(mod, tune, dtype):
    key = dtype
    if key not in _SMALL:
        inp = inputs(*((1, 3, 4, 8, 16) if SMOKE else (2, 3, 40, 64, 64)), dtype, seed=1)
        ref = coupled_scan_reference(*[inp[k].float() if k in ("u", "delta", "B", "C", "z")
                                       else inp[k] for k in ORDER], delta_softplus=True)
        _SMALL[key] = (inp, ref)
    inp, ref = _SMALL[key]
    with torch.no_grad():
        return rel(call(mod, inp, tune), ref)


def bench(mod, inp, tune):
    with torch.no_grad():
        if SMOKE:
            t = time.time()
            call(mod, inp, tune)
            return (time.time() - t) * 1e3
        return triton.testing.do_bench(lambda: call(mod, inp, tune), warmup=10, rep=60)


SHAPES = {"paper": (64, 3, 500, 256, 64), "1x500": (1, 3, 500, 256, 64), "8x4096": (8, 3, 4096, 256, 64),
          "1x16384": (1, 3, 16384, 256, 64)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default=None, help="path of a previous triton_scan.py to time too")
    ap.add_argument("--budget", type=float, default=150.0)
    ap.add_argument("--quick", action="store_true", help="defaults only")
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--round", type=int, default=3, help="3: the round-2/3 sweep; 4: registers cap, "
                    "short segments at batch 1")
    args = ap.parse_args()
    if SMOKE:
        SHAPES.update({k: (1, 3, 5, 8, 16) for k in SHAPES})
    dev_name = "cpu (interpreter)" if SMOKE else torch.cuda.get_device_name()
    print(f"# {dev_name} torch {torch.__version__} triton {triton.__version__}", flush=True)
    mods = {"new": ts}
    if args.old and os.path.exists(args.old):
        spec = importlib.util.spec_from_file_location("old_triton_scan", args.old)
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old  # dataclasses look their module up there
        spec.loader.exec_module(old)
        mods["old"] = old
    f32, bf16 = torch.float32, torch.bfloat16
    # (module, shape, dtype, tuning): most important first
    items = [("new", "paper", f32, {})]
    if "old" in mods:
        items += [("old", "paper", f32, {}), ("old", "paper", f32, dict(block_e=64, num_warps=8))]
    items += [("new", "paper", bf16, {}), ("new", "8x4096", f32, {}), ("new", "1x16384", f32, {})]
    if args.round == 4:
        # round 4 (issue 20): a register cap (16-bit activations take ~220 registers uncapped on
        # Triton 3.6, 165 at 168 without spills: 12 warps an SM instead of 9) and shorter segments
        # at batch 1 (the 1x500 step loop is latency bound with ~3 warps an SM)
        items = [("new", "paper", bf16, {}), ("new", "paper", f32, {}),
                 ("new", "paper", bf16, dict(cvt_asm=True)), ("new", "paper", bf16, dict(unroll=2)),
                 ("new", "paper", f32, dict(unroll=2)), ("new", "paper", bf16, dict(unroll=2, maxnreg=168)),
                 ("new", "paper", bf16, dict(cvt_asm=True, maxnreg=168)), ("new", "paper", bf16, dict(cvt_asm=True, unroll=2))]
        items += [("new", "paper", bf16, dict(maxnreg=168)), ("new", "paper", bf16, dict(maxnreg=128)),
                  ("new", "paper", f32, dict(maxnreg=80)), ("new", "paper", bf16, dict(maxnreg=168, y_parts=2)),
                  ("new", "1x500", f32, {}), ("new", "1x500", bf16, {})]
        for dt in (f32, bf16):
            items += [("new", "1x500", dt, dict(min_seg=32)), ("new", "1x500", dt, dict(min_seg=16)),
                      ("new", "1x500", dt, dict(n_seg=32, block_e=1)), ("new", "1x500", dt, dict(n_seg=16, block_e=1)),
                      ("new", "1x500", dt, dict(min_seg=16, maxnreg=128))]
        items += [("new", "8x4096", bf16, {}), ("new", "8x4096", bf16, dict(maxnreg=168)),
                  ("new", "8x4096", bf16, dict(maxnreg=168, n_seg=8)), ("new", "8x4096", f32, dict(n_seg=8)),
                  ("new", "1x16384", bf16, {}), ("new", "1x16384", bf16, dict(maxnreg=168)),
                  ("new", "1x16384", f32, dict(n_seg=256)), ("new", "1x16384", bf16, dict(maxnreg=168, n_seg=256))]
    elif not args.quick:
        # round 2 (chunked phases): B/C prefetch, partial y sums, chunk length, tile width,
        # warps, segments for the long shapes
        items += [("new", "paper", f32, dict(pf_bc=False)),
                  ("new", "paper", f32, dict(block_e=2)),
                  ("new", "paper", f32, dict(block_e=2, pf_bc=False)),
                  ("new", "paper", f32, dict(block_e=2, chunk_t=64)),
                  ("new", "paper", f32, dict(block_e=2, y_parts=4)),
                  ("new", "paper", f32, dict(pf_bc=False, y_parts=4)),
                  ("new", "paper", f32, dict(pf_bc=False, chunk_t=64)),
                  ("new", "paper", f32, dict(block_e=8, pf_bc=False)),
                  ("new", "paper", f32, dict(block_e=4, num_warps=2, pf_bc=False)),
                  ("new", "paper", f32, dict(block_e=1)),
                  ("new", "paper", bf16, dict(pf_bc=False)),
                  ("new", "paper", bf16, dict(block_e=2)),
                  ("new", "paper", bf16, dict(block_e=8, pf_bc=False)),
                  ("new", "8x4096", bf16, {}),
                  ("new", "8x4096", bf16, dict(block_e=2)),
                  ("new", "8x4096", f32, dict(block_e=2)),
                  ("new", "8x4096", f32, dict(pf_bc=False)),
                  ("new", "8x4096", f32, dict(block_e=2, n_seg=2)),
                  ("new", "8x4096", f32, dict(block_e=2, n_seg=4)),
                  ("new", "8x4096", f32, dict(block_e=1, n_seg=1)),
                  ("new", "8x4096", f32, dict(block_e=1, n_seg=2)),
                  ("new", "1x16384", f32, dict(block_e=2)),
                  ("new", "1x16384", f32, dict(block_e=2, n_seg=64)),
                  ("new", "1x16384", f32, dict(block_e=2, n_seg=128)),
                  ("new", "1x16384", f32, dict(pf_bc=False, n_seg=64)),
                  ("new", "1x16384", f32, dict(block_e=1, n_seg=64))]
        if "old" in mods:
            items += [("old", "paper", bf16, {}), ("old", "8x4096", f32, {}),
                      ("old", "1x16384", f32, {})]
    cache = {}
    y_new_paper = None
    print(f"{'impl':4} {'shape':8} {'dtype':9} {'tuning':42} {'ms':>8} {'small rel':>9}", flush=True)
    for name, shape, dtype, tune in items:
        if time.time() - T0 > args.budget:
            print(f"skip {name} {shape} {tune}: budget", flush=True)
            continue
        mod = mods[name]
        try:
            err = check(mod, tune, dtype)
            key = (shape, dtype)
            if key not in cache:
                cache[key] = inputs(*SHAPES[shape], dtype)
            inp = cache[key]
            ms = bench(mod, inp, tune)
            extra = ""
            if shape == "paper" and dtype == f32:
                with torch.no_grad():
                    y = call(mod, inp, tune)
                if y_new_paper is None:
                    y_new_paper = y
                else:
                    extra = f"  vs first paper run rel {rel(y, y_new_paper):.1e}"
            print(f"{name:4} {shape:8} {str(dtype)[6:]:9} {str(tune):42} {ms:8.3f} {err:9.1e}"
                  f"{extra}   [{time.time() - T0:.0f}s]", flush=True)
        except Exception as e:  # one failure never stops the sweep
            print(f"{name:4} {shape:8} {str(dtype)[6:]:9} {str(tune):42} ERROR "
                  f"{type(e).__name__}: {str(e)[:300]}", flush=True)
        if not SMOKE:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
