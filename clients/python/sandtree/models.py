"""What the service answers, as frozen dataclasses (no protobuf types in the public API)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, TypeVar

from google.protobuf.message import Message

from sandtree._pb.v1 import sandtree_pb2 as pb

__all__ = [
    "Chunk",
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


def _text(b: Any) -> str:
    # In Turn, the field `bytes` shadows the builtin for annotations: decode outside the class.
    return bytes(b).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class StepResult:
    """The observation of one turn (`Episode.step`, `Episode.write_file`, the end of
    `Episode.step_stream`)::

        r = ep.step("echo hi; exit 3")
        r.turn, r.stdout, r.exit_code  # (1, "hi\\n", 3)
    """

    turn: int
    """The turn this step made (the first step of an episode is turn 1)."""
    stdout: str
    """The command's standard output, decoded as UTF-8 (undecodable bytes become U+FFFD)."""
    stderr: str
    exit_code: int
    """The command's exit status (128+N when killed by signal N; 0 for a write)."""
    duration_ms: int
    """Milliseconds the command ran."""
    cwd: str
    """The shell's working directory after the turn."""
    verdict: str
    """What the turn changed: none | fs | proc (a write is always fs)."""
    timed_out: bool
    """The step hit its timeout; its process group was killed."""
    stdout_truncated: bool
    """Output past the step's cap (`max_output`, at most the server's 1 MiB) was dropped."""
    stderr_truncated: bool
    reasons: tuple[str, ...]
    """Why the verdict is what it is."""
    node: int
    """The checkpoint node of the turn."""
    accepted_us: int
    """Microseconds the step waited for the previous turn's checkpoint before it ran."""
    stdout_bytes: bytes = field(repr=False)
    """The raw bytes of stdout."""
    stderr_bytes: bytes = field(repr=False)

    @property
    def ok(self) -> bool:
        """Exit code 0 and no timeout."""
        return self.exit_code == 0 and not self.timed_out

    @property
    def duration(self) -> float:
        """Seconds the command ran (`duration_ms` / 1000)."""
        return self.duration_ms / 1000.0

    @property
    def checkpoint_wait(self) -> float:
        """Seconds the step waited for the previous turn's checkpoint (`accepted_us` / 1e6)."""
        return self.accepted_us / 1e6

    @staticmethod
    def from_pb(m: pb.StepResponse) -> StepResult:
        return _from_pb(
            StepResult,
            m,
            stdout=m.stdout.decode("utf-8", errors="replace"),
            stderr=m.stderr.decode("utf-8", errors="replace"),
            stdout_bytes=m.stdout,
            stderr_bytes=m.stderr,
        )


class Chunk(NamedTuple):
    """A piece of a running step's output, as `Episode.step_stream` yields it. A tuple:
    `("stdout", b"...")` or `("stderr", b"...")`."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class EpisodeInfo:
    id: str
    image: str
    policy: str
    """none | full | auto"""
    status: str
    """running | stopped | deleted"""
    turn: int
    """The episode's current turn (0: nothing run yet)."""
    forked_from: str
    """Where this episode was forked from, as "EPISODE@TURN" ("" if it was not forked)."""
    labels: dict[str, str] = field(hash=False)
    """The labels given at create (forks inherit them)."""

    @staticmethod
    def from_pb(m: pb.EpisodeInfo) -> EpisodeInfo:
        return _from_pb(EpisodeInfo, m, labels=dict(m.labels))


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
    record: int = 0
    """In `Tree.family` only: the turn record's id (unique in the family)."""
    parent_record: int = 0
    """In `Tree.family` only: the record this one follows (0 for turn 0)."""
    episodes: tuple[str, ...] = ()
    """In `Tree.family` only: the episodes whose live path holds this record."""
    forks: tuple[str, ...] = ()
    """In `Tree.family` only: the episodes forked at this record."""
    stdout: str = field(default="", repr=False)
    """With `tree(outputs=True)`: what the turn printed, as recorded (cut at the step's output cap)."""
    stderr: str = field(default="", repr=False)
    duration_ms: int = 0
    """With `tree(outputs=True)`: milliseconds the turn's command ran."""

    @staticmethod
    def from_pb(m: pb.TurnInfo) -> Turn:
        return _from_pb(
            Turn,
            m,
            stdout=_text(m.stdout),
            stderr=_text(m.stderr),
        )


@dataclass(frozen=True)
class Tree:
    """An episode and the turns of its path, turn 0 first; with `tree(whole=True)` also every
    turn record of its fork family (`family`, a tree through `Turn.parent_record`)."""

    episode: EpisodeInfo
    turns: tuple[Turn, ...]
    family: tuple[Turn, ...] = ()
    """With `whole=True`: every turn record of the fork family, in record order (a parent before
    its children), each with `record`, `parent_record`, `episodes` and `forks`."""
    family_root: str = ""
    """With `whole=True`: the episode the family descends from."""
    family_episodes: tuple[str, ...] = ()
    """With `whole=True`: the family's episodes."""

    def __getitem__(self, turn: int) -> Turn:
        """The turn numbered `turn`."""
        for t in self.turns:
            if t.turn == turn:
                return t
        raise KeyError(turn)

    @staticmethod
    def from_pb(m: pb.TreeResponse) -> Tree:
        return Tree(
            EpisodeInfo.from_pb(m.episode),
            tuple(Turn.from_pb(t) for t in m.turns),
            family=tuple(Turn.from_pb(t) for t in m.family),
            family_root=m.family_root,
            family_episodes=tuple(m.family_episodes),
        )


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
    memory_bytes: int  # anonymous memory (RSS) of its running sandbox; 0 when stopped
    fs_verdicts_refuted: int  # fs turns on its live path that share their parent's node: no change


@dataclass(frozen=True)
class Prepared:
    """What `Episode.prepare` left ready: copies of the node, their memory (frozen), every warm
    copy's memory on the service, and copies of other nodes evicted to make room."""

    ready: int
    memory_bytes: int
    warm_bytes: int
    evicted: int

    @staticmethod
    def from_pb(m: pb.PrepareResponse) -> Prepared:
        return _from_pb(Prepared, m)


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
    # The host-wide checkpoint scheduler (edf or fifo) and what it did.
    scheduler: str
    checkpoint_slots: int
    checkpoints_promoted: int
    checkpoint_batches: int
    checkpoints_batched: int
    queue_wait_ms_p50: float
    queue_wait_ms_p99: float
    queue_wait_ms_max: float
    sandbox_memory_bytes: int
    # Warm copies ready now, their memory, forks that took one or found none, evictions.
    warm_copies: int
    warm_memory_bytes: int
    warm_hits: int
    warm_misses: int
    warm_evicted: int
    # Fs snapshots not taken since the service started: the storage layer saw no change.
    fs_verdicts_refuted: int

    @staticmethod
    def from_pb(m: pb.StatsResponse) -> Stats:
        return _from_pb(Stats, m, per_episode=tuple(_from_pb(EpisodeStats, e) for e in m.per_episode))
