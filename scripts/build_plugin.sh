#!/usr/bin/env bash
# Configures, builds and tests the native libraries (what CI runs): the CoupledScan TensorRT plugin and
# the ONNX Runtime custom-op library, both from one kernel source.
#
#   scripts/build_plugin.sh [BUILD_DIR] [extra cmake args...]     # default BUILD_DIR: build/plugin
#
# TensorRT headers: TensorRT_ROOT (env) when set, else a TensorRT install CMake finds, else the headers
# are fetched into BUILD_DIR/trt by scripts/fetch_trt_headers.sh (pip download of a pinned wheel).
# GPU code: CUDA_ARCHITECTURES (env) — default "80" (one architecture, with PTX that newer GPUs JIT),
# "all" for the project's default list (Ampere to Blackwell, incl. Jetson Orin), or e.g. "90".
# ONNX Runtime headers: ONNXRUNTIME_ROOT (env) when set, else fetched into BUILD_DIR/ort by
# scripts/fetch_ort_headers.sh (a pinned Debian package, unpacked, never installed).
# Triton kernels: with CUDA, the Triton forward is compiled ahead of time and embedded in both libraries when
# the active Python imports triton and torch (CMake option CM_DEPLOY_WITH_TRITON_AOT=AUTO|ON|OFF; what is
# compiled: CM_DEPLOY_TRITON_AOT_ARCHS / _MODALITIES / _STATES / _DTYPES, e.g. -DCM_DEPLOY_TRITON_AOT_STATES=64).
# CM_DEPLOY_CPU_ONLY=1: only the ONNX Runtime library with its CPU kernel (no CUDA, no TensorRT; seconds).
# The unit tests need no GPU. Then `cmake --install` puts what was built in ONE place whatever BUILD_DIR:
# cm_deploy/lib/libcoupled_scan_plugin.so, cm_deploy/lib/libcoupled_scan_ort.so (where the runtime looks
# first) and cm_deploy/bin/cm_infer_ort, cm_deploy/bin/cm_infer_trt (the C++ examples).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${1:-build/plugin}
[[ $# -gt 0 ]] && shift
mkdir -p "$build"
build=$(cd "$build" && pwd)
start=$(date +%s)

cpu_only=${CM_DEPLOY_CPU_ONLY:-0}
trt=${TensorRT_ROOT:-}
if [[ -z "$trt" && $cpu_only != 1 ]]; then
  # A system TensorRT (e.g. the Debian/Ubuntu packages) is found by CMake itself; otherwise fetch headers.
  found=""
  for c in /usr/include /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/local/include; do
    [[ -f "$c/NvInfer.h" ]] && { found=$c; break; }
  done
  if [[ -z "$found" ]]; then
    "$repo/scripts/fetch_trt_headers.sh" "$build/trt"
    trt=$build/trt
  fi
fi

ort=${ONNXRUNTIME_ROOT:-}
if [[ -z "$ort" ]]; then
  "$repo/scripts/fetch_ort_headers.sh" "$build/ort"
  ort=$build/ort
fi

arch=${CUDA_ARCHITECTURES:-80}
args=(-S "$repo" -B "$build" -DCMAKE_BUILD_TYPE="${CMAKE_BUILD_TYPE:-Release}" -DBUILD_TESTING=ON -DCM_DEPLOY_REQUIRE_GTEST=ON)
[[ -n "$trt" ]] && args+=(-DTensorRT_ROOT="$trt")
args+=(-DONNXRUNTIME_ROOT="$ort")
[[ "$arch" != all ]] && args+=(-DCMAKE_CUDA_ARCHITECTURES="$arch")
[[ $cpu_only == 1 ]] && args+=(-DCM_DEPLOY_WITH_CUDA=OFF -DCM_DEPLOY_BUILD_TRT_PLUGIN=OFF)
jobs=${JOBS:-$(nproc 2>/dev/null || echo 2)}

echo "== configure ($build, CUDA architectures: $arch)"
cmake "${args[@]}" "$@"
echo "== build (-j $jobs)"
cmake --build "$build" -j "$jobs"
echo "== test"
(cd "$build" && ctest --output-on-failure -j "$jobs")
echo "== install (cm_deploy/lib, cm_deploy/bin)"
cmake --install "$build" --prefix "$repo/cm_deploy"
# what this build installed (cmake --install lists it; a CPU-only build has no plugin, no cm_infer_trt)
installed=$(sed "s|^$repo/||" "$build/install_manifest.txt" | tr '\n' ' ')
echo "== done in $(( $(date +%s) - start )) s: installed ${installed:-nothing}"
