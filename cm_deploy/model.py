"""Coupled Mamba (NeurIPS 2024, arXiv 2405.18014) in PyTorch: DESIGN.md sections 1 and 4.

Per layer, every modality has its own Mamba block (norm, in/out projections, causal conv, x/dt
projections, A, D); ONE coupled scan (cm_deploy.ops.coupled_scan) runs all M state chains together.

Lengths (docs/lengths.md). The scan needs one common length. A sample's common length is the
longest of its modalities' valid lengths; the config's `length_rule` brings every modality to it:
"interpolate" (default) resamples the modality's valid prefix linearly over time (aligned end
points, as F.interpolate(align_corners=True)), "pad" keeps it and makes every later step zero.
Per-sample valid lengths (optional `lengths`, one int tensor (batch,) per modality, 0..L_m) make a
padded batch exact: every sample gets what it gets alone, unpadded, whatever the padding holds (NaN
included): padding is replaced by zeros before the first layer, the scan is causal, and the pooling
averages the sample's common length only. A modality of valid length 0 is all zeros; a sample with
no valid step at all pools to zeros.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .config import CoupledMambaConfig
from .contract import FLOAT32_PARAMS, normalize_precision
from .ops import coupled_scan
from .ops.conv import causal_conv_silu, conv_tail


def resample_linear(h, L):
    """h (b, L_m, d) -> (b, L, d) by linear interpolation over time with aligned end points: the
    same as F.interpolate(mode="linear", align_corners=True). Every sample's whole sequence."""
    b, Lm = h.shape[0], h.shape[1]
    full = torch.full((b,), Lm, device=h.device, dtype=torch.int64)
    return resample_valid(h, full, torch.full_like(full, L), L)


def _steps(*xs, axis=1):
    """0 .. n - 1 as int64 (n,) on xs' device, n the longest of xs' sizes along `axis`. Exported
    graphs compute it on the device from the inputs' shapes alone (ops.onnx_node.onnx_steps): no
    int64 arithmetic on shape values, which ONNX Runtime's CUDA provider runs on the host with a
    copy to the device after it (and then cannot capture the graph in a CUDA graph)."""
    if torch.onnx.is_in_onnx_export():
        from .ops.onnx_node import onnx_steps
        return onnx_steps(xs, axis)
    n = functools.reduce(torch.sym_max, (x.shape[axis] for x in xs))
    return torch.arange(n, device=xs[0].device)


class _StepCache:
    """_steps, computed once per distinct size within one forward (exported graphs would otherwise
    repeat the same few device nodes at every use). Call it as _steps."""

    def __init__(self):
        self._memo = {}

    def __call__(self, *xs, axis=1):
        key = (axis, tuple(sorted({str(x.shape[axis]) for x in xs})))
        if key not in self._memo:
            self._memo[key] = _steps(*xs, axis=axis)
        return self._memo[key]


def _pick_rows(h, idx, steps=_steps):
    """out[i, t] = h[i, idx[i, t]]: h (b, L_m, d), idx int64 (b, L) (indices past L_m - 1 read
    row L_m - 1). One Gather of rows of h's (b * L_m, d) view, with the row offsets computed on the
    device (the view's shape has one computed dim, -1; the result needs no reshape). steps: _steps
    or a _StepCache."""
    last = steps(h)[-1:]                                                 # L_m - 1, as a (1,) tensor
    base = steps(h, axis=0)[:, None] * (last + 1)                       # (b, 1): i * L_m
    return F.embedding(base + torch.minimum(idx, last), h.reshape(-1, h.shape[2]))


def resample_valid(h, length, target, L, steps=_steps):
    """Per sample i: h[i, :length[i]] resampled linearly (aligned end points) to target[i] steps,
    written to out[i, :target[i]]; out[i, target[i]:] = 0. h (b, L_m, d), length and target int64
    (b,), L >= max(target): the output length, or its steps 0 .. L - 1 as an int64 (L,) tensor
    (_steps). Only valid steps are read (indices stay below length[i]), so padding never reaches
    the output; a sample with length 0 gives zeros. Index arithmetic on the device only, so that it
    exports with symbolic lengths (L = 1 included) and no shape arithmetic. steps: as _pick_rows."""
    out_steps = L if torch.is_tensor(L) else torch.arange(L, device=h.device)
    last = (length - 1).clamp(min=0)                                     # (b,)
    # float32 scale times the step index, as PyTorch's own kernel computes the source position
    scale = last.float() / (target - 1).clamp(min=1).float()             # (b,)
    pos = out_steps.float()[None, :] * scale[:, None]                    # (b, L)
    hi = last.float()[:, None]
    i0 = torch.minimum(pos.floor(), hi)                                  # float clamps: no integer Clip
    w = (pos - i0).unsqueeze(-1)                                         # weight of the right neighbour
    i1 = torch.minimum(i0 + 1, hi)
    left, right = _pick_rows(h, i0.long(), steps).float(), _pick_rows(h, i1.long(), steps).float()
    out = (1 - w) * left + w * right
    keep = (out_steps[None, :] < target[:, None]) & (length[:, None] > 0)
    return torch.where(keep.unsqueeze(-1), out, torch.zeros((), device=h.device)).to(h.dtype)


# Tensor layout. Every layer keeps the M modalities in ONE tensor with the L axis at 2 and features
# last; the modality axis `ax` is 0 (modality-major, (M, b, L, .): the PyTorch path, where every
# per-modality projection is one batched matmul over M with no copy and the scan and conv kernels
# read the (b, M, L, .) views by strides) or 1 (batch-major, (b, M, L, .): exported graphs, where
# a MatMul broadcasts the (M, k, n) weights and the CoupledScan node gets its contract layout with
# no Transpose).


def _per_modality(p, ax):
    """(M, n) parameter -> broadcastable against a layer tensor with the modality axis at ax."""
    return p[:, None, None, :] if ax == 0 else p[None, :, None, :]


def _matmul(x, w, ax, bias=None, add=None):
    """x (.., k) with the modality axis at ax, w (M, k, n): per-modality x @ w[m] (+ bias (M, n))
    (+ add, shaped as the result). Modality-major: one bmm (baddbmm when there is something to add,
    so that the residual add is the GEMM's epilogue)."""
    if ax == 0:
        M, b, L, k = x.shape
        x3 = x.reshape(M, b * L, k)
        if add is not None and add.dtype == x.dtype:
            base = add.reshape(M, b * L, w.shape[2])
            if bias is not None:
                base = base + bias[:, None, :]
            return torch.baddbmm(base, x3, w).view(M, b, L, w.shape[2])
        if bias is not None:
            return torch.baddbmm(bias[:, None, :].to(x.dtype), x3, w).view(M, b, L, w.shape[2])
        out = torch.bmm(x3, w).view(M, b, L, w.shape[2])
        # a wider residual (float32 under autocast) stays wide: added outside the GEMM
        return out if add is None else add + out
    out = torch.matmul(x, w)
    if bias is not None:
        out = out + bias[None, :, None, :]
    return out if add is None else add + out


def _norm_for_gemm(h, d):
    """layer_norm (no affine: folded into in_proj) of a tensor whose next use is a GEMM. Under
    autocast with h already in the autocast dtype, the norm runs outside autocast: its kernel
    accumulates in float32 and writes h's dtype, the value the GEMM would have cast autocast's
    float32 output to, without the float32 tensor and its two casts (one per projection)."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev) and h.dtype == torch.get_autocast_dtype(dev):
        with torch.autocast(dev, enabled=False):
            return F.layer_norm(h, (d,), eps=1e-5)
    return F.layer_norm(h, (d,), eps=1e-5)


def _scan_view(x, ax):
    """A layer tensor as the (b, M, L, .) the scan contract names (a view when modality-major)."""
    return x.transpose(0, 1) if ax == 0 else x


class CoupledLayer(nn.Module):
    """One coupled layer: M Mamba blocks (per-modality weights, stacked along a leading M axis) and
    ONE coupled scan over all of them (M independent scans when cfg.coupled is False).

    Per block (DESIGN.md section 1) and how it runs here:
      LayerNorm             one layer_norm over all modalities; its per-modality scale and shift
                            are folded into the input projection's weights and bias
      in_proj -> u, z       two batched matmuls (u is freed after the conv; z lives to the scan)
      conv + SiLU           one fused kernel (ops.conv) for all modalities
      x_proj, dt_proj       one batched matmul: dt_proj's rank-R factor is folded into x_proj's
                            dt rows, so delta, B and C are column ranges of one output (the scan
                            reads them in place). Inference on the Triton kernels keeps delta in
                            rank-R form instead (x_proj alone) and the scan applies dt_proj itself:
                            no (b, M, L, E) delta in memory
      CoupledScan           u, delta, B, C, z as views, no stacking copies
      out_proj + residual   one baddbmm (the residual add as the GEMM's epilogue)
    """

    def __init__(self, cfg: CoupledMambaConfig):
        super().__init__()
        self.cfg = cfg
        M, d, E, N, R, K = (cfg.n_modalities, cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank,
                            cfg.d_conv)
        self.norm_weight = nn.Parameter(torch.ones(M, d))
        self.norm_bias = nn.Parameter(torch.zeros(M, d))
        self.in_proj = nn.Parameter(torch.empty(M, 2 * E, d))        # -> u, z (Linear layout)
        self.conv_weight = nn.Parameter(torch.empty(M, E, K))       # depthwise, causal
        self.conv_bias = nn.Parameter(torch.empty(M, E))
        self.x_proj = nn.Parameter(torch.empty(M, R + 2 * N, E))    # -> dt (rank R), B, C
        self.dt_proj = nn.Parameter(torch.empty(M, E, R))
        self.dt_bias = nn.Parameter(torch.empty(M, E))              # the scan's delta_bias
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(M, E, 1))
        self.D = nn.Parameter(torch.ones(M, E))
        self.out_proj = nn.Parameter(torch.empty(M, d, E))
        self.drop = nn.Dropout(cfg.dropout)
        self.scan_impl = "auto"
        self._folded = None       # fold_(): precomputed projections for a frozen inference copy
        self._folded_low = None   # fold_(): x_proj and dt_proj for the rank-R delta path
        self._register_load_state_dict_pre_hook(_stack_branch_checkpoint, with_module=True)
        self._init_like_mamba(cfg)

    @torch.no_grad()
    def _init_like_mamba(self, cfg):
        for m in range(cfg.n_modalities):
            # nn.Linear / nn.Conv1d defaults: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            for w in (self.in_proj[m], self.x_proj[m]):
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            bound = 1 / math.sqrt(cfg.d_conv)
            nn.init.uniform_(self.conv_weight[m], -bound, bound)
            nn.init.uniform_(self.conv_bias[m], -bound, bound)
            # dt_proj as Mamba: weight ~ U(-r^-1/2, r^-1/2); bias = softplus^-1(dt), dt
            # log-uniform in [dt_min, dt_max], so that softplus(bias) starts in that range.
            std = cfg.rank ** -0.5
            nn.init.uniform_(self.dt_proj[m], -std, std)
            dt = torch.exp(torch.rand(cfg.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                           + math.log(cfg.dt_min)).clamp(min=1e-4)
            self.dt_bias[m].copy_(dt + torch.log(-torch.expm1(-dt)))
            # GPT-2 style rescaling of the residual branch's output projection, as Mamba does.
            nn.init.kaiming_uniform_(self.out_proj[m], a=math.sqrt(5))
            self.out_proj[m] /= math.sqrt(cfg.n_layers)

    def scan_weights(self):
        """A (M, E, N), D (M, E), delta_bias (M, E): the scan's float32 parameters."""
        if self._folded is not None:
            return self._folded[3:]
        return -torch.exp(self.A_log.float()), self.D.float(), self.dt_bias.float()

    def _projections(self, math_dtype=None, with_x=True):
        """The folded weights, each (M, k, n) for x @ w: in_proj with the norm's scale (u and z
        halves) and the norm's shift as biases; x_proj with dt_proj folded into its dt rows (None
        unless with_x: the rank-R delta path uses x_proj as it is)."""
        if self._folded is not None:
            return self._folded[:3]
        E, R = self.cfg.d_inner, self.cfg.rank
        f = (lambda t: t.to(math_dtype)) if math_dtype is not None else (lambda t: t)  # noqa: E731
        w_in = f(self.in_proj).transpose(1, 2) * f(self.norm_weight)[:, :, None]    # (M, d, 2E)
        b_in = torch.bmm(f(self.norm_bias)[:, None, :].to(w_in.dtype),
                         f(self.in_proj).transpose(1, 2))[:, 0]                      # (M, 2E)
        w_x = None
        if with_x:
            xp = f(self.x_proj).transpose(1, 2)                                      # (M, E, R + 2N)
            w_dt = torch.bmm(xp[..., :R], f(self.dt_proj).transpose(1, 2))          # (M, E, E)
            w_x = torch.cat([w_dt, xp[..., R:]], dim=2)                              # (M, E, E + 2N)
        return (w_in[..., :E], b_in[:, :E]), (w_in[..., E:], b_in[:, E:]), w_x

    @torch.no_grad()
    def fold_(self):
        """Compute the folded projections and the scan's parameters once (in float32, then cast
        to the weights' dtype) and use them from now on: for a frozen inference copy (export
        writes them as the graph's initializers; PyTorch inference skips six small kernels per
        layer). Training or loading weights afterwards would not reach them: unfold_() first."""
        dt = self.in_proj.dtype
        (wu, bu), (wz, bz), wx = self._projections(torch.float32)
        cast = lambda t: t.to(dt).contiguous()  # noqa: E731
        self._folded = ((cast(wu), cast(bu)), (cast(wz), cast(bz)), cast(wx),
                        *(t.contiguous() for t in self.scan_weights()))
        self._folded_low = None   # so that _lowrank_weights() reads the parameters, not an old fold
        self._folded_low = tuple(t.contiguous() for t in self._lowrank_weights())
        return self

    def unfold_(self):
        self._folded = None
        self._folded_low = None
        return self

    def _lowrank_weights(self):
        """x_proj as (M, E, R + 2N) for x @ w (-> dt features | B | C) and dt_proj as (M, R, E),
        float32: the scan's rank-R delta path (delta = dt features @ dt_proj, formed in the kernel)."""
        if self._folded_low is not None:
            return self._folded_low
        return self.x_proj.transpose(1, 2), self.dt_proj.float().transpose(1, 2)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() after fold_(): the folded tensors move too (dtype casts keep the
        # scan's parameters float32)
        out = super()._apply(fn, *args, **kwargs)
        if self._folded is not None:
            (wu, bu), (wz, bz), wx, A, D, q = self._folded
            dev = self.in_proj.device
            mv = lambda t: fn(t).to(dev)  # noqa: E731
            self._folded = ((mv(wu), mv(bu)), (mv(wz), mv(bz)), mv(wx), A.to(dev), D.to(dev), q.to(dev))
        if self._folded_low is not None:
            wxl, wdt = self._folded_low
            self._folded_low = (fn(wxl).to(self.in_proj.device), wdt.to(self.in_proj.device))
        return out

    def _inference_kernels(self, h):
        """Inference (no autograd) on the Triton kernels: the scan writes y over z (z is this
        layer's own, used by nothing else) and takes delta in rank-R form."""
        from .ops import resolve_impl, triton_available
        return (self.cfg.coupled and not torch.is_grad_enabled()
                and resolve_impl(self.scan_impl, h.device) == "triton" and triton_available(h.device))

    def forward(self, h, ax=0, state=None):
        """h: (M, b, L, d) if ax == 0 else (b, M, L, d) -> the same. Streaming: `state` = (conv
        states, one (b, E, d_conv - 1) per modality; scan states: one (b, E, N) coupled state, or
        one per modality when uncoupled); returns (h, new state) then."""
        cfg = self.cfg
        M, E, N, d = cfg.n_modalities, cfg.d_inner, cfg.d_state, cfg.d_model
        fast = self._inference_kernels(h)
        (w_u, b_u), (w_z, b_z), w_x = self._projections(with_x=not fast)
        x = _norm_for_gemm(h, d)
        u = _matmul(x, w_u, ax, b_u)
        z = _matmul(x, w_z, ax, b_z)
        del x
        if state is None:
            u = _scan_view(causal_conv_silu(_scan_view(u, ax), self.conv_weight, self.conv_bias,
                                            impl=_conv_impl(self.scan_impl)), ax)
            new_conv = None
        else:   # the same conv, its left context taken from the previous chunk
            left = torch.stack([c.transpose(1, 2) for c in state[0]], dim=1)     # (b, M, K-1, E)
            su = _scan_view(u, ax)
            tail = conv_tail(left, su, self.conv_weight.shape[-1])
            u = _scan_view(causal_conv_silu(su, self.conv_weight, self.conv_bias, left,
                                            impl=_conv_impl(self.scan_impl)), ax)
            new_conv = [tail[:, m].transpose(1, 2) for m in range(M)]
            del su
        W = E                                                      # width of delta's columns
        inference_kw = {}
        if fast:
            w_x, w_dt = self._lowrank_weights()
            W = w_x.shape[2] - 2 * N
            inference_kw = {"_gate_in_place": True, "_delta_proj": w_dt}
        dbc = _matmul(u, w_x, ax)                                  # delta (or its rank-R form) | B | C
        A, D, bias = self.scan_weights()
        args = [_scan_view(t, ax) for t in (u, dbc[..., :W], dbc[..., W:W + N], dbc[..., W + N:], z)]
        su, sdelta, sB, sC, sz = args
        stream = {} if state is None else {"return_final_state": True}
        if cfg.coupled:
            y = coupled_scan(su, sdelta, A, sB, sC, D, sz, bias, delta_softplus=True,
                             coupling_scale=cfg.coupling_scale, impl=self.scan_impl,
                             initial_state=None if state is None else state[1][0],
                             **stream, **inference_kw)
            if state is not None:
                y, scan_states = y[0], [y[1]]
        else:
            y, scan_states = self._independent_chains(su, sdelta, A, sB, sC, D, sz, bias, state)
        del u, z, dbc, args, su, sdelta, sB, sC, sz
        y = _scan_view(y, ax)
        w_out = self.out_proj.transpose(1, 2)                      # (M, E, d)
        if self.drop.p > 0 and self.training:
            out = h + self.drop(_matmul(y, w_out, ax))
        else:
            out = _matmul(y, w_out, ax, add=h)
        return out if state is None else (out, (new_conv, scan_states))

    def _independent_chains(self, su, sdelta, A, sB, sC, D, sz, bias, state):
        """The ablation: M independent Mamba chains (each a coupled scan with M = 1, kappa = 1).
        A method of its own: the comprehension would make forward's locals closure cells, whose
        `del` torch.compile cannot trace."""
        stream = {} if state is None else {"return_final_state": True}
        ys = [coupled_scan(su[:, m:m + 1], sdelta[:, m:m + 1], A[m:m + 1], sB[:, m:m + 1],
                           sC[:, m:m + 1], D[m:m + 1], sz[:, m:m + 1], bias[m:m + 1],
                           delta_softplus=True, coupling_scale=1.0, impl=self.scan_impl,
                           initial_state=None if state is None else state[1][m], **stream)
              for m in range(self.cfg.n_modalities)]
        scan_states = None
        if state is not None:
            ys, scan_states = [y[0] for y in ys], [y[1] for y in ys]
        return torch.cat(ys, dim=1), scan_states


def _conv_impl(scan_impl):
    # the conv follows the scan's choice; "onnx" (export) uses the reference expression
    return scan_impl if scan_impl in ("auto", "reference", "triton") else "reference"


_BRANCH_PARAMS = {   # checkpoints written before the layers were stacked: branches.<m>.<name>
    "norm.weight": "norm_weight", "norm.bias": "norm_bias", "in_proj.weight": "in_proj",
    "conv1d.weight": "conv_weight", "conv1d.bias": "conv_bias", "x_proj.weight": "x_proj",
    "dt_proj.weight": "dt_proj", "dt_proj.bias": "dt_bias", "A_log": "A_log", "D": "D",
    "out_proj.weight": "out_proj",
}


def _stack_branch_checkpoint(module, state_dict, prefix, *args):
    """Load a per-branch checkpoint (layers.<i>.branches.<m>.*) into the stacked parameters."""
    if f"{prefix}branches.0.norm.weight" not in state_dict:
        return
    M = module.cfg.n_modalities
    for old, new in _BRANCH_PARAMS.items():
        keys = [f"{prefix}branches.{m}.{old}" for m in range(M)]
        if all(k in state_dict for k in keys):
            t = torch.stack([state_dict.pop(k) for k in keys])
            state_dict[prefix + new] = t[:, :, 0, :] if old == "conv1d.weight" else t


class CoupledMamba(nn.Module):
    """CoupledMamba(config)(inputs, lengths=None) -> (batch, num_outputs).

    inputs: a dict keyed by modality name, or a list/tuple in config order, of (batch, L_m, F_m).
    lengths: optional, same keys/order, int tensors (batch,) of valid steps per sample; a modality
    left out (or None) is whole, as in the runtime.
    Classification returns logits; regression returns the predicted values.
    """

    def __init__(self, config: CoupledMambaConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.names = list(config.modalities)
        self.embed = nn.ModuleDict({n: nn.Linear(f, config.d_model) for n, f in config.modalities.items()})
        self.layers = nn.ModuleList(CoupledLayer(config) for _ in range(config.n_layers))
        self.norm_f_weight = nn.Parameter(torch.ones(config.n_modalities, config.d_model))
        self.norm_f_bias = nn.Parameter(torch.zeros(config.n_modalities, config.d_model))
        self.head = nn.Linear(config.n_modalities * config.d_model, config.num_outputs)
        self._register_load_state_dict_pre_hook(_stack_final_norm, with_module=True)

    def to_precision(self, precision: str) -> "CoupledMamba":
        """Cast in place for inference at `precision` (float32, float16, bfloat16): the one dtype
        policy of every backend and export. contract.FLOAT32_PARAMS stay float32 (they feed the
        scan's float32 inputs A, D, delta_bias); the rest takes the precision. Returns self."""
        dtype = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}[normalize_precision(precision)]
        keep = {k: p.detach().float().clone() for k, p in self.named_parameters() if k.endswith(FLOAT32_PARAMS)}
        self.to(dtype)
        params = dict(self.named_parameters())
        for k, v in keep.items():
            params[k].data = v
        return self

    def fold_for_inference(self) -> "CoupledMamba":
        """Precompute every layer's folded projections and scan parameters (CoupledLayer.fold_):
        for an inference copy that will not be trained or reloaded. Call after to_precision().
        Returns self."""
        for layer in self.layers:
            layer.fold_()
        return self

    def set_scan_impl(self, impl: str) -> "CoupledMamba":
        """Choose the CoupledScan implementation of every layer ("auto", "reference", "triton", "onnx")."""
        for layer in self.layers:
            layer.scan_impl = impl
        return self

    def _ordered(self, inputs, what):
        if isinstance(inputs, dict):
            missing = [n for n in self.names if n not in inputs]
            extra = [k for k in inputs if k not in self.names]
            if missing or extra:
                raise ValueError(f"CoupledMamba: {what} keys must be {self.names}; "
                                 f"missing {missing}, unexpected {extra}")
            return [inputs[n] for n in self.names]
        inputs = list(inputs)
        if len(inputs) != len(self.names):
            raise ValueError(f"CoupledMamba: expected {len(self.names)} {what} ({self.names}), got {len(inputs)}")
        return inputs

    def forward(self, inputs, lengths=None, *, chunk: int | None = None):
        """chunk: run the layers over time chunks of this many steps, carrying the conv and scan
        states between them (as streaming does), so that activation memory is O(batch * chunk)
        instead of O(batch * L); the result is the same up to float round-off. Eager inference
        only (a Python loop over chunks); None runs the whole sequence at once."""
        xs = self._ordered(inputs, "inputs")
        for name, x in zip(self.names, xs):
            f = self.config.modalities[name]
            if x.dim() != 3 or x.shape[-1] != f:
                raise ValueError(f"CoupledMamba: input {name!r} must be (batch, L, {f}), got {tuple(x.shape)}")
        batch = xs[0].shape[0]
        # sym_max, not max: under export with dynamic lengths, max() would silently bake in which
        # modality is the longest.
        L = functools.reduce(torch.sym_max, (x.shape[1] for x in xs))
        if chunk is not None:
            if int(chunk) < 1:
                raise ValueError(f"CoupledMamba: chunk must be a positive number of steps, got {chunk}")
            if int(chunk) < L:
                return self._chunked(xs, lengths, int(chunk))
        if lengths is None:
            hs = [self._to_length(self.embed[n](x), L) for n, x in zip(self.names, xs)]
            valid = None
        else:
            lens = self._all_lengths(lengths, xs, batch)
            common = functools.reduce(torch.maximum, lens)                  # each sample's common length
            st = _StepCache()
            hs = [self._align(self.embed[n](self._zero_padding(x, ln, st)), ln, common, st(*xs), st)
                  for n, x, ln in zip(self.names, xs, lens)]
            valid = st(*xs)[None, :] < common[:, None]                     # (batch, L)
        ax = self._modality_axis()
        h = torch.stack(hs, dim=ax)       # the one copy that brings the modalities together
        del hs
        for layer in self.layers:
            h = layer(h, ax)
        h = self._final_norm(h, ax)
        if valid is None:
            pooled = h.mean(dim=2)
        else:
            w = (valid[None] if ax == 0 else valid[:, None]).unsqueeze(-1)
            total = torch.where(w, h, torch.zeros((), device=h.device)).sum(2)
            pooled = total / w.sum(2).clamp(min=1).float()
        return self._head(pooled, ax)

    def _chunked(self, xs, lengths, chunk):
        """forward's embedding, layers and pooling over time chunks, states carried (see forward).
        The inputs are embedded chunk by chunk too when every step depends on its own input only
        (equal lengths without per-sample lengths, or the pad rule); interpolation needs the whole
        valid prefix, so it is aligned first and only the (batch, L, d_model) result is sliced."""
        cfg = self.config
        M, E, N, K = cfg.n_modalities, cfg.d_inner, cfg.d_state, cfg.d_conv
        ax = self._modality_axis()
        batch, dev = xs[0].shape[0], xs[0].device
        Ls = [x.shape[1] for x in xs]
        L = max(Ls)
        lens = None
        if lengths is not None:
            lens = self._all_lengths(lengths, xs, batch)
        whole = None
        if (lens is not None or len(set(Ls)) > 1) and cfg.length_rule != "pad":
            if lens is None:
                whole = [self._to_length(self.embed[n](x), L) for n, x in zip(self.names, xs)]
            else:
                common = functools.reduce(torch.maximum, lens)
                whole = [self._align(self.embed[n](self._zero_padding(x, ln)), ln, common, _steps(*xs))
                         for n, x, ln in zip(self.names, xs, lens)]
        if lens is None:
            valid, count = None, None
        else:
            common = functools.reduce(torch.maximum, lens)
            valid = torch.arange(L, device=dev)[None, :] < common[:, None]
            count = common.clamp(min=1).float()

        def embed(t0, t1):
            if whole is not None:
                return [h[:, t0:t1] for h in whole]
            out = []
            for m, (n, x) in enumerate(zip(self.names, xs)):
                part = x[:, t0:min(t1, x.shape[1])]
                ln = (lens[m] if lens is not None else torch.full((batch,), x.shape[1], device=dev)) - t0
                h = self._zero_padding(self.embed[n](self._zero_padding(part, ln)), ln)   # pad rule
                if part.shape[1] < t1 - t0:         # past this modality's end: zeros
                    h = F.pad(h, (0, 0, 0, t1 - t0 - part.shape[1]))
                out.append(h)
            return out

        conv0 = None
        states = None
        total = None
        for t0 in range(0, L, chunk):
            t1 = min(t0 + chunk, L)
            hc = torch.stack(embed(t0, t1), dim=ax)
            if states is None:
                conv0 = [hc.new_zeros(batch, E, K - 1) for _ in range(M)]
                scan0 = [torch.zeros(batch, E, N, device=dev, dtype=torch.float32)
                         for _ in range(1 if cfg.coupled else M)]
                states = [(conv0, scan0) for _ in self.layers]
            for i, layer in enumerate(self.layers):
                hc, states[i] = layer(hc, ax, states[i])
            hc = self._final_norm(hc, ax)
            if valid is not None:
                w = valid[:, t0:t1]
                w = (w[None] if ax == 0 else w[:, None]).unsqueeze(-1)
                hc = torch.where(w, hc, torch.zeros((), device=hc.device))
            part = hc.sum(2)
            total = part if total is None else total + part
            hc = None   # not del: hc is a closure cell (the comprehension above), torch.compile cannot del it
        if count is None:
            pooled = total / L
        else:
            pooled = total / (count[None, :, None] if ax == 0 else count[:, None, None])
        return self._head(pooled, ax)

    def _modality_axis(self) -> int:
        # batch-major for export (the CoupledScan node's layout, weights broadcast by MatMul),
        # modality-major otherwise (batched matmuls over M, no copies)
        return 1 if self.layers[0].scan_impl == "onnx" else 0

    def _final_norm(self, h, ax):
        h = F.layer_norm(h, (self.config.d_model,), eps=1e-5)
        return (h * _per_modality(self.norm_f_weight, ax) + _per_modality(self.norm_f_bias, ax)).float()

    def _head(self, pooled, ax):
        # pooled (M, b, d) or (b, M, d) -> the head's (b, M * d), modalities in config order
        pooled = pooled.transpose(0, 1) if ax == 0 else pooled
        # -1 for the batch: the exported Reshape's shape is a constant, not computed from the input's
        return self.head(pooled.reshape(-1, pooled.shape[1] * pooled.shape[2]).to(self.head.weight.dtype))

    # ---------------------------------------------------------------- streaming (docs/streaming.md)

    def state_specs(self) -> dict:
        """{state name: (shape after the batch axis, dtype)}: what step() carries between chunks.
        Names follow the exported streaming graphs' `state.<what>` inputs."""
        cfg = self.config
        E, N, k = cfg.d_inner, cfg.d_state, cfg.d_conv
        dt = self.embed[self.names[0]].weight.dtype
        specs = {}
        for layer in range(cfg.n_layers):
            for name in self.names:
                specs[f"conv.{layer}.{name}"] = ((E, k - 1), dt)
            for name in (self.names if not cfg.coupled else [None]):
                specs[f"scan.{layer}" + ("" if name is None else f".{name}")] = ((E, N), torch.float32)
        for name in self.names:
            specs[f"pool.{name}"] = ((cfg.d_model,), torch.float32)
        specs["count"] = ((), torch.float32)
        return specs

    def initial_state(self, batch: int, device=None) -> dict:
        """All-zero state: what starts a stream."""
        device = device if device is not None else self.head.weight.device
        return {k: torch.zeros((batch, *shape), dtype=dt, device=device)
                for k, (shape, dt) in self.state_specs().items()}

    def step(self, inputs, state, lengths=None):
        """One chunk of a stream: inputs (batch, T, F_m), one T for every modality; state as
        initial_state() gives or the previous step returned; lengths (batch,) valid steps of each
        modality in this chunk (pad rule: steps past them are zeros to the model). Returns
        (output over every valid step so far, new state). Chunks of any sizes give, after the last,
        what forward() gives on the whole sequence (pad rule, or modalities of equal length)."""
        xs = self._ordered(inputs, "inputs")
        T = xs[0].shape[1]
        batch = xs[0].shape[0]
        for name, x in zip(self.names, xs):
            f = self.config.modalities[name]
            if x.dim() != 3 or x.shape[-1] != f or x.shape[0] != batch:
                raise ValueError(f"CoupledMamba.step: input {name!r} must be (batch, T, {f}), got {tuple(x.shape)}")
            torch._check(x.shape[1] == T, lambda: "CoupledMamba.step: every modality's chunk must have the same T")
        specs = self.state_specs()
        missing = [k for k in specs if k not in state]
        if missing:
            raise ValueError(f"CoupledMamba.step: state lacks {missing[:3]}")
        if lengths is None:
            lens = [torch.full((batch,), T, dtype=torch.int64, device=xs[0].device) for _ in xs]
        else:
            lens = self._all_lengths(lengths, xs, batch)
        common = functools.reduce(torch.maximum, lens)
        st = _StepCache()       # T: one size for every modality
        hs = [self._zero_padding(self.embed[n](self._zero_padding(x, ln, st)), ln, st)
              for n, x, ln in zip(self.names, xs, lens)]
        ax = self._modality_axis()
        h = torch.stack(hs, dim=ax)
        new = {}
        for i, layer in enumerate(self.layers):
            conv = [state[f"conv.{i}.{n}"] for n in self.names]
            scan = ([state[f"scan.{i}"]] if self.config.coupled else [state[f"scan.{i}.{n}"] for n in self.names])
            h, (conv, scan) = layer(h, ax, (conv, scan))
            new.update({f"conv.{i}.{n}": c for n, c in zip(self.names, conv)})
            if self.config.coupled:
                new[f"scan.{i}"] = scan[0]
            else:
                new.update({f"scan.{i}.{n}": c for n, c in zip(self.names, scan)})
        valid = (st(xs[0])[None, :] < common[:, None]).unsqueeze(-1)
        valid = valid[None] if ax == 0 else valid[:, None]
        count = state["count"] + common.float()
        h = torch.where(valid, self._final_norm(h, ax), torch.zeros((), device=h.device)).sum(2)
        pooled = []
        for m, name in enumerate(self.names):
            total = state[f"pool.{name}"] + (h[m] if ax == 0 else h[:, m])
            new[f"pool.{name}"] = total
            pooled.append(total / count.clamp(min=1)[:, None])
        new["count"] = count
        out = self._head(torch.stack(pooled, dim=1), 1)
        return out, {k: new[k] for k in specs}

    def _to_length(self, h, L):
        """Whole sequences (no lengths) to the common length L."""
        # Skip only when provably equal; a symbolic (exported) length is always resampled/padded,
        # which is the identity when it already is L.
        if statically_known_true(h.shape[1] == L):
            return h
        if self.config.length_rule == "pad":
            return F.pad(h, (0, 0, 0, L - h.shape[1]))
        return resample_linear(h, L)

    def _align(self, h, length, common, out_steps, steps=_steps):
        """Padded sequences with per-sample valid lengths to the common axis, whose steps 0 .. L - 1
        are `out_steps` (see the module doc). steps: _steps or the forward's _StepCache."""
        if self.config.length_rule != "pad":
            return resample_valid(h, length, common, out_steps, steps)
        if statically_known_true(h.shape[1] == out_steps.shape[0]):
            return self._zero_padding(h, length, steps)
        # step t of h where t < length, else 0: a Gather of valid rows (the exported graph pads to a
        # computed length without shape arithmetic)
        idx = torch.minimum(out_steps[None, :], (length[:, None] - 1).clamp(min=0))
        keep = (out_steps[None, :] < length[:, None]).unsqueeze(-1)
        return torch.where(keep, _pick_rows(h, idx, steps), torch.zeros((), device=h.device, dtype=h.dtype))

    @staticmethod
    def _zero_padding(x, length, steps=_steps):
        """x with every step at or past the sample's valid length set to 0 (NaN and Inf too)."""
        keep = (steps(x)[None, :] < length[:, None]).unsqueeze(-1)
        return torch.where(keep, x, torch.zeros((), device=x.device, dtype=x.dtype))

    def _all_lengths(self, lengths, xs, batch):
        """Every modality's valid lengths: a modality left out of the `lengths` dict (or None in a
        list) is whole, its full length, as in the runtime and the CLI (docs/lengths.md)."""
        if isinstance(lengths, dict):
            extra = [k for k in lengths if k not in self.names]
            if extra:
                raise ValueError(f"CoupledMamba: lengths keys must be among {self.names}; unexpected {extra}")
            lengths = [lengths.get(n) for n in self.names]
        else:
            lengths = self._ordered(lengths, "lengths")
        return [torch.full((batch,), x.shape[1], dtype=torch.int64, device=x.device) if ln is None
                else self._lengths(ln, x, batch, n) for ln, x, n in zip(lengths, xs, self.names)]

    def _lengths(self, length, x, batch, name):
        """Per-sample valid lengths of one modality as int64 (batch,) on x's device, checked in eager mode."""
        length = torch.as_tensor(length, device=x.device)
        if length.dim() != 1 or length.shape[0] != batch:
            raise ValueError(f"CoupledMamba: lengths[{name!r}] must be (batch,) = ({batch},), got {tuple(length.shape)}")
        if length.is_floating_point() or length.dtype == torch.bool:
            raise ValueError(f"CoupledMamba: lengths[{name!r}] must be integers, got {length.dtype}")
        length = length.long()
        capturing = length.is_cuda and torch.cuda.is_current_stream_capturing()
        if not (torch.compiler.is_compiling() or capturing):     # data-dependent checks: eager only
            if bool((length < 0).any()) or bool((length > x.shape[1]).any()):
                raise ValueError(f"CoupledMamba: lengths[{name!r}] must be in [0, {x.shape[1]}], "
                                 f"got {length.tolist()}")
        return length


def _stack_final_norm(module, state_dict, prefix, *args):
    """Load a checkpoint written before the final norms were stacked (norm_f.<m>.weight/bias)."""
    M = module.config.n_modalities
    for old, new in (("weight", "norm_f_weight"), ("bias", "norm_f_bias")):
        keys = [f"{prefix}norm_f.{m}.{old}" for m in range(M)]
        if all(k in state_dict for k in keys):
            state_dict[prefix + new] = torch.stack([state_dict.pop(k) for k in keys])
