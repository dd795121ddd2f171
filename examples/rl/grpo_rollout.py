"""A GRPO-shaped rollout group: a shared prefix of k turns, forked into G copies that continue
independently with a seeded policy; the group's rewards become group-normalized advantages. The
same group is then rolled out without sandtree (G fresh episodes, each replaying the prefix) and
the wall times are compared.

    python examples/rl/grpo_rollout.py [--image debian|busybox] [--G 8] [--k 8] [--m 3] [--seed 0]
                                        [--setup-work 300000]

The service's socket is $SANDTREE_SOCKET (else /run/sandtree/sandtree.sock). The task is the code
repair of repair_task.py: the prefix writes the project and runs its tests (padded to `--k` turns
with inspection turns; `--setup-work` adds a CPU-bound shell loop standing in for a slow setup
such as a dependency install), each rollout then makes `--m` random edits and runs the tests; its reward is
the fraction of tests passing at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import repair_task as task

import sandtree

Action = tuple[str, str]


def prefix(p: task.Project, k: int, setup_work: int) -> list[Action]:
    acts = task.setup_actions(p)
    if setup_work > 0:
        # A CPU-bound stand-in for a slow setup (pip install, a build): a sleep would cost the
        # G fresh episodes no more wall time than one, as they sleep side by side.
        loop = f"i=0; while [ $i -lt {setup_work} ]; do i=$((i+1)); done"
        acts.append(("step", f"{loop}  # stand-in for a slow setup"))
    inspect = [("step", f"cd {task.WORKDIR} && ls -l && wc -l {name}") for name in p.files]
    while len(acts) < k:
        acts.append(inspect[len(acts) % len(inspect)])
    return acts


def continuation(p: task.Project, seed: int, m: int) -> list[Action]:
    pol = task.Policy(p, seed)
    return [pol.propose() for _ in range(m)] + [task.test_action(p)]


def advantages(rewards: list[float]) -> list[float]:
    mean = statistics.fmean(rewards)
    std = statistics.pstdev(rewards)
    return [(r - mean) / (std + 1e-6) for r in rewards]


def run(ep: sandtree.Episode, acts: list[Action]) -> tuple[str, int]:
    out = ""
    for a in acts:
        out = task.run_action(ep, a).stdout
    return out, len(acts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default="debian")
    ap.add_argument("--G", type=int, default=8, help="group size")
    ap.add_argument("--k", type=int, default=8, help="prefix turns (at least the setup's)")
    ap.add_argument("--m", type=int, default=3, help="edits per rollout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--setup-work",
        type=int,
        default=300000,
        help="iterations of a shell loop in a prefix turn standing in for a CPU-bound setup such as "
        "a dependency install (300000: about 1 s of one core; 0: none)",
    )
    args = ap.parse_args(argv)
    c = sandtree.Client()
    task.ensure_image(c, args.image)
    p = task.project(args.image)
    labels = {"example": "grpo_rollout", "run": uuid.uuid4().hex[:8]}
    pre = prefix(p, args.k, args.setup_work)
    conts = [continuation(p, args.seed * 1000 + g, args.m) for g in range(args.G)]

    # With sandtree: the prefix once, then G forks at its last turn, continued concurrently.
    t0 = time.monotonic()
    with c.create(args.image, labels=labels) as root:
        run(root, pre)
        t_prefix = time.monotonic() - t0
        kids = root.fork(len(pre), args.G)
        t_fork = time.monotonic() - t0 - t_prefix
        t1 = time.monotonic()
        with ThreadPoolExecutor(args.G) as pool:
            outs = list(pool.map(run, kids, conts))
            t_cont = time.monotonic() - t1
            list(pool.map(sandtree.Episode.delete, kids))
    fork_wall = time.monotonic() - t0
    fork_cmds = len(pre) + sum(n for _, n in outs)
    rewards = [task.reward(o) for o, _ in outs]

    # Without: G fresh episodes, each replaying the prefix, concurrently.
    def fresh(cont: list[Action]) -> tuple[str, int]:
        with c.create(args.image, policy="none", labels=labels) as ep:
            out, n = run(ep, [*pre, *cont])
        return out, n

    t0 = time.monotonic()
    with ThreadPoolExecutor(args.G) as pool:
        fouts = list(pool.map(fresh, conts))
    fresh_wall = time.monotonic() - t0
    fresh_cmds = sum(n for _, n in fouts)
    fresh_rewards = [task.reward(o) for o, _ in fouts]

    adv = advantages(rewards)
    print(
        f"prefix: {len(pre)} turns in {t_prefix:.2f} s; fork x{args.G} in {t_fork:.2f} s; "
        f"{args.G} continuations of {args.m + 1} turns, concurrently, in {t_cont:.2f} s"
    )
    print(" g  reward  advantage  edits")
    for g, (r, a) in enumerate(zip(rewards, adv, strict=True)):
        edits = "; ".join(task.describe(x) for x in conts[g][:-1])
        print(f"{g:2d}  {r:6.2f}  {a:+9.3f}  {edits}")
    same = rewards == fresh_rewards
    print(f"rewards identical without sandtree: {same}")
    print(
        f"summary: G={args.G} k={len(pre)} m={args.m}: fork {fork_wall:.2f} s / {fork_cmds} commands vs "
        f"G fresh episodes {fresh_wall:.2f} s / {fresh_cmds} commands ({fresh_wall / fork_wall:.1f}x wall)"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
