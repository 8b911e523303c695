"""The Triton forward compiled ahead of time for the native libraries (plugins/coupled_scan_kernel/triton_aot):
the generator, and the C++ port of the launch planner against Python's `_plan`. No GPU needed."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from cm_deploy.ops import triton_scan as ts

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "plugins" / "coupled_scan_kernel" / "triton_aot" / "generate.py"


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    return env


def _fatbinary():
    return shutil.which("fatbinary") or next((p for p in ("/usr/local/cuda/bin/fatbinary",) if os.path.isfile(p)), None)


def test_generator_lists_the_default_set():
    r = subprocess.run([sys.executable, str(GENERATOR), "--out", "unused", "--list"], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()
    # 3 types x M 1..4 x N {16, 32, 64, 128} x softplus {0, 1} x {scan, summary}, and the combine kernel
    # with and without an initial state for 1, 2, 4 .. 512 segment summaries
    assert len(names) == 3 * 4 * 4 * 2 * 2 + 2 * 10 and len(set(names)) == len(names)
    assert "combine_c01_s8" in names
    assert "fwd_bf16_m3_n64_e4_t64_w1_yp1_sp1" in names   # the paper's shape as _plan launches it
    assert "fwd_f32_m3_n64_e2_t64_w1_yp1_sp1" in names


def test_generator_refuses_bad_lists():
    r = subprocess.run([sys.executable, str(GENERATOR), "--out", "unused", "--states", "48", "--list"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "N=48" in r.stderr


def test_generator_compiles_embeddable_kernels(tmp_path):
    fatbinary = _fatbinary()
    if fatbinary is None:
        pytest.skip("the CUDA toolkit's fatbinary is not installed (the generator packs cubins with it)")
    out = tmp_path / "gen"
    r = subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), "--archs", "80,90", "--dtypes", "f16",
                        "--modalities", "1", "--states", "16", "--jobs", "2", "--fatbinary", fatbinary],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["archs"] == [80, 90] and len(man["kernels"]) == 4 + 2 * 10   # combine: 1 .. 512 summaries, c0 or not
    specs = (out / "triton_aot_specs.cpp").read_text()
    blobs = (out / "triton_aot_blobs.cpp").read_text()
    for i, k in enumerate(man["kernels"]):
        fat = Path(k["fatbin"]).read_bytes()
        assert fat[:4] == bytes.fromhex("50ed55ba"), k["name"]          # a fatbinary (magic 0xBA55ED50)
        assert set(k["targets"]) == {"sm_80", "sm_90a"}                  # one image per architecture
        assert k["extra_ptrs"] in (0, 1, 2) and k["shared"] < 48 * 1024  # Triton's appended null scratch pointers
        assert f"// {k['name']}" in specs and f'.incbin \\"{Path(k["fatbin"]).resolve()}\\"' in blobs
        assert f"cm_triton_aot_{i}_end" in blobs
    assert "extern int32_t const kTritonAotSpecCount = 24;" in specs
    # the scan kernel row: f16 (ActType 1), M 1, N 16, _plan's tile (16-bit, N 16: 16 channels), 64 steps
    assert "{0, 1, 1, 16, 16, 16, 64, 1, 1, 1, 1, 1, 1," in specs
    # a second run with nothing changed rewrites nothing (no rebuild of the libraries)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.cpp")}
    r = subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), "--archs", "80,90", "--dtypes", "f16",
                        "--modalities", "1", "--states", "16", "--jobs", "1", "--fatbinary", fatbinary],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0 and before == {p: p.stat().st_mtime_ns for p in out.glob("*.cpp")}


def _probe():
    """triton_plan_probe from the native build (built with the libraries, CPU-only builds included)."""
    cands = []
    if os.environ.get("CM_DEPLOY_TRITON_PLAN_PROBE"):
        cands.append(Path(os.environ["CM_DEPLOY_TRITON_PLAN_PROBE"]))
    for var in ("CM_DEPLOY_ORT_OP_LIBRARY", "CM_DEPLOY_PLUGIN"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]).parents[2] / "plugins" / "coupled_scan_kernel" / "triton_plan_probe")
    cands += sorted((REPO / "build").glob("*/plugins/coupled_scan_kernel/triton_plan_probe"),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    # a cross build's probe (build/*aarch64*) does not run here
    return next((p for p in cands if p.is_file() and os.access(p, os.X_OK) and "aarch64" not in str(p)), None)


def _python_plan(batch, M, L, E, N, elem, sms):
    props = types.SimpleNamespace(multi_processor_count=sms)
    with mock.patch.object(ts, "_interpreting", lambda: False), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda _d: props):
        p = ts._plan(batch, M, L, E, N, torch.device("cuda"), bwd=False, elem_size=elem)
    return (p.block_e, p.block_n, p.num_warps, p.n_seg, p.seg_len, p.chunk_t, p.y_parts, int(p.fast_exp),
            int(p.pf_bc))


def test_cpp_planner_equals_python_plan():
    probe = _probe()
    if probe is None:
        pytest.skip("triton_plan_probe not built (scripts/build_plugin.sh builds it; or set CM_DEPLOY_TRITON_PLAN_PROBE)")
    grid = list(itertools.product((1, 2, 3, 7, 64, 300), (1, 3, 4, 8), (1, 2, 33, 64, 65, 500, 4096, 16384),
                                  (16, 24, 256, 1000), (5, 16, 64, 128), (4, 2), (1, 78, 132)))
    text = "".join(" ".join(map(str, g)) + "\n" for g in grid)
    r = subprocess.run([str(probe)], input=text, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = [tuple(int(x) for x in line.split()) for line in r.stdout.splitlines()]
    assert len(got) == len(grid)
    bad = [(g, c, p) for g, c in zip(grid, got) if c != (p := _python_plan(*g))]
    assert not bad, f"{len(bad)} of {len(grid)} shapes differ, e.g. (batch, M, L, E, N, elem, sms) -> C++, Python: {bad[:3]}"
