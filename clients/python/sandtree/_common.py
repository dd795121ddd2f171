"""What the sync and the async client share: where the socket is and how to dial it."""

from __future__ import annotations

import os

DEFAULT_SOCKET = "/run/sandtree/sandtree.sock"

# Step outputs can be large (the Rust CLI accepts 64 MiB too); a unix socket never needs a proxy.
# gRPC's default :authority for a unix target is the socket path, which the service's HTTP/2 stack
# (hyper) rejects as malformed (RST_STREAM PROTOCOL_ERROR on every call): send "localhost".
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.default_authority", "localhost"),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
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
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
