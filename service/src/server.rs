//! The gRPC edge: tonic service on a unix socket (and, with `serve --listen`, on TCP behind
//! [`TokenCheck`]). Domain types become protobuf here and only here, and every engine error
//! becomes a `tonic::Status` in [`status`].

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use sandtree_branching::{EpisodeId, Policy, TreeError};
use sandtree_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status};

use sandtree_engine::{percentile, Engine, EngineError};

pub struct Api {
    pub engine: Arc<Engine>,
    pub image_lock: Arc<tokio::sync::Mutex<()>>,
}

/// The one place where errors become gRPC statuses. Each carries its kind in the
/// `sandtree-error` metadata key (not_found, invalid_argument, out_of_range, not_restorable,
/// precondition, exhausted, internal), so clients can tell apart what one gRPC code covers.
pub fn status(e: EngineError) -> Status {
    let msg = e.to_string();
    let (code, kind) = match e {
        EngineError::BadRequest(_) => (Code::InvalidArgument, "invalid_argument"),
        EngineError::NotFound(_) => (Code::NotFound, "not_found"),
        EngineError::Precondition(_) => (Code::FailedPrecondition, "precondition"),
        EngineError::Exhausted(_) => (Code::ResourceExhausted, "exhausted"),
        EngineError::NotRestorable(_) => (Code::FailedPrecondition, "not_restorable"),
        EngineError::Internal(_) => (Code::Internal, "internal"),
        EngineError::Tree(t) => match t {
            TreeError::UnknownEpisode(_) | TreeError::UnknownNode(_) => {
                (Code::NotFound, "not_found")
            }
            TreeError::TurnOutOfRange { .. } | TreeError::InvalidArgument(_) => {
                (Code::OutOfRange, "out_of_range")
            }
            // The turn has no committed checkpoint to fork or rewind to.
            TreeError::NodeCollected { .. } | TreeError::NodeNotCommitted { .. } => {
                (Code::FailedPrecondition, "not_restorable")
            }
            TreeError::EpisodeDeleted(_)
            | TreeError::EpisodeNotRunning { .. }
            | TreeError::NodeNotPending { .. } => (Code::FailedPrecondition, "precondition"),
            // The data dir's disk is full: this call failed, the next may work once it has room.
            t if t.is_disk_full() => (Code::ResourceExhausted, "exhausted"),
            _ => (Code::Internal, "internal"),
        },
    };
    let mut st = Status::new(code, msg);
    st.metadata_mut().insert(
        "sandtree-error",
        tonic::metadata::MetadataValue::from_static(kind),
    );
    st
}

/// An error found at the edge, before the engine: the same `sandtree-error` kinds as
/// [`status`], and `unauthenticated` for a TCP call without the right token.
fn edge_status(code: Code, msg: impl Into<String>) -> Status {
    let kind = match code {
        Code::InvalidArgument => "invalid_argument",
        Code::Unauthenticated => "unauthenticated",
        _ => "internal",
    };
    let mut st = Status::new(code, msg.into());
    st.metadata_mut().insert(
        "sandtree-error",
        tonic::metadata::MetadataValue::from_static(kind),
    );
    st
}

/// The check in front of every call on the TCP listener: the call must carry
/// `authorization: Bearer <token>` with the service's token, compared in constant time (`subtle`;
/// only the token's length can show in the timing). A call without it is refused with
/// UNAUTHENTICATED before it reaches the service, so it has no effect.
#[derive(Clone)]
pub struct TokenCheck {
    token: Arc<[u8]>,
}

impl TokenCheck {
    pub fn new(token: &str) -> TokenCheck {
        TokenCheck {
            token: token.as_bytes().into(),
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        use subtle::ConstantTimeEq;
        let given = req
            .metadata()
            .get(sandtree_client::TOKEN_KEY)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        let peer = req.remote_addr();
        match given {
            Some(t) if bool::from(t.ct_eq(&self.token)) => Ok(req),
            Some(_) => {
                tracing::warn!(?peer, "refused a call over TCP: wrong token");
                Err(edge_status(
                    Code::Unauthenticated,
                    "wrong token: not the one of this service's --token-file",
                ))
            }
            None => {
                tracing::warn!(?peer, "refused a call over TCP: no token");
                Err(edge_status(
                    Code::Unauthenticated,
                    "missing token: a call over TCP must carry `authorization: Bearer <token>` \
                     (sandtree --token-file FILE, or SANDTREE_TOKEN_FILE)",
                ))
            }
        }
    }
}

fn episode_id(s: &str) -> Result<EpisodeId, Status> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(edge_status(
            Code::InvalidArgument,
            format!("invalid episode id {s:?}"),
        ));
    }
    Ok(EpisodeId::new(s))
}

fn info(ep: &sandtree_branching::Episode) -> pb::EpisodeInfo {
    pb::EpisodeInfo {
        id: ep.id.to_string(),
        image: ep.image.clone(),
        policy: ep.policy.to_string(),
        status: ep.status.to_string(),
        turn: ep.turn,
        forked_from: ep
            .forked_from
            .as_ref()
            .map(|(e, t)| format!("{e}@{t}"))
            .unwrap_or_default(),
        labels: ep
            .meta
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn turn_info(
    t: sandtree_branching::TurnRecord,
    n: &sandtree_branching::Node,
    kind: sandtree_branching::TurnKind,
    outputs: bool,
) -> pb::TurnInfo {
    let (stdout, stderr, duration_ms) = if outputs {
        let o = &t.observation;
        (
            o.stdout.clone().into_bytes(),
            o.stderr.clone().into_bytes(),
            o.duration_ms,
        )
    } else {
        Default::default()
    };
    let shared = kind == sandtree_branching::TurnKind::Shared;
    pb::TurnInfo {
        stdout,
        stderr,
        duration_ms,
        turn: t.turn,
        action: t.action,
        exit_code: t.observation.exit_code,
        verdict: verdict_str(t.verdict.kind).into(),
        reasons: t.verdict.reasons,
        node: n.id.0,
        kind: kind.as_str().into(),
        // A shared turn wrote nothing: its node's bytes belong to the turn that made it.
        bytes: if shared { 0 } else { n.bytes },
        image_bytes: if shared { 0 } else { n.image_bytes },
        image_dumped_bytes: if shared { 0 } else { dumped(n) },
        image_parent: match n.image_parent {
            Some(p) if !shared => p.0,
            _ => 0,
        },
        state: match &n.state {
            sandtree_branching::NodeState::Failed { .. } => "failed".into(),
            s => s.to_string(),
        },
        cwd: t.session.cwd,
        stdout_truncated: outputs && t.observation.stdout_truncated,
        stderr_truncated: outputs && t.observation.stderr_truncated,
        ..Default::default()
    }
}

fn step_response(o: sandtree_engine::StepOutcome) -> pb::StepResponse {
    pb::StepResponse {
        turn: o.turn,
        stdout: o.stdout,
        stderr: o.stderr,
        stdout_truncated: o.observation.stdout_truncated,
        stderr_truncated: o.observation.stderr_truncated,
        exit_code: o.observation.exit_code,
        duration_ms: o.observation.duration_ms,
        cwd: o.cwd,
        verdict: verdict_str(o.verdict.kind).into(),
        reasons: o.verdict.reasons,
        node: o.node.0,
        timed_out: o.timed_out,
        accepted_us: o.waited_us,
    }
}

fn step_options(r: &pb::StepRequest) -> sandtree_engine::StepOptions {
    let mut env: Vec<(String, String)> =
        r.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.sort();
    sandtree_engine::StepOptions {
        timeout_ms: r.timeout_ms,
        env,
        cwd: (!r.cwd.is_empty()).then(|| r.cwd.clone()),
        stdin: r.stdin.clone(),
        max_output: r.max_output_bytes,
    }
}

/// The page bytes that `dirs`, whole CRIU images of consecutive turns, would not keep had each
/// kept only the pages that differ from the previous one's (chains capped at `max_chain`, as
/// auto's are). Reads the images; rewrites nothing.
fn page_dedup_saved(dirs: &[std::path::PathBuf], max_chain: usize) -> anyhow::Result<u64> {
    use anyhow::Context;
    let (mut saved, mut prev, mut depth) = (0u64, None::<&Path>, 0usize);
    for dir in dirs {
        if let Some(p) = prev.filter(|_| depth < max_chain) {
            let s = sandtree_runtime::pages::plan_against(dir, p)
                .with_context(|| format!("pricing {} against {}", dir.display(), p.display()))?;
            saved += s.dumped_bytes - s.kept_bytes;
            depth = if s.depth > 0 { depth + 1 } else { 0 };
        } else {
            depth = 0;
        }
        prev = Some(dir);
    }
    Ok(saved)
}

type StepEventStream = Pin<Box<dyn Stream<Item = Result<pb::StepEvent, Status>> + Send>>;

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::ImageProgress, Status>> + Send>>;

impl Api {
    /// [`page_dedup_saved`] over the images of episode `id`'s live path (its committed full
    /// turns; failed nodes have no image to price).
    async fn page_dedup_saved(&self, id: &str) -> Result<u64, Status> {
        let (_, turns) = self
            .engine
            .tree_view(&episode_id(id)?)
            .await
            .map_err(status)?;
        let mut dirs = Vec::new();
        for (_, n, kind) in turns {
            if kind != sandtree_branching::TurnKind::Full
                || !matches!(n.state, sandtree_branching::NodeState::Committed)
            {
                continue;
            }
            let dir = n.images.ok_or_else(|| {
                edge_status(
                    Code::Internal,
                    format!("committed full node {} has no CRIU images", n.id),
                )
            })?;
            dirs.push(std::path::PathBuf::from(dir));
        }
        let max_chain = self.engine.config().max_image_chain;
        tokio::task::spawn_blocking(move || page_dedup_saved(&dirs, max_chain))
            .await
            .map_err(|e| edge_status(Code::Internal, e.to_string()))?
            .map_err(|e| edge_status(Code::Internal, format!("{e:#}")))
    }

    fn image_job(
        &self,
        job: impl FnOnce(&(dyn Fn(String) + Sync + Send)) -> anyhow::Result<()> + Send + 'static,
    ) -> ProgressStream {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<pb::ImageProgress, Status>>();
        let lock = self.image_lock.clone();
        tokio::spawn(async move {
            let _g = lock.lock().await;
            let tx2 = tx.clone();
            let r = tokio::task::spawn_blocking(move || {
                let progress = move |m: String| {
                    let _ = tx2.send(Ok(pb::ImageProgress {
                        message: m,
                        done: false,
                    }));
                };
                job(&progress)
            })
            .await;
            let _ = tx.send(match r {
                Ok(Ok(())) => Ok(pb::ImageProgress {
                    message: "done".into(),
                    done: true,
                }),
                Ok(Err(e)) => Err(edge_status(Code::InvalidArgument, format!("{e:#}"))),
                Err(e) => Err(edge_status(
                    Code::Internal,
                    format!("image task panicked: {e}"),
                )),
            });
        });
        Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl pb::sandtree_server::Sandtree for Api {
    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let probes = tokio::task::spawn_blocking(crate::doctor::probes)
            .await
            .map_err(|e| edge_status(Code::Internal, e.to_string()))?;
        Ok(Response::new(pb::HealthResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            storage: self.engine.storage().describe(),
            probes: probes
                .into_iter()
                .map(|p| pb::Probe {
                    name: p.name,
                    ok: p.ok,
                    detail: p.detail,
                    fix: p.fix,
                })
                .collect(),
            inspector: self.engine.inspector().status().description,
        }))
    }

    async fn create_episode(
        &self,
        req: Request<pb::CreateEpisodeRequest>,
    ) -> Result<Response<pb::EpisodeInfo>, Status> {
        let r = req.into_inner();
        let policy: Policy = if r.policy.is_empty() {
            Policy::Auto
        } else {
            r.policy
                .parse()
                .map_err(|e| edge_status(Code::InvalidArgument, format!("{e}")))?
        };
        sandtree_storage::validate_name(&r.image).map_err(|_| {
            edge_status(
                Code::InvalidArgument,
                format!("invalid image name {:?}", r.image),
            )
        })?;
        let meta = sandtree_branching::EpisodeMeta {
            labels: r.labels.into_iter().collect(),
            limits: self
                .engine
                .episode_limits(r.memory_mib, r.pids, r.cpus)
                .map_err(status)?,
            // From the image's config, at create.
            user: None,
        };
        let id = self
            .engine
            .create(&r.image, policy, meta)
            .await
            .map_err(status)?;
        let ep = self
            .engine
            .tree()
            .episode(&id)
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(info(&ep)))
    }

    async fn step(
        &self,
        req: Request<pb::StepRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let r = req.into_inner();
        let id = episode_id(&r.episode)?;
        // The step runs to its end and records its turn even if the client goes away: a
        // dropped request must not leave a command running in the sandbox without a turn, or
        // let the next step overlap it.
        let engine = self.engine.clone();
        let opts = step_options(&r);
        let o = tokio::spawn(async move { engine.step(&id, r.command, opts, None).await })
            .await
            .map_err(|e| edge_status(Code::Internal, format!("step task failed: {e}")))?
            .map_err(status)?;
        Ok(Response::new(step_response(o)))
    }

    type StepStreamStream = StepEventStream;
    async fn step_stream(
        &self,
        req: Request<pb::StepRequest>,
    ) -> Result<Response<StepEventStream>, Status> {
        use pb::step_event::Event;
        let r = req.into_inner();
        let id = episode_id(&r.episode)?;
        let engine = self.engine.clone();
        let opts = step_options(&r);
        let (chunk_tx, mut chunk_rx) = tokio::sync::mpsc::unbounded_channel();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // As for Step, the step runs to its end whether or not anyone still listens.
        let step =
            tokio::spawn(async move { engine.step(&id, r.command, opts, Some(chunk_tx)).await });
        tokio::spawn(async move {
            while let Some(c) = chunk_rx.recv().await {
                let ev = match c {
                    sandtree_engine::Chunk::Stdout(b) => Event::Stdout(b),
                    sandtree_engine::Chunk::Stderr(b) => Event::Stderr(b),
                };
                let _ = tx.send(Ok(pb::StepEvent { event: Some(ev) }));
            }
            let end = match step.await {
                Ok(Ok(o)) => Ok(pb::StepEvent {
                    event: Some(Event::Result(step_response(o))),
                }),
                Ok(Err(e)) => Err(status(e)),
                Err(e) => Err(edge_status(
                    Code::Internal,
                    format!("step task failed: {e}"),
                )),
            };
            let _ = tx.send(end);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn write_file(
        &self,
        req: Request<pb::WriteFileRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let r = req.into_inner();
        let id = episode_id(&r.episode)?;
        let engine = self.engine.clone();
        let o = tokio::spawn(async move { engine.write_file(&id, r.path, r.data, r.mode).await })
            .await
            .map_err(|e| edge_status(Code::Internal, format!("write task failed: {e}")))?
            .map_err(status)?;
        Ok(Response::new(step_response(o)))
    }

    async fn read_file(
        &self,
        req: Request<pb::ReadFileRequest>,
    ) -> Result<Response<pb::ReadFileResponse>, Status> {
        let r = req.into_inner();
        let id = episode_id(&r.episode)?;
        let (data, size) = self
            .engine
            .read_file(&id, r.path, r.max_bytes)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReadFileResponse { data, size }))
    }

    async fn delete_episode(
        &self,
        req: Request<pb::DeleteEpisodeRequest>,
    ) -> Result<Response<pb::DeleteEpisodeResponse>, Status> {
        let id = episode_id(&req.into_inner().episode)?;
        self.engine.delete(&id).await.map_err(status)?;
        Ok(Response::new(pb::DeleteEpisodeResponse {}))
    }

    async fn fork(
        &self,
        req: Request<pb::ForkRequest>,
    ) -> Result<Response<pb::ForkResponse>, Status> {
        let r = req.into_inner();
        let id = episode_id(&r.episode)?;
        if r.keep_warm > sandtree_engine::MAX_FORK_COUNT {
            return Err(edge_status(
                Code::InvalidArgument,
                format!(
                    "keep_warm must be 0..={}, got {}",
                    sandtree_engine::MAX_FORK_COUNT,
                    r.keep_warm
                ),
            ));
        }
        let out = self
            .engine
            .fork_with(&id, r.turn, r.count, r.keep_warm)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ForkResponse {
            episodes: out.ids.into_iter().map(|i| i.to_string()).collect(),
            warm: out.warm as u32,
        }))
    }

    async fn prepare(
        &self,
        req: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let r = req.into_inner();
        let id = episode_id(&r.episode)?;
        let p = self
            .engine
            .prepare(&id, r.turn, r.count)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::PrepareResponse {
            ready: p.ready,
            memory_bytes: p.node_bytes,
            warm_bytes: p.total_bytes,
            evicted: p.evicted,
        }))
    }

    async fn rewind(
        &self,
        req: Request<pb::RewindRequest>,
    ) -> Result<Response<pb::RewindResponse>, Status> {
        let r = req.into_inner();
        let id = episode_id(&r.episode)?;
        self.engine.rewind(&id, r.turn).await.map_err(status)?;
        Ok(Response::new(pb::RewindResponse { turn: r.turn }))
    }

    async fn tree(
        &self,
        req: Request<pb::TreeRequest>,
    ) -> Result<Response<pb::TreeResponse>, Status> {
        let r = req.into_inner();
        let id = episode_id(&r.episode)?;
        let (ep, turns) = self.engine.tree_view(&id).await.map_err(status)?;
        let mut resp = pb::TreeResponse {
            episode: Some(info(&ep)),
            turns: turns
                .into_iter()
                .map(|(t, n, kind)| turn_info(t, &n, kind, r.outputs))
                .collect(),
            ..Default::default()
        };
        if r.whole {
            let (fam, nodes) = self.engine.family_view(&id).await.map_err(status)?;
            resp.family_root = fam.root.to_string();
            resp.family_episodes = fam.episodes.iter().map(|e| e.to_string()).collect();
            resp.family = fam
                .turns
                .into_iter()
                .zip(nodes)
                .map(|(ft, (n, kind))| {
                    let mut ti = turn_info(ft.record.clone(), &n, kind, r.outputs);
                    ti.record = ft.record.id.0;
                    ti.parent_record = ft.record.parent.map_or(0, |p| p.0);
                    ti.episodes = ft.episodes.iter().map(|e| e.to_string()).collect();
                    ti.forks = ft.forks.iter().map(|e| e.to_string()).collect();
                    ti
                })
                .collect();
        }
        Ok(Response::new(resp))
    }

    async fn stats(
        &self,
        req: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let req = req.into_inner();
        let reset = req.reset_timings;
        let e = &self.engine;
        let mut resp = pb::StatsResponse::default();
        let memory: std::collections::HashMap<_, _> =
            e.sandbox_memory().map_err(status)?.into_iter().collect();
        for (ep, c) in e.charges().await.map_err(status)? {
            let s = pb::EpisodeStats {
                id: ep.id.to_string(),
                policy: ep.policy.to_string(),
                status: ep.status.to_string(),
                turn: ep.turn,
                checkpoint_bytes: c.checkpoint_bytes,
                image_bytes: c.image_bytes,
                image_dumped_bytes: c.image_dumped_bytes,
                nodes_fs: c.nodes_fs,
                nodes_full: c.nodes_full,
                turns_shared: c.turns_shared,
                page_dedup_saved_bytes: 0,
                memory_bytes: memory.get(&ep.id).copied().unwrap_or(0),
                fs_verdicts_refuted: c.fs_verdicts_refuted,
            };
            resp.sandbox_memory_bytes += s.memory_bytes;
            resp.checkpoint_bytes += s.checkpoint_bytes;
            resp.image_bytes += s.image_bytes;
            resp.image_dumped_bytes += s.image_dumped_bytes;
            resp.nodes_fs += s.nodes_fs;
            resp.nodes_full += s.nodes_full;
            resp.turns_shared += s.turns_shared;
            resp.episodes += 1;
            resp.per_episode.push(s);
        }
        if req.price_page_dedup {
            for s in resp
                .per_episode
                .iter_mut()
                .filter(|s| s.policy == "full" && s.status != "deleted")
            {
                s.page_dedup_saved_bytes = self.page_dedup_saved(&s.id).await?;
            }
        }
        let v = e.inspector().status();
        resp.inspector = v.description;
        resp.inspector_loaded = v.loaded;
        resp.bpf_map_bytes = v.map_bytes;
        resp.watched_sandboxes = v.watched_sandboxes as u32;
        resp.sandbox_map_bytes = v.sandbox_map_bytes;
        resp.verdicts_checked = v.verdicts_checked;
        resp.verdicts_unsafe = v.verdicts_unsafe;
        resp.verdicts_fs_without_change = v.verdicts_fs_without_change;
        resp.fs_verdicts_refuted = e.fs_verdicts_refuted();
        let t = e.timings();
        resp.dump_ms_p50 = percentile(&t.dump, 0.5);
        resp.dump_ms_p99 = percentile(&t.dump, 0.99);
        resp.snapshot_ms_p50 = percentile(&t.snapshot, 0.5);
        resp.snapshot_ms_p99 = percentile(&t.snapshot, 0.99);
        resp.restore_ms_p50 = percentile(&t.restore, 0.5);
        resp.restore_ms_p99 = percentile(&t.restore, 0.99);
        resp.checkpoint_ms_p50 = percentile(&t.checkpoint, 0.5);
        resp.checkpoint_ms_p99 = percentile(&t.checkpoint, 0.99);
        resp.dedup_ms_p50 = percentile(&t.dedup, 0.5);
        resp.dedup_ms_p99 = percentile(&t.dedup, 0.99);
        resp.ksm_saved_bytes = sandtree_runtime::ksm::saved_bytes().unwrap_or(0);
        resp.criu_restore_ms_p50 = percentile(&t.criu_restore, 0.5);
        resp.criu_restore_ms_p99 = percentile(&t.criu_restore, 0.99);
        resp.queue_wait_ms_p50 = percentile(&t.queue_wait, 0.5);
        resp.queue_wait_ms_p99 = percentile(&t.queue_wait, 0.99);
        resp.queue_wait_ms_max = percentile(&t.queue_wait, 1.0);
        let (discipline, cap, counts) = e.scheduler();
        resp.scheduler = discipline.to_string();
        resp.checkpoint_slots = cap as u32;
        resp.checkpoints_promoted = counts.promoted;
        resp.checkpoint_batches = counts.batches;
        resp.checkpoints_batched = counts.batched_jobs;
        let w = e.warm_counts();
        resp.warm_copies = w.copies as u32;
        resp.warm_memory_bytes = w.bytes;
        resp.warm_hits = w.hits;
        resp.warm_misses = w.misses;
        resp.warm_evicted = w.evicted;
        if reset {
            t.reset();
        }
        Ok(Response::new(resp))
    }

    async fn list_episodes(
        &self,
        req: Request<pb::ListEpisodesRequest>,
    ) -> Result<Response<pb::ListEpisodesResponse>, Status> {
        let r = req.into_inner();
        if !["", "running", "stopped", "deleted"].contains(&r.status.as_str()) {
            return Err(edge_status(
                Code::InvalidArgument,
                format!(
                    "unknown status {:?}: expected running, stopped or deleted",
                    r.status
                ),
            ));
        }
        let eps = self
            .engine
            .tree()
            .list_episodes(r.status == "deleted")
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(pb::ListEpisodesResponse {
            episodes: eps
                .iter()
                .filter(|e| r.status.is_empty() || e.status.to_string() == r.status)
                .filter(|e| {
                    r.labels
                        .iter()
                        .all(|(k, v)| e.meta.labels.get(k) == Some(v))
                })
                .map(info)
                .collect(),
        }))
    }

    type BuildImageStream = ProgressStream;
    async fn build_image(
        &self,
        req: Request<pb::BuildImageRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let name = req.into_inner().name;
        let engine = self.engine.clone();
        Ok(Response::new(self.image_job(move |p| {
            sandtree_runtime::images::build(engine.storage().as_ref(), &name, p)?;
            engine.save_image_config(&name, &Default::default())?;
            record_digest(&engine, &name, p);
            Ok(())
        })))
    }

    type ImportImageStream = ProgressStream;
    async fn import_image(
        &self,
        req: Request<pb::ImportImageRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let r = req.into_inner();
        let engine = self.engine.clone();
        Ok(Response::new(self.image_job(move |p| {
            let opts = sandtree_runtime::images::ImportOptions {
                allow_setuid: r.allow_setuid,
            };
            let storage = engine.storage().as_ref();
            let config =
                sandtree_runtime::images::import(storage, &r.name, Path::new(&r.path), opts, p)?;
            // The image and its config come as one: without its config it does not stay.
            let saved = sandtree_engine::ImageConfig {
                env: config.env.clone(),
                working_dir: config.working_dir.clone(),
                user: config.user,
                digest: None,
            };
            if let Err(e) = engine.save_image_config(&r.name, &saved) {
                let _ = storage.destroy_base(&r.name);
                return Err(e);
            }
            record_digest(&engine, &r.name, p);
            if config != Default::default() {
                p(format!(
                    "image config: {} env vars, working dir {}, user {}",
                    config.env.len(),
                    config.working_dir.as_deref().unwrap_or("/"),
                    config
                        .user
                        .map(|(u, g)| format!("{u}:{g}"))
                        .unwrap_or_else(|| "root".into())
                ));
            }
            Ok(())
        })))
    }

    async fn list_images(
        &self,
        _: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let storage = self.engine.storage().clone();
        let entries = tokio::task::spawn_blocking(move || storage.list())
            .await
            .map_err(|e| edge_status(Code::Internal, e.to_string()))?
            .map_err(|e| edge_status(Code::Internal, e.to_string()))?;
        let images = entries
            .into_iter()
            .filter_map(|e| match e {
                sandtree_storage::Entry::Base { name } => Some(name),
                _ => None,
            })
            .collect();
        Ok(Response::new(pb::ListImagesResponse { images }))
    }

    type ExportNodeStream = NodeChunkStream;
    async fn export_node(
        &self,
        req: Request<pb::ExportNodeRequest>,
    ) -> Result<Response<NodeChunkStream>, Status> {
        let r = req.into_inner();
        let id = episode_id(&r.episode)?;
        let bundle = self.engine.export_node(&id, r.turn).await.map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::NodeChunk, Status>>(4);
        // The parts are read on a blocking thread; the files go when the bundle is dropped.
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut rd = match bundle.reader() {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.blocking_send(Err(edge_status(
                        Code::Internal,
                        format!("read the bundle: {e}"),
                    )));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; EXPORT_CHUNK];
                let mut n = 0;
                while n < buf.len() {
                    match rd.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(edge_status(
                                Code::Internal,
                                format!("read the bundle: {e}"),
                            )));
                            return;
                        }
                    }
                }
                if n == 0 {
                    return;
                }
                buf.truncate(n);
                if tx.blocking_send(Ok(pb::NodeChunk { data: buf })).is_err() {
                    // The client went away.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn import_node(
        &self,
        req: Request<tonic::Streaming<pb::NodeChunk>>,
    ) -> Result<Response<pb::ImportNodeResponse>, Status> {
        use tokio::io::AsyncWriteExt;
        let mut stream = req.into_inner();
        let dir = sandtree_engine::bundle::staging_dir(&self.engine.config().data_dir);
        let path = dir.join(format!(
            "{}.incoming",
            sandtree_engine::bundle::scratch_name("import")
        ));
        let received = async {
            tokio::fs::create_dir_all(&dir).await?;
            let mut f = tokio::fs::File::create(&path).await?;
            let mut bytes = 0u64;
            while let Some(chunk) = stream.message().await.map_err(std::io::Error::other)? {
                bytes += chunk.data.len() as u64;
                if bytes > sandtree_engine::bundle::MAX_BUNDLE_BYTES {
                    return Err(std::io::Error::other(format!(
                        "the bundle is over {} bytes",
                        sandtree_engine::bundle::MAX_BUNDLE_BYTES
                    )));
                }
                f.write_all(&chunk.data).await?;
            }
            f.flush().await?;
            Ok::<u64, std::io::Error>(bytes)
        }
        .await;
        let bytes = match received {
            Ok(b) => b,
            Err(e) => {
                let _ = tokio::fs::remove_file(&path).await;
                return Err(edge_status(
                    Code::InvalidArgument,
                    format!("receive the bundle: {e}"),
                ));
            }
        };
        // The engine removes the file whatever happens.
        let imp = self.engine.import_node(path).await.map_err(status)?;
        let ep = self
            .engine
            .tree()
            .episode(&imp.episode)
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(pb::ImportNodeResponse {
            episode: Some(info(&ep)),
            turn: imp.turn,
            kind: imp.kind,
            bundle_bytes: bytes,
            verify_ms: imp.verify_ms,
            build_ms: imp.build_ms,
            restore_ms: imp.restore_ms,
        }))
    }
}

/// Computes a new image's content digest (node bundles name it) so that the first export or
/// import does not; a failure only means that one will.
fn record_digest(engine: &Engine, image: &str, p: &(dyn Fn(String) + Sync + Send)) {
    match engine.image_digest_blocking(image) {
        Ok(d) => p(format!("content digest {d}")),
        Err(e) => {
            tracing::warn!(image, error = %format!("{e:#}"), "cannot compute the image's digest")
        }
    }
}

/// Chunks of an exported bundle.
const EXPORT_CHUNK: usize = 1 << 20;

type NodeChunkStream = Pin<Box<dyn Stream<Item = Result<pb::NodeChunk, Status>> + Send>>;

pub fn verdict_str(k: sandtree_branching::VerdictKind) -> &'static str {
    match k {
        sandtree_branching::VerdictKind::None => "none",
        sandtree_branching::VerdictKind::Fs => "fs",
        sandtree_branching::VerdictKind::Proc => "proc",
    }
}

use sandtree_engine::dumped;
