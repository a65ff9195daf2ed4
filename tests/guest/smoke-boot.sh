#!/usr/bin/env bash
# Boots boot-disk.img and boot.iso (made by build-boot-images.sh) through SeaBIOS and through OVMF
# under QEMU (TCG), on the device models the broker plugs: the disk as virtio-blk-pci and as
# scsi-hd, the CD as scsi-cd, both SCSI devices on virtio-scsi-pci. Every boot attaches the disk
# and the CD, the one under test with bootindex=1 and the other with bootindex=2, waits for the
# guest's ready marker and checks /proc/cmdline for that device's qb_boot= marker. Under OVMF the
# guest also writes an EFI variable, and a second boot on the same vars file reads it back.
# Prints the time to the ready marker and to the prompt of every boot; exit status 0 when all pass.
# Usage: smoke-boot.sh [GUEST_DIR]   (default ${QB_GUEST_DIR:-/var/cache/qbroker/guest})
# Environment: QB_GUEST_TIMEOUT (seconds to the ready marker, default 120), QEMU (binary),
#   OVMF_CODE and OVMF_VARS (default /usr/share/OVMF/OVMF_{CODE,VARS}_4M.fd).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
console_py="$here/../../scripts/console.py"
dir=${1:-${QB_GUEST_DIR:-/var/cache/qbroker/guest}}
timeout=${QB_GUEST_TIMEOUT:-120}
qemu=${QEMU:-qemu-system-x86_64}
ovmf_code=${OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
ovmf_vars=${OVMF_VARS:-/usr/share/OVMF/OVMF_VARS_4M.fd}
# A variable of our own: attributes NV|BS|RT (7, little-endian), then the data.
readonly efivar=/sys/firmware/efi/efivars/QbTest-6c1b0f3e-2a4d-4b8e-9f10-71627f2b5c3d

die() { echo "smoke-boot: error: $*" >&2; exit 1; }

for f in boot-disk.img boot.iso boot-stamp; do
  [[ -f $dir/$f ]] || die "missing $dir/$f; run tests/guest/build-boot-images.sh first"
done
for f in "$ovmf_code" "$ovmf_vars"; do
  [[ -f $f ]] || die "missing $f (package ovmf)"
done
command -v "$qemu" >/dev/null || die "$qemu not found"
command -v python3 >/dev/null || die "python3 not found"
declare -A append=(
  [disk]=$(sed -n 's/^disk_append=//p' "$dir/boot-stamp")
  [cd]=$(sed -n 's/^cd_append=//p' "$dir/boot-stamp")
)
[[ -n ${append[disk]} && -n ${append[cd]} ]] || die "no disk_append/cd_append in $dir/boot-stamp"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/qbroker-smoke-boot.XXXXXX")
qpid=""
boots=0
# Stops the QEMU of the current boot, by its pid.
stop_qemu() {
  [[ -n $qpid ]] || return 0
  if kill "$qpid" 2>/dev/null; then
    for _ in $(seq 50); do
      kill -0 "$qpid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$qpid" 2>/dev/null || true
  fi
  wait "$qpid" 2>/dev/null || true
  qpid=""
}
trap 'stop_qemu; rm -rf "$tmp"' EXIT

elapsed() {
  local now=$EPOCHREALTIME
  awk -v a="$1" -v b="$now" 'BEGIN { printf "%.2f", b - a }'
}

# Boots one combination and leaves its QEMU running in $qpid, its console socket in $sock.
# boot NAME FIRMWARE(bios|uefi) TARGET(disk|cd) DISK_MODEL(virtio-blk|scsi-hd) [VARS_FILE]
boot() {
  local name=$1 firmware=$2 target=$3 disk_model=$4 vars=${5:-}
  local disk_index=2 cd_index=2 log args=()
  boots=$((boots + 1))
  log="$tmp/boot$boots.log"
  sock="$tmp/boot$boots.sock"
  if [[ $target == disk ]]; then disk_index=1; else cd_index=1; fi
  if [[ $firmware == uefi ]]; then
    args+=(-drive "if=pflash,format=raw,readonly=on,file=$ovmf_code"
      -drive "if=pflash,format=raw,file=$vars")
  fi
  # The cache's images are shared: attach them read-only.
  args+=(
    -device "pcie-root-port,id=rp1,chassis=1,bus=pcie.0"
    -device "pcie-root-port,id=rp2,chassis=2,bus=pcie.0"
    -device "virtio-scsi-pci,id=scsi0,bus=rp1"
    -blockdev "driver=file,filename=$dir/boot-disk.img,node-name=disk0-file,read-only=on"
    -blockdev "driver=raw,file=disk0-file,node-name=disk0,read-only=on"
    -blockdev "driver=file,filename=$dir/boot.iso,node-name=cd0-file,read-only=on"
    -blockdev "driver=raw,file=cd0-file,node-name=cd0,read-only=on"
    -device "scsi-cd,id=cd0,bus=scsi0.0,scsi-id=0,drive=cd0,bootindex=$cd_index"
  )
  case $disk_model in
    virtio-blk) args+=(-device "virtio-blk-pci,id=disk0,bus=rp2,drive=disk0,bootindex=$disk_index") ;;
    scsi-hd) args+=(-device "scsi-hd,id=disk0,bus=scsi0.0,scsi-id=1,drive=disk0,bootindex=$disk_index") ;;
    *) die "unknown disk model $disk_model" ;;
  esac

  local started=$EPOCHREALTIME
  "$qemu" -machine q35 -accel tcg -m 256 -nodefaults -no-user-config -display none -no-reboot \
    -chardev "socket,id=ser0,path=$sock,server=on,wait=off,logfile=$log" -serial chardev:ser0 \
    "${args[@]}" </dev/null >"$tmp/boot$boots.qemu.log" 2>&1 &
  qpid=$!

  # The chardev's log file records the console whether or not a client is connected.
  local deadline=$((${started%.*} + timeout)) ready=""
  while :; do
    if [[ -z $ready ]] && grep -qa QBROKER-GUEST-READY "$log" 2>/dev/null; then
      ready=$(elapsed "$started")
    fi
    if [[ -n $ready ]] &&
      awk '/QBROKER-GUEST-READY/ { r = 1 } r && /guest# / { f = 1; exit } END { exit !f }' "$log"; then
      break
    fi
    if ! kill -0 "$qpid" 2>/dev/null; then
      cat "$tmp/boot$boots.qemu.log" >&2
      fail "$name: QEMU exited before the guest's prompt" "$log"
    fi
    ((${EPOCHREALTIME%.*} < deadline)) || fail "$name: no guest prompt after $timeout s" "$log"
    sleep 0.05
  done
  printf 'smoke-boot: %-30s ready marker after %6s s, prompt after %6s s\n' \
    "$name" "$ready" "$(elapsed "$started")"
}

fail() {
  echo "smoke-boot: error: $1" >&2
  if [[ -n ${2:-} && -s $2 ]]; then
    echo "--- console (tail) ---" >&2
    tail -c 2000 "$2" | tr -d '\r' >&2
    echo "---" >&2
  fi
  exit 1
}

# Runs a command in the guest; prints its output, fails the smoke test on a non-zero status.
guest() {
  local out rc=0
  out=$(python3 "$console_py" "$sock" run "$1" 30) || rc=$?
  ((rc == 0)) || fail "guest command failed (status $rc): $1: $out"
  printf '%s\n' "$out"
}

# Checks the kernel command line and what the guest sees of the firmware.
check_guest() {
  local name=$1 firmware=$2 target=$3 cmdline
  cmdline=$(guest 'cat /proc/cmdline')
  # The loaders add BOOT_IMAGE= before it (and SYSLINUX initrd= after it).
  [[ " $cmdline " == *" ${append[$target]} "* ]] ||
    fail "$name: /proc/cmdline is '$cmdline', expected it to hold '${append[$target]}'"
  if [[ $firmware == uefi ]]; then
    guest 'grep -q "^efivarfs /sys/firmware/efi/efivars " /proc/mounts' >/dev/null
  else
    guest '! test -e /sys/firmware/efi' >/dev/null
  fi
}

# TARGET DISK_MODEL NAME: the CD boots are done with the disk on virtio-scsi beside the CD.
combos=(
  "disk virtio-blk disk virtio-blk"
  "disk scsi-hd disk scsi-hd"
  "cd scsi-hd cd scsi-cd"
)
for firmware in bios uefi; do
  for combo in "${combos[@]}"; do
    read -r target model label <<<"$combo"
    vars="$tmp/vars-$firmware-$target-$model.fd"
    [[ $firmware == bios ]] || cp "$ovmf_vars" "$vars"
    boot "$firmware $label" "$firmware" "$target" "$model" "$vars"
    check_guest "$firmware $label" "$firmware" "$target"
    stop_qemu
  done
done

# A variable the guest writes through efivarfs is in the vars file after QEMU exits.
token="qb$$-$RANDOM"
vars="$tmp/vars-persist.fd"
cp "$ovmf_vars" "$vars"
boot "uefi disk virtio-blk (write)" uefi disk virtio-blk "$vars"
guest "printf '\\007\\000\\000\\000%s' $token >$efivar" >/dev/null
stop_qemu
boot "uefi disk virtio-blk (reboot)" uefi disk virtio-blk "$vars"
got=$(guest "tail -c +5 $efivar")
[[ $got == "$token" ]] || fail "EFI variable after restart: '$got', expected '$token'"
stop_qemu
echo "smoke-boot: ok: $boots boots; EFI variable ${efivar##*/} survived a QEMU restart"
