"""The Mamba-1 mixer (mamba-ssm's `Mamba`, "selective SSM") computed on cm-deploy's ops.

A Mamba-1 mixer holds in_proj (d_model -> 2E), conv1d (depthwise, kernel K, E channels), x_proj
(E -> R + 2N), dt_proj (R -> E, with bias), A_log (E, N), D (E,) and out_proj (E -> d_model). Its
forward on h (batch, L, d_model):

    x, z   = in_proj(h)                      (batch, L, E) each
    u      = silu(causal depthwise conv(x))
    dt_low, B, C = x_proj(u)                 R, N, N features
    y      = selective_scan(u, dt_proj.weight @ dt_low, -exp(A_log), B, C, D, z,
                            delta_bias = dt_proj.bias, softplus)
    out    = out_proj(y)

The selective scan is CoupledScan with M = 1 and coupling_scale = 1 (docs/design.md: with one chain
and kappa 1 the coupled state c[t] is Mamba's h[t]), so it runs as one cm_deploy::CoupledScan node
in exported graphs, on the Triton kernels on a GPU and on the reference elsewhere; the conv is
ops.conv's (K shifted multiply-adds in exported graphs). `mixer_forward` works on any object with
those parameters under mamba-ssm's names: mamba-ssm's own `Mamba` and `MambaMixer` below.

Streaming: state = (conv, ssm), conv (batch, 1, K - 1, E) the last K - 1 steps of x (activation
dtype), ssm (batch, E, N) float32; mixer_forward(..., state=) returns (out, next state).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import coupled_scan
from ..ops.conv import causal_conv_silu, causal_conv_silu_reference

MIXER_PARAMS = ("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj")
# parameters that stay float32 at every precision (they feed the scan's float32 inputs A, D, delta_bias)
FLOAT32_SUFFIXES = ("A_log", ".D", "dt_proj.bias")


# what a Mamba-1 mixer holds and nothing else: a module with more (Vim's backward branch A_b_log,
# conv1d_b, ...) computes something else, and is refused rather than exported as plain Mamba
MIXER_CHILDREN = {"in_proj", "conv1d", "act", "x_proj", "dt_proj", "out_proj"}
MIXER_OWN_PARAMS = {"A_log", "D"}


def mixer_extras(module) -> list:
    """What `module` holds beyond a Mamba-1 mixer's parameters (empty for mamba-ssm's Mamba)."""
    return sorted({n for n, _ in module.named_children()} - MIXER_CHILDREN) + \
        sorted({n for n, _ in module.named_parameters(recurse=False)} - MIXER_OWN_PARAMS)


def is_mamba1_mixer(module) -> bool:
    """A Mamba-1 mixer by its parameters (mamba-ssm's Mamba, MambaMixer, forks that keep the names):
    an A_log (E, N), the projections and the conv, nothing else."""
    return (all(hasattr(module, p) for p in MIXER_PARAMS) and isinstance(getattr(module, "A_log"), torch.Tensor)
            and getattr(module, "A_log").dim() == 2 and isinstance(module.x_proj, nn.Linear)
            and isinstance(module.conv1d, nn.Conv1d) and not mixer_extras(module))


def is_other_ssm(module) -> bool:
    """A module with its own A_log that is neither a Mamba-1 nor a Mamba-2 mixer (a fork with more
    parts, a bidirectional block, a mixer with its own scan call)."""
    a = module._parameters.get("A_log") if isinstance(module, nn.Module) else None
    return a is not None and not is_mamba1_mixer(module) and not is_mamba2_mixer(module)


def is_mamba2_mixer(module) -> bool:
    """mamba-ssm's Mamba-2 (SSD) mixer: A_log per head and no x_proj."""
    a = getattr(module, "A_log", None)
    return isinstance(a, torch.Tensor) and a.dim() == 1 and hasattr(module, "in_proj") and not hasattr(module, "x_proj")


def keeps_float32(param_name: str) -> bool:
    return param_name == "A_log" or param_name == "D" or param_name.endswith(FLOAT32_SUFFIXES)


def mixer_dims(m) -> dict:
    """E (d_inner), N (d_state), K (d_conv), R (dt_rank) of a Mamba-1 mixer, from its weights."""
    E, N = m.A_log.shape
    return {"E": int(E), "N": int(N), "K": int(m.conv1d.weight.shape[-1]), "R": int(m.dt_proj.weight.shape[1])}


def state_shapes(m) -> dict:
    """Streaming state of one mixer per sample: conv (1, K - 1, E), ssm (E, N) float32."""
    d = mixer_dims(m)
    return {"conv": (1, d["K"] - 1, d["E"]), "ssm": (d["E"], d["N"])}


def mixer_forward(m, h, *, impl="auto", state=None):
    """Mamba-1 mixer `m` on h (batch, L, d_model) -> (batch, L, d_model); with state=(conv, ssm)
    (see the module doc) -> (out, (next conv, next ssm)). impl: the scan's ("auto", "reference",
    "triton", "onnx": a CoupledScan node under torch.onnx.export)."""
    d = mixer_dims(m)
    E, N, R = d["E"], d["N"], d["R"]
    xz = F.linear(h, m.in_proj.weight, m.in_proj.bias).unsqueeze(1)      # (b, 1, L, 2E): the op's M = 1 axis
    x, z = xz[..., :E], xz[..., E:]
    weight = m.conv1d.weight[:, 0, :].unsqueeze(0)                       # (1, E, K)
    bias = m.conv1d.bias.unsqueeze(0) if m.conv1d.bias is not None else None
    if state is None:
        u = causal_conv_silu(x, weight, bias, impl="reference" if impl == "onnx" else impl)
        conv_next = None
    else:
        u, conv_next = causal_conv_silu_reference(x, weight, bias, state[0])
    x_dbl = F.linear(u, m.x_proj.weight, m.x_proj.bias)                  # (b, 1, L, R + 2N)
    dt_low, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    delta = F.linear(dt_low, m.dt_proj.weight)                          # dt_proj's bias is the scan's delta_bias
    A = -torch.exp(m.A_log.float()).unsqueeze(0)                         # (1, E, N)
    dt_bias = m.dt_proj.bias.float().unsqueeze(0) if m.dt_proj.bias is not None else A.new_zeros(1, E)
    y = coupled_scan(u, delta, A, B, C, m.D.float().unsqueeze(0), z, dt_bias, delta_softplus=True,
                     coupling_scale=1.0, impl=impl,
                     initial_state=None if state is None else state[1], return_final_state=state is not None)
    if state is not None:
        y, ssm_next = y
    out = F.linear(y[:, 0], m.out_proj.weight, m.out_proj.bias)
    return out if state is None else (out, (conv_next, ssm_next))


def add_norm_functions(layer_norm, rms_norm):
    """mamba-ssm's fused `layer_norm_fn` / `rms_norm_fn` (residual add + norm in one kernel) on top of
    plain norms layer_norm(x, weight, bias, eps) / rms_norm(...) of a float32 x: the sum x + residual
    in float32, the residual returned in residual's dtype (float32 with residual_in_fp32, else x's)
    and the normalized output in x's dtype, as the kernel does."""

    def norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                return_dropout_mask=False):
        if x1 is not None or weight1 is not None or rowscale is not None or dropout_p or return_dropout_mask:
            raise NotImplementedError("fused add + norm: parallel norms, rowscale and dropout are not covered")
        res_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
        total = x.float() if residual is None else x.float() + residual.float()
        y = (rms_norm if is_rms_norm else layer_norm)(total, weight, bias, eps).to(x.dtype)
        return (y, total.to(res_dtype)) if prenorm else y

    def rms_fn(x, weight, bias, residual=None, **kw):
        return norm_fn(x, weight, bias, residual, is_rms_norm=True, **kw)
    return norm_fn, rms_fn


class MambaMixer(nn.Module):
    """A Mamba-1 mixer with mamba-ssm's parameter names (so that mamba-ssm state_dicts load as they
    are), computed by mixer_forward. Sizes as the weights give them: E inner channels, N states,
    K conv taps, R dt rank."""

    def __init__(self, d_model: int, d_inner: int, d_state: int, d_conv: int, dt_rank: int,
                 conv_bias: bool = True, bias: bool = False):
        super().__init__()
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        # S4D-real A and Mamba's dt initialisation: random weights that behave like a trained mixer's
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        dt = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.scan_impl = "auto"

    def forward(self, h):
        return mixer_forward(self, h, impl=self.scan_impl)
