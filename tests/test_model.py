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
    assert model.layers[0].A_log.grad[2].abs().sum() > 0


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


# ---------------------------------------------------------------------------- lengths (docs/lengths.md)

# valid lengths per sample (text, audio, vision) inside a batch padded to (11, 9, 7); mixed orders,
# a full sample, a zero-length modality, and a sample with no valid step at all
VALID = [(7, 2, 7), (11, 9, 7), (3, 0, 5), (1, 1, 1), (0, 0, 0)]
PADDED = (11, 9, 7)


def _padded_batch(fill, seed=0):
    x = rand_inputs(len(VALID), PADDED, seed=seed)
    for i, v in enumerate(VALID):
        for (name, t), n in zip(x.items(), v):
            t[i, n:] = fill(t[i, n:])
    lens = {name: torch.tensor([v[k] for v in VALID]) for k, name in enumerate(MODS)}
    return x, lens


def _alone(model, x, i):
    """Sample i alone, unpadded (a zero-length modality passed as one zero step with length 0)."""
    v = VALID[i]
    xs = {n: (x[n][i:i + 1, :L] if L else torch.zeros(1, 1, MODS[n])) for n, L in zip(MODS, v)}
    if min(v) > 0:
        return model(xs)                      # no lengths at all: the plain forward
    return model(xs, lengths={n: torch.tensor([L]) for n, L in zip(MODS, v)})


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("rule", ["interpolate", "pad"])
def test_padded_batch_equals_each_sample_alone(rule, impl):
    torch.manual_seed(0)
    model = CoupledMamba(small_config(length_rule=rule)).eval().set_scan_impl(impl)
    x, lens = _padded_batch(lambda t: torch.full_like(t, float("nan")))
    with torch.no_grad():
        batch = model(x, lengths=lens)
        assert torch.isfinite(batch).all()
        for i, v in enumerate(VALID):
            if max(v) == 0:        # nothing valid: the head of zeros
                torch.testing.assert_close(batch[i], model.head.bias, rtol=0, atol=0)
                continue
            torch.testing.assert_close(batch[i:i + 1], _alone(model, x, i), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", ["interpolate", "pad"])
def test_padding_content_never_matters(rule):
    torch.manual_seed(1)
    model = CoupledMamba(small_config(length_rule=rule)).eval()
    x1, lens = _padded_batch(lambda t: 1e4 * torch.randn_like(t))
    x2, _ = _padded_batch(lambda t: torch.full_like(t, float("inf")))
    with torch.no_grad():
        torch.testing.assert_close(model(x1, lengths=lens), model(x2, lengths=lens), rtol=0, atol=0)
        # full lengths given = no lengths
        xf = rand_inputs(2, PADDED, seed=3)
        full = {n: torch.full((2,), L) for n, L in zip(MODS, PADDED)}
        torch.testing.assert_close(model(xf, lengths=full), model(xf), rtol=1e-6, atol=1e-7)


def test_padded_batch_trains_without_nan():
    """Garbage (NaN) in padding reaches no gradient either."""
    torch.manual_seed(2)
    model = CoupledMamba(small_config(length_rule="interpolate"))
    x, lens = _padded_batch(lambda t: torch.full_like(t, float("nan")))
    model(x, lengths=lens).square().sum().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_resample_valid_reads_only_the_valid_prefix():
    from cm_deploy.model import resample_linear, resample_valid
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 8, 4, generator=g)
    length, target = torch.tensor([5, 8, 1]), torch.tensor([9, 8, 3])
    junk = h.clone()
    junk[0, 5:] = float("nan")
    out = resample_valid(junk, length, target, 10)
    for i in range(3):
        want = resample_linear(h[i:i + 1, :length[i]], int(target[i]))[0]
        torch.testing.assert_close(out[i, :target[i]], want, rtol=1e-6, atol=1e-6)
        assert not out[i, target[i]:].any()


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([12, 3]), r"lengths\['text'\] must be in \[0, 11\]"),
    (torch.tensor([-1, 3]), r"must be in \[0, 11\]"),
    (torch.tensor([3]), r"must be \(batch,\) = \(2,\)"),
    (torch.tensor([[3, 3]]), r"must be \(batch,\)"),
    (torch.tensor([3.0, 2.0]), "must be integers"),
])
def test_bad_lengths_are_refused(bad, match):
    model = CoupledMamba(small_config()).eval()
    x = rand_inputs(2, PADDED)
    lens = {n: torch.full((2,), L) for n, L in zip(MODS, PADDED)}
    with pytest.raises(ValueError, match=match):
        model(x, lengths={**lens, "text": bad})


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
    layer = CoupledMamba(cfg).layers[0]
    A = -torch.exp(layer.A_log)
    for m in range(cfg.n_modalities):
        torch.testing.assert_close(A[m, 0], -torch.arange(1, cfg.d_state + 1, dtype=torch.float32))
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert (dt >= cfg.dt_min * 0.99).all() and (dt <= cfg.dt_max * 1.01).all()
    assert not torch.equal(layer.dt_bias[0], layer.dt_bias[1])      # drawn per modality
    torch.testing.assert_close(layer.D, torch.ones_like(layer.D))


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


needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="needs the Triton interpreter")


def _compiled_ops(model):
    """Compile model with fullgraph=True (any graph break raises) and an AOT backend that records
    the ATen/custom ops of the forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    seen = set()

    def record(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record)), seen


@needs_interpreter
@pytest.mark.parametrize("rule, coupled", [("interpolate", True), ("pad", False)])
def test_torch_compile_is_one_graph_with_the_kernels(rule, coupled):
    """torch.compile(fullgraph=True) traces the whole model, training included: the conv and the
    scan are the cm_deploy custom ops (the kernels as they are), and outputs and every gradient
    equal eager's."""
    torch.manual_seed(0)
    model = CoupledMamba(small_config(length_rule=rule, coupled=coupled)).set_scan_impl("triton")
    x = rand_inputs(2, (7, 4, 6))
    lens = {"text": torch.tensor([7, 3]), "audio": torch.tensor([4, 4]), "vision": torch.tensor([2, 6])}
    w = torch.randn(2, 1)
    out_e, g_e = _params_grads(model, x, lens, w)
    compiled, seen = _compiled_ops(model)
    out_c, g_c = _params_grads(compiled, x, lens, w)
    for op in ("coupled_scan_fwd", "coupled_scan_bwd", "causal_conv_silu_fwd", "causal_conv_silu_bwd"):
        assert f"cm_deploy.{op}.default" in seen, (op, sorted(seen))
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for k in g_e:
        torch.testing.assert_close(g_c["_orig_mod." + k], g_e[k], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"d {k}: {m}")


@needs_interpreter
def test_torch_compile_chunked_inference():
    """Chunked inference (carried conv and scan states) compiles to one graph too."""
    torch.manual_seed(0)
    model = CoupledMamba(small_config(length_rule="pad")).eval().set_scan_impl("triton")
    x = rand_inputs(2, (9, 9, 9))
    lens = {"text": torch.tensor([9, 3]), "audio": torch.tensor([4, 9]), "vision": torch.tensor([9, 9])}
    compiled, seen = _compiled_ops(model)
    with torch.no_grad():
        want = model(x, lens, chunk=4)
        got = compiled(x, lens, chunk=4)
    assert "cm_deploy.coupled_scan_fwd.default" in seen
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@needs_interpreter
def test_torch_compile_inductor_inference():
    """Inductor (the default backend) around the custom ops: the same outputs as eager."""
    torch.manual_seed(0)
    cfg = CoupledMambaConfig(modalities={"a": 5, "b": 3}, d_model=16, n_layers=1, d_state=4)
    model = CoupledMamba(cfg).eval().set_scan_impl("triton")
    x = {"a": torch.randn(2, 6, 5), "b": torch.randn(2, 6, 3)}
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the fused layer (stacked weights, folded norms and dt projection, fused conv, strided scan)
# ---------------------------------------------------------------------------------------------

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_per_branch_checkpoint_still_loads():
    """A checkpoint written by the per-branch model (layers.<i>.branches.<m>.*, norm_f.<m>.*; made
    at commit 4f17958, outputs recorded then) loads into the stacked model and gives the same
    outputs (reference scan, float32)."""
    import numpy as np
    model = load_checkpoint(os.path.join(FIXTURES, "ckpt_per_branch_v0.pt")).set_scan_impl("reference")
    data = np.load(os.path.join(FIXTURES, "ckpt_per_branch_v0.npz"))
    names = list(model.config.modalities)
    xs = {n: torch.from_numpy(data[n]) for n in names}
    lens = {n: torch.from_numpy(data[n + "_lengths"]) for n in names}
    with torch.no_grad():
        out = model(xs, lens)
    torch.testing.assert_close(out, torch.from_numpy(data["output"]), rtol=1e-5, atol=1e-6)
    assert not any("branches" in k or "norm_f." in k for k in model.state_dict())


def _params_grads(model, x, lens, w):
    model.zero_grad(set_to_none=True)
    out = model(x, lengths=lens)
    (out.float() * w).sum().backward()
    return out.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, (9, 5, 9)), (2, (1, 4, 3)), (1, (17, 17, 17))])
def test_fused_kernels_match_reference_model(dtype, shape):
    """The model on the Triton kernels (conv + scan, interpreter here) against the same weights on
    the reference ops: outputs and every parameter's gradient, with per-sample lengths."""
    batch, Ls = shape
    torch.manual_seed(1)
    ref = CoupledMamba(small_config(num_outputs=3)).to_precision(
        "float32" if dtype == torch.float32 else "bfloat16").set_scan_impl("reference")
    fused = CoupledMamba(small_config(num_outputs=3)).to_precision(
        "float32" if dtype == torch.float32 else "bfloat16").set_scan_impl("triton")
    fused.load_state_dict(ref.state_dict())
    x = {n: t.to(dtype) for n, t in rand_inputs(batch, Ls, seed=batch).items()}
    lens = {n: torch.randint(0, L + 1, (batch,), generator=torch.Generator().manual_seed(L))
            for n, L in zip(MODS, Ls)}
    w = torch.randn(batch, 3, generator=torch.Generator().manual_seed(5))
    out_r, g_r = _params_grads(ref, x, lens, w)
    out_t, g_t = _params_grads(fused, x, lens, w)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    scale = lambda t: max(t.float().abs().max().item(), 1e-6)  # noqa: E731
    torch.testing.assert_close(out_t.float(), out_r.float(), rtol=tol, atol=tol * scale(out_r))
    for k in g_r:
        torch.testing.assert_close(g_t[k].float(), g_r[k].float(), rtol=tol, atol=tol * scale(g_r[k]),
                                   msg=lambda m, k=k: f"d {k}: {m}")


@pytest.mark.parametrize("rule", ["interpolate", "pad"])
def test_export_layout_equals_eager_layout(rule):
    """Batch-major (what export traces) and modality-major (eager) layers compute the same."""
    torch.manual_seed(2)
    model = CoupledMamba(small_config(length_rule=rule)).eval().set_scan_impl("reference")
    x = rand_inputs(3, (8, 5, 8))
    lens = {"text": torch.tensor([8, 2, 5]), "audio": torch.tensor([5, 5, 0]), "vision": torch.tensor([1, 8, 8])}
    with torch.no_grad():
        eager = model(x, lens)
        assert model._modality_axis() == 0
        model.set_scan_impl("onnx")
        assert model._modality_axis() == 1
        exported_form = model(x, lens)
    torch.testing.assert_close(exported_form, eager, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_close_to_float32():
    """Autocast (float32 weights, bfloat16 matmuls): the residual stays float32 (added outside the
    GEMM), and the result is close to the float32 model's."""
    torch.manual_seed(3)
    model = CoupledMamba(small_config(num_outputs=2)).eval().set_scan_impl("reference")
    x = rand_inputs(2, (7, 7, 7))
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2 * want.abs().max().item())


def test_fold_for_inference_equals_unfolded():
    torch.manual_seed(4)
    model = CoupledMamba(small_config()).eval().set_scan_impl("reference")
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "norm" in k:
                p.add_(0.3 * torch.randn_like(p))
    x = rand_inputs(2, (6, 6, 6))
    with torch.no_grad():
        want = model(x)
        model.fold_for_inference()
        assert model.layers[0]._folded is not None
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)
        model.to(torch.float64)       # folded tensors follow .to(); the scan's stay float32
        assert model.layers[0]._folded[2].dtype == torch.float64
        assert model.layers[0]._folded[3].dtype == torch.float32


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("rule, coupled", [("interpolate", True), ("pad", True), ("pad", False)])
def test_chunked_forward_equals_whole(impl, rule, coupled):
    """forward(chunk=T): layers over time chunks with carried state; same output as one pass,
    with and without per-sample lengths, chunks that do not divide L and shorter than d_conv."""
    torch.manual_seed(6)
    model = CoupledMamba(small_config(length_rule=rule, coupled=coupled)).eval().set_scan_impl(impl)
    x = rand_inputs(3, (11, 7, 11))
    lens = {"text": torch.tensor([11, 4, 9]), "audio": torch.tensor([7, 7, 0]), "vision": torch.tensor([2, 11, 6])}
    equal = rand_inputs(3, (11, 11, 11), seed=1)      # embedded chunk by chunk under both rules
    with torch.no_grad():
        whole = model(equal)
        torch.testing.assert_close(model(equal, chunk=3), whole, rtol=1e-5, atol=1e-6)
        for lengths in (None, lens):
            whole = model(x, lengths)
            for chunk in ((1, 4, 10, 50) if impl == "reference" else (4,)):   # the interpreter is slow
                torch.testing.assert_close(model(x, lengths, chunk=chunk), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="chunk"):
        model(x, chunk=0)


def _naive_forward(model, xs):
    """DESIGN.md section 1 written out per modality with nn.functional, from the model's stacked
    weights (no folding, no shared layout): the reference the fused layer is held against."""
    import torch.nn.functional as F
    from cm_deploy.ops import coupled_scan_reference
    cfg = model.config
    E, N, R, K = cfg.d_inner, cfg.d_state, cfg.rank, cfg.d_conv
    hs = [model.embed[n](x) for n, x in zip(model.names, xs)]
    for layer in model.layers:
        parts = []
        for m, h in enumerate(hs):
            x = F.layer_norm(h, (cfg.d_model,), layer.norm_weight[m], layer.norm_bias[m])
            u, z = F.linear(x, layer.in_proj[m]).chunk(2, dim=-1)
            L = u.shape[1]
            u = F.silu(F.conv1d(u.transpose(1, 2), layer.conv_weight[m][:, None, :], layer.conv_bias[m],
                                padding=K - 1, groups=E)[..., :L].transpose(1, 2))
            dt, Bm, Cm = F.linear(u, layer.x_proj[m]).split([R, N, N], dim=-1)
            parts.append((u, F.linear(dt, layer.dt_proj[m]), Bm, Cm, z))
        u, delta, Bm, Cm, z = (torch.stack([p[i] for p in parts], dim=1) for i in range(5))
        y = coupled_scan_reference(u, delta, -torch.exp(layer.A_log.float()), Bm, Cm, layer.D.float(), z,
                                   layer.dt_bias.float(), delta_softplus=True, coupling_scale=cfg.coupling_scale)
        hs = [h + F.linear(y[:, m], layer.out_proj[m]) for m, h in enumerate(hs)]
    pooled = [F.layer_norm(h, (cfg.d_model,), model.norm_f_weight[m], model.norm_f_bias[m]).float().mean(1)
              for m, h in enumerate(hs)]
    return model.head(torch.cat(pooled, dim=-1).to(model.head.weight.dtype))


@pytest.mark.parametrize("precision, tol", [("float32", 1e-5), ("bfloat16", 1.5e-2)])
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("batch, L", [(2, 9), (1, 1), (3, 16)])
def test_fused_model_matches_naive_per_modality_model(precision, tol, impl, batch, L):
    torch.manual_seed(batch * 10 + L)
    model = CoupledMamba(small_config(num_outputs=3)).to_precision(precision).eval().set_scan_impl(impl)
    with torch.no_grad():
        for k, p in model.named_parameters():      # scales and shifts away from their init
            if "norm" in k:
                p.add_(0.3 * torch.randn_like(p))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]
    xs = [t.to(dtype) for t in rand_inputs(batch, (L, L, L), seed=L).values()]
    with torch.no_grad():
        want = _naive_forward(model, xs)
        got = model(xs)
        folded = model.fold_for_inference()(xs)
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)
    torch.testing.assert_close(folded.float(), want.float(), rtol=tol, atol=tol * scale)
