#!/usr/bin/env bash
# The test command: installs what is missing, builds the test guest and its boot media and the
# project with ASan/UBSan and warnings as errors, then runs the whole suite through ctest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/tests/guest/build.sh"
"$root/tests/guest/build-boot-images.sh"
export BUILD_DIR=${BUILD_DIR:-$root/build-test}
"$root/scripts/build.sh" -DCMAKE_BUILD_TYPE=Debug -DQB_SANITIZE=ON -DQB_WERROR=ON
cd "$BUILD_DIR"
ctest --output-on-failure -j2 --timeout 600 "$@"
