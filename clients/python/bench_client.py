#!/usr/bin/env python3
"""Client-side latency of the Python client, with the CLI measured beside it in the same run.
Not a test: run it by hand against a running service (as root: the socket is mode 0600).

    python clients/python/bench_client.py [--socket PATH] [--cli PATH] [--runs 5] [--samples 20]

Each figure is the median over `--runs` runs of that run's median (each run times `--samples`
operations one after another), with the spread of the run medians beside it:

- step `true`, sync Client and AsyncClient: the round trip of one turn that changes nothing;
- step `true` through the CLI, `sandtree step EP -- true` as a subprocess (process start included);
- write_file and read_file of 1 MiB (a write is a turn: its round trip includes waiting for the
  checkpoint of the previous write, shown apart as the median over all writes), and the CLI's
  `write`/`read` of the same;
- 32 episodes stepping `true` at once from one AsyncClient: steps per second of wall time.

The episodes it makes are labelled bench=client and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import sandtree

LABELS = {"bench": "client"}
MIB = 1 << 20


def median_of_runs(runs: int, one_run: Callable[[], list[float]]) -> tuple[float, float, float]:
    """(median, min, max) over runs of each run's median."""
    meds = [statistics.median(one_run()) for _ in range(runs)]
    return statistics.median(meds), min(meds), max(meds)


def timed(n: int, op: Callable[[], object]) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        op()
        out.append(time.perf_counter() - t)
    return out


async def atimed(n: int, op: Callable[[], Awaitable[object]]) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await op()
        out.append(time.perf_counter() - t)
    return out


def row(name: str, fig: tuple[float, float, float], unit: str = "ms", scale: float = 1e3) -> None:
    med, lo, hi = (x * scale for x in fig)
    print(f"  {name:<46} {med:9.2f} {unit:<8} (runs {lo:.2f} .. {hi:.2f})")


def find_cli(arg: str | None) -> str:
    for c in (arg, os.environ.get("SANDTREE_BIN"), shutil.which("sandtree")):
        if c and os.access(c, os.X_OK):
            return c
    here = Path(__file__).resolve().parents[2] / "target" / "debug" / "sandtree"
    if here.is_file():
        return str(here)
    raise SystemExit("no sandtree binary: pass --cli PATH or set SANDTREE_BIN")


def spread(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", help="the service's socket (default: $SANDTREE_SOCKET, else the default)")
    ap.add_argument("--cli", help="the sandtree binary (default: $SANDTREE_BIN, PATH, target/debug)")
    ap.add_argument("--image", default="busybox")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--samples", type=int, default=20, help="operations timed per run")
    ap.add_argument("--concurrent", type=int, default=32, help="episodes stepping at once")
    ap.add_argument("--rounds", type=int, default=10, help="steps of each concurrent episode per run")
    a = ap.parse_args()
    cli = find_cli(a.cli)
    c = sandtree.Client(a.socket)
    if c.socket is None:
        raise SystemExit("bench_client.py measures the unix socket: give --socket, or unset SANDTREE_ADDR")
    env = {**os.environ, "SANDTREE_SOCKET": c.socket}
    h = c.health()
    print(f"sandtree {h.version}, storage {h.storage}; inspector: {h.inspector}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"client: python {sys.version.split()[0]}; cli: {cli}; {os.cpu_count()} cpus, load {load}")
    print(f"each figure: median over {a.runs} runs of the run's median ({a.samples} ops per run)\n")
    payload = os.urandom(MIB)
    made: list[sandtree.Episode] = []

    def new() -> sandtree.Episode:
        ep = c.create(a.image, labels=LABELS)
        made.append(ep)
        return ep

    def runs(op: Callable[[], object]) -> tuple[float, float, float]:
        return median_of_runs(a.runs, lambda: timed(a.samples, op))

    def run_cli(*args: str, stdin_path: str | None = None) -> None:
        with open(stdin_path or os.devnull, "rb") as f:
            subprocess.run([cli, *args], stdin=f, env=env, check=True, stdout=subprocess.DEVNULL)

    try:
        print("step `true` round trip")
        ep_sync, ep_async, ep_cli = new(), new(), new()
        for ep in (ep_sync, ep_async, ep_cli):
            ep.step("true")  # warm up
        row("python sync   ep.step('true')", runs(lambda: ep_sync.step("true")))

        async def async_runs() -> tuple[float, float, float]:
            async with sandtree.AsyncClient(c.socket) as ac:
                aep = ac.episode(ep_async.id)
                await aep.step("true")
                meds = []
                for _ in range(a.runs):
                    meds.append(statistics.median(await atimed(a.samples, lambda: aep.step("true"))))
                return spread(meds)

        row("python async  await ep.step('true')", asyncio.run(async_runs()))
        row("cli           sandtree step EP -- true", runs(lambda: run_cli("step", ep_cli.id, "--", "true")))

        print("\n1 MiB file (a write is a turn)")
        ep_f = new()
        waits: list[float] = []

        def write() -> None:
            waits.append(ep_f.write_file("/workspace/f", payload).accepted_us / 1e6)

        row("python        ep.write_file(1 MiB)", runs(write))
        row("  of which    waiting for the previous write's checkpoint", spread(waits))
        assert ep_f.read_file("/workspace/f") == payload
        row("python        ep.read_file(1 MiB)", runs(lambda: ep_f.read_file("/workspace/f")))
        with tempfile.NamedTemporaryFile() as src:
            src.write(payload)
            src.flush()
            row(
                "cli           sandtree write EP PATH < 1 MiB",
                runs(lambda: run_cli("write", ep_f.id, "/workspace/g", stdin_path=src.name)),
            )
        row(
            "cli           sandtree read EP PATH > /dev/null",
            runs(lambda: run_cli("read", ep_f.id, "/workspace/g")),
        )

        n = a.concurrent
        print(f"\n{n} episodes stepping `true` at once from one AsyncClient ({a.rounds} steps each per run)")

        async def concurrent() -> list[float]:
            async with sandtree.AsyncClient(c.socket) as ac:
                eps = await asyncio.gather(*(ac.create(a.image, labels=LABELS) for _ in range(n)))
                try:
                    await asyncio.gather(*(e.step("true") for e in eps))

                    async def loop(e: sandtree.AsyncEpisode) -> None:
                        for _ in range(a.rounds):
                            r = await e.step("true")
                            assert r.exit_code == 0

                    rates = []
                    for _ in range(a.runs):
                        t = time.perf_counter()
                        await asyncio.gather(*(loop(e) for e in eps))
                        rates.append(n * a.rounds / (time.perf_counter() - t))
                    return rates
                finally:
                    await asyncio.gather(*(e.delete() for e in eps))

        row("steps per second (all episodes)", spread(asyncio.run(concurrent())), "steps/s", 1.0)
    finally:
        for ep in made:
            ep.delete()
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
