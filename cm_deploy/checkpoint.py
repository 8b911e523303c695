"""Checkpoints (docs/design.md): torch.save of a plain dict
{"format": contract.CHECKPOINT_FORMAT, "config": <dict>, "state_dict": <tensors>}, loaded with weights_only=True
so that nothing in a user's file is ever unpickled as an arbitrary object."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from .config import CoupledMambaConfig
from .contract import CHECKPOINT_FORMAT as FORMAT
from .errors import UserError


def save_checkpoint(model, path, meta: dict | None = None) -> Path:
    """Write `model` (a CoupledMamba) to `path` atomically (temporary file, then rename).
    `meta` is optional plain data (numbers, strings, lists, dicts) such as training metrics."""
    path = Path(path)
    obj = {"format": FORMAT, "config": model.config.to_dict(),
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if meta:
        obj["meta"] = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path) -> tuple[CoupledMambaConfig, dict, dict]:
    """(config, state_dict, meta) of a checkpoint, or UserError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    # torch.save writes a zip archive; anything else (random bytes, text, the legacy format) is not a
    # checkpoint of ours, and torch's own messages for it would suggest an unsafe way to load it.
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a cm-deploy checkpoint (torch.save writes a zip archive; this is not one)")
    try:
        with warnings.catch_warnings():       # torch warns about weights_only before refusing
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:   # weights_only refused a global: not a plain checkpoint
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise UserError(f"{path}: refused: it holds objects other than tensors and plain data{what}; "
                        "cm-deploy loads only its own checkpoints (save_checkpoint)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable checkpoint (truncated or damaged): "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        fmt = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{path}: not a cm-deploy checkpoint (format {fmt!r}, expected {FORMAT!r})")
    sd = obj.get("state_dict")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: state_dict is missing or holds non-tensors")
    try:
        config = CoupledMambaConfig.from_dict(obj.get("config"))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: invalid config: {e}") from None
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return config, sd, meta


def load_checkpoint(path, map_location="cpu"):
    """Load a CoupledMamba (in eval mode) from a checkpoint written by save_checkpoint."""
    from .model import CoupledMamba
    config, sd, _ = read_checkpoint(path)
    model = CoupledMamba(config)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:   # a tensor of the wrong shape for this config
        raise UserError(f"{path}: weights do not match the config: "
                        f"{str(e).strip().splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]})")
    try:
        return model.to(map_location).eval()
    except Exception as e:  # e.g. a CUDA device asked for on a machine without one
        raise UserError(f"cannot move the model to {map_location}: {e}") from None
