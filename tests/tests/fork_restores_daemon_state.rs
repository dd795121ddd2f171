//! A node forked 4 ways gives 4 live copies that run at once, each with its own daemon and its
//! own in-memory counter; rewind brings files, processes and the shell session back.

use sandtree_tests::*;

fn fork4(storage: Storage, traj: &str, tick: &str, upto: usize) {
    let svc = Service::start(storage);
    let t = trajectories().into_iter().find(|t| t.name == traj).unwrap();
    let ep = svc.create(&t.image, "auto");
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
    let forks: Vec<String> = svc
        .ok(&["fork", &ep, "--turn", &upto.to_string(), "--count", "4"])
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(forks.len(), 4);
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
                assert_eq!(tree["turn"], (upto + k + 1) as u64);
            });
        }
    });
    // The source kept its own counter.
    let r = svc.step(&ep, tick);
    assert_eq!(
        r["stdout"].as_str().unwrap().trim().parse::<u64>().unwrap(),
        before + 1
    );
    // Rewind the source to just before the daemon existed... and then to after.
    svc.ok(&["rewind", &ep, "--turn", &upto.to_string()]);
    let r = svc.step(&ep, tick);
    assert_eq!(
        r["stdout"].as_str().unwrap().trim().parse::<u64>().unwrap(),
        before + 1,
        "rewind restores the daemon"
    );
    let tree: serde_json::Value = serde_json::from_str(&svc.ok(&["tree", &ep, "--json"])).unwrap();
    assert_eq!(tree["turn"], upto as u64 + 1);
    for f in forks.iter().chain([&ep]) {
        svc.ok(&["delete", f]);
    }
}

#[test]
fn counter_daemon_fork4_btrfs() {
    if require_sandbox_host() {
        fork4(
            Storage::Btrfs,
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
            "repair-background-worker",
            "touch go; sleep 0.5; cat out",
            4,
        );
    }
}
