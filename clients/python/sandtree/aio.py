"""The asyncio client (grpc.aio): `AsyncClient` and `AsyncEpisode`, the same API as the
synchronous one with every call awaited.

    async with AsyncClient() as c:
        async with await c.create() as ep:
            await ep.step("echo hi > f")
            forks = await ep.fork(n=4)
            results = await asyncio.gather(*(f.step("cat f") for f in forks))
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from sandtree._common import CHANNEL_OPTIONS, check_count, resolve_socket, target
from sandtree._pb.v1 import sandtree_pb2 as pb
from sandtree._pb.v1 import sandtree_pb2_grpc as pb_grpc
from sandtree.errors import from_rpc_error
from sandtree.models import EpisodeInfo, Health, Stats, StepResult, Tree, timeout_ms

__all__ = ["AsyncClient", "AsyncEpisode"]

Progress = Callable[[str], None]


class AsyncClient:
    """A grpc.aio connection to the sandtree service; create it inside the event loop that uses it.

    `socket`: the argument, else $SANDTREE_SOCKET, else /run/sandtree/sandtree.sock.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None) -> None:
        self.socket = resolve_socket(socket)
        self._channel = grpc.aio.insecure_channel(target(self.socket), options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.SandtreeStub(self._channel)  # type: ignore[no-untyped-call]  # generated, untyped

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.socket) from None

    async def health(self) -> Health:
        return Health.from_pb(await self._call("Health", pb.HealthRequest()))

    async def create(self, image: str = "busybox", policy: str = "auto") -> AsyncEpisode:
        info = await self._call("CreateEpisode", pb.CreateEpisodeRequest(image=image, policy=policy))
        return AsyncEpisode(self, info.id)

    def episode(self, id: str) -> AsyncEpisode:
        """A handle on an existing episode (no call is made; an unknown id fails at first use)."""
        return AsyncEpisode(self, id)

    async def list_episodes(self) -> list[EpisodeInfo]:
        r = await self._call("ListEpisodes", pb.ListEpisodesRequest())
        return [EpisodeInfo.from_pb(e) for e in r.episodes]

    async def stats(self, reset_timings: bool = False) -> Stats:
        return Stats.from_pb(await self._call("Stats", pb.StatsRequest(reset_timings=reset_timings)))

    async def images(self) -> list[str]:
        return list((await self._call("ListImages", pb.ListImagesRequest())).images)

    async def build_image(self, kind: str, progress: Progress | None = None) -> str:
        await self._follow(self._stub.BuildImage(pb.BuildImageRequest(name=kind)), progress)
        return kind

    async def import_image(
        self, name: str, path: str | os.PathLike[str], progress: Progress | None = None
    ) -> str:
        req = pb.ImportImageRequest(name=name, path=os.path.abspath(os.fspath(path)))
        await self._follow(self._stub.ImportImage(req), progress)
        return name

    async def _follow(self, stream: AsyncIterator[pb.ImageProgress], progress: Progress | None) -> None:
        try:
            async for m in stream:
                if m.done:
                    break
                if progress is not None:
                    progress(m.message)
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.socket) from None

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
        return f"AsyncClient(socket={self.socket!r})"


class AsyncEpisode:
    """A handle on one episode. As an async context manager it deletes the episode on exit."""

    def __init__(self, client: AsyncClient, id: str) -> None:
        self.client = client
        self.id = id
        self._deleted = False

    async def step(self, cmd: str, timeout: float | None = None) -> StepResult:
        req = pb.StepRequest(episode=self.id, command=cmd, timeout_ms=timeout_ms(timeout))
        return StepResult.from_pb(await self.client._call("Step", req))

    async def fork(self, turn: int | None = None, n: int = 1) -> list[AsyncEpisode]:
        check_count(n)
        if turn is None:
            turn = (await self.info()).turn
        r = await self.client._call("Fork", pb.ForkRequest(episode=self.id, turn=turn, count=n))
        return [AsyncEpisode(self.client, e) for e in r.episodes]

    async def rewind(self, turn: int) -> int:
        r = await self.client._call("Rewind", pb.RewindRequest(episode=self.id, turn=turn))
        return int(r.turn)

    async def tree(self) -> Tree:
        return Tree.from_pb(await self.client._call("Tree", pb.TreeRequest(episode=self.id)))

    async def info(self) -> EpisodeInfo:
        return (await self.tree()).episode

    async def delete(self) -> None:
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
