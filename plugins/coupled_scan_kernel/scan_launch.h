// Host entry points of the CoupledScan kernels.
#pragma once

#include "scan_types.h"

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

// What both adapters (TensorRT plugin, ONNX Runtime library) call: picks the geometry for the current
// device and launches on `stream`. `workspace` (device memory of segmentWorkspaceBytes(E, N) bytes)
// lets a small batch split L into segments; null keeps one segment. `used` (optional) receives the
// geometry. Returns false with one sentence in `why`.
bool runCoupledScan(ActType type, ScanArgs a, void* workspace, cudaStream_t stream, std::string& why,
    ScanGeometry* used = nullptr);

} // namespace scan
} // namespace cm_deploy
