"""CoupledScan: the coupled selective state-space scan of Coupled Mamba (DESIGN.md sections 2-3).

`coupled_scan` is the one entry point. It validates the tensor contract, then runs either the
pure-PyTorch reference (`reference.py`) or the fused Triton kernels (`triton_scan.py`, forward and
backward).
"""
from __future__ import annotations

import os

import torch

from .reference import coupled_scan_reference, rank_delta

__all__ = ["coupled_scan", "coupled_scan_reference", "resolve_impl", "triton_available"]

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLS = ("auto", "reference", "triton", "onnx")


def triton_available(device: torch.device | None = None) -> bool:
    """True when the Triton kernels can run on `device`: a CUDA device with Triton installed, or
    any device under TRITON_INTERPRET=1 (how CI tests the kernels on the CPU)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device is not None and device.type == "cuda"


def resolve_impl(impl: str, device: torch.device) -> str:
    """impl "auto" -> "triton" on a CUDA device where Triton runs, else "reference"; any other impl
    as it is. The one rule for the scan, the conv and the model's inference path."""
    if impl == "auto":
        return "triton" if (device.type == "cuda" and triton_available(device)) else "reference"
    return impl


def _check(name, t, shape, dtypes, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"coupled_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"coupled_scan: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"coupled_scan: {name} has dtype {t.dtype}, expected one of "
                        f"{', '.join(str(d) for d in dtypes)}")
    if t.device != device:
        raise ValueError(f"coupled_scan: {name} is on {t.device}, u is on {device}")


def validate(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_rank=None):
    """Raise a clear error when the arguments break the tensor contract of DESIGN.md section 3
    (delta_rank: delta given in rank-R form, (batch, M, L, R), see coupled_scan's _delta_proj)."""
    if not isinstance(u, torch.Tensor) or u.dim() != 4:
        raise ValueError("coupled_scan: u must be a 4-D tensor (batch, M, L, E), got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    if u.dtype not in _ACT_DTYPES:
        raise TypeError(f"coupled_scan: u has dtype {u.dtype}; activations must be float32, "
                        "float16 or bfloat16")
    batch, M, L, E = u.shape
    if not isinstance(A, torch.Tensor) or A.dim() != 3:
        raise ValueError("coupled_scan: A must be a 3-D tensor (M, E, N)")
    N = A.shape[2]
    if M < 1 or E < 1 or N < 1:
        raise ValueError(f"coupled_scan: M, E and N must be positive, got M={M}, E={E}, N={N}")
    act, f32, dev = (u.dtype,), (torch.float32,), u.device
    _check("delta", delta, (batch, M, L, E if delta_rank is None else delta_rank), act, dev)
    _check("A", A, (M, E, N), f32, dev)
    _check("B", B, (batch, M, L, N), act, dev)
    _check("C", C, (batch, M, L, N), act, dev)
    if D is not None:
        _check("D", D, (M, E), f32, dev)
    if z is not None:
        _check("z", z, (batch, M, L, E), act, dev)
    if delta_bias is not None:
        _check("delta_bias", delta_bias, (M, E), f32, dev)
    if initial_state is not None:
        _check("initial_state", initial_state, (batch, E, N), f32, dev)


def coupled_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=False,
                 coupling_scale=None, initial_state=None, return_final_state=False, impl="auto",
                 _gate_in_place=False, _delta_proj=None):
    """y = CoupledScan(u, delta, A, B, C, D, z, delta_bias); see DESIGN.md sections 2-3.

    coupling_scale None means 1/M (mean coupling); 1.0 is the paper's Eq. (6).
    impl: "reference" (pure PyTorch), "triton" (fused kernels, forward and backward), "auto"
    (Triton where it can run, else the reference), or "onnx" (for export: emits the custom ONNX
    node inside torch.onnx.export, runs the reference otherwise). Returns y, or (y, final_state).
    """
    if impl not in IMPLS:
        raise ValueError(f"coupled_scan: impl must be one of {IMPLS}, got {impl!r}")
    # _delta_proj (internal, the model's inference path): delta in Mamba's rank-R form (batch, M,
    # L, R) and the dt projection (M, R, E); the Triton kernel forms delta itself, others here
    rank = None
    if _delta_proj is not None:
        rank = _delta_proj.shape[1]
        if tuple(_delta_proj.shape) != (u.shape[1], rank, u.shape[3]):
            raise ValueError(f"coupled_scan: _delta_proj must be (M, R, E), got {tuple(_delta_proj.shape)}")
    validate(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_rank=rank)
    if coupling_scale is not None:
        coupling_scale = float(coupling_scale)
    kwargs = dict(delta_softplus=bool(delta_softplus), coupling_scale=coupling_scale,
                  initial_state=initial_state, return_final_state=return_final_state)
    impl = resolve_impl(impl, u.device)
    if _delta_proj is not None and impl != "triton":
        delta = rank_delta(delta, _delta_proj)
        _delta_proj = None
    if impl == "onnx":   # one cm_deploy::CoupledScan node under torch.onnx.export, else the reference
        from .onnx_node import coupled_scan_onnx
        return coupled_scan_onnx(u, delta, A, B, C, D, z, delta_bias, **kwargs)
    if impl == "triton":
        if not triton_available(u.device):
            raise RuntimeError("coupled_scan: impl='triton' needs Triton and a CUDA tensor "
                               "(or TRITON_INTERPRET=1 for the CPU interpreter)")
        from .triton_scan import coupled_scan_triton
        # _gate_in_place (internal, the model's inference path): y may be written over z
        return coupled_scan_triton(u, delta, A, B, C, D, z, delta_bias, **kwargs,
                                   gate_in_place=_gate_in_place, delta_proj=_delta_proj)
    return coupled_scan_reference(u, delta, A, B, C, D, z, delta_bias, **kwargs)
