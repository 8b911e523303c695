// Dispatch from the runtime geometry to a compiled kernel instance; included by one .cu per type.
#pragma once

#include "scan_kernel.cuh"
#include "scan_launch.h"

namespace cm_deploy
{
namespace scan
{

template <typename T, int NPT, int MT>
cudaError_t launchInstance(ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream)
{
    auto* kernel = &coupledScanKernel<T, NPT, MT>;
    cudaError_t err = ensureDynamicSmem(reinterpret_cast<void const*>(kernel), g.smemBytes);
    if (err != cudaSuccess)
    {
        return err;
    }
    kernel<<<static_cast<unsigned>(g.blocks), static_cast<unsigned>(g.nc + g.np), g.smemBytes, stream>>>(a, g);
    return cudaGetLastError();
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
    if (g.blocks > 0x7fffffffLL || a.M > g.mt)
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
