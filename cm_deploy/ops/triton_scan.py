"""Fused Triton kernels for CoupledScan, forward and backward (DESIGN.md sections 2-3).

Layout of the work: one program owns a tile of the coupled state, all N states x BLOCK_E channels
(float32, in registers), for one batch item and one segment of time, and walks t sequentially; for
each t it runs the M modalities (M is a constexpr, the loop is unrolled) against the shared state.
Inputs are read once, y is written once.
Backward: the tile is [BLOCK_N, BLOCK_E] with e the contiguous axis of every 2-D buffer it touches
(A, the states and checkpoints are passed as (.., N, E)): Triton then puts a warp's lanes along e,
so the per-channel math (softplus, gates, the y and gradient vectors) runs once per lane.
Forward (inference, the hot path): one-warp programs on a [BLOCK_E, BLOCK_N] tile with n
contiguous, each thread holding one vector of n of ONE channel (see _plan), and time walked in
chunks of T steps: the per-channel math (softplus, dt * u, the skip term and the gate) runs
vectorised once per chunk over a [T, BLOCK_E] tile, and the sequential loop does only what must
be done per state: exp2, the update and the y product (the special-function unit, which computes
the exps, is the kernel's limit; per-channel math repeated on every lane of a channel had cost it
three extra ops per exp). Each step's loads are issued a step ahead (software pipelining in
registers).

Long sequences at small batch do not give enough (batch, E-block) programs to fill the GPU, and a
sequential scan is then bound by latency. The time axis is then cut into segments: the recurrence
c[t] = a[t] * c[t-1] + b[t] is linear and elementwise in (e, n), so a first pass computes each
segment's transition (P = prod a, S = its end state from zero), a tiny sequential pass over
segments gives every segment's start state, and the main pass runs all segments in parallel. This
costs a second read of the inputs and a second exp per element, so it is only used when the
(batch, E-block) grid fills less than half the GPU.

Backward: a reverse scan of the state adjoint g[t] = dL/dc[t],
    dh[m,t] = dyr[m,t] * C[m,t] + kappa * g[t]         (dyr = dy * silu(z))
    g[t-1]  = sum_m dh[m,t] * exp(dt[m,t] * A[m])
which needs c[t-1] at every t in reverse order. The forward (when grad is needed) stores c every
`chunk` steps; the backward recomputes one chunk's states into a per-program scratch buffer and
walks the chunk in reverse. Memory for that: batch * ceil(L / chunk) * E * N * 4 bytes of
checkpoints plus batch * n_seg * chunk * E * N * 4 bytes of scratch, chunk ~ sqrt(L / n_seg)
(paper shape, batch 64, L 500: 92 + 88 MB, against 2 GB for all states); never O(L * E * N).
The adjoint recurrence is linear too, so long sequences split it into segments the same way (a
pre-pass computes each segment's local adjoint and transition).

Forward scratch (the chunk phases' dt, dt * u and y sums, see _fwd_kernel): batch * n_seg * E * M *
(2 + YP) * T * 4 bytes, independent of L (paper shape, batch 64: 38 MB).

Reductions: dB and dC (per b, m, t, n) sum over e across E-block programs: float32 atomics by
default (run-to-run bit differences), or, under torch.use_deterministic_algorithms(True), per
E-block partials summed afterwards (deterministic; n_eblk times the memory). dA, dD and
d_delta_bias are written per (batch, segment) program and summed afterwards (deterministic).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ..contract import coupling_scale as _kappa

__all__ = ["coupled_scan_triton", "tuning"]

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# ex2.approx.ftz: one MUFU op (tl.exp2 may add denormal fix-ups)
_EX2 = tl.constexpr("ex2.approx.ftz.f32 $0, $1;")
# a pair of bfloat16 (one 32-bit register, element 0 in the low half) -> two float32
_BF16X2_F32 = tl.constexpr("shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xffff0000;")


@triton.jit
def _sum_combine(a, b):
    return a + b


# tl.reduce with triton's own sum combiner is tl.sum for float32, and the interpreter runs it with
# numpy; tl.sum itself is a @jit function, which the interpreter re-patches at every call.
_SUM = getattr(tl.standard, "_sum_combine", _sum_combine)

# ---------------------------------------------------------------------------------------------
# kernels
#
# Notes that hold for all of them:
#  * Per-modality parameters (A pre-scaled by log2(e), D, delta_bias) of the first four modalities
#    are held in registers and picked with compile-time `if m == k` chains (m is a static_range
#    constexpr); modalities past four re-read theirs from cache each step.
#  * Hot loops call no @jit helper: under TRITON_INTERPRET every helper call re-patches
#    triton.language (milliseconds each), which made the CPU tests several times slower.
#  * softplus is torch's (beta 1, threshold 20): x above 20, else log1p(exp(x)), with
#    log1p(w) = log(v) - ((v - 1) - w) / v, v = 1 + w rounded: the correction restores the bits
#    of w that 1 + w dropped (dt = softplus(-7) ~ 1e-3 is typical in Mamba and plain log(1 + w)
#    would be off by ~1e-4 relative). No log1p exists in tl for both the interpreter and 3.6.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_a(A_ptr, m: tl.constexpr, E, N, offs_ne, m2, ENABLED: tl.constexpr):
    if ENABLED:
        r = tl.load(A_ptr + m * E * N + offs_ne, mask=m2, other=0.0) * _LOG2E
    else:
        r = tl.zeros(offs_ne.shape, dtype=tl.float32)
    return r


@triton.jit
def _load_vec(ptr, m: tl.constexpr, E, offs_e, me, ENABLED: tl.constexpr):
    if ENABLED:
        r = tl.load(ptr + m * E + offs_e, mask=me, other=0.0)
    else:
        r = tl.zeros(offs_e.shape, dtype=tl.float32)
    return r


@triton.jit
def _fwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, W_ptr,
                y_ptr, c0_ptr, ckpt_ptr, final_ptr, scr_ptr,
                L, E, N, seg_len, n_seg, chunk, n_ck, kappa, log2_kappa,
                su0, su1, su2, sd0, sd1, sd2, sz0, sz1, sz2, sb0, sb1, sb2, sc0, sc1, sc2,
                sy0, sy1, sy2,
                M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, T: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_C0: tl.constexpr, SAVE_CKPT: tl.constexpr,
                SUMMARY: tl.constexpr, FAST_EXP: tl.constexpr, PF_BC: tl.constexpr,
                FOLD: tl.constexpr, YP: tl.constexpr, N_C: tl.constexpr, DT_RANK: tl.constexpr,
                CVT_ASM: tl.constexpr, UNROLL: tl.constexpr):
    # SUMMARY=False: the scan itself (y, checkpoints, final state). SUMMARY=True: the segment
    # summary of the module notes instead (c0_ptr -> P, final_ptr -> S; no y, C, D, z).
    #
    # Time is walked in chunks of T steps, each in three phases:
    #   A  per-channel math, vectorised over a [T, BLOCK_E] tile (one lane per (t, e)): dt and
    #      dt * u of every modality into this program's scratch;
    #   B  the sequential recurrence over the chunk's steps on the [BLOCK_N, BLOCK_E] state tile:
    #      per state only exp2, the update and the y product; the ungated y sums go to scratch;
    #   C  the gate, vectorised again: y = (y_sum + D u) * silu(z).
    # Phases A and C would otherwise run once per step on every lane that shares a channel (8 of
    # them at BLOCK_E 4): softplus and silu cost four special-function ops per channel against the
    # eight exps of the states, and the special-function unit is the kernel's limit.
    # FOLD (kappa > 0): the tile holds S = c / kappa and the exponent carries log2(kappa), so
    # kappa * exp(dt A) * c[t-1] = exp2(dt A log2e + log2 kappa) * S[t-1]: no multiply per state.
    # DT_RANK > 0 (inference): dl_ptr holds Mamba's rank-R dt features (b, M, L, R) and W_ptr the
    # dt projection (M, R, E), float32; phase A forms delta = dt_low @ W itself, so the (b, M, L, E)
    # delta is never written to memory (nor read back).
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    z64 = pid_b * 0     # (z64 + m) * stride: modality offsets in int64
    # scratch of this program, float32: dt and dt * u [M][T][BLOCK_E] each, then the ungated y
    # sums [M][T][BLOCK_E][YP]
    MTE: tl.constexpr = M * T * BLOCK_E
    prog = (pid_b * n_seg + pid_s) * tl.num_programs(0) + pid_e
    s_dt = scr_ptr + prog * ((2 + YP) * MTE)
    s_du = s_dt + MTE
    s_y = s_du + MTE
    # The state tile is [BLOCK_E, BLOCK_N] with n the contiguous axis (A is read as (M, E, N)):
    # Triton then gives each thread a run of consecutive n of one channel (vector loads of A, B,
    # C), so the y sum over n is mostly in-thread adds.
    le = tl.arange(0, BLOCK_E)
    offs_e = pid_e * BLOCK_E + le
    offs_n = tl.arange(0, BLOCK_N)
    me = offs_e < E
    mn = offs_n < N
    m2 = me[:, None] & mn[None, :]
    offs_en = offs_e[:, None] * N + offs_n[None, :]     # A, (M, E, N)
    offs_st = offs_n[None, :] * E + offs_e[:, None]     # states in memory are (.., N, E)
    # B and C rows are loaded in the tile's full shape (each channel row reads the same n): a
    # [1, BLOCK_N] load gets a layout of its own and a conversion per step. No mask when
    # N == BLOCK_N (masks cost a register per element).
    offs_bc = offs_n[None, :] + (offs_e * 0)[:, None]
    if BLOCK_N == N_C:
        mbc = None
        obc = None
    else:
        mbc = mn[None, :] & (offs_e >= 0)[:, None]
        obc = 0.0
    # the chunk tile of phases A and C
    ct = tl.arange(0, T)
    tile = ct[:, None] * BLOCK_E + le[None, :]
    # the y sums of phase B: YP partial sums per channel, each over BLOCK_N // YP states
    cj = tl.arange(0, YP)
    ytile = (ct[:, None, None] * BLOCK_E + le[None, :, None]) * YP + cj[None, None, :]
    ystep = le[:, None] * YP + cj[None, :]
    a0 = _load_a(A_ptr, 0, E, N, offs_en, m2, True)
    a1 = _load_a(A_ptr, 1, E, N, offs_en, m2, M > 1)
    a2 = _load_a(A_ptr, 2, E, N, offs_en, m2, M > 2)
    a3 = _load_a(A_ptr, 3, E, N, offs_en, m2, M > 3)
    NEED_Y: tl.constexpr = not SUMMARY
    BF16_ASM: tl.constexpr = CVT_ASM and B_ptr.dtype.element_ty == tl.bfloat16

    if HAS_C0:
        c = tl.load(c0_ptr + (pid_b * n_seg + pid_s) * E * N + offs_st, mask=m2, other=0.0)
        if FOLD:
            c = c / kappa
    else:
        c = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    p = tl.full([BLOCK_E, BLOCK_N], 1.0, dtype=tl.float32)  # SUMMARY: the product of transitions
    t_lo = pid_s * seg_len
    t_hi = tl.minimum(t_lo + seg_len, L)

    # Software pipelining of B and C (PF_BC, first four modalities): step t + 1's rows are loaded
    # during step t and carried in registers, keeping global-memory latency off the sequential
    # path. Unused slots are dummies.
    zn = tl.zeros([BLOCK_E, BLOCK_N], dtype=tl.float32)
    zr = tl.zeros([BLOCK_E, BLOCK_N], dtype=B_ptr.dtype.element_ty)
    ob = pid_b * sb0 + t_lo * sb2     # B and C rows of step t_lo, modality 0
    oc = pid_b * sc0 + t_lo * sc2
    b0 = zr
    k0 = zr
    b1 = zr
    k1 = zr
    b2 = zr
    k2 = zr
    b3 = zr
    k3 = zr
    if PF_BC:
        b0 = tl.load(B_ptr + ob + offs_bc, mask=mbc, other=obc)
        if NEED_Y:
            k0 = tl.load(C_ptr + oc + offs_bc, mask=mbc, other=obc)
        if M > 1:
            b1 = tl.load(B_ptr + ob + (z64 + 1) * sb1 + offs_bc, mask=mbc, other=obc)
            if NEED_Y:
                k1 = tl.load(C_ptr + oc + (z64 + 1) * sc1 + offs_bc, mask=mbc, other=obc)
        if M > 2:
            b2 = tl.load(B_ptr + ob + (z64 + 2) * sb1 + offs_bc, mask=mbc, other=obc)
            if NEED_Y:
                k2 = tl.load(C_ptr + oc + (z64 + 2) * sc1 + offs_bc, mask=mbc, other=obc)
        if M > 3:
            b3 = tl.load(B_ptr + ob + (z64 + 3) * sb1 + offs_bc, mask=mbc, other=obc)
            if NEED_Y:
                k3 = tl.load(C_ptr + oc + (z64 + 3) * sc1 + offs_bc, mask=mbc, other=obc)

    for t0 in range(t_lo, t_hi, T):
        nt = tl.minimum(t_hi - t0, T)
        mt = (ct < nt)[:, None] & me[None, :]
        # --- A: dt and dt * u for the chunk
        for m in tl.static_range(M):
            tc = t0 + ct
            io_u = (pid_b * su0 + (z64 + m) * su1 + tc * su2)[:, None] + offs_e[None, :]
            if DT_RANK > 0:
                # both factors loaded in the tile's full shape (repeated addresses, L1 hits): 1-D
                # loads would get layouts of their own and a conversion each. A loop, not
                # static_range: unrolled, all M * R loads were issued at once and hoisted out of
                # the chunk loop (sm_90, fp32: 162 -> 233 registers; looped: 168)
                io_l = (pid_b * sd0 + (z64 + m) * sd1 + tc * sd2)[:, None] + (le * 0)[None, :]
                io_w = (ct * 0)[:, None] + (m * DT_RANK * E + offs_e)[None, :]
                x = tl.zeros([T, BLOCK_E], dtype=tl.float32)
                for r in range(DT_RANK):
                    lo = tl.load(dl_ptr + io_l + r, mask=mt, other=0.0).to(tl.float32)
                    wr = tl.load(W_ptr + io_w + r * E, mask=mt, other=0.0)
                    x += lo * wr
            else:
                io_d = (pid_b * sd0 + (z64 + m) * sd1 + tc * sd2)[:, None] + offs_e[None, :]
                x = tl.load(dl_ptr + io_d, mask=mt, other=0.0).to(tl.float32)
            uu = tl.load(u_ptr + io_u, mask=mt, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += tl.load(bias_ptr + m * E + offs_e, mask=me, other=0.0)[None, :]
            if SOFTPLUS:
                # softplus(x) = max(x, 0) + log1p(exp(-|x|)) (torch's, up to round-off); w <= 1,
                # so log1p(w) is log(v) minus the part of w that v = 1 + w rounded away (the /v
                # of the exact correction is < 2x of a term below float32 round-off: dropped)
                w = tl.exp(-tl.abs(x))
                v = 1.0 + w
                dtc = tl.maximum(x, 0.0) + (tl.log(v) - ((v - 1.0) - w))
            else:
                dtc = x
            tl.store(s_dt + m * T * BLOCK_E + tile, dtc)
            tl.store(s_du + m * T * BLOCK_E + tile, dtc * uu)
        # phase B's lanes read what other lanes wrote
        tl.debug_barrier()
        # --- B: the recurrence. Loads are issued ahead of use: B and C of step t + 1 (PF_BC)
        # and dt, dt * u of step t + 1 of the chunk are loaded during step t into slots (first
        # four modalities), and all of a step's loads come before its first store (the compiler
        # keeps loads below an earlier store to the scratch, which may alias).
        q0 = tl.load(s_dt + le)
        w0 = tl.load(s_du + le)
        q1 = q0
        w1 = w0
        q2 = q0
        w2 = w0
        q3 = q0
        w3 = w0
        if M > 1:
            q1 = tl.load(s_dt + T * BLOCK_E + le)
            w1 = tl.load(s_du + T * BLOCK_E + le)
        if M > 2:
            q2 = tl.load(s_dt + 2 * T * BLOCK_E + le)
            w2 = tl.load(s_du + 2 * T * BLOCK_E + le)
        if M > 3:
            q3 = tl.load(s_dt + 3 * T * BLOCK_E + le)
            w3 = tl.load(s_du + 3 * T * BLOCK_E + le)
        for tt in tl.range(0, nt, loop_unroll_factor=UNROLL):
            t = t0 + tt
            if SAVE_CKPT:
                if t % chunk == 0:
                    cs = c * kappa if FOLD else c
                    tl.store(ckpt_ptr + (pid_b * n_ck + t // chunk) * E * N + offs_st, cs, mask=m2)
            tn = tl.minimum(t + 1, t_hi - 1)  # the last step prefetches its own row again
            tq = tl.minimum(tt + 1, nt - 1) * BLOCK_E + le
            # this step's inputs from the slots, the slots refilled with the next step's
            x0 = q0
            v0 = w0
            q0 = tl.load(s_dt + tq)
            w0 = tl.load(s_du + tq)
            x1 = x0
            v1 = v0
            x2 = x0
            v2 = v0
            x3 = x0
            v3 = v0
            if M > 1:
                x1 = q1
                v1 = w1
                q1 = tl.load(s_dt + T * BLOCK_E + tq)
                w1 = tl.load(s_du + T * BLOCK_E + tq)
            if M > 2:
                x2 = q2
                v2 = w2
                q2 = tl.load(s_dt + 2 * T * BLOCK_E + tq)
                w2 = tl.load(s_du + 2 * T * BLOCK_E + tq)
            if M > 3:
                x3 = q3
                v3 = w3
                q3 = tl.load(s_dt + 3 * T * BLOCK_E + tq)
                w3 = tl.load(s_du + 3 * T * BLOCK_E + tq)
            g0 = b0
            h0 = k0
            g1 = b1
            h1 = k1
            g2 = b2
            h2 = k2
            g3 = b3
            h3 = k3
            if PF_BC:
                obn = pid_b * sb0 + tn * sb2
                ocn = pid_b * sc0 + tn * sc2
                b0 = tl.load(B_ptr + obn + offs_bc, mask=mbc, other=obc)
                if NEED_Y:
                    k0 = tl.load(C_ptr + ocn + offs_bc, mask=mbc, other=obc)
                if M > 1:
                    b1 = tl.load(B_ptr + obn + (z64 + 1) * sb1 + offs_bc, mask=mbc, other=obc)
                    if NEED_Y:
                        k1 = tl.load(C_ptr + ocn + (z64 + 1) * sc1 + offs_bc, mask=mbc, other=obc)
                if M > 2:
                    b2 = tl.load(B_ptr + obn + (z64 + 2) * sb1 + offs_bc, mask=mbc, other=obc)
                    if NEED_Y:
                        k2 = tl.load(C_ptr + ocn + (z64 + 2) * sc1 + offs_bc, mask=mbc, other=obc)
                if M > 3:
                    b3 = tl.load(B_ptr + obn + (z64 + 3) * sb1 + offs_bc, mask=mbc, other=obc)
                    if NEED_Y:
                        k3 = tl.load(C_ptr + ocn + (z64 + 3) * sc1 + offs_bc, mask=mbc, other=obc)
            acc = zn
            acc_p = zn
            for m in tl.static_range(M):
                rb = pid_b * sb0 + (z64 + m) * sb1 + t * sb2
                rc = pid_b * sc0 + (z64 + m) * sc1 + t * sc2
                if m < 4:
                    if m == 0:
                        a = a0
                        dtv = x0
                        duv = v0
                        bb = g0
                        cc = h0
                    elif m == 1:
                        a = a1
                        dtv = x1
                        duv = v1
                        bb = g1
                        cc = h1
                    elif m == 2:
                        a = a2
                        dtv = x2
                        duv = v2
                        bb = g2
                        cc = h2
                    else:
                        a = a3
                        dtv = x3
                        duv = v3
                        bb = g3
                        cc = h3
                    if not PF_BC:
                        # B and C not carried: fewer registers, more programs per SM
                        bb = tl.load(B_ptr + rb + offs_bc, mask=mbc, other=obc)
                        cc = bb
                        if NEED_Y:
                            cc = tl.load(C_ptr + rc + offs_bc, mask=mbc, other=obc)
                else:
                    # modalities past four: parameters and inputs at use
                    a = _load_a(A_ptr, m, E, N, offs_en, m2, True)
                    dtv = tl.load(s_dt + (m * T + tt) * BLOCK_E + le)
                    duv = tl.load(s_du + (m * T + tt) * BLOCK_E + le)
                    bb = tl.load(B_ptr + rb + offs_bc, mask=mbc, other=obc)
                    cc = bb
                    if NEED_Y:
                        cc = tl.load(C_ptr + rc + offs_bc, mask=mbc, other=obc)
                arg = dtv[:, None] * a
                if FOLD:
                    arg += log2_kappa
                if FAST_EXP:
                    # ex2.approx.ftz: one MUFU op (plain exp2 may add denormal fix-ups on 3.6)
                    da = tl.inline_asm_elementwise(_EX2, "=f,f", [arg],
                                                   dtype=tl.float32, is_pure=True, pack=1)
                else:
                    da = tl.exp2(arg)
                if BF16_ASM:
                    # bf16 -> float32 is a 16-bit shift: one op per value (Triton's own
                    # conversion spends a PRMT and a shift on every odd element)
                    bbf = tl.inline_asm_elementwise(_BF16X2_F32, "=r,=r,r", [bb], dtype=tl.float32,
                                                    is_pure=True, pack=2)
                else:
                    bbf = bb.to(tl.float32)
                h = da * c + bbf * duv[:, None]
                if m == 0:
                    acc = h
                else:
                    acc += h
                if SUMMARY:
                    if m == 0:
                        acc_p = da
                    else:
                        acc_p += da
                else:
                    if BF16_ASM:
                        ccf = tl.inline_asm_elementwise(_BF16X2_F32, "=r,=r,r", [cc], dtype=tl.float32,
                                                        is_pure=True, pack=2)
                    else:
                        ccf = cc.to(tl.float32)
                    hc = h * ccf
                    if YP == 1:
                        ys = tl.reduce(hc, 1, _SUM)[:, None]
                    else:
                        ys = tl.reduce(tl.reshape(hc, [BLOCK_E, YP, BLOCK_N // YP]), 2, _SUM)
                    tl.store(s_y + (m * T + tt) * BLOCK_E * YP + ystep, ys)
            c = acc if FOLD else acc * kappa
            if SUMMARY:
                p = p * (acc_p if FOLD else acc_p * kappa)
        # phase C reads other lanes' y sums; the next phase A overwrites what B read
        tl.debug_barrier()
        # --- C: skip term and gate, y out
        if NEED_Y:
            for m in tl.static_range(M):
                tc = t0 + ct
                yv = tl.reduce(tl.load(s_y + m * T * BLOCK_E * YP + ytile), 2, _SUM)
                if HAS_D:
                    io_u = (pid_b * su0 + (z64 + m) * su1 + tc * su2)[:, None] + offs_e[None, :]
                    uu = tl.load(u_ptr + io_u, mask=mt, other=0.0).to(tl.float32)
                    yv += tl.load(D_ptr + m * E + offs_e, mask=me, other=0.0)[None, :] * uu
                if HAS_Z:
                    io_z = (pid_b * sz0 + (z64 + m) * sz1 + tc * sz2)[:, None] + offs_e[None, :]
                    zz = tl.load(z_ptr + io_z, mask=mt, other=0.0).to(tl.float32)
                    yv = yv * (zz / (1.0 + tl.exp(-zz)))
                io_y = (pid_b * sy0 + (z64 + m) * sy1 + tc * sy2)[:, None] + offs_e[None, :]
                tl.store(y_ptr + io_y, yv.to(y_ptr.dtype.element_ty), mask=mt)
    if FOLD:
        c = c * kappa
    if SUMMARY:
        out = (pid_b * n_seg + pid_s) * E * N + offs_st
        tl.store(c0_ptr + out, p, mask=m2)
        tl.store(final_ptr + out, c, mask=m2)
    elif pid_s == n_seg - 1:
        tl.store(final_ptr + pid_b * E * N + offs_st, c, mask=m2)


@triton.jit
def _compose(p1, s1, p2, s2):
    # segment 1, then segment 2: c -> p2 * (p1 * c + s1) + s2
    return p1 * p2, s1 * p2 + s2


@triton.jit
def _fwd_combine_kernel(P_ptr, S_ptr, c0_ptr, start_ptr, EN, n_seg,
                        HAS_C0: tl.constexpr, BLOCK: tl.constexpr, NSEG: tl.constexpr):
    # start[0] = c0, start[j + 1] = P[j] * start[j] + S[j]: the summaries of all segments are
    # loaded at once and composed by a parallel scan over segments (a loop over them waited on
    # one load after the other: ~1 us each, tens of us at batch 1 with many segments).
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < EN
    j = tl.arange(0, NSEG)
    base = pid_b * n_seg * EN
    idx = base + j[:, None] * EN + offs[None, :]
    mj = (j < n_seg - 1)[:, None] & mask[None, :]
    p = tl.load(P_ptr + idx, mask=mj, other=1.0)
    s = tl.load(S_ptr + idx, mask=mj, other=0.0)
    pc, sc = tl.associative_scan((p, s), 0, _compose)
    if HAS_C0:
        c = tl.load(c0_ptr + pid_b * EN + offs, mask=mask, other=0.0)
    else:
        c = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(start_ptr + base + offs, c, mask=mask)
    tl.store(start_ptr + idx + EN, pc * c[None, :] + sc, mask=mj)


@triton.jit
def _bwd_seg_kernel(dl_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, P_ptr, R_ptr,
                    L, E, N, seg_len, n_seg, kappa,
                    sd0, sd1, sd2, sz0, sz1, sz2, sc0, sc1, sc2, sy0, sy1, sy2,
                    M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                    SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                    FAST_EXP: tl.constexpr):
    # Segment summary of the adjoint recurrence: R = adjoint at the segment's start given a zero
    # adjoint at its end, P = the segment's transition (the same as the forward's).
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2) + 1  # segment 0 needs no summary
    z64 = pid_b * 0
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    me = offs_e < E
    mn = offs_n < N
    m2 = mn[:, None] & me[None, :]
    offs_ne = offs_n[:, None] * E + offs_e[None, :]
    a0 = _load_a(A_ptr, 0, E, N, offs_ne, m2, True)
    a1 = _load_a(A_ptr, 1, E, N, offs_ne, m2, M > 1)
    a2 = _load_a(A_ptr, 2, E, N, offs_ne, m2, M > 2)
    a3 = _load_a(A_ptr, 3, E, N, offs_ne, m2, M > 3)
    q0 = _load_vec(bias_ptr, 0, E, offs_e, me, HAS_BIAS)
    q1 = _load_vec(bias_ptr, 1, E, offs_e, me, HAS_BIAS and M > 1)
    q2 = _load_vec(bias_ptr, 2, E, offs_e, me, HAS_BIAS and M > 2)
    q3 = _load_vec(bias_ptr, 3, E, offs_e, me, HAS_BIAS and M > 3)

    g = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    p = tl.full([BLOCK_N, BLOCK_E], 1.0, dtype=tl.float32)
    t_lo = pid_s * seg_len
    t_hi = tl.minimum(t_lo + seg_len, L)
    for tt in range(t_hi - t_lo):
        t = t_hi - 1 - tt
        acc_g = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
        acc_p = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
        kg = kappa * g
        for m in tl.static_range(M):
            mm = z64 + m
            if m == 0:
                a = a0
                qm = q0
            elif m == 1:
                a = a1
                qm = q1
            elif m == 2:
                a = a2
                qm = q2
            elif m == 3:
                a = a3
                qm = q3
            else:
                a = _load_a(A_ptr, m, E, N, offs_ne, m2, True)
                qm = _load_vec(bias_ptr, m, E, offs_e, me, HAS_BIAS)
            x = tl.load(dl_ptr + pid_b * sd0 + mm * sd1 + t * sd2 + offs_e, mask=me, other=0.0).to(tl.float32)
            if HAS_BIAS:
                x += qm
            if SOFTPLUS:
                w = tl.exp(tl.minimum(x, 20.0))
                v = 1.0 + w
                dt = tl.where(x > 20.0, x, tl.log(v) - ((v - 1.0) - w) / v)
            else:
                dt = x
            dyr = tl.load(dy_ptr + pid_b * sy0 + mm * sy1 + t * sy2 + offs_e, mask=me, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + pid_b * sz0 + mm * sz1 + t * sz2 + offs_e, mask=me, other=0.0).to(tl.float32)
                dyr = dyr * (zz * (1.0 / (1.0 + tl.exp(-zz))))
            cc = tl.load(C_ptr + pid_b * sc0 + mm * sc1 + t * sc2 + offs_n, mask=mn, other=0.0).to(tl.float32)
            if FAST_EXP:
                da = tl.inline_asm_elementwise(_EX2, "=f,f", [dt[None, :] * a], dtype=tl.float32,
                                               is_pure=True, pack=1)
            else:
                if FAST_EXP:
                    da = tl.inline_asm_elementwise(_EX2, "=f,f", [dt[None, :] * a], dtype=tl.float32,
                                                   is_pure=True, pack=1)
                else:
                    da = tl.exp2(dt[None, :] * a)
            acc_g += da * (cc[:, None] * dyr[None, :] + kg)
            acc_p += da
        g = acc_g
        p = p * (acc_p * kappa)
    out = (pid_b * n_seg + pid_s) * E * N + offs_ne
    tl.store(P_ptr + out, p, mask=m2)
    tl.store(R_ptr + out, g, mask=m2)


@triton.jit
def _bwd_combine_kernel(P_ptr, R_ptr, gL_ptr, G_ptr, EN, n_seg,
                        HAS_GL: tl.constexpr, BLOCK: tl.constexpr, NSEG: tl.constexpr):
    # In reverse: G[last] = d final_state, G[j - 1] = P[j] * G[j] + R[j]; as the forward's
    # combine, all at once: row r holds segment j = n_seg - 1 - r, composed by a parallel scan.
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < EN
    r = tl.arange(0, NSEG)
    base = pid_b * n_seg * EN
    idx = base + (n_seg - 1 - r)[:, None] * EN + offs[None, :]
    mr = (r < n_seg - 1)[:, None] & mask[None, :]
    p = tl.load(P_ptr + idx, mask=mr, other=1.0)
    q = tl.load(R_ptr + idx, mask=mr, other=0.0)
    pc, qc = tl.associative_scan((p, q), 0, _compose)
    if HAS_GL:
        g = tl.load(gL_ptr + pid_b * EN + offs, mask=mask, other=0.0)
    else:
        g = tl.zeros([BLOCK], dtype=tl.float32)
    tl.store(G_ptr + base + (n_seg - 1) * EN + offs, g, mask=mask)
    tl.store(G_ptr + idx - EN, pc * g[None, :] + qc, mask=mr)


@triton.jit
def _bwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr,
                ckpt_ptr, g_ptr, scr_ptr,
                du_ptr, ddl_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dinit_ptr,
                L, E, N, seg_len, n_seg, chunk, n_ck, n_eblk, n_rows, kappa,
                su0, su1, su2, sd0, sd1, sd2, sz0, sz1, sz2, sb0, sb1, sb2, sc0, sc1, sc2,
                sy0, sy1, sy2, so0, so1, so2, sg0, sg1, sg2,
                M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_G: tl.constexpr, NEED_DB: tl.constexpr,
                NEED_DC: tl.constexpr, NEED_DINIT: tl.constexpr,
                DETERMINISTIC: tl.constexpr, FAST_EXP: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    z64 = pid_b * 0
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    me = offs_e < E
    mn = offs_n < N
    m2 = mn[:, None] & me[None, :]
    offs_ne = offs_n[:, None] * E + offs_e[None, :]
    TILE: tl.constexpr = BLOCK_E * BLOCK_N
    # this program's scratch: chunk x (BLOCK_N x BLOCK_E) float32 states, padded, unmasked
    scr = scr_ptr + ((pid_b * n_seg + pid_s) * n_eblk + pid_e) * chunk * TILE
    scr_off = tl.arange(0, BLOCK_N)[:, None] * BLOCK_E + tl.arange(0, BLOCK_E)[None, :]
    a0 = _load_a(A_ptr, 0, E, N, offs_ne, m2, True)
    a1 = _load_a(A_ptr, 1, E, N, offs_ne, m2, M > 1)
    a2 = _load_a(A_ptr, 2, E, N, offs_ne, m2, M > 2)
    a3 = _load_a(A_ptr, 3, E, N, offs_ne, m2, M > 3)
    d0 = _load_vec(D_ptr, 0, E, offs_e, me, HAS_D)
    d1 = _load_vec(D_ptr, 1, E, offs_e, me, HAS_D and M > 1)
    d2 = _load_vec(D_ptr, 2, E, offs_e, me, HAS_D and M > 2)
    d3 = _load_vec(D_ptr, 3, E, offs_e, me, HAS_D and M > 3)
    q0 = _load_vec(bias_ptr, 0, E, offs_e, me, HAS_BIAS)
    q1 = _load_vec(bias_ptr, 1, E, offs_e, me, HAS_BIAS and M > 1)
    q2 = _load_vec(bias_ptr, 2, E, offs_e, me, HAS_BIAS and M > 2)
    q3 = _load_vec(bias_ptr, 3, E, offs_e, me, HAS_BIAS and M > 3)
    if DETERMINISTIC:
        # per-E-block partials (n_eblk, batch, M, L, N), summed on the host
        dB_base = dB_ptr + pid_e.to(tl.int64) * n_rows * N
        dC_base = dC_ptr + pid_e.to(tl.int64) * n_rows * N
    else:
        dB_base = dB_ptr
        dC_base = dC_ptr

    # Per-modality gradient accumulators over this program's time range: the first four in
    # registers; later modalities read-modify-write their own slice of the zeroed partials.
    ga0 = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
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
    part = (pid_b * n_seg + pid_s) * M  # this program's row in the (batch*n_seg, M, ...) partials

    if HAS_G:
        g = tl.load(g_ptr + (pid_b * n_seg + pid_s) * E * N + offs_ne, mask=m2, other=0.0)
    else:
        g = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    t_lo = pid_s * seg_len  # a multiple of chunk
    t_hi = tl.minimum(t_lo + seg_len, L)
    n_sub = tl.cdiv(t_hi - t_lo, chunk)
    for kk in range(n_sub):
        k = n_sub - 1 - kk
        t0 = t_lo + k * chunk
        t1 = tl.minimum(t0 + chunk, t_hi)
        # 1) recompute the chunk's states c[t-1], t0 <= t < t1, from its checkpoint into scratch
        c = tl.load(ckpt_ptr + (pid_b * n_ck + t0 // chunk) * E * N + offs_ne, mask=m2, other=0.0)
        tl.store(scr + scr_off, c)
        for t in range(t0, t1 - 1):
            acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
            for m in tl.static_range(M):
                mm = z64 + m
                if m == 0:
                    a = a0
                    qm = q0
                elif m == 1:
                    a = a1
                    qm = q1
                elif m == 2:
                    a = a2
                    qm = q2
                elif m == 3:
                    a = a3
                    qm = q3
                else:
                    a = _load_a(A_ptr, m, E, N, offs_ne, m2, True)
                    qm = _load_vec(bias_ptr, m, E, offs_e, me, HAS_BIAS)
                u = tl.load(u_ptr + pid_b * su0 + mm * su1 + t * su2 + offs_e, mask=me, other=0.0).to(tl.float32)
                x = tl.load(dl_ptr + pid_b * sd0 + mm * sd1 + t * sd2 + offs_e, mask=me, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    x += qm
                if SOFTPLUS:
                    w = tl.exp(tl.minimum(x, 20.0))
                    v = 1.0 + w
                    dt = tl.where(x > 20.0, x, tl.log(v) - ((v - 1.0) - w) / v)
                else:
                    dt = x
                bb = tl.load(B_ptr + pid_b * sb0 + mm * sb1 + t * sb2 + offs_n, mask=mn, other=0.0).to(tl.float32)
                if FAST_EXP:
                    ea = tl.inline_asm_elementwise(_EX2, "=f,f", [dt[None, :] * a], dtype=tl.float32,
                                                   is_pure=True, pack=1)
                else:
                    ea = tl.exp2(dt[None, :] * a)
                acc += ea * c + bb[:, None] * (dt * u)[None, :]
            c = acc * kappa
            tl.store(scr + (t + 1 - t0) * TILE + scr_off, c)
        # threads may read back elements that other threads wrote: make the writes visible
        tl.debug_barrier()
        # 2) walk the chunk in reverse
        for tt in range(t1 - t0):
            t = t1 - 1 - tt
            cp = tl.load(scr + (t - t0) * TILE + scr_off)
            kg = kappa * g
            gn = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
            for m in tl.static_range(M):
                mm = z64 + m
                if m == 0:
                    a = a0
                    dm = d0
                    qm = q0
                elif m == 1:
                    a = a1
                    dm = d1
                    qm = q1
                elif m == 2:
                    a = a2
                    dm = d2
                    qm = q2
                elif m == 3:
                    a = a3
                    dm = d3
                    qm = q3
                else:
                    a = _load_a(A_ptr, m, E, N, offs_ne, m2, True)
                    dm = _load_vec(D_ptr, m, E, offs_e, me, HAS_D)
                    qm = _load_vec(bias_ptr, m, E, offs_e, me, HAS_BIAS)
                u = tl.load(u_ptr + pid_b * su0 + mm * su1 + t * su2 + offs_e, mask=me, other=0.0).to(tl.float32)
                x = tl.load(dl_ptr + pid_b * sd0 + mm * sd1 + t * sd2 + offs_e, mask=me, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    x += qm
                if SOFTPLUS:
                    w = tl.exp(tl.minimum(x, 20.0))
                    v = 1.0 + w
                    dt = tl.where(x > 20.0, x, tl.log(v) - ((v - 1.0) - w) / v)
                else:
                    dt = x
                bb = tl.load(B_ptr + pid_b * sb0 + mm * sb1 + t * sb2 + offs_n, mask=mn, other=0.0).to(tl.float32)
                cc = tl.load(C_ptr + pid_b * sc0 + mm * sc1 + t * sc2 + offs_n, mask=mn, other=0.0).to(tl.float32)
                ro = pid_b * so0 + mm * so1 + t * so2      # du, d delta, dz
                rg = pid_b * sg0 + mm * sg1 + t * sg2      # dB, dC
                dy = tl.load(dy_ptr + pid_b * sy0 + mm * sy1 + t * sy2 + offs_e, mask=me, other=0.0).to(tl.float32)
                if FAST_EXP:
                    da = tl.inline_asm_elementwise(_EX2, "=f,f", [dt[None, :] * a], dtype=tl.float32,
                                                   is_pure=True, pack=1)
                else:
                    da = tl.exp2(dt[None, :] * a)
                xu = dt * u
                h = da * cp + bb[:, None] * xu[None, :]
                if HAS_Z:
                    zz = tl.load(z_ptr + pid_b * sz0 + mm * sz1 + t * sz2 + offs_e, mask=me, other=0.0).to(tl.float32)
                    sz = (1.0 / (1.0 + tl.exp(-zz)))
                    yraw = tl.reduce(h * cc[:, None], 0, _SUM)
                    if HAS_D:
                        yraw += dm * u
                    dz = dy * yraw * (sz * (1.0 + zz * (1.0 - sz)))
                    tl.store(dz_ptr + ro + offs_e, dz.to(dz_ptr.dtype.element_ty), mask=me)
                    dyr = dy * (zz * sz)
                else:
                    dyr = dy
                dh = cc[:, None] * dyr[None, :] + kg
                dhda = dh * da
                gn += dhda
                wc = dhda * cp
                s1 = tl.reduce(dh * bb[:, None], 0, _SUM)
                ddt = tl.reduce(wc * a, 0, _SUM) * _LN2 + u * s1
                du = dt * s1
                if HAS_D:
                    du += dyr * dm
                if SOFTPLUS:
                    ddt = ddt * tl.where(x > 20.0, 1.0, w / v)  # softplus' = sigmoid = w / (1 + w)
                tl.store(du_ptr + ro + offs_e, du.to(du_ptr.dtype.element_ty), mask=me)
                tl.store(ddl_ptr + ro + offs_e, ddt.to(ddl_ptr.dtype.element_ty), mask=me)
                gA = wc * dt[None, :]
                gD = dyr * u
                if m == 0:
                    ga0 += gA
                    gd0 += gD
                    gq0 += ddt
                elif m == 1:
                    ga1 += gA
                    gd1 += gD
                    gq1 += ddt
                elif m == 2:
                    ga2 += gA
                    gd2 += gD
                    gq2 += ddt
                elif m == 3:
                    ga3 += gA
                    gd3 += gD
                    gq3 += ddt
                else:
                    pa = dA_ptr + (part + m) * E * N + offs_ne
                    tl.store(pa, tl.load(pa, mask=m2, other=0.0) + gA, mask=m2)
                    pd = dD_ptr + (part + m) * E + offs_e
                    tl.store(pd, tl.load(pd, mask=me, other=0.0) + gD, mask=me)
                    pq = dbias_ptr + (part + m) * E + offs_e
                    tl.store(pq, tl.load(pq, mask=me, other=0.0) + ddt, mask=me)
                if NEED_DB:
                    db = tl.reduce(dh * xu[None, :], 1, _SUM)
                    if DETERMINISTIC:
                        tl.store(dB_base + rg + offs_n, db, mask=mn)
                    else:
                        tl.atomic_add(dB_base + rg + offs_n, db, mask=mn, sem="relaxed")
                if NEED_DC:
                    dc = tl.reduce(dyr[None, :] * h, 1, _SUM)
                    if DETERMINISTIC:
                        tl.store(dC_base + rg + offs_n, dc, mask=mn)
                    else:
                        tl.atomic_add(dC_base + rg + offs_n, dc, mask=mn, sem="relaxed")
            g = gn
        # the next chunk overwrites scratch that other threads may still be reading
        tl.debug_barrier()
    if NEED_DINIT:
        if pid_s == 0:
            tl.store(dinit_ptr + pid_b * E * N + offs_ne, g, mask=m2)
    for m in tl.static_range(M):
        if m == 0:
            ga = ga0
            gd = gd0
            gq = gq0
        elif m == 1:
            ga = ga1
            gd = gd1
            gq = gq1
        elif m == 2:
            ga = ga2
            gd = gd2
            gq = gq2
        else:
            ga = ga3
            gd = gd3
            gq = gq3
        if m < 4:
            tl.store(dA_ptr + (part + m) * E * N + offs_ne, ga, mask=m2)
            tl.store(dD_ptr + (part + m) * E + offs_e, gd, mask=me)
            tl.store(dbias_ptr + (part + m) * E + offs_e, gq, mask=me)


# ---------------------------------------------------------------------------------------------
# launch planning
# ---------------------------------------------------------------------------------------------

# Overrides for the heuristics below (tests force small blocks and several segments; benchmarks
# sweep). Keys (bwd_* for the backward): block_e, num_warps, maxnreg, n_seg, min_seg; forward only:
# fast_exp, pf_bc, chunk_t, y_parts, cvt_asm, unroll; chunk; deterministic.
_KEYS = ("block_e", "num_warps", "maxnreg", "n_seg", "min_seg", "fast_exp", "pf_bc", "chunk_t", "y_parts",
         "cvt_asm", "unroll",
         "bwd_block_e", "bwd_num_warps",
         "bwd_maxnreg", "bwd_n_seg", "bwd_min_seg", "chunk", "deterministic")
_OVERRIDES: dict = {}


@contextlib.contextmanager
def tuning(**kw):
    """Temporarily override launch parameters, e.g. `with tuning(block_e=8, n_seg=3): ...`."""
    bad = set(kw) - set(_KEYS)
    if bad:
        raise ValueError(f"tuning: unknown keys {sorted(bad)}; known: {', '.join(_KEYS)}")
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
    maxnreg: int | None
    n_seg: int
    seg_len: int
    fast_exp: bool = False
    pf_bc: bool = False
    chunk_t: int = 64
    y_parts: int = 1
    cvt_asm: bool = False
    unroll: int = 1

    def launch_opts(self):
        opts = {"num_warps": self.num_warps}
        if self.maxnreg and not _interpreting():
            opts["maxnreg"] = self.maxnreg
        return opts


# Resident warps per SM the planner aims to fill before it splits time into segments (sm_90, M=3,
# N=64: forward ~96-127 registers/thread -> 16-21 one-warp programs; backward: 8, the value its
# segment counts were measured with).
_WARPS_PER_SM = {False: 21, True: 8}
# Shortest segment (steps) the planner makes when it splits time (tuning keys min_seg, bwd_min_seg).
_MIN_SEG = 64


def _plan(batch, M, L, E, N, device, *, bwd, chunk=1, elem_size=4):
    """Block sizes and time segmentation.

    Forward: one warp per program on a [BLOCK_E, BLOCK_N] tile, n the contiguous axis. Triton
    gives each thread one 16-byte vector of n (4 states at float32, 8 at 16-bit activations, as
    the B/C loads are vectorised) and spreads the rest of n over lanes; BLOCK_E is chosen so that
    the remaining lanes cover one channel each (2 at float32, 4 at bfloat16 for N = 64): every
    thread then owns states of ONE channel, loads B/C once, and the y sum is in-thread adds plus
    a few shuffles. Measured on H100 (Triton 3.6, paper shape 64 x 3 x 500 x 256 x 64): float32
    BLOCK_E 2 1.57 ms (1.46 with 64-step chunks), 4 1.63, 1 2.04, 8 1.90; bfloat16 4 1.30, 2
    1.56, 8 1.92; B/C prefetch off 1.78-2.12 (fewer registers, but the loads' latency shows).
    Backward: BLOCK_N x BLOCK_E = 512 elements on one warp (16 per thread), lanes along e.
    Measured on H100 (forward + backward): 64x500 fp32 14.0 ms (2048 elements on 8 warps, the
    previous default: 22.9), bf16 14.7 (22.9); 4x8192 fp32 20.2 (34.6); 1x16384 fp32 8.8 (14.1)."""
    pre = "bwd_" if bwd else ""
    block_n = _pow2(N)
    gpu = device.type == "cuda" and not _interpreting()
    if gpu and not bwd:
        vec = max(1, 16 // int(elem_size))    # states per thread along n (one vector load)
        block_e = max(1, min(_pow2(E), 32, 32 * vec // block_n))
    elif gpu:
        block_e = max(1, min(_pow2(E), 128, 512 // block_n))
    else:
        # The interpreter's cost is per program and per op, not per element: few large programs.
        block_e = min(_pow2(E), 32)
    block_e = int(_OVERRIDES.get(pre + "block_e", block_e))
    if bwd and gpu:
        num_warps = max(1, min(8, block_e * block_n // 512))
    elif bwd:
        num_warps = max(1, min(8, block_e * block_n // 256))
    else:
        num_warps = 1 if gpu else max(1, min(8, block_e * block_n // 256))
    num_warps = int(_OVERRIDES.get(pre + "num_warps", num_warps))
    maxnreg = None
    maxnreg = _OVERRIDES.get(pre + "maxnreg", maxnreg) or None  # override 0: no cap
    n_seg = 1
    if gpu:
        threads = batch * (-(-E // block_e)) * num_warps * 32
        target = (torch.cuda.get_device_properties(device).multi_processor_count
                  * _WARPS_PER_SM[bwd] * 32)
        # Segments double the exp work (a summary pass, then the real one): worth it only when
        # the (batch, E-block) grid fills under half the GPU; then aim at ~2 waves.
        if 2 * threads < target:
            min_seg = int(_OVERRIDES.get(pre + "min_seg", _MIN_SEG))
            n_seg = max(1, min(-(-2 * target // threads), L // min_seg))
    n_seg = int(_OVERRIDES.get(pre + "n_seg", n_seg))
    n_seg = max(1, min(n_seg, L))
    seg_len = -(-L // n_seg)
    seg_len = -(-seg_len // chunk) * chunk  # backward segments start on checkpoints
    n_seg = -(-L // seg_len)
    fast_exp = bool(_OVERRIDES.get("fast_exp", gpu)) and not _interpreting()
    pf_bc = bool(_OVERRIDES.get("pf_bc", True))
    # forward: steps per chunk of the vectorised phases (a power of two)
    chunk_t = _pow2(int(_OVERRIDES.get("chunk_t", 64)))
    # the chunk phases' scratch is per program x chunk_t steps: no more steps than a segment has
    chunk_t = min(chunk_t, _pow2(seg_len))
    # forward: partial y sums per channel left for the vectorised phase (power of two)
    y_parts = _pow2(int(_OVERRIDES.get("y_parts", 1)))
    # forward: bfloat16 B and C widened by inline PTX (GPU only: the interpreter runs no asm). Off by
    # default until timed on a GPU (sm_90 SASS of the step loop: 13.3 -> 12.6 instructions per exp2)
    cvt_asm = bool(_OVERRIDES.get("cvt_asm", False)) and gpu
    # forward: the step loop unrolled by the compiler (2: the values carried a step ahead need no
    # register moves; costs registers)
    unroll = int(_OVERRIDES.get("unroll", 1))
    return _Plan(block_e, block_n, num_warps, maxnreg, n_seg, seg_len, fast_exp, pf_bc, chunk_t,
                 y_parts, cvt_asm, unroll)


def _combine_tile(n_seg):
    """(NSEG, BLOCK) of the segment combine kernels: the n_seg - 1 summaries padded to a power of two,
    NSEG x BLOCK of them in registers at once (the AOT generator compiles the same tiles)."""
    nseg = _pow2(n_seg - 1)
    return nseg, max(16, min(1024, 4096 // nseg))


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


def _t(x):
    # (.., E, N) <-> (.., N, E). Every state-shaped buffer the kernels touch is (N, E): e is the
    # contiguous axis, which makes Triton lay the tile's threads along e (see the kernels' notes).
    return x.transpose(-1, -2).contiguous() if x is not None else None


def _rows(x):
    """Element strides of a (batch, M, L, K) tensor's first three axes (its last axis has stride
    1): the kernels take every activation by strides, so views (a modality-major layout, a slice
    of a wider projection) need no copy."""
    return (x.stride(0), x.stride(1), x.stride(2))


def _unit_last(x):
    # the kernels step along the last axis with stride 1
    if x is None or x.shape[-1] <= 1 or x.stride(-1) == 1:
        return x
    return x.contiguous()


def _dense_like(x, dtype=None):
    """An empty tensor shaped like x, with x's axis order when x is dense (a permuted contiguous
    tensor), else contiguous: outputs then follow the layout of the inputs."""
    return torch.empty_like(x, dtype=dtype, memory_format=torch.preserve_format)


def _forward(u, delta, A, B, C, D, z, delta_bias, init_t, softplus, kappa, save, chunk=None, y_out=None,
             dt_w=None):
    """A: (M, E, N) contiguous; init_t: initial_state as (batch, N, E). Returns y, final (batch, N, E)
    and, when save, the checkpoints (batch, ceil(L / chunk), N, E). dt_w (M, R, E) float32: delta
    is then (batch, M, L, R) and the kernel computes delta @ dt_w (no backward)."""
    batch, M, L, E = u.shape
    N = A.shape[2]
    dev = u.device
    p = _plan(batch, M, L, E, N, dev, bwd=False, elem_size=u.element_size())
    n_eblk = -(-E // p.block_e)
    y = _dense_like(u) if y_out is None else y_out
    final = torch.empty(batch, N, E, device=dev, dtype=torch.float32)
    if save:
        n_ck = -(-L // chunk)
        ckpt = torch.empty(batch, n_ck, N, E, device=dev, dtype=torch.float32)
    else:
        n_ck, chunk = 1, 1
        ckpt = final  # never touched (SAVE_CKPT off)
    fold = kappa > 0.0
    yp = min(p.y_parts, p.block_n)
    meta = dict(M=M, BLOCK_E=p.block_e, BLOCK_N=p.block_n, T=p.chunk_t, SOFTPLUS=softplus,
                FAST_EXP=p.fast_exp, PF_BC=p.pf_bc, FOLD=fold, YP=yp, N_C=N,
                DT_RANK=dt_w.shape[1] if dt_w is not None else 0, CVT_ASM=p.cvt_asm, UNROLL=p.unroll,
                **p.launch_opts())
    log2_kappa = math.log2(kappa) if fold else 0.0
    # per-program scratch of the chunk phases (see _fwd_kernel): (2 + YP) x M x T x BLOCK_E
    scratch = torch.empty(n_eblk * batch * p.n_seg * (2 + yp) * M * p.chunk_t * p.block_e,
                          device=dev, dtype=torch.float32)
    dummy = A
    c0 = init_t
    if p.n_seg > 1:
        grid = (n_eblk, batch, p.n_seg - 1)
        P = torch.empty(batch, p.n_seg, N, E, device=dev, dtype=torch.float32)
        S = torch.empty_like(P)
        # segment summaries: the same kernel in SUMMARY mode (P into c0_ptr, S into final_ptr)
        _fwd_kernel[grid](u, delta, A, B, B, dummy, u,
                          delta_bias if delta_bias is not None else dummy,
                          dt_w if dt_w is not None else dummy,
                          u, P, ckpt, S, scratch, L, E, N, p.seg_len, p.n_seg, 1, 1, kappa,
                          log2_kappa, *_rows(u), *_rows(delta), *_rows(u), *_rows(B), *_rows(B),
                          *_rows(u),
                          HAS_D=False, HAS_Z=False, HAS_BIAS=delta_bias is not None,
                          HAS_C0=False, SAVE_CKPT=False, SUMMARY=True, **meta)
        c0 = torch.empty_like(P)
        nseg, BLK = _combine_tile(p.n_seg)
        _fwd_combine_kernel[(triton.cdiv(E * N, BLK), batch)](
            P, S, init_t if init_t is not None else dummy, c0, E * N, p.n_seg,
            HAS_C0=init_t is not None, BLOCK=BLK, NSEG=nseg, num_warps=4)
        del P, S
    _fwd_kernel[(n_eblk, batch, p.n_seg)](
        u, delta, A, B, C,
        D if D is not None else dummy, z if z is not None else u,
        delta_bias if delta_bias is not None else dummy,
        dt_w if dt_w is not None else dummy,
        y, c0 if c0 is not None else dummy, ckpt, final, scratch,
        L, E, N, p.seg_len, p.n_seg, chunk, n_ck, kappa, log2_kappa,
        *_rows(u), *_rows(delta), *_rows(z if z is not None else u), *_rows(B), *_rows(C), *_rows(y),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_C0=c0 is not None, SAVE_CKPT=save, SUMMARY=False, **meta)
    return y, final, (ckpt if save else None)


def _backward(saved, softplus, kappa, chunk, need, dy, dfinal_t):
    """Gradients of _forward(save=True): saved = (u, delta, A, B, C, D, z, delta_bias, ckpt) as the
    forward took them, need = which of (u, delta, A, B, C, D, z, delta_bias, init_t) want one,
    dfinal_t the final state's gradient as (batch, N, E). Returns the 9 gradients (None where not
    needed); the initial state's as (batch, N, E), like init_t."""
    u, delta, A, B, C, D, z, delta_bias, ckpt = saved
    At = _t(A)
    batch, M, L, E = u.shape
    N = At.shape[1]
    dev = u.device
    p = _plan(batch, M, L, E, N, dev, bwd=True, chunk=chunk)
    n_eblk = -(-E // p.block_e)
    f32 = torch.float32
    dy = torch.zeros_like(u) if dy is None else _unit_last(dy)
    dfinal = dfinal_t.float().contiguous() if dfinal_t is not None else None
    det = _deterministic()
    dummy = At
    meta = dict(M=M, BLOCK_E=p.block_e, BLOCK_N=p.block_n, SOFTPLUS=softplus, FAST_EXP=p.fast_exp,
                **p.launch_opts())

    g = dfinal
    if p.n_seg > 1:
        P = torch.empty(batch, p.n_seg, N, E, device=dev, dtype=f32)
        R = torch.empty_like(P)
        _bwd_seg_kernel[(n_eblk, batch, p.n_seg - 1)](
            delta, At, C, z if z is not None else u,
            delta_bias if delta_bias is not None else dummy, dy, P, R,
            L, E, N, p.seg_len, p.n_seg, kappa,
            *_rows(delta), *_rows(z if z is not None else u), *_rows(C), *_rows(dy),
            HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, **meta)
        g = torch.empty_like(P)
        nseg, BLK = _combine_tile(p.n_seg)
        _bwd_combine_kernel[(triton.cdiv(E * N, BLK), batch)](
            P, R, dfinal if dfinal is not None else dummy, g, E * N, p.n_seg,
            HAS_GL=dfinal is not None, BLOCK=BLK, NSEG=nseg, num_warps=4)
        del P, R

    # du, d delta and dz share one layout in the kernel: u's (or contiguous)
    du = _dense_like(u)
    ddelta = torch.empty_like(du, dtype=delta.dtype)
    dz = torch.empty_like(du, dtype=z.dtype) if z is not None else None
    need_db, need_dc = need[3], need[4]
    rows = batch * M * L
    if det:
        dB = torch.empty(n_eblk, batch, M, L, N, device=dev, dtype=f32) if need_db else None
        dC = torch.empty(n_eblk, batch, M, L, N, device=dev, dtype=f32) if need_dc else None
    else:
        dB = torch.zeros(batch, M, L, N, device=dev, dtype=f32) if need_db else None
        dC = torch.zeros(batch, M, L, N, device=dev, dtype=f32) if need_dc else None
    parts = batch * p.n_seg
    dA = torch.zeros(parts, M, N, E, device=dev, dtype=f32)
    dD = torch.zeros(parts, M, E, device=dev, dtype=f32)
    dbias = torch.zeros(parts, M, E, device=dev, dtype=f32)
    need_dinit = need[8]
    dinit = torch.empty(batch, N, E, device=dev, dtype=f32) if need_dinit else None
    scratch = torch.empty(batch * p.n_seg * n_eblk * chunk * p.block_e * p.block_n,
                          device=dev, dtype=f32)
    _bwd_kernel[(n_eblk, batch, p.n_seg)](
        u, delta, At, B, C, D if D is not None else dummy, z if z is not None else u,
        delta_bias if delta_bias is not None else dummy, dy,
        ckpt, g if g is not None else dummy, scratch,
        du, ddelta, dz if dz is not None else du,
        dB if dB is not None else dummy, dC if dC is not None else dummy,
        dA, dD, dbias, dinit if dinit is not None else dummy,
        L, E, N, p.seg_len, p.n_seg, chunk, ckpt.shape[1], n_eblk, rows, kappa,
        *_rows(u), *_rows(delta), *_rows(z if z is not None else u), *_rows(B), *_rows(C),
        *_rows(dy), *_rows(du), M * L * N, L * N, N,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_G=g is not None, NEED_DB=need_db, NEED_DC=need_dc,
        NEED_DINIT=need_dinit, DETERMINISTIC=det, **meta)
    del scratch
    if det:
        dB = dB.sum(0) if dB is not None else None
        dC = dC.sum(0) if dC is not None else None
    return (du if need[0] else None,
            ddelta if need[1] else None,
            _t(dA.sum(0)) if need[2] else None,
            dB.to(B.dtype) if dB is not None else None,
            dC.to(C.dtype) if dC is not None else None,
            dD.sum(0) if need[5] else None,
            dz if need[6] else None,
            dbias.sum(0) if need[7] else None,
            dinit)


def _train_chunk(u, A):
    """Checkpoint spacing of a forward that saves for the backward (from the shapes only)."""
    batch, M, L, E = u.shape
    return _chunk_for(L, _plan(batch, M, L, E, A.shape[2], u.device, bwd=True).n_seg)


class _CoupledScanFn(torch.autograd.Function):
    """Eager autograd (no dispatcher overhead: the compiled path below costs ~10-20 us a call)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, init_t, softplus, kappa):
        chunk = _train_chunk(u, A)
        y, final, ckpt = _forward(u, delta, A, B, C, D, z, delta_bias, init_t,
                                  softplus, kappa, save=True, chunk=chunk)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.softplus, ctx.kappa, ctx.chunk = softplus, kappa, chunk
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dfinal_t):
        grads = _backward(ctx.saved_tensors, ctx.softplus, ctx.kappa, ctx.chunk,
                          ctx.needs_input_grad, dy, dfinal_t)
        return (*grads, None, None)


# ---------------------------------------------------------------------------------------------
# torch.compile: the kernels as two opaque custom ops (cm_deploy::coupled_scan_fwd / _bwd) with
# fake (shape) functions and an autograd formula, so a compiled model is one graph, training
# included (fullgraph=True, mode="reduce-overhead" captures the scan in its CUDA graph). Inductor
# does not see into them: it neither recompiles nor re-tunes the kernels.
# ---------------------------------------------------------------------------------------------
_Opt = Optional[torch.Tensor]


@torch.library.custom_op("cm_deploy::coupled_scan_fwd", mutates_args=())
def _scan_fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor, D: _Opt, z: _Opt, delta_bias: _Opt, init_t: _Opt, dt_w: _Opt,
                 softplus: bool, kappa: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, final (batch, N, E) and, when chunk > 0, the backward's checkpoints (else empty)."""
    y, final, ckpt = _forward(u, delta, A, B, C, D, z, delta_bias, init_t, softplus, kappa,
                              save=chunk > 0, chunk=chunk or None, dt_w=dt_w)
    return y, final, ckpt if chunk > 0 else final.new_empty(0)


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, init_t, dt_w, softplus, kappa, chunk):
    batch, M, L, E = u.shape
    N = A.shape[2]
    final = u.new_empty(batch, N, E, dtype=torch.float32)
    ckpt = (u.new_empty(batch, -(-L // chunk), N, E, dtype=torch.float32) if chunk > 0
            else final.new_empty(0))
    return _dense_like(u), final, ckpt


_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "init_t")


@torch.library.custom_op("cm_deploy::coupled_scan_bwd", mutates_args=())
def _scan_bwd_op(dy: _Opt, dfinal_t: _Opt, u: torch.Tensor, delta: torch.Tensor,
                 A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: _Opt, z: _Opt,
                 delta_bias: _Opt, ckpt: torch.Tensor, softplus: bool, kappa: float, chunk: int,
                 need: list[bool]) -> list[torch.Tensor]:
    """The 9 gradients of coupled_scan_fwd's tensor inputs; empty where `need` is False."""
    grads = _backward((u, delta, A, B, C, D, z, delta_bias, ckpt), softplus, kappa, chunk, need,
                      dy, dfinal_t)
    return [g if g is not None else u.new_empty(0) for g in grads]


@_scan_bwd_op.register_fake
def _(dy, dfinal_t, u, delta, A, B, C, D, z, delta_bias, ckpt, softplus, kappa, chunk, need):
    f32 = torch.float32
    du = _dense_like(u)
    batch, M, L, E = u.shape
    N = A.shape[2]
    like = {
        "u": lambda: du, "delta": lambda: torch.empty_like(du, dtype=delta.dtype),
        "A": lambda: A.new_empty(M, E, N), "B": lambda: B.new_empty(batch, M, L, N),
        "C": lambda: C.new_empty(batch, M, L, N), "D": lambda: u.new_empty(M, E, dtype=f32),
        "z": lambda: torch.empty_like(du, dtype=z.dtype),
        "delta_bias": lambda: u.new_empty(M, E, dtype=f32),
        "init_t": lambda: u.new_empty(batch, N, E, dtype=f32)}
    return [like[name]() if want else u.new_empty(0) for name, want in zip(_GRADS, need)]


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, init_t, dt_w, softplus, kappa, chunk = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2])
    ctx.softplus, ctx.kappa, ctx.chunk = softplus, kappa, chunk


def _scan_grad(ctx, dy, dfinal_t, _dckpt):
    need = [bool(x) for x in ctx.needs_input_grad[:9]]
    u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
    grads = torch.ops.cm_deploy.coupled_scan_bwd(dy, dfinal_t, u, delta, A, B, C, D, z, delta_bias,
                                                 ckpt, ctx.softplus, ctx.kappa, ctx.chunk, need)
    return (*[g if want else None for g, want in zip(grads, need)], None, None, None, None)


torch.library.register_autograd("cm_deploy::coupled_scan_fwd", _scan_grad, setup_context=_scan_setup)


def _scan_compiled(u, delta, A, B, C, D, z, delta_bias, init_t, softplus, kappa, needs_grad, dt_w=None):
    chunk = _train_chunk(u, A) if needs_grad else 0
    y, final, _ = torch.ops.cm_deploy.coupled_scan_fwd(u, delta, A, B, C, D, z, delta_bias, init_t,
                                                       dt_w, softplus, kappa, chunk)
    return y, final


def coupled_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                        delta_softplus=False, coupling_scale=None, initial_state=None,
                        return_final_state=False, gate_in_place=False, delta_proj=None):
    """CoupledScan with the fused Triton kernels; same contract and results as
    `coupled_scan_reference` (float32 state math, y in u's dtype, final_state float32).
    gate_in_place (inference, no autograd, eager): y is written over z, which the kernel reads at
    the same positions just before (one activation-sized tensor less); returns that tensor.
    delta_proj (M, R, E) (inference, no autograd): delta is given in Mamba's rank-R form, (batch,
    M, L, R), and the kernel uses delta @ delta_proj[m] (float32 math): the (batch, M, L, E) delta
    is neither materialised nor read.
    Differentiable in every tensor argument (first-order). Under torch.compile it is one opaque
    op of the graph (see above)."""
    batch, M, L, E = u.shape
    kappa = _kappa(coupling_scale, M)
    if L == 0:
        # Nothing to scan: y is empty and final_state is initial_state; the reference does that.
        from .reference import coupled_scan_reference, rank_delta
        if delta_proj is not None:
            delta = rank_delta(delta, delta_proj)
        return coupled_scan_reference(u, delta, A, B, C, D, z, delta_bias,
                                      delta_softplus=delta_softplus, coupling_scale=kappa,
                                      initial_state=initial_state,
                                      return_final_state=return_final_state)
    # activations by strides (any layout whose last axis is contiguous); parameters contiguous.
    # The kernels hold states as (batch, N, E) (_t): a (batch, E, N) view of such a tensor (a
    # previous call's final_state) needs no copy.
    u, delta, B, C, z = (_unit_last(t) for t in (u, delta, B, C, z))
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    init_t = _t(initial_state)
    softplus = bool(delta_softplus)
    cont = (u, delta, A, B, C, D, z, delta_bias, init_t)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in cont)
    dt_w = None
    if delta_proj is not None:
        if needs_grad or (torch.is_grad_enabled() and delta_proj.requires_grad):
            raise RuntimeError("coupled_scan_triton: delta_proj is an inference path (no backward)")
        dt_w = delta_proj.float().contiguous()
    if torch.compiler.is_compiling():
        y, final = _scan_compiled(*cont, softplus, kappa, needs_grad, dt_w)
    elif needs_grad:
        y, final = _CoupledScanFn.apply(*cont, softplus, kappa)
    else:
        y_out = None
        if gate_in_place and z is not None and z.dtype == u.dtype and z.stride(-1) == 1:
            y_out = z
        y, final, _ = _forward(*cont, softplus, kappa, save=False, y_out=y_out, dt_w=dt_w)
    # a (batch, E, N) view of the kernel's (batch, N, E) state, not a copy: handed back as the
    # next chunk's initial_state it is the kernel's layout again (no transposing copies)
    final = final.transpose(-1, -2)
    return (y, final) if return_final_state else y
