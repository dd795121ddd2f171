#!/usr/bin/env bash
# The cargo-fuzz targets of service/fuzz (docs/fuzzing.md), on the machine's one stable toolchain:
# cargo-fuzz passes nightly-only flags, which RUSTC_BOOTSTRAP=1 lets the stable compiler take. No
# sanitizer (`-s none`): the code under test is safe Rust; overflow checks and debug assertions are
# on. A panic, a hang past -timeout or an input over -rss_limit_mb fails the run.
#   bash scripts/fuzz.sh                 # every target, FUZZ_SECONDS (default 20) each
#   bash scripts/fuzz.sh unpack pagemap  # some targets
# Seeds come from service/fuzz/seeds.py; each run starts from them in a fresh corpus directory.
set -euo pipefail
cd "$(dirname "$0")/../service/fuzz"
SECS=${FUZZ_SECONDS:-20}
TD=$(realpath -m "${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-../../target}/fuzz}")
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(pagemap unpack environ mountinfo)
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none --target-dir "$TD"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for t in "${TARGETS[@]}"; do
  python3 seeds.py "$t" "$WORK/$t"
  echo "[fuzz] $t: ${SECS}s" >&2
  cargo fuzz run -s none --target-dir "$TD" "$t" "$WORK/$t" -- \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
done
