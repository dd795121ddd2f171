//! Operations on different volumes may run at the same time, also while gc runs: each volume
//! ends with exactly its own contents.

mod common;

use common::{for_each_backend, make_base, read, write};
use sandtree_storage::Entry;

#[test]
fn different_volumes_can_be_worked_on_in_parallel() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let backend: &dyn sandtree_storage::SnapshotBackend = &**b;
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    let vol = format!("v{t}");
                    let v = backend.create_volume(&vol, "img").unwrap();
                    for round in 0..3 {
                        write(&v.join("owner"), format!("{vol} round {round}").as_bytes());
                        backend.snapshot(&vol, &format!("r{round}")).unwrap();
                    }
                    let c = backend
                        .clone_snapshot(&vol, "r1", &format!("{vol}-c"))
                        .unwrap();
                    assert_eq!(read(&c.join("owner")), format!("{vol} round 1"));
                    backend.destroy_volume(&vol).unwrap();
                    backend.destroy_snapshot(&vol, "r0").unwrap();
                    backend.destroy_snapshot(&vol, "r1").unwrap(); // has a clone
                });
            }
            s.spawn(move || {
                for _ in 0..5 {
                    backend.gc().unwrap();
                }
            });
        });
        for t in 0..4 {
            let c = b.volume_path(&format!("v{t}-c")).unwrap();
            assert_eq!(read(&c.join("owner")), format!("v{t} round 1"));
            let r2 = b
                .clone_snapshot(&format!("v{t}"), "r2", &format!("v{t}-r2"))
                .unwrap();
            assert_eq!(read(&r2.join("owner")), format!("v{t} round 2"));
        }
        let list = b.list().unwrap();
        assert_eq!(
            list.iter()
                .filter(|e| matches!(e, Entry::Volume { .. }))
                .count(),
            8,
            "{list:?}"
        );
        assert_eq!(
            list.iter()
                .filter(|e| matches!(e, Entry::Snapshot { .. }))
                .count(),
            4,
            "{list:?}"
        );
    });
}
