"""mamba-ssm's own modules for the tests, from its source distribution (never installed): the sdist
at $CM_DEPLOY_MAMBA_SDIST or .carry/mamba_ssm-*.tar.gz (scripts/test.sh downloads it), imported by
cm_deploy.foreign.mamba_ssm_source without the CUDA build, so that mamba-ssm's forward runs on the
CPU with its own references (selective_scan_ref, layer_norm_ref / rms_norm_ref)."""
import glob
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sdist():
    env = os.environ.get("CM_DEPLOY_MAMBA_SDIST")
    if env:
        return env
    hits = sorted(glob.glob(str(ROOT / ".carry" / "mamba_ssm-*.tar.gz")))
    return hits[-1] if hits else None


def mamba_ssm_or_skip(cache_dir):
    """The mamba_ssm package, or pytest.skip with the reason."""
    pytest.importorskip("einops", reason="mamba-ssm's modules import einops (pip install einops)")
    src = sdist()
    if not src or not Path(src).exists():
        pytest.skip("mamba-ssm's sdist is missing (.carry/mamba_ssm-*.tar.gz or $CM_DEPLOY_MAMBA_SDIST; "
                    "scripts/test.sh downloads it)")
    from cm_deploy.foreign.mamba_ssm_source import import_mamba_ssm
    return import_mamba_ssm(src, cache_dir=cache_dir)
