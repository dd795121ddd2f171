"""sandtree.aio against the real service: the basic flow, forks stepped concurrently."""

from __future__ import annotations

import asyncio

import pytest

import sandtree
from sandtree.aio import AsyncClient

from .conftest import Service


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
