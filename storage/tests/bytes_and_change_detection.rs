//! `SnapshotInfo::bytes` measures what was written since the previous snapshot, and
//! `changed_since_last_snapshot` sees every kind of change but never a read.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{for_each_backend, make_base, noise, read, write, Fixture, MIB};
use sandtree_storage::Kind;

/// Reads everything in a volume the ways a sandbox would.
fn read_all(v: &Path) {
    assert_eq!(read(&v.join("etc/hostname")), "base");
    let _ = std::fs::read(v.join("bin/tool")).unwrap();
    for e in std::fs::read_dir(v).unwrap() {
        let e = e.unwrap();
        let _ = std::fs::symlink_metadata(e.path()).unwrap();
    }
    let _ = std::fs::read_link(v.join("tool")).unwrap();
}

#[test]
fn new_volumes_are_unchanged_and_reads_do_not_count() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        assert!(!b.changed_since_last_snapshot("v").unwrap(), "fresh volume");
        read_all(&v);
        assert!(
            !b.changed_since_last_snapshot("v").unwrap(),
            "reads after creation"
        );
        b.snapshot("v", "s").unwrap();
        read_all(&v);
        assert!(
            !b.changed_since_last_snapshot("v").unwrap(),
            "reads after a snapshot"
        );
        let c = b.clone_snapshot("v", "s", "c").unwrap();
        read_all(&c);
        assert!(
            !b.changed_since_last_snapshot("c").unwrap(),
            "reads in a fresh clone"
        );
    });
}

fn assert_about(b: &Fixture, bytes: u64, expected: u64, what: &str) {
    assert!(
        bytes >= expected,
        "{}: {what}: {bytes} bytes < {expected}",
        b.kind()
    );
    if b.kind() != Kind::Dir {
        // Metadata may add a little; never several times the data.
        assert!(
            bytes < expected + 2 * MIB,
            "{}: {what}: {bytes} bytes, expected about {expected}",
            b.kind()
        );
    }
}

#[test]
fn writing_one_mib_is_counted_and_a_snapshot_resets_changed() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("data"), &noise(MIB as usize, 7));
        assert!(b.changed_since_last_snapshot("v").unwrap());
        let s1 = b.snapshot("v", "s1").unwrap();
        assert_about(b, s1.bytes, MIB, "1 MiB written after creation");
        assert!(
            !b.changed_since_last_snapshot("v").unwrap(),
            "right after a snapshot"
        );

        let s2 = b.snapshot("v", "s2").unwrap();
        match b.kind() {
            Kind::Dir => assert_eq!(s2.bytes, s1.bytes, "dir: every snapshot is a full copy"),
            _ => assert_eq!(s2.bytes, 0, "{}: snapshot with no writes", b.kind()),
        }

        write(&v.join("more"), &noise(3 * MIB as usize, 8));
        let s3 = b.snapshot("v", "s3").unwrap();
        assert_about(b, s3.bytes, 3 * MIB, "3 MiB more");

        // A clone starts at zero: its origin's data is not its own.
        let c = b.clone_snapshot("v", "s3", "c").unwrap();
        write(&c.join("small"), &noise(256 << 10, 9));
        let cs = b.snapshot("c", "cs").unwrap();
        assert_about(b, cs.bytes, 256 << 10, "256 KiB in a clone");
    });
}

#[test]
fn metadata_only_changes_count_as_changes() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("f"), b"x");
        b.snapshot("v", "s0").unwrap();
        type Op = Box<dyn Fn(&Path)>;
        let ops: Vec<(&str, Op)> = vec![
            (
                "rm",
                Box::new(|v: &Path| std::fs::remove_file(v.join("etc/hostname")).unwrap()),
            ),
            (
                "mkdir",
                Box::new(|v: &Path| std::fs::create_dir(v.join("d")).unwrap()),
            ),
            (
                "mv",
                Box::new(|v: &Path| std::fs::rename(v.join("d"), v.join("e")).unwrap()),
            ),
            (
                "chmod",
                Box::new(|v: &Path| {
                    std::fs::set_permissions(v.join("f"), std::fs::Permissions::from_mode(0o600))
                        .unwrap()
                }),
            ),
            (
                "symlink",
                Box::new(|v: &Path| std::os::unix::fs::symlink("f", v.join("l")).unwrap()),
            ),
            (
                "rmdir",
                Box::new(|v: &Path| std::fs::remove_dir(v.join("e")).unwrap()),
            ),
            (
                "touch",
                Box::new(|v: &Path| {
                    let f = std::fs::File::options()
                        .write(true)
                        .open(v.join("f"))
                        .unwrap();
                    f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
                }),
            ),
            (
                "truncate",
                Box::new(|v: &Path| std::fs::File::create(v.join("f")).map(drop).unwrap()),
            ),
        ];
        for (i, (name, op)) in ops.iter().enumerate() {
            op(&v);
            assert!(
                b.changed_since_last_snapshot("v").unwrap(),
                "{}: {name} was not seen as a change",
                b.kind()
            );
            b.snapshot("v", &format!("s{}", i + 1)).unwrap();
            assert!(
                !b.changed_since_last_snapshot("v").unwrap(),
                "{}: changed right after snapshot",
                b.kind()
            );
        }
    });
}

#[test]
fn destroying_the_latest_snapshot_folds_its_bytes_into_the_next() {
    for_each_backend(|b| {
        // (dir snapshots are full copies, so `assert_about` only checks the lower bound there.)
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("a"), &noise(MIB as usize, 1));
        b.snapshot("v", "a").unwrap();
        write(&v.join("b"), &noise(2 * MIB as usize, 2));
        b.snapshot("v", "b").unwrap();
        b.destroy_snapshot("v", "b").unwrap();
        write(&v.join("c"), &noise(MIB as usize, 3));
        let c = b.snapshot("v", "c").unwrap();
        assert_about(b, c.bytes, 3 * MIB, "since a, after destroying b");

        // Destroying an older snapshot does not change what the next one counts.
        write(&v.join("d"), &noise(MIB as usize, 4));
        b.snapshot("v", "d").unwrap();
        b.destroy_snapshot("v", "c").unwrap();
        write(&v.join("e"), &noise(MIB as usize, 5));
        let e = b.snapshot("v", "e").unwrap();
        assert_about(b, e.bytes, MIB, "since d, after destroying c");

        // And with no writes, destroying the latest leaves its bytes for the next.
        b.destroy_snapshot("v", "e").unwrap();
        assert!(
            b.changed_since_last_snapshot("v").unwrap(),
            "e's data is new again relative to d"
        );
        let f = b.snapshot("v", "f").unwrap();
        assert_about(b, f.bytes, MIB, "e's data, counted again");
    });
}

/// What refuting an fs verdict relies on: a fresh clone (a fork or rewind) compares with its
/// origin until it has a snapshot of its own. Opening a file for writing without writing is no
/// change; a write or a `touch` (new times) is; the origin's later changes are not the clone's.
#[test]
fn a_fresh_clone_counts_from_its_origin() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("f"), b"one\n");
        b.snapshot("v", "s").unwrap();
        let c = b.clone_snapshot("v", "s", "c").unwrap();
        // The origin moves on; the clone does not see it.
        write(&v.join("g"), b"origin only");
        b.snapshot("v", "s2").unwrap();
        assert!(!b.changed_since_last_snapshot("c").unwrap(), "fresh clone");
        drop(
            std::fs::OpenOptions::new()
                .append(true)
                .open(c.join("f"))
                .unwrap(),
        );
        assert!(
            !b.changed_since_last_snapshot("c").unwrap(),
            "opened for writing, nothing written"
        );
        let f = std::fs::File::options()
            .write(true)
            .open(c.join("f"))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        drop(f);
        assert!(
            b.changed_since_last_snapshot("c").unwrap(),
            "{}: new times are a change",
            b.kind()
        );
        b.snapshot("c", "cs").unwrap();
        assert!(!b.changed_since_last_snapshot("c").unwrap());
        // A clone of the clone, then a real write in it.
        let cc = b.clone_snapshot("c", "cs", "cc").unwrap();
        assert!(
            !b.changed_since_last_snapshot("cc").unwrap(),
            "clone of a clone"
        );
        write(&cc.join("f"), b"two\n");
        assert!(b.changed_since_last_snapshot("cc").unwrap());
        assert!(
            !b.changed_since_last_snapshot("c").unwrap(),
            "its origin did not change"
        );
    });
}
