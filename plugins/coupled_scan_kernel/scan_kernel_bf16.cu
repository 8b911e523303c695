// Kernel instances for __nv_bfloat16 activations (one file per type so they compile in parallel).
#include "scan_kernel_impl.cuh"

namespace cm_deploy
{
namespace scan
{

cudaError_t launchCoupledScanBF16(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream)
{
    return launchTyped<__nv_bfloat16>(a, g, stream);
}

} // namespace scan
} // namespace cm_deploy
