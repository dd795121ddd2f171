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
# Our patches to CRIU (scripts/patches/criu-$CRIU_VERSION-*.patch) are part of the cache key.
PATCHES=("$(dirname "$0")"/patches/criu-"$CRIU_VERSION"-*.patch)
CRIU_BUILD="$CRIU_VERSION-$(cat "${PATCHES[@]}" | sha256sum | cut -c1-12)"
CRIU_CACHED="$CACHE/criu-$CRIU_BUILD/criu"

have_criu() {
  local bin="$CRIU_PREFIX/sbin/criu"
  [ -x "$bin" ] && [ -x "$CRIU_CACHED" ] && cmp -s "$bin" "$CRIU_CACHED"
}

build_criu() {
  local cached="$CRIU_CACHED"
  if [ -x "$cached" ] && "$cached" --version 2>/dev/null | grep -q "Version: $CRIU_VERSION"; then
    log "criu $CRIU_VERSION: using cached build $cached"
  else
    local work="$CACHE/criu-src" mirror
    mirror=$(debian_mirror)
    log "criu $CRIU_VERSION: fetching source from trixie on $mirror"
    mkdir -p "$work/etc/sources.list.d" "$work/lists/partial" "$work/dl"
    cat >"$work/etc/sources.list.d/trixie-src.sources" <<SRC
Types: deb-src
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    # A private apt state: the host's own sources and lists stay untouched.
    local aptopts=(-o "Dir::Etc::SourceParts=$work/etc/sources.list.d" -o "Dir::Etc::SourceList=/dev/null"
                   -o "Dir::State::Lists=$work/lists" -o "APT::Sandbox::User=root")
    apt-get "${aptopts[@]}" update -qq
    local tarball="criu_${CRIU_VERSION}.orig.tar.xz" want
    want=$(apt-cache "${aptopts[@]}" showsrc criu | awk -v f="$tarball" '
      /^Checksums-Sha256:/ {s=1; next} /^[^ ]/ {s=0} s && $3==f {print $1; exit}')
    [ -n "$want" ] || { echo "trixie has no $tarball in its Sources index" >&2; exit 1; }
    if [ ! -f "$work/dl/$tarball" ] || ! echo "$want  $work/dl/$tarball" | sha256sum -c --quiet - 2>/dev/null; then
      # The .dsc may 404 on some mirrors; the orig tarball is what we need (MACHINE-NOTES).
      (cd "$work/dl" && apt-get "${aptopts[@]}" source --download-only "criu=$(apt-cache "${aptopts[@]}" showsrc criu |
         awk '/^Version:/ {print $2; exit}')" >/dev/null 2>&1 || true)
    fi
    [ -f "$work/dl/$tarball" ] || { echo "download of $tarball failed" >&2; exit 1; }
    echo "$want  $work/dl/$tarball" | sha256sum -c --quiet - || { echo "$tarball: sha256 mismatch" >&2; exit 1; }
    rm -rf "$work/build" && mkdir -p "$work/build"
    tar -xJf "$work/dl/$tarball" -C "$work/build" --strip-components=1
    local p
    for p in "${PATCHES[@]}"; do
      log "criu $CRIU_VERSION: applying $(basename "$p")"
      patch -d "$work/build" -p1 --quiet <"$p" || { echo "patch $p does not apply" >&2; exit 1; }
    done
    log "criu $CRIU_VERSION: building (about 2 minutes)"
    # Debian's python3 must be used for the build (it has python3-protobuf), not a pyenv shim.
    (cd "$work/build" && PATH=/usr/sbin:/usr/bin:/sbin:/bin make -j"$(nproc)" criu >"$work/build.log" 2>&1) ||
      { tail -n 40 "$work/build.log" >&2; echo "criu build failed; log: $work/build.log" >&2; exit 1; }
    mkdir -p "$(dirname "$cached")"
    install -m 0755 "$work/build/criu/criu" "$cached"
    rm -rf "$work/build"
  fi
  install -D -m 0755 "$cached" "$CRIU_PREFIX/sbin/criu"
}

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
