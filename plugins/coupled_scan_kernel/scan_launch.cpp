// Host side of the kernel launch: device limits, shared-memory opt-in, tuning overrides, and the choice
// between the CUDA kernel and the ahead-of-time compiled Triton forward.
#include "scan_launch.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

namespace cm_deploy
{
namespace scan
{

cudaError_t launchCoupledScan(ActType type, ScanArgs const& a, ScanGeometry const& g, cudaStream_t stream)
{
    switch (type)
    {
    case ActType::kFLOAT32: return launchCoupledScanF32(a, g, stream);
    case ActType::kFLOAT16: return launchCoupledScanF16(a, g, stream);
    case ActType::kBFLOAT16: return launchCoupledScanBF16(a, g, stream);
    }
    return cudaErrorInvalidValue;
}

namespace
{
std::mutex gMutex;
std::map<int, DeviceLimits> gLimits;                    // by device ordinal
std::map<std::pair<void const*, int>, size_t> gSmemSet; // (kernel, device) -> bytes allowed so far
} // namespace

bool currentDeviceLimits(DeviceLimits& out, std::string* why)
{
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess)
    {
        if (why != nullptr)
        {
            *why = std::string("cudaGetDevice failed: ") + cudaGetErrorString(err);
        }
        return false;
    }
    std::lock_guard<std::mutex> lock(gMutex);
    auto it = gLimits.find(dev);
    if (it != gLimits.end())
    {
        out = it->second;
        return true;
    }
    int sms = 0, optin = 0, perSM = 0, ccMajor = 0, ccMinor = 0;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess
        || (err = cudaDeviceGetAttribute(&ccMajor, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess
        || (err = cudaDeviceGetAttribute(&ccMinor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess
        || (err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess
        || (err = cudaDeviceGetAttribute(&perSM, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev)) != cudaSuccess)
    {
        if (why != nullptr)
        {
            *why = std::string("cudaDeviceGetAttribute failed: ") + cudaGetErrorString(err);
        }
        return false;
    }
    DeviceLimits d;
    d.smCount = sms;
    d.smemOptinPerBlock = static_cast<size_t>(optin);
    d.smemPerSM = static_cast<size_t>(perSM);
    d.ccMajor = ccMajor;
    d.ccMinor = ccMinor;
    gLimits[dev] = d;
    out = d;
    return true;
}

cudaError_t ensureDynamicSmem(void const* func, size_t bytes)
{
    if (bytes <= 48 * 1024)
    {
        return cudaSuccess; // below the default limit no opt-in is needed
    }
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess)
    {
        return err;
    }
    std::lock_guard<std::mutex> lock(gMutex);
    size_t& allowed = gSmemSet[{func, dev}];
    if (allowed >= bytes)
    {
        return cudaSuccess;
    }
    err = cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err == cudaSuccess)
    {
        allowed = bytes;
    }
    return err;
}

namespace
{
int32_t envInt(char const* name)
{
    char const* v = std::getenv(name);
    if (v == nullptr || *v == '\0')
    {
        return 0;
    }
    char* end = nullptr;
    long const x = std::strtol(v, &end, 10);
    return (end != nullptr && *end == '\0' && x > 0 && x < 1000000) ? static_cast<int32_t>(x) : 0;
}
} // namespace

ScanOverrides const& envOverrides()
{
    static ScanOverrides const ov = [] {
        ScanOverrides o;
        o.npt = envInt("CM_DEPLOY_SCAN_NPT");
        o.tc = envInt("CM_DEPLOY_SCAN_TC");
        o.targetWarpsPerSM = envInt("CM_DEPLOY_SCAN_TARGET_WARPS");
        o.segs = envInt("CM_DEPLOY_SCAN_SEGS");
        return o;
    }();
    return ov;
}

bool planCoupledScan(
    ActType type, ScanArgs const& a, ScanImpl want, WorkspaceFor workspace, ScanPlan& out, std::string& why)
{
    ScanImpl env = ScanImpl::kAuto;
    if (!envScanImpl(env, &why))
    {
        return false;
    }
    if (env != ScanImpl::kAuto)
    {
        want = env;
    }
    else if (want == ScanImpl::kAuto && !tritonOptIn())
    {
        want = ScanImpl::kCuda;
    }
    DeviceLimits dev;
    if (!currentDeviceLimits(dev, &why))
    {
        return false;
    }
    ScanPlan p;
    // batch 0 or L 0: nothing to scan (the Python path runs no kernel either); the CUDA launcher
    // writes final_state = initial_state
    if (want != ScanImpl::kCuda && a.batch > 0 && a.L > 0)
    {
        std::string no;
        bool ok = chooseTritonLaunch(type, a.batch, a.M, a.L, a.E, a.N, a.deltaSoftplus != 0, a.kappa,
            a.initialState != nullptr, dev.ccMajor, dev.ccMinor, dev.smCount, p.triton, &no);
        if (ok && !tritonPointersAligned(a))
        {
            ok = false;
            no = "the Triton kernels need 16-byte aligned tensors";
        }
        if (ok && workspace != WorkspaceFor::kAny)
        {
            ok = false;
            no = workspace == WorkspaceFor::kNone
                ? "the Triton kernels need a workspace"
                : "the engine's workspace was sized for the CUDA kernel (its tactic is 1)";
        }
        if (ok)
        {
            p.impl = ScanImpl::kTriton;
            p.workspaceBytes = p.triton.bytes;
            out = p;
            return true;
        }
        if (want == ScanImpl::kTriton)
        {
            why = std::string(env == ScanImpl::kTriton ? "CM_DEPLOY_SCAN_IMPL=triton" : "the Triton tactic") + ": " + no;
            return false;
        }
    }
    ScanOverrides ov = envOverrides();
    if (workspace == WorkspaceFor::kNone)
    {
        ov.segs = 1;
    }
    if (!chooseGeometry(a.batch, a.M, a.L, a.E, a.N, dev, ov, p.geometry, &why))
    {
        return false;
    }
    p.impl = ScanImpl::kCuda;
    p.workspaceBytes = p.geometry.segs > 1 ? segmentWorkspaceBytes(a.E, a.N) : 0;
    out = p;
    return true;
}

bool runCoupledScan(ActType type, ScanArgs a, ScanPlan const& plan, void* workspace, cudaStream_t stream, std::string& why)
{
    if (a.batch == 0)
    {
        return true; // empty outputs
    }
    if (plan.workspaceBytes > 0 && workspace == nullptr)
    {
        why = "the launch needs a workspace";
        return false;
    }
    if (plan.impl == ScanImpl::kTriton)
    {
        return launchTriton(a, plan.triton, workspace, stream, why);
    }
    a.work = plan.geometry.segs > 1 ? static_cast<float*>(workspace) : nullptr;
    cudaError_t const err = launchCoupledScan(type, a, plan.geometry, stream);
    if (err != cudaSuccess)
    {
        why = std::string("kernel launch failed: ") + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
        return false;
    }
    return true;
}

} // namespace scan
} // namespace cm_deploy
