//! Turn verdicts: the eBPF inspector (sandtree-ebpf) when it loads, else the conservative
//! verdict; and the cross-check of the two (`--verify-verdicts`).
//!
//! The inspector watches each sandbox's cgroup v2 leaf from the moment the sandbox is started or
//! restored. A turn's epoch ends when its command returns ([`Verdicts::judge`] calls `end_turn`
//! first thing), so effects of background processes while the trainer thinks land in the next
//! turn. Recording is suspended while CRIU's parasite runs inside the sandbox's processes
//! ([`Verdicts::dump_window`]).
//!
//! The conservative verdict needs no inspector: proc when any process other than init outlives
//! the turn, fs when the storage layer saw a change since the volume's last snapshot, none
//! otherwise. It never says none where the inspector would have said fs or proc.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sandtree_branching::{Verdict, VerdictKind};
use sandtree_ebpf::{kernel_dev, Inspector, SandboxConfig};
use sandtree_storage::SnapshotBackend;
use tracing::{error, info, warn};

use crate::Sandbox;

/// At most this many reasons are kept per turn.
const MAX_REASONS: usize = 8;

/// Counts of cross-checked turns (`--verify-verdicts`).
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct VerifyCounts {
    /// Turns cross-checked.
    pub checked: u64,
    /// The inspector said none, the storage layer or the process table saw a change: the turn
    /// was upgraded, and the inspector has a bug.
    pub unsafe_disagreements: u64,
    /// The inspector said fs, the storage layer saw no change (a write of identical bytes, or a
    /// file created and removed in the same turn).
    pub fs_without_change: u64,
}

/// What a sandbox's verdicts come from.
pub struct Verdicts {
    inspector: Option<Inspector>,
    /// Why the inspector is not used, when it is not.
    unavailable: Option<String>,
    verify: bool,
    checked: AtomicU64,
    unsafe_disagreements: AtomicU64,
    fs_without_change: AtomicU64,
    /// Survivors seen at the end of the previous turn, per cgroup id (for the cross-check).
    survivors: Mutex<std::collections::HashMap<u64, BTreeSet<u32>>>,
}

/// Per-sandbox inspection state, kept with the live episode.
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    /// The sandbox's cgroup id, when the inspector watches it.
    pub cgroup_id: Option<u64>,
}

impl Verdicts {
    /// Loads the inspector unless `enabled` is false. A failure is not fatal: verdicts fall back
    /// to the conservative ones, and [`Verdicts::status`] says why.
    pub fn new(enabled: bool, verify: bool) -> Verdicts {
        let (inspector, unavailable) = if !enabled {
            (None, Some("disabled with --no-inspector".to_string()))
        } else {
            match Inspector::load() {
                Ok(i) => (Some(i), None),
                Err(e) => (None, Some(e.to_string())),
            }
        };
        match &unavailable {
            None => info!(
                map_bytes = inspector.as_ref().map_or(0, Inspector::map_memory_bytes),
                verify, "ebpf inspector loaded: auto verdicts come from syscalls"
            ),
            Some(why) => warn!(
                reason = %why,
                "ebpf inspector unavailable: auto falls back to the conservative verdict (surviving processes, storage changes)"
            ),
        }
        Verdicts {
            inspector,
            unavailable,
            verify,
            checked: AtomicU64::new(0),
            unsafe_disagreements: AtomicU64::new(0),
            fs_without_change: AtomicU64::new(0),
            survivors: Mutex::default(),
        }
    }

    /// One line for `doctor` and `stats`.
    pub fn status(&self) -> String {
        match (&self.inspector, &self.unavailable) {
            (Some(i), _) => format!(
                "ebpf inspector loaded ({} KiB of bpf maps){}",
                i.map_memory_bytes() / 1024,
                if self.verify {
                    ", verdicts cross-checked against storage"
                } else {
                    ""
                }
            ),
            (None, Some(why)) => {
                format!("ebpf inspector unavailable, conservative verdicts: {why}")
            }
            (None, None) => "ebpf inspector unavailable".into(),
        }
    }

    pub fn inspector_loaded(&self) -> bool {
        self.inspector.is_some()
    }

    pub fn counts(&self) -> VerifyCounts {
        VerifyCounts {
            checked: self.checked.load(Ordering::Relaxed),
            unsafe_disagreements: self.unsafe_disagreements.load(Ordering::Relaxed),
            fs_without_change: self.fs_without_change.load(Ordering::Relaxed),
        }
    }

    /// (watched sandboxes, BPF map bytes their entries use now).
    pub fn sandbox_map_bytes(&self) -> (u64, u64) {
        let Some(insp) = &self.inspector else {
            return (0, 0);
        };
        let ids: Vec<u64> = self
            .survivors
            .lock()
            .expect("survivors lock")
            .keys()
            .copied()
            .collect();
        (
            ids.len() as u64,
            ids.iter().map(|&id| insp.sandbox_map_bytes(id)).sum(),
        )
    }

    /// BPF map memory of the inspector, preallocated for all sandboxes (0 without it).
    pub fn map_memory_bytes(&self) -> u64 {
        self.inspector
            .as_ref()
            .map_or(0, Inspector::map_memory_bytes)
    }

    /// Starts watching a sandbox that was just started (or restored: then every process in it
    /// counts as long-lived). A failure leaves the sandbox on conservative verdicts.
    pub fn attach(&self, sb: &Sandbox, restored: bool) -> Watch {
        let Some(insp) = &self.inspector else {
            return Watch { cgroup_id: None };
        };
        let r = (|| -> anyhow::Result<u64> {
            let id = sb.cgroup.id()?;
            // The sandbox's private tmpfs (turn stdio, session records) does not count.
            let st = nix::sys::stat::stat(&std::path::PathBuf::from(format!(
                "/proc/{}/root/.sandtree",
                sb.init_pid
            )))?;
            insp.watch(
                id,
                SandboxConfig {
                    init_tgid: sb.init_pid,
                    ignore_dev: kernel_dev(st.st_dev),
                },
            )?;
            if restored {
                insp.mark_all_long_lived(id)?;
            }
            Ok(id)
        })();
        match r {
            Ok(id) => {
                self.survivors
                    .lock()
                    .expect("survivors lock")
                    .insert(id, survivors(sb).unwrap_or_default().into_iter().collect());
                Watch {
                    cgroup_id: Some(id),
                }
            }
            Err(e) => {
                warn!(cgroup = %sb.cgroup.v2.display(), error = format!("{e:#}"), "cannot watch sandbox: conservative verdicts for it");
                Watch { cgroup_id: None }
            }
        }
    }

    /// Stops watching (after the sandbox is destroyed).
    pub fn detach(&self, w: Watch) {
        if let (Some(insp), Some(id)) = (&self.inspector, w.cgroup_id) {
            self.survivors.lock().expect("survivors lock").remove(&id);
            if let Err(e) = insp.unwatch(id) {
                warn!(cgroup_id = id, error = %e, "cannot unwatch sandbox");
            }
        }
    }

    /// Runs `dump` (a CRIU dump with leave-running) with recording suspended, so that the
    /// parasite's syscalls inside the sandbox's processes do not count. `dump` must leave the
    /// sandbox's cgroup frozen when it resumes the processes (see `engine::checkpoint`); this
    /// thaws it after recording is back on, so nothing the processes do is missed.
    pub fn dump_window<T>(&self, w: Watch, sb: &Sandbox, dump: impl FnOnce() -> T) -> T {
        let (Some(insp), Some(id)) = (&self.inspector, w.cgroup_id) else {
            let r = dump();
            let _ = sb.cgroup.freeze(false);
            return r;
        };
        let suspended = insp.suspend(id, true);
        if let Err(e) = &suspended {
            warn!(cgroup_id = id, error = %e, "cannot suspend the inspector for a dump");
        }
        let r = dump();
        if suspended.is_ok() {
            if let Err(e) = insp.suspend(id, false) {
                warn!(cgroup_id = id, error = %e, "cannot resume the inspector after a dump");
            }
        }
        let _ = sb.cgroup.freeze(false);
        r
    }

    /// Ends the turn's epoch and returns the inspector's verdict, if it watches the sandbox
    /// (policies `none` and `full`, which do not act on it).
    pub fn observe(&self, w: Watch, sb: &Sandbox) -> Option<Verdict> {
        self.inspect(w, sb).map(|(_, v, _)| v)
    }

    /// Ends the turn's epoch: (cgroup id, the inspector's verdict, the sandbox's processes other
    /// than init right after the epoch switch).
    fn inspect(&self, w: Watch, sb: &Sandbox) -> Option<(u64, Verdict, anyhow::Result<Vec<u32>>)> {
        let (Some(insp), Some(id)) = (&self.inspector, w.cgroup_id) else {
            return None;
        };
        // The sandbox's processes are read once, right after the epoch switch. Only init left:
        // no program can still write the closed epoch, and the grace period can be skipped.
        let after = std::cell::RefCell::new(None);
        let quiet = || {
            let pids = sb.cgroup.pids();
            let quiet = pids
                .as_ref()
                .is_ok_and(|p| p.iter().all(|&pid| pid == sb.init_pid));
            *after.borrow_mut() = Some(pids);
            quiet
        };
        let alive = |pid: u32| {
            after
                .borrow()
                .as_ref()
                .is_some_and(|p| p.as_ref().is_ok_and(|p| p.contains(&pid)))
        };
        match insp.end_turn_quiet(id, &alive, &quiet) {
            Ok(effects) => {
                let (kind, mut reasons) = sandtree_ebpf::verdict(&effects);
                reasons.truncate(MAX_REASONS);
                let kind = match kind {
                    sandtree_ebpf::VerdictKind::None => VerdictKind::None,
                    sandtree_ebpf::VerdictKind::Fs => VerdictKind::Fs,
                    sandtree_ebpf::VerdictKind::Proc => VerdictKind::Proc,
                };
                let others = match after.take() {
                    Some(Ok(pids)) => Ok(pids.into_iter().filter(|&p| p != sb.init_pid).collect()),
                    Some(Err(e)) => Err(e.into()),
                    None => Err(anyhow::anyhow!(
                        "the inspector did not ask for the processes"
                    )),
                };
                Some((id, Verdict { kind, reasons }, others))
            }
            Err(e) => {
                warn!(cgroup_id = id, error = %e, "inspector failed at the turn boundary: conservative verdict");
                None
            }
        }
    }

    /// The verdict on the turn that just ended, for policy `auto`, and the sandbox's processes
    /// other than init at the turn's end. `vol` is the sandbox's volume.
    pub fn judge(
        &self,
        w: Watch,
        sb: &Sandbox,
        storage: &dyn SnapshotBackend,
        vol: &str,
    ) -> anyhow::Result<(Verdict, Vec<u32>)> {
        let Some((id, mut verdict, others)) = self.inspect(w, sb) else {
            let others = survivors(sb)?;
            return Ok((conservative(&others, storage, vol)?, others));
        };
        let others = others?;
        if !self.verify {
            return Ok((verdict, others));
        }
        let now: BTreeSet<u32> = others.iter().copied().collect();
        let before = self
            .survivors
            .lock()
            .expect("survivors lock")
            .insert(id, now.clone())
            .unwrap_or_default();
        self.checked.fetch_add(1, Ordering::Relaxed);
        let new_procs: Vec<u32> = now.difference(&before).copied().collect();
        let gone: Vec<u32> = before.difference(&now).copied().collect();
        let changed = storage.changed_since_last_snapshot(vol)?;
        let missed = match verdict.kind {
            VerdictKind::Proc => None,
            _ if !new_procs.is_empty() => Some((
                VerdictKind::Proc,
                format!("new processes {new_procs:?} outlive the turn"),
            )),
            _ if !gone.is_empty() => Some((
                VerdictKind::Proc,
                format!("long-lived processes {gone:?} ended in the turn"),
            )),
            VerdictKind::None if changed => Some((
                VerdictKind::Fs,
                format!("volume {vol} changed since its last snapshot"),
            )),
            _ => None,
        };
        if let Some((kind, why)) = missed {
            self.unsafe_disagreements.fetch_add(1, Ordering::Relaxed);
            error!(
                cgroup_id = id,
                inspector = ?verdict.kind,
                upgraded_to = ?kind,
                "UNSAFE VERDICT: the inspector missed an effect that the cross-check saw: {why}"
            );
            verdict.reasons.insert(
                0,
                format!(
                    "verify: UNSAFE inspector verdict {:?} upgraded: {why}",
                    verdict.kind
                ),
            );
            verdict.kind = kind;
        } else if verdict.kind == VerdictKind::Fs && !changed {
            self.fs_without_change.fetch_add(1, Ordering::Relaxed);
            verdict
                .reasons
                .push("verify: the storage layer saw no change".into());
        }
        Ok((verdict, others))
    }
}

/// Host pids in the sandbox other than its init.
fn survivors(sb: &Sandbox) -> anyhow::Result<Vec<u32>> {
    Ok(sb
        .cgroup
        .pids()?
        .into_iter()
        .filter(|&p| p != sb.init_pid)
        .collect())
}

/// The conservative verdict (no inspector), given the processes other than init.
fn conservative(
    survivors: &[u32],
    storage: &dyn SnapshotBackend,
    vol: &str,
) -> anyhow::Result<Verdict> {
    if !survivors.is_empty() {
        let shown: Vec<String> = survivors.iter().take(4).map(|p| p.to_string()).collect();
        return Ok(Verdict {
            kind: VerdictKind::Proc,
            reasons: vec![format!(
                "conservative: {} process(es) outlive the turn (host pids {})",
                survivors.len(),
                shown.join(",")
            )],
        });
    }
    if storage.changed_since_last_snapshot(vol)? {
        return Ok(Verdict {
            kind: VerdictKind::Fs,
            reasons: vec![format!(
                "conservative: volume {vol} changed since its last snapshot"
            )],
        });
    }
    Ok(Verdict {
        kind: VerdictKind::None,
        reasons: vec!["conservative: no process outlives the turn, no storage change".into()],
    })
}
