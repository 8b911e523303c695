"""ONNX export (docs/design.md). The names and files of the contract live in cm_deploy.contract.

`export_checkpoint(ckpt, out_dir, dtype=..., opset=..., batch=..., lengths=..., streaming=...)`
writes, all or nothing:

    DIR/model.onnx           for TensorRT: one cm_deploy::CoupledScan node per layer (per modality
                             and layer for the coupled=False ablation), no function body, so that
                             TensorRT's parser takes the CoupledScan plugin (name "CoupledScan",
                             version "1"; attributes delta_softplus, coupling_scale and
                             has_final_state = 0, all written explicitly)
    DIR/model.portable.onnx  the same graph plus CoupledScan as a model-local ONNX function of
                             standard ops (a Scan over time): stock ONNX Runtime, no custom library
    DIR/manifest.json        format "cm-deploy-manifest/1": I/O names, shapes, dtypes, dynamic axes
    DIR/model.stream*.onnx   with streaming=True: one chunk per call, state in and out (docs/streaming.md)

Inputs are named after the modalities, (batch, L_m, F_m), then one <name>_lengths (int64, (batch,))
per modality (docs/lengths.md); the output "output", (batch, num_outputs); batch and every L_m are
dynamic unless fixed. I/O and activations are in `dtype`; A, D and
delta_bias stay float32, and the portable scan computes in float32 whatever the dtype.

Models trained elsewhere (modules.py, docs/bring_your_own_model.md): `export_module(model,
example_inputs, out_dir, ...)` exports any torch module built from Mamba-1 mixers (mamba-ssm's
`Mamba`), every selective scan a CoupledScan node (M = 1, coupling_scale 1); `export_official`
the official Coupled Mamba code's MutiMamba state_dicts (`cm-deploy export --arch
coupled-mamba-official`).

What runs where (checked here with ONNX Runtime 1.30 and 1.32, CPU provider):
    float32   model.portable.onnx runs on ORT CPU (and any ORT); model.onnx needs the plugin
              (TensorRT) or the op library (ONNX Runtime).
    float16   model.portable.onnx runs on ORT CPU too (its fp16 kernels cover this graph).
    bfloat16  opset 22 or newer (Conv has no bfloat16 before); ORT CPU has no bfloat16 MatMul, so
              the portable file is for GPU providers or TensorRT; model.onnx needs the plugin.
"""
from .exporter import DEFAULT_OPSET, DTYPES, build_onnx, export_checkpoint
from .modules import export_module, export_official
from .portable import coupled_scan_function, make_portable

__all__ = ["export_checkpoint", "export_module", "export_official", "build_onnx", "make_portable",
           "coupled_scan_function", "DTYPES", "DEFAULT_OPSET"]
