"""Ray placement: one sandtree service per Ray node, and a pool that places episodes across them.

`SandtreeService` is the body of a Ray actor pinned to one node (NodeAffinitySchedulingStrategy,
soft=False). It starts `sandtree serve` there, on its own data dir and unix socket, with a TCP
listener on the node's IP (from Ray) and a fresh token file of mode 0600, or it attaches to a
service that already runs on the node (`attach_addr` and `attach_token_file`, else
$SANDTREE_RAY_ADDR and $SANDTREE_RAY_TOKEN_FILE in the node's environment). It stops the service
it started (SIGTERM, a wait, SIGKILL; only the pid it started) on `stop()`, and the service gets
SIGTERM when the actor's process dies (`ray.kill`, a crash, the driver exiting).

`SandtreePool` holds one TCP client per service. `create` places a new episode on the service
with the most free places (`serve --max-episodes` less its live episodes, read from `Stats`;
ties go to the one whose sandboxes use less memory) and returns the real `sandtree.Episode` of
that service's client, so the whole Episode surface works on it. `fork(ep, turn, n)` forks on
the episode's own service what fits there and moves the node to the others for the rest
(`export_node` there, `import_node` here, then forks of the imported episode's turn 1).

Ray is the only cluster manager: the pool asks Ray for the alive nodes (`ray.nodes()`) and finds
each node's actor by its name; sandtree keeps no membership list of its own. Needs the `ray`
extra (`pip install sandtree[ray]`) for `SandtreePool.start`; the rest imports without Ray.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket as _socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from sandtree.client import Client, Episode
from sandtree.errors import InvalidArgument, ResourceExhausted, SandtreeError, Unavailable

__all__ = [
    "ACTOR_PREFIX",
    "NodeCapacity",
    "SandtreePool",
    "SandtreeService",
    "ServiceInfo",
    "alive_nodes",
]

ACTOR_PREFIX = "sandtree-service-"
"""A node's actor is named ACTOR_PREFIX + its Ray node id (in the driver's Ray namespace)."""


@dataclass(frozen=True)
class ServiceInfo:
    """Where one node's service listens and how to reach it: `addr` (tcp://IP:PORT), its `token`
    (sent to the pool through Ray), `max_episodes` (`serve --max-episodes`), whether the actor
    `started` it (else it attached to one already there), and the `pid` and `data_dir` of a
    service it started."""

    node_id: str
    addr: str
    token: str = field(repr=False)
    max_episodes: int
    started: bool
    pid: int | None = None
    data_dir: str | None = None


@dataclass(frozen=True)
class NodeCapacity:
    """One service's load, from its `Stats`: `live` episodes (a running sandbox), `free` places
    (`max_episodes - live`, at least 0), and `sandbox_memory_bytes` (RSS of its sandboxes)."""

    node_id: str
    addr: str
    live: int
    max_episodes: int
    free: int
    sandbox_memory_bytes: int


def _free_port(host: str) -> int:
    with _socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _node_ip() -> str:
    try:
        import ray
        import ray.util

        if ray.is_initialized():
            ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
            return ip
    except ImportError:
        pass
    return "127.0.0.1"  # not in Ray (the pool's own tests): loopback


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            nid: str = ray.get_runtime_context().get_node_id()
            return nid
    except ImportError:
        pass
    return "local"


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class SandtreeService:
    """One node's sandtree service; the body of the actor that `SandtreePool.start` pins to each
    node (usable without Ray too). Starts `sandtree serve` unless it attaches:

    - `binary`: the sandtree binary (else $SANDTREE_BIN, else `sandtree` on PATH);
    - `data_dir`: the service's data dir (else a new one under `base_dir`, else under the temp
      dir; a directory the actor made is removed by `stop()`);
    - `max_episodes`: passed to `serve --max-episodes`, so the pool knows the capacity;
    - `storage`, `extra_args`: `serve --storage` and any further `serve` flags;
    - `images`: base images to build if the service lacks them (`c.build_image`);
    - `attach_addr`, `attach_token_file` (else $SANDTREE_RAY_ADDR, $SANDTREE_RAY_TOKEN_FILE):
      a service already listening on this node; then `max_episodes` must be its limit.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        data_dir: str | None = None,
        base_dir: str | None = None,
        max_episodes: int = 16,
        storage: str = "btrfs",
        images: Sequence[str] = ("busybox",),
        extra_args: Sequence[str] = (),
        attach_addr: str | None = None,
        attach_token_file: str | None = None,
        ready_timeout: float = 120.0,
    ) -> None:
        if max_episodes < 1:
            raise InvalidArgument(f"max_episodes must be at least 1, got {max_episodes}")
        self.node_id = _node_id()
        self.max_episodes = max_episodes
        self._proc: subprocess.Popen[bytes] | None = None
        self._exited = threading.Event()
        self._own_dir: Path | None = None
        self.data_dir: Path | None = None
        attach_addr = attach_addr or os.environ.get("SANDTREE_RAY_ADDR") or None
        if attach_addr is not None:
            token_file = attach_token_file or os.environ.get("SANDTREE_RAY_TOKEN_FILE")
            if not token_file:
                raise InvalidArgument(f"attaching to {attach_addr} needs its token file")
            # The client checks the file as the service does (mode 0600/0400, not empty).
            with Client(addr=attach_addr, token_file=token_file) as c:
                c.health()
                self._build_images(c, images)
                self._token = c.endpoint.token or ""
            self.addr = attach_addr
            return
        exe = binary or os.environ.get("SANDTREE_BIN") or shutil.which("sandtree")
        if exe is None:
            raise InvalidArgument("no sandtree binary: pass binary=, set $SANDTREE_BIN or put it on PATH")
        if data_dir is None:
            if base_dir is not None:
                os.makedirs(base_dir, exist_ok=True)
            self._own_dir = Path(tempfile.mkdtemp(prefix=f"node-{self.node_id[:12]}-", dir=base_dir))
            self.data_dir = self._own_dir
        else:
            self.data_dir = Path(data_dir)
            self.data_dir.mkdir(parents=True, exist_ok=True)
        d = self.data_dir
        self._token = secrets.token_hex(32)
        token_path = d / "token"
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._token + "\n")
        os.chmod(token_path, 0o600)
        ip = _node_ip()
        self.addr = f"tcp://{ip}:{_free_port(ip)}"
        self.socket = str(d / "s.sock")
        self.log = d / "serve.log"
        cmd = [exe, "serve", "--storage", storage, "--data-dir", str(d / "data"), "--socket", self.socket]
        cmd += ["--listen", self.addr, "--token-file", str(token_path)]
        cmd += ["--max-episodes", str(max_episodes), *extra_args]
        self._start(cmd)
        try:
            self._wait_ready(ready_timeout)
            with Client(self.socket) as c:
                self._build_images(c, images)
        except BaseException:
            self.stop()
            raise

    def _start(self, cmd: list[str]) -> None:
        """Starts `cmd` from a thread of its own that then waits for it, so that the child's
        parent-death signal (SIGTERM, through setpriv) fires when this process dies and only then
        (PR_SET_PDEATHSIG follows the thread that forked, and this thread lives until the child
        exits)."""
        if shutil.which("setpriv"):
            cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]  # setpriv execs: same pid
        started = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            try:
                with open(self.log, "ab") as log:
                    self._proc = subprocess.Popen(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        env={**os.environ, "NO_COLOR": "1"},
                        start_new_session=True,
                    )
            except BaseException as e:
                error.append(e)
                self._exited.set()
                return
            finally:
                started.set()
            self._proc.wait()
            self._exited.set()

        threading.Thread(target=run, name="sandtree-serve", daemon=True).start()
        started.wait()
        if error:
            raise error[0]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with Client(self.socket) as c:
            while True:
                if self._exited.is_set():
                    code = self._proc.returncode if self._proc else None
                    raise RuntimeError(f"sandtree serve exited {code}:\n{_tail(self.log)}")
                if os.path.exists(self.socket):
                    try:
                        c.health()
                        return
                    except Unavailable:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sandtree serve did not start in {timeout}s:\n{_tail(self.log)}")
                time.sleep(0.1)

    @staticmethod
    def _build_images(c: Client, images: Sequence[str]) -> None:
        have = set(c.images())
        for name in images:
            if name not in have:
                c.build_image(name)

    def info(self) -> ServiceInfo:
        """The service's address, token and limit, for the pool."""
        return ServiceInfo(
            node_id=self.node_id,
            addr=self.addr,
            token=self._token,
            max_episodes=self.max_episodes,
            started=self._proc is not None,
            pid=self._proc.pid if self._proc is not None else None,
            data_dir=str(self.data_dir) if self.data_dir is not None else None,
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Stops the service this actor started (SIGTERM, up to `timeout` s, then SIGKILL), unmounts
        the embedded btrfs image it mounted in its data dir and removes a data dir the actor made.
        An attached service is left running."""
        p = self._proc
        if p is None:
            return
        if not self._exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            if not self._exited.wait(timeout):
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                self._exited.wait(30)
        if self.data_dir is not None:
            self._cleanup(self.data_dir, remove=self._own_dir is not None)

    @staticmethod
    def _cleanup(data_dir: Path, remove: bool = True) -> None:
        """After its service exited: unmounts the embedded btrfs image the service mounted in
        `data_dir` if it is still mounted, then removes `data_dir` (if `remove`)."""
        mnt = data_dir / "data" / "storage" / "mnt"
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False, stderr=subprocess.DEVNULL)
        if remove and not os.path.ismount(mnt):
            shutil.rmtree(data_dir, ignore_errors=True)

    def alive(self) -> bool:
        """Whether the service this actor started still runs (True for an attached one)."""
        return self._proc is None or not self._exited.is_set()


@dataclass
class _Member:
    info: ServiceInfo
    client: Client
    actor: Any = None  # the Ray actor handle, when the pool made it
    owned: bool = False  # the pool made the actor: shutdown() stops it


class SandtreePool:
    """Episodes placed across several sandtree services by free capacity. Make one with
    `SandtreePool.start()` (one service per alive Ray node) or from `ServiceInfo`s of services
    already running. Use it as a context manager, or call `shutdown()`::

        with SandtreePool.start(max_episodes=32) as pool:
            ep = pool.create("busybox")          # a sandtree.Episode on the least loaded node
            ep.step("echo hi > /workspace/f")
            kids = pool.fork(ep, turn=1, n=8)    # here what fits, the rest on other nodes
    """

    def __init__(self, services: Sequence[ServiceInfo], *, _actors: Sequence[tuple[Any, bool]] = ()) -> None:
        if not services:
            raise InvalidArgument("a pool needs at least one service")
        self._dir = Path(tempfile.mkdtemp(prefix="sandtree-pool-"))
        self._members: list[_Member] = []
        actors = list(_actors) or [(None, False)] * len(services)
        for i, (info, (actor, owned)) in enumerate(zip(services, actors, strict=True)):
            token_file = self._dir / f"token-{i}"
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(info.token + "\n")
            client = Client(addr=info.addr, token_file=token_file)
            self._members.append(_Member(info, client, actor, owned))

    @classmethod
    def start(
        cls,
        nodes: Sequence[str] | None = None,
        *,
        max_episodes: int = 16,
        binary: str | None = None,
        base_dir: str | None = None,
        storage: str = "btrfs",
        images: Sequence[str] = ("busybox",),
        extra_args: Sequence[str] = (),
        timeout: float = 300.0,
    ) -> SandtreePool:
        """One service per Ray node: `nodes` (Ray node ids), else every alive node of
        `ray.nodes()`. Each node's actor (named ACTOR_PREFIX + node id, `num_cpus=0`, pinned
        with NodeAffinitySchedulingStrategy(soft=False)) is made unless it exists already, in
        which case the pool attaches to it and leaves it running at shutdown. The other
        arguments go to `SandtreeService`. Needs `ray.init()` first."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if nodes is None:
            nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        if not nodes:
            raise InvalidArgument("Ray has no alive node")
        remote_cls: Any = ray.remote(SandtreeService)  # Ray's stubs do not follow the class
        handles: list[tuple[Any, bool]] = []
        for node in nodes:
            name = ACTOR_PREFIX + node
            try:
                handles.append((ray.get_actor(name), False))
                continue
            except ValueError:
                pass
            actor = remote_cls.options(
                name=name,
                num_cpus=0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            ).remote(
                binary=binary,
                base_dir=base_dir,
                max_episodes=max_episodes,
                storage=storage,
                images=tuple(images),
                extra_args=tuple(extra_args),
            )
            handles.append((actor, True))
        try:
            infos: list[ServiceInfo] = ray.get([a.info.remote() for a, _ in handles], timeout=timeout)
        except BaseException:
            for a, owned in handles:
                if owned:
                    _stop_actor(a)
            raise
        return cls(infos, _actors=handles)

    @property
    def services(self) -> list[ServiceInfo]:
        return [m.info for m in self._members]

    def _member(self, ep: Episode) -> _Member:
        for m in self._members:
            if ep.client is m.client:
                return m
        raise InvalidArgument(f"{ep!r} was not made by this pool")

    def node_of(self, ep: Episode) -> str:
        """The Ray node id of the service that holds `ep`."""
        return self._member(ep).info.node_id

    def _capacity(self, m: _Member) -> NodeCapacity:
        s = m.client.stats()
        live = sum(1 for e in s.per_episode if e.status == "running")
        mx = m.info.max_episodes
        return NodeCapacity(m.info.node_id, m.info.addr, live, mx, max(0, mx - live), s.sandbox_memory_bytes)

    def capacity(self) -> list[NodeCapacity]:
        """Each service's load now (one Stats call each)."""
        return [self._capacity(m) for m in self._members]

    def _ranked(self, exclude: _Member | None = None) -> Iterator[tuple[_Member, NodeCapacity]]:
        """The services by free places (most first), then sandbox memory (least first)."""
        pairs = [(m, self._capacity(m)) for m in self._members if m is not exclude]
        pairs.sort(key=lambda p: (-p[1].free, p[1].sandbox_memory_bytes))
        yield from pairs

    def create(self, image: str = "busybox", policy: str = "auto", **kwargs: Any) -> Episode:
        """A new episode (`Client.create`'s arguments) on the service with the most free places.
        A service that refuses (`ResourceExhausted`: it filled up meanwhile) is skipped; when
        every one does, raises `ResourceExhausted`."""
        why: list[str] = []
        for m, cap in self._ranked():
            if cap.free == 0:
                why.append(f"{m.info.node_id[:12]}: {cap.live}/{cap.max_episodes} live")
                continue
            try:
                return m.client.create(image, policy, **kwargs)
            except ResourceExhausted as e:
                why.append(f"{m.info.node_id[:12]}: {e.message}")
        raise ResourceExhausted("every node of the pool is full: " + "; ".join(why), kind="exhausted")

    def fork(self, ep: Episode, turn: int | None = None, n: int = 1) -> list[Episode]:
        """`n` live copies of `ep` as it was after `turn` (None: its current turn). Forks on
        `ep`'s own service as many as it has free places for; the rest go to the other services,
        most free places first: the node is exported once (`ep.export_node(turn)`), imported
        there (the imported episode is the first copy on that service, at its turn 1) and forked
        from its turn 1 for the others. A spilled copy's turns count from that import (its turn
        1 is `ep`'s `turn`), with the same files, processes and shell state. When the pool has
        too few places in all, raises `ResourceExhausted` and deletes the copies it made."""
        if n < 1:
            raise InvalidArgument(f"n must be at least 1, got {n}")
        home = self._member(ep)
        if turn is None:
            turn = ep.turn
        out: list[Episode] = []
        try:
            local = min(n, self._capacity(home).free)
            if local > 0:
                # Filled up meanwhile: all of it goes elsewhere.
                with contextlib.suppress(ResourceExhausted):
                    out += ep.fork(turn=turn, n=local)
            rest = n - len(out)
            bundle: bytes | None = None
            for m, cap in self._ranked(exclude=home) if rest > 0 else ():
                if rest == 0:
                    break
                if cap.free == 0:
                    continue
                if bundle is None:
                    bundle = ep.export_node(turn=turn)
                try:
                    imported = m.client.import_node(bundle)
                except ResourceExhausted:
                    continue
                out.append(imported)
                more = min(rest, cap.free) - 1
                if more > 0:
                    with contextlib.suppress(ResourceExhausted):
                        out += imported.fork(turn=1, n=more)
                rest = n - len(out)
            if rest > 0:
                raise ResourceExhausted(
                    f"the pool has room for {n - rest} of the {n} copies of {ep.id}@{turn} "
                    f"({len(self._members)} nodes): none was kept",
                    kind="exhausted",
                )
        except BaseException:
            for e in out:
                with contextlib.suppress(SandtreeError):
                    e.delete()
            raise
        return out

    def shutdown(self) -> None:
        """Closes the clients and stops the services whose actors this pool made (their
        `stop()`, then `ray.kill`). Attached actors and services go on running."""
        for m in self._members:
            m.client.close()
            if m.owned and m.actor is not None:
                _stop_actor(m.actor)
        self._members = []
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SandtreePool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"SandtreePool({[m.info.addr for m in self._members]})"


def _stop_actor(actor: Any) -> None:
    import ray

    # A dead actor: its service got SIGTERM when the actor's process died.
    with contextlib.suppress(Exception):
        ray.get(actor.stop.remote(), timeout=120)
    ray.kill(actor)


def alive_nodes(resources: Mapping[str, float] | None = None) -> list[str]:
    """The ids of Ray's alive nodes (`ray.nodes()`), those with all of `resources` if given."""
    import ray

    want = resources or {}
    return [
        n["NodeID"]
        for n in ray.nodes()
        if n.get("Alive") and all(n.get("Resources", {}).get(k, 0) >= v for k, v in want.items())
    ]
