//! Client subcommands: each talks to the service over its unix socket or, with `--addr`, its TCP
//! listener (`sandtree_client::Target`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use sandtree_client::{connect_to, rpc_err, Target};
use sandtree_proto::v1 as pb;

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

pub async fn create(
    target: &Target,
    req: pb::CreateEpisodeRequest,
    json: bool,
) -> Result<ExitCode> {
    let mut c = connect_to(target).await?;
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

pub async fn step(target: &Target, req: pb::StepRequest, json: bool) -> Result<ExitCode> {
    use std::io::Write;
    let mut c = connect_to(target).await?;
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
    target: &Target,
    episode: String,
    path: String,
    data: Vec<u8>,
    mode: u32,
    json: bool,
) -> Result<ExitCode> {
    let r = connect_to(target)
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
    target: &Target,
    episode: String,
    path: String,
    max_bytes: u64,
) -> Result<ExitCode> {
    use std::io::Write;
    let r = connect_to(target)
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

pub async fn delete(target: &Target, episode: String) -> Result<ExitCode> {
    connect_to(target)
        .await?
        .delete_episode(pb::DeleteEpisodeRequest { episode })
        .await
        .map_err(rpc_err)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn fork(
    target: &Target,
    episode: String,
    turn: u32,
    count: u32,
    keep_warm: u32,
    json: bool,
) -> Result<ExitCode> {
    if count == 0 {
        anyhow::bail!("--count must be at least 1");
    }
    let r = connect_to(target)
        .await?
        .fork(pb::ForkRequest {
            episode,
            turn,
            count,
            keep_warm,
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

pub async fn prepare(
    target: &Target,
    episode: String,
    turn: u32,
    count: u32,
    json: bool,
) -> Result<ExitCode> {
    let r = connect_to(target)
        .await?
        .prepare(pb::PrepareRequest {
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
        println!(
            "{} warm copies ready ({} B; every warm copy: {} B; {} evicted)",
            r.ready, r.memory_bytes, r.warm_bytes, r.evicted
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rewind(target: &Target, episode: String, turn: u32) -> Result<ExitCode> {
    connect_to(target)
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

pub async fn tree(target: &Target, episode: String, json: bool, whole: bool) -> Result<ExitCode> {
    let r = connect_to(target)
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

pub async fn stats(target: &Target, json: bool) -> Result<ExitCode> {
    let r = connect_to(target)
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
        "episodes {}  checkpoint_bytes {}  fs nodes {}  full nodes {}  shared turns {}  fs verdicts refuted {}",
        r.episodes, r.checkpoint_bytes, r.nodes_fs, r.nodes_full, r.turns_shared, r.fs_verdicts_refuted
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
        "scheduler {} (up to {} batches at once): queued p50/p99/max {:.1}/{:.1}/{:.1} ms, {} promoted, {} fs checkpoints in {} batches",
        r.scheduler, r.checkpoint_slots, r.queue_wait_ms_p50, r.queue_wait_ms_p99, r.queue_wait_ms_max,
        r.checkpoints_promoted, r.checkpoints_batched, r.checkpoint_batches
    );
    println!(
        "running sandboxes hold {} B of anonymous memory",
        r.sandbox_memory_bytes
    );
    println!(
        "warm copies {} holding {} B; forks took {} and found none {} times; {} evicted",
        r.warm_copies, r.warm_memory_bytes, r.warm_hits, r.warm_misses, r.warm_evicted
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
            "  {}  {:<4}  {:<7}  turn {:>3}  bytes {:>10}  fs {:>3}  full {:>3}  shared {:>3}  refuted {:>3}",
            e.id,
            e.policy,
            e.status,
            e.turn,
            e.checkpoint_bytes,
            e.nodes_fs,
            e.nodes_full,
            e.turns_shared,
            e.fs_verdicts_refuted
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(target: &Target, req: pb::ListEpisodesRequest, json: bool) -> Result<ExitCode> {
    let r = connect_to(target)
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

pub async fn build_image(target: &Target, kind: String) -> Result<ExitCode> {
    let s = connect_to(target)
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
    target: &Target,
    name: String,
    path: PathBuf,
    allow_setuid: bool,
) -> Result<ExitCode> {
    let abs = std::path::absolute(&path).with_context(|| format!("bad path {}", path.display()))?;
    if !abs.exists() {
        anyhow::bail!("{} does not exist", abs.display());
    }
    let s = connect_to(target)
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

pub async fn list_images(target: &Target) -> Result<ExitCode> {
    let r = connect_to(target)
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

pub async fn doctor(target: &Target, json: bool) -> Result<ExitCode> {
    let probes = tokio::task::spawn_blocking(crate::doctor::probes).await?;
    let storage = match connect_to(target).await {
        Ok(mut c) => match c.health(pb::HealthRequest {}).await {
            Ok(h) => {
                let h = h.into_inner();
                format!("service at {}: storage {}; {}", target, h.storage, h.inspector)
            }
            Err(e) => format!("service at {} answered with an error: {}", target, e.message()),
        },
        Err(_) => format!("service not running at {}; `sandtree serve` defaults to the loop-backed btrfs image in {}", target, crate::DEFAULT_DATA_DIR),
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

/// The first line of an exported trajectory (docs/trajectory-format.md).
pub const TRAJECTORY_FORMAT: &str = "sandtree.trajectory";
pub const TRAJECTORY_VERSION: u64 = 1;

/// The exported records of `root`: its live path, or with `all_forks` every record of its fork
/// family, each as one JSON object of docs/trajectory-format.md.
fn trajectory_records(
    root: &str,
    whole: &pb::TreeResponse,
    infos: &std::collections::HashMap<String, pb::EpisodeInfo>,
    all_forks: bool,
) -> Vec<serde_json::Value> {
    whole
        .family
        .iter()
        .filter(|t| all_forks || t.episodes.iter().any(|e| e == root))
        .map(|t| {
            // The root if its path holds the record, else the oldest episode holding it (the
            // fork that made it: later forks only inherit it).
            let episode = if t.episodes.iter().any(|e| e == root) {
                root.to_string()
            } else {
                whole
                    .family_episodes
                    .iter()
                    .find(|e| t.episodes.contains(e))
                    .or(t.episodes.first())
                    .cloned()
                    .unwrap_or_default()
            };
            let info = infos.get(&episode);
            let forked_from = info
                .map(|i| i.forked_from.clone())
                .filter(|f| !f.is_empty());
            let labels = info.map(|i| i.labels.clone()).unwrap_or_default();
            serde_json::json!({
                "record": t.record,
                "parent": (t.parent_record != 0).then_some(t.parent_record),
                "episode": episode,
                "turn": t.turn,
                "action": t.action,
                "stdout": String::from_utf8_lossy(&t.stdout),
                "stderr": String::from_utf8_lossy(&t.stderr),
                "exit_code": t.exit_code,
                "duration_ms": t.duration_ms,
                "cwd": t.cwd,
                "verdict": t.verdict,
                "reasons": t.reasons,
                "node": t.node,
                "kind": t.kind,
                "bytes": t.bytes,
                "labels": labels.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
                "forked_from": forked_from,
                "episodes": t.episodes,
                "forks": t.forks,
            })
        })
        .collect()
}

/// `sandtree export EPISODE [--all-forks]`: the trajectory as JSON Lines on stdout.
pub async fn export(target: &Target, episode: String, all_forks: bool) -> Result<ExitCode> {
    use std::io::Write;
    let mut c = connect_to(target).await?;
    // The family view is the one that carries record ids; without --all-forks only the
    // records on the episode's live path are kept.
    let r = c
        .tree(pb::TreeRequest {
            episode: episode.clone(),
            whole: true,
            outputs: true,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    let ep = r.episode.clone().unwrap_or_default();
    let mut infos: std::collections::HashMap<String, pb::EpisodeInfo> = c
        .list_episodes(pb::ListEpisodesRequest::default())
        .await
        .map_err(rpc_err)?
        .into_inner()
        .episodes
        .into_iter()
        .map(|e| (e.id.clone(), e))
        .collect();
    infos.insert(ep.id.clone(), ep.clone());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let header = serde_json::json!({
        "format": TRAJECTORY_FORMAT,
        "version": TRAJECTORY_VERSION,
        "root": ep.id,
        "image": ep.image,
        "policy": ep.policy,
    });
    writeln!(out, "{header}")?;
    let records = trajectory_records(&ep.id, &r, &infos, all_forks);
    for rec in &records {
        writeln!(out, "{rec}")?;
    }
    out.flush()?;
    eprintln!(
        "sandtree: exported {} turn records of {}{}",
        records.len(),
        ep.id,
        if all_forks {
            " and its fork family"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// What `sandtree replay` is asked to do.
pub struct ReplayArgs {
    pub file: PathBuf,
    pub from_turn: Option<u32>,
    pub image: Option<String>,
    pub masks: Vec<String>,
}

/// A turn to replay: the record's command and what it observed.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub turn: u32,
    pub action: String,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i64,
    pub cwd: String,
}

/// A parsed trajectory file: the header and the root's live path (turn 1 and up, in order).
pub struct Trajectory {
    pub root: String,
    pub image: String,
    pub path: Vec<Expected>,
}

/// Reads a `sandtree.trajectory` file (docs/trajectory-format.md).
pub fn read_trajectory(text: &str) -> Result<Trajectory> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, first) = lines.next().context("the file is empty")?;
    let header: serde_json::Value =
        serde_json::from_str(first).context("line 1 is not a JSON object")?;
    if header["format"] != TRAJECTORY_FORMAT {
        anyhow::bail!(
            "line 1 is not a {TRAJECTORY_FORMAT} header (format {})",
            header["format"]
        );
    }
    if header["version"] != TRAJECTORY_VERSION {
        anyhow::bail!(
            "trajectory version {} is not one this sandtree reads ({TRAJECTORY_VERSION})",
            header["version"]
        );
    }
    let text_of = |v: &serde_json::Value, what: &str| -> Result<String> {
        v.as_str()
            .map(str::to_string)
            .with_context(|| format!("header field {what} is not a string"))
    };
    let root = text_of(&header["root"], "root")?;
    let image = text_of(&header["image"], "image")?;
    let (mut path, mut off_path) = (Vec::new(), 0usize);
    for (i, line) in lines {
        let r: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("line {} is not a JSON object", i + 1))?;
        let on_root = r["episodes"]
            .as_array()
            .is_some_and(|es| es.iter().any(|e| e == root.as_str()));
        let turn = r["turn"]
            .as_u64()
            .and_then(|t| u32::try_from(t).ok())
            .with_context(|| format!("line {}: turn is not a number", i + 1))?;
        if turn == 0 {
            continue;
        }
        if !on_root {
            off_path += 1;
            continue;
        }
        let field = |k: &str| -> Result<String> {
            r[k].as_str()
                .map(str::to_string)
                .with_context(|| format!("line {}: {k} is not a string", i + 1))
        };
        path.push(Expected {
            turn,
            action: field("action")?,
            stdout: field("stdout")?,
            stderr: field("stderr")?,
            exit_code: r["exit_code"]
                .as_i64()
                .with_context(|| format!("line {}: exit_code is not a number", i + 1))?,
            cwd: field("cwd")?,
        });
    }
    if path.is_empty() && off_path > 0 {
        anyhow::bail!(
            "none of the {off_path} turn records is on the root's live path (their `episodes` \
             do not hold {root})"
        );
    }
    path.sort_by_key(|e| e.turn);
    for (k, e) in path.iter().enumerate() {
        if e.turn as usize != k + 1 {
            anyhow::bail!(
                "the root's live path is not turns 1..={} once each (turn {} at position {})",
                path.len(),
                e.turn,
                k + 1
            );
        }
    }
    Ok(Trajectory { root, image, path })
}

/// The first field of a replayed turn that differs from its record, after masking:
/// (field, expected, actual).
pub fn first_difference(
    want: &Expected,
    got: &pb::StepResponse,
    masks: &[regex::Regex],
) -> Option<(&'static str, String, String)> {
    let mask = |s: &str| {
        masks
            .iter()
            .fold(s.to_string(), |s, m| m.replace_all(&s, "").into_owned())
    };
    let fields = [
        (
            "stdout",
            want.stdout.clone(),
            String::from_utf8_lossy(&got.stdout).into_owned(),
        ),
        (
            "stderr",
            want.stderr.clone(),
            String::from_utf8_lossy(&got.stderr).into_owned(),
        ),
    ];
    for (name, w, g) in fields {
        let (w, g) = (mask(&w), mask(&g));
        if w != g {
            return Some((name, w, g));
        }
    }
    if want.exit_code != i64::from(got.exit_code) {
        return Some((
            "exit_code",
            want.exit_code.to_string(),
            got.exit_code.to_string(),
        ));
    }
    if want.cwd != got.cwd {
        return Some(("cwd", want.cwd.clone(), got.cwd.clone()));
    }
    None
}

/// `sandtree replay FILE`: exit 0 when every turn matches its record, 1 at the first
/// divergence, 2 when it cannot replay.
pub async fn replay(target: &Target, args: ReplayArgs) -> Result<ExitCode> {
    match replay_inner(target, args).await {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("sandtree: replay: {e:#}");
            Ok(ExitCode::from(2))
        }
    }
}

async fn replay_inner(target: &Target, args: ReplayArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("read {}", args.file.display()))?;
    let tr = read_trajectory(&text).with_context(|| format!("{}", args.file.display()))?;
    let masks = args
        .masks
        .iter()
        .map(|m| regex::Regex::new(m).with_context(|| format!("--mask {m:?}")))
        .collect::<Result<Vec<_>>>()?;
    let from = args.from_turn.unwrap_or(0);
    if from as usize > tr.path.len() {
        anyhow::bail!(
            "--from-turn {from} is past the recorded path's last turn {}",
            tr.path.len()
        );
    }
    let todo: Vec<&Expected> = tr.path.iter().filter(|e| e.turn > from).collect();
    // A write's record does not hold the file's data: refuse before making anything.
    if let Some(w) = todo
        .iter()
        .find(|e| e.action.starts_with("# sandtree write "))
    {
        anyhow::bail!(
            "turn {} is a file write ({}); its data is not in the record, so it cannot be \
             replayed: replay from after it with --from-turn {}",
            w.turn,
            w.action,
            w.turn
        );
    }
    let mut c = connect_to(target).await?;
    let ep = match args.from_turn {
        Some(t) => {
            let r = c
                .fork(pb::ForkRequest {
                    episode: tr.root.clone(),
                    turn: t,
                    count: 1,
                    keep_warm: 0,
                })
                .await
                .map_err(|s| {
                    anyhow::anyhow!(
                        "cannot fork the recorded episode {} at turn {t}: {} (--from-turn needs \
                         the episode and a committed checkpoint of that turn)",
                        tr.root,
                        s.message()
                    )
                })?
                .into_inner();
            r.episodes
                .into_iter()
                .next()
                .context("fork made no episode")?
        }
        None => {
            c.create_episode(pb::CreateEpisodeRequest {
                image: args.image.clone().unwrap_or_else(|| tr.image.clone()),
                policy: "none".into(),
                ..Default::default()
            })
            .await
            .map_err(rpc_err)?
            .into_inner()
            .id
        }
    };
    eprintln!(
        "sandtree: replaying {} turns of {} in episode {ep}{}",
        todo.len(),
        tr.root,
        if from > 0 {
            format!(" (forked at turn {from})")
        } else {
            String::new()
        }
    );
    let started = std::time::Instant::now();
    let run = async {
        for want in &todo {
            eprintln!(
                "sandtree: turn {}: {}",
                want.turn,
                one_line(&want.action, 70)
            );
            let got = c
                .step(pb::StepRequest {
                    episode: ep.clone(),
                    command: want.action.clone(),
                    ..Default::default()
                })
                .await
                .map_err(rpc_err)
                .with_context(|| format!("turn {}", want.turn))?
                .into_inner();
            if got.turn != want.turn {
                anyhow::bail!(
                    "the replay's turn is {}, the record's {}",
                    got.turn,
                    want.turn
                );
            }
            if let Some((field, w, g)) = first_difference(want, &got, &masks) {
                return Ok(Some((want.turn, field, w, g)));
            }
        }
        Ok(None)
    }
    .await;
    let secs = started.elapsed().as_secs_f64();
    let del = c
        .delete_episode(pb::DeleteEpisodeRequest {
            episode: ep.clone(),
        })
        .await;
    if let Err(s) = del {
        eprintln!(
            "sandtree: warning: cannot delete replay episode {ep}: {}",
            s.message()
        );
    }
    match run? {
        Some((turn, field, want, got)) => {
            let action = todo
                .iter()
                .find(|e| e.turn == turn)
                .map(|e| one_line(&e.action, 200))
                .unwrap_or_default();
            println!("divergence at turn {turn} (`{action}`): {field}");
            println!("  expected: {want:?}");
            println!("  actual:   {got:?}");
            Ok(ExitCode::from(1))
        }
        None => {
            eprintln!(
                "sandtree: replayed {} turns in {secs:.2} s ({:.1} turns/s): no divergence",
                todo.len(),
                todo.len() as f64 / secs.max(1e-9)
            );
            println!("no divergence in {} turns", todo.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn one_line(s: &str, max: usize) -> String {
    let s = s.replace('\n', "\\n");
    if s.chars().count() > max {
        s.chars().take(max - 3).collect::<String>() + "..."
    } else {
        s
    }
}

/// Escapes text for HTML/SVG content and attribute values.
pub fn escape_html(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            // Control characters other than newline and tab are not allowed in XML.
            c if c.is_control() && c != '\n' && c != '\t' => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() > max {
        s.chars().take(max).collect::<String>() + "\n[...]"
    } else {
        s.to_string()
    }
}

/// A self-contained HTML page with the whole tree of a fork family as inline SVG: one circle
/// per turn record (class `node kind-<kind>`, plus `live` on an episode's head; `data-bytes` its
/// node's checkpoint bytes), its radius growing with those bytes, and a card with the command and
/// its output (`pre.tip`, `aria-describedby` of the circle) that CSS alone shows while the node
/// is hovered (`:has(#n<record>:hover)`; the page has no script).
/// The layout is a deterministic tidy tree: depth is the turn number, leaves are laid out left
/// to right in record order, and a parent sits centred over its children.
pub fn tree_html(r: &pb::TreeResponse) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    let mut children: BTreeMap<u64, Vec<&pb::TurnInfo>> = BTreeMap::new();
    for t in &r.family {
        children.entry(t.parent_record).or_default().push(t);
    }
    // Each episode's head: the deepest record on its live path.
    let mut heads: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for e in &r.family_episodes {
        if let Some(h) = r
            .family
            .iter()
            .filter(|t| t.episodes.contains(e))
            .max_by_key(|t| t.turn)
        {
            heads.entry(h.record).or_default().push(e);
        }
    }
    // Tidy layout: x in leaf slots, y = depth. Iterative post-order (deep trees stay on the heap).
    let mut x: BTreeMap<u64, f64> = BTreeMap::new();
    let mut next_leaf = 0f64;
    let roots: Vec<u64> = children
        .get(&0)
        .map(|v| v.iter().map(|t| t.record).collect())
        .unwrap_or_default();
    let mut stack: Vec<(u64, bool)> = roots.iter().rev().map(|&id| (id, false)).collect();
    while let Some((id, done)) = stack.pop() {
        let kids = children.get(&id);
        if done {
            let ks = kids.expect("visited twice only with children");
            let (first, last) = (x[&ks[0].record], x[&ks[ks.len() - 1].record]);
            x.insert(id, (first + last) / 2.0);
        } else if let Some(ks) = kids.filter(|k| !k.is_empty()) {
            stack.push((id, true));
            stack.extend(ks.iter().rev().map(|t| (t.record, false)));
        } else {
            x.insert(id, next_leaf);
            next_leaf += 1.0;
        }
    }
    let (dx, dy, pad) = (56.0, 64.0, 40.0);
    let depth = r.family.iter().map(|t| t.turn).max().unwrap_or(0) as f64;
    // Room right of the rightmost node for the longest head label (monospace, ~7 px a char).
    let label = heads
        .values()
        .map(|es| es.iter().map(|e| e.len() + 2).sum::<usize>())
        .max()
        .unwrap_or(0) as f64;
    // Head labels run down and right at 60 degrees, so neighbouring leaves' labels never cross.
    let width = pad * 2.0 + (next_leaf.max(1.0) - 1.0) * dx + 20.0 + label * 7.0 * 0.5;
    let height = pad * 2.0 + depth * dy + 20.0 + label * 7.0 * 0.87;
    let pos = |t: &pb::TurnInfo| {
        (
            pad + x.get(&t.record).copied().unwrap_or(0.0) * dx,
            pad + t.turn as f64 * dy,
        )
    };
    let radius = |bytes: u64| 5.0 + (1.0 + bytes as f64 / 4096.0).log2().min(12.0);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}">"#
    );
    svg.push_str("\n<g class=\"edges\">\n");
    let by_id: BTreeMap<u64, &pb::TurnInfo> = r.family.iter().map(|t| (t.record, t)).collect();
    for t in &r.family {
        if let Some(p) = by_id.get(&t.parent_record) {
            let ((x1, y1), (x2, y2)) = (pos(p), pos(t));
            let _ = writeln!(
                svg,
                r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}"/>"#
            );
        }
    }
    svg.push_str("</g>\n<g class=\"nodes\">\n");
    let (mut tips, mut hover_css) = (String::new(), String::new());
    for t in &r.family {
        let (cx, cy) = pos(t);
        let live = heads.get(&t.record);
        let mut tip = format!(
            "turn {} (record {}, node {}, {} {} B, verdict {}, exit {}, {} ms)\ncwd {}\n$ {}",
            t.turn,
            t.record,
            t.node,
            t.kind,
            t.bytes,
            t.verdict,
            t.exit_code,
            t.duration_ms,
            t.cwd,
            cut(&t.action, 2000)
        );
        if !t.stdout.is_empty() {
            let _ = write!(
                tip,
                "\n--- stdout\n{}",
                cut(&String::from_utf8_lossy(&t.stdout), 2000)
            );
        }
        if !t.stderr.is_empty() {
            let _ = write!(
                tip,
                "\n--- stderr\n{}",
                cut(&String::from_utf8_lossy(&t.stderr), 2000)
            );
        }
        if !t.reasons.is_empty() {
            let _ = write!(tip, "\n--- why\n{}", t.reasons.join("\n"));
        }
        if let Some(es) = live {
            let _ = write!(tip, "\n--- head of {}", es.join(", "));
        }
        if !t.forks.is_empty() {
            let _ = write!(tip, "\n--- forked here: {}", t.forks.join(", "));
        }
        let _ = writeln!(
            svg,
            r#"<circle class="node kind-{kind}{live}" id="n{rec}" data-record="{rec}" data-turn="{turn}" data-bytes="{bytes}" cx="{cx:.1}" cy="{cy:.1}" r="{rad:.1}" aria-describedby="t{rec}"/>"#,
            kind = escape_html(&t.kind),
            live = if live.is_some() { " live" } else { "" },
            rec = t.record,
            turn = t.turn,
            bytes = t.bytes,
            rad = radius(t.bytes),
        );
        // The hover card, right of the node (HTML over the SVG, so that it is drawn above every
        // node and wraps long lines), and the one CSS rule that shows it.
        let _ = writeln!(
            tips,
            r#"<pre class="tip" id="t{rec}" style="left: {x:.0}px; top: {y:.0}px">{tip}</pre>"#,
            rec = t.record,
            x = cx + radius(t.bytes) + 8.0,
            y = (cy - 10.0).max(0.0),
            tip = escape_html(&tip),
        );
        let _ = writeln!(
            hover_css,
            ".tree:has(#n{rec}:hover) #t{rec} {{ display: block; }}",
            rec = t.record
        );
        if let Some(es) = live {
            let (lx, ly) = (cx + 2.0, cy + radius(t.bytes) + 6.0);
            let _ = writeln!(
                svg,
                r#"<text class="head" x="{lx:.1}" y="{ly:.1}" transform="rotate(60 {lx:.1} {ly:.1})">{}</text>"#,
                escape_html(&es.join(", "))
            );
        }
    }
    svg.push_str("</g>\n</svg>");
    let ep = r.episode.clone().unwrap_or_default();
    format!(
        r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>sandtree: fork family of {root}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1em; }}
.edges line {{ stroke: #999; stroke-width: 1.5; }}
.node {{ stroke: #333; stroke-width: 1; }}
.node.live {{ stroke: #d00; stroke-width: 3; }}
.kind-base {{ fill: #ffffff; background: #ffffff; }}
.kind-shared {{ fill: #c8c8c8; background: #c8c8c8; }}
.kind-fs {{ fill: #6fa8dc; background: #6fa8dc; }}
.kind-full {{ fill: #e69138; background: #e69138; }}
text.head {{ font: 11px monospace; fill: #d00; }}
.tree {{ position: relative; }}
.tree svg {{ display: block; }}
.tip {{ display: none; position: absolute; z-index: 1; margin: 0; padding: 6px 8px; max-width: 80ch; max-height: 70vh; overflow: hidden; white-space: pre-wrap; overflow-wrap: anywhere; font: 12px monospace; background: #fffff0; border: 1px solid #333; box-shadow: 2px 2px 6px rgba(0, 0, 0, 0.3); pointer-events: none; }}
{hover_css}
.legend span {{ display: inline-block; width: 12px; height: 12px; border: 1px solid #333; border-radius: 6px; vertical-align: middle; margin: 0 4px 0 12px; }}
</style>
</head>
<body>
<h1>Fork family of {root}</h1>
<p>Episode {id} ({image}, policy {policy}); {n_eps} episodes, {n_recs} turn records. Depth is the turn; hover a node for its command and output.</p>
<p class="legend"><span class="kind-base"></span>base<span class="kind-shared"></span>shared (no checkpoint)<span class="kind-fs"></span>fs snapshot<span class="kind-full"></span>full (snapshot + CRIU image)<span class="live" style="border: 3px solid #d00"></span>an episode's head (live leaf); size grows with checkpoint bytes</p>
<div class="tree">
{svg}
{tips}</div>
</body>
</html>
"#,
        root = escape_html(&r.family_root),
        id = escape_html(&ep.id),
        image = escape_html(&ep.image),
        policy = escape_html(&ep.policy),
        n_eps = r.family_episodes.len(),
        n_recs = r.family.len(),
    )
}

/// `sandtree tree EPISODE --html FILE`.
pub async fn tree_html_file(target: &Target, episode: String, file: &Path) -> Result<ExitCode> {
    let r = connect_to(target)
        .await?
        .tree(pb::TreeRequest {
            episode,
            whole: true,
            outputs: true,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    std::fs::write(file, tree_html(&r)).with_context(|| format!("write {}", file.display()))?;
    eprintln!(
        "sandtree: wrote {} ({} turn records of {} episodes)",
        file.display(),
        r.family.len(),
        r.family_episodes.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `node export`: the bundle's chunks to stdout or FILE (a file is removed if the export fails).
pub async fn export_node(
    target: &Target,
    episode: String,
    turn: u32,
    output: Option<PathBuf>,
) -> Result<ExitCode> {
    use std::io::Write;
    if output.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        anyhow::bail!("a bundle is binary: redirect stdout to a file or give --output FILE");
    }
    let mut stream = connect_to(target)
        .await?
        .export_node(pb::ExportNodeRequest { episode, turn })
        .await
        .map_err(rpc_err)?
        .into_inner();
    let mut out: Box<dyn Write> = match &output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let r: Result<()> = async {
        while let Some(chunk) = stream.message().await.map_err(rpc_err)? {
            out.write_all(&chunk.data).context("write the bundle")?;
        }
        out.flush().context("write the bundle")?;
        Ok(())
    }
    .await;
    if let (Err(_), Some(p)) = (&r, &output) {
        drop(out);
        let _ = std::fs::remove_file(p);
    }
    r?;
    Ok(ExitCode::SUCCESS)
}

/// `node import`: sends stdin (or FILE) in 1 MiB chunks; prints the new episode's id.
pub async fn import_node(target: &Target, file: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    use std::io::Read;
    let mut input: Box<dyn Read + Send> = match &file {
        Some(p) => {
            Box::new(std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?)
        }
        None => Box::new(std::io::stdin()),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::NodeChunk>(4);
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = input.read(&mut buf).context("read the bundle")?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            if tx.blocking_send(pb::NodeChunk { data: buf }).is_err() {
                return Ok(());
            }
        }
    });
    let r = connect_to(target)
        .await?
        .import_node(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    reader.await.context("reader task")??;
    let r = r.map_err(rpc_err)?.into_inner();
    if json {
        println!("{}", to_json(&r));
    } else {
        println!("{}", r.episode.map(|e| e.id).unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

/// `fork --to`: the node at `turn` of `episode` exported from `here`, streamed straight into an
/// import on `there`, and forked there to `count` copies (the imported episode is the first).
/// Prints the copies' ids on `there`, one a line (`--json`: the ids and the time each part
/// took).
pub async fn fork_to(
    here: &Target,
    there: &Target,
    episode: String,
    turn: u32,
    count: u32,
    json: bool,
) -> Result<ExitCode> {
    use tokio_stream::StreamExt;
    if count == 0 {
        anyhow::bail!("--count must be at least 1");
    }
    let t = std::time::Instant::now();
    let mut from = connect_to(here).await?;
    let mut to = connect_to(there).await?;
    let chunks = from
        .export_node(pb::ExportNodeRequest { episode, turn })
        .await
        .map_err(rpc_err)?
        .into_inner();
    // An export error ends the stream early: the import then sees a truncated bundle and
    // refuses it, and the export's own error is reported.
    let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let f2 = failed.clone();
    let stream = chunks.map_while(move |r| match r {
        Ok(c) => Some(c),
        Err(e) => {
            *f2.lock().expect("lock") = Some(e);
            None
        }
    });
    let imported = to.import_node(stream).await;
    if let Some(e) = failed.lock().expect("lock").take() {
        return Err(rpc_err(e).context("export"));
    }
    let imported = imported.map_err(rpc_err).context("import")?.into_inner();
    let moved_ms = t.elapsed().as_millis() as u64;
    let first = imported.episode.map(|e| e.id).unwrap_or_default();
    let mut ids = vec![first.clone()];
    if count > 1 {
        let r = to
            .fork(pb::ForkRequest {
                episode: first,
                turn: imported.turn,
                count: count - 1,
                keep_warm: 0,
            })
            .await
            .map_err(rpc_err)
            .context("fork")?
            .into_inner();
        ids.extend(r.episodes);
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "episodes": ids,
                "turn": imported.turn,
                "bundle_bytes": imported.bundle_bytes,
                "moved_ms": moved_ms,
                "total_ms": t.elapsed().as_millis() as u64,
            })
        );
    } else {
        for id in ids {
            println!("{id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
