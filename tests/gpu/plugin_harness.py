#!/usr/bin/env python3
"""GPU harness for the CoupledScan plugin: the plugin's own enqueue against the PyTorch reference.

The plugin is driven through libcoupled_scan_harness.so (tests/harness_shim.cpp), which does what
TensorRT does: createPlugin(kBUILD) with parser-typed fields, format/type/shape queries,
configurePlugin with dynamic batch and L, serialization, createPlugin(kRUNTIME) from the serialized
fields, attachToContext, onShapeChange and enqueue with PluginTensorDesc and device pointers on the
current torch stream. Outputs start as NaN so that anything the kernel fails to write shows up.

    python tests/gpu/plugin_harness.py --lib-dir build/gpu/plugins/trt_coupled_scan --out results.json
    python tests/gpu/plugin_harness.py --lib-dir ... --sanitize          # a few tiny cases, for compute-sanitizer
    python tests/gpu/plugin_harness.py --lib-dir ... --bench [--tune]    # timings of the target shapes, each tactic
    python tests/gpu/plugin_harness.py --lib-dir ... --impl triton       # every case on the Triton kernels (CM_DEPLOY_SCAN_IMPL)
    python tests/gpu/plugin_harness.py --lib-dir ... --self-test         # CPU only: the kernel's code, emulated, vs the reference

Exit status: 0 when every case passes, 1 when one fails, 2 on a setup error.
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cm_deploy.ops.reference import coupled_scan_reference  # noqa: E402

DTYPES = {"float32": (torch.float32, 0), "float16": (torch.float16, 1), "bfloat16": (torch.bfloat16, 2)}
# max |y - ref| / max |ref|, the reference computed in float32 from the same (rounded) inputs.
# Low precision: y is rounded to the output type (2^-11 relative for float16, 2^-8 for bfloat16).
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
FINAL_TOL = 2e-5  # final_state is float32 whatever the activation type


# ------------------------------------------------------------------------------------------------
# Bindings

class Harness:
    def __init__(self, lib_dir: Path):
        plugin = lib_dir / "libcoupled_scan_plugin.so"
        shim = lib_dir / "libcoupled_scan_harness.so"
        for p in (plugin, shim):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found (build with BUILD_TESTING=ON)")
        self.plugin = ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(str(shim))
        lib.cmh_create.restype = ctypes.c_void_p
        lib.cmh_create.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_int64), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.cmh_tactics.restype = ctypes.c_int
        lib.cmh_tactics.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cmh_enqueue.restype = ctypes.c_int
        lib.cmh_enqueue.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_void_p),
                                    ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_char_p, ctypes.c_int]
        lib.cmh_workspace_size.restype = ctypes.c_longlong
        lib.cmh_workspace_size.argtypes = [ctypes.c_void_p]
        lib.cmh_destroy.restype = None
        lib.cmh_destroy.argtypes = [ctypes.c_void_p]
        lib.cmh_emulate.restype = ctypes.c_int
        lib.cmh_emulate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.POINTER(ctypes.c_int64),
                                    ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                    ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib = lib

    @staticmethod
    def _shape(shape):
        return (ctypes.c_int64 * 5)(*shape)

    def create(self, dtype: str, softplus: int, kappa: float, has_initial: bool, has_final: bool, shape, tactic=0):
        """tactic: 0 the plugin's default (automatic), 1 the CUDA kernel, 2 the Triton kernels (as TensorRT's
        builder sets its pick before serializing)."""
        err = ctypes.create_string_buffer(8192)
        h = self.lib.cmh_create(DTYPES[dtype][1], int(softplus), float(kappa), int(has_initial), int(has_final),
                                self._shape(shape), int(tactic), err, len(err))
        if not h:
            raise RuntimeError(f"cmh_create failed: {err.value.decode(errors='replace')}")
        return h

    def tactics(self, h):
        """The tactics the plugin offered for the handle's shape at build time (getValidTactics)."""
        out = (ctypes.c_int * 4)()
        n = self.lib.cmh_tactics(h, out, 4)
        return list(out[:max(n, 0)])

    def ran(self, h, L, tactic=0):
        """Which implementation an enqueue of this handle runs: CM_DEPLOY_SCAN_IMPL, else the tactic, else
        automatic (Triton where the plugin offered it); at L = 0 nothing is scanned (the CUDA launcher
        writes final_state)."""
        want = os.environ.get("CM_DEPLOY_SCAN_IMPL", "auto") or "auto"
        if want == "auto":
            want = {1: "cuda", 2: "triton"}.get(tactic, "auto")
        if want == "cuda" or L == 0:
            return "cuda"
        return "triton" if 2 in self.tactics(h) else ("cuda" if want == "auto" else "unavailable")

    def workspace(self, h, device):
        """The workspace the plugin asked for (getWorkspaceSize), allocated once per handle, as TensorRT does."""
        cache = self.__dict__.setdefault("_ws", {})
        if h not in cache:
            n = int(self.lib.cmh_workspace_size(h))
            cache[h] = torch.empty(max(n, 0), dtype=torch.uint8, device=device) if n > 0 else None
        return cache[h]

    def enqueue(self, h, shape, inputs, outputs, stream=None):
        err = ctypes.create_string_buffer(8192)
        ws = self.workspace(h, inputs[0].device)
        ins = (ctypes.c_void_p * len(inputs))(*[t.data_ptr() for t in inputs])
        outs = (ctypes.c_void_p * len(outputs))(*[t.data_ptr() for t in outputs])
        if stream is None:
            stream = torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0
        wsp = ctypes.c_void_p(ws.data_ptr()) if ws is not None else None
        rc = self.lib.cmh_enqueue(h, self._shape(shape), ins, outs, wsp, ctypes.c_void_p(stream), err, len(err))
        if rc != 0:
            raise RuntimeError(f"enqueue returned {rc}: {err.value.decode(errors='replace')}")

    def destroy(self, h):
        self.__dict__.get("_ws", {}).pop(h, None)
        self.lib.cmh_destroy(h)

    def emulate(self, dtype, softplus, kappa, shape, inputs, outputs, npt=0, tc=0):
        """The kernel's code on the CPU (host tensors)."""
        ins = (ctypes.c_void_p * len(inputs))(*[t.data_ptr() for t in inputs])
        outs = (ctypes.c_void_p * len(outputs))(*[t.data_ptr() for t in outputs])
        rc = self.lib.cmh_emulate(DTYPES[dtype][1], int(softplus), float(kappa), self._shape(shape), ins, len(inputs),
                                  outs, len(outputs), int(npt), int(tc))
        if rc != 0:
            raise RuntimeError(f"cmh_emulate returned {rc}")


# ------------------------------------------------------------------------------------------------
# Problems

def make_inputs(batch, M, L, E, N, dtype, softplus, has_initial, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    act = DTYPES[dtype][0]

    def rnd(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, generator=g)).to(device)

    u = rnd(batch, M, L, E)
    # Without softplus dt = delta + bias is used as is: keep it positive (stable scan).
    delta = rnd(batch, M, L, E, scale=1.0, shift=-1.0) if softplus else rnd(batch, M, L, E, scale=0.1, shift=0.5)
    A = -torch.exp(torch.log(torch.tensor(0.5)) + 2.5 * torch.rand(M, E, N, generator=g)).to(device)
    B = rnd(batch, M, L, N)
    C = rnd(batch, M, L, N)
    D = rnd(M, E)
    z = rnd(batch, M, L, E)
    bias = rnd(M, E, scale=0.3 if softplus else 0.05)
    init = rnd(batch, E, N) if has_initial else None
    acts = [t.to(act).contiguous() for t in (u, delta, B, C, z)]
    u, delta, B, C, z = acts
    return dict(u=u, delta=delta, A=A.contiguous(), B=B, C=C, D=D.contiguous(), z=z, bias=bias.contiguous(),
                init=None if init is None else init.contiguous())


def reference(x, softplus, kappa):
    y, fin = coupled_scan_reference(x["u"].float(), x["delta"].float(), x["A"], x["B"].float(), x["C"].float(),
                                    x["D"], x["z"].float(), x["bias"], delta_softplus=bool(softplus),
                                    coupling_scale=kappa, initial_state=x["init"], return_final_state=True)
    return y.float(), fin.float()


def run_plugin(h: Harness, handle, x, shape, has_final):
    batch, M, L, E, N = shape
    y = torch.full_like(x["u"], float("nan"))
    fin = torch.full((batch, E, N), float("nan"), device=x["u"].device, dtype=torch.float32)
    inputs = [x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"]]
    if x["init"] is not None:
        inputs.append(x["init"])
    outputs = [y, fin] if has_final else [y]
    h.enqueue(handle, shape, inputs, outputs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return y, (fin if has_final else None)


def errors(got, ref):
    """max |got - ref|, that normalized by max |ref|, and max |got - ref| / (|ref| + 1e-3 max |ref|)."""
    got = got.float()
    ref = ref.float()
    if got.numel() == 0:
        return dict(max_abs=0.0, norm_err=0.0, max_rel=0.0, nonfinite=0)
    nonfinite = int((~torch.isfinite(got)).sum().item())
    scale = ref.abs().max().item()
    diff = (got - ref).abs()
    max_abs = diff.max().item() if nonfinite == 0 else math.inf
    denom = ref.abs() + 1e-3 * max(scale, 1e-30)
    max_rel = (diff / denom).max().item() if nonfinite == 0 else math.inf
    return dict(max_abs=max_abs, norm_err=max_abs / max(scale, 1e-30), max_rel=max_rel, nonfinite=nonfinite)


# ------------------------------------------------------------------------------------------------
# Cases

def kappa_of(spec, M):
    return 1.0 / M if spec == "1/M" else float(spec)


def correctness_cases(sanitize=False):
    # (name, batch, M, L, E, N, softplus, kappa, initial, final)
    if sanitize:
        return [
            ("tiny", 2, 3, 5, 7, 6, 1, "1/M", True, True),
            ("tiny_L1_b1", 1, 3, 1, 5, 16, 0, "1/M", False, True),
            ("tiny_npt_small", 1, 2, 9, 3, 64, 1, "1", False, False),
            ("tiny_m5", 2, 5, 4, 9, 10, 0, "1/M", True, False),
            ("tiny_segmented", 1, 2, 300, 5, 8, 1, "1/M", True, True),  # batch 1, long L: L split in 2
            # shapes the Triton kernels take (E % 16 == 0, N 16): the CUDA kernel runs them too
            ("tiny_e16", 2, 3, 5, 16, 16, 1, "1/M", True, True),
            ("tiny_e16_segmented", 1, 2, 300, 16, 16, 1, "1/M", True, True),
        ]
    return [
        ("paper_small", 4, 3, 64, 256, 64, 1, "1/M", False, False),
        ("paper_stream_vars", 4, 3, 64, 256, 64, 1, "1/M", True, True),
        ("batch1_L1", 1, 3, 1, 256, 64, 1, "1/M", True, True),
        ("L1", 5, 3, 1, 48, 16, 0, "1/M", False, True),
        ("odd_E_N", 3, 3, 37, 129, 37, 1, "1/M", True, True),
        ("odd_E_N_nosoftplus", 2, 3, 50, 100, 7, 0, "1/M", False, False),
        ("mamba_M1_kappa1", 2, 1, 80, 96, 16, 1, "1", True, True),
        ("M2", 3, 2, 40, 64, 32, 1, "1/M", False, True),
        ("M4_N128", 2, 4, 30, 64, 128, 1, "1/M", False, False),
        ("M8_N5", 2, 8, 20, 33, 5, 1, "1/M", True, True),
        ("N512", 1, 3, 20, 16, 512, 1, "1/M", False, True),
        ("kappa1_M3_short", 2, 3, 12, 64, 16, 0, "1", False, True),
        ("batch1_long", 1, 3, 4096, 256, 64, 1, "1/M", False, True),
        ("batch64_paper", 64, 3, 500, 256, 64, 1, "1/M", False, False),
    ]


def check_case(h, name, batch, M, L, E, N, softplus, kspec, has_initial, has_final, dtype, device, seed):
    shape = (batch, M, L, E, N)
    kappa = kappa_of(kspec, M)
    x = make_inputs(batch, M, L, E, N, dtype, softplus, has_initial, device, seed)
    handle = h.create(dtype, softplus, kappa, has_initial, has_final, shape)
    impl = h.ran(handle, L)
    try:
        if impl == "unavailable":
            return not_applicable(name, dtype, shape)
        y, fin = run_plugin(h, handle, x, shape, has_final)
    finally:
        h.destroy(handle)
    ry, rfin = reference(x, softplus, kappa)
    e = errors(y, ry)
    res = dict(case=name, dtype=dtype, shape=dict(batch=batch, M=M, L=L, E=E, N=N), softplus=softplus,
               kappa=kappa, initial_state=has_initial, final_state=has_final, impl=impl, **e)
    ok = e["nonfinite"] == 0 and e["norm_err"] <= TOL[dtype]
    if has_final:
        ef = errors(fin, rfin)
        res["final_norm_err"] = ef["norm_err"]
        res["final_nonfinite"] = ef["nonfinite"]
        ok = ok and ef["nonfinite"] == 0 and ef["norm_err"] <= FINAL_TOL
    res["passed"] = bool(ok)
    return res


def not_applicable(name, dtype, shape):
    """CM_DEPLOY_SCAN_IMPL=triton on a shape no Triton kernel takes (the plugin would refuse the enqueue)."""
    return dict(case=name, dtype=dtype, shape=dict(zip(("batch", "M", "L", "E", "N"), shape)), impl="n/a",
                norm_err=0.0, passed=True, not_run="no Triton kernel for this shape and type")


def check_streaming(h, dtype, device, seed):
    """Two pieces, the second from the first's final state, equal one run (DESIGN.md section 2)."""
    batch, M, L, E, N, L1 = 3, 3, 75, 80, 64, 31
    kappa = 1.0 / M
    x = make_inputs(batch, M, L, E, N, dtype, 1, True, device, seed)
    # One handle for the whole run and the pieces: different L exercises onShapeChange.
    handle = h.create(dtype, 1, kappa, True, True, (batch, M, L, E, N))
    impl = h.ran(handle, L)
    try:
        if impl == "unavailable":
            return not_applicable("streaming_two_pieces", dtype, (batch, M, L, E, N))
        y_all, fin_all = run_plugin(h, handle, x, (batch, M, L, E, N), True)

        def piece(lo, hi, init):
            p = {k: (v[:, :, lo:hi].contiguous() if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
            p["init"] = init
            return p

        p1 = piece(0, L1, x["init"])
        y1, fin1 = run_plugin(h, handle, p1, (batch, M, L1, E, N), True)
        p2 = piece(L1, L, fin1)
        y2, fin2 = run_plugin(h, handle, p2, (batch, M, L - L1, E, N), True)
    finally:
        h.destroy(handle)
    y_cat = torch.cat([y1, y2], dim=2)
    ey = errors(y_cat, y_all)
    ef = errors(fin2, fin_all)
    ry, rfin = reference(x, 1, kappa)
    eref = errors(y_all, ry)
    exact = bool(torch.equal(y_cat, y_all) and torch.equal(fin2, fin_all))
    ok = (ey["nonfinite"] == 0 and ey["norm_err"] <= TOL["float32"] and ef["norm_err"] <= FINAL_TOL
          and eref["norm_err"] <= TOL[dtype])
    return dict(case="streaming_two_pieces", dtype=dtype, impl=impl, shape=dict(batch=batch, M=M, L=L, E=E, N=N, L1=L1),
                pieces_vs_one_norm_err=ey["norm_err"], final_norm_err=ef["norm_err"], bitwise_equal=exact,
                norm_err=eref["norm_err"], max_abs=eref["max_abs"], max_rel=eref["max_rel"], passed=bool(ok))


def check_kappa1_overflow(h, device, seed):
    """kappa = 1, M = 3: the state grows like ~M^t and overflows float32; the plugin must follow the math:
    finite exactly where the reference is (up to the step where overflow starts) and accurate there."""
    batch, M, L, E, N = 2, 3, 160, 32, 16
    x = make_inputs(batch, M, L, E, N, "float32", 1, False, device, seed)
    # Slow decay (|A| small) and dt ~ 1: the coupled transition sum_m exp(dt*A) is ~2-3, so the
    # state overflows float32 within ~100 steps.
    x["delta"] = (x["delta"] + 1.5).contiguous()
    x["A"] = (-(0.05 + 0.2 * torch.rand(M, E, N, generator=torch.Generator().manual_seed(seed)))).to(device).contiguous()
    handle = h.create("float32", 1, 1.0, False, True, (batch, M, L, E, N))
    impl = h.ran(handle, L)
    try:
        if impl == "unavailable":
            return not_applicable("kappa1_overflow", "float32", (batch, M, L, E, N))
        y, fin = run_plugin(h, handle, x, (batch, M, L, E, N), True)
    finally:
        h.destroy(handle)
    ry, _ = reference(x, 1, 1.0)
    fin_ref = torch.isfinite(ry)
    fin_got = torch.isfinite(y)
    # First time step with a non-finite value, per (batch, modality, channel).
    def first_bad(mask):
        bad = (~mask).float()
        t = torch.arange(L, device=mask.device).view(1, 1, L, 1).float()
        first = torch.where(bad > 0, t, torch.full_like(t.expand_as(bad), float(L)))
        return first.min(dim=2).values
    fb_ref, fb_got = first_bad(fin_ref), first_bad(fin_got)
    overflowed = bool((~fin_ref).any().item())
    step_gap = (fb_ref - fb_got).abs().max().item()
    # Accuracy on the steps that are finite everywhere, relative to each step's own scale.
    t_ok = int(fb_ref.min().item())
    worst = 0.0
    for t in range(0, t_ok, max(1, t_ok // 20)):
        e = errors(y[:, :, t], ry[:, :, t])
        worst = max(worst, e["norm_err"])
    ok = overflowed and step_gap <= 1 and worst <= 1e-4
    return dict(case="kappa1_overflow", dtype="float32", impl=impl, shape=dict(batch=batch, M=M, L=L, E=E, N=N),
                reference_overflows=overflowed, first_overflow_step=t_ok, first_step_gap=step_gap,
                norm_err=worst, passed=bool(ok),
                note="per-step normalized error on steps before overflow; overflow step must match within 1")


# ------------------------------------------------------------------------------------------------
# Timing

def bench(h, device, shapes=None, iters=20):
    shapes = shapes or [("paper_batch64", 64, 3, 500, 256, 64), ("batch1_L16384", 1, 3, 16384, 256, 64),
                        ("batch8_L2000", 8, 3, 2000, 256, 64)]
    out = []
    forced = os.environ.get("CM_DEPLOY_SCAN_IMPL", "auto") not in ("", "auto")
    for name, batch, M, L, E, N in shapes:
        for dtype, tactic in itertools.product(("float16", "bfloat16", "float32"), (0,) if forced else (1, 2)):
            shape = (batch, M, L, E, N)
            x = make_inputs(batch, M, L, E, N, dtype, 1, False, device, 1)
            try:
                handle = h.create(dtype, 1, 1.0 / M, False, False, shape, tactic=tactic)
            except RuntimeError as exc:   # the Triton tactic is not offered for this shape
                out.append(dict(case=name, dtype=dtype, tactic=tactic, skipped=str(exc).splitlines()[0]))
                continue
            impl = h.ran(handle, L, tactic)
            try:
                y = torch.empty_like(x["u"])
                ins = [x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"]]
                for _ in range(3):
                    h.enqueue(handle, shape, ins, [y])
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    h.enqueue(handle, shape, ins, [y])
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / iters
            finally:
                h.destroy(handle)
            elem = x["u"].element_size()
            moved = (4 * batch * M * L * E + 2 * batch * M * L * N) * elem  # u, delta, z, y; B, C
            out.append(dict(case=name, dtype=dtype, tactic=tactic, impl=impl, shape=dict(batch=batch, M=M, L=L, E=E, N=N), ms=ms,
                            gbps=moved / ms / 1e6,
                            state_steps_per_s=batch * M * L * E * N / ms * 1e3,
                            env={k: v for k, v in os.environ.items() if k.startswith("CM_DEPLOY_SCAN_")}))
            print(f"  bench {name:16s} {dtype:9s} {impl:6s} {ms:8.3f} ms  {moved / ms / 1e6:7.1f} GB/s", flush=True)
            del x
            torch.cuda.empty_cache()
    return out


def tune(args):
    """Re-runs --bench under each CM_DEPLOY_SCAN_NPT (read once per process) and collects the timings."""
    rows = []
    # the block kernel at every states-per-thread setting
    for npt in ["", "1", "2", "4", "8"]:
        env = dict(os.environ)
        env.pop("CM_DEPLOY_SCAN_NPT", None)
        if npt:
            env["CM_DEPLOY_SCAN_NPT"] = npt
        label = npt or "auto"
        tmp = Path(args.out or "plugin_harness.json").with_suffix(f".tune{label}.json")
        cmd = [sys.executable, __file__, "--lib-dir", str(args.lib_dir), "--bench-only", "--out", str(tmp)]
        print(f"tune: CM_DEPLOY_SCAN_NPT={npt or 'auto'}", flush=True)
        r = subprocess.run(cmd, env=env)
        if r.returncode == 0 and tmp.is_file():
            rows += [dict(npt=label, **b) for b in json.loads(tmp.read_text()).get("bench", [])]
    return rows


# ------------------------------------------------------------------------------------------------

def print_table(rows):
    print(f"{'case':24s} {'dtype':9s} {'impl':6s} {'max_abs':>10s} {'norm_err':>10s} {'max_rel':>10s} {'final_err':>10s}  ok")
    for r in rows:
        fe = r.get("final_norm_err")
        ok = "n/a" if r.get("not_run") else ("PASS" if r["passed"] else "FAIL")
        print(f"{r['case']:24s} {r['dtype']:9s} {r.get('impl', '-'):6s} {r.get('max_abs', float('nan')):10.3e} "
              f"{r['norm_err']:10.3e} {r.get('max_rel', float('nan')):10.3e} "
              f"{'' if fe is None else format(fe, '10.3e'):>10s}  {ok}", flush=True)


def self_test(h: Harness):
    """CPU only: every plugin variant is created through the bindings, and the kernel's code (emulated
    on the CPU, every states-per-thread setting) is held against cm_deploy's PyTorch reference."""
    rows = []
    cases = correctness_cases(sanitize=True) + [("odd_chunks", 2, 3, 23, 13, 33, 1, "1/M", True, True),
                                                  ("mamba_M1", 1, 1, 17, 8, 16, 1, "1", True, True)]
    seed = 0
    for (name, batch, M, L, E, N, sp, ks, ini, fin) in cases:
        for dtype in DTYPES:
            shape = (batch, M, L, E, N)
            kappa = kappa_of(ks, M)
            handle = h.create(dtype, sp, kappa, ini, fin, shape)
            h.destroy(handle)
            for npt in (0, 1, 2, 8):
                if npt > N:
                    continue  # never chosen: the thread would hold padding only
                seed += 1
                x = make_inputs(batch, M, L, E, N, dtype, sp, ini, "cpu", seed)
                y = torch.full_like(x["u"], float("nan"))
                f = torch.full((batch, E, N), float("nan"))
                ins = [x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["bias"]]
                if ini:
                    ins.append(x["init"])
                h.emulate(dtype, sp, kappa, shape, ins, [y, f] if fin else [y], npt=npt, tc=3 if npt else 0)
                ry, rf = reference(x, sp, kappa)
                e = errors(y, ry)
                ok = e["nonfinite"] == 0 and e["norm_err"] <= TOL[dtype]
                row = dict(case=f"{name}/npt{npt or 'auto'}", dtype=dtype, **e)
                if fin:
                    ef = errors(f, rf)
                    row["final_norm_err"] = ef["norm_err"]
                    ok = ok and ef["nonfinite"] == 0 and ef["norm_err"] <= FINAL_TOL
                row["passed"] = bool(ok)
                rows.append(row)
    try:
        h.create("float32", 0, -1.0, False, False, (1, 3, 4, 5, 6))
        rows.append(dict(case="refuses_bad_scale", dtype="-", max_abs=0.0, norm_err=0.0, max_rel=0.0, passed=False))
    except RuntimeError as exc:
        rows.append(dict(case="refuses_bad_scale", dtype="-", max_abs=0.0, norm_err=0.0, max_rel=0.0,
                         passed="coupling_scale" in str(exc)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib-dir", type=Path, required=True,
                    help="folder holding libcoupled_scan_plugin.so and libcoupled_scan_harness.so")
    ap.add_argument("--out", type=Path, help="write results as JSON here")
    ap.add_argument("--sanitize", action="store_true", help="a few tiny cases (for compute-sanitizer)")
    ap.add_argument("--bench", action="store_true", help="also time the target shapes")
    ap.add_argument("--bench-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tune", action="store_true", help="with --bench: also time every states-per-thread setting")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--self-test", action="store_true", help="CPU only: check bindings and metrics")
    ap.add_argument("--impl", choices=("auto", "cuda", "triton"),
                    help="CM_DEPLOY_SCAN_IMPL for this run: every case on that implementation (triton: the "
                         "cases no Triton kernel takes are listed as n/a, not run)")
    args = ap.parse_args()
    if args.impl:
        os.environ["CM_DEPLOY_SCAN_IMPL"] = args.impl   # read by the plugin at its first enqueue

    try:
        h = Harness(args.lib_dir)
    except (OSError, FileNotFoundError) as exc:
        print(f"plugin_harness: {exc}", file=sys.stderr)
        return 2
    report = dict(host=platform.node(), torch=torch.__version__, started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  env={k: v for k, v in os.environ.items() if k.startswith("CM_DEPLOY_")})
    if args.self_test:
        rows = self_test(h)
        print_table(rows)
        report.update(mode="self-test", cases=rows, passed=all(r["passed"] for r in rows))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        return 0 if report["passed"] else 1

    if not torch.cuda.is_available():
        print("plugin_harness: no CUDA device (use --self-test on a CPU machine)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    report["device"] = torch.cuda.get_device_name(0)
    report["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    print(f"device: {report['device']} (sm_{report['capability'].replace('.', '')}), torch {torch.__version__}",
          flush=True)

    rows = []
    if not args.bench_only:
        dtypes = [d for d in args.dtypes.split(",") if d]
        seed = 0
        for case in correctness_cases(args.sanitize):
            for dtype in dtypes:
                seed += 1
                try:
                    rows.append(check_case(h, *case, dtype, device, seed))
                except Exception as exc:  # one broken case must not hide the others
                    rows.append(dict(case=case[0], dtype=dtype, norm_err=math.inf, passed=False, error=str(exc)))
                torch.cuda.empty_cache()
        if not args.sanitize:
            for dtype in dtypes:
                try:
                    rows.append(check_streaming(h, dtype, device, 1000))
                except Exception as exc:
                    rows.append(dict(case="streaming_two_pieces", dtype=dtype, norm_err=math.inf, passed=False,
                                     error=str(exc)))
            try:
                rows.append(check_kappa1_overflow(h, device, 2000))
            except Exception as exc:
                rows.append(dict(case="kappa1_overflow", dtype="float32", norm_err=math.inf, passed=False,
                                 error=str(exc)))
        print_table(rows)
        for r in rows:
            if r.get("error"):
                print(f"  {r['case']} {r['dtype']}: {r['error']}", flush=True)
    report["cases"] = rows
    if args.bench or args.bench_only:
        report["bench"] = bench(h, device)
        if args.tune and not args.bench_only:
            report["tune"] = tune(args)
    report["passed"] = all(r["passed"] for r in rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    n_fail = sum(not r["passed"] for r in rows)
    n_na = sum(bool(r.get("not_run")) for r in rows)
    by_impl = {k: sum(r.get("impl") == k for r in rows) for k in ("cuda", "triton")}
    print(f"{len(rows) - n_fail - n_na}/{len(rows) - n_na} cases passed (ran on: {by_impl}"
          + (f"; {n_na} not run: no Triton kernel for the shape" if n_na else "") + ")", flush=True)
    if rows and n_na == len(rows):
        print("gpu_harness: no case ran (no Triton kernel in this build for these shapes?)", file=sys.stderr)
        return 1
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
