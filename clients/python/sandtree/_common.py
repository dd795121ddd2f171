"""What the sync and the async client share: where the socket is, how to dial it, and how
arguments become requests (so both clients check and send exactly the same thing)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

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


def resolve_socket(socket: str | os.PathLike[str] | None) -> str:
    """The socket path: the argument, else $SANDTREE_SOCKET, else the service's default."""
    path = os.fspath(socket) if socket is not None else os.environ.get("SANDTREE_SOCKET") or DEFAULT_SOCKET
    return os.path.abspath(path)


def target(socket: str) -> str:
    """The gRPC target of an absolute socket path."""
    return f"unix://{socket}"


def check_count(n: int) -> None:
    # The server reads a count of 0 as 1: refuse it here rather than make one copy.
    if not 1 <= n <= MAX_FORK:
        raise InvalidArgument(f"fork count must be 1..={MAX_FORK}, got {n}")


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
