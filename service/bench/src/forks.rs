//! `sandtree bench --forks N`: fork latency of one node with a CRIU image (the python worker of
//! `--density-trajectory` after its first job), cold and warm, beside CRIU's own restore time of
//! the same image in the same run; and the memory that warm copies of it hold, without and with
//! KSM page merging.
//!
//! - cold: N forks, each timed from the Fork call to its answer (the copy is running then), then
//!   deleted. CRIU's part is Stats' criu_restore_ms over the same forks.
//! - warm: N times, `prepare 1` (not timed), then the same timed fork.
//! - memory: `prepare 16` on a service without `--ksm` and on one with it (after KSM's daemon
//!   has scanned them): the copies' anonymous memory, and what KSM saves host-wide.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sandtree_client::{connect, rpc_err, Client};
use sandtree_proto::v1 as pb;
use serde::Serialize;

use crate::{create, ensure_image, load_suite, pct, step, BenchArgs, Managed};

#[derive(Debug, Default, Serialize)]
pub struct ForksReport {
    pub trajectory: String,
    pub upto_turn: usize,
    pub n: usize,
    pub storage: String,
    pub cold_ms: Vec<f64>,
    pub warm_ms: Vec<f64>,
    pub cold_ms_p50: f64,
    pub cold_ms_p99: f64,
    pub warm_ms_p50: f64,
    pub warm_ms_p99: f64,
    /// CRIU's own restore time over the cold forks.
    pub criu_restore_ms_p50: f64,
    /// The service's whole restore (clone, cgroups, CRIU) over the cold forks.
    pub restore_ms_p50: f64,
    pub cold_over_criu: f64,
    pub copies: u32,
    /// Anonymous memory of `copies` warm copies, each, without KSM (MiB).
    pub copy_mib_plain: f64,
    /// With KSM: anonymous memory per copy, and what KSM saves per copy once it has scanned.
    pub copy_mib_ksm_anon: f64,
    pub ksm_saved_mib_per_copy: f64,
    pub copy_mib_ksm_net: f64,
}

async fn source(c: &mut Client, image: &str, turns: &[String]) -> Result<String> {
    let id = create(c, image, "auto").await?;
    for t in turns {
        step(c, &id, t).await?;
    }
    Ok(id)
}

async fn delete(c: &mut Client, id: String) -> Result<()> {
    c.delete_episode(pb::DeleteEpisodeRequest { episode: id })
        .await
        .map_err(rpc_err)?;
    Ok(())
}

async fn timed_fork(c: &mut Client, ep: &str, turn: u32) -> Result<(f64, String, u32)> {
    let t = Instant::now();
    let r = c
        .fork(pb::ForkRequest {
            episode: ep.into(),
            turn,
            count: 1,
            keep_warm: 0,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    Ok((ms, r.episodes[0].clone(), r.warm))
}

async fn prepare(c: &mut Client, ep: &str, turn: u32, count: u32) -> Result<pb::PrepareResponse> {
    Ok(c.prepare(pb::PrepareRequest {
        episode: ep.into(),
        turn,
        count,
    })
    .await
    .map_err(rpc_err)?
    .into_inner())
}

async fn stats(c: &mut Client, reset: bool) -> Result<pb::StatsResponse> {
    Ok(c.stats(pb::StatsRequest {
        reset_timings: reset,
        ..Default::default()
    })
    .await
    .map_err(rpc_err)?
    .into_inner())
}

pub async fn run(args: &BenchArgs, n: usize, sandtree: &Path) -> Result<std::process::ExitCode> {
    let suite = load_suite(&args.suite, Some(&args.density_trajectory))?;
    let Some(t) = suite
        .into_iter()
        .find(|t| t.name == args.density_trajectory)
    else {
        bail!("no trajectory named {}", args.density_trajectory);
    };
    // Up to the first job the worker did: its process and counter are in the node's image.
    let upto = 4.min(t.turns.len());
    let turns: Vec<String> = t.turns[..upto].iter().map(|x| x.cmd.clone()).collect();
    let copies: u32 = 16;
    let mut r = ForksReport {
        trajectory: t.name.clone(),
        upto_turn: upto,
        n,
        storage: args.storage.clone(),
        copies,
        ..Default::default()
    };
    let base = std::env::temp_dir().join(format!("sandtree-forks-{}", std::process::id()));
    let budget = "4096";
    {
        let svc = Managed::start(
            sandtree,
            &base.join("plain"),
            &args.storage,
            true,
            &["--warm-budget-mib", budget],
        )
        .await?;
        let mut c = connect(&svc.socket).await?;
        ensure_image(&mut c, &t.image).await?;
        let src = source(&mut c, &t.image, &turns).await?;
        let turn = upto as u32;
        // One untimed fork first: page cache and CRIU's binary are warm for both series.
        let (_, id, _) = timed_fork(&mut c, &src, turn).await?;
        delete(&mut c, id).await?;
        stats(&mut c, true).await?;
        for i in 0..n {
            let (ms, id, warm) = timed_fork(&mut c, &src, turn)
                .await
                .with_context(|| format!("cold fork {i}"))?;
            if warm != 0 {
                bail!("a cold fork took a warm copy");
            }
            r.cold_ms.push(ms);
            delete(&mut c, id).await?;
        }
        let s = stats(&mut c, true).await?;
        r.criu_restore_ms_p50 = s.criu_restore_ms_p50;
        r.restore_ms_p50 = s.restore_ms_p50;
        for i in 0..n {
            prepare(&mut c, &src, turn, 1).await?;
            let (ms, id, warm) = timed_fork(&mut c, &src, turn)
                .await
                .with_context(|| format!("warm fork {i}"))?;
            if warm != 1 {
                bail!("a fork after prepare did not take the warm copy");
            }
            r.warm_ms.push(ms);
            delete(&mut c, id).await?;
        }
        let p = prepare(&mut c, &src, turn, copies).await?;
        r.copy_mib_plain = p.memory_bytes as f64 / copies as f64 / 1048576.0;
        prepare(&mut c, &src, turn, 0).await?;
        delete(&mut c, src).await?;
    }
    {
        let svc = Managed::start(
            sandtree,
            &base.join("ksm"),
            &args.storage,
            true,
            &["--warm-budget-mib", budget, "--ksm"],
        )
        .await?;
        let mut c = connect(&svc.socket).await?;
        ensure_image(&mut c, &t.image).await?;
        let src = source(&mut c, &t.image, &turns).await?;
        let before = stats(&mut c, false).await?.ksm_saved_bytes;
        let p = prepare(&mut c, &src, upto as u32, copies).await?;
        // Wait for KSM's daemon to scan them: until what it saves stops growing (or 60 s).
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = 0;
        let mut steady = 0;
        while Instant::now() < deadline && steady < 3 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = stats(&mut c, false).await?.ksm_saved_bytes;
            steady = if now == last && now > before {
                steady + 1
            } else {
                0
            };
            last = now;
        }
        let saved = last.saturating_sub(before);
        r.copy_mib_ksm_anon = p.memory_bytes as f64 / copies as f64 / 1048576.0;
        r.ksm_saved_mib_per_copy = saved as f64 / copies as f64 / 1048576.0;
        r.copy_mib_ksm_net = r.copy_mib_ksm_anon - r.ksm_saved_mib_per_copy;
        prepare(&mut c, &src, upto as u32, 0).await?;
        delete(&mut c, src).await?;
    }
    let _ = std::fs::remove_dir_all(&base);
    r.cold_ms_p50 = pct(&r.cold_ms, 0.5);
    r.cold_ms_p99 = pct(&r.cold_ms, 0.99);
    r.warm_ms_p50 = pct(&r.warm_ms, 0.5);
    r.warm_ms_p99 = pct(&r.warm_ms, 0.99);
    r.cold_over_criu = r.cold_ms_p50 / r.criu_restore_ms_p50.max(1e-9);
    let md = format!(
        "# forks of {} after turn {} ({}), {} each\n\n\
         | | p50 ms | p99 ms |\n|---|---|---|\n\
         | cold fork (Fork call to its answer) | {:.1} | {:.1} |\n\
         | warm fork (after prepare 1) | {:.1} | {:.1} |\n\
         | CRIU's own restore, same cold forks | {:.1} | |\n\
         | the service's whole restore (clone, cgroups, CRIU) | {:.1} | |\n\n\
         cold fork p50 / CRIU restore p50 = {:.2}; warm / cold p50 = {:.3}\n\n\
         {} warm copies: {:.2} MiB anonymous memory each without KSM; with KSM {:.2} MiB each, \
         of which KSM saves {:.2} MiB once scanned: {:.2} MiB each net\n",
        r.trajectory,
        r.upto_turn,
        r.storage,
        r.n,
        r.cold_ms_p50,
        r.cold_ms_p99,
        r.warm_ms_p50,
        r.warm_ms_p99,
        r.criu_restore_ms_p50,
        r.restore_ms_p50,
        r.cold_over_criu,
        r.warm_ms_p50 / r.cold_ms_p50.max(1e-9),
        r.copies,
        r.copy_mib_plain,
        r.copy_mib_ksm_anon,
        r.ksm_saved_mib_per_copy,
        r.copy_mib_ksm_net
    );
    print!("{md}");
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("forks.md"), &md)?;
        std::fs::write(out.join("forks.json"), serde_json::to_string_pretty(&r)?)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}
