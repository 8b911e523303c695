#!/usr/bin/env bash
# Creates .venv (if missing) and installs cm-deploy with the model, ONNX and test extras.
# torch: kept if already importable (install your CUDA build first on a GPU machine); otherwise the
# pinned release (CM_DEPLOY_TORCH, default 2.13.0) is installed before the project, so that pip never
# resolves an unpinned torch on its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -x .venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${CM_DEPLOY_TORCH:-2.13.0}"
python -m pip install -q -e ".[model,onnx,plot,dev]"
