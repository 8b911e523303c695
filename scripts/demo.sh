#!/usr/bin/env bash
# Fresh machine to a trained, exported and parity-checked model: sets up .venv, builds the CoupledScan
# ONNX Runtime op library's CPU kernel when cmake and a C++ compiler are there and none is installed in
# cm_deploy/lib yet (seconds; log in build/demo-build.log; else the demo checks the portable file only),
# then runs the demo (train on the CPU, export to ONNX, parity of model.portable.onnx and model.onnx in
# ONNX Runtime against PyTorch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
# an installed library (scripts/test.sh's has the CUDA kernel too) is kept: the runtime finds it there
if [[ ! -f cm_deploy/lib/libcoupled_scan_ort.so ]] && command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1; then
  mkdir -p build && CM_DEPLOY_CPU_ONLY=1 bash scripts/build_plugin.sh build/demo > build/demo-build.log 2>&1 \
    || echo "NOTE: the op library did not build (build/demo-build.log): the demo checks model.portable.onnx only" >&2
fi
python -m cm_deploy.demo --out "${1:-demo_out}"
