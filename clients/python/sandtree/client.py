"""The synchronous client: `Client` (one channel to the service) and `Episode` (a handle)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import grpc

from sandtree._common import CHANNEL_OPTIONS, check_count, resolve_socket, target
from sandtree._pb.v1 import sandtree_pb2 as pb
from sandtree._pb.v1 import sandtree_pb2_grpc as pb_grpc
from sandtree.errors import from_rpc_error
from sandtree.models import EpisodeInfo, Health, Stats, StepResult, Tree, timeout_ms

__all__ = ["Client", "Episode"]

Progress = Callable[[str], None]


class Client:
    """A connection to the sandtree service on its unix socket.

    `socket`: the argument, else $SANDTREE_SOCKET, else /run/sandtree/sandtree.sock. Connecting
    is lazy: a service that is not running shows as `Unavailable` on the first call. Thread-safe;
    close it (or use it as a context manager) when done.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None) -> None:
        self.socket = resolve_socket(socket)
        self._channel = grpc.insecure_channel(target(self.socket), options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.SandtreeStub(self._channel)  # type: ignore[no-untyped-call]  # generated, untyped

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as e:
            raise from_rpc_error(e, self.socket) from None

    def _call(self, method: str, request: Any) -> Any:
        with self._errors():
            return getattr(self._stub, method)(request)

    def health(self) -> Health:
        """The service's version, storage, inspector and host probes."""
        return Health.from_pb(self._call("Health", pb.HealthRequest()))

    def create(self, image: str = "busybox", policy: str = "auto") -> Episode:
        """A new episode on `image`; `policy`: none | full | auto."""
        info = self._call("CreateEpisode", pb.CreateEpisodeRequest(image=image, policy=policy))
        return Episode(self, info.id)

    def episode(self, id: str) -> Episode:
        """A handle on an existing episode (no call is made; an unknown id fails at first use)."""
        return Episode(self, id)

    def list_episodes(self) -> list[EpisodeInfo]:
        """Every live episode of the service."""
        r = self._call("ListEpisodes", pb.ListEpisodesRequest())
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

    def _follow(self, stream: Iterator[pb.ImageProgress], progress: Progress | None) -> None:
        with self._errors():
            for m in stream:
                if m.done:
                    break
                if progress is not None:
                    progress(m.message)

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
        return f"Client(socket={self.socket!r})"


class Episode:
    """A handle on one episode. As a context manager it deletes the episode on exit."""

    def __init__(self, client: Client, id: str) -> None:
        self.client = client
        self.id = id
        self._deleted = False

    def step(self, cmd: str, timeout: float | None = None) -> StepResult:
        """Runs `cmd` with `sh -c` in the episode's shell session (cwd and exported variables carry
        over); `timeout` in seconds (None: the service's default)."""
        req = pb.StepRequest(episode=self.id, command=cmd, timeout_ms=timeout_ms(timeout))
        return StepResult.from_pb(self.client._call("Step", req))

    def fork(self, turn: int | None = None, n: int = 1) -> list[Episode]:
        """`n` new episodes, each a live copy of this one as it was after `turn` (None: the
        current turn)."""
        check_count(n)
        if turn is None:
            turn = self.info().turn
        r = self.client._call("Fork", pb.ForkRequest(episode=self.id, turn=turn, count=n))
        return [Episode(self.client, e) for e in r.episodes]

    def rewind(self, turn: int) -> int:
        """Brings the episode back to how it was after `turn`; returns its turn now."""
        r = self.client._call("Rewind", pb.RewindRequest(episode=self.id, turn=turn))
        return int(r.turn)

    def tree(self) -> Tree:
        """The episode and every turn of its path in the checkpoint tree."""
        return Tree.from_pb(self.client._call("Tree", pb.TreeRequest(episode=self.id)))

    def info(self) -> EpisodeInfo:
        """The episode's image, policy, status and current turn."""
        return self.tree().episode

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
