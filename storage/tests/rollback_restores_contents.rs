//! Rollback returns a volume to exactly the contents of a snapshot, and never destroys a
//! snapshot: later snapshots stay readable and cloneable.

mod common;

use common::{for_each_backend, make_base, read, write};
use sandtree_storage::{Entry, SnapshotError};

#[test]
fn rollback_to_the_latest_snapshot_discards_later_changes() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("a"), b"1");
        b.snapshot("v", "s1").unwrap();
        write(&v.join("a"), b"2");
        write(&v.join("b"), b"new");
        std::fs::remove_file(v.join("etc/hostname")).unwrap();
        assert!(b.changed_since_last_snapshot("v").unwrap());

        b.rollback("v", "s1").unwrap();
        let v = b.volume_path("v").unwrap();
        assert_eq!(read(&v.join("a")), "1");
        assert!(!v.join("b").exists());
        assert_eq!(read(&v.join("etc/hostname")), "base");
        assert!(
            !b.changed_since_last_snapshot("v").unwrap(),
            "a rolled-back volume equals its snapshot"
        );

        // The volume is still a normal volume.
        write(&v.join("c"), b"after");
        b.snapshot("v", "s2").unwrap();
        let c = b.clone_snapshot("v", "s2", "c").unwrap();
        assert_eq!(read(&c.join("c")), "after");
        assert_eq!(read(&c.join("a")), "1");
    });
}

#[test]
fn rollback_to_an_older_snapshot_keeps_later_snapshots() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("f"), b"s1");
        b.snapshot("v", "s1").unwrap();
        write(&v.join("f"), b"s2");
        write(&v.join("only-s2"), b"x");
        b.snapshot("v", "s2").unwrap();
        write(&v.join("f"), b"later");

        b.rollback("v", "s1").unwrap();
        let v = b.volume_path("v").unwrap();
        assert_eq!(read(&v.join("f")), "s1");
        assert!(!v.join("only-s2").exists());

        let list = b.list().unwrap();
        for s in ["s1", "s2"] {
            assert!(
                list.contains(&Entry::Snapshot {
                    volume: "v".into(),
                    name: s.into()
                }),
                "{s} missing from {list:?}"
            );
        }
        let c = b.clone_snapshot("v", "s2", "c2").unwrap();
        assert_eq!(read(&c.join("f")), "s2");
        assert_eq!(read(&c.join("only-s2")), "x");

        // Forward again, to the later snapshot.
        b.rollback("v", "s2").unwrap();
        let v = b.volume_path("v").unwrap();
        assert_eq!(read(&v.join("f")), "s2");

        // Snapshot names stay unique per volume across rollbacks.
        assert!(matches!(
            b.snapshot("v", "s1"),
            Err(SnapshotError::Exists { .. })
        ));
        b.snapshot("v", "s3").unwrap();
        b.destroy_snapshot("v", "s1").unwrap();
        b.destroy_snapshot("v", "s2").unwrap();
        let c = b.clone_snapshot("v", "s3", "c3").unwrap();
        assert_eq!(read(&c.join("f")), "s2");
    });
}

#[test]
fn rollback_needs_an_existing_volume_and_snapshot() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        b.create_volume("v", "img").unwrap();
        b.snapshot("v", "s").unwrap();
        let e = b.rollback("v", "nope").unwrap_err();
        assert!(
            matches!(&e, SnapshotError::NotFound { kind: "snapshot", name } if name == "v@nope"),
            "{e:?}"
        );
        let e = b.rollback("ghost", "s").unwrap_err();
        assert!(
            matches!(&e, SnapshotError::NotFound { kind: "volume", name } if name == "ghost"),
            "{e:?}"
        );
        // Failed rollbacks changed nothing.
        assert!(b.volume_path("v").is_ok());
    });
}
