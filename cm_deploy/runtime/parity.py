"""Parity: a model (engine, ONNX or checkpoint) against the PyTorch reference of a checkpoint.

The reference is the checkpoint run in float32 with the pure-PyTorch reference scan (on the CPU by
default). Both sides see the same input values: random standard-normal inputs are drawn in float32,
rounded once to the model's precision, and the reference gets that rounded tensor back in float32,
so input rounding is not counted as model error.

Criterion, per output element (numpy.allclose's): |y - ref| <= atol + rtol * |ref|. Reported per
output: max_abs = max |y - ref|; max_rel = max |y - ref| / max(|ref|, atol) (|ref| floored at atol,
so that near-zero references do not dominate); score = max |y - ref| / (atol + rtol * |ref|), which
passes at <= 1. Non-finite outputs where the reference is finite fail.

Default tolerances by the model's precision (overridable with atol/rtol):
  float32   atol 1e-4, rtol 1e-4   float32 state math on both sides; only summation order differs
            (TensorRT float32 engines are built without TF32 for this reason)
  float16   atol 1e-2, rtol 1e-2   11-bit mantissa (eps 9.8e-4) through projections, norms and the
            scan's gates of every layer: a few eps per layer, plus margin
  bfloat16  atol 5e-2, rtol 5e-2   8-bit mantissa (eps 7.8e-3): the same budget scaled by eps
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import UserError
from .backend import Backend
from .specs import ShapeChoice, length_inputs, np_dtype, random_feeds, valid_length_inputs

TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2), "bfloat16": (5e-2, 5e-2)}
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_LENGTH = 64


def tolerance(precision: str, atol=None, rtol=None) -> tuple[float, float]:
    a, r = TOLERANCES.get(precision, TOLERANCES["float32"])
    return (a if atol is None else float(atol)), (r if rtol is None else float(rtol))


def compare(ref: np.ndarray, got, atol: float, rtol: float) -> dict:
    got = np.asarray(got)
    if tuple(got.shape) != tuple(ref.shape):
        return {"ok": False, "error": f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}",
                "max_abs": math.inf, "max_rel": math.inf, "score": math.inf}
    r = np.asarray(ref, dtype=np.float64)
    g = got.astype(np.float64)
    # a non-finite value equal on both sides (NaN and NaN, +inf and +inf) agrees; one side only does not
    same = (np.isnan(r) & np.isnan(g)) | (np.isinf(r) & (r == g))
    bad = ~same & ~(np.isfinite(r) & np.isfinite(g))
    with np.errstate(invalid="ignore"):
        d = np.where(same, 0.0, np.abs(g - r))
    d = np.where(np.isfinite(d), d, np.inf)
    if d.size == 0:
        return {"ok": True, "max_abs": 0.0, "max_rel": 0.0, "score": 0.0}
    max_abs = float(d.max())
    ra = np.where(np.isfinite(r), np.abs(r), 0.0)
    max_rel = float(_ratio(d, np.maximum(ra, atol)).max())
    score = float(_ratio(d, atol + rtol * ra).max())
    out = {"ok": bool(score <= 1.0 and not bad.any()), "max_abs": max_abs, "max_rel": max_rel, "score": score}
    if bad.any():
        out["error"] = f"{int(bad.sum())} non-finite value(s) where the other side differs"
    return out


def _ratio(d, tol):
    """d / tol where a zero difference scores 0 and a nonzero one over a zero tolerance inf (atol = rtol
    = 0 asks for exact equality), never NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d == 0, 0.0, np.where(tol > 0, d / np.where(tol > 0, tol, 1.0), np.inf))


def _common_range(ranges: dict, names, axis):
    lo, hi, opt = 1, math.inf, None
    for n in names:
        if n in ranges and axis < len(ranges[n]):
            a, o, b = ranges[n][axis]
            lo, hi = max(lo, a), min(hi, b)
            opt = o if opt is None else opt
    return lo, (opt if opt is not None else lo), hi


def _ragged_ok(specs, lens) -> bool:
    """A shape with a different length per input makes sense: several length inputs, not all on one
    named axis (the official Coupled Mamba's three inputs share "L")."""
    syms = [s.shape[1] for s in specs if s.name in lens]
    return len(syms) > 1 and not (len(set(syms)) == 1 and isinstance(syms[0], str) and syms[0])


def default_shapes(backends: Sequence[Backend], max_batch=DEFAULT_MAX_BATCH, max_length=DEFAULT_MAX_LENGTH,
                   ) -> list[ShapeChoice]:
    """A few shapes every backend accepts: the profile's min, its opt and a larger one (capped at
    max_batch/max_length to keep the float32 reference quick), plus one with a different length per
    modality. Without profiles: batch 1/2/3, lengths 8/33 and a ragged set."""
    specs = backends[0].inputs
    lens = length_inputs(specs)
    ranges = {}
    for b in backends:
        for name, axes in (b.input_ranges() or {}).items():
            prev = ranges.get(name)
            ranges[name] = axes if prev is None else [
                (max(p[0], a[0]), a[1], min(p[2], a[2])) for p, a in zip(prev, axes)]
    names = [s.name for s in specs]
    if not ranges:
        out = [ShapeChoice(1, {n: 8 for n in lens}), ShapeChoice(2, {n: 33 for n in lens})]
        if _ragged_ok(specs, lens):
            out.append(ShapeChoice(3, {n: v for n, v in zip(lens, (24, 17, 9, 30, 12, 5))}))
        return out
    blo, bopt, bhi = _common_range(ranges, names, 0)
    if blo > bhi:
        raise UserError("the models' batch profiles do not overlap")

    def clip(v, lo, hi, cap):
        return int(max(lo, min(v, hi, max(cap, lo))))

    per = {n: _common_range(ranges, [n], 1) for n in lens}
    for n, (lo, _, hi) in per.items():
        if lo > hi:
            raise UserError(f"the models' length profiles for {n!r} do not overlap")
    picks = [
        ShapeChoice(blo, {n: per[n][0] for n in lens}),
        ShapeChoice(clip(bopt, blo, bhi, max_batch), {n: clip(per[n][1], per[n][0], per[n][2], max_length) for n in lens}),
        ShapeChoice(clip(bhi, blo, bhi, max_batch), {n: clip(per[n][2], per[n][0], per[n][2], max_length) for n in lens}),
    ]
    if _ragged_ok(specs, lens):
        rag = {}
        for i, n in enumerate(lens):
            lo, _, hi = per[n]
            rag[n] = clip(max_length // (i + 1) + i, lo, hi, max_length)
        picks.append(ShapeChoice(clip(2, blo, bhi, max_batch), rag))
    out, seen = [], set()
    for c in picks:
        key = (c.batch, tuple(sorted(c.lengths.items())))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def check_compatible(reference: Backend, model: Backend) -> None:
    rn = {s.name: s for s in reference.inputs}
    mn = {s.name: s for s in model.inputs}
    # a file exported without lengths inputs compares with the checkpoint at full lengths
    for name in set(valid_length_inputs(reference.inputs)) - set(mn):
        rn.pop(name)
    if set(rn) != set(mn):
        raise UserError(f"{model.name} takes inputs {', '.join(mn)} but the checkpoint's model takes "
                        f"{', '.join(rn)}: not the same model")
    for n, s in mn.items():
        r = rn[n]
        if s.rank != r.rank or any(isinstance(a, int) and isinstance(b, int) and a != b
                                   for a, b in zip(s.shape, r.shape)):
            raise UserError(f"input {n!r}: {model.name} expects {s.shape}, the checkpoint {r.shape}: not the same model")
    ro = {s.name for s in reference.outputs}
    missing = [s.name for s in model.outputs if s.name not in ro]
    if missing:
        raise UserError(f"{model.name} has output(s) {', '.join(missing)} that the checkpoint's model lacks")


def _as_dtype(arr: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(arr).astype(np_dtype(dtype))


def run_parity(reference: Backend, model: Backend, cases: Sequence, atol=None, rtol=None, seed: int = 0) -> dict:
    """cases: ShapeChoice (random inputs) or (label, feeds) pairs. Returns the report dict; "ok" says
    whether every output of every case is within tolerance."""
    check_compatible(reference, model)
    atol, rtol = tolerance(model.precision, atol, rtol)
    report = {"reference": reference.name, "model": model.name, "precision": model.precision,
              "atol": atol, "rtol": rtol, "cases": []}
    for i, case in enumerate(cases):
        if isinstance(case, ShapeChoice):
            label, feeds = case.label(), random_feeds(model.inputs, case, seed=seed + i)
        else:
            label, feeds = case
        mfeeds = {s.name: _as_dtype(feeds[s.name], s.dtype) for s in model.inputs if s.name in feeds}
        rfeeds = {s.name: _as_dtype(mfeeds[s.name], s.dtype) for s in reference.inputs if s.name in mfeeds}
        ref_out = reference.run(rfeeds)
        got = model.run(mfeeds)
        outs = []
        for spec in model.outputs:
            c = compare(ref_out[spec.name], got[spec.name], atol, rtol)
            c["name"] = spec.name
            outs.append(c)
        report["cases"].append({"shape": label, "outputs": outs, "ok": all(o["ok"] for o in outs)})
    report["ok"] = all(c["ok"] for c in report["cases"])
    return report


def format_report(report: dict) -> str:
    rows = [("shape", "output", "max abs", "max rel", "score", "result")]
    for c in report["cases"]:
        for o in c["outputs"]:
            rows.append((c["shape"], o["name"], f"{o['max_abs']:.3e}", f"{o['max_rel']:.3e}", f"{o['score']:.3f}",
                         "ok" if o["ok"] else "FAIL" + (f" ({o['error']})" if o.get("error") else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"parity: {report['model']} vs {report['reference']}",
             f"precision {report['precision']}: pass when |y - ref| <= {report['atol']:g} + {report['rtol']:g} * |ref| "
             "(score <= 1)"]
    for j, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    n_bad = sum(1 for c in report["cases"] for o in c["outputs"] if not o["ok"])
    lines.append("PASS" if report["ok"] else f"FAIL: {n_bad} output(s) out of tolerance")
    return "\n".join(lines)
