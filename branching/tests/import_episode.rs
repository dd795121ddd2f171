//! `Tree::import_episode`: an episode that starts at a node brought from elsewhere. Turn 0 is
//! the image's base node, turn 1 a Pending node of the given kind; once committed it forks and
//! rewinds like any other, a failed import's episode and node become garbage, and a base kind
//! is refused without a trace.

mod common;

use common::{artifacts, step};
use sandtree_branching::{
    EpisodeMeta, EpisodeStatus, NodeKind, NodeState, Policy, Session, Tree, TreeError, VerdictKind,
};

fn session(cwd: &str) -> Session {
    Session {
        cwd: cwd.into(),
        env: vec![("PATH".into(), "/bin".into())],
    }
}

#[test]
fn an_imported_node_forks_and_rewinds_like_any_other() {
    let dir = common::tempdir();
    let tree = Tree::open(common::db_path(&dir)).unwrap();
    let mut turn = step("# sandtree import", VerdictKind::Proc, Some(NodeKind::Full));
    turn.session = session("/workspace/jobs");
    let (ep, node) = tree
        .import_episode(
            "debian",
            Policy::Auto,
            session("/"),
            EpisodeMeta::default(),
            turn,
        )
        .unwrap();
    assert_eq!((ep.turn, ep.status), (1, EpisodeStatus::Running));
    assert_eq!(node.state, NodeState::Pending);
    assert_eq!(node.kind, NodeKind::Full);
    let turns = tree.turns(&ep.id).unwrap();
    assert_eq!(turns.len(), 2);
    let base = tree.node(turns[0].node).unwrap();
    assert_eq!(
        base.kind,
        NodeKind::Base {
            image: "debian".into()
        }
    );
    assert_eq!(node.parent, Some(base.id));
    assert_eq!(turns[1].session.cwd, "/workspace/jobs");
    // Not forkable until committed.
    assert!(tree.fork(&ep.id, 1, 1).is_err());
    tree.commit_node(node.id, artifacts(node.id, 500)).unwrap();
    let forks = tree.fork(&ep.id, 1, 2).unwrap();
    assert!(forks
        .iter()
        .all(|(_, n, s)| n.id == node.id && s.cwd == "/workspace/jobs"));
    tree.set_volume(&ep.id, Some("v".into())).unwrap();
    tree.append_turn(&ep.id, step("ls", VerdictKind::None, None))
        .unwrap();
    let (_, n, _) = tree.rewind(&ep.id, 1).unwrap();
    assert_eq!(n.id, node.id);
    assert_eq!(tree.episode_checkpoint_bytes(&ep.id).unwrap(), 500);
}

#[test]
fn a_failed_import_leaves_only_garbage_and_a_base_kind_nothing() {
    let dir = common::tempdir();
    let tree = Tree::open(common::db_path(&dir)).unwrap();
    let t = step("# sandtree import", VerdictKind::Fs, Some(NodeKind::Fs));
    let (ep, node) = tree
        .import_episode(
            "busybox",
            Policy::Full,
            session("/"),
            EpisodeMeta::default(),
            t,
        )
        .unwrap();
    tree.fail_node(node.id, "import failed").unwrap();
    tree.delete_episode(&ep.id).unwrap();
    let garbage: Vec<_> = tree.garbage().unwrap().into_iter().map(|n| n.id).collect();
    assert!(garbage.contains(&node.id), "{garbage:?}");

    let before = tree.list_episodes(true).unwrap();
    let base = step(
        "x",
        VerdictKind::None,
        Some(NodeKind::Base { image: "i".into() }),
    );
    let e = tree
        .import_episode(
            "busybox",
            Policy::Auto,
            session("/"),
            EpisodeMeta::default(),
            base,
        )
        .unwrap_err();
    assert!(matches!(e, TreeError::InvalidArgument(_)), "{e}");
    assert_eq!(tree.list_episodes(true).unwrap(), before);
}
