// The autoload shim (src/autoload.cpp) against libnvinfer_fake.so (fake_nvinfer.cpp), loaded the way
// tritonserver loads things: the TensorRT backend, and so libnvinfer, RTLD_NOW | RTLD_LOCAL (Triton
// core's shared_library.cc), then each path of --backend-config=tensorrt,plugins=... with a bare
// dlopen(RTLD_NOW | RTLD_LOCAL) (the TensorRT backend's shared_library.cc). Every scenario runs in a
// fresh child process (death-test machinery, "threadsafe" style re-executes this binary), since what
// a process has loaded and registered cannot be undone.
#include <NvInferRuntime.h>

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <dlfcn.h>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <unistd.h>

#if !defined(CM_AUTOLOAD_PATH) || !defined(CM_PLUGIN_LIBRARY_PATH) || !defined(CM_FAKE_NVINFER_PATH)
#error "CM_AUTOLOAD_PATH, CM_PLUGIN_LIBRARY_PATH and CM_FAKE_NVINFER_PATH must name the built libraries"
#endif

namespace
{
namespace fs = std::filesystem;

struct FakeTrt
{
    void* handle;
    int loadCalls() const
    {
        return reinterpret_cast<int (*)()>(dlsym(handle, "fakeTrtLoadCalls"))();
    }
    std::string loadPath(int i) const
    {
        return reinterpret_cast<char const* (*) (int)>(dlsym(handle, "fakeTrtLoadPath"))(i);
    }
    int coupledScanCreators() const
    {
        return reinterpret_cast<int (*)(char const*)>(dlsym(handle, "fakeTrtCreatorsNamed"))("CoupledScan");
    }
};

FakeTrt loadTensorRT(int scope)
{
    void* h = dlopen(CM_FAKE_NVINFER_PATH, RTLD_NOW | scope);
    EXPECT_NE(h, nullptr) << dlerror();
    return FakeTrt{h};
}

// `scenario` in a child process, which must end with status 0 (no failed expectation) and stderr
// matching `stderrRegex`.
void inChild(std::function<void()> const& scenario, char const* stderrRegex)
{
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    EXPECT_EXIT(
        {
            setenv("CM_DEPLOY_PLUGIN_TRACE", "1", 1); // the shim says what it did
            scenario();
            std::fflush(stderr);
            std::_Exit(::testing::Test::HasFailure() ? 1 : 0);
        },
        ::testing::ExitedWithCode(0), stderrRegex);
}

// A copy of the shim alone in a fresh folder (plus `besideIt` as libcoupled_scan_plugin.so if given).
std::string shimCopy(char const* besideIt)
{
    char tmpl[] = "/tmp/cm_autoload_XXXXXX";
    fs::path const dir = mkdtemp(tmpl);
    fs::copy_file(CM_AUTOLOAD_PATH, dir / "libcoupled_scan_plugin_autoload.so");
    if (besideIt != nullptr)
    {
        std::ofstream(dir / "libcoupled_scan_plugin.so") << besideIt;
    }
    return (dir / "libcoupled_scan_plugin_autoload.so").string();
}
} // namespace

TEST(Autoload, TritonBareDlopenRegistersThePluginBesideIt)
{
    inChild(
        [] {
            FakeTrt trt = loadTensorRT(RTLD_LOCAL);
            // As in tritonserver: TensorRT is not in the global scope.
            EXPECT_EQ(dlsym(RTLD_DEFAULT, "getPluginRegistry"), nullptr);
            ASSERT_NE(dlopen(CM_AUTOLOAD_PATH, RTLD_NOW | RTLD_LOCAL), nullptr) << dlerror();
            ASSERT_EQ(trt.loadCalls(), 1);
            EXPECT_EQ(fs::canonical(trt.loadPath(0)), fs::canonical(CM_PLUGIN_LIBRARY_PATH));
            EXPECT_EQ(trt.coupledScanCreators(), 1);
            // Loading it again (a second model, a second plugins= entry) changes nothing.
            ASSERT_NE(dlopen(CM_AUTOLOAD_PATH, RTLD_NOW | RTLD_LOCAL), nullptr);
            EXPECT_EQ(trt.loadCalls(), 1);
        },
        "registered CoupledScan from .*libcoupled_scan_plugin\\.so \\(TensorRT [0-9]+ found in .*libnvinfer_fake");
}

TEST(Autoload, TensorRTInTheGlobalScope)
{
    inChild(
        [] {
            FakeTrt trt = loadTensorRT(RTLD_GLOBAL); // e.g. trtexec, which links libnvinfer
            ASSERT_NE(dlopen(CM_AUTOLOAD_PATH, RTLD_NOW | RTLD_LOCAL), nullptr) << dlerror();
            EXPECT_EQ(trt.loadCalls(), 1);
            EXPECT_EQ(trt.coupledScanCreators(), 1);
        },
        "found in the global scope");
}

TEST(Autoload, NothingToDoWhenLoadLibraryRegisteredItFirst)
{
    inChild(
        [] {
            FakeTrt trt = loadTensorRT(RTLD_LOCAL);
            auto getRegistry = reinterpret_cast<nvinfer1::IPluginRegistry* (*) ()>(dlsym(trt.handle, "getPluginRegistry"));
            ASSERT_NE(getRegistry()->loadLibrary(CM_PLUGIN_LIBRARY_PATH), nullptr); // trtexec --dynamicPlugins
            ASSERT_NE(dlopen(CM_AUTOLOAD_PATH, RTLD_NOW | RTLD_LOCAL), nullptr) << dlerror();
            EXPECT_EQ(trt.loadCalls(), 1); // the shim did not load it again (TensorRT would refuse)
            EXPECT_EQ(trt.coupledScanCreators(), 1);
            // The registry's own duplicate refusal, which the shim avoids:
            EXPECT_EQ(getRegistry()->loadLibrary(CM_PLUGIN_LIBRARY_PATH), nullptr);
            EXPECT_EQ(trt.coupledScanCreators(), 1);
        },
        "CoupledScan is registered already: nothing to do");
}

TEST(Autoload, AnotherTensorRTMajorVersionIsRefused)
{
    inChild(
        [] {
            setenv("CM_FAKE_TRT_VERSION", "110002", 1); // a TensorRT 11: another IPluginRegistry ABI
            FakeTrt trt = loadTensorRT(RTLD_LOCAL);
            EXPECT_NE(dlopen(CM_AUTOLOAD_PATH, RTLD_NOW | RTLD_LOCAL), nullptr) << dlerror();
            EXPECT_EQ(trt.loadCalls(), 0);
            EXPECT_EQ(trt.coupledScanCreators(), 0);
        },
        "the TensorRT in .*libnvinfer_fake\\.so is version 11\\.0\\.2, this library was built for TensorRT [0-9]+ .*"
        "CoupledScan NOT registered");
}

TEST(Autoload, WithoutTensorRTSaysSoAndLoadsAnyway)
{
    inChild(
        [] {
            EXPECT_NE(dlopen(CM_AUTOLOAD_PATH, RTLD_NOW | RTLD_LOCAL), nullptr) << dlerror();
            EXPECT_EQ(dlopen(CM_PLUGIN_LIBRARY_PATH, RTLD_NOW | RTLD_NOLOAD), nullptr); // nothing loaded it
        },
        "TensorRT is not loaded in this process .*CoupledScan NOT registered");
}

TEST(Autoload, NoPluginBesideIt)
{
    inChild(
        [] {
            FakeTrt trt = loadTensorRT(RTLD_LOCAL);
            std::string const shim = shimCopy(nullptr);
            EXPECT_NE(dlopen(shim.c_str(), RTLD_NOW | RTLD_LOCAL), nullptr) << dlerror();
            EXPECT_EQ(trt.loadCalls(), 0);
            EXPECT_EQ(trt.coupledScanCreators(), 0);
            fs::remove_all(fs::path(shim).parent_path());
        },
        "/tmp/cm_autoload_.*/libcoupled_scan_plugin\\.so not found \\(it must lie beside this library\\): "
        "CoupledScan NOT registered");
}

TEST(Autoload, LoadLibraryRefusesTheFileBesideIt)
{
    inChild(
        [] {
            FakeTrt trt = loadTensorRT(RTLD_LOCAL);
            std::string const shim = shimCopy("not a shared library");
            EXPECT_NE(dlopen(shim.c_str(), RTLD_NOW | RTLD_LOCAL), nullptr) << dlerror();
            EXPECT_EQ(trt.loadCalls(), 1);
            EXPECT_EQ(trt.coupledScanCreators(), 0);
            fs::remove_all(fs::path(shim).parent_path());
        },
        "loadLibrary\\(/tmp/cm_autoload_.*/libcoupled_scan_plugin\\.so\\) failed");
}
