// CPU tests of the CoupledScan plugin's TensorRT-facing methods. No GPU, no kernel launches.
#include "coupled_scan_plugin_impl.h"
#include "logging.h"
#include "scan_types.h"
#include "triton_aot.h"
#include "test_helpers.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

using namespace nvinfer1;
using namespace cm_deploy::plugin;
using cmtest::Shape;

namespace
{

// Fields with their own storage, including malformed ones.
class FieldSet
{
public:
    FieldSet& i32(char const* name, int32_t v)
    {
        return add(name, &v, sizeof v, PluginFieldType::kINT32, 1);
    }
    FieldSet& i64(char const* name, int64_t v)
    {
        return add(name, &v, sizeof v, PluginFieldType::kINT64, 1);
    }
    FieldSet& f32(char const* name, float v)
    {
        return add(name, &v, sizeof v, PluginFieldType::kFLOAT32, 1);
    }
    FieldSet& f64(char const* name, double v)
    {
        return add(name, &v, sizeof v, PluginFieldType::kFLOAT64, 1);
    }
    FieldSet& add(char const* name, void const* data, size_t bytes, PluginFieldType type, int32_t length)
    {
        Entry e;
        e.hasName = name != nullptr;
        e.name = name != nullptr ? name : "";
        if (data != nullptr)
        {
            e.bytes.assign(static_cast<uint8_t const*>(data), static_cast<uint8_t const*>(data) + bytes);
            e.bytes.resize(std::max<size_t>(bytes, 16)); // room for a longer read than declared
        }
        e.hasData = data != nullptr;
        e.type = type;
        e.length = length;
        mEntries.push_back(std::move(e));
        return *this;
    }
    // Parser-like fields for the given attributes.
    static FieldSet parser(int32_t softplus, float scale, int32_t hasFinal)
    {
        FieldSet f;
        f.i32("delta_softplus", softplus).f32("coupling_scale", scale).i32("has_final_state", hasFinal);
        return f;
    }
    PluginFieldCollection const* fc()
    {
        mFields.clear();
        for (auto& e : mEntries)
        {
            mFields.emplace_back(e.hasName ? e.name.c_str() : nullptr, e.hasData ? e.bytes.data() : nullptr, e.type,
                e.length);
        }
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

private:
    struct Entry
    {
        std::string name;
        bool hasName{true};
        std::vector<uint8_t> bytes;
        bool hasData{true};
        PluginFieldType type{};
        int32_t length{};
    };
    std::vector<Entry> mEntries;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

// Copies a serialized field collection (names and data), as an engine file would.
class SerializedFields
{
public:
    explicit SerializedFields(PluginFieldCollection const* fc)
    {
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            size_t const bytes = f.type == PluginFieldType::kFLOAT32 || f.type == PluginFieldType::kINT32 ? 4 : 8;
            mNames.emplace_back(f.name);
            mData.emplace_back(static_cast<uint8_t const*>(f.data), static_cast<uint8_t const*>(f.data) + bytes);
            mTypes.push_back(f.type);
            mLengths.push_back(f.length);
        }
    }
    PluginFieldCollection const* fc()
    {
        mFields.clear();
        for (size_t i = 0; i < mNames.size(); ++i)
        {
            mFields.emplace_back(mNames[i].c_str(), mData[i].data(), mTypes[i], mLengths[i]);
        }
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

private:
    std::vector<std::string> mNames;
    std::vector<std::vector<uint8_t>> mData;
    std::vector<PluginFieldType> mTypes;
    std::vector<int32_t> mLengths;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

using PluginPtr = std::unique_ptr<IPluginV3>;

IPluginV3OneBuild* build(IPluginV3* p)
{
    return static_cast<IPluginV3OneBuild*>(p->getCapabilityInterface(PluginCapabilityType::kBUILD));
}
IPluginV3OneRuntime* runtime(IPluginV3* p)
{
    return static_cast<IPluginV3OneRuntime*>(p->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
}
IPluginV3OneCore* core(IPluginV3* p)
{
    return static_cast<IPluginV3OneCore*>(p->getCapabilityInterface(PluginCapabilityType::kCORE));
}

ScanAttrs attrsOf(IPluginV3* p)
{
    return static_cast<CoupledScanPlugin*>(p)->attrs();
}

class PluginTest : public ::testing::Test
{
protected:
    void SetUp() override
    {
        setLoggerFinderImpl(&finder);
    }
    void TearDown() override
    {
        setLoggerFinderImpl(nullptr);
    }
    PluginPtr create(FieldSet& f, TensorRTPhase phase = TensorRTPhase::kBUILD)
    {
        return PluginPtr(coupledScanCreator().createPlugin("layer0", f.fc(), phase));
    }
    PluginPtr make(int32_t softplus, float scale, int32_t hasFinal)
    {
        FieldSet f = FieldSet::parser(softplus, scale, hasFinal);
        return create(f);
    }
    cmtest::CaptureLoggerFinder finder;
};

} // namespace

// ---------------------------------------------------------------------------------------------------
// Creator

TEST_F(PluginTest, CreatorIdentity)
{
    auto& c = coupledScanCreator();
    EXPECT_STREQ(c.getPluginName(), "CoupledScan");
    EXPECT_STREQ(c.getPluginVersion(), "1");
    EXPECT_STREQ(c.getPluginNamespace(), "");
    InterfaceInfo const info = c.getInterfaceInfo();
    EXPECT_STREQ(info.kind, "PLUGIN CREATOR_V3ONE");
    EXPECT_EQ(info.major, 1);
    PluginFieldCollection const* names = c.getFieldNames();
    ASSERT_NE(names, nullptr);
    ASSERT_EQ(names->nbFields, 3);
    EXPECT_STREQ(names->fields[0].name, "delta_softplus");
    EXPECT_EQ(names->fields[0].type, PluginFieldType::kINT32);
    EXPECT_STREQ(names->fields[1].name, "coupling_scale");
    EXPECT_EQ(names->fields[1].type, PluginFieldType::kFLOAT32);
    EXPECT_STREQ(names->fields[2].name, "has_final_state");
    EXPECT_EQ(names->fields[2].type, PluginFieldType::kINT32);
    for (int32_t i = 0; i < 3; ++i)
    {
        EXPECT_EQ(names->fields[i].length, 1);
    }
}

TEST_F(PluginTest, CreateFromParserFields)
{
    auto p = make(1, 0.25f, 1);
    ASSERT_NE(p, nullptr) << finder.logger.all();
    ScanAttrs const a = attrsOf(p.get());
    EXPECT_EQ(a.deltaSoftplus, 1);
    EXPECT_EQ(a.couplingScale, 0.25f);
    EXPECT_EQ(a.hasFinalState, 1);
    EXPECT_EQ(build(p.get())->getNbOutputs(), 2);
    EXPECT_TRUE(finder.logger.messages.empty()) << finder.logger.all();
}

TEST_F(PluginTest, BuildDefaults)
{
    FieldSet f;
    f.f32("coupling_scale", 1.0f / 3);
    auto p = create(f);
    ASSERT_NE(p, nullptr) << finder.logger.all();
    EXPECT_EQ(attrsOf(p.get()).deltaSoftplus, 0);
    EXPECT_EQ(attrsOf(p.get()).hasFinalState, 0);
    EXPECT_EQ(build(p.get())->getNbOutputs(), 1);
}

TEST_F(PluginTest, AcceptsWiderFieldTypesInAnyOrder)
{
    FieldSet f;
    f.i64("has_final_state", 1).f64("coupling_scale", 0.5).i64("delta_softplus", 1);
    auto p = create(f);
    ASSERT_NE(p, nullptr) << finder.logger.all();
    EXPECT_EQ(attrsOf(p.get()), (ScanAttrs{1, 0.5f, 1}));

    FieldSet g; // an ONNX INT attribute for kappa = 1
    g.i32("coupling_scale", 1);
    auto q = create(g);
    ASSERT_NE(q, nullptr) << finder.logger.all();
    EXPECT_EQ(attrsOf(q.get()).couplingScale, 1.0f);
}

struct BadFields
{
    char const* label;
    std::function<void(FieldSet&)> fill;
    TensorRTPhase phase;
    char const* expectInLog;
};

class MalformedFieldsTest : public PluginTest, public ::testing::WithParamInterface<int>
{
};

static std::vector<BadFields> const& badFieldCases()
{
    float const nan = std::numeric_limits<float>::quiet_NaN();
    float const inf = std::numeric_limits<float>::infinity();
    static std::vector<BadFields> const cases = {
        {"missing_scale", [](FieldSet& f) { f.i32("delta_softplus", 1); }, TensorRTPhase::kBUILD,
            "'coupling_scale' is missing"},
        {"nan_scale", [=](FieldSet& f) { f.f32("coupling_scale", nan); }, TensorRTPhase::kBUILD, "finite float > 0"},
        {"inf_scale", [=](FieldSet& f) { f.f32("coupling_scale", inf); }, TensorRTPhase::kBUILD, "finite float > 0"},
        {"neg_inf_scale", [=](FieldSet& f) { f.f32("coupling_scale", -inf); }, TensorRTPhase::kBUILD,
            "finite float > 0"},
        {"zero_scale", [](FieldSet& f) { f.f32("coupling_scale", 0.f); }, TensorRTPhase::kBUILD, "finite float > 0"},
        {"negative_scale", [](FieldSet& f) { f.f32("coupling_scale", -0.5f); }, TensorRTPhase::kBUILD,
            "finite float > 0"},
        {"double_overflows_float", [](FieldSet& f) { f.f64("coupling_scale", 1e300); }, TensorRTPhase::kBUILD,
            "finite float > 0"},
        {"double_underflows_float", [](FieldSet& f) { f.f64("coupling_scale", 1e-300); }, TensorRTPhase::kBUILD,
            "finite float > 0"},
        {"scale_as_string",
            [](FieldSet& f) {
                char const s[] = "0.5";
                f.add("coupling_scale", s, sizeof s, PluginFieldType::kCHAR, 1);
            },
            TensorRTPhase::kBUILD, "must be a float"},
        {"softplus_2",
            [](FieldSet& f) {
                f.f32("coupling_scale", 0.5f).i32("delta_softplus", 2);
            },
            TensorRTPhase::kBUILD, "must be 0 or 1"},
        {"softplus_negative",
            [](FieldSet& f) {
                f.f32("coupling_scale", 0.5f).i32("delta_softplus", -1);
            },
            TensorRTPhase::kBUILD, "must be 0 or 1"},
        {"softplus_as_float",
            [](FieldSet& f) {
                f.f32("coupling_scale", 0.5f).f32("delta_softplus", 1.f);
            },
            TensorRTPhase::kBUILD, "must be an integer"},
        {"final_state_3",
            [](FieldSet& f) {
                f.f32("coupling_scale", 0.5f).i32("has_final_state", 3);
            },
            TensorRTPhase::kBUILD, "must be 0 or 1"},
        {"scale_length_0",
            [](FieldSet& f) {
                float v = 0.5f;
                f.add("coupling_scale", &v, sizeof v, PluginFieldType::kFLOAT32, 0);
            },
            TensorRTPhase::kBUILD, "exactly one value"},
        {"scale_length_2",
            [](FieldSet& f) {
                float v[2] = {0.5f, 0.5f};
                f.add("coupling_scale", v, sizeof v, PluginFieldType::kFLOAT32, 2);
            },
            TensorRTPhase::kBUILD, "exactly one value"},
        {"scale_null_data",
            [](FieldSet& f) { f.add("coupling_scale", nullptr, 0, PluginFieldType::kFLOAT32, 1); },
            TensorRTPhase::kBUILD, "no data"},
        {"unknown_name",
            [](FieldSet& f) {
                f.f32("coupling_scale", 0.5f).f32("coupling_scales", 0.5f);
            },
            TensorRTPhase::kBUILD, "unknown field 'coupling_scales'"},
        {"duplicate",
            [](FieldSet& f) {
                f.f32("coupling_scale", 0.5f).i32("delta_softplus", 0).i32("delta_softplus", 1);
            },
            TensorRTPhase::kBUILD, "given twice"},
        {"null_name",
            [](FieldSet& f) {
                float v = 0.5f;
                f.f32("coupling_scale", 0.5f).add(nullptr, &v, sizeof v, PluginFieldType::kFLOAT32, 1);
            },
            TensorRTPhase::kBUILD, "has no name"},
        {"runtime_missing_softplus",
            [](FieldSet& f) {
                f.f32("coupling_scale", 0.5f).i32("has_final_state", 0);
            },
            TensorRTPhase::kRUNTIME, "'delta_softplus' is missing from the serialized plugin"},
        {"runtime_missing_final",
            [](FieldSet& f) {
                f.f32("coupling_scale", 0.5f).i32("delta_softplus", 0);
            },
            TensorRTPhase::kRUNTIME, "'has_final_state' is missing"},
        {"runtime_nan_scale",
            [=](FieldSet& f) {
                f.i32("delta_softplus", 0).f32("coupling_scale", nan).i32("has_final_state", 0);
            },
            TensorRTPhase::kRUNTIME, "finite float > 0"},
        {"bad_phase", [](FieldSet& f) { f.f32("coupling_scale", 0.5f); }, static_cast<TensorRTPhase>(7),
            "unknown TensorRTPhase"},
    };
    return cases;
}

TEST_P(MalformedFieldsTest, RefusedWithReason)
{
    BadFields const& c = badFieldCases().at(GetParam());
    FieldSet f;
    c.fill(f);
    auto p = create(f, c.phase);
    EXPECT_EQ(p, nullptr) << c.label;
    EXPECT_NE(finder.logger.all().find(c.expectInLog), std::string::npos)
        << c.label << ": log was:\n"
        << finder.logger.all();
    ASSERT_FALSE(finder.logger.severities.empty());
    EXPECT_EQ(finder.logger.severities.back(), ILogger::Severity::kERROR);
}

INSTANTIATE_TEST_SUITE_P(Cases, MalformedFieldsTest, ::testing::Range(0, static_cast<int>(badFieldCases().size())),
    [](::testing::TestParamInfo<int> const& info) { return std::string(badFieldCases().at(info.param).label); });

TEST_F(PluginTest, MalformedCollections)
{
    auto& c = coupledScanCreator();
    EXPECT_EQ(c.createPlugin("x", nullptr, TensorRTPhase::kBUILD), nullptr); // coupling_scale missing
    EXPECT_EQ(c.createPlugin("x", nullptr, TensorRTPhase::kRUNTIME), nullptr);
    EXPECT_EQ(c.createPlugin(nullptr, nullptr, TensorRTPhase::kRUNTIME), nullptr);
    PluginFieldCollection neg{-1, nullptr};
    EXPECT_EQ(c.createPlugin("x", &neg, TensorRTPhase::kBUILD), nullptr);
    PluginFieldCollection nullFields{2, nullptr};
    EXPECT_EQ(c.createPlugin("x", &nullFields, TensorRTPhase::kBUILD), nullptr);
    EXPECT_NE(finder.logger.all().find("malformed PluginFieldCollection"), std::string::npos) << finder.logger.all();
}

// ---------------------------------------------------------------------------------------------------
// Serialization round trip and clone

TEST_F(PluginTest, FieldsRoundTrip)
{
    std::vector<ScanAttrs> const cases = {{0, 1.f / 3, 0}, {1, 1.f, 1}, {1, 0.125f, 0}, {0, 7.5f, 1}};
    for (ScanAttrs const& want : cases)
    {
        auto p = make(want.deltaSoftplus, want.couplingScale, want.hasFinalState);
        ASSERT_NE(p, nullptr);
        PluginFieldCollection const* ser = runtime(p.get())->getFieldsToSerialize();
        ASSERT_NE(ser, nullptr);
        ASSERT_EQ(ser->nbFields, 4);
        SerializedFields copy(ser);
        p.reset(); // an engine outlives the build-time plugin
        PluginPtr q(coupledScanCreator().createPlugin("layer0", copy.fc(), TensorRTPhase::kRUNTIME));
        ASSERT_NE(q, nullptr) << finder.logger.all();
        EXPECT_EQ(attrsOf(q.get()), want);
        EXPECT_EQ(build(q.get())->getNbOutputs(), 1 + want.hasFinalState);
        // And again from the deserialized plugin: the same bytes.
        PluginFieldCollection const* ser2 = runtime(q.get())->getFieldsToSerialize();
        ASSERT_EQ(ser2->nbFields, 4);
        for (int32_t i = 0; i < 4; ++i)
        {
            EXPECT_STREQ(ser2->fields[i].name, copy.fc()->fields[i].name);
            EXPECT_EQ(ser2->fields[i].type, copy.fc()->fields[i].type);
            EXPECT_EQ(std::memcmp(ser2->fields[i].data, copy.fc()->fields[i].data, 4), 0);
        }
    }
}

TEST_F(PluginTest, SerializedTypes)
{
    auto p = make(1, 0.5f, 1);
    PluginFieldCollection const* ser = runtime(p.get())->getFieldsToSerialize();
    EXPECT_EQ(ser->fields[0].type, PluginFieldType::kINT32);
    EXPECT_EQ(ser->fields[1].type, PluginFieldType::kFLOAT32);
    EXPECT_EQ(ser->fields[2].type, PluginFieldType::kINT32);
    EXPECT_STREQ(ser->fields[3].name, "tactic");
    EXPECT_EQ(ser->fields[3].type, PluginFieldType::kINT32);
}

// ---------------------------------------------------------------------------------------------------
// Tactics: 1 the CUDA kernel, 2 the Triton kernels (the builder's pick is serialized)

TEST_F(PluginTest, TacticRoundTrip)
{
    namespace scan = cm_deploy::scan;
    std::vector<int32_t> tactics = {0, 1};
    if (scan::kTritonAotSpecCount > 0)
    {
        tactics.push_back(2);
    }
    for (int32_t tactic : tactics)
    {
        auto p = make(1, 0.5f, 0);
        ASSERT_EQ(runtime(p.get())->setTactic(tactic), 0) << finder.logger.all();
        SerializedFields copy(runtime(p.get())->getFieldsToSerialize());
        p.reset();
        PluginPtr q(coupledScanCreator().createPlugin("layer0", copy.fc(), TensorRTPhase::kRUNTIME));
        ASSERT_NE(q, nullptr) << finder.logger.all();
        EXPECT_EQ(attrsOf(q.get()).tactic, tactic);
        // TensorRT's setTactic(0) at run time (its default) keeps the serialized pick; a clone carries it
        EXPECT_EQ(runtime(q.get())->setTactic(0), 0);
        PluginPtr c(q->clone());
        EXPECT_EQ(attrsOf(c.get()).tactic, tactic);
    }
    auto p = make(1, 0.5f, 0);
    EXPECT_NE(runtime(p.get())->setTactic(3), 0);
    EXPECT_NE(runtime(p.get())->setTactic(-1), 0);
    EXPECT_NE(finder.logger.all().find("unknown tactic 3"), std::string::npos) << finder.logger.all();
    EXPECT_EQ(attrsOf(p.get()).tactic, 0);
}

TEST_F(PluginTest, TacticFieldValidated)
{
    namespace scan = cm_deploy::scan;
    auto runtimeFields = [](FieldSet& f) -> FieldSet& {
        return f.i32("delta_softplus", 1).f32("coupling_scale", 0.5f).i32("has_final_state", 0);
    };
    // an engine serialized before tactics existed: the CUDA kernel its workspace was sized for
    FieldSet old;
    runtimeFields(old);
    auto p = create(old, TensorRTPhase::kRUNTIME);
    ASSERT_NE(p, nullptr) << finder.logger.all();
    EXPECT_EQ(attrsOf(p.get()).tactic, 1);
    struct Bad
    {
        std::function<void(FieldSet&)> fill;
        TensorRTPhase phase;
        char const* expect;
    };
    std::vector<Bad> const bad = {
        {[&](FieldSet& f) { runtimeFields(f).i32("tactic", 3); }, TensorRTPhase::kRUNTIME, "field 'tactic' must be 0"},
        {[&](FieldSet& f) { runtimeFields(f).i32("tactic", -1); }, TensorRTPhase::kRUNTIME, "field 'tactic' must be 0"},
        {[&](FieldSet& f) { runtimeFields(f).f32("tactic", 1.f); }, TensorRTPhase::kRUNTIME, "must be an integer"},
        {[&](FieldSet& f) { runtimeFields(f).i32("tactic", 1).i32("tactic", 1); }, TensorRTPhase::kRUNTIME,
            "given twice"},
        // not an ONNX attribute: the parser never passes it
        {[&](FieldSet& f) { f.f32("coupling_scale", 0.5f).i32("tactic", 1); }, TensorRTPhase::kBUILD,
            "unknown field 'tactic'"},
    };
    for (Bad const& b : bad)
    {
        FieldSet f;
        b.fill(f);
        EXPECT_EQ(create(f, b.phase), nullptr) << b.expect;
        EXPECT_NE(finder.logger.all().find(b.expect), std::string::npos) << b.expect << "\n" << finder.logger.all();
    }
    // the Triton tactic needs a library with Triton kernels
    FieldSet triton;
    runtimeFields(triton).i64("tactic", 2);
    auto t = create(triton, TensorRTPhase::kRUNTIME);
    if (scan::kTritonAotSpecCount > 0)
    {
        ASSERT_NE(t, nullptr) << finder.logger.all();
        EXPECT_EQ(attrsOf(t.get()).tactic, 2);
    }
    else
    {
        EXPECT_EQ(t, nullptr);
        EXPECT_NE(finder.logger.all().find("has no Triton kernels"), std::string::npos) << finder.logger.all();
    }
}

TEST_F(PluginTest, ValidTactics)
{
    auto p = make(1, 0.5f, 1);
    auto* b = build(p.get());
    // E = 10: no Triton kernel takes it (E % 16 != 0) on any device: the CUDA kernel alone
    Shape s{2, 3, 11, 10, 16};
    auto d = cmtest::dynDescs(s, DataType::kFLOAT, true, true, true);
    ASSERT_EQ(b->configurePlugin(d.data(), 9, d.data() + 9, 2), 0) << finder.logger.all();
    ASSERT_EQ(b->getNbTactics(), 1);
    int32_t tactics[2] = {-7, -7};
    ASSERT_EQ(b->getValidTactics(tactics, 1), 0);
    EXPECT_EQ(tactics[0], 1);
    EXPECT_NE(b->getValidTactics(tactics, 2), 0); // not the count it announced
    EXPECT_NE(b->getValidTactics(nullptr, 1), 0);
    EXPECT_EQ(b->getWorkspaceSize(d.data(), 9, d.data() + 9, 2), cm_deploy::scan::segmentWorkspaceBytes(10, 16));
    // no pick from the builder and no Triton workspace reserved: the engine runs the CUDA kernel
    auto const serialTactic = [&] {
        PluginFieldCollection const* ser = runtime(p.get())->getFieldsToSerialize();
        int32_t v = -1;
        std::memcpy(&v, ser->fields[3].data, sizeof v);
        return v;
    };
    EXPECT_EQ(serialTactic(), 1);
    // the paper's shape: the Triton tactic too where a kernel is compiled and a device runs it
    Shape paper{64, 3, 500, 256, 64}; // the Triton scratch (~38 MB) outgrows the CUDA kernel's segments here
    auto dp = cmtest::dynDescs(paper, DataType::kBF16, true, true, true);
    ASSERT_EQ(b->configurePlugin(dp.data(), 9, dp.data() + 9, 2), 0) << finder.logger.all();
    int32_t const nb = b->getNbTactics();
    ASSERT_TRUE(nb == 1 || nb == 2);
    ASSERT_EQ(b->getValidTactics(tactics, nb), 0);
    EXPECT_EQ(tactics[0], 1);
    if (nb == 2)
    {
        EXPECT_EQ(tactics[1], 2);
    }
    // where this library has the Triton kernels (on some device) the workspace covers them and, without a
    // pick from the builder, the engine chooses at run time
    bool const compiled = cm_deploy::scan::tritonCompiled(cm_deploy::scan::ActType::kBFLOAT16, 3, 256, 64, true, 0.5f);
    size_t const ws = b->getWorkspaceSize(dp.data(), 9, dp.data() + 9, 2);
    EXPECT_EQ(ws > cm_deploy::scan::segmentWorkspaceBytes(256, 64), compiled);
    EXPECT_EQ(serialTactic(), compiled ? 0 : 1);
    ASSERT_EQ(runtime(p.get())->setTactic(1), 0); // the builder's pick wins
    EXPECT_EQ(serialTactic(), 1);
}

TEST_F(PluginTest, CloneIsIndependent)
{
    auto p = make(1, 0.5f, 1);
    Shape s;
    auto d = cmtest::dynDescs(s, DataType::kHALF, true, true, true);
    ASSERT_EQ(build(p.get())->configurePlugin(d.data(), 9, d.data() + 9, 2), 0) << finder.logger.all();
    PluginPtr c(p->clone());
    ASSERT_NE(c, nullptr);
    PluginFieldCollection const* fp = runtime(p.get())->getFieldsToSerialize();
    PluginFieldCollection const* fc = runtime(c.get())->getFieldsToSerialize();
    EXPECT_NE(fp->fields, fc->fields);
    EXPECT_NE(fp->fields[1].data, fc->fields[1].data); // the clone's fields point into the clone
    p.reset();
    EXPECT_EQ(attrsOf(c.get()), (ScanAttrs{1, 0.5f, 1}));
    float scale = 0;
    std::memcpy(&scale, fc->fields[1].data, sizeof scale);
    EXPECT_EQ(scale, 0.5f);
    // The configured input count travels with the clone: enqueue of an empty batch succeeds.
    Shape empty;
    empty.batch = 0;
    auto e = cmtest::descs(empty, DataType::kHALF, true, true);
    std::vector<void const*> in(9, nullptr);
    std::vector<void*> out(2, nullptr);
    EXPECT_EQ(runtime(c.get())->enqueue(e.data(), e.data() + 9, in.data(), out.data(), nullptr, nullptr), 0)
        << finder.logger.all();
    PluginPtr attached(runtime(c.get())->attachToContext(nullptr));
    ASSERT_NE(attached, nullptr);
    EXPECT_EQ(attrsOf(attached.get()), (ScanAttrs{1, 0.5f, 1}));
}

TEST_F(PluginTest, Capabilities)
{
    auto p = make(0, 0.5f, 0);
    EXPECT_STREQ(p->getInterfaceInfo().kind, "PLUGIN");
    EXPECT_EQ(p->getInterfaceInfo().major, 1);
    IPluginV3OneCore* c = core(p.get());
    IPluginV3OneBuild* b = build(p.get());
    IPluginV3OneRuntime* r = runtime(p.get());
    ASSERT_NE(c, nullptr);
    ASSERT_NE(b, nullptr);
    ASSERT_NE(r, nullptr);
    EXPECT_STREQ(c->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE");
    EXPECT_STREQ(b->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD");
    EXPECT_EQ(b->getInterfaceInfo().major, 1);
    EXPECT_STREQ(r->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME");
    EXPECT_STREQ(c->getPluginName(), "CoupledScan");
    EXPECT_STREQ(c->getPluginVersion(), "1");
    EXPECT_STREQ(c->getPluginNamespace(), "");
    EXPECT_EQ(p->getCapabilityInterface(static_cast<PluginCapabilityType>(9)), nullptr);
    EXPECT_EQ(b->getWorkspaceSize(nullptr, 8, nullptr, 1), 0u);
}

// ---------------------------------------------------------------------------------------------------
// Output shapes through IExprBuilder

namespace
{
struct ExprInputs
{
    std::vector<DimsExprs> in;
};

// Inputs as TensorRT would present them for an ONNX model: batch and L symbolic, M, E, N constant.
ExprInputs exprInputs(cmtest::FakeExprBuilder& eb, Shape const& s, bool withInitial)
{
    auto* batch = eb.dim(s.batch, "batch");
    auto* M = eb.constant(s.M);
    auto* L = eb.dim(s.L, "L");
    auto* E = eb.constant(s.E);
    auto* N = eb.constant(s.N);
    ExprInputs r;
    r.in = {eb.dims({batch, M, L, E}), eb.dims({batch, M, L, E}), eb.dims({M, E, N}), eb.dims({batch, M, L, N}),
        eb.dims({batch, M, L, N}), eb.dims({M, E}), eb.dims({batch, M, L, E}), eb.dims({M, E})};
    if (withInitial)
    {
        r.in.push_back(eb.dims({batch, E, N}));
    }
    return r;
}
} // namespace

TEST_F(PluginTest, OutputShapesSymbolic)
{
    for (int32_t hasFinal : {0, 1})
    {
        for (bool withInitial : {false, true})
        {
            auto p = make(1, 0.5f, hasFinal);
            cmtest::FakeExprBuilder eb;
            Shape s;
            s.batch = -1;
            s.L = -1;
            s.E = 6;
            s.N = 16;
            ExprInputs x = exprInputs(eb, s, withInitial);
            DimsExprs out[2]{};
            int32_t const nbOut = 1 + hasFinal;
            ASSERT_EQ(build(p.get())->getOutputShapes(x.in.data(), static_cast<int32_t>(x.in.size()), nullptr, 0, out,
                          nbOut, eb),
                0)
                << finder.logger.all();
            ASSERT_EQ(out[0].nbDims, 4);
            for (int32_t k = 0; k < 4; ++k)
            {
                EXPECT_EQ(out[0].d[k], x.in[0].d[k]); // y has u's dims, the same expressions
            }
            EXPECT_EQ(cmtest::exprText(out[0].d[0]), "batch");
            EXPECT_EQ(cmtest::exprText(out[0].d[2]), "L");
            if (hasFinal)
            {
                ASSERT_EQ(out[1].nbDims, 3);
                EXPECT_EQ(cmtest::exprText(out[1].d[0]), "batch");
                ASSERT_TRUE(out[1].d[1]->isConstant());
                EXPECT_EQ(out[1].d[1]->getConstantValue(), 6);
                ASSERT_TRUE(out[1].d[2]->isConstant());
                EXPECT_EQ(out[1].d[2]->getConstantValue(), 16);
            }
        }
    }
}

TEST_F(PluginTest, OutputShapesConstant)
{
    auto p = make(0, 0.5f, 1);
    cmtest::FakeExprBuilder eb;
    Shape s{4, 2, 9, 7, 3};
    ExprInputs x = exprInputs(eb, s, false);
    DimsExprs out[2]{};
    ASSERT_EQ(build(p.get())->getOutputShapes(x.in.data(), 8, nullptr, 0, out, 2, eb), 0);
    std::vector<int64_t> y, f;
    for (int32_t k = 0; k < out[0].nbDims; ++k)
    {
        y.push_back(out[0].d[k]->getConstantValue());
    }
    for (int32_t k = 0; k < out[1].nbDims; ++k)
    {
        f.push_back(out[1].d[k]->getConstantValue());
    }
    EXPECT_EQ(y, (std::vector<int64_t>{4, 2, 9, 7}));
    EXPECT_EQ(f, (std::vector<int64_t>{4, 7, 3}));
}

TEST_F(PluginTest, OutputShapesRefused)
{
    auto p = make(0, 0.5f, 0);
    auto* b = build(p.get());
    cmtest::FakeExprBuilder eb;
    Shape s{2, 3, 5, 8, 4};
    DimsExprs out[2]{};

    ExprInputs x = exprInputs(eb, s, false);
    EXPECT_NE(b->getOutputShapes(x.in.data(), 7, nullptr, 0, out, 1, eb), 0);  // too few inputs
    EXPECT_NE(b->getOutputShapes(x.in.data(), 8, nullptr, 0, out, 2, eb), 0);  // has_final_state = 0
    EXPECT_NE(b->getOutputShapes(x.in.data(), 8, x.in.data(), 1, out, 1, eb), 0); // shape inputs

    ExprInputs rank = exprInputs(eb, s, false);
    rank.in[2] = eb.dims({eb.constant(3), eb.constant(8)}); // A must be 3-D
    EXPECT_NE(b->getOutputShapes(rank.in.data(), 8, nullptr, 0, out, 1, eb), 0);

    ExprInputs m = exprInputs(eb, s, false);
    m.in[2].d[0] = eb.constant(2); // A's M differs from u's
    EXPECT_NE(b->getOutputShapes(m.in.data(), 8, nullptr, 0, out, 1, eb), 0);
    EXPECT_NE(finder.logger.all().find("axis 0 should be M = 3"), std::string::npos) << finder.logger.all();

    ExprInputs n = exprInputs(eb, s, false);
    n.in[3].d[3] = eb.constant(5); // B's N differs from A's
    EXPECT_NE(b->getOutputShapes(n.in.data(), 8, nullptr, 0, out, 1, eb), 0);

    Shape big = s;
    big.M = 9; // above the kernel's modality capacity
    ExprInputs mm = exprInputs(eb, big, false);
    EXPECT_NE(b->getOutputShapes(mm.in.data(), 8, nullptr, 0, out, 1, eb), 0);

    ExprInputs ok = exprInputs(eb, s, false);
    EXPECT_EQ(b->getOutputShapes(ok.in.data(), 8, nullptr, 0, out, 1, eb), 0);
}

// ---------------------------------------------------------------------------------------------------
// Data types and formats

TEST_F(PluginTest, OutputDataTypes)
{
    for (int32_t hasFinal : {0, 1})
    {
        auto p = make(0, 0.5f, hasFinal);
        auto* b = build(p.get());
        for (DataType act : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
        {
            for (bool withInitial : {false, true})
            {
                auto d = cmtest::descs(Shape{}, act, withInitial, hasFinal);
                int32_t const nbIn = withInitial ? 9 : 8;
                std::vector<DataType> in;
                for (int32_t i = 0; i < nbIn; ++i)
                {
                    in.push_back(d[i].type);
                }
                DataType out[2] = {DataType::kINT8, DataType::kINT8};
                ASSERT_EQ(b->getOutputDataTypes(out, 1 + hasFinal, in.data(), nbIn), 0) << finder.logger.all();
                EXPECT_EQ(out[0], act);
                if (hasFinal)
                {
                    EXPECT_EQ(out[1], DataType::kFLOAT);
                }
            }
        }
        // Refusals.
        auto d = cmtest::descs(Shape{}, DataType::kHALF, false, hasFinal);
        std::vector<DataType> in;
        for (int32_t i = 0; i < 8; ++i)
        {
            in.push_back(d[i].type);
        }
        DataType out[2];
        std::vector<DataType> bad = in;
        bad[0] = bad[1] = bad[3] = bad[4] = bad[6] = DataType::kINT8;
        EXPECT_NE(b->getOutputDataTypes(out, 1 + hasFinal, bad.data(), 8), 0);
        bad = in;
        bad[2] = DataType::kHALF; // A must stay float32
        EXPECT_NE(b->getOutputDataTypes(out, 1 + hasFinal, bad.data(), 8), 0);
        bad = in;
        bad[1] = DataType::kFLOAT; // delta's type differs from u's
        EXPECT_NE(b->getOutputDataTypes(out, 1 + hasFinal, bad.data(), 8), 0);
        EXPECT_NE(b->getOutputDataTypes(out, 2 - hasFinal, in.data(), 8), 0);
        EXPECT_NE(b->getOutputDataTypes(out, 1 + hasFinal, in.data(), 10), 0);
    }
}

TEST_F(PluginTest, FormatCombinationsAccepted)
{
    for (int32_t hasFinal : {0, 1})
    {
        for (bool withInitial : {false, true})
        {
            auto p = make(0, 0.5f, hasFinal);
            auto* b = build(p.get());
            for (DataType act : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
            {
                auto d = cmtest::dynDescs(Shape{}, act, withInitial, hasFinal, true);
                int32_t const nbIn = withInitial ? 9 : 8;
                for (int32_t pos = 0; pos < static_cast<int32_t>(d.size()); ++pos)
                {
                    EXPECT_TRUE(b->supportsFormatCombination(pos, d.data(), nbIn, 1 + hasFinal))
                        << "pos " << pos << " act " << static_cast<int>(act);
                }
            }
        }
    }
}

TEST_F(PluginTest, FormatCombinationsRefused)
{
    auto p = make(0, 0.5f, 1);
    auto* b = build(p.get());
    auto base = cmtest::dynDescs(Shape{}, DataType::kHALF, true, true, true);
    auto refuse = [&](int32_t pos, DataType t, TensorFormat f = TensorFormat::kLINEAR) {
        auto d = base;
        d[pos].desc.type = t;
        d[pos].desc.format = f;
        return !b->supportsFormatCombination(pos, d.data(), 9, 2);
    };
    EXPECT_TRUE(refuse(0, DataType::kINT32));
    EXPECT_TRUE(refuse(0, DataType::kINT8));
    EXPECT_TRUE(refuse(0, DataType::kFP8));
    EXPECT_TRUE(refuse(0, DataType::kHALF, TensorFormat::kHWC8));
    EXPECT_TRUE(refuse(0, DataType::kFLOAT, TensorFormat::kCHW32));
    EXPECT_TRUE(refuse(1, DataType::kFLOAT));  // delta must follow u
    EXPECT_TRUE(refuse(3, DataType::kBF16));   // B must follow u
    EXPECT_TRUE(refuse(2, DataType::kHALF));   // A is float32
    EXPECT_TRUE(refuse(5, DataType::kHALF));   // D is float32
    EXPECT_TRUE(refuse(7, DataType::kBF16));   // delta_bias is float32
    EXPECT_TRUE(refuse(8, DataType::kHALF));   // initial_state is float32
    EXPECT_TRUE(refuse(9, DataType::kFLOAT));  // y must follow u
    EXPECT_TRUE(refuse(10, DataType::kHALF));  // final_state is float32
    EXPECT_TRUE(refuse(6, DataType::kHALF, TensorFormat::kCHW2));
    EXPECT_FALSE(b->supportsFormatCombination(11, base.data(), 9, 2)); // out of range
    EXPECT_FALSE(b->supportsFormatCombination(-1, base.data(), 9, 2));
    EXPECT_FALSE(b->supportsFormatCombination(0, base.data(), 7, 2));  // wrong input count
    EXPECT_FALSE(b->supportsFormatCombination(0, base.data(), 9, 1));  // has_final_state = 1 means 2 outputs
    EXPECT_FALSE(b->supportsFormatCombination(0, nullptr, 9, 2));
}

// ---------------------------------------------------------------------------------------------------
// configurePlugin / onShapeChange / enqueue validation (no launches)

TEST_F(PluginTest, ConfigurePlugin)
{
    auto p = make(1, 0.5f, 1);
    auto* b = build(p.get());
    Shape s{2, 3, 11, 10, 16};
    for (DataType act : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        for (bool dyn : {false, true})
        {
            auto d = cmtest::dynDescs(s, act, true, true, dyn);
            EXPECT_EQ(b->configurePlugin(d.data(), 9, d.data() + 9, 2), 0) << finder.logger.all();
            auto d8 = cmtest::dynDescs(s, act, false, true, dyn);
            EXPECT_EQ(b->configurePlugin(d8.data(), 8, d8.data() + 8, 2), 0) << finder.logger.all();
        }
    }
    auto bad = cmtest::dynDescs(s, DataType::kHALF, true, true, true);
    bad[3].desc.dims.d[3] = 15; // B's N differs from A's
    EXPECT_NE(b->configurePlugin(bad.data(), 9, bad.data() + 9, 2), 0);
    bad = cmtest::dynDescs(s, DataType::kHALF, true, true, true);
    bad[10].desc.dims.d[1] = 9; // final_state's E differs
    EXPECT_NE(b->configurePlugin(bad.data(), 9, bad.data() + 9, 2), 0);
    bad = cmtest::dynDescs(s, DataType::kHALF, true, true, true);
    bad[6].desc.type = DataType::kFLOAT; // z's type differs from u's
    EXPECT_NE(b->configurePlugin(bad.data(), 9, bad.data() + 9, 2), 0);
    Shape n = s;
    n.N = cm_deploy::scan::kMaxStates + 1;
    auto tooBig = cmtest::dynDescs(n, DataType::kHALF, false, true, true);
    EXPECT_NE(b->configurePlugin(tooBig.data(), 8, tooBig.data() + 8, 2), 0);
    EXPECT_NE(finder.logger.all().find("N (A axis 2) must be in"), std::string::npos);
    EXPECT_NE(b->configurePlugin(nullptr, 9, nullptr, 2), 0);
}

TEST_F(PluginTest, OnShapeChangeAndEnqueueValidation)
{
    auto p = make(0, 0.5f, 0);
    auto* r = runtime(p.get());
    Shape s{2, 3, 4, 5, 6};
    auto d = cmtest::descs(s, DataType::kBF16, false, false);
    std::vector<void const*> in(8, nullptr);
    std::vector<void*> out(1, nullptr);
    // enqueue before any configuration is refused
    EXPECT_NE(r->enqueue(d.data(), d.data() + 8, in.data(), out.data(), nullptr, nullptr), 0);
    EXPECT_EQ(r->onShapeChange(d.data(), 8, d.data() + 8, 1), 0) << finder.logger.all();
    // null buffers with a non-empty batch: refused before anything reaches CUDA
    EXPECT_NE(r->enqueue(d.data(), d.data() + 8, in.data(), out.data(), nullptr, nullptr), 0);
    EXPECT_NE(finder.logger.all().find("required buffer is null"), std::string::npos) << finder.logger.all();
    // descriptors that disagree with each other
    auto bad = d;
    bad[4].dims.d[2] = 5; // C's L differs
    EXPECT_NE(r->enqueue(bad.data(), bad.data() + 8, in.data(), out.data(), nullptr, nullptr), 0);
    // unresolved dimensions at runtime
    auto unresolved = d;
    for (auto& t : unresolved)
    {
        if (t.dims.nbDims == 4)
        {
            t.dims.d[2] = -1;
        }
    }
    EXPECT_NE(r->onShapeChange(unresolved.data(), 8, unresolved.data() + 8, 1), 0);
    // an empty batch is a no-op
    Shape empty = s;
    empty.batch = 0;
    auto e = cmtest::descs(empty, DataType::kBF16, false, false);
    EXPECT_EQ(r->onShapeChange(e.data(), 8, e.data() + 8, 1), 0);
    EXPECT_EQ(r->enqueue(e.data(), e.data() + 8, in.data(), out.data(), nullptr, nullptr), 0);
}

// ---------------------------------------------------------------------------------------------------
// Launch geometry

namespace
{
void expectValid(cm_deploy::scan::ScanGeometry const& g, int64_t batch, int32_t M, int64_t L, int32_t E, int32_t N,
    cm_deploy::scan::DeviceLimits const& dev)
{
    using namespace cm_deploy::scan;
    EXPECT_TRUE(g.npt == 1 || g.npt == 2 || g.npt == 4 || g.npt == 8);
    EXPECT_GE(g.mt, M);
    EXPECT_EQ(g.nc % 32, 0);
    EXPECT_EQ(g.np % 32, 0);
    EXPECT_LE(g.nc + g.np, kMaxBlockThreads);
    EXPECT_LE(g.ch * g.lpc, g.nc);
    EXPECT_GE(g.npad, N);
    EXPECT_EQ(g.npad, g.lpc * g.npt);
    EXPECT_GE(g.etiles * g.ch, E);
    EXPECT_EQ(g.blocks, batch * g.etiles);
    EXPECT_GE(g.tc, 1);
    EXPECT_LE(g.tc, std::max<int64_t>(L, 1));
    EXPECT_LE(g.smemBytes, dev.smemOptinPerBlock);
    EXPECT_GE(g.S, g.lpc);
    EXPECT_EQ(g.smemBytes, 2 * smemLayout(g, M).stageFloats * sizeof(float));
    EXPECT_GE(g.segs, 1);
    EXPECT_LE(g.segs * std::max<int64_t>(batch, 1), std::max<int64_t>(kMaxSegmentRows, std::max<int64_t>(batch, 1)));
    EXPECT_GE(g.segLen * g.segs, L);
    if (g.segs > 1)
    {
        EXPECT_LT((g.segs - 1) * g.segLen, L); // every segment non-empty
        EXPECT_LE(g.tc, g.segLen);
    }
}
} // namespace

TEST(Geometry, TargetShapes)
{
    using namespace cm_deploy::scan;
    DeviceLimits h100; // 132 SMs, 227 KB opt-in
    ScanGeometry g;
    std::string why;
    ASSERT_TRUE(chooseGeometry(64, 3, 500, 256, 64, h100, {}, g, &why)) << why;
    expectValid(g, 64, 3, 500, 256, 64, h100);
    EXPECT_EQ(g.npt, 8); // plenty of (batch, channel) pairs: most states per thread
    EXPECT_EQ(g.segs, 1); // and no need to split L
    ASSERT_TRUE(chooseGeometry(1, 3, 16384, 256, 64, h100, {}, g, &why)) << why;
    expectValid(g, 1, 3, 16384, 256, 64, h100);
    // batch 1: L split into segments until the GPU is filled, keeping many states per thread
    EXPECT_GT(g.segs, 1);
    EXPECT_GE(g.blocks * g.segs * (g.nc / 32), 132 * 8);
    EXPECT_LE(g.segs, kMaxSegmentRows);
    EXPECT_GE(g.tc * 3 * g.ch, g.np); // every producer has a row
    {
        ScanOverrides noSplit;
        noSplit.segs = 1; // no workspace: one segment, as many threads as states
        ASSERT_TRUE(chooseGeometry(1, 3, 16384, 256, 64, h100, noSplit, g, &why)) << why;
        expectValid(g, 1, 3, 16384, 256, 64, h100);
        EXPECT_EQ(g.segs, 1);
        EXPECT_EQ(g.npt, 1);
    }
    ASSERT_TRUE(chooseGeometry(1, 1, 1, 1, 1, h100, {}, g, &why)) << why;
    expectValid(g, 1, 1, 1, 1, 1, h100);
    ASSERT_TRUE(chooseGeometry(3, 2, 0, 7, 5, h100, {}, g, &why)) << why; // L = 0 still writes final_state
    EXPECT_EQ(g.tc, 1);
    EXPECT_FALSE(chooseGeometry(1, 9, 10, 8, 8, h100, {}, g, &why));
    EXPECT_NE(why.find("modalities"), std::string::npos);
    EXPECT_FALSE(chooseGeometry(1, 3, 10, 8, kMaxStates + 1, h100, {}, g, &why));
    EXPECT_FALSE(chooseGeometry(1, 3, 10, 0, 8, h100, {}, g, &why));
}

TEST(Geometry, Overrides)
{
    using namespace cm_deploy::scan;
    DeviceLimits h100;
    ScanGeometry g;
    std::string why;
    for (int32_t npt : {1, 2, 4, 8})
    {
        ScanOverrides ov;
        ov.npt = npt;
        ov.tc = 5;
        ASSERT_TRUE(chooseGeometry(8, 3, 100, 96, 48, h100, ov, g, &why)) << why;
        EXPECT_EQ(g.npt, npt);
        EXPECT_EQ(g.tc, 5);
        expectValid(g, 8, 3, 100, 96, 48, h100);
    }
}

TEST(Geometry, RandomShapesOnSeveralDevices)
{
    using namespace cm_deploy::scan;
    std::mt19937 rng(7);
    DeviceLimits devs[3];
    devs[1].smCount = 108; // A100
    devs[1].smemOptinPerBlock = 163 * 1024;
    devs[1].smemPerSM = 164 * 1024;
    devs[2].smCount = 16; // Orin / small parts
    devs[2].smemOptinPerBlock = 99 * 1024;
    devs[2].smemPerSM = 100 * 1024;
    for (int it = 0; it < 3000; ++it)
    {
        DeviceLimits const& dev = devs[it % 3];
        int64_t const batch = std::uniform_int_distribution<int64_t>(0, 70)(rng);
        int32_t const M = std::uniform_int_distribution<int32_t>(1, kMaxModalities)(rng);
        int64_t const L = std::uniform_int_distribution<int64_t>(0, 3000)(rng);
        int32_t const E = std::uniform_int_distribution<int32_t>(1, 3000)(rng);
        int32_t const N = std::uniform_int_distribution<int32_t>(1, kMaxStates)(rng);
        ScanGeometry g;
        std::string why;
        ASSERT_TRUE(chooseGeometry(batch, M, L, E, N, dev, {}, g, &why))
            << why << " batch " << batch << " M " << M << " L " << L << " E " << E << " N " << N;
        expectValid(g, batch, M, L, E, N, dev);
    }
}

// ---------------------------------------------------------------------------------------------------
// Triton kernels: which run where, the launch choice and its workspace (the planner itself is compared
// with Python's _plan by tests/test_triton_aot.py)

TEST(TritonAot, ArchCompatibility)
{
    using cm_deploy::scan::tritonArchRuns;
    EXPECT_TRUE(tritonArchRuns(80, 8, 0));
    EXPECT_TRUE(tritonArchRuns(80, 8, 6));
    EXPECT_TRUE(tritonArchRuns(80, 8, 9));
    EXPECT_FALSE(tritonArchRuns(80, 9, 0)); // cubins run within their major version only
    EXPECT_FALSE(tritonArchRuns(86, 8, 0));
    EXPECT_TRUE(tritonArchRuns(90, 9, 0)); // sm_90a: exactly that device
    EXPECT_FALSE(tritonArchRuns(90, 10, 0));
    EXPECT_FALSE(tritonArchRuns(90, 8, 9));
}

TEST(TritonAot, ChoiceRefusesWhatTheKernelsDoNotTake)
{
    namespace scan = cm_deploy::scan;
    scan::TritonLaunch l;
    std::string why;
    auto bf16 = scan::ActType::kBFLOAT16;
    EXPECT_FALSE(scan::chooseTritonLaunch(bf16, 4, 3, 100, 250, 64, true, 0.5f, false, 9, 0, 132, l, &why));
    EXPECT_NE(why.find(scan::kTritonAotSpecCount > 0 ? "E % 16 == 0" : "no Triton kernels"), std::string::npos) << why;
    EXPECT_FALSE(scan::chooseTritonLaunch(bf16, 4, 3, 100, 256, 64, true, 0.f, false, 9, 0, 132, l, &why));
    EXPECT_FALSE(scan::chooseTritonLaunch(bf16, 70000, 3, 100, 256, 64, true, 0.5f, false, 9, 0, 132, l, &why));
    EXPECT_FALSE(scan::chooseTritonLaunch(bf16, 4, 3, 0, 256, 64, true, 0.5f, false, 9, 0, 132, l, &why));
    EXPECT_FALSE(scan::chooseTritonLaunch(bf16, 4, 3, 100, 256, 48, true, 0.5f, false, 9, 0, 132, l, &why));
    EXPECT_FALSE(scan::chooseTritonLaunch(bf16, 4, 3, 100, 256, 64, true, 0.5f, false, 7, 5, 40, l, &why)); // sm_75
}

TEST(TritonAot, WorkspaceLayoutAndBound)
{
    namespace scan = cm_deploy::scan;
    scan::TritonLaunch probe;
    for (auto type : {scan::ActType::kFLOAT32, scan::ActType::kBFLOAT16})
    {
        if (!scan::chooseTritonLaunch(type, 1, 3, 1, 256, 64, true, 1.f / 3, false, 9, 0, 132, probe, nullptr))
        {
            GTEST_SKIP() << "no Triton kernel for M=3, N=64 on sm_90 in this build (" << scan::kTritonAotBuildInfo << ")";
        }
        int64_t const bMax = 70, lMax = 20000;
        size_t const bound = scan::tritonWorkspaceBound(type, bMax, 3, lMax, 256, 64, true, 1.f / 3);
        ASSERT_GT(bound, 0u);
        // a profile past what the kernels take (batch > 65535, M * L * E > 2^31): the calls they do take
        {
            scan::TritonLaunch big;
            ASSERT_TRUE(scan::chooseTritonLaunch(type, 65535, 3, 2000000, 256, 64, true, 1.f / 3, true, 9, 0, 132, big, nullptr));
            EXPECT_LE(big.bytes, scan::tritonWorkspaceBound(type, 100000, 3, int64_t{1} << 40, 256, 64, true, 1.f / 3));
        }
        EXPECT_EQ(scan::tritonWorkspaceBound(type, bMax, 3, lMax, 250, 64, true, 1.f / 3), 0u); // E % 16 != 0
        for (int64_t b : {1, 2, 3, 5, 8, 13, 64, 70})
        {
            for (int64_t L : {1, 7, 33, 63, 64, 65, 127, 500, 4096, 16384, 20000})
            {
                for (int32_t sms : {1, 78, 108, 132, 144, 400})
                {
                    for (bool init : {false, true})
                    {
                        scan::TritonLaunch l;
                        std::string why;
                        ASSERT_TRUE(scan::chooseTritonLaunch(type, b, 3, L, 256, 64, true, 1.f / 3, init, 9, 0, sms, l, &why))
                            << why;
                        // the bound TensorRT reserves holds every call of the profile on any device
                        EXPECT_LE(l.bytes, bound) << "batch " << b << " L " << L << " sms " << sms;
                        EXPECT_LE(l.bytes, scan::tritonWorkspaceBound(type, b, 3, L, 256, 64, true, 1.f / 3))
                            << "batch " << b << " L " << L << " sms " << sms;
                        EXPECT_GE(l.T, l.plan.chunkT);
                        EXPECT_EQ(l.plan.nSeg > 1, l.summary >= 0 && l.combine >= 0);
                        // regions: 256-byte aligned, inside the workspace, pairwise disjoint
                        size_t const f = sizeof(float);
                        size_t const states = static_cast<size_t>(b) * 256 * 64 * f;
                        std::vector<std::pair<size_t, size_t>> regions = {
                            {l.scratch, static_cast<size_t>(l.eBlocks) * b * l.plan.nSeg * (2 + l.yParts) * 3 * l.T
                                    * l.plan.blockE * f},
                            {l.final, states}};
                        if (l.plan.nSeg == 1)
                        {
                            regions.push_back({l.c0, states});
                        }
                        else
                        {
                            for (size_t off : {l.P, l.S, l.c0})
                            {
                                regions.push_back({off, states * l.plan.nSeg});
                            }
                            if (init)
                            {
                                regions.push_back({l.initT, states});
                            }
                        }
                        for (size_t i = 0; i < regions.size(); ++i)
                        {
                            EXPECT_EQ(regions[i].first % 256, 0u);
                            EXPECT_LE(regions[i].first + regions[i].second, l.bytes);
                            for (size_t j = 0; j < i; ++j)
                            {
                                bool const apart = regions[i].first + regions[i].second <= regions[j].first
                                    || regions[j].first + regions[j].second <= regions[i].first;
                                EXPECT_TRUE(apart) << "regions " << i << " and " << j;
                            }
                        }
                    }
                }
            }
        }
    }
}

TEST(Logging, WithoutFinderErrorsGoToStderr)
{
    setLoggerFinderImpl(nullptr);
    ::testing::internal::CaptureStderr();
    FieldSet f;
    f.f32("coupling_scale", -1.f);
    PluginPtr p(coupledScanCreator().createPlugin("lonely", f.fc(), TensorRTPhase::kBUILD));
    std::string const err = ::testing::internal::GetCapturedStderr();
    EXPECT_EQ(p, nullptr);
    EXPECT_NE(err.find("[ERROR] CoupledScan plugin: createPlugin('lonely', build) refused"), std::string::npos) << err;
}
