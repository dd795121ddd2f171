//! The embedded btrfs image is made once and then only mounted: `ensure_btrfs_loop` is
//! idempotent, keeps data across unmounts, and unmounting frees the loop device.

mod common;

use common::{btrfs_missing, read, skip, write};
use sandtree_storage::{cmd, pool};

fn loop_devices_for(img: &std::path::Path) -> usize {
    let out = cmd::run("losetup", [std::ffi::OsStr::new("-j"), img.as_os_str()]).unwrap();
    out.lines().count()
}

#[test]
fn ensure_is_idempotent_and_data_survives_remounts() {
    if let Some(reason) = btrfs_missing() {
        return skip(&reason);
    }
    let tmp = tempfile::tempdir().unwrap();
    // Unmounted at the end even if an assertion fails.
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = pool::unmount_btrfs_loop(self.0);
        }
    }
    let _guard = Unmount(tmp.path());

    let mnt = pool::ensure_btrfs_loop(tmp.path(), 256 << 20).unwrap();
    let img = tmp.path().join("btrfs.img");
    let m = pool::mount_at(&mnt).unwrap().expect("mounted");
    assert_eq!(m.fstype, "btrfs");
    assert!(
        m.options.split(',').any(|o| o == "noatime"),
        "{}",
        m.options
    );
    // Sparse: the 256 MiB image takes far less room.
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "image is not sparse: {} bytes used",
        meta.blocks() * 512
    );

    write(&mnt.join("keep"), b"data");
    assert_eq!(
        pool::ensure_btrfs_loop(tmp.path(), 256 << 20).unwrap(),
        mnt,
        "second call, mounted"
    );
    assert_eq!(
        loop_devices_for(&img),
        1,
        "a second call must not mount again"
    );

    pool::unmount_btrfs_loop(tmp.path()).unwrap();
    assert!(pool::mount_at(&mnt).unwrap().is_none());
    assert_eq!(
        loop_devices_for(&img),
        0,
        "unmounting frees the loop device"
    );
    pool::unmount_btrfs_loop(tmp.path()).unwrap(); // twice is fine

    assert_eq!(
        pool::ensure_btrfs_loop(tmp.path(), 256 << 20).unwrap(),
        mnt,
        "remount of an existing image"
    );
    assert_eq!(read(&mnt.join("keep")), "data");
}

#[test]
fn a_non_btrfs_mount_in_the_way_is_refused() {
    if let Some(reason) = btrfs_missing() {
        return skip(&reason);
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    cmd::run(
        "mount",
        [
            std::ffi::OsStr::new("-t"),
            "tmpfs".as_ref(),
            "tmpfs".as_ref(),
            mnt.as_os_str(),
        ],
    )
    .unwrap();
    let result = pool::ensure_btrfs_loop(tmp.path(), 256 << 20);
    cmd::run("umount", [&mnt]).unwrap();
    let e = result.unwrap_err();
    assert!(e.to_string().contains("not btrfs"), "{e}");
    assert!(!tmp.path().join("btrfs.img").exists(), "nothing was made");
}
