"""Checkpoint -> DIR/model.onnx (TensorRT), DIR/model.portable.onnx (any ONNX Runtime), DIR/manifest.json.

Both graphs come from ONE torch.onnx.export (dynamo) run of the model with every layer's scan set to
impl="onnx", which emits the custom node cm_deploy::CoupledScan (symbolic.py). The TensorRT file is
that graph as exported (no function body, so TensorRT's parser looks for the CoupledScan plugin);
the portable file is a copy that also carries CoupledScan as a model-local ONNX function written in
standard ops (portable.py).
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from .. import __version__
from ..checkpoint import load_checkpoint
from ..contract import (BATCH_DIM, CHUNK_DIM, DOMAIN, DOMAIN_VERSION, FILES, MANIFEST_FORMAT, MANIFEST_NAME,
                        MAX_MODALITIES, MAX_STATES, NEXT_STATE_PREFIX, OP_TYPE, OUTPUT_NAME, PLUGIN_VERSION,
                        SIDECAR_FORMAT, STATE_PREFIX, STREAM_FILES, input_names, length_dim)
from ..errors import UserError
from ..progress import silent
from .portable import make_portable

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# 18: the exporter's native opset (no version conversion) and what TensorRT 10 / TensorRT-RTX and
# ONNX Runtime >= 1.14 all read. bfloat16 needs 22: Conv has no bfloat16 before it.
DEFAULT_OPSET = 18
MIN_OPSET = {"float32": 18, "float16": 18, "bfloat16": 22}


class _Streaming(nn.Module):
    """model.step with positional inputs: the chunks, their lengths, then the state tensors (in
    state_specs order); outputs: the prediction, then the next state tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.keys = list(model.state_specs())

    def forward(self, *args):
        m = len(self.model.names)
        out, state = self.model.step(list(args[:m]), dict(zip(self.keys, args[2 * m:])), lengths=list(args[m:2 * m]))
        return (out, *(state[k] for k in self.keys))


def stream_io_names(model) -> tuple[list, list]:
    """(inputs, outputs) of the streaming graphs."""
    keys = list(model.state_specs())
    return (input_names(model.config.modalities) + [STATE_PREFIX + k for k in keys],
            [OUTPUT_NAME] + [NEXT_STATE_PREFIX + k for k in keys])


class _Positional(nn.Module):
    """The model with positional inputs (config order): the modalities, then their lengths."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        m = len(args) // 2
        return self.model(list(args[:m]), lengths=list(args[m:]))


# ----------------------------------------------------------------------------------------------
# options

def _check_options(config, dtype, opset, batch, lengths):
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    lo, hi = MIN_OPSET[dtype], onnx.defs.onnx_opset_version()
    if opset is None:
        opset = max(DEFAULT_OPSET, lo)
    if not isinstance(opset, int) or isinstance(opset, bool) or not lo <= opset <= hi:
        raise UserError(f"opset must be an int in [{lo}, {hi}] for {dtype}, got {opset!r}")
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise UserError(f"batch must be a positive int (or None for dynamic), got {batch!r}")
    lengths = dict(lengths or {})
    for name, n in lengths.items():
        if name not in config.modalities:
            raise UserError(f"lengths: unknown modality {name!r} (the model has {list(config.modalities)})")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserError(f"lengths[{name!r}] must be a positive int, got {n!r}")
    if config.d_state > MAX_STATES or config.n_modalities > MAX_MODALITIES:
        raise UserError(f"the exported CoupledScan's kernels take d_state <= {MAX_STATES} and at most "
                        f"{MAX_MODALITIES} modalities; this model has d_state {config.d_state} and "
                        f"{config.n_modalities} modalities")
    names = input_names(config.modalities)
    if OUTPUT_NAME in names or len(set(names)) != len(names):
        raise UserError(f"modality names {list(config.modalities)} clash with the graph's other names "
                        f"({OUTPUT_NAME!r}, '<modality>_lengths')")
    return opset, lengths


# ----------------------------------------------------------------------------------------------
# torch -> ONNX

def _prepare(model, dtype):
    """A copy of `model` at `dtype` (the model's one precision policy) with the ONNX scan."""
    return copy.deepcopy(model).eval().to_precision(dtype).set_scan_impl("onnx").fold_for_inference()


def _example_inputs(config, dtype, batch, length_of):
    """Example modality inputs and their full lengths; length_of(i, name) gives a modality's L.
    Distinct example sizes (batch 2; lengths 5, 7, 9, ...) keep the tracer from taking two dynamic
    dims for one, and none is 0 or 1 (which it would specialise)."""
    b = batch if batch is not None else 2
    xs, lens = [], []
    for i, (name, feat) in enumerate(config.modalities.items()):
        L = length_of(i, name)
        xs.append(torch.randn(b, L, feat, generator=torch.Generator().manual_seed(i)).to(DTYPES[dtype]))
        lens.append(torch.full((b,), L, dtype=torch.int64))
    return xs + lens


def _dynamic_shapes(config, batch, lengths):
    Dim = torch.export.Dim
    b = Dim(BATCH_DIM, min=1) if batch is None else None
    shapes = []
    for name in config.modalities:
        spec = {}
        if b is not None:
            spec[0] = b
        if name not in lengths:
            spec[1] = Dim(length_dim(name), min=1)
        shapes.append(spec or None)
    shapes += [{0: b} if b is not None else None for _ in config.modalities]     # the lengths: (batch,)
    return (tuple(shapes),)     # one entry: forward's *args


def _stream_example_and_shapes(model, config, dtype, batch):
    """Example chunk inputs (T = 5 for every modality), lengths, zero state; their dynamic shapes."""
    Dim = torch.export.Dim
    args = _example_inputs(config, dtype, batch, lambda i, name: 5)
    state = list(model.initial_state(args[0].shape[0]).values())
    bd = Dim(BATCH_DIM, min=1) if batch is None else None
    T = Dim(CHUNK_DIM, min=1)
    M = config.n_modalities
    shapes = [({0: bd, 1: T} if bd is not None else {1: T}) for _ in range(M)]
    shapes += [{0: bd} if bd is not None else None for _ in range(M + len(state))]
    return tuple(args + state), (tuple(shapes),)


def _torch_export(model, config, dtype, opset, batch, lengths, streaming=False) -> onnx.ModelProto:
    prepared = _prepare(model, dtype)
    if streaming:
        wrapped = _Streaming(prepared)
        args, dynamic = _stream_example_and_shapes(prepared, config, dtype, batch)
        names_in, names_out = stream_io_names(prepared)
    else:
        wrapped = _Positional(prepared)
        args = tuple(_example_inputs(config, dtype, batch, lambda i, name: lengths.get(name, 5 + 2 * i)))
        dynamic = _dynamic_shapes(config, batch, lengths)
        names_in, names_out = input_names(config.modalities), [OUTPUT_NAME]
    return torch_onnx_export(wrapped, args, opset, names_in, names_out, dynamic)


def torch_onnx_export(module, args, opset, names_in, names_out, dynamic) -> onnx.ModelProto:
    """torch.onnx.export (dynamo) of module(*args), its chatter kept out of the terminal."""
    log = io.StringIO()
    # The exporter narrates every step and torch warns about its own internals: keep that out of
    # the user's terminal, but put it in the error when the export fails.
    torch_log = logging.getLogger("torch.onnx")     # e.g. "torchvision is not installed"
    level = torch_log.level
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            torch_log.setLevel(logging.ERROR)
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset,
                input_names=names_in, output_names=names_out, dynamic_shapes=dynamic, verbose=False)
    except Exception as e:
        tail = "\n".join(log.getvalue().strip().splitlines()[-20:])
        raise RuntimeError(f"torch.onnx.export failed: {e}\n{tail}") from e
    finally:
        torch_log.setLevel(level)
    return program.model_proto


def _dims(value_info):
    return [d.dim_param if d.HasField("dim_param") else int(d.dim_value)
            for d in value_info.type.tensor_type.shape.dim]


def _dtype_name(value_info):
    return onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type).name \
        if value_info.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16 else "bfloat16"


def _finish_tensorrt_graph(proto, config, dtype, batch, lengths, stream_io=None):
    """Check the exported graph against the contract; fix what the exporter leaves open.
    stream_io: (input names, output names) of a streaming graph."""
    g = proto.graph
    names = [i.name for i in g.input]
    want_in, want_out = stream_io or (input_names(config.modalities), [OUTPUT_NAME])
    if names != want_in or [o.name for o in g.output] != want_out:
        raise RuntimeError(f"exporter produced inputs {names} and outputs {[o.name for o in g.output]}")
    # Pin the symbolic dims' names to the contract's ("batch", "L_<modality>" or the chunk's "T")
    # whatever the exporter called them, on the inputs and on the output.
    M = config.n_modalities
    for vi, name in zip(g.input[:M], config.modalities):
        dims = vi.type.tensor_type.shape.dim
        if batch is None:
            dims[0].dim_param = BATCH_DIM
        if stream_io:
            dims[1].dim_param = CHUNK_DIM
        elif name not in lengths:
            dims[1].dim_param = length_dim(name)
    for vi in g.input[M:2 * M]:
        if vi.type.tensor_type.elem_type != onnx.TensorProto.INT64 or len(vi.type.tensor_type.shape.dim) != 1:
            raise RuntimeError(f"exporter produced lengths input {vi.name} that is not int64 (batch,)")
        if batch is None:
            vi.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    if batch is None:       # state tensors: (batch, ...)
        for vi in list(g.input[2 * M:]) + list(g.output[1:]):
            vi.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    out = g.output[0].type.tensor_type.shape
    want = [BATCH_DIM if batch is None else batch, config.num_outputs]
    del out.dim[:]
    for d in want:
        out.dim.add().CopyFrom(onnx.TensorShapeProto.Dimension(
            **({"dim_param": d} if isinstance(d, str) else {"dim_value": d})))
    nodes = [n for n in g.node if n.op_type == OP_TYPE]
    expected = config.n_layers * (1 if config.coupled else config.n_modalities)
    if len(nodes) != expected or any(n.domain != DOMAIN for n in nodes):
        raise RuntimeError(f"expected {expected} {DOMAIN}::{OP_TYPE} nodes, found {len(nodes)}")
    form = (9, 2) if stream_io else (8, 1)
    if any((len(n.input), len(n.output)) != form for n in nodes):
        raise RuntimeError(f"expected every {OP_TYPE} node with {form[0]} inputs and {form[1]} outputs")
    if any(f.name == OP_TYPE for f in proto.functions):
        raise RuntimeError(f"the TensorRT graph must not define a function {OP_TYPE}")
    if not any(o.domain == DOMAIN and o.version == DOMAIN_VERSION for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    onnx.helper.set_model_props(proto, {
        "cm_deploy.version": __version__,
        "cm_deploy.config": json.dumps(config.to_dict(), sort_keys=True),
        "cm_deploy.dtype": dtype,
    })
    proto.producer_name, proto.producer_version = "cm-deploy", __version__
    return len(nodes)


def _check(proto, what):
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise RuntimeError(f"{what} fails onnx.checker: {e}") from e


def build_onnx(model, *, dtype="float32", opset=None, batch=None, lengths=None, streaming=False):
    """(tensorrt ModelProto, portable ModelProto, info) for a CoupledMamba; nothing is written.
    streaming: the step graphs (chunks + state in, prediction + next state out) instead."""
    config = model.config
    opset, lengths = _check_options(config, dtype, opset, batch, lengths)
    trt = _torch_export(model, config, dtype, opset, batch, lengths, streaming=streaming)
    count = _finish_tensorrt_graph(trt, config, dtype, batch, lengths,
                                   stream_io=stream_io_names(model) if streaming else None)
    portable = make_portable(trt)
    _check(trt, FILES["tensorrt"])
    _check(portable, FILES["portable"])
    real_opset = next(o.version for o in trt.opset_import if o.domain in ("", "ai.onnx"))
    return trt, portable, {"opset": real_opset, "count": count}


# ----------------------------------------------------------------------------------------------
# files

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _io(proto) -> dict:
    g = proto.graph
    dyn = {}
    for vi in list(g.input) + list(g.output):
        dyn[vi.name] = {str(i): d for i, d in enumerate(_dims(vi)) if isinstance(d, str)}
    return {"inputs": [{"name": vi.name, "shape": _dims(vi), "dtype": _dtype_name(vi)} for vi in g.input],
            "outputs": [{"name": vi.name, "shape": _dims(vi), "dtype": _dtype_name(vi)} for vi in g.output],
            "dynamic_axes": dyn}


def _manifest(proto, config, dtype, info, checkpoint, stream=None):
    """stream: the streaming graph (its inputs, outputs and state names go under "stream")."""
    io = _io(proto)
    m = {
        "format": MANIFEST_FORMAT,
        "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": checkpoint,
        "config": config.to_dict(),
        "dtype": dtype,
        "opset": info["opset"],
        "files": dict(FILES, **(STREAM_FILES if stream is not None else {})),
        **io,
        "custom_ops": [{"domain": DOMAIN, "op_type": OP_TYPE, "count": info["count"],
                        "plugin_name": OP_TYPE, "plugin_version": PLUGIN_VERSION}],
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
    }
    if stream is not None:
        sio = _io(stream)
        sio["state"] = [e["name"][len(STATE_PREFIX):] for e in sio["inputs"] if e["name"].startswith(STATE_PREFIX)]
        m["stream"] = sio
    return m


class _Staging:
    """A temporary folder next to (or inside) `out_dir`; commit() moves its files into place.
    On failure the folder, and any parent folders created for it, are removed."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.created = []     # parent folders we made, outermost first
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"cannot write to {out_dir}: it exists and is not a folder")
        try:
            missing = []
            p = out_dir.parent
            while not p.exists():
                missing.append(p)
                p = p.parent
            for p in reversed(missing):
                p.mkdir()
                self.created.append(p)
            home = out_dir if out_dir.is_dir() else out_dir.parent
            self.path = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=home))
        except OSError as e:
            self._remove_created()
            raise UserError(f"cannot write to {out_dir}: {e.strerror or e}") from None

    def _remove_created(self):
        for p in reversed(self.created):
            with contextlib.suppress(OSError):
                p.rmdir()

    def abort(self):
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_created()

    def commit(self, order):
        if not self.out_dir.exists():
            with contextlib.suppress(OSError):
                os.rename(self.path, self.out_dir)     # the whole folder appears at once
                return
        # An existing folder: replace file by file (each rename is atomic), the manifest last, so
        # a reader never sees a half-written file and the manifest never names missing ones.
        for name in order:
            os.replace(self.path / name, self.out_dir / name)
        shutil.rmtree(self.path, ignore_errors=True)


def _owned_by_previous_export(out_dir: Path) -> set:
    """The files the manifest already in `out_dir` lists (plain names of the contract's files only),
    or an empty set when there is no readable cm-deploy manifest: only these may be removed."""
    try:
        old = json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return set()
    if not isinstance(old, dict) or old.get("format") != MANIFEST_FORMAT or not isinstance(old.get("files"), dict):
        return set()
    ours = {*FILES.values(), *STREAM_FILES.values()}
    return {n for n in old["files"].values() if isinstance(n, str) and n in ours}


def _replace_previous(out_dir: Path, owned: set, written: set) -> dict:
    """After an export into a folder that held another one: remove the files the previous manifest
    owned that this export did not write (they would pose as part of it), and name the engines built
    from the previous files (not the manifest's to remove: `cm-deploy build` wrote them)."""
    removed = []
    for name in sorted(owned - written):
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()
            removed.append(name)
    stale = []
    for side in sorted(out_dir.glob("*.json")):
        try:
            d = json.loads(side.read_text())
            src = Path(d["onnx"]["path"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            continue
        engine = side.with_suffix("")
        if d.get("format") == SIDECAR_FORMAT and engine.is_file() and src.parent == out_dir.resolve() \
                and (not src.is_file() or _sha256(src) != d["onnx"].get("sha256")):
            stale.append({"engine": engine.name, "onnx": src.name})
    return {"removed": removed, "stale_engines": stale}


def _save(proto, path: Path):
    onnx.save_model(proto, str(path))


def write_files(staging: _Staging, graphs: dict, manifest: dict) -> None:
    """The graphs ({file name: ModelProto}) and manifest.json into the staging folder, then into
    place (the manifest last); UserError when the folder cannot be written."""
    try:
        for name, proto in graphs.items():
            _save(proto, staging.path / name)
        (staging.path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        staging.commit([*graphs, MANIFEST_NAME])
    except OSError as e:
        raise UserError(f"cannot write to {staging.out_dir}: {e.strerror or e}") from None


def export_checkpoint(ckpt_path, out_dir, *, dtype="float32", opset=None, batch=None,
                      lengths=None, streaming=False, progress=silent) -> dict:
    """Export a cm-deploy checkpoint to `out_dir` and return the manifest (also written there).

    dtype: "float32", "float16" or "bfloat16" for the graph's inputs, output and activations (A, D,
        delta_bias and the scan state stay float32).
    opset: ONNX opset (default 18).
    batch: an int fixes the batch dimension; None keeps it dynamic ("batch").
    lengths: {modality: int} fixes those modalities' sequence lengths; the others stay dynamic
        ("L_<modality>").
    streaming: also DIR/model.stream.onnx and DIR/model.stream.portable.onnx (docs/streaming.md).
    progress: called with a short message before each step that can take seconds.
    Writes DIR/model.onnx, DIR/model.portable.onnx and DIR/manifest.json; all or nothing. Bad
    input (checkpoint, options, output folder) raises cm_deploy.errors.UserError. Into a folder that
    holds another export: the files its manifest lists and this export does not write (e.g. the
    streaming graphs) are removed; nothing the manifest does not list is touched. Then the returned
    manifest has a key "_replaced" (not in the written file) that names them ("removed") and the
    engines built from the previous files ("stale_engines", left in place).
    """
    ckpt_path = Path(ckpt_path)
    out_dir = Path(out_dir)
    progress(f"loading {ckpt_path}")
    try:
        model = load_checkpoint(ckpt_path)
    except RuntimeError as e:   # load_state_dict: a tensor whose shape does not fit the config
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        detail = lines[min(1, len(lines) - 1)]     # the first "size mismatch for ..." line
        raise UserError(f"{ckpt_path}: weights do not match the config: {detail}") from None
    _check_options(model.config, dtype, opset, batch, lengths)     # fail before any file exists
    checkpoint = {"path": str(ckpt_path.resolve()), "sha256": _sha256(ckpt_path)}
    owned = _owned_by_previous_export(out_dir)
    staging = _Staging(out_dir)
    try:
        progress(f"tracing the model into {FILES['tensorrt']} and {FILES['portable']} (torch.export)")
        trt, portable, info = build_onnx(model, dtype=dtype, opset=opset, batch=batch, lengths=lengths)
        graphs = {FILES["tensorrt"]: trt, FILES["portable"]: portable}
        stream = None
        if streaming:
            progress("tracing the streaming graphs")
            stream, stream_portable, _ = build_onnx(model, dtype=dtype, opset=opset, batch=batch, streaming=True)
            graphs.update({STREAM_FILES["stream_tensorrt"]: stream, STREAM_FILES["stream_portable"]: stream_portable})
        progress(f"writing {out_dir}")
        manifest = _manifest(trt, model.config, dtype, info, checkpoint, stream=stream)
        write_files(staging, graphs, manifest)
    except BaseException:
        staging.abort()
        raise
    replaced = _replace_previous(out_dir, owned, {*graphs, MANIFEST_NAME})
    if replaced["removed"] or replaced["stale_engines"]:   # a runtime-only key (as manifest_for's _role)
        return dict(manifest, _replaced=replaced)
    return manifest
