"""CoupledScan in standard ONNX: a model-local function (domain cm_deploy) that stock ONNX Runtime
runs with no custom library.

The function body casts every activation to float32 (state math is float32 whatever the I/O dtype,
docs/design.md "Precision"; the scan of a float16/bfloat16 file runs on float32 kernels) and computes
dt = softplus(delta + delta_bias) for the whole sequence. The coupled state is one first-order
linear recurrence per (batch, e, n) (docs/design.md "CoupledScan, the math", rearranged):

    c[t] = a[t] * c[t-1] + b[t]      a[t] = kappa * sum_m exp(dt[m,t] * A[m])
                                     b[t] = kappa * sum_m dt[m,t] * u[m,t] * B[m,t]
    y[m,t] = sum_n C[m,t] * exp(dt[m,t] * A[m]) * c[t-1]  +  (sum_n C[m,t] * B[m,t]) * dt[m,t] * u[m,t]

The second part of y needs no state and is computed for the whole sequence at once. The rest runs
in an ONNX `Scan` over chunks of CHUNK time steps, not one Scan iteration per step: inside a chunk
exp(dt * A), a, b and the y contraction are each one batched op over the chunk's steps, and only
c[t] = a[t] * c[t-1] + b[t] itself is sequential (two elementwise ops per step, unrolled in the
body). L not a multiple of CHUNK is padded with identity steps (a = 1, b = 0: the carried state,
and so final_state, passes through them unchanged) and y is sliced back to L. A sequence shorter
than CHUNK (a streaming push) takes the same body with one step per iteration instead (an If), so
that it does no padded work. batch, L, M, E and N are read from the tensors at run time. Memory is
O(batch * M * CHUNK * E * N) per chunk, never O(L * E * N).

(Solving the chunk in closed form instead, with cumulative log-decays and the (T, T, E, N) decay
matrix of Mamba-2's chunked form, was measured slower on every shape: a decay per (e, n) makes that
matrix T times the chunk's state, where Mamba-2's scalar decay makes it T x T.)
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from ..contract import DOMAIN, INPUT_NAMES, OP_TYPE, OUTPUT_NAMES, STATE_INPUT

FLOAT = TensorProto.FLOAT
# Time steps per Scan iteration, chosen by measurement (benchmarks/bench_portable.py,
# benchmarks/results/cpu/portable_scan.md).
CHUNK = 16


def _ref_attr(name: str, ref: str, attr_type) -> AttributeProto:
    """An attribute of a body node that takes the calling node's attribute `ref`."""
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, attr_type
    return a


def _const_ints(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _chunk_body(T: int, p: str) -> onnx.GraphProto:
    """One Scan iteration: T steps. A_ne, A as (M, N, E), comes from the function body (outer
    scope); every name here starts with `p` because names must be unique across the nested scopes
    (SSA). The state is c (b, N, E): E innermost, so that every broadcast below runs along
    contiguous rows of E. Scan inputs, time before modality so that each product is one batched op:
    dt and kdtu = kappa * dt * u (b, T, M, E), B (b, T, N, M), C (b, T, M, N), and w (T, 1, M), the
    weights of a[t] = sum_m w[t, m] exp(dt[m, t] A[m]): kappa for every modality on a real step,
    (1, 0, ..., 0) on a padding step (whose dt is 0: a = exp(0) = 1 exactly)."""
    mk = helper.make_node
    nodes = [
        _const_ints(f"{p}ax1", [1]), _const_ints(f"{p}ax2", [2]), _const_ints(f"{p}ax3", [3]),
        _const_ints(f"{p}flat", [0, 0, 0, -1]), _const_ints(f"{p}bt", [0, 0]),
        mk("Unsqueeze", [f"{p}dt", f"{p}ax3"], [f"{p}dt_e"]),              # (b, T, M, 1, E)
        mk("Mul", [f"{p}dt_e", "A_ne"], [f"{p}dtA"]),                       # (b, T, M, N, E)
        mk("Exp", [f"{p}dtA"], [f"{p}dA"]),
        # a: one MatMul (T, 1, M) @ (b, T, M, E*N) sums over M and scales at once
        mk("Reshape", [f"{p}dA", f"{p}flat"], [f"{p}dA_f"]),
        mk("MatMul", [f"{p}w", f"{p}dA_f"], [f"{p}a_f"]),                   # (b, T, 1, N*E)
        mk("Shape", [f"{p}dA"], [f"{p}s_en"], start=3),
        mk("Concat", [f"{p}bt", f"{p}s_en"], [f"{p}shape_a"], axis=0),
        mk("Reshape", [f"{p}a_f", f"{p}shape_a"], [f"{p}a"]),              # (b, T, N, E)
        mk("MatMul", [f"{p}B", f"{p}kdtu"], [f"{p}b"]),                     # b: (b, T, N, M) @ (b, T, M, E)
        mk("Unsqueeze", [f"{p}c_in", f"{p}ax1"], [f"{p}c0"]),               # (b, 1, N, E)
    ]
    # c[t] = a[t] * c[t-1] + b[t], step by step; every step's c[t-1] is kept for y
    if T == 1:
        nodes += [mk("Mul", [f"{p}a", f"{p}c0"], [f"{p}ac1"]), mk("Add", [f"{p}ac1", f"{p}b"], [f"{p}c1"]),
                  mk("Identity", [f"{p}c0"], [f"{p}cprev"])]
    else:
        nodes += [_const_ints(f"{p}ones", [1] * T),
                  mk("Split", [f"{p}a", f"{p}ones"], [f"{p}a{t}" for t in range(1, T + 1)], axis=1),
                  mk("Split", [f"{p}b", f"{p}ones"], [f"{p}b{t}" for t in range(1, T + 1)], axis=1)]
        for t in range(1, T + 1):
            nodes += [mk("Mul", [f"{p}a{t}", f"{p}c{t - 1}"], [f"{p}ac{t}"]),
                      mk("Add", [f"{p}ac{t}", f"{p}b{t}"], [f"{p}c{t}"])]
        nodes.append(mk("Concat", [f"{p}c{t}" for t in range(T)], [f"{p}cprev"], axis=1))    # (b, T, N, E)
    nodes += [
        mk("Squeeze", [f"{p}c{T}", f"{p}ax1"], [f"{p}c_out"]),
        # y[m, t] (the state's part) = sum_n C * exp(dt A) * c[t-1]: the product, then a batched MatMul
        mk("Unsqueeze", [f"{p}cprev", f"{p}ax2"], [f"{p}cprev_m"]),        # (b, T, 1, N, E)
        mk("Mul", [f"{p}dA", f"{p}cprev_m"], [f"{p}P"]),                    # (b, T, M, N, E)
        mk("Unsqueeze", [f"{p}C", f"{p}ax3"], [f"{p}C_v"]),                 # (b, T, M, 1, N)
        mk("MatMul", [f"{p}C_v", f"{p}P"], [f"{p}y_v"]),                    # (b, T, M, 1, E)
        mk("Squeeze", [f"{p}y_v", f"{p}ax3"], [f"{p}y"]),
    ]
    vi = helper.make_tensor_value_info
    inputs = [vi(f"{p}c_in", FLOAT, [None] * 3), *(vi(f"{p}{x}", FLOAT, [None] * 4) for x in ("dt", "kdtu", "B", "C")),
              vi(f"{p}w", FLOAT, [T, 1, None])]
    outputs = [vi(f"{p}c_out", FLOAT, [None] * 3), vi(f"{p}y", FLOAT, [None] * 4)]
    return helper.make_graph(nodes, f"CoupledScan_{T}_steps", inputs, outputs)


def _stepwise_body(T: int, p: str) -> onnx.GraphProto:
    """One Scan iteration of T steps, each step on its own (its tensors stay cache-sized):
    P = exp(dt A) * c[t-1] (b, M, N, E); c[t] = w[t] @ P + b[t]; y[t] = C[t] @ P. Scan inputs:
    dt (b, M, T, E), kdtu (b, T, M, E), B (b, T, N, M), C (b, M, T, N), w (T, 1, M)."""
    mk = helper.make_node
    ones = _const_ints(f"{p}ones", [1] * T)
    st = range(1, T + 1)
    nodes = [
        _const_ints(f"{p}ax1", [1]), ones, _const_ints(f"{p}flat", [0, 0, -1]),
        mk("Shape", [f"{p}c_in"], [f"{p}s_ne"], start=1), _const_ints(f"{p}keep01", [0, 1]),
        mk("Concat", [f"{p}keep01", f"{p}s_ne"], [f"{p}shape_c"], axis=0),
        mk("Unsqueeze", [f"{p}c_in", f"{p}ax1"], [f"{p}c0"]),                # (b, 1, N, E)
        mk("MatMul", [f"{p}B", f"{p}kdtu"], [f"{p}b"]),                      # (b, T, N, E)
        mk("Split", [f"{p}b", f"{p}ones"], [f"{p}b{t}" for t in st], axis=1),
        mk("Split", [f"{p}dt", f"{p}ones"], [f"{p}dt{t}" for t in st], axis=2),  # (b, M, 1, E)
        mk("Split", [f"{p}C", f"{p}ones"], [f"{p}C{t}" for t in st], axis=2),    # (b, M, 1, N)
        mk("Split", [f"{p}w", f"{p}ones"], [f"{p}w{t}" for t in st], axis=0),    # (1, 1, M)
    ] if T > 1 else [
        _const_ints(f"{p}ax1", [1]), _const_ints(f"{p}flat", [0, 0, -1]),
        mk("Shape", [f"{p}c_in"], [f"{p}s_ne"], start=1), _const_ints(f"{p}keep01", [0, 1]),
        mk("Concat", [f"{p}keep01", f"{p}s_ne"], [f"{p}shape_c"], axis=0),
        mk("Unsqueeze", [f"{p}c_in", f"{p}ax1"], [f"{p}c0"]),
        mk("MatMul", [f"{p}B", f"{p}kdtu"], [f"{p}b1_"]),
        *(mk("Identity", [f"{p}{x}"], [f"{p}{x}1"]) for x in ("dt", "C", "w")),
    ]
    if T == 1:
        nodes.append(mk("Identity", [f"{p}b1_"], [f"{p}b1v"]))
    for t in st:
        bt = f"{p}b1v" if T == 1 else f"{p}b{t}"
        nodes += [
            mk("Mul", [f"{p}dt{t}", "A_ne"], [f"{p}dtA{t}"]),                # (b, M, N, E)
            mk("Exp", [f"{p}dtA{t}"], [f"{p}dA{t}"]),
            mk("Mul", [f"{p}dA{t}", f"{p}c{t - 1}"], [f"{p}P{t}"]),
            mk("Reshape", [f"{p}P{t}", f"{p}flat"], [f"{p}Pf{t}"]),          # (b, M, N*E)
            mk("MatMul", [f"{p}w{t}", f"{p}Pf{t}"], [f"{p}ac{t}"]),          # (b, 1, N*E)
            mk("Reshape", [f"{p}ac{t}", f"{p}shape_c"], [f"{p}acr{t}"]),
            mk("Add", [f"{p}acr{t}", bt], [f"{p}c{t}"]),
            mk("MatMul", [f"{p}C{t}", f"{p}P{t}"], [f"{p}y{t}"]),            # (b, M, 1, E)
        ]
    nodes += [mk("Squeeze", [f"{p}c{T}", f"{p}ax1"], [f"{p}c_out"]),
              mk("Concat", [f"{p}y{t}" for t in st], [f"{p}y"], axis=2) if T > 1 else
              mk("Identity", [f"{p}y1"], [f"{p}y"])]
    vi = helper.make_tensor_value_info
    inputs = [vi(f"{p}c_in", FLOAT, [None] * 3), *(vi(f"{p}{x}", FLOAT, [None] * 4) for x in ("dt", "kdtu", "B", "C")),
              vi(f"{p}w", FLOAT, [T, 1, None])]
    outputs = [vi(f"{p}c_out", FLOAT, [None] * 3), vi(f"{p}y", FLOAT, [None] * 4)]
    return helper.make_graph(nodes, f"CoupledScan_{T}_steps", inputs, outputs)


def _chunked_scan(T: int, p: str, stepwise: bool = False) -> onnx.GraphProto:
    """The Scan over chunks of T steps as a graph of its own (an If branch): from dt, kdtu, B32,
    C32 (b, M, L, .), c0 (b, N, E) and the weights of the function body to (c at L as (b, N, E),
    the state's part of y)."""
    mk = helper.make_node
    nodes = []
    if T > 1:
        # L padded up to a multiple of T (dt = 0, kappa * dt * u = 0, B = C = 0)
        nodes += [
            _const_ints(f"{p}T", [T]), _const_ints(f"{p}T1", [T - 1]), _const_ints(f"{p}zeros6", [0] * 6),
            mk("Add", ["s_L", f"{p}T1"], [f"{p}L_up"]),
            mk("Div", [f"{p}L_up", f"{p}T"], [f"{p}nc"]),
            mk("Mul", [f"{p}nc", f"{p}T"], [f"{p}Lp"]),
            mk("Sub", [f"{p}Lp", "s_L"], [f"{p}n_pad"]),
            mk("Concat", [f"{p}zeros6", f"{p}n_pad", "zero1"], [f"{p}pads"], axis=0),   # pad axis 2 at the end
            *(mk("Pad", [x, f"{p}pads"], [f"{p}{x}_p"]) for x in ("dt", "kdtu", "B32", "C32")),
            mk("Squeeze", [f"{p}Lp"], [f"{p}Lp_s"]),
            mk("Range", ["zero_s", f"{p}Lp_s", "one_s"], [f"{p}steps"]),
            mk("Less", [f"{p}steps", "s_L"], [f"{p}valid_b"]),
            mk("Cast", [f"{p}valid_b"], [f"{p}valid"], to=FLOAT),
            mk("Sub", ["one", f"{p}valid"], [f"{p}pad_f"]),
            _const_ints(f"{p}step_shape", [-1, 1, 1]),
            mk("Reshape", [f"{p}valid", f"{p}step_shape"], [f"{p}valid3"]),   # (Lp, 1, 1)
            mk("Reshape", [f"{p}pad_f", f"{p}step_shape"], [f"{p}pad3"]),
            mk("Mul", [f"{p}valid3", "kappa_m"], [f"{p}w_real"]),
            mk("Mul", [f"{p}pad3", "first_m"], [f"{p}w_pad"]),
            mk("Add", [f"{p}w_real", f"{p}w_pad"], [f"{p}w_l"]),              # (Lp, 1, M)
        ]
        padded = {x: f"{p}{x}_p" for x in ("dt", "kdtu", "B32", "C32")}
    else:   # one step per iteration: no padding, every step real
        nodes += [_const_ints(f"{p}one_l", [1, 1]), mk("Concat", ["s_L", f"{p}one_l"], [f"{p}shape_l1"], axis=0),
                  mk("Expand", ["kappa_m", f"{p}shape_l1"], [f"{p}w_l"])]    # (L, 1, M)
        padded = {x: x for x in ("dt", "kdtu", "B32", "C32")}
    nodes += [
        _const_ints(f"{p}w_head", [-1, T, 1]),
        mk("Concat", [f"{p}w_head", "s_m"], [f"{p}w_shape"], axis=0),
        mk("Reshape", [f"{p}w_l", f"{p}w_shape"], [f"{p}w_s"]),               # (nc, T, 1, M)
        # (b, M, Lp, .) -> (b, M, nc, T, .) -> chunk first, each in the layout the body uses
        _const_ints(f"{p}chunk_shape", [0, 0, -1, T]),
        mk("Concat", [f"{p}chunk_shape", "s_e"], [f"{p}shape_e"], axis=0),
        mk("Concat", [f"{p}chunk_shape", "s_n"], [f"{p}shape_n"], axis=0),
        mk("Reshape", [padded["dt"], f"{p}shape_e"], [f"{p}dt_c"]),
        mk("Reshape", [padded["kdtu"], f"{p}shape_e"], [f"{p}kdtu_c"]),
        mk("Reshape", [padded["B32"], f"{p}shape_n"], [f"{p}B_c"]),
        mk("Reshape", [padded["C32"], f"{p}shape_n"], [f"{p}C_c"]),
        mk("Transpose", [f"{p}dt_c"], [f"{p}dt_s"], perm=[2, 0, 1, 3, 4] if stepwise else [2, 0, 3, 1, 4]),
        mk("Transpose", [f"{p}kdtu_c"], [f"{p}kdtu_s"], perm=[2, 0, 3, 1, 4]),  # (nc, b, T, M, E)
        mk("Transpose", [f"{p}B_c"], [f"{p}B_s"], perm=[2, 0, 3, 4, 1]),        # (nc, b, T, N, M)
        mk("Transpose", [f"{p}C_c"], [f"{p}C_s"], perm=[2, 0, 1, 3, 4] if stepwise else [2, 0, 3, 1, 4]),
        # Scan over axis 0, the axis every conforming runtime implements
        mk("Scan", ["c0", f"{p}dt_s", f"{p}kdtu_s", f"{p}B_s", f"{p}C_s", f"{p}w_s"],
           [f"{p}c_last", f"{p}y_s"], num_scan_inputs=5,
           body=(_stepwise_body if stepwise else _chunk_body)(T, f"{p}b_")),
        mk("Transpose", [f"{p}y_s"], [f"{p}y_c"], perm=[1, 2, 0, 3, 4] if stepwise else [1, 3, 0, 2, 4]),
        _const_ints(f"{p}flat_shape", [0, 0, -1]),
        mk("Concat", [f"{p}flat_shape", "s_e"], [f"{p}shape_l"], axis=0),
        mk("Reshape", [f"{p}y_c", f"{p}shape_l"], [f"{p}y_p"]),                 # (b, M, Lp, E)
        mk("Slice", [f"{p}y_p", "zero1", "s_L", "ax2"], [f"{p}y_state"]),
    ]
    vi = helper.make_tensor_value_info
    return helper.make_graph(nodes, f"CoupledScan_chunks_of_{T}", [],
                             [vi(f"{p}c_last", FLOAT, [None] * 3), vi(f"{p}y_state", FLOAT, [None] * 4)])


def coupled_scan_function(opset: int, stateful: bool = False, chunk: int = CHUNK, stepwise: bool = False
                          ) -> onnx.FunctionProto:
    """FunctionProto cm_deploy.CoupledScan(u, delta, A, B, C, D, z, delta_bias) -> y with the
    attributes delta_softplus (int), coupling_scale (float) and has_final_state (int); body in ONNX
    opset `opset`. stateful: the streaming form, (..., delta_bias, initial_state) -> (y, final_state).
    chunk: time steps per Scan iteration (1: one step per iteration, no If)."""
    mk = helper.make_node
    T = int(chunk)
    if T < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if T == 1:
        scan = [*_chunked_scan(1, "c1_", stepwise).node, mk("Identity", ["c1_c_last"], ["c_ne"]),
                mk("Identity", ["c1_y_state"], ["y_state"])]
    else:
        # a sequence shorter than T runs one step per iteration (no padded steps), a longer one in chunks
        scan = [_const_ints("T_max", [T]),
                mk("Less", ["s_L", "T_max"], ["short"]),
                mk("If", ["short"], ["c_ne", "y_state"], then_branch=_chunked_scan(1, "c1_", stepwise),
                   else_branch=_chunked_scan(T, f"c{T}_", stepwise))]
    if stateful:
        scan.append(mk("Transpose", ["c_ne"], ["final_state"], perm=[0, 2, 1]))
    nodes = [
        *(mk("Cast", [x], [f"{x}32"], to=FLOAT) for x in ("u", "delta", "A", "B", "C", "D", "z")),
        mk("Cast", ["delta_bias"], ["bias32"], to=FLOAT),
        _const_ints("ax1", [1]), _const_ints("ax2", [2]), _const_ints("ax_last", [-1]), _const_ints("zero1", [0]),
        mk("Constant", [], ["zero_s"], value=helper.make_tensor("zero_s", TensorProto.INT64, [], [0])),
        mk("Constant", [], ["one_s"], value=helper.make_tensor("one_s", TensorProto.INT64, [], [1])),
        mk("Constant", [], ["one"], value=helper.make_tensor("one", FLOAT, [], [1.0])),
        # dt = delta + bias (bias (M, E) -> (M, 1, E) broadcasts over (b, M, L, E))
        mk("Unsqueeze", ["bias32", "ax1"], ["bias_b"]),
        mk("Add", ["delta32", "bias_b"], ["dt_raw"]),
        # softplus without overflow: max(x, 0) + log(1 + exp(-|x|))
        mk("Abs", ["dt_raw"], ["dt_abs"]),
        mk("Neg", ["dt_abs"], ["dt_nabs"]),
        mk("Exp", ["dt_nabs"], ["dt_e"]),
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
        mk("ReduceSum", ["CB", "ax_last"], ["CB_sum"], keepdims=1),            # (b, M, L, 1)
        mk("Mul", ["CB_sum", "dtu"], ["y_direct"]),
        # the sizes, read at run time
        mk("Shape", ["u"], ["s_b"], start=0, end=1),
        mk("Shape", ["u"], ["s_L"], start=2, end=3),
        mk("Shape", ["u"], ["s_e"], start=3, end=4),
        mk("Shape", ["A"], ["s_m"], start=0, end=1),
        mk("Shape", ["A"], ["s_n"], start=2, end=3),
        # the weights of a[t] over the modalities: (kappa, ..., kappa) and, for padding, (1, 0, ..., 0)
        mk("ConstantOfShape", ["s_m"], ["ones_m"], value=helper.make_tensor("one1", FLOAT, [1], [1.0])),
        mk("Mul", ["ones_m", "kappa"], ["kappa_m"]),
        mk("Squeeze", ["s_m"], ["M_s"]),
        mk("Range", ["zero_s", "M_s", "one_s"], ["m_idx"]),
        mk("Equal", ["m_idx", "zero_s"], ["first_b"]),
        mk("Cast", ["first_b"], ["first_m"], to=FLOAT),
        # inside the scan the state is (batch, N, E): c[0] is the initial state (streaming), else zeros
        mk("Transpose", ["A32"], ["A_ne"], perm=[0, 2, 1]),                   # (M, N, E)
        *([mk("Cast", ["initial_state"], ["c0_en"], to=FLOAT),
           mk("Transpose", ["c0_en"], ["c0"], perm=[0, 2, 1])] if stateful else [
            mk("Concat", ["s_b", "s_n", "s_e"], ["c0_shape"], axis=0),
            mk("ConstantOfShape", ["c0_shape"], ["c0"], value=helper.make_tensor("zero", FLOAT, [1], [0.0]))]),
        *scan,
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
        doc_string=f"Coupled Mamba selective scan (cm-deploy docs/design.md) in standard ONNX, {T} time steps "
                   "per Scan iteration.")


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
