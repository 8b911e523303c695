"""One interface over TensorRT engines, ONNX Runtime sessions and PyTorch checkpoints, so parity and
profiling compare backends with one code path.

    b = cm_deploy.runtime.load("model.engine" | "model.portable.onnx" | "ckpt.pt", plugin=None, device=None)
    b.inputs, b.outputs            # [TensorSpec]
    b.run({"text": x, ...})        # -> {"output": np.ndarray}
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import UserError
from .specs import TensorSpec, check_feeds, check_lengths, fill_lengths

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

    def input_ranges(self) -> dict | None:
        """Input name -> [(min, opt, max) per axis] where the backend limits shapes (TensorRT
        profiles); None when any shape is accepted."""
        return None

    def check(self, feeds: Mapping):
        ranges = self.input_ranges()
        lohi = {k: [(lo, hi) for lo, _, hi in v] for k, v in ranges.items()} if ranges else None
        infos = check_feeds(self.name, self.inputs, feeds, lohi)
        check_lengths(self.name, self.inputs, feeds, infos)
        return infos

    def run(self, feeds: Mapping, **kw) -> dict[str, np.ndarray]:
        """Outputs for `feeds` (name -> array); `<modality>_lengths` inputs left out mean full length."""
        feeds = fill_lengths(self.inputs, feeds)
        infos = self.check(feeds)
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


BACKENDS = {"tensorrt": "trt", "onnx": "ort", "torch": "torch"}     # file kind -> default backend


def load(path, plugin=None, device=None, *, backend=None, trt_module=None, cuda_graph=False, dtype=None,
         scan_impl=None, providers=None, ort_ops=None, verbose=False) -> Backend:
    """Open a model by file type: .engine/.plan/.trt -> TensorRT (Engine; plugin, trt_module,
    cuda_graph), .onnx -> ONNX Runtime (providers, ort_ops: the CoupledScan op library, cuda_graph),
    .pt/.pth/.ckpt -> PyTorch (dtype, scan_impl, cuda_graph). `backend` ("ort", "trt", "torch")
    overrides the default; "trt" on an .onnx file builds an engine first (in a temporary folder).
    `device`: None (the backend's default), "cpu", "cuda" or "cuda:N"."""
    p = Path(path)
    kind = model_kind(p)
    if not p.exists():
        raise UserError(f"model not found: {p}")
    if p.is_dir():
        raise UserError(f"{p} is a directory; give a model file")
    backend = backend or BACKENDS[kind]
    if backend not in BACKENDS.values():
        raise UserError(f"unknown backend {backend!r}: use ort, trt or torch")
    if backend != BACKENDS[kind] and not (kind == "onnx" and backend == "trt"):
        raise UserError(f"{p}: a {kind} file cannot run on backend {backend!r} "
                        f"(it runs on {BACKENDS[kind]!r}{' or trt' if kind == 'onnx' else ''})")
    if backend == "trt":
        from .engine import Engine
        if kind == "onnx":
            return _engine_from_onnx(p, plugin=plugin, device=device, trt_module=trt_module,
                                     cuda_graph=cuda_graph, verbose=verbose)
        return Engine(p, plugin=plugin, device=device, trt_module=trt_module, cuda_graph=cuda_graph,
                      verbose=verbose)
    if backend == "ort":
        from .ort_backend import OrtBackend
        return OrtBackend(p, device=device, providers=providers, ort_ops=ort_ops, cuda_graph=cuda_graph)
    from .torch_backend import TorchBackend
    return TorchBackend(p, device=device, dtype=dtype or "float32", scan_impl=scan_impl or "auto",
                        cuda_graph=cuda_graph)


def _engine_from_onnx(onnx_path, **kw):
    """An engine built from `onnx_path` into a temporary folder (removed when the engine closes)."""
    import shutil
    import tempfile
    from .builder import build_engine
    from .engine import Engine
    tmp = Path(tempfile.mkdtemp(prefix="cm-deploy-engine-"))
    try:
        out = tmp / (onnx_path.stem + ".engine")
        build_engine(onnx_path, out, plugin=kw.get("plugin"), trt_module=kw.get("trt_module"),
                     progress=False, verbose=kw.get("verbose", False), device=kw.get("device"))
        eng = Engine(out, **kw)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    close = eng.close

    def close_and_clean():
        try:
            close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    eng.close = close_and_clean
    return eng
