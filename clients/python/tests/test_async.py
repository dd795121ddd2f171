"""sandtree.aio against the real service: the basic flow, forks stepped concurrently."""

from __future__ import annotations

import asyncio

import pytest

import sandtree
from sandtree.aio import AsyncClient

from .conftest import Service, unique


def test_async_flow(service: Service) -> None:
    async def main() -> None:
        async with AsyncClient(service.socket) as c:
            assert (await c.health()).version
            assert "busybox" in await c.images()
            async with await c.create() as ep:
                r = await ep.step("cd /tmp && echo hi > f && echo $PWD")
                assert (r.stdout, r.exit_code, r.turn) == ("/tmp\n", 0, 1)
                await ep.step("echo later > f")
                forks = await ep.fork(turn=1, n=3)
                try:
                    outs = await asyncio.gather(
                        *(f.step(f"cat f; echo {k} > g") for k, f in enumerate(forks))
                    )
                    assert [o.stdout for o in outs] == ["hi\n"] * 3
                    outs = await asyncio.gather(*(f.step("cat g") for f in forks))
                    assert [o.stdout for o in outs] == [f"{k}\n" for k in range(3)]
                finally:
                    await asyncio.gather(*(f.delete() for f in forks))
                assert await ep.rewind(1) == 1
                assert (await ep.step("cat f")).stdout == "hi\n"
                tree = await ep.tree()
                assert [t.turn for t in tree.turns] == [0, 1, 2]
                assert (await c.stats()).episodes >= 1
            with pytest.raises(sandtree.FailedPrecondition, match="deleted"):
                await c.episode(ep.id).step("true")
            with pytest.raises(sandtree.NotFound):
                await c.episode("no-such-episode").step("true")
            with pytest.raises(sandtree.InvalidArgument):
                await c.create(policy="bogus")

    asyncio.run(main())


def test_async_client_is_top_level() -> None:
    assert sandtree.AsyncClient is AsyncClient


def test_async_api(service: Service) -> None:
    async def main() -> None:
        async with AsyncClient(service.socket) as c:
            task = unique("task")
            async with c.create("busybox", labels={"task": task}) as ep:
                assert isinstance(ep, sandtree.AsyncEpisode)
                assert await ep.turn == 0
                r = await ep.step('cat; echo "$A"; pwd', env={"A": "1"}, cwd="/tmp", stdin=b"in\n")
                assert (r.stdout, r.turn) == ("in\n1\n/tmp\n", 1)
                w = await ep.write_file("/workspace/f", b"\x00\xff data")
                assert (w.turn, w.verdict) == (2, "fs")
                assert await ep.read_file("/workspace/f") == b"\x00\xff data"
                assert await ep.read_file("/workspace/f", max_bytes=2) == b"\x00\xff"
                assert await c.episodes(labels={"task": task}) == [ep]
                items = [i async for i in ep.step_stream("echo a; sleep 0.3; echo b >&2")]
                assert items[:-1] == [("stdout", b"a\n"), ("stderr", b"b\n")]
                result = items[-1]
                assert isinstance(result, sandtree.StepResult) and result.turn == 3
                with pytest.raises(sandtree.StepTimeout) as e:
                    await ep.step("sleep 30", timeout=0.3, check_timeout=True)
                assert e.value.result.turn == 4
                with pytest.raises(sandtree.OutOfRange):
                    await ep.fork(turn=9)
                with pytest.raises(sandtree.OutOfRange):
                    await ep.rewind(9)
                with pytest.raises(sandtree.InvalidArgument):
                    await ep.fork(n=0)
                with pytest.raises(sandtree.InvalidArgument, match=str(32 << 20)):
                    await ep.write_file("/workspace/big", bytes((32 << 20) + 1))
                with pytest.raises(sandtree.NotFound):
                    await ep.read_file("/nope")
                assert await ep.rewind(2) == 2
                assert (await ep.tree()).episode.turn == 2
            assert await c.episodes(labels={"task": task}) == []
            ep2 = await c.create(memory_mib=64)
            await ep2.delete()
            with pytest.raises(sandtree.InvalidArgument, match="maximum"):
                await c.create(memory_mib=1 << 30)

    asyncio.run(main())


N = 32


def test_32_episodes_at_once(service: Service) -> None:
    """32 episodes created, stepped (twice) and deleted at once from one AsyncClient."""

    async def main() -> None:
        async with AsyncClient(service.socket) as c:
            task = unique("many")
            eps = await asyncio.gather(*(c.create(labels={"task": task}) for _ in range(N)))
            try:
                assert len({e.id for e in eps}) == N
                rs = await asyncio.gather(*(e.step(f"echo {k} > /k; cat /k") for k, e in enumerate(eps)))
                assert [r.stdout for r in rs] == [f"{k}\n" for k in range(N)]
                assert all(r.turn == 1 and r.exit_code == 0 for r in rs)
                rs = await asyncio.gather(*(e.step("cat /k; echo $((1+1))") for e in eps))
                assert [r.stdout for r in rs] == [f"{k}\n2\n" for k in range(N)]
                assert all(r.turn == 2 for r in rs)
                assert set(await c.episodes(labels={"task": task})) == set(eps)
            finally:
                await asyncio.gather(*(e.delete() for e in eps))
            assert await c.episodes(labels={"task": task}) == []

    asyncio.run(main())
