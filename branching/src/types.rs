//! Plain domain types of the checkpoint tree. All are serde-serializable and
//! are stored as JSON values in the redb tables (see `docs/design.md`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Turn number within an episode. Turn 0 is the initial state; each applied
/// action advances the turn by one.
pub type TurnNo = u32;

/// Identifier of an episode: `"ep-"` followed by 12 lowercase hex characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EpisodeId(pub String);

impl EpisodeId {
    /// Wraps an existing id string (e.g. one received from a client).
    pub fn new(id: impl Into<String>) -> Self {
        EpisodeId(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A fresh random id (`"ep-"` + 12 lowercase hex characters).
    ///
    /// Reads 6 bytes from `/dev/urandom`; if that is unavailable it falls back
    /// to std's randomly seeded hasher mixed with the clock and a counter.
    pub fn generate() -> Self {
        let bytes = random_bytes();
        let mut s = String::with_capacity(15);
        s.push_str("ep-");
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        EpisodeId(s)
    }
}

fn random_bytes() -> [u8; 6] {
    use std::io::Read;
    let mut buf = [0u8; 6];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(&mut buf).is_ok() {
            return buf;
        }
    }
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u64(crate::now_unix_ms());
    let v = h.finish().to_le_bytes();
    buf.copy_from_slice(&v[..6]);
    buf
}

impl fmt::Display for EpisodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for EpisodeId {
    fn from(s: String) -> Self {
        EpisodeId(s)
    }
}

impl From<&str> for EpisodeId {
    fn from(s: &str) -> Self {
        EpisodeId(s.to_owned())
    }
}

/// Identifier of a checkpoint node (monotonic counter stored in the database).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Internal identifier of a turn record (monotonic counter stored in the
/// database). Turn records are shared between forked episodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TurnId(pub u64);

impl fmt::Display for TurnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Checkpoint policy of an episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// `"none"`: no checkpoints beyond the base.
    None,
    /// `"full"`: full (filesystem + process) checkpoints.
    Full,
    /// `"auto"`: checkpoint kind chosen from each turn's verdict.
    Auto,
}

impl Policy {
    /// The lowercase name (`"none"`, `"full"`, `"auto"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Full => "full",
            Policy::Auto => "auto",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error returned when parsing an unknown policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown checkpoint policy {0:?} (expected \"none\", \"full\" or \"auto\")")]
pub struct ParsePolicyError(pub String);

impl FromStr for Policy {
    type Err = ParsePolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Policy::None),
            "full" => Ok(Policy::Full),
            "auto" => Ok(Policy::Auto),
            other => Err(ParsePolicyError(other.to_owned())),
        }
    }
}

/// Lifecycle status of an episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EpisodeStatus {
    /// A live sandbox is (supposed to be) running for this episode.
    Running,
    /// No sandbox runs; the episode can be rewound or forked.
    Stopped,
    /// Deleted: the episode roots nothing any more and cannot be used.
    Deleted,
}

impl fmt::Display for EpisodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EpisodeStatus::Running => "running",
            EpisodeStatus::Stopped => "stopped",
            EpisodeStatus::Deleted => "deleted",
        })
    }
}

/// An episode: a cursor (`head`) into the shared tree of turn records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Episode {
    /// Episode id.
    pub id: EpisodeId,
    /// Container image the episode started from.
    pub image: String,
    /// Checkpoint policy.
    pub policy: Policy,
    /// Lifecycle status.
    pub status: EpisodeStatus,
    /// Turn record at the head of the live path.
    pub head: TurnId,
    /// Turn number of `head`.
    pub turn: TurnNo,
    /// Name of the live storage volume (set by the service).
    pub volume: Option<String>,
    /// Source episode and turn this episode was forked from.
    pub forked_from: Option<(EpisodeId, TurnNo)>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Labels and limits given at creation; forks inherit them.
    #[serde(default)]
    pub meta: EpisodeMeta,
}

/// What a caller attaches to an episode at creation (absent in records of older versions).
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EpisodeMeta {
    /// Free-form key/value labels.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Sandbox limits of this episode; None: the service's.
    #[serde(default)]
    pub limits: Option<SandboxLimits>,
    /// (uid, gid) that its turns run as (its image's `User`); None: root.
    #[serde(default)]
    pub user: Option<(u32, u32)>,
}

/// Resource limits of one episode's sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLimits {
    /// Memory with swap, in bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU time per 100 ms, in microseconds.
    pub cpu_quota_us: u64,
}

/// The whole tree of a fork family (see `Tree::family`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Family {
    /// The episode every other one was forked from, directly or not.
    pub root: EpisodeId,
    /// Every episode of the family that is not deleted.
    pub episodes: Vec<EpisodeId>,
    /// Every turn record on one of their live paths, once each, in id order.
    pub turns: Vec<FamilyTurn>,
}

/// One turn record of a [`Family`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyTurn {
    /// The turn record.
    pub record: TurnRecord,
    /// Episodes whose live path holds this record.
    pub episodes: Vec<EpisodeId>,
    /// Episodes forked at this record.
    pub forks: Vec<EpisodeId>,
}

/// What an action produced.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Observation {
    /// Captured standard output (possibly truncated).
    pub stdout: String,
    /// Captured standard error (possibly truncated).
    pub stderr: String,
    /// Exit code of the action.
    pub exit_code: i32,
    /// Wall-clock duration of the action.
    pub duration_ms: u64,
    /// Whether `stdout` was truncated.
    pub stdout_truncated: bool,
    /// Whether `stderr` was truncated.
    pub stderr_truncated: bool,
}

/// Shell session state carried from turn to turn.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Session {
    /// Working directory.
    pub cwd: String,
    /// Environment variables, in order.
    pub env: Vec<(String, String)>,
}

/// Kind of side effect an action was judged to have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictKind {
    /// No observable side effect.
    #[default]
    None,
    /// Filesystem changes only.
    Fs,
    /// Process state changes (e.g. a background process was left running).
    Proc,
}

/// Side-effect verdict of a turn, with human-readable reasons.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Verdict {
    /// The kind of effect.
    pub kind: VerdictKind,
    /// Why the verdict was reached.
    pub reasons: Vec<String>,
}

/// One turn of history. Records form a tree (via `parent`) shared by forks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnRecord {
    /// Record id.
    pub id: TurnId,
    /// Previous turn (None for turn 0).
    pub parent: Option<TurnId>,
    /// Turn number (`parent.turn + 1`, 0 for the root).
    pub turn: TurnNo,
    /// The action applied (empty for turn 0).
    pub action: String,
    /// What the action produced.
    pub observation: Observation,
    /// Session state after the action.
    pub session: Session,
    /// Side-effect verdict of the action.
    pub verdict: Verdict,
    /// Checkpoint node holding the sandbox state after this turn. Turns that
    /// create no checkpoint share their parent turn's node.
    pub node: NodeId,
}

/// Kind of checkpoint node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    /// The pristine image (turn 0); has no artifacts.
    Base {
        /// Container image name.
        image: String,
    },
    /// Filesystem-only checkpoint (a volume snapshot).
    Fs,
    /// Filesystem snapshot plus CRIU process images.
    Full,
}

impl NodeKind {
    /// Short lowercase name: `"base"`, `"fs"` or `"full"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeKind::Base { .. } => "base",
            NodeKind::Fs => "fs",
            NodeKind::Full => "full",
        }
    }
}

/// Lifecycle state of a checkpoint node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Created; the caller is making its artifacts durable.
    Pending,
    /// Artifacts are durable; the node can be restored.
    Committed,
    /// Checkpointing failed (or was abandoned at restart).
    Failed {
        /// Why.
        reason: String,
    },
    /// Artifacts were freed; the row is kept so errors can say so.
    Collected,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeState::Pending => f.write_str("pending"),
            NodeState::Committed => f.write_str("committed"),
            NodeState::Failed { reason } => write!(f, "failed ({reason})"),
            NodeState::Collected => f.write_str("collected"),
        }
    }
}

/// A filesystem snapshot of a storage volume.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotRef {
    /// Volume name.
    pub volume: String,
    /// Snapshot name within the volume.
    pub snap: String,
}

/// Time spent producing a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeTimings {
    /// Time the sandbox was frozen.
    pub freeze_ms: u64,
    /// Time taken by the filesystem snapshot.
    pub snapshot_ms: u64,
    /// Time taken by the CRIU dump.
    pub dump_ms: u64,
    /// Total checkpoint time.
    pub total_ms: u64,
}

/// A checkpoint node: a self-contained restorable sandbox state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Node id.
    pub id: NodeId,
    /// Node the sandbox state was derived from (None for base nodes).
    pub parent: Option<NodeId>,
    /// Kind of checkpoint.
    pub kind: NodeKind,
    /// Lifecycle state.
    pub state: NodeState,
    /// Checkpoint bytes (snapshot bytes + CRIU image bytes).
    pub bytes: u64,
    /// The CRIU image part of `bytes` (full nodes).
    #[serde(default)]
    pub image_bytes: u64,
    /// Bytes CRIU wrote for the image; more than `image_bytes` when pages equal to the image
    /// parent's were left out (auto policy).
    #[serde(default)]
    pub image_dumped_bytes: u64,
    /// The node whose image this one reads unchanged pages from (its image dir holds hard links
    /// to that chain, so this is informational: freeing that node frees nothing this one needs).
    #[serde(default)]
    pub image_parent: Option<NodeId>,
    /// Filesystem snapshot, once committed.
    pub snapshot: Option<SnapshotRef>,
    /// CRIU image directory, once committed (full checkpoints).
    pub images: Option<String>,
    /// Timings, once committed.
    pub timings_ms: Option<NodeTimings>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Pinned nodes are GC roots.
    pub pinned: bool,
    /// Episode whose turn created this node.
    pub created_by: EpisodeId,
}

/// Artifacts recorded when a node is committed.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeArtifacts {
    /// Filesystem snapshot.
    pub snapshot: Option<SnapshotRef>,
    /// CRIU image directory.
    pub images: Option<String>,
    /// Total checkpoint bytes.
    pub bytes: u64,
    /// The CRIU image part of `bytes`.
    #[serde(default)]
    pub image_bytes: u64,
    /// Bytes CRIU wrote for the image, before pages equal to the image parent's were left out.
    #[serde(default)]
    pub image_dumped_bytes: u64,
    /// The node whose image this one reads unchanged pages from.
    #[serde(default)]
    pub image_parent: Option<NodeId>,
    /// Timings.
    pub timings: Option<NodeTimings>,
}

/// A turn to append to an episode.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NewTurn {
    /// The action applied.
    pub action: String,
    /// What it produced.
    pub observation: Observation,
    /// Session state after the action.
    pub session: Session,
    /// Side-effect verdict.
    pub verdict: Verdict,
    /// `Some(Fs | Full)` to create a new pending checkpoint node for this
    /// turn; `None` to share the previous turn's node.
    pub new_node: Option<NodeKind>,
}

/// An episode truncated by [`crate::Tree::reconcile`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncation {
    /// The episode.
    pub episode: EpisodeId,
    /// Head turn before reconcile.
    pub from: TurnNo,
    /// Head turn after reconcile.
    pub to: TurnNo,
}

/// What [`crate::Tree::reconcile`] changed.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Episodes that were Running and are now Stopped.
    pub stopped: Vec<EpisodeId>,
    /// Nodes that were Pending and are now Failed; the caller deletes any
    /// partial artifacts they left behind.
    pub abandoned: Vec<Node>,
    /// Episodes whose head was moved back to a turn with a committed node.
    pub truncated: Vec<Truncation>,
}

/// What [`crate::Tree::forget_nodes`] changed.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ForgetReport {
    /// Nodes newly marked Collected.
    pub collected: Vec<NodeId>,
    /// Of those, nodes that were still live (evicted while referenced).
    pub were_live: Vec<NodeId>,
    /// Number of unreachable turn records deleted.
    pub turns_deleted: u64,
}

/// What a turn shows of its checkpoint: the episode's first turn (`Base`), a turn that reuses its
/// parent turn's node (`Shared`, it wrote nothing), or the kind of the node it made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TurnKind {
    /// Turn 0: the image.
    Base,
    /// Same node as the parent turn: nothing was checkpointed.
    Shared,
    /// A filesystem snapshot.
    Fs,
    /// A filesystem snapshot and a CRIU image.
    Full,
}

impl TurnKind {
    /// `"base"`, `"shared"`, `"fs"` or `"full"`, as the API and the tree view show it.
    pub fn as_str(self) -> &'static str {
        match self {
            TurnKind::Base => "base",
            TurnKind::Shared => "shared",
            TurnKind::Fs => "fs",
            TurnKind::Full => "full",
        }
    }

    /// Whether the turn made a checkpoint of its own (its bytes are charged to it).
    pub fn has_own_checkpoint(self) -> bool {
        matches!(self, TurnKind::Fs | TurnKind::Full)
    }
}

impl fmt::Display for TurnKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of a turn: [`TurnKind::Base`] for turn 0, [`TurnKind::Shared`] when it reuses its
/// parent turn's node, otherwise the kind of its own node.
///
/// `node_kind` is the kind of `turn.node`; the turn record alone cannot tell a
/// full checkpoint taken under policy `full` from one chosen by the verdict.
pub fn turn_kind(
    turn: &TurnRecord,
    parent_turn: Option<&TurnRecord>,
    node_kind: &NodeKind,
) -> TurnKind {
    match (parent_turn, node_kind) {
        (None, _) => TurnKind::Base,
        (Some(p), _) if p.node == turn.node => TurnKind::Shared,
        (Some(_), NodeKind::Base { .. }) => TurnKind::Base,
        (Some(_), NodeKind::Fs) => TurnKind::Fs,
        (Some(_), NodeKind::Full) => TurnKind::Full,
    }
}

/// The volume one incarnation of an episode runs on, and the name of its sandbox: the episode
/// id and a sequence number that each rewind raises (`ep-0123456789ab-2`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeName {
    /// The episode the volume belongs to.
    pub episode: EpisodeId,
    /// 0 for the first incarnation; each rewind takes the next.
    pub seq: u64,
}

impl VolumeName {
    /// The first incarnation's volume of `episode`.
    pub fn first(episode: &EpisodeId) -> VolumeName {
        VolumeName {
            episode: episode.clone(),
            seq: 0,
        }
    }

    /// The volume of the incarnation after this one.
    pub fn next(&self) -> VolumeName {
        VolumeName {
            episode: self.episode.clone(),
            seq: self.seq + 1,
        }
    }

    /// Reads a name that [`fmt::Display`] wrote; None for anything else.
    pub fn parse(s: &str) -> Option<VolumeName> {
        let (ep, seq) = s.rsplit_once('-')?;
        if ep.is_empty() || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(VolumeName {
            episode: EpisodeId::new(ep),
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.episode, self.seq)
    }
}
