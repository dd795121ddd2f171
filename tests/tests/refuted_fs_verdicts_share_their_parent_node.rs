//! An fs verdict that the storage layer refutes: a file opened for writing and never written,
//! or sqlite's read-only query, makes the inspector say fs, but the volume did not change, so
//! the checkpoint task takes no snapshot and the turn shares its parent turn's node (`tree
//! --json`: kind shared, the parent's node id). A turn that really writes keeps its fs node, also
//! right after a fork, and forks at every turn restore the right files. On btrfs and zfs-fuse.

use sandtree_tests::*;

fn parse(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad json {s:?}: {e}"))
}

/// `(node, kind, verdict, reasons)` of each turn on the episode's live path.
fn turns(svc: &Service, ep: &str) -> Vec<(u64, String, String, String)> {
    let t = parse(&svc.ok(&["tree", ep, "--json"]));
    t["turns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["node"].as_u64().unwrap_or(0),
                t["kind"].as_str().unwrap_or_default().to_string(),
                t["verdict"].as_str().unwrap_or_default().to_string(),
                t["reasons"].to_string(),
            )
        })
        .collect()
}

fn step_ok(svc: &Service, ep: &str, cmd: &str) -> serde_json::Value {
    let r = svc.step(ep, cmd);
    assert_eq!(r["exit_code"], 0, "`{cmd}`: {r}");
    r
}

const WRITE_DB: &str = "python3 -B -c \"import sqlite3; c=sqlite3.connect('/workspace/t.db'); \
    c.execute('create table t(v int)'); c.execute('insert into t values(41)'); c.commit()\"";
const OPEN_FOR_APPEND: &str = "python3 -B -c \"open('/workspace/a','a')\"";
const READ_DB: &str = "python3 -B -c \"import sqlite3; \
    print(sqlite3.connect('/workspace/t.db').execute('select sum(v) from t').fetchone()[0])\"";
const CHECK: &str = "cat /workspace/a; python3 -B -c \"import sqlite3; \
    print(sqlite3.connect('/workspace/t.db').execute('select sum(v) from t').fetchone()[0])\"";

fn refuted_fs_verdicts(storage: Storage) {
    let svc = Service::start(storage);
    let ep = svc.create("debian", "auto");
    // 1: real writes (fs node).
    step_ok(&svc, &ep, &format!("echo one > /workspace/a; {WRITE_DB}"));
    // 2: opened for writing, never written; 3: sqlite's read-only query.
    let r2 = step_ok(&svc, &ep, OPEN_FOR_APPEND);
    let r3 = step_ok(&svc, &ep, READ_DB);
    assert_eq!(r3["stdout"].as_str().unwrap().trim(), "41");
    // 4: a real write; 5: a touch of an existing file changes its times: a real change too.
    step_ok(&svc, &ep, "echo two >> /workspace/a");
    step_ok(&svc, &ep, "touch /workspace/a");
    let t = turns(&svc, &ep);
    eprintln!("turns: {t:#?}");
    let stats = parse(&svc.ok(&["stats", "--json"]));
    for (i, r) in [(2, &r2), (3, &r3)] {
        assert_eq!(
            r["verdict"], "fs",
            "turn {i}: the inspector must say fs for this test to mean anything: {r}"
        );
        assert_eq!(t[i].1, "shared", "turn {i} is refuted: {:?}", t[i]);
        assert_eq!(t[i].0, t[1].0, "turn {i} shares turn 1's node");
        assert_eq!(t[i].2, "fs", "the verdict is kept");
        assert!(t[i].3.contains("refuted"), "turn {i}: {}", t[i].3);
    }
    for i in [1, 4, 5] {
        assert_eq!(t[i].1, "fs", "turn {i} changed files: {:?}", t[i]);
    }
    assert_ne!(t[4].0, t[1].0);
    assert_ne!(t[5].0, t[4].0);
    assert_eq!(stats["fs_verdicts_refuted"], 2, "{stats}");
    let per = stats["per_episode"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == ep.as_str())
        .unwrap();
    assert_eq!(per["fs_verdicts_refuted"], 2, "{per}");

    // Forks at every turn restore the right files.
    let want = [
        "one\n41\n",
        "one\n41\n",
        "one\n41\n",
        "one\ntwo\n41\n",
        "one\ntwo\n41\n",
    ];
    let mut forks = Vec::new();
    for (i, w) in want.iter().enumerate() {
        let turn = (i + 1).to_string();
        let f = svc.ok(&["fork", &ep, "--turn", &turn]).trim().to_string();
        let r = step_ok(&svc, &f, CHECK);
        assert_eq!(
            r["stdout"].as_str().unwrap(),
            *w,
            "fork at turn {turn}: {r}"
        );
        forks.push(f);
    }
    // Right after a fork (a fresh clone, no snapshot of its own yet): a turn that wrote nothing
    // is refuted onto the fork point's node, one that wrote is not.
    let t_fork = turns(&svc, &forks[1]);
    assert_eq!(
        t_fork[3].1, "shared",
        "the check only read: {:?}",
        t_fork[3]
    );
    assert_eq!(t_fork[3].0, t[1].0);
    let r = step_ok(&svc, &forks[1], OPEN_FOR_APPEND);
    assert_eq!(r["verdict"], "fs", "{r}");
    step_ok(&svc, &forks[2], "echo three >> /workspace/a");
    let (a, b) = (turns(&svc, &forks[1]), turns(&svc, &forks[2]));
    assert_eq!(a[4].1, "shared", "{:?}", a[4]);
    assert_eq!(a[4].0, t[1].0);
    // (forks[2] was forked at turn 3: its check is turn 4, shared, and the write turn 5.)
    assert_eq!(b[4].1, "shared", "{:?}", b[4]);
    assert_eq!(b[5].1, "fs", "{:?}", b[5]);
    // And that write is where a fork of the fork finds it.
    let ff = svc
        .ok(&["fork", &forks[2], "--turn", "5"])
        .trim()
        .to_string();
    let r = step_ok(&svc, &ff, CHECK);
    assert_eq!(r["stdout"].as_str().unwrap(), "one\nthree\n41\n", "{r}");
    // A rewind to a refuted turn restores the parent node.
    svc.ok(&["rewind", &ep, "--turn", "3"]);
    let r = step_ok(&svc, &ep, CHECK);
    assert_eq!(r["stdout"].as_str().unwrap(), "one\n41\n", "{r}");
    let log = svc.log();
    assert!(!log.contains("UNSAFE"), "{}", tail(&log));
}

#[test]
fn refuted_fs_verdicts_on_btrfs() {
    if !require_sandbox_host() {
        return;
    }
    refuted_fs_verdicts(Storage::Btrfs);
}

#[test]
fn refuted_fs_verdicts_on_zfs_fuse() {
    if !require_sandbox_host() || !require_zfs() {
        return;
    }
    refuted_fs_verdicts(Storage::Zfs);
}
