//! `sandtree`: the service (`serve`), its CLI client, `doctor`, `bench` and `demo`.

mod client;
mod doctor;
mod host;
mod remote;
mod server;
mod web;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sandtree_proto::v1 as pb;

pub const DEFAULT_SOCKET: &str = "/run/sandtree/sandtree.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/sandtree";

#[derive(Parser)]
#[command(
    name = "sandtree",
    version,
    about = "Branchable agent sandboxes for RL: fork, rewind and replay episodes"
)]
struct Cli {
    /// Socket of the service (client commands and serve).
    #[arg(long, global = true, env = "SANDTREE_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Reach the service on its TCP listener (`serve --listen`) instead of the socket; needs
    /// --token-file.
    #[arg(
        long,
        global = true,
        env = "SANDTREE_ADDR",
        value_name = "tcp://HOST:PORT"
    )]
    addr: Option<String>,
    /// File holding the token (its content, trimmed; mode 0600 or 0400): client commands send
    /// it with --addr, `serve --listen` requires it of every TCP call.
    #[arg(long, global = true, env = "SANDTREE_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// With --addr: TLS, the service's certificate verified against this CA certificate (PEM).
    #[arg(long, global = true, env = "SANDTREE_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the service: gRPC on a unix socket (mode 0600), and with --listen on TCP too (every
    /// TCP call must carry the token of --token-file); metadata in redb.
    Serve {
        #[arg(long, env = "SANDTREE_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// btrfs (the embedded loop-backed default), zfs:POOL/DATASET, or dir.
        #[arg(long, default_value = "btrfs")]
        storage: sandtree_storage::StorageSpec,
        /// Default per-step timeout in seconds.
        #[arg(long, default_value_t = 600)]
        step_timeout: u64,
        /// Checkpoint batches that may run at once on this host (default: its CPUs). Under edf a
        /// checkpoint that a step of its own episode waits for starts past this cap.
        #[arg(long)]
        checkpoint_slots: Option<usize>,
        /// How the host-wide checkpoint queue is ordered: edf (the deadline is the episode's
        /// expected next step; promotion; fs snapshots due together in one batch) or fifo (in
        /// the order queued; the baseline).
        #[arg(long, default_value = "edf")]
        scheduler: sandtree_engine::Discipline,
        /// Checkpoints that a step waiting for its own may start past --checkpoint-slots (edf;
        /// default: as many as --checkpoint-slots). 0: a waiting step's checkpoint only goes to
        /// the head of the queue.
        #[arg(long)]
        checkpoint_express: Option<usize>,
        /// Do not load the eBPF inspector: auto uses the conservative verdict.
        #[arg(long)]
        no_inspector: bool,
        /// Cross-check every auto verdict against the storage layer and the process table;
        /// an inspector verdict that would have been unsafe is logged loudly and upgraded.
        #[arg(long)]
        verify_verdicts: bool,
        /// Longest chain of parent images an auto checkpoint may read unchanged pages from;
        /// 0 keeps every CRIU image whole.
        #[arg(long, default_value_t = sandtree_runtime::pages::MAX_CHAIN)]
        max_image_chain: usize,
        /// Sandboxes restored or started at once on this host (fork --count N queues the rest).
        #[arg(long, default_value_t = 4)]
        restore_slots: usize,
        /// Memory of one sandbox in MiB, swap included.
        #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(16..))]
        sandbox_memory_mib: u64,
        /// Processes and threads of one sandbox.
        #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(8..))]
        sandbox_pids: u64,
        /// CPU time of one sandbox, in CPUs (1.0 = one core's worth per 100 ms).
        #[arg(long, default_value_t = 1.0)]
        sandbox_cpus: f64,
        /// Size of one sandbox's root filesystem in MiB (its image included); 0: no limit.
        /// Enforced by btrfs quota groups or zfs refquota; the dir backend has none.
        #[arg(long, default_value_t = 10240)]
        sandbox_disk_mib: u64,
        /// Memory in MiB that warm copies (`sandtree prepare`, fork --keep-warm) may hold in
        /// all, their anonymous memory measured frozen; past it the least recently used node's
        /// copies are evicted. 0: no warm copies.
        #[arg(long, default_value_t = 1024)]
        warm_budget_mib: u64,
        /// Restore warm copies with KSM merging on, so identical pages of copies of one node are
        /// shared; turns the host's KSM daemon on (/sys/kernel/mm/ksm/run) if it is off, and
        /// back off at shutdown. KSM lets sandboxes sharing a page time each other's writes (a
        /// side channel between sandboxes): off by default.
        #[arg(long)]
        ksm: bool,
        /// Live episodes (running sandboxes) on this host; create and fork beyond it are
        /// refused with RESOURCE_EXHAUSTED. With the memory limit this bounds the committed
        /// memory: max-episodes x sandbox-memory-mib.
        #[arg(long, default_value_t = 256)]
        max_episodes: usize,
        /// Also serve a read-only web view of the episode trees on this address (e.g.
        /// 127.0.0.1:8080): `/` lists the episodes, `/episodes/ID` shows one's whole tree.
        /// Off by default; it has no authentication, so bind it to loopback.
        #[arg(long, value_name = "ADDR:PORT")]
        http: Option<std::net::SocketAddr>,
        /// Also serve the gRPC API on TCP, beside the socket. Every call over TCP must carry
        /// `authorization: Bearer <token>` with the token of --token-file (required; mode 0600
        /// or 0400); calls on the socket need none.
        #[arg(long, value_name = "tcp://HOST:PORT")]
        listen: Option<String>,
        /// With --listen: TLS on the TCP listener, with this certificate chain (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// With --listen: the TLS certificate's private key (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Create an episode; prints its id.
    Create {
        #[arg(long)]
        image: String,
        #[arg(long, default_value = "auto", value_parser = ["none", "full", "auto"])]
        policy: String,
        #[arg(long)]
        json: bool,
        /// A label KEY=VALUE (repeatable); `list --label` filters on them, forks inherit them.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Memory of this episode's sandbox in MiB (at most the server's).
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Processes of this episode's sandbox (at most the server's).
        #[arg(long)]
        pids: Option<u64>,
        /// CPUs of this episode's sandbox (at most the server's).
        #[arg(long)]
        cpus: Option<f64>,
    },
    /// Run one turn: the command runs with `sh -c` in the episode's shell session. Without
    /// --json, output is streamed as it comes.
    Step {
        episode: String,
        #[arg(long)]
        json: bool,
        /// Per-step timeout in seconds (kills the step's process group).
        #[arg(long)]
        timeout: Option<f64>,
        /// An environment variable KEY=VALUE for this step only (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory for this step only.
        #[arg(long)]
        cwd: Option<String>,
        /// Pass this command's standard input to the step.
        #[arg(long)]
        stdin: bool,
        /// Cap on the step's stdout and on its stderr, in bytes (at most the server's).
        #[arg(long)]
        max_output: Option<u64>,
        #[arg(last = true, required = true, num_args = 1..)]
        cmd: Vec<String>,
    },
    /// Write standard input to a file in the sandbox (a turn of its own).
    Write {
        episode: String,
        path: String,
        /// Permission bits of a new file, in octal.
        #[arg(long, default_value = "644")]
        mode: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a file of the sandbox on standard output.
    Read {
        episode: String,
        path: String,
        /// Read at most this many bytes (0: the server's maximum).
        #[arg(long, default_value_t = 0)]
        max_bytes: u64,
    },
    /// Delete an episode and its sandbox.
    Delete { episode: String },
    /// Fork an episode at a turn into N new episodes; prints their ids, one per line.
    Fork {
        episode: String,
        #[arg(long)]
        turn: u32,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Afterwards, refill the node's warm copies to this many in the background.
        #[arg(long, default_value_t = 0)]
        keep_warm: u32,
        #[arg(long)]
        json: bool,
        /// Make the copies on another service, `tcp://HOST:PORT` (its `serve --listen`): the
        /// node is exported here, streamed to it and imported there (`node export` + `node
        /// import`), then forked there to `--count` copies. Prints their ids on that service.
        #[arg(long, value_name = "ADDR", conflicts_with = "keep_warm")]
        to: Option<String>,
        /// The token file of the `--to` service.
        #[arg(long, value_name = "FILE", requires = "to")]
        to_token_file: Option<PathBuf>,
        /// The CA certificate (PEM) of the `--to` service's TLS listener.
        #[arg(long, value_name = "FILE", requires = "to")]
        to_tls_ca: Option<PathBuf>,
    },
    /// Keep N warm copies of the node at a turn ready (restored, frozen): a fork then takes one
    /// and thaws it instead of restoring. 0 drops them.
    Prepare {
        episode: String,
        #[arg(long)]
        turn: u32,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        json: bool,
    },
    /// Rewind an episode to a turn; it continues from there.
    Rewind {
        episode: String,
        #[arg(long)]
        turn: u32,
    },
    /// Show an episode's turns, nodes, kinds, verdicts and bytes.
    Tree {
        episode: String,
        #[arg(long)]
        json: bool,
        /// The whole tree of the episode's fork family, not only its live path.
        #[arg(long)]
        whole: bool,
        /// Write the whole tree across forks as a self-contained HTML page (inline SVG) to FILE.
        #[arg(long, value_name = "FILE", conflicts_with = "json")]
        html: Option<PathBuf>,
    },
    /// Export an episode's turns as JSON Lines (docs/trajectory-format.md) on stdout.
    Export {
        episode: String,
        /// Every turn record of the episode's fork family, not only its live path.
        #[arg(long)]
        all_forks: bool,
    },
    /// Re-run an exported trajectory's live path in a fresh episode and compare each turn's
    /// stdout, stderr, exit code and cwd with the record. Exit 0: no divergence; 1: the first
    /// divergence is printed; 2: it could not be replayed.
    Replay {
        file: PathBuf,
        /// Fork the recorded episode at this turn (it must still exist) and replay from the next.
        #[arg(long)]
        from_turn: Option<u32>,
        /// Replay on this image instead of the header's.
        #[arg(long)]
        image: Option<String>,
        /// Remove the matches of this regex from the expected and actual outputs before
        /// comparing them (repeatable).
        #[arg(long = "mask", value_name = "REGEX")]
        masks: Vec<String>,
    },
    /// Checkpoint totals and per-episode figures, with C/R timings.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// List episodes.
    List {
        #[arg(long)]
        json: bool,
        /// Only episodes with this label KEY=VALUE (repeatable: all must match).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Only episodes with this status: running, stopped or deleted.
        #[arg(long)]
        status: Option<String>,
    },
    /// Move a committed node between hosts: `node export` writes it as a bundle, `node import`
    /// makes a new episode from one (docs/design.md, "Node bundles, format 1").
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Build, import or list images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Report every host requirement with its version and a fix hint.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Run trajectories under each policy and report correctness, traffic and latency.
    Bench(sandtree_bench::BenchArgs),
    /// Set up the embedded default storage and run a short demo.
    Demo {
        #[arg(
            long,
            env = "SANDTREE_DATA_DIR",
            default_value = "/var/lib/sandtree-demo"
        )]
        data_dir: PathBuf,
    },
    /// Internal: the sandbox helper process.
    #[command(name = "__shim", hide = true)]
    Shim { mode: String },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Write the node at a turn of an episode as a bundle, to stdout or --output.
    Export {
        episode: String,
        #[arg(long)]
        turn: u32,
        /// Write to FILE instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Read a bundle from stdin (or FILE) and make a new live episode whose turn 1 stands on its
    /// node; prints the episode's id.
    Import {
        file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build a built-in image: busybox or debian.
    Build { kind: String },
    /// Import a rootfs directory, tar/tar.gz, OCI layout or docker-save archive. Device nodes
    /// are refused, and so are set-user-ID / set-group-ID files unless --allow-setuid.
    Import {
        name: String,
        path: PathBuf,
        /// Keep set-user-ID / set-group-ID files instead of refusing the import.
        #[arg(long)]
        allow_setuid: bool,
    },
    /// List images.
    List,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if let Cmd::Shim { mode } = &cli.cmd {
        return match sandtree_runtime::shim::main(mode) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::from(1)
            }
        };
    }
    if !matches!(
        cli.cmd,
        Cmd::Serve { .. } | Cmd::Bench { .. } | Cmd::Demo { .. }
    ) {
        // Client commands end quietly when their output pipe closes (`sandtree stats | head`)
        // instead of panicking on EPIPE.
        // SAFETY: restores the default disposition of SIGPIPE before any thread is started.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDTREE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sandtree: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Where a client command reaches the service: `--addr` (with its token) if given, else the
/// socket.
fn client_target(
    socket: &std::path::Path,
    addr: Option<&str>,
    token_file: Option<&std::path::Path>,
    tls_ca: Option<&std::path::Path>,
) -> Result<sandtree_client::Target> {
    let Some(addr) = addr else {
        return Ok(sandtree_client::Target::Unix(socket.to_path_buf()));
    };
    let addr = sandtree_client::parse_tcp_addr(addr).context("--addr (SANDTREE_ADDR)")?;
    let token_file = token_file.with_context(|| {
        format!("--addr tcp://{addr} needs --token-file FILE (or SANDTREE_TOKEN_FILE): the service refuses every TCP call without its token")
    })?;
    Ok(sandtree_client::Target::Tcp(sandtree_client::Remote {
        addr,
        token: sandtree_client::read_token_file(token_file)?,
        tls_ca: tls_ca.map(|p| p.to_path_buf()),
    }))
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let socket = cli.socket;
    let (addr, token_file, tls_ca) = (cli.addr, cli.token_file, cli.tls_ca);
    let target = || {
        client_target(
            &socket,
            addr.as_deref(),
            token_file.as_deref(),
            tls_ca.as_deref(),
        )
    };
    match cli.cmd {
        Cmd::Serve {
            data_dir,
            storage,
            step_timeout,
            checkpoint_slots,
            scheduler,
            checkpoint_express,
            no_inspector,
            verify_verdicts,
            max_image_chain,
            restore_slots,
            sandbox_memory_mib,
            sandbox_pids,
            sandbox_cpus,
            sandbox_disk_mib,
            warm_budget_mib,
            ksm,
            max_episodes,
            http,
            listen,
            tls_cert,
            tls_key,
        } => {
            // Checked first: a bad listener is refused before anything is set up.
            let tcp = remote::Listener::configure(
                listen.as_deref(),
                token_file.as_deref(),
                tls_cert.as_deref().zip(tls_key.as_deref()),
            )?;
            if !(0.01..=1024.0).contains(&sandbox_cpus) {
                anyhow::bail!("--sandbox-cpus must be between 0.01 and 1024, got {sandbox_cpus}");
            }
            let limits = sandtree_runtime::cgroup::Limits {
                memory_bytes: sandbox_memory_mib << 20,
                pids: sandbox_pids,
                cpu_quota_us: (sandbox_cpus * sandtree_runtime::cgroup::CPU_PERIOD_US as f64)
                    as u64,
            };
            let verdicts = sandtree_runtime::inspect::Verdicts::new(!no_inspector, verify_verdicts);
            let slots = checkpoint_slots
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            let config = sandtree_engine::Config {
                data_dir: data_dir.clone(),
                default_timeout_ms: step_timeout * 1000,
                out_cap: 1 << 20,
                checkpoint_slots: slots,
                scheduler,
                checkpoint_express: checkpoint_express.unwrap_or(slots),
                max_image_chain,
                restore_slots,
                max_episodes,
                disk_bytes: sandbox_disk_mib << 20,
                warm_budget_bytes: warm_budget_mib << 20,
            };
            let extras = ServeExtras { http, tcp, ksm };
            serve(socket.clone(), config, storage, verdicts, limits, extras).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Create {
            image,
            policy,
            json,
            labels,
            memory_mib,
            pids,
            cpus,
        } => {
            let req = pb::CreateEpisodeRequest {
                image,
                policy,
                labels: client::key_values(&labels, "--label")?,
                memory_mib: memory_mib.unwrap_or(0),
                pids: pids.unwrap_or(0),
                cpus: cpus.unwrap_or(0.0),
            };
            client::create(&target()?, req, json).await
        }
        Cmd::Step {
            episode,
            json,
            timeout,
            env,
            cwd,
            stdin,
            max_output,
            cmd,
        } => {
            let stdin = if stdin {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                b
            } else {
                Vec::new()
            };
            let req = pb::StepRequest {
                episode,
                command: cmd.join(" "),
                timeout_ms: client::timeout_ms(timeout)?,
                env: client::key_values(&env, "--env")?,
                cwd: cwd.unwrap_or_default(),
                stdin,
                max_output_bytes: max_output.unwrap_or(0),
            };
            client::step(&target()?, req, json).await
        }
        Cmd::Write {
            episode,
            path,
            mode,
            json,
        } => {
            let mode = u32::from_str_radix(&mode, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .with_context(|| format!("--mode must be octal permission bits, got {mode:?}"))?;
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut data)?;
            client::write_file(&target()?, episode, path, data, mode, json).await
        }
        Cmd::Read {
            episode,
            path,
            max_bytes,
        } => client::read_file(&target()?, episode, path, max_bytes).await,
        Cmd::Delete { episode } => client::delete(&target()?, episode).await,
        Cmd::Fork {
            episode,
            turn,
            count,
            keep_warm,
            json,
            to: None,
            ..
        } => client::fork(&target()?, episode, turn, count, keep_warm, json).await,
        Cmd::Fork {
            episode,
            turn,
            count,
            json,
            to: Some(to),
            to_token_file,
            to_tls_ca,
            ..
        } => {
            let there = client_target(
                &socket,
                Some(&to),
                to_token_file.as_deref(),
                to_tls_ca.as_deref(),
            )
            .context("--to")?;
            client::fork_to(&target()?, &there, episode, turn, count, json).await
        }
        Cmd::Prepare {
            episode,
            turn,
            count,
            json,
        } => client::prepare(&target()?, episode, turn, count, json).await,
        Cmd::Rewind { episode, turn } => client::rewind(&target()?, episode, turn).await,
        Cmd::Tree {
            episode,
            json,
            whole,
            html,
        } => match html {
            Some(file) => client::tree_html_file(&target()?, episode, &file).await,
            None => client::tree(&target()?, episode, json, whole).await,
        },
        Cmd::Export { episode, all_forks } => client::export(&target()?, episode, all_forks).await,
        Cmd::Replay {
            file,
            from_turn,
            image,
            masks,
        } => {
            let args = client::ReplayArgs {
                file,
                from_turn,
                image,
                masks,
            };
            client::replay(&target()?, args).await
        }
        Cmd::Stats { json } => client::stats(&target()?, json).await,
        Cmd::List {
            json,
            labels,
            status,
        } => {
            let req = pb::ListEpisodesRequest {
                labels: client::key_values(&labels, "--label")?,
                status: status.unwrap_or_default(),
            };
            client::list(&target()?, req, json).await
        }
        Cmd::Node { cmd } => match cmd {
            NodeCmd::Export {
                episode,
                turn,
                output,
            } => client::export_node(&target()?, episode, turn, output).await,
            NodeCmd::Import { file, json } => client::import_node(&target()?, file, json).await,
        },
        Cmd::Image { cmd } => match cmd {
            ImageCmd::Build { kind } => client::build_image(&target()?, kind).await,
            ImageCmd::Import {
                name,
                path,
                allow_setuid,
            } => client::import_image(&target()?, name, path, allow_setuid).await,
            ImageCmd::List => client::list_images(&target()?).await,
        },
        Cmd::Doctor { json } => client::doctor(&target()?, json).await,
        // The bench and the demo are clients of the API (service/bench); they run this binary as
        // their private `sandtree serve`.
        Cmd::Bench(args) => {
            let exe = std::env::current_exe()?;
            until_signal("bench", sandtree_bench::run(args, &exe)).await
        }
        Cmd::Demo { data_dir } => {
            let exe = std::env::current_exe()?;
            until_signal("demo", sandtree_bench::demo(data_dir, &exe)).await
        }
        Cmd::Shim { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// Runs `work` until it ends or SIGINT/SIGTERM comes. On a signal `work` is dropped, and with it
/// the private service it started (stopped, its pool and loop mount removed).
async fn until_signal(
    what: &str,
    work: impl std::future::Future<Output = anyhow::Result<std::process::ExitCode>>,
) -> anyhow::Result<std::process::ExitCode> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("{what} interrupted; its service is stopped"),
        _ = term.recv() => anyhow::bail!("{what} terminated; its service is stopped"),
    }
}

/// A stable short tag for a data dir, so that several services on one host keep separate cgroups.
fn instance_tag(data_dir: &std::path::Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// What `serve` adds beside the unix socket: the web view, the TCP listener, KSM.
struct ServeExtras {
    http: Option<std::net::SocketAddr>,
    tcp: Option<remote::Listener>,
    ksm: bool,
}

async fn serve(
    socket: PathBuf,
    mut config: sandtree_engine::Config,
    spec: sandtree_storage::StorageSpec,
    verdicts: sandtree_runtime::inspect::Verdicts,
    limits: sandtree_runtime::cgroup::Limits,
    extras: ServeExtras,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let ServeExtras { http, tcp, ksm } = extras;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("create data dir {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    config.data_dir = data_dir.clone();
    if let Some(p) = doctor::probes().iter().find(|p| p.required && !p.ok) {
        anyhow::bail!("requirement missing: {}: {} ({})", p.name, p.detail, p.fix);
    }
    let storage: std::sync::Arc<dyn sandtree_storage::SnapshotBackend> = {
        let (spec, dd) = (spec.clone(), data_dir.clone());
        tokio::task::spawn_blocking(move || sandtree_storage::open(&spec, &dd))
            .await??
            .into()
    };
    tracing::info!(storage = %storage.describe(), "storage ready");
    if config.disk_bytes > 0 && storage.kind() == sandtree_storage::Kind::Dir {
        tracing::warn!(
            "the dir backend cannot limit a sandbox's disk: --sandbox-disk-mib is not enforced"
        );
        config.disk_bytes = 0;
    }
    let tree = sandtree_branching::Tree::open(data_dir.join("sandtree.redb"))?;
    let runtime = sandtree_runtime::Runtime::new(&instance_tag(&data_dir), limits)?;
    tracing::info!(criu = %runtime.criu.bin.display(), cgroup = %runtime.layout.v2_parent.display(), "runtime ready");
    let ksm_started = if ksm {
        let started = sandtree_runtime::ksm::start().context("--ksm: turn on KSM")?;
        tracing::info!(started, "KSM: warm copies are restored with merging on");
        started
    } else {
        false
    };
    let host = host::Host::new(runtime, verdicts, ksm);
    let engine = std::sync::Arc::new(sandtree_engine::Engine::new(
        tree,
        storage,
        host.parts(),
        config,
    )?);
    let e2 = engine.clone();
    let msg = tokio::task::spawn_blocking(move || e2.reconcile()).await??;
    tracing::info!("{msg}");
    // Nodes that only dropped or deleted episodes reached are freed now, not at the next delete.
    engine.gc().await;

    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if socket.exists() {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            anyhow::bail!(
                "another sandtree service is listening on {}",
                socket.display()
            );
        }
        std::fs::remove_file(&socket)?;
    }
    // SAFETY: umask(2) only changes this process's file mode mask; it is restored right after bind.
    let old = unsafe { libc::umask(0o177) };
    let listener = tokio::net::UnixListener::bind(&socket);
    // SAFETY: see above.
    unsafe { libc::umask(old) };
    let listener = listener.with_context(|| format!("bind {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    tracing::info!(socket = %socket.display(), "listening");
    let api = server::Api {
        engine: engine.clone(),
        image_lock: Default::default(),
    };
    let web = match http {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--http: bind {addr}"))?;
            let addr = l.local_addr()?;
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the web view has no authentication and is not on loopback: anyone who reaches it sees every episode's commands and output");
            }
            tracing::info!("web view listening on http://{addr}/");
            let api = std::sync::Arc::new(server::Api {
                engine: engine.clone(),
                image_lock: api.image_lock.clone(),
            });
            // The engine's metrics go to this recorder; /metrics renders them.
            let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .context("install the metrics recorder")?;
            let upkeep = metrics.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(tokio::spawn(web::serve(l, api, metrics)))
        }
        None => None,
    };
    // Room for the largest file write or read (runtime::shim::MAX_FILE_BYTES) and a step's stdin.
    let grpc = |api: server::Api| {
        sandtree_proto::v1::sandtree_server::SandtreeServer::new(api)
            .max_decoding_message_size(80 << 20)
            .max_encoding_message_size(80 << 20)
    };
    // The TCP listener is a server of its own: TLS (if any) and the token check apply to it
    // only, never to the socket.
    let tcp_server = match tcp {
        None => None,
        Some(l) => {
            let listener = tokio::net::TcpListener::bind(l.addr)
                .await
                .with_context(|| format!("--listen: bind {}", l.addr))?;
            let addr = listener.local_addr()?;
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = l.tls.clone() {
                builder = builder.tls_config(tls).context("--tls-cert/--tls-key")?;
            }
            if l.tls.is_none() && !addr.ip().is_loopback() {
                tracing::warn!(%addr, "the TCP listener has no TLS and is not on loopback: the token and every call cross the network in clear text (--tls-cert/--tls-key)");
            }
            tracing::info!(
                tls = l.tls.is_some(),
                "listening on tcp://{addr} (every call needs the token)"
            );
            let api = server::Api {
                engine: engine.clone(),
                image_lock: api.image_lock.clone(),
            };
            let svc = tonic::service::interceptor::InterceptedService::new(
                grpc(api),
                server::TokenCheck::new(&l.token),
            );
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |s| {
                    s.inspect(|s| {
                        let _ = s.set_nodelay(true);
                    })
                },
            );
            Some((builder, svc, incoming))
        }
    };
    // One signal stops both servers.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let unix = tonic::transport::Server::builder()
        .add_service(grpc(api))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stopped(stop_rx.clone()),
        );
    let tcp = async {
        match tcp_server {
            Some((mut builder, svc, incoming)) => {
                builder
                    .add_service(svc)
                    .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()))
                    .await
            }
            None => Ok(()),
        }
    };
    tokio::try_join!(unix, tcp)?;
    if let Some(w) = web {
        w.abort();
    }
    tracing::info!("shutting down: stopping sandboxes");
    engine.shutdown().await;
    if ksm_started {
        if let Err(e) = sandtree_runtime::ksm::stop() {
            tracing::warn!(error = %e, "cannot turn KSM back off");
        }
    }
    let _ = std::fs::remove_file(&socket);
    if matches!(spec, sandtree_storage::StorageSpec::Btrfs) {
        // Release the embedded loop image this service mounted; the next start mounts it again.
        let dir = data_dir.join("storage");
        drop(engine);
        match tokio::task::spawn_blocking(move || sandtree_storage::pool::unmount_btrfs_loop(&dir))
            .await
        {
            Ok(Ok(())) => tracing::info!("unmounted the embedded btrfs image"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot unmount the embedded btrfs image"),
            Err(e) => tracing::warn!(error = %e, "unmount task failed"),
        }
    }
    Ok(())
}
