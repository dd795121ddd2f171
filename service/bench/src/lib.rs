//! `sandtree bench` and `sandtree demo`: drive a private service instance through the public
//! gRPC API (sandtree-client), started as `sandtree serve` with a data dir and socket of their own.
//! They read nothing of the service's data dir: every figure comes from the API.
//!
//! The bench runs every trajectory of a suite under each policy in one run and measures:
//! recovery correctness (fork at turn t, replay t+1.., compare every observation with the
//! original run), checkpoint traffic (checkpoint_bytes of auto and full), fork and rewind latency
//! (from the call to the first step being accepted), and in the same run the runc baseline
//! (`runc checkpoint --leave-running` + `runc restore` of the same sandbox shape).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sandtree_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use sandtree_client::{connect, rpc_err, Client};

mod demo;
mod density;
mod forks;
pub use demo::demo;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Directory of trajectory *.json files.
    #[arg(long)]
    suite: PathBuf,
    /// btrfs (a private loop image), zfs (a private zfs-fuse file pool), zfs:POOL/DATASET, or dir.
    #[arg(long, default_value = "btrfs")]
    storage: String,
    /// Policies to run, comma-separated.
    #[arg(long, default_value = "none,full,auto")]
    policies: String,
    /// Fork points per trajectory for the correctness check (0: every turn).
    #[arg(long, default_value_t = 0)]
    fork_points: usize,
    /// Seed for sampling fork points.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Think time between turns in ms (default: each trajectory's think_ms).
    #[arg(long)]
    think_ms: Option<u64>,
    /// Only trajectories whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// runc checkpoint/restore iterations for the baseline (0 skips it).
    #[arg(long, default_value_t = 10)]
    runc_iterations: usize,
    /// Write report.json and report.md here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Data dir of the private service (default: a fresh temporary dir, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run the service with --verify-verdicts (auto verdicts cross-checked and upgraded; the
    /// confusion table then no longer shows the inspector alone).
    #[arg(long)]
    verify_verdicts: bool,
    /// Run the service with --no-inspector: auto uses the conservative verdict (what auto
    /// costs without eBPF).
    #[arg(long)]
    no_inspector: bool,
    /// Runs of the syscall-heavy command for the inspector overhead, with the programs attached
    /// and without (a second service with --no-inspector); 0 skips it.
    #[arg(long, default_value_t = 7)]
    overhead_runs: usize,
    /// The syscall-heavy commands, run in the debian image (repeat the flag for several).
    #[arg(long, default_values_t = [
        "for i in 1 2 3 4 5 6 7 8 9 10; do find / -xdev; done | wc -l".to_string(),
        "tar c /usr | wc -c".to_string(),
    ])]
    overhead_cmd: Vec<String>,
    /// Cold forks: drop the host's page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`) before
    /// every timed fork and rewind, and before every runc restore of the baseline, so that both
    /// read their images and snapshots from disk. Host-wide: other work on the host slows too.
    #[arg(long)]
    cold: bool,
    /// Density instead of the suite: N episodes of `--density-trajectory` at once, each thinking
    /// `--think-ms` (default the trajectory's) ± 25% between steps, under policy none and then
    /// auto under each of `--schedulers`, each on a fresh service (density.md / density.json).
    #[arg(long)]
    density: Option<usize>,
    #[arg(long, default_value = "repair-background-worker")]
    density_trajectory: String,
    /// Schedulers for --density: edf, fifo, or edf/express=N (serve --checkpoint-express N).
    #[arg(long, default_value = "edf,fifo")]
    schedulers: String,
    /// Fork latency instead of the suite: N cold and N warm forks of the python worker node of
    /// `--density-trajectory`, beside CRIU's own restore time, and the memory of 16 warm copies
    /// without and with `--ksm` (forks.md / forks.json). Turns the host's KSM on for the second
    /// part, and back off.
    #[arg(long)]
    forks: Option<usize>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Trajectory {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub think_ms: u64,
    #[serde(default)]
    pub note: String,
    pub turns: Vec<TurnSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TurnSpec {
    pub cmd: String,
    pub effect: String,
}

pub fn load_suite(dir: &Path, filter: Option<&str>) -> Result<Vec<Trajectory>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read suite {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let t: Trajectory = serde_json::from_slice(&std::fs::read(&f)?)
            .with_context(|| format!("parse {}", f.display()))?;
        if filter.is_none_or(|s| t.name.contains(s)) {
            out.push(t);
        }
    }
    if out.is_empty() {
        bail!("no trajectories in {}", dir.display());
    }
    Ok(out)
}

/// A private `sandtree serve`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Managed {
    child: Child,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pool: Option<String>,
    remove_data: bool,
    /// The service mounts its embedded loop-backed btrfs under the data dir; unmounted at stop.
    embedded_btrfs: bool,
}

impl Managed {
    /// Starts `sandtree` (the CLI binary) as `serve` on `data_dir`, with its socket there.
    pub async fn start(
        sandtree: &Path,
        data_dir: &Path,
        storage: &str,
        remove_data: bool,
        extra: &[&str],
    ) -> Result<Managed> {
        std::fs::create_dir_all(data_dir)?;
        let data_dir = data_dir.canonicalize()?;
        let socket = data_dir.join("sandtree.sock");
        let (spec, pool) = if storage == "zfs" {
            let name = format!("stbench{}", std::process::id());
            sandtree_storage::pool::create_file_pool(&name, &data_dir.join("zpool.img"), 8 << 30)
                .context("create zfs-fuse pool")?;
            (format!("zfs:{name}/sandtree"), Some(name))
        } else {
            (storage.to_string(), None)
        };
        let log = std::fs::File::create(data_dir.join("serve.log"))?;
        let child = Command::new(sandtree)
            .args(["serve", "--storage", &spec, "--socket"])
            .arg(&socket)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut m = Managed {
            child,
            socket,
            data_dir,
            pool,
            remove_data,
            embedded_btrfs: storage == "btrfs",
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if connect(&m.socket).await.is_ok() {
                return Ok(m);
            }
            if let Some(st) = m.child.try_wait()? {
                let log = std::fs::read_to_string(m.data_dir.join("serve.log")).unwrap_or_default();
                bail!(
                    "service exited ({st}): {}",
                    log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                );
            }
            if Instant::now() > deadline {
                bail!("service did not come up within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The service's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(&mut self) {
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = self.pool.take() {
            if let Err(e) = sandtree_storage::pool::destroy_file_pool(&p) {
                eprintln!("warning: cannot destroy zfs pool {p}: {e}");
            }
        }
        if self.embedded_btrfs || self.remove_data {
            // The service unmounts its embedded btrfs when it stops; one that was killed, or
            // failed after mounting it, leaves it mounted. The image stays in a kept data dir;
            // the next service mounts it again.
            unmount_beneath(&self.data_dir);
        }
        if self.remove_data {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

/// Unmounts whatever is still mounted beneath `dir` (the private service's data dir), deepest
/// first; a loop mount frees its device as it goes (auto-clear).
fn unmount_beneath(dir: &Path) {
    let Ok(mounts) = sandtree_storage::pool::mounts() else {
        return;
    };
    let mut under: Vec<PathBuf> = mounts
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir) && m != dir)
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    under.dedup();
    for m in under {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Command::new("umount")
                .arg(&m)
                .stderr(Stdio::piped())
                .output()
            {
                Ok(o) if o.status.success() => break,
                Ok(o)
                    if String::from_utf8_lossy(&o.stderr).contains("busy")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(o) => {
                    eprintln!(
                        "warning: cannot unmount {}: {}",
                        m.display(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                    break;
                }
                Err(e) => {
                    eprintln!("warning: cannot run umount {}: {e}", m.display());
                    break;
                }
            }
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn ensure_image(c: &mut Client, name: &str) -> Result<()> {
    let have = c
        .list_images(pb::ListImagesRequest {})
        .await
        .map_err(rpc_err)?
        .into_inner()
        .images;
    if have.iter().any(|i| i == name) {
        return Ok(());
    }
    eprintln!("building image {name}");
    let mut s = c
        .build_image(pb::BuildImageRequest { name: name.into() })
        .await
        .map_err(rpc_err)?
        .into_inner();
    while let Some(m) = s.message().await.map_err(rpc_err)? {
        if m.done {
            break;
        }
        eprintln!("  {}", m.message);
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Obs {
    stdout: String,
    stderr: String,
    exit_code: i32,
}

/// A new episode of `image` under `policy`; returns its id.
pub(crate) async fn create(c: &mut Client, image: &str, policy: &str) -> Result<String> {
    Ok(c.create_episode(pb::CreateEpisodeRequest {
        image: image.into(),
        policy: policy.into(),
        ..Default::default()
    })
    .await
    .map_err(rpc_err)
    .with_context(|| format!("create an episode of {image} under {policy}"))?
    .into_inner()
    .id)
}

pub(crate) async fn step(c: &mut Client, ep: &str, cmd: &str) -> Result<pb::StepResponse> {
    c.step(pb::StepRequest {
        episode: ep.into(),
        command: cmd.into(),
        timeout_ms: 60_000,
        ..Default::default()
    })
    .await
    .map_err(rpc_err)
    .with_context(|| format!("step {ep}: {cmd}"))
    .map(|r| r.into_inner())
}

fn obs(r: &pb::StepResponse) -> Obs {
    Obs {
        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        exit_code: r.exit_code,
    }
}

#[derive(Debug, Default, Serialize)]
struct PolicyResult {
    policy: String,
    fork_points: usize,
    fork_points_correct: usize,
    /// Forks of forks: chains fork@t1 -> replay -> fork@t2 of that copy -> replay -> fork@t3 of
    /// that one -> replay to the end, every observation compared with the original run.
    nested_chains: usize,
    nested_chains_correct: usize,
    /// The deepest fork level the chains reached (3 when every trajectory has >= 4 turns).
    nested_depth: usize,
    checkpoint_bytes: u64,
    nodes_fs: u32,
    nodes_full: u32,
    turns_shared: u32,
    /// Of the shared turns, those whose fs verdict was refuted (no storage change).
    fs_verdicts_refuted: u32,
    step_ms: Vec<f64>,
    step_wait_ms: Vec<f64>,
    /// Wall time of the original runs as the trainer sees it: every step plus the think time
    /// between steps.
    episode_ms: f64,
    fork_ms: Vec<f64>,
    /// The forks of nodes that hold a CRIU image (a CRIU restore), and of nodes that do not (a
    /// fresh init on a clone of the snapshot): subsets of `fork_ms`.
    fork_image_ms: Vec<f64>,
    fork_fs_ms: Vec<f64>,
    rewind_ms: Vec<f64>,
    checkpoint_ms_p50: f64,
    checkpoint_ms_p99: f64,
    mismatches: Vec<String>,
    /// What CRIU wrote for the images of the original runs (auto keeps less: page dedup).
    image_dumped_bytes: u64,
    /// full only: its checkpoint bytes had each image kept only the pages that changed since
    /// the previous turn's (the service prices it: Stats with price_page_dedup, nothing
    /// rewritten).
    priced_with_dedup: u64,
    /// Per trajectory: (checkpoint bytes, CRIU image bytes) of its original run.
    per_trajectory: std::collections::BTreeMap<String, (u64, u64)>,
    /// Verdict vs ground-truth label counts: label -> verdict -> n.
    confusion: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u32>>,
}

pub(crate) fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

fn sample_points(n: usize, k: usize, seed: &mut u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    if k == 0 || k >= n {
        return all;
    }
    for i in (1..all.len()).rev() {
        let j = (lcg(seed) as usize) % (i + 1);
        all.swap(i, j);
    }
    let mut s: Vec<usize> = all.into_iter().take(k).collect();
    s.sort();
    s
}

pub fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs one trajectory under one policy, then checks recovery at the sampled fork points.
async fn run_one(
    c: &mut Client,
    t: &Trajectory,
    policy: &str,
    args: &BenchArgs,
    seed: &mut u64,
    res: &mut PolicyResult,
) -> Result<()> {
    let ep = create(c, &t.image, policy).await?;
    let think = Duration::from_millis(args.think_ms.unwrap_or(t.think_ms));
    let mut original = Vec::new();
    let episode_start = Instant::now();
    for (i, turn) in t.turns.iter().enumerate() {
        if i > 0 && !think.is_zero() {
            tokio::time::sleep(think).await;
        }
        let s = Instant::now();
        let r = step(c, &ep, &turn.cmd).await?;
        res.step_ms.push(s.elapsed().as_secs_f64() * 1e3);
        res.step_wait_ms.push(r.accepted_us as f64 / 1e3);
        *res.confusion
            .entry(turn.effect.clone())
            .or_default()
            .entry(r.verdict.clone())
            .or_default() += 1;
        original.push(obs(&r));
    }
    res.episode_ms += episode_start.elapsed().as_secs_f64() * 1e3;
    // Traffic of the original run alone (stats waits for pending checkpoints); for full also
    // what page dedup would have saved it.
    let st = c
        .stats(pb::StatsRequest {
            price_page_dedup: policy == "full",
            ..Default::default()
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    let e = st
        .per_episode
        .iter()
        .find(|e| e.id == ep)
        .context("stats lack the episode")?;
    res.checkpoint_bytes += e.checkpoint_bytes;
    res.nodes_fs += e.nodes_fs;
    res.nodes_full += e.nodes_full;
    res.turns_shared += e.turns_shared;
    res.fs_verdicts_refuted += e.fs_verdicts_refuted;
    res.per_trajectory
        .insert(t.name.clone(), (e.checkpoint_bytes, e.image_bytes));
    res.image_dumped_bytes += e.image_dumped_bytes;
    if policy == "full" {
        res.priced_with_dedup += e.checkpoint_bytes - e.page_dedup_saved_bytes;
    }
    let restores_image = turns_with_image(c, &ep).await?;
    // Recovery correctness: fork at t, replay t+1.., compare.
    for t0 in sample_points(t.turns.len(), args.fork_points, seed) {
        if args.cold {
            drop_caches()?;
        }
        let s = Instant::now();
        let fork = match c
            .fork(pb::ForkRequest {
                episode: ep.clone(),
                turn: t0 as u32,
                count: 1,
                keep_warm: 0,
            })
            .await
        {
            Ok(r) => r.into_inner().episodes,
            Err(e) => {
                // A node that could not be checkpointed: this fork point is not recovered.
                res.fork_points += 1;
                res.mismatches.push(format!(
                    "{} fork@{t0}: fork failed: {}",
                    t.name,
                    e.message()
                ));
                continue;
            }
        };
        let fork_rpc = s.elapsed().as_secs_f64() * 1e3;
        let f = fork
            .into_iter()
            .next()
            .context("fork returned no episode")?;
        let what = format!("fork@{t0}");
        let (ok, first) = replay(c, &f, t, &original, t0..t.turns.len(), &what, res).await?;
        if let Some(accepted_us) = first {
            let ms = fork_rpc + accepted_us as f64 / 1e3;
            res.fork_ms.push(ms);
            if restores_image.contains(&(t0 as u32)) {
                res.fork_image_ms.push(ms);
            } else {
                res.fork_fs_ms.push(ms);
            }
        }
        res.fork_points += 1;
        res.fork_points_correct += ok as usize;
        c.delete_episode(pb::DeleteEpisodeRequest { episode: f })
            .await
            .map_err(rpc_err)?;
    }
    nested_chain(c, &ep, t, &original, res).await?;
    // Rewind latency: rewind the original to a few turns, latest first, and take one step.
    let n = t.turns.len();
    for t0 in [n.saturating_sub(2), n / 2, 1]
        .into_iter()
        .filter(|&x| x < n)
    {
        if args.cold {
            drop_caches()?;
        }
        let s = Instant::now();
        if let Err(e) = c
            .rewind(pb::RewindRequest {
                episode: ep.clone(),
                turn: t0 as u32,
            })
            .await
        {
            res.mismatches.push(format!(
                "{} rewind@{t0}: rewind failed: {}",
                t.name,
                e.message()
            ));
            continue;
        }
        let rpc = s.elapsed().as_secs_f64() * 1e3;
        let r = step(c, &ep, &t.turns[t0].cmd).await?;
        res.rewind_ms.push(rpc + r.accepted_us as f64 / 1e3);
        if obs(&r) != original[t0] {
            res.mismatches
                .push(format!("{} rewind@{t0}: turn {} differs", t.name, t0 + 1));
        }
    }
    c.delete_episode(pb::DeleteEpisodeRequest { episode: ep })
        .await
        .map_err(rpc_err)?;
    Ok(())
}

/// Replays turns `range` of `t` in episode `f` and compares each observation with the original
/// run's; the first difference is recorded in `res.mismatches` (named by `what`) and ends the
/// replay. Returns whether all matched, and how long the first step waited (its accepted_us).
async fn replay(
    c: &mut Client,
    f: &str,
    t: &Trajectory,
    original: &[Obs],
    range: std::ops::Range<usize>,
    what: &str,
    res: &mut PolicyResult,
) -> Result<(bool, Option<u64>)> {
    let mut first = None;
    for i in range {
        let turn = &t.turns[i];
        let r = step(c, f, &turn.cmd).await?;
        first.get_or_insert(r.accepted_us);
        let got = obs(&r);
        if got != original[i] {
            if res.mismatches.len() < 20 {
                res.mismatches.push(format!(
                    "{} {what} turn {}: `{}` expected {:?} got {:?}",
                    t.name,
                    i + 1,
                    turn.cmd,
                    original[i],
                    got
                ));
            }
            return Ok((false, first));
        }
    }
    Ok((true, first))
}

/// The fork points of a chain of forks of forks over `n` turns: up to three distinct turns in
/// 1..n, at a quarter, a half and three quarters.
fn nested_points(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = [n / 4, n / 2, 3 * n / 4]
        .into_iter()
        .filter(|&t| t >= 1 && t < n)
        .collect();
    v.dedup();
    v
}

/// Forks of forks: forks the original at the first point, replays the copy up to the next point,
/// forks the copy there (a node the copy made after it was restored), and so on; the last copy
/// replays to the end. Every observation must equal the original's.
async fn nested_chain(
    c: &mut Client,
    ep: &str,
    t: &Trajectory,
    original: &[Obs],
    res: &mut PolicyResult,
) -> Result<()> {
    let points = nested_points(t.turns.len());
    if points.len() < 2 {
        return Ok(());
    }
    let mut src = ep.to_string();
    let mut copies = Vec::new();
    let mut ok = true;
    'chain: for (level, &t0) in points.iter().enumerate() {
        let fork = match c
            .fork(pb::ForkRequest {
                episode: src.clone(),
                turn: t0 as u32,
                count: 1,
                keep_warm: 0,
            })
            .await
        {
            Ok(r) => r.into_inner().episodes,
            Err(e) => {
                ok = false;
                res.mismatches.push(format!(
                    "{} nested fork level {} @{t0}: fork failed: {}",
                    t.name,
                    level + 1,
                    e.message()
                ));
                break;
            }
        };
        let f = fork
            .into_iter()
            .next()
            .context("fork returned no episode")?;
        copies.push(f.clone());
        res.nested_depth = res.nested_depth.max(level + 1);
        let until = points.get(level + 1).copied().unwrap_or(t.turns.len());
        let what = format!("nested fork level {} @{t0}", level + 1);
        if !replay(c, &f, t, original, t0..until, &what, res).await?.0 {
            ok = false;
            break 'chain;
        }
        src = f;
    }
    res.nested_chains += 1;
    res.nested_chains_correct += ok as usize;
    for f in copies {
        c.delete_episode(pb::DeleteEpisodeRequest { episode: f })
            .await
            .map_err(rpc_err)?;
    }
    Ok(())
}

/// The turns of `ep` whose state is held by a node with a CRIU image (shared turns resolve to
/// the node they share).
async fn turns_with_image(c: &mut Client, ep: &str) -> Result<std::collections::BTreeSet<u32>> {
    let turns = c
        .tree(pb::TreeRequest {
            episode: ep.to_string(),
            whole: false,
            outputs: false,
        })
        .await
        .map_err(rpc_err)?
        .into_inner()
        .turns;
    let full: std::collections::BTreeSet<u64> = turns
        .iter()
        .filter(|t| t.kind == "full")
        .map(|t| t.node)
        .collect();
    Ok(turns
        .iter()
        .filter(|t| full.contains(&t.node))
        .map(|t| t.turn)
        .collect())
}

/// Writes dirty pages back and drops the page cache, dentries and inodes (host-wide).
fn drop_caches() -> Result<()> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop caches (--cold needs root)")
}

/// `sandtree bench`: `sandtree` is the CLI binary that serves the private service.
pub async fn run(args: BenchArgs, sandtree: &Path) -> Result<std::process::ExitCode> {
    if let Some(n) = args.density {
        return density::run(&args, n, sandtree).await;
    }
    if let Some(n) = args.forks {
        return forks::run(&args, n, sandtree).await;
    }
    let suite = load_suite(&args.suite, args.filter.as_deref())?;
    let policies: Vec<String> = args
        .policies
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let (data_dir, remove) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("sandtree-bench-{}", std::process::id())),
            true,
        ),
    };
    let started = Instant::now();
    let mut extra = Vec::new();
    if args.verify_verdicts {
        extra.push("--verify-verdicts");
    }
    if args.no_inspector {
        extra.push("--no-inspector");
    }
    let mut svc = Managed::start(sandtree, &data_dir, &args.storage, remove, &extra).await?;
    let mut c = connect(&svc.socket).await?;
    let mut images: Vec<&str> = suite.iter().map(|t| t.image.as_str()).collect();
    images.sort();
    images.dedup();
    for i in images {
        ensure_image(&mut c, i).await?;
    }
    let mut results = Vec::new();
    // A bar over every trajectory run on a terminal; plain lines otherwise (logs, CI).
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new((policies.len() * suite.len()) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30} {pos}/{len} trajectory runs, eta {eta}: {msg}",
            )
            .expect("valid template"),
        );
        b
    });
    for policy in &policies {
        let mut res = PolicyResult {
            policy: policy.clone(),
            ..Default::default()
        };
        let mut seed = args.seed;
        for t in &suite {
            let line = format!(
                "[{:>5.0}s] {policy:<4} {} ({} turns)",
                started.elapsed().as_secs_f64(),
                t.name,
                t.turns.len()
            );
            match &bar {
                Some(b) => {
                    b.set_message(format!("{policy} {}", t.name));
                    b.inc(1);
                }
                None => eprintln!("{line}"),
            }
            run_one(&mut c, t, policy, &args, &mut seed, &mut res)
                .await
                .with_context(|| format!("{} under {policy}", t.name))?;
        }
        // This policy's checkpoints only: the samples are cleared for the next one.
        let after = c
            .stats(pb::StatsRequest {
                reset_timings: true,
                ..Default::default()
            })
            .await
            .map_err(rpc_err)?
            .into_inner();
        res.checkpoint_ms_p50 = after.checkpoint_ms_p50;
        res.checkpoint_ms_p99 = after.checkpoint_ms_p99;
        results.push(res);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let inspector = c
        .stats(pb::StatsRequest::default())
        .await
        .map_err(rpc_err)?
        .into_inner()
        .inspector;
    drop(c);
    svc.stop();
    let overhead = if args.overhead_runs > 0 {
        match inspector_overhead(&args, &data_dir, sandtree).await {
            Ok(o) => Some(o),
            Err(e) => {
                eprintln!("warning: inspector overhead failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let runc = if args.runc_iterations > 0 {
        eprintln!(
            "runc baseline: {} checkpoint/restore iterations",
            args.runc_iterations
        );
        match runc_baseline(args.runc_iterations, args.cold) {
            Ok(r) => Some(r),
            Err(e) => {
                // The measured results above are still worth the report.
                eprintln!("warning: runc baseline failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    let report = report(
        &args,
        &suite,
        &results,
        runc.as_ref(),
        &inspector,
        overhead.as_ref(),
        started.elapsed(),
    );
    println!("{}", report.1);
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
        std::fs::write(
            out.join("report.json"),
            serde_json::to_string_pretty(&report.0)?,
        )?;
        std::fs::write(out.join("report.md"), &report.1)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct OverheadCmd {
    cmd: String,
    /// Command durations (ms) with the inspector's programs attached and the sandbox watched.
    with_ms: Vec<f64>,
    /// The same without the programs (a service with --no-inspector).
    without_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Overhead {
    cmds: Vec<OverheadCmd>,
    /// BPF map bytes of the one watched sandbox after the runs.
    sandbox_map_bytes: u64,
    /// BPF map bytes of the inspector in all (preallocated).
    bpf_map_bytes: u64,
}

/// Runs the overhead commands in a debian sandbox on btrfs, under a service with the inspector
/// and then under one without it, on one data dir next to the bench's.
async fn inspector_overhead(
    args: &BenchArgs,
    data_dir: &Path,
    sandtree: &Path,
) -> Result<Overhead> {
    let dir = data_dir.with_file_name(format!(
        "{}-overhead",
        data_dir.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut out = Overhead {
        cmds: args
            .overhead_cmd
            .iter()
            .map(|c| OverheadCmd {
                cmd: c.clone(),
                with_ms: Vec::new(),
                without_ms: Vec::new(),
            })
            .collect(),
        sandbox_map_bytes: 0,
        bpf_map_bytes: 0,
    };
    for with in [true, false] {
        let extra: &[&str] = if with { &[] } else { &["--no-inspector"] };
        // The first service keeps the data dir (and its debian image) for the second.
        let mut svc = Managed::start(sandtree, &dir, "btrfs", !with, extra).await?;
        let mut c = connect(&svc.socket).await?;
        ensure_image(&mut c, "debian").await?;
        let ep = create(&mut c, "debian", "none").await?;
        for oc in &mut out.cmds {
            step(&mut c, &ep, &oc.cmd).await?; // warm the page cache
            for _ in 0..args.overhead_runs {
                let r = step(&mut c, &ep, &oc.cmd).await?;
                if r.exit_code != 0 {
                    bail!(
                        "`{}` failed: {}",
                        oc.cmd,
                        String::from_utf8_lossy(&r.stderr).trim()
                    );
                }
                let v = if with {
                    &mut oc.with_ms
                } else {
                    &mut oc.without_ms
                };
                v.push(r.duration_ms as f64);
            }
            eprintln!(
                "  overhead `{}` {}: median {:.0} ms",
                oc.cmd,
                if with {
                    "with the inspector"
                } else {
                    "without"
                },
                pct(if with { &oc.with_ms } else { &oc.without_ms }, 0.5)
            );
        }
        if with {
            let st = c
                .stats(pb::StatsRequest::default())
                .await
                .map_err(rpc_err)?
                .into_inner();
            if !st.inspector_loaded {
                bail!("the inspector is not loaded: {}", st.inspector);
            }
            out.sandbox_map_bytes = st.sandbox_map_bytes;
            out.bpf_map_bytes = st.bpf_map_bytes;
        }
        c.delete_episode(pb::DeleteEpisodeRequest { episode: ep })
            .await
            .map_err(rpc_err)?;
        drop(c);
        svc.stop();
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
struct RuncResult {
    checkpoint_ms: Vec<f64>,
    restore_ms: Vec<f64>,
    fork_ms: Vec<f64>,
}

fn report(
    args: &BenchArgs,
    suite: &[Trajectory],
    results: &[PolicyResult],
    runc: Option<&RuncResult>,
    inspector: &str,
    overhead: Option<&Overhead>,
    wall: Duration,
) -> (serde_json::Value, String) {
    let turns: usize = suite.iter().map(|t| t.turns.len()).sum();
    let bytes = |p: &str| {
        results
            .iter()
            .find(|r| r.policy == p)
            .map(|r| r.checkpoint_bytes)
    };
    let ratio = match (bytes("auto"), bytes("full")) {
        (Some(a), Some(f)) if f > 0 => Some(a as f64 / f as f64),
        _ => None,
    };
    let mut md = format!(
        "## sandtree bench: {} trajectories, {turns} turns, storage {}, fork points {}{}\n\n",
        suite.len(),
        args.storage,
        if args.fork_points == 0 {
            "all".to_string()
        } else {
            format!("{} per trajectory (seed {})", args.fork_points, args.seed)
        },
        if args.cold {
            ", cold (page cache dropped before every timed fork, rewind and runc restore)"
        } else {
            ""
        }
    );
    md += "| policy | recovery correctness | forks of forks | checkpoint bytes | fs nodes | full nodes | shared turns (fs refuted) | step p50 ms | step wait p99 ms | checkpoint p50/p99 ms | fork p50/p99 ms | rewind p50/p99 ms |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in results {
        md += &format!(
            "| {} | {}/{} = {:.1}% | {}/{} chains, depth {} | {} | {} | {} | {} ({}) | {:.1} | {:.1} | {:.0}/{:.0} | {:.0}/{:.0} | {:.0}/{:.0} |\n",
            r.policy,
            r.fork_points_correct,
            r.fork_points,
            100.0 * r.fork_points_correct as f64 / r.fork_points.max(1) as f64,
            r.nested_chains_correct,
            r.nested_chains,
            r.nested_depth,
            r.checkpoint_bytes,
            r.nodes_fs,
            r.nodes_full,
            r.turns_shared,
            r.fs_verdicts_refuted,
            pct(&r.step_ms, 0.5),
            pct(&r.step_wait_ms, 0.99),
            r.checkpoint_ms_p50,
            r.checkpoint_ms_p99,
            pct(&r.fork_ms, 0.5),
            pct(&r.fork_ms, 0.99),
            pct(&r.rewind_ms, 0.5),
            pct(&r.rewind_ms, 0.99),
        );
    }
    if let Some(none) = results.iter().find(|r| r.policy == "none") {
        // What checkpointing costs the trainer: its episodes' step time and wall time (steps
        // plus think time) against the chat-only baseline, which checkpoints nothing.
        let steps = |r: &PolicyResult| r.step_ms.iter().sum::<f64>();
        for r in results.iter().filter(|r| r.policy != "none") {
            md += &format!(
                "\ntrainer-side overhead of {} vs none: episode wall time {:.0} vs {:.0} ms = {:+.2}%; time in steps {:.0} vs {:.0} ms = {:+.1}%",
                r.policy,
                r.episode_ms,
                none.episode_ms,
                100.0 * (r.episode_ms / none.episode_ms.max(1e-9) - 1.0),
                steps(r),
                steps(none),
                100.0 * (steps(r) / steps(none).max(1e-9) - 1.0),
            );
        }
        md += "\n";
    }
    if let Some(x) = ratio {
        md += &format!("\ncheckpoint traffic auto/full = {:.1}%\n", 100.0 * x);
    }
    let find = |p: &str| results.iter().find(|r| r.policy == p);
    let mut dedup_json = serde_json::Map::new();
    if let (Some(a), Some(f)) = (find("auto"), find("full")) {
        // The split of auto's saving between the verdicts and page dedup, and what page dedup
        // would do for the whole-image baseline, all from this run.
        let a_whole = a.checkpoint_bytes - a.per_trajectory.values().map(|v| v.1).sum::<u64>()
            + a.image_dumped_bytes;
        let fb = f.checkpoint_bytes.max(1) as f64;
        md += &format!(
            "- auto with every CRIU image kept whole (what CRIU wrote: {} B of images, {} B kept): {a_whole} B = {:.1}% of full\n",
            a.image_dumped_bytes,
            a.per_trajectory.values().map(|v| v.1).sum::<u64>(),
            100.0 * a_whole as f64 / fb
        );
        md += &format!(
            "- full priced with the same page dedup (each image against the previous turn's; nothing rewritten): {} B; auto / that = {:.1}%\n",
            f.priced_with_dedup,
            100.0 * a.checkpoint_bytes as f64 / f.priced_with_dedup.max(1) as f64
        );
        dedup_json.insert("auto_whole_images_bytes".into(), a_whole.into());
        dedup_json.insert(
            "auto_image_dumped_bytes".into(),
            a.image_dumped_bytes.into(),
        );
        dedup_json.insert(
            "full_priced_with_dedup_bytes".into(),
            f.priced_with_dedup.into(),
        );
    }
    if let Some(rc) = runc {
        md += &format!(
            "\nrunc baseline (same run, busybox sandbox): checkpoint --leave-running p50 {:.0} ms, restore p50 {:.0} ms, fork (checkpoint+restore) p50/p99 {:.0}/{:.0} ms\n",
            pct(&rc.checkpoint_ms, 0.5),
            pct(&rc.restore_ms, 0.5),
            pct(&rc.fork_ms, 0.5),
            pct(&rc.fork_ms, 0.99)
        );
        for r in results.iter().filter(|r| !r.fork_ms.is_empty()) {
            md += &format!(
                "- {}: fork p50 / runc fork p50 = {:.2}\n",
                r.policy,
                pct(&r.fork_ms, 0.5) / pct(&rc.fork_ms, 0.5).max(1e-9)
            );
        }
    }
    md += "\nforks by what they restore (from the fork call to the first step accepted)\n\n| policy | forks of a node with a CRIU image: n, p50/p99 ms | vs runc fork p50 | vs runc restore p50 | forks of a node without one: n, p50/p99 ms |\n|---|---|---|---|---|\n";
    for r in results.iter().filter(|r| !r.fork_ms.is_empty()) {
        let vs = |base: Option<f64>| match (base, r.fork_image_ms.is_empty()) {
            (Some(b), false) => format!("{:.2}", pct(&r.fork_image_ms, 0.5) / b.max(1e-9)),
            _ => "–".to_string(),
        };
        let dist = |v: &[f64]| match v.len() {
            0 => "0".to_string(),
            n => format!("{n}, {:.0}/{:.0}", pct(v, 0.5), pct(v, 0.99)),
        };
        md += &format!(
            "| {} | {} | {} | {} | {} |\n",
            r.policy,
            dist(&r.fork_image_ms),
            vs(runc.map(|rc| pct(&rc.fork_ms, 0.5))),
            vs(runc.map(|rc| pct(&rc.restore_ms, 0.5))),
            dist(&r.fork_fs_ms),
        );
    }
    md += "\nverdicts vs labels (rows: label, columns: verdict)\n\n| policy | label | none | fs | proc |\n|---|---|---|---|---|\n";
    for r in results {
        for (label, m) in &r.confusion {
            let g = |k: &str| m.get(k).copied().unwrap_or(0);
            md += &format!(
                "| {} | {} | {} | {} | {} |\n",
                r.policy,
                label,
                g("none"),
                g("fs"),
                g("proc")
            );
        }
    }
    md += &format!("\ninspector: {inspector}\n");
    let daemon_free: Vec<&str> = suite
        .iter()
        .filter(|t| t.turns.iter().all(|x| x.effect != "proc"))
        .map(|t| t.name.as_str())
        .collect();
    let mut verdict_json = serde_json::Map::new();
    for r in results.iter().filter(|r| r.policy == "auto") {
        let m = |label: &str, verdict: &str| {
            r.confusion
                .get(label)
                .and_then(|m| m.get(verdict))
                .copied()
                .unwrap_or(0)
        };
        let unsafe_n = m("fs", "none") + m("proc", "none") + m("proc", "fs");
        let none_labelled: u32 = r.confusion.get("none").map_or(0, |m| m.values().sum());
        let wasteful = m("none", "fs") + m("none", "proc");
        md += &format!(
            "- auto verdicts: unsafe {unsafe_n} (label fs/proc, verdict none; or label proc, verdict fs), wasteful {wasteful} of {none_labelled} none-labelled turns = {:.1}%\n",
            100.0 * wasteful as f64 / none_labelled.max(1) as f64
        );
        let sum = |names: &[&str], pick: fn(&(u64, u64)) -> u64, res: &PolicyResult| -> u64 {
            res.per_trajectory
                .iter()
                .filter(|(n, _)| names.contains(&n.as_str()))
                .map(|(_, v)| pick(v))
                .sum()
        };
        if let Some(full) = results.iter().find(|x| x.policy == "full") {
            let (a, f) = (
                sum(&daemon_free, |v| v.0, r),
                sum(&daemon_free, |v| v.0, full),
            );
            md += &format!(
                "- checkpoint bytes auto/full on the {} daemon-free trajectories: {a} / {f} = {:.2}%\n",
                daemon_free.len(),
                100.0 * a as f64 / f.max(1) as f64
            );
            let images: u64 = r.per_trajectory.values().map(|v| v.1).sum();
            md += &format!(
                "- auto checkpoint bytes over the whole suite: {} ({:.2}% of full's {}); CRIU images of the daemon turns: {images} B = {:.1}% of auto's bytes\n",
                r.checkpoint_bytes,
                100.0 * r.checkpoint_bytes as f64 / full.checkpoint_bytes.max(1) as f64,
                full.checkpoint_bytes,
                100.0 * images as f64 / r.checkpoint_bytes.max(1) as f64
            );
            verdict_json.insert("daemon_free_auto_bytes".into(), a.into());
            verdict_json.insert("daemon_free_full_bytes".into(), f.into());
            verdict_json.insert("auto_image_bytes".into(), images.into());
        }
        verdict_json.insert("unsafe".into(), unsafe_n.into());
        verdict_json.insert("wasteful".into(), wasteful.into());
        verdict_json.insert("none_labelled".into(), none_labelled.into());
    }
    if let Some(o) = overhead {
        for oc in &o.cmds {
            let (w, wo) = (pct(&oc.with_ms, 0.5), pct(&oc.without_ms, 0.5));
            md += &format!(
                "- inspector overhead on `{}` (debian, btrfs, {} runs each, median command time): {w:.0} ms with the programs attached vs {wo:.0} ms without = {:+.1}%\n",
                oc.cmd,
                oc.with_ms.len(),
                100.0 * (w / wo.max(1e-9) - 1.0),
            );
        }
        md += &format!(
            "- bpf map memory: {} B for the watched sandbox (after the runs), {} B preallocated for the host\n",
            o.sandbox_map_bytes, o.bpf_map_bytes
        );
    }
    for r in results.iter().filter(|r| !r.mismatches.is_empty()) {
        md += &format!("\nmismatches under {}:\n", r.policy);
        for m in &r.mismatches {
            md += &format!("- {m}\n");
        }
    }
    md += &format!("\nwall time {:.0} s\n", wall.as_secs_f64());
    let json = serde_json::json!({
        "storage": args.storage, "trajectories": suite.len(), "turns": turns,
        "fork_points_per_trajectory": args.fork_points, "seed": args.seed, "cold": args.cold,
        "policies": results.iter().map(|r| serde_json::json!({
            "policy": r.policy, "fork_points": r.fork_points, "correct": r.fork_points_correct,
            "correctness": r.fork_points_correct as f64 / r.fork_points.max(1) as f64,
            "nested_chains": r.nested_chains, "nested_chains_correct": r.nested_chains_correct, "nested_depth": r.nested_depth,
            "checkpoint_bytes": r.checkpoint_bytes, "nodes_fs": r.nodes_fs, "nodes_full": r.nodes_full,
            "turns_shared": r.turns_shared, "fs_verdicts_refuted": r.fs_verdicts_refuted, "episode_ms": r.episode_ms, "step_ms_sum": r.step_ms.iter().sum::<f64>(), "step_ms_p50": pct(&r.step_ms, 0.5), "step_wait_ms_p99": pct(&r.step_wait_ms, 0.99),
            "fork_ms_p50": pct(&r.fork_ms, 0.5), "fork_ms_p99": pct(&r.fork_ms, 0.99),
            "fork_image_n": r.fork_image_ms.len(), "fork_image_ms_p50": pct(&r.fork_image_ms, 0.5), "fork_image_ms_p99": pct(&r.fork_image_ms, 0.99),
            "fork_fs_n": r.fork_fs_ms.len(), "fork_fs_ms_p50": pct(&r.fork_fs_ms, 0.5), "fork_fs_ms_p99": pct(&r.fork_fs_ms, 0.99),
            "rewind_ms_p50": pct(&r.rewind_ms, 0.5), "rewind_ms_p99": pct(&r.rewind_ms, 0.99),
            "checkpoint_ms_p50": r.checkpoint_ms_p50, "checkpoint_ms_p99": r.checkpoint_ms_p99,
            "confusion": r.confusion, "mismatches": r.mismatches,
        })).collect::<Vec<_>>(),
        "auto_over_full_bytes": ratio,
        "runc": runc.map(|rc| serde_json::json!({"checkpoint_ms_p50": pct(&rc.checkpoint_ms, 0.5), "restore_ms_p50": pct(&rc.restore_ms, 0.5),
            "fork_ms_p50": pct(&rc.fork_ms, 0.5), "fork_ms_p99": pct(&rc.fork_ms, 0.99)})),
        "wall_s": wall.as_secs_f64(),
        "inspector": inspector,
        "auto_verdicts": verdict_json,
        "overhead": overhead,
        "page_dedup": dedup_json,
        "per_trajectory_bytes": results.iter().map(|r| (r.policy.clone(), r.per_trajectory.clone())).collect::<std::collections::BTreeMap<_, _>>(),
    });
    (json, md)
}

/// runc checkpoint --leave-running + runc restore of a busybox container, `n` times; `cold`
/// drops the page cache between the two.
fn runc_baseline(n: usize, cold: bool) -> Result<RuncResult> {
    let dir = std::env::temp_dir().join(format!("sandtree-runc-{}", std::process::id()));
    let _cleanup = scopeguard(dir.clone());
    std::fs::create_dir_all(&dir)?;
    let run = |args: &[&str], cwd: &Path| -> Result<()> {
        // No pipes and no files for stdio: a detached container (run -d, restore -d) inherits
        // runc's stdio; a pipe would make us wait for the container to exit, and a file outside
        // the container is an external file that CRIU refuses to dump. runc logs to --log.
        let log = dir.join("runc.log");
        let _ = std::fs::remove_file(&log);
        let st = Command::new("runc")
            .arg("--log")
            .arg(&log)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("run runc (apt-get install runc)")?;
        if !st.success() {
            bail!(
                "runc {} failed: {}",
                args.join(" "),
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        Ok(())
    };
    let mk_bundle = |name: &str| -> Result<PathBuf> {
        let b = dir.join(name);
        let rootfs = b.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        for d in ["proc", "dev", "tmp", "sys", "workspace"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("copy /bin/busybox")?;
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh"))?;
        std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep"))?;
        run(&["spec"], &b)?;
        let mut spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(b.join("config.json"))?)?;
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = serde_json::json!([
            "/bin/sh",
            "-c",
            "n=0; while true; do n=$((n+1)); sleep 1; done"
        ]);
        spec["root"]["readonly"] = false.into();
        std::fs::write(b.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
        Ok(b)
    };
    let src = mk_bundle("src")?;
    let id = format!("st-bench-{}", std::process::id());
    run(&["run", "-d", &id], &src)?;
    let mut res = RuncResult {
        checkpoint_ms: vec![],
        restore_ms: vec![],
        fork_ms: vec![],
    };
    let mut result = Ok(());
    for i in 0..n {
        let img = dir.join(format!("img{i}"));
        let t = Instant::now();
        if let Err(e) = run(
            &[
                "checkpoint",
                "--leave-running",
                "--image-path",
                img.to_str().unwrap(),
                &id,
            ],
            &src,
        ) {
            result = Err(e);
            break;
        }
        let ck = t.elapsed().as_secs_f64() * 1e3;
        let dst = mk_bundle(&format!("dst{i}"))?;
        let rid = format!("{id}-r{i}");
        if cold {
            drop_caches()?;
        }
        let t = Instant::now();
        if let Err(e) = run(
            &[
                "restore",
                "-d",
                "--image-path",
                img.to_str().unwrap(),
                "--bundle",
                dst.to_str().unwrap(),
                &rid,
            ],
            &dst,
        ) {
            result = Err(e);
            break;
        }
        let rs = t.elapsed().as_secs_f64() * 1e3;
        let _ = run(&["delete", "-f", &rid], &dst);
        res.checkpoint_ms.push(ck);
        res.restore_ms.push(rs);
        res.fork_ms.push(ck + rs);
    }
    let _ = run(&["delete", "-f", &id], &src);
    result.map(|()| res)
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
fn scopeguard(p: PathBuf) -> Cleanup {
    Cleanup(p)
}
