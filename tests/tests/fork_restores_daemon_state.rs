//! A node forked 4 ways gives 4 live copies that run at once, each with its own daemon and its
//! own in-memory counter; rewind brings files, processes and the shell session back; then
//! everything is deleted. On btrfs (once with a single restore slot, so the copies queue) and on
//! zfs-fuse.
//!
//! On zfs-fuse this is the fork → rewind → delete path that used to wedge the daemon (renames of
//! parked volumes); the zfs backend no longer renames and serializes zfs commands. A watchdog
//! turns a wedged daemon into a failure instead of a hung test.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandtree_tests::*;

/// Longer than any healthy run on this machine (about 10 s) by far.
const WEDGE_TIMEOUT: Duration = Duration::from_secs(240);

/// Forks turn `upto` of trajectory `traj` 4 ways and checks the copies, the source and a rewind;
/// prints the time of each phase. `extra`: more `serve` flags.
fn fork4(storage: Storage, extra: &[&str], traj: &str, tick: &str, upto: usize) {
    let t0 = Instant::now();
    let mut phases: Vec<(&str, Duration)> = Vec::new();
    let mut mark = |name: &'static str, since: &mut Instant| {
        phases.push((name, since.elapsed()));
        *since = Instant::now();
    };
    let mut since = Instant::now();
    let svc = Service::start_with(storage, extra);
    let t = trajectories().into_iter().find(|t| t.name == traj).unwrap();
    let ep = svc.create(&t.image, "auto");
    mark("start+create", &mut since);
    let mut outs = Vec::new();
    for turn in &t.turns[..upto] {
        outs.push(
            svc.step(&ep, &turn.cmd)["stdout"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let before: u64 = outs.last().unwrap().trim().parse().expect("counter");
    mark("turns", &mut since);
    let forks: Vec<String> = svc
        .ok(&["fork", &ep, "--turn", &upto.to_string(), "--count", "4"])
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(forks.len(), 4);
    mark("fork x4", &mut since);
    // All four copies at once: fork k ticks k+1 times; each counter continues from `before`.
    std::thread::scope(|s| {
        for (k, f) in forks.iter().enumerate() {
            let svc = &svc;
            s.spawn(move || {
                let mut last = 0;
                for _ in 0..=k {
                    last = svc.step(f, tick)["stdout"]
                        .as_str()
                        .unwrap()
                        .trim()
                        .parse::<u64>()
                        .unwrap();
                }
                assert_eq!(last, before + k as u64 + 1, "fork {k} ({f}) counter");
                let tree: serde_json::Value =
                    serde_json::from_str(&svc.ok(&["tree", f, "--json"])).unwrap();
                assert_eq!(tree["episode"]["turn"], (upto + k + 1) as u64);
            });
        }
    });
    mark("forks step", &mut since);
    // The source kept its own counter.
    let r = svc.step(&ep, tick);
    assert_eq!(
        r["stdout"].as_str().unwrap().trim().parse::<u64>().unwrap(),
        before + 1
    );
    // Rewind the source to before its tick: the daemon comes back with the old counter.
    svc.ok(&["rewind", &ep, "--turn", &upto.to_string()]);
    let r = svc.step(&ep, tick);
    assert_eq!(
        r["stdout"].as_str().unwrap().trim().parse::<u64>().unwrap(),
        before + 1,
        "rewind restores the daemon"
    );
    let tree: serde_json::Value = serde_json::from_str(&svc.ok(&["tree", &ep, "--json"])).unwrap();
    assert_eq!(tree["episode"]["turn"], upto as u64 + 1);
    mark("source tick+rewind", &mut since);
    for f in forks.iter().chain([&ep]) {
        svc.ok(&["delete", f]);
    }
    assert_eq!(svc.ok(&["list"]).trim(), "", "every episode deleted");
    mark("delete x5", &mut since);
    drop(svc);
    mark("stop+destroy pool", &mut since);
    let phases: Vec<String> = phases
        .iter()
        .map(|(n, d)| format!("{n} {:.1}s", d.as_secs_f64()))
        .collect();
    eprintln!(
        "{traj} fork4: {:.1}s ({})",
        t0.elapsed().as_secs_f64(),
        phases.join(", ")
    );
}

/// Runs `f`; if it has not finished after [`WEDGE_TIMEOUT`], reports a probably wedged zfs-fuse
/// and exits the test process (a wedged daemon never answers, so the test would hang forever;
/// recovery needs a restart of zfs-fuse, see the storage crate's `cmd` docs).
fn with_watchdog(f: impl FnOnce()) {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < WEDGE_TIMEOUT {
            if d.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "FAILED: no progress after {WEDGE_TIMEOUT:?}: zfs-fuse is probably wedged (zfs \
             commands or I/O on its mounts hang); restart zfs-fuse to recover"
        );
        std::process::exit(101);
    });
    f();
    done.store(true, Ordering::Relaxed);
}

#[test]
fn counter_daemon_fork4_zfs_fuse() {
    if require_sandbox_host() && require_zfs() {
        with_watchdog(|| {
            fork4(
                Storage::Zfs,
                &[],
                "shell-counter-daemon",
                "echo tick > q; sleep 0.2; cat count",
                5,
            )
        });
    }
}

#[test]
fn background_worker_fork4_zfs_fuse() {
    if require_sandbox_host() && require_zfs() {
        with_watchdog(|| {
            fork4(
                Storage::Zfs,
                &[],
                "repair-background-worker",
                "touch go; sleep 0.5; cat out",
                4,
            )
        });
    }
}

/// With one restore slot the 4 copies queue and restore one by one.
#[test]
fn counter_daemon_fork4_btrfs_one_restore_slot() {
    if require_sandbox_host() {
        fork4(
            Storage::Btrfs,
            &["--restore-slots", "1"],
            "shell-counter-daemon",
            "echo tick > q; sleep 0.2; cat count",
            5,
        );
    }
}

#[test]
fn background_worker_fork4_btrfs() {
    if require_sandbox_host() {
        fork4(
            Storage::Btrfs,
            &[],
            "repair-background-worker",
            "touch go; sleep 0.5; cat out",
            4,
        );
    }
}
