//! The sandbox runtime: sandtree's own, built on namespaces, cgroups, seccomp and CRIU.
//!
//! Why not runc: restores must go into fresh namespaces on a clone of a node's snapshot with the
//! filesystem snapshot taken inside CRIU's post-dump notification, and runc's checkpoint/restore
//! costs about 2x raw CRIU here (MACHINE-NOTES). Owning the runtime keeps both in one process and
//! lets the inspector key on a cgroup we create.
//!
//! Privileged effects live in three modules: [`shim`] (namespaces, mounts, pivot_root, exec),
//! [`cgroup`] (cgroup writes) and [`crate::criu`] (CRIU). This module only sequences them.

pub mod bundle;
pub mod cgroup;
pub mod confine;
pub mod criu;
pub mod images;
pub mod inspect;
pub mod pages;
pub mod shim;

/// Entry points for the fuzz targets in `service/fuzz` (cargo-fuzz): parsers that read bytes a
/// sandbox or an image controls, reachable without the rest of the runtime. Public only for those
/// targets; not part of the crate's API. The CRIU page map reader needs nothing here: `pages` is
/// public already.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    /// The shim's parser of a shell's saved environment (`env -0` output).
    pub fn parse_environ(bytes: &[u8]) -> Vec<(String, String)> {
        crate::shim::parse_environ(bytes)
    }

    /// `image import` of `source` (a tar, tar.gz, docker-save or OCI archive, or a directory)
    /// into the empty directory `root`, without a storage backend: the same code that fills a
    /// new base. A staging directory is made beside `root` and removed again. Privileged (it
    /// chowns); give it throwaway directories only.
    pub fn import_into_dir(
        root: &Path,
        source: &Path,
        allow_setuid: bool,
    ) -> anyhow::Result<crate::images::ImageConfig> {
        let source = source.canonicalize()?;
        let is_dir = source.is_dir();
        let opts = crate::images::ImportOptions { allow_setuid };
        let mut config = crate::images::ImageConfig::default();
        crate::images::populate_import(root, &source, is_dir, opts, &|_| {}, &mut config)?;
        Ok(config)
    }
}

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::criu::{Criu, DumpStats};
use cgroup::{Cgroup, Layout, Limits};
pub use shim::{ExecResult, ExecSpec};

/// One running sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Host pid of its pid-namespace init.
    pub init_pid: u32,
    pub cgroup: Cgroup,
    pub rootfs: PathBuf,
}

#[derive(Debug)]
pub struct Runtime {
    pub layout: Layout,
    pub criu: Criu,
    pub limits: Limits,
    exe: PathBuf,
}

impl Runtime {
    /// `instance` separates the cgroups of several services on one host (derived from the data dir).
    pub fn new(instance: &str, limits: Limits) -> Result<Runtime> {
        Ok(Runtime {
            layout: Layout::detect(instance)?,
            criu: Criu::locate(),
            limits,
            exe: std::env::current_exe().context("locate own executable for the shim")?,
        })
    }

    fn shim<T: serde::de::DeserializeOwned>(
        &self,
        mode: &str,
        spec: &impl serde::Serialize,
    ) -> Result<T> {
        let mut last = None;
        self.shim_lines(mode, spec, &mut |line| {
            last = Some(line.to_vec());
            Ok(())
        })?;
        serde_json::from_slice(&last.context("the shim printed nothing")?)
            .context("parse shim output")
    }

    /// Runs the shim and hands each line it prints to `on_line` as it comes.
    fn shim_lines(
        &self,
        mode: &str,
        spec: &impl serde::Serialize,
        on_line: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        use std::io::BufRead;
        let mut child = Command::new(&self.exe)
            .args(["__shim", mode])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "off")
            .spawn()
            .context("spawn shim")?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(&serde_json::to_vec(spec)?)?;
        // stderr is read on its own thread so that a chatty shim cannot block on a full pipe.
        let mut err = child.stderr.take().expect("piped");
        let err = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = std::io::Read::read_to_end(&mut err, &mut s);
            s
        });
        let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
        let mut line = Vec::new();
        let mut failed = None;
        loop {
            line.clear();
            if out.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if failed.is_none() {
                if let Err(e) = on_line(line.strip_suffix(b"\n").unwrap_or(&line)) {
                    failed = Some(e);
                }
            }
        }
        let status = child.wait()?;
        let stderr = err.join().unwrap_or_default();
        if !status.success() {
            bail!(
                "{}",
                String::from_utf8_lossy(&stderr)
                    .trim()
                    .trim_start_matches("Error: ")
            );
        }
        failed.map_or(Ok(()), Err)
    }

    /// Creates a sandbox on `rootfs` (a mounted volume), with `limits` or the runtime's.
    pub fn start(&self, name: &str, rootfs: &Path, limits: Option<Limits>) -> Result<Sandbox> {
        let cgroup = self.layout.create(name, limits.unwrap_or(self.limits))?;
        let spec = shim::StartSpec {
            seccomp: confine::Seccomp::get().map_err(|e| anyhow::anyhow!("seccomp: {e}"))?,
            rootfs: rootfs.to_path_buf(),
            hostname: "sandbox".into(),
            procs_files: cgroup.procs_files(),
        };
        match self.shim::<shim::Started>("start", &spec) {
            Ok(s) => Ok(Sandbox {
                init_pid: s.init_pid,
                cgroup,
                rootfs: rootfs.into(),
            }),
            Err(e) => {
                let _ = cgroup.destroy();
                Err(e.context(format!("start sandbox {name}")))
            }
        }
    }

    /// Runs one turn's command in the sandbox. With `spec.stream`, `on_chunk` gets stdout and
    /// stderr chunks while it runs.
    pub fn exec(
        &self,
        sb: &Sandbox,
        mut spec: ExecSpec,
        on_chunk: &mut dyn FnMut(shim::ShimEvent),
    ) -> Result<ExecResult> {
        spec.seccomp = confine::Seccomp::get().map_err(|e| anyhow::anyhow!("seccomp: {e}"))?;
        spec.init_pid = sb.init_pid;
        spec.v2_cgroup = sb.cgroup.v2.clone();
        spec.procs_files = sb.cgroup.procs_files();
        let mut result = None;
        self.shim_lines("exec", &spec, &mut |line| {
            match serde_json::from_slice(line).context("parse shim output")? {
                shim::ShimEvent::Done(r) => result = Some(r),
                ev => on_chunk(ev),
            }
            Ok(())
        })?;
        result.context("the shim ended without a result")
    }

    /// Writes or reads a file inside the sandbox, as a process of the sandbox would.
    pub fn file(&self, sb: &Sandbox, path: &str, op: shim::FileOp) -> Result<shim::FileResult> {
        let spec = shim::FileSpec {
            seccomp: confine::Seccomp::get().map_err(|e| anyhow::anyhow!("seccomp: {e}"))?,
            init_pid: sb.init_pid,
            v2_cgroup: sb.cgroup.v2.clone(),
            procs_files: sb.cgroup.procs_files(),
            path: path.to_string(),
            op,
        };
        self.shim("file", &spec)
    }

    /// Waits (up to [`crate::criu::VFORK_GRACE`]) until CRIU can seize every task of the
    /// sandbox: none is blocked in vfork. Checked before a dump, which would otherwise keep the
    /// sandbox ptrace-stopped for CRIU's 10 s seize timeout and fail anyway.
    pub fn seizable(&self, sb: &Sandbox) -> Result<()> {
        Ok(crate::criu::wait_seizable(
            sb.init_pid,
            crate::criu::VFORK_GRACE,
        )?)
    }

    /// CRIU dump (leave running); `post_dump` runs while the sandbox is frozen.
    pub fn checkpoint(
        &self,
        sb: &Sandbox,
        images: &Path,
        post_dump: impl FnMut() -> Result<(), String>,
    ) -> Result<DumpStats> {
        Ok(self.criu.dump(sb.init_pid, images, post_dump)?)
    }

    /// CRIU restore of `images` onto `rootfs`, in a fresh cgroup named `name` (KSM merging on
    /// for the restored tasks when `merge`). Returns the sandbox and CRIU's own time.
    pub fn restore(
        &self,
        name: &str,
        images: &Path,
        rootfs: &Path,
        limits: Option<Limits>,
        merge: bool,
    ) -> Result<(Sandbox, std::time::Duration)> {
        let cgroup = self.layout.create(name, limits.unwrap_or(self.limits))?;
        match self.criu.restore(
            images,
            rootfs,
            &cgroup.procs_files(),
            &format!("restore-{name}.log"),
            merge,
        ) {
            Ok((pid, took)) => Ok((
                Sandbox {
                    init_pid: pid,
                    cgroup,
                    rootfs: rootfs.into(),
                },
                took,
            )),
            Err(e) => {
                let _ = cgroup.destroy();
                Err(anyhow::Error::from(e).context(format!("restore sandbox {name}")))
            }
        }
    }

    /// Kills every process of the sandbox and removes its cgroups.
    pub fn destroy(&self, sb: &Sandbox) -> Result<()> {
        sb.cgroup.destroy()?;
        Ok(())
    }

    /// Kills and removes sandboxes left by an earlier run of this instance. Returns their names.
    pub fn reap_leftovers(&self) -> Vec<String> {
        let names = self.layout.leftovers();
        for n in &names {
            if let Err(e) = self.layout.open(n).destroy() {
                tracing::warn!(sandbox = %n, error = %e, "cannot remove leftover sandbox cgroup");
            }
        }
        names
    }
}

/// Makes an image directory durable: its files, the directory itself, and its entry in its
/// parent (a crash must not lose the directory of a committed node).
pub fn sync_dir(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        std::fs::File::open(e.path())?.sync_all()?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// syncfs(2) of the filesystem holding `path`; a failure fails the commit (the node would not be
/// durable).
pub fn sync_fs(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: syncfs(2) on an fd we own for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        bail!(
            "syncfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The host's KSM daemon (/sys/kernel/mm/ksm/run), for `serve --ksm`.
pub mod ksm {
    const RUN: &str = "/sys/kernel/mm/ksm/run";

    /// Turns KSM on if it is off; returns whether this call turned it on.
    pub fn start() -> std::io::Result<bool> {
        if std::fs::read_to_string(RUN)?.trim() == "0" {
            std::fs::write(RUN, "1")?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Turns KSM off again (only after [`start`] turned it on): merged pages stay merged until
    /// written, nothing new is scanned.
    pub fn stop() -> std::io::Result<()> {
        std::fs::write(RUN, "0")
    }

    /// Pages that KSM's merging saves now, host-wide (`pages_sharing`), in bytes.
    pub fn saved_bytes() -> Option<u64> {
        let pages: u64 = std::fs::read_to_string("/sys/kernel/mm/ksm/pages_sharing")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(pages * 4096)
    }
}
