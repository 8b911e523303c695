// Kernel instances for float activations (one file per type so they compile in parallel).
#include "scan_kernel_impl.cuh"

namespace cm_deploy
{
namespace scan
{

cudaError_t launchCoupledScanF32(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream)
{
    return launchTyped<float>(a, g, stream);
}

} // namespace scan
} // namespace cm_deploy
