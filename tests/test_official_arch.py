"""The official Coupled Mamba code's MutiMamba (cm_deploy.foreign.official): its config read from a
state_dict, our forward against the official forward's structure run on mamba-ssm's own Mamba,
`cm-deploy export --arch coupled-mamba-official` (ORT with the op library, the portable graph, the
streaming graphs, parity, fp16) and the refusal of foreign or broken state_dicts (one line, exit 2)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mamba_ssm_src import mamba_ssm_or_skip  # noqa: E402

from cm_deploy.cli import main  # noqa: E402
from cm_deploy.export.modules import export_official  # noqa: E402
from cm_deploy.foreign.official import OfficialConfig, OfficialCoupledMamba, infer_config, load_official  # noqa: E402
from cm_deploy.runtime import load, open_stream  # noqa: E402
from cm_deploy.runtime.native import find_library  # noqa: E402

LIB = find_library("ort", required=False)
NO_LIB = "the CoupledScan ONNX Runtime op library is not built (scripts/build_plugin.sh)"
CFG = dict(d_model=16, n_layer=2, audio_dim=5, rgb_dim=4, flow_dim=3, d_inner=32, d_state=8, d_conv=4, dt_rank=3)
NAMES = ("input_A", "input_V", "input_F")
SHAPES = [(1, 1), (2, 9), (3, 33)]          # (batch, L): L = 1, odd, longer than a conv window


def _model(seed=0, **kw):
    """A MutiMamba with random weights; norms and fusion weights moved off their init so they matter."""
    torch.manual_seed(seed)
    m = OfficialCoupledMamba(OfficialConfig(**{**CFG, **kw})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.startswith("weight_"):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _inputs(batch, L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, L, f, generator=g) for f in (CFG["audio_dim"], CFG["rgb_dim"], CFG["flow_dim"])]


def _close(got, ref, tol):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    err = np.abs(got - ref).max()
    assert np.all(np.abs(got - ref) <= tol + tol * np.abs(ref)), f"max abs error {err:.3e} > tol {tol}"
    return err


def official_forward(sd, cfg, xs, Mamba):
    """MutiMamba.forward as the official code writes it - one modality at a time through the same
    blocks - with mamba-ssm's own Mamba (its selective_scan_ref path) as the mixer and plain torch
    for the rest: independent of cm_deploy's implementation."""
    d, eps = cfg.d_model, cfg.norm_eps

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))

    def norm(x, p):
        if p + ".bias" in sd:
            return F.layer_norm(x, (d,), sd[p + ".weight"], sd[p + ".bias"], eps)
        return F.rms_norm(x, (d,), sd[p + ".weight"], eps)

    mixers = []
    for i in range(cfg.n_layer):
        mx = Mamba(d, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.d_inner / d, dt_rank=cfg.dt_rank,
                   conv_bias=cfg.conv_bias, bias=cfg.bias, use_fast_path=False)
        prefix = f"layers.{i}.mixer."
        mx.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        mixers.append(mx.eval())
    emb = [F.relu(lin(x, f"fc_{c}.0")) for x, c in zip(xs, "avf")]
    for i in range(cfg.n_layer):
        outs = [norm(mixers[i](norm(e, f"layers.{i}.norm")), "norm_f") + e for e in emb]
        if i < cfg.n_layer - 1:
            emb = [outs[0] + F.relu(lin(torch.cat([outs[1], outs[2]], -1), f"resnet_audio.{i}.0")),
                   outs[1] + F.relu(lin(torch.cat([outs[0], outs[2]], -1), f"resnet_rgb.{i}.0")),
                   outs[2] + F.relu(lin(torch.cat([outs[0], outs[1]], -1), f"resnet_flow.{i}.0"))]
    w = [sd[k] for k in ("weight_audio_inner", "weight_visual_inner", "weight_flow_inner")]
    out = (w[0] * outs[0] + w[1] * outs[1] + w[2] * outs[2]) / (w[0] + w[1] + w[2])
    return torch.sigmoid(lin(F.relu(lin(out, "regressor.0")), "regressor.2")).squeeze(-1)


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------- the model

@pytest.mark.parametrize("kw", [{}, dict(rms_norm=True, conv_bias=False, bias=True),
                                dict(n_layer=3, d_state=16, d_conv=2, dt_rank=5, head_hidden=7)])
def test_config_read_from_state_dict(kw):
    want = OfficialConfig(**{**CFG, **kw})
    assert infer_config(_model(**kw).state_dict()) == want


@pytest.mark.parametrize("kw", [{}, dict(rms_norm=True, conv_bias=False, bias=True, n_layer=3)])
def test_forward_matches_the_official_structure_on_mamba_ssm(tmp_path_factory, kw):
    mamba_ssm_or_skip(tmp_path_factory.getbasetemp() / "mamba_ssm_src")
    from mamba_ssm.modules.mamba_simple import Mamba
    model = _model(**kw).set_scan_impl("reference")
    sd = model.state_dict()
    with torch.no_grad():
        for batch, L in SHAPES:
            xs = _inputs(batch, L)
            _close(model(*xs), official_forward(sd, model.config, xs, Mamba), 1e-5)


def test_mixer_on_the_triton_kernels():
    """The GPU path of the mixer (Triton conv and scan at M = 1, kappa = 1; here under Triton's
    interpreter) against the reference."""
    from cm_deploy.ops import triton_available
    if not triton_available(torch.device("cpu")):
        pytest.skip("Triton is not installed, or TRITON_INTERPRET=1 is not set")
    from cm_deploy.foreign.mamba1 import MambaMixer, mixer_forward
    torch.manual_seed(0)
    mixer = MambaMixer(8, 16, 4, 3, 2, bias=True)
    h = torch.randn(2, 13, 8)
    with torch.no_grad():
        _close(mixer_forward(mixer, h, impl="triton"), mixer_forward(mixer, h, impl="reference"), 1e-5)


def test_one_length_for_the_three_inputs():
    xs = _inputs(2, 5)
    xs[1] = xs[1][:, :4]
    with pytest.raises(ValueError, match="one length"):
        _model()(*xs)


# ---------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One official state_dict exported once through the CLI, with the streaming graphs."""
    d = tmp_path_factory.mktemp("official")
    model = _model()
    torch.save(model.state_dict(), d / "official.pt")
    rc = main(["export", str(d / "official.pt"), "--arch", "coupled-mamba-official", "-o", str(d / "out"),
               "--streaming", "--quiet"])
    assert rc == 0
    return d, model.set_scan_impl("reference")


def test_export_files_and_manifest(exported):
    d, model = exported
    out = d / "out"
    man = json.loads((out / "manifest.json").read_text())
    assert [e["name"] for e in man["inputs"]] == list(NAMES)
    assert [e["shape"] for e in man["inputs"]] == [["batch", "L", f] for f in (5, 4, 3)]
    assert man["outputs"] == [{"name": "output", "shape": ["batch", "L"], "dtype": "float32"}]
    assert man["config"]["arch"] == "coupled-mamba-official" and man["config"]["d_state"] == CFG["d_state"]
    assert man["custom_ops"][0]["count"] == CFG["n_layer"]
    assert set(man["files"].values()) == {"model.onnx", "model.portable.onnx", "model.stream.onnx",
                                          "model.stream.portable.onnx"}
    trt = onnx.load(str(out / "model.onnx"))
    nodes = [n for n in trt.graph.node if n.op_type == "CoupledScan"]
    assert len(nodes) == CFG["n_layer"] and not trt.functions     # one batched node per shared block
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"coupling_scale": 1.0, "delta_softplus": 1, "has_final_state": 0}
    assert any(f.name == "CoupledScan" for f in onnx.load(str(out / "model.portable.onnx")).functions)
    stream_in = [e["name"] for e in man["stream"]["inputs"]]
    assert stream_in[:3] == list(NAMES) and man["stream"]["inputs"][3]["shape"][:2] == ["batch", 3]


@pytest.mark.parametrize("graph", ["model.onnx", "model.portable.onnx"])
def test_export_round_trip_in_onnx_runtime(exported, graph):
    if graph == "model.onnx" and LIB is None:
        pytest.skip(NO_LIB)
    d, model = exported
    with load(d / "out" / graph, device="cpu", ort_ops=LIB) as m, torch.no_grad():
        for batch, L in SHAPES:
            xs = _inputs(batch, L, seed=batch)
            got = m.run({n: x.numpy() for n, x in zip(NAMES, xs)})["output"]
            _close(got, model(*xs), 1e-5)


@pytest.mark.parametrize("graph", ["model.stream.onnx", "model.stream.portable.onnx"])
def test_stream_graphs_give_the_whole_sequence(exported, graph):
    if graph == "model.stream.onnx" and LIB is None:
        pytest.skip(NO_LIB)
    d, model = exported
    xs = _inputs(2, 11)
    with torch.no_grad():
        ref = model(*xs).numpy()
    with open_stream(d / "out" / graph, batch=2, device="cpu", ort_ops=LIB) as s:
        ys = [s.push({n: x[:, a:b].numpy() for n, x in zip(NAMES, xs)}) for a, b in ((0, 1), (1, 5), (5, 11))]
    _close(np.concatenate(ys, axis=1), ref, 1e-5)


def test_parity_and_run_take_the_official_state_dict(exported, capsys):
    d, _ = exported
    rc, out, err = cli(capsys, "parity", d / "official.pt", d / "out" / "model.portable.onnx", "--atol", "1e-5",
                       "--rtol", "1e-5", "--batch", "1,3", "--length", "1,17")
    assert rc == 0, err
    assert out.strip().endswith("PASS") and out.count(" ok") == 4


def test_parity_default_shapes_keep_one_length():
    """Parity's default shapes: no case with a different length per input when the inputs share one
    named length axis (the official model); still one where the axes are unnamed."""
    from cm_deploy.runtime.parity import default_shapes
    from cm_deploy.runtime.specs import TensorSpec

    class Model:
        def __init__(self, dims):
            self.inputs = [TensorSpec(n, ("batch", d, f), "float32") for n, d, f in zip(NAMES, dims, (5, 4, 3))]

        def input_ranges(self):
            return None
    for dims, ragged in (("LLL", False), ((None, None, None), True)):
        shapes = default_shapes([Model(dims)])
        assert any(len(set(c.lengths.values())) > 1 for c in shapes) == ragged


def test_float16_export(exported, tmp_path):
    """float16 graphs (A, D and the dt bias float32) against the float32 forward: the parity tool's
    float16 tolerance."""
    d, model = exported
    export_official(d / "official.pt", tmp_path / "fp16", dtype="float16")
    graphs = ["model.portable.onnx"] + (["model.onnx"] if LIB is not None else [])
    for graph in graphs:
        with load(tmp_path / "fp16" / graph, device="cpu", ort_ops=LIB) as m, torch.no_grad():
            assert m.precision == "float16"
            for batch, L in SHAPES:
                xs = [x.half().float() for x in _inputs(batch, L)]
                got = m.run({n: x.half().numpy() for n, x in zip(NAMES, xs)})["output"]
                _close(got, model(*xs), 1e-2)


def build_engines_with_the_plugin(tmp_path, *graphs):
    """`cm-deploy build` of each graph with TensorRT-RTX and the CoupledScan plugin (a child process
    each, as tests/test_tensorrt_rtx.py does); skips when RTX or the plugin library is missing."""
    from test_tensorrt_rtx import _plugin_library, _rtx_importable
    if not _rtx_importable() or _plugin_library() is None:
        pytest.skip("TensorRT-RTX or the CoupledScan plugin library is missing (scripts/test.sh; the plugin "
                    "needs nvcc)")
    for i, graph in enumerate(graphs):
        engine = tmp_path / f"{i}.engine"
        r = subprocess.run([sys.executable, "-m", "cm_deploy.cli", "build", str(graph), "-o", str(engine),
                            "--trt-module", "tensorrt_rtx_bindings", "--plugin", str(_plugin_library()),
                            "--batch", "1:2:4", "--length", "1:16:64", "--quiet"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and engine.stat().st_size > 0, (graph, r.stdout[-2000:], r.stderr[-2000:])


def test_engines_build_with_the_plugin(exported, tmp_path):
    d, _ = exported
    build_engines_with_the_plugin(tmp_path, d / "out" / "model.onnx", d / "out" / "model.stream.onnx")


# ---------------------------------------------------------------------------------- refusals

def _broken(tmp_path, edit):
    sd = _model().state_dict()
    edit(sd)
    torch.save(sd, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


@pytest.mark.parametrize("case,needle", [
    ("cm-deploy checkpoint", "missing fc_a.0.weight"),
    ("mis-shaped", "mis-shaped layers.1.mixer.A_log (32, 9) (expected (32, 8))"),
    ("missing layer key", "missing layers.1.mixer.D"),
    ("unexpected", "unexpected extra.weight"),
    ("later revision", "later revision of the official code"),
    ("pickled module", "not a loadable state_dict"),
    ("not torch.save", "not a torch.save file"),
    ("norm eps for cm-deploy", "--norm-eps applies to --arch coupled-mamba-official only"),
])
def test_bad_state_dicts_one_line_exit_2(capsys, tmp_path, case, needle):
    arch = ["--arch", "coupled-mamba-official"]
    if case == "cm-deploy checkpoint":
        from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
        path = save_checkpoint(CoupledMamba(CoupledMambaConfig(modalities={"a": 3}, d_model=8, n_layers=1)),
                               tmp_path / "ours.pt")
    elif case == "mis-shaped":
        path = _broken(tmp_path, lambda sd: sd.update({"layers.1.mixer.A_log": torch.zeros(32, 9)}))
    elif case == "missing layer key":
        path = _broken(tmp_path, lambda sd: sd.pop("layers.1.mixer.D"))
    elif case == "unexpected":
        path = _broken(tmp_path, lambda sd: sd.update({"extra.weight": torch.zeros(2)}))
    elif case == "later revision":
        torch.save({"audio_linear.fc.0.weight": torch.zeros(256, 74), "regression.dense.weight": torch.zeros(64, 128)},
                   tmp_path / "later.pt")
        path = tmp_path / "later.pt"
    elif case == "pickled module":
        torch.save(_model(), tmp_path / "module.pt")
        path = tmp_path / "module.pt"
    elif case == "not torch.save":
        path = tmp_path / "text.pt"
        path.write_text("hello")
    else:
        path = _broken(tmp_path, lambda sd: None)
        arch = ["--norm-eps", "1e-6"]
    rc, _, err = cli(capsys, "export", path, *arch, "-o", tmp_path / "out")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_load_official_norm_eps(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "o.pt")
    assert load_official(tmp_path / "o.pt", norm_eps=1e-6).norm_f.eps == 1e-6
