"""Serving with Triton (docs/serving.md): `cm-deploy serve-repo` writes configs that parse as Triton's
ModelConfig and say what each backend needs; the python backend's batching (padding requests of
different lengths, per-sequence stream state) equals the runtime on each request alone; the
streaming graph with START/READY equals the runtime's Stream; and, against the real tritonserver
(the nvidia-pytriton wheel's, fetched by scripts/fetch_tritonserver.sh; skipped without it), HTTP
and gRPC answers, dynamic batching, streams by sequence id and refusals, on 127.0.0.1 only."""
from __future__ import annotations

import contextlib
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cm_deploy.runtime import load, open_stream
from cm_deploy.runtime.native import find_library
from cm_deploy.serving import batching as B

pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient (pip install 'cm-deploy[serve]') "
                                                                       "holds Triton's ModelConfig schema")

MODS = {"text": 12, "audio": 7, "vision": 5}
NAME = "cm"
NAME_DEFAULT = "coupled_mamba"
TOL = dict(rtol=1e-5, atol=1e-5)


def _cli(*args):
    from cm_deploy.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A small pad-rule model (streams then equal whole runs exactly), exported with --streaming."""
    import torch
    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    base = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    cfg = CoupledMambaConfig(modalities=dict(MODS), d_model=16, n_layers=2, d_state=4, d_conv=3, length_rule="pad")
    save_checkpoint(CoupledMamba(cfg), base / "a.pt")
    rc, _, err = _cli("export", base / "a.pt", "-o", base / "export", "--streaming", "--quiet")
    assert rc == 0, err
    return base / "export"


def _fake_engine(export_dir, max_batch=16):
    """An engine file and the description `cm-deploy build` writes beside it (serve-repo reads only
    the description: the bytes are never run here)."""
    m = json.loads((export_dir / "manifest.json").read_text())
    eng = export_dir / "model.engine"
    eng.write_bytes(b"not an engine: serve-repo only copies it")
    prof = {e["name"]: {"min": [1] + [1] * (len(e["shape"]) > 1) + [d for d in e["shape"][2:]],
                        "opt": [8] + [128] * (len(e["shape"]) > 1) + [d for d in e["shape"][2:]],
                        "max": [max_batch] + [1024] * (len(e["shape"]) > 1) + [d for d in e["shape"][2:]]}
            for e in m["inputs"]}
    side = {"format": "cm-deploy-engine/1", "precision": "float32", "tensorrt": {"module": "tensorrt", "version": "10.x"},
            "profiles": [prof], "inputs": m["inputs"], "outputs": m["outputs"], "plugin": None}
    from cm_deploy.runtime.trt import SIDECAR_FORMAT
    side["format"] = SIDECAR_FORMAT
    (export_dir / "model.engine.json").write_text(json.dumps(side))
    return eng


@pytest.fixture(scope="module")
def engine_export(export, tmp_path_factory):
    """The export folder with a (stand-in) engine beside it, in a copy so the others stay engine-free."""
    import shutil
    d = tmp_path_factory.mktemp("with_engine") / "export"
    shutil.copytree(export, d)
    _fake_engine(d)
    return d


def _config(path):
    from cm_deploy.serving.repository import read_config
    return read_config(path)


# ---------------------------------------------------------------------------- configs

def test_every_config_parses_and_says_what_its_backend_needs(engine_export, tmp_path):
    from cm_deploy.serving.repository import read_config
    repo = tmp_path / "repo"
    plugin = tmp_path / "libcoupled_scan_plugin.so"
    plugin.write_bytes(b"stand-in plugin")
    shim = plugin.with_name("libcoupled_scan_plugin_autoload.so")     # built beside the plugin
    shim.write_bytes(b"stand-in autoload shim")
    rc, out, err = _cli("serve-repo", engine_export, "-o", repo, "--name", NAME, "--max-batch", 32,
                        "--preferred-batch", "4,8", "--queue-delay-us", 250, "--instances", 2, "--gpus", "0,1",
                        "--plugin", plugin, "--server-path", "/models", "--max-sequences", 8)
    assert rc == 0, err
    folders = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert folders == [f"{NAME}_{s}" for s in ("onnx", "python", "stream_onnx", "stream_python", "trt")]
    m = json.loads((engine_export / "manifest.json").read_text())
    configs = {f: read_config(repo / f / "config.pbtxt") for f in folders}     # Triton's schema, text format
    for f, c in configs.items():
        assert c.name == f
        assert c.instance_group[0].count == 2 and list(c.instance_group[0].gpus) == [0, 1]
        assert c.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
        assert [o.name for o in c.output] == ["output"] and list(c.output[0].dims) == [1]
    whole_in = {i.name: i for i in configs[f"{NAME}_onnx"].input}
    assert list(whole_in) == [e["name"] for e in m["inputs"]]
    for name, f in MODS.items():
        assert list(whole_in[name].dims) == [-1, f] and whole_in[name].data_type == pb.TYPE_FP32
        ln = whole_in[f"{name}_lengths"]
        assert list(ln.dims) == [1] and ln.HasField("reshape") and list(ln.reshape.shape) == []
        assert ln.data_type == pb.TYPE_INT64
    onnx_cfg = configs[f"{NAME}_onnx"]
    assert onnx_cfg.backend == "onnxruntime" and onnx_cfg.max_batch_size == 32
    assert list(onnx_cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert onnx_cfg.dynamic_batching.max_queue_delay_microseconds == 250
    lib = find_library("ort", required=False)
    if lib is not None:
        assert list(onnx_cfg.model_operations.op_library_filename) == [f"/models/{NAME}_onnx/{lib.name}"]
        assert (repo / f"{NAME}_onnx" / lib.name).read_bytes() == lib.read_bytes()
    assert (repo / f"{NAME}_onnx/1/model.onnx").read_bytes() == (engine_export / "model.onnx").read_bytes()
    # tensorrt: the engine, the profile's batch (16 < --max-batch 32), the plugin beside it
    trt = configs[f"{NAME}_trt"]
    assert trt.backend == "tensorrt" and trt.max_batch_size == 16
    assert (repo / f"{NAME}_trt/1/model.plan").read_bytes() == (engine_export / "model.engine").read_bytes()
    # the server only dlopens plugins=...: it names the autoload shim, which loads the plugin beside it
    assert (repo / f"{NAME}_trt" / plugin.name).read_bytes() == b"stand-in plugin"
    assert (repo / f"{NAME}_trt" / shim.name).read_bytes() == b"stand-in autoload shim"
    assert f"--backend-config=tensorrt,plugins=/models/{NAME}_trt/{shim.name}\n" in out
    assert "registers no CoupledScan creator" not in out
    assert "text 1..16 (opt 8) x 1..1024 (opt 128) x 12;" in (repo / f"{NAME}_trt/config.pbtxt").read_text().splitlines()[1]    # the profile, in a comment
    # python: optional lengths, requests of any lengths in one batch, the runtime's files
    py = configs[f"{NAME}_python"]
    py_in = {i.name: i for i in py.input}
    assert py.backend == "python" and py_in["text"].allow_ragged_batch and py_in["text_lengths"].optional
    assert py.parameters["mode"].string_value == "whole"
    assert (repo / f"{NAME}_python/1/model.py").read_text().startswith('"""Triton python backend model')
    assert (repo / f"{NAME}_python/1" / py.parameters["model_file"].string_value).is_file()
    # streaming, onnxruntime: implicit state for every state pair, zero at the start; START/READY
    so = configs[f"{NAME}_stream_onnx"]
    states = [e for e in m["stream"]["inputs"] if e["name"].startswith("state.")]
    got = {s.input_name: s for s in so.sequence_batching.state}
    assert list(got) == [e["name"] for e in states]
    for e in states:
        s = got[e["name"]]
        assert s.output_name == "next_" + e["name"]
        assert list(s.dims) == ([int(d) for d in e["shape"][1:]] or [1])
        assert s.initial_state[0].zero_data and list(s.initial_state[0].dims) == list(s.dims)
    kinds = {c.name: c.control[0].kind for c in so.sequence_batching.control_input}
    C = pb.ModelSequenceBatching.Control
    assert kinds == {"START": C.CONTROL_SEQUENCE_START, "READY": C.CONTROL_SEQUENCE_READY}
    assert so.sequence_batching.HasField("direct") and so.max_batch_size == 8
    assert not any(i.name.startswith("state.") for i in so.input)
    # streaming, python: the sequence id reaches the model
    sp = configs[f"{NAME}_stream_python"]
    kinds = {c.name: c.control[0].kind for c in sp.sequence_batching.control_input}
    assert kinds == {"START": C.CONTROL_SEQUENCE_START, "END": C.CONTROL_SEQUENCE_END,
                     "CORRID": C.CONTROL_SEQUENCE_CORRID}
    assert sp.sequence_batching.oldest.max_candidate_sequences == 8
    assert sp.sequence_batching.control_input[2].control[0].data_type == pb.TYPE_UINT64
    assert "README.md" in {p.name for p in repo.iterdir()}


def test_tensorrt_plugin_without_its_autoload_shim(engine_export, tmp_path):
    plugin = tmp_path / "lib" / "libcoupled_scan_plugin.so"
    plugin.parent.mkdir()
    plugin.write_bytes(b"stand-in plugin")
    rc, out, err = _cli("serve-repo", engine_export, "-o", tmp_path / "r", "--backends", "tensorrt",
                        "--plugin", plugin, "--json")
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["models"][0]["files"] == ["1/model.plan", "config.pbtxt", plugin.name]
    assert summary["start"].endswith(f"plugins={(tmp_path / 'r').resolve()}/{NAME_DEFAULT}_trt/{plugin.name}")
    assert any("no libcoupled_scan_plugin_autoload.so beside" in n and "registers no CoupledScan creator" in n
               for n in summary["notes"]), summary["notes"]
    # naming the shim instead of the plugin: one line, nothing written
    shim = plugin.with_name("libcoupled_scan_plugin_autoload.so")
    shim.write_bytes(b"stand-in shim")
    rc, out, err = _cli("serve-repo", engine_export, "-o", tmp_path / "r2", "--backends", "tensorrt", "--plugin", shim)
    assert rc == 2 and "--plugin: name libcoupled_scan_plugin.so" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r2").exists()


def test_defaults_kind_cpu_and_no_dynamic_batching(export, tmp_path):
    rc, out, err = _cli("serve-repo", export, "-o", tmp_path / "r", "--kind", "cpu", "--no-dynamic-batching",
                        "--json")
    assert rc == 0, err
    summary = json.loads(out)
    names = [m["name"] for m in summary["models"]]
    assert names == ["coupled_mamba_onnx", "coupled_mamba_python", "coupled_mamba_stream_onnx",
                     "coupled_mamba_stream_python"]       # no engine in the export: no tensorrt model
    for n in names:
        c = _config(tmp_path / "r" / n / "config.pbtxt")
        assert c.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
        assert not c.HasField("dynamic_batching")
        assert summary["start"] == f"tritonserver --model-repository={(tmp_path / 'r').resolve()}"


@pytest.mark.parametrize("args,needle", [
    (["--backends", "onnxruntime,tpu"], "unknown 'tpu'"),
    (["--backends", "tensorrt"], "no engine in"),
    (["--preferred-batch", "128"], "outside [1, --max-batch 64]"),
    (["--gpus", "0", "--kind", "cpu"], "contradict"),
    (["--gpus", "a"], "GPU ids"),
    (["--name", "a b"], "--name"),
])
def test_bad_options_are_one_line_and_write_nothing(export, tmp_path, args, needle):
    rc, out, err = _cli("serve-repo", export, "-o", tmp_path / "r", *args)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []          # no repository, no staging folder


def test_without_tritonclient_one_line(export, tmp_path):
    import subprocess
    import sys
    code = ("import sys; sys.modules['tritonclient'] = None\n"
            "from cm_deploy.cli import main\n"
            f"sys.exit(main(['serve-repo', {str(export)!r}, '-o', {str(tmp_path / 'r')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "pip install 'cm-deploy[serve]'" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_bad_folders(export, tmp_path):
    rc, _, err = _cli("serve-repo", tmp_path, "-o", tmp_path / "r")
    assert rc == 2 and "export manifest not found" in err
    no_stream = tmp_path / "no_stream"
    no_stream.mkdir()
    m = json.loads((export / "manifest.json").read_text())
    m.pop("stream")
    m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("stream")}
    for f in m["files"].values():
        (no_stream / f).write_bytes((export / f).read_bytes())
    (no_stream / "manifest.json").write_text(json.dumps(m))
    rc, _, err = _cli("serve-repo", no_stream, "-o", tmp_path / "r", "--backends", "stream")
    assert rc == 2 and "export with --streaming" in err
    rc, _, err = _cli("serve-repo", export, "-o", export / "repo")
    assert rc == 2 and "inside) the export folder" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "other").mkdir()
    rc, _, err = _cli("serve-repo", export, "-o", taken, "--backends", "python")
    assert rc == 2 and "--force" in err
    rc, _, err = _cli("serve-repo", export, "-o", taken, "--backends", "python", "--force")
    assert rc == 0, err
    assert sorted(p.name for p in taken.iterdir()) == ["README.md", "coupled_mamba_python", "other"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]        # staging removed


# ---------------------------------------------------------------------------- the python backend's batching

def _feeds(rng, batch, lengths, dtype=np.float32):
    return {n: rng.standard_normal((batch, L, f)).astype(dtype) for (n, f), L in zip(MODS.items(), lengths)}


def test_pad_and_concat_keeps_dtype_and_values():
    from cm_deploy.runtime.specs import TensorSpec
    specs = [TensorSpec("text", ("batch", "L_text", 3), "float16"), TensorSpec("text_lengths", ("batch",), "int64")]
    rng = np.random.default_rng(1)
    reqs = [{"text": rng.standard_normal((b, L, 3)).astype(np.float16), "text_lengths": np.array([L] * b)}
            for b, L in ((1, 4), (2, 9), (1, 1))]
    feeds, sizes = B.pad_and_concat(specs, reqs)
    assert sizes == [1, 2, 1] and feeds["text"].shape == (4, 9, 3) and feeds["text"].dtype == np.float16
    np.testing.assert_array_equal(feeds["text"][0, :4], reqs[0]["text"][0])
    assert not feeds["text"][0, 4:].any() and not feeds["text"][3, 1:].any()
    np.testing.assert_array_equal(feeds["text_lengths"], [4, 9, 9, 1])
    back = B.split_rows({"y": np.arange(4)}, sizes)
    assert [r["y"].tolist() for r in back] == [[0], [1, 2], [3]]


@pytest.mark.parametrize("graph", ["model.portable.onnx", "model.onnx"])
def test_whole_sequence_runner_equals_each_request_alone(export, graph):
    if graph == "model.onnx" and find_library("ort", required=False) is None:
        pytest.skip("no CoupledScan op library (scripts/build_plugin.sh): model.onnx cannot run")
    rng = np.random.default_rng(0)
    with load(export / graph, device="cpu") as m:
        runner = B.WholeSequenceRunner(m)
        reqs = [_feeds(rng, 1, (5, 9, 2)), _feeds(rng, 2, (11, 3, 7)), _feeds(rng, 1, (1, 1, 1)),
                {**_feeds(rng, 2, (6, 6, 6)), "audio_lengths": np.array([[3], [6]])},   # Triton's (batch, 1)
                {**_feeds(rng, 1, (4, 4, 4)), "text_lengths": np.array([9])},          # out of range
                {"text": rng.standard_normal((1, 3, 11)).astype(np.float32)}]          # wrong features, no others
        got = runner.run(reqs)
        for req, res in zip(reqs[:4], got):
            alone = m.run(B.flatten_lengths(m.inputs, req))["output"]
            assert isinstance(res, dict), res
            np.testing.assert_allclose(res["output"], alone, **TOL)
        assert "valid lengths in [0, 4]" in got[4] and "\n" not in got[4]
        assert "wrong input names" in got[5] or "axis 2" in got[5]


def _stream_case(rng, sizes):
    return [_feeds(rng, 1, (T, T, T)) for T in sizes]


def test_stream_runner_keeps_each_sequence_state(export):
    rng = np.random.default_rng(2)
    seqs = {7: _stream_case(rng, [3, 1, 4, 2]), 2**40: _stream_case(rng, [3, 2, 4, 2]), 9: _stream_case(rng, [1, 5])}
    expect = {}
    for sid, chunks in seqs.items():
        with open_stream(export / "model.stream.portable.onnx", batch=1, device="cpu") as s:
            expect[sid] = [s.push(c) for c in chunks]
    with load(export / "model.stream.portable.onnx", device="cpu") as m:
        clock = [0.0]
        runner = B.StreamRunner(m, idle_seconds=10, clock=lambda: clock[0])
        for k in range(4):                   # every call carries the k-th chunk of each live sequence
            items = [(sid, k == 0, k == len(ch) - 1, ch[k]) for sid, ch in seqs.items() if k < len(ch)]
            for (sid, *_), res in zip(items, runner.run(items)):
                assert isinstance(res, dict), res
                np.testing.assert_allclose(res["output"], expect[sid][k], **TOL)
        assert set(runner.states) == set()              # every sequence ended
        # a sequence and its next chunk in one call; an unknown one; a batch of 2; idle expiry
        c = seqs[7]
        res = runner.run([(1, True, False, c[0]), (1, False, False, c[1]), (5, False, False, c[0]),
                          (3, True, False, _feeds(rng, 2, (2, 2, 2)))])
        np.testing.assert_allclose(res[1]["output"], expect[7][1], **TOL)
        assert "unknown sequence 5" in res[2] and "batch 1" in res[3]
        clock[0] = 11.0
        assert "unknown sequence 1" in runner.run([(1, False, False, c[2])])[0]


@pytest.mark.parametrize("graph", ["model.stream.portable.onnx", "model.stream.onnx"])
def test_serving_stream_graph_equals_stream(export, graph, tmp_path):
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from cm_deploy.serving.stream_graph import serving_stream_graph
    lib = find_library("ort", required=False)
    if graph == "model.stream.onnx" and lib is None:
        pytest.skip("no CoupledScan op library (scripts/build_plugin.sh): model.stream.onnx cannot run")
    proto = serving_stream_graph(onnx.load(str(export / graph)))
    onnx.checker.check_model(proto)
    so = ort.SessionOptions()
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(3)
    chunks = [_feeds(rng, 2, (T, T, T)) for T in (3, 1, 4)]
    with open_stream(export / graph, batch=2, device="cpu") as s:
        expect = [s.push(c) for c in chunks]
    # Triton's first state of a sequence may be garbage: START must make it zero
    state = {i.name: np.full([2] + i.shape[1:], np.nan, np.float32) for i in sess.get_inputs()
             if i.name.startswith("state.")}
    assert state["state.count"].shape == (2, 1)
    ones = np.ones((2, 1), np.int32)
    for k, c in enumerate(chunks):
        lens = {f"{n}_lengths": np.full(2, c[n].shape[1]) for n in MODS}
        out = dict(zip(names, sess.run(None, {**c, **lens, **state, "START": ones * (k == 0), "READY": ones})))
        np.testing.assert_allclose(out["output"], expect[k], **TOL)
        state = {n: out["next_" + n] for n in state}
    ready = np.array([[1], [0]], np.int32)                # row 1 not ready: its state passes through
    out = dict(zip(names, sess.run(None, {**chunks[0], **lens, **state, "START": ones * 0, "READY": ready})))
    for n in state:
        np.testing.assert_array_equal(out["next_" + n][1], state[n][1])
        assert not np.array_equal(out["next_" + n][0], state[n][0])        # row 0 moved on


# ---------------------------------------------------------------------------- the real server

@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    """tritonserver on a repository of every model (ONNX Runtime/TensorRT ones cannot load: their
    backends are not in the wheel; the server still checks their configs), 127.0.0.1 only; stopped
    when the module's tests are done."""
    from cm_deploy.serving.server import TritonServer, find_tritonserver
    pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
    if find_tritonserver() is None:
        pytest.skip("no tritonserver: scripts/fetch_tritonserver.sh unpacks the nvidia-pytriton wheel's "
                    "(or set CM_DEPLOY_TRITONSERVER)")
    base = tmp_path_factory.mktemp("live")
    import shutil
    exp = base / "export"
    shutil.copytree(export, exp)
    _fake_engine(exp)
    backends = "python,stream,tensorrt" + (",onnxruntime" if find_library("ort", required=False) else "")
    # a long queue delay so that concurrent requests surely meet in one batch
    rc, _, err = _cli("serve-repo", exp, "-o", base / "repo", "--name", NAME, "--backends", backends,
                      "--kind", "cpu", "--max-batch", 8, "--max-sequences", 4, "--queue-delay-us", 40000,
                      "--threads", 1)
    assert rc == 0, err
    srv = TritonServer(base / "repo", log_path=base / "server.log", ready_timeout=90,
                       extra_args=["--exit-on-error=false", "--strict-readiness=false"])
    srv.start()
    try:
        import tritonclient.http as th
        c = th.InferenceServerClient(srv.http_url[len("http://"):])
        try:
            state = {m["name"]: m for m in c.get_model_repository_index()}[f"{NAME}_python"]
        finally:
            c.close()
        if state.get("state") != "READY" and "libpython" in state.get("reason", ""):
            pytest.skip(f"the python backend stub finds no libpython here: {state['reason'][:300]}")
        yield srv
    finally:
        srv.stop()
        assert srv.proc is None


def _clients(server):
    import tritonclient.grpc as tg
    import tritonclient.http as th
    return {"http": (th, th.InferenceServerClient(server.http_url[len("http://"):], concurrency=16)),
            "grpc": (tg, tg.InferenceServerClient(server.grpc_url))}


def _inputs(mod, feeds):
    from tritonclient.utils import np_to_triton_dtype
    out = []
    for k, v in feeds.items():
        v = np.ascontiguousarray(v)
        t = mod.InferInput(k, list(v.shape), np_to_triton_dtype(v.dtype))
        t.set_data_from_numpy(v)
        out.append(t)
    return out


def test_server_listens_on_loopback_and_checks_every_config(server):
    import tritonclient.http as th
    log = server.log()
    for service in ("GRPCInferenceService", "HTTPService", "Metrics Service"):
        assert re.search(rf"Started {service} at 127\.0\.0\.1:\d+", log), service
    assert not re.search(r"Started \w+ ?\w* at 0\.0\.0\.0", log)
    c = th.InferenceServerClient(server.http_url[len("http://"):])
    try:
        index = {m["name"]: m for m in c.get_model_repository_index()}
    finally:
        c.close()
    assert index[f"{NAME}_python"]["state"] == "READY" and index[f"{NAME}_stream_python"]["state"] == "READY"
    # the server validated these configs (a bad one fails at the poll, before any backend is looked up);
    # then found no onnxruntime/tensorrt backend in the wheel: not run here
    for other in [n for n in index if not n.endswith("python")]:
        assert "unable to find backend library" in index[other].get("reason", ""), index[other]


def test_http_and_grpc_answer_as_the_runtime(server, export):
    rng = np.random.default_rng(4)
    cases = [_feeds(rng, 1, (5, 9, 2)),
             {**_feeds(rng, 3, (8, 6, 4)), "text_lengths": np.array([[8], [2], [5]]),
              "vision_lengths": np.array([[4], [0], [1]])}]
    with load(export / "model.portable.onnx", device="cpu") as m:
        expect = [m.run(B.flatten_lengths(m.inputs, c))["output"] for c in cases]
    for proto, (mod, client) in _clients(server).items():
        try:
            for c, e in zip(cases, expect):
                r = client.infer(f"{NAME}_python", _inputs(mod, c))
                np.testing.assert_allclose(r.as_numpy("output"), e, **TOL, err_msg=proto)
        finally:
            client.close()


def test_concurrent_requests_are_batched(server, export):
    import tritonclient.http as th
    rng = np.random.default_rng(5)
    cases = [_feeds(rng, 1, rng.integers(1, 12, size=3)) for _ in range(16)]
    with load(export / "model.portable.onnx", device="cpu") as m:
        expect = [m.run(c)["output"] for c in cases]
    client = th.InferenceServerClient(server.http_url[len("http://"):], concurrency=16)
    try:
        before = client.get_inference_statistics(f"{NAME}_python")["model_stats"][0]
        pending = [client.async_infer(f"{NAME}_python", _inputs(th, c)) for c in cases]
        got = [p.get_result(timeout=60).as_numpy("output") for p in pending]
        after = client.get_inference_statistics(f"{NAME}_python")["model_stats"][0]
    finally:
        client.close()
    for g, e in zip(got, expect):
        np.testing.assert_allclose(g, e, **TOL)
    runs = int(after["execution_count"]) - int(before["execution_count"])
    done = int(after["inference_count"]) - int(before["inference_count"])
    assert done == 16 and runs < 16, (done, runs)
    assert max(int(b["batch_size"]) for b in after["batch_stats"]) > 1


def test_stream_by_sequence_id_equals_one_run(server, export):
    import tritonclient.grpc as tg
    rng = np.random.default_rng(6)
    seqs = {11: [3, 1, 4], 12: [2, 2, 2, 1], 2**40 + 3: [5]}
    chunks = {sid: _stream_case(rng, sizes) for sid, sizes in seqs.items()}
    with load(export / "model.portable.onnx", device="cpu") as m:      # the whole sequence, one run
        whole = {sid: m.run({n: np.concatenate([c[n] for c in ch], axis=1) for n in MODS})["output"]
                 for sid, ch in chunks.items()}
    client = tg.InferenceServerClient(server.grpc_url)
    outs = {sid: [] for sid in seqs}

    def send(sid):
        ch = chunks[sid]
        for k, c in enumerate(ch):
            r = client.infer(f"{NAME}_stream_python", _inputs(tg, c), sequence_id=sid, sequence_start=k == 0,
                             sequence_end=k == len(ch) - 1)
            outs[sid].append(r.as_numpy("output"))

    try:
        with ThreadPoolExecutor(len(seqs)) as pool:      # the sequences interleave on the server
            list(pool.map(send, seqs))
    finally:
        client.close()
    for sid in seqs:
        assert len(outs[sid]) == len(seqs[sid])
        np.testing.assert_allclose(outs[sid][-1], whole[sid], **TOL)


def test_bad_requests_get_errors_and_the_server_keeps_serving(server, export):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException
    rng = np.random.default_rng(7)
    good = _feeds(rng, 1, (4, 4, 4))
    with load(export / "model.portable.onnx", device="cpu") as m:
        expect = m.run(good)["output"]
    bad = {
        "wrong features": ({**good, "text": good["text"][..., :11]}, {}),
        "wrong dtype": ({**good, "audio": good["audio"].astype(np.float64)}, {}),
        "lengths out of range": ({**good, "text_lengths": np.array([[9]])}, {}),
        "unknown input": ({**good, "speech": good["audio"]}, {}),
    }
    client = tg.InferenceServerClient(server.grpc_url)
    try:
        for what, (feeds, kw) in bad.items():
            with pytest.raises(InferenceServerException) as e:
                client.infer(f"{NAME}_python", _inputs(tg, feeds), **kw)
            assert str(e.value).strip(), what
            r = client.infer(f"{NAME}_python", _inputs(tg, good))      # and the next request is served
            np.testing.assert_allclose(r.as_numpy("output"), expect, **TOL)
        assert "valid lengths in [0, 4]" in _error(client, tg, f"{NAME}_python", bad["lengths out of range"][0])
        stream_bad = {"unknown sequence": dict(sequence_id=424242, sequence_start=False),
                      "no sequence id": dict()}
        for what, kw in stream_bad.items():
            with pytest.raises(InferenceServerException):
                client.infer(f"{NAME}_stream_python", _inputs(tg, good), **kw)
        msg = _error(client, tg, f"{NAME}_stream_python", _feeds(rng, 2, (3, 3, 3)), sequence_id=5,
                     sequence_start=True, sequence_end=True)
        assert re.search(r"batch(-size)? 1", msg), msg        # the sequence batcher's own refusal
        r = client.infer(f"{NAME}_stream_python", _inputs(tg, good), sequence_id=6, sequence_start=True,
                         sequence_end=True)
        np.testing.assert_allclose(r.as_numpy("output"), expect, **TOL)
        assert client.is_server_live() and client.is_model_ready(f"{NAME}_python")
    finally:
        client.close()


def _error(client, mod, model, feeds, **kw) -> str:
    from tritonclient.utils import InferenceServerException
    try:
        client.infer(model, _inputs(mod, feeds), **kw)
    except InferenceServerException as e:
        return str(e)
    raise AssertionError("no error")


def test_metrics_count_the_requests(server):
    import urllib.request
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf'nv_inference_request_success\{{model="{NAME}_python",version="1"\}} (\d+)', text)
    assert m and int(m.group(1)) >= 1, text[:2000]
