// The C++ planner of the Triton forward on stdin/stdout, for tests/test_triton_aot.py, which compares it
// with Python's _plan. Input lines "batch M L E N elem_size sm_count"; output lines
// "block_e block_n num_warps n_seg seg_len chunk_t y_parts fast_exp pf_bc". `--info` prints the build's
// Triton kernels instead (count and description).
#include "triton_aot.h"

#include <cstring>
#include <iostream>

int main(int argc, char** argv)
{
    using namespace cm_deploy::scan;
    if (argc > 1 && std::strcmp(argv[1], "--info") == 0)
    {
        std::cout << kTritonAotSpecCount << " " << kTritonAotBuildInfo << "\n";
        return 0;
    }
    long long batch, L;
    int M, E, N, elem, sms;
    while (std::cin >> batch >> M >> L >> E >> N >> elem >> sms)
    {
        TritonPlan const p = planTritonForward(batch, M, L, E, N, elem, sms);
        std::cout << p.blockE << " " << p.blockN << " " << p.numWarps << " " << p.nSeg << " " << p.segLen << " "
                  << p.chunkT << " " << p.yParts << " " << int(p.fastExp) << " " << int(p.pfBc) << "\n";
    }
    return 0;
}
