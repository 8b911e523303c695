// cmh_emulate: the kernel's code run on the CPU (emulateCoupledScan) on host buffers, so that
// tests/gpu/plugin_harness.py --self-test can hold the kernel's math against cm_deploy's PyTorch reference on a
// machine without a GPU.
#include "scan_kernel.cuh"

#include <string>

using namespace cm_deploy::scan;

namespace
{
template <typename T, int MT>
void emulateNpt(ScanArgs const& a, ScanGeometry const& g)
{
    switch (g.npt)
    {
    case 1: emulateCoupledScan<T, 1, MT>(a, g); break;
    case 2: emulateCoupledScan<T, 2, MT>(a, g); break;
    case 4: emulateCoupledScan<T, 4, MT>(a, g); break;
    default: emulateCoupledScan<T, 8, MT>(a, g); break;
    }
}

template <typename T>
void emulate(ScanArgs const& a, ScanGeometry const& g)
{
    if (g.mt == 4)
    {
        emulateNpt<T, 4>(a, g);
    }
    else
    {
        emulateNpt<T, 8>(a, g);
    }
}
} // namespace

// inputs: u, delta, A, B, C, D, z, delta_bias[, initial_state]; outputs: y[, final_state].
extern "C" __attribute__((visibility("default"))) int cmh_emulate(int dtype, int deltaSoftplus, float kappa,
    int64_t const* shape, void const* const* inputs, int nbInputs, void* const* outputs, int nbOutputs, int npt, int tc)
{
    if (shape == nullptr || inputs == nullptr || outputs == nullptr || (nbInputs != 8 && nbInputs != 9)
        || (nbOutputs != 1 && nbOutputs != 2) || dtype < 0 || dtype > 2)
    {
        return -1;
    }
    ScanArgs a;
    a.u = inputs[0];
    a.delta = inputs[1];
    a.A = static_cast<float const*>(inputs[2]);
    a.B = inputs[3];
    a.C = inputs[4];
    a.D = static_cast<float const*>(inputs[5]);
    a.z = inputs[6];
    a.deltaBias = static_cast<float const*>(inputs[7]);
    a.initialState = nbInputs == 9 ? static_cast<float const*>(inputs[8]) : nullptr;
    a.y = outputs[0];
    a.finalState = nbOutputs == 2 ? static_cast<float*>(outputs[1]) : nullptr;
    a.batch = shape[0];
    a.M = static_cast<int32_t>(shape[1]);
    a.L = shape[2];
    a.E = static_cast<int32_t>(shape[3]);
    a.N = static_cast<int32_t>(shape[4]);
    a.deltaSoftplus = deltaSoftplus;
    a.kappa = kappa;
    DeviceLimits dev;
    dev.smCount = 4;
    ScanOverrides ov;
    ov.npt = npt;
    ov.tc = tc;
    ScanGeometry g;
    if (!chooseGeometry(a.batch, a.M, a.L, a.E, a.N, dev, ov, g, nullptr))
    {
        return -2;
    }
    switch (dtype)
    {
    case 0: emulate<float>(a, g); break;
    case 1: emulate<__half>(a, g); break;
    default: emulate<__nv_bfloat16>(a, g); break;
    }
    return 0;
}
