//! Destroying a volume or a snapshot never breaks a clone made from it, snapshots outlive their
//! volume until destroyed, and gc reaps exactly what nothing depends on any more.

mod common;

use common::{for_each_backend, make_base, read, write};
use sandtree_storage::{Entry, Kind, SnapshotError};

fn snap(vol: &str, name: &str) -> Entry {
    Entry::Snapshot {
        volume: vol.into(),
        name: name.into(),
    }
}

#[test]
fn destroying_a_volume_keeps_its_clones_and_snapshots() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("f"), b"from v");
        b.snapshot("v", "s").unwrap();
        let c = b.clone_snapshot("v", "s", "c").unwrap();

        b.destroy_volume("v").unwrap();
        assert_eq!(
            read(&c.join("f")),
            "from v",
            "clone broken by destroying its origin volume"
        );
        let list = b.list().unwrap();
        assert!(
            !list.contains(&Entry::Volume { name: "v".into() }),
            "{list:?}"
        );
        assert!(
            list.contains(&snap("v", "s")),
            "snapshot gone with its volume: {list:?}"
        );
        assert!(matches!(
            b.volume_path("v"),
            Err(SnapshotError::NotFound { kind: "volume", .. })
        ));

        // Still addressable by (vol, snap).
        let c2 = b.clone_snapshot("v", "s", "c2").unwrap();
        assert_eq!(read(&c2.join("f")), "from v");

        // Destroying a snapshot that has clones works too, and the clones stay whole.
        b.destroy_snapshot("v", "s").unwrap();
        assert!(!b.list().unwrap().contains(&snap("v", "s")));
        assert!(matches!(
            b.clone_snapshot("v", "s", "c3"),
            Err(SnapshotError::NotFound {
                kind: "snapshot",
                ..
            })
        ));
        assert!(matches!(
            b.destroy_snapshot("v", "s"),
            Err(SnapshotError::NotFound { .. })
        ));
        assert_eq!(
            gc_until_stable(&**b),
            0,
            "nothing can be reaped while clones exist"
        );
        assert_eq!(read(&c.join("f")), "from v");
        assert_eq!(read(&c2.join("f")), "from v");

        b.destroy_volume("c").unwrap();
        b.destroy_volume("c2").unwrap();
        let reaped = gc_until_stable(&**b);
        match b.kind() {
            // The hidden snapshot and the parked volume.
            Kind::Zfs => assert_eq!(reaped, 2),
            _ => assert_eq!(reaped, 0, "{}: nothing is ever parked", b.kind()),
        }
        assert_eq!(b.gc().unwrap(), 0, "a second gc finds nothing");
        assert_eq!(b.list().unwrap(), vec![Entry::Base { name: "img".into() }]);
    });
}

/// Runs gc and returns how many it removed, checking that a second run adds nothing.
fn gc_until_stable(b: &dyn sandtree_storage::SnapshotBackend) -> usize {
    let n = b.gc().unwrap();
    assert_eq!(b.gc().unwrap(), 0);
    n
}

#[test]
fn snapshots_of_a_destroyed_volume_are_reaped_when_destroyed() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("f"), b"1");
        b.snapshot("v", "s1").unwrap();
        write(&v.join("f"), b"2");
        b.snapshot("v", "s2").unwrap();
        b.destroy_volume("v").unwrap();
        assert_eq!(b.gc().unwrap(), 0, "snapshots s1, s2 still exist");
        let c = b.clone_snapshot("v", "s1", "c").unwrap();
        assert_eq!(read(&c.join("f")), "1");
        b.destroy_volume("c").unwrap();
        b.destroy_snapshot("v", "s1").unwrap();
        b.destroy_snapshot("v", "s2").unwrap();
        b.gc().unwrap();
        assert_eq!(b.list().unwrap(), vec![Entry::Base { name: "img".into() }]);
    });
}

#[test]
fn a_volume_name_can_be_reused_but_snapshot_names_stay_unique() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("gen"), b"old");
        b.snapshot("v", "s").unwrap();
        b.destroy_volume("v").unwrap();

        let v = b.create_volume("v", "img").unwrap();
        assert!(!v.join("gen").exists(), "a new volume starts from its base");
        write(&v.join("gen"), b"new");
        let e = b.snapshot("v", "s").unwrap_err();
        assert!(
            matches!(&e, SnapshotError::Exists { kind: "snapshot", name } if name == "v@s"),
            "{e:?}"
        );
        b.snapshot("v", "t").unwrap();
        assert_eq!(
            read(&b.clone_snapshot("v", "s", "old").unwrap().join("gen")),
            "old"
        );
        assert_eq!(
            read(&b.clone_snapshot("v", "t", "new").unwrap().join("gen")),
            "new"
        );

        // Destroy the current volume too: both generations' snapshots stay addressable.
        b.destroy_volume("v").unwrap();
        let list = b.list().unwrap();
        assert!(
            list.contains(&snap("v", "s")) && list.contains(&snap("v", "t")),
            "{list:?}"
        );
        for vol in ["old", "new"] {
            b.destroy_volume(vol).unwrap();
        }
        b.destroy_snapshot("v", "s").unwrap();
        b.destroy_snapshot("v", "t").unwrap();
        b.gc().unwrap();
        assert_eq!(b.list().unwrap(), vec![Entry::Base { name: "img".into() }]);
    });
}

#[test]
fn destroying_a_base_keeps_its_volumes() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        b.destroy_base("img").unwrap();
        assert!(!b.has_base("img").unwrap());
        assert_eq!(read(&v.join("etc/hostname")), "base");
        assert!(matches!(
            b.create_volume("w", "img"),
            Err(SnapshotError::NotFound {
                kind: "base image",
                ..
            })
        ));
        assert_eq!(b.gc().unwrap(), 0, "the base is still needed by v");
        // The name is free again.
        make_base(&**b, "img");
        b.destroy_volume("v").unwrap();
        let reaped = b.gc().unwrap();
        if b.kind() == Kind::Zfs {
            assert_eq!(reaped, 2, "the hidden @base and the parked image");
        }
        assert_eq!(b.list().unwrap(), vec![Entry::Base { name: "img".into() }]);
    });
}
