//! Turn-aligned checkpoint tree of sandtree.
//!
//! Episodes are cursors into a tree of [`TurnRecord`]s that forks share, and
//! each turn record points at the checkpoint [`Node`] holding the sandbox
//! state after that turn. [`Tree`] stores all of it in one redb database and
//! offers fork, rewind, reachability garbage collection and crash recovery.
//!
//! This crate makes no syscalls and spawns no processes: its only I/O is the
//! redb file. Creating, restoring and freeing the actual snapshots and CRIU
//! images is the caller's job. See `docs/design.md`, section "Checkpoint tree
//! store (branching/)".

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod tree;
mod types;

pub mod policy;
pub use error::{Result, TreeError};
pub use tree::{Tree, ABANDONED_REASON, SCHEMA_VERSION};
pub use types::{
    turn_kind, Episode, EpisodeId, EpisodeMeta, EpisodeStatus, Family, FamilyTurn, ForgetReport,
    NewTurn, Node, NodeArtifacts, NodeId, NodeKind, NodeState, NodeTimings, Observation,
    ParsePolicyError, Policy, ReconcileReport, SandboxLimits, Session, SnapshotRef, Truncation,
    TurnId, TurnKind, TurnNo, TurnRecord, Verdict, VerdictKind, VolumeName,
};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn episode_ids_have_the_documented_shape() {
        let id = EpisodeId::generate();
        assert_eq!(id.as_str().len(), 15);
        assert!(id.as_str().starts_with("ep-"));
        assert!(id.as_str()[3..]
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_ne!(id, EpisodeId::generate());
    }

    #[test]
    fn tree_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tree>();
    }

    #[test]
    fn policy_parses_and_prints() {
        for p in [Policy::None, Policy::Full, Policy::Auto] {
            assert_eq!(p.as_str().parse::<Policy>().unwrap(), p);
        }
        assert!("FULL".parse::<Policy>().is_err());
    }
}
