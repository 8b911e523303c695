// Host entry points of the CoupledScan kernels.
#pragma once

#include "scan_types.h"
#include "triton_aot.h"

#include <cuda_runtime_api.h>

#include <string>

namespace cm_deploy
{
namespace scan
{

// Launches the kernel on `stream` with geometry `g` (from chooseGeometry). No synchronization.
cudaError_t launchCoupledScan(ActType type, ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream);

// Per activation type, defined in scan_kernel_{f32,f16,bf16}.cu.
cudaError_t launchCoupledScanF32(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream);
cudaError_t launchCoupledScanF16(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream);
cudaError_t launchCoupledScanBF16(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream);

// Limits of the current device, queried once per device.
bool currentDeviceLimits(DeviceLimits& out, std::string* why);

// Raises a kernel's dynamic shared memory limit on the current device when `bytes` needs it.
cudaError_t ensureDynamicSmem(void const* func, size_t bytes);

// Tuning overrides from the environment, read once.
ScanOverrides const& envOverrides();

// One call's choice: which implementation, its launch layout and the workspace it needs.
struct ScanPlan
{
    ScanImpl impl{ScanImpl::kCuda};
    ScanGeometry geometry; // impl kCuda
    TritonLaunch triton;   // impl kTriton
    size_t workspaceBytes{}; // kCuda: segmentWorkspaceBytes(E, N) (L split only with it); kTriton: triton.bytes
};

// What both adapters (TensorRT plugin, ONNX Runtime library) call. planCoupledScan picks the
// implementation for the current device: `want` kCuda or kTriton (a TensorRT tactic) or kAuto (Triton
// where a kernel is compiled for the shape, type and device, else CUDA); CM_DEPLOY_SCAN_IMPL (auto, cuda,
// triton), when set, replaces `want` (tests, benchmarks). Triton asked for but not available is an
// error (with the reason), never a silent fallback. `workspace`: what the caller can give (kNone: auto and
// the CUDA kernel keep L in one segment; kCudaOnly: a TensorRT engine sized for the CUDA kernel alone).
// Returns false with one sentence in `why`.
enum class WorkspaceFor : int32_t
{
    kNone = 0,
    kCudaOnly = 1,
    kAny = 2, // plan.workspaceBytes whatever the plan (ONNX Runtime allocates it; a TensorRT engine reserved it)
};
bool planCoupledScan(
    ActType type, ScanArgs const& a, ScanImpl want, WorkspaceFor workspace, ScanPlan& out, std::string& why);

// Launches `plan` on `stream` (workspace: plan.workspaceBytes of device memory, 16-byte aligned, or
// null for a CUDA plan without segments). No synchronization.
bool runCoupledScan(ActType type, ScanArgs a, ScanPlan const& plan, void* workspace, cudaStream_t stream, std::string& why);

// The Triton path (triton_launch.cpp, triton_glue.cu).
bool tritonPointersAligned(ScanArgs const& a);
bool launchTriton(ScanArgs const& a, TritonLaunch const& l, void* workspace, cudaStream_t stream, std::string& why);
// (batch, rows, cols) float32 -> (batch, cols, rows)
cudaError_t transposeStates(float const* src, float* dst, int64_t batch, int32_t rows, int32_t cols, cudaStream_t stream);

} // namespace scan
} // namespace cm_deploy
