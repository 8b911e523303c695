"""mamba-ssm models exported through CoupledScan, on the GPU: parity and latency side by side.

The peer is mamba-ssm itself: its Python modules from the carried sdist (cm_deploy.foreign.
mamba_ssm_source, references=False) on top of its own selective-scan CUDA kernel, built from the
same sdist by mamba_peer.py (forward only, float32 and bfloat16; no causal-conv1d, so its Mamba runs
nn.Conv1d + selective_scan_fn, the `use_fast_path=False` branch, with its Triton norms). Ours: the
same model with the same weights through `cm_deploy.export.export_module`, run by ONNX Runtime's CUDA
provider with the CoupledScan op library (model.onnx); model.portable.onnx joins the parity check at
the smallest shape.

Models (random weights, mamba-ssm's defaults otherwise):
  mixer   one Mamba mixer, d_model 768, d_state 16 (the scan and its projections alone)
  lm      MambaLMHeadModel of mamba-130m's shape: d_model 768, 24 layers, vocab 50280 (logits)

For each model, dtype (float32; bfloat16 where ORT's CUDA provider runs the graph) and shape
(batch, L): max |ORT - mamba-ssm| relative to max |mamba-ssm|, then the median wall time of one
synchronized forward (inputs and outputs on the GPU, no host copies) of each.

    CM_DEPLOY_ORT_OP_LIBRARY=build/plugins/ort_coupled_scan/libcoupled_scan_ort.so \\
        python benchmarks/mamba_ssm_gpu.py --out benchmarks/results

needs: torch with CUDA, onnxruntime-gpu, triton, einops, nvcc (the mamba kernel build, a few
minutes), .carry/mamba_ssm-*.tar.gz (scripts/test.sh downloads it). Writes mamba_ssm_gpu.json and
mamba_ssm_gpu.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import common

SHAPES = {"mixer": [(1, 128), (1, 2048), (16, 512), (64, 1024)], "lm": [(1, 128), (1, 2048), (8, 512)]}
# --smoke: the script's own check on a CPU (mamba-ssm's reference path, ORT's CPU provider, small sizes)
SMOKE_SHAPES = {"mixer": [(1, 8), (2, 33)], "lm": [(1, 8), (2, 17)]}
TOL = {"float32": 1e-4, "bfloat16": 3e-2}


def _mamba_ssm(work, smoke=False):
    """mamba-ssm's modules over its own CUDA kernel (built here, forward only); with smoke, over its
    pure-PyTorch references."""
    import mamba_peer
    if smoke:
        from cm_deploy.foreign.mamba_ssm_source import import_mamba_ssm
        import_mamba_ssm(mamba_peer.find_sdist(common.REPO), cache_dir=os.path.join(work, "py"))
        return {"smoke": "mamba-ssm's reference path on the CPU"}
    os.environ["CM_BENCH_MAMBA_BWD"] = "0"
    ext, info = mamba_peer.build(common.REPO, work, verbose=False)
    sys.modules["selective_scan_cuda"] = ext          # what mamba-ssm's selective_scan_interface imports
    from cm_deploy.foreign.mamba_ssm_source import import_mamba_ssm
    import_mamba_ssm(mamba_peer.find_sdist(common.REPO), cache_dir=os.path.join(work, "py"), references=False)
    return info


def _models(smoke=False):
    import torch
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules.mamba_simple import Mamba
    torch.manual_seed(0)
    yield "mixer", Mamba(768, d_state=16, use_fast_path=False), lambda b, L: (torch.randn(b, L, 768),)
    cfg = MambaConfig(d_model=768, n_layer=2 if smoke else 24, vocab_size=50280, ssm_cfg={"layer": "Mamba1"})
    yield "lm", MambaLMHeadModel(cfg), lambda b, L: (torch.randint(0, 50280, (b, L)),)


def _first(out):
    return out.logits if hasattr(out, "logits") else out


def run_case(name, model, make, dtype, lib, tmp, device="cuda"):
    import numpy as np
    import torch
    from cm_deploy.export import export_module
    from cm_deploy.runtime import load
    from cm_deploy.runtime.ort_backend import _to_numpy
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    out_dir = os.path.join(tmp, f"{name}_{dtype}")
    example = make(2, 16)
    axes = {("hidden_states" if name == "mixer" else "input_ids"): {0: "batch", 1: "L"}}
    t0 = time.time()
    export_module(model, example, out_dir, dynamic_axes=axes, dtype=dtype)
    res = {"model": name, "dtype": dtype, "export_s": round(time.time() - t0, 1), "shapes": []}
    peer = copy.deepcopy(model).to(device=device, dtype=tdt).eval()
    for mixer in (m for m in peer.modules() if hasattr(m, "A_log")):   # the scan's float32 parameters
        for p in (mixer.A_log, mixer.D, mixer.dt_proj.bias):
            p.data = p.data.float()
    graphs = {"model.onnx": load(os.path.join(out_dir, "model.onnx"), ort_ops=lib, providers=_providers(device))}
    for i, (b, L) in enumerate((SMOKE_SHAPES if device == "cpu" else SHAPES)[name]):
        xs = tuple(x.to(device, tdt) if x.is_floating_point() else x.to(device) for x in make(b, L))
        # bfloat16 crosses __cuda_array_interface__ as an int16 view (torch exports no bfloat16 typestr)
        feeds = {s.name: (x.view(torch.int16) if x.dtype == torch.bfloat16 else x)
                 for s, x in zip(graphs["model.onnx"].inputs, xs)}
        with torch.no_grad():
            ref = _first(peer(*xs)).float().cpu().numpy()
        row = {"batch": b, "L": L}
        if i == 0 and "portable" not in graphs:
            graphs["portable"] = load(os.path.join(out_dir, "model.portable.onnx"), providers=_providers(device))
        for gname, g in graphs.items():
            if gname == "portable" and i > 0:
                continue
            got = _to_numpy(g.run(feeds, device_outputs=True)["output"]).astype(np.float32)
            err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
            row[f"rel_err_{gname}"] = err
            row[f"ok_{gname}"] = err <= TOL[dtype]
        with torch.no_grad():
            row["mamba_ssm_ms"] = common.wall_time(lambda: peer(*xs))["ms"]
        ort = graphs["model.onnx"]
        row["ort_op_library_ms"] = common.wall_time(lambda: ort.run(feeds, device_outputs=True))["ms"]
        row["ratio"] = row["ort_op_library_ms"] / row["mamba_ssm_ms"]
        common.log(f"  {name} {dtype} b={b} L={L}: {row}")
        res["shapes"].append(row)
    for g in graphs.values():
        g.close()
    return res


def _providers(device):
    # no TF32 on either side: float32 means float32 (torch's matmul default; cudnn's conv set in main)
    if device == "cpu":
        return ["CPUExecutionProvider"]
    return [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": "0"}), "CPUExecutionProvider"]


def render_md(res) -> str:
    rows = []
    for case in res["cases"]:
        if "error" in case:
            rows.append([case.get("model", "?"), case.get("dtype", "?"), "-", "-", "-", "-", "-", case["error"][:80]])
            continue
        for r in case["shapes"]:
            rows.append([case["model"], case["dtype"], f"{r['batch']}x{r['L']}", common.fmt(r["rel_err_model.onnx"]),
                         common.fmt(r.get("rel_err_portable")), common.fmt(r["mamba_ssm_ms"]),
                         common.fmt(r["ort_op_library_ms"]), common.fmt(r["ratio"])])
    head = ["model", "dtype", "batch x L", "rel err model.onnx", "rel err portable", "mamba-ssm ms",
            "ORT + op library ms", "ORT / mamba-ssm"]
    return ("# mamba-ssm models through CoupledScan on the GPU\n\n"
            f"{res['env'].get('gpu', '')} - mamba-ssm's own CUDA selective scan (built from the sdist) vs ONNX "
            "Runtime's CUDA provider with the CoupledScan op library; relative error = max |diff| / "
            "max |mamba-ssm|.\n\n"
            + common.md_table(head, rows) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(common.REPO, "benchmarks", "results"))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--work", default="/tmp/cm_bench_mamba")
    ap.add_argument("--smoke", action="store_true",
                    help="check the script on a CPU: mamba-ssm's reference path, ORT's CPU provider, small sizes, "
                         "float32 (timings meaningless)")
    a = ap.parse_args()
    import torch
    device = "cpu" if a.smoke else "cuda"
    dtypes = ["float32"] if a.smoke else a.dtypes.split(",")
    if device == "cuda" and not torch.cuda.is_available():
        print("mamba_ssm_gpu.py needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    from cm_deploy.runtime.native import find_library
    lib = find_library("ort", required=False)
    if lib is None:
        print("the CoupledScan ONNX Runtime op library is not built (CM_DEPLOY_ORT_OP_LIBRARY)", file=sys.stderr)
        return 2
    res = {"env": common.env_info(), "op_library": str(lib), "cases": []}
    res["env"]["gpu"] = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    common.log("building mamba-ssm's selective-scan kernel (forward) from the sdist")
    res["mamba_build"] = _mamba_ssm(a.work, smoke=a.smoke)
    with tempfile.TemporaryDirectory(prefix="cm_mamba_ssm_gpu_") as tmp:
        for name, model, make in _models(a.smoke):
            for dtype in dtypes:
                common.log(f"{name} {dtype}")
                case = {"model": name, "dtype": dtype}
                try:
                    case = run_case(name, model.eval(), make, dtype, lib, tmp, device)
                except Exception as e:  # noqa: BLE001 - one failing case is recorded, the others still run
                    case["error"] = common.err_str(e)
                    common.log(f"  FAILED {case['error']}")
                res["cases"].append(case)
    if a.smoke:
        print(render_md(res))
        return 0 if all("error" not in c and all(r["ok_model.onnx"] for r in c["shapes"]) for c in res["cases"]) else 1
    os.makedirs(a.out, exist_ok=True)
    common.write_json(os.path.join(a.out, "mamba_ssm_gpu.json"), res)
    with open(os.path.join(a.out, "mamba_ssm_gpu.md"), "w") as f:
        f.write(render_md(res))
    common.log(f"wrote {a.out}/mamba_ssm_gpu.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
