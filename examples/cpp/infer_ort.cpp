// cm_infer_ort: Coupled Mamba inference through ONNX Runtime's C++ API, no Python.
//
//   cm_infer_ort MODEL.onnx --input text=text.npy --input audio=audio.npy ... [-o out.npy]
//       [--chunk T]               streaming graph (model.stream*.onnx): feed T steps at a time
//       [--ort-ops LIB]           CoupledScan op library, for model.onnx / model.stream.onnx
//       [--cuda]                  CUDA execution provider (onnxruntime-gpu's library)
//       [--ort-lib PATH]          libonnxruntime.so to load ($CM_DEPLOY_ORT_LIBRARY, else the default search)
//
// model.portable.onnx runs on any ONNX Runtime; model.onnx needs --ort-ops. Inputs not given that
// are <modality>_lengths mean full length. ONNX Runtime is loaded at run time (dlopen), so the
// program builds from ORT's headers alone, like the op library.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include "infer_common.h"

#include <dlfcn.h>

using namespace cm_example;

namespace
{

std::string dtypeName(ONNXTensorElementDataType t)
{
    switch (t)
    {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    default: return "type#" + std::to_string(static_cast<int>(t));
    }
}

ONNXTensorElementDataType onnxType(std::string const& d)
{
    if (d == "float32")
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (d == "float16")
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    if (d == "bfloat16")
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
}

void loadOrt(std::string const& path)
{
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (h == nullptr)
        throw InputError("cannot load ONNX Runtime '" + path + "': " + dlerror()
            + " (pass --ort-lib PATH or set CM_DEPLOY_ORT_LIBRARY)");
    auto getBase = reinterpret_cast<OrtApiBase const* (*) ()>(dlsym(h, "OrtGetApiBase"));
    if (getBase == nullptr)
        throw InputError(path + " is not ONNX Runtime (no OrtGetApiBase)");
    OrtApi const* api = getBase()->GetApi(ORT_API_VERSION);
    if (api == nullptr)
        throw InputError(path + " is ONNX Runtime " + getBase()->GetVersionString() + ", older than the headers (1."
            + std::to_string(ORT_API_VERSION) + ") this program was built with");
    Ort::InitApi(api);
}

struct OrtRunner : Runner
{
    Ort::Env env{ORT_LOGGING_LEVEL_ERROR, "cm_infer_ort"};
    std::unique_ptr<Ort::Session> session;

    OrtRunner(Options const& o)
    {
        Ort::SessionOptions so;
        if (o.extra.count("--ort-ops"))
            so.RegisterCustomOpsLibrary(o.extra.at("--ort-ops").c_str());
        if (o.extra.count("--cuda"))
        {
            OrtCUDAProviderOptionsV2* cuda = nullptr;
            Ort::ThrowOnError(Ort::GetApi().CreateCUDAProviderOptions(&cuda));
            std::unique_ptr<OrtCUDAProviderOptionsV2, void (*)(OrtCUDAProviderOptionsV2*)> keep(
                cuda, Ort::GetApi().ReleaseCUDAProviderOptions);
            so.AppendExecutionProvider_CUDA_V2(*cuda);
        }
        session = std::make_unique<Ort::Session>(env, o.model.c_str(), so);
    }

    std::vector<IoSpec> specs(bool in)
    {
        Ort::AllocatorWithDefaultOptions alloc;
        std::vector<IoSpec> out;
        size_t const n = in ? session->GetInputCount() : session->GetOutputCount();
        for (size_t i = 0; i < n; ++i)
        {
            auto name = in ? session->GetInputNameAllocated(i, alloc) : session->GetOutputNameAllocated(i, alloc);
            Ort::TypeInfo type = in ? session->GetInputTypeInfo(i) : session->GetOutputTypeInfo(i);
            auto info = type.GetTensorTypeAndShapeInfo(); // a view: `type` must outlive it
            out.push_back({name.get(), dtypeName(info.GetElementType()), info.GetShape()});
        }
        return out;
    }
    std::vector<IoSpec> inputs() override { return specs(true); }
    std::vector<IoSpec> outputs() override { return specs(false); }

    std::map<std::string, Tensor> run(std::map<std::string, Tensor> const& feeds) override
    {
        Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
        std::vector<std::string> inNames;
        std::vector<Ort::Value> values;
        for (IoSpec const& s : inputs())
        {
            Tensor const& t = feeds.at(s.name);
            inNames.push_back(s.name);
            values.push_back(Ort::Value::CreateTensor(mem, const_cast<uint8_t*>(t.data.data()), t.data.size(),
                t.shape.data(), t.shape.size(), onnxType(t.dtype)));
        }
        std::vector<IoSpec> const outs = outputs();
        std::vector<char const*> in, out;
        for (auto const& n : inNames)
            in.push_back(n.c_str());
        for (auto const& s : outs)
            out.push_back(s.name.c_str());
        std::vector<Ort::Value> res = session->Run(Ort::RunOptions{nullptr}, in.data(), values.data(), in.size(),
            out.data(), out.size());
        std::map<std::string, Tensor> result;
        for (size_t i = 0; i < outs.size(); ++i)
        {
            auto info = res[i].GetTensorTypeAndShapeInfo();
            Tensor t{outs[i].name, dtypeName(info.GetElementType()), info.GetShape(), {}};
            auto const* p = static_cast<uint8_t const*>(res[i].GetTensorRawData());
            t.data.assign(p, p + static_cast<size_t>(t.count()) * Tensor::itemSize(t.dtype));
            result[t.name] = std::move(t);
        }
        return result;
    }
};

} // namespace

int main(int argc, char** argv)
{
    return runMain("cm_infer_ort", [&] {
        Options const o = parseArgs(argc, argv, {"--cuda"}, {"--ort-ops", "--ort-lib"},
            "cm_infer_ort MODEL.onnx --input NAME=FILE.npy ... [-o OUT.npy] [--chunk T] [--ort-ops LIB] [--cuda] "
            "[--ort-lib libonnxruntime.so]");
        char const* env = std::getenv("CM_DEPLOY_ORT_LIBRARY");
        loadOrt(o.extra.count("--ort-lib") ? o.extra.at("--ort-lib") : (env && *env ? env : "libonnxruntime.so"));
        std::unique_ptr<OrtRunner> runner;
        try
        {
            runner = std::make_unique<OrtRunner>(o);
        }
        catch (Ort::Exception const& e) // an unreadable model or op library: the user's input
        {
            std::string const msg = e.what();
            std::string hint;
            if (!o.extra.count("--ort-ops")
                && (msg.find("CoupledScan") != std::string::npos || msg.find("cm_deploy") != std::string::npos))
                hint = " (this file holds CoupledScan nodes: pass --ort-ops with the CoupledScan op library, "
                       "cm_deploy/lib/libcoupled_scan_ort.so once scripts/build_plugin.sh has built it, or run "
                       "model.portable.onnx, which needs none)";
            throw InputError(o.model + ": ONNX Runtime cannot load it: " + msg + hint);
        }
        Tensor out;
        try
        {
            out = infer(*runner, o);
        }
        catch (Ort::Exception const& e)
        {
            if (e.GetOrtErrorCode() == ORT_INVALID_ARGUMENT)
                throw InputError(e.what());
            throw;
        }
        printTensor(out);
        if (!o.output.empty())
            saveNpy(o.output, out);
        return 0;
    });
}
