#!/usr/bin/env python3
"""Node bundles of a trajectory suite: every distinct fs and full node of each trajectory, run
under `auto` on service A, is exported (`Episode.export_node`) and imported on service B
(`Client.import_node`); prints each bundle's size beside the node's own checkpoint bytes, and
the export and import times, with medians per node kind. Not a test: run it by hand, as root,
against two running services with the suite's images built on both:

    python clients/python/bench_bundles.py --a A.sock --b B.sock ../shared/workloads/public

A bundle holds the node's whole delta against its image (and, for a full node, its CRIU image
with the parent chain it reads pages from); a node's checkpoint bytes are what it added to its
parent, so the two measure different things. The episodes it makes are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import sandtree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="socket of the service that runs and exports")
    ap.add_argument("--b", required=True, help="socket of the service that imports")
    ap.add_argument("suite", type=Path, help="a directory of trajectory *.json files")
    args = ap.parse_args()
    a, b = sandtree.Client(args.a), sandtree.Client(args.b)
    rows: list[tuple[str, int, str, int, int, float, float]] = []
    for f in sorted(args.suite.glob("*.json")):
        t = json.loads(f.read_text())
        with a.create(t["image"], policy="auto") as ep:
            for turn in t["turns"]:
                ep.step(turn["cmd"], timeout=60)
            seen: set[int] = set()
            for tr in ep.tree().turns[1:]:
                if tr.kind not in ("fs", "full") or tr.node in seen or tr.state != "committed":
                    continue
                seen.add(tr.node)
                t0 = time.monotonic()
                data = ep.export_node(tr.turn)
                exported = time.monotonic() - t0
                t0 = time.monotonic()
                imp = b.import_node(data)
                imported = time.monotonic() - t0
                imp.delete()
                rows.append((t["name"], tr.turn, tr.kind, len(data), tr.bytes, exported, imported))
    for kind in ("fs", "full"):
        r = [x for x in rows if x[2] == kind]
        if r:
            print(
                f"{kind}: {len(r)} nodes; bundle median {statistics.median(x[3] for x in r):.0f} B "
                f"(sum {sum(x[3] for x in r)}), node checkpoint bytes median "
                f"{statistics.median(x[4] for x in r):.0f} B (sum {sum(x[4] for x in r)}); export median "
                f"{statistics.median(x[5] for x in r) * 1e3:.0f} ms, import median "
                f"{statistics.median(x[6] for x in r) * 1e3:.0f} ms"
            )
    for name, turn, kind, size, node, e, i in rows:
        print(
            f"  {name:<28} turn {turn:2d} {kind:<4} bundle {size:9d} B  node {node:9d} B  "
            f"export {e * 1e3:5.0f} ms  import {i * 1e3:5.0f} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
