#!/usr/bin/env bash
# GPU checks of the CoupledScan plugin, for a machine with a GPU (the lent H100). Run from anywhere:
#
#   TensorRT_ROOT=.carry/trt bash plugins/trt_coupled_scan/tests/run_gpu_checks.sh
#
# 1. builds the plugin and the harness library with CMake for one architecture (sm_90 unless
#    CUDA_ARCH says otherwise), unless CM_PLUGIN_LIB_DIR names a folder with both prebuilt libraries;
# 2. runs the CPU unit tests (ctest) when GoogleTest was found;
# 3. runs tests/gpu/plugin_harness.py: every case and dtype against the PyTorch reference, plus timings of
#    both implementations (--bench: the CUDA block kernel and the Triton kernels, the plugin's two
#    tactics); then every case again with CM_DEPLOY_SCAN_IMPL=triton (--impl triton: the shapes no
#    Triton kernel takes are listed n/a);
# 4. runs plugin_harness.py --sanitize under compute-sanitizer memcheck, racecheck, synccheck and initcheck
#    (the block kernel is warp-specialized: producers and consumers share shared memory through
#    barriers), one run and one log per tool and block-kernel pass, then per tool on the Triton kernels,
#    in $OUT/sanitizer; then racecheck on racecheck_handoff (the kernel's hand-off alone, with and
#    without a producer named barrier).
#
# TensorRT headers only are needed (no TensorRT library): TensorRT_ROOT/include/NvInfer.h. Without
# network access, carry the folder that scripts/fetch_trt_headers.sh wrote here (e.g. .carry/trt).
# Logs and JSON go to $OUT (or build/gpu-checks). Exit status: 0 all passed, 1 a check failed,
# 2 setup problem. Environment: PYTHON (default python3), CUDA_ARCH (90), JOBS, SKIP_SANITIZERS=1,
# SKIP_HARNESS=1 (no step 3), TUNE=1 (also time every states-per-thread setting), CM_PLUGIN_LIB_DIR
# (skip the build), SANITIZER_PRINT_LIMIT (10), SANITIZER_TIMEOUT (100 s a run).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cd "$repo"
out=${OUT:-$repo/build/gpu-checks}
mkdir -p "$out"
py=${PYTHON:-python3}
arch=${CUDA_ARCH:-90}
jobs=${JOBS:-$(nproc 2>/dev/null || echo 8)}
build=${BUILD_DIR:-$repo/build/gpu-sm$arch}
t0=$(date +%s)
status=0
summary=()
note() { echo "== $*" | tee -a "$out/summary.txt"; }
: > "$out/summary.txt"

note "repo $repo, out $out, $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader | tee -a "$out/summary.txt"

# --- 1. build ----------------------------------------------------------------------------------------
if [[ -n "${CM_PLUGIN_LIB_DIR:-}" ]]; then
  libdir=$(cd "$CM_PLUGIN_LIB_DIR" && pwd)
  note "using prebuilt libraries in $libdir"
else
  trt=${TensorRT_ROOT:-}
  if [[ -z "$trt" ]]; then
    for c in "$repo/.carry/trt" "$repo/build/trt"; do [[ -f "$c/include/NvInfer.h" ]] && { trt=$c; break; }; done
  fi
  if [[ -z "$trt" || ! -f "$trt/include/NvInfer.h" ]]; then
    note "SETUP: TensorRT headers not found: set TensorRT_ROOT to a folder with include/NvInfer.h (carry build/trt from a machine that ran scripts/fetch_trt_headers.sh)"
    exit 2
  fi
  trt=$(cd "$trt" && pwd)
  # the ONNX Runtime op library shares the kernel: build it too when its headers came along
  ort=${ONNXRUNTIME_ROOT:-}
  if [[ -z "$ort" ]]; then
    for c in "$repo/.carry/ort" "$repo/build/ort"; do [[ -f "$c/include/onnxruntime_cxx_api.h" ]] && { ort=$c; break; }; done
  fi
  ortargs=(-DCM_DEPLOY_BUILD_ORT_OPS=OFF)
  [[ -n "$ort" ]] && ortargs=(-DONNXRUNTIME_ROOT="$(cd "$ort" && pwd)")
  [[ -z "$ort" ]] && note "ONNX Runtime headers not found (.carry/ort): the op library is not built"
  for tool in cmake nvcc; do
    if ! command -v "$tool" >/dev/null; then
      [[ $tool == nvcc && -x /usr/local/cuda/bin/nvcc ]] && { export PATH=/usr/local/cuda/bin:$PATH; continue; }
      note "SETUP: $tool not found; build elsewhere with -DCMAKE_CUDA_ARCHITECTURES=$arch and set CM_PLUGIN_LIB_DIR"
      exit 2
    fi
  done
  note "building for sm_$arch in $build (TensorRT headers: $trt)"
  tb=$(date +%s)
  if ! cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release -DTensorRT_ROOT="$trt" "${ortargs[@]}" \
        -DCMAKE_CUDA_ARCHITECTURES="$arch" -DBUILD_TESTING=ON > "$out/cmake_configure.log" 2>&1; then
    tail -n 30 "$out/cmake_configure.log"; note "SETUP: cmake configure failed (log: cmake_configure.log)"; exit 2
  fi
  if ! cmake --build "$build" -j "$jobs" > "$out/cmake_build.log" 2>&1; then
    grep -E "error|Error" "$out/cmake_build.log" | head -n 30; note "FAIL: build failed (log: cmake_build.log)"; exit 1
  fi
  note "build: $(( $(date +%s) - tb )) s"
  libdir=$build/plugins/trt_coupled_scan
  # --- 2. CPU unit tests ---------------------------------------------------------------------------
  if [[ -x "$build/plugins/trt_coupled_scan/tests/test_plugin" ]]; then
    if (cd "$build" && ctest --output-on-failure -j "$jobs" > "$out/ctest.log" 2>&1); then
      note "ctest: $(grep -E 'tests passed' "$out/ctest.log")"
    else
      note "FAIL: ctest ($(grep -E 'tests passed' "$out/ctest.log")), log: ctest.log"; status=1
    fi
  else
    note "ctest skipped (GoogleTest not installed here)"
  fi
fi
for f in libcoupled_scan_plugin.so libcoupled_scan_harness.so; do
  [[ -f "$libdir/$f" ]] || { note "SETUP: $libdir/$f missing"; exit 2; }
done
cp "$libdir/libcoupled_scan_plugin.so" "$out/" 2>/dev/null || true

# --- 3. harness ------------------------------------------------------------------------------------
harness=("$py" "$repo/tests/gpu/plugin_harness.py" --lib-dir "$libdir")
bench_args=(--bench)
[[ "${TUNE:-0}" == 1 ]] && bench_args+=(--tune)
if [[ "${SKIP_HARNESS:-0}" == 1 ]]; then
  note "gpu_harness skipped (SKIP_HARNESS=1)"
else
  note "gpu_harness: correctness of every case and dtype, then timings"
  th=$(date +%s)
  "${harness[@]}" "${bench_args[@]}" --out "$out/gpu_harness.json" 2>&1 | tee "$out/gpu_harness.log"
  rc=${PIPESTATUS[0]}
  if [[ $rc -eq 0 ]]; then note "gpu_harness: PASS ($(( $(date +%s) - th )) s)"; else note "FAIL: gpu_harness exit $rc"; status=1; fi
  # every case on the Triton kernels compiled ahead of time (the plugin's tactic 2)
  note "gpu_harness, Triton kernels (CM_DEPLOY_SCAN_IMPL=triton): correctness of every case and dtype"
  th=$(date +%s)
  "${harness[@]}" --impl triton --out "$out/gpu_harness_triton.json" 2>&1 | tee "$out/gpu_harness_triton.log"
  rc=${PIPESTATUS[0]}
  if [[ $rc -eq 0 ]]; then note "gpu_harness (Triton kernels): PASS ($(( $(date +%s) - th )) s)"; else note "FAIL: gpu_harness (Triton kernels) exit $rc"; status=1; fi
fi

# --- 4. compute-sanitizer: every tool on every kernel the libraries launch ---------------------------
#   fwd      coupledScanKernel<T, NPT, MT, false>: the scan (every --sanitize case; in tiny_segmented it
#            also combines: each segment starts from the state carried through the summaries)
#   summary  coupledScanKernel<T, NPT, MT, true>: the segment summaries of a segmented launch
# Kernel filters match the mangled name, where the bool template argument is Lb0E / Lb1E. With a print
# limit a run takes seconds (printing every hazard with its backtrace takes minutes). One log per tool
# and pass in $out/sanitizer, ending with the tool's summary line.
san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
sdir=$out/sanitizer
limit=${SANITIZER_PRINT_LIMIT:-10}
if [[ "${SKIP_SANITIZERS:-0}" == 1 ]]; then
  note "sanitizers skipped (SKIP_SANITIZERS=1)"
elif [[ -z "$san" ]]; then
  note "sanitizers skipped: compute-sanitizer not found"
else
  mkdir -p "$sdir"
  help=$("$san" --help 2>&1)
  note "$("$san" --version 2>&1 | grep -iE "version" | head -n 1)"
  # triton: the Triton kernels compiled into the libraries (_fwd_kernel, _fwd_combine_kernel)
  declare -A filter=([fwd]='regex=coupledScanKernelI.*Lb0EEEv' [summary]='regex=coupledScanKernelI.*Lb1EEEv'
                     [triton]='kns=_fwd')
  passes=(fwd summary triton)
  if ! grep -q "regex" <<< "$help"; then
    note "this compute-sanitizer has no regex kernel filter: both passes in one log per tool ('block')"
    filter=([block]='kns=coupledScanKernelI' [triton]='kns=_fwd'); passes=(block triton)
  fi
  for tool in memcheck racecheck synccheck initcheck; do
    extra=()
    [[ $tool == memcheck ]] && extra=(--leak-check no)
    [[ $tool == racecheck ]] && extra=(--racecheck-report all)
    # initcheck: shared memory too (a read of a shared-memory word no thread wrote), where supported
    [[ $tool == initcheck ]] && grep -q -- "--initcheck-address-space" <<< "$help" && extra=(--initcheck-address-space all)
    for pass in "${passes[@]}"; do
      ts=$(date +%s)
      log="$sdir/${tool}_${pass}.log"
      impl=cuda; [[ $pass == triton ]] && impl=triton
      CM_DEPLOY_SCAN_IMPL=$impl timeout "${SANITIZER_TIMEOUT:-100}" "$san" --tool "$tool" --kernel-name "${filter[$pass]}" \
        --print-limit "$limit" --error-exitcode 9 "${extra[@]}" "${harness[@]}" --sanitize > "$log" 2>&1
      rc=$?
      last=$(tail -n 1 "$log")
      what="compute-sanitizer $tool, $([[ $pass == triton ]] && echo "Triton kernels" || echo "block kernel $pass")"
      if [[ $rc -eq 0 && $last == *SUMMARY* ]]; then
        note "$what: PASS ${last} ($(( $(date +%s) - ts )) s)"
      elif [[ $rc -eq 124 ]]; then
        note "FAIL: $what: TIMEOUT after ${SANITIZER_TIMEOUT:-100} s (log: sanitizer/$(basename "$log"))"; status=1
      else
        note "FAIL: $what: exit $rc, last line: ${last} (log: sanitizer/$(basename "$log"))"
        grep -E "=========" "$log" | head -n 20
        status=1
      fi
    done
  done
fi

# --- 5. racecheck on the hand-off alone (racecheck_handoff.cu): named producer barrier or not, 1 or 2
# producer warps, 16- or 8-byte loads of bc; the kernel now is "plain 2 16", up to a115b47 "named 2 16"
if [[ -n "$san" && "${SKIP_SANITIZERS:-0}" != 1 && -x "$build/plugins/trt_coupled_scan/racecheck_handoff" ]]; then
  for v in plain named; do
    for w in 2 1; do
      for b in 16 8; do
        log="$sdir/racecheck_handoff_${v}_${w}_${b}.log"
        timeout 60 "$san" --tool racecheck --racecheck-report all --print-limit "$limit" \
          "$build/plugins/trt_coupled_scan/racecheck_handoff" "$v" "$w" "$b" > "$log" 2>&1
        rc=$?
        res=$(grep -E "^(named|plain) [12] (8|16): " "$log")
        note "racecheck on the hand-off alone ($v, $w producer warps, $b-byte loads): exit $rc, ${res:-no result}, $(tail -n 1 "$log")"
        [[ $res == *": ok "* ]] || status=1 # a hazard report is a finding to read; wrong values are a failure
      done
    done
  done
fi

note "total $(( $(date +%s) - t0 )) s, status $status"
exit $status
