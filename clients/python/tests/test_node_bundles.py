"""Node bundles from Python: `ep.export_node` / `export_node_to` and `client.import_node`
(sync and async), into the same service (the Rust test `nodes_move_between_hosts` moves them
between two services)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import sandtree
from sandtree import Client
from sandtree.aio import AsyncClient

from .conftest import Service

COUNTER = "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/c; sleep 0.2; done' >/dev/null 2>&1 &"


def test_export_import_and_fork(client: Client, tmp_path: Path) -> None:
    with client.create() as ep:
        ep.step("mkdir -p /workspace/w && cd /workspace/w && echo data > f && rm /etc/hostname")
        ep.step(COUNTER)
        data = ep.export_node(turn=2)
        assert data[:8] == b"STBUNDLE"
        with client.import_node(data) as imp:
            assert imp.turn == 1
            assert imp.tree().turns[1].kind == "full"
            (f,) = imp.fork(turn=1)
            with f:
                r = f.step("pwd; cat f; test -e /etc/hostname; echo $?; sleep 0.5; cat /tmp/c")
                lines = r.stdout.split()
                assert lines[:3] == ["/workspace/w", "data", "1"], r.stdout
                assert int(lines[3]) >= 1, "the counter process came along"
        path = tmp_path / "n1.bundle"
        assert ep.export_node_to(path, turn=1) == path.stat().st_size
        with client.import_node(path) as imp:
            assert imp.step("cat /workspace/w/f").stdout == "data\n"
            assert imp.tree().turns[1].kind == "fs"
        with open(path, "rb") as fh, client.import_node(fh) as imp:
            assert imp.step("cat /workspace/w/f").stdout == "data\n"


def test_bad_bundles_are_refused_and_leave_nothing(client: Client) -> None:
    with client.create() as ep:
        ep.step("echo x > /workspace/x")
        data = bytearray(ep.export_node())
        before = client.list_episodes(status="deleted") + client.list_episodes()
        data[len(data) // 2] ^= 0xFF
        with pytest.raises(sandtree.InvalidArgument, match="corrupt or truncated"):
            client.import_node(bytes(data))
        with pytest.raises(sandtree.InvalidArgument, match="corrupt or truncated"):
            client.import_node(bytes(data[:-10]))
        data[8] = 9
        with pytest.raises(sandtree.InvalidArgument, match="format 9 is not supported"):
            client.import_node(bytes(data))
        with pytest.raises(sandtree.InvalidArgument, match="turn 0 of"):
            ep.export_node(turn=0)
        assert client.list_episodes(status="deleted") + client.list_episodes() == before


def test_async_export_import(service: Service) -> None:
    async def main() -> None:
        async with AsyncClient(service.socket) as c, await c.create() as ep:
            await ep.step("echo async > /workspace/a")
            data = await ep.export_node()
            async with await c.import_node(data) as imp:
                assert (await imp.step("cat /workspace/a")).stdout == "async\n"

    asyncio.run(main())
