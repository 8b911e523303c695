"""The official Coupled Mamba code's model (hustcselwb/coupled-mamba, mamba_ssm/mutimamba.py, class
MutiMamba), reimplemented so that its checkpoints load and export as they are.

What that class computes (read from its source; our own code below):

  * per modality a Linear + ReLU to d_model: fc_a (audio), fc_v (rgb), fc_f (flow);
  * n_layer mamba-ssm Blocks (norm -> Mamba-1 mixer; `layers.{i}.norm`, `layers.{i}.mixer.*`).
    `self.mutimamba = [self.layers for _ in range(3)]` is the SAME ModuleList three times: every
    modality runs through the same blocks, i.e. shared weights. After block i, for every modality:
    norm_f(mixer output) + the block's input (norm_f is one norm shared by all modalities and layers);
  * between layers (not after the last) cross-modal enhancement: modality m gets
    ReLU(Linear(2 d_model -> d_model)) of the concatenation of the other two
    (resnet_audio / resnet_rgb / resnet_flow, one per layer), added to its own output;
  * after the last layer a learned weighted average of the three (weight_*_inner, divided by their
    sum) and the regressor Linear(d_model, 128) + ReLU + Linear(128, 1) + Sigmoid, applied at every
    time step (there is no pooling); the forward ends with `.squeeze()`.

Where the coupling is: NOT in the state chains. The mixer is mamba-ssm's plain Mamba-1 (the
repository's selective_scan CUDA sources, deleted in a later commit, are mamba's own kernel with
no change to the recurrence), run separately on each modality with the shared weights; modalities
meet only in the enhancement MLPs between layers. So each block is Mamba's selective scan, which is
CoupledScan at M = 1 and coupling_scale 1; here the three modalities share one block and run as ONE
batched call (stacked along the batch: one CoupledScan node per layer with batch 3 * batch).

Differences to the official code, on purpose:
  * the output is (batch, L) for every batch size: `.squeeze()` also drops the batch axis at batch 1
    (and L at L = 1);
  * the three inputs must have one length (the official code fails inside torch.cat otherwise);
  * as published, mutimamba.py passes `coupled=False` to its own create_block, which takes no such
    argument: the file does not run unmodified; its state_dict layout is unambiguous all the same.
  * the norms compute in float32 whatever the precision (the fused kernels mamba-ssm offers do).
Later revisions of the repository (mamba_ssm/modules/mamba_simple.py: MutiMamba with FusionNet
input layers and max pooling, then CoupledMamba with per-modality branches) are other
architectures with other parameter names; they are refused with the keys that do not match.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .mamba1 import MambaMixer, keeps_float32

ARCH = "coupled-mamba-official"
# the official forward's arguments, in order, with the input layer and feature-size name of each
INPUTS = (("input_A", "fc_a", "audio_dim"), ("input_V", "fc_v", "rgb_dim"), ("input_F", "fc_f", "flow_dim"))
ENHANCE = ("resnet_audio", "resnet_rgb", "resnet_flow")
FUSION_WEIGHTS = ("weight_audio_inner", "weight_visual_inner", "weight_flow_inner")
OUTPUT = "output"
LENGTH_DIM = "L"
# keys that tell what the checkpoint is (the config is read from their shapes)
ANCHORS = ("fc_a.0.weight", "fc_v.0.weight", "fc_f.0.weight", "layers.0.mixer.in_proj.weight",
           "layers.0.mixer.A_log", "layers.0.mixer.conv1d.weight", "layers.0.mixer.dt_proj.weight",
           "norm_f.weight", "regressor.0.weight")


@dataclass
class OfficialConfig:
    """MutiMamba's sizes; all but norm_eps are read from a state_dict's shapes (infer_config)."""
    d_model: int
    n_layer: int
    audio_dim: int
    rgb_dim: int
    flow_dim: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    conv_bias: bool = True
    bias: bool = False
    rms_norm: bool = False
    norm_eps: float = 1e-5        # not in a state_dict: the official default; --norm-eps otherwise
    head_hidden: int = 128

    def to_dict(self) -> dict:
        return {"arch": ARCH, **dataclasses.asdict(self)}

    @property
    def input_sizes(self) -> dict:
        return {name: getattr(self, size) for name, _, size in INPUTS}


class _Norm(nn.Module):
    """LayerNorm or RMSNorm (mamba-ssm's: weight only) over the last axis, computed in float32."""

    def __init__(self, d: int, rms: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = None if rms else nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        w = self.weight.float()
        if self.bias is None:
            y = F.rms_norm(x.float(), (x.shape[-1],), w, self.eps)
        else:
            y = F.layer_norm(x.float(), (x.shape[-1],), w, self.bias.float(), self.eps)
        return y.to(x.dtype)


class _Block(nn.Module):
    """mamba-ssm's Block as MutiMamba calls it (no residual in): mixer(norm(x)); keys norm.*, mixer.*."""

    def __init__(self, cfg: OfficialConfig):
        super().__init__()
        self.mixer = MambaMixer(cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank,
                                conv_bias=cfg.conv_bias, bias=cfg.bias)
        self.norm = _Norm(cfg.d_model, cfg.rms_norm, cfg.norm_eps)

    def forward(self, x):
        return self.mixer(self.norm(x))


class OfficialCoupledMamba(nn.Module):
    """MutiMamba (see the module doc): forward(input_A, input_V, input_F), each (batch, L, feature
    size), one L for the three, -> (batch, L), the regressor's sigmoid output at every step."""

    input_names = tuple(name for name, _, _ in INPUTS)

    def __init__(self, config: OfficialConfig):
        super().__init__()
        self.config = c = config
        d = c.d_model
        for name, layer, size in INPUTS:
            setattr(self, layer, nn.Sequential(nn.Linear(getattr(c, size), d), nn.ReLU()))
        for name in ENHANCE:
            setattr(self, name, nn.ModuleList(nn.Sequential(nn.Linear(2 * d, d), nn.ReLU()) for _ in range(c.n_layer)))
        self.layers = nn.ModuleList(_Block(c) for _ in range(c.n_layer))
        self.norm_f = _Norm(d, c.rms_norm, c.norm_eps)
        for name in FUSION_WEIGHTS:
            setattr(self, name, nn.Parameter(torch.ones(1)))
        self.regressor = nn.Sequential(nn.Linear(d, c.head_hidden), nn.ReLU(), nn.Linear(c.head_hidden, 1),
                                       nn.Sigmoid())

    # the interface the runtime's PyTorch backend and export use (as CoupledMamba's)
    def set_scan_impl(self, impl: str) -> "OfficialCoupledMamba":
        for block in self.layers:
            block.mixer.scan_impl = impl
        return self

    def to_precision(self, precision: str) -> "OfficialCoupledMamba":
        dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[precision]
        for name, p in self.named_parameters():
            p.data = p.data.float() if keeps_float32(name) else p.data.to(dt)
        return self

    def fold_for_inference(self) -> "OfficialCoupledMamba":
        return self          # nothing precomputed: the mixers are plain Mamba-1

    def tensor_specs(self, precision: str):
        """(inputs, outputs) as (name, shape, dtype) triples, what the runtime's TensorSpec holds: the
        three inputs share the length axis "L"."""
        from ..contract import BATCH_DIM
        ins = [(n, (BATCH_DIM, LENGTH_DIM, f), precision) for n, f in self.config.input_sizes.items()]
        return ins, [(OUTPUT, (BATCH_DIM, LENGTH_DIM), precision)]

    def forward(self, input_A, input_V, input_F):
        xs = (input_A, input_V, input_F)
        if not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export():
            if len({(x.shape[0], x.shape[1]) for x in xs}) != 1:
                raise ValueError("the official Coupled Mamba takes one batch and one length for its three inputs "
                                 f"(its enhancement layers concatenate them step by step), got "
                                 f"{[tuple(x.shape) for x in xs]}")
        emb = [getattr(self, layer)(x) for x, (_, layer, _) in zip(xs, INPUTS)]
        enhance = [getattr(self, name) for name in ENHANCE]
        for i, block in enumerate(self.layers):
            # the block is shared by the three modalities: one call on the three stacked along the batch
            h = torch.cat(emb, dim=0)
            out = (self.norm_f(block(h)) + h).reshape(3, -1, *h.shape[1:])
            outs = [out[0], out[1], out[2]]
            if i == len(self.layers) - 1:
                break
            others = [(1, 2), (0, 2), (0, 1)]
            emb = [outs[m] + enhance[m][i](torch.cat([outs[a], outs[b]], dim=-1)) for m, (a, b) in enumerate(others)]
        w = [getattr(self, name) for name in FUSION_WEIGHTS]
        fused = (w[0] * outs[0] + w[1] * outs[1] + w[2] * outs[2]) / (w[0] + w[1] + w[2])
        return self.regressor(fused).squeeze(-1)


# ---------------------------------------------------------------------------------------- loading

def read_state_dict(path) -> dict:
    """A plain state_dict (name -> tensor) from `path` (torch.save of model.state_dict(); a dict
    holding one under "state_dict" / "model", and DataParallel's "module." prefix, are accepted),
    loaded with weights_only=True. UserError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a torch.save file (not a zip archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 - weights_only refusals, damaged archives: one line
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = (f"it holds objects other than tensors ({found.group(1)}); save model.state_dict() instead"
                if found else (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise UserError(f"{path}: not a loadable state_dict: {what}") from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state_dict (expected a dict of parameter name -> tensor)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def looks_official(sd: dict) -> bool:
    return all(k in sd for k in ANCHORS)


def _shape(sd, key, dims):
    t = sd.get(key)
    return tuple(t.shape) if isinstance(t, torch.Tensor) and t.dim() == dims else None


def _listing(keys, n=4) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def infer_config(sd: dict, norm_eps: float = 1e-5, where: str = "state_dict") -> OfficialConfig:
    """The config a MutiMamba state_dict was trained with, from its shapes; then every key checked
    against a model of that config. UserError naming the missing, mis-shaped or foreign keys."""
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps > 0:
        raise UserError(f"norm eps must be a positive number, got {norm_eps!r}")
    missing = [k for k in ANCHORS if k not in sd]
    if missing:
        hint = ""
        if any(k.startswith(("audio_linear.", "mamba_branches.", "regression.")) for k in sd):
            hint = " (this looks like a later revision of the official code, mamba_simple.py's MutiMamba or " \
                   "CoupledMamba: a different architecture, not supported)"
        raise UserError(f"{where}: not a {ARCH} (MutiMamba) state_dict: missing {_listing(missing)}; "
                        f"it holds {_listing(sorted(sd))}{hint}")
    dims = {"fc_a.0.weight": 2, "fc_v.0.weight": 2, "fc_f.0.weight": 2, "layers.0.mixer.in_proj.weight": 2,
            "layers.0.mixer.A_log": 2, "layers.0.mixer.conv1d.weight": 3, "layers.0.mixer.dt_proj.weight": 2,
            "regressor.0.weight": 2}
    bad = [k for k, n in dims.items() if _shape(sd, k, n) is None]
    if bad:
        raise UserError(f"{where}: mis-shaped {_listing(f'{k} {tuple(sd[k].shape)}' for k in bad)} "
                        f"(expected {', '.join(f'{dims[k]}-D' for k in bad[:4])})")
    d_model, audio = _shape(sd, "fc_a.0.weight", 2)
    d_inner, d_state = _shape(sd, "layers.0.mixer.A_log", 2)
    n_layer = 0
    while f"layers.{n_layer}.mixer.A_log" in sd:
        n_layer += 1
    cfg = OfficialConfig(
        d_model=d_model, n_layer=n_layer, audio_dim=audio, rgb_dim=_shape(sd, "fc_v.0.weight", 2)[1],
        flow_dim=_shape(sd, "fc_f.0.weight", 2)[1], d_inner=d_inner, d_state=d_state,
        d_conv=_shape(sd, "layers.0.mixer.conv1d.weight", 3)[-1],
        dt_rank=_shape(sd, "layers.0.mixer.dt_proj.weight", 2)[1],
        conv_bias="layers.0.mixer.conv1d.bias" in sd, bias="layers.0.mixer.in_proj.bias" in sd,
        rms_norm="norm_f.bias" not in sd, norm_eps=float(norm_eps), head_hidden=_shape(sd, "regressor.0.weight", 2)[0])
    want = {k: tuple(v.shape) for k, v in OfficialCoupledMamba(cfg).state_dict().items()}
    missing = [k for k in want if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {want[k]})"
             for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    extra = [k for k in sd if k not in want]
    if missing or wrong or extra:
        parts = ([f"missing {_listing(missing)}"] if missing else []) + \
                ([f"mis-shaped {_listing(wrong, 3)}"] if wrong else []) + \
                ([f"unexpected {_listing(extra)}"] if extra else [])
        raise UserError(f"{where}: does not match the {ARCH} architecture read from its shapes "
                        f"(d_model {d_model}, {n_layer} layers, d_state {d_state}): {'; '.join(parts)}")
    if not all(v.is_floating_point() for v in sd.values()):
        ints = [k for k, v in sd.items() if not v.is_floating_point()]
        raise UserError(f"{where}: holds non-floating-point tensors: {_listing(ints)}")
    return cfg


def from_state_dict(sd: dict, norm_eps: float = 1e-5, where: str = "state_dict") -> OfficialCoupledMamba:
    cfg = infer_config(sd, norm_eps, where)
    model = OfficialCoupledMamba(cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval()


def load_official(path, norm_eps: float = 1e-5, map_location="cpu", state_dict=None) -> OfficialCoupledMamba:
    """OfficialCoupledMamba (eval mode, float32) from a MutiMamba state_dict file (or `state_dict`,
    already read from it)."""
    sd = read_state_dict(path) if state_dict is None else state_dict
    model = from_state_dict(sd, norm_eps, where=str(path))
    try:
        return model.to(map_location)
    except Exception as e:  # noqa: BLE001 - e.g. CUDA asked for on a machine without one
        raise UserError(f"cannot move the model to {map_location}: {e}") from None
