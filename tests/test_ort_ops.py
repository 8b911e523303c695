"""The ONNX Runtime custom-op library (plugins/ort_coupled_scan, libcoupled_scan_ort.so) on the CPU
provider: one CoupledScan node against the PyTorch reference on random inputs (several shapes,
float32/float16/bfloat16, initial and final state, streaming in pieces, kappa default), refusals of
bad input as ORT errors (never a crash), and exported model.onnx files against PyTorch."""
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from cm_deploy.ops.reference import coupled_scan_reference  # noqa: E402
from cm_deploy.runtime.native import LIBRARIES, find_library  # noqa: E402

LIB = find_library("ort", required=False)
pytestmark = pytest.mark.skipif(
    LIB is None, reason="the CoupledScan ONNX Runtime op library is not built (scripts/build_plugin.sh; "
                        f"or set {LIBRARIES['ort'].env})")

ONNX_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
TORCH_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ACT = ("u", "delta", "B", "C", "z")
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def run(sess, feeds):
    """sess.run, with bfloat16 arrays passed as OrtValues (ORT's numpy bridge knows no bfloat16)."""
    if not any(v.dtype.name == "bfloat16" for v in feeds.values()):
        return sess.run(None, feeds)
    vals = {k: (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(v).view(np.uint16),
                                                                 TensorProto.BFLOAT16)
                if v.dtype.name == "bfloat16" else ort.OrtValue.ortvalue_from_numpy(v)) for k, v in feeds.items()}
    return [o.numpy() for o in sess.run_with_ort_values([o.name for o in sess.get_outputs()], vals)]


# The CPU kernel everywhere; the CUDA kernel too where this onnxruntime has the CUDA provider (a GPU
# machine with onnxruntime-gpu: `pytest tests/test_ort_ops.py` there runs every case on both).
PROVIDERS = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"]
                                        if "CUDAExecutionProvider" in ort.get_available_providers() else [])


@pytest.fixture(params=PROVIDERS)
def provider(request):
    return request.param


def session(model, provider="CPUExecutionProvider", threads=2):
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(LIB))
    opts.intra_op_num_threads = threads
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=providers)
    assert sess.get_providers()[0] == provider
    return sess


def scan_model(dtype="float32", initial_state=False, final_state=False, attrs=None, types=None, ranks=None):
    """One CoupledScan node; `types`/`ranks` override single inputs (for refusal tests)."""
    act = ONNX_TYPES[dtype] if dtype in ONNX_TYPES else dtype
    rank = {"u": 4, "delta": 4, "z": 4, "B": 4, "C": 4, "A": 3, "D": 2, "delta_bias": 2, "initial_state": 3}
    rank.update(ranks or {})
    names = NAMES + (["initial_state"] if initial_state else [])
    ins = []
    for n in names:
        t = act if n in ACT else TensorProto.FLOAT
        t = (types or {}).get(n, t)
        ins.append(helper.make_tensor_value_info(n, t, [None] * rank[n]))
    # bfloat16: y leaves the graph cast to float32 (exact), since ORT's numpy bridge cannot return it
    cast = dtype == "bfloat16"
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT if cast else act, None)]
    out_names = ["y_bf16" if cast else "y"]
    if final_state:
        outs.append(helper.make_tensor_value_info("final_state", TensorProto.FLOAT, None))
        out_names.append("final_state")
    a = {"delta_softplus": 1, "coupling_scale": 0.5}
    a.update(attrs or {})
    a = {k: v for k, v in a.items() if v is not None}
    nodes = [helper.make_node("CoupledScan", names, out_names, domain="cm_deploy", **a)]
    if cast:
        nodes.append(helper.make_node("Cast", ["y_bf16"], ["y"], to=TensorProto.FLOAT))
    graph = helper.make_graph(nodes, "scan", ins, outs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("cm_deploy", 1)])


def random_args(batch, M, L, E, N, dtype="float32", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = TORCH_TYPES[dtype]
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"u": r(batch, M, L, E).to(t), "delta": (r(batch, M, L, E) * 0.5).to(t),
            "A": -torch.rand(M, E, N, generator=g) * 2 - 0.1, "B": r(batch, M, L, N).to(t),
            "C": r(batch, M, L, N).to(t), "D": r(M, E), "z": r(batch, M, L, E).to(t), "delta_bias": r(M, E) * 0.3}


def to_numpy(x):
    if x.dtype == torch.bfloat16:
        import ml_dtypes
        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def to_torch(a):
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def reference(args, kappa=0.5, initial_state=None):
    return coupled_scan_reference(*(args[n] for n in NAMES), delta_softplus=True, coupling_scale=kappa,
                                  initial_state=initial_state, return_final_state=True)


TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def close(got, want, dtype):
    err = (to_torch(got).float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-6)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]} ({dtype})"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5, 4), (1, 1, 1, 3, 2), (3, 2, 33, 17, 16), (1, 5, 20, 40, 8)])
def test_one_node_matches_reference(shape, dtype, provider):
    args = random_args(*shape, dtype=dtype, seed=sum(shape))
    kappa = 1.0 / shape[1]       # mean coupling: the state stays bounded at every M
    y, = run(session(scan_model(dtype, attrs={"coupling_scale": kappa}), provider),
             {n: to_numpy(args[n]) for n in NAMES})
    want, _ = reference(args, kappa=kappa)
    assert y.shape == tuple(want.shape)
    assert y.dtype == (np.float32 if dtype == "bfloat16" else to_numpy(want).dtype)
    close(y, want, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_state_in_and_out_and_streaming(dtype, provider):
    batch, M, L, E, N = 2, 3, 12, 6, 5
    args = random_args(batch, M, L, E, N, dtype=dtype, seed=3)
    s0 = torch.randn(batch, E, N) * 0.3
    sess = session(scan_model(dtype, initial_state=True, final_state=True), provider)
    feeds = {n: to_numpy(args[n]) for n in NAMES}
    y, c = sess.run(None, dict(feeds, initial_state=s0.numpy()))
    want_y, want_c = reference(args, initial_state=s0)
    close(y, want_y, dtype)
    np.testing.assert_allclose(c, want_c.numpy(), rtol=1e-4, atol=1e-5)
    # the sequence in pieces of 1, 4 and 7 steps, each starting from the last one's final state
    state, ys = s0.numpy(), []
    for a, b in ((0, 1), (1, 5), (5, 12)):
        part = {n: (feeds[n][:, :, a:b] if n in ACT else feeds[n]) for n in NAMES}
        yp, state = sess.run(None, dict(part, initial_state=state))
        ys.append(yp)
    np.testing.assert_array_equal(np.concatenate(ys, axis=2), y)
    np.testing.assert_array_equal(state, c)


def test_final_state_without_initial_and_empty_sequence(provider):
    args = random_args(2, 2, 0, 3, 4)
    y, c = session(scan_model(final_state=True), provider).run(None, {n: to_numpy(args[n]) for n in NAMES})
    assert y.shape == (2, 2, 0, 3) and c.shape == (2, 3, 4) and not c.any()
    args = random_args(0, 2, 5, 3, 4)
    y, = session(scan_model(), provider).run(None, {n: to_numpy(args[n]) for n in NAMES})
    assert y.shape == (0, 2, 5, 3)


def test_coupling_scale_defaults_to_one_over_m(provider):
    args = random_args(2, 4, 9, 5, 3, seed=7)
    y, = session(scan_model(attrs={"coupling_scale": None}), provider).run(None, {n: to_numpy(args[n]) for n in NAMES})
    close(y, reference(args, kappa=0.25)[0], "float32")


def _run_error(model, feeds, provider):
    with pytest.raises(Exception) as e:
        session(model, provider).run(None, feeds)
    msg = str(e.value)
    assert "CoupledScan" in msg, msg
    return msg


def test_refuses_bad_shapes_and_types(provider):
    args = random_args(2, 3, 5, 4, 3)
    feeds = {n: to_numpy(args[n]) for n in NAMES}
    bad = dict(feeds, B=feeds["B"][:, :2])                         # M mismatch
    assert "input B must be (batch, M, L, N)" in _run_error(scan_model(), bad, provider)
    bad = dict(feeds, A=feeds["A"][:, :, :2])                      # N mismatch between A and B
    assert "input B must be" in _run_error(scan_model(), bad, provider)
    bad = dict(feeds, u=feeds["u"][0])                             # wrong rank
    assert "input u must be (batch, M, L, E)" in _run_error(scan_model(ranks={"u": 3}), bad, provider)
    bad = dict(feeds, D=feeds["D"][:, :3])                         # E mismatch
    assert "input D must be (M, E)" in _run_error(scan_model(), bad, provider)
    many = random_args(1, 9, 2, 2, 2)                              # M beyond the kernel's limit
    assert "M (u axis 1) must be in [1, 8]" in _run_error(scan_model(), {n: to_numpy(many[n]) for n in NAMES}, provider)
    # float64 activations: no kernel for them
    f64 = {n: (v.astype(np.float64) if n in ACT else v) for n, v in feeds.items()}
    with pytest.raises(Exception) as e:
        session(scan_model(TensorProto.DOUBLE), provider).run(None, f64)
    assert "float32, float16 or bfloat16" in str(e.value) or "CoupledScan" in str(e.value)
    # activations of two different types
    mixed = dict(feeds, z=feeds["z"].astype(np.float16))
    msg = _run_error(scan_model(types={"z": TensorProto.FLOAT16}), mixed, provider)
    assert "must have u's element type" in msg


@pytest.mark.parametrize("attrs, text", [({"delta_softplus": 2}, "delta_softplus must be 0 or 1"),
                                         ({"coupling_scale": float("inf")}, "coupling_scale must be finite"),
                                         ({"has_final_state": 1}, "has_final_state=1 but the node has 1 outputs")])
def test_refuses_bad_attributes(attrs, text, provider):
    with pytest.raises(Exception) as e:
        session(scan_model(attrs=attrs), provider)
    assert text in str(e.value)


def test_library_exports_only_the_registration_entry_point():
    import ctypes
    lib = ctypes.CDLL(str(LIB))
    assert hasattr(lib, "RegisterCustomOps") and hasattr(lib, "CmDeployOrtProviders")
    for internal in ("coupledScanCpu", "_ZN9cm_deploy4scan14coupledScanCpuENS0_7ActTypeERKNS0_8ScanArgsE"):
        assert not hasattr(lib, internal)


# ---------------------------------------------------------------------------- exported model.onnx

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_runtime import feeds_for, make_checkpoint, shared_artifacts  # noqa: E402


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory):
    from cm_deploy.export import export_checkpoint
    d = tmp_path_factory.mktemp("ort_fp16")
    ckpt = make_checkpoint(d / "c.pt", 3)
    export_checkpoint(ckpt, d / "out", dtype="float16")
    return {"ckpt": ckpt, "onnx": d / "out" / "model.onnx"}


@pytest.mark.parametrize("batch,lengths", [(2, (6, 4, 3)), (1, (1, 1, 1)), (3, (17, 9, 30)), (1, (40, 2, 5))])
def test_model_onnx_runs_on_ort_and_matches_pytorch(art, batch, lengths, provider):
    from cm_deploy.runtime import load
    feeds = feeds_for(batch, lengths, seed=batch)
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    with load(art["onnx"], device=device) as m, load(art["a"], device="cpu", scan_impl="reference") as ref:
        assert m.kind == "onnxruntime" and m.ort_ops == LIB
        got, want = m.run(feeds)["output"], ref.run(feeds)["output"]
    assert got.shape == want.shape == (batch, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch,lengths", [(2, (6, 4, 3)), (1, (12, 12, 12))])
def test_model_onnx_float16_matches_pytorch(fp16_export, batch, lengths):
    from cm_deploy.runtime import load
    feeds = feeds_for(batch, lengths, seed=5)
    with load(fp16_export["onnx"], device="cpu") as m, load(fp16_export["ckpt"], device="cpu") as ref:
        got = m.run({k: v.astype(np.float16) for k, v in feeds.items()})["output"]
        want = ref.run(feeds)["output"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-2, atol=2e-2)


def test_model_onnx_equals_portable_onnx(art):
    """Same graph, the op by our library vs ONNX's own Scan: agree to float32 round-off."""
    from cm_deploy.runtime import load
    feeds = feeds_for(2, (9, 5, 7), seed=11)
    with load(art["onnx"], device="cpu") as a, load(art["portable"], device="cpu") as b:
        np.testing.assert_allclose(a.run(feeds)["output"], b.run(feeds)["output"], rtol=1e-5, atol=1e-6)


def test_portable_parity_runs_its_own_function_without_the_op_library(art, capsys):
    """The library is found here (this module runs only then), yet model.portable.onnx is checked on
    its own ONNX Scan: the runtime registers the library only where the graph needs it (model.onnx)
    or the caller asks, and every name says which ran. At L below, at and above a Scan chunk."""
    from cm_deploy.cli import main
    from cm_deploy.export.portable import CHUNK
    from cm_deploy.runtime import load
    from cm_deploy.runtime.parity import run_parity
    cases = [(f"{b}x{max(ls)}", feeds_for(b, ls, seed=b + ls[0]))
             for b, ls in ((2, (9, 5, 7)), (1, (CHUNK, 2, 5)), (2, (CHUNK + 9, 33, 2)), (1, (2 * CHUNK + 5, 3, 3)))]
    with load(art["portable"], device="cpu") as p, load(art["onnx"], device="cpu") as o, \
            load(art["portable"], device="cpu", ort_ops=True) as p_op, \
            load(art["a"], device="cpu", scan_impl="reference") as ref:
        assert p.ort_ops is None and p.coupled_scan == "function"
        assert p.name == "onnxruntime[CPU,function]:model.portable.onnx"
        assert o.ort_ops == LIB and o.name == "onnxruntime[CPU,custom op]:model.onnx"
        assert p_op.ort_ops == LIB and p_op.name == "onnxruntime[CPU,custom op]:model.portable.onnx"
        report = run_parity(ref, p, cases, atol=1e-5, rtol=1e-5)
        assert report["ok"] and report["model"] == p.name, report
        for _, feeds in cases:
            want = o.run(feeds)["output"]
            # the custom op takes the function's place when registered: the same kernel, the same bits
            np.testing.assert_array_equal(p_op.run(feeds)["output"], want)
            np.testing.assert_allclose(p.run(feeds)["output"], want, rtol=1e-5, atol=1e-6)
    for extra, ran in (([], "function"), (["--ort-ops", str(LIB)], "custom op")):
        rc = main(["parity", str(art["a"]), str(art["portable"]), "--device", "cpu", *extra])
        out, err = capsys.readouterr()
        assert rc == 0, out + err
        assert f"parity: onnxruntime[CPU,{ran}]:model.portable.onnx vs " in out


def test_cli_run_and_parity_of_model_onnx_without_tensorrt(art, tmp_path, capsys):
    from cm_deploy.cli import main
    x = tmp_path / "x.npz"
    np.savez(x, **feeds_for())
    rc = main(["run", str(art["onnx"]), "--inputs", str(x), "-o", str(tmp_path / "y.npz"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert np.load(tmp_path / "y.npz")["output"].shape == (2, 1)
    rc = main(["parity", str(art["a"]), str(art["onnx"]), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    assert "onnxruntime" in out


def test_both_cpu_state_loops_match_the_reference():
    """The CPU kernel's vectorized state loop (polynomial exp) and the exact one (std::exp, with
    CM_DEPLOY_SCAN_CPU_EXACT=1): both within float32 round-off of the reference, on states that
    decay over the whole range (dt * A down to -1e3)."""
    import subprocess
    import sys
    code = (
        "import sys; sys.path.insert(0, 'tests'); import numpy as np, torch\n"
        "from test_ort_ops import scan_model, session, random_args, to_numpy, reference, NAMES\n"
        "a = random_args(2, 3, 40, 24, 64, seed=5); a['A'] = a['A'] * 50\n"
        "y, c = session(scan_model(final_state=True)).run(None, {n: to_numpy(a[n]) for n in NAMES})\n"
        "wy, wc = reference(a)\n"
        "print(float(np.abs(y - wy.numpy()).max() / np.abs(wy.numpy()).max()),"
        " float(np.abs(c - wc.numpy()).max() / np.abs(wc.numpy()).max()))\n")
    errs = {}
    for exact in ("0", "1"):
        env = dict(os.environ, CM_DEPLOY_SCAN_CPU_EXACT=exact, CM_DEPLOY_ORT_OP_LIBRARY=str(LIB))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        errs[exact] = [float(v) for v in r.stdout.split()]
        assert max(errs[exact]) < 2e-6, errs


def test_runtime_runs_bfloat16_graphs_on_ort(tmp_path):
    """OrtBackend takes and returns bfloat16 (ml_dtypes) arrays although ORT's numpy bridge has no
    bfloat16: a bf16 CoupledScan graph (no Cast) through cm_deploy.runtime.load on the CPU provider."""
    from cm_deploy.runtime import load
    m = scan_model("bfloat16")
    m.graph.node.pop()                                  # drop the test graph's Cast: y leaves as bfloat16
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y_bf16", TensorProto.BFLOAT16, None))
    path = tmp_path / "bf16.onnx"
    onnx.save(m, str(path))
    args = random_args(2, 3, 9, 5, 4, dtype="bfloat16", seed=2)
    with load(path, device="cpu") as b:
        assert b.precision == "bfloat16"
        y = b.run({n: to_numpy(args[n]) for n in NAMES})["y_bf16"]
    assert y.dtype.name == "bfloat16" and y.shape == (2, 3, 9, 5)
    close(y, reference(args)[0], "bfloat16")


def test_library_says_which_providers_it_has_kernels_for():
    from cm_deploy.runtime.ort_backend import op_library_providers
    got = op_library_providers(LIB)
    assert got[0] == "CPUExecutionProvider" and set(got) <= {"CPUExecutionProvider", "CUDAExecutionProvider"}
    # the CI build has nvcc: the CUDA kernel is in (a CPU-only build says CPU only; checked below)
    import shutil
    if shutil.which("nvcc") and os.environ.get("CM_DEPLOY_CPU_ONLY") != "1":
        assert "CUDAExecutionProvider" in got
    assert op_library_providers("/nonexistent/lib.so") is None
