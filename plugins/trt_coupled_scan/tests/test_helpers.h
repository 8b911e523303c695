// Test doubles for the parts of TensorRT a plugin talks to: IExprBuilder / IDimensionExpr (through
// their apiv:: implementation interfaces, which is how TensorRT 10 implements them), a logger, and
// tensor descriptors for the CoupledScan contract.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace cmtest
{

// ---------------------------------------------------------------------------------------------------
// A tiny constant-folding expression system.

class FakeDimImpl final : public nvinfer1::apiv::VDimensionExpr
{
public:
    FakeDimImpl(bool constant, int64_t value, std::string text)
        : mConstant(constant)
        , mValue(value)
        , mText(std::move(text))
    {
    }
    bool isConstant() const override
    {
        return mConstant;
    }
    int64_t getConstantValue() const override
    {
        return mConstant ? mValue : std::numeric_limits<int64_t>::min();
    }
    bool isSizeTensor() const override
    {
        return false;
    }
    std::string const& text() const
    {
        return mText;
    }

private:
    bool mConstant;
    int64_t mValue;
    std::string mText;
};

class FakeDimExpr final : public nvinfer1::IDimensionExpr
{
public:
    explicit FakeDimExpr(std::unique_ptr<FakeDimImpl> impl)
        : mOwned(std::move(impl))
    {
        mImpl = mOwned.get();
    }
    ~FakeDimExpr() noexcept override = default;
    FakeDimImpl const& impl() const
    {
        return *mOwned;
    }

private:
    std::unique_ptr<FakeDimImpl> mOwned;
};

// Text of an expression: the number for constants, the symbol or "(a op b)" otherwise.
inline std::string exprText(nvinfer1::IDimensionExpr const* e)
{
    if (e == nullptr)
    {
        return "<null>";
    }
    return static_cast<FakeDimExpr const*>(e)->impl().text();
}

class FakeExprBuilderImpl final : public nvinfer1::apiv::VExprBuilder
{
public:
    nvinfer1::IDimensionExpr const* constant(int64_t value) override
    {
        return make(true, value, std::to_string(value));
    }

    nvinfer1::IDimensionExpr const* operation(nvinfer1::DimensionOperation op, nvinfer1::IDimensionExpr const& first,
        nvinfer1::IDimensionExpr const& second) override
    {
        using Op = nvinfer1::DimensionOperation;
        if (first.isConstant() && second.isConstant())
        {
            int64_t const a = first.getConstantValue();
            int64_t const b = second.getConstantValue();
            int64_t v = 0;
            switch (op)
            {
            case Op::kSUM: v = a + b; break;
            case Op::kPROD: v = a * b; break;
            case Op::kMAX: v = a > b ? a : b; break;
            case Op::kMIN: v = a < b ? a : b; break;
            case Op::kSUB: v = a - b; break;
            case Op::kEQUAL: v = a == b; break;
            case Op::kLESS: v = a < b; break;
            case Op::kFLOOR_DIV:
                if (b == 0)
                {
                    return nullptr;
                }
                v = a / b - ((a % b != 0) && ((a < 0) != (b < 0)));
                break;
            case Op::kCEIL_DIV:
                if (b == 0)
                {
                    return nullptr;
                }
                v = -((-a) / b - (((-a) % b != 0) && (((-a) < 0) != (b < 0))));
                break;
            default: return nullptr;
            }
            return constant(v);
        }
        static char const* const kOps[] = {"+", "*", "max", "min", "-", "==", "<", "//", "ceil/"};
        int32_t const i = static_cast<int32_t>(op);
        if (i < 0 || i > 8)
        {
            return nullptr;
        }
        return make(false, 0, "(" + exprText(&first) + " " + kOps[i] + " " + exprText(&second) + ")");
    }

    nvinfer1::IDimensionExpr const* declareSizeTensor(
        int32_t, nvinfer1::IDimensionExpr const&, nvinfer1::IDimensionExpr const&) override
    {
        return nullptr; // CoupledScan has no size tensors
    }

    nvinfer1::IDimensionExpr const* symbol(std::string const& name)
    {
        return make(false, 0, name);
    }

private:
    nvinfer1::IDimensionExpr const* make(bool c, int64_t v, std::string text)
    {
        mPool.push_back(std::make_unique<FakeDimExpr>(std::make_unique<FakeDimImpl>(c, v, std::move(text))));
        return mPool.back().get();
    }
    std::vector<std::unique_ptr<FakeDimExpr>> mPool;
};

class FakeExprBuilder final : public nvinfer1::IExprBuilder
{
public:
    FakeExprBuilder()
    {
        mImpl = &mBuilder;
    }
    ~FakeExprBuilder() noexcept override = default;

    nvinfer1::IDimensionExpr const* symbol(std::string const& name)
    {
        return mBuilder.symbol(name);
    }

    // A dimension: >= 0 is a constant, < 0 a named symbol.
    nvinfer1::IDimensionExpr const* dim(int64_t v, std::string const& name)
    {
        return v >= 0 ? constant(v) : symbol(name);
    }

    nvinfer1::DimsExprs dims(std::vector<nvinfer1::IDimensionExpr const*> const& d)
    {
        nvinfer1::DimsExprs e{};
        e.nbDims = static_cast<int32_t>(d.size());
        for (size_t i = 0; i < d.size(); ++i)
        {
            e.d[i] = d[i];
        }
        return e;
    }

private:
    FakeExprBuilderImpl mBuilder;
};

// ---------------------------------------------------------------------------------------------------
// Logging

class CaptureLogger final : public nvinfer1::ILogger
{
public:
    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override
    {
        messages.push_back(msg != nullptr ? msg : "");
        severities.push_back(severity);
    }
    std::string all() const
    {
        std::string s;
        for (auto const& m : messages)
        {
            s += m + "\n";
        }
        return s;
    }
    void clear()
    {
        messages.clear();
        severities.clear();
    }
    std::vector<std::string> messages;
    std::vector<Severity> severities;
};

class CaptureLoggerFinder final : public nvinfer1::ILoggerFinder
{
public:
    nvinfer1::ILogger* findLogger() override
    {
        return &logger;
    }
    ~CaptureLoggerFinder() override = default;
    CaptureLogger logger;
};

// ---------------------------------------------------------------------------------------------------
// Tensor descriptors of the contract (DESIGN.md section 3).

struct Shape
{
    int64_t batch{2};
    int64_t M{3};
    int64_t L{7};
    int64_t E{5};
    int64_t N{4};
};

inline nvinfer1::Dims makeDims(std::vector<int64_t> const& v)
{
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(v.size());
    for (size_t i = 0; i < v.size(); ++i)
    {
        d.d[i] = v[i];
    }
    return d;
}

inline std::vector<nvinfer1::Dims> inputDims(Shape const& s, bool withInitial)
{
    std::vector<nvinfer1::Dims> d = {
        makeDims({s.batch, s.M, s.L, s.E}), // u
        makeDims({s.batch, s.M, s.L, s.E}), // delta
        makeDims({s.M, s.E, s.N}),          // A
        makeDims({s.batch, s.M, s.L, s.N}), // B
        makeDims({s.batch, s.M, s.L, s.N}), // C
        makeDims({s.M, s.E}),               // D
        makeDims({s.batch, s.M, s.L, s.E}), // z
        makeDims({s.M, s.E}),               // delta_bias
    };
    if (withInitial)
    {
        d.push_back(makeDims({s.batch, s.E, s.N}));
    }
    return d;
}

inline std::vector<nvinfer1::Dims> outputDims(Shape const& s, bool withFinal)
{
    std::vector<nvinfer1::Dims> d = {makeDims({s.batch, s.M, s.L, s.E})};
    if (withFinal)
    {
        d.push_back(makeDims({s.batch, s.E, s.N}));
    }
    return d;
}

inline bool isActivationIo(size_t pos, size_t nbInputs)
{
    return pos == 0 || pos == 1 || pos == 3 || pos == 4 || pos == 6 || pos == nbInputs;
}

// Descriptors for inputs then outputs.
inline std::vector<nvinfer1::PluginTensorDesc> descs(
    Shape const& s, nvinfer1::DataType act, bool withInitial, bool withFinal)
{
    auto in = inputDims(s, withInitial);
    auto out = outputDims(s, withFinal);
    std::vector<nvinfer1::PluginTensorDesc> d;
    size_t const nbIn = in.size();
    for (size_t i = 0; i < nbIn + out.size(); ++i)
    {
        nvinfer1::PluginTensorDesc t{};
        t.dims = i < nbIn ? in[i] : out[i - nbIn];
        t.type = isActivationIo(i, nbIn) ? act : nvinfer1::DataType::kFLOAT;
        t.format = nvinfer1::TensorFormat::kLINEAR;
        t.scale = -1.f;
        d.push_back(t);
    }
    return d;
}

inline std::vector<nvinfer1::DynamicPluginTensorDesc> dynDescs(
    Shape const& s, nvinfer1::DataType act, bool withInitial, bool withFinal, bool dynamicBatchAndLength)
{
    auto d = descs(s, act, withInitial, withFinal);
    size_t const nbIn = withInitial ? 9 : 8;
    std::vector<nvinfer1::DynamicPluginTensorDesc> r;
    for (size_t i = 0; i < d.size(); ++i)
    {
        nvinfer1::DynamicPluginTensorDesc t{};
        t.desc = d[i];
        t.min = t.max = t.opt = d[i].dims;
        if (dynamicBatchAndLength)
        {
            // batch is axis 0 wherever it appears; L is axis 2 of the 4-D activations.
            bool const hasBatch = !(i == 2 || i == 5 || i == 7) || i >= nbIn;
            if (hasBatch)
            {
                t.desc.dims.d[0] = -1;
            }
            if (t.desc.dims.nbDims == 4)
            {
                t.desc.dims.d[2] = -1;
            }
        }
        r.push_back(t);
    }
    return r;
}

} // namespace cmtest
