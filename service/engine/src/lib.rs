//! The engine: episodes, turns and their checkpoints, over the tree (branching), the snapshot
//! backend (storage) and the parts behind [`ports`]: the sandbox runtime, the checkpointer and
//! the inspector. It depends on those traits only; the service wires in the real parts and the
//! unit tests the fakes of [`fake`].
//!
//! **One owner per episode.** Each episode that is in use has an actor ([`actor`]): a task that
//! owns its sandbox, its session and its pending checkpoint, and takes a closed set of
//! [`actor::Command`]s over a channel, one at a time, answering each on a oneshot. Step, write,
//! read, fork planning, rewind and delete on one episode therefore never interleave, and a
//! command that the client gave up on still runs to its end. The registry maps ids to actor
//! handles and is never held across an await. A step returns its observation as soon as the
//! command ends; that turn's checkpoint then runs on its own task, and the actor's next command
//! that needs the sandbox waits for it. `stats` waits on per-checkpoint flags, never on an
//! actor, so it never waits behind a step.

pub mod actor;
pub mod bundle;
mod error;
pub mod fake;
pub mod ports;
pub mod sched;
mod stats;
pub mod warm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Instant;

use anyhow::{anyhow, Context};
use sandtree_branching::{
    EpisodeId, EpisodeMeta, EpisodeStatus, Node, NodeArtifacts, NodeId, NodeKind, NodeState,
    NodeTimings, Policy, SandboxLimits, SnapshotRef, Tree, TreeError, TurnKind, TurnRecord,
    VolumeName,
};
use sandtree_storage::SnapshotBackend;
use tokio::sync::Semaphore;
use tracing::{info, warn};

pub use actor::{StepOptions, StepOutcome};
pub use bundle::{BundleFile, Imported};
pub use error::{EngineError, Result};
pub use ports::{Checkpointer, Chunk, Inspector, Limits, NodeFiles, SandboxRuntime};
pub use sched::Discipline;
pub use stats::{dumped, percentile, EpisodeCharges, Timings};

/// Service configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub default_timeout_ms: u64,
    pub out_cap: usize,
    /// Checkpoint batches running at once on this host (a promoted one may run past it).
    pub checkpoint_slots: usize,
    /// How the host-wide checkpoint queue is ordered.
    pub scheduler: Discipline,
    /// Checkpoints that a waiting step may start past `checkpoint_slots` (edf).
    pub checkpoint_express: usize,
    /// Longest parent-image chain behind an auto full node; 0: no page dedup.
    pub max_image_chain: usize,
    /// Sandboxes restored (or started) at once on this host: `fork --count N` queues the rest.
    pub restore_slots: usize,
    /// Live episodes on this host; create and fork beyond it are refused.
    pub max_episodes: usize,
    /// Size cap of each sandbox's root filesystem; 0: none.
    pub disk_bytes: u64,
    /// Memory that warm copies (Prepare) may hold in all; 0: no warm copies.
    pub warm_budget_bytes: u64,
}

/// What a fork made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForkOutcome {
    pub ids: Vec<EpisodeId>,
    /// How many of them took a warm copy (the first ones).
    pub warm: usize,
}

/// Thaws warm copy `c` as episode `id`'s sandbox and records it.
async fn adopt(s: &Arc<Shared>, id: &EpisodeId, c: &warm::WarmCopy) -> Result<()> {
    let (parts, v) = (s.parts.clone(), c.volume.clone());
    blocking(move || parts.runtime.freeze(&v, false)).await?;
    s.tree.set_volume(id, Some(c.volume.to_string()))?;
    Ok(())
}

/// What a prepare left ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Copies of the node ready now.
    pub ready: u32,
    /// Their memory, and every warm copy's.
    pub node_bytes: u64,
    pub total_bytes: u64,
    /// Copies of other nodes evicted to make room.
    pub evicted: u32,
}

/// What the episode's shell starts with, under the image's own environment.
pub const DEFAULT_ENV: &[(&str, &str)] = &[
    ("HOME", "/root"),
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
];

/// Longest command a step takes: it reaches the turn's shell as one environment string, which
/// the kernel caps at 32 pages (MAX_ARG_STRLEN), name included.
pub const MAX_COMMAND_BYTES: usize = 128 * 1024 - 64;
/// Largest file a write or read moves, and the largest stdin.
pub const MAX_FILE_BYTES: u64 = 32 << 20;
/// Largest environment a step may set for itself.
pub const MAX_ENV_BYTES: usize = 120 * 1024;
/// Longest working directory.
pub const MAX_CWD_BYTES: usize = 4096;
/// Most copies one fork makes.
pub const MAX_FORK_COUNT: u32 = 64;

/// What an image's config says an episode starts with (OCI `Env`, `WorkingDir`, `User`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<(u32, u32)>,
    /// The image's content digest (node bundles), once computed; a rebuilt image's config has
    /// none until the next export or import computes it.
    #[serde(default)]
    pub digest: Option<String>,
}

/// The parts the engine drives.
#[derive(Clone)]
pub struct Parts {
    pub runtime: Arc<dyn SandboxRuntime>,
    pub checkpointer: Arc<dyn Checkpointer>,
    pub inspector: Arc<dyn Inspector>,
    pub files: Arc<dyn NodeFiles>,
}

/// What every actor and checkpoint task shares.
pub(crate) struct Shared {
    pub tree: Arc<Tree>,
    pub storage: Arc<dyn SnapshotBackend>,
    pub parts: Parts,
    pub config: Config,
    pub timings: Arc<Timings>,
    /// Episode id → its actor. Never held across an await.
    pub registry: StdMutex<HashMap<EpisodeId, actor::Handle>>,
    /// Running sandboxes, and reservations for ones being made (admission).
    pub live: AtomicUsize,
    /// Checkpoints in flight, each with a flag set when it has committed or failed.
    pub in_flight: StdMutex<HashMap<NodeId, tokio::sync::watch::Receiver<bool>>>,
    /// The host-wide checkpoint queue.
    pub sched: sched::Scheduler<CheckpointWork>,
    pub restores: Arc<Semaphore>,
    /// Warm copies by node.
    pub warm: StdMutex<warm::WarmPool>,
    /// Cleanup left to run after an answer: replaced volumes and garbage.
    pub background: StdMutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Fs verdicts refuted since start: no snapshot taken, the turn shares its parent's node.
    pub refuted: std::sync::atomic::AtomicU64,
}

/// The engine. Cheap to share: `Arc<Engine>`.
pub struct Engine {
    shared: Arc<Shared>,
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("task panicked: {e}"))?
        .map_err(EngineError::Internal)
}

/// A hold on `n` live-episode places; given back on drop unless kept.
pub(crate) struct Admission<'a> {
    live: &'a AtomicUsize,
    n: usize,
}

impl Admission<'_> {
    /// One place is now a running sandbox.
    pub fn keep_one(&mut self) {
        self.n -= 1;
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.live.fetch_sub(self.n, Ordering::SeqCst);
    }
}

impl Engine {
    pub fn new(
        tree: Tree,
        storage: Arc<dyn SnapshotBackend>,
        parts: Parts,
        config: Config,
    ) -> anyhow::Result<Engine> {
        std::fs::create_dir_all(config.data_dir.join("images"))?;
        Ok(Engine {
            shared: Arc::new(Shared {
                tree: Arc::new(tree),
                storage,
                parts,
                sched: sched::Scheduler::new(
                    config.scheduler,
                    config.checkpoint_slots.max(1),
                    config.checkpoint_express,
                ),
                restores: Arc::new(Semaphore::new(config.restore_slots.max(1))),
                config,
                timings: Arc::default(),
                registry: StdMutex::default(),
                live: AtomicUsize::new(0),
                in_flight: StdMutex::default(),
                warm: StdMutex::default(),
                background: StdMutex::default(),
                refuted: Default::default(),
            }),
        })
    }

    pub fn tree(&self) -> &Tree {
        &self.shared.tree
    }

    pub fn storage(&self) -> &Arc<dyn SnapshotBackend> {
        &self.shared.storage
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn inspector(&self) -> &dyn Inspector {
        self.shared.parts.inspector.as_ref()
    }

    pub fn timings(&self) -> &Timings {
        &self.shared.timings
    }

    /// Running sandboxes.
    pub fn live_episodes(&self) -> usize {
        self.shared
            .registry
            .lock()
            .expect("registry lock")
            .values()
            .filter(|h| h.is_live())
            .count()
    }

    /// Crash recovery at start: stop episodes whose sandboxes died, and remove orphans (leftover
    /// sandboxes, volumes, unreferenced snapshots and CRIU images, abandoned pending nodes).
    pub fn reconcile(&self) -> anyhow::Result<String> {
        let s = &self.shared;
        let reaped = s.parts.runtime.reap_leftovers();
        // A running episode without a volume never got its sandbox: a create or fork was cut
        // off before it answered, so no client knows the id. Drop it, or it would pin the
        // snapshots and images it was forked from.
        let mut unborn = 0usize;
        for ep in s.tree.list_episodes(false)? {
            if ep.status == EpisodeStatus::Running && ep.volume.is_none() {
                s.tree.delete_episode(&ep.id)?;
                unborn += 1;
            }
        }
        let report = s.tree.reconcile()?;
        let mut referenced: std::collections::HashSet<(String, String)> = Default::default();
        let mut images: std::collections::HashSet<String> = Default::default();
        for n in s.tree.all_nodes()? {
            if matches!(n.state, NodeState::Committed) {
                if let Some(snap) = &n.snapshot {
                    referenced.insert((snap.volume.clone(), snap.snap.clone()));
                }
                if let Some(i) = &n.images {
                    images.insert(i.clone());
                }
            }
        }
        let mut removed = 0usize;
        for e in s.storage.list()? {
            match e {
                sandtree_storage::Entry::Volume { name } => {
                    s.storage.destroy_volume(&name)?;
                    removed += 1;
                }
                sandtree_storage::Entry::Snapshot { volume, name }
                    if !referenced.contains(&(volume.clone(), name.clone())) =>
                {
                    s.storage.destroy_snapshot(&volume, &name)?;
                    removed += 1;
                }
                _ => {}
            }
        }
        for ep in s.tree.list_episodes(false)? {
            if ep.volume.is_some() {
                s.tree.set_volume(&ep.id, None)?;
            }
        }
        if let Ok(rd) = std::fs::read_dir(s.config.data_dir.join("images")) {
            for d in rd.flatten() {
                let path = d.path();
                if path.file_name().is_some_and(|n| n == "failed-logs") {
                    continue;
                }
                if !images.contains(&path.to_string_lossy().into_owned()) {
                    s.parts.checkpointer.remove(&path);
                    removed += 1;
                }
            }
        }
        removed += bundle::clear_staging(&s.config.data_dir);
        s.storage.gc()?;
        Ok(format!(
            "reconciled: {} sandboxes reaped, {unborn} unborn episodes dropped, {} episodes stopped, {} pending nodes abandoned, {} orphans removed",
            reaped,
            report.stopped.len(),
            report.abandoned.len(),
            removed
        ))
    }

    fn image_config_path(&self, image: &str) -> PathBuf {
        self.shared
            .config
            .data_dir
            .join("image-config")
            .join(format!("{image}.json"))
    }

    /// Keeps what an image's config says an episode starts with (written durably, replaced
    /// whole).
    pub fn save_image_config(&self, image: &str, config: &ImageConfig) -> anyhow::Result<()> {
        use std::io::Write;
        let path = self.image_config_path(image);
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(config)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
        // image-config/ itself, made by the first image, in the data dir.
        std::fs::File::open(dir.parent().expect("in the data dir"))?.sync_all()?;
        Ok(())
    }

    /// The image's config, or the default (root in /, no extra env) for images without one.
    pub(crate) fn image_config(&self, image: &str) -> Result<ImageConfig> {
        match std::fs::read(self.image_config_path(image)) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                EngineError::Internal(anyhow!("image {image}: its config is unreadable: {e}"))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(EngineError::Internal(anyhow!(
                "image {image}: cannot read its config: {e}"
            ))),
        }
    }

    /// Reserves `n` live-episode places under `--max-episodes`, or refuses.
    fn admit(&self, n: usize) -> Result<Admission<'_>> {
        let max = self.shared.config.max_episodes;
        let before = self.shared.live.fetch_add(n, Ordering::SeqCst);
        let adm = Admission {
            live: &self.shared.live,
            n,
        };
        if before + n > max {
            drop(adm);
            return Err(EngineError::Exhausted(format!(
                "{before} episodes are live or starting and this host takes at most {max} \
                 (--max-episodes): delete some first"
            )));
        }
        Ok(adm)
    }

    /// The limits a create request asks for, checked against the service's (each is also the
    /// maximum); zeros take the service's value. None when nothing was asked.
    pub fn episode_limits(
        &self,
        memory_mib: u64,
        pids: u64,
        cpus: f64,
    ) -> Result<Option<SandboxLimits>> {
        if memory_mib == 0 && pids == 0 && cpus == 0.0 {
            return Ok(None);
        }
        let max = self.shared.parts.runtime.max_limits();
        let memory_bytes = match memory_mib {
            0 => max.memory_bytes,
            m if m < 16 => {
                return Err(EngineError::BadRequest(format!(
                    "memory_mib {m} is below the 16 MiB a sandbox needs"
                )))
            }
            m if m.saturating_mul(1 << 20) > max.memory_bytes => {
                return Err(EngineError::BadRequest(format!(
                    "memory_mib {m} is over this server's maximum of {} MiB (--sandbox-memory-mib)",
                    max.memory_bytes >> 20
                )))
            }
            m => m << 20,
        };
        let pids = match pids {
            0 => max.pids,
            p if p < 8 || p > max.pids => {
                return Err(EngineError::BadRequest(format!(
                    "pids {p} must be between 8 and this server's maximum of {} (--sandbox-pids)",
                    max.pids
                )))
            }
            p => p,
        };
        let period = ports::CPU_PERIOD_US as f64;
        let cpu_quota_us = if cpus == 0.0 {
            max.cpu_quota_us
        } else if !(cpus.is_finite() && cpus >= 0.01 && cpus * period <= max.cpu_quota_us as f64) {
            return Err(EngineError::BadRequest(format!(
                "cpus {cpus} must be between 0.01 and this server's maximum of {} (--sandbox-cpus)",
                max.cpu_quota_us as f64 / period
            )));
        } else {
            (cpus * period) as u64
        };
        Ok(Some(SandboxLimits {
            memory_bytes,
            pids,
            cpu_quota_us,
        }))
    }

    pub async fn create(
        &self,
        image: &str,
        policy: Policy,
        meta: EpisodeMeta,
    ) -> Result<EpisodeId> {
        validate_labels(&meta.labels)?;
        let mut admission = self.admit(1)?;
        let storage = self.shared.storage.clone();
        let img = image.to_string();
        if !blocking(move || Ok(storage.has_base(&img)?)).await? {
            return Err(EngineError::NotFound(format!(
                "unknown image {image}: build it with `sandtree image build {image}` or import it"
            )));
        }
        let cfg = self.image_config(image)?;
        let env = actor::merge_env(
            &DEFAULT_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
            &cfg.env,
        );
        let mut meta = meta;
        meta.user = cfg.user;
        let cwd = cfg.working_dir.clone().unwrap_or_else(|| "/".into());
        let tree = &self.shared.tree;
        let ep = tree.create_episode_with(image, policy, env, cwd, meta)?;
        let (ep, node, session) = tree.rewind(&ep.id, 0)?;
        let volume = VolumeName::first(&ep.id);
        match materialize(&self.shared, &node, &volume, ep.meta.limits).await {
            Ok(()) => {
                admission.keep_one();
                actor::spawn(&self.shared, &ep, Some(volume), session, 0);
                Ok(ep.id)
            }
            Err(e) => {
                let _ = tree.delete_episode(&ep.id);
                Err(e)
            }
        }
    }

    pub async fn step(
        &self,
        id: &EpisodeId,
        command: String,
        opts: StepOptions,
        chunks: Option<tokio::sync::mpsc::UnboundedSender<Chunk>>,
    ) -> Result<StepOutcome> {
        actor::check_command(&command)?;
        opts.validate(self.shared.config.out_cap)?;
        let t = Instant::now();
        let out = actor::call(&self.shared, id, |reply| actor::Command::Step {
            command,
            opts,
            chunks,
            reply,
        })
        .await?;
        metrics::histogram!(stats::STEP).record(t.elapsed().as_secs_f64());
        metrics::histogram!(stats::STEP_CHECKPOINT_WAIT).record(out.waited_us as f64 / 1e6);
        Ok(out)
    }

    /// Writes `data` to `path` inside the sandbox as a turn of its own (with its verdict and
    /// checkpoint, so fork and rewind see it like any other effect).
    pub async fn write_file(
        &self,
        id: &EpisodeId,
        path: String,
        data: Vec<u8>,
        mode: u32,
    ) -> Result<StepOutcome> {
        check_path(&path)?;
        if data.len() as u64 > MAX_FILE_BYTES {
            return Err(EngineError::BadRequest(format!(
                "file is {} bytes; the limit is {MAX_FILE_BYTES} bytes",
                data.len(),
            )));
        }
        if mode > 0o7777 {
            return Err(EngineError::BadRequest(format!(
                "mode {mode:o} is not a set of permission bits"
            )));
        }
        actor::call(&self.shared, id, |reply| actor::Command::WriteFile {
            path,
            data,
            mode,
            reply,
        })
        .await
    }

    /// Reads up to `max_bytes` of `path` inside the sandbox (not a turn). Returns the bytes and
    /// the file's size.
    pub async fn read_file(
        &self,
        id: &EpisodeId,
        path: String,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, u64)> {
        check_path(&path)?;
        let max_bytes = match max_bytes {
            0 => MAX_FILE_BYTES,
            m if m > MAX_FILE_BYTES => {
                return Err(EngineError::BadRequest(format!(
                    "max_bytes {m} is over the limit of {MAX_FILE_BYTES} bytes"
                )))
            }
            m => m,
        };
        actor::call(&self.shared, id, |reply| actor::Command::ReadFile {
            path,
            max_bytes,
            reply,
        })
        .await
    }

    /// Forks `count` copies of `src` at `turn` ([`Engine::fork_with`], no refill).
    pub async fn fork(&self, src: &EpisodeId, turn: u32, count: u32) -> Result<Vec<EpisodeId>> {
        Ok(self.fork_with(src, turn, count, 0).await?.ids)
    }

    /// Forks `count` copies of `src` at `turn`, taking warm copies first; with `keep_warm` > 0
    /// the node's copies are refilled to that many in the background afterwards.
    pub async fn fork_with(
        &self,
        src: &EpisodeId,
        turn: u32,
        count: u32,
        keep_warm: u32,
    ) -> Result<ForkOutcome> {
        if count == 0 || count > MAX_FORK_COUNT {
            return Err(EngineError::BadRequest(format!(
                "fork count must be 1..={MAX_FORK_COUNT}, got {count}"
            )));
        }
        let t = Instant::now();
        let mut admission = self.admit(count as usize)?;
        precheck(&self.shared.tree, src, turn)?;
        // The source's actor plans the forks after its pending checkpoint, so a fork never
        // interleaves with a step of its source.
        let forks = actor::call(&self.shared, src, |reply| actor::Command::Fork {
            turn,
            count,
            reply,
        })
        .await?;
        // The copies are cloned and restored concurrently (each in its own cgroup and
        // namespaces), up to the host's restore slots; the rest queue.
        let shared = &self.shared;
        let warm_node = forks.first().map(|(_, n, _)| n.id);
        let results = futures_util::future::join_all(forks.into_iter().map(
            |(ep, node, session)| async move {
                // A warm copy of the node, if one is ready: it becomes this episode's sandbox.
                let copy = shared
                    .warm
                    .lock()
                    .expect("warm lock")
                    .take(node.id, ep.meta.limits);
                if let Some(c) = copy {
                    match adopt(shared, &ep.id, &c).await {
                        Ok(()) => return Ok((ep, c.volume, session, true)),
                        Err(e) => {
                            warn!(copy = %c.volume, error = %e, "a warm copy could not be adopted; forking cold");
                            let s2 = shared.clone();
                            let _ = tokio::task::spawn_blocking(move || destroy_copies(&s2, vec![c])).await;
                        }
                    }
                }
                let volume = VolumeName::first(&ep.id);
                match materialize(shared, &node, &volume, ep.meta.limits).await {
                    Ok(()) => Ok((ep, volume, session, false)),
                    Err(e) => {
                        let _ = shared.tree.delete_episode(&ep.id);
                        Err(e)
                    }
                }
            },
        ))
        .await;
        let warm = results
            .iter()
            .filter(|r| matches!(r, Ok((_, _, _, true))))
            .count();
        let mut ids = Vec::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok((ep, volume, session, _)) => {
                    admission.keep_one();
                    actor::spawn(shared, &ep, Some(volume), session, turn);
                    ids.push(ep.id);
                }
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if let Some(e) = first_err {
            for id in &ids {
                let _ = self.delete(id).await;
            }
            return Err(e);
        }
        let kind = if warm == ids.len() { "warm" } else { "cold" };
        metrics::histogram!(stats::FORK, "kind" => kind).record(t.elapsed().as_secs_f64());
        metrics::counter!(stats::WARM_HITS).increment(warm as u64);
        metrics::counter!(stats::WARM_MISSES).increment((ids.len() - warm) as u64);
        if let (Some(node), n) = (warm_node, keep_warm) {
            if n > 0 {
                // The fork's hint: refill the node's copies while the trainer goes on.
                let (engine, src) = (self.clone_handle(), src.clone());
                let h = tokio::spawn(async move {
                    if let Err(e) = engine.prepare_node(&src, node, n).await {
                        warn!(episode = %src, node = %node, error = %e, "keeping warm copies after a fork failed");
                    }
                });
                drop(h);
            }
        }
        Ok(ForkOutcome { ids, warm })
    }

    fn clone_handle(&self) -> Engine {
        Engine {
            shared: self.shared.clone(),
        }
    }

    /// Keeps `count` warm copies of the node at `turn` of `id` ready (fewer: the extra ones are
    /// destroyed; 0 drops them all). Each is a cloned snapshot with the node's CRIU image
    /// restored into a frozen cgroup. Answers once they are ready.
    pub async fn prepare(&self, id: &EpisodeId, turn: u32, count: u32) -> Result<Prepared> {
        if count > MAX_FORK_COUNT {
            return Err(EngineError::BadRequest(format!(
                "prepare count must be 0..={MAX_FORK_COUNT}, got {count}"
            )));
        }
        if count > 0 && self.shared.config.warm_budget_bytes == 0 {
            return Err(EngineError::Precondition(
                "warm copies are off on this service (serve --warm-budget-mib 0)".into(),
            ));
        }
        precheck(&self.shared.tree, id, turn)?;
        // The node at that turn once the pending checkpoint settled.
        let handle = actor::handle_for(&self.shared, id)?;
        handle.settle().await;
        let node = preflight(&self.shared.tree, id, turn)?;
        self.prepare_node(id, node.id, count).await
    }

    async fn prepare_node(&self, id: &EpisodeId, node: NodeId, count: u32) -> Result<Prepared> {
        let s = &self.shared;
        let node = s.tree.node(node)?;
        let limits = s.tree.episode(id)?.meta.limits;
        let extra = s
            .warm
            .lock()
            .expect("warm lock")
            .trim(node.id, count as usize);
        let mut evicted = 0u32;
        if !extra.is_empty() {
            let s2 = s.clone();
            let _ = tokio::task::spawn_blocking(move || destroy_copies(&s2, extra)).await;
        }
        loop {
            let (ready, estimate) = {
                let mut w = s.warm.lock().expect("warm lock");
                w.touch(node.id);
                let ready = w.ready(node.id);
                (ready, w.bytes_of(node.id) / ready.max(1) as u64)
            };
            if ready >= count as usize {
                break;
            }
            // Room for one more copy, estimated as the node's copies so far weigh.
            let budget = s.config.warm_budget_bytes;
            let (gone, fits) = s
                .warm
                .lock()
                .expect("warm lock")
                .evict_for(estimate, budget, node.id);
            evicted += gone.len() as u32;
            if !gone.is_empty() {
                let s2 = s.clone();
                let _ = tokio::task::spawn_blocking(move || destroy_copies(&s2, gone)).await;
            }
            if !fits {
                return Err(EngineError::Exhausted(format!(
                    "warm budget: {ready} copies of node {} ({} B) fill --warm-budget-mib ({budget} B)",
                    node.id,
                    s.warm.lock().expect("warm lock").bytes_of(node.id)
                )));
            }
            let volume = s.warm.lock().expect("warm lock").name(node.id);
            make_sandbox(s, &node, &volume, limits, true).await?;
            let (parts, v2) = (s.parts.clone(), volume.clone());
            let frozen = blocking(move || {
                parts.runtime.freeze(&v2, true)?;
                Ok(parts.runtime.memory_rss(&v2).unwrap_or(0))
            })
            .await;
            let bytes = match frozen {
                Ok(b) => b,
                Err(e) => {
                    let s2 = s.clone();
                    let c = warm::WarmCopy {
                        volume,
                        bytes: 0,
                        limits,
                    };
                    let _ = tokio::task::spawn_blocking(move || destroy_copies(&s2, vec![c])).await;
                    return Err(e);
                }
            };
            let copy = warm::WarmCopy {
                volume,
                bytes,
                limits,
            };
            let over = {
                let mut w = s.warm.lock().expect("warm lock");
                w.insert(node.id, copy);
                w.bytes() > budget
            };
            if over {
                // Measured heavier than estimated: make room, or give this copy back.
                let (gone, fits) = s
                    .warm
                    .lock()
                    .expect("warm lock")
                    .evict_for(0, budget, node.id);
                evicted += gone.len() as u32;
                let mut gone = gone;
                if !fits {
                    gone.extend(s.warm.lock().expect("warm lock").trim(node.id, ready));
                }
                let s2 = s.clone();
                let _ = tokio::task::spawn_blocking(move || destroy_copies(&s2, gone)).await;
                if !fits {
                    return Err(EngineError::Exhausted(format!(
                        "warm budget: a copy of node {} holds {bytes} B; {ready} fit in --warm-budget-mib ({budget} B)",
                        node.id
                    )));
                }
            }
        }
        let w = s.warm.lock().expect("warm lock");
        Ok(Prepared {
            ready: w.ready(node.id) as u32,
            node_bytes: w.bytes_of(node.id),
            total_bytes: w.bytes(),
            evicted,
        })
    }

    /// Warm copies now, and what forks found.
    pub fn warm_counts(&self) -> warm::WarmCounts {
        self.shared.warm.lock().expect("warm lock").counts()
    }

    pub async fn rewind(&self, id: &EpisodeId, turn: u32) -> Result<()> {
        let t = Instant::now();
        precheck(&self.shared.tree, id, turn)?;
        // A stopped episode takes a live place again; a live one keeps its own.
        let live = self
            .shared
            .registry
            .lock()
            .expect("registry lock")
            .get(id)
            .is_some_and(|h| h.is_live());
        let mut admission = if live { None } else { Some(self.admit(1)?) };
        let became_live = actor::call(&self.shared, id, |reply| actor::Command::Rewind {
            turn,
            reply,
        })
        .await?;
        if became_live {
            match admission.as_mut() {
                Some(a) => a.keep_one(),
                // It stopped between the check and the rewind: count it now.
                None => {
                    self.shared.live.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        metrics::histogram!(stats::REWIND).record(t.elapsed().as_secs_f64());
        Ok(())
    }

    /// Anonymous memory (RSS) of each running sandbox now, by episode: a cgroup read, not a
    /// command, so it never waits for an actor.
    pub fn sandbox_memory(&self) -> Result<Vec<(EpisodeId, u64)>> {
        let mut out = Vec::new();
        for ep in self.shared.tree.list_episodes(false)? {
            if ep.status != EpisodeStatus::Running {
                continue;
            }
            let Some(v) = ep.volume.as_deref().and_then(VolumeName::parse) else {
                continue;
            };
            if let Some(b) = self.shared.parts.runtime.memory_rss(&v) {
                out.push((ep.id, b));
            }
        }
        Ok(out)
    }

    /// Sets the gauges (live episodes, checkpoint queue) to their values now: call before
    /// rendering the metrics.
    pub fn publish_gauges(&self) {
        let c = self.shared.sched.counts();
        metrics::gauge!(stats::LIVE_EPISODES).set(self.live_episodes() as f64);
        metrics::gauge!(stats::QUEUE_DEPTH).set(c.queued as f64);
        metrics::gauge!(stats::CHECKPOINTS_RUNNING).set(c.running as f64);
        let w = self.warm_counts();
        metrics::gauge!(stats::WARM_COPIES).set(w.copies as f64);
        metrics::gauge!(stats::WARM_BYTES).set(w.bytes as f64);
        if let Ok(m) = self.sandbox_memory() {
            metrics::gauge!(stats::SANDBOX_MEMORY)
                .set(m.iter().map(|(_, b)| *b as f64).sum::<f64>());
        }
    }

    /// Fs verdicts refuted since start: turns whose fs node was dropped because the storage
    /// layer saw no change (each a snapshot not taken).
    pub fn fs_verdicts_refuted(&self) -> u64 {
        self.shared.refuted.load(Ordering::Relaxed)
    }

    /// The checkpoint scheduler's discipline, cap and counters.
    pub fn scheduler(&self) -> (Discipline, usize, sched::Counts) {
        let s = &self.shared.sched;
        (s.discipline(), s.cap(), s.counts())
    }

    pub async fn delete(&self, id: &EpisodeId) -> Result<()> {
        if self.shared.tree.episode(id)?.status == EpisodeStatus::Deleted {
            return Err(TreeError::EpisodeDeleted(id.clone()).into());
        }
        settle_background(&self.shared).await;
        actor::call(&self.shared, id, |reply| actor::Command::Delete { reply }).await?;
        self.gc().await;
        Ok(())
    }

    /// Frees the snapshots and images of nodes that nothing live can reach any more.
    pub async fn gc(&self) {
        let s = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || collect_garbage(&s)).await;
    }

    /// Waits for the episode's pending checkpoint, if it has an actor.
    async fn settle(&self, id: &EpisodeId) {
        let handle = self
            .shared
            .registry
            .lock()
            .expect("registry lock")
            .get(id)
            .cloned();
        if let Some(h) = handle {
            h.settle().await;
        }
    }

    /// Turns on the live path of an episode with their nodes (waits for a pending checkpoint).
    pub async fn tree_view(
        &self,
        id: &EpisodeId,
    ) -> Result<(
        sandtree_branching::Episode,
        Vec<(TurnRecord, Node, TurnKind)>,
    )> {
        self.settle(id).await;
        let tree = &self.shared.tree;
        let ep = tree.episode(id)?;
        let turns = tree.turns(id)?;
        let mut out = Vec::with_capacity(turns.len());
        for (i, t) in turns.iter().enumerate() {
            let node = tree.node(t.node)?;
            let kind =
                sandtree_branching::turn_kind(t, i.checked_sub(1).map(|j| &turns[j]), &node.kind);
            out.push((t.clone(), node, kind));
        }
        Ok((ep, out))
    }

    /// The whole tree of `id`'s fork family, each record with its node and kind.
    pub async fn family_view(
        &self,
        id: &EpisodeId,
    ) -> Result<(sandtree_branching::Family, Vec<(Node, TurnKind)>)> {
        self.settle(id).await;
        let tree = &self.shared.tree;
        let fam = tree.family(id)?;
        let by_id: HashMap<_, _> = fam.turns.iter().map(|t| (t.record.id, &t.record)).collect();
        let mut out = Vec::with_capacity(fam.turns.len());
        for t in &fam.turns {
            let node = tree.node(t.record.node)?;
            let parent = t.record.parent.and_then(|p| by_id.get(&p).copied());
            let kind = sandtree_branching::turn_kind(&t.record, parent, &node.kind);
            out.push((node, kind));
        }
        Ok((fam, out))
    }

    /// Waits until every checkpoint in flight now has committed or failed, and every rewind's
    /// cleanup, without asking any actor (a step running meanwhile does not hold this up).
    pub async fn settle_checkpoints(&self) {
        settle_background(&self.shared).await;
        let waiting: Vec<tokio::sync::watch::Receiver<bool>> = self
            .shared
            .in_flight
            .lock()
            .expect("in-flight lock")
            .values()
            .cloned()
            .collect();
        for mut rx in waiting {
            let _ = rx.wait_for(|done| *done).await;
        }
    }

    /// What each episode's checkpoints cost (after the checkpoints in flight settle).
    pub async fn charges(&self) -> Result<Vec<(sandtree_branching::Episode, EpisodeCharges)>> {
        self.settle_checkpoints().await;
        stats::charges(&self.shared.tree)
    }

    /// Stops every sandbox (service shutdown). Nodes stay forkable.
    pub async fn shutdown(&self) {
        settle_background(&self.shared).await;
        let all: Vec<actor::Handle> = self
            .shared
            .registry
            .lock()
            .expect("registry lock")
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in all {
            h.shutdown().await;
        }
        settle_background(&self.shared).await;
        let copies = self.shared.warm.lock().expect("warm lock").drain();
        let s = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || destroy_copies(&s, copies)).await;
        self.shared.parts.runtime.release();
    }
}

/// What fork and rewind can refuse before the episode's actor waits for its pending
/// checkpoint: a deleted episode, a turn past the head, and policy none (which keeps no
/// checkpoint after turn 0) asked for a later turn.
pub(crate) fn precheck(tree: &Tree, id: &EpisodeId, turn: u32) -> Result<()> {
    let ep = tree.episode(id)?;
    if ep.status == EpisodeStatus::Deleted {
        return Err(TreeError::EpisodeDeleted(id.clone()).into());
    }
    // A turn past the head is out of range first.
    tree.turn(id, turn)?;
    if ep.policy == Policy::None && turn > 0 {
        return Err(EngineError::NotRestorable(format!(
            "episode {id} runs with policy none, which keeps no checkpoint after turn 0: \
             turn {turn} cannot be restored (fork or rewind to turn 0, or use policy auto)"
        )));
    }
    Ok(())
}

/// The one fork/rewind preflight, run by the episode's actor after its pending checkpoint has
/// settled and before anything is torn down: [`precheck`], then the node to restore must be
/// committed.
pub(crate) fn preflight(tree: &Tree, id: &EpisodeId, turn: u32) -> Result<Node> {
    precheck(tree, id, turn)?;
    Ok(tree.restorable_turn(id, turn)?)
}

/// Makes volume `volume` and its sandbox holding `node`'s state, and records the volume as the
/// episode's.
pub(crate) async fn materialize(
    s: &Arc<Shared>,
    node: &Node,
    volume: &VolumeName,
    limits: Option<SandboxLimits>,
) -> Result<()> {
    make_sandbox(s, node, volume, limits, false).await?;
    s.tree
        .set_volume(&volume.episode, Some(volume.to_string()))?;
    Ok(())
}

/// Makes volume `volume` and its sandbox holding `node`'s state (a restore slot is held
/// meanwhile); on failure nothing of it is left. `warm`: a warm copy (KSM merging asked for).
pub(crate) async fn make_sandbox(
    s: &Arc<Shared>,
    node: &Node,
    volume: &VolumeName,
    limits: Option<SandboxLimits>,
    warm: bool,
) -> Result<()> {
    let limits = limits.map(|l| Limits {
        memory_bytes: l.memory_bytes,
        pids: l.pids,
        cpu_quota_us: l.cpu_quota_us,
    });
    let (storage, parts, vol) = (s.storage.clone(), s.parts.clone(), volume.clone());
    let node = node.clone();
    let timings = s.timings.clone();
    let disk_bytes = s.config.disk_bytes;
    let _slot = s
        .restores
        .acquire()
        .await
        .expect("restore slots are never closed");
    blocking(move || {
        let t = Instant::now();
        let name = vol.to_string();
        let root = match (&node.kind, &node.snapshot) {
            (NodeKind::Base { image }, _) => storage.create_volume(&name, image)?,
            (_, Some(snap)) => storage.clone_snapshot(&snap.volume, &snap.snap, &name)?,
            (_, None) => anyhow::bail!("checkpoint node {} has no snapshot", node.id),
        };
        if disk_bytes > 0 {
            if let Err(e) = storage.set_quota(&name, disk_bytes) {
                let _ = storage.destroy_volume(&name);
                return Err(anyhow::Error::from(e).context(format!("limit volume {name}'s disk")));
            }
        }
        let restored = matches!(node.kind, NodeKind::Full);
        let started = match (&node.kind, &node.images) {
            (NodeKind::Full, Some(images)) => parts
                .checkpointer
                .restore(&vol, Path::new(images), &root, limits, warm)
                .map(|r| timings.record_criu_restore(r.criu_ms)),
            (NodeKind::Full, None) => {
                Err(anyhow!("checkpoint node {} has no CRIU images", node.id))
            }
            _ => parts.runtime.start(&vol, &root, limits),
        };
        match started {
            Ok(()) => {
                timings.record_restore(t.elapsed().as_secs_f64() * 1e3);
                parts.inspector.attach(&vol, restored);
                Ok(())
            }
            Err(e) => {
                let _ = storage.destroy_volume(&name);
                Err(e.context(format!("start sandbox {name} from node {}", node.id)))
            }
        }
    })
    .await?;
    Ok(())
}

/// Kills warm copies and removes their volumes (blocking); logs what fails (a restart's
/// reconcile removes what is left).
pub(crate) fn destroy_copies(s: &Shared, copies: Vec<warm::WarmCopy>) {
    for c in copies {
        let name = c.volume.to_string();
        if let Err(e) = s.parts.runtime.destroy(&c.volume) {
            warn!(copy = %name, error = %e, "cannot stop a warm copy");
            continue;
        }
        s.parts.inspector.detach(&c.volume);
        if let Err(e) = s.storage.destroy_volume(&name) {
            warn!(copy = %name, error = %e, "cannot destroy a warm copy's volume");
        }
    }
}

/// Destroys `volume` (if any) and collects garbage on a background task.
pub(crate) fn cleanup_in_background(s: &Arc<Shared>, volume: Option<VolumeName>) {
    let s2 = s.clone();
    let h = tokio::task::spawn_blocking(move || {
        if let Some(v) = volume {
            if let Err(e) = s2.storage.destroy_volume(&v.to_string()) {
                warn!(volume = %v, error = %e, "cannot destroy the volume a rewind replaced");
            }
        }
        collect_garbage(&s2);
    });
    let mut bg = s.background.lock().expect("background lock");
    bg.retain(|h| !h.is_finished());
    bg.push(h);
}

/// Waits for the cleanup that earlier rewinds left to the background.
pub(crate) async fn settle_background(s: &Shared) {
    loop {
        let pending: Vec<_> = s
            .background
            .lock()
            .expect("background lock")
            .drain(..)
            .collect();
        if pending.is_empty() {
            return;
        }
        for h in pending {
            if let Err(e) = h.await {
                warn!(error = %e, "background cleanup panicked");
            }
        }
    }
}

/// Frees the snapshots and images of nodes that nothing live can reach any more, then forgets
/// them in the tree; logs what it did (blocking).
pub(crate) fn collect_garbage(s: &Shared) {
    let r = (|| -> anyhow::Result<usize> {
        let garbage = s.tree.garbage()?;
        let mut freed = Vec::new();
        for n in garbage {
            if matches!(n.state, NodeState::Pending) {
                continue;
            }
            // Warm copies are clones of the node's snapshot: they go first.
            let copies = s.warm.lock().expect("warm lock").drop_node(n.id);
            destroy_copies(s, copies);
            if let Some(snap) = &n.snapshot {
                if let Err(e) = s.storage.destroy_snapshot(&snap.volume, &snap.snap) {
                    if !matches!(e, sandtree_storage::SnapshotError::NotFound { .. }) {
                        warn!(node = %n.id, error = %e, "cannot destroy snapshot");
                        continue;
                    }
                }
            }
            if let Some(i) = &n.images {
                s.parts.checkpointer.remove(Path::new(i));
            }
            freed.push(n.id);
        }
        s.tree.forget_nodes(&freed)?;
        s.storage.gc()?;
        Ok(freed.len())
    })();
    match r {
        Ok(n) if n > 0 => info!(nodes = n, "garbage collected"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "gc failed"),
    }
}

/// The nearest committed full node a sandbox state descends from: the image a new dump is
/// deduplicated against.
pub(crate) fn image_parent(tree: &Tree, from: Option<NodeId>) -> Option<(NodeId, PathBuf)> {
    let mut cur = from;
    while let Some(id) = cur {
        let n = tree.node(id).ok()?;
        if let (NodeKind::Full, NodeState::Committed, Some(i)) = (&n.kind, &n.state, &n.images) {
            return Some((id, PathBuf::from(i)));
        }
        cur = n.parent;
    }
    None
}

/// What taking one sandbox's checkpoint needs.
pub(crate) struct Checkpoint<'a> {
    pub storage: &'a dyn SnapshotBackend,
    pub parts: &'a Parts,
    pub timings: &'a Timings,
    pub sb: &'a VolumeName,
    /// Set when the sandbox could not be thawed after the checkpoint: the actor thaws it
    /// before its next command.
    pub thaw_failed: &'a std::sync::atomic::AtomicBool,
}

/// What a checkpoint task produced.
#[derive(Debug)]
pub(crate) enum Taken {
    /// The node's artifacts, durable.
    Node(NodeArtifacts),
    /// An fs node that is not needed: the storage layer saw no change in the volume since its
    /// latest snapshot (or its creation), which holds the parent node's state. Nothing was
    /// taken; the committing task re-points the turn to the parent node
    /// ([`Tree::refute_node`]).
    Refuted,
}

/// The reason a refuted turn's verdict gets.
pub(crate) const REFUTED: &str =
    "fs verdict refuted: the storage layer saw no change since the parent node; the turn shares it";

impl Checkpoint<'_> {
    /// Takes one node's checkpoint. fs: freeze, snapshot, thaw (or, when `refutable` and the
    /// volume did not change, nothing: [`Taken::Refuted`]). full: CRIU dump with the snapshot
    /// inside the post-dump notification, then (with `image_parent`) the pages equal to that
    /// image's are left out. Artifacts are durable before this returns.
    pub fn take(
        &self,
        kind: &NodeKind,
        node: NodeId,
        images: &Path,
        image_parent: Option<(NodeId, PathBuf, usize)>,
        refutable: bool,
    ) -> anyhow::Result<Taken> {
        let Checkpoint {
            storage,
            parts,
            timings,
            sb,
            thaw_failed,
        } = *self;
        let thaw = || {
            let r = parts.runtime.freeze(sb, false);
            if r.is_err() {
                thaw_failed.store(true, Ordering::SeqCst);
            }
            r
        };
        let vol = sb.to_string();
        let started = Instant::now();
        let snap = format!("n{}", node.0);
        let mut t = NodeTimings::default();
        let image_dumped_bytes;
        let mut image_parent_id = None;
        let (snap_bytes, image_bytes, images_path) = match kind {
            NodeKind::Fs => {
                let item = FsItem {
                    sb: sb.clone(),
                    node,
                    thaw_failed,
                    refutable,
                };
                return fs_batch(storage, parts, timings, &[item])
                    .pop()
                    .expect("one result per item");
            }
            NodeKind::Full => {
                // A task in vfork cannot be dumped: fail at once, before the inspector is
                // suspended and CRIU stops the sandbox for nothing.
                parts.checkpointer.seizable(sb)?;
                let mut info = None;
                // The inspector does not record while CRIU's parasite runs in the sandbox; the
                // sandbox is frozen before CRIU lets the processes go and thawed once the
                // inspector records again, so nothing they do after the dump is missed.
                let stats = parts.inspector.dump_window(sb, &mut || {
                    parts.checkpointer.dump(sb, images, &mut || {
                        info = Some(storage.snapshot(&vol, &snap)?);
                        parts.runtime.request_freeze(sb)?;
                        Ok(())
                    })
                });
                let thawed = thaw();
                let fail = |e: anyhow::Error, snapped: bool| {
                    parts
                        .checkpointer
                        .discard_failed(images, &format!("n{}-dump.log", node.0));
                    if snapped {
                        let _ = storage.destroy_snapshot(&vol, &snap);
                    }
                    Err(e)
                };
                let stats = match stats.and_then(|s| thawed.map(|()| s)) {
                    Ok(s) => s,
                    Err(e) => return fail(e, info.is_some()),
                };
                let Some(info) = info else {
                    return fail(
                        anyhow!("criu finished the dump without a post-dump notification"),
                        false,
                    );
                };
                image_dumped_bytes = stats.image_bytes;
                if let Some((pid, pdir, max_chain)) = &image_parent {
                    let d = Instant::now();
                    match parts.checkpointer.dedup(images, pdir, *max_chain) {
                        Ok(depth) if depth > 0 => {
                            image_parent_id = Some(*pid);
                            timings.record_dedup(d.elapsed().as_secs_f64() * 1e3);
                        }
                        Ok(_) => {}
                        Err(e @ ports::DedupError::Inconsistent(_)) => return fail(e.into(), true),
                        Err(e) => {
                            warn!(node = %node, parent = %pid, error = %e, "page dedup failed; the image is kept whole")
                        }
                    }
                }
                if let Err(e) = parts.checkpointer.make_durable(images) {
                    return fail(e, true);
                }
                t.snapshot_ms = stats.hook_ms as u64;
                t.dump_ms = (stats.dump_ms - stats.hook_ms).max(0.0) as u64;
                timings.record_dump(stats.dump_ms - stats.hook_ms);
                timings.record_snapshot(stats.hook_ms);
                // What the image keeps: CRIU's files, or after a dedup what is left of them.
                let kept = match image_parent_id {
                    Some(_) => parts.checkpointer.image_bytes(images),
                    None => stats.image_bytes,
                };
                (
                    info.bytes,
                    kept,
                    Some(images.to_string_lossy().into_owned()),
                )
            }
            NodeKind::Base { .. } => anyhow::bail!("base nodes are not checkpointed"),
        };
        // The snapshot is made durable before the node is committed.
        parts.runtime.sync_rootfs(sb)?;
        t.total_ms = started.elapsed().as_millis() as u64;
        timings.record_checkpoint(started.elapsed().as_secs_f64() * 1e3);
        Ok(Taken::Node(NodeArtifacts {
            snapshot: Some(SnapshotRef { volume: vol, snap }),
            images: images_path,
            bytes: snap_bytes + image_bytes,
            image_bytes,
            image_dumped_bytes,
            image_parent: image_parent_id,
            timings: Some(t),
        }))
    }
}

/// One sandbox's fs checkpoint in a batch.
pub(crate) struct FsItem<'a> {
    pub sb: VolumeName,
    pub node: NodeId,
    pub thaw_failed: &'a std::sync::atomic::AtomicBool,
    /// The node may be refuted: an fs node whose parent node is committed, so that the volume's
    /// latest snapshot (or, for a volume without one, its origin) holds the parent's state.
    pub refutable: bool,
}

/// Whether `vol` is unchanged since its latest snapshot, as far as the storage layer can say.
/// An error counts as changed: the snapshot is taken as before.
fn unchanged(storage: &dyn SnapshotBackend, vol: &VolumeName, node: NodeId) -> bool {
    match storage.changed_since_last_snapshot(&vol.to_string()) {
        Ok(changed) => !changed,
        Err(e) => {
            warn!(volume = %vol, node = %node, error = %e, "cannot tell whether the volume changed; taking the snapshot");
            false
        }
    }
}

/// Fs checkpoints of several sandboxes at one frozen instant each: first each refutable item
/// whose volume did not change is answered [`Taken::Refuted`] (no freeze, no snapshot); then
/// freeze the others, take their snapshots in one storage call, thaw them all, then make each
/// durable. Results are in order.
pub(crate) fn fs_batch(
    storage: &dyn SnapshotBackend,
    parts: &Parts,
    timings: &Timings,
    items: &[FsItem<'_>],
) -> Vec<anyhow::Result<Taken>> {
    // Unfrozen: a write after this check lands in the next turn's epoch (it began when the
    // command ended) and so in a later checkpoint; a write before it shows here.
    let mut out: Vec<Option<anyhow::Result<Taken>>> = items
        .iter()
        .map(|it| {
            (it.refutable && unchanged(storage, &it.sb, it.node)).then_some(Ok(Taken::Refuted))
        })
        .collect();
    let started = Instant::now();
    let mut frozen = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        match parts.runtime.freeze(&it.sb, true) {
            Ok(()) => frozen.push(i),
            Err(e) => out[i] = Some(Err(e)),
        }
    }
    let freeze_ms = started.elapsed().as_millis() as u64;
    let vols: Vec<(String, String)> = frozen
        .iter()
        .map(|&i| (items[i].sb.to_string(), format!("n{}", items[i].node.0)))
        .collect();
    let refs: Vec<(&str, &str)> = vols.iter().map(|(v, s)| (v.as_str(), s.as_str())).collect();
    let snap_started = Instant::now();
    let snaps = if refs.is_empty() {
        Vec::new()
    } else {
        storage.snapshot_many(&refs)
    };
    let snapshot_ms = snap_started.elapsed();
    for (k, (&i, r)) in frozen.iter().zip(snaps).enumerate() {
        let it = &items[i];
        let thawed = parts.runtime.freeze(&it.sb, false);
        if thawed.is_err() {
            it.thaw_failed.store(true, Ordering::SeqCst);
        }
        let (vol, snap) = vols[k].clone();
        out[i] = Some((|| {
            let info = r?;
            thawed.context("thaw after the snapshot")?;
            timings.record_snapshot(snapshot_ms.as_secs_f64() * 1e3);
            // The snapshot is made durable before the node is committed.
            parts.runtime.sync_rootfs(&it.sb)?;
            timings.record_checkpoint(started.elapsed().as_secs_f64() * 1e3);
            Ok(Taken::Node(NodeArtifacts {
                snapshot: Some(SnapshotRef { volume: vol, snap }),
                images: None,
                bytes: info.bytes,
                image_bytes: 0,
                image_dumped_bytes: 0,
                image_parent: None,
                timings: Some(NodeTimings {
                    freeze_ms,
                    snapshot_ms: snapshot_ms.as_millis() as u64,
                    total_ms: started.elapsed().as_millis() as u64,
                    ..Default::default()
                }),
            }))
        })());
    }
    out.into_iter()
        .map(|r| r.expect("every item has a result"))
        .collect()
}

/// A queued checkpoint: what taking it needs, and where its result goes.
pub(crate) struct CheckpointWork {
    pub sb: VolumeName,
    pub kind: NodeKind,
    /// The node's parent node (what the sandbox's volume held before the turn).
    pub parent: Option<NodeId>,
    pub images: PathBuf,
    pub image_parent: Option<(NodeId, PathBuf, usize)>,
    pub thaw_failed: Arc<std::sync::atomic::AtomicBool>,
    pub reply: tokio::sync::oneshot::Sender<anyhow::Result<Taken>>,
}

/// Starts every checkpoint batch the scheduler hands out now, each on a blocking thread; each
/// pumps again when it ends. Call after queueing or promoting a job.
pub(crate) fn pump(s: &Arc<Shared>) {
    while let Some(batch) = s.sched.next() {
        let s2 = s.clone();
        tokio::task::spawn_blocking(move || {
            let promoted = batch[0].promoted;
            let past_cap = batch[0].past_cap;
            let kind = batch[0].job.kind;
            let n = batch.len();
            let t = Instant::now();
            for b in &batch {
                s2.timings.record_queue_wait(b.queued.as_secs_f64() * 1e3);
            }
            if n > 1 {
                metrics::counter!(stats::BATCHES).increment(1);
            }
            if promoted {
                metrics::counter!(stats::PROMOTED).increment(1);
            }
            run_batch(&s2, batch);
            s2.sched
                .finished(past_cap, kind, t.elapsed().as_secs_f64() * 1e3 / n as f64);
            pump(&s2);
        });
    }
}

/// Whether an fs node may be refuted: only fs nodes (a full node also holds processes, which
/// may have changed), and only on a committed parent (the state the volume's latest snapshot or
/// its origin holds; a failed or collected parent's turn could not be restored).
fn refutable(s: &Shared, w: &CheckpointWork) -> bool {
    w.kind == NodeKind::Fs
        && w.parent.is_some_and(|p| {
            s.tree
                .node(p)
                .is_ok_and(|n| n.state == NodeState::Committed)
        })
}

fn run_batch(s: &Shared, batch: Vec<sched::Started<CheckpointWork>>) {
    let works: Vec<(NodeId, CheckpointWork)> =
        batch.into_iter().map(|b| (b.job.node, b.payload)).collect();
    if works.len() > 1 {
        let items: Vec<FsItem<'_>> = works
            .iter()
            .map(|(node, w)| FsItem {
                sb: w.sb.clone(),
                node: *node,
                thaw_failed: &w.thaw_failed,
                refutable: refutable(s, w),
            })
            .collect();
        let results = fs_batch(s.storage.as_ref(), &s.parts, &s.timings, &items);
        drop(items);
        for ((_, w), r) in works.into_iter().zip(results) {
            let _ = w.reply.send(r);
        }
        return;
    }
    for (node, w) in works {
        let refutable = refutable(s, &w);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Checkpoint {
                storage: s.storage.as_ref(),
                parts: &s.parts,
                timings: &s.timings,
                sb: &w.sb,
                thaw_failed: &w.thaw_failed,
            }
            .take(&w.kind, node, &w.images, w.image_parent.clone(), refutable)
        }))
        .unwrap_or_else(|_| Err(anyhow!("checkpoint panicked")));
        let _ = w.reply.send(r);
    }
}

/// Most labels an episode may have, and the longest key and value.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_BYTES: usize = 256;

pub fn validate_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(EngineError::BadRequest(format!(
            "{} labels; an episode takes at most {MAX_LABELS}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES {
            return Err(EngineError::BadRequest(format!(
                "label {k:?}: keys must be 1..={MAX_LABEL_BYTES} bytes and values at most {MAX_LABEL_BYTES}"
            )));
        }
    }
    Ok(())
}

fn check_path(path: &str) -> Result<()> {
    if path.is_empty() || path.contains('\0') || path.len() > 4096 {
        return Err(EngineError::BadRequest(format!(
            "path {path:?} must be 1..=4096 bytes with no NUL"
        )));
    }
    Ok(())
}
