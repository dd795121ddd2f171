//! `create_base` either makes a complete, read-only base or leaves nothing behind: a failing or
//! panicking `populate` leaves no trace and the name stays free.

mod common;

use std::path::Path;

use common::{for_each_backend, make_base, read, write};
use sandtree_storage::{Entry, SnapshotError};

#[test]
fn a_failing_populate_leaves_nothing_behind() {
    for_each_backend(|b| {
        let mut seen = None;
        let err = b
            .create_base("img", &mut |dir: &Path| {
                write(&dir.join("half"), b"written before the failure");
                seen = Some(dir.to_path_buf());
                Err(SnapshotError::Unsupported(
                    "populate failed on purpose".into(),
                ))
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "populate failed on purpose");
        assert!(!b.has_base("img").unwrap());
        assert_eq!(b.list().unwrap(), vec![]);
        let dir = seen.unwrap();
        assert!(
            !dir.join("half").exists(),
            "{}: half-made base still at {}",
            b.kind(),
            dir.display()
        );
        assert!(matches!(
            b.create_volume("v", "img"),
            Err(SnapshotError::NotFound {
                kind: "base image",
                ..
            })
        ));

        // The name is free: a second attempt succeeds and holds only its own files.
        make_base(&**b, "img");
        assert!(b.has_base("img").unwrap());
        let v = b.create_volume("v", "img").unwrap();
        assert!(!v.join("half").exists());
        assert_eq!(read(&v.join("etc/hostname")), "base");
    });
}

#[test]
fn a_panicking_populate_leaves_nothing_behind() {
    for_each_backend(|b| {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = b.create_base("img", &mut |dir: &Path| {
                write(&dir.join("half"), b"x");
                panic!("populate panicked on purpose");
            });
        }));
        assert!(result.is_err());
        assert!(!b.has_base("img").unwrap());
        assert_eq!(b.list().unwrap(), vec![]);
        make_base(&**b, "img");
        assert_eq!(b.list().unwrap(), vec![Entry::Base { name: "img".into() }]);
    });
}

#[test]
fn a_base_is_sealed_and_its_name_taken() {
    for_each_backend(|b| {
        let mut path = None;
        b.create_base("img", &mut |dir: &Path| {
            write(&dir.join("f"), b"v1");
            path = Some(dir.to_path_buf());
            Ok(())
        })
        .unwrap();
        let e = b
            .create_base("img", &mut |_: &Path| {
                panic!("populate must not run for an existing name")
            })
            .unwrap_err();
        assert!(
            matches!(&e, SnapshotError::Exists { kind: "base image", name } if name == "img"),
            "{e:?}"
        );
        let v = b.create_volume("v", "img").unwrap();
        assert_eq!(read(&v.join("f")), "v1");
        // The volume's top directory is writable even though the base was sealed.
        write(&v.join("new"), b"ok");
    });
}

#[test]
fn invalid_names_are_refused_everywhere() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        b.create_volume("v", "img").unwrap();
        b.snapshot("v", "s").unwrap();
        for bad in [
            "",
            ".hidden",
            "-flag",
            "a/b",
            "../up",
            "a@b",
            "sp ace",
            "a:b",
            &"x".repeat(129),
        ] {
            let invalid = |r: sandtree_storage::Result<()>| {
                assert!(
                    matches!(r, Err(SnapshotError::InvalidName(ref n)) if n == bad),
                    "{bad:?}: {r:?}"
                )
            };
            invalid(b.create_base(bad, &mut |_: &Path| panic!("populate ran for {bad:?}")));
            invalid(b.create_volume(bad, "img").map(drop));
            invalid(b.create_volume("w", bad).map(drop));
            invalid(b.snapshot("v", bad).map(drop));
            invalid(b.snapshot(bad, "s").map(drop));
            invalid(b.clone_snapshot("v", "s", bad).map(drop));
            invalid(b.rollback("v", bad));
            invalid(b.destroy_volume(bad));
            invalid(b.destroy_snapshot("v", bad));
            invalid(b.has_base(bad).map(drop));
        }
        assert_eq!(
            b.list().unwrap().len(),
            3,
            "nothing was made by the refused calls"
        );
    });
}
