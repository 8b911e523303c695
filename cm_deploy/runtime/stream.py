"""Streaming inference over a streaming graph (`cm-deploy export --streaming`: model.stream.onnx,
model.stream.portable.onnx, or an engine built from model.stream.onnx): the Stream object carries
the state between chunks for the caller (docs/streaming.md).

    with open_stream("export/model.stream.portable.onnx", batch=1) as s:
        for chunk in chunks:                       # {"text": (1, T, 768), ...}, any T (1 included)
            y = s.push(chunk)                      # the prediction over every step so far
        s.reset()                                  # all-zero state: a new stream
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..errors import UserError
from ..contract import LENGTHS_SUFFIX, NEXT_STATE_PREFIX, OUTPUT_NAME, STATE_PREFIX
from .specs import merge_lengths, zero_state


class Stream:
    """Carries a streaming backend's `state.*` inputs from one push to the next (`next_state.*`)."""

    def __init__(self, backend, batch: int = 1):
        self.backend = backend
        # Where the state lives between chunks, without a round trip through the host: two sets of
        # stream-owned buffers used in turn (ping-pong): each chunk reads the state from one set and
        # writes the next state into the other, so the addresses repeat every other chunk (what a
        # captured CUDA graph needs: ONNX Runtime and TensorRT then replay two graphs per chunk shape)
        #   "ort": OrtValues on the session's device (GPU memory on the CUDA provider), bound through IOBinding;
        #   "trt": device buffers (the engine's own output buffers are reused by every run, so they
        #          cannot hold a state that the next run reads)
        #   None: host arrays (the PyTorch backend and engines without a device)
        self.device_state = ("ort" if backend.kind == "onnxruntime" else
                             "trt" if backend.kind == "tensorrt" and hasattr(backend, "context") else None)
        self.states = [s for s in backend.inputs if s.name.startswith(STATE_PREFIX)]
        if not self.states:
            raise UserError(f"{backend.name}: not a streaming graph (no state.* inputs): export with "
                            "`cm-deploy export --streaming` and open model.stream.onnx / model.stream.portable.onnx")
        outs = {s.name for s in backend.outputs}
        missing = [s.name for s in self.states if NEXT_STATE_PREFIX + s.name[len(STATE_PREFIX):] not in outs]
        if missing or OUTPUT_NAME not in outs:
            lack = [OUTPUT_NAME] if OUTPUT_NAME not in outs else [NEXT_STATE_PREFIX + m[len(STATE_PREFIX):] for m in missing]
            raise UserError(f"{backend.name}: streaming graph lacks output(s) {', '.join(lack)}")
        self.chunk_inputs = [s.name for s in backend.inputs
                             if not s.name.startswith(STATE_PREFIX) and not s.name.endswith(LENGTHS_SUFFIX)]
        self.steps = 0
        self.reset(batch)

    def reset(self, batch: int | None = None) -> None:
        """All-zero state (a new stream), for `batch` streams (default: the current batch)."""
        if batch is not None:
            if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
                raise UserError(f"stream batch must be a positive int, got {batch!r}")
            self.batch = batch
        zeros = zero_state(self.states, self.batch)
        dynamic = [s for s in self.states if s.name not in zeros]
        if dynamic:
            raise UserError(f"{self.backend.name}: state {dynamic[0].name!r} has a dynamic shape {dynamic[0].shape}")
        if self.device_state == "trt":
            from . import cuda as cu
            self._spare = {k: cu.DeviceArray.empty(v.shape, v.dtype) for k, v in zeros.items()}
            self.state = {k: cu.DeviceArray.from_host(v) for k, v in zeros.items()}
        elif self.device_state == "ort":
            old = getattr(self, "state", None) or {}
            if all(k in old and tuple(old[k].shape()) == v.shape for k, v in zeros.items()):
                # the same shapes: zero the set the next push reads, in place (its address, and the
                # CUDA graphs captured on it, stay)
                from .ort_backend import copy_into
                for k, v in zeros.items():
                    copy_into(old[k], v)
            else:
                self._spare = self.backend.device_values(zeros)
                self.state = self.backend.device_values(zeros)
        else:
            self.state = zeros
        self.steps = 0

    def push(self, chunk: Mapping, lengths: Mapping | None = None) -> np.ndarray:
        """Run one chunk ({modality: (batch, T, F)}, one T for all; optional {modality: (batch,)}
        valid steps in this chunk) and return the prediction over every valid step so far."""
        if not isinstance(chunk, Mapping):
            raise UserError(f"stream chunk must be a dict name -> array, got {type(chunk).__name__}")
        stray = [k for k in chunk if k.startswith(STATE_PREFIX)]
        if stray:
            raise UserError(f"stream chunk must not hold state ({stray[0]!r}): the Stream carries it")
        feeds = dict(merge_lengths(chunk, lengths))
        for name in self.chunk_inputs:
            if name in feeds and np.shape(feeds[name])[0] != self.batch:
                raise UserError(f"stream chunk {name!r} has batch {np.shape(feeds[name])[0]}, the stream "
                                f"{self.batch} (reset(batch) to change it)")
        feeds.update(self.state)
        nxt_name = {s.name: NEXT_STATE_PREFIX + s.name[len(STATE_PREFIX):] for s in self.states}
        if self.device_state == "trt":
            out = self.backend.run(feeds, device_outputs=True,
                                   out={nxt_name[k]: self._spare[k] for k in self.state})
            self.state, self._spare = self._spare, self.state        # the next state is in the spare set
            y = out[OUTPUT_NAME].to_host()
        elif self.device_state == "ort":      # bfloat16 outputs too: ORT's numpy bridge has no bfloat16
            out = self.backend.run(feeds, device_outputs=True,
                                   out={nxt_name[k]: self._spare[k] for k in self.state})
            self.state, self._spare = self._spare, self.state
            from .ort_backend import _to_numpy
            y = _to_numpy(out[OUTPUT_NAME])
        else:
            out = self.backend.run(feeds)
            self.state = {k: np.asarray(out[n]) for k, n in nxt_name.items()}
            y = out[OUTPUT_NAME]
        self.steps += int(np.shape(next(iter(chunk.values())))[1]) if chunk else 0
        return y

    @property
    def state_device(self) -> str:
        """Where the state lives between pushes: "cuda:N" (device memory: ONNX Runtime's CUDA
        provider, TensorRT), "cpu" (ONNX Runtime's CPU provider) or "host" (numpy arrays)."""
        if self.device_state == "trt":
            return f"cuda:{getattr(self.backend, 'device_index', 0)}"
        if self.device_state == "ort":
            v = next(iter(self.state.values()))
            dev = v.device_name().lower()
            return "cpu" if dev == "cpu" else f"cuda:{self.backend.device_id}"
        return "host"

    def state_addresses(self) -> dict:
        """{state name: device address} of the state the next push reads (device_state only)."""
        if self.device_state == "trt":
            return {k: v.ptr for k, v in self.state.items()}
        if self.device_state == "ort":
            return {k: v.data_ptr() for k, v in self.state.items()}
        return {}

    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_stream(path, batch: int = 1, **load_kw) -> Stream:
    """A Stream over the streaming graph or engine at `path` (load() options apply)."""
    from .loader import load
    backend = load(path, **load_kw)
    try:
        return Stream(backend, batch)
    except BaseException:
        backend.close()
        raise
