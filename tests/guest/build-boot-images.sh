#!/usr/bin/env bash
# Builds boot media that start the test guest through firmware (SeaBIOS or OVMF) instead of
# QEMU's -kernel, from the vmlinuz and initramfs.cpio.gz that build.sh made:
#   boot-disk.img  64 MiB raw disk: MBR, one FAT32 EFI system partition (type 0xef, active)
#                  holding SYSLINUX for BIOS and, for UEFI, EFI/BOOT/BOOTX64.EFI: a unified
#                  kernel image (systemd's EFI stub with the kernel, initramfs and command line)
#   boot.iso       ISO 9660 CD: ISOLINUX for BIOS, an El Torito EFI image with its own UKI
#   boot-stamp     what they were built from; an unchanged rebuild exits at once without apt
# Both boot at once (no menu, no timeout) with the tests' kernel command line plus qb_boot=disk
# or qb_boot=cd, so a guest tells from /proc/cmdline which device it started from.
# Output: the guest directory, ${QB_GUEST_DIR:-/var/cache/qbroker/guest}; run build.sh first.
# The last line of stdout is the output directory; progress goes to stderr.
# Usage: build-boot-images.sh [--force]
# Runs as root on Debian bookworm. No loop device or mount: sfdisk, mkfs.fat, mtools and the
# mtools flavour of the syslinux installer all work on image files. The output is
# byte-identical for the same inputs.
set -euo pipefail

# tests/support/qemu.hpp kGuestAppend: the command line every test boots the guest with.
readonly guest_append="console=ttyS0 quiet panic=-1 cryptomgr.notests"
readonly host_packages=(syslinux syslinux-common isolinux systemd-boot-efi binutils xorriso
  mtools dosfstools fdisk)
readonly mbr=/usr/lib/syslinux/mbr/mbr.bin
readonly isolinux_bin=/usr/lib/ISOLINUX/isolinux.bin
readonly ldlinux_c32=/usr/lib/syslinux/modules/bios/ldlinux.c32
readonly efi_stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
readonly disk_mib=64
readonly esp_start=2048 # sectors: the partition starts at 1 MiB
# mtools, mkfs.fat and xorriso take file and volume times from here (FAT cannot store 1970).
export SOURCE_DATE_EPOCH=315619200 TZ=UTC

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
out=${QB_GUEST_DIR:-/var/cache/qbroker/guest}
started=$EPOCHREALTIME

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

log() { echo "boot-images: $*" >&2; }
die() { echo "boot-images: error: $*" >&2; exit 1; }

elapsed() {
  local now=$EPOCHREALTIME
  awk -v a="$started" -v b="$now" 'BEGIN { printf "%.2f", b - a }'
}

sha256() { sha256sum <"$1" | cut -d' ' -f1; }

# The guest's kernel and initramfs, this script and the versions of the tools it runs.
# Fails when a tool package is missing.
inputs_hash() {
  local versions
  versions=$(dpkg-query -W -f='${Package}=${Version} ${Status}\n' "${host_packages[@]}" 2>/dev/null) ||
    return 1
  grep -qv ' install ok installed$' <<<"$versions" && return 1
  { sha256 "$self"; sha256 "$out/vmlinuz"; sha256 "$out/initramfs.cpio.gz"; echo "$versions"; } |
    sha256sum | cut -d' ' -f1
}

stamp_get() { sed -n "s/^$1=//p" "$out/boot-stamp" 2>/dev/null; }

[[ -f $out/vmlinuz && -f $out/initramfs.cpio.gz ]] ||
  die "no guest in $out; run tests/guest/build.sh first"
out=$(cd "$out" && pwd)
# build.sh's lock: the guest files do not change under us, and two builds do not race.
exec 9>"$out/.lock"
flock 9

# Fast path: same guest, script and tools, outputs intact.
if ((force == 0)) && [[ -f $out/boot-stamp && -f $out/boot-disk.img && -f $out/boot.iso ]] &&
  inputs=$(inputs_hash) && [[ $inputs == "$(stamp_get inputs)" ]] &&
  [[ $(sha256 "$out/boot-disk.img") == "$(stamp_get boot_disk)" ]] &&
  [[ $(sha256 "$out/boot.iso") == "$(stamp_get boot_iso)" ]]; then
  log "$out/boot-disk.img and boot.iso are up to date, checked in $(elapsed) s"
  echo "$out"
  exit 0
fi

((EUID == 0)) || die "run as root (installs packages and writes $out)"

missing=()
for p in "${host_packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  log "apt-get update"
  apt-get update -qq >&2
  log "installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

scratch=$(mktemp -d "${TMPDIR:-/tmp}/qbroker-boot-images.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# --- boot loaders -------------------------------------------------------------------------------

# SYSLINUX and ISOLINUX: boot the only entry at once, and echo the loader on the serial console.
syslinux_cfg() {
  cat <<EOF
SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  LINUX /boot/vmlinuz
  INITRD /boot/initrd.gz
  APPEND $guest_append qb_boot=$1
EOF
}

# UEFI boots a unified kernel image: the stub hands the kernel its embedded command line and
# initramfs, so there is no loader, configuration or menu. It also needs less memory than
# GRUB, which places the kernel (53 MiB of init size) itself: Debian's GRUB fails with "out of
# memory" below -m 248, the UKI boots at -m 144.

# Prints the end of the stub's last section: the added sections go after it.
stub_end() {
  local idx size vma end=0
  while read -r idx _ size vma _; do
    [[ $idx =~ ^[0-9]+$ ]] || continue
    if ((16#$vma + 16#$size > end)); then end=$((16#$vma + 16#$size)); fi
  done < <(objdump -h "$efi_stub")
  echo "$end"
}

# make_uki OUTPUT MARKER: adds .cmdline, .initrd and .linux, each at the next free page.
make_uki() {
  local cmdline="$scratch/cmdline-$2" vma section file pe field args=()
  printf '%s' "$guest_append qb_boot=$2" >"$cmdline"
  vma=$(stub_end)
  for section in cmdline:"$cmdline" initrd:"$out/initramfs.cpio.gz" linux:"$out/vmlinuz"; do
    file=${section#*:}
    vma=$(((vma + 4095) & ~4095))
    args+=(--add-section ".${section%%:*}=$file" --change-section-vma ".${section%%:*}=$vma")
    vma=$((vma + $(stat -c %s "$file")))
  done
  objcopy "${args[@]}" "$efi_stub" "$1"
  # objcopy stamps the PE header with the time and a checksum over it; firmware reads
  # neither, so zero both for a reproducible image.
  pe=$(od -An -t u4 -j 60 -N 4 "$1")
  for field in 8 88; do # COFF TimeDateStamp, optional header CheckSum
    dd if=/dev/zero of="$1" bs=1 seek=$((pe + field)) count=4 conv=notrunc status=none
  done
}

# --- boot-disk.img ------------------------------------------------------------------------------

# The partition is built as its own file, then copied into the disk behind the partition table.
esp="$scratch/esp.img"
truncate -s $(((disk_mib << 20) - esp_start * 512)) "$esp"
# -h: the boot sector finds ldlinux.sys by absolute sector, so it must know where it starts.
mkfs.fat -F 32 -s 1 -h "$esp_start" -n QBBOOT --invariant "$esp" >/dev/null
mmd -i "$esp" ::/boot ::/boot/syslinux ::/EFI ::/EFI/BOOT
mcopy -i "$esp" "$out/vmlinuz" ::/boot/vmlinuz
mcopy -i "$esp" "$out/initramfs.cpio.gz" ::/boot/initrd.gz
syslinux_cfg disk >"$scratch/syslinux.cfg"
mcopy -i "$esp" "$scratch/syslinux.cfg" ::/boot/syslinux/syslinux.cfg
make_uki "$scratch/disk.efi" disk
mcopy -i "$esp" "$scratch/disk.efi" ::/EFI/BOOT/BOOTX64.EFI
# Writes the boot sector and ldlinux.sys/ldlinux.c32 through mtools: no mount.
syslinux --directory /boot/syslinux --install "$esp"

disk="$scratch/boot-disk.img"
truncate -s "${disk_mib}M" "$disk"
# 0xef marks the EFI system partition for OVMF; the active flag is for the BIOS MBR code.
sfdisk -q "$disk" <<EOF
label: dos
label-id: 0x51425254
start=$esp_start, type=ef, bootable
EOF
# SYSLINUX's MBR code loads the active partition's boot sector; 440 bytes leave the table intact.
dd if="$mbr" of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$esp" of="$disk" bs=1M seek=$((esp_start * 512 >> 20)) conv=notrunc,sparse status=none

# --- boot.iso -----------------------------------------------------------------------------------

# The El Torito EFI image: a FAT file system holding only the UKI (OVMF reads no ISO 9660),
# 1-2 MiB larger than it. El Torito gives its size in 512-byte sectors in 16 bits: 32 MiB at most.
make_uki "$scratch/cd.efi" cd
efi_img="$scratch/efi.img"
truncate -s $((($(stat -c %s "$scratch/cd.efi") >> 20) + 2))M "$efi_img"
mkfs.fat -n QBEFI --invariant "$efi_img" >/dev/null
mmd -i "$efi_img" ::/EFI ::/EFI/BOOT
mcopy -i "$efi_img" "$scratch/cd.efi" ::/EFI/BOOT/BOOTX64.EFI

tree="$scratch/iso"
mkdir -p "$tree/boot/isolinux"
cp "$out/vmlinuz" "$tree/boot/vmlinuz"
cp "$out/initramfs.cpio.gz" "$tree/boot/initrd.gz"
cp "$isolinux_bin" "$ldlinux_c32" "$tree/boot/isolinux/"
syslinux_cfg cd >"$tree/boot/isolinux/isolinux.cfg"
cp "$efi_img" "$tree/boot/efi.img"
find "$tree" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

iso="$scratch/boot.iso"
# xorriso always prints a banner and a note on SOURCE_DATE_EPOCH: show its words only on failure.
if ! xorriso -as mkisofs -quiet -o "$iso" -V QBBOOT -r \
  -b boot/isolinux/isolinux.bin -c boot/isolinux/boot.cat \
  -no-emul-boot -boot-load-size 4 -boot-info-table \
  -eltorito-alt-boot -e boot/efi.img -no-emul-boot \
  "$tree" >"$scratch/xorriso.log" 2>&1; then
  cat "$scratch/xorriso.log" >&2
  die "xorriso failed"
fi

# --- install ------------------------------------------------------------------------------------

cp --sparse=always "$disk" "$out/boot-disk.img.tmp"
mv "$out/boot-disk.img.tmp" "$out/boot-disk.img"
cp "$iso" "$out/boot.iso.tmp"
mv "$out/boot.iso.tmp" "$out/boot.iso"
cat >"$out/boot-stamp.tmp" <<EOF
inputs=$(inputs_hash)
disk_append=$guest_append qb_boot=disk
cd_append=$guest_append qb_boot=cd
boot_disk=$(sha256 "$out/boot-disk.img")
boot_iso=$(sha256 "$out/boot.iso")
EOF
mv "$out/boot-stamp.tmp" "$out/boot-stamp"

log "built in $(elapsed) s: boot-disk.img $(du -k "$out/boot-disk.img" | cut -f1) KiB used" \
  "of ${disk_mib} MiB, boot.iso $(stat -c %s "$out/boot.iso") B"
echo "$out"
