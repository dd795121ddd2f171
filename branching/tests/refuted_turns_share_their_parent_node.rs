//! `refute_node`: a pending fs node whose checkpoint would hold nothing new is dropped, and the
//! turns on it share its parent node from then on, exactly as a verdict-none turn would: fork
//! and rewind to such a turn restore the parent node, GC and reconcile see no trace of the
//! refuted node, and every refusal changes nothing.

mod common;

use common::{artifacts, step};
use sandtree_branching::{
    turn_kind, EpisodeId, NodeId, NodeKind, Policy, Tree, TreeError, TurnKind, VerdictKind,
};

const WHY: &str = "fs verdict refuted: no change since the parent node";

fn setup() -> (tempfile::TempDir, Tree, EpisodeId) {
    let dir = common::tempdir();
    let tree = Tree::open(common::db_path(&dir)).unwrap();
    let ep = tree.create_episode("img", Policy::Auto, vec![]).unwrap();
    (dir, tree, ep.id)
}

/// Appends an fs turn and returns its pending node.
fn fs_turn(tree: &Tree, ep: &EpisodeId, action: &str) -> NodeId {
    tree.append_turn(ep, step(action, VerdictKind::Fs, Some(NodeKind::Fs)))
        .unwrap()
        .1
        .unwrap()
        .id
}

fn kinds(tree: &Tree, ep: &EpisodeId) -> Vec<TurnKind> {
    let turns = tree.turns(ep).unwrap();
    (0..turns.len())
        .map(|i| {
            let kind = tree.node(turns[i].node).unwrap().kind;
            turn_kind(&turns[i], i.checked_sub(1).map(|j| &turns[j]), &kind)
        })
        .collect()
}

#[test]
fn a_refuted_turn_shares_and_restores_its_parent_node() {
    let (_d, tree, ep) = setup();
    let n1 = fs_turn(&tree, &ep, "t1");
    tree.commit_node(n1, artifacts(n1, 10)).unwrap();
    let n2 = fs_turn(&tree, &ep, "t2");
    let (parent, turns) = tree.refute_node(n2, WHY).unwrap();
    assert_eq!(parent.id, n1);
    let t2 = tree.turn(&ep, 2).unwrap();
    assert_eq!(turns, vec![t2.id]);
    assert_eq!(t2.node, n1, "the turn shares its parent turn's node");
    assert_eq!(t2.verdict.kind, VerdictKind::Fs, "the verdict is kept");
    assert_eq!(t2.verdict.reasons.last().map(String::as_str), Some(WHY));
    assert!(matches!(tree.node(n2), Err(TreeError::UnknownNode(id)) if id == n2));
    assert_eq!(
        kinds(&tree, &ep),
        vec![TurnKind::Base, TurnKind::Fs, TurnKind::Shared]
    );
    assert_eq!(tree.episode_checkpoint_bytes(&ep).unwrap(), 10);

    // Fork and rewind to the refuted turn restore the parent node, with the turn's session.
    let (fork, node, session) = tree.fork(&ep, 2, 1).unwrap().remove(0);
    assert_eq!((node.id, session.cwd.as_str()), (n1, "/t2"));
    assert_eq!(tree.restorable_turn(&ep, 2).unwrap().id, n1);
    // The next turn's node descends from the parent node.
    let n3 = fs_turn(&tree, &ep, "t3");
    assert_eq!(tree.node(n3).unwrap().parent, Some(n1));
    tree.commit_node(n3, artifacts(n3, 5)).unwrap();
    let (_, node, session) = tree.rewind(&ep, 2).unwrap();
    assert_eq!((node.id, session.cwd.as_str()), (n1, "/t2"));

    // GC: n3 left the live path and is garbage; nothing else, and no trace of n2.
    let garbage: Vec<NodeId> = tree.garbage().unwrap().iter().map(|n| n.id).collect();
    assert_eq!(garbage, vec![n3]);
    tree.forget_nodes(&garbage).unwrap();
    assert_eq!(
        tree.refcount(n1).unwrap(),
        2,
        "turns 1 and 2, shared by both episodes"
    );
    tree.delete_episode(&ep).unwrap();
    assert!(
        tree.garbage().unwrap().is_empty(),
        "the fork still holds n1"
    );
    tree.delete_episode(&fork.id).unwrap();
    let garbage: Vec<NodeId> = tree.garbage().unwrap().iter().map(|n| n.id).collect();
    assert_eq!(garbage.len(), 2, "n1 and the base node: {garbage:?}");
    assert!(garbage.contains(&n1));
    let report = tree.forget_nodes(&garbage).unwrap();
    assert!(report.were_live.is_empty());
}

#[test]
fn later_turns_and_nodes_on_the_refuted_node_move_with_it() {
    let (_d, tree, ep) = setup();
    let n1 = fs_turn(&tree, &ep, "t1");
    tree.commit_node(n1, artifacts(n1, 10)).unwrap();
    let n2 = fs_turn(&tree, &ep, "t2");
    // A turn that shares the pending node, and a node made on top of it.
    tree.append_turn(&ep, step("t3", VerdictKind::None, None))
        .unwrap();
    let n4 = fs_turn(&tree, &ep, "t4");
    assert_eq!(tree.node(n4).unwrap().parent, Some(n2));
    let (_, turns) = tree.refute_node(n2, WHY).unwrap();
    let path = tree.turns(&ep).unwrap();
    assert_eq!(turns, vec![path[2].id, path[3].id]);
    assert_eq!((path[2].node, path[3].node, path[4].node), (n1, n1, n4));
    assert!(path[2].verdict.reasons.contains(&WHY.to_string()));
    assert!(
        !path[3].verdict.reasons.contains(&WHY.to_string()),
        "only the turn that made the node says it was refuted"
    );
    assert_eq!(tree.node(n4).unwrap().parent, Some(n1));
    // n4 can be refuted in turn, onto n1.
    tree.refute_node(n4, WHY).unwrap();
    let path = tree.turns(&ep).unwrap();
    assert!(path[1..].iter().all(|r| r.node == n1));
    assert_eq!(tree.all_nodes().unwrap().len(), 2, "base and n1");
}

#[test]
fn refusals_change_nothing() {
    let (_d, tree, ep) = setup();
    let full = tree
        .append_turn(&ep, step("f", VerdictKind::Proc, Some(NodeKind::Full)))
        .unwrap()
        .1
        .unwrap()
        .id;
    // The parent is still pending.
    let fs = fs_turn(&tree, &ep, "g");
    let before = (tree.all_nodes().unwrap(), tree.turns(&ep).unwrap());
    let refused = |r: Result<_, TreeError>| r.map(drop).unwrap_err();
    assert!(matches!(
        refused(tree.refute_node(full, WHY)),
        TreeError::InvalidArgument(m) if m.contains("only fs nodes")
    ));
    assert!(matches!(
        refused(tree.refute_node(fs, WHY)),
        TreeError::NodeNotCommitted { node } if node == full
    ));
    tree.fail_node(full, "dump failed").unwrap();
    assert!(matches!(
        refused(tree.refute_node(fs, WHY)),
        TreeError::NodeCollected { node, .. } if node == full
    ));
    assert!(matches!(
        refused(tree.refute_node(NodeId(999), WHY)),
        TreeError::UnknownNode(NodeId(999))
    ));
    let after = (tree.all_nodes().unwrap(), tree.turns(&ep).unwrap());
    assert_eq!(before.1, after.1, "no turn changed");
    assert_eq!(before.0.len(), after.0.len());

    // Committed, failed and pinned nodes are not refuted either.
    let (_d2, tree, ep) = setup();
    let n1 = fs_turn(&tree, &ep, "a");
    tree.commit_node(n1, artifacts(n1, 1)).unwrap();
    assert!(matches!(
        refused(tree.refute_node(n1, WHY)),
        TreeError::NodeNotPending { .. }
    ));
    let n2 = fs_turn(&tree, &ep, "b");
    tree.pin(n2, true).unwrap();
    assert!(matches!(
        refused(tree.refute_node(n2, WHY)),
        TreeError::InvalidArgument(m) if m.contains("pinned")
    ));
    tree.pin(n2, false).unwrap();
    tree.fail_node(n2, "snapshot failed").unwrap();
    assert!(matches!(
        refused(tree.refute_node(n2, WHY)),
        TreeError::NodeNotPending { .. }
    ));
    assert_eq!(tree.turn(&ep, 2).unwrap().node, n2);
}

#[test]
fn reconcile_keeps_a_refuted_turn_and_abandons_an_unrefuted_one() {
    let dir = common::tempdir();
    let path = common::db_path(&dir);
    let (ep, n1);
    {
        let tree = Tree::open(&path).unwrap();
        ep = tree.create_episode("img", Policy::Auto, vec![]).unwrap().id;
        n1 = fs_turn(&tree, &ep, "t1");
        tree.commit_node(n1, artifacts(n1, 10)).unwrap();
        let n2 = fs_turn(&tree, &ep, "t2");
        tree.refute_node(n2, WHY).unwrap();
        // A crash before the refute commits leaves the node pending, as any checkpoint in flight.
        fs_turn(&tree, &ep, "t3");
    }
    let tree = Tree::open(&path).unwrap();
    let report = tree.reconcile().unwrap();
    assert_eq!(report.abandoned.len(), 1);
    assert_eq!((report.truncated[0].from, report.truncated[0].to), (3, 2));
    let e = tree.episode(&ep).unwrap();
    assert_eq!(e.turn, 2, "the refuted turn stands on a committed node");
    assert_eq!(tree.turn(&ep, 2).unwrap().node, n1);
    assert!(tree.reconcile().unwrap().abandoned.is_empty());
}
