"""`cm-deploy serve-repo`: a Triton Inference Server model repository from an export folder
(docs/serving.md). One model folder per backend:

    <name>_onnx          onnxruntime backend: model.onnx + the CoupledScan op library (model_operations)
    <name>_trt           tensorrt backend: the engine (model.plan); the plugin and its autoload shim
                         beside it, loaded by the server (--backend-config=tensorrt,plugins=<shim>)
    <name>_python        python backend: the same graph through cm_deploy.runtime (ONNX Runtime)
    <name>_stream_onnx   onnxruntime backend, sequence batching with implicit state (START/READY)
    <name>_stream_python python backend, sequence batching by correlation id (state kept in the model)

Every config.pbtxt is a `ModelConfig` message of Triton's own schema (tritonclient's
model_config_pb2), written in protobuf text format. The repository is written into a temporary
folder and moved into place: nothing half-written is ever left behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..contract import (FILES, LENGTHS_SUFFIX, MANIFEST_NAME, NEXT_STATE_PREFIX, OUTPUT_NAME, STATE_PREFIX,
                        STREAM_FILES)
from ..errors import UserError
from ..runtime.native import LIBRARIES, PLUGIN_AUTOLOAD, find_library
from ..runtime.specs import read_manifest

BACKENDS = ("onnxruntime", "tensorrt", "python", "stream")
KINDS = ("auto", "gpu", "cpu")
SUFFIX = {"onnxruntime": "onnx", "tensorrt": "trt", "python": "python",
          "stream_onnxruntime": "stream_onnx", "stream_python": "stream_python"}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
START, END, READY, CORRID = "START", "END", "READY", "CORRID"
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")     # the python backend's model.py


@dataclass
class RepoOptions:
    backends: tuple | None = None          # None: every backend the export allows
    name: str = "coupled_mamba"
    max_batch: int = 64
    preferred_batch: tuple = ()
    queue_delay_us: int = 500
    dynamic_batching: bool = True
    instances: int = 1
    kind: str = "auto"
    gpus: tuple = ()
    max_sequences: int = 16                # streams batched together (sequence batcher slots)
    sequence_idle_us: int = 60_000_000
    threads: int | None = None             # python backend: ONNX Runtime intra-op threads per instance
    op_library: str | None = None
    plugin: str | None = None
    engine: str | None = None
    server_path: str | None = None         # where the server sees the repository (default: its path here)
    notes: list = field(default_factory=list)


def schema():
    """(model_config_pb2, text_format): Triton's ModelConfig schema, from tritonclient."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise UserError(f"serve-repo writes Triton's ModelConfig schema from tritonclient (missing "
                        f"{getattr(e, 'name', None) or e}): pip install 'cm-deploy[serve]'") from None
    return model_config_pb2, text_format


def read_config(path):
    """A config.pbtxt parsed into a ModelConfig (raises text_format.ParseError when it is not one)."""
    pb, text_format = schema()
    return text_format.Parse(Path(path).read_text(), pb.ModelConfig())


# ---------------------------------------------------------------------------- config pieces

def _dtype(pb, dtype: str):
    if dtype not in TRITON_TYPES:
        raise UserError(f"dtype {dtype} has no Triton type here")
    return pb.DataType.Value(TRITON_TYPES[dtype])


def _io_entries(pb, cfg, entries, *, for_python: bool, ragged: bool):
    """Inputs (modalities (batch, L, F) -> dims [-1, F]; lengths (batch,) -> dims [1]) of one graph."""
    for e in entries:
        name, shape = e["name"], e["shape"]
        if name.startswith(STATE_PREFIX):
            continue
        t = cfg.input.add(name=name, data_type=_dtype(pb, e["dtype"]))
        rest = [d if isinstance(d, int) else -1 for d in shape[1:]]
        if name.endswith(LENGTHS_SUFFIX) and not rest:
            t.dims.append(1)
            if for_python:
                t.optional = True      # the runtime fills a request's own full lengths
            else:
                t.reshape.SetInParent()     # (batch, 1) on the wire, (batch,) to the graph
        else:
            t.dims.extend(rest)
            if ragged and len(rest) >= 2 and rest[0] == -1:
                t.allow_ragged_batch = True   # requests of different lengths in one execute(): padded there


def _outputs(pb, cfg, entries):
    for e in entries:
        if e["name"].startswith(NEXT_STATE_PREFIX):
            continue
        cfg.output.add(name=e["name"], data_type=_dtype(pb, e["dtype"]),
                       dims=[d if isinstance(d, int) else -1 for d in e["shape"][1:]] or [1])


def _instances(pb, cfg, opts, force_gpu=False):
    g = cfg.instance_group.add(count=opts.instances)
    kind = "gpu" if force_gpu or opts.gpus else opts.kind
    if kind == "gpu":
        g.kind = pb.ModelInstanceGroup.KIND_GPU
        g.gpus.extend(opts.gpus)
    elif kind == "cpu":
        g.kind = pb.ModelInstanceGroup.KIND_CPU
    return g


def _batching(cfg, opts, max_batch):
    cfg.max_batch_size = max_batch
    if opts.dynamic_batching:
        db = cfg.dynamic_batching
        db.SetInParent()
        db.preferred_batch_size.extend(b for b in opts.preferred_batch if b <= max_batch)
        db.max_queue_delay_microseconds = opts.queue_delay_us


def _control(pb, seq, name, kind, data_type=None):
    c = seq.control_input.add(name=name).control.add(kind=kind)
    if data_type is None:
        c.int32_false_true.extend([0, 1])
    else:
        c.data_type = data_type


def _param(cfg, key, value):
    cfg.parameters[key].string_value = str(value)


# ---------------------------------------------------------------------------- the models

@dataclass
class Plan:
    folder: str
    backend: str
    config: object
    files: dict            # path inside the model folder -> source path, or bytes to write
    what: str


class _Builder:
    def __init__(self, export_dir: Path, manifest: dict, opts: RepoOptions, out: Path):
        self.pb, self.text_format = schema()
        self.dir, self.m, self.o = export_dir, manifest, opts
        self.server_root = Path(opts.server_path) if opts.server_path else out.resolve()
        self.dtype = manifest.get("dtype", "float32")

    def _base(self, suffix, backend, max_batch):
        cfg = self.pb.ModelConfig(name=f"{self.o.name}_{suffix}", backend=backend)
        cfg.max_batch_size = max_batch
        return cfg

    def _op_library(self, cfg, folder, files):
        lib = self.op_library()
        name = lib.name
        files[name] = lib
        cfg.model_operations.op_library_filename.append(str(self.server_root / folder / name))

    def op_library(self) -> Path:
        return find_library("ort", self.o.op_library)

    def onnxruntime(self) -> Plan:
        cfg = self._base(SUFFIX["onnxruntime"], "onnxruntime", 0)
        files = {"1/model.onnx": self.dir / FILES["tensorrt"]}
        _io_entries(self.pb, cfg, self.m["inputs"], for_python=False, ragged=False)
        _outputs(self.pb, cfg, self.m["outputs"])
        _batching(cfg, self.o, self.o.max_batch)
        _instances(self.pb, cfg, self.o)
        self._op_library(cfg, cfg.name, files)
        return Plan(cfg.name, "onnxruntime", cfg, files, "model.onnx, CoupledScan op library in model_operations")

    def tensorrt(self, engine: Path) -> Plan:
        from ..runtime.trt import read_sidecar
        sc = read_sidecar(engine)
        if sc is None:
            raise UserError(f"{engine}: no engine description {engine.name}.json beside it (cm-deploy build "
                            "writes one): serve-repo reads the engine's inputs and profile from it")
        if self.o.kind == "cpu":
            self.o.notes.append(f"{self.o.name}_{SUFFIX['tensorrt']}: TensorRT runs on GPUs: KIND_GPU whatever --kind says")
        prof = (sc.get("profiles") or [{}])[0]
        first = sc["inputs"][0]["name"]
        engine_max = int(prof[first]["max"][0]) if first in prof else self.o.max_batch
        max_batch = min(self.o.max_batch, engine_max)
        cfg = self._base(SUFFIX["tensorrt"], "tensorrt", 0)
        _io_entries(self.pb, cfg, sc["inputs"], for_python=False, ragged=False)
        _outputs(self.pb, cfg, sc["outputs"])
        _batching(cfg, self.o, max_batch)
        _instances(self.pb, cfg, self.o, force_gpu=True)
        files = {"1/model.plan": engine}
        plugin = find_library("trt", self.o.plugin, recorded=(sc.get("plugin") or {}).get("path"), required=False)
        if plugin is not None and plugin.name == PLUGIN_AUTOLOAD:
            raise UserError(f"--plugin: name libcoupled_scan_plugin.so; {PLUGIN_AUTOLOAD} beside it is copied too")
        if plugin is not None:
            files[plugin.name] = plugin
            shim = plugin.with_name(PLUGIN_AUTOLOAD)
            if shim.is_file():           # the server only dlopens plugins=...: the shim registers the plugin
                files[shim.name] = shim
            else:
                self.o.notes.append(f"{cfg.name}: no {PLUGIN_AUTOLOAD} beside {plugin} (scripts/build_plugin.sh "
                                    f"builds it): a bare dlopen of {plugin.name}, which is all the server does "
                                    "with plugins=..., registers no CoupledScan creator, so the model will not load")
        else:
            self.o.notes.append(f"{cfg.name}: no {LIBRARIES['trt'].what} found to copy beside the engine; give the "
                                f"server the {PLUGIN_AUTOLOAD} beside yours with --backend-config=tensorrt,plugins=PATH")
        ranges = "; ".join(f"{k} " + " x ".join(str(a) if a == c else f"{a}..{c} (opt {b})"
                                                for a, b, c in zip(v["min"], v["opt"], v["max"]))
                           for k, v in prof.items())
        return Plan(cfg.name, "tensorrt", cfg, files,
                    f"engine {engine.name} ({sc.get('precision')}, {sc.get('tensorrt', {}).get('module')} "
                    f"{sc.get('tensorrt', {}).get('version')}); profile: {ranges}")

    def _python_files(self, role_tensorrt, role_portable):
        """The graph the python backend runs: CoupledScan nodes with the op library, else portable."""
        lib = find_library("ort", self.o.op_library, required=False)
        files = {"1/model.py": PYTHON_MODEL, f"1/{MANIFEST_NAME}": self.dir / MANIFEST_NAME}
        if lib is not None:
            files[f"1/{self.m['files'][role_tensorrt]}"] = self.dir / self.m["files"][role_tensorrt]
            files[lib.name] = lib
            return files, self.m["files"][role_tensorrt], lib.name
        self.o.notes.append(f"no {LIBRARIES['ort'].what} found: the python backend runs "
                            f"{self.m['files'][role_portable]} (stock ONNX Runtime)")
        files[f"1/{self.m['files'][role_portable]}"] = self.dir / self.m["files"][role_portable]
        return files, self.m["files"][role_portable], None

    def _python_params(self, cfg, mode, model_file, lib):
        _param(cfg, "mode", mode)
        _param(cfg, "model_file", model_file)
        if lib:
            _param(cfg, "op_library", lib)
        if self.o.threads:
            _param(cfg, "intra_op_threads", self.o.threads)

    def _check_python_dtype(self):
        if self.dtype == "bfloat16":
            raise UserError("the python backend hands the model numpy arrays, which have no bfloat16: export "
                            "float32 or float16 for it (or leave python out of --backends)")

    def python(self) -> Plan:
        self._check_python_dtype()
        cfg = self._base(SUFFIX["python"], "python", 0)
        _io_entries(self.pb, cfg, self.m["inputs"], for_python=True, ragged=True)
        _outputs(self.pb, cfg, self.m["outputs"])
        _batching(cfg, self.o, self.o.max_batch)
        _instances(self.pb, cfg, self.o)
        files, model_file, lib = self._python_files("tensorrt", "portable")
        self._python_params(cfg, "whole", model_file, lib)
        return Plan(cfg.name, "python", cfg, files, f"cm_deploy.runtime over {model_file}, requests of any "
                                                    "lengths padded into one batch")

    def _stream_base(self, key, backend, strategy, controls):
        """A streaming model's config: chunk inputs, sequence batching with `controls` [(name, kind)]."""
        python = backend == "python"
        cfg = self._base(SUFFIX[key], backend, self.o.max_sequences)
        _io_entries(self.pb, cfg, self.m["stream"]["inputs"], for_python=python, ragged=python)
        _outputs(self.pb, cfg, self.m["stream"]["outputs"])
        seq = self._sequence(cfg, strategy)
        for name, kind in controls:
            _control(self.pb, seq, name, getattr(self.pb.ModelSequenceBatching.Control, kind),
                     data_type=self.pb.TYPE_UINT64 if name == CORRID else None)
        _instances(self.pb, cfg, self.o)
        return cfg, seq

    def _sequence(self, cfg, strategy):
        seq = cfg.sequence_batching
        seq.max_sequence_idle_microseconds = self.o.sequence_idle_us
        if strategy == "oldest":
            seq.oldest.max_candidate_sequences = self.o.max_sequences
            seq.oldest.preferred_batch_size.extend(b for b in self.o.preferred_batch if b <= self.o.max_sequences)
            seq.oldest.max_queue_delay_microseconds = self.o.queue_delay_us
        else:
            seq.direct.SetInParent()
        return seq

    def stream_python(self) -> Plan:
        self._check_python_dtype()
        cfg, _ = self._stream_base("stream_python", "python", "oldest",
                                   [(START, "CONTROL_SEQUENCE_START"), (END, "CONTROL_SEQUENCE_END"),
                                    (CORRID, "CONTROL_SEQUENCE_CORRID")])
        files, model_file, lib = self._python_files("stream_tensorrt", "stream_portable")
        self._python_params(cfg, "stream", model_file, lib)
        _param(cfg, "sequence_idle_seconds", self.o.sequence_idle_us / 1e6)
        return Plan(cfg.name, "python", cfg, files, f"cm_deploy.runtime over {model_file}; the state of every "
                                                    "sequence kept in the model, by correlation id")

    def stream_onnxruntime(self) -> Plan:
        try:
            import onnx
        except ImportError:
            raise UserError("the streaming onnxruntime model is rewritten with the onnx package (START/READY "
                            "controls): pip install onnx, or leave stream out of --backends") from None
        from .stream_graph import serving_stream_graph
        proto = serving_stream_graph(onnx.load(str(self.dir / self.m["files"]["stream_tensorrt"])))
        cfg, seq = self._stream_base("stream_onnxruntime", "onnxruntime", "direct",
                                     [(START, "CONTROL_SEQUENCE_START"), (READY, "CONTROL_SEQUENCE_READY")])
        for e in self.m["stream"]["inputs"]:
            if not e["name"].startswith(STATE_PREFIX):
                continue
            dims = [int(d) for d in e["shape"][1:]] or [1]       # state.count (batch,) is (batch, 1) here
            st = seq.state.add(input_name=e["name"], output_name=NEXT_STATE_PREFIX + e["name"][len(STATE_PREFIX):],
                               data_type=_dtype(self.pb, e["dtype"]), dims=dims)
            st.initial_state.add(data_type=st.data_type, dims=dims, zero_data=True, name="zero")
        files = {"1/model.onnx": proto.SerializeToString()}
        self._op_library(cfg, cfg.name, files)
        return Plan(cfg.name, "onnxruntime", cfg, files, "model.stream.onnx with START/READY controls; Triton keeps "
                                                         "the state (implicit state, zero at START)")


def _find_engine(export_dir: Path, explicit) -> Path | None:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError(f"engine not found: {p}")
        return p
    found = sorted(p for p in export_dir.iterdir() if p.suffix in ENGINE_SUFFIXES and "stream" not in p.name)
    return found[0] if found else None


def _choose(opts: RepoOptions, export_dir, manifest, engine) -> list[str]:
    """The model folders to write, by SUFFIX key; UserError when an asked-for one cannot be made."""
    has_stream = "stream" in manifest and all((export_dir / manifest["files"].get(r, "-")).is_file()
                                              for r in STREAM_FILES)
    asked = opts.backends
    backends = list(asked) if asked else ["onnxruntime", "python"] + (["tensorrt"] if engine else []) + \
        (["stream"] if has_stream else [])
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UserError(f"--backends: unknown {unknown[0]!r}: choose from {', '.join(BACKENDS)}")
    if "tensorrt" in backends and engine is None:
        raise UserError(f"--backends tensorrt: no engine in {export_dir} (build one with `cm-deploy build "
                        f"{export_dir / FILES['tensorrt']}`, or pass --engine)")
    if "stream" in backends and not has_stream:
        raise UserError(f"--backends stream: {export_dir} has no streaming graphs (export with --streaming)")
    if asked is None and manifest.get("dtype") == "bfloat16":
        backends = [b for b in backends if b != "python"]
        opts.notes.append("bfloat16 export: no python backend model (numpy has no bfloat16)")
    keys = [b for b in ("onnxruntime", "tensorrt", "python") if b in backends]
    if "stream" in backends:
        stream_of = [b for b in ("onnxruntime", "python") if b in backends] or ["onnxruntime", "python"]
        keys += [f"stream_{b}" for b in stream_of]
    if not keys:
        raise UserError("--backends: nothing to write")
    return keys


def _check_options(o: RepoOptions):
    if not o.name or not all(c.isalnum() or c in "_-" for c in o.name):
        raise UserError(f"--name: use letters, digits, '_' and '-' (got {o.name!r})")
    if o.kind not in KINDS:
        raise UserError(f"--kind: use {', '.join(KINDS)} (got {o.kind!r})")
    if o.gpus and o.kind == "cpu":
        raise UserError("--gpus and --kind cpu contradict each other")
    for what, v in (("--max-batch", o.max_batch), ("--instances", o.instances), ("--max-sequences", o.max_sequences)):
        if v < 1:
            raise UserError(f"{what} must be at least 1 (got {v})")
    if o.queue_delay_us < 0 or o.sequence_idle_us < 1:
        raise UserError("--queue-delay-us must be >= 0 and --sequence-idle-us >= 1")
    bad = [b for b in o.preferred_batch if b < 1 or b > o.max_batch]
    if bad:
        raise UserError(f"--preferred-batch: {bad[0]} is outside [1, --max-batch {o.max_batch}]")
    if any(g < 0 for g in o.gpus):
        raise UserError("--gpus: device ids are >= 0")


def start_command(plans, server_root) -> str:
    libs = [server_root / p.folder / name for p in plans if p.backend == "tensorrt"
            for name in p.files if name.endswith(".so")]
    plugin = next((p for p in libs if p.name == PLUGIN_AUTOLOAD), libs[0] if libs else None)
    cmd = f"tritonserver --model-repository={server_root}"
    if plugin:
        cmd += f" --backend-config=tensorrt,plugins={plugin}"
    return cmd


def _readme(plans, server_root, opts) -> str:
    cmd = start_command(plans, server_root)
    lines = [f"# Triton model repository (cm-deploy {__version__} serve-repo)", "",
             "Start (docs/serving.md in cm-deploy says more):", "", f"    {cmd}", "",
             "| model | backend | what |", "| --- | --- | --- |"]
    lines += [f"| {p.folder} | {p.backend} | {p.what} |" for p in plans]
    if any(p.backend == "python" for p in plans):
        lines += ["", "The python backend's models import numpy, onnxruntime and cm_deploy: install them for the "
                      "server's Python, or list their site-packages folders in $CM_DEPLOY_PYTHONPATH when "
                      "starting the server (the backend's interpreter ignores PYTHONPATH)."]
    for n in opts.notes:
        lines.append(f"\nNote: {n}")
    return "\n".join(lines) + "\n"


def _place(src, dst: Path):
    dst.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, (bytes, bytearray)):
        dst.write_bytes(src)
        return
    try:
        os.link(src, dst)        # the same bytes, no second copy, where the file system allows
    except OSError:
        shutil.copy2(src, dst)


def write_repository(export_dir, out, opts: RepoOptions | None = None, force: bool = False) -> dict:
    """Write the model repository `out` from export folder `export_dir`; returns a summary
    {"repository", "models": [{name, backend, what, files}], "notes", "start"}. Bad input raises
    UserError before anything is written; an existing `out` must be empty unless `force` (then the
    model folders written here are replaced, each in one rename, and the rest is left alone)."""
    opts = opts or RepoOptions()
    export_dir, out = Path(export_dir), Path(out)
    _check_options(opts)
    if not export_dir.is_dir():
        raise UserError(f"{export_dir}: not an export folder (cm-deploy export writes one)")
    manifest = read_manifest(export_dir / MANIFEST_NAME)
    first = (manifest.get("inputs") or [{}])[0]
    if isinstance((first.get("shape") or [None])[0], int):
        raise UserError(f"{export_dir}: exported with a fixed batch: Triton batches requests, export without --batch")
    for role, name in manifest.get("files", {}).items():
        if not (export_dir / name).is_file() and role in FILES:
            raise UserError(f"{export_dir}: {name} is missing (the manifest lists it)")
    if out.resolve() == export_dir.resolve() or export_dir.resolve() in out.resolve().parents:
        raise UserError(f"refusing to write {out}: it is (inside) the export folder {export_dir}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise UserError(f"{out} exists and is not an empty folder (pass --force to replace its cm-deploy models)")
    engine = _find_engine(export_dir, opts.engine)
    keys = _choose(opts, export_dir, manifest, engine)
    b = _Builder(export_dir, manifest, opts, out)
    plans = [b.tensorrt(engine) if k == "tensorrt" else getattr(b, k)() for k in keys]

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.serve-", dir=out.parent))
    try:
        for p in plans:
            folder = stage / p.folder
            header = (f"# {p.folder}: written by cm-deploy {__version__} serve-repo from {export_dir.resolve()}\n"
                      f"# {p.what}\n")
            folder.mkdir()
            (folder / "config.pbtxt").write_text(header + b.text_format.MessageToString(p.config))
            for rel, src in p.files.items():
                _place(src, folder / rel)
        (stage / "README.md").write_text(_readme(plans, b.server_root, opts))
        _commit(stage, out, [p.folder for p in plans] + ["README.md"])
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"repository": str(out), "start": start_command(plans, b.server_root), "notes": list(opts.notes),
            "models": [{"name": p.folder, "backend": p.backend, "what": p.what,
                        "files": sorted(["config.pbtxt", *p.files])} for p in plans]}


def _commit(stage: Path, out: Path, names):
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        with contextlib.suppress(OSError):
            out.rmdir()
        os.rename(stage, out)               # the whole repository appears at once
        stage.mkdir()                       # (for the caller's cleanup)
        return
    old = stage / ".replaced"
    old.mkdir()
    for n in names:                         # each model folder swapped in one rename
        if (out / n).exists():
            os.rename(out / n, old / n)
        os.rename(stage / n, out / n)
