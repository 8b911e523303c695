#!/usr/bin/env bash
# Every GPU check of the project in one go, for a machine with an NVIDIA GPU (how the results in the
# issues' notes were produced on the lent H100). The checks are tests in tests/gpu (marker gpu; CI skips
# them): `TRITON_INTERPRET=0 python -m pytest -m gpu tests/gpu` runs them all (stage `tests`); the
# stages below run them one by one with their logs and reports kept. Stages (default: all but tests):
#   ops      Triton kernels vs the reference at the paper's shape and a long one (tests/gpu/check_ops.py)
#   kernels  the CPU suite's kernel tests compiled for the GPU: tests/test_ops.py (scan, strided layouts
#            included) and tests/test_conv.py (fused conv + SiLU) with TRITON_INTERPRET=0 on CUDA tensors
#   compile  torch.compile(fullgraph=True) of the paper-size model, inference and training gradients vs
#            eager (tests/gpu/check_compile.py)
#   plugin   TensorRT plugin and ONNX Runtime op library: build (sm_90, build/gpu-sm90), ctest, enqueue harness
#            (tests/gpu/plugin_harness.py) vs reference, compute-sanitizer
#   export   export float32/float16 with the GPU box's torch, portable ONNX in ONNX Runtime vs PyTorch
#   rtx      TensorRT-RTX (carried, see shared/tools/trt-rtx-carry): parse + build with the plugin
#   runtime  cm_deploy.runtime's device-memory path, CUDA graphs, build_engine with TensorRT-RTX
#   deploy   model.onnx on ONNX Runtime's CUDA provider with the CoupledScan op library (built here for
#            sm_90), the portable file, PyTorch eager / CUDA graph: parity and latency (bench_deploy.py).
#            Needs onnxruntime-gpu: carry it with shared/tools/wheel-carry (onnxruntime-gpu==1.31.1) and
#            set PYTHONPATH=/tmp/wheels/site before this script.
#   mamba    (not in the default list) mamba-ssm models exported with export_module on ORT's CUDA provider with
#            the op library vs mamba-ssm's own CUDA selective scan built from .carry/mamba_ssm-*.tar.gz: parity
#            and latency (benchmarks/mamba_ssm_gpu.py; needs onnxruntime-gpu as for deploy, einops, nvcc)
#   ort      model.onnx / model.stream.onnx on ORT's CUDA provider with that op library: every node's provider
#            vs the prediction (placement table), CUDA graphs vs uncaptured runs, exact float32, per-token
#            streaming with the state on the device (tests/gpu/test_ort_cuda.py; needs onnxruntime-gpu)
#   profile  GPU time by kernel group (scan, GEMM, conv, layer norm, rest) of model.onnx on ORT CUDA and of the
#            PyTorch model, on the deploy stage's exports (benchmarks/ort_profile.py; run deploy first)
#   stream   Stream.push at T = 1 and 16, batch 1 and 64: ORT CUDA with CUDA graphs vs PyTorch's step in a
#            CUDA graph (benchmarks/bench_stream.py; needs onnxruntime-gpu)
#   tests    every GPU test in one pytest run (what the stages above run, minus the sanitizers and benchmarks)
# Logs and JSON go to $WORK (default /tmp/cm-gpu-checks); with $OUT set, they are packed into
# $OUT/gpu_checks.tar.gz (the device tool brings back at most 8 files). TensorRT headers: TensorRT_ROOT
# (default .carry/trt). Exit status: the number of failed stages.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stages=${*:-ops kernels compile plugin export rtx runtime deploy profile ort stream}
work=${WORK:-/tmp/cm-gpu-checks}; mkdir -p "$work"
export PYTHONUNBUFFERED=1 TensorRT_ROOT=${TensorRT_ROOT:-$PWD/.carry/trt} CM_GPU_OUT=$work
py=${PYTHON:-python3}
failed=0
stage() { local name=$1; shift; local t=$(date +%s); echo "=== $name"; "$@" > "$work/$name.log" 2>&1; local rc=$?
          tail -n 40 "$work/$name.log"; echo "=== $name: exit $rc in $(( $(date +%s) - t )) s"; ((rc)) && failed=$((failed+1)); }
plugin_lib=$PWD/build/gpu-sm90/plugins/trt_coupled_scan/libcoupled_scan_plugin.so
ort_lib=${CM_DEPLOY_ORT_OP_LIBRARY:-$PWD/build/gpu-sm90/plugins/ort_coupled_scan/libcoupled_scan_ort.so}
pytest=("$py" -m pytest -q -rs -p no:cacheprovider)
for s in $stages; do case $s in
  ops)     stage ops env TRITON_INTERPRET=0 "$py" tests/gpu/check_ops.py --out "$work/ops_check.json" ;;
  kernels) stage kernels env TRITON_INTERPRET=0 "${pytest[@]}" tests/test_ops.py tests/test_conv.py ;;
  compile) stage compile env TRITON_INTERPRET=0 "$py" tests/gpu/check_compile.py ;;
  plugin)  stage plugin env OUT="$work/plugin" bash plugins/trt_coupled_scan/tests/run_gpu_checks.sh ;;
  export)  stage export "$py" tests/gpu/check_export.py --out "$work/export" ;;
  rtx)     stage rtx "$py" plugins/trt_coupled_scan/tests/trt_rtx_check.py --plugin "$plugin_lib" \
             --out "$work/rtx_check.json" --workdir "$work/rtx" "$work/export/float32/model.onnx" "$work/export/float16/model.onnx" ;;
  deploy)  stage deploy env TRITON_INTERPRET=0 "$py" benchmarks/bench_deploy.py --out "$work/deploy" --ort-ops "$ort_lib" ;;
  profile) stage profile env TRITON_INTERPRET=0 "$py" benchmarks/ort_profile.py --ckpt "$work/deploy/ckpt.pt" \
             --export "$work/deploy/export_float32" --export "$work/deploy/export_float16" \
             --export "$work/deploy/export_bfloat16" --ort-ops "$ort_lib" --out "$work/profile" ;;
  ort)     stage ort env TRITON_INTERPRET=0 CM_DEPLOY_ORT_OP_LIBRARY="$ort_lib" "${pytest[@]}" -m gpu tests/gpu/test_ort_cuda.py ;;
  stream)  stage stream env TRITON_INTERPRET=0 "$py" benchmarks/bench_stream.py --out "$work/stream" --ort-ops "$ort_lib" ;;
  tests)   stage tests env TRITON_INTERPRET=0 CM_DEPLOY_ORT_OP_LIBRARY="$ort_lib" CM_DEPLOY_PLUGIN="$plugin_lib" \
             "${pytest[@]}" -m gpu tests/gpu ;;
  runtime) stage runtime env TRITON_INTERPRET=0 "$py" tests/gpu/check_runtime.py --out "$work/runtime_check.json" \
             --trt-module tensorrt_rtx_bindings --plugin "$plugin_lib" --onnx "$work/export/float32/model.onnx" ;;
  mamba)   stage mamba env CM_DEPLOY_ORT_OP_LIBRARY="$ort_lib" \
             "$py" benchmarks/mamba_ssm_gpu.py --out "$work/mamba_ssm" --work "$work/mamba_build" ;;
  *) echo "unknown stage $s"; failed=$((failed+1)) ;;
esac; done
if [[ -n "${OUT:-}" ]]; then
  tar -C "$work" --exclude='*.onnx' --exclude='*.engine' --exclude='*.so' --exclude='*.npz' --exclude='*.pt' -czf "$OUT/gpu_checks.tar.gz" .
fi
echo "failed stages: $failed"
exit $failed
