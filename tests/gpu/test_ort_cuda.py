"""model.onnx and model.stream.onnx on ONNX Runtime's CUDA provider with the CoupledScan op library
(issue 21): every node on the device (ORT's own placement, read from a session profile, against the
prediction of runtime/placement.py), CUDA graphs (one capture per input shape in one session) equal
to the uncaptured runs, exact float32 (a padded batch equals each sample alone, streamed chunks
equal one run), and per-token streaming with the state kept on the device.

Needs onnxruntime-gpu and the op library built for this GPU (CM_DEPLOY_ORT_OP_LIBRARY, or the
runtime's search). Writes $CM_GPU_OUT/ort_cuda.json and placement.md (the placement table)."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from cm_deploy.runtime import load, open_stream  # noqa: E402
from cm_deploy.runtime.placement import predict_cuda_placement, profile_placement  # noqa: E402
from cm_deploy.runtime.specs import np_dtype  # noqa: E402

MODS = {"text": 40, "audio": 20, "vision": 12}
CONFIG = dict(modalities=MODS, d_model=64, n_layers=2, d_state=16)
# (batch, lengths per modality): different lengths, batch 1, L 1
SHAPES = [(2, (9, 5, 3)), (1, (4, 4, 4)), (3, (7, 1, 11))]
EXACT = 1e-5          # float32 on ORT CUDA without TF32: max |a - b| / max |b|
RESULTS: dict = {}


@pytest.fixture(scope="module")
def lib():
    from cm_deploy.runtime.native import find_library
    from cm_deploy.runtime.ort_backend import op_library_providers
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime ({ort.__version__}) has no CUDA provider: install onnxruntime-gpu")
    path = find_library("ort", required=False)
    if path is None:
        pytest.skip("no CoupledScan op library: build it for this GPU (scripts/build_plugin.sh) and set "
                    "CM_DEPLOY_ORT_OP_LIBRARY")
    if "CUDAExecutionProvider" not in (op_library_providers(path) or ["CUDAExecutionProvider"]):
        pytest.skip(f"{path} has no CUDA kernel (built without nvcc)")
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One random checkpoint (nothing trained) exported at every precision, float32 with the
    streaming graphs."""
    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    from cm_deploy.export import export_checkpoint
    d = tmp_path_factory.mktemp("ort_cuda")
    torch.manual_seed(0)
    ckpt = save_checkpoint(CoupledMamba(CoupledMambaConfig(**CONFIG)), d / "ckpt.pt")
    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        export_checkpoint(ckpt, d / dtype, dtype=dtype, streaming=dtype == "float32")
        out[dtype] = d / dtype
    return out


@pytest.fixture(scope="module", autouse=True)
def report(gpu_out):
    yield RESULTS
    if not RESULTS:
        return
    RESULTS["versions"] = {"onnxruntime": ort.__version__, "torch": torch.__version__,
                           "device": torch.cuda.get_device_name(0)}
    (gpu_out / "ort_cuda.json").write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
    if "placement" in RESULTS:
        (gpu_out / "placement.md").write_text(placement_markdown(RESULTS["placement"]))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def inputs(batch, lens, dtype="float32", seed=0, valid=None):
    """Random modality inputs (padding past `valid` lengths holds junk) and their lengths."""
    rng = np.random.default_rng(seed)
    dt = np_dtype(dtype)
    feeds = {n: rng.standard_normal((batch, L, f), dtype=np.float32).astype(dt) for (n, f), L in zip(MODS.items(), lens)}
    for i, n in enumerate(MODS):
        feeds[n + "_lengths"] = np.asarray(valid[i] if valid is not None else [lens[i]] * batch, np.int64)
    return feeds


# ---------------------------------------------------------------------------- placement

def ort_placement(path, lib, feeds, tmp_path):
    """Every node's provider from ONNX Runtime's own profile of one run on the CUDA provider."""
    from cm_deploy.runtime.ort_backend import preload_cuda_libraries
    preload_cuda_libraries(ort)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / path.stem)
    so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                          "CPUExecutionProvider"])
    sess.run_with_ort_values(None, feeds)
    return profile_placement(sess.end_profiling())


@pytest.mark.parametrize("dtype,fname", [("float32", "model.onnx"), ("float32", "model.stream.onnx"),
                                         ("float16", "model.onnx"), ("bfloat16", "model.onnx")])
def test_every_node_on_the_cuda_provider(exports, lib, dtype, fname, tmp_path):
    path = exports[dtype] / fname
    from cm_deploy.runtime.specs import fill_defaults
    with load(path, device="cuda", ort_ops=lib) as spec:        # input names and the zero state
        feeds = fill_defaults(spec.inputs, inputs(2, (9, 9, 9) if "stream" in fname else (9, 5, 3), dtype))
    # host OrtValues (bfloat16 typed by its ONNX code: numpy has none); ORT copies them to the GPU
    feeds = {k: (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v.view(np.uint16), 16)
                 if v.dtype.name == "bfloat16" else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)))
             for k, v in feeds.items()}
    placed = ort_placement(path, lib, feeds, tmp_path)
    predicted = predict_cuda_placement(path)
    on_host = sorted(v["op_type"] for v in placed.values() if v["provider"] != "CUDAExecutionProvider")
    copies = sorted(v["op_type"] for v in placed.values() if v["op_type"].startswith("Memcpy"))
    RESULTS.setdefault("placement", {})[f"{dtype}/{fname}"] = {
        "nodes": placed, "predicted": predicted.to_dict(),
        "by_provider": dict(collections.Counter(v["provider"] for v in placed.values()))}
    assert copies == [], copies
    assert on_host == sorted(n["op_type"] for n in predicted.host_nodes), (on_host, predicted.summary())
    assert on_host == ([] if "stream" in fname else ["Max"])     # the common length, a shape value


def placement_markdown(placement) -> str:
    lines = ["# ONNX Runtime CUDA provider: where every node ran", "",
             "From the session profile of one run (tests/gpu/test_ort_cuda.py); `predicted` is "
             "cm_deploy.runtime.placement's reading of the graph alone.", "",
             "| graph | nodes | CUDA | CPU | CPU nodes | copies | predicted CPU | CUDA graphs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in placement.items():
        cpu = sorted(v["op_type"] for v in p["nodes"].values() if v["provider"] != "CUDAExecutionProvider")
        copies = sum(v["op_type"].startswith("Memcpy") for v in p["nodes"].values())
        pred = sorted(n["op_type"] for n in p["predicted"]["host_nodes"])
        lines.append(f"| {name} | {len(p['nodes'])} | {p['by_provider'].get('CUDAExecutionProvider', 0)} | "
                     f"{len(cpu)} | {', '.join(cpu) or '-'} | {copies} | {', '.join(pred) or '-'} | "
                     f"{'possible' if p['predicted']['cuda_graph_ok'] else 'refused'} |")
    lines += ["", "Every node (graph, node, op type, provider):", "", "| graph | node | op | provider |", "|---|---|---|---|"]
    for name, p in placement.items():
        for node, v in sorted(p["nodes"].items()):
            lines.append(f"| {name} | {node} | {v['op_type']} | {v['provider'].replace('ExecutionProvider', '')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- CUDA graphs

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_graphs_equal_the_uncaptured_runs(exports, lib, dtype):
    """One session, one capture per input shape (gpu_graph_id): each shape runs 4 times with new
    data (ORT runs an id normally first, then captures, then replays); every output equals the
    uncaptured session's. Device inputs (torch CUDA tensors) are copied into the capture's buffers."""
    path = exports[dtype] / "model.onnx"
    worst = 0.0
    with load(path, device="cuda", ort_ops=lib) as plain, load(path, device="cuda", ort_ops=lib, cuda_graph=True) as g:
        assert "+graph" in g.name
        for s, (batch, lens) in enumerate(SHAPES):
            for rep in range(4):
                valid = [np.minimum(np.arange(batch, 0, -1), L) for L in lens]      # padded samples too
                feeds = inputs(batch, lens, dtype, seed=10 * s + rep, valid=valid)
                want = plain.run(feeds)["output"].astype(np.float32)
                if rep == 3 and dtype != "bfloat16":
                    feeds = {k: torch.as_tensor(v).cuda() for k, v in feeds.items()}
                got = g.run(feeds)["output"].astype(np.float32)
                worst = max(worst, rel(got, want))
        assert g.captured_shapes == len(SHAPES)
    RESULTS.setdefault("cuda_graph_vs_uncaptured_rel", {})[dtype] = worst
    assert worst <= {"float32": 1e-6, "float16": 1e-3, "bfloat16": 8e-3}[dtype], worst


# ---------------------------------------------------------------------------- exact float32

def test_exact_float32_padded_batch_and_streamed_chunks(exports, lib):
    """float32 without TF32 (the default): a padded batch equals each sample run alone, and a
    stream fed in chunks equals one run of the whole sequence, within 1e-5 of the output's scale.
    With tf32=True (ORT's own default) the same numbers are recorded: TF32 is what makes the
    ~1e-4 differences."""
    lens = [[9, 4, 1], [5, 5, 2], [2, 3, 11]]          # per modality, per sample
    shape = tuple(max(v) for v in lens)
    feeds = inputs(3, shape, valid=lens, seed=3)
    record = {}
    for tf32 in (False, True):
        with load(exports["float32"] / "model.onnx", device="cuda", ort_ops=lib, tf32=tf32) as m:
            batch = m.run(feeds)["output"]
            alone = np.concatenate([m.run({**{n: feeds[n][i:i + 1, :lens[j][i]] for j, n in enumerate(MODS)}})["output"]
                                    for i in range(3)])
            record[f"padded_batch_vs_alone_rel{'_tf32' if tf32 else ''}"] = rel(batch, alone)
    # streamed chunks (the pad rule: every modality the same length here) vs one run of model.onnx
    L, chunks = 16, [3, 1, 5, 7]
    whole = inputs(2, (L, L, L), seed=4)
    for tf32 in (False, True):
        with load(exports["float32"] / "model.onnx", device="cuda", ort_ops=lib, tf32=tf32) as m, \
                open_stream(exports["float32"] / "model.stream.onnx", batch=2, device="cuda", ort_ops=lib,
                            cuda_graph=not tf32, tf32=tf32) as s:
            one = m.run(whole)["output"]
            t0 = 0
            for T in chunks:
                y = s.push({n: whole[n][:, t0:t0 + T] for n in MODS})
                t0 += T
            record[f"stream_chunks_vs_one_run_rel{'_tf32' if tf32 else ''}"] = rel(y, one)
    RESULTS["exact_float32"] = record
    assert record["padded_batch_vs_alone_rel"] <= EXACT, record
    assert record["stream_chunks_vs_one_run_rel"] <= EXACT, record


# ---------------------------------------------------------------------------- streaming per token

def test_stream_per_token_keeps_its_state_on_the_device(exports, lib):
    """T = 1 pushes with CUDA graphs: the state lives in two sets of CUDA OrtValues used in turn
    (bound through IOBinding, never copied to the host), one capture per set; every prediction
    equals an uncaptured stream's."""
    path = exports["float32"] / "model.stream.onnx"
    with open_stream(path, batch=2, device="cuda", ort_ops=lib, cuda_graph=True) as s, \
            open_stream(path, batch=2, device="cuda", ort_ops=lib) as ref:
        assert s.state_device == "cuda:0"
        assert all(v.device_name().lower() == "cuda" for v in s.state.values())
        first = s.state_addresses()
        seen, worst = [], 0.0
        for t in range(10):
            chunk = inputs(2, (1, 1, 1), seed=100 + t)
            chunk = {n: chunk[n] for n in MODS}
            if t % 3 == 2:          # device inputs too
                chunk = {k: torch.as_tensor(v).cuda() for k, v in chunk.items()}
            y = s.push(chunk)
            yr = ref.push({k: (v.cpu().numpy() if hasattr(v, "cpu") else v) for k, v in chunk.items()})
            worst = max(worst, rel(y, yr))
            seen.append(s.state_addresses())
        assert all(seen[i] == (first if i % 2 else seen[0]) for i in range(10))
        assert set(seen[0].values()).isdisjoint(first.values())
        assert s.backend.captured_shapes == 2           # one per state set
    RESULTS["stream_per_token"] = {"state_device": "cuda:0", "captured_vs_uncaptured_rel": worst}
    assert worst <= 1e-6, worst
