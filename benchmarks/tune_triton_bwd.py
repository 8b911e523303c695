"""Timing sweep of the CoupledScan Triton BACKWARD (forward + backward) launch parameters on one GPU.

    python3 benchmarks/tune_triton_bwd.py        # from the repository root, on the GPU machine

For each shape (64 x 500 fp32 / bf16, 4 x 8192, 1 x 16384; M 3, E 256, N 64) and each
`triton_scan.tuning` setting: forward + backward time (triton.testing.do_bench) and the largest
relative difference of the 8 gradients against the first setting's (round-off expected).
Results of the run that set the defaults: results/tuning/bwd_sweep.txt.
"""
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import torch  # noqa: E402
import triton  # noqa: E402
from bench_scan import Inputs  # noqa: E402
from cm_deploy.ops import triton_scan as ts  # noqa: E402

SHAPES = [(64, 500, "float32"), (64, 500, "bfloat16"), (4, 8192, "float32"), (1, 16384, "float32")]
# the first entry is the comparison base (at the time of the sweep: the previous default)
CONFIGS = [dict(bwd_block_e=32, bwd_num_warps=8), dict(bwd_block_e=16, bwd_num_warps=4),
           dict(bwd_block_e=16, bwd_num_warps=2), dict(bwd_block_e=8, bwd_num_warps=2),
           dict(bwd_block_e=32, bwd_num_warps=4), dict(bwd_block_e=8, bwd_num_warps=1),
           dict(bwd_block_e=16, bwd_num_warps=4, chunk=16)]


def fwd_bwd(leaves, dy, cfg):
    def fn():
        for t in leaves:
            t.grad = None
        with ts.tuning(**cfg):
            ts.coupled_scan_triton(*leaves, delta_softplus=True).backward(dy)
    return fn


def main(budget_s=200.0):
    t0 = time.time()
    for b, L, dt in SHAPES:
        inp = Inputs(b, L, dt, torch.device("cuda"))
        leaves = [t.detach().clone().requires_grad_(True) for t in inp.args()]
        dy = torch.randn_like(inp.u)
        ref = None
        for cfg in CONFIGS:
            if time.time() - t0 > budget_s:
                print(f"skip {b}x{L} {dt} {cfg}: budget", flush=True)
                continue
            fn = fwd_bwd(leaves, dy, cfg)
            try:
                fn()
                torch.cuda.synchronize()
                g = [t.grad.float().clone() for t in leaves]
                if ref is None:
                    ref, err = g, 0.0
                else:
                    err = max(float((a - r).abs().max() / r.abs().max().clamp_min(1e-30))
                              for a, r in zip(g, ref))
                ms = triton.testing.do_bench(fn, warmup=5, rep=40)
                print(f"{b}x{L} {dt:9} {str(cfg):60} fwd+bwd {ms:8.3f} ms  grad rel vs first "
                      f"{err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001  (one failure never stops the sweep)
                print(f"{b}x{L} {dt} {cfg} ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
        del leaves, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
