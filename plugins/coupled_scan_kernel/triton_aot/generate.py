"""Ahead-of-time build of the Triton forward (cm_deploy/ops/triton_scan.py) for the native libraries.

Compiles `_fwd_kernel` (inference form: full delta, no checkpoints; the scan proper and the SUMMARY
pass of segmented launches) and `_fwd_combine_kernel` with `triton.compile` for each GPU target,
packs each specialization's cubins into one fatbinary (the CUDA runtime picks the image matching the
device), and writes C++ sources that embed them:

    OUT/triton_aot_specs.cpp   the table of specializations (plain data: the CPU build and tests use it)
    OUT/triton_aot_blobs.cpp   the fatbinaries, embedded with the assembler's .incbin (a byte array of
                               ~15 MB as C source would take the compiler minutes), one per table row
    OUT/manifest.json          what was compiled, for tests and reports
    OUT/fatbin/*.fatbin, OUT/cubin/*.cubin

The launch parameters per specialization are the ones `_plan` chooses for inference on a GPU (block
sizes, warps, chunk length, flags): they are read from `_plan` itself, so a change of the planner is
followed here; the C++ port of the planner (triton_plan.cpp) is checked against `_plan` by
tests/test_triton_aot.py. Flags the CoupledScan contract fixes are compiled in: D, z and delta_bias
are required inputs (HAS_D, HAS_Z, HAS_BIAS on), coupling_scale > 0 (FOLD on); the initial state is
always passed (zeros when the node has none: HAS_C0 on), so SOFTPLUS and SUMMARY are the only flags
that double the count.

    python generate.py --out DIR [--archs 80,90] [--modalities 1,2,3,4] [--states 16,32,64,128]
                       [--dtypes f32,f16,bf16] [--jobs N] [--fatbinary PATH] [--list]

Exit status 0; 2 with one line on stderr when Triton (or fatbinary) is missing or a kernel's ABI is
not the one the C++ launcher passes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

DTYPES = {"f32": ("fp32", 4, 0), "f16": ("fp16", 2, 1), "bf16": ("bf16", 2, 2)}  # triton type, bytes, ActType
# The non-constexpr parameters the C++ launcher (triton_launch.cpp) passes, in order. A kernel whose
# runtime parameters differ is refused here rather than launched with a wrong argument list.
FWD_PARAMS = ("u_ptr dl_ptr A_ptr B_ptr C_ptr D_ptr z_ptr bias_ptr W_ptr y_ptr c0_ptr ckpt_ptr final_ptr scr_ptr "
              "L E N seg_len n_seg chunk n_ck kappa log2_kappa "
              "su0 su1 su2 sd0 sd1 sd2 sz0 sz1 sz2 sb0 sb1 sb2 sc0 sc1 sc2 sy0 sy1 sy2").split()
COMBINE_PARAMS = "P_ptr S_ptr c0_ptr start_ptr EN n_seg".split()
COMBINE_WARPS = 4                        # as _forward launches it
COMBINE_NSEG = [1 << k for k in range(10)]   # summaries a combine takes: 1 .. 512 (more: the CUDA kernel)
# Divisible by 16 at every call the launcher makes (it checks E % 16 == 0, N is a multiple of 16 and
# every pointer 16-byte aligned before choosing a Triton kernel): the same hints Triton's JIT derives
# from such arguments, so loads vectorise as in Python.
ALIGNED_INTS = {"E", "N", "EN"} | {f"s{k}{i}" for k in "udzbcy" for i in range(3)}


@dataclass
class Spec:
    kind: str          # "fwd" (the scan), "summary" (segment pass), "combine"
    act: str           # f32 / f16 / bf16 ("f32" for combine: it touches float32 states only)
    M: int = 0
    N: int = 0
    block_e: int = 0
    block_n: int = 0
    T: int = 0
    num_warps: int = 1
    yp: int = 1
    softplus: bool = False
    has_c0: bool = False
    fast_exp: bool = True
    pf_bc: bool = True
    maxnreg: int = 0
    cvt_asm: bool = True   # bfloat16 B/C widened by inline PTX (_plan's choice on a GPU)
    unroll: int = 1        # the step loop's compiler unroll

    @property
    def name(self):
        if self.kind == "combine":
            return f"combine_c0{int(self.has_c0)}_s{self.T}"
        return (f"{self.kind}_{self.act}_m{self.M}_n{self.N}_e{self.block_e}_t{self.T}_w{self.num_warps}"
                f"_yp{self.yp}_sp{int(self.softplus)}")


def _scan_module():
    os.environ.pop("TRITON_INTERPRET", None)   # the interpreter's @jit objects cannot be compiled
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # what the JIT does by default (3.6 and 3.9)
    sys.path.insert(0, str(REPO))
    from cm_deploy.ops import triton_scan
    return triton_scan


def gpu_plan(M, N, elem_size, sms=132):
    """_plan's inference choice on a GPU at a long sequence and a wide E (the compiled tile)."""
    import types
    from unittest import mock

    import torch
    ts = _scan_module()
    props = types.SimpleNamespace(multi_processor_count=sms)
    with mock.patch.object(ts, "_interpreting", lambda: False), \
            mock.patch.object(torch.cuda, "get_device_properties", lambda _d: props):
        return ts._plan(1024, M, 4096, 4096, N, torch.device("cuda"), bwd=False, elem_size=elem_size)


def specs(dtypes, modalities, states):
    out = []
    for act in dtypes:
        elem = DTYPES[act][1]
        for M in modalities:
            for N in states:
                p = gpu_plan(M, N, elem)
                base = dict(act=act, M=M, N=N, block_e=p.block_e, block_n=p.block_n, T=p.chunk_t,
                            num_warps=p.num_warps, yp=min(p.y_parts, p.block_n), fast_exp=bool(p.fast_exp),
                            pf_bc=bool(p.pf_bc), maxnreg=int(p.maxnreg or 0), cvt_asm=bool(p.cvt_asm),
                            unroll=int(p.unroll))
                for sp in (False, True):
                    out.append(Spec("fwd", softplus=sp, has_c0=True, **base))
                    out.append(Spec("summary", softplus=sp, has_c0=False, **base))
    # the combine kernel scans all segment summaries at once: one kernel per power of two of them
    # (NSEG, carried in T), BLOCK as _forward picks it for that NSEG
    tiles = [_scan_module()._combine_tile(nseg + 1) for nseg in COMBINE_NSEG]   # (NSEG, BLOCK) as _forward's
    out += [Spec("combine", "f32", has_c0=c0, T=nseg, block_e=block, num_warps=COMBINE_WARPS)
            for c0 in (False, True) for nseg, block in tiles]
    return out


def _ast_source(spec: Spec):
    from triton.compiler import ASTSource
    ts = _scan_module()
    ty = DTYPES[spec.act][0]
    if spec.kind == "combine":
        fn = ts._fwd_combine_kernel
        runtime = COMBINE_PARAMS
        meta = dict(HAS_C0=spec.has_c0, BLOCK=spec.block_e, NSEG=spec.T)
        ptr_types = {}
    else:
        fn = ts._fwd_kernel
        runtime = FWD_PARAMS
        summary = spec.kind == "summary"
        meta = dict(M=spec.M, BLOCK_E=spec.block_e, BLOCK_N=spec.block_n, T=spec.T, SOFTPLUS=spec.softplus,
                    HAS_D=not summary, HAS_Z=not summary, HAS_BIAS=True, HAS_C0=spec.has_c0, SAVE_CKPT=False,
                    SUMMARY=summary, FAST_EXP=spec.fast_exp, PF_BC=spec.pf_bc, FOLD=True, YP=spec.yp,
                    N_C=spec.N, DT_RANK=0, CVT_ASM=spec.cvt_asm and spec.fast_exp, UNROLL=spec.unroll)
        ptr_types = {n: ty for n in ("u_ptr", "dl_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr")}
    names = list(fn.arg_names)
    got = [n for n in names if n not in meta]
    if got != list(runtime) or set(meta) - set(names):
        raise AbiError(f"{fn.__name__}: runtime parameters {got} (constexprs {sorted(set(names) - set(got))}) "
                       f"are not the ones the C++ launcher passes: {list(runtime)}; update FWD_PARAMS/COMBINE_PARAMS "
                       "and plugins/coupled_scan_kernel/triton_launch.cpp together")
    sig, const, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in meta:
            sig[n] = "constexpr"
            const[(i,)] = meta[n]
        elif n.endswith("_ptr"):
            sig[n] = "*" + ptr_types.get(n, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in ("kappa", "log2_kappa"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), sig


class AbiError(RuntimeError):
    pass


_PTX_TYPE = {"ptr": ".u64", "i32": ".u32", "fp32": ".f32"}


def _check_abi(ptx: str, sig: dict) -> int:
    """The kernel's .entry parameters against the runtime signature; returns how many pointer
    parameters Triton appended (global and profile scratch, passed as null)."""
    m = re.search(r"\.entry\s+\S+\s*\((.*?)\)", ptx, re.S)
    if m is None:
        raise AbiError("no .entry in the PTX")
    params = [p.strip() for p in m.group(1).split(",") if p.strip()]
    kinds = [".u64" if ".u64" in p else (".u32" if ".u32" in p else (".f32" if ".f32" in p else p)) for p in params]
    want = [_PTX_TYPE["ptr" if t.startswith("*") else t] for t in sig.values() if t != "constexpr"]
    extra = kinds[len(want):]
    if kinds[:len(want)] != want or any(k != ".u64" for k in extra) or len(extra) > 4:
        raise AbiError(f"PTX parameters {kinds} do not start with the expected {want} plus null pointers")
    return len(extra)


def compile_one(spec: Spec, archs, out: Path, fatbinary: str):
    import triton
    from triton.backends.compiler import GPUTarget
    src, sig = _ast_source(spec)
    opts = {"num_warps": spec.num_warps}
    if spec.maxnreg:
        opts["maxnreg"] = spec.maxnreg
    images, info = [], {}
    for cc in archs:
        c = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
        md = c.metadata
        for field in ("global_scratch_size", "profile_scratch_size"):
            if getattr(md, field, 0):
                raise AbiError(f"{spec.name} sm_{cc}: {field} = {getattr(md, field)}; the launcher passes null scratch")
        extra = _check_abi(c.asm["ptx"], sig)
        target = re.search(r"\.target\s+(sm_\w+)", c.asm["ptx"]).group(1)
        cubin = out / "cubin" / f"{spec.name}.{target}.cubin"
        _write(cubin, c.asm["cubin"])
        images.append(f"--image3=kind=elf,sm={target[3:]},file={cubin}")
        info[target] = dict(shared=int(md.shared), extra_ptrs=extra, kernel=md.name, num_warps=int(md.num_warps))
    shared = {v["shared"] for v in info.values()}
    extras = {v["extra_ptrs"] for v in info.values()}
    names = {v["kernel"] for v in info.values()}
    if len(extras) != 1 or len(names) != 1:
        raise AbiError(f"{spec.name}: the targets disagree on the ABI: {info}")
    fatbin = out / "fatbin" / f"{spec.name}.fatbin"
    tmp = fatbin.with_suffix(".tmp")
    fatbin.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([fatbinary, f"--create={tmp}", "--64", "--compress-all", *images], check=True,
                   capture_output=True)
    _replace(tmp, fatbin)
    extra = extras.pop()
    return dict(spec=asdict(spec), name=spec.name, shared=max(shared), extra_ptrs=extra,
                params=sum(t != "constexpr" for t in sig.values()) + extra,
                kernel=names.pop(), targets=info, fatbin=str(fatbin), bytes=fatbin.stat().st_size)


def _write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _replace(tmp: Path, path: Path):
    if path.is_file() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
    else:
        tmp.replace(path)


def _worker(args):
    spec, archs, out, fatbinary = args
    return compile_one(spec, archs, Path(out), fatbinary)


KIND = {"fwd": 0, "summary": 1, "combine": 2}


def cpp_specs(rows, archs, version, digest) -> str:
    lines = [
        "// Generated by plugins/coupled_scan_kernel/triton_aot/generate.py: do not edit.",
        f"// Triton {version}; targets {', '.join(f'sm_{a}' for a in archs)}; sources {digest}.",
        '#include "triton_aot.h"',
        "namespace cm_deploy { namespace scan {",
        "extern TritonAotSpec const kTritonAotSpecs[] = {",
        "    // kind, act, M, N, blockE, blockN, T, numWarps, yParts, softplus, hasC0, fastExp, pfBc, shared, extraPtrs, "
        "archs, params",
    ]
    mask = sum(1 << i for i, _ in enumerate(archs))
    for r in rows:
        s = r["spec"]
        lines.append(
            f"    {{{KIND[s['kind']]}, {DTYPES[s['act']][2]}, {s['M']}, {s['N']}, {s['block_e']}, {s['block_n']}, "
            f"{s['T']}, {s['num_warps']}, {s['yp']}, {int(s['softplus'])}, {int(s['has_c0'])}, "
            f"{int(s['fast_exp'])}, {int(s['pf_bc'])}, {r['shared']}u, {r['extra_ptrs']}, {mask}u, {r['params']}}}, "
            f"// {r['name']}")
    lines += [
        "};",
        f"extern int32_t const kTritonAotSpecCount = {len(rows)};",
        "extern int32_t const kTritonAotArchs[] = {" + ", ".join(str(a) for a in archs) + "};",
        f"extern int32_t const kTritonAotArchCount = {len(archs)};",
        f'extern char const* const kTritonAotBuildInfo = "Triton {version}, {len(rows)} kernels for '
        + ", ".join(f"sm_{a}" for a in archs) + '";',
        "} } // namespace cm_deploy::scan",
        "",
    ]
    return "\n".join(lines)


def cpp_blobs(rows) -> str:
    # .incbin: the assembler copies each file into .rodata (16-byte aligned, as the CUDA runtime
    # wants an image); hidden symbols so neither library exports them.
    lines = ["// Generated by plugins/coupled_scan_kernel/triton_aot/generate.py: do not edit.",
             '#include "triton_aot.h"', "", "__asm__("]
    for i, r in enumerate(rows):
        path = Path(r["fatbin"]).resolve().as_posix().replace('"', '\\"')
        digest = hashlib.sha256(Path(r["fatbin"]).read_bytes()).hexdigest()[:16]
        lines += [f'    ".section .rodata.cm_triton_aot,\\"a\\",@progbits\\n"  // {r["name"]} {digest}',
                  '    ".balign 16\\n"',
                  f'    ".hidden cm_triton_aot_{i}\\n"', f'    ".globl cm_triton_aot_{i}\\n"',
                  f'    "cm_triton_aot_{i}:\\n"', f'    ".incbin \\"{path}\\"\\n"',
                  f'    ".hidden cm_triton_aot_{i}_end\\n"', f'    ".globl cm_triton_aot_{i}_end\\n"',
                  f'    "cm_triton_aot_{i}_end:\\n"']
    lines += ['    ".text\\n");', ""]
    lines.append('extern "C" {')
    for i in range(len(rows)):
        lines.append(f"extern unsigned char const cm_triton_aot_{i}[], cm_triton_aot_{i}_end[];")
    lines += ["}", "", "namespace cm_deploy { namespace scan {",
              "extern TritonAotBlob const kTritonAotBlobs[] = {"]
    for i, r in enumerate(rows):
        lines.append(f'    {{cm_triton_aot_{i}, cm_triton_aot_{i}_end, "{r["kernel"]}"}},')
    if not rows:
        lines.append("    {nullptr, nullptr, nullptr},")
    lines += ["};", "} } // namespace cm_deploy::scan", ""]
    return "\n".join(lines)


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--archs", default="80,90", help="compute capabilities (sm_80 cubins also run on 86/87/89)")
    ap.add_argument("--modalities", default="1,2,3,4")
    ap.add_argument("--states", default="16,32,64,128")
    ap.add_argument("--dtypes", default="f32,f16,bf16")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--fatbinary", default=shutil.which("fatbinary") or "/usr/local/cuda/bin/fatbinary")
    ap.add_argument("--list", action="store_true", help="print the specializations and exit (no compiling)")
    a = ap.parse_args(argv)
    try:
        archs = sorted(set(_ints(a.archs)))
        dtypes = [d for d in a.dtypes.split(",") if d]
        bad = [d for d in dtypes if d not in DTYPES] + [str(c) for c in archs if c < 80]
        states = _ints(a.states)
        bad += [f"N={n}" for n in states if n < 16 or n % 16 or n & (n - 1) or n > 512]
        bad += [f"M={m}" for m in _ints(a.modalities) if not 1 <= m <= 8]
        if bad or not archs:
            print(f"generate.py: unsupported {', '.join(bad) or 'empty --archs'} (dtypes f32/f16/bf16, archs >= 80, "
                  "N a power of two in 16..512, M in 1..8)", file=sys.stderr)
            return 2
        try:
            import triton
        except ImportError as e:
            print(f"generate.py: Triton is not importable ({e})", file=sys.stderr)
            return 2
        todo = specs(dtypes, _ints(a.modalities), states)
        if a.list:
            for s in todo:
                print(s.name)
            return 0
        if not os.path.isfile(a.fatbinary):
            print(f"generate.py: fatbinary not found ({a.fatbinary}); pass --fatbinary", file=sys.stderr)
            return 2
        out = a.out.resolve()
        jobs = max(1, min(a.jobs, len(todo)))
        work = [(s, archs, str(out), a.fatbinary) for s in todo]
        if jobs == 1:
            rows = [_worker(w) for w in work]
        else:
            with ProcessPoolExecutor(jobs) as pool:
                rows = list(pool.map(_worker, work))
    except (AbiError, subprocess.CalledProcessError) as e:
        print(f"generate.py: {e}", file=sys.stderr)
        return 2
    ts = _scan_module()
    digest = hashlib.sha256(Path(ts.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()[:16]
    _write(out / "triton_aot_specs.cpp", cpp_specs(rows, archs, triton.__version__, digest).encode())
    _write(out / "triton_aot_blobs.cpp", cpp_blobs(rows).encode())
    manifest = dict(triton=triton.__version__, archs=archs, sources=digest, kernels=rows,
                    total_bytes=sum(r["bytes"] for r in rows))
    _write(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    print(f"generate.py: {len(rows)} kernels for {', '.join(f'sm_{c}' for c in archs)} "
          f"({manifest['total_bytes'] / 1e6:.1f} MB of fatbinaries) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
