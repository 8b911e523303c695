"""cm-deploy: Coupled Mamba from PyTorch to fast GPU inference.

The torch-backed names (model, checkpoint, ops) load lazily so that `cm_deploy.runtime` and the CLI
import on an edge device that has no torch.
"""
from .config import CoupledMambaConfig

__version__ = "0.1.0"
__all__ = ["CoupledMamba", "CoupledMambaConfig", "save_checkpoint", "load_checkpoint", "__version__"]

_LAZY = {"CoupledMamba": ".model", "save_checkpoint": ".checkpoint", "load_checkpoint": ".checkpoint"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'cm_deploy' has no attribute {name!r}")
