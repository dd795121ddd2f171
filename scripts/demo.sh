#!/usr/bin/env bash
# The main job on a fresh machine: set the host up, build, and run the demo on the embedded
# default storage (a loop-backed btrfs image that sandtree makes in its data dir). Then the RL
# examples (examples/rl) run against a real service: a private `sandtree serve` on its own data
# dir and socket under a throwaway directory, stopped with SIGTERM and removed at the end, also
# when a step fails or the demo is interrupted.
#
#   bash scripts/demo.sh [--data-dir DIR]     # arguments go to `sandtree demo`
#
# Environment: SANDTREE_DEMO_IMAGE (debian, the default: the task in Python; busybox: the same
# task in sh), SANDTREE_PYENV (the Python venv, default target/pyenv, as scripts/test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/rootfs-cache.sh
cargo build --release --locked -p sandtree
BIN="$(realpath "${CARGO_TARGET_DIR:-target}/release/sandtree")"
"$BIN" demo "$@"

echo
echo "== RL examples (examples/rl) against a private sandtree service"
PYENV="$(realpath -m "${SANDTREE_PYENV:-target/pyenv}")"
[ -x "$PYENV/bin/python" ] || python3 -m venv "$PYENV"
"$PYENV/bin/pip" install -q -e clients/python
IMAGE=${SANDTREE_DEMO_IMAGE:-debian}

WORK="$(mktemp -d /tmp/sandtree-demo-rl.XXXXXX)"
SOCK="$WORK/s.sock"
LOG="$WORK/serve.log"
PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    echo "stopping the private service (pid $PID)"
    kill -TERM "$PID"
    # The service stops its sandboxes and unmounts its loop image on SIGTERM.
    for _ in $(seq 600); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$PID" 2>/dev/null; then
      echo "the service did not stop in 60 s: SIGKILL" >&2
      kill -KILL "$PID" 2>/dev/null || true
    fi
    wait "$PID" 2>/dev/null || true
  fi
  # Only what this script made: the service's loop image under $WORK, if it was left mounted.
  local mnt="$WORK/data/storage/mnt" img="$WORK/data/storage/btrfs.img"
  if mountpoint -q "$mnt" 2>/dev/null; then
    umount "$mnt" 2>/dev/null || umount -l "$mnt" || true
  fi
  if [ -f "$img" ]; then
    losetup -j "$img" | cut -d: -f1 | while read -r dev; do losetup -d "$dev" 2>/dev/null || true; done
  fi
  if mountpoint -q "$mnt" 2>/dev/null; then
    echo "left $WORK in place: $mnt is still mounted" >&2
  else
    rm -rf "$WORK"
  fi
  if [ "$rc" != 0 ] && [ -n "${SERVE_LOG_TAIL:-}" ]; then printf '%s\n' "$SERVE_LOG_TAIL" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SANDTREE_LOG=${SANDTREE_LOG:-warn} NO_COLOR=1 \
  "$BIN" serve --data-dir "$WORK/data" --socket "$SOCK" </dev/null >"$LOG" 2>&1 &
PID=$!
export SANDTREE_SOCKET="$SOCK"
for i in $(seq 1200); do
  if ! kill -0 "$PID" 2>/dev/null; then
    SERVE_LOG_TAIL="$(tail -n 40 "$LOG")"
    echo "sandtree serve exited before it was ready" >&2
    exit 1
  fi
  [ -S "$SOCK" ] && "$BIN" stats >/dev/null 2>&1 && break
  [ "$i" = 1200 ] && { SERVE_LOG_TAIL="$(tail -n 40 "$LOG")"; echo "sandtree serve not ready in 120 s" >&2; exit 1; }
  sleep 0.1
done
echo "service pid $PID, data dir $WORK/data, socket $SOCK, image $IMAGE"

run_example() {
  echo
  echo "\$ python examples/rl/$*"
  if ! "$PYENV/bin/python" "examples/rl/$@" --image "$IMAGE"; then
    SERVE_LOG_TAIL="$(tail -n 40 "$LOG")"
    return 1
  fi
}
# Best-first tree search on the code-repair task, beside the same search replayed from turn 0.
run_example tree_search.py --seed 1 --width 3 --budget 30
# A k-turn prefix forked into G=8 rollouts, beside 8 fresh episodes that each replay the prefix.
run_example grpo_rollout.py --G 8 --k 8 --m 3 --setup-work 300000
echo
echo "== RL examples done"
