"""Kernel benchmark of CoupledScan (issue #6, kernel part).

Measures, side by side in one run on one GPU:
  * our Triton forward, and forward+backward;
  * Mamba's selective-scan CUDA kernel (mamba-ssm, built at run time from the carried sdist, see
    mamba_peer.py), run on the same data once per modality (the uncoupled equivalent: M launches),
    and, for reference, the same M scans in ONE launch (mamba's B/C groups: dim = M*E, n_groups = M);
  * the TensorRT plugin's CUDA kernel through its GPU harness (plugin_peer.py), when built;
  * the pure-PyTorch reference on the smallest shape only (context);
  * the hardware limit: bytes that must move over the measured HBM copy bandwidth, and the exp count
    over the measured MUFU ex2 rate; the larger binds.

Phases (run_all.py runs them as separate processes so that the builds of the peers overlap our own
work and a crash in one part cannot take the others down):
  --phase warm   fill Triton's kernel cache (one of several parallel workers: --worker k/n)
  --phase ours   limits, Triton forward and forward+backward, reference  -> scan.json
  --phase peer   mamba's kernel and the plugin kernel, each shape re-timed side by side with the
                 Triton forward -> scan.json
  --phase all    ours then peer, building the peers in the background (standalone use)
  --render       only rewrite scan.md / scan.png from scan.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import Budget, env_info, err_str, guarded, log, ms_of  # noqa: E402

M, E, N = 3, 256, 64
SHAPES = [(1, 500), (64, 500), (8, 4096), (1, 16384)]
DTYPES = ["float32", "bfloat16"]
SMOKE = dict(M=3, E=8, N=4, shapes=[(1, 8), (2, 12)], dtypes=["float32", "bfloat16"])
SEED = 1234
TARGET_SHAPE = (64, 500)


def _torch_dtype(name):
    import torch
    return getattr(torch, name)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

class Inputs:
    """The CoupledScan inputs of DESIGN.md section 3, with the model's statistics: Mamba's A (S4D
    real) and dt initialisation (softplus(bias) log-uniform in [1e-3, 1e-1]), unit-normal
    activations, delta_softplus on, kappa = 1/M (the default)."""

    def __init__(self, batch, L, dtype, device, m=M, e=E, n=N, seed=SEED):
        import torch
        g = torch.Generator(device=device).manual_seed(seed)
        dt_ = _torch_dtype(dtype)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, device=device) * scale).to(dt_)

        self.batch, self.L, self.dtype, self.M, self.E, self.N = batch, L, dtype, m, e, n
        self.u = rnd(batch, m, L, e)
        self.delta = rnd(batch, m, L, e, scale=0.5)
        self.z = rnd(batch, m, L, e)
        self.B = rnd(batch, m, L, n)
        self.C = rnd(batch, m, L, n)
        self.A = -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(m, e, 1).contiguous()
        self.D = torch.ones(m, e, device=device)
        dt = torch.exp(torch.rand(m, e, generator=g, device=device) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3))
        self.bias = (dt + torch.log(-torch.expm1(-dt))).contiguous()

    def args(self):
        return (self.u, self.delta, self.A, self.B, self.C, self.D, self.z, self.bias)

    def act_bytes(self):
        return self.u.element_size()


def work(batch, L, dtype, m=M, e=E, n=N):
    """Bytes that must move (every input read once, y written once) and the exp count."""
    s = 4 if dtype == "float32" else 2
    act = batch * m * L * (4 * e + 2 * n) * s          # u, delta, z, y (E wide); B, C (N wide)
    params = m * e * n * 4 + 2 * m * e * 4              # A; D, delta_bias
    return act + params, batch * m * L * e * n


# ---------------------------------------------------------------------------------------------
# hardware limits
# ---------------------------------------------------------------------------------------------

def measure_hbm(smoke=False):
    """Device-to-device copy of 1 GiB: bandwidth = (read + write) bytes / time."""
    import torch
    if smoke:
        return {"skipped": "cpu smoke", "GBps": 3000.0}
    n = 2**30 // 4
    x = torch.empty(n, dtype=torch.float32, device="cuda").fill_(1.0)
    y = torch.empty_like(x)
    t = common.gpu_time(lambda: y.copy_(x), flush=False, rep_ms=200)
    return {"GBps": 2 * 2**30 / (t["ms"] * 1e-3) / 1e9, "copy_bytes": 2**30, "ms": t["ms"],
            "method": "torch copy_ of a 1 GiB float32 buffer, device to device, median"}


def measure_sfu(smoke=False):
    """exp2 rate of the special-function units: a Triton kernel whose threads each run 8
    independent chains of x = ex2.approx(-x) on registers (no memory traffic in the loop)."""
    import torch
    from ex2_kernel import ex2_kernel as kern   # imported late: TRITON_INTERPRET is read at decoration
    if smoke:
        x = torch.rand(64)
        y = torch.empty_like(x)
        kern[(1,)](x, y, 2, BLOCK=64, USE_ASM=False)
        ok = bool(torch.allclose(y, sum(torch.exp2(-torch.exp2(-(x + k / 8))) for k in range(8)), atol=1e-5))
        return {"skipped": "cpu smoke (interpreter ran the tl.exp2 variant)", "exp2_per_s": 4e12,
                "interpreter_check": ok}
    out = {}
    block, iters = 1024, 512
    n = block * 132 * 32
    x = torch.rand(n, device="cuda")
    y = torch.empty_like(x)
    for name, asm in (("asm_ex2_approx_ftz", True), ("tl_exp2", False)):
        try:
            t = common.gpu_time(lambda: kern[(n // block,)](x, y, iters, BLOCK=block, USE_ASM=asm,
                                                            num_warps=4), flush=False, rep_ms=100)
            out[name] = {"exp2_per_s": n * 8 * iters / (t["ms"] * 1e-3), "ms": t["ms"]}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": err_str(e)}
    rates = [v["exp2_per_s"] for v in out.values() if "exp2_per_s" in v]
    if not rates:
        raise RuntimeError(f"exp2 rate not measured: {out}")
    out["exp2_per_s"] = max(rates)
    out["method"] = (f"{n} threads-elements x 8 independent chains x {iters} iterations of "
                     "x = ex2(-x) in registers; best of the inline-PTX and tl.exp2 variants")
    try:
        props = torch.cuda.get_device_properties(0)
        clk = float(common.env_info().get("nvidia_smi", "").split(",")[1].split()[0]) * 1e6
        out["theoretical_exp2_per_s"] = 16 * props.multi_processor_count * clk
        out["theoretical_note"] = "16 MUFU ex2 per clock per SM x SMs x max SM clock (nvidia-smi)"
    except Exception:  # noqa: BLE001
        pass
    return out


def add_limits(cfg, limits):
    b, L, dt = cfg["batch"], cfg["L"], cfg["dtype"]
    nbytes, exps = work(b, L, dt, cfg.get("M", M), cfg.get("E", E), cfg.get("N", N))
    bw = limits.get("hbm", {}).get("GBps")
    rate = limits.get("sfu", {}).get("exp2_per_s")
    cfg["bytes"], cfg["exps"] = nbytes, exps
    if bw and rate:
        t_hbm = nbytes / (bw * 1e9) * 1e3
        t_sfu = exps / rate * 1e3
        cfg["t_hbm_ms"], cfg["t_sfu_ms"] = t_hbm, t_sfu
        cfg["limit_ms"] = max(t_hbm, t_sfu)
        cfg["binding"] = "SFU (exp)" if t_sfu >= t_hbm else "HBM"


# ---------------------------------------------------------------------------------------------
# implementations
# ---------------------------------------------------------------------------------------------

def triton_fwd_fn(inp):
    import torch
    from cm_deploy.ops import coupled_scan
    args = inp.args()

    def fn():
        with torch.no_grad():
            return coupled_scan(*args, delta_softplus=True, impl="triton")
    return fn


def triton_fwd_rank_fn(inp, rank=8):
    """The forward as the model's inference runs it: delta in rank-R form (b, M, L, R) and the dt
    projection (M, R, E) applied inside the kernel (the paper config's R = d_model / 16 = 8)."""
    import torch
    from cm_deploy.ops import coupled_scan
    g = torch.Generator(device=inp.u.device).manual_seed(SEED + 1)
    low = (torch.randn(*inp.u.shape[:3], rank, generator=g, device=inp.u.device) * 0.5).to(inp.u.dtype)
    w = torch.randn(inp.M, rank, inp.E, generator=g, device=inp.u.device) * (0.5 / math.sqrt(rank))
    u, _, A, B, C, D, z, bias = inp.args()

    def fn():
        with torch.no_grad():
            return coupled_scan(u, low, A, B, C, D, z, bias, delta_softplus=True, impl="triton",
                                _delta_proj=w)
    return fn


def triton_fwd_bwd_fn(inp):
    import torch
    from cm_deploy.ops import coupled_scan
    leaves = [t.detach().clone().requires_grad_(True) for t in inp.args()]
    dy = torch.randn_like(inp.u)

    def fn():
        for t in leaves:
            t.grad = None
        y = coupled_scan(*leaves, delta_softplus=True, impl="triton")
        y.backward(dy)
    return fn


def reference_fn(inp):
    import torch
    from cm_deploy.ops import coupled_scan
    args = inp.args()

    def fn():
        with torch.no_grad():
            return coupled_scan(*args, delta_softplus=True, impl="reference")
    return fn


class MambaArgs:
    """The same data in mamba's layout: u, delta, z (b, E, L); B, C (b, 1, N, L) per modality; and
    the grouped single-launch form (b, M*E, L) with B, C (b, M, N, L)."""

    def __init__(self, inp):
        b, m, L, e, n = inp.batch, inp.M, inp.L, inp.E, inp.N
        tr = lambda x: x.transpose(-1, -2).contiguous()  # noqa: E731
        self.per_m = []
        for k in range(m):
            self.per_m.append((tr(inp.u[:, k]), tr(inp.delta[:, k]), inp.A[k].contiguous(),
                               tr(inp.B[:, k]).unsqueeze(1), tr(inp.C[:, k]).unsqueeze(1),
                               inp.D[k].contiguous(), tr(inp.z[:, k]), inp.bias[k].contiguous()))
        g = lambda x: x.permute(0, 1, 3, 2).reshape(b, m * e, L).contiguous()  # noqa: E731
        self.grouped = (g(inp.u), g(inp.delta), inp.A.reshape(m * e, n).contiguous(),
                        inp.B.permute(0, 1, 3, 2).contiguous(), inp.C.permute(0, 1, 3, 2).contiguous(),
                        inp.D.reshape(m * e).contiguous(), g(inp.z), inp.bias.reshape(m * e).contiguous())


def mamba_fwd_bwd_fn(mod, ma, inp):
    """Mamba's forward then backward (its selective_scan_interface does the same calls), once per
    modality: the uncoupled equivalent of our fwd + bwd."""
    import torch
    douts = [torch.randn_like(a[0]) for a in ma.per_m]

    def fn():
        for a, dout in zip(ma.per_m, douts):
            out, x, *_ = mod.fwd(*a, True)
            mod.bwd(*a, dout, x, out, None, True, False)
    return fn


def mamba_fns(mod, inp):
    ma = MambaArgs(inp)

    def m_calls():
        return [mod.fwd(*a, True) for a in ma.per_m]

    def grouped():
        return mod.fwd(*ma.grouped, True)
    return ma, m_calls, grouped


def sanity_vs_mamba(mod, inp, ma):
    """With M = 1 and kappa = 1 CoupledScan is Mamba's selective scan (DESIGN.md section 2): compare
    our Triton result on modality 0 with mamba's gated output, and the grouped launch with the M
    separate ones."""
    import torch
    from cm_deploy.ops import coupled_scan
    with torch.no_grad():
        sl = lambda x: x[:, :1].contiguous()  # noqa: E731
        y_t = coupled_scan(sl(inp.u), sl(inp.delta), inp.A[:1], sl(inp.B), sl(inp.C), inp.D[:1],
                           sl(inp.z), inp.bias[:1], delta_softplus=True, coupling_scale=1.0,
                           impl="triton")[:, 0].float()
        y_m = mod.fwd(*ma.per_m[0], True)[2].transpose(1, 2).float()
        y_g = mod.fwd(*ma.grouped, True)[2]
        y_sep = torch.cat([mod.fwd(*a, True)[2] for a in ma.per_m], dim=1)
        return {"triton_M1_vs_mamba_max_abs": float((y_t - y_m).abs().max()),
                "mamba_max_abs_y": float(y_m.abs().max()),
                "grouped_vs_M_calls_max_abs": float((y_g.float() - y_sep.float()).abs().max())}


# ---------------------------------------------------------------------------------------------
# phases
# ---------------------------------------------------------------------------------------------

def new_result(smoke):
    sh = SMOKE["shapes"] if smoke else SHAPES
    dts = SMOKE["dtypes"] if smoke else DTYPES
    m, e, n = (SMOKE["M"], SMOKE["E"], SMOKE["N"]) if smoke else (M, E, N)
    return {
        "kind": "coupled_scan_kernels", "smoke": smoke, "env": env_info(),
        "params": {"M": m, "E": e, "N": n, "shapes_batch_x_L": sh, "dtypes": dts,
                   "delta_softplus": True, "coupling_scale": "1/M (default)", "has_D_z_bias": True,
                   "timer": "CUDA events, median; 256 MiB L2 flush before every call (not timed)"},
        "limits": {}, "configs": [
            {"batch": b, "L": L, "dtype": dt, "M": m, "E": e, "N": n} for dt in dts for b, L in sh],
    }


def _inputs_for(cfg, device):
    return Inputs(cfg["batch"], cfg["L"], cfg["dtype"], device, cfg["M"], cfg["E"], cfg["N"])


def phase_ours(res, budget, smoke, out=None):
    """Limits, then the Triton forward on every shape, then forward+backward on every shape (the
    backward kernels take the longest to compile: if the budget runs out, the forwards are in),
    then the reference on the smallest shape. scan.json is rewritten after every step."""
    import torch
    device = "cpu" if smoke else "cuda"
    log("limits: HBM copy bandwidth, exp2 rate")
    guarded(res["limits"], "hbm", measure_hbm, smoke)
    guarded(res["limits"], "sfu", measure_sfu, smoke)
    log(f"  limits: {res['limits'].get('hbm', {}).get('GBps')} GB/s, "
        f"{res['limits'].get('sfu', {}).get('exp2_per_s')} exp2/s")
    timer = (lambda f: common.wall_time(f, min_reps=1, max_reps=2, warmup=0)) if smoke else common.gpu_time
    first = tuple(res["params"]["shapes_batch_x_L"][0])

    def save():
        if out:
            common.write_json(os.path.join(out, "scan.json"), res)

    for step in ("triton_fwd", "triton_fwd_rank", "triton_fwd_bwd", "reference"):
        for cfg in res["configs"]:
            add_limits(cfg, res["limits"])
            if step == "reference" and (cfg["batch"], cfg["L"]) != first:
                continue
            if step in ("triton_fwd_bwd", "triton_fwd_rank") and status_ok(cfg.get("triton_fwd")) is False:
                cfg[step] = {"skipped": "forward failed"}
                continue
            if budget.left() < (15 if step == "triton_fwd" else 20):
                cfg[step] = {"skipped": "time budget"}
                continue
            log(f"{step} {cfg['batch']}x{cfg['L']} {cfg['dtype']}")
            try:
                inp = _inputs_for(cfg, device)
            except Exception as e:  # noqa: BLE001
                cfg[step] = {"error": "inputs: " + err_str(e)}
                common._recover_cuda()
                continue
            if step == "triton_fwd":
                fwd = triton_fwd_fn(inp)

                def first_call():   # JIT compile (or disk-cache load) of the forward kernels
                    t0 = time.time()
                    fwd()
                    if not smoke:
                        torch.cuda.synchronize()
                    return round(time.time() - t0, 2)
                guarded(cfg, "triton_first_call_s", first_call)
                guarded(cfg, step, timer, fwd)
                log(f"  {ms_of(cfg.get(step))} ms (limit {cfg.get('limit_ms')} ms, {cfg.get('binding')}; "
                    f"first call {cfg.get('triton_first_call_s')} s)")
            elif step == "triton_fwd_rank":
                guarded(cfg, step, timer, triton_fwd_rank_fn(inp))
                log(f"  {ms_of(cfg.get(step))} ms")
            elif step == "triton_fwd_bwd":
                guarded(cfg, step, timer, triton_fwd_bwd_fn(inp))
                log(f"  {ms_of(cfg.get(step))} ms")
            else:
                guarded(cfg, step, common.wall_time, reference_fn(inp), min_reps=2, max_reps=3, warmup=1,
                        budget_s=0.1)
                log(f"  {ms_of(cfg.get(step))} ms")
            del inp
            if not smoke:
                torch.cuda.empty_cache()
            save()


def status_ok(entry):
    """True / False for a finished timing, None when it was not run."""
    if entry is None:
        return None
    return ms_of(entry) is not None


def plugin_prepare(runner, inp, tactic=0):
    """The plugin's enqueue through the harness on these inputs, checked against the Triton forward."""
    import torch
    fn, y = runner.prepare(inp, tactic)
    fn()
    torch.cuda.synchronize()
    ref = triton_fwd_fn(inp)().float()
    check = {"max_abs_diff_vs_triton": float((y.float() - ref).abs().max()), "max_abs_y": float(ref.abs().max())}
    return fn, check


def phase_peer(res, budget, mod, build_info, plugin, smoke, out=None):
    """Mamba's kernel and the plugin's kernel on every shape, each next to a fresh timing of our
    Triton forward (same process, same inputs, back to back). At batch 1 also the wall-clock
    latency of one synchronized call (host launch cost included), which is what batch-1 serving sees."""
    import torch
    res["peer"] = {"name": "mamba-ssm selective_scan_fwd (CUDA)", "build": build_info,
                   "status": "ok" if mod is not None else "unavailable"}
    res["plugin"] = {k: v for k, v in plugin.items() if k != "runner"}
    runner = plugin.get("runner")
    if smoke or (mod is None and runner is None):
        for cfg in res["configs"]:
            cfg["mamba_M_calls"] = {"skipped": "cpu smoke" if smoke else "peer unavailable"}
            cfg["plugin"] = {"skipped": plugin.get("why", "unavailable")}
        return
    wall = lambda f: common.wall_time(f, min_reps=20, max_reps=300, budget_s=0.3, warmup=3)  # noqa: E731
    for cfg in res["configs"]:
        if budget.left() < 8:
            cfg["mamba_M_calls"] = {"skipped": "time budget"}
            continue
        tag = f"{cfg['batch']}x{cfg['L']} {cfg['dtype']}"
        log(f"peer {tag}")
        try:
            inp = _inputs_for(cfg, "cuda")
        except Exception as e:  # noqa: BLE001
            cfg["mamba_M_calls"] = {"error": "inputs: " + err_str(e)}
            common._recover_cuda()
            continue
        fns = {"triton_fwd": triton_fwd_fn(inp)}
        guarded(cfg, "triton_fwd_side_by_side", common.gpu_time, fns["triton_fwd"])
        if mod is not None:
            try:
                ma, m_calls, grouped = mamba_fns(mod, inp)
                guarded(cfg, "mamba_M_calls", common.gpu_time, m_calls)
                guarded(cfg, "mamba_grouped_1_launch", common.gpu_time, grouped)
                fns["mamba_M_calls"] = m_calls
                if getattr(mod, "_cm_has_bwd", True):
                    guarded(cfg, "mamba_fwd_bwd_M_calls", common.gpu_time, mamba_fwd_bwd_fn(mod, ma, inp))
                if (cfg["batch"], cfg["L"]) == TARGET_SHAPE:   # one shape: the M = 1 kernels compile anew
                    guarded(cfg, "sanity", sanity_vs_mamba, mod, inp, ma)
            except Exception as e:  # noqa: BLE001
                cfg["mamba_M_calls"] = {"error": err_str(e)}
                common._recover_cuda()
        else:
            cfg["mamba_M_calls"] = {"skipped": "mamba peer unavailable"}
        if runner is not None:
            # each of the plugin's implementations (its TensorRT tactics), then "plugin": the faster one,
            # which TensorRT's builder would keep, with the implementation named
            pfns = {}
            try:
                offered = runner.tactics(inp.dtype, (inp.batch, inp.M, inp.L, inp.E, inp.N))
                for tactic, impl in ((1, "cuda"), (2, "triton")):
                    key = f"plugin_{impl}"
                    if tactic not in offered:
                        cfg[key] = {"skipped": f"no {impl} kernel for this shape in the plugin library"}
                        continue
                    pfn, check = plugin_prepare(runner, inp, tactic)
                    guarded(cfg, key, common.gpu_time, pfn)
                    if isinstance(cfg.get(key), dict):
                        cfg[key].update(check, impl=impl)
                    pfns[impl] = pfn
            except Exception as e:  # noqa: BLE001
                cfg["plugin"] = {"error": err_str(e)}
                common._recover_cuda()
            timed = {impl: ms_of(cfg.get(f"plugin_{impl}")) for impl in pfns}
            timed = {k: v for k, v in timed.items() if v is not None}
            if timed:
                best = min(timed, key=timed.get)
                cfg["plugin"] = dict(cfg[f"plugin_{best}"])
                fns["plugin"] = pfns[best]
            elif "plugin" not in cfg:
                cfg["plugin"] = {"error": "no implementation of the plugin could be timed"}
        else:
            cfg["plugin"] = {"skipped": plugin.get("why", "plugin harness not available")}
        if cfg["batch"] == 1:
            lat = cfg.setdefault("latency_wall", {})
            for k, f in fns.items():
                guarded(lat, k, wall, f)
        log(f"  triton {ms_of(cfg.get('triton_fwd_side_by_side'))} ms, mamba x{cfg['M']} "
            f"{ms_of(cfg.get('mamba_M_calls'))} ms, grouped {ms_of(cfg.get('mamba_grouped_1_launch'))} ms, "
            f"plugin {ms_of(cfg.get('plugin'))} ms ({(cfg.get('plugin') or {}).get('impl', '-')}; cuda "
            f"{ms_of(cfg.get('plugin_cuda'))}, triton {ms_of(cfg.get('plugin_triton'))})"
            + (f"; wall {({k: round(ms_of(v) or -1, 4) for k, v in cfg['latency_wall'].items()})}"
               if "latency_wall" in cfg else ""))
        fns.clear()
        del inp
        torch.cuda.empty_cache()
        if out:
            common.write_json(os.path.join(out, "scan.json"), res)


def summarize(res):
    """Ratios per shape and the issue's targets."""
    targets = []
    for cfg in res["configs"]:
        tri = ms_of(cfg.get("triton_fwd_side_by_side")) or ms_of(cfg.get("triton_fwd"))
        mam = ms_of(cfg.get("mamba_M_calls"))
        grp = ms_of(cfg.get("mamba_grouped_1_launch"))
        plg = ms_of(cfg.get("plugin"))
        lim = cfg.get("limit_ms")
        r = {}
        if tri and mam:
            r["triton_over_mamba_M_calls"] = tri / mam
        if tri and grp:
            r["triton_over_mamba_grouped"] = tri / grp
        if plg and tri:
            r["plugin_over_triton"] = plg / tri
        rk, tri_alone = ms_of(cfg.get("triton_fwd_rank")), ms_of(cfg.get("triton_fwd"))
        if rk and tri_alone:
            r["triton_rank_over_full_delta"] = rk / tri_alone
        if plg and mam:
            r["plugin_over_mamba_M_calls"] = plg / mam
        for k, v in (("triton_fwd", tri), ("mamba_M_calls", mam), ("mamba_grouped", grp), ("plugin", plg)):
            if v and lim:
                r[f"{k}_fraction_of_limit"] = lim / v
        cfg["ratios"] = r
        shape = f"{cfg['batch']}x{cfg['L']} {cfg['dtype']}"
        # issue 12: the backward
        fb, mfb = ms_of(cfg.get("triton_fwd_bwd")), ms_of(cfg.get("mamba_fwd_bwd_M_calls"))
        tri_alone = ms_of(cfg.get("triton_fwd"))
        if fb and tri_alone:
            r["triton_fwd_bwd_over_fwd"] = fb / tri_alone
            targets.append({"target": "Triton fwd + bwd <= 3 x Triton fwd", "shape": shape,
                            "value": fb / tri_alone, "met": fb / tri_alone <= 3.0})
        if fb and mfb:
            r["triton_fwd_bwd_over_mamba_fwd_bwd_M_calls"] = fb / mfb
            targets.append({"target": "Triton fwd + bwd faster than M Mamba fwd + bwd", "shape": shape,
                            "value": fb / mfb, "met": fb < mfb})
        if "triton_over_mamba_M_calls" in r:
            targets.append({"target": "Triton fwd <= 0.8 x M Mamba scans", "shape": shape,
                            "value": r["triton_over_mamba_M_calls"],
                            "met": r["triton_over_mamba_M_calls"] <= 0.8})
        if (cfg["batch"], cfg["L"]) == TARGET_SHAPE and "triton_fwd_fraction_of_limit" in r:
            targets.append({"target": ">= 50% of the binding limit at 64x500", "shape": shape,
                            "value": r["triton_fwd_fraction_of_limit"],
                            "met": r["triton_fwd_fraction_of_limit"] >= 0.5})
        lw = cfg.get("latency_wall") or {}
        tw, mw, pw = (ms_of(lw.get(k)) for k in ("triton_fwd", "mamba_M_calls", "plugin"))
        if tw and mw:
            r["wall_triton_over_mamba_M_calls"] = tw / mw
            targets.append({"target": "batch-1 latency, wall clock (host launch included): Triton fwd <= 0.8 x "
                                      "M Mamba scans", "shape": shape, "value": tw / mw, "met": tw / mw <= 0.8})
        if tw and pw:
            r["wall_plugin_over_triton"] = pw / tw
        if "plugin_over_triton" in r:
            targets.append({"target": "plugin kernel <= 1.1 x Triton fwd", "shape": shape,
                            "value": r["plugin_over_triton"], "met": r["plugin_over_triton"] <= 1.1})
    res["targets"] = targets


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------

def render_md(res):
    p = res["params"]
    env = res.get("env", {})
    lines = [f"## CoupledScan kernels ({env.get('device')}, M={p['M']}, E={p['E']}, N={p['N']})", "",
             f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Triton {env.get('triton')}, "
             f"commit {env.get('commit')}. {p['timer']}. Times in microseconds.", ""]
    lim = res.get("limits", {})
    bw = lim.get("hbm", {}).get("GBps")
    rate = lim.get("sfu", {}).get("exp2_per_s")
    lines.append(f"Measured limits: HBM copy {common.fmt(bw)} GB/s; ex2 {common.fmt(rate and rate / 1e12)} T/s"
                 + (f" (theoretical {common.fmt(lim['sfu']['theoretical_exp2_per_s'] / 1e12)} T/s)"
                    if isinstance(lim.get("sfu"), dict) and lim["sfu"].get("theoretical_exp2_per_s") else "")
                 + ". Limit = max(bytes / bandwidth, exps / ex2 rate).")
    if res.get("smoke"):
        lines.append("\n(CPU smoke run: interpreter timings, placeholder limits; nothing here is a measurement.)")
    peer = res.get("peer", {})
    mb = (peer.get("build") or {}).get("mamba") or {}
    if peer.get("status") != "ok":
        why = mb.get("error") or mb.get("skipped") or "not run"
        lines.append(f"\nMamba peer unavailable: {str(why)[:300]}")
    elif mb.get("build_wall_s"):
        lines.append(f"\nMamba peer: mamba-ssm's selective_scan_fwd built from the sdist in {mb['build_wall_s']} s "
                     "(forward kernels only, sm_90); 'Mamba x{0}' = {0} launches, one per modality; "
                     "'1 launch' = the same {0} scans as one grouped launch (dim = {0}*E, {0} B/C groups)."
                     .format(p["M"]))
    plug = res.get("plugin") or {}
    if not any(ms_of(c.get("plugin")) for c in res["configs"]):
        lines.append(f"\nPlugin kernel not timed: {str(plug.get('why') or (peer.get('build') or {}).get('plugin'))[:300]}")
    checks = []
    for c in res["configs"]:
        sn = c.get("sanity") or {}
        if "triton_M1_vs_mamba_max_abs" in sn:
            checks.append(f"{c['batch']}x{c['L']} {c['dtype']}: Triton (M=1, kappa=1) vs Mamba max |diff| "
                          f"{common.fmt(sn['triton_M1_vs_mamba_max_abs'])} (max |y| {common.fmt(sn['mamba_max_abs_y'])}), "
                          f"grouped vs separate launches {common.fmt(sn['grouped_vs_M_calls_max_abs'])}")
        pl = c.get("plugin") or {}
        if "max_abs_diff_vs_triton" in pl:
            checks.append(f"{c['batch']}x{c['L']} {c['dtype']}: plugin vs Triton max |diff| "
                          f"{common.fmt(pl['max_abs_diff_vs_triton'])} (max |y| {common.fmt(pl.get('max_abs_y'))})")
    if checks:
        lines += ["", "Checks: " + "; ".join(checks) + "."]
    lines.append("")
    us = lambda x: None if x is None else x * 1e3  # noqa: E731
    pct = lambda x: None if x is None else f"{100 * x:.0f}%"  # noqa: E731
    rows = []
    for c in res["configs"]:
        r = c.get("ratios", {})
        tri = ms_of(c.get("triton_fwd_side_by_side")) or ms_of(c.get("triton_fwd"))
        rows.append([f"{c['batch']}x{c['L']}", c["dtype"].replace("float32", "fp32").replace("bfloat16", "bf16"),
                     f"{common.fmt(us(c.get('limit_ms')))} ({c.get('binding', '?')})",
                     us(tri), pct(r.get("triton_fwd_fraction_of_limit")),
                     us(ms_of(c.get("triton_fwd_rank"))), r.get("triton_rank_over_full_delta"),
                     us(ms_of(c.get("mamba_M_calls"))), us(ms_of(c.get("mamba_grouped_1_launch"))),
                     r.get("triton_over_mamba_M_calls"),
                     (f"{us(ms_of(c.get('plugin')))} ({(c.get('plugin') or {}).get('impl', '?')})"
                      if ms_of(c.get("plugin")) else common.status_of(c.get("plugin"))),
                     r.get("plugin_over_triton"),
                     us(ms_of(c.get("plugin_cuda"))), us(ms_of(c.get("plugin_triton"))),
                     us(ms_of(c.get("triton_fwd_bwd"))), r.get("triton_fwd_bwd_over_fwd"),
                     us(ms_of(c.get("mamba_fwd_bwd_M_calls"))), us(ms_of(c.get("reference")))])
    lines.append(common.md_table(
        ["b x L", "dtype", "limit µs (binds)", "Triton fwd µs", "of limit", "rank-8 delta µs",
         "rank / full", f"Mamba x{p['M']} µs",
         "Mamba 1 launch µs", "Triton / Mamba x{}".format(p['M']), "plugin µs (impl)", "plugin / Triton",
         "plugin CUDA µs", "plugin Triton µs", "Triton fwd+bwd µs", "fwd+bwd / fwd", f"Mamba fwd+bwd x{p['M']} µs", "reference µs"], rows))
    lat = [c for c in res["configs"] if c.get("latency_wall")]
    if lat:
        lines += ["", "Batch-1 latency, wall clock of one synchronized call (host launch cost included), µs:", ""]
        lines.append(common.md_table(
            ["b x L", "dtype", "Triton fwd", f"Mamba x{p['M']}", "plugin"],
            [[f"{c['batch']}x{c['L']}", c["dtype"], us(ms_of(c["latency_wall"].get("triton_fwd"))),
              us(ms_of(c["latency_wall"].get("mamba_M_calls"))), us(ms_of(c["latency_wall"].get("plugin")))]
             for c in lat]))
    lines += common.targets_md(res.get("targets"))
    return "\n".join(lines) + "\n"


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    dts = res["params"]["dtypes"]
    fig, axes = plt.subplots(1, len(dts), figsize=(6.5 * len(dts), 4.6), squeeze=False)
    series = [("Triton fwd", lambda c: ms_of(c.get("triton_fwd_side_by_side")) or ms_of(c.get("triton_fwd"))),
              ("Triton fwd+bwd", lambda c: ms_of(c.get("triton_fwd_bwd"))),
              (f"Mamba x{res['params']['M']} launches", lambda c: ms_of(c.get("mamba_M_calls"))),
              ("Mamba 1 grouped launch", lambda c: ms_of(c.get("mamba_grouped_1_launch"))),
              ("TRT plugin kernel", lambda c: ms_of(c.get("plugin")))]
    for ax, dt in zip(axes[0], dts):
        cfgs = [c for c in res["configs"] if c["dtype"] == dt]
        x = np.arange(len(cfgs))
        w = 0.16
        for i, (name, get) in enumerate(series):
            vals = [get(c) for c in cfgs]
            ax.bar(x + (i - 2) * w, [v * 1e3 if v else 0 for v in vals], w, label=name)
        lim = [c.get("limit_ms") for c in cfgs]
        ax.scatter(x, [v * 1e3 if v else np.nan for v in lim], marker="_", s=900, color="k",
                   zorder=5, label="hardware limit")
        ax.set_xticks(x, [f"{c['batch']}x{c['L']}" for c in cfgs])
        ax.set_yscale("log")
        ax.set_ylabel("time (µs, log)")
        ax.set_title(f"CoupledScan, {dt}, M={res['params']['M']} E={res['params']['E']} N={res['params']['N']}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{res.get('env', {}).get('device')}: CoupledScan time per shape (Triton, Mamba's kernel, the plugin; "
                 "black bars: hardware limit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(res, out):
    common.write_outputs(res, out, "scan", summarize, render_md, plot)


# ---------------------------------------------------------------------------------------------

def load_plugin(smoke):
    try:
        import plugin_peer
        return plugin_peer.load(smoke=smoke)
    except Exception as e:  # noqa: BLE001
        return {"runner": None, "why": "plugin harness: " + err_str(e)}


def warm_tasks(smoke):
    """Every Triton kernel specialization the run will need, as (what, batch, L, dtype): the scan
    shapes (forward, forward+backward), the M = 1 sanity check, and the model's scan shapes (bf16;
    the largest share their specialization with b=64 L=4096: same divisibility, one segment)."""
    import bench_model
    res = new_result(smoke)
    tasks = []
    for c in res["configs"]:
        tasks += [("fwd", c["batch"], c["L"], c["dtype"]), ("fwd_bwd", c["batch"], c["L"], c["dtype"])]
    if not smoke:
        tasks += [("fwd_m1", TARGET_SHAPE[0], TARGET_SHAPE[1], dt) for dt in DTYPES]
        for L in bench_model.LS:
            for b in bench_model.BATCHES:
                t = ("fwd", b, L, "bfloat16")
                if b * L <= 64 * 4096 and t not in tasks:
                    tasks.append(t)
    return tasks, res["params"]


def phase_warm(worker, workers, smoke):
    """Compile (fill Triton's on-disk cache with) this worker's share of warm_tasks. run_all.py runs
    several workers in parallel before the timed phases: compiling ~50 kernel specializations one
    after the other would take minutes of the GPU run."""
    import torch
    from cm_deploy.ops import coupled_scan
    tasks, p = warm_tasks(smoke)
    device = "cpu" if smoke else "cuda"
    mine = tasks[worker::workers]
    t_all = time.time()
    for what, b, L, dt in mine:
        t0 = time.time()
        try:
            inp = Inputs(b, L, dt, device, p["M"], p["E"], p["N"])
            if what == "fwd":
                triton_fwd_fn(inp)()
            elif what == "fwd_bwd":
                triton_fwd_bwd_fn(inp)()
            else:
                sl = lambda x: x[:, :1].contiguous()  # noqa: E731
                with torch.no_grad():
                    coupled_scan(sl(inp.u), sl(inp.delta), inp.A[:1], sl(inp.B), sl(inp.C), inp.D[:1], sl(inp.z),
                                 inp.bias[:1], delta_softplus=True, coupling_scale=1.0, impl="triton")
            if not smoke:
                torch.cuda.synchronize()
            del inp
            log(f"warm {worker}/{workers}: {what} {b}x{L} {dt} {time.time() - t0:.1f} s")
        except Exception as e:  # noqa: BLE001
            log(f"warm {worker}/{workers}: {what} {b}x{L} {dt} FAILED {err_str(e)}")
            common._recover_cuda()
    log(f"warm {worker}/{workers}: {len(mine)} tasks in {time.time() - t_all:.0f} s")


def start_builds(out, mamba_work, timeout_s):
    """Mamba's extension and the plugin harness, both in child processes."""
    import mamba_peer
    import plugin_peer
    mb = mamba_peer.start_background_build(common.REPO, os.path.join(out, "mamba_build.log"), mamba_work,
                                           timeout_s=timeout_s)
    pb, why = plugin_peer.start_background_build(common.REPO, os.path.join(out, "plugin_build.log"))
    return mb, pb, why


def wait_builds(mb, pb, why, mamba_work, timeout_s):
    """-> (mamba module or None, info dict)."""
    import mamba_peer
    import plugin_peer
    t_end = time.time() + timeout_s
    mod, minfo = mamba_peer.wait_background_build(mb, mamba_work, deadline_s=timeout_s)
    pinfo = plugin_peer.wait_build(pb, t_end - time.time()) if pb is not None else {"status": why}
    return mod, {"mamba": minfo, "plugin": pinfo}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=300, help="seconds for this process")
    ap.add_argument("--phase", choices=["ours", "peer", "all", "warm"], default="all")
    ap.add_argument("--worker", default="0/1", help="(warm phase) k/n: this worker's share")
    ap.add_argument("--smoke", action="store_true", help="CPU: interpreter, tiny shapes, no builds")
    ap.add_argument("--build-info", help="(peer phase) JSON that run_all wrote about the builds")
    ap.add_argument("--mamba-work", default="/tmp/cm_bench_mamba")
    ap.add_argument("--render", action="store_true", help="only rewrite the table and plot from scan.json")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.render:
        write_outputs(common.read_json(os.path.join(a.out, "scan.json")), a.out)
        return
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    budget = Budget(a.budget)
    if a.phase == "warm":
        k, n = (int(x) for x in a.worker.split("/"))
        phase_warm(k, n, a.smoke)
        return
    import mamba_peer
    path = os.path.join(a.out, "scan.json")
    res = common.read_json(path) if (a.phase == "peer" and os.path.exists(path)) else new_result(a.smoke)
    if a.phase == "peer":
        res["env_peer_phase"] = env_info()

    builds = None
    if a.phase == "all" and not a.smoke:
        builds = start_builds(a.out, a.mamba_work, timeout_s=max(60, a.budget - 60))
    if a.phase in ("ours", "all"):
        phase_ours(res, budget, a.smoke, a.out)
        write_outputs(res, a.out)
    if a.phase in ("peer", "all"):
        mod = None
        if a.smoke:
            # exercise the source generation (no compiler on the CPU run) and the harness's CPU path
            info = {"mamba": {"skipped": "cpu smoke"}}
            sd = mamba_peer.find_sdist(common.REPO)
            if sd:
                src = mamba_peer.extract(sd, os.path.join(a.mamba_work, "src"))
                info["mamba"]["generated"] = [os.path.basename(x) for x in mamba_peer.generate_sources(
                    src, os.path.join(a.mamba_work, "gen"))]
        elif builds is not None:
            mod, info = wait_builds(*builds, a.mamba_work, timeout_s=max(5, budget.left() - 40))
        else:
            info = common.read_json(a.build_info) if a.build_info and os.path.exists(a.build_info) else {}
            minfo = info.setdefault("mamba", {})
            if "error" not in minfo:
                try:
                    mod = mamba_peer.load_built(a.mamba_work)
                except Exception as e:  # noqa: BLE001
                    minfo["error"] = "import: " + err_str(e)
        phase_peer(res, budget, mod, info, load_plugin(a.smoke), a.smoke, a.out)
        write_outputs(res, a.out)
    if a.smoke:
        selftest_writers(res)
    log(f"scan ({a.phase}) done in {budget.elapsed():.0f} s")


def selftest_writers(res):
    """Smoke only: run the summary, table and plot code on a copy with made-up peer and plugin
    timings (the CPU run has none), so that those paths are checked before GPU time is spent."""
    import copy
    import tempfile
    r = copy.deepcopy(res)
    r["peer"] = {"status": "ok", "build": {}}
    for i, c in enumerate(r["configs"]):
        c["triton_fwd_side_by_side"] = {"ms": 1.0 + i}
        c["mamba_M_calls"] = {"ms": 2.0 + i}
        c["mamba_grouped_1_launch"] = {"ms": 1.5 + i}
        c["plugin_cuda"] = {"ms": 0.9 + i, "max_abs_diff_vs_triton": 0.0, "impl": "cuda"}
        c["plugin_triton"] = {"ms": 0.8 + i, "max_abs_diff_vs_triton": 0.0, "impl": "triton"}
        c["plugin"] = dict(c["plugin_triton"])
        c["limit_ms"], c["binding"] = 0.5, "SFU (exp)"
        if c["batch"] == 1:
            c["latency_wall"] = {"triton_fwd": {"ms": 0.05}, "mamba_M_calls": {"ms": 0.04}, "plugin": {"ms": 0.03}}
    summarize(r)
    assert any("Mamba" in t["target"] for t in r["targets"]) and any("plugin" in t["target"] for t in r["targets"])
    assert any("wall" in t["target"] for t in r["targets"])
    md = render_md(r)
    with tempfile.TemporaryDirectory() as d:
        plot(r, os.path.join(d, "x.png"))
    log(f"selftest of the writers: ok ({len(r['targets'])} targets, {len(md)} chars of markdown)")


if __name__ == "__main__":
    main()
