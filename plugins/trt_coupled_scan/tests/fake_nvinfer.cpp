// libnvinfer_fake.so: a stand-in for TensorRT's runtime library with just its plugin registry, for the
// autoload shim's CPU test. loadLibrary does what TensorRT 10 / TensorRT-RTX 1.7 do (measured with
// RTX's registry, tests/test_trt_autoload.py): dlopen the file, require both entry points, call
// setLoggerFinder, then getCreators, and refuse the whole library (nullptr) when one of its creators
// is registered already. getInferLibVersion as TensorRT exports it. The fakeTrt* functions let the
// test read what happened.
#include <NvInferRuntime.h>

#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <string>
#include <vector>

// The interface still declares the deprecated IPluginCreator overloads: overridden, never used.
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace
{
using GetCreatorsFn = nvinfer1::IPluginCreatorInterface* const* (*) (int32_t&);
using SetLoggerFinderFn = void (*)(nvinfer1::ILoggerFinder*);

struct Key
{
    std::string name, version, ns;
};

Key keyOf(nvinfer1::IPluginCreatorInterface* c)
{
    // The test only meets V3One creators (CoupledScan's); others are kept under an empty name.
    if (std::strcmp(c->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0)
    {
        return {};
    }
    auto* v3 = static_cast<nvinfer1::IPluginCreatorV3One*>(c);
    return {v3->getPluginName(), v3->getPluginVersion(), v3->getPluginNamespace()};
}

class FakeRegistry final : public nvinfer1::IPluginRegistry
{
public:
    std::vector<std::string> loadCalls;
    std::vector<nvinfer1::IPluginCreatorInterface*> creators;

    int countNamed(char const* name) const
    {
        int n = 0;
        for (auto* c : creators)
        {
            n += keyOf(c).name == name;
        }
        return n;
    }

    PluginLibraryHandle loadLibrary(nvinfer1::AsciiChar const* pluginPath) noexcept override
    {
        loadCalls.emplace_back(pluginPath);
        void* h = dlopen(pluginPath, RTLD_LAZY | RTLD_LOCAL);
        if (h == nullptr)
        {
            return nullptr;
        }
        auto setFinder = reinterpret_cast<SetLoggerFinderFn>(dlsym(h, "setLoggerFinder"));
        auto getCreators = reinterpret_cast<GetCreatorsFn>(dlsym(h, "getCreators"));
        if (setFinder == nullptr || getCreators == nullptr)
        {
            return nullptr;
        }
        setFinder(nullptr);
        int32_t n = 0;
        nvinfer1::IPluginCreatorInterface* const* list = getCreators(n);
        for (int32_t i = 0; i < n; ++i)
        {
            if (isRegistered(keyOf(list[i])))
            {
                return nullptr; // "Cannot register the library as plugin creator of ... exists already"
            }
        }
        creators.insert(creators.end(), list, list + n);
        return h;
    }
    bool registerCreator(nvinfer1::IPluginCreatorInterface& creator, nvinfer1::AsciiChar const* const) noexcept override
    {
        if (isRegistered(keyOf(&creator)))
        {
            return false;
        }
        creators.push_back(&creator);
        return true;
    }
    nvinfer1::IPluginCreatorInterface* const* getAllCreators(int32_t* const numCreators) const noexcept override
    {
        *numCreators = static_cast<int32_t>(creators.size());
        return creators.data();
    }
    nvinfer1::IPluginCreatorInterface* getCreator(nvinfer1::AsciiChar const* const name,
        nvinfer1::AsciiChar const* const version, nvinfer1::AsciiChar const* const ns) noexcept override
    {
        for (auto* c : creators)
        {
            Key const k = keyOf(c);
            if (k.name == name && k.version == version && k.ns == ns)
            {
                return c;
            }
        }
        return nullptr;
    }

    // The rest of the interface, unused by the shim.
    bool registerCreator(nvinfer1::IPluginCreator&, nvinfer1::AsciiChar const* const) noexcept override
    {
        return false;
    }
    nvinfer1::IPluginCreator* const* getPluginCreatorList(int32_t* const n) const noexcept override
    {
        *n = 0;
        return nullptr;
    }
    nvinfer1::IPluginCreator* getPluginCreator(
        nvinfer1::AsciiChar const* const, nvinfer1::AsciiChar const* const, nvinfer1::AsciiChar const* const) noexcept override
    {
        return nullptr;
    }
    void setErrorRecorder(nvinfer1::IErrorRecorder* const) noexcept override {}
    nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept override
    {
        return nullptr;
    }
    bool deregisterCreator(nvinfer1::IPluginCreator const&) noexcept override
    {
        return false;
    }
    bool isParentSearchEnabled() const override
    {
        return false;
    }
    void setParentSearchEnabled(bool const) override {}
    void deregisterLibrary(PluginLibraryHandle) noexcept override {}
    bool deregisterCreator(nvinfer1::IPluginCreatorInterface const&) noexcept override
    {
        return false;
    }
    nvinfer1::IPluginResource* acquirePluginResource(nvinfer1::AsciiChar const*, nvinfer1::IPluginResource*) noexcept override
    {
        return nullptr;
    }
    int32_t releasePluginResource(nvinfer1::AsciiChar const*) noexcept override
    {
        return -1;
    }
    nvinfer1::IPluginCreatorInterface* const* getAllCreatorsRecursive(int32_t* const n) noexcept override
    {
        return getAllCreators(n);
    }

private:
    bool isRegistered(Key const& k) const
    {
        for (auto* c : creators)
        {
            Key const o = keyOf(c);
            if (o.name == k.name && o.version == k.version && o.ns == k.ns)
            {
                return true;
            }
        }
        return false;
    }
};

FakeRegistry& registry()
{
    static FakeRegistry r;
    return r;
}
} // namespace

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginRegistry* getPluginRegistry() noexcept
{
    return &registry();
}

// NV_TENSORRT_VERSION of the headers, or $CM_FAKE_TRT_VERSION (another major version's library).
extern "C" __attribute__((visibility("default"))) int32_t getInferLibVersion() noexcept
{
    char const* v = std::getenv("CM_FAKE_TRT_VERSION");
    return v != nullptr ? static_cast<int32_t>(std::atoi(v)) : NV_TENSORRT_VERSION;
}

extern "C" __attribute__((visibility("default"))) int fakeTrtLoadCalls()
{
    return static_cast<int>(registry().loadCalls.size());
}

extern "C" __attribute__((visibility("default"))) char const* fakeTrtLoadPath(int i)
{
    return registry().loadCalls.at(i).c_str();
}

extern "C" __attribute__((visibility("default"))) int fakeTrtCreatorsNamed(char const* name)
{
    return registry().countNamed(name);
}
