// ONNX Runtime custom-op library: cm_deploy::CoupledScan (DESIGN.md section 3) for the CPU execution
// provider (the plain C++ kernel) and, when built with CUDA, the CUDA execution provider (the same CUDA
// kernel as the TensorRT plugin, on ORT's compute stream). Everything about the op itself lives in
// ../coupled_scan_kernel; this file only maps ORT's kernel API onto it.
//
// Loaded by SessionOptions.register_custom_ops_library(path), which calls RegisterCustomOps. The
// library links no ORT library: it talks to ORT through the API table ORT hands to RegisterCustomOps
// (built against the 1.21 headers: loads into ONNX Runtime >= 1.21).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "scan_check.h"
#include "scan_cpu.h"
#if CM_DEPLOY_WITH_CUDA
#include "scan_launch.h"
#include <cuda_runtime_api.h>
#endif

#include <atomic>
#include <cmath>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace
{
namespace scan = cm_deploy::scan;

constexpr char kDomain[] = "cm_deploy";
constexpr char kOpName[] = "CoupledScan";

struct ScanError : std::exception
{
    explicit ScanError(std::string m)
        : msg("CoupledScan: " + std::move(m))
    {
    }
    char const* what() const noexcept override { return msg.c_str(); }
    std::string msg;
};

// Attributes, validated once when ORT creates the kernel.
struct Attrs
{
    int32_t deltaSoftplus{0};
    float kappa{NAN}; // NaN: coupling_scale absent, 1/M at run time
};

bool hasAttribute(OrtApi const& api, OrtKernelInfo const* info, char const* name, int64_t* i, float* f)
{
    OrtStatus* st = i != nullptr ? api.KernelInfoGetAttribute_int64(info, name, i)
                                 : api.KernelInfoGetAttribute_float(info, name, f);
    if (st != nullptr)
    {
        api.ReleaseStatus(st);
        return false;
    }
    return true;
}

Attrs readAttrs(OrtApi const& api, OrtKernelInfo const* info)
{
    Attrs a;
    int64_t sp = 0;
    if (hasAttribute(api, info, "delta_softplus", &sp, nullptr))
    {
        if (sp != 0 && sp != 1)
        {
            throw ScanError("attribute delta_softplus must be 0 or 1, got " + std::to_string(sp));
        }
        a.deltaSoftplus = static_cast<int32_t>(sp);
    }
    float k = 0.0f;
    if (hasAttribute(api, info, "coupling_scale", nullptr, &k))
    {
        if (!std::isfinite(k))
        {
            throw ScanError("attribute coupling_scale must be finite, got " + std::to_string(k));
        }
        a.kappa = k;
    }
    size_t nOut = 0;
    Ort::ThrowOnError(api.KernelInfo_GetOutputCount(info, &nOut));
    int64_t hf = 0;
    if (hasAttribute(api, info, "has_final_state", &hf, nullptr))
    {
        if (hf != 0 && hf != 1)
        {
            throw ScanError("attribute has_final_state must be 0 or 1, got " + std::to_string(hf));
        }
        if (static_cast<size_t>(1 + hf) != nOut)
        {
            throw ScanError("attribute has_final_state=" + std::to_string(hf) + " but the node has "
                + std::to_string(nOut) + " outputs");
        }
    }
    return a;
}

scan::ActType actType(ONNXTensorElementDataType t, char const* name)
{
    switch (t)
    {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return scan::ActType::kFLOAT32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return scan::ActType::kFLOAT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return scan::ActType::kBFLOAT16;
    default:
        throw ScanError(std::string("input ") + name + " must be float32, float16 or bfloat16 (element type "
            + std::to_string(static_cast<int>(t)) + ")");
    }
}

// Reads the inputs, checks them against the contract and allocates the outputs. The pointers in the
// returned ScanArgs are wherever ORT keeps the tensors (host for the CPU op, device for the CUDA op).
scan::ScanArgs prepare(Ort::KernelContext& ctx, Attrs const& attrs, scan::ActType& type, int& deviceId)
{
    size_t const nIn = ctx.GetInputCount();
    std::vector<Ort::ConstValue> in;
    std::vector<std::vector<int64_t>> shapes;
    for (size_t i = 0; i < nIn; ++i)
    {
        in.push_back(ctx.GetInput(i));
        if (!in.back())
        {
            if (i == scan::kInInitialState)
            {
                in.pop_back(); // optional input left empty
                break;
            }
            throw ScanError(std::string("input ") + scan::kScanInputNames[i] + " is missing");
        }
        if (!in.back().IsTensor())
        {
            throw ScanError(std::string("input ") + scan::kScanInputNames[i] + " must be a tensor");
        }
        shapes.push_back(in.back().GetTensorTypeAndShapeInfo().GetShape());
    }
    scan::ScanArgs a;
    std::string why;
    if (!scan::checkScanShapes(shapes, a, why))
    {
        throw ScanError(why);
    }
    type = actType(in[scan::kInU].GetTensorTypeAndShapeInfo().GetElementType(), "u");
    for (int32_t i : {scan::kInDelta, scan::kInB, scan::kInC, scan::kInZ})
    {
        if (actType(in[i].GetTensorTypeAndShapeInfo().GetElementType(), scan::kScanInputNames[i]) != type)
        {
            throw ScanError(std::string("input ") + scan::kScanInputNames[i] + " must have u's element type");
        }
    }
    for (size_t i : {size_t(scan::kInA), size_t(scan::kInD), size_t(scan::kInDeltaBias), size_t(scan::kInInitialState)})
    {
        if (i < in.size() && in[i].GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        {
            throw ScanError(std::string("input ") + scan::kScanInputNames[i] + " must be float32");
        }
    }
    deviceId = in[scan::kInU].GetTensorMemoryInfo().GetDeviceId();
    a.u = in[scan::kInU].GetTensorRawData();
    a.delta = in[scan::kInDelta].GetTensorRawData();
    a.A = in[scan::kInA].GetTensorData<float>();
    a.B = in[scan::kInB].GetTensorRawData();
    a.C = in[scan::kInC].GetTensorRawData();
    a.D = in[scan::kInD].GetTensorData<float>();
    a.z = in[scan::kInZ].GetTensorRawData();
    a.deltaBias = in[scan::kInDeltaBias].GetTensorData<float>();
    a.initialState = in.size() > scan::kInInitialState ? in[scan::kInInitialState].GetTensorData<float>() : nullptr;
    a.deltaSoftplus = attrs.deltaSoftplus;
    a.kappa = std::isnan(attrs.kappa) ? 1.0f / static_cast<float>(a.M) : attrs.kappa;
    a.y = ctx.GetOutput(0, shapes[scan::kInU]).GetTensorMutableRawData();
    if (ctx.GetOutputCount() > 1)
    {
        a.finalState = ctx.GetOutput(1, std::vector<int64_t>{a.batch, a.E, a.N}).GetTensorMutableData<float>();
    }
    return a;
}

// Turns every exception into an ORT status: nothing crosses into ORT as a C++ exception.
template <typename F>
OrtStatusPtr guarded(F&& f)
{
    try
    {
        f();
        return nullptr;
    }
    catch (Ort::Exception const& e)
    {
        return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    }
    catch (std::exception const& e)
    {
        return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
    catch (...)
    {
        return Ort::GetApi().CreateStatus(ORT_FAIL, "CoupledScan: unknown error");
    }
}

struct CpuKernel
{
    Attrs attrs;

    OrtStatusPtr ComputeV2(OrtKernelContext* raw)
    {
        return guarded([&] {
            Ort::KernelContext ctx(raw);
            scan::ActType type;
            int dev = 0;
            scan::ScanArgs const a = prepare(ctx, attrs, type, dev);
            struct Job
            {
                scan::ActType type;
                scan::ScanArgs const* a;
            } job{type, &a};
            size_t const items = static_cast<size_t>(scan::cpuWorkItems(a));
            if (items == 0)
            {
                return; // empty batch
            }
            ctx.ParallelFor(
                [](void* p, size_t i) {
                    auto const* j = static_cast<Job const*>(p);
                    scan::coupledScanCpuItem(j->type, *j->a, static_cast<int64_t>(i));
                },
                items, 0, &job);
        });
    }
};

#if CM_DEPLOY_WITH_CUDA
struct CudaKernel
{
    Attrs attrs;

    OrtStatusPtr ComputeV2(OrtKernelContext* raw)
    {
        return guarded([&] {
            Ort::KernelContext ctx(raw);
            scan::ActType type;
            int dev = 0;
            scan::ScanArgs const a = prepare(ctx, attrs, type, dev);
            if (a.batch == 0)
            {
                return;
            }
            int cur = -1;
            if (cudaGetDevice(&cur) != cudaSuccess || cur != dev)
            {
                if (cudaSetDevice(dev) != cudaSuccess)
                {
                    throw ScanError("cannot select CUDA device " + std::to_string(dev));
                }
            }
            auto stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
            // The implementation (Triton where compiled for the shape, else CUDA; CM_DEPLOY_SCAN_IMPL
            // overrides) and its workspace, from ORT's own device allocator (its arena: no cudaMalloc per
            // call, and CUDA-graph capture stays valid). Without one (no CUDA allocator found) the CUDA kernel
            // runs with L in one segment: slower for small batches, as correct.
            Ort::MemoryInfo mem("Cuda", OrtDeviceAllocator, dev, OrtMemTypeDefault);
            OrtAllocator* alloc = nullptr;
            if (OrtStatus* st = Ort::GetApi().KernelContext_GetAllocator(raw, mem, &alloc))
            {
                Ort::GetApi().ReleaseStatus(st);
                alloc = nullptr;
            }
            // the allocator handle is ours to release (ORT's C API contract)
            std::unique_ptr<OrtAllocator, void (*)(OrtAllocator*)> keep(
                alloc, [](OrtAllocator* p) { Ort::GetApi().ReleaseAllocator(p); });
            std::string why;
            scan::ScanPlan plan;
            auto const room = alloc != nullptr ? scan::WorkspaceFor::kAny : scan::WorkspaceFor::kNone;
            if (!scan::planCoupledScan(type, a, scan::ScanImpl::kAuto, room, plan, why))
            {
                throw ScanError(why);
            }
            void* ws = plan.workspaceBytes > 0 ? alloc->Alloc(alloc, plan.workspaceBytes) : nullptr;
            if (plan.workspaceBytes > 0 && ws == nullptr)
            {
                throw ScanError("could not allocate the " + std::to_string(plan.workspaceBytes) + "-byte workspace");
            }
            bool const ok = scan::runCoupledScan(type, a, plan, ws, stream, why);
            if (ws != nullptr)
            {
                alloc->Free(alloc, ws); // ORT's arena frees in stream order
            }
            if (!ok)
            {
                throw ScanError(why);
            }
        });
    }
};
#endif

template <typename Kernel>
struct ScanOp : Ort::CustomOpBase<ScanOp<Kernel>, Kernel, /*WithStatus=*/true>
{
    explicit ScanOp(char const* provider)
        : mProvider(provider)
    {
        // ORT types a dynamically typed output only from ONE dynamically typed input or from this
        // function; five inputs share the activation type, so y's type and shape are set here.
        OrtCustomOp::InferOutputShapeFn = [](OrtCustomOp const*, OrtShapeInferContext* ctx) -> OrtStatusPtr {
            return guarded([ctx] { inferOutputs(ctx); });
        };
    }

    // y: u's element type and shape; final_state: float32 (batch, E, N), dims (symbolic or not) from u and A.
    static void inferOutputs(OrtShapeInferContext* ctx)
    {
        OrtApi const& api = Ort::GetApi();
        size_t nIn = 0;
        Ort::ThrowOnError(api.ShapeInferContext_GetInputCount(ctx, &nIn));
        if (nIn < scan::kInDeltaBias + 1)
        {
            throw ScanError("needs 8 or 9 inputs (u, delta, A, B, C, D, z, delta_bias[, initial_state]), got "
                + std::to_string(nIn));
        }
        struct Dims
        {
            ONNXTensorElementDataType type{};
            std::vector<int64_t> dims;
            std::vector<char const*> syms;
        };
        auto read = [&](size_t i) {
            OrtTensorTypeAndShapeInfo* info = nullptr;
            Ort::ThrowOnError(api.ShapeInferContext_GetInputTypeShape(ctx, i, &info));
            Ort::ConstTensorTypeAndShapeInfo view(info);
            Dims d;
            d.type = view.GetElementType();
            d.dims = view.GetShape();
            d.syms.assign(d.dims.size(), nullptr);
            if (!d.dims.empty())
            {
                view.GetSymbolicDimensions(d.syms.data(), d.syms.size());
            }
            return d;
        };
        Dims const u = read(scan::kInU), A = read(scan::kInA);
        if (u.dims.size() != 4)
        {
            throw ScanError("input u must be (batch, M, L, E), got rank " + std::to_string(u.dims.size()));
        }
        if (A.dims.size() != 3)
        {
            throw ScanError("input A must be (M, E, N), got rank " + std::to_string(A.dims.size()));
        }
        auto write = [&](size_t out, ONNXTensorElementDataType type, std::vector<int64_t> const& dims,
                         std::vector<char const*> const& syms) {
            OrtTensorTypeAndShapeInfo* info = nullptr;
            Ort::ThrowOnError(api.CreateTensorTypeAndShapeInfo(&info));
            std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> keep(
                info, [](OrtTensorTypeAndShapeInfo* p) { Ort::GetApi().ReleaseTensorTypeAndShapeInfo(p); });
            Ort::ThrowOnError(api.SetTensorElementType(info, type));
            Ort::ThrowOnError(api.SetDimensions(info, dims.data(), dims.size()));
            // A dim that is neither known nor named gets a fresh name: ORT would read "-1, no name" as
            // the value -1, and a shared name would claim two unknown dims equal.
            static std::atomic<uint64_t> fresh{0};
            std::vector<std::string> own(syms.size());
            std::vector<char const*> names(syms.size());
            for (size_t i = 0; i < syms.size(); ++i)
            {
                bool const named = syms[i] != nullptr && syms[i][0] != '\0';
                if (!named && dims[i] < 0)
                {
                    own[i] = "cm_scan_dim_" + std::to_string(fresh++);
                }
                names[i] = named ? syms[i] : own[i].c_str();
            }
            Ort::ThrowOnError(api.SetSymbolicDimensions(info, names.data(), names.size()));
            Ort::ThrowOnError(api.ShapeInferContext_SetOutputTypeShape(ctx, out, info));
        };
        write(0, u.type, u.dims, u.syms);
        write(1, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {u.dims[0], u.dims[3], A.dims[2]}, {u.syms[0], u.syms[3], A.syms[2]});
    }

    OrtStatusPtr CreateKernelV2(OrtApi const& api, OrtKernelInfo const* info, void** kernel) const
    {
        return guarded([&] { *kernel = new Kernel{readAttrs(api, info)}; });
    }

    char const* GetName() const { return kOpName; }
    char const* GetExecutionProviderType() const { return mProvider; }

    size_t GetInputTypeCount() const { return scan::kNbScanInputs; }
    ONNXTensorElementDataType GetInputType(size_t i) const
    {
        // A, D, delta_bias and the state are float32; the activations any of float/float16/bfloat16
        // (checked in Compute: ORT's schema cannot say "one of three, all alike").
        bool const fp32 = i == scan::kInA || i == scan::kInD || i == scan::kInDeltaBias || i == scan::kInInitialState;
        return fp32 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const
    {
        return i == scan::kInInitialState ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    }

    size_t GetOutputTypeCount() const { return 2; }
    ONNXTensorElementDataType GetOutputType(size_t i) const
    {
        return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const
    {
        return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    }

private:
    char const* mProvider;
};

} // namespace

// The execution providers this build has CoupledScan kernels for, comma-separated: the runtime asks,
// so that it can say when a CUDA session would run the op on the CPU (ORT's silent fallback).
extern "C" __attribute__((visibility("default"))) char const* CmDeployOrtProviders()
{
#if CM_DEPLOY_WITH_CUDA
    return "CPUExecutionProvider,CUDAExecutionProvider";
#else
    return "CPUExecutionProvider";
#endif
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(
    OrtSessionOptions* options, OrtApiBase const* apiBase)
{
    if (apiBase == nullptr)
    {
        return nullptr; // not called by ONNX Runtime: nothing to report through
    }
    OrtApi const* api = apiBase->GetApi(ORT_API_VERSION);
    if (api == nullptr)
    {
        // an ONNX Runtime older than the headers we were built against: say so through its oldest API
        return apiBase->GetApi(1)->CreateStatus(ORT_FAIL,
            ("CoupledScan library needs ONNX Runtime >= 1." + std::to_string(ORT_API_VERSION) + " (its headers' API "
                "version); this one is " + apiBase->GetVersionString())
                .c_str());
    }
    Ort::InitApi(api);
    // One static instance per op: ORT keeps pointers to them for the life of the process.
    static ScanOp<CpuKernel> const cpuOp(nullptr);
#if CM_DEPLOY_WITH_CUDA
    static ScanOp<CudaKernel> const cudaOp("CUDAExecutionProvider");
#endif
    return guarded([&] {
        Ort::CustomOpDomain domain(kDomain);
        domain.Add(&cpuOp);
#if CM_DEPLOY_WITH_CUDA
        domain.Add(&cudaOp);
#endif
        Ort::UnownedSessionOptions(options).Add(domain);
        // The domain must outlive every session using it: hand it over to the process (ORT's own
        // examples keep it in a static list for the same reason).
        static std::mutex mutex;
        static std::vector<Ort::CustomOpDomain> keep;
        std::lock_guard<std::mutex> lock(mutex);
        keep.push_back(std::move(domain));
    });
}
