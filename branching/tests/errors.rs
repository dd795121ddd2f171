//! Every refused operation fails with the error variant that names the
//! offending id, and leaves the tree unchanged.

mod common;

use common::{artifacts, step};
use sandtree_branching::{
    EpisodeId, EpisodeStatus, NewTurn, NodeId, NodeKind, NodeState, Policy, Tree, TreeError,
    VerdictKind,
};

fn setup() -> (tempfile::TempDir, Tree, EpisodeId) {
    let dir = common::tempdir();
    let tree = Tree::open(common::db_path(&dir)).unwrap();
    let ep = tree.create_episode("img", Policy::Auto, vec![]).unwrap();
    (dir, tree, ep.id)
}

#[test]
fn out_of_range_turn_names_episode_turn_and_head() {
    let (_d, tree, ep) = setup();
    tree.append_turn(&ep, step("a", VerdictKind::None, None))
        .unwrap();
    tree.append_turn(&ep, step("b", VerdictKind::None, None))
        .unwrap();
    let check = |e: TreeError| match e {
        TreeError::TurnOutOfRange { episode, turn, max } => {
            assert_eq!((episode, turn, max), (ep.clone(), 5, 2));
        }
        other => panic!("expected TurnOutOfRange, got {other:?}"),
    };
    check(tree.turn(&ep, 5).unwrap_err());
    check(tree.fork(&ep, 5, 1).unwrap_err());
    check(tree.rewind(&ep, 5).unwrap_err());
    let msg = tree.turn(&ep, 5).unwrap_err().to_string();
    assert!(
        msg.contains("turn 5") && msg.contains(ep.as_str()) && msg.contains("turn 2"),
        "{msg}"
    );
    // Nothing changed.
    assert_eq!(tree.episode(&ep).unwrap().turn, 2);
    assert_eq!(tree.list_episodes(true).unwrap().len(), 1);
}

#[test]
fn unknown_episode_is_named() {
    let (_d, tree, _) = setup();
    let ghost = EpisodeId::new("ep-000000000000");
    let is_unknown = |r: Result<(), TreeError>| match r {
        Err(TreeError::UnknownEpisode(id)) => assert_eq!(id, ghost),
        other => panic!("expected UnknownEpisode, got {other:?}"),
    };
    is_unknown(tree.episode(&ghost).map(drop));
    is_unknown(tree.turns(&ghost).map(drop));
    is_unknown(tree.turn(&ghost, 0).map(drop));
    is_unknown(tree.append_turn(&ghost, NewTurn::default()).map(drop));
    is_unknown(tree.fork(&ghost, 0, 1).map(drop));
    is_unknown(tree.rewind(&ghost, 0).map(drop));
    is_unknown(tree.set_status(&ghost, EpisodeStatus::Stopped).map(drop));
    is_unknown(tree.set_volume(&ghost, None).map(drop));
    is_unknown(tree.delete_episode(&ghost).map(drop));
    is_unknown(tree.episode_nodes(&ghost).map(drop));
    assert!(tree
        .episode(&ghost)
        .unwrap_err()
        .to_string()
        .contains("ep-000000000000"));
}

#[test]
fn unknown_node_is_named() {
    let (_d, tree, _) = setup();
    let n = NodeId(999);
    for r in [
        tree.node(n).map(drop),
        tree.commit_node(n, artifacts(n, 1)).map(drop),
        tree.fail_node(n, "x").map(drop),
        tree.pin(n, true).map(drop),
        tree.refcount(n).map(drop),
        tree.forget_nodes(&[n]).map(drop),
    ] {
        assert!(
            matches!(r, Err(TreeError::UnknownNode(NodeId(999)))),
            "{r:?}"
        );
    }
}

#[test]
fn fork_and_rewind_of_a_collected_node_are_refused() {
    let (_d, tree, ep) = setup();
    let (_, node) = tree
        .append_turn(&ep, step("a", VerdictKind::Fs, Some(NodeKind::Fs)))
        .unwrap();
    let node = node.unwrap().id;
    tree.commit_node(node, artifacts(node, 10)).unwrap();
    tree.append_turn(&ep, step("b", VerdictKind::None, None))
        .unwrap();
    // Evict the live checkpoint (e.g. under space pressure).
    let report = tree.forget_nodes(&[node]).unwrap();
    assert_eq!(report.were_live, vec![node]);
    for t in [1, 2] {
        match tree.fork(&ep, t, 1).unwrap_err() {
            TreeError::NodeCollected { node: n, state } => {
                assert_eq!((n, state), (node, NodeState::Collected));
            }
            other => panic!("expected NodeCollected, got {other:?}"),
        }
        assert!(matches!(
            tree.rewind(&ep, t),
            Err(TreeError::NodeCollected { node: n, .. }) if n == node
        ));
    }
    let msg = tree.fork(&ep, 1, 1).unwrap_err().to_string();
    assert!(msg.contains("collected"), "{msg}");
    assert!(matches!(
        tree.pin(node, true),
        Err(TreeError::NodeCollected { .. })
    ));
    // Turn 0 is still restorable, and nothing was created by the refusals.
    assert_eq!(tree.list_episodes(true).unwrap().len(), 1);
    assert_eq!(tree.fork(&ep, 0, 1).unwrap().len(), 1);
}

#[test]
fn fork_of_failed_or_pending_node_is_refused() {
    let (_d, tree, ep) = setup();
    let (_, failed) = tree
        .append_turn(&ep, step("a", VerdictKind::Proc, Some(NodeKind::Full)))
        .unwrap();
    let failed = failed.unwrap().id;
    tree.fail_node(failed, "criu dump failed").unwrap();
    let (_, pending) = tree
        .append_turn(&ep, step("b", VerdictKind::Fs, Some(NodeKind::Fs)))
        .unwrap();
    let pending = pending.unwrap().id;
    match tree.fork(&ep, 1, 1).unwrap_err() {
        TreeError::NodeCollected { node, state } => {
            assert_eq!(node, failed);
            assert!(matches!(state, NodeState::Failed { reason } if reason == "criu dump failed"));
        }
        other => panic!("expected NodeCollected, got {other:?}"),
    }
    assert!(matches!(
        tree.fork(&ep, 2, 1),
        Err(TreeError::NodeNotCommitted { node }) if node == pending
    ));
    assert!(matches!(
        tree.rewind(&ep, 2),
        Err(TreeError::NodeNotCommitted { node }) if node == pending
    ));
}

#[test]
fn deleted_and_stopped_episodes_refuse_what_they_cannot_do() {
    let (_d, tree, ep) = setup();
    tree.set_status(&ep, EpisodeStatus::Stopped).unwrap();
    match tree.append_turn(&ep, NewTurn::default()).unwrap_err() {
        TreeError::EpisodeNotRunning { id, status } => {
            assert_eq!((id, status), (ep.clone(), EpisodeStatus::Stopped));
        }
        other => panic!("expected EpisodeNotRunning, got {other:?}"),
    }
    // A stopped episode can still be forked and rewound.
    assert_eq!(tree.fork(&ep, 0, 2).unwrap().len(), 2);
    tree.delete_episode(&ep).unwrap();
    let deleted = |r: Result<(), TreeError>| {
        assert!(
            matches!(r, Err(TreeError::EpisodeDeleted(ref id)) if *id == ep),
            "{r:?}"
        );
    };
    deleted(tree.append_turn(&ep, NewTurn::default()).map(drop));
    deleted(tree.fork(&ep, 0, 1).map(drop));
    deleted(tree.rewind(&ep, 0).map(drop));
    deleted(tree.turns(&ep).map(drop));
    deleted(tree.set_status(&ep, EpisodeStatus::Running).map(drop));
    deleted(tree.set_volume(&ep, Some("v".into())).map(drop));
    // Still visible, as deleted; deleting again is a no-op.
    assert_eq!(tree.episode(&ep).unwrap().status, EpisodeStatus::Deleted);
    assert_eq!(
        tree.delete_episode(&ep).unwrap().status,
        EpisodeStatus::Deleted
    );
    assert_eq!(tree.list_episodes(false).unwrap().len(), 2);
    assert_eq!(tree.list_episodes(true).unwrap().len(), 3);
}

#[test]
fn node_state_transitions_are_checked() {
    let (_d, tree, ep) = setup();
    let base = tree.turn(&ep, 0).unwrap().node;
    assert!(matches!(
        tree.commit_node(base, artifacts(base, 1)),
        Err(TreeError::NodeNotPending { node, state: NodeState::Committed }) if node == base
    ));
    assert!(matches!(
        tree.fail_node(base, "x"),
        Err(TreeError::NodeNotPending { .. })
    ));
    let (_, n) = tree
        .append_turn(&ep, step("a", VerdictKind::Fs, Some(NodeKind::Fs)))
        .unwrap();
    let n = n.unwrap().id;
    tree.commit_node(n, artifacts(n, 5)).unwrap();
    assert!(matches!(
        tree.commit_node(n, artifacts(n, 5)),
        Err(TreeError::NodeNotPending { .. })
    ));
}

#[test]
fn invalid_arguments_are_refused() {
    let (_d, tree, ep) = setup();
    let base = NewTurn {
        new_node: Some(NodeKind::Base { image: "x".into() }),
        ..NewTurn::default()
    };
    assert!(matches!(
        tree.append_turn(&ep, base),
        Err(TreeError::InvalidArgument(_))
    ));
    assert!(matches!(
        tree.fork(&ep, 0, 0),
        Err(TreeError::InvalidArgument(_))
    ));
    assert_eq!(tree.episode(&ep).unwrap().turn, 0);
}
