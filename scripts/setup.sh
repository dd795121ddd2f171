#!/usr/bin/env bash
# sandtree setup: installs every host requirement, idempotently.
#   - Debian packages (clang, libbpf-dev, btrfs-progs, zfs-fuse, busybox-static, debootstrap, runc, ...)
#   - CRIU 4.1.1 built from Debian trixie's source tarball (Debian 12's CRIU 3.17 fails on this kernel),
#     cached under $SANDTREE_CACHE so that a second run takes seconds.
#   - cargo-fuzz for scripts/fuzz.sh, from crates.io (pinned, installed once).
#   - tracefs / bpffs mounts, and the zfs-fuse daemon.
# No registry host is named here: the Debian mirror is read from the machine's apt configuration.
set -euo pipefail
. "$(dirname "$0")/lib/debian-mirror.sh"

CRIU_VERSION=4.1.1
CACHE=${SANDTREE_CACHE:-/var/cache/sandtree}
CRIU_PREFIX=${CRIU_PREFIX:-/usr/local}
log() { printf '[setup] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "setup.sh must run as root" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

PKGS=(
  clang llvm libbpf-dev linux-libc-dev btrfs-progs zfs-fuse busybox-static debootstrap runc
  chromium patch iptables iproute2 protobuf-compiler pkg-config build-essential xz-utils dpkg-dev curl ca-certificates
  # the self-signed certificates of the TLS tests (tests/tests/remote_calls_need_the_token.rs)
  openssl
  # CRIU build dependencies (MACHINE-NOTES)
  libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler python3-protobuf libnl-3-dev libnet1-dev
  libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev python3
  # the Python client's venv in scripts/test.sh
  python3-venv
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing packages: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "packages: all present"
fi

# ---- CRIU ------------------------------------------------------------------------------------------
. "$(dirname "$0")/lib/criu.sh"
if have_criu; then log "criu $CRIU_VERSION: installed"; else build_criu; fi

# ---- cargo-fuzz (scripts/fuzz.sh) -------------------------------------------------------------------
# From crates.io, pinned; installed once into ~/.cargo/bin.
CARGO_FUZZ_VERSION=0.13.2
if cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
  log "cargo-fuzz $CARGO_FUZZ_VERSION: installed"
else
  log "cargo-fuzz $CARGO_FUZZ_VERSION: installing (once, about 4 minutes)"
  env -u CARGO_TARGET_DIR cargo install --locked --quiet "cargo-fuzz@$CARGO_FUZZ_VERSION"
fi

# ---- kernel interfaces -----------------------------------------------------------------------------
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true

# ---- zfs-fuse daemon ---------------------------------------------------------------------------------
if ! pgrep -x zfs-fuse >/dev/null; then
  log "starting zfs-fuse"
  zfs-fuse
  for _ in $(seq 50); do zpool list >/dev/null 2>&1 && break; sleep 0.1; done
fi
log "done: $("$CRIU_PREFIX/sbin/criu" --version | head -n1) (build $CRIU_BUILD)"
