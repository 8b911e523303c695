"""The GPU check scripts beside this file, each run in its own process (they set up CUDA, Triton and
TensorRT state of their own, and some abort a process when a library misbehaves) and held to its
report: check_ops.py (Triton kernels vs the reference), the CPU suite's kernel tests compiled for
the GPU, check_compile.py (torch.compile), check_export.py (export on this machine's torch, the
portable graph in ONNX Runtime), check_runtime.py (the runtime's device paths) and plugin_harness.py
(the TensorRT plugin's enqueue vs the reference, block and warp-tile kernels). The compute-sanitizer
runs stay in plugins/trt_coupled_scan/tests/run_gpu_checks.sh (minutes each)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def run_script(args, timeout, log: Path, env=None) -> subprocess.CompletedProcess:
    """A child Python with the compiled Triton kernels; its output goes to `log` too."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_INTERPRET="0", **(env or {}))
    p = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=e, capture_output=True, text=True,
                       timeout=timeout)
    log.write_text(p.stdout + p.stderr)
    return p


def tail(p) -> str:
    return (p.stdout + p.stderr)[-4000:]


def test_triton_kernels_vs_reference(gpu_out):
    out = gpu_out / "ops_check.json"
    p = run_script([HERE / "check_ops.py", "--out", out], 900, gpu_out / "ops_check.log")
    rep = json.loads(out.read_text())
    assert rep["correctness"] and all(r["ok"] for r in rep["correctness"]), tail(p)
    errors = [e for e in rep["errors"] if not e["error"].startswith("skipped")]     # budget skips aside
    assert not errors, errors


def test_kernel_unit_tests_compiled_for_the_gpu(gpu_out):
    p = run_script(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops.py", "tests/test_conv.py"],
                   1500, gpu_out / "kernels.log")
    assert p.returncode == 0, tail(p)


def test_torch_compile_fullgraph(gpu_out):
    p = run_script([HERE / "check_compile.py"], 900, gpu_out / "compile_check.log")
    (gpu_out / "compile_check.json").write_text(p.stdout)
    assert p.returncode == 0, tail(p)


def test_export_and_portable_parity(gpu_out):
    p = run_script([HERE / "check_export.py", "--out", gpu_out / "export"], 900, gpu_out / "export_check.log")
    assert p.returncode == 0, tail(p)


def test_runtime_device_paths(gpu_out):
    args = [HERE / "check_runtime.py", "--out", gpu_out / "runtime_check.json"]
    if os.environ.get("CM_DEPLOY_TRT_MODULE"):       # with TensorRT: build and load engines too
        args += ["--trt-module", os.environ["CM_DEPLOY_TRT_MODULE"]]
        if os.environ.get("CM_DEPLOY_PLUGIN"):
            args += ["--plugin", os.environ["CM_DEPLOY_PLUGIN"]]
    p = run_script(args, 900, gpu_out / "runtime_check.log")
    rep = json.loads((gpu_out / "runtime_check.json").read_text())
    assert p.returncode == 0 and rep["summary"]["fail"] == 0, \
        [s for s in rep["steps"] if s["status"] == "fail"] or tail(p)


def plugin_lib_dir() -> Path:
    d = Path(os.environ.get("CM_PLUGIN_LIB_DIR") or REPO / "build" / "gpu-sm90" / "plugins" / "trt_coupled_scan")
    missing = [f for f in ("libcoupled_scan_plugin.so", "libcoupled_scan_harness.so") if not (d / f).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not in {d}: build the plugin with BUILD_TESTING=ON for this GPU "
                    "(plugins/trt_coupled_scan/tests/run_gpu_checks.sh does) or set CM_PLUGIN_LIB_DIR")
    return d


@pytest.mark.parametrize("impl", ["cuda", "triton"])
def test_plugin_enqueue_vs_reference(gpu_out, impl):
    # the CUDA block kernel, and the Triton kernels compiled ahead of time (the plugin's two tactics)
    out = gpu_out / f"plugin_harness_{impl}.json"
    p = run_script([HERE / "plugin_harness.py", "--lib-dir", plugin_lib_dir(), "--impl", impl, "--out", out], 900,
                   gpu_out / f"plugin_harness_{impl}.log", {})
    assert p.returncode == 0, tail(p)
