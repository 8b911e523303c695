// CoupledScan forward kernel (DESIGN.md section 2).
//
// Per (batch b, channel e, state n) the coupled state c follows, for t = 1..L:
//     h[m] = exp(dt[m,t] * A[m,e,n]) * c + dt[m,t] * B[m,t,n] * u[m,t,e]      (all m read the same c)
//     c    = kappa * sum_m h[m]
//     y[m,t,e] = (sum_n C[m,t,n] * h[m] + D[m,e] * u[m,t,e]) * silu(z[m,t,e])
//
// One block owns one batch row and `ch` channels. Consumer threads keep their states and their
// log2e-scaled copies of A in registers for the whole sequence (one pass over the inputs). Producer
// threads run one chunk ahead: they load chunk k+1 (dt = softplus(delta + bias), dt*u, D*u, silu(z) are
// computed once per (m, t, e) there, not once per state) into shared memory and, for chunk k-1, sum
// the consumers' per-thread partial y over the channel's threads and store y. One block barrier per
// chunk; everything else runs in parallel.
//
// The block's work is written as per-thread phase functions (__host__ __device__) so the CPU tests
// can run the very same code under a serial emulation of the schedule (emulateCoupledScan below).
#pragma once

#include "scan_types.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#define CMS_HD __host__ __device__ __forceinline__

namespace cm_deploy
{
namespace scan
{

constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct ActIO;

// load: one element as float. Raw / loadRaw / toFloat: the element's bits, converted later, so that a
// batch of loads is issued before the first conversion waits on one (the producer's loads).
template <>
struct ActIO<float>
{
    using Raw = float;
    static CMS_HD Raw loadRaw(void const* p, int64_t i)
    {
        return static_cast<float const*>(p)[i];
    }
    static CMS_HD float toFloat(Raw r)
    {
        return r;
    }
    static CMS_HD float load(void const* p, int64_t i)
    {
        return static_cast<float const*>(p)[i];
    }
    static CMS_HD void store(void* p, int64_t i, float v)
    {
        static_cast<float*>(p)[i] = v;
    }
};

template <>
struct ActIO<__half>
{
    using Raw = unsigned short;
    static CMS_HD Raw loadRaw(void const* p, int64_t i)
    {
        return static_cast<unsigned short const*>(p)[i];
    }
    static CMS_HD float toFloat(Raw r)
    {
        __half_raw h;
        h.x = r;
        return __half2float(__half(h));
    }
    static CMS_HD float load(void const* p, int64_t i)
    {
        return __half2float(static_cast<__half const*>(p)[i]);
    }
    static CMS_HD void store(void* p, int64_t i, float v)
    {
        static_cast<__half*>(p)[i] = __float2half_rn(v);
    }
};

template <>
struct ActIO<__nv_bfloat16>
{
    using Raw = unsigned short;
    static CMS_HD Raw loadRaw(void const* p, int64_t i)
    {
        return static_cast<unsigned short const*>(p)[i];
    }
    static CMS_HD float toFloat(Raw r)
    {
        __nv_bfloat16_raw h;
        h.x = r;
        return __bfloat162float(__nv_bfloat16(h));
    }
    static CMS_HD float load(void const* p, int64_t i)
    {
        return __bfloat162float(static_cast<__nv_bfloat16 const*>(p)[i]);
    }
    static CMS_HD void store(void* p, int64_t i, float v)
    {
        static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
    }
};

// exp2 on the SFU: one instruction per state and step is the kernel's floor, so no range reduction.
CMS_HD float fastExp2(float x)
{
#if defined(__CUDA_ARCH__)
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return std::exp2(x);
#endif
}

// PyTorch's F.softplus (beta 1, threshold 20), which the reference uses.
CMS_HD float fastExp(float x)
{
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    return std::exp(x);
#endif
}

CMS_HD float softplus(float x)
{
    return x > 20.f ? x : log1pf(fastExp(x));
}

CMS_HD float silu(float x)
{
    return x / (1.f + fastExp(-x));
}

CMS_HD float4 load4(float const* p)
{
#if defined(__CUDA_ARCH__)
    return *reinterpret_cast<float4 const*>(p);
#else
    float4 v;
    std::memcpy(&v, p, sizeof v);
    return v;
#endif
}

// A linear index i = (t * M + m) * X + x walked by a fixed stride without a division per element.
struct Walk
{
    int32_t x, m, t;
    int32_t dx, dm, dt;
    int32_t X, M;

    CMS_HD Walk(int32_t start, int32_t stride, int32_t X_, int32_t M_)
        : X(X_)
        , M(M_)
    {
        x = start % X;
        int32_t const r = start / X;
        m = r % M;
        t = r / M;
        dx = stride % X;
        int32_t const rs = stride / X;
        dm = rs % M;
        dt = rs / M;
    }

    CMS_HD void advance()
    {
        x += dx;
        int32_t carry = 0;
        if (x >= X)
        {
            x -= X;
            carry = 1;
        }
        m += dm + carry;
        if (m >= M)
        {
            m -= M;
            t += 1;
        }
        t += dt;
    }
};

// Per-block context: which batch row, channels and segment of L, and where the two pipeline stages
// live. The stage is picked by arithmetic, not by indexing an array of pointers (which would go to
// local memory).
struct BlockCtx
{
    int64_t b;
    int32_t e0;
    int32_t seg;     // segment of L (0 when L is not split)
    int64_t tBase;   // first time step of the segment
    int64_t len;     // steps of the segment
    int64_t nchunks;
    float* smem;
    SmemLayout l;

    CMS_HD float* stage(int64_t chunk) const
    {
        return smem + (chunk & 1) * l.stageFloats;
    }
    CMS_HD float2* xf(int64_t chunk) const
    {
        return reinterpret_cast<float2*>(stage(chunk) + l.xf);
    }
    CMS_HD float2* ep(int64_t chunk) const
    {
        return reinterpret_cast<float2*>(stage(chunk) + l.ep);
    }
    CMS_HD float2* bc(int64_t chunk) const
    {
        return reinterpret_cast<float2*>(stage(chunk) + l.bc);
    }
    CMS_HD float* part(int64_t chunk) const
    {
        return stage(chunk) + l.part;
    }
};

// Block index -> (batch row, segment, channel tile). The summary pass (SUMMARY) launches segments
// 0..segs-2 only (the last segment's summary is never needed); the main pass all of them.
CMS_HD BlockCtx makeBlockCtx(float* smem, ScanArgs const& a, ScanGeometry const& g, int64_t blockIndex, bool summary)
{
    int64_t const segsInGrid = summary ? g.segs - 1 : g.segs;
    BlockCtx k;
    int64_t const et = blockIndex % g.etiles;
    int64_t const r = blockIndex / g.etiles;
    k.seg = static_cast<int32_t>(r % segsInGrid);
    k.b = r / segsInGrid;
    k.e0 = static_cast<int32_t>(et * g.ch);
    k.tBase = static_cast<int64_t>(k.seg) * g.segLen;
    int64_t const left = a.L - k.tBase;
    k.len = left < 0 ? 0 : (left < g.segLen ? left : g.segLen);
    k.nchunks = k.len > 0 ? (k.len + g.tc - 1) / g.tc : 0;
    k.smem = smem;
    k.l = smemLayout(g, a.M);
    return k;
}

CMS_HD int32_t chunkSteps(BlockCtx const& k, ScanGeometry const& g, int64_t chunk)
{
    int64_t const left = k.len - chunk * g.tc;
    return static_cast<int32_t>(left < g.tc ? left : g.tc);
}

// State (e, n) of batch row b, segment seg, in the segment summaries' workspace.
CMS_HD int64_t workIndex(ScanArgs const& a, ScanGeometry const& g, int64_t b, int32_t seg, int32_t e, int32_t n)
{
    return ((b * g.segs + seg) * a.E + e) * static_cast<int64_t>(a.N) + n;
}

// A thread's NPT states (e, stateOf(s)) at the start of its segment: A * log2(e) per modality (0
// for padding), P = 1, and c = 0 in the summary pass, else the segment's true initial state: the
// operator's initial state carried through the summaries {P, off} of the segments before it.
template <int NPT, int MT, typename StateOf>
CMS_HD void startStates(ScanArgs const& a, ScanGeometry const& g, BlockCtx const& k, int32_t e, StateOf stateOf,
    bool validE, bool summary, float (&a2)[MT][NPT], float (&P)[NPT], float (&c)[NPT])
{
#pragma unroll
    for (int s = 0; s < NPT; ++s)
    {
        int32_t const n = stateOf(s);
        bool const ok = validE && n < a.N;
#pragma unroll
        for (int m = 0; m < MT; ++m)
        {
            a2[m][s] = (ok && m < a.M) ? a.A[(static_cast<int64_t>(m) * a.E + e) * a.N + n] * kLog2e : 0.f;
        }
        P[s] = 1.f;
        float cv = 0.f;
        if (!summary && ok)
        {
            cv = a.initialState != nullptr ? a.initialState[(k.b * a.E + e) * a.N + n] : 0.f;
            for (int32_t q = 0; q < k.seg; ++q)
            {
                float2 const pw = reinterpret_cast<float2 const*>(a.work)[workIndex(a, g, k.b, q, e, n)];
                cv = fmaf(pw.x, cv, pw.y);
            }
        }
        c[s] = cv;
    }
}

// After a pass: the summary pass writes this segment's {P, off}; the main pass final_state, from
// the last segment.
template <int NPT, typename StateOf>
CMS_HD void endStates(ScanArgs const& a, ScanGeometry const& g, BlockCtx const& k, int32_t e, StateOf stateOf,
    bool validE, bool summary, float const (&P)[NPT], float const (&c)[NPT])
{
    if (!validE || (!summary && (a.finalState == nullptr || k.seg != g.segs - 1)))
    {
        return;
    }
#pragma unroll
    for (int s = 0; s < NPT; ++s)
    {
        int32_t const n = stateOf(s);
        if (n < a.N)
        {
            if (summary)
            {
                reinterpret_cast<float2*>(a.work)[workIndex(a, g, k.b, k.seg, e, n)] = make_float2(P[s], c[s]);
            }
            else
            {
                a.finalState[(k.b * a.E + e) * a.N + n] = c[s];
            }
        }
    }
}

// A consumer thread: channel `chl` of the block, lane j of that channel's lpc threads, NPT states.
template <int NPT, int MT>
struct Consumer
{
    float c[NPT];      // coupled state c[t-1] of each owned (e, n); the offset in the summary pass
    float P[NPT];      // summary pass: product of the transitions kappa * sum_m exp(dt A) so far
    float a2[MT][NPT]; // A[m, e, n] * log2(e); 0 for padding
    int32_t chl;
    int32_t j;
    int32_t e;
    bool active;
    bool validE;

    // States are owned in pairs so that one float4 load fetches {B, C} of two states; a quarter-warp
    // of lanes reads 128 consecutive bytes, free of bank conflicts.
    static CMS_HD int32_t stateOf(int32_t j, int32_t s, int32_t lpc)
    {
        return NPT == 1 ? j : 2 * (j + lpc * (s / 2)) + (s & 1);
    }

    CMS_HD void init(ScanArgs const& a, ScanGeometry const& g, BlockCtx const& k, int32_t tid, bool summary)
    {
        active = tid < g.ch * g.lpc;
        chl = active ? tid / g.lpc : 0;
        j = active ? tid % g.lpc : 0;
        e = k.e0 + chl;
        validE = active && e < a.E;
        int32_t const jj = j, lpc = g.lpc;
        startStates<NPT, MT>(a, g, k, e, [=](int s) { return stateOf(jj, s, lpc); }, validE, summary, a2, P, c);
    }

    template <bool SUMMARY>
    CMS_HD void compute(ScanArgs const& a, ScanGeometry const& g, BlockCtx const& k, int64_t chunk)
    {
        if (!active)
        {
            return;
        }
        int32_t const tcur = chunkSteps(k, g, chunk);
        float2 const* xf = k.xf(chunk);
        float2 const* bc = k.bc(chunk);
        float* part = k.part(chunk);
        int32_t const M = a.M;
        float const kappa = a.kappa;
        for (int32_t t = 0; t < tcur; ++t)
        {
            float cs[NPT];
            float ts[NPT];
#pragma unroll
            for (int s = 0; s < NPT; ++s)
            {
                cs[s] = 0.f;
                ts[s] = 0.f;
            }
#pragma unroll
            for (int m = 0; m < MT; ++m)
            {
                if (m < M)
                {
                    int32_t const row = t * M + m;
                    float2 const d = xf[row * g.ch + chl]; // {dt, dt * u}
                    float2 const* bcr = bc + static_cast<size_t>(row) * g.npad;
                    float bv[NPT];
                    float cv[NPT];
                    if constexpr (NPT == 1)
                    {
                        float2 const q = bcr[j];
                        bv[0] = q.x;
                        cv[0] = q.y;
                    }
                    else
                    {
#pragma unroll
                        for (int p = 0; p < NPT / 2; ++p)
                        {
                            float4 const q = load4(reinterpret_cast<float const*>(bcr + 2 * (j + g.lpc * p)));
                            bv[2 * p] = q.x;
                            cv[2 * p] = q.y;
                            bv[2 * p + 1] = q.z;
                            cv[2 * p + 1] = q.w;
                        }
                    }
                    if constexpr (SUMMARY)
                    {
                        // c' = (kappa sum_m exp(dt A)) c + kappa sum_m dt B u: track both parts.
#pragma unroll
                        for (int s = 0; s < NPT; ++s)
                        {
                            ts[s] += fastExp2(d.x * a2[m][s]);
                            cs[s] = fmaf(d.y, bv[s], cs[s]);
                        }
                    }
                    else
                    {
                        float acc = 0.f;
#pragma unroll
                        for (int s = 0; s < NPT; ++s)
                        {
                            float const decay = fastExp2(d.x * a2[m][s]);
                            float const h = fmaf(decay, c[s], d.y * bv[s]);
                            acc = fmaf(cv[s], h, acc);
                            cs[s] = (m == 0) ? h : cs[s] + h;
                        }
                        part[static_cast<size_t>(row * g.ch + chl) * g.S + j] = acc;
                    }
                }
            }
#pragma unroll
            for (int s = 0; s < NPT; ++s)
            {
                if constexpr (SUMMARY)
                {
                    float const tr = kappa * ts[s];
                    P[s] *= tr;
                    c[s] = fmaf(tr, c[s], kappa * cs[s]);
                }
                else
                {
                    c[s] = kappa * cs[s];
                }
            }
        }
    }

    // Main pass: final_state from the last segment. Summary pass: {P, off} of this segment.
    CMS_HD void finish(ScanArgs const& a, ScanGeometry const& g, BlockCtx const& k, bool summary) const
    {
        int32_t const jj = j, lpc = g.lpc;
        endStates<NPT>(a, g, k, e, [=](int s) { return stateOf(jj, s, lpc); }, validE, summary, P, c);
    }
};

template <typename T>
struct Producer
{
    using IO = ActIO<T>;
    // Rows (or B/C elements) loaded per batch: all loads of a batch are issued before any is used, so
    // a producer thread keeps several global loads in flight instead of one.
    static constexpr int kRowBatch = 4;
    static constexpr int kBcBatch = 8;

    // Stage chunk `chunk`: activations of the block's channels and B, C of all states, as float. The
    // summary pass needs neither z nor C.
    template <bool SUMMARY>
    static CMS_HD void stage(ScanArgs const& a, ScanGeometry const& g, BlockCtx const& k, int64_t chunk, int32_t ptid)
    {
        int32_t const tcur = chunkSteps(k, g, chunk);
        int64_t const t0 = k.tBase + chunk * g.tc;
        float2* xf = k.xf(chunk);
        float2* ep = k.ep(chunk);
        float2* bc = k.bc(chunk);
        int32_t const M = a.M;
        int32_t const E = a.E;
        int32_t const N = a.N;
        int32_t i = ptid;
        for (Walk w(ptid, g.np, g.ch, M); w.t < tcur; i += kRowBatch * g.np)
        {
            typename IO::Raw uu[kRowBatch], dl[kRowBatch], zz[kRowBatch];
            int32_t mm[kRowBatch], ee[kRowBatch];
            bool in[kRowBatch], ok[kRowBatch];
#pragma unroll
            for (int r = 0; r < kRowBatch; ++r)
            {
                in[r] = w.t < tcur;
                ee[r] = k.e0 + w.x;
                mm[r] = w.m;
                ok[r] = in[r] && ee[r] < E;
                uu[r] = dl[r] = zz[r] = typename IO::Raw(0);
                if (ok[r])
                {
                    int64_t const gi = ((k.b * M + w.m) * a.L + t0 + w.t) * E + ee[r];
                    uu[r] = IO::loadRaw(a.u, gi);
                    dl[r] = IO::loadRaw(a.delta, gi);
                    if constexpr (!SUMMARY)
                    {
                        zz[r] = IO::loadRaw(a.z, gi);
                    }
                }
                w.advance();
            }
#pragma unroll
            for (int r = 0; r < kRowBatch; ++r)
            {
                if (in[r])
                {
                    float2 x = make_float2(0.f, 0.f);
                    float2 q = make_float2(0.f, 0.f);
                    if (ok[r])
                    {
                        int64_t const me = static_cast<int64_t>(mm[r]) * E + ee[r];
                        float const uf = IO::toFloat(uu[r]);
                        float const raw = IO::toFloat(dl[r]) + a.deltaBias[me];
                        float const dt = a.deltaSoftplus ? softplus(raw) : raw;
                        x = make_float2(dt, dt * uf);
                        if constexpr (!SUMMARY)
                        {
                            q = make_float2(a.D[me] * uf, silu(IO::toFloat(zz[r])));
                        }
                    }
                    xf[i + r * g.np] = x;
                    if constexpr (!SUMMARY)
                    {
                        ep[i + r * g.np] = q;
                    }
                }
            }
        }
        i = ptid;
        for (Walk w(ptid, g.np, g.npad, M); w.t < tcur; i += kBcBatch * g.np)
        {
            typename IO::Raw bv[kBcBatch], cv[kBcBatch];
            bool in[kBcBatch];
#pragma unroll
            for (int r = 0; r < kBcBatch; ++r)
            {
                in[r] = w.t < tcur;
                bv[r] = cv[r] = typename IO::Raw(0);
                if (in[r] && w.x < N)
                {
                    int64_t const gi = ((k.b * M + w.m) * a.L + t0 + w.t) * N + w.x;
                    bv[r] = IO::loadRaw(a.B, gi);
                    if constexpr (!SUMMARY)
                    {
                        cv[r] = IO::loadRaw(a.C, gi);
                    }
                }
                w.advance();
            }
#pragma unroll
            for (int r = 0; r < kBcBatch; ++r)
            {
                if (in[r])
                {
                    bc[i + r * g.np] = make_float2(IO::toFloat(bv[r]), IO::toFloat(cv[r]));
                }
            }
        }
    }

    // Finish chunk `chunk`: y = (sum of the channel's partials + D*u) * silu(z), one row per thread.
    static CMS_HD void epilogue(
        ScanArgs const& a, ScanGeometry const& g, BlockCtx const& k, int64_t chunk, int32_t ptid)
    {
        int32_t const tcur = chunkSteps(k, g, chunk);
        int64_t const t0 = k.tBase + chunk * g.tc;
        float const* part = k.part(chunk);
        float2 const* ep = k.ep(chunk);
        int32_t const M = a.M;
        int32_t const E = a.E;
        int32_t const lpc = g.lpc;
        int32_t i = ptid;
        for (Walk w(ptid, g.np, g.ch, M); w.t < tcur; w.advance(), i += g.np)
        {
            int32_t const e = k.e0 + w.x;
            if (e >= E)
            {
                continue;
            }
            float const* p = part + static_cast<size_t>(i) * g.S;
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            if (lpc % 4 == 0)
            {
                for (int32_t jj = 0; jj < lpc; jj += 4)
                {
                    float4 const v = load4(p + jj);
                    s0 += v.x;
                    s1 += v.y;
                    s2 += v.z;
                    s3 += v.w;
                }
            }
            else
            {
                for (int32_t jj = 0; jj < lpc; ++jj)
                {
                    s0 += p[jj];
                }
            }
            float2 const q = ep[i];
            float const yv = ((s0 + s1) + (s2 + s3) + q.x) * q.y;
            IO::store(a.y, ((k.b * M + w.m) * a.L + t0 + w.t) * E + e, yv);
        }
    }
};

#if defined(__CUDACC__)

// SUMMARY: the first pass of a segmented launch (g.segs > 1): each segment's {P, off} into a.work.
template <typename T, int NPT, int MT, bool SUMMARY>
__global__ void __launch_bounds__(kMaxBlockThreads, (MT <= 4 ? 3 : 1)) coupledScanKernel(ScanArgs a, ScanGeometry g)
{
    extern __shared__ float4 smemRaw[];
    BlockCtx const k = makeBlockCtx(reinterpret_cast<float*>(smemRaw), a, g, blockIdx.x, SUMMARY);
    int32_t const tid = static_cast<int32_t>(threadIdx.x);
    bool const consumer = tid < g.nc; // whole warps: nc is a multiple of 32
    int32_t const ptid = tid - g.nc;
    Consumer<NPT, MT> st;
    if (consumer)
    {
        st.init(a, g, k, tid, SUMMARY);
    }
    else if (k.nchunks > 0)
    {
        Producer<T>::template stage<SUMMARY>(a, g, k, 0, ptid);
    }
    __syncthreads();
    for (int64_t chunk = 0; chunk <= k.nchunks; ++chunk)
    {
        if (consumer)
        {
            if (chunk < k.nchunks)
            {
                st.template compute<SUMMARY>(a, g, k, chunk);
            }
        }
        else
        {
            // epilogue(chunk - 1) and stage(chunk + 1) use the same stage, with no barrier between them:
            // a producer reads back only the ep rows it staged itself (both walk rows ptid, ptid + np, ...),
            // and the part rows it reads are not written in this chunk (racecheck_handoff.cu).
            if constexpr (!SUMMARY)
            {
                if (chunk >= 1)
                {
                    Producer<T>::epilogue(a, g, k, chunk - 1, ptid);
                }
                // reconverges the warp after the epilogue's divergent loop, as the former named barrier
                // did: without it ptxas spills registers in the 8-states instances (sm_90)
                __syncwarp();
            }
            if (chunk + 1 < k.nchunks)
            {
                Producer<T>::template stage<SUMMARY>(a, g, k, chunk + 1, ptid);
            }
        }
        __syncthreads();
    }
    if (consumer)
    {
        st.finish(a, g, k, SUMMARY);
    }
}

#endif // __CUDACC__

// The kernel's schedule run serially on the CPU, phase by phase, with the same per-thread code.
// Buffers a phase has finished with are poisoned with NaN so that a read out of order shows up.
template <typename T, int NPT, int MT, bool SUMMARY>
void emulatePass(ScanArgs const& a, ScanGeometry const& g)
{
    std::vector<float4> smem((g.smemBytes + sizeof(float4) - 1) / sizeof(float4));
    float* base = reinterpret_cast<float*>(smem.data());
    size_t const nFloats = smem.size() * 4;
    float const nan = std::numeric_limits<float>::quiet_NaN();
    auto poison = [&](float* p, size_t count) {
        for (size_t i = 0; i < count; ++i)
        {
            p[i] = nan;
        }
    };
    size_t const rowsA = static_cast<size_t>(g.tc) * a.M * g.ch;
    size_t const rowsB = static_cast<size_t>(g.tc) * a.M;
    std::vector<Consumer<NPT, MT>> consumers(g.nc);
    int64_t const blocks = g.blocks * (SUMMARY ? g.segs - 1 : g.segs);
    for (int64_t blk = 0; blk < blocks; ++blk)
    {
        poison(base, nFloats);
        BlockCtx const k = makeBlockCtx(base, a, g, blk, SUMMARY);
        for (int32_t tid = 0; tid < g.nc; ++tid)
        {
            consumers[tid].init(a, g, k, tid, SUMMARY);
        }
        if (k.nchunks > 0)
        {
            for (int32_t p = 0; p < g.np; ++p)
            {
                Producer<T>::template stage<SUMMARY>(a, g, k, 0, p);
            }
        }
        for (int64_t chunk = 0; chunk <= k.nchunks; ++chunk)
        {
            if (chunk < k.nchunks)
            {
                for (int32_t tid = 0; tid < g.nc; ++tid)
                {
                    consumers[tid].template compute<SUMMARY>(a, g, k, chunk);
                }
                poison(reinterpret_cast<float*>(k.xf(chunk)), 2 * rowsA);
                poison(reinterpret_cast<float*>(k.bc(chunk)), 2 * rowsB * g.npad);
            }
            // The producers have no barrier between epilogue(chunk - 1) and stage(chunk + 1), which share a
            // stage: thread by thread, upwards on even chunks and downwards on odd ones, so that an ep row
            // one thread reads and another rewrites gets the next chunk's value in one of the two orders.
            // (ep is not poisoned in between: a row that stage() misses holds an older chunk's value.)
            for (int32_t q = 0; q < g.np; ++q)
            {
                int32_t const p = (chunk & 1) ? g.np - 1 - q : q;
                if (!SUMMARY && chunk >= 1)
                {
                    Producer<T>::epilogue(a, g, k, chunk - 1, p);
                }
                if (chunk + 1 < k.nchunks)
                {
                    Producer<T>::template stage<SUMMARY>(a, g, k, chunk + 1, p);
                }
            }
            if (!SUMMARY && chunk >= 1)
            {
                poison(k.part(chunk - 1), rowsA * g.S);
            }
        }
        for (int32_t tid = 0; tid < g.nc; ++tid)
        {
            consumers[tid].finish(a, g, k, SUMMARY);
        }
    }
}

// Both passes, as the launcher runs them. A segmented geometry without a.work gets a host workspace.
template <typename T, int NPT, int MT>
void emulateCoupledScan(ScanArgs const& a0, ScanGeometry const& g)
{
    ScanArgs a = a0;
    std::vector<float> work;
    if (g.segs > 1)
    {
        if (a.work == nullptr)
        {
            work.assign(static_cast<size_t>(a.batch) * g.segs * a.E * a.N * 2, std::numeric_limits<float>::quiet_NaN());
            a.work = work.data();
        }
        emulatePass<T, NPT, MT, true>(a, g);
    }
    emulatePass<T, NPT, MT, false>(a, g);
}

} // namespace scan
} // namespace cm_deploy
