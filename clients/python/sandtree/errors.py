"""The exception hierarchy, and the one place gRPC errors become exceptions."""

from __future__ import annotations

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "SandtreeError",
    "Unavailable",
    "from_rpc_error",
]


class SandtreeError(Exception):
    """Any error the service answered with (or could not be reached for).

    `message` is the service's own message; `code` the gRPC status code (None for errors raised
    without an RPC).
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class NotFound(SandtreeError):
    """No such episode, node or image (NOT_FOUND)."""


class InvalidArgument(SandtreeError):
    """The request was malformed: bad policy, bad episode id, bad image name (INVALID_ARGUMENT)."""


class OutOfRange(InvalidArgument):
    """A turn the episode does not have, e.g. fork or rewind past its current turn (OUT_OF_RANGE)."""


class FailedPrecondition(SandtreeError):
    """The episode is not in a state for this: deleted, not running, node collected (FAILED_PRECONDITION)."""


class Unavailable(SandtreeError):
    """The service cannot be reached: not running, wrong socket, no permission (UNAVAILABLE)."""


class DeadlineExceeded(SandtreeError):
    """The call's deadline passed before the service answered (DEADLINE_EXCEEDED)."""


class Cancelled(SandtreeError):
    """The call was cancelled (CANCELLED)."""


class Internal(SandtreeError):
    """The service failed (INTERNAL, UNKNOWN and any other code); its log says more."""


_BY_CODE: dict[grpc.StatusCode, type[SandtreeError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def from_rpc_error(e: grpc.RpcError, socket: str) -> SandtreeError:
    """The exception for a failed call to the service at `socket` (sync or grpc.aio)."""
    code: grpc.StatusCode | None = e.code() if isinstance(e, grpc.Call | grpc.aio.AioRpcError) else None
    details = (e.details() if isinstance(e, grpc.Call | grpc.aio.AioRpcError) else None) or str(e)
    if code is None:
        return Internal(details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(
            f"the sandtree service is not reachable at {socket} ({details}); start it with "
            f"`sandtree serve --socket {socket}` (as root), or point SANDTREE_SOCKET or "
            "Client(socket=...) at the socket of a running service",
            code,
        )
    return _BY_CODE.get(code, Internal)(details, code)
