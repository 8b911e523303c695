"""Timing sweep of the TensorRT plugin's kernels over the CUDA kernel's launch overrides (issue #6).

    python3 benchmarks/tune_plugin.py [--budget 150]

The plugin reads CM_DEPLOY_SCAN_NPT (states per consumer thread), CM_DEPLOY_SCAN_TC (steps per
shared-memory chunk), CM_DEPLOY_SCAN_TARGET_WARPS and CM_DEPLOY_SCAN_SEGS once per process, so
each setting runs in a child process (`--child`), timing the enqueue through the harness
(plugin_peer.py; built by run_all.py in /tmp/cm_bench_plugin) next to the Triton forward on the
same inputs. Each is timed for both of the plugin's implementations (its tactics: the CUDA block
kernel, which the settings tune, and the Triton kernels compiled ahead of time, where compiled for the
shape). Prints one line per (setting, shape, dtype, implementation).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

SHAPES = [(64, 500, "float32"), (64, 500, "bfloat16"), (8, 4096, "float32"), (1, 16384, "float32")]
SETTINGS = [{}, {"CM_DEPLOY_SCAN_TC": "12"}, {"CM_DEPLOY_SCAN_TC": "16"},
            {"CM_DEPLOY_SCAN_TC": "24"}, {"CM_DEPLOY_SCAN_NPT": "4"},
            {"CM_DEPLOY_SCAN_NPT": "4", "CM_DEPLOY_SCAN_TC": "16"},
            {"CM_DEPLOY_SCAN_TARGET_WARPS": "16"}, {"CM_DEPLOY_SCAN_TARGET_WARPS": "16", "CM_DEPLOY_SCAN_TC": "16"}]


def child(shapes):
    import torch
    import common
    import plugin_peer
    from bench_scan import Inputs, triton_fwd_fn
    runner = plugin_peer.load(smoke=False)["runner"]
    out = []
    for b, L, dt in shapes:
        inp = Inputs(b, L, dt, torch.device("cuda"))
        offered = runner.tactics(dt, (inp.batch, inp.M, inp.L, inp.E, inp.N))
        tt = common.gpu_time(triton_fwd_fn(inp))["ms"]
        for tactic, impl in ((1, "cuda"), (2, "triton")):
            if tactic not in offered:
                continue
            fn, y = runner.prepare(inp, tactic)
            fn()
            torch.cuda.synchronize()
            ref = triton_fwd_fn(inp)().float()
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            tp = common.gpu_time(fn)["ms"]
            out.append({"shape": f"{b}x{L}", "dtype": dt, "impl": impl, "plugin_ms": tp, "triton_ms": tt,
                        "ratio": tp / tt, "rel_err_vs_triton": err})
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--budget", type=float, default=150)
    args = ap.parse_args()
    if args.child:
        return child(SHAPES)
    t0 = time.time()
    for s in SETTINGS:
        if time.time() - t0 > args.budget:
            print(f"skip {s}: budget", flush=True)
            continue
        env = dict(os.environ, **s)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                           capture_output=True, text=True, timeout=120)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(f"{s}: FAILED {p.stderr[-600:]}", flush=True)
            continue
        for r in json.loads(lines[0][7:]):
            print(f"{json.dumps(s):60} {r['shape']:8} {r['dtype']:9} plugin ({r['impl']:6}) {r['plugin_ms']:.3f} ms "
                  f"triton {r['triton_ms']:.3f} ms ratio {r['ratio']:.2f} err {r['rel_err_vs_triton']:.1e}",
                  flush=True)


if __name__ == "__main__":
    main()
