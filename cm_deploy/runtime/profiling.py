"""Latency: trtexec for engines when it is on PATH, else a built-in timer; one result format for both.

Built-in timer: `warmup` untimed runs, then `iters` timed runs of backend.run on host inputs (so an
engine's number includes its host<->device copies, like trtexec's "Latency" = H2D + compute + D2H);
p50/p90/p99 by linear interpolation, throughput = batch / mean latency (samples/s).

trtexec: `trtexec --loadEngine=E --dynamicPlugins=P --shapes=... --exportTimes=T --exportProfile=P
--separateProfileRun`, then the two JSON files are parsed. Their documented format (TensorRT
samples/common/sampleReporting.cpp, exportJSONTrace / Profiler::exportJSONProfile):
  --exportTimes:   [ {"startEnqMs", "endEnqMs", "startH2dMs", "endH2dMs", "startComputeMs",
                      "endComputeMs", "startD2hMs", "endD2hMs", "h2dMs", "computeMs", "d2hMs",
                      "latencyMs" (, "endToEndMs" before TensorRT 8.6)}, ... ]   one entry per query
  --exportProfile: [ {"count": N}, {"name", "timeMs", "averageMs", "medianMs" (10.x), "percentage"}, ... ]
trtexec writes them with C++ streams, so a non-finite number comes out as a bare inf/nan and a layer
name is not escaped: the reader tolerates both.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError

TRTEXEC_ENV = "CM_DEPLOY_TRTEXEC"


def latency_stats(lat_ms: Sequence[float], batch: int = 1) -> dict:
    a = np.asarray(lat_ms, dtype=np.float64)
    if a.size == 0:
        raise UserError("no timings to summarise")
    p50, p90, p99 = (float(np.percentile(a, q)) for q in (50, 90, 99))
    mean = float(a.mean())
    return {"n": int(a.size), "mean_ms": mean, "min_ms": float(a.min()), "max_ms": float(a.max()),
            "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
            "throughput": (batch * 1000.0 / mean) if mean > 0 else None}


def time_backend(backend, feeds, warmup: int = 10, iters: int = 100, min_seconds: float = 0.0) -> dict:
    """Built-in timer over backend.run(feeds) (synchronous: it returns host arrays)."""
    for _ in range(max(warmup, 0)):
        backend.run(feeds)
    lat = []
    t_end = time.perf_counter() + min_seconds
    while len(lat) < iters or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        backend.run(feeds)
        lat.append((time.perf_counter() - t0) * 1000.0)
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    out = latency_stats(lat, batch)
    out["timer"] = "builtin"
    return out


def time_stream(stream, chunk, warmup: int = 10, iters: int = 100) -> dict:
    """Built-in timer over stream.push(chunk): per-chunk latency with the state carried from one
    push to the next (the stream is reset first; its state grows with every timed chunk)."""
    stream.reset()
    for _ in range(max(warmup, 0)):
        stream.push(chunk)
    lat = []
    for _ in range(iters):
        t0 = time.perf_counter()
        stream.push(chunk)
        lat.append((time.perf_counter() - t0) * 1000.0)
    out = latency_stats(lat, stream.batch)
    out.update(timer="builtin", chunk=int(np.shape(next(iter(chunk.values())))[1]), streaming=True)
    return out


def profile_models(models, batches, lengths, *, open_model, warmup: int = 10, iters: int = 50, timer: str = "auto",
                   cuda_graph: bool = False, streaming: bool = False, plugin=None, progress=None) -> list[dict]:
    """Latency of every model over the grid batches x lengths (chunk sizes when streaming), one row
    per (model, shape): trtexec for engines when timer allows and it is found, else the built-in
    timer; shapes outside an engine's profile are rows with "skipped". open_model(path) -> Backend."""
    from .backend import model_kind
    from .engine import EngineInfo
    from .specs import concrete_shape, random_feeds, shape_grid
    from .stream import Stream
    from .trt import find_plugin
    if streaming:
        if timer == "trtexec":
            raise UserError("--streaming times chunk after chunk with the built-in timer; trtexec cannot carry state")
        timer = "builtin"
    trtexec = find_trtexec() if timer in ("auto", "trtexec") else None
    if timer == "trtexec" and not trtexec:
        raise UserError("--timer trtexec: trtexec not found on PATH (or $CM_DEPLOY_TRTEXEC)")
    results = []
    for path in models:
        use_trtexec = trtexec is not None and model_kind(path) == "tensorrt"
        if timer == "trtexec" and not use_trtexec:
            raise UserError(f"--timer trtexec profiles engines only, not {path}")
        backend = EngineInfo(path) if use_trtexec else open_model(path)
        try:
            ranges = backend.input_ranges() or {}
            plugin_path = None
            if use_trtexec:
                rec = (backend.plugin or {}).get("path")
                plugin_path = find_plugin(plugin, recorded=rec, required=bool(backend.plugin))
            stream = Stream(backend) if streaming else None
            for choice in shape_grid(backend.inputs, batches, lengths):
                row = {"model": backend.name, "path": str(path), "batch": choice.batch, "length": choice.common_length(),
                       "shape": choice.label()}
                if progress is not None:
                    progress(f"timing {backend.name} at {choice.label()}")
                shapes = {s.name: concrete_shape(s, choice) for s in backend.inputs}
                outside = [n for n, shp in shapes.items() if n in ranges and
                           any(not lo <= d <= hi for d, (lo, _, hi) in zip(shp, ranges[n]))]
                if outside:
                    row["skipped"] = f"outside the engine profile ({outside[0]})"
                elif use_trtexec:
                    row.update(run_trtexec(path, plugin_path, shapes, choice.batch, iterations=iters,
                                           cuda_graph=cuda_graph, trtexec=trtexec))
                elif stream is not None:
                    feeds = random_feeds(backend.inputs, choice)
                    stream.reset(choice.batch)
                    row.update(time_stream(stream, {n: feeds[n] for n in stream.chunk_inputs}, warmup=warmup,
                                           iters=iters))
                else:
                    row.update(time_backend(backend, random_feeds(backend.inputs, choice), warmup=warmup, iters=iters))
                results.append(row)
        finally:
            backend.close()
    return results


# ---------------------------------------------------------------------------- trtexec

def find_trtexec() -> str | None:
    env = os.environ.get(TRTEXEC_ENV)
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    return shutil.which("trtexec")


def shapes_arg(shapes: dict) -> str:
    """{name: (2, 16, 12)} -> 'name:2x16x12,...' (trtexec --shapes)."""
    return ",".join(f"{n}:{'x'.join(str(int(d)) for d in s)}" for n, s in shapes.items())


def trtexec_command(trtexec: str, engine, plugin, shapes: dict, times_json, profile_json, iterations: int = 100,
                    warmup_ms: int = 200, cuda_graph: bool = False, extra: Sequence[str] = ()) -> list[str]:
    cmd = [trtexec, f"--loadEngine={engine}"]
    if plugin:
        cmd.append(f"--dynamicPlugins={plugin}")
    if shapes:
        cmd.append(f"--shapes={shapes_arg(shapes)}")
    cmd += [f"--iterations={int(iterations)}", "--duration=0", f"--warmUp={int(warmup_ms)}",
            f"--exportTimes={times_json}", f"--exportProfile={profile_json}", "--separateProfileRun"]
    if cuda_graph:
        cmd.append("--useCudaGraph")
    cmd += list(extra)
    return cmd


_NONFINITE = re.compile(r"(?<![\w\"])(-?inf|-?nan|-?infinity)(?![\w\"])", re.IGNORECASE)


def load_trtexec_json(path):
    """json.load with trtexec's quirks: bare inf/nan become null."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read trtexec output {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return json.loads(_NONFINITE.sub("null", text))
    except json.JSONDecodeError:
        return _lenient_profile(text, path)


_PROFILE_ROW = re.compile(r'\{\s*"name"\s*:\s*"(?P<name>.*?)"\s*,\s*"timeMs"\s*:\s*(?P<rest>[^}]*)\}')
_NUM_FIELD = re.compile(r'"(\w+)"\s*:\s*([-+0-9.eE]+|inf|nan|-inf)', re.IGNORECASE)


def _lenient_profile(text: str, path):
    """Profile files whose layer names carry unescaped quotes: read row by row."""
    m = re.search(r'\{\s*"count"\s*:\s*(\d+)\s*\}', text)
    rows = []
    for line in text.splitlines():
        r = _PROFILE_ROW.search(line)
        if not r:
            continue
        row = {"name": r.group("name")}
        for k, v in _NUM_FIELD.findall('"timeMs" : ' + r.group("rest")):
            try:
                row[k] = float(v)
            except ValueError:
                row[k] = None
        rows.append(row)
    if not m and not rows:
        raise UserError(f"{path}: not trtexec JSON output")
    return ([{"count": int(m.group(1))}] if m else []) + rows


def _num(v):
    return float(v) if isinstance(v, (int, float)) and np.isfinite(v) else None


def parse_export_times(data, batch: int = 1) -> dict:
    """Summarise a --exportTimes trace: host latency (H2D + compute + D2H) and GPU compute time."""
    if isinstance(data, (str, os.PathLike)):
        data = load_trtexec_json(data)
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise UserError("trtexec --exportTimes: expected a JSON list of per-query objects")
    lat, comp = [], []
    for e in data:
        latency = _num(e.get("latencyMs"))
        if latency is None and all(_num(e.get(k)) is not None for k in ("h2dMs", "computeMs", "d2hMs")):
            latency = e["h2dMs"] + e["computeMs"] + e["d2hMs"]
        c = _num(e.get("computeMs"))
        if c is None and _num(e.get("startComputeMs")) is not None and _num(e.get("endComputeMs")) is not None:
            c = e["endComputeMs"] - e["startComputeMs"]
        if latency is not None:
            lat.append(latency)
        if c is not None:
            comp.append(c)
    if not lat and not comp:
        raise UserError("trtexec --exportTimes: no latency in the trace")
    out = latency_stats(lat or comp, batch)
    out["timer"] = "trtexec"
    out["gpu_compute"] = latency_stats(comp, batch) if comp else None
    starts = [_num(e.get("startH2dMs", e.get("startInMs"))) for e in data]
    ends = [_num(e.get("endD2hMs", e.get("endOutMs"))) for e in data]
    starts, ends = [s for s in starts if s is not None], [s for s in ends if s is not None]
    if starts and ends and max(ends) > min(starts):
        span = max(ends) - min(starts)
        out["throughput"] = batch * len(data) * 1000.0 / span      # what trtexec reports (x batch)
        out["throughput_source"] = "trace span"
    return out


def parse_export_profile(data, top: int | None = None) -> dict:
    """{"count": iterations, "total_ms": per-iteration total, "layers": [...] slowest first}."""
    if isinstance(data, (str, os.PathLike)):
        data = load_trtexec_json(data)
    if not isinstance(data, list):
        raise UserError("trtexec --exportProfile: expected a JSON list")
    count = None
    layers = []
    for e in data:
        if not isinstance(e, dict):
            continue
        if "count" in e and "name" not in e:
            count = int(e["count"])
            continue
        if "name" in e:
            layers.append({"name": str(e["name"]), "time_ms": _num(e.get("timeMs")),
                           "average_ms": _num(e.get("averageMs")), "median_ms": _num(e.get("medianMs")),
                           "percentage": _num(e.get("percentage"))})
    layers.sort(key=lambda r: -(r["average_ms"] or 0.0))
    total = sum(r["average_ms"] or 0.0 for r in layers)
    return {"count": count, "total_ms": total, "layers": layers[:top] if top else layers}


def run_trtexec(engine, plugin, shapes: dict, batch: int, iterations: int = 100, warmup_ms: int = 200,
                cuda_graph: bool = False, trtexec: str | None = None, timeout: float = 600, keep_dir=None) -> dict:
    trtexec = trtexec or find_trtexec()
    if not trtexec:
        raise UserError("trtexec not found on PATH")
    with tempfile.TemporaryDirectory(prefix="cm-deploy-trtexec-") as tmp:
        d = Path(keep_dir) if keep_dir else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        stem = "b{}_".format(batch) + "_".join(str(v) for s in shapes.values() for v in s[1:2])
        times, prof = d / f"times_{stem}.json", d / f"profile_{stem}.json"
        cmd = trtexec_command(trtexec, engine, plugin, shapes, times, prof, iterations, warmup_ms, cuda_graph)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise UserError(f"trtexec timed out after {timeout:.0f} s") from None
        except OSError as e:
            raise UserError(f"cannot run trtexec ({trtexec}): {e}") from None
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
            errs = [ln for ln in lines if "[E]" in ln or "error" in ln.lower()]
            msg = (errs or lines or ["no output"])[-1].strip()
            raise UserError(f"trtexec failed (exit {proc.returncode}): {msg}")
        if not times.is_file():
            raise UserError("trtexec wrote no --exportTimes file")
        out = parse_export_times(times, batch)
        out["profile"] = parse_export_profile(prof, top=10) if prof.is_file() else None
        out["command"] = cmd
        m = re.search(r"Throughput:\s*([0-9.eE+-]+)\s*qps", proc.stdout)
        if m:
            out["trtexec_qps"] = float(m.group(1))
        return out


# ---------------------------------------------------------------------------- plot

def plot(results: list[dict], path, x: str = "batch") -> Path:
    """Latency (p50, with the p90..p99 band) against `x` ("batch" or "length"), one line per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = list(dict.fromkeys(r["model"] for r in results))
    for m in models:
        rows = sorted((r for r in results if r["model"] == m and r.get(x) is not None), key=lambda r: r[x])
        if not rows:
            continue
        xs = [r[x] for r in rows]
        line, = ax.plot(xs, [r["p50_ms"] for r in rows], marker="o", label=f"{m} p50")
        ax.fill_between(xs, [r["p90_ms"] for r in rows], [r["p99_ms"] for r in rows], alpha=0.2,
                        color=line.get_color(), label=f"{m} p90-p99")
    ax.set_xlabel("batch size" if x == "batch" else "sequence length")
    ax.set_ylabel("latency (ms)")
    xs_all = sorted({r[x] for r in results if r.get(x)})
    if len(xs_all) > 2:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs_all)
    ax.set_xticklabels([str(v) for v in xs_all])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("cm-deploy profile")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
