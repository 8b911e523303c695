"""torch.compile of CoupledMamba with the Triton kernels on a GPU (gpu_checks.sh stage `compile`):
fullgraph=True (a graph break is an error: the conv and scan are custom ops), paper config, batch
64, L 500, bf16 autocast; inference (eager vs compiled, outputs compared) and one training step's
gradients (compiled vs eager). Exit status 1 on an error or a mismatch."""
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # run from a checkout, installed or not
from cm_deploy import CoupledMamba, CoupledMambaConfig  # noqa: E402

torch.manual_seed(0)
cfg = CoupledMambaConfig(modalities={"text": 768, "audio": 74, "vision": 35}, d_model=128, n_layers=3, d_state=64)
model = CoupledMamba(cfg).cuda()
x = {n: torch.randn(64, 500, f, device="cuda") for n, f in cfg.modalities.items()}
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": "64x500", "dtype": "bf16 autocast"}
bad = False


def grads(m):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16):
        out = m(x)
    out.float().square().mean().backward()
    return {k: p.grad.float().clone() for k, p in model.named_parameters()}


try:
    model.eval()
    with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
        y0 = model(x)
        res["eager_ms"] = do_bench(lambda: model(x))
        cm = torch.compile(model, fullgraph=True)
        y1 = cm(x)
        res["compile_max_abs_diff"] = (y1.float() - y0.float()).abs().max().item()
        res["compile_ms"] = do_bench(lambda: cm(x))
    bad |= not res["compile_max_abs_diff"] <= 2e-2 * max(y0.float().abs().max().item(), 1e-6)
    model.train()
    g0 = grads(model)
    g1 = grads(torch.compile(model, fullgraph=True))
    rel = {k: ((g1[k] - g0[k]).abs().max() / g0[k].abs().max().clamp(min=1e-12)).item() for k in g0}
    res["train_grad_worst_rel"] = max(rel.values())
    res["train_grad_worst_param"] = max(rel, key=rel.get)
    bad |= not res["train_grad_worst_rel"] <= 5e-2     # bf16 autocast, different fusion orders
except Exception as e:  # record, do not hide
    res["compile_error"] = f"{type(e).__name__}: {str(e)[:500]}"
print(json.dumps(res, indent=1))
sys.exit(1 if ("compile_error" in res or bad) else 0)
