"""Static check of the Triton forward for sm_90, on a CPU machine: registers, stack (spills), SASS
size and MUFU (special-function) instructions of `_fwd_kernel` as the GPU plan launches it at the
paper shape (M 3, N 64; float32 BLOCK_E 2, 16-bit BLOCK_E 4; 64-step chunks; one warp), for the full
delta and for the inference path's rank-R delta. Triton bundles ptxas and cuobjdump, so no GPU is
needed; registers decide how many one-warp programs an SM holds, so a change that raises them is
visible before a GPU run. Not a timing.

    python benchmarks/sass_fwd.py [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def compile_fwd(act: str, dt_rank: int, summary: bool = False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cm_deploy.ops import triton_scan as ts
    k = ts._fwd_kernel
    names = k.arg_names
    ptr_types = {"u_ptr": act, "dl_ptr": act, "A_ptr": "fp32", "B_ptr": act, "C_ptr": act, "D_ptr": "fp32",
                 "z_ptr": act, "bias_ptr": "fp32", "W_ptr": "fp32", "y_ptr": act, "c0_ptr": "fp32",
                 "ckpt_ptr": "fp32", "final_ptr": "fp32", "scr_ptr": "fp32"}
    meta = dict(M=3, BLOCK_E=2 if act == "fp32" else 4, BLOCK_N=64, T=64, SOFTPLUS=True, HAS_D=True,
                HAS_Z=True, HAS_BIAS=True, HAS_C0=False, SAVE_CKPT=False, SUMMARY=summary, FAST_EXP=True,
                PF_BC=True, FOLD=True, YP=1, N_C=64, DT_RANK=dt_rank)
    sig, const = {}, {}
    for n in names:
        if n in ptr_types:
            sig[n] = "*" + ptr_types[n]
        elif n in meta:
            sig[n] = "constexpr"
            const[(names.index(n),)] = meta[n]
        elif n in ("kappa", "log2_kappa"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return triton.compile(ASTSource(fn=k, signature=sig, constexprs=const),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})


def stats(compiled) -> dict:
    import triton.backends.nvidia as nv
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    get = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", res)) else None  # noqa: E731
    return {"registers": get("REG"), "stack_bytes": get("STACK"), "sass_instructions": len(lines),
            "mufu": sum("MUFU" in ln for ln in lines)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    import triton
    rows = [f"# benchmarks/sass_fwd.py: _fwd_kernel compiled for sm_90 on the CPU (Triton {triton.__version__}; "
            "the GPU machine's Triton may allocate differently: compare rows of one run)"]
    for act in ("fp32", "bf16"):
        for rank in (0, 8):
            s = stats(compile_fwd(act, rank))
            rows.append(f"{act:5s} {'full delta' if rank == 0 else f'rank-{rank} delta':13s} "
                        + "  ".join(f"{k} {v}" for k, v in s.items()))
    text = "\n".join(rows) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
