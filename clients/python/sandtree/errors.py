"""The exception hierarchy, and the one place gRPC errors become exceptions.

Every exception is a `SandtreeError` carrying the service's own message::

    try:
        ep.rewind(99)
    except sandtree.OutOfRange as e:
        print(e.message, e.code, e.kind)  # "...", grpc.StatusCode.OUT_OF_RANGE, "out_of_range"

The service names the kind of every error it answers with in the trailing metadata key
`sandtree-error` (not_found | invalid_argument | out_of_range | not_restorable | precondition |
exhausted | unauthenticated | internal); the exception class follows that kind, and the gRPC
status code when the key is absent (errors raised before a request reaches the engine, e.g. a
malformed episode id, and errors of gRPC itself).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

if TYPE_CHECKING:
    from sandtree.models import StepResult

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "NotRestorable",
    "OutOfRange",
    "ResourceExhausted",
    "SandtreeError",
    "StepTimeout",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]

ERROR_KEY = "sandtree-error"
"""The trailing metadata key in which the service names the kind of an error."""


class SandtreeError(Exception):
    """Any error the service answered with (or could not be reached for).

    `message` is the service's own message; `code` the gRPC status code and `kind` the service's
    `sandtree-error` kind (each None when the error was raised without an answer of the service,
    e.g. by the client's own argument checks).
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.kind = kind


class NotFound(SandtreeError):
    """No such episode, image, or file in the sandbox (NOT_FOUND; kind not_found)."""


class InvalidArgument(SandtreeError, ValueError):
    """The request was refused as malformed or over a limit: bad policy, episode id or image name,
    a file over 32 MiB, too many or too long labels, memory over the server's maximum, ...
    (INVALID_ARGUMENT; kind invalid_argument). Also a `ValueError`: the client raises it for
    arguments it can refuse without asking (e.g. `fork(n=0)`)."""


class OutOfRange(InvalidArgument):
    """A turn the episode does not have, e.g. fork or rewind past its current turn (OUT_OF_RANGE;
    kind out_of_range)."""


class FailedPrecondition(SandtreeError):
    """The episode is not in a state for this: deleted, stopped, its sandbox cannot run commands,
    or a file operation the sandbox refused (FAILED_PRECONDITION; kind precondition)."""


class NotRestorable(FailedPrecondition):
    """The turn has no committed checkpoint to fork or rewind to (e.g. under policy `none`, or a
    node already collected) (FAILED_PRECONDITION; kind not_restorable)."""


class ResourceExhausted(SandtreeError):
    """The host takes no more live episodes (--max-episodes), or a message was over gRPC's size
    limit (RESOURCE_EXHAUSTED; kind exhausted)."""


class Unauthenticated(SandtreeError):
    """A call over TCP without the service's token, or with another one (UNAUTHENTICATED; kind
    unauthenticated): check `token_file` / $SANDTREE_TOKEN_FILE. The call did nothing."""


class Unavailable(SandtreeError):
    """The service cannot be reached: not running, wrong socket, no permission (UNAVAILABLE)."""


class DeadlineExceeded(SandtreeError):
    """The call's deadline passed before the service answered (DEADLINE_EXCEEDED)."""


class Cancelled(SandtreeError):
    """The call was cancelled (CANCELLED)."""


class Internal(SandtreeError):
    """The service failed (INTERNAL, UNKNOWN and any other code; kind internal); its log says more."""


class StepTimeout(SandtreeError):
    """A step hit its timeout. Raised only by `step(..., check_timeout=True)` (and `step_stream`
    with it); `result` is the step's `StepResult` (its turn was recorded like any other)::

        try:
            ep.step("sleep 60", timeout=1, check_timeout=True)
        except sandtree.StepTimeout as e:
            print(e.result.turn, e.result.stdout)
    """

    def __init__(self, message: str, result: StepResult) -> None:
        super().__init__(message)
        self.result = result


_BY_KIND: dict[str, type[SandtreeError]] = {
    "not_found": NotFound,
    "invalid_argument": InvalidArgument,
    "out_of_range": OutOfRange,
    "not_restorable": NotRestorable,
    "precondition": FailedPrecondition,
    "exhausted": ResourceExhausted,
    "unauthenticated": Unauthenticated,
    "internal": Internal,
}

_BY_CODE: dict[grpc.StatusCode, type[SandtreeError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def _kind(metadata: Iterable[Any] | None) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == ERROR_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def from_rpc_error(e: grpc.RpcError, socket: str) -> SandtreeError:
    """The exception for a failed call to the service at `socket` (a socket path, or
    `tcp://HOST:PORT`) (sync or grpc.aio)."""
    if not isinstance(e, grpc.Call | grpc.aio.AioRpcError):
        return Internal(str(e))
    code = e.code()
    details = e.details() or str(e)
    try:
        kind = _kind(e.trailing_metadata())
    except Exception:  # a call that failed before it had metadata
        kind = None
    if code == grpc.StatusCode.UNAVAILABLE and socket.startswith("tcp://"):
        return Unavailable(
            f"the sandtree service is not reachable at {socket} ({details}); start it there with "
            f"`sandtree serve --listen {socket} --token-file FILE`, or point SANDTREE_ADDR or "
            "Client(addr=...) at the listener of a running service",
            code,
            kind,
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(
            f"the sandtree service is not reachable at {socket} ({details}); start it with "
            f"`sandtree serve --socket {socket}` (as root), or point SANDTREE_SOCKET or "
            "Client(socket=...) at the socket of a running service",
            code,
            kind,
        )
    cls = _BY_KIND.get(kind or "") or _BY_CODE.get(code, Internal)
    return cls(details, code, kind)
