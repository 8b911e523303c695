// The GPU harness's C API on the CPU: the whole build -> serialize -> deserialize -> shape path runs
// without a GPU; only enqueue of a non-empty batch needs one (tests/gpu/plugin_harness.py).
#include <gtest/gtest.h>

#include <cstdint>
#include <string>

extern "C"
{
    void* cmh_create(int dtype, int deltaSoftplus, float couplingScale, int hasInitial, int hasFinal,
        int64_t const* shape, int tactic, char* err, int errlen);
    int cmh_tactics(void* handle, int* out, int capacity);
    long long cmh_workspace_size(void* handle);
    int cmh_enqueue(void* handle, int64_t const* shape, void const* const* inputs, void* const* outputs,
        void* workspace, void* stream, char* err, int errlen);
    void cmh_destroy(void* handle);
}

TEST(HarnessShim, CreatesEveryVariant)
{
    int64_t const shape[5] = {2, 3, 16, 24, 16};
    char err[4096] = {0};
    for (int dtype = 0; dtype < 3; ++dtype)
    {
        for (int init = 0; init < 2; ++init)
        {
            for (int fin = 0; fin < 2; ++fin)
            {
                void* h = cmh_create(dtype, init, 1.f / 3, init, fin, shape, 0, err, sizeof err);
                ASSERT_NE(h, nullptr) << err;
                EXPECT_EQ(cmh_workspace_size(h), 32LL * 24 * 16 * 2 * 4); // segment summaries: kMaxSegmentRows * E * N float2
                cmh_destroy(h);
            }
        }
    }
}

TEST(HarnessShim, RefusalsCarryTheReason)
{
    int64_t const shape[5] = {2, 3, 16, 24, 16};
    char err[4096] = {0};
    EXPECT_EQ(cmh_create(0, 0, -1.f, 0, 0, shape, 0, err, sizeof err), nullptr);
    EXPECT_NE(std::string(err).find("coupling_scale"), std::string::npos) << err;
    int64_t const tooMany[5] = {2, 9, 16, 24, 16};
    EXPECT_EQ(cmh_create(0, 0, 0.5f, 0, 0, tooMany, 0, err, sizeof err), nullptr);
    EXPECT_NE(std::string(err).find("M (u axis 1)"), std::string::npos) << err;
}

TEST(HarnessShim, EmptyBatchEnqueueNeedsNoGpu)
{
    int64_t const shape[5] = {2, 3, 16, 24, 16};
    char err[4096] = {0};
    void* h = cmh_create(1, 1, 0.5f, 1, 1, shape, 0, err, sizeof err);
    ASSERT_NE(h, nullptr) << err;
    int64_t const empty[5] = {0, 3, 16, 24, 16};
    void const* in[9] = {};
    void* out[2] = {};
    EXPECT_EQ(cmh_enqueue(h, empty, in, out, nullptr, nullptr, err, sizeof err), 0) << err;
    int64_t const mismatched[5] = {2, 3, 16, 24, 2000};
    EXPECT_NE(cmh_enqueue(h, mismatched, in, out, nullptr, nullptr, err, sizeof err), 0);
    cmh_destroy(h);
}

TEST(HarnessShim, TacticsAsTheBuilderPicks)
{
    // E = 24: no Triton kernel takes it (E % 16 != 0), so the CUDA kernel is the one tactic
    int64_t const shape[5] = {2, 3, 16, 24, 16};
    char err[4096] = {0};
    void* h = cmh_create(0, 1, 0.5f, 0, 0, shape, 1, err, sizeof err);
    ASSERT_NE(h, nullptr) << err;
    int tactics[4] = {0, 0, 0, 0};
    EXPECT_EQ(cmh_tactics(h, tactics, 4), 1);
    EXPECT_EQ(tactics[0], 1);
    cmh_destroy(h);
    EXPECT_EQ(cmh_create(0, 1, 0.5f, 0, 0, shape, 2, err, sizeof err), nullptr);
    EXPECT_NE(std::string(err).find("tactic 2 is not offered for this shape (valid: 1)"), std::string::npos) << err;
}
