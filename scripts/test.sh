#!/usr/bin/env bash
# The test command (README, CI): set the host up, check format and lints, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/rootfs-cache.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked
# Sandbox tests are timing-sensitive on 2 cores: run two at a time.
cargo test --workspace --locked -- --test-threads=2
