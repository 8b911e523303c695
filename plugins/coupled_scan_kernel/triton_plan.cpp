// The Triton forward's launch planning in C++ (plain C++, tested on the CPU against Python's _plan).
#include "triton_aot.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

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

// _pow2: the smallest power of two >= x (1 for x <= 1)
int64_t pow2(int64_t x)
{
    int64_t p = 1;
    while (p < x)
    {
        p *= 2;
    }
    return p;
}

size_t align256(size_t x)
{
    return (x + 255) / 256 * 256;
}

bool fail(std::string* why, std::string const& msg)
{
    if (why != nullptr)
    {
        *why = msg;
    }
    return false;
}

int32_t elemSize(ActType t)
{
    return t == ActType::kFLOAT32 ? 4 : 2;
}

// The row of the table for (kind, act, ...) that runs on the device, -1 if none. kScan and kSummary
// match the plan exactly except T, where the smallest compiled T >= the plan's is taken (the kernel
// masks the steps past a chunk's end, so a longer chunk only costs the short-sequence case scratch).
int32_t findSpec(TritonKernelKind kind, ActType act, int32_t M, int32_t N, TritonPlan const& p, bool softplus,
    bool hasC0, int32_t ccMajor, int32_t ccMinor)
{
    int32_t best = -1;
    for (int32_t i = 0; i < kTritonAotSpecCount; ++i)
    {
        TritonAotSpec const& s = kTritonAotSpecs[i];
        bool runs = false;
        for (int32_t k = 0; k < kTritonAotArchCount; ++k)
        {
            runs = runs || (((s.archMask >> k) & 1u) && tritonArchRuns(kTritonAotArchs[k], ccMajor, ccMinor));
        }
        if (!runs || s.kind != static_cast<int32_t>(kind) || s.hasC0 != static_cast<int32_t>(hasC0))
        {
            continue;
        }
        if (kind == TritonKernelKind::kCombine)
        {
            // one combine kernel per power of two of segment summaries (NSEG, carried in T)
            int32_t nseg = 1;
            while (nseg < p.nSeg - 1)
            {
                nseg *= 2;
            }
            if (s.T == nseg)
            {
                return i;
            }
            continue;
        }
        if (s.act != static_cast<int32_t>(act) || s.M != M || s.N != N || s.softplus != static_cast<int32_t>(softplus)
            || s.blockE != p.blockE || s.blockN != p.blockN || s.numWarps != p.numWarps
            || s.yParts != std::min(p.yParts, p.blockN) || s.fastExp != static_cast<int32_t>(p.fastExp)
            || s.pfBc != static_cast<int32_t>(p.pfBc) || s.T < p.chunkT)
        {
            continue;
        }
        if (best < 0 || s.T < kTritonAotSpecs[best].T)
        {
            best = i;
        }
    }
    return best;
}

// Byte layout of a launch's workspace (float32 regions; see triton_launch.cpp for their use).
void layout(TritonLaunch& l, int64_t batch, int32_t M, int32_t E, int32_t N, bool hasInitial)
{
    size_t const f = sizeof(float);
    size_t const states = static_cast<size_t>(batch) * E * N * f;
    size_t const segStates = states * static_cast<size_t>(l.plan.nSeg);
    size_t off = 0;
    auto take = [&](size_t bytes) {
        size_t const at = off;
        off = align256(off + bytes);
        return at;
    };
    l.scratch = take(static_cast<size_t>(l.eBlocks) * batch * l.plan.nSeg * (2 + l.yParts) * M * l.T * l.plan.blockE * f);
    l.final = take(states);
    if (l.plan.nSeg == 1)
    {
        l.c0 = l.initT = take(states); // the transposed initial state, or zeros
        l.P = l.S = 0;
    }
    else
    {
        l.initT = hasInitial ? take(states) : 0;
        l.P = take(segStates);
        l.S = take(segStates);
        l.c0 = take(segStates); // every segment's start state (the combine kernel's output)
    }
    l.bytes = off;
}

} // namespace

char const* implName(ScanImpl impl)
{
    switch (impl)
    {
    case ScanImpl::kAuto: return "auto";
    case ScanImpl::kCuda: return "cuda";
    case ScanImpl::kTriton: return "triton";
    }
    return "?";
}

TritonPlan planTritonForward(int64_t batch, int32_t M, int64_t L, int32_t E, int32_t N, int32_t elemSize, int32_t smCount)
{
    // _plan(..., bwd=False) with gpu = True and no tuning overrides, line by line.
    TritonPlan p;
    p.blockN = static_cast<int32_t>(pow2(N));
    int64_t const vec = std::max(1, 16 / elemSize);
    p.blockE = static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>({pow2(E), 32, 32 * vec / p.blockN})));
    p.numWarps = 1;
    int64_t nSeg = 1;
    int64_t const threads = batch * ceilDiv(E, p.blockE) * p.numWarps * 32;
    int64_t const target = static_cast<int64_t>(smCount) * 21 * 32; // _WARPS_PER_SM[False] = 21
    if (2 * threads < target)
    {
        nSeg = std::max<int64_t>(1, std::min<int64_t>(ceilDiv(2 * target, std::max<int64_t>(threads, 1)), L / 64));
    }
    nSeg = std::max<int64_t>(1, std::min(nSeg, L));
    p.nSegAsked = static_cast<int32_t>(nSeg);
    p.segLen = ceilDiv(L, nSeg); // chunk = 1 in the forward: no rounding to checkpoints
    p.nSeg = static_cast<int32_t>(ceilDiv(L, p.segLen));
    p.fastExp = true;
    p.pfBc = true;
    p.chunkT = static_cast<int32_t>(std::min<int64_t>(64, pow2(p.segLen)));
    p.yParts = 1;
    return p;
}

bool tritonArchRuns(int32_t arch, int32_t ccMajor, int32_t ccMinor)
{
    if (arch >= 90)
    {
        return arch == ccMajor * 10 + ccMinor;
    }
    return arch / 10 == ccMajor && arch % 10 <= ccMinor;
}

bool chooseTritonLaunch(ActType type, int64_t batch, int32_t M, int64_t L, int32_t E, int32_t N, bool softplus,
    float kappa, bool hasInitial, int32_t ccMajor, int32_t ccMinor, int32_t smCount, TritonLaunch& out, std::string* why)
{
    if (kTritonAotSpecCount == 0)
    {
        return fail(why, std::string("this library has no Triton kernels (") + kTritonAotBuildInfo + ")");
    }
    if (!(kappa > 0.f) || !std::isfinite(kappa))
    {
        return fail(why, "the Triton kernels need coupling_scale > 0");
    }
    if (E % 16 != 0 || batch < 1 || batch > 65535 || L < 1 || M < 1)
    {
        return fail(why, "the Triton kernels need E % 16 == 0, 1 <= batch <= 65535 and L >= 1 (got batch "
                + std::to_string(batch) + ", L " + std::to_string(L) + ", E " + std::to_string(E) + ")");
    }
    int64_t const i32 = std::numeric_limits<int32_t>::max();
    if (static_cast<int64_t>(M) * L * std::max(E, N) > i32 || static_cast<int64_t>(E) * N > i32)
    {
        return fail(why, "the Triton kernels take element offsets as int32: M * L * E too large");
    }
    TritonLaunch l;
    l.plan = planTritonForward(batch, M, L, E, N, elemSize(type), std::min(smCount, kTritonPlanMaxSms));
    l.scan = findSpec(TritonKernelKind::kScan, type, M, N, l.plan, softplus, true, ccMajor, ccMinor);
    if (l.scan < 0)
    {
        return fail(why, "no Triton kernel compiled for M=" + std::to_string(M) + " N=" + std::to_string(N)
                + " (" + (type == ActType::kFLOAT32 ? "float32" : type == ActType::kFLOAT16 ? "float16" : "bfloat16")
                + ", softplus " + std::to_string(softplus) + ") on sm_" + std::to_string(ccMajor * 10 + ccMinor)
                + " [" + kTritonAotBuildInfo + "]");
    }
    if (l.plan.nSeg > 1)
    {
        l.summary = findSpec(TritonKernelKind::kSummary, type, M, N, l.plan, softplus, false, ccMajor, ccMinor);
        l.combine = findSpec(TritonKernelKind::kCombine, type, M, N, l.plan, softplus, hasInitial, ccMajor, ccMinor);
        if (l.summary < 0 || l.combine < 0)
        {
            return fail(why, "the Triton segment kernels are missing for this shape");
        }
    }
    if (static_cast<int64_t>(l.plan.nSeg) > 65535)
    {
        return fail(why, "too many segments for the Triton grid");
    }
    TritonAotSpec const& s = kTritonAotSpecs[l.scan];
    l.T = s.T;
    l.yParts = s.yParts;
    l.eBlocks = ceilDiv(E, l.plan.blockE);
    layout(l, batch, M, E, N, hasInitial);
    out = l;
    return true;
}

bool tritonCompiled(ActType type, int32_t M, int32_t E, int32_t N, bool softplus, float kappa)
{
    for (int32_t k = 0; k < kTritonAotArchCount; ++k)
    {
        int32_t const arch = kTritonAotArchs[k];
        TritonLaunch l;
        if (chooseTritonLaunch(type, 1, M, 1, E, N, softplus, kappa, true, arch / 10, arch % 10, kTritonPlanMaxSms, l,
                nullptr))
        {
            return true;
        }
    }
    return false;
}

size_t tritonWorkspaceBound(ActType type, int64_t batchMax, int32_t M, int64_t lMax, int32_t E, int32_t N, bool softplus,
    float kappa)
{
    if (!tritonCompiled(type, M, E, N, softplus, kappa) || batchMax < 1 || lMax < 1)
    {
        return 0;
    }
    // The calls a Triton kernel takes: batch <= 65535 and M * L * max(E, N) within int32 (chooseTritonLaunch).
    int64_t const bCap = std::min<int64_t>(batchMax, 65535);
    int64_t const lCap = std::min<int64_t>(lMax, std::numeric_limits<int32_t>::max() / (static_cast<int64_t>(M) * std::max(E, N)));
    if (lCap < 1)
    {
        return 0;
    }
    // The layout grows with L and with the SM count at a fixed batch; with the batch it grows once L is
    // no longer split (below that, fewer segments as the batch grows). The segment count a call uses can
    // shrink as L grows (rounding), the count asked for cannot; and a shorter L may take a kernel with a
    // shorter chunk, never a longer one than the longest compiled. Planned on the largest device.
    int32_t tMax = 0;
    for (int32_t i = 0; i < kTritonAotSpecCount; ++i)
    {
        TritonAotSpec const& s = kTritonAotSpecs[i];
        if (s.kind == static_cast<int32_t>(TritonKernelKind::kScan) && s.act == static_cast<int32_t>(type) && s.M == M
            && s.N == N)
        {
            tMax = std::max(tMax, s.T);
        }
    }
    auto bytesAt = [&](int64_t b, bool& split) {
        TritonLaunch l;
        l.plan = planTritonForward(b, M, lCap, E, N, elemSize(type), kTritonPlanMaxSms);
        split = l.plan.nSegAsked > 1;
        l.plan.nSeg = l.plan.nSegAsked;
        l.T = tMax;
        l.yParts = std::min(l.plan.yParts, l.plan.blockN);
        l.eBlocks = ceilDiv(E, l.plan.blockE);
        layout(l, b, M, E, N, true);
        return l.bytes;
    };
    size_t bound = 0;
    bool split = true;
    for (int64_t b = 1; b <= bCap && split; ++b)
    {
        bound = std::max(bound, bytesAt(b, split));
    }
    return std::max(bound, bytesAt(bCap, split));
}

namespace
{
std::string const& envScanImplValue() // CM_DEPLOY_SCAN_IMPL, read once ("" when unset)
{
    static std::string const value = [] {
        char const* v = std::getenv("CM_DEPLOY_SCAN_IMPL");
        return std::string(v != nullptr ? v : "");
    }();
    return value;
}
} // namespace

bool tritonOptIn()
{
    // Until the Triton kernels compiled into the libraries have run on a GPU (issue 20), the automatic
    // choice is the CUDA kernel; CM_DEPLOY_SCAN_IMPL=auto (or triton) opts in to them.
    return envScanImplValue() == "auto" || envScanImplValue() == "triton";
}

bool envScanImpl(ScanImpl& out, std::string* why)
{
    std::string const& value = envScanImplValue();
    if (value.empty() || value == "auto")
    {
        out = ScanImpl::kAuto;
    }
    else if (value == "cuda")
    {
        out = ScanImpl::kCuda;
    }
    else if (value == "triton")
    {
        out = ScanImpl::kTriton;
    }
    else
    {
        return fail(why, "CM_DEPLOY_SCAN_IMPL must be auto, cuda or triton, got '" + value + "'");
    }
    return true;
}

} // namespace scan
} // namespace cm_deploy
