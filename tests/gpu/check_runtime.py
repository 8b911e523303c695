#!/usr/bin/env python3
"""GPU check of cm_deploy.runtime: the device-memory path on a real GPU, and build_engine with a
TensorRT flavour when one is given. Every step is recorded pass/fail/skip in a JSON file; one failing
step never stops the others, and the steps that can abort the process (TensorRT building or loading
a plugin) run in child processes.

    python3 tests/gpu/check_runtime.py --out $OUT/runtime_check.json \
        [--trt-module tensorrt_rtx_bindings --plugin build/.../plugins/trt_coupled_scan/libcoupled_scan_plugin.so \
         --onnx path/model.onnx [--ckpt path/ckpt.pt]]
    python3 tests/gpu/check_runtime.py --smoke --out /tmp/runtime_check.json    # CPU dry run

Steps (GPU):
  cuda-python allocations and copies (DeviceBuffer/DeviceArray), __cuda_array_interface__ views of
  runtime memory taken by torch and CuPy without copies; the PyTorch backend (Triton scan when
  available) against the CPU reference, fed CUDA tensors from torch, CuPy and DeviceArray without
  copies (pointer identity) with outputs left on the device, and replaying CUDA graphs; the runtime's
  own cuda-python CUDA graph (a CuPy kernel captured on a runtime stream); the TensorRT Engine's
  device path (host and CUDA inputs, device outputs, out=, CUDA graph replay, profile checks) over
  a stand-in TensorRT module whose enqueue launches a CuPy kernel on the engine's stream (no real
  TensorRT runs engines here); ONNX Runtime on the portable ONNX; with --trt-module: build_engine on
  the portable and the TensorRT ONNX (child processes), then loading the engine (TensorRT-RTX refuses
  to run on an H100: the message is recorded and must arrive as a clean UserError).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

import numpy as np  # noqa: E402

CHILD_TAG = "CHILD_RESULT "


class Skip(Exception):
    pass


class Recorder:
    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.steps = out, meta, []

    def step(self, name, fn, *args, **kw):
        t0 = time.perf_counter()
        rec = {"name": name}
        try:
            detail = fn(*args, **kw)
            rec["status"] = "pass"
            if detail is not None:
                rec["detail"] = detail
        except Skip as e:
            rec["status"], rec["reason"] = "skip", str(e)
        except BaseException as e:   # noqa: BLE001 - record everything, never stop
            if isinstance(e, KeyboardInterrupt):
                raise
            rec["status"] = "fail"
            rec["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:800]}"
            rec["traceback"] = traceback.format_exc(limit=6)[-3000:]
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        self.steps.append(rec)
        print(f"[{rec['status']:4s}] {name} ({rec['seconds']:.2f} s)"
              + (f": {rec.get('reason') or rec.get('error')}" if rec["status"] != "pass" else ""), flush=True)
        self.write()
        return rec

    def write(self):
        summary = {s: sum(1 for r in self.steps if r["status"] == s) for s in ("pass", "fail", "skip")}
        doc = dict(self.meta, steps=self.steps, summary=summary)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.out)


# ---------------------------------------------------------------------------- helpers

def _torch():
    try:
        import torch
    except ImportError:
        raise Skip("torch is not installed")
    return torch


def _cuda_torch():
    torch = _torch()
    if not torch.cuda.is_available():
        raise Skip("no CUDA device visible to torch")
    return torch


def _cupy():
    try:
        import cupy
    except ImportError:
        raise Skip("cupy is not installed")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise Skip(f"cupy sees no CUDA device: {e}")
    return cupy


def _need_cuda_python():
    from cm_deploy.runtime import cuda as cu
    if cu.device_count() == 0:
        raise Skip("cuda-python sees no CUDA device")
    return cu


def _feeds(specs, batch, lengths, seed=0):
    from cm_deploy.runtime.specs import ShapeChoice, random_feeds
    return random_feeds(specs, ShapeChoice(batch, dict(zip([s.name for s in specs], lengths))), seed)


# ---------------------------------------------------------------------------- steps

def step_env(args):
    from cm_deploy.runtime.trt import tensorrt_available
    env = {"python": sys.version.split()[0], "platform": platform.platform()}
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    except ImportError:
        env["torch"] = None
    try:
        import cupy
        env["cupy"] = cupy.__version__
    except ImportError:
        env["cupy"] = None
    try:
        import onnxruntime as ort
        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    from cm_deploy.runtime import cuda as cu
    try:
        rt = cu.cudart()
        env["cuda_python_runtime"] = rt.__name__
        env["cuda_devices"] = cu.device_count()
    except Exception as e:
        env["cuda_python_runtime"] = f"unavailable: {e}"
    mods = ["tensorrt"] + ([args.trt_module] if args.trt_module and args.trt_module != "tensorrt" else [])
    env["tensorrt_modules"] = {m: dict(zip(("ok", "info"), tensorrt_available(m))) for m in mods}
    return env


def step_checkpoint(tmp: Path, state: dict):
    torch = _torch()
    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    torch.manual_seed(0)
    cfg = CoupledMambaConfig(modalities={"text": 24, "audio": 10, "vision": 6}, d_model=32, n_layers=2,
                             d_state=8, d_conv=4)
    state["ckpt"] = save_checkpoint(CoupledMamba(cfg), tmp / "check.pt")
    return {"path": str(state["ckpt"]), "config": cfg.to_dict()}


def step_cai_parse_cpu():
    """__cuda_array_interface__ parsing (no GPU): pointer, shape, dtype, stream, contiguity."""
    from cm_deploy.runtime.specs import TensorSpec, cai_info, check_feeds
    from cm_deploy.errors import UserError

    class Fake:
        def __init__(self, shape, typestr="<f4", strides=None, stream=None):
            self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0xDEAD000, False),
                                             "version": 3, "strides": strides, "stream": stream}

    info = cai_info(Fake((2, 3, 4), stream=7))
    assert (info.ptr, info.shape, info.dtype, info.stream, info.contiguous) == (0xDEAD000, (2, 3, 4), "float32", 7, True)
    assert not cai_info(Fake((2, 3), strides=(4, 8))).contiguous
    spec = [TensorSpec("x", ("batch", "L_x", 4), "float32")]
    try:
        check_feeds("t", spec, {"x": Fake((2, 3, 4), strides=(4, 8, 24))})
        raise AssertionError("non-contiguous CUDA input accepted")
    except UserError as e:
        msg = str(e)
    return {"non_contiguous_error": msg}


def step_device_buffers():
    cu = _need_cuda_python()
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    da = cu.DeviceArray.from_host(x)
    back = da.to_host()
    assert np.array_equal(back, x), "H2D/D2H round trip changed the data"
    db = cu.DeviceArray.empty(x.shape, x.dtype)
    s = cu.Stream()
    cu.copy_dtod(db.ptr, da.ptr, da.nbytes, s)
    s.synchronize()
    assert np.array_equal(db.to_host(), x)
    buf = cu.DeviceBuffer(16)
    p1 = buf.ensure(8)
    p2 = buf.ensure(16)
    p3 = buf.ensure(64)
    assert p1 == p2, "ensure() must keep the address while the size fits"
    s.close()
    return {"device": cu.device_info(), "grow_realloc": p3 != p2}


def step_cai_views():
    """torch and CuPy take runtime-owned memory (DeviceArray) without copying, and cai_info reads
    torch and CuPy arrays' pointers exactly."""
    cu = _need_cuda_python()
    torch = _cuda_torch()
    cupy = _cupy()
    from cm_deploy.runtime.specs import cai_info
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    da = cu.DeviceArray.from_host(x)
    t = torch.as_tensor(da, device="cuda")
    assert t.data_ptr() == da.ptr, "torch copied the DeviceArray"
    c = cupy.asarray(da)
    assert int(c.data.ptr) == da.ptr, "cupy copied the DeviceArray"
    assert np.array_equal(t.cpu().numpy(), x) and np.array_equal(cupy.asnumpy(c), x)
    t.add_(1)          # writes through the shared memory
    torch.cuda.synchronize()
    assert np.array_equal(da.to_host(), x + 1)
    tt = torch.randn(2, 3, device="cuda")
    ct = cupy.ones((4, 5), dtype=cupy.float16)
    it, ic = cai_info(tt), cai_info(ct)
    assert it.ptr == tt.data_ptr() and it.shape == (2, 3) and it.dtype == "float32"
    assert ic.ptr == int(ct.data.ptr) and ic.dtype == "float16"
    s = cu.Stream()
    s.wait_for(it.stream)
    s.wait_for(1)
    s.wait_for(torch.cuda.current_stream().cuda_stream or None)
    s.synchronize()
    s.close()
    return {"torch_cai_stream": it.stream, "cupy_cai_stream": ic.stream}


def step_child_plumbing(tmp: Path):
    """The child-process mechanism the TensorRT steps rely on: a child that fails cleanly reports
    its UserError instead of crashing the parent."""
    r = _child(["--child", "load", "--engine", str(tmp / "missing.engine"), "--trt-module", "tensorrt"], timeout=120)
    res = r.get("result") or {}
    assert r.get("rc") == 0 and res.get("user_error"), r
    return {"child_user_error": res["user_error"]}


def step_torch_cpu(state):
    from cm_deploy.runtime.parity import run_parity
    from cm_deploy.runtime.specs import ShapeChoice
    ref = _torch_backend(state, device="cpu", scan_impl="reference")
    cpu = _torch_backend(state, device="cpu")
    rep = run_parity(ref, cpu, [ShapeChoice(2, {"text": 9, "audio": 5, "vision": 3})])
    assert rep["ok"], rep
    return {"max_abs": rep["cases"][0]["outputs"][0]["max_abs"]}


def _torch_backend(state, **kw):
    if "ckpt" not in state:
        raise Skip("no checkpoint (the checkpoint step failed)")
    from cm_deploy.runtime.torch_backend import TorchBackend
    return TorchBackend(state["ckpt"], **kw)


def step_torch_cpu_vs_cuda(state):
    _cuda_torch()
    from cm_deploy.runtime.parity import run_parity
    from cm_deploy.runtime.specs import ShapeChoice
    ref = _torch_backend(state, device="cpu", scan_impl="reference")
    gpu = _torch_backend(state, device="cuda", scan_impl="auto")
    from cm_deploy.ops import triton_available
    import torch
    cases = [ShapeChoice(1, {"text": 8, "audio": 8, "vision": 8}),
             ShapeChoice(3, {"text": 40, "audio": 17, "vision": 9})]
    rep = run_parity(ref, gpu, cases)
    assert rep["ok"], f"CUDA backend out of float32 tolerance: {rep}"
    return {"scan": "triton" if triton_available(torch.device("cuda")) else "reference",
            "max_abs": max(o["max_abs"] for c in rep["cases"] for o in c["outputs"])}


def step_torch_device_inputs(state, producer):
    torch = _cuda_torch()
    b = _torch_backend(state, device="cuda")
    host = _feeds(b.inputs, 2, (12, 7, 5), seed=3)
    expect = b.run(host)["output"]
    if producer == "torch":
        dev = {k: torch.from_numpy(v).cuda() for k, v in host.items()}
        ptr = {k: v.data_ptr() for k, v in dev.items()}
    elif producer == "cupy":
        cupy = _cupy()
        dev = {k: cupy.asarray(v) for k, v in host.items()}
        ptr = {k: int(v.data.ptr) for k, v in dev.items()}
    else:
        _need_cuda_python()
        from cm_deploy.runtime.cuda import DeviceArray
        dev = {k: DeviceArray.from_host(v) for k, v in host.items()}
        ptr = {k: v.ptr for k, v in dev.items()}
    out = b.run(dev, device_outputs=True)["output"]
    assert b.last_input_pointers == ptr, f"inputs were copied: {b.last_input_pointers} != {ptr}"
    assert out.is_cuda, "device_outputs=True returned a host tensor"
    got = out.float().cpu().numpy()
    assert np.allclose(got, expect, atol=1e-5, rtol=1e-5), f"max diff {np.abs(got - expect).max()}"
    return {"zero_copy": True, "output_device": str(out.device)}


def step_torch_cuda_graph(state):
    torch = _cuda_torch()
    eager = _torch_backend(state, device="cuda")
    graph = _torch_backend(state, device="cuda", cuda_graph=True)
    a = _feeds(eager.inputs, 2, (16, 9, 5), seed=1)
    b = _feeds(eager.inputs, 1, (7, 7, 7), seed=2)
    a2 = _feeds(eager.inputs, 2, (16, 9, 5), seed=4)
    for f in (a, b, a2, a):
        e, g = eager.run(f)["output"], graph.run(f)["output"]
        assert np.allclose(e, g, atol=1e-5, rtol=1e-5), f"graph replay differs: {np.abs(e - g).max()}"
    stats = dict(graph.graph_stats)
    assert stats["captures"] == 2 and stats["replays"] == 4, stats
    dev = {k: torch.from_numpy(v).cuda() for k, v in a.items()}
    times = {}
    for name, be in (("eager", eager), ("graph", graph)):
        for _ in range(3):
            be.run(dev, device_outputs=True)
        torch.cuda.synchronize()
        lat = []
        for _ in range(30):
            t0 = time.perf_counter()
            be.run(dev, device_outputs=True)
            torch.cuda.synchronize()
            lat.append((time.perf_counter() - t0) * 1e3)
        times[name + "_p50_ms"] = float(np.median(lat))
    return dict(stats, **times)


_KERNELS = r"""
extern "C" __global__ void init_out(float* out, int n, int K) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 0.5f * (float)(i % K);
}
extern "C" __global__ void acc_mean(const float* x, float* out, int B, int K, long long per) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < B * K) {
        int b = i / K;
        float s = 0.f;
        for (long long j = 0; j < per; ++j) s += x[(long long)b * per + j];
        out[i] += s / (float)per;
    }
}
extern "C" __global__ void affine(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 2.f * x[i] + 1.f;
}
"""


def _cupy_module():
    cupy = _cupy()
    mod = cupy.RawModule(code=_KERNELS)
    return cupy, mod


def step_runtime_cuda_graph():
    """The runtime's cuda-python CUDA graph: capture a kernel launched on a runtime Stream, replay it
    after changing the input in place, through GraphCache like the Engine does."""
    cu = _need_cuda_python()
    cupy, mod = _cupy_module()
    affine = mod.get_function("affine")
    n = 4096
    x = cu.DeviceArray.from_host(np.arange(n, dtype=np.float32))
    y = cu.DeviceArray.empty((n,), np.float32)
    s = cu.Stream()

    def enqueue():
        with cupy.cuda.ExternalStream(s.handle):
            affine(((n + 255) // 256,), (256,), (np.uint64(x.ptr), np.uint64(y.ptr), np.int32(n)))

    enqueue()               # load the module outside the capture
    s.synchronize()
    cache = cu.GraphCache()
    cache.run("k", s, enqueue)
    s.synchronize()
    assert np.array_equal(y.to_host(), 2 * np.arange(n, dtype=np.float32) + 1)
    new = np.full(n, 3.0, np.float32)
    cu.copy_htod(x.ptr, new, s)
    cache.run("k", s, enqueue)
    s.synchronize()
    assert np.array_equal(y.to_host(), np.full(n, 7.0, np.float32)), "graph replay did not see the new input"
    stats = {"captures": cache.captures, "replays": cache.replays}
    cache.clear()
    s.close()
    assert stats == {"captures": 1, "replays": 1}, stats
    return stats


FAKE_MODULE = "cm_fake_tensorrt"


def _fake_engine(tmp: Path):
    """A stand-in engine (tests/fixtures/fake_tensorrt.py) whose enqueue runs CuPy kernels on the
    engine's stream: output[b, k] = 0.5 k + sum_m mean(x_m[b])."""
    cupy, mod = _cupy_module()
    init, acc = mod.get_function("init_out"), mod.get_function("acc_mean")
    from fake_tensorrt import MAGIC, make_fake_trt

    def kernel(ctx, stream):
        out = [n for n, e in ctx.engine.io.items() if e["mode"] == "OUTPUT"][0]
        B, K = ctx.get_tensor_shape(out)
        grid = ((B * K + 127) // 128,)
        with cupy.cuda.ExternalStream(stream):
            init(grid, (128,), (np.uint64(ctx.addresses[out]), np.int32(B * K), np.int32(K)))
            for name, e in ctx.engine.io.items():
                if e["mode"] == "INPUT":
                    per = int(np.prod(ctx.shapes[name][1:]))
                    acc(grid, (128,), (np.uint64(ctx.addresses[name]), np.uint64(ctx.addresses[out]),
                                       np.int32(B), np.int32(K), np.int64(per)))

    fake = make_fake_trt(version="10.99.0-fake", kernel=kernel, name=FAKE_MODULE)
    sys.modules[FAKE_MODULE] = fake
    io = [{"name": n, "shape": [-1, -1, f], "dtype": "FLOAT", "mode": "INPUT",
           "profile": [[1, 1, f], [4, 16, f], [8, 64, f]]} for n, f in (("text", 24), ("audio", 10))]
    io.append({"name": "output", "shape": [-1, 3], "dtype": "FLOAT", "mode": "OUTPUT"})
    path = tmp / "fake.engine"
    path.write_bytes(MAGIC + json.dumps({"io": io, "version": fake.__version__}).encode())
    return path, fake


def _fake_expect(feeds, K=3):
    B = next(iter(feeds.values())).shape[0]
    out = np.tile(0.5 * np.arange(K, dtype=np.float32), (B, 1))
    for v in feeds.values():
        out += v.reshape(B, -1).mean(axis=1, keepdims=True)
    return out


def step_engine_device_path(tmp: Path):
    """Engine.run on real device memory: every input/output path and CUDA graph replay."""
    _need_cuda_python()
    torch = _cuda_torch()
    cupy = _cupy()
    from cm_deploy.errors import UserError
    from cm_deploy.runtime.engine import Engine
    path, fake = _fake_engine(tmp)
    eng = Engine(path, trt_module=FAKE_MODULE, cuda_graph=True, graph_max_batch=4)
    rng = np.random.default_rng(0)

    def host(b, L):
        return {"text": rng.standard_normal((b, L, 24), dtype=np.float32),
                "audio": rng.standard_normal((b, L, 10), dtype=np.float32)}

    detail = {}
    # host inputs, graph path (batch <= 4): capture once, replay with new values at the same addresses
    f1 = host(2, 16)
    assert np.allclose(eng.run(f1)["output"], _fake_expect(f1), atol=1e-5)
    f2 = host(2, 16)
    assert np.allclose(eng.run(f2)["output"], _fake_expect(f2), atol=1e-5), "graph replay used stale inputs"
    detail["graph_after_host_runs"] = {"captures": eng.graphs.captures, "replays": eng.graphs.replays}
    assert eng.graphs.captures == 1 and eng.graphs.replays == 1, detail
    # batch above graph_max_batch: plain enqueue
    f3 = host(6, 20)
    assert np.allclose(eng.run(f3)["output"], _fake_expect(f3), atol=1e-5)
    assert eng.graphs.captures == 1
    # torch CUDA inputs: bound by pointer
    tin = {k: torch.from_numpy(v).cuda() for k, v in f1.items()}
    out = eng.run(tin)["output"]
    assert all(eng.last_bindings[k] == v.data_ptr() for k, v in tin.items()), "torch inputs were copied"
    assert np.allclose(out, _fake_expect(f1), atol=1e-5)
    # CuPy inputs, device outputs (DeviceArray) taken by torch without a copy
    cin = {k: cupy.asarray(v) for k, v in f2.items()}
    dout = eng.run(cin, device_outputs=True)["output"]
    assert all(eng.last_bindings[k] == int(v.data.ptr) for k, v in cin.items()), "cupy inputs were copied"
    tview = torch.as_tensor(dout, device="cuda")
    assert tview.data_ptr() == dout.ptr
    assert np.allclose(tview.cpu().numpy(), _fake_expect(f2), atol=1e-5)
    # out=: the result lands in caller-owned memory
    target = torch.empty((2, 3), device="cuda")
    res = eng.run(f1, out={"output": target})["output"]
    torch.cuda.synchronize()
    assert res is target and eng.last_bindings["output"] == target.data_ptr()
    assert np.allclose(target.cpu().numpy(), _fake_expect(f1), atol=1e-5)
    # checks on the host, before the GPU: outside the profile, wrong dtype, wrong name
    n_exec = sum(1 for c in fake.calls if c[0] == "execute")
    errors = {}
    for label, bad in (("outside_profile", host(2, 65)),
                       ("dtype", {k: v.astype(np.float64) for k, v in f1.items()}),
                       ("name", {"txt": f1["text"], "audio": f1["audio"]})):
        try:
            eng.run(bad)
            raise AssertionError(f"{label}: accepted")
        except UserError as e:
            errors[label] = str(e)
    assert sum(1 for c in fake.calls if c[0] == "execute") == n_exec, "a rejected input reached the GPU"
    detail["errors"] = errors
    detail["graph_final"] = {"captures": eng.graphs.captures, "replays": eng.graphs.replays}
    eng.close()
    return detail


def step_ort(state):
    onnx_path = state.get("portable")
    if not onnx_path:
        raise Skip("no portable ONNX (give --onnx, or the export step must succeed)")
    from cm_deploy.runtime.ort_backend import OrtBackend
    from cm_deploy.runtime.parity import run_parity, default_shapes
    from cm_deploy.runtime.torch_backend import TorchBackend
    ckpt = state.get("onnx_ckpt") or state.get("ckpt")
    ort_b = OrtBackend(onnx_path, device="cpu")
    try:
        ref = TorchBackend(ckpt, device="cpu", scan_impl="reference")
    except Exception as e:
        raise Skip(f"no checkpoint for the reference: {e}")
    same_model = ref.config == ort_b.config
    if not same_model:
        return {"note": "the ONNX was not exported from this checkpoint; ran it only", "inputs": [str(s) for s in ort_b.inputs],
                "output": ort_b.run(_feeds(ort_b.inputs, 1, [8] * len(ort_b.inputs)))["output"].tolist()}
    rep = run_parity(ref, ort_b, default_shapes([ort_b]))
    assert rep["ok"], rep
    return {"parity_max_abs": max(o["max_abs"] for c in rep["cases"] for o in c["outputs"])}


def step_export(tmp: Path, state: dict):
    if "ckpt" not in state:
        raise Skip("no checkpoint")
    try:
        from cm_deploy.export import export_checkpoint
    except ImportError as e:
        raise Skip(f"export unavailable here: {e}")
    m = export_checkpoint(state["ckpt"], tmp / "export")
    state["onnx"] = str(tmp / "export" / m["files"]["tensorrt"])
    state["portable"] = str(tmp / "export" / m["files"]["portable"])
    state["onnx_ckpt"] = state["ckpt"]
    return {"files": m["files"], "dtype": m["dtype"]}


def _child(args_list, timeout=600):
    cmd = [sys.executable, str(Path(__file__).resolve())] + args_list
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "timeout": True}
    res = None
    for line in p.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            res = json.loads(line[len(CHILD_TAG):])
    return {"rc": p.returncode, "result": res, "stdout_tail": p.stdout[-2000:], "stderr_tail": p.stderr[-3000:]}


def step_trt_build(args, onnx_path, engine_path, plugin, state, key):
    if not args.trt_module:
        raise Skip("no --trt-module given")
    if not onnx_path:
        raise Skip("no ONNX file (give --onnx, or the export step must succeed)")
    cargs = ["--child", "build", "--onnx", str(onnx_path), "--engine", str(engine_path), "--trt-module", args.trt_module]
    if plugin:
        cargs += ["--plugin", str(plugin)]
    r = _child(cargs)
    ok = r.get("rc") == 0 and r.get("result") and r["result"].get("ok")
    if ok:
        state.setdefault("engines", []).append(str(engine_path))
        return r
    raise RuntimeError(f"build failed (rc {r.get('rc')}): "
                       f"{(r.get('result') or {}).get('error') or r.get('stderr_tail', '')[-600:]}")


def step_trt_load(args, engine_path, plugin):
    if not args.trt_module:
        raise Skip("no --trt-module given")
    if not Path(engine_path).is_file():
        raise Skip("no engine was built")
    cargs = ["--child", "load", "--engine", str(engine_path), "--trt-module", args.trt_module]
    if plugin:
        cargs += ["--plugin", str(plugin)]
    r = _child(cargs)
    res = r.get("result") or {}
    if r.get("rc") == 0 and res.get("ok"):
        return r            # loaded and ran (a GPU this TensorRT flavour supports)
    if r.get("rc") == 0 and res.get("user_error"):
        # the expected outcome for TensorRT-RTX on an H100: a clean one-line refusal
        return {"refused_cleanly": True, "message": res["user_error"], "rc": r["rc"]}
    raise RuntimeError(f"engine load neither ran nor failed cleanly (rc {r.get('rc')}): "
                       f"{res.get('error') or r.get('stderr_tail', '')[-600:]}")


# ---------------------------------------------------------------------------- child processes

def child_main(args):
    from cm_deploy.errors import UserError
    out = {"ok": False}
    try:
        if args.child == "build":
            from cm_deploy.runtime.builder import build_engine
            sc = build_engine(args.onnx, args.engine, plugin=args.plugin, trt_module=args.trt_module,
                              batch=(1, 2, 4), length=(1, 16, 64), timing_cache=str(args.engine) + ".cache")
            out = {"ok": True, "sidecar": sc}
        else:
            from cm_deploy.runtime.engine import Engine
            from cm_deploy.runtime.specs import ShapeChoice, random_feeds
            eng = Engine(args.engine, plugin=args.plugin, trt_module=args.trt_module)
            feeds = random_feeds(eng.inputs, ShapeChoice(2, {s.name: 8 for s in eng.inputs}))
            y = eng.run(feeds)
            out = {"ok": True, "outputs": {k: list(v.shape) for k, v in y.items()}}
    except UserError as e:
        out = {"ok": False, "user_error": str(e)}
    except BaseException as e:   # noqa: BLE001
        out = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
    print(CHILD_TAG + json.dumps(out, default=str), flush=True)
    return 0


# ---------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=False, default="runtime_check.json", help="JSON report path")
    ap.add_argument("--trt-module", default=None, help="tensorrt, tensorrt_rtx or tensorrt_rtx_bindings: build engines")
    ap.add_argument("--plugin", default=None, help="CoupledScan plugin library (for the TensorRT ONNX)")
    ap.add_argument("--onnx", default=None, help="an exported model.onnx (its model.portable.onnx is found by the manifest)")
    ap.add_argument("--ckpt", default=None, help="the checkpoint --onnx was exported from (default: the "
                                                   "manifest's path, when it exists here)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: GPU steps skip, nothing heavy runs")
    ap.add_argument("--child", choices=["build", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)

    meta = {"script": "tests/gpu/check_runtime.py", "args": vars(args),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    rec = Recorder(Path(args.out), meta)
    state: dict = {}
    with tempfile.TemporaryDirectory(prefix="cm-gpu-check-") as tmpd:
        tmp = Path(tmpd)
        if args.onnx:
            from cm_deploy.runtime.specs import manifest_for
            m = manifest_for(args.onnx) or {}
            state["onnx"] = str(Path(args.onnx).resolve())
            portable = (m.get("files") or {}).get("portable")
            if portable:
                state["portable"] = str(Path(args.onnx).resolve().parent / portable)
            if m.get("checkpoint", {}).get("path") and Path(m["checkpoint"]["path"]).is_file():
                state["onnx_ckpt"] = m["checkpoint"]["path"]
        if args.ckpt:
            state["onnx_ckpt"] = str(Path(args.ckpt).resolve())
        rec.step("env", step_env, args)
        rec.step("checkpoint", step_checkpoint, tmp, state)
        rec.step("cai_parse_cpu", step_cai_parse_cpu)
        rec.step("torch_backend_cpu", step_torch_cpu, state)
        rec.step("child_process_plumbing", step_child_plumbing, tmp)
        gpu = not args.smoke

        def gpu_step(name, fn, *a):
            if gpu:
                return rec.step(name, fn, *a)
            return rec.step(name, _skip, "--smoke: CPU dry run")

        gpu_step("cuda_python_device_buffers", step_device_buffers)
        gpu_step("cai_zero_copy_views_torch_cupy", step_cai_views)
        gpu_step("torch_backend_cpu_vs_cuda", step_torch_cpu_vs_cuda, state)
        for producer in ("torch", "cupy", "devicearray"):
            gpu_step(f"torch_backend_cuda_inputs_{producer}", step_torch_device_inputs, state, producer)
        gpu_step("torch_backend_cuda_graph", step_torch_cuda_graph, state)
        gpu_step("runtime_cuda_graph_cuda_python", step_runtime_cuda_graph)
        gpu_step("engine_device_path_stand_in_trt", step_engine_device_path, tmp)
        if not args.onnx:
            if args.smoke:
                rec.step("export", _skip, "--smoke: export skipped (slow on a CPU)")
            else:
                rec.step("export", step_export, tmp, state)
        rec.step("onnxruntime_portable_vs_reference", step_ort, state)
        plugin = args.plugin
        if args.trt_module and not args.smoke:
            eng_p, eng_t = tmp / "portable.engine", tmp / "tensorrt.engine"
            rec.step("trt_build_portable_onnx", step_trt_build, args, state.get("portable"), eng_p, None, state, "p")
            rec.step("trt_build_tensorrt_onnx_with_plugin", step_trt_build, args, state.get("onnx"), eng_t, plugin,
                     state, "t")
            rec.step("trt_load_portable_engine", step_trt_load, args, eng_p, None)
            rec.step("trt_load_tensorrt_engine", step_trt_load, args, eng_t, plugin)
        else:
            reason = "--smoke" if args.smoke else "no --trt-module given"
            for n in ("trt_build_portable_onnx", "trt_build_tensorrt_onnx_with_plugin", "trt_load_portable_engine",
                      "trt_load_tensorrt_engine"):
                rec.step(n, _skip, reason)
    rec.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rec.write()
    s = {k: sum(1 for r in rec.steps if r["status"] == k) for k in ("pass", "fail", "skip")}
    print(f"summary: {s['pass']} pass, {s['fail']} fail, {s['skip']} skip -> {args.out}")
    return 1 if s["fail"] else 0


def _skip(reason):
    raise Skip(reason)


if __name__ == "__main__":
    sys.exit(main())
