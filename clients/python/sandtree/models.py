"""What the service answers, as frozen dataclasses (no protobuf types in the public API)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from google.protobuf.message import Message

from sandtree._pb.v1 import sandtree_pb2 as pb

__all__ = [
    "EpisodeInfo",
    "EpisodeStats",
    "Health",
    "Probe",
    "Stats",
    "StepResult",
    "Tree",
    "Turn",
]

T = TypeVar("T")


def _from_pb(cls: type[T], msg: Message, **computed: Any) -> T:
    """cls with each field copied from the same-named field of msg (repeated ones as tuples),
    except those given in `computed`."""
    kw: dict[str, Any] = dict(computed)
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in kw:
            v = getattr(msg, f.name)
            kw[f.name] = tuple(v) if not isinstance(v, str | bytes | int | float | bool) else v
    return cls(**kw)


@dataclass(frozen=True)
class StepResult:
    """The observation of one turn (`Episode.step`)."""

    turn: int
    """The turn this step made (the first step of an episode is turn 1)."""
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    exit_code: int
    timed_out: bool
    """The step hit its timeout; its process group was killed."""
    duration: float
    """Seconds the command ran."""
    checkpoint_wait: float
    """Seconds the step waited for the previous turn's checkpoint before it ran."""
    cwd: str
    """The shell's working directory after the turn."""
    verdict: str
    """What the turn changed: none | fs | proc; may be empty while its checkpoint is pending."""
    reasons: tuple[str, ...]
    node: int

    @property
    def ok(self) -> bool:
        """Exit code 0 and no timeout."""
        return self.exit_code == 0 and not self.timed_out

    @staticmethod
    def from_pb(m: pb.StepResponse) -> StepResult:
        return _from_pb(StepResult, m, duration=m.duration_ms / 1000.0, checkpoint_wait=m.accepted_us / 1e6)


@dataclass(frozen=True)
class EpisodeInfo:
    id: str
    image: str
    policy: str
    """none | full | auto"""
    status: str
    turn: int
    """The episode's current turn (0: nothing run yet)."""
    forked_from: str
    """Where this episode was forked from, as "EPISODE@TURN" ("" if it was not forked)."""

    @staticmethod
    def from_pb(m: pb.EpisodeInfo) -> EpisodeInfo:
        return _from_pb(EpisodeInfo, m)


@dataclass(frozen=True)
class Turn:
    """One turn of an episode's path in the checkpoint tree."""

    turn: int
    action: str
    """The command of the turn ("" for turn 0)."""
    exit_code: int
    verdict: str
    reasons: tuple[str, ...]
    node: int
    kind: str
    """base | shared | fs | full"""
    bytes: int
    """Checkpoint bytes of the node (0 when shared)."""
    state: str
    """pending | committed | failed | collected"""
    cwd: str
    image_bytes: int
    """The CRIU image part of `bytes`."""
    image_dumped_bytes: int
    """What CRIU wrote for the image (more when pages were deduplicated)."""
    image_parent: int
    """Node whose image holds the unchanged pages (0: none)."""

    @staticmethod
    def from_pb(m: pb.TurnInfo) -> Turn:
        return _from_pb(Turn, m)


@dataclass(frozen=True)
class Tree:
    """An episode and the turns of its path, turn 0 first."""

    episode: EpisodeInfo
    turns: tuple[Turn, ...]

    def __getitem__(self, turn: int) -> Turn:
        """The turn numbered `turn`."""
        for t in self.turns:
            if t.turn == turn:
                return t
        raise KeyError(turn)

    @staticmethod
    def from_pb(m: pb.TreeResponse) -> Tree:
        return Tree(EpisodeInfo.from_pb(m.episode), tuple(Turn.from_pb(t) for t in m.turns))


@dataclass(frozen=True)
class Probe:
    name: str
    ok: bool
    detail: str
    fix: str


@dataclass(frozen=True)
class Health:
    version: str
    storage: str
    inspector: str
    probes: tuple[Probe, ...]

    @staticmethod
    def from_pb(m: pb.HealthResponse) -> Health:
        return _from_pb(Health, m, probes=tuple(_from_pb(Probe, p) for p in m.probes))


@dataclass(frozen=True)
class EpisodeStats:
    id: str
    policy: str
    status: str
    turn: int
    checkpoint_bytes: int
    nodes_fs: int
    nodes_full: int
    turns_shared: int
    image_bytes: int
    image_dumped_bytes: int


@dataclass(frozen=True)
class Stats:
    """Service-wide checkpoint totals and timings (milliseconds, p50/p99 over its lifetime)."""

    checkpoint_bytes: int
    episodes: int
    nodes_fs: int
    nodes_full: int
    turns_shared: int
    per_episode: tuple[EpisodeStats, ...]
    dump_ms_p50: float
    dump_ms_p99: float
    snapshot_ms_p50: float
    snapshot_ms_p99: float
    restore_ms_p50: float
    restore_ms_p99: float
    checkpoint_ms_p50: float
    checkpoint_ms_p99: float
    dedup_ms_p50: float
    dedup_ms_p99: float
    image_bytes: int
    image_dumped_bytes: int
    inspector: str
    inspector_loaded: bool
    bpf_map_bytes: int
    verdicts_checked: int
    verdicts_unsafe: int
    verdicts_fs_without_change: int
    watched_sandboxes: int
    sandbox_map_bytes: int

    @staticmethod
    def from_pb(m: pb.StatsResponse) -> Stats:
        return _from_pb(Stats, m, per_episode=tuple(_from_pb(EpisodeStats, e) for e in m.per_episode))


def timeout_ms(timeout: float | None) -> int:
    """StepRequest.timeout_ms for a timeout in seconds (None: the service's default)."""
    if timeout is None:
        return 0
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return math.ceil(timeout * 1000)
