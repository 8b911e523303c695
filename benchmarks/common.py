"""Shared helpers of the benchmarks: environment record, time budget, GPU timers, writers."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python3 benchmarks/x.py` from anywhere: cm_deploy importable
    sys.path.insert(0, REPO)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
    """Wall-clock budget of one part: `left()` seconds remain until `deadline`."""

    def __init__(self, seconds, start=None):
        self.start = time.time() if start is None else start
        self.deadline = self.start + float(seconds)

    def left(self):
        return self.deadline - time.time()

    def elapsed(self):
        return time.time() - self.start


def git_commit():
    c = os.environ.get("CM_DEPLOY_COMMIT")
    if c:
        return c
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else None
    except Exception:  # noqa: BLE001  (no git on the device is fine)
        return None


def env_info():
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "commit": git_commit(), "host": platform.node(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm_count=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", total_memory_gib=round(p.total_memory / 2**30, 1),
                    l2_bytes=getattr(p, "L2_cache_size", None))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["nvidia_smi"] = smi.stdout.strip()
        except Exception:  # noqa: BLE001
            pass
    else:
        info["device"] = "cpu (no CUDA device)"
    return info


def err_str(e):
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 600 else s[:600] + " ..."


def guarded(results, key, fn, *a, **k):
    """results[key] = fn(...) or {'error': ...}; a failure is recorded and never raised."""
    try:
        results[key] = fn(*a, **k)
    except Exception as e:  # noqa: BLE001
        results[key] = {"error": err_str(e)}
        log(f"  {key}: FAILED {err_str(e)}")
        tb = traceback.format_exc()
        log("    " + tb.strip().splitlines()[-3] if len(tb.splitlines()) > 3 else tb)
        _recover_cuda()
    return results[key]


def _recover_cuda():
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001  (a sticky CUDA error: later calls will fail and be recorded)
        pass


# ---------------------------------------------------------------------------------------------
# timers
# ---------------------------------------------------------------------------------------------

_FLUSH = {}


def _flush_buffer():
    import torch
    if "buf" not in _FLUSH:
        # 256 MiB: five times the H100's 50 MB L2, as triton.testing.do_bench does
        _FLUSH["buf"] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    return _FLUSH["buf"]


def gpu_time(fn, *, flush=True, warmup_ms=25.0, rep_ms=150.0, min_reps=5, max_reps=200):
    """Median GPU time of fn() in ms, with CUDA events around each call; with `flush`, a 256 MiB
    buffer is zeroed before every call (not timed), so that each call starts with a cold L2, as in
    triton.testing.do_bench. The flush also keeps the GPU busy while the host enqueues the call, so
    the events measure device time, not host launch overhead."""
    import torch
    fn()
    torch.cuda.synchronize()
    buf = _flush_buffer() if flush else None
    # estimate one call
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(3):
        fn()
    e.record()
    torch.cuda.synchronize()
    est = max(s.elapsed_time(e) / 3, 1e-3)
    n_warm = max(1, min(50, int(warmup_ms / est)))
    n_rep = max(min_reps, min(max_reps, int(rep_ms / est)))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        if buf is not None:
            buf.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
    return {"ms": statistics.median(ts), "min_ms": ts[0], "p80_ms": ts[int(0.8 * (len(ts) - 1))],
            "reps": n_rep, "l2_flush": bool(flush)}


def wall_time(fn, *, sync=True, min_reps=5, max_reps=50, budget_s=0.5, warmup=2):
    """Median wall-clock ms of a synchronized call (host launch cost included): what a caller waits
    for one inference. On the CPU (smoke) this is the only timer."""
    import torch
    cuda = sync and torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    ts = []
    t_end = time.perf_counter() + budget_s
    while len(ts) < max_reps and (len(ts) < min_reps or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
        if ts[-1] > 2000 and len(ts) >= 2:   # very slow configs: two reps are enough
            break
    ts.sort()
    return {"ms": statistics.median(ts), "min_ms": ts[0], "reps": len(ts), "timer": "wall"}


# ---------------------------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------------------------

def _clean(o):
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=1, sort_keys=False)
    os.replace(tmp, path)


def emit_text(text, out=None):
    """A text report: printed, and written to `out` when given (the --out of the static-check scripts)."""
    text = text if text.endswith("\n") else text + "\n"
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text, end="")


def write_outputs(res, out, stem, summarize, render_md, plot):
    """<stem>.json, <stem>.md and <stem>.png of one benchmark part; a failing plot is logged, not fatal."""
    summarize(res)
    write_json(os.path.join(out, f"{stem}.json"), res)
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(render_md(res))
    try:
        plot(res, os.path.join(out, f"{stem}.png"))
    except Exception as e:  # noqa: BLE001
        log(f"plot failed: {err_str(e)}")


def start_logged(cmd, log_path, env=None, timeout_s=None):
    """A child process (a build) writing to log_path; wait_logged() collects it."""
    log_file = open(log_path, "w")
    p = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    p._cm_log, p._cm_t0, p._cm_timeout = log_file, time.time(), timeout_s
    return p


def wait_logged(p, timeout, what):
    """Wait at most `timeout` s for a start_logged() child (killed past it). Returns (info, log text):
    info has build_wall_s and returncode, or "error" with the log's error lines."""
    try:
        rc = p.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        p._cm_log.close()
        return {"error": f"{what} timed out after {time.time() - p._cm_t0:.0f} s"}, ""
    p._cm_log.close()
    info = {"build_wall_s": round(time.time() - p._cm_t0, 1), "returncode": rc}
    text = open(p._cm_log.name, errors="replace").read()
    if rc != 0:
        errs = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and "ptxas info" not in ln][:6]
        last = [ln.strip() for ln in text.strip().splitlines()[-1:] if ln.strip() not in errs]
        info["error"] = f"{what} failed: " + " | ".join(errs + last)[:1500]
    return info, text


def read_json(path):
    with open(path) as f:
        return json.load(f)


def fmt(x, nd=3):
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{nd}g}"
    return str(x)


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def targets_md(targets) -> list[str]:
    """The "Targets:" section of a results page: one row a target, met or not."""
    if not targets:
        return []
    return ["", "Targets:", "", md_table(["target", "shape", "value", "met"],
                                         [[t["target"], t["shape"], t["value"], "yes" if t["met"] else "NO"]
                                          for t in targets])]


def ms_of(entry):
    """The 'ms' of a timing entry, or None when it failed or was skipped."""
    if isinstance(entry, dict) and isinstance(entry.get("ms"), (int, float)):
        return float(entry["ms"])
    return None


def status_of(entry):
    if entry is None:
        return "not run"
    if isinstance(entry, dict):
        if "error" in entry:
            return "error"
        if "skipped" in entry:
            return "skipped"
    return "ok"


def synchronous_latency(fn, warmup, iters, budget_s, min_iters=3):
    """Median and min wall clock (ms) of synchronous calls of fn, after `warmup` untimed ones: up to
    `iters` calls, fewer past `budget_s` seconds (never fewer than min_iters)."""
    for _ in range(warmup):
        fn()
    lat, t_end = [], time.perf_counter() + budget_s
    while len(lat) < iters and (len(lat) < min_iters or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": statistics.median(lat), "min_ms": min(lat), "n": len(lat)}


def ort_bench_args(doc, budget, iters):
    """The command line of the ONNX Runtime benchmarks (bench_deploy, bench_stream), parsed; --out created."""
    import argparse
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--budget", type=float, default=budget)
    p.add_argument("--ort-ops", default=None, help="the CoupledScan op library (default: the runtime's search)")
    p.add_argument("--iters", type=int, default=iters)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    return a


def ort_bench_record(kind, args, config, **extra):
    """(result record, op library path or None) of an ONNX Runtime benchmark: environment, versions,
    providers, the op library the runtime found."""
    import onnxruntime as ort
    from cm_deploy.runtime.native import find_library
    lib = find_library("ort", args.ort_ops, required=False)
    res = {"kind": kind, "smoke": args.smoke, "env": env_info(), "config": config, "ort": ort.__version__,
           "ort_providers": ort.get_available_providers(), "ort_ops": str(lib) if lib else None, "rows": [], **extra}
    log(f"ORT {ort.__version__} providers {res['ort_providers']}; op library {lib}")
    return res, lib
