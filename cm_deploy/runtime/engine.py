"""Engine: a TensorRT engine (+ its CoupledScan plugin library) behind the Backend interface.

    eng = Engine("model.engine", plugin=None, device="cuda:0", cuda_graph=True)
    eng.run({"text": x, ...})                       # host numpy in, host numpy out
    eng.run(feeds_on_gpu, device_outputs=True)      # CUDA arrays in (no copy), DeviceArray views out
    eng.run(feeds, out={"output": torch_tensor})    # write straight into caller-owned device memory

Inputs are numpy arrays (copied once to runtime-owned device buffers) or any object exposing
__cuda_array_interface__ (torch, CuPy, Numba, pycuda GPUArray, DeviceArray): its pointer is bound
as is, after the engine's stream waits (on the device, not the host) for the producer's stream: the
CAI v3 "stream", or the legacy default stream when none is named (torch). Work queued on a
per-thread default stream or a private stream without a v3 "stream" entry must be synchronised by
the caller. Names, ranks, dtypes and shapes (against the optimisation profile) are checked on the
host first.

cuda_graph=True captures one CUDA graph per (shapes, input/output addresses) for batches up to
graph_max_batch and replays it: host inputs land in grow-only buffers, so their addresses stay put
and a repeated shape replays the same graph; device inputs at new addresses are a new capture.

Device outputs (device_outputs=True) are views of engine-owned buffers, valid until the next run;
pass out= to keep results in your own memory.
"""
from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

import numpy as np

from ..contract import precision_of
from ..errors import UserError
from . import cuda as cu
from .backend import Backend
from .specs import TensorSpec, cai_info, np_dtype
from .trt import (find_plugin, import_tensorrt, load_plugin, make_logger, read_sidecar, trt_dtype_name,
                  trt_version)


LEGACY_STREAM = 1    # cudaStreamLegacy, as __cuda_array_interface__ v3 numbers it


def _sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Engine(Backend):
    kind = "tensorrt"

    def __init__(self, path, plugin=None, device=None, trt_module=None, cuda_graph=False,
                 graph_max_batch: int = 8, verbose: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"engine not found: {self.path}")
        blob = self.path.read_bytes()
        sidecar = read_sidecar(self.path)
        if sidecar is not None and sidecar.get("engine", {}).get("sha256") not in (None, _sha256_bytes(blob)):
            print(f"warning: {self.path.name}.json describes another engine (sha256 differs); ignoring it",
                  file=sys.stderr)
            sidecar = None
        self.sidecar = sidecar or {}
        why = cu.gpu_missing()
        if why:     # before TensorRT and cuda-python: without a GPU nothing else matters
            raise UserError(f"{self.path}: a TensorRT engine runs on an NVIDIA GPU, and there is none here ({why}); "
                            f"`cm-deploy inspect {self.path}` describes it, and the ONNX file it was built "
                            "from runs on ONNX Runtime")
        recorded_trt = self.sidecar.get("tensorrt") or {}
        self.trt = trt = import_tensorrt(trt_module or recorded_trt.get("module"))
        if recorded_trt.get("module") and recorded_trt["module"] != trt.__name__:
            raise UserError(f"{self.path} was built with {recorded_trt['module']} {recorded_trt.get('version')}, "
                            f"not {trt.__name__}: load it with --trt-module {recorded_trt['module']} or rebuild")
        if recorded_trt.get("version") and recorded_trt["version"] != trt_version(trt):
            raise UserError(f"{self.path} was built with TensorRT {recorded_trt['version']} but this is "
                            f"{trt_version(trt)}: rebuild it with `cm-deploy build` (engines are not portable "
                            "across TensorRT versions)")

        # device: checked against the GPU the engine was built for before TensorRT sees the plan
        self.device_index = cu.parse_device(device) if device is not None else None
        try:
            if self.device_index is None:      # the caller's current device (e.g. torch.cuda.set_device)
                self.device_index = cu.current_device()
            cu.set_device(self.device_index)
            self.device = cu.device_info(self.device_index)
        except cu.CudaError as e:
            raise UserError(f"cannot use CUDA device {self.device_index} for {self.path.name}: {e}") from None
        built_on = self.sidecar.get("device") or {}
        cc = built_on.get("compute_capability")
        if cc and cc != self.device["compute_capability"]:
            raise UserError(f"{self.path} was built for compute capability {cc} ({built_on.get('name')}) but "
                            f"this GPU ({self.device['name']}) is {self.device['compute_capability']}: rebuild "
                            "it on this GPU with `cm-deploy build`")

        self.logger = make_logger(trt, verbose)
        recorded_plugin = self.sidecar.get("plugin") or {}
        needs_plugin = bool(recorded_plugin) if self.sidecar else False
        plugin_path = find_plugin(plugin, recorded=recorded_plugin.get("path"), required=needs_plugin)
        self.plugin = None
        if plugin_path is not None:
            self.plugin = load_plugin(trt, plugin_path, self.logger)
            if recorded_plugin.get("sha256") and recorded_plugin["sha256"] != self.plugin["sha256"]:
                print(f"warning: plugin {plugin_path} differs from the one {self.path.name} was built with "
                      f"({recorded_plugin.get('path')})", file=sys.stderr)

        self.runtime = trt.Runtime(self.logger)
        self.logger.clear()
        try:
            self.engine = self.runtime.deserialize_cuda_engine(blob)
        except Exception as e:
            self.engine, why = None, " ".join(str(e).split())
        else:
            why = None
        if self.engine is None:
            why = self.logger.last_error(why or "no message")
            hint = "" if plugin_path else "; if it uses the CoupledScan plugin, pass --plugin PATH"
            raise UserError(f"cannot load engine {self.path}: {why} (built by another TensorRT version or for "
                            f"another GPU? rebuild with `cm-deploy build`{hint})")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise UserError(f"cannot create an execution context for {self.path}: {self.logger.last_error()}")

        sym = {e["name"]: e.get("shape") for e in self.sidecar.get("inputs", []) + self.sidecar.get("outputs", [])}
        self.inputs, self.outputs, self._ranges = [], [], {}
        INPUT = trt.TensorIOMode.INPUT
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            s = sym.get(name)
            if s and len(s) == len(shape):
                shape = tuple(d if d >= 0 else (s[a] if isinstance(s[a], str) else None) for a, d in enumerate(shape))
            else:
                shape = tuple(d if d >= 0 else None for d in shape)
            spec = TensorSpec(name, shape, trt_dtype_name(self.engine.get_tensor_dtype(name)))
            if self.engine.get_tensor_mode(name) == INPUT:
                self.inputs.append(spec)
                mn, op, mx = self.engine.get_tensor_profile_shape(name, 0)
                self._ranges[name] = [(int(a), int(b), int(c)) for a, b, c in zip(mn, op, mx)]
            else:
                self.outputs.append(spec)
        self.precision = self.sidecar.get("precision") or precision_of(s.dtype for s in self.inputs)
        self.config = (self.sidecar.get("manifest") or {}).get("config")
        self.name = f"tensorrt:{self.path.name}"

        self.stream = cu.Stream()
        self._in_bufs = {s.name: cu.DeviceBuffer() for s in self.inputs}
        self._out_bufs = {s.name: cu.DeviceBuffer() for s in self.outputs}
        self.cuda_graph = bool(cuda_graph)
        self.graph_max_batch = int(graph_max_batch)
        self.graphs = cu.GraphCache()
        self._warmed: set = set()
        self._lock = threading.Lock()
        self.last_bindings: dict[str, int] = {}

    def input_ranges(self):
        return self._ranges

    def _enqueue(self):
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError(f"{self.name}: enqueue failed: {self.logger.last_error()}")

    def _run(self, feeds, infos, device_outputs=False, out=None):
        with self._lock:
            return self._run_locked(feeds, infos, device_outputs, out)

    def _run_locked(self, feeds, infos, device_outputs, out):
        ctx, keep = self.context, []
        bindings = {}
        for spec in self.inputs:
            info = infos[spec.name]
            if info.on_device:
                # CAI v3 names the producer's stream; torch (v2) names none: assume the legacy
                # default stream, where it queues work unless told otherwise
                self.stream.wait_for(info.stream if info.stream is not None else LEGACY_STREAM)
                ptr = info.ptr
            else:
                arr = np.ascontiguousarray(feeds[spec.name], dtype=np_dtype(spec.dtype))
                keep.append(arr)
                ptr = self._in_bufs[spec.name].ensure(arr.nbytes)
                cu.copy_htod(ptr, arr, self.stream)
            if not ctx.set_input_shape(spec.name, tuple(info.shape)):
                raise UserError(f"{self.name}: TensorRT rejected shape {tuple(info.shape)} for {spec.name!r}: "
                                f"{self.logger.last_error()}")
            ctx.set_tensor_address(spec.name, int(ptr))
            bindings[spec.name] = int(ptr)
        out = out or {}
        unknown = [k for k in out if k not in {s.name for s in self.outputs}]
        if unknown:
            raise UserError(f"{self.name}: out= names unknown output {unknown[0]!r}")
        results = {}
        for spec in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.name}: output {spec.name!r} shape unresolved {shape}")
            dt = np_dtype(spec.dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if spec.name in out:
                info = cai_info(out[spec.name])
                if tuple(info.shape) != shape or info.dtype != spec.dtype or not info.contiguous:
                    raise UserError(f"{self.name}: out[{spec.name!r}] must be a contiguous CUDA array of shape "
                                    f"{shape} and dtype {spec.dtype}, got {tuple(info.shape)} {info.dtype}")
                self.stream.wait_for(info.stream if info.stream is not None else LEGACY_STREAM)
                ptr = info.ptr
                results[spec.name] = out[spec.name]
            else:
                ptr = self._out_bufs[spec.name].ensure(nbytes)
                results[spec.name] = cu.DeviceArray(ptr, shape, dt, owner=self._out_bufs[spec.name])
            ctx.set_tensor_address(spec.name, int(ptr))
            bindings[spec.name] = int(ptr)
        self.last_bindings = bindings

        batch = infos[self.inputs[0].name].shape[0] if self.inputs and infos[self.inputs[0].name].shape else 1
        if self.cuda_graph and batch <= self.graph_max_batch:
            key = (tuple(tuple(infos[s.name].shape) for s in self.inputs), tuple(sorted(bindings.items())))
            if key not in self._warmed:
                # TensorRT needs one plain enqueue after a shape change before a capture
                self._enqueue()
                self._warmed.add(key)
            self.graphs.run(key, self.stream, self._enqueue)
        else:
            self._enqueue()

        if device_outputs:
            self.stream.synchronize()
            return results
        host = {}
        for spec in self.outputs:
            r = results[spec.name]
            if isinstance(r, cu.DeviceArray):
                arr = np.empty(r.shape, r.dtype)
                cu.copy_dtoh(arr, r.ptr, self.stream)
                host[spec.name] = arr
            else:
                host[spec.name] = r
        self.stream.synchronize()
        return host

    def synchronize(self):
        self.stream.synchronize()

    def close(self):
        try:
            self.graphs.clear()
            for b in list(self._in_bufs.values()) + list(self._out_bufs.values()):
                b.free()
            self.stream.close()
        except Exception:
            pass
        self.context = self.engine = self.runtime = None


class EngineInfo(Backend):
    """What an engine's JSON sidecar says about it (inputs, outputs, profile, plugin), without
    TensorRT: enough to drive trtexec. `run` is not available."""

    kind = "tensorrt"

    def __init__(self, path):
        self.path = Path(path)
        self.sidecar = read_sidecar(self.path)
        if self.sidecar is None:
            raise UserError(f"{self.path}: no description ({self.path.name}.json) beside it; "
                            "profiling it with trtexec needs the tensorrt module or the sidecar")
        try:
            self.inputs = [TensorSpec.from_dict(e) for e in self.sidecar["inputs"]]
            self.outputs = [TensorSpec.from_dict(e) for e in self.sidecar["outputs"]]
            prof = (self.sidecar.get("profiles") or [{}])[0]
            self._ranges = {n: [tuple(v) for v in zip(p["min"], p["opt"], p["max"])] for n, p in prof.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.path}.json: malformed engine description ({e})") from None
        self.precision = self.sidecar.get("precision", "float32")
        self.plugin = self.sidecar.get("plugin")
        self.config = (self.sidecar.get("manifest") or {}).get("config")
        self.name = f"tensorrt:{self.path.name}"

    def input_ranges(self):
        return self._ranges

    def _run(self, feeds, infos, **kw):
        raise UserError(f"{self.name}: running an engine needs TensorRT")
