//! The engine: episodes, turns and their checkpoints, over the tree (branching), the snapshot
//! backend (storage) and the runtime.
//!
//! Each live episode is owned by one async mutex; every operation on it (step, rewind, delete,
//! and fork *from* it) takes that mutex, so an episode's state machine is driven by one owner at a
//! time. A step returns its observation as soon as the command ends; that turn's checkpoint then
//! runs in the background on the host-scoped checkpoint scheduler, and the next operation on the
//! episode waits for it. Nothing else waits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Instant;

use anyhow::{anyhow, Context};
use sandtree_branching::{
    Episode, EpisodeId, EpisodeMeta, EpisodeStatus, NewTurn, Node, NodeArtifacts, NodeId, NodeKind,
    NodeState, NodeTimings, Observation, Policy, SandboxLimits, Session, SnapshotRef, Tree,
    TreeError, TurnRecord, Verdict, VerdictKind,
};
use sandtree_storage::SnapshotBackend;
use tokio::sync::{Mutex, Semaphore};
use tracing::{info, warn};

use crate::inspect::{Verdicts, Watch};
use crate::runtime::{ExecSpec, Runtime, Sandbox};

/// Errors of engine operations; `server.rs` maps them to gRPC codes in one place.
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

/// Service configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub default_timeout_ms: u64,
    pub out_cap: usize,
    /// Checkpoints running at once on this host.
    pub checkpoint_slots: usize,
    /// Longest parent-image chain behind an auto full node (`pages.rs`); 0: no page dedup.
    pub max_image_chain: usize,
    /// Sandboxes restored (or started) at once on this host: `fork --count N` queues the rest.
    pub restore_slots: usize,
    /// Live episodes on this host; create and fork beyond it are refused.
    pub max_episodes: usize,
    /// Size cap of each sandbox's root filesystem; 0: none.
    pub disk_bytes: u64,
}

pub const DEFAULT_ENV: &[(&str, &str)] = &[
    ("HOME", "/root"),
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
];

struct Live {
    id: EpisodeId,
    policy: Policy,
    sandbox: Sandbox,
    /// The inspector's hold on the sandbox.
    watch: Watch,
    volume: String,
    session: Session,
    turn: u32,
    /// The checkpoint of the latest turn, while it runs.
    pending: Option<tokio::task::JoinHandle<()>>,
    /// Set when a step changed the sandbox but its turn could not be recorded: the sandbox is
    /// ahead of its tree, so further steps are refused until a rewind (or a fork) replaces it.
    diverged: Option<String>,
    /// (uid, gid) that turns run as (the image's `User`); None: root.
    user: Option<(u32, u32)>,
    /// Set, under this lock, by a rewind or delete that is tearing this sandbox down: whoever
    /// gets the lock afterwards must not use it, and looks the episode up again.
    retired: bool,
}

/// Longest command a step takes: it reaches the turn's shell as one environment string, which
/// the kernel caps at 32 pages (MAX_ARG_STRLEN), name included.
pub const MAX_COMMAND_BYTES: usize = 128 * 1024 - 64;

/// Latency samples (ms) for `stats`.
#[derive(Default)]
pub struct Timings {
    pub dump: StdMutex<Vec<f64>>,
    pub snapshot: StdMutex<Vec<f64>>,
    pub restore: StdMutex<Vec<f64>>,
    pub checkpoint: StdMutex<Vec<f64>>,
    pub dedup: StdMutex<Vec<f64>>,
}

impl Timings {
    pub fn reset(&self) {
        for v in [
            &self.dump,
            &self.snapshot,
            &self.restore,
            &self.checkpoint,
            &self.dedup,
        ] {
            v.lock().expect("timings lock").clear();
        }
    }
}

pub fn percentile(v: &StdMutex<Vec<f64>>, p: f64) -> f64 {
    let mut v = v.lock().expect("timings lock").clone();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn record(v: &StdMutex<Vec<f64>>, ms: f64) {
    v.lock().expect("timings lock").push(ms);
}

/// What one step returns.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepOutcome {
    pub turn: u32,
    /// The command's output, byte for byte (the tree keeps it as lossy UTF-8).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub observation: Observation,
    pub cwd: String,
    pub verdict: Verdict,
    pub node: NodeId,
    pub timed_out: bool,
    /// Time spent waiting for the previous turn's checkpoint before the command could start.
    pub waited_us: u64,
}

pub struct Engine {
    pub tree: Arc<Tree>,
    pub storage: Arc<dyn SnapshotBackend>,
    pub runtime: Arc<Runtime>,
    pub verdicts: Arc<Verdicts>,
    pub config: Config,
    pub timings: Arc<Timings>,
    live: StdMutex<HashMap<EpisodeId, Arc<Mutex<Live>>>>,
    /// One rewind at a time per episode, also for an episode with no live sandbox.
    rewinds: StdMutex<HashMap<EpisodeId, Arc<Mutex<()>>>>,
    /// Checkpoints in flight, each with a flag set when it has committed or failed: `stats`
    /// waits on these, not on the episodes' locks, so it never waits behind a step.
    in_flight: Arc<StdMutex<HashMap<NodeId, tokio::sync::watch::Receiver<bool>>>>,
    slots: Arc<Semaphore>,
    /// Host-wide restore slots (`Config::restore_slots`).
    restores: Arc<Semaphore>,
    /// Cleanup a rewind leaves to run after it answers: the replaced volume and the nodes the
    /// rewind made garbage. `stats`, `delete` and shutdown wait for it.
    background: StdMutex<Vec<tokio::task::JoinHandle<()>>>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("task panicked: {e}"))?
        .map_err(EngineError::Internal)
}

impl Engine {
    pub fn new(
        tree: Tree,
        storage: Arc<dyn SnapshotBackend>,
        runtime: Runtime,
        verdicts: Verdicts,
        config: Config,
    ) -> anyhow::Result<Engine> {
        std::fs::create_dir_all(config.data_dir.join("images"))?;
        Ok(Engine {
            tree: Arc::new(tree),
            storage,
            runtime: Arc::new(runtime),
            verdicts: Arc::new(verdicts),
            slots: Arc::new(Semaphore::new(config.checkpoint_slots.max(1))),
            restores: Arc::new(Semaphore::new(config.restore_slots.max(1))),
            config,
            timings: Arc::default(),
            live: StdMutex::default(),
            rewinds: StdMutex::default(),
            in_flight: Arc::default(),
            background: StdMutex::default(),
        })
    }

    fn images_dir(&self, node: NodeId) -> PathBuf {
        self.config
            .data_dir
            .join("images")
            .join(format!("n{}", node.0))
    }

    /// The episode's live sandbox, locked. A sandbox that a rewind or delete retired while this
    /// waited for the lock is never handed out: the episode is looked up again (a rewind has put
    /// its new sandbox in the map by then; a delete has removed it).
    async fn lock_live(&self, id: &EpisodeId) -> Result<tokio::sync::OwnedMutexGuard<Live>> {
        for _ in 0..8 {
            let g = self.get_live(id)?.lock_owned().await;
            if !g.retired {
                return Ok(g);
            }
        }
        Err(EngineError::Precondition(format!(
            "episode {id} is being rewound or deleted by another call; try again"
        )))
    }

    fn get_live(&self, id: &EpisodeId) -> Result<Arc<Mutex<Live>>> {
        if let Some(l) = self.live.lock().expect("live lock").get(id) {
            return Ok(l.clone());
        }
        let ep = self.tree.episode(id)?;
        Err(match ep.status {
            EpisodeStatus::Deleted => TreeError::EpisodeDeleted(id.clone()).into(),
            _ => EngineError::Precondition(format!(
                "episode {id} is stopped (its sandbox is gone); fork or rewind it to continue"
            )),
        })
    }

    /// Crash recovery at start: stop episodes whose sandboxes died, and remove orphans (leftover
    /// sandboxes, volumes, unreferenced snapshots and CRIU images, abandoned pending nodes).
    pub fn reconcile(&self) -> anyhow::Result<String> {
        let reaped = self.runtime.reap_leftovers();
        // A running episode without a volume never got its sandbox: a create or fork was cut
        // off before it answered, so no client knows the id. Drop it, or it would pin the
        // snapshots and images it was forked from.
        let mut unborn = 0usize;
        for ep in self.tree.list_episodes(false)? {
            if ep.status == EpisodeStatus::Running && ep.volume.is_none() {
                self.tree.delete_episode(&ep.id)?;
                unborn += 1;
            }
        }
        let report = self.tree.reconcile()?;
        let mut referenced: std::collections::HashSet<(String, String)> = Default::default();
        let mut images: std::collections::HashSet<String> = Default::default();
        for n in self.tree.all_nodes()? {
            if matches!(n.state, NodeState::Committed) {
                if let Some(s) = &n.snapshot {
                    referenced.insert((s.volume.clone(), s.snap.clone()));
                }
                if let Some(i) = &n.images {
                    images.insert(i.clone());
                }
            }
        }
        let mut removed = 0usize;
        for e in self.storage.list()? {
            match e {
                sandtree_storage::Entry::Volume { name } => {
                    self.storage.destroy_volume(&name)?;
                    removed += 1;
                }
                sandtree_storage::Entry::Snapshot { volume, name }
                    if !referenced.contains(&(volume.clone(), name.clone())) =>
                {
                    self.storage.destroy_snapshot(&volume, &name)?;
                    removed += 1;
                }
                _ => {}
            }
        }
        for ep in self.tree.list_episodes(false)? {
            if ep.volume.is_some() {
                self.tree.set_volume(&ep.id, None)?;
            }
        }
        if let Ok(rd) = std::fs::read_dir(self.config.data_dir.join("images")) {
            for d in rd.flatten() {
                if !images.contains(&d.path().to_string_lossy().into_owned()) {
                    let _ = std::fs::remove_dir_all(d.path());
                    removed += 1;
                }
            }
        }
        self.storage.gc()?;
        Ok(format!(
            "reconciled: {} sandboxes reaped, {unborn} unborn episodes dropped, {} episodes stopped, {} pending nodes abandoned, {} orphans removed",
            reaped.len(),
            report.stopped.len(),
            report.abandoned.len(),
            removed
        ))
    }

    fn image_config_path(&self, image: &str) -> PathBuf {
        self.config
            .data_dir
            .join("image-config")
            .join(format!("{image}.json"))
    }

    /// Keeps what an image's config says an episode starts with (written durably, replaced
    /// whole).
    pub fn save_image_config(
        &self,
        image: &str,
        config: &crate::images::ImageConfig,
    ) -> anyhow::Result<()> {
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
    fn image_config(&self, image: &str) -> Result<crate::images::ImageConfig> {
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

    /// Policy none keeps no checkpoint after turn 0: every later turn would restore turn 0's
    /// state, so forking or rewinding to one is refused instead of silently giving the wrong
    /// state.
    fn no_checkpoints_under_none(&self, id: &EpisodeId, turn: u32) -> Result<()> {
        let ep = self.tree.episode(id)?;
        if ep.policy == Policy::None && turn > 0 {
            // A turn past the head is out of range first.
            self.tree.turn(id, turn)?;
            return Err(EngineError::NotRestorable(format!(
                "episode {id} runs with policy none, which keeps no checkpoint after turn 0: \
                 turn {turn} cannot be restored (fork or rewind to turn 0, or use policy auto)"
            )));
        }
        Ok(())
    }

    /// Refuses `n` more live episodes beyond `--max-episodes` (checked at admission; concurrent
    /// admissions may overshoot by what is in flight).
    fn admit(&self, n: usize) -> Result<()> {
        let live = self.live.lock().expect("live map").len();
        if live + n > self.config.max_episodes {
            return Err(EngineError::Exhausted(format!(
                "{live} episodes are live and this host takes at most {} (--max-episodes): \
                 delete some first",
                self.config.max_episodes
            )));
        }
        Ok(())
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
        let max = self.runtime.limits;
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
        let period = crate::runtime::cgroup::CPU_PERIOD_US as f64;
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
        self.admit(1)?;
        let storage = self.storage.clone();
        let img = image.to_string();
        if !blocking(move || Ok(storage.has_base(&img)?)).await? {
            return Err(EngineError::NotFound(format!(
                "unknown image {image}: build it with `sandtree image build {image}` or import it"
            )));
        }
        let cfg = self.image_config(image)?;
        let env = merge_env(
            &DEFAULT_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
            &cfg.env,
        );
        let mut meta = meta;
        meta.user = cfg.user;
        let limits = meta.limits;
        let cwd = cfg.working_dir.clone().unwrap_or_else(|| "/".into());
        let ep = self
            .tree
            .create_episode_with(image, policy, env, cwd, meta)?;
        let (_, node, session) = self.tree.rewind(&ep.id, 0)?;
        match self.materialize(&ep.id, &node, 0, limits).await {
            Ok((sandbox, watch, volume)) => {
                self.insert_live(&ep, (sandbox, watch), volume, session, 0);
                Ok(ep.id)
            }
            Err(e) => {
                let _ = self.tree.delete_episode(&ep.id);
                Err(e)
            }
        }
    }

    fn insert_live(
        &self,
        ep: &Episode,
        (sandbox, watch): (Sandbox, Watch),
        volume: String,
        session: Session,
        turn: u32,
    ) {
        let id = &ep.id;
        let live = Live {
            id: id.clone(),
            policy: ep.policy,
            user: ep.meta.user,
            sandbox,
            watch,
            volume,
            session,
            turn,
            pending: None,
            diverged: None,
            retired: false,
        };
        self.live
            .lock()
            .expect("live lock")
            .insert(id.clone(), Arc::new(Mutex::new(live)));
    }

    /// Makes a new volume and sandbox holding `node`'s state for episode `id`.
    async fn materialize(
        &self,
        id: &EpisodeId,
        node: &Node,
        seq: u64,
        limits: Option<SandboxLimits>,
    ) -> Result<(Sandbox, Watch, String)> {
        let limits = limits.map(|l| crate::runtime::cgroup::Limits {
            memory_bytes: l.memory_bytes,
            pids: l.pids,
            cpu_quota_us: l.cpu_quota_us,
        });
        let volume = format!("{}-{seq}", id.as_str());
        let (storage, runtime, vol) = (self.storage.clone(), self.runtime.clone(), volume.clone());
        let node = node.clone();
        let images = node.images.clone().map(PathBuf::from);
        let timings = self.timings.clone();
        let restored = matches!(node.kind, NodeKind::Full);
        let verdicts = self.verdicts.clone();
        let disk_bytes = self.config.disk_bytes;
        let _slot = self
            .restores
            .acquire()
            .await
            .expect("restore slots are never closed");
        let (sandbox, watch) = blocking(move || {
            let t = Instant::now();
            let root = match (&node.kind, &node.snapshot) {
                (NodeKind::Base { image }, _) => storage.create_volume(&vol, image)?,
                (_, Some(s)) => storage.clone_snapshot(&s.volume, &s.snap, &vol)?,
                (_, None) => anyhow::bail!("checkpoint node {} has no snapshot", node.id),
            };
            if disk_bytes > 0 {
                if let Err(e) = storage.set_quota(&vol, disk_bytes) {
                    let _ = storage.destroy_volume(&vol);
                    return Err(
                        anyhow::Error::from(e).context(format!("limit volume {vol}'s disk"))
                    );
                }
            }
            let sb = match (&node.kind, images) {
                (NodeKind::Full, Some(images)) => runtime.restore(&vol, &images, &root, limits),
                (NodeKind::Full, None) => {
                    Err(anyhow!("checkpoint node {} has no CRIU images", node.id))
                }
                _ => runtime.start(&vol, &root, limits),
            };
            match sb {
                Ok(sb) => {
                    record(&timings.restore, t.elapsed().as_secs_f64() * 1e3);
                    let watch = verdicts.attach(&sb, restored);
                    Ok((sb, watch))
                }
                Err(e) => {
                    let _ = storage.destroy_volume(&vol);
                    Err(e)
                }
            }
        })
        .await?;
        self.tree.set_volume(id, Some(volume.clone()))?;
        Ok((sandbox, watch, volume))
    }

    pub async fn step(
        &self,
        id: &EpisodeId,
        command: String,
        opts: StepOptions,
        chunks: Option<tokio::sync::mpsc::UnboundedSender<Chunk>>,
    ) -> Result<StepOutcome> {
        if command.contains('\0') {
            return Err(EngineError::BadRequest(
                "command contains a NUL byte".into(),
            ));
        }
        if command.len() > MAX_COMMAND_BYTES {
            return Err(EngineError::BadRequest(format!(
                "command is {} bytes; the limit is {MAX_COMMAND_BYTES} (write long scripts to a \
                 file in the sandbox and run that)",
                command.len()
            )));
        }
        opts.validate(self.config.out_cap)?;
        let mut l = self.lock_live(id).await?;
        let waited_us = self.ready(id, &mut l).await?;
        let spec = ExecSpec {
            seccomp: Default::default(),
            init_pid: 0,
            v2_cgroup: PathBuf::new(),
            procs_files: Vec::new(),
            turn: l.turn + 1,
            command: command.clone(),
            cwd: opts.cwd.clone().unwrap_or_else(|| l.session.cwd.clone()),
            env: merge_env(&l.session.env, &opts.env),
            timeout_ms: if opts.timeout_ms == 0 {
                self.config.default_timeout_ms
            } else {
                opts.timeout_ms
            },
            out_cap: match opts.max_output {
                0 => self.config.out_cap,
                n => n as usize,
            },
            stdin: opts.stdin.clone(),
            stream: chunks.is_some(),
            user: l.user,
            cwd_strict: opts.cwd.is_some(),
        };
        let (runtime, sb) = (self.runtime.clone(), l.sandbox.clone());
        let res = blocking(move || {
            runtime.exec(&sb, spec, &mut |ev| {
                if let Some(tx) = &chunks {
                    let _ = tx.send(match ev {
                        crate::runtime::shim::ShimEvent::Stdout(b) => Chunk::Stdout(b),
                        crate::runtime::shim::ShimEvent::Stderr(b) => Chunk::Stderr(b),
                        crate::runtime::shim::ShimEvent::Done(_) => return,
                    });
                }
            })
        })
        .await
        .map_err(|e| match e {
            EngineError::Internal(e) => EngineError::Precondition(format!(
                "episode {id}: the sandbox cannot run commands: {e:#}"
            )),
            e => e,
        })?;
        // What this step set for itself only does not stay in the session.
        let mut env = res.env.clone().unwrap_or_else(|| l.session.env.clone());
        for (k, v) in &opts.env {
            if env.iter().any(|(k2, v2)| k2 == k && v2 == v) {
                env.retain(|(k2, _)| k2 != k);
                if let Some(old) = l.session.env.iter().find(|(k2, _)| k2 == k) {
                    env.push(old.clone());
                }
            }
        }
        env.sort();
        let cwd = match (&res.cwd, &opts.cwd) {
            (Some(after), Some(step_cwd)) if after == step_cwd => l.session.cwd.clone(),
            (Some(after), _) => after.clone(),
            (None, _) => l.session.cwd.clone(),
        };
        let observation = Observation {
            stdout: String::from_utf8_lossy(&res.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&res.stderr).into_owned(),
            exit_code: res.exit_code,
            duration_ms: res.duration_ms,
            stdout_truncated: res.stdout_truncated,
            stderr_truncated: res.stderr_truncated,
        };
        let mut out = self
            .record(id, &mut l, command, observation, Session { cwd, env })
            .await?;
        out.timed_out = res.timed_out;
        out.waited_us = waited_us;
        out.stdout = res.stdout;
        out.stderr = res.stderr;
        Ok(out)
    }

    /// Waits for the episode's pending checkpoint and refuses an episode whose sandbox is ahead
    /// of its tree. Returns how long it waited, in microseconds.
    async fn ready(&self, id: &EpisodeId, l: &mut Live) -> Result<u64> {
        if let Some(why) = &l.diverged {
            return Err(EngineError::Precondition(format!(
                "episode {id}: an earlier step changed the sandbox but its turn could not be \
                 recorded ({why}); rewind or fork it to continue"
            )));
        }
        let waited = Instant::now();
        if let Some(p) = l.pending.take() {
            let _ = p.await;
        }
        Ok(waited.elapsed().as_micros() as u64)
    }

    /// Records a turn that already ran in the sandbox: its verdict, its turn record and its
    /// checkpoint (started in the background). Whatever fails here, the turn is not lost
    /// silently: a verdict that cannot be made is the safest one, and a turn that cannot be
    /// recorded stops the episode.
    async fn record(
        &self,
        id: &EpisodeId,
        l: &mut Live,
        action: String,
        observation: Observation,
        session: Session,
    ) -> Result<StepOutcome> {
        let (verdict, new_node) = match self.verdict(l).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(episode = %id, error = %e, "verdict failed; checkpointing everything");
                let full = l.policy != Policy::None;
                (
                    Verdict {
                        kind: if full {
                            VerdictKind::Proc
                        } else {
                            VerdictKind::None
                        },
                        reasons: vec![format!("verdict failed ({e}); everything is checkpointed")],
                    },
                    full.then_some(NodeKind::Full),
                )
            }
        };
        let appended = self.tree.append_turn(
            id,
            NewTurn {
                action,
                observation: observation.clone(),
                session: session.clone(),
                verdict: verdict.clone(),
                new_node,
            },
        );
        let (rec, node) = match appended {
            Ok(x) => x,
            Err(e) => {
                l.diverged = Some(e.to_string());
                let msg = format!(
                    "episode {id}: the command ran but its turn could not be recorded: {e}; \
                     the episode takes no more steps until it is rewound or forked"
                );
                return Err(if e.is_disk_full() {
                    EngineError::Exhausted(msg)
                } else {
                    EngineError::Internal(anyhow::anyhow!(msg))
                });
            }
        };
        l.turn = rec.turn;
        l.session = session;
        if let Some(node) = node {
            l.pending = Some(self.spawn_checkpoint(l, node));
        }
        Ok(StepOutcome {
            turn: rec.turn,
            stdout: observation.stdout.clone().into_bytes(),
            stderr: observation.stderr.clone().into_bytes(),
            observation,
            cwd: l.session.cwd.clone(),
            verdict,
            node: rec.node,
            timed_out: false,
            waited_us: 0,
        })
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
        if data.len() as u64 > crate::runtime::shim::MAX_FILE_BYTES {
            return Err(EngineError::BadRequest(format!(
                "file is {} bytes; the limit is {} bytes",
                data.len(),
                crate::runtime::shim::MAX_FILE_BYTES
            )));
        }
        if mode > 0o7777 {
            return Err(EngineError::BadRequest(format!(
                "mode {mode:o} is not a set of permission bits"
            )));
        }
        let mut l = self.lock_live(id).await?;
        let waited_us = self.ready(id, &mut l).await?;
        let (runtime, sb) = (self.runtime.clone(), l.sandbox.clone());
        let (p, n) = (path.clone(), data.len());
        let mode = if mode == 0 { 0o644 } else { mode };
        let started = Instant::now();
        let res = blocking(move || {
            runtime.file(&sb, &p, crate::runtime::shim::FileOp::Write { data, mode })
        })
        .await?;
        file_error(id, &path, &res)?;
        let observation = Observation {
            duration_ms: started.elapsed().as_millis() as u64,
            ..Default::default()
        };
        let session = l.session.clone();
        let mut out = self
            .record(
                id,
                &mut l,
                format!("# sandtree write {path} ({n} bytes, mode {mode:o})"),
                observation,
                session,
            )
            .await?;
        out.waited_us = waited_us;
        Ok(out)
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
        let limit = crate::runtime::shim::MAX_FILE_BYTES;
        let max_bytes = match max_bytes {
            0 => limit,
            m if m > limit => {
                return Err(EngineError::BadRequest(format!(
                    "max_bytes {m} is over the limit of {limit} bytes"
                )))
            }
            m => m,
        };
        let l = self.lock_live(id).await?;
        let (runtime, sb, p) = (self.runtime.clone(), l.sandbox.clone(), path.clone());
        let res = blocking(move || {
            runtime.file(&sb, &p, crate::runtime::shim::FileOp::Read { max_bytes })
        })
        .await?;
        file_error(id, &path, &res)?;
        match res {
            crate::runtime::shim::FileResult::Read { data, size } => Ok((data, size)),
            other => Err(EngineError::Internal(anyhow!(
                "unexpected file result {other:?}"
            ))),
        }
    }

    /// The turn's verdict. The inspector's epoch ends here under every policy; `full` always
    /// checkpoints everything and `none` never does, whatever the inspector saw.
    ///
    /// Returns the verdict and the node the turn needs. An fs turn in a sandbox where processes
    /// other than init are alive needs a full node: a node must restore the whole sandbox, and
    /// those processes' state is only in a CRIU image.
    async fn verdict(&self, l: &Live) -> Result<(Verdict, Option<NodeKind>)> {
        let (verdicts, storage, sb, vol, watch, policy) = (
            self.verdicts.clone(),
            self.storage.clone(),
            l.sandbox.clone(),
            l.volume.clone(),
            l.watch,
            l.policy,
        );
        blocking(move || {
            // The inspector's epoch ends here under every policy; auto judges by it, none and
            // full only report what it saw.
            let (mut reasons, observed, others_alive) = match policy {
                Policy::Auto => {
                    let (v, others) = verdicts.judge(watch, &sb, storage.as_ref(), &vol)?;
                    (v.reasons, v.kind, !others.is_empty())
                }
                Policy::None | Policy::Full => {
                    let mut reasons = vec![if policy == Policy::None {
                        "policy none: chat-only".to_string()
                    } else {
                        "policy full: checkpoint every turn".to_string()
                    }];
                    if let Some(v) = verdicts.observe(watch, &sb) {
                        reasons.push(format!("inspector: {:?}", v.kind).to_lowercase());
                        reasons.extend(v.reasons);
                    }
                    (reasons, VerdictKind::None, false)
                }
            };
            let d = sandtree_branching::policy::decide(policy, observed, others_alive);
            reasons.extend(d.upgrade.map(String::from));
            Ok((
                Verdict {
                    kind: d.verdict,
                    reasons,
                },
                d.node,
            ))
        })
        .await
    }

    fn spawn_checkpoint(&self, l: &Live, node: Node) -> tokio::task::JoinHandle<()> {
        let (tree, storage, runtime, slots, timings) = (
            self.tree.clone(),
            self.storage.clone(),
            self.runtime.clone(),
            self.slots.clone(),
            self.timings.clone(),
        );
        let (sb, vol, episode) = (l.sandbox.clone(), l.volume.clone(), l.id.clone());
        let (verdicts, watch) = (self.verdicts.clone(), l.watch);
        let images = self.images_dir(node.id);
        // auto keeps only the pages a dump changed; full stays the naive per-turn baseline that
        // writes every image whole.
        let image_parent = match (l.policy, &node.kind) {
            (Policy::Auto, NodeKind::Full) if self.config.max_image_chain > 0 => {
                self.image_parent(node.parent)
            }
            _ => None,
        };
        let max_chain = self.config.max_image_chain;
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let in_flight = self.in_flight.clone();
        in_flight
            .lock()
            .expect("in-flight lock")
            .insert(node.id, done_rx);
        tokio::spawn(async move {
            // Whatever happens below (even a panic), the node counts as settled at the end.
            struct Settled(
                NodeId,
                tokio::sync::watch::Sender<bool>,
                Arc<StdMutex<HashMap<NodeId, tokio::sync::watch::Receiver<bool>>>>,
            );
            impl Drop for Settled {
                fn drop(&mut self) {
                    self.2.lock().expect("in-flight lock").remove(&self.0);
                    let _ = self.1.send(true);
                }
            }
            let _settled = Settled(node.id, done_tx, in_flight);
            let _permit = slots.acquire_owned().await;
            let node_id = node.id;
            let kind = node.kind.clone();
            let r = tokio::task::spawn_blocking(move || {
                let ckpt = Checkpoint {
                    storage: &storage,
                    runtime: &runtime,
                    verdicts: &verdicts,
                    watch,
                    timings: &timings,
                    sb: &sb,
                    vol: &vol,
                };
                ckpt.take(
                    &kind,
                    node_id,
                    &images,
                    image_parent.map(|(n, d)| (n, d, max_chain)),
                )
            })
            .await
            .map_err(|e| anyhow!("checkpoint task panicked: {e}"))
            .and_then(|r| r);
            match r {
                Ok(art) => {
                    if let Err(e) = tree.commit_node(node_id, art) {
                        warn!(%episode, node = %node_id, error = %e, "commit failed");
                    }
                }
                Err(e) => {
                    warn!(%episode, node = %node_id, error = format!("{e:#}"), "checkpoint failed");
                    let _ = tree.fail_node(node_id, &format!("{e:#}"));
                }
            }
        })
    }

    /// The nearest committed full node a sandbox state descends from: the image a new dump is
    /// deduplicated against.
    fn image_parent(&self, from: Option<NodeId>) -> Option<(NodeId, PathBuf)> {
        let mut cur = from;
        while let Some(id) = cur {
            let n = self.tree.node(id).ok()?;
            if let (NodeKind::Full, NodeState::Committed, Some(i)) = (&n.kind, &n.state, &n.images)
            {
                return Some((id, PathBuf::from(i)));
            }
            cur = n.parent;
        }
        None
    }

    /// Waits for the pending checkpoint of a live episode, if any.
    async fn settle(&self, id: &EpisodeId) {
        let live = self.live.lock().expect("live lock").get(id).cloned();
        if let Some(live) = live {
            let mut l = live.lock().await;
            if let Some(p) = l.pending.take() {
                let _ = p.await;
            }
        }
    }

    pub async fn fork(&self, src: &EpisodeId, turn: u32, count: u32) -> Result<Vec<EpisodeId>> {
        if count == 0 || count > 64 {
            return Err(EngineError::BadRequest(format!(
                "fork count must be 1..=64, got {count}"
            )));
        }
        self.admit(count as usize)?;
        self.no_checkpoints_under_none(src, turn)?;
        self.settle(src).await;
        let forks = self.tree.fork(src, turn, count as usize)?;
        // The copies are cloned and restored concurrently (each in its own cgroup and
        // namespaces), up to the host's restore slots; the rest queue.
        let results = futures_util::future::join_all(forks.into_iter().map(
            |(ep, node, session)| async move {
                match self.materialize(&ep.id, &node, 0, ep.meta.limits).await {
                    Ok((sb, w, vol)) => {
                        self.insert_live(&ep, (sb, w), vol, session, turn);
                        Ok(ep.id)
                    }
                    Err(e) => {
                        let _ = self.tree.delete_episode(&ep.id);
                        Err(e)
                    }
                }
            },
        ))
        .await;
        let mut ids = Vec::new();
        let mut first_err = None;
        for r in results {
            match r {
                Ok(id) => ids.push(id),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        if let Some(e) = first_err {
            for id in &ids {
                let _ = self.delete(id).await;
            }
            return Err(e);
        }
        Ok(ids)
    }

    pub async fn rewind(&self, id: &EpisodeId, turn: u32) -> Result<()> {
        let one_at_a_time = self
            .rewinds
            .lock()
            .expect("rewinds lock")
            .entry(id.clone())
            .or_default()
            .clone();
        let _rewinding = one_at_a_time.lock().await;
        self.no_checkpoints_under_none(id, turn)?;
        // The live sandbox, if any, locked; one that another rewind or a delete retired while
        // this waited is looked up again.
        let mut _guard = None;
        for _ in 0..8 {
            let Some(l) = self.live.lock().expect("live lock").get(id).cloned() else {
                break;
            };
            let mut g = l.lock_owned().await;
            if g.retired {
                continue;
            }
            if let Some(p) = g.pending.take() {
                let _ = p.await;
            }
            _guard = Some(g);
            break;
        }
        // Validate before tearing anything down.
        let ep = self.tree.episode(id)?;
        let target = self.tree.turn(id, turn)?;
        let node = self.tree.node(target.node)?;
        match node.state {
            NodeState::Committed => {}
            NodeState::Pending => return Err(TreeError::NodeNotCommitted { node: node.id }.into()),
            s => {
                return Err(TreeError::NodeCollected {
                    node: node.id,
                    state: s,
                }
                .into())
            }
        }
        let seq = ep
            .volume
            .as_deref()
            .and_then(|v| v.rsplit('-').next())
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(1, |s| s + 1);
        // The old sandbox is stopped now; its volume and the garbage are freed after the
        // rewind answers (`background`), so the trainer waits only for the restore.
        if let Some(g) = _guard.as_mut() {
            g.retired = true;
        }
        let old_volume = match &_guard {
            Some(g) if self.stop_sandbox(&g.sandbox, g.watch).await => Some(g.volume.clone()),
            _ => None,
        };
        // The retired sandbox stays in the map until its replacement is in: a step that comes
        // meanwhile waits on its lock and then finds the new one, instead of finding none.
        let r = async {
            let (ep, node, session) = self.tree.rewind(id, turn)?;
            let (sb, w, vol) = self.materialize(id, &node, seq, ep.meta.limits).await?;
            self.insert_live(&ep, (sb, w), vol, session, turn);
            Ok(())
        }
        .await;
        if r.is_err() {
            self.live.lock().expect("live lock").remove(id);
            let _ = self.tree.set_status(id, EpisodeStatus::Stopped);
        }
        drop(_guard);
        self.cleanup_in_background(old_volume);
        r
    }

    /// Destroys `volume` (if any) and collects garbage on a background task.
    fn cleanup_in_background(&self, volume: Option<String>) {
        let (tree, storage) = (self.tree.clone(), self.storage.clone());
        let h = tokio::task::spawn_blocking(move || {
            if let Some(v) = volume {
                if let Err(e) = storage.destroy_volume(&v) {
                    warn!(volume = %v, error = %e, "cannot destroy the volume a rewind replaced");
                }
            }
            collect_garbage(&tree, storage.as_ref());
        });
        let mut bg = self.background.lock().expect("background lock");
        bg.retain(|h| !h.is_finished());
        bg.push(h);
    }

    /// Waits for the cleanup that earlier rewinds left to the background.
    pub async fn settle_background(&self) {
        loop {
            let pending: Vec<_> = self
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

    /// Kills a sandbox and stops watching it; its volume stays. False if it could not be
    /// killed (its volume must stay too; the next start's reconcile removes both).
    async fn stop_sandbox(&self, sb: &Sandbox, watch: Watch) -> bool {
        let (runtime, verdicts, sb) = (self.runtime.clone(), self.verdicts.clone(), sb.clone());
        let r = blocking(move || {
            let destroyed = runtime.destroy(&sb);
            verdicts.detach(watch);
            destroyed
        })
        .await;
        if let Err(e) = &r {
            warn!(error = %e, "teardown failed");
        }
        r.is_ok()
    }

    async fn teardown(&self, sb: &Sandbox, watch: Watch, volume: &str) {
        if !self.stop_sandbox(sb, watch).await {
            return;
        }
        let (storage, vol) = (self.storage.clone(), volume.to_string());
        if let Err(e) = blocking(move || Ok(storage.destroy_volume(&vol)?)).await {
            warn!(error = %e, "teardown failed");
        }
    }

    pub async fn delete(&self, id: &EpisodeId) -> Result<()> {
        // Never beside a rewind of the same episode, which would put a new sandbox in the map
        // after this took the old one out.
        let one_at_a_time = self
            .rewinds
            .lock()
            .expect("rewinds lock")
            .entry(id.clone())
            .or_default()
            .clone();
        let _deleting = one_at_a_time.lock().await;
        if self.tree.episode(id)?.status == EpisodeStatus::Deleted {
            return Err(TreeError::EpisodeDeleted(id.clone()).into());
        }
        self.settle_background().await;
        let live = self.live.lock().expect("live lock").remove(id);
        if let Some(live) = live {
            let mut l = live.lock().await;
            l.retired = true;
            if let Some(p) = l.pending.take() {
                let _ = p.await;
            }
            self.teardown(&l.sandbox, l.watch, &l.volume).await;
        } else {
            self.tree.episode(id)?;
        }
        self.tree.delete_episode(id)?;
        self.gc().await;
        Ok(())
    }

    /// Frees the snapshots and images of nodes that nothing live can reach any more.
    pub async fn gc(&self) {
        let (tree, storage) = (self.tree.clone(), self.storage.clone());
        let _ = tokio::task::spawn_blocking(move || collect_garbage(&tree, storage.as_ref())).await;
    }

    /// Turns on the live path of an episode with their nodes (waits for a pending checkpoint).
    pub async fn tree_view(
        &self,
        id: &EpisodeId,
    ) -> Result<(
        sandtree_branching::Episode,
        Vec<(TurnRecord, Node, &'static str)>,
    )> {
        self.settle(id).await;
        let ep = self.tree.episode(id)?;
        let turns = self.tree.turns(id)?;
        let mut out = Vec::with_capacity(turns.len());
        for (i, t) in turns.iter().enumerate() {
            let node = self.tree.node(t.node)?;
            let kind =
                sandtree_branching::turn_kind(t, i.checked_sub(1).map(|j| &turns[j]), &node.kind);
            out.push((t.clone(), node, kind));
        }
        Ok((ep, out))
    }

    /// The whole tree of `id`'s fork family, each record with its node and display kind.
    pub async fn family_view(
        &self,
        id: &EpisodeId,
    ) -> Result<(sandtree_branching::Family, Vec<(Node, &'static str)>)> {
        self.settle(id).await;
        let fam = self.tree.family(id)?;
        let by_id: HashMap<_, _> = fam.turns.iter().map(|t| (t.record.id, &t.record)).collect();
        let mut out = Vec::with_capacity(fam.turns.len());
        for t in &fam.turns {
            let node = self.tree.node(t.record.node)?;
            let parent = t.record.parent.and_then(|p| by_id.get(&p).copied());
            let kind = sandtree_branching::turn_kind(&t.record, parent, &node.kind);
            out.push((node, kind));
        }
        Ok((fam, out))
    }

    /// Waits until no checkpoint is pending on any live episode, and no rewind's cleanup.
    /// Waits until every checkpoint in flight now has committed or failed, without taking any
    /// episode's lock (a step running meanwhile does not hold this up).
    pub async fn settle_checkpoints(&self) {
        self.settle_background().await;
        let waiting: Vec<tokio::sync::watch::Receiver<bool>> = self
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

    pub async fn settle_all(&self) {
        self.settle_background().await;
        let ids: Vec<EpisodeId> = self
            .live
            .lock()
            .expect("live lock")
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.settle(&id).await;
        }
    }

    /// Stops every sandbox (service shutdown). Nodes stay forkable.
    pub async fn shutdown(&self) {
        self.settle_all().await;
        let all: Vec<(EpisodeId, Arc<Mutex<Live>>)> =
            self.live.lock().expect("live lock").drain().collect();
        for (id, live) in all {
            let l = live.lock().await;
            self.teardown(&l.sandbox, l.watch, &l.volume).await;
            let _ = self.tree.set_status(&id, EpisodeStatus::Stopped);
            let _ = self.tree.set_volume(&id, None);
        }
        self.runtime.layout.remove_parents();
    }
}

/// Frees the snapshots and images of nodes that nothing live can reach any more, then forgets
/// them in the tree; logs what it did (blocking).
fn collect_garbage(tree: &Tree, storage: &dyn SnapshotBackend) {
    let r = (|| -> anyhow::Result<usize> {
        let garbage = tree.garbage()?;
        let mut freed = Vec::new();
        for n in garbage {
            if matches!(n.state, NodeState::Pending) {
                continue;
            }
            if let Some(s) = &n.snapshot {
                if let Err(e) = storage.destroy_snapshot(&s.volume, &s.snap) {
                    if !matches!(e, sandtree_storage::SnapshotError::NotFound { .. }) {
                        warn!(node = %n.id, error = %e, "cannot destroy snapshot");
                        continue;
                    }
                }
            }
            if let Some(i) = &n.images {
                let _ = std::fs::remove_dir_all(i);
            }
            freed.push(n.id);
        }
        tree.forget_nodes(&freed)?;
        storage.gc()?;
        Ok(freed.len())
    })();
    match r {
        Ok(n) if n > 0 => info!(nodes = n, "garbage collected"),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "gc failed"),
    }
}

/// What taking one sandbox's checkpoint needs.
struct Checkpoint<'a> {
    storage: &'a Arc<dyn SnapshotBackend>,
    runtime: &'a Runtime,
    verdicts: &'a Verdicts,
    watch: Watch,
    timings: &'a Timings,
    sb: &'a Sandbox,
    vol: &'a str,
}

impl Checkpoint<'_> {
    /// Takes one node's checkpoint. fs: freeze, snapshot, thaw. full: CRIU dump with the snapshot
    /// inside the post-dump notification, then (with `image_parent`) the pages equal to that
    /// image's are left out (`pages.rs`). Artifacts are synced to disk before this returns.
    fn take(
        &self,
        kind: &NodeKind,
        node: NodeId,
        images: &Path,
        image_parent: Option<(NodeId, PathBuf, usize)>,
    ) -> anyhow::Result<NodeArtifacts> {
        let Checkpoint {
            storage,
            runtime,
            verdicts,
            watch,
            timings,
            sb,
            vol,
        } = *self;
        let started = Instant::now();
        let snap = format!("n{}", node.0);
        let mut t = NodeTimings::default();
        let (mut image_dumped_bytes, mut image_parent_id) = (0, None);
        let (snap_bytes, image_bytes, images_path) = match kind {
            NodeKind::Fs => {
                let f = Instant::now();
                sb.cgroup.freeze(true)?;
                t.freeze_ms = f.elapsed().as_millis() as u64;
                let s = Instant::now();
                let r = storage.snapshot(vol, &snap);
                let _ = sb.cgroup.freeze(false);
                let info = r?;
                t.snapshot_ms = s.elapsed().as_millis() as u64;
                record(&timings.snapshot, s.elapsed().as_secs_f64() * 1e3);
                (info.bytes, 0, None)
            }
            NodeKind::Full => {
                // A task in vfork cannot be dumped (criu.rs, `VforkWait`): fail at once, before
                // the inspector is suspended and CRIU stops the sandbox for nothing.
                runtime.seizable(sb)?;
                std::fs::create_dir_all(images)?;
                let mut info = None;
                // The inspector does not record while CRIU's parasite runs in the sandbox; the
                // cgroup is frozen before CRIU lets the processes go and thawed once it records
                // again, so nothing they do after the dump is missed.
                let stats = verdicts.dump_window(watch, sb, || {
                    runtime.checkpoint(sb, images, || {
                        info = Some(storage.snapshot(vol, &snap).map_err(|e| e.to_string())?);
                        sb.cgroup.request_freeze().map_err(|e| e.to_string())?;
                        Ok(())
                    })
                });
                let fail = |e: anyhow::Error, snapped: bool| {
                    // Keep CRIU's log for the operator; the partial images go.
                    let logs = images.parent().unwrap_or(images).join("failed-logs");
                    let _ = std::fs::create_dir_all(&logs);
                    let _ = std::fs::rename(
                        images.join("dump.log"),
                        logs.join(format!("n{}-dump.log", node.0)),
                    );
                    let _ = std::fs::remove_dir_all(images);
                    if snapped {
                        let _ = storage.destroy_snapshot(vol, &snap);
                    }
                    Err(e)
                };
                let stats = match stats {
                    Ok(s) => s,
                    Err(e) => return fail(e, info.is_some()),
                };
                let info =
                    info.context("criu finished the dump without a post-dump notification")?;
                image_dumped_bytes = stats.image_bytes;
                if let Some((pid, pdir, max_chain)) = &image_parent {
                    let d = Instant::now();
                    match crate::pages::dedup_against(images, pdir, *max_chain) {
                        Ok(s) if s.depth > 0 => {
                            image_parent_id = Some(*pid);
                            record(&timings.dedup, d.elapsed().as_secs_f64() * 1e3);
                        }
                        Ok(_) => {}
                        Err(e @ crate::pages::PagesError::Inconsistent { .. }) => {
                            return fail(e.into(), true)
                        }
                        Err(e) => {
                            warn!(node = %node, parent = %pid, error = %e, "page dedup failed; the image is kept whole")
                        }
                    }
                }
                sync_dir(images)?;
                t.snapshot_ms = stats.hook_ms as u64;
                t.dump_ms = (stats.dump_ms - stats.hook_ms).max(0.0) as u64;
                record(&timings.dump, stats.dump_ms - stats.hook_ms);
                record(&timings.snapshot, stats.hook_ms);
                // What the image keeps: CRIU's files, or after a dedup what is left of them.
                let kept = match image_parent_id {
                    Some(_) => crate::criu::dir_bytes(images),
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
        sync_fs(&sb.rootfs)?;
        t.total_ms = started.elapsed().as_millis() as u64;
        record(&timings.checkpoint, started.elapsed().as_secs_f64() * 1e3);
        Ok(NodeArtifacts {
            snapshot: Some(SnapshotRef {
                volume: vol.to_string(),
                snap,
            }),
            images: images_path,
            bytes: snap_bytes + image_bytes,
            image_bytes,
            image_dumped_bytes,
            image_parent: image_parent_id,
            timings: Some(t),
        })
    }
}

/// Makes an image directory durable: its files, the directory itself, and its entry in its
/// parent (a crash must not lose the directory of a committed node).
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        std::fs::File::open(e.path())?.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// syncfs(2) of the filesystem holding `path`; a failure fails the commit (the node would not be
/// durable).
fn sync_fs(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: syncfs(2) on an fd we own for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        anyhow::bail!(
            "syncfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// What a step may add to a turn beyond its command.
#[derive(Debug, Clone, Default)]
pub struct StepOptions {
    /// 0: the service's default.
    pub timeout_ms: u64,
    /// Environment variables for this step only.
    pub env: Vec<(String, String)>,
    /// Working directory for this step only.
    pub cwd: Option<String>,
    pub stdin: Vec<u8>,
    /// Cap on stdout and on stderr; 0: the service's maximum.
    pub max_output: u64,
}

impl StepOptions {
    fn validate(&self, out_cap: usize) -> Result<()> {
        let bad = |m: String| Err(EngineError::BadRequest(m));
        let mut env_bytes = 0;
        for (k, v) in &self.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return bad(format!("env name {k:?} is not a valid variable name"));
            }
            if k.starts_with("__ST_") || k.starts_with("__st_") {
                return bad(format!("env name {k:?} is reserved by sandtree"));
            }
            env_bytes += k.len() + v.len() + 2;
        }
        if env_bytes > crate::runtime::shim::MAX_ENV_BYTES {
            return bad(format!(
                "the step's env is {env_bytes} bytes; the limit is {}",
                crate::runtime::shim::MAX_ENV_BYTES
            ));
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/')
                || cwd.contains('\0')
                || cwd.len() > crate::runtime::shim::MAX_CWD_BYTES
            {
                return bad(format!(
                    "cwd {cwd:?} must be an absolute path of at most {} bytes",
                    crate::runtime::shim::MAX_CWD_BYTES
                ));
            }
        }
        if self.stdin.len() as u64 > crate::runtime::shim::MAX_FILE_BYTES {
            return bad(format!(
                "stdin is {} bytes; the limit is {}",
                self.stdin.len(),
                crate::runtime::shim::MAX_FILE_BYTES
            ));
        }
        if self.max_output > out_cap as u64 {
            return bad(format!(
                "max_output_bytes {} is over this server's maximum of {out_cap}",
                self.max_output
            ));
        }
        Ok(())
    }
}

/// A piece of a running step's output.
#[derive(Debug, Clone)]
pub enum Chunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// The session's environment with this step's variables on top.
fn merge_env(session: &[(String, String)], step: &[(String, String)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = session
        .iter()
        .filter(|(k, _)| !step.iter().any(|(k2, _)| k2 == k))
        .cloned()
        .collect();
    env.extend(step.iter().cloned());
    env
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

/// A refused file operation as the error the caller can act on.
fn file_error(id: &EpisodeId, path: &str, res: &crate::runtime::shim::FileResult) -> Result<()> {
    if let crate::runtime::shim::FileResult::Failed { errno, message } = res {
        let msg = format!("episode {id}: {message}");
        return Err(match *errno {
            libc::ENOENT => EngineError::NotFound(msg),
            libc::EISDIR | libc::ENOTDIR | libc::EINVAL | libc::ELOOP | libc::EXDEV => {
                EngineError::BadRequest(msg)
            }
            _ => EngineError::Precondition(msg),
        });
    }
    let _ = path;
    Ok(())
}
