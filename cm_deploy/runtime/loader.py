"""Opening a model file as a backend: the file type picks TensorRT, ONNX Runtime or PyTorch, and
`backend=` overrides it. The backends import backend.Backend; only this module imports them.

    b = cm_deploy.runtime.load("model.engine" | "model.onnx" | "model.portable.onnx" | "ckpt.pt")
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from .backend import Backend, model_kind

BACKENDS = {"tensorrt": "trt", "onnx": "ort", "torch": "torch"}     # file kind -> default backend


def load(path, plugin=None, device=None, *, backend=None, trt_module=None, cuda_graph=False, dtype=None,
         scan_impl=None, providers=None, ort_ops=None, verbose=False, chunk=None, tf32=False) -> Backend:
    """Open a model by file type: .engine/.plan/.trt -> TensorRT (Engine; plugin, trt_module,
    cuda_graph), .onnx -> ONNX Runtime (providers, cuda_graph; ort_ops: the CoupledScan op library,
    registered where the graph needs it, or always when given as a path or True; tf32: allow TF32 in
    float32 GEMMs on the CUDA provider, default exact float32),
    .pt/.pth/.ckpt -> PyTorch (dtype, scan_impl, cuda_graph, chunk). `backend` ("ort", "trt", "torch")
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
    if chunk is not None and backend != "torch":
        raise UserError(f"chunk applies to checkpoints (the torch backend), not to {p.name} on {backend}")
    if backend == "trt":
        from .engine import Engine
        if kind == "onnx":
            return _engine_from_onnx(p, plugin=plugin, device=device, trt_module=trt_module,
                                     cuda_graph=cuda_graph, verbose=verbose)
        return Engine(p, plugin=plugin, device=device, trt_module=trt_module, cuda_graph=cuda_graph,
                      verbose=verbose)
    if backend == "ort":
        from .ort_backend import OrtBackend
        return OrtBackend(p, device=device, providers=providers, ort_ops=ort_ops, cuda_graph=cuda_graph, tf32=tf32)
    from .torch_backend import TorchBackend
    return TorchBackend(p, device=device, dtype=dtype or "float32", scan_impl=scan_impl or "auto",
                        cuda_graph=cuda_graph, chunk=chunk)


def _engine_from_onnx(onnx_path, **kw):
    """An engine built from `onnx_path` into a temporary folder (removed when the engine closes)."""
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
