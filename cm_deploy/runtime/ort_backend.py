"""ONNX Runtime backend: model.onnx (with the CoupledScan op library registered) or
model.portable.onnx (stock ONNX Runtime), on the CUDA provider when onnxruntime-gpu is present, else
on the CPU.

The op library (plugins/ort_coupled_scan, libcoupled_scan_ort.so) is found as native.py says
($CM_DEPLOY_ORT_OP_LIBRARY, the package's lib/, build/ folders) and registered whenever it is found;
a file with CoupledScan nodes and no library gets a one-line error saying how to get one.

Host numpy inputs go through session.run. CUDA arrays (__cuda_array_interface__) on the CUDA
provider are bound by pointer through IOBinding, without a copy. cuda_graph=True turns on the CUDA
provider's graph capture: inputs are then copied into fixed device buffers, as replay needs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..contract import BF16_RUNS_ON, DOMAIN, OP_TYPE, precision_of
from ..errors import UserError
from .backend import Backend
from .native import LIBRARIES, find_library
from .specs import ORT_TYPES, TensorSpec, manifest_for, np_dtype



_BF16 = 16    # onnx.TensorProto.BFLOAT16: ORT's Python bridge takes it where numpy has no bfloat16


def _elem(dtype: str):
    """Element type for ORT's binding calls: the numpy dtype, or ONNX's code for bfloat16."""
    return _BF16 if dtype == "bfloat16" else np_dtype(dtype)


def _to_numpy(value) -> np.ndarray:
    """An output OrtValue as a host array. bfloat16 (which OrtValue.numpy() refuses) is read by
    address, from host memory or with a device-to-host copy, as an ml_dtypes array."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    shape = tuple(value.shape())
    out = np.empty(shape, np_dtype("bfloat16"))
    if out.size:
        if value.device_name().lower() == "cpu":
            import ctypes
            ctypes.memmove(out.ctypes.data, value.data_ptr(), out.nbytes)
        else:
            from .cuda import copy_dtoh
            copy_dtoh(out, value.data_ptr())
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400] + ("..." if len(text) > 400 else "")


class OrtBackend(Backend):
    kind = "onnxruntime"

    def __init__(self, path, device=None, providers=None, threads: int | None = None, ort_ops=None,
                 cuda_graph: bool = False):
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
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            else:
                raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
            if providers[0] == "CUDAExecutionProvider":
                cuda_opts = {"device_id": self.device_id}
                if cuda_graph:
                    cuda_opts["enable_cuda_graph"] = "1"
                providers[0] = ("CUDAExecutionProvider", cuda_opts)
        if cuda_graph and not any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider"
                                  for p in providers):
            raise UserError("cuda_graph needs ONNX Runtime's CUDA provider (onnxruntime-gpu and a CUDA device)")
        self.cuda_graph = bool(cuda_graph)
        self._graph_buffers: dict = {}
        opts = ort.SessionOptions()
        opts.log_severity_level = 3          # errors only: ORT's warnings are not the user's business
        if threads:
            opts.intra_op_num_threads = int(threads)
        # A file made for TensorRT (CoupledScan nodes, no function body) needs the op library.
        needs_ops = not (self.manifest or {}).get("_role", "tensorrt").endswith("portable")
        self.ort_ops = find_library("ort", ort_ops, required=False)
        if self.ort_ops is not None:
            try:
                opts.register_custom_ops_library(str(self.ort_ops))
            except Exception as e:
                if needs_ops or ort_ops:
                    raise UserError(f"cannot register {LIBRARIES['ort'].what} {self.ort_ops}: {_one_line(e)}"
                                    ) from None
                self.ort_ops = None      # the portable file runs without it
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as e:
            msg = _one_line(e)
            if not any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider" for p in providers) \
                    and _is_bfloat16(self.path, self.manifest):
                raise UserError(f"{self.path}: ONNX Runtime's CPU provider cannot run it: {BF16_RUNS_ON}") from None
            if (OP_TYPE in msg or DOMAIN in msg) and self.ort_ops is None:
                hint = ""
                role = (self.manifest or {}).get("_role", "tensorrt")
                portable = (self.manifest or {}).get("files", {}).get(role.replace("tensorrt", "portable"))
                if portable:
                    hint = f", or run {self.path.parent / portable} (stock ONNX Runtime)"
                lib = LIBRARIES["ort"]
                raise UserError(f"{self.path}: this ONNX file holds CoupledScan nodes: ONNX Runtime runs it with "
                                f"the {lib.what} (build it with scripts/build_plugin.sh, then pass {lib.flag} or "
                                f"set {lib.env}{hint})") from None
            raise UserError(f"{self.path}: ONNX Runtime cannot load it: {msg}") from None
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.op_providers = op_library_providers(self.ort_ops) if self.ort_ops is not None else None
        if self.on_cuda and needs_ops and self.op_providers is not None \
                and "CUDAExecutionProvider" not in self.op_providers:
            # ORT would silently run every CoupledScan on the CPU, copying each layer's tensors
            # through the host: say so once
            print(f"warning: {self.ort_ops.name} has no CUDA kernel (built without CUDA): CoupledScan runs on "
                  "the CPU in this CUDA session; rebuild with nvcc for the GPU kernel", file=sys.stderr)
        self.inputs = [self._spec(a, "inputs") for a in self.session.get_inputs()]
        self.outputs = [self._spec(a, "outputs") for a in self.session.get_outputs()]
        m = self.manifest or {}
        self.config = m.get("config")
        self.precision = m.get("dtype") or precision_of(s.dtype for s in self.inputs)
        self._bf16 = any(s.dtype == "bfloat16" for s in self.inputs + self.outputs)
        ep = "CUDA" if self.on_cuda else "CPU"
        self.name = f"onnxruntime[{ep}{'+graph' if self.cuda_graph else ''}]:{self.path.name}"

    def _spec(self, arg, which) -> TensorSpec:
        dtype = ORT_TYPES.get(arg.type)
        if dtype is None:
            raise UserError(f"{self.path}: {which[:-1]} {arg.name!r} has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) else (d if isinstance(d, str) and d else None) for d in arg.shape)
        # the manifest's symbols ("batch", "L_text") win over whatever names the exporter left
        for e in (self.manifest or {}).get(which, []):
            if e.get("name") == arg.name and len(e.get("shape", [])) == len(shape):
                shape = tuple(s if isinstance(s, int) else m for s, m in zip(shape, e["shape"]))
        return TensorSpec(arg.name, shape, dtype)

    def _run(self, feeds, infos, device_outputs=False):
        """device_outputs=True: the outputs as OrtValues where the session leaves them (on the GPU
        with the CUDA provider), which feed straight back in (Stream keeps its state that way)."""
        on_device = [n for n, i in infos.items() if i.on_device]
        if self.cuda_graph:
            return self._run_graph(feeds, infos, device_outputs)
        if on_device and not self.on_cuda:
            raise UserError(f"{self.name}: CUDA input {on_device[0]!r} needs the CUDA provider (device='cuda'); "
                            "the CPU session takes host arrays")
        if on_device or device_outputs or any(i.ortvalue for i in infos.values()) or self._bf16:
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
            if info.ortvalue:
                binding.bind_ortvalue_input(spec.name, feeds[spec.name])
            elif info.on_device:
                if info.stream is not None:
                    # ORT runs on its own stream: let the producer's queued work finish first
                    from .cuda import cudart, check
                    check(cudart().cudaStreamSynchronize(info.stream), "cudaStreamSynchronize")
                binding.bind_input(spec.name, "cuda", self.device_id, _elem(spec.dtype), list(info.shape),
                                   info.ptr)
            elif spec.dtype == "bfloat16":      # numpy has no bfloat16 for ORT: pass the bits typed by ONNX code
                bits = np.ascontiguousarray(feeds[spec.name]).view(np.uint16)
                binding.bind_ortvalue_input(spec.name, self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _BF16))
            else:
                binding.bind_cpu_input(spec.name, np.ascontiguousarray(feeds[spec.name]))
        for spec in self.outputs:
            if device_outputs and self.on_cuda:
                binding.bind_output(spec.name, "cuda", self.device_id)
            else:
                binding.bind_output(spec.name)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise RuntimeError(f"{self.name}: inference failed: {_one_line(e)}") from None
        outs = binding.get_outputs()
        if device_outputs:
            return dict(zip((s.name for s in self.outputs), outs))   # OrtValues where the session left them
        return {s.name: _to_numpy(v) for s, v in zip(self.outputs, outs)}

    def _run_graph(self, feeds, infos, device_outputs):
        """CUDA-graph replay reads the addresses it captured: every input and output lives in one
        device OrtValue per shape, kept across runs; new data is copied into it."""
        ort = self._ort
        shapes = tuple((s.name, tuple(infos[s.name].shape)) for s in self.inputs)
        bufs = self._graph_buffers.get(shapes)
        if bufs is None:
            if self._graph_buffers:
                raise UserError(f"{self.name}: a CUDA-graph session runs one set of input shapes; open another "
                                "for new shapes")
            bufs = {s.name: ort.OrtValue.ortvalue_from_shape_and_type(list(infos[s.name].shape), _elem(s.dtype),
                                                                       "cuda", self.device_id)
                    for s in self.inputs}
            binding = self.session.io_binding()
            for name, v in bufs.items():
                binding.bind_ortvalue_input(name, v)
            for spec in self.outputs:
                binding.bind_output(spec.name, "cuda", self.device_id)
            bufs = {"values": bufs, "binding": binding}
            self._graph_buffers[shapes] = bufs
        for spec in self.inputs:
            info, dst = infos[spec.name], bufs["values"][spec.name]
            if info.on_device:
                from .cuda import cudart, check
                if info.stream is not None:
                    check(cudart().cudaStreamSynchronize(info.stream), "cudaStreamSynchronize")
                nbytes = int(np.prod(info.shape)) * np.dtype(np_dtype(spec.dtype)).itemsize
                check(cudart().cudaMemcpy(dst.data_ptr(), info.ptr, nbytes,
                                          cudart().cudaMemcpyKind.cudaMemcpyDeviceToDevice), "cudaMemcpy")
            else:
                from .cuda import copy_htod
                copy_htod(dst.data_ptr(), np.ascontiguousarray(feeds[spec.name], dtype=np_dtype(spec.dtype)))
        try:
            self.session.run_with_iobinding(bufs["binding"])
        except Exception as e:
            raise RuntimeError(f"{self.name}: inference failed: {_one_line(e)}") from None
        outs = bufs["binding"].get_outputs()
        if device_outputs:
            return dict(zip((s.name for s in self.outputs), outs))
        return {s.name: _to_numpy(v) for s, v in zip(self.outputs, outs)}

    def close(self):
        self._graph_buffers.clear()
        self.session = None


def _is_bfloat16(path, manifest) -> bool:
    """Whether an ONNX file is a bfloat16 graph: its manifest says so, or (without one) its first
    float input is bfloat16 (read with the onnx package when it is installed)."""
    if manifest and manifest.get("dtype"):
        return manifest["dtype"] == "bfloat16"
    try:
        from .describe import describe_onnx
        return describe_onnx(path).get("precision") == "bfloat16"
    except (ImportError, UserError):
        return False


def op_library_providers(path) -> list[str] | None:
    """The execution providers the CoupledScan op library has kernels for (its CmDeployOrtProviders
    entry), or None for a library too old to say."""
    import ctypes
    try:
        fn = ctypes.CDLL(str(path)).CmDeployOrtProviders
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode().split(",")
