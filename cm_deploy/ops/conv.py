"""The Mamba block's causal depthwise convolution and SiLU, for all modalities at once.

    out[b, m, t, e] = silu(bias[m, e] + sum_k weight[m, e, k] * x[b, m, t - (K - 1) + k, e])

x is (batch, M, L, E) - any strides with a contiguous last axis (the model hands it a modality-
major view) - and steps before t = 0 are `left` (batch, M, K - 1, E) when given (streaming: the
previous chunk's last steps), else zeros. This is nn.Conv1d(E, E, K, groups=E, padding=K - 1)
truncated to L, per modality, then SiLU. `causal_conv_silu` runs the fused Triton kernels
(triton_conv.py; one read of x, one write, forward and backward) or the reference below (K
shifted multiply-adds: what the exported graphs carry, and what the kernels are tested against).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_conv_silu", "causal_conv_silu_reference", "conv_tail"]


def causal_conv_silu_reference(x, weight, bias=None, left=None):
    """Reference: x (b, M, L, E), weight (M, E, K), bias (M, E) or None, left (b, M, K - 1, E) or
    None. Returns (out, new_left) where new_left = the last K - 1 steps of [left, x]."""
    K = weight.shape[-1]
    # (b, M, K - 1 + L, E). Every slice below has constant bounds (counted from the end where they
    # depend on L), so that the exported graph computes nothing from L's value.
    ext = torch.cat([_zero_steps(x, K - 1) if left is None else left.to(x.dtype), x], dim=2)
    # math in the wider of the two dtypes (float32 for bfloat16 activations and float32 weights)
    ct = torch.promote_types(x.dtype, weight.dtype)
    w = weight.to(ct)
    acc = None
    for k in range(K):
        window = ext[:, :, k:k - (K - 1)] if k < K - 1 else ext[:, :, K - 1:]     # steps k .. k + L - 1
        term = window.to(ct) * w[None, :, None, :, k]
        acc = term if acc is None else acc + term
    if bias is not None:
        acc = acc + bias.to(ct)[None, :, None, :]
    return F.silu(acc).to(x.dtype), _last(ext, K - 1)


def _zero_steps(x, n):
    """n zero steps shaped like x's (b, M, ., E). Exported as Shape -> Expand and a Concat (no shape
    arithmetic, and kernels every ONNX Runtime CUDA type has, unlike Pad's)."""
    return torch.cat([torch.zeros_like(x[:, :, :1])] * n, dim=2) if n > 0 else x[:, :, :0]


def _last(x, n):
    """The last n steps of x along axis 2 (none for n = 0), with constant slice bounds."""
    return x[:, :, -n:] if n > 0 else x[:, :, :0]


def conv_tail(left, x, K):
    """The last K - 1 steps of [left, x] along axis 2: the conv state after x (left None: zeros)."""
    if K == 1:
        return x[:, :, :0] if left is None else left
    # one expression for every length (exported graphs have a symbolic one): at most K - 1 steps
    # of x (a negative start clamps), after left (or zeros), then the last K - 1
    tail = x[:, :, -(K - 1):]
    head = _zero_steps(tail, K - 1) if left is None else left
    ext = torch.cat([head, tail.to(head.dtype)], dim=2)
    return _last(ext, K - 1)


def causal_conv_silu(x, weight, bias=None, left=None, *, impl="auto"):
    """Fused causal depthwise conv + SiLU: x (b, M, L, E), weight (M, E, K), bias (M, E), left
    (b, M, K - 1, E) or None (zeros). impl: "auto" (Triton where it can run, else the reference),
    "triton", or "reference". Differentiable in x, weight and bias (the Triton path with a left
    context is inference-only: it refuses tensors that require grad; "auto" then takes the
    reference)."""
    if x.dim() != 4 or weight.dim() != 3 or weight.shape[:2] != (x.shape[1], x.shape[3]):
        raise ValueError(f"causal_conv_silu: x (b, M, L, E) and weight (M, E, K) expected, got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if impl == "auto":
        from . import resolve_impl
        impl = resolve_impl(impl, x.device)
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, left))
        if left is not None and grad:
            impl = "reference"
    if impl == "triton" and x.shape[2] > 0:
        from .triton_conv import causal_conv_silu_triton
        return causal_conv_silu_triton(x, weight, bias, left)
    return causal_conv_silu_reference(x, weight, bias, left)[0]
