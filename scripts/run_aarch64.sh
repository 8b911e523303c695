#!/usr/bin/env bash
# Runs an aarch64 Linux program on this x86-64 machine under user-mode QEMU (apt-get install qemu-user),
# as on a Jetson Orin-class CPU: QEMU's Cortex-A76 model (ARMv8.2-A with NEON, as Orin's Cortex-A78AE;
# CM_QEMU_CPU overrides, `qemu-aarch64 -cpu help` lists them), with the cross toolchain's target
# libraries (CM_AARCH64_ROOT, default /usr/aarch64-linux-gnu).
#
#   scripts/run_aarch64.sh build/aarch64/examples/cpp/cm_infer_ort model.onnx --input ... --ort-lib ...
#
# Why the prefix folder (CM_QEMU_PREFIX, default build/qemu-aarch64): QEMU 7.2 (Debian bookworm) shows
# the program the host's x86 /proc/cpuinfo, and ONNX Runtime's CPU detection (cpuinfo) crashes on it
# while libonnxruntime.so loads. QEMU looks up the program's absolute paths in its -L prefix first, so
# the prefix holds the target libraries (a link) and proc/cpuinfo describing the emulated cores as
# Linux on such a CPU would (one entry per possible CPU of this machine). Nothing outside the prefix is changed.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: scripts/run_aarch64.sh PROGRAM [ARGS...]" >&2; exit 2; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
qemu=$(command -v qemu-aarch64 || command -v qemu-aarch64-static || true)
[[ -n "$qemu" ]] || { echo "run_aarch64: qemu-aarch64 not found (apt-get install qemu-user)" >&2; exit 2; }
root=${CM_AARCH64_ROOT:-/usr/aarch64-linux-gnu}
[[ -e "$root/lib/ld-linux-aarch64.so.1" ]] || { echo "run_aarch64: no aarch64 libraries in $root (apt-get install g++-aarch64-linux-gnu)" >&2; exit 2; }
prefix=${CM_QEMU_PREFIX:-$repo/build/qemu-aarch64}

mkdir -p "$prefix/proc"
[[ -L "$prefix/lib" && $(readlink "$prefix/lib") == "$root/lib" ]] || ln -sfn "$root/lib" "$prefix/lib"
# Cortex-A76 (MIDR 0x414fd0b1, what QEMU's model reports); written to a temporary file and renamed,
# so that programs started at the same time never read half a file
last=$(tr ',-' '\n\n' < /sys/devices/system/cpu/possible 2>/dev/null | sort -n | tail -n 1)
[[ -n "$last" ]] || last=$(( $(getconf _NPROCESSORS_CONF) - 1 ))
tmp=$(mktemp "$prefix/proc/.cpuinfo.XXXXXX")
for ((i = 0; i <= last; i++)); do
  printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i"
done > "$tmp"
mv -f "$tmp" "$prefix/proc/cpuinfo"
exec "$qemu" -cpu "${CM_QEMU_CPU:-cortex-a76}" -L "$prefix" "$@"
