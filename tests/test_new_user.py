"""What a new user hits after the README's two commands (issue 25): inputs as numpy makes them
(float64, int32 lengths) cast with one note or refused when a cast would change values; bfloat16
exports explained; re-export into a used folder; one lengths API over the PyTorch model, every
backend's run(lengths=), Stream.push and the CLI; engines without a GPU; --help of build/inspect;
parity of a streaming graph; exact-tolerance parity; TensorRT-RTX without --trt-module."""
from __future__ import annotations

import ctypes
import json
import shutil

import numpy as np
import pytest

from test_cli import assert_one_line_error, cli
from test_runtime import MODS, fake_trt, feeds_for, host_cuda, make_checkpoint, shared_artifacts  # noqa: F401

from cm_deploy.contract import BF16_RUNS_ON
from cm_deploy.errors import InputCastWarning, UserError
from cm_deploy.runtime import cuda as cu
from cm_deploy.runtime import specs as S
from cm_deploy.runtime import trt as T

LENGTHS = [S.TensorSpec(f"{n}_lengths", ("batch",), "int64") for n in MODS]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def _note_lines(err):
    return [ln for ln in err.splitlines() if ln.strip()]


# ---------------------------------------------------------------------------- 1. inputs as numpy makes them

def test_readme_recipe_float64_npz_runs_with_one_note(capsys, art, tmp_path):
    """numpy.random.randn gives float64 and numpy.savez keeps it: cast, the same outputs as float32."""
    rng = np.random.default_rng(0)
    t, a, v = rng.standard_normal((2, 6, 12)), rng.standard_normal((2, 4, 7)), rng.standard_normal((2, 3, 5))
    lt = np.array([6, 3], np.int32)                                 # int32 lengths, as np.array([6, 3]) on Windows
    np.savez(tmp_path / "x64.npz", text=t, audio=a, vision=v, text_lengths=lt)
    np.savez(tmp_path / "x32.npz", text=t.astype(np.float32), audio=a.astype(np.float32),
             vision=v.astype(np.float32), text_lengths=lt.astype(np.int64))
    for model in (art["portable"], art["a"]):
        rc, _, err = cli(capsys, "run", model, "--inputs", tmp_path / "x64.npz", "-o", tmp_path / "y64.npz")
        assert rc == 0, err
        note = _note_lines(err)
        assert len(note) == 1 and note[0].startswith("cm-deploy: note: ") and "Traceback" not in err
        assert "'text' float64 -> float32" in note[0] and "'text_lengths' int32 -> int64" in note[0]
        rc, _, err = cli(capsys, "run", model, "--inputs", tmp_path / "x32.npz", "-o", tmp_path / "y32.npz")
        assert rc == 0 and not err.strip(), err                     # nothing to cast: no note
        with np.load(tmp_path / "y64.npz") as y64, np.load(tmp_path / "y32.npz") as y32:
            assert np.array_equal(y64["output"], y32["output"])
        (tmp_path / "y64.npz").unlink()
        (tmp_path / "y32.npz").unlink()


@pytest.mark.parametrize("change, needle", [
    (dict(text_lengths=np.array([6, 2.5])), "'text_lengths' (float64) holds 2.5 at sample 1: not a whole number"),
    (dict(text_lengths=np.array([6, np.nan])), "holds nan at sample 1: not a whole number"),
    (dict(text_lengths=np.array([2**64 - 1, 3], np.uint64)), "holds 18446744073709551615 at sample 0, outside int64"),
    (dict(text=np.full((2, 6, 12), 1e300)), "'text' (float64) holds 144 value(s) beyond float32's range"),
])
def test_casts_that_would_change_values_are_refused(capsys, art, npz, change, needle):
    feeds = dict(feeds_for(), **change)
    for model in (art["portable"], art["a"]):
        rc, _, err = cli(capsys, "run", model, "--inputs", npz(**feeds))
        assert rc == 2
        assert_one_line_error(err, needle)


@pytest.fixture
def npz(tmp_path):
    def write(name="x.npz", **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return p
    return write


def test_cast_inputs_reference():
    """cast_inputs against numpy's own casts: float types to the graph's, lengths to int64, the
    overflow check limited to valid steps, device arrays and unchanged dtypes left alone."""
    specs16 = [S.TensorSpec(n, ("batch", f"L_{n}", f), "float16") for n, f in MODS.items()] + LENGTHS
    rng = np.random.default_rng(3)
    for dtype in (np.float64, np.float32):
        f = feeds_for(3, (5, 4, 2), seed=4, dtype=dtype)
        f["text"][1, 2:] = 7e4                     # beyond float16's 65504, but past sample 1's length
        f["text_lengths"] = np.array([5, 2, 5], np.int32)
        out, notes = S.cast_inputs("m", specs16, f)
        assert notes == [f"'{n}' {np.dtype(dtype).name} -> float16" for n in MODS] + ["'text_lengths' int32 -> int64"]
        for n in MODS:
            assert out[n].dtype == np.float16
            with np.errstate(over="ignore"):        # the 7e4 in the padding becomes inf, as it may
                np.testing.assert_array_equal(out[n], f[n].astype(np.float16))
        assert out["text_lengths"].dtype == np.int64 and out["text_lengths"].tolist() == [5, 2, 5]
        f["text_lengths"] = np.array([5, 3, 5])     # now a 7e4 is a valid step: refused, naming it
        with pytest.raises(UserError, match=r"'text' \(\w+\) holds \d+ value\(s\) beyond float16's range, "
                                            r"the first 70000 at \(1, 2, 0\)"):
            S.cast_inputs("m", specs16, f)
    bf16 = S.np_dtype("bfloat16")
    specs_bf = [S.TensorSpec("text", ("batch", "L", 12), "bfloat16")]
    x = rng.standard_normal((2, 3, 12), dtype=np.float32)
    out, notes = S.cast_inputs("m", specs_bf, {"text": x})
    assert notes == ["'text' float32 -> bfloat16"] and out["text"].dtype == bf16
    np.testing.assert_array_equal(out["text"], x.astype(bf16))
    with pytest.raises(UserError, match="beyond bfloat16's range"):
        S.cast_inputs("m", specs_bf, {"text": np.full((1, 1, 12), 3.4e38, np.float32)})
    same = feeds_for()
    out, notes = S.cast_inputs("m", specs16[:3], {k: v.astype(np.float16) for k, v in same.items()})
    assert notes == []
    out, notes = S.cast_inputs("m", LENGTHS, {"text_lengths": np.array([3.0, 0.0]), "audio_lengths": np.array([1, 2], np.uint8)})
    assert out["text_lengths"].tolist() == [3, 0] and out["audio_lengths"].dtype == np.int64 and len(notes) == 2


def test_python_api_warns_once_per_run(art):
    from cm_deploy.runtime import load
    with load(art["portable"], device="cpu") as m:
        want = m.run(feeds_for())["output"]
        with pytest.warns(InputCastWarning) as rec:
            got = m.run(dict(feeds_for(dtype=np.float64), audio_lengths=np.array([4, 2], np.int32)))["output"]
        assert len(rec) == 1 and "'audio_lengths' int32 -> int64" in str(rec[0].message)
        assert np.array_equal(got[0], want[0]) and not np.array_equal(got[1], want[1])


# ---------------------------------------------------------------------------- 2. bfloat16

def test_bfloat16_export_says_what_runs_it(capsys, art, tmp_path, npz):
    out = tmp_path / "bf"
    rc, stdout, err = cli(capsys, "export", art["a"], "-o", out, "--dtype", "bf16", "--quiet", "--batch", "2",
                          "--length", "5")      # fixed shapes: a faster export
    assert rc == 0, err
    assert f"note: {BF16_RUNS_ON}" in stdout and "TensorRT" in BF16_RUNS_ON and "CUDA provider" in BF16_RUNS_ON
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"
    import onnxruntime as ort
    try:
        ort.InferenceSession(str(out / "model.portable.onnx"), providers=["CPUExecutionProvider"])
    except Exception:
        pass
    else:
        pytest.skip(f"ONNX Runtime {ort.__version__} runs bfloat16 graphs on the CPU: BF16_RUNS_ON is out of date")
    x = npz(**feeds_for(2, (5, 5, 5)))
    for model in ("model.portable.onnx", "model.onnx"):
        rc, _, err = cli(capsys, "run", out / model, "--inputs", x, "--device", "cpu")
        assert rc == 2
        line = assert_one_line_error(err, "ONNX Runtime's CPU provider cannot run it: a bfloat16 graph runs on TensorRT")
        assert "Could not find an implementation" not in line
    rc, _, err = cli(capsys, "parity", art["a"], out / "model.portable.onnx", "--device", "cpu")
    assert rc == 2
    assert_one_line_error(err, BF16_RUNS_ON)
    rc, stdout, _ = cli(capsys, "inspect", out / "model.onnx")
    assert rc == 0 and BF16_RUNS_ON in stdout
    # without the manifest, the graph's own input types tell (the onnx package reads them)
    (out / "manifest.json").unlink()
    rc, _, err = cli(capsys, "run", out / "model.portable.onnx", "--inputs", x, "--device", "cpu")
    assert rc == 2
    assert_one_line_error(err, BF16_RUNS_ON)


def test_bfloat16_checkpoint_takes_float32_inputs(capsys, art, npz, tmp_path):
    """numpy cannot write bfloat16: float32 (and float64) inputs are cast, the same as bf16 ones."""
    f = feeds_for()
    rc, _, err = cli(capsys, "run", art["a"], "--dtype", "bf16", "--inputs", npz(**f), "-o", tmp_path / "y.npz")
    assert rc == 0, err
    assert "'text' float32 -> bfloat16" in assert_one_line_error(err)
    bf16 = S.np_dtype("bfloat16")
    rc, _, err = cli(capsys, "run", art["a"], "--dtype", "bf16", "--inputs",
                     npz("b.npz", **{k: v.astype(bf16) for k, v in f.items()}), "-o", tmp_path / "yb.npz")
    assert rc == 0 and not err.strip(), err
    with np.load(tmp_path / "y.npz") as y, np.load(tmp_path / "yb.npz") as yb:
        assert np.array_equal(y["output"], yb["output"])


# ---------------------------------------------------------------------------- 3. paths, help

def test_help_lists_exit_3_and_only_the_options_that_apply(capsys):
    rc, out, _ = cli(capsys, "--help")
    assert rc == 0 and "3 an internal error" in " ".join(out.split())
    run_only = ("--chunk", "--check-finite", "--backend", "--ort-ops")
    rc, out, _ = cli(capsys, "build", "--help")
    assert rc == 0 and "--plugin" in out and "--trt-module" in out
    assert not [o for o in run_only if o in out], out
    rc, out, _ = cli(capsys, "inspect", "--help")
    assert rc == 0 and not [o for o in run_only + ("--plugin", "--device", "--trt-module") if o in out], out
    for cmd in ("run", "parity", "profile"):
        rc, out, _ = cli(capsys, cmd, "--help")
        assert rc == 0 and all(o in out for o in run_only), (cmd, out)


def test_build_with_only_tensorrt_rtx_says_how(capsys, art, monkeypatch, tmp_path):
    monkeypatch.delenv(T.MODULE_ENV, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)      # `import tensorrt` fails
    T._modules.pop("tensorrt", None)
    monkeypatch.setattr(T, "_installed", lambda name: name == "tensorrt_rtx_bindings")
    rc, _, err = cli(capsys, "build", art["portable"], "-o", tmp_path / "m.engine")
    assert rc == 2
    assert_one_line_error(err, "but tensorrt_rtx_bindings is installed here: pass --trt-module tensorrt_rtx_bindings")
    assert not (tmp_path / "m.engine").exists()


def test_export_takes_the_precision_aliases_build_takes(capsys, art, monkeypatch, tmp_path):
    import cm_deploy.export as E
    seen = []

    def fake_export(ckpt, out, dtype, **kw):
        seen.append(dtype)
        return {"files": {}}
    monkeypatch.setattr(E, "export_checkpoint", fake_export)
    for alias, name in (("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32"), ("float16", "float16")):
        rc, _, err = cli(capsys, "export", art["a"], "-o", tmp_path / alias, "--dtype", alias)
        assert rc == 0, err
        assert seen[-1] == name


# ---------------------------------------------------------------------------- 4. stale files

def test_reexport_into_a_used_folder(capsys, art, tmp_path):
    d = tmp_path / "exp"
    shutil.copytree(art["export"], d)
    # the previous export had streaming graphs (its manifest lists them) ...
    m = json.loads((d / "manifest.json").read_text())
    m["files"].update({"stream_tensorrt": "model.stream.onnx", "stream_portable": "model.stream.portable.onnx"})
    (d / "manifest.json").write_text(json.dumps(m))
    for name in ("model.stream.onnx", "model.stream.portable.onnx"):
        (d / name).write_bytes(b"previous stream graph")
    # ... an engine built from its model.onnx (the sidecar says so), and files of the user's
    (d / "model.engine").write_bytes(b"plan")
    (d / "model.engine.json").write_text(json.dumps({"format": T.SIDECAR_FORMAT, "onnx": {
        "path": str((d / "model.onnx").resolve()), "sha256": T.sha256_file(d / "model.onnx")}}))
    (d / "notes.txt").write_text("mine")
    (d / "model.stream.onnx.keep").write_text("not listed by the manifest")
    rc, out, err = cli(capsys, "export", art["b"], "-o", d, "--quiet")
    assert rc == 0, err
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "model.engine", "model.engine.json",
                                                   "model.onnx", "model.portable.onnx", "model.stream.onnx.keep",
                                                   "notes.txt"]
    for name in ("model.stream.onnx", "model.stream.portable.onnx"):
        assert f"removed         {d / name} (the previous export's" in out
    assert f"note: {d / 'model.engine'} was built from the previous model.onnx: rebuild it" in out
    m = json.loads((d / "manifest.json").read_text())
    assert "_replaced" not in m and set(m["files"].values()) == {"model.onnx", "model.portable.onnx"}
    assert m["checkpoint"]["path"] == str(art["b"].resolve())
    assert (d / "notes.txt").read_text() == "mine" and (d / "model.engine").read_bytes() == b"plan"


@pytest.mark.parametrize("manifest", [
    {"format": "someone-else/1", "files": {"x": "model.stream.onnx"}},           # not a cm-deploy manifest
    {"format": "cm-deploy-manifest/1", "files": {"x": "../model.stream.onnx", "y": "notes.onnx",
                                                "z": "a.pt", "w": "/tmp/model.stream.onnx"}},   # not its files
    "not json",
])
def test_export_never_removes_what_the_manifest_does_not_own(tmp_path, manifest):
    """Only plain names of the contract's files, listed by a cm-deploy manifest, are removable."""
    from cm_deploy.export.exporter import _owned_by_previous_export, _replace_previous
    d = tmp_path / "exp"
    d.mkdir()
    (d / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    for name in ("model.stream.onnx", "notes.onnx", "a.pt"):
        (d / name).write_text("keep")
    (tmp_path / "model.stream.onnx").write_text("keep")
    owned = _owned_by_previous_export(d)
    assert owned == set()
    assert _replace_previous(d, owned, {"model.onnx"}) == {"removed": [], "stale_engines": []}
    assert all(p.read_text() == "keep" for p in (d / "model.stream.onnx", d / "notes.onnx", d / "a.pt",
                                                  tmp_path / "model.stream.onnx"))


# ---------------------------------------------------------------------------- 5. one lengths API

def _partial(batch=2):
    return {"audio": np.array([4, 1][:batch])}


@pytest.mark.parametrize("which", ["portable", "onnx", "a"])
def test_run_lengths_on_ort_and_torch(art, which):
    """run(x, lengths={...}) == run(x with <name>_lengths), missing modalities full, on every
    backend here, and what the PyTorch model gives under the same rule."""
    import torch

    from cm_deploy import load_checkpoint
    from cm_deploy.runtime import load
    from cm_deploy.runtime.native import find_library
    if which == "onnx" and find_library("ort", required=False) is None:
        pytest.skip("the CoupledScan op library is not built (scripts/build_plugin.sh): model.onnx cannot run")
    x = feeds_for(2, (6, 4, 3), seed=5)
    full = {f"{n}_lengths": np.full(2, x[n].shape[1], np.int64) for n in MODS}
    explicit = {**x, **full, "audio_lengths": np.array([4, 1])}
    with load(art[which], device="cpu") as m:
        y = m.run(x, lengths=_partial())["output"]
        np.testing.assert_array_equal(y, m.run(explicit)["output"])
        np.testing.assert_array_equal(m.run(x, lengths={"audio_lengths": np.array([4, 1])})["output"], y)
        assert not np.allclose(y[1], m.run(x)["output"][1])           # the lengths do reach the model
        with pytest.raises(UserError, match="'audio_lengths' given twice"):
            m.run(explicit, lengths=_partial())
    model = load_checkpoint(art["a"]).eval().set_scan_impl("reference")
    xt = {n: torch.from_numpy(v) for n, v in x.items()}
    with torch.no_grad():
        some = model(xt, lengths={"audio": torch.tensor([4, 1])})
        every = model(xt, lengths={**{n: torch.from_numpy(v) for n, v in zip(MODS, full.values())},
                                   "audio": torch.tensor([4, 1])})
    assert torch.equal(some, every)
    np.testing.assert_allclose(y, some.numpy(), rtol=1e-4, atol=1e-5)


def test_model_lengths_rule_in_step_and_refusals(art):
    import torch

    from cm_deploy import load_checkpoint
    model = load_checkpoint(art["a"]).eval()
    xt = {n: torch.from_numpy(v) for n, v in feeds_for(2, (3, 3, 3), seed=6).items()}
    with torch.no_grad():
        with pytest.raises(ValueError, match="unexpected \\['speech'\\]"):
            model(xt, lengths={"speech": torch.tensor([1, 1])})
        state = model.initial_state(2)
        y1, s1 = model.step(xt, state, lengths={"audio": torch.tensor([3, 1])})
        y2, s2 = model.step(xt, state, lengths={"text": torch.tensor([3, 3]), "audio": torch.tensor([3, 1]),
                                                "vision": torch.tensor([3, 3])})
    assert torch.equal(y1, y2) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_run_lengths_on_an_engine(fake_trt, host_cuda, tmp_path):
    from fake_tensorrt import fake_engine_bytes, host_kernel
    from test_runtime import _fake_io

    from cm_deploy.runtime.engine import Engine
    trt = fake_trt(kernel=host_kernel)
    io_ = _fake_io()
    io_[3:3] = [{"name": f"{n}_lengths", "shape": [-1], "dtype": "INT64", "mode": "INPUT",
                 "profile": [[1], [2], [4]]} for n in MODS]
    path = tmp_path / "m.engine"
    path.write_bytes(fake_engine_bytes(io_, trt.__version__))
    with Engine(path) as eng:
        x = feeds_for(2, (5, 4, 3), seed=1)
        full = {f"{n}_lengths": np.full(2, x[n].shape[1], np.int64) for n in MODS}

        def bound(name):      # what the engine reads for an input (emulated device memory is host memory)
            return np.ctypeslib.as_array((ctypes.c_int64 * 2).from_address(eng.last_bindings[name])).tolist()
        y = eng.run(x, lengths=_partial())["output"]
        assert bound("audio_lengths") == [4, 1] and bound("text_lengths") == [5, 5] and bound("vision_lengths") == [3, 3]
        np.testing.assert_array_equal(y, eng.run({**x, **full, "audio_lengths": np.array([4, 1])})["output"])
        assert bound("audio_lengths") == [4, 1]
        eng.run(x)
        assert bound("audio_lengths") == [4, 4]


def test_expected_inputs_mark_the_optional_ones(art):
    """(the streaming graph's state.*: tests/test_streaming.py)"""
    from cm_deploy.runtime import load
    with load(art["portable"], device="cpu") as m:
        f = feeds_for()
        f.pop("audio")
        with pytest.raises(UserError) as e:
            m.run(f)
        assert "(missing 'audio'); expected text, audio, vision (optional: text_lengths, audio_lengths, " \
               "vision_lengths)" in str(e.value)


# ---------------------------------------------------------------------------- 6. smaller

def test_engine_without_gpu_names_the_gpu(capsys, npz, tmp_path, monkeypatch):
    import torch
    why = cu.gpu_missing()
    if why is None and torch.version.cuda is None:
        pytest.skip("a GPU is here but torch is a CPU build: no reference for gpu_missing()")
    assert (why is None) == torch.cuda.is_available(), why        # the driver's answer is torch's
    e = tmp_path / "m.engine"
    e.write_bytes(b"plan")
    monkeypatch.setattr(cu, "gpu_missing", lambda: "no NVIDIA driver: libcuda.so.1 not found")
    for extra in ([], ["--trt-module", "tensorrt_rtx_bindings"]):
        rc, _, err = cli(capsys, "run", e, "--inputs", npz(**feeds_for()), *extra)
        assert rc == 2
        line = assert_one_line_error(err, "a TensorRT engine runs on an NVIDIA GPU, and there is none here "
                                          "(no NVIDIA driver: libcuda.so.1 not found)")
        assert "cuda-python" not in line and "inspect" in line


def test_parity_with_zero_tolerance_prints_no_nan(capsys, art):
    from cm_deploy.runtime.parity import compare
    r = np.array([0.0, 1.0, -2.0], np.float32)
    assert compare(r, r.copy(), 0.0, 0.0) == {"ok": True, "max_abs": 0.0, "max_rel": 0.0, "score": 0.0}
    c = compare(r, r + np.float32(1e-3), 0.0, 0.0)
    assert not c["ok"] and c["score"] == np.inf and c["max_rel"] == np.inf
    rc, out, _ = cli(capsys, "parity", art["a"], art["portable"], "--atol", "0", "--rtol", "0", "--json")
    assert rc in (0, 1) and "NaN" not in out
    rc, out, _ = cli(capsys, "parity", art["a"], art["portable"], "--atol", "0", "--rtol", "0")
    assert "nan" not in out.lower()
