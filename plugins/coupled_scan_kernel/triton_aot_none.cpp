// The Triton tables of a build without Triton kernels (CM_DEPLOY_WITH_TRITON_AOT=OFF, or AUTO without an
// importable Triton): every call runs the CUDA kernel. CM_DEPLOY_TRITON_AOT_REASON says why.
#include "triton_aot.h"

#ifndef CM_DEPLOY_TRITON_AOT_REASON
#define CM_DEPLOY_TRITON_AOT_REASON "built without Triton kernels"
#endif

namespace cm_deploy
{
namespace scan
{

extern TritonAotSpec const kTritonAotSpecs[] = {{}};
extern int32_t const kTritonAotSpecCount = 0;
extern int32_t const kTritonAotArchs[] = {0};
extern int32_t const kTritonAotArchCount = 0;
extern char const* const kTritonAotBuildInfo = CM_DEPLOY_TRITON_AOT_REASON;
extern TritonAotBlob const kTritonAotBlobs[] = {{nullptr, nullptr, nullptr}};

} // namespace scan
} // namespace cm_deploy
