// Launch geometry for the CoupledScan kernel (host only, no CUDA: tested on the CPU).
#include "scan_types.h"

#include <algorithm>
#include <sstream>

namespace cm_deploy
{
namespace scan
{
namespace
{

int64_t ceilDiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

bool fail(std::string* why, std::string const& msg)
{
    if (why != nullptr)
    {
        *why = msg;
    }
    return false;
}

// Bytes of shared memory for one launch with `tc` steps per chunk (two pipeline stages).
size_t smemBytesFor(ScanGeometry g, int32_t M, int32_t tc)
{
    g.tc = tc;
    return 2 * smemLayout(g, M).stageFloats * sizeof(float);
}

// Batch x channels too small to fill the GPU (`warps1` warps for one segment against
// `targetWarps`): split L into segments, scanned in parallel after a first pass that summarises
// each segment as a linear map of its initial state. Forced (ov.segs > 1, tests and tuning): any
// segment length; automatic: long segments only. Sets g.segs and g.segLen.
void splitSegments(int64_t batch, int64_t L, int64_t warps1, int64_t targetWarps, ScanOverrides const& ov,
    ScanGeometry& g)
{
    g.segs = 1;
    g.segLen = L;
    if (ov.segs != 1 && batch > 0 && L >= 2 && (ov.segs > 1 || L >= 2 * kMinSegmentLen))
    {
        int64_t want = ov.segs > 1 ? ov.segs : ceilDiv(targetWarps, std::max<int64_t>(warps1, 1));
        want = std::min<int64_t>(want, kMaxSegmentRows / batch);
        want = std::min<int64_t>(want, ov.segs > 1 ? L : L / kMinSegmentLen);
        if (want > 1)
        {
            g.segLen = ceilDiv(L, want);
            g.segs = static_cast<int32_t>(ceilDiv(L, g.segLen)); // every segment non-empty
        }
    }
}

} // namespace

bool chooseGeometry(int64_t batch, int32_t M, int64_t L, int32_t E, int32_t N, DeviceLimits const& dev,
    ScanOverrides const& ov, ScanGeometry& out, std::string* why)
{
    if (M < 1 || M > kMaxModalities)
    {
        return fail(why, "M (number of modalities) must be in [1, " + std::to_string(kMaxModalities) + "], got "
                + std::to_string(M));
    }
    if (N < 1 || N > kMaxStates)
    {
        return fail(why, "N (d_state) must be in [1, " + std::to_string(kMaxStates) + "], got " + std::to_string(N));
    }
    if (E < 1 || batch < 0 || L < 0)
    {
        return fail(why, "need E >= 1, batch >= 0 and L >= 0");
    }
    if (dev.smCount < 1)
    {
        return fail(why, "device reports no multiprocessors");
    }

    // Candidates from most states per thread (least overhead per state) to fewest (most threads).
    int32_t const targetPerSM = ov.targetWarpsPerSM > 0 ? ov.targetWarpsPerSM : 8;
    int64_t const targetWarps = static_cast<int64_t>(dev.smCount) * targetPerSM;
    bool found = false;
    ScanGeometry best;
    int64_t bestWarps = -1;
    for (int32_t npt : {8, 4, 2, 1})
    {
        if (ov.npt > 0 && npt != ov.npt)
        {
            continue;
        }
        if (npt > 1 && npt > N)
        {
            continue; // a thread would hold only padding
        }
        ScanGeometry g;
        g.npt = npt;
        g.mt = M <= 4 ? 4 : 8;
        g.lpc = static_cast<int32_t>(ceilDiv(N, npt));
        g.ch = std::max(1, 128 / g.lpc);
        g.nc = static_cast<int32_t>(ceilDiv(static_cast<int64_t>(g.ch) * g.lpc, 32) * 32);
        g.np = g.nc >= 64 ? 64 : 32;
        if (g.nc + g.np > kMaxBlockThreads)
        {
            continue; // one channel's states do not fit a block at this npt
        }
        g.npad = g.lpc * g.npt;
        g.S = partialStride(g.lpc);
        g.etiles = ceilDiv(E, g.ch);
        g.blocks = batch * g.etiles;
        int64_t const warps1 = g.blocks * (g.nc / 32);
        splitSegments(batch, L, warps1, targetWarps, ov, g);
        int64_t const warps = warps1 * g.segs;
        if (warps >= targetWarps)
        {
            best = g;
            found = true;
            break;
        }
        if (warps > bestWarps)
        {
            best = g;
            bestWarps = warps;
            found = true;
        }
    }
    if (!found)
    {
        std::ostringstream s;
        s << "no launch configuration for N=" << N;
        if (ov.npt > 0)
        {
            s << " with CM_DEPLOY_SCAN_NPT=" << ov.npt;
        }
        return fail(why, s.str());
    }

    // Steps per chunk: as many as the shared memory of the blocks that share an SM allows (fewer
    // barriers, longer producer lead), at most 64; at least enough rows for every producer thread.
    ScanGeometry& g = best;
    int64_t const byThreads = std::max<int64_t>(1, 2048 / (g.nc + g.np));
    int64_t const wanted = std::clamp<int64_t>(ceilDiv(std::max<int64_t>(g.blocks * g.segs, 1), dev.smCount), 1,
        std::min<int64_t>(byThreads, 4));
    size_t const optin = dev.smemOptinPerBlock;
    size_t const budget = std::min(optin, dev.smemPerSM / static_cast<size_t>(wanted) - 1024);
    auto maxTcWithin = [&](size_t bytes) {
        int32_t tc = 0;
        while (tc < 64 && smemBytesFor(g, M, tc + 1) <= bytes)
        {
            ++tc;
        }
        return tc;
    };
    int32_t const tcOptin = maxTcWithin(optin);
    if (tcOptin < 1)
    {
        return fail(why, "shared memory of the device too small for N=" + std::to_string(N));
    }
    int32_t tc = std::max(1, maxTcWithin(budget));
    int32_t const tcMin = static_cast<int32_t>(ceilDiv(g.np, static_cast<int64_t>(M) * g.ch));
    if (tc < tcMin)
    {
        tc = std::min(tcMin, tcOptin);
    }
    if (ov.tc > 0)
    {
        tc = std::min(ov.tc, tcOptin);
    }
    tc = static_cast<int32_t>(std::min<int64_t>(tc, std::max<int64_t>(g.segLen, 1)));
    g.tc = tc;
    g.smemBytes = smemBytesFor(g, M, tc);
    out = g;
    return true;
}

} // namespace scan
} // namespace cm_deploy
