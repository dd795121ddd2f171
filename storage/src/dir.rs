//! Plain-directory backend: every volume and snapshot is a full copy made with
//! `cp -a --reflink=auto` (cheap on filesystems with reflinks, such as xfs and btrfs; a real copy
//! elsewhere). The fallback when neither zfs nor btrfs is available.
//!
//! # Layout
//!
//! Under the root directory:
//!
//! | path | what |
//! |---|---|
//! | `LAYOUT` | `sandtree-dir-layout 1` |
//! | `images/<name>` | a base |
//! | `volumes/<vol>` | a volume |
//! | `snapshots/<vol>/<snap>` | a snapshot of a volume |
//! | `images/.<name>.mode`, `snapshots/<vol>/.<snap>.mode` | the octal mode that the copy's top directory had |
//! | `meta/<vol>` | `sandtree-dir-fingerprints 1`, then the volume's fingerprint when it was made (or rolled back) and at each later snapshot that still exists |
//! | `tmp/` | copies in progress; cleaned by [`Dir::open`] |
//!
//! Bases and snapshots are made read-only by clearing the write bits of their top directory
//! (`chmod a-w`), which stops unprivileged writers; copies made from them get the recorded mode
//! back. Every copy is made under `tmp/` and renamed into place, so none is ever seen half-made.
//!
//! # Bytes and change detection
//!
//! - `SnapshotInfo::bytes` is the disk usage of the new copy (`st_blocks * 512`, hard links counted
//!   once): what keeping it costs without reflinks, whatever changed.
//! - `changed_since_last_snapshot` compares a fingerprint of the volume with the one recorded at
//!   its latest snapshot that still exists (or at its creation or rollback). The fingerprint is an FNV-1a hash over a sorted walk of
//!   every entry: relative path, file type, mode, uid, gid, size, rdev, link count, mtime and
//!   ctime (to the nanosecond) and symlink target. Any write, `rm`, `mkdir`, `mv`, `chmod`,
//!   `chown`, `touch` or xattr change alters a size, an mtime or a ctime; reads change only atime,
//!   which is left out. A walk costs time in proportion to the number of files.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::btrfs::write_atomic;
use crate::{
    cmd, validate_name, Entry, Kind, Result, SnapshotBackend, SnapshotError, SnapshotInfo,
};
use crate::{fsync_dir, syncfs};

const LAYOUT: &str = "sandtree-dir-layout 1";
const META_MAGIC: &str = "sandtree-dir-fingerprints 1";

/// The plain-directory backend. See the module docs.
#[derive(Debug)]
pub struct Dir {
    root: PathBuf,
    seq: AtomicU64,
}

impl Dir {
    /// Opens (and on first use lays out) the backend in directory `root`.
    pub fn open(root: &Path) -> Result<Dir> {
        std::fs::create_dir_all(root)
            .map_err(|source| io(format!("cannot create {}", root.display()), source))?;
        let root = std::fs::canonicalize(root)
            .map_err(|source| io(format!("cannot resolve {}", root.display()), source))?;
        let me = Dir {
            root,
            seq: AtomicU64::new(0),
        };
        for dir in [
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
        me.recover()?;
        tracing::info!(root = %me.root.display(), "opened dir backend");
        Ok(me)
    }

    /// The root directory.
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

    /// Cleans `tmp/`, undoing an interrupted rollback (see [`crate::btrfs`]).
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
            remove_tree(&path)?;
        }
        Ok(())
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

    fn read_record(&self, vol: &str) -> Result<Option<FpRecord>> {
        let path = self.meta().join(vol);
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let r = FpRecord::parse(&s);
                if r.is_none() {
                    tracing::warn!(path = %path.display(), "unreadable fingerprint record; the volume counts as changed");
                }
                Ok(r)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io(format!("cannot read {}", path.display()), source)),
        }
    }

    fn write_record(&self, vol: &str, record: &FpRecord) -> Result<()> {
        write_atomic(&self.meta().join(vol), &record.render())
    }

    /// Starts a fresh record for a volume that was just made or rolled back.
    fn record_new_volume(&self, vol: &str) -> Result<()> {
        let base = walk(&self.volume(vol))?.fingerprint;
        self.write_record(
            vol,
            &FpRecord {
                base,
                snaps: Vec::new(),
            },
        )
    }

    /// Copies read-only `source` (whose original top mode is in `mode_file`) to a fresh
    /// writable directory under `tmp/` and returns it.
    fn copy_out(&self, source: &Path, mode_file: &Path, what: &str) -> Result<PathBuf> {
        let work = self.unique_tmp(what);
        copy_tree(source, &work)?;
        let mode = read_mode(mode_file)?.unwrap_or(0o755);
        chmod(&work, mode)?;
        Ok(work)
    }

    /// Makes volume `vol` from read-only `source`.
    fn make_volume(&self, source: &Path, mode_file: &Path, vol: &str) -> Result<PathBuf> {
        let target = self.volume(vol);
        if target.exists() {
            return Err(SnapshotError::Exists {
                kind: "volume",
                name: vol.to_string(),
            });
        }
        let work = TmpDir(Some(self.copy_out(
            source,
            mode_file,
            &format!("vol-{vol}"),
        )?));
        rename_new(work.path(), &target, "volume", vol)?;
        work.kept();
        if let Err(e) = self.record_new_volume(vol) {
            let _ = remove_tree(&target);
            return Err(e);
        }
        Ok(target)
    }
}

impl SnapshotBackend for Dir {
    fn kind(&self) -> Kind {
        Kind::Dir
    }

    fn describe(&self) -> String {
        format!("dir at {} (cp -a --reflink=auto)", self.root.display())
    }

    fn create_base(
        &self,
        image: &str,
        populate: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<()> {
        validate_name(image)?;
        let target = self.images().join(image);
        if target.exists() {
            return Err(SnapshotError::Exists {
                kind: "base image",
                name: image.to_string(),
            });
        }
        let work = self.unique_tmp(&format!("base-{image}"));
        std::fs::create_dir(&work)
            .map_err(|source| io(format!("cannot create {}", work.display()), source))?;
        let work = TmpDir(Some(work));
        populate(work.path())?;
        seal(work.path(), &self.images().join(format!(".{image}.mode")))?;
        // Every file of the base (and its mode file) reaches the disk before its name appears
        // in images/, and that name, with images/ in its own parent, before the base counts
        // as made: a crash never leaves a half-written base under a valid name.
        syncfs(work.path())?;
        rename_new(work.path(), &target, "base image", image)?;
        work.kept();
        fsync_dir(&self.images())?;
        fsync_dir(&self.root)?;
        tracing::info!(image, path = %target.display(), "created base image");
        Ok(())
    }

    fn has_base(&self, image: &str) -> Result<bool> {
        validate_name(image)?;
        Ok(self.images().join(image).is_dir())
    }

    fn destroy_base(&self, image: &str) -> Result<()> {
        validate_name(image)?;
        let p = self.images().join(image);
        if !p.is_dir() {
            return Err(SnapshotError::NotFound {
                kind: "base image",
                name: image.to_string(),
            });
        }
        remove_tree(&p)?;
        let _ = std::fs::remove_file(self.images().join(format!(".{image}.mode")));
        Ok(())
    }

    fn create_volume(&self, vol: &str, image: &str) -> Result<PathBuf> {
        validate_name(vol)?;
        validate_name(image)?;
        let base = self.images().join(image);
        if !base.is_dir() {
            return Err(SnapshotError::NotFound {
                kind: "base image",
                name: image.to_string(),
            });
        }
        let path = self.make_volume(&base, &self.images().join(format!(".{image}.mode")), vol)?;
        tracing::info!(vol, image, "created dir volume");
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
        let work = TmpDir(Some(self.unique_tmp(&format!("snap-{vol}"))));
        copy_tree(&source, work.path())?;
        let bytes = walk(work.path())?.bytes;
        let dir = self.snapshots().join(vol);
        std::fs::create_dir_all(&dir)
            .map_err(|source| io(format!("cannot create {}", dir.display()), source))?;
        seal(work.path(), &dir.join(format!(".{snap}.mode")))?;
        rename_new(work.path(), &target, "snapshot", &format!("{vol}@{snap}"))?;
        work.kept();
        let fp = walk(&source)?.fingerprint;
        let mut record = self.read_record(vol)?.unwrap_or(FpRecord {
            base: fp,
            snaps: Vec::new(),
        });
        record.snaps.push((snap.to_string(), fp));
        self.write_record(vol, &record)?;
        tracing::debug!(vol, snap, bytes, "took dir snapshot");
        Ok(SnapshotInfo { bytes })
    }

    fn clone_snapshot(&self, vol: &str, snap: &str, new_vol: &str) -> Result<PathBuf> {
        let source = self.require_snapshot(vol, snap)?;
        validate_name(new_vol)?;
        let mode_file = self.snapshots().join(vol).join(format!(".{snap}.mode"));
        let path = self.make_volume(&source, &mode_file, new_vol)?;
        tracing::info!(vol, snap, new_vol, "cloned dir snapshot");
        Ok(path)
    }

    fn rollback(&self, vol: &str, snap: &str) -> Result<()> {
        let current = self.require_volume(vol)?;
        let source = self.require_snapshot(vol, snap)?;
        let mode_file = self.snapshots().join(vol).join(format!(".{snap}.mode"));
        let fresh = TmpDir(Some(self.copy_out(
            &source,
            &mode_file,
            &format!("rb-{vol}"),
        )?));
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let old = self.tmp().join(format!("old-{vol}~{n}"));
        rename(&current, &old)?;
        if let Err(e) = rename(fresh.path(), &current) {
            let _ = rename(&old, &current);
            return Err(e);
        }
        fresh.kept();
        remove_tree(&old)?;
        self.record_new_volume(vol)?;
        tracing::info!(vol, snap, "rolled back dir volume");
        Ok(())
    }

    fn changed_since_last_snapshot(&self, vol: &str) -> Result<bool> {
        let path = self.require_volume(vol)?;
        let now = walk(&path)?.fingerprint;
        Ok(self.read_record(vol)?.map(|r| r.reference()) != Some(now))
    }

    fn destroy_volume(&self, vol: &str) -> Result<()> {
        let path = self.require_volume(vol)?;
        remove_tree(&path)?;
        let _ = std::fs::remove_file(self.meta().join(vol));
        tracing::info!(vol, "destroyed dir volume");
        Ok(())
    }

    fn destroy_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        let path = self.require_snapshot(vol, snap)?;
        remove_tree(&path)?;
        // The volume now compares against the latest snapshot that still exists.
        if self.volume(vol).is_dir() {
            if let Some(mut record) = self.read_record(vol)? {
                record.snaps.retain(|(s, _)| s != snap);
                self.write_record(vol, &record)?;
            }
        }
        let dir = self.snapshots().join(vol);
        let _ = std::fs::remove_file(dir.join(format!(".{snap}.mode")));
        // Fails harmlessly while other snapshots of `vol` remain.
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    fn set_quota(&self, vol: &str, _bytes: u64) -> Result<()> {
        self.require_volume(vol)?;
        Err(SnapshotError::Unsupported(
            "the dir backend cannot limit a volume's size (use btrfs or zfs for disk limits)"
                .into(),
        ))
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

/// `meta/<vol>`: the fingerprint of the volume when it was made or rolled back, and at each
/// later snapshot that still exists, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FpRecord {
    base: u64,
    snaps: Vec<(String, u64)>,
}

impl FpRecord {
    /// The fingerprint of the latest snapshot (or of the creation).
    fn reference(&self) -> u64 {
        self.snaps.last().map_or(self.base, |(_, fp)| *fp)
    }

    fn render(&self) -> String {
        let mut s = format!("{META_MAGIC}\nbase {:016x}\n", self.base);
        for (name, fp) in &self.snaps {
            s.push_str(&format!("snap {name} {fp:016x}\n"));
        }
        s
    }

    fn parse(s: &str) -> Option<FpRecord> {
        let mut lines = s.lines();
        if lines.next()? != META_MAGIC {
            return None;
        }
        let base = u64::from_str_radix(lines.next()?.strip_prefix("base ")?, 16).ok()?;
        let mut snaps = Vec::new();
        for line in lines {
            let mut w = line.strip_prefix("snap ")?.split(' ');
            snaps.push((
                w.next()?.to_string(),
                u64::from_str_radix(w.next()?, 16).ok()?,
            ));
        }
        Some(FpRecord { base, snaps })
    }
}

/// A directory under `tmp/` that is removed when dropped, unless it was moved into place.
struct TmpDir(Option<PathBuf>);

impl TmpDir {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    fn kept(mut self) {
        self.0 = None;
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take().filter(|p| p.exists()) {
            if let Err(e) = remove_tree(&p) {
                tracing::error!(path = %p.display(), error = %e, "cannot remove temporary directory");
            }
        }
    }
}

/// What a walk of a tree found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    pub fingerprint: u64,
    /// Disk usage: `st_blocks * 512`, each inode once.
    pub bytes: u64,
}

/// Walks `root` in sorted order; see the module docs for what the fingerprint covers.
pub fn walk(root: &Path) -> Result<Walk> {
    let mut h = Fnv::new();
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    walk_into(root, Path::new(""), &mut h, &mut seen, &mut bytes)?;
    Ok(Walk {
        fingerprint: h.0,
        bytes,
    })
}

fn walk_into(
    path: &Path,
    rel: &Path,
    h: &mut Fnv,
    seen: &mut std::collections::HashSet<(u64, u64)>,
    bytes: &mut u64,
) -> Result<()> {
    let m = std::fs::symlink_metadata(path)
        .map_err(|source| io(format!("cannot stat {}", path.display()), source))?;
    h.write(rel.as_os_str().as_encoded_bytes());
    h.write(&[0]);
    for v in [
        m.mode() as u64,
        m.uid() as u64,
        m.gid() as u64,
        m.size(),
        m.rdev(),
        m.nlink(),
        m.mtime() as u64,
        m.mtime_nsec() as u64,
        m.ctime() as u64,
        m.ctime_nsec() as u64,
    ] {
        h.write(&v.to_le_bytes());
    }
    if seen.insert((m.dev(), m.ino())) {
        *bytes += m.blocks() * 512;
    }
    let ft = m.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(path)
            .map_err(|source| io(format!("cannot read link {}", path.display()), source))?;
        h.write(target.as_os_str().as_encoded_bytes());
    } else if ft.is_dir() {
        let mut names: Vec<_> = read_dir(path)?.into_iter().map(|e| e.file_name()).collect();
        names.sort();
        for name in names {
            walk_into(&path.join(&name), &rel.join(&name), h, seen, bytes)?;
        }
    }
    Ok(())
}

/// FNV-1a, 64 bits: a stable hash (unlike `DefaultHasher`), since fingerprints are persisted.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn copy_tree(source: &Path, target: &Path) -> Result<()> {
    cmd::run(
        "cp",
        [
            std::ffi::OsStr::new("-a"),
            "--reflink=auto".as_ref(),
            "--".as_ref(),
            source.as_os_str(),
            target.as_os_str(),
        ],
    )
    .map(drop)
}

/// Records the mode of `dir` in `mode_file` and clears its write bits.
fn seal(dir: &Path, mode_file: &Path) -> Result<()> {
    let mode = std::fs::metadata(dir)
        .map_err(|source| io(format!("cannot stat {}", dir.display()), source))?
        .mode()
        & 0o7777;
    write_atomic(mode_file, &format!("{mode:o}\n"))?;
    chmod(dir, mode & !0o222)
}

fn read_mode(mode_file: &Path) -> Result<Option<u32>> {
    match std::fs::read_to_string(mode_file) {
        Ok(s) => Ok(u32::from_str_radix(s.trim(), 8).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io(format!("cannot read {}", mode_file.display()), source)),
    }
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|source| io(format!("cannot chmod {}", path.display()), source))
}

/// Removes a tree, first giving the owner write permission on directories if that is what
/// stops an unprivileged caller (read-only tops of bases and snapshots, read-only dirs inside).
fn remove_tree(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path)?;
            std::fs::remove_dir_all(path)
                .map_err(|source| io(format!("cannot remove {}", path.display()), source))
        }
        Err(source) => Err(io(format!("cannot remove {}", path.display()), source)),
    }
}

fn make_dirs_writable(path: &Path) -> Result<()> {
    let m = std::fs::symlink_metadata(path)
        .map_err(|source| io(format!("cannot stat {}", path.display()), source))?;
    if m.is_dir() {
        chmod(path, (m.mode() & 0o7777) | 0o700)?;
        for entry in read_dir(path)? {
            make_dirs_writable(&entry.path())?;
        }
    }
    Ok(())
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>> {
    std::fs::read_dir(dir)
        .and_then(|rd| rd.collect::<std::io::Result<Vec<_>>>())
        .map_err(|source| io(format!("cannot list {}", dir.display()), source))
}

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

/// Renames `from` to `to`, which must not exist (a directory rename would replace an empty one).
fn rename_new(from: &Path, to: &Path, kind: &'static str, name: &str) -> Result<()> {
    if to.exists() {
        return Err(SnapshotError::Exists {
            kind,
            name: name.to_string(),
        });
    }
    rename(from, to)
}

fn io(context: String, source: std::io::Error) -> SnapshotError {
    SnapshotError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn fingerprint_ignores_reads_and_sees_metadata_changes() {
        let d = tmp();
        let root = d.path().join("r");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("f"), b"hello").unwrap();
        let a = walk(&root).unwrap();
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"hello");
        let _ = std::fs::read_dir(&root).unwrap().count();
        assert_eq!(
            walk(&root).unwrap(),
            a,
            "reads must not change the fingerprint"
        );
        chmod(&root.join("f"), 0o600).unwrap();
        let b = walk(&root).unwrap();
        assert_ne!(
            a.fingerprint, b.fingerprint,
            "chmod must change the fingerprint"
        );
        std::fs::create_dir(root.join("d")).unwrap();
        let c = walk(&root).unwrap();
        assert_ne!(
            b.fingerprint, c.fingerprint,
            "mkdir must change the fingerprint"
        );
    }

    #[test]
    fn fingerprint_records_round_trip() {
        let r = FpRecord {
            base: 1,
            snaps: vec![("a".into(), u64::MAX), ("b".into(), 3)],
        };
        assert_eq!(FpRecord::parse(&r.render()), Some(r.clone()));
        assert_eq!(r.reference(), 3);
        assert_eq!(
            FpRecord {
                base: 5,
                snaps: vec![]
            }
            .reference(),
            5
        );
    }

    #[test]
    fn fnv_is_stable() {
        let mut h = Fnv::new();
        h.write(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn hard_links_count_once() {
        let d = tmp();
        std::fs::write(d.path().join("f"), vec![7u8; 64 << 10]).unwrap();
        let one = walk(d.path()).unwrap().bytes;
        std::fs::hard_link(d.path().join("f"), d.path().join("g")).unwrap();
        assert_eq!(walk(d.path()).unwrap().bytes, one);
        assert!(one >= 64 << 10);
    }
}
