#!/usr/bin/env bash
# The test suite, as CI runs it on a clean checkout (no GPU):
#  1. .venv with the project (scripts/setup.sh) and TensorRT-RTX's wheels, which parse ONNX and build
#     TensorRT engines without a GPU (full TensorRT is not installable here);
#  2. the native libraries (TensorRT plugin, ONNX Runtime op library; one kernel source) built from
#     TensorRT's and ONNX Runtime's public headers (fetched: a pip wheel and a Debian package, unpacked
#     into build/, never installed), and their C++ tests (CTest); GoogleTest from apt (libgtest-dev)
#     when missing, as root or with passwordless sudo; installed into cm_deploy/lib and cm_deploy/bin,
#     where the docs name them (tests/test_docs.py checks every such path, here without skipping);
#  3. a real Triton Inference Server (scripts/fetch_tritonserver.sh) for the live serving tests;
#  4. the aarch64 (Jetson-class) op library and C++ example, cross-built (g++-aarch64-linux-gnu and
#     qemu-user from apt when missing, as root or with passwordless sudo) for tests/test_aarch64.py,
#     which runs them under QEMU (docs/jetson.md);
#  5. the Python tests: Triton kernels under TRITON_INTERPRET=1, export, runtime, CLI, model.onnx in
#     ONNX Runtime with the op library, and the ONNX -> plugin -> engine build with TensorRT-RTX.
# A part whose tool is missing (nvcc, TensorRT-RTX) is skipped with the reason, never passed silently.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
# mamba-ssm's source distribution (never installed; its CUDA build is skipped): the tests that check
# exports of mamba-ssm models against mamba-ssm's own forward import its Python modules from it
if ! ls .carry/mamba_ssm-*.tar.gz >/dev/null 2>&1; then
  mkdir -p .carry    # its setup.py runs (metadata) without build isolation: it imports torch, setuptools, wheel
  python -m pip install -q setuptools wheel packaging
  (cd .carry && MAMBA_SKIP_CUDA_BUILD=TRUE python -m pip download -q --no-deps --no-build-isolation \
     --no-binary :all: "mamba-ssm==2.3.2.post1") \
    || echo "NOTE: mamba-ssm's sdist not downloadable: the mamba-ssm export tests will skip" >&2
fi
python -m pip install -q "tensorrt-rtx-cu13-libs==1.7.1.116" "tensorrt-rtx-cu13-bindings==1.7.1.116" \
  || echo "NOTE: TensorRT-RTX wheels not installable: the engine-build tests will skip" >&2
apt_install() {   # Debian packages, as root or with passwordless sudo; fails quietly otherwise
  local as=()
  [[ $(id -u) == 0 ]] || as=(sudo -n)
  "${as[@]}" apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 \
    || { "${as[@]}" apt-get update -q >/dev/null 2>&1 && "${as[@]}" apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; }
}
# serving: tritonclient (Triton's config schema, clients) and a real tritonserver (the nvidia-pytriton wheel, unpacked)
python -m pip install -q "tritonclient[http,grpc]==2.73.0" \
  || echo "NOTE: tritonclient not installable: the serving tests will skip" >&2
bash scripts/fetch_tritonserver.sh build/tritonserver \
  || echo "NOTE: tritonserver not fetched: the live serving tests will skip" >&2
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  [[ -f /usr/include/gtest/gtest.h ]] || apt_install libgtest-dev || true   # GoogleTest for the plugin's C++ tests
  native=build/ci
  # one CUDA architecture (80) unless CUDA_ARCHITECTURES says otherwise; the Triton kernels compiled ahead of
  # time for the paper's M = 3, N = 64 only (~1 min; the default set, 194 kernels, is for GPU machines/releases)
  bash scripts/build_plugin.sh build/ci -DCM_DEPLOY_TRITON_AOT_MODALITIES=3 -DCM_DEPLOY_TRITON_AOT_STATES=64
  export CM_DEPLOY_PLUGIN=$PWD/cm_deploy/lib/libcoupled_scan_plugin.so
else
  # no CUDA toolkit: the ONNX Runtime library's CPU kernel still builds (no TensorRT plugin, no GPU code)
  echo "SKIPPED: TensorRT plugin build and its C++ tests: nvcc (the CUDA toolkit) is not installed" >&2
  native=build/ci-cpu
  CM_DEPLOY_CPU_ONLY=1 bash scripts/build_plugin.sh build/ci-cpu
fi
# aarch64 (Jetson-class boards): the op library's CPU kernel and examples/cpp cross-built, ONNX Runtime's
# aarch64 library unpacked from its wheel; tests/test_aarch64.py runs them under QEMU
have_aarch64() { command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1; }
have_aarch64 || apt_install g++-aarch64-linux-gnu qemu-user || true
if have_aarch64; then
  ONNXRUNTIME_ROOT=${ONNXRUNTIME_ROOT:-$PWD/$native/ort} bash scripts/build_aarch64.sh build/ci-aarch64
  export CM_DEPLOY_AARCH64_BUILD=$PWD/build/ci-aarch64
else
  echo "SKIPPED: aarch64 cross build and its emulated run: g++-aarch64-linux-gnu and qemu-user are not installed" \
       "and not installable here (needs root or passwordless sudo)" >&2
fi
# the tests use what the build installed, where the docs name it
export CM_DEPLOY_ORT_OP_LIBRARY=$PWD/cm_deploy/lib/libcoupled_scan_ort.so
export CM_DEPLOY_CPP_EXAMPLE=$PWD/cm_deploy/bin/cm_infer_ort
export CM_DEPLOY_TEST_SH=1
python -m pytest -q -ra tests
