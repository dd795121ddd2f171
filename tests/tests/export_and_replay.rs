//! `sandtree export` and `sandtree replay` (docs/trajectory-format.md) on a real service (btrfs):
//! - every public workload trajectory, run in an episode, exported and replayed in a fresh
//!   episode, replays with no divergence; export and replay throughput (turns/s) are printed;
//! - a hand-edited record is reported as the first divergence (turn, field, expected, actual),
//!   exit 1; --mask hides what it matches;
//! - --all-forks exports the fork family; --from-turn forks the recorded episode and replays
//!   from the next turn, and says clearly when the episode is gone;
//! - a file write cannot be replayed from its record: replay says so (exit 2).

use std::time::Instant;

use sandtree_tests::*;

fn export(svc: &Service, ep: &str, extra: &[&str]) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut args = vec!["export", ep];
    args.extend(extra);
    let out = svc.ok(&args);
    let mut lines = out.lines().map(|l| {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))
    });
    let header = lines.next().expect("a header line");
    (header, lines.collect())
}

fn write_lines(path: &std::path::Path, header: &serde_json::Value, recs: &[serde_json::Value]) {
    let mut s = format!("{header}\n");
    for r in recs {
        s += &format!("{r}\n");
    }
    std::fs::write(path, s).unwrap();
}

fn replay(svc: &Service, file: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["replay", file.to_str().unwrap()];
    args.extend(extra);
    svc.cli(&args)
}

/// The episodes the service still has (replay deletes the one it made).
fn live(svc: &Service) -> usize {
    svc.ok(&["list"]).lines().count()
}

#[test]
fn public_trajectories_export_and_replay_without_divergence() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let dir = svc.dir.join("trajectories");
    std::fs::create_dir_all(&dir).unwrap();
    let (mut turns, mut run_s, mut export_s, mut replay_s) = (0usize, 0f64, 0f64, 0f64);
    for t in trajectories() {
        // Policy none: replay compares observations, not checkpoints, and none is the fastest.
        let started = Instant::now();
        let ep = svc.create(&t.image, "none");
        for turn in &t.turns {
            svc.step(&ep, &turn.cmd);
        }
        run_s += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let raw = svc.ok(&["export", &ep]);
        export_s += started.elapsed().as_secs_f64();
        let mut lines = raw
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
        let header = lines.next().unwrap();
        let recs: Vec<_> = lines.collect();
        assert_eq!(header["format"], "sandtree.trajectory");
        assert_eq!(header["version"], 1);
        assert_eq!(header["root"], ep.as_str());
        assert_eq!(header["image"], t.image.as_str());
        assert_eq!(header["policy"], "none");
        assert_eq!(
            recs.len(),
            t.turns.len() + 1,
            "{}: turn 0 and every turn",
            t.name
        );
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r["turn"], i as u64, "{}", t.name);
            assert_eq!(r["episode"], ep.as_str());
            assert_eq!(r["forked_from"], serde_json::Value::Null);
            if i == 0 {
                assert_eq!(r["parent"], serde_json::Value::Null);
            } else {
                assert_eq!(r["parent"], recs[i - 1]["record"]);
                assert_eq!(r["action"], t.turns[i - 1].cmd.as_str());
            }
        }
        let file = dir.join(format!("{}.jsonl", t.name));
        std::fs::write(&file, &raw).unwrap();
        svc.ok(&["delete", &ep]);
        let before = live(&svc);
        let started = Instant::now();
        let o = replay(&svc, &file, &[]);
        replay_s += started.elapsed().as_secs_f64();
        assert!(
            o.status.success(),
            "{} diverged: {}{}",
            t.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(live(&svc), before, "replay deletes its episode");
        turns += t.turns.len();
    }
    // Each figure includes the CLI's start and its connection; run and replay include the
    // episode's create (and replay its delete) and the trajectories' own sleeps (2.9 s in all).
    eprintln!(
        "{turns} turns: recorded (create + sandtree step each) in {run_s:.2} s = {:.1} turns/s; \
         export in {export_s:.2} s = {:.0} turns/s; replay in {replay_s:.2} s = {:.1} turns/s",
        turns as f64 / run_s,
        turns as f64 / export_s,
        turns as f64 / replay_s
    );
}

#[test]
fn replay_reports_the_first_divergence_and_forks() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let ep = svc.create("busybox", "auto");
    for cmd in [
        "mkdir -p /w && cd /w",
        "echo one > a; cat a",
        "echo err >&2; cat /proc/sys/kernel/random/uuid",
        "cat a; false",
    ] {
        svc.step(&ep, cmd);
    }
    let (header, recs) = export(&svc, &ep, &[]);
    let file = svc.dir.join("t.jsonl");
    // A random uuid differs on every run: masked, it matches.
    write_lines(&file, &header, &recs);
    let o = replay(&svc, &file, &[]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("divergence at turn 3") && out.contains("stdout"),
        "{out}"
    );
    let o = replay(&svc, &file, &["--mask", "[0-9a-f]{8}-[0-9a-f-]{27}"]);
    assert!(o.status.success(), "{o:?}");
    // --image: the replay runs on the image named, here one that does not exist.
    let o = replay(
        &svc,
        &file,
        &["--image", "nosuch", "--mask", "[0-9a-f]{8}-[0-9a-f-]{27}"],
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nosuch"),
        "{o:?}"
    );
    // A file whose records are not on the root's path, and a version this sandtree does not know.
    let mut other = header.clone();
    other["root"] = "ep-someone-else".into();
    write_lines(&svc.dir.join("other.jsonl"), &other, &recs);
    let o = replay(&svc, &svc.dir.join("other.jsonl"), &[]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("live path"),
        "{o:?}"
    );
    let mut v2 = header.clone();
    v2["version"] = 2.into();
    write_lines(&svc.dir.join("v2.jsonl"), &v2, &recs);
    let o = replay(&svc, &svc.dir.join("v2.jsonl"), &[]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("version 2"),
        "{o:?}"
    );

    // Hand-edited records: the first one that differs is reported, with the field.
    let mut edited = recs.clone();
    edited[2]["cwd"] = "/elsewhere".into();
    edited[4]["stdout"] = "two\n".into();
    write_lines(&file, &header, &edited);
    let o = replay(&svc, &file, &["--mask", "[0-9a-f]{8}-[0-9a-f-]{27}"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("divergence at turn 2"), "{out}");
    assert!(out.contains(": cwd"), "{out}");
    assert!(out.contains("expected: \"/elsewhere\""), "{out}");
    assert!(out.contains("actual:   \"/w\""), "{out}");
    let mut edited = recs.clone();
    edited[4]["exit_code"] = 0.into();
    write_lines(&file, &header, &edited);
    let o = replay(&svc, &file, &["--mask", "[0-9a-f]{8}-[0-9a-f-]{27}"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("divergence at turn 4") && out.contains("exit_code"),
        "{out}"
    );
    assert!(
        out.contains("expected: \"0\"") && out.contains("actual:   \"1\""),
        "{out}"
    );

    // --from-turn forks the recorded episode (its cwd and files come along) and replays 3..4.
    write_lines(&file, &header, &recs);
    let before = live(&svc);
    let o = replay(
        &svc,
        &file,
        &["--from-turn", "2", "--mask", "[0-9a-f]{8}-[0-9a-f-]{27}"],
    );
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("no divergence in 2 turns"),
        "{o:?}"
    );
    assert_eq!(live(&svc), before);

    // --all-forks: the family, each record once, the fork's own records on it.
    let f = svc.ok(&["fork", &ep, "--turn", "2"]).trim().to_string();
    svc.step(&f, "echo in-fork");
    let (_, all) = export(&svc, &ep, &["--all-forks"]);
    assert_eq!(all.len(), 5 + 1, "{all:?}");
    let mine = all.iter().find(|r| r["action"] == "echo in-fork").unwrap();
    assert_eq!(mine["episode"], f.as_str());
    assert_eq!(mine["forked_from"], format!("{ep}@2").as_str());
    assert_eq!(mine["stdout"], "in-fork\n");
    let t2 = all.iter().find(|r| r["turn"] == 2).unwrap();
    assert_eq!(t2["forks"], serde_json::json!([f.as_str()]));
    assert_eq!(t2["episode"], ep.as_str());
    // Replaying an --all-forks file replays the root's path only.
    write_lines(&file, &header, &all);
    let o = replay(&svc, &file, &["--mask", "[0-9a-f]{8}-[0-9a-f-]{27}"]);
    assert!(o.status.success(), "{o:?}");

    // The recorded episode is gone: --from-turn says so.
    write_lines(&file, &header, &recs);
    svc.ok(&["delete", &ep]);
    let o = replay(&svc, &file, &["--from-turn", "2"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot fork the recorded episode"), "{err}");

    // A write's data is not in its record.
    let w = svc.create("busybox", "none");
    svc.step(&w, "echo before");
    let mut c = std::process::Command::new(bin())
        .arg("--socket")
        .arg(&svc.socket)
        .args(["write", &w, "/tmp/f"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    c.stdin.take().unwrap().write_all(b"data").unwrap();
    assert!(c.wait().unwrap().success());
    std::fs::write(&file, svc.ok(&["export", &w])).unwrap();
    let o = replay(&svc, &file, &[]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("turn 2 is a file write"), "{err}");
    for e in [&f, &w] {
        svc.ok(&["delete", e]);
    }
}
