"""Load test of the Triton python-backend model (`cm-deploy serve-repo`, docs/serving.md): throughput and
p50/p99 latency at several client concurrencies, with and without the dynamic batcher, on a real
tritonserver (scripts/fetch_tritonserver.sh) over gRPC on 127.0.0.1.

Model: the paper config (text 768, audio 74, vision 35; d_model 128, 3 layers, d_state 64), random
weights, float32, exported here (or --export DIR); every request is one sample of 500 steps per
modality. The load comes from this process (tritonclient's asyncio gRPC client: C requests in
flight at all times for --seconds), so on a small CPU machine client and server share the cores.

    python benchmarks/serve_load.py --out benchmarks/results/serving              # CPU server (~3 min)
    python benchmarks/serve_load.py --device cuda --out $OUT/serving              # GPU: ORT CUDA in the backend
    python benchmarks/serve_load.py --smoke --out /tmp/serve_smoke                # a tiny model, seconds

Writes serve_load.json (environment, commit, shapes, every number) and SERVE_LOAD.md (the table).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time

from common import err_str, git_commit, log, md_table, write_json  # also puts the repo on sys.path

PAPER = dict(modalities={"text": 768, "audio": 74, "vision": 35}, d_model=128, n_layers=3, d_state=64)
SMOKE = dict(modalities={"text": 12, "audio": 7, "vision": 5}, d_model=16, n_layers=2, d_state=4, d_conv=3)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_export(work, cfg):
    import torch
    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    from cm_deploy.export import export_checkpoint
    torch.manual_seed(0)
    ckpt = save_checkpoint(CoupledMamba(CoupledMambaConfig(**cfg)), os.path.join(work, "ckpt.pt"))
    out = os.path.join(work, "export")
    export_checkpoint(ckpt, out, dtype="float32")
    return out


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def load_level(url, model, inputs_fn, concurrency, warmup_s, window_s):
    """`concurrency` coroutines, each sending its next request when the last one answers. After
    `warmup_s`, the requests that complete within `window_s` count (throughput = those / window_s;
    latencies are theirs); then whatever is still in flight is cancelled."""
    import tritonclient.grpc.aio as tga
    client = tga.InferenceServerClient(url)
    done, errors = [], []           # (completion time, latency)
    t_start = time.perf_counter()
    t_win, t_end = t_start + warmup_s, t_start + warmup_s + window_s

    async def worker():
        inputs = inputs_fn(tga)
        while True:
            t0 = time.perf_counter()
            try:
                await client.infer(model, inputs)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  (recorded, the load goes on)
                errors.append(err_str(e))
                continue
            done.append((time.perf_counter(), time.perf_counter() - t0))

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(t_end - time.perf_counter())
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    return [lat for t, lat in done if t_win <= t <= t_end], errors


def wait_idle(url, model, timeout=300.0):
    """Until the server has finished what cancelled requests left queued (its counts stand still)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        now = stats_of(url, model)
        if now == last:
            return
        last = now
        time.sleep(1.0)


def stats_of(url, model):
    import tritonclient.grpc as tg
    c = tg.InferenceServerClient(url)
    try:
        s = c.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        c.close()
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


def run_mode(args, export, cfg, dynamic, res):
    import numpy as np
    from cm_deploy.serving.repository import RepoOptions, write_repository
    from cm_deploy.serving.server import TritonServer
    from tritonclient.utils import np_to_triton_dtype

    work = tempfile.mkdtemp(prefix="cm-serve-load-")
    mode = "dynamic batching" if dynamic else "no batching"
    try:
        repo = os.path.join(work, "repo")
        opts = RepoOptions(backends=("python",), name="cm", max_batch=args.max_batch, dynamic_batching=dynamic,
                           queue_delay_us=args.queue_delay_us, kind="gpu" if args.device == "cuda" else "cpu",
                           instances=args.instances, threads=args.threads)
        summary = write_repository(export, repo, opts)
        rng = np.random.default_rng(0)
        sample = {n: rng.standard_normal((1, args.length, f)).astype(np.float32) for n, f in cfg["modalities"].items()}

        def inputs_fn(mod):
            out = []
            for k, v in sample.items():
                t = mod.InferInput(k, list(v.shape), np_to_triton_dtype(v.dtype))
                t.set_data_from_numpy(v)
                out.append(t)
            return out

        with TritonServer(repo, log_path=os.path.join(work, "server.log"), ready_timeout=300) as srv:
            import tritonclient.grpc as tg
            meta = tg.InferenceServerClient(srv.grpc_url)
            res.setdefault("server", {"version": meta.get_server_metadata(as_json=True).get("version")})
            meta.close()
            res.setdefault("repository", summary["models"][0]["what"])
            est = None          # one request's latency at the last level, scaled: sizes the next window
            for c in args.concurrency:
                window = args.seconds if est is None else min(max(args.seconds, 2.5 * est * c), args.max_window)
                warmup = args.warmup if est is None else min(max(args.warmup, est * c), args.max_window)
                wait_idle(srv.grpc_url, "cm_python")
                n0, e0 = stats_of(srv.grpc_url, "cm_python")
                t0 = time.perf_counter()
                lat, errors = asyncio.run(load_level(srv.grpc_url, "cm_python", inputs_fn, c, warmup, window))
                n1, e1 = stats_of(srv.grpc_url, "cm_python")
                wall = time.perf_counter() - t0
                if lat:
                    est = statistics.median(lat) / c
                row = {"mode": mode, "concurrency": c, "requests": len(lat), "errors": len(errors),
                       "first_error": errors[0] if errors else None, "window_s": window, "warmup_s": warmup,
                       "throughput_rps": len(lat) / window if lat else 0.0,
                       "p50_ms": 1e3 * percentile(lat, 50) if lat else None,
                       "p99_ms": 1e3 * percentile(lat, 99) if lat else None,
                       "mean_ms": 1e3 * statistics.fmean(lat) if lat else None,
                       "server_mean_batch": (n1 - n0) / (e1 - e0) if e1 > e0 else None, "wall_s": wall}
                res["rows"].append(row)
                log(f"{mode:17s} c={c:3d}: {row['throughput_rps']:.1f} req/s, p50 {row['p50_ms'] or 0:.1f} ms, "
                    f"p99 {row['p99_ms'] or 0:.1f} ms, mean batch {row['server_mean_batch'] or 0:.2f}, "
                    f"{len(errors)} errors")
    except Exception as e:  # noqa: BLE001
        res["rows"].append({"mode": mode, "error": err_str(e)})
        log(f"{mode}: {err_str(e)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render_md(res):
    e, L = res["env"], res["length"]
    shapes = ", ".join(f"{k} (1, {L}, {v})" for k, v in res["config"]["modalities"].items())
    lines = [f"# Triton python backend under load ({res['device']})", "",
             f"Commit {e['commit']}; tritonserver {res.get('server', {}).get('version')}; onnxruntime {e['onnxruntime']}; "
             f"{e['cpu']} ({e['cores']} cores, load average {e['loadavg_start'][0]:.1f} at the start, "
             f"{e['loadavg_end'][0]:.1f} at the end: other work shared the machine); Python {e['python']}.",
             f"Model: {res['config']} float32, random weights; each request 1 sample x {L} steps of every "
             f"modality ({shapes}).",
             f"Load: tritonclient asyncio gRPC on 127.0.0.1, C requests in flight; per level, after a warm-up, the "
             f"requests completed in a window of at least {res['seconds']} s (longer when requests take long: "
             f"`window_s` in the JSON) count; the client shares the machine with the server. Repository: "
             f"`cm-deploy serve-repo --backends python --kind {'gpu' if res['device_arg'] == 'cuda' else 'cpu'} "
             f"--max-batch {res['max_batch']} --queue-delay-us {res['queue_delay_us']}` (and --no-dynamic-batching).",
             "", md_table(["batching", "concurrency", "req/s", "p50 ms", "p99 ms", "mean server batch", "requests",
                           "errors"],
                          [(r["mode"], r.get("concurrency"), r.get("throughput_rps"), r.get("p50_ms"), r.get("p99_ms"),
                            r.get("server_mean_batch"), r.get("requests"), r.get("errors", r.get("error")))
                           for r in res["rows"]]), ""]
    if res.get("verdict"):
        lines += [res["verdict"], ""]
    lines += [f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def verdict(res):
    by = {(r["mode"], r.get("concurrency")): r for r in res["rows"] if "error" not in r}
    parts = []
    for c in res["concurrency"]:
        a, b = by.get(("dynamic batching", c)), by.get(("no batching", c))
        if a and b and a["throughput_rps"] and b["throughput_rps"]:
            parts.append(f"c={c}: x{a['throughput_rps'] / b['throughput_rps']:.2f} throughput, p99 "
                         f"{a['p99_ms']:.0f} vs {b['p99_ms']:.0f} ms")
    return ("Dynamic batching vs none (same concurrency): " + "; ".join(parts) + ".") if parts else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--export", default=None, help="An export folder (default: the paper model, exported here).")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=8.0, help="Measurement window per level (at least; longer "
                                                                    "when requests take long).")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--max-window", type=float, default=30.0, help="Cap of a level's window and warm-up.")
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--queue-delay-us", type=int, default=2000)
    ap.add_argument("--instances", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per instance (default ORT's).")
    ap.add_argument("--smoke", action="store_true", help="A tiny model and short levels: checks the script.")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))      # a killed run still stops its server
    if args.smoke:
        args.seconds, args.warmup, args.length = 1.5, 0.5, 32
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    os.makedirs(args.out, exist_ok=True)
    import onnxruntime
    cfg = SMOKE if args.smoke else PAPER
    res = {"kind": "serve_load", "smoke": args.smoke, "device_arg": args.device, "config": cfg, "dtype": "float32",
           "length": args.length, "shapes": {k: [1, args.length, v] for k, v in cfg["modalities"].items()},
           "seconds": args.seconds, "warmup": args.warmup, "concurrency": args.concurrency,
           "max_batch": args.max_batch, "queue_delay_us": args.queue_delay_us, "rows": [],
           "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
           "env": {"commit": git_commit(), "python": platform.python_version(), "cpu": cpu_name(),
                   "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
                   "providers": onnxruntime.get_available_providers(),
                   "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "loadavg_start": os.getloadavg()}}
    res["device"] = f"CPU: {res['env']['cpu']}, {os.cpu_count()} cores" if args.device == "cpu" else "CUDA"
    if args.device == "cuda":
        try:
            import subprocess
            res["device"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or "CUDA"
        except Exception:  # noqa: BLE001
            pass
    work = tempfile.mkdtemp(prefix="cm-serve-export-")
    try:
        export = args.export
        if export is None:
            log(f"exporting the {'smoke' if args.smoke else 'paper'} model")
            export = make_export(work, cfg)
        for dynamic in (True, False):
            run_mode(args, export, cfg, dynamic, res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["env"]["loadavg_end"] = os.getloadavg()
    res["verdict"] = verdict(res)
    write_json(os.path.join(args.out, "serve_load.json"), res)
    with open(os.path.join(args.out, "SERVE_LOAD.md"), "w") as f:
        f.write(render_md(res))
    log(f"wrote {args.out}/serve_load.json and SERVE_LOAD.md")
    return 0 if all("error" not in r for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
