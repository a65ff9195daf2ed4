#!/usr/bin/env bash
# The contract in docs/api.yaml, checked by outside tools (two ctest tests, tests/api/CMakeLists.txt):
#
#   run.sh lint              redocly lint docs/api.yaml: 0 errors
#   run.sh dredd QBROKERD    dredd against a live qbrokerd: the test guest booted in a real QEMU,
#                            reached through a loopback TCP bridge (socat), hooks.js setting up
#                            what each documented response needs
#
# The tools are the versions package.json and package-lock.json pin, installed once with npm ci
# into ${QB_NPM_CACHE:-/var/cache/qbroker/npm} and reused while the lock file is unchanged.
# Exit status 77 (ctest's skip): no npm, or for dredd no root, no socat or no test guest.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cache=${QB_NPM_CACHE:-/var/cache/qbroker/npm}
skip() {
  echo "contract: skipped: $*" >&2
  exit 77
}

# The pinned tools, installed when the lock file changed; prints their bin directory.
tools() {
  command -v npm >/dev/null || skip "npm is not installed (scripts/setup.sh installs it)"
  local hash dir
  hash=$(sha256sum "$here/package-lock.json" | cut -c1-16)
  dir=$cache/contract-$hash
  mkdir -p "$cache"
  # One install at a time: the lint and the dredd test start together under ctest -j.
  exec 9>"$cache/.lock"
  flock 9
  if [[ ! -f $dir/.installed ]]; then
    mkdir -p "$dir"
    cp "$here/package.json" "$here/package-lock.json" "$dir/"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error --cache "$cache/cache" >&2)
    touch "$dir/.installed"
  fi
  flock -u 9
  echo "$dir/node_modules/.bin"
}

lint() {
  local bin
  bin=$(tools)
  cd "$root"
  "$bin/redocly" lint --config "$root/redocly.yaml" "$root/docs/api.yaml"
}

# A free loopback TCP port.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

dredd() {
  local qbrokerd=$1
  ((EUID == 0)) || skip "dredd needs root: qbrokerd jails the guest's QEMU and plugs a tap"
  command -v socat >/dev/null || skip "socat is not installed (scripts/setup.sh installs it)"
  local guest=${QB_GUEST_DIR:-/var/cache/qbroker/guest}
  [[ -f $guest/vmlinuz && -f $guest/initramfs.cpio.gz ]] ||
    skip "no test guest in $guest (tests/guest/build.sh builds it)"
  local bin
  bin=$(tools)

  work=$(mktemp -d /tmp/qb-contract.XXXXXX)
  daemon_pid='' bridge_pid=''
  trap 'finish' EXIT
  mkdir -p "$work/images"
  # The images the examples name beneath /srv/{img,iso,state}: hooks.js maps those here.
  truncate -s 1M "$work/images/d1.img"
  truncate -s 1M "$work/images/x.iso"
  local sock=$work/qbroker.sock
  # uids 3107160-3107167: this test's own range, distinct from every other test's.
  "$qbrokerd" --state-dir "$work/state" --run-dir "$work/run" --socket "$sock" \
    --uid-range 3107160:8 --image-root "$guest" --image-root "$work/images" \
    --pool memory_mib=64,count=1 --log-level debug >"$work/qbrokerd.log" 2>&1 &
  daemon_pid=$!
  for ((i = 0; i < 200; i++)); do
    curl -sf --unix-socket "$sock" http://localhost/v1/version >/dev/null && break
    sleep 0.1
  done
  local port
  port=$(free_port)
  socat "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$sock" &
  bridge_pid=$!
  for ((i = 0; i < 100; i++)); do
    curl -sf "http://127.0.0.1:$port/v1/version" >/dev/null && break
    sleep 0.1
  done
  QB_API="http://127.0.0.1:$port" QB_API_YAML=$root/docs/api.yaml QB_GUEST_DIR=$guest \
    QB_IMAGES=$work/images NODE_PATH=$(dirname "$bin") "$bin/dredd" "$root/docs/api.yaml" "http://127.0.0.1:$port" \
    --hookfiles "$here/hooks.js" --language nodejs --loglevel warning
}

# Destroys what the run left, stops the daemon and the bridge, shows the daemon's log on failure.
finish() {
  local status=$?
  if [[ -n $daemon_pid ]]; then
    local sock=$work/qbroker.sock
    for name in $(curl -s --unix-socket "$sock" http://localhost/v1/domains |
      python3 -c 'import json, sys; print(" ".join(d["name"] for d in json.load(sys.stdin)["domains"]))' 2>/dev/null); do
      curl -s --unix-socket "$sock" -X DELETE "http://localhost/v1/domains/$name" >/dev/null || true
    done
    kill -TERM "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
  fi
  if [[ -n $bridge_pid ]]; then
    kill -TERM "$bridge_pid" 2>/dev/null || true
    wait "$bridge_pid" 2>/dev/null || true
  fi
  if ((status != 0)) && [[ -f $work/qbrokerd.log ]]; then
    echo "--- qbrokerd log (last 60 lines)" >&2
    tail -n 60 "$work/qbrokerd.log" >&2
  fi
  rm -rf "$work"
  exit "$status"
}

case ${1:-} in
  lint) lint ;;
  dredd) dredd "${2:?usage: run.sh dredd QBROKERD}" ;;
  *)
    echo "usage: run.sh lint | run.sh dredd QBROKERD" >&2
    exit 2
    ;;
esac
