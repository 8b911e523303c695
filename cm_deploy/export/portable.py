"""CoupledScan in standard ONNX: a model-local function (domain cm_deploy) that stock ONNX Runtime
runs with no custom library.

The function body casts every activation to float32 (state math is float32 whatever the I/O dtype,
DESIGN.md section 2, and the scan of a float16/bfloat16 file runs on ORT's float32 kernels), computes
dt = softplus(delta + delta_bias) for the whole sequence, then runs an ONNX `Scan` over the time
axis carrying the coupled state c (batch, E, N):

    h   = exp(dt_t * A) * c + (dt_t * u_t) * B_t          # (batch, M, E, N)
    c   = coupling_scale * sum_m h
    y_t = sum_n h * C_t                                    # (batch, M, E)

and finishes with the D skip and the SiLU(z) gate, cast back to u's dtype (CastLike). batch and L
are read from the tensors at run time, so the function is fully dynamic. Memory is O(batch*M*E*N)
per step, never O(L*E*N).
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from ..contract import DOMAIN, INPUT_NAMES, OP_TYPE, OUTPUT_NAMES, STATE_INPUT

FLOAT = TensorProto.FLOAT


def _ref_attr(name: str, ref: str, attr_type) -> AttributeProto:
    """An attribute of a body node that takes the calling node's attribute `ref`."""
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, attr_type
    return a


def _const_ints(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _scan_body() -> onnx.GraphProto:
    """One time step. A32 and kappa come from the enclosing function body (outer scope); every
    name here starts with "st_" because names must be unique across the nested scopes (SSA)."""
    mk = helper.make_node
    nodes = [
        _const_ints("st_ax_last", [-1]), _const_ints("st_ax1", [1]), _const_ints("st_ax2", [2]),
        mk("Unsqueeze", ["st_dt", "st_ax_last"], ["st_dt_e"]),          # (b, M, E, 1)
        mk("Mul", ["st_dt_e", "A32"], ["st_dtA"]),                      # (b, M, E, N)
        mk("Exp", ["st_dtA"], ["st_dA"]),
        mk("Unsqueeze", ["st_c_prev", "st_ax1"], ["st_c_b"]),           # (b, 1, E, N)
        mk("Mul", ["st_dA", "st_c_b"], ["st_decay"]),
        mk("Unsqueeze", ["st_dtu", "st_ax_last"], ["st_dtu_e"]),        # (b, M, E, 1)
        mk("Unsqueeze", ["st_B", "st_ax2"], ["st_B_e"]),                # (b, M, 1, N)
        mk("Mul", ["st_dtu_e", "st_B_e"], ["st_dBu"]),
        mk("Add", ["st_decay", "st_dBu"], ["st_h"]),
        mk("ReduceSum", ["st_h", "st_ax1"], ["st_h_sum"], keepdims=0),  # (b, E, N)
        mk("Mul", ["st_h_sum", "kappa"], ["st_c_next"]),
        mk("Unsqueeze", ["st_C", "st_ax2"], ["st_C_e"]),                # (b, M, 1, N)
        mk("Mul", ["st_h", "st_C_e"], ["st_hC"]),
        mk("ReduceSum", ["st_hC", "st_ax_last"], ["st_y"], keepdims=0),  # (b, M, E)
    ]
    vi = helper.make_tensor_value_info
    inputs = [vi(n, FLOAT, [None] * 3) for n in ("st_c_prev", "st_dt", "st_dtu", "st_B", "st_C")]
    outputs = [vi("st_c_next", FLOAT, [None] * 3), vi("st_y", FLOAT, [None] * 3)]
    return helper.make_graph(nodes, "CoupledScan_step", inputs, outputs)


def coupled_scan_function(opset: int, stateful: bool = False) -> onnx.FunctionProto:
    """FunctionProto cm_deploy.CoupledScan(u, delta, A, B, C, D, z, delta_bias) -> y with the
    attributes delta_softplus (int), coupling_scale (float) and has_final_state (int); body in ONNX
    opset `opset`. stateful: the streaming form, (..., delta_bias, initial_state) -> (y, final_state)."""
    mk = helper.make_node
    nodes = [
        *(mk("Cast", [x], [f"{x}32"], to=FLOAT) for x in ("u", "delta", "A", "B", "C", "D", "z")),
        mk("Cast", ["delta_bias"], ["bias32"], to=FLOAT),
        _const_ints("ax1", [1]),
        # dt = delta + bias (bias (M, E) -> (M, 1, E) broadcasts over (b, M, L, E))
        mk("Unsqueeze", ["bias32", "ax1"], ["bias_b"]),
        mk("Add", ["delta32", "bias_b"], ["dt_raw"]),
        # softplus without overflow: max(x, 0) + log(1 + exp(-|x|))
        mk("Abs", ["dt_raw"], ["dt_abs"]),
        mk("Neg", ["dt_abs"], ["dt_nabs"]),
        mk("Exp", ["dt_nabs"], ["dt_e"]),
        mk("Constant", [], ["one"], value=helper.make_tensor("one", FLOAT, [], [1.0])),
        mk("Add", ["dt_e", "one"], ["dt_1p"]),
        mk("Log", ["dt_1p"], ["dt_log"]),
        mk("Relu", ["dt_raw"], ["dt_pos"]),
        mk("Add", ["dt_pos", "dt_log"], ["dt_sp"]),
        mk("Constant", [], ["softplus_i"]),
        mk("Cast", ["softplus_i"], ["softplus_b"], to=TensorProto.BOOL),
        mk("Where", ["softplus_b", "dt_sp", "dt_raw"], ["dt"]),
        mk("Mul", ["dt", "u32"], ["dtu"]),
        mk("Constant", [], ["kappa"]),
        # c[0]: the initial state (streaming), else zeros of shape (batch, E, N) read at run time
        *([mk("Cast", ["initial_state"], ["c0"], to=FLOAT)] if stateful else [
            mk("Shape", ["u"], ["s_b"], start=0, end=1),
            mk("Shape", ["u"], ["s_e"], start=3, end=4),
            mk("Shape", ["A"], ["s_n"], start=2, end=3),
            mk("Concat", ["s_b", "s_e", "s_n"], ["c0_shape"], axis=0),
            mk("ConstantOfShape", ["c0_shape"], ["c0"], value=helper.make_tensor("zero", FLOAT, [1], [0.0]))]),
        # time first: Scan over axis 0, the axis every conforming runtime implements
        *(mk("Transpose", [x], [f"{x}_t"], perm=[2, 0, 1, 3]) for x in ("dt", "dtu", "B32", "C32")),
        mk("Scan", ["c0", "dt_t", "dtu_t", "B32_t", "C32_t"], ["final_state" if stateful else "c_last", "y_scan_t"],
           num_scan_inputs=4, body=_scan_body()),
        mk("Transpose", ["y_scan_t"], ["y_scan"], perm=[1, 2, 0, 3]),
        # y += D * u ; y *= z * sigmoid(z)
        mk("Unsqueeze", ["D32", "ax1"], ["D_b"]),
        mk("Mul", ["D_b", "u32"], ["Du"]),
        mk("Add", ["y_scan", "Du"], ["y_skip"]),
        mk("Sigmoid", ["z32"], ["z_sig"]),
        mk("Mul", ["z32", "z_sig"], ["z_gate"]),
        mk("Mul", ["y_skip", "z_gate"], ["y32"]),
        mk("CastLike", ["y32", "u"], ["y"]),
    ]
    # The two Constants take their value from the calling node's attributes.
    by_out = {n.output[0]: n for n in nodes if n.op_type == "Constant"}
    by_out["softplus_i"].attribute.append(_ref_attr("value_int", "delta_softplus", AttributeProto.INT))
    by_out["kappa"].attribute.append(_ref_attr("value_float", "coupling_scale", AttributeProto.FLOAT))
    return helper.make_function(
        DOMAIN, OP_TYPE,
        inputs=list(INPUT_NAMES) + ([STATE_INPUT] if stateful else []),
        outputs=list(OUTPUT_NAMES[:2 if stateful else 1]),
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        # has_final_state is declared for the TensorRT plugin's sake; the body's outputs are fixed
        attributes=["delta_softplus", "coupling_scale", "has_final_state"],
        doc_string="Coupled Mamba selective scan (cm-deploy DESIGN.md section 2) in standard ONNX.")


def make_portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (with cm_deploy::CoupledScan nodes, all in one of the two forms) that
    carries the function above."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    if any(f.domain == DOMAIN and f.name == OP_TYPE for f in out.functions):
        raise ValueError("model already defines cm_deploy.CoupledScan")
    forms = {len(n.input) for n in out.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE}
    if len(forms) > 1:
        raise ValueError("the graph mixes CoupledScan nodes with and without state")
    out.functions.append(coupled_scan_function(opset, stateful=forms == {9}))
    return out
