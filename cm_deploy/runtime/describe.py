"""What a model file is, without the backend that runs it (`cm-deploy inspect`): an ONNX file is
read with the onnx package (inputs, outputs, opsets, CoupledScan nodes and their attributes, whether
it carries the portable function), an engine from its JSON sidecar, a checkpoint from its config."""
from __future__ import annotations

from pathlib import Path

from ..contract import BATCH_DIM, BF16_RUNS_ON, DOMAIN, OP_TYPE, OUTPUT_NAME, length_dim
from ..errors import UserError
from .backend import model_kind
from .specs import manifest_for


def _onnx_dtype(onnx, elem_type) -> str:
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _io(onnx, vi) -> dict:
    t = vi.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else (int(d.dim_value) if d.HasField("dim_value") else None)
             for d in t.shape.dim]
    return {"name": vi.name, "shape": shape, "dtype": _onnx_dtype(onnx, t.elem_type)}


def describe_onnx(path) -> dict:
    path = Path(path)
    try:
        import onnx
    except ImportError:
        raise UserError("describing an ONNX file needs the onnx package (pip install onnx)") from None
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX file: {' '.join(str(e).split())[:200]}") from None
    g = m.graph
    scans = []
    for n in g.node:
        if n.domain == DOMAIN and n.op_type == OP_TYPE:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            scans.append({"name": n.name, "inputs": len(n.input), "outputs": len(n.output), "attributes": attrs})
    has_function = any(f.domain == DOMAIN and f.name == OP_TYPE for f in m.functions)
    man = manifest_for(path) or {}
    d = {"name": path.name, "kind": "onnx", "path": str(path),
         "opsets": {(o.domain or "ai.onnx"): int(o.version) for o in m.opset_import},
         "producer": f"{m.producer_name} {m.producer_version}".strip(),
         "inputs": [_io(onnx, vi) for vi in g.input], "outputs": [_io(onnx, vi) for vi in g.output],
         "nodes": len(g.node), "coupled_scan_nodes": scans,
         "runs_on": ("any ONNX runtime (CoupledScan is a model-local function)" if has_function or not scans else
                     "TensorRT with the CoupledScan plugin, or ONNX Runtime with the CoupledScan op library"),
         "precision": man.get("dtype") or next((e["dtype"] for e in (_io(onnx, vi) for vi in g.input)
                                                if e["dtype"] in ("float32", "float16", "bfloat16")), "float32")}
    if d["precision"] == "bfloat16":
        d["runs_on"] += f"; {BF16_RUNS_ON}"
    if man:
        d["manifest"] = {"role": man.get("_role"), "config": man.get("config")}
    return d


def describe_file(path) -> dict:
    """A dict describing the model file at `path` (UserError when it cannot be read)."""
    path = Path(path)
    kind = model_kind(path)
    if not path.is_file():
        raise UserError(f"model not found: {path}")
    if kind == "onnx":
        return describe_onnx(path)
    if kind == "tensorrt":
        from .engine import EngineInfo
        try:
            b = EngineInfo(path)
        except UserError:
            raise UserError(f"{path}: an engine describes itself only to TensorRT, and its sidecar "
                            f"({path.name}.json) is missing; run `cm-deploy inspect` where TensorRT is installed"
                            ) from None
        d = b.describe()
        d["built_with"] = {k: b.sidecar.get(k) for k in ("tensorrt", "device", "plugin", "typing", "created")}
        return d
    try:
        from ..checkpoint import read_checkpoint
    except ImportError:
        raise UserError("describing a checkpoint needs PyTorch (pip install 'cm-deploy[model]')") from None
    config, sd, meta = read_checkpoint(path)
    return {"name": path.name, "kind": "checkpoint", "path": str(path), "config": config.to_dict(),
            "parameters": int(sum(v.numel() for v in sd.values())), "meta": meta,
            "inputs": [{"name": n, "shape": [BATCH_DIM, length_dim(n), f], "dtype": "float32"}
                       for n, f in config.modalities.items()],
            "outputs": [{"name": OUTPUT_NAME, "shape": [BATCH_DIM, config.num_outputs], "dtype": "float32"}]}
