#!/usr/bin/env bash
# The test suite, as CI runs it on a clean checkout (no GPU):
#  1. .venv with the project (scripts/setup.sh) and TensorRT-RTX's wheels, which parse ONNX and build
#     TensorRT engines without a GPU (full TensorRT is not installable here);
#  2. the TensorRT plugin built from TensorRT's public headers, and its C++ tests (CTest);
#  3. the Python tests: Triton kernels under TRITON_INTERPRET=1, export, runtime, CLI, and the
#     ONNX -> plugin -> engine build with TensorRT-RTX.
# A part whose tool is missing (nvcc, TensorRT-RTX) is skipped with the reason, never passed silently.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install -q "tensorrt-rtx-cu13-libs==1.7.1.116" "tensorrt-rtx-cu13-bindings==1.7.1.116" \
  || echo "NOTE: TensorRT-RTX wheels not installable: the engine-build tests will skip" >&2
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  if [[ ! -f /usr/include/gtest/gtest.h ]]; then   # GoogleTest for the plugin's C++ tests
    if [[ $(id -u) == 0 ]]; then apt-get install -y -q libgtest-dev >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q libgtest-dev >/dev/null; }
    else sudo -n apt-get install -y -q libgtest-dev >/dev/null; fi
  fi
  bash scripts/build_plugin.sh build/ci          # one architecture (80) unless CUDA_ARCHITECTURES says otherwise
  export CM_DEPLOY_PLUGIN=$PWD/build/ci/plugins/trt_coupled_scan/libcoupled_scan_plugin.so
else
  echo "SKIPPED: TensorRT plugin build and C++ tests: nvcc (the CUDA toolkit) is not installed" >&2
fi
python -m pytest -q -ra tests
