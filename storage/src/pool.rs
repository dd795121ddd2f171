//! Where backends live: the loop-backed btrfs image that sandtree makes by default, and file-backed
//! zfs pools for tests.
//!
//! The btrfs image is `<dir>/btrfs.img` (a sparse file), mounted with `-o loop,noatime,nosuid,nodev` at
//! `<dir>/mnt`. `mount -o loop` sets the loop device to auto-clear, so unmounting frees it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{cmd, Result, SnapshotError};

/// Size of the sparse btrfs image made on first use: 20 GiB, allocated only as it fills.
pub const DEFAULT_LOOP_SIZE: u64 = 20 << 30;
/// Smallest image that mkfs.btrfs accepts with its default profiles, rounded up.
pub const MIN_LOOP_SIZE: u64 = 128 << 20;
/// zfs refuses vdevs smaller than 64 MiB.
pub const MIN_POOL_SIZE: u64 = 64 << 20;

const IMAGE: &str = "btrfs.img";
const MOUNT_DIR: &str = "mnt";

/// A line of /proc/self/mountinfo, reduced to what this crate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-mount options (`rw,noatime,...`).
    pub options: String,
}

/// The mount at exactly `path` (the topmost one if several are stacked), if any.
pub fn mount_at(path: &Path) -> Result<Option<Mount>> {
    let path = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io(format!("cannot resolve {}", path.display()), source)),
    };
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// The mount that holds `path` (the longest mount point that is a prefix of it).
pub fn mount_containing(path: &Path) -> Result<Option<Mount>> {
    let path = std::fs::canonicalize(path)
        .map_err(|source| io(format!("cannot resolve {}", path.display()), source))?;
    let mut best: Option<Mount> = None;
    for m in mounts()? {
        if path.starts_with(&m.mount_point)
            && best
                .as_ref()
                .is_none_or(|b| m.mount_point.as_os_str().len() >= b.mount_point.as_os_str().len())
        {
            best = Some(m);
        }
    }
    Ok(best)
}

/// Every mount of this process's mount namespace.
pub fn mounts() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| io("cannot read /proc/self/mountinfo".into(), source))?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// One line of /proc/self/mountinfo; `None` if it is not one.
///
/// Public only for the fuzz target (`service/fuzz`); not part of the crate's API.
#[doc(hidden)]
pub fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    Some(Mount {
        mount_point: PathBuf::from(unescape(left.get(4)?)),
        options: left.get(5)?.to_string(),
        fstype: right.next()?.to_string(),
        source: unescape(right.next()?),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`. A `\` not followed by three
/// octal digits of a byte (`\000` to `\377`) is kept as it is.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && (b'0'..=b'3').contains(&b[i + 1])
            && b[i + 2..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes sure a btrfs filesystem backed by `<dir>/btrfs.img` is mounted at `<dir>/mnt` and returns
/// that mount point. Creates the sparse image (`size` bytes) and the filesystem on first use;
/// mounts an existing image; does nothing if it is already mounted. Needs root.
pub fn ensure_btrfs_loop(dir: &Path, size: u64) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(|source| io(format!("cannot create {}", dir.display()), source))?;
    let dir = std::fs::canonicalize(dir)
        .map_err(|source| io(format!("cannot resolve {}", dir.display()), source))?;
    let mnt = dir.join(MOUNT_DIR);
    let img = dir.join(IMAGE);
    std::fs::create_dir_all(&mnt)
        .map_err(|source| io(format!("cannot create {}", mnt.display()), source))?;
    if let Some(m) = mount_at(&mnt)? {
        if m.fstype != "btrfs" {
            return Err(SnapshotError::Unsupported(format!(
                "{} is mounted but holds {} ({}), not btrfs",
                mnt.display(),
                m.fstype,
                m.source
            )));
        }
        // Mounted by an older sandtree without nosuid,nodev: add them.
        let opts: Vec<&str> = m.options.split(',').collect();
        if !opts.contains(&"nosuid") || !opts.contains(&"nodev") {
            cmd::run(
                "mount",
                [
                    std::ffi::OsStr::new("-o"),
                    "remount,nosuid,nodev".as_ref(),
                    mnt.as_os_str(),
                ],
            )?;
        }
        return Ok(mnt);
    }
    if !img.exists() {
        if size < MIN_LOOP_SIZE {
            return Err(SnapshotError::Unsupported(format!(
                "btrfs image {} would be {size} bytes; it needs at least {MIN_LOOP_SIZE}",
                img.display()
            )));
        }
        // Built under another name and renamed, so that a crash never leaves a half-made image.
        let partial = dir.join(format!("{IMAGE}.partial"));
        let f = std::fs::File::create(&partial)
            .map_err(|source| io(format!("cannot create {}", partial.display()), source))?;
        f.set_len(size).map_err(|source| {
            io(
                format!("cannot size {} to {size} bytes", partial.display()),
                source,
            )
        })?;
        drop(f);
        cmd::run(
            "mkfs.btrfs",
            [
                std::ffi::OsStr::new("-q"),
                "-f".as_ref(),
                partial.as_os_str(),
            ],
        )?;
        std::fs::rename(&partial, &img).map_err(|source| {
            io(
                format!("cannot rename {} to {}", partial.display(), img.display()),
                source,
            )
        })?;
        tracing::info!(image = %img.display(), size, "created btrfs image");
    }
    cmd::run(
        "mount",
        [
            std::ffi::OsStr::new("-o"),
            // nosuid,nodev: every sandbox root is a bind of a directory of this mount, and
            // binds (CRIU's restores too) inherit these flags.
            "loop,noatime,nosuid,nodev".as_ref(),
            img.as_os_str(),
            mnt.as_os_str(),
        ],
    )?;
    tracing::info!(image = %img.display(), mnt = %mnt.display(), "mounted btrfs image");
    Ok(mnt)
}

/// Unmounts `<dir>/mnt` if it is mounted and detaches any loop device still attached to
/// `<dir>/btrfs.img`. The image is kept.
pub fn unmount_btrfs_loop(dir: &Path) -> Result<()> {
    let mnt = dir.join(MOUNT_DIR);
    let img = dir.join(IMAGE);
    if mnt.exists() {
        while mount_at(&mnt)?.is_some() {
            cmd::run_retrying(
                "umount",
                [&mnt],
                |e| e.contains("busy"),
                Duration::from_secs(10),
            )?;
            tracing::info!(mnt = %mnt.display(), "unmounted btrfs image");
        }
    }
    if img.exists() {
        let out = cmd::run("losetup", [std::ffi::OsStr::new("-j"), img.as_os_str()])?;
        for dev in out
            .lines()
            .filter_map(|l| l.split(':').next())
            .filter(|d| d.starts_with("/dev/"))
        {
            match cmd::run("losetup", ["-d", dev]) {
                Ok(_) => tracing::info!(device = dev, "detached loop device"),
                // Auto-clear may have detached it meanwhile.
                Err(e) if cmd::stderr_of(&e).is_some_and(|s| s.contains("No such device")) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Starts the zfs-fuse daemon if it is installed and not running (as `scripts/setup.sh` does),
/// and waits until zpool(8) answers. Without zfs-fuse installed this does nothing: the zfs is
/// the kernel's, or missing, and the next zpool command says so.
pub fn ensure_zfs_fuse() -> Result<()> {
    if cmd::find_program("zfs-fuse").is_none() || cmd::zfs_fuse_running() {
        return Ok(());
    }
    tracing::info!("starting the zfs-fuse daemon");
    cmd::run("zfs-fuse", std::iter::empty::<&str>())?;
    let mut last = None;
    for _ in 0..50 {
        match cmd::run("zpool", ["list", "-H"]) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(last.expect("at least one try"))
}

/// Creates zfs pool `name` on file `file` (made sparse, `size` bytes), with the root dataset not
/// mounted (`-m none`), starting zfs-fuse first if it is installed and not running. For tests
/// and experiments: production pools are the admin's.
pub fn create_file_pool(name: &str, file: &Path, size: u64) -> Result<()> {
    ensure_zfs_fuse()?;
    if size < MIN_POOL_SIZE {
        return Err(SnapshotError::Unsupported(format!(
            "zfs pool file {} would be {size} bytes; zfs needs at least {MIN_POOL_SIZE}",
            file.display()
        )));
    }
    if cmd::run("zpool", ["list", "-H", "-o", "name", name]).is_ok() {
        return Err(SnapshotError::Exists {
            kind: "zfs pool",
            name: name.to_string(),
        });
    }
    let file = std::path::absolute(file)
        .map_err(|source| io(format!("cannot resolve {}", file.display()), source))?;
    let f = std::fs::File::create(&file)
        .map_err(|source| io(format!("cannot create {}", file.display()), source))?;
    f.set_len(size).map_err(|source| {
        io(
            format!("cannot size {} to {size} bytes", file.display()),
            source,
        )
    })?;
    drop(f);
    cmd::run(
        "zpool",
        [
            std::ffi::OsStr::new("create"),
            "-m".as_ref(),
            "none".as_ref(),
            name.as_ref(),
            file.as_os_str(),
        ],
    )?;
    tracing::info!(pool = name, file = %file.display(), size, "created zfs file pool");
    Ok(())
}

/// Destroys zfs pool `name` (forcibly unmounting its datasets). Retries while it is busy.
pub fn destroy_file_pool(name: &str) -> Result<()> {
    cmd::run_retrying(
        "zpool",
        ["destroy", "-f", name],
        |e| e.contains("busy"),
        Duration::from_secs(15),
    )?;
    tracing::info!(pool = name, "destroyed zfs pool");
    Ok(())
}

fn io(context: String, source: std::io::Error) -> SnapshotError {
    SnapshotError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let line = "36 35 98:0 / /var/lib/sand\\040tree/mnt rw,noatime shared:1 - btrfs /dev/loop0 rw,space_cache=v2";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.mount_point, PathBuf::from("/var/lib/sand tree/mnt"));
        assert_eq!(m.fstype, "btrfs");
        assert_eq!(m.source, "/dev/loop0");
        assert_eq!(m.options, "rw,noatime");
        let fuse = "100 22 0:50 / /tmp/x rw,relatime - fuse.zfs tank/a rw,user_id=0";
        assert_eq!(parse_mountinfo_line(fuse).unwrap().fstype, "fuse.zfs");
        assert!(parse_mountinfo_line("garbage").is_none());
        // Found by the `mountinfo` fuzz target: `\524` overflowed a u8 (a panic in debug builds).
        let odd = r"36 35 98:0 /mnt1 /a\524b\777\3 rw - btrfs \400 rw";
        let m = parse_mountinfo_line(odd).unwrap();
        assert_eq!(m.mount_point, PathBuf::from(r"/a\524b\777\3"));
        assert_eq!(m.source, r"\400");
    }

    #[test]
    fn root_is_a_mount() {
        let m = mount_at(Path::new("/")).unwrap().expect("/ is mounted");
        assert_eq!(m.mount_point, PathBuf::from("/"));
        assert!(mount_containing(Path::new("/proc/self")).unwrap().is_some());
    }

    #[test]
    fn refuses_tiny_images_and_pools() {
        let dir = std::env::temp_dir().join(format!("sandtree-pool-test-{}", std::process::id()));
        let err = ensure_btrfs_loop(&dir, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("at least"), "{err}");
        let err = create_file_pool("sandtreetiny", &dir.join("p.img"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("at least"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
