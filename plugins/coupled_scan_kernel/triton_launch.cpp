// Launches the ahead-of-time compiled Triton forward (triton_aot.h) through the CUDA runtime's library
// API: each table row's fatbinary is loaded on first use (cudaLibraryLoadData: context-independent, so
// once per process serves every device; the driver picks the image for each device), no libcuda link.
//
// The call, as cm_deploy/ops/triton_scan.py `_forward` makes it (inference: full delta, no checkpoints):
//   initial state (batch, E, N) -> transposed into the workspace as (batch, N, E), the kernels' state
//     layout (zeros without one);
//   segments (plan.nSeg > 1): the SUMMARY pass writes each segment's P and S, the combine kernel the
//     segments' start states;
//   the scan writes y and its final state (batch, N, E) into the workspace, transposed into final_state
//     when the node has that output.
#include "scan_launch.h"
#include "triton_aot.h"

#include <cmath>
#include <memory>
#include <mutex>

namespace cm_deploy
{
namespace scan
{
namespace
{

struct LoadedKernel
{
    std::once_flag once;
    cudaLibrary_t library{};
    cudaKernel_t kernel{};
    cudaError_t err{cudaSuccess};
};

LoadedKernel& loaded(int32_t row)
{
    // one slot per table row, never unloaded (a library outlives every stream that may still run it)
    static std::unique_ptr<LoadedKernel[]> const slots(new LoadedKernel[kTritonAotSpecCount > 0 ? kTritonAotSpecCount : 1]);
    LoadedKernel& k = slots[row];
    std::call_once(k.once, [&k, row] {
        TritonAotBlob const& b = kTritonAotBlobs[row];
        k.err = cudaLibraryLoadData(&k.library, b.begin, nullptr, nullptr, 0, nullptr, nullptr, 0);
        if (k.err == cudaSuccess)
        {
            k.err = cudaLibraryGetKernel(&k.kernel, k.library, b.kernel);
        }
    });
    return k;
}

std::string errorText(char const* what, cudaError_t err)
{
    return std::string(what) + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

// A kernel parameter as the launch reads it: Triton's pointers (8 bytes), i32 and f32 (4 bytes).
union Param
{
    void const* p;
    int32_t i;
    float f;
};

class Params
{
public:
    void ptr(void const* p)
    {
        mValues[mCount].p = p;
        next();
    }
    void i32(int64_t v)
    {
        mValues[mCount].i = static_cast<int32_t>(v);
        next();
    }
    void f32(float v)
    {
        mValues[mCount].f = v;
        next();
    }
    // a contiguous (batch, M, L, K) tensor's element strides of its first three axes
    void rows(int32_t M, int64_t L, int64_t K)
    {
        i32(M * L * K);
        i32(L * K);
        i32(K);
    }
    // with Triton's trailing scratch pointers (null: the generator checks their sizes are 0); null when
    // the count differs from the kernel's (a table from another generator version)
    void** args(int32_t extraPtrs, int32_t params)
    {
        for (int32_t i = 0; i < extraPtrs; ++i)
        {
            ptr(nullptr);
        }
        return mCount == params ? mArgs : nullptr;
    }

private:
    void next()
    {
        if (mCount < kMax) // past that, args() sees a count no kernel has
        {
            mArgs[mCount] = &mValues[mCount];
            ++mCount;
        }
    }
    static constexpr int32_t kMax = 48;
    Param mValues[kMax]{};
    void* mArgs[kMax]{};
    int32_t mCount{0};
};

cudaError_t launch(int32_t row, dim3 grid, Params& params, cudaStream_t stream, std::string& why)
{
    TritonAotSpec const& s = kTritonAotSpecs[row];
    LoadedKernel& k = loaded(row);
    if (k.err != cudaSuccess)
    {
        why = errorText("loading a Triton kernel (cudaLibraryLoadData)", k.err);
        return k.err;
    }
    if (s.sharedBytes > 48 * 1024)
    {
        int dev = 0;
        cudaError_t err = cudaGetDevice(&dev);
        if (err == cudaSuccess)
        {
            err = cudaKernelSetAttributeForDevice(
                k.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(s.sharedBytes), dev);
        }
        if (err != cudaSuccess)
        {
            why = errorText("raising a Triton kernel's shared memory limit", err);
            return err;
        }
    }
    void** args = params.args(s.extraPtrs, s.params);
    if (args == nullptr)
    {
        why = "a Triton kernel's parameter count is not the launcher's (regenerate triton_aot)";
        return cudaErrorInvalidValue;
    }
    cudaError_t const err = cudaLaunchKernel(reinterpret_cast<void const*>(k.kernel), grid,
        dim3(static_cast<unsigned>(s.numWarps * 32)), args, s.sharedBytes, stream);
    if (err != cudaSuccess)
    {
        why = errorText("Triton kernel launch", err);
    }
    return err;
}

bool aligned16(void const* p)
{
    return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

} // namespace

bool tritonPointersAligned(ScanArgs const& a)
{
    // the kernels were compiled for 16-byte aligned tensors (as Triton's JIT specialises them)
    return aligned16(a.u) && aligned16(a.delta) && aligned16(a.A) && aligned16(a.B) && aligned16(a.C) && aligned16(a.D)
        && aligned16(a.z) && aligned16(a.deltaBias) && aligned16(a.y);
}

bool launchTriton(ScanArgs const& a, TritonLaunch const& l, void* workspace, cudaStream_t stream, std::string& why)
{
    if (workspace == nullptr || !aligned16(workspace))
    {
        why = "the Triton kernels need a 16-byte aligned workspace";
        return false;
    }
    auto* ws = static_cast<unsigned char*>(workspace);
    auto region = [ws](size_t off) { return reinterpret_cast<float*>(ws + off); };
    float* const scratch = region(l.scratch);
    float* const final = region(l.final);
    float* const c0 = region(l.c0);
    TritonPlan const& p = l.plan;
    int64_t const EN = static_cast<int64_t>(a.E) * a.N;
    float const log2Kappa = static_cast<float>(std::log2(static_cast<double>(a.kappa)));
    cudaError_t err = cudaSuccess;

    if (a.initialState != nullptr)
    {
        err = transposeStates(a.initialState, region(l.initT), a.batch, a.E, a.N, stream);
    }
    else if (p.nSeg == 1)
    {
        err = cudaMemsetAsync(c0, 0, static_cast<size_t>(a.batch) * EN * sizeof(float), stream);
    }
    if (err != cudaSuccess)
    {
        why = errorText("preparing the initial state", err);
        return false;
    }

    // _fwd_kernel's runtime parameters (triton_aot/generate.py FWD_PARAMS), as _forward passes them
    auto fwdParams = [&](Params& q, void const* C, void const* D, void const* z, void const* y, float* c0p, float* ckpt,
                         float* fin) {
        q.ptr(a.u);
        q.ptr(a.delta);
        q.ptr(a.A);
        q.ptr(a.B);
        q.ptr(C);
        q.ptr(D);
        q.ptr(z);
        q.ptr(a.deltaBias);
        q.ptr(a.A); // W: unused (DT_RANK 0)
        q.ptr(y);
        q.ptr(c0p);
        q.ptr(ckpt);
        q.ptr(fin);
        q.ptr(scratch);
        q.i32(a.L);
        q.i32(a.E);
        q.i32(a.N);
        q.i32(p.segLen);
        q.i32(p.nSeg);
        q.i32(1); // chunk, n_ck: no checkpoints
        q.i32(1);
        q.f32(a.kappa);
        q.f32(log2Kappa);
        int64_t const E = a.E, N = a.N;
        for (int64_t K : {E, E, E, N, N, E})
        {
            q.rows(a.M, a.L, K); // u, delta, z, B, C, y: contiguous (the summary pass's stand-ins alike)
        }
    };
    dim3 const grid(static_cast<unsigned>(l.eBlocks), static_cast<unsigned>(a.batch), 1);
    if (p.nSeg > 1)
    {
        float* const P = region(l.P);
        float* const S = region(l.S);
        // segment summaries (segments 0 .. nSeg-2): P into c0_ptr, S into final_ptr; C, D, z, y unused
        Params q;
        fwdParams(q, a.B, a.A, a.u, a.u, P, S, S);
        if (launch(l.summary, dim3(grid.x, grid.y, static_cast<unsigned>(p.nSeg - 1)), q, stream, why) != cudaSuccess)
        {
            return false;
        }
        Params qc;
        qc.ptr(P);
        qc.ptr(S);
        qc.ptr(a.initialState != nullptr ? region(l.initT) : P);
        qc.ptr(c0);
        qc.i32(EN);
        qc.i32(p.nSeg);
        int64_t const block = kTritonAotSpecs[l.combine].blockE; // BLOCK, as _forward launches it
        unsigned const blocks = static_cast<unsigned>((EN + block - 1) / block);
        if (launch(l.combine, dim3(blocks, static_cast<unsigned>(a.batch), 1), qc, stream, why) != cudaSuccess)
        {
            return false;
        }
    }
    Params q;
    fwdParams(q, a.C, a.D, a.z, a.y, c0, final, final);
    if (launch(l.scan, dim3(grid.x, grid.y, static_cast<unsigned>(p.nSeg)), q, stream, why) != cudaSuccess)
    {
        return false;
    }
    if (a.finalState != nullptr)
    {
        err = transposeStates(final, a.finalState, a.batch, a.N, a.E, stream);
        if (err != cudaSuccess)
        {
            why = errorText("writing final_state", err);
            return false;
        }
    }
    return true;
}

} // namespace scan
} // namespace cm_deploy
