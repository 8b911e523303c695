"""torch.compile of CoupledMamba with the Triton scan on a GPU: eager vs CUDA graph vs compiled,
paper config, batch 64, L 500, bf16 autocast; also checks the compiled output against eager."""
import json
import sys

import torch
from triton.testing import do_bench

from cm_deploy import CoupledMamba, CoupledMambaConfig

torch.manual_seed(0)
cfg = CoupledMambaConfig(modalities={"text": 768, "audio": 74, "vision": 35}, d_model=128, n_layers=3, d_state=64)
model = CoupledMamba(cfg).cuda().eval()
x = {n: torch.randn(64, 500, f, device="cuda") for n, f in cfg.modalities.items()}
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": "64x500", "dtype": "bf16 autocast"}
with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
    y0 = model(x)
    res["eager_ms"] = do_bench(lambda: model(x))
    try:
        cm = torch.compile(model)
        y1 = cm(x)
        res["compile_max_abs_diff"] = (y1.float() - y0.float()).abs().max().item()
        res["compile_ms"] = do_bench(lambda: cm(x))
    except Exception as e:  # record, do not hide
        res["compile_error"] = f"{type(e).__name__}: {str(e)[:500]}"
print(json.dumps(res, indent=1))
sys.exit(1 if "compile_error" in res else 0)
