// CoupledScan TensorRT plugin: public names and the library's entry points.
//
// The library registers one IPluginCreatorV3One: name "CoupledScan", version "1", namespace "".
// Load it with IPluginRegistry::loadLibrary(path), `trtexec --dynamicPlugins=path`, or
// `trt.get_plugin_registry().load_library(path)`. See README.md next to this header.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>

#if defined(_WIN32)
#define CM_DEPLOY_PLUGIN_EXPORT __declspec(dllexport)
#else
#define CM_DEPLOY_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

namespace cm_deploy
{
namespace plugin
{

constexpr char const* kCOUPLED_SCAN_NAME = "CoupledScan";
constexpr char const* kCOUPLED_SCAN_VERSION = "1";
constexpr char const* kCOUPLED_SCAN_NAMESPACE = "";

// Plugin fields (= attributes of the ONNX node CoupledScan, domain cm_deploy).
constexpr char const* kFIELD_DELTA_SOFTPLUS = "delta_softplus";   // int 0/1, default 0
constexpr char const* kFIELD_COUPLING_SCALE = "coupling_scale";   // float kappa > 0, required
constexpr char const* kFIELD_HAS_FINAL_STATE = "has_final_state"; // int 0/1, default 0: outputs y[, final_state]
// Serialized only (not an ONNX attribute): the implementation the builder picked, as a plugin tactic.
constexpr char const* kFIELD_TACTIC = "tactic"; // int: 1 the CUDA kernel, 2 the Triton kernels, 0 automatic

} // namespace plugin
} // namespace cm_deploy

extern "C"
{
    //! Called by TensorRT when it loads the library; the plugin logs through the logger it finds.
    CM_DEPLOY_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder);

    //! The creators this library provides (one: CoupledScan).
    CM_DEPLOY_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
}
