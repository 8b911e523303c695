"""First GPU check of the CoupledScan Triton kernels: correctness against the PyTorch reference at
the paper's shape and a long one, in float32 / float16 / bfloat16, plus first timings.

    python3 tests/gpu/check_ops.py --out $OUT/ops_check.json        # on the GPU (~3 min)
    python3 tests/gpu/check_ops.py --smoke --out /tmp/ops_smoke.json  # CPU, TRITON_INTERPRET=1

Every measurement is caught and recorded: one failure never stops the rest. The reference is a
Python loop over time (one set of small kernels per step), so it is timed once, and for the long
shape on a shorter L (said so in the record). Errors are reported as max |triton - ref| and that
divided by max |ref| (`rel`). For float16/bfloat16 inputs the reference runs in float32 on the same
rounded inputs ("vs fp32 ref"); y is also compared with the reference fed the low-precision tensors
themselves (its y rounded to the same dtype, "vs same-dtype ref").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

T_START = time.time()


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="ops_check.json", help="JSON report path")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes; on a machine without CUDA runs under TRITON_INTERPRET=1")
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds; later items are skipped (and recorded as skipped) past it")
    ap.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep")
    return ap.parse_args()


ARGS = parse()
if ARGS.smoke:
    try:
        import torch as _t  # noqa: F401
        _cuda = _t.cuda.is_available()
    except Exception:
        _cuda = False
    if not _cuda:
        # must be set before triton is imported (it decides interpretation at @jit time)
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
import triton  # noqa: E402

from cm_deploy.ops import coupled_scan  # noqa: E402
from cm_deploy.ops import triton_scan  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REPORT = {"meta": {}, "correctness": [], "timing": [], "sweep": [], "mamba": [], "errors": []}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# pass/fail hints only; the numbers are the result
TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def elapsed():
    return time.time() - T_START


def over_budget(what):
    if elapsed() > ARGS.budget:
        REPORT["errors"].append({"item": what, "error": f"skipped: time budget {ARGS.budget}s"})
        print(f"  [skip] {what}: past the {ARGS.budget:.0f}s budget")
        return True
    return False


def record_error(item, exc):
    tb = traceback.format_exc(limit=6)
    REPORT["errors"].append({"item": item, "error": f"{type(exc).__name__}: {exc}"[:2000],
                             "traceback": tb[-4000:]})
    print(f"  [error] {item}: {type(exc).__name__}: {str(exc)[:300]}")
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(b, M, L, E, N, seed=0):
    """Mamba-like magnitudes: A = -(1..N) (S4D-real init), dt = softplus(delta + bias) with the bias
    at softplus^-1 of dt in [1e-3, 1e-1] (Mamba's dt init), u, B, C, z ~ N(0, 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt0 = torch.exp(torch.rand(M, E, generator=g) * (math.log(0.1) - math.log(1e-3))
                    + math.log(1e-3))
    bias = dt0 + torch.log(-torch.expm1(-dt0))  # softplus^-1
    t = dict(
        u=torch.randn(b, M, L, E, generator=g),
        delta=torch.randn(b, M, L, E, generator=g) * 0.5,
        A=-torch.arange(1, N + 1, dtype=torch.float32).repeat(M, E, 1),
        B=torch.randn(b, M, L, N, generator=g),
        C=torch.randn(b, M, L, N, generator=g),
        D=torch.ones(M, E),
        z=torch.randn(b, M, L, E, generator=g),
        delta_bias=bias,
    )
    return {k: v.to(DEV) for k, v in t.items()}


ACT = ("u", "delta", "B", "C", "z")
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def cast(inp, dtype):
    return {k: (v.to(dtype) if k in ACT else v) for k, v in inp.items()}


def run(impl, inp, grad, wy=None, **tune):
    """y (and grads of sum(wy * y) when grad) of one implementation."""
    leaves = {k: v.detach().clone().requires_grad_(grad) for k, v in inp.items()}
    with triton_scan.tuning(**tune):
        with torch.set_grad_enabled(grad):
            y = coupled_scan(*[leaves[k] for k in ORDER], delta_softplus=True, impl=impl)
            grads = {}
            if grad:
                gs = torch.autograd.grad((y.float() * wy).sum(), [leaves[k] for k in ORDER])
                grads = {k: gk.detach() for k, gk in zip(ORDER, gs)}
    return y.detach(), grads


def err(a, b):
    a, b = a.double(), b.double()
    d = (a - b).abs()
    if not torch.isfinite(a).all():
        return {"max_abs": float("nan"), "ref_max": float(b.abs().max()), "rel": float("nan"),
                "nonfinite": int((~torch.isfinite(a)).sum())}
    m = float(b.abs().max())
    return {"max_abs": float(d.max()), "ref_max": m, "rel": float(d.max()) / m if m else 0.0}


def _check_one(name, shape, dname, dtype, base, wy):
    low = cast(base, dtype)
    ref_in = cast(low, torch.float32)  # the same rounded values, float32
    t0 = time.time()
    y_r, g_r = run("reference", ref_in, True, wy)
    sync()
    t_ref = time.time() - t0
    t0 = time.time()
    y_t, g_t = run("triton", low, True, wy)
    sync()
    t_tri = time.time() - t0
    rec = {"shape": name, "dims": shape, "dtype": dname, "y": err(y_t, y_r),
           "grads": {k: err(g_t[k], g_r[k]) for k in ORDER},
           "ref_wall_s": round(t_ref, 2), "triton_first_call_wall_s": round(t_tri, 2)}
    del g_r, g_t
    if dtype != torch.float32:
        y_rl, _ = run("reference", low, False)
        rec["y_vs_same_dtype_ref"] = err(y_t, y_rl)
    # the inference path (no checkpoints) must give the same y
    y_ng, _ = run("triton", low, False)
    rec["y_nograd_equal"] = bool(torch.equal(y_ng, y_t))
    worst = max([rec["y"]["rel"]] + [g["rel"] for g in rec["grads"].values()])
    rec["worst_rel"] = worst
    rec["ok"] = bool(worst <= TOL[dname]) and rec["y_nograd_equal"]
    return rec


def check_correctness(name, shape):
    b, M, L, E, N = shape
    base = make_inputs(*shape)
    wy = torch.randn(b, M, L, E, device=DEV)
    for dname, dtype in DTYPES.items():
        item = f"correctness {name} {dname}"
        if over_budget(item):
            continue
        print(f"- {item} {shape}")
        try:
            rec = _check_one(name, shape, dname, dtype, base, wy)
            REPORT["correctness"].append(rec)
            gs = " ".join(f"d{k}={v['rel']:.1e}" for k, v in rec["grads"].items())
            print(f"    y rel={rec['y']['rel']:.2e} (abs {rec['y']['max_abs']:.2e})  {gs}"
                  f"  {'OK' if rec['ok'] else 'CHECK'}")
        except Exception as e:  # noqa: BLE001
            record_error(item, e)
        if DEV.type == "cuda":
            torch.cuda.empty_cache()


def bench(fn, reps_ms=200):
    if DEV.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=reps_ms)
    t0 = time.time()
    fn()
    return (time.time() - t0) * 1e3


def sm_clock_mhz():
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.strip().splitlines()[0])
    except Exception:  # noqa: BLE001
        return 1980.0  # H100 SXM boost


HBM_GBPS = 3350.0  # H100 SXM5 HBM3; an assumption, stated in the report


def roofline(shape, dtype, ms):
    """Forward floors: bytes (read u, delta, z, B, C; write y) over HBM bandwidth, and one exp per
    (b, m, t, e, n) over the SFU rate (16 ex2 per clock per SM)."""
    b, M, L, E, N = shape
    elem = torch.tensor([], dtype=dtype).element_size()
    nbytes = b * M * L * (4 * E + 2 * N) * elem
    exps = b * M * L * E * N
    rec = {"GB_per_s": nbytes / ms / 1e6, "Gexp_per_s": exps / ms / 1e6, "bytes": nbytes,
           "exps": exps}
    if DEV.type == "cuda":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        clk = sm_clock_mhz()
        sfu_ms = exps / (sms * 16 * clk * 1e6) * 1e3
        hbm_ms = nbytes / (HBM_GBPS * 1e9) * 1e3
        rec.update(sfu_floor_ms=sfu_ms, hbm_floor_ms=hbm_ms, sm_clock_mhz=clk,
                   hbm_GBps_assumed=HBM_GBPS, fraction_of_limit=max(sfu_ms, hbm_ms) / ms)
    return rec


def time_shape(name, shape, ref_L=None):
    b, M, L, E, N = shape
    base = make_inputs(*shape)
    for dname, dtype in DTYPES.items():
        item = f"timing {name} {dname}"
        if over_budget(item):
            continue
        try:
            low = cast(base, dtype)
            args = [low[k] for k in ORDER]
            f_fwd = lambda: coupled_scan(*args, delta_softplus=True, impl="triton")  # noqa: E731
            with torch.no_grad():
                ms_fwd = bench(f_fwd)
            leaves = [a.detach().clone().requires_grad_() for a in args]
            gy = torch.randn(b, M, L, E, device=DEV, dtype=dtype)

            def f_fb():
                y = coupled_scan(*leaves, delta_softplus=True, impl="triton")
                torch.autograd.grad(y, leaves, gy)

            ms_fb = bench(f_fb)
            rec = {"shape": name, "dims": shape, "dtype": dname, "triton_fwd_ms": ms_fwd,
                   "triton_fwd_bwd_ms": ms_fb, "fwd_roofline": roofline(shape, dtype, ms_fwd)}
            REPORT["timing"].append(rec)
            r = rec["fwd_roofline"]
            lim = (f", {100 * r['fraction_of_limit']:.0f}% of the SFU/HBM floor "
                   f"({max(r['sfu_floor_ms'], r['hbm_floor_ms']):.3f} ms)"
                   if "fraction_of_limit" in r else "")
            print(f"- {item}: fwd {ms_fwd:.3f} ms ({r['GB_per_s']:.0f} GB/s, "
                  f"{r['Gexp_per_s']:.0f} Gexp/s{lim})  fwd+bwd {ms_fb:.3f} ms")
            leaves = None  # noqa: F841
        except Exception as e:  # noqa: BLE001
            record_error(item, e)
    # the reference once (a Python loop over t), float32, on L or a shorter L
    item = f"timing {name} reference"
    if over_budget(item):
        return
    try:
        Lr = min(L, ref_L or L)
        inp = {k: (v[:, :, :Lr].contiguous() if v.dim() == 4 else v) for k, v in base.items()}
        args = [inp[k] for k in ORDER]
        with torch.no_grad():
            coupled_scan(*args, delta_softplus=True, impl="reference")  # warm-up
            sync()
            t0 = time.time()
            coupled_scan(*args, delta_softplus=True, impl="reference")
            sync()
        ms = (time.time() - t0) * 1e3
        rec = {"shape": name, "dims": shape, "dtype": "float32", "reference_fwd_ms": ms,
               "reference_L": Lr, "note": "timed once" + (f", on L={Lr} not {L}" if Lr < L else "")}
        REPORT["timing"].append(rec)
        print(f"- {item}: fwd {ms:.1f} ms (once, L={Lr})")
    except Exception as e:  # noqa: BLE001
        record_error(item, e)


def time_mamba(name, shape):
    """Mamba's selective-scan CUDA kernel run M times (the target is <= 0.8x of that), when
    mamba_ssm is installed; recorded as absent otherwise."""
    item = f"mamba {name}"
    if over_budget(item):
        return
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # noqa: BLE001
        REPORT["mamba"].append({"shape": name, "available": False,
                                "why": f"{type(e).__name__}: {e}"})
        print(f"- {item}: mamba_ssm not importable ({type(e).__name__}); not timed")
        return
    try:
        b, M, L, E, N = shape
        base = cast(make_inputs(*shape), torch.bfloat16)
        # Mamba's layout: u, delta, z (b, E, L); B, C (b, N, L) (variable B/C)
        per_m = []
        for m in range(M):
            per_m.append((base["u"][:, m].transpose(1, 2).contiguous(),
                          base["delta"][:, m].transpose(1, 2).contiguous(),
                          base["A"][m].contiguous(),
                          base["B"][:, m].transpose(1, 2).contiguous(),
                          base["C"][:, m].transpose(1, 2).contiguous(),
                          base["D"][m].contiguous(),
                          base["z"][:, m].transpose(1, 2).contiguous(),
                          base["delta_bias"][m].contiguous()))

        def f():
            for (u, d, A, B, C, D, z, bias) in per_m:
                selective_scan_fn(u, d, A, B, C, D, z, bias, delta_softplus=True)

        with torch.no_grad():
            ms = bench(f)
        REPORT["mamba"].append({"shape": name, "available": True, "dtype": "bfloat16",
                                "mamba_M_times_fwd_ms": ms})
        print(f"- {item}: Mamba selective_scan x{M}, bf16 fwd {ms:.3f} ms")
    except Exception as e:  # noqa: BLE001
        record_error(item, e)


def sweep(name, shape):
    """A few block-size choices, bfloat16, to inform the defaults ({} = the planner's default)."""
    b, M, L, E, N = shape
    base = cast(make_inputs(*shape), torch.bfloat16)
    args = [base[k] for k in ORDER]
    fwd_cfgs = [dict(), dict(maxnreg=0), dict(block_e=16, num_warps=4, maxnreg=128),
                dict(block_e=16, num_warps=4), dict(block_e=64, num_warps=8),
                dict(block_e=16, num_warps=8)]
    if name.startswith("long"):
        fwd_cfgs.insert(1, dict(n_seg=1))
    if ARGS.smoke:
        fwd_cfgs = fwd_cfgs[:2]

    def fwd():
        with torch.no_grad():
            coupled_scan(*args, delta_softplus=True, impl="triton")

    if not _sweep_pass(name, "fwd", fwd_cfgs, fwd):
        return
    leaves = [a.detach().clone().requires_grad_() for a in args]
    gy = torch.randn(b, M, L, E, device=DEV, dtype=torch.bfloat16)
    bwd_cfgs = [dict(), dict(bwd_block_e=16, bwd_num_warps=8),
                dict(bwd_block_e=16, bwd_num_warps=4), dict(bwd_maxnreg=224),
                dict(deterministic=True)]
    if name.startswith("long"):
        bwd_cfgs.insert(1, dict(bwd_n_seg=1))
    if ARGS.smoke:
        bwd_cfgs = bwd_cfgs[:2]

    def fwd_bwd():
        y = coupled_scan(*leaves, delta_softplus=True, impl="triton")
        torch.autograd.grad(y, leaves, gy)

    _sweep_pass(name, "fwd+bwd", bwd_cfgs, fwd_bwd)


def _sweep_pass(name, label, cfgs, fn):
    """Time fn under each tuning config; False when the time budget ran out."""
    for cfg in cfgs:
        item = f"sweep {name} {label} {cfg}"
        if over_budget(item):
            return False
        try:
            with triton_scan.tuning(**cfg):
                ms = bench(fn)
            REPORT["sweep"].append({"shape": name, "pass": label, "cfg": cfg, "ms": ms})
            print(f"- {item}: {ms:.3f} ms")
        except Exception as e:  # noqa: BLE001
            record_error(item, e)
    return True


def memory_note(shape):
    """What the backward keeps (DESIGN: no O(L*E*N) per batch item)."""
    b, M, L, E, N = shape
    pb = triton_scan._plan(b, M, L, E, N, DEV, bwd=True)
    chunk = triton_scan._chunk_for(L, pb.n_seg)
    pb = triton_scan._plan(b, M, L, E, N, DEV, bwd=True, chunk=chunk)
    pf = triton_scan._plan(b, M, L, E, N, DEV, bwd=False)
    n_eblk = -(-E // pb.block_e)
    ck = b * (-(-L // chunk)) * E * N * 4
    scr = b * pb.n_seg * n_eblk * chunk * pb.block_e * pb.block_n * 4
    dbc = 2 * b * M * L * N * 4
    return {"fwd_plan": pf.__dict__, "bwd_plan": pb.__dict__, "chunk": chunk,
            "checkpoints_MB": ck / 2**20, "scratch_MB": scr / 2**20, "dB_dC_fp32_MB": dbc / 2**20,
            "full_states_would_be_MB": b * L * E * N * 4 / 2**20}


def main():
    torch.manual_seed(0)
    meta = REPORT["meta"]
    meta.update(python=platform.python_version(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                device=(torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu"),
                interpret=os.environ.get("TRITON_INTERPRET") == "1", smoke=ARGS.smoke)
    if DEV.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        meta.update(sm_count=p.multi_processor_count, memory_GB=round(p.total_memory / 2**30, 1))
    print(f"torch {meta['torch']}  triton {meta['triton']}  cuda {meta['cuda']}  "
          f"device {meta['device']}  interpret={meta['interpret']}")
    if ARGS.smoke:
        shapes = {"smoke": (2, 3, 9, 20, 16), "smoke-long": (1, 2, 40, 12, 8)}
        ref_L = {"smoke": None, "smoke-long": 20}
    else:
        shapes = {"paper": (64, 3, 500, 256, 64), "long": (4, 3, 8192, 256, 64)}
        ref_L = {"paper": None, "long": 1024}
    for name, shape in shapes.items():
        try:
            meta.setdefault("memory", {})[name] = memory_note(shape)
        except Exception as e:  # noqa: BLE001
            record_error(f"memory {name}", e)
    print("\n== correctness (vs the PyTorch reference, fwd and all gradients) ==")
    for name, shape in shapes.items():
        check_correctness(name, shape)
    print("\n== timing ==")
    for name, shape in shapes.items():
        time_shape(name, shape, ref_L[name])
        time_mamba(name, shape)
    if not ARGS.no_sweep:
        print("\n== block-size sweep (bfloat16) ==")
        for name, shape in shapes.items():
            sweep(name, shape)
    meta["wall_s"] = round(elapsed(), 1)
    print_table()


def print_table():
    print("\n== summary ==")
    print(f"{'shape':8s} {'dtype':9s} {'y rel':>9s} {'worst grad rel':>15s} {'ok':>5s}")
    for r in REPORT["correctness"]:
        wg = max(g["rel"] for g in r["grads"].values())
        print(f"{r['shape']:8s} {r['dtype']:9s} {r['y']['rel']:9.2e} {wg:15.2e} "
              f"{str(r['ok']):>5s}")
    print(f"{'shape':8s} {'dtype':9s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'GB/s':>7s} "
          f"{'Gexp/s':>7s} {'% of floor':>10s}")
    for r in REPORT["timing"]:
        if "triton_fwd_ms" in r:
            f = r["fwd_roofline"].get("fraction_of_limit")
            print(f"{r['shape']:8s} {r['dtype']:9s} {r['triton_fwd_ms']:9.3f} "
                  f"{r['triton_fwd_bwd_ms']:11.3f} {r['fwd_roofline']['GB_per_s']:7.0f} "
                  f"{r['fwd_roofline']['Gexp_per_s']:7.0f} "
                  f"{(f'{100 * f:.0f}%' if f is not None else '-'):>10s}")
        else:
            print(f"{r['shape']:8s} reference fwd {r['reference_fwd_ms']:.1f} ms ({r['note']})")
    for r in REPORT["mamba"]:
        print(f"{r['shape']:8s} mamba: {r.get('mamba_M_times_fwd_ms', r.get('why'))}")
    print(f"errors: {len(REPORT['errors'])}  wall {REPORT['meta'].get('wall_s')} s")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001
        record_error("main", e)
    finally:
        os.makedirs(os.path.dirname(os.path.abspath(ARGS.out)), exist_ok=True)
        with open(ARGS.out, "w") as f:
            json.dump(REPORT, f, indent=1, default=str)
        print(f"wrote {ARGS.out}")
