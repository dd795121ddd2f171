"""The committed stubs in sandtree/_pb/ are what gen.py makes from the current proto/: a proto
change without `./gen.sh` fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    pb = root / "sandtree" / "_pb"
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(pb.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(HERE / "gen.py"), "--out", str(tmp_path)], check=True)
    fresh, committed = _files(tmp_path), _files(HERE)
    assert fresh, "gen.py wrote nothing"
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert not stale, f"sandtree/_pb/ is not what the proto generates: {stale}; run clients/python/gen.sh"


def test_generated_imports_are_subpackage_relative() -> None:
    from sandtree._pb.v1 import sandtree_pb2, sandtree_pb2_grpc

    assert sandtree_pb2.DESCRIPTOR.name == "sandtree/v1/sandtree.proto"
    assert hasattr(sandtree_pb2_grpc, "SandtreeStub")
    assert "from sandtree.v1 " not in Path(sandtree_pb2_grpc.__file__).read_text()
