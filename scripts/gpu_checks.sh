#!/usr/bin/env bash
# Every GPU check of the project in one go, for a machine with an NVIDIA GPU (how the results in the
# issues' notes were produced on the lent H100). Stages (default: all):
#   ops      Triton kernels vs the reference at the paper's shape and a long one (benchmarks/gpu_check_ops.py)
#   kernels  the CPU suite's kernel tests compiled for the GPU: tests/test_ops.py (scan, strided layouts
#            included) and tests/test_conv.py (fused conv + SiLU) with TRITON_INTERPRET=0 on CUDA tensors
#   compile  torch.compile(fullgraph=True) of the paper-size model, inference and training gradients vs
#            eager (benchmarks/check_compile.py)
#   plugin   TensorRT plugin: build (sm_90), ctest, enqueue harness vs reference, compute-sanitizer
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
# Logs and JSON go to $WORK (default /tmp/cm-gpu-checks); with $OUT set, they are packed into
# $OUT/gpu_checks.tar.gz (the device tool brings back at most 8 files). TensorRT headers: TensorRT_ROOT
# (default .carry/trt). Exit status: the number of failed stages.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stages=${*:-ops kernels compile plugin export rtx runtime deploy}
work=${WORK:-/tmp/cm-gpu-checks}; mkdir -p "$work"
export PYTHONUNBUFFERED=1 TensorRT_ROOT=${TensorRT_ROOT:-$PWD/.carry/trt}
py=${PYTHON:-python3}
failed=0
stage() { local name=$1; shift; local t=$(date +%s); echo "=== $name"; "$@" > "$work/$name.log" 2>&1; local rc=$?
          tail -n 40 "$work/$name.log"; echo "=== $name: exit $rc in $(( $(date +%s) - t )) s"; ((rc)) && failed=$((failed+1)); }
plugin_lib=$PWD/build/gpu-sm90/plugins/trt_coupled_scan/libcoupled_scan_plugin.so
for s in $stages; do case $s in
  ops)     stage ops "$py" benchmarks/gpu_check_ops.py --out "$work/ops_check.json" ;;
  kernels) stage kernels env TRITON_INTERPRET=0 "$py" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_conv.py ;;
  compile) stage compile "$py" benchmarks/check_compile.py ;;
  plugin)  stage plugin env OUT="$work/plugin" bash plugins/trt_coupled_scan/tests/run_gpu_checks.sh ;;
  export)  stage export "$py" benchmarks/gpu_check_export.py --out "$work/export" ;;
  rtx)     stage rtx "$py" plugins/trt_coupled_scan/tests/trt_rtx_check.py --plugin "$plugin_lib" \
             --out "$work/rtx_check.json" --workdir "$work/rtx" "$work/export/float32/model.onnx" "$work/export/float16/model.onnx" ;;
  deploy)  stage deploy "$py" benchmarks/bench_deploy.py --out "$work/deploy" \
             --ort-ops "$PWD/build/gpu-sm90/plugins/ort_coupled_scan/libcoupled_scan_ort.so" ;;
  runtime) stage runtime "$py" benchmarks/gpu_check_runtime.py --out "$work/runtime_check.json" \
             --trt-module tensorrt_rtx_bindings --plugin "$plugin_lib" --onnx "$work/export/float32/model.onnx" ;;
  mamba)   stage mamba env CM_DEPLOY_ORT_OP_LIBRARY="$PWD/build/gpu-sm90/plugins/ort_coupled_scan/libcoupled_scan_ort.so" \
             "$py" benchmarks/mamba_ssm_gpu.py --out "$work/mamba_ssm" --work "$work/mamba_build" ;;
  *) echo "unknown stage $s"; failed=$((failed+1)) ;;
esac; done
if [[ -n "${OUT:-}" ]]; then
  tar -C "$work" --exclude='*.onnx' --exclude='*.engine' --exclude='*.so' --exclude='*.npz' -czf "$OUT/gpu_checks.tar.gz" .
fi
echo "failed stages: $failed"
exit $failed
