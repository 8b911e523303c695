#!/usr/bin/env python
"""Export check for a machine other than the one the exporter was written on (e.g. the GPU box with
torch 2.11): builds a small random CoupledMamba checkpoint (nothing is trained), exports it in
float32 and float16, runs each model.portable.onnx in ONNX Runtime against the PyTorch model on
several shapes (different lengths per modality, batch 1, L 1), and writes

    OUT/ckpt.pt                          the random checkpoint
    OUT/<dtype>/model.onnx               for TensorRT (CoupledScan plugin nodes)
    OUT/<dtype>/model.portable.onnx      for stock ONNX Runtime
    OUT/<dtype>/manifest.json
    OUT/<dtype>/inputs.npz, reference.npz  one input set and the float32 PyTorch output for it,
                                         to compare a TensorRT engine against
    OUT/results.json                     versions, timings, parity per shape, pass/fail

Usage: python tests/gpu/check_export.py --out /tmp/cm_export_check [--dtypes float32,float16]
Exit status 0 when every parity check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # run from a checkout, installed or not

# Loose for float16: 10-bit mantissa through every layer of the graph (the scan itself is float32).
TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}
SHAPES = [  # (batch, lengths in modality order)
    (1, (1, 1, 1)), (1, (16, 16, 16)), (2, (50, 20, 7)), (4, (9, 64, 1)), (8, (128, 96, 32)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (created)")
    ap.add_argument("--dtypes", default="float32,float16", help="comma-separated: float32,float16,bfloat16")
    ap.add_argument("--opset", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--d-state", type=int, default=8)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort
    import torch

    import cm_deploy
    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    from cm_deploy.export import export_checkpoint

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "cm_deploy": cm_deploy.__version__, "cuda_available": torch.cuda.is_available(),
                     "ort_providers": ort.get_available_providers()},
        "exports": {}, "ok": True,
    }
    torch.manual_seed(args.seed)
    config = CoupledMambaConfig(modalities={"text": 24, "audio": 12, "vision": 8}, d_model=args.d_model,
                                n_layers=args.n_layers, d_state=args.d_state)
    model = CoupledMamba(config).eval().set_scan_impl("reference")
    ckpt = save_checkpoint(model, out / "ckpt.pt")
    results["config"] = config.to_dict()

    def inputs(batch, lens, seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(batch, L, f, generator=g) for L, f in zip(lens, config.modalities.values())]

    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        rec = results["exports"][dtype] = {"ok": False}
        try:
            t0 = time.perf_counter()
            manifest = export_checkpoint(ckpt, out / dtype, dtype=dtype, opset=args.opset)
            rec["export_s"] = round(time.perf_counter() - t0, 2)
            rec["files"] = {k: str(out / dtype / v) for k, v in manifest["files"].items()}
            rec["opset"], rec["custom_ops"] = manifest["opset"], manifest["custom_ops"]
            np_dt = np.dtype("float32") if dtype == "float32" else (
                np.dtype("float16") if dtype == "float16" else None)
            if np_dt is None:
                import ml_dtypes
                np_dt = np.dtype(ml_dtypes.bfloat16)
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]
            rec["parity"] = []
            for prov in providers:
                sess = ort.InferenceSession(str(out / dtype / "model.portable.onnx"), providers=[prov])
                for i, (batch, lens) in enumerate(SHAPES):
                    xs = inputs(batch, lens, seed=i)
                    with torch.no_grad():
                        ref = model(xs).numpy()
                    feeds = {n: x.numpy().astype(np_dt) for n, x in zip(config.modalities, xs)}
                    feeds.update({f"{n}_lengths": np.full(batch, x.shape[1], np.int64)     # whole sequences
                                  for n, x in zip(config.modalities, xs)})
                    t0 = time.perf_counter()
                    got = sess.run(["output"], feeds)[0].astype(np.float32)
                    ms = (time.perf_counter() - t0) * 1e3
                    err = float(np.max(np.abs(got - ref)))
                    scale = float(np.max(np.abs(ref)))
                    ok = bool(np.allclose(got, ref, rtol=TOL[dtype], atol=TOL[dtype]))
                    rec["parity"].append({"provider": prov, "batch": batch, "lengths": list(lens),
                                          "max_abs_err": err, "max_abs_ref": scale,
                                          "rel_to_max": err / max(scale, 1e-12),
                                          "ok": ok, "ort_ms": round(ms, 3)})
                    if i == 2 and prov == providers[-1]:
                        np.savez(out / dtype / "inputs.npz", **feeds)
                        np.savez(out / dtype / "reference.npz", output=ref)
            rec["ok"] = bool(rec["parity"]) and all(p["ok"] for p in rec["parity"])
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc()
        results["ok"] &= rec["ok"]

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    for dtype, rec in results["exports"].items():
        if "error" in rec:
            print(f"{dtype:9s} FAILED: {rec['error'].splitlines()[0]}")
            continue
        worst = max(p["max_abs_err"] for p in rec["parity"])
        print(f"{dtype:9s} export {rec['export_s']:6.1f}s  opset {rec['opset']}  "
              f"{rec['custom_ops'][0]['count']} CoupledScan nodes  worst |ORT - torch| {worst:.2e}  "
              f"{'ok' if rec['ok'] else 'FAILED'}  -> {rec['files']['tensorrt']}")
    print(f"results: {out / 'results.json'}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
