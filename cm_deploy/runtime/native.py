"""Finding the native CoupledScan libraries built from plugins/ (one kernel source, two adapters):

    trt   libcoupled_scan_plugin.so   the TensorRT plugin          ($CM_DEPLOY_PLUGIN,        --plugin)
    ort   libcoupled_scan_ort.so      the ONNX Runtime op library  ($CM_DEPLOY_ORT_OP_LIBRARY, --ort-ops)

Search order: the explicit path, the environment variable, a path recorded beside an engine, the
package's own lib/ folder (where an installed wheel keeps them), then where `scripts/build_plugin.sh
[build-dir]` leaves them under build/ (of the current directory and of the repository), newest first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

_PACKAGE_LIB = Path(__file__).resolve().parents[1] / "lib"
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class NativeLibrary:
    what: str
    env: str
    flag: str
    names: tuple


LIBRARIES = {
    # plugins/trt_coupled_scan/CMakeLists.txt: target coupled_scan_plugin
    "trt": NativeLibrary("CoupledScan plugin library", "CM_DEPLOY_PLUGIN", "--plugin",
                         ("libcoupled_scan_plugin.so", "coupled_scan_plugin.dll")),
    # plugins/ort_coupled_scan/CMakeLists.txt: target coupled_scan_ort
    "ort": NativeLibrary("CoupledScan ONNX Runtime op library", "CM_DEPLOY_ORT_OP_LIBRARY", "--ort-ops",
                         ("libcoupled_scan_ort.so", "coupled_scan_ort.dll")),
}

# plugins/trt_coupled_scan/CMakeLists.txt: target coupled_scan_plugin_autoload, built and installed beside
# the plugin. For hosts that only dlopen plugin libraries (tritonserver's TensorRT backend): loading it
# hands the plugin beside it to TensorRT's IPluginRegistry::loadLibrary.
PLUGIN_AUTOLOAD = "libcoupled_scan_plugin_autoload.so"


def candidates(kind: str) -> list[Path]:
    """Default locations of library `kind` that exist: the package's lib/ first, then build trees
    (up to four levels under build/, e.g. build/ci/plugins/ort_coupled_scan/), newest first."""
    names = LIBRARIES[kind].names
    found = [(_PACKAGE_LIB / n).resolve() for n in names if (_PACKAGE_LIB / n).is_file()]
    seen, built = set(found), []
    for root in (Path.cwd(), _REPO_ROOT):
        base = root / "build"
        if not base.is_dir():
            continue
        for depth in range(5):
            for name in names:
                try:
                    hits = list(base.glob("/".join(["*"] * depth + [name])))
                except OSError:
                    hits = []
                for p in hits:
                    rp = p.resolve()
                    if rp not in seen and rp.is_file():
                        seen.add(rp)
                        built.append(rp)
    return found + sorted(built, key=lambda p: p.stat().st_mtime, reverse=True)


def find_library(kind: str, explicit=None, recorded=None, required: bool = True) -> Path | None:
    """Library `kind` ('trt' or 'ort'); UserError (one line) when `required` and none is found."""
    lib = LIBRARIES[kind]
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError(f"{lib.what} not found: {p}")
        return p.resolve()
    env = os.environ.get(lib.env)
    if env:
        p = Path(env)
        if not p.is_file():
            raise UserError(f"{lib.what} not found: {p} (from ${lib.env})")
        return p.resolve()
    if recorded and Path(recorded).is_file():
        return Path(recorded).resolve()
    found = candidates(kind)
    if found:
        return found[0]
    if required:
        raise UserError(f"{lib.what} not found: pass {lib.flag} PATH or set {lib.env} "
                        "(build it with scripts/build_plugin.sh)")
    return None
