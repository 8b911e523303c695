"""The streaming graph as Triton's sequence batcher with implicit state wants it (needs `onnx`).

Triton keeps a sequence's state between its requests when the model has, for every state, an input
and an output named in `sequence_batching.state`, and reads the sequence controls from model inputs.
model.stream.onnx (docs/streaming.md) already has the state pairs `state.*` -> `next_state.*`; this
adds the rest, around the unchanged graph:

- START, READY (int32, (batch, 1); Triton's CONTROL_SEQUENCE_START / _READY): a row with START = 1
  begins from zero state whatever its state input holds (Triton's first state of a sequence is
  uninitialised memory unless zero-initialised), and a row with READY = 0 passes its state through
  unchanged (an empty batch slot of the direct strategy);
- state.count, (batch,) in the graph, is (batch, 1) outside: Triton states have a fixed shape
  after the batch axis and cannot be reshaped, unlike inputs.
"""
from __future__ import annotations

from ..contract import NEXT_STATE_PREFIX, STATE_PREFIX

START, READY = "START", "READY"


def serving_stream_graph(model):
    """A copy of streaming ONNX `model` (onnx.ModelProto) with the START/READY controls and every
    state of rank 1 seen as (batch, 1); the graph itself is kept whole."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inputs = {vi.name: vi for vi in g.input}
    outputs = {vi.name: vi for vi in g.output}
    states = [n for n in inputs if n.startswith(STATE_PREFIX)]
    if not states:
        raise ValueError("not a streaming graph: no state.* inputs")
    taken = {n for node in g.node for n in [*node.input, *node.output]} | set(inputs) | set(outputs)
    taken |= {init.name for init in g.initializer}

    def fresh(base):
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    new_nodes, consts = [], []

    def const(name, value, dtype):
        n = fresh(name)
        consts.append(helper.make_tensor(n, dtype, [len(value)] if isinstance(value, list) else [],
                                         value if isinstance(value, list) else [value]))
        return n

    # controls: (batch, 1) int32 -> bool flags
    flags = {}
    for ctl in (START, READY):
        if ctl in inputs:
            raise ValueError(f"the graph already has an input named {ctl}")
        g.input.append(helper.make_tensor_value_info(ctl, TensorProto.INT32, ["batch", 1]))
        flags[ctl] = fresh(f"{ctl.lower()}_flag")
        new_nodes.append(helper.make_node("Cast", [ctl], [flags[ctl]], to=TensorProto.BOOL))
    shapes = {}

    def flag_for(ctl, rank):
        """The control flag broadcastable over a state of `rank` axes ((batch, 1, ...))."""
        key = (ctl, rank)
        if key not in shapes:
            out = fresh(f"{ctl.lower()}_flag_r{rank}")
            shape = const(f"{ctl.lower()}_shape_r{rank}", [-1] + [1] * (rank - 1), TensorProto.INT64)
            new_nodes.append(helper.make_node("Reshape", [flags[ctl], shape], [out]))
            shapes[key] = out
        return shapes[key]

    out_nodes = []
    for name in states:
        vi = inputs[name]
        ttype = vi.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in ttype.shape.dim]
        rank, elem = len(dims), ttype.elem_type
        outer = dims if rank > 1 else [dims[0], 1]            # what Triton sees
        inner = fresh(f"{name}.graph")                         # what the graph reads
        for node in g.node:
            node.input[:] = [inner if x == name else x for x in node.input]
        vi.CopyFrom(helper.make_tensor_value_info(name, elem, outer))      # in place: the order stays
        zero = const(f"{name}.zero", 0.0 if elem != TensorProto.INT64 else 0, elem)
        started = fresh(f"{name}.started")
        new_nodes.append(helper.make_node("Where", [flag_for(START, len(outer)), zero, name], [started]))
        if rank == 1:
            flat = const(f"{name}.flat", [-1], TensorProto.INT64)
            new_nodes.append(helper.make_node("Reshape", [started, flat], [inner]))
        else:
            new_nodes.append(helper.make_node("Identity", [started], [inner]))
        # next_state: the graph's, or the (started) input where the row is not ready
        out_name = NEXT_STATE_PREFIX + name[len(STATE_PREFIX):]
        ovi = outputs[out_name]
        computed = fresh(f"{out_name}.graph")
        for node in g.node:
            node.output[:] = [computed if x == out_name else x for x in node.output]
            node.input[:] = [computed if x == out_name else x for x in node.input]
        ovi.CopyFrom(helper.make_tensor_value_info(out_name, elem, outer))
        if rank == 1:
            col = const(f"{out_name}.col", [-1, 1], TensorProto.INT64)
            shaped = fresh(f"{out_name}.col")
            out_nodes.append(helper.make_node("Reshape", [computed, col], [shaped]))
            computed = shaped
        out_nodes.append(helper.make_node("Where", [flag_for(READY, len(outer)), computed, started], [out_name]))
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(new_nodes + nodes + out_nodes)
    g.initializer.extend(consts)
    return m
