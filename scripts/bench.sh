#!/usr/bin/env bash
# The start and stop benchmarks in one run, each against the raw floor it measures itself:
#   lifecycle_bench   jailed start and destroy against raw spawn and kill + reap (machine none),
#                     and a 300-process fork storm killed by uid
#   firmware_bench    create -> running and -> the guest's prompt for SeaBIOS and OVMF from a
#                     disk or a CD and for direct kernel boot, against the same QEMU spawned raw;
#                     then a warm-pool hit against both (docs/pool.md); five create pairs a
#                     round, since a single create's time varies by more than the 10% it is held to
#   parallel_bench    50 creates issued at once against 50 raw spawns issued at once
# Builds an optimized tree in BUILD_DIR (default build-rel/) with the benchmarks. Needs root, the
# test guest and its boot media (scripts/test.sh makes them) and a quiet machine: other load
# shows in both columns, but not always alike.
# Usage: scripts/bench.sh [ROUNDS]   (default 5)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-5}
build=${BUILD_DIR:-$root/build-rel}
((EUID == 0)) || { echo "bench: needs root (the jail, uids, cgroups)" >&2; exit 1; }
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQB_BENCH=ON >/dev/null
cmake --build "$build" --target lifecycle_bench firmware_bench parallel_bench fork_storm >/dev/null
echo "== lifecycle_bench $rounds"
QB_FORK_STORM="$build/tests/broker/fork_storm" "$build/bench/lifecycle_bench" "$rounds"
echo
echo "== firmware_bench --rounds $rounds --creates 5"
"$build/bench/firmware_bench" --rounds "$rounds" --creates 5
echo
echo "== parallel_bench --domains 50 --rounds 3"
"$build/bench/parallel_bench" --domains 50 --rounds 3
