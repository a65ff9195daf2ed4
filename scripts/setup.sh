#!/usr/bin/env bash
# Installs the Debian packages qbroker needs to build, test and run the demo.
# Checks first, so a second run on a ready machine costs well under a second.
set -euo pipefail

packages=(
  g++ cmake ninja-build pkg-config
  libboost1.81-dev libboost-json1.81-dev libboost-url1.81-dev libboost-program-options1.81-dev
  catch2
  libxen-dev libsystemd-dev libyaml-dev libssl-dev openssl
  qemu-system-x86 qemu-utils busybox-static cpio kmod
  ovmf seabios
  syslinux syslinux-common isolinux systemd-boot-efi binutils xorriso mtools dosfstools fdisk
  clang libclang-rt-14-dev
  iproute2 iputils-ping curl procps python3
  socat
  # the manual and the Debian package: tests/api/manual_check.py, tests/package/run.sh
  man-db groff-base dpkg-dev mmdebstrap systemd
  # metrics and qbrokerctl top: tests/api/metrics_test.cpp, top_test.cpp
  prometheus tmux
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
# npm runs the contract tools (tests/api/contract). Debian's nodejs and npm only when there is
# no npm at all: a newer Node.js installed another way (NodeSource) brings its own.
if ! command -v npm >/dev/null; then
  missing+=(nodejs npm)
fi

if ((${#missing[@]})); then
  if ((EUID != 0)); then
    echo "setup: missing packages: ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
