//! Latency samples and what checkpoints cost, for `stats`.

use std::collections::VecDeque;
use std::sync::Mutex;

use sandtree_branching::{Episode, Node, NodeKind, Tree, VerdictKind};

/// Metric names (Prometheus, through the `metrics` facade: whatever recorder the process
/// installed gets them; `serve --http` renders them at /metrics). Latencies are in seconds.
pub const STEP: &str = "sandtree_step_seconds";
pub const STEP_CHECKPOINT_WAIT: &str = "sandtree_step_checkpoint_wait_seconds";
pub const FORK: &str = "sandtree_fork_seconds";
pub const REWIND: &str = "sandtree_rewind_seconds";
pub const DUMP: &str = "sandtree_dump_seconds";
pub const SNAPSHOT: &str = "sandtree_snapshot_seconds";
pub const RESTORE: &str = "sandtree_restore_seconds";
pub const CHECKPOINT: &str = "sandtree_checkpoint_seconds";
pub const CRIU_RESTORE: &str = "sandtree_criu_restore_seconds";
pub const DEDUP: &str = "sandtree_dedup_seconds";
pub const QUEUE_WAIT: &str = "sandtree_checkpoint_queue_wait_seconds";
pub const CHECKPOINT_BYTES: &str = "sandtree_checkpoint_bytes_total";
pub const CHECKPOINTS: &str = "sandtree_checkpoints_total";
/// Fs verdicts whose node was dropped because the storage layer saw no change.
pub const FS_VERDICTS_REFUTED: &str = "sandtree_fs_verdicts_refuted_total";
pub const VERDICTS: &str = "sandtree_verdicts_total";
pub const BATCHES: &str = "sandtree_checkpoint_batches_total";
pub const PROMOTED: &str = "sandtree_checkpoints_promoted_total";
pub const LIVE_EPISODES: &str = "sandtree_live_episodes";
pub const QUEUE_DEPTH: &str = "sandtree_checkpoint_queue_depth";
pub const CHECKPOINTS_RUNNING: &str = "sandtree_checkpoints_running";
pub const WARM_COPIES: &str = "sandtree_warm_copies";
pub const WARM_BYTES: &str = "sandtree_warm_memory_bytes";
pub const WARM_HITS: &str = "sandtree_warm_hits_total";
pub const WARM_MISSES: &str = "sandtree_warm_misses_total";
pub const SANDBOX_MEMORY: &str = "sandtree_sandbox_memory_rss_bytes";

/// Samples kept per series: the latest ones (older ones are dropped, so memory stays bounded).
pub const MAX_SAMPLES: usize = 100_000;

/// One latency series (ms).
#[derive(Default)]
pub struct Series(Mutex<VecDeque<f64>>);

impl Series {
    fn push(&self, ms: f64) {
        let mut v = self.0.lock().expect("timings lock");
        if v.len() == MAX_SAMPLES {
            v.pop_front();
        }
        v.push_back(ms);
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("timings lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Latency samples (ms) for `stats`.
#[derive(Default)]
pub struct Timings {
    pub dump: Series,
    pub snapshot: Series,
    pub restore: Series,
    pub checkpoint: Series,
    pub dedup: Series,
    /// Time checkpoints spent queued before they started.
    pub queue_wait: Series,
    /// CRIU's own part of each restore.
    pub criu_restore: Series,
}

impl Timings {
    pub fn reset(&self) {
        for s in [
            &self.dump,
            &self.snapshot,
            &self.restore,
            &self.checkpoint,
            &self.dedup,
            &self.queue_wait,
            &self.criu_restore,
        ] {
            s.0.lock().expect("timings lock").clear();
        }
    }
    pub(crate) fn record_dump(&self, ms: f64) {
        metrics::histogram!(DUMP).record(ms / 1e3);
        self.dump.push(ms)
    }
    pub(crate) fn record_snapshot(&self, ms: f64) {
        metrics::histogram!(SNAPSHOT).record(ms / 1e3);
        self.snapshot.push(ms)
    }
    pub(crate) fn record_restore(&self, ms: f64) {
        metrics::histogram!(RESTORE).record(ms / 1e3);
        self.restore.push(ms)
    }
    pub(crate) fn record_checkpoint(&self, ms: f64) {
        metrics::histogram!(CHECKPOINT).record(ms / 1e3);
        self.checkpoint.push(ms)
    }
    pub(crate) fn record_dedup(&self, ms: f64) {
        metrics::histogram!(DEDUP).record(ms / 1e3);
        self.dedup.push(ms)
    }
    pub(crate) fn record_criu_restore(&self, ms: f64) {
        metrics::histogram!(CRIU_RESTORE).record(ms / 1e3);
        self.criu_restore.push(ms)
    }
    pub(crate) fn record_queue_wait(&self, ms: f64) {
        metrics::histogram!(QUEUE_WAIT).record(ms / 1e3);
        self.queue_wait.push(ms)
    }
}

/// The `p` quantile (0..=1) of a series, nearest rank; 0 when empty.
pub fn percentile(s: &Series, p: f64) -> f64 {
    let mut v: Vec<f64> = s.0.lock().expect("timings lock").iter().copied().collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// What an episode's checkpoints wrote: every node it created itself, whatever became of it
/// since (the checkpoint traffic it caused). The one definition `stats` reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpisodeCharges {
    pub checkpoint_bytes: u64,
    pub image_bytes: u64,
    /// Page bytes CRIU wrote before dedup (at least `image_bytes`).
    pub image_dumped_bytes: u64,
    pub nodes_fs: u32,
    pub nodes_full: u32,
    /// Turns that shared their parent turn's node (nothing checkpointed).
    pub turns_shared: u32,
    /// Of those, turns with an fs verdict whose node was refuted (the storage layer saw no
    /// change), on the live path: under auto an fs verdict always asks for a node, so an fs turn
    /// that shares its parent's node is one whose node was refuted.
    pub fs_verdicts_refuted: u32,
}

impl EpisodeCharges {
    fn of(ep: &Episode, nodes: &[Node], tree: &Tree) -> EpisodeCharges {
        let mine: Vec<&Node> = nodes.iter().filter(|n| n.created_by == ep.id).collect();
        let turns = tree.turns(&ep.id).unwrap_or_default();
        EpisodeCharges {
            checkpoint_bytes: mine.iter().map(|n| n.bytes).sum(),
            image_bytes: mine.iter().map(|n| n.image_bytes).sum(),
            image_dumped_bytes: mine.iter().map(|n| dumped(n)).sum(),
            nodes_fs: mine.iter().filter(|n| n.kind == NodeKind::Fs).count() as u32,
            nodes_full: mine.iter().filter(|n| n.kind == NodeKind::Full).count() as u32,
            turns_shared: turns.windows(2).filter(|w| w[0].node == w[1].node).count() as u32,
            fs_verdicts_refuted: turns
                .windows(2)
                .filter(|w| w[0].node == w[1].node && w[1].verdict.kind == VerdictKind::Fs)
                .count() as u32,
        }
    }
}

/// Page bytes a node's dump wrote before dedup.
pub fn dumped(n: &Node) -> u64 {
    n.image_dumped_bytes.max(n.image_bytes)
}

pub(crate) fn charges(tree: &Tree) -> crate::Result<Vec<(Episode, EpisodeCharges)>> {
    let nodes = tree.all_nodes()?;
    Ok(tree
        .list_episodes(true)?
        .into_iter()
        .map(|ep| {
            let c = EpisodeCharges::of(&ep, &nodes, tree);
            (ep, c)
        })
        .collect())
}
