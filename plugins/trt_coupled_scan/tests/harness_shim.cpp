// libcoupled_scan_harness.so: a C API over the plugin library for tests/gpu/plugin_harness.py (ctypes). It drives
// the plugin the way TensorRT does, through the exported getCreators only:
//   build:   createPlugin(kBUILD, parser-typed fields) -> getNbOutputs -> getOutputDataTypes ->
//            supportsFormatCombination(every position) -> configurePlugin(dynamic batch and L) ->
//            getWorkspaceSize -> getValidTactics -> setTactic(the caller's pick, as the builder's
//            timing would) -> getFieldsToSerialize
//   runtime: createPlugin(kRUNTIME, a copy of the serialized fields) -> attachToContext ->
//            onShapeChange(concrete shapes) -> enqueue(PluginTensorDesc, device pointers, stream)
// No CUDA calls here: the caller owns memory and streams (torch) and synchronizes.
#include "coupled_scan_plugin.h"

#include <NvInferRuntime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

using namespace nvinfer1;

#define CMH_EXPORT extern "C" __attribute__((visibility("default")))

namespace
{

class HarnessLogger final : public ILogger
{
public:
    void log(Severity severity, AsciiChar const* msg) noexcept override
    {
        std::lock_guard<std::mutex> lock(mMutex);
        if (severity <= Severity::kWARNING)
        {
            mText += (severity <= Severity::kERROR ? "ERROR: " : "WARNING: ");
            mText += msg != nullptr ? msg : "";
            mText += "\n";
        }
    }
    std::string take()
    {
        std::lock_guard<std::mutex> lock(mMutex);
        std::string s;
        s.swap(mText);
        return s;
    }

private:
    std::mutex mMutex;
    std::string mText;
};

class HarnessFinder final : public ILoggerFinder
{
public:
    ILogger* findLogger() override
    {
        return &logger;
    }
    HarnessLogger logger;
};

HarnessFinder& finder()
{
    static HarnessFinder f;
    static bool const installed = [] {
        setLoggerFinder(&f);
        return true;
    }();
    (void) installed;
    return f;
}

void setError(char* err, int errlen, std::string msg)
{
    std::string const logged = finder().logger.take();
    if (!logged.empty())
    {
        msg += "\n" + logged;
    }
    if (err != nullptr && errlen > 0)
    {
        std::snprintf(err, static_cast<size_t>(errlen), "%s", msg.c_str());
    }
}

DataType toTrt(int dtype)
{
    return dtype == 0 ? DataType::kFLOAT : (dtype == 1 ? DataType::kHALF : DataType::kBF16);
}

Dims dims(std::initializer_list<int64_t> v)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    int32_t i = 0;
    for (int64_t x : v)
    {
        d.d[i++] = x;
    }
    return d;
}

// Inputs then outputs of the contract for (batch, M, L, E, N).
std::vector<PluginTensorDesc> makeDescs(int64_t const* s, DataType act, bool hasInitial, bool hasFinal)
{
    int64_t const b = s[0], M = s[1], L = s[2], E = s[3], N = s[4];
    std::vector<Dims> d = {dims({b, M, L, E}), dims({b, M, L, E}), dims({M, E, N}), dims({b, M, L, N}),
        dims({b, M, L, N}), dims({M, E}), dims({b, M, L, E}), dims({M, E})};
    std::vector<bool> act01 = {true, true, false, true, true, false, true, false};
    if (hasInitial)
    {
        d.push_back(dims({b, E, N}));
        act01.push_back(false);
    }
    d.push_back(dims({b, M, L, E}));
    act01.push_back(true);
    if (hasFinal)
    {
        d.push_back(dims({b, E, N}));
        act01.push_back(false);
    }
    std::vector<PluginTensorDesc> r;
    for (size_t i = 0; i < d.size(); ++i)
    {
        PluginTensorDesc t{};
        t.dims = d[i];
        t.type = act01[i] ? act : DataType::kFLOAT;
        t.format = TensorFormat::kLINEAR;
        t.scale = -1.f;
        r.push_back(t);
    }
    return r;
}

IPluginCreatorV3One* findCreator(std::string& why)
{
    int32_t nb = 0;
    IPluginCreatorInterface* const* creators = getCreators(nb);
    for (int32_t i = 0; creators != nullptr && i < nb; ++i)
    {
        IPluginCreatorInterface* c = creators[i];
        if (c == nullptr || std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
        {
            continue;
        }
        auto* v3 = static_cast<IPluginCreatorV3One*>(c);
        if (std::strcmp(v3->getPluginName(), "CoupledScan") == 0 && std::strcmp(v3->getPluginVersion(), "1") == 0)
        {
            return v3;
        }
    }
    why = "getCreators did not return CoupledScan version 1";
    return nullptr;
}

struct Handle
{
    std::unique_ptr<IPluginV3> plugin; // the execution-context plugin, as TensorRT enqueues on
    int dtype{};
    bool hasInitial{};
    bool hasFinal{};
    int64_t shape[5]{};
    size_t workspace{};
    std::vector<int32_t> tactics; // getValidTactics at build time
};

template <typename T>
T* capability(IPluginV3* p, PluginCapabilityType t)
{
    return static_cast<T*>(p->getCapabilityInterface(t));
}

} // namespace

// tactic: 0 leaves the plugin's default (automatic: Triton where compiled, else CUDA); 1 (CUDA kernel)
// or 2 (Triton kernels) must be among the tactics the plugin offers for the shape.
CMH_EXPORT void* cmh_create(int dtype, int deltaSoftplus, float couplingScale, int hasInitial, int hasFinal,
    int64_t const* shape, int tactic, char* err, int errlen)
{
    finder();
    std::string why;
    if (dtype < 0 || dtype > 2 || shape == nullptr)
    {
        setError(err, errlen, "cmh_create: bad arguments");
        return nullptr;
    }
    IPluginCreatorV3One* creator = findCreator(why);
    if (creator == nullptr)
    {
        setError(err, errlen, why);
        return nullptr;
    }
    // Fields typed as TensorRT's ONNX parser types ONNX INT / FLOAT attributes.
    int32_t sp = deltaSoftplus, hf = hasFinal;
    float ks = couplingScale;
    PluginField fields[] = {{"delta_softplus", &sp, PluginFieldType::kINT32, 1},
        {"coupling_scale", &ks, PluginFieldType::kFLOAT32, 1}, {"has_final_state", &hf, PluginFieldType::kINT32, 1}};
    PluginFieldCollection fc{3, fields};
    std::unique_ptr<IPluginV3> buildPlugin(creator->createPlugin("harness", &fc, TensorRTPhase::kBUILD));
    if (!buildPlugin)
    {
        setError(err, errlen, "createPlugin(kBUILD) returned null");
        return nullptr;
    }
    auto* b = capability<IPluginV3OneBuild>(buildPlugin.get(), PluginCapabilityType::kBUILD);
    auto* core = capability<IPluginV3OneCore>(buildPlugin.get(), PluginCapabilityType::kCORE);
    if (b == nullptr || core == nullptr || std::strcmp(core->getPluginName(), "CoupledScan") != 0)
    {
        setError(err, errlen, "build or core capability missing");
        return nullptr;
    }
    int32_t const nbIn = hasInitial ? 9 : 8;
    int32_t const nbOut = b->getNbOutputs();
    if (nbOut != (hasFinal ? 2 : 1))
    {
        setError(err, errlen, "getNbOutputs returned " + std::to_string(nbOut));
        return nullptr;
    }
    DataType const act = toTrt(dtype);
    std::vector<PluginTensorDesc> d = makeDescs(shape, act, hasInitial != 0, hasFinal != 0);
    std::vector<DataType> inTypes;
    for (int32_t i = 0; i < nbIn; ++i)
    {
        inTypes.push_back(d[i].type);
    }
    DataType outTypes[2];
    if (b->getOutputDataTypes(outTypes, nbOut, inTypes.data(), nbIn) != 0 || outTypes[0] != act
        || (nbOut == 2 && outTypes[1] != DataType::kFLOAT))
    {
        setError(err, errlen, "getOutputDataTypes failed or returned unexpected types");
        return nullptr;
    }
    // Dynamic batch and L at build time, as an ONNX model with dynamic axes has them.
    std::vector<DynamicPluginTensorDesc> dyn(d.size());
    for (size_t i = 0; i < d.size(); ++i)
    {
        dyn[i].desc = d[i];
        dyn[i].min = dyn[i].max = dyn[i].opt = d[i].dims;
        bool const weight = i == 2 || i == 5 || i == 7;
        if (!weight)
        {
            dyn[i].desc.dims.d[0] = -1;
        }
        if (d[i].dims.nbDims == 4)
        {
            dyn[i].desc.dims.d[2] = -1;
        }
    }
    for (int32_t pos = 0; pos < nbIn + nbOut; ++pos)
    {
        if (!b->supportsFormatCombination(pos, dyn.data(), nbIn, nbOut))
        {
            setError(err, errlen, "supportsFormatCombination refused position " + std::to_string(pos));
            return nullptr;
        }
    }
    if (b->configurePlugin(dyn.data(), nbIn, dyn.data() + nbIn, nbOut) != 0)
    {
        setError(err, errlen, "configurePlugin failed");
        return nullptr;
    }
    size_t const workspace = b->getWorkspaceSize(dyn.data(), nbIn, dyn.data() + nbIn, nbOut);
    int32_t const nbTactics = b->getNbTactics();
    std::vector<int32_t> tactics(static_cast<size_t>(std::max(nbTactics, 0)));
    if (nbTactics < 0 || b->getValidTactics(tactics.data(), nbTactics) != 0)
    {
        setError(err, errlen, "getValidTactics failed");
        return nullptr;
    }

    // The builder's pick, then serialize and deserialize from a copy as an engine file would.
    auto* rtBuild = capability<IPluginV3OneRuntime>(buildPlugin.get(), PluginCapabilityType::kRUNTIME);
    if (tactic != 0)
    {
        bool offered = false;
        std::string valid;
        for (int32_t t : tactics)
        {
            offered = offered || t == tactic;
            valid += (valid.empty() ? "" : ", ") + std::to_string(t);
        }
        if (!offered)
        {
            setError(err, errlen, "tactic " + std::to_string(tactic) + " is not offered for this shape (valid: " + valid + ")");
            return nullptr;
        }
        if (rtBuild == nullptr || rtBuild->setTactic(tactic) != 0)
        {
            setError(err, errlen, "setTactic failed");
            return nullptr;
        }
    }
    PluginFieldCollection const* ser = rtBuild != nullptr ? rtBuild->getFieldsToSerialize() : nullptr;
    if (ser == nullptr)
    {
        setError(err, errlen, "getFieldsToSerialize returned null");
        return nullptr;
    }
    std::vector<std::string> names;
    std::vector<std::vector<unsigned char>> data;
    std::vector<PluginField> copy;
    for (int32_t i = 0; i < ser->nbFields; ++i)
    {
        PluginField const& f = ser->fields[i];
        size_t const bytes = (f.type == PluginFieldType::kFLOAT64 || f.type == PluginFieldType::kINT64) ? 8 : 4;
        names.emplace_back(f.name);
        data.emplace_back(static_cast<unsigned char const*>(f.data),
            static_cast<unsigned char const*>(f.data) + bytes * static_cast<size_t>(f.length));
    }
    for (int32_t i = 0; i < ser->nbFields; ++i)
    {
        copy.emplace_back(names[i].c_str(), data[i].data(), ser->fields[i].type, ser->fields[i].length);
    }
    PluginFieldCollection fc2{static_cast<int32_t>(copy.size()), copy.data()};
    buildPlugin.reset();
    std::unique_ptr<IPluginV3> runtimePlugin(creator->createPlugin("harness", &fc2, TensorRTPhase::kRUNTIME));
    if (!runtimePlugin)
    {
        setError(err, errlen, "createPlugin(kRUNTIME) from the serialized fields returned null");
        return nullptr;
    }
    auto* rt = capability<IPluginV3OneRuntime>(runtimePlugin.get(), PluginCapabilityType::kRUNTIME);
    auto h = std::make_unique<Handle>();
    h->plugin.reset(rt != nullptr ? rt->attachToContext(nullptr) : nullptr);
    if (!h->plugin)
    {
        setError(err, errlen, "attachToContext returned null");
        return nullptr;
    }
    auto* ctxRt = capability<IPluginV3OneRuntime>(h->plugin.get(), PluginCapabilityType::kRUNTIME);
    if (ctxRt->onShapeChange(d.data(), nbIn, d.data() + nbIn, nbOut) != 0)
    {
        setError(err, errlen, "onShapeChange failed");
        return nullptr;
    }
    h->dtype = dtype;
    h->hasInitial = hasInitial != 0;
    h->hasFinal = hasFinal != 0;
    std::memcpy(h->shape, shape, sizeof h->shape);
    h->workspace = workspace;
    h->tactics = tactics;
    return h.release();
}

// The tactics the plugin offered at build time (up to `capacity` into `out`); returns how many, -1 on error.
CMH_EXPORT int cmh_tactics(void* handle, int* out, int capacity)
{
    auto* h = static_cast<Handle*>(handle);
    if (h == nullptr || (out == nullptr && capacity > 0))
    {
        return -1;
    }
    for (size_t i = 0; i < h->tactics.size() && static_cast<int>(i) < capacity; ++i)
    {
        out[i] = h->tactics[i];
    }
    return static_cast<int>(h->tactics.size());
}

CMH_EXPORT long long cmh_workspace_size(void* handle)
{
    return handle != nullptr ? static_cast<long long>(static_cast<Handle*>(handle)->workspace) : -1;
}

CMH_EXPORT int cmh_enqueue(void* handle, int64_t const* shape, void const* const* inputs, void* const* outputs,
    void* workspace, void* stream, char* err, int errlen)
{
    auto* h = static_cast<Handle*>(handle);
    if (h == nullptr || shape == nullptr || inputs == nullptr || outputs == nullptr)
    {
        setError(err, errlen, "cmh_enqueue: bad arguments");
        return -1;
    }
    int32_t const nbIn = h->hasInitial ? 9 : 8;
    int32_t const nbOut = h->hasFinal ? 2 : 1;
    std::vector<PluginTensorDesc> d = makeDescs(shape, toTrt(h->dtype), h->hasInitial, h->hasFinal);
    auto* rt = capability<IPluginV3OneRuntime>(h->plugin.get(), PluginCapabilityType::kRUNTIME);
    if (std::memcmp(shape, h->shape, sizeof h->shape) != 0)
    {
        // A new input shape: TensorRT calls onShapeChange before the next enqueue.
        if (rt->onShapeChange(d.data(), nbIn, d.data() + nbIn, nbOut) != 0)
        {
            setError(err, errlen, "onShapeChange failed");
            return -1;
        }
        std::memcpy(h->shape, shape, sizeof h->shape);
    }
    int32_t const rc = rt->enqueue(d.data(), d.data() + nbIn, inputs, outputs, workspace, static_cast<cudaStream_t>(stream));
    if (rc != 0)
    {
        setError(err, errlen, "enqueue returned " + std::to_string(rc));
    }
    return rc;
}

CMH_EXPORT void cmh_destroy(void* handle)
{
    delete static_cast<Handle*>(handle);
}
