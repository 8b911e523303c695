"""The one interface over TensorRT engines, ONNX Runtime sessions and PyTorch checkpoints, so parity
and profiling compare backends with one code path (loader.load opens a file as one of them).

    b.inputs, b.outputs            # [TensorSpec]
    b.run({"text": x, ...})        # -> {"output": np.ndarray}
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import UserError
from .specs import (TensorSpec, cast_inputs, check_feeds, check_finite, check_lengths, check_nonempty, fill_defaults,
                    merge_lengths, warn_casts)

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
ONNX_SUFFIXES = (".onnx",)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


class Backend:
    """Base of the three backends. Subclasses set name, kind, path, precision, inputs, outputs and
    implement `_run(feeds, infos, **kw)`."""

    kind = "?"
    name: str
    path: Path
    precision: str = "float32"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    config: dict | None = None        # the model's CoupledMambaConfig as a dict, when known
    check_finite: bool = False        # refuse NaN/Inf in valid steps of host inputs (the CLI sets it)

    def input_ranges(self) -> dict | None:
        """Input name -> [(min, opt, max) per axis] where the backend limits shapes (TensorRT
        profiles); None when any shape is accepted."""
        return None

    def check(self, feeds: Mapping):
        ranges = self.input_ranges()
        lohi = {k: [(lo, hi) for lo, _, hi in v] for k, v in ranges.items()} if ranges else None
        infos = check_feeds(self.name, self.inputs, feeds, lohi)
        check_nonempty(self.name, self.inputs, infos)
        check_lengths(self.name, self.inputs, feeds, infos)
        if self.check_finite:
            check_finite(self.name, self.inputs, feeds, infos)
        return infos

    def run(self, feeds: Mapping, lengths: Mapping | None = None, **kw) -> dict[str, np.ndarray]:
        """Outputs for `feeds` (name -> array). lengths: {modality: (batch,) valid steps}, the same
        as `<modality>_lengths` feeds; a modality whose lengths are left out is whole (full length).
        state.* inputs left out (streaming graphs) mean zero state: the start of a stream. Host
        arrays of another float or integer type are cast when no value changes (InputCastWarning)."""
        if not isinstance(feeds, Mapping):
            raise UserError(f"{self.name}: inputs must be a dict name -> array, got {type(feeds).__name__}")
        feeds = fill_defaults(self.inputs, merge_lengths(feeds, lengths))
        feeds, casts = cast_inputs(self.name, self.inputs, feeds)
        infos = self.check(feeds)
        warn_casts(self.name, casts)
        return self._run(feeds, infos, **kw)

    def _run(self, feeds, infos, **kw):   # pragma: no cover - abstract
        raise NotImplementedError

    def synchronize(self):
        """Wait for queued device work (backends that return before the device finishes)."""

    def describe(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "path": str(self.path), "precision": self.precision,
             "inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}
        r = self.input_ranges()
        if r:
            d["profile"] = {k: {"min": [a for a, _, _ in v], "opt": [b for _, b, _ in v],
                                "max": [c for _, _, c in v]} for k, v in r.items()}
        return d

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


def model_kind(path) -> str:
    """'tensorrt', 'onnx' or 'torch' from a file name; UserError otherwise."""
    p = Path(path)
    suf = p.suffix.lower()
    if suf in ENGINE_SUFFIXES:
        return "tensorrt"
    if suf in ONNX_SUFFIXES:
        return "onnx"
    if suf in CHECKPOINT_SUFFIXES:
        return "torch"
    raise UserError(f"{p}: cannot tell the model kind from {suf or 'no suffix'!r}: expected a TensorRT "
                    f"engine ({', '.join(ENGINE_SUFFIXES)}), an ONNX file (.onnx) or a checkpoint "
                    f"({', '.join(CHECKPOINT_SUFFIXES)})")
