// Kernel instances for __half activations (one file per type so they compile in parallel).
#include "scan_kernel_impl.cuh"

namespace cm_deploy
{
namespace scan
{

cudaError_t launchCoupledScanF16(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream)
{
    return launchTyped<__half>(a, g, stream);
}

} // namespace scan
} // namespace cm_deploy
