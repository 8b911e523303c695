"""Mamba's own selective-scan CUDA kernel (mamba-ssm), built at run time as the benchmark's peer.

Nothing of mamba-ssm lives in this repository: the benchmark extracts the carried PyPI sdist
(`.carry/mamba_ssm-*.tar.gz`) to /tmp and compiles its `csrc/selective_scan` there with
torch.utils.cpp_extension.load (ninja, sm_90 only, the nvcc flags of mamba's setup.py).

The forward kernels for float32 and bfloat16 activations (real A) are compiled, and the backward
kernels for the same two types (mamba's own selective_scan_bwd_{fp32,bf16}_real.cu units, for the
fwd + bwd comparison of issue 12; CM_BENCH_MAMBA_BWD=0 leaves them out and shortens the build).
The files we write next to theirs (in /tmp, a few lines each) only name which template instances to
build:

  * fwd_<type>_<threads>x<items>.cu : one `selective_scan_fwd_launch<threads, items, type, float>`
    each (the 5 sizes mamba picks from by seqlen), so that ninja compiles the 10 kernel families in
    parallel instead of 2 big files one after the other (compile time is the GPU run's bottleneck);
  * fwd_dispatch.cu : `selective_scan_fwd_cuda<type, float>`, with `extern template` for the launches;
  * stubs.cpp : every other instance that selective_scan.cpp's dispatch references (fp16, complex
    A, and the backward when it is not built) defined to throw, so the module links without
    compiling those kernels.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
import tarfile
import time

import common

EXT_NAME = "cm_bench_selective_scan"
# mamba's CUDA (non-ROCm) dispatch in selective_scan_fwd_cuda, by seqlen: these 5 launch sizes.
LAUNCH_SIZES = [(32, 4), (32, 8), (32, 16), (64, 16), (128, 16)]
TYPES = {"fp32": "float", "bf16": "at::BFloat16"}


def with_bwd() -> bool:
    return os.environ.get("CM_BENCH_MAMBA_BWD", "1") != "0"


def nvcc_flags_from_setup():
    """The nvcc flags of mamba 2.3.2's setup.py (CUDA branch), with the gencode list cut to sm_90."""
    return ["-O3", "-std=c++17",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
            "--ptxas-options=-v", "-lineinfo",
            "-gencode", "arch=compute_90,code=sm_90",
            "--threads", "4"]


def find_sdist(repo_root):
    env = os.environ.get("CM_BENCH_MAMBA_SDIST")
    if env:
        return env
    hits = sorted(glob.glob(os.path.join(repo_root, ".carry", "mamba_ssm-*.tar.gz")))
    return hits[-1] if hits else None


def extract(sdist, work):
    """Extract the sdist under `work` once; return its csrc/selective_scan directory."""
    os.makedirs(work, exist_ok=True)
    marker = os.path.join(work, ".extracted")
    if not os.path.exists(marker):
        with tarfile.open(sdist) as tf:
            try:
                tf.extractall(work, filter="data")
            except TypeError:  # Python without tarfile filters
                tf.extractall(work)
        open(marker, "w").close()
    hits = glob.glob(os.path.join(work, "*", "csrc", "selective_scan"))
    if not hits:
        raise FileNotFoundError(f"no csrc/selective_scan in {sdist}")
    return hits[0]


def _launch_decl(nt, ni, t):
    return f"void selective_scan_fwd_launch<{nt}, {ni}, {t}, float>(SSMParamsBase &, cudaStream_t)"


def generate_sources(src_dir, gen_dir, bwd=None):
    """Write our instantiation units and stubs; return the list of sources to compile."""
    bwd = with_bwd() if bwd is None else bwd
    os.makedirs(gen_dir, exist_ok=True)
    sources = [os.path.join(src_dir, "selective_scan.cpp")]
    if bwd:   # mamba's own units: selective_scan_bwd_cuda<float|BFloat16, float>
        sources += [os.path.join(src_dir, f"selective_scan_bwd_{k}_real.cu") for k in TYPES]

    def write(name, text):
        path = os.path.join(gen_dir, name)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:  # keep mtimes stable so that a rebuild in the same /tmp is a no-op
            with open(path, "w") as f:
                f.write(text)
        sources.append(path)

    inc = '#include "selective_scan_fwd_kernel.cuh"\n'
    for key, t in TYPES.items():
        for nt, ni in LAUNCH_SIZES:
            write(f"fwd_{key}_{nt}x{ni}.cu", inc + f"template {_launch_decl(nt, ni, t)};\n")
    lines = [inc, "// the kernels are instantiated in the fwd_<type>_<size>.cu units\n"]
    for t in TYPES.values():
        lines += [f"extern template {_launch_decl(nt, ni, t)};\n" for nt, ni in LAUNCH_SIZES]
    for t in TYPES.values():
        lines.append(f"template void selective_scan_fwd_cuda<{t}, float>(SSMParamsBase &, cudaStream_t);\n")
    write("fwd_dispatch.cu", "".join(lines))

    stub = ["#include <cstdint>\n#include <stdexcept>\n#include <cuda_runtime_api.h>\n",
            "#include <c10/util/BFloat16.h>\n#include <c10/util/Half.h>\n#include <c10/util/complex.h>\n",
            '#include "selective_scan.h"\n\n',
            "// Instances referenced by selective_scan.cpp that the benchmark does not build.\n",
            "template <typename input_t, typename weight_t> void selective_scan_fwd_cuda(SSMParamsBase &, cudaStream_t);\n",
            "template <typename input_t, typename weight_t> void selective_scan_bwd_cuda(SSMParamsBwd &, cudaStream_t);\n",
            "#define CM_STUB(FN, P, I, W) template <> void FN<I, W>(P &, cudaStream_t) { "
            "throw std::runtime_error(#FN \"<\" #I \", \" #W \"> is not built by the cm-deploy benchmark\"); }\n"]
    inputs = ["float", "at::Half", "at::BFloat16"]
    weights = ["float", "c10::complex<float>"]
    for i in inputs:
        for w in weights:
            if not (w == "float" and i in TYPES.values()):
                stub.append(f"CM_STUB(selective_scan_fwd_cuda, SSMParamsBase, {i}, {w})\n")
            if not (bwd and w == "float" and i in TYPES.values()):
                stub.append(f"CM_STUB(selective_scan_bwd_cuda, SSMParamsBwd, {i}, {w})\n")
    write("stubs.cpp", "".join(stub))
    return sources


def build(repo_root, work="/tmp/cm_bench_mamba", verbose=True):
    """Extract, generate and build; return (module, info dict). Raises on failure."""
    import torch
    from torch.utils import cpp_extension

    t0 = time.time()
    sdist = find_sdist(repo_root)
    if not sdist or not os.path.exists(sdist):
        raise FileNotFoundError("mamba-ssm sdist not found (.carry/mamba_ssm-*.tar.gz or $CM_BENCH_MAMBA_SDIST)")
    src_dir = extract(sdist, os.path.join(work, "src"))
    sources = generate_sources(src_dir, os.path.join(work, "gen"))
    build_dir = os.path.join(work, "build")
    os.makedirs(build_dir, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "16")
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    mod = cpp_extension.load(
        name=EXT_NAME, sources=sources, build_directory=build_dir,
        extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=nvcc_flags_from_setup(),
        extra_include_paths=[src_dir], verbose=verbose)
    info = {"sdist": os.path.basename(sdist), "build_s": round(time.time() - t0, 1), "backward": with_bwd(),
            "sources": [os.path.relpath(s, work) for s in sources],
            "nvcc_flags": nvcc_flags_from_setup(), "torch": torch.__version__}
    return mod, info


def load_built(work="/tmp/cm_bench_mamba"):
    """Import the module that a `build` in another process left in `work`/build."""
    importlib.import_module("torch")   # the extension links against torch's libraries: load them first
    path = os.path.join(work, "build", EXT_NAME + ".so")
    spec = importlib.util.spec_from_file_location(EXT_NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def start_background_build(repo_root, log_path, work="/tmp/cm_bench_mamba", timeout_s=None):
    """Run the build in a child process (so the parent's GPU timing is not disturbed by the GIL and
    a crash of the compiler cannot take the benchmark down). Returns the Popen."""
    if timeout_s is None:   # the backward units are mamba's slowest to compile
        timeout_s = 900 if with_bwd() else 420
    cmd = [sys.executable, os.path.abspath(__file__), "--build", repo_root, work]
    env = dict(os.environ)
    env.setdefault("MAX_JOBS", "16")
    return common.start_logged(cmd, log_path, env=env, timeout_s=timeout_s)


def wait_background_build(p, work="/tmp/cm_bench_mamba", deadline_s=None, load=True):
    """Wait for the child build; return (module or None, info dict). With load=False only wait and
    report (the caller's process need not import torch)."""
    remaining = p._cm_timeout - (time.time() - p._cm_t0)
    if deadline_s is not None:
        remaining = min(remaining, deadline_s)
    info, log_text = common.wait_logged(p, remaining, "build")
    if "error" in info:
        if log_text:
            info["log_tail"] = log_text[-3000:]
        return None, info
    if not load:
        return None, info
    try:
        return load_built(work), info
    except Exception as e:  # noqa: BLE001
        info["error"] = f"import failed: {type(e).__name__}: {e}"
        return None, info


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--build":
        t0 = time.time()
        _, inf = build(sys.argv[2], sys.argv[3])
        print(f"[mamba_peer] built in {time.time() - t0:.1f} s: {inf}", flush=True)
    elif len(sys.argv) >= 4 and sys.argv[1] == "--generate":
        d = extract(find_sdist(sys.argv[2]), os.path.join(sys.argv[3], "src"))
        print("\n".join(generate_sources(d, os.path.join(sys.argv[3], "gen"))))
    else:
        print("usage: mamba_peer.py --build REPO_ROOT WORK_DIR | --generate REPO_ROOT WORK_DIR")
        sys.exit(2)
