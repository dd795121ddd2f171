//! Operations on unknown names fail with `NotFound` naming the object, duplicates with `Exists`,
//! and nothing changes when they fail.

mod common;

use common::{for_each_backend, make_base};
use sandtree_storage::{Entry, SnapshotError};

fn not_found<T: std::fmt::Debug>(r: sandtree_storage::Result<T>, kind: &str, name: &str) {
    match r {
        Err(e @ SnapshotError::NotFound { .. }) => {
            let SnapshotError::NotFound { kind: k, name: n } = &e else {
                unreachable!()
            };
            assert_eq!((*k, n.as_str()), (kind, name), "{e}");
            assert_eq!(e.to_string(), format!("{kind} {name} not found"));
        }
        other => panic!("expected {kind} {name} not found, got {other:?}"),
    }
}

#[test]
fn unknown_names_are_not_found() {
    for_each_backend(|b| {
        not_found(b.create_volume("v", "ghost"), "base image", "ghost");
        not_found(b.destroy_base("ghost"), "base image", "ghost");
        assert!(!b.has_base("ghost").unwrap());
        make_base(&**b, "img");
        not_found(b.volume_path("ghost"), "volume", "ghost");
        not_found(b.snapshot("ghost", "s"), "volume", "ghost");
        not_found(b.changed_since_last_snapshot("ghost"), "volume", "ghost");
        not_found(b.destroy_volume("ghost"), "volume", "ghost");
        not_found(b.rollback("ghost", "s"), "volume", "ghost");
        b.create_volume("v", "img").unwrap();
        not_found(b.clone_snapshot("v", "ghost", "c"), "snapshot", "v@ghost");
        not_found(b.destroy_snapshot("v", "ghost"), "snapshot", "v@ghost");
        not_found(b.rollback("v", "ghost"), "snapshot", "v@ghost");
        not_found(b.clone_snapshot("ghost", "s", "c"), "snapshot", "ghost@s");
        assert_eq!(
            b.list().unwrap(),
            vec![
                Entry::Base { name: "img".into() },
                Entry::Volume { name: "v".into() }
            ]
        );
    });
}

#[test]
fn duplicates_are_refused() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        b.create_volume("v", "img").unwrap();
        let e = b.create_volume("v", "img").unwrap_err();
        assert_eq!(e.to_string(), "volume v already exists");
        b.snapshot("v", "s").unwrap();
        let e = b.snapshot("v", "s").unwrap_err();
        assert_eq!(e.to_string(), "snapshot v@s already exists");
        let e = b.clone_snapshot("v", "s", "v").unwrap_err();
        assert_eq!(e.to_string(), "volume v already exists");
        b.destroy_volume("v").unwrap();
        not_found(b.destroy_volume("v"), "volume", "v");
    });
}
