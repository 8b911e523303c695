#!/usr/bin/env bash
# Fresh machine to a trained, exported and parity-checked model: sets up .venv, then runs the demo
# (train ~1 min on the CPU, export to ONNX, portable ONNX in ONNX Runtime vs PyTorch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m cm_deploy.demo --out "${1:-demo_out}"
