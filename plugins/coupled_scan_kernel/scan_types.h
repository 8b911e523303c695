// Plain data shared by the host launcher, the kernels and the CPU tests. No CUDA or TensorRT here,
// so the launch geometry can be chosen and tested without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

// Functions used by both the host launcher and the kernels.
#if defined(__CUDACC__)
#define CM_SCAN_HD __host__ __device__
#else
#define CM_SCAN_HD
#endif

namespace cm_deploy
{
namespace scan
{

enum class ActType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
    kBFLOAT16 = 2,
};

// Operator limits (README "Limits"). M is bounded because the per-thread copies of A are unrolled
// over a compile-time modality capacity; N because a channel's states must fit in one block and the
// staged B, C of all M modalities in shared memory (M = 8, N = 512 needs ~75 KB: fits every target GPU).
constexpr int32_t kMaxModalities = 8;
constexpr int32_t kMaxStates = 512;
// Threads per block (consumers + producers); the kernels' __launch_bounds__ assume it.
constexpr int32_t kMaxBlockThreads = 192;

// Pointers and runtime sizes, exactly the tensor contract of DESIGN.md section 3.
struct ScanArgs
{
    void const* u{};
    void const* delta{};
    float const* A{};
    void const* B{};
    void const* C{};
    float const* D{};
    void const* z{};
    float const* deltaBias{};
    float const* initialState{}; // may be null: c[0] = 0
    void* y{};
    float* finalState{}; // may be null: not requested
    float* work{};       // segment summaries {P, off} per (batch, segment, e, n); needed when geometry.segs > 1
    int64_t batch{};
    int32_t M{};
    int64_t L{};
    int32_t E{};
    int32_t N{};
    int32_t deltaSoftplus{};
    float kappa{};
};

// How one launch is laid out; identical for every block. Each block owns one batch row and `ch`
// channels. Its first `nc` threads ("consumers") hold the states: `lpc` threads per channel, `npt`
// states each. The last `np` threads ("producers") stage the next chunk of `tc` time steps into shared
// memory and finish the previous chunk's outputs while the consumers run the recurrence.
struct ScanGeometry
{
    int32_t npt{};   // states per consumer thread (a template parameter of the kernel: 1, 2, 4 or 8)
    int32_t mt{};    // modality capacity of the kernel (4 or 8), >= M
    int32_t lpc{};   // consumer threads per channel, ceil(N / npt)
    int32_t ch{};    // channels per block
    int32_t nc{};    // consumer threads, a multiple of 32
    int32_t np{};    // producer threads, a multiple of 32
    int32_t tc{};    // time steps per chunk
    int32_t npad{};  // lpc * npt >= N
    int32_t S{};     // row stride (floats) of the partial-sum buffer, chosen against bank conflicts
    int64_t etiles{}; // ceil(E / ch)
    int64_t blocks{}; // batch * etiles (blocks of one segment)
    int32_t segs{1};  // segments of L scanned in parallel (two passes: summaries, then the scan proper)
    int64_t segLen{}; // steps per segment (the last may be shorter)
    size_t smemBytes{};
};

struct DeviceLimits
{
    int32_t smCount{132};
    size_t smemOptinPerBlock{227 * 1024};
    size_t smemPerSM{228 * 1024};
    int32_t ccMajor{9}; // compute capability (which Triton cubins run)
    int32_t ccMinor{0};
};

// Tuning knobs for benchmarks (env CM_DEPLOY_SCAN_NPT / _TC / _TARGET_WARPS); 0 means automatic.
struct ScanOverrides
{
    int32_t npt{0};
    int32_t tc{0};
    int32_t targetWarpsPerSM{0};
    int32_t segs{0}; // 1: never split L; >1: split into that many segments (capped); 0: automatic
};

// L is split into segments only while batch * segs <= kMaxSegmentRows (this bounds the workspace:
// kMaxSegmentRows * E * N float2) and each segment keeps at least kMinSegmentLen steps.
constexpr int32_t kMaxSegmentRows = 32;
constexpr int64_t kMinSegmentLen = 128;

// Workspace bytes the plugin asks for (an upper bound for every batch and L).
inline size_t segmentWorkspaceBytes(int64_t E, int64_t N)
{
    return static_cast<size_t>(kMaxSegmentRows) * static_cast<size_t>(E) * static_cast<size_t>(N) * 2 * sizeof(float);
}

// Float offsets of the shared-memory buffers inside one of the two pipeline stages.
struct SmemLayout
{
    size_t xf{};   // float2 {dt, dt*u} per (t, m, channel)
    size_t ep{};   // float2 {D*u, silu(z)} per (t, m, channel)
    size_t bc{};   // float2 {B[n], C[n]} per (t, m, n < npad)
    size_t part{}; // float partial y per (t, m, channel) row, `lpc` used of `S` per row
    size_t stageFloats{}; // floats per stage; two stages in all
};

CM_SCAN_HD inline size_t roundUp4(size_t x)
{
    return (x + 3) / 4 * 4;
}

CM_SCAN_HD inline SmemLayout smemLayout(ScanGeometry const& g, int32_t M)
{
    SmemLayout s;
    size_t const rowsA = static_cast<size_t>(g.tc) * M * g.ch;
    size_t const rowsB = static_cast<size_t>(g.tc) * M;
    s.xf = 0;
    s.ep = roundUp4(s.xf + 2 * rowsA);
    s.bc = roundUp4(s.ep + 2 * rowsA);
    s.part = roundUp4(s.bc + 2 * rowsB * g.npad);
    s.stageFloats = roundUp4(s.part + rowsA * g.S);
    return s;
}

// Row stride of the partial buffer: a producer reads one row per thread (float4 when lpc % 4 == 0),
// so rows must fall on different banks: stride/4 odd for float4 reads, stride odd for scalar reads.
CM_SCAN_HD inline int32_t partialStride(int32_t lpc)
{
    if (lpc % 4 == 0)
    {
        return ((lpc / 4) % 2 == 1) ? lpc : lpc + 4;
    }
    return (lpc % 2 == 1) ? lpc : lpc + 1;
}

// Chooses the launch geometry for one call. Returns false (with a reason) when the shape is outside
// the operator limits or does not fit the device.
bool chooseGeometry(int64_t batch, int32_t M, int64_t L, int32_t E, int32_t N, DeviceLimits const& dev,
    ScanOverrides const& ov, ScanGeometry& g, std::string* why);

} // namespace scan
} // namespace cm_deploy
