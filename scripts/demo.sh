#!/usr/bin/env bash
# The demo: installs what is missing, builds qbroker and the test guest, starts qbrokerd on a
# temporary state directory, boots the guest, and walks through the flows with qbrokerctl:
# CD insert/replace/eject, disk hotplug with the guest reading and writing it, a NIC the host
# pings across, the VNC banner. It tears the domain down by uid, then boots the test ISO through
# firmware, SeaBIOS and UEFI, to the guest's prompt. It prints the kill report and the time of
# every step, and leaves nothing running.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

"$root/scripts/setup.sh"
guest=$("$root/tests/guest/build.sh" | tail -n 1)
"$root/tests/guest/build-boot-images.sh" >/dev/null
export BUILD_DIR=${BUILD_DIR:-$root/build}
"$root/scripts/build.sh" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null

work=$(mktemp -d /tmp/qbroker-demo.XXXXXX)
sock=$work/qbroker.sock
images=$work/images
netns=qbdemo$$
tap=qbdemo$$
daemon=""
ctl() { "$BUILD_DIR/ctl/qbrokerctl" --socket "$sock" "$@"; }
console() { python3 "$root/scripts/console.py" "$console_sock" "$@"; }

cleanup() {
  set +e
  if [[ -n $daemon ]] && kill -0 "$daemon" 2>/dev/null; then
    for d in demo fw-bios fw-uefi; do ctl destroy "$d" --purge-nvram >/dev/null 2>&1; done
    kill -TERM "$daemon"
    wait "$daemon" 2>/dev/null
  fi
  ip netns del "$netns" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

declare -a step_names step_ms
step() {  # step NAME COMMAND...: runs, times and records one step
  local name=$1
  shift
  printf '\n== %s\n' "$name"
  local t0=$EPOCHREALTIME
  "$@"
  local t1=$EPOCHREALTIME
  step_names+=("$name")
  step_ms+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) * 1000 }')")
}

# Images the guest will read: each carries a marker in its first bytes.
mkdir -p "$images"
marker_image() {  # marker_image FILE SIZE_MIB MARKER
  truncate -s "${2}M" "$1"
  printf '%s' "$3" | dd of="$1" conv=notrunc status=none
}
marker_image "$images/cd1.iso" 1 "QBROKER-CD-ONE"
marker_image "$images/cd2.iso" 1 "QBROKER-CD-TWO"
marker_image "$images/disk1.img" 8 "QBROKER-DISK-ONE"

"$BUILD_DIR/broker/daemon/qbrokerd" --socket "$sock" --state-dir "$work/state" \
  --run-dir "$work/run" --image-root "$images" --image-root "$guest" \
  --uid-range 1879052288:64 --log-level warn &
daemon=$!
for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.05; done

step "version" ctl version
step "create the domain (paused), then resume" \
  ctl create demo --kernel "$guest/vmlinuz" --initrd "$guest/initramfs.cpio.gz" \
  --append "console=ttyS0 quiet panic=-1 cryptomgr.notests" --memory 128 --cdrom cd0 --paused
console_sock=$(ctl --json show demo --no-live | python3 -c 'import json,sys; print(json.load(sys.stdin)["console"])')
ctl resume demo
step "guest shell answers on the serial console" console wait 90
step "show the domain" ctl show demo

uid=$(ctl --json show demo --no-live | python3 -c 'import json,sys; print(json.load(sys.stdin)["uid"])')
qpid=$(ctl --json show demo --no-live | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
echo "QEMU pid $qpid runs as uid $uid: $(grep -E '^(Uid|Seccomp|NoNewPrivs)' /proc/"$qpid"/status | tr '\n\t' '  ')"

step "CD: insert cd1" ctl cdrom insert demo cd0 "$images/cd1.iso"
step "CD: the guest reads cd1's marker" console run 'dd if=/dev/sr0 bs=2048 count=1 2>/dev/null | head -c 14; echo'
step "CD: replace with cd2" ctl cdrom insert demo cd0 "$images/cd2.iso"
step "CD: the guest reads cd2's marker" console run 'dd if=/dev/sr0 bs=2048 count=1 2>/dev/null | head -c 14; echo'
step "CD: eject" ctl cdrom eject demo cd0

step "disk: hotplug disk1 (virtio-scsi)" ctl disk add demo disk1 "$images/disk1.img" --bus scsi
step "disk: the guest reads disk1's marker" console run 'sleep 0.3; dd if=/dev/sda bs=512 count=1 2>/dev/null | head -c 16; echo'
step "disk: the guest writes to disk1" \
  console run 'echo -n GUEST-WROTE-THIS | dd of=/dev/sda bs=512 seek=8 conv=notrunc 2>/dev/null; sync'
step "disk: unplug disk1" ctl disk remove demo disk1
step "disk: the host reads the guest's bytes back" \
  bash -c "dd if='$images/disk1.img' bs=512 skip=8 count=1 status=none | head -c 16; echo"

step "NIC: hotplug net0 on a new tap" ctl nic add demo net0 --tap "$tap" --mac 52:54:00:12:34:56
# The tap lives in the host netns; move it into a namespace of our own for the address plan.
ip netns add "$netns"
ip link set "$tap" netns "$netns"
ip -n "$netns" addr add 169.254.77.1/24 dev "$tap"
ip -n "$netns" link set "$tap" up
step "NIC: the guest configures eth0" \
  console run 'ip addr add 169.254.77.2/24 dev eth0 && ip link set eth0 up && cat /sys/class/net/eth0/address'
step "NIC: the host pings the guest" ip netns exec "$netns" ping -c 3 -i 0.2 -W 2 169.254.77.2
step "NIC: unplug net0" ctl nic remove demo net0

step "VNC: hand QEMU a listener on loopback" ctl vnc set demo 127.0.0.1:0
vnc=$(ctl --json show demo --no-live | python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"]["vnc"]["address"])')
step "VNC: read the RFB banner from $vnc" python3 -c "
import socket, sys
host, port = sys.argv[1].rsplit(':', 1)
s = socket.create_connection((host, int(port)), timeout=5)
print(s.recv(12).decode().strip())" "$vnc"

step "destroy: kill by uid" ctl destroy demo
left=$(ps -u "$uid" --no-headers 2>/dev/null | wc -l || true)
echo "processes left under uid $uid: $left"
[[ $left -eq 0 ]]

# Firmware boot: no kernel, the test ISO as a CD the broker opens, booted through SeaBIOS and
# through UEFI (OVMF, with a variable store of the domain's own). The time is resume to prompt.
boot_to_prompt() {  # boot_to_prompt NAME: resumes the paused domain and waits for the guest
  console_sock=$(ctl --json show "$1" --no-live | python3 -c 'import json,sys; print(json.load(sys.stdin)["console"])')
  ctl resume "$1" >/dev/null
  console wait 90
}
for fw in bios uefi; do
  step "firmware $fw: create, the ISO as cd0 (paused)" \
    ctl create "fw-$fw" --firmware "$fw" --memory 256 --cdrom cd0="$guest/boot.iso" --boot cd0 --paused
  step "firmware $fw: boot the ISO to the guest's prompt" boot_to_prompt "fw-$fw"
  step "firmware $fw: the guest booted from the CD" console run 'grep -o qb_boot=cd /proc/cmdline'
  step "firmware $fw: destroy" ctl destroy "fw-$fw" --purge-nvram
done

printf '\n%-48s %10s\n' "step" "ms"
for i in "${!step_names[@]}"; do printf '%-48s %10s\n' "${step_names[$i]}" "${step_ms[$i]}"; done
