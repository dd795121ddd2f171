//! Test support: the shared inspector, and cgroup v2 leaves that run commands and clean up.
//!
//! The tests need root, kernel BTF and cgroup v2. Without them they print "skipping: <reason>"
//! and pass, except under CI=true, where they fail.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sandtree_ebpf::{Inspector, SandboxConfig};

/// Skips the test (returns None) with a reason, or panics under CI=true.
pub fn skip<T>(reason: &str) -> Option<T> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("cannot run the inspector tests under CI: {reason}");
    }
    eprintln!("skipping: {reason}");
    None
}

/// The cgroup v2 mount: /sys/fs/cgroup/unified on hybrid hosts, else /sys/fs/cgroup.
pub fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
}

static INSPECTOR: OnceLock<Result<Inspector, String>> = OnceLock::new();

/// The inspector shared by the tests of one test binary, or a skip.
pub fn inspector() -> Option<&'static Inspector> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("the inspector tests need root (to load bpf programs and create cgroups)");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return skip("no kernel btf at /sys/kernel/btf/vmlinux");
    }
    if cgroup2_root().is_none() {
        return skip("no cgroup v2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup");
    }
    match INSPECTOR.get_or_init(|| Inspector::load().map_err(|e| e.to_string())) {
        Ok(i) => Some(i),
        Err(e) => skip(&format!("the inspector does not load here: {e}")),
    }
}

/// A unique name for this test process.
pub fn uniq(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "sandtree-test-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a tgid is alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|c| c != 'Z' && c != 'X'),
        Err(_) => false,
    }
}

/// Waits until pid is gone (or 5 s).
pub fn wait_gone(pid: u32) {
    let t = Instant::now();
    while alive(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A watched cgroup v2 leaf: killed, unwatched and removed on drop.
pub struct Sandbox {
    pub inspector: &'static Inspector,
    pub path: PathBuf,
    pub id: u64,
}

impl Sandbox {
    pub fn new(inspector: &'static Inspector, tag: &str) -> Self {
        Self::with_config(inspector, tag, SandboxConfig::default())
    }

    pub fn with_config(inspector: &'static Inspector, tag: &str, cfg: SandboxConfig) -> Self {
        let path = cgroup2_root().expect("cgroup v2").join(uniq(tag));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        let id = fs::metadata(&path).expect("stat cgroup").ino();
        let sb = Self {
            inspector,
            path,
            id,
        };
        inspector.watch(id, cfg).expect("watch");
        sb
    }

    /// Runs `sh -c cmd` in the cgroup (moved there before exec), with stdio on /dev/null.
    pub fn sh(&self, cmd: &str) -> ExitStatus {
        let procs = CString::new(
            self.path
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .expect("path");
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure only makes async-signal-safe syscalls (open, write, close) on
        // memory allocated before the fork.
        unsafe {
            c.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
        c.status()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
    }

    pub fn sh_ok(&self, cmd: &str) {
        let st = self.sh(cmd);
        assert!(st.success(), "{cmd:?} failed: {st}");
    }

    /// Waits (up to 10 s) until a process of the cgroup runs the program `comm` and is blocked
    /// in a syscall other than execve: its execve has returned, so the inspector has recorded it
    /// in the current epoch. (comm changes inside execve, before the syscall exits; waiting for
    /// comm alone let the execve land in the next epoch now and then.) For programs that block,
    /// as `sleep` and `cat` on a fifo do.
    pub fn wait_for_comm(&self, comm: &str) -> u32 {
        let t = Instant::now();
        let past_execve = |pid: u32| {
            // /proc/<pid>/syscall: the number of the syscall it blocks in, or "running".
            fs::read_to_string(format!("/proc/{pid}/syscall")).is_ok_and(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<libc::c_long>().ok())
                    .is_some_and(|n| n != libc::SYS_execve && n != libc::SYS_execveat)
            })
        };
        loop {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.parse::<u32>().ok()) {
                if fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
                    && past_execve(pid)
                {
                    return pid;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no {comm} in cgroup {}",
                self.path.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn end_turn(&self) -> sandtree_ebpf::TurnEffects {
        self.inspector.end_turn(self.id, &alive).expect("end_turn")
    }

    /// `end_turn` without the grace period when the cgroup is empty after the switch (the
    /// service's fast path; a test cgroup has no init).
    pub fn end_turn_quiet(&self) -> (sandtree_ebpf::TurnEffects, bool) {
        let skipped = std::cell::Cell::new(false);
        let quiet = || {
            let empty = fs::read_to_string(self.path.join("cgroup.procs"))
                .map(|s| s.trim().is_empty())
                .unwrap_or(false);
            skipped.set(empty);
            empty
        };
        let e = self
            .inspector
            .end_turn_quiet(self.id, &alive, &quiet)
            .expect("end_turn_quiet");
        (e, skipped.get())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.inspector.unwatch(self.id);
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        } else if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                // SAFETY: kill takes integers only.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let t = Instant::now();
        while fs::read_to_string(self.path.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty())
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
