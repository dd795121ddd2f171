//! `sandtree demo`: the README's walk through fork and rewind, on a private service.

use std::path::{Path, PathBuf};

use anyhow::Result;
use sandtree_client::{connect, rpc_err};
use sandtree_proto::v1 as pb;

use crate::{create, ensure_image, step, Managed};

/// The README's demo: embedded btrfs storage, busybox image, an episode with a daemon, a fork and
/// a rewind, shown step by step.
/// `sandtree` is the CLI binary that serves the private service.
pub async fn demo(data_dir: PathBuf, sandtree: &Path) -> Result<std::process::ExitCode> {
    println!(
        "== sandtree demo (data dir {}, embedded loop-backed btrfs storage)",
        data_dir.display()
    );
    let svc = Managed::start(sandtree, &data_dir, "btrfs", false, &[]).await?;
    let mut c = connect(&svc.socket).await?;
    ensure_image(&mut c, "busybox").await?;
    let ep = create(&mut c, "busybox", "auto").await?;
    println!("created episode {ep} (policy auto)");
    let cmds = [
        "mkdir -p /workspace/svc && cd /workspace/svc && mkfifo q",
        "(n=0; while true; do read l < /workspace/svc/q || continue; n=$((n+1)); echo $n > /workspace/svc/count; done) </dev/null >/dev/null 2>&1 &",
        "echo tick > q; sleep 0.2; cat count",
        "echo tick > q; sleep 0.2; cat count",
        "export GREETING=hello; ls",
    ];
    for cmd in cmds {
        let r = step(&mut c, &ep, cmd).await?;
        println!(
            "turn {:>2} [{:<4} node {:>3}] $ {cmd}\n        {}",
            r.turn,
            r.verdict,
            r.node,
            String::from_utf8_lossy(&r.stdout)
                .trim()
                .replace('\n', "\n        ")
        );
    }
    let fork = c
        .fork(pb::ForkRequest {
            episode: ep.clone(),
            turn: 3,
            count: 2,
            keep_warm: 0,
        })
        .await
        .map_err(rpc_err)?
        .into_inner()
        .episodes;
    println!("forked turn 3 into {}", fork.join(", "));
    for f in &fork {
        let r = step(&mut c, f, "echo tick > q; sleep 0.2; cat count").await?;
        println!(
            "  {f}: counter daemon restored, next tick -> {}",
            String::from_utf8_lossy(&r.stdout).trim()
        );
    }
    let r = step(
        &mut c,
        &ep,
        "echo tick > q; sleep 0.2; cat count; echo $GREETING",
    )
    .await?;
    println!(
        "  {ep} (original, after turn 5): -> {}",
        String::from_utf8_lossy(&r.stdout).trim().replace('\n', " ")
    );
    c.rewind(pb::RewindRequest {
        episode: ep.clone(),
        turn: 1,
    })
    .await
    .map_err(rpc_err)?;
    let r = step(&mut c, &ep, "pwd; ls; cat count 2>&1").await?;
    println!(
        "rewound {ep} to turn 1: {}",
        String::from_utf8_lossy(&r.stdout).trim().replace('\n', " ")
    );
    let tree = c
        .tree(pb::TreeRequest {
            episode: fork[0].clone(),
            whole: false,
            outputs: false,
        })
        .await
        .map_err(rpc_err)?
        .into_inner();
    println!("tree of {}:", fork[0]);
    for t in tree.turns {
        println!(
            "  turn {:>2}  node {:>3}  {:<6} {:>8} bytes  {}",
            t.turn,
            t.node,
            t.kind,
            t.bytes,
            t.action.chars().take(50).collect::<String>()
        );
    }
    let s = c
        .stats(pb::StatsRequest::default())
        .await
        .map_err(rpc_err)?
        .into_inner();
    println!(
        "stats: checkpoint_bytes {}  fs nodes {}  full nodes {}  shared turns {}  dump p50 {:.0} ms  restore p50 {:.0} ms",
        s.checkpoint_bytes, s.nodes_fs, s.nodes_full, s.turns_shared, s.dump_ms_p50, s.restore_ms_p50
    );
    for id in fork.iter().chain(std::iter::once(&ep)) {
        c.delete_episode(pb::DeleteEpisodeRequest {
            episode: id.clone(),
        })
        .await
        .map_err(rpc_err)?;
    }
    println!("== demo done");
    Ok(std::process::ExitCode::SUCCESS)
}
