#!/usr/bin/env bash
# The Debian package end to end (ctest "package: ..."), as a host operator meets it:
#
#   run.sh SOURCE_DIR BUILD_DIR
#
# 1. builds qbroker without sanitizers in BUILD_DIR (ASan would make libasan a dependency) and
#    makes the package with `cpack -G DEB`;
# 2. extracts a fresh Debian bookworm root (minbase, from Debian's mirror with mmdebstrap, the
#    tarball cached in ${QB_DEBROOT_CACHE:-/var/cache/qbroker/debroot}, as are the .debs apt
#    fetches) and installs the package into it with apt, dependencies from the mirror;
# 3. checks the files, the conffile, the units, the group and the enabled socket, runs
#    `qbrokerd --version`, installs the package over itself (as an upgrade does) with an edited
#    configuration, starts qbrokerd through socket activation (systemd-socket-activate
#    standing in for pid 1, with the installed unit's command line) and runs `qbrokerctl list`;
# 4. purges the package and checks that nothing of it is left.
#
# Exit status 77 (ctest's skip): not root, or no mmdebstrap or systemd-socket-activate.
# dpkg-query formats are ${Field}, in single quotes on purpose.
# shellcheck disable=SC2016
set -euo pipefail
src=$1
build=$2
cache=${QB_DEBROOT_CACHE:-/var/cache/qbroker/debroot}
mirror=${QB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${QB_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# qbrokerd's uid range in the root: its own, so that no other test's kill by uid meets it.
uid_range=${QB_PACKAGE_UID_RANGE:-3111500:8}

skip() {
  echo "package: skipped: $*" >&2
  exit 77
}
fail() {
  echo "package: FAILED: $*" >&2
  exit 1
}
step() {
  echo "package: $* ($SECONDS s)"
}

((EUID == 0)) || skip "needs root (a chroot, mounts, apt)"
command -v mmdebstrap >/dev/null || skip "no mmdebstrap (scripts/setup.sh installs it)"
command -v systemd-socket-activate >/dev/null || skip "no systemd-socket-activate (package systemd)"

# ---- 1. The package --------------------------------------------------------------------------
build_package() {
  local launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr \
    -DQB_TESTS=OFF -DQB_BENCH=OFF -DQB_SANITIZE=OFF "${launcher[@]}" >/dev/null
  cmake --build "$build" >/dev/null
  rm -f "$build"/qbroker_*.deb
  (cd "$build" && cpack -G DEB >/dev/null)
  local version
  version=$(sed -n 's/^CMAKE_PROJECT_VERSION:STATIC=//p' "$build/CMakeCache.txt")
  deb=$build/qbroker_${version}_amd64.deb
  [[ -f $deb ]] || fail "cpack made no $deb"
}

# ---- 2. A fresh root -------------------------------------------------------------------------
# The minbase tarball, made once. init-system-helpers (deb-systemd-helper) is on every systemd
# host; minbase alone lacks it.
base_tarball() {
  tarball=$cache/bookworm-minbase.tar
  mkdir -p "$cache/archives/partial" "$cache/lists/partial"
  exec 9>"$cache/.lock"
  flock 9
  if [[ ! -f $tarball ]]; then
    mmdebstrap --quiet --variant=minbase --format=tar --include=init-system-helpers bookworm \
      "$tarball.tmp" "$mirror"
    mv "$tarball.tmp" "$tarball"
  fi
  flock -u 9
}

mounts=()
daemon=
root=
cleanup() {
  if [[ -n $daemon ]]; then
    kill "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
  fi
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount "${mounts[i]}" || umount -l "${mounts[i]}" || true
  done
  [[ -n $root ]] && rm -rf --one-file-system "$root"
}
trap cleanup EXIT

bind() {
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mounts+=("$2")
}

fresh_root() {
  root=$(mktemp -d /var/tmp/qbroker-package.XXXXXX)
  tar -C "$root" -xf "$tarball"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mount -t proc proc "$root/proc"
  mounts+=("$root/proc")
  bind /dev "$root/dev"
  bind /dev/pts "$root/dev/pts"
  # What apt fetched last time, so that a run downloads only what changed on the mirror.
  bind "$cache/archives" "$root/var/cache/apt/archives"
  bind "$cache/lists" "$root/var/lib/apt/lists"
}

in_root() {
  chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"
}

install_package() {
  cp "$deb" "$root/tmp/"
  # The suites a Debian install has: the build host's libraries may come from a point or
  # security update (libxen is one), and the package's Depends ask for at least that version.
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security_mirror bookworm-security main
EOF
  in_root apt-get update -qq
  in_root apt-get install -y -qq --no-install-recommends "/tmp/$(basename "$deb")" >/dev/null
}

# ---- 3. What the package put there -----------------------------------------------------------
expected_files=(
  /usr/sbin/qbrokerd
  /usr/bin/qbrokerctl
  /lib/systemd/system/qbrokerd.service
  /lib/systemd/system/qbrokerd.socket
  /etc/qbroker/qbrokerd.json
  /usr/share/man/man8/qbrokerd.8.gz
  /usr/share/man/man5/qbrokerd.json.5.gz
  /usr/share/man/man1/qbrokerctl.1.gz
  /usr/share/bash-completion/completions/qbrokerctl
  /usr/share/doc/qbroker/api.yaml
  /usr/share/doc/qbroker/api.md
)

check_installed() {
  local f listed
  listed=$(in_root dpkg -L qbroker)
  for f in "${expected_files[@]}"; do
    grep -qx "$f" <<<"$listed" || fail "dpkg -L qbroker does not list $f"
    [[ -f $root$f ]] || fail "$f is not installed"
  done
  [[ -d $root/srv/qbroker ]] || fail "no image root /srv/qbroker"
  in_root dpkg-query -W -f='${Conffiles}\n' qbroker | grep -q '^ /etc/qbroker/qbrokerd.json ' ||
    fail "/etc/qbroker/qbrokerd.json is not a conffile"
  local depends
  depends=$(in_root dpkg-query -W -f='${Depends}' qbroker)
  for d in qemu-system-x86 libc6 libstdc++6; do
    [[ $depends == *"$d"* ]] || fail "Depends lacks $d: $depends"
  done
  [[ $depends != *libasan* ]] || fail "Depends names libasan: a sanitizer build was packaged"
  in_root getent group qbroker >/dev/null || fail "postinst made no group qbroker"
  [[ -L $root/etc/systemd/system/sockets.target.wants/qbrokerd.socket ]] ||
    fail "postinst did not enable qbrokerd.socket"
  in_root qbrokerd --version | grep -qx 'qbrokerd [0-9.]*' || fail "qbrokerd --version"
  in_root test -x "$(exec_start)" || fail "ExecStart names $(exec_start), which is not there"
}

# The package installed over itself, as an upgrade runs: prerm upgrade, then postinst configure
# with the old version. An edited configuration is kept (a conffile), and so are the group and
# the enabled socket.
check_reinstall() {
  local config=$root/etc/qbroker/qbrokerd.json
  sed -i 's/^{$/{\n  "log-level": "debug",/' "$config"
  grep -q '"log-level": "debug"' "$config" || fail "could not edit $config"
  in_root dpkg -i "/tmp/$(basename "$deb")" >/dev/null
  grep -q '"log-level": "debug"' "$config" || fail "the reinstall replaced the edited $config"
  in_root getent group qbroker >/dev/null || fail "the reinstall lost the group qbroker"
  [[ -L $root/etc/systemd/system/sockets.target.wants/qbrokerd.socket ]] ||
    fail "the reinstall disabled qbrokerd.socket"
}

# The installed unit's command line, one word a line.
exec_start() {
  sed -n 's/^ExecStart=//p' "$root/lib/systemd/system/qbrokerd.service" | tr ' ' '\n' | sed '/^$/d' |
    head -n "${1:-1}"
}

# qbrokerd started as qbrokerd.socket starts it: the listening socket is passed (LISTEN_FDS), and
# the command line is the unit's, with this test's own uid range.
check_socket_activation() {
  local listen
  listen=$(sed -n 's/^ListenStream=//p' "$root/lib/systemd/system/qbrokerd.socket")
  [[ $listen == /run/qbroker/qbroker.sock ]] || fail "qbrokerd.socket listens on '$listen'"
  # What systemd makes from the units' RuntimeDirectory= and StateDirectory=.
  install -d -m 0711 "$root/run/qbroker"
  install -d -m 0700 "$root/var/lib/qbroker"
  local -a command
  mapfile -t command < <(exec_start 100)
  systemd-socket-activate -l "$root$listen" \
    chroot "$root" "${command[@]}" --uid-range "$uid_range" >"$root/tmp/qbrokerd.log" 2>&1 &
  daemon=$!
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -S $root$listen ]] && break
    sleep 0.1
  done
  local out
  if ! out=$(in_root qbrokerctl --timeout 30 list 2>&1); then
    cat "$root/tmp/qbrokerd.log" >&2
    fail "qbrokerctl list: $out"
  fi
  [[ $out == "no domains" ]] || fail "qbrokerctl list said: $out"
  grep -q "using the socket passed by systemd" "$root/tmp/qbrokerd.log" ||
    fail "qbrokerd did not take the passed socket: $(cat "$root/tmp/qbrokerd.log")"
  kill -TERM "$daemon"
  wait "$daemon" || fail "qbrokerd did not stop cleanly on SIGTERM: $(cat "$root/tmp/qbrokerd.log")"
  daemon=
}

# ---- 4. Purged: nothing left -----------------------------------------------------------------
check_purged() {
  local files
  files=$(in_root dpkg -L qbroker)
  in_root apt-get purge -y -qq qbroker >/dev/null
  ! in_root dpkg-query -W -f='${Status}\n' qbroker 2>/dev/null | grep -q ' installed$' ||
    fail "qbroker is still installed"
  local f
  while read -r f; do
    [[ -z $f || -d $root$f ]] && continue
    [[ ! -e $root$f && ! -L $root$f ]] || fail "$f is left after the purge"
  done <<<"$files"
  for f in /etc/qbroker /var/lib/qbroker /srv/qbroker /etc/systemd/system/sockets.target.wants/qbrokerd.socket; do
    [[ ! -e $root$f && ! -L $root$f ]] || fail "$f is left after the purge"
  done
  ! in_root getent group qbroker >/dev/null || fail "the group qbroker is left after the purge"
}

step "building the package"
build_package
step "built $(basename "$deb"), $(stat -c %s "$deb") bytes"
base_tarball
fresh_root
step "installing it into a fresh root"
install_package
check_installed
step "installed: files, conffile, depends, group, socket enabled, qbrokerd --version"
check_reinstall
step "reinstalled over itself: the edited conffile, the group and the socket are kept"
check_socket_activation
step "socket activation: qbrokerctl list answered"
check_purged
step "purged: nothing left"
