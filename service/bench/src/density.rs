//! `sandtree bench --density N`: N episodes of one daemon trajectory at once on this host, each
//! thinking (a simulated LLM wait, jittered) between its steps, under each checkpoint scheduler
//! and under policy none (the chat-only baseline) in the same run.
//!
//! It reports per run: step latency as the trainer sees it (p50/p99), the time steps waited for
//! their own episode's checkpoint (accepted_us: p50/p99/max), how long checkpoints were queued,
//! the trainer-side overhead against none (median episode wall time), and memory: the sandboxes'
//! RSS (their cgroups, through Stats) and the service's own. Everything goes through the API,
//! except the service's RSS, read from /proc of the process the bench started.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sandtree_client::{connect, rpc_err, Client};
use sandtree_proto::v1 as pb;
use serde::Serialize;

use crate::{create, ensure_image, lcg, load_suite, pct, step, BenchArgs, Managed};

/// One run: one scheduler, one policy.
#[derive(Debug, Default, Serialize)]
pub struct DensityRun {
    pub scheduler: String,
    pub policy: String,
    pub episodes: usize,
    pub turns: usize,
    pub step_ms_p50: f64,
    pub step_ms_p99: f64,
    /// What sandtree added to each step: the trainer's wall time less the command's own run
    /// time in the sandbox (StepResponse.duration_ms).
    pub added_ms_p50: f64,
    pub added_ms_p99: f64,
    pub wait_ms_p50: f64,
    pub wait_ms_p99: f64,
    pub wait_ms_max: f64,
    /// Steps that waited more than 100 ms for their own checkpoint.
    pub waits_over_100ms: usize,
    pub episode_s_p50: f64,
    pub queue_wait_ms_p50: f64,
    pub queue_wait_ms_p99: f64,
    pub queue_wait_ms_max: f64,
    pub promoted: u64,
    pub batches: u64,
    pub batched: u64,
    pub nodes_fs: u32,
    pub nodes_full: u32,
    pub checkpoint_bytes: u64,
    /// Per running sandbox at the end (the daemon alive), MiB: median.
    pub sandbox_rss_mib_p50: f64,
    pub service_rss_mib: f64,
    /// Every episode ran every turn and every node it made committed.
    pub complete: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct DensityReport {
    pub trajectory: String,
    pub episodes: usize,
    pub think_ms: u64,
    pub storage: String,
    pub runs: Vec<DensityRun>,
    /// RSS of one idle busybox sandbox (after `true`), KiB.
    pub idle_busybox_rss_kib: f64,
    /// edf step p99 / fifo step p99, and the same of what sandtree added to each step.
    pub step_p99_edf_over_fifo: f64,
    pub added_p99_edf_over_fifo: f64,
    /// Median episode wall time of each scheduler against none, minus 1.
    pub overhead_edf: f64,
    pub overhead_fifo: f64,
}

/// `serve` flags for a scheduler spec: `edf`, `fifo`, or `edf/express=N`.
fn serve_args(spec: &str, max_episodes: &str) -> Result<Vec<String>> {
    let mut parts = spec.split('/');
    let mut out = vec![
        "--scheduler".to_string(),
        parts.next().unwrap_or_default().to_string(),
        "--max-episodes".to_string(),
        max_episodes.to_string(),
    ];
    for p in parts {
        match p.split_once('=') {
            Some(("express", n)) => {
                out.extend(["--checkpoint-express".to_string(), n.to_string()]);
            }
            _ => bail!("scheduler spec {spec:?}: expected edf, fifo or edf/express=N"),
        }
    }
    Ok(out)
}

fn rss_of(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Samples {
    steps: Vec<f64>,
    waits: Vec<f64>,
    added: Vec<f64>,
    walls: Vec<f64>,
    ids: Vec<String>,
}

/// Runs N copies of `turns` at once; returns the samples.
async fn one_run(
    c: &Client,
    image: &str,
    turns: &[String],
    n: usize,
    policy: &str,
    think_ms: u64,
    seed: u64,
) -> Result<Samples> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut c = c.clone();
        let r = c
            .create_episode(pb::CreateEpisodeRequest {
                image: image.into(),
                policy: policy.into(),
                labels: [("bench".to_string(), format!("density-{i}"))].into(),
                ..Default::default()
            })
            .await
            .map_err(rpc_err)
            .with_context(|| format!("create episode {i} of {n}"))?;
        ids.push(r.into_inner().id);
    }
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (mut c, id, turns) = (c.clone(), id.clone(), turns.to_vec());
            tokio::spawn(async move {
                let mut rng = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let (mut steps, mut waits, mut added) = (Vec::new(), Vec::new(), Vec::new());
                let started = Instant::now();
                for cmd in &turns {
                    // The LLM's turn: think_ms ± 25%.
                    let jitter = (lcg(&mut rng) % 501) as f64 / 1000.0 - 0.25;
                    let think = (think_ms as f64 * (1.0 + jitter)).max(0.0);
                    tokio::time::sleep(Duration::from_secs_f64(think / 1e3)).await;
                    let t = Instant::now();
                    let r = step(&mut c, &id, cmd).await?;
                    let wall = t.elapsed().as_secs_f64() * 1e3;
                    steps.push(wall);
                    added.push((wall - r.duration_ms as f64).max(0.0));
                    waits.push(r.accepted_us as f64 / 1e3);
                }
                anyhow::Ok((steps, waits, added, started.elapsed().as_secs_f64()))
            })
        })
        .collect();
    let (mut steps, mut waits, mut added, mut walls) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in tasks {
        let (s, w, a, wall) = t.await.context("episode task")??;
        steps.extend(s);
        waits.extend(w);
        added.extend(a);
        walls.push(wall);
    }
    Ok(Samples {
        steps,
        waits,
        added,
        walls,
        ids,
    })
}

pub async fn run(args: &BenchArgs, n: usize, sandtree: &Path) -> Result<std::process::ExitCode> {
    let suite = load_suite(&args.suite, Some(&args.density_trajectory))?;
    let Some(t) = suite
        .into_iter()
        .find(|t| t.name == args.density_trajectory)
    else {
        bail!(
            "no trajectory named {} in {}",
            args.density_trajectory,
            args.suite.display()
        );
    };
    let turns: Vec<String> = t.turns.iter().map(|x| x.cmd.clone()).collect();
    let think_ms = args
        .think_ms
        .unwrap_or(if t.think_ms > 0 { t.think_ms } else { 1000 });
    let schedulers: Vec<String> = args
        .schedulers
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    // none first (the baseline), then auto under each scheduler.
    let mut plan = vec![("edf".to_string(), "none".to_string())];
    plan.extend(schedulers.iter().map(|s| (s.clone(), "auto".to_string())));
    let mut report = DensityReport {
        trajectory: t.name.clone(),
        episodes: n,
        think_ms,
        storage: args.storage.clone(),
        ..Default::default()
    };
    let base = std::env::temp_dir().join(format!("sandtree-density-{}", std::process::id()));
    let started = Instant::now();
    for (k, (sched, policy)) in plan.iter().enumerate() {
        eprintln!(
            "[{:>5.0}s] density: {n} × {} under {policy}, scheduler {sched}",
            started.elapsed().as_secs_f64(),
            t.name
        );
        let max = (n + 2).to_string();
        let svc = Managed::start(
            sandtree,
            &base.join(format!("run{k}")),
            &args.storage,
            true,
            &serve_args(sched, &max)?
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .await?;
        let mut c = connect(&svc.socket).await?;
        ensure_image(&mut c, &t.image).await?;
        if k == 0 {
            ensure_image(&mut c, "busybox").await?;
            let id = create(&mut c, "busybox", "none").await?;
            step(&mut c, &id, "true").await?;
            let s = c
                .stats(pb::StatsRequest::default())
                .await
                .map_err(rpc_err)?
                .into_inner();
            report.idle_busybox_rss_kib = s
                .per_episode
                .iter()
                .find(|e| e.id == id)
                .map_or(0.0, |e| e.memory_bytes as f64 / 1024.0);
            c.delete_episode(pb::DeleteEpisodeRequest { episode: id })
                .await
                .map_err(rpc_err)?;
        }
        let Samples {
            steps,
            waits,
            added,
            walls,
            ids,
        } = one_run(&c, &t.image, &turns, n, policy, think_ms, args.seed).await?;
        // Settle: a Stats call returns once every pending checkpoint has committed or failed.
        let s = c
            .stats(pb::StatsRequest::default())
            .await
            .map_err(rpc_err)?
            .into_inner();
        let mine: Vec<&pb::EpisodeStats> = s
            .per_episode
            .iter()
            .filter(|e| ids.contains(&e.id))
            .collect();
        let mut rss: Vec<f64> = mine
            .iter()
            .map(|e| e.memory_bytes as f64 / 1048576.0)
            .collect();
        rss.sort_by(|a, b| a.total_cmp(b));
        let mut complete = mine.len() == n && mine.iter().all(|e| e.turn as usize == turns.len());
        for id in &ids {
            let tr = c
                .tree(pb::TreeRequest {
                    episode: id.clone(),
                    ..Default::default()
                })
                .await
                .map_err(rpc_err)?
                .into_inner();
            // Shared turns point at a committed node too.
            complete &= tr.turns.iter().all(|t| t.state == "committed");
        }
        let run = DensityRun {
            scheduler: sched.clone(),
            policy: policy.clone(),
            episodes: n,
            turns: steps.len(),
            step_ms_p50: pct(&steps, 0.5),
            step_ms_p99: pct(&steps, 0.99),
            added_ms_p50: pct(&added, 0.5),
            added_ms_p99: pct(&added, 0.99),
            wait_ms_p50: pct(&waits, 0.5),
            wait_ms_p99: pct(&waits, 0.99),
            wait_ms_max: pct(&waits, 1.0),
            waits_over_100ms: waits.iter().filter(|w| **w > 100.0).count(),
            episode_s_p50: pct(&walls, 0.5),
            queue_wait_ms_p50: s.queue_wait_ms_p50,
            queue_wait_ms_p99: s.queue_wait_ms_p99,
            queue_wait_ms_max: s.queue_wait_ms_max,
            promoted: s.checkpoints_promoted,
            batches: s.checkpoint_batches,
            batched: s.checkpoints_batched,
            nodes_fs: mine.iter().map(|e| e.nodes_fs).sum(),
            nodes_full: mine.iter().map(|e| e.nodes_full).sum(),
            checkpoint_bytes: mine.iter().map(|e| e.checkpoint_bytes).sum(),
            sandbox_rss_mib_p50: pct(&rss, 0.5),
            service_rss_mib: rss_of(svc.pid()),
            complete,
        };
        eprintln!(
            "  step p50/p99 {:.0}/{:.0} ms, own-checkpoint wait p99/max {:.0}/{:.0} ms, queued p99 {:.0} ms, {} promoted, {} batches, complete {}",
            run.step_ms_p50, run.step_ms_p99, run.wait_ms_p99, run.wait_ms_max, run.queue_wait_ms_p99, run.promoted, run.batches, run.complete
        );
        for id in ids {
            c.delete_episode(pb::DeleteEpisodeRequest { episode: id })
                .await
                .map_err(rpc_err)?;
        }
        report.runs.push(run);
        drop(svc);
    }
    let find = |s: &str, p: &str| {
        report
            .runs
            .iter()
            .find(|r| r.scheduler == s && r.policy == p)
    };
    let none_wall = find("edf", "none").map_or(0.0, |r| r.episode_s_p50);
    let over = |r: Option<&DensityRun>| match r {
        Some(r) if none_wall > 0.0 => r.episode_s_p50 / none_wall - 1.0,
        _ => f64::NAN,
    };
    report.overhead_edf = over(find("edf", "auto"));
    report.overhead_fifo = over(find("fifo", "auto"));
    if let (Some(e), Some(f)) = (find("edf", "auto"), find("fifo", "auto")) {
        report.step_p99_edf_over_fifo = e.step_ms_p99 / f.step_ms_p99.max(1e-9);
        report.added_p99_edf_over_fifo = e.added_ms_p99 / f.added_ms_p99.max(1e-9);
    }
    let md = markdown(&report);
    print!("{md}");
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("density.md"), &md)?;
        std::fs::write(
            out.join("density.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
    }
    let _ = std::fs::remove_dir_all(&base);
    let ok = report.runs.iter().all(|r| r.complete);
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

fn markdown(r: &DensityReport) -> String {
    let mut md = format!(
        "# density: {} episodes of {} at once, think {} ms ± 25%, {}\n\n",
        r.episodes, r.trajectory, r.think_ms, r.storage
    );
    md += "| scheduler | policy | step p50/p99 ms | added by sandtree p50/p99 ms | own-checkpoint wait p50/p99/max ms | waits > 100 ms | queued p50/p99/max ms | promoted | fs batches (checkpoints) | fs/full nodes | episode wall p50 s | sandbox RSS p50 MiB | service RSS MiB | complete |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for x in &r.runs {
        md += &format!(
            "| {} | {} | {:.0}/{:.0} | {:.0}/{:.0} | {:.1}/{:.1}/{:.1} | {} of {} | {:.0}/{:.0}/{:.0} | {} | {} ({}) | {}/{} | {:.2} | {:.1} | {:.1} | {} |\n",
            x.scheduler, x.policy, x.step_ms_p50, x.step_ms_p99, x.added_ms_p50, x.added_ms_p99, x.wait_ms_p50, x.wait_ms_p99,
            x.wait_ms_max, x.waits_over_100ms, x.turns, x.queue_wait_ms_p50, x.queue_wait_ms_p99,
            x.queue_wait_ms_max, x.promoted, x.batches, x.batched, x.nodes_fs, x.nodes_full,
            x.episode_s_p50, x.sandbox_rss_mib_p50, x.service_rss_mib, x.complete
        );
    }
    md += &format!(
        "\nstep p99 edf / fifo = {:.2} (what sandtree added: {:.2}); trainer-side overhead against none (median episode wall time): edf {:+.2}%, fifo {:+.2}%; idle busybox sandbox RSS {:.0} KiB\n",
        r.step_p99_edf_over_fifo,
        r.added_p99_edf_over_fifo,
        r.overhead_edf * 100.0,
        r.overhead_fifo * 100.0,
        r.idle_busybox_rss_kib
    );
    md
}
