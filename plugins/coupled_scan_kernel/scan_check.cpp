#include "scan_check.h"

#include <sstream>

namespace cm_deploy
{
namespace scan
{

char const* const kScanInputNames[kNbScanInputs]
    = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"};

namespace
{
std::string shapeString(std::vector<int64_t> const& s)
{
    std::ostringstream o;
    o << "(";
    for (size_t i = 0; i < s.size(); ++i)
    {
        o << (i ? ", " : "") << s[i];
    }
    o << (s.size() == 1 ? ",)" : ")");
    return o.str();
}
} // namespace

bool checkScanShapes(std::vector<std::vector<int64_t>> const& shapes, ScanArgs& a, std::string& why)
{
    size_t const n = shapes.size();
    if (n != kNbScanInputs - 1 && n != kNbScanInputs)
    {
        why = "CoupledScan takes 8 or 9 inputs (u, delta, A, B, C, D, z, delta_bias[, initial_state]), got "
            + std::to_string(n);
        return false;
    }
    std::vector<int64_t> const& u = shapes[kInU];
    std::vector<int64_t> const& A = shapes[kInA];
    if (u.size() != 4)
    {
        why = "input u must be (batch, M, L, E), got " + shapeString(u);
        return false;
    }
    if (A.size() != 3)
    {
        why = "input A must be (M, E, N), got " + shapeString(A);
        return false;
    }
    int64_t const batch = u[0], M = u[1], L = u[2], E = u[3], N = A[2];
    struct Want
    {
        int32_t input;
        std::vector<int64_t> dims;
        char const* names;
    };
    std::vector<Want> wants = {
        {kInDelta, {batch, M, L, E}, "(batch, M, L, E)"},
        {kInZ, {batch, M, L, E}, "(batch, M, L, E)"},
        {kInA, {M, E, N}, "(M, E, N)"},
        {kInB, {batch, M, L, N}, "(batch, M, L, N)"},
        {kInC, {batch, M, L, N}, "(batch, M, L, N)"},
        {kInD, {M, E}, "(M, E)"},
        {kInDeltaBias, {M, E}, "(M, E)"},
    };
    if (n == kNbScanInputs)
    {
        wants.push_back({kInInitialState, {batch, E, N}, "(batch, E, N)"});
    }
    for (Want const& w : wants)
    {
        if (shapes[w.input] != w.dims)
        {
            why = std::string("input ") + kScanInputNames[w.input] + " must be " + w.names + " = "
                + shapeString(w.dims) + " after u " + shapeString(u) + " and A " + shapeString(A) + ", got "
                + shapeString(shapes[w.input]);
            return false;
        }
    }
    if (M < 1 || M > kMaxModalities)
    {
        why = "M (u axis 1) must be in [1, " + std::to_string(kMaxModalities) + "], got " + std::to_string(M);
        return false;
    }
    if (N < 1 || N > kMaxStates)
    {
        why = "N (A axis 2) must be in [1, " + std::to_string(kMaxStates) + "], got " + std::to_string(N);
        return false;
    }
    if (E < 1 || E > 0x7fffffffLL || batch < 0 || L < 0)
    {
        why = "need E in [1, 2^31), batch >= 0 and L >= 0, got u " + shapeString(u);
        return false;
    }
    a.batch = batch;
    a.M = static_cast<int32_t>(M);
    a.L = L;
    a.E = static_cast<int32_t>(E);
    a.N = static_cast<int32_t>(N);
    return true;
}

} // namespace scan
} // namespace cm_deploy
