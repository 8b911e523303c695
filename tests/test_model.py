"""CoupledMamba and checkpoints: shapes, gradients, length handling, round trip, refusals."""
import os

import pytest
import torch

from cm_deploy import CoupledMamba, CoupledMambaConfig, load_checkpoint, save_checkpoint
from cm_deploy.checkpoint import read_checkpoint
from cm_deploy.errors import UserError

MODS = {"text": 12, "audio": 7, "vision": 5}


def small_config(**kw):
    base = dict(modalities=dict(MODS), d_model=16, n_layers=2, d_state=6, d_conv=3, expand=2)
    base.update(kw)
    return CoupledMambaConfig(**base)


def rand_inputs(batch, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, L, f, generator=g) for (n, f), L in zip(MODS.items(), lens)}


@pytest.mark.parametrize("task,k", [("regression", 1), ("classification", 4)])
@pytest.mark.parametrize("length_rule", ["interpolate", "pad"])
def test_forward_backward_shapes(task, k, length_rule):
    torch.manual_seed(0)
    model = CoupledMamba(small_config(task=task, num_outputs=k, length_rule=length_rule))
    x = rand_inputs(3, (9, 5, 9))
    out = model(x)
    assert out.shape == (3, k) and torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # every modality and every layer's scan parameters receive gradient
    assert model.embed["vision"].weight.grad.abs().sum() > 0
    assert model.layers[0].branches[2].A_log.grad.abs().sum() > 0


def test_positional_inputs_equal_dict_inputs():
    model = CoupledMamba(small_config()).eval()
    x = rand_inputs(2, (6, 6, 6))
    torch.testing.assert_close(model(x), model([x[n] for n in MODS]))


def test_input_errors_are_clear():
    model = CoupledMamba(small_config())
    x = rand_inputs(2, (6, 6, 6))
    with pytest.raises(ValueError, match="missing"):
        model({"text": x["text"], "audio": x["audio"]})
    with pytest.raises(ValueError, match="vision"):
        model({**x, "vision": torch.randn(2, 6, 4)})


def test_valid_lengths_ignore_padding():
    """With per-sample valid lengths, what lies beyond them does not change the output."""
    torch.manual_seed(0)
    model = CoupledMamba(small_config(length_rule="pad")).eval()
    x = rand_inputs(2, (10, 10, 10))
    lengths = {n: torch.tensor([10, 6]) for n in MODS}
    y1 = model(x, lengths=lengths)
    x2 = {n: v.clone() for n, v in x.items()}
    for v in x2.values():
        v[1, 6:] = 100.0 * torch.randn_like(v[1, 6:])   # garbage in the padding of sample 1
    y2 = model(x2, lengths=lengths)
    torch.testing.assert_close(y1, y2)                   # causal scan + masked pooling
    assert not torch.allclose(model(x), model(x2))       # without lengths it does change


def test_interpolation_rule_maps_lengths():
    model = CoupledMamba(small_config(length_rule="interpolate")).eval()
    mask = model._valid_mask(torch.tensor([5, 2]), 5, 10, 2, torch.device("cpu"))
    assert mask.sum(1).tolist() == [10, 4]


def test_coupled_differs_from_independent_chains():
    torch.manual_seed(0)
    cfg = small_config()
    coupled = CoupledMamba(cfg).eval()
    indep = CoupledMamba(CoupledMambaConfig(**{**cfg.to_dict(), "coupled": False})).eval()
    indep.load_state_dict(coupled.state_dict())
    x = rand_inputs(2, (8, 8, 8))
    assert not torch.allclose(coupled(x), indep(x), atol=1e-6)


def test_mamba_initialisation():
    cfg = small_config()
    br = CoupledMamba(cfg).layers[0].branches[0]
    A = -torch.exp(br.A_log)
    torch.testing.assert_close(A[0], -torch.arange(1, cfg.d_state + 1, dtype=torch.float32))
    dt = torch.nn.functional.softplus(br.dt_proj.bias)
    assert (dt >= cfg.dt_min * 0.99).all() and (dt <= cfg.dt_max * 1.01).all()
    torch.testing.assert_close(br.D, torch.ones_like(br.D))


def test_config_validation():
    with pytest.raises(ValueError, match="modalities"):
        CoupledMambaConfig(modalities={})
    with pytest.raises(ValueError, match="d_state"):
        CoupledMambaConfig(d_state=0)
    with pytest.raises(ValueError, match="unknown"):
        CoupledMambaConfig.from_dict({"modalities": {"a": 3}, "bogus": 1})
    cfg = small_config(coupling_scale=1.0)
    assert CoupledMambaConfig.from_dict(cfg.to_dict()) == cfg


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CoupledMamba(small_config(num_outputs=3, task="classification")).eval()
    path = save_checkpoint(model, tmp_path / "ckpt.pt", meta={"acc": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]      # no temporary left behind
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "config", "state_dict", "meta"} and raw["format"] == "cm-deploy/1"
    loaded = load_checkpoint(path)
    x = rand_inputs(2, (7, 4, 7))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert read_checkpoint(path)[2] == {"acc": 0.5}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/cm_deploy_pwned",))


def test_checkpoint_with_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "cm-deploy/1", "config": small_config().to_dict(), "state_dict": {},
                "payload": Evil()}, path)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/cm_deploy_pwned")


@pytest.mark.parametrize("case", ["missing", "truncated", "foreign", "not_dict", "bad_config", "bad_weights"])
def test_bad_checkpoints(tmp_path, case):
    good = save_checkpoint(CoupledMamba(small_config()), tmp_path / "good.pt")
    path = tmp_path / "bad.pt"
    if case == "truncated":
        path.write_bytes(good.read_bytes()[:200])
    elif case == "foreign":
        torch.save({"model": torch.zeros(2)}, path)
    elif case == "not_dict":
        torch.save([torch.zeros(2)], path)
    elif case == "bad_config":
        torch.save({"format": "cm-deploy/1", "config": {"modalities": {}}, "state_dict": {}}, path)
    elif case == "bad_weights":
        torch.save({"format": "cm-deploy/1", "config": small_config().to_dict(),
                    "state_dict": {"x": torch.zeros(1)}}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_checkpoint_with_wrong_weight_shape(tmp_path):
    model = CoupledMamba(small_config())
    sd = model.state_dict()
    sd["head.weight"] = torch.zeros(5, 5)
    path = tmp_path / "bad.pt"
    torch.save({"format": "cm-deploy/1", "config": small_config().to_dict(), "state_dict": sd}, path)
    with pytest.raises(UserError, match="do not match") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_torch_compile_with_triton_scan():
    """torch.compile keeps the Triton kernels as they are (a graph break around the op)."""
    torch.manual_seed(0)
    cfg = CoupledMambaConfig(modalities={"a": 5, "b": 3}, d_model=16, n_layers=1, d_state=4)
    model = CoupledMamba(cfg).eval().set_scan_impl("triton")
    x = {"a": torch.randn(2, 6, 5), "b": torch.randn(2, 6, 3)}
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-5, atol=1e-6)
