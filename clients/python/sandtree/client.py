"""The synchronous client: `Client` (one channel to the service) and `Episode` (a handle).

Example::

    import sandtree

    c = sandtree.Client()
    with c.create("busybox", labels={"task": "t1"}) as ep:  # deleted on exit
        ep.write_file("/workspace/a.py", b"print(1)\\n")
        r = ep.step("cat /workspace/a.py", timeout=30)
        kids = ep.fork(turn=1, n=4)  # live copies of turn 1
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

import grpc

from sandtree._common import (
    bundle_chunks,
    check_count,
    check_warm,
    checked,
    create_request,
    list_request,
    read_request,
    read_result,
    resolve_endpoint,
    step_request,
    write_request,
)
from sandtree._pb.v1 import sandtree_pb2 as pb
from sandtree._pb.v1 import sandtree_pb2_grpc as pb_grpc
from sandtree.errors import from_rpc_error
from sandtree.models import Chunk, EpisodeInfo, Health, Prepared, Stats, StepResult, Tree

if TYPE_CHECKING:
    from sandtree.trajectory import ReplayReport

__all__ = ["Client", "Episode"]

Progress = Callable[[str], None]


class Client:
    """A connection to the sandtree service on its unix socket, or on its TCP listener.

    `socket`: the argument, else $SANDTREE_SOCKET, else /run/sandtree/sandtree.sock. Or
    `addr="tcp://HOST:PORT"` (else $SANDTREE_ADDR, when no `socket` is given): the listener of
    `sandtree serve --listen`, with `token_file` (else $SANDTREE_TOKEN_FILE; mode 0600 or 0400)
    whose token every call carries, and `tls_ca` (else $SANDTREE_TLS_CA), a CA certificate (PEM),
    for a listener with TLS. A bad token file raises `InvalidArgument` here; a wrong token
    raises `Unauthenticated` on the first call. Connecting is lazy: a service that is not
    running shows as `Unavailable` on the first call. Thread-safe; close it (or use it as a
    context manager) when done::

        with sandtree.Client() as c:
            ep = c.create("busybox", policy="auto", labels={"task": "t1"})
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        addr: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
    ) -> None:
        self.endpoint = resolve_endpoint(socket, addr, token_file, tls_ca)
        self.socket = self.endpoint.socket
        self.addr = None if self.endpoint.addr is None else f"tcp://{self.endpoint.addr}"
        ep = self.endpoint
        if ep.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=ep.tls_ca)
            self._channel = grpc.secure_channel(ep.target(), creds, options=ep.options())
        else:
            self._channel = grpc.insecure_channel(ep.target(), options=ep.options())
        self._metadata = ep.metadata
        self._stub = pb_grpc.SandtreeStub(self._channel)  # type: ignore[no-untyped-call]  # generated, untyped

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.endpoint.where) from None

    def _call(self, method: str, request: Any) -> Any:
        with self._errors():
            return getattr(self._stub, method)(request, metadata=self._metadata)

    def health(self) -> Health:
        """The service's version, storage, inspector and host probes."""
        return Health.from_pb(self._call("Health", pb.HealthRequest()))

    def create(
        self,
        image: str = "busybox",
        policy: str = "auto",
        *,
        labels: Mapping[str, str] | None = None,
        memory_mib: int | None = None,
        pids: int | None = None,
        cpus: float | None = None,
    ) -> Episode:
        """A new episode on `image`, its sandbox started.

        `policy`: none | full | auto. `labels`: at most 32, keys 1..=256 bytes, values at most 256
        (`episodes(labels=...)` filters on them; forks inherit them). `memory_mib` (>= 16),
        `pids` (>= 8), `cpus` (>= 0.01): this episode's limits, each at most the server's
        (--sandbox-memory-mib, --sandbox-pids, --sandbox-cpus); None: the server's. Raises
        `InvalidArgument` past a limit, `NotFound` for an unknown image, `ResourceExhausted` when the
        host has --max-episodes live::

            ep = c.create("busybox", labels={"task": "t1"}, memory_mib=256)
        """
        req = create_request(image, policy, labels, memory_mib, pids, cpus)
        return Episode(self, self._call("CreateEpisode", req).id)

    def episode(self, id: str) -> Episode:
        """A handle on an existing episode (no call is made; an unknown id fails at first use)."""
        return Episode(self, id)

    def episodes(self, labels: Mapping[str, str] | None = None, status: str | None = None) -> list[Episode]:
        """Handles on the episodes whose labels include every one of `labels` and whose status is
        `status` (running | stopped | deleted; None: all but deleted)::

            for ep in c.episodes(labels={"task": "t1"}):
                ep.delete()
        """
        return [Episode(self, e.id) for e in self.list_episodes(labels, status)]

    def list_episodes(
        self, labels: Mapping[str, str] | None = None, status: str | None = None
    ) -> list[EpisodeInfo]:
        """What `episodes` selects, as `EpisodeInfo` (image, policy, status, turn, labels, ...)."""
        r = self._call("ListEpisodes", list_request(labels, status))
        return [EpisodeInfo.from_pb(e) for e in r.episodes]

    def stats(self, reset_timings: bool = False) -> Stats:
        """Checkpoint totals and timings; `reset_timings` clears the timing samples after this answer."""
        return Stats.from_pb(self._call("Stats", pb.StatsRequest(reset_timings=reset_timings)))

    def images(self) -> list[str]:
        """The names of the images episodes can be created from."""
        return list(self._call("ListImages", pb.ListImagesRequest()).images)

    def build_image(self, kind: str, progress: Progress | None = None) -> str:
        """Builds image `kind` (busybox | debian); `progress` gets each progress line. Returns `kind`."""
        self._follow(self._call("BuildImage", pb.BuildImageRequest(name=kind)), progress)
        return kind

    def import_image(self, name: str, path: str | os.PathLike[str], progress: Progress | None = None) -> str:
        """Imports a rootfs directory, tar/tar.gz, OCI layout or docker-save archive at `path`
        (a path on the service's host) as image `name`. Returns `name`."""
        req = pb.ImportImageRequest(name=name, path=os.path.abspath(os.fspath(path)))
        self._follow(self._call("ImportImage", req), progress)
        return name

    def import_node(self, bundle: bytes | str | os.PathLike[str] | BinaryIO) -> Episode:
        """A new live episode from a node bundle (`Episode.export_node` of this or another
        service): its turn 1 stands on the bundle's node, forkable like any other. `bundle`: the
        bundle's bytes, a path to it, or a binary file. Raises `InvalidArgument` for a corrupt,
        truncated or other-version bundle and `FailedPrecondition` when this service lacks the
        bundle's image (or has another one by that name); either leaves nothing behind::

            data = a.episode(ep_id).export_node(turn=4)
            copy = b.import_node(data).fork(turn=1)[0]
        """
        r = self._call("ImportNode", bundle_chunks(bundle))
        return Episode(self, r.episode.id)

    def _follow(self, stream: Iterator[pb.ImageProgress], progress: Progress | None) -> None:
        with self._errors():
            for m in stream:
                if m.done:
                    break
                if progress is not None:
                    progress(m.message)

    def export(self, episode: str | Episode, all_forks: bool = False) -> Iterator[dict[str, Any]]:
        """The trajectory of `episode` as dicts, header first (docs/trajectory-format.md): its live
        path, or with `all_forks` every turn record of its fork family. Write one JSON object a
        line to save it::

            with open("t.jsonl", "w") as f:
                for rec in c.export(ep):
                    f.write(json.dumps(rec) + "\\n")
        """
        from sandtree.trajectory import export

        return export(self, episode.id if isinstance(episode, Episode) else episode, all_forks)

    def replay(
        self,
        records: Iterable[dict[str, Any]],
        from_turn: int | None = None,
        image: str | None = None,
        mask: str | None = None,
        *,
        keep: bool = False,
        timeout: float | None = None,
    ) -> ReplayReport:
        """Re-runs a trajectory's live path and compares stdout, stderr, exit_code and cwd turn by
        turn; see `sandtree.trajectory.replay`::

            report = c.replay(c.export(ep), mask=r"\\d{2}:\\d{2}:\\d{2}")
            assert report.ok, report.divergence
        """
        from sandtree.trajectory import replay

        return replay(self, records, from_turn, image, mask, keep=keep, timeout=timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.addr is not None:
            return f"Client(addr={self.addr!r})"
        return f"Client(socket={self.socket!r})"


class Episode:
    """A handle on one episode (`id`). As a context manager it deletes the episode on exit.

    Example::

        with c.create("busybox") as ep:
            ep.step("echo hi")
    """

    def __init__(self, client: Client, id: str) -> None:
        self.client = client
        self.id = id
        self._deleted = False

    def step(
        self,
        cmd: str,
        timeout: float | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        max_output: int | None = None,
        check_timeout: bool = False,
    ) -> StepResult:
        """Runs `cmd` with `sh -c` in the episode's shell session as its next turn (cwd and
        exported variables carry over to later steps).

        `timeout` in seconds (None: the server's default, 600 s unless --step-timeout); a step
        that hits it is killed and its result has `timed_out` set, or, with `check_timeout=True`,
        `StepTimeout` is raised carrying that result. `env` and `cwd` (absolute) apply to this
        step only. `stdin`: bytes for the command's standard input (a str is sent as UTF-8; at most
        32 MiB). `max_output`: cap in bytes on stdout and on stderr each (at most the server's
        1 MiB, also the default)::

            r = ep.step("cat; echo $A", env={"A": "1"}, stdin=b"in\\n", cwd="/tmp")
            assert r.stdout == "in\\n1\\n" and r.exit_code == 0
        """
        req = step_request(self.id, cmd, timeout, env, cwd, stdin, max_output)
        return checked(StepResult.from_pb(self.client._call("Step", req)), check_timeout, timeout)

    def step_stream(
        self,
        cmd: str,
        timeout: float | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        max_output: int | None = None,
        check_timeout: bool = False,
    ) -> Iterator[Chunk | StepResult]:
        """`step`, with the output as it comes: yields `Chunk`s, `("stdout", b"...")` or
        `("stderr", b"...")` tuples, then the `StepResult` (whose stdout/stderr hold the whole
        output again) as the last item. The service reads the output about every 50 ms: each
        stream's chunks are in order, and within one read stdout's chunk comes before stderr's;
        like the result, the chunks stop at `max_output` bytes per stream. Leaving the loop early
        stops the stream, not the step: it runs to its end and records its turn::

            for item in ep.step_stream("echo a; sleep 1; echo b"):
                if isinstance(item, sandtree.StepResult):
                    print("exit", item.exit_code)
                else:
                    stream, data = item
                    print(stream, data)
        """
        req = step_request(self.id, cmd, timeout, env, cwd, stdin, max_output)
        call = self.client._call("StepStream", req)
        try:
            with self.client._errors():
                for ev in call:
                    which = ev.WhichOneof("event")
                    if which == "result":
                        yield checked(StepResult.from_pb(ev.result), check_timeout, timeout)
                        return
                    if which == "stdout" or which == "stderr":
                        yield Chunk(which, bytes(getattr(ev, which)))
        finally:
            call.cancel()

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> StepResult:
        """Writes `data` (a str is written as UTF-8; at most 32 MiB) to `path` in the sandbox as a
        turn of its own, judged and checkpointed like a step (under policy auto its verdict is
        "fs"; under full "proc", under none "none"), so fork and rewind see it like any other
        turn. The file is created with `mode` (the mode of an existing file is kept) or truncated;
        its directory must exist.
        `path` resolves inside the sandbox's root as the sandbox would see it (relative paths from
        /, `..` and absolute symlinks stay inside). Returns that turn's `StepResult`::

            r = ep.write_file("/workspace/a.py", b"print(1)\\n")
            assert r.verdict == "fs"  # policy auto
        """
        return StepResult.from_pb(self.client._call("WriteFile", write_request(self.id, path, data, mode)))

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """The contents of `path` in the sandbox (resolved as for `write_file`); not a turn.
        `max_bytes`: read at most that many (at most 32 MiB); None: the whole file, and a file over
        32 MiB raises `InvalidArgument`. A missing file raises `NotFound`, a directory
        `InvalidArgument`::

            assert ep.read_file("/workspace/a.py") == b"print(1)\\n"
        """
        r = self.client._call("ReadFile", read_request(self.id, path, max_bytes))
        return read_result(path, r, max_bytes)

    def fork(self, turn: int | None = None, n: int = 1, keep_warm: int = 0) -> list[Episode]:
        """`n` (1..=64) new episodes, each a live copy of this one as it was after `turn` (None:
        the current turn): files, and under a full checkpoint its running processes too. Forks
        take warm copies first (see `prepare`); `keep_warm` refills that many afterwards, in the
        background. Raises `OutOfRange` for a turn past the end, `NotRestorable` for a turn
        without a checkpoint::

            kids = ep.fork(turn=2, n=4)
        """
        check_count(n)
        check_warm("keep_warm", keep_warm)
        if turn is None:
            turn = self.turn
        req = pb.ForkRequest(episode=self.id, turn=turn, count=n, keep_warm=keep_warm)
        r = self.client._call("Fork", req)
        return [Episode(self.client, e) for e in r.episodes]

    def export_node(self, turn: int | None = None) -> bytes:
        """The node after `turn` (None: the current turn) as a bundle (docs/design.md, "Node
        bundles, format 1"): its files as a delta against the image, its shell session and, for a
        full node, its CRIU image. `Client.import_node` on another service makes an episode of
        it. Raises `NotRestorable` for a turn without a committed checkpoint and
        `InvalidArgument` for turn 0 (the image itself)::

            open("node.bundle", "wb").write(ep.export_node(turn=4))
        """
        return b"".join(self._export_chunks(turn))

    def export_node_to(self, path: str | os.PathLike[str], turn: int | None = None) -> int:
        """`export_node` written to the file at `path`, chunk by chunk; returns its size."""
        n = 0
        with open(path, "wb") as f:
            for chunk in self._export_chunks(turn):
                f.write(chunk)
                n += len(chunk)
        return n

    def _export_chunks(self, turn: int | None) -> Iterator[bytes]:
        if turn is None:
            turn = self.turn
        call = self.client._call("ExportNode", pb.ExportNodeRequest(episode=self.id, turn=turn))
        with self.client._errors():
            for chunk in call:
                yield chunk.data

    def prepare(self, turn: int | None = None, n: int = 1) -> Prepared:
        """Keeps `n` (0..=64) warm copies of the node after `turn` ready: restored and frozen,
        so that a fork of that turn takes one and thaws it instead of restoring. 0 drops them.
        Raises `FailedPrecondition` when the service keeps no warm copies, `ResourceExhausted`
        past its warm budget::

            ep.prepare(turn=3, n=8)
            kids = ep.fork(turn=3, n=8)  # in milliseconds
        """
        check_warm("prepare count", n)
        if turn is None:
            turn = self.turn
        req = pb.PrepareRequest(episode=self.id, turn=turn, count=n)
        return Prepared.from_pb(self.client._call("Prepare", req))

    def rewind(self, turn: int) -> int:
        """Brings the episode back to how it was after `turn` (its later turns are dropped);
        returns its turn now. Raises `OutOfRange` and `NotRestorable` as `fork` does."""
        r = self.client._call("Rewind", pb.RewindRequest(episode=self.id, turn=turn))
        return int(r.turn)

    def tree(self, whole: bool = False, outputs: bool = False) -> Tree:
        """The episode and every turn of its path in the checkpoint tree (waits for the pending
        checkpoint of its latest turn). `whole`: also every turn record of its fork family
        (`Tree.family`, with `record`, `parent_record`, `episodes`, `forks`). `outputs`: also each
        turn's recorded `stdout`, `stderr` and `duration_ms`::

            for t in ep.tree().turns:
                print(t.turn, t.action, t.verdict, t.kind)
            for r in ep.tree(whole=True).family:
                print(r.record, r.parent_record, r.turn, r.action, r.episodes, r.forks)
        """
        req = pb.TreeRequest(episode=self.id, whole=whole, outputs=outputs)
        return Tree.from_pb(self.client._call("Tree", req))

    def info(self) -> EpisodeInfo:
        """The episode's image, policy, status, current turn and labels (one Tree call)."""
        return self.tree().episode

    @property
    def turn(self) -> int:
        """The episode's current turn, asked of the service (one Tree call)."""
        return self.info().turn

    def delete(self) -> None:
        """Stops the episode's sandbox and frees what only it uses."""
        self.client._call("DeleteEpisode", pb.DeleteEpisodeRequest(episode=self.id))
        self._deleted = True

    def __enter__(self) -> Episode:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._deleted:
            self.delete()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Episode) and other.id == self.id and other.client is self.client

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"Episode({self.id!r})"
