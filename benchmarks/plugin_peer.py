"""The TensorRT plugin's kernels, timed through its GPU harness (no TensorRT runtime needed).

plugins/trt_coupled_scan/tests/harness_shim.cpp builds libcoupled_scan_harness.so, a C API that
drives the plugin library the way TensorRT does (createPlugin -> configure -> serialize ->
deserialize -> onShapeChange -> enqueue) on caller-owned device memory and stream. This module
calls that C API with ctypes on torch tensors, so the plugin's enqueue is timed exactly like the
Triton kernel (CUDA events, same inputs). The plugin's two implementations are its tactics (1: the CUDA
block kernel, 2: the Triton kernels compiled ahead of time, where compiled for the shape): `prepare(inp,
tactic)` builds the handle with that tactic set, as TensorRT's builder does with its pick.

Library: $CM_DEPLOY_PLUGIN_HARNESS (the .so), or $CM_PLUGIN_LIB_DIR (the folder, as for
plugins/trt_coupled_scan/tests/run_gpu_checks.sh), else our own build in /tmp/cm_bench_plugin (sm_90, built in
the background by run_all.py with CMake + Ninja against TensorRT headers found in $TensorRT_ROOT,
.carry/trt or build/trt). A build directory of the repository is not used: it may be stale or built
for another GPU.
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil

import common

BUILD_DIR = "/tmp/cm_bench_plugin"
LIB = "libcoupled_scan_harness.so"
_DTYPE = {"float32": 0, "float16": 1, "bfloat16": 2}


def find_library():
    env = os.environ.get("CM_DEPLOY_PLUGIN_HARNESS")
    if env:
        return env if os.path.exists(env) else None
    d = os.environ.get("CM_PLUGIN_LIB_DIR")   # the variable run_gpu_checks.sh uses for prebuilt libraries
    if d:
        p = os.path.join(d, LIB)
        return p if os.path.exists(p) else None
    hits = glob.glob(os.path.join(BUILD_DIR, "**", LIB), recursive=True)
    return hits[0] if hits else None


def find_trt_root(repo):
    for root in (os.environ.get("TensorRT_ROOT"), os.path.join(repo, ".carry", "trt"),
                 os.path.join(repo, "build", "trt")):
        if root and os.path.exists(os.path.join(root, "include", "NvInfer.h")):
            return root
    return None


def start_background_build(repo, log_path, jobs=4):
    """Configure and build the harness (and the plugin it links) for sm_90 only. Returns
    (Popen or None, why)."""
    if find_library():
        return None, "already built"
    if not os.path.exists(os.path.join(repo, "plugins", "trt_coupled_scan", "tests", "harness_shim.cpp")):
        return None, "plugins/trt_coupled_scan/tests/harness_shim.cpp not in this checkout"
    cmake = shutil.which("cmake")
    if not cmake:
        return None, "cmake not found"
    trt = find_trt_root(repo)
    if not trt:
        return None, "TensorRT headers not found ($TensorRT_ROOT, .carry/trt, build/trt)"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    script = (f"set -e; '{cmake}' -S '{repo}' -B '{BUILD_DIR}' {' '.join(gen)} -DTensorRT_ROOT='{trt}' "
              f"-DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_TESTING=ON -DCMAKE_BUILD_TYPE=Release "
              f"-DCM_DEPLOY_BUILD_ORT_OPS=OFF -DCM_DEPLOY_BUILD_EXAMPLES=OFF; "
              f"'{cmake}' --build '{BUILD_DIR}' --target coupled_scan_harness -j {jobs}")
    return common.start_logged(["bash", "-c", script], log_path), "building"


def wait_build(p, timeout):
    if p is None:
        return {}
    return common.wait_logged(p, timeout, "plugin build")[0]


class HarnessRunner:
    """ctypes over the harness C API (see harness_shim.cpp)."""

    def __init__(self, path):
        self.path = path
        plugin = os.path.join(os.path.dirname(path), "libcoupled_scan_plugin.so")
        if os.path.exists(plugin):   # as tests/gpu/plugin_harness.py does: the plugin first, global
            self._plugin = ctypes.CDLL(plugin, mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(path)
        i64p = ctypes.POINTER(ctypes.c_int64)
        lib.cmh_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int,
                                   i64p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.cmh_tactics.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cmh_tactics.restype = ctypes.c_int
        lib.cmh_create.restype = ctypes.c_void_p
        lib.cmh_workspace_size.argtypes = [ctypes.c_void_p]
        lib.cmh_workspace_size.restype = ctypes.c_longlong
        lib.cmh_enqueue.argtypes = [ctypes.c_void_p, i64p, ctypes.POINTER(ctypes.c_void_p),
                                    ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_char_p, ctypes.c_int]
        lib.cmh_enqueue.restype = ctypes.c_int
        lib.cmh_destroy.argtypes = [ctypes.c_void_p]
        lib.cmh_destroy.restype = None
        self.lib = lib
        self._handles = []

    def create(self, dtype, shape, softplus=True, kappa=None, tactic=0):
        err = ctypes.create_string_buffer(4096)
        sh = (ctypes.c_int64 * 5)(*shape)
        kappa = 1.0 / shape[1] if kappa is None else kappa
        h = self.lib.cmh_create(_DTYPE[dtype], int(softplus), float(kappa), 0, 0, sh, int(tactic), err, 4096)
        if not h:
            raise RuntimeError("cmh_create: " + err.value.decode(errors="replace"))
        self._handles.append(h)
        return h, sh

    def check_cpu(self):
        """No GPU: the create path and an empty-batch enqueue (what the smoke run can exercise)."""
        h, _ = self.create("float32", (2, 3, 16, 24, 16))
        err = ctypes.create_string_buffer(4096)
        empty = (ctypes.c_int64 * 5)(0, 3, 16, 24, 16)
        ins = (ctypes.c_void_p * 8)()
        outs = (ctypes.c_void_p * 1)()
        rc = self.lib.cmh_enqueue(h, empty, ins, outs, None, None, err, 4096)
        if rc != 0:
            raise RuntimeError("empty enqueue: " + err.value.decode(errors="replace"))
        return {"create": "ok", "workspace": int(self.lib.cmh_workspace_size(h)), "empty_enqueue": "ok"}

    def tactics(self, dtype, shape):
        """The tactics the plugin offers for this shape: [1] or [1, 2] (see the module notes)."""
        h, _ = self.create(dtype, shape)
        out = (ctypes.c_int * 4)()
        n = self.lib.cmh_tactics(h, out, 4)
        return list(out[:max(n, 0)])

    def prepare(self, inp, tactic=0):
        """-> (fn, y): fn() enqueues the plugin on torch's current stream, writing y. tactic: 1 the CUDA
        kernel, 2 the Triton kernels, 0 the plugin's automatic choice."""
        import torch
        shape = (inp.batch, inp.M, inp.L, inp.E, inp.N)
        h, sh = self.create(inp.dtype, shape, tactic=tactic)
        ws_bytes = int(self.lib.cmh_workspace_size(h))
        ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=inp.u.device) if ws_bytes > 0 else None
        y = torch.empty_like(inp.u)
        keep = [t.contiguous() for t in inp.args()]   # the pointers must stay alive
        ins = (ctypes.c_void_p * 8)(*[t.data_ptr() for t in keep])
        outs = (ctypes.c_void_p * 1)(y.data_ptr())
        err = ctypes.create_string_buffer(4096)
        lib = self.lib
        ws_ptr = ws.data_ptr() if ws is not None else None

        def fn():
            stream = torch.cuda.current_stream().cuda_stream
            rc = lib.cmh_enqueue(h, sh, ins, outs, ws_ptr, stream, err, 4096)
            if rc != 0:
                raise RuntimeError("cmh_enqueue: " + err.value.decode(errors="replace"))
            fn._keep = (keep, y, ws)
        return fn, y

    def close(self):
        for h in self._handles:
            self.lib.cmh_destroy(h)
        self._handles.clear()


def load(smoke=False):
    path = find_library()
    if not path:
        return {"runner": None, "why": "harness library not built (set CM_DEPLOY_PLUGIN_HARNESS or let "
                                        "run_all.py build it)"}
    try:
        r = HarnessRunner(path)
    except OSError as e:
        return {"runner": None, "why": f"cannot load {path}: {e}"}
    out = {"runner": r, "lib": path}
    if smoke:
        out["cpu_check"] = r.check_cpu()
        out["runner"] = None   # nothing to time without a GPU
        out["why"] = "cpu smoke: create path and empty enqueue only"
    return out
