#!/usr/bin/env bash
# System part of `make setup`: Debian packages and kernel headers for bcc.
# Idempotent and quick when everything is already there.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "setup: must run as root (it installs Debian packages and loads eBPF)" >&2
    exit 1
fi

PKGS="python3-bpfcc python3-seccomp python3-dev python3-venv liburing-dev bpftool bpftrace strace gcc make runc golang-github-containers-common fio fuse2fs sqlite3 e2fsprogs git prometheus podman systemd"
updated=0
apt_update() { [ $updated = 1 ] || { apt-get update -q >/dev/null; updated=1; }; }

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

# bcc compiles its programs against /lib/modules/$(uname -r)/{build,source}.
# Every offset into a kernel struct comes from BTF at load time, so headers
# of a nearby version serve; they only provide types bcc's own helpers use.
krel=$(uname -r)
kdir=/lib/modules/$krel
if [ -e "$kdir/build/include/linux/kconfig.h" ] || [ -e "$kdir/source/include/linux/kconfig.h" ]; then
    exit 0
fi
apt_update
if apt-cache show "linux-headers-$krel" >/dev/null 2>&1; then
    echo "setup: installing linux-headers-$krel"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$krel" >/dev/null
    exit 0
fi
arch=$(dpkg --print-architecture)
flavour=$(apt-cache pkgnames linux-headers- | grep -E "^linux-headers-[0-9.]+-[0-9]+-$arch\$" | sort -V | tail -n 1)
if [ -z "$flavour" ]; then
    echo "setup: no linux-headers-*-$arch package in the package index; bcc cannot compile" >&2
    exit 1
fi
common=${flavour%-$arch}-common
root=/opt/drb-uring/kheaders
echo "setup: no headers for kernel $krel; unpacking $flavour and $common into $root"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q "$flavour" "$common" >/dev/null 2>&1)
rm -rf "$root"
mkdir -p "$root"
for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$root"; done
mkdir -p "$kdir"
ln -sfn "$root/usr/src/$flavour" "$kdir/build"
ln -sfn "$root/usr/src/$common" "$kdir/source"
test -e "$kdir/source/include/linux/kconfig.h"
