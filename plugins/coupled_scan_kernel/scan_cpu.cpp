// CoupledScan on the CPU (see scan_cpu.h). Loops: per (batch, channel tile), time outer, modalities
// inner, so the coupled state of the tile (channels x N floats) stays in cache for the whole sequence.
#include "scan_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace cm_deploy
{
namespace scan
{

float halfToFloat(uint16_t h)
{
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t const e = (h >> 10) & 0x1fu;
    uint32_t const m = h & 0x3ffu;
    uint32_t bits;
    if (e == 0)
    {
        float const v = std::ldexp(static_cast<float>(m), -24); // zero or subnormal
        return sign ? -v : v;
    }
    if (e == 31)
    {
        bits = sign | 0x7f800000u | (m << 13); // Inf, NaN (payload kept)
    }
    else
    {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t floatToHalf(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    uint16_t const sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    uint32_t const ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)
    {
        return sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u); // NaN, Inf
    }
    if (ax >= 0x477ff000u)
    {
        return sign | 0x7c00u; // >= 65520 rounds to Inf
    }
    if (ax < 0x38800000u)
    {
        // below the smallest normal half (2^-14): multiples of 2^-24; the product is exact and
        // nearbyint rounds to nearest even (0x400 is then the smallest normal, encoded alike)
        float a;
        std::memcpy(&a, &ax, sizeof a);
        return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
    }
    uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13);
    uint32_t const rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
    {
        ++h; // a carry into the exponent is the correct rounding
    }
    return static_cast<uint16_t>(sign | h);
}

float bfloat16ToFloat(uint16_t b)
{
    uint32_t const bits = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

uint16_t floatToBfloat16(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, sizeof x);
    if ((x & 0x7fffffffu) > 0x7f800000u)
    {
        return static_cast<uint16_t>((x >> 16) | 0x40u); // quiet NaN
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    return static_cast<uint16_t>(x >> 16);
}

namespace
{

struct F32
{
    static float load(void const* p, int64_t i) { return static_cast<float const*>(p)[i]; }
    static void store(void* p, int64_t i, float v) { static_cast<float*>(p)[i] = v; }
};
struct F16
{
    static float load(void const* p, int64_t i) { return halfToFloat(static_cast<uint16_t const*>(p)[i]); }
    static void store(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = floatToHalf(v); }
};
struct BF16
{
    static float load(void const* p, int64_t i) { return bfloat16ToFloat(static_cast<uint16_t const*>(p)[i]); }
    static void store(void* p, int64_t i, float v) { static_cast<uint16_t*>(p)[i] = floatToBfloat16(v); }
};

// One (m, t, e) row of the recurrence over the N states: h = exp(dt A) c + dt u B; next += h;
// returns sum_n C h. Two versions: stepExact (std::exp, one library call per state: the reference's
// exp) and stepFast (expPoly: vectorized, ~1 ulp), which the kernel uses unless
// CM_DEPLOY_SCAN_CPU_EXACT=1. On the CI machine (x86-64, AVX-512) one state update costs 4.5 ns
// exact, 1.8 ns fast with SSE2 only, 0.5 ns fast with AVX2 or AVX-512 (GCC builds those clones and
// picks one at load time). On aarch64 (Jetson-class boards) the vectorizer turns stepFast into NEON
// code, 4 states an iteration (NEON is part of the base ISA, so no clone is needed); an SVE clone would
// need target_clones on aarch64, which GCC only has from version 14 (docs/jetson.md).
using StepFn = float (*)(float const* A, float const* c, float* next, float const* B, float const* C, int32_t N,
    float dt, float dtu);

float stepExact(float const* A, float const* c, float* next, float const* B, float const* C, int32_t N, float dt,
    float dtu)
{
    float yv = 0.0f;
    for (int32_t n = 0; n < N; ++n)
    {
        float const h = std::exp(dt * A[n]) * c[n] + dtu * B[n];
        next[n] += h;
        yv += C[n] * h;
    }
    return yv;
}

// exp(x) = 2^i e^y: i = round(x log2 e) (the 1.5 * 2^23 trick), y = x - i ln 2 (Cody-Waite: i * ln2_hi
// is exact), e^y by its degree-7 Taylor polynomial (|y| <= ln2 / 2: < 1e-7 relative), 2^i added to
// the exponent bits. Only arithmetic, bit moves and integer selects, so compilers vectorize it. The
// decay is 0 below 2^-99.5 (x < -69): a tiny nonzero factor would only make states subnormal (a slow
// path on x86); above 2^127 it saturates (a state that large has overflowed anyway).
__attribute__((always_inline)) inline float expPoly(float x)
{
    float const t = x * 1.44269504088896341f;
    float const m = t + 12582912.0f;
    float const r = m - 12582912.0f;
    int32_t mb;
    std::memcpy(&mb, &m, sizeof mb);
    int32_t i = mb - 0x4B400000;
    float y = x - r * 0.693359375f;
    y = y - r * -2.12194440e-4f;
    float p = 1.0f / 5040.0f;
    p = p * y + 1.0f / 720.0f;
    p = p * y + 1.0f / 120.0f;
    p = p * y + 1.0f / 24.0f;
    p = p * y + 1.0f / 6.0f;
    p = p * y + 0.5f;
    p = p * y + 1.0f;
    p = p * y + 1.0f;
    int32_t const keep = -static_cast<int32_t>(i > -100); // all ones, or 0 (flush)
    i = i > 127 ? 127 : i;
    int32_t pb;
    std::memcpy(&pb, &p, sizeof pb);
    pb = (pb + static_cast<int32_t>(static_cast<uint32_t>(i) << 23)) & keep;
    std::memcpy(&p, &pb, sizeof p);
    return p;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#endif
float stepFast(float const* A, float const* c, float* next, float const* B, float const* C, int32_t N, float dt,
    float dtu)
{
    float yv = 0.0f;
#pragma omp simd reduction(+ : yv)
    for (int32_t n = 0; n < N; ++n)
    {
        float const h = expPoly(dt * A[n]) * c[n] + dtu * B[n];
        next[n] += h;
        yv += C[n] * h;
    }
    return yv;
}

StepFn chooseStep()
{
    char const* exact = std::getenv("CM_DEPLOY_SCAN_CPU_EXACT");
    return (exact != nullptr && exact[0] == '1') ? stepExact : stepFast;
}

float softplus(float x)
{
    // log(1 + e^x) without overflow; as torch.nn.functional.softplus (threshold 20)
    return x > 20.0f ? x : std::log1p(std::exp(x));
}

template <typename IO>
void scanItem(ScanArgs const& a, int64_t item)
{
    static StepFn const step = chooseStep();
    int64_t const etiles = (a.E + kCpuChannelTile - 1) / kCpuChannelTile;
    int64_t const b = item / etiles;
    int32_t const e0 = static_cast<int32_t>(item % etiles) * kCpuChannelTile;
    int32_t const e1 = std::min(a.E, e0 + kCpuChannelTile);
    int32_t const nch = e1 - e0;
    int32_t const M = a.M, N = a.N, E = a.E;
    int64_t const L = a.L;

    std::vector<float> c(static_cast<size_t>(nch) * N), next(c.size());
    if (a.initialState != nullptr)
    {
        std::memcpy(c.data(), a.initialState + (b * E + e0) * static_cast<int64_t>(N), c.size() * sizeof(float));
    }
    std::vector<float> Bt(N), Ct(N);
    for (int64_t t = 0; t < L; ++t)
    {
        std::fill(next.begin(), next.end(), 0.0f);
        for (int32_t m = 0; m < M; ++m)
        {
            int64_t const row = (b * M + m) * L + t;  // (b, m, t) row of u, delta, z, B, C
            for (int32_t n = 0; n < N; ++n)
            {
                Bt[n] = IO::load(a.B, row * N + n);
                Ct[n] = IO::load(a.C, row * N + n);
            }
            for (int32_t j = 0; j < nch; ++j)
            {
                int32_t const e = e0 + j;
                int64_t const i = row * E + e;
                float const uv = IO::load(a.u, i);
                float dt = IO::load(a.delta, i) + a.deltaBias[m * E + e];
                if (a.deltaSoftplus)
                {
                    dt = softplus(dt);
                }
                float const dtu = dt * uv;
                float const* Ame = a.A + (static_cast<int64_t>(m) * E + e) * N;
                float const* cj = c.data() + static_cast<size_t>(j) * N;
                float* nj = next.data() + static_cast<size_t>(j) * N;
                float yv = step(Ame, cj, nj, Bt.data(), Ct.data(), N, dt, dtu);
                yv += a.D[m * E + e] * uv;
                float const zv = IO::load(a.z, i);
                yv *= zv / (1.0f + std::exp(-zv)); // silu(z) gate
                IO::store(a.y, i, yv);
            }
        }
        for (size_t k = 0; k < c.size(); ++k)
        {
            c[k] = a.kappa * next[k];
        }
    }
    if (a.finalState != nullptr)
    {
        std::memcpy(a.finalState + (b * E + e0) * static_cast<int64_t>(N), c.data(), c.size() * sizeof(float));
    }
}

} // namespace

void coupledScanCpuItem(ActType type, ScanArgs const& a, int64_t item)
{
    switch (type)
    {
    case ActType::kFLOAT32: scanItem<F32>(a, item); break;
    case ActType::kFLOAT16: scanItem<F16>(a, item); break;
    case ActType::kBFLOAT16: scanItem<BF16>(a, item); break;
    }
}

} // namespace scan
} // namespace cm_deploy
