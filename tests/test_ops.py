"""CoupledScan: the reference against the math, the Triton kernels against the reference.

The Triton kernels run under TRITON_INTERPRET=1 on the CPU (see conftest.py); the interpreter's cost
is per program, per time step and per op, not per element, so the shapes here are small and mostly
one program per batch item (a few cases force several E-blocks or time segments on purpose).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from cm_deploy.ops import coupled_scan, coupled_scan_reference, triton_available

if os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    DEVICE = None  # compiled Triton without a GPU: the Triton tests skip

needs_triton = pytest.mark.skipif(DEVICE is None or not triton_available(DEVICE),
                                  reason="Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU")
DEV = DEVICE if DEVICE is not None else torch.device("cpu")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
# elementwise |err| <= TOL * |ref| + TOL * max |ref| (torch.testing rtol, and atol scaled)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def tuning(**kw):
    from cm_deploy.ops.triton_scan import tuning as _tuning
    return _tuning(**kw)


# ---------------------------------------------------------------------------------------------
# inputs and independent implementations of the math
# ---------------------------------------------------------------------------------------------


def make_inputs(b, M, L, E, N, *, dtype=torch.float32, D=True, z=True, bias=True, softplus=True,
                init=False, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g)

    if softplus:   # dt = softplus(delta + bias) ~ 0.1 .. 0.7, as in a trained Mamba
        delta = r(b, M, L, E) * 0.5 - 1.0
    else:          # dt = delta + bias must stay positive
        delta = torch.rand(b, M, L, E, generator=g) * 0.5 + 0.05
    t = dict(
        u=r(b, M, L, E).to(dtype),
        delta=delta.to(dtype),
        A=-(0.5 + 1.5 * torch.rand(M, E, N, generator=g)),
        B=r(b, M, L, N).to(dtype),
        C=r(b, M, L, N).to(dtype),
        D=r(M, E) if D else None,
        z=r(b, M, L, E).to(dtype) if z else None,
        delta_bias=(r(M, E) * 0.3 if softplus else torch.rand(M, E, generator=g) * 0.1)
        if bias else None,
        initial_state=r(b, E, N) * 0.5 if init else None,
    )
    return {k: (v.to(device) if v is not None else None) for k, v in t.items()}


def softplus64(x):
    # torch.nn.functional.softplus, beta 1, threshold 20, written out
    return torch.where(x > 20, x, torch.log1p(torch.exp(x)))


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=False,
               coupling_scale=None, initial_state=None):
    """DESIGN.md section 2 line by line, float64, Python loops over batch, time and modality."""
    d = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias, c0 = map(d, (u, delta, A, B, C, D, z, delta_bias,
                                                      initial_state))
    batch, M, L, E = u.shape
    N = A.shape[2]
    kappa = 1.0 / M if coupling_scale is None else coupling_scale
    y = torch.zeros(batch, M, L, E, dtype=torch.float64)
    final = torch.zeros(batch, E, N, dtype=torch.float64)
    for b in range(batch):
        c = c0[b].clone() if c0 is not None else torch.zeros(E, N, dtype=torch.float64)
        for t in range(L):
            hs = []
            for m in range(M):
                x = delta[b, m, t] + (delta_bias[m] if delta_bias is not None else 0.0)
                dt = softplus64(x) if delta_softplus else x                       # (E,)
                h = (torch.exp(dt[:, None] * A[m]) * c
                     + dt[:, None] * B[b, m, t][None, :] * u[b, m, t][:, None])  # (E, N)
                yv = (C[b, m, t][None, :] * h).sum(1)
                if D is not None:
                    yv = yv + D[m] * u[b, m, t]
                if z is not None:
                    yv = yv * z[b, m, t] * torch.sigmoid(z[b, m, t])
                y[b, m, t] = yv
                hs.append(h)
            c = kappa * sum(hs)
        final[b] = c
    return y, final


def mamba_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba's selective scan as the Mamba paper states it (one chain, no coupling):
    x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t,  y_t = C_t x_t + D u_t,  y *= silu(z),
    dt = softplus(delta + delta_bias). u, delta, z: (b, L, E); A: (E, N); B, C: (b, L, N)."""
    dt = delta.double()
    if delta_bias is not None:
        dt = dt + delta_bias.double()
    if delta_softplus:
        dt = F.softplus(dt)
    A, B, C, u = A.double(), B.double(), C.double(), u.double()
    b, L, E = u.shape
    x = torch.zeros(b, E, A.shape[1], dtype=torch.float64, device=u.device)
    ys = []
    for t in range(L):
        dt_t = dt[:, t, :, None]
        x = torch.exp(dt_t * A) * x + dt_t * B[:, t, None, :] * u[:, t, :, None]
        ys.append((x * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + D.double() * u
    if z is not None:
        y = y * F.silu(z.double())
    return y


def run_scan(impl, inp, *, softplus, kappa, return_final, grad_names=(), wy=None, wf=None,
             **scan_kw):
    """Forward (and, when grad_names, backward of sum(wy*y) + sum(wf*final)) of one impl."""
    leaves = {k: (v.detach().clone().requires_grad_(k in grad_names) if v is not None else None)
              for k, v in inp.items()}
    out = coupled_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                       leaves["D"], leaves["z"], leaves["delta_bias"], delta_softplus=softplus,
                       coupling_scale=kappa, initial_state=leaves["initial_state"],
                       return_final_state=return_final, impl=impl, **scan_kw)
    y, final = out if return_final else (out, None)
    grads = {}
    if grad_names:
        loss = (y.float() * wy).sum()
        if final is not None and wf is not None:
            loss = loss + (final * wf).sum()
        gs = torch.autograd.grad(loss, [leaves[k] for k in grad_names])
        grads = dict(zip(grad_names, gs))
    return y.detach(), (final.detach() if final is not None else None), grads


def assert_close(actual, expected, tol, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    a, e = actual.double(), expected.double()
    scale = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# the reference against the math
# ---------------------------------------------------------------------------------------------

REF_CASES = [
    # b, M, L, E, N, D, z, bias, softplus, init, kappa
    (2, 3, 7, 5, 3, True, True, True, True, True, None),
    (1, 1, 5, 4, 6, False, False, False, False, False, 1.0),
    (2, 2, 1, 3, 2, True, False, True, False, True, 0.7),
    (1, 4, 6, 2, 5, False, True, False, True, False, None),
]


@pytest.mark.parametrize("case", REF_CASES)
def test_reference_matches_naive_float64(case):
    b, M, L, E, N, D, z, bias, sp, init, kappa = case
    inp = make_inputs(b, M, L, E, N, D=D, z=z, bias=bias, softplus=sp, init=init, device="cpu")
    # the reference in float64 arithmetic (it upcasts to float32 only via .float(): feed it float32
    # inputs and compare at float32 round-off)
    y, final = coupled_scan_reference(*[inp[k] for k in NAMES[:8]], delta_softplus=sp,
                                      coupling_scale=kappa, initial_state=inp["initial_state"],
                                      return_final_state=True)
    y64, f64 = naive_scan(*[inp[k] for k in NAMES[:8]], delta_softplus=sp, coupling_scale=kappa,
                          initial_state=inp["initial_state"])
    assert_close(y.double(), y64, 2e-6, "y")
    assert_close(final.double(), f64, 2e-6, "final_state")


def test_naive_is_not_trivially_equal():
    # guard against the comparison above passing vacuously: the coupling changes the output
    inp = make_inputs(1, 2, 6, 3, 4, device="cpu")
    y1, _ = naive_scan(*[inp[k] for k in NAMES[:8]], delta_softplus=True, coupling_scale=0.5)
    y2, _ = naive_scan(*[inp[k] for k in NAMES[:8]], delta_softplus=True, coupling_scale=0.25)
    assert (y1 - y2).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# M = 1, kappa = 1 is Mamba's selective scan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
def test_m1_kappa1_is_mamba_selective_scan(impl):
    inp = make_inputs(2, 1, 9, 6, 5, init=False)
    y, final, _ = run_scan(impl, inp, softplus=True, kappa=1.0, return_final=True)
    sq = lambda t: t[:, 0] if t is not None else None  # noqa: E731  (b, 1, L, .) -> (b, L, .)
    y_mamba = mamba_selective_scan(sq(inp["u"]), sq(inp["delta"]), inp["A"][0], sq(inp["B"]),
                                   sq(inp["C"]), inp["D"][0], sq(inp["z"]), inp["delta_bias"][0],
                                   delta_softplus=True)
    assert_close(y[:, 0].double(), y_mamba, 1e-5, "y vs Mamba")


@needs_triton
def test_m1_kappa1_gradients_match_mamba():
    inp = make_inputs(1, 1, 6, 5, 3)
    wy = torch.randn(1, 1, 6, 5, generator=torch.Generator().manual_seed(3)).to(DEV)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    _, _, g = run_scan("triton", inp, softplus=True, kappa=1.0, return_final=False,
                       grad_names=names, wy=wy)
    leaves = {k: inp[k].detach().double().requires_grad_() for k in names}
    sq = lambda t: t[:, 0]  # noqa: E731
    y = mamba_selective_scan(sq(leaves["u"]), sq(leaves["delta"]), leaves["A"][0],
                             sq(leaves["B"]), sq(leaves["C"]), leaves["D"][0], sq(leaves["z"]),
                             leaves["delta_bias"][0], delta_softplus=True)
    gm = torch.autograd.grad((y * wy[:, 0].double()).sum(), [leaves[k] for k in names])
    for k, gk in zip(names, gm):
        assert_close(g[k].double(), gk, 2e-5, f"d{k} vs Mamba")


# ---------------------------------------------------------------------------------------------
# Triton against the reference: forward and every gradient
# ---------------------------------------------------------------------------------------------

TRITON_CASES = [
    # id, (b, M, L, E, N), dtype, options, tuning
    ("f32-all-2eblk-det", (2, 2, 17, 33, 17), torch.float32,
     dict(init=True, kappa=None, ret=True), dict(deterministic=True)),
    ("f32-L129-M1-bare", (1, 1, 129, 5, 3), torch.float32,
     dict(D=False, z=False, bias=False, init=False, kappa=None, ret=False), {}),
    ("f32-M4-L2-k1-nosp", (1, 4, 2, 24, 16), torch.float32,
     dict(softplus=False, init=True, kappa=1.0, ret=True), {}),
    ("f32-M3-L1", (2, 3, 1, 5, 17), torch.float32,
     dict(z=False, init=True, kappa=0.5, ret=True), {}),
    ("f32-M5-regfallback", (1, 5, 3, 5, 3), torch.float32,
     dict(init=True, kappa=None, ret=True), {}),
    ("f32-segments", (1, 3, 23, 20, 16), torch.float32,
     dict(init=True, kappa=None, ret=True), dict(n_seg=3, bwd_n_seg=3, chunk=4)),
    ("f16-all", (2, 3, 17, 24, 16), torch.float16,
     dict(init=True, kappa=None, ret=True), {}),
    ("bf16-5eblk-atomics", (1, 2, 17, 33, 3), torch.bfloat16,
     dict(D=False, init=False, kappa=None, ret=False), dict(block_e=8, bwd_block_e=8)),
    ("bf16-M1-L2-nobias", (2, 1, 2, 24, 17), torch.bfloat16,
     dict(bias=False, init=True, kappa=1.0, ret=True), {}),
    ("bf16-M3-L129", (1, 3, 129, 24, 16), torch.bfloat16,
     dict(init=True, kappa=None, ret=True), {}),
    ("f16-segments-eblks", (2, 2, 30, 20, 5), torch.float16,
     dict(z=False, init=True, kappa=None, ret=True),
     dict(n_seg=4, bwd_n_seg=2, block_e=16, bwd_block_e=8, chunk=4)),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference(case):
    _, (b, M, L, E, N), dtype, o, tune = case
    opts = dict(D=o.get("D", True), z=o.get("z", True), bias=o.get("bias", True),
                softplus=o.get("softplus", True), init=o["init"])
    inp = make_inputs(b, M, L, E, N, dtype=dtype, **opts, seed=L + 7 * M)
    names = tuple(k for k in NAMES if inp[k] is not None)
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(b, M, L, E, generator=gen).to(DEV)
    wf = torch.randn(b, E, N, generator=gen).to(DEV) if o["ret"] else None
    kw = dict(softplus=opts["softplus"], kappa=o["kappa"], return_final=o["ret"],
              grad_names=names, wy=wy, wf=wf)
    y_r, f_r, g_r = run_scan("reference", inp, **kw)
    with tuning(**tune):
        y_t, f_t, g_t = run_scan("triton", inp, **kw)
        # the inference path (no grad, no checkpoints) gives the same y
        y_ng, f_ng, _ = run_scan("triton", inp, **{**kw, "grad_names": ()})
    tol = TOL[dtype]
    assert y_t.dtype == dtype
    assert_close(y_t, y_r, tol, "y")
    assert torch.equal(y_ng, y_t)
    if o["ret"]:
        assert f_t.dtype == torch.float32
        assert_close(f_t, f_r, tol, "final_state")
        assert torch.equal(f_ng, f_t)
    for k in names:
        assert g_t[k] is not None, f"no gradient for {k}"
        assert_close(g_t[k], g_r[k], tol, f"d{k}")


def _strided_views(inp, layout):
    """The same values as inp's activations in the layouts the fused model hands the scan:
    "mmajor" - every activation a (M, b, L, .) tensor seen as (b, M, L, .); "slices" - u and z
    halves of one (.., 2E) projection, delta, B and C column ranges of one (.., E + 2N) projection
    (row strides wider than the row), modality-major too."""
    u, delta, z, B, C = (inp[k] for k in ("u", "delta", "z", "B", "C"))
    mm = lambda x: x.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    if layout == "mmajor":
        return dict(inp, u=mm(u), delta=mm(delta), z=mm(z), B=mm(B), C=mm(C))
    E, N = u.shape[-1], B.shape[-1]
    uz = mm(torch.cat([u, z], dim=-1))
    dbc = mm(torch.cat([delta, B, C], dim=-1))
    return dict(inp, u=uz[..., :E], z=uz[..., E:], delta=dbc[..., :E], B=dbc[..., E:E + N],
                C=dbc[..., E + N:])


@needs_triton
@pytest.mark.parametrize("layout", ["mmajor", "slices"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tune", [{}, dict(n_seg=2, bwd_n_seg=2, chunk=4, block_e=8, bwd_block_e=8)])
def test_triton_strided_inputs(layout, dtype, tune):
    # views are read in place (no copies), y and the gradients equal the reference's; y follows
    # u's layout when u is dense
    b, M, L, E, N = 2, 3, 13, 20, 8
    inp = make_inputs(b, M, L, E, N, dtype=dtype, init=True, seed=5)
    view = _strided_views(inp, layout)
    assert not view["u"].is_contiguous() and not view["B"].is_contiguous()
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    gen = torch.Generator().manual_seed(3)
    wy = torch.randn(b, M, L, E, generator=gen).to(DEV)
    wf = torch.randn(b, E, N, generator=gen).to(DEV)
    kw = dict(softplus=True, kappa=None, return_final=True, grad_names=names, wy=wy, wf=wf)
    y_r, f_r, g_r = run_scan("reference", inp, **kw)
    with tuning(**tune):
        y_t, f_t, g_t = run_scan("triton", view, **kw)
        y_ng = coupled_scan(*(view[k] for k in NAMES[:8]), delta_softplus=True,
                            initial_state=view["initial_state"], impl="triton")
    tol = TOL[dtype]
    assert_close(y_t, y_r, tol, "y")
    # not bitwise: the no-grad call's y has other strides, so the JIT specializes other alignments
    # and may pick another vector width for B and C, hence another order of the sum over n (seen on
    # an H100: float32 differs in the last bits); the interpreter happens to agree exactly
    assert_close(y_ng, y_t, 1e-6 if dtype == torch.float32 else tol, "y without grad")
    if layout == "mmajor":
        assert y_ng.stride() == view["u"].stride()
    assert_close(f_t, f_r, tol, "final_state")
    for k in names:
        assert_close(g_t[k], g_r[k], tol, f"d{k}")


@needs_triton
def test_triton_expanded_output_gradient():
    # y.sum() hands the backward an expanded (stride 0) gradient; outputs must not alias it
    inp = make_inputs(2, 2, 7, 6, 4, seed=9)
    grads = {}
    for impl in ("reference", "triton"):
        leaves = {k: (v.detach().clone().requires_grad_(k in ("u", "delta", "z")) if v is not None else None)
                  for k, v in inp.items()}
        y = coupled_scan(*(leaves[k] for k in NAMES[:8]), delta_softplus=True, impl=impl)
        grads[impl] = torch.autograd.grad(y.sum(dim=2).sum(), [leaves["u"], leaves["delta"], leaves["z"]])
    for k, gt, gr in zip(("u", "delta", "z"), grads["triton"], grads["reference"]):
        assert_close(gt, gr, TOL[torch.float32], f"d{k}")


@needs_triton
def test_triton_partial_requires_grad_and_final_state_only():
    # only some inputs require grad (dB, dC and dinit are skipped), and the loss uses final_state
    # only (y's gradient is None inside the backward)
    inp = make_inputs(1, 3, 5, 6, 4, init=True)
    gen = torch.Generator().manual_seed(2)
    wf = torch.randn(1, 6, 4, generator=gen).to(DEV)
    res = {}
    for impl in ("reference", "triton"):
        leaves = {k: (v.detach().clone() if v is not None else None) for k, v in inp.items()}
        leaves["u"].requires_grad_()
        leaves["A"].requires_grad_()
        y, final = coupled_scan(*[leaves[k] for k in NAMES[:8]], delta_softplus=True,
                                initial_state=leaves["initial_state"], return_final_state=True,
                                impl=impl)
        res[impl] = torch.autograd.grad((final * wf).sum(), [leaves["u"], leaves["A"]])
    for gt, gr, k in zip(res["triton"], res["reference"], ("u", "A")):
        assert_close(gt, gr, 1e-5, f"d{k}")
    assert res["triton"][0].abs().max() > 0


@needs_triton
def test_triton_deterministic_mode_is_bitwise_repeatable():
    # under torch.use_deterministic_algorithms the dB/dC cross-E-block sums use partial buffers
    # (no atomics): two backward passes agree bit for bit, and with the reference
    inp = make_inputs(1, 2, 5, 20, 4, init=True)
    names = tuple(k for k in NAMES if inp[k] is not None)
    wy = torch.randn(1, 2, 5, 20, generator=torch.Generator().manual_seed(4)).to(DEV)
    kw = dict(softplus=True, kappa=None, return_final=False, grad_names=names, wy=wy)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with tuning(bwd_block_e=8):
            _, _, g1 = run_scan("triton", inp, **kw)
            _, _, g2 = run_scan("triton", inp, **kw)
    finally:
        torch.use_deterministic_algorithms(prev)
    _, _, g_r = run_scan("reference", inp, **kw)
    for k in names:
        assert torch.equal(g1[k], g2[k]), k
        assert_close(g1[k], g_r[k], 1e-5, f"d{k}")


@needs_triton
def test_triton_L0():
    inp = make_inputs(2, 2, 0, 5, 3, init=True)
    y, final = coupled_scan(*[inp[k] for k in NAMES[:8]], delta_softplus=True,
                            initial_state=inp["initial_state"], return_final_state=True,
                            impl="triton")
    assert y.shape == (2, 2, 0, 5)
    assert torch.equal(final, inp["initial_state"])


# ---------------------------------------------------------------------------------------------
# streaming: two pieces chained through final_state / initial_state equal one run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
def test_streaming_two_pieces_equal_one_run(impl):
    inp = make_inputs(2, 3, 10, 6, 5, init=True, seed=5)
    kw = dict(delta_softplus=True, return_final_state=True, impl=impl)
    args = [inp[k] for k in NAMES[:8]]
    y, final = coupled_scan(*args, initial_state=inp["initial_state"], **kw)

    def piece(sl):
        return [a[:, :, sl].contiguous() if (a is not None and a.dim() == 4) else a for a in args]

    y1, f1 = coupled_scan(*piece(slice(0, 4)), initial_state=inp["initial_state"], **kw)
    y2, f2 = coupled_scan(*piece(slice(4, 10)), initial_state=f1, **kw)
    assert_close(torch.cat([y1, y2], dim=2), y, 1e-6, "y streamed")
    assert_close(f2, final, 1e-6, "final_state streamed")
    # and the pieces are not trivially equal to a fresh start
    y2_fresh = coupled_scan(*piece(slice(4, 10)), **{**kw, "return_final_state": False})
    assert (y2_fresh - y2).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# coupling_scale = 1: the state grows like M^t (the paper's Eq. 6), nothing clamps it
# ---------------------------------------------------------------------------------------------


def _growth_inputs(M, L, E=3, N=4):
    b = 1
    u = torch.zeros(b, M, L, E)
    u[:, :, 0] = 1.0                                   # input only at t = 0
    delta = torch.ones(b, M, L, E)                     # dt = 1 (no softplus)
    A = torch.zeros(M, E, N)                           # exp(dt * A) = 1 exactly
    B = torch.ones(b, M, L, N)
    C = torch.ones(b, M, L, N)
    return [t.to(DEV) for t in (u, delta, A, B, C)]


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
def test_kappa1_state_grows_like_M_to_the_t(impl):
    M, L, N = 3, 12, 4
    u, delta, A, B, C = _growth_inputs(M, L, N=N)
    y, final = coupled_scan(u, delta, A, B, C, coupling_scale=1.0, return_final_state=True,
                            impl=impl)
    y = y.double().cpu()
    # c[0] = sum_m dt * B * u = M, then c[t] = M * c[t-1]: c[t] = M^(t+1); y[t] = N * c[t-1]
    t = torch.arange(1, L, dtype=torch.float64)
    expected = N * M ** t
    torch.testing.assert_close(y[0, :, 1:, :], expected[None, :, None].expand(M, L - 1, 3),
                               rtol=1e-6, atol=0)
    ratio = y[0, :, 2:, :] / y[0, :, 1:-1, :]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(M)), rtol=1e-6, atol=0)
    torch.testing.assert_close(final.double().cpu(), torch.full((1, 3, N), float(M) ** L,
                                                                dtype=torch.float64),
                               rtol=1e-6, atol=0)
    # mean coupling (the default) keeps the same input bounded: c stays 1 (exactly in the
    # reference; the GPU kernel's ex2.approx of log2(1/M) is within ~2^-22 a step, so 1 to ~L * 2e-7)
    y1, f1 = coupled_scan(u, delta, A, B, C, return_final_state=True, impl=impl)
    torch.testing.assert_close(f1.cpu(), torch.ones(1, 3, N), rtol=1e-5 if impl == "triton" else 0, atol=0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_triton)])
def test_kappa1_overflows_to_inf_in_float32(impl):
    # Documented behaviour: with kappa = 1 and M = 3, 3^t passes float32's max (~3.4e38) near
    # t = 81; the state then is +inf (IEEE overflow), not clamped to a finite value, and y is no
    # longer finite. The default kappa = 1/M exists for this reason.
    M, L = 3, 100
    u, delta, A, B, C = _growth_inputs(M, L)
    with torch.no_grad():
        y, final = coupled_scan(u, delta, A, B, C, coupling_scale=1.0, return_final_state=True,
                                impl=impl)
    assert torch.isinf(final).all() and (final > 0).all()
    # y[t] = N * 3^t (see above) is finite exactly while that is below float32's max
    t = torch.arange(L, dtype=torch.float64)
    finite_expected = (4 * 3.0 ** t) < torch.finfo(torch.float32).max
    assert finite_expected[:79].all() and not finite_expected[-1]
    finite = torch.isfinite(y[0].cpu())                      # (M, L, E)
    assert torch.equal(finite, finite_expected[None, :, None].expand_as(finite))


# ---------------------------------------------------------------------------------------------
# validation by the dispatcher
# ---------------------------------------------------------------------------------------------


def _valid():
    return make_inputs(2, 2, 4, 3, 5, init=True, device="cpu")


@pytest.mark.parametrize("mutate, exc, words", [
    (lambda t: t.update(u=t["u"][0]), ValueError, "u must be a 4-D tensor"),
    (lambda t: t.update(delta=t["delta"][:, :, :3]), ValueError, "delta has shape"),
    (lambda t: t.update(A=t["A"].double()), TypeError, "A has dtype torch.float64"),
    (lambda t: t.update(B=t["B"].half()), TypeError, "B has dtype torch.float16"),
    (lambda t: t.update(C=t["C"][:, :, :, :4]), ValueError, "C has shape"),
    (lambda t: t.update(D=t["D"][:1]), ValueError, "D has shape"),
    (lambda t: t.update(z=t["z"].bfloat16()), TypeError, "z has dtype"),
    (lambda t: t.update(delta_bias=t["delta_bias"].half()), TypeError, "delta_bias has dtype"),
    (lambda t: t.update(initial_state=t["initial_state"][:, :2]), ValueError,
     "initial_state has shape"),
    (lambda t: t.update(u=t["u"].int()), TypeError, "activations must be float32"),
    (lambda t: t.update(A=t["A"].numpy()), ValueError, "A must be a 3-D tensor"),
])
def test_validation_errors(mutate, exc, words):
    t = _valid()
    mutate(t)
    with pytest.raises(exc, match=words):
        coupled_scan(*[t[k] for k in NAMES[:8]], initial_state=t["initial_state"],
                     impl="reference")


def test_validation_bad_impl():
    t = _valid()
    with pytest.raises(ValueError, match="impl must be one of"):
        coupled_scan(*[t[k] for k in NAMES[:8]], impl="cuda")


@needs_triton
def test_tuning_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        with tuning(blok_e=8):
            pass


@needs_triton
@pytest.mark.parametrize("tune", [dict(block_e=8, num_warps=1, pf_bc=True, n_seg=2, chunk_t=4),
                                  dict(block_e=4, num_warps=1, pf_bc=False, y_parts=16),
                                  dict(block_e=2, num_warps=1, y_parts=4, chunk_t=2, n_seg=3)],
                         ids=["pf_bc-eblk8-seg2-chunk4", "eblk4-yparts16", "eblk2-yparts4-chunk2"])
def test_triton_forward_gpu_tile_shapes(tune):
    # the GPU planner's forward tiles (one warp, small BLOCK_E), with B/C prefetch on and off,
    # partial y sums, chunks shorter than L (last one partial) and segments, against the
    # reference; N = 64 as in the model
    inp = make_inputs(1, 3, 11, 8, 64, init=True, seed=11)
    kw = dict(softplus=True, kappa=None, return_final=True)
    y_r, f_r, _ = run_scan("reference", inp, **kw)
    with tuning(**tune):
        y_t, f_t, _ = run_scan("triton", inp, **kw)
    assert_close(y_t, y_r, 1e-5, "y")
    assert_close(f_t, f_r, 1e-5, "final_state")


@needs_triton
@pytest.mark.parametrize("n_seg", [6, 9, 17])
def test_triton_many_segments(n_seg):
    # the segment summaries composed by the combine kernel's parallel scan: a power of two of
    # summaries (n_seg 9, 17) and padded ones (6), an initial state carried through all of them
    # (forward), and the backward's segment adjoints composed the same way in reverse
    inp = make_inputs(2, 3, 37, 8, 16, init=True, seed=n_seg)
    names = tuple(k for k in NAMES if inp[k] is not None)
    gen = torch.Generator().manual_seed(4)
    wy = torch.randn(2, 3, 37, 8, generator=gen).to(DEV)
    wf = torch.randn(2, 8, 16, generator=gen).to(DEV)
    kw = dict(softplus=True, kappa=None, return_final=True, grad_names=names, wy=wy, wf=wf)
    y_r, f_r, g_r = run_scan("reference", inp, **kw)
    with tuning(n_seg=n_seg, chunk_t=2, bwd_n_seg=n_seg, chunk=2):
        y_t, f_t, g_t = run_scan("triton", inp, **kw)
    assert_close(y_t, y_r, 1e-5, "y")
    assert_close(f_t, f_r, 1e-5, "final_state")
    for k in names:
        assert_close(g_t[k], g_r[k], 1e-5, f"d{k}")


@needs_triton
@pytest.mark.parametrize("kappa", [0.0, -0.4])
def test_triton_nonpositive_coupling_scale(kappa):
    # the forward folds log2(kappa) into the exponent only for kappa > 0; zero and negative
    # coupling scales take the plain multiply and must still match the reference
    inp = make_inputs(2, 3, 9, 8, 16, init=True, seed=5)
    kw = dict(softplus=True, kappa=kappa, return_final=True)
    y_r, f_r, _ = run_scan("reference", inp, **kw)
    y_t, f_t, _ = run_scan("triton", inp, **kw)
    assert_close(y_t, y_r, 1e-5, "y")
    assert_close(f_t, f_r, 1e-5, "final_state")


@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "mmajor"])
def test_triton_gate_in_place(layout):
    # the model's inference path: y written over z (read at the same positions just before)
    from cm_deploy.ops.triton_scan import coupled_scan_triton
    inp = make_inputs(2, 3, 11, 12, 8, init=True, seed=4)
    if layout == "mmajor":
        inp = _strided_views(inp, "mmajor")
    args = [inp[k] for k in NAMES[:8]]
    want = coupled_scan_triton(*args, delta_softplus=True, initial_state=inp["initial_state"])
    z = inp["z"].clone()
    args[6] = z
    got = coupled_scan_triton(*args, delta_softplus=True, initial_state=inp["initial_state"], gate_in_place=True)
    assert got.data_ptr() == z.data_ptr()
    assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("layout", ["contiguous", "mmajor"])
@pytest.mark.parametrize("optional", [True, False])
def test_custom_ops_opcheck(layout, optional):
    """What torch.compile sees of the kernels (cm_deploy::coupled_scan_fwd / _bwd): the schema, the
    fake functions (shapes, dtypes and strides of the outputs, y following u's layout), the
    autograd registration and the op under AOT dispatch with dynamic shapes (torch.library.opcheck
    runs the real kernels against each)."""
    from cm_deploy.ops.triton_scan import _t, _train_chunk
    inp = make_inputs(2, 3, 9, 8, 4, D=optional, z=optional, bias=optional, init=optional, seed=8)
    if layout == "mmajor" and optional:
        inp = _strided_views(inp, "mmajor")
    u, A = inp["u"], inp["A"]
    act = [inp[k] for k in NAMES[:8]] + [_t(inp["initial_state"])]
    fwd, bwd = torch.ops.cm_deploy.coupled_scan_fwd.default, torch.ops.cm_deploy.coupled_scan_bwd.default
    torch.library.opcheck(fwd, (*act, None, True, 0.5, 0))           # inference: no checkpoints
    low = (torch.randn(*u.shape[:3], 3) * 0.3).to(DEV)                # delta in rank-3 form
    dt_w = (torch.randn(u.shape[1], 3, u.shape[3]) * 0.3).to(DEV)
    torch.library.opcheck(fwd, (act[0], low, *act[2:], dt_w, True, 0.5, 0))
    chunk = _train_chunk(u, A)
    grad = [t.detach().clone().requires_grad_(True) if t is not None else None for t in act]
    torch.library.opcheck(fwd, (*grad, None, True, 0.5, chunk))      # training: autograd formula
    y, final, ckpt = fwd(*act, None, True, 0.5, chunk)
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    need = [t is not None for t in act]
    torch.library.opcheck(bwd, (dy, dfinal, *act[:8], ckpt, True, 0.5, chunk, need))


@needs_triton
def test_custom_op_gradients_equal_eager():
    # the compiled path's autograd formula against the eager autograd.Function, every input
    from cm_deploy.ops.triton_scan import _scan_compiled, _t
    inp = make_inputs(2, 2, 7, 6, 4, init=True, seed=9)
    act = [inp[k] for k in NAMES[:8]] + [_t(inp["initial_state"])]
    gen = torch.Generator().manual_seed(1)
    grads = []
    for path in ("eager", "op"):
        leaves = [t.detach().clone().requires_grad_(True) for t in act]
        if path == "eager":
            from cm_deploy.ops.triton_scan import _CoupledScanFn
            y, final = _CoupledScanFn.apply(*leaves, True, 0.7)
        else:
            y, final = _scan_compiled(*leaves, True, 0.7, True)
        if not grads:
            wy, wf = (torch.randn(t.shape, generator=gen).to(DEV) for t in (y, final))
        ((y * wy).sum() + (final * wf).sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(NAMES, *grads):
        assert torch.equal(a, b), name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tune", [{}, dict(n_seg=3, chunk_t=4)])
def test_triton_rank_delta(dtype, tune):
    """Inference with delta in Mamba's rank-R form: the kernel forms delta = dt_low @ W (float32)
    and gives what the reference gives with that delta materialised (segments included)."""
    from cm_deploy.ops.triton_scan import coupled_scan_triton
    b, M, L, E, N, R = 2, 3, 19, 12, 8, 5
    inp = make_inputs(b, M, L, E, N, dtype=dtype, init=True, seed=6)
    inp = _strided_views(inp, "mmajor")
    g = torch.Generator().manual_seed(2)
    low = (torch.randn(M, b, L, R, generator=g) * 0.5).to(dtype).to(DEV).transpose(0, 1)
    W = (torch.randn(M, R, E, generator=g) * 0.5).to(DEV)
    full = torch.einsum("bmlr,mre->bmle", low.float(), W)
    args = [inp[k] for k in NAMES[:8]]
    f32 = [t.float() if t is not None else None for t in args]     # the reference in float32 throughout
    with torch.no_grad():
        y_r, f_r = coupled_scan_reference(f32[0], full, *f32[2:], delta_softplus=True,
                                          initial_state=inp["initial_state"], return_final_state=True)
        with tuning(**tune):
            y_t, f_t = coupled_scan_triton(args[0], low, *args[2:], delta_softplus=True,
                                           initial_state=inp["initial_state"], return_final_state=True,
                                           delta_proj=W)
    assert_close(y_t, y_r.to(dtype), TOL[dtype], "y")
    assert_close(f_t, f_r, TOL[dtype], "final_state")
    with pytest.raises(RuntimeError, match="inference path"):
        coupled_scan_triton(args[0].clone().requires_grad_(True), low, *args[2:], delta_proj=W)
    # L = 0 (handed to the reference): an empty y and the initial state back
    e = [t[:, :, :0] if t is not None and t.dim() == 4 else t for t in args]
    with torch.no_grad():
        y0, f0 = coupled_scan_triton(e[0], low[:, :, :0], *e[2:], delta_softplus=True,
                                     initial_state=inp["initial_state"], return_final_state=True,
                                     delta_proj=W)
    assert y0.shape == (b, M, 0, E)
    assert torch.equal(f0, inp["initial_state"])
