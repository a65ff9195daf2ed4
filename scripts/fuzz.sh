#!/usr/bin/env bash
# Fuzzes the QMP wire parser with libFuzzer for SECONDS (default 60).
# Builds tests/fuzz on its own with clang (-fsanitize=fuzzer,address,undefined) in
# FUZZ_BUILD_DIR (default build-fuzz/), seeds a working corpus there from
# tests/fuzz/corpus/wire, and runs. Extra arguments go to libFuzzer (e.g. -jobs=2).
# Usage: scripts/fuzz.sh [SECONDS] [libFuzzer flags...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
shift || true
build=${FUZZ_BUILD_DIR:-$root/build-fuzz}

command -v clang++ >/dev/null || { echo "fuzz: clang++ is needed for libFuzzer" >&2; exit 1; }
cmake -S "$root/tests/fuzz" -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" --target qmp_wire_fuzzer

corpus=$build/corpus
mkdir -p "$corpus"
cp -n "$root"/tests/fuzz/corpus/wire/* "$corpus"/
"$build/qmp_wire_fuzzer" -max_total_time="$seconds" -max_len=16384 -rss_limit_mb=2048 \
  -artifact_prefix="$build/" -print_final_stats=1 "$@" "$corpus"
echo "fuzz: corpus in $corpus; crashes (if any) in $build/crash-*"
