//! A recording fake of the runtime, the checkpointer and the inspector, for the engine's unit
//! tests: no root, no processes, no kernel. Pair it with `sandtree_storage::fake::FakeBackend`.
//!
//! Commands are a tiny language so tests can say what a turn does:
//! - `echo X` prints `X`;
//! - a command with `>` or `touch` changes files (verdict fs; the storage fake attached with
//!   [`FakeParts::with_storage`] sees the volume change, as does a file write);
//! - `openw PATH` opens a file for writing and writes nothing (verdict fs, no storage change:
//!   an fs verdict that the checkpoint refutes);
//! - a command ending in `&` starts a background process (verdict proc; it stays alive);
//! - `kill` ends the background processes (verdict proc);
//! - `sleep MS` takes MS milliseconds;
//! - anything else changes nothing (verdict none).
//!
//! It records every call as one line (`"exec ep-…-0 echo hi"`), and every use of a sandbox that
//! was never started or was already destroyed as a violation: the engine must never do that.
//!
//! Fault injection: [`FakeParts::fail_next`] makes the next call of one operation (`start`,
//! `restore`, `dump`, `exec`, `freeze`, `destroy`, `sync`) fail, and [`FakeParts::fail_after`]
//! makes every operation after the next `n` fail. An injected failure changes no state.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use sandtree_branching::{Verdict, VerdictKind, VolumeName};
use sandtree_storage::fake::FakeBackend;
use sandtree_storage::SnapshotBackend;

use crate::ports::{
    Checkpointer, Chunk, DedupError, DumpStats, ExecOutcome, ExecRequest, FileOp, FileOutcome,
    Inspector, InspectorStatus, Limits, NodeFiles, RestoreStats, SandboxRuntime,
};

/// What an injected failure says.
pub const INJECTED: &str = "injected fault";

#[derive(Debug, Default, Clone)]
struct Sandbox {
    frozen: bool,
    /// A background process is alive.
    procs: bool,
    /// What the turn since the last verdict did.
    effect: Option<VerdictKind>,
    files: HashMap<String, Vec<u8>>,
    watched: bool,
}

#[derive(Debug, Default)]
struct State {
    sandboxes: HashMap<String, Sandbox>,
    destroyed: HashSet<String>,
    calls: Vec<String>,
    violations: Vec<String>,
    ops: u64,
    fail_after: Option<u64>,
    fail_next: Vec<String>,
    /// Each dump takes this long (so a test can catch a checkpoint in flight).
    dump_ms: u64,
}

/// The fake. See the module docs.
#[derive(Debug)]
pub struct FakeParts {
    state: Mutex<State>,
    limits: Limits,
    /// The storage fake whose volumes the sandboxes' writes change.
    storage: Option<Arc<FakeBackend>>,
}

impl Default for FakeParts {
    fn default() -> Self {
        FakeParts {
            storage: None,
            state: Mutex::default(),
            limits: Limits {
                memory_bytes: 2 << 30,
                pids: 512,
                cpu_quota_us: 100_000,
            },
        }
    }
}

impl FakeParts {
    pub fn new() -> FakeParts {
        FakeParts::default()
    }

    /// A fake whose file changes (`>`, `touch`, file writes) mark the sandbox's volume changed
    /// in `storage` ([`FakeBackend::write`]), as real writes would.
    pub fn with_storage(storage: Arc<FakeBackend>) -> FakeParts {
        FakeParts {
            storage: Some(storage),
            ..FakeParts::default()
        }
    }

    /// Tells the storage fake that `sb`'s volume changed.
    fn wrote(&self, sb: &VolumeName, bytes: u64) {
        if let Some(st) = &self.storage {
            let _ = st.write(&sb.to_string(), bytes);
        }
    }

    /// Every call so far, one line each.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Uses of sandboxes that were not running (never started, or destroyed).
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// Sandboxes running now.
    pub fn running(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().sandboxes.keys().cloned().collect();
        v.sort();
        v
    }

    /// The next call of `op` fails.
    pub fn fail_next(&self, op: &str) {
        self.lock().fail_next.push(op.to_string());
    }

    /// Every operation after the next `n` fails.
    pub fn fail_after(&self, n: u64) {
        let mut s = self.lock();
        s.fail_after = Some(s.ops + n);
    }

    /// Every dump from now on takes `ms` milliseconds.
    pub fn slow_dumps(&self, ms: u64) {
        self.lock().dump_ms = ms;
    }

    /// No more injected failures.
    pub fn heal(&self) {
        let mut s = self.lock();
        s.fail_after = None;
        s.fail_next.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake state lock")
    }

    /// Records the call and fails it if a fault is due.
    fn begin(&self, op: &str, line: String) -> anyhow::Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.lock();
        s.calls.push(line);
        s.ops += 1;
        if let Some(i) = s.fail_next.iter().position(|o| o == op) {
            s.fail_next.remove(i);
            bail!("{op}: {INJECTED}");
        }
        if s.fail_after.is_some_and(|n| s.ops > n) {
            bail!("{op}: {INJECTED}");
        }
        Ok(s)
    }

    /// The running sandbox `sb`, or a violation.
    fn running_mut<'a>(
        s: &'a mut State,
        op: &str,
        sb: &VolumeName,
    ) -> anyhow::Result<&'a mut Sandbox> {
        let name = sb.to_string();
        if !s.sandboxes.contains_key(&name) {
            let why = if s.destroyed.contains(&name) {
                "destroyed"
            } else {
                "never started"
            };
            s.violations.push(format!("{op} on {name}, which is {why}"));
            bail!("{op}: sandbox {name} is {why}");
        }
        Ok(s.sandboxes.get_mut(&name).expect("checked"))
    }
}

impl SandboxRuntime for FakeParts {
    fn start(&self, sb: &VolumeName, root: &Path, _: Option<Limits>) -> anyhow::Result<()> {
        let mut s = self.begin("start", format!("start {sb}"))?;
        if !root.is_dir() {
            bail!("start {sb}: root {} is not a directory", root.display());
        }
        let name = sb.to_string();
        if s.sandboxes.contains_key(&name) {
            s.violations.push(format!("start {name}, which is running"));
            bail!("sandbox {name} is running");
        }
        s.destroyed.remove(&name);
        s.sandboxes.insert(name, Sandbox::default());
        Ok(())
    }

    fn exec(
        &self,
        sb: &VolumeName,
        req: ExecRequest,
        on_output: &mut dyn FnMut(Chunk),
    ) -> anyhow::Result<ExecOutcome> {
        let cmd = req.command.trim().to_string();
        let sleep = cmd
            .strip_prefix("sleep ")
            .and_then(|ms| ms.trim().parse::<u64>().ok());
        {
            let mut s = self.begin("exec", format!("exec {sb} {cmd}"))?;
            let box_ = Self::running_mut(&mut s, "exec", sb)?;
            if box_.frozen {
                bail!("exec {sb}: the sandbox is frozen");
            }
        }
        if let Some(ms) = sleep {
            std::thread::sleep(Duration::from_millis(ms));
        }
        let mut s = self.lock();
        // Destroyed while the command ran: the engine let a teardown overlap a step.
        let box_ = Self::running_mut(&mut s, "exec (end)", sb)?;
        let mut stdout = Vec::new();
        let mut wrote = false;
        let effect = if cmd.ends_with('&') {
            box_.procs = true;
            VerdictKind::Proc
        } else if cmd == "kill" {
            box_.procs = false;
            VerdictKind::Proc
        } else if cmd.contains('>') || cmd.starts_with("touch") {
            box_.files.insert(cmd.clone(), Vec::new());
            wrote = true;
            VerdictKind::Fs
        } else if cmd.starts_with("openw") {
            VerdictKind::Fs
        } else {
            if let Some(x) = cmd.strip_prefix("echo ") {
                stdout = format!("{x}\n").into_bytes();
            }
            VerdictKind::None
        };
        box_.effect = Some(match (box_.effect, effect) {
            (Some(VerdictKind::Proc), _) | (_, VerdictKind::Proc) => VerdictKind::Proc,
            (Some(VerdictKind::Fs), _) | (_, VerdictKind::Fs) => VerdictKind::Fs,
            _ => VerdictKind::None,
        });
        drop(s);
        if wrote {
            self.wrote(sb, 4096);
        }
        if req.stream && !stdout.is_empty() {
            on_output(Chunk::Stdout(stdout.clone()));
        }
        Ok(ExecOutcome {
            stdout,
            cwd: Some(req.cwd),
            env: Some(req.env),
            ..Default::default()
        })
    }

    fn file(&self, sb: &VolumeName, path: &str, op: FileOp) -> anyhow::Result<FileOutcome> {
        let mut s = self.begin("file", format!("file {sb} {path}"))?;
        let box_ = Self::running_mut(&mut s, "file", sb)?;
        Ok(match op {
            FileOp::Write { data, .. } => {
                let n = data.len() as u64;
                box_.files.insert(path.to_string(), data);
                box_.effect = Some(VerdictKind::Fs);
                drop(s);
                self.wrote(sb, n);
                FileOutcome::Written
            }
            FileOp::Read { max_bytes } => match box_.files.get(path) {
                Some(d) => FileOutcome::Read {
                    data: d[..d.len().min(max_bytes as usize)].to_vec(),
                    size: d.len() as u64,
                },
                None => FileOutcome::Failed {
                    errno: libc::ENOENT,
                    message: format!("{path}: no such file"),
                },
            },
        })
    }

    fn freeze(&self, sb: &VolumeName, frozen: bool) -> anyhow::Result<()> {
        let mut s = self.begin("freeze", format!("freeze {sb} {frozen}"))?;
        Self::running_mut(&mut s, "freeze", sb)?.frozen = frozen;
        Ok(())
    }

    fn request_freeze(&self, sb: &VolumeName) -> anyhow::Result<()> {
        let mut s = self.begin("freeze", format!("request_freeze {sb}"))?;
        Self::running_mut(&mut s, "request_freeze", sb)?.frozen = true;
        Ok(())
    }

    fn sync_rootfs(&self, sb: &VolumeName) -> anyhow::Result<()> {
        let mut s = self.begin("sync", format!("sync {sb}"))?;
        Self::running_mut(&mut s, "sync", sb)?;
        Ok(())
    }

    fn destroy(&self, sb: &VolumeName) -> anyhow::Result<()> {
        let mut s = self.begin("destroy", format!("destroy {sb}"))?;
        let name = sb.to_string();
        Self::running_mut(&mut s, "destroy", sb)?;
        s.sandboxes.remove(&name);
        s.destroyed.insert(name);
        Ok(())
    }

    fn reap_leftovers(&self) -> usize {
        0
    }

    fn release(&self) {
        self.lock().calls.push("release".into());
    }

    fn max_limits(&self) -> Limits {
        self.limits
    }

    /// 1 MiB for a running sandbox, 8 MiB more with a background process. A read that may race
    /// a teardown: None for a sandbox that is not running, and no violation.
    fn memory_rss(&self, sb: &VolumeName) -> Option<u64> {
        let s = self.lock();
        let b = s.sandboxes.get(&sb.to_string())?;
        Some(if b.procs { 9 << 20 } else { 1 << 20 })
    }
}

impl Checkpointer for FakeParts {
    fn seizable(&self, sb: &VolumeName) -> anyhow::Result<()> {
        let mut s = self.begin("seizable", format!("seizable {sb}"))?;
        Self::running_mut(&mut s, "seizable", sb)?;
        Ok(())
    }

    fn dump(
        &self,
        sb: &VolumeName,
        images: &Path,
        frozen_instant: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<DumpStats> {
        let delay = {
            let mut s = self.begin("dump", format!("dump {sb}"))?;
            Self::running_mut(&mut s, "dump", sb)?;
            s.dump_ms
        };
        std::thread::sleep(Duration::from_millis(delay));
        std::fs::create_dir_all(images)?;
        std::fs::write(images.join("pages-1.img"), vec![0u8; 4096])?;
        frozen_instant().map_err(|e| anyhow!("post-dump hook: {e:#}"))?;
        Ok(DumpStats {
            image_bytes: 4096,
            dump_ms: 1.0,
            hook_ms: 0.5,
        })
    }

    fn restore(
        &self,
        sb: &VolumeName,
        images: &Path,
        root: &Path,
        _: Option<Limits>,
        _merge: bool,
    ) -> anyhow::Result<RestoreStats> {
        let mut s = self.begin("restore", format!("restore {sb} {}", images.display()))?;
        if !images.join("pages-1.img").is_file() {
            bail!("restore {sb}: no image at {}", images.display());
        }
        if !root.is_dir() {
            bail!("restore {sb}: root {} is not a directory", root.display());
        }
        let name = sb.to_string();
        if s.sandboxes.contains_key(&name) {
            s.violations
                .push(format!("restore {name}, which is running"));
            bail!("sandbox {name} is running");
        }
        s.destroyed.remove(&name);
        s.sandboxes.insert(
            name,
            Sandbox {
                procs: true,
                ..Default::default()
            },
        );
        Ok(RestoreStats::default())
    }

    fn dedup(&self, images: &Path, parent: &Path, _: usize) -> Result<usize, DedupError> {
        self.lock()
            .calls
            .push(format!("dedup {} {}", images.display(), parent.display()));
        Ok(0)
    }

    fn image_bytes(&self, images: &Path) -> u64 {
        std::fs::read_dir(images)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn make_durable(&self, images: &Path) -> anyhow::Result<()> {
        let _s = self.begin("durable", format!("durable {}", images.display()))?;
        Ok(())
    }

    fn discard_failed(&self, images: &Path, log_name: &str) {
        self.lock()
            .calls
            .push(format!("discard {} {log_name}", images.display()));
        let _ = std::fs::remove_dir_all(images);
    }

    fn remove(&self, images: &Path) {
        self.lock()
            .calls
            .push(format!("remove {}", images.display()));
        let _ = std::fs::remove_dir_all(images);
    }
}

impl Inspector for FakeParts {
    fn attach(&self, sb: &VolumeName, _restored: bool) {
        let mut s = self.lock();
        s.calls.push(format!("attach {sb}"));
        if let Ok(b) = Self::running_mut(&mut s, "attach", sb) {
            b.watched = true;
        }
    }

    fn detach(&self, sb: &VolumeName) {
        let mut s = self.lock();
        s.calls.push(format!("detach {sb}"));
        if let Some(b) = s.sandboxes.get_mut(&sb.to_string()) {
            b.watched = false;
        }
    }

    fn judge(
        &self,
        sb: &VolumeName,
        _storage: &dyn SnapshotBackend,
    ) -> anyhow::Result<(Verdict, bool)> {
        let mut s = self.begin("judge", format!("judge {sb}"))?;
        let b = Self::running_mut(&mut s, "judge", sb)?;
        let kind = b.effect.take().unwrap_or(VerdictKind::None);
        Ok((
            Verdict {
                kind,
                reasons: vec![format!("fake: {kind:?}")],
            },
            b.procs,
        ))
    }

    fn observe(&self, sb: &VolumeName) -> Option<Verdict> {
        let mut s = self.lock();
        s.calls.push(format!("observe {sb}"));
        let b = Self::running_mut(&mut s, "observe", sb).ok()?;
        let kind = b.effect.take()?;
        Some(Verdict {
            kind,
            reasons: vec![],
        })
    }

    fn dump_window(
        &self,
        sb: &VolumeName,
        dump: &mut dyn FnMut() -> anyhow::Result<DumpStats>,
    ) -> anyhow::Result<DumpStats> {
        self.lock().calls.push(format!("dump_window {sb}"));
        dump()
    }

    fn status(&self) -> InspectorStatus {
        InspectorStatus {
            description: "fake".into(),
            ..Default::default()
        }
    }
}

/// The fake keeps no file trees: node bundles are not supported on it.
impl NodeFiles for FakeParts {
    fn digest(&self, _root: &Path) -> anyhow::Result<String> {
        bail!("the fake has no file trees to bundle")
    }
    fn write_delta(
        &self,
        _base: &Path,
        _root: &Path,
        _tar: &mut dyn std::io::Write,
        _whiteouts: &mut dyn std::io::Write,
    ) -> anyhow::Result<u64> {
        bail!("the fake has no file trees to bundle")
    }
    fn apply_delta(
        &self,
        _root: &Path,
        _whiteouts: &[u8],
        _tar: &mut dyn std::io::Read,
    ) -> anyhow::Result<()> {
        bail!("the fake has no file trees to bundle")
    }
    fn write_images(&self, _images: &Path, _tar: &mut dyn std::io::Write) -> anyhow::Result<u64> {
        bail!("the fake has no file trees to bundle")
    }
    fn read_images(&self, _images: &Path, _tar: &mut dyn std::io::Read) -> anyhow::Result<()> {
        bail!("the fake has no file trees to bundle")
    }
}
