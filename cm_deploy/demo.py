"""The demo: train a small Coupled Mamba on synthetic multimodal data, export it, check parity.

    python -m cm_deploy.demo [--out demo_out] [--steps 240] [--quiet]

The data set is built so that the label depends on how the modalities interact over time and on
nothing else: three sensors observe three latent signals. In class 1 the signals are coupled (the
second follows the first with a lag, the third follows the second); in class 0 each is an
independent draw of the same random process. Every modality's marginal statistics are identical in
both classes, so a model whose per-modality chains never meet sees (almost) nothing; the coupled
state of Coupled Mamba lets the chains read each other. The demo trains both and reports both.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import CoupledMamba, CoupledMambaConfig, save_checkpoint
from .contract import FILES
from .progress import Progress, silent

MODALITIES = {"text": 16, "audio": 8, "vision": 6}


def _smooth_noise(g, n, L, width=4):
    """Low-pass filtered Gaussian noise, unit variance per sequence: the latent process."""
    x = torch.randn(n, 1, L + 4 * width, generator=g)
    k = torch.exp(-0.5 * (torch.arange(-2 * width, 2 * width + 1) / width) ** 2)
    x = F.conv1d(x, (k / k.norm()).view(1, 1, -1))[:, 0, :L]
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)


def make_dataset(n, L=64, lag=5, seed=0):
    """(inputs dict, labels) of `n` samples; see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    s1 = _smooth_noise(g, n, L + 2 * lag)
    own2, own3 = _smooth_noise(g, n, L + 2 * lag), _smooth_noise(g, n, L + 2 * lag)
    # coupled: s2(t) = mix of s1(t - lag) and its own process, s3(t) follows s2(t - lag); scaled to
    # unit variance so that no single modality tells the classes apart.
    mix = 0.8
    s2c = (mix * torch.roll(s1, lag, 1) + math.sqrt(1 - mix ** 2) * own2)
    s3c = (mix * torch.roll(s2c, lag, 1) + math.sqrt(1 - mix ** 2) * own3)
    c = y.bool()[:, None]
    s2 = torch.where(c, s2c, own2)[:, 2 * lag:]
    s3 = torch.where(c, s3c, own3)[:, 2 * lag:]
    s1 = s1[:, 2 * lag:]
    inputs = {}
    gw = torch.Generator().manual_seed(1234)      # the sensors are the same in every split
    for (name, feat), s in zip(MODALITIES.items(), (s1, s2, s3)):
        w = torch.randn(feat, generator=gw) / math.sqrt(feat)    # each sensor: a random projection
        inputs[name] = s[..., None] * w + 0.3 * torch.randn(n, L, feat, generator=g)
    return inputs, y


def train(config, data, steps, seed=0, progress=silent, tag=""):
    """`steps` AdamW steps of batch 64 (equal steps for every model compared: equal time would give
    the slower one fewer under load). Returns (model, validation accuracy, steps, seconds)."""
    torch.manual_seed(seed)
    model = CoupledMamba(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    (xtr, ytr), (xva, yva) = data
    n, bs, step, t0 = ytr.shape[0], 64, 0, time.time()
    while step < steps:
        idx = torch.randint(0, n, (bs,))
        loss = F.cross_entropy(model({k: v[idx] for k, v in xtr.items()}), ytr[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            progress(f"{tag} step {step}/{steps}, loss {loss.item():.3f}")
    model.eval()
    with torch.no_grad():
        acc = (model(xva).argmax(-1) == yva).float().mean().item()
    return model, acc, step, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo_out", help="output folder (ckpt.pt, export/, parity.json)")
    p.add_argument("--steps", type=int, default=240, help="training steps of the coupled model")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="training steps of the independent-chains baseline (default: the same; 0 skips it)")
    p.add_argument("--no-export", action="store_true", help="stop after training")
    p.add_argument("--quiet", action="store_true", help="no progress lines (stderr, terminal only)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = (make_dataset(4096, seed=1), make_dataset(1024, seed=2))
    cfg = CoupledMambaConfig(modalities=dict(MODALITIES), d_model=32, n_layers=2, d_state=8,
                             num_outputs=2, task="classification")
    if a.steps < 1 or (a.baseline_steps is not None and a.baseline_steps < 0):
        p.error("--steps must be positive and --baseline-steps >= 0")
    progress = Progress(a.quiet, prefix="demo")
    print(f"[1/3] training Coupled Mamba for {a.steps} steps on the CPU "
          f"(3 modalities, L=64, d_model 32, 2 layers, N 8)")
    model, acc, steps, secs = train(cfg, data, a.steps, progress=progress, tag="coupled")
    base_steps = a.steps if a.baseline_steps is None else a.baseline_steps
    results = {"coupled": {"val_accuracy": acc, "steps": steps, "seconds": secs}}
    if base_steps > 0:
        print(f"      and the same model with independent per-modality chains for {base_steps} steps")
        bcfg = CoupledMambaConfig(**{**cfg.to_dict(), "coupled": False})
        _, bacc, bsteps, bsecs = train(bcfg, data, base_steps, progress=progress, tag="independent")
        results["independent"] = {"val_accuracy": bacc, "steps": bsteps, "seconds": bsecs}
    print(f"      validation accuracy: coupled {acc:.3f}"
          + (f", independent chains {results['independent']['val_accuracy']:.3f}" if base_steps > 0 else "")
          + f" (chance 0.5); {secs:.0f} s for the coupled model")
    ckpt = save_checkpoint(model, out / "ckpt.pt", meta={"demo": results})
    print(f"      wrote {ckpt}")
    (out / "train.json").write_text(json.dumps(results, indent=2))
    if a.no_export:
        return 0

    from .errors import CmDeployError
    try:
        from .export import export_checkpoint
        from .runtime import load
        from .runtime.parity import default_shapes, format_report, run_parity
        from .runtime.torch_backend import TorchBackend
    except ImportError as e:  # export/runtime extras not installed
        print(f"[2/3] skipped export and parity: {e}")
        return 0
    try:
        print("[2/3] exporting to ONNX (TensorRT graph + portable graph)")
        manifest = export_checkpoint(ckpt, out / "export", progress=progress)
        print(f"      wrote {out / 'export'}: model.onnx ({manifest['custom_ops'][0]['count']} CoupledScan "
              "nodes), model.portable.onnx, manifest.json")
        print("[3/3] parity: portable ONNX in ONNX Runtime (its own Scan; the op library is not registered for it) "
              "vs the PyTorch reference")
        with load(out / "export" / FILES["portable"]) as onnx_model, \
                TorchBackend(ckpt, device="cpu", dtype="float32", scan_impl="reference") as ref:
            report = run_parity(ref, onnx_model, default_shapes([onnx_model]))
            print(format_report(report))
            # model.onnx too, where the CoupledScan op library is built (scripts/build_plugin.sh)
            from .runtime.native import find_library
            if find_library("ort", required=False) is not None:
                print("      and model.onnx in ONNX Runtime with the CoupledScan op library")
                with load(out / "export" / FILES["tensorrt"]) as op_model:
                    op_report = run_parity(ref, op_model, default_shapes([op_model]))
                print(format_report(op_report))
                report = dict(report, ok=report["ok"] and op_report["ok"], model_onnx=op_report)
    except CmDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "parity.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"      parity {'PASSED' if report['ok'] else 'FAILED'} (tolerance atol {report['atol']:g}, "
          f"rtol {report['rtol']:g}); next: cm-deploy build {out / 'export' / 'model.onnx'} on a TensorRT machine")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
