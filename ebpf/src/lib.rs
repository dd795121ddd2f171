//! The turn inspector of sandtree (after the Crab paper): eBPF programs that watch the syscalls
//! of each sandbox's processes and tell, at each turn boundary, whether the turn changed nothing
//! ([`VerdictKind::None`]), only files ([`VerdictKind::Fs`]) or process state ([`VerdictKind::Proc`]).
//!
//! A sandbox is a cgroup v2 leaf; its id is the inode number of its directory (what
//! `bpf_get_current_cgroup_id()` returns). [`Inspector::watch`] starts recording for it, in
//! epoch 1; [`Inspector::end_turn`] closes the current epoch, opens the next one and returns
//! what happened in the closed one ([`TurnEffects`]), which [`verdict`] turns into a verdict.
//!
//! What counts (see bpf/inspector.bpf.c):
//! - file system mutations of the sandbox's files (not /dev, /proc, /sys, pseudo file systems,
//!   `/.sandtree/` nor the sandbox's ignored device);
//! - processes created in the epoch that are still alive at its end ("survivors");
//! - activity of long-lived processes (created in an earlier epoch, or already there), other
//!   than the sandbox init: input from pipes, fifos, sockets, ttys; any write; fork, exec, exit;
//!   file mutations; IPC; signals received from another process;
//! - sockets and IPC: bind, listen, connect, accept, SysV shm/sem/msg, POSIX mq and shm
//!   (/dev/shm), ptrace, mount/sethostname/netlink changes, io_uring/aio, 32-bit syscalls;
//! - lost events (a full map): the verdict is then proc ("inspector overflow").
//!
//! x86_64 only. Needs root (CAP_BPF + CAP_PERFMON) and kernel BTF.

mod abi;

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use abi::{Birth, Config, EpochKey, EpochStats};
use aya::maps::{HashMap, Map, MapData, MapError};

/// Errors of the inspector.
#[derive(Debug, thiserror::Error)]
pub enum InspectorError {
    /// No kernel BTF: CO-RE relocation and BTF tracepoints need it.
    #[error("no kernel btf at /sys/kernel/btf/vmlinux: the inspector needs a kernel built with CONFIG_DEBUG_INFO_BTF")]
    NoBtf,
    /// Not allowed to load BPF programs.
    #[error("loading the inspector's bpf programs needs root (CAP_BPF and CAP_PERFMON): {0}")]
    Permission(String),
    /// Built for an architecture that the BPF programs do not support.
    #[error("the inspector supports x86_64 linux only")]
    Unsupported,
    /// The BPF object failed to load or a program failed to load or attach.
    #[error("loading the inspector's bpf programs: {0}")]
    Load(String),
    /// The cgroup is not watched.
    #[error("cgroup {0} is not watched by the inspector")]
    NotWatched(u64),
    /// A map operation failed.
    #[error("cgroup {cgroup}: {op}: {source}")]
    Map {
        /// The sandbox cgroup id.
        cgroup: u64,
        /// What was being done.
        op: &'static str,
        /// The map error.
        #[source]
        source: MapError,
    },
}

/// Per-sandbox configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    /// The sandbox init's tgid as seen from the initial pid namespace (its activity is expected
    /// and never counts as long-lived activity; 0 for none).
    pub init_tgid: u32,
    /// The kernel `dev_t` (`inode->i_sb->s_dev`, i.e. `major << 20 | minor`) of the sandbox's
    /// private tmpfs at /.sandtree, whose files are ignored; 0 for none. See [`kernel_dev`].
    pub ignore_dev: u64,
}

/// What happened in a sandbox during one epoch (one turn).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TurnEffects {
    /// File system mutations of the sandbox's files, in all.
    pub fs_mutations: u64,
    /// File system mutations by class ("open", "write", "unlink", "rename", "mkdir", ...).
    pub fs_classes: BTreeMap<String, u64>,
    /// Up to 4 sample paths (both paths of a rename), as the syscalls named them (relative
    /// paths are relative to the caller's directory).
    pub sample_paths: Vec<String>,
    /// The same samples with their syscall, e.g. "openat(O_WRONLY|O_CREAT|O_TRUNC) /tmp/a".
    pub fs_samples: Vec<String>,
    /// Processes created in (or moved into) the sandbox during the epoch.
    pub procs_created: u32,
    /// Processes of the sandbox that exited during the epoch.
    pub procs_exited: u32,
    /// Tgids created in the epoch that are still alive (per the `alive` callback of end_turn).
    pub survivors: Vec<u32>,
    /// Long-lived processes (up to 4) that did something that changes state, with what they
    /// did, e.g. (77, "read from a fifo (read)").
    pub long_lived_active: Vec<(u32, String)>,
    /// Socket and IPC operations by class ("bind", "listen", "connect", "accept", "shm",
    /// "sem", "msg", "mq", "signal", "ptrace", "namespace", "async_io", "compat32").
    pub ipc: BTreeMap<String, u64>,
    /// Events lost by the inspector (a full map): never trust a quiet epoch with overflow > 0.
    pub overflow: u64,
}

/// The verdict on a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VerdictKind {
    /// Nothing changed.
    None,
    /// Only the sandbox's files changed.
    Fs,
    /// Process state changed (or may have).
    Proc,
}

/// The verdict on a turn, with the reasons: proc if the inspector lost events, if any process
/// created in the turn survives it, if any long-lived process was active, or on any socket/IPC
/// operation; else fs if any file changed; else none.
pub fn verdict(e: &TurnEffects) -> (VerdictKind, Vec<String>) {
    let mut proc = Vec::new();
    if e.overflow > 0 {
        proc.push(format!(
            "proc: inspector overflow ({} events lost)",
            e.overflow
        ));
    }
    for pid in &e.survivors {
        proc.push(format!("proc: pid {pid} outlives the turn"));
    }
    for (pid, what) in &e.long_lived_active {
        proc.push(format!("proc: long-lived pid {pid} {what}"));
    }
    for (class, n) in &e.ipc {
        proc.push(format!("proc: {class} x{n}"));
    }
    if !proc.is_empty() {
        return (VerdictKind::Proc, proc);
    }
    if e.fs_mutations > 0 {
        let mut fs: Vec<String> = e.fs_samples.iter().map(|s| format!("fs: {s}")).collect();
        let classes: Vec<String> = e
            .fs_classes
            .iter()
            .map(|(c, n)| format!("{c} x{n}"))
            .collect();
        fs.push(format!(
            "fs: {} mutations ({})",
            e.fs_mutations,
            classes.join(", ")
        ));
        return (VerdictKind::Fs, fs);
    }
    (VerdictKind::None, Vec::new())
}

/// The kernel `dev_t` (`major << 20 | minor`, as in `inode->i_sb->s_dev`) of a user-space
/// `st_dev` (as returned by stat(2)), for [`SandboxConfig::ignore_dev`].
pub fn kernel_dev(st_dev: u64) -> u64 {
    let major = libc::major(st_dev) as u64;
    let minor = libc::minor(st_dev) as u64;
    (major << 20) | minor
}

#[cfg(sandtree_bpf)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inspector.bpf.o"));

/// Programs of the BPF object and the BTF tracepoints they attach to.
const PROGRAMS: [(&str, &str); 6] = [
    ("sandtree_sys_exit", "sys_exit"),
    ("sandtree_fork", "sched_process_fork"),
    ("sandtree_exec", "sched_process_exec"),
    ("sandtree_exit", "sched_process_exit"),
    ("sandtree_attach", "cgroup_attach_task"),
    ("sandtree_signal", "signal_generate"),
];

/// The loaded and attached inspector. Dropping it detaches the programs and frees the maps.
pub struct Inspector {
    inner: Mutex<Inner>,
    map_bytes: u64,
}

struct Inner {
    watched: HashMap<MapData, u64, Config>,
    stats: HashMap<MapData, EpochKey, EpochStats>,
    births: HashMap<MapData, u32, Birth>,
    overflow: HashMap<MapData, u64, u64>,
    /// Last overflow count reported per cgroup.
    seen_overflow: StdHashMap<u64, u64>,
    /// Keeps the programs attached.
    _ebpf: aya::Ebpf,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn load_error(e: &dyn std::error::Error) -> InspectorError {
    let msg = chain(e);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 || msg.contains("Operation not permitted") {
        InspectorError::Permission(msg)
    } else {
        InspectorError::Load(msg)
    }
}

/// [`InspectorError::Map`] for a failed operation `op` on the map entries of sandbox `cgroup`.
fn map_err(cgroup: u64, op: &'static str) -> impl FnOnce(MapError) -> InspectorError {
    move |source| InspectorError::Map { cgroup, op, source }
}

/// Reading the config of sandbox `cgroup` failed: not found means it is not watched.
fn config_err(cgroup: u64) -> impl FnOnce(MapError) -> InspectorError {
    move |e| {
        if is_not_found(&e) {
            InspectorError::NotWatched(cgroup)
        } else {
            map_err(cgroup, "reading its config")(e)
        }
    }
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut aya::Ebpf,
    name: &str,
) -> Result<HashMap<MapData, K, V>, InspectorError> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| InspectorError::Load(format!("map {name} missing from the bpf object")))?;
    HashMap::try_from(map).map_err(|e| InspectorError::Load(format!("map {name}: {}", chain(&e))))
}

/// Bytes of the maps as defined: max_entries * (key + value), times the CPUs for per-CPU maps.
fn defined_bytes(ebpf: &aya::Ebpf) -> u64 {
    let cpus = aya::util::nr_cpus().unwrap_or(1) as u64;
    ebpf.maps()
        .filter_map(|(_, map)| {
            let (data, per_cpu) = match map {
                Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) => (d, false),
                Map::PerCpuHashMap(d) | Map::PerCpuLruHashMap(d) | Map::PerCpuArray(d) => (d, true),
                _ => return None,
            };
            let info = data.info().ok()?;
            let per = u64::from(info.key_size()) + u64::from(info.value_size());
            Some(u64::from(info.max_entries()) * per * if per_cpu { cpus } else { 1 })
        })
        .sum()
}

/// Waits until every BPF program that may have read the old config has finished: the programs
/// run under rcu_read_lock and membarrier(MEMBARRIER_CMD_GLOBAL) is a synchronize_rcu().
fn grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes integers only and has no memory effects on this process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_CMD_GLOBAL,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if r != 0 {
        // nohz_full kernels refuse MEMBARRIER_CMD_GLOBAL: a program runs for microseconds.
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Inspector {
    /// Loads the BPF programs and attaches them to their tracepoints.
    pub fn load() -> Result<Self, InspectorError> {
        #[cfg(not(sandtree_bpf))]
        {
            Err(InspectorError::Unsupported)
        }
        #[cfg(sandtree_bpf)]
        {
            Self::load_object(OBJECT)
        }
    }

    #[cfg_attr(not(sandtree_bpf), allow(dead_code))]
    fn load_object(object: &[u8]) -> Result<Self, InspectorError> {
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(InspectorError::NoBtf);
        }
        let btf = aya::Btf::from_sys_fs()
            .map_err(|e| InspectorError::Load(format!("reading kernel btf: {}", chain(&e))))?;
        let mut ebpf = aya::EbpfLoader::new()
            .btf(Some(&btf))
            .load(object)
            .map_err(|e| load_error(&e))?;
        for (name, tracepoint) in PROGRAMS {
            let program: &mut aya::programs::BtfTracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| {
                    InspectorError::Load(format!("program {name} missing from the bpf object"))
                })?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| {
                    InspectorError::Load(format!("program {name}: {}", chain(&e)))
                })?;
            program.load(tracepoint, &btf).map_err(|e| {
                let err = load_error(&e);
                match err {
                    InspectorError::Load(m) => InspectorError::Load(format!("program {name}: {m}")),
                    other => other,
                }
            })?;
            program.attach().map_err(|e| {
                InspectorError::Load(format!(
                    "attaching {name} to tracepoint {tracepoint}: {}",
                    chain(&e)
                ))
            })?;
        }
        let map_bytes = defined_bytes(&ebpf);
        let watched = take_hash(&mut ebpf, "watched")?;
        let stats = take_hash(&mut ebpf, "stats")?;
        let births = take_hash(&mut ebpf, "births")?;
        let overflow = take_hash(&mut ebpf, "overflow")?;
        Ok(Self {
            inner: Mutex::new(Inner {
                watched,
                stats,
                births,
                overflow,
                seen_overflow: StdHashMap::new(),
                _ebpf: ebpf,
            }),
            map_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts watching a sandbox cgroup (its processes from now on, in epoch 1). Watching a
    /// watched cgroup again updates its config and keeps its epoch.
    pub fn watch(&self, cgroup_id: u64, cfg: SandboxConfig) -> Result<(), InspectorError> {
        let mut inner = self.lock();
        let old = match inner.watched.get(&cgroup_id, 0) {
            Ok(c) => Some(c),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(map_err(cgroup_id, "reading its config")(e)),
        };
        let epoch = old.map_or(1, |c| c.epoch);
        let seen = match inner.overflow.get(&cgroup_id, 0) {
            Ok(n) => n,
            Err(e) if is_not_found(&e) => {
                inner
                    .overflow
                    .insert(cgroup_id, 0, 0)
                    .map_err(map_err(cgroup_id, "adding its overflow counter"))?;
                0
            }
            Err(e) => return Err(map_err(cgroup_id, "reading its overflow counter")(e)),
        };
        inner.seen_overflow.entry(cgroup_id).or_insert(seen);
        let key = EpochKey {
            cgid: cgroup_id,
            epoch,
        };
        if inner.stats.get(&key, 0).is_err() {
            inner
                .stats
                .insert(key, EpochStats::default(), 0)
                .map_err(map_err(cgroup_id, "adding its epoch stats"))?;
        }
        let config = Config {
            epoch,
            ignore_dev: cfg.ignore_dev,
            init_tgid: cfg.init_tgid,
            suspended: old.map_or(0, |c| c.suspended),
        };
        inner
            .watched
            .insert(cgroup_id, config, 0)
            .map_err(map_err(cgroup_id, "adding it to the watched cgroups"))
    }

    /// Stops watching a sandbox cgroup and removes all its map entries (a no-op if not watched).
    pub fn unwatch(&self, cgroup_id: u64) -> Result<(), InspectorError> {
        {
            let mut inner = self.lock();
            match inner.watched.remove(&cgroup_id) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(map_err(cgroup_id, "removing it from the watched cgroups")(
                        e,
                    ))
                }
            }
        }
        grace_period();
        let mut inner = self.lock();
        inner.seen_overflow.remove(&cgroup_id);
        match inner.overflow.remove(&cgroup_id) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err(cgroup_id, "removing its overflow counter")(e)),
        }
        let keys: Vec<EpochKey> = inner
            .stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.cgid == cgroup_id)
            .collect();
        for k in keys {
            match inner.stats.remove(&k) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err(cgroup_id, "removing its epoch stats")(e)),
            }
        }
        remove_births(&mut inner, cgroup_id).map_err(map_err(cgroup_id, "removing its processes"))
    }

    fn update_config(
        &self,
        cgroup_id: u64,
        f: impl FnOnce(&mut Config),
    ) -> Result<Config, InspectorError> {
        let mut inner = self.lock();
        let mut cfg = inner
            .watched
            .get(&cgroup_id, 0)
            .map_err(config_err(cgroup_id))?;
        let old = cfg;
        f(&mut cfg);
        inner
            .watched
            .insert(cgroup_id, cfg, 0)
            .map_err(map_err(cgroup_id, "updating its config"))?;
        Ok(old)
    }

    /// Suspends (on) or resumes recording for a sandbox: while suspended (CRIU dump or restore,
    /// whose parasite code makes syscalls in the sandbox's processes), nothing is recorded.
    pub fn suspend(&self, cgroup_id: u64, on: bool) -> Result<(), InspectorError> {
        self.update_config(cgroup_id, |c| c.suspended = u32::from(on))?;
        if on {
            // Programs that saw the config before the update are done when this returns.
            grace_period();
        }
        Ok(())
    }

    /// Closes the current epoch, opens the next one, and returns what happened in the closed
    /// one. Effects of background processes after the switch land in the next epoch. `alive`
    /// tells whether a tgid (initial pid namespace) is still alive, e.g. by kill(pid, 0).
    pub fn end_turn(
        &self,
        cgroup_id: u64,
        alive: &dyn Fn(u32) -> bool,
    ) -> Result<TurnEffects, InspectorError> {
        self.end_turn_quiet(cgroup_id, alive, &|| false)
    }

    /// [`Inspector::end_turn`], skipping the grace period (a global RCU grace period, about
    /// 10 ms) when `quiet` says, *after* the epoch switch, that no process but the sandbox init
    /// is left in the cgroup. That is safe: a task runs its own programs before it leaves its
    /// cgroup at exit (`cgroup_exit` comes after the exit tracepoint), the cgroup's css_set lock
    /// orders those writes before the caller's read of `cgroup.procs`, and the init's own
    /// programs never write epoch stats (it is neither counted nor long-lived).
    pub fn end_turn_quiet(
        &self,
        cgroup_id: u64,
        alive: &dyn Fn(u32) -> bool,
        quiet: &dyn Fn() -> bool,
    ) -> Result<TurnEffects, InspectorError> {
        {
            // Creating the next epoch's stats here saves the BPF side the allocation; if the map
            // is full, the BPF side retries and counts an overflow.
            let mut inner = self.lock();
            if let Ok(cfg) = inner.watched.get(&cgroup_id, 0) {
                let key = EpochKey {
                    cgid: cgroup_id,
                    epoch: cfg.epoch + 1,
                };
                let _ = inner.stats.insert(key, EpochStats::default(), 0);
            }
        }
        let closed = self.update_config(cgroup_id, |c| c.epoch += 1)?.epoch;
        if !quiet() {
            grace_period();
        }

        // After the grace period no program writes to the closed epoch any more: every program
        // that read the old epoch has finished, and later ones see the new one.
        let mut inner = self.lock();
        let key = EpochKey {
            cgid: cgroup_id,
            epoch: closed,
        };
        let mut all = Vec::with_capacity(1);
        let mut live_born = 0;
        match inner.stats.get(&key, 0) {
            Ok(s) => {
                live_born = s.live_born;
                all.push(s);
                match inner.stats.remove(&key) {
                    Ok(()) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(map_err(cgroup_id, "removing its epoch stats")(e)),
                }
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err(cgroup_id, "reading its epoch stats")(e)),
        }
        let mut effects = summarize(&all);

        if live_born > 0 {
            let mut survivors: Vec<u32> = inner
                .births
                .iter()
                .filter_map(Result::ok)
                .filter(|(tgid, b)| b.cgid == cgroup_id && b.epoch == closed && alive(*tgid))
                .map(|(tgid, _)| tgid)
                .collect();
            survivors.sort_unstable();
            effects.survivors = survivors;
        }

        let now = match inner.overflow.get(&cgroup_id, 0) {
            Ok(n) => n,
            Err(e) if is_not_found(&e) => 0,
            Err(e) => return Err(map_err(cgroup_id, "reading its overflow counter")(e)),
        };
        let seen = inner.seen_overflow.insert(cgroup_id, now).unwrap_or(0);
        effects.overflow = now.saturating_sub(seen);
        Ok(effects)
    }

    /// After a CRIU restore: every process of the sandbox now counts as long-lived.
    pub fn mark_all_long_lived(&self, cgroup_id: u64) -> Result<(), InspectorError> {
        let mut inner = self.lock();
        inner
            .watched
            .get(&cgroup_id, 0)
            .map_err(config_err(cgroup_id))?;
        remove_births(&mut inner, cgroup_id)
            .map_err(map_err(cgroup_id, "forgetting its process births"))
    }

    /// BPF map memory of the inspector, from the map definitions: max_entries * (key + value),
    /// per-CPU maps multiplied by the CPUs (the kernel adds its own per-element overhead).
    pub fn map_memory_bytes(&self) -> u64 {
        self.map_bytes
    }

    /// BPF map memory used by one sandbox's entries now: its config, overflow counter, epoch
    /// stats and one entry per process created since it was watched and still running.
    pub fn sandbox_map_bytes(&self, cgroup_id: u64) -> u64 {
        let inner = self.lock();
        let entry = |k: usize, v: usize| (k + v) as u64;
        let mut bytes = 0;
        if inner.watched.get(&cgroup_id, 0).is_ok() {
            bytes += entry(8, std::mem::size_of::<Config>());
        }
        if inner.overflow.get(&cgroup_id, 0).is_ok() {
            bytes += entry(8, 8);
        }
        let stats = inner
            .stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.cgid == cgroup_id)
            .count() as u64;
        bytes += stats
            * entry(
                std::mem::size_of::<EpochKey>(),
                std::mem::size_of::<EpochStats>(),
            );
        let procs = inner
            .births
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, b)| b.cgid == cgroup_id)
            .count() as u64;
        bytes + procs * entry(4, std::mem::size_of::<Birth>())
    }
}

fn remove_births(inner: &mut Inner, cgroup_id: u64) -> Result<(), MapError> {
    let tgids: Vec<u32> = inner
        .births
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, b)| b.cgid == cgroup_id)
        .map(|(tgid, _)| tgid)
        .collect();
    for tgid in tgids {
        match inner.births.remove(&tgid) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Merges epoch stats into TurnEffects; survivors
/// and overflow are filled in by the caller.
fn summarize(all: &[EpochStats]) -> TurnEffects {
    let mut e = TurnEffects::default();
    for s in all {
        for (i, n) in s.fs.iter().enumerate() {
            if *n > 0 {
                e.fs_mutations += n;
                *e.fs_classes
                    .entry(abi::FS_CLASSES[i].to_string())
                    .or_default() += n;
            }
        }
        for (i, n) in s.ipc.iter().enumerate() {
            if *n > 0 {
                *e.ipc.entry(abi::IPC_CLASSES[i].to_string()).or_default() += n;
            }
        }
        e.procs_created = e.procs_created.saturating_add(s.created as u32);
        e.procs_exited = e.procs_exited.saturating_add(s.exited as u32);
        let paths = (s.path_slots as usize).min(abi::NSAMPLES);
        for p in &s.paths[..paths] {
            let p1 = abi::c_str(&p.path);
            let p2 = abi::c_str(&p.path2);
            let call = abi::syscall_name(p.nr);
            let text = match p.class {
                abi::FS_RENAME => format!("{call} {p1} -> {p2}"),
                abi::FS_LINK => format!("{call} {p1} (to {p2})"),
                abi::FS_SYMLINK => format!("{call} {p1}"),
                0 => format!("{call}({}) {p1}", abi::open_flags(p.aux)),
                _ => format!("{call} {p1}"),
            };
            e.fs_samples.push(text);
            let renamed = (p.class == abi::FS_RENAME).then_some(p2);
            for path in std::iter::once(p1).chain(renamed) {
                if !path.is_empty() && !e.sample_paths.contains(&path) {
                    e.sample_paths.push(path);
                }
            }
        }
        let lls = (s.ll_slots as usize).min(abi::NSAMPLES);
        for l in &s.ll[..lls] {
            if l.tgid == 0 || e.long_lived_active.iter().any(|(t, _)| *t == l.tgid) {
                continue;
            }
            e.long_lived_active.push((l.tgid, describe_ll(l)));
        }
    }
    e
}

fn describe_ll(l: &abi::LlSample) -> String {
    let call = abi::syscall_name(l.nr);
    match l.reason {
        abi::LL_READ => format!("read from {} ({call})", abi::kind_name(l.detail)),
        abi::LL_WRITE => format!("wrote to {} ({call})", abi::kind_name(l.detail)),
        abi::LL_FORK => "forked".to_string(),
        abi::LL_THREAD if l.detail == 1 => "ended a thread".to_string(),
        abi::LL_THREAD => "started a thread".to_string(),
        abi::LL_EXEC => "ran execve".to_string(),
        abi::LL_EXIT => "exited".to_string(),
        abi::LL_FS => format!(
            "changed files ({call}: {})",
            abi::FS_CLASSES
                .get(l.detail as usize)
                .copied()
                .unwrap_or("?")
        ),
        abi::LL_IPC => format!(
            "used ipc ({call}: {})",
            abi::IPC_CLASSES
                .get(l.detail as usize)
                .copied()
                .unwrap_or("?")
        ),
        abi::LL_SIGNAL => format!("received signal {} from another process", l.nr),
        _ => format!("did something ({call})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_none_fs_proc() {
        let mut e = TurnEffects::default();
        assert_eq!(verdict(&e), (VerdictKind::None, vec![]));
        e.fs_mutations = 1;
        e.fs_classes.insert("open".into(), 1);
        e.fs_samples
            .push("openat(O_WRONLY|O_CREAT|O_TRUNC) /workspace/a.txt".into());
        let (k, r) = verdict(&e);
        assert_eq!(k, VerdictKind::Fs);
        assert_eq!(
            r[0],
            "fs: openat(O_WRONLY|O_CREAT|O_TRUNC) /workspace/a.txt"
        );
        e.survivors.push(123);
        let (k, r) = verdict(&e);
        assert_eq!(k, VerdictKind::Proc);
        assert_eq!(r, vec!["proc: pid 123 outlives the turn".to_string()]);
        let mut e = TurnEffects {
            overflow: 2,
            ..TurnEffects::default()
        };
        assert_eq!(verdict(&e).1[0], "proc: inspector overflow (2 events lost)");
        e.overflow = 0;
        e.ipc.insert("bind".into(), 1);
        assert_eq!(
            verdict(&e),
            (VerdictKind::Proc, vec!["proc: bind x1".to_string()])
        );
    }

    #[test]
    fn inspector_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Inspector>();
    }

    #[test]
    fn kernel_dev_encoding() {
        // st_dev 0:52 (glibc encoding) is kernel dev 0:52; 8:1 is (8 << 20) | 1.
        assert_eq!(kernel_dev(libc::makedev(0, 52)), 52);
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(259, 300)), (259 << 20) | 300);
    }

    #[test]
    fn syscall_names_match_the_uapi_header() {
        let Ok(h) = std::fs::read_to_string("/usr/include/x86_64-linux-gnu/asm/unistd_64.h") else {
            return;
        };
        for line in h.lines() {
            let mut w = line.split_whitespace();
            if let (Some("#define"), Some(name), Some(nr)) = (w.next(), w.next(), w.next()) {
                let (Some(name), Ok(nr)) = (name.strip_prefix("__NR_"), nr.parse::<u32>()) else {
                    continue;
                };
                let ours = abi::syscall_name(nr);
                assert!(
                    ours == name || ours.starts_with("syscall "),
                    "{nr}: {ours} != {name}"
                );
            }
        }
    }

    #[test]
    fn open_flag_names() {
        assert_eq!(abi::open_flags(0o1101), "O_WRONLY|O_CREAT|O_TRUNC");
        assert_eq!(abi::open_flags(2), "O_RDWR");
    }
}
