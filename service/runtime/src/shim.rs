//! `sandtree __shim`: the short-lived, single-threaded helper process through which the service
//! creates sandboxes and runs turns in them. Namespace entry (unshare, setns), mounts and
//! pivot_root happen here and nowhere else, in a fresh process rather than after fork() of the
//! multi-threaded service.
//!
//! - `__shim start` reads a [`StartSpec`] from stdin, creates the sandbox (pid, mount, uts, ipc, cgroup, time and
//!   net namespaces; a private /proc, a minimal /dev and the /.sandtree tmpfs; pivot_root into the
//!   rootfs) and prints its init's host pid.
//! - `__shim exec` reads an [`ExecSpec`], enters the sandbox's namespaces and cgroups, runs the
//!   turn's command with `sh -c` under the sandbox's confinement, and prints an [`ExecResult`].
//!
//! Every fd a sandboxed process holds points inside the sandbox: stdin is its /dev/null, stdout and
//! stderr are files on its /.sandtree tmpfs. That is what lets CRIU dump it later.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, fork, pivot_root, sethostname, setsid, ForkResult, Pid};
use serde::{Deserialize, Serialize};

/// The sandbox init, built from init/init.c by build.rs.
static INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sandtree-init"));

/// nix has no name for it; the kernel's value (time_namespaces(7)).
const CLONE_NEWTIME: CloneFlags = CloneFlags::from_bits_retain(libc::CLONE_NEWTIME);

/// The namespaces of a sandbox, as named under /proc/PID/ns, that every process a turn starts
/// joins: exactly init's, so that CRIU sees one consistent tree (a task outside init's time
/// namespace makes restore fail with "Can't restore sub-task in NS").
const SANDBOX_NAMESPACES: [(&str, CloneFlags); 7] = [
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("time", CLONE_NEWTIME),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// Where the per-sandbox tmpfs is mounted inside the sandbox.
pub const SANDTREE_DIR: &str = "/.sandtree";

#[derive(Debug, Serialize, Deserialize)]
pub struct StartSpec {
    pub seccomp: super::confine::Seccomp,
    pub rootfs: PathBuf,
    pub hostname: String,
    /// cgroup.procs files the sandbox joins before anything else.
    pub procs_files: Vec<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Started {
    pub init_pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Filled in by `Runtime::exec`.
    pub seccomp: super::confine::Seccomp,
    pub init_pid: u32,
    /// The v2 cgroup path that init must be in (guards against a recycled pid).
    pub v2_cgroup: PathBuf,
    pub procs_files: Vec<PathBuf>,
    pub turn: u32,
    pub command: String,
    pub cwd: String,
    pub env: Vec<(String, String)>,
    pub timeout_ms: u64,
    pub out_cap: usize,
    /// The command's standard input (empty: /dev/null).
    #[serde(with = "b64", default)]
    pub stdin: Vec<u8>,
    /// Print stdout/stderr chunks as [`ShimEvent`] lines while the command runs.
    #[serde(default)]
    pub stream: bool,
    /// Run as this (uid, gid) instead of root (the image's `User`).
    #[serde(default)]
    pub user: Option<(u32, u32)>,
    /// `cwd` was set for this step by the caller: it must exist (see [`WRAPPER`]).
    #[serde(default)]
    pub cwd_strict: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecResult {
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub timed_out: bool,
    /// The shell's state after the command, when it could be recorded (not after `exec` or a kill).
    pub cwd: Option<String>,
    pub env: Option<Vec<(String, String)>>,
}

/// One line of the shim's output: a chunk of a running command's output, or the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ShimEvent {
    Stdout(#[serde(with = "b64")] Vec<u8>),
    Stderr(#[serde(with = "b64")] Vec<u8>),
    Done(ExecResult),
}

/// A file operation inside a sandbox, done by a process of the sandbox (its namespaces, cgroups
/// and confinement), so paths resolve exactly as they would for the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileSpec {
    pub seccomp: super::confine::Seccomp,
    pub init_pid: u32,
    pub v2_cgroup: PathBuf,
    pub procs_files: Vec<PathBuf>,
    pub path: String,
    pub op: FileOp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FileOp {
    Write {
        #[serde(with = "b64")]
        data: Vec<u8>,
        mode: u32,
    },
    Read {
        max_bytes: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FileResult {
    Written,
    Read {
        #[serde(with = "b64")]
        data: Vec<u8>,
        size: u64,
    },
    /// The operation was refused; `errno` says why (ENOENT, EISDIR, ...).
    Failed {
        errno: i32,
        message: String,
    },
}

/// Bytes as base64 in the shim's JSON.
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

/// Entry point of `sandtree __shim MODE`.
pub fn main(mode: &str) -> Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("read spec from stdin")?;
    match mode {
        "start" => {
            let spec: StartSpec = serde_json::from_str(&input).context("parse start spec")?;
            let started = start(&spec)?;
            println!("{}", serde_json::to_string(&started)?);
        }
        "exec" => {
            let spec: ExecSpec = serde_json::from_str(&input).context("parse exec spec")?;
            let res = exec(&spec)?;
            println!("{}", serde_json::to_string(&ShimEvent::Done(res))?);
        }
        "file" => {
            let spec: FileSpec = serde_json::from_str(&input).context("parse file spec")?;
            let res = file_op(&spec)?;
            println!("{}", serde_json::to_string(&res)?);
        }
        other => bail!("unknown shim mode {other:?}"),
    }
    Ok(())
}

fn join_cgroups(files: &[PathBuf]) -> Result<()> {
    for f in files {
        fs::write(f, std::process::id().to_string())
            .with_context(|| format!("join cgroup {}", f.display()))?;
    }
    Ok(())
}

fn pipe_cloexec() -> Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

fn start(spec: &StartSpec) -> Result<Started> {
    if !spec
        .rootfs
        .join(SANDTREE_DIR.trim_start_matches('/'))
        .is_dir()
    {
        bail!(
            "rootfs {} has no {SANDTREE_DIR} directory: re-import the image",
            spec.rootfs.display()
        );
    }
    join_cgroups(&spec.procs_files)?;
    let (rd, wr) = pipe_cloexec()?;
    // A time namespace of its own from the start: CRIU restores every sandbox into a new time
    // namespace whose offsets keep CLOCK_MONOTONIC/BOOTTIME continuous across the restore, so a
    // fresh sandbox and a restored one look alike, and `exec` always joins init's.
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWCGROUP
            | CLONE_NEWTIME,
    )
    .context("unshare namespaces")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / private")?;
    // SAFETY: the shim is single-threaded, so the child may run arbitrary code after fork.
    match unsafe { fork() }.context("fork init")? {
        ForkResult::Child => {
            drop(rd);
            let err = init_child(spec);
            let mut w = fs::File::from(wr);
            let _ = write!(w, "{err:#}");
            // SAFETY: _exit in the forked child, which must not run the parent's destructors.
            unsafe { libc::_exit(1) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut msg = String::new();
            fs::File::from(rd).read_to_string(&mut msg)?;
            if !msg.is_empty() {
                let _ = waitpid(child, None);
                bail!("sandbox init failed: {msg}");
            }
            Ok(Started {
                init_pid: child.as_raw() as u32,
            })
        }
    }
}

/// Runs as pid 1 of the new pid namespace; returns only on error.
fn init_child(spec: &StartSpec) -> anyhow::Error {
    match setup_init(spec) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn setup_init(spec: &StartSpec) -> Result<std::convert::Infallible> {
    let root = &spec.rootfs;
    let none = None::<&str>;
    // The volume is the agent's: what it left at the mount points must not redirect a mount.
    for d in ["proc", "dev", SANDTREE_DIR.trim_start_matches('/')] {
        let m = fs::symlink_metadata(root.join(d));
        if !m.as_ref().is_ok_and(|m| m.file_type().is_dir()) {
            bail!("the sandbox's /{d} is not a directory (was it replaced by a link?)");
        }
    }
    mount(
        Some(root),
        root,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .context("bind rootfs")?;
    // No device node or set-id file of the volume takes effect.
    mount(
        none,
        root,
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        none,
    )
    .context("remount rootfs nosuid,nodev")?;
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        nosuid_nodev_noexec,
        none,
    )
    .context("mount /proc")?;
    let dev = root.join("dev");
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=755,size=1m"),
    )
    .context("mount /dev")?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let p = dev.join(name);
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .with_context(|| format!("mknod /dev/{name}"))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o666))?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))?;
    }
    fs::create_dir(dev.join("shm"))?;
    fs::set_permissions(dev.join("shm"), fs::Permissions::from_mode(0o1777))?;
    mask_proc(root).context("mask /proc")?;
    let st = root.join(SANDTREE_DIR.trim_start_matches('/'));
    mount(
        Some("tmpfs"),
        &st,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=711,size=64m"),
    )
    .context("mount /.sandtree")?;
    fs::write(st.join("init"), INIT_BINARY)?;
    fs::set_permissions(st.join("init"), fs::Permissions::from_mode(0o555))?;
    fs::create_dir(st.join("io"))?;
    fs::set_permissions(st.join("io"), fs::Permissions::from_mode(0o700))?;

    chdir(root).context("chdir rootfs")?;
    pivot_root(".", ".").context("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).context("detach old root")?;
    chdir("/")?;
    sethostname(&spec.hostname).context("sethostname")?;
    loopback_up().context("bring lo up")?;
    setsid().context("setsid")?;
    redirect_stdio_to_dev_null()?;
    // Nothing inherited from the host may reach init (CRIU refuses fds that point outside);
    // the readiness pipe stays open until exec closes it.
    cloexec_fds_from(3);
    super::confine::confine(&spec.seccomp)?;
    let prog = CString::new(format!("{SANDTREE_DIR}/init"))?;
    let argv = [CString::new("init")?];
    let envp: [CString; 0] = [];
    nix::unistd::execve(&prog, &argv, &envp).context("exec init")?;
    unreachable!("execve returned without error")
}

/// Parts of /proc that reach the host kernel, made read-only (Docker's `readonlyPaths`).
const PROC_READONLY: &[&str] = &["bus", "fs", "irq", "sys", "sysrq-trigger"];
/// Parts of /proc that show host kernel state, hidden (Docker's `maskedPaths`): files under the
/// sandbox's /dev/null, directories under an empty read-only tmpfs.
const PROC_MASKED: &[&str] = &[
    "acpi",
    "asound",
    "kcore",
    "keys",
    "latency_stats",
    "sched_debug",
    "scsi",
    "timer_list",
    "timer_stats",
];

/// Applies [`PROC_READONLY`] and [`PROC_MASKED`] to the sandbox's /proc (at `root`/proc, before
/// pivot_root; /dev/null must exist). The sandbox cannot undo them: it has no CAP_SYS_ADMIN and
/// seccomp refuses the mount syscalls.
fn mask_proc(root: &std::path::Path) -> Result<()> {
    let none = None::<&str>;
    let proc = root.join("proc");
    for p in PROC_READONLY {
        let path = proc.join(p);
        if fs::symlink_metadata(&path).is_err() {
            continue;
        }
        mount(
            Some(&path),
            &path,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .with_context(|| format!("bind /proc/{p}"))?;
        mount(
            none,
            &path,
            none,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            none,
        )
        .with_context(|| format!("remount /proc/{p} read-only"))?;
    }
    let null = root.join("dev/null");
    for p in PROC_MASKED {
        let path = proc.join(p);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => mount(
                Some("tmpfs"),
                &path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0,mode=555"),
            ),
            Ok(_) => mount(Some(&null), &path, none, MsFlags::MS_BIND, none),
            Err(_) => continue,
        }
        .with_context(|| format!("mask /proc/{p}"))?;
    }
    Ok(())
}

fn redirect_stdio_to_dev_null() -> Result<()> {
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?;
    for fd in 0..3 {
        dup_onto(&null, fd)?;
    }
    Ok(())
}

fn loopback_up() -> Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo\0".iter().enumerate() {
        ifr.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            bail!("SIOCGIFFLAGS: {}", std::io::Error::last_os_error());
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            bail!("SIOCSIFFLAGS: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The shell program that gives a turn persistent-shell semantics: it starts in the previous
/// turn's directory with its exported environment, runs the command with `eval` in the same shell
/// (so `cd` and `export` take effect), and on exit records the new directory and environment.
///
/// A cwd the caller set for this step only (`__ST_CWD_STRICT`) must exist: otherwise the step
/// fails with exit 125 before the command runs and before the exit trap is set, so the session's
/// cwd and env stay as they were. The session's own cwd falls back to / if it is gone.
const WRAPPER: &str = r#"if [ -n "$__ST_CWD_STRICT" ]; then
  cd -- "$__ST_CWD" 2>/dev/null || { echo "sandtree: the step's cwd $__ST_CWD is not a directory in the sandbox; the command did not run" >&2; exit 125; }
else
  cd -- "$__ST_CWD" 2>/dev/null || cd /
fi
__st_c=$__ST_CMD; __st_s=$__ST_STATE
unset __ST_CMD __ST_CWD __ST_STATE __ST_CWD_STRICT
trap '__st_rc=$?; pwd >"$__st_s.cwd" 2>/dev/null; cat /proc/self/environ >"$__st_s.env" 2>/dev/null; exit $__st_rc' EXIT
eval "$__st_c"
"#;

/// Variables that the shell itself maintains; they are not session state.
const SHELL_VARS: &[&str] = &["PWD", "OLDPWD", "SHLVL", "_"];

fn check_init(init_pid: u32, v2_cgroup: &std::path::Path) -> Result<()> {
    let cg = fs::read_to_string(format!("/proc/{init_pid}/cgroup"))
        .with_context(|| format!("sandbox init pid {init_pid} is gone"))?;
    let v2 = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("");
    // Seen from inside its own cgroup namespace, init's cgroup is "/": the sandbox's leaf is
    // checked through the host's view of the init process instead.
    let leaf_ok = |v2: &str| !v2.is_empty() && v2_cgroup.to_string_lossy().ends_with(v2);
    if !leaf_ok(v2) {
        bail!("pid {init_pid} is not a sandtree sandbox init (cgroup {v2:?})");
    }
    Ok(())
}

/// Joins the sandbox of `init_pid`: its cgroups, then every one of its namespaces. Afterwards
/// this process's root and cwd are the sandbox's, and its children are in the sandbox's pid and
/// time namespaces.
fn enter_sandbox(init_pid: u32, v2_cgroup: &std::path::Path, procs: &[PathBuf]) -> Result<()> {
    check_init(init_pid, v2_cgroup)?;
    join_cgroups(procs)?;
    let ns_files: Vec<(CloneFlags, fs::File)> = SANDBOX_NAMESPACES
        .into_iter()
        .map(|(n, f)| {
            Ok((
                f,
                fs::File::open(format!("/proc/{init_pid}/ns/{n}"))
                    .with_context(|| format!("open ns {n}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    for (flag, file) in &ns_files {
        setns(file, *flag).with_context(|| format!("setns {flag:?}"))?;
    }
    chdir("/")?;
    Ok(())
}

/// A fresh file the shim creates in the sandbox for a turn (never whatever the sandbox left under
/// that name: a FIFO would block the open, a link would redirect it), open for reading and
/// writing.
fn fresh_file(p: &str) -> Result<fs::File> {
    let _ = fs::remove_file(p);
    std::os::unix::fs::OpenOptionsExt::custom_flags(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true),
        libc::O_NOFOLLOW | libc::O_CLOEXEC,
    )
    .open(p)
    .with_context(|| format!("create {p}"))
}

/// Reads `f` from `*off` up to `cap` bytes in all; returns the new bytes.
fn read_new(f: &fs::File, off: &mut u64, cap: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let want = (cap as u64).saturating_sub(*off).min(1 << 20) as usize;
    if want == 0 {
        return Vec::new();
    }
    let mut buf = vec![0u8; want];
    match f.read_at(&mut buf, *off) {
        Ok(n) => {
            buf.truncate(n);
            *off += n as u64;
            buf
        }
        Err(_) => Vec::new(),
    }
}

fn exec(spec: &ExecSpec) -> Result<ExecResult> {
    enter_sandbox(spec.init_pid, &spec.v2_cgroup, &spec.procs_files)?;
    let io = format!("{SANDTREE_DIR}/io/t{}", spec.turn);
    let (out, err) = (
        fresh_file(&format!("{io}.out"))?,
        fresh_file(&format!("{io}.err"))?,
    );
    if let Some((uid, gid)) = spec.user {
        // The shell records its cwd and env on exit as that user: it needs to reach the io dir
        // and own the two files it writes.
        fs::set_permissions(
            format!("{SANDTREE_DIR}/io"),
            fs::Permissions::from_mode(0o711),
        )?;
        for suffix in ["cwd", "env"] {
            let f = fresh_file(&format!("{io}.{suffix}"))?;
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                .with_context(|| format!("chown {io}.{suffix}"))?;
        }
    }
    let stdin_path = format!("{io}.in");
    let stdin = if spec.stdin.is_empty() {
        None
    } else {
        let mut f = fresh_file(&stdin_path)?;
        f.write_all(&spec.stdin).context("write the step's stdin")?;
        Some(f)
    };
    let started = Instant::now();
    // SAFETY: the shim is single-threaded, so the child may run arbitrary code after fork.
    let child = match unsafe { fork() }.context("fork turn")? {
        ForkResult::Child => {
            let e = exec_child(
                spec,
                &io,
                &out,
                &err,
                stdin.is_some().then_some(&stdin_path),
            );
            let _ = writeln!(std::io::stderr(), "sandtree: {e:#}");
            // SAFETY: _exit in the forked child.
            unsafe { libc::_exit(127) }
        }
        ForkResult::Parent { child } => child,
    };
    drop(stdin);
    let (mut out_off, mut err_off) = (0u64, 0u64);
    let mut on_tick = || {
        if !spec.stream {
            return;
        }
        let mut stdout = std::io::stdout().lock();
        for (f, off, wrap) in [
            (
                &out,
                &mut out_off,
                ShimEvent::Stdout as fn(Vec<u8>) -> ShimEvent,
            ),
            (&err, &mut err_off, ShimEvent::Stderr),
        ] {
            let chunk = read_new(f, off, spec.out_cap);
            if !chunk.is_empty() {
                if let Ok(line) = serde_json::to_string(&wrap(chunk)) {
                    let _ = writeln!(stdout, "{line}");
                }
            }
        }
        let _ = stdout.flush();
    };
    let (status, timed_out) =
        wait_timeout(child, Duration::from_millis(spec.timeout_ms), &mut on_tick)?;
    on_tick();
    let duration_ms = started.elapsed().as_millis() as u64;
    let exit_code = match status {
        WaitStatus::Exited(_, c) => c,
        WaitStatus::Signaled(_, s, _) => 128 + s as i32,
        _ => -1,
    };
    let captured = |f: &fs::File| {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut off = 0;
        (
            read_new(f, &mut off, spec.out_cap),
            len > spec.out_cap as u64,
        )
    };
    let (stdout, stdout_truncated) = captured(&out);
    let (mut stderr, stderr_truncated) = captured(&err);
    let (cwd, env) = if timed_out {
        (None, None)
    } else {
        let mut state_notes = Vec::new();
        let mut state = |suffix: &str, limit: usize| match read_untrusted(
            &format!("{io}.{suffix}"),
            limit,
        ) {
            Ok(Some((bytes, len))) if len as usize <= limit => Some(bytes),
            Ok(Some((_, len))) => {
                state_notes.push(format!(
                    "sandtree: the shell's {suffix} after this step is {len} bytes, over the \
                     {limit}-byte limit; it was not kept (the next step starts with the previous one)"
                ));
                None
            }
            Ok(None) => None,
            Err(e) => {
                state_notes.push(format!("sandtree: the shell's {suffix} was not kept: {e}"));
                None
            }
        };
        let cwd = state("cwd", MAX_CWD_BYTES)
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .trim_end_matches('\n')
                    .to_string()
            })
            .filter(|s| !s.is_empty());
        let env = state("env", MAX_ENV_BYTES)
            .filter(|b| !b.is_empty())
            .map(|b| parse_environ(&b));
        for n in state_notes {
            if !stderr.is_empty() && !stderr.ends_with(b"\n") {
                stderr.push(b'\n');
            }
            stderr.extend_from_slice(n.as_bytes());
            stderr.push(b'\n');
        }
        (cwd, env)
    };
    for suffix in ["out", "err", "cwd", "env", "in"] {
        let _ = fs::remove_file(format!("{io}.{suffix}"));
    }
    Ok(ExecResult {
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
        exit_code,
        duration_ms,
        timed_out,
        cwd,
        env,
    })
}

fn exec_child(
    spec: &ExecSpec,
    io: &str,
    out: &fs::File,
    err: &fs::File,
    stdin: Option<&String>,
) -> anyhow::Error {
    let r = (|| -> Result<std::convert::Infallible> {
        setsid()?;
        let input = match stdin {
            Some(p) => fs::File::open(p).with_context(|| format!("open {p}"))?,
            None => fs::File::open("/dev/null")?,
        };
        dup_onto(&input, 0)?;
        dup_onto(out, 1)?;
        dup_onto(err, 2)?;
        close_fds_from(3);
        super::confine::confine(&spec.seccomp)?;
        if let Some((uid, gid)) = spec.user {
            // After confine: CAP_SETUID/SETGID are among the kept capabilities, and becoming a
            // non-root user then clears them all.
            nix::unistd::setgroups(&[]).context("setgroups")?;
            let g = nix::unistd::Gid::from_raw(gid);
            nix::unistd::setresgid(g, g, g).context("setresgid")?;
            let u = nix::unistd::Uid::from_raw(uid);
            nix::unistd::setresuid(u, u, u).context("setresuid")?;
        }
        let mut env: Vec<CString> = spec
            .env
            .iter()
            .filter(|(k, _)| !k.starts_with("__ST_"))
            .map(|(k, v)| CString::new(format!("{k}={v}")))
            .collect::<Result<_, _>>()?;
        env.push(
            CString::new(format!("__ST_CMD={}", spec.command))
                .context("command contains a NUL byte")?,
        );
        env.push(CString::new(format!("__ST_CWD={}", spec.cwd))?);
        if spec.cwd_strict {
            env.push(CString::new("__ST_CWD_STRICT=1")?);
        }
        env.push(CString::new(format!("__ST_STATE={io}"))?);
        let argv = [
            CString::new("sh")?,
            CString::new("-c")?,
            CString::new(WRAPPER)?,
        ];
        nix::unistd::execve(&CString::new("/bin/sh")?, &argv, &env).context("exec /bin/sh")?;
        unreachable!()
    })();
    match r {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Largest file `read` and `write` move in one call.
pub const MAX_FILE_BYTES: u64 = 32 << 20;

fn file_op(spec: &FileSpec) -> Result<FileResult> {
    enter_sandbox(spec.init_pid, &spec.v2_cgroup, &spec.procs_files)?;
    let (rd, wr) = pipe_cloexec()?;
    // SAFETY: the shim is single-threaded, so the child may run arbitrary code after fork.
    match unsafe { fork() }.context("fork file op")? {
        ForkResult::Child => {
            drop(rd);
            let res = file_child(spec);
            let mut w = fs::File::from(wr);
            let _ = serde_json::to_writer(&mut w, &res);
            drop(w);
            // SAFETY: _exit in the forked child.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut buf = Vec::new();
            fs::File::from(rd)
                .take(MAX_FILE_BYTES * 2 + 4096)
                .read_to_end(&mut buf)?;
            let _ = waitpid(child, None);
            serde_json::from_slice(&buf).context("file op child gave no answer")
        }
    }
}

/// In the sandbox's pid namespace, confined like the agent: the path resolves against the
/// sandbox's root (RESOLVE_IN_ROOT: `..` and absolute symlinks stay inside) and no magic link of
/// /proc is followed.
fn file_child(spec: &FileSpec) -> FileResult {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let failed = |e: nix::errno::Errno, what: &str| FileResult::Failed {
        errno: e as i32,
        message: format!("{what} {}: {}", spec.path, e.desc()),
    };
    if let Err(e) = super::confine::confine(&spec.seccomp) {
        return FileResult::Failed {
            errno: libc::EPERM,
            message: format!("confine: {e}"),
        };
    }
    let root = match nix::fcntl::open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => return failed(e, "open /"),
    };
    let resolve = ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS;
    match &spec.op {
        FileOp::Write { data, mode } => {
            let how = OpenHow::new()
                .flags(
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_TRUNC
                        | OFlag::O_NONBLOCK
                        | OFlag::O_CLOEXEC,
                )
                .mode(nix::sys::stat::Mode::from_bits_truncate(*mode))
                .resolve(resolve);
            let fd = match nix::fcntl::openat2(&root, spec.path.as_str(), how) {
                Ok(fd) => fd,
                Err(e) => return failed(e, "open"),
            };
            let mut f = fs::File::from(fd);
            match f.metadata() {
                Ok(m) if !m.file_type().is_file() => {
                    return failed(nix::errno::Errno::EINVAL, "not a regular file:")
                }
                Err(e) => return failed(errno_of(&e), "stat"),
                Ok(_) => {}
            }
            match f.write_all(data) {
                Ok(()) => FileResult::Written,
                Err(e) => failed(errno_of(&e), "write"),
            }
        }
        FileOp::Read { max_bytes } => {
            let how = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
                .resolve(resolve);
            let fd = match nix::fcntl::openat2(&root, spec.path.as_str(), how) {
                Ok(fd) => fd,
                Err(e) => return failed(e, "open"),
            };
            let f = fs::File::from(fd);
            let size = match f.metadata() {
                Ok(m) if m.is_dir() => return failed(nix::errno::Errno::EISDIR, "read"),
                Ok(m) if !m.file_type().is_file() => {
                    return failed(nix::errno::Errno::EINVAL, "not a regular file:")
                }
                Ok(m) => m.len(),
                Err(e) => return failed(errno_of(&e), "stat"),
            };
            let mut data = Vec::with_capacity(size.min(*max_bytes) as usize);
            match f.take(*max_bytes).read_to_end(&mut data) {
                Ok(_) => FileResult::Read { data, size },
                Err(e) => failed(errno_of(&e), "read"),
            }
        }
    }
}

fn errno_of(e: &std::io::Error) -> nix::errno::Errno {
    nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn dup_onto(src: &impl AsRawFd, dst: i32) -> Result<()> {
    // SAFETY: dup2(2) onto a standard descriptor of this single-threaded child.
    if unsafe { libc::dup2(src.as_raw_fd(), dst) } < 0 {
        bail!("dup2: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn cloexec_fds_from(first: i32) {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets flags on this process's fds.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
}

fn close_fds_from(first: i32) {
    // SAFETY: close_range(2) on descriptors of this single-threaded child only.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
}

/// Waits for `child` up to `timeout`, calling `tick` about every 50 ms meanwhile.
fn wait_timeout(
    child: Pid,
    timeout: Duration,
    tick: &mut dyn FnMut(),
) -> Result<(WaitStatus, bool)> {
    // SAFETY: pidfd_open(2) on our own child; the fd is owned right away.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) } as i32;
    if fd < 0 {
        bail!("pidfd_open: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by pidfd_open.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            // The turn's shell leads its own process group: kill the whole group.
            let _ = nix::sys::signal::killpg(child, nix::sys::signal::Signal::SIGKILL);
            break;
        }
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(50) as i32;
        // SAFETY: poll(2) on one pollfd that we own.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            break;
        }
        tick();
    }
    Ok((waitpid(child, None)?, timed_out))
}

/// Longest working directory a turn may leave behind (PATH_MAX).
pub const MAX_CWD_BYTES: usize = 4096;
/// Largest exported environment a turn may leave behind. The next turn's shell gets it through
/// execve, where one string may not exceed 128 KiB (MAX_ARG_STRLEN): below that, no variable can
/// make every later step fail with E2BIG.
pub const MAX_ENV_BYTES: usize = 120 * 1024;

/// Opens a file the sandbox could have planted or replaced, without trusting it: no symlink is
/// followed anywhere on the path (O_NOFOLLOW and RESOLVE_NO_SYMLINKS), a FIFO or device cannot
/// block the open (O_NONBLOCK) and is refused, and at most `cap` bytes are read. Returns the bytes
/// and the file's size, or None if there is no such file.
fn read_untrusted(path: &str, cap: usize) -> Result<Option<(Vec<u8>, u64)>> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        Err(e) => bail!("{path}: {e}"),
    };
    let f = fs::File::from(fd);
    let meta = f.metadata().with_context(|| format!("stat {path}"))?;
    if !meta.file_type().is_file() {
        bail!("{path} is not a regular file");
    }
    let mut buf = Vec::with_capacity(cap.min(meta.len() as usize));
    f.take(cap as u64)
        .read_to_end(&mut buf)
        .with_context(|| format!("read {path}"))?;
    Ok(Some((buf, meta.len())))
}

/// Public only for the fuzz target (`service/fuzz`), through `crate::fuzzing`.
pub(crate) fn parse_environ(bytes: &[u8]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = bytes
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            let (k, v) = s.split_once('=')?;
            (!SHELL_VARS.contains(&k) && !k.starts_with("__st_"))
                .then(|| (k.to_string(), v.to_string()))
        })
        .collect();
    env.sort();
    env
}

#[cfg(test)]
mod tests {
    #[test]
    fn environ_parsing_drops_shell_vars_and_sorts() {
        let env = super::parse_environ(b"PWD=/x\0B=2\0A=1=1\0SHLVL=1\0");
        assert_eq!(
            env,
            vec![("A".into(), "1=1".into()), ("B".into(), "2".into())]
        );
    }
}
