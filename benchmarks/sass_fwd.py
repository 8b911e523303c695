"""Static check of the forward kernels for sm_90, on a CPU machine (no GPU needed). Not a timing.

Triton: registers, stack (spills), SASS size and MUFU (special-function) instructions of
`_fwd_kernel` as the GPU plan launches it at the paper shape (M 3, N 64; float32 BLOCK_E 2, 16-bit
BLOCK_E 4; 64-step chunks; one warp), for the full delta and for the inference path's rank-R delta
(Triton bundles ptxas and cuobjdump). CUDA (plugins/coupled_scan_kernel, when nvcc is on PATH): the
block kernel at the paper's M = 3, N = 64 instances: registers, stack, and
the innermost loop that holds the exps (instructions, exps, instructions per exp, loads). Registers
decide how many warps an SM holds; instructions per exp against the exp unit's 1/8 issue rate tell
whether the loop can reach the exp-unit limit: an sm_90 scheduler issues one warp instruction a
cycle and gets one warp's exp2 every 8 cycles (16 lanes a cycle an SM, 4 schedulers), so a loop of I
instructions per exp2 reaches at most min(1, 8 / I) of that limit ("issue bound"). Replacing part
of the exp2s by a polynomial on the FMA pipes only helps below 8 instructions per exp2.

    python benchmarks/sass_fwd.py [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from common import emit_text


def compile_fwd(act: str, dt_rank: int, summary: bool = False, maxnreg: int = 0, **variant):
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
                PF_BC=True, FOLD=True, YP=1, N_C=64, DT_RANK=dt_rank, CVT_ASM=False, UNROLL=1)
    meta.update(variant)
    # as the JIT specialises at 64 x 500: pointers and the ints that are multiples of 16 (E, N and
    # every stride) get tt.divisibility 16 (vector loads), ints equal to 1 become constants
    ones = {"n_seg": 1, "chunk": 1, "n_ck": 1}
    sig, const, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in ptr_types:
            sig[n] = "*" + ptr_types[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in meta or n in ones:
            sig[n] = "constexpr"
            const[(i,)] = meta.get(n, ones.get(n))
        elif n in ("kappa", "log2_kappa"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n not in ("L", "seg_len"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=k, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=1, **({"maxnreg": maxnreg} if maxnreg else {})))


def stats(compiled, exps_per_step=0) -> dict:
    import triton.backends.nvidia as nv
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,5}\*/", ln)]
    get = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", res)) else None  # noqa: E731
    out = {"registers": get("REG"), "stack_bytes": get("STACK"), "sass_instructions": len(lines),
           "mufu": sum("MUFU" in ln for ln in lines)}
    if exps_per_step:
        loop = _inner_loop(lines, exps_per_step)
        if loop:
            out["step_loop"] = f"{loop[0]} instructions / {loop[1]} exp2 = {loop[0] / loop[1]:.2f} per exp2"
    return out


CUDA_INSTANCES = [  # (label, kernel template instance, exps per innermost loop iteration)
    ("block kernel, bf16, 8 states a consumer thread", "coupledScanKernel<__nv_bfloat16, 8, 4, false>", 24),
    ("block kernel, fp32, 8 states a consumer thread", "coupledScanKernel<float, 8, 4, false>", 24),
]


def _inner_loop(sass_lines, min_ex2):
    """The smallest backward-branch loop with at least min_ex2 MUFU.EX2: (instructions, ex2, LDG)."""
    addr = []
    for ln in sass_lines:
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*)", ln)
        addr.append((int(m.group(1), 16), m.group(2)))
    idx = {a: i for i, (a, _) in enumerate(addr)}
    best = None
    for i, (a, ins) in enumerate(addr):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|)\s*0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in idx:
            body = addr[idx[int(m.group(1), 16)]:i + 1]
            ex2 = sum("MUFU.EX2" in x for _, x in body)
            if ex2 >= min_ex2 and (best is None or len(body) < len(best)):
                best = body
    if best is None:
        return None
    return len(best), sum("MUFU.EX2" in x for _, x in best), sum("LDG" in x for _, x in best)


def cuda_rows():
    import shutil
    import triton.backends.nvidia as nv
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return ["(CUDA kernels skipped: no nvcc)"]
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    inc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "plugins", "coupled_scan_kernel")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "inst.cu")
        with open(src, "w") as f:
            f.write('#include "scan_kernel.cuh"\nusing namespace cm_deploy::scan;\n')
            for _, inst, _ in CUDA_INSTANCES:
                f.write(f"template __global__ void cm_deploy::scan::{inst}(ScanArgs, ScanGeometry);\n")
        cubin = os.path.join(d, "inst.cubin")
        subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-cubin", "-I", inc, "-o", cubin, src],
                       check=True, capture_output=True)
        res = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run(f"{tool} -sass {cubin} | c++filt", shell=True, capture_output=True, text=True).stdout
    funcs = re.split(r"\n\s*Function : ", sass)
    mangled = re.findall(r"Function ([^:]+):\n[^\n]*REG:(\d+) STACK:(\d+)", res)
    demangled = [(subprocess.run(["c++filt", fn], capture_output=True, text=True).stdout, int(r), int(st))
                 for fn, r, st in mangled]
    for label, inst, min_ex2 in CUDA_INSTANCES:
        body = next((f for f in funcs if inst + "(" in f.split("\n")[0]), None)
        regs, stack = next(((r, st) for dem, r, st in demangled if inst + "(" in dem), (None, None))
        loop = _inner_loop([ln for ln in (body or "").splitlines() if re.match(r"\s+/\*[0-9a-f]{4,5}\*/", ln)], min_ex2)
        txt = "loop not found" if loop is None else (f"inner loop {loop[0]} instructions, {loop[1]} exp2 "
                                                    f"({loop[0] / loop[1]:.1f} per exp2, issue bound "
                                                    f"{min(1.0, 8 * loop[1] / loop[0]):.0%} of the exp-unit "
                                                    f"limit), {loop[2]} global loads")
        rows.append(f"{label:48s} registers {regs}  stack_bytes {stack}  {txt}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    import triton
    rows = [f"# benchmarks/sass_fwd.py: _fwd_kernel compiled for sm_90 on the CPU (Triton {triton.__version__}; "
            "the GPU machine's Triton may allocate differently: compare rows of one run)"]
    for act in ("fp32", "bf16"):
        for rank in (0, 8):
            # step loop: 3 modalities x the states a thread holds (4 at float32, 8 at bf16)
            s = stats(compile_fwd(act, rank), 3 * (4 if act == "fp32" else 8))
            rows.append(f"{act:5s} {'full delta' if rank == 0 else f'rank-{rank} delta':13s} "
                        + "  ".join(f"{k} {v}" for k, v in s.items()))
    # the tuning keys of issue 20's round 4 (triton_scan.tuning), full delta: (label, act, variant, maxnreg)
    for label, act, variant, reg in (("bf16 cvt_asm", "bf16", dict(CVT_ASM=True), 0),
                                     ("bf16 cvt_asm unroll 2", "bf16", dict(CVT_ASM=True, UNROLL=2), 0),
                                     ("bf16 maxnreg 168", "bf16", {}, 168),
                                     ("fp32 unroll 2", "fp32", dict(UNROLL=2), 0)):
        n = 3 * (4 if act == "fp32" else 8) * variant.get("UNROLL", 1)
        s = stats(compile_fwd(act, 0, maxnreg=reg, **variant), n)
        rows.append(f"{label:24s} " + "  ".join(f"{k} {v}" for k, v in s.items()))
    rows.append("# CUDA kernels (plugins/coupled_scan_kernel) compiled by nvcc for sm_90; the block kernel's loop is its "
                "consumers' (its producers load and gate on the same schedulers; capacity 4 modalities, so at M = 3 a "
                "quarter of the loop's exp2 are skipped). Issue bound: a model, not a measurement")
    rows += cuda_rows()
    emit_text("\n".join(rows), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
