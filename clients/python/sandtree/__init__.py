"""Python client for sandtree: branchable agent sandboxes for RL.

    import sandtree

    with sandtree.Client() as c, c.create("busybox") as ep:
        ep.step("echo hello > f")
        a, b = ep.fork(n=2)

The asyncio client is `sandtree.aio.AsyncClient`.
"""

from sandtree.client import Client, Episode
from sandtree.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    SandtreeError,
    Unavailable,
)
from sandtree.models import EpisodeInfo, EpisodeStats, Health, Probe, Stats, StepResult, Tree, Turn

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "Episode",
    "EpisodeInfo",
    "EpisodeStats",
    "FailedPrecondition",
    "Health",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "Probe",
    "SandtreeError",
    "Stats",
    "StepResult",
    "Tree",
    "Turn",
    "Unavailable",
    "__version__",
]
