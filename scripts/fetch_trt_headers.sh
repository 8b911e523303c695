#!/usr/bin/env bash
# Fetches TensorRT's public C++ headers (no libraries) into PREFIX/include, usable as TensorRT_ROOT,
# for building the CoupledScan plugin where TensorRT is not installed. The headers come from the
# kernel-lens wheel on PyPI (pinned), which ships TensorRT 10.14's headers; they are never committed.
#
#   scripts/fetch_trt_headers.sh [PREFIX]      # default PREFIX: build/trt
#   cmake -S . -B build -DTensorRT_ROOT=$PWD/build/trt
set -euo pipefail

prefix=${1:-build/trt}
pkg=${CM_TRT_HEADERS_PACKAGE:-kernel-lens==2.0.1}
if [[ -f "$prefix/include/NvInfer.h" ]]; then
  echo "TensorRT headers already in $prefix/include"
  exit 0
fi

py=${PYTHON:-}
if [[ -z "$py" ]]; then
  for c in python3 python; do command -v "$c" >/dev/null 2>&1 && { py=$c; break; }; done
fi
[[ -n "$py" ]] || { echo "fetch_trt_headers: python3 with pip is required" >&2; exit 2; }

mkdir -p "$prefix/include"
# Offline shortcut: the same pinned wheel already installed in this Python (e.g. the dev extra).
if [[ "$pkg" == kernel-lens==* ]] && "$py" - "$prefix/include" "${pkg#kernel-lens==}" <<'PY' 2>/dev/null
import sys, shutil, os, importlib.metadata as md, importlib.util
dest, want = sys.argv[1], sys.argv[2]
if md.version("kernel-lens") != want:
    sys.exit(1)
src = os.path.join(os.path.dirname(importlib.util.find_spec("kernel_lens").origin), "include", "tensorrt")
if not os.path.isfile(os.path.join(src, "NvInfer.h")):
    sys.exit(1)
for f in os.listdir(src):
    if f.endswith(".h"):
        shutil.copy2(os.path.join(src, f), dest)
print(f"copied TensorRT headers from the installed kernel-lens {want} into {dest}")
PY
then
  exit 0
fi

work=$(mktemp -d "${prefix%/}/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A pure download of one pinned wheel: no install, no dependencies.
"$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$pkg"
wheel=$(ls "$work"/*.whl 2>/dev/null | head -n 1)
[[ -n "$wheel" ]] || { echo "fetch_trt_headers: pip did not download a wheel for $pkg" >&2; exit 1; }

"$py" - "$wheel" "$prefix/include" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
marker = "/include/tensorrt/"
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        i = name.find(marker)
        if i < 0 or name.endswith("/"):
            continue
        rel = name[i + len(marker):]
        if ".." in rel.split("/"):
            continue
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            dst.write(src.read())
        n += 1
if not os.path.exists(os.path.join(dest, "NvInfer.h")):
    sys.exit(f"fetch_trt_headers: no include/tensorrt/NvInfer.h in {os.path.basename(wheel)}")
print(f"fetched {n} TensorRT headers into {dest}")
PY
grep -h "define TRT_M[A-Z]*_ENTERPRISE\|define NV_TENSORRT_MAJOR" "$prefix/include/NvInferVersion.h" | head -n 3 || true
