"""CoupledMambaConfig: the model's hyper-parameters (DESIGN.md section 4). Imports no torch, so the
runtime can read a checkpoint's or manifest's config without it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

TASKS = ("regression", "classification")
LENGTH_RULES = ("interpolate", "pad")


@dataclass
class CoupledMambaConfig:
    """Hyper-parameters of a Coupled Mamba model; the defaults are the paper's (d_model 128, expand 2,
    d_conv 4, d_state 64, 3 layers).

    modalities: name -> input feature size, in order (the order of the scan's M axis and of
        positional inputs).
    coupling_scale: kappa of the coupled state c[t] = kappa * sum_m h[m,t]; None means 1/M.
    length_rule: how modalities of different lengths are brought to the common scan length L
        (the longest): "interpolate" resamples each shorter sequence linearly over time to L;
        "pad" zero-pads it at the end (its valid length stays as given for pooling).
    """
    modalities: dict = field(default_factory=lambda: {"text": 768, "audio": 74, "vision": 35})
    d_model: int = 128
    n_layers: int = 3
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None          # None: ceil(d_model / 16), as Mamba
    coupling_scale: float | None = None
    coupled: bool = True                # False: M independent Mamba chains (the ablation baseline)
    num_outputs: int = 1
    task: str = "regression"
    length_rule: str = "interpolate"
    dropout: float = 0.0
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self):
        self.validate()

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    def validate(self) -> None:
        if not isinstance(self.modalities, dict) or not self.modalities:
            raise ValueError("config: modalities must be a non-empty dict name -> feature size")
        for name, size in self.modalities.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"config: modality name {name!r} must be a Python identifier")
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"config: modality {name!r} feature size must be a positive int")
        for k in ("d_model", "n_layers", "d_state", "d_conv", "expand", "num_outputs"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"config: {k} must be a positive int, got {v!r}")
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int) or self.dt_rank < 1):
            raise ValueError(f"config: dt_rank must be a positive int or None, got {self.dt_rank!r}")
        if self.coupling_scale is not None and not (
                isinstance(self.coupling_scale, (int, float)) and self.coupling_scale > 0):
            raise ValueError(f"config: coupling_scale must be positive or None, got {self.coupling_scale!r}")
        if not isinstance(self.coupled, bool):
            raise ValueError("config: coupled must be true or false")
        if self.task not in TASKS:
            raise ValueError(f"config: task must be one of {TASKS}, got {self.task!r}")
        if self.length_rule not in LENGTH_RULES:
            raise ValueError(f"config: length_rule must be one of {LENGTH_RULES}, got {self.length_rule!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ValueError("config: dropout must be in [0, 1)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CoupledMambaConfig":
        if not isinstance(d, dict):
            raise ValueError("config: expected a dict")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown field(s) {', '.join(map(str, unknown))}")
        return cls(**{k: (dict(v) if k == "modalities" else v) for k, v in d.items()})
