"""cm-deploy CLI: every command, exit status 0/1/2 (3 for internal errors) and one-line errors, over
the real export, ONNX Runtime and PyTorch; engines through the stand-in tensorrt module and a stand-in
trtexec (the real ones are not installable here)."""
from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

# fixtures shared with test_runtime.py (importing them registers them here)
from test_runtime import fake_trt, host_cuda, plugin_lib  # noqa: F401,F811
from test_runtime import FIXTURES, H100, _fake_io, feeds_for, make_checkpoint, shared_artifacts

from cm_deploy.cli import main
from cm_deploy.runtime import trt as T


@pytest.fixture(scope="session")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err, needle=None):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if needle:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def npz(tmp_path):
    def write(name="x.npz", **arrays):
        p = tmp_path / name
        np.savez(p, **(arrays or feeds_for()))
        return p
    return write


# ---------------------------------------------------------------------------- help, usage

def test_help_version_and_no_args(capsys):
    rc, out, _ = cli(capsys)
    assert rc == 0 and "Usage: cm-deploy" in out
    for cmd in ("export", "build", "run", "parity", "profile", "inspect"):
        rc, out, _ = cli(capsys, cmd, "--help")
        assert rc == 0 and f"cm-deploy {cmd}" in out
    rc, out, _ = cli(capsys, "--version")
    assert rc == 0 and "0.1.0" in out


@pytest.mark.parametrize("args,needle", [
    (["nope"], "No such command 'nope'"),
    (["run"], "Missing argument 'MODEL'"),
    (["run", "missing.onnx", "--inputs", "x.npz"], "does not exist"),
    (["build", "--precision", "fp8", "x.onnx"], "'fp8' is not one of"),
    (["profile", "--iters", "0", "x.onnx"], "--iters"),
    (["parity", "a.pt"], "File 'a.pt' does not exist"),
])
def test_usage_errors_are_one_line(capsys, args, needle):
    rc, _, err = cli(capsys, *args)
    assert rc == 2
    assert_one_line_error(err, needle)


def test_internal_error_is_one_line_exit_3(capsys, monkeypatch, art, npz):
    import cm_deploy.runtime.ort_backend as ob

    def boom(self, *a, **k):
        raise ZeroDivisionError("bug")
    monkeypatch.setattr(ob.OrtBackend, "_run", boom)
    rc, _, err = cli(capsys, "run", art["portable"], "--inputs", npz())
    assert rc == 3
    line = assert_one_line_error(err, "internal error (a bug in cm-deploy; please report it")
    assert "CM_DEPLOY_DEBUG=1" in line and "ZeroDivisionError: bug" in line
    monkeypatch.setenv("CM_DEPLOY_DEBUG", "1")
    rc, _, err = cli(capsys, "run", art["portable"], "--inputs", npz())
    assert rc == 3 and "Traceback" in err


# ---------------------------------------------------------------------------- export

def test_export_real(art):
    """The shared fixture ran `cm-deploy export a.pt -o DIR` for real."""
    m = json.loads((art["export"] / "manifest.json").read_text())
    assert m["format"] == "cm-deploy-manifest/1" and m["files"] == {"tensorrt": "model.onnx",
                                                                      "portable": "model.portable.onnx"}
    assert art["onnx"].is_file() and art["portable"].is_file()
    assert f"exported {art['a']}" in art["export_stdout"] and "portable" in art["export_stdout"]


def test_export_options(capsys, monkeypatch, art, tmp_path):
    import cm_deploy.export as ex
    calls = []

    def fake_export(ckpt, out_dir, **kw):
        calls.append((Path(ckpt), Path(out_dir), kw))
        return {"files": {"tensorrt": "model.onnx", "portable": "model.portable.onnx"}}
    monkeypatch.setattr(ex, "export_checkpoint", fake_export)
    rc, out, _ = cli(capsys, "export", art["a"])
    assert rc == 0 and calls[-1][1] == art["a"].with_name("a_export")
    from cm_deploy.progress import Progress
    assert isinstance(calls[-1][2].pop("progress"), Progress)
    assert calls[-1][2] == {"dtype": "float32", "opset": None, "batch": None, "lengths": None, "streaming": False}
    rc, _, _ = cli(capsys, "export", art["a"], "-o", tmp_path / "o", "--dtype", "float16", "--opset", "18",
                   "--batch", "2", "--length", "32", "--length", "text=8", "--streaming")
    assert rc == 0
    assert calls[-1][1] == tmp_path / "o"
    calls[-1][2].pop("progress")
    assert calls[-1][2] == {"dtype": "float16", "opset": 18, "batch": 2,
                            "lengths": {"text": 8, "audio": 32, "vision": 32}, "streaming": True}
    rc, _, err = cli(capsys, "export", art["a"], "--length", "text=abc")
    assert rc == 2
    assert_one_line_error(err, "--length: expected NAME=L or L")


def test_export_bad_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"definitely not a checkpoint")
    rc, _, err = cli(capsys, "export", bad, "-o", tmp_path / "out")
    assert rc == 2
    assert_one_line_error(err, f"{bad}: ")
    assert not (tmp_path / "out" / "model.onnx").exists()


# ---------------------------------------------------------------------------- run

def test_run_npz(capsys, art, npz, tmp_path):
    from cm_deploy.runtime import load
    x = npz()
    rc, out, _ = cli(capsys, "run", art["portable"], "--inputs", x, "-o", tmp_path / "y.npz")
    assert rc == 0 and "wrote output (2, 1)" in out
    with np.load(tmp_path / "y.npz") as z, load(art["portable"], device="cpu") as m:
        want = m.run(dict(np.load(x)))["output"]
        assert np.array_equal(z["output"], want)
    rc, out, _ = cli(capsys, "run", art["portable"], "--inputs", x)
    assert rc == 0 and "output: shape (2, 1) float32" in out
    rc, out, _ = cli(capsys, "run", art["a"], "--inputs", x, "-o", tmp_path / "t.npz")
    assert rc == 0
    with np.load(tmp_path / "t.npz") as z:
        assert np.allclose(z["output"], want, atol=1e-5)
    # --chunk: checkpoints only (the same outputs); on an ONNX file one line, exit 2
    rc, out, _ = cli(capsys, "run", art["a"], "--chunk", "2", "--inputs", x, "-o", tmp_path / "c.npz")
    assert rc == 0
    with np.load(tmp_path / "c.npz") as z:
        assert np.allclose(z["output"], want, atol=1e-5)
    rc, _, err = cli(capsys, "run", art["portable"], "--chunk", "2", "--inputs", x)
    assert rc == 2
    assert_one_line_error(err, "chunk applies to checkpoints")


def _bad_npz(kind, tmp_path):
    f = feeds_for()
    p = tmp_path / f"{kind}.npz"
    if kind == "garbage":
        p.write_bytes(b"PK\x03\x04 broken zip")
    elif kind == "npy":
        p = tmp_path / "x.npy"
        np.save(p, f["text"])
    elif kind == "object":
        np.savez(p, text=np.array([{"a": 1}], dtype=object))
    elif kind == "empty":
        np.savez(p)
    elif kind == "missing":
        f.pop("audio")
        np.savez(p, **f)
    elif kind == "dtype":     # integers are no float input (float64 is cast: tests/test_new_user.py)
        np.savez(p, **{k: v.astype(np.int64) for k, v in f.items()})
    elif kind == "rank":
        np.savez(p, **dict(f, text=f["text"][0]))
    elif kind == "features":
        np.savez(p, **dict(f, vision=np.zeros((2, 3, 4), np.float32)))
    elif kind == "batch":
        np.savez(p, **dict(f, vision=np.zeros((3, 3, 5), np.float32)))
    return p


@pytest.mark.parametrize("kind,needle", [
    ("garbage", "not a readable .npz archive"),
    ("npy", "expected an .npz archive"),
    ("object", "not a readable .npz archive"),
    ("empty", "holds no arrays"),
    ("missing", "missing 'audio'"),
    ("dtype", "dtype int64, expected float32"),
    ("rank", "has rank 2"),
    ("features", "axis 2 is 4, expected 5"),
    ("batch", "dimension 'batch' is 2 in 'text' but 3 in 'vision'"),
])
@pytest.mark.parametrize("model", ["portable", "a"])
def test_run_input_errors(capsys, art, tmp_path, kind, needle, model):
    rc, _, err = cli(capsys, "run", art[model], "--inputs", _bad_npz(kind, tmp_path))
    assert rc == 2
    assert_one_line_error(err, needle)


def test_run_model_errors(capsys, art, npz, tmp_path, monkeypatch):
    x = npz()
    (tmp_path / "m.bin").write_bytes(b"x")
    rc, _, err = cli(capsys, "run", tmp_path / "m.bin", "--inputs", x)
    assert rc == 2 and "cannot tell the model kind" in assert_one_line_error(err)
    rc, _, err = cli(capsys, "run", art["onnx"], "--inputs", x, "--ort-ops", tmp_path / "nope.so")
    assert rc == 2 and "op library not found" in assert_one_line_error(err)
    # model.onnx where no op library can be found: how to get one, or the portable file
    from cm_deploy.runtime import native
    monkeypatch.delenv(native.LIBRARIES["ort"].env, raising=False)
    monkeypatch.setattr(native, "candidates", lambda kind: [])
    rc, _, err = cli(capsys, "run", art["onnx"], "--inputs", x, "--device", "cpu")
    assert rc == 2 and "model.portable.onnx (stock ONNX Runtime)" in assert_one_line_error(err)
    rc, _, err = cli(capsys, "run", art["a"], "--inputs", x, "--backend", "ort")
    assert rc == 2 and "cannot run on backend 'ort'" in assert_one_line_error(err)
    rc, _, err = cli(capsys, "run", art["a"], "--inputs", x, "--device", "tpu")
    assert rc == 2 and "unknown device" in assert_one_line_error(err)


def test_run_engine_without_tensorrt(capsys, npz, tmp_path, monkeypatch):
    ok, _ = T.tensorrt_available("tensorrt")
    if ok:
        pytest.skip("TensorRT is installed: this checks the message when it is not")
    monkeypatch.delenv(T.MODULE_ENV, raising=False)
    monkeypatch.setattr(T, "_installed", lambda name: False)     # no TensorRT-RTX either
    from cm_deploy.runtime import cuda as cu
    monkeypatch.setattr(cu, "gpu_missing", lambda: None)     # a GPU: then the missing TensorRT is the blocker
    e = tmp_path / "m.engine"
    e.write_bytes(b"plan")
    rc, _, err = cli(capsys, "run", e, "--inputs", npz())
    assert rc == 2
    assert_one_line_error(err, "TensorRT Python module 'tensorrt' is not importable")


def _stand_in_engine(path, version):
    from fake_tensorrt import fake_engine_bytes
    path.write_bytes(fake_engine_bytes(_fake_io(), version))
    return path


def test_run_engine_stand_in(capsys, fake_trt, host_cuda, npz, tmp_path):
    from fake_tensorrt import host_kernel
    trt = fake_trt(kernel=host_kernel)
    eng = _stand_in_engine(tmp_path / "m.engine", trt.__version__)
    f = feeds_for(2, (5, 4, 3))
    rc, out, err = cli(capsys, "run", eng, "--inputs", npz(**f), "-o", tmp_path / "y.npz", "--cuda-graph")
    assert rc == 0, err
    want = np.tile(0.5 * np.arange(3, dtype=np.float32), (2, 1)) + sum(v.reshape(2, -1).mean(1, keepdims=True)
                                                                        for v in f.values())
    with np.load(tmp_path / "y.npz") as z:
        assert np.allclose(z["output"], want, atol=1e-6)
    rc, _, err = cli(capsys, "run", eng, "--inputs", npz(**feeds_for(2, (40, 4, 3))))
    assert rc == 2
    assert_one_line_error(err, "outside the engine's profile [1, 16]")


def test_engine_from_other_tensorrt_or_gpu(capsys, fake_trt, art, plugin_lib, npz, tmp_path):
    from cm_deploy.runtime.builder import build_engine
    fake_trt(version="10.8.0")
    eng = tmp_path / "m.engine"
    build_engine(art["onnx"], eng, plugin=plugin_lib, progress=False)
    fake_trt(version="10.12.0")
    rc, _, err = cli(capsys, "run", eng, "--inputs", npz())
    assert rc == 2
    assert_one_line_error(err, "built with TensorRT 10.8.0 but this is 10.12.0: rebuild it")
    fake_trt(version="10.8.0")
    side = json.loads(T.sidecar_path(eng).read_text())
    side["device"] = dict(H100, name="NVIDIA A100-SXM4-80GB", compute_capability="8.0")
    T.sidecar_path(eng).write_text(json.dumps(side))
    rc, _, err = cli(capsys, "run", eng, "--inputs", npz())
    assert rc == 2
    assert_one_line_error(err, "built for compute capability 8.0 (NVIDIA A100-SXM4-80GB) but this GPU")
    rc, _, err = cli(capsys, "run", eng, "--inputs", npz(), "--plugin", tmp_path / "gone.so")
    assert rc == 2


# ---------------------------------------------------------------------------- build

def test_build_stand_in(capsys, fake_trt, art, plugin_lib, tmp_path, monkeypatch):
    trt = fake_trt()
    out = tmp_path / "b" / "m.engine"
    rc, stdout, err = cli(capsys, "build", art["onnx"], "-o", out, "--plugin", plugin_lib, "--batch", "1:2:4",
                          "--length", "1:8:16", "--length", "text=2:4:8", "--timing-cache", tmp_path / "tc",
                          "--workspace", "256")
    assert rc == 0, err
    assert f"engine {out}" in stdout and "float32, strongly typed, tensorrt 10.8.0" in stdout
    assert "profile text: min [1, 2, 12] opt [2, 4, 12] max [4, 8, 12]" in stdout
    assert "[build] Building engine" not in err            # progress goes to a terminal only
    assert trt.calls[-1] == ("build", {"flags": [], "strong": True, "pools": 1})
    assert (tmp_path / "tc").is_file() and T.sidecar_path(out).is_file()
    rc, stdout, _ = cli(capsys, "inspect", out)          # the sidecar: no TensorRT needed
    assert rc == 0 and "profile text: min [1, 2, 12]" in stdout
    rc, stdout, _ = cli(capsys, "inspect", out, "--json")
    d = json.loads(stdout)
    assert d["built_with"]["tensorrt"]["version"] == "10.8.0" and d["precision"] == "float32"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    rc, _, err = cli(capsys, "build", art["onnx"], "-o", tmp_path / "b2.engine", "--plugin", plugin_lib)
    assert rc == 0 and "[build] Building engine" in err
    rc, _, err = cli(capsys, "build", art["onnx"], "-o", tmp_path / "b3.engine", "--plugin", plugin_lib, "--quiet")
    assert rc == 0 and "[build] Building engine" not in err


@pytest.mark.parametrize("args,needle", [
    (["--batch", "4:2:1"], "--batch: need 1 <= min <= opt <= max"),
    (["--length", "text=abc"], "--length text: expected N or MIN:OPT:MAX"),
    (["--length", "speech=1:2:3"], "no network input named 'speech'"),
    (["--plugin", "/nope/libcoupled_scan_plugin.so"], "plugin library not found: /nope/libcoupled_scan_plugin.so"),
    (["--precision", "bf16", "--trt-module", "tensorrt_rtx"], "strongly typed networks only"),
])
def test_build_errors_stand_in(capsys, fake_trt, art, plugin_lib, tmp_path, args, needle):
    fake_trt(flavour="rtx", name="tensorrt_rtx", version="1.7.1")
    fake_trt()
    if "--plugin" not in args:
        args = args + ["--plugin", plugin_lib]
    rc, _, err = cli(capsys, "build", art["onnx"], "-o", tmp_path / "x.engine", "--quiet", *args)
    assert rc == 2
    assert_one_line_error(err, needle)


def test_build_without_tensorrt_or_plugin(capsys, art, monkeypatch):
    monkeypatch.delenv(T.MODULE_ENV, raising=False)
    monkeypatch.setenv(T.PLUGIN_ENV, "/nope/libcoupled_scan_plugin.so")
    rc, _, err = cli(capsys, "build", art["onnx"])
    assert rc == 2
    assert_one_line_error(err, "plugin library not found: /nope/libcoupled_scan_plugin.so (from $CM_DEPLOY_PLUGIN)")
    if T.tensorrt_available("tensorrt")[0]:
        pytest.skip("TensorRT is installed: the missing-TensorRT message is not reachable")
    rc, _, err = cli(capsys, "build", art["portable"])       # no plugin needed: then TensorRT is missing
    assert rc == 2
    assert_one_line_error(err, "TensorRT Python module 'tensorrt' is not importable")


# ---------------------------------------------------------------------------- parity

def test_parity_pass(capsys, art, npz):
    rc, out, err = cli(capsys, "parity", art["a"], art["portable"])
    assert rc == 0, err
    assert "PASS" in out and "precision float32: pass when |y - ref| <= 0.0001 + 0.0001 * |ref|" in out
    rc, out, _ = cli(capsys, "parity", art["a"], art["portable"], "--json", "--batch", "1,2", "--length", "5")
    rep = json.loads(out)
    assert rc == 0 and rep["ok"] and [c["shape"] for c in rep["cases"]] == ["batch=1 L=5", "batch=2 L=5"]
    assert rep["reference"].startswith("torch[cpu,float32,reference]")
    rc, out, _ = cli(capsys, "parity", art["a"], art["portable"], "--json", "--inputs", npz())
    assert rc == 0 and [c["shape"] for c in json.loads(out)["cases"]] == ["x.npz"]
    rc, out, _ = cli(capsys, "parity", art["a"], art["a"], "--dtype", "float16", "--json", "--length", "6")
    rep = json.loads(out)
    assert rc == 0 and rep["precision"] == "float16" and (rep["atol"], rep["rtol"]) == (1e-2, 1e-2)


def test_parity_fails_on_a_perturbed_model(capsys, art):
    rc, out, err = cli(capsys, "parity", art["a"], art["b"])          # same config, other weights
    assert rc == 1
    assert "FAIL" in out
    assert_one_line_error(err, "parity failed:")
    rc, out, err = cli(capsys, "parity", art["b"], art["portable"], "--json")   # the ONNX of a vs b
    assert rc == 1 and json.loads(out)["ok"] is False
    assert_one_line_error(err, "beyond tolerance")
    rc, _, _ = cli(capsys, "parity", art["a"], art["b"], "--atol", "10", "--rtol", "10")
    assert rc == 0


def test_parity_incompatible_model(capsys, art, tmp_path):
    other = make_checkpoint(tmp_path / "two.pt", 0, modalities={"text": 12, "audio": 7})
    rc, _, err = cli(capsys, "parity", other, art["portable"])
    assert rc == 2
    assert_one_line_error(err, "not the same model")


# ---------------------------------------------------------------------------- profile

def test_profile_builtin_side_by_side(capsys, art, tmp_path):
    png = tmp_path / "lat.png"
    rc, out, err = cli(capsys, "profile", art["portable"], art["a"], "--batch", "1,2", "--length", "6",
                       "--iters", "2", "--warmup", "1", "--json", "--plot", png, "--timer", "builtin")
    assert rc == 0, err
    rows = json.loads(out)
    assert [(r["model"].split(":")[0], r["batch"]) for r in rows] == [
        ("onnxruntime[CPU,function]", 1), ("onnxruntime[CPU,function]", 2), ("torch[cpu,float32,auto]", 1), ("torch[cpu,float32,auto]", 2)]
    assert all(r["timer"] == "builtin" and r["n"] == 2 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert png.stat().st_size > 1000
    rc, out, _ = cli(capsys, "profile", art["portable"], "--batch", "1", "--length", "4,8", "--iters", "1",
                     "--warmup", "0")
    assert rc == 0 and "p50 ms" in out and "samples/s" in out and len(out.strip().splitlines()) == 4
    rc, _, err = cli(capsys, "profile", art["portable"], "--timer", "trtexec", "--iters", "1")
    assert rc == 2


FAKE_TRTEXEC = """\
#!{python}
# stand-in trtexec: writes the committed fixtures where --exportTimes/--exportProfile point
import os, shutil, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
with open(os.environ["FAKE_TRTEXEC_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_TRTEXEC_FAIL"):
    print("[E] Error[1]: [pluginV3Registry.cpp::loadLibrary] cannot load plugin library")
    sys.exit(1)
shutil.copy({times!r}, args["exportTimes"])
shutil.copy({profile!r}, args["exportProfile"])
print("[I] Throughput: 812.5 qps")
"""


def test_profile_trtexec_stand_in(capsys, fake_trt, art, plugin_lib, tmp_path, monkeypatch):
    from cm_deploy.runtime.builder import build_engine
    fake_trt()
    eng = tmp_path / "m.engine"
    build_engine(art["onnx"], eng, plugin=plugin_lib, batch=(1, 4, 16), length=(1, 8, 32), progress=False)
    exe = tmp_path / "trtexec"
    exe.write_text(FAKE_TRTEXEC.format(python=sys.executable, times=str(FIXTURES / "trtexec_times.json"),
                                       profile=str(FIXTURES / "trtexec_profile.json")))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("CM_DEPLOY_TRTEXEC", str(exe))
    monkeypatch.setenv("FAKE_TRTEXEC_LOG", str(log))
    sys.modules.pop("tensorrt")        # trtexec needs no TensorRT Python module: the sidecar is enough
    T._modules.clear()
    rc, out, err = cli(capsys, "profile", eng, "--batch", "2,64", "--length", "8", "--iters", "20", "--json",
                       "--cuda-graph")
    assert rc == 0, err
    rows = json.loads(out)
    assert rows[0]["timer"] == "trtexec" and rows[0]["n"] == 20 and rows[0]["trtexec_qps"] == 812.5
    assert rows[0]["profile"]["layers"][0]["name"] == "{ForeignNode[/layers.0/CoupledScan]}"
    assert rows[1]["skipped"] == "outside the engine profile (text)"
    call = log.read_text().split()
    assert f"--loadEngine={eng}" in call and f"--dynamicPlugins={plugin_lib.resolve()}" in call
    assert ("--shapes=text:2x8x12,audio:2x8x7,vision:2x8x5,text_lengths:2,audio_lengths:2,vision_lengths:2"
            in call and "--useCudaGraph" in call)
    assert "--iterations=20" in call and any(c.startswith("--exportProfile=") for c in call)
    rc, out, _ = cli(capsys, "profile", eng, "--batch", "2", "--length", "8", "--iters", "5")
    assert rc == 0 and "trtexec" in out and "slowest layers" in out
    monkeypatch.setenv("FAKE_TRTEXEC_FAIL", "1")
    rc, _, err = cli(capsys, "profile", eng, "--batch", "2", "--length", "8")
    assert rc == 2
    assert_one_line_error(err, "trtexec failed (exit 1): [E] Error[1]")
