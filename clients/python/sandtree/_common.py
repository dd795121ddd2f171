"""What the sync and the async client share: where the service is (its socket, or its TCP
listener with the token), how to dial it, and how arguments become requests (so both clients
check and send exactly the same thing)."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sandtree._pb.v1 import sandtree_pb2 as pb
from sandtree.errors import InvalidArgument, StepTimeout
from sandtree.models import StepResult

DEFAULT_SOCKET = "/run/sandtree/sandtree.sock"

MAX_FILE_BYTES = 32 << 20
"""Largest file `write_file` and `read_file` move, and the largest stdin of a step (the server's
limit)."""

MAX_MESSAGE_BYTES = 80 << 20
"""The service's gRPC message limit (both ways); the client's is the same."""

MAX_FORK = 64
"""Most copies one fork makes (the server's limit)."""

# A unix socket never needs a proxy. gRPC's default :authority for a unix target is the socket
# path, which the service's HTTP/2 stack (hyper) rejects as malformed (RST_STREAM PROTOCOL_ERROR
# on every call): send "localhost".
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.default_authority", "localhost"),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),
]


TCP_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]

MAX_TOKEN_BYTES = 4096
"""Longest token a token file may hold (the service's limit)."""


def resolve_socket(socket: str | os.PathLike[str] | None) -> str:
    """The socket path: the argument, else $SANDTREE_SOCKET, else the service's default."""
    path = os.fspath(socket) if socket is not None else os.environ.get("SANDTREE_SOCKET") or DEFAULT_SOCKET
    return os.path.abspath(path)


def target(socket: str) -> str:
    """The gRPC target of an absolute socket path."""
    return f"unix://{socket}"


def parse_tcp_addr(addr: str) -> str:
    """`tcp://HOST:PORT` -> `HOST:PORT` (the one form `addr` and `serve --listen` take)."""
    rest = addr.removeprefix("tcp://")
    host, _, port = rest.rpartition(":")
    if rest == addr or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"address {addr!r} must be tcp://HOST:PORT")
    return rest


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in `path`: its content, trimmed. Refused as the service refuses it: not a
    regular file, any permission for group or others (it must be 0600 or 0400), empty, over
    4096 bytes, or not printable ASCII."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"token file {p} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise InvalidArgument(
                f"token file {p} has mode {mode:04o}: group and others must have no access (chmod 600 {p})"
            )
        with open(p, "rb") as f:
            raw = f.read(MAX_TOKEN_BYTES * 2)
    except OSError as e:
        raise InvalidArgument(f"token file {p}: {e.strerror or e}") from None
    token = raw.strip()
    if not token:
        raise InvalidArgument(f"token file {p} is empty")
    if len(token) > MAX_TOKEN_BYTES:
        raise InvalidArgument(f"token file {p} holds more than {MAX_TOKEN_BYTES} bytes")
    if not all(0x21 <= b <= 0x7E for b in token):
        raise InvalidArgument(
            f"token file {p}: the token must be printable ASCII without spaces (e.g. `openssl rand -hex 32`)"
        )
    return token.decode()


@dataclass(frozen=True)
class Endpoint:
    """Where a client reaches the service: its unix socket (no token), or the `HOST:PORT` of
    its TCP listener with the token every call carries and, for TLS, the CA certificate (PEM)
    that the service's certificate must chain to."""

    socket: str | None = None
    addr: str | None = None
    token: str | None = field(default=None, repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """The socket path, or `tcp://HOST:PORT`, for messages."""
        return self.socket if self.socket is not None else f"tcp://{self.addr}"

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """What every call sends: the token on TCP, nothing on the socket."""
        return (("authorization", f"Bearer {self.token}"),) if self.token is not None else None

    def target(self) -> str:
        return target(self.socket) if self.socket is not None else str(self.addr)

    def options(self) -> list[tuple[str, int | str]]:
        return CHANNEL_OPTIONS if self.socket is not None else TCP_CHANNEL_OPTIONS


def resolve_endpoint(
    socket: str | os.PathLike[str] | None,
    addr: str | None,
    token_file: str | os.PathLike[str] | None,
    tls_ca: str | os.PathLike[str] | None,
) -> Endpoint:
    """The `socket` argument, else the `addr` argument, else $SANDTREE_ADDR, else
    $SANDTREE_SOCKET, else the default socket. A TCP address needs a token file (the argument,
    else $SANDTREE_TOKEN_FILE); `tls_ca` (else $SANDTREE_TLS_CA) turns TLS on."""
    if socket is not None and addr is not None:
        raise InvalidArgument("give socket or addr, not both")
    if socket is None and addr is None:
        addr = os.environ.get("SANDTREE_ADDR") or None
    if addr is None:
        return Endpoint(socket=resolve_socket(socket))
    hostport = parse_tcp_addr(addr)
    token_file = token_file if token_file is not None else os.environ.get("SANDTREE_TOKEN_FILE") or None
    if token_file is None:
        raise InvalidArgument(
            f"addr {addr} needs token_file= (or $SANDTREE_TOKEN_FILE): the service refuses every "
            "call over TCP without its token"
        )
    ca_path = tls_ca if tls_ca is not None else os.environ.get("SANDTREE_TLS_CA") or None
    ca = None
    if ca_path is not None:
        try:
            with open(ca_path, "rb") as f:
                ca = f.read()
        except OSError as e:
            raise InvalidArgument(f"tls_ca {os.fspath(ca_path)}: {e.strerror or e}") from None
    return Endpoint(addr=hostport, token=read_token_file(token_file), tls_ca=ca)


def check_count(n: int) -> None:
    # The server reads a count of 0 as 1: refuse it here rather than make one copy.
    if not 1 <= n <= MAX_FORK:
        raise InvalidArgument(f"fork count must be 1..={MAX_FORK}, got {n}")


def check_warm(name: str, n: int) -> None:
    if not 0 <= n <= MAX_FORK:
        raise InvalidArgument(f"{name} must be 0..={MAX_FORK}, got {n}")


def _uint(name: str, v: int | None) -> int:
    if v is None:
        return 0
    if v < 0:
        raise InvalidArgument(f"{name} must not be negative, got {v}")
    return int(v)


def timeout_ms(timeout: float | None) -> int:
    """StepRequest.timeout_ms for a timeout in seconds (None: the service's default)."""
    if timeout is None:
        return 0
    if not (timeout > 0 and math.isfinite(timeout)):
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
    return math.ceil(timeout * 1000)


def _data(name: str, v: bytes | str | None) -> bytes:
    if v is None:
        return b""
    b = v.encode() if isinstance(v, str) else bytes(v)
    # The server refuses more than MAX_FILE_BYTES itself (its message is the same); past the
    # message limit gRPC would not even send it.
    if len(b) > MAX_MESSAGE_BYTES - (1 << 20):
        raise InvalidArgument(f"{name} is {len(b)} bytes; the limit is {MAX_FILE_BYTES} bytes")
    return b


def create_request(
    image: str,
    policy: str,
    labels: Mapping[str, str] | None,
    memory_mib: int | None,
    pids: int | None,
    cpus: float | None,
) -> pb.CreateEpisodeRequest:
    if cpus is not None and not (cpus >= 0 and math.isfinite(cpus)):
        raise InvalidArgument(f"cpus must be a positive number, got {cpus!r}")
    return pb.CreateEpisodeRequest(
        image=image,
        policy=policy,
        labels=dict(labels or {}),
        memory_mib=_uint("memory_mib", memory_mib),
        pids=_uint("pids", pids),
        cpus=float(cpus or 0.0),
    )


def step_request(
    episode: str,
    cmd: str,
    timeout: float | None,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | str | None,
    max_output: int | None,
) -> pb.StepRequest:
    if max_output is not None and max_output < 1:
        raise InvalidArgument(f"max_output must be at least 1 byte, got {max_output}")
    return pb.StepRequest(
        episode=episode,
        command=cmd,
        timeout_ms=timeout_ms(timeout),
        env=dict(env or {}),
        cwd=cwd or "",
        stdin=_data("stdin", stdin),
        max_output_bytes=_uint("max_output", max_output),
    )


def write_request(episode: str, path: str, data: bytes | str, mode: int) -> pb.WriteFileRequest:
    if not 0 < mode <= 0o7777:
        raise InvalidArgument(f"mode must be 0o1..0o7777 (permission bits of a new file), got {mode:#o}")
    return pb.WriteFileRequest(episode=episode, path=path, data=_data("file", data), mode=mode)


def read_request(episode: str, path: str, max_bytes: int | None) -> pb.ReadFileRequest:
    if max_bytes is not None and max_bytes < 1:
        raise InvalidArgument(f"max_bytes must be at least 1, got {max_bytes}")
    return pb.ReadFileRequest(episode=episode, path=path, max_bytes=_uint("max_bytes", max_bytes))


def read_result(path: str, r: pb.ReadFileResponse, max_bytes: int | None) -> bytes:
    """The data of a read; a whole-file read (no max_bytes) of a file the server cut is refused
    rather than returned short."""
    data = bytes(r.data)
    if max_bytes is None and r.size > len(data) and len(data) >= MAX_FILE_BYTES:
        raise InvalidArgument(
            f"{path} is {r.size} bytes; a read returns at most {MAX_FILE_BYTES} bytes "
            "(pass max_bytes= to read its start)"
        )
    return data


def list_request(labels: Mapping[str, str] | None, status: str | None) -> pb.ListEpisodesRequest:
    return pb.ListEpisodesRequest(labels=dict(labels or {}), status=status or "")


def checked(r: StepResult, check_timeout: bool, timeout: float | None) -> StepResult:
    """`r`, or StepTimeout when the caller asked for timeouts to raise and this step timed out."""
    if check_timeout and r.timed_out:
        after = f"{timeout:g}s" if timeout is not None else "the service's default timeout"
        raise StepTimeout(f"turn {r.turn}: the step timed out after {after}", r)
    return r


#: Bytes per chunk of a node bundle sent to the service (ImportNode).
BUNDLE_CHUNK = 1 << 20


def bundle_chunks(data: Any) -> Iterator[pb.NodeChunk]:
    """A node bundle as `NodeChunk`s: `data` is the bundle's bytes, a path to a file holding it,
    or a binary file object to read it from."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for i in range(0, len(view), BUNDLE_CHUNK):
            yield pb.NodeChunk(data=bytes(view[i : i + BUNDLE_CHUNK]))
        return
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            yield from bundle_chunks(f)
        return
    if not hasattr(data, "read"):
        raise InvalidArgument(f"a node bundle is bytes, a path or a binary file, not {type(data).__name__}")
    while True:
        b = data.read(BUNDLE_CHUNK)
        if not b:
            return
        yield pb.NodeChunk(data=bytes(b))
