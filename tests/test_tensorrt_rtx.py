"""ONNX -> CoupledScan plugin -> TensorRT engine, for real, with TensorRT-RTX.

Full TensorRT cannot be installed on CI's machines, but TensorRT-RTX (real PyPI wheels) parses ONNX
and builds engines without a GPU. These tests load the plugin library built by
scripts/build_plugin.sh into RTX's global registry, parse one-node graphs and the exported
model.onnx, and build engines. Running them needs a GPU that TensorRT supports; that stays
unverified here. Each step runs in a child process, so that an abort inside TensorRT is a failure
and not a crashed test session. Skips (with the reason) when RTX or the plugin library is missing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _rtx_importable():
    r = subprocess.run([sys.executable, "-c", "import tensorrt_rtx_libs, tensorrt_rtx_bindings"],
                       capture_output=True, text=True)
    return r.returncode == 0


def _plugin_library():
    env = os.environ.get("CM_DEPLOY_PLUGIN")
    if env and Path(env).is_file():
        return Path(env)
    found = sorted(REPO.glob("build/**/plugins/trt_coupled_scan/libcoupled_scan_plugin.so"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


pytestmark = [
    pytest.mark.skipif(not _rtx_importable(), reason="TensorRT-RTX (tensorrt-rtx-cu13-bindings/libs) "
                       "is not installed; scripts/test.sh installs it"),
    pytest.mark.skipif(_plugin_library() is None, reason="plugin library not built (run "
                       "scripts/build_plugin.sh, which needs nvcc)"),
]


def test_one_node_graphs_parse_and_build(tmp_path):
    out = tmp_path / "rtx.json"
    r = subprocess.run([sys.executable, str(REPO / "plugins/trt_coupled_scan/tests/trt_rtx_check.py"),
                        "--plugin", str(_plugin_library()), "--out", str(out), "--workdir", str(tmp_path),
                        "--dtypes", "float32,float16,bfloat16", "--timeout", "120"],
                       capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    failed = [c for c in report["checks"] if not c.get("ok")]
    assert r.returncode == 0 and report["passed"] and not failed, (r.stdout[-3000:], failed)
    assert len(report["checks"]) >= 6                      # every dtype, both variants


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exported_model_builds_with_the_plugin(tmp_path, dtype):
    torch.manual_seed(0)
    cfg = CoupledMambaConfig(modalities={"text": 12, "audio": 6}, d_model=16, n_layers=2, d_state=4)
    ckpt = save_checkpoint(CoupledMamba(cfg), tmp_path / "ckpt.pt")
    cli = [sys.executable, "-m", "cm_deploy.cli"]
    r = subprocess.run(cli + ["export", str(ckpt), "-o", str(tmp_path / "export"), "--dtype", dtype, "--streaming"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    engine = tmp_path / "model.engine"
    r = subprocess.run(cli + ["build", str(tmp_path / "export" / "model.onnx"), "-o", str(engine),
                              "--trt-module", "tensorrt_rtx_bindings", "--plugin", str(_plugin_library()),
                              "--batch", "1:2:4", "--length", "1:16:64"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert engine.stat().st_size > 0
    info = json.loads(engine.with_name("model.engine.json").read_text())
    assert info["precision"] == dtype
    assert info["plugin"]["sha256"] and Path(info["plugin"]["path"]).name == "libcoupled_scan_plugin.so"
    # no temporary left beside the engine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "export", "model.engine", "model.engine.json"]
    # the streaming graph: CoupledScan with initial_state / final_state through the plugin
    stream = tmp_path / "stream.engine"
    r = subprocess.run(cli + ["build", str(tmp_path / "export" / "model.stream.onnx"), "-o", str(stream),
                              "--trt-module", "tensorrt_rtx_bindings", "--plugin", str(_plugin_library()),
                              "--batch", "1:2:4", "--length", "1:8:32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    names = [e["name"] for e in json.loads(stream.with_name("stream.engine.json").read_text())["inputs"]]
    assert "state.scan.0" in names and "state.count" in names
