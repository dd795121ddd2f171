"""The asyncio client (grpc.aio): `AsyncClient` and `AsyncEpisode`, the same API as the
synchronous one with every call awaited (also exported as `sandtree.AsyncClient`)::

    async with sandtree.AsyncClient() as c:
        async with c.create("busybox") as ep:          # or: ep = await c.create(...)
            await ep.step("echo hi > f")
            forks = await ep.fork(n=4)
            results = await asyncio.gather(*(f.step("cat f") for f in forks))
            turn = await ep.turn                       # an awaitable property
            async for item in ep.step_stream("echo a; sleep 1; echo b"):
                ...

One `AsyncClient` multiplexes any number of concurrent calls over its one channel.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Mapping
from types import TracebackType
from typing import Any, BinaryIO

import grpc
import grpc.aio

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

__all__ = ["AsyncClient", "AsyncEpisode"]

Progress = Callable[[str], None]


class AsyncClient:
    """A grpc.aio connection to the sandtree service; create it inside the event loop that uses it.

    `socket`: the argument, else $SANDTREE_SOCKET, else /run/sandtree/sandtree.sock; or `addr`,
    `token_file` and `tls_ca` for a TCP listener, as for `sandtree.Client`. See
    `sandtree.Client` for what each method does; here each is awaited.
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
            self._channel = grpc.aio.secure_channel(ep.target(), creds, options=ep.options())
        else:
            self._channel = grpc.aio.insecure_channel(ep.target(), options=ep.options())
        self._metadata = ep.metadata
        self._stub = pb_grpc.SandtreeStub(self._channel)  # type: ignore[no-untyped-call]  # generated, untyped

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.endpoint.where) from None

    async def health(self) -> Health:
        """The service's version, storage, inspector and host probes."""
        return Health.from_pb(await self._call("Health", pb.HealthRequest()))

    def create(
        self,
        image: str = "busybox",
        policy: str = "auto",
        *,
        labels: Mapping[str, str] | None = None,
        memory_mib: int | None = None,
        pids: int | None = None,
        cpus: float | None = None,
    ) -> _Creating:
        """A new episode (see `Client.create`). Await it (`ep = await c.create()`) or use it as an
        async context manager that deletes the episode on exit (`async with c.create() as ep:`)."""
        req = create_request(image, policy, labels, memory_mib, pids, cpus)
        return _Creating(self._create(req))

    async def _create(self, req: pb.CreateEpisodeRequest) -> AsyncEpisode:
        return AsyncEpisode(self, (await self._call("CreateEpisode", req)).id)

    def episode(self, id: str) -> AsyncEpisode:
        """A handle on an existing episode (no call is made; an unknown id fails at first use)."""
        return AsyncEpisode(self, id)

    async def episodes(
        self, labels: Mapping[str, str] | None = None, status: str | None = None
    ) -> list[AsyncEpisode]:
        """Handles on the episodes with all of `labels` and status `status` (None: all but deleted)."""
        return [AsyncEpisode(self, e.id) for e in await self.list_episodes(labels, status)]

    async def list_episodes(
        self, labels: Mapping[str, str] | None = None, status: str | None = None
    ) -> list[EpisodeInfo]:
        """What `episodes` selects, as `EpisodeInfo`."""
        r = await self._call("ListEpisodes", list_request(labels, status))
        return [EpisodeInfo.from_pb(e) for e in r.episodes]

    async def stats(self, reset_timings: bool = False) -> Stats:
        """Checkpoint totals and timings; `reset_timings` clears the timing samples after this answer."""
        return Stats.from_pb(await self._call("Stats", pb.StatsRequest(reset_timings=reset_timings)))

    async def images(self) -> list[str]:
        """The names of the images episodes can be created from."""
        return list((await self._call("ListImages", pb.ListImagesRequest())).images)

    async def build_image(self, kind: str, progress: Progress | None = None) -> str:
        """Builds image `kind` (busybox | debian); `progress` gets each progress line."""
        await self._follow(
            self._stub.BuildImage(pb.BuildImageRequest(name=kind), metadata=self._metadata), progress
        )
        return kind

    async def import_image(
        self, name: str, path: str | os.PathLike[str], progress: Progress | None = None
    ) -> str:
        """Imports a rootfs, tarball, OCI layout or docker-save archive at `path` (on the service's host)."""
        req = pb.ImportImageRequest(name=name, path=os.path.abspath(os.fspath(path)))
        await self._follow(self._stub.ImportImage(req, metadata=self._metadata), progress)
        return name

    async def import_node(self, bundle: bytes | str | os.PathLike[str] | BinaryIO) -> AsyncEpisode:
        """A new live episode from a node bundle (see `Client.import_node`)."""
        r = await self._call("ImportNode", bundle_chunks(bundle))
        return AsyncEpisode(self, r.episode.id)

    async def _follow(self, stream: AsyncIterator[pb.ImageProgress], progress: Progress | None) -> None:
        try:
            async for m in stream:
                if m.done:
                    break
                if progress is not None:
                    progress(m.message)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.endpoint.where) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        if self.addr is not None:
            return f"AsyncClient(addr={self.addr!r})"
        return f"AsyncClient(socket={self.socket!r})"


class _Creating:
    """What `AsyncClient.create` returns: awaitable (the episode) and an async context manager
    (the episode, deleted on exit)."""

    def __init__(self, coro: Coroutine[Any, Any, AsyncEpisode]) -> None:
        self._coro = coro
        self._episode: AsyncEpisode | None = None

    def __await__(self) -> Generator[Any, None, AsyncEpisode]:
        return self._coro.__await__()

    async def __aenter__(self) -> AsyncEpisode:
        self._episode = await self._coro
        return self._episode

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._episode is not None:
            await self._episode.__aexit__(exc_type, exc, tb)


class AsyncEpisode:
    """A handle on one episode (see `sandtree.Episode`). As an async context manager it deletes
    the episode on exit."""

    def __init__(self, client: AsyncClient, id: str) -> None:
        self.client = client
        self.id = id
        self._deleted = False

    async def step(
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
        """Runs `cmd` as the episode's next turn (see `Episode.step`)."""
        req = step_request(self.id, cmd, timeout, env, cwd, stdin, max_output)
        return checked(StepResult.from_pb(await self.client._call("Step", req)), check_timeout, timeout)

    async def step_stream(
        self,
        cmd: str,
        timeout: float | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        max_output: int | None = None,
        check_timeout: bool = False,
    ) -> AsyncIterator[Chunk | StepResult]:
        """An async iterator of `Chunk`s (`("stdout"|"stderr", bytes)`) as they come, then the
        `StepResult` (see `Episode.step_stream`)::

            async for item in ep.step_stream("echo a; sleep 1; echo b"):
                if isinstance(item, sandtree.StepResult):
                    print("exit", item.exit_code)
                else:
                    print(item.stream, item.data)
        """
        req = step_request(self.id, cmd, timeout, env, cwd, stdin, max_output)
        call = self.client._stub.StepStream(req, metadata=self.client._metadata)
        try:
            async for ev in call:
                which = ev.WhichOneof("event")
                if which == "result":
                    yield checked(StepResult.from_pb(ev.result), check_timeout, timeout)
                    return
                if which == "stdout" or which == "stderr":
                    yield Chunk(which, bytes(getattr(ev, which)))
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.client.endpoint.where) from None
        finally:
            call.cancel()

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> StepResult:
        """Writes `data` to `path` in the sandbox as a turn of its own (see `Episode.write_file`)."""
        req = write_request(self.id, path, data, mode)
        return StepResult.from_pb(await self.client._call("WriteFile", req))

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """The contents of `path` in the sandbox (see `Episode.read_file`)."""
        r = await self.client._call("ReadFile", read_request(self.id, path, max_bytes))
        return read_result(path, r, max_bytes)

    async def fork(self, turn: int | None = None, n: int = 1, keep_warm: int = 0) -> list[AsyncEpisode]:
        """`n` live copies of the episode as it was after `turn` (see `Episode.fork`)."""
        check_count(n)
        check_warm("keep_warm", keep_warm)
        if turn is None:
            turn = await self.turn
        req = pb.ForkRequest(episode=self.id, turn=turn, count=n, keep_warm=keep_warm)
        r = await self.client._call("Fork", req)
        return [AsyncEpisode(self.client, e) for e in r.episodes]

    async def export_node(self, turn: int | None = None) -> bytes:
        """The node after `turn` as a bundle (see `Episode.export_node`)."""
        if turn is None:
            turn = await self.turn
        call = self.client._stub.ExportNode(
            pb.ExportNodeRequest(episode=self.id, turn=turn), metadata=self.client._metadata
        )
        parts = []
        try:
            async for chunk in call:
                parts.append(chunk.data)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.client.endpoint.where) from None
        return b"".join(parts)

    async def prepare(self, turn: int | None = None, n: int = 1) -> Prepared:
        """Keeps `n` warm copies of the node after `turn` ready (see `Episode.prepare`)."""
        check_warm("prepare count", n)
        if turn is None:
            turn = await self.turn
        req = pb.PrepareRequest(episode=self.id, turn=turn, count=n)
        return Prepared.from_pb(await self.client._call("Prepare", req))

    async def rewind(self, turn: int) -> int:
        """Brings the episode back to how it was after `turn`; returns its turn now."""
        r = await self.client._call("Rewind", pb.RewindRequest(episode=self.id, turn=turn))
        return int(r.turn)

    async def tree(self, whole: bool = False, outputs: bool = False) -> Tree:
        """The episode and every turn of its path in the checkpoint tree; `whole` and `outputs`
        as in `Episode.tree`."""
        req = pb.TreeRequest(episode=self.id, whole=whole, outputs=outputs)
        return Tree.from_pb(await self.client._call("Tree", req))

    async def info(self) -> EpisodeInfo:
        """The episode's image, policy, status, current turn and labels (one Tree call)."""
        return (await self.tree()).episode

    @property
    def turn(self) -> Awaitable[int]:
        """The episode's current turn: `await ep.turn` (one Tree call)."""
        return self._turn()

    async def _turn(self) -> int:
        return (await self.info()).turn

    async def delete(self) -> None:
        """Stops the episode's sandbox and frees what only it uses."""
        await self.client._call("DeleteEpisode", pb.DeleteEpisodeRequest(episode=self.id))
        self._deleted = True

    async def __aenter__(self) -> AsyncEpisode:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._deleted:
            await self.delete()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncEpisode) and other.id == self.id and other.client is self.client

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"AsyncEpisode({self.id!r})"
