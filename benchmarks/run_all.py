"""One command for all of issue #6's GPU measurements, within a wall-clock budget:

    python3 benchmarks/run_all.py --out $OUT [--budget 400]     # on the GPU machine
    python3 benchmarks/run_all.py --out /tmp/smoke --smoke       # on a CPU, to check the scripts

Schedule (each part is a child process, so that a crash or a sticky CUDA error in one part cannot
take the others down, and each has a hard timeout):
  t = 0   start building mamba's selective-scan extension and the plugin's GPU harness (children,
          CPU only), and fill Triton's kernel cache with parallel workers (bench_scan.py --phase warm)
  1.      bench_scan.py --phase ours   hardware limits, Triton forward / forward+backward, reference
  2.      bench_scan.py --phase peer   Mamba's kernel and the plugin kernel, each next to the Triton
          forward (runs now if the builds are done, else after the model part)
  3.      bench_model.py               Coupled Mamba vs Transformer fusion, latency and memory vs L
  end     RESULTS.md (both tables), build.log (build logs, tail), run.log (everything printed)

Outputs in --out (7 files): scan.json scan.png model.json model.png RESULTS.md run.log build.log
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mamba_peer  # noqa: E402  (no torch import at module level)
import plugin_peer  # noqa: E402

REPO = os.path.dirname(HERE)
T0 = time.time()
_LOG = None


def say(msg):
    line = f"[run_all +{time.time() - T0:5.0f}s] {msg}"
    print(line, flush=True)
    if _LOG:
        _LOG.write(line + "\n")
        _LOG.flush()


def left(budget):
    return budget - (time.time() - T0)


def run_child(args, budget_s, hard_extra=25):
    """Run a benchmark child with --budget budget_s, echoing its output to stdout and run.log;
    killed after budget_s + hard_extra. Returns its exit code (or 'timeout')."""
    cmd = [sys.executable, *args, "--budget", f"{max(5.0, budget_s):.0f}"]
    say("$ " + " ".join(os.path.relpath(c, REPO) if c.startswith(REPO) else c for c in cmd))
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                         start_new_session=True)

    def pump():
        for line in p.stdout:
            sys.stdout.write(line)
            if _LOG:
                _LOG.write(line)
        sys.stdout.flush()
    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        rc = p.wait(timeout=max(10.0, budget_s + hard_extra))
    except subprocess.TimeoutExpired:
        say(f"child over its time: killing pid {p.pid}")
        try:
            os.killpg(p.pid, 9)
        except OSError:
            p.kill()
        p.wait()
        rc = "timeout"
    th.join(timeout=5)
    if rc != 0:
        say(f"child exit: {rc}")
    return rc


def render_all(out):
    """Tables and plots from the final JSON files: a part killed by its hard timeout leaves its JSON
    (written as it goes) but a stale or no table/plot."""
    for name, script in (("scan", "bench_scan.py"), ("model", "bench_model.py")):
        if os.path.exists(os.path.join(out, f"{name}.json")):
            subprocess.run([sys.executable, os.path.join(HERE, script), "--out", out, "--render"], timeout=120)


def compose(out, info):
    parts = ["# cm-deploy GPU benchmarks (issue #6)", "",
             f"Command: `{' '.join(sys.argv)}`; total wall time {time.time() - T0:.0f} s.", ""]
    for k, v in info.items():
        parts.append(f"- {k}: {v}")
    parts.append("")
    for name in ("scan.md", "model.md"):
        p = os.path.join(out, name)
        if os.path.exists(p):
            parts.append(open(p).read())
            os.remove(p)   # folded into RESULTS.md: keeps the output to a few files
        else:
            parts.append(f"({name[:-3]} part produced no table: see run.log)\n")
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(parts))


def merge_build_logs(out, limit=400_000):
    chunks = []
    for name in ("mamba_build.log", "plugin_build.log"):
        p = os.path.join(out, name)
        if os.path.exists(p):
            text = open(p, errors="replace").read()
            if len(text) > limit // 2:
                text = "... (head cut)\n" + text[-limit // 2:]
            chunks.append(f"===== {name} =====\n{text}\n")
            os.remove(p)
    if chunks:
        with open(os.path.join(out, "build.log"), "w") as f:
            f.write("".join(chunks))


def main():
    global _LOG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=400, help="total wall-clock seconds (default 400)")
    ap.add_argument("--smoke", action="store_true", help="CPU check of the scripts: interpreter, tiny shapes")
    ap.add_argument("--skip-scan", action="store_true")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--no-peer", action="store_true", help="do not build/time mamba's kernel and the plugin")
    ap.add_argument("--mamba-work", default="/tmp/cm_bench_mamba")
    ap.add_argument("--warm-workers", type=int, default=6, help="parallel Triton compile workers")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    _LOG = open(os.path.join(out, "run.log"), "w")
    B = a.budget
    smoke = ["--smoke"] if a.smoke else []
    scan = [os.path.join(HERE, "bench_scan.py"), "--out", out, "--mamba-work", a.mamba_work, *smoke]
    model = [os.path.join(HERE, "bench_model.py"), "--out", out, *smoke]
    info = {}

    mb = pb = None
    pwhy = "not requested"
    if not a.smoke and not a.no_peer and not a.skip_scan:
        os.environ.setdefault("MAX_JOBS", "16")
        try:
            mb = mamba_peer.start_background_build(REPO, os.path.join(out, "mamba_build.log"), a.mamba_work,
                                                   timeout_s=max(60, B - 90))
            say("building mamba's selective_scan extension in the background")
        except Exception as e:  # noqa: BLE001
            info["mamba build"] = f"not started: {e}"
        try:
            pb, pwhy = plugin_peer.start_background_build(REPO, os.path.join(out, "plugin_build.log"))
            say(f"plugin harness: {pwhy}")
        except Exception as e:  # noqa: BLE001
            pwhy = f"not started: {e}"

    def builds_done():
        return all(p is None or p.poll() is not None for p in (mb, pb))

    build_info_path = os.path.join("/tmp", f"cm_bench_build_info_{os.getpid()}.json")

    def run_peer(cap_s, margin_s):
        """Wait for the builds (bounded), then time the peers with what is left."""
        binfo = {}
        if mb is not None:
            _, binfo["mamba"] = mamba_peer.wait_background_build(mb, a.mamba_work, deadline_s=max(1, left(B) - 60),
                                                                 load=False)
        else:
            binfo["mamba"] = {"error": info.get("mamba build", "not built (--no-peer or smoke)")}
        binfo["plugin"] = plugin_peer.wait_build(pb, max(1, left(B) - 60)) if pb is not None else {"status": pwhy}
        for k, v in binfo.items():
            say(f"build {k}: {json.dumps(v)[:300]}")
        with open(build_info_path, "w") as f:
            json.dump(binfo, f)
        return run_child(scan + ["--phase", "peer", "--build-info", build_info_path],
                         max(20, min(cap_s, left(B) - margin_s)))

    # Fill Triton's on-disk kernel cache in parallel processes (compiling the ~40 specializations
    # one by one inside the timed phases would cost minutes); the builds run at the same time.
    if not a.skip_scan or not a.skip_model:
        n = 2 if a.smoke else a.warm_workers
        t_w = min(0.35 * B, 150)
        say(f"warming Triton's kernel cache with {n} workers (at most {t_w:.0f} s)")
        logs = [open(f"/tmp/cm_bench_warm_{os.getpid()}_{k}.log", "w+") for k in range(n)]
        warm = [subprocess.Popen([sys.executable, scan[0], "--out", out, "--phase", "warm", "--worker", f"{k}/{n}",
                                  *smoke], stdout=logs[k], stderr=subprocess.STDOUT, start_new_session=True)
                for k in range(n)]
        for w, lg in zip(warm, logs):
            try:
                w.wait(timeout=max(1.0, t_w - (time.time() - T0)))
                tail = ""
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, 9)
                w.wait()
                tail = "\n(warm worker killed: over its time)\n"
            lg.seek(0)
            o = lg.read() + tail
            lg.close()
            shown = 0
            for line in o.splitlines():   # the summary line, and the first failures (all are in run.log)
                if "tasks in" in line or "killed" in line or (("FAILED" in line or "Traceback" in line)
                                                              and shown < 2):
                    shown += "tasks in" not in line
                    say(line[:300])
            if _LOG:
                _LOG.write(o or "")
        info["warm-up"] = f"{n} workers, {time.time() - T0:.0f} s"

    peer_done = a.smoke or a.no_peer or a.skip_scan
    if not a.skip_scan:
        # scan 'ours' gets at most 30% of the budget; the model part and the peer need the rest
        rc = run_child(scan + ["--phase", "all" if a.smoke else "ours"], min(0.3 * B, left(B) - 60))
        info["scan (ours)"] = f"exit {rc}"
        if not peer_done and builds_done():
            info["scan (peer)"] = f"exit {run_peer(90, 30)}"
            peer_done = True
    if not a.skip_model:
        reserve = 0 if peer_done else 75
        rc = run_child(model, max(20, left(B) - reserve - 15))
        info["model"] = f"exit {rc}"
    if not peer_done:
        info["scan (peer)"] = f"exit {run_peer(B, 10)}"
    for p in (mb, pb):
        if p is not None and p.poll() is None:
            p.kill()
    merge_build_logs(out)
    try:
        render_all(out)
    except Exception as e:  # noqa: BLE001
        say(f"render failed: {e}")
    compose(out, info)
    say(f"done: {sorted(os.listdir(out))}")
    _LOG.close()


if __name__ == "__main__":
    main()
