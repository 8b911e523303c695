"""Fused Triton kernels for CoupledScan, forward and backward (DESIGN.md sections 2-3).

Layout of the work: one program owns a tile of the coupled state, BLOCK_E channels x all N states
(float32, in registers), for one batch item and one segment of time, and walks t sequentially; for
each t it runs the M modalities (M is a constexpr, the loop is unrolled) against the shared state.
Inputs are read once, y is written once.

Long sequences at small batch do not give enough (batch, E-block) programs to fill the GPU, and a
sequential scan is then bound by latency. The time axis is then cut into segments: the recurrence
c[t] = a[t] * c[t-1] + b[t] is linear and elementwise in (e, n), so a first pass computes each
segment's transition (P = prod a, S = its end state from zero), a tiny sequential pass over
segments gives every segment's start state, and the main pass runs all segments in parallel. This
costs a second read of the inputs and a second exp per element, so it is only used when the
(batch, E-block) grid is too small.

Backward: a reverse scan of the state adjoint g[t] = dL/dc[t],
    dh[m,t] = dyr[m,t] * C[m,t] + kappa * g[t]         (dyr = dy * silu(z))
    g[t-1]  = sum_m dh[m,t] * exp(dt[m,t] * A[m])
which needs c[t-1] at every t in reverse order. The forward (when grad is needed) stores c every
`chunk` steps; the backward recomputes one chunk's states into a per-program scratch buffer and
walks the chunk in reverse. Memory for that, per batch item: ceil(L / chunk) * E * N * 4 bytes of
checkpoints plus n_seg * chunk * E * N * 4 bytes of scratch, with chunk ~ sqrt(L / n_seg); never
O(L * E * N). The adjoint recurrence is linear too, so long sequences split it into segments the
same way (a pre-pass computes each segment's local adjoint and transition).

Reductions: dB and dC (per b, m, t, n) sum over e across E-block programs: float32 atomics by
default, or, when torch.use_deterministic_algorithms(True) is on, per-E-block partials summed
afterwards (deterministic, more memory). dA, dD and d_delta_bias are written per (batch, segment)
program and summed afterwards (deterministic).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

__all__ = ["coupled_scan_triton", "tuning"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus (beta 1, threshold 20). log1p(exp(x)) = max(x, 0) + log1p(w),
    # w = exp(-|x|) <= 1; log1p(w) via log(1+w) * w / ((1+w) - 1), exact to round-off even where
    # 1 + w loses w's low bits (no log1p in tl that exists in both the interpreter and 3.6).
    w = tl.exp(-tl.abs(x))
    v = 1.0 + w
    d = v - 1.0
    lp = tl.where(d == 0.0, w, tl.log(v) * (w / tl.where(d == 0.0, 1.0, d)))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + lp)


@triton.jit
def _pick(m: tl.constexpr, x0, x1, x2, x3):
    # Compile-time selection of a per-modality value kept in registers (m is a constexpr).
    if m == 0:
        r = x0
    elif m == 1:
        r = x1
    elif m == 2:
        r = x2
    else:
        r = x3
    return r


@triton.jit
def _add_at(m: tl.constexpr, v, x0, x1, x2, x3):
    if m == 0:
        x0 = x0 + v
    elif m == 1:
        x1 = x1 + v
    elif m == 2:
        x2 = x2 + v
    elif m == 3:
        x3 = x3 + v
    return x0, x1, x2, x3


@triton.jit
def _load_a(A_ptr, m: tl.constexpr, E, N, offs_en, m2):
    # A[m] pre-scaled by log2(e) so that exp(dt * A) is one exp2.
    return tl.load(A_ptr + m * E * N + offs_en, mask=m2, other=0.0) * _LOG2E


@triton.jit
def _load_vec(ptr, m: tl.constexpr, E, offs_e, me, ENABLED: tl.constexpr):
    if ENABLED:
        r = tl.load(ptr + m * E + offs_e, mask=me, other=0.0)
    else:
        r = tl.zeros(offs_e.shape, dtype=tl.float32)
    return r


@triton.jit
def _a_for(m: tl.constexpr, A_ptr, E, N, offs_en, m2, a0, a1, a2, a3):
    # The first four modalities' A live in registers; more are re-read (from cache) every step.
    if m < 4:
        a = _pick(m, a0, a1, a2, a3)
    else:
        a = _load_a(A_ptr, m, E, N, offs_en, m2)
    return a


@triton.jit
def _vec_for(m: tl.constexpr, ptr, E, offs_e, me, ENABLED: tl.constexpr, v0, v1, v2, v3):
    if m < 4:
        v = _pick(m, v0, v1, v2, v3)
    else:
        v = _load_vec(ptr, m, E, offs_e, me, ENABLED)
    return v


@triton.jit
def _dt_of(x, SOFTPLUS: tl.constexpr):
    if SOFTPLUS:
        dt = _softplus(x)
    else:
        dt = x
    return dt


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                y_ptr, c0_ptr, ckpt_ptr, final_ptr,
                L, E, N, seg_len, n_seg, chunk, n_ck, kappa,
                M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_C0: tl.constexpr, SAVE_CKPT: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    me = offs_e < E
    mn = offs_n < N
    m2 = me[:, None] & mn[None, :]
    offs_en = offs_e[:, None] * N + offs_n[None, :]

    a0 = _load_a(A_ptr, 0, E, N, offs_en, m2)
    a1 = a0
    a2 = a0
    a3 = a0
    if M > 1:
        a1 = _load_a(A_ptr, 1, E, N, offs_en, m2)
    if M > 2:
        a2 = _load_a(A_ptr, 2, E, N, offs_en, m2)
    if M > 3:
        a3 = _load_a(A_ptr, 3, E, N, offs_en, m2)
    d0 = _load_vec(D_ptr, 0, E, offs_e, me, HAS_D)
    d1 = _load_vec(D_ptr, 1 % M, E, offs_e, me, HAS_D)
    d2 = _load_vec(D_ptr, 2 % M, E, offs_e, me, HAS_D)
    d3 = _load_vec(D_ptr, 3 % M, E, offs_e, me, HAS_D)
    q0 = _load_vec(bias_ptr, 0, E, offs_e, me, HAS_BIAS)
    q1 = _load_vec(bias_ptr, 1 % M, E, offs_e, me, HAS_BIAS)
    q2 = _load_vec(bias_ptr, 2 % M, E, offs_e, me, HAS_BIAS)
    q3 = _load_vec(bias_ptr, 3 % M, E, offs_e, me, HAS_BIAS)

    if HAS_C0:
        c = tl.load(c0_ptr + (pid_b * n_seg + pid_s) * E * N + offs_en, mask=m2, other=0.0)
    else:
        c = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    t_lo = pid_s * seg_len
    t_hi = tl.minimum(t_lo + seg_len, L)
    for t in range(t_lo, t_hi):
        if SAVE_CKPT:
            if t % chunk == 0:
                tl.store(ckpt_ptr + (pid_b * n_ck + t // chunk) * E * N + offs_en, c, mask=m2)
        acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        for m in tl.static_range(M):
            row = (pid_b * M + m) * L + t
            a = _a_for(m, A_ptr, E, N, offs_en, m2, a0, a1, a2, a3)
            u = tl.load(u_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
            x = tl.load(dl_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x = x + _vec_for(m, bias_ptr, E, offs_e, me, HAS_BIAS, q0, q1, q2, q3)
            dt = _dt_of(x, SOFTPLUS)
            bb = tl.load(B_ptr + row * N + offs_n, mask=mn, other=0.0).to(tl.float32)
            cc = tl.load(C_ptr + row * N + offs_n, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * a) * c + (dt * u)[:, None] * bb[None, :]
            acc += h
            yv = tl.sum(h * cc[None, :], axis=1)
            if HAS_D:
                yv += _vec_for(m, D_ptr, E, offs_e, me, HAS_D, d0, d1, d2, d3) * u
            if HAS_Z:
                zz = tl.load(z_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
                yv = yv * (zz * tl.sigmoid(zz))
            tl.store(y_ptr + row * E + offs_e, yv.to(y_ptr.dtype.element_ty), mask=me)
        c = acc * kappa
    if pid_s == n_seg - 1:
        tl.store(final_ptr + pid_b * E * N + offs_en, c, mask=m2)


@triton.jit
def _fwd_seg_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, bias_ptr, P_ptr, S_ptr,
                    L, E, N, seg_len, n_seg, kappa,
                    M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                    SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr):
    # Segment summary: P = prod_t kappa * sum_m exp(dt A), S = end state of the segment from 0.
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)  # the last segment needs no summary: the grid stops before it
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    me = offs_e < E
    mn = offs_n < N
    m2 = me[:, None] & mn[None, :]
    offs_en = offs_e[:, None] * N + offs_n[None, :]
    a0 = _load_a(A_ptr, 0, E, N, offs_en, m2)
    a1 = a0
    a2 = a0
    a3 = a0
    if M > 1:
        a1 = _load_a(A_ptr, 1, E, N, offs_en, m2)
    if M > 2:
        a2 = _load_a(A_ptr, 2, E, N, offs_en, m2)
    if M > 3:
        a3 = _load_a(A_ptr, 3, E, N, offs_en, m2)
    q0 = _load_vec(bias_ptr, 0, E, offs_e, me, HAS_BIAS)
    q1 = _load_vec(bias_ptr, 1 % M, E, offs_e, me, HAS_BIAS)
    q2 = _load_vec(bias_ptr, 2 % M, E, offs_e, me, HAS_BIAS)
    q3 = _load_vec(bias_ptr, 3 % M, E, offs_e, me, HAS_BIAS)

    s = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    p = tl.full([BLOCK_E, BLOCK_N], 1.0, dtype=tl.float32)
    t_lo = pid_s * seg_len
    t_hi = tl.minimum(t_lo + seg_len, L)
    for t in range(t_lo, t_hi):
        acc_s = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        acc_p = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        for m in tl.static_range(M):
            row = (pid_b * M + m) * L + t
            a = _a_for(m, A_ptr, E, N, offs_en, m2, a0, a1, a2, a3)
            u = tl.load(u_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
            x = tl.load(dl_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x = x + _vec_for(m, bias_ptr, E, offs_e, me, HAS_BIAS, q0, q1, q2, q3)
            dt = _dt_of(x, SOFTPLUS)
            bb = tl.load(B_ptr + row * N + offs_n, mask=mn, other=0.0).to(tl.float32)
            da = tl.exp2(dt[:, None] * a)
            acc_s += da * s + (dt * u)[:, None] * bb[None, :]
            acc_p += da
        s = acc_s * kappa
        p = p * (acc_p * kappa)
    out = (pid_b * n_seg + pid_s) * E * N + offs_en
    tl.store(P_ptr + out, p, mask=m2)
    tl.store(S_ptr + out, s, mask=m2)


@triton.jit
def _fwd_combine_kernel(P_ptr, S_ptr, c0_ptr, start_ptr, EN, n_seg,
                        HAS_C0: tl.constexpr, BLOCK: tl.constexpr):
    # Sequential over segments: start[j+1] = P[j] * start[j] + S[j].
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < EN
    if HAS_C0:
        c = tl.load(c0_ptr + pid_b * EN + offs, mask=mask, other=0.0)
    else:
        c = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid_b * n_seg * EN + offs
    tl.store(start_ptr + base, c, mask=mask)
    for j in range(n_seg - 1):
        p = tl.load(P_ptr + base + j * EN, mask=mask, other=0.0)
        s = tl.load(S_ptr + base + j * EN, mask=mask, other=0.0)
        c = p * c + s
        tl.store(start_ptr + base + (j + 1) * EN, c, mask=mask)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _bwd_seg_kernel(dl_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, P_ptr, R_ptr,
                    L, E, N, seg_len, n_seg, kappa,
                    M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                    SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr):
    # Segment summary of the adjoint recurrence: R = adjoint at the segment start given a zero
    # adjoint at its end, P = the segment's transition (same as the forward's).
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2) + 1  # segment 0 needs no summary
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    me = offs_e < E
    mn = offs_n < N
    m2 = me[:, None] & mn[None, :]
    offs_en = offs_e[:, None] * N + offs_n[None, :]
    a0 = _load_a(A_ptr, 0, E, N, offs_en, m2)
    a1 = a0
    a2 = a0
    a3 = a0
    if M > 1:
        a1 = _load_a(A_ptr, 1, E, N, offs_en, m2)
    if M > 2:
        a2 = _load_a(A_ptr, 2, E, N, offs_en, m2)
    if M > 3:
        a3 = _load_a(A_ptr, 3, E, N, offs_en, m2)
    q0 = _load_vec(bias_ptr, 0, E, offs_e, me, HAS_BIAS)
    q1 = _load_vec(bias_ptr, 1 % M, E, offs_e, me, HAS_BIAS)
    q2 = _load_vec(bias_ptr, 2 % M, E, offs_e, me, HAS_BIAS)
    q3 = _load_vec(bias_ptr, 3 % M, E, offs_e, me, HAS_BIAS)

    g = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    p = tl.full([BLOCK_E, BLOCK_N], 1.0, dtype=tl.float32)
    t_lo = pid_s * seg_len
    t_hi = tl.minimum(t_lo + seg_len, L)
    for tt in range(t_hi - t_lo):
        t = t_hi - 1 - tt
        acc_g = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        acc_p = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
        for m in tl.static_range(M):
            row = (pid_b * M + m) * L + t
            a = _a_for(m, A_ptr, E, N, offs_en, m2, a0, a1, a2, a3)
            x = tl.load(dl_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x = x + _vec_for(m, bias_ptr, E, offs_e, me, HAS_BIAS, q0, q1, q2, q3)
            dt = _dt_of(x, SOFTPLUS)
            dyr = tl.load(dy_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
                dyr = dyr * (zz * tl.sigmoid(zz))
            cc = tl.load(C_ptr + row * N + offs_n, mask=mn, other=0.0).to(tl.float32)
            da = tl.exp2(dt[:, None] * a)
            acc_g += da * (dyr[:, None] * cc[None, :] + kappa * g)
            acc_p += da
        g = acc_g
        p = p * (acc_p * kappa)
    out = (pid_b * n_seg + pid_s) * E * N + offs_en
    tl.store(P_ptr + out, p, mask=m2)
    tl.store(R_ptr + out, g, mask=m2)


@triton.jit
def _bwd_combine_kernel(P_ptr, R_ptr, gL_ptr, G_ptr, EN, n_seg,
                        HAS_GL: tl.constexpr, BLOCK: tl.constexpr):
    # Sequential over segments in reverse: G[j-1] = P[j] * G[j] + R[j], G[last] = d final_state.
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < EN
    if HAS_GL:
        g = tl.load(gL_ptr + pid_b * EN + offs, mask=mask, other=0.0)
    else:
        g = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid_b * n_seg * EN + offs
    tl.store(G_ptr + base + (n_seg - 1) * EN, g, mask=mask)
    for jj in range(n_seg - 1):
        j = n_seg - 1 - jj
        p = tl.load(P_ptr + base + j * EN, mask=mask, other=0.0)
        r = tl.load(R_ptr + base + j * EN, mask=mask, other=0.0)
        g = p * g + r
        tl.store(G_ptr + base + (j - 1) * EN, g, mask=mask)


@triton.jit
def _bwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr,
                ckpt_ptr, g_ptr, scr_ptr,
                du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dinit_ptr,
                L, E, N, seg_len, n_seg, chunk, n_ck, n_eblk, n_rows, kappa,
                M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_G: tl.constexpr, NEED_DB: tl.constexpr,
                NEED_DC: tl.constexpr, NEED_DINIT: tl.constexpr,
                DETERMINISTIC: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    me = offs_e < E
    mn = offs_n < N
    m2 = me[:, None] & mn[None, :]
    offs_en = offs_e[:, None] * N + offs_n[None, :]
    TILE: tl.constexpr = BLOCK_E * BLOCK_N
    scr = (scr_ptr + ((pid_b * n_seg + pid_s) * n_eblk + pid_e) * chunk * TILE
           + tl.arange(0, BLOCK_E)[:, None] * BLOCK_N + offs_n[None, :])

    a0 = _load_a(A_ptr, 0, E, N, offs_en, m2)
    a1 = a0
    a2 = a0
    a3 = a0
    if M > 1:
        a1 = _load_a(A_ptr, 1, E, N, offs_en, m2)
    if M > 2:
        a2 = _load_a(A_ptr, 2, E, N, offs_en, m2)
    if M > 3:
        a3 = _load_a(A_ptr, 3, E, N, offs_en, m2)
    d0 = _load_vec(D_ptr, 0, E, offs_e, me, HAS_D)
    d1 = _load_vec(D_ptr, 1 % M, E, offs_e, me, HAS_D)
    d2 = _load_vec(D_ptr, 2 % M, E, offs_e, me, HAS_D)
    d3 = _load_vec(D_ptr, 3 % M, E, offs_e, me, HAS_D)
    q0 = _load_vec(bias_ptr, 0, E, offs_e, me, HAS_BIAS)
    q1 = _load_vec(bias_ptr, 1 % M, E, offs_e, me, HAS_BIAS)
    q2 = _load_vec(bias_ptr, 2 % M, E, offs_e, me, HAS_BIAS)
    q3 = _load_vec(bias_ptr, 3 % M, E, offs_e, me, HAS_BIAS)

    # Per-modality gradient accumulators over this program's time range (first 4 in registers,
    # later ones read-modify-write their own slice of the zero-initialised partial buffers).
    ga0 = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    ga1 = ga0
    ga2 = ga0
    ga3 = ga0
    gd0 = tl.zeros([BLOCK_E], dtype=tl.float32)
    gd1 = gd0
    gd2 = gd0
    gd3 = gd0
    gq0 = gd0
    gq1 = gd0
    gq2 = gd0
    gq3 = gd0
    part = (pid_b * n_seg + pid_s) * M  # row of this program in the (batch*n_seg, M, ...) partials

    if HAS_G:
        g = tl.load(g_ptr + (pid_b * n_seg + pid_s) * E * N + offs_en, mask=m2, other=0.0)
    else:
        g = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    t_lo = pid_s * seg_len  # a multiple of chunk
    t_hi = tl.minimum(t_lo + seg_len, L)
    n_sub = tl.cdiv(t_hi - t_lo, chunk)
    for kk in range(n_sub):
        k = n_sub - 1 - kk
        t0 = t_lo + k * chunk
        t1 = tl.minimum(t0 + chunk, t_hi)
        # 1) recompute the chunk's states c[t-1], t0 <= t < t1, into scratch
        c = tl.load(ckpt_ptr + (pid_b * n_ck + t0 // chunk) * E * N + offs_en, mask=m2, other=0.0)
        tl.store(scr, c)
        for t in range(t0, t1 - 1):
            acc = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
            for m in tl.static_range(M):
                row = (pid_b * M + m) * L + t
                a = _a_for(m, A_ptr, E, N, offs_en, m2, a0, a1, a2, a3)
                u = tl.load(u_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
                x = tl.load(dl_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    x = x + _vec_for(m, bias_ptr, E, offs_e, me, HAS_BIAS, q0, q1, q2, q3)
                dt = _dt_of(x, SOFTPLUS)
                bb = tl.load(B_ptr + row * N + offs_n, mask=mn, other=0.0).to(tl.float32)
                acc += tl.exp2(dt[:, None] * a) * c + (dt * u)[:, None] * bb[None, :]
            c = acc * kappa
            tl.store(scr + (t + 1 - t0) * TILE, c)
        # threads may read back elements other threads wrote: make the writes visible
        tl.debug_barrier()
        # 2) walk the chunk in reverse
        for tt in range(t1 - t0):
            t = t1 - 1 - tt
            cp = tl.load(scr + (t - t0) * TILE)
            gn = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
            for m in tl.static_range(M):
                row = (pid_b * M + m) * L + t
                a = _a_for(m, A_ptr, E, N, offs_en, m2, a0, a1, a2, a3)
                u = tl.load(u_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
                x = tl.load(dl_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    x = x + _vec_for(m, bias_ptr, E, offs_e, me, HAS_BIAS, q0, q1, q2, q3)
                dt = _dt_of(x, SOFTPLUS)
                bb = tl.load(B_ptr + row * N + offs_n, mask=mn, other=0.0).to(tl.float32)
                cc = tl.load(C_ptr + row * N + offs_n, mask=mn, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
                da = tl.exp2(dt[:, None] * a)
                xu = dt * u
                h = da * cp + xu[:, None] * bb[None, :]
                if HAS_D:
                    dm = _vec_for(m, D_ptr, E, offs_e, me, HAS_D, d0, d1, d2, d3)
                if HAS_Z:
                    zz = tl.load(z_ptr + row * E + offs_e, mask=me, other=0.0).to(tl.float32)
                    sz = tl.sigmoid(zz)
                    yraw = tl.sum(h * cc[None, :], axis=1)
                    if HAS_D:
                        yraw += dm * u
                    dz = dy * yraw * (sz * (1.0 + zz * (1.0 - sz)))
                    tl.store(dz_ptr + row * E + offs_e, dz.to(dz_ptr.dtype.element_ty), mask=me)
                    dyr = dy * (zz * sz)
                else:
                    dyr = dy
                dh = dyr[:, None] * cc[None, :] + kappa * g
                dhda = dh * da
                gn += dhda
                w = dhda * cp
                s1 = tl.sum(dh * bb[None, :], axis=1)
                s2 = tl.sum(w * a, axis=1) * _LN2
                ddt = s2 + u * s1
                du = dt * s1
                if HAS_D:
                    du += dyr * dm
                if SOFTPLUS:
                    ddl = ddt * tl.where(x > 20.0, 1.0, tl.sigmoid(x))
                else:
                    ddl = ddt
                tl.store(du_ptr + row * E + offs_e, du.to(du_ptr.dtype.element_ty), mask=me)
                tl.store(ddl_ptr + row * E + offs_e, ddl.to(ddl_ptr.dtype.element_ty), mask=me)
                gA = w * dt[:, None]
                if m < 4:
                    ga0, ga1, ga2, ga3 = _add_at(m, gA, ga0, ga1, ga2, ga3)
                    gd0, gd1, gd2, gd3 = _add_at(m, dyr * u, gd0, gd1, gd2, gd3)
                    gq0, gq1, gq2, gq3 = _add_at(m, ddl, gq0, gq1, gq2, gq3)
                else:
                    pa = dA_ptr + (part + m) * E * N + offs_en
                    tl.store(pa, tl.load(pa, mask=m2, other=0.0) + gA, mask=m2)
                    pd = dD_ptr + (part + m) * E + offs_e
                    tl.store(pd, tl.load(pd, mask=me, other=0.0) + dyr * u, mask=me)
                    pq = dbias_ptr + (part + m) * E + offs_e
                    tl.store(pq, tl.load(pq, mask=me, other=0.0) + ddl, mask=me)
                if NEED_DB:
                    db = tl.sum(dh * xu[:, None], axis=0)
                    if DETERMINISTIC:
                        tl.store(dB_ptr + (pid_e * n_rows + row) * N + offs_n, db, mask=mn)
                    else:
                        tl.atomic_add(dB_ptr + row * N + offs_n, db, mask=mn, sem="relaxed")
                if NEED_DC:
                    dc = tl.sum(dyr[:, None] * h, axis=0)
                    if DETERMINISTIC:
                        tl.store(dC_ptr + (pid_e * n_rows + row) * N + offs_n, dc, mask=mn)
                    else:
                        tl.atomic_add(dC_ptr + row * N + offs_n, dc, mask=mn, sem="relaxed")
            g = gn
        # the next chunk overwrites scratch that other threads may still be reading
        tl.debug_barrier()
    if NEED_DINIT:
        if pid_s == 0:
            tl.store(dinit_ptr + pid_b * E * N + offs_en, g, mask=m2)
    for m in tl.static_range(M):
        if m < 4:
            tl.store(dA_ptr + (part + m) * E * N + offs_en, _pick(m, ga0, ga1, ga2, ga3), mask=m2)
            tl.store(dD_ptr + (part + m) * E + offs_e, _pick(m, gd0, gd1, gd2, gd3), mask=me)
            tl.store(dbias_ptr + (part + m) * E + offs_e, _pick(m, gq0, gq1, gq2, gq3), mask=me)


# ---------------------------------------------------------------------------------------------
# launch planning
# ---------------------------------------------------------------------------------------------

# Overrides for the heuristics below (tests force small blocks and several segments; benchmarks
# sweep). Keys: block_e, bwd_block_e, num_warps, bwd_num_warps, n_seg, bwd_n_seg, chunk,
# deterministic.
_OVERRIDES: dict = {}


@contextlib.contextmanager
def tuning(**kw):
    """Temporarily override launch parameters, e.g. `with tuning(block_e=8, n_seg=3): ...`."""
    allowed = {"block_e", "bwd_block_e", "num_warps", "bwd_num_warps", "n_seg", "bwd_n_seg",
               "chunk", "deterministic"}
    bad = set(kw) - allowed
    if bad:
        raise ValueError(f"tuning: unknown keys {sorted(bad)}")
    old = dict(_OVERRIDES)
    _OVERRIDES.update({k: v for k, v in kw.items() if v is not None})
    try:
        yield
    finally:
        _OVERRIDES.clear()
        _OVERRIDES.update(old)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass
class _Plan:
    block_e: int
    block_n: int
    num_warps: int
    n_seg: int
    seg_len: int


def _plan(batch, L, E, N, device, *, bwd, chunk=1):
    """Block sizes and time segmentation. The tile is BLOCK_E x BLOCK_N float32 state, ~8 elements
    per thread; segments only when the (batch, E-block) grid cannot fill the GPU."""
    pre = "bwd_" if bwd else ""
    block_n = _pow2(N)
    if _interpreting() or device.type != "cuda":
        # The interpreter's cost is per program and per op, not per element: few large programs.
        block_e = min(_pow2(E), 32)
        n_seg = 1
    else:
        tile = 2048 if bwd else 1024  # bwd: larger tiles halve the dB/dC cross-block reductions
        block_e = max(1, min(_pow2(E), tile // block_n))
        threads = batch * E * block_n // 8
        target = torch.cuda.get_device_properties(device).multi_processor_count * 1024
        n_seg = 1
        if 2 * threads < target:
            n_seg = max(1, min(-(-target // threads), L // 128))
    block_e = int(_OVERRIDES.get(pre + "block_e", block_e))
    n_seg = int(_OVERRIDES.get(pre + "n_seg", n_seg))
    num_warps = int(_OVERRIDES.get(pre + "num_warps",
                                   max(1, min(8, block_e * block_n // 256))))
    n_seg = max(1, min(n_seg, L))
    seg_len = -(-L // n_seg)
    seg_len = -(-seg_len // chunk) * chunk  # backward segments start on checkpoints
    n_seg = -(-L // seg_len)
    return _Plan(block_e, block_n, num_warps, n_seg, seg_len)


def _chunk_for(L, n_seg_bwd):
    # checkpoints ~ L / chunk, scratch ~ n_seg * chunk per batch item: balance at sqrt(L / n_seg)
    if "chunk" in _OVERRIDES:
        return max(1, int(_OVERRIDES["chunk"]))
    return max(8, min(64, math.isqrt(max(1, -(-L // n_seg_bwd)))))


def _deterministic():
    return bool(_OVERRIDES.get("deterministic", torch.are_deterministic_algorithms_enabled()))


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


def _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, kappa, save,
             chunk=None):
    batch, M, L, E = u.shape
    N = A.shape[2]
    dev = u.device
    p = _plan(batch, L, E, N, dev, bwd=False)
    n_eblk = -(-E // p.block_e)
    y = torch.empty_like(u)
    final = torch.empty(batch, E, N, device=dev, dtype=torch.float32)
    if save:
        n_ck = -(-L // chunk)
        ckpt = torch.empty(batch, n_ck, E, N, device=dev, dtype=torch.float32)
    else:
        n_ck, chunk = 1, 1
        ckpt = final  # never touched (SAVE_CKPT off)
    meta = dict(M=M, BLOCK_E=p.block_e, BLOCK_N=p.block_n, SOFTPLUS=softplus,
                num_warps=p.num_warps)
    dummy = A
    c0 = initial_state
    if p.n_seg > 1:
        grid = (n_eblk, batch, p.n_seg - 1)
        P = torch.empty(batch, p.n_seg, E, N, device=dev, dtype=torch.float32)
        S = torch.empty_like(P)
        _fwd_seg_kernel[grid](u, delta, A, B, delta_bias if delta_bias is not None else dummy,
                              P, S, L, E, N, p.seg_len, p.n_seg, kappa,
                              HAS_BIAS=delta_bias is not None, **meta)
        c0 = torch.empty_like(P)
        BLK = 1024
        _fwd_combine_kernel[(triton.cdiv(E * N, BLK), batch)](
            P, S, initial_state if initial_state is not None else dummy, c0, E * N, p.n_seg,
            HAS_C0=initial_state is not None, BLOCK=BLK, num_warps=4)
        del P, S
    _fwd_kernel[(n_eblk, batch, p.n_seg)](
        u, delta, A, B, C,
        D if D is not None else dummy, z if z is not None else u,
        delta_bias if delta_bias is not None else dummy,
        y, c0 if c0 is not None else dummy, ckpt, final,
        L, E, N, p.seg_len, p.n_seg, chunk, n_ck, kappa,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_C0=c0 is not None, SAVE_CKPT=save, **meta)
    return y, final, (ckpt if save else None)


def _backward(ctx, dy, dfinal):
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    softplus, kappa, chunk = ctx.softplus, ctx.kappa, ctx.chunk
    need = ctx.needs_input_grad
    batch, M, L, E = u.shape
    N = A.shape[2]
    dev = u.device
    p = _plan(batch, L, E, N, dev, bwd=True, chunk=chunk)
    n_eblk = -(-E // p.block_e)
    f32 = torch.float32
    dy = torch.zeros_like(u) if dy is None else dy.contiguous()
    if dfinal is not None:
        dfinal = dfinal.contiguous().float()
    det = _deterministic()
    dummy = A
    meta = dict(M=M, BLOCK_E=p.block_e, BLOCK_N=p.block_n, SOFTPLUS=softplus,
                num_warps=p.num_warps)

    g = dfinal
    if p.n_seg > 1:
        P = torch.empty(batch, p.n_seg, E, N, device=dev, dtype=f32)
        R = torch.empty_like(P)
        _bwd_seg_kernel[(n_eblk, batch, p.n_seg - 1)](
            delta, A, C, z if z is not None else u,
            delta_bias if delta_bias is not None else dummy, dy, P, R,
            L, E, N, p.seg_len, p.n_seg, kappa,
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, **meta)
        g = torch.empty_like(P)
        BLK = 1024
        _bwd_combine_kernel[(triton.cdiv(E * N, BLK), batch)](
            P, R, dfinal if dfinal is not None else dummy, g, E * N, p.n_seg,
            HAS_GL=dfinal is not None, BLOCK=BLK, num_warps=4)
        del P, R

    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    need_db, need_dc = need[3], need[4]
    rows = batch * M * L
    if det:
        dB = torch.empty(n_eblk, batch, M, L, N, device=dev, dtype=f32) if need_db else None
        dC = torch.empty(n_eblk, batch, M, L, N, device=dev, dtype=f32) if need_dc else None
    else:
        dB = torch.zeros(batch, M, L, N, device=dev, dtype=f32) if need_db else None
        dC = torch.zeros(batch, M, L, N, device=dev, dtype=f32) if need_dc else None
    parts = batch * p.n_seg
    dA = torch.zeros(parts, M, E, N, device=dev, dtype=f32)
    dD = torch.zeros(parts, M, E, device=dev, dtype=f32)
    dbias = torch.zeros(parts, M, E, device=dev, dtype=f32)
    need_dinit = initial_state_needs_grad = need[8]
    dinit = torch.empty(batch, E, N, device=dev, dtype=f32) if need_dinit else None
    scratch = torch.empty(batch * p.n_seg * n_eblk * chunk * p.block_e * p.block_n,
                          device=dev, dtype=f32)
    _bwd_kernel[(n_eblk, batch, p.n_seg)](
        u, delta, A, B, C, D if D is not None else dummy, z if z is not None else u,
        delta_bias if delta_bias is not None else dummy, dy,
        ckpt, g if g is not None else dummy, scratch,
        du, ddelta, dz if dz is not None else du,
        dB if dB is not None else dummy, dC if dC is not None else dummy,
        dA, dD, dbias, dinit if dinit is not None else dummy,
        L, E, N, p.seg_len, p.n_seg, chunk, ckpt.shape[1], n_eblk, rows, kappa,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_G=g is not None, NEED_DB=need_db, NEED_DC=need_dc,
        NEED_DINIT=initial_state_needs_grad, DETERMINISTIC=det, **meta)
    del scratch
    if det:
        dB = dB.sum(0) if dB is not None else None
        dC = dC.sum(0) if dC is not None else None
    return (du if need[0] else None,
            ddelta if need[1] else None,
            dA.sum(0) if need[2] else None,
            dB.to(B.dtype) if dB is not None else None,
            dC.to(C.dtype) if dC is not None else None,
            dD.sum(0) if need[5] else None,
            dz if need[6] else None,
            dbias.sum(0) if need[7] else None,
            dinit)


class _CoupledScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, softplus, kappa):
        batch, M, L, E = u.shape
        N = A.shape[2]
        pb = _plan(batch, L, E, N, u.device, bwd=True)
        chunk = _chunk_for(L, pb.n_seg)
        y, final, ckpt = _forward(u, delta, A, B, C, D, z, delta_bias, initial_state, softplus,
                                  kappa, save=True, chunk=chunk)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.softplus, ctx.kappa, ctx.chunk = softplus, kappa, chunk
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dfinal):
        grads = _backward(ctx, dy, dfinal)
        return (*grads, None, None)


def coupled_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                        delta_softplus=False, coupling_scale=None, initial_state=None,
                        return_final_state=False):
    """CoupledScan with the fused Triton kernels; same contract and results as
    `coupled_scan_reference` (float32 state math, y in u's dtype, final_state float32).
    Differentiable in every tensor argument (first-order)."""
    batch, M, L, E = u.shape
    kappa = 1.0 / M if coupling_scale is None else float(coupling_scale)
    if L == 0:
        # Nothing to scan: y is empty and final_state is initial_state; the reference does that.
        from .reference import coupled_scan_reference
        return coupled_scan_reference(u, delta, A, B, C, D, z, delta_bias,
                                      delta_softplus=delta_softplus, coupling_scale=kappa,
                                      initial_state=initial_state,
                                      return_final_state=return_final_state)
    cont = [t.contiguous() if t is not None else None
            for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
    softplus = bool(delta_softplus)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in cont)
    if needs_grad:
        y, final = _CoupledScanFn.apply(*cont, softplus, kappa)
    else:
        y, final, _ = _forward(*cont, softplus, kappa, save=False)
    return (y, final) if return_final_state else y
