"""What a new user hits first (issue 14): every bad input gives one line on stderr and exit 2, no
command writes over one of its own inputs, NaN/Inf checks, inspect without the runtime, progress only
on a terminal, and the contract stated once."""
import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from test_cli import assert_one_line_error, cli
from test_runtime import feeds_for, shared_artifacts


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


def digest(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------- empty input

@pytest.mark.parametrize("lengths, needle", [((0, 0, 0), "'text' has 0 steps"), ((5, 0, 3), "'audio' has 0 steps")])
def test_empty_sequences_are_refused(capsys, art, tmp_path, lengths, needle):
    x = npz(tmp_path / "zero.npz", **feeds_for(2, lengths))
    for model in ("portable", "onnx", "a"):
        rc, _, err = cli(capsys, "run", art[model], "--inputs", x, "--device", "cpu")
        assert rc == 2, (model, err)
        assert_one_line_error(err, needle)


def test_empty_batch_is_refused(capsys, art, tmp_path):
    x = npz(tmp_path / "b0.npz", **feeds_for(0, (3, 3, 3)))
    rc, _, err = cli(capsys, "run", art["portable"], "--inputs", x)
    assert rc == 2 and "batch 0" in assert_one_line_error(err)


def test_an_empty_sample_inside_a_batch_runs(capsys, art, tmp_path):
    feeds = dict(feeds_for(2, (4, 4, 4)), text_lengths=np.array([4, 0]), audio_lengths=np.array([4, 0]),
                 vision_lengths=np.array([4, 0]))
    rc, out, err = cli(capsys, "run", art["portable"], "--inputs", npz(tmp_path / "x.npz", **feeds))
    assert rc == 0, err


# ---------------------------------------------------------------------------- nothing overwritten

def test_no_command_writes_over_its_inputs(capsys, art, tmp_path):
    import shutil
    d = tmp_path / "exp"
    shutil.copytree(art["export"], d)
    before = digest(d / "model.onnx")
    rc, _, err = cli(capsys, "build", d / "model.onnx", "-o", d / "model.onnx")
    assert rc == 2 and "it is an input of this command" in assert_one_line_error(err)
    assert digest(d / "model.onnx") == before
    x = npz(tmp_path / "in.npz", **feeds_for())
    xd = digest(x)
    rc, _, err = cli(capsys, "run", d / "model.portable.onnx", "--inputs", x, "-o", x)
    assert rc == 2 and "it is an input" in assert_one_line_error(err) and digest(x) == xd
    rc, _, err = cli(capsys, "run", d / "model.portable.onnx", "--inputs", x, "-o", d / "model.portable.onnx")
    assert rc == 2 and "it is an input" in assert_one_line_error(err)
    rc, _, err = cli(capsys, "profile", d / "model.portable.onnx", "--plot", d / "model.portable.onnx")
    assert rc == 2 and "it is an input" in assert_one_line_error(err)
    # a checkpoint sitting where export would write a file of its own
    ck = d / "manifest.json"
    ck.write_bytes(Path(art["a"]).read_bytes())
    rc, _, err = cli(capsys, "export", ck, "-o", d)
    assert rc == 2 and "it is an input" in assert_one_line_error(err)


# ---------------------------------------------------------------------------- hostile or foreign files

def test_foreign_checkpoints_get_one_line_and_no_unsafe_advice(capsys, tmp_path):
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    rc, _, err = cli(capsys, "export", rnd, "-o", tmp_path / "o")
    line = assert_one_line_error(err, "not a cm-deploy checkpoint")
    assert rc == 2 and "weights_only" not in line and "unsafe" not in line.lower()

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "cm-deploy/1", "x": Evil()}, evil)
    rc, _, err = cli(capsys, "export", evil, "-o", tmp_path / "o")
    line = assert_one_line_error(err, "refused: it holds objects other than tensors")   # exactly one line
    assert rc == 2 and "weights_only" not in line and not (tmp_path / "o").exists()


def test_foreign_inputs_files_get_one_line(capsys, art, tmp_path):
    txt = tmp_path / "inputs.npz"
    txt.write_text("text,audio\n1,2\n")
    rc, _, err = cli(capsys, "run", art["portable"], "--inputs", txt)
    line = assert_one_line_error(err, "not an .npz archive")
    assert rc == 2 and "pickle" not in line.lower() and "unsafe" not in line.lower()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("text.npy", pickle.dumps([1, 2]))
    (tmp_path / "obj.npz").write_bytes(buf.getvalue())
    rc, _, err = cli(capsys, "run", art["portable"], "--inputs", tmp_path / "obj.npz")
    assert rc == 2
    assert_one_line_error(err, "not a readable .npz archive")


# ---------------------------------------------------------------------------- NaN / Inf

def test_nonfinite_inputs(capsys, art, tmp_path):
    f = feeds_for(2, (6, 4, 3))
    f["text"][1, 2, 0] = np.nan
    x = npz(tmp_path / "nan.npz", **f)
    rc, _, err = cli(capsys, "run", art["portable"], "--inputs", x)
    assert rc == 2 and "NaN/Inf value(s) within its valid steps, the first at (1, 2, 0)" in assert_one_line_error(err)
    rc, _, err = cli(capsys, "run", art["portable"], "--inputs", x, "--no-check-finite")
    assert rc == 0, err
    # NaN in padding (past the sample's valid length) is padding: fine
    f = feeds_for(2, (6, 4, 3))
    f["text"][1, 3:] = np.inf
    x = npz(tmp_path / "pad.npz", **f, text_lengths=np.array([6, 3]))
    rc, _, err = cli(capsys, "run", art["portable"], "--inputs", x)
    assert rc == 0, err


def test_parity_agrees_on_identical_nonfinite_outputs():
    from cm_deploy.runtime.parity import compare
    r = np.array([[1.0, np.nan, np.inf]], np.float32)
    assert compare(r, r.copy(), 1e-5, 1e-5)["ok"]
    bad = compare(r, np.array([[1.0, 2.0, np.inf]], np.float32), 1e-5, 1e-5)
    assert not bad["ok"] and "non-finite" in bad["error"]
    assert not compare(r, np.array([[1.0, np.nan, -np.inf]], np.float32), 1e-5, 1e-5)["ok"]


# ---------------------------------------------------------------------------- inspect, progress

def test_inspect_onnx_without_any_runtime(capsys, art, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnxruntime", None)        # not importable
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    rc, out, err = cli(capsys, "inspect", art["onnx"])
    assert rc == 0, err
    assert "CoupledScan" in out and "delta_softplus=1" in out and "text_lengths" in out
    assert "TensorRT with the CoupledScan plugin" in out
    rc, out, _ = cli(capsys, "inspect", art["portable"], "--json")
    import json
    d = json.loads(out)
    assert d["opsets"]["cm_deploy"] == 1 and len(d["coupled_scan_nodes"]) == 2 and "any ONNX runtime" in d["runs_on"]


def test_inspect_engine_without_sidecar_says_it_needs_tensorrt(capsys, tmp_path):
    e = tmp_path / "m.engine"
    e.write_bytes(b"\x00" * 64)
    rc, _, err = cli(capsys, "inspect", e)
    assert rc == 2 and "only to TensorRT" in assert_one_line_error(err)


def test_progress_only_on_a_terminal():
    from cm_deploy.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty, pipe = Tty(), io.StringIO()
    Progress(stream=tty)("step one")
    Progress(stream=pipe)("step one")
    Progress(quiet=True, stream=Tty())("never")
    assert "cm-deploy: step one" in tty.getvalue() and pipe.getvalue() == ""


def test_export_is_quiet_when_not_a_terminal(capsys, art, tmp_path):
    rc, out, err = cli(capsys, "export", art["a"], "-o", tmp_path / "o")
    assert rc == 0 and err == "" and "exported" in out


# ---------------------------------------------------------------------------- the contract, once

def test_contract_matches_the_native_side():
    """The facts C++ states too agree with cm_deploy.contract."""
    import re
    from cm_deploy import contract as C
    repo = Path(__file__).resolve().parents[1]
    types = (repo / "plugins/coupled_scan_kernel/scan_types.h").read_text()
    assert int(re.search(r"kMaxStates = (\d+)", types).group(1)) == C.MAX_STATES
    assert int(re.search(r"kMaxModalities = (\d+)", types).group(1)) == C.MAX_MODALITIES
    ort = (repo / "plugins/ort_coupled_scan/src/coupled_scan_ort.cpp").read_text()
    assert f'kDomain[] = "{C.DOMAIN}"' in ort and f'kOpName[] = "{C.OP_TYPE}"' in ort
    check = (repo / "plugins/coupled_scan_kernel/scan_check.cpp").read_text()
    assert all(f'"{n}"' in check for n in C.INPUT_NAMES + (C.STATE_INPUT,))


def test_export_refuses_what_the_kernels_cannot_run(tmp_path):
    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    from cm_deploy.errors import UserError
    from cm_deploy.export import export_checkpoint
    cfg = CoupledMambaConfig(modalities={"a": 3, "b": 2}, d_model=8, n_layers=1, d_state=513)
    ck = save_checkpoint(CoupledMamba(cfg), tmp_path / "big.pt")
    with pytest.raises(UserError, match="d_state <= 512"):
        export_checkpoint(ck, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_one_dtype_policy_for_every_backend(art):
    """TorchBackend at float16 holds the weights export writes: A_log, D, dt bias float32."""
    from cm_deploy.runtime.torch_backend import TorchBackend
    with TorchBackend(art["a"], device="cpu", dtype="float16") as b:
        for k, p in b.model.named_parameters():
            want = torch.float32 if k.endswith(("A_log", ".D", ".dt_bias")) else torch.float16
            assert p.dtype == want, k


def test_no_module_imports_a_layer_above_it():
    """Layers, bottom up: errors, contract, progress < config, ops < model, checkpoint < foreign (models
    trained elsewhere) < export; runtime stands beside export (it reads files, never the model's code
    at import time) and cli on top. Checked on every import statement of the package (module level
    and inside functions)."""
    import ast
    pkg = Path(__file__).resolve().parents[1] / "cm_deploy"
    # what each part may import from the package (besides itself)
    allowed = {
        "errors": set(), "contract": {"errors"}, "progress": set(), "config": {"contract", "errors"},
        "ops": {"contract", "errors"}, "model": {"config", "contract", "ops", "errors"},
        "checkpoint": {"config", "contract", "errors", "model"},
        "foreign": {"checkpoint", "contract", "errors", "model", "ops", "config"},
        "export": {"checkpoint", "contract", "errors", "progress", "model", "ops", "config", "foreign"},
        "runtime": {"contract", "errors", "progress", "checkpoint", "model", "config", "ops", "foreign"},
        "demo": {"config", "contract", "errors", "progress", "model", "checkpoint", "export", "runtime"},
        "serving": {"contract", "errors", "runtime"},
        "cli": {"*"}, "__init__": {"config", "model", "checkpoint"},
    }
    bad = []
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(pkg)
        part = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(rel.parts[:-1])[: len(rel.parts) - node.level]
                target = ".".join(base + ([node.module] if node.module else [])).split(".")
                # `from cm_deploy import X`: the module that defines X (the package re-exports them)
                root = {"__version__": "__init__", "CoupledMamba": "model", "CoupledMambaConfig": "config",
                        "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint"}
                names = [target[0]] if target[0] else [root.get(a.name, a.name) for a in node.names]
                for t in names:
                    if t and t not in (part, "__init__") and "*" not in allowed[part] and t not in allowed[part]:
                        bad.append(f"{rel}: imports {t}")
    assert not bad, bad


def test_backend_base_imports_no_backend():
    """runtime/backend.py (the Backend base) imports none of the backends that subclass it: no cycle."""
    import ast
    src = (Path(__file__).resolve().parents[1] / "cm_deploy/runtime/backend.py").read_text()
    mods = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert not mods & {"engine", "ort_backend", "torch_backend", "loader", "builder"}, mods
