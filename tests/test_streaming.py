"""Streaming (docs/streaming.md): CoupledMamba.step in chunks of any sizes equals one forward pass,
in PyTorch (reference and Triton scans) and through the exported streaming graphs in ONNX Runtime
(model.stream.portable.onnx; model.stream.onnx with the op library), via the runtime's Stream."""
import json

import numpy as np
import pytest
import torch

from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
from cm_deploy.errors import UserError

MODS = {"text": 5, "audio": 3}
SPLITS = [[13], [1] * 13, [2] * 6 + [1], [4, 1, 8]]


def _model(rule="pad", coupled=True, seed=0):
    torch.manual_seed(seed)
    cfg = CoupledMambaConfig(modalities=dict(MODS), d_model=16, n_layers=2, d_state=4, d_conv=3,
                             length_rule=rule, coupled=coupled)
    return CoupledMamba(cfg).eval()


def _data(L=13, lens=((13, 9), (7, 9)), seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(2, L, f, generator=g) for f in MODS.values()]
    return xs, [torch.tensor(v) for v in lens]


def _chunks(xs, lens, sizes):
    t0 = 0
    for T in sizes:
        yield [x[:, t0:t0 + T] for x in xs], [(ln - t0).clamp(0, T) for ln in lens]
        t0 += T


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("rule,coupled", [("pad", True), ("pad", False), ("interpolate", True)])
def test_step_in_chunks_equals_one_forward(rule, coupled, impl):
    model = _model(rule, coupled).set_scan_impl(impl)
    xs, lens = _data()
    if rule == "interpolate":            # streaming is exact for interpolate when lengths are equal
        lens = [torch.tensor([13, 13])] * 2
    with torch.no_grad():
        whole = model(xs, lengths=lens)
        for sizes in SPLITS[:3] if impl == "triton" else SPLITS:
            state = model.initial_state(2)
            for chunk, cl in _chunks(xs, lens, sizes):
                y, state = model.step(chunk, state, lengths=cl)
            torch.testing.assert_close(y, whole, rtol=1e-5, atol=1e-6, msg=f"chunks {sizes}")
            assert set(state) == set(model.state_specs())


def test_step_refuses_bad_state_and_chunks():
    model = _model()
    xs, _ = _data()
    with pytest.raises(ValueError, match="state lacks"):
        model.step(xs, {})
    with pytest.raises(ValueError, match=r"must be \(batch, T, 5\)"):
        model.step([xs[0][..., :4], xs[1]], model.initial_state(2))


# ---------------------------------------------------------------------------- exported graphs

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from cm_deploy.cli import main
    d = tmp_path_factory.mktemp("stream")
    model = _model("pad")
    ckpt = save_checkpoint(model, d / "ckpt.pt")
    assert main(["export", str(ckpt), "-o", str(d / "out"), "--streaming"]) == 0
    return {"model": model.set_scan_impl("reference"), "ckpt": ckpt, "out": d / "out"}


def test_export_streaming_writes_both_graphs_and_the_manifest(exported):
    out = exported["out"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["files"]["stream_tensorrt"] == "model.stream.onnx"
    assert man["files"]["stream_portable"] == "model.stream.portable.onnx"
    names = [e["name"] for e in man["stream"]["inputs"]]
    assert names[:4] == ["text", "audio", "text_lengths", "audio_lengths"]
    assert all(n.startswith("state.") for n in names[4:]) and "state.scan.0" in names and "state.count" in names
    assert [e["name"] for e in man["stream"]["outputs"]] == ["output"] + ["next_" + n for n in names[4:]]
    assert man["stream"]["inputs"][0]["shape"] == ["batch", "T", 5]
    import onnx
    g = onnx.load(str(out / "model.stream.onnx")).graph
    scans = [n for n in g.node if n.op_type == "CoupledScan"]
    assert len(scans) == 2 and all(len(n.input) == 9 and len(n.output) == 2 for n in scans)
    assert all({a.name: a.i for a in n.attribute if a.name == "has_final_state"} == {"has_final_state": 1}
               for n in scans)


def test_stream_graph_keeps_every_node_on_the_cuda_device(exported):
    """model.stream.onnx on ONNX Runtime's CUDA provider (predicted: runtime/placement.py): nothing on
    the host at all (one T for every modality: no Max), no copies, CUDA graphs possible."""
    from cm_deploy.runtime.placement import predict_cuda_placement
    p = predict_cuda_placement(exported["out"] / "model.stream.onnx")
    assert p.host_nodes == [] and p.copies == [] and p.cuda_graph_ok, p.to_dict()


def _stream_files():
    from cm_deploy.runtime.native import find_library
    files = ["model.stream.portable.onnx"]
    if find_library("ort", required=False) is not None:
        files.append("model.stream.onnx")
    return files


@pytest.mark.parametrize("fname", _stream_files())
def test_stream_push_in_chunks_equals_whole_sequence(exported, fname):
    from cm_deploy.runtime import open_stream
    xs, lens = _data(seed=4)
    with torch.no_grad():
        whole = exported["model"](xs, lengths=lens).numpy()
    with open_stream(exported["out"] / fname, batch=2, device="cpu") as s:
        for sizes in SPLITS:
            s.reset()
            for chunk, cl in _chunks(xs, lens, sizes):
                y = s.push({n: c.numpy() for n, c in zip(MODS, chunk)},
                           lengths={n: v.numpy() for n, v in zip(MODS, cl)})
            np.testing.assert_allclose(y, whole, rtol=1e-4, atol=1e-5, err_msg=f"{fname} chunks {sizes}")
        # without lengths: every step of every chunk valid
        s.reset()
        full, _ = _data(L=6, seed=5)
        for chunk, _ in _chunks(full, [torch.tensor([6, 6])] * 2, [2, 4]):
            y = s.push({n: c.numpy() for n, c in zip(MODS, chunk)})
        with torch.no_grad():
            np.testing.assert_allclose(y, exported["model"](full).numpy(), rtol=1e-4, atol=1e-5)


def test_portable_stream_across_scan_chunks(exported):
    """model.stream.portable.onnx with pushes longer than the function's Scan chunk (padded chunks)
    and shorter (one step per iteration), the state carried between them: equal to one run."""
    from cm_deploy.export.portable import CHUNK
    from cm_deploy.runtime import open_stream
    L = 2 * CHUNK + 5
    xs, lens = _data(L=L, lens=((L, CHUNK + 3), (CHUNK - 1, L)), seed=6)
    with torch.no_grad():
        whole = exported["model"](xs, lengths=lens).numpy()
    with open_stream(exported["out"] / "model.stream.portable.onnx", batch=2, device="cpu") as s:
        assert s.backend.ort_ops is None          # its own function, not the op library
        for sizes in ([L], [CHUNK + 1, 1, CHUNK + 3], [3, CHUNK, CHUNK + 2]):
            s.reset()
            for chunk, cl in _chunks(xs, lens, sizes):
                y = s.push({n: c.numpy() for n, c in zip(MODS, chunk)},
                           lengths={n: v.numpy() for n, v in zip(MODS, cl)})
            np.testing.assert_allclose(y, whole, rtol=1e-4, atol=1e-5, err_msg=f"chunks {sizes}")


def test_stream_refusals(exported):
    from cm_deploy.runtime import load, open_stream
    with pytest.raises(UserError, match="not a streaming graph"):
        open_stream(exported["out"] / "model.portable.onnx")
    with open_stream(exported["out"] / "model.stream.portable.onnx", batch=2) as s:
        chunk = {"text": np.zeros((2, 3, 5), np.float32), "audio": np.zeros((2, 3, 3), np.float32)}
        with pytest.raises(UserError, match="must not hold state"):
            s.push({**chunk, "state.count": np.zeros(2, np.float32)})
        with pytest.raises(UserError, match="has batch 1, the stream 2"):
            s.push({n: v[:1] for n, v in chunk.items()})
        with pytest.raises(UserError, match=r"'text_lengths' must hold valid lengths in \[0, 3\]"):
            s.push(chunk, lengths={"text": np.array([4, 1])})
    # a state of the wrong shape, given by hand
    with load(exported["out"] / "model.stream.portable.onnx") as b:
        feeds = {"text": np.zeros((2, 3, 5), np.float32), "audio": np.zeros((2, 3, 3), np.float32)}
        feeds.update({s.name: np.zeros([2] + list(s.shape[1:]), np.float32) for s in b.inputs
                      if s.name.startswith("state.")})
        feeds["state.scan.0"] = np.zeros((2, 32, 5), np.float32)
        with pytest.raises(UserError, match="'state.scan.0' axis 2 is 5, expected 4"):
            b.run(feeds)


def test_cli_profile_streaming(exported, capsys):
    from cm_deploy.cli import main
    rc = main(["profile", str(exported["out"] / "model.stream.portable.onnx"), "--streaming", "--batch", "1",
               "--length", "1,4", "--iters", "3", "--warmup", "1", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = json.loads(out)
    assert [r["chunk"] for r in rows] == [1, 4] and all(r["streaming"] and r["p50_ms"] > 0 for r in rows)
    rc = main(["profile", str(exported["out"] / "model.portable.onnx"), "--streaming"])
    out, err = capsys.readouterr()
    assert rc == 2 and "not a streaming graph" in err


def test_stream_state_stays_in_ort_values_and_run_fills_zero_state(exported, tmp_path, capsys):
    """ONNX Runtime: the state is bound back as OrtValues (on the GPU with the CUDA provider, no host
    round trip); `cm-deploy run` on a streaming graph without state starts a stream (zero state)."""
    from cm_deploy.cli import main
    from cm_deploy.runtime import open_stream
    xs, lens = _data(L=7, seed=9)
    chunk = {n: x.numpy() for n, x in zip(MODS, xs)}
    with open_stream(exported["out"] / "model.stream.portable.onnx", batch=2) as s:
        first = s.state_addresses()
        y1 = s.push(chunk)
        assert s.device_state and all(type(v).__name__ == "OrtValue" for v in s.state.values())
        assert s.state_device == ("cpu" if s.backend.device_type == "cpu" else "cuda:0")
        # two state sets used in turn: the next state is written where the one after next is read
        second = s.state_addresses()
        assert set(second.values()).isdisjoint(first.values())
        s.push(chunk)
        assert s.state_addresses() == first
        s.reset()                                    # zeroed in place: the same addresses
        assert s.state_addresses() == first and float(s.state["state.count"].numpy().max()) == 0.0
        np.testing.assert_array_equal(s.push(chunk), y1)
    np.savez(tmp_path / "x.npz", **chunk)
    rc = main(["run", str(exported["out"] / "model.stream.portable.onnx"), "--inputs", str(tmp_path / "x.npz"),
               "-o", str(tmp_path / "y.npz")])
    assert rc == 0, capsys.readouterr().err
    with np.load(tmp_path / "y.npz") as z:
        np.testing.assert_allclose(z["output"], y1, rtol=1e-6, atol=1e-7)
        assert "next_state.count" in z.files and (z["next_state.count"] == 7).all()


def test_parity_of_a_streaming_graph(exported, tmp_path, capsys):
    """cm-deploy parity on model.stream*.onnx runs the checkpoint's streaming step (output and every
    next state), and fails for another checkpoint's weights."""
    from cm_deploy.cli import main
    rc = main(["parity", str(exported["ckpt"]), str(exported["out"] / "model.stream.portable.onnx")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "torch[cpu,float32,reference,step]" in out and "next_state.scan.1" in out and "PASS" in out
    assert "text:" not in out                   # no ragged shapes: a chunk has one T for every modality
    other = save_checkpoint(_model("pad", seed=1), tmp_path / "other.pt")
    rc = main(["parity", str(other), str(exported["out"] / "model.stream.portable.onnx")])
    out, _ = capsys.readouterr()
    assert rc == 1 and "FAIL" in out


def test_stream_expected_inputs_mark_state_optional(exported):
    from cm_deploy.runtime import load
    with load(exported["out"] / "model.stream.portable.onnx") as m:
        n_states = sum(s.name.startswith("state.") for s in m.inputs)
        with pytest.raises(UserError) as e:
            m.run({"text": np.zeros((1, 2, 5), np.float32)})
    assert (f"(missing 'audio'); expected text, audio (optional: text_lengths, audio_lengths, state.* "
            f"({n_states} tensors, zeros when left out))") in str(e.value)
