"""The fused causal depthwise conv + SiLU (cm_deploy.ops.conv): the reference against nn.Conv1d per
modality, the Triton kernels (TRITON_INTERPRET=1 on the CPU) against the reference, forward and
every gradient, on several shapes, layouts and dtypes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cm_deploy.ops.conv import causal_conv_silu, causal_conv_silu_reference
from test_ops import DEV, TOL, assert_close, needs_triton


def _inputs(b, M, L, E, K, dtype, seed=0, bias=True, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, M, L, E, generator=g)
    if layout == "mmajor":      # what the model hands the kernel: a (M, b, L, E) tensor's view
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "slice":     # half of a wider projection's rows
        x = torch.cat([x, torch.randn(b, M, L, E, generator=g)], dim=-1)[..., :E]
    w = torch.randn(M, E, K, generator=g) * 0.5
    bb = torch.randn(M, E, generator=g) * 0.5 if bias else None
    return x.to(dtype).to(DEV), w.to(DEV), (bb.to(DEV) if bb is not None else None)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_reference_is_conv1d_per_modality(K):
    x, w, b = _inputs(2, 3, 9, 5, K, torch.float64)
    w, b = w.double(), b.double()
    out, left = causal_conv_silu_reference(x, w, b)
    for m in range(3):
        want = F.silu(F.conv1d(x[:, m].transpose(1, 2), w[m][:, None, :], b[m], padding=K - 1,
                               groups=5)[..., :9]).transpose(1, 2)
        torch.testing.assert_close(out[:, m], want)
    torch.testing.assert_close(left, x[:, :, 9 - (K - 1):])


def test_reference_chunks_equal_one_run():
    x, w, b = _inputs(2, 3, 11, 4, 4, torch.float32)
    whole, _ = causal_conv_silu_reference(x, w, b)
    left, parts = None, []
    for lo, hi in ((0, 1), (1, 5), (5, 11)):
        y, left = causal_conv_silu_reference(x[:, :, lo:hi], w, b, left)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-6, atol=1e-6)


CASES = [
    # b, M, L, E, K, dtype, bias, layout
    (2, 3, 13, 20, 4, torch.float32, True, "contiguous"),
    (1, 1, 1, 7, 4, torch.float32, True, "contiguous"),
    (2, 2, 3, 5, 4, torch.float32, False, "mmajor"),
    (3, 3, 70, 40, 4, torch.float32, True, "mmajor"),
    (2, 3, 17, 24, 2, torch.bfloat16, True, "slice"),
    (2, 3, 9, 33, 3, torch.float16, True, "mmajor"),
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-K{c[4]}-{str(c[5])[6:]}-{c[7]}"
                                             for c in CASES])
def test_triton_matches_reference(case):
    b, M, L, E, K, dtype, bias, layout = case
    x, w, bb = _inputs(b, M, L, E, K, dtype, seed=L, bias=bias, layout=layout)
    wy = torch.randn(b, M, L, E, generator=torch.Generator().manual_seed(1)).to(DEV)
    res = {}
    for impl in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, bb)]
        if impl == "triton":   # keep the layout of the input (clone preserves strides of dense views)
            leaves[0] = x.detach().requires_grad_()
        y = causal_conv_silu(*leaves, impl=impl)
        grads = torch.autograd.grad((y.float() * wy).sum(), [t for t in leaves if t is not None])
        res[impl] = (y.detach(), grads)
        if impl == "triton":
            x.grad = None
    (y_r, g_r), (y_t, g_t) = res["reference"], res["triton"]
    tol = TOL[dtype]
    assert y_t.dtype == dtype
    assert_close(y_t, y_r, tol, "y")
    for name, gt, gr in zip(("dx", "dweight", "dbias"), g_t, g_r):
        # the reference accumulates low-precision gradients in low precision; compare at float32
        assert_close(gt.float(), gr.float(), max(tol, 1e-5) * (4 if dtype != torch.float32 else 1), name)


@needs_triton
def test_triton_y_follows_input_layout():
    x, w, b = _inputs(2, 3, 6, 8, 4, torch.float32, layout="mmajor")
    y = causal_conv_silu(x, w, b, impl="triton")
    assert y.stride() == x.stride()


def test_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        causal_conv_silu(torch.zeros(1, 2, 3, 4), torch.zeros(3, 4, 4))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_left_context_chunks_equal_one_run(dtype):
    """Streaming/chunked inference: the kernel takes the previous chunk's last K - 1 steps."""
    from cm_deploy.ops.conv import conv_tail
    x, w, b = _inputs(2, 3, 11, 12, 4, dtype, layout="mmajor")
    with torch.no_grad():
        whole = causal_conv_silu(x, w, b, impl="reference")
        left, parts = None, []
        for lo, hi in ((0, 1), (1, 3), (3, 9), (9, 11)):      # chunks shorter than K - 1 too
            xc = x[:, :, lo:hi]
            parts.append(causal_conv_silu(xc, w, b, left, impl="triton"))
            left = conv_tail(left, xc, 4)
    assert_close(torch.cat(parts, dim=2), whole, TOL[dtype], "chunks")


@needs_triton
def test_triton_left_context_refuses_grad():
    x, w, b = _inputs(1, 2, 4, 5, 3, torch.float32)
    with pytest.raises(RuntimeError, match="inference"):
        causal_conv_silu(x.requires_grad_(), w, b, torch.zeros(1, 2, 2, 5), impl="triton")


@needs_triton
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("left", [True, False])
def test_custom_ops_opcheck(bias, left):
    """What torch.compile sees (cm_deploy::causal_conv_silu_fwd / _bwd): schema, fake functions,
    autograd registration, AOT dispatch (torch.library.opcheck, real kernels against each)."""
    x, w, b = _inputs(2, 3, 7, 12, 4, torch.float32, seed=3, bias=bias, layout="mmajor")
    lt = torch.randn(2, 3, 3, 12).to(DEV) if left else None
    import cm_deploy.ops.triton_conv  # noqa: F401  (registers the custom ops)
    fwd, bwd = torch.ops.cm_deploy.causal_conv_silu_fwd.default, torch.ops.cm_deploy.causal_conv_silu_bwd.default
    torch.library.opcheck(fwd, (x, w, b, lt))
    if not left:    # the left context is inference-only
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
        torch.library.opcheck(fwd, (*leaves, None))
    torch.library.opcheck(bwd, (x, w, b, torch.randn_like(x)))
