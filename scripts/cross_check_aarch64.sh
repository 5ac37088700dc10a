#!/usr/bin/env bash
# The C++ CPU backend on aarch64 (GH200, Graviton, Apple silicon), proved from an x86-64 machine:
#   1. every csrc/cpu source compiles with the aarch64 cross compiler (x86 intrinsics and target attributes are
#      guarded, so only the portable dot products are built there);
#   2. scripts/cpu_driver.cpp (no Python) is linked statically for aarch64 and run under qemu-aarch64, and built
#      natively and run once per instruction-set path this CPU has (portable, avx2, avx512, avx512-bf16);
#   3. every run must pass the driver's own checks and print the same selections (diff).
# Installs nothing: it needs aarch64-linux-gnu-g++ and qemu-aarch64 on PATH
# (Debian/Ubuntu: apt-get install -y g++-aarch64-linux-gnu qemu-user) and a native g++.
# Environment: CXX (native compiler, default g++), CXX_AARCH64 (default aarch64-linux-gnu-g++), QEMU (default
# qemu-aarch64), OUT (build directory, default build/cross-aarch64).
set -euo pipefail
cd "$(dirname "$0")/.."
CXX="${CXX:-g++}"
CXX_AARCH64="${CXX_AARCH64:-aarch64-linux-gnu-g++}"
QEMU="${QEMU:-qemu-aarch64}"
OUT="${OUT:-build/cross-aarch64}"
for tool in "$CXX" "$CXX_AARCH64" "$QEMU"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "cross_check_aarch64: $tool not found (Debian/Ubuntu: apt-get install -y g++-aarch64-linux-gnu qemu-user)" >&2
    exit 2
  fi
done
rm -rf "$OUT"
mkdir -p "$OUT/aarch64" "$OUT/native"
# The extension's flags (CMakeLists.txt) with OpenMP; no -march: wider instruction sets are chosen at run time.
FLAGS=(-std=gnu++17 -O3 -fno-math-errno -Wall -Wextra -fopenmp -Icsrc)
# GCC 12 flags its own AVX-512 headers (_mm512_undefined_* in reductions) as (maybe-)uninitialized: not our code.
NATIVE_FLAGS=(-Wno-maybe-uninitialized -Wno-uninitialized)

# Compiles $2... with compiler $1 into objects under $OUT/<arch>/, stopping with the compiler's output on an error.
compile() {
  local cxx="$1" arch="$2"
  shift 2
  for src in csrc/cpu/*.cpp scripts/cpu_driver.cpp; do
    "$cxx" "${FLAGS[@]}" "$@" -c "$src" -o "$OUT/$arch/$(basename "${src%.cpp}").o"
  done
}

echo "== aarch64: compiling every CPU source and the driver ($CXX_AARCH64 $("$CXX_AARCH64" -dumpversion))"
compile "$CXX_AARCH64" aarch64
# libgomp's static archive warns that dlopen needs the build's glibc at run time (it is never called here).
"$CXX_AARCH64" -fopenmp -static "$OUT"/aarch64/*.o -o "$OUT/driver-aarch64" 2> "$OUT/link-aarch64.log" ||
  { cat "$OUT/link-aarch64.log" >&2; exit 1; }
echo "== native: the same ($CXX $("$CXX" -dumpversion))"
compile "$CXX" native "${NATIVE_FLAGS[@]}"
"$CXX" -fopenmp "$OUT"/native/*.o -o "$OUT/driver-native"

echo "== running"
"$QEMU" "$OUT/driver-aarch64" > "$OUT/aarch64.txt" ||
  { echo "aarch64 driver failed:" >&2; grep -v ': ok$' "$OUT/aarch64.txt" >&2; exit 1; }
echo "aarch64 under qemu: $(grep -c ': ok$' "$OUT/aarch64.txt") checks and $(grep -c '^rejected' "$OUT/aarch64.txt") rejections passed"
status=0
for isa in $("$OUT/driver-native" --list); do
  "$OUT/driver-native" "$isa" > "$OUT/native-$isa.txt" ||
    { echo "native $isa driver failed:" >&2; grep -v ': ok$' "$OUT/native-$isa.txt" >&2; status=1; continue; }
  if diff -u "$OUT/native-$isa.txt" "$OUT/aarch64.txt" > "$OUT/diff-$isa.txt"; then
    echo "native $isa: checks passed, every selection identical to aarch64's"
  else
    echo "native $isa: selections differ from aarch64's:" >&2
    cat "$OUT/diff-$isa.txt" >&2
    status=1
  fi
done
exit $status
