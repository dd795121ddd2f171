//! The one error type of the checkpoint tree.

use crate::types::{EpisodeId, EpisodeStatus, NodeId, NodeState, TurnNo};

/// Errors returned by [`crate::Tree`]. Variants name the offending id.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// No episode with this id exists.
    #[error("unknown episode {0}")]
    UnknownEpisode(EpisodeId),
    /// The episode was deleted.
    #[error("episode {0} is deleted")]
    EpisodeDeleted(EpisodeId),
    /// The operation needs a Running episode.
    #[error("episode {id} is {status}, not running")]
    EpisodeNotRunning {
        /// The episode.
        id: EpisodeId,
        /// Its current status.
        status: EpisodeStatus,
    },
    /// The turn is beyond the episode's head.
    #[error("turn {turn} is out of range for episode {episode} (head is turn {max})")]
    TurnOutOfRange {
        /// The episode.
        episode: EpisodeId,
        /// The requested turn.
        turn: TurnNo,
        /// The episode's head turn.
        max: TurnNo,
    },
    /// No node with this id exists.
    #[error("unknown checkpoint node {0}")]
    UnknownNode(NodeId),
    /// The node's artifacts are gone (collected, or checkpointing failed), so
    /// it cannot be restored or pinned.
    #[error("checkpoint node {node} is not restorable: it was {state}")]
    NodeCollected {
        /// The node.
        node: NodeId,
        /// Its state (Collected or Failed).
        state: NodeState,
    },
    /// The node's checkpoint has not been committed yet.
    #[error("checkpoint node {node} is not committed yet (still pending)")]
    NodeNotCommitted {
        /// The node.
        node: NodeId,
    },
    /// `commit_node` / `fail_node` on a node that is not Pending.
    #[error("checkpoint node {node} is {state}, not pending")]
    NodeNotPending {
        /// The node.
        node: NodeId,
        /// Its current state.
        state: NodeState,
    },
    /// A caller-supplied argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The database was written with another schema version.
    #[error(
        "checkpoint tree database has schema version {found}, this build expects {expected}; \
         refusing to open it (migrate or move the database aside)"
    )]
    SchemaMismatch {
        /// Version found in the database.
        found: u64,
        /// Version this build understands.
        expected: u64,
    },
    /// The underlying redb database failed.
    #[error("checkpoint tree storage error: {0}")]
    Storage(#[source] redb::Error),
    /// Reading or writing the database file failed (a full disk, an I/O error). The call that
    /// met it changed nothing; the tree closes the database and opens it again (redb's repair),
    /// so later calls work once the disk does.
    #[error("checkpoint tree {}: {what}: {source}{}", path.display(), disk_hint(source))]
    Disk {
        /// The database file.
        path: std::path::PathBuf,
        /// What failed: "cannot write", "cannot reopen after an I/O error", ...
        what: &'static str,
        /// The error from the file system.
        #[source]
        source: std::io::Error,
    },
    /// The stored data is inconsistent (a bug or external tampering).
    #[error("checkpoint tree is corrupt: {0}")]
    Corrupt(String),
}

fn disk_hint(e: &std::io::Error) -> &'static str {
    if is_disk_full(e) {
        " (the disk holding the service's data dir is full: free space there; the tree is kept as \
         of its last commit)"
    } else {
        ""
    }
}

/// ENOSPC or EDQUOT.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl TreeError {
    /// The disk under the database is full (the call may work once space is freed).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, TreeError::Disk { source, .. } if is_disk_full(source))
    }
}

/// Result alias for tree operations.
pub type Result<T, E = TreeError> = std::result::Result<T, E>;

macro_rules! storage_from {
    ($($t:ty),* $(,)?) => {
        $(impl From<$t> for TreeError {
            fn from(e: $t) -> Self {
                TreeError::Storage(e.into())
            }
        })*
    };
}

storage_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
);
