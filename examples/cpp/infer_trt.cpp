// cm_infer_trt: Coupled Mamba inference from a TensorRT engine through TensorRT's C++ API, no Python.
//
//   cm_infer_trt MODEL.engine --plugin libcoupled_scan_plugin.so --input text=text.npy ... [-o out.npy]
//       [--chunk T]            streaming engine (built from model.stream.onnx): T steps at a time
//       [--nvinfer PATH]       libnvinfer to load (default libnvinfer.so.10)
//
// TensorRT is loaded at run time (dlopen of libnvinfer, createInferRuntime_INTERNAL), so the program
// builds from TensorRT's headers alone, like the plugin. Build engines with `cm-deploy build` or
// trtexec from model.onnx / model.stream.onnx.
#include "infer_common.h"

#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <fstream>
#include <memory>

using namespace cm_example;

namespace
{

struct Logger : nvinfer1::ILogger
{
    void log(Severity s, char const* msg) noexcept override
    {
        if (s <= Severity::kERROR)
            std::fprintf(stderr, "TensorRT: %s\n", msg);
    }
};

void cudaCheck(cudaError_t e, char const* what)
{
    if (e != cudaSuccess)
        throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

std::string dtypeName(nvinfer1::DataType t)
{
    switch (t)
    {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kBF16: return "bfloat16";
    case nvinfer1::DataType::kINT64: return "int64";
    default: return "type#" + std::to_string(static_cast<int>(t));
    }
}

struct TrtRunner : Runner
{
    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime;
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::unique_ptr<nvinfer1::IExecutionContext> ctx;
    cudaStream_t stream{};

    explicit TrtRunner(Options const& o)
    {
        std::string const lib = o.extra.count("--nvinfer") ? o.extra.at("--nvinfer") : "libnvinfer.so.10";
        void* h = dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL);
        if (h == nullptr)
            throw InputError("cannot load TensorRT '" + lib + "': " + dlerror() + " (pass --nvinfer PATH)");
        auto create = reinterpret_cast<void* (*) (void*, int32_t)>(dlsym(h, "createInferRuntime_INTERNAL"));
        auto registry = reinterpret_cast<nvinfer1::IPluginRegistry* (*) ()>(dlsym(h, "getPluginRegistry"));
        if (create == nullptr || registry == nullptr)
            throw InputError(lib + " is not TensorRT's runtime library");
        runtime.reset(static_cast<nvinfer1::IRuntime*>(create(&logger, NV_TENSORRT_VERSION)));
        if (!runtime)
            throw std::runtime_error("createInferRuntime failed");
        if (o.extra.count("--plugin") && registry()->loadLibrary(o.extra.at("--plugin").c_str()) == nullptr)
            throw InputError("cannot load the plugin library " + o.extra.at("--plugin"));
        std::ifstream f(o.model, std::ios::binary);
        if (!f)
            throw InputError(o.model + ": cannot open");
        std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        engine.reset(runtime->deserializeCudaEngine(bytes.data(), bytes.size()));
        if (!engine)
            throw InputError(o.model + ": not an engine this TensorRT and GPU can run (see the TensorRT error above)");
        ctx.reset(engine->createExecutionContext());
        cudaCheck(cudaStreamCreate(&stream), "cudaStreamCreate");
    }
    ~TrtRunner() override
    {
        if (stream)
            cudaStreamDestroy(stream);
    }

    std::vector<IoSpec> specs(nvinfer1::TensorIOMode mode)
    {
        std::vector<IoSpec> out;
        for (int32_t i = 0; i < engine->getNbIOTensors(); ++i)
        {
            char const* name = engine->getIOTensorName(i);
            if (engine->getTensorIOMode(name) != mode)
                continue;
            nvinfer1::Dims d = engine->getTensorShape(name);
            out.push_back({name, dtypeName(engine->getTensorDataType(name)), std::vector<int64_t>(d.d, d.d + d.nbDims)});
        }
        return out;
    }
    std::vector<IoSpec> inputs() override { return specs(nvinfer1::TensorIOMode::kINPUT); }
    std::vector<IoSpec> outputs() override { return specs(nvinfer1::TensorIOMode::kOUTPUT); }

    std::map<std::string, Tensor> run(std::map<std::string, Tensor> const& feeds) override
    {
        std::vector<void*> buffers;
        auto freeAll = [&] {
            for (void* p : buffers)
                cudaFree(p);
        };
        try
        {
            for (IoSpec const& s : inputs())
            {
                Tensor const& t = feeds.at(s.name);
                nvinfer1::Dims d{};
                d.nbDims = static_cast<int32_t>(t.shape.size());
                std::copy(t.shape.begin(), t.shape.end(), d.d);
                if (!ctx->setInputShape(s.name.c_str(), d))
                    throw InputError("input '" + s.name + "' shape " + t.shapeString() + " is outside the engine's profile");
                void* p = nullptr;
                cudaCheck(cudaMalloc(&p, std::max<size_t>(t.data.size(), 1)), "cudaMalloc");
                buffers.push_back(p);
                cudaCheck(cudaMemcpyAsync(p, t.data.data(), t.data.size(), cudaMemcpyHostToDevice, stream), "copy in");
                ctx->setTensorAddress(s.name.c_str(), p);
            }
            std::map<std::string, Tensor> result;
            std::vector<std::pair<Tensor*, void*>> copies;
            for (IoSpec const& s : outputs())
            {
                nvinfer1::Dims d = ctx->getTensorShape(s.name.c_str());
                Tensor t = Tensor::zeros(s.name, s.dtype, std::vector<int64_t>(d.d, d.d + d.nbDims));
                void* p = nullptr;
                cudaCheck(cudaMalloc(&p, std::max<size_t>(t.data.size(), 1)), "cudaMalloc");
                buffers.push_back(p);
                ctx->setTensorAddress(s.name.c_str(), p);
                result[s.name] = std::move(t);
                copies.emplace_back(&result[s.name], p);
            }
            if (!ctx->enqueueV3(stream))
                throw std::runtime_error("enqueueV3 failed (see the TensorRT error above)");
            for (auto& c : copies)
                cudaCheck(cudaMemcpyAsync(c.first->data.data(), c.second, c.first->data.size(), cudaMemcpyDeviceToHost,
                              stream),
                    "copy out");
            cudaCheck(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
            freeAll();
            return result;
        }
        catch (...)
        {
            freeAll();
            throw;
        }
    }
};

} // namespace

int main(int argc, char** argv)
{
    return runMain("cm_infer_trt", [&] {
        Options const o = parseArgs(argc, argv, {}, {"--plugin", "--nvinfer"},
            "cm_infer_trt MODEL.engine --plugin LIB --input NAME=FILE.npy ... [-o OUT.npy] [--chunk T] "
            "[--nvinfer libnvinfer.so.10]");
        TrtRunner runner(o);
        Tensor const out = infer(runner, o);
        printTensor(out);
        if (!o.output.empty())
            saveNpy(o.output, out);
        return 0;
    });
}
