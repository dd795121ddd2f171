//! auto keeps only the memory pages a dump changed (CRIU's incremental image format, with the
//! parent image hard-linked under `parent/`): a python worker's ~2.7 MB image shrinks to the
//! pages it touched, chains stop at `--max-image-chain` and start again whole, and forks from
//! every depth — including forks of forks, whose chains run through another episode's images —
//! restore the worker with its exact in-memory counter.

use sandtree_tests::*;

const TICK: &str = "touch go; sleep 0.5; cat out";

fn counter(svc: &Service, ep: &str) -> u64 {
    let r = svc.step(ep, TICK);
    r["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no counter from {ep}: {r}"))
}

/// (turn, node, image_bytes, image_dumped_bytes, image_parent) of the full turns on the live path.
fn full_turns(svc: &Service, ep: &str) -> Vec<(u64, u64, u64, u64, Option<u64>)> {
    let tree: serde_json::Value = serde_json::from_str(&svc.ok(&["tree", ep, "--json"])).unwrap();
    tree["turns"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "full")
        .map(|t| {
            (
                t["turn"].as_u64().unwrap(),
                t["node"].as_u64().unwrap(),
                t["image_bytes"].as_u64().unwrap(),
                t["image_dumped_bytes"].as_u64().unwrap(),
                t["image_parent"].as_u64().filter(|&p| p > 0),
            )
        })
        .collect()
}

#[test]
fn chained_images_restore_the_worker_at_every_depth() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start_with(Storage::Btrfs, &["--max-image-chain", "3"]);
    let t = trajectories()
        .into_iter()
        .find(|t| t.name == "repair-background-worker")
        .unwrap();
    let ep = svc.create(&t.image, "auto");
    // mkdir, write worker.py, start the worker: turn 3 is the first full node.
    for turn in &t.turns[..3] {
        svc.step(&ep, &turn.cmd);
    }
    // Ticks at turns 4..=9: chain depths 1, 2, 3, then a whole image (the cap), then 1, 2.
    for n in 1..=6 {
        assert_eq!(counter(&svc, &ep), n);
    }
    let full = full_turns(&svc, &ep);
    let turns: Vec<u64> = full.iter().map(|f| f.0).collect();
    assert_eq!(turns, vec![3, 4, 5, 6, 7, 8, 9], "{full:?}");
    let node_of = |turn: u64| full.iter().find(|f| f.0 == turn).unwrap().1;
    for &(turn, _node, kept, dumped, parent) in &full {
        assert!(
            dumped > 1 << 20,
            "turn {turn}: the worker's image is over 1 MiB: {full:?}"
        );
        match turn {
            3 | 7 => {
                assert_eq!(parent, None, "turn {turn} is kept whole: {full:?}");
                assert_eq!(kept, dumped, "turn {turn}: {full:?}");
            }
            _ => {
                assert_eq!(parent, Some(node_of(turn - 1)), "turn {turn}: {full:?}");
                assert!(
                    kept * 4 < dumped,
                    "turn {turn}: kept {kept} of {dumped} B; a tick touches few pages"
                );
            }
        }
    }

    // Forks from every depth come back with the counter of their turn; one tick later they
    // are one further.
    for (turn, depth) in [(3, 0), (4, 1), (6, 3), (7, 0), (9, 2)] {
        let f = svc.ok(&["fork", &ep, "--turn", &turn.to_string()]);
        let f = f.trim();
        assert_eq!(
            counter(&svc, f),
            turn - 2,
            "fork at turn {turn} (chain depth {depth})"
        );
        if turn == 6 {
            // A fork's own dump chains through the source's images (depth 3 is the cap, so
            // this one is whole); a fork of that fork chains through it.
            assert_eq!(counter(&svc, f), turn - 1);
            let ff = svc.ok(&["fork", f, "--turn", &(turn + 2).to_string()]);
            let ff = ff.trim();
            assert_eq!(counter(&svc, ff), turn, "fork of a fork");
            let chain = full_turns(&svc, ff);
            let last = chain.last().unwrap();
            assert_eq!(last.0, turn + 3);
            assert!(last.4.is_some(), "the fork of a fork chains: {chain:?}");
            svc.ok(&["delete", ff]);
        }
        svc.ok(&["delete", f]);
    }
    // Rewind to a chained node: the worker goes back to that turn's counter.
    svc.ok(&["rewind", &ep, "--turn", "5"]);
    assert_eq!(counter(&svc, &ep), 3);
    svc.ok(&["delete", &ep]);
    assert_eq!(svc.ok(&["list"]).trim(), "", "every episode deleted");
}
