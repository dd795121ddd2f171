//! Snapshot backends behind one narrow trait.
//!
//! A backend owns a *prefix* (a zfs dataset, a btrfs directory, a plain directory) and never
//! touches anything outside it. Inside the prefix it keeps three kinds of objects:
//!
//! - **bases**: read-only images (`images/<name>`), made once by [`SnapshotBackend::create_base`];
//! - **volumes**: writable root filesystems of sandboxes (`volumes/<vol>`), made from a base or
//!   cloned from a snapshot;
//! - **snapshots**: read-only, point-in-time copies of a volume (`<vol>@<snap>`), the filesystem
//!   half of a checkpoint node.
//!
//! Names given to the backend are validated by [`validate_name`]: `[A-Za-z0-9._-]`, not starting
//! with `.` or `-`, at most 128 bytes. Every external command (zfs, zpool, btrfs, mount, cp) goes
//! through [`cmd`], the one place where this crate has privileged effects.

pub mod btrfs;
pub mod cmd;
pub mod dir;
pub mod fake;
pub mod pool;
pub mod zfs;

use std::path::{Path, PathBuf};

/// Errors of every snapshot operation. Messages are lower-case and name the object involved.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "invalid name {0:?}: use letters, digits, '.', '_' and '-', not starting with '.' or '-'"
    )]
    InvalidName(String),
    #[error("{kind} {name} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{what} is busy: {detail}")]
    Busy { what: String, detail: String },
    #[error("command `{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

/// What a snapshot costs to keep, measured when it is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// Bytes written to the volume since its previous snapshot (or since it was created or cloned):
    /// zfs `written`, btrfs `find-new` extent lengths, dir: the size of the full copy.
    pub bytes: u64,
}

/// One object that the backend holds under its prefix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Entry {
    Base { name: String },
    Volume { name: String },
    Snapshot { volume: String, name: String },
}

/// Which backend, for display and for `doctor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    Zfs,
    Btrfs,
    Dir,
    Fake,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Zfs => "zfs",
            Kind::Btrfs => "btrfs",
            Kind::Dir => "dir",
            Kind::Fake => "fake",
        })
    }
}

/// A snapshot-capable store of root filesystems. All methods are blocking; callers run them on a
/// blocking thread. Implementations must be safe to call from several threads at once for
/// *different* volumes.
pub trait SnapshotBackend: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> Kind;
    /// One line for `doctor` and logs, e.g. "btrfs at /var/lib/sandtree/storage/mnt (loop image)".
    fn describe(&self) -> String;

    /// Makes a read-only base `image` by calling `populate` on an empty writable directory, then
    /// sealing it. If `populate` fails, nothing is left behind and the error is returned.
    fn create_base(&self, image: &str, populate: &mut dyn FnMut(&Path) -> Result<()>)
        -> Result<()>;
    fn has_base(&self, image: &str) -> Result<bool>;
    fn destroy_base(&self, image: &str) -> Result<()>;

    /// Makes writable volume `vol` from base `image` and returns its mounted path.
    fn create_volume(&self, vol: &str, image: &str) -> Result<PathBuf>;
    /// Path where `vol` is mounted (the sandbox's rootfs).
    fn volume_path(&self, vol: &str) -> Result<PathBuf>;
    /// Takes snapshot `snap` of `vol`. The caller guarantees nothing writes to `vol` meanwhile.
    fn snapshot(&self, vol: &str, snap: &str) -> Result<SnapshotInfo>;
    /// Takes several snapshots at once, one per `(vol, snap)`, each as [`Self::snapshot`]
    /// would, and returns their results in the order asked. The caller guarantees nothing writes
    /// to any of the volumes meanwhile. zfs takes them with one `zfs snapshot` (one transaction
    /// group: all or none); the default takes them one after another.
    fn snapshot_many(&self, items: &[(&str, &str)]) -> Vec<Result<SnapshotInfo>> {
        items.iter().map(|(v, s)| self.snapshot(v, s)).collect()
    }
    /// Makes writable volume `new_vol` from snapshot `vol@snap` and returns its path.
    fn clone_snapshot(&self, vol: &str, snap: &str, new_vol: &str) -> Result<PathBuf>;
    /// Returns `vol` to the contents of `vol@snap`, discarding later changes. Later snapshots of
    /// `vol` may be destroyed by this (as `zfs rollback -r` does) only if the caller allows it.
    fn rollback(&self, vol: &str, snap: &str) -> Result<()>;
    /// True if `vol` changed since its latest snapshot (or since creation if it has none).
    /// Reads alone must not count (atime is off on every volume).
    fn changed_since_last_snapshot(&self, vol: &str) -> Result<bool>;
    /// Destroys volume `vol`. Snapshots of it that other volumes were cloned from stay readable
    /// for those clones until they are gone (zfs: the volume is parked and reaped by [`gc`]).
    fn destroy_volume(&self, vol: &str) -> Result<()>;
    fn destroy_snapshot(&self, vol: &str, snap: &str) -> Result<()>;
    /// Caps the size of volume `vol`'s filesystem (everything it references, its image's files
    /// included) at `bytes`: writes beyond it fail with EDQUOT or ENOSPC inside the sandbox.
    /// Backends that cannot enforce it say so ([`SnapshotError::Unsupported`]).
    fn set_quota(&self, vol: &str, bytes: u64) -> Result<()>;
    /// Everything under the prefix (parked objects excluded).
    fn list(&self) -> Result<Vec<Entry>>;
    /// Reaps parked objects whose dependents are gone. Returns how many were removed.
    fn gc(&self) -> Result<usize>;
}

/// Checks a name given to a backend. See the crate docs for the rule.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::InvalidName(name.to_string()))
    }
}

/// Where a backend lives, as the user names it with `--storage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageSpec {
    /// The embedded default: a loop-backed btrfs image in the data dir.
    Btrfs,
    /// An existing zfs dataset: `zfs:POOL/DATASET`. sandtree works under it and nowhere else.
    Zfs { dataset: String },
    /// A plain directory with `cp --reflink=auto`.
    Dir,
}

impl std::str::FromStr for StorageSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "btrfs" => Ok(StorageSpec::Btrfs),
            "dir" => Ok(StorageSpec::Dir),
            _ => match s.strip_prefix("zfs:") {
                Some(ds)
                    if !ds.is_empty()
                        && ds.contains('/')
                        && !ds.contains("..")
                        && !ds.contains('@') =>
                {
                    Ok(StorageSpec::Zfs {
                        dataset: ds.trim_end_matches('/').to_string(),
                    })
                }
                _ => Err(format!(
                    "invalid storage {s:?}: expected btrfs, dir or zfs:POOL/DATASET"
                )),
            },
        }
    }
}

/// Opens the backend for `spec` with its state under `data_dir` (the loop image, dir volumes).
/// For btrfs this creates and mounts the loop-backed image on first use.
pub fn open(spec: &StorageSpec, data_dir: &Path) -> Result<Box<dyn SnapshotBackend>> {
    match spec {
        StorageSpec::Btrfs => {
            let mnt = pool::ensure_btrfs_loop(&data_dir.join("storage"), pool::DEFAULT_LOOP_SIZE)?;
            // The loop image is sandtree's own filesystem: it may turn quotas on there.
            Ok(Box::new(btrfs::Btrfs::open(&mnt)?.owning_the_filesystem()))
        }
        StorageSpec::Zfs { dataset } => {
            Ok(Box::new(zfs::Zfs::open(dataset, &data_dir.join("zfs"))?))
        }
        StorageSpec::Dir => Ok(Box::new(dir::Dir::open(
            &data_dir.join("storage").join("dir"),
        )?)),
    }
}

/// fsync(2) of a directory, which makes the names in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|source| SnapshotError::Io {
            context: format!("cannot fsync {}", dir.display()),
            source,
        })
}

/// syncfs(2) of the file system holding `path`.
pub(crate) fn syncfs(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).map_err(|source| SnapshotError::Io {
        context: format!("cannot open {}", path.display()),
        source,
    })?;
    // SAFETY: syncfs(2) on an fd owned for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(SnapshotError::Io {
            context: format!("cannot sync the file system of {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
