#!/usr/bin/env bash
# libvirt's side of the comparisons in docs/lifecycle.md and docs/flows.md: the test guest
# (q35, 128 MiB, direct kernel boot, a virtio-scsi CD drive, VNC, TCG) started, given a CD,
# saved, restored and destroyed through virsh, ROUNDS times, with each step's median in ms.
# With --bios the guest boots through SeaBIOS from boot-disk.img, attached as a read-only virtio
# disk, instead of the direct kernel; the serial console is then logged to a file, and each round
# waits for the guest's shell prompt there (at most 120 s) instead of sleeping 3 s.
# Needs a running libvirtd (libvirt-daemon-system, not installed by scripts/setup.sh) and the
# test guest (tests/guest/build.sh, and tests/guest/build-boot-images.sh for --bios). The domain
# and its files go when it ends.
#
# Usage: bench/libvirt_compare.sh [--bios] [ROUNDS]
set -euo pipefail
bios=0
if [[ ${1:-} == --bios ]]; then
  bios=1
  shift
fi
rounds=${1:-9}
guest=/var/cache/qbroker/guest
dir=/var/lib/libvirt/images/qbroker-compare
name=qbroker-compare
command -v virsh >/dev/null || { echo "libvirt_compare: virsh is needed (libvirt-clients)" >&2; exit 1; }
virsh=(virsh -q -c qemu:///system)
mkdir -p "$dir"
cp "$guest/vmlinuz" "$guest/initramfs.cpio.gz" "$guest/boot.iso" "$dir/"
if ((bios)); then
  cp "$guest/boot-disk.img" "$dir/"
  boot_xml="    <boot dev='hd'/>"
  disk_xml="    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$dir/boot-disk.img'/>
      <target dev='vda' bus='virtio'/>
      <readonly/>
    </disk>"
  serial_xml="    <serial type='pty'>
      <log file='$dir/console.log' append='off'/>
    </serial>"
else
  boot_xml="    <kernel>$dir/vmlinuz</kernel>
    <initrd>$dir/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 cryptomgr.notests</cmdline>"
  disk_xml=""
  serial_xml="    <serial type='pty'/>"
fi
cleanup() {
  "${virsh[@]}" destroy "$name" >/dev/null 2>&1 || true
  "${virsh[@]}" undefine "$name" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
"${virsh[@]}" define /dev/stdin >/dev/null <<XML
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
$boot_xml
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
$disk_xml
    <controller type='scsi' model='virtio-scsi'/>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='scsi'/>
      <readonly/>
    </disk>
$serial_xml
    <graphics type='vnc' port='-1' listen='127.0.0.1'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
XML

now() { date +%s%N; }
# Waits until the console log holds the guest's ready marker and, after it, the shell prompt.
wait_prompt() {
  local deadline=$((SECONDS + 120))
  until awk '/QBROKER-GUEST-READY/ { r = 1 } r && /guest# / { f = 1; exit } END { exit !f }' \
      "$dir/console.log" 2>/dev/null; do
    ((SECONDS < deadline)) || { echo "libvirt_compare: no guest prompt after 120 s" >&2; exit 1; }
    sleep 0.1
  done
}
declare -A times
step() {  # step NAME COMMAND...: runs it, adds its time in ms to NAME's list
  local label=$1 t0 t1
  shift
  t0=$(now)
  "$@" >/dev/null
  t1=$(now)
  times[$label]+="$(( (t1 - t0) / 1000 )) "
}
for ((i = 0; i < rounds; i++)); do
  rm -f "$dir/console.log"
  step start "${virsh[@]}" start "$name"
  if ((bios)); then
    wait_prompt
  else
    sleep 3  # the guest boots and idles
  fi
  step cd_insert "${virsh[@]}" change-media "$name" sda "$dir/boot.iso" --insert --live
  step cd_eject "${virsh[@]}" change-media "$name" sda --eject --live
  step save "${virsh[@]}" save "$name" "$dir/state.sav"
  size_mib=$(( $(stat -c %s "$dir/state.sav") >> 20 ))
  step restore "${virsh[@]}" restore "$dir/state.sav"
  rm -f "$dir/state.sav"
  step destroy "${virsh[@]}" destroy "$name"
done
echo "save file ${size_mib} MiB"
echo "libvirt $("${virsh[@]}" version --daemon | awk '/daemon/ {print $NF}'), $rounds rounds, medians (ms):"
for label in start cd_insert cd_eject save restore destroy; do
  median=$(tr ' ' '\n' <<<"${times[$label]}" | grep . | sort -n |
           awk '{v[NR] = $1} END {printf "%.1f", v[int((NR + 1) / 2)] / 1000}')
  printf '  %-10s %8s\n' "$label" "$median"
done
