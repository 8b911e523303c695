// Minimal kernels with the CoupledScan kernel's shared-memory hand-off, for compute-sanitizer
// racecheck (issue 11): consumers read stage k & 1 while producers fill stage (k + 1) & 1; a
// __syncthreads ends every chunk. Variant `named` adds the kernel's producer-only named barrier
// (barrier.sync 1, np) between the producers' epilogue read and their next stage write; variant
// `plain` has no named barrier (the epilogue's slots are triple-buffered instead). Both orders are
// correct by construction: every write to a stage happens after the __syncthreads that follows the
// last read of that stage. If racecheck reports `named` and not `plain`, its report on the real
// kernel comes from how it models named barriers with a thread count, not from a race.
//
//   racecheck_handoff [named|plain]     -> prints "ok" when the consumers saw every value produced
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

constexpr int kConsumers = 64, kProducers = 32, kChunk = 64, kChunks = 8;

template <bool NAMED>
__global__ void handoff(float* out)
{
    __shared__ float stage[2][kChunk];
    __shared__ float epi[3][kChunk]; // read by the producers one chunk after they wrote it
    int const tid = threadIdx.x;
    bool const consumer = tid < kConsumers;
    int const p = tid - kConsumers;
    float acc = 0.f;
    if (!consumer)
    {
        for (int i = p; i < kChunk; i += kProducers)
        {
            stage[0][i] = static_cast<float>(i);
            epi[0][i] = 1.f;
        }
    }
    __syncthreads();
    for (int k = 0; k <= kChunks; ++k)
    {
        if (consumer)
        {
            if (k < kChunks)
            {
                for (int i = 0; i < kChunk; ++i)
                {
                    acc += stage[k & 1][i];
                }
            }
        }
        else
        {
            if (k >= 1)
            {
                for (int i = p; i < kChunk; i += kProducers)
                {
                    acc += epi[NAMED ? ((k - 1) & 1) : ((k - 1) % 3)][i];
                }
            }
            if (NAMED)
            {
                asm volatile("barrier.sync 1, %0;" ::"r"(kProducers) : "memory");
            }
            if (k + 1 < kChunks)
            {
                for (int i = p; i < kChunk; i += kProducers)
                {
                    stage[(k + 1) & 1][i] = static_cast<float>(i + (k + 1) * kChunk);
                    epi[NAMED ? ((k + 1) & 1) : ((k + 1) % 3)][i] = 1.f;
                }
            }
        }
        __syncthreads();
    }
    out[tid] = acc;
}

int main(int argc, char** argv)
{
    bool const named = argc < 2 || std::strcmp(argv[1], "plain") != 0;
    float* d = nullptr;
    int const n = kConsumers + kProducers;
    if (cudaMalloc(&d, n * sizeof(float)) != cudaSuccess)
    {
        std::printf("no CUDA device\n");
        return 2;
    }
    if (named)
        handoff<true><<<1, n>>>(d);
    else
        handoff<false><<<1, n>>>(d);
    float h[kConsumers + kProducers];
    cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
    cudaFree(d);
    // every consumer sums all values 0 .. kChunks * kChunk - 1; a producer its epilogue reads
    double const want = 0.5 * (kChunks * kChunk - 1.0) * (kChunks * kChunk);
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int i = 0; i < kConsumers; ++i)
        ok = ok && h[i] == static_cast<float>(want);
    std::printf("%s %s\n", named ? "named" : "plain", ok ? "ok" : "WRONG");
    return ok ? 0 : 1;
}
