//! CRIU driver: a client of CRIU's swrk RPC (`criu swrk FD` over a SOCK_SEQPACKET socketpair).
//!
//! Dumps run with `leave_running` and notify scripts on, so the filesystem snapshot of a node is
//! taken inside the `post-dump` notification, while every task of the sandbox is still seized by
//! CRIU: the process image and the snapshot share one frozen instant. Restores go into fresh
//! namespaces (CRIU recreates the dumped pid, mount, uts, ipc, net and time namespaces) on a clone of the
//! node's snapshot (`root`), and the CRIU process joins the new sandbox's cgroups before it starts,
//! so every restored task lands in them.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// prctl(2) option that marks every anonymous mapping of the caller mergeable by KSM (Linux 6.4).
const PR_SET_MEMORY_MERGE: libc::c_int = 67;

use nix::sys::socket::{recv, send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use prost::Message;
use sandtree_proto::criu as rpc;

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot start {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("criu rpc: {0}")]
    Rpc(String),
    #[error("criu {op} of pid {pid} failed: {msg} (log: {log})")]
    Failed {
        op: &'static str,
        pid: u32,
        msg: String,
        log: String,
    },
    #[error("post-dump hook failed: {0}")]
    Hook(String),
    #[error(
        "cannot checkpoint: pid {pid} (pid {ns_pid} in the sandbox) has been blocked in vfork() \
         for over {waited_ms} ms, waiting for its child to exec or exit; the kernel lets no tracer \
         stop a task there, so CRIU cannot dump the sandbox until the child does (CRIU's own test \
         of this, zdtm vfork00, expects the dump to fail)"
    )]
    VforkPending {
        pid: u32,
        ns_pid: u32,
        waited_ms: u64,
    },
}

type Result<T, E = CriuError> = std::result::Result<T, E>;

#[derive(Debug, Clone)]
pub struct Criu {
    pub bin: PathBuf,
}

/// What a dump cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct DumpStats {
    pub image_bytes: u64,
    pub dump_ms: f64,
    /// Time spent inside the post-dump hook (the snapshot), included in `dump_ms`.
    pub hook_ms: f64,
}

struct Session {
    sock: OwnedFd,
    child: std::process::Child,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Criu {
    /// Finds criu: `SANDTREE_CRIU`, else `criu` on PATH (setup.sh installs 4.1.1 in /usr/local/sbin).
    pub fn locate() -> Criu {
        if let Some(p) = std::env::var_os("SANDTREE_CRIU") {
            return Criu {
                bin: PathBuf::from(p),
            };
        }
        let bin =
            sandtree_storage::cmd::find_program("criu").unwrap_or_else(|| PathBuf::from("criu"));
        Criu { bin }
    }

    /// `criu --version` as (major, minor, sublevel).
    pub fn version(&self) -> Option<(u32, u32, u32)> {
        let out = Command::new(&self.bin).arg("--version").output().ok()?;
        let s = String::from_utf8_lossy(&out.stdout);
        let v = s.lines().find_map(|l| l.strip_prefix("Version: "))?.trim();
        let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
        Some((it.next()?, it.next().unwrap_or(0), it.next().unwrap_or(0)))
    }

    /// Spawns `criu swrk` in the cgroups whose `cgroup.procs` files are given; with `merge`,
    /// with KSM merging on for it and the tasks it forks (PR_SET_MEMORY_MERGE is inherited across
    /// fork and exec), so a restored tree's anonymous memory may be shared with identical pages.
    fn start(&self, procs_files: &[PathBuf], merge: bool) -> Result<Session> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| CriuError::Rpc(format!("socketpair: {e}")))?;
        let fd = theirs.as_raw_fd();
        // Everything the child needs is prepared here: after fork only raw syscalls run.
        let procs: Vec<CString> = procs_files
            .iter()
            .map(|p| {
                CString::new(p.as_os_str().as_encoded_bytes()).expect("cgroup path has no NUL")
            })
            .collect();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("swrk")
            .arg(fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure only makes async-signal-safe syscalls (fcntl, prctl, getpid, open,
        // write, close) on memory prepared before fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Best effort: a kernel without it restores unmerged.
                if merge {
                    libc::prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0);
                }
                let mut buf = [0u8; 16];
                let pid = itoa(libc::getpid() as u32, &mut buf);
                for p in &procs {
                    let f = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if f < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let w = libc::write(f, pid.as_ptr().cast(), pid.len());
                    libc::close(f);
                    if w < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| CriuError::Spawn {
            bin: self.bin.clone(),
            source,
        })?;
        drop(theirs);
        Ok(Session { sock: ours, child })
    }

    /// Dumps the process tree rooted at `pid` (a pid-namespace init) into `images_dir`, leaving it
    /// running. `post_dump` runs while the tree is still frozen.
    pub fn dump(
        &self,
        pid: u32,
        images_dir: &Path,
        mut post_dump: impl FnMut() -> Result<(), String>,
    ) -> Result<DumpStats> {
        let started = Instant::now();
        let mut s = self.start(&[], false)?;
        // CRIU opens the images dir through /proc/<our pid>/fd/<fd>: keep it open for the call.
        let dir = open_dir(images_dir)?;
        let opts = rpc::CriuOpts {
            images_dir_fd: dir.as_raw_fd(),
            pid: Some(pid as i32),
            leave_running: Some(true),
            tcp_established: Some(true),
            file_locks: Some(true),
            log_level: Some(4),
            log_file: Some("dump.log".into()),
            notify_scripts: Some(true),
            manage_cgroups_mode: Some(rpc::CriuCgMode::Ignore as i32),
            network_lock: Some(rpc::CriuNetworkLockMethod::Skip as i32),
            ghost_limit: Some(64 << 20),
            ..Default::default()
        };
        let mut hook_ms = 0.0;
        let mut hook_err = None;
        s.send(rpc::CriuReq {
            r#type: rpc::CriuReqType::Dump as i32,
            opts: Some(opts),
            ..Default::default()
        })?;
        loop {
            let resp = s.recv()?;
            match rpc::CriuReqType::try_from(resp.r#type) {
                Ok(rpc::CriuReqType::Notify) => {
                    let script = resp.notify.and_then(|n| n.script).unwrap_or_default();
                    let mut ok = true;
                    if script == "post-dump" {
                        let t = Instant::now();
                        if let Err(e) = post_dump() {
                            ok = false;
                            hook_err = Some(e);
                        }
                        hook_ms = t.elapsed().as_secs_f64() * 1e3;
                    }
                    s.send(rpc::CriuReq {
                        r#type: rpc::CriuReqType::Notify as i32,
                        notify_success: Some(ok),
                        ..Default::default()
                    })?;
                }
                Ok(rpc::CriuReqType::Dump) => {
                    if let Some(e) = hook_err {
                        return Err(CriuError::Hook(e));
                    }
                    if !resp.success {
                        return Err(failure("dump", pid, &resp, &images_dir.join("dump.log")));
                    }
                    let _ = std::fs::remove_file(images_dir.join("dump.log"));
                    return Ok(DumpStats {
                        image_bytes: dir_bytes(images_dir),
                        dump_ms: started.elapsed().as_secs_f64() * 1e3,
                        hook_ms,
                    });
                }
                other => {
                    return Err(CriuError::Rpc(format!(
                        "unexpected response {other:?} to dump"
                    )))
                }
            }
        }
    }

    /// Restores the tree in `images_dir` onto `root`, inside the cgroups whose `cgroup.procs`
    /// files are given (with KSM merging on when `merge`). Returns the host pid of the restored
    /// init and how long CRIU took, from its start to its answer.
    pub fn restore(
        &self,
        images_dir: &Path,
        root: &Path,
        procs_files: &[PathBuf],
        log_name: &str,
        merge: bool,
    ) -> Result<(u32, std::time::Duration)> {
        let started = std::time::Instant::now();
        let mut s = self.start(procs_files, merge)?;
        let dir = open_dir(images_dir)?;
        let opts = rpc::CriuOpts {
            images_dir_fd: dir.as_raw_fd(),
            root: Some(root.to_string_lossy().into_owned()),
            tcp_established: Some(true),
            file_locks: Some(true),
            log_level: Some(4),
            log_file: Some(log_name.into()),
            manage_cgroups_mode: Some(rpc::CriuCgMode::Ignore as i32),
            network_lock: Some(rpc::CriuNetworkLockMethod::Skip as i32),
            ghost_limit: Some(64 << 20),
            ..Default::default()
        };
        s.send(rpc::CriuReq {
            r#type: rpc::CriuReqType::Restore as i32,
            opts: Some(opts),
            ..Default::default()
        })?;
        loop {
            let resp = s.recv()?;
            match rpc::CriuReqType::try_from(resp.r#type) {
                Ok(rpc::CriuReqType::Notify) => {
                    s.send(rpc::CriuReq {
                        r#type: rpc::CriuReqType::Notify as i32,
                        notify_success: Some(true),
                        ..Default::default()
                    })?;
                }
                Ok(rpc::CriuReqType::Restore) => {
                    if !resp.success {
                        return Err(failure("restore", 0, &resp, &images_dir.join(log_name)));
                    }
                    let _ = std::fs::remove_file(images_dir.join(log_name));
                    return resp
                        .restore
                        .map(|r| (r.pid as u32, started.elapsed()))
                        .ok_or_else(|| CriuError::Rpc("restore response has no pid".into()));
                }
                other => {
                    return Err(CriuError::Rpc(format!(
                        "unexpected response {other:?} to restore"
                    )))
                }
            }
        }
    }
}

/// A task of a tree that CRIU cannot seize: a parent blocked in vfork() (or clone with
/// CLONE_VFORK) until its child execs or exits. The kernel waits there killably
/// (`wait_for_vfork_done`), so PTRACE_INTERRUPT never stops it: CRIU's seize waits for its
/// timeout (10 s, with the rest of the tree ptrace-stopped meanwhile) and fails with
/// "Unseizable non-zombie PID found, state D".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VforkWait {
    /// Host pid (thread id) of the blocked task.
    pub tid: u32,
    /// Its pid in its innermost pid namespace.
    pub ns_tid: u32,
}

/// How long a checkpoint waits for a vfork in the tree to end (posix_spawn, Python's
/// subprocess and shells vfork then exec at once) before it gives up without running CRIU.
pub const VFORK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits up to `grace` until no task of the tree rooted at `root` is blocked in vfork; else the
/// error names the first one still blocked.
pub fn wait_seizable(root: u32, grace: std::time::Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let Some(w) = vfork_waiters(root).into_iter().next() else {
            return Ok(());
        };
        if started.elapsed() >= grace {
            return Err(CriuError::VforkPending {
                pid: w.tid,
                ns_pid: w.ns_tid,
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The tasks of the tree rooted at `root` (every thread of every descendant, through
/// /proc/PID/task/TID/children) that are blocked in vfork.
pub fn vfork_waiters(root: u32) -> Vec<VforkWait> {
    let mut found = Vec::new();
    let mut todo = vec![root];
    let mut seen = std::collections::HashSet::new();
    while let Some(pid) = todo.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for tid in tasks
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        {
            let dir = format!("/proc/{pid}/task/{tid}");
            if let Ok(children) = std::fs::read_to_string(format!("{dir}/children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
            let (Ok(stat), Ok(syscall)) = (
                std::fs::read_to_string(format!("{dir}/stat")),
                std::fs::read_to_string(format!("{dir}/syscall")),
            ) else {
                continue;
            };
            if in_vfork(&stat, &syscall) {
                let ns_tid = std::fs::read_to_string(format!("{dir}/status"))
                    .ok()
                    .and_then(|s| innermost_nspid(&s))
                    .unwrap_or(tid);
                found.push(VforkWait { tid, ns_tid });
            }
        }
    }
    found
}

/// Whether a task whose /proc/PID/stat and /proc/PID/syscall read so is a parent blocked in
/// vfork: in uninterruptible sleep (D) inside vfork, clone with CLONE_VFORK, or clone3 (whose
/// flags are in memory; the sandbox's seccomp answers it ENOSYS anyway).
fn in_vfork(stat: &str, syscall: &str) -> bool {
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if state != Some("D") {
        return false;
    }
    let mut f = syscall.split_whitespace();
    let nr = f.next().and_then(|n| n.parse::<i64>().ok());
    let arg0 = f
        .next()
        .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
    match nr {
        Some(libc::SYS_vfork) | Some(libc::SYS_clone3) => true,
        Some(libc::SYS_clone) => arg0.is_some_and(|fl| fl & libc::CLONE_VFORK as u64 != 0),
        _ => false,
    }
}

/// The last `NSpid:` field of /proc/PID/status: the pid in the task's own pid namespace.
fn innermost_nspid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

impl Session {
    fn send(&mut self, req: rpc::CriuReq) -> Result<()> {
        send(
            self.sock.as_raw_fd(),
            &req.encode_to_vec(),
            MsgFlags::empty(),
        )
        .map_err(|e| CriuError::Rpc(format!("send: {e}")))?;
        Ok(())
    }
    fn recv(&mut self) -> Result<rpc::CriuResp> {
        let mut buf = vec![0u8; 1 << 16];
        let n = recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::empty())
            .map_err(|e| CriuError::Rpc(format!("recv: {e}")))?;
        if n == 0 {
            let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(CriuError::Rpc(format!(
                "criu closed the connection ({status})"
            )));
        }
        rpc::CriuResp::decode(&buf[..n]).map_err(|e| CriuError::Rpc(format!("decode: {e}")))
    }
}

fn failure(op: &'static str, pid: u32, resp: &rpc::CriuResp, src: &Path) -> CriuError {
    let log = src;
    let cause = std::fs::read_to_string(log)
        .map(|s| error_summary(&s))
        .unwrap_or_default();
    let log = log
        .parent()
        .and_then(|d| d.parent())
        .map(|d| {
            d.join("failed-logs").join(format!(
                "{}-{}",
                log.parent()
                    .and_then(|p| p.file_name())
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                log.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ))
        })
        .unwrap_or_else(|| log.to_path_buf());
    // Keep the log where the message says it is, out of the images dir (which a failed dump
    // loses and a failed restore must not grow).
    let log = match log.parent().map(std::fs::create_dir_all) {
        Some(Ok(())) if std::fs::rename(src, &log).is_ok() => log,
        _ => src.to_path_buf(),
    };
    let errmsg = resp.cr_errmsg.clone().unwrap_or_default();
    CriuError::Failed {
        op,
        pid,
        msg: match (cause.is_empty(), errmsg.is_empty()) {
            (false, _) => cause,
            (true, false) => format!("{errmsg} (errno {})", resp.cr_errno.unwrap_or(0)),
            (true, true) => format!("errno {}", resp.cr_errno.unwrap_or(0)),
        },
        log: log.display().to_string(),
    }
}

/// Error lines that CRIU logs on every run on some hosts and that never make an operation fail:
/// without CAP_SYS_RESOURCE (MACHINE-NOTES) `rlimit_unlimit_nofile` cannot raise its own limit.
const HARMLESS_ERRORS: &[&str] = &["Can't setup RLIMIT_NOFILE for self"];

/// The lines of a CRIU log that say why the operation failed: the first `Error` line that is not
/// in [`HARMLESS_ERRORS`] (CRIU's first real error is the cause; later ones are its fallout),
/// followed by up to two more for context, each with its timestamp prefix removed.
pub fn error_summary(log: &str) -> String {
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        .filter(|l| !HARMLESS_ERRORS.iter().any(|h| l.contains(h)))
        .map(|l| {
            // "(00.012345) pie: 12: Error (criu/...)": drop the timestamp.
            let l = l.trim();
            match l.strip_prefix('(').and_then(|r| r.split_once(") ")) {
                Some((_, rest)) => rest,
                None => l,
            }
        })
        .collect();
    errors
        .iter()
        .take(3)
        .copied()
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Sum of the sizes of the files in `dir` (CRIU images are flat files in one directory). What a
/// node's image adds on disk: subdirectories (the hard-linked `parent/` chain of `pages.rs`) are
/// left out.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn open_dir(p: &Path) -> Result<std::fs::File> {
    std::fs::File::open(p)
        .map_err(|e| CriuError::Rpc(format!("open images dir {}: {e}", p.display())))
}

fn itoa(mut n: u32, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_vfork_parent_is_recognized_from_stat_and_syscall() {
        use super::in_vfork;
        // Read from a real vfork parent: state D, syscall 58 (vfork).
        let stat = "30010 (vf) D 30005 2 2 0 -1 4194368";
        let vfork = "58 0x40176d 0x0 0x0 0x40fd380 0x0 0x4adaa0 0x7fff768453d0 0x430d28";
        assert!(in_vfork(stat, vfork));
        // A comm with spaces and parentheses does not confuse the state.
        assert!(in_vfork("7 (a) S (b)) D 1", vfork));
        assert!(!in_vfork("30010 (vf) S 30005", vfork), "not asleep in D");
        // clone with CLONE_VFORK|CLONE_VM|SIGCHLD (posix_spawn) is one; a plain fork's clone is not.
        assert!(in_vfork(
            stat,
            "56 0x4111 0x7f00 0x0 0x0 0x0 0x0 0x7ffd 0x4a0"
        ));
        assert!(!in_vfork(
            stat,
            "56 0x1200011 0x0 0x0 0x7f00 0x0 0x0 0x7ffd 0x4a0"
        ));
        // Other uninterruptible sleeps, a running task, an unreadable file.
        assert!(!in_vfork(
            stat,
            "0 0x3 0x7ffd 0x1000 0x0 0x0 0x0 0x7ffd 0x4a0"
        ));
        assert!(!in_vfork(stat, "running"));
        assert!(!in_vfork(stat, ""));
    }

    #[test]
    fn nspid_is_the_innermost() {
        let status = "Name:\tvf\nNSpid:\t30010\t5\nNSpgid:\t29990\t2\n";
        assert_eq!(super::innermost_nspid(status), Some(5));
        assert_eq!(super::innermost_nspid("NSpid:\t42\n"), Some(42));
        assert_eq!(super::innermost_nspid("Name:\tx\n"), None);
    }

    #[test]
    fn itoa_formats() {
        let mut b = [0u8; 16];
        assert_eq!(super::itoa(0, &mut b), b"0");
        assert_eq!(super::itoa(4_294_967_295, &mut b), b"4294967295");
    }

    #[test]
    fn error_summary_skips_the_harmless_rlimit_line() {
        let log = "(00.000100) Version: 4.1.1\n\
            (00.000200) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
            (00.003000) Warn  (criu/x.c:1): something\n\
            (00.004000) Error (criu/pstree.c:965): Can't restore sub-task in NS (cflags 80)\n\
            (00.005000) Error (criu/cr-restore.c:2600): Restoring FAILED.\n";
        assert_eq!(
            super::error_summary(log),
            "Error (criu/pstree.c:965): Can't restore sub-task in NS (cflags 80) | \
             Error (criu/cr-restore.c:2600): Restoring FAILED."
        );
    }

    #[test]
    fn error_summary_of_a_log_with_only_harmless_errors_is_empty() {
        let log = "(00.000200) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n";
        assert_eq!(super::error_summary(log), "");
    }
}
