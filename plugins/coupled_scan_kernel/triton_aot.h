// The Triton forward (cm_deploy/ops/triton_scan.py), compiled ahead of time by triton_aot/generate.py:
// the table of compiled specializations, the C++ port of the Python launch planner (`_plan`, inference
// on a GPU) and the workspace layout of a launch. Plain C++ (no CUDA): the CPU tests check the planner
// against Python's and the tactic logic without a GPU. Launching: triton_launch.cpp.
#pragma once

#include "scan_types.h"

#include <cstddef>
#include <cstdint>
#include <string>

namespace cm_deploy
{
namespace scan
{

// Which implementation runs a call. kAuto: the Triton kernel where one is compiled for the shape, type
// and device, else the CUDA block kernel. The values are the TensorRT plugin's tactics (0: its default).
enum class ScanImpl : int32_t
{
    kAuto = 0,
    kCuda = 1,
    kTriton = 2,
};
char const* implName(ScanImpl impl);

enum class TritonKernelKind : int32_t
{
    kScan = 0,    // _fwd_kernel, SUMMARY off: y and the final state
    kSummary = 1, // _fwd_kernel, SUMMARY on: each segment's transition P and end state S
    kCombine = 2, // _fwd_combine_kernel: the segments' start states from P, S and the initial state
};

// One compiled specialization (a row of the generated table). Compile-time flags the generator fixes
// for every row: full delta (DT_RANK 0), no checkpoints, D, z and delta_bias present, FOLD (kappa > 0).
struct TritonAotSpec
{
    int32_t kind;      // TritonKernelKind
    int32_t act;       // ActType (kFLOAT32 for kCombine)
    int32_t M, N;      // N_C; 0 for kCombine
    int32_t blockE, blockN, T, numWarps, yParts; // blockE of kCombine: its BLOCK (states a program)
    int32_t softplus;  // SOFTPLUS
    int32_t hasC0;     // HAS_C0
    int32_t fastExp, pfBc;
    uint32_t sharedBytes; // dynamic shared memory of a launch (Triton's metadata.shared)
    int32_t extraPtrs;    // trailing pointer parameters Triton appends (global / profile scratch): null
    uint32_t archMask;    // bit i: compiled for kTritonAotArchs[i]
    int32_t params;       // the kernel's parameters in all (the launcher checks it passes that many)
};

// The embedded fatbinary of a table row (same index) and its kernel's name.
struct TritonAotBlob
{
    unsigned char const* begin;
    unsigned char const* end;
    char const* kernel;
};

// Generated (or the empty tables of triton_aot_none.cpp when the build has no Triton kernels).
extern TritonAotSpec const kTritonAotSpecs[];
extern int32_t const kTritonAotSpecCount;
extern int32_t const kTritonAotArchs[];
extern int32_t const kTritonAotArchCount;
extern char const* const kTritonAotBuildInfo;
extern TritonAotBlob const kTritonAotBlobs[];

// _plan(batch, M, L, E, N, cuda, bwd=False, elem_size) without overrides (cm_deploy/ops/triton_scan.py).
struct TritonPlan
{
    int32_t blockE{}, blockN{}, numWarps{};
    int32_t nSeg{};
    int32_t nSegAsked{}; // before the rounding that keeps every segment non-empty: >= nSeg, grows with L
    int64_t segLen{};
    int32_t chunkT{}, yParts{};
    bool fastExp{}, pfBc{};
};
// Needs L >= 1 (Python handles L = 0 without a kernel).
TritonPlan planTritonForward(int64_t batch, int32_t M, int64_t L, int32_t E, int32_t N, int32_t elemSize, int32_t smCount);

// Planning assumes at most this many SMs (every sm_80 .. sm_90 GPU has fewer), so that a workspace
// sized on one machine (TensorRT's getWorkspaceSize) holds on any other.
constexpr int32_t kTritonPlanMaxSms = 160;

// Whether a cubin built for `arch` (e.g. 80, 90) runs on a device of compute capability major.minor
// (sm_90 and later are Triton's arch-specific "a" targets: that exact device only).
bool tritonArchRuns(int32_t arch, int32_t ccMajor, int32_t ccMinor);

// The kernels of one call: table rows (-1: not needed), the plan, and the workspace layout (byte
// offsets into the workspace; each region 256-byte aligned).
struct TritonLaunch
{
    TritonPlan plan;
    int32_t scan{-1}, summary{-1}, combine{-1};
    int32_t T{}, yParts{};   // of the compiled scan kernel (its T may exceed the plan's for short L)
    int64_t eBlocks{};
    size_t scratch{}, initT{}, c0{}, P{}, S{}, final{};
    size_t bytes{};
};

// Chooses the Triton kernels for a call on a device of compute capability ccMajor.ccMinor with smCount
// SMs; false (with the reason) when none is compiled for it or the call is outside what they take:
// E % 16 == 0, kappa > 0, batch <= 65535, L >= 1, element offsets within int32 (the compiled kernels
// take them as i32, divisible by 16 where Triton's JIT would specialise them so).
bool chooseTritonLaunch(ActType type, int64_t batch, int32_t M, int64_t L, int32_t E, int32_t N, bool softplus,
    float kappa, bool hasInitial, int32_t ccMajor, int32_t ccMinor, int32_t smCount, TritonLaunch& out,
    std::string* why);

// Whether this library has Triton kernels for the type, M, E, N, softplus and kappa for some device (any
// batch and L): where a TensorRT engine reserves their workspace, whatever device builds it.
bool tritonCompiled(ActType type, int32_t M, int32_t E, int32_t N, bool softplus, float kappa);

// Workspace bytes a TensorRT engine asks for: the Triton launch's at every batch <= batchMax and
// L <= lMax on any device (0 when tritonCompiled is false).
size_t tritonWorkspaceBound(ActType type, int64_t batchMax, int32_t M, int64_t lMax, int32_t E, int32_t N, bool softplus,
    float kappa);

// Environment override CM_DEPLOY_SCAN_IMPL (auto, cuda, triton; unset: the CUDA kernel), read once.
// Returns false with the reason for any other value.
bool envScanImpl(ScanImpl& out, std::string* why);

// Whether CM_DEPLOY_SCAN_IMPL opts in to the Triton kernels (auto or triton); unset: the CUDA kernel.
bool tritonOptIn();

} // namespace scan
} // namespace cm_deploy
