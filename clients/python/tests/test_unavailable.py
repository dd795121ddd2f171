"""Without a service: the error says where it looked and how to start one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import sandtree
import sandtree.aio


def test_not_running_is_clear(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")
    with sandtree.Client(sock) as c, pytest.raises(sandtree.Unavailable) as e:
        c.health()
    msg = str(e.value)
    assert sock in msg
    assert "sandtree serve" in msg
    assert isinstance(e.value, sandtree.SandtreeError)


def test_not_running_async(tmp_path: Path) -> None:
    sock = str(tmp_path / "none.sock")

    async def main() -> None:
        async with sandtree.aio.AsyncClient(sock) as c:
            with pytest.raises(sandtree.Unavailable, match="sandtree serve"):
                await c.create()

    asyncio.run(main())


def test_socket_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SANDTREE_SOCKET", raising=False)
    with sandtree.Client() as c:
        assert c.socket == "/run/sandtree/sandtree.sock"
    monkeypatch.setenv("SANDTREE_SOCKET", str(tmp_path / "env.sock"))
    with sandtree.Client() as c:
        assert c.socket == str(tmp_path / "env.sock")
    with sandtree.Client(tmp_path / "arg.sock") as c:
        assert c.socket == str(tmp_path / "arg.sock")
