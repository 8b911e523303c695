"""Device memory, streams and CUDA graphs through cuda-python's runtime API.

Both import paths are supported: `cuda.bindings.runtime` (cuda-python >= 12.6, 13) and the older
`cuda.cudart`. Nothing here imports torch; DeviceArray exposes __cuda_array_interface__ so torch,
CuPy or Numba can wrap runtime-owned memory without a copy.
"""
from __future__ import annotations

import threading

import numpy as np

from ..errors import UserError
from .specs import dtype_name, np_dtype

_rt = None
_rt_lock = threading.Lock()


class CudaError(RuntimeError):
    pass


def cudart():
    """The cuda-python runtime module (cuda.bindings.runtime, else cuda.cudart)."""
    global _rt
    if _rt is None:
        with _rt_lock:
            if _rt is None:
                try:
                    from cuda.bindings import runtime as rt
                except ImportError:
                    try:
                        from cuda import cudart as rt
                    except ImportError:
                        why = gpu_missing()
                        if why:    # the blocker is the GPU, not the package
                            raise UserError(f"running on CUDA needs an NVIDIA GPU, and there is none here ({why})"
                                            ) from None
                        raise UserError("the TensorRT runtime needs cuda-python (pip install cuda-python)") from None
                _rt = rt
    return _rt


def gpu_missing() -> str | None:
    """Why this machine cannot run CUDA work (no NVIDIA driver, no device), or None when it can.
    Asks the driver library itself through ctypes: needs neither cuda-python nor torch."""
    import ctypes
    import sys
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        drv = ctypes.CDLL(name)
    except OSError:
        return f"no NVIDIA driver: {name} not found"
    err = drv.cuInit(0)
    count = ctypes.c_int(0)
    if err == 100 or (err == 0 and (drv.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0)):
        return "the NVIDIA driver sees no CUDA device"      # 100: CUDA_ERROR_NO_DEVICE
    if err != 0:
        return f"the NVIDIA driver does not start (cuInit error {err})"
    return None


def _err_text(rt, err) -> str:
    try:
        name = rt.cudaGetErrorName(err)[1].decode()
        text = rt.cudaGetErrorString(err)[1].decode()
        return f"{name}: {text}"
    except Exception:
        return str(err)


def check(result, what: str = "CUDA call"):
    """Unpack cuda-python's (err, value...) tuples; raise CudaError on failure."""
    rt = cudart()
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        raise CudaError(f"{what} failed: {_err_text(rt, err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def device_count() -> int:
    try:
        rt = cudart()
        err, n = rt.cudaGetDeviceCount()
        return int(n) if int(err) == 0 else 0
    except Exception:
        return 0


def set_device(index: int) -> None:
    check(cudart().cudaSetDevice(int(index)), f"cudaSetDevice({index})")


def current_device() -> int:
    return int(check(cudart().cudaGetDevice(), "cudaGetDevice"))


def device_info(index: int | None = None) -> dict:
    """{"index", "name", "compute_capability": "9.0", "total_memory"} of a CUDA device."""
    rt = cudart()
    if index is None:
        index = current_device()
    prop = check(rt.cudaGetDeviceProperties(int(index)), "cudaGetDeviceProperties")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"index": int(index), "name": str(name), "compute_capability": f"{prop.major}.{prop.minor}",
            "total_memory": int(prop.totalGlobalMem)}


def parse_device(device) -> int:
    """'cuda', 'cuda:1', 1 or None -> a CUDA device index."""
    if device is None or device == "cuda":
        return 0
    if isinstance(device, int):
        return device
    s = str(device)
    if s.startswith("cuda:") and s[5:].isdigit():
        return int(s[5:])
    raise UserError(f"TensorRT engines run on a CUDA device: use 'cuda' or 'cuda:N', not {device!r}")


class Stream:
    """A non-blocking CUDA stream (owned), or a wrapper of an existing handle. Work from other
    streams is ordered explicitly with wait_for (no implicit legacy-stream synchronisation, which
    would also get in the way of CUDA graph capture)."""

    def __init__(self, handle: int | None = None, non_blocking: bool = True):
        rt = cudart()
        self._owned = handle is None
        if handle is None:
            flags = rt.cudaStreamNonBlocking if non_blocking else rt.cudaStreamDefault
            handle = check(rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreate")
        self._obj = handle
        self.handle = int(handle)
        self._event = None

    def synchronize(self):
        check(cudart().cudaStreamSynchronize(self._obj), "cudaStreamSynchronize")

    def wait_for(self, producer: int | None):
        """Order this stream after the work queued on `producer` (a __cuda_array_interface__ v3
        'stream': 1 legacy default, 2 per-thread default, else a cudaStream_t), without blocking
        the host."""
        if producer is None or int(producer) == self.handle:
            return
        rt = cudart()
        if self._event is None:
            self._event = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreate")
        check(rt.cudaEventRecord(self._event, int(producer)), "cudaEventRecord")
        check(rt.cudaStreamWaitEvent(self._obj, self._event, 0), "cudaStreamWaitEvent")

    def close(self):
        rt = cudart()
        if self._event is not None:
            rt.cudaEventDestroy(self._event)
            self._event = None
        if self._owned and self._obj is not None:
            rt.cudaStreamDestroy(self._obj)
        self._obj = None


class DeviceBuffer:
    """cudaMalloc'd bytes, freed on close/garbage collection. `ensure(n)` grows (never shrinks) so
    the address stays stable across calls of one size, which CUDA graph replay relies on."""

    def __init__(self, nbytes: int = 0):
        self.ptr, self.nbytes = 0, 0
        if nbytes:
            self.ensure(nbytes)

    def ensure(self, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(check(cudart().cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))
            self.nbytes = nbytes
        return self.ptr

    def free(self):
        if self.ptr:
            try:
                cudart().cudaFree(self.ptr)
            except Exception:
                pass
        self.ptr, self.nbytes = 0, 0

    close = free

    def __del__(self):
        self.free()


class DeviceArray:
    """A typed view of device memory with __cuda_array_interface__ (v3): torch.as_tensor(a,
    device="cuda"), cupy.asarray(a) or numba.cuda.as_cuda_array(a) wrap it without copying. Keeps
    its owner (a DeviceBuffer) alive."""

    def __init__(self, ptr: int, shape, dtype, owner=None, stream: int | None = None):
        self.ptr = int(ptr)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
        self._owner = owner
        self._stream = stream

    @classmethod
    def empty(cls, shape, dtype) -> "DeviceArray":
        dt = np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
        buf = DeviceBuffer(int(np.prod(shape, dtype=np.int64)) * dt.itemsize)
        return cls(buf.ptr, shape, dt, owner=buf)

    @classmethod
    def from_host(cls, arr: np.ndarray, stream: Stream | None = None) -> "DeviceArray":
        arr = np.ascontiguousarray(arr)
        out = cls.empty(arr.shape, arr.dtype)
        copy_htod(out.ptr, arr, stream)
        if stream is not None:
            stream.synchronize()
        return out

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self):
        # bfloat16 has no typestr; '<V2' is ml_dtypes' and what cm-deploy's checks accept.
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False),
                "version": 3, "strides": None, "stream": self._stream}

    def to_host(self, stream: Stream | None = None) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        copy_dtoh(out, self.ptr, stream)
        if stream is not None:
            stream.synchronize()
        return out

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={dtype_name(self.dtype)}, ptr=0x{self.ptr:x})"


def _memcpy(dst, src, n, kind, stream):
    rt = cudart()
    if n == 0:
        return
    if stream is None:
        check(rt.cudaMemcpy(dst, src, n, kind), "cudaMemcpy")
    else:
        check(rt.cudaMemcpyAsync(dst, src, n, kind, stream._obj), "cudaMemcpyAsync")


def copy_htod(dst_ptr: int, host: np.ndarray, stream: Stream | None = None):
    if not host.flags.c_contiguous:
        raise ValueError("copy_htod needs a C-contiguous array")
    _memcpy(int(dst_ptr), host.ctypes.data, host.nbytes, cudart().cudaMemcpyKind.cudaMemcpyHostToDevice, stream)


def copy_dtoh(host: np.ndarray, src_ptr: int, stream: Stream | None = None):
    _memcpy(host.ctypes.data, int(src_ptr), host.nbytes, cudart().cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)


def copy_dtod(dst_ptr: int, src_ptr: int, nbytes: int, stream: Stream | None = None):
    _memcpy(int(dst_ptr), int(src_ptr), int(nbytes), cudart().cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)


class CudaGraph:
    """One captured-and-instantiated CUDA graph. `capture(stream, fn)` records what fn enqueues on
    the stream (fn must enqueue only: no allocation, no synchronisation); `launch(stream)` replays it.
    The addresses the captured work used are baked in: callers key graphs by them."""

    def __init__(self):
        self._graph = None
        self._exec = None

    def capture(self, stream: Stream, fn) -> "CudaGraph":
        rt = cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream._obj, mode), "cudaStreamBeginCapture")
        try:
            fn()
        except BaseException:
            try:
                err, g = rt.cudaStreamEndCapture(stream._obj)
                if int(err) == 0 and g is not None:
                    rt.cudaGraphDestroy(g)
            except Exception:
                pass
            raise
        self._graph = check(rt.cudaStreamEndCapture(stream._obj), "cudaStreamEndCapture")
        self._exec = check(rt.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")
        return self

    def launch(self, stream: Stream):
        check(cudart().cudaGraphLaunch(self._exec, stream._obj), "cudaGraphLaunch")

    def close(self):
        rt = cudart()
        if self._exec is not None:
            rt.cudaGraphExecDestroy(self._exec)
        if self._graph is not None:
            rt.cudaGraphDestroy(self._graph)
        self._exec = self._graph = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class GraphCache:
    """CUDA graphs keyed by (shapes, addresses), least recently used dropped beyond `capacity`."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._graphs: dict = {}
        self.captures = 0
        self.replays = 0

    def run(self, key, stream: Stream, enqueue):
        g = self._graphs.pop(key, None)
        if g is None:
            g = CudaGraph().capture(stream, enqueue)
            self.captures += 1
            while len(self._graphs) >= self.capacity:
                self._graphs.pop(next(iter(self._graphs))).close()
        else:
            self.replays += 1
        self._graphs[key] = g       # most recently used last
        g.launch(stream)

    def clear(self):
        for g in self._graphs.values():
            g.close()
        self._graphs.clear()
