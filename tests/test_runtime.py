"""cm_deploy.runtime: backends (ONNX Runtime and PyTorch for real), input checks, parity, profiling,
trtexec output parsing, the TensorRT builder and Engine over a stand-in tensorrt module, and the
real TensorRT path where TensorRT exists (skipped with the reason otherwise)."""
from __future__ import annotations

import contextlib
import ctypes
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

from fake_tensorrt import MAGIC, fake_engine_bytes, host_kernel, make_fake_trt  # noqa: E402

from cm_deploy.errors import InputCastWarning, UserError  # noqa: E402
from cm_deploy.runtime import cuda as cu  # noqa: E402
from cm_deploy.runtime import specs as S  # noqa: E402
from cm_deploy.runtime import native as N  # noqa: E402
from cm_deploy.runtime import trt as T  # noqa: E402

MODS = {"text": 12, "audio": 7, "vision": 5}
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- shared artifacts

def make_checkpoint(path, seed, modalities=None, **kw):
    import torch
    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    torch.manual_seed(seed)
    cfg = dict(modalities=dict(modalities or MODS), d_model=16, n_layers=2, d_state=4, d_conv=3)
    cfg.update(kw)
    return save_checkpoint(CoupledMamba(CoupledMambaConfig(**cfg)), path)


_SHARED: dict = {}


def shared_artifacts(tmp_path_factory) -> dict:
    """Two checkpoints of one config (a: seed 0, b: seed 1) and the real export of a, made ONCE per
    session through the CLI (`cm-deploy export`), for test_runtime.py and test_cli.py."""
    base = tmp_path_factory.getbasetemp() / "cm_runtime_shared"
    key = str(base)
    if key in _SHARED:
        return _SHARED[key]
    base.mkdir(parents=True, exist_ok=True)
    a = make_checkpoint(base / "a.pt", 0)
    b = make_checkpoint(base / "b.pt", 1)
    from cm_deploy.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["export", str(a), "-o", str(base / "a_export")])
    assert rc == 0, err.getvalue()
    art = {"dir": base, "a": a, "b": b, "export": base / "a_export", "onnx": base / "a_export" / "model.onnx",
           "portable": base / "a_export" / "model.portable.onnx", "export_stdout": out.getvalue(),
           "export_stderr": err.getvalue()}
    _SHARED[key] = art
    return art


@pytest.fixture(scope="session")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def feeds_for(batch=2, lengths=(6, 4, 3), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((batch, L, f)).astype(dtype) for (n, f), L in zip(MODS.items(), lengths)}


def one_line(msg: str):
    assert "\n" not in str(msg) and str(msg).strip(), repr(msg)


# ---------------------------------------------------------------------------- import without torch

def test_runtime_and_cli_import_and_run_without_torch(art):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None          # every `import torch` now fails
        import numpy as np
        import cm_deploy.runtime, cm_deploy.cli
        from cm_deploy.runtime import load
        m = load({str(art["portable"])!r}, device="cpu")
        rng = np.random.default_rng(0)
        y = m.run({{n: rng.standard_normal((2, 5, f), dtype=np.float32) for n, f in {MODS!r}.items()}})
        assert y["output"].shape == (2, 1), y
        from cm_deploy.cli import main
        assert main(["--help"]) == 0
        assert main(["inspect", {str(art["portable"])!r}]) == 0
        assert main(["run", {str(art["a"])!r}, "--inputs", "nope.npz"]) == 2
        assert main(["export", {str(art["a"])!r}]) == 2        # needs torch: one clear line
        loaded = [k for k, v in sys.modules.items() if k.split(".")[0] == "torch" and v is not None]
        assert not loaded, loaded
        print("TORCH-FREE-OK")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TORCH-FREE-OK" in p.stdout
    assert "Usage: cm-deploy" in p.stdout
    errs = [ln for ln in p.stderr.splitlines() if ln.startswith("cm-deploy")]
    assert any("PyTorch" in ln for ln in errs), p.stderr
    assert "Traceback" not in p.stderr


def test_console_script_help():
    exe = Path(sys.executable).with_name("cm-deploy")
    if not exe.exists():
        pytest.skip("the cm-deploy console script is not installed in this environment (pip install -e .)")
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "parity" in p.stdout


# ---------------------------------------------------------------------------- specs and checks

SPECS = [S.TensorSpec(n, ("batch", f"L_{n}", f), "float32") for n, f in MODS.items()]
# every model's inputs: the modalities, then their per-sample valid lengths
MODEL_SPECS = SPECS + [S.TensorSpec(f"{n}_lengths", ("batch",), "int64") for n in MODS]


def test_lengths_are_filled_and_checked():
    f = feeds_for(2, (6, 4, 3))
    filled = S.fill_defaults(MODEL_SPECS, f)
    assert [filled[f"{n}_lengths"].tolist() for n in MODS] == [[6, 6], [4, 4], [3, 3]]
    assert filled["text_lengths"].dtype == np.int64
    given = dict(f, audio_lengths=np.array([1, 0]))
    assert S.fill_defaults(MODEL_SPECS, given)["audio_lengths"].tolist() == [1, 0]
    infos = S.check_feeds("m", MODEL_SPECS, S.fill_defaults(MODEL_SPECS, given))
    S.check_lengths("m", MODEL_SPECS, S.fill_defaults(MODEL_SPECS, given), infos)
    for bad, needle in ((np.array([5, 1]), "got 5 at sample 0"), (np.array([1, -2]), "got -2 at sample 1")):
        feeds = S.fill_defaults(MODEL_SPECS, dict(f, audio_lengths=bad))
        with pytest.raises(UserError, match=r"'audio_lengths' must hold valid lengths in \[0, 4\]") as e:
            S.check_lengths("m", MODEL_SPECS, feeds, S.check_feeds("m", MODEL_SPECS, feeds))
        one_line(e.value)
        assert needle in str(e.value)
    with pytest.raises(UserError, match="'text_lengths' has dtype float32, expected int64"):
        S.check_feeds("m", MODEL_SPECS, S.fill_defaults(MODEL_SPECS, dict(f, text_lengths=np.ones(2, np.float32))))
    with pytest.raises(UserError, match="'text_lengths' has rank 2"):
        S.check_feeds("m", MODEL_SPECS, S.fill_defaults(MODEL_SPECS, dict(f, text_lengths=np.ones((2, 1), np.int64))))


@pytest.mark.parametrize("mutate,needle", [
    (lambda f: f.pop("audio"), "missing 'audio'"),
    (lambda f: f.update(extra=np.zeros((2, 3, 1), np.float32)), "unexpected 'extra'"),
    (lambda f: f.update(text=f["text"][0]), "rank 2"),
    (lambda f: f.update(text=f["text"].astype(np.float64)), "dtype float64, expected float32"),
    (lambda f: f.update(text=np.zeros((2, 6, 11), np.float32)), "axis 2 is 11, expected 12"),
    (lambda f: f.update(audio=np.zeros((3, 4, 7), np.float32)), "dimension 'batch' is 2"),
])
def test_check_feeds_errors(mutate, needle):
    f = feeds_for()
    mutate(f)
    with pytest.raises(UserError) as e:
        S.check_feeds("m", SPECS, f)
    one_line(e.value)
    assert needle in str(e.value)


def test_check_feeds_profile_ranges():
    ranges = {n: [(1, 4), (2, 8), (f, f)] for n, f in MODS.items()}
    S.check_feeds("m", SPECS, feeds_for(lengths=(2, 8, 5)), ranges)
    with pytest.raises(UserError, match=r"axis 1 \(L_text\) is 9, outside the engine's profile \[2, 8\]"):
        S.check_feeds("m", SPECS, feeds_for(lengths=(9, 4, 3)), ranges)
    with pytest.raises(UserError, match="must be a dict"):
        S.check_feeds("m", SPECS, [1, 2])


class HostCAI:
    """A host numpy array dressed as a CUDA array (__cuda_array_interface__ v3), for CPU tests."""

    def __init__(self, arr, stream=None, strides=None, typestr=None):
        self.arr = arr
        self.__cuda_array_interface__ = {"shape": arr.shape, "typestr": typestr or arr.dtype.str,
                                         "data": (arr.ctypes.data, False), "version": 3,
                                         "strides": strides, "stream": stream}


def test_cai_info_and_checks():
    x = np.zeros((2, 6, 12), np.float32)
    info = S.cai_info(HostCAI(x, stream=5))
    assert (info.ptr, info.shape, info.dtype, info.stream, info.on_device) == (x.ctypes.data, (2, 6, 12), "float32", 5, True)
    f = feeds_for()
    f["text"] = HostCAI(f["text"], strides=(288, 4, 24))        # transposed view: not C-contiguous
    with pytest.raises(UserError, match="not C-contiguous"):
        S.check_feeds("m", SPECS, f)
    # bfloat16 inputs accept 2-byte CUDA views (torch cannot describe bf16 through the interface)
    bf = [S.TensorSpec("x", ("batch", 3), "bfloat16")]
    S.check_feeds("m", bf, {"x": HostCAI(np.zeros((2, 3), np.int16))})
    with pytest.raises(UserError, match="unsupported CUDA array typestr"):
        S.cai_info(HostCAI(x, typestr="<c8"))

    class Broken:
        @property
        def __cuda_array_interface__(self):
            raise TypeError("dtype bfloat16 is not supported")

    with pytest.raises(UserError, match="no usable __cuda_array_interface__"):
        S.cai_info(Broken())


def test_device_array_interface_without_gpu():
    a = cu.DeviceArray(0x7000, (2, 3), "float16")
    cai = a.__cuda_array_interface__
    assert cai == {"shape": (2, 3), "typestr": "<f2", "data": (0x7000, False), "version": 3, "strides": None,
                   "stream": None}
    assert S.cai_info(a).dtype == "float16" and a.nbytes == 12
    assert cu.DeviceArray(1, (2,), "bfloat16").__cuda_array_interface__["typestr"] == "<V2"


@pytest.mark.skipif(cu.device_count() == 0, reason="no CUDA device: cuda-python allocations need a GPU")
def test_device_buffers_on_gpu():
    x = np.arange(30, dtype=np.float32).reshape(5, 6)
    d = cu.DeviceArray.from_host(x)
    assert np.array_equal(d.to_host(), x)


def test_shape_grid_and_length_options():
    assert S.parse_length_options(["8,16", "text=4"]) == [8, 16, {"text": 4}]
    grid = S.shape_grid(SPECS, [1, 2], [8, {"text": 4}])
    assert [(c.batch, c.lengths) for c in grid][:2] == [(1, {"text": 8, "audio": 8, "vision": 8}),
                                                        (1, {"text": 4, "audio": 8, "vision": 8})]
    assert len(grid) == 4
    with pytest.raises(UserError, match="no input named 'speech'"):
        S.shape_grid(SPECS, [1], [{"speech": 3}])
    with pytest.raises(UserError, match="positive integers"):
        S.parse_int_list("0,2", "--batch")


# ---------------------------------------------------------------------------- dispatch and backends

def test_load_dispatch_errors(tmp_path, art, monkeypatch):
    from cm_deploy.runtime import load, model_kind
    assert model_kind("x.plan") == model_kind("x.trt") == model_kind("m.engine") == "tensorrt"
    assert model_kind("m.onnx") == "onnx" and model_kind("c.pt") == "torch"
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="cannot tell the model kind"):
        load(tmp_path / "m.bin")
    with pytest.raises(UserError, match="model not found"):
        load(tmp_path / "none.onnx")
    # model.onnx without the op library: how to get it, or the portable file
    monkeypatch.delenv(N.LIBRARIES["ort"].env, raising=False)
    monkeypatch.setattr(N, "candidates", lambda kind: [])
    with pytest.raises(UserError, match="holds CoupledScan nodes.*--ort-ops.*model.portable.onnx") as e:
        load(art["onnx"], device="cpu")
    one_line(e.value)
    with pytest.raises(UserError, match="cannot run on backend 'torch'"):
        load(art["onnx"], backend="torch")
    with pytest.raises(UserError, match="unknown backend 'tvm'"):
        load(art["onnx"], backend="tvm")
    (tmp_path / "bad.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(UserError, match="ONNX Runtime cannot load it") as e:
        load(tmp_path / "bad.onnx")
    one_line(e.value)
    # the portable file never looks for the library unless asked: a stale $CM_DEPLOY_ORT_OP_LIBRARY is
    # no obstacle (and it is not the file's business), while asking for it without one found is an error
    monkeypatch.setenv(N.LIBRARIES["ort"].env, str(tmp_path / "gone.so"))
    with load(art["portable"], device="cpu") as m:
        assert m.ort_ops is None and m.name == "onnxruntime[CPU,function]:model.portable.onnx"
    with pytest.raises(UserError, match="op library not found"):
        load(art["portable"], device="cpu", ort_ops=True)
    with pytest.raises(UserError, match="holds CoupledScan nodes"):
        load(art["onnx"], device="cpu", ort_ops=False)


def test_ort_backend_specs_run_and_parity(art):
    from cm_deploy.runtime import load
    from cm_deploy.runtime.parity import default_shapes, run_parity
    from cm_deploy.runtime.torch_backend import TorchBackend
    with load(art["portable"], device="cpu") as m:
        assert m.kind == "onnxruntime" and m.precision == "float32"
        assert m.inputs == MODEL_SPECS
        assert m.outputs[0].name == "output" and m.config["d_model"] == 16
        y = m.run(feeds_for())["output"]
        assert y.shape == (2, 1) and y.dtype == np.float32
        with pytest.warns(InputCastWarning, match="'text' float64 -> float32"):     # cast, said once
            assert np.array_equal(m.run(feeds_for(dtype=np.float64))["output"], y)
        with pytest.raises(UserError, match="dtype int32, expected float32"):
            m.run({k: v.astype(np.int32) for k, v in feeds_for().items()})
        with pytest.raises(UserError, match="needs the CUDA provider"):
            m.run({**feeds_for(), "text": HostCAI(feeds_for()["text"])})
        ref = TorchBackend(art["a"], device="cpu", scan_impl="reference")
        rep = run_parity(ref, m, default_shapes([m]))
        assert rep["ok"], rep
        assert len(rep["cases"]) == 3 and max(o["max_abs"] for c in rep["cases"] for o in c["outputs"]) < 1e-5


def test_ort_graph_captures_per_shape_on_the_cpu(art):
    """The CUDA-graph bookkeeping of the ORT backend (one gpu_graph_id per input shape and bound
    OrtValue set, buffers the inputs are copied into, outputs at fixed addresses, at most
    graph_max_shapes captures and uncaptured runs past them), run on the CPU provider, where ORT
    ignores the graph id: every result equals the plain run's. tests/gpu checks the capture."""
    from cm_deploy.runtime import load
    with load(art["portable"], device="cpu") as plain, load(art["portable"], device="cpu") as m:
        m.cuda_graph, m.graph_max_shapes = True, 2      # what cuda_graph=True selects, minus the provider option
        shapes = [(2, (6, 4, 3)), (1, (5, 5, 5)), (2, (6, 4, 3)), (3, (2, 7, 1)), (1, (5, 5, 5)), (2, (6, 4, 3))]
        seen, addresses = set(), {}
        for i, (b, lens) in enumerate(shapes):
            feeds = feeds_for(b, lens, seed=i)
            want = plain.run(feeds)["output"]
            got = m.run(feeds, device_outputs=True)["output"]
            np.testing.assert_array_equal(got.numpy(), want)
            # after a shape's first run (which tells the output shapes), its capture writes the
            # output in one place
            if (b, lens) in seen and (b, lens) != (3, (2, 7, 1)):
                assert addresses.setdefault((b, lens), got.data_ptr()) == got.data_ptr()
            seen.add((b, lens))
        assert len(addresses) == 2
        assert m.captured_shapes == 2               # (3, ...) came third: run uncaptured
        # out=: the output goes where the caller says, and that address is part of the capture's key
        outs = m.device_values({"output": np.zeros((2, 1), np.float32)})
        feeds = feeds_for(2, (6, 4, 3), seed=9)
        assert m.run(feeds, out=outs)["output"] == pytest.approx(plain.run(feeds)["output"])
        np.testing.assert_array_equal(outs["output"].numpy(), plain.run(feeds)["output"])
        with pytest.raises(UserError, match="unknown output"):
            m.run(feeds, out={"nope": outs["output"]})


def test_ort_graph_output_shapes_from_input_symbols():
    """A capture's output buffers are sized from the inputs' symbols when every output dim is one."""
    from cm_deploy.runtime.ort_backend import output_shapes
    ins = [S.TensorSpec("x", ("batch", "T", 5), "float32"), S.TensorSpec("state.a", ("batch", 4), "float32")]
    infos = {"x": S.array_info(np.zeros((3, 7, 5), np.float32)), "state.a": S.array_info(np.zeros((3, 4), np.float32))}
    outs = [S.TensorSpec("output", ("batch", 1), "float32"), S.TensorSpec("next_state.a", ("batch", 4), "float32")]
    assert output_shapes(ins, outs, infos) == {"output": [3, 1], "next_state.a": [3, 4]}
    assert output_shapes(ins, [S.TensorSpec("y", ("unk__1", 1), "float32")], infos) is None
    assert output_shapes(ins, [S.TensorSpec("y", (None, 1), "float32")], infos) is None


def test_torch_backend_precisions_and_errors(art):
    from cm_deploy.runtime.parity import run_parity, tolerance
    from cm_deploy.runtime.specs import ShapeChoice
    from cm_deploy.runtime.torch_backend import TorchBackend
    ref = TorchBackend(art["a"], device="cpu", scan_impl="reference")
    assert ref.inputs == MODEL_SPECS and ref.outputs[0].shape == ("batch", 1)
    cases = [ShapeChoice(2, {"text": 9, "audio": 5, "vision": 3})]
    for dt in ("float16", "bfloat16"):
        m = TorchBackend(art["a"], device="cpu", dtype=dt)
        assert m.inputs[0].dtype == dt and m.precision == dt
        rep = run_parity(ref, m, cases)
        assert rep["ok"] and (rep["atol"], rep["rtol"]) == tolerance(dt), rep
        assert m.run(S.random_feeds(m.inputs, cases[0]))["output"].dtype == S.np_dtype(dt)
    other = TorchBackend(art["b"], device="cpu")
    assert not run_parity(ref, other, cases)["ok"]          # different weights: out of tolerance
    # chunked inference: the same outputs with a padded batch (lengths), chunks shorter than L
    feeds = S.random_feeds(ref.inputs, cases[0])
    feeds["text_lengths"] = np.array([9, 4], np.int64)
    want = ref.run(feeds)["output"]
    for chunk in (1, 4, 100):
        got = TorchBackend(art["a"], device="cpu", scan_impl="reference", chunk=chunk).run(feeds)["output"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="chunk must be a positive"):
        TorchBackend(art["a"], chunk=0)
    with pytest.raises(UserError, match="unknown device"):
        TorchBackend(art["a"], device="tpu")
    with pytest.raises(UserError, match="unknown precision"):
        TorchBackend(art["a"], dtype="int8")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="no CUDA device: the torch backend's device-input path needs a GPU")
def test_torch_backend_cuda_inputs_zero_copy(art):
    import torch
    from cm_deploy.runtime.torch_backend import TorchBackend
    b = TorchBackend(art["a"], device="cuda")
    host = feeds_for()
    dev = {k: torch.from_numpy(v).cuda() for k, v in host.items()}
    out = b.run(dev, device_outputs=True)["output"]
    assert b.last_input_pointers == {k: v.data_ptr() for k, v in dev.items()}
    assert out.is_cuda and np.allclose(out.cpu().numpy(), b.run(host)["output"], atol=1e-5)


# ---------------------------------------------------------------------------- parity maths and shapes

def test_compare_metrics():
    from cm_deploy.runtime.parity import compare
    ref = np.array([1.0, -2.0, 0.0], np.float32)
    c = compare(ref, ref + np.array([1e-5, 0, 1e-5], np.float32), 1e-4, 1e-4)
    assert c["ok"] and c["max_abs"] == pytest.approx(1e-5, rel=1e-2) and c["score"] < 1
    bad = compare(ref, ref + np.array([0, 0.01, 0], np.float32), 1e-4, 1e-4)
    assert not bad["ok"] and bad["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert bad["max_rel"] == pytest.approx(0.005, rel=1e-3)
    assert bad["score"] == pytest.approx(0.01 / (1e-4 + 2e-4), rel=1e-3)
    nan = compare(ref, np.array([1.0, np.nan, 0.0]), 1e-4, 1e-4)
    assert not nan["ok"] and "non-finite" in nan["error"]
    assert not compare(ref, ref[:2], 1e-4, 1e-4)["ok"]


def test_default_shapes_respect_profiles():
    from cm_deploy.runtime.parity import default_shapes

    class B:
        inputs = SPECS

        def input_ranges(self):
            return {n: [(2, 4, 16), (3, 32, 200), (f, f, f)] for n, f in MODS.items()}

    shapes = default_shapes([B()])
    assert shapes[0].batch == 2 and set(shapes[0].lengths.values()) == {3}
    for c in shapes:
        assert 2 <= c.batch <= 4 and all(3 <= v <= 64 for v in c.lengths.values())
    assert any(len(set(c.lengths.values())) > 1 for c in shapes)       # one ragged case


# ---------------------------------------------------------------------------- profiling and trtexec

def test_parse_export_times_fixture():
    from cm_deploy.runtime.profiling import parse_export_times
    raw = json.loads((FIXTURES / "trtexec_times.json").read_text())
    st = parse_export_times(FIXTURES / "trtexec_times.json", batch=4)
    lat = np.array([e["latencyMs"] for e in raw])
    assert st["n"] == 20 and st["timer"] == "trtexec"
    assert st["p50_ms"] == pytest.approx(np.percentile(lat, 50)) and st["p99_ms"] == pytest.approx(np.percentile(lat, 99))
    assert st["gpu_compute"]["p50_ms"] == pytest.approx(np.percentile([1.0 + 0.01 * i for i in range(20)], 50))
    span = raw[-1]["endD2hMs"] - raw[0]["startH2dMs"]
    assert st["throughput"] == pytest.approx(4 * 20 * 1000 / span)
    old = parse_export_times(FIXTURES / "trtexec_times_trt8.json")
    assert old["p50_ms"] == pytest.approx(np.percentile(lat, 50))
    # latency from the parts when latencyMs is absent
    parts = [{k: v for k, v in e.items() if k != "latencyMs"} for e in raw]
    assert parse_export_times(parts)["mean_ms"] == pytest.approx(lat.mean())
    with pytest.raises(UserError):
        parse_export_times({"not": "a list"})


def test_parse_export_profile_fixtures():
    from cm_deploy.runtime.profiling import parse_export_profile
    p = parse_export_profile(FIXTURES / "trtexec_profile.json")
    assert p["count"] == 100 and p["layers"][0]["name"] == "{ForeignNode[/layers.0/CoupledScan]}"
    assert p["layers"][0]["average_ms"] == pytest.approx(0.6) and p["layers"][0]["median_ms"] == pytest.approx(0.588)
    assert p["total_ms"] == pytest.approx(1.0) and [r["percentage"] for r in p["layers"]] == [60, 20, 15, 5]
    q = parse_export_profile(FIXTURES / "trtexec_profile_quirks.json")
    assert q["count"] == 10 and q["layers"][0]["name"] == 'CoupledScan_0 "plugin"'
    assert q["layers"][0]["percentage"] is None


def test_trtexec_command_and_builtin_timer(art, tmp_path):
    from cm_deploy.runtime import load
    from cm_deploy.runtime.profiling import latency_stats, plot, time_backend, trtexec_command
    cmd = trtexec_command("trtexec", "m.engine", "/p/lib.so", {"text": (2, 16, 12), "audio": (2, 16, 7)},
                          "t.json", "p.json", iterations=50, warmup_ms=100, cuda_graph=True)
    assert cmd[:4] == ["trtexec", "--loadEngine=m.engine", "--dynamicPlugins=/p/lib.so",
                       "--shapes=text:2x16x12,audio:2x16x7"]
    assert {"--iterations=50", "--warmUp=100", "--exportTimes=t.json", "--exportProfile=p.json",
            "--separateProfileRun", "--useCudaGraph", "--duration=0"} <= set(cmd)
    st = latency_stats([1, 2, 3, 4], batch=2)
    assert st["p50_ms"] == 2.5 and st["throughput"] == pytest.approx(2 * 1000 / 2.5)
    with load(art["portable"], device="cpu") as m:
        r = time_backend(m, feeds_for(), warmup=1, iters=3)
    assert r["n"] == 3 and r["timer"] == "builtin" and r["p50_ms"] > 0
    png = plot([dict(r, model="a", batch=1), dict(r, model="a", batch=2)], tmp_path / "lat.png", x="batch")
    assert png.stat().st_size > 1000


# ---------------------------------------------------------------------------- plugin search

def test_find_plugin(tmp_path, monkeypatch):
    monkeypatch.delenv(T.PLUGIN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(N, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(N, "_PACKAGE_LIB", tmp_path / "no-lib")
    with pytest.raises(UserError, match="pass --plugin PATH or set CM_DEPLOY_PLUGIN") as e:
        T.find_plugin()
    one_line(e.value)
    assert T.find_plugin(required=False) is None
    with pytest.raises(UserError, match="plugin library not found: /nope.so"):
        T.find_plugin("/nope.so")
    monkeypatch.setenv(T.PLUGIN_ENV, "/env/nope.so")
    with pytest.raises(UserError, match=r"from \$CM_DEPLOY_PLUGIN"):
        T.find_plugin()
    monkeypatch.delenv(T.PLUGIN_ENV)
    lib = tmp_path / "build" / "ci" / "plugins" / "trt_coupled_scan" / "libcoupled_scan_plugin.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"ELF")
    assert T.find_plugin() == lib.resolve()
    rec = tmp_path / "recorded.so"
    rec.write_bytes(b"ELF")
    assert T.find_plugin(recorded=rec) == rec.resolve()
    monkeypatch.setenv(T.PLUGIN_ENV, str(rec))
    assert T.find_plugin(recorded="/gone.so") == rec.resolve()


# ---------------------------------------------------------------------------- builder and Engine over a stand-in TensorRT

H100 = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "total_memory": 80 << 30}


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    """The stand-in `tensorrt` module, an H100 as the current device, no real plugin search."""
    def install(**kw):
        mod = make_fake_trt(**kw)
        monkeypatch.setitem(sys.modules, kw.get("name", "tensorrt"), mod)
        T._modules.clear()
        T._loaded_plugins.clear()
        return mod
    monkeypatch.setattr(cu, "gpu_missing", lambda: None)
    monkeypatch.setattr(cu, "set_device", lambda i: None)
    monkeypatch.setattr(cu, "current_device", lambda: 0)
    monkeypatch.setattr(cu, "device_info", lambda i=None: dict(H100))
    monkeypatch.delenv(T.PLUGIN_ENV, raising=False)
    monkeypatch.delenv(T.MODULE_ENV, raising=False)
    monkeypatch.setattr(N, "_REPO_ROOT", tmp_path / "no-repo")
    monkeypatch.setattr(N, "_PACKAGE_LIB", tmp_path / "no-lib")
    monkeypatch.chdir(tmp_path)
    yield install
    T._modules.clear()
    T._loaded_plugins.clear()


@pytest.fixture
def plugin_lib(tmp_path):
    p = tmp_path / "libcoupled_scan_plugin.so"
    p.write_bytes(b"\x7fELF stand-in")
    return p


def test_build_engine_strongly_typed(fake_trt, art, plugin_lib, tmp_path, capsys):
    from cm_deploy.runtime.builder import build_engine
    trt = fake_trt()
    out = tmp_path / "e" / "model.engine"
    sc = build_engine(art["onnx"], out, plugin=plugin_lib, timing_cache=tmp_path / "tc.bin")
    assert out.read_bytes().startswith(MAGIC)
    side = json.loads((tmp_path / "e" / "model.engine.json").read_text())
    assert side == {k: v for k, v in sc.items() if k != "engine"} | {"engine": {k: v for k, v in sc["engine"].items()
                                                                                 if k != "path"}}
    assert side["format"] == T.SIDECAR_FORMAT and side["precision"] == "float32" and side["typing"] == "strong"
    assert side["tensorrt"] == {"module": "tensorrt", "version": "10.8.0"} and side["device"] == H100
    assert side["plugin"]["sha256"] == T.sha256_file(plugin_lib) and side["plugin"]["creator_found"]
    assert side["tf32"] is False and side["manifest"]["checkpoint"]["path"] == str(art["a"])
    assert side["profiles"][0]["text"] == {"min": [1, 1, 12], "opt": [8, 128, 12], "max": [32, 1024, 12]}
    assert side["inputs"][0] == {"name": "text", "shape": ["batch", "L_text", 12], "dtype": "float32"}
    assert ("build", {"flags": [], "strong": True, "pools": 0}) in trt.calls
    assert (tmp_path / "tc.bin").read_bytes() == b"FAKECACHE+"
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)
    err = capsys.readouterr().err
    assert "[build] Building engine (2 steps)" in err and "[build]   Tactic selection" in err
    # the timing cache is loaded next time (and saved again)
    build_engine(art["onnx"], out, plugin=plugin_lib, timing_cache=tmp_path / "tc.bin", progress=False)
    assert (tmp_path / "tc.bin").read_bytes() == b"FAKECACHE++"
    assert "[build]" not in capsys.readouterr().err


def test_build_engine_profiles_and_precision(fake_trt, art, plugin_lib, tmp_path):
    from cm_deploy.runtime.builder import build_engine, parse_range, resolve_profile
    trt = fake_trt()
    sc = build_engine(art["onnx"], tmp_path / "h.engine", plugin=plugin_lib, precision="fp16", batch="4",
                      length=(2, 16, 64), lengths={"vision": (1, 8, 8)}, workspace_mb=64)
    assert sc["precision"] == "float16" and sc["typing"] == "weak"
    assert trt.calls[-1] == ("build", {"flags": ["FP16"], "strong": False, "pools": 1})
    p = sc["profiles"][0]
    assert p["text"] == {"min": [4, 2, 12], "opt": [4, 16, 12], "max": [4, 64, 12]}
    assert p["vision"]["max"] == [4, 8, 5]
    assert parse_range("1:2:3", "b") == (1, 2, 3)
    for bad in ("3:2:1", "0", "1:2", "a"):
        with pytest.raises(UserError):
            parse_range(bad, "b")
    with pytest.raises(UserError, match="no network input named 'speech'"):
        resolve_profile([("text", (-1, -1, 12))], lengths={"speech": 3})
    with pytest.raises(UserError, match="neither batch nor length"):
        resolve_profile([("x", (-1, -1, -1))])
    assert resolve_profile([("x", (1, -1))], batch=(2, 2, 2))["x"] == ((1, 1), (1, 128), (1, 1024))


def test_build_engine_errors(fake_trt, art, plugin_lib, tmp_path):
    from cm_deploy.runtime.builder import build_engine
    fake_trt(flavour="rtx", version="1.7.1.116")          # strongly typed only, like TensorRT-RTX / TensorRT 11
    with pytest.raises(UserError, match="strongly typed networks only: re-export with --dtype float16"):
        build_engine(art["onnx"], tmp_path / "x.engine", plugin=plugin_lib, precision="float16")
    with pytest.raises(UserError, match="CoupledScan plugin library not found"):
        build_engine(art["onnx"], tmp_path / "x.engine")
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"BAD!")
    with pytest.raises(UserError, match="cannot load plugin library"):
        build_engine(art["onnx"], tmp_path / "x.engine", plugin=bad)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    with pytest.raises(UserError, match="TensorRT cannot parse"):
        build_engine(junk, tmp_path / "x.engine", plugin=plugin_lib)
    # the portable graph needs no plugin (its CoupledScan is a model-local function)
    sc = build_engine(art["portable"], tmp_path / "p.engine")
    assert sc["plugin"] is None and sc["tensorrt"]["module"] == "tensorrt"
    # an export folder resolves to its TensorRT file
    sc = build_engine(art["export"], tmp_path / "d.engine", plugin=plugin_lib)
    assert sc["onnx"]["path"] == str(art["onnx"].resolve())
    with pytest.raises(UserError, match="is not importable"):
        build_engine(art["portable"], tmp_path / "p.engine", trt_module="tensorrt_nope")


class _HostStream:
    handle = 4242

    def __init__(self, handle=None):
        self.waited = []

    def synchronize(self):
        pass

    def wait_for(self, producer):
        if producer is not None:
            self.waited.append(producer)

    def close(self):
        pass


class _HostBuffer:
    def __init__(self, nbytes=0):
        self.ptr, self.nbytes, self._mem = 0, 0, None
        if nbytes:
            self.ensure(nbytes)

    def ensure(self, nbytes):
        if nbytes > self.nbytes:
            self._mem = np.zeros(max(nbytes, 1), np.uint8)
            self.ptr, self.nbytes = self._mem.ctypes.data, nbytes
        return self.ptr

    def free(self):
        self.ptr, self.nbytes, self._mem = 0, 0, None

    close = free


class _HostGraph:
    """Capture records the enqueue without running it; launch runs it (what a CUDA graph does)."""

    def capture(self, stream, fn):
        self.fn = fn
        return self

    def launch(self, stream):
        self.fn()

    def close(self):
        pass


@pytest.fixture
def host_cuda(monkeypatch):
    """Device memory emulated with host memory, so Engine.run's own logic runs on the CPU."""
    monkeypatch.setattr(cu, "Stream", _HostStream)
    monkeypatch.setattr(cu, "DeviceBuffer", _HostBuffer)
    monkeypatch.setattr(cu, "CudaGraph", _HostGraph)
    monkeypatch.setattr(cu, "copy_htod", lambda dst, host, stream=None: ctypes.memmove(dst, host.ctypes.data, host.nbytes))
    monkeypatch.setattr(cu, "copy_dtoh", lambda host, src, stream=None: ctypes.memmove(host.ctypes.data, src, host.nbytes))


def _fake_io():
    io_ = [{"name": n, "shape": [-1, -1, f], "dtype": "FLOAT", "mode": "INPUT",
            "profile": [[1, 1, f], [2, 8, f], [4, 16, f]]} for n, f in MODS.items()]
    return io_ + [{"name": "output", "shape": [-1, 3], "dtype": "FLOAT", "mode": "OUTPUT"}]


def _expect(feeds, K=3):
    B = next(iter(feeds.values())).shape[0]
    y = np.tile(0.5 * np.arange(K, dtype=np.float32), (B, 1))
    for v in feeds.values():
        y = y + np.asarray(v).reshape(B, -1).mean(axis=1, keepdims=True)
    return y


def test_engine_run_paths_on_emulated_memory(fake_trt, host_cuda, tmp_path):
    from cm_deploy.runtime.engine import Engine
    trt = fake_trt(kernel=host_kernel)
    path = tmp_path / "m.engine"
    path.write_bytes(fake_engine_bytes(_fake_io(), trt.__version__))
    eng = Engine(path, cuda_graph=True, graph_max_batch=2)
    assert [s.name for s in eng.inputs] == list(MODS) and eng.outputs[0].shape == (None, 3)
    assert eng.input_ranges()["text"] == [(1, 2, 4), (1, 8, 16), (12, 12, 12)]
    f1, f2 = feeds_for(2, (5, 5, 5), seed=1), feeds_for(2, (5, 5, 5), seed=2)
    assert np.allclose(eng.run(f1)["output"], _expect(f1), atol=1e-6)
    assert np.allclose(eng.run(f2)["output"], _expect(f2), atol=1e-6)     # replay sees the new values
    assert (eng.graphs.captures, eng.graphs.replays) == (1, 1)
    f3 = feeds_for(4, (9, 3, 16), seed=3)                                   # batch 4 > graph_max_batch
    assert np.allclose(eng.run(f3)["output"], _expect(f3), atol=1e-6)
    assert eng.graphs.captures == 1
    # CUDA-array inputs are bound by pointer; the engine stream waits for the producer's stream
    cai = {k: HostCAI(np.ascontiguousarray(v), stream=77) for k, v in f1.items()}
    y = eng.run(cai)["output"]
    assert np.allclose(y, _expect(f1), atol=1e-6)
    assert all(eng.last_bindings[k] == v.arr.ctypes.data for k, v in cai.items())
    assert 77 in eng.stream.waited
    # device outputs are DeviceArray views of the engine's buffer; out= writes into caller memory
    d = eng.run(f2, device_outputs=True)["output"]
    assert isinstance(d, cu.DeviceArray) and d.shape == (2, 3) and d.ptr == eng.last_bindings["output"]
    target = np.zeros((2, 3), np.float32)
    res = eng.run(f2, out={"output": HostCAI(target)})["output"]
    assert np.allclose(target, _expect(f2), atol=1e-6) and res.arr is target
    with pytest.raises(UserError, match=r"out\['output'\] must be a contiguous CUDA array of shape \(2, 3\)"):
        eng.run(f2, out={"output": HostCAI(np.zeros((3, 3), np.float32))})
    # rejected before anything is enqueued
    n = sum(1 for c in trt.calls if c[0] == "execute")
    for bad, needle in ((feeds_for(5, (5, 5, 5)), "outside the engine's profile [1, 4]"),
                        (feeds_for(2, (17, 5, 5)), "axis 1 is 17, outside the engine's profile [1, 16]"),
                        (feeds_for(dtype=np.int32), "dtype int32, expected float32"),
                        ({"text": f1["text"]}, "missing 'audio', 'vision'")):
        with pytest.raises(UserError) as e:
            eng.run(bad)
        assert needle in str(e.value)
        one_line(e.value)
    assert sum(1 for c in trt.calls if c[0] == "execute") == n
    eng.close()


def test_engine_load_errors(fake_trt, art, plugin_lib, tmp_path, capsys):
    from cm_deploy.runtime.builder import build_engine
    from cm_deploy.runtime.engine import Engine, EngineInfo
    fake_trt(version="10.8.0")
    eng_path = tmp_path / "m.engine"
    build_engine(art["onnx"], eng_path, plugin=plugin_lib, progress=False)
    info = EngineInfo(eng_path)
    assert info.precision == "float32" and info.input_ranges()["text"][1] == (1, 128, 1024)
    assert info.plugin["path"] == str(plugin_lib.resolve())
    side_path = T.sidecar_path(eng_path)
    side = json.loads(side_path.read_text())

    # another TensorRT version: refused before deserialisation, one line
    fake_trt(version="10.9.0")
    with pytest.raises(UserError, match="built with TensorRT 10.8.0 but this is 10.9.0") as e:
        Engine(eng_path)
    one_line(e.value)
    # another TensorRT flavour
    fake_trt(version="10.8.0", name="tensorrt_rtx")
    with pytest.raises(UserError, match="was built with tensorrt 10.8.0, not tensorrt_rtx"):
        Engine(eng_path, trt_module="tensorrt_rtx")
    # another GPU
    fake_trt(version="10.8.0")
    side_path.write_text(json.dumps(dict(side, device=dict(H100, name="NVIDIA L4", compute_capability="8.9"))))
    with pytest.raises(UserError, match=r"built for compute capability 8.9 \(NVIDIA L4\) but this GPU"):
        Engine(eng_path)
    side_path.write_text(json.dumps(side))
    # the plugin it was built with is gone and none is found
    plugin_lib.rename(tmp_path / "moved.so")
    with pytest.raises(UserError, match="CoupledScan plugin library not found"):
        Engine(eng_path)
    # no sidecar, a plan TensorRT rejects (what another version or GPU gives): TensorRT's reason, one line
    junk = tmp_path / "junk.plan"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="cannot load engine .*Magic tag does not match.*rebuild") as e:
        Engine(junk)
    one_line(e.value)
    # a sidecar that describes another engine is ignored with a warning; TensorRT then decides
    other = tmp_path / "other.engine"
    other.write_bytes(fake_engine_bytes(_fake_io(), "10.7.0"))
    T.sidecar_path(other).write_text(json.dumps(side))
    with pytest.raises(UserError, match="expecting library version 10.8.0 got 10.7.0"):
        Engine(other)
    assert "describes another engine" in capsys.readouterr().err
    # a malformed sidecar
    side_path.write_text("{not json")
    with pytest.raises(UserError, match="unreadable engine description"):
        EngineInfo(eng_path)


# ---------------------------------------------------------------------------- real TensorRT (where installed)

def _real_trt():
    ok, why = T.tensorrt_available("tensorrt")
    if not ok:
        pytest.skip(f"TensorRT is not installed here ({why.split(';')[0]}): the real build/run path runs "
                    "on machines with TensorRT and a GPU")
    if cu.device_count() == 0:
        pytest.skip("TensorRT is installed but no CUDA device is visible")
    try:
        return T.find_plugin()
    except UserError as e:
        pytest.skip(f"TensorRT is installed but the plugin is not built: {e}")


def test_real_tensorrt_build_run_parity(art, tmp_path):
    plugin = _real_trt()
    from cm_deploy.runtime.builder import build_engine
    from cm_deploy.runtime.engine import Engine
    from cm_deploy.runtime.parity import default_shapes, run_parity
    from cm_deploy.runtime.torch_backend import TorchBackend
    eng_path = tmp_path / "model.engine"
    build_engine(art["onnx"], eng_path, plugin=plugin, batch=(1, 2, 4), length=(1, 16, 64),
                 timing_cache=tmp_path / "tc.bin")
    ref = TorchBackend(art["a"], device="cpu", scan_impl="reference")
    with Engine(eng_path, plugin=plugin, cuda_graph=True) as eng:
        rep = run_parity(ref, eng, default_shapes([eng]))
        assert rep["ok"], rep
        f = feeds_for(2, (8, 8, 8))
        a, b = eng.run(f)["output"], eng.run(f)["output"]
        assert np.array_equal(a, b) and eng.graphs.replays >= 1
        with pytest.raises(UserError, match="outside the engine's profile"):
            eng.run(feeds_for(8, (8, 8, 8)))


def _stream_kernel(ctx, stream):
    """A stand-in streaming engine on host memory: next_state.s = state.s + the chunk's sum per sample;
    output = next_state.s (so the output after the last chunk is the sum over every chunk)."""
    def view(name):
        shape = ctx.get_tensor_shape(name)
        n = int(np.prod(shape))
        return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ctx.addresses[name])).reshape(shape)
    x = view("text")
    s = view("state.s").copy()
    nxt = s + x.reshape(x.shape[0], -1).sum(axis=1, keepdims=True)
    view("next_state.s")[:] = nxt
    view("output")[:] = nxt


def test_stream_on_an_engine_keeps_state_in_device_buffers(fake_trt, host_cuda, tmp_path):
    """Stream over a TensorRT engine: the state ping-pongs between two stream-owned device buffer
    sets (the engine writes the next state through out=), never through the host."""
    from cm_deploy.runtime import cuda as cuda_mod
    from cm_deploy.runtime.engine import Engine
    from cm_deploy.runtime.stream import Stream
    fake_trt(kernel=_stream_kernel)
    io_ = [{"name": "text", "shape": [-1, -1, 2], "dtype": "FLOAT", "mode": "INPUT",
            "profile": [[1, 1, 2], [2, 4, 2], [4, 16, 2]]},
           {"name": "state.s", "shape": [-1, 1], "dtype": "FLOAT", "mode": "INPUT",
            "profile": [[1, 1], [2, 1], [4, 1]]},
           {"name": "output", "shape": [-1, 1], "dtype": "FLOAT", "mode": "OUTPUT"},
           {"name": "next_state.s", "shape": [-1, 1], "dtype": "FLOAT", "mode": "OUTPUT"}]
    path = tmp_path / "s.engine"
    path.write_bytes(fake_engine_bytes(io_, "10.8.0"))
    eng = Engine(path)
    s = Stream(eng, batch=2)
    assert s.device_state == "trt"
    x = np.arange(2 * 7 * 2, dtype=np.float32).reshape(2, 7, 2)
    for t0, t1 in ((0, 1), (1, 4), (4, 7)):
        y = s.push({"text": x[:, t0:t1]})
        assert all(isinstance(v, cuda_mod.DeviceArray) for v in s.state.values())
    np.testing.assert_allclose(y, x.reshape(2, -1).sum(axis=1, keepdims=True))
    s.reset()
    np.testing.assert_allclose(s.push({"text": x[:, :2]}), x[:, :2].reshape(2, -1).sum(axis=1, keepdims=True))
    eng.close()


def test_backend_trt_on_an_onnx_file_builds_an_engine_in_a_temporary_folder(fake_trt, host_cuda, art, plugin_lib):
    """load(model.onnx, backend="trt"): an engine built into a temporary folder, removed on close."""
    from cm_deploy.runtime import load
    fake_trt()
    eng = load(art["onnx"], backend="trt", plugin=plugin_lib)
    folder = eng.path.parent
    assert eng.kind == "tensorrt" and eng.path.suffix == ".engine" and folder.is_dir()
    assert folder != Path(art["onnx"]).parent and not (Path(art["onnx"]).parent / "model.engine").exists()
    eng.close()
    assert not folder.exists()
