//! The zfs backend creates its dataset only inside an existing pool, never touches a dataset
//! outside it (even through gc), and follows a moved state directory.

mod common;

use common::{make_base, read, write, zfs_pool};
use sandtree_storage::{cmd, zfs::Zfs, SnapshotBackend, SnapshotError};

fn datasets(root: &str) -> Vec<String> {
    let out = cmd::run(
        "zfs",
        [
            "list",
            "-H",
            "-o",
            "name",
            "-t",
            "filesystem,snapshot",
            "-r",
            root,
        ],
    )
    .unwrap();
    out.lines().map(str::to_string).collect()
}

#[test]
fn a_missing_pool_is_a_clear_error() {
    if common::zfs_missing().is_some() {
        return common::skip(&common::zfs_missing().unwrap());
    }
    let tmp = tempfile::tempdir().unwrap();
    let e = Zfs::open("sandtree-no-such-pool-x/ds", tmp.path()).unwrap_err();
    assert!(
        matches!(&e, SnapshotError::NotFound { kind: "zfs pool", name } if name == "sandtree-no-such-pool-x"),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "zfs pool sandtree-no-such-pool-x not found");
    assert!(matches!(
        Zfs::open("nopool", tmp.path()),
        Err(SnapshotError::InvalidName(_))
    ));
}

#[test]
fn siblings_of_the_dataset_are_never_touched() {
    let Some(pool) = zfs_pool() else { return };
    // Neighbours that look like ours: a sibling with a snapshot and a clone of it, and a dataset
    // whose name starts with ours.
    let other = format!("{}/other", pool.name);
    let lookalike = format!("{}/sandtree-2", pool.name);
    for ds in [&other, &lookalike] {
        cmd::run("zfs", ["create", "-o", "mountpoint=none", ds.as_str()]).unwrap();
    }
    cmd::run("zfs", ["snapshot", &format!("{other}@keep")]).unwrap();
    cmd::run(
        "zfs",
        [
            "clone",
            "-o",
            "mountpoint=none",
            &format!("{other}@keep"),
            &format!("{other}-clone"),
        ],
    )
    .unwrap();
    let before: Vec<String> = datasets(&pool.name)
        .into_iter()
        .filter(|d| !d.contains("/sandtree/"))
        .collect();

    // A nested dataset that does not exist yet is created inside the pool.
    let ds = format!("{}/sandtree", pool.name);
    let b = Zfs::open(&ds, &pool.state_dir()).unwrap();
    make_base(&b, "img");
    let v = b.create_volume("v", "img").unwrap();
    write(&v.join("f"), b"x");
    b.snapshot("v", "s").unwrap();
    let c = b.clone_snapshot("v", "s", "c").unwrap();
    b.destroy_volume("v").unwrap();
    b.destroy_snapshot("v", "s").unwrap();
    b.destroy_volume("c").unwrap();
    b.destroy_base("img").unwrap();
    assert!(b.gc().unwrap() > 0);
    assert!(!c.join("f").exists());

    let after: Vec<String> = datasets(&pool.name)
        .into_iter()
        .filter(|d| !d.contains("/sandtree/"))
        .collect();
    let mut want = before.clone();
    want.push(ds.clone());
    want.sort();
    let mut got = after;
    got.sort();
    assert_eq!(got, want, "only {ds} may be added, nothing else changed");
    // Everything sandtree made under its dataset is gone, except the two containers.
    assert_eq!(
        datasets(&ds),
        vec![ds.clone(), format!("{ds}/images"), format!("{ds}/volumes")]
    );
}

#[test]
fn every_dataset_has_atime_off_and_live_volumes_mount_under_the_state_dir() {
    let Some(pool) = zfs_pool() else { return };
    let ds = format!("{}/st", pool.name);
    let b = Zfs::open(&ds, &pool.state_dir()).unwrap();
    make_base(&b, "img");
    let v = b.create_volume("v", "img").unwrap();
    assert_eq!(v, pool.state_dir().join("mnt/volumes/v"));
    let out = cmd::run(
        "zfs",
        [
            "list",
            "-H",
            "-o",
            "name,atime",
            "-t",
            "filesystem",
            "-r",
            &ds,
        ],
    )
    .unwrap();
    assert!(out.lines().count() >= 5, "{out}");
    for line in out.lines() {
        assert!(line.ends_with("\toff"), "atime is not off: {line}");
    }

    // A moved state directory: reopening moves the live mountpoints along.
    write(&v.join("f"), b"still here");
    drop(b);
    let moved = pool.dir.path().join("moved");
    let b = Zfs::open(&ds, &moved).unwrap();
    let v2 = b.volume_path("v").unwrap();
    assert_eq!(v2, moved.join("mnt/volumes/v"));
    assert_eq!(read(&v2.join("f")), "still here");
}
