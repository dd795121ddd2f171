//! Everything a backend knows survives a restart: objects, contents, and what counts as a
//! change since the last snapshot.

mod common;

use common::{for_each_backend, make_base, noise, read, write, MIB};
use sandtree_storage::Entry;

#[test]
fn a_reopened_backend_sees_the_same_objects_and_change_state() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        write(&v.join("f"), b"1");
        b.snapshot("v", "s").unwrap();
        b.clone_snapshot("v", "s", "c").unwrap();
        let mut before = b.list().unwrap();
        before.sort_by_key(|e| format!("{e:?}"));

        let again = b.reopen();
        let mut after = again.list().unwrap();
        after.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(before, after);
        assert!(after.contains(&Entry::Snapshot {
            volume: "v".into(),
            name: "s".into()
        }));
        let v = again.volume_path("v").unwrap();
        assert_eq!(read(&v.join("f")), "1");
        assert!(
            !again.changed_since_last_snapshot("v").unwrap(),
            "no write since s"
        );

        write(&v.join("g"), &noise(MIB as usize, 3));
        let third = b.reopen();
        assert!(third.changed_since_last_snapshot("v").unwrap());
        let s2 = third.snapshot("v", "s2").unwrap();
        assert!(s2.bytes >= MIB, "{}: {} bytes", b.kind(), s2.bytes);
        assert!(!third.changed_since_last_snapshot("v").unwrap());
    });
}
