"""The code-repair task the two examples share: a tiny project with bugs and tests, written into a
sandbox with write_file, a seeded stochastic scripted "policy" that proposes one-line edits (sed),
and a reward that is the fraction of tests passing.

On `debian` (python3 inside) the project is Python and the tests run with unittest; on `busybox`
(no python) it is the same project in POSIX sh, so that the examples also run on the small image.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import sandtree

WORKDIR = "/workspace"

PY_SOURCE = """\
def add(a, b):
    return a - b


def mul(a, b):
    return a + b


def sub(a, b):
    return a - b


def clamp(x, lo, hi):
    return max(lo, min(x, lo))
"""

PY_TESTS = """\
import unittest

from calc import add, clamp, mul, sub


class T(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)

    def test_mul(self):
        self.assertEqual(mul(4, 3), 12)

    def test_sub(self):
        self.assertEqual(sub(5, 2), 3)

    def test_clamp(self):
        self.assertEqual(clamp(7, 0, 5), 5)
        self.assertEqual(clamp(3, 0, 5), 3)
"""

# Runs the tests and prints one line the reward parses. -B: no .pyc, which a same-size edit in the
# same second would leave stale (pyc checks mtime and size).
PY_RUN = (
    "python3 -B -c 'import unittest; r=unittest.TextTestRunner(verbosity=0)"
    '.run(unittest.defaultTestLoader.loadTestsFromName("test_calc")); '
    'print("PASSED %d/%d" % (r.testsRun-len(r.failures)-len(r.errors), r.testsRun))\''
)

SH_SOURCE = """\
add() { echo $(( $1 - $2 )); }
mul() { echo $(( $1 + $2 )); }
sub() { echo $(( $1 - $2 )); }
clamp() { v=$1; [ "$v" -gt "$3" ] && v=$2; [ "$v" -lt "$2" ] && v=$2; echo "$v"; }
"""

SH_TESTS = """\
. ./calc.sh
p=0; n=0
check() { n=$((n+1)); if [ "$1" = "$2" ]; then p=$((p+1)); else echo "FAIL $3: got $1, want $2"; fi; }
check "$(add 2 3)" 5 add
check "$(mul 4 3)" 12 mul
check "$(sub 5 2)" 3 sub
check "$(clamp 7 0 5)$(clamp 3 0 5)" 53 clamp
echo "PASSED $p/$n"
"""
SH_RUN = "sh test.sh"


@dataclass(frozen=True)
class Project:
    files: dict[str, str]
    run_tests: str
    # Per buggy line: (file, line number, candidate replacements; exactly one is right).
    edits: tuple[tuple[str, int, tuple[str, ...]], ...]


PY_PROJECT = Project(
    files={"calc.py": PY_SOURCE, "test_calc.py": PY_TESTS},
    run_tests=PY_RUN,
    edits=(
        ("calc.py", 2, ("    return a + b", "    return b - a", "    return a * b")),
        ("calc.py", 6, ("    return a * b", "    return a ** b", "    return a + b + a")),
        ("calc.py", 14, ("    return max(lo, min(x, hi))", "    return min(lo, max(x, hi))", "    return x")),
    ),
)

SH_PROJECT = Project(
    files={"calc.sh": SH_SOURCE, "test.sh": SH_TESTS},
    run_tests=SH_RUN,
    edits=(
        ("calc.sh", 1, ("add() { echo $(( $1 + $2 )); }", "add() { echo $(( $2 - $1 )); }", "add() { :; }")),
        ("calc.sh", 2, ("mul() { echo $(( $1 * $2 )); }", "mul() { echo $(( $1 + $1 )); }", "mul() { :; }")),
        (
            "calc.sh",
            4,
            (
                'clamp() { v=$1; [ "$v" -gt "$3" ] && v=$3; [ "$v" -lt "$2" ] && v=$2; echo "$v"; }',
                'clamp() { echo "$2"; }',
                'clamp() { echo "$1"; }',
            ),
        ),
    ),
)


def project(image: str) -> Project:
    return PY_PROJECT if image != "busybox" else SH_PROJECT


def ensure_image(c: sandtree.Client, image: str) -> None:
    """Builds `image` on the service if it is missing (debian copies the cached debootstrap)."""
    if image not in c.images():
        print(f"building image {image} ...", flush=True)
        c.build_image(image)


def setup_actions(p: Project) -> list[tuple[str, str]]:
    """The prefix of every episode: ("write", path=content) per file, then a test run."""
    acts: list[tuple[str, str]] = [("step", f"mkdir -p {WORKDIR}")]
    for name, text in p.files.items():
        acts.append(("write", f"{WORKDIR}/{name}\0{text}"))
    acts.append(("step", f"cd {WORKDIR} && {p.run_tests}"))
    return acts


def run_action(ep: sandtree.Episode, act: tuple[str, str]) -> sandtree.StepResult:
    kind, arg = act
    if kind == "write":
        path, text = arg.split("\0", 1)
        return ep.write_file(path, text)
    return ep.step(arg, timeout=60)


def sed_edit(p: Project, i: int, k: int) -> str:
    """The shell command of edit (bug i, candidate k): replace that line with sed."""
    file, line, cands = p.edits[i]
    text = cands[k].replace("\\", "\\\\").replace("/", "\\/").replace("&", "\\&").replace("'", "'\\''")
    return f"cd {WORKDIR} && sed -i '{line}s/.*/{text}/' {file}"


class Policy:
    """A seeded stochastic scripted policy: proposes a random (bug, candidate) edit."""

    def __init__(self, p: Project, seed: int) -> None:
        self.p = p
        self.rng = random.Random(seed)

    def propose(self) -> tuple[str, str]:
        i = self.rng.randrange(len(self.p.edits))
        k = self.rng.randrange(len(self.p.edits[i][2]))
        return ("step", sed_edit(self.p, i, k))


PASSED = re.compile(r"PASSED (\d+)/(\d+)")


def reward(test_output: str) -> float:
    """The fraction of tests passing, from the runner's `PASSED p/n` line (0.0 if absent)."""
    m = PASSED.search(test_output)
    return int(m.group(1)) / int(m.group(2)) if m and int(m.group(2)) else 0.0


def test_action(p: Project) -> tuple[str, str]:
    return ("step", f"cd {WORKDIR} && {p.run_tests}")


SED = re.compile(r"'(\d+)s/\.\*/(.*)/' (\S+)$")


def describe(act: tuple[str, str]) -> str:
    """A short form of an edit: `file:line <- new text` (cut)."""
    m = SED.search(act[1])
    if not m:
        return act[1][:40]
    text = m.group(2).replace("\\&", "&").replace("\\/", "/").strip()
    return f"{m.group(3)}:{m.group(1)} <- {text[:32]}"
