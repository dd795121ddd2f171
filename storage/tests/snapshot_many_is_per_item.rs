//! `snapshot_many` takes several volumes' snapshots in one call: each is the snapshot
//! `snapshot` would take (contents, bytes), and an item that cannot be taken fails alone.

mod common;

use common::{for_each_backend, make_base, noise, read, write};
use sandtree_storage::SnapshotError;

#[test]
fn a_batch_is_the_snapshots_one_by_one() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let (va, vb, vc) = (
            b.create_volume("a", "img").unwrap(),
            b.create_volume("b", "img").unwrap(),
            b.create_volume("c", "img").unwrap(),
        );
        write(&va.join("state"), b"a1");
        write(&vb.join("big"), &noise(1 << 20, 7));
        b.snapshot("c", "s1").unwrap();
        // c@s1 exists already: that item fails, the others are taken.
        let r = b.snapshot_many(&[("a", "s1"), ("b", "s1"), ("c", "s1")]);
        assert_eq!(r.len(), 3);
        let (ra, rb) = (r[0].as_ref().unwrap(), r[1].as_ref().unwrap());
        assert!(
            matches!(r[2], Err(SnapshotError::Exists { .. })),
            "{:?}",
            r[2]
        );
        assert!(
            rb.bytes >= 1 << 20,
            "b wrote 1 MiB, its snapshot says {}",
            rb.bytes
        );
        assert!(rb.bytes > ra.bytes, "a: {}, b: {}", ra.bytes, rb.bytes);
        write(&va.join("state"), b"a2");
        let ca = b.clone_snapshot("a", "s1", "ca").unwrap();
        assert_eq!(read(&ca.join("state")), "a1");
        assert!(!b.changed_since_last_snapshot("b").unwrap());
        assert!(b.changed_since_last_snapshot("a").unwrap());
        drop(vc);
    });
}
