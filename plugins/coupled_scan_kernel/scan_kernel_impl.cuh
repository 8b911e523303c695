// Dispatch from the runtime geometry to a compiled kernel instance; included by one .cu per type.
#pragma once

#include "scan_kernel.cuh"
#include "scan_launch.h"

namespace cm_deploy
{
namespace scan
{

template <typename T, int NPT, int MT, bool SUMMARY>
cudaError_t launchPass(ScanArgs const& a, ScanGeometry const& g, int64_t blocks, cudaStream_t stream)
{
    auto* kernel = &coupledScanKernel<T, NPT, MT, SUMMARY>;
    cudaError_t err = ensureDynamicSmem(reinterpret_cast<void const*>(kernel), g.smemBytes);
    if (err != cudaSuccess)
    {
        return err;
    }
    kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(g.nc + g.np), g.smemBytes, stream>>>(a, g);
    return cudaGetLastError();
}

// g.segs > 1: the summary pass (segments 0..segs-2 write {P, off} to a.work), then the scan proper,
// whose blocks start from the state carried through the summaries of the segments before theirs.
template <typename T, int NPT, int MT>
cudaError_t launchInstance(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream)
{
    if (g.segs > 1)
    {
        if (a.work == nullptr)
        {
            return cudaErrorInvalidValue;
        }
        cudaError_t const err = launchPass<T, NPT, MT, true>(a, g, g.blocks * (g.segs - 1), stream);
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    return launchPass<T, NPT, MT, false>(a, g, g.blocks * g.segs, stream);
}

template <typename T, int MT>
cudaError_t launchForNpt(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream)
{
    switch (g.npt)
    {
    case 1: return launchInstance<T, 1, MT>(a, g, stream);
    case 2: return launchInstance<T, 2, MT>(a, g, stream);
    case 4: return launchInstance<T, 4, MT>(a, g, stream);
    case 8: return launchInstance<T, 8, MT>(a, g, stream);
    default: return cudaErrorInvalidValue;
    }
}

template <typename T>
cudaError_t launchTyped(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream)
{
    if (g.blocks <= 0)
    {
        return cudaSuccess;
    }
    if (g.blocks * g.segs > 0x7fffffffLL || g.segs < 1 || a.M > g.mt)
    {
        return cudaErrorInvalidValue;
    }
    switch (g.mt)
    {
    case 4: return launchForNpt<T, 4>(a, g, stream);
    case 8: return launchForNpt<T, 8>(a, g, stream);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace scan
} // namespace cm_deploy
