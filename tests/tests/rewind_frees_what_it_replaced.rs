//! A rewind answers once the sandbox is restored; the volume it replaced and the checkpoints it
//! made unreachable are freed after that, in the background. Nothing leaks: once `stats` has
//! returned (it waits for that cleanup), storage holds exactly one live volume and the snapshots
//! of the committed nodes still on the live path — on btrfs, where the test reads the pool's
//! directories, and with a daemon whose process state the rewind brings back.

use std::collections::BTreeSet;
use std::path::Path;

use sandtree_tests::*;

fn names(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Snapshot names (`n<node>`) under every volume of the pool.
fn snapshots(root: &Path) -> BTreeSet<String> {
    names(&root.join("snapshots"))
        .iter()
        .flat_map(|v| names(&root.join("snapshots").join(v)))
        .collect()
}

fn tree(svc: &Service, ep: &str) -> serde_json::Value {
    serde_json::from_str(&svc.ok(&["tree", ep, "--json"])).unwrap()
}

#[test]
fn rewind_frees_the_replaced_volume_and_the_dropped_checkpoints() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let root = svc.dir.join("data/storage/mnt/sandtree");
    let ep = svc.create("busybox", "auto");
    // Turn 1 starts a counter daemon (a full node); turns 2..=5 write files (fs nodes beside a
    // daemon are full nodes too).
    svc.step(
        &ep,
        "mkdir -p /workspace; cd /workspace; (n=0; while :; do n=$((n+1)); echo $n > ticks; sleep 0.2; done) >/dev/null 2>&1 &",
    );
    for i in 2..=5 {
        svc.step(&ep, &format!("echo {i} > f{i}"));
    }
    svc.ok(&["stats"]);
    let before = tree(&svc, &ep);
    let dropped: BTreeSet<String> = before["turns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["turn"].as_u64().unwrap() >= 2 && t["kind"] != "shared")
        .map(|t| format!("n{}", t["node"]))
        .collect();
    assert_eq!(dropped.len(), 4, "turns 2..=5 each made a node: {before}");
    let snaps_before = snapshots(&root);
    assert!(dropped.is_subset(&snaps_before), "{snaps_before:?}");
    assert_eq!(names(&root.join("volumes")).len(), 1);

    svc.ok(&["rewind", &ep, "--turn", "1"]);
    // The episode runs at once: files of turn 1, the daemon alive.
    let r = svc.step(
        &ep,
        "ls; a=$(cat ticks); sleep 1; [ $(cat ticks) -gt $a ] && echo alive",
    );
    assert_eq!(r["stdout"], "ticks\nalive\n", "{r}");
    svc.ok(&["stats"]);

    let snaps_after = snapshots(&root);
    let kept: Vec<_> = dropped.intersection(&snaps_after).collect();
    assert!(
        kept.is_empty(),
        "snapshots of rewound-away turns left after stats: {kept:?}"
    );
    let images = names(&svc.dir.join("data/images"));
    let kept: Vec<_> = dropped.intersection(&images).collect();
    assert!(
        kept.is_empty(),
        "CRIU images of rewound-away turns left after stats: {kept:?}"
    );
    let vols = names(&root.join("volumes"));
    assert_eq!(vols.len(), 1, "one live volume after the rewind: {vols:?}");
    assert_eq!(tree(&svc, &ep)["episode"]["turn"], 2);

    svc.ok(&["delete", &ep]);
    assert_eq!(names(&root.join("volumes")), BTreeSet::new());
    assert_eq!(names(&svc.dir.join("data/images")), BTreeSet::new());
}
