"""Models trained with other code, run and exported through cm-deploy's ops (docs/bring_your_own_model.md).

    mamba1.py            the Mamba-1 mixer (mamba-ssm's `Mamba`) on CoupledScan (M = 1, kappa = 1)
    official.py          the official Coupled Mamba code's MutiMamba, loading its state_dicts as they are
    mamba_ssm_source.py  mamba-ssm's Python modules without its CUDA build (CPU machines, CI)

Exporting them: cm_deploy.export.modules (export_module, export_official).
"""
from __future__ import annotations

from ..errors import UserError


def load_model_file(path, map_location="cpu"):
    """The model a .pt file holds: a cm-deploy checkpoint (CoupledMamba), or a state_dict of a
    foreign architecture that its keys identify (the official Coupled Mamba's MutiMamba, with its
    default norm eps). UserError (the cm-deploy checkpoint's message) for anything else."""
    from ..checkpoint import load_checkpoint
    try:
        return load_checkpoint(path, map_location=map_location)
    except UserError as e:
        from . import official
        try:
            sd = official.read_state_dict(path)
        except UserError:
            raise e from None
        if not official.looks_official(sd):
            raise
        return official.load_official(path, map_location=map_location, state_dict=sd)
