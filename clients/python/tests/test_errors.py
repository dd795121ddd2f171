"""Without a service: a failed call becomes the exception its `sandtree-error` kind names, else
the one its gRPC code names, with the service's message."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

import sandtree
from sandtree.errors import from_rpc_error


def failed_call(code: grpc.StatusCode, details: str, kind: str | None) -> grpc.aio.AioRpcError:
    """A failed call as grpc.aio raises it (the sync client's calls give the same accessors)."""
    trailing = grpc.aio.Metadata(("sandtree-error", kind)) if kind is not None else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


C = grpc.StatusCode


@pytest.mark.parametrize(
    ("code", "kind", "cls"),
    [
        (C.NOT_FOUND, "not_found", sandtree.NotFound),
        (C.INVALID_ARGUMENT, "invalid_argument", sandtree.InvalidArgument),
        (C.OUT_OF_RANGE, "out_of_range", sandtree.OutOfRange),
        (C.FAILED_PRECONDITION, "not_restorable", sandtree.NotRestorable),
        (C.FAILED_PRECONDITION, "precondition", sandtree.FailedPrecondition),
        (C.RESOURCE_EXHAUSTED, "exhausted", sandtree.ResourceExhausted),
        (C.INTERNAL, "internal", sandtree.Internal),
        # No kind (checks before the engine, gRPC's own errors): the code decides.
        (C.INVALID_ARGUMENT, None, sandtree.InvalidArgument),
        (C.FAILED_PRECONDITION, None, sandtree.FailedPrecondition),
        (C.RESOURCE_EXHAUSTED, None, sandtree.ResourceExhausted),
        (C.DEADLINE_EXCEEDED, None, sandtree.DeadlineExceeded),
        (C.UNKNOWN, None, sandtree.Internal),
    ],
)
def test_kind_then_code(code: grpc.StatusCode, kind: str | None, cls: type[sandtree.SandtreeError]) -> None:
    e = from_rpc_error(failed_call(code, "the service's message", kind), "/s.sock")
    assert type(e) is cls
    assert (e.message, e.code, e.kind) == ("the service's message", code, kind)
    assert str(e) == "the service's message"


def test_hierarchy() -> None:
    assert issubclass(sandtree.NotRestorable, sandtree.FailedPrecondition)
    assert issubclass(sandtree.OutOfRange, sandtree.InvalidArgument)
    assert issubclass(sandtree.InvalidArgument, ValueError)
    for cls in (sandtree.NotFound, sandtree.StepTimeout, sandtree.Unavailable, sandtree.ResourceExhausted):
        assert issubclass(cls, sandtree.SandtreeError)
