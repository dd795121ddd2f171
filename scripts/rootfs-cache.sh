#!/usr/bin/env bash
# Caches the debian rootfs (debootstrap minbase + python3 + git, about a minute) so that
# `sandtree image build debian` copies it instead of bootstrapping again. The mirror comes from the
# apt configuration.
set -euo pipefail
. "$(dirname "$0")/lib/debian-mirror.sh"
CACHE=${SANDTREE_CACHE:-/var/cache/sandtree}/rootfs
dst=$CACHE/debian
if [ -x "$dst/usr/bin/python3" ] && [ -x "$dst/usr/bin/git" ] && [ -f "$dst/.complete" ]; then
  echo "[rootfs] debian: cached at $dst" >&2; exit 0
fi
mirror=$(debian_mirror)
echo "[rootfs] debian: debootstrap bookworm from $mirror" >&2
rm -rf "$dst.tmp" && mkdir -p "$dst.tmp"
debootstrap --variant=minbase --include=python3,git bookworm "$dst.tmp" "$mirror" >/dev/null
rm -rf "$dst.tmp/var/cache/apt/archives"/*.deb
touch "$dst.tmp/.complete"
rm -rf "$dst" && mv "$dst.tmp" "$dst"
