"""Python client for sandtree: branchable agent sandboxes for RL.

    import sandtree

    c = sandtree.Client()                        # $SANDTREE_SOCKET, else /run/sandtree/sandtree.sock
    # or a service's TCP listener: Client(addr="tcp://HOST:PORT", token_file="token")
    with c.create("busybox", labels={"task": "t1"}) as ep:    # deleted on exit
        ep.write_file("/workspace/a.py", b"print(1)\\n")     # a turn of its own
        r = ep.step("echo hi", timeout=30, env={"A": "1"})
        print(r.turn, r.stdout, r.exit_code)
        kids = ep.fork(turn=1, n=4)              # live copies of turn 1
        ep.rewind(1)

`sandtree.AsyncClient` (also `sandtree.aio.AsyncClient`) is the same API, awaited. Errors are
`SandtreeError` subclasses carrying the service's message.
"""

from sandtree.aio import AsyncClient, AsyncEpisode
from sandtree.client import Client, Episode
from sandtree.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    NotRestorable,
    OutOfRange,
    ResourceExhausted,
    SandtreeError,
    StepTimeout,
    Unauthenticated,
    Unavailable,
)
from sandtree.models import (
    Chunk,
    EpisodeInfo,
    EpisodeStats,
    Health,
    Prepared,
    Probe,
    Stats,
    StepResult,
    Tree,
    Turn,
)

__version__ = "0.2.0"

__all__ = [
    "AsyncClient",
    "AsyncEpisode",
    "Cancelled",
    "Chunk",
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
    "NotRestorable",
    "OutOfRange",
    "Prepared",
    "Probe",
    "ResourceExhausted",
    "SandtreeError",
    "Stats",
    "StepResult",
    "StepTimeout",
    "Tree",
    "Turn",
    "Unauthenticated",
    "Unavailable",
    "__version__",
]
