"""Tree(whole, outputs) in Python, and export -> replay of trajectories against a real service."""

from __future__ import annotations

import json

from sandtree import Client
from sandtree.trajectory import FORMAT


def test_tree_whole_and_outputs(client: Client) -> None:
    with client.create() as ep:
        ep.step("echo a")
        ep.step("echo b >&2; exit 4")
        (kid,) = ep.fork(turn=1, n=1)
        with kid:
            kid.step("echo c")
            t = ep.tree(whole=True, outputs=True)
            assert t.family_root == ep.id and set(t.family_episodes) == {ep.id, kid.id}
            by_turn = {(r.turn, r.action): r for r in t.family}
            assert len(t.family) == 4  # turn 0, 1, 2 of ep and turn 2 of kid
            one = by_turn[(1, "echo a")]
            assert one.stdout == "a\n" and set(one.episodes) == {ep.id, kid.id} and one.forks == (kid.id,)
            two = by_turn[(2, "echo b >&2; exit 4")]
            assert (two.stderr, two.exit_code, two.parent_record) == ("b\n", 4, one.record)
            assert by_turn[(2, "echo c")].episodes == (kid.id,)
            assert t[2].stderr == "b\n"
            assert ep.tree().family == () and ep.tree().turns[1].stdout == "", "off by default"


def test_export_replay_roundtrip(client: Client) -> None:
    with client.create() as ep:
        ep.step("mkdir -p /w && cd /w && echo hello > f")
        ep.step("cat f; echo err >&2")
        ep.step("ls /nope")
        ep.step("cat /proc/sys/kernel/random/uuid")  # differs on replay unless masked
        recs = list(client.export(ep))
        head = recs[0]
        assert head["format"] == FORMAT and head["version"] == 1 and head["root"] == ep.id
        assert head["image"] == "busybox" and head["policy"] == "auto"
        assert [r["turn"] for r in recs[1:]] == [0, 1, 2, 3, 4]
        r2 = recs[3]
        assert (r2["stdout"], r2["stderr"], r2["cwd"], r2["episode"]) == ("hello\n", "err\n", "/w", ep.id)
        assert r2["parent"] == recs[2]["record"] and recs[1]["parent"] is None
        assert recs[3]["exit_code"] == 0 and recs[4]["exit_code"] != 0
        json.loads(json.dumps(recs))  # JSON as it is
        uuid = r"[0-9a-f]{8}-[0-9a-f-]{27}"
        report = client.replay(recs, mask=uuid)
        assert report.ok, report.divergence
        assert report.turns == 4 and not report.forked
        unmasked = client.replay(recs)
        assert not unmasked.ok and unmasked.divergence is not None
        assert (unmasked.divergence["turn"], unmasked.divergence["field"]) == (4, "stdout")
        # From a fork of the recorded episode at turn 2: only turns 3 and 4 run.
        report = client.replay(recs, from_turn=2, mask=uuid)
        assert report.ok and report.forked and report.turns == 2


def test_replay_reports_first_divergence(client: Client) -> None:
    with client.create() as ep:
        ep.step("echo one")
        ep.step("cd /tmp")
        ep.step("echo three; exit 3")
        recs = list(client.export(ep))
    assert client.replay(recs).ok
    edited = [dict(r) for r in recs]
    edited[3]["cwd"] = "/var"  # turn 2
    edited[4]["exit_code"] = 0  # turn 3: later, not reported
    rep = client.replay(edited)
    assert not rep.ok and rep.divergence == {"turn": 2, "field": "cwd", "expected": "/var", "actual": "/tmp"}
    edited = [dict(r) for r in recs]
    edited[4]["exit_code"] = 0
    rep = client.replay(edited)
    assert rep.divergence == {"turn": 3, "field": "exit_code", "expected": 0, "actual": 3}
    edited[2]["stdout"] = "uno\n"
    assert client.replay(edited).divergence == {
        "turn": 1,
        "field": "stdout",
        "expected": "uno\n",
        "actual": "one\n",
    }


def test_export_all_forks(client: Client) -> None:
    with client.create() as ep:
        ep.step("echo a")
        kids = ep.fork(turn=1, n=2)
        try:
            for k, kid in enumerate(kids):
                kid.step(f"echo kid{k}")
            ep.step("echo b")
            recs = list(client.export(ep, all_forks=True))[1:]
            assert len(recs) == 5  # 0, 1, ep's 2, two kids' 2
            branch = [r for r in recs if r["turn"] == 2]
            assert {r["episode"] for r in branch} == {ep.id, *(k.id for k in kids)}
            for r in branch:
                if r["episode"] != ep.id:
                    assert r["forked_from"] == f"{ep.id}@1"
            one = next(r for r in recs if r["turn"] == 1)
            assert sorted(one["forks"]) == sorted(k.id for k in kids)
            # The live path of the root replays the same.
            assert client.replay(client.export(ep, all_forks=True)).ok
        finally:
            for kid in kids:
                kid.delete()


def test_replay_rewrites_files_from_the_recorded_episode(client: Client) -> None:
    with client.create() as ep:
        ep.write_file("/w.sh", b"echo written\n", mode=0o755)
        ep.step("sh /w.sh; ls -l /w.sh | cut -c1-10")
        recs = list(client.export(ep))
        assert recs[2]["action"] == "# sandtree write /w.sh (13 bytes, mode 755)"
        rep = client.replay(recs)
        assert rep.ok and rep.skipped == () and rep.turns == 2, rep.divergence
    # The episode is gone: the write cannot be recovered, so it is skipped and the next turn diverges.
    rep = client.replay(recs)
    assert not rep.ok and rep.skipped == (1,)
    assert rep.divergence is not None and (rep.divergence["turn"], rep.divergence["field"]) == (2, "stdout")
