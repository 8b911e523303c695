"""CoupledScan in standard ONNX: a model-local function (domain cm_deploy) that stock ONNX Runtime
runs with no custom library.

The function body casts every activation to float32 (state math is float32 whatever the I/O dtype,
docs/design.md "Precision"; the scan of a float16/bfloat16 file runs on float32 kernels) and computes
dt = softplus(delta + delta_bias) for the whole sequence. docs/design.md "CoupledScan, the math",
rearranged: per (batch, e, n) the coupled state is one first-order linear recurrence,

    P[m,t] = exp(dt[m,t] * A[m]) * c[t-1]
    c[t]   = kappa * sum_m P[m,t] + b[t]            b[t] = kappa * sum_m dt[m,t] * u[m,t] * B[m,t]
    y[m,t] = sum_n C[m,t] * P[m,t]  +  (sum_n C[m,t] * B[m,t]) * dt[m,t] * u[m,t]

The second part of y needs no state and is computed for the whole sequence at once, as is
kappa * dt * u. The rest runs in an ONNX `Scan` over chunks of CHUNK time steps instead of one Scan
iteration per step: the body holds the chunk's steps unrolled, each an exp, two products, a sum over
modalities and a MatMul over states on tensors of one step (which a CPU keeps in cache), plus b for
the whole chunk in one MatMul. The L % CHUNK steps left over run one per iteration in a second Scan,
and so does a sequence shorter than CHUNK (a streaming push): no step is padded or computed for
nothing, and final_state is c[L] itself. batch, L, M, E and N are read from the tensors at run time.
Memory is O(batch * M * E * N) per step and O(batch * CHUNK * E * N) per chunk, never O(L * E * N).

Measured against, on ONNX Runtime's CPU provider (benchmarks/bench_portable.py,
benchmarks/results/cpu/portable_scan.md): one Scan iteration per step (the function before: 1.1-3x
slower); chunks whose steps are batched ops over the whole chunk with only c[t] = a[t] c[t-1] + b[t]
stepwise (1.8x faster at batch 1, 1.4x slower at batch 8, where its chunk-sized tensors leave the
cache; and 3x the state's memory traffic, which bounds a GPU at large batch); and the chunk in closed
form with cumulative log-decays and a (T, T, E, N) decay matrix as in Mamba-2's chunked scan (slower
on every shape: a decay per (e, n) makes that matrix T times the chunk's state, where Mamba-2's
scalar decay keeps it T x T).
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from ..contract import DOMAIN, INPUT_NAMES, OP_TYPE, OUTPUT_NAMES, STATE_INPUT

FLOAT = TensorProto.FLOAT
# Time steps per Scan iteration, chosen by measurement (benchmarks/results/cpu/portable_scan.md):
# on the CPU 4 and 8 are best; 8 halves the Scan iterations of 4 for a GPU.
CHUNK = 8


def _ref_attr(name: str, ref: str, attr_type) -> AttributeProto:
    """An attribute of a body node that takes the calling node's attribute `ref`."""
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = name, ref, attr_type
    return a


def _const_ints(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _chunk_body(T: int, p: str) -> onnx.GraphProto:
    """One Scan iteration: T time steps, unrolled. A_ne (A as (M, N, E)) and kappa come from the
    function body (outer scope); every name here starts with `p` because names must be unique
    across the nested scopes (SSA). The state is c (b, 1, N, E), E innermost so that the broadcasts
    run along contiguous rows. Scan inputs: dt (b, M, T, E), kdtu = kappa * dt * u (b, T, M, E),
    B (b, T, N, M), C (b, M, T, N). Per step, on tensors of one step:
        P    = exp(dt[t] * A) * c[t-1]              (b, M, N, E)
        c[t] = kappa * sum_m P + b[t]                b = B @ kdtu for the whole chunk (one MatMul)
        y[t] = C[t] @ P                              (b, M, 1, E): the state's part of y
    The sum over modalities that feeds the state is a ReduceSum, not a MatMul, so that it is exact
    float32 where a provider runs float32 MatMuls in TF32: the state carries it from step to step."""
    mk = helper.make_node
    steps = range(1, T + 1)
    nodes = [
        _const_ints(f"{p}ax1", [1]), _const_ints(f"{p}ones", [1] * T),
        mk("Unsqueeze", [f"{p}c_in", f"{p}ax1"], [f"{p}c0"]),
        mk("MatMul", [f"{p}B", f"{p}kdtu"], [f"{p}b"]),                      # (b, T, N, E)
        mk("Split", [f"{p}b", f"{p}ones"], [f"{p}b{t}" for t in steps], axis=1),     # (b, 1, N, E)
        mk("Split", [f"{p}dt", f"{p}ones"], [f"{p}dt{t}" for t in steps], axis=2),   # (b, M, 1, E)
        mk("Split", [f"{p}C", f"{p}ones"], [f"{p}C{t}" for t in steps], axis=2),     # (b, M, 1, N)
    ]
    for t in steps:
        nodes += [
            mk("Mul", [f"{p}dt{t}", "A_ne"], [f"{p}dtA{t}"]),                # (b, M, N, E)
            mk("Exp", [f"{p}dtA{t}"], [f"{p}dA{t}"]),
            mk("Mul", [f"{p}dA{t}", f"{p}c{t - 1}"], [f"{p}P{t}"]),
            mk("ReduceSum", [f"{p}P{t}", f"{p}ax1"], [f"{p}sP{t}"], keepdims=1),   # (b, 1, N, E)
            mk("Mul", [f"{p}sP{t}", "kappa"], [f"{p}kP{t}"]),
            mk("Add", [f"{p}kP{t}", f"{p}b{t}"], [f"{p}c{t}"]),
            mk("MatMul", [f"{p}C{t}", f"{p}P{t}"], [f"{p}y{t}"]),            # (b, M, 1, E)
        ]
    nodes += [mk("Squeeze", [f"{p}c{T}", f"{p}ax1"], [f"{p}c_out"]),
              mk("Concat", [f"{p}y{t}" for t in steps], [f"{p}y"], axis=2)]  # (b, M, T, E)
    vi = helper.make_tensor_value_info
    inputs = [vi(f"{p}c_in", FLOAT, [None] * 3), *(vi(f"{p}{x}", FLOAT, [None] * 4) for x in ("dt", "kdtu", "B", "C"))]
    outputs = [vi(f"{p}c_out", FLOAT, [None] * 3), vi(f"{p}y", FLOAT, [None] * 4)]
    return helper.make_graph(nodes, f"CoupledScan_{T}_steps", inputs, outputs)


def _scan_steps(T: int, p: str, c_in: str, lo: str, hi: str) -> list:
    """Nodes that run steps [lo, hi) (int64 (1,) tensors; hi - lo a multiple of T, at least T) from
    state c_in (b, N, E) as a Scan over chunks of T steps: outputs {p}c_out (b, N, E) and {p}y
    (b, M, hi - lo, E), the state's part of y. Reads dt, kdtu, B32, C32 (b, M, L, .) of the body."""
    mk = helper.make_node
    return [
        # (b, M, L, .) -> steps [lo, hi) -> (b, M, nc, T, .) -> chunk first, in the layouts the body uses
        _const_ints(f"{p}chunk_shape", [0, 0, -1, T]),
        mk("Concat", [f"{p}chunk_shape", "s_e"], [f"{p}shape_e"], axis=0),
        mk("Concat", [f"{p}chunk_shape", "s_n"], [f"{p}shape_n"], axis=0),
        *(node for x in ("dt", "kdtu", "B32", "C32") for node in (
            mk("Slice", [x, lo, hi, "ax2"], [f"{p}{x}_l"]),
            mk("Reshape", [f"{p}{x}_l", f"{p}shape_{'n' if x in ('B32', 'C32') else 'e'}"], [f"{p}{x}_c"]))),
        mk("Transpose", [f"{p}dt_c"], [f"{p}dt_s"], perm=[2, 0, 1, 3, 4]),        # (nc, b, M, T, E)
        mk("Transpose", [f"{p}kdtu_c"], [f"{p}kdtu_s"], perm=[2, 0, 3, 1, 4]),    # (nc, b, T, M, E)
        mk("Transpose", [f"{p}B32_c"], [f"{p}B_s"], perm=[2, 0, 3, 4, 1]),        # (nc, b, T, N, M)
        mk("Transpose", [f"{p}C32_c"], [f"{p}C_s"], perm=[2, 0, 1, 3, 4]),        # (nc, b, M, T, N)
        # Scan over axis 0, the axis every conforming runtime implements
        mk("Scan", [c_in, f"{p}dt_s", f"{p}kdtu_s", f"{p}B_s", f"{p}C_s"], [f"{p}c_out", f"{p}y_s"],
           num_scan_inputs=4, body=_chunk_body(T, f"{p}b_")),
        mk("Transpose", [f"{p}y_s"], [f"{p}y_c"], perm=[1, 2, 0, 3, 4]),          # (b, M, nc, T, E)
        _const_ints(f"{p}flat_shape", [0, 0, -1]),
        mk("Concat", [f"{p}flat_shape", "s_e"], [f"{p}shape_l"], axis=0),
        mk("Reshape", [f"{p}y_c", f"{p}shape_l"], [f"{p}y"]),
    ]


def _branch(name: str, nodes: list, outs: tuple) -> onnx.GraphProto:
    vi = helper.make_tensor_value_info
    return helper.make_graph(nodes, name, [], [vi(o, FLOAT, [None] * r) for o, r in zip(outs, (3, 4))])


def _scan_all(T: int) -> list:
    """Nodes from c0 (b, N, E) to c_ne (c at L, (b, N, E)) and y_state (b, M, L, E): the first
    L - L % T steps in chunks of T, the last L % T one per Scan iteration (an If: a Scan of no
    iterations is not allowed). No padding, so no step is computed for nothing, and final_state is
    c[L] itself. A sequence shorter than T (a streaming push) runs one step per iteration."""
    mk = helper.make_node
    if T == 1:
        return [*_scan_steps(1, "s_", "c0", "zero1", "s_L"), mk("Identity", ["s_c_out"], ["c_ne"]),
                mk("Identity", ["s_y"], ["y_state"])]
    rest = _branch("CoupledScan_last_steps", [
        *_scan_steps(1, "r_", "m_c_out", "L_main", "s_L"),
        mk("Identity", ["r_c_out"], ["r_c"]),
        mk("Concat", ["m_y", "r_y"], ["r_y_all"], axis=2)], ("r_c", "r_y_all"))
    none_left = _branch("CoupledScan_no_steps_left", [
        mk("Identity", ["m_c_out"], ["n_c"]), mk("Identity", ["m_y"], ["n_y"])], ("n_c", "n_y"))
    chunks = _branch("CoupledScan_chunks", [
        *_scan_steps(T, "m_", "c0", "zero1", "L_main"),
        mk("Greater", ["s_L", "L_main"], ["steps_left"]),
        mk("If", ["steps_left"], ["k_c", "k_y"], then_branch=rest, else_branch=none_left)], ("k_c", "k_y"))
    short = _branch("CoupledScan_steps", [
        *_scan_steps(1, "s_", "c0", "zero1", "s_L"),
        mk("Identity", ["s_c_out"], ["sh_c"]), mk("Identity", ["s_y"], ["sh_y"])], ("sh_c", "sh_y"))
    return [
        _const_ints("T", [T]),
        mk("Div", ["s_L", "T"], ["n_chunks"]),
        mk("Mul", ["n_chunks", "T"], ["L_main"]),                               # steps in whole chunks
        mk("Less", ["s_L", "T"], ["is_short"]),
        mk("If", ["is_short"], ["c_ne", "y_state"], then_branch=short, else_branch=chunks),
    ]


def coupled_scan_function(opset: int, stateful: bool = False, chunk: int = CHUNK) -> onnx.FunctionProto:
    """FunctionProto cm_deploy.CoupledScan(u, delta, A, B, C, D, z, delta_bias) -> y with the
    attributes delta_softplus (int), coupling_scale (float) and has_final_state (int); body in ONNX
    opset `opset`. stateful: the streaming form, (..., delta_bias, initial_state) -> (y, final_state).
    chunk: time steps per Scan iteration."""
    mk = helper.make_node
    T = int(chunk)
    if T < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    nodes = [
        *(mk("Cast", [x], [f"{x}32"], to=FLOAT) for x in ("u", "delta", "A", "B", "C", "D", "z")),
        mk("Cast", ["delta_bias"], ["bias32"], to=FLOAT),
        _const_ints("ax1", [1]), _const_ints("ax2", [2]), _const_ints("ax_last", [-1]), _const_ints("zero1", [0]),
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
        mk("Shape", ["A"], ["s_n"], start=2, end=3),
        # inside the scan the state is (batch, N, E): c[0] is the initial state (streaming), else zeros
        mk("Transpose", ["A32"], ["A_ne"], perm=[0, 2, 1]),                   # (M, N, E)
        *([mk("Cast", ["initial_state"], ["c0_en"], to=FLOAT),
           mk("Transpose", ["c0_en"], ["c0"], perm=[0, 2, 1])] if stateful else [
            mk("Concat", ["s_b", "s_n", "s_e"], ["c0_shape"], axis=0),
            mk("ConstantOfShape", ["c0_shape"], ["c0"], value=helper.make_tensor("zero", FLOAT, [1], [0.0]))]),
        *_scan_all(T),
        *([mk("Transpose", ["c_ne"], ["final_state"], perm=[0, 2, 1])] if stateful else []),
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
