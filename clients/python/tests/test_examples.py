"""examples/rl end to end against the test service, on busybox (the same task in sh) with small
parameters, each as the one command a user runs."""

from __future__ import annotations

import os
import subprocess
import sys

from .conftest import REPO, Service


def run_example(service: Service, name: str, *args: str) -> str:
    p = subprocess.run(
        [sys.executable, str(REPO / "examples" / "rl" / name), "--image", "busybox", *args],
        env={**os.environ, "SANDTREE_SOCKET": service.socket},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_tree_search_example(service: Service) -> None:
    out = run_example(service, "tree_search.py", "--seed", "1", "--width", "2", "--budget", "12")
    assert out.count("solved: True") == 2, out
    assert "winning trajectory" in out and "summary: sandtree" in out


def test_grpo_example(service: Service) -> None:
    args = ["--G", "4", "--k", "6", "--m", "2", "--setup-work", "50000"]
    out = run_example(service, "grpo_rollout.py", *args)
    assert "rewards identical without sandtree: True" in out, out
    assert "summary: G=4 k=6" in out
