#!/usr/bin/env bash
# The test command (README, CI): set the host up, check format and lints, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/rootfs-cache.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked
# The fuzz targets (service/fuzz, docs/fuzzing.md), briefly: a crash fails the run.
FUZZ_SECONDS="${FUZZ_SECONDS:-20}" bash scripts/fuzz.sh
# The Python client and its test dependencies (Playwright too, which drives Debian's chromium,
# /usr/bin/chromium from setup.sh, headless; no browser download), in a venv the Rust tests can use as well.
PYENV="$(realpath -m "${SANDTREE_PYENV:-target/pyenv}")"
[ -x "$PYENV/bin/python" ] || python3 -m venv "$PYENV"
"$PYENV/bin/pip" install -q -e 'clients/python[test]'
export SANDTREE_BROWSER_PYTHON="$PYENV/bin/python"
# Sandbox tests are timing-sensitive on 2 cores: run two at a time.
cargo test --workspace --locked -- --test-threads=2
# The Python client (clients/python) against the binary just built: lint, types, tests.
export SANDTREE_BIN="$(realpath "${CARGO_TARGET_DIR:-target}/debug/sandtree")"
(
  cd clients/python
  "$PYENV/bin/ruff" check . ../../examples/rl
  "$PYENV/bin/ruff" format --check . ../../examples/rl
  "$PYENV/bin/mypy"
  "$PYENV/bin/pytest" -q tests
)
