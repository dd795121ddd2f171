#!/usr/bin/env bash
# Caches the debian test rootfs (debootstrap minbase + python3 + git, about a minute) so that test
# services import it instead of bootstrapping it again. The mirror comes from the apt configuration.
set -euo pipefail
CACHE=${SANDTREE_CACHE:-/var/cache/sandtree}/rootfs
dst=$CACHE/debian
if [ -x "$dst/usr/bin/python3" ] && [ -x "$dst/usr/bin/git" ] && [ -f "$dst/.complete" ]; then
  echo "[rootfs] debian: cached at $dst" >&2; exit 0
fi
mirror=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | grep -E '/debian/?$' | head -n1 || true)
[ -n "$mirror" ] || mirror=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | grep -v security | head -n1)
echo "[rootfs] debian: debootstrap bookworm from $mirror" >&2
rm -rf "$dst.tmp" && mkdir -p "$dst.tmp"
debootstrap --variant=minbase --include=python3,git bookworm "$dst.tmp" "$mirror" >/dev/null
rm -rf "$dst.tmp/var/cache/apt/archives"/*.deb
touch "$dst.tmp/.complete"
rm -rf "$dst" && mv "$dst.tmp" "$dst"
