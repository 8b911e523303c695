"""The "onnx" implementation of CoupledScan: inside torch.onnx.export it emits ONE custom node
`cm_deploy::CoupledScan` (DESIGN.md section 3) through torch.onnx.ops.symbolic, which the dynamo
exporter turns into a plain ONNX node, dynamic shapes included. Outside export it runs the
reference, so a model switched to impl="onnx" still computes the right values."""
from __future__ import annotations

import torch

from ..contract import DOMAIN, DOMAIN_VERSION, OP_TYPE, coupling_scale as _kappa
from .reference import coupled_scan_reference


def coupled_scan_onnx(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, delta_softplus=False,
                      coupling_scale=None, initial_state=None, return_final_state=False):
    if not torch.onnx.is_in_onnx_export():
        return coupled_scan_reference(u, delta, A, B, C, D, z, delta_bias,
                                      delta_softplus=delta_softplus, coupling_scale=coupling_scale,
                                      initial_state=initial_state,
                                      return_final_state=return_final_state)
    # The exported model always has D, z and the bias, and streams with both state tensors or with
    # neither; the portable function and the plugin are written for exactly those two forms, so
    # refuse the rest rather than emit a node nothing can run.
    if (initial_state is None) != (not return_final_state):
        raise NotImplementedError("CoupledScan export: initial_state and final_state go together (streaming)")
    if D is None or z is None or delta_bias is None:
        raise NotImplementedError("CoupledScan export needs D, z and delta_bias (as the model has)")
    # Always explicit: consumers must not have to know that "absent" means 1/M.
    kappa = _kappa(coupling_scale, u.shape[1])
    # has_final_state: the plugin's output count (plugins/trt_coupled_scan/README.md); 0 = y only
    attrs = {"delta_softplus": int(bool(delta_softplus)), "coupling_scale": float(kappa),
             "has_final_state": int(bool(return_final_state))}
    inputs = [u, delta, A, B, C, D, z, delta_bias]
    if initial_state is None:
        return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP_TYPE}", inputs, attrs, dtype=u.dtype, shape=u.shape,
                                       version=DOMAIN_VERSION)
    y, final = torch.onnx.ops.symbolic_multi_out(
        f"{DOMAIN}::{OP_TYPE}", inputs + [initial_state], attrs, dtypes=[u.dtype, torch.float32],
        shapes=[u.shape, initial_state.shape], version=DOMAIN_VERSION)
    return y, final


def onnx_steps(xs, axis):
    """Inside torch.onnx.export: 0 .. n - 1 as int64 (n,), n the longest of xs' sizes along `axis`,
    emitted as Shape(x, start=axis, end=axis + 1) per input, one Max of those 1-element tensors when
    there are several, ConstantOfShape, and a CumSum on the device. The Shape values flow straight
    into ConstantOfShape's shape input (which ONNX Runtime's CUDA kernel reads on the host), so that
    no int64 shape arithmetic lands on the host with a copy back to the device (docs/design.md,
    "Every node on the device"); the Max of several lengths is the one host node left."""
    import functools
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    from torch.onnx.ops import symbolic
    sizes, seen = [], []
    for x in xs:      # one Shape per distinct size
        n = x.shape[axis]
        if not any(statically_known_true(n == m) for m in seen):
            seen.append(n)
            sizes.append(symbolic("Shape", [x], {"start": axis, "end": axis + 1}, dtype=torch.int64, shape=(1,)))
    n = functools.reduce(torch.sym_max, seen)
    size = sizes[0] if len(sizes) == 1 else symbolic("Max", sizes, dtype=torch.int64, shape=(1,))
    zeros = symbolic("ConstantOfShape", [size], dtype=torch.float32, shape=(n,))     # float 0: the op's default
    return (zeros.long() + 1).cumsum(0) - 1
