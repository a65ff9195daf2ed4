#!/usr/bin/env bash
# Fuzzes one target with libFuzzer for SECONDS (default 60). Targets (docs/fuzzing.md):
#   wire        QMP byte stream: framing, message parsing, id matching (the default)
#   http        HTTP requests: Beast parser with the server's limits, router, error map, render
#   qmp_reply   QMP replies and events: typed reply views, capability detection, event predicates
#   record      domain and uid records as a restarted broker reloads them
#   ctl_render  API replies as qbrokerctl shows them
#   save_file   save files as a restore reads them: preamble, header, trailer, checksum
#   migration   the bodies of POST /v1/migrations and POST /v1/domains/NAME/migrate
#   xenstore    xenstore's wire format (the fake xenstored's decoder) and the broker's xenstore values
# Builds tests/fuzz on its own with clang (-fsanitize=fuzzer,address,undefined) in
# FUZZ_BUILD_DIR (default build-fuzz/), seeds a working corpus there (corpus-TARGET/) from
# tests/fuzz/corpus/TARGET, and runs. Extra arguments go to libFuzzer (e.g. -jobs=2, -runs=N).
# A crash is left in FUZZ_BUILD_DIR as crash-*; add it to tests/fuzz/corpus/TARGET once fixed.
# Usage: scripts/fuzz.sh [TARGET] [SECONDS] [libFuzzer flags...]
#        scripts/fuzz.sh --build-only [TARGET...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
targets=(wire http qmp_reply record ctl_render save_file migration xenstore)

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
}

is_target() {
  local t
  for t in "${targets[@]}"; do [[ $t == "$1" ]] && return 0; done
  return 1
}

binary() {
  if [[ $1 == wire ]]; then echo qmp_wire_fuzzer; else echo "$1_fuzzer"; fi
}

build=${FUZZ_BUILD_DIR:-$root/build-fuzz}

configure_and_build() {
  command -v clang++ >/dev/null || { echo "fuzz: clang++ is needed for libFuzzer" >&2; exit 1; }
  cmake -S "$root/tests/fuzz" -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  local bins=() t
  for t in "$@"; do bins+=("$(binary "$t")"); done
  cmake --build "$build" --target "${bins[@]}"
}

case ${1:-} in
  -h|--help) usage; exit 0 ;;
  --build-only)
    shift
    if [[ $# -eq 0 ]]; then set -- "${targets[@]}"; fi
    for t in "$@"; do is_target "$t" || { echo "fuzz: no target '$t'" >&2; exit 2; }; done
    configure_and_build "$@"
    exit 0
    ;;
esac

target=wire
if [[ $# -gt 0 ]] && ! [[ $1 =~ ^[0-9]+$ ]] && [[ $1 != -* ]]; then
  is_target "$1" || { echo "fuzz: no target '$1' (one of: ${targets[*]})" >&2; exit 2; }
  target=$1
  shift
fi
seconds=${1:-60}
shift || true

configure_and_build "$target"

# The wire target keeps its working corpus where it always has.
corpus=$build/corpus
[[ $target == wire ]] || corpus=$build/corpus-$target
mkdir -p "$corpus"
cp -n "$root"/tests/fuzz/corpus/"$target"/* "$corpus"/
dict=()
case $target in
  http) dict=(-dict="$root/tests/fuzz/http.dict") ;;
  qmp_reply|record|ctl_render|save_file|migration) dict=(-dict="$root/tests/fuzz/json.dict") ;;
esac
# Inputs are kept short so the fuzzer mutates structure, not bulk; the replay in ctest runs the
# full-size seeds (the QEMU schema) whole. A domain or uid record is 1 to 2 KiB. The xenstore
# seeds, the messages the broker's Xen mode sends and reads, are at most 87 bytes, and the
# decoder refuses a payload over 4 096 bytes from the header alone: its inputs are capped at the
# chunk byte, a 16-byte header and a 1 KiB payload. Capped at 4 112 bytes, it ran at 6 000 exec/s
# on streams of thousands of empty messages and words, and covered the same 372 edges. Longer
# inputs only cost time. A -max_len among the extra arguments comes later and wins.
max_len=16384
case $target in
  xenstore) max_len=1041 ;;
  record) max_len=4096 ;;
esac
# ASan records the call stack of every allocation and free in a table, looked up on each one, and
# the JSON targets allocate for every value they parse: the lookups' cache misses took a third to
# a half of their time (perf), more than the targets themselves. Fuzzing runs keep only the
# allocator's own frame. A report still shows the bad access, its stack and the kind of error,
# and detection does not depend on them; for whole allocation and free stacks, run the fuzzer
# binary on the crash file alone (or the replay test). ASAN_OPTIONS from the caller come after
# these and win.
export ASAN_OPTIONS="malloc_context_size=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
"$build/$(binary "$target")" -max_total_time="$seconds" -max_len="$max_len" -rss_limit_mb=2048 \
  -artifact_prefix="$build/" -print_final_stats=1 "${dict[@]}" "$@" "$corpus"
echo "fuzz: corpus in $corpus; crashes (if any) in $build/crash-*"
