#!/usr/bin/env bash
# The main job on a fresh machine: set the host up, build, and run the demo on the embedded
# default storage (a loop-backed btrfs image that sandtree makes in its data dir).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked -p sandtree
exec ./target/release/sandtree demo "$@"
