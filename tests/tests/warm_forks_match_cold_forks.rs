//! Warm forks (`sandtree prepare`, `fork --keep-warm`): a fork that takes a warm copy is
//! indistinguishable from a cold one of the same node: same files, same processes (pids and
//! command lines), same memory (the python worker's in-memory counter goes on from the same
//! value), same shell session (cwd, env). On btrfs and zfs-fuse. Also: the copies are counted
//! (hits, misses), `--keep-warm` refills them, `prepare 0` drops them, and collecting the node
//! drops them too.

use std::time::{Duration, Instant};

use sandtree_tests::*;

/// What a sandbox shows of itself: the worker's output after one more job, its processes
/// (pid and command line, the step's own shell left out), its files and its session.
fn observe(svc: &Service, ep: &str) -> Vec<String> {
    let cmds = [
        "touch go; sleep 0.5; cat out",
        "for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); case \"$c\" in *python3*) echo \"${p#/proc/} $c\";; esac; done | sort",
        "find /workspace -type f | sort | xargs md5sum",
        "pwd; env | grep -v -e '^_=' -e '^SHLVL=' -e '^OLDPWD=' | sort",
    ];
    cmds.iter()
        .map(|c| svc.step(ep, c)["stdout"].as_str().unwrap().to_string())
        .collect()
}

fn stats(svc: &Service) -> serde_json::Value {
    serde_json::from_str(&svc.ok(&["stats", "--json"])).unwrap()
}

fn wait_for(svc: &Service, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = stats(svc);
        if ok(&s) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn warm_equals_cold(storage: Storage) {
    let svc = Service::start_with(storage, &[]);
    let t = trajectories()
        .into_iter()
        .find(|t| t.name == "repair-background-worker")
        .unwrap();
    let ep = svc.create(&t.image, "auto");
    for turn in &t.turns[..4] {
        svc.step(&ep, &turn.cmd);
    }
    // Turn 4 stands on a full node (the worker is running, its counter at 1).
    let p: serde_json::Value =
        serde_json::from_str(&svc.ok(&["prepare", &ep, "--turn", "4", "--count", "2", "--json"]))
            .unwrap();
    assert_eq!(p["ready"], 2, "{p}");
    assert!(p["memory_bytes"].as_u64().unwrap() > 0, "{p}");
    // The copies wait frozen: nothing of theirs moves meanwhile.
    std::thread::sleep(Duration::from_millis(700));
    let f: serde_json::Value =
        serde_json::from_str(&svc.ok(&["fork", &ep, "--turn", "4", "--count", "3", "--json"]))
            .unwrap();
    assert_eq!(f["warm"], 2, "two warm copies were ready: {f}");
    let forks: Vec<String> = f["episodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    let seen: Vec<Vec<String>> = forks.iter().map(|e| observe(&svc, e)).collect();
    assert_eq!(seen[0][0].trim(), "2", "the counter goes on: {:?}", seen[0]);
    assert!(seen[0][1].contains("worker.py"), "{:?}", seen[0]);
    for (k, s) in seen.iter().enumerate().skip(1) {
        assert_eq!(
            s, &seen[0],
            "fork {k} ({}) differs from fork 0 (warm)",
            forks[k]
        );
    }
    let s = stats(&svc);
    assert_eq!(
        (s["warm_hits"].as_u64(), s["warm_misses"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
    assert_eq!(s["warm_copies"], 0, "{s}");

    // --keep-warm refills the node's copies after the fork; prepare 0 drops them.
    let one = svc.ok(&["fork", &ep, "--turn", "4", "--keep-warm", "1"]);
    wait_for(&svc, "keep-warm refills one copy", |s| {
        s["warm_copies"] == 1
    });
    let p: serde_json::Value =
        serde_json::from_str(&svc.ok(&["prepare", &ep, "--turn", "4", "--count", "0", "--json"]))
            .unwrap();
    assert_eq!(p["ready"], 0, "{p}");
    assert_eq!(stats(&svc)["warm_copies"], 0);

    // A collected node takes its copies with it.
    svc.ok(&["prepare", &ep, "--turn", "4", "--count", "1"]);
    for e in forks.iter().chain([&one.trim().to_string(), &ep]) {
        svc.ok(&["delete", e]);
    }
    wait_for(&svc, "the collected node's copy is dropped", |s| {
        s["warm_copies"] == 0
    });
}

#[test]
fn warm_forks_match_cold_forks_btrfs() {
    if !require_sandbox_host() {
        return;
    }
    warm_equals_cold(Storage::Btrfs);
}

#[test]
fn warm_forks_match_cold_forks_zfs_fuse() {
    if !require_sandbox_host() || !require_zfs() {
        return;
    }
    warm_equals_cold(Storage::Zfs);
}
