//! What the engine drives, as narrow traits: the sandbox runtime, the checkpointer (CRIU and its
//! images) and the inspector. The service wires in the real ones (`service/src/host.rs`, over
//! `sandtree-runtime`); unit tests wire in the recording fakes of [`crate::fake`].
//!
//! A sandbox is named by the volume it runs on ([`VolumeName`]), which is unique per incarnation
//! of an episode: the implementations keep their own handles behind that name.

use std::path::Path;

use sandtree_branching::{Verdict, VolumeName};
use sandtree_storage::SnapshotBackend;

/// Limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory, swap included.
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPU time per [`CPU_PERIOD_US`], in microseconds.
    pub cpu_quota_us: u64,
}

/// The CPU accounting period that [`Limits::cpu_quota_us`] is measured against.
pub const CPU_PERIOD_US: u64 = 100_000;

/// One command for a sandbox's shell.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub turn: u32,
    pub command: String,
    pub cwd: String,
    pub env: Vec<(String, String)>,
    pub timeout_ms: u64,
    pub out_cap: usize,
    pub stdin: Vec<u8>,
    /// Report output chunks while the command runs.
    pub stream: bool,
    /// Run as this (uid, gid) instead of root.
    pub user: Option<(u32, u32)>,
    /// `cwd` was asked for by this step: it must exist.
    pub cwd_strict: bool,
}

/// What a command did.
#[derive(Debug, Clone, Default)]
pub struct ExecOutcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub timed_out: bool,
    /// The shell's state after the command, when it could be recorded.
    pub cwd: Option<String>,
    pub env: Option<Vec<(String, String)>>,
}

/// A piece of a running step's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// A file operation inside a sandbox.
#[derive(Debug, Clone)]
pub enum FileOp {
    Write { data: Vec<u8>, mode: u32 },
    Read { max_bytes: u64 },
}

/// What a file operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOutcome {
    Written,
    Read {
        data: Vec<u8>,
        size: u64,
    },
    /// Refused; `errno` says why (ENOENT, EISDIR, ...).
    Failed {
        errno: i32,
        message: String,
    },
}

/// What a restore took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RestoreStats {
    /// CRIU's own time, from its start to its answer (ms).
    pub criu_ms: f64,
}

/// Sandboxes: start, run commands and file operations, freeze, destroy. Blocking calls.
pub trait SandboxRuntime: Send + Sync {
    /// Starts a fresh sandbox (its init) on `root`.
    fn start(&self, sb: &VolumeName, root: &Path, limits: Option<Limits>) -> anyhow::Result<()>;
    /// Runs one command in the sandbox's shell session.
    fn exec(
        &self,
        sb: &VolumeName,
        req: ExecRequest,
        on_output: &mut dyn FnMut(Chunk),
    ) -> anyhow::Result<ExecOutcome>;
    fn file(&self, sb: &VolumeName, path: &str, op: FileOp) -> anyhow::Result<FileOutcome>;
    /// Freezes (or thaws) every process of the sandbox.
    fn freeze(&self, sb: &VolumeName, frozen: bool) -> anyhow::Result<()>;
    /// Asks the sandbox to freeze without waiting for it: inside CRIU's post-dump notification,
    /// where CRIU still holds the tasks and waiting for the freeze would deadlock.
    fn request_freeze(&self, sb: &VolumeName) -> anyhow::Result<()>;
    /// Makes the sandbox's root filesystem durable (syncfs); an error fails the commit.
    fn sync_rootfs(&self, sb: &VolumeName) -> anyhow::Result<()>;
    /// Kills the sandbox; its volume stays. [`Inspector::detach`] follows.
    fn destroy(&self, sb: &VolumeName) -> anyhow::Result<()>;
    /// Kills the sandboxes an earlier run of this service left; returns how many.
    fn reap_leftovers(&self) -> usize;
    /// Releases what the runtime holds for the whole service (at shutdown).
    fn release(&self);
    /// The largest limits a sandbox may get (the service's flags).
    fn max_limits(&self) -> Limits;
    /// Anonymous memory (RSS) the sandbox's processes hold now; None if it cannot be read.
    fn memory_rss(&self, sb: &VolumeName) -> Option<u64>;
}

/// What one dump cost and kept.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DumpStats {
    pub image_bytes: u64,
    pub dump_ms: f64,
    /// Time inside the post-dump hook (the snapshot), included in `dump_ms`.
    pub hook_ms: f64,
}

/// Why page dedup did not apply.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// The images disagree with each other: the new image cannot be trusted.
    #[error("inconsistent images: {0}")]
    Inconsistent(String),
    /// Dedup could not run; the image stays whole and valid.
    #[error("{0}")]
    Skipped(String),
}

/// CRIU process images: dump, restore, page dedup and their files. Blocking calls.
pub trait Checkpointer: Send + Sync {
    /// Fails fast if the sandbox is in a state CRIU cannot dump (a task blocked in vfork).
    fn seizable(&self, sb: &VolumeName) -> anyhow::Result<()>;
    /// Dumps the sandbox into `images` (created here) and leaves it running. `frozen_instant`
    /// runs inside CRIU's post-dump notification, while every process is stopped; after it the
    /// sandbox stays frozen until [`SandboxRuntime::freeze`] thaws it.
    fn dump(
        &self,
        sb: &VolumeName,
        images: &Path,
        frozen_instant: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<DumpStats>;
    /// Restores `images` into a new sandbox `sb` on `root`; with `merge`, its processes' anonymous
    /// memory may be shared with identical pages (KSM), as warm copies ask.
    fn restore(
        &self,
        sb: &VolumeName,
        images: &Path,
        root: &Path,
        limits: Option<Limits>,
        merge: bool,
    ) -> anyhow::Result<RestoreStats>;
    /// Leaves out of `images` the pages equal to those of `parent` (at most `max_chain` images
    /// deep). Returns the parent levels now behind `images` (0: kept whole).
    fn dedup(&self, images: &Path, parent: &Path, max_chain: usize) -> Result<usize, DedupError>;
    /// Bytes the image directory holds.
    fn image_bytes(&self, images: &Path) -> u64;
    /// Makes an image directory durable: its files, itself and its entry in its parent.
    fn make_durable(&self, images: &Path) -> anyhow::Result<()>;
    /// Removes a failed dump's images, keeping CRIU's log under `failed-logs/` beside them.
    fn discard_failed(&self, images: &Path, log_name: &str);
    /// Removes a collected node's images.
    fn remove(&self, images: &Path);
}

/// What the inspector says of the service as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InspectorStatus {
    pub description: String,
    pub loaded: bool,
    pub map_bytes: u64,
    pub watched_sandboxes: u64,
    pub sandbox_map_bytes: u64,
    pub verdicts_checked: u64,
    pub verdicts_unsafe: u64,
    pub verdicts_fs_without_change: u64,
}

/// Per-turn verdicts: what a turn changed in a sandbox. Blocking calls.
pub trait Inspector: Send + Sync {
    /// Starts watching a sandbox (after start or restore).
    fn attach(&self, sb: &VolumeName, restored: bool);
    fn detach(&self, sb: &VolumeName);
    /// Ends the turn's epoch and judges it (policy auto). Returns the verdict and whether
    /// processes other than init are alive.
    fn judge(
        &self,
        sb: &VolumeName,
        storage: &dyn SnapshotBackend,
    ) -> anyhow::Result<(Verdict, bool)>;
    /// Ends the turn's epoch and reports what it saw, if it can (policies none and full).
    fn observe(&self, sb: &VolumeName) -> Option<Verdict>;
    /// Runs a dump with the inspector suspended for the sandbox (the engine thaws it after).
    fn dump_window(
        &self,
        sb: &VolumeName,
        dump: &mut dyn FnMut() -> anyhow::Result<DumpStats>,
    ) -> anyhow::Result<DumpStats>;
    fn status(&self) -> InspectorStatus;
}

/// What a node bundle holds of file trees (docs/design.md, "Node bundles, format 1"). The
/// service's is `sandtree_runtime::bundle`; every write goes through the image importer's
/// confined writer.
pub trait NodeFiles: Send + Sync {
    /// The content digest of an image's tree at `root` (`sha256:<hex>`; no times).
    fn digest(&self, root: &Path) -> anyhow::Result<String>;
    /// Writes the entries of `root` that differ from `base` as a tar to `tar`, and the paths of
    /// `base` that `root` lacks to `whiteouts` (NUL-terminated). Returns the number of entries.
    fn write_delta(
        &self,
        base: &Path,
        root: &Path,
        tar: &mut dyn std::io::Write,
        whiteouts: &mut dyn std::io::Write,
    ) -> anyhow::Result<u64>;
    /// Removes the whiteouts from `root`, then writes the tar's entries into it, confined to it.
    fn apply_delta(
        &self,
        root: &Path,
        whiteouts: &[u8],
        tar: &mut dyn std::io::Read,
    ) -> anyhow::Result<()>;
    /// Writes CRIU image directory `images` (its `parent/` chain included) as a tar.
    fn write_images(&self, images: &Path, tar: &mut dyn std::io::Write) -> anyhow::Result<u64>;
    /// Makes CRIU image directory `images` (absent) from such a tar; removes it on error.
    fn read_images(&self, images: &Path, tar: &mut dyn std::io::Read) -> anyhow::Result<()>;
}
