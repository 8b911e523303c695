# CI has no GPU: the Triton kernels run on the CPU through Triton's interpreter. Triton decides at
# @triton.jit decoration time (when cm_deploy.ops.triton_scan is first imported) whether a kernel
# is compiled or interpreted, so TRITON_INTERPRET must be set before any test imports triton;
# conftest.py is loaded before the test modules. On a GPU machine, run the same tests against the
# compiled kernels with TRITON_INTERPRET=0 set in the environment (they then use CUDA tensors).
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
