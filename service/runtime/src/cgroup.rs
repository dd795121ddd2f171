//! Cgroups of sandboxes, on pure cgroup v2 hosts and on hybrid v1/v2 hosts, behind one interface.
//!
//! Every sandbox gets a cgroup v2 leaf: its inode number is the id that the eBPF inspector filters
//! on, and it has `cgroup.freeze` and `cgroup.kill`. Memory and pids limits go in the same leaf on
//! a pure v2 host; on a hybrid host (v2 at /sys/fs/cgroup/unified with no memory/pids controller)
//! they go in leaves of the v1 memory and pids hierarchies, CPU in v1 cpu, and the device
//! allow-list in v1 devices. (Pure v2 has no devices controller: it needs a BPF device program,
//! which sandtree does not load yet; `doctor` says so.) As runc does, all leaves are nested
//! under the service's own cgroup (from /proc/self/cgroup), below `sandtree/<instance>/`, and only
//! directories that sandtree created there are ever written or removed.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy found (looked at /sys/fs/cgroup and /sys/fs/cgroup/unified)")]
    NoV2,
    #[error("cgroup {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {0}: did not freeze within 5 s")]
    FreezeTimeout(PathBuf),
}

type Result<T, E = CgroupError> = std::result::Result<T, E>;

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Memory, swap included (v1 `memory.memsw.limit_in_bytes`, v2 `memory.max` with
    /// `memory.swap.max` 0): a sandbox never swaps more than this.
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPU time per 100 ms period, in microseconds (100_000 = one CPU).
    pub cpu_quota_us: u64,
}

/// The CFS period that [`Limits::cpu_quota_us`] is a share of.
pub const CPU_PERIOD_US: u64 = 100_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 2 << 30,
            pids: 512,
            cpu_quota_us: CPU_PERIOD_US,
        }
    }
}

/// The devices a sandbox may open or create (its /dev): null, zero, full, random, urandom, tty,
/// and the pty pair. Everything else, every block device included, is refused by the kernel
/// (v1 `devices` controller), even if a node for it appears in the sandbox.
pub const ALLOWED_DEVICES: &[&str] = &[
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
];

/// v1 controllers that sandboxes get a leaf in on a hybrid host.
const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "devices"];

/// Where sandbox cgroups go on this host.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// `<v2 mount>/<own v2 path>/sandtree/<instance>`
    pub v2_parent: PathBuf,
    /// v1 controllers used for limits on a hybrid host: (controller, parent dir).
    pub v1_parents: Vec<(String, PathBuf)>,
    /// True when memory and pids live in the v2 leaf.
    pub pure_v2: bool,
}

fn own_paths() -> io::Result<Vec<(String, String)>> {
    // Lines are "hier-id:controllers:path"; v2 is "0::path".
    Ok(fs::read_to_string("/proc/self/cgroup")?
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect())
}

impl Layout {
    /// Detects the layout and creates the parent directories for `instance`.
    pub fn detect(instance: &str) -> Result<Layout> {
        let own = own_paths().map_err(io_err(Path::new("/proc/self/cgroup"), "read"))?;
        let v2_own = own
            .iter()
            .find(|(c, _)| c.is_empty())
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| "/".into());
        let v2_mount = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists())
            .ok_or(CgroupError::NoV2)?;
        let controllers =
            fs::read_to_string(v2_mount.join("cgroup.controllers")).unwrap_or_default();
        let pure_v2 = controllers.split_whitespace().any(|c| c == "memory")
            && controllers.split_whitespace().any(|c| c == "pids");
        let rel = |p: &str| p.trim_start_matches('/').to_string();
        let v2_parent = v2_mount.join(rel(&v2_own)).join("sandtree").join(instance);
        let mut v1_parents = Vec::new();
        if !pure_v2 {
            for &ctrl in V1_CONTROLLERS {
                let mnt = Path::new("/sys/fs/cgroup").join(ctrl);
                if !mnt.join("cgroup.procs").exists() {
                    continue;
                }
                let path = own
                    .iter()
                    .find(|(c, _)| c.split(',').any(|x| x == ctrl))
                    .map(|(_, p)| p.clone())
                    .unwrap_or_else(|| "/".into());
                v1_parents.push((
                    ctrl.to_string(),
                    mnt.join(rel(&path)).join("sandtree").join(instance),
                ));
            }
        }
        let layout = Layout {
            v2_parent,
            v1_parents,
            pure_v2,
        };
        layout.create_parents()?;
        Ok(layout)
    }

    /// Removes this instance's parent cgroups when no sandbox is left in them (service stop).
    /// Only `sandtree/<instance>` goes; a `sandtree` dir shared with other instances stays.
    pub fn remove_parents(&self) {
        let dirs = std::iter::once(&self.v2_parent).chain(self.v1_parents.iter().map(|(_, p)| p));
        for d in dirs {
            let _ = fs::remove_dir(d);
        }
    }

    fn create_parents(&self) -> Result<()> {
        fs::create_dir_all(&self.v2_parent).map_err(io_err(&self.v2_parent, "mkdir"))?;
        if self.pure_v2 {
            // Enable memory and pids for our subtree, from the top of our own part down.
            let sandtree = self.v2_parent.parent().expect("instance dir has a parent");
            for dir in [
                sandtree.parent().expect("sandtree dir has a parent"),
                sandtree,
                &self.v2_parent,
            ] {
                let f = dir.join("cgroup.subtree_control");
                write_file(&f, "+memory +pids +cpu")?;
            }
        }
        for (_, p) in &self.v1_parents {
            fs::create_dir_all(p).map_err(io_err(p, "mkdir"))?;
        }
        Ok(())
    }

    /// Creates the cgroups of one sandbox.
    pub fn create(&self, name: &str, limits: Limits) -> Result<Cgroup> {
        let v2 = self.v2_parent.join(name);
        fs::create_dir(&v2).map_err(io_err(&v2, "mkdir"))?;
        let mut cg = Cgroup { v2, v1: Vec::new() };
        let setup = (|| {
            if self.pure_v2 {
                let v2 = &cg.v2;
                write_file(&v2.join("memory.max"), &limits.memory_bytes.to_string())?;
                write_if_exists(&v2.join("memory.swap.max"), "0")?;
                // An OOM kill takes the whole sandbox, never half of a process tree.
                write_if_exists(&v2.join("memory.oom.group"), "1")?;
                write_file(&v2.join("pids.max"), &limits.pids.to_string())?;
                write_if_exists(
                    &v2.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
            }
            for (ctrl, parent) in &self.v1_parents {
                let p = parent.join(name);
                fs::create_dir(&p).map_err(io_err(&p, "mkdir"))?;
                cg.v1.push(p.clone());
                match ctrl.as_str() {
                    "memory" => {
                        let bytes = limits.memory_bytes.to_string();
                        write_file(&p.join("memory.limit_in_bytes"), &bytes)?;
                        // memsw must be set after the memory limit (it may not be below it).
                        write_if_exists(&p.join("memory.memsw.limit_in_bytes"), &bytes)?;
                    }
                    "pids" => write_file(&p.join("pids.max"), &limits.pids.to_string())?,
                    "cpu" => {
                        write_file(&p.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        write_file(
                            &p.join("cpu.cfs_quota_us"),
                            &limits.cpu_quota_us.to_string(),
                        )?;
                    }
                    "devices" => {
                        write_file(&p.join("devices.deny"), "a")?;
                        for d in ALLOWED_DEVICES {
                            write_file(&p.join("devices.allow"), d)?;
                        }
                    }
                    _ => {}
                }
            }
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = cg.destroy();
            return Err(e);
        }
        Ok(cg)
    }

    /// Names of leftover sandbox cgroups of this instance (after a crash).
    pub fn leftovers(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(&self.v2_parent) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Reattaches to an existing sandbox cgroup by name (for cleanup).
    pub fn open(&self, name: &str) -> Cgroup {
        Cgroup {
            v2: self.v2_parent.join(name),
            v1: self
                .v1_parents
                .iter()
                .map(|(_, p)| p.join(name))
                .filter(|p| p.exists())
                .collect(),
        }
    }
}

/// Writes a control file that only some kernels have (swap accounting, oom.group, cpu).
fn write_if_exists(path: &Path, value: &str) -> Result<()> {
    if path.exists() {
        write_file(path, value)?;
    }
    Ok(())
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path, "open"))?;
    f.write_all(value.as_bytes()).map_err(io_err(path, "write"))
}

/// The cgroups of one sandbox: a v2 leaf plus, on hybrid hosts, v1 memory, pids, cpu and devices
/// leaves.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cgroup {
    pub v2: PathBuf,
    pub v1: Vec<PathBuf>,
}

impl Cgroup {
    /// The v2 cgroup id (the directory's inode number), as `bpf_get_current_cgroup_id()` sees it.
    #[allow(dead_code, reason = "read by the eBPF inspector's wiring (issue 5)")]
    pub fn id(&self) -> Result<u64> {
        Ok(fs::metadata(&self.v2)
            .map_err(io_err(&self.v2, "stat"))?
            .ino())
    }

    /// Anonymous memory the sandbox's processes hold now (their RSS without the page cache):
    /// v2 `memory.stat` `anon`, or v1 `memory.stat` `total_rss` on a hybrid host. None when
    /// neither can be read.
    pub fn memory_rss(&self) -> Option<u64> {
        let stat = |dir: &Path, key: &str| -> Option<u64> {
            let text = fs::read_to_string(dir.join("memory.stat")).ok()?;
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        };
        stat(&self.v2, "anon").or_else(|| {
            self.v1.iter().find_map(|d| {
                d.join("memory.stat")
                    .exists()
                    .then(|| stat(d, "total_rss"))?
            })
        })
    }

    /// The `cgroup.procs` files that a process writes its pid into to join every leaf.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        std::iter::once(&self.v2)
            .chain(self.v1.iter())
            .map(|p| p.join("cgroup.procs"))
            .collect()
    }

    /// Host pids of the processes in the v2 leaf.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let p = self.v2.join("cgroup.procs");
        Ok(fs::read_to_string(&p)
            .map_err(io_err(&p, "read"))?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Asks the kernel to freeze the sandbox without waiting for it (its processes may be
    /// ptrace-stopped by CRIU; they freeze as soon as CRIU lets them go).
    pub fn request_freeze(&self) -> Result<()> {
        write_file(&self.v2.join("cgroup.freeze"), "1")
    }

    /// Freezes (or thaws) the sandbox and waits until the kernel reports it frozen.
    pub fn freeze(&self, on: bool) -> Result<()> {
        write_file(&self.v2.join("cgroup.freeze"), if on { "1" } else { "0" })?;
        if !on {
            return Ok(());
        }
        let events = self.v2.join("cgroup.events");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = fs::read_to_string(&events).map_err(io_err(&events, "read"))?;
            if s.lines().any(|l| l == "frozen 1") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CgroupError::FreezeTimeout(self.v2.clone()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// True while any process is in the leaf.
    pub fn populated(&self) -> bool {
        fs::read_to_string(self.v2.join("cgroup.events"))
            .map(|s| s.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills every process in the sandbox (cgroup.kill, or SIGKILL to each pid on old kernels).
    pub fn kill(&self) -> Result<()> {
        let kill = self.v2.join("cgroup.kill");
        if kill.exists() {
            let _ = self.freeze(false);
            write_file(&kill, "1")?;
        } else {
            for pid in self.pids()? {
                // SAFETY: plain kill(2) on a pid read from our own sandbox's cgroup.procs.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        Ok(())
    }

    /// Kills everything in it, waits until it is empty and removes every leaf.
    pub fn destroy(&self) -> Result<()> {
        if self.v2.exists() {
            self.kill()?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.populated() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        for dir in std::iter::once(&self.v2).chain(self.v1.iter()) {
            let mut tries = 0;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if tries < 200 => {
                        let _ = e;
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        return Err(CgroupError::Io {
                            path: dir.clone(),
                            op: "rmdir",
                            source: e,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}
