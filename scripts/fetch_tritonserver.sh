#!/usr/bin/env bash
# Fetches a real Triton Inference Server for the live serving tests and benchmarks: the tritonserver
# binary and its python backend ship inside the nvidia-pytriton wheel (x86-64 Linux, glibc >= 2.35).
# The wheel is downloaded with pip (no dependencies) and unpacked into PREFIX, never installed; the
# python backend stub built for this Python is put beside the backend, as the server expects. The stub
# was built for numpy 1.x: PREFIX/python gets numpy < 2 and this venv's onnxruntime release
# (pip install --target), the packages cm_deploy.runtime needs in the backend's interpreter
# (cm_deploy.serving.server puts that folder on $CM_DEPLOY_PYTHONPATH).
#
#   scripts/fetch_tritonserver.sh [PREFIX]     # default build/tritonserver
#   (offline: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR with the wheels in DIR; pip reads both)
#   CM_DEPLOY_TRITONSERVER=PREFIX python -m pytest tests/test_serving.py
set -euo pipefail
prefix=${1:-build/tritonserver}
ver=${CM_PYTRITON_VERSION:-0.7.0}
py=${PYTHON:-python}
server=$prefix/pytriton/tritonserver
mkdir -p "$prefix"
work=$(mktemp -d "${prefix%/}/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [[ -x "$server/bin/tritonserver" && -x "$server/backends/python/triton_python_backend_stub" ]]; then
  echo "tritonserver already in $server"
else
  "$py" -m pip download -q --no-deps "nvidia-pytriton==$ver" -d "$work" 2>&1 | grep -v "is ignored" >&2 || true
  wheel=$(ls "$work"/nvidia_pytriton-*.whl 2>/dev/null | head -1)
  [[ -n "$wheel" ]] || { echo "fetch_tritonserver: pip could not download nvidia-pytriton==$ver" >&2; exit 1; }
  "$py" -m zipfile -e "$wheel" "$work/x"
  pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  stub=$work/x/pytriton/tritonserver/python_backend_stubs/$pyver/triton_python_backend_stub
  [[ -f "$stub" ]] || { echo "fetch_tritonserver: the wheel has no python backend stub for Python $pyver" >&2; exit 1; }
  cp "$stub" "$work/x/pytriton/tritonserver/backends/python/"
  chmod +x "$work/x/pytriton/tritonserver/bin/tritonserver" "$work/x/pytriton/tritonserver/backends/python/triton_python_backend_stub"
  rm -rf "$work/x/pytriton/tritonserver/python_backend_stubs" "$prefix/pytriton" "$prefix/nvidia_pytriton.libs"
  mv "$work/x/pytriton" "$work/x/nvidia_pytriton.libs" "$prefix/"
  echo "fetched tritonserver ($(basename "$wheel")) into $server (python backend stub for Python $pyver)"
fi
if [[ -d "$prefix/python/numpy" ]]; then
  echo "the python backend's packages already in $prefix/python"
  exit 0
fi
"$py" -m pip install -q --target "$work/python" "numpy<2" 2>&1 | grep -v "is ignored" >&2 || true
[[ -d "$work/python/numpy" ]] || { echo "fetch_tritonserver: pip could not install numpy<2 for the python backend" >&2; exit 1; }
# this venv's onnxruntime (onnxruntime-gpu on a GPU machine), same release; without it the backend
# imports the venv's own (cm_deploy.serving.server lists the venv's site-packages after this folder)
ort=$("$py" -c 'import importlib.metadata as m
for d in ("onnxruntime-gpu", "onnxruntime"):
    try:
        print(f"{d}=={m.version(d)}"); break
    except m.PackageNotFoundError:
        pass' 2>/dev/null || echo "")
if [[ -n "$ort" ]]; then
  "$py" -m pip install -q --target "$work/python" --no-deps "$ort" 2>&1 | grep -v "is ignored" >&2 \
    || echo "fetch_tritonserver: $ort not installed beside numpy<2: the backend uses the venv's" >&2
fi
rm -rf "$prefix/python"
mv "$work/python" "$prefix/python"
echo "installed numpy<2${ort:+ and $ort} for the python backend into $prefix/python"
