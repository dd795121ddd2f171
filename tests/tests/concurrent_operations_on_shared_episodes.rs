//! Several clients driving the same episodes at once: steps, forks, rewinds, deletes and stats
//! interleave at random. Every answer must be a success or a clear error about the episode
//! (deleted, being replaced, a turn past its head), never a step run on a sandbox that a
//! rewind or delete is tearing down ("the sandbox cannot run commands"), and once the service
//! stops no sandbox process of it is left.
//!
//! 4 clients x 250 operations (1,000 in all) on 8 episodes, each client with its own seeded
//! random mix; `SANDTREE_INTERLEAVE_OPS` sets the operations per client and
//! `SANDTREE_INTERLEAVE_SEED` replays a run.

use std::sync::Mutex;

use sandtree_tests::*;

/// Errors that a racing client may legitimately get.
const EXPECTED: &[&str] = &[
    "is deleted",
    "unknown episode",
    "is stopped",
    "being rewound or deleted",
    "stopped by another call",
    "out of range",
    "past",
    "not committed",
    "no committed",
];

#[test]
fn interleaved_operations_get_clear_answers_and_leave_nothing() {
    if !require_sandbox_host() {
        return;
    }
    let ops: usize = std::env::var("SANDTREE_INTERLEAVE_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(250);
    let svc = Service::start(Storage::Btrfs);
    let eps: Mutex<Vec<String>> = Mutex::new(
        (0..8)
            .map(|_| {
                let e = svc.create("busybox", "auto");
                svc.step(
                    &e,
                    "echo 0 > /tmp/n; sleep 1000 </dev/null >/dev/null 2>&1 &",
                );
                e
            })
            .collect(),
    );
    let seed = std::env::var("SANDTREE_INTERLEAVE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let done = std::sync::atomic::AtomicUsize::new(0);
    eprintln!("seed {seed}");
    let unexpected: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for client in 0..4u64 {
            let (svc, eps, unexpected, done) = (&svc, &eps, &unexpected, &done);
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ client);
                for _ in 0..ops {
                    let ep = {
                        let e = eps.lock().unwrap();
                        if e.is_empty() {
                            return;
                        }
                        e[rng.below(e.len() as u64) as usize].clone()
                    };
                    let pick = rng.below(100);
                    let args: Vec<String> = if pick < 50 {
                        vec![
                            "step".into(),
                            ep.clone(),
                            "--json".into(),
                            "--".into(),
                            "n=$(cat /tmp/n); echo $((n+1)) > /tmp/n; cat /tmp/n".into(),
                        ]
                    } else if pick < 65 {
                        vec!["rewind".into(), ep.clone(), "--turn".into(), "1".into()]
                    } else if pick < 80 {
                        vec!["fork".into(), ep.clone(), "--turn".into(), "1".into()]
                    } else if pick < 90 {
                        vec!["stats".into()]
                    } else {
                        vec!["tree".into(), ep.clone(), "--json".into()]
                    };
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    let o = svc.cli(&a);
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let err = String::from_utf8_lossy(&o.stderr).to_string();
                    if o.status.success() {
                        if args[0] == "fork" {
                            let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
                            let mut e = eps.lock().unwrap();
                            // Keep the number of live episodes bounded: delete the new copy
                            // or an old one.
                            if e.len() >= 10 {
                                drop(e);
                                let _ = svc.cli(&["delete", &id]);
                            } else {
                                e.push(id);
                            }
                        }
                    } else if !EXPECTED.iter().any(|x| err.contains(x)) {
                        unexpected.lock().unwrap().push(format!("{args:?}: {err}"));
                    }
                    if rng.below(100) < 5 {
                        // Delete one episode now and then, while others may be using it.
                        let victim = {
                            let mut e = eps.lock().unwrap();
                            let n = e.len() as u64;
                            (n > 4).then(|| e.remove(rng.below(n) as usize))
                        };
                        if let Some(v) = victim {
                            let o = svc.cli(&["delete", &v]);
                            let err = String::from_utf8_lossy(&o.stderr).to_string();
                            if !o.status.success() && !EXPECTED.iter().any(|x| err.contains(x)) {
                                unexpected
                                    .lock()
                                    .unwrap()
                                    .push(format!("delete {v}: {err}"));
                            }
                        }
                    }
                }
            });
        }
    });
    let unexpected = unexpected.into_inner().unwrap();
    let done = done.into_inner();
    eprintln!("{done} operations");
    assert!(done >= 4 * ops, "only {done} operations ran");
    assert!(
        unexpected.is_empty(),
        "seed {seed}: unexpected answers:\n{}\nservice log:\n{}",
        unexpected.join("\n"),
        tail(&svc.log())
    );
    // Every surviving episode still steps, and its tree is whole.
    for e in eps.into_inner().unwrap() {
        let r = svc.step(&e, "cat /tmp/n");
        assert_eq!(r["exit_code"], 0, "{e}: {r}");
        let tree: serde_json::Value =
            serde_json::from_str(&svc.ok(&["tree", &e, "--json"])).unwrap();
        let turns = tree["turns"].as_array().unwrap();
        assert_eq!(
            turns.len() as u64,
            tree["episode"]["turn"].as_u64().unwrap() + 1,
            "{tree}"
        );
        // Turns are numbered 0..=head along the path, and each stands on a node that can be
        // restored or is shared with its parent turn.
        for (i, t) in turns.iter().enumerate() {
            assert_eq!(t["turn"].as_u64(), Some(i as u64), "{e}: {tree}");
            let state = t["state"].as_str().unwrap_or_default();
            assert!(
                state == "committed" || t["kind"] == "shared",
                "{e}: turn {i} stands on a {state} node: {tree}"
            );
        }
    }
    // No sandbox process outlives the service.
    let before_stop = sandbox_pids(&svc);
    assert!(
        !before_stop.is_empty(),
        "the surviving episodes have sandboxes"
    );
    drop(svc);
    // A killed process stays a zombie until the host's init reaps it: give that a moment.
    let alive = |p: &u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next())
                    != Some("Z")
            })
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut left: Vec<u32> = before_stop.clone();
    while !left.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        left.retain(alive);
    }
    assert!(left.is_empty(), "sandbox processes left: {left:?}");
}

/// Host pids of every process in this service's sandbox cgroups: `sandtree/<instance>/` under
/// any cgroup hierarchy, where `<instance>` is the service's tag of its data dir (FNV-1a, as in
/// `sandtree serve`).
fn sandbox_pids(svc: &Service) -> Vec<u32> {
    let data = std::fs::canonicalize(svc.dir.join("data")).unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    let tag = format!("{:012x}", h & 0xffff_ffff_ffff);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find /sys/fs/cgroup -path '*/sandtree/{tag}/*' -name cgroup.procs 2>/dev/null | xargs -r cat"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

use std::process::Command;

/// `stats` waits for checkpoints in flight, not for another episode's running step (an 8 s step;
/// the bound leaves room for a loaded CI machine).
#[test]
fn stats_do_not_wait_behind_a_step() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let slow = svc.create("busybox", "auto");
    let other = svc.create("busybox", "full");
    svc.step(&other, "echo x > /x");
    std::thread::scope(|s| {
        let h = s.spawn(|| svc.step(&slow, "sleep 8; echo done"));
        std::thread::sleep(std::time::Duration::from_millis(800));
        let t = std::time::Instant::now();
        let stats: serde_json::Value = serde_json::from_str(&svc.ok(&["stats", "--json"])).unwrap();
        let took = t.elapsed();
        assert!(
            took < std::time::Duration::from_secs(4),
            "stats took {took:?} behind an 8 s step"
        );
        // It still waited for the other episode's checkpoint: its full node is counted.
        let o = stats["per_episode"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == other.as_str())
            .unwrap()
            .clone();
        assert!(o["nodes_full"].as_u64().unwrap() >= 1, "{o}");
        assert_eq!(h.join().unwrap()["stdout"], "done\n");
    });
    svc.ok(&["delete", &slow]);
    svc.ok(&["delete", &other]);
}
