"""The native parts cross-built for aarch64 (Jetson-class boards, scripts/build_aarch64.sh) run under
user-mode QEMU (scripts/run_aarch64.sh): examples/cpp's cm_infer_ort with ONNX Runtime's aarch64
library and our aarch64 op library equals the x86 Python runtime (1e-5, float32) on model.onnx (both
CPU state loops: NEON and exact), model.portable.onnx and the streaming graphs fed in chunks, and the
CPU kernel alone against the PyTorch reference.
Emulation checks the code and the numbers, never the speed (docs/jetson.md)."""
import glob
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from test_cpp_example import write_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "scripts" / "run_aarch64.sh"
MODS = {"text": 12, "audio": 7, "vision": 5}


def _build():
    env = os.environ.get("CM_DEPLOY_AARCH64_BUILD")
    if env:
        return Path(env)
    hits = sorted(glob.glob(str(REPO / "build" / "*" / "onnxruntime" / "libonnxruntime.so.*")), key=os.path.getmtime)
    return Path(hits[-1]).parents[1] if hits else None


def _missing(build):
    if shutil.which("qemu-aarch64") is None and shutil.which("qemu-aarch64-static") is None:
        return "qemu-aarch64 is not installed (apt-get install qemu-user; scripts/test.sh does it as root)"
    if build is None:
        return "no aarch64 build (scripts/build_aarch64.sh; it needs apt-get install g++-aarch64-linux-gnu)"
    for what in ("examples/cpp/cm_infer_ort", "plugins/ort_coupled_scan/libcoupled_scan_ort.so"):
        if not (build / what).is_file():
            return f"{build / what} is not built (scripts/build_aarch64.sh)"
    if not glob.glob(str(build / "onnxruntime" / "libonnxruntime.so.*")):
        return f"no aarch64 libonnxruntime.so in {build / 'onnxruntime'} (scripts/build_aarch64.sh)"
    return None


BUILD = _build()
MISSING = _missing(BUILD)
if MISSING and os.environ.get("CM_DEPLOY_AARCH64_BUILD"):   # CI built it: a missing part is a failure
    raise RuntimeError(f"CM_DEPLOY_AARCH64_BUILD is set but {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"aarch64 emulated run: {MISSING}")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A small model exported with its streaming graphs; d_state 11: two 4-lane NEON iterations and a
    3-state tail in the CPU kernel's state loop."""
    import torch
    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    from cm_deploy.export import export_checkpoint
    d = tmp_path_factory.mktemp("aarch64")
    torch.manual_seed(0)
    cfg = CoupledMambaConfig(modalities=dict(MODS), d_model=16, n_layers=2, d_state=11, d_conv=3, length_rule="pad")
    ckpt = save_checkpoint(CoupledMamba(cfg).eval(), d / "m.pt")
    export_checkpoint(ckpt, d / "out", streaming=True)
    return d / "out"


def feeds(batch, steps, lengths, seed):
    rng = np.random.default_rng(seed)
    x = {n: rng.standard_normal((batch, L, f)).astype(np.float32) for (n, f), L in zip(MODS.items(), steps)}
    return x | {f"{n}_lengths": np.array(v, np.int64) for n, v in lengths.items()}


def run_aarch64(model, tmp_path, x, *args, exact=False):
    """cm_infer_ort under QEMU; returns its output array."""
    out = tmp_path / "y.npy"
    if out.exists():
        out.unlink()
    env = dict(os.environ, CM_DEPLOY_SCAN_CPU_EXACT="1" if exact else "0")
    env.pop("CM_DEPLOY_ORT_LIBRARY", None)
    ort_lib = sorted(glob.glob(str(BUILD / "onnxruntime" / "libonnxruntime.so.*")))[-1]
    cmd = [str(RUN), str(BUILD / "examples" / "cpp" / "cm_infer_ort"), str(model), *write_inputs(tmp_path, x),
           "--ort-lib", ort_lib, "-o", str(out), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return np.load(out)


def ops_lib():
    return ["--ort-ops", BUILD / "plugins" / "ort_coupled_scan" / "libcoupled_scan_ort.so"]


def x86_run(path, x):
    from cm_deploy.runtime import load
    with load(path, device="cpu") as m:
        return m.run(x)["output"]


def test_portable_onnx_equals_x86(export, tmp_path):
    x = feeds(3, (6, 4, 3), {"audio": [4, 2, 0]}, seed=1)                 # padded samples, one empty
    np.testing.assert_allclose(run_aarch64(export / "model.portable.onnx", tmp_path, x),
                               x86_run(export / "model.portable.onnx", x), rtol=1e-5, atol=1e-6)


def test_model_onnx_with_the_op_library_both_state_loops(export, tmp_path):
    """The NEON loop (polynomial exp) and the exact loop (CM_DEPLOY_SCAN_CPU_EXACT=1, std::exp)."""
    x = feeds(2, (7, 5, 2), {"text": [7, 3], "vision": [1, 2]}, seed=2)
    want = x86_run(export / "model.portable.onnx", x)
    for exact in (False, True):
        got = run_aarch64(export / "model.onnx", tmp_path, x, *ops_lib(), exact=exact)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"exact={exact}")


def one_node_graph(path, args, kappa):
    """One CoupledScan node (tests/test_ort_ops.py's) whose y is the graph's `output`, as cm_infer_ort
    wants, with A, D and delta_bias as initializers (cm_infer_ort takes batch-first inputs)."""
    import onnx
    from onnx import numpy_helper
    from test_ort_ops import scan_model
    m = scan_model(attrs={"coupling_scale": kappa})
    g = m.graph
    for n in ("A", "D", "delta_bias"):
        g.input.remove(next(i for i in g.input if i.name == n))
        g.initializer.append(numpy_helper.from_array(args[n].numpy(), n))
    g.node[0].output[0] = g.output[0].name = "output"
    onnx.save(m, str(path))
    return path


@pytest.mark.parametrize("shape, decay", [((2, 3, 20, 9, 11), 1.0), ((1, 2, 12, 5, 64), 50.0)])
def test_cpu_kernel_both_state_loops_match_the_reference(tmp_path, shape, decay):
    """The op library's CPU kernel alone on aarch64 against the PyTorch reference (float32 round-off,
    as tests/test_ort_ops.py on x86), N = 11 (NEON body and tail) and 64 with decays dt * A down to
    about -1e3 (the polynomial exp's flush to 0). The two loops round differently: the variable switches."""
    from test_ort_ops import ACT, NAMES, random_args, reference
    args = random_args(*shape, seed=7)
    args["A"] = args["A"] * decay
    kappa = 1.0 / shape[1]
    want = reference(args, kappa=kappa)[0].numpy()
    model = one_node_graph(tmp_path / "scan.onnx", args, kappa)
    x = {n: args[n].numpy() for n in NAMES if n in ACT}
    got = {exact: run_aarch64(model, tmp_path, x, *ops_lib(), exact=exact) for exact in (False, True)}
    for exact, y in got.items():
        err = np.abs(y - want).max() / np.abs(want).max()
        assert err < 2e-6, f"exact={exact}: relative error {err:.3g}"
    assert not np.array_equal(got[False], got[True]), "CM_DEPLOY_SCAN_CPU_EXACT=1 gave the fast loop's bits"


@pytest.mark.parametrize("graph, chunk", [("model.stream.onnx", 1), ("model.stream.onnx", 4),
                                          ("model.stream.portable.onnx", 3)])
def test_streaming_chunks_equal_x86(export, tmp_path, graph, chunk):
    """A stream fed `chunk` steps at a time (the state carried by cm_infer_ort) equals the x86 Python
    Stream fed the same chunks."""
    from cm_deploy.runtime import open_stream
    L = 9
    lens = {"text": [9, 6], "audio": [4, 9], "vision": [9, 0]}
    x = feeds(2, (L, L, L), lens, seed=3)
    got = run_aarch64(export / graph, tmp_path, x, "--chunk", chunk, *(ops_lib() if graph == "model.stream.onnx" else []))
    with open_stream(export / "model.stream.portable.onnx", batch=2, device="cpu") as s:
        for t0 in range(0, L, chunk):
            n = min(chunk, L - t0)
            want = s.push({m: x[m][:, t0:t0 + n] for m in MODS},
                          lengths={m: np.clip(np.array(v) - t0, 0, n).astype(np.int64) for m, v in lens.items()})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
