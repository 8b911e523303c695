// libcoupled_scan_plugin_autoload.so: registers the CoupledScan creator when it is merely dlopen'ed.
//
// Hosts that load plugin libraries with a bare dlopen (Triton's TensorRT backend:
// --backend-config=tensorrt,plugins=...) never call getCreators, so libcoupled_scan_plugin.so alone
// registers nothing there. This library's load-time constructor hands libcoupled_scan_plugin.so (the
// file beside it) to TensorRT's own IPluginRegistry::loadLibrary: the registry then owns the library
// exactly as after trtexec --dynamicPlugins.
//
// It links nothing from TensorRT. getPluginRegistry is looked up in the global scope, then in the
// loaded libnvinfer* libraries: tritonserver loads its backends, and so libnvinfer, RTLD_LOCAL, where
// the global scope does not see them. The registry is used only when the library's major version is
// the one of the headers built against (its vtable is this file's view of IPluginRegistry).
//
// TensorRT refuses to register a creator twice (a second loadLibrary fails with "plugin creator of
// CoupledScan exists already"), so the constructor does nothing when CoupledScan is registered
// already. It never aborts the host: a failure is one line on stderr, and the model that needs the
// plugin then fails to load with TensorRT's "creator not found".
#include "coupled_scan_plugin.h"

#include <NvInferRuntime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <link.h>
#include <string>
#include <unistd.h>
#include <vector>

namespace
{
constexpr char const* kSHIM = "libcoupled_scan_plugin_autoload.so";
constexpr char const* kPLUGIN_FILE = "libcoupled_scan_plugin.so";

using GetRegistryFn = nvinfer1::IPluginRegistry* (*) ();
using VersionFn = int32_t (*)();

struct TensorRT
{
    GetRegistryFn getRegistry{nullptr};
    VersionFn version{nullptr};
    std::string where;
};

bool traceOn()
{
    char const* v = std::getenv("CM_DEPLOY_PLUGIN_TRACE");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

int collectNvinfer(dl_phdr_info* info, size_t, void* out)
{
    char const* path = info->dlpi_name;
    char const* slash = std::strrchr(path, '/');
    if (std::strncmp(slash != nullptr ? slash + 1 : path, "libnvinfer", 10) == 0)
    {
        static_cast<std::vector<std::string>*>(out)->emplace_back(path);
    }
    return 0;
}

bool lookUp(void* scope, std::string const& where, TensorRT& out)
{
    void* registry = dlsym(scope, "getPluginRegistry");
    void* version = dlsym(scope, "getInferLibVersion");
    if (registry == nullptr || version == nullptr)
    {
        return false;
    }
    out = {reinterpret_cast<GetRegistryFn>(registry), reinterpret_cast<VersionFn>(version), where};
    return true;
}

// TensorRT's runtime entry points: in the global scope (a host linked with libnvinfer), else in a
// loaded libnvinfer* library (a host that loaded it RTLD_LOCAL, as tritonserver does its backends).
TensorRT findTensorRT()
{
    TensorRT t;
    if (lookUp(RTLD_DEFAULT, "the global scope", t))
    {
        return t;
    }
    std::vector<std::string> libs;
    dl_iterate_phdr(collectNvinfer, &libs); // dlopen only after the iteration (it holds the loader's lock)
    for (auto const& lib : libs)
    {
        void* h = dlopen(lib.c_str(), RTLD_LAZY | RTLD_NOLOAD); // already loaded: a handle, never a load
        bool const found = h != nullptr && lookUp(h, lib, t);
        if (h != nullptr)
        {
            dlclose(h); // the library stays loaded by whoever loaded it
        }
        if (found)
        {
            return t;
        }
    }
    return {};
}

bool sameName(char const* a, char const* b)
{
    return a != nullptr && b != nullptr && std::strcmp(a, b) == 0;
}

// Is CoupledScan (name, version, namespace) in the registry? Looked up through getAllCreators:
// getCreator logs an ERROR for a creator it does not find.
bool coupledScanRegistered(nvinfer1::IPluginRegistry& registry)
{
    using namespace cm_deploy::plugin;
    int32_t n = 0;
    nvinfer1::IPluginCreatorInterface* const* all = registry.getAllCreators(&n);
    for (int32_t i = 0; all != nullptr && i < n; ++i)
    {
        nvinfer1::IPluginCreatorInterface* c = all[i];
        if (c == nullptr)
        {
            continue;
        }
        char const* kind = c->getInterfaceInfo().kind;
        char const *name = nullptr, *version = nullptr, *ns = nullptr;
        if (sameName(kind, "PLUGIN CREATOR_V3ONE"))
        {
            auto* v3 = static_cast<nvinfer1::IPluginCreatorV3One*>(c);
            name = v3->getPluginName(), version = v3->getPluginVersion(), ns = v3->getPluginNamespace();
        }
        else if (sameName(kind, "PLUGIN CREATOR_V1"))
        {
            auto* v1 = static_cast<nvinfer1::IPluginCreator*>(c);
            name = v1->getPluginName(), version = v1->getPluginVersion(), ns = v1->getPluginNamespace();
        }
        if (sameName(name, kCOUPLED_SCAN_NAME) && sameName(version, kCOUPLED_SCAN_VERSION)
            && sameName(ns, kCOUPLED_SCAN_NAMESPACE))
        {
            return true;
        }
    }
    return false;
}

// The plugin library beside this one (the directory this library was loaded from), or "".
std::string pluginBesideMe()
{
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&pluginBesideMe), &info) == 0 || info.dli_fname == nullptr)
    {
        return "";
    }
    std::string self = info.dli_fname;
    size_t const slash = self.rfind('/');
    return (slash == std::string::npos ? std::string("./") : self.substr(0, slash + 1)) + kPLUGIN_FILE;
}

__attribute__((constructor)) void registerCoupledScan()
{
    TensorRT const trt = findTensorRT();
    if (trt.getRegistry == nullptr)
    {
        std::fprintf(stderr,
            "%s: TensorRT is not loaded in this process (no getPluginRegistry in the global scope or in a "
            "loaded libnvinfer* library): CoupledScan NOT registered. Load this library after TensorRT "
            "(tritonserver --backend-config=tensorrt,plugins=<this file>); TensorRT's own loaders (trtexec "
            "--dynamicPlugins, IPluginRegistry::loadLibrary) take %s itself.\n",
            kSHIM, kPLUGIN_FILE);
        return;
    }
    // The registry is called through the vtable of the headers this was built with: another major
    // version (or TensorRT-RTX, whose IPluginRegistry differs) would crash, so it is refused.
    int32_t const v = trt.version();
    if (v / 10000 != NV_TENSORRT_MAJOR)
    {
        std::fprintf(stderr,
            "%s: the TensorRT in %s is version %d.%d.%d, this library was built for TensorRT %d (its "
            "IPluginRegistry ABI): "
            "CoupledScan NOT registered. Load %s with that TensorRT's IPluginRegistry::loadLibrary.\n",
            kSHIM, trt.where.c_str(), v / 10000, v / 100 % 100, v % 100, NV_TENSORRT_MAJOR, kPLUGIN_FILE);
        return;
    }
    nvinfer1::IPluginRegistry* registry = trt.getRegistry();
    if (registry == nullptr)
    {
        std::fprintf(stderr, "%s: getPluginRegistry() returned null: CoupledScan NOT registered\n", kSHIM);
        return;
    }
    if (coupledScanRegistered(*registry))
    {
        if (traceOn())
        {
            std::fprintf(stderr, "%s: CoupledScan is registered already: nothing to do\n", kSHIM);
        }
        return;
    }
    std::string const plugin = pluginBesideMe();
    if (plugin.empty() || access(plugin.c_str(), R_OK) != 0)
    {
        std::fprintf(stderr, "%s: %s not found (it must lie beside this library): CoupledScan NOT registered\n",
            kSHIM, plugin.empty() ? kPLUGIN_FILE : plugin.c_str());
        return;
    }
    if (registry->loadLibrary(plugin.c_str()) == nullptr)
    {
        std::fprintf(stderr,
            "%s: TensorRT's IPluginRegistry::loadLibrary(%s) failed (TensorRT's log says why): CoupledScan NOT "
            "registered\n",
            kSHIM, plugin.c_str());
        return;
    }
    if (traceOn())
    {
        std::fprintf(stderr, "%s: registered CoupledScan from %s (TensorRT %d found in %s)\n", kSHIM, plugin.c_str(),
            v, trt.where.c_str());
    }
}
} // namespace
