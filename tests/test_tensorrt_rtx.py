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


# ---------------------------------------------------------------------------- registered before

# Runs in a child: TensorRT-RTX imported as Python loads it (RTLD_LOCAL), then the steps in argv[3]
# ("global": RTX into the global scope as well; "shim": dlopen the autoload shim as tritonserver's
# TensorRT backend does with plugins=...; "load_library": TensorRT's own loadLibrary; "runtime":
# cm_deploy.runtime's load_plugin), printing JSON: each step's result and CoupledScan creators after it.
_CHILD = r"""
import ctypes, json, os, sys
import tensorrt_rtx_libs, tensorrt_rtx_bindings as trt
shim, plugin, steps = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
reg = trt.get_plugin_registry()
out = []
for step in steps:
    if step == "global":
        r = ctypes.CDLL(os.path.join(os.path.dirname(tensorrt_rtx_libs.__file__), "libtensorrt_rtx.so.1"),
                        mode=os.RTLD_NOW | os.RTLD_GLOBAL) is not None
    elif step == "shim":
        r = ctypes.CDLL(shim, mode=os.RTLD_NOW | os.RTLD_LOCAL) is not None
    elif step == "load_library":
        r = reg.load_library(plugin) is not None
    else:
        from cm_deploy.runtime.trt import load_plugin
        r = load_plugin(trt, plugin)
    out.append([step, r, sum(c.name == "CoupledScan" for c in reg.all_creators)])
print(json.dumps(out))
"""


def _steps(steps):
    plugin = _plugin_library()
    shim = plugin.with_name("libcoupled_scan_plugin_autoload.so")
    if "shim" in steps and not shim.is_file():
        pytest.skip(f"no {shim.name} beside {plugin} (scripts/build_plugin.sh builds it)")
    env = dict(os.environ, CM_DEPLOY_PLUGIN_TRACE="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, "-c", _CHILD, str(shim), str(plugin), steps],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_runtime_loads_a_plugin_registered_before():
    # TensorRT refuses a second registration of the creator (its loadLibrary fails); cm_deploy.runtime
    # finds CoupledScan registered (e.g. by the autoload shim in a server) and does not ask again.
    out, err = _steps("load_library,load_library,runtime")
    assert out[0] == ["load_library", True, 1] and out[1] == ["load_library", False, 1], (out, err)
    step, info, count = out[2]
    assert count == 1 and info["registered_before"] is True and info["creator_found"] is True, (out, err)


def test_autoload_shim_refuses_tensorrt_rtx():
    # The shim calls IPluginRegistry through TensorRT 10's vtable; RTX's differs: it must refuse, not crash.
    out, err = _steps("shim")           # RTX loaded RTLD_LOCAL, not named libnvinfer*: not TensorRT for the shim
    assert out == [["shim", True, 0]] and "TensorRT is not loaded in this process" in err, (out, err)
    out, err = _steps("global,shim")
    assert out == [["global", True, 0], ["shim", True, 0]], (out, err)
    assert "the TensorRT in the global scope is version 1.7.1, this library was built for TensorRT 10" in err, err
