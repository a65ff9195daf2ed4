#!/usr/bin/env bash
# The kill harness for long runs: builds the test binary as scripts/test.sh does (ASan, UBSan,
# warnings as errors, in BUILD_DIR, default build-test/), then runs api_kill_harness_test for
# ROUNDS rounds (default 500) per run, each run with a seed of its own, and prints a summary with
# the seed and round count that replay any failure.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/kill-harness.sh [--rounds N] [--seed SEED] [--runs K] [--jobs LIST] [--no-build]

Runs the randomized kill harness (tests/api/kill_harness_test.cpp): qbrokerd with a few guest
domains, a random job per round, SIGKILL 0-500 ms into it, restart, audit. A run stops at the
first round whose audit finds an inconsistency and prints how to replay it.

  --rounds N   rounds per run (default $ROUNDS or 500)
  --seed SEED  the first run's seed (default $SEED, or a random one); further runs get new ones
  --runs K     runs one after the other (default $RUNS or 1)
  --jobs LIST  draw only these kinds of job, e.g. cd-insert,cd-eject (default $QB_KILL_JOBS,
               or all: create destroy cd-insert cd-eject disk-add-scsi disk-add-virtio
               disk-remove nic-add nic-remove vnc-set vnc-remove pause resume)
  --no-build   use the binary already in BUILD_DIR
  -h, --help   this text

Environment: BUILD_DIR (default build-test/, as scripts/test.sh), ROUNDS, SEED, RUNS.
Needs root (uids, namespaces, cgroups, taps) and the test guest (tests/guest/build.sh).
Each run's output goes to BUILD_DIR/kill-harness/seed-<seed>.log.

Replay a failure with the line it printed, e.g.
  QB_KILL_SEED=1234 QB_KILL_ROUNDS=17 BUILD_DIR/tests/api/api_kill_harness_test
(with QB_KILL_JOBS=... too when the run drew from some kinds only).
The jobs and kill instants are the same; the timing of each job, and so what a kill interrupts,
may differ.
EOF
}

root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${ROUNDS:-500}
seed=${SEED:-}
runs=${RUNS:-1}
build=1
while [[ $# -gt 0 ]]; do
  case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --jobs) export QB_KILL_JOBS=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "kill-harness.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $(id -u) -ne 0 ]]; then
  # As anyone else the test skips itself, and a skipped run would read as a passed one.
  echo "kill-harness.sh: needs root (the harness runs jailed QEMUs under uids of its own)" >&2
  exit 2
fi

export BUILD_DIR=${BUILD_DIR:-$root/build-test}
if [[ $build -eq 1 ]]; then
  "$root/scripts/setup.sh"
  "$root/tests/guest/build.sh" >/dev/null
  cmake -S "$root" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DQB_SANITIZE=ON \
    -DQB_WERROR=ON >/dev/null
  cmake --build "$BUILD_DIR" --target api_kill_harness_test -j"$(nproc)"
fi
binary=$BUILD_DIR/tests/api/api_kill_harness_test
[[ -x $binary ]] || { echo "kill-harness.sh: no $binary (drop --no-build)" >&2; exit 2; }
logs=$BUILD_DIR/kill-harness
mkdir -p "$logs"

random_seed() { od -An -N8 -tu8 /dev/urandom | tr -d ' '; }

total_rounds=0
failures=()
started=$SECONDS
for ((run = 1; run <= runs; run++)); do
  s=${seed:-$(random_seed)}
  seed=
  log=$logs/seed-$s.log
  echo "== run $run/$runs: seed $s, $rounds rounds${QB_KILL_JOBS:+, jobs $QB_KILL_JOBS} (log: $log)"
  # The progress lines on the terminal, everything in the log; the binary's status decides.
  set +e
  QB_KILL_SEED=$s QB_KILL_ROUNDS=$rounds "$binary" 2>&1 | tee "$log" |
    grep --line-buffered -E '^kill harness: (round [0-9]+/|seed )'
  statuses=("${PIPESTATUS[@]}")
  set -e
  rc=${statuses[0]}
  done_rounds=$(grep -cE '^kill harness: round [0-9]+/[0-9]+: .*; consistent' "$log" || true)
  total_rounds=$((total_rounds + done_rounds))
  if [[ $rc -ne 0 ]]; then
    replay=$(grep -m1 -o '^replay with .*' "$log" || true)
    failures+=("seed $s: ${replay:-exit status $rc, no replay line (see $log)}")
    sed -n '/^kill harness: round [0-9]* of /,/^replay with/p;/^kill harness: after all/,/^replay with/p' "$log"
  fi
done

echo
echo "kill harness summary"
echo "  runs:                $runs"
echo "  consistent rounds:   $total_rounds"
echo "  failed runs:         ${#failures[@]}"
for f in "${failures[@]}"; do echo "    $f"; done
echo "  time:                $((SECONDS - started)) s"
[[ ${#failures[@]} -eq 0 ]]
