"""The GPU tests: every test module here carries the `gpu` marker and every test skips, with the
reason, where no CUDA device is visible (CI). On a GPU machine one command runs them all:

    TRITON_INTERPRET=0 python -m pytest -m gpu tests/gpu

(TRITON_INTERPRET=0: the Triton kernels compiled for the GPU; tests/conftest.py defaults it to 1,
the interpreter CI uses.) Results worth keeping (JSON reports, the placement table) are written to
$CM_GPU_OUT, default a pytest temporary folder. Native libraries come from the usual places:
CM_DEPLOY_ORT_OP_LIBRARY (the CoupledScan op library, built for this GPU), CM_DEPLOY_PLUGIN and
CM_PLUGIN_LIB_DIR (the TensorRT plugin and the harness library), CM_DEPLOY_TRT_MODULE."""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest


@functools.lru_cache(maxsize=None)
def cuda_missing() -> str | None:
    """Why the GPU tests cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return None if shutil.which("nvidia-smi") else "no CUDA device (no nvidia-smi, no torch to ask)"
    return None if torch.cuda.is_available() else "no CUDA device visible to torch: a GPU test"


@pytest.fixture(scope="session", autouse=True)
def _needs_cuda():     # session scope: it runs before (and so skips) every other fixture here
    reason = cuda_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def gpu_out(tmp_path_factory) -> Path:
    """Where the GPU tests write their reports ($CM_GPU_OUT, else a temporary folder)."""
    d = Path(os.environ["CM_GPU_OUT"]) if os.environ.get("CM_GPU_OUT") else tmp_path_factory.mktemp("gpu_out")
    d.mkdir(parents=True, exist_ok=True)
    return d
