"""PyTorch backend: a cm-deploy checkpoint run by CoupledMamba. torch is imported here only, so the
rest of the runtime stays torch-free.

It is the parity reference (device "cpu", dtype float32, scan_impl "reference") and, on a GPU, a
backend of its own: CUDA arrays from any producer (__cuda_array_interface__: torch, CuPy, Numba,
cm-deploy DeviceArray) are wrapped with torch.as_tensor on the device without a copy, outputs can stay
on the device (device_outputs=True returns torch tensors), and cuda_graph=True replays one CUDA graph
per input shape (torch.cuda.CUDAGraph; inputs are copied into the graph's static buffers, one
device-to-device copy, because a graph's addresses are fixed). chunk=T runs the layers over time
chunks of T steps with the state carried (CoupledMamba.forward(chunk=)): the same outputs with
activation memory bounded by T instead of L. streaming=True runs the checkpoint's streaming step
(CoupledMamba.step) with the inputs and outputs of the exported streaming graphs (chunks, lengths,
state.* in; output, next_state.* out): the reference for parity of model.stream*.onnx.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .backend import Backend
from ..contract import (BATCH_DIM, CHUNK_DIM, LENGTHS_SUFFIX, NEXT_STATE_PREFIX, OUTPUT_NAME, PRECISIONS,
                        STATE_PREFIX, length_dim, normalize_precision)
from .specs import TensorSpec, np_dtype


def _import_torch():
    try:
        import torch
    except ImportError:
        raise UserError("checkpoints run on PyTorch, which is not installed here "
                        "(pip install 'cm-deploy[model]'); use an ONNX file or an engine") from None
    return torch


class TorchBackend(Backend):
    kind = "torch"

    def __init__(self, path, device=None, dtype="float32", scan_impl="auto", cuda_graph=False,
                 graph_max_batch: int = 64, chunk: int | None = None, streaming: bool = False):
        torch = _import_torch()
        from ..foreign import load_model_file
        self._torch = torch
        self.path = Path(path)
        self.precision = normalize_precision(dtype) or "float32"
        if self.precision not in PRECISIONS:
            raise UserError(f"unsupported dtype {dtype!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device}: torch sees no CUDA device here")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise UserError(f"chunk must be a positive number of steps, not {chunk!r}")
        self.chunk = chunk
        self.model = load_model_file(self.path, map_location=self.device)   # ours, or a known foreign state_dict
        if scan_impl not in ("auto", "reference", "triton"):
            raise UserError(f"scan_impl must be auto, reference or triton, not {scan_impl!r}")
        self.model.set_scan_impl(scan_impl)
        self.scan_impl = scan_impl
        self._tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.precision]
        self.model.to_precision(self.precision)      # the policy export uses: A, D, dt bias stay float32
        self.model.fold_for_inference()              # as export does: projections folded once
        cfg = self.model.config
        self.config = cfg.to_dict()
        self._names = None
        self.streaming = False
        self._states = {}
        if hasattr(self.model, "tensor_specs"):      # a foreign architecture describes its own inputs
            if chunk is not None or streaming:
                raise UserError(f"{'chunk' if chunk is not None else 'the streaming step'} applies to cm-deploy "
                                f"checkpoints, not to {self.path.name}")
            self.inputs, self.outputs = ([TensorSpec(*t) for t in ts] for ts in self.model.tensor_specs(self.precision))
        else:
            self.inputs = [TensorSpec(n, (BATCH_DIM, length_dim(n), f), self.precision) for n, f in cfg.modalities.items()]
            # per-sample valid lengths, as the exported graphs take them (contract.input_names)
            self.inputs += [TensorSpec(n + LENGTHS_SUFFIX, (BATCH_DIM,), "int64") for n in cfg.modalities]
            self._names = list(cfg.modalities)
            self.outputs = [TensorSpec(OUTPUT_NAME, (BATCH_DIM, cfg.num_outputs), self.precision)]
            self.streaming = bool(streaming)
            if self.streaming:
                if chunk is not None:
                    raise UserError("chunk does not apply to the streaming step (its chunks are the inputs)")
                self._states = {k: (shape, str(dt).replace("torch.", "")) for k, (shape, dt) in self.model.state_specs().items()}
                self.inputs = [TensorSpec(n, (BATCH_DIM, CHUNK_DIM, f), self.precision) for n, f in cfg.modalities.items()]
                self.inputs += [TensorSpec(n + LENGTHS_SUFFIX, (BATCH_DIM,), "int64") for n in cfg.modalities]
                self.inputs += [TensorSpec(STATE_PREFIX + k, (BATCH_DIM, *shape), dt) for k, (shape, dt) in self._states.items()]
                self.outputs += [TensorSpec(NEXT_STATE_PREFIX + k, (BATCH_DIM, *shape), dt)
                                 for k, (shape, dt) in self._states.items()]
        self.cuda_graph = bool(cuda_graph) and self.device.type == "cuda"
        self.graph_max_batch = graph_max_batch
        self._graphs = {}
        self.graph_stats = {"captures": 0, "replays": 0}
        self.last_input_pointers: dict[str, int] = {}
        self.name = (f"torch[{self.device},{self.precision},{scan_impl}{f',chunk {chunk}' if chunk else ''}"
                     f"{',step' if self.streaming else ''}]:"
                     f"{self.path.name}")

    # -- conversion
    def _to_tensor(self, spec: TensorSpec, value, info):
        torch = self._torch
        if isinstance(value, torch.Tensor):
            t = value
        elif info.on_device:
            if info.dtype != spec.dtype:          # a bfloat16 bit view (int16/uint16/V2)
                t = torch.as_tensor(_ViewAsInt16(value), device=self.device).view(torch.bfloat16)
            else:
                t = torch.as_tensor(value, device=self.device)    # zero copy on the same device
            if info.stream is not None and self.device.type == "cuda":
                # __cuda_array_interface__ v3: order our stream after the producer's
                ext = torch.cuda.ExternalStream(info.stream) if info.stream not in (1, 2) else None
                if ext is not None:
                    torch.cuda.current_stream(self.device).wait_stream(ext)
                else:
                    torch.cuda.synchronize(self.device)
        else:
            arr = np.ascontiguousarray(value)
            if spec.dtype == "bfloat16":
                t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(arr)
        if t.device != self.device:
            t = t.to(self.device)
        want = getattr(self._torch, spec.dtype)
        if t.dtype != want and t.is_floating_point():
            raise UserError(f"{self.name}: input {spec.name!r} has dtype {t.dtype}, expected {want}")
        return t

    def _to_numpy(self, t):
        t = t.detach()
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).cpu().numpy().view(np_dtype("bfloat16"))
        return t.cpu().numpy()

    def _run(self, feeds, infos, device_outputs=False):
        torch = self._torch
        xs = {s.name: self._to_tensor(s, feeds[s.name], infos[s.name]) for s in self.inputs}
        self.last_input_pointers = {k: int(v.data_ptr()) for k, v in xs.items()}
        batch = next(iter(xs.values())).shape[0]
        with torch.inference_mode():
            if self.streaming:
                out, state = self.model.step([xs[n] for n in self._names],
                                             {k: xs[STATE_PREFIX + k] for k in self._states},
                                             lengths=[xs[n + LENGTHS_SUFFIX] for n in self._names])
                res = {OUTPUT_NAME: out, **{NEXT_STATE_PREFIX + k: state[k] for k in self._states}}
                return res if device_outputs else {k: self._to_numpy(v) for k, v in res.items()}
            if self.cuda_graph and batch <= self.graph_max_batch:
                out = self._graph_run(xs)
            else:
                out = self._forward(xs)
        if device_outputs:
            return {OUTPUT_NAME: out}
        return {OUTPUT_NAME: self._to_numpy(out)}

    def _graph_run(self, xs):
        torch = self._torch
        key = tuple((k, tuple(v.shape)) for k, v in xs.items())
        entry = self._graphs.get(key)
        if entry is None:
            static = {k: v.clone() for k, v in xs.items()}
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):          # warm-up: Triton compiles/autotunes outside the capture
                    self._forward(static)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward(static)
            entry = self._graphs[key] = (graph, static, out)
            self.graph_stats["captures"] += 1
        graph, static, out = entry
        for k, v in xs.items():
            static[k].copy_(v)
        graph.replay()
        self.graph_stats["replays"] += 1
        return out.clone()

    def _forward(self, xs):
        """The model on the modalities and their lengths, as the exported graphs compute it."""
        if self._names is None:      # a foreign architecture: its forward's arguments, in order
            return self.model(*(xs[s.name] for s in self.inputs))
        return self.model({n: xs[n] for n in self._names}, lengths=[xs[n + LENGTHS_SUFFIX] for n in self._names],
                          chunk=self.chunk)

    def synchronize(self):
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def close(self):
        self._graphs.clear()
        self.model = None


class _ViewAsInt16:
    """Re-describe a 2-byte CUDA array (a bfloat16 bit pattern) as int16 so torch.as_tensor takes it."""

    def __init__(self, obj):
        cai = dict(obj.__cuda_array_interface__)
        cai["typestr"] = "<i2"
        self.__cuda_array_interface__ = cai
        self._obj = obj
