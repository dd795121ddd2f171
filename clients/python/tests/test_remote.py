"""A service's TCP listener (`serve --listen`): Client(addr=..., token_file=...) and the async
client work with the token; a wrong token raises `Unauthenticated` and changes nothing; token
files are checked as the service checks them; TLS with a self-signed certificate (openssl)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandtree
import sandtree.aio

from .conftest import Service, _have, _tail, require, sandtree_bin, unique, write_token


def test_calls_with_the_token_work(service: Service) -> None:
    with sandtree.Client(addr=service.addr, token_file=service.token_file) as c:
        assert c.addr == service.addr and c.socket is None
        assert service.addr in repr(c)
        with c.create("busybox", policy="auto") as ep:
            r = ep.step("echo hi > /f; cat /f")
            assert (r.turn, r.stdout) == (1, "hi\n")
            chunks = list(ep.step_stream("cat /f"))
            assert chunks[-1].turn == 2  # type: ignore[union-attr]
            ep.write_file("/g", b"data")
            assert ep.read_file("/g") == b"data"
        assert ep.id in {e.id for e in c.list_episodes(status="deleted")}


def test_a_wrong_token_raises_unauthenticated_and_changes_nothing(service: Service, tmp_path: Path) -> None:
    wrong = write_token(tmp_path / "wrong")
    label = unique("refused")
    with sandtree.Client(service.socket) as local:
        ep = local.create("busybox", policy="auto")
        try:
            ep.step("echo 1 > /f")
            with sandtree.Client(addr=service.addr, token_file=wrong) as bad:
                with pytest.raises(sandtree.Unauthenticated) as e:
                    bad.create("busybox", labels={"t": label})
                assert e.value.kind == "unauthenticated" and "wrong token" in e.value.message
                bad_ep = bad.episode(ep.id)
                with pytest.raises(sandtree.Unauthenticated):
                    bad_ep.step("echo 2 > /f")
                with pytest.raises(sandtree.Unauthenticated):
                    list(bad_ep.step_stream("echo 3 > /f"))
                with pytest.raises(sandtree.Unauthenticated):
                    bad_ep.fork(turn=1)
                with pytest.raises(sandtree.Unauthenticated):
                    bad_ep.delete()
                with pytest.raises(sandtree.Unauthenticated):
                    bad.health()
            # Over the socket (no token needed): nothing happened.
            assert local.list_episodes(labels={"t": label}) == []
            assert ep.turn == 1
            assert ep.read_file("/f") == b"1\n"
        finally:
            ep.delete()


def test_async_client_over_tcp(service: Service, tmp_path: Path) -> None:
    wrong = write_token(tmp_path / "wrong")

    async def main() -> None:
        async with sandtree.aio.AsyncClient(addr=service.addr, token_file=service.token_file) as c:
            ep = await c.create("busybox")
            try:
                assert (await ep.step("echo a")).stdout == "a\n"
                items = [i async for i in ep.step_stream("echo b")]
                assert isinstance(items[-1], sandtree.StepResult) and items[-1].turn == 2
                async with sandtree.aio.AsyncClient(addr=service.addr, token_file=wrong) as bad:
                    with pytest.raises(sandtree.Unauthenticated):
                        await bad.episode(ep.id).step("echo c")
                    with pytest.raises(sandtree.Unauthenticated):
                        _ = [i async for i in bad.episode(ep.id).step_stream("echo c")]
                    with pytest.raises(sandtree.Unauthenticated):
                        await bad.create("busybox")
                assert await ep.turn == 2
            finally:
                await ep.delete()

    asyncio.run(main())


def test_token_files_and_addresses_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("SANDTREE_ADDR", "SANDTREE_TOKEN_FILE", "SANDTREE_TLS_CA", "SANDTREE_SOCKET"):
        monkeypatch.delenv(k, raising=False)
    addr = "tcp://127.0.0.1:1"
    cases = [
        (write_token(tmp_path / "open", 0o644), "mode 0644"),
        (write_token(tmp_path / "group", 0o640), "mode 0640"),
        (tmp_path / "missing", "missing"),
    ]
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    empty.chmod(0o600)
    cases.append((empty, "is empty"))
    for path, why in cases:
        with pytest.raises(sandtree.InvalidArgument, match=why):
            sandtree.Client(addr=addr, token_file=path)
    with pytest.raises(sandtree.InvalidArgument, match="token_file"):
        sandtree.Client(addr=addr)
    good = write_token(tmp_path / "token", 0o400)
    for bad_addr in ("127.0.0.1:7000", "tcp://host", "http://h:1", "tcp://h:99999"):
        with pytest.raises(sandtree.InvalidArgument, match="tcp://HOST:PORT"):
            sandtree.Client(addr=bad_addr, token_file=good)
    with pytest.raises(sandtree.InvalidArgument, match="not both"):
        sandtree.Client(str(tmp_path / "s.sock"), addr=addr, token_file=good)

    # The environment: SANDTREE_ADDR and SANDTREE_TOKEN_FILE; an explicit socket still wins.
    monkeypatch.setenv("SANDTREE_ADDR", addr)
    monkeypatch.setenv("SANDTREE_TOKEN_FILE", str(good))
    with sandtree.Client() as c:
        assert (c.addr, c.socket) == (addr, None)
        assert good.read_text().strip() not in repr(c) + repr(c.endpoint)
        with pytest.raises(sandtree.Unavailable, match=r"tcp://127\.0\.0\.1:1"):
            c.health()
    with sandtree.Client(tmp_path / "s.sock") as c:
        assert (c.addr, c.socket) == (None, str(tmp_path / "s.sock"))


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Path]]:
    """A second service, its TCP listener with TLS (a self-signed certificate), on `dir` storage
    (it runs no sandbox)."""
    binary = sandtree_bin()
    require(binary.is_file(), f"{binary} not built (cargo build -p sandtree, or set SANDTREE_BIN)")
    require(_have("openssl"), "openssl(1) not found (run scripts/setup.sh)")
    require(_have("criu"), "CRIU not found (run scripts/setup.sh)")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "1", "-subj", "/CN=sandtree-test", "-keyout", str(key), "-out", str(cert)),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            # An end-entity certificate: a CA certificate is refused as the server's own.
            *("-addext", "basicConstraints=critical,CA:FALSE"),
        ],
        check=True,
        capture_output=True,
    )
    svc = Service(binary, storage="dir", extra=("--tls-cert", str(cert), "--tls-key", str(key)))
    try:
        svc.wait_ready()
        yield svc, cert
    finally:
        if svc.proc.poll() is not None:
            print(_tail(svc.log))
        svc.stop()


def test_tls_with_a_self_signed_certificate(tls_service: tuple[Service, Path], tmp_path: Path) -> None:
    svc, cert = tls_service
    with sandtree.Client(addr=svc.addr, token_file=svc.token_file, tls_ca=cert) as c:
        assert c.health().storage
        assert c.images() == []
    wrong = write_token(tmp_path / "wrong")
    with (
        sandtree.Client(addr=svc.addr, token_file=wrong, tls_ca=cert) as c,
        pytest.raises(sandtree.Unauthenticated),
    ):
        c.episodes()
    # Plaintext to a TLS listener does not get through.
    with (
        sandtree.Client(addr=svc.addr, token_file=svc.token_file) as c,
        pytest.raises(sandtree.SandtreeError),
    ):
        c.health()

    async def main() -> None:
        async with sandtree.aio.AsyncClient(addr=svc.addr, token_file=svc.token_file, tls_ca=cert) as c:
            assert (await c.health()).storage

    asyncio.run(main())
