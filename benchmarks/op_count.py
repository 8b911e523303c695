"""Aten ops per forward of the paper model outside the two fused kernels (issue 12): a CPU proxy for
the launches (and host time) of an eager forward at batch 1. The scan and the conv are replaced by
stubs counted as one kernel each; view ops and allocations are not counted.

    python benchmarks/op_count.py [fold]      # fold: fold_for_inference() first (export, TorchBackend)

Runs at any commit (an older one counts its nn.Conv1d and per-branch ops the same way).
"""
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")    # the model takes its GPU (Triton) path; the kernels are stubs
import torch  # noqa: E402

from torch.utils._python_dispatch import TorchDispatchMode
import cm_deploy.model as cmm
from cm_deploy import CoupledMamba, CoupledMambaConfig
VIEWS = {"view", "transpose", "slice", "reshape", "unsqueeze", "as_strided", "expand", "select", "split", "chunk",
         "t", "permute", "alias", "detach", "_unsafe_view", "squeeze", "split_with_sizes", "empty", "empty_like",
         "empty_strided", "new_empty", "lift_fresh", "_to_copy_noop", "sym_size", "unbind"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__(); self.c = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket).split(".")[-1]
        if name == "to" or name == "_to_copy":
            pass
        if name not in VIEWS:
            self.c[name] += 1
        return out
def scan_stub(u, *a, return_final_state=False, initial_state=None, **k):
    y = torch.empty_like(u); cnt.c["SCAN_KERNEL"] += 1
    return (y, torch.empty(u.shape[0], u.shape[3], a[1].shape[2])) if return_final_state else y
cmm.coupled_scan = scan_stub
if hasattr(cmm, "causal_conv_silu"):
    def conv_stub(x, *a, **k):
        cnt.c["CONV_KERNEL"] += 1
        return torch.empty_like(x)
    cmm.causal_conv_silu = conv_stub
torch.manual_seed(0)
cfg = CoupledMambaConfig(modalities={"text": 768, "audio": 74, "vision": 35}, d_model=128, n_layers=3, d_state=64)
m = CoupledMamba(cfg).eval().set_scan_impl("triton")
if len(sys.argv) > 1:
    m.fold_for_inference()
xs = [torch.randn(1, 8, f) for f in cfg.modalities.values()]
with torch.inference_mode():
    with Count() as cnt:
        m(xs)
print(sys.argv[1:], "kernel-launching ops per forward:", sum(cnt.c.values()))
print(sorted(cnt.c.items(), key=lambda kv: -kv[1])[:14])
