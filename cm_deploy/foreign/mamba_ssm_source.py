"""mamba-ssm's Python modules on a machine without its CUDA build (a CPU machine, CI).

`import mamba_ssm` needs the compiled `selective_scan_cuda` (its selective_scan_interface imports it
at the top) and its package __init__ pulls in transformers. Its source distribution
(`MAMBA_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-build-isolation --no-binary :all:
mamba-ssm==2.3.2.post1`) holds the modules and mamba-ssm's own pure-PyTorch references
(`selective_scan_ref`, `layer_norm_ref`, `rms_norm_ref`). `import_mamba_ssm(sdist)` imports the
package from it with:

  * the package __init__ bypassed (a namespace module over the source folder);
  * `selective_scan_cuda` a stand-in that raises when called (nothing calls it, see below);
  * `mamba_ssm.utils.generation` / `.utils.hf` (transformers) and `huggingface_hub` (Mamba-2's hub
    mixin) stand-ins, only where those packages are not installed;
  * mamba-ssm's CUDA/Triton entry points pointed at its references, in every module that imported
    them: `selective_scan_fn` -> `selective_scan_ref`, `layer_norm_fn` / `rms_norm_fn` ->
    `layer_norm_ref` / `rms_norm_ref` (with the fused kernel's residual handling), and the fused
    paths off (`causal_conv1d_fn`, `selective_state_update`, `mamba_inner_fn` = None), so that
    `Mamba` runs its `use_fast_path=False` branch: nn.Conv1d, then selective_scan_ref.

The result is mamba-ssm's own forward computed by mamba-ssm's own reference code: what cm-deploy's
exports are tested against. It is for CPU machines; with a real mamba-ssm install, import it as usual.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
import tarfile
import types
from pathlib import Path

from ..errors import UserError
from .mamba1 import add_norm_functions

PACKAGE = "mamba_ssm"
# the modules cm-deploy uses (Mamba, Block, MambaLMHeadModel) and what they import
MODULES = ("ops.selective_scan_interface", "ops.triton.layer_norm", "modules.mamba_simple", "modules.block",
           "models.mixer_seq_simple")


def _extract(sdist: Path, cache: Path) -> Path:
    """The sdist's Python package extracted under `cache` (once); returns the folder holding mamba_ssm/."""
    root = cache / sdist.name.replace(".tar.gz", "")
    done = root / ".extracted"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(sdist) as tf:
                members = [m for m in tf.getmembers()
                           if m.isfile() and f"/{PACKAGE}/" in m.name and m.name.endswith(".py")]
                for m in members:
                    m.name = m.name[m.name.index(f"{PACKAGE}/"):]      # <sdist>/mamba_ssm/... -> mamba_ssm/...
                tf.extractall(root, members=members, filter="data")
        except (OSError, tarfile.TarError) as e:
            raise UserError(f"{sdist}: not a readable mamba-ssm source distribution: {e}") from None
        if not (root / PACKAGE / "modules" / "mamba_simple.py").is_file():
            raise UserError(f"{sdist}: no {PACKAGE}/modules/mamba_simple.py inside: not mamba-ssm's sdist")
        done.touch()
    return root


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__cm_deploy_stub__ = True
    sys.modules[name] = mod
    return mod


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def _not_built(*args, **kwargs):
    raise RuntimeError("mamba-ssm's CUDA extension is not built here (cm-deploy imported mamba-ssm's "
                       "Python sources only; its reference paths run instead)")


def import_mamba_ssm(source, cache_dir=None, references: bool = True) -> types.ModuleType:
    """Import mamba-ssm from `source` (its sdist .tar.gz, or a folder holding mamba_ssm/) without its
    CUDA build (see the module doc) and return the package; its modules import as usual afterwards
    (`from mamba_ssm.modules.mamba_simple import Mamba`). cache_dir: where the sdist is extracted
    (default ~/.cache/cm-deploy). references=False leaves mamba-ssm's entry points as they are (a
    GPU process that put a built `selective_scan_cuda` in sys.modules first: its kernel runs). A
    mamba-ssm already imported in this process is returned as is."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    source = Path(source)
    if not source.exists():
        raise UserError(f"mamba-ssm source not found: {source}")
    if source.is_file():
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cm-deploy"
        cache = Path(cache_dir) if cache_dir else default
        root = _extract(source, cache)
    else:
        root = source
    pkg_dir = root / PACKAGE
    if not (pkg_dir / "__init__.py").is_file():
        raise UserError(f"{source}: no {PACKAGE}/ package inside")
    version = re.search(r'__version__\s*=\s*"([^"]+)"', (pkg_dir / "__init__.py").read_text())
    pkg = _stub(PACKAGE, __path__=[str(pkg_dir)], __version__=version.group(1) if version else "unknown",
                __file__=str(pkg_dir / "__init__.py"))
    if not _importable("selective_scan_cuda"):
        _stub("selective_scan_cuda", fwd=_not_built, bwd=_not_built)
    if not _importable("transformers"):      # GenerationMixin (generate()) and the hub loaders
        _stub(f"{PACKAGE}.utils.generation", GenerationMixin=type("GenerationMixin", (), {}))
        _stub(f"{PACKAGE}.utils.hf", load_config_hf=_not_built, load_state_dict_hf=_not_built)
    if not _importable("huggingface_hub"):   # Mamba-2's base class only
        _stub("huggingface_hub", PyTorchModelHubMixin=type("PyTorchModelHubMixin", (), {}))
    try:
        for name in MODULES:
            importlib.import_module(f"{PACKAGE}.{name}")
    except ImportError as e:
        for key in [k for k in sys.modules if k == PACKAGE or k.startswith(PACKAGE + ".")]:
            del sys.modules[key]
        raise UserError(f"mamba-ssm's modules need {e.name or e} (pip install it)") from None
    if not references:
        return pkg
    ssi = sys.modules[f"{PACKAGE}.ops.selective_scan_interface"]
    ln = sys.modules[f"{PACKAGE}.ops.triton.layer_norm"]
    norm_fn, rms_fn = add_norm_functions(lambda x, w, b, eps: ln.layer_norm_ref(x, w, b, eps=eps, upcast=True),
                                         lambda x, w, b, eps: ln.rms_norm_ref(x, w, b, eps=eps, upcast=True))
    patch = {"selective_scan_fn": ssi.selective_scan_ref, "mamba_inner_fn": None, "causal_conv1d_fn": None,
             "causal_conv1d_update": None, "selective_state_update": None,
             "layer_norm_fn": norm_fn, "rms_norm_fn": rms_fn}
    for key, mod in list(sys.modules.items()):
        if key.startswith(PACKAGE + ".") and not getattr(mod, "__cm_deploy_stub__", False):
            for attr, value in patch.items():
                if hasattr(mod, attr):
                    setattr(mod, attr, value)
    return pkg
