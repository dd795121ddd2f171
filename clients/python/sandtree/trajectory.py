"""Export an episode's turns as a trajectory (JSON Lines, docs/trajectory-format.md) and replay one
in a sandbox, reporting the first turn whose output differs.

    for rec in c.export(ep):                  # header first, then one dict per turn record
        f.write(json.dumps(rec) + "\\n")
    report = c.replay(map(json.loads, open("t.jsonl")), mask=r"\\d+\\.\\d+s")
    report.ok, report.divergence               # True, None

`Client.export` and `Client.replay` call the functions here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sandtree.errors import FailedPrecondition, NotFound

if TYPE_CHECKING:
    from sandtree.client import Client, Episode

__all__ = ["FORMAT", "VERSION", "WRITE_PREFIX", "ReplayReport", "export", "replay"]

FORMAT = "sandtree.trajectory"
VERSION = 1
WRITE_PREFIX = "# sandtree write "
"""The action of a `write_file` turn starts with this; the file's contents are not in the record."""

WRITE_ACTION = re.compile(r"^# sandtree write (.+) \((\d+) bytes, mode ([0-7]+)\)$", re.DOTALL)

COMPARED = ("stdout", "stderr", "exit_code", "cwd")
"""The fields `replay` compares, in this order (the first that differs is the divergence)."""


def export(client: Client, episode: str, all_forks: bool = False) -> Iterator[dict[str, Any]]:
    """The trajectory of `episode`: the header, then one record per turn of its live path (turn 0
    first), or with `all_forks` every turn record of its fork family (record order: a parent
    before its children). One Tree(whole, outputs) call and one ListEpisodes call."""
    ep = client.episode(episode)
    tree = ep.tree(whole=True, outputs=True)
    info = tree.episode
    known = {e.id: e for e in client.list_episodes()}
    known[info.id] = info
    yield {
        "format": FORMAT,
        "version": VERSION,
        "root": info.id,
        "image": info.image,
        "policy": info.policy,
    }
    recs = tree.family if all_forks else [t for t in tree.family if info.id in t.episodes]
    for t in recs:
        # The root if its path holds the record, else the first family episode (in the service's
        # family order) holding it: the same rule as `sandtree export`.
        if info.id in t.episodes:
            owner: str | None = info.id
        else:
            owner = next(
                (e for e in tree.family_episodes if e in t.episodes),
                t.episodes[0] if t.episodes else None,
            )
        oi = known.get(owner) if owner is not None else None
        yield {
            "record": t.record,
            "parent": t.parent_record or None,
            "episode": owner,
            "turn": t.turn,
            "action": t.action,
            "stdout": t.stdout,
            "stderr": t.stderr,
            "exit_code": t.exit_code,
            "duration_ms": t.duration_ms,
            "cwd": t.cwd,
            "verdict": t.verdict,
            "reasons": list(t.reasons),
            "node": t.node,
            "kind": t.kind,
            "bytes": t.bytes,
            "labels": dict(oi.labels) if oi is not None else {},
            "forked_from": (oi.forked_from or None) if oi is not None else None,
            "episodes": list(t.episodes),
            "forks": list(t.forks),
        }


@dataclass(frozen=True)
class ReplayReport:
    """What `replay` found."""

    ok: bool
    """Every replayed turn matched (and none was skipped)."""
    divergence: dict[str, Any] | None
    """The first difference: {"turn", "field", "expected", "actual"} (masked values); None if none."""
    turns: int
    """Turns run by the replay (steps and re-written files)."""
    skipped: tuple[int, ...] = ()
    """Turns not replayed: writes (`# sandtree write ...`) whose contents could not be recovered
    (the record lacks them; they are read from the recorded episode when it still exists)."""
    episode: str = ""
    """The episode the replay ran in (deleted afterwards unless `keep=True`)."""
    forked: bool = False
    """The replay started from a fork of the recorded episode at `from_turn`."""
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """The replayed turns as records (turn, action, stdout, stderr, exit_code, cwd)."""


def _live_path(records: list[dict[str, Any]], root: str | None) -> list[dict[str, Any]]:
    if root is None:
        root = next((r.get("episode") for r in records if r.get("episode")), None)
    path = [r for r in records if root is None or root in (r.get("episodes") or [r.get("episode")])]
    path.sort(key=lambda r: int(r["turn"]))
    turns = [int(r["turn"]) for r in path]
    if turns != list(range(turns[0] if turns else 0, (turns[0] if turns else 0) + len(turns))):
        raise ValueError(f"the records of {root}'s live path are not consecutive turns: {turns}")
    return path


def _written(client: Client, root: str | None, turn: int, action: str) -> bytes | None:
    """The contents a write turn wrote, read from a fork of the recorded episode at that turn
    (None when the episode is gone or the file no longer has the recorded size)."""
    m = WRITE_ACTION.match(action)
    if m is None or not root:
        return None
    try:
        (f,) = client.episode(root).fork(turn, 1)
    except (NotFound, FailedPrecondition):
        return None
    try:
        data = f.read_file(m.group(1))
    except (NotFound, FailedPrecondition, ValueError):
        return None
    finally:
        f.delete()
    return data if len(data) == int(m.group(2)) else None


def replay(
    client: Client,
    records: Iterable[dict[str, Any]],
    from_turn: int | None = None,
    image: str | None = None,
    mask: str | None = None,
    *,
    keep: bool = False,
    timeout: float | None = None,
) -> ReplayReport:
    """Re-runs the actions of a trajectory's live path (the header's `root`; records of turn >= 1)
    and compares each turn's stdout, stderr, exit_code and cwd with the record, stopping at the
    first difference.

    With `from_turn` and the recorded episode still there, the replay starts in a fork of it at
    that turn and runs the later turns; otherwise in a fresh episode on `image` (default: the
    header's) with the header's policy, from turn 1. `mask`: a regex whose matches are removed from
    both sides (stdout, stderr, cwd) before comparing (timestamps, pids, ...). A write turn's record
    holds its path, not its contents: while the recorded episode exists the contents are read from
    a fork of it at that turn and written again; otherwise `true` runs in its place, the turn is
    listed in `skipped` and `ok` is False. Per-step `env`/`cwd`/`stdin` options are not in the
    record either: a trajectory that used them replays without them. `keep`: leave the replay
    episode for inspection.
    """
    t0 = time.monotonic()
    recs = list(records)
    header: dict[str, Any] = {}
    if recs and recs[0].get("format") == FORMAT:
        header = recs.pop(0)
        if header.get("version") != VERSION:
            raise ValueError(f"trajectory version {header.get('version')} is not {VERSION}")
    root = header.get("root")
    path = _live_path(recs, root)
    rx = re.compile(mask) if mask else None

    def clean(v: Any) -> Any:
        return rx.sub("", v) if rx is not None and isinstance(v, str) else v

    ep: Episode | None = None
    forked = False
    start = 0
    if from_turn is not None and root:
        try:
            (ep,) = client.episode(root).fork(from_turn, 1)
            forked, start = True, from_turn
        except (NotFound, FailedPrecondition):
            ep = None
    if ep is None:
        img = image or header.get("image") or "busybox"
        ep = client.create(img, header.get("policy") or "auto")
    divergence: dict[str, Any] | None = None
    skipped: list[int] = []
    ran: list[dict[str, Any]] = []
    try:
        for rec in path:
            turn = int(rec["turn"])
            if turn <= start:
                continue
            action = str(rec.get("action", ""))
            if action.startswith(WRITE_PREFIX):
                data = _written(client, root, turn, action)
                m = WRITE_ACTION.match(action)
                if data is None or m is None:
                    skipped.append(turn)
                    ep.step("true", timeout=timeout)  # keep the turn numbers aligned with the record
                else:
                    ep.write_file(m.group(1), data, int(m.group(3), 8) or 0o644)
                    ran.append({"turn": turn, "action": action, "write": len(data)})
                continue
            r = ep.step(action, timeout=timeout)
            got: dict[str, Any] = {
                "stdout": r.stdout,
                "stderr": r.stderr,
                "exit_code": r.exit_code,
                "cwd": r.cwd,
            }
            ran.append({"turn": turn, "action": action, **got})
            for f in COMPARED:
                want, have = clean(rec.get(f)), clean(got[f])
                if want != have:
                    divergence = {"turn": turn, "field": f, "expected": want, "actual": have}
                    break
            if divergence is not None:
                break
    finally:
        if not keep:
            ep.delete()
    return ReplayReport(
        ok=divergence is None and not skipped,
        divergence=divergence,
        turns=len(ran),
        skipped=tuple(skipped),
        episode=ep.id,
        forked=forked,
        seconds=time.monotonic() - t0,
        records=ran,
    )
