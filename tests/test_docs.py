"""The docs name build outputs where they are: every path (and command) in README.md, docs/ and the
parts' READMEs that names a native library or a C++ example program is its install location,
cm_deploy/lib/ or cm_deploy/bin/ (scripts/build_plugin.sh runs `cmake --install`; test.sh and demo.sh
use it), and that file exists after the README's two commands.

Honest yet runnable anywhere: scripts/test.sh builds and installs before pytest starts and sets
CM_DEPLOY_TEST_SH=1, so under it (CI) a documented output that is missing FAILS; only the CUDA parts
(the TensorRT plugin, cm_infer_trt) skip, with the reason, where test.sh skips them (no nvcc). Run
outside test.sh (a bare `pytest`), a missing output skips and says to run test.sh first. The demo's
outputs (demo_out/...) are checked by tests/test_demo.py, which runs the demo."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "examples" / "cpp" / "README.md",
        *sorted((REPO / "plugins").glob("*/README.md"))]
# build output -> (its install location, whether test.sh builds it only with nvcc)
OUTPUTS = {"libcoupled_scan_ort.so": ("cm_deploy/lib/libcoupled_scan_ort.so", False),
           "libcoupled_scan_plugin.so": ("cm_deploy/lib/libcoupled_scan_plugin.so", True),
           "cm_infer_ort": ("cm_deploy/bin/cm_infer_ort", False),
           "cm_infer_trt": ("cm_deploy/bin/cm_infer_trt", True)}
PLACEHOLDER = "/path/to/"
_TOKEN = re.compile(r"[\w.$/~-]*(?:" + "|".join(re.escape(n) for n in OUTPUTS) + r")(?![\w.])")


def mentions():
    """(doc, line number, token, line) of every mention of a build output in the docs."""
    out = []
    for doc in DOCS:
        for i, line in enumerate(doc.read_text().splitlines(), 1):
            out += [(doc.relative_to(REPO), i, m.group(0), line) for m in _TOKEN.finditer(line)]
    return out


def documented_paths() -> list[str]:
    return sorted({tok for _, _, tok, _ in mentions() if "/" in tok and not tok.startswith(PLACEHOLDER)})


def test_docs_name_build_outputs_where_they_are_installed():
    """A path to a build output is its install location (or an explicit /path/to/ placeholder); a
    command line does not call a program by its bare name (it is on no PATH)."""
    bad = []
    for doc, i, tok, line in mentions():
        name = tok.rsplit("/", 1)[-1]
        if "/" in tok and not tok.startswith(PLACEHOLDER) and tok != OUTPUTS[name][0]:
            bad.append(f"{doc}:{i}: {tok} (installed as {OUTPUTS[name][0]})")
        if "/" not in tok and line.lstrip().startswith(tok + " "):
            bad.append(f"{doc}:{i}: command {tok} by its bare name (write {OUTPUTS[name][0]})")
    assert not bad, "\n".join(bad)
    # not vacuous: the docs do name the outputs the suite relies on
    assert {"cm_deploy/lib/libcoupled_scan_ort.so", "cm_deploy/lib/libcoupled_scan_plugin.so",
            "cm_deploy/bin/cm_infer_ort"} <= set(documented_paths())


def _nvcc() -> bool:
    return shutil.which("nvcc") is not None or os.access("/usr/local/cuda/bin/nvcc", os.X_OK)


@pytest.mark.parametrize("path", documented_paths())
def test_documented_build_output_exists(path):
    p = REPO / path
    name = p.name
    if p.is_file():
        if "/bin/" in path:
            assert os.access(p, os.X_OK), f"{path} is not executable"
        return
    if OUTPUTS[name][1] and not _nvcc():
        pytest.skip(f"{path}: the CUDA toolkit (nvcc) is not installed, so scripts/test.sh builds no TensorRT plugin")
    if os.environ.get("CM_DEPLOY_TEST_SH") != "1":
        pytest.skip(f"{path} is not installed yet: ./scripts/test.sh builds and installs it (then this test "
                    "fails instead of skipping)")
    pytest.fail(f"{path} is named in the docs but scripts/test.sh did not install it")


def test_the_runtime_finds_the_installed_libraries(monkeypatch, tmp_path):
    """With nothing passed and no environment, the documented location is the one the runtime uses."""
    from cm_deploy.runtime import native as N
    if N._PACKAGE_LIB != REPO / "cm_deploy" / "lib":
        pytest.skip(f"cm_deploy is imported from {N._PACKAGE_LIB.parent}, not from this checkout")
    for kind in ("ort", "trt"):
        lib = N.LIBRARIES[kind]
        installed = REPO / OUTPUTS[lib.names[0]][0]
        if not installed.is_file():
            continue      # test_documented_build_output_exists says why
        monkeypatch.delenv(lib.env, raising=False)
        monkeypatch.chdir(tmp_path)
        assert N.find_library(kind) == installed.resolve()
