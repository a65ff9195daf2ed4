#!/usr/bin/env bash
# Boots the test guest under QEMU (TCG), waits for its ready marker, runs `uname -r` through the
# serial console protocol and checks the answer against the kernel recorded in the stamp.
# Usage: smoke.sh [GUEST_DIR]   (default ${QB_GUEST_DIR:-/var/cache/qbroker/guest}, made by build.sh)
# Environment: QB_GUEST_TIMEOUT (seconds to the ready marker, default 60), QEMU (binary).
set -euo pipefail

dir=${1:-${QB_GUEST_DIR:-/var/cache/qbroker/guest}}
timeout=${QB_GUEST_TIMEOUT:-60}
qemu=${QEMU:-qemu-system-x86_64}

die() { echo "smoke: error: $*" >&2; exit 1; }

for f in vmlinuz initramfs.cpio.gz stamp; do
  [[ -f $dir/$f ]] || die "missing $dir/$f; run tests/guest/build.sh first"
done
kver=$(sed -n 's/^kernel_version=//p' "$dir/stamp")
[[ -n $kver ]] || die "no kernel_version in $dir/stamp"
command -v "$qemu" >/dev/null || die "$qemu not found"
command -v python3 >/dev/null || die "python3 not found"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qbroker-smoke.XXXXXX")
qpid=""
cleanup() {
  if [[ -n $qpid ]] && kill "$qpid" 2>/dev/null; then
    for _ in $(seq 50); do
      kill -0 "$qpid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$qpid" 2>/dev/null || true
  fi
  if [[ -n $qpid ]]; then
    wait "$qpid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

started=$EPOCHREALTIME
"$qemu" -machine q35 -accel tcg -m 128 -nodefaults -no-user-config -display none -no-reboot \
  -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet panic=-1 cryptomgr.notests" \
  -chardev "socket,id=ser0,path=$tmp/serial,server=on,wait=off,logfile=$tmp/serial.log" \
  -serial chardev:ser0 \
  -device pcie-root-port,id=rp1,chassis=1,bus=pcie.0 \
  </dev/null >"$tmp/qemu.log" 2>&1 &
qpid=$!

if ! python3 - "$tmp/serial" "$qpid" "$started" "$timeout" "$kver" <<'EOF'; then
import os
import re
import socket
import sys
import time

path, pid, started, timeout, kver = sys.argv[1:6]
pid, started, timeout = int(pid), float(started), float(timeout)
deadline = started + timeout
buf = b""


def fail(msg):
    tail = buf[-2000:].decode(errors="replace")
    sys.stderr.write(f"smoke: error: {msg}\n--- console (tail) ---\n{tail}\n---\n")
    sys.exit(1)


def qemu_alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
while True:
    try:
        sock.connect(path)
        break
    except (FileNotFoundError, ConnectionRefusedError):
        if not qemu_alive():
            fail("QEMU exited before its serial socket appeared")
        if time.time() > deadline:
            fail("serial socket did not appear")
        time.sleep(0.01)


def read_until(pattern, until, what):
    global buf
    regex = re.compile(pattern)
    while True:
        m = regex.search(buf)
        if m:
            return m
        left = until - time.time()
        if left <= 0:
            fail(f"timed out waiting for {what}")
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except socket.timeout:
            continue
        if not data:
            fail(f"console closed (QEMU exited) while waiting for {what}")
        buf += data


marker = read_until(rb"QBROKER-GUEST-READY\r?\n", deadline, "the ready marker")
ready = time.time() - started
buf = buf[marker.end():]
read_until(rb"guest# ", time.time() + 10, "the shell prompt")
prompt = time.time() - started

buf = b""
sent = time.time()
sock.sendall(b'echo "@@B""N@@"; eval \'uname -r\'; echo "@@E""N:$?@@"\n')
end = read_until(rb"@@EN:(\d+)@@", sent + 10, "the command's end marker")
rtt = time.time() - sent
begin = buf.find(b"@@BN@@")
if begin < 0:
    fail("no begin marker before the end marker")
output = buf[begin + len(b"@@BN@@"):end.start()].decode(errors="replace")
output = output.replace("\r", "").strip()
rc = int(end.group(1))
if rc != 0 or output != kver:
    fail(f"uname -r: rc={rc} output={output!r}, expected rc=0 output={kver!r}")
print(f"smoke: ok: ready marker after {ready:.2f} s, prompt after {prompt:.2f} s, "
      f"uname -r = {output} (round trip {rtt * 1000:.0f} ms)")
EOF
  if [[ -s $tmp/qemu.log ]]; then
    echo "--- qemu ---" >&2
    cat "$tmp/qemu.log" >&2
  fi
  exit 1
fi
