#!/usr/bin/env bash
# Builds the tiny Linux guest the integration tests boot under QEMU (TCG):
#   vmlinuz            Debian's cloud kernel, taken from the package, never installed on the host
#   initramfs.cpio.gz  busybox-static, the virtio/SCSI/CD/net drivers, efivarfs and tests/guest/init
#   stamp              what it was built from; an unchanged rebuild exits at once without apt
# Output: ${QB_GUEST_DIR:-/var/cache/qbroker/guest}; kernel .debs: ${QB_GUEST_CACHE:-/var/cache/qbroker/debs}.
# The last line of stdout is the output directory; progress goes to stderr.
# Usage: build.sh [--force]    (--force re-resolves the kernel and rebuilds)
# Runs as root on Debian bookworm. The output is byte-identical for the same inputs.
set -euo pipefail

readonly kernel_meta=linux-image-cloud-amd64
readonly modules=(virtio_pci virtio_blk virtio_scsi sd_mod sr_mod virtio_net)
# Packed but not loaded at boot: /init loads efivarfs only under UEFI, where it can work.
readonly on_demand_modules=(efivarfs)
readonly applets=(sh mount modprobe dmesg setsid cttyhack uname ip ifconfig ping dd hexdump sync blockdev)
readonly host_packages=(busybox-static cpio gzip)
readonly busybox=/bin/busybox

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
init_script="$here/init"
out=${QB_GUEST_DIR:-/var/cache/qbroker/guest}
cache=${QB_GUEST_CACHE:-/var/cache/qbroker/debs}
started=$EPOCHREALTIME

force=0
case "${1:-}" in
  "") ;;
  --force) force=1 ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

log() { echo "guest: $*" >&2; }
die() { echo "guest: error: $*" >&2; exit 1; }

elapsed() {
  local now=$EPOCHREALTIME
  awk -v a="$started" -v b="$now" 'BEGIN { printf "%.2f", b - a }'
}

sha256() { sha256sum <"$1" | cut -d' ' -f1; }

# Everything the initramfs depends on apart from the kernel package.
inputs_hash() {
  [[ -f $busybox ]] || return 1
  { sha256 "$self"; sha256 "$init_script"; sha256 "$busybox"; } | sha256sum | cut -d' ' -f1
}

stamp_get() { sed -n "s/^$1=//p" "$out/stamp" 2>/dev/null; }

mkdir -p "$out"
out=$(cd "$out" && pwd)
exec 9>"$out/.lock"
flock 9

# Fast path: same build.sh, init and busybox, outputs intact.
if ((force == 0)) && [[ -f $out/stamp && -f $out/vmlinuz && -f $out/initramfs.cpio.gz ]] &&
  inputs=$(inputs_hash) && [[ $inputs == "$(stamp_get inputs)" ]] &&
  [[ $(sha256 "$out/vmlinuz") == "$(stamp_get vmlinuz)" ]] &&
  [[ $(sha256 "$out/initramfs.cpio.gz") == "$(stamp_get initramfs)" ]]; then
  log "$out is up to date ($(stamp_get kernel_package)), checked in $(elapsed) s"
  echo "$out"
  exit 0
fi

((EUID == 0)) || die "run as root (installs packages and writes $out)"
[[ -f $init_script ]] || die "missing $init_script"

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update() {
  ((apt_updated)) && return 0
  apt_updated=1
  log "apt-get update"
  apt-get update -qq >&2
}

missing=()
for p in "${host_packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  apt_update
  log "installing ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# --- kernel package ---------------------------------------------------------------------------

# Prints the versioned package the metapackage depends on, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_kernel() {
  local deps
  deps=$(apt-cache depends "$kernel_meta" 2>/dev/null) || return 1
  awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-/ { print $2; exit }' <<<"$deps"
}

# Prints the newest cached .deb whose name matches the glob, if any.
newest_cached() {
  local debs=()
  shopt -s nullglob
  # shellcheck disable=SC2206 # $1 is a glob pattern
  debs=("$cache"/$1)
  shopt -u nullglob
  ((${#debs[@]})) || return 1
  printf '%s\n' "${debs[@]}" | sort -V | tail -n1
}

# Prints the cached .deb of the current kernel package, downloading it when needed.
fetch_kernel() {
  local pkg tmp deb
  pkg=$(resolve_kernel) && [[ -n $pkg ]] || return 1
  if deb=$(newest_cached "${pkg}_*.deb"); then
    echo "$deb"
    return 0
  fi
  log "downloading $pkg"
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.download.XXXXXX")
  if ! (cd "$tmp" && apt-get -q -o APT::Sandbox::User=root download "$pkg" >&2); then
    rm -rf "$tmp"
    return 1
  fi
  mv "$tmp"/*.deb "$cache/"
  rm -rf "$tmp"
  newest_cached "${pkg}_*.deb"
}

if ! deb=$(fetch_kernel); then
  # Stale or missing package lists, or the mirror dropped the old ABI: refresh once and retry.
  if ! { apt_update && deb=$(fetch_kernel); }; then
    deb=$(newest_cached "linux-image-*-cloud-amd64_*.deb") ||
      die "cannot resolve or download $kernel_meta, and no kernel .deb is cached in $cache"
    log "warning: $kernel_meta unavailable, using cached ${deb##*/}"
  fi
fi
kernel_package=$(dpkg-deb -f "$deb" Package)
log "kernel ${deb##*/}"

# --- unpack -------------------------------------------------------------------------------------

scratch=$(mktemp -d "${TMPDIR:-/tmp}/qbroker-guest.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
kroot="$scratch/kernel"
root="$scratch/root"

dpkg-deb -x "$deb" "$kroot"
shopt -s nullglob
images=("$kroot"/boot/vmlinuz-*)
shopt -u nullglob
((${#images[@]} == 1)) || die "expected one boot/vmlinuz-* in ${deb##*/}"
kver=${images[0]##*/vmlinuz-}
if [[ ! -d $kroot/lib/modules/$kver && -d $kroot/usr/lib/modules/$kver ]]; then
  ln -s usr/lib "$kroot/lib"
fi
kmods="$kroot/lib/modules/$kver"
[[ -d $kmods ]] || die "no modules for $kver in ${deb##*/}"
"$busybox" depmod -b "$kroot" "$kver"

# --- module closure -----------------------------------------------------------------------------

declare -A path_of=() deps_of=() wanted=()
while IFS= read -r line; do
  mod=${line%%:*}
  name=${mod##*/}
  name=${name%%.ko*}
  path_of[${name//-/_}]=$mod
  deps_of[$mod]=${line#*:}
done <"$kmods/modules.dep"

want() {
  local dep deps
  [[ -n ${wanted[$1]:-} ]] && return 0
  wanted[$1]=1
  read -ra deps <<<"${deps_of[$1]}"
  for dep in "${deps[@]}"; do
    want "$dep"
  done
}

# Adds a module and its dependencies to the tree; fails (after a note) when it is built in.
pack_module() {
  if [[ -n ${path_of[$1]:-} ]]; then
    want "${path_of[$1]}"
    return 0
  fi
  sed 's,.*/,,; s,\.ko.*,,; s,-,_,g' "$kmods/modules.builtin" | grep -qx "$1" ||
    die "module $1 not found in $kver"
  log "$1 is built into $kver"
  return 1
}

load=()
for m in "${modules[@]}"; do
  pack_module "$m" && load+=("$m")
done
for m in "${on_demand_modules[@]}"; do
  pack_module "$m" || true
done

# --- initramfs tree -----------------------------------------------------------------------------

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,lib/modules/"$kver"}
for mod in "${!wanted[@]}"; do
  mkdir -p "$root/lib/modules/$kver/${mod%/*}"
  cp "$kmods/$mod" "$root/lib/modules/$kver/$mod"
done
"$busybox" depmod -b "$root" "$kver"
printf '%s\n' "${load[@]}" >"$root/etc/modules"

cp "$busybox" "$root/bin/busybox"
while IFS= read -r link; do
  [[ $link == */* && ! -e $root/$link && ! -L $root/$link ]] || continue
  ln -s /bin/busybox "$root/$link"
done < <("$busybox" --list-full)
for a in "${applets[@]}"; do
  [[ -L $root/bin/$a || -L $root/sbin/$a || -L $root/usr/bin/$a || -L $root/usr/sbin/$a ]] ||
    die "busybox lacks the $a applet"
done
cp "$init_script" "$root/init"

find "$root" -type d -exec chmod 0755 {} +
find "$root" -type f -exec chmod 0644 {} +
chmod 0755 "$root/init" "$root/bin/busybox"
find "$root" -exec touch -h -d @0 {} +

# One newc entry (header, NUL-terminated name, padding to 4 bytes; no data).
newc_entry() {
  local name=$1 mode=$2 rmajor=$3 rminor=$4 namesize=$((${#1} + 1))
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
    1 "$mode" 0 0 1 0 0 0 0 "$rmajor" "$rminor" "$namesize" 0
  printf '%s\0' "$name"
  head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}

# The kernel opens /dev/console before /init runs, so the archive must carry the node. It is
# written by hand as a second archive (the kernel unpacks concatenated ones) to avoid mknod.
console_archive() {
  newc_entry dev/console $((8#020600)) 5 1
  newc_entry 'TRAILER!!!' 0 0 0
}

initramfs="$scratch/initramfs.cpio.gz"
{
  (cd "$root" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
    cpio -o -H newc -R 0:0 --reproducible --null --quiet)
  console_archive
} | gzip -9 -n >"$initramfs"

# --- install ------------------------------------------------------------------------------------

cp "${images[0]}" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
cp "$initramfs" "$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
cat >"$out/stamp.tmp" <<EOF
kernel_package=$kernel_package
kernel_deb=${deb##*/}
kernel_version=$kver
modules=${load[*]}
inputs=$(inputs_hash)
vmlinuz=$(sha256 "$out/vmlinuz")
initramfs=$(sha256 "$out/initramfs.cpio.gz")
EOF
mv "$out/stamp.tmp" "$out/stamp"

log "built $kver guest in $(elapsed) s: vmlinuz $(stat -c %s "$out/vmlinuz") B," \
  "initramfs $(stat -c %s "$out/initramfs.cpio.gz") B (${#wanted[@]} modules)"
echo "$out"
