//! Client subcommands: each talks to the service over its unix socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use sandtree_proto::v1 as pb;
use sandtree_proto::v1::sandtree_client::SandtreeClient;
use tonic::transport::Channel;

pub type Client = SandtreeClient<Channel>;

pub async fn connect(socket: &Path) -> Result<Client> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| {
            let cause = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string());
            anyhow::anyhow!("the sandtree service is not running at {} ({cause}); start it with `sandtree serve`", socket.display())
        })?;
    Ok(SandtreeClient::new(channel)
        .max_decoding_message_size(80 << 20)
        .max_encoding_message_size(80 << 20))
}

/// A gRPC status as a one-line error.
pub fn rpc_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// Parses repeated `KEY=VALUE` flags.
pub fn key_values(
    items: &[String],
    flag: &str,
) -> Result<std::collections::HashMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("{flag} takes KEY=VALUE, got {kv:?}"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// `--timeout SECS` as milliseconds (0: the server's default).
pub fn timeout_ms(timeout: Option<f64>) -> Result<u64> {
    Ok(match timeout {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            anyhow::bail!("--timeout must be a positive number of seconds, got {t}")
        }
        Some(t) => (t * 1000.0).ceil() as u64,
        None => 0,
    })
}

/// `--json` output: the API's own message, serialized (proto field names), so it cannot drift.
fn to_json(m: &impl serde::Serialize) -> String {
    serde_json::to_string(m).expect("API messages serialize")
}

fn episode_json(e: &pb::EpisodeInfo) -> String {
    to_json(e)
}

pub async fn create(socket: &Path, req: pb::CreateEpisodeRequest, json: bool) -> Result<ExitCode> {
    let mut c = connect(socket).await?;
    let ep = c.create_episode(req).await.map_err(rpc_err)?.into_inner();
    if json {
        println!("{}", episode_json(&ep));
    } else {
        println!("{}", ep.id);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn step_json(r: &pb::StepResponse) -> String {
    to_json(r)
}

fn step_end(r: &pb::StepResponse) -> ExitCode {
    if r.timed_out {
        eprintln!(
            "sandtree: step timed out after {} ms; its process group was killed",
            r.duration_ms
        );
    }
    ExitCode::from((r.exit_code & 0xff) as u8)
}

pub async fn step(socket: &Path, req: pb::StepRequest, json: bool) -> Result<ExitCode> {
    use std::io::Write;
    let mut c = connect(socket).await?;
    if json {
        let r = c.step(req).await.map_err(rpc_err)?.into_inner();
        println!("{}", step_json(&r));
        return Ok(ExitCode::SUCCESS);
    }
    // Streamed: output is printed as the command produces it.
    let mut s = c.step_stream(req).await.map_err(rpc_err)?.into_inner();
    while let Some(ev) = s.message().await.map_err(rpc_err)? {
        match ev.event {
            Some(pb::step_event::Event::Stdout(b)) => {
                let mut o = std::io::stdout().lock();
                o.write_all(&b)?;
                o.flush()?;
            }
            Some(pb::step_event::Event::Stderr(b)) => std::io::stderr().write_all(&b)?,
            Some(pb::step_event::Event::Result(r)) => return Ok(step_end(&r)),
            None => {}
        }
    }
    anyhow::bail!("the service ended the step's stream without a result")
}

pub async fn write_file(
    socket: &Path,
    episode: String,
    path: String,
    data: Vec<u8>,
    mode: u32,
    json: bool,
) -> Result<ExitCode> {
    let r = connect(socket)
        .await?
        .write_file(pb::WriteFileRequest {
            episode,
            path,
            data,
            mode,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    if json {
        println!("{}", step_json(&r));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn read_file(
    socket: &Path,
    episode: String,
    path: String,
    max_bytes: u64,
) -> Result<ExitCode> {
    use std::io::Write;
    let r = connect(socket)
        .await?
        .read_file(pb::ReadFileRequest {
            episode,
            path,
            max_bytes,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    std::io::stdout().write_all(&r.data)?;
    if (r.data.len() as u64) < r.size {
        eprintln!(
            "sandtree: read {} of the file's {} bytes (--max-bytes or the server's limit)",
            r.data.len(),
            r.size
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn delete(socket: &Path, episode: String) -> Result<ExitCode> {
    connect(socket)
        .await?
        .delete_episode(pb::DeleteEpisodeRequest { episode })
        .await
        .map_err(rpc_err)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn fork(
    socket: &Path,
    episode: String,
    turn: u32,
    count: u32,
    json: bool,
) -> Result<ExitCode> {
    if count == 0 {
        anyhow::bail!("--count must be at least 1");
    }
    let r = connect(socket)
        .await?
        .fork(pb::ForkRequest {
            episode,
            turn,
            count,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    if json {
        println!("{}", to_json(&r));
    } else {
        for id in r.episodes {
            println!("{id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rewind(socket: &Path, episode: String, turn: u32) -> Result<ExitCode> {
    connect(socket)
        .await?
        .rewind(pb::RewindRequest { episode, turn })
        .await
        .map_err(rpc_err)?;
    Ok(ExitCode::SUCCESS)
}

/// The fork family as an indented tree: one line per turn record, children below their parent,
/// with the episodes forked at it.
fn print_family(r: &pb::TreeResponse) {
    println!(
        "fork family of {}: {} episodes, {} turn records",
        r.family_root,
        r.family_episodes.len(),
        r.family.len()
    );
    let mut children: std::collections::BTreeMap<u64, Vec<&pb::TurnInfo>> = Default::default();
    for t in &r.family {
        children.entry(t.parent_record).or_default().push(t);
    }
    fn walk(
        children: &std::collections::BTreeMap<u64, Vec<&pb::TurnInfo>>,
        parent: u64,
        depth: usize,
    ) {
        for t in children.get(&parent).into_iter().flatten() {
            let mut action = t.action.replace('\n', "\\n");
            if action.chars().count() > 50 {
                action = action.chars().take(47).collect::<String>() + "...";
            }
            let forks = if t.forks.is_empty() {
                String::new()
            } else {
                format!("  <- forked: {}", t.forks.join(", "))
            };
            println!(
                "{:indent$}turn {} [{} {} {}B] {action}{forks}",
                "",
                t.turn,
                t.kind,
                t.verdict,
                t.bytes,
                indent = depth.min(40) * 2
            );
            walk(children, t.record, depth + 1);
        }
    }
    walk(&children, 0, 0);
}

pub async fn tree(socket: &Path, episode: String, json: bool, whole: bool) -> Result<ExitCode> {
    let r = connect(socket)
        .await?
        .tree(pb::TreeRequest {
            episode,
            whole,
            outputs: false,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    let ep = r.episode.clone().unwrap_or_default();
    if json {
        // The whole TreeResponse; `family` is empty unless --whole.
        println!("{}", to_json(&r));
        return Ok(ExitCode::SUCCESS);
    }
    if whole {
        print_family(&r);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "episode {} ({} image, policy {}, {}, at turn {}{})",
        ep.id,
        ep.image,
        ep.policy,
        ep.status,
        ep.turn,
        if ep.forked_from.is_empty() {
            String::new()
        } else {
            format!(", forked from {}", ep.forked_from)
        }
    );
    println!(
        "{:>4}  {:>5}  {:<6}  {:<7}  {:>10}  {:<9}  {:>4}  action",
        "turn", "node", "kind", "verdict", "bytes", "state", "exit"
    );
    for t in r.turns {
        let mut action = t.action.replace('\n', "\\n");
        if action.chars().count() > 60 {
            action = action.chars().take(57).collect::<String>() + "...";
        }
        println!(
            "{:>4}  {:>5}  {:<6}  {:<7}  {:>10}  {:<9}  {:>4}  {}",
            t.turn, t.node, t.kind, t.verdict, t.bytes, t.state, t.exit_code, action
        );
        // Why: the verdict's reasons (syscall classes, sample paths, pids), a few per turn.
        for reason in t.reasons.iter().take(3) {
            println!("{:>13}{reason}", "");
        }
        if t.image_parent > 0 {
            println!(
                "{:>13}image {} B kept of {} B dumped; unchanged pages read from node {}",
                "", t.image_bytes, t.image_dumped_bytes, t.image_parent
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn stats(socket: &Path, json: bool) -> Result<ExitCode> {
    let r = connect(socket)
        .await?
        .stats(pb::StatsRequest::default())
        .await
        .map_err(rpc_err)?
        .into_inner();
    if json {
        println!("{}", to_json(&r));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "episodes {}  checkpoint_bytes {}  fs nodes {}  full nodes {}  shared turns {}",
        r.episodes, r.checkpoint_bytes, r.nodes_fs, r.nodes_full, r.turns_shared
    );
    println!(
        "dump p50/p99 {:.1}/{:.1} ms  snapshot {:.1}/{:.1} ms  restore {:.1}/{:.1} ms  checkpoint {:.1}/{:.1} ms",
        r.dump_ms_p50, r.dump_ms_p99, r.snapshot_ms_p50, r.snapshot_ms_p99, r.restore_ms_p50, r.restore_ms_p99, r.checkpoint_ms_p50, r.checkpoint_ms_p99
    );
    println!(
        "CRIU images: {} B kept of {} B dumped (auto leaves out pages equal to the image parent's; dedup p50/p99 {:.1}/{:.1} ms)",
        r.image_bytes, r.image_dumped_bytes, r.dedup_ms_p50, r.dedup_ms_p99
    );
    println!(
        "{}; {} watched sandboxes use {} B of bpf maps",
        r.inspector, r.watched_sandboxes, r.sandbox_map_bytes
    );
    if r.verdicts_checked > 0 {
        println!(
            "verdicts cross-checked {}  UNSAFE {}  fs without a storage change {}",
            r.verdicts_checked, r.verdicts_unsafe, r.verdicts_fs_without_change
        );
    }
    for e in r.per_episode {
        println!(
            "  {}  {:<4}  {:<7}  turn {:>3}  bytes {:>10}  fs {:>3}  full {:>3}  shared {:>3}",
            e.id,
            e.policy,
            e.status,
            e.turn,
            e.checkpoint_bytes,
            e.nodes_fs,
            e.nodes_full,
            e.turns_shared
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(socket: &Path, req: pb::ListEpisodesRequest, json: bool) -> Result<ExitCode> {
    let r = connect(socket)
        .await?
        .list_episodes(req)
        .await
        .map_err(rpc_err)?
        .into_inner();
    for e in r.episodes {
        if json {
            println!("{}", episode_json(&e));
        } else {
            println!(
                "{}  {}  {}  {}  turn {}",
                e.id, e.image, e.policy, e.status, e.turn
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Shows an image job's progress: a spinner with the latest line and the elapsed time on a
/// terminal (each finished line is kept above it), plain lines otherwise (logs, CI).
async fn follow(mut s: tonic::Streaming<pb::ImageProgress>) -> Result<()> {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("valid template"),
        );
        b.enable_steady_tick(std::time::Duration::from_millis(120));
        b
    });
    let r = async {
        while let Some(m) = s.message().await.map_err(rpc_err)? {
            if m.done {
                break;
            }
            match &bar {
                Some(b) => {
                    b.println(&m.message);
                    b.set_message(m.message);
                }
                None => eprintln!("{}", m.message),
            }
        }
        Ok(())
    }
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    r
}

pub async fn build_image(socket: &Path, kind: String) -> Result<ExitCode> {
    let s = connect(socket)
        .await?
        .build_image(pb::BuildImageRequest { name: kind.clone() })
        .await
        .map_err(rpc_err)?
        .into_inner();
    follow(s).await?;
    println!("{kind}");
    Ok(ExitCode::SUCCESS)
}

pub async fn import_image(
    socket: &Path,
    name: String,
    path: PathBuf,
    allow_setuid: bool,
) -> Result<ExitCode> {
    let abs = std::path::absolute(&path).with_context(|| format!("bad path {}", path.display()))?;
    if !abs.exists() {
        anyhow::bail!("{} does not exist", abs.display());
    }
    let s = connect(socket)
        .await?
        .import_image(pb::ImportImageRequest {
            name: name.clone(),
            path: abs.to_string_lossy().into_owned(),
            allow_setuid,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    follow(s).await?;
    println!("{name}");
    Ok(ExitCode::SUCCESS)
}

pub async fn list_images(socket: &Path) -> Result<ExitCode> {
    let r = connect(socket)
        .await?
        .list_images(pb::ListImagesRequest {})
        .await
        .map_err(rpc_err)?
        .into_inner();
    for i in r.images {
        println!("{i}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn doctor(socket: &Path, json: bool) -> Result<ExitCode> {
    let probes = tokio::task::spawn_blocking(crate::doctor::probes).await?;
    let storage = match connect(socket).await {
        Ok(mut c) => match c.health(pb::HealthRequest {}).await {
            Ok(h) => {
                let h = h.into_inner();
                format!("service at {}: storage {}; {}", socket.display(), h.storage, h.inspector)
            }
            Err(e) => format!("service at {} answered with an error: {}", socket.display(), e.message()),
        },
        Err(_) => format!("service not running at {}; `sandtree serve` defaults to the loop-backed btrfs image in {}", socket.display(), crate::DEFAULT_DATA_DIR),
    };
    let failed = probes.iter().any(|p| p.required && !p.ok);
    if json {
        println!(
            "{}",
            serde_json::json!({"ok": !failed, "storage": storage, "probes": probes})
        );
    } else {
        for p in &probes {
            let mark = if p.ok {
                "ok  "
            } else if p.required {
                "FAIL"
            } else {
                "warn"
            };
            print!("{mark}  {:<14} {}", p.name, p.detail);
            if !p.ok {
                print!("  -> {}", p.fix);
            }
            println!();
        }
        println!("info  storage        {storage}");
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
