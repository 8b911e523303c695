// CoupledScan on the CPU: plain C++ (no CUDA), the same math and tensor contract as the CUDA kernel.
// Used by the ONNX Runtime library's CPU kernel (edge CPUs, CI). Pointers in ScanArgs are host memory.
#pragma once

#include "scan_types.h"

#include <cstdint>

namespace cm_deploy
{
namespace scan
{

// Scalar conversions for the 16-bit activation types (round to nearest even, NaN and Inf kept).
float halfToFloat(uint16_t h);
uint16_t floatToHalf(float f);
float bfloat16ToFloat(uint16_t b);
uint16_t floatToBfloat16(float f);

// Channels per work item of coupledScanCpuItem: items = batch * ceil(E / kCpuChannelTile).
constexpr int32_t kCpuChannelTile = 16;

inline int64_t cpuWorkItems(ScanArgs const& a)
{
    return a.batch * ((static_cast<int64_t>(a.E) + kCpuChannelTile - 1) / kCpuChannelTile);
}

// One work item: batch row item / etiles, channels [tile * kCpuChannelTile, ...). Items are
// independent (a thread pool may run them in any order, cpuWorkItems of them). a.work is not used.
void coupledScanCpuItem(ActType type, ScanArgs const& a, int64_t item);

} // namespace scan
} // namespace cm_deploy
