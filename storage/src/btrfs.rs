//! btrfs backend: subvolumes and subvolume snapshots on a mounted btrfs filesystem.
//!
//! # Layout
//!
//! Under `<root>/sandtree/` (`<root>` is a directory of a mounted btrfs, normally the loop image
//! of [`crate::pool::ensure_btrfs_loop`]):
//!
//! | path | what |
//! |---|---|
//! | `LAYOUT` | `sandtree-btrfs-layout 1` |
//! | `images/<name>` | a base: a read-only subvolume |
//! | `volumes/<vol>` | a volume: a writable snapshot of a base or of a snapshot |
//! | `snapshots/<vol>/<snap>` | a read-only snapshot of a volume |
//! | `meta/<vol>` | `sandtree-btrfs-generations 1`, then the volume's generation when it was made and at each of its live snapshots |
//! | `tmp/` | work in progress; whatever a crash leaves there is cleaned up by [`Btrfs::open`] |
//!
//! Snapshots are independent subvolumes: destroying a volume or a base never affects its
//! snapshots or clones, so nothing is ever parked and [`SnapshotBackend::gc`] has nothing to do.
//!
//! # Bytes and change detection
//!
//! Every btrfs tree block and file extent carries the transaction id (generation) that wrote it,
//! and a subvolume's root item carries the generation of the last transaction that changed
//! anything in that subvolume. `meta/<vol>` records the volume's generation when it was made
//! (created, cloned or rolled back) and right after each of its snapshots (taking a snapshot
//! bumps the source's generation, so it is read afterwards). The reference generation `G` is the
//! largest recorded one among the creation and the snapshots that still exist, so that, as with
//! zfs `written`, destroying the latest snapshot folds its bytes into the next one.
//!
//! - `SnapshotInfo::bytes` is the sum of the `len` of the file extents that
//!   `btrfs subvolume find-new <new snapshot> G+1` reports: the data extents written since the
//!   previous snapshot and still referenced (inline extents count their inline length). Like zfs
//!   `written`, data written and then deleted before the snapshot does not count, and neither
//!   does metadata.
//! - `changed_since_last_snapshot` is true iff the volume's current generation (the "transid
//!   marker" of `find-new`, which first commits the running transaction) is greater than `G`.
//!   Any change to the subvolume's tree counts, including metadata-only ones: `rm`, `mkdir`,
//!   `mv`, `chmod`, `touch`, `ln -s`. Reads do not, as long as the filesystem is mounted with
//!   `noatime` (the loop image is; [`Btrfs::open`] warns otherwise).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{
    cmd, pool, validate_name, Entry, Kind, Result, SnapshotBackend, SnapshotError, SnapshotInfo,
};

const LAYOUT: &str = "sandtree-btrfs-layout 1";
const META_MAGIC: &str = "sandtree-btrfs-generations 1";

/// The btrfs backend. See the module docs.
#[derive(Debug)]
pub struct Btrfs {
    fs_root: PathBuf,
    root: PathBuf,
    seq: AtomicU64,
    /// The whole filesystem is sandtree's (the embedded loop image): filesystem-wide settings
    /// such as quotas may be changed.
    owns_fs: bool,
    quotas_on: std::sync::atomic::AtomicBool,
}

impl Btrfs {
    /// Opens (and on first use lays out) the backend in `<root>/sandtree`. `root` must be on a
    /// mounted btrfs filesystem.
    /// Marks the filesystem as sandtree's own (the embedded loop image), so that
    /// [`SnapshotBackend::set_quota`] may turn btrfs quotas on for it.
    pub fn owning_the_filesystem(mut self) -> Btrfs {
        self.owns_fs = true;
        self
    }

    /// Turns quota groups on (once) if they are off: only on a filesystem sandtree owns.
    fn ensure_quotas(&self) -> Result<()> {
        if self.quotas_on.load(Ordering::Relaxed) {
            return Ok(());
        }
        let on = cmd::run(
            "btrfs",
            [
                std::ffi::OsStr::new("qgroup"),
                "show".as_ref(),
                self.fs_root.as_os_str(),
            ],
        )
        .is_ok();
        if !on {
            if !self.owns_fs {
                return Err(SnapshotError::Unsupported(format!(
                    "btrfs quotas are off on {} and that filesystem is not sandtree's to change; \
                     turn them on with `btrfs quota enable` or run without a disk limit",
                    self.fs_root.display()
                )));
            }
            cmd::run(
                "btrfs",
                [
                    std::ffi::OsStr::new("quota"),
                    "enable".as_ref(),
                    self.fs_root.as_os_str(),
                ],
            )?;
            tracing::info!(fs = %self.fs_root.display(), "enabled btrfs quotas");
        }
        self.quotas_on.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub fn open(root: &Path) -> Result<Btrfs> {
        let fs_root = std::fs::canonicalize(root)
            .map_err(|source| io(format!("cannot open btrfs root {}", root.display()), source))?;
        let fstype = cmd::run(
            "stat",
            [
                std::ffi::OsStr::new("-f"),
                "-c".as_ref(),
                "%T".as_ref(),
                fs_root.as_os_str(),
            ],
        )?;
        if fstype.trim() != "btrfs" {
            return Err(SnapshotError::Unsupported(format!(
                "{} is on {}, not btrfs",
                fs_root.display(),
                fstype.trim()
            )));
        }
        let me = Btrfs {
            root: fs_root.join("sandtree"),
            fs_root,
            seq: AtomicU64::new(0),
            owns_fs: false,
            quotas_on: std::sync::atomic::AtomicBool::new(false),
        };
        for dir in [
            me.root.clone(),
            me.images(),
            me.volumes(),
            me.snapshots(),
            me.meta(),
            me.tmp(),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| io(format!("cannot create {}", dir.display()), source))?;
        }
        let layout = me.root.join("LAYOUT");
        match std::fs::read_to_string(&layout) {
            Ok(s) if s.trim() == LAYOUT => {}
            Ok(s) => {
                return Err(SnapshotError::Unsupported(format!(
                    "{} says {:?}; this build knows {LAYOUT:?}",
                    layout.display(),
                    s.trim()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_atomic(&layout, &format!("{LAYOUT}\n"))?
            }
            Err(source) => return Err(io(format!("cannot read {}", layout.display()), source)),
        }
        match pool::mount_containing(&me.fs_root)? {
            Some(m) if m.options.split(',').any(|o| o == "noatime") => {}
            m => tracing::warn!(
                root = %me.fs_root.display(),
                options = m.map(|m| m.options).unwrap_or_default(),
                "btrfs is not mounted with noatime: reads may count as changes"
            ),
        }
        me.recover()?;
        tracing::info!(root = %me.root.display(), "opened btrfs backend");
        Ok(me)
    }

    /// The directory that holds everything (`<root>/sandtree`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    fn volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }
    fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    fn meta(&self) -> PathBuf {
        self.root.join("meta")
    }
    fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }
    fn image_path(&self, image: &str) -> PathBuf {
        self.images().join(image)
    }
    fn volume(&self, vol: &str) -> PathBuf {
        self.volumes().join(vol)
    }
    fn snapshot_path(&self, vol: &str, snap: &str) -> PathBuf {
        self.snapshots().join(vol).join(snap)
    }
    fn unique_tmp(&self, what: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.tmp()
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    /// Cleans `tmp/`: an interrupted rollback is undone (`old-<vol>` goes back if the volume is
    /// missing), everything else there is deleted.
    fn recover(&self) -> Result<()> {
        for entry in read_dir(&self.tmp())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if let Some(vol) = name
                .strip_prefix("old-")
                .and_then(|r| r.split_once('~'))
                .map(|(v, _)| v)
            {
                let target = self.volume(vol);
                if validate_name(vol).is_ok() && !target.exists() {
                    tracing::warn!(vol, "undoing an interrupted rollback");
                    rename(&path, &target)?;
                    continue;
                }
            }
            tracing::warn!(path = %path.display(), "removing leftover from an interrupted operation");
            delete_subvolume_tree(&path)?;
        }
        Ok(())
    }

    fn read_record(&self, vol: &str) -> Result<GenRecord> {
        let path = self.meta().join(vol);
        match std::fs::read_to_string(&path) {
            Ok(s) => match GenRecord::parse(&s) {
                Some(r) => return Ok(r),
                None => {
                    tracing::warn!(path = %path.display(), "unreadable generation record; using creation generation")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(io(format!("cannot read {}", path.display()), source)),
        }
        Ok(GenRecord {
            base: creation_generation(&self.volume(vol))?,
            snaps: Vec::new(),
        })
    }

    fn write_record(&self, vol: &str, record: &GenRecord) -> Result<()> {
        write_atomic(&self.meta().join(vol), &record.render())
    }

    /// Starts a fresh record for a volume that was just made (or remade by a rollback).
    fn record_new_volume(&self, vol: &str, keep_snaps: Vec<(String, u64)>) -> Result<()> {
        let base = generation(&self.volume(vol))?;
        self.write_record(
            vol,
            &GenRecord {
                base,
                snaps: keep_snaps,
            },
        )
    }

    fn require_volume(&self, vol: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        let p = self.volume(vol);
        if p.is_dir() {
            Ok(p)
        } else {
            Err(SnapshotError::NotFound {
                kind: "volume",
                name: vol.to_string(),
            })
        }
    }

    fn require_snapshot(&self, vol: &str, snap: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        validate_name(snap)?;
        let p = self.snapshot_path(vol, snap);
        if p.is_dir() {
            Ok(p)
        } else {
            Err(SnapshotError::NotFound {
                kind: "snapshot",
                name: format!("{vol}@{snap}"),
            })
        }
    }

    /// Makes writable volume `vol` as a snapshot of `source`.
    fn make_volume(&self, source: &Path, vol: &str) -> Result<PathBuf> {
        let target = self.volume(vol);
        if target.exists() {
            return Err(SnapshotError::Exists {
                kind: "volume",
                name: vol.to_string(),
            });
        }
        snapshot_subvolume(source, &target, false).map_err(|e| match cmd::stderr_of(&e) {
            Some(s) if s.contains("exists") => SnapshotError::Exists {
                kind: "volume",
                name: vol.to_string(),
            },
            _ => e,
        })?;
        if let Err(e) = self.record_new_volume(vol, Vec::new()) {
            let _ = delete_subvolume_tree(&target);
            return Err(e);
        }
        Ok(target)
    }
}

impl SnapshotBackend for Btrfs {
    fn kind(&self) -> Kind {
        Kind::Btrfs
    }

    fn describe(&self) -> String {
        match pool::mount_containing(&self.fs_root) {
            Ok(Some(m)) if m.source.starts_with("/dev/loop") => {
                format!(
                    "btrfs at {} (loop device {})",
                    self.fs_root.display(),
                    m.source
                )
            }
            Ok(Some(m)) => format!("btrfs at {} ({})", self.fs_root.display(), m.source),
            _ => format!("btrfs at {}", self.fs_root.display()),
        }
    }

    fn create_base(
        &self,
        image: &str,
        populate: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<()> {
        validate_name(image)?;
        let target = self.image_path(image);
        if target.exists() {
            return Err(SnapshotError::Exists {
                kind: "base image",
                name: image.to_string(),
            });
        }
        let work = self.unique_tmp(&format!("base-{image}"));
        cmd::run(
            "btrfs",
            [
                std::ffi::OsStr::new("subvolume"),
                "create".as_ref(),
                work.as_os_str(),
            ],
        )?;
        // Deleted on every exit, including a panic in `populate`.
        let _work = TmpSubvolume(Some(work.clone()));
        populate(&work)?;
        snapshot_subvolume(&work, &target, true).map_err(|e| match cmd::stderr_of(&e) {
            Some(s) if s.contains("exists") => SnapshotError::Exists {
                kind: "base image",
                name: image.to_string(),
            },
            _ => e,
        })?;
        // Making a snapshot commits a btrfs transaction, which holds the base's files; the
        // name in images/, and images/ in its parent, are fsynced before the base counts as made.
        crate::fsync_dir(&self.images())?;
        crate::fsync_dir(&self.root)?;
        tracing::info!(image, path = %target.display(), "created base image");
        Ok(())
    }

    fn has_base(&self, image: &str) -> Result<bool> {
        validate_name(image)?;
        Ok(self.image_path(image).is_dir())
    }

    fn destroy_base(&self, image: &str) -> Result<()> {
        validate_name(image)?;
        let p = self.image_path(image);
        if !p.is_dir() {
            return Err(SnapshotError::NotFound {
                kind: "base image",
                name: image.to_string(),
            });
        }
        delete_subvolume_tree(&p)
    }

    fn create_volume(&self, vol: &str, image: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        validate_name(image)?;
        let base = self.image_path(image);
        if !base.is_dir() {
            return Err(SnapshotError::NotFound {
                kind: "base image",
                name: image.to_string(),
            });
        }
        let path = self.make_volume(&base, vol)?;
        tracing::info!(vol, image, "created btrfs volume");
        Ok(path)
    }

    fn volume_path(&self, vol: &str) -> Result<PathBuf> {
        self.require_volume(vol)
    }

    fn snapshot(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        let source = self.require_volume(vol)?;
        validate_name(snap)?;
        let target = self.snapshot_path(vol, snap);
        if target.exists() {
            return Err(SnapshotError::Exists {
                kind: "snapshot",
                name: format!("{vol}@{snap}"),
            });
        }
        let mut record = self.read_record(vol)?;
        let since = record.latest();
        let dir = self.snapshots().join(vol);
        std::fs::create_dir_all(&dir)
            .map_err(|source| io(format!("cannot create {}", dir.display()), source))?;
        snapshot_subvolume(&source, &target, true)?;
        let bytes = bytes_written_since(&target, since)?;
        // Taking the snapshot bumped the volume's generation: read it now.
        record.snaps.push((snap.to_string(), generation(&source)?));
        self.write_record(vol, &record)?;
        tracing::debug!(vol, snap, bytes, since, "took btrfs snapshot");
        Ok(SnapshotInfo { bytes })
    }

    fn clone_snapshot(&self, vol: &str, snap: &str, new_vol: &str) -> Result<PathBuf> {
        let source = self.require_snapshot(vol, snap)?;
        validate_name(new_vol)?;
        let path = self.make_volume(&source, new_vol)?;
        tracing::info!(vol, snap, new_vol, "cloned btrfs snapshot");
        Ok(path)
    }

    fn rollback(&self, vol: &str, snap: &str) -> Result<()> {
        let current = self.require_volume(vol)?;
        let source = self.require_snapshot(vol, snap)?;
        // Build the new volume aside, swap it in with two renames, then delete the old one.
        // A crash between the renames is undone by `recover`.
        let fresh = self.unique_tmp(&format!("rb-{vol}"));
        snapshot_subvolume(&source, &fresh, false)?;
        let fresh = TmpSubvolume(Some(fresh));
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let old = self.tmp().join(format!("old-{vol}~{n}"));
        rename(&current, &old)?;
        if let Err(e) = rename(fresh.path(), &current) {
            let _ = rename(&old, &current);
            return Err(e);
        }
        fresh.kept();
        delete_subvolume_tree(&old)?;
        let keep = self.read_record(vol).map(|r| r.snaps).unwrap_or_default();
        self.record_new_volume(vol, keep)?;
        tracing::info!(vol, snap, "rolled back btrfs volume");
        Ok(())
    }

    fn changed_since_last_snapshot(&self, vol: &str) -> Result<bool> {
        let path = self.require_volume(vol)?;
        let recorded = self.read_record(vol)?.latest();
        Ok(generation(&path)? > recorded)
    }

    fn destroy_volume(&self, vol: &str) -> Result<()> {
        let path = self.require_volume(vol)?;
        delete_subvolume_tree(&path)?;
        match std::fs::remove_file(self.meta().join(vol)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(vol, error = %e, "cannot remove generation record")
            }
            _ => {}
        }
        tracing::info!(vol, "destroyed btrfs volume");
        Ok(())
    }

    fn destroy_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        let path = self.require_snapshot(vol, snap)?;
        delete_subvolume_tree(&path)?;
        // The next snapshot of `vol` counts from the latest snapshot that still exists.
        if self.volume(vol).is_dir() {
            let mut record = self.read_record(vol)?;
            record.snaps.retain(|(s, _)| s != snap);
            self.write_record(vol, &record)?;
        }
        // Fails harmlessly while other snapshots of `vol` remain.
        let _ = std::fs::remove_dir(self.snapshots().join(vol));
        Ok(())
    }

    fn set_quota(&self, vol: &str, bytes: u64) -> Result<()> {
        let path = self.require_volume(vol)?;
        self.ensure_quotas()?;
        cmd::run(
            "btrfs",
            [
                std::ffi::OsStr::new("qgroup"),
                "limit".as_ref(),
                bytes.to_string().as_ref(),
                path.as_os_str(),
            ],
        )
        .map(drop)
    }

    fn list(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for name in names_in(&self.images())? {
            out.push(Entry::Base { name });
        }
        for name in names_in(&self.volumes())? {
            out.push(Entry::Volume { name });
        }
        for volume in names_in(&self.snapshots())? {
            for name in names_in(&self.snapshots().join(&volume))? {
                out.push(Entry::Snapshot {
                    volume: volume.clone(),
                    name,
                });
            }
        }
        Ok(out)
    }

    fn gc(&self) -> Result<usize> {
        Ok(0)
    }
}

/// `meta/<vol>`: the volume's generation when it was made, and at each of its snapshots that
/// still exist.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GenRecord {
    base: u64,
    snaps: Vec<(String, u64)>,
}

impl GenRecord {
    /// The generation that the next snapshot counts from.
    fn latest(&self) -> u64 {
        self.snaps.iter().map(|(_, g)| *g).fold(self.base, u64::max)
    }

    fn render(&self) -> String {
        let mut s = format!("{META_MAGIC}\nbase {}\n", self.base);
        for (name, gen) in &self.snaps {
            s.push_str(&format!("snap {name} {gen}\n"));
        }
        s
    }

    fn parse(s: &str) -> Option<GenRecord> {
        let mut lines = s.lines();
        if lines.next()? != META_MAGIC {
            return None;
        }
        let base = lines.next()?.strip_prefix("base ")?.parse().ok()?;
        let mut snaps = Vec::new();
        for line in lines {
            let mut w = line.strip_prefix("snap ")?.split(' ');
            snaps.push((w.next()?.to_string(), w.next()?.parse().ok()?));
        }
        Some(GenRecord { base, snaps })
    }
}

/// A subvolume in `tmp/` that is deleted when dropped, unless it was moved into place.
struct TmpSubvolume(Option<PathBuf>);

impl TmpSubvolume {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// It was renamed into place: nothing to delete.
    fn kept(mut self) {
        self.0 = None;
    }
}

impl Drop for TmpSubvolume {
    fn drop(&mut self) {
        if let Some(p) = self.0.take().filter(|p| p.exists()) {
            if let Err(e) = delete_subvolume_tree(&p) {
                tracing::error!(path = %p.display(), error = %e, "cannot delete temporary subvolume");
            }
        }
    }
}

fn snapshot_subvolume(source: &Path, target: &Path, readonly: bool) -> Result<()> {
    let mut args = vec![std::ffi::OsStr::new("subvolume"), "snapshot".as_ref()];
    if readonly {
        args.push("-r".as_ref());
    }
    args.extend([source.as_os_str(), target.as_os_str()]);
    cmd::run("btrfs", args).map(drop)
}

/// Deletes subvolume `path`, first deleting any subvolume nested inside it (a sandbox may have
/// made some), deepest first.
fn delete_subvolume_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if !is_subvolume(path)? {
        return std::fs::remove_dir_all(path)
            .map_err(|source| io(format!("cannot remove {}", path.display()), source));
    }
    match cmd::run(
        "btrfs",
        [
            std::ffi::OsStr::new("subvolume"),
            "delete".as_ref(),
            path.as_os_str(),
        ],
    ) {
        Ok(_) => Ok(()),
        Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("not empty")) => {
            let mut nested = Vec::new();
            find_nested_subvolumes(path, &mut nested)?;
            // Deepest first.
            nested.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for p in nested {
                cmd::run(
                    "btrfs",
                    [
                        std::ffi::OsStr::new("subvolume"),
                        "delete".as_ref(),
                        p.as_os_str(),
                    ],
                )?;
            }
            cmd::run(
                "btrfs",
                [
                    std::ffi::OsStr::new("subvolume"),
                    "delete".as_ref(),
                    path.as_os_str(),
                ],
            )
            .map(drop)
        }
        Err(e) => Err(e),
    }
}

/// The root directory of every btrfs subvolume has inode number 256.
fn is_subvolume(path: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)
        .map_err(|source| io(format!("cannot stat {}", path.display()), source))?;
    Ok(m.is_dir() && m.ino() == 256)
}

fn find_nested_subvolumes(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in read_dir(dir)? {
        let path = entry.path();
        let ft = entry
            .file_type()
            .map_err(|source| io(format!("cannot stat {}", path.display()), source))?;
        if ft.is_dir() {
            if is_subvolume(&path)? {
                out.push(path.clone());
            }
            find_nested_subvolumes(&path, out)?;
        }
    }
    Ok(())
}

/// Current generation of subvolume `path`, after committing the running transaction.
fn generation(path: &Path) -> Result<u64> {
    let out = cmd::run(
        "btrfs",
        [
            std::ffi::OsStr::new("subvolume"),
            "find-new".as_ref(),
            path.as_os_str(),
            (1u64 << 62).to_string().as_ref(),
        ],
    )?;
    out.lines()
        .find_map(|l| {
            l.strip_prefix("transid marker was ")
                .and_then(|n| n.trim().parse().ok())
        })
        .ok_or_else(|| {
            SnapshotError::Unsupported(format!(
                "btrfs find-new on {} printed no transid marker",
                path.display()
            ))
        })
}

fn creation_generation(path: &Path) -> Result<u64> {
    let out = cmd::run(
        "btrfs",
        [
            std::ffi::OsStr::new("subvolume"),
            "show".as_ref(),
            path.as_os_str(),
        ],
    )?;
    out.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Gen at creation:")
                .and_then(|n| n.trim().parse().ok())
        })
        .ok_or_else(|| {
            SnapshotError::Unsupported(format!(
                "btrfs subvolume show {} printed no generation",
                path.display()
            ))
        })
}

/// Sum of the lengths of the file extents in `path` written after generation `since`.
fn bytes_written_since(path: &Path, since: u64) -> Result<u64> {
    let out = cmd::run(
        "btrfs",
        [
            std::ffi::OsStr::new("subvolume"),
            "find-new".as_ref(),
            path.as_os_str(),
            (since + 1).to_string().as_ref(),
        ],
    )?;
    Ok(out.lines().filter_map(extent_len).sum())
}

/// `len` of a find-new line: `inode 257 file offset 0 len 1048576 disk start … gen 8 flags NONE f`.
fn extent_len(line: &str) -> Option<u64> {
    if !line.starts_with("inode ") {
        return None;
    }
    let mut words = line.split(' ');
    words.by_ref().find(|w| *w == "len")?;
    words.next()?.parse().ok()
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    std::fs::read_dir(dir)
        .and_then(|rd| rd.collect::<std::io::Result<Vec<_>>>())
        .map_err(|source| io(format!("cannot list {}", dir.display()), source))
}

/// Valid object names in `dir`, sorted.
fn names_in(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = read_dir(dir)?
        .into_iter()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| validate_name(n).is_ok())
        .collect();
    names.sort();
    Ok(names)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| {
        io(
            format!("cannot rename {} to {}", from.display(), to.display()),
            source,
        )
    })
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, contents)
        .map_err(|source| io(format!("cannot write {}", tmp.display()), source))?;
    rename(&tmp, path)
}

fn io(context: String, source: std::io::Error) -> SnapshotError {
    SnapshotError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_find_new_lines() {
        let l = "inode 258 file offset 0 len 3145728 disk start 14680064 offset 0 gen 21 flags NONE big file";
        assert_eq!(extent_len(l), Some(3145728));
        let l = "inode 259 file offset 0 len 6 disk start 0 offset 0 gen 21 flags INLINE small";
        assert_eq!(extent_len(l), Some(6));
        assert_eq!(extent_len("transid marker was 21"), None);
    }

    #[test]
    fn generation_records_round_trip() {
        let r = GenRecord {
            base: 7,
            snaps: vec![("a".into(), 9), ("b.c".into(), 12)],
        };
        assert_eq!(GenRecord::parse(&r.render()), Some(r.clone()));
        assert_eq!(r.latest(), 12);
        assert_eq!(
            GenRecord {
                base: 20,
                snaps: vec![("a".into(), 9)]
            }
            .latest(),
            20
        );
        assert_eq!(GenRecord::parse("something else\nbase 1\n"), None);
    }
}
