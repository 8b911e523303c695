"""ONNX export: the TensorRT graph's CoupledScan nodes, the portable graph in ONNX Runtime against
the PyTorch model, the manifest, and every refusal (nothing half-written left behind).

Every export costs seconds of torch.export tracing, so each configuration is exported once per
module (fixtures) and then checked from several sides."""
import datetime
import hashlib
import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import cm_deploy  # noqa: E402
from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint  # noqa: E402
from cm_deploy.errors import UserError  # noqa: E402
from cm_deploy.export import export_checkpoint  # noqa: E402
from cm_deploy.export import exporter as exporter_mod  # noqa: E402
from cm_deploy.export.portable import CHUNK, coupled_scan_function  # noqa: E402
from cm_deploy.model import resample_linear  # noqa: E402
from cm_deploy.ops import coupled_scan  # noqa: E402
from cm_deploy.runtime.placement import predict_cuda_placement  # noqa: E402

MODS = {"text": 6, "audio": 5}
MODS3 = {"text": 6, "audio": 5, "vision": 3}
OUT_FILES = {"model.onnx", "model.portable.onnx", "manifest.json"}
# (batch, lengths in config order): equal and different lengths, either modality the longest,
# batch 1, L 1 (everywhere and for one modality only).
SHAPES = [(2, (5, 9)), (3, (12, 4)), (1, (1, 1)), (1, (7, 7)), (4, (1, 6)), (2, (33, 2))]


def _config(mods=MODS, **kw):
    base = dict(modalities=dict(mods), d_model=16, n_layers=2, d_state=4, d_conv=3)
    base.update(kw)
    return CoupledMambaConfig(**base)


def _checkpoint(path, seed=0, **kw):
    torch.manual_seed(seed)
    model = CoupledMamba(_config(**kw)).eval()
    return model, save_checkpoint(model, path)


def _inputs(config, batch, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, L, f, generator=g) for L, f in zip(lens, config.modalities.values())]


def _ort_run(path, config, xs, np_dtype=np.float32):
    """The graph on whole sequences (every lengths input = its modality's full length)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: x.numpy().astype(np_dtype) for n, x in zip(config.modalities, xs)}
    feeds.update({f"{n}_lengths": np.full(x.shape[0], x.shape[1], np.int64) for n, x in zip(config.modalities, xs)})
    return sess.run(["output"], feeds)[0]


def _export(tmp_path_factory, name, ckpt_kw=None, **export_kw):
    d = tmp_path_factory.mktemp(name)
    model, ckpt = _checkpoint(d / "ckpt.pt", **(ckpt_kw or {}))
    manifest = export_checkpoint(ckpt, d / "out", **export_kw)
    return SimpleNamespace(model=model.set_scan_impl("reference"), ckpt=ckpt, out=d / "out",
                           manifest=manifest, config=model.config)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return _export(tmp_path_factory, "fp32")


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    return _export(tmp_path_factory, "fp16", ckpt_kw=dict(n_layers=1), dtype="float16")


@pytest.fixture(scope="module")
def uncoupled(tmp_path_factory):
    """The ablation (M independent scans per layer), the pad length rule, kappa = 1, 3 modalities."""
    return _export(tmp_path_factory, "uncoupled",
                   ckpt_kw=dict(mods=MODS3, n_layers=1, coupled=False, length_rule="pad",
                                coupling_scale=1.0))


# ---------------------------------------------------------------------------- ONNX Runtime parity

@pytest.mark.parametrize("batch,lens", SHAPES)
def test_portable_float32_matches_pytorch(fp32, batch, lens):
    xs = _inputs(fp32.config, batch, lens)
    with torch.no_grad():
        ref = fp32.model(xs).numpy()
    out = _ort_run(fp32.out / "model.portable.onnx", fp32.config, xs)
    assert out.shape == (batch, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,lens", SHAPES[:4])
def test_portable_float16_matches_pytorch_loosely(fp16, batch, lens):
    xs = _inputs(fp16.config, batch, lens)
    with torch.no_grad():
        ref = fp16.model(xs).numpy()       # the float32 model: the truth float16 approximates
    out = _ort_run(fp16.out / "model.portable.onnx", fp16.config, xs, np.float16)
    assert out.shape == (batch, 1) and out.dtype == np.float16
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("batch,lens", [(2, (5, 9, 3)), (1, (1, 1, 1)), (3, (4, 2, 11))])
def test_portable_uncoupled_pad_matches_pytorch(uncoupled, batch, lens):
    xs = _inputs(uncoupled.config, batch, lens)
    with torch.no_grad():
        ref = uncoupled.model(xs).numpy()
    out = _ort_run(uncoupled.out / "model.portable.onnx", uncoupled.config, xs)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_fixed_shapes_and_existing_folder(fp32, tmp_path):
    """batch and one length fixed; exporting into a folder that has other files keeps them and
    replaces the previous export."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "model.onnx").write_bytes(b"stale")
    manifest = export_checkpoint(fp32.ckpt, out, batch=1, lengths={"audio": 4})
    assert sorted(os.listdir(out)) == sorted(OUT_FILES | {"keep.txt"})
    assert (out / "keep.txt").read_text() == "mine"
    assert manifest["inputs"] == [{"name": "text", "shape": [1, "L_text", 6], "dtype": "float32"},
                                  {"name": "audio", "shape": [1, 4, 5], "dtype": "float32"},
                                  {"name": "text_lengths", "shape": [1], "dtype": "int64"},
                                  {"name": "audio_lengths", "shape": [1], "dtype": "int64"}]
    assert manifest["outputs"] == [{"name": "output", "shape": [1, 1], "dtype": "float32"}]
    assert manifest["dynamic_axes"] == {"text": {"1": "L_text"}, "audio": {}, "text_lengths": {}, "audio_lengths": {}, "output": {}}
    g = onnx.load(str(out / "model.onnx")).graph
    assert [d.dim_value or d.dim_param for d in g.input[1].type.tensor_type.shape.dim] == [1, 4, 5]
    assert predict_cuda_placement(out / "model.onnx").copies == []
    for lens in ((9, 4), (1, 4), (3, 4)):
        xs = _inputs(fp32.config, 1, lens)
        with torch.no_grad():
            ref = fp32.model(xs).numpy()
        np.testing.assert_allclose(_ort_run(out / "model.portable.onnx", fp32.config, xs), ref,
                                   rtol=1e-4, atol=1e-4)


def test_bfloat16_export(fp32, tmp_path):
    # fixed shapes: a faster export, and TensorRT's usual bf16 use
    manifest = export_checkpoint(fp32.ckpt, tmp_path / "out", dtype="bfloat16", batch=2,
                                 lengths={"text": 5, "audio": 8})
    assert manifest["dtype"] == "bfloat16" and manifest["opset"] == 22   # Conv has bf16 from 22 on
    assert {e["dtype"] for e in manifest["inputs"] + manifest["outputs"]
            if not e["name"].endswith("_lengths")} == {"bfloat16"}
    m = onnx.load(str(tmp_path / "out" / "model.onnx"))
    scan_inputs = {i for n in m.graph.node if n.op_type == "CoupledScan" for i in n.input}
    weights = {t.name: t.data_type for t in m.graph.initializer if t.name in scan_inputs}
    assert weights and set(weights.values()) == {onnx.TensorProto.FLOAT}   # A, D, delta_bias
    # ONNX Runtime's CPU provider has no bfloat16 MatMul: the portable bf16 file is for GPU
    # providers; when this ORT has the kernels, check it too.
    try:
        sess = ort.InferenceSession(str(tmp_path / "out" / "model.portable.onnx"),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:   # NOT_IMPLEMENTED
        pytest.skip(f"ONNX Runtime CPU cannot run bfloat16 graphs: {str(e).splitlines()[0][:120]}")
    import ml_dtypes
    xs = _inputs(fp32.config, 2, (5, 8))
    feeds = {n: x.numpy().astype(ml_dtypes.bfloat16) for n, x in zip(MODS, xs)}
    feeds.update({f"{n}_lengths": np.full(2, x.shape[1], np.int64) for n, x in zip(MODS, xs)})
    out = sess.run(None, feeds)[0]
    with torch.no_grad():
        np.testing.assert_allclose(out.astype(np.float32), fp32.model(xs).numpy(), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------------------- graph structure

def _attrs(node):
    return {a.name: (a.type, onnx.helper.get_attribute_value(a)) for a in node.attribute}


def test_tensorrt_graph_structure(fp32):
    m = onnx.load(str(fp32.out / "model.onnx"))
    onnx.checker.check_model(m, full_check=True)
    assert {(o.domain, o.version) for o in m.opset_import} == {("", 18), ("cm_deploy", 1)}
    assert not any(f.name == "CoupledScan" for f in m.functions)    # else TensorRT inlines it
    assert [i.name for i in m.graph.input] == ["text", "audio", "text_lengths", "audio_lengths"]
    assert [o.name for o in m.graph.output] == ["output"]
    nodes = [n for n in m.graph.node if n.op_type == "CoupledScan"]
    assert len(nodes) == fp32.config.n_layers
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for layer, node in zip(fp32.model.layers, nodes):
        assert node.domain == "cm_deploy" and len(node.output) == 1
        assert len(node.input) == 8 and all(node.input)
        attrs = _attrs(node)
        assert attrs.pop("delta_softplus") == (onnx.AttributeProto.INT, 1)
        t, kappa = attrs.pop("coupling_scale")
        assert t == onnx.AttributeProto.FLOAT and kappa == pytest.approx(0.5)   # None -> 1/M
        # the plugin's output count (plugins/trt_coupled_scan/README.md): y only
        assert attrs.pop("has_final_state") == (onnx.AttributeProto.INT, 0)
        assert attrs == {}
        # the weights sit at the contract's positions: A (2), D (5), delta_bias (7), float32
        with torch.no_grad():
            A = (-torch.exp(layer.A_log)).numpy()
            D = layer.D.numpy()
            bias = layer.dt_bias.numpy()
        for pos, want in ((2, A), (5, D), (7, bias)):
            got = inits[node.input[pos]]
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("which", ["fp32", "fp16", "uncoupled"])
def test_tensorrt_graph_keeps_every_node_on_the_cuda_device(which, request):
    """ONNX Runtime's CUDA provider, as its CPU-preferred pass places model.onnx (predicted from the
    graph: runtime/placement.py; checked against ORT itself in tests/gpu): no host<->device copy,
    so that enable_cuda_graph accepts the graph, and on the host only the Max of the modalities'
    lengths (the common length: shape values, read on the host by ConstantOfShape)."""
    e = request.getfixturevalue(which)
    p = predict_cuda_placement(e.out / "model.onnx")
    assert p.copies == [] and p.cuda_graph_ok, p.copies
    assert [n["op_type"] for n in p.host_nodes] == ["Max"]
    m = onnx.load(str(e.out / "model.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert not ops & {"Range", "Squeeze"}, "steps and lengths come from Shape -> ConstantOfShape -> CumSum"
    # every Reshape's shape is a constant (-1 for the one computed dim)
    consts = {t.name for t in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant" for o in n.output}
    assert all(n.input[1] in consts for n in m.graph.node if n.op_type == "Reshape")


def test_uncoupled_graph_has_one_node_per_modality(uncoupled):
    m = onnx.load(str(uncoupled.out / "model.onnx"))
    nodes = [n for n in m.graph.node if n.op_type == "CoupledScan"]
    assert len(nodes) == 3 == uncoupled.manifest["custom_ops"][0]["count"]
    assert all(_attrs(n)["coupling_scale"][1] == 1.0 for n in nodes)


def test_portable_graph_is_the_same_graph_plus_the_function(fp32):
    t = onnx.load(str(fp32.out / "model.onnx"))
    p = onnx.load(str(fp32.out / "model.portable.onnx"))
    onnx.checker.check_model(p, full_check=True)
    assert p.graph.SerializeToString() == t.graph.SerializeToString()
    (fn,) = [f for f in p.functions if f.name == "CoupledScan"]
    assert fn.domain == "cm_deploy" and list(fn.input) == ["u", "delta", "A", "B", "C", "D", "z",
                                                           "delta_bias"]
    assert set(fn.attribute) == {"delta_softplus", "coupling_scale", "has_final_state"}
    # Scans over chunks of CHUNK steps, and of one step for what is left and for short sequences
    def scans(nodes):
        for n in nodes:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from ([a.g.name] if n.op_type == "Scan" else scans(a.g.node))
    assert sorted(scans(fn.node)) == ["CoupledScan_1_steps"] * 2 + [f"CoupledScan_{CHUNK}_steps"]


@pytest.mark.parametrize("name", ["model.onnx", "model.portable.onnx"])
def test_shape_inference_gives_the_output_shape(fp16, name):
    m = onnx.load(str(fp16.out / name))
    m.graph.output[0].type.tensor_type.ClearField("shape")      # not from the declaration
    inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    tt = inferred.graph.output[0].type.tensor_type
    assert tt.elem_type == onnx.TensorProto.FLOAT16
    assert [d.dim_param or d.dim_value for d in tt.shape.dim] == ["batch", 1]


# ---------------------------------------------------------------------------- the manifest

def test_manifest(fp32):
    man = fp32.manifest
    assert json.loads((fp32.out / "manifest.json").read_text()) == man
    assert set(os.listdir(fp32.out)) == OUT_FILES
    assert set(man) == {"format", "tool_version", "created", "checkpoint", "config", "dtype", "opset",
                        "files", "inputs", "outputs", "dynamic_axes", "custom_ops", "torch_version",
                        "onnx_version"}
    assert man["format"] == "cm-deploy-manifest/1"
    assert man["tool_version"] == cm_deploy.__version__
    assert datetime.datetime.fromisoformat(man["created"]).tzinfo is not None
    assert man["checkpoint"] == {"path": str(Path(fp32.ckpt).resolve()),
                                 "sha256": hashlib.sha256(Path(fp32.ckpt).read_bytes()).hexdigest()}
    assert man["config"] == fp32.config.to_dict()
    assert man["dtype"] == "float32" and man["opset"] == 18
    assert man["files"] == {"tensorrt": "model.onnx", "portable": "model.portable.onnx"}
    assert man["inputs"] == [{"name": "text", "shape": ["batch", "L_text", 6], "dtype": "float32"},
                             {"name": "audio", "shape": ["batch", "L_audio", 5], "dtype": "float32"},
                             {"name": "text_lengths", "shape": ["batch"], "dtype": "int64"},
                             {"name": "audio_lengths", "shape": ["batch"], "dtype": "int64"}]
    assert man["outputs"] == [{"name": "output", "shape": ["batch", 1], "dtype": "float32"}]
    assert man["dynamic_axes"] == {"text": {"0": "batch", "1": "L_text"}, "audio": {"0": "batch", "1": "L_audio"},
                                   "text_lengths": {"0": "batch"}, "audio_lengths": {"0": "batch"},
                                   "output": {"0": "batch"}}
    assert man["custom_ops"] == [{"domain": "cm_deploy", "op_type": "CoupledScan", "count": 2,
                                  "plugin_name": "CoupledScan", "plugin_version": "1"}]
    assert man["torch_version"] == torch.__version__ and man["onnx_version"] == onnx.__version__
    # the manifest describes the graph as written
    g = onnx.load(str(fp32.out / "model.onnx")).graph
    for entry, vi in zip(man["inputs"], g.input):
        assert entry["shape"] == [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_float16_manifest_and_io(fp16):
    man = fp16.manifest
    assert man["dtype"] == "float16"
    assert {e["dtype"] for e in man["inputs"] + man["outputs"] if not e["name"].endswith("_lengths")} == {"float16"}


# ---------------------------------------------------------------------------- refusals

class Arbitrary:
    """Not on torch's weights_only allowlist."""


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_checkpoint(kind, path, tmp_path):
    cfg = _config()
    good = {"format": "cm-deploy/1", "config": cfg.to_dict(),
            "state_dict": CoupledMamba(cfg).state_dict()}
    if kind == "missing":
        return path
    if kind == "truncated":
        torch.save(good, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign_object":
        torch.save({"format": "cm-deploy/1", "config": cfg.to_dict(), "state_dict": {},
                    "extra": Arbitrary()}, path)
    elif kind == "raw_pickle_exploit":
        path.write_bytes(pickle.dumps(Exploit(str(tmp_path / "pwned"))))
    elif kind == "not_cm_deploy":
        torch.save({"model": {"w": torch.zeros(3)}}, path)
    elif kind == "invalid_config":
        torch.save({**good, "config": {**cfg.to_dict(), "d_model": -1}}, path)
    elif kind == "wrong_weights":
        sd = dict(good["state_dict"])
        sd["embed.text.weight"] = torch.zeros(3, 6)
        torch.save({**good, "state_dict": sd}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    return path


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["missing", "truncated", "foreign_object", "raw_pickle_exploit",
                                  "not_cm_deploy", "invalid_config", "wrong_weights", "empty"])
def test_bad_checkpoint_is_a_user_error_and_leaves_nothing(kind, tmp_path):
    ckpt = _bad_checkpoint(kind, tmp_path / "ckpt.pt", tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(UserError) as ei:
        export_checkpoint(ckpt, tmp_path / "a" / "out")
    msg = str(ei.value)
    assert "\n" not in msg and str(ckpt) in msg
    assert _listing(tmp_path) == before
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("opts,match", [
    (dict(dtype="float64"), "dtype"), (dict(opset=7), "opset"), (dict(dtype="bfloat16", opset=18), "opset"),
    (dict(batch=0), "batch"), (dict(lengths={"speech": 4}), "speech"), (dict(lengths={"text": 0}), "text"),
])
def test_bad_options_are_user_errors(fp32, tmp_path, opts, match):
    with pytest.raises(UserError, match=match):
        export_checkpoint(fp32.ckpt, tmp_path / "out", **opts)
    assert os.listdir(tmp_path) == []


def test_unwritable_output_folder(fp32, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker, blocker / "out", blocker / "deeper" / "out"):
        with pytest.raises(UserError, match="cannot write"):
            export_checkpoint(fp32.ckpt, out)
    assert _listing(tmp_path) == ["a_file"] and blocker.read_text() == "x"
    if os.geteuid() != 0:          # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(UserError, match="cannot write"):
                export_checkpoint(fp32.ckpt, ro / "out")
            assert os.listdir(ro) == []
        finally:
            ro.chmod(0o700)


def test_failures_after_start_leave_nothing_and_keep_old_files(fp32, tmp_path, monkeypatch):
    # 1. the export itself fails: no output folder, no created parents, no temp folder
    def boom(*a, **k):
        raise RuntimeError("exporter exploded")
    monkeypatch.setattr(exporter_mod, "build_onnx", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        export_checkpoint(fp32.ckpt, tmp_path / "new" / "deep" / "out")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    # 2. writing fails half-way into an existing export: the old files stay whole
    out = tmp_path / "out"
    out.mkdir()
    for name in OUT_FILES:
        (out / name).write_bytes(b"old " + name.encode())
    trt = onnx.load(str(fp32.out / "model.onnx"))
    portable = onnx.load(str(fp32.out / "model.portable.onnx"))
    monkeypatch.setattr(exporter_mod, "build_onnx",
                        lambda *a, **k: (trt, portable, {"opset": 18, "count": 2}))
    calls = []

    def save(proto, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        onnx.save_model(proto, str(path))
    monkeypatch.setattr(exporter_mod, "_save", save)
    with pytest.raises(UserError, match="No space left"):
        export_checkpoint(fp32.ckpt, out)
    assert sorted(os.listdir(out)) == sorted(OUT_FILES)
    for name in OUT_FILES:
        assert (out / name).read_bytes() == b"old " + name.encode()


def test_output_named_modality_is_refused(tmp_path):
    _, ckpt = _checkpoint(tmp_path / "c.pt", mods={"output": 3, "text": 4}, n_layers=1)
    with pytest.raises(UserError, match="output"):
        export_checkpoint(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- pieces

def test_onnx_impl_runs_the_reference_outside_export():
    g = torch.Generator().manual_seed(0)
    b, M, L, E, N = 2, 2, 5, 8, 4
    u, d, z = (torch.randn(b, M, L, E, generator=g) for _ in range(3))
    B, C = (torch.randn(b, M, L, N, generator=g) for _ in range(2))
    A = -torch.rand(M, E, N, generator=g)
    D, bias = torch.randn(M, E, generator=g), torch.randn(M, E, generator=g)
    kw = dict(delta_softplus=True)
    torch.testing.assert_close(coupled_scan(u, d, A, B, C, D, z, bias, impl="onnx", **kw),
                               coupled_scan(u, d, A, B, C, D, z, bias, impl="reference", **kw))


@pytest.mark.parametrize("softplus,kappa,np_dtype", [(0, 1.0, np.float32), (1, 0.3, np.float16)])
def test_portable_function_alone(softplus, kappa, np_dtype):
    """The function's attributes reach its body; float16 I/O runs on ORT CPU (math in float32)."""
    from onnx import TensorProto, helper
    act = TensorProto.FLOAT16 if np_dtype == np.float16 else TensorProto.FLOAT
    shapes = {"u": ["b", 3, "L", 8], "delta": ["b", 3, "L", 8], "A": [3, 8, 4], "B": ["b", 3, "L", 4],
              "C": ["b", 3, "L", 4], "D": [3, 8], "z": ["b", 3, "L", 8], "delta_bias": [3, 8]}
    f32 = {"A", "D", "delta_bias"}
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT if n in f32 else act, s)
           for n, s in shapes.items()]
    node = helper.make_node("CoupledScan", list(shapes), ["y"], domain="cm_deploy",
                            delta_softplus=softplus, coupling_scale=kappa, has_final_state=0)
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("y", act, shapes["u"])])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("cm_deploy", 1)]
    model = helper.make_model(graph, functions=[coupled_scan_function(18)], opset_imports=opsets,
                              ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    for b, L in ((2, 9), (1, 1)):
        t = {n: torch.randn(*[{"b": b, "L": L}.get(s, s) for s in shp], generator=g)
             for n, shp in shapes.items()}
        t["A"] = -torch.rand(3, 8, 4, generator=g) * 2
        if not softplus:
            t["delta"] = t["delta"].abs()
            t["delta_bias"] = t["delta_bias"].abs()
        acts = {n: v if n in f32 else v.to(torch.float16 if np_dtype == np.float16 else torch.float32)
                for n, v in t.items()}
        ref = coupled_scan(*acts.values(), delta_softplus=bool(softplus), coupling_scale=kappa,
                           impl="reference").float().numpy()
        out = sess.run(None, {n: v.numpy() for n, v in acts.items()})[0]
        assert out.dtype == np_dtype
        tol = 1e-5 if np_dtype == np.float32 else 1e-2
        np.testing.assert_allclose(out.astype(np.float32), ref, rtol=tol, atol=tol)


def _scan_model(chunk, stateful, M=3, E=8, N=4, kappa=None):
    """One cm_deploy::CoupledScan node (float32, softplus) and the portable function with `chunk`."""
    from onnx import TensorProto, helper
    shapes = {"u": ["b", M, "L", E], "delta": ["b", M, "L", E], "A": [M, E, N], "B": ["b", M, "L", N],
              "C": ["b", M, "L", N], "D": [M, E], "z": ["b", M, "L", E], "delta_bias": [M, E]}
    if stateful:
        shapes["initial_state"] = ["b", E, N]
    outs = {"y": shapes["u"], **({"final_state": ["b", E, N]} if stateful else {})}
    vi = helper.make_tensor_value_info
    node = helper.make_node("CoupledScan", list(shapes), list(outs), domain="cm_deploy", delta_softplus=1,
                            coupling_scale=1.0 / M if kappa is None else kappa, has_final_state=int(stateful))
    graph = helper.make_graph([node], "g", [vi(n, TensorProto.FLOAT, s) for n, s in shapes.items()],
                              [vi(n, TensorProto.FLOAT, s) for n, s in outs.items()])
    model = helper.make_model(graph, functions=[coupled_scan_function(18, stateful=stateful, chunk=chunk)],
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("cm_deploy", 1)],
                              ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def _scan_args(b, L, M=3, E=8, N=4, seed=0, steep=False):
    g = torch.Generator().manual_seed(seed)
    t = {"u": torch.randn(b, M, L, E, generator=g), "delta": torch.randn(b, M, L, E, generator=g),
         "A": -torch.rand(M, E, N, generator=g) * (300.0 if steep else 3.0),     # steep: dt * A to about -1e3
         "B": torch.randn(b, M, L, N, generator=g), "C": torch.randn(b, M, L, N, generator=g),
         "D": torch.randn(M, E, generator=g), "z": torch.randn(b, M, L, E, generator=g),
         "delta_bias": torch.randn(M, E, generator=g)}
    return t, torch.randn(b, E, N, generator=g)


def _close(got, want, what):
    """Within 1e-5 of the reference, relative to its largest magnitude (float32 round-off)."""
    want = want.numpy() if isinstance(want, torch.Tensor) else want
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()), err_msg=what)


@pytest.mark.parametrize("kappa", [None, 1.0])
@pytest.mark.parametrize("chunk", [4, CHUNK])
def test_chunked_portable_scan_matches_the_reference(chunk, kappa):
    """The portable function (Scan over chunks of `chunk` steps, steps shorter than a chunk one per
    iteration) against coupled_scan_reference: L of 1, below, at, one over and not a multiple of the
    chunk, several chunks; kappa 1/M and 1; from zeros and from an initial state, with the final
    state; a sequence in two pieces (the second from the first's final state) equal to one run;
    steep decays (exp(dt * A) underflows to 0)."""
    from cm_deploy.ops.reference import coupled_scan_reference
    plain = ort.InferenceSession(_scan_model(chunk, False, kappa=kappa).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    stateful = ort.InferenceSession(_scan_model(chunk, True, kappa=kappa).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    for i, (b, L) in enumerate([(2, 1), (1, chunk - 1), (2, chunk), (1, chunk + 1), (2, 3 * chunk + 2)]):
        for steep in (False, True):
            t, c0 = _scan_args(b, L, seed=i, steep=steep)
            kw = dict(delta_softplus=True, coupling_scale=kappa, return_final_state=True)
            what = f"chunk {chunk} kappa {kappa} b {b} L {L} steep {steep}"
            y, _ = coupled_scan_reference(*t.values(), **kw)
            _close(plain.run(None, {k: v.numpy() for k, v in t.items()})[0], y, what)
            y, c = coupled_scan_reference(*t.values(), initial_state=c0, **kw)
            got_y, got_c = stateful.run(None, {**{k: v.numpy() for k, v in t.items()}, "initial_state": c0.numpy()})
            _close(got_y, y, what + " with state")
            _close(got_c, c, what + " final state")
            if L > 2:   # in two pieces, split inside a chunk
                cut = L // 2 + 1
                first = {k: v[:, :, :cut].numpy() if v.dim() == 4 else v.numpy() for k, v in t.items()}
                second = {k: v[:, :, cut:].numpy() if v.dim() == 4 else v.numpy() for k, v in t.items()}
                y1, c1 = stateful.run(None, {**first, "initial_state": c0.numpy()})
                y2, c2 = stateful.run(None, {**second, "initial_state": c1})
                _close(np.concatenate([y1, y2], axis=2), y, what + " in two pieces")
                _close(c2, c, what + " in two pieces, final state")


def test_chunked_portable_scan_in_onnx_reference_evaluator():
    """ONNX's reference evaluator runs both branches of the function (one step per iteration, and
    chunks with padding) and agrees with the reference scan."""
    from onnx.reference import ReferenceEvaluator
    from cm_deploy.ops.reference import coupled_scan_reference
    ev = ReferenceEvaluator(_scan_model(4, True))
    for b, L in ((2, 3), (1, 11)):
        t, c0 = _scan_args(b, L, seed=L)
        y, c = coupled_scan_reference(*t.values(), delta_softplus=True, initial_state=c0, return_final_state=True)
        got_y, got_c = ev.run(None, {**{k: v.numpy() for k, v in t.items()}, "initial_state": c0.numpy()})
        _close(got_y, y, f"L {L}")
        _close(got_c, c, f"L {L} final state")


def test_resample_linear_is_f_interpolate():
    g = torch.Generator().manual_seed(0)
    for Lm, L in ((1, 1), (1, 5), (2, 2), (3, 10), (7, 31), (100, 103)):
        h = torch.randn(2, Lm, 4, generator=g)
        want = F.interpolate(h.transpose(1, 2), size=L, mode="linear", align_corners=True).transpose(1, 2)
        torch.testing.assert_close(resample_linear(h, L), want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- lengths inputs

def _padded(config, valid, padded, seed=0, fill=float("nan")):
    """A batch padded to `padded` lengths with `fill` past each sample's valid lengths."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(len(valid), L, f, generator=g) for L, f in zip(padded, config.modalities.values())]
    for i, v in enumerate(valid):
        for x, n in zip(xs, v):
            x[i, n:] = fill
    lens = [torch.tensor([v[k] for v in valid]) for k in range(len(padded))]
    return xs, lens


def _feeds(config, xs, lens, np_dtype=np.float32):
    feeds = {n: x.numpy().astype(np_dtype) for n, x in zip(config.modalities, xs)}
    feeds.update({f"{n}_lengths": ln.numpy() for n, ln in zip(config.modalities, lens)})
    return feeds


def _sessions(out):
    from cm_deploy.runtime.native import find_library
    yield "model.portable.onnx", ort.InferenceSession(str(out / "model.portable.onnx"), providers=["CPUExecutionProvider"])
    lib = find_library("ort", required=False)
    if lib is not None:     # model.onnx runs in ONNX Runtime with the op library (test_ort_ops.py)
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(lib))
        yield "model.onnx", ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])


def test_graph_inputs_are_modalities_then_lengths(fp32):
    g = onnx.load(str(fp32.out / "model.onnx")).graph
    names = [i.name for i in g.input]
    assert names == ["text", "audio", "text_lengths", "audio_lengths"]
    for vi in g.input[2:]:
        assert vi.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in vi.type.tensor_type.shape.dim] == ["batch"]
    assert [i["name"] for i in fp32.manifest["inputs"]] == names


@pytest.mark.parametrize("which", ["fp32", "uncoupled"])
def test_exported_graphs_honour_lengths_whatever_the_padding_holds(which, request):
    e = request.getfixturevalue(which)
    M = e.config.n_modalities
    valid = [(7, 2, 7)[:M], (9, 6, 11)[:M], (3, 1, 5)[:M], (1, 1, 1)[:M]]
    padded = (9, 6, 11)[:M]
    xs, lens = _padded(e.config, valid, padded)
    with torch.no_grad():
        ref = e.model(xs, lengths=lens).numpy()
        alone = np.concatenate([e.model([x[i:i + 1, :n] for x, n in zip(xs, v)]).numpy()
                                for i, v in enumerate(valid)])
    np.testing.assert_allclose(ref, alone, rtol=1e-5, atol=1e-6)
    xs2, _ = _padded(e.config, valid, padded, fill=1e4)
    for name, sess in _sessions(e.out):
        out = sess.run(["output"], _feeds(e.config, xs, lens))[0]
        np.testing.assert_allclose(out, alone, rtol=1e-4, atol=1e-5, err_msg=name)
        out2 = sess.run(["output"], _feeds(e.config, xs2, lens))[0]
        np.testing.assert_array_equal(out, out2, err_msg=name)


def test_float16_graph_honours_lengths(fp16):
    valid, padded = [(4, 6), (6, 2)], (6, 6)
    xs, lens = _padded(fp16.config, valid, padded)
    with torch.no_grad():
        alone = np.concatenate([fp16.model([x[i:i + 1, :n] for x, n in zip(xs, v)]).numpy()
                                for i, v in enumerate(valid)])
    for name, sess in _sessions(fp16.out):
        out = sess.run(["output"], _feeds(fp16.config, xs, lens, np.float16))[0]
        assert np.isfinite(out).all(), name
        np.testing.assert_allclose(out.astype(np.float32), alone, rtol=2e-2, atol=2e-2, err_msg=name)


def test_portable_runs_in_onnx_reference_evaluator(fp32):
    """The portable file runs on every conforming runtime, ONNX's own reference evaluator included,
    and agrees with ONNX Runtime and PyTorch."""
    from onnx.reference import ReferenceEvaluator
    ev = ReferenceEvaluator(onnx.load(str(fp32.out / "model.portable.onnx")))
    xs, lens = _padded(fp32.config, [(5, 3), (2, 4)], (5, 4), seed=2)
    feeds = _feeds(fp32.config, xs, lens)
    got = ev.run(["output"], feeds)[0]
    sess = ort.InferenceSession(str(fp32.out / "model.portable.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, sess.run(["output"], feeds)[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(got, fp32.model(xs, lengths=lens).numpy(), rtol=1e-4, atol=1e-5)
