"""mamba-ssm models through CoupledScan (cm_deploy.export.export_module) without mamba-ssm's CUDA
extension: the mixer math against mamba-ssm's own Mamba (selective_scan_ref path), a small
MambaLMHeadModel (logits for a token sequence, then token by token through the streaming graph), a
vision-style backbone built from the mixer, float16, and what is refused (Mamba-2, no mixer,
streaming a model that pools over time). mamba-ssm's forward, run by its own reference code, is
the reference throughout."""
import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from mamba_ssm_src import mamba_ssm_or_skip  # noqa: E402

from cm_deploy.errors import UserError  # noqa: E402
from cm_deploy.export.modules import export_module, mixers_on_cm_deploy  # noqa: E402
from cm_deploy.foreign.mamba1 import mixer_forward  # noqa: E402
from cm_deploy.runtime import load, open_stream  # noqa: E402
from cm_deploy.runtime.native import find_library  # noqa: E402

LIB = find_library("ort", required=False)
NO_LIB = "the CoupledScan ONNX Runtime op library is not built (scripts/build_plugin.sh)"
VOCAB = 61        # not a multiple of 8: mamba-ssm pads the LM head to 64


@pytest.fixture(scope="module")
def mamba_ssm(tmp_path_factory):
    return mamba_ssm_or_skip(tmp_path_factory.getbasetemp() / "mamba_ssm_src")


def _graphs(stream=False):
    names = ["model.stream.onnx", "model.stream.portable.onnx"] if stream else ["model.onnx", "model.portable.onnx"]
    return [pytest.param(n, marks=pytest.mark.skipif(LIB is None and "portable" not in n, reason=NO_LIB))
            for n in names]


def _close(got, ref, tol):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    assert np.all(np.abs(got - ref) <= tol + tol * np.abs(ref)), f"max abs error {np.abs(got - ref).max():.3e}"


# ---------------------------------------------------------------------------------- the mixer

@pytest.mark.parametrize("kw", [dict(d_state=8), dict(d_state=16, d_conv=3, expand=1.5, bias=True, conv_bias=False,
                                                     dt_rank=3)])
@pytest.mark.parametrize("batch,L", [(1, 1), (2, 7), (3, 40)])
def test_mixer_math_equals_mamba_ssm(mamba_ssm, kw, batch, L):
    from mamba_ssm.modules.mamba_simple import Mamba
    torch.manual_seed(batch * L)
    mixer = Mamba(24, use_fast_path=False, **kw).eval()
    h = torch.randn(batch, L, 24)
    with torch.no_grad():
        ref = mixer(h)
        _close(mixer_forward(mixer, h, impl="reference"), ref, 1e-5)
        E, N = mixer.A_log.shape
        state = (torch.zeros(batch, 1, mixer.d_conv - 1, E), torch.zeros(batch, E, N))
        outs = []
        for a, b in ((0, L // 3), (L // 3, L)):           # an empty first piece when L < 3
            y, state = mixer_forward(mixer, h[:, a:b], impl="reference", state=state)
            outs.append(y)
        _close(torch.cat(outs, 1), ref, 1e-5)


# ---------------------------------------------------------------------------------- a language model

@pytest.fixture(scope="module")
def lm(mamba_ssm, tmp_path_factory):
    """MambaLMHeadModel with mamba-ssm's LM defaults (RMSNorm, fused add + norm, residual in float32),
    random weights, exported once with the streaming graphs."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba1", "d_state": 8})
    model = MambaLMHeadModel(cfg).eval()
    out = tmp_path_factory.mktemp("lm") / "export"
    ids = torch.randint(0, VOCAB, (2, 9))
    manifest = export_module(model, (ids,), out, dynamic_axes={"input_ids": {0: "batch", 1: "L"}}, streaming=True)
    return model, out, manifest


def test_lm_export_graph(lm):
    model, out, manifest = lm
    assert [e["name"] for e in manifest["inputs"]] == ["input_ids"]
    assert manifest["outputs"][0]["name"] == "output" and manifest["outputs"][0]["shape"][:2] == ["batch", "L"]
    assert manifest["custom_ops"][0]["count"] == 2 and manifest["mixers"] == ["backbone.layers.0.mixer",
                                                                             "backbone.layers.1.mixer"]
    g = onnx.load(str(out / "model.onnx"))
    assert [n.op_type for n in g.graph.node].count("CoupledScan") == 2 and not g.functions
    assert not any(n.domain not in ("", "cm_deploy") for n in g.graph.node)


@pytest.mark.parametrize("graph", _graphs())
def test_lm_logits_equal_mamba_ssm(lm, graph):
    model, out, _ = lm
    with load(out / graph, device="cpu", ort_ops=LIB) as m, torch.no_grad():
        for batch, L in ((1, 1), (2, 5), (3, 33)):
            ids = torch.randint(0, VOCAB, (batch, L), generator=torch.Generator().manual_seed(L))
            _close(m.run({"input_ids": ids.numpy()})["output"], model(ids).logits, 1e-5)


@pytest.mark.parametrize("graph", _graphs(stream=True))
def test_lm_token_by_token(lm, graph):
    model, out, manifest = lm
    assert manifest["stream"]["inputs"][1] == {"name": "state.backbone.layers.0.mixer.conv",
                                               "shape": ["batch", 1, 3, 64], "dtype": "float32"}
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    with open_stream(out / graph, batch=2, device="cpu", ort_ops=LIB) as s:
        steps = [s.push({"input_ids": ids[:, t:t + 1].numpy()}) for t in range(ids.shape[1])]
    _close(np.concatenate(steps, axis=1), ref, 1e-5)


def test_lm_engines_build_with_the_plugin(lm, tmp_path):
    from test_official_arch import build_engines_with_the_plugin
    _, out, _ = lm
    build_engines_with_the_plugin(tmp_path, out / "model.onnx", out / "model.stream.onnx")


def test_lm_float16(lm, tmp_path):
    model, _, _ = lm
    ids = torch.randint(0, VOCAB, (2, 9))
    export_module(model, (ids,), tmp_path, dynamic_axes={"input_ids": {0: "batch", 1: "L"}}, dtype="float16")
    for graph in ["model.portable.onnx"] + (["model.onnx"] if LIB is not None else []):
        with load(tmp_path / graph, device="cpu", ort_ops=LIB) as m, torch.no_grad():
            for batch, L in ((1, 4), (3, 21)):
                ids = torch.randint(0, VOCAB, (batch, L), generator=torch.Generator().manual_seed(L))
                got = m.run({"input_ids": ids.numpy()})["output"]
                assert got.dtype == np.float16
                _close(got, model(ids).logits, 2e-2)
    assert model.lm_head.weight.dtype == torch.float32      # the caller's model is left as it was


def test_bare_mixer_float16(mamba_ssm, tmp_path):
    """A model that is one Mamba mixer, exported in float16: A, D and the dt bias reach the
    CoupledScan node as float32 initializers, the activations as float16."""
    from mamba_ssm.modules.mamba_simple import Mamba
    torch.manual_seed(0)
    mixer = Mamba(16, d_state=4, use_fast_path=False).eval()
    manifest = export_module(mixer, (torch.randn(2, 6, 16),), tmp_path, dtype="float16",
                             dynamic_axes={"hidden_states": {0: "batch", 1: "L"}})
    assert manifest["inputs"][0]["name"] == "hidden_states" and manifest["mixers"] == ["mixer"]
    g = onnx.load(str(tmp_path / "model.onnx")).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    node = next(n for n in g.node if n.op_type == "CoupledScan")
    A, D, bias = (inits[node.input[i]] for i in (2, 5, 7))
    with torch.no_grad():       # float32 values, not float16-rounded ones
        np.testing.assert_allclose(A, -torch.exp(mixer.A_log)[None].numpy(), rtol=1e-6)
        np.testing.assert_array_equal(D, mixer.D[None].numpy())
        np.testing.assert_array_equal(bias, mixer.dt_proj.bias[None].numpy())
    with load(tmp_path / "model.portable.onnx", device="cpu") as m, torch.no_grad():
        h = torch.randn(3, 25, 16).half().float()
        _close(m.run({"hidden_states": h.half().numpy()})["output"], mixer(h), 1e-2)


# ---------------------------------------------------------------------------------- a vision backbone

class TinyVisionMamba(nn.Module):
    """Vision-style Mamba: 4x4 patch embedding, Mamba blocks over the patch sequence (pre-norm,
    residual), mean pooling, a linear classifier."""

    def __init__(self, Mamba, d=24, depth=2, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, d, kernel_size=4, stride=4)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.mixers = nn.ModuleList(Mamba(d, d_state=8, use_fast_path=False) for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, classes))

    def forward(self, images):
        h = self.patch(images).flatten(2).transpose(1, 2)           # (batch, patches, d)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(h.mean(dim=1))


def test_vision_backbone(mamba_ssm, tmp_path):
    from mamba_ssm.modules.mamba_simple import Mamba
    torch.manual_seed(0)
    model = TinyVisionMamba(Mamba).eval()
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(UserError, match="mixes time steps outside its Mamba mixers"):
        export_module(_Seq(model), (torch.randn(2, 10, 3),), tmp_path / "no", streaming=True)
    assert not (tmp_path / "no").exists()
    manifest = export_module(model, (images,), tmp_path / "vision", dynamic_axes={"images": {0: "batch"}})
    assert manifest["inputs"][0] == {"name": "images", "shape": ["batch", 3, 16, 16], "dtype": "float32"}
    for graph in ["model.portable.onnx"] + (["model.onnx"] if LIB is not None else []):
        with load(tmp_path / "vision" / graph, device="cpu", ort_ops=LIB) as m, torch.no_grad():
            for batch in (1, 3):
                x = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
                _close(m.run({"images": x.numpy()})["output"], model(x), 1e-5)


class _Seq(nn.Module):
    """The vision model's blocks and pooled head on a (batch, L, 3) sequence: pooling over time."""

    def __init__(self, vision):
        super().__init__()
        self.vision = vision
        self.embed = nn.Linear(3, 24)

    def forward(self, x):
        h = self.embed(x)
        for norm, mixer in zip(self.vision.norms, self.vision.mixers):
            h = h + mixer(norm(h))
        return self.vision.head(h.mean(dim=1))[:, None]


# ---------------------------------------------------------------------------------- refusals

def test_refusals(mamba_ssm, tmp_path):
    from mamba_ssm.modules.mamba2 import Mamba2
    with pytest.raises(UserError, match="Mamba-2 \\(SSD\\) mixer"):
        export_module(nn.Sequential(Mamba2(64, d_state=16, headdim=16)), (torch.randn(1, 4, 64),), tmp_path / "a")
    from mamba_ssm.modules.mamba_simple import Mamba
    bidirectional = Mamba(16, d_state=4)
    bidirectional.A_b_log = nn.Parameter(bidirectional.A_log.detach().clone())     # Vim's backward branch
    with pytest.raises(UserError, match="not a Mamba-1 mixer as mamba-ssm's Mamba \\(it also holds A_b_log\\)"):
        export_module(nn.Sequential(bidirectional), (torch.randn(1, 4, 16),), tmp_path / "v")
    with pytest.raises(UserError, match="holds no Mamba-1 mixer"):
        export_module(nn.Linear(3, 3), (torch.randn(1, 3),), tmp_path / "b")
    with pytest.raises(UserError, match="input_names"):
        export_module(nn.Linear(3, 3), (torch.randn(1, 3),), tmp_path / "c", input_names=["a", "b"])
    assert not any(tmp_path.iterdir())


def test_patches_are_undone(mamba_ssm):
    """The mixers' forward and mamba-ssm's norm functions are back after the export context."""
    import mamba_ssm.modules.block as block
    from mamba_ssm.modules.mamba_simple import Mamba
    mixer = Mamba(16, d_state=4)
    before = block.layer_norm_fn
    with mixers_on_cm_deploy(mixer, [("m", mixer)], "reference"):
        assert block.layer_norm_fn is not before and "forward" in mixer.__dict__
    assert block.layer_norm_fn is before and "forward" not in mixer.__dict__
