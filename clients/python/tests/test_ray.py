"""Ray placement (`sandtree.ray`): a Ray cluster of two nodes on this machine
(`ray.cluster_utils.Cluster`), each node running its own sandtree service through the pool's
actor; a pool places 8 episodes across both, steps run on them, and forks spill to the second
node once the first is full. The same pool logic is also run against two services without Ray,
and an actor body attaches to a service that already runs.

The measured figures (placement, local vs spilled fork latency) are printed (`pytest -s`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sandtree
from sandtree.ray import ACTOR_PREFIX, SandtreePool, SandtreeService, alive_nodes

from .conftest import Service, _have, require, sandtree_bin

COUNTER = "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/c; sleep 0.1; done' >/dev/null 2>&1 &"
MAX = 6  # places per service: 8 episodes take 4 + 4, and leave 2 + 2 for the forks


def _requirements() -> str:
    binary = sandtree_bin()
    require(binary.is_file(), f"{binary} not built (cargo build -p sandtree, or set SANDTREE_BIN)")
    require(os.geteuid() == 0, "not root (the service runs sandboxes)")
    require(_have("criu"), "CRIU not found (run scripts/setup.sh)")
    require(_have("mkfs.btrfs"), "btrfs-progs not found")
    return str(binary)


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie of ours would still answer: our children are reaped by the actor's thread.
        time.sleep(0.1)
    return False


def _reap(session: str, timeout: float = 10) -> None:
    """Ray 2.40's per-node dashboard agent can outlive its raylet after `Cluster.shutdown()` (it
    retries a report to the GCS, which is gone): kill what is left of this cluster's processes,
    those whose command line names its own session dir, then remove that dir."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit() and int(p.name) != os.getpid():
                try:
                    if session.encode() in (p / "cmdline").read_bytes():
                        left.append(int(p.name))
                except OSError:
                    pass
        if not left:
            break
        if time.monotonic() > deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.5)
    shutil.rmtree(session, ignore_errors=True)


def scenario(pool: SandtreePool) -> dict[str, object]:
    """8 episodes across the pool's two services (MAX places each), steps on them, then forks
    of one episode: a local one, one split between both nodes, one spilled whole, and one that
    does not fit. Returns the measured figures."""
    nodes = [s.node_id for s in pool.services]
    assert len(nodes) == 2
    eps = [pool.create("busybox", labels={"i": str(i)}) for i in range(8)]
    placed = Counter(pool.node_of(e) for e in eps)
    assert placed == {nodes[0]: 4, nodes[1]: 4}, placed
    for e in eps:
        e.write_file("/workspace/id", e.id)
        r = e.step("cat /workspace/id; echo; echo step2")
        assert (r.turn, r.stdout, r.exit_code) == (2, f"{e.id}\nstep2\n", 0)
    a0 = eps[0]
    home = pool.node_of(a0)
    other = nodes[1] if home == nodes[0] else nodes[0]
    # Turn 3 starts a daemon: a full node (CRIU image), whose process must come along.
    r = a0.step(f"echo before > /workspace/before; cd /workspace; export K=v; {COUNTER}")
    assert r.turn == 3 and a0.tree().turns[3].kind == "full"

    t = time.monotonic()
    local = pool.fork(a0, turn=3, n=1)
    local_s = time.monotonic() - t
    split = pool.fork(a0, turn=3, n=2)
    t = time.monotonic()
    spilled = pool.fork(a0, turn=3, n=1)
    spill_s = time.monotonic() - t
    assert [pool.node_of(e) for e in local] == [home]
    assert sorted(pool.node_of(e) for e in split) == sorted([home, other])
    assert [pool.node_of(e) for e in spilled] == [other]
    copies = local + split + spilled
    for c in copies:
        assert c.read_file("/workspace/before") == b"before\n"
        r = c.step("cat id before; pwd; echo $K; a=$(cat /tmp/c); sleep 0.5; echo $a $(cat /tmp/c)")
        lines = r.stdout.splitlines()
        assert lines[:3] == [f"{a0.id}before", "/workspace", "v"], (c, r)
        a, b = map(int, lines[3].split())
        assert b > a >= 1, f"the counter process came along and runs: {r.stdout}"
    # The spilled copies' turns count from their import: turn 1 is a0's turn 3.
    for c in spilled:
        assert c.turn == 2 and c.tree().turns[1].kind == "full"
    caps = {c.node_id: c for c in pool.capacity()}
    assert (caps[home].live, caps[other].live) == (MAX, MAX), caps

    # Full: a fork that does not fit anywhere is refused and leaves nothing; so is a create.
    with pytest.raises(sandtree.ResourceExhausted, match="room for 0 of the 1"):
        pool.fork(a0, turn=3, n=1)
    with pytest.raises(sandtree.ResourceExhausted, match="every node of the pool is full"):
        pool.create("busybox")
    assert [c.live for c in pool.capacity()] == [MAX, MAX]
    # A fork bigger than the free places in all keeps none of the copies it made.
    eps[1].delete()
    eps[-1].delete()
    before = sorted(c.live for c in pool.capacity())
    with pytest.raises(sandtree.ResourceExhausted, match="room for 2 of the 3"):
        pool.fork(a0, turn=3, n=3)
    assert sorted(c.live for c in pool.capacity()) == before
    for e in eps[2:-1] + copies + [a0]:
        e.delete()
    assert [c.live for c in pool.capacity()] == [0, 0]
    return {
        "placement": {n[:12]: placed[n] for n in nodes},
        "local_fork_s": round(local_s, 3),
        "spilled_fork_s": round(spill_s, 3),
    }


@pytest.fixture
def base_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sandtree-ray-"))
    yield d
    # The services' own stop() removed their dirs; what is left here is empty or a failure's.
    for p in sorted(d.rglob("*"), reverse=True):
        if p.is_dir() and not os.path.ismount(p):
            with contextlib.suppress(OSError):
                p.rmdir()
    with contextlib.suppress(OSError):
        d.rmdir()


def test_pool_places_and_spills_without_ray(base_dir: Path) -> None:
    binary = _requirements()
    services = []
    try:
        for _ in range(2):
            services.append(SandtreeService(binary=binary, base_dir=str(base_dir), max_episodes=MAX))
        infos = [s.info() for s in services]
        assert all(i.started and i.addr.startswith("tcp://127.0.0.1:") for i in infos)
        # Two services on one host: tell them apart by their address.
        infos = [dataclasses.replace(i, node_id=f"svc{k}") for k, i in enumerate(infos)]
        with SandtreePool(infos) as pool:
            figures = scenario(pool)
        print(f"\nsandtree.ray without Ray: {figures}")
    finally:
        for s in services:
            pid = s.info().pid
            s.stop()
            assert pid is not None and _gone(pid)
            assert s.data_dir is not None and not s.data_dir.exists()


def test_actor_body_attaches_to_a_running_service(service: Service) -> None:
    s = SandtreeService(attach_addr=service.addr, attach_token_file=service.token_file, max_episodes=256)
    info = s.info()
    assert (info.started, info.addr, info.pid) == (False, service.addr, None)
    assert info.token == Path(service.token_file).read_text().strip()
    s.stop()  # leaves an attached service running
    assert service.proc.poll() is None
    with SandtreePool([info]) as pool, pool.create("busybox") as ep:
        assert ep.step("echo attached").stdout == "attached\n"
    with pytest.raises(sandtree.InvalidArgument, match="token file"):
        SandtreeService(attach_addr=service.addr)


def test_ray_cluster_of_two_nodes(base_dir: Path) -> None:
    binary = _requirements()
    ray = pytest.importorskip("ray") if os.environ.get("CI") != "true" else __import__("ray")
    from ray.cluster_utils import Cluster

    started = time.monotonic()
    small: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**small, "resources": {"node_a": 1}, "include_dashboard": False},
    )
    try:
        cluster.add_node(**small, resources={"node_b": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        (a,) = alive_nodes({"node_a": 1})
        (b,) = alive_nodes({"node_b": 1})
        assert a != b and sorted(alive_nodes()) == sorted([a, b])
        pool = SandtreePool.start([a, b], max_episodes=MAX, binary=binary, base_dir=str(base_dir))
        infos = pool.services
        try:
            assert [i.node_id for i in infos] == [a, b], "each service runs on its own node"
            assert all(i.started and i.pid is not None for i in infos)
            assert len({i.addr for i in infos}) == 2
            for i in infos:
                assert i.data_dir is not None
                st = os.stat(Path(i.data_dir) / "token")
                assert st.st_mode & 0o777 == 0o600
            # A second pool finds the same actors by name (Ray's registry) and attaches.
            with SandtreePool.start([a, b], max_episodes=MAX) as again:
                assert [i.addr for i in again.services] == [i.addr for i in infos]
            figures = scenario(pool)
        finally:
            pool.shutdown()
        for i in infos:
            assert i.pid is not None and _gone(i.pid), f"service {i.pid} still runs after shutdown"
            assert i.data_dir is not None and not Path(i.data_dir).exists()
        # A killed actor takes its service down with it (SIGTERM on its process's death).
        lone = SandtreePool.start([b], max_episodes=2, binary=binary, base_dir=str(base_dir))
        (killed,) = lone.services
        ray.kill(ray.get_actor(ACTOR_PREFIX + b))
        assert killed.pid is not None and _gone(killed.pid), "the service outlived its actor"
        lone.shutdown()
        assert killed.data_dir is not None
        SandtreeService._cleanup(Path(killed.data_dir))
    finally:
        worker = ray._private.worker.global_worker
        session = worker.node.get_session_dir_path() if ray.is_initialized() else None
        ray.shutdown()
        cluster.shutdown()  # type: ignore[no-untyped-call]
        if session is not None:
            _reap(session)
    figures["wall_s"] = round(time.monotonic() - started, 1)
    print(f"\nsandtree.ray on a Ray cluster of two nodes: {figures}")
