"""Best-first tree search on a code-repair task, with sandtree forks, beside the same search
without them (every branch replayed in a fresh episode from turn 0).

    python examples/rl/tree_search.py [--image debian|busybox] [--seed 1] [--width 3] [--budget 30]

The service's socket is $SANDTREE_SOCKET (else /run/sandtree/sandtree.sock). A seeded scripted
policy proposes one-line sed edits to a small project with failing tests; the reward of a node is
the fraction of tests passing. The search expands the most promising node by forking it `width`
ways, each copy trying one proposed edit; a copy whose edit lowered the score is rewound to its
parent's turn and tries once more, then is deleted if it is still worse (a dead branch). Both runs
make the same decisions (same seed, same scores), so their wall times and sandbox command counts
compare like for like.
"""

from __future__ import annotations

import argparse
import heapq
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import repair_task as task

import sandtree

Action = tuple[str, str]


@dataclass
class Node:
    id: int
    parent: int | None
    action: Action | None
    score: float
    path: list[Action]
    turn: int
    ep: sandtree.Episode | None = None
    status: str = "open"  # open | expanded | dead | won
    retried: bool = False
    children: list[int] = field(default_factory=list)


class Forking:
    """Branches are forks of the node's live episode; a worse edit is rewound."""

    name = "sandtree (fork/rewind)"

    def __init__(self, c: sandtree.Client, image: str, p: task.Project, labels: dict[str, str]) -> None:
        self.c, self.image, self.p, self.labels = c, image, p, labels
        self.commands = self.forks = self.rewinds = self.episodes = 0

    def _run(self, ep: sandtree.Episode, act: Action) -> sandtree.StepResult:
        self.commands += 1
        return task.run_action(ep, act)

    def root(self) -> Node:
        ep = self.c.create(self.image, labels=self.labels)
        self.episodes += 1
        out = ""
        for act in task.setup_actions(self.p):
            out = self._run(ep, act).stdout
        path = task.setup_actions(self.p)
        return Node(0, None, None, task.reward(out), path, len(path), ep)

    def branch(self, parent: Node, n: int) -> list[sandtree.Episode | None]:
        assert parent.ep is not None
        self.forks += n
        self.episodes += n
        return list(parent.ep.fork(parent.turn, n))

    def evaluate(
        self, ep: sandtree.Episode | None, parent: Node, edit: Action, retry: bool
    ) -> tuple[float, int]:
        assert ep is not None
        if retry:
            self.rewinds += 1
            ep.rewind(parent.turn)
        self._run(ep, edit)
        r = self._run(ep, task.test_action(self.p))
        return task.reward(r.stdout), r.turn

    def drop(self, ep: sandtree.Episode | None) -> None:
        if ep is not None:
            ep.delete()


class Replaying:
    """The same search without checkpoints: each evaluation creates a fresh episode and replays
    the node's path from turn 0."""

    name = "fresh episode + replay from turn 0"

    def __init__(self, c: sandtree.Client, image: str, p: task.Project, labels: dict[str, str]) -> None:
        self.c, self.image, self.p, self.labels = c, image, p, labels
        self.commands = self.forks = self.rewinds = self.episodes = 0

    def _fresh(self, path: list[Action]) -> tuple[sandtree.Episode, str]:
        ep = self.c.create(self.image, policy="none", labels=self.labels)
        self.episodes += 1
        out = ""
        for act in path:
            self.commands += 1
            out = task.run_action(ep, act).stdout
        return ep, out

    def root(self) -> Node:
        path = task.setup_actions(self.p)
        ep, out = self._fresh(path)
        ep.delete()
        return Node(0, None, None, task.reward(out), path, len(path))

    def branch(self, parent: Node, n: int) -> list[sandtree.Episode | None]:
        return [None] * n

    def evaluate(
        self, ep: sandtree.Episode | None, parent: Node, edit: Action, retry: bool
    ) -> tuple[float, int]:
        fresh, out = self._fresh([*parent.path, edit, task.test_action(self.p)])
        fresh.delete()
        return task.reward(out), parent.turn + 2

    def drop(self, ep: sandtree.Episode | None) -> None:
        pass


def search(
    backend: Forking | Replaying, seed: int, width: int, budget: int
) -> tuple[list[Node], Node | None]:
    policy = task.Policy(backend.p, seed)
    root = backend.root()
    nodes = [root]
    frontier = [(-root.score, 0)]  # best score first; among equals the newest (deepest) node
    evals = 0
    winner: Node | None = root if root.score == 1.0 else None
    while frontier and winner is None and evals < budget:
        _, neg = heapq.heappop(frontier)
        nid = -neg
        parent = nodes[nid]
        parent.status = "expanded"
        for ep in backend.branch(parent, width):
            edit = policy.propose()
            score, turn = backend.evaluate(ep, parent, edit, retry=False)
            evals += 1
            retried = False
            if score < parent.score and evals < budget:
                edit = policy.propose()
                score, turn = backend.evaluate(ep, parent, edit, retry=True)
                evals += 1
                retried = True
            path = [*parent.path, edit, task.test_action(backend.p)]
            node = Node(len(nodes), nid, edit, score, path, turn, ep)
            node.retried = retried
            nodes.append(node)
            parent.children.append(node.id)
            if score < parent.score:
                node.status = "dead"
                backend.drop(ep)
                node.ep = None
            elif score == 1.0 and winner is None:
                node.status = "won"
                winner = node
            else:
                heapq.heappush(frontier, (-score, -node.id))
    return nodes, winner


def print_tree(nodes: list[Node], p: task.Project) -> None:
    def show(nid: int, depth: int) -> None:
        n = nodes[nid]
        what = "setup + tests" if n.action is None else task.describe(n.action)
        flags = " (retried after a rewind)" if n.retried else ""
        print(f"{'  ' * depth}#{n.id} score {n.score:.2f} [{n.status}]{flags}: {what[:80]}")
        for k in n.children:
            show(k, depth + 1)

    show(0, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default="debian")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--width", type=int, default=3, help="forks per expansion")
    ap.add_argument("--budget", type=int, default=30, help="most edits evaluated")
    args = ap.parse_args(argv)
    c = sandtree.Client()
    task.ensure_image(c, args.image)
    p = task.project(args.image)
    labels = {"example": "tree_search", "run": uuid.uuid4().hex[:8]}
    results = {}
    for backend in (Forking(c, args.image, p, labels), Replaying(c, args.image, p, labels)):
        t0 = time.monotonic()
        nodes, winner = search(backend, args.seed, args.width, args.budget)
        wall = time.monotonic() - t0
        results[backend.name] = (wall, backend.commands, backend.episodes, winner is not None)
        print(f"== {backend.name}")
        print_tree(nodes, p)
        if isinstance(backend, Forking):
            live = {n.ep.id for n in nodes if n.ep is not None}
            st = c.stats()
            mine = sum(e.checkpoint_bytes for e in st.per_episode if e.id in live)
            print(
                f"forks {backend.forks}, rewinds {backend.rewinds}, dead branches "
                f"{sum(n.status == 'dead' for n in nodes)}; checkpoint bytes of the live search tree "
                f"{mine} ({len(live)} episodes; service total {st.checkpoint_bytes})"
            )
            if winner is not None and winner.ep is not None:
                print(f"winning trajectory (episode {winner.ep.id}):")
                for t in winner.ep.tree().turns[1:]:
                    act = t.action.replace("\n", " ")
                    print(f"  turn {t.turn:2d} exit {t.exit_code} {t.kind:6s} {act[:90]}")
            for n in nodes:
                backend.drop(n.ep)
        print(
            f"solved: {winner is not None} (node #{winner.id if winner else '-'}, "
            f"score {max(n.score for n in nodes):.2f}); wall {wall:.2f} s; sandbox commands "
            f"{backend.commands}; episodes created {backend.episodes}\n"
        )
    (fw, fc, _, fs), (rw, rc, _, rs) = results.values()
    print(
        f"summary: sandtree {fw:.2f} s / {fc} commands vs replay-from-scratch {rw:.2f} s / {rc} commands "
        f"({rw / fw:.1f}x wall, {rc / max(fc, 1):.1f}x commands)"
    )
    return 0 if fs and rs else 1


if __name__ == "__main__":
    sys.exit(main())
