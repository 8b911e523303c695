"""Where the CoupledScan's device time goes, kernel by kernel (issue 20: "profile first").

    TRITON_INTERPRET=0 python3 benchmarks/profile_scan.py [--out FILE.json]

For the Triton forward (inference, no grad) and forward + backward (all inputs require grad) at
the paper's shape (64 x M 3 x L 500 x E 256 x N 64) and at 1 x 500, float32 and bfloat16: every
GPU kernel the call launches (torch.profiler's CUDA activity: Triton kernels, the backward's
partial-sum reductions, zero fills, casts), its device time per call (mean of 10 calls after
warm-up) and its share. No L2 flush: back-to-back calls, as in a model. Prints one table per case.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from ort_profile import kernels  # noqa: E402
from tune_triton_fwd import ORDER, inputs  # noqa: E402  (Mamba-like input statistics)
from cm_deploy.ops import coupled_scan  # noqa: E402

REPS = 10


def kernel_times(fn):
    """{kernel: device microseconds per call}, largest first (ort_profile's CUPTI trace)."""
    per = {k: ms * 1e3 for k, ms in kernels(fn, REPS).items()}
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def case(shape, dtype, grad):
    inp = inputs(*shape, dtype)
    if grad:
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
        dy = torch.randn(shape[0], shape[1], shape[2], shape[3], device="cuda", dtype=dtype)

        def fn():
            y = coupled_scan(*[leaves[k] for k in ORDER], delta_softplus=True, impl="triton")
            torch.autograd.grad(y, [leaves[k] for k in ORDER], dy)
    else:
        def fn():
            with torch.no_grad():
                coupled_scan(*[inp[k] for k in ORDER], delta_softplus=True, impl="triton")
    return kernel_times(fn)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "commit": os.environ.get("CM_DEPLOY_COMMIT", ""), "cases": []}
    for shape in ((64, 3, 500, 256, 64), (1, 3, 500, 256, 64)):
        for dtype in (torch.float32, torch.bfloat16):
            for grad in (False, True):
                k = case(shape, dtype, grad)
                tot = sum(k.values())
                label = f"{shape[0]}x{shape[2]} {str(dtype)[6:]} {'fwd+bwd' if grad else 'fwd'}"
                print(f"\n== {label}: {tot:,.1f} us of kernels per call")
                for name, us in k.items():
                    print(f"  {us:10,.1f} us {100 * us / tot:5.1f}%  {name[:110]}")
                res["cases"].append({"case": label, "total_us": tot, "kernels_us": k})
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
