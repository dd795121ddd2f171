//! One actor per episode in use: the only owner of its sandbox, session and pending checkpoint.
//!
//! It takes the closed set of [`Command`]s below over a channel, one at a time, and answers each
//! on a oneshot. A command whose caller went away still runs to its end (a step records its
//! turn), and the next command waits for it. An actor with no sandbox stands for a stopped
//! episode: it can still be forked, rewound (which gives it a sandbox again) and deleted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::anyhow;
use sandtree_branching::{
    Episode, EpisodeId, EpisodeStatus, NewTurn, Node, NodeId, NodeKind, Observation, Policy,
    Session, TreeError, Verdict, VerdictKind, VolumeName,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::ports::{Chunk, ExecRequest, FileOp, FileOutcome};
use crate::sched::{ewma, Job, JobKind};
use crate::{
    blocking, cleanup_in_background, image_parent, materialize, preflight, pump, CheckpointWork,
    EngineError, Result, Shared, Taken, MAX_COMMAND_BYTES, MAX_CWD_BYTES, MAX_ENV_BYTES,
    MAX_FILE_BYTES, REFUTED,
};

type Reply<T> = oneshot::Sender<Result<T>>;

/// What an episode's actor does. Each answers on its own oneshot.
pub enum Command {
    Step {
        command: String,
        opts: StepOptions,
        chunks: Option<mpsc::UnboundedSender<Chunk>>,
        reply: Reply<StepOutcome>,
    },
    WriteFile {
        path: String,
        data: Vec<u8>,
        mode: u32,
        reply: Reply<StepOutcome>,
    },
    ReadFile {
        path: String,
        max_bytes: u64,
        reply: Reply<(Vec<u8>, u64)>,
    },
    /// Plans `count` forks at `turn` in the tree, after the pending checkpoint; the caller
    /// makes their sandboxes.
    Fork {
        turn: u32,
        count: u32,
        reply: Reply<Vec<(Episode, Node, Session)>>,
    },
    /// Answers whether the episode has a sandbox now that it had not before.
    Rewind {
        turn: u32,
        reply: Reply<bool>,
    },
    Delete {
        reply: Reply<()>,
    },
    /// Answers once the pending checkpoint has settled.
    Settle {
        reply: oneshot::Sender<()>,
    },
    /// Stops the sandbox (service shutdown); the actor ends.
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// The registry's entry for an actor.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Command>,
    token: u64,
    live: Arc<AtomicBool>,
}

impl Handle {
    /// Whether the episode has a running sandbox.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    pub(crate) async fn settle(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Settle { reply }).is_ok() {
            let _ = rx.await;
        }
    }

    pub(crate) async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { reply }).is_ok() {
            let _ = rx.await;
        }
    }
}

static TOKENS: AtomicU64 = AtomicU64::new(1);

/// Starts the actor of `ep` and registers it (replacing a stand-in for a stopped episode).
pub(crate) fn spawn(
    s: &Arc<Shared>,
    ep: &Episode,
    sandbox: Option<VolumeName>,
    session: Session,
    turn: u32,
) -> Handle {
    register(s, ep, sandbox, session, turn, true)
}

/// Makes the actor of `ep` and registers it: in place of any registered one when `replace`
/// (a new sandbox's owner replaces a stand-in for a stopped episode), else only if none is
/// registered, returning the registered one then, so an episode never has two owners.
fn register(
    s: &Arc<Shared>,
    ep: &Episode,
    sandbox: Option<VolumeName>,
    session: Session,
    turn: u32,
    replace: bool,
) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = Handle {
        tx,
        token: TOKENS.fetch_add(1, Ordering::Relaxed),
        live: Arc::new(AtomicBool::new(sandbox.is_some())),
    };
    let actor = Actor {
        s: s.clone(),
        id: ep.id.clone(),
        token: handle.token,
        policy: ep.policy,
        user: ep.meta.user,
        sandbox,
        live: handle.live.clone(),
        session,
        turn,
        pending: None,
        last_end: None,
        think_ms: None,
        thaw_failed: Arc::default(),
        diverged: None,
    };
    let mut reg = s.registry.lock().expect("registry lock");
    if !replace {
        if let Some(h) = reg.get(&ep.id) {
            return h.clone();
        }
    }
    reg.insert(ep.id.clone(), handle.clone());
    drop(reg);
    tokio::spawn(actor.run(rx));
    handle
}

/// The actor of `id`: the registered one, or a new one standing for a stopped episode.
pub(crate) fn handle_for(s: &Arc<Shared>, id: &EpisodeId) -> Result<Handle> {
    if let Some(h) = s.registry.lock().expect("registry lock").get(id) {
        return Ok(h.clone());
    }
    let ep = s.tree.episode(id)?;
    if ep.status == EpisodeStatus::Deleted {
        return Err(TreeError::EpisodeDeleted(id.clone()).into());
    }
    let rec = s.tree.turn(id, ep.turn)?;
    // Registered only if no other call registered one meanwhile.
    Ok(register(s, &ep, None, rec.session, ep.turn, false))
}

/// Sends a command to `id`'s actor and waits for its answer. An actor that ends before
/// answering (its episode was deleted meanwhile) answers for itself through the tree.
pub(crate) async fn call<T>(
    s: &Arc<Shared>,
    id: &EpisodeId,
    make: impl FnOnce(Reply<T>) -> Command,
) -> Result<T> {
    let (reply, rx) = oneshot::channel();
    let mut cmd = make(reply);
    for _ in 0..4 {
        let h = handle_for(s, id)?;
        match h.tx.send(cmd) {
            Ok(()) => {
                return match rx.await {
                    Ok(r) => r,
                    Err(_) => Err(gone(s, id)),
                }
            }
            Err(mpsc::error::SendError(c)) => {
                // That actor has ended: forget it if it is still registered, and ask again.
                let mut reg = s.registry.lock().expect("registry lock");
                if reg.get(id).is_some_and(|r| r.token == h.token) {
                    reg.remove(id);
                }
                cmd = c;
            }
        }
    }
    Err(gone(s, id))
}

fn gone(s: &Shared, id: &EpisodeId) -> EngineError {
    match s.tree.episode(id) {
        Ok(ep) if ep.status == EpisodeStatus::Deleted => {
            TreeError::EpisodeDeleted(id.clone()).into()
        }
        Err(e) => e.into(),
        Ok(_) => EngineError::Precondition(format!(
            "episode {id} was stopped by another call meanwhile; try again"
        )),
    }
}

struct Actor {
    s: Arc<Shared>,
    id: EpisodeId,
    token: u64,
    policy: Policy,
    /// (uid, gid) that turns run as (the image's `User`); None: root.
    user: Option<(u32, u32)>,
    /// The running sandbox (named by its volume); None: the episode is stopped.
    sandbox: Option<VolumeName>,
    live: Arc<AtomicBool>,
    session: Session,
    turn: u32,
    /// The checkpoint of the latest turn, while it runs.
    pending: Option<(NodeId, tokio::task::JoinHandle<()>)>,
    /// When the last turn ended, and the EWMA of this episode's think times (ms): the gap
    /// between a turn's end and the next command that needs the sandbox.
    last_end: Option<Instant>,
    think_ms: Option<f64>,
    /// Set by a checkpoint that could not thaw the sandbox afterwards.
    thaw_failed: Arc<AtomicBool>,
    /// Set when a step changed the sandbox but its turn could not be recorded: the sandbox is
    /// ahead of its tree, so further steps are refused until a rewind replaces it.
    diverged: Option<String>,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::Step {
                    command,
                    opts,
                    chunks,
                    reply,
                } => {
                    let _ = reply.send(self.step(command, opts, chunks).await);
                }
                Command::WriteFile {
                    path,
                    data,
                    mode,
                    reply,
                } => {
                    let _ = reply.send(self.write_file(path, data, mode).await);
                }
                Command::ReadFile {
                    path,
                    max_bytes,
                    reply,
                } => {
                    let _ = reply.send(self.read_file(path, max_bytes).await);
                }
                Command::Fork { turn, count, reply } => {
                    let _ = reply.send(self.fork(turn, count).await);
                }
                Command::Rewind { turn, reply } => {
                    let _ = reply.send(self.rewind(turn).await);
                }
                Command::Delete { reply } => {
                    let r = self.delete().await;
                    let done = r.is_ok();
                    let _ = reply.send(r);
                    if done {
                        return;
                    }
                }
                Command::Settle { reply } => {
                    self.wait_pending().await;
                    let _ = reply.send(());
                }
                Command::Shutdown { reply } => {
                    self.shutdown().await;
                    let _ = reply.send(());
                    return;
                }
            }
        }
        // Every handle is gone (the service is stopping, or a newer actor replaced this one).
        self.wait_pending().await;
    }

    fn sandbox(&self) -> Result<VolumeName> {
        self.sandbox.clone().ok_or_else(|| {
            EngineError::Precondition(format!(
                "episode {} is stopped (its sandbox is gone); fork or rewind it to continue",
                self.id
            ))
        })
    }

    async fn wait_pending(&mut self) {
        if let Some((node, p)) = self.pending.take() {
            // Waited for now: a checkpoint not yet started goes first (edf).
            if self.s.sched.promote(node) {
                pump(&self.s);
            }
            let _ = p.await;
        }
    }

    /// Waits for the pending checkpoint and refuses a sandbox that is ahead of its tree.
    /// Returns how long it waited, in microseconds.
    async fn ready(&mut self) -> Result<u64> {
        if let Some(why) = &self.diverged {
            return Err(EngineError::Precondition(format!(
                "episode {}: an earlier step changed the sandbox but its turn could not be \
                 recorded ({why}); rewind or fork it to continue",
                self.id
            )));
        }
        let waited = Instant::now();
        if let Some(end) = self.last_end.take() {
            let think = waited.saturating_duration_since(end);
            self.think_ms = Some(ewma(self.think_ms, think.as_secs_f64() * 1e3));
            self.s.sched.observe_think(think);
        }
        self.wait_pending().await;
        if self.thaw_failed.load(Ordering::SeqCst) {
            // The last checkpoint left the sandbox frozen: thaw it before it runs anything.
            let (runtime, sb) = (self.s.parts.runtime.clone(), self.sandbox()?);
            blocking(move || runtime.freeze(&sb, false))
                .await
                .map_err(|e| {
                    EngineError::Precondition(format!(
                        "episode {}: the sandbox stays frozen after a checkpoint and cannot be                          thawed ({e}); rewind or fork it to continue",
                        self.id
                    ))
                })?;
            self.thaw_failed.store(false, Ordering::SeqCst);
        }
        Ok(waited.elapsed().as_micros() as u64)
    }

    async fn step(
        &mut self,
        command: String,
        opts: StepOptions,
        chunks: Option<mpsc::UnboundedSender<Chunk>>,
    ) -> Result<StepOutcome> {
        let sb = self.sandbox()?;
        let waited_us = self.ready().await?;
        let config = &self.s.config;
        let req = ExecRequest {
            turn: self.turn + 1,
            command: command.clone(),
            cwd: opts.cwd.clone().unwrap_or_else(|| self.session.cwd.clone()),
            env: merge_env(&self.session.env, &opts.env),
            timeout_ms: if opts.timeout_ms == 0 {
                config.default_timeout_ms
            } else {
                opts.timeout_ms
            },
            out_cap: match opts.max_output {
                0 => config.out_cap,
                n => n as usize,
            },
            stdin: opts.stdin.clone(),
            stream: chunks.is_some(),
            user: self.user,
            cwd_strict: opts.cwd.is_some(),
        };
        let runtime = self.s.parts.runtime.clone();
        let id = self.id.clone();
        let res = blocking(move || {
            runtime.exec(&sb, req, &mut |c| {
                if let Some(tx) = &chunks {
                    let _ = tx.send(c);
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
        let mut env = res.env.clone().unwrap_or_else(|| self.session.env.clone());
        for (k, v) in &opts.env {
            if env.iter().any(|(k2, v2)| k2 == k && v2 == v) {
                env.retain(|(k2, _)| k2 != k);
                if let Some(old) = self.session.env.iter().find(|(k2, _)| k2 == k) {
                    env.push(old.clone());
                }
            }
        }
        env.sort();
        let cwd = match (&res.cwd, &opts.cwd) {
            (Some(after), Some(step_cwd)) if after == step_cwd => self.session.cwd.clone(),
            (Some(after), _) => after.clone(),
            (None, _) => self.session.cwd.clone(),
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
            .record(command, observation, Session { cwd, env })
            .await?;
        out.timed_out = res.timed_out;
        out.waited_us = waited_us;
        out.stdout = res.stdout;
        out.stderr = res.stderr;
        Ok(out)
    }

    async fn write_file(&mut self, path: String, data: Vec<u8>, mode: u32) -> Result<StepOutcome> {
        let sb = self.sandbox()?;
        let waited_us = self.ready().await?;
        let runtime = self.s.parts.runtime.clone();
        let (p, n) = (path.clone(), data.len());
        let mode = if mode == 0 { 0o644 } else { mode };
        let started = Instant::now();
        let res = blocking(move || runtime.file(&sb, &p, FileOp::Write { data, mode })).await?;
        file_error(&self.id, &res)?;
        let observation = Observation {
            duration_ms: started.elapsed().as_millis() as u64,
            ..Default::default()
        };
        let session = self.session.clone();
        let mut out = self
            .record(
                format!("# sandtree write {path} ({n} bytes, mode {mode:o})"),
                observation,
                session,
            )
            .await?;
        out.waited_us = waited_us;
        Ok(out)
    }

    async fn read_file(&mut self, path: String, max_bytes: u64) -> Result<(Vec<u8>, u64)> {
        let sb = self.sandbox()?;
        let runtime = self.s.parts.runtime.clone();
        let res = blocking(move || runtime.file(&sb, &path, FileOp::Read { max_bytes })).await?;
        file_error(&self.id, &res)?;
        match res {
            FileOutcome::Read { data, size } => Ok((data, size)),
            other => Err(EngineError::Internal(anyhow!(
                "unexpected file result {other:?}"
            ))),
        }
    }

    /// Records a turn that already ran in the sandbox: its verdict, its turn record and its
    /// checkpoint (started in the background). A verdict that cannot be made is the safest one,
    /// and a turn that cannot be recorded marks the sandbox as ahead of its tree.
    async fn record(
        &mut self,
        action: String,
        observation: Observation,
        session: Session,
    ) -> Result<StepOutcome> {
        let id = self.id.clone();
        let (verdict, new_node) = match self.verdict().await {
            Ok(v) => v,
            Err(e) => {
                warn!(episode = %id, error = %e, "verdict failed; checkpointing everything");
                let full = self.policy != Policy::None;
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
        let verdict_kind = match verdict.kind {
            VerdictKind::None => "none",
            VerdictKind::Fs => "fs",
            VerdictKind::Proc => "proc",
        };
        metrics::counter!(crate::stats::VERDICTS, "kind" => verdict_kind).increment(1);
        let appended = self.s.tree.append_turn(
            &id,
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
                self.diverged = Some(e.to_string());
                let msg = format!(
                    "episode {id}: the command ran but its turn could not be recorded: {e}; \
                     the episode takes no more steps until it is rewound or forked"
                );
                // A full data-dir disk is the host's resource, not a bug.
                return Err(if e.is_disk_full() {
                    EngineError::Exhausted(msg)
                } else {
                    EngineError::Internal(anyhow!(msg))
                });
            }
        };
        self.turn = rec.turn;
        self.session = session;
        if let Some(node) = node {
            self.pending = Some((node.id, self.spawn_checkpoint(node)));
        }
        self.last_end = Some(Instant::now());
        Ok(StepOutcome {
            turn: rec.turn,
            stdout: observation.stdout.clone().into_bytes(),
            stderr: observation.stderr.clone().into_bytes(),
            observation,
            cwd: self.session.cwd.clone(),
            verdict,
            node: rec.node,
            timed_out: false,
            waited_us: 0,
        })
    }

    /// The turn's verdict and the node it needs ([`sandtree_branching::policy::decide`]). The
    /// inspector's epoch ends here under every policy; `full` always checkpoints everything and
    /// `none` never does, whatever the inspector saw.
    async fn verdict(&self) -> Result<(Verdict, Option<NodeKind>)> {
        let (parts, storage, sb, policy) = (
            self.s.parts.clone(),
            self.s.storage.clone(),
            self.sandbox()?,
            self.policy,
        );
        blocking(move || {
            let (mut reasons, observed, others_alive) = match policy {
                Policy::Auto => {
                    let (v, others) = parts.inspector.judge(&sb, storage.as_ref())?;
                    (v.reasons, v.kind, others)
                }
                Policy::None | Policy::Full => {
                    let mut reasons = vec![if policy == Policy::None {
                        "policy none: chat-only".to_string()
                    } else {
                        "policy full: checkpoint every turn".to_string()
                    }];
                    if let Some(v) = parts.inspector.observe(&sb) {
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

    fn spawn_checkpoint(&self, node: Node) -> tokio::task::JoinHandle<()> {
        let s = self.s.clone();
        // Due when the episode's next step is expected.
        let deadline = Instant::now() + s.sched.think_for(self.think_ms);
        let sb = self
            .sandbox
            .clone()
            .expect("a step ran, so there is a sandbox");
        let episode = self.id.clone();
        let images = s
            .config
            .data_dir
            .join("images")
            .join(format!("n{}", node.id.0));
        // auto keeps only the pages a dump changed; full stays the naive per-turn baseline that
        // writes every image whole.
        let image_parent = match (self.policy, &node.kind) {
            (Policy::Auto, NodeKind::Full) if s.config.max_image_chain > 0 => {
                image_parent(&s.tree, node.parent)
            }
            _ => None,
        };
        let max_chain = s.config.max_image_chain;
        let thaw_failed = self.thaw_failed.clone();
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        s.in_flight
            .lock()
            .expect("in-flight lock")
            .insert(node.id, done_rx);
        // Queued now, so that a step arriving next finds it to promote.
        let node_id = node.id;
        let kind = match node.kind {
            NodeKind::Fs => JobKind::Fs,
            _ => JobKind::Full,
        };
        let (reply, rx) = oneshot::channel();
        s.sched.push(
            Job {
                episode: episode.clone(),
                node: node_id,
                kind,
                deadline,
            },
            CheckpointWork {
                sb,
                kind: node.kind.clone(),
                parent: node.parent,
                images,
                image_parent: image_parent.map(|(n, d): (NodeId, PathBuf)| (n, d, max_chain)),
                thaw_failed,
                reply,
            },
        );
        pump(&s);
        tokio::spawn(async move {
            // Whatever happens below (even a panic), the node counts as settled at the end.
            struct Settled(NodeId, tokio::sync::watch::Sender<bool>, Arc<Shared>);
            impl Drop for Settled {
                fn drop(&mut self) {
                    self.2
                        .in_flight
                        .lock()
                        .expect("in-flight lock")
                        .remove(&self.0);
                    let _ = self.1.send(true);
                }
            }
            let _settled = Settled(node.id, done_tx, s.clone());
            let r = rx
                .await
                .map_err(|_| anyhow!("the checkpoint ended without a result"))
                .and_then(|r| r);
            let kind = if kind == JobKind::Fs { "fs" } else { "full" };
            match r {
                Ok(Taken::Node(art)) => {
                    metrics::counter!(crate::stats::CHECKPOINT_BYTES).increment(art.bytes);
                    metrics::counter!(crate::stats::CHECKPOINTS, "kind" => kind, "result" => "committed")
                        .increment(1);
                    if let Err(e) = s.tree.commit_node(node_id, art) {
                        warn!(%episode, node = %node_id, error = %e, "commit failed");
                    }
                }
                // Nothing was taken: the turn moves to the parent node, in one transaction. A
                // crash before it leaves the node pending, which a restart abandons as any.
                Ok(Taken::Refuted) => match s.tree.refute_node(node_id, REFUTED) {
                    Ok((parent, _)) => {
                        s.refuted.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(crate::stats::CHECKPOINTS, "kind" => kind, "result" => "refuted")
                            .increment(1);
                        metrics::counter!(crate::stats::FS_VERDICTS_REFUTED).increment(1);
                        debug!(%episode, node = %node_id, parent = %parent.id, "fs verdict refuted: no storage change");
                    }
                    Err(e) => {
                        // Its parent went away meanwhile (evicted): no snapshot exists for it.
                        metrics::counter!(crate::stats::CHECKPOINTS, "kind" => kind, "result" => "failed")
                            .increment(1);
                        warn!(%episode, node = %node_id, error = %e, "cannot refute the node");
                        let _ = s.tree.fail_node(
                            node_id,
                            &format!("no snapshot taken (no change), and the refute failed: {e}"),
                        );
                    }
                },
                Err(e) => {
                    metrics::counter!(crate::stats::CHECKPOINTS, "kind" => kind, "result" => "failed")
                        .increment(1);
                    warn!(%episode, node = %node_id, error = format!("{e:#}"), "checkpoint failed");
                    let _ = s.tree.fail_node(node_id, &format!("{e:#}"));
                }
            }
        })
    }

    async fn fork(&mut self, turn: u32, count: u32) -> Result<Vec<(Episode, Node, Session)>> {
        self.wait_pending().await;
        preflight(&self.s.tree, &self.id, turn)?;
        Ok(self.s.tree.fork(&self.id, turn, count as usize)?)
    }

    async fn rewind(&mut self, turn: u32) -> Result<bool> {
        self.wait_pending().await;
        // Checked again here, where nothing else can change the episode, before tearing down.
        preflight(&self.s.tree, &self.id, turn)?;
        let was_live = self.sandbox.is_some();
        let next = match &self.sandbox {
            Some(v) => v.next(),
            None => self
                .s
                .tree
                .episode(&self.id)?
                .volume
                .as_deref()
                .and_then(VolumeName::parse)
                .map_or_else(|| VolumeName::first(&self.id).next(), |v| v.next()),
        };
        // The old sandbox stops now; its volume and the garbage are freed after the rewind
        // answers, so the trainer waits only for the restore.
        if let Some(v) = &self.sandbox {
            stop_sandbox(&self.s, v).await?;
        }
        let old_volume = self.sandbox.take();
        self.live.store(false, Ordering::SeqCst);
        let r = async {
            let (ep, node, session) = self.s.tree.rewind(&self.id, turn)?;
            materialize(&self.s, &node, &next, ep.meta.limits).await?;
            Ok::<_, EngineError>(session)
        }
        .await;
        cleanup_in_background(&self.s, old_volume);
        match r {
            Ok(session) => {
                self.sandbox = Some(next);
                self.thaw_failed.store(false, Ordering::SeqCst);
                self.live.store(true, Ordering::SeqCst);
                self.session = session;
                self.turn = turn;
                self.diverged = None;
                Ok(!was_live)
            }
            Err(e) => {
                let _ = self.s.tree.set_status(&self.id, EpisodeStatus::Stopped);
                if was_live {
                    self.s.live.fetch_sub(1, Ordering::SeqCst);
                }
                Err(e)
            }
        }
    }

    /// Stops the sandbox and destroys its volume; the episode has no sandbox afterwards. A
    /// sandbox that cannot be stopped stays the episode's.
    async fn teardown(&mut self) -> Result<()> {
        self.wait_pending().await;
        if let Some(v) = self.sandbox.clone() {
            stop_sandbox(&self.s, &v).await?;
            self.sandbox = None;
            self.live.store(false, Ordering::SeqCst);
            self.s.live.fetch_sub(1, Ordering::SeqCst);
            let (storage, name) = (self.s.storage.clone(), v.to_string());
            if let Err(e) = blocking(move || Ok(storage.destroy_volume(&name)?)).await {
                // The next start's reconcile removes it.
                warn!(volume = %v, error = %e, "cannot destroy the volume");
            }
        }
        Ok(())
    }

    async fn delete(&mut self) -> Result<()> {
        self.teardown().await?;
        self.s.tree.delete_episode(&self.id)?;
        self.unregister();
        Ok(())
    }

    async fn shutdown(&mut self) {
        let had = self.sandbox.is_some();
        if let Err(e) = self.teardown().await {
            warn!(episode = %self.id, error = %e, "shutdown leaves a sandbox to the next start's reconcile");
        }
        if had {
            let _ = self.s.tree.set_status(&self.id, EpisodeStatus::Stopped);
            let _ = self.s.tree.set_volume(&self.id, None);
        }
        self.unregister();
    }

    fn unregister(&self) {
        let mut reg = self.s.registry.lock().expect("registry lock");
        if reg.get(&self.id).is_some_and(|h| h.token == self.token) {
            reg.remove(&self.id);
        }
    }
}

/// Kills a sandbox and stops watching it; its volume stays. An error leaves the sandbox as it
/// was (still owned by its actor, which answers with the error).
async fn stop_sandbox(s: &Shared, sb: &VolumeName) -> Result<()> {
    let (parts, sb2) = (s.parts.clone(), sb.clone());
    blocking(move || {
        parts.runtime.destroy(&sb2)?;
        parts.inspector.detach(&sb2);
        Ok(())
    })
    .await
    .map_err(|e| {
        warn!(sandbox = %sb, error = %e, "cannot stop the sandbox");
        EngineError::Internal(anyhow!("cannot stop sandbox {sb}: {e}"))
    })
}

/// What one step returns.
#[derive(Debug, Clone)]
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
    pub(crate) fn validate(&self, out_cap: usize) -> Result<()> {
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
        if env_bytes > MAX_ENV_BYTES {
            return bad(format!(
                "the step's env is {env_bytes} bytes; the limit is {MAX_ENV_BYTES}"
            ));
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') || cwd.contains('\0') || cwd.len() > MAX_CWD_BYTES {
                return bad(format!(
                    "cwd {cwd:?} must be an absolute path of at most {MAX_CWD_BYTES} bytes"
                ));
            }
        }
        if self.stdin.len() as u64 > MAX_FILE_BYTES {
            return bad(format!(
                "stdin is {} bytes; the limit is {MAX_FILE_BYTES}",
                self.stdin.len(),
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

pub(crate) fn check_command(command: &str) -> Result<()> {
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
    Ok(())
}

/// The session's environment with this step's variables on top.
pub(crate) fn merge_env(
    session: &[(String, String)],
    step: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = session
        .iter()
        .filter(|(k, _)| !step.iter().any(|(k2, _)| k2 == k))
        .cloned()
        .collect();
    env.extend(step.iter().cloned());
    env
}

/// A refused file operation as the error the caller can act on.
fn file_error(id: &EpisodeId, res: &FileOutcome) -> Result<()> {
    if let FileOutcome::Failed { errno, message } = res {
        let msg = format!("episode {id}: {message}");
        return Err(match *errno {
            libc::ENOENT => EngineError::NotFound(msg),
            libc::EISDIR | libc::ENOTDIR | libc::EINVAL | libc::ELOOP | libc::EXDEV => {
                EngineError::BadRequest(msg)
            }
            _ => EngineError::Precondition(msg),
        });
    }
    Ok(())
}
