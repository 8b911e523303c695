"""The CoupledScan CPU kernel built for aarch64 (Jetson-class boards), checked on an x86-64 machine.
Not a timing: under QEMU the time says nothing about a board, so none is reported.

1. Static, as benchmarks/sass_fwd.py does for sm_90: the state loops of
   plugins/coupled_scan_kernel/scan_cpu.cpp in the object file the cross build made
   (scripts/build_aarch64.sh), disassembled with aarch64-linux-gnu-objdump: stepFast (the default:
   polynomial exp, vectorized) and stepExact (CM_DEPLOY_SCAN_CPU_EXACT=1: a libm expf call a state).
   For every loop (a conditional backward branch): its instructions by class (vector FMA, other vector
   arithmetic, vector loads and stores, vector register moves, the same for scalar floating point,
   integer and address, branches, calls), the states one iteration updates (the float32 lanes of its vector floating
   point), and instructions per state. stepFast's last N mod 4 states run in straight scalar code after
   its loop (no loop there, so not listed).
2. Runs: cm_infer_ort under QEMU (scripts/run_aarch64.sh) on a small exported model: model.onnx with the
   op library (both loops) and model.portable.onnx, against the x86 Python runtime (exit status, max
   relative difference).

    python benchmarks/scan_cpu_aarch64.py [--build build/aarch64] [--out FILE]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from common import REPO, emit_text, git_commit

OBJ = "plugins/coupled_scan_kernel/CMakeFiles/coupled_scan_kernel_cpu.dir/scan_cpu.cpp.o"
STEPS = {"stepFast": "default: polynomial exp", "stepExact": "CM_DEPLOY_SCAN_CPU_EXACT=1: libm expf"}
BRANCH = re.compile(r"^(b\.\w+|b|cbn?z|tbn?z)$")          # conditional and plain branches (not bl: calls)
LOOP_BRANCH = re.compile(r"^(b\.\w+|cbn?z|tbn?z)$")      # a loop closes with a conditional backward branch
VEC = re.compile(r"\b[vz]\d+\.(\d*)([bhsd])\b|\bq\d+\b")   # NEON (v) / SVE (z) operands, 128-bit q registers
SCALAR_FP = re.compile(r"\b[hsd]\d+\b")
FMA = ("fmla", "fmls", "fmad", "fmsb", "fmadd", "fmsub", "fnmadd", "fnmsub")


def classify(mnem: str, ops: str) -> str:
    if mnem == "bl" or mnem == "blr":
        return "calls"
    if BRANCH.match(mnem) or mnem == "ret":
        return "branches"
    memory = mnem.startswith(("ld", "st"))
    if VEC.search(ops):
        if memory:
            return "vector loads/stores"
        if mnem in ("mov", "orr") and re.fullmatch(r"v\d+\.16b, v\d+\.16b(, v\d+\.16b)?", ops.strip()):
            return "vector moves"
        return "vector FMA" if mnem in FMA else "vector arithmetic"
    if SCALAR_FP.search(ops):
        return "scalar loads/stores" if memory else "scalar FMA" if mnem in FMA else "scalar FP"
    return "scalar loads/stores" if memory else "integer/address"


def lanes(body) -> int:
    """States one iteration updates: the widest float32 arrangement of its vector arithmetic (1: scalar)."""
    n = [int(m.group(1)) for mnem, ops in body if mnem.startswith("f") and classify(mnem, ops).startswith("vector")
         for m in VEC.finditer(ops) if m.group(2) == "s" and m.group(1)]
    return max(n, default=1)


def disassemble(objdump: str, obj: str) -> dict[str, list[tuple[int, str, str, str]]]:
    """{function: [(address, mnemonic, operands, call target)]} of the step functions."""
    text = subprocess.run([objdump, "-d", "-r", "-C", "--no-show-raw-insn", obj], capture_output=True, text=True,
                          check=True).stdout
    funcs, cur = {}, None
    for ln in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", ln)
        if m:
            name = re.search(r"::(\w+)\(", m.group(1))
            cur = name.group(1) if name and name.group(1) in STEPS else None
            if cur:
                funcs[cur] = []
            continue
        if cur is None:
            continue
        m = re.match(r"^\s+([0-9a-f]+):\s+(\S+)\s*([^/<]*)", ln)
        if m:
            funcs[cur].append((int(m.group(1), 16), m.group(2), m.group(3).strip(), ""))
        elif "R_AARCH64_CALL26" in ln and funcs[cur]:
            a, mn, ops, _ = funcs[cur][-1]
            funcs[cur][-1] = (a, mn, ops, ln.split()[-1])
    return funcs


def loops(ins):
    """Every loop (a conditional backward branch and what it jumps back over):
    [(start, end, [(mnemonic, operands, callee)])]."""
    addr = {a: i for i, (a, *_) in enumerate(ins)}
    found = []
    for i, (a, mnem, ops, _) in enumerate(ins):
        if LOOP_BRANCH.match(mnem):
            t = re.search(r"\b([0-9a-f]+)\s*$", ops.split(",")[-1].strip())
            if t and int(t.group(1), 16) < a and int(t.group(1), 16) in addr:
                j = addr[int(t.group(1), 16)]
                found.append((ins[j][0], a, [(m, o, c) for _, m, o, c in ins[j:i + 1]]))
    return found


def static_rows(objdump: str, obj: str) -> list[str]:
    rows = []
    funcs = disassemble(objdump, obj)
    for fn, what in STEPS.items():
        if fn not in funcs:
            rows.append(f"{fn}: not found in {obj}")
            continue
        for start, end, body in loops(funcs[fn]):
            counts = {}
            for mnem, ops, _ in body:
                k = classify(mnem, ops)
                counts[k] = counts.get(k, 0) + 1
            n = lanes([(m, o) for m, o, _ in body])
            calls = sorted({c for m, _, c in body if c})
            rows.append(f"{fn} ({what}) loop 0x{start:x}-0x{end:x}: {len(body)} instructions, {n} state(s) an "
                        f"iteration, {len(body) / n:.1f} instructions a state update"
                        + (f", calls {', '.join(calls)}" if calls else ""))
            rows.append("    " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))
    return rows


def run_rows(build: str) -> list[str]:
    """cm_infer_ort under QEMU on a small exported model against the x86 Python runtime."""
    import numpy as np
    import torch
    from cm_deploy import CoupledMamba, CoupledMambaConfig, save_checkpoint
    from cm_deploy.export import export_checkpoint
    from cm_deploy.runtime import load
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if qemu is None:
        return ["(runs skipped: qemu-aarch64 is not installed: apt-get install qemu-user)"]
    ort_lib = sorted(glob.glob(os.path.join(build, "onnxruntime", "libonnxruntime.so.*")))
    if not ort_lib:
        return [f"(runs skipped: no aarch64 libonnxruntime.so in {build}/onnxruntime: scripts/build_aarch64.sh)"]
    qemu_version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    rows = [f"# runs: {qemu_version}, -cpu {os.environ.get('CM_QEMU_CPU', 'cortex-a76')} (scripts/run_aarch64.sh), "
            f"{os.path.basename(ort_lib[-1])} (aarch64 wheel); reference: the x86 Python runtime on model.portable.onnx"]
    mods = {"text": 12, "audio": 7, "vision": 5}
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        cfg = CoupledMambaConfig(modalities=mods, d_model=16, n_layers=2, d_state=11, d_conv=3)
        export_checkpoint(save_checkpoint(CoupledMamba(cfg).eval(), os.path.join(d, "m.pt")), os.path.join(d, "out"))
        rng = np.random.default_rng(0)
        x = {n: rng.standard_normal((2, L, f)).astype(np.float32) for (n, f), L in zip(mods.items(), (7, 5, 3))}
        args = []
        for n, v in x.items():
            np.save(os.path.join(d, n + ".npy"), v)
            args += ["--input", f"{n}={os.path.join(d, n + '.npy')}"]
        with load(os.path.join(d, "out", "model.portable.onnx"), device="cpu") as m:
            want = m.run(x)["output"]
        ops = ["--ort-ops", os.path.join(build, "plugins", "ort_coupled_scan", "libcoupled_scan_ort.so")]
        for label, model, extra, exact in (("model.onnx + op library, NEON loop", "model.onnx", ops, "0"),
                                           ("model.onnx + op library, exact loop", "model.onnx", ops, "1"),
                                           ("model.portable.onnx", "model.portable.onnx", [], "0")):
            out = os.path.join(d, "y.npy")
            r = subprocess.run([os.path.join(REPO, "scripts", "run_aarch64.sh"),
                                os.path.join(build, "examples", "cpp", "cm_infer_ort"), os.path.join(d, "out", model),
                                *args, "--ort-lib", ort_lib[-1], "-o", out, *extra], capture_output=True, text=True,
                               env=dict(os.environ, CM_DEPLOY_SCAN_CPU_EXACT=exact), timeout=600)
            if r.returncode != 0:
                rows.append(f"{label:38s} FAILED (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
                continue
            y = np.load(out)
            rows.append(f"{label:38s} runs: exit 0, output {tuple(y.shape)}, max relative difference from x86 "
                        f"{float(np.abs(y - want).max() / np.abs(want).max()):.1e}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=os.path.join(REPO, "build", "aarch64"), help="scripts/build_aarch64.sh's folder")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    obj = os.path.join(a.build, OBJ)
    prefix = os.environ.get("CM_AARCH64_PREFIX", "aarch64-linux-gnu-")
    objdump = shutil.which(prefix + "objdump")
    if not os.path.isfile(obj) or objdump is None:
        print(f"scan_cpu_aarch64: needs {obj} and {prefix}objdump (scripts/build_aarch64.sh {a.build})", file=sys.stderr)
        return 2
    flags = ""
    fm = os.path.join(os.path.dirname(obj), "flags.make")
    if os.path.isfile(fm):
        flags = next((ln.split("=", 1)[1].strip() for ln in open(fm) if ln.startswith("CXX_FLAGS")), "")
    cxx = subprocess.run([prefix + "g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    rows = [f"# benchmarks/scan_cpu_aarch64.py at {git_commit()}: the CPU kernel's state loops for aarch64 ({cxx}; {flags}),",
            "# from the object code (objdump); no timing: QEMU's speed says nothing about a board"]
    rows += static_rows(objdump, obj)
    rows += run_rows(a.build)
    emit_text("\n".join(rows), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
