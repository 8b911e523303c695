"""Fused Triton kernels for the causal depthwise conv + SiLU of conv.py, forward and backward.

One program per [BLOCK_T, BLOCK_E] tile of one (batch, modality): the forward reads the K shifted
rows of x it needs (neighbouring tiles' rows come from cache), adds the bias, applies SiLU in
float32 and writes the tile once; x is taken by strides (a modality-major view, no copy). The
backward recomputes the pre-activation at t .. t + K - 1 from x (nothing saved but x), forms
g = dy * silu'(pre) there, and writes dx[t] = sum_j w[K - 1 - j] g[t + j]; the weight and bias
gradients are per-program partial sums (deterministic), added up on the host.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_scan import _dense_like, _interpreting, _pow2, _unit_last

__all__ = ["causal_conv_silu_triton"]


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, left_ptr, M, L, E,
                     sx0, sx1, sx2, sy0, sy1, sy2, sl0, sl1, sl2,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LEFT: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bm = tl.program_id(1)
    pid_e = tl.program_id(2)
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mt = offs_t < L
    me = offs_e < E
    xb = x_ptr + b * sx0 + m * sx1
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + m * E + offs_e, mask=me, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        tk = offs_t - (K - 1) + k
        wk = tl.load(w_ptr + (m * E + offs_e) * K + k, mask=me, other=0.0).to(tl.float32)
        xk = tl.load(xb + tk[:, None] * sx2 + offs_e[None, :],
                     mask=((tk >= 0) & mt)[:, None] & me[None, :], other=0.0).to(tl.float32)
        if HAS_LEFT:   # steps before 0: the previous chunk's last K - 1 steps
            lk = tl.load(left_ptr + b * sl0 + m * sl1 + (tk + (K - 1))[:, None] * sl2 + offs_e[None, :],
                         mask=((tk < 0) & mt)[:, None] & me[None, :], other=0.0).to(tl.float32)
            xk += lk
        acc += wk[None, :] * xk
    out = acc / (1.0 + tl.exp(-acc))
    yo = y_ptr + b * sy0 + m * sy1 + offs_t[:, None] * sy2 + offs_e[None, :]
    tl.store(yo, out.to(y_ptr.dtype.element_ty), mask=mt[:, None] & me[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, batch, M, L, E,
                     sx0, sx1, sx2, sd0, sd1, sd2, so0, so1, so2,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bm = tl.program_id(1)
    pid_e = tl.program_id(2)
    b = (pid_bm // M).to(tl.int64)
    m = (pid_bm % M).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mt = offs_t < L
    me = offs_e < E
    xb = x_ptr + b * sx0 + m * sx1
    if HAS_BIAS:
        bias = tl.load(b_ptr + m * E + offs_e, mask=me, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_E], dtype=tl.float32)
    dx = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    g0 = dx
    for j in tl.static_range(K):
        # g at t + j: the pre-activation recomputed from x
        tj = offs_t + j
        mj = tj < L
        pre = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32) + bias[None, :]
        for k in tl.static_range(K):
            tk = tj - (K - 1) + k
            wk = tl.load(w_ptr + (m * E + offs_e) * K + k, mask=me, other=0.0).to(tl.float32)
            xk = tl.load(xb + tk[:, None] * sx2 + offs_e[None, :],
                         mask=((tk >= 0) & mj)[:, None] & me[None, :], other=0.0).to(tl.float32)
            pre += wk[None, :] * xk
        dy = tl.load(dy_ptr + b * sd0 + m * sd1 + tj[:, None] * sd2 + offs_e[None, :],
                     mask=mj[:, None] & me[None, :], other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-pre))
        g = dy * (s * (1.0 + pre * (1.0 - s)))
        wj = tl.load(w_ptr + (m * E + offs_e) * K + (K - 1 - j), mask=me, other=0.0).to(tl.float32)
        dx += wj[None, :] * g
        if j == 0:
            g0 = g
    tl.store(dx_ptr + b * so0 + m * so1 + offs_t[:, None] * so2 + offs_e[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=mt[:, None] & me[None, :])
    # partial weight and bias gradients of this tile: row (pid_t * batch + b) of (n_t * batch, M, K, E)
    part = ((pid_t * batch + b) * M + m) * K
    for k in tl.static_range(K):
        tk = offs_t - (K - 1) + k
        xk = tl.load(xb + tk[:, None] * sx2 + offs_e[None, :],
                     mask=((tk >= 0) & mt)[:, None] & me[None, :], other=0.0).to(tl.float32)
        tl.store(dw_ptr + (part + k) * E + offs_e, tl.sum(g0 * xk, axis=0), mask=me)
    if HAS_BIAS:
        tl.store(db_ptr + ((pid_t * batch + b) * M + m) * E + offs_e, tl.sum(g0, axis=0), mask=me)


def _blocks(L, E):
    if _interpreting():      # the interpreter's cost is per program: few large tiles
        return min(_pow2(L), 64), min(_pow2(E), 128), 4
    return min(_pow2(L), 32), min(_pow2(E), 128), 4


def _conv_forward(x, weight, bias, left):
    batch, M, L, E = x.shape
    K = weight.shape[-1]
    y = _dense_like(x)
    BT, BE, nw = _blocks(L, E)
    grid = (triton.cdiv(L, BT), batch * M, triton.cdiv(E, BE))
    lt = left if left is not None else x
    _conv_fwd_kernel[grid](x, weight, bias if bias is not None else weight, y, lt, M, L, E,
                           *x.stride()[:3], *y.stride()[:3], *lt.stride()[:3], K=K,
                           HAS_BIAS=bias is not None, HAS_LEFT=left is not None,
                           BLOCK_T=BT, BLOCK_E=BE, num_warps=nw)
    return y


def _conv_backward(x, weight, bias, dy):
    batch, M, L, E = x.shape
    K = weight.shape[-1]
    dy = _unit_last(dy)
    dx = _dense_like(x)
    BT, BE, nw = _blocks(L, E)
    n_t = triton.cdiv(L, BT)
    dw = torch.empty(n_t * batch, M, K, E, device=x.device, dtype=torch.float32)
    db = torch.empty(n_t * batch, M, E, device=x.device, dtype=torch.float32) if bias is not None else dw
    _conv_bwd_kernel[(n_t, batch * M, triton.cdiv(E, BE))](
        x, weight, bias if bias is not None else weight, dy, dx, dw, db, batch, M, L, E,
        *x.stride()[:3], *dy.stride()[:3], *dx.stride()[:3], K=K, HAS_BIAS=bias is not None,
        BLOCK_T=BT, BLOCK_E=BE, num_warps=nw)
    dweight = dw.sum(0).transpose(1, 2).contiguous().to(weight.dtype)
    dbias = db.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


class _ConvFn(torch.autograd.Function):
    """Eager autograd (no dispatcher overhead; torch.compile takes the custom ops below)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight, bias)
        return _conv_forward(x, weight, bias, None)

    @staticmethod
    def backward(ctx, dy):
        return _conv_backward(*ctx.saved_tensors, dy)


# torch.compile: the kernels as opaque custom ops with fake functions and an autograd formula
# (one graph, no recompilation of the kernels by Inductor); see triton_scan.py.
_Opt = Optional[torch.Tensor]


@torch.library.custom_op("cm_deploy::causal_conv_silu_fwd", mutates_args=())
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: _Opt, left: _Opt) -> torch.Tensor:
    return _conv_forward(x, weight, bias, left)


@_conv_fwd_op.register_fake
def _(x, weight, bias, left):
    return _dense_like(x)


@torch.library.custom_op("cm_deploy::causal_conv_silu_bwd", mutates_args=())
def _conv_bwd_op(x: torch.Tensor, weight: torch.Tensor, bias: _Opt,
                 dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _conv_backward(x, weight, bias, dy)
    return dx, dw, db if db is not None else dw.new_empty(0)


@_conv_bwd_op.register_fake
def _(x, weight, bias, dy):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    return _dense_like(x), weight.new_empty(weight.shape), db


def _conv_setup(ctx, inputs, output):
    x, weight, bias, left = inputs
    ctx.save_for_backward(x, weight, bias)


def _conv_grad(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.cm_deploy.causal_conv_silu_bwd(x, weight, bias, dy)
    return dx, dw, db if bias is not None else None, None


torch.library.register_autograd("cm_deploy::causal_conv_silu_fwd", _conv_grad, setup_context=_conv_setup)


def causal_conv_silu_triton(x, weight, bias=None, left=None):
    """See conv.causal_conv_silu: x (b, M, L, E) any strides, last axis contiguous; left (b, M,
    K - 1, E) the steps before x (inference only: no gradient flows through this path)."""
    x = _unit_last(x)
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, left))
    if left is not None:
        if grad:
            raise RuntimeError("causal_conv_silu_triton: left context is an inference path (no backward)")
        left = _unit_last(left.to(x.dtype))
    if torch.compiler.is_compiling():
        return torch.ops.cm_deploy.causal_conv_silu_fwd(x, weight, bias, left)
    if grad:
        return _ConvFn.apply(x, weight, bias)
    return _conv_forward(x, weight, bias, left)
