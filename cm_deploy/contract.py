"""The contract between cm-deploy's parts, stated once (docs/design.md explains it). Every module
that needs one of these facts imports it from here; nothing else spells them. Importing this
module imports nothing heavy (no torch, no onnx), so the runtime and the CLI use it too.

The native side (plugins/coupled_scan_kernel/scan_types.h, the plugin's and the op library's
names) states the same facts in C++; tests/test_contract.py checks that both agree.
"""
from __future__ import annotations

from .errors import UserError

# ---------------------------------------------------------------------------- the CoupledScan op
DOMAIN = "cm_deploy"                 # ONNX domain of the custom node
OP_TYPE = "CoupledScan"              # ONNX op_type, TensorRT plugin name
DOMAIN_VERSION = 1                   # opset version of the cm_deploy domain
PLUGIN_VERSION = "1"                 # TensorRT plugin version
PLUGIN_NAMESPACE = ""                # TensorRT plugin namespace
# inputs in order; initial_state is optional (streaming), then the outputs y[, final_state]
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
STATE_INPUT = "initial_state"
OUTPUT_NAMES = ("y", "final_state")
# attributes and their types; every exported node carries all three
ATTRIBUTES = {"delta_softplus": int, "coupling_scale": float, "has_final_state": int}
# inputs that are float32 whatever the activations' precision (state math is float32)
FLOAT32_INPUTS = ("A", "D", "delta_bias", STATE_INPUT)
# the CUDA kernel's limits (scan_types.h kMaxModalities, kMaxStates); the CPU kernels share them so
# that a model that runs anywhere runs everywhere
MAX_MODALITIES = 8
MAX_STATES = 512


def coupling_scale(kappa, n_modalities: int) -> float:
    """kappa of c[t] = kappa * sum_m h[m, t]: None means 1/M (mean coupling; kappa = 1 is the paper's
    Eq. (6), whose state grows like M^t)."""
    return 1.0 / n_modalities if kappa is None else float(kappa)


# ---------------------------------------------------------------------------- precisions
PRECISIONS = ("float32", "float16", "bfloat16")
PRECISION_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "fp16": "float16",
                     "f16": "float16", "half": "float16", "bf16": "bfloat16"}
# model parameters kept in float32 at every precision: they feed FLOAT32_INPUTS (A = -exp(A_log))
FLOAT32_PARAMS = ("A_log", ".D", ".dt_bias")


# What runs a bfloat16 graph (said at export, and instead of ONNX Runtime's "Could not find an
# implementation for Where(16)" when a CPU session cannot load one): ORT's CPU provider has no
# bfloat16 kernels for the graph's MatMul/Where/Conv.
BF16_RUNS_ON = ("a bfloat16 graph runs on TensorRT (cm-deploy build, then run the engine) or on ONNX Runtime's "
                "CUDA provider (onnxruntime-gpu), not on ONNX Runtime's CPU provider; for the CPU, export "
                "float32 or float16, or run the checkpoint with --dtype bfloat16")


def normalize_precision(p: str | None) -> str | None:
    """'fp16' -> 'float16' etc.; None stays None; UserError for anything else."""
    if p is None:
        return None
    key = str(p).strip().lower()
    key = PRECISION_ALIASES.get(key, key)
    if key not in PRECISIONS:
        raise UserError(f"unknown precision {p!r}: use float32, float16 or bfloat16 (fp32/fp16/bf16)")
    return key


def precision_of(dtypes) -> str:
    """A graph's precision: the dtype of its first floating-point input (float32 if it has none)."""
    return next((d for d in dtypes if d in PRECISIONS), "float32")


# ---------------------------------------------------------------------------- exported graphs
FILES = {"tensorrt": "model.onnx", "portable": "model.portable.onnx"}
STREAM_FILES = {"stream_tensorrt": "model.stream.onnx", "stream_portable": "model.stream.portable.onnx"}
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cm-deploy-manifest/1"
SIDECAR_FORMAT = "cm-deploy-engine/1"    # <engine>.json, written by `cm-deploy build` beside an engine
OUTPUT_NAME = "output"
LENGTHS_SUFFIX = "_lengths"          # <modality>_lengths: int64 (batch,) valid steps per sample
STATE_PREFIX, NEXT_STATE_PREFIX = "state.", "next_state."
BATCH_DIM, CHUNK_DIM = "batch", "T"


def length_dim(modality: str) -> str:
    """Symbolic length of a modality's input axis 1."""
    return f"L_{modality}"


def lengths_input(modality: str) -> str:
    return modality + LENGTHS_SUFFIX


def input_names(modalities) -> list:
    """A graph's inputs in order: the modalities, then one lengths input per modality."""
    return list(modalities) + [lengths_input(n) for n in modalities]


# ---------------------------------------------------------------------------- checkpoints
CHECKPOINT_FORMAT = "cm-deploy/1"
