# Sourced by scripts/setup.sh and deploy/Dockerfile: CRIU $CRIU_VERSION from Debian trixie's
# source tarball (checked against the signed Sources index), with our patches, built and cached.
# Needs: log(), $CACHE, $CRIU_PREFIX, $CRIU_VERSION, debian_mirror (lib/debian-mirror.sh), and
# the CRIU build dependencies of setup.sh's package list.

# Our patches to CRIU (scripts/patches/criu-$CRIU_VERSION-*.patch) are part of the cache key.
PATCHES=("$(dirname "${BASH_SOURCE[0]}")"/../patches/criu-"$CRIU_VERSION"-*.patch)
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

