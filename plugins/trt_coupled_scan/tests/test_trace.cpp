// With CM_DEPLOY_PLUGIN_TRACE=1 (set by CTest for this binary) every plugin method entry is printed
// to stderr, so that the last call before an abort inside TensorRT can be seen.
#include "coupled_scan_plugin_impl.h"
#include "logging.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>

using namespace nvinfer1;

TEST(Trace, MethodEntriesPrinted)
{
    ASSERT_NE(std::getenv("CM_DEPLOY_PLUGIN_TRACE"), nullptr) << "run through CTest, which sets the variable";
    ASSERT_TRUE(cm_deploy::plugin::traceEnabled());
    ::testing::internal::CaptureStderr();
    float scale = 0.5f;
    PluginField f{"coupling_scale", &scale, PluginFieldType::kFLOAT32, 1};
    PluginFieldCollection fc{1, &f};
    std::unique_ptr<IPluginV3> p(cm_deploy::plugin::coupledScanCreator().createPlugin("traced", &fc, TensorRTPhase::kBUILD));
    ASSERT_NE(p, nullptr);
    auto* b = static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
    b->getNbOutputs();
    std::unique_ptr<IPluginV3> c(p->clone());
    std::string const err = ::testing::internal::GetCapturedStderr();
    EXPECT_NE(err.find("[CoupledScan trace] createPlugin name='traced' phase=build nbFields=1"), std::string::npos) << err;
    EXPECT_NE(err.find("[CoupledScan trace] getCapabilityInterface 1"), std::string::npos) << err;
    EXPECT_NE(err.find("[CoupledScan trace] getNbOutputs"), std::string::npos) << err;
    EXPECT_NE(err.find("[CoupledScan trace] clone"), std::string::npos) << err;
}
