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


def resample_linear(h, L):
    """h (b, L_m, d) -> (b, L, d) by linear interpolation over time with aligned end points: the
    same as F.interpolate(mode="linear", align_corners=True). Every sample's whole sequence."""
    b, Lm = h.shape[0], h.shape[1]
    full = torch.full((b,), Lm, device=h.device, dtype=torch.int64)
    return resample_valid(h, full, torch.full_like(full, L), L)


def resample_valid(h, length, target, L):
    """Per sample i: h[i, :length[i]] resampled linearly (aligned end points) to target[i] steps,
    written to out[i, :target[i]]; out[i, target[i]:] = 0. h (b, L_m, d), length and target int64
    (b,), L >= max(target). Only valid steps are read (indices stay below length[i]), so padding
    never reaches the output; a sample with length 0 gives zeros. Index arithmetic only, so that it
    exports with symbolic lengths (L = 1 included)."""
    Lm = h.shape[1]
    last = (length - 1).clamp(min=0)                                     # (b,)
    # float32 scale times the step index, as PyTorch's own kernel computes the source position
    scale = last.float() / (target - 1).clamp(min=1).float()             # (b,)
    pos = torch.arange(L, device=h.device, dtype=torch.float32)[None, :] * scale[:, None]   # (b, L)
    hi = last.float()[:, None]
    i0 = torch.minimum(pos.floor(), hi)                                  # float clamps: no integer Clip
    w = (pos - i0).unsqueeze(-1)                                         # weight of the right neighbour
    i1 = torch.minimum(i0 + 1, hi)
    # rows of h flattened to (b * L_m, d), picked by one index per (sample, step): a Gather of b * L
    # rows, not of b * L * d elements
    b, d = h.shape[0], h.shape[2]
    rows = h.reshape(b * Lm, d)
    base = (torch.arange(b, device=h.device) * Lm)[:, None]
    pick = lambda i: rows.index_select(0, (base + i.long().clamp(max=Lm - 1)).reshape(-1)).reshape(b, L, d)  # noqa: E731
    left, right = pick(i0).float(), pick(i1).float()
    out = (1 - w) * left + w * right
    steps = torch.arange(L, device=h.device)[None, :]
    keep = (steps < target[:, None]) & (length[:, None] > 0)
    return torch.where(keep.unsqueeze(-1), out, torch.zeros((), device=h.device)).to(h.dtype)


class MambaBranch(nn.Module):
    """One modality's Mamba block inside a coupled layer, up to the scan inputs and after it."""

    def __init__(self, cfg: CoupledMambaConfig):
        super().__init__()
        d, E, N, R = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank
        self.norm = nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 2 * E, bias=False)          # -> u, z
        self.conv1d = nn.Conv1d(E, E, cfg.d_conv, groups=E, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)       # -> dt (rank R), B, C
        self.dt_proj = nn.Linear(R, E, bias=True)               # bias = the scan's delta_bias
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d, bias=False)
        self.drop = nn.Dropout(cfg.dropout)
        self._init_like_mamba(cfg)

    @torch.no_grad()
    def _init_like_mamba(self, cfg):
        # dt_proj as Mamba: weight ~ U(-r^-1/2, r^-1/2); bias = softplus^-1(dt), dt log-uniform in
        # [dt_min, dt_max], so that softplus(bias) starts in that range.
        std = cfg.rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(cfg.d_inner) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
                       + math.log(cfg.dt_min)).clamp(min=1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # GPT-2 style rescaling of the residual branch's output projection, as Mamba does.
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight /= math.sqrt(cfg.n_layers)

    def scan_inputs(self, x, conv_state=None):
        """x (b, L, d) -> u, delta, B, C, z of this modality, each (b, L, .). Streaming: conv_state
        (b, E, d_conv - 1) holds the conv input's last steps before x (zeros start a stream); then
        the result has a sixth entry, the conv state after x."""
        L = x.shape[1]
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        if conv_state is None:
            u = F.silu(self.conv1d(u.transpose(1, 2))[..., :L].transpose(1, 2))   # causal conv
        else:   # the same causal conv, its left padding taken from the previous chunk
            k = self.conv1d.kernel_size[0]
            ext = torch.cat([conv_state.to(u.dtype), u.transpose(1, 2)], dim=2)   # (b, E, k - 1 + L)
            conv_state = ext[..., ext.shape[2] - (k - 1):]
            u = F.silu(F.conv1d(ext, self.conv1d.weight, self.conv1d.bias, groups=ext.shape[1])).transpose(1, 2)
        R, N = self.dt_proj.in_features, self.A_log.shape[1]
        dt, Bm, Cm = self.x_proj(u).split([R, N, N], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)                            # bias goes to the scan
        if conv_state is None:
            return u, delta, Bm, Cm, z
        return u, delta, Bm, Cm, z, conv_state


class CoupledLayer(nn.Module):
    """M Mamba branches sharing one coupled scan (or M independent scans when cfg.coupled is False)."""

    def __init__(self, cfg: CoupledMambaConfig):
        super().__init__()
        self.cfg = cfg
        self.branches = nn.ModuleList(MambaBranch(cfg) for _ in cfg.modalities)
        self.scan_impl = "auto"

    def forward(self, xs, state=None):
        """xs: M tensors (b, L, d) -> M tensors. Streaming: `state` = (conv states, one per branch;
        scan states: one (b, E, N) coupled state, or one per branch when uncoupled); returns
        (outputs, new state) then."""
        conv = None if state is None else state[0]
        parts = [br.scan_inputs(x, None if conv is None else conv[m])
                 for m, (br, x) in enumerate(zip(self.branches, xs))]
        new_conv = None if conv is None else [p[5] for p in parts]
        dtype = parts[0][0].dtype
        u, delta, Bm, Cm, z = (torch.stack([p[i].to(dtype) for p in parts], dim=1) for i in range(5))
        # the per-branch tensors (and the projections they view) are copies now: free them
        # before the scan, which is where inference memory peaks
        del parts
        A = torch.stack([-torch.exp(br.A_log.float()) for br in self.branches])
        D = torch.stack([br.D.float() for br in self.branches])
        bias = torch.stack([br.dt_proj.bias.float() for br in self.branches])
        stream = {} if state is None else {"return_final_state": True}
        if self.cfg.coupled:
            y = coupled_scan(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True,
                             coupling_scale=self.cfg.coupling_scale, impl=self.scan_impl,
                             initial_state=None if state is None else state[1][0], **stream)
            if state is not None:
                y, scan_states = y[0], [y[1]]
        else:   # ablation: M independent Mamba chains (each a coupled scan with M = 1, kappa = 1)
            ys = [coupled_scan(u[:, m:m + 1], delta[:, m:m + 1], A[m:m + 1], Bm[:, m:m + 1],
                               Cm[:, m:m + 1], D[m:m + 1], z[:, m:m + 1], bias[m:m + 1],
                               delta_softplus=True, coupling_scale=1.0, impl=self.scan_impl,
                               initial_state=None if state is None else state[1][m], **stream)
                  for m in range(len(self.branches))]
            if state is not None:
                ys, scan_states = [y[0] for y in ys], [y[1] for y in ys]
            y = torch.cat(ys, dim=1)
        out = [x + br.drop(br.out_proj(y[:, m])) for m, (br, x) in enumerate(zip(self.branches, xs))]
        return out if state is None else (out, (new_conv, scan_states))


class CoupledMamba(nn.Module):
    """CoupledMamba(config)(inputs, lengths=None) -> (batch, num_outputs).

    inputs: a dict keyed by modality name, or a list/tuple in config order, of (batch, L_m, F_m).
    lengths: optional, same keys/order, int tensors (batch,) of valid steps per sample.
    Classification returns logits; regression returns the predicted values.
    """

    def __init__(self, config: CoupledMambaConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.names = list(config.modalities)
        self.embed = nn.ModuleDict({n: nn.Linear(f, config.d_model) for n, f in config.modalities.items()})
        self.layers = nn.ModuleList(CoupledLayer(config) for _ in range(config.n_layers))
        self.norm_f = nn.ModuleList(nn.LayerNorm(config.d_model) for _ in self.names)
        self.head = nn.Linear(config.n_modalities * config.d_model, config.num_outputs)

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

    def forward(self, inputs, lengths=None):
        xs = self._ordered(inputs, "inputs")
        for name, x in zip(self.names, xs):
            f = self.config.modalities[name]
            if x.dim() != 3 or x.shape[-1] != f:
                raise ValueError(f"CoupledMamba: input {name!r} must be (batch, L, {f}), got {tuple(x.shape)}")
        batch = xs[0].shape[0]
        # sym_max, not max: under export with dynamic lengths, max() would silently bake in which
        # modality is the longest.
        L = functools.reduce(torch.sym_max, (x.shape[1] for x in xs))
        if lengths is None:
            hs = [self._to_length(self.embed[n](x), L) for n, x in zip(self.names, xs)]
            valid = None
        else:
            lens = [self._lengths(ln, x, batch, n) for ln, x, n in zip(self._ordered(lengths, "lengths"), xs, self.names)]
            common = functools.reduce(torch.maximum, lens)                  # each sample's common length
            hs = [self._align(self.embed[n](self._zero_padding(x, ln)), ln, common, L)
                  for n, x, ln in zip(self.names, xs, lens)]
            valid = torch.arange(L, device=xs[0].device)[None, :] < common[:, None]    # (batch, L)
        for layer in self.layers:
            hs = layer(hs)
        pooled = []
        for m, h in enumerate(hs):
            h = self.norm_f[m](h).float()
            if valid is None:
                pooled.append(h.mean(dim=1))
            else:
                w = valid.unsqueeze(-1)
                total = torch.where(w, h, torch.zeros((), device=h.device)).sum(1)
                pooled.append(total / w.sum(1).clamp(min=1).float())
        return self.head(torch.cat(pooled, dim=-1).to(self.head.weight.dtype))

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
            lens = [self._lengths(ln, x, batch, n) for ln, x, n in zip(self._ordered(lengths, "lengths"), xs, self.names)]
        common = functools.reduce(torch.maximum, lens)
        hs = [self._zero_padding(self.embed[n](self._zero_padding(x, ln)), ln)
              for n, x, ln in zip(self.names, xs, lens)]
        new = {}
        for i, layer in enumerate(self.layers):
            conv = [state[f"conv.{i}.{n}"] for n in self.names]
            scan = ([state[f"scan.{i}"]] if self.config.coupled else [state[f"scan.{i}.{n}"] for n in self.names])
            hs, (conv, scan) = layer(hs, (conv, scan))
            new.update({f"conv.{i}.{n}": c for n, c in zip(self.names, conv)})
            if self.config.coupled:
                new[f"scan.{i}"] = scan[0]
            else:
                new.update({f"scan.{i}.{n}": c for n, c in zip(self.names, scan)})
        valid = (torch.arange(T, device=xs[0].device)[None, :] < common[:, None]).unsqueeze(-1)
        count = state["count"] + common.float()
        pooled = []
        for m, (name, h) in enumerate(zip(self.names, hs)):
            h = self.norm_f[m](h).float()
            total = state[f"pool.{name}"] + torch.where(valid, h, torch.zeros((), device=h.device)).sum(1)
            new[f"pool.{name}"] = total
            pooled.append(total / count.clamp(min=1)[:, None])
        new["count"] = count
        out = self.head(torch.cat(pooled, dim=-1).to(self.head.weight.dtype))
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

    def _align(self, h, length, common, L):
        """Padded sequences with per-sample valid lengths to the common axis L (see the module doc)."""
        if self.config.length_rule == "pad":
            h = self._zero_padding(h, length)
            return h if statically_known_true(h.shape[1] == L) else F.pad(h, (0, 0, 0, L - h.shape[1]))
        return resample_valid(h, length, common, L)

    @staticmethod
    def _zero_padding(x, length):
        """x with every step at or past the sample's valid length set to 0 (NaN and Inf too)."""
        steps = torch.arange(x.shape[1], device=x.device)[None, :]
        keep = (steps < length[:, None]).unsqueeze(-1)
        return torch.where(keep, x, torch.zeros((), device=x.device, dtype=x.dtype))

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
