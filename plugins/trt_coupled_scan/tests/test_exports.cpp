// The built library as TensorRT sees it: dlopen, the two exported entry points, nothing else visible.
#include "test_helpers.h"

#include <NvInferRuntime.h>

#include <gtest/gtest.h>

#include <cstring>
#include <dlfcn.h>
#include <string>

#ifndef CM_PLUGIN_LIBRARY_PATH
#error "CM_PLUGIN_LIBRARY_PATH must name the built plugin library"
#endif

namespace
{
using GetCreatorsFn = nvinfer1::IPluginCreatorInterface* const* (*) (int32_t&);
using SetLoggerFinderFn = void (*)(nvinfer1::ILoggerFinder*);

class ExportsTest : public ::testing::Test
{
protected:
    void SetUp() override
    {
        handle = dlopen(CM_PLUGIN_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL);
        ASSERT_NE(handle, nullptr) << dlerror();
    }
    void TearDown() override
    {
        if (handle != nullptr)
        {
            auto set = reinterpret_cast<SetLoggerFinderFn>(dlsym(handle, "setLoggerFinder"));
            if (set != nullptr)
            {
                set(nullptr);
            }
            dlclose(handle);
        }
    }
    void* handle{nullptr};
};
} // namespace

TEST_F(ExportsTest, EntryPointsExported)
{
    EXPECT_NE(dlsym(handle, "getCreators"), nullptr);
    EXPECT_NE(dlsym(handle, "setLoggerFinder"), nullptr);
}

TEST_F(ExportsTest, InternalsHidden)
{
    // C++ internals and the static CUDA runtime linked in must not leak into the global namespace.
    EXPECT_EQ(dlsym(handle, "_ZN9cm_deploy6plugin18coupledScanCreatorEv"), nullptr);
    EXPECT_EQ(dlsym(handle, "cudaLaunchKernel"), nullptr);
    EXPECT_EQ(dlsym(handle, "cudaGetDevice"), nullptr);
}

TEST_F(ExportsTest, GetCreatorsReturnsCoupledScan)
{
    auto getCreators = reinterpret_cast<GetCreatorsFn>(dlsym(handle, "getCreators"));
    ASSERT_NE(getCreators, nullptr);
    int32_t nb = -1;
    nvinfer1::IPluginCreatorInterface* const* creators = getCreators(nb);
    ASSERT_EQ(nb, 1);
    ASSERT_NE(creators, nullptr);
    ASSERT_NE(creators[0], nullptr);
    nvinfer1::InterfaceInfo const info = creators[0]->getInterfaceInfo();
    EXPECT_STREQ(info.kind, "PLUGIN CREATOR_V3ONE");
    EXPECT_EQ(info.major, 1);
    auto* c = static_cast<nvinfer1::IPluginCreatorV3One*>(creators[0]);
    EXPECT_STREQ(c->getPluginName(), "CoupledScan");
    EXPECT_STREQ(c->getPluginVersion(), "1");
    EXPECT_STREQ(c->getPluginNamespace(), "");
    EXPECT_EQ(c->getFieldNames()->nbFields, 3);
}

TEST_F(ExportsTest, CreatesThroughTheLibraryAndLogsThroughTheFinder)
{
    auto getCreators = reinterpret_cast<GetCreatorsFn>(dlsym(handle, "getCreators"));
    auto setFinder = reinterpret_cast<SetLoggerFinderFn>(dlsym(handle, "setLoggerFinder"));
    ASSERT_NE(getCreators, nullptr);
    ASSERT_NE(setFinder, nullptr);
    cmtest::CaptureLoggerFinder finder;
    setFinder(&finder);
    int32_t nb = 0;
    auto* c = static_cast<nvinfer1::IPluginCreatorV3One*>(getCreators(nb)[0]);

    float scale = 0.5f;
    int32_t one = 1;
    nvinfer1::PluginField good[] = {{"coupling_scale", &scale, nvinfer1::PluginFieldType::kFLOAT32, 1},
        {"has_final_state", &one, nvinfer1::PluginFieldType::kINT32, 1}};
    nvinfer1::PluginFieldCollection fc{2, good};
    nvinfer1::IPluginV3* p = c->createPlugin("n0", &fc, nvinfer1::TensorRTPhase::kBUILD);
    ASSERT_NE(p, nullptr) << finder.logger.all();
    auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
    EXPECT_STREQ(core->getPluginName(), "CoupledScan");
    auto* b = static_cast<nvinfer1::IPluginV3OneBuild*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
    EXPECT_EQ(b->getNbOutputs(), 2);
    delete p;

    float bad = -2.f;
    nvinfer1::PluginField badField{"coupling_scale", &bad, nvinfer1::PluginFieldType::kFLOAT32, 1};
    nvinfer1::PluginFieldCollection badFc{1, &badField};
    EXPECT_EQ(c->createPlugin("n1", &badFc, nvinfer1::TensorRTPhase::kBUILD), nullptr);
    ASSERT_FALSE(finder.logger.messages.empty());
    EXPECT_NE(finder.logger.messages.back().find("createPlugin('n1', build) refused"), std::string::npos)
        << finder.logger.all();
    EXPECT_EQ(finder.logger.severities.back(), nvinfer1::ILogger::Severity::kERROR);
}
