"""Export of any torch module built from Mamba-1 mixers (docs/bring_your_own_model.md): mamba-ssm
models (MambaLMHeadModel, vision and restoration backbones on mamba-ssm's `Mamba`) and the
official Coupled Mamba code's MutiMamba (cm_deploy.foreign.official).

`export_module(model, example_inputs, out_dir, ...)` writes the same files as `cm-deploy export`:

    model.onnx                every mixer's selective scan as one cm_deploy::CoupledScan node (M = 1,
                              coupling_scale 1; TensorRT with the plugin, ONNX Runtime with the op library)
    model.portable.onnx       the same graph carrying CoupledScan as an ONNX function (any ONNX runtime)
    model.stream*.onnx        with streaming=True: a chunk in, every mixer's state in and out
    manifest.json             inputs, outputs, dynamic axes, what was exported

How: for the duration of the export every Mamba-1 mixer's forward (recognised by its parameters,
cm_deploy.foreign.mamba1) is replaced by cm-deploy's mixer math on its own weights, and mamba-ssm's
fused add + norm functions (Triton kernels, which torch.export cannot trace) by plain PyTorch; the
rest of the model is traced as it is. mamba-ssm's CUDA extension is never called. Mamba-2 (SSD)
mixers are refused.

Streaming: the streaming graph takes every input with time on axis 1 (batch on axis 0) and carries,
per mixer, state.<mixer path>.conv and .ssm (next_state.* out). A mixer that runs on G times the
input batch (modalities stacked along the batch, as the official model's shared blocks do) keeps a
(batch, G, ...) state. That is only right when the model is causal step by step outside its
mixers (an LM: embedding, norms, head); export checks it by running the example in two chunks and
refuses streaming when the outputs differ from one run (pooling over time, attention, ...).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from pathlib import Path

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from ..contract import (BATCH_DIM, CHUNK_DIM, DOMAIN, DOMAIN_VERSION, FILES, MAX_STATES,
                        NEXT_STATE_PREFIX, OP_TYPE, OUTPUT_NAME, STATE_PREFIX, STREAM_FILES)
from ..errors import UserError
from ..foreign.mamba1 import (add_norm_functions, is_mamba1_mixer, is_mamba2_mixer, is_other_ssm, keeps_float32,
                              mixer_extras, mixer_forward, state_shapes)
from ..progress import silent
from .exporter import (DEFAULT_OPSET, DTYPES, MIN_OPSET, _check, _manifest, _sha256, _Staging, torch_onnx_export,
                       write_files)
from .portable import make_portable

# ------------------------------------------------------------------------------------ the mixers


def find_mixers(model: nn.Module) -> list:
    """[(path, module)] of every Mamba-1 mixer in `model`; UserError for Mamba-2 (SSD) mixers."""
    found = []
    for name, m in model.named_modules():
        if is_mamba2_mixer(m):
            raise UserError(f"{name or type(m).__name__}: a Mamba-2 (SSD) mixer ({type(m).__name__}); cm-deploy "
                            "exports Mamba-1 selective-scan mixers only")
        if is_other_ssm(m):
            extra = mixer_extras(m)
            raise UserError(f"{name or type(m).__name__}: {type(m).__name__} has an A_log but is not a Mamba-1 mixer "
                            f"as mamba-ssm's Mamba{' (it also holds ' + ', '.join(extra) + ')' if extra else ''}; "
                            "cm-deploy exports mamba-ssm's Mamba-1 mixer only")
        if is_mamba1_mixer(m):
            found.append((name, m))       # "" when the model is a mixer itself
    return found


def _layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, x.shape[-1:], weight.float(), None if bias is None else bias.float(), eps)


def _rms_norm(x, weight, bias, eps):
    y = F.rms_norm(x, x.shape[-1:], weight.float(), eps)
    return y if bias is None else y + bias.float()


class _Slots:
    """Streaming state handed to the mixers (inputs) and collected from them (outputs) per call."""

    def __init__(self):
        self.inputs, self.outputs = {}, {}


@contextlib.contextmanager
def mixers_on_cm_deploy(model, mixers, impl, slots=None, calls=None):
    """Within: every mixer's forward is cm-deploy's mixer math (scan impl `impl`), and the fused
    norm functions of the mixers' packages are plain PyTorch. slots: streaming state (_Slots);
    calls: a dict that collects {mixer: [batch of every call]}."""
    norm_fn, rms_fn = add_norm_functions(_layer_norm, _rms_norm)
    patched = []          # (object, attribute, old value)

    def patch(obj, attr, value):
        patched.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
        setattr(obj, attr, value)

    def make_forward(m):
        def forward(hidden_states, inference_params=None, **kwargs):
            if inference_params is not None or kwargs:
                raise UserError(f"{type(m).__name__}: export runs the mixers on whole sequences; inference_params "
                                f"and extra mixer arguments ({', '.join(kwargs) or 'inference_params'}) are not "
                                "supported")
            if calls is not None:
                calls.setdefault(m, []).append(int(hidden_states.shape[0]))
            if slots is None or m not in slots.inputs:
                return mixer_forward(m, hidden_states, impl=impl)
            if m in slots.outputs:
                raise UserError(f"{type(m).__name__} runs more than once per forward: streaming needs one call "
                                "per mixer")
            out, slots.outputs[m] = mixer_forward(m, hidden_states, impl=impl, state=slots.inputs[m])
            return out
        return forward

    try:
        for _, m in mixers:
            patch(m, "forward", make_forward(m))
        packages = {type(m).__module__.split(".")[0] for _, m in mixers} - {__name__.split(".")[0]}
        for key, mod in list(sys.modules.items()):
            if key.split(".")[0] in packages and mod is not None:
                for attr, fn in (("layer_norm_fn", norm_fn), ("rms_norm_fn", rms_fn)):
                    if callable(getattr(mod, attr, None)):
                        patch(mod, attr, fn)
        yield
    finally:
        for obj, attr, old in reversed(patched):
            if old is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


_MISSING = object()


# ------------------------------------------------------------------------------------ wrappers

def _flat(out) -> tuple:
    leaves = pytree.tree_leaves(out)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise UserError(f"the model's output must be tensors (a tensor, tuple, dict or named tuple of them), "
                        f"got {type(out).__name__}")
    return tuple(leaves)


class _Flat(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return _flat(self.model(*args))


def _to_stack(state, groups):
    """A mixer's state as the graph carries it, (batch, G, ...), to the mixer's (G * batch, ...)."""
    return state if groups == 1 else state.transpose(0, 1).reshape(-1, *state.shape[2:])


def _from_stack(state, groups):
    return state if groups == 1 else state.reshape(groups, -1, *state.shape[1:]).transpose(0, 1)


class _Streaming(nn.Module):
    """The model on one chunk, every mixer's state in (after the inputs) and out (after the outputs)."""

    def __init__(self, model, mixers, groups, n_inputs, slots):
        super().__init__()
        self.model, self.mixers, self.groups, self.n_inputs, self.slots = model, mixers, groups, n_inputs, slots

    def forward(self, *args):
        xs, states = args[:self.n_inputs], args[self.n_inputs:]
        self.slots.inputs = {m: (_to_stack(states[2 * i], g), _to_stack(states[2 * i + 1], g))
                             for i, ((_, m), g) in enumerate(zip(self.mixers, self.groups))}
        self.slots.outputs = {}
        outs = _flat(self.model(*xs))
        nxt = []
        for (name, m), g in zip(self.mixers, self.groups):
            if m not in self.slots.outputs:
                raise UserError(f"mixer {name or 'mixer'} did not run on the chunk: cannot stream it")
            conv, ssm = self.slots.outputs[m]
            nxt += [_from_stack(conv, g), _from_stack(ssm, g)]
        return (*outs, *nxt)


def state_names(mixers) -> list:
    return [f"{name or 'mixer'}.{part}" for name, _ in mixers for part in ("conv", "ssm")]


def _zero_states(mixers, groups, batch, dtype, device):
    out = []
    for (_, m), g in zip(mixers, groups):
        shapes = state_shapes(m)
        lead = (batch,) if g == 1 else (batch, g)
        out += [torch.zeros(lead + shapes["conv"], dtype=dtype, device=device),
                torch.zeros(lead + shapes["ssm"], dtype=torch.float32, device=device)]
    return out


# ------------------------------------------------------------------------------------ options

def _prepare(model, mixers, dtype):
    """A copy of `model` in eval mode at `dtype`, the scan's float32 parameters kept float32."""
    names = {name for name, _ in mixers}
    prepared = copy.deepcopy(model).eval()
    dt = DTYPES[dtype]
    for name, p in list(prepared.named_parameters()) + list(prepared.named_buffers()):
        if not p.is_floating_point():
            continue
        mixer_param = keeps_float32(name) and any(not n or name.startswith(n + ".") for n in names)
        p.data = p.data.float() if mixer_param else p.data.to(dt)
    return prepared, find_mixers(prepared)


def _dynamic_shapes(args, input_names, dynamic_axes):
    dims = {}
    shapes = []
    for name, a in zip(input_names, args):
        axes = (dynamic_axes or {}).get(name) or {}
        spec = {}
        for axis, dim in axes.items():
            if not isinstance(axis, int) or not 0 <= axis < a.dim() or not str(dim).isidentifier():
                raise UserError(f"dynamic_axes[{name!r}]: axis {axis!r} named {dim!r} does not fit the input "
                                f"of shape {tuple(a.shape)} (axes by int, names identifiers)")
            spec[axis] = dims.setdefault(dim, torch.export.Dim(str(dim), min=1))
        shapes.append(spec or None)
    return (tuple(shapes),)


def _check_args(model, example_inputs, input_names, output_names, dtype, opset):
    if not isinstance(model, nn.Module):
        raise UserError(f"export_module needs a torch.nn.Module, got {type(model).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise UserError("example_inputs must be a tensor or a tuple of tensors (the forward's positional arguments)")
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    lo, hi = MIN_OPSET[dtype], onnx.defs.onnx_opset_version()
    opset = max(DEFAULT_OPSET, lo) if opset is None else opset
    if not isinstance(opset, int) or not lo <= opset <= hi:
        raise UserError(f"opset must be an int in [{lo}, {hi}] for {dtype}, got {opset!r}")
    if input_names is None:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        input_names = [p.name for p in params[:len(args)]]
        input_names += [f"input_{i}" for i in range(len(input_names), len(args))]
    input_names = list(input_names)
    if len(input_names) != len(args) or len(set(input_names)) != len(input_names):
        raise UserError(f"input_names {input_names} must name each of the {len(args)} example inputs once")
    if output_names is not None:
        output_names = list(output_names)
    return args, input_names, output_names, opset


# ------------------------------------------------------------------------------------ graphs

def _finish(proto, names_in, names_out, dims_in, n_nodes, stateful, dtype, props):
    """Check the exported graph (names, CoupledScan nodes) and pin the inputs' symbolic dims."""
    g = proto.graph
    if [i.name for i in g.input] != names_in or [o.name for o in g.output] != names_out:
        raise RuntimeError(f"exporter produced inputs {[i.name for i in g.input]} and outputs "
                           f"{[o.name for o in g.output]}")
    for vi, axes in zip(g.input, dims_in):
        for axis, dim in axes.items():
            vi.type.tensor_type.shape.dim[axis].dim_param = dim
    nodes = [n for n in g.node if n.op_type == OP_TYPE]
    if len(nodes) != n_nodes or any(n.domain != DOMAIN for n in nodes):
        raise RuntimeError(f"expected {n_nodes} {DOMAIN}::{OP_TYPE} nodes (one per mixer call), found {len(nodes)}")
    form = (9, 2) if stateful else (8, 1)
    if any((len(n.input), len(n.output)) != form for n in nodes):
        raise RuntimeError(f"expected every {OP_TYPE} node with {form[0]} inputs and {form[1]} outputs")
    if not any(o.domain == DOMAIN and o.version == DOMAIN_VERSION for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    from .. import __version__
    onnx.helper.set_model_props(proto, {"cm_deploy.version": __version__, "cm_deploy.dtype": dtype, **props})
    proto.producer_name, proto.producer_version = "cm-deploy", __version__


def _stream_groups(mixers, calls, batch) -> list:
    """G of every mixer (it runs once per forward on G * the input batch), or UserError."""
    groups = []
    for name, m in mixers:
        seen = calls.get(m, [])
        if len(seen) != 1 or seen[0] % batch:
            raise UserError(f"streaming: mixer {name or 'mixer'} runs {len(seen)} time(s) per forward on batch {seen}; "
                            f"streaming needs one call per mixer on a multiple of the input batch {batch}")
        groups.append(seen[0] // batch)
    return groups


def _check_streamable(model, mixers, groups, args, tol=1e-4):
    """The example run in two chunks along axis 1 (float32) must give the one-run outputs."""
    args = tuple(a.float() if a.is_floating_point() else a for a in args)
    lengths = {a.shape[1] if a.dim() >= 2 else 0 for a in args}
    L = lengths.pop()
    if L < 2 or lengths:
        raise UserError("streaming: every example input must be (batch, L, ...) with one L >= 2 (time on axis 1)")
    model, mixers = _prepare(model, mixers, "float32")
    slots = _Slots()
    wrapper = _Streaming(model, mixers, groups, len(args), slots)
    states = _zero_states(mixers, groups, args[0].shape[0], torch.float32, args[0].device)
    with torch.no_grad(), mixers_on_cm_deploy(model, mixers, "reference", slots=slots):
        full = _flat(model(*args))
        try:
            first = wrapper(*(a[:, :L // 2] for a in args), *states)
            second = wrapper(*(a[:, L // 2:] for a in args), *first[len(full):])
        except (RuntimeError, ValueError, IndexError) as e:
            raise UserError(f"streaming: the model fails on a chunk of its inputs (axis 1 cut in two): "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    for i, whole in enumerate(full):
        try:
            joined = torch.cat([first[i], second[i]], dim=1)
        except RuntimeError:
            joined = None
        if joined is None or joined.shape != whole.shape or \
                not bool(((joined - whole).abs() <= tol + tol * whole.abs()).all()):
            raise UserError(f"streaming: output {i} of the model run in two chunks differs from one run: the model "
                            "mixes time steps outside its Mamba mixers (pooling, attention, ...); export without "
                            "streaming")


def build_module_onnx(model, example_inputs, *, input_names=None, output_names=None, dynamic_axes=None,
                      dtype="float32", opset=None, streaming=False, props=None, progress=silent):
    """{file name: ModelProto} (model.onnx and model.portable.onnx, and with streaming the two
    streaming graphs) and info {"opset", "count", "mixers", "groups", "state"}; nothing written.
    See export_module for the arguments."""
    args, input_names, output_names, opset = _check_args(model, example_inputs, input_names, output_names,
                                                          dtype, opset)
    mixers = find_mixers(model)
    if not mixers:
        raise UserError(f"{type(model).__name__} holds no Mamba-1 mixer (mamba-ssm Mamba): nothing to export "
                        "as CoupledScan")
    for name, m in mixers:
        if m.A_log.shape[1] > MAX_STATES:
            raise UserError(f"mixer {name or 'mixer'}: d_state {m.A_log.shape[1]} exceeds the CoupledScan kernels' "
                            f"{MAX_STATES}")
    prepared, pmixers = _prepare(model, mixers, dtype)
    dt = DTYPES[dtype]
    given, args = args, tuple(a.to(dt) if a.is_floating_point() else a for a in args)
    # one eager run: the outputs (their count and names), every mixer's calls and batch
    calls = {}
    with torch.no_grad(), mixers_on_cm_deploy(prepared, pmixers, "reference", calls=calls):
        full = _flat(prepared(*args))
    if output_names is None:
        output_names = [OUTPUT_NAME] + [f"{OUTPUT_NAME}_{i}" for i in range(1, len(full))]
    if len(output_names) != len(full):
        raise UserError(f"output_names {output_names} must name each of the model's {len(full)} outputs")
    n_calls = sum(len(v) for v in calls.values())
    dims_in = [dict((dynamic_axes or {}).get(n) or {}) for n in input_names]
    if streaming:     # refused before any tracing when the model cannot stream
        groups = _stream_groups(pmixers, calls, args[0].shape[0])
        _check_streamable(model, mixers, groups, given)
    props = {k: str(v) for k, v in (props or {}).items()}
    graphs = {}
    progress(f"tracing {type(model).__name__} into {FILES['tensorrt']} and {FILES['portable']} (torch.export)")
    with mixers_on_cm_deploy(prepared, pmixers, "onnx"):
        proto = torch_onnx_export(_Flat(prepared), args, opset, input_names, output_names,
                                  _dynamic_shapes(args, input_names, dynamic_axes))
    _finish(proto, input_names, output_names, dims_in, n_calls, False, dtype, props)
    graphs[FILES["tensorrt"]], graphs[FILES["portable"]] = proto, make_portable(proto)
    info = {"opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), "count": n_calls,
            "mixers": [name or "mixer" for name, _ in pmixers], "stream": None}
    if streaming:
        slots = _Slots()
        snames = state_names(pmixers)
        s_in, s_out = [STATE_PREFIX + n for n in snames], [NEXT_STATE_PREFIX + n for n in snames]
        chunk = tuple(a[:, :max(2, a.shape[1] // 2)] for a in args)
        states = tuple(_zero_states(pmixers, groups, args[0].shape[0], dt, args[0].device))
        bdim = dims_in[0].get(0)
        s_dims = [({0: bdim} if bdim else {}) for _ in states]
        c_dims = [{k: (CHUNK_DIM if k == 1 else v) for k, v in d.items()} for d in dims_in]
        progress("tracing the streaming graphs")
        with mixers_on_cm_deploy(prepared, pmixers, "onnx", slots=slots):
            stream = torch_onnx_export(_Streaming(prepared, pmixers, groups, len(args), slots), chunk + states,
                                       opset, input_names + s_in, output_names + s_out,
                                       _dynamic_shapes(chunk + states, input_names + s_in,
                                                       dict(zip(input_names + s_in, c_dims + s_dims))))
        _finish(stream, input_names + s_in, output_names + s_out, c_dims + s_dims, len(pmixers), True, dtype, props)
        graphs[STREAM_FILES["stream_tensorrt"]], graphs[STREAM_FILES["stream_portable"]] = stream, make_portable(stream)
        info["stream"] = stream
    for name, g in graphs.items():
        _check(g, name)
    return graphs, info


class _Described:
    """What the manifest's "config" says of an exported module."""

    def __init__(self, d):
        self.d = d

    def to_dict(self):
        return dict(self.d)


def write_export(graphs, info, out_dir, config: dict, dtype, source) -> dict:
    """Write the graphs and manifest.json to out_dir, all or nothing; returns the manifest."""
    out_dir = Path(out_dir)
    staging = _Staging(out_dir)
    try:
        manifest = _manifest(graphs[FILES["tensorrt"]], _Described(config), dtype, info, source, stream=info["stream"])
        manifest["mixers"] = info["mixers"]
        write_files(staging, graphs, manifest)
    except BaseException:
        staging.abort()
        raise
    return manifest


def export_module(model, example_inputs, out_dir, *, input_names=None, output_names=None, dynamic_axes=None,
                  dtype="float32", opset=None, streaming=False, progress=silent) -> dict:
    """Export a torch module containing Mamba-1 mixers (mamba-ssm `Mamba` or the same parameters)
    with every selective scan as a CoupledScan node; returns the manifest (also written).

    example_inputs: the forward's positional arguments (a tensor or a tuple of tensors).
    input_names: the graph's input names (default: the forward's parameter names).
    output_names: default "output" (and "output_1", ... for more outputs, in pytree order).
    dynamic_axes: {input name: {axis: dim name}}, e.g. {"input_ids": {0: "batch", 1: "L"}};
        every other axis is fixed to the example's size. Inputs sharing a dim name share the size.
    dtype: "float32", "float16" or "bfloat16" (A_log, D and the dt bias stay float32).
    streaming: also model.stream.onnx / model.stream.portable.onnx (see the module doc); the chunk
        axis (axis 1 of every input) is named "T".
    The model is not modified; mamba-ssm's CUDA extension is not needed.
    """
    graphs, info = build_module_onnx(model, example_inputs, input_names=input_names, output_names=output_names,
                                     dynamic_axes=dynamic_axes, dtype=dtype, opset=opset, streaming=streaming,
                                     props={"cm_deploy.module": type(model).__name__}, progress=progress)
    progress(f"writing {out_dir}")
    return write_export(graphs, info, out_dir, {"module": f"{type(model).__module__}.{type(model).__qualname__}"},
                        dtype, None)


def export_official(ckpt_path, out_dir, *, norm_eps=1e-5, dtype="float32", opset=None, batch=None,
                    streaming=False, progress=silent) -> dict:
    """`cm-deploy export --arch coupled-mamba-official`: a MutiMamba state_dict (the official code's
    checkpoints) -> our implementation (cm_deploy.foreign.official) -> the export files. Inputs
    input_A, input_V, input_F (batch, L, feature size), one L; output "output" (batch, L)."""
    from ..foreign.official import ARCH, LENGTH_DIM, load_official
    ckpt_path = Path(ckpt_path)
    progress(f"loading {ckpt_path}")
    model = load_official(ckpt_path, norm_eps=norm_eps)
    if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise UserError(f"batch must be a positive int (or None for dynamic), got {batch!r}")
    b = batch or 2
    g = torch.Generator().manual_seed(0)
    args = tuple(torch.randn(b, 7, f, generator=g) for f in model.config.input_sizes.values())
    axes = {n: ({0: BATCH_DIM} if batch is None else {}) | {1: LENGTH_DIM} for n in model.input_names}
    graphs, info = build_module_onnx(model, args, input_names=list(model.input_names), output_names=[OUTPUT_NAME],
                                     dynamic_axes=axes, dtype=dtype, opset=opset, streaming=streaming,
                                     props={"cm_deploy.arch": ARCH}, progress=progress)
    progress(f"writing {out_dir}")
    source = {"path": str(ckpt_path.resolve()), "sha256": _sha256(ckpt_path), "arch": ARCH}
    return write_export(graphs, info, out_dir, model.config.to_dict(), dtype, source)
