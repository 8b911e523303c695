"""The CUDA placement predictor (cm_deploy.runtime.placement) on hand-built graphs: the patterns
that put nodes on the host with copies (what model.onnx had before the exporter computed its steps
on the device), the ones that do not, and a profile read back. The exported graphs themselves are
checked in test_export.py and test_streaming.py; tests/gpu/test_ort_cuda.py compares the prediction
with ONNX Runtime's own placement on a GPU."""
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cm_deploy.runtime.placement import predict_cuda_placement, profile_placement  # noqa: E402


def _model(nodes, inits=(), outputs=("y",)):
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "L", 4]),
         helper.make_tensor_value_info("n", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _ops(p):
    return sorted(n["op_type"] for n in p.host_nodes)


def test_shape_arithmetic_feeding_a_device_input_is_copied_from_the_host():
    # arange(b) * L: L = Squeeze(Shape(x)[1]) on the host, multiplied with a device tensor
    m = _model([
        helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
        helper.make_node("Squeeze", ["s"], ["L"]),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.INT64),
        helper.make_node("Mul", ["nf", "L"], ["y"]),
    ])
    p = predict_cuda_placement(m)
    assert _ops(p) == ["Squeeze"]
    assert [(c["producer"], c["consumer"], c["kind"]) for c in p.copies] == [("Squeeze", "Mul", "MemcpyFromHost")]
    assert not p.cuda_graph_ok


def test_shape_arithmetic_feeding_only_host_inputs_needs_no_copy():
    # Reshape(x, Concat(Shape(x)[0:1], [-1, 2])): Concat on the host, read there by Reshape's kernel
    m = _model([
        helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
        helper.make_node("Concat", ["s", "tail"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ], inits=[("tail", np.array([-1, 2], np.int64))])
    p = predict_cuda_placement(m)
    assert _ops(p) == ["Concat"] and p.copies == [] and p.cuda_graph_ok


def test_device_values_feeding_host_inputs_are_copied_to_the_host():
    # Range(0, max(n), 1): a data-dependent length read by Range's kernel on the host
    m = _model([
        helper.make_node("ReduceMax", ["n"], ["mx"], keepdims=0),
        helper.make_node("Range", ["zero", "mx", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT),
    ], inits=[("zero", np.array(0, np.int64)), ("one", np.array(1, np.int64))])
    p = predict_cuda_placement(m)
    assert p.host_nodes == []
    assert [(c["consumer"], c["input"], c["kind"]) for c in p.copies] == [("Range", 1, "MemcpyToHost")]


def test_steps_from_shape_values_stay_on_the_device():
    # what the exporter emits (ops.onnx_node.onnx_steps): Shape -> Max -> ConstantOfShape -> CumSum
    m = _model([
        helper.make_node("Shape", ["x"], ["s0"], start=1, end=2),
        helper.make_node("Shape", ["x"], ["s1"], start=0, end=1),
        helper.make_node("Max", ["s0", "s1"], ["s"]),
        helper.make_node("ConstantOfShape", ["s"], ["z"]),
        helper.make_node("CumSum", ["z", "axis"], ["y"]),
    ], inits=[("axis", np.array(0, np.int64))])
    p = predict_cuda_placement(m)
    assert _ops(p) == ["Max"] and p.copies == [] and p.cuda_graph_ok


def test_control_flow_refuses_cuda_graphs():
    body = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "body",
                             [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4])],
                             [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])])
    m = _model([helper.make_node("Scan", ["x"], ["y"], body=body, num_scan_inputs=1)])
    p = predict_cuda_placement(m)
    assert p.copies == [] and p.control_flow and not p.cuda_graph_ok


def test_profile_placement_reads_node_events(tmp_path):
    events = [{"cat": "Session", "name": "model_run", "args": {}},
              {"cat": "Node", "name": "node_add_kernel_time", "args": {"op_name": "Add", "provider": "CUDAExecutionProvider"}},
              {"cat": "Node", "name": "node_max_kernel_time", "args": {"op_name": "Max", "provider": "CPUExecutionProvider"}},
              {"cat": "Node", "name": "node_add_fence_before", "args": {"op_name": "Add"}}]
    (tmp_path / "p.json").write_text(json.dumps(events))
    assert profile_placement(tmp_path / "p.json") == {
        "node_add": {"op_type": "Add", "provider": "CUDAExecutionProvider"},
        "node_max": {"op_type": "Max", "provider": "CPUExecutionProvider"}}
