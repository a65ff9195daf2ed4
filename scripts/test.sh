#!/usr/bin/env bash
# The test command: installs what is missing, builds the test guest and its boot media, unpacks
# the second QEMU (bookworm-backports' 10.0, beside the system's 7.2), builds the project with
# ASan/UBSan and warnings as errors, then runs the whole suite through ctest, and after it every
# [qemu] case again against QEMU 10.0 (label qemu10). The two passes share uid ranges, so they
# run one after the other.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/tests/guest/build.sh"
"$root/tests/guest/build-boot-images.sh"
"$root/tests/guest/second-qemu.sh" >/dev/null
export BUILD_DIR=${BUILD_DIR:-$root/build-test}
"$root/scripts/build.sh" -DCMAKE_BUILD_TYPE=Debug -DQB_SANITIZE=ON -DQB_WERROR=ON
cd "$BUILD_DIR"
ctest --output-on-failure -j2 --timeout 600 --no-tests=ignore -LE qemu10 "$@"
ctest --output-on-failure -j2 --timeout 600 --no-tests=ignore -L qemu10 "$@"
