"""TensorRT plumbing shared by the builder and the Engine: the pluggable tensorrt module, a logger
that keeps the last errors (for one-line UserErrors), the CoupledScan plugin library (found, hashed,
loaded into the GLOBAL plugin registry), and the JSON sidecar written beside every engine.

The module is pluggable: `tensorrt` (TensorRT 10/11, what users have), `tensorrt_rtx` or
`tensorrt_rtx_bindings` (TensorRT-RTX; the latter needs `tensorrt_rtx_libs` imported first). Pick it
with trt_module=..., `--trt-module`, or CM_DEPLOY_TRT_MODULE. API differences between them are
handled with getattr and reported as clear errors.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

from ..errors import UserError
from ..contract import OP_TYPE as PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, SIDECAR_FORMAT
from .native import LIBRARIES, find_library

PLUGIN_ENV = LIBRARIES["trt"].env
MODULE_ENV = "CM_DEPLOY_TRT_MODULE"

_modules: dict = {}
MODULES = ("tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx")    # what --trt-module takes


def module_name(name: str | None = None) -> str:
    return name or os.environ.get(MODULE_ENV) or "tensorrt"


def import_tensorrt(name: str | None = None):
    """Import the TensorRT Python module `name` (default: $CM_DEPLOY_TRT_MODULE or 'tensorrt')."""
    name = module_name(name)
    if name in _modules:
        return _modules[name]
    if name == "tensorrt_rtx_bindings":
        try:   # the bindings wheel finds its shared libraries through this package
            _rtx_soname_fix(importlib.import_module("tensorrt_rtx_libs"))
        except ImportError:
            pass
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        others = [m for m in MODULES if m != name and _installed(m)]
        if others:    # e.g. only TensorRT-RTX's wheels (what scripts/test.sh installs)
            raise UserError(f"TensorRT Python module {name!r} is not importable ({e}), but {others[0]} is installed "
                            f"here: pass --trt-module {others[0]} (or set {MODULE_ENV}={others[0]})") from None
        raise UserError(f"TensorRT Python module {name!r} is not importable ({e}); install TensorRT "
                        f"(pip install tensorrt) or choose another with --trt-module / {MODULE_ENV}") from None
    _modules[name] = mod
    return mod


def _installed(name: str) -> bool:
    """Whether module `name` is installed, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):     # a module already in sys.modules without a spec, or set to None
        return name in sys.modules and sys.modules[name] is not None


def _rtx_soname_fix(libs_pkg) -> None:
    """TensorRT-RTX 1.7's ONNX parser dlopen()s "libtensorrt_rtx.so", a name its pip wheel does not
    ship (only libtensorrt_rtx.so.1); the failure crosses a noexcept function and the process aborts
    ("terminate called without an active exception") as soon as a plugin node is parsed. The wheel's
    libraries carry RPATH $ORIGIN, so a symlink beside them is found; make it when we may."""
    folder = Path(getattr(libs_pkg, "__file__", "") or ".").parent
    real, link = folder / "libtensorrt_rtx.so.1", folder / "libtensorrt_rtx.so"
    if real.exists() and not link.exists():
        try:
            link.symlink_to(real.name)
        except OSError as e:
            print(f"warning: TensorRT-RTX: cannot create {link} ({e}); parsing plugin nodes may abort: "
                  f"create that symlink to {real.name}", file=sys.stderr)


def tensorrt_available(name: str | None = None) -> tuple[bool, str]:
    """(True, version) or (False, reason): for tests and diagnostics."""
    try:
        mod = import_tensorrt(name)
    except UserError as e:
        return False, str(e)
    return True, str(getattr(mod, "__version__", "?"))


def trt_version(trt) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def make_logger(trt, verbose: bool = False):
    """A trt.ILogger that keeps error messages (they end up in one-line UserErrors) and prints
    warnings to stderr (everything when verbose)."""
    S = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.lock = threading.Lock()

        def log(self, severity, msg):
            msg = str(msg)
            is_error = severity in (S.INTERNAL_ERROR, S.ERROR)
            if is_error:
                with self.lock:
                    self.errors.append(msg)
            # errors reach the user inside the one-line UserError; warnings are printed as they come
            if verbose or (severity == S.WARNING and not _boring_warning(msg)):
                label = getattr(severity, "name", None) or str(severity).split(".")[-1]
                print(f"[TensorRT] {label}: {msg}", file=sys.stderr)

        def last_error(self, default: str = "no error message from TensorRT") -> str:
            with self.lock:
                msg = self.errors[-1] if self.errors else default
            return " ".join(msg.split())

        def clear(self):
            with self.lock:
                self.errors.clear()

    return _Logger()


def _boring_warning(msg: str) -> bool:
    return "lazy loading" in msg.lower() or "Using an engine plan file across different models" in msg


# ---------------------------------------------------------------------------- dtypes

_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
               "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8_e4m3fn"}


def trt_dtype_name(dt) -> str:
    key = str(dt).split(".")[-1].upper()
    if key not in _TRT_DTYPES:
        raise UserError(f"unsupported TensorRT data type {dt}")
    return _TRT_DTYPES[key]


# ---------------------------------------------------------------------------- files

def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())      # mkstemp's 0600 is for the temporary only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------------------- plugin library

def find_plugin(explicit=None, recorded=None, required: bool = True) -> Path | None:
    """The CoupledScan plugin library: `explicit` (--plugin), else $CM_DEPLOY_PLUGIN, else the path an
    engine's sidecar recorded, else the default locations (native.py). UserError (one line) when none."""
    return find_library("trt", explicit, recorded, required)


def _coupled_scan_registered(registry) -> bool:
    """Whether CoupledScan is in the registry, read from all_creators (get_creator logs an ERROR for a
    creator it does not find)."""
    want = (PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
    return any((getattr(c, "name", None), str(getattr(c, "plugin_version", "")),
                str(getattr(c, "plugin_namespace", ""))) == want
               for c in (getattr(registry, "all_creators", None) or ()))


_loaded_plugins: dict = {}
_plugin_lock = threading.Lock()


def load_plugin(trt, path, logger=None) -> dict:
    """Load the plugin library into the GLOBAL registry (an ONNX parser only searches that one) once
    per process and module; return what the sidecar records about it."""
    path = Path(path).resolve()
    key = (trt.__name__, str(path))
    with _plugin_lock:
        if key in _loaded_plugins:
            return _loaded_plugins[key]
        registry = trt.get_plugin_registry()
        # Registered already (e.g. by libcoupled_scan_plugin_autoload.so): TensorRT refuses to register a
        # creator twice, and its loadLibrary then fails ("plugin creator of CoupledScan exists already").
        registered_before = _coupled_scan_registered(registry)
        if not registered_before:
            try:
                handle, why = registry.load_library(str(path)), None
            except Exception as e:
                handle, why = None, " ".join(str(e).split())
            if handle is None:
                why = why or (logger.last_error() if logger is not None else "no message")
                raise UserError(f"cannot load plugin library {path}: {why}")
        info = {"path": str(path), "sha256": sha256_file(path), "name": PLUGIN_NAME,
                "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE, "creator_found": None}
        if registered_before:
            info["registered_before"] = True
        creator = None
        for getter in ("get_creator", "get_plugin_creator"):
            fn = getattr(registry, getter, None)
            if fn is None:
                continue
            try:
                creator = fn(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)
            except Exception:
                creator = None
            if creator is not None:
                break
        info["creator_found"] = creator is not None
        if creator is not None:
            info["version"] = str(getattr(creator, "plugin_version", PLUGIN_VERSION))
            info["namespace"] = str(getattr(creator, "plugin_namespace", PLUGIN_NAMESPACE))
        _loaded_plugins[key] = info
        return info


# ---------------------------------------------------------------------------- sidecar

def sidecar_path(engine_path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def read_sidecar(engine_path) -> dict | None:
    p = sidecar_path(engine_path)
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: unreadable engine description: {e}") from None
    if not isinstance(d, dict) or d.get("format") != SIDECAR_FORMAT:
        raise UserError(f"{p}: not a cm-deploy engine description (format "
                        f"{d.get('format') if isinstance(d, dict) else None!r}, expected {SIDECAR_FORMAT!r})")
    return d
