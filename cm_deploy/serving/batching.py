"""Many requests, one model run: what the Python backend's execute() does with the requests that
Triton's schedulers hand it together (docs/serving.md). numpy and cm_deploy.runtime only.

Whole sequences (dynamic batching): requests may differ in batch size and in every modality's
length. Each request is checked on its own (a bad one gets its own error; the others still run),
its `<name>_lengths` are filled with its own lengths where it left them out, then every modality is
zero-padded along time to the longest request and the batch runs once. The padding is exact: a
padded batch with per-sample lengths gives every sample what it gives alone (docs/lengths.md).

Streams (sequence batching, by correlation id): the state of every live sequence is kept here,
between requests. Chunks of one length T run together (the state of a chunk padded past its
lengths would move on: a streaming graph's lengths mark where a stream ended, not padding), each
row with its own sequence's state.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from ..contract import LENGTHS_SUFFIX, NEXT_STATE_PREFIX, OUTPUT_NAME, STATE_PREFIX
from ..errors import UserError
from ..runtime.specs import fill_defaults, length_inputs, zero_state


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def flatten_lengths(specs, feeds: Mapping) -> dict:
    """`<name>_lengths` sent as (batch, 1) (Triton's dims [1] for a batch-only input) -> (batch,)."""
    out = dict(feeds)
    for s in specs:
        v = out.get(s.name)
        if v is not None and s.name.endswith(LENGTHS_SUFFIX) and s.rank == 1 and np.ndim(v) == 2:
            out[s.name] = np.asarray(v).reshape(-1)
    return out


def pad_and_concat(specs, requests: Sequence[Mapping]) -> tuple[dict, list[int]]:
    """One feed dict from several complete, checked requests: inputs with a time axis (axis 1)
    zero-padded to the longest request, then everything concatenated along the batch. Returns the
    feeds and each request's batch size."""
    timed = set(length_inputs(specs))
    sizes = [int(np.shape(r[specs[0].name])[0]) for r in requests]
    feeds = {}
    for s in specs:
        arrays = [np.asarray(r[s.name]) for r in requests]
        if s.name in timed:
            longest = max(a.shape[1] for a in arrays)
            arrays = [a if a.shape[1] == longest else
                      np.pad(a, [(0, 0), (0, longest - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
                      for a in arrays]
        feeds[s.name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    return feeds, sizes


def split_rows(outputs: Mapping, sizes: Sequence[int]) -> list[dict]:
    """Per-request outputs from a batch's outputs, in request order."""
    bounds = np.cumsum([0, *sizes])
    return [{k: np.asarray(v)[a:b] for k, v in outputs.items()} for a, b in zip(bounds[:-1], bounds[1:])]


class WholeSequenceRunner:
    """Runs the requests of one execute() on a whole-sequence backend (model.onnx,
    model.portable.onnx) as one padded batch."""

    def __init__(self, backend):
        self.backend = backend
        self.inputs = [s.name for s in backend.inputs]
        self.outputs = [s.name for s in backend.outputs]

    def run(self, requests: Sequence[Mapping]) -> list:
        """A list, in request order, of {output name: array} or an error string (one line)."""
        results: list = [None] * len(requests)
        ok, feeds = [], []
        for i, req in enumerate(requests):
            try:
                f = fill_defaults(self.backend.inputs, flatten_lengths(self.backend.inputs, req))
                self.backend.check(f)
            except UserError as e:
                results[i] = _one_line(e)
                continue
            ok.append(i)
            feeds.append(f)
        if ok:
            batch, sizes = pad_and_concat(self.backend.inputs, feeds)
            try:
                outs = self.backend.run(batch)
            except (UserError, RuntimeError) as e:
                for i in ok:
                    results[i] = _one_line(e)
                return results
            for i, r in zip(ok, split_rows(outs, sizes)):
                results[i] = r
        return results


class StreamRunner:
    """Runs chunks of many streams on a streaming backend (model.stream.onnx,
    model.stream.portable.onnx), keeping each sequence's state between its requests.

    A request is (sequence id, start, end, feeds) with feeds of batch 1. start begins the sequence
    from zero state (again, if the id was in use); end forgets its state after the chunk. A state
    idle longer than `idle_seconds` is dropped (Triton's sequence batcher has given the sequence
    up by then)."""

    def __init__(self, backend, idle_seconds: float | None = None, clock=time.monotonic):
        self.backend = backend
        self.states_spec = [s for s in backend.inputs if s.name.startswith(STATE_PREFIX)]
        if not self.states_spec:
            raise UserError(f"{backend.name}: not a streaming graph (no state.* inputs)")
        self.chunk_specs = [s for s in backend.inputs if not s.name.startswith(STATE_PREFIX)]
        self.chunk_inputs = [s.name for s in self.chunk_specs]
        self.idle_seconds = idle_seconds
        self.clock = clock
        self.states: dict = {}          # sequence id -> ({state name: (1, ...) array}, last use)

    def _expire(self, now):
        if self.idle_seconds is None:
            return
        for sid in [k for k, (_, t) in self.states.items() if now - t > self.idle_seconds]:
            del self.states[sid]

    def run(self, requests: Sequence[tuple]) -> list:
        """requests: (sequence id, start, end, feeds) each; returns, in order, {"output": (1, K)}
        or an error string. Requests of one sequence in one call run in order, one per batch."""
        now = self.clock()
        self._expire(now)
        results: list = [None] * len(requests)
        checked, known = [], set(self.states)
        for i, (sid, start, end, req) in enumerate(requests):
            try:
                f = fill_defaults(self.chunk_specs, flatten_lengths(self.chunk_specs, req))
                names = [k for k in f if not k.startswith(STATE_PREFIX)]
                if any(np.shape(f[k])[0] != 1 for k in names):
                    raise UserError("a stream request carries one chunk of one stream: batch 1")
                if not start and sid not in known:
                    raise UserError(f"unknown sequence {sid}: start it with the sequence-start flag")
                probe = {**f, **zero_state(self.states_spec, 1)}
                self.backend.check(probe)
            except UserError as e:
                results[i] = _one_line(e)
                continue
            checked.append((i, sid, bool(start), bool(end), f))
            known.add(sid)
        # rounds: a sequence's chunks in order, one per round; within a round, one run per chunk length
        while checked:
            seen, this_round, later = set(), [], []
            for item in checked:
                (later if item[1] in seen else this_round).append(item)
                seen.add(item[1])
            checked = later
            by_len: dict = {}
            for item in this_round:
                by_len.setdefault(np.shape(item[4][self.chunk_inputs[0]])[1], []).append(item)
            for group in by_len.values():
                self._run_group(group, results, now)
        return results

    def _run_group(self, group, results, now):
        feeds = {n: np.concatenate([np.asarray(it[4][n]) for it in group], axis=0) for n in self.chunk_inputs}
        states = []
        for _, sid, start, _, _ in group:
            if start or sid not in self.states:
                states.append(zero_state(self.states_spec, 1))
            else:
                states.append(self.states[sid][0])
        for s in self.states_spec:
            feeds[s.name] = np.concatenate([st[s.name] for st in states], axis=0)
        try:
            outs = self.backend.run(feeds)
        except (UserError, RuntimeError) as e:
            for i, *_ in group:
                results[i] = _one_line(e)
            return
        for row, (i, sid, _, end, _) in enumerate(group):
            if end:
                self.states.pop(sid, None)
            else:
                self.states[sid] = ({s.name: np.asarray(outs[NEXT_STATE_PREFIX + s.name[len(STATE_PREFIX):]])[row:row + 1]
                                     for s in self.states_spec}, now)
            results[i] = {OUTPUT_NAME: np.asarray(outs[OUTPUT_NAME])[row:row + 1]}
