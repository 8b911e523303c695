"""CoupledScan in standard ONNX: a model-local function (domain cm_deploy) that stock ONNX Runtime
runs with no custom library.

The function body casts every activation to float32 (state math is float32 whatever the I/O dtype,
docs/design.md "Precision"; the scan of a float16/bfloat16 file runs on float32 kernels) and computes
dt = softplus(delta + delta_bias) for the whole sequence. The coupled state is one first-order
linear recurrence per (batch, e, n):

    c[t] = a[t] * c[t-1] + b[t]      a[t] = kappa * sum_m exp(dt[m,t] * A[m])
                                     b[t] = kappa * sum_m dt[m,t] * u[m,t] * B[m,t]
    y[m,t] = sum_n C[m,t] * exp(dt[m,t] * A[m]) * c[t-1]  +  (sum_n C[m,t] * B[m,t]) * dt[m,t] * u[m,t]

The second part of y needs no state and is computed for the whole sequence at once. The rest runs
in an ONNX `Scan` over chunks of CHUNK time steps (not one Scan iteration per step): inside a chunk
the decays exp(dt * A), a, b and the y contraction are single batched ops over the chunk's steps,
and only c[t] = a[t] * c[t-1] + b[t] itself is sequential (two elementwise ops per step, unrolled
in the body). L not a multiple of CHUNK is padded with identity steps (a = 1, b = 0: the carried
state, and so final_state, passes through them unchanged) and y is sliced back to L. batch, L, M,
E and N are read from the tensors at run time, so the function is fully dynamic. Memory is
O(batch * M * CHUNK * E * N) per chunk, never O(L * E * N).
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from ..contract import DOMAIN, INPUT_NAMES, OP_TYPE, OUTPUT_NAMES, STATE_INPUT

FLOAT = TensorProto.FLOAT
# Time steps per Scan iteration, chosen by measurement on ONNX Runtime's CPU provider
# (benchmarks/bench_portable.py, benchmarks/results/cpu/portable_scan.md).
CHUNK = 32


def _ref_attr(name: str, ref: str, attr_type) -> AttributeProto:
    """An attribute of a body node that takes the calling node's attribute `ref`."""
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, attr_type
    return a


def _const_ints(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _chunk_body(chunk: int, intra: str = "loop") -> onnx.GraphProto:
    """One chunk of `chunk` steps. A5 (M, 1, E, N) comes from the enclosing function body (outer
    scope); every name here starts with "ck_" because names must be unique across the nested
    scopes (SSA). Scan inputs: ck_dt (b, M, T, E), ck_kdtu = kappa * dt * u as (b, T, E, M),
    ck_B (b, T, M, N), ck_C (b, M, T, N), ck_kv and ck_pv (T, 1, 1): kappa and 0 on real steps,
    0 and 1 on padding, so that a = kv * sum_m exp(dt A) + pv is exactly 1 on padding."""
    mk = helper.make_node
    T = chunk
    nodes = [
        _const_ints("ck_ax1", [1]), _const_ints("ck_ax_last", [-1]),
        mk("Unsqueeze", ["ck_dt", "ck_ax_last"], ["ck_dt_e"]),              # (b, M, T, E, 1)
        mk("Mul", ["ck_dt_e", "A5"], ["ck_dtA"]),                            # (b, M, T, E, N)
        mk("Exp", ["ck_dtA"], ["ck_dA"]),
        mk("ReduceSum", ["ck_dA", "ck_ax1"], ["ck_dA_sum"], keepdims=0),     # (b, T, E, N)
        mk("Mul", ["ck_dA_sum", "ck_kv"], ["ck_a_k"]),
        mk("Add", ["ck_a_k", "ck_pv"], ["ck_a"]),                            # a[t]
        mk("MatMul", ["ck_kdtu", "ck_B"], ["ck_b"]),                         # b[t] = sum_m (b, T, E, M) @ (b, T, M, N)
        mk("Unsqueeze", ["ck_c_in", "ck_ax1"], ["ck_c0"]),                   # (b, 1, E, N)
    ]
    if intra == "loop":
        # c[t] = a[t] * c[t-1] + b[t], step by step; c[t-1] of every step kept for y
        if T == 1:
            nodes += [mk("Mul", ["ck_a", "ck_c0"], ["ck_ac1"]), mk("Add", ["ck_ac1", "ck_b"], ["ck_c1"]),
                      mk("Identity", ["ck_c0"], ["ck_cprev"])]
        else:
            nodes += [_const_ints("ck_ones", [1] * T),
                      mk("Split", ["ck_a", "ck_ones"], [f"ck_a{t}" for t in range(1, T + 1)], axis=1),
                      mk("Split", ["ck_b", "ck_ones"], [f"ck_b{t}" for t in range(1, T + 1)], axis=1)]
            for t in range(1, T + 1):
                nodes += [mk("Mul", [f"ck_a{t}", f"ck_c{t - 1}"], [f"ck_ac{t}"]),
                          mk("Add", [f"ck_ac{t}", f"ck_b{t}"], [f"ck_c{t}"])]
            nodes.append(mk("Concat", [f"ck_c{t}" for t in range(T)], ["ck_cprev"], axis=1))   # (b, T, E, N)
        nodes.append(mk("Squeeze", [f"ck_c{T}", "ck_ax1"], ["ck_c_out"]))
    else:
        # closed form: c[t] = exp(cum[t]) c0 + sum_{s<=t} exp(cum[t] - cum[s]) b[s], cum = cumsum log a
        mask = [[1 if s <= t else 0 for s in range(T)] for t in range(T)]
        nodes += [
            mk("Log", ["ck_a"], ["ck_la"]),
            mk("CumSum", ["ck_la", "ck_ax1_s"], ["ck_cum"]),                  # (b, T, E, N)
            _const_ints("ck_ax2", [2]),
            mk("Unsqueeze", ["ck_cum", "ck_ax2"], ["ck_cum_t"]),             # (b, T, 1, E, N)
            mk("Unsqueeze", ["ck_cum", "ck_ax1"], ["ck_cum_s"]),             # (b, 1, T, E, N)
            mk("Sub", ["ck_cum_t", "ck_cum_s"], ["ck_seg"]),                 # (b, T, T, E, N)
            mk("Constant", [], ["ck_mask"], value=helper.make_tensor("ck_mask", TensorProto.BOOL, [T, T, 1, 1],
                                                                      [m for row in mask for m in row])),
            mk("Constant", [], ["ck_ninf"], value=helper.make_tensor("ck_ninf", FLOAT, [], [float("-inf")])),
            mk("Where", ["ck_mask", "ck_seg", "ck_ninf"], ["ck_segm"]),
            mk("Exp", ["ck_segm"], ["ck_W"]),
            mk("Unsqueeze", ["ck_b", "ck_ax1"], ["ck_b_s"]),                 # (b, 1, T, E, N)
            mk("Mul", ["ck_W", "ck_b_s"], ["ck_Wb"]),
            mk("ReduceSum", ["ck_Wb", "ck_ax2"], ["ck_cb"], keepdims=0),    # (b, T, E, N)
            mk("Exp", ["ck_cum"], ["ck_ecum"]),
            mk("Mul", ["ck_ecum", "ck_c0"], ["ck_cc0"]),
            mk("Add", ["ck_cb", "ck_cc0"], ["ck_call"]),                     # c[1..T]
            _const_ints("ck_s0", [0]), _const_ints("ck_sT1", [T - 1]), _const_ints("ck_sT", [T]),
            mk("Slice", ["ck_call", "ck_s0", "ck_sT1", "ck_ax1"], ["ck_chead"]),
            mk("Concat", ["ck_c0", "ck_chead"], ["ck_cprev"], axis=1),
            mk("Slice", ["ck_call", "ck_sT1", "ck_sT", "ck_ax1"], ["ck_clast"]),
            mk("Squeeze", ["ck_clast", "ck_ax1"], ["ck_c_out"]),
            mk("Constant", [], ["ck_ax1_s"], value=helper.make_tensor("ck_ax1_s", TensorProto.INT64, [], [1])),
        ]
    nodes += [
        # y[m,t] (state part) = sum_n exp(dt A) * c[t-1] * C: the product, then one batched mat-vec
        mk("Unsqueeze", ["ck_cprev", "ck_ax1"], ["ck_cprev_m"]),            # (b, 1, T, E, N)
        mk("Mul", ["ck_dA", "ck_cprev_m"], ["ck_P"]),                        # (b, M, T, E, N)
        mk("Unsqueeze", ["ck_C", "ck_ax_last"], ["ck_C_v"]),                 # (b, M, T, N, 1)
        mk("MatMul", ["ck_P", "ck_C_v"], ["ck_y_v"]),                        # (b, M, T, E, 1)
        mk("Squeeze", ["ck_y_v", "ck_ax_last"], ["ck_y"]),
    ]
    vi = helper.make_tensor_value_info
    inputs = [vi("ck_c_in", FLOAT, [None] * 3), vi("ck_dt", FLOAT, [None] * 4), vi("ck_kdtu", FLOAT, [None] * 4),
              vi("ck_B", FLOAT, [None] * 4), vi("ck_C", FLOAT, [None] * 4),
              vi("ck_kv", FLOAT, [T, 1, 1]), vi("ck_pv", FLOAT, [T, 1, 1])]
    outputs = [vi("ck_c_out", FLOAT, [None] * 3), vi("ck_y", FLOAT, [None] * 4)]
    # topological order: constants the closed form uses are appended last above
    consts = [n for n in nodes if n.op_type == "Constant"]
    return helper.make_graph(consts + [n for n in nodes if n.op_type != "Constant"], "CoupledScan_chunk",
                             inputs, outputs)


def coupled_scan_function(opset: int, stateful: bool = False, chunk: int = CHUNK,
                          intra: str = "loop") -> onnx.FunctionProto:
    """FunctionProto cm_deploy.CoupledScan(u, delta, A, B, C, D, z, delta_bias) -> y with the
    attributes delta_softplus (int), coupling_scale (float) and has_final_state (int); body in ONNX
    opset `opset`. stateful: the streaming form, (..., delta_bias, initial_state) -> (y, final_state).
    chunk: time steps per Scan iteration."""
    mk = helper.make_node
    T = int(chunk)
    nodes = [
        *(mk("Cast", [x], [f"{x}32"], to=FLOAT) for x in ("u", "delta", "A", "B", "C", "D", "z")),
        mk("Cast", ["delta_bias"], ["bias32"], to=FLOAT),
        _const_ints("ax1", [1]), _const_ints("ax2", [2]), _const_ints("ax_last", [-1]),
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
        mk("Mul", ["dtu", "kappa"], ["kdtu"]),
        # the stateless part of y: (sum_n C * B) * dt * u, for the whole sequence
        mk("Mul", ["C32", "B32"], ["CB"]),
        mk("ReduceSum", ["CB", "ax_last"], ["CB_sum"], keepdims=1),          # (b, M, L, 1)
        mk("Mul", ["CB_sum", "dtu"], ["y_direct"]),
        mk("Unsqueeze", ["A32", "ax1"], ["A5"]),                              # (M, 1, E, N)
        # c[0]: the initial state (streaming), else zeros of shape (batch, E, N) read at run time
        mk("Shape", ["u"], ["s_b"], start=0, end=1),
        mk("Shape", ["u"], ["s_L"], start=2, end=3),
        mk("Shape", ["u"], ["s_e"], start=3, end=4),
        mk("Shape", ["A"], ["s_n"], start=2, end=3),
        *([mk("Cast", ["initial_state"], ["c0"], to=FLOAT)] if stateful else [
            mk("Concat", ["s_b", "s_e", "s_n"], ["c0_shape"], axis=0),
            mk("ConstantOfShape", ["c0_shape"], ["c0"], value=helper.make_tensor("zero", FLOAT, [1], [0.0]))]),
        # L padded up to a multiple of T: nc = ceil(L / T) chunks
        _const_ints("T", [T]), _const_ints("T1", [T - 1]), _const_ints("zero1", [0]),
        _const_ints("zeros6", [0] * 6), _const_ints("chunk_shape", [0, 0, -1, T]),
        mk("Add", ["s_L", "T1"], ["L_up"]),
        mk("Div", ["L_up", "T"], ["nc"]),
        mk("Mul", ["nc", "T"], ["Lp"]),
        mk("Sub", ["Lp", "s_L"], ["n_pad"]),
        mk("Concat", ["zeros6", "n_pad", "zero1"], ["pads"], axis=0),        # (b, M, L, .): pad L at the end
        *(mk("Pad", [x, "pads"], [f"{x}_p"]) for x in ("dt", "kdtu", "B32", "C32")),
        # per step: kv = kappa and pv = 0 on real steps, kv = 0 and pv = 1 on padding
        mk("Constant", [], ["zero_s"], value=helper.make_tensor("zero_s", TensorProto.INT64, [], [0])),
        mk("Constant", [], ["one_s"], value=helper.make_tensor("one_s", TensorProto.INT64, [], [1])),
        mk("Squeeze", ["Lp"], ["Lp_s"]),
        mk("Range", ["zero_s", "Lp_s", "one_s"], ["steps"]),
        mk("Less", ["steps", "s_L"], ["valid_b"]),
        mk("Cast", ["valid_b"], ["valid"], to=FLOAT),
        mk("Mul", ["valid", "kappa"], ["kv_l"]),
        mk("Sub", ["one", "valid"], ["pv_l"]),
        _const_ints("kv_shape", [-1, T, 1, 1]),
        mk("Reshape", ["kv_l", "kv_shape"], ["kv_s"]),                        # (nc, T, 1, 1)
        mk("Reshape", ["pv_l", "kv_shape"], ["pv_s"]),
        # (b, M, Lp, X) -> (b, M, nc, T, X) -> chunk first, each in the layout the body uses
        mk("Concat", ["chunk_shape", "s_e"], ["shape_e"], axis=0),
        mk("Concat", ["chunk_shape", "s_n"], ["shape_n"], axis=0),
        mk("Reshape", ["dt_p", "shape_e"], ["dt_c"]),
        mk("Reshape", ["kdtu_p", "shape_e"], ["kdtu_c"]),
        mk("Reshape", ["B32_p", "shape_n"], ["B_c"]),
        mk("Reshape", ["C32_p", "shape_n"], ["C_c"]),
        mk("Transpose", ["dt_c"], ["dt_s"], perm=[2, 0, 1, 3, 4]),            # (nc, b, M, T, E)
        mk("Transpose", ["kdtu_c"], ["kdtu_s"], perm=[2, 0, 3, 4, 1]),        # (nc, b, T, E, M)
        mk("Transpose", ["B_c"], ["B_s"], perm=[2, 0, 3, 1, 4]),              # (nc, b, T, M, N)
        mk("Transpose", ["C_c"], ["C_s"], perm=[2, 0, 1, 3, 4]),              # (nc, b, M, T, N)
        # Scan over axis 0, the axis every conforming runtime implements
        mk("Scan", ["c0", "dt_s", "kdtu_s", "B_s", "C_s", "kv_s", "pv_s"],
           ["final_state" if stateful else "c_last", "y_s"], num_scan_inputs=6, body=_chunk_body(T, intra)),
        mk("Transpose", ["y_s"], ["y_c"], perm=[1, 2, 0, 3, 4]),              # (b, M, nc, T, E)
        _const_ints("flat_shape", [0, 0, -1]),
        mk("Concat", ["flat_shape", "s_e"], ["shape_l"], axis=0),
        mk("Reshape", ["y_c", "shape_l"], ["y_p"]),                           # (b, M, Lp, E)
        mk("Slice", ["y_p", "zero1", "s_L", "ax2"], ["y_state"]),
        mk("Add", ["y_state", "y_direct"], ["y_scan"]),
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
        doc_string="Coupled Mamba selective scan (cm-deploy docs/design.md) in standard ONNX, "
                   f"{T} time steps per Scan iteration.")


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
