#!/usr/bin/env bash
# The test suite, as CI runs it on a clean checkout (no GPU): Python tests (Triton kernels under
# TRITON_INTERPRET=1), then the TensorRT plugin built from TensorRT's public headers and its CTest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -ra tests
if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  if [[ ! -f /usr/include/gtest/gtest.h ]]; then   # GoogleTest for the plugin's C++ tests
    if [[ $(id -u) == 0 ]]; then apt-get install -y -q libgtest-dev >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q libgtest-dev >/dev/null; }
    else sudo -n apt-get install -y -q libgtest-dev >/dev/null; fi
  fi
  bash scripts/build_plugin.sh build/ci          # one architecture (80) unless CUDA_ARCHITECTURES says otherwise
else
  echo "SKIPPED: TensorRT plugin build and C++ tests: nvcc (the CUDA toolkit) is not installed" >&2
fi
