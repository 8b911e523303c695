"""Tensor specs, dtypes, manifests and input checks shared by every backend. numpy only.

Every backend describes its inputs and outputs as TensorSpec (name, shape with ints for fixed axes and
symbol strings such as "batch" or "L_text" for dynamic ones, numpy dtype name) and validates a
feed dict with `check_feeds` BEFORE anything reaches a device, so a wrong input is one clear
UserError line instead of a TensorRT/ORT stack trace.

Axis convention of the exported graphs (DESIGN.md section 4, export manifest): a modality input is
(batch, L_m, F_m): axis 0 is the batch, axis 1 the modality's length. Shape choices for parity and
profiling (`ShapeChoice`) use that convention, not the symbol names, so they also work for models
whose dynamic axes are unnamed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..contract import LENGTHS_SUFFIX, MANIFEST_FORMAT, MANIFEST_NAME, STATE_PREFIX
from ..errors import InputCastWarning, UserError


def np_dtype(name: str) -> np.dtype:
    """numpy dtype of a dtype name; bfloat16 comes from ml_dtypes (numpy has none)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise UserError("bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        return np.dtype(name)
    except TypeError:
        raise UserError(f"unknown dtype {name!r}") from None


def dtype_name(dt) -> str:
    dt = np.dtype(dt)
    return "bfloat16" if dt.name == "bfloat16" else dt.name


# __cuda_array_interface__ typestr -> dtype name. bfloat16 has no standard typestr: a 2-byte void
# ("<V2", what ml_dtypes reports) is accepted for bfloat16 inputs, as are int16/uint16 bit views
# (torch cannot export bf16 through the interface; pass t.view(torch.int16)).
_TYPESTR = {"f4": "float32", "f2": "float16", "f8": "float64", "i8": "int64", "i4": "int32",
            "i2": "int16", "i1": "int8", "u1": "uint8", "u2": "uint16", "b1": "bool", "V2": "bfloat16"}
_BF16_VIEWS = {"bfloat16", "int16", "uint16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple          # int for a fixed axis; str symbol or None for a dynamic one
    dtype: str            # numpy dtype name ("float32", "float16", "bfloat16", "int64", ...)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(str(d["name"]), tuple(d["shape"]), str(d["dtype"]))

    def __str__(self):
        dims = "x".join(str(s) if s is not None else "?" for s in self.shape)
        return f"{self.name}[{dims}] {self.dtype}"


@dataclass
class ArrayInfo:
    """What check_feeds needs of one input, from a host array or a __cuda_array_interface__."""
    shape: tuple
    dtype: str
    on_device: bool
    ptr: int | None = None
    stream: int | None = None
    contiguous: bool = True
    ortvalue: bool = False   # an onnxruntime.OrtValue (on the CPU or a GPU): the ORT backend binds it as is


# ONNX Runtime's type strings -> dtype names
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
             "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def is_ortvalue(value) -> bool:
    return type(value).__name__ == "OrtValue" and callable(getattr(value, "device_name", None))


def c_contiguous_strides(shape, itemsize):
    strides, acc = [], itemsize
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def cai_info(obj) -> ArrayInfo:
    """Parse obj.__cuda_array_interface__ (version 0-3) without touching the GPU."""
    try:
        cai = obj.__cuda_array_interface__
    except Exception as e:   # torch raises for dtypes it cannot describe (bfloat16)
        raise UserError(f"{type(obj).__name__} has no usable __cuda_array_interface__: {e}") from None
    try:
        shape = tuple(int(s) for s in cai["shape"])
        typestr = str(cai["typestr"])
        ptr = int(cai["data"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"malformed __cuda_array_interface__ on {type(obj).__name__}") from None
    if cai.get("mask") is not None:
        raise UserError("masked CUDA arrays are not supported")
    code = typestr[1:]
    if code not in _TYPESTR:
        raise UserError(f"unsupported CUDA array typestr {typestr!r}")
    dt = _TYPESTR[code]
    itemsize = int(code[1:])
    strides = cai.get("strides")
    contiguous = True
    if strides is not None:
        want = c_contiguous_strides(shape, itemsize)
        contiguous = all(s == w or d == 1 for s, w, d in zip(strides, want, shape))
    stream = cai.get("stream")
    return ArrayInfo(shape, dt, True, ptr, int(stream) if stream is not None else None, contiguous)


def array_info(value) -> ArrayInfo:
    if is_ortvalue(value):
        return ArrayInfo(tuple(value.shape()), ORT_TYPES.get(value.data_type(), value.data_type()),
                         value.device_name().lower() != "cpu", value.data_ptr(), ortvalue=True)
    if hasattr(value, "__cuda_array_interface__"):
        return cai_info(value)
    if isinstance(value, np.ndarray):
        return ArrayInfo(tuple(value.shape), dtype_name(value.dtype), False)
    try:
        arr = np.asarray(value)   # CPU torch tensors, lists
    except Exception as e:
        raise UserError(f"cannot read an array from {type(value).__name__}: {e}") from None
    return ArrayInfo(tuple(arr.shape), dtype_name(arr.dtype), False)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_feeds(where: str, specs: Sequence[TensorSpec], feeds: Mapping, ranges: Mapping | None = None,
                ) -> dict[str, ArrayInfo]:
    """Validate feeds against specs: names, ranks, dtypes, fixed dims, one value per symbol, and
    (when `ranges` maps input name -> [(min, max) per axis]) the engine's profile. Returns the
    ArrayInfo of every input. Raises UserError with one line."""
    if not isinstance(feeds, Mapping):
        raise UserError(f"{where}: inputs must be a dict name -> array, got {type(feeds).__name__}")
    names = [s.name for s in specs]
    optional = optional_inputs(specs)
    missing = [n for n in names if n not in feeds]
    # an optional input is missing only because its modality is: name what the caller must give
    missing = [n for n in missing if n not in optional] or missing
    extra = [k for k in feeds if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(map(repr, missing)))
        if extra:
            parts.append("unexpected " + ", ".join(map(repr, extra)))
        raise UserError(f"{where}: wrong input names ({'; '.join(parts)}); expected {expected_inputs(specs)}")
    infos, symbols = {}, {}
    for spec in specs:
        info = array_info(feeds[spec.name])
        if info.dtype != spec.dtype and not (spec.dtype == "bfloat16" and info.on_device
                                             and info.dtype in _BF16_VIEWS):
            raise UserError(f"{where}: input {spec.name!r} has dtype {info.dtype}, expected {spec.dtype}")
        if len(info.shape) != spec.rank:
            raise UserError(f"{where}: input {spec.name!r} has rank {len(info.shape)} {_fmt_shape(info.shape)}, "
                            f"expected rank {spec.rank} {_fmt_shape(spec.shape)}")
        if info.on_device and not info.contiguous:
            raise UserError(f"{where}: CUDA input {spec.name!r} is not C-contiguous; pass a contiguous "
                            "array (the runtime uses the pointer as is, without copying)")
        for axis, (got, want) in enumerate(zip(info.shape, spec.shape)):
            if isinstance(want, int) and want >= 0 and got != want:
                raise UserError(f"{where}: input {spec.name!r} axis {axis} is {got}, expected {want} "
                                f"(shape {_fmt_shape(info.shape)}, expected {_fmt_shape(spec.shape)})")
            if isinstance(want, str) and want:
                seen = symbols.setdefault(want, (got, spec.name))
                if seen[0] != got:
                    raise UserError(f"{where}: dimension {want!r} is {seen[0]} in {seen[1]!r} but {got} in "
                                    f"{spec.name!r}")
        if ranges and spec.name in ranges:
            for axis, (got, (lo, hi)) in enumerate(zip(info.shape, ranges[spec.name])):
                if not lo <= got <= hi:
                    sym = spec.shape[axis]
                    label = f" ({sym})" if isinstance(sym, str) else ""
                    raise UserError(f"{where}: input {spec.name!r} axis {axis}{label} is {got}, outside the "
                                    f"engine's profile [{lo}, {hi}]; rebuild with a wider profile")
        if any(d < 0 for d in info.shape):
            raise UserError(f"{where}: input {spec.name!r} has a negative dimension {_fmt_shape(info.shape)}")
        infos[spec.name] = info
    return infos


# ---------------------------------------------------------------------------- manifests

def read_json(path, what: str) -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable {what}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a {what} (expected a JSON object)")
    return obj


def read_manifest(path) -> dict:
    m = read_json(path, "export manifest")
    if m.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path}: not a cm-deploy export manifest (format {m.get('format')!r}, "
                        f"expected {MANIFEST_FORMAT!r})")
    return m


def manifest_for(model_path) -> dict | None:
    """The export manifest that describes an ONNX file (manifest.json beside it that lists it), or None."""
    model_path = Path(model_path)
    cand = model_path.parent / MANIFEST_NAME
    if not cand.is_file():
        return None
    try:
        m = read_manifest(cand)
    except UserError:
        return None
    files = m.get("files") or {}
    if model_path.name not in files.values():
        return None
    m = dict(m)
    m["_path"] = str(cand)
    # "tensorrt" | "portable" | "stream_tensorrt" | "stream_portable"
    m["_role"] = next(k for k, v in files.items() if v == model_path.name)
    if m["_role"].startswith("stream_"):     # a streaming graph: its own inputs and outputs
        m.update({k: v for k, v in (m.get("stream") or {}).items() if k in ("inputs", "outputs", "dynamic_axes")})
    return m


def specs_from_manifest(entries) -> list[TensorSpec]:
    out = []
    for e in entries or []:
        try:
            out.append(TensorSpec.from_dict(e))
        except (KeyError, TypeError) as err:
            raise UserError(f"manifest: malformed tensor entry {e!r}: {err}") from None
    return out


# ---------------------------------------------------------------------------- shapes and random inputs

@dataclass
class ShapeChoice:
    """One concrete input shape set: a batch and a length per input (axis 1), by input name."""
    batch: int
    lengths: dict = field(default_factory=dict)

    def label(self) -> str:
        ls = sorted(set(self.lengths.values()))
        return f"batch={self.batch} L=" + ("/".join(f"{k}:{v}" for k, v in self.lengths.items())
                                          if len(ls) > 1 else str(ls[0] if ls else "-"))

    def common_length(self):
        ls = set(self.lengths.values())
        return ls.pop() if len(ls) == 1 else None


def concrete_shape(spec: TensorSpec, choice: ShapeChoice) -> tuple:
    shape = []
    for axis, d in enumerate(spec.shape):
        if isinstance(d, int) and d >= 0:
            shape.append(d)
        elif axis == 0:
            shape.append(choice.batch)
        elif axis == 1 and spec.name in choice.lengths:
            shape.append(choice.lengths[spec.name])
        else:
            raise UserError(f"input {spec.name!r} axis {axis} is dynamic ({d!r}) and no value was given for it")
    return tuple(shape)


def refuse_overwrite(output, *inputs) -> None:
    """UserError when writing `output` would replace one of a command's own `inputs` (same file,
    whatever the spelling of the path)."""
    out = Path(output)
    for i in inputs:
        if i is None:
            continue
        p = Path(i)
        same = out.resolve() == p.resolve()
        if not same and out.exists() and p.exists():
            try:
                same = out.samefile(p)
            except OSError:
                same = False
        if same:
            raise UserError(f"refusing to write {out}: it is an input of this command ({p})")


def check_nonempty(where: str, specs: Sequence[TensorSpec], infos: Mapping) -> None:
    """Every sequence input has at least one step and the batch at least one sample."""
    seq = set(length_inputs(specs))
    for s in specs:
        shape = infos[s.name].shape
        if shape and shape[0] == 0:
            raise UserError(f"{where}: input {s.name!r} has batch 0: nothing to run")
        if s.name in seq and shape[1] == 0:
            raise UserError(f"{where}: input {s.name!r} has 0 steps; every sequence needs at least one "
                            f"(an empty sample is one with {s.name}{LENGTHS_SUFFIX} = 0)")


def check_finite(where: str, specs: Sequence[TensorSpec], feeds: Mapping, infos: Mapping) -> None:
    """Float host inputs hold no NaN/Inf within their valid steps (padding past a sample's
    <name>_lengths may hold anything). UserError (one line) naming the first bad element."""
    for s in specs:
        if infos[s.name].on_device or infos[s.name].ortvalue or np_dtype(s.dtype).kind not in "fV":
            continue
        a = np.asarray(feeds[s.name])
        a = a.astype(np.float32) if a.dtype.kind == "V" or a.dtype.name == "bfloat16" else a
        bad = ~np.isfinite(a)
        valid = _valid_steps(specs, feeds, s.name, a)
        if valid is not None:
            bad &= valid
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise UserError(f"{where}: input {s.name!r} holds {int(bad.sum())} NaN/Inf value(s) within its valid "
                            f"steps, the first at {idx} (pass --no-check-finite to run anyway)")


def optional_inputs(specs: Sequence[TensorSpec]) -> set[str]:
    """Inputs a caller may leave out (fill_defaults fills them): lengths and stream state."""
    return set(valid_length_inputs(specs)) | {s.name for s in specs if s.name.startswith(STATE_PREFIX)}


def expected_inputs(specs: Sequence[TensorSpec]) -> str:
    """The inputs for an error message, the optional ones marked as such (state.* counted, not listed)."""
    optional = optional_inputs(specs)
    required = [s.name for s in specs if s.name not in optional]
    lens = [s.name for s in specs if s.name in optional and not s.name.startswith(STATE_PREFIX)]
    states = len(optional) - len(lens)
    opt = lens + ([f"{STATE_PREFIX}* ({states} tensors, zeros when left out)"] if states else [])
    return ", ".join(required) + (f" (optional: {', '.join(opt)})" if opt else "")


def merge_lengths(feeds: Mapping, lengths: Mapping | None) -> Mapping:
    """`feeds` with `lengths` ({modality or <modality>_lengths: (batch,) valid steps}) added as the
    graph's `<modality>_lengths` inputs: the `run(x, lengths=...)` / `Stream.push(chunk, lengths=...)` form."""
    if not lengths:
        return feeds
    if not isinstance(lengths, Mapping):
        raise UserError(f"lengths must be a dict modality -> (batch,) valid steps, got {type(lengths).__name__}")
    out = dict(feeds)
    for name, v in lengths.items():
        key = name if name.endswith(LENGTHS_SUFFIX) else name + LENGTHS_SUFFIX
        if key in feeds:
            raise UserError(f"{key!r} given twice: in the inputs and in lengths=")
        out[key] = v
    return out


def _valid_steps(specs: Sequence[TensorSpec], feeds: Mapping, name: str, a: np.ndarray):
    """Boolean mask of the valid steps of input `name` (broadcastable to `a`), or None when every
    element counts (no lengths for it, or not a sequence)."""
    lens = {m: k for k, m in valid_length_inputs(specs).items()}
    if name not in lens or lens[name] not in feeds or a.ndim < 2:
        return None
    valid = np.arange(a.shape[1])[None, :] < np.asarray(feeds[lens[name]]).reshape(-1, 1)
    return valid.reshape(valid.shape + (1,) * (a.ndim - 2))


def cast_inputs(where: str, specs: Sequence[TensorSpec], feeds: Mapping) -> tuple[Mapping, list[str]]:
    """Host arrays of another dtype than their input's, cast where no value changes beyond the
    target's rounding: floats to the graph's float type (float64 or float32 to float32, float16,
    bfloat16), refused when a finite value within the valid steps would overflow it; integers and
    whole-valued floats to int64 lengths, refused when a value is not whole or out of range.
    Returns (feeds, ["'text' float64 -> float32", ...]); anything else is left for check_feeds."""
    by_name = {s.name: s for s in specs}
    # lengths first: the float inputs' valid steps are read from them
    order = sorted((k for k in feeds if k in by_name), key=lambda k: np_dtype(by_name[k].dtype).kind in "fV")
    out, notes = dict(feeds), []
    for name in order:
        spec, value = by_name[name], feeds[name]
        if is_ortvalue(value) or hasattr(value, "__cuda_array_interface__"):
            continue      # device memory is bound as is, never copied: check_feeds names a wrong dtype
        try:
            a = value if isinstance(value, np.ndarray) else np.asarray(value)
        except Exception:
            continue
        have, want = dtype_name(a.dtype), spec.dtype
        if have == want:
            continue
        target = np_dtype(want)
        if target.kind in "fV" and (a.dtype.kind == "f" or have == "bfloat16"):
            with np.errstate(over="ignore", invalid="ignore"):
                cast = a.astype(target)
            over = np.isfinite(a.astype(np.float64)) & ~np.isfinite(cast.astype(np.float64))
            valid = _valid_steps(specs, out, name, a)
            if valid is not None:
                over &= valid
            if over.any():
                idx = tuple(int(i) for i in np.argwhere(over)[0])
                raise UserError(f"{where}: input {name!r} ({have}) holds {int(over.sum())} value(s) beyond "
                                f"{want}'s range, the first {float(a[idx]):.6g} at {idx}: casting to the graph's "
                                f"{want} would change them")
        elif target.kind in "iu" and a.dtype.kind in "iuf":
            info = np.iinfo(target)
            flat = a.reshape(-1)
            if a.dtype.kind == "f":
                bad = ~np.isfinite(flat) | (flat != np.round(flat))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise UserError(f"{where}: input {name!r} ({have}) holds {flat[i].item()} at sample {i}: not a "
                                    f"whole number, so it cannot be cast to {want}")
            out_of_range = np.zeros(flat.shape, bool)
            if flat.size:
                # compare as Python ints/floats: uint64 vs int64 bounds must not wrap
                out_of_range = np.array([not (info.min <= v <= info.max) for v in flat.tolist()], bool)
            if out_of_range.any():
                i = int(np.flatnonzero(out_of_range)[0])
                raise UserError(f"{where}: input {name!r} ({have}) holds {flat[i].item()} at sample {i}, outside {want}")
            cast = a.astype(target)
        else:
            continue
        out[name] = cast
        notes.append(name)
    return out, [f"{s.name!r} {dtype_name(np.asarray(feeds[s.name]).dtype)} -> {s.dtype}" for s in specs if s.name in notes]


def warn_casts(where: str, notes: Sequence[str]) -> None:
    """One InputCastWarning line for the casts cast_inputs made (the CLI prints it on stderr)."""
    if notes:
        import warnings
        warnings.warn(f"{where}: inputs cast to the graph's types: {', '.join(notes)}", InputCastWarning,
                      stacklevel=3)


def valid_length_inputs(specs: Sequence[TensorSpec]) -> dict[str, str]:
    """{lengths input: its modality input} for every `<modality>_lengths` input, int64 (batch,)."""
    names = {s.name for s in specs}
    return {s.name: s.name[:-len(LENGTHS_SUFFIX)] for s in specs
            if s.name.endswith(LENGTHS_SUFFIX) and s.name[:-len(LENGTHS_SUFFIX)] in names and s.rank == 1}


def zero_state(specs: Sequence[TensorSpec], batch: int) -> dict[str, np.ndarray]:
    """All-zero `state.*` inputs (the start of a stream) for `batch` streams; states whose other axes
    are not fixed are left out (the caller decides whether that is an error)."""
    out = {}
    for s in specs:
        dims = [batch] + list(s.shape[1:])
        if s.name.startswith(STATE_PREFIX) and all(isinstance(d, int) and d >= 0 for d in dims):
            out[s.name] = np.zeros(dims, dtype=np_dtype(s.dtype))
    return out


def fill_defaults(specs: Sequence[TensorSpec], feeds: Mapping) -> Mapping:
    """`feeds` with the inputs a caller may leave out filled in: every lengths input with its
    modality's full length, and (streaming graphs) every state.* input with zeros, which starts a
    stream."""
    missing = {k: m for k, m in valid_length_inputs(specs).items() if k not in feeds and m in feeds}
    states = [s for s in specs if s.name.startswith(STATE_PREFIX) and s.name not in feeds]
    if not missing and not states:
        return feeds
    out = dict(feeds)
    for k, m in missing.items():
        shape = array_info(feeds[m]).shape
        if len(shape) >= 2:
            out[k] = np.full((shape[0],), shape[1], dtype=np.int64)
    given = [array_info(v).shape for k, v in feeds.items() if not k.startswith(STATE_PREFIX)]
    batch = next((sh[0] for sh in given if sh), None)
    if states and batch is not None:
        out.update(zero_state(states, batch))
    return out


def check_lengths(where: str, specs: Sequence[TensorSpec], feeds: Mapping, infos: Mapping) -> None:
    """Valid lengths (host arrays) must lie in [0, L] of their modality; UserError (one line) otherwise."""
    for k, m in valid_length_inputs(specs).items():
        if k not in feeds or infos[k].on_device or infos[k].ortvalue:
            continue
        v, L = np.asarray(feeds[k]), infos[m].shape[1]
        bad = (v < 0) | (v > L)
        if bad.any():
            raise UserError(f"{where}: input {k!r} must hold valid lengths in [0, {L}] (the length of {m!r}), "
                            f"got {int(v[bad][0])} at sample {int(np.flatnonzero(bad)[0])}")


def random_feeds(specs: Sequence[TensorSpec], choice: ShapeChoice, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float inputs (cast to each input's dtype) of the chosen shapes, reproducible.
    Lengths inputs: the first sample full, the others random in [1, L] (padding exercised)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    lens = valid_length_inputs(specs)
    for spec in specs:
        if spec.name in lens:
            continue
        shape = concrete_shape(spec, choice)
        dt = np_dtype(spec.dtype)
        if dt.kind in "fV":
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(dt)
        elif dt.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[spec.name] = rng.integers(1, 4, shape).astype(dt)
    for k, m in lens.items():
        b, L = feeds[m].shape[:2]
        v = rng.integers(min(1, L), L + 1, size=b).astype(np.int64)
        v[:1] = L
        feeds[k] = v
    return feeds


def length_inputs(specs: Sequence[TensorSpec]) -> list[str]:
    """Inputs whose axis 1 is a sequence length (rank >= 2 with a dynamic axis 1)."""
    return [s.name for s in specs if s.rank >= 2 and not (isinstance(s.shape[1], int) and s.shape[1] >= 0)]


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise UserError(f"{what}: expected integers separated by commas, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise UserError(f"{what}: expected positive integers, got {text!r}")
    return vals


def shape_grid(specs: Sequence[TensorSpec], batches: Sequence[int], lengths: Sequence,
               ) -> list[ShapeChoice]:
    """Cartesian product of batches and length settings. A length setting is an int (every length
    input) or a dict input name -> int (others keep the first plain int, else 16)."""
    names = length_inputs(specs)
    out = []
    for b in batches:
        for ln in lengths:
            if isinstance(ln, Mapping):
                unknown = [k for k in ln if k not in names]
                if unknown:
                    raise UserError(f"--length: no input named {unknown[0]!r} with a dynamic length "
                                    f"(inputs: {', '.join(names) or 'none'})")
                base = next((v for v in lengths if not isinstance(v, Mapping)), 16)
                out.append(ShapeChoice(int(b), {n: int(ln.get(n, base)) for n in names}))
            else:
                out.append(ShapeChoice(int(b), {n: int(ln) for n in names}))
    return out


def parse_length_options(values: Sequence[str]) -> list:
    """--length values: "16,64" (every input) or "text=16" (one input; repeat for more). Entries naming
    inputs are merged into one setting."""
    plain, named = [], {}
    for v in values:
        if "=" in v:
            k, _, n = v.partition("=")
            named[k.strip()] = parse_int_list(n, f"--length {k}")[0]
        else:
            plain.extend(parse_int_list(v, "--length"))
    out = list(plain)
    if named:
        out.append(named)
    return out
