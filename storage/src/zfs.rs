//! ZFS backend, driven only through the zfs(8) and zpool(8) commands (as Docker's zfs driver and
//! Incus do), so that the same code runs on OpenZFS and on zfs-fuse.
//!
//! # Layout
//!
//! The user names a parent dataset `<ds>` (e.g. `tank/sandtree`); sandtree owns everything under
//! it and touches nothing else:
//!
//! | dataset | what |
//! |---|---|
//! | `<ds>` | `sandtree:layout=1`, `atime=off` (inherited by everything below) |
//! | `<ds>/images`, `<ds>/volumes` | containers: `canmount=off`, `mountpoint=none` |
//! | `<ds>/images/<name>`, `<ds>/volumes/<vol>` | one container per object name |
//! | `<ds>/images/<name>/<n>` | incarnation `n` of a base: `readonly=on`, sealed by snapshot `@base` |
//! | `<ds>/volumes/<vol>/<n>` | incarnation `n` of a volume: a `zfs clone` of a base or a snapshot |
//! | `<ds>/volumes/<vol>/<n>@<snap>` | a snapshot of a volume |
//!
//! At most one incarnation of a name is *live*; the live one has an explicit
//! `mountpoint=<state_dir>/mnt/{images,volumes}/<name>`. The others are *parked*
//! (`sandtree:parked=on`, `canmount=off`, unmounted): destroyed objects that still have snapshots.
//! A *hidden* snapshot (`sandtree:destroyed=on`) was destroyed while it still had clones.
//!
//! Nothing is ever renamed. Renaming a dataset makes zfs-fuse's libzfs unmount and remount every
//! clone of it (old libzfs gathers all dependents for a rename), which fails for busy clones and
//! left clones unmounted in testing; numbered incarnations avoid renames altogether.
//!
//! # Lifetimes
//!
//! Snapshots live until [`SnapshotBackend::destroy_snapshot`], on every backend. ZFS cannot
//! destroy a dataset that has snapshots, nor a snapshot that has clones, so:
//!
//! - `destroy_volume` destroys a volume without snapshots and parks one with snapshots. Its
//!   snapshots stay addressable as `(vol, snap)`: lookups try the live incarnation first, then
//!   the newest parked one that has the snapshot.
//! - `destroy_snapshot` of a snapshot that has clones hides it; [`SnapshotBackend::gc`] destroys
//!   it once its clones are gone. Until then its name stays taken on that incarnation
//!   (`snapshot` answers `Busy`).
//! - `gc` destroys hidden snapshots without clones, parked incarnations without snapshots, and
//!   empty per-name containers.
//! - `rollback` to the latest snapshot is `zfs rollback`; to an older one (or to a snapshot of a
//!   parked incarnation) it parks the volume, keeping every later snapshot, and clones the target
//!   as the next incarnation at the same mountpoint. Nothing is ever destroyed by `rollback -r`.
//! - `(vol, snap)` names one snapshot across all incarnations of `vol`: `snapshot` refuses a
//!   name that a parked incarnation still has.
//!
//! # Bytes and change detection
//!
//! Space accounting in ZFS is updated when a transaction group syncs. A snapshot syncs by itself;
//! before reading the head's accounting, [`SnapshotBackend::changed_since_last_snapshot`] forces
//! a sync by setting the user property `sandtree:sync` (a property change is a sync task that
//! waits for its txg; it changes no space).
//!
//! - With the `written` property (OpenZFS): `SnapshotInfo::bytes` is `written` of the new
//!   snapshot, and a volume changed if the head's `written` is > 0.
//! - Without it (zfs-fuse, pool version 23, has no `written`): a *ledger*. `T = usedbydataset +
//!   usedbysnapshots` of a volume counts every block born in the volume (after its origin) that
//!   the head or one of its snapshots still references. Between two snapshots `T` grows by
//!   exactly the bytes written and still referenced, i.e. by `written`. The volume keeps
//!   `sandtree:tbase` (`T` right after its latest snapshot; 0 for a new clone) and each snapshot
//!   keeps `sandtree:written`; destroying snapshot `S` of a live volume adjusts them (`tbase -=
//!   written(S)` if `S` was the latest, else `tbase -= used(S)` and the next snapshot's
//!   `written += written(S) - used(S)`). Any change, including a `chmod` or an `rm`, copies at
//!   least one metadata block, so `T > tbase` exactly when the volume changed. Reads change
//!   nothing because `atime=off`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{
    cmd, validate_name, Entry, Kind, Result, SnapshotBackend, SnapshotError, SnapshotInfo,
};

const LAYOUT_VERSION: u64 = 1;
const PROP_LAYOUT: &str = "sandtree:layout";
const PROP_PARKED: &str = "sandtree:parked";
const PROP_DESTROYED: &str = "sandtree:destroyed";
const PROP_TBASE: &str = "sandtree:tbase";
const PROP_WRITTEN: &str = "sandtree:written";
const PROP_SYNC: &str = "sandtree:sync";
const BASE_SNAP: &str = "base";
/// How long a "busy" zfs command is retried. zfs-fuse releases a dataset asynchronously after
/// unmounting it, so a destroy right after an unmount can fail with "dataset is busy".
const BUSY_WAIT: Duration = Duration::from_secs(15);
/// ZFS's limit on a full dataset or snapshot name (MAXNAMELEN - 1).
const MAX_NAME_LEN: usize = 255;
/// Room for the incarnation number `/<n>`.
const INCARNATION_DIGITS: usize = 10;

/// How [`Zfs`] measures bytes written: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accounting {
    /// The `written` property (OpenZFS).
    Written,
    /// A ledger over `usedbydataset + usedbysnapshots` (zfs-fuse, which has no `written`).
    Ledger,
}

/// Images and volumes are kept the same way, each under its own container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Images,
    Volumes,
}

impl Family {
    fn dir(self) -> &'static str {
        match self {
            Family::Images => "images",
            Family::Volumes => "volumes",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Family::Images => "base image",
            Family::Volumes => "volume",
        }
    }

    fn lock_key(self, name: &str) -> String {
        format!("{}/{name}", self.dir())
    }
}

/// One incarnation of a name, with its snapshots oldest first.
#[derive(Debug, Clone)]
struct Incarnation {
    n: u64,
    dataset: String,
    parked: bool,
    mountpoint: String,
    mounted: bool,
    snaps: Vec<Snap>,
}

#[derive(Debug, Clone)]
struct Snap {
    name: String,
    destroyed: bool,
}

impl Incarnation {
    fn full(&self, snap: &str) -> String {
        format!("{}@{snap}", self.dataset)
    }

    fn has_live_snap(&self, snap: &str) -> bool {
        self.snaps.iter().any(|s| s.name == snap && !s.destroyed)
    }
}

/// A snapshot found by `(name, snap)`.
#[derive(Debug, Clone)]
struct SnapLoc {
    dataset: String,
    snap: String,
    /// The incarnation is the live one (its ledger matters).
    live: bool,
}

impl SnapLoc {
    fn full(&self) -> String {
        format!("{}@{}", self.dataset, self.snap)
    }
}

/// The zfs backend. See the module docs.
#[derive(Debug)]
pub struct Zfs {
    ds: String,
    mnt: PathBuf,
    accounting: Accounting,
    locks: Locks,
    /// Set once `zfs snapshot` refused several snapshots in one command (zfs-fuse).
    no_multi_snapshot: AtomicBool,
    gc_lock: Mutex<()>,
    sync_seq: AtomicU64,
}

impl Zfs {
    /// Opens (and on first use creates) the backend under dataset `dataset`, e.g. `tank/sandtree`.
    /// The dataset is created if its pool exists; volumes mount under `<state_dir>/mnt`.
    pub fn open(dataset: &str, state_dir: &Path) -> Result<Zfs> {
        let dataset = dataset.trim_end_matches('/');
        check_dataset_name(dataset)?;
        let pool = dataset.split('/').next().unwrap_or(dataset);
        let state_dir = std::path::absolute(state_dir)
            .map_err(|source| io(format!("cannot resolve {}", state_dir.display()), source))?;
        let mnt = state_dir.join("mnt");
        std::fs::create_dir_all(&mnt)
            .map_err(|source| io(format!("cannot create {}", mnt.display()), source))?;
        path_str(&mnt)?;

        if !exists(dataset)? {
            if let Err(e) = cmd::run("zpool", ["list", "-H", "-o", "name", pool]) {
                if cmd::stderr_of(&e).is_some_and(|s| s.contains("no such pool")) {
                    return Err(SnapshotError::NotFound {
                        kind: "zfs pool",
                        name: pool.to_string(),
                    });
                }
                return Err(e);
            }
            tracing::info!(dataset, "creating zfs dataset");
            // Made by us, so never mounted: only the incarnations below it are.
            zfs([
                "create",
                "-p",
                "-o",
                "atime=off",
                "-o",
                "canmount=off",
                dataset,
            ])?;
        }
        let v = get(dataset, &[PROP_LAYOUT, "atime", "setuid", "devices"])?;
        match v[0].as_str() {
            "-" => zfs(["set", &format!("{PROP_LAYOUT}={LAYOUT_VERSION}"), dataset]).map(drop)?,
            l if l.parse::<u64>().ok() == Some(LAYOUT_VERSION) => {}
            l => {
                return Err(SnapshotError::Unsupported(format!(
                    "zfs dataset {dataset} has sandtree layout {l}, this build knows layout {LAYOUT_VERSION}"
                )))
            }
        }
        if v[1] != "off" {
            zfs(["set", "atime=off", dataset])?;
        }
        // Sandbox roots are mounted nosuid,nodev whatever an image or an agent leaves in them
        // (inherited by every dataset below this one).
        for (i, prop) in [(2, "setuid=off"), (3, "devices=off")] {
            if v[i] != "off" {
                zfs(["set", prop, dataset])?;
            }
        }
        let accounting = match zfs(["get", "-Hp", "-o", "value", "written", dataset]) {
            Ok(_) => Accounting::Written,
            Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("invalid property")) => {
                Accounting::Ledger
            }
            Err(e) => return Err(e),
        };
        let me = Zfs {
            ds: dataset.to_string(),
            mnt: mnt.clone(),
            accounting,
            locks: Locks::default(),
            no_multi_snapshot: AtomicBool::new(false),
            gc_lock: Mutex::new(()),
            sync_seq: AtomicU64::new(0),
        };
        for family in [Family::Images, Family::Volumes] {
            me.ensure_container(&me.family_root(family))?;
        }
        me.recover()?;
        tracing::info!(dataset, accounting = ?me.accounting, mnt = %mnt.display(), "opened zfs backend");
        Ok(me)
    }

    /// The dataset under which everything lives.
    pub fn dataset(&self) -> &str {
        &self.ds
    }

    /// How bytes written are measured on this system.
    pub fn accounting(&self) -> Accounting {
        self.accounting
    }

    fn family_root(&self, family: Family) -> String {
        format!("{}/{}", self.ds, family.dir())
    }

    fn container(&self, family: Family, name: &str) -> String {
        format!("{}/{}/{name}", self.ds, family.dir())
    }

    fn mountpoint(&self, family: Family, name: &str) -> PathBuf {
        self.mnt.join(family.dir()).join(name)
    }

    /// Creates a container dataset (never mounted) if it is missing.
    fn ensure_container(&self, full: &str) -> Result<()> {
        match zfs([
            "create",
            "-o",
            "canmount=off",
            "-o",
            "mountpoint=none",
            "-o",
            "atime=off",
            full,
        ]) {
            Err(e) if !cmd::stderr_of(&e).is_some_and(|s| s.contains("already exists")) => Err(e),
            _ => Ok(()),
        }
    }

    /// Brings what a crash or a moved state directory can leave behind back in line: an
    /// unsealed live base is removed, and live incarnations get their mountpoint under the
    /// current state directory.
    fn recover(&self) -> Result<()> {
        for family in [Family::Images, Family::Volumes] {
            for name in self.names(family)? {
                self.locks.with(&family.lock_key(&name), || -> Result<()> {
                    let incs = self.incarnations(family, &name)?;
                    let Some(live) = incs.iter().find(|i| !i.parked) else { return Ok(()) };
                    if family == Family::Images && !live.has_live_snap(BASE_SNAP) {
                        return self.discard_unsealed_base(&name, live, &incs);
                    }
                    let want = path_str(&self.mountpoint(family, &name))?.to_string();
                    if live.mountpoint != want {
                        tracing::info!(dataset = %live.dataset, from = %live.mountpoint, to = %want, "moving zfs mountpoint");
                        zfs_retry(["set", &format!("mountpoint={want}"), &live.dataset])?;
                    }
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    /// Names that have a container under `family`.
    fn names(&self, family: Family) -> Result<Vec<String>> {
        let root = self.family_root(family);
        let out = zfs([
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "filesystem",
            "-d",
            "1",
            &root,
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{root}/")).map(str::to_string))
            .collect())
    }

    /// A live base incarnation without a live `@base` was left by a crash during `create_base`
    /// (never sealed) or `destroy_base` (`@base` hidden, not yet parked): finish the job.
    fn discard_unsealed_base(
        &self,
        image: &str,
        live: &Incarnation,
        incs: &[Incarnation],
    ) -> Result<()> {
        tracing::warn!(dataset = %live.dataset, "retiring unfinished base image");
        self.retire(Family::Images, image, live, incs)
    }

    /// Every incarnation of `name`, oldest first; empty if the name was never used.
    fn incarnations(&self, family: Family, name: &str) -> Result<Vec<Incarnation>> {
        let container = self.container(family, name);
        let out = match zfs([
            "list",
            "-H",
            "-o",
            &format!("name,{PROP_PARKED},{PROP_DESTROYED},mountpoint,mounted"),
            "-t",
            "filesystem,snapshot",
            "-s",
            "createtxg",
            "-r",
            &container,
        ]) {
            Ok(out) => out,
            Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("does not exist")) => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        let prefix = format!("{container}/");
        let mut incs: Vec<Incarnation> = Vec::new();
        for line in out.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let [name, parked, destroyed, mountpoint, mounted] = f[..] else {
                continue;
            };
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            match rest.split_once('@') {
                None => {
                    let Ok(n) = rest.parse() else { continue };
                    incs.push(Incarnation {
                        n,
                        dataset: name.to_string(),
                        parked: parked == "on",
                        mountpoint: mountpoint.to_string(),
                        mounted: mounted == "yes",
                        snaps: Vec::new(),
                    });
                }
                Some((ds, snap)) => {
                    if let Some(inc) = incs
                        .iter_mut()
                        .find(|i| i.dataset.ends_with(&format!("/{ds}")))
                    {
                        inc.snaps.push(Snap {
                            name: snap.to_string(),
                            destroyed: destroyed == "on",
                        });
                    }
                }
            }
        }
        Ok(incs)
    }

    fn live(&self, family: Family, name: &str) -> Result<Option<Incarnation>> {
        Ok(self
            .incarnations(family, name)?
            .into_iter()
            .find(|i| !i.parked))
    }

    fn require_live(&self, family: Family, name: &str) -> Result<Incarnation> {
        self.live(family, name)?
            .ok_or_else(|| SnapshotError::NotFound {
                kind: family.kind(),
                name: name.to_string(),
            })
    }

    /// The live incarnation among `incs` (all of `name`), or NotFound.
    fn live_in<'a>(incs: &'a [Incarnation], family: Family, name: &str) -> Result<&'a Incarnation> {
        incs.iter()
            .find(|i| !i.parked)
            .ok_or_else(|| SnapshotError::NotFound {
                kind: family.kind(),
                name: name.to_string(),
            })
    }

    /// Finds live snapshot `vol@snap`: on the live incarnation, else on the newest parked one.
    fn find_snapshot(incs: &[Incarnation], snap: &str) -> Option<SnapLoc> {
        let pick = incs
            .iter()
            .filter(|i| i.has_live_snap(snap))
            .max_by_key(|i| (!i.parked, i.n))?;
        Some(SnapLoc {
            dataset: pick.dataset.clone(),
            snap: snap.to_string(),
            live: !pick.parked,
        })
    }

    /// What snapshot `full` of `dataset`, just taken, costs to keep (under the volume's lock).
    fn account_snapshot(&self, full: &str, dataset: &str) -> Result<SnapshotInfo> {
        let bytes = match self.accounting {
            Accounting::Written => num(&get(full, &["written"])?[0]),
            Accounting::Ledger => {
                let (total, tbase) = Self::ledger(dataset)?;
                let written = total.saturating_sub(tbase);
                zfs(["set", &format!("{PROP_WRITTEN}={written}"), full])?;
                zfs(["set", &format!("{PROP_TBASE}={total}"), dataset])?;
                written
            }
        };
        Ok(SnapshotInfo { bytes })
    }

    fn snapshot_not_found(vol: &str, snap: &str) -> SnapshotError {
        SnapshotError::NotFound {
            kind: "snapshot",
            name: format!("{vol}@{snap}"),
        }
    }

    fn next_n(incs: &[Incarnation]) -> u64 {
        incs.iter().map(|i| i.n).max().unwrap_or(0) + 1
    }

    /// Refuses names whose datasets would exceed ZFS's name length limit.
    fn check_len(&self, family: Family, parts: &[&str]) -> Result<()> {
        // `<ds>/<family>/<name>/<n>[@<snap>]`
        let len = self.ds.len()
            + 1
            + family.dir().len()
            + parts.iter().map(|p| p.len() + 1).sum::<usize>()
            + 1
            + INCARNATION_DIGITS;
        if len > MAX_NAME_LEN {
            return Err(SnapshotError::Unsupported(format!(
                "{} {} is too long for zfs under {} (dataset names are limited to {MAX_NAME_LEN} bytes)",
                family.kind(),
                parts.join("@"),
                self.ds
            )));
        }
        Ok(())
    }

    /// Mounts incarnation `inc` if needed and returns its mount point.
    fn ensure_mounted(&self, inc: &Incarnation, family: Family, name: &str) -> Result<PathBuf> {
        if !inc.mountpoint.starts_with('/') {
            return Err(SnapshotError::Unsupported(format!(
                "{} {name} has mountpoint {:?}; expected {}",
                family.kind(),
                inc.mountpoint,
                self.mountpoint(family, name).display()
            )));
        }
        if !inc.mounted {
            match zfs_retry(["mount", &inc.dataset]) {
                Ok(_) => {}
                Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("already mounted")) => {}
                Err(e) => return Err(busy(e, family.kind(), name)),
            }
        }
        let mp = PathBuf::from(&inc.mountpoint);
        nosuid_nodev(&mp)?;
        Ok(mp)
    }

    /// Unmounts `dataset`; not being mounted is fine.
    fn unmount(&self, dataset: &str) -> Result<()> {
        match zfs_retry(["unmount", dataset]) {
            Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("not currently mounted")) => {
                Ok(())
            }
            Err(e) => Err(busy(e, "dataset", dataset)),
            Ok(_) => Ok(()),
        }
    }

    /// Makes a new live incarnation of `name` by `zfs create` (no origin) or `zfs clone`, and
    /// returns it mounted.
    fn new_incarnation(
        &self,
        family: Family,
        name: &str,
        origin: Option<&str>,
        n: u64,
    ) -> Result<PathBuf> {
        if n == 1 {
            // The first incarnation: the container may not exist yet.
            self.ensure_container(&self.container(family, name))?;
        }
        let dataset = format!("{}/{n}", self.container(family, name));
        let mountpoint = self.mountpoint(family, name);
        let mp = format!("mountpoint={}", path_str(&mountpoint)?);
        let tbase = format!("{PROP_TBASE}=0");
        let mut args = vec![
            if origin.is_some() { "clone" } else { "create" },
            "-o",
            "atime=off",
            "-o",
            &mp,
        ];
        if self.accounting == Accounting::Ledger && family == Family::Volumes {
            args.extend(["-o", &tbase]);
        }
        args.extend(origin);
        args.push(&dataset);
        if let Err(e) = zfs(&args) {
            // zfs-fuse sometimes makes the dataset but fails to mount it ("busy"): mount below.
            if !exists(&dataset)? {
                return Err(e);
            }
            tracing::debug!(dataset, error = %e, "dataset made but not mounted; mounting again");
        }
        // Both create and clone mount the new dataset; check the mount table, which costs no
        // zfs command, and mount only if it is not there.
        let mounted = crate::pool::mount_at(&mountpoint)?
            .is_some_and(|m| m.source == dataset && m.fstype.contains("zfs"));
        let inc = Incarnation {
            n,
            dataset,
            parked: false,
            mountpoint: path_str(&mountpoint)?.to_string(),
            mounted,
            snaps: Vec::new(),
        };
        self.ensure_mounted(&inc, family, name)
    }

    /// Removes the live incarnation from the namespace: destroys it if it has no snapshots (and
    /// then its container if that is empty), else parks it.
    fn retire(
        &self,
        family: Family,
        name: &str,
        inc: &Incarnation,
        all: &[Incarnation],
    ) -> Result<()> {
        if inc.mounted {
            self.unmount(&inc.dataset)?;
        }
        if inc.snaps.is_empty() {
            destroy_dataset(&inc.dataset)?;
            if all.len() == 1 {
                self.destroy_container_if_empty(family, name)?;
            }
            return Ok(());
        }
        zfs(["set", &format!("{PROP_PARKED}=on"), &inc.dataset])?;
        zfs(["set", "canmount=off", &inc.dataset])?;
        tracing::info!(dataset = %inc.dataset, "parked: it still has snapshots");
        Ok(())
    }

    /// Undoes `retire` of a parked incarnation (after a failed rollback).
    fn unpark(&self, inc: &Incarnation, family: Family, name: &str) {
        let result = zfs(["inherit", PROP_PARKED, &inc.dataset])
            .and_then(|_| zfs(["set", "canmount=on", &inc.dataset]))
            .and_then(|_| {
                self.ensure_mounted(
                    &Incarnation {
                        mounted: false,
                        ..inc.clone()
                    },
                    family,
                    name,
                )
            });
        if let Err(e) = result {
            tracing::error!(dataset = %inc.dataset, error = %e, "cannot put the volume back after a failed rollback");
        }
    }

    fn destroy_container_if_empty(&self, family: Family, name: &str) -> Result<()> {
        let container = self.container(family, name);
        let out = zfs([
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "filesystem,snapshot",
            "-r",
            &container,
        ])?;
        if out.lines().count() == 1 {
            destroy_dataset(&container)?;
        }
        Ok(())
    }

    fn next_seq(&self) -> u64 {
        self.sync_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// `T` of the ledger and the volume's `tbase`.
    fn ledger(dataset: &str) -> Result<(u64, u64)> {
        let v = get(dataset, &["usedbydataset", "usedbysnapshots", PROP_TBASE])?;
        Ok((num(&v[0]) + num(&v[1]), num(&v[2])))
    }

    /// Destroys a snapshot, keeping the ledger of a live volume right. Returns false (and
    /// destroys nothing) if the snapshot has dependent clones.
    fn destroy_snapshot_now(&self, loc: &SnapLoc) -> Result<bool> {
        let full = loc.full();
        // What destroying `full` does to the ledger, computed while it still exists.
        let mut plan = None;
        if self.accounting == Accounting::Ledger && loc.live {
            let snaps = snapshots_of(&loc.dataset)?;
            let idx = snaps.iter().position(|s| *s == full);
            let v = get(&full, &["used", PROP_WRITTEN])?;
            let (used, written) = (num(&v[0]), num(&v[1]));
            plan = Some(match idx.and_then(|i| snaps.get(i + 1)) {
                // The latest snapshot: the previous one becomes the reference again.
                None => LedgerPlan {
                    tbase_minus: written,
                    next: None,
                },
                // An older one: its unique blocks leave T, and the next snapshot now counts the
                // blocks born before `full` that are still alive.
                Some(next) => {
                    let next_written = num(&get(next, &[PROP_WRITTEN])?[0]);
                    let merged = next_written + written.saturating_sub(used);
                    LedgerPlan {
                        tbase_minus: used,
                        next: Some((next.clone(), merged)),
                    }
                }
            });
        }
        match zfs(["destroy", &full]) {
            Ok(_) => {}
            Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("dependent clones")) => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        }
        tracing::debug!(snapshot = %full, "destroyed zfs snapshot");
        if let Some(plan) = plan {
            if let Some((next, written)) = plan.next {
                zfs(["set", &format!("{PROP_WRITTEN}={written}"), &next])?;
            }
            let tbase = num(&get(&loc.dataset, &[PROP_TBASE])?[0]).saturating_sub(plan.tbase_minus);
            zfs(["set", &format!("{PROP_TBASE}={tbase}"), &loc.dataset])?;
        }
        Ok(true)
    }

    /// Destroys (or, if it has clones, hides) snapshot `loc` of `name`; then destroys its
    /// incarnation if that is parked and has no snapshots left.
    fn drop_snapshot(&self, family: Family, name: &str, loc: &SnapLoc) -> Result<()> {
        if !self.destroy_snapshot_now(loc)? {
            tracing::info!(snapshot = %loc.full(), "snapshot has clones; hidden until gc");
            zfs(["set", &format!("{PROP_DESTROYED}=on"), &loc.full()])?;
            return Ok(());
        }
        if !loc.live && snapshots_of(&loc.dataset)?.is_empty() {
            destroy_dataset(&loc.dataset)?;
            tracing::info!(dataset = %loc.dataset, "destroyed parked incarnation");
            self.destroy_container_if_empty(family, name)?;
        }
        Ok(())
    }

    /// One gc pass over the objects of `name`; returns how many objects it destroyed.
    fn gc_name(&self, family: Family, name: &str) -> Result<usize> {
        let mut removed = 0;
        for inc in self.incarnations(family, name)? {
            for s in inc.snaps.iter().filter(|s| s.destroyed) {
                let loc = SnapLoc {
                    dataset: inc.dataset.clone(),
                    snap: s.name.clone(),
                    live: !inc.parked,
                };
                if self.destroy_snapshot_now(&loc)? {
                    removed += 1;
                }
            }
        }
        let incs = self.incarnations(family, name)?;
        let mut left = incs.len();
        for inc in incs.iter().filter(|i| i.parked && i.snaps.is_empty()) {
            destroy_dataset(&inc.dataset)?;
            tracing::info!(dataset = %inc.dataset, "gc destroyed parked incarnation");
            removed += 1;
            left -= 1;
        }
        if left == 0 {
            self.destroy_container_if_empty(family, name)?;
        }
        Ok(removed)
    }
}

impl SnapshotBackend for Zfs {
    fn kind(&self) -> Kind {
        Kind::Zfs
    }

    fn describe(&self) -> String {
        let how = match self.accounting {
            Accounting::Written => "written property",
            Accounting::Ledger => "space ledger, no written property",
        };
        let how = if cmd::zfs_fuse_serialized() {
            format!("{how}; zfs-fuse, commands serialized")
        } else {
            how.to_string()
        };
        format!(
            "zfs dataset {} mounted under {} ({how})",
            self.ds,
            self.mnt.display()
        )
    }

    fn create_base(
        &self,
        image: &str,
        populate: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<()> {
        validate_name(image)?;
        self.check_len(Family::Images, &[image, BASE_SNAP])?;
        self.locks.with(&Family::Images.lock_key(image), || {
            let mut incs = self.incarnations(Family::Images, image)?;
            if let Some(live) = incs.iter().find(|i| !i.parked) {
                if live.has_live_snap(BASE_SNAP) {
                    return Err(SnapshotError::Exists {
                        kind: "base image",
                        name: image.to_string(),
                    });
                }
                self.discard_unsealed_base(image, live, &incs)?;
                incs = self.incarnations(Family::Images, image)?;
            }
            let n = Self::next_n(&incs);
            let dataset = format!("{}/{n}", self.container(Family::Images, image));
            let mut guard = Cleanup {
                dataset: Some(dataset.clone()),
                backend: self,
            };
            let path = self.new_incarnation(Family::Images, image, None, n)?;
            populate(&path)?;
            zfs(["set", "readonly=on", &dataset])?;
            zfs(["snapshot", &format!("{dataset}@{BASE_SNAP}")])?;
            guard.dataset = None;
            tracing::info!(image, dataset, "created base image");
            Ok(())
        })
    }

    fn has_base(&self, image: &str) -> Result<bool> {
        validate_name(image)?;
        Ok(self
            .live(Family::Images, image)?
            .is_some_and(|i| i.has_live_snap(BASE_SNAP)))
    }

    fn destroy_base(&self, image: &str) -> Result<()> {
        validate_name(image)?;
        self.locks.with(&Family::Images.lock_key(image), || {
            let incs = self.incarnations(Family::Images, image)?;
            let inc = incs
                .iter()
                .find(|i| !i.parked && i.has_live_snap(BASE_SNAP))
                .ok_or_else(|| SnapshotError::NotFound {
                    kind: "base image",
                    name: image.to_string(),
                })?;
            let base = SnapLoc {
                dataset: inc.dataset.clone(),
                snap: BASE_SNAP.to_string(),
                live: false,
            };
            let destroyed = self.destroy_snapshot_now(&base)?;
            if !destroyed {
                zfs(["set", &format!("{PROP_DESTROYED}=on"), &base.full()])?;
            }
            let inc = Incarnation {
                snaps: if destroyed {
                    Vec::new()
                } else {
                    inc.snaps.clone()
                },
                ..inc.clone()
            };
            self.retire(Family::Images, image, &inc, &incs)?;
            tracing::info!(image, "destroyed base image");
            Ok(())
        })
    }

    fn create_volume(&self, vol: &str, image: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        validate_name(image)?;
        self.check_len(Family::Volumes, &[vol])?;
        self.locks.with(&Family::Volumes.lock_key(vol), || {
            let incs = self.incarnations(Family::Volumes, vol)?;
            if incs.iter().any(|i| !i.parked) {
                return Err(SnapshotError::Exists {
                    kind: "volume",
                    name: vol.to_string(),
                });
            }
            let base = self
                .live(Family::Images, image)?
                .filter(|i| i.has_live_snap(BASE_SNAP))
                .ok_or_else(|| SnapshotError::NotFound {
                    kind: "base image",
                    name: image.to_string(),
                })?;
            let path = self.new_incarnation(
                Family::Volumes,
                vol,
                Some(&base.full(BASE_SNAP)),
                Self::next_n(&incs),
            )?;
            tracing::info!(vol, image, "created zfs volume");
            Ok(path)
        })
    }

    fn volume_path(&self, vol: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        let inc = self.require_live(Family::Volumes, vol)?;
        self.ensure_mounted(&inc, Family::Volumes, vol)
    }

    fn snapshot(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        validate_name(vol)?;
        validate_name(snap)?;
        self.check_len(Family::Volumes, &[vol, snap])?;
        self.locks.with(&Family::Volumes.lock_key(vol), || {
            let incs = self.incarnations(Family::Volumes, vol)?;
            let live = Self::live_in(&incs, Family::Volumes, vol)?;
            // `(vol, snap)` names one snapshot across every incarnation of `vol`.
            if incs.iter().any(|i| i.has_live_snap(snap)) {
                return Err(SnapshotError::Exists { kind: "snapshot", name: format!("{vol}@{snap}") });
            }
            if live.snaps.iter().any(|s| s.name == snap) {
                return Err(SnapshotError::Busy {
                    what: format!("snapshot {vol}@{snap}"),
                    detail: "a destroyed snapshot of that name still has clones; gc frees the name once they are gone"
                        .to_string(),
                });
            }
            let full = live.full(snap);
            zfs(["snapshot", &full])?;
            let info = self.account_snapshot(&full, &live.dataset)?;
            tracing::debug!(vol, snap, bytes = info.bytes, "took zfs snapshot");
            Ok(info)
        })
    }

    fn snapshot_many(&self, items: &[(&str, &str)]) -> Vec<Result<SnapshotInfo>> {
        let mut vols: Vec<&str> = items.iter().map(|(v, _)| *v).collect();
        vols.sort();
        vols.dedup();
        let one_by_one = || items.iter().map(|(v, s)| self.snapshot(v, s)).collect();
        if items.len() < 2
            || vols.len() != items.len()
            || self.no_multi_snapshot.load(Ordering::Relaxed)
        {
            // One snapshot, two of one volume (whose accounting is ordered), or a zfs that
            // takes one snapshot per command (zfs-fuse): one by one.
            return one_by_one();
        }
        let keys: Vec<String> = vols.iter().map(|v| Family::Volumes.lock_key(v)).collect();
        let batched = self.locks.with_all(&keys, || {
            // Each item's checks, as `snapshot` makes them; the ones that pass are taken together.
            let mut out: Vec<Option<Result<SnapshotInfo>>> = Vec::with_capacity(items.len());
            let mut todo: Vec<(usize, String, String)> = Vec::new();
            for (i, (vol, snap)) in items.iter().enumerate() {
                let checked = (|| -> Result<(String, String)> {
                    validate_name(vol)?;
                    validate_name(snap)?;
                    self.check_len(Family::Volumes, &[vol, snap])?;
                    let incs = self.incarnations(Family::Volumes, vol)?;
                    let live = Self::live_in(&incs, Family::Volumes, vol)?;
                    if incs.iter().any(|i| i.has_live_snap(snap)) {
                        return Err(SnapshotError::Exists {
                            kind: "snapshot",
                            name: format!("{vol}@{snap}"),
                        });
                    }
                    if live.snaps.iter().any(|s| s.name == *snap) {
                        return Err(SnapshotError::Busy {
                            what: format!("snapshot {vol}@{snap}"),
                            detail: "a destroyed snapshot of that name still has clones; gc frees the name once they are gone".to_string(),
                        });
                    }
                    Ok((live.full(snap), live.dataset.clone()))
                })();
                match checked {
                    Ok((full, dataset)) => {
                        todo.push((i, full, dataset));
                        out.push(None);
                    }
                    Err(e) => out.push(Some(Err(e))),
                }
            }
            if !todo.is_empty() {
                // One command, one transaction group: every snapshot exists, or none does.
                let mut args = vec!["snapshot".to_string()];
                args.extend(todo.iter().map(|(_, full, _)| full.clone()));
                match zfs(&args) {
                    Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("too many arguments")) => {
                        // This zfs (zfs-fuse) predates multi-snapshot: nothing was taken.
                        tracing::info!("zfs takes one snapshot per command here; batches run one by one");
                        self.no_multi_snapshot.store(true, Ordering::Relaxed);
                        return None;
                    }
                    Ok(_) => {
                        for (i, full, dataset) in &todo {
                            out[*i] = Some(self.account_snapshot(full, dataset));
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        for (i, _, _) in &todo {
                            out[*i] = Some(Err(SnapshotError::Command {
                                command: format!("zfs {}", args.join(" ")),
                                status: "failed".into(),
                                stderr: msg.clone(),
                            }));
                        }
                    }
                }
            }
            tracing::debug!(n = todo.len(), "took zfs snapshots in one batch");
            Some(
                out.into_iter()
                    .map(|r| r.expect("every item has a result"))
                    .collect(),
            )
        });
        batched.unwrap_or_else(one_by_one)
    }

    fn clone_snapshot(&self, vol: &str, snap: &str, new_vol: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        validate_name(snap)?;
        validate_name(new_vol)?;
        self.check_len(Family::Volumes, &[new_vol])?;
        let loc = Self::find_snapshot(&self.incarnations(Family::Volumes, vol)?, snap)
            .ok_or_else(|| Self::snapshot_not_found(vol, snap))?;
        self.locks.with(&Family::Volumes.lock_key(new_vol), || {
            let incs = self.incarnations(Family::Volumes, new_vol)?;
            if incs.iter().any(|i| !i.parked) {
                return Err(SnapshotError::Exists {
                    kind: "volume",
                    name: new_vol.to_string(),
                });
            }
            let path = self
                .new_incarnation(
                    Family::Volumes,
                    new_vol,
                    Some(&loc.full()),
                    Self::next_n(&incs),
                )
                .map_err(|e| match cmd::stderr_of(&e) {
                    Some(s) if s.contains("does not exist") => Self::snapshot_not_found(vol, snap),
                    _ => e,
                })?;
            tracing::info!(vol, snap, new_vol, origin = %loc.full(), "cloned zfs snapshot");
            Ok(path)
        })
    }

    fn rollback(&self, vol: &str, snap: &str) -> Result<()> {
        validate_name(vol)?;
        validate_name(snap)?;
        self.locks.with(&Family::Volumes.lock_key(vol), || {
            let incs = self.incarnations(Family::Volumes, vol)?;
            let live = Self::live_in(&incs, Family::Volumes, vol)?;
            let loc = Self::find_snapshot(&incs, snap)
                .ok_or_else(|| Self::snapshot_not_found(vol, snap))?;
            if loc.live && live.snaps.last().is_some_and(|s| s.name == snap) {
                zfs_retry(["rollback", &loc.full()]).map_err(|e| busy(e, "volume", vol))?;
                // `zfs rollback` may remount the dataset; make sure it is mounted.
                let v = get(&live.dataset, &["mounted"])?;
                self.ensure_mounted(
                    &Incarnation {
                        mounted: v[0] == "yes",
                        ..live.clone()
                    },
                    Family::Volumes,
                    vol,
                )?;
                tracing::info!(vol, snap, "rolled back zfs volume in place");
                return Ok(());
            }
            // Keep every later snapshot: park the volume and clone the target as the next
            // incarnation, at the same mountpoint.
            self.retire(Family::Volumes, vol, live, &[])?;
            if let Err(e) =
                self.new_incarnation(Family::Volumes, vol, Some(&loc.full()), Self::next_n(&incs))
            {
                if !live.snaps.is_empty() {
                    self.unpark(live, Family::Volumes, vol);
                }
                return Err(e);
            }
            tracing::info!(vol, snap, origin = %loc.full(), "rolled back zfs volume by cloning");
            Ok(())
        })
    }

    fn changed_since_last_snapshot(&self, vol: &str) -> Result<bool> {
        validate_name(vol)?;
        let live = self.require_live(Family::Volumes, vol)?;
        // Make the accounting cover every write so far.
        zfs([
            "set",
            &format!("{PROP_SYNC}={}", self.next_seq()),
            &live.dataset,
        ])?;
        Ok(match self.accounting {
            Accounting::Written => num(&get(&live.dataset, &["written"])?[0]) > 0,
            Accounting::Ledger => {
                let (total, tbase) = Self::ledger(&live.dataset)?;
                total > tbase
            }
        })
    }

    fn destroy_volume(&self, vol: &str) -> Result<()> {
        validate_name(vol)?;
        self.locks.with(&Family::Volumes.lock_key(vol), || {
            let incs = self.incarnations(Family::Volumes, vol)?;
            let live = Self::live_in(&incs, Family::Volumes, vol)?;
            self.retire(Family::Volumes, vol, live, &incs)?;
            tracing::info!(vol, "destroyed zfs volume");
            Ok(())
        })
    }

    fn destroy_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        validate_name(vol)?;
        validate_name(snap)?;
        self.locks.with(&Family::Volumes.lock_key(vol), || {
            let loc = Self::find_snapshot(&self.incarnations(Family::Volumes, vol)?, snap)
                .ok_or_else(|| Self::snapshot_not_found(vol, snap))?;
            self.drop_snapshot(Family::Volumes, vol, &loc)
        })
    }

    fn set_quota(&self, vol: &str, bytes: u64) -> Result<()> {
        validate_name(vol)?;
        let inc = self.require_live(Family::Volumes, vol)?;
        zfs(["set", &format!("refquota={bytes}"), &inc.dataset]).map(drop)
    }

    fn list(&self) -> Result<Vec<Entry>> {
        let out = zfs([
            "list",
            "-H",
            "-o",
            &format!("name,{PROP_PARKED},{PROP_DESTROYED}"),
            "-t",
            "filesystem,snapshot",
            "-s",
            "createtxg",
            "-r",
            &self.ds,
        ])?;
        let images = format!("{}/", self.family_root(Family::Images));
        let volumes = format!("{}/", self.family_root(Family::Volumes));
        let mut entries = Vec::new();
        for line in out.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let [full, parked, destroyed] = f[..] else {
                continue;
            };
            let (ds, snap) = match full.split_once('@') {
                Some((d, s)) => (d, Some(s)),
                None => (full, None),
            };
            let (family, rest) = if let Some(r) = ds.strip_prefix(&images) {
                (Family::Images, r)
            } else if let Some(r) = ds.strip_prefix(&volumes) {
                (Family::Volumes, r)
            } else {
                continue;
            };
            // Incarnations only (`<name>/<n>`), not the per-name containers.
            let Some((name, n)) = rest.split_once('/') else {
                continue;
            };
            if n.parse::<u64>().is_err() {
                continue;
            }
            // A snapshot inherits `sandtree:parked` from its incarnation.
            let (parked, destroyed) = (parked == "on", destroyed == "on");
            let entry = match (family, snap) {
                (Family::Images, Some(BASE_SNAP)) if !parked && !destroyed => Entry::Base {
                    name: name.to_string(),
                },
                (Family::Volumes, None) if !parked => Entry::Volume {
                    name: name.to_string(),
                },
                (Family::Volumes, Some(s)) if !destroyed => Entry::Snapshot {
                    volume: name.to_string(),
                    name: s.to_string(),
                },
                _ => continue,
            };
            if !entries.contains(&entry) {
                entries.push(entry);
            }
        }
        Ok(entries)
    }

    fn gc(&self) -> Result<usize> {
        let _gc = self.gc_lock.lock().unwrap_or_else(|e| e.into_inner());
        // Reaping one object can free another (a clone's origin, a chain of clones), so repeat
        // until a pass removes nothing. Volumes go first: they are what holds a base.
        let mut removed = 0;
        loop {
            let mut pass = 0;
            for family in [Family::Volumes, Family::Images] {
                for name in self.names(family)? {
                    match self
                        .locks
                        .with(&family.lock_key(&name), || self.gc_name(family, &name))
                    {
                        Ok(n) => pass += n,
                        Err(e) => {
                            tracing::warn!(name, kind = family.kind(), error = %e, "gc could not finish")
                        }
                    }
                }
            }
            removed += pass;
            if pass == 0 {
                break;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "zfs gc");
        }
        Ok(removed)
    }
}

/// How destroying one snapshot of a live volume changes the ledger.
struct LedgerPlan {
    tbase_minus: u64,
    /// The next snapshot and its new `sandtree:written`.
    next: Option<(String, u64)>,
}

/// Destroys a half-made base image if `create_base` fails or panics.
struct Cleanup<'a> {
    dataset: Option<String>,
    backend: &'a Zfs,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(ds) = self.dataset.take() {
            tracing::warn!(dataset = %ds, "create_base failed; destroying the half-made image");
            let result = match exists(&ds) {
                Ok(false) => Ok(()),
                _ => self
                    .backend
                    .unmount(&ds)
                    .and_then(|()| zfs_retry(["destroy", "-r", &ds]).map(drop)),
            };
            if let Err(e) = result {
                tracing::error!(dataset = %ds, error = %e, "cannot destroy half-made base image");
            }
        }
    }
}

/// Per-name locks: operations on one name are serialized against gc and each other.
#[derive(Debug, Default)]
struct Locks(Mutex<HashMap<String, Arc<Mutex<()>>>>);

impl Locks {
    /// Runs `f` holding the locks of every key, taken in sorted order (so two batches never
    /// wait on each other in a cycle).
    fn with_all<R>(&self, keys: &[String], f: impl FnOnce() -> R) -> R {
        let mut keys: Vec<&String> = keys.iter().collect();
        keys.sort();
        keys.dedup();
        let locks: Vec<Arc<Mutex<()>>> = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            keys.iter()
                .map(|k| map.entry(k.to_string()).or_default().clone())
                .collect()
        };
        let _guards: Vec<_> = locks
            .iter()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        f()
    }

    fn with<R>(&self, key: &str, f: impl FnOnce() -> R) -> R {
        let lock = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        f()
    }
}

fn zfs<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    cmd::run("zfs", args)
}

fn zfs_retry<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    cmd::run_retrying("zfs", args, |e| e.contains("busy"), BUSY_WAIT)
}

fn destroy_dataset(dataset: &str) -> Result<()> {
    zfs_retry(["destroy", dataset]).map_err(|e| busy(e, "dataset", dataset))?;
    Ok(())
}

/// Whether a dataset or snapshot exists.
fn exists(name: &str) -> Result<bool> {
    match zfs(["list", "-H", "-o", "name", "-t", "all", name]) {
        Ok(_) => Ok(true),
        Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("does not exist")) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Property values of `name`, parsable (`-p`), in the order asked.
/// Makes the mount at `mp` nosuid,nodev if it is not. zfs-fuse mounts datasets without them
/// whatever `setuid` and `devices` say, and a sandbox root (CRIU's restored ones too) is a bind of
/// this mount that inherits its flags. A remount of the bind flags only: no zfs command, and the
/// filesystem is not touched.
fn nosuid_nodev(mp: &Path) -> Result<()> {
    let m = crate::pool::mount_at(mp)?;
    let ok = m.as_ref().is_some_and(|m| {
        let o: Vec<&str> = m.options.split(',').collect();
        o.contains(&"nosuid") && o.contains(&"nodev")
    });
    if m.is_some() && !ok {
        cmd::run(
            "mount",
            [
                std::ffi::OsStr::new("-o"),
                "remount,bind,nosuid,nodev".as_ref(),
                mp.as_os_str(),
            ],
        )?;
    }
    Ok(())
}

fn get(name: &str, props: &[&str]) -> Result<Vec<String>> {
    let out = zfs(["get", "-Hp", "-o", "value", &props.join(","), name])?;
    let values: Vec<String> = out.lines().map(str::to_string).collect();
    if values.len() != props.len() {
        return Err(SnapshotError::Unsupported(format!(
            "zfs get {} {name} returned {} values: {out:?}",
            props.join(","),
            values.len()
        )));
    }
    Ok(values)
}

/// Snapshots of `dataset` (full names), oldest first.
fn snapshots_of(dataset: &str) -> Result<Vec<String>> {
    let out = zfs([
        "list",
        "-H",
        "-o",
        "name",
        "-t",
        "snapshot",
        "-s",
        "createtxg",
        "-d",
        "1",
        dataset,
    ])?;
    Ok(out
        .lines()
        .filter(|l| l.strip_prefix(dataset).is_some_and(|r| r.starts_with('@')))
        .map(str::to_string)
        .collect())
}

/// A numeric property; `-` (unset) is 0.
fn num(v: &str) -> u64 {
    v.trim().parse().unwrap_or(0)
}

fn busy(e: SnapshotError, kind: &str, name: &str) -> SnapshotError {
    match cmd::stderr_of(&e) {
        Some(s) if s.contains("busy") => SnapshotError::Busy {
            what: format!("{kind} {name}"),
            detail: s.to_string(),
        },
        _ => e,
    }
}

fn check_dataset_name(ds: &str) -> Result<()> {
    let ok = ds.contains('/')
        && ds.len() < 160
        && ds.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        })
        && ds.as_bytes()[0].is_ascii_alphabetic();
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::InvalidName(ds.to_string()))
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .filter(|s| !s.contains(['\t', '\n', ' ', ',']))
        .ok_or_else(|| {
            SnapshotError::Unsupported(format!(
                "zfs mountpoint {} must be plain UTF-8 without spaces",
                p.display()
            ))
        })
}

fn io(context: String, source: std::io::Error) -> SnapshotError {
    SnapshotError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_names_are_checked() {
        assert!(check_dataset_name("tank/sandtree").is_ok());
        assert!(check_dataset_name("tank/a/b_c-d.e").is_ok());
        assert!(check_dataset_name("tank").is_err());
        assert!(check_dataset_name("tank//x").is_err());
        assert!(check_dataset_name("tank/x@snap").is_err());
        assert!(check_dataset_name("tank/../x").is_err());
        assert!(check_dataset_name("1tank/x").is_err());
        assert!(check_dataset_name("tank/a b").is_err());
    }

    #[test]
    fn unset_numbers_are_zero() {
        assert_eq!(num("-"), 0);
        assert_eq!(num("1234\n"), 1234);
    }

    fn inc(n: u64, parked: bool, snaps: &[(&str, bool)]) -> Incarnation {
        Incarnation {
            n,
            dataset: format!("p/s/volumes/v/{n}"),
            parked,
            mountpoint: "/m/volumes/v".into(),
            mounted: !parked,
            snaps: snaps
                .iter()
                .map(|(s, d)| Snap {
                    name: s.to_string(),
                    destroyed: *d,
                })
                .collect(),
        }
    }

    #[test]
    fn snapshots_resolve_to_the_live_incarnation_first_then_the_newest_parked() {
        let incs = [
            inc(1, true, &[("a", false), ("b", false)]),
            inc(2, true, &[("a", false), ("c", true)]),
            inc(3, false, &[("b", false)]),
        ];
        let find = |s| Zfs::find_snapshot(&incs, s).map(|l| (l.dataset, l.live));
        assert_eq!(find("b"), Some(("p/s/volumes/v/3".into(), true)));
        assert_eq!(find("a"), Some(("p/s/volumes/v/2".into(), false)));
        assert_eq!(find("c"), None, "hidden snapshots are not found");
        assert_eq!(find("z"), None);
        assert_eq!(Zfs::next_n(&incs), 4);
        assert_eq!(Zfs::next_n(&[]), 1);
    }
}
