"""build_engine: ONNX (with CoupledScan plugin nodes) -> TensorRT engine + JSON sidecar.

Precision. The network is STRONGLY TYPED by default: the tensor types of the ONNX file decide the
precision (export with `--dtype float16|bfloat16` for a half-precision engine), so TensorRT cannot
silently run the CoupledScan plugin or a LayerNorm in a type the export did not choose, and it is the
only mode TensorRT 11 and TensorRT-RTX keep (they removed the FP16/BF16 builder flags). Asking for a
precision other than the file's falls back to a weakly typed network with the FP16/BF16 builder flag
where the module still has it (TensorRT 10, deprecated there), and is a clear error otherwise.
float32 engines clear the TF32 flag unless tf32=True, so they meet the tight float32 parity tolerance.

Shapes. One optimisation profile: every dynamic axis 0 is the batch (min, opt, max) and every dynamic
axis 1 a sequence length, from `batch`, `length` (all inputs) and `lengths` (per input) or the
defaults below; `shapes` gives whole min/opt/max shapes per input and wins.
"""
from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from pathlib import Path

from .. import __version__
from ..contract import BATCH_DIM, FILES, MANIFEST_NAME, OP_TYPE, length_dim, precision_of
from ..errors import UserError
from ..contract import normalize_precision
from .specs import manifest_for, refuse_overwrite
from .trt import (atomic_write, find_plugin, import_tensorrt, load_plugin, make_logger, now_iso,
                  sha256_file, sidecar_path, SIDECAR_FORMAT, trt_dtype_name, trt_version)

DEFAULT_BATCH = (1, 8, 32)
DEFAULT_LENGTH = (1, 128, 1024)


def parse_range(text, what: str) -> tuple[int, int, int]:
    """'N' -> (N, N, N); 'MIN:OPT:MAX' -> a checked triple."""
    if isinstance(text, (tuple, list)):
        parts = [int(v) for v in text]
    else:
        try:
            parts = [int(v) for v in str(text).split(":")]
        except ValueError:
            raise UserError(f"{what}: expected N or MIN:OPT:MAX, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise UserError(f"{what}: expected N or MIN:OPT:MAX, got {text!r}")
    lo, opt, hi = parts
    if not (1 <= lo <= opt <= hi):
        raise UserError(f"{what}: need 1 <= min <= opt <= max, got {lo}:{opt}:{hi}")
    return lo, opt, hi


def resolve_profile(net_inputs, batch=None, length=None, lengths=None, shapes=None) -> dict:
    """net_inputs: [(name, shape with -1 for dynamic axes)]. Returns name -> (min, opt, max) shapes."""
    batch = parse_range(batch or DEFAULT_BATCH, "batch")
    length = parse_range(length or DEFAULT_LENGTH, "length")
    lengths = {k: parse_range(v, f"length of {k}") for k, v in (lengths or {}).items()}
    shapes = dict(shapes or {})
    names = [n for n, _ in net_inputs]
    for k in list(lengths) + list(shapes):
        if k not in names:
            raise UserError(f"no network input named {k!r} (inputs: {', '.join(names)})")
    profile = {}
    for name, shape in net_inputs:
        shape = tuple(int(d) for d in shape)
        if name in shapes:
            mins, opts, maxs = (tuple(int(v) for v in s) for s in shapes[name])
            if not (len(mins) == len(opts) == len(maxs) == len(shape)):
                raise UserError(f"profile of {name!r}: each shape needs rank {len(shape)}")
            for a, (d, lo, o, hi) in enumerate(zip(shape, mins, opts, maxs)):
                if d >= 0 and not lo == o == hi == d:
                    raise UserError(f"profile of {name!r}: axis {a} is fixed at {d}")
                if not 0 <= lo <= o <= hi:
                    raise UserError(f"profile of {name!r}: axis {a} needs min <= opt <= max")
            profile[name] = (mins, opts, maxs)
            continue
        trip = [[], [], []]
        for axis, d in enumerate(shape):
            if d >= 0:
                r = (d, d, d)
            elif axis == 0:
                r = batch
            elif axis == 1:
                r = lengths.get(name, length)
            else:
                raise UserError(f"input {name!r} axis {axis} is dynamic and is neither batch nor length: "
                                "give its min/opt/max shapes (shapes=...)")
            for i in range(3):
                trip[i].append(r[i])
        profile[name] = tuple(tuple(t) for t in trip)
    return profile


class _Progress:
    """Prints build phases to stderr; TensorRT calls it from its own threads."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()
        self.depth: dict = {}
        self.started: dict = {}

    def phase_start(self, phase_name, parent_phase, num_steps):
        with self.lock:
            d = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
            self.depth[phase_name] = d
            self.started[phase_name] = time.perf_counter()
            if d <= 1:
                steps = f" ({num_steps} steps)" if num_steps and num_steps > 1 else ""
                print(f"[build] {'  ' * d}{phase_name}{steps}", file=self.stream, flush=True)

    def step_complete(self, phase_name, step):
        return True     # never cancel

    def phase_finish(self, phase_name):
        with self.lock:
            d = self.depth.pop(phase_name, 0)
            t0 = self.started.pop(phase_name, None)
            if d == 0 and t0 is not None:
                print(f"[build] {phase_name} done in {time.perf_counter() - t0:.1f} s", file=self.stream, flush=True)


def _make_monitor(trt):
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)
            self.p = _Progress()

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.p.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            return self.p.step_complete(phase_name, step)

        def phase_finish(self, phase_name):
            self.p.phase_finish(phase_name)

    return Monitor()


def _parse(trt, builder, logger, onnx_path: Path, flags: int):
    if not hasattr(trt, "OnnxParser"):
        raise UserError(f"{trt.__name__} has no ONNX parser (OnnxParser): install its ONNX parser package")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errs = []
        for i in range(getattr(parser, "num_errors", 0)):
            e = parser.get_error(i)
            errs.append(" ".join(str(e.desc() if hasattr(e, "desc") else e).split()))
        msg = errs[0] if errs else logger.last_error("unknown parser error")
        hint = ""
        if OP_TYPE in msg or "plugin" in msg.lower():
            hint = " (is the CoupledScan plugin library the right one? --plugin PATH)"
        raise UserError(f"TensorRT cannot parse {onnx_path}: {msg}{hint}")
    return network, parser


def _flag(trt, name):
    return getattr(trt.BuilderFlag, name, None)


def build_engine(onnx, output=None, *, plugin=None, precision=None, batch=None, length=None, lengths=None,
                 shapes=None, timing_cache=None, workspace_mb=None, tf32=False, opt_level=None,
                 trt_module=None, progress=True, verbose=False, device=None) -> dict:
    """Build a TensorRT engine from `onnx` (a file, or an export folder holding manifest.json) and
    write it atomically to `output` (default: beside the ONNX, <stem>.engine) with a JSON sidecar
    `<engine>.json`. Returns the sidecar dict.

    plugin: the CoupledScan plugin library (else $CM_DEPLOY_PLUGIN or the default build folders);
        not needed for the portable ONNX. precision: float32|float16|bfloat16, default the file's.
    batch, length: N or (min, opt, max) for every dynamic batch/length axis; lengths: per input.
    timing_cache: a file loaded when present and saved after the build.
    """
    onnx_path = Path(onnx)
    if onnx_path.is_dir():
        from .specs import read_manifest
        m = read_manifest(onnx_path / MANIFEST_NAME)
        onnx_path = onnx_path / m.get("files", {}).get("tensorrt", FILES["tensorrt"])
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    manifest = manifest_for(onnx_path)
    precision = normalize_precision(precision)
    out = Path(output) if output else onnx_path.with_suffix(".engine")
    refuse_overwrite(out, onnx_path, timing_cache, plugin)

    if manifest:   # the export says which file carries CoupledScan plugin nodes
        needs_plugin = not manifest.get("_role", "tensorrt").endswith("portable")
        wants_plugin = needs_plugin
    else:          # a file of unknown origin: load the plugin when one is around and the op is named
        needs_plugin = False
        wants_plugin = OP_TYPE.encode() in onnx_path.read_bytes()
    plugin_path = find_plugin(plugin, required=needs_plugin) if (wants_plugin or plugin) else None

    trt = import_tensorrt(trt_module)
    from . import cuda as cu
    dev_index = cu.parse_device(device) if device is not None else None
    try:
        if dev_index is not None:
            cu.set_device(dev_index)
        dev_info = cu.device_info(dev_index)
    except Exception as e:   # recorded for the sidecar; TensorRT itself says whether it can build
        dev_info = {"error": " ".join(str(e).split())}

    logger = make_logger(trt, verbose)
    plugin_info = load_plugin(trt, plugin_path, logger) if plugin_path else None
    builder = trt.Builder(logger)
    if builder is None:
        raise UserError(f"TensorRT cannot create a builder: {logger.last_error()}")

    strong_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    strong = strong_flag is not None
    network, parser = _parse(trt, builder, logger, onnx_path, (1 << int(strong_flag)) if strong else 0)
    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    file_dtype = (manifest or {}).get("dtype") or precision_of(trt_dtype_name(t.dtype) for t in net_inputs)
    precision = precision or file_dtype
    precision_flag = None
    if precision != file_dtype:
        flag_name = {"float16": "FP16", "bfloat16": "BF16"}.get(precision)
        precision_flag = _flag(trt, flag_name) if flag_name else None
        if flag_name and precision_flag is None:
            raise UserError(f"{onnx_path} is {file_dtype}; this TensorRT ({trt.__name__} {trt_version(trt)}) builds "
                            f"strongly typed networks only: re-export with --dtype {precision}")
        if precision == "float32" and file_dtype != "float32":
            raise UserError(f"{onnx_path} is {file_dtype}: a float32 engine needs a float32 export "
                            "(cm-deploy export --dtype float32)")
        # weakly typed network + builder flag (TensorRT 10; deprecated there)
        strong = False
        del parser, network
        network, parser = _parse(trt, builder, logger, onnx_path, 0)
        net_inputs = [network.get_input(i) for i in range(network.num_inputs)]

    profile_shapes = resolve_profile([(t.name, tuple(t.shape)) for t in net_inputs], batch, length, lengths, shapes)
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    for name, (mn, op, mx) in profile_shapes.items():
        prof.set_shape(name, mn, op, mx)
    if config.add_optimization_profile(prof) < 0:
        raise UserError(f"TensorRT rejected the optimisation profile: {logger.last_error()}")
    if precision_flag is not None:
        config.set_flag(precision_flag)
    tf32_flag = _flag(trt, "TF32")
    if tf32_flag is not None:
        (config.set_flag if tf32 else config.clear_flag)(tf32_flag)
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if opt_level is not None:
        if not hasattr(config, "builder_optimization_level"):
            raise UserError(f"{trt.__name__} has no builder optimization level")
        config.builder_optimization_level = int(opt_level)
    monitor = _make_monitor(trt) if progress else None
    if monitor is not None:
        try:
            config.progress_monitor = monitor
        except (AttributeError, TypeError):   # a flavour without progress monitors: build silently
            monitor = None

    cache = None
    if timing_cache and hasattr(config, "create_timing_cache"):
        tc = Path(timing_cache)
        blob = tc.read_bytes() if tc.is_file() else b""
        try:
            cache = config.create_timing_cache(blob)
        except Exception:
            cache = None
        if cache is None and blob:
            print(f"[build] timing cache {tc} is unreadable by this TensorRT; starting a new one", file=sys.stderr)
            cache = config.create_timing_cache(b"")
        if cache is not None and not config.set_timing_cache(cache, False):
            print(f"[build] timing cache {tc} does not match this TensorRT/GPU; starting a new one",
                  file=sys.stderr)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, True)
    elif timing_cache:
        print(f"[build] {trt.__name__} has no timing cache API; --timing-cache ignored", file=sys.stderr)

    t0 = time.perf_counter()
    logger.clear()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise UserError(f"TensorRT build failed: {logger.last_error()}")
    blob = bytes(serialized)

    if timing_cache and cache is not None:
        try:
            atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
        except Exception as e:
            print(f"[build] could not save the timing cache: {e}", file=sys.stderr)

    def io_entries(tensors, which):
        entries = []
        by_name = {e["name"]: e for e in (manifest or {}).get(which, [])}
        for t in tensors:
            shape = tuple(t.shape)
            m = by_name.get(t.name)
            if m and len(m.get("shape", [])) == len(shape):
                sym = list(m["shape"])
            else:
                sym = [d if d >= 0 else (BATCH_DIM if a == 0 else length_dim(t.name) if a == 1 else f"{t.name}_{a}")
                       for a, d in enumerate(shape)]
            entries.append({"name": t.name, "shape": sym, "dtype": trt_dtype_name(t.dtype)})
        return entries

    sidecar = {
        "format": SIDECAR_FORMAT,
        "tool_version": __version__,
        "created": now_iso(),
        "engine": {"file": out.name, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)},
        "tensorrt": {"module": trt.__name__, "version": trt_version(trt)},
        "plugin": plugin_info,
        "device": dev_info,
        "precision": precision,
        # a flavour without precision flags (TensorRT-RTX, TensorRT 11) types every network strongly
        "typing": "strong" if strong or _flag(trt, "FP16") is None else "weak",
        "tf32": bool(tf32) if precision == "float32" else None,
        "profiles": [{n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in profile_shapes.items()}],
        "inputs": io_entries(net_inputs, "inputs"),
        "outputs": io_entries([network.get_output(i) for i in range(network.num_outputs)], "outputs"),
        "onnx": {"path": str(onnx_path.resolve()), "sha256": sha256_file(onnx_path)},
        "manifest": ({k: manifest.get(k) for k in ("checkpoint", "config", "dtype", "opset", "custom_ops")}
                     if manifest else None),
        "build": {"seconds": round(seconds, 3), "workspace_mb": workspace_mb, "opt_level": opt_level,
                  "timing_cache": str(timing_cache) if timing_cache else None},
    }
    # engine first, then its description: a sidecar never describes a half-written engine
    atomic_write(out, blob)
    atomic_write(sidecar_path(out), (json.dumps(sidecar, indent=2) + "\n").encode())
    sidecar["engine"]["path"] = str(out)
    return sidecar

