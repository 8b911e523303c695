"""ONNX Runtime backend: the portable ONNX file (model.portable.onnx) on the CPU or CUDA provider.

Host numpy inputs go through session.run. CUDA arrays (__cuda_array_interface__) on the CUDA
provider are bound by pointer through IOBinding, without a copy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .backend import Backend
from .specs import TensorSpec, manifest_for, np_dtype

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400] + ("..." if len(text) > 400 else "")


class OrtBackend(Backend):
    kind = "onnxruntime"

    def __init__(self, path, device=None, providers=None, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("ONNX files run on ONNX Runtime: pip install onnxruntime "
                            "(or onnxruntime-gpu)") from None
        self._ort = ort
        self.path = Path(path)
        self.manifest = manifest_for(self.path)
        available = ort.get_available_providers()
        self.device_id = 0
        if providers is None:
            dev = None if device is None else str(device)
            if dev is None:
                providers = (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) \
                    + ["CPUExecutionProvider"]
            elif dev == "cpu":
                providers = ["CPUExecutionProvider"]
            elif dev == "cuda" or dev.startswith("cuda:"):
                if "CUDAExecutionProvider" not in available:
                    raise UserError(f"device {dev}: this onnxruntime has no CUDAExecutionProvider "
                                    f"(available: {', '.join(available)}); install onnxruntime-gpu")
                self.device_id = int(dev[5:]) if dev.startswith("cuda:") and dev[5:].isdigit() else 0
                providers = [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
            else:
                raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3          # errors only: ORT's warnings are not the user's business
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as e:
            msg = _one_line(e)
            if "CoupledScan" in msg or "cm_deploy" in msg:
                hint = ""
                if self.manifest and self.manifest.get("files", {}).get("portable"):
                    hint = f"; use {self.path.parent / self.manifest['files']['portable']} instead"
                raise UserError(f"{self.path}: this ONNX file holds CoupledScan plugin nodes for TensorRT "
                                f"and does not run in ONNX Runtime (build an engine with `cm-deploy build`{hint})"
                                ) from None
            raise UserError(f"{self.path}: ONNX Runtime cannot load it: {msg}") from None
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.inputs = [self._spec(a, "inputs") for a in self.session.get_inputs()]
        self.outputs = [self._spec(a, "outputs") for a in self.session.get_outputs()]
        m = self.manifest or {}
        self.config = m.get("config")
        floats = [s.dtype for s in self.inputs if s.dtype in ("float32", "float16", "bfloat16")]
        self.precision = m.get("dtype") or (floats[0] if floats else "float32")
        ep = "CUDA" if self.on_cuda else "CPU"
        self.name = f"onnxruntime[{ep}]:{self.path.name}"

    def _spec(self, arg, which) -> TensorSpec:
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise UserError(f"{self.path}: {which[:-1]} {arg.name!r} has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) else (d if isinstance(d, str) and d else None) for d in arg.shape)
        # the manifest's symbols ("batch", "L_text") win over whatever names the exporter left
        for e in (self.manifest or {}).get(which, []):
            if e.get("name") == arg.name and len(e.get("shape", [])) == len(shape):
                shape = tuple(s if isinstance(s, int) else m for s, m in zip(shape, e["shape"]))
        return TensorSpec(arg.name, shape, dtype)

    def _run(self, feeds, infos, device_outputs=False):
        on_device = [n for n, i in infos.items() if i.on_device]
        if on_device or device_outputs:
            if not self.on_cuda:
                what = f"CUDA input {on_device[0]!r}" if on_device else "device_outputs=True"
                raise UserError(f"{self.name}: {what} needs the CUDA provider (device='cuda'); the CPU "
                                "session takes host arrays")
            return self._run_bound(feeds, infos, device_outputs)
        host = {}
        for spec in self.inputs:
            arr = feeds[spec.name]
            host[spec.name] = np.ascontiguousarray(arr) if isinstance(arr, np.ndarray) else np.asarray(arr)
        try:
            outs = self.session.run(None, host)
        except Exception as e:
            raise RuntimeError(f"{self.name}: inference failed: {_one_line(e)}") from None
        return {s.name: o for s, o in zip(self.outputs, outs)}

    def _run_bound(self, feeds, infos, device_outputs):
        """IOBinding: CUDA arrays by pointer (zero copy), host arrays copied by ORT."""
        binding = self.session.io_binding()
        for spec in self.inputs:
            info = infos[spec.name]
            if info.on_device:
                if info.stream is not None:
                    # ORT runs on its own stream: let the producer's queued work finish first
                    from .cuda import cudart, check
                    check(cudart().cudaStreamSynchronize(info.stream), "cudaStreamSynchronize")
                binding.bind_input(spec.name, "cuda", self.device_id, np_dtype(spec.dtype), list(info.shape),
                                   info.ptr)
            else:
                binding.bind_cpu_input(spec.name, np.ascontiguousarray(feeds[spec.name]))
        for spec in self.outputs:
            if device_outputs:
                binding.bind_output(spec.name, "cuda", self.device_id)
            else:
                binding.bind_output(spec.name)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise RuntimeError(f"{self.name}: inference failed: {_one_line(e)}") from None
        if device_outputs:
            return dict(zip((s.name for s in self.outputs), binding.get_outputs()))   # OrtValues on device
        return dict(zip((s.name for s in self.outputs), binding.copy_outputs_to_cpu()))

    def close(self):
        self.session = None
