#!/usr/bin/env bash
# Cross-builds the native parts for 64-bit ARM Linux (Jetson-class boards) on an x86-64 machine, and
# fetches ONNX Runtime's aarch64 library to run them with (docs/jetson.md):
#   BUILD_DIR/plugins/ort_coupled_scan/libcoupled_scan_ort.so   the ONNX Runtime op library (CPU kernel:
#                                                                NEON; + CUDA kernel, see below)
#   BUILD_DIR/examples/cpp/cm_infer_ort                          the C++ example (ONNX Runtime C++ API)
#   BUILD_DIR/onnxruntime/libonnxruntime.so.<ver>                ONNX Runtime for aarch64, from its
#                                                                manylinux aarch64 wheel (unpacked, never installed)
# then runs the CTest checks and the example's usage check under qemu-aarch64 when it is installed.
#
#   scripts/build_aarch64.sh [BUILD_DIR] [extra cmake args...]     # default BUILD_DIR: build/aarch64
#
# Needs: the cross compiler (apt-get install g++-aarch64-linux-gnu; CM_AARCH64_PREFIX for another),
# cmake, and for the emulated runs qemu-user. ONNX Runtime headers: ONNXRUNTIME_ROOT (env) when set, else
# fetched into BUILD_DIR/ort by scripts/fetch_ort_headers.sh (they are architecture independent).
# ONNX Runtime library version: CM_ORT_VERSION, else the onnxruntime that `python` imports (the same
# version as the Python runtime the emulated run is compared with). CM_ORT_LIB_DIR=none skips it.
# CUDA: the kernel and the TensorRT plugin are cross-built only when the CUDA toolkit has an aarch64
# target (CUDA_HOME/targets/aarch64-linux: JetPack's cross-compile packages), for CUDA_ARCHITECTURES
# (default 87, Jetson Orin); otherwise CM_DEPLOY_WITH_CUDA=OFF (build those on the board, docs/jetson.md).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-build/aarch64}
[[ $# -gt 0 ]] && shift
prefix=${CM_AARCH64_PREFIX:-aarch64-linux-gnu-}
root=${CM_AARCH64_ROOT:-/usr/aarch64-linux-gnu}
py=${PYTHON:-python3}
if ! command -v "${prefix}g++" >/dev/null 2>&1; then
  echo "build_aarch64: no cross compiler ${prefix}g++ (apt-get install g++-aarch64-linux-gnu, or set CM_AARCH64_PREFIX)" >&2
  exit 2
fi
mkdir -p "$build"
build=$(cd "$build" && pwd)
start=$(date +%s)

ort=${ONNXRUNTIME_ROOT:-}
if [[ -z "$ort" ]]; then
  "$repo/scripts/fetch_ort_headers.sh" "$build/ort"
  ort=$build/ort
fi

args=(-S "$repo" -B "$build" --toolchain "$repo/cmake/toolchains/aarch64-linux-gnu.cmake"
      -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" -DBUILD_TESTING=ON -DONNXRUNTIME_ROOT="$ort")
cuda=${CUDA_HOME:-/usr/local/cuda}
if [[ -d "$cuda/targets/aarch64-linux" && -x "$cuda/bin/nvcc" ]]; then
  echo "== CUDA aarch64 target found ($cuda/targets/aarch64-linux): CUDA kernel and TensorRT plugin for ${CUDA_ARCHITECTURES:-87}"
  if [[ -z "${TensorRT_ROOT:-}" ]]; then
    "$repo/scripts/fetch_trt_headers.sh" "$build/trt"
    TensorRT_ROOT=$build/trt
  fi
  args+=(-DCMAKE_CUDA_COMPILER="$cuda/bin/nvcc" -DCUDAToolkit_ROOT="$cuda" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-87}"
         -DTensorRT_ROOT="$TensorRT_ROOT")
else
  echo "== no aarch64 CUDA target under $cuda/targets ($(ls "$cuda/targets" 2>/dev/null | tr '\n' ' ')): CPU kernel only (CM_DEPLOY_WITH_CUDA=OFF)"
  args+=(-DCM_DEPLOY_WITH_CUDA=OFF -DCM_DEPLOY_BUILD_TRT_PLUGIN=OFF)
fi
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}

echo "== configure ($build, ${prefix}g++)"
cmake "${args[@]}" "$@"
echo "== build (-j $jobs)"
cmake --build "$build" -j "$jobs"

# ONNX Runtime for aarch64: libonnxruntime.so out of the manylinux aarch64 wheel
libdir=${CM_ORT_LIB_DIR:-$build/onnxruntime}
if [[ $libdir != none ]]; then
  ver=${CM_ORT_VERSION:-$("$py" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || true)}
  [[ -n "$ver" ]] || { echo "build_aarch64: no onnxruntime importable by $py: set CM_ORT_VERSION (e.g. 1.22.1)" >&2; exit 2; }
  if ! ls "$libdir/libonnxruntime.so.$ver" >/dev/null 2>&1; then
    echo "== ONNX Runtime $ver for aarch64 (manylinux wheel, unpacked into $libdir)"
    work=$(mktemp -d "$build/.wheel.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
      --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
      "onnxruntime==$ver" -d "$work"
    mkdir -p "$libdir"
    "$py" - "$work" "$libdir" <<'PY'
import glob, os, shutil, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "onnxruntime-*_aarch64.whl"))
if len(wheel) != 1:
    sys.exit(f"build_aarch64: expected one onnxruntime aarch64 wheel, got {wheel}")
with zipfile.ZipFile(wheel[0]) as z:
    libs = [n for n in z.namelist() if os.path.basename(n).startswith("libonnxruntime.so")]
    if not libs:
        sys.exit(f"build_aarch64: no libonnxruntime.so in {os.path.basename(wheel[0])}")
    for n in libs:
        with z.open(n) as src, open(os.path.join(sys.argv[2], os.path.basename(n)), "wb") as dst:
            shutil.copyfileobj(src, dst)
print("unpacked", ", ".join(os.path.basename(n) for n in libs), "from", os.path.basename(wheel[0]))
PY
  fi
fi

for f in "$build/examples/cpp/cm_infer_ort" "$build/plugins/ort_coupled_scan/libcoupled_scan_ort.so"; do
  echo "== $(basename "$f") needs on the board: $("${prefix}objdump" -T "$f" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)," \
       "$("${prefix}objdump" -T "$f" | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -n 1)"
done
echo "== test"
(cd "$build" && ctest --output-on-failure -j "$jobs")
if command -v qemu-aarch64 >/dev/null 2>&1 || command -v qemu-aarch64-static >/dev/null 2>&1; then
  # the program starts on the emulated CPU: its usage line and exit status 2
  rc=0; CM_AARCH64_ROOT=$root "$repo/scripts/run_aarch64.sh" "$build/examples/cpp/cm_infer_ort" >/dev/null 2>&1 || rc=$?
  [[ $rc == 2 ]] || { echo "build_aarch64: cm_infer_ort under qemu-aarch64 exited $rc, expected 2 (usage)" >&2; exit 1; }
  echo "== cm_infer_ort runs under qemu-aarch64 (scripts/run_aarch64.sh)"
else
  echo "NOTE: qemu-aarch64 not installed (apt-get install qemu-user): the aarch64 programs were built, not run" >&2
fi
echo "== done in $(( $(date +%s) - start )) s: $build/plugins/ort_coupled_scan/libcoupled_scan_ort.so, $build/examples/cpp/cm_infer_ort${libdir:+, $libdir}"
