//! Every public trajectory runs to the end through `sandtree step`, on btrfs and on zfs-fuse,
//! with the outputs its commands imply; and the eBPF inspector's verdicts are checked against
//! the trajectories' effect labels: no unsafe verdict (label fs or proc, verdict none; label
//! proc, verdict fs), wasteful verdicts (label none, verdict fs or proc) on at most 10% of the
//! none-labelled turns, and no verdict that the service's own cross-check had to upgrade.

use sandtree_tests::*;

/// Spot checks: (trajectory, 1-based turn, expected stdout).
const EXPECT: &[(&str, usize, &str)] = &[
    ("shell-counter-daemon", 5, "1\n"),
    ("shell-counter-daemon", 7, "2\n"),
    ("shell-counter-daemon", 14, "4\n"),
    ("shell-bg-inherit", 5, "1\n"),
    ("shell-bg-inherit", 10, "3\n"),
    ("shell-httpd", 3, "hello\n"),
    ("shell-httpd", 5, "world\n"),
    ("shell-httpd", 9, "1\n"),
    ("shell-logs", 2, "/workspace/logs\n"),
    ("shell-logs", 4, "200 access.log\n"),
    ("shell-logs", 17, "250\n"),
    (
        "shell-build-tree",
        11,
        "a.txt\nb.txt\nc.txt\nd.txt\ne.txt\n",
    ),
    ("shell-build-tree", 18, "documentation\nsrc\n"),
    ("repair-env-cwd", 6, "/workspace/app/conf\n"),
    ("repair-env-cwd", 8, "release\n"),
    ("repair-env-cwd", 12, "release /workspace/app\n"),
    ("repair-calc", 11, "ok\nrc=0\n"),
    ("repair-pycache", 4, "6.0\n"),
    ("repair-pycache", 8, "4.0\n"),
    ("repair-background-worker", 4, "1"),
    ("repair-background-worker", 6, "2"),
    ("repair-background-worker", 9, "3"),
];

/// Trajectories say 1000 ms; a fifth of it keeps the test short.
const THINK: std::time::Duration = std::time::Duration::from_millis(200);

fn run_all(storage: Storage) {
    let svc = Service::start(storage);
    let stats: serde_json::Value =
        serde_json::from_str(&svc.ok(&["stats", "--json"])).expect("stats json");
    assert_eq!(
        stats["inspector_loaded"], true,
        "the eBPF inspector must load on CI hosts: {}",
        stats["inspector"]
    );
    let (mut unsafe_turns, mut wasteful, mut none_labelled) = (Vec::new(), 0, 0);
    for t in trajectories() {
        let ep = svc.create(&t.image, "auto");
        for (i, turn) in t.turns.iter().enumerate() {
            // A short think time, as a trainer's: background jobs that a turn starts settle
            // before the next turn (their start-up otherwise lands in the next turn's verdict).
            std::thread::sleep(THINK);
            let r = svc.step(&ep, &turn.cmd);
            assert_eq!(r["turn"], i as u64 + 1, "{} turn numbering", t.name);
            assert_eq!(
                r["timed_out"],
                false,
                "{} turn {}: timed out",
                t.name,
                i + 1
            );
            if let Some((_, _, want)) = EXPECT.iter().find(|(n, k, _)| *n == t.name && *k == i + 1)
            {
                assert_eq!(
                    r["stdout"].as_str().unwrap(),
                    *want,
                    "{} turn {} `{}`: {r}",
                    t.name,
                    i + 1,
                    turn.cmd
                );
            }
            let verdict = r["verdict"].as_str().unwrap().to_string();
            let reasons = r["reasons"].to_string();
            let what = format!(
                "{} turn {} `{}`: label {}, verdict {verdict} {reasons}",
                t.name,
                i + 1,
                turn.cmd,
                turn.effect
            );
            let missed = match (turn.effect.as_str(), verdict.as_str()) {
                ("fs" | "proc", "none") | ("proc", "fs") => true,
                _ => reasons.contains("UNSAFE"),
            };
            if missed {
                unsafe_turns.push(what.clone());
            }
            if turn.effect == "none" {
                none_labelled += 1;
                if verdict != "none" {
                    wasteful += 1;
                    eprintln!("wasteful: {what}");
                }
            }
            // `diff` of two different files exits 1 inside an `; echo`; every turn's shell exits 0.
            assert_eq!(
                r["exit_code"],
                0,
                "{} turn {} `{}` failed: {r}",
                t.name,
                i + 1,
                turn.cmd
            );
        }
        svc.ok(&["delete", &ep]);
    }
    eprintln!(
        "verdicts: {} unsafe, {wasteful} wasteful of {none_labelled} none-labelled turns",
        unsafe_turns.len()
    );
    assert!(
        unsafe_turns.is_empty(),
        "unsafe verdicts:\n{}",
        unsafe_turns.join("\n")
    );
    assert!(
        wasteful * 10 <= none_labelled,
        "{wasteful} wasteful verdicts of {none_labelled} none-labelled turns is more than 10%"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&svc.ok(&["stats", "--json"])).expect("stats json");
    assert_eq!(stats["verdicts_unsafe"], 0, "{stats}");
    assert!(stats["verdicts_checked"].as_u64().unwrap() > 100, "{stats}");
}

#[test]
fn public_trajectories_run_on_btrfs() {
    if require_sandbox_host() {
        run_all(Storage::Btrfs);
    }
}

#[test]
fn public_trajectories_run_on_zfs_fuse() {
    if require_sandbox_host() && require_zfs() {
        run_all(Storage::Zfs);
    }
}
