# Sourced by scripts/setup.sh and scripts/rootfs-cache.sh.

debian_mirror() {
  # First Debian (not -security) URI in the apt configuration, deb822 or one-line format.
  local m
  m=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' |
      grep -v -- '-security' | grep -E '/debian/?$' | head -n1 || true)
  if [ -z "$m" ]; then
    m=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '{for(i=2;i<=NF;i++) if ($i ~ /^(https?|file):/) {print $i; exit}}' |
        grep -v -- '-security' | grep -E '/debian/?$' | head -n1 || true)
  fi
  [ -n "$m" ] || { echo "cannot find a Debian mirror in /etc/apt; add one to sources.list" >&2; return 1; }
  echo "${m%/}"
}
