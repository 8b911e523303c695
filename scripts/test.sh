#!/usr/bin/env bash
# The test suite, as CI runs it on a clean checkout (no GPU):
#  1. .venv with the project (scripts/setup.sh) and TensorRT-RTX's wheels, which parse ONNX and build
#     TensorRT engines without a GPU (full TensorRT is not installable here);
#  2. the native libraries (TensorRT plugin, ONNX Runtime op library; one kernel source) built from
#     TensorRT's and ONNX Runtime's public headers (fetched: a pip wheel and a Debian package, unpacked
#     into build/, never installed), and their C++ tests (CTest); GoogleTest from apt (libgtest-dev)
#     when missing, as root or with passwordless sudo; installed into cm_deploy/lib and cm_deploy/bin,
#     where the docs name them (tests/test_docs.py checks every such path, here without skipping);
#  3. the Python tests: Triton kernels under TRITON_INTERPRET=1, export, runtime, CLI, model.onnx in
#     ONNX Runtime with the op library, and the ONNX -> plugin -> engine build with TensorRT-RTX.
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
  export CM_DEPLOY_PLUGIN=$PWD/cm_deploy/lib/libcoupled_scan_plugin.so
else
  # no CUDA toolkit: the ONNX Runtime library's CPU kernel still builds (no TensorRT plugin, no GPU code)
  echo "SKIPPED: TensorRT plugin build and its C++ tests: nvcc (the CUDA toolkit) is not installed" >&2
  CM_DEPLOY_CPU_ONLY=1 bash scripts/build_plugin.sh build/ci-cpu
fi
# the tests use what the build installed, where the docs name it
export CM_DEPLOY_ORT_OP_LIBRARY=$PWD/cm_deploy/lib/libcoupled_scan_ort.so
export CM_DEPLOY_CPP_EXAMPLE=$PWD/cm_deploy/bin/cm_infer_ort
export CM_DEPLOY_TEST_SH=1
python -m pytest -q -ra tests
