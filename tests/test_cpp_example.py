"""examples/cpp: the C++ program that embeds inference without Python (cm_infer_ort, ONNX Runtime's
C++ API) against the Python runtime: model.portable.onnx, model.onnx with the op library, a
streaming graph fed in chunks, lengths, and one-line refusals with exit status 2.
cm_infer_trt (TensorRT's C++ API) is only compiled here: running it needs TensorRT and a GPU."""
import glob
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from test_runtime import feeds_for, shared_artifacts  # noqa: E402

from cm_deploy.runtime.native import find_library  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _binary():
    env = os.environ.get("CM_DEPLOY_CPP_EXAMPLE")
    if env:
        return Path(env)
    if (REPO / "cm_deploy" / "bin" / "cm_infer_ort").is_file():       # where scripts/build_plugin.sh installs it
        return REPO / "cm_deploy" / "bin" / "cm_infer_ort"
    hits = sorted(glob.glob(str(REPO / "build" / "*" / "examples" / "cpp" / "cm_infer_ort")), key=os.path.getmtime)
    return Path(hits[-1]) if hits else None


BIN = _binary()
ORT_LIB = next(iter(sorted(glob.glob(os.path.join(os.path.dirname(ort.__file__), "capi", "libonnxruntime.so*")))), None)
# CI sets CM_DEPLOY_CPP_EXAMPLE: then a missing binary fails instead of skipping
pytestmark = pytest.mark.skipif((BIN is None or ORT_LIB is None) and not os.environ.get("CM_DEPLOY_CPP_EXAMPLE"),
                                reason="examples/cpp is not built (scripts/build_plugin.sh) or this onnxruntime "
                                       "wheel has no libonnxruntime.so")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def run_cpp(*args, cwd=None):
    env = dict(os.environ, CM_DEPLOY_ORT_LIBRARY=ORT_LIB)
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def write_inputs(tmp_path, feeds):
    args = []
    for name, arr in feeds.items():
        p = tmp_path / f"{name}.npy"
        np.save(p, arr)
        args += ["--input", f"{name}={p}"]
    return args


def test_portable_onnx_equals_python(art, tmp_path):
    from cm_deploy.runtime import load
    feeds = feeds_for(3, (6, 4, 3), seed=2)
    feeds["audio_lengths"] = np.array([4, 2, 0], np.int64)            # padded samples
    out = tmp_path / "y.npy"
    r = run_cpp(art["portable"], *write_inputs(tmp_path, feeds), "-o", out)
    assert r.returncode == 0, r.stderr
    with load(art["portable"], device="cpu") as m:
        want = m.run(feeds)["output"]
    np.testing.assert_allclose(np.load(out), want, rtol=1e-5, atol=1e-6)
    assert r.stdout.startswith("output float32 (3, 1)")


def test_model_onnx_with_the_op_library(art, tmp_path):
    lib = find_library("ort", required=False)
    if lib is None:
        pytest.skip("the CoupledScan ONNX Runtime op library is not built")
    from cm_deploy.runtime import load
    feeds = feeds_for(2, (5, 7, 2), seed=3)
    out = tmp_path / "y.npy"
    r = run_cpp(art["onnx"], *write_inputs(tmp_path, feeds), "--ort-ops", lib, "-o", out)
    assert r.returncode == 0, r.stderr
    with load(art["portable"], device="cpu") as m:
        np.testing.assert_allclose(np.load(out), m.run(feeds)["output"], rtol=1e-5, atol=1e-6)
    r = run_cpp(art["onnx"], *write_inputs(tmp_path, feeds))             # without the library: one line
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "CoupledScan" in r.stderr


def test_streaming_in_chunks_equals_the_whole_sequence(tmp_path):
    import torch
    from test_streaming import _model
    from cm_deploy import save_checkpoint
    from cm_deploy.export import export_checkpoint
    model = _model("pad")
    ckpt = save_checkpoint(model, tmp_path / "s.pt")
    export_checkpoint(ckpt, tmp_path / "out", streaming=True)
    g = torch.Generator().manual_seed(0)
    xs = {"text": torch.randn(2, 9, 5, generator=g), "audio": torch.randn(2, 9, 3, generator=g)}
    lens = {"text": torch.tensor([9, 6]), "audio": torch.tensor([4, 9])}
    with torch.no_grad():
        whole = model.set_scan_impl("reference")(xs, lengths=lens).numpy()
    feeds = {k: v.numpy() for k, v in xs.items()} | {f"{k}_lengths": v.numpy() for k, v in lens.items()}
    args = write_inputs(tmp_path, feeds)
    for chunk in ("1", "4", "9"):
        out = tmp_path / f"y{chunk}.npy"
        r = run_cpp(tmp_path / "out" / "model.stream.portable.onnx", *args, "--chunk", chunk, "-o", out)
        assert r.returncode == 0, r.stderr
        np.testing.assert_allclose(np.load(out), whole, rtol=1e-4, atol=1e-5, err_msg=f"chunk {chunk}")


@pytest.mark.parametrize("change, needle", [
    (dict(audio_lengths=np.array([5, 1], np.int64)), "'audio_lengths' must hold valid lengths in [0, 4], got 5"),
    (dict(audio_lengths=np.array([-1, 1], np.int64)), "got -1 at sample 0"),
    (dict(audio_lengths=np.array([1, 1], np.int32)), "dtype .npy"),
    (dict(audio_lengths=np.array([1, 1, 1], np.int64)), "'audio_lengths' must be int64 (2,)"),
    (dict(text=np.zeros((2, 6, 11), np.float32)), "'text' axis 2 is 11, expected 12"),
    (dict(**{"state.count": np.zeros(2, np.float32)}), "no input 'state.count'"),
])
def test_bad_input_one_line_exit_2(art, tmp_path, change, needle):
    feeds = dict(feeds_for(2, (6, 4, 3)), **change)
    r = run_cpp(art["portable"], *write_inputs(tmp_path, feeds))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and (needle in lines[0] or (needle == "dtype .npy" and "dtype <i4" in lines[0])), lines


def test_usage_errors(art, tmp_path):
    args = write_inputs(tmp_path, feeds_for())
    r = run_cpp(art["portable"], *args, "-o", tmp_path / "text.npy")
    assert r.returncode == 2 and "would overwrite input text" in r.stderr
    r = run_cpp(art["portable"], *args, "--chunk", "2")
    assert r.returncode == 2 and "--chunk needs a streaming graph" in r.stderr
    r = run_cpp(art["portable"], "--input", "text")
    assert r.returncode == 2 and "--input takes NAME=FILE.npy" in r.stderr
    r = run_cpp(tmp_path / "none.onnx", *args)
    assert r.returncode == 2 and "ONNX Runtime cannot load it" in r.stderr
    # model.onnx without the op library: ORT's message, plus what to do (as the Python runtime says)
    r = run_cpp(art["onnx"], *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "not a registered function/op" in lines[0] and "pass --ort-ops" in lines[0] and "model.portable.onnx" in lines[0]
