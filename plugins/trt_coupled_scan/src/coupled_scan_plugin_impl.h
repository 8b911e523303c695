// CoupledScan as an IPluginV3 (core, build and runtime capabilities) and its IPluginCreatorV3One.
#pragma once

#include "coupled_scan_plugin.h"
#include "scan_types.h"

#include <NvInferRuntime.h>

#include <string>
#include <vector>

namespace cm_deploy
{
namespace plugin
{

// Input and output positions (DESIGN.md section 3).
enum IoIndex : int32_t
{
    kU = 0,
    kDELTA = 1,
    kA = 2,
    kB = 3,
    kC = 4,
    kD = 5,
    kZ = 6,
    kDELTA_BIAS = 7,
    kINITIAL_STATE = 8, // optional input
};
constexpr int32_t kNB_REQUIRED_INPUTS = 8;
constexpr int32_t kNB_MAX_INPUTS = 9;

struct ScanAttrs
{
    int32_t deltaSoftplus{0};
    float couplingScale{0.f};
    int32_t hasFinalState{0};
    int32_t tactic{0}; // scan::ScanImpl: the builder's pick (serialized); 0 automatic

    bool operator==(ScanAttrs const& o) const
    {
        return deltaSoftplus == o.deltaSoftplus && couplingScale == o.couplingScale
            && hasFinalState == o.hasFinalState && tactic == o.tactic;
    }
};

// Parses and validates plugin fields. In phase kBUILD (from the ONNX parser or a network builder)
// delta_softplus and has_final_state default to 0 and coupling_scale is required; in phase kRUNTIME
// (fields written by getFieldsToSerialize) every field is required, except tactic (engines serialized
// before tactics existed: 1, the CUDA kernel their workspace was sized for); tactic is a runtime field
// only. Unknown, duplicate, mistyped or out-of-range fields are refused with a reason.
bool parseScanFields(nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase, ScanAttrs& out,
    std::string& why);

// Shape checks shared by configurePlugin, onShapeChange and enqueue. A dimension < 0 is unknown and
// only checked where known. outs may be null.
bool checkScanDims(nvinfer1::Dims const* ins, int32_t nbInputs, nvinfer1::Dims const* outs, int32_t nbOutputs,
    std::string& why);

bool isActivationType(nvinfer1::DataType t);

class CoupledScanPlugin final : public nvinfer1::IPluginV3,
                                public nvinfer1::IPluginV3OneCore,
                                public nvinfer1::IPluginV3OneBuild,
                                public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit CoupledScanPlugin(ScanAttrs const& attrs);
    CoupledScanPlugin(CoupledScanPlugin const& other);
    CoupledScanPlugin& operator=(CoupledScanPlugin const&) = delete;
    ~CoupledScanPlugin() noexcept override;

    ScanAttrs const& attrs() const noexcept
    {
        return mAttrs;
    }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    // Tactics: 1 the CUDA block kernel, always; 2 the Triton kernels, where compiled for the configured
    // type, M, E, N on this device. TensorRT times each and keeps the faster (setTactic, serialized).
    int32_t getNbTactics() noexcept override;
    int32_t getValidTactics(int32_t* tactics, int32_t nbTactics) noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;
    int32_t setTactic(int32_t tactic) noexcept override;

private:
    void rebuildFields();
    bool checkIo(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs, std::string& why) const;

    ScanAttrs mAttrs;
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
    int32_t mNbInputs{0}; // 8 or 9 once configured (configurePlugin / onShapeChange)
    bool mTritonOffered{false};  // configurePlugin: the Triton tactic is valid for the configured shape here
    bool mBuildConfigured{false}; // configurePlugin ran (build phase)
    bool mTritonReserved{false};  // ... and getWorkspaceSize covers the Triton kernels (some device has them)
    int32_t mSerialTactic{0};     // what getFieldsToSerialize writes for the tactic
};

class CoupledScanCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    CoupledScanCreator();

    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldNameCollection{};
};

// The library's single creator instance (what getCreators returns).
CoupledScanCreator& coupledScanCreator();

} // namespace plugin
} // namespace cm_deploy
