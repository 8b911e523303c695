// The one CUDA helper of the Triton path: the contract's states are (batch, E, N), the Triton kernels'
// (batch, N, E) (e along the lanes); initial_state and final_state are transposed on the way.
#include "scan_launch.h"

namespace cm_deploy
{
namespace scan
{
namespace
{

constexpr int kTile = 32;

// (batch, rows, cols) -> (batch, cols, rows), one 32 x 32 tile a block through shared memory
__global__ void transposeKernel(float const* __restrict__ src, float* __restrict__ dst, int32_t rows, int32_t cols)
{
    __shared__ float tile[kTile][kTile + 1];
    size_t const base = static_cast<size_t>(blockIdx.z) * rows * cols;
    int32_t const c0 = blockIdx.x * kTile, r0 = blockIdx.y * kTile;
    for (int32_t i = threadIdx.y; i < kTile; i += blockDim.y)
    {
        int32_t const r = r0 + i, c = c0 + threadIdx.x;
        if (r < rows && c < cols)
        {
            tile[i][threadIdx.x] = src[base + static_cast<size_t>(r) * cols + c];
        }
    }
    __syncthreads();
    for (int32_t i = threadIdx.y; i < kTile; i += blockDim.y)
    {
        int32_t const c = c0 + i, r = r0 + threadIdx.x;
        if (r < rows && c < cols)
        {
            dst[base + static_cast<size_t>(c) * rows + r] = tile[threadIdx.x][i];
        }
    }
}

} // namespace

cudaError_t transposeStates(float const* src, float* dst, int64_t batch, int32_t rows, int32_t cols, cudaStream_t stream)
{
    if (batch <= 0 || batch > 65535)
    {
        return batch == 0 ? cudaSuccess : cudaErrorInvalidValue;
    }
    dim3 const grid((cols + kTile - 1) / kTile, (rows + kTile - 1) / kTile, static_cast<unsigned>(batch));
    transposeKernel<<<grid, dim3(kTile, 8), 0, stream>>>(src, dst, rows, cols);
    return cudaGetLastError();
}

} // namespace scan
} // namespace cm_deploy
