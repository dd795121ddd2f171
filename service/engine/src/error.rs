//! The engine's errors: each says which object failed and why; `service/src/server.rs` maps
//! them to gRPC codes in one place (`status`).

use sandtree_branching::TreeError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Exhausted(String),
    /// The turn has no checkpoint to fork or rewind to.
    #[error("{0}")]
    NotRestorable(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
