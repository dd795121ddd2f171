//! The real parts behind the engine's traits: `sandtree-runtime`'s sandbox runtime, CRIU driver,
//! page dedup and inspector facade. The engine names a sandbox by its volume; this keeps the
//! runtime's handle (init pid, cgroups, rootfs) and the inspector's watch behind that name.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::anyhow;
use sandtree_branching::{Verdict, VolumeName};
use sandtree_engine::ports::{
    Checkpointer, Chunk, DedupError, DumpStats, ExecOutcome, ExecRequest, FileOp, FileOutcome,
    Inspector, InspectorStatus, Limits, NodeFiles, RestoreStats, SandboxRuntime,
};
use sandtree_runtime::inspect::{Verdicts, Watch};
use sandtree_runtime::{cgroup, pages, shim, Runtime, Sandbox};
use sandtree_storage::SnapshotBackend;

/// One host's runtime, CRIU and inspector, as the engine's [`sandtree_engine::Parts`].
pub struct Host {
    pub runtime: Runtime,
    pub verdicts: Verdicts,
    sandboxes: Mutex<HashMap<String, (Sandbox, Watch)>>,
    /// `serve --ksm`: warm copies are restored with KSM merging on.
    ksm: bool,
}

impl Host {
    pub fn new(runtime: Runtime, verdicts: Verdicts, ksm: bool) -> Arc<Host> {
        Arc::new(Host {
            runtime,
            verdicts,
            ksm,
            sandboxes: Mutex::default(),
        })
    }

    pub fn parts(self: &Arc<Host>) -> sandtree_engine::Parts {
        sandtree_engine::Parts {
            runtime: self.clone(),
            checkpointer: self.clone(),
            inspector: self.clone(),
            files: self.clone(),
        }
    }

    fn get(&self, sb: &VolumeName) -> anyhow::Result<(Sandbox, Watch)> {
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .get(&sb.to_string())
            .cloned()
            .ok_or_else(|| anyhow!("sandbox {sb} is not running"))
    }

    fn insert(&self, sb: &VolumeName, sandbox: Sandbox) {
        self.sandboxes
            .lock()
            .expect("sandboxes lock")
            .insert(sb.to_string(), (sandbox, Watch { cgroup_id: None }));
    }
}

fn limits(l: Option<Limits>) -> Option<cgroup::Limits> {
    l.map(|l| cgroup::Limits {
        memory_bytes: l.memory_bytes,
        pids: l.pids,
        cpu_quota_us: l.cpu_quota_us,
    })
}

impl SandboxRuntime for Host {
    fn start(&self, sb: &VolumeName, root: &Path, l: Option<Limits>) -> anyhow::Result<()> {
        let sandbox = self.runtime.start(&sb.to_string(), root, limits(l))?;
        self.insert(sb, sandbox);
        Ok(())
    }

    fn exec(
        &self,
        sb: &VolumeName,
        req: ExecRequest,
        on_output: &mut dyn FnMut(Chunk),
    ) -> anyhow::Result<ExecOutcome> {
        let (sandbox, _) = self.get(sb)?;
        let spec = shim::ExecSpec {
            seccomp: Default::default(),
            init_pid: 0,
            v2_cgroup: Default::default(),
            procs_files: Vec::new(),
            turn: req.turn,
            command: req.command,
            cwd: req.cwd,
            env: req.env,
            timeout_ms: req.timeout_ms,
            out_cap: req.out_cap,
            stdin: req.stdin,
            stream: req.stream,
            user: req.user,
            cwd_strict: req.cwd_strict,
        };
        let r = self.runtime.exec(&sandbox, spec, &mut |ev| match ev {
            shim::ShimEvent::Stdout(b) => on_output(Chunk::Stdout(b)),
            shim::ShimEvent::Stderr(b) => on_output(Chunk::Stderr(b)),
            shim::ShimEvent::Done(_) => {}
        })?;
        Ok(ExecOutcome {
            stdout: r.stdout,
            stderr: r.stderr,
            stdout_truncated: r.stdout_truncated,
            stderr_truncated: r.stderr_truncated,
            exit_code: r.exit_code,
            duration_ms: r.duration_ms,
            timed_out: r.timed_out,
            cwd: r.cwd,
            env: r.env,
        })
    }

    fn file(&self, sb: &VolumeName, path: &str, op: FileOp) -> anyhow::Result<FileOutcome> {
        let (sandbox, _) = self.get(sb)?;
        let op = match op {
            FileOp::Write { data, mode } => shim::FileOp::Write { data, mode },
            FileOp::Read { max_bytes } => shim::FileOp::Read { max_bytes },
        };
        Ok(match self.runtime.file(&sandbox, path, op)? {
            shim::FileResult::Written => FileOutcome::Written,
            shim::FileResult::Read { data, size } => FileOutcome::Read { data, size },
            shim::FileResult::Failed { errno, message } => FileOutcome::Failed { errno, message },
        })
    }

    fn freeze(&self, sb: &VolumeName, frozen: bool) -> anyhow::Result<()> {
        let (sandbox, _) = self.get(sb)?;
        Ok(sandbox.cgroup.freeze(frozen)?)
    }

    fn request_freeze(&self, sb: &VolumeName) -> anyhow::Result<()> {
        let (sandbox, _) = self.get(sb)?;
        Ok(sandbox.cgroup.request_freeze()?)
    }

    fn memory_rss(&self, sb: &VolumeName) -> Option<u64> {
        let (sandbox, _) = self.get(sb).ok()?;
        sandbox.cgroup.memory_rss()
    }

    fn sync_rootfs(&self, sb: &VolumeName) -> anyhow::Result<()> {
        let (sandbox, _) = self.get(sb)?;
        sandtree_runtime::sync_fs(&sandbox.rootfs)
    }

    fn destroy(&self, sb: &VolumeName) -> anyhow::Result<()> {
        // Forgotten at `detach`, which the engine calls next with the inspector's watch.
        let (sandbox, _) = self.get(sb)?;
        self.runtime.destroy(&sandbox)
    }

    fn reap_leftovers(&self) -> usize {
        self.runtime.reap_leftovers().len()
    }

    fn release(&self) {
        self.runtime.layout.remove_parents();
    }

    fn max_limits(&self) -> Limits {
        let l = self.runtime.limits;
        Limits {
            memory_bytes: l.memory_bytes,
            pids: l.pids,
            cpu_quota_us: l.cpu_quota_us,
        }
    }
}

impl Checkpointer for Host {
    fn seizable(&self, sb: &VolumeName) -> anyhow::Result<()> {
        let (sandbox, _) = self.get(sb)?;
        self.runtime.seizable(&sandbox)
    }

    fn dump(
        &self,
        sb: &VolumeName,
        images: &Path,
        frozen_instant: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<DumpStats> {
        let (sandbox, _) = self.get(sb)?;
        std::fs::create_dir_all(images)?;
        let s = self.runtime.checkpoint(&sandbox, images, || {
            frozen_instant().map_err(|e| format!("{e:#}"))
        })?;
        Ok(DumpStats {
            image_bytes: s.image_bytes,
            dump_ms: s.dump_ms,
            hook_ms: s.hook_ms,
        })
    }

    fn restore(
        &self,
        sb: &VolumeName,
        images: &Path,
        root: &Path,
        l: Option<Limits>,
        merge: bool,
    ) -> anyhow::Result<RestoreStats> {
        let merge = merge && self.ksm;
        let (sandbox, took) =
            self.runtime
                .restore(&sb.to_string(), images, root, limits(l), merge)?;
        self.insert(sb, sandbox);
        Ok(RestoreStats {
            criu_ms: took.as_secs_f64() * 1e3,
        })
    }

    fn dedup(&self, images: &Path, parent: &Path, max_chain: usize) -> Result<usize, DedupError> {
        match pages::dedup_against(images, parent, max_chain) {
            Ok(s) => Ok(s.depth),
            Err(e @ pages::PagesError::Inconsistent { .. }) => {
                Err(DedupError::Inconsistent(e.to_string()))
            }
            Err(e) => Err(DedupError::Skipped(e.to_string())),
        }
    }

    fn image_bytes(&self, images: &Path) -> u64 {
        sandtree_runtime::criu::dir_bytes(images)
    }

    fn make_durable(&self, images: &Path) -> anyhow::Result<()> {
        sandtree_runtime::sync_dir(images)
    }

    fn discard_failed(&self, images: &Path, log_name: &str) {
        // Keep CRIU's log for the operator; the partial images go.
        let logs = images.parent().unwrap_or(images).join("failed-logs");
        let _ = std::fs::create_dir_all(&logs);
        let _ = std::fs::rename(images.join("dump.log"), logs.join(log_name));
        let _ = std::fs::remove_dir_all(images);
    }

    fn remove(&self, images: &Path) {
        let _ = std::fs::remove_dir_all(images);
    }
}

impl Inspector for Host {
    fn attach(&self, sb: &VolumeName, restored: bool) {
        let mut all = self.sandboxes.lock().expect("sandboxes lock");
        if let Some((sandbox, watch)) = all.get_mut(&sb.to_string()) {
            *watch = self.verdicts.attach(sandbox, restored);
        }
    }

    fn detach(&self, sb: &VolumeName) {
        // The last call for a sandbox (after destroy): forget it here.
        let gone = self
            .sandboxes
            .lock()
            .expect("sandboxes lock")
            .remove(&sb.to_string());
        if let Some((_, w)) = gone {
            self.verdicts.detach(w);
        }
    }

    fn judge(
        &self,
        sb: &VolumeName,
        storage: &dyn SnapshotBackend,
    ) -> anyhow::Result<(Verdict, bool)> {
        let (sandbox, watch) = self.get(sb)?;
        let (v, others) = self
            .verdicts
            .judge(watch, &sandbox, storage, &sb.to_string())?;
        Ok((v, !others.is_empty()))
    }

    fn observe(&self, sb: &VolumeName) -> Option<Verdict> {
        let (sandbox, watch) = self.get(sb).ok()?;
        self.verdicts.observe(watch, &sandbox)
    }

    fn dump_window(
        &self,
        sb: &VolumeName,
        dump: &mut dyn FnMut() -> anyhow::Result<DumpStats>,
    ) -> anyhow::Result<DumpStats> {
        let (sandbox, watch) = self.get(sb)?;
        self.verdicts.dump_window(watch, &sandbox, dump)
    }

    fn status(&self) -> InspectorStatus {
        let v = &self.verdicts;
        let (watched, bytes) = v.sandbox_map_bytes();
        let c = v.counts();
        InspectorStatus {
            description: v.status(),
            loaded: v.inspector_loaded(),
            map_bytes: v.map_memory_bytes(),
            watched_sandboxes: watched,
            sandbox_map_bytes: bytes,
            verdicts_checked: c.checked,
            verdicts_unsafe: c.unsafe_disagreements,
            verdicts_fs_without_change: c.fs_without_change,
        }
    }
}

/// Node bundles' file trees: `sandtree_runtime::bundle`, whose writes go through the image
/// importer's confined writer.
impl NodeFiles for Host {
    fn digest(&self, root: &Path) -> anyhow::Result<String> {
        sandtree_runtime::bundle::digest(root)
    }
    fn write_delta(
        &self,
        base: &Path,
        root: &Path,
        tar: &mut dyn std::io::Write,
        whiteouts: &mut dyn std::io::Write,
    ) -> anyhow::Result<u64> {
        let c = sandtree_runtime::bundle::write_delta(base, root, tar, whiteouts)?;
        if c.skipped > 0 {
            tracing::info!(
                skipped = c.skipped,
                "sockets and device nodes left out of a delta"
            );
        }
        Ok(c.entries)
    }
    fn apply_delta(
        &self,
        root: &Path,
        whiteouts: &[u8],
        tar: &mut dyn std::io::Read,
    ) -> anyhow::Result<()> {
        sandtree_runtime::bundle::apply_delta(root, whiteouts, Box::new(tar))
    }
    fn write_images(&self, images: &Path, tar: &mut dyn std::io::Write) -> anyhow::Result<u64> {
        sandtree_runtime::bundle::write_images(images, tar)
    }
    fn read_images(&self, images: &Path, tar: &mut dyn std::io::Read) -> anyhow::Result<()> {
        sandtree_runtime::bundle::read_images(images, Box::new(tar))
    }
}

#[cfg(test)]
mod tests {
    /// The engine checks requests against the same limits the shim enforces.
    #[test]
    fn engine_limits_match_the_shim() {
        use sandtree_runtime::{cgroup, shim};
        assert_eq!(sandtree_engine::MAX_FILE_BYTES, shim::MAX_FILE_BYTES);
        assert_eq!(sandtree_engine::MAX_ENV_BYTES, shim::MAX_ENV_BYTES);
        assert_eq!(sandtree_engine::MAX_CWD_BYTES, shim::MAX_CWD_BYTES);
        assert_eq!(sandtree_engine::ports::CPU_PERIOD_US, cgroup::CPU_PERIOD_US);
    }
}
