"""One CoupledScan forward kernel, launched for Nsight Compute (issue #6: the evidence behind the
kernel ratios).

    python3 benchmarks/ncu_scan.py --profile-all --out DIR [--old path/to/triton_scan.py]

runs `ncu` on one launch of each implementation at the paper's shape (64 x M 3 x L 500 x E 256 x
N 64, float32 unless --dtype): our Triton forward, optionally a previous triton_scan.py (--old),
Mamba's selective_scan_fwd (when bench_scan's peer build in /tmp/cm_bench_mamba exists) and the
TensorRT plugin's kernel through its harness (when built, see plugin_peer.py). For each: the
details page (speed of light, pipe utilisation, warp stalls, occupancy, instruction counts) as
text, and the SASS with per-instruction execution counts of the launch (the hot loop's
disassembly). Writes DIR/ncu_<impl>.txt, DIR/sass_<impl>.txt.gz and DIR/ncu_summary.json (a few
headline metrics per kernel, with instructions per warp per time step).

    python3 benchmarks/ncu_scan.py --run IMPL ...   (what ncu runs: warm-up launch, then the one
                                                     that is profiled)
"""
from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

# kernel-name filter of each implementation (a regex for ncu -k)
KERNELS = {"triton": "regex:^_fwd_kernel", "triton_old": "regex:^_fwd_kernel",
           "mamba": "regex:selective_scan_fwd", "plugin": "regex:coupledScanKernel"}
# launches of the filtered kernel per call of the implementation (mamba: one per modality)
PER_CALL = {"triton": 1, "triton_old": 1, "mamba": 3, "plugin": 1}
HEADLINE = {
    "gpu__time_duration.sum": "duration_ns",
    "smsp__inst_executed.sum": "warp_instructions",
    "sm__inst_executed_pipe_xu.sum": "xu_pipe_warp_instructions",
    "sm__pipe_xu_cycles_active.avg.pct_of_peak_sustained_active": "xu_pipe_active_pct",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__registers_per_thread": "registers_per_thread",
    "launch__occupancy_limit_registers": "occupancy_limit_registers_blocks",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_throughput_pct",
    "smsp__average_warp_latency_issue_stalled_short_scoreboard.ratio": "stall_short_scoreboard",
    "smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio": "stall_long_scoreboard",
    "smsp__average_warp_latency_issue_stalled_wait.ratio": "stall_wait",
    "smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio": "stall_math_pipe_throttle",
    "smsp__average_warp_latency_issue_stalled_barrier.ratio": "stall_barrier",
    "smsp__average_warp_latency_issue_stalled_mio_throttle.ratio": "stall_mio_throttle",
    "smsp__average_warp_latency_issue_stalled_not_selected.ratio": "stall_not_selected",
    "smsp__average_warp_latency_issue_stalled_selected.ratio": "stall_selected",
}


def _inputs(args):
    import torch
    from bench_scan import Inputs
    return Inputs(args.batch, args.L, args.dtype, torch.device("cuda"))


def _callable(impl, inp, old_path):
    if impl in ("triton", "triton_old"):
        if impl == "triton_old":
            spec = importlib.util.spec_from_file_location("old_triton_scan", old_path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
        else:
            from cm_deploy.ops import triton_scan as mod
        a = inp.args()
        return lambda: mod.coupled_scan_triton(*a, delta_softplus=True)
    if impl == "mamba":
        import mamba_peer
        from bench_scan import mamba_fns
        mod = mamba_peer.load_built()
        _, m_calls, _ = mamba_fns(mod, inp)
        return m_calls
    if impl == "plugin":
        import plugin_peer
        runner = plugin_peer.load(smoke=False)["runner"]
        if runner is None:
            raise RuntimeError("plugin harness not built")
        fn, _ = runner.prepare(inp)
        return fn
    raise ValueError(impl)


def run(args):
    import torch
    inp = _inputs(args)
    fn = _callable(args.run, inp, args.old)
    with torch.no_grad():
        fn()            # warm-up (compiles); ncu skips these launches
        torch.cuda.synchronize()
        fn()            # the profiled launch(es)
        torch.cuda.synchronize()


def _available(impl, args):
    if impl == "triton_old":
        return bool(args.old and os.path.exists(args.old)), "no --old"
    if impl == "mamba":
        return os.path.isdir("/tmp/cm_bench_mamba"), "mamba peer not built (run bench_scan first)"
    if impl == "plugin":
        import plugin_peer
        return plugin_peer.find_library() is not None, "plugin harness not built"
    return True, ""


def profile(impl, args, ncu):
    base = [sys.executable, os.path.abspath(__file__), "--run", impl, "--batch", str(args.batch),
            "--L", str(args.L), "--dtype", args.dtype] + (["--old", args.old] if args.old else [])
    sel = ["-k", KERNELS[impl], "--launch-skip", str(PER_CALL[impl]), "--launch-count", "1"]
    rec = {}
    # 1) the details page (sections) and the headline metrics as CSV
    cmd = [ncu, "--target-processes", "all", *sel, "--set", "detailed",
           "--metrics", ",".join(HEADLINE), "--page", "details", "--csv"]
    p = subprocess.run(cmd + base, capture_output=True, text=True, timeout=args.timeout)
    with open(os.path.join(args.out, f"ncu_{impl}.txt"), "w") as f:
        f.write(p.stdout)
        f.write(p.stderr[-4000:])
    rows = [r for r in csv.reader(io.StringIO("\n".join(
        ln for ln in p.stdout.splitlines() if ln.startswith('"'))))]
    if rows:
        hdr = rows[0]
        ix = {h: i for i, h in enumerate(hdr)}
        for r in rows[1:]:
            mname = r[ix["Metric Name"]] if "Metric Name" in ix else ""
            if mname in HEADLINE:
                val = r[ix["Metric Value"]].replace(",", "")
                try:
                    rec[HEADLINE[mname]] = float(val)
                except ValueError:
                    rec[HEADLINE[mname]] = val
            if "Kernel Name" in ix and "kernel" not in rec:
                rec["kernel"] = r[ix["Kernel Name"]][:200]
    rec["ncu_rc"] = p.returncode
    if p.returncode:
        rec["ncu_error"] = (p.stderr or p.stdout)[-1500:]
    # 2) SASS with per-instruction execution counts
    cmd = [ncu, "--target-processes", "all", *sel, "--section", "SourceCounters",
           "--page", "source", "--print-source", "sass", "--csv"]
    p = subprocess.run(cmd + base, capture_output=True, text=True, timeout=args.timeout)
    with gzip.open(os.path.join(args.out, f"sass_{impl}.txt.gz"), "wt") as f:
        f.write(p.stdout)
        f.write(p.stderr[-4000:])
    rec["sass_rc"] = p.returncode
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--profile-all", action="store_true")
    ap.add_argument("--impls", default="triton,triton_old,mamba,plugin")
    ap.add_argument("--out", default="/tmp/cm_ncu")
    ap.add_argument("--old", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--L", type=int, default=500)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--timeout", type=float, default=240)
    args = ap.parse_args()
    if args.run:
        return run(args)
    os.makedirs(args.out, exist_ok=True)
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    from bench_scan import M, E, N
    summary = {"shape": {"batch": args.batch, "M": M, "L": args.L, "E": E, "N": N},
               "dtype": args.dtype, "kernels": {}}
    for impl in args.impls.split(","):
        ok, why = _available(impl, args)
        if not ok:
            summary["kernels"][impl] = {"skipped": why}
            continue
        try:
            rec = profile(impl, args, ncu)
        except Exception as e:  # noqa: BLE001
            rec = {"error": f"{type(e).__name__}: {e}"[:500]}
        # per exp of the profiled launch (one state update of one modality; mamba's launch is one
        # modality, ours all M): thread instructions, and special-function ops (1.0 is the floor)
        exps = args.batch * args.L * E * N * (1 if impl == "mamba" else M)
        if isinstance(rec.get("warp_instructions"), float):
            rec["thread_instructions_per_exp"] = rec["warp_instructions"] * 32 / exps
        if isinstance(rec.get("xu_pipe_warp_instructions"), float):
            rec["xu_thread_ops_per_exp"] = rec["xu_pipe_warp_instructions"] * 32 / exps
        summary["kernels"][impl] = rec
        print(impl, json.dumps(rec), flush=True)
    with open(os.path.join(args.out, "ncu_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
