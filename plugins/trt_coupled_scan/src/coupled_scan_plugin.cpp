#include "coupled_scan_plugin_impl.h"

#include "logging.h"
#include "scan_launch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <new>
#include <sstream>

using namespace nvinfer1;

namespace cm_deploy
{
namespace plugin
{
namespace
{

char const* typeName(DataType t)
{
    switch (t)
    {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT8: return "int8";
    case DataType::kINT32: return "int32";
    case DataType::kINT64: return "int64";
    case DataType::kBOOL: return "bool";
    case DataType::kUINT8: return "uint8";
    case DataType::kFP8: return "fp8";
    default: return "other";
    }
}

char const* ioName(int32_t pos, int32_t nbInputs)
{
    static char const* const kIn[] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"};
    static char const* const kOut[] = {"y", "final_state"};
    if (pos >= 0 && pos < nbInputs && pos < kNB_MAX_INPUTS)
    {
        return kIn[pos];
    }
    int32_t const o = pos - nbInputs;
    return (o >= 0 && o < 2) ? kOut[o] : "?";
}

std::string dimsString(Dims const& d)
{
    std::ostringstream s;
    s << "(";
    for (int32_t i = 0; i < d.nbDims; ++i)
    {
        s << (i ? ", " : "") << d.d[i];
    }
    s << ")";
    return s.str();
}

// Which data type a position must have, given the activation type: kHALF stands for "the activation
// type" here and is resolved by the caller.
bool isActivationPosition(int32_t pos, int32_t nbInputs)
{
    if (pos < nbInputs)
    {
        return pos == kU || pos == kDELTA || pos == kB || pos == kC || pos == kZ;
    }
    return pos == nbInputs; // y
}

bool validIoCounts(int32_t nbInputs, int32_t nbOutputs, int32_t expectedOutputs, std::string& why)
{
    if (nbInputs != kNB_REQUIRED_INPUTS && nbInputs != kNB_MAX_INPUTS)
    {
        why = "expected 8 inputs (u, delta, A, B, C, D, z, delta_bias) or 9 (+ initial_state), got "
            + std::to_string(nbInputs);
        return false;
    }
    if (nbOutputs != expectedOutputs)
    {
        why = "expected " + std::to_string(expectedOutputs) + " output(s) (has_final_state="
            + std::to_string(expectedOutputs - 1) + "), got " + std::to_string(nbOutputs);
        return false;
    }
    return true;
}

scan::ActType actOf(DataType t)
{
    return t == DataType::kFLOAT ? scan::ActType::kFLOAT32
                                 : (t == DataType::kHALF ? scan::ActType::kFLOAT16 : scan::ActType::kBFLOAT16);
}

// Whether Triton kernels are compiled for this type, M, E, N (any batch and L) and run on the current
// device. dims: u's and A's, -1 where not known yet.
bool tritonOffered(ScanAttrs const& attrs, DataType act, Dims const& u, Dims const& A)
{
    if (u.nbDims != 4 || A.nbDims != 3 || u.d[1] < 1 || u.d[3] < 1 || A.d[2] < 1 || !isActivationType(act))
    {
        return false;
    }
    scan::DeviceLimits dev;
    scan::TritonLaunch l;
    return scan::tritonOptIn() && scan::currentDeviceLimits(dev, nullptr)
        && scan::chooseTritonLaunch(actOf(act), 1, static_cast<int32_t>(u.d[1]), 1, static_cast<int32_t>(u.d[3]),
            static_cast<int32_t>(A.d[2]), attrs.deltaSoftplus != 0, attrs.couplingScale, false, dev.ccMajor,
            dev.ccMinor, dev.smCount, l, nullptr);
}

template <typename T>
T readScalar(void const* p)
{
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

bool readInteger(PluginField const& f, int64_t& v)
{
    switch (f.type)
    {
    case PluginFieldType::kINT8: v = readScalar<int8_t>(f.data); return true;
    case PluginFieldType::kINT16: v = readScalar<int16_t>(f.data); return true;
    case PluginFieldType::kINT32: v = readScalar<int32_t>(f.data); return true;
    case PluginFieldType::kINT64: v = readScalar<int64_t>(f.data); return true;
    default: return false;
    }
}

bool readReal(PluginField const& f, double& v)
{
    switch (f.type)
    {
    case PluginFieldType::kFLOAT32: v = readScalar<float>(f.data); return true;
    case PluginFieldType::kFLOAT64: v = readScalar<double>(f.data); return true;
    default:
    {
        int64_t i = 0;
        if (readInteger(f, i)) // an ONNX INT attribute written as kappa = 1
        {
            v = static_cast<double>(i);
            return true;
        }
        return false;
    }
    }
}

} // namespace

bool isActivationType(DataType t)
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

// ---------------------------------------------------------------------------------------------------
// Fields

bool parseScanFields(PluginFieldCollection const* fc, TensorRTPhase phase, ScanAttrs& out, std::string& why)
{
    bool const runtime = phase == TensorRTPhase::kRUNTIME;
    if (phase != TensorRTPhase::kBUILD && !runtime)
    {
        why = "unknown TensorRTPhase " + std::to_string(static_cast<int32_t>(phase));
        return false;
    }
    int32_t const nb = fc != nullptr ? fc->nbFields : 0;
    if (nb < 0 || (nb > 0 && fc->fields == nullptr))
    {
        why = "malformed PluginFieldCollection (nbFields=" + std::to_string(nb) + ", fields=null)";
        return false;
    }
    ScanAttrs a;
    // build: automatic until the builder picks; runtime without the field: an engine serialized before
    // tactics existed, whose workspace was sized for the CUDA kernel only
    a.tactic = static_cast<int32_t>(runtime ? scan::ScanImpl::kCuda : scan::ScanImpl::kAuto);
    constexpr int32_t kNbNames = 4;
    bool seen[kNbNames] = {false, false, false, false};
    char const* const names[kNbNames] = {kFIELD_DELTA_SOFTPLUS, kFIELD_COUPLING_SCALE, kFIELD_HAS_FINAL_STATE,
        kFIELD_TACTIC};
    for (int32_t i = 0; i < nb; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr)
        {
            why = "field " + std::to_string(i) + " has no name";
            return false;
        }
        int32_t which = -1;
        for (int32_t k = 0; k < kNbNames; ++k)
        {
            if (std::strcmp(f.name, names[k]) == 0 && (k != 3 || runtime))
            {
                which = k;
            }
        }
        std::string const name(f.name);
        if (which < 0)
        {
            why = "unknown field '" + name + "' (expected delta_softplus, coupling_scale, has_final_state)";
            return false;
        }
        if (seen[which])
        {
            why = "field '" + name + "' given twice";
            return false;
        }
        seen[which] = true;
        if (f.length != 1 || f.data == nullptr)
        {
            why = "field '" + name + "' must hold exactly one value (length " + std::to_string(f.length)
                + (f.data == nullptr ? ", no data)" : ")");
            return false;
        }
        if (which == 1)
        {
            double v = 0;
            if (!readReal(f, v))
            {
                why = "field 'coupling_scale' must be a float (kFLOAT32 or kFLOAT64), got PluginFieldType "
                    + std::to_string(static_cast<int32_t>(f.type));
                return false;
            }
            if (!std::isfinite(v) || !(v > 0.0) || !std::isfinite(static_cast<float>(v))
                || !(static_cast<float>(v) > 0.f))
            {
                std::ostringstream s;
                s << "field 'coupling_scale' must be a finite float > 0 (1/M for mean coupling, 1 for the paper's "
                     "Eq. 6), got "
                  << v;
                why = s.str();
                return false;
            }
            a.couplingScale = static_cast<float>(v);
        }
        else
        {
            int64_t v = 0;
            if (!readInteger(f, v))
            {
                why = "field '" + name + "' must be an integer (kINT32 or kINT64), got PluginFieldType "
                    + std::to_string(static_cast<int32_t>(f.type));
                return false;
            }
            if (which == 3)
            {
                if (v < 0 || v > 2)
                {
                    why = "field 'tactic' must be 0 (automatic), 1 (CUDA kernel) or 2 (Triton kernels), got "
                        + std::to_string(v);
                    return false;
                }
                if (v == static_cast<int64_t>(scan::ScanImpl::kTriton) && scan::kTritonAotSpecCount == 0)
                {
                    why = std::string("the engine was built with the Triton tactic, but this plugin library has no "
                                      "Triton kernels (")
                        + scan::kTritonAotBuildInfo + ")";
                    return false;
                }
                a.tactic = static_cast<int32_t>(v);
                continue;
            }
            if (v != 0 && v != 1)
            {
                why = "field '" + name + "' must be 0 or 1, got " + std::to_string(v);
                return false;
            }
            (which == 0 ? a.deltaSoftplus : a.hasFinalState) = static_cast<int32_t>(v);
        }
    }
    for (int32_t k = 0; k < 3; ++k) // tactic (k = 3) is optional
    {
        bool const required = runtime || k == 1;
        if (!seen[k] && required)
        {
            why = std::string("field '") + names[k] + "' is missing"
                + (runtime ? " from the serialized plugin" : " (it has no default: pass kappa, e.g. 1/M)");
            return false;
        }
    }
    out = a;
    return true;
}

// ---------------------------------------------------------------------------------------------------
// Shapes

bool checkScanDims(Dims const* ins, int32_t nbInputs, Dims const* outs, int32_t nbOutputs, std::string& why)
{
    if (nbInputs != kNB_REQUIRED_INPUTS && nbInputs != kNB_MAX_INPUTS)
    {
        why = "expected 8 or 9 inputs, got " + std::to_string(nbInputs);
        return false;
    }
    static int32_t const kRank[kNB_MAX_INPUTS] = {4, 4, 3, 4, 4, 2, 4, 2, 3};
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        if (ins[i].nbDims != kRank[i])
        {
            why = std::string("input ") + ioName(i, nbInputs) + " must have rank " + std::to_string(kRank[i])
                + ", got " + dimsString(ins[i]);
            return false;
        }
    }
    Dims const& u = ins[kU];
    Dims const& A = ins[kA];
    // The symbols of the contract: batch, M, L, E from u; N from A.
    int64_t const batch = u.d[0], M = u.d[1], L = u.d[2], E = u.d[3], N = A.d[2];
    bool ok = true;
    auto expect = [&](int32_t pos, Dims const& d, std::initializer_list<std::pair<int64_t, char const*>> want) {
        int32_t axis = 0;
        for (auto const& w : want)
        {
            int64_t const got = d.d[axis];
            if (ok && got >= 0 && w.first >= 0 && got != w.first)
            {
                why = std::string(pos < nbInputs ? "input " : "output ") + ioName(pos, nbInputs) + " has shape "
                    + dimsString(d) + ": axis " + std::to_string(axis) + " should be " + w.second + " = "
                    + std::to_string(w.first);
                ok = false;
            }
            ++axis;
        }
    };
    expect(kDELTA, ins[kDELTA], {{batch, "batch"}, {M, "M"}, {L, "L"}, {E, "E"}});
    expect(kZ, ins[kZ], {{batch, "batch"}, {M, "M"}, {L, "L"}, {E, "E"}});
    expect(kA, A, {{M, "M"}, {E, "E"}, {N, "N"}});
    expect(kB, ins[kB], {{batch, "batch"}, {M, "M"}, {L, "L"}, {N, "N"}});
    expect(kC, ins[kC], {{batch, "batch"}, {M, "M"}, {L, "L"}, {N, "N"}});
    expect(kD, ins[kD], {{M, "M"}, {E, "E"}});
    expect(kDELTA_BIAS, ins[kDELTA_BIAS], {{M, "M"}, {E, "E"}});
    if (nbInputs == kNB_MAX_INPUTS)
    {
        expect(kINITIAL_STATE, ins[kINITIAL_STATE], {{batch, "batch"}, {E, "E"}, {N, "N"}});
    }
    if (outs != nullptr)
    {
        if (nbOutputs >= 1)
        {
            if (outs[0].nbDims != 4)
            {
                why = "output y must have rank 4, got " + dimsString(outs[0]);
                return false;
            }
            expect(nbInputs, outs[0], {{batch, "batch"}, {M, "M"}, {L, "L"}, {E, "E"}});
        }
        if (nbOutputs >= 2)
        {
            if (outs[1].nbDims != 3)
            {
                why = "output final_state must have rank 3, got " + dimsString(outs[1]);
                return false;
            }
            expect(nbInputs + 1, outs[1], {{batch, "batch"}, {E, "E"}, {N, "N"}});
        }
    }
    if (!ok)
    {
        return false;
    }
    if (M >= 0 && (M < 1 || M > scan::kMaxModalities))
    {
        why = "M (u axis 1) must be in [1, " + std::to_string(scan::kMaxModalities) + "], got " + std::to_string(M);
        return false;
    }
    if (N >= 0 && (N < 1 || N > scan::kMaxStates))
    {
        why = "N (A axis 2) must be in [1, " + std::to_string(scan::kMaxStates) + "], got " + std::to_string(N);
        return false;
    }
    if (E == 0 || E > 0x7fffffffLL)
    {
        why = "E (u axis 3) must be in [1, 2^31), got " + std::to_string(E);
        return false;
    }
    return true;
}

// ---------------------------------------------------------------------------------------------------
// Plugin

CoupledScanPlugin::CoupledScanPlugin(ScanAttrs const& attrs)
    : mAttrs(attrs)
{
    rebuildFields();
}

CoupledScanPlugin::CoupledScanPlugin(CoupledScanPlugin const& other)
    : IPluginV3(other)
    , IPluginV3OneCore(other)
    , IPluginV3OneBuild(other)
    , IPluginV3OneRuntime(other)
    , mAttrs(other.mAttrs)
    , mNbInputs(other.mNbInputs)
    , mTritonOffered(other.mTritonOffered)
    , mBuildConfigured(other.mBuildConfigured)
    , mTritonReserved(other.mTritonReserved)
{
    rebuildFields(); // the fields point into this object, never into `other`
}

CoupledScanPlugin::~CoupledScanPlugin() noexcept
{
    CM_TRACE("~CoupledScanPlugin");
}

void CoupledScanPlugin::rebuildFields()
{
    mFields.clear();
    mFields.emplace_back(kFIELD_DELTA_SOFTPLUS, &mAttrs.deltaSoftplus, PluginFieldType::kINT32, 1);
    mFields.emplace_back(kFIELD_COUPLING_SCALE, &mAttrs.couplingScale, PluginFieldType::kFLOAT32, 1);
    mFields.emplace_back(kFIELD_HAS_FINAL_STATE, &mAttrs.hasFinalState, PluginFieldType::kINT32, 1);
    mFields.emplace_back(kFIELD_TACTIC, &mSerialTactic, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginCapability* CoupledScanPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    CM_TRACE("getCapabilityInterface", std::to_string(static_cast<int32_t>(type)));
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* CoupledScanPlugin::clone() noexcept
{
    CM_TRACE("clone");
    try
    {
        return new CoupledScanPlugin(*this);
    }
    catch (std::exception const& e)
    {
        logError(std::string("clone failed: ") + e.what());
    }
    return nullptr;
}

char const* CoupledScanPlugin::getPluginName() const noexcept
{
    CM_TRACE("getPluginName");
    return kCOUPLED_SCAN_NAME;
}

char const* CoupledScanPlugin::getPluginVersion() const noexcept
{
    CM_TRACE("getPluginVersion");
    return kCOUPLED_SCAN_VERSION;
}

char const* CoupledScanPlugin::getPluginNamespace() const noexcept
{
    CM_TRACE("getPluginNamespace");
    return kCOUPLED_SCAN_NAMESPACE;
}

int32_t CoupledScanPlugin::getNbOutputs() const noexcept
{
    CM_TRACE("getNbOutputs");
    return 1 + mAttrs.hasFinalState;
}

int32_t CoupledScanPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    CM_TRACE("getOutputDataTypes", "nbInputs=" + std::to_string(nbInputs) + " nbOutputs=" + std::to_string(nbOutputs));
    std::string why;
    if (outputTypes == nullptr || inputTypes == nullptr || !validIoCounts(nbInputs, nbOutputs, getNbOutputs(), why))
    {
        logError("getOutputDataTypes: " + (why.empty() ? std::string("null arguments") : why));
        return -1;
    }
    DataType const act = inputTypes[kU];
    if (!isActivationType(act))
    {
        logError(std::string("getOutputDataTypes: u must be float32, float16 or bfloat16, got ") + typeName(act));
        return -1;
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        DataType const want = isActivationPosition(i, nbInputs) ? act : DataType::kFLOAT;
        if (inputTypes[i] != want)
        {
            logError(std::string("getOutputDataTypes: input ") + ioName(i, nbInputs) + " is " + typeName(inputTypes[i])
                + ", expected " + typeName(want) + " (activations share u's type; A, D, delta_bias, initial_state are "
                + "float32)");
            return -1;
        }
    }
    outputTypes[0] = act;
    if (nbOutputs == 2)
    {
        outputTypes[1] = DataType::kFLOAT;
    }
    return 0;
}

int32_t CoupledScanPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t nbShapeInputs, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    CM_TRACE("getOutputShapes", "nbInputs=" + std::to_string(nbInputs) + " nbOutputs=" + std::to_string(nbOutputs));
    std::string why;
    if (inputs == nullptr || outputs == nullptr || !validIoCounts(nbInputs, nbOutputs, getNbOutputs(), why))
    {
        logError("getOutputShapes: " + (why.empty() ? std::string("null arguments") : why));
        return -1;
    }
    if (nbShapeInputs != 0)
    {
        logError("getOutputShapes: CoupledScan takes no shape inputs, got " + std::to_string(nbShapeInputs));
        return -1;
    }
    // Build-time checks on whatever is constant already (M, E, N come from initializers).
    Dims dims[kNB_MAX_INPUTS];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        dims[i].nbDims = inputs[i].nbDims;
        if (inputs[i].nbDims < 0 || inputs[i].nbDims > Dims::MAX_DIMS)
        {
            logError(std::string("getOutputShapes: bad rank for input ") + ioName(i, nbInputs));
            return -1;
        }
        for (int32_t k = 0; k < inputs[i].nbDims; ++k)
        {
            IDimensionExpr const* e = inputs[i].d[k];
            dims[i].d[k] = (e != nullptr && e->isConstant()) ? e->getConstantValue() : -1;
        }
    }
    if (!checkScanDims(dims, nbInputs, nullptr, 0, why))
    {
        logError("getOutputShapes: " + why);
        return -1;
    }
    outputs[0] = inputs[kU];
    if (nbOutputs == 2)
    {
        outputs[1].nbDims = 3;
        outputs[1].d[0] = inputs[kU].d[0]; // batch
        outputs[1].d[1] = inputs[kU].d[3]; // E
        outputs[1].d[2] = inputs[kA].d[2]; // N
    }
    return 0;
}

bool CoupledScanPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    std::string why;
    if (inOut == nullptr || pos < 0 || pos >= nbInputs + nbOutputs
        || !validIoCounts(nbInputs, nbOutputs, getNbOutputs(), why))
    {
        CM_TRACE("supportsFormatCombination", "pos=" + std::to_string(pos) + " -> false (bad call)");
        return false;
    }
    PluginTensorDesc const& d = inOut[pos].desc;
    bool ok = d.format == TensorFormat::kLINEAR;
    if (ok)
    {
        if (pos == kU)
        {
            ok = isActivationType(d.type);
        }
        else if (isActivationPosition(pos, nbInputs))
        {
            ok = d.type == inOut[kU].desc.type;
        }
        else
        {
            ok = d.type == DataType::kFLOAT;
        }
    }
    CM_TRACE("supportsFormatCombination",
        "pos=" + std::to_string(pos) + " type=" + typeName(d.type) + " format=" + std::to_string(static_cast<int32_t>(d.format))
            + (ok ? " -> true" : " -> false"));
    return ok;
}

bool CoupledScanPlugin::checkIo(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out,
    int32_t nbOutputs, std::string& why) const
{
    if (in == nullptr || out == nullptr || !validIoCounts(nbInputs, nbOutputs, getNbOutputs(), why))
    {
        if (why.empty())
        {
            why = "null tensor descriptors";
        }
        return false;
    }
    DataType const act = in[kU].type;
    if (!isActivationType(act))
    {
        why = std::string("u must be float32, float16 or bfloat16, got ") + typeName(act);
        return false;
    }
    for (int32_t pos = 0; pos < nbInputs + nbOutputs; ++pos)
    {
        PluginTensorDesc const& d = pos < nbInputs ? in[pos] : out[pos - nbInputs];
        DataType const want = isActivationPosition(pos, nbInputs) ? act : DataType::kFLOAT;
        if (d.type != want)
        {
            why = std::string(ioName(pos, nbInputs)) + " is " + typeName(d.type) + ", expected " + typeName(want);
            return false;
        }
        if (d.format != TensorFormat::kLINEAR)
        {
            why = std::string(ioName(pos, nbInputs)) + " is not in linear format";
            return false;
        }
    }
    Dims ins[kNB_MAX_INPUTS];
    Dims outs[2];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        ins[i] = in[i].dims;
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        outs[i] = out[i].dims;
    }
    return checkScanDims(ins, nbInputs, outs, nbOutputs, why);
}

int32_t CoupledScanPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    CM_TRACE("configurePlugin", "nbInputs=" + std::to_string(nbInputs) + " nbOutputs=" + std::to_string(nbOutputs));
    std::string why;
    if (in == nullptr || out == nullptr || nbInputs < 0 || nbInputs > kNB_MAX_INPUTS || nbOutputs < 0 || nbOutputs > 2)
    {
        logError("configurePlugin: bad arguments (nbInputs=" + std::to_string(nbInputs)
            + ", nbOutputs=" + std::to_string(nbOutputs) + ")");
        return -1;
    }
    PluginTensorDesc ins[kNB_MAX_INPUTS];
    PluginTensorDesc outs[2];
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        ins[i] = in[i].desc;
    }
    for (int32_t i = 0; i < nbOutputs; ++i)
    {
        outs[i] = out[i].desc;
    }
    if (!checkIo(ins, nbInputs, outs, nbOutputs, why))
    {
        logError("configurePlugin: " + why);
        return -1;
    }
    mNbInputs = nbInputs;
    mTritonOffered = tritonOffered(mAttrs, in[kU].desc.type, in[kU].desc.dims, in[kA].desc.dims);
    Dims const& u = in[kU].desc.dims;
    mTritonReserved = u.d[1] >= 1 && u.d[3] >= 1 && in[kA].desc.dims.d[2] >= 1
        && scan::tritonCompiled(actOf(in[kU].desc.type), static_cast<int32_t>(u.d[1]), static_cast<int32_t>(u.d[3]),
            static_cast<int32_t>(in[kA].desc.dims.d[2]), mAttrs.deltaSoftplus != 0, mAttrs.couplingScale);
    mBuildConfigured = true;
    return 0;
}

size_t CoupledScanPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    CM_TRACE("getWorkspaceSize");
    // CUDA kernel: the state lives in registers, chunks in shared memory; the workspace holds only the
    // per-segment summaries of a launch that splits L (small batch), at most kMaxSegmentRows * E * N
    // float2. Triton kernels (whatever tactic is picked later): their per-program scratch, states and
    // segment summaries, at the largest batch and L of the profile.
    if (inputs == nullptr || nbInputs <= kA)
    {
        return 0;
    }
    Dims const& u = inputs[kU].max;
    int64_t const E = u.nbDims == 4 ? u.d[3] : -1;
    int64_t const N = inputs[kA].max.nbDims == 3 ? inputs[kA].max.d[2] : -1;
    if (E < 1 || N < 1 || N > scan::kMaxStates)
    {
        return 0;
    }
    size_t bytes = scan::segmentWorkspaceBytes(E, N);
    if (isActivationType(inputs[kU].desc.type) && u.d[0] >= 1 && u.d[1] >= 1 && u.d[2] >= 1)
    {
        // whatever device builds the engine (TensorRT-RTX builds without one): where the library has the
        // kernels, the engine may run them (getFieldsToSerialize)
        bytes = std::max(bytes,
            scan::tritonWorkspaceBound(actOf(inputs[kU].desc.type), u.d[0], static_cast<int32_t>(u.d[1]), u.d[2],
                static_cast<int32_t>(E), static_cast<int32_t>(N), mAttrs.deltaSoftplus != 0, mAttrs.couplingScale));
    }
    return bytes;
}

int32_t CoupledScanPlugin::getNbTactics() noexcept
{
    CM_TRACE("getNbTactics", mTritonOffered ? "2" : "1");
    return mTritonOffered ? 2 : 1;
}

int32_t CoupledScanPlugin::getValidTactics(int32_t* tactics, int32_t nbTactics) noexcept
{
    CM_TRACE("getValidTactics");
    if (tactics == nullptr || nbTactics != getNbTactics())
    {
        logError("getValidTactics: expected room for " + std::to_string(getNbTactics()) + " tactics, got "
            + std::to_string(nbTactics));
        return -1;
    }
    tactics[0] = static_cast<int32_t>(scan::ScanImpl::kCuda);
    if (mTritonOffered)
    {
        tactics[1] = static_cast<int32_t>(scan::ScanImpl::kTriton);
    }
    return 0;
}

int32_t CoupledScanPlugin::setTactic(int32_t tactic) noexcept
{
    CM_TRACE("setTactic", std::to_string(tactic));
    if (tactic == 0)
    {
        return 0; // TensorRT's default: keep the serialized pick (or automatic)
    }
    if (tactic != static_cast<int32_t>(scan::ScanImpl::kCuda) && tactic != static_cast<int32_t>(scan::ScanImpl::kTriton))
    {
        logError("setTactic: unknown tactic " + std::to_string(tactic) + " (1: CUDA kernel, 2: Triton kernels)");
        return -1;
    }
    mAttrs.tactic = tactic;
    return 0;
}

int32_t CoupledScanPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    CM_TRACE("onShapeChange", "nbInputs=" + std::to_string(nbInputs) + " nbOutputs=" + std::to_string(nbOutputs));
    std::string why;
    if (!checkIo(in, nbInputs, out, nbOutputs, why))
    {
        logError("onShapeChange: " + why);
        return -1;
    }
    for (int32_t i = 0; i < nbInputs; ++i)
    {
        for (int32_t k = 0; k < in[i].dims.nbDims; ++k)
        {
            if (in[i].dims.d[k] < 0)
            {
                logError(std::string("onShapeChange: input ") + ioName(i, nbInputs) + " has an unresolved dimension "
                    + dimsString(in[i].dims));
                return -1;
            }
        }
    }
    mNbInputs = nbInputs;
    return 0;
}

int32_t CoupledScanPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    CM_TRACE("enqueue");
    try
    {
        int32_t const nbInputs = mNbInputs;
        int32_t const nbOutputs = getNbOutputs();
        std::string why;
        if (nbInputs == 0)
        {
            logError("enqueue: called before configurePlugin/onShapeChange");
            return -1;
        }
        if (inputs == nullptr || outputs == nullptr || !checkIo(inputDesc, nbInputs, outputDesc, nbOutputs, why))
        {
            logError("enqueue: " + (why.empty() ? std::string("null buffers") : why));
            return -1;
        }
        Dims const& u = inputDesc[kU].dims;
        scan::ScanArgs a;
        a.batch = u.d[0];
        a.M = static_cast<int32_t>(u.d[1]);
        a.L = u.d[2];
        a.E = static_cast<int32_t>(u.d[3]);
        a.N = static_cast<int32_t>(inputDesc[kA].dims.d[2]);
        if (a.batch < 0 || a.L < 0)
        {
            logError("enqueue: unresolved batch or length " + dimsString(u));
            return -1;
        }
        if (a.batch == 0)
        {
            return 0; // empty outputs
        }
        a.u = inputs[kU];
        a.delta = inputs[kDELTA];
        a.A = static_cast<float const*>(inputs[kA]);
        a.B = inputs[kB];
        a.C = inputs[kC];
        a.D = static_cast<float const*>(inputs[kD]);
        a.z = inputs[kZ];
        a.deltaBias = static_cast<float const*>(inputs[kDELTA_BIAS]);
        a.initialState = nbInputs == kNB_MAX_INPUTS ? static_cast<float const*>(inputs[kINITIAL_STATE]) : nullptr;
        a.y = outputs[0];
        a.finalState = nbOutputs == 2 ? static_cast<float*>(outputs[1]) : nullptr;
        a.deltaSoftplus = mAttrs.deltaSoftplus;
        a.kappa = mAttrs.couplingScale;
        bool const needY = a.L > 0;
        if ((needY && (a.u == nullptr || a.delta == nullptr || a.B == nullptr || a.C == nullptr || a.z == nullptr
                          || a.D == nullptr || a.deltaBias == nullptr || a.y == nullptr))
            || a.A == nullptr || (nbInputs == kNB_MAX_INPUTS && a.initialState == nullptr)
            || (nbOutputs == 2 && a.finalState == nullptr))
        {
            logError("enqueue: a required buffer is null");
            return -1;
        }

        scan::ActType const t = actOf(inputDesc[kU].type);
        // The tactic's implementation (0: Triton where compiled, else CUDA). The workspace TensorRT passes is
        // the one getWorkspaceSize asked for: it covers the Triton kernels at every shape of the profile where
        // the library had them, which a tactic of 0 or 2 implies (getFieldsToSerialize); L is split into
        // segments only with one.
        bool const cudaOnly = mAttrs.tactic == static_cast<int32_t>(scan::ScanImpl::kCuda)
            || (mAttrs.tactic == static_cast<int32_t>(scan::ScanImpl::kAuto) && mBuildConfigured && !mTritonReserved);
        auto const room = workspace == nullptr ? scan::WorkspaceFor::kNone
                                               : (cudaOnly ? scan::WorkspaceFor::kCudaOnly : scan::WorkspaceFor::kAny);
        scan::ScanPlan plan;
        if (!scan::planCoupledScan(t, a, static_cast<scan::ScanImpl>(mAttrs.tactic), room, plan, why)
            || !scan::runCoupledScan(t, a, plan, workspace, stream, why))
        {
            logError("enqueue: " + why);
            return -1;
        }
        if (traceEnabled())
        {
            std::ostringstream s;
            scan::ScanGeometry const& g = plan.geometry;
            s << "launch batch=" << a.batch << " M=" << a.M << " L=" << a.L << " E=" << a.E << " N=" << a.N
              << " impl=" << scan::implName(plan.impl) << " tactic=" << mAttrs.tactic;
            if (plan.impl == scan::ScanImpl::kTriton)
            {
                scan::TritonPlan const& p = plan.triton.plan;
                s << " block_e=" << p.blockE << " block_n=" << p.blockN << " T=" << plan.triton.T
                  << " segs=" << p.nSeg << " segLen=" << p.segLen << " workspace=" << plan.workspaceBytes;
            }
            else
            {
                s << " npt=" << g.npt << " lpc=" << g.lpc << " ch=" << g.ch << " threads=" << g.nc << "+" << g.np
                  << " tc=" << g.tc << " smem=" << g.smemBytes << " blocks=" << g.blocks << " segs=" << g.segs
                  << " segLen=" << g.segLen;
            }
            traceCall("enqueue", s.str());
        }
        return 0;
    }
    catch (std::exception const& e)
    {
        logError(std::string("enqueue: ") + e.what());
    }
    return -1;
}

IPluginV3* CoupledScanPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    CM_TRACE("attachToContext");
    return clone(); // no per-context resources
}

PluginFieldCollection const* CoupledScanPlugin::getFieldsToSerialize() noexcept
{
    CM_TRACE("getFieldsToSerialize");
    // No pick from the builder (one tactic, or a builder that does not time, e.g. TensorRT-RTX without a
    // GPU): automatic at run time only where getWorkspaceSize reserved the Triton kernels' workspace;
    // otherwise the CUDA kernel, whatever library loads the engine later.
    mSerialTactic = mAttrs.tactic;
    if (mSerialTactic == static_cast<int32_t>(scan::ScanImpl::kAuto) && mBuildConfigured && !mTritonReserved)
    {
        mSerialTactic = static_cast<int32_t>(scan::ScanImpl::kCuda);
    }
    return &mFieldCollection;
}

// ---------------------------------------------------------------------------------------------------
// Creator

CoupledScanCreator::CoupledScanCreator()
{
    // Declare every attribute with its type: TensorRT's ONNX parser passes only declared fields.
    mFieldNames.emplace_back(kFIELD_DELTA_SOFTPLUS, nullptr, PluginFieldType::kINT32, 1);
    mFieldNames.emplace_back(kFIELD_COUPLING_SCALE, nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldNames.emplace_back(kFIELD_HAS_FINAL_STATE, nullptr, PluginFieldType::kINT32, 1);
    mFieldNameCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldNameCollection.fields = mFieldNames.data();
}

IPluginV3* CoupledScanCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept
{
    std::string const layer = name != nullptr ? name : "";
    char const* const phaseName = phase == TensorRTPhase::kBUILD ? "build" : "runtime";
    CM_TRACE("createPlugin", "name='" + layer + "' phase=" + phaseName
            + " nbFields=" + std::to_string(fc != nullptr ? fc->nbFields : -1));
    try
    {
        ScanAttrs attrs;
        std::string why;
        if (!parseScanFields(fc, phase, attrs, why))
        {
            logError("createPlugin('" + layer + "', " + phaseName + ") refused: " + why);
            return nullptr;
        }
        auto* plugin = new CoupledScanPlugin(attrs);
        if (traceEnabled())
        {
            std::ostringstream s;
            s << "created delta_softplus=" << attrs.deltaSoftplus << " coupling_scale=" << attrs.couplingScale
              << " has_final_state=" << attrs.hasFinalState;
            traceCall("createPlugin", s.str());
        }
        return plugin;
    }
    catch (std::exception const& e)
    {
        logError("createPlugin('" + layer + "'): " + e.what());
    }
    return nullptr;
}

PluginFieldCollection const* CoupledScanCreator::getFieldNames() noexcept
{
    CM_TRACE("getFieldNames");
    return &mFieldNameCollection;
}

char const* CoupledScanCreator::getPluginName() const noexcept
{
    CM_TRACE("creator getPluginName");
    return kCOUPLED_SCAN_NAME;
}

char const* CoupledScanCreator::getPluginVersion() const noexcept
{
    CM_TRACE("creator getPluginVersion");
    return kCOUPLED_SCAN_VERSION;
}

char const* CoupledScanCreator::getPluginNamespace() const noexcept
{
    CM_TRACE("creator getPluginNamespace");
    return kCOUPLED_SCAN_NAMESPACE;
}

CoupledScanCreator& coupledScanCreator()
{
    static CoupledScanCreator creator;
    return creator;
}

} // namespace plugin
} // namespace cm_deploy
