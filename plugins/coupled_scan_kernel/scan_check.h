// Shape checks of the CoupledScan tensor contract (DESIGN.md section 3) for adapters that see plain
// shape vectors (the ONNX Runtime library; the TensorRT plugin checks its Dims in checkIo).
#pragma once

#include "scan_types.h"

#include <cstdint>
#include <string>
#include <vector>

namespace cm_deploy
{
namespace scan
{

// Inputs in the contract's order.
enum ScanInput : int32_t
{
    kInU = 0,
    kInDelta,
    kInA,
    kInB,
    kInC,
    kInD,
    kInZ,
    kInDeltaBias,
    kInInitialState, // optional
    kNbScanInputs
};

extern char const* const kScanInputNames[kNbScanInputs];

// `shapes`: 8 (no initial state) or 9 input shapes. On success fills a.batch, M, L, E, N; otherwise
// returns false with one sentence in `why`.
bool checkScanShapes(std::vector<std::vector<int64_t>> const& shapes, ScanArgs& a, std::string& why);

} // namespace scan
} // namespace cm_deploy
