"""Where ONNX Runtime's CUDA provider runs each node of a graph, predicted from the graph alone (no
GPU, no onnxruntime-gpu), and what a session profile says it did.

ONNX Runtime assigns a node that has a CUDA kernel to the CUDA provider, except the nodes its
"CPU-preferred" pass moves to the CPU (onnxruntime/core/framework/fallback_cpu_capability.cc,
GetCpuPreferredNodes): starting from the consumers of tensors that CUDA kernels leave in host memory
(the outputs of Shape and Size), a node goes to the CPU when every one of its inputs is such a host
tensor, a small initializer (<= 100 elements) or a graph input, and none of the host inputs is one
that its CUDA kernel reads on the host anyway (Reshape's shape, Slice's bounds, ...: HOST_INPUTS);
its outputs are then host tensors too, and the pass goes on from their consumers. Afterwards every
edge between host and device memory gets a MemcpyFromHost / MemcpyToHost node, and a session with
`enable_cuda_graph` refuses a graph with any such copy (or with control flow: If, Loop, Scan).
Nodes left on the CPU that feed only host inputs (shape arithmetic) need no copy and are allowed.

predict_cuda_placement(model) replays that pass; profile_placement(json) reads the provider of
every node from an ONNX Runtime profile (SessionOptions.enable_profiling), for the GPU check that
the prediction holds. Assumes every node has a CUDA kernel for its types (a node without one runs
on the CPU as well: the GPU check catches that), and ignores the pass's float16 exception (a node
with a float16 or bfloat16 input stays on the device), which only makes the prediction stricter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Inputs that ONNX Runtime's CUDA kernels read from host memory (InputMemoryType OrtMemTypeCPUInput
# in onnxruntime/core/providers/cuda): op type -> input indices. A host tensor feeding one of these
# needs no copy; a device tensor feeding one needs a MemcpyToHost (and a sync).
HOST_INPUTS = {
    "Reshape": {1}, "Expand": {1}, "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Slice": {1, 2, 3, 4},
    "Squeeze": {1}, "Unsqueeze": {1}, "Tile": {1}, "Pad": {1, 2, 3}, "Split": {1}, "TopK": {1},
    "Resize": {1, 2, 3}, "Upsample": {1}, "OneHot": {1}, "CumSum": {1}, "Clip": {1, 2}, "Trilu": {1},
    "Dropout": {1, 2}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1},
    "ReduceProd": {1}, "ReduceL2": {1}, "ReduceLogSumExp": {1}, "ReduceSumSquare": {1},
}
HOST_OUTPUTS = {"Shape", "Size"}         # CUDA kernels whose output is in host memory
CONTROL_FLOW = {"If", "Loop", "Scan"}
SMALL_INITIALIZER = 100                  # elements (kSmallInitializerThreshold)


@dataclass
class Placement:
    """host_nodes: [{"name", "op_type"}] the CUDA provider leaves on the CPU; copies: [{"tensor",
    "producer", "consumer", "input", "kind"}] host<->device copies ONNX Runtime inserts (kind
    "MemcpyFromHost" or "MemcpyToHost"); control_flow: nodes with subgraphs."""
    nodes: int
    host_nodes: list = field(default_factory=list)
    copies: list = field(default_factory=list)
    control_flow: list = field(default_factory=list)

    @property
    def cuda_graph_ok(self) -> bool:
        """What ONNX Runtime requires of a graph before it captures it in a CUDA graph."""
        return not self.copies and not self.control_flow

    def to_dict(self) -> dict:
        return {"nodes": self.nodes, "host_nodes": self.host_nodes, "copies": self.copies,
                "control_flow": self.control_flow, "cuda_graph_ok": self.cuda_graph_ok}

    def summary(self) -> str:
        ops = sorted({n["op_type"] for n in self.host_nodes})
        return (f"{self.nodes} nodes; on the CPU: {len(self.host_nodes)}{' (' + ', '.join(ops) + ')' if ops else ''}; "
                f"host<->device copies: {len(self.copies)}; CUDA graphs "
                + ("possible" if self.cuda_graph_ok else "refused"))


def _model(model):
    import onnx
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    if model.functions:       # ONNX Runtime inlines model-local functions before partitioning
        import onnx.inliner
        model = onnx.inliner.inline_local_functions(model)
    return model


def predict_cuda_placement(model) -> Placement:
    """The CUDA provider's placement of `model` (an onnx.ModelProto or a path), as ONNX Runtime's
    CPU-preferred pass decides it (module doc)."""
    import numpy as np
    g = _model(model).graph
    small = {t.name for t in g.initializer if int(np.prod(t.dims)) <= SMALL_INITIALIZER}
    constants = {t.name for t in g.initializer}
    for n in g.node:          # Constant nodes become initializers when the session loads the graph
        if n.op_type == "Constant":
            constants.update(n.output)
            value = next((a for a in n.attribute if a.name == "value"), None)
            if value is None or int(np.prod(value.t.dims)) <= SMALL_INITIALIZER:
                small.update(n.output)
    inputs = {i.name for i in g.input}
    nodes = [n for n in g.node if n.op_type != "Constant"]        # topological order (ONNX requires it)
    host, on_cpu = set(), set()
    for n in nodes:
        if n.op_type in HOST_OUTPUTS:
            host.update(n.output)
    # one pass in topological order settles it: a node's inputs are all placed before it
    for i, n in enumerate(nodes):
        if n.op_type in HOST_OUTPUTS or not any(t in host for t in n.input):
            continue
        slots = HOST_INPUTS.get(n.op_type, ())
        if all(not t or t in small or t in inputs or (t in host and k not in slots) for k, t in enumerate(n.input)):
            on_cpu.add(i)
            host.update(n.output)
    producer = {t: n for n in nodes for t in n.output}
    copies = []
    for i, n in enumerate(nodes):
        slots = () if i in on_cpu else HOST_INPUTS.get(n.op_type, ())
        for k, t in enumerate(n.input):
            if not t or t in constants or t in inputs or t not in producer:
                continue          # initializers and graph inputs are placed where they are read
            wants_host = i in on_cpu or k in slots
            if (t in host) != wants_host:
                copies.append({"tensor": t, "producer": producer[t].op_type, "consumer": n.op_type,
                               "consumer_name": n.name, "input": k,
                               "kind": "MemcpyFromHost" if t in host else "MemcpyToHost"})
    return Placement(nodes=len(nodes),
                     host_nodes=[{"name": nodes[i].name, "op_type": nodes[i].op_type} for i in sorted(on_cpu)],
                     copies=copies,
                     control_flow=[n.name or n.op_type for n in nodes if n.op_type in CONTROL_FLOW])


def profile_placement(profile_json) -> dict:
    """{node name: {"op_type", "provider"}} from an ONNX Runtime profile file (the "Node" events of
    SessionOptions.enable_profiling), for the nodes that ran; Memcpy nodes appear under their
    op type MemcpyFromHost / MemcpyToHost."""
    events = json.loads(Path(profile_json).read_text())
    out = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") != "Node" or "provider" not in args:
            continue
        name = e.get("name", "")
        for suffix in ("_kernel_time", "_fence_before", "_fence_after"):
            if name.endswith(suffix):
                name = name[:-len(suffix)]
        out[name] = {"op_type": args.get("op_name"), "provider": args["provider"]}
    return out
