//! After a crash (the tree dropped mid-sequence, or the whole process killed
//! with SIGKILL), reopening and reconciling loses no committed node, abandons
//! every pending node, stops every episode and leaves every head on a
//! committed node; no turn is left pointing to a refuted (deleted) node.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{artifacts, step};
use sandtree_branching::{
    EpisodeStatus, NodeId, NodeKind, NodeState, Policy, Tree, Truncation, VerdictKind,
    ABANDONED_REASON,
};

/// Invariants every reconciled tree satisfies.
fn check_reconciled(tree: &Tree, committed: &BTreeSet<NodeId>) {
    for n in tree.all_nodes().unwrap() {
        assert_ne!(n.state, NodeState::Pending, "node {} still pending", n.id);
    }
    for &id in committed {
        let n = tree.node(id).unwrap();
        assert_eq!(n.state, NodeState::Committed, "committed node {id} lost");
        assert_eq!(n.snapshot.as_ref().unwrap().snap, format!("n{}", id.0));
    }
    for ep in tree.list_episodes(false).unwrap() {
        assert_eq!(ep.status, EpisodeStatus::Stopped, "{} not stopped", ep.id);
        let head = tree.turn(&ep.id, ep.turn).unwrap();
        assert_eq!(head.id, ep.head);
        assert_eq!(
            tree.node(head.node).unwrap().state,
            NodeState::Committed,
            "head of {} on an uncommitted node",
            ep.id
        );
        assert_eq!(tree.turns(&ep.id).unwrap().len() as u32, ep.turn + 1);
        // No turn on a live path points to a missing node (a refuted node's row is deleted
        // in the same transaction that re-points its turns).
        for rec in tree.turns(&ep.id).unwrap() {
            tree.node(rec.node)
                .unwrap_or_else(|e| panic!("turn {} of {}: {e}", rec.turn, ep.id));
        }
    }
    // A second reconcile has nothing left to do.
    let again = tree.reconcile().unwrap();
    assert!(again.stopped.is_empty() && again.abandoned.is_empty() && again.truncated.is_empty());
}

#[test]
fn reconcile_after_drop_abandons_pending_and_truncates_heads() {
    let dir = common::tempdir();
    let path = common::db_path(&dir);
    let mut committed = BTreeSet::new();
    let (a, b, c, pending_a, pending_b);
    {
        let tree = Tree::open(&path).unwrap();
        // a: 0 base, 1 fs(committed), 2 shared, 3 full(pending), 4 shared.
        a = tree.create_episode("img", Policy::Auto, vec![]).unwrap().id;
        let (_, n1) = tree
            .append_turn(&a, step("t1", VerdictKind::Fs, Some(NodeKind::Fs)))
            .unwrap();
        let n1 = n1.unwrap().id;
        tree.commit_node(n1, artifacts(n1, 100)).unwrap();
        committed.insert(n1);
        tree.append_turn(&a, step("t2", VerdictKind::None, None))
            .unwrap();
        let (_, n3) = tree
            .append_turn(&a, step("t3", VerdictKind::Proc, Some(NodeKind::Full)))
            .unwrap();
        pending_a = n3.unwrap().id;
        tree.append_turn(&a, step("t4", VerdictKind::None, None))
            .unwrap();
        // b: forked from a at 2, then a pending fs turn.
        b = tree.fork(&a, 2, 1).unwrap().remove(0).0.id;
        let (_, nb) = tree
            .append_turn(&b, step("b3", VerdictKind::Fs, Some(NodeKind::Fs)))
            .unwrap();
        pending_b = nb.unwrap().id;
        // c: stopped, fully committed: untouched except nothing.
        c = tree.create_episode("img", Policy::Auto, vec![]).unwrap().id;
        let (_, nc) = tree
            .append_turn(&c, step("c1", VerdictKind::Fs, Some(NodeKind::Fs)))
            .unwrap();
        let nc = nc.unwrap().id;
        tree.commit_node(nc, artifacts(nc, 7)).unwrap();
        committed.insert(nc);
        tree.set_status(&c, EpisodeStatus::Stopped).unwrap();
        // The service dies here: the Tree is dropped without any cleanup.
    }
    let tree = Tree::open(&path).unwrap();
    let report = tree.reconcile().unwrap();

    let mut stopped = report.stopped.clone();
    stopped.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(stopped, want, "only running episodes are reported stopped");

    let abandoned: BTreeSet<NodeId> = report.abandoned.iter().map(|n| n.id).collect();
    assert_eq!(abandoned, BTreeSet::from([pending_a, pending_b]));
    for n in &report.abandoned {
        assert_eq!(
            n.state,
            NodeState::Failed {
                reason: ABANDONED_REASON.into()
            }
        );
    }

    let mut truncated = report.truncated.clone();
    truncated.sort_by(|x, y| x.episode.cmp(&y.episode));
    let mut want = vec![
        Truncation {
            episode: a.clone(),
            from: 4,
            to: 2,
        },
        Truncation {
            episode: b.clone(),
            from: 3,
            to: 2,
        },
    ];
    want.sort_by(|x, y| x.episode.cmp(&y.episode));
    assert_eq!(truncated, want);
    assert_eq!(tree.episode(&c).unwrap().turn, 1);

    check_reconciled(&tree, &committed);

    // The abandoned nodes are now garbage for the caller to clean up, and the
    // episodes can be resumed from their heads.
    let garbage: BTreeSet<NodeId> = tree.garbage().unwrap().iter().map(|n| n.id).collect();
    assert_eq!(garbage, BTreeSet::from([pending_a, pending_b]));
    let (ep, node, session) = tree.rewind(&a, 2).unwrap();
    assert_eq!(ep.status, EpisodeStatus::Running);
    assert_eq!(session.cwd, "/t2");
    assert!(committed.contains(&node.id));
    let (rec, _) = tree
        .append_turn(&a, step("t3'", VerdictKind::None, None))
        .unwrap();
    assert_eq!(rec.turn, 3);
}

/// Child side of [`killed_process_loses_no_committed_node`]; a no-op unless
/// started by it.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var("SANDTREE_CRASH_DB") else {
        return;
    };
    let tree = Tree::open(&path).unwrap();
    tree.reconcile().unwrap();
    let ep = tree.create_episode("img", Policy::Auto, vec![]).unwrap().id;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut i = 0u64;
    while std::time::Instant::now() < deadline {
        i += 1;
        let kind = if i.is_multiple_of(3) {
            NodeKind::Full
        } else {
            NodeKind::Fs
        };
        let (rec, node) = tree
            .append_turn(&ep, step(&format!("s{i}"), VerdictKind::Fs, Some(kind)))
            .unwrap();
        let node = node.unwrap().id;
        if i.is_multiple_of(5) {
            // Left pending (a checkpoint still in flight), with a later turn.
            tree.append_turn(&ep, step("shared", VerdictKind::None, None))
                .unwrap();
            continue;
        }
        if i % 3 == 1 {
            // An fs node whose volume did not change: its turn moves to the parent node. The
            // parent is committed unless it was left pending just before.
            match tree.refute_node(node, "refuted") {
                Ok(_) => println!("refuted {}", node.0),
                Err(_) => {
                    tree.fail_node(node, "refute refused").unwrap();
                }
            }
            continue;
        }
        tree.commit_node(node, artifacts(node, i)).unwrap();
        println!("committed {}", node.0);
        if i.is_multiple_of(7) {
            let forks = tree.fork(&ep, rec.turn, 2).unwrap();
            println!("forked {}", forks.len());
        }
    }
}

#[test]
fn killed_process_loses_no_committed_node() {
    let dir = common::tempdir();
    let path = common::db_path(&dir);
    let exe = std::env::current_exe().unwrap();
    let mut committed = BTreeSet::new();
    for round in 0..3u32 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("SANDTREE_CRASH_DB", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut seen = 0;
        for line in stdout.lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("committed ") {
                committed.insert(NodeId(n.parse().unwrap()));
                seen += 1;
                if seen == 20 + 13 * round {
                    break;
                }
            }
        }
        // SIGKILL, wherever the child is (possibly inside a commit).
        child.kill().unwrap();
        child.wait().unwrap();

        let tree = Tree::open(&path).unwrap();
        let report = tree.reconcile().unwrap();
        assert!(
            !report.stopped.is_empty(),
            "the child's episodes were running"
        );
        check_reconciled(&tree, &committed);
    }
}
