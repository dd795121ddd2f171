"""The sync client against a real service: steps, shell state, fork, rewind, tree, errors."""

from __future__ import annotations

import pytest

import sandtree
from sandtree import Client


def test_health_and_images(client: Client) -> None:
    h = client.health()
    assert h.version
    assert h.storage
    assert "busybox" in client.images()


def test_step_output_and_exit_code(client: Client) -> None:
    with client.create() as ep:
        r = ep.step("echo out; echo err >&2; exit 3")
        assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 3)
        assert r.turn == 1
        assert not r.ok and not r.timed_out and not r.stdout_truncated
        r = ep.step("true")
        assert r.ok and r.turn == 2
        assert ep.id in {e.id for e in client.list_episodes()}
    assert ep.id not in {e.id for e in client.list_episodes()}


def test_step_timeout(client: Client) -> None:
    with client.create() as ep:
        r = ep.step("sleep 30", timeout=0.5)
        assert r.timed_out
        assert r.duration < 20
        with pytest.raises(ValueError):
            ep.step("true", timeout=0)


def test_shell_state_persists(client: Client) -> None:
    with client.create() as ep:
        ep.step("mkdir -p /work/a && cd /work/a && export GREETING=hello")
        r = ep.step('pwd; echo "$GREETING"')
        assert r.stdout == "/work/a\nhello\n"
        assert r.cwd == "/work/a"


def test_fork_three_copies(client: Client) -> None:
    with client.create() as ep:
        ep.step("echo base > /f")
        ep.step("echo more >> /f")
        forks = ep.fork(turn=1, n=3)
        assert len(forks) == 3 and len(set(forks)) == 3
        try:
            for k, f in enumerate(forks):
                assert f.step("cat /f").stdout == "base\n", "the parent's files at turn 1"
                f.step(f"echo {k} > /g")
            for k, f in enumerate(forks):
                assert f.step("cat /g").stdout == f"{k}\n", "each copy is independent"
                assert f.info().forked_from == f"{ep.id}@1"
            assert ep.step("cat /f; test -e /g; echo $?").stdout == "base\nmore\n1\n"
        finally:
            for f in forks:
                f.delete()


def test_fork_default_turn_is_current(client: Client) -> None:
    with client.create() as ep:
        ep.step("echo a > /f")
        ep.step("echo b > /f")
        (f,) = ep.fork()
        with f:
            assert f.info().turn == 2
            assert f.step("cat /f").stdout == "b\n"


COUNTER = "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/c; sleep 0.2; done' >/dev/null 2>&1 &"


def test_fork_keeps_daemon(client: Client) -> None:
    with client.create() as ep:
        ep.step(COUNTER)
        before = int(ep.step("sleep 1; cat /tmp/c").stdout)
        assert before >= 1
        (f,) = ep.fork(n=1)
        with f:
            a, b = map(int, f.step("a=$(cat /tmp/c); sleep 1; echo $a $(cat /tmp/c)").stdout.split())
            # The daemon came back with its memory (its count goes on from where it was) and runs.
            assert a >= before, (before, a)
            assert b > a, (a, b)
            # The source's daemon is its own and still runs too.
            x, y = map(int, ep.step("x=$(cat /tmp/c); sleep 1; echo $x $(cat /tmp/c)").stdout.split())
            assert y > x >= before


def test_rewind_restores_file(client: Client) -> None:
    with client.create() as ep:
        ep.step("echo one > /r")
        ep.step("echo two > /r; touch /later")
        assert ep.rewind(1) == 1
        assert ep.step("cat /r; ls /later 2>/dev/null; true").stdout == "one\n"


def test_tree_shows_turns(client: Client) -> None:
    with client.create(policy="full") as ep:
        ep.step("echo x > /t")
        ep.step("false")
        tree = ep.tree()
        assert tree.episode.id == ep.id
        assert tree.episode.policy == "full"
        assert tree.episode.turn == 2
        assert [t.turn for t in tree.turns] == [0, 1, 2]
        assert tree[1].action == "echo x > /t"
        assert tree[2].action == "false" and tree[2].exit_code == 1
        with pytest.raises(KeyError):
            tree[3]


def test_stats(client: Client) -> None:
    with client.create() as ep:
        ep.step("echo s > /s")
        s = client.stats()
        assert s.episodes >= 1
        assert ep.id in {e.id for e in s.per_episode}


def test_unknown_episode_is_not_found(client: Client) -> None:
    ep = client.episode("no-such-episode-" + "0" * 8)
    with pytest.raises(sandtree.NotFound) as e:
        ep.step("true")
    assert e.value.message, "keeps the service's message"
    with pytest.raises(sandtree.NotFound):
        ep.tree()


def test_bad_arguments(client: Client) -> None:
    with pytest.raises(sandtree.InvalidArgument) as e:
        client.create(policy="bogus")
    assert "bogus" in str(e.value)
    with pytest.raises(sandtree.InvalidArgument):
        client.episode("not/an/id").step("true")
    with pytest.raises(sandtree.SandtreeError):
        client.create(image="no-such-image")
    with client.create() as ep:
        ep.step("true")
        with pytest.raises(sandtree.InvalidArgument):  # OutOfRange is an InvalidArgument
            ep.rewind(5)
        with pytest.raises(ValueError):
            ep.fork(n=0)


def test_deleted_episode(client: Client) -> None:
    ep = client.create()
    ep.delete()
    with pytest.raises(sandtree.FailedPrecondition, match="deleted"):
        ep.step("true")
    with ep:  # already deleted: the context manager does not delete again
        pass
