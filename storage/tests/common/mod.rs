//! Shared fixtures for the storage integration tests: one fresh backend of each kind, each with
//! a guard that removes what it made (pool, mount, loop device, directories) even on panic.
//!
//! Backends that need root or a tool are checked at run time. Outside CI a missing requirement
//! prints "skipping: <reason>" and the test goes on with the other backends; with `CI=true` it
//! panics instead, so CI never skips silently.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use sandtree_storage::{btrfs, cmd, dir, pool, zfs, Kind, SnapshotBackend, SnapshotError};

/// True when running in CI, where a skip is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Prints "skipping: <reason>", or panics in CI.
pub fn skip(reason: &str) {
    if in_ci() {
        panic!("CI=true, so this cannot be skipped: {reason}");
    }
    eprintln!("skipping: {reason}");
}

/// Effective uid 0, read from /proc (no libc call needed).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(str::to_string)
        })
        .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// One backend under test, with whatever must be torn down after it.
pub struct Fixture {
    pub backend: Box<dyn SnapshotBackend>,
    /// Opens the same backend again, as a restarted service would.
    reopen: Box<dyn Fn() -> Box<dyn SnapshotBackend>>,
    /// Dropped after `backend`.
    _guard: Guard,
}

impl Fixture {
    pub fn kind(&self) -> Kind {
        self.backend.kind()
    }

    /// A second handle on the same storage, opened from scratch.
    pub fn reopen(&self) -> Box<dyn SnapshotBackend> {
        (self.reopen)()
    }
}

impl std::ops::Deref for Fixture {
    type Target = dyn SnapshotBackend;
    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

enum Guard {
    Dir(tempfile::TempDir),
    Btrfs(BtrfsLoop),
    Zfs(ZfsPool),
}

/// A loop-mounted btrfs image in a temp dir; unmounted (and its loop device freed) on drop.
pub struct BtrfsLoop {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
}

impl BtrfsLoop {
    pub fn new() -> sandtree_storage::Result<BtrfsLoop> {
        let dir = tempfile::tempdir().map_err(|source| SnapshotError::Io {
            context: "tempdir".into(),
            source,
        })?;
        let mnt = pool::ensure_btrfs_loop(dir.path(), 1 << 30)?;
        Ok(BtrfsLoop { dir, mnt })
    }
}

impl Drop for BtrfsLoop {
    fn drop(&mut self) {
        if let Err(e) = pool::unmount_btrfs_loop(self.dir.path()) {
            eprintln!(
                "cleanup: cannot unmount btrfs loop in {}: {e}",
                self.dir.path().display()
            );
        }
    }
}

/// A zfs pool on a sparse file with a unique name; destroyed on drop.
pub struct ZfsPool {
    pub name: String,
    pub dir: tempfile::TempDir,
}

impl ZfsPool {
    pub fn new() -> sandtree_storage::Result<ZfsPool> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = tempfile::tempdir().map_err(|source| SnapshotError::Io {
            context: "tempdir".into(),
            source,
        })?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "sttest{}x{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        pool::create_file_pool(&name, &dir.path().join("pool.img"), 256 << 20)?;
        Ok(ZfsPool { name, dir })
    }

    /// The dataset that tests hand to `Zfs::open`.
    pub fn dataset(&self) -> String {
        format!("{}/sandtree", self.name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for ZfsPool {
    fn drop(&mut self) {
        if let Err(e) = pool::destroy_file_pool(&self.name) {
            eprintln!("cleanup: cannot destroy zfs pool {}: {e}", self.name);
        }
    }
}

pub fn dir_fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("dir");
    let backend = dir::Dir::open(&root).expect("open dir backend");
    let reopen = Box::new(move || {
        Box::new(dir::Dir::open(&root).expect("reopen dir")) as Box<dyn SnapshotBackend>
    });
    Fixture {
        backend: Box::new(backend),
        reopen,
        _guard: Guard::Dir(tmp),
    }
}

/// Why btrfs cannot be tested here, if it cannot.
pub fn btrfs_missing() -> Option<String> {
    if !is_root() {
        return Some("btrfs backend needs root (loop mount)".into());
    }
    for tool in ["btrfs", "mkfs.btrfs", "losetup", "mount", "umount"] {
        if cmd::find_program(tool).is_none() {
            return Some(format!(
                "btrfs backend needs {tool} (btrfs-progs / util-linux)"
            ));
        }
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("btrfs backend needs loop devices (/dev/loop-control is missing)".into());
    }
    None
}

pub fn btrfs_fixture() -> Option<Fixture> {
    if let Some(reason) = btrfs_missing() {
        skip(&reason);
        return None;
    }
    let lp = BtrfsLoop::new().expect("make btrfs loop image");
    let backend = btrfs::Btrfs::open(&lp.mnt).expect("open btrfs backend");
    let mnt = lp.mnt.clone();
    let reopen = Box::new(move || {
        Box::new(btrfs::Btrfs::open(&mnt).expect("reopen btrfs")) as Box<dyn SnapshotBackend>
    });
    Some(Fixture {
        backend: Box::new(backend),
        reopen,
        _guard: Guard::Btrfs(lp),
    })
}

/// Why zfs cannot be tested here, if it cannot. Starts the zfs-fuse daemon if it is installed
/// but not running.
pub fn zfs_missing() -> Option<String> {
    static STATE: OnceLock<Option<String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            if !is_root() {
                return Some("zfs backend needs root".into());
            }
            for tool in ["zfs", "zpool"] {
                if cmd::find_program(tool).is_none() {
                    return Some(format!(
                        "zfs backend needs {tool} (zfs-fuse or zfsutils-linux)"
                    ));
                }
            }
            if let Err(e) = pool::ensure_zfs_fuse() {
                return Some(format!("cannot start zfs-fuse: {e}"));
            }
            if cmd::run("zpool", ["list", "-H"]).is_ok() {
                return zfs_fuse_wedged();
            }
            Some("zpool fails and there is no zfs-fuse daemon to start".into())
        })
        .clone()
}

/// zfs-fuse can wedge for good (see `sandtree_storage::cmd`): its commands still answer, but
/// every FUSE request on its mounts hangs. Tests would then hang too, so probe a fresh mount
/// once, with a timeout, and report a wedged daemon as a reason instead.
fn zfs_fuse_wedged() -> Option<String> {
    if !cmd::zfs_fuse_running() {
        return None;
    }
    const WEDGED: &str = "zfs-fuse is wedged: I/O on a fresh mount hangs (a known zfs-fuse bug \
                          after concurrent mounts); restart the zfs-fuse daemon";
    // A probe pool left by an earlier probe could not be destroyed because the daemon was
    // wedged; if it still cannot be, the daemon still is, and another probe would leak another.
    let pools = cmd::run("zpool", ["list", "-H", "-o", "name"]).unwrap_or_default();
    for old in pools.lines().filter(|p| p.starts_with("stprobe")) {
        if cmd::run("timeout", ["30", "zpool", "destroy", "-f", old]).is_err() {
            return Some(WEDGED.into());
        }
    }
    let dir = tempfile::tempdir().ok()?;
    let name = format!("stprobe{}", std::process::id());
    let mnt = dir.path().join("mnt");
    if let Err(e) = pool::create_file_pool(&name, &dir.path().join("probe.img"), 64 << 20) {
        return Some(format!("cannot create a zfs-fuse probe pool: {e}"));
    }
    let mounted = cmd::run(
        "zfs",
        ["set", &format!("mountpoint={}", mnt.display()), &name],
    );
    let script = format!("echo ok > {0}/probe && cat {0}/probe", mnt.display());
    let io = cmd::run("timeout", ["10", "sh", "-c", &script]);
    if io.is_err() {
        // Detach the hung mount in the kernel; the daemon is of no help any more.
        let _ = cmd::run(
            "umount",
            [std::ffi::OsStr::new("-l"), "-c".as_ref(), mnt.as_os_str()],
        );
    }
    if io.is_ok() {
        // Retries while busy (zfs-fuse reports a just-used mount busy for a moment).
        if let Err(e) = pool::destroy_file_pool(&name) {
            eprintln!("warning: cannot destroy the probe pool {name}: {e}");
        }
    } else {
        // A wedged daemon may never answer: do not wait for it.
        let _ = cmd::run("timeout", ["30", "zpool", "destroy", "-f", &name]);
    }
    match (mounted, io) {
        (Ok(_), Ok(out)) if out.trim() == "ok" => None,
        (Err(e), _) => Some(format!("zfs-fuse cannot mount a probe dataset: {e}")),
        _ => Some(WEDGED.into()),
    }
}

pub fn zfs_pool() -> Option<ZfsPool> {
    if let Some(reason) = zfs_missing() {
        skip(&reason);
        return None;
    }
    Some(ZfsPool::new().expect("create zfs file pool"))
}

pub fn zfs_fixture() -> Option<Fixture> {
    let p = zfs_pool()?;
    let backend = zfs::Zfs::open(&p.dataset(), &p.state_dir()).expect("open zfs backend");
    let (ds, state) = (p.dataset(), p.state_dir());
    let reopen = Box::new(move || {
        Box::new(zfs::Zfs::open(&ds, &state).expect("reopen zfs")) as Box<dyn SnapshotBackend>
    });
    Some(Fixture {
        backend: Box::new(backend),
        reopen,
        _guard: Guard::Zfs(p),
    })
}

/// A backend kind and the function that makes a fresh fixture of it.
type Maker = (&'static str, fn() -> Option<Fixture>);

/// Runs `body` against a fresh backend of every kind that can run here.
pub fn for_each_backend(body: impl Fn(&Fixture)) {
    let makers: [Maker; 3] = [
        ("dir", || Some(dir_fixture())),
        ("btrfs", btrfs_fixture),
        ("zfs", zfs_fixture),
    ];
    for (name, make) in makers {
        let Some(fixture) = make() else { continue };
        eprintln!("--- backend {name}: {}", fixture.backend.describe());
        body(&fixture);
    }
}

// ---- helpers for test bodies ----------------------------------------------------------------

pub fn write(path: &Path, contents: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
    }
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `n` bytes that no filesystem compresses or deduplicates.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub const MIB: u64 = 1 << 20;

/// Makes base `name` with a small tree: `etc/hostname` = "base", a 64 KiB `bin/tool`, a symlink.
pub fn make_base(b: &dyn SnapshotBackend, name: &str) {
    b.create_base(name, &mut |dir: &Path| {
        write(&dir.join("etc/hostname"), b"base");
        write(&dir.join("bin/tool"), &noise(64 << 10, 1));
        std::os::unix::fs::symlink("bin/tool", dir.join("tool")).map_err(|source| {
            SnapshotError::Io {
                context: "symlink".into(),
                source,
            }
        })?;
        Ok(())
    })
    .unwrap_or_else(|e| panic!("create_base {name}: {e}"));
}
