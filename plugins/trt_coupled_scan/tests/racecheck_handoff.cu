// The block kernel's shared-memory hand-off alone (coupledScanKernel, plugins/coupled_scan_kernel/
// scan_kernel.cuh), for compute-sanitizer racecheck (issue 20). Same layout and sizes as the block
// kernel at the GPU harness's `tiny_segmented` case, the one multi-chunk launch of `--sanitize` and
// the one racecheck reported at a115b47 (RAW: producers' stage() store of bc, consumers' 16-byte
// load4 of bc): 128 consumer and 64 producer threads, two blocks, two pipeline stages in 230,912
// bytes of dynamic shared memory laid out as smemLayout() does (xf, ep, bc, part), chunks of 22
// steps x 2 modalities x 128 channels, 8 states, 7 chunks (the last one 18 steps).
//
// Chunk k (one loop iteration, ended by __syncthreads()):
//   consumers  read xf (8-byte loads, their channel's rows) and bc (16-byte loads, every state of every
//              row, as compute() does) of stage k & 1; write part of stage k & 1;
//   producers  epilogue(k - 1): read part and ep of stage (k - 1) & 1, skipping some rows (as the
//              epilogue skips channels >= E: lanes diverge); then stage(k + 1): write xf, ep, bc of the
//              same stage. Between the two, variant `named` has `barrier.sync 1, np` among the producers
//              (the kernel up to a115b47), `plain` only a __syncwarp() (the kernel now).
// The consumers load bc 16 bytes at a time as the kernel does, or, with load width 8, as two float2.
// Race-free in both variants:
//   xf, bc  written in chunk k - 1 before its __syncthreads(), read in chunk k after it, rewritten in
//           chunk k + 1, after chunk k's __syncthreads(), which follows every read;
//   part    written by the consumers in chunk k, read by the producers in chunk k + 1, rewritten in k + 2;
//   ep      row i is written by stage() and read back by the epilogue of the same producer thread
//           (i = ptid + j * np in both walks): one thread's program order, no barrier needed.
// Every value read is checked against what its writer stored for that chunk; mismatches are counted.
//
//   racecheck_handoff <named|plain> <producer warps: 1|2> <bc load bytes: 16|8>  -> e.g. "named 2 16: ok"
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace
{
constexpr int kConsumers = 128;
constexpr int kTc = 22, kM = 2, kCh = 128, kNpad = 8;
constexpr int kLen = 150; // steps of one segment: chunks of 22, the last one 18
constexpr int kChunks = (kLen + kTc - 1) / kTc;
constexpr int kRowsA = kTc * kM * kCh; // (t, m, channel) rows of xf, ep and part
constexpr int kRowsB = kTc * kM;       // (t, m) rows of bc, kNpad states each
// float offsets inside one stage (smemLayout with lpc = S = 1)
constexpr int kXf = 0, kEp = kXf + 2 * kRowsA, kBc = kEp + 2 * kRowsA, kPart = kBc + 2 * kRowsB * kNpad;
constexpr int kStage = kPart + kRowsA;
constexpr size_t kSmemBytes = 2 * kStage * sizeof(float);

__device__ int steps(int k)
{
    return min(kTc, kLen - k * kTc);
}

// What the writer of slot i of `buffer` stores in chunk k: distinct per chunk, exact in float.
__device__ float val(int k, int buffer, int i)
{
    return static_cast<float>((k * 4 + buffer) * 65536 + i);
}

// One 8-byte shared-memory load (volatile: ptxas merges two adjacent plain ones into one 16-byte load).
__device__ float2 load8(float const* p)
{
    float2 v;
    asm volatile("ld.volatile.shared.v2.f32 {%0, %1}, [%2];"
                 : "=f"(v.x), "=f"(v.y)
                 : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p)))
                 : "memory");
    return v;
}

template <bool NAMED, bool LOAD16>
__global__ void __launch_bounds__(192) handoff(int* mismatches)
{
    extern __shared__ float4 smemRaw[];
    float* const smem = reinterpret_cast<float*>(smemRaw);
    auto stageOf = [&](int k) { return smem + (k & 1) * kStage; };
    int const tid = threadIdx.x;
    int const np = blockDim.x - kConsumers;
    int const ptid = tid - kConsumers;
    int bad = 0;
    auto stage = [&](int k) {
        float* s = stageOf(k);
        float2* xf = reinterpret_cast<float2*>(s + kXf);
        float2* ep = reinterpret_cast<float2*>(s + kEp);
        float2* bc = reinterpret_cast<float2*>(s + kBc);
        for (int i = ptid; i < steps(k) * kM * kCh; i += np)
        {
            xf[i] = make_float2(val(k, 0, i), val(k, 0, i));
            ep[i] = make_float2(val(k, 1, i), val(k, 1, i));
        }
        for (int i = ptid; i < steps(k) * kM * kNpad; i += np)
        {
            bc[i] = make_float2(val(k, 2, 2 * i), val(k, 2, 2 * i + 1));
        }
    };
    if (tid >= kConsumers)
    {
        stage(0);
    }
    __syncthreads();
    for (int k = 0; k <= kChunks; ++k)
    {
        if (tid < kConsumers)
        {
            if (k < kChunks)
            {
                float* s = stageOf(k);
                float2 const* xf = reinterpret_cast<float2 const*>(s + kXf);
                float const* bc = s + kBc;
                for (int row = 0; row < steps(k) * kM; ++row)
                {
                    int const i = row * kCh + tid;
                    float2 const d = xf[i];
                    bad += (d.x != val(k, 0, i)) + (d.y != val(k, 0, i));
                    for (int p = 0; p < kNpad / 2; ++p)
                    {
                        int const f = 2 * (row * kNpad + 2 * p); // first float of states 2p, 2p + 1
                        float4 q;
                        if (LOAD16)
                        {
                            q = *reinterpret_cast<float4 const*>(bc + f);
                        }
                        else
                        {
                            float2 const lo = load8(bc + f);
                            float2 const hi = load8(bc + f + 2);
                            q = make_float4(lo.x, lo.y, hi.x, hi.y);
                        }
                        bad += (q.x != val(k, 2, f)) + (q.y != val(k, 2, f + 1)) + (q.z != val(k, 2, f + 2))
                            + (q.w != val(k, 2, f + 3));
                    }
                    s[kPart + i] = val(k, 3, i);
                }
            }
        }
        else
        {
            if (k >= 1)
            {
                float const* s = stageOf(k - 1);
                float2 const* ep = reinterpret_cast<float2 const*>(s + kEp);
                for (int i = ptid; i < steps(k - 1) * kM * kCh; i += np)
                {
                    if (i % 7 == 3)
                    {
                        continue;
                    }
                    float2 const e = ep[i];
                    bad += (s[kPart + i] != val(k - 1, 3, i)) + (e.x != val(k - 1, 1, i)) + (e.y != val(k - 1, 1, i));
                }
            }
            if (NAMED)
            {
                asm volatile("barrier.sync 1, %0;" ::"r"(np) : "memory");
            }
            else
            {
                __syncwarp();
            }
            if (k + 1 < kChunks)
            {
                stage(k + 1);
            }
        }
        __syncthreads();
    }
    atomicAdd(mismatches, bad);
}

template <bool NAMED, bool LOAD16>
cudaError_t run(int threads, int* d)
{
    cudaError_t err = cudaFuncSetAttribute(handoff<NAMED, LOAD16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
        static_cast<int>(kSmemBytes));
    if (err != cudaSuccess)
    {
        return err;
    }
    handoff<NAMED, LOAD16><<<2, threads, kSmemBytes>>>(d);
    return cudaDeviceSynchronize();
}
} // namespace

int main(int argc, char** argv)
{
    bool const named = argc > 1 && std::strcmp(argv[1], "named") == 0;
    int const warps = argc > 2 ? std::atoi(argv[2]) : 2;
    int const bytes = argc > 3 ? std::atoi(argv[3]) : 16;
    if ((argc > 1 && !named && std::strcmp(argv[1], "plain") != 0) || (warps != 1 && warps != 2)
        || (bytes != 8 && bytes != 16))
    {
        std::fprintf(stderr, "usage: racecheck_handoff <named|plain> <producer warps: 1|2> <bc load bytes: 16|8>\n");
        return 2;
    }
    int* d = nullptr;
    if (cudaMalloc(&d, sizeof(int)) != cudaSuccess || cudaMemset(d, 0, sizeof(int)) != cudaSuccess)
    {
        std::fprintf(stderr, "racecheck_handoff: no CUDA device\n");
        return 2;
    }
    int const threads = kConsumers + 32 * warps;
    cudaError_t const err = named ? (bytes == 16 ? run<true, true>(threads, d) : run<true, false>(threads, d))
                                  : (bytes == 16 ? run<false, true>(threads, d) : run<false, false>(threads, d));
    int h = -1;
    cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost);
    cudaFree(d);
    if (err != cudaSuccess)
    {
        std::fprintf(stderr, "racecheck_handoff: %s\n", cudaGetErrorString(err));
        return 2;
    }
    std::printf("%s %d %d: %s (%d mismatched values)\n", named ? "named" : "plain", warps, bytes, h == 0 ? "ok" : "WRONG",
        h);
    return h == 0 ? 0 : 1;
}
