"""The trainer API against a real service: step options, files, labels, limits, streaming,
forks of files and processes, and every kind of bad input."""

from __future__ import annotations

import time
import uuid

import pytest

import sandtree
from sandtree import Client, Episode

from .conftest import unique

MAX_FILE = 32 << 20


def test_create_labels_turn_and_episodes(client: Client) -> None:
    task = unique("task")
    with client.create("busybox", policy="auto", labels={"task": task, "k": "v"}) as ep:
        assert isinstance(ep, Episode)
        assert ep.turn == 0
        ep.step("true")
        assert ep.turn == 1
        assert ep.info().labels == {"task": task, "k": "v"}
        found = client.episodes(labels={"task": task})
        assert found == [ep] and isinstance(found[0], Episode)
        assert client.episodes(labels={"task": task, "k": "other"}) == []
        assert client.episodes(labels={"task": task}, status="running") == [ep]
        assert client.episodes(labels={"task": task}, status="stopped") == []
        (kid,) = ep.fork(n=1)
        with kid:
            assert kid.info().labels == {"task": task, "k": "v"}, "forks inherit labels"
            assert set(client.episodes(labels={"task": task})) == {ep, kid}
    assert client.episodes(labels={"task": task}) == []
    assert ep in client.episodes(labels={"task": task}, status="deleted")
    with pytest.raises(sandtree.InvalidArgument, match="status"):
        client.episodes(status="bogus")


def test_step_env_and_cwd_are_for_one_step(client: Client) -> None:
    with client.create() as ep:
        ep.step("export KEEP=session; cd /tmp")
        r = ep.step('echo "$A $KEEP"; pwd', env={"A": "1", "KEEP": "step"}, cwd="/workspace")
        assert r.stdout == "1 step\n/workspace\n"
        assert r.cwd == "/tmp", "the session's cwd is unchanged by a step's cwd"
        r = ep.step('echo "${A:-unset} $KEEP"; pwd')
        assert r.stdout == "unset session\n/tmp\n"
        with pytest.raises(sandtree.InvalidArgument, match="absolute"):
            ep.step("true", cwd="relative")
        with pytest.raises(sandtree.InvalidArgument, match="reserved"):
            ep.step("true", env={"__ST_X": "1"})


def test_stdin_binary_output_and_max_output(client: Client) -> None:
    with client.create() as ep:
        r = ep.step("cat; echo; wc -c", stdin=b"line one\nline two")
        assert r.stdout.startswith("line one\nline two\n")
        r = ep.step("wc -c", stdin=bytes(range(256)) * 4)
        assert r.stdout.strip() == "1024"
        r = ep.step(r"printf '\377\376'; printf '\001\377' >&2")
        assert r.stdout_bytes == b"\xff\xfe" and r.stderr_bytes == b"\x01\xff"
        assert r.stdout == "\ufffd\ufffd" and r.stderr == "\x01\ufffd"
        r = ep.step("head -c 5000 /dev/zero", max_output=100)
        assert r.stdout_truncated and len(r.stdout_bytes) == 100
        with pytest.raises(sandtree.InvalidArgument, match="maximum"):
            ep.step("true", max_output=1 << 30)


def test_check_timeout(client: Client) -> None:
    with client.create() as ep:
        r = ep.step("sleep 30", timeout=0.5)
        assert r.timed_out and r.duration_ms < 20_000
        with pytest.raises(sandtree.StepTimeout) as e:
            ep.step("echo started; sleep 30", timeout=0.5, check_timeout=True)
        assert e.value.result.timed_out and e.value.result.turn == 2
        assert e.value.result.stdout == "started\n"
        assert isinstance(e.value, sandtree.SandtreeError)
        assert ep.step("true", check_timeout=True).ok


def test_write_and_read_file(client: Client) -> None:
    with client.create(policy="auto") as ep:
        ep.step("echo before > /workspace/b")
        r = ep.write_file("/workspace/a.py", b"print(1)\n")
        assert isinstance(r, sandtree.StepResult)
        assert (r.turn, r.verdict, r.exit_code) == (2, "fs", 0)
        assert ep.turn == 2
        assert ep.read_file("/workspace/a.py") == b"print(1)\n"
        assert ep.step("cat /workspace/a.py; stat -c %a /workspace/a.py").stdout == "print(1)\n644\n"
        ep.write_file("/workspace/run.sh", "echo ran\n", mode=0o755)
        assert ep.step("/workspace/run.sh").stdout == "ran\n"
        assert ep.tree()[2].action.startswith("# sandtree write /workspace/a.py")
        assert ep.read_file("/workspace/a.py", max_bytes=5) == b"print"
        data = bytes(range(256)) * 4096  # 1 MiB, every byte value
        ep.write_file("/workspace/bin", data)
        assert ep.read_file("/workspace/bin") == data
        with pytest.raises(sandtree.NotFound, match="no-such"):
            ep.read_file("/workspace/no-such")
        with pytest.raises(sandtree.InvalidArgument):
            ep.read_file("/workspace")
        with pytest.raises(sandtree.NotFound):
            ep.write_file("/no/such/dir/f", b"x")
        # A write is a turn: rewinding before it takes the file away.
        ep.rewind(1)
        with pytest.raises(sandtree.NotFound):
            ep.read_file("/workspace/a.py")
        assert ep.read_file("workspace/b") == b"before\n", "relative paths resolve from the root"


def test_path_escape_stays_in_the_sandbox(client: Client) -> None:
    mark = f"sandbox-{uuid.uuid4().hex}\n".encode()
    with client.create() as ep:
        ep.write_file("/etc/hostname", mark)
        assert ep.read_file("../../../../etc/hostname") == mark
        assert ep.read_file("/../../etc/hostname") == mark
        ep.step("ln -s /etc/hostname /workspace/abs; ln -s ../../../../../etc/hostname /workspace/rel")
        assert ep.read_file("/workspace/abs") == mark
        assert ep.read_file("/workspace/rel") == mark
        with pytest.raises(sandtree.InvalidArgument):  # no /proc magic links
            ep.read_file("/proc/1/root/etc/hostname")


def test_oversized_file_is_refused(client: Client) -> None:
    with client.create() as ep:
        big = bytes(MAX_FILE + 1)
        with pytest.raises(sandtree.InvalidArgument, match=str(MAX_FILE)) as e:
            ep.write_file("/workspace/big", big)
        assert e.value.kind == "invalid_argument"
        with pytest.raises(sandtree.InvalidArgument, match=str(MAX_FILE)):
            ep.read_file("/workspace/x", max_bytes=MAX_FILE + 1)
        with pytest.raises(sandtree.InvalidArgument, match=str(MAX_FILE)):
            ep.step("true", stdin=big)
        assert ep.turn == 0, "nothing refused made a turn"


def test_labels_and_limits_are_checked(client: Client) -> None:
    with pytest.raises(sandtree.InvalidArgument, match="at most 32"):
        client.create(labels={f"k{i}": "v" for i in range(33)})
    with pytest.raises(sandtree.InvalidArgument, match="256"):
        client.create(labels={"k" * 257: "v"})
    with pytest.raises(sandtree.InvalidArgument, match="256"):
        client.create(labels={"k": "v" * 257})
    with pytest.raises(sandtree.InvalidArgument, match=r"maximum of \d+ MiB") as e:
        client.create(memory_mib=1 << 30)
    assert e.value.kind == "invalid_argument"
    with pytest.raises(sandtree.InvalidArgument, match="pids"):
        client.create(pids=1 << 30)
    with pytest.raises(sandtree.InvalidArgument, match="cpus"):
        client.create(cpus=1e6)
    with client.create(memory_mib=64, pids=64, cpus=0.5) as ep:
        assert ep.step("cat /proc/self/cgroup >/dev/null; echo ok").stdout == "ok\n"


def test_unknown_episode_everywhere(client: Client) -> None:
    ep = client.episode("no-such-episode-" + uuid.uuid4().hex[:8])
    calls = [
        lambda: ep.step("true"),
        lambda: ep.write_file("/f", b"x"),
        lambda: ep.read_file("/f"),
        lambda: ep.fork(turn=0),
        lambda: ep.rewind(0),
        ep.tree,
        ep.delete,
    ]
    for call in calls:
        with pytest.raises(sandtree.NotFound) as e:
            call()
        assert e.value.message and e.value.kind == "not_found"


def test_turn_past_the_end_and_bad_counts(client: Client) -> None:
    with client.create() as ep:
        ep.step("true")
        with pytest.raises(sandtree.OutOfRange) as e:
            ep.fork(turn=5)
        assert e.value.kind == "out_of_range" and e.value.message
        with pytest.raises(sandtree.OutOfRange):
            ep.rewind(2)
        with pytest.raises(sandtree.InvalidArgument, match=r"1\.\.=64"):
            ep.fork(turn=1, n=0)
        with pytest.raises(sandtree.InvalidArgument, match=r"1\.\.=64"):
            ep.fork(turn=1, n=65)
        assert ep.turn == 1


def test_fork_has_the_parents_files_and_processes(client: Client) -> None:
    with client.create(policy="auto") as ep:
        ep.write_file("/workspace/note", b"written before the fork\n")
        ep.step("sleep 1000 >/dev/null 2>&1 &")
        parent = ep.step("pidof sleep").stdout.split()
        assert parent, "the background sleep runs"
        (kid,) = ep.fork()
        with kid:
            assert kid.read_file("/workspace/note") == b"written before the fork\n"
            assert kid.step("pidof sleep").stdout.split() == parent, "the same sleep, restored"
            kid.step("kill " + " ".join(parent))
            assert ep.step("pidof sleep").stdout.split() == parent, "the parent's is its own"


def test_prepare_makes_forks_warm_and_alike(client: Client) -> None:
    with client.create(policy="auto") as ep:
        ep.step("sleep 1000 >/dev/null 2>&1 &")
        parent = ep.step("pidof sleep").stdout.split()
        p = ep.prepare(turn=2, n=1)
        assert (p.ready, p.evicted) == (1, 0) and p.memory_bytes > 0 and p.warm_bytes >= p.memory_bytes
        hits = client.stats().warm_hits
        warm, cold = ep.fork(turn=2, n=2)
        with warm, cold:
            assert client.stats().warm_hits == hits + 1, "one fork took the copy"
            for kid in (warm, cold):
                assert kid.step("pidof sleep").stdout.split() == parent
        assert ep.prepare(turn=2, n=0).ready == 0
        with pytest.raises(sandtree.InvalidArgument):
            ep.prepare(turn=2, n=65)


def test_step_stream_yields_chunks_before_the_result(client: Client) -> None:
    with client.create() as ep:
        items: list[tuple[float, sandtree.Chunk | sandtree.StepResult]] = []
        t0 = time.monotonic()
        for item in ep.step_stream("echo one; sleep 1.5; echo two >&2; echo three"):
            items.append((time.monotonic() - t0, item))
        *chunks, (t_end, result) = items
        assert isinstance(result, sandtree.StepResult)
        assert result.stdout == "one\nthree\n" and result.stderr == "two\n" and result.turn == 1
        assert chunks and all(isinstance(c, sandtree.Chunk) for _, c in chunks)
        first_t, first = chunks[0]
        assert first == ("stdout", b"one\n")
        assert t_end - first_t > 1.0, "the first chunk came before the sleep ended"
        out = b"".join(c.data for _, c in chunks if isinstance(c, sandtree.Chunk) and c.stream == "stdout")
        err = b"".join(c.data for _, c in chunks if isinstance(c, sandtree.Chunk) and c.stream == "stderr")
        assert (out, err) == (b"one\nthree\n", b"two\n")
        # Options and check_timeout apply as for step.
        with pytest.raises(sandtree.StepTimeout):
            list(ep.step_stream("cat; sleep 30", timeout=0.5, stdin=b"x", check_timeout=True))
        with pytest.raises(sandtree.NotFound):
            list(client.episode("no-such-episode").step_stream("true"))
