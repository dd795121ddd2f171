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
//! | `<ds>/images/<name>` | a base: `readonly=on`, sealed by the snapshot `@base` |
//! | `<ds>/volumes/<vol>` | a volume: `zfs clone` of `images/<name>@base` or of another snapshot |
//! | `<ds>/volumes/<vol>@<snap>` | a snapshot of a volume |
//! | `<ds>/parked/vol:<vol>:<n>` | a destroyed volume that still has snapshots (never mounted) |
//! | `<ds>/parked/img:<name>:<n>` | a destroyed base that still has clones |
//! | `…@<snap>:gone:<txg>` | a destroyed snapshot that still has clones (hidden) |
//!
//! The containers `images` and `volumes` have `canmount=off` and an explicit `mountpoint` under
//! `<state_dir>/mnt`, which their children inherit; `parked` has `mountpoint=none`.
//!
//! # Lifetimes
//!
//! Snapshots live until [`SnapshotBackend::destroy_snapshot`], on every backend. ZFS cannot
//! destroy a dataset that has snapshots, nor a snapshot that has clones, so:
//!
//! - `destroy_volume` destroys a volume without snapshots, and *parks* one with snapshots: it is
//!   unmounted, set `canmount=off` and renamed under `parked/`. Its snapshots stay addressable as
//!   `(vol, snap)` (lookups try `volumes/<vol>` first, then the newest parked `vol:<vol>:<n>`).
//! - `destroy_snapshot` of a snapshot that has clones renames it to `<snap>:gone:<txg>`: hidden
//!   from `list` and lookups, and destroyed by [`SnapshotBackend::gc`] once its clones are gone.
//! - `gc` destroys hidden snapshots without clones and parked datasets without snapshots.
//! - `rollback` to the latest snapshot is `zfs rollback`; to an older one (or to a snapshot of a
//!   parked generation) it parks the volume, keeping every later snapshot, and clones the target
//!   under the volume's name. Nothing is ever destroyed by `rollback -r`.
//!
//! Names are never reused by a live object, because parked and hidden names contain `:`, which
//! [`validate_name`] refuses.
//!
//! # Bytes and change detection
//!
//! Space accounting in ZFS is updated when a transaction group syncs. A snapshot syncs by itself;
//! before reading the head's accounting, [`SnapshotBackend::changed_since_last_snapshot`] forces
//! a sync by setting the user property `sandtree:sync` (a property change is a sync task that
//! waits for its txg; it does not change the dataset's space).
//!
//! - With the `written` property (OpenZFS): `SnapshotInfo::bytes` is `written` of the new
//!   snapshot, and a volume changed if the head's `written` is > 0.
//! - Without it (zfs-fuse, pool version 23, has no `written`): a *ledger*. `T = usedbydataset +
//!   usedbysnapshots` of a volume counts every block born in the volume (after its origin) that
//!   the head or one of its snapshots still references. Between two snapshots `T` grows by
//!   exactly the bytes written and still referenced, i.e. by `written`. The volume keeps
//!   `sandtree:tbase` (`T` right after its latest snapshot; 0 for a new clone) and each snapshot
//!   keeps `sandtree:written`; destroying snapshot `S` of a volume adjusts them (`tbase -=
//!   written(S)` if `S` was the latest, else `tbase -= used(S)` and the next snapshot's
//!   `written += written(S) - used(S)`). Any change, including a `chmod` or an `rm`, copies at
//!   least one metadata block, so `T > tbase` exactly when the volume changed. Reads change
//!   nothing because `atime=off`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{
    cmd, validate_name, Entry, Kind, Result, SnapshotBackend, SnapshotError, SnapshotInfo,
};

const LAYOUT_VERSION: u64 = 1;
const PROP_LAYOUT: &str = "sandtree:layout";
const PROP_TBASE: &str = "sandtree:tbase";
const PROP_WRITTEN: &str = "sandtree:written";
const PROP_SYNC: &str = "sandtree:sync";
const BASE_SNAP: &str = "base";
/// How long a "busy" zfs command is retried. zfs-fuse releases a dataset asynchronously after
/// unmounting it, so a rename or destroy right after an unmount fails with "dataset is busy".
const BUSY_WAIT: Duration = Duration::from_secs(15);
/// ZFS's limit on a full dataset or snapshot name (MAXNAMELEN - 1).
const MAX_NAME_LEN: usize = 255;
/// Room kept for the longest suffixes that parking and hiding add (`:gone:` + a txg, `:<n>`).
const NAME_RESERVE: usize = 48;

/// How [`Zfs`] measures bytes written: see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accounting {
    /// The `written` property (OpenZFS).
    Written,
    /// A ledger over `usedbydataset + usedbysnapshots` (zfs-fuse, which has no `written`).
    Ledger,
}

/// The zfs backend. See the module docs.
#[derive(Debug)]
pub struct Zfs {
    ds: String,
    mnt: PathBuf,
    accounting: Accounting,
    locks: Locks,
    gc_lock: Mutex<()>,
    sync_seq: AtomicU64,
}

/// Where a snapshot lives: under the volume, or under one of its parked generations.
#[derive(Debug, Clone)]
struct SnapLoc {
    dataset: String,
    snap: String,
    /// True if `dataset` is the live `volumes/<vol>`.
    active: bool,
}

impl SnapLoc {
    fn full(&self) -> String {
        format!("{}@{}", self.dataset, self.snap)
    }
}

impl Zfs {
    /// Opens (and on first use creates) the backend under dataset `dataset`, e.g. `tank/sandtree`.
    /// The dataset is created if its pool exists; volumes mount under `<state_dir>/mnt`.
    pub fn open(dataset: &str, state_dir: &Path) -> Result<Zfs> {
        let dataset = dataset.trim_end_matches('/');
        check_dataset_name(dataset)?;
        let pool = dataset.split('/').next().unwrap_or(dataset);
        let state_dir = absolute(state_dir)?;
        let mnt = state_dir.join("mnt");
        std::fs::create_dir_all(&mnt).map_err(|source| SnapshotError::Io {
            context: format!("cannot create {}", mnt.display()),
            source,
        })?;

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
            zfs(["create", "-p", "-o", "atime=off", dataset])?;
        }
        match get(dataset, &[PROP_LAYOUT])?[0].as_str() {
            "-" => zfs(["set", &format!("{PROP_LAYOUT}={LAYOUT_VERSION}"), dataset]).map(drop)?,
            v if v.parse::<u64>().ok() == Some(LAYOUT_VERSION) => {}
            v => {
                return Err(SnapshotError::Unsupported(format!(
                    "zfs dataset {dataset} has sandtree layout {v}, this build knows layout {LAYOUT_VERSION}"
                )))
            }
        }
        if get(dataset, &["atime"])?[0] != "off" {
            zfs(["set", "atime=off", dataset])?;
        }

        let me = Zfs {
            ds: dataset.to_string(),
            mnt: mnt.clone(),
            accounting: Accounting::Ledger,
            locks: Locks::default(),
            gc_lock: Mutex::new(()),
            sync_seq: AtomicU64::new(0),
        };
        me.ensure_container("images", Some(&mnt.join("images")))?;
        me.ensure_container("volumes", Some(&mnt.join("volumes")))?;
        me.ensure_container("parked", None)?;

        let accounting = match zfs(["get", "-Hp", "-o", "value", "written", dataset]) {
            Ok(_) => Accounting::Written,
            Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("invalid property")) => {
                Accounting::Ledger
            }
            Err(e) => return Err(e),
        };
        let me = Zfs { accounting, ..me };
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

    fn ensure_container(&self, name: &str, mountpoint: Option<&Path>) -> Result<()> {
        let full = format!("{}/{name}", self.ds);
        let mp = match mountpoint {
            Some(p) => path_str(p)?.to_string(),
            None => "none".to_string(),
        };
        if !exists(&full)? {
            zfs([
                "create",
                "-o",
                "canmount=off",
                "-o",
                "atime=off",
                "-o",
                &format!("mountpoint={mp}"),
                &full,
            ])?;
            return Ok(());
        }
        let v = get(&full, &["mountpoint", "canmount", "atime"])?;
        if v[0] != mp {
            tracing::info!(dataset = %full, from = %v[0], to = %mp, "moving zfs mountpoint");
            zfs(["set", &format!("mountpoint={mp}"), &full])?;
        }
        if v[1] != "off" {
            zfs(["set", "canmount=off", &full])?;
        }
        if v[2] != "off" {
            zfs(["set", "atime=off", &full])?;
        }
        Ok(())
    }

    /// Finishes what a crash can leave behind: an image without `@base` (populate never
    /// finished) is destroyed; an image whose `@base` is hidden (destroy_base never finished) is
    /// retired.
    fn recover(&self) -> Result<()> {
        let images = format!("{}/images", self.ds);
        let rows = zfs([
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "filesystem,snapshot",
            "-r",
            &images,
        ])?;
        let mut sealed: HashMap<String, bool> = HashMap::new();
        for line in rows.lines() {
            match line.split_once('@') {
                Some((ds, snap)) if snap == BASE_SNAP => {
                    sealed.insert(ds.to_string(), true);
                }
                Some((ds, _)) => {
                    sealed.entry(ds.to_string()).or_insert(false);
                }
                None if line != images => {
                    sealed.entry(line.to_string()).or_insert(false);
                }
                None => {}
            }
        }
        for (ds, ok) in sealed {
            if ok {
                continue;
            }
            let name = ds.rsplit('/').next().unwrap_or(&ds).to_string();
            if snapshots_of(&ds)?.is_empty() {
                tracing::warn!(dataset = %ds, "destroying unfinished base image");
                self.unmount(&ds)?;
                destroy_dataset(&ds)?;
            } else {
                tracing::warn!(dataset = %ds, "retiring half-destroyed base image");
                self.retire(&ds, "img", &name)?;
            }
        }
        Ok(())
    }

    fn image_ds(&self, image: &str) -> String {
        format!("{}/images/{image}", self.ds)
    }

    fn volume_ds(&self, vol: &str) -> String {
        format!("{}/volumes/{vol}", self.ds)
    }

    fn parked_root(&self) -> String {
        format!("{}/parked", self.ds)
    }

    /// Refuses names whose parked or hidden forms would exceed ZFS's name length limit.
    fn check_len(&self, what: &str, parts: &[&str]) -> Result<()> {
        let len =
            self.ds.len() + "/parked/vol:".len() + parts.iter().map(|p| p.len() + 1).sum::<usize>();
        if len + NAME_RESERVE > MAX_NAME_LEN {
            return Err(SnapshotError::Unsupported(format!(
                "{what} {} is too long for zfs under {} (names are limited to {MAX_NAME_LEN} bytes)",
                parts.join("@"),
                self.ds
            )));
        }
        Ok(())
    }

    fn next_seq(&self) -> u64 {
        self.sync_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Forces a txg sync so that space accounting covers every write made so far.
    fn force_sync(&self, dataset: &str, kind: &'static str, name: &str) -> Result<()> {
        let prop = format!("{PROP_SYNC}={}", self.next_seq());
        zfs(["set", &prop, dataset]).map_err(|e| not_found(e, kind, name))?;
        Ok(())
    }

    /// `T` of the ledger: bytes born in `dataset` still referenced by it or its snapshots.
    fn ledger_total(dataset: &str) -> Result<(u64, u64)> {
        let v = get(dataset, &["usedbydataset", "usedbysnapshots", PROP_TBASE])?;
        Ok((num(&v[0]) + num(&v[1]), num(&v[2])))
    }

    fn mounted_path(&self, dataset: &str, kind: &'static str, name: &str) -> Result<PathBuf> {
        let v = get(dataset, &["mountpoint", "mounted"]).map_err(|e| not_found(e, kind, name))?;
        if !v[0].starts_with('/') {
            return Err(SnapshotError::Unsupported(format!(
                "{kind} {name} has mountpoint {:?}; expected a path under {}",
                v[0],
                self.mnt.display()
            )));
        }
        if v[1] != "yes" {
            zfs_retry(["mount", dataset]).map_err(|e| busy(e, kind, name))?;
        }
        Ok(PathBuf::from(&v[0]))
    }

    fn unmount(&self, dataset: &str) -> Result<()> {
        if get(dataset, &["mounted"])?[0] == "yes" {
            match zfs_retry(["unmount", dataset]) {
                Ok(_) => {}
                Err(e)
                    if cmd::stderr_of(&e).is_some_and(|s| s.contains("not currently mounted")) => {}
                Err(e) => return Err(busy(e, "dataset", dataset)),
            }
        }
        Ok(())
    }

    /// Removes `dataset` from the live namespace: destroys it if it has no snapshots, else parks
    /// it as `parked/<tag>:<name>:<n>` and returns that name.
    fn retire(&self, dataset: &str, tag: &str, name: &str) -> Result<Option<String>> {
        let has_snapshots = !snapshots_of(dataset)?.is_empty();
        self.unmount(dataset)?;
        if !has_snapshots {
            destroy_dataset(dataset)?;
            return Ok(None);
        }
        zfs(["set", "canmount=off", dataset])?;
        let n = self
            .parked_generations(tag, name)?
            .into_iter()
            .map(|(n, _)| n)
            .max()
            .unwrap_or(0)
            + 1;
        let target = format!("{}/{tag}:{name}:{n}", self.parked_root());
        tracing::info!(dataset, parked = %target, "parking dataset that still has snapshots");
        zfs_retry(["rename", dataset, &target]).map_err(|e| busy(e, "dataset", dataset))?;
        Ok(Some(target))
    }

    /// Parked generations `(n, dataset)` of object `name` with tag `tag`.
    fn parked_generations(&self, tag: &str, name: &str) -> Result<Vec<(u64, String)>> {
        let out = zfs([
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "filesystem",
            "-d",
            "1",
            &self.parked_root(),
        ])?;
        Ok(out
            .lines()
            .filter_map(|ds| {
                let (t, o, n) = parse_parked(ds.rsplit('/').next()?)?;
                (t == tag && o == name).then(|| (n, ds.to_string()))
            })
            .collect())
    }

    /// Finds live snapshot `vol@snap`: on the volume, else on its newest parked generation that
    /// has it.
    fn find_snapshot(&self, vol: &str, snap: &str) -> Result<Option<SnapLoc>> {
        let active = self.volume_ds(vol);
        if exists(&format!("{active}@{snap}"))? {
            return Ok(Some(SnapLoc {
                dataset: active,
                snap: snap.to_string(),
                active: true,
            }));
        }
        self.find_parked_snapshot(vol, snap)
    }

    /// Finds live snapshot `snap` on the newest parked generation of `vol` that has it.
    fn find_parked_snapshot(&self, vol: &str, snap: &str) -> Result<Option<SnapLoc>> {
        let out = zfs([
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "snapshot",
            "-r",
            &self.parked_root(),
        ])?;
        let best = out
            .lines()
            .filter_map(|line| {
                let (ds, s) = line.split_once('@')?;
                let (tag, owner, n) = parse_parked(ds.rsplit('/').next()?)?;
                (s == snap && tag == "vol" && owner == vol).then(|| (n, ds.to_string()))
            })
            .max();
        Ok(best.map(|(_, dataset)| SnapLoc {
            dataset,
            snap: snap.to_string(),
            active: false,
        }))
    }

    fn snapshot_not_found(vol: &str, snap: &str) -> SnapshotError {
        SnapshotError::NotFound {
            kind: "snapshot",
            name: format!("{vol}@{snap}"),
        }
    }

    /// Destroys a snapshot, keeping the ledger of a live volume right. Returns false (and
    /// destroys nothing) if the snapshot has dependent clones.
    fn destroy_snapshot_now(&self, loc: &SnapLoc) -> Result<bool> {
        let full = loc.full();
        // What destroying `full` does to the ledger, computed before it is gone.
        let mut plan = None;
        if self.accounting == Accounting::Ledger && loc.active {
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
                // blocks that were born before `full` and are still alive.
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
            let tbase = num(&get(&loc.dataset, &[PROP_TBASE])?[0]);
            let tbase = tbase.saturating_sub(plan.tbase_minus);
            zfs(["set", &format!("{PROP_TBASE}={tbase}"), &loc.dataset])?;
        }
        Ok(true)
    }

    /// Hides a snapshot that has clones: `@snap` becomes `@snap:gone:<createtxg>`.
    fn hide_snapshot(&self, loc: &SnapLoc) -> Result<()> {
        let full = loc.full();
        let txg = get(&full, &["createtxg"])?[0].clone();
        let hidden = format!("{}@{}:gone:{txg}", loc.dataset, loc.snap);
        tracing::info!(snapshot = %full, hidden = %hidden, "snapshot has clones; hiding it until gc");
        zfs(["rename", &full, &hidden])?;
        Ok(())
    }

    /// Destroys a parked dataset that has no snapshots left. Returns whether it did.
    fn reap_parked_if_empty(&self, dataset: &str) -> Result<bool> {
        if !snapshots_of(dataset)?.is_empty() {
            return Ok(false);
        }
        destroy_dataset(dataset)?;
        tracing::info!(dataset, "destroyed parked dataset");
        Ok(true)
    }

    /// Best effort: puts `parked` back as volume `vol` when the clone that should have replaced
    /// it failed.
    fn unpark(&self, parked: &str, vol: &str) {
        let ds = self.volume_ds(vol);
        let result = zfs_retry(["rename", parked, &ds])
            .and_then(|_| zfs(["set", "canmount=on", &ds]))
            .and_then(|_| self.mounted_path(&ds, "volume", vol));
        if let Err(e) = result {
            tracing::error!(vol, parked, error = %e, "rollback failed and the volume could not be put back");
        }
    }

    fn clone_into(&self, origin: &str, vol: &str) -> Result<PathBuf> {
        let target = self.volume_ds(vol);
        let mut args = vec!["clone", "-o", "atime=off"];
        let tbase = format!("{PROP_TBASE}=0");
        if self.accounting == Accounting::Ledger {
            args.extend(["-o", &tbase]);
        }
        args.extend([origin, &target]);
        zfs(&args).map_err(|e| match cmd::stderr_of(&e) {
            Some(s) if s.contains("already exists") => SnapshotError::Exists {
                kind: "volume",
                name: vol.to_string(),
            },
            _ => e,
        })?;
        self.mounted_path(&target, "volume", vol)
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
        self.check_len("base image", &[image, BASE_SNAP])?;
        let ds = self.image_ds(image);
        self.locks.with(&format!("img:{image}"), || {
            if exists(&ds)? {
                return Err(SnapshotError::Exists {
                    kind: "base image",
                    name: image.to_string(),
                });
            }
            zfs(["create", "-o", "atime=off", &ds]).map_err(|e| match cmd::stderr_of(&e) {
                Some(s) if s.contains("already exists") => SnapshotError::Exists {
                    kind: "base image",
                    name: image.to_string(),
                },
                _ => e,
            })?;
            let mut guard = Cleanup {
                dataset: Some(ds.clone()),
                backend: self,
            };
            let path = self.mounted_path(&ds, "base image", image)?;
            populate(&path)?;
            zfs(["set", "readonly=on", &ds])?;
            zfs(["snapshot", &format!("{ds}@{BASE_SNAP}")])?;
            guard.dataset = None;
            tracing::info!(image, dataset = %ds, "created base image");
            Ok(())
        })
    }

    fn has_base(&self, image: &str) -> Result<bool> {
        validate_name(image)?;
        exists(&format!("{}@{BASE_SNAP}", self.image_ds(image)))
    }

    fn destroy_base(&self, image: &str) -> Result<()> {
        validate_name(image)?;
        let ds = self.image_ds(image);
        self.locks.with(&format!("img:{image}"), || {
            let base = SnapLoc {
                dataset: ds.clone(),
                snap: BASE_SNAP.to_string(),
                active: false,
            };
            if !exists(&base.full())? {
                return Err(SnapshotError::NotFound {
                    kind: "base image",
                    name: image.to_string(),
                });
            }
            if !self.destroy_snapshot_now(&base)? {
                self.hide_snapshot(&base)?;
            }
            self.retire(&ds, "img", image).map(drop)
        })
    }

    fn create_volume(&self, vol: &str, image: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        validate_name(image)?;
        self.check_len("volume", &[vol])?;
        let origin = format!("{}@{BASE_SNAP}", self.image_ds(image));
        self.locks.with(vol, || {
            if exists(&self.volume_ds(vol))? {
                return Err(SnapshotError::Exists {
                    kind: "volume",
                    name: vol.to_string(),
                });
            }
            if !exists(&origin)? {
                return Err(SnapshotError::NotFound {
                    kind: "base image",
                    name: image.to_string(),
                });
            }
            let path = self.clone_into(&origin, vol)?;
            tracing::info!(vol, image, "created zfs volume");
            Ok(path)
        })
    }

    fn volume_path(&self, vol: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        self.mounted_path(&self.volume_ds(vol), "volume", vol)
    }

    fn snapshot(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        validate_name(vol)?;
        validate_name(snap)?;
        self.check_len("snapshot", &[vol, snap])?;
        let ds = self.volume_ds(vol);
        let full = format!("{ds}@{snap}");
        self.locks.with(vol, || {
            // `(vol, snap)` names one snapshot, also across parked generations of `vol`.
            if self.find_parked_snapshot(vol, snap)?.is_some() {
                return Err(SnapshotError::Exists {
                    kind: "snapshot",
                    name: format!("{vol}@{snap}"),
                });
            }
            zfs(["snapshot", &full]).map_err(|e| match cmd::stderr_of(&e) {
                Some(s) if s.contains("already exists") => SnapshotError::Exists {
                    kind: "snapshot",
                    name: format!("{vol}@{snap}"),
                },
                _ => not_found(e, "volume", vol),
            })?;
            let bytes = match self.accounting {
                Accounting::Written => num(&get(&full, &["written"])?[0]),
                Accounting::Ledger => {
                    let (total, tbase) = Self::ledger_total(&ds)?;
                    let written = total.saturating_sub(tbase);
                    zfs(["set", &format!("{PROP_WRITTEN}={written}"), &full])?;
                    zfs(["set", &format!("{PROP_TBASE}={total}"), &ds])?;
                    written
                }
            };
            tracing::debug!(vol, snap, bytes, "took zfs snapshot");
            Ok(SnapshotInfo { bytes })
        })
    }

    fn clone_snapshot(&self, vol: &str, snap: &str, new_vol: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        validate_name(snap)?;
        validate_name(new_vol)?;
        self.check_len("volume", &[new_vol])?;
        let loc = self
            .find_snapshot(vol, snap)?
            .ok_or_else(|| Self::snapshot_not_found(vol, snap))?;
        self.locks.with(new_vol, || {
            if exists(&self.volume_ds(new_vol))? {
                return Err(SnapshotError::Exists {
                    kind: "volume",
                    name: new_vol.to_string(),
                });
            }
            let path =
                self.clone_into(&loc.full(), new_vol)
                    .map_err(|e| match cmd::stderr_of(&e) {
                        Some(s) if s.contains("does not exist") => {
                            Self::snapshot_not_found(vol, snap)
                        }
                        _ => e,
                    })?;
            tracing::info!(vol, snap, new_vol, origin = %loc.full(), "cloned zfs snapshot");
            Ok(path)
        })
    }

    fn rollback(&self, vol: &str, snap: &str) -> Result<()> {
        validate_name(vol)?;
        validate_name(snap)?;
        let ds = self.volume_ds(vol);
        self.locks.with(vol, || {
            if !exists(&ds)? {
                return Err(SnapshotError::NotFound {
                    kind: "volume",
                    name: vol.to_string(),
                });
            }
            let loc = self
                .find_snapshot(vol, snap)?
                .ok_or_else(|| Self::snapshot_not_found(vol, snap))?;
            let latest = snapshots_of(&ds)?.pop();
            if loc.active && latest.as_deref() == Some(loc.full().as_str()) {
                zfs_retry(["rollback", &loc.full()]).map_err(|e| busy(e, "volume", vol))?;
                // `zfs rollback` remounts the dataset; make sure it is mounted again.
                self.mounted_path(&ds, "volume", vol)?;
                tracing::info!(vol, snap, "rolled back zfs volume in place");
                return Ok(());
            }
            // Keep every later snapshot: park the volume and clone the target under its name.
            let parked = self.retire(&ds, "vol", vol)?;
            let origin = match (&parked, loc.active) {
                // The volume moved, and its snapshot with it.
                (Some(p), true) => format!("{p}@{snap}"),
                (None, true) => return Err(Self::snapshot_not_found(vol, snap)),
                (_, false) => loc.full(),
            };
            if let Err(e) = self.clone_into(&origin, vol) {
                if let Some(p) = &parked {
                    self.unpark(p, vol);
                }
                return Err(e);
            }
            tracing::info!(vol, snap, origin = %origin, "rolled back zfs volume by cloning");
            Ok(())
        })
    }

    fn changed_since_last_snapshot(&self, vol: &str) -> Result<bool> {
        validate_name(vol)?;
        let ds = self.volume_ds(vol);
        self.force_sync(&ds, "volume", vol)?;
        Ok(match self.accounting {
            Accounting::Written => num(&get(&ds, &["written"])?[0]) > 0,
            Accounting::Ledger => {
                let (total, tbase) = Self::ledger_total(&ds)?;
                total > tbase
            }
        })
    }

    fn destroy_volume(&self, vol: &str) -> Result<()> {
        validate_name(vol)?;
        let ds = self.volume_ds(vol);
        self.locks.with(vol, || {
            if !exists(&ds)? {
                return Err(SnapshotError::NotFound {
                    kind: "volume",
                    name: vol.to_string(),
                });
            }
            self.retire(&ds, "vol", vol)?;
            tracing::info!(vol, "destroyed zfs volume");
            Ok(())
        })
    }

    fn destroy_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        validate_name(vol)?;
        validate_name(snap)?;
        self.locks.with(vol, || {
            let loc = self
                .find_snapshot(vol, snap)?
                .ok_or_else(|| Self::snapshot_not_found(vol, snap))?;
            if !self.destroy_snapshot_now(&loc)? {
                self.hide_snapshot(&loc)?;
            } else if !loc.active {
                self.reap_parked_if_empty(&loc.dataset)?;
            }
            Ok(())
        })
    }

    fn list(&self) -> Result<Vec<Entry>> {
        let out = zfs([
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "filesystem,snapshot",
            "-r",
            &self.ds,
        ])?;
        let images = format!("{}/images/", self.ds);
        let volumes = format!("{}/volumes/", self.ds);
        let parked = format!("{}/parked/", self.ds);
        let mut entries = Vec::new();
        for line in out.lines() {
            let (ds, snap) = match line.split_once('@') {
                Some((d, s)) => (d, Some(s)),
                None => (line, None),
            };
            if let Some(name) = ds.strip_prefix(&images) {
                if snap == Some(BASE_SNAP) {
                    entries.push(Entry::Base {
                        name: name.to_string(),
                    });
                }
            } else if let Some(name) = ds.strip_prefix(&volumes) {
                match snap {
                    None => entries.push(Entry::Volume {
                        name: name.to_string(),
                    }),
                    Some(s) if !s.contains(':') => entries.push(Entry::Snapshot {
                        volume: name.to_string(),
                        name: s.to_string(),
                    }),
                    Some(_) => {}
                }
            } else if let Some(p) = ds.strip_prefix(&parked) {
                if let (Some((tag, owner, _)), Some(s)) = (parse_parked(p), snap) {
                    if tag == "vol" && !s.contains(':') {
                        entries.push(Entry::Snapshot {
                            volume: owner.to_string(),
                            name: s.to_string(),
                        });
                    }
                }
            }
        }
        // A snapshot name can exist both on a volume and on a parked generation of it.
        let mut seen = std::collections::HashSet::new();
        entries.retain(|e| seen.insert(format!("{e:?}")));
        Ok(entries)
    }

    fn gc(&self) -> Result<usize> {
        let _gc = self.gc_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        let volumes = format!("{}/volumes/", self.ds);
        let out = zfs(["list", "-H", "-o", "name", "-t", "snapshot", "-r", &self.ds])?;
        for line in out.lines() {
            let Some((ds, snap)) = line.split_once('@') else {
                continue;
            };
            if !snap.contains(':') {
                continue;
            }
            let (key, active) = match ds.strip_prefix(&volumes) {
                Some(vol) => (vol.to_string(), true),
                None => (
                    ds.rsplit('/')
                        .next()
                        .and_then(parse_parked)
                        .map(|(_, o, _)| o)
                        .unwrap_or(ds)
                        .to_string(),
                    false,
                ),
            };
            let loc = SnapLoc {
                dataset: ds.to_string(),
                snap: snap.to_string(),
                active,
            };
            match self.locks.with(&key, || self.destroy_snapshot_now(&loc)) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(snapshot = line, error = %e, "gc could not destroy hidden snapshot")
                }
            }
        }
        let out = zfs([
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "filesystem",
            "-d",
            "1",
            &self.parked_root(),
        ])?;
        for ds in out.lines().filter(|l| l.contains(':')) {
            let key = ds
                .rsplit('/')
                .next()
                .and_then(parse_parked)
                .map(|(_, o, _)| o)
                .unwrap_or(ds)
                .to_string();
            match self.locks.with(&key, || self.reap_parked_if_empty(ds)) {
                Ok(true) => removed += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(dataset = ds, error = %e, "gc could not destroy parked dataset")
                }
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
            let result = self
                .backend
                .unmount(&ds)
                .and_then(|()| zfs_retry(["destroy", "-r", &ds]).map(drop));
            if let Err(e) = result {
                tracing::error!(dataset = %ds, error = %e, "cannot destroy half-made base image");
            }
        }
    }
}

/// Per-name locks: operations on one volume are serialized against gc and each other.
#[derive(Debug, Default)]
struct Locks(Mutex<HashMap<String, Arc<Mutex<()>>>>);

impl Locks {
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
        .filter(|l| l.starts_with(dataset) && l[dataset.len()..].starts_with('@'))
        .map(str::to_string)
        .collect())
}

/// A numeric property; `-` (unset) is 0.
fn num(v: &str) -> u64 {
    v.trim().parse().unwrap_or(0)
}

/// `vol:<name>:<n>` or `img:<name>:<n>`.
fn parse_parked(component: &str) -> Option<(&str, &str, u64)> {
    let mut it = component.splitn(3, ':');
    let tag = it.next()?;
    let name = it.next()?;
    let n = it.next()?.parse().ok()?;
    matches!(tag, "vol" | "img").then_some((tag, name, n))
}

fn not_found(e: SnapshotError, kind: &'static str, name: &str) -> SnapshotError {
    match cmd::stderr_of(&e) {
        Some(s) if s.contains("does not exist") => SnapshotError::NotFound {
            kind,
            name: name.to_string(),
        },
        _ => e,
    }
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
        && ds.len() < 200
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

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|source| SnapshotError::Io {
        context: format!("cannot make {} absolute", p.display()),
        source,
    })
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .filter(|s| !s.contains(['\t', '\n', ' ']))
        .ok_or_else(|| {
            SnapshotError::Unsupported(format!(
                "zfs mountpoint {} must be plain UTF-8 without spaces",
                p.display()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parked_names() {
        assert_eq!(parse_parked("vol:a.b-c:3"), Some(("vol", "a.b-c", 3)));
        assert_eq!(parse_parked("img:base:12"), Some(("img", "base", 12)));
        assert_eq!(parse_parked("vol:a"), None);
        assert_eq!(parse_parked("other:a:1"), None);
        assert_eq!(parse_parked("vol:a:x"), None);
    }

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
}
