//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use sandtree_branching::{
    NewTurn, NodeArtifacts, NodeId, NodeKind, NodeTimings, Observation, Session, SnapshotRef,
    Verdict, VerdictKind,
};

/// A temporary directory, on tmpfs when available (redb fsyncs every commit).
pub fn tempdir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("sandtree-branching-")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}

/// Path of the tree database inside `dir`.
pub fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("tree.redb")
}

/// A turn running `action` with the given verdict and optional new node.
pub fn step(action: &str, verdict: VerdictKind, new_node: Option<NodeKind>) -> NewTurn {
    NewTurn {
        action: action.to_owned(),
        observation: Observation {
            stdout: format!("ran {action}"),
            exit_code: 0,
            duration_ms: 3,
            ..Observation::default()
        },
        session: Session {
            cwd: format!("/{action}"),
            env: vec![("LAST".into(), action.to_owned())],
        },
        verdict: Verdict {
            kind: verdict,
            reasons: vec![format!("{verdict:?}")],
        },
        new_node,
    }
}

/// Artifacts for committing `node` with `bytes` bytes.
pub fn artifacts(node: NodeId, bytes: u64) -> NodeArtifacts {
    NodeArtifacts {
        snapshot: Some(SnapshotRef {
            volume: "vol".into(),
            snap: format!("n{}", node.0),
        }),
        images: None,
        bytes,
        image_bytes: 0,
        image_dumped_bytes: 0,
        image_parent: None,
        timings: Some(NodeTimings {
            freeze_ms: 1,
            snapshot_ms: 2,
            dump_ms: 0,
            total_ms: 3,
        }),
    }
}
