#!/usr/bin/env bash
# Unpacks the second QEMU the [qemu] tests run against: bookworm-backports' qemu-system-x86 10.0,
# with the SeaBIOS and iPXE ROMs it was built for, into a prefix of its own. The system's QEMU 7.2
# is neither replaced nor touched: apt runs on private lists and only downloads.
#   $out/usr/bin/qemu-system-x86_64     the binary (qbrokerd --qemu)
#   $out/usr/share/qemu, $out/usr/share/seabios, $out/usr/lib/ipxe/qemu
#                                       its data directories (qbrokerd --qemu-datadir, in order)
#   $out/stamp                          the package versions; a present stamp exits at once
# Output: ${QB_QEMU10_DIR:-/var/cache/qbroker/qemu-10.0}. The last line of stdout is that
# directory. Usage: second-qemu.sh [--force]. Runs as root on Debian bookworm.
set -euo pipefail

readonly mirror=http://deb.debian.org/debian
readonly keyring=/usr/share/keyrings/debian-archive-keyring.gpg
# name/suite: the backports build and the ROMs of the same release; ipxe-qemu is bookworm's.
readonly packages=(qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports
                   qemu-system-data/bookworm-backports seabios/bookworm-backports ipxe-qemu)
readonly want_version='QEMU emulator version 10.0'

out=${QB_QEMU10_DIR:-/var/cache/qbroker/qemu-10.0}
log() { echo "second-qemu: $*" >&2; }
die() { echo "second-qemu: error: $*" >&2; exit 1; }

case "${1:-}" in
  "") [[ -s $out/stamp && -x $out/usr/bin/qemu-system-x86_64 ]] && { echo "$out"; exit 0; } ;;
  --force) ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac
[[ $(id -u) == 0 ]] || die "needs root (the prefix must belong to root: qbrokerd checks it)"

work=$(mktemp -d /var/tmp/qbroker-qemu10.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/lists/partial "$work"/cache/archives/partial "$work"/debs "$work"/root
cat > "$work/sources.list" <<LIST
deb [signed-by=$keyring] $mirror bookworm main
deb [signed-by=$keyring] $mirror bookworm-backports main
LIST
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
          -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
          -o APT::Sandbox::User=root)
log "resolving ${packages[*]}"
apt-get "${apt_opts[@]}" -qq update >&2 || die "apt-get update of bookworm-backports failed"
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${packages[@]}" >&2) ||
  die "apt-get download failed"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done

qemu=$work/root/usr/bin/qemu-system-x86_64
missing=$(ldd "$qemu" | awk '/not found/ { print $1 }')
[[ -z $missing ]] || die "libraries missing on this host: $missing (apt-get install qemu-system-x86 first)"
version=$("$qemu" --version | head -1)
[[ $version == "$want_version"* ]] || die "unpacked '$version', wanted $want_version"

# Owned by root and writable by root only, as qbrokerd requires of a QEMU install.
chown -R root:root "$work/root"
chmod -R go-w "$work/root"
for deb in "$work"/debs/*.deb; do dpkg-deb -f "$deb" Package Version | paste -sd' '; done \
  > "$work/root/stamp"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$work/root" "$out"
chmod 755 "$out"
log "$version in $out"
echo "$out"
