//! Forks share history instead of copying it, checkpoint bytes are charged to
//! the episode that created each node, and shared history outlives the
//! episode that wrote it.

mod common;

use common::{artifacts, step};
use sandtree_branching::{
    turn_kind, EpisodeStatus, NodeKind, Policy, Tree, TurnRecord, VerdictKind,
};

#[test]
fn fork_shares_turn_records_and_charges_bytes_to_creators() {
    let dir = common::tempdir();
    let tree = Tree::open(common::db_path(&dir)).unwrap();
    let env = vec![("PATH".to_owned(), "/bin".to_owned())];
    let src = tree
        .create_episode("python:3", Policy::Auto, env.clone())
        .unwrap()
        .id;
    tree.set_volume(&src, Some("vol-src".into())).unwrap();
    let (_, n1) = tree
        .append_turn(&src, step("pip", VerdictKind::Fs, Some(NodeKind::Fs)))
        .unwrap();
    let n1 = n1.unwrap().id;
    tree.commit_node(n1, artifacts(n1, 100)).unwrap();
    tree.append_turn(&src, step("ls", VerdictKind::None, None))
        .unwrap();
    let (_, n3) = tree
        .append_turn(&src, step("serve", VerdictKind::Proc, Some(NodeKind::Full)))
        .unwrap();
    let n3 = n3.unwrap().id;
    tree.commit_node(n3, artifacts(n3, 1000)).unwrap();

    let forks = tree.fork(&src, 2, 3).unwrap();
    assert_eq!(forks.len(), 3);
    let src_turns = tree.turns(&src).unwrap();
    for (ep, node, session) in &forks {
        assert_eq!(ep.image, "python:3");
        assert_eq!(ep.policy, Policy::Auto);
        assert_eq!(ep.status, EpisodeStatus::Running);
        assert_eq!(ep.volume, None);
        assert_eq!(ep.forked_from, Some((src.clone(), 2)));
        assert_eq!(node.id, n1, "turn 2 shares turn 1's node");
        assert_eq!(session.cwd, "/ls");
        // Same records, not copies.
        assert_eq!(tree.turns(&ep.id).unwrap(), src_turns[..=2].to_vec());
    }
    let f = forks[0].0.id.clone();
    let (rec, n4) = tree
        .append_turn(&f, step("edit", VerdictKind::Fs, Some(NodeKind::Fs)))
        .unwrap();
    assert_eq!(rec.turn, 3, "turn numbers continue at t+1");
    assert_eq!(rec.parent, Some(src_turns[2].id));
    let n4 = n4.unwrap();
    assert_eq!(n4.parent, Some(n1));
    assert_eq!(n4.created_by, f);
    tree.commit_node(n4.id, artifacts(n4.id, 50)).unwrap();

    assert_eq!(tree.episode_checkpoint_bytes(&src).unwrap(), 1100);
    assert_eq!(tree.episode_checkpoint_bytes(&f).unwrap(), 50);
    assert_eq!(tree.episode_checkpoint_bytes(&forks[1].0.id).unwrap(), 0);
    let nodes: Vec<_> = tree
        .episode_nodes(&f)
        .unwrap()
        .iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(nodes, vec![src_turns[0].node, n1, n4.id]);
    assert_eq!(
        tree.episode(&src).unwrap().volume.as_deref(),
        Some("vol-src")
    );

    // n1 is referenced by turns 1 and 2, shared by src and all forks: two
    // live records.
    assert_eq!(tree.refcount(n1).unwrap(), 2);
    tree.pin(n1, true).unwrap();
    assert_eq!(tree.refcount(n1).unwrap(), 3);
    tree.pin(n1, false).unwrap();

    // Deleting the source keeps the shared history alive for the forks; only
    // src's own later checkpoint becomes garbage.
    tree.delete_episode(&src).unwrap();
    let garbage: Vec<_> = tree.garbage().unwrap().iter().map(|n| n.id).collect();
    assert_eq!(garbage, vec![n3]);
    let report = tree.forget_nodes(&garbage).unwrap();
    assert_eq!(report.collected, vec![n3]);
    assert_eq!(report.turns_deleted, 1, "src's turn 3 record");
    assert_eq!(tree.turns(&f).unwrap().len(), 4);
    let (ep, node, _) = tree.fork(&f, 1, 1).unwrap().remove(0);
    assert_eq!(node.id, n1);
    assert_eq!(ep.forked_from, Some((f.clone(), 1)));
}

#[test]
fn turn_kinds_for_display() {
    let dir = common::tempdir();
    let tree = Tree::open(common::db_path(&dir)).unwrap();
    let ep = tree.create_episode("img", Policy::Full, vec![]).unwrap().id;
    tree.append_turn(&ep, step("a", VerdictKind::Fs, Some(NodeKind::Fs)))
        .unwrap();
    tree.append_turn(&ep, step("b", VerdictKind::None, None))
        .unwrap();
    // Under policy full an fs-only verdict may still get a full node.
    tree.append_turn(&ep, step("c", VerdictKind::Fs, Some(NodeKind::Full)))
        .unwrap();
    let turns = tree.turns(&ep).unwrap();
    let kinds: Vec<&str> = turns
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let parent: Option<&TurnRecord> = i.checked_sub(1).map(|p| &turns[p]);
            turn_kind(t, parent, &tree.node(t.node).unwrap().kind).as_str()
        })
        .collect();
    assert_eq!(kinds, vec!["base", "fs", "shared", "full"]);
}

/// `family` gives the same whole tree from any member: every record once, which episodes hold
/// it, and where each fork branched; deleted episodes drop out.
#[test]
fn family_is_the_whole_tree_across_forks() {
    let dir = common::tempdir();
    let tree = Tree::open(common::db_path(&dir)).unwrap();
    let root = tree
        .create_episode("busybox", Policy::Full, Vec::new())
        .unwrap()
        .id;
    for a in ["a", "b"] {
        let (_, n) = tree
            .append_turn(&root, step(a, VerdictKind::Proc, Some(NodeKind::Full)))
            .unwrap();
        let n = n.unwrap().id;
        tree.commit_node(n, artifacts(n, 10)).unwrap();
    }
    let f1 = tree.fork(&root, 1, 1).unwrap()[0].0.id.clone();
    let (_, n) = tree
        .append_turn(&f1, step("c", VerdictKind::Proc, Some(NodeKind::Full)))
        .unwrap();
    let n = n.unwrap().id;
    tree.commit_node(n, artifacts(n, 10)).unwrap();
    let f2 = tree.fork(&f1, 2, 1).unwrap()[0].0.id.clone();
    tree.append_turn(&f2, step("d", VerdictKind::None, None))
        .unwrap();
    let fam = tree.family(&f2).unwrap();
    assert_eq!(fam, tree.family(&root).unwrap());
    assert_eq!(fam, tree.family(&f1).unwrap());
    assert_eq!(fam.root, root);
    assert_eq!(fam.episodes.len(), 3);
    // Records: root's 0, 1 (a), 2 (b); f1's 2 (c); f2's 3 (d): 5 in all, once each.
    let actions: Vec<&str> = fam.turns.iter().map(|t| t.record.action.as_str()).collect();
    let mut sorted = actions.clone();
    sorted.sort();
    assert_eq!(sorted, ["", "a", "b", "c", "d"]);
    assert_eq!(fam.turns.len(), 5, "{actions:?}");
    let at = |a: &str| fam.turns.iter().find(|t| t.record.action == a).unwrap();
    assert_eq!(at("a").episodes.len(), 3, "turn 1 is on every path");
    assert_eq!(at("a").forks, vec![f1.clone()]);
    assert_eq!(at("c").forks, vec![f2.clone()]);
    assert_eq!(at("b").episodes, vec![root.clone()]);
    assert_eq!(at("d").episodes, vec![f2.clone()]);
    tree.delete_episode(&f2).unwrap();
    let fam = tree.family(&root).unwrap();
    assert_eq!(fam.episodes.len(), 2);
    assert!(fam.turns.iter().all(|t| t.record.action != "d"));
}
