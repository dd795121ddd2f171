"""A real sandtree service for the tests: `sandtree serve` on its own data dir and socket under
/tmp, started once per session and stopped (SIGTERM, wait) at the end.

The binary is $SANDTREE_BIN, else <repo>/target/debug/sandtree. A missing requirement (not root,
no binary, no CRIU, ...) skips the tests that need the service, with the reason; under CI=true it
fails them instead, so nothing is silently skipped in CI.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandtree

REPO = Path(__file__).resolve().parents[3]


def require(ok: bool, reason: str) -> None:
    """Skips the test unless `ok`; fails it instead under CI=true."""
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"requirement missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def sandtree_bin() -> Path:
    return Path(os.environ.get("SANDTREE_BIN") or REPO / "target" / "debug" / "sandtree")


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# SIGTERM to the service when pytest dies, so a killed test run (a CI timeout) does not leave it
# and its loop mount behind. util-linux's setpriv sets it in the child, not a preexec_fn: Python
# code between fork and exec is unsafe beside gRPC's threads (a TLS test's service once died of
# SIGABRT there, from gRPC's fork handler).
TERM_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_token(path: Path, mode: int = 0o600) -> Path:
    """A long random token in `path`, with `mode`."""
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(mode)
    return path


class Service:
    """One `sandtree serve` child process and its directory. Besides its socket it listens on
    TCP at `addr` (127.0.0.1, a free port), where every call needs the token in `token_file`."""

    def __init__(self, binary: Path, storage: str = "btrfs", extra: tuple[str, ...] = ()) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sandtree-py-"))
        self.socket = str(self.dir / "s.sock")
        self.log = self.dir / "serve.log"
        self.addr = f"tcp://127.0.0.1:{free_port()}"
        self.token_file = str(write_token(self.dir / "token"))
        cmd = [*TERM_WITH_PARENT, str(binary), "serve", "--storage", storage]
        cmd += ["--data-dir", str(self.dir / "data")]
        cmd += ["--socket", self.socket, "--listen", self.addr, "--token-file", self.token_file, *extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "SANDTREE_LOG": os.environ.get("SANDTREE_LOG", "info"), "NO_COLOR": "1"},
            )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with sandtree.Client(self.socket) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sandtree serve exited {self.proc.returncode}:\n{_tail(self.log)}")
                if os.path.exists(self.socket):
                    try:
                        c.health()
                        return
                    except sandtree.Unavailable:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sandtree serve did not start in {timeout}s:\n{_tail(self.log)}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # The embedded btrfs image the service mounted in its data dir (as tests/src/lib.rs does).
        mnt = self.dir / "data" / "storage" / "mnt"
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False, stderr=subprocess.DEVNULL)
        if not os.path.ismount(mnt):
            shutil.rmtree(self.dir, ignore_errors=True)


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None or os.access(f"/usr/local/sbin/{tool}", os.X_OK)


_failed_log: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for tail in _failed_log:
        terminalreporter.section("sandtree serve log (tail)")
        terminalreporter.write_line(tail)


@pytest.fixture(scope="session")
def service(request: pytest.FixtureRequest) -> Iterator[Service]:
    binary = sandtree_bin()
    require(binary.is_file(), f"{binary} not built (cargo build -p sandtree, or set SANDTREE_BIN)")
    require(os.geteuid() == 0, "not root (the service runs sandboxes)")
    require(_have("criu"), "CRIU not found (run scripts/setup.sh)")
    require(_have("mkfs.btrfs"), "btrfs-progs not found")
    require(os.path.exists("/bin/busybox"), "busybox-static not installed")
    svc = Service(binary)
    try:
        svc.wait_ready()
        with sandtree.Client(svc.socket) as c:
            if "busybox" not in c.images():
                c.build_image("busybox")
        yield svc
    finally:
        if request.session.testsfailed:
            # The log goes with the data dir: keep its tail for the terminal summary.
            _failed_log.append(_tail(svc.log))
        svc.stop()


@pytest.fixture(scope="session")
def client(service: Service) -> Iterator[sandtree.Client]:
    with sandtree.Client(service.socket) as c:
        yield c
