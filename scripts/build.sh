#!/usr/bin/env bash
# Configures and builds qbroker. BUILD_DIR (default build/) and extra CMake flags are
# taken from the environment and the arguments.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
cmake -S "$root" -B "$build" -G Ninja "$@" >/dev/null
cmake --build "$build" -j"$(nproc)"
