"""cm-deploy runtime: run a Coupled Mamba model from a TensorRT engine, an ONNX file or a checkpoint
behind one interface. Importable without torch (an edge app needs numpy, cuda-python and TensorRT
only); every heavy module (tensorrt, onnxruntime, torch, cuda-python) loads on first use.

    from cm_deploy.runtime import load, build_engine
    build_engine("export/model.onnx", precision="float16", batch=(1, 8, 32), length=(1, 128, 1024))
    with load("export/model.engine") as m:          # or model.portable.onnx, or ckpt.pt
        y = m.run({"text": x_text, "audio": x_audio, "vision": x_vision})["output"]
"""
from __future__ import annotations

import importlib

__all__ = ["load", "Backend", "TensorSpec", "ShapeChoice", "Engine", "EngineInfo", "OrtBackend", "TorchBackend",
           "build_engine", "find_plugin", "import_tensorrt", "tensorrt_available", "DeviceArray",
           "DeviceBuffer", "CudaStream", "CudaGraph", "run_parity", "time_backend", "model_kind",
           "Stream", "open_stream", "time_stream"]

_LAZY = {
    "load": ".loader", "Backend": ".backend", "model_kind": ".backend",
    "TensorSpec": ".specs", "ShapeChoice": ".specs",
    "Engine": ".engine", "EngineInfo": ".engine",
    "OrtBackend": ".ort_backend", "TorchBackend": ".torch_backend",
    "build_engine": ".builder",
    "find_plugin": ".trt", "import_tensorrt": ".trt", "tensorrt_available": ".trt",
    "DeviceArray": ".cuda", "DeviceBuffer": ".cuda", "CudaGraph": ".cuda",
    "run_parity": ".parity", "time_backend": ".profiling", "time_stream": ".profiling",
    "Stream": ".stream", "open_stream": ".stream",
}


def __getattr__(name):
    if name == "CudaStream":      # cuda.Stream (a CUDA stream), named apart from the streaming Stream
        return importlib.import_module(".cuda", __name__).Stream
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'cm_deploy.runtime' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
