#!/usr/bin/env bash
# libvirt's side of the comparisons in docs/lifecycle.md and docs/flows.md: the test guest
# (q35, 128 MiB, direct kernel boot, a virtio-scsi CD drive, VNC, TCG) started, given a CD,
# saved, restored and destroyed through virsh, ROUNDS times, with each step's median in ms.
# Needs a running libvirtd (libvirt-daemon-system, not installed by scripts/setup.sh) and the
# test guest (tests/guest/build.sh). The domain and its files go when it ends.
#
# Usage: bench/libvirt_compare.sh [ROUNDS]
set -euo pipefail
rounds=${1:-9}
guest=/var/cache/qbroker/guest
dir=/var/lib/libvirt/images/qbroker-compare
name=qbroker-compare
command -v virsh >/dev/null || { echo "libvirt_compare: virsh is needed (libvirt-clients)" >&2; exit 1; }
virsh=(virsh -q -c qemu:///system)
mkdir -p "$dir"
cp "$guest/vmlinuz" "$guest/initramfs.cpio.gz" "$guest/boot.iso" "$dir/"
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
    <kernel>$dir/vmlinuz</kernel>
    <initrd>$dir/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 cryptomgr.notests</cmdline>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='scsi' model='virtio-scsi'/>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='scsi'/>
      <readonly/>
    </disk>
    <serial type='pty'/>
    <graphics type='vnc' port='-1' listen='127.0.0.1'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
XML

now() { date +%s%N; }
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
  step start "${virsh[@]}" start "$name"
  sleep 3  # the guest boots and idles
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
