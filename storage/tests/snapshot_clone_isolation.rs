//! A snapshot is a frozen copy, and every volume made from it (or from a base) is independent:
//! writes to one are never seen by the snapshot, the base, the source volume or a sibling clone.

mod common;

use common::{for_each_backend, make_base, read, write};

#[test]
fn clones_start_from_the_snapshot_and_are_isolated() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        assert_eq!(read(&v.join("etc/hostname")), "base");
        write(&v.join("state"), b"one");
        b.snapshot("v", "s1").unwrap();

        let c1 = b.clone_snapshot("v", "s1", "c1").unwrap();
        let c2 = b.clone_snapshot("v", "s1", "c2").unwrap();
        assert_eq!(read(&c1.join("state")), "one");
        assert_eq!(read(&c2.join("state")), "one");
        assert_eq!(read(&c1.join("etc/hostname")), "base");
        assert_eq!(
            std::fs::read_link(c1.join("tool")).unwrap().to_str(),
            Some("bin/tool")
        );

        write(&c1.join("state"), b"c1");
        write(&c2.join("state"), b"c2");
        write(&v.join("state"), b"v");
        std::fs::remove_file(c2.join("etc/hostname")).unwrap();
        assert_eq!(read(&c1.join("state")), "c1");
        assert_eq!(read(&c2.join("state")), "c2");
        assert_eq!(read(&v.join("state")), "v");
        assert_eq!(
            read(&c1.join("etc/hostname")),
            "base",
            "rm in c2 must not reach c1"
        );
        assert_eq!(read(&v.join("etc/hostname")), "base");

        // The snapshot itself never moved.
        let c3 = b.clone_snapshot("v", "s1", "c3").unwrap();
        assert_eq!(read(&c3.join("state")), "one");
        assert_eq!(read(&c3.join("etc/hostname")), "base");
        assert_eq!(b.volume_path("c3").unwrap(), c3);
    });
}

#[test]
fn volumes_from_one_base_do_not_see_each_other() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let a = b.create_volume("a", "img").unwrap();
        write(&a.join("etc/hostname"), b"a");
        write(&a.join("new"), b"only in a");
        let c = b.create_volume("c", "img").unwrap();
        assert_eq!(
            read(&c.join("etc/hostname")),
            "base",
            "a write to a volume leaked into the base"
        );
        assert!(!c.join("new").exists());
        assert_ne!(a, c);
    });
}

#[test]
fn clones_of_clones_keep_their_own_history() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("gen"), b"1");
        b.snapshot("v", "s").unwrap();
        let c = b.clone_snapshot("v", "s", "c").unwrap();
        write(&c.join("gen"), b"2");
        b.snapshot("c", "s").unwrap(); // same snapshot name, other volume
        let d = b.clone_snapshot("c", "s", "d").unwrap();
        assert_eq!(read(&d.join("gen")), "2");
        let e = b.clone_snapshot("v", "s", "e").unwrap();
        assert_eq!(read(&e.join("gen")), "1");
    });
}
