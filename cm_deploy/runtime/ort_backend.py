"""ONNX Runtime backend: model.onnx (with the CoupledScan op library registered) or
model.portable.onnx (stock ONNX Runtime), on the CUDA provider when onnxruntime-gpu is present, else
on the CPU.

The op library (plugins/ort_coupled_scan, libcoupled_scan_ort.so) is registered only where the
graph needs it (CoupledScan nodes without a model-local function: model.onnx) or the caller asks
(ort_ops=PATH or True, `--ort-ops`); it is found as native.py says ($CM_DEPLOY_ORT_OP_LIBRARY, the
package's lib/, build/ folders). So model.portable.onnx runs its own function, the ONNX Scan that
stock runtimes execute, and `name` says which ran: "onnxruntime[CPU,function]:model.portable.onnx",
"onnxruntime[CUDA,custom op]:model.onnx". A file that needs the library when none is found gets a
one-line error saying how to get one.

Host numpy inputs go through session.run. CUDA arrays (__cuda_array_interface__) on the CUDA
provider are bound by pointer through IOBinding, without a copy; OrtValues are bound as they are,
and `out=` binds outputs to caller-owned OrtValues (Stream keeps its state that way, on the device).

float32 on the CUDA provider is exact by default: ONNX Runtime's CUDA provider runs float32 MatMul /
Gemm (and cuDNN convolutions) in TF32 unless told otherwise (provider option use_tf32, default 1),
which rounds their inputs to 10 mantissa bits: ~1e-4 relative error at the model's output, and
results that depend on the batch (cuBLAS picks other kernels for other shapes). tf32=True allows it,
as `cm-deploy build --tf32` does for TensorRT engines.

cuda_graph=True turns on the CUDA provider's graph capture (enable_cuda_graph; the graph must place
no copy between host and device: runtime/placement.py). ONNX Runtime captures one CUDA graph per
"gpu_graph_id" run option and replays it at the addresses it captured, so each input shape (and each
set of bound OrtValues, see Stream) gets its own id with device buffers kept for it: host and CUDA
inputs are copied into them, OrtValue inputs and out= values are bound as they are. Up to
graph_max_shapes captures are kept (ONNX Runtime cannot release one); later shapes run uncaptured.
"""
from __future__ import annotations

import ctypes
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


_preloaded = False


def preload_cuda_libraries(ort) -> None:
    """Load the CUDA and cuDNN libraries that onnxruntime-gpu's CUDA provider links against, from
    pip's nvidia-* packages or torch (onnxruntime.preload_dlls, ORT >= 1.21), once per process,
    before the first CUDA session. A failure (or an older ORT) leaves ORT to find them itself."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    import contextlib
    import io
    try:
        with contextlib.redirect_stdout(io.StringIO()):      # it prints what it could not find
            ort.preload_dlls()
    except Exception:
        pass


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400] + ("..." if len(text) > 400 else "")


class OrtBackend(Backend):
    kind = "onnxruntime"

    def __init__(self, path, device=None, providers=None, threads: int | None = None, ort_ops=None,
                 cuda_graph: bool = False, tf32: bool = False, graph_max_shapes: int = 8):
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
                cuda_opts = {"device_id": self.device_id, "use_tf32": "1" if tf32 else "0"}
                if cuda_graph:
                    cuda_opts["enable_cuda_graph"] = "1"
                providers[0] = ("CUDAExecutionProvider", cuda_opts)
        wants_cuda = any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider" for p in providers)
        if cuda_graph and not wants_cuda:
            raise UserError("cuda_graph needs ONNX Runtime's CUDA provider (onnxruntime-gpu and a CUDA device)")
        if wants_cuda:
            preload_cuda_libraries(ort)
        self.cuda_graph = bool(cuda_graph)
        self.tf32 = bool(tf32)
        self.graph_max_shapes = int(graph_max_shapes)
        self._graphs: dict = {}        # key -> _Capture (cuda_graph)
        self._uncaptured = None        # RunOptions with gpu_graph_id -1
        opts = ort.SessionOptions()
        opts.log_severity_level = 3          # errors only: ORT's warnings are not the user's business
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.on_cuda_provider = any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider"
                                    for p in providers)
        self.session, self.ort_ops = self._open_session(opts, providers, ort_ops)
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.op_providers = op_library_providers(self.ort_ops) if self.ort_ops is not None else None
        if self.on_cuda and self.op_providers is not None \
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
        self.device_type = "cuda" if self.on_cuda else "cpu"      # where device_values() allocates
        tf32_tag = "+tf32" if self.on_cuda and self.tf32 and self.precision == "float32" else ""
        # what runs CoupledScan: the op library's kernel, or ONNX Runtime's own ops (the file's function)
        self.coupled_scan = "custom op" if self.ort_ops is not None else "function"
        self.name = (f"onnxruntime[{ep}{tf32_tag}{'+graph' if self.cuda_graph else ''},{self.coupled_scan}]:"
                     f"{self.path.name}")

    def _open_session(self, opts, providers, ort_ops):
        """(session, the op library registered or None). The library is registered where the caller
        asks (ort_ops: a path, or True for the one native.py finds) or where the graph needs it:
        CoupledScan nodes that ONNX Runtime cannot resolve on its own, i.e. no model-local function
        (model.onnx). A portable file thus runs its own function (the ONNX Scan), since a registered
        custom op would take the function's place. ort_ops=False never registers it."""
        ort = self._ort
        if ort_ops is None or ort_ops is False:
            try:        # ONNX Runtime itself says whether the graph resolves without the library
                return ort.InferenceSession(str(self.path), sess_options=opts, providers=providers), None
            except Exception as e:
                msg = _one_line(e)
                if OP_TYPE not in msg and DOMAIN not in msg:
                    raise self._load_error(msg) from None
            lib = find_library("ort", required=False) if ort_ops is None else None
        else:
            lib = find_library("ort", None if ort_ops is True else ort_ops)
        if lib is None:
            hint = ""
            role = (self.manifest or {}).get("_role", "tensorrt")
            portable = (self.manifest or {}).get("files", {}).get(role.replace("tensorrt", "portable"))
            if portable:
                hint = f", or run {self.path.parent / portable} (stock ONNX Runtime)"
            what = LIBRARIES["ort"]
            raise UserError(f"{self.path}: this ONNX file holds CoupledScan nodes: ONNX Runtime runs it with "
                            f"the {what.what} (build it with scripts/build_plugin.sh, then pass {what.flag} or "
                            f"set {what.env}{hint})")
        try:
            opts.register_custom_ops_library(str(lib))
        except Exception as e:
            raise UserError(f"cannot register {LIBRARIES['ort'].what} {lib}: {_one_line(e)}") from None
        try:
            return ort.InferenceSession(str(self.path), sess_options=opts, providers=providers), lib
        except Exception as e:
            raise self._load_error(_one_line(e)) from None

    def _load_error(self, msg):
        if not self.on_cuda_provider and _is_bfloat16(self.path, self.manifest):
            return UserError(f"{self.path}: ONNX Runtime's CPU provider cannot run it: {BF16_RUNS_ON}")
        if self.cuda_graph and "graph capture" in msg:
            from .placement import predict_cuda_placement
            return UserError(f"{self.path}: ONNX Runtime cannot capture this graph in a CUDA graph ({msg}); "
                             f"predicted placement: {predict_cuda_placement(self.path).summary()}")
        return UserError(f"{self.path}: ONNX Runtime cannot load it: {msg}")

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

    def _run(self, feeds, infos, device_outputs=False, out=None):
        """device_outputs=True: the outputs as OrtValues where the session leaves them (on the GPU
        with the CUDA provider). out: {output name: OrtValue} to write those outputs into."""
        out = dict(out or {})
        unknown = [k for k in out if k not in {s.name for s in self.outputs}]
        if unknown:
            raise UserError(f"{self.name}: out= names unknown output {unknown[0]!r}")
        on_device = [n for n, i in infos.items() if i.on_device and not i.ortvalue]
        if on_device and not self.on_cuda:
            raise UserError(f"{self.name}: CUDA input {on_device[0]!r} needs the CUDA provider (device='cuda'); "
                            "the CPU session takes host arrays")
        if self.cuda_graph:
            capture = self._capture_for(feeds, infos, out)
            if capture is not None:
                return capture.run(self, feeds, infos, device_outputs)
            return self._run_bound(feeds, infos, device_outputs, out, self._run_uncaptured())
        if on_device or device_outputs or out or any(i.ortvalue for i in infos.values()) or self._bf16:
            return self._run_bound(feeds, infos, device_outputs, out)
        host = {}
        for spec in self.inputs:
            arr = feeds[spec.name]
            host[spec.name] = np.ascontiguousarray(arr) if isinstance(arr, np.ndarray) else np.asarray(arr)
        try:
            outs = self.session.run(None, host)
        except Exception as e:
            raise RuntimeError(f"{self.name}: inference failed: {_one_line(e)}") from None
        return {s.name: o for s, o in zip(self.outputs, outs)}

    def _run_uncaptured(self):
        if self._uncaptured is None:
            self._uncaptured = self._ort.RunOptions()
            self._uncaptured.add_run_config_entry("gpu_graph_id", "-1")     # no capture, no replay
        return self._uncaptured

    def _bind_input(self, binding, spec, info, value):
        if info.ortvalue:
            binding.bind_ortvalue_input(spec.name, value)
        elif info.on_device:
            if info.stream is not None:
                # ORT runs on its own stream: let the producer's queued work finish first
                from .cuda import cudart, check
                check(cudart().cudaStreamSynchronize(info.stream), "cudaStreamSynchronize")
            binding.bind_input(spec.name, "cuda", self.device_id, _elem(spec.dtype), list(info.shape), info.ptr)
        elif spec.dtype == "bfloat16":      # numpy has no bfloat16 for ORT: pass the bits typed by ONNX code
            bits = np.ascontiguousarray(value).view(np.uint16)
            binding.bind_ortvalue_input(spec.name, self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _BF16))
        else:
            binding.bind_cpu_input(spec.name, np.ascontiguousarray(value))

    def _run_bound(self, feeds, infos, device_outputs, out=None, run_options=None):
        """IOBinding: CUDA arrays by pointer (zero copy), OrtValues as they are, host arrays copied by ORT."""
        binding = self.session.io_binding()
        for spec in self.inputs:
            self._bind_input(binding, spec, infos[spec.name], feeds[spec.name])
        for spec in self.outputs:
            if out and spec.name in out:
                binding.bind_ortvalue_output(spec.name, out[spec.name])
            elif device_outputs and self.on_cuda:
                binding.bind_output(spec.name, "cuda", self.device_id)
            else:
                binding.bind_output(spec.name)
        try:
            self.session.run_with_iobinding(binding, run_options)
        except Exception as e:
            raise RuntimeError(f"{self.name}: inference failed: {_one_line(e)}") from None
        return self._results(binding.get_outputs(), device_outputs)

    def _results(self, values, device_outputs):
        if device_outputs:
            return dict(zip((s.name for s in self.outputs), values))   # OrtValues where the session left them
        return {s.name: _to_numpy(v) for s, v in zip(self.outputs, values)}

    # ------------------------------------------------------------------ CUDA graphs

    def _capture_for(self, feeds, infos, out):
        """The capture (gpu_graph_id and its buffers) for these input shapes and bound OrtValues; a
        new one while fewer than graph_max_shapes exist; None past that (the run goes uncaptured)."""
        key = (tuple((s.name, tuple(infos[s.name].shape)) for s in self.inputs),
               tuple((s.name, infos[s.name].ptr) for s in self.inputs if infos[s.name].ortvalue),
               tuple(sorted((n, v.data_ptr()) for n, v in out.items())))
        cap = self._graphs.get(key)
        if cap is None and len(self._graphs) < self.graph_max_shapes:
            cap = self._graphs[key] = _Capture(len(self._graphs) + 1, self, infos, out)   # id 0 is ORT's own
        return cap

    @property
    def captured_shapes(self) -> int:
        """How many input shapes (and bound OrtValue sets) have a CUDA graph id of their own."""
        return len(self._graphs)

    def device_values(self, arrays: dict) -> dict:
        """OrtValues on the session's device (the GPU with the CUDA provider) holding copies of
        host arrays: for state that stays on the device between runs (Stream)."""
        out = {}
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            bf16 = a.dtype.name == "bfloat16"
            v = self._ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), _BF16 if bf16 else a.dtype.type,
                                                                  self.device_type, self.device_id)
            copy_into(v, a)
            out[name] = v
        return out

    def close(self):
        self._graphs.clear()
        self.session = None


class _Capture:
    """One CUDA graph of a session: its gpu_graph_id, the device buffers its inputs are copied
    into (all but OrtValue inputs, which are bound as they are), and its outputs: the out= values,
    else buffers of the output shapes (their symbolic dims read off the inputs', as "batch"; where
    that does not settle them, a first, uncaptured run reports them). ONNX Runtime runs the first
    calls of an id normally, captures the next and replays it from then on, at the bound addresses.
    Every buffer is allocated apart from the session's arena, so no later run reuses its memory."""

    def __init__(self, graph_id, backend, infos, out):
        self.graph_id = graph_id
        self.out = dict(out)
        new = lambda shape, dtype: backend._ort.OrtValue.ortvalue_from_shape_and_type(  # noqa: E731
            list(shape), _elem(dtype), backend.device_type, backend.device_id)
        self.inputs = {s.name: new(infos[s.name].shape, s.dtype) for s in backend.inputs if not infos[s.name].ortvalue}
        shapes = output_shapes(backend.inputs, backend.outputs, infos)
        self.outputs = None if shapes is None else {
            s.name: self.out[s.name] if s.name in self.out else new(shapes[s.name], s.dtype) for s in backend.outputs}
        self.binding = None
        self.options = backend._ort.RunOptions()
        self.options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def run(self, backend, feeds, infos, device_outputs):
        queued = [copy_into(v, feeds[name], infos[name]) for name, v in self.inputs.items()]
        if any(queued):
            # device copies ran on the legacy default stream; ORT's run is on its own stream
            from .cuda import cudart, check
            check(cudart().cudaStreamSynchronize(0), "cudaStreamSynchronize")
        first = self.outputs is None
        if self.binding is None and not first:
            self.binding = self._bind(backend, feeds, self.outputs)
        binding = self._bind(backend, feeds) if first else self.binding
        try:
            backend.session.run_with_iobinding(binding, backend._run_uncaptured() if first else self.options)
        except Exception as e:
            raise RuntimeError(f"{backend.name}: inference failed: {_one_line(e)}") from None
        if first:     # the output shapes are known now: buffers for them, and the binding to capture
            values = binding.get_outputs()
            self.outputs = {s.name: self.out[s.name] if s.name in self.out else
                            backend._ort.OrtValue.ortvalue_from_shape_and_type(
                                list(v.shape()), _elem(s.dtype), backend.device_type, backend.device_id)
                            for s, v in zip(backend.outputs, values)}
            self.binding = self._bind(backend, feeds, self.outputs)
            return backend._results(values, device_outputs)       # this call's results: the first run's
        return backend._results([self.outputs[s.name] for s in backend.outputs], device_outputs)

    def _bind(self, backend, feeds, outputs=None):
        """The inputs' buffers (and OrtValue feeds as they are); the outputs' buffers, else out=
        values and the rest where the session puts them."""
        binding = backend.session.io_binding()
        for spec in backend.inputs:
            binding.bind_ortvalue_input(spec.name, self.inputs[spec.name] if spec.name in self.inputs
                                        else feeds[spec.name])
        for spec in backend.outputs:
            value = (outputs or self.out).get(spec.name)
            if value is not None:
                binding.bind_ortvalue_output(spec.name, value)
            else:
                binding.bind_output(spec.name, backend.device_type, backend.device_id)
        return binding


def output_shapes(inputs, outputs, infos) -> dict | None:
    """{output name: concrete shape} where every symbolic output dim is one of the inputs' symbols
    (the exported graphs' "batch"), for these input shapes; None when one is not."""
    known = {}
    for spec in inputs:
        for dim, n in zip(spec.shape, infos[spec.name].shape):
            if isinstance(dim, str):
                known[dim] = int(n)
    out = {}
    for spec in outputs:
        dims = [d if isinstance(d, int) else known.get(d) for d in spec.shape]
        if any(d is None or d < 0 for d in dims):
            return None
        out[spec.name] = dims
    return out


def copy_into(value, src, info=None) -> bool:
    """Copy `src` (a host array, a CUDA array, or an OrtValue) into the OrtValue `value`, whose
    address stays (what a captured CUDA graph reads). True when the copy was queued on the legacy
    default stream (a device copy): the caller synchronises it before ONNX Runtime reads `value`
    on its own stream. Host arrays into GPU values need no cuda-python (OrtValue.update_inplace)."""
    from .specs import array_info
    info = info or array_info(src)
    on_gpu = value.device_name().lower() != "cpu"
    nbytes = int(np.prod(value.shape(), dtype=np.int64)) * np.dtype(np_dtype(ORT_TYPES[value.data_type()])).itemsize
    if info.on_device or info.ortvalue:
        src_ptr = info.ptr if not info.ortvalue else src.data_ptr()
        if not (on_gpu or info.on_device):
            ctypes.memmove(value.data_ptr(), src_ptr, nbytes)
            return False
        from .cuda import check, cudart
        rt = cudart()
        if info.stream not in (None, 1, 2):      # a producer's own stream (CAI v3): its work first
            check(rt.cudaStreamSynchronize(info.stream), "cudaStreamSynchronize")
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice if info.on_device else rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        if not on_gpu:
            kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(value.data_ptr(), src_ptr, nbytes, kind, 0), "cudaMemcpyAsync")
        return True
    a = np.ascontiguousarray(src)
    if a.nbytes != nbytes:
        raise UserError(f"cannot copy {a.shape} {a.dtype} into a {value.shape()} {value.data_type()} buffer")
    if not on_gpu:
        ctypes.memmove(value.data_ptr(), a.ctypes.data, nbytes)
    elif a.dtype.name == "bfloat16":      # OrtValue.update_inplace takes numpy's own dtypes only
        from .cuda import copy_htod
        copy_htod(value.data_ptr(), a)
    else:
        value.update_inplace(a)
    return False
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
