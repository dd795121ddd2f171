//! `image import` (`sandtree_runtime::images`, confined writes in `images/unpack.rs`) of an
//! archive from the input, into a throwaway root in a temp dir, with a sentinel directory beside
//! it. Two modes, by the first byte:
//! - raw: the input is the archive file (tar, or gzip-compressed tar);
//! - structured: tar layers of hostile entries (`..`, absolute and climbing symlinks, symlinks
//!   to the sentinel, hard links out, whiteouts, opaque dirs, devices, set-ID files), imported as
//!   a plain rootfs tar or wrapped in a `docker save` archive.
//!
//! Checks, whatever the import returns: no panic; the sentinel directory and its file are
//! untouched; nothing but the root, the sentinel and the archive is left in the temp dir (the
//! staging directory is removed); the root holds no device node, and no set-ID file unless the
//! import allowed them.
#![no_main]

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(u8),
    HardLink(u8),
    Fifo,
    Block,
    Char,
    Other(u8),
}

#[derive(Arbitrary, Debug)]
struct Entry {
    /// Path components, each picked from `NAMES`.
    path: Vec<u8>,
    trailing_slash: bool,
    absolute: bool,
    kind: Kind,
    mode: u16,
    uid: u8,
    gid: u8,
}

#[derive(Arbitrary, Debug)]
struct Structured {
    layers: Vec<Vec<Entry>>,
    docker_save: bool,
    allow_setuid: bool,
}

const NAMES: &[&str] = &[
    "a",
    "b",
    "etc",
    "x",
    "..",
    ".",
    ".wh.a",
    ".wh.b",
    ".wh..wh..opq",
    ".wh..wh.plnk",
    ".wh..",
    ".wh.",
    "passwd",
];

/// Link targets, `SENTINEL` standing for the sentinel's absolute path.
const TARGETS: &[&str] = &[
    "/",
    "..",
    "../..",
    "../../..",
    "a",
    "a/b",
    "/a",
    "SENTINEL",
    "SENTINEL/keepme",
    "../sentinel",
    "../../sentinel/keepme",
    "/etc/passwd",
    "b/../..",
    "",
];

fn target(i: u8, sentinel: &Path) -> String {
    TARGETS[usize::from(i) % TARGETS.len()].replace("SENTINEL", &sentinel.to_string_lossy())
}

fn path(e: &Entry) -> String {
    let mut p: Vec<&str> = e
        .path
        .iter()
        .take(4)
        .map(|&i| NAMES[usize::from(i) % NAMES.len()])
        .collect();
    if p.is_empty() {
        p.push("a");
    }
    let mut s = p.join("/");
    if e.absolute {
        s.insert(0, '/');
    }
    if e.trailing_slash {
        s.push('/');
    }
    s
}

/// A ustar header with the raw name and link name (the `tar` crate's setters refuse `..`).
fn append(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    ty: tar::EntryType,
    link: &str,
    data: &[u8],
    mode: u32,
    uid: u64,
    gid: u64,
) {
    let mut h = tar::Header::new_ustar();
    let name = &name.as_bytes()[..name.len().min(100)];
    h.as_ustar_mut().unwrap().name[..name.len()].copy_from_slice(name);
    let link = &link.as_bytes()[..link.len().min(100)];
    h.as_ustar_mut().unwrap().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(ty);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn layer(entries: &[Entry], sentinel: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries.iter().take(16) {
        let name = path(e);
        let mode = u32::from(e.mode) & 0o7777;
        let (uid, gid) = (u64::from(e.uid), u64::from(e.gid));
        use tar::EntryType as T;
        match &e.kind {
            Kind::File(d) => append(&mut b, &name, T::Regular, "", d, mode, uid, gid),
            Kind::Dir => append(&mut b, &name, T::Directory, "", &[], mode, uid, gid),
            Kind::Symlink(i) => append(
                &mut b,
                &name,
                T::Symlink,
                &target(*i, sentinel),
                &[],
                mode,
                uid,
                gid,
            ),
            Kind::HardLink(i) => append(
                &mut b,
                &name,
                T::Link,
                &target(*i, sentinel),
                &[],
                mode,
                uid,
                gid,
            ),
            Kind::Fifo => append(&mut b, &name, T::Fifo, "", &[], mode, uid, gid),
            Kind::Block => append(&mut b, &name, T::Block, "", &[], mode, uid, gid),
            Kind::Char => append(&mut b, &name, T::Char, "", &[], mode, uid, gid),
            Kind::Other(t) => append(&mut b, &name, T::new(*t), "", &[], mode, uid, gid),
        }
    }
    b.into_inner().unwrap()
}

fn structured(s: &Structured, sentinel: &Path) -> Vec<u8> {
    let layers: Vec<Vec<u8>> = s
        .layers
        .iter()
        .take(3)
        .map(|l| layer(l, sentinel))
        .collect();
    if !s.docker_save {
        return layers
            .into_iter()
            .next()
            .unwrap_or_else(|| layer(&[], sentinel));
    }
    let mut b = tar::Builder::new(Vec::new());
    let names: Vec<String> = (0..layers.len())
        .map(|i| format!("\"l{i}/layer.tar\""))
        .collect();
    let manifest = format!(
        "[{{\"Config\":\"c.json\",\"Layers\":[{}]}}]",
        names.join(",")
    );
    append(
        &mut b,
        "manifest.json",
        tar::EntryType::Regular,
        "",
        manifest.as_bytes(),
        0o644,
        0,
        0,
    );
    append(
        &mut b,
        "c.json",
        tar::EntryType::Regular,
        "",
        br#"{"config":{"Env":["A=1"],"WorkingDir":"/a","User":"0:0"}}"#,
        0o644,
        0,
        0,
    );
    for (i, l) in layers.iter().enumerate() {
        append(
            &mut b,
            &format!("l{i}/layer.tar"),
            tar::EntryType::Regular,
            "",
            l,
            0o644,
            0,
            0,
        );
    }
    b.into_inner().unwrap()
}

/// Fails on a device node, or on a set-ID file or FIFO unless allowed, anywhere under `dir`.
fn check_tree(dir: &Path, allow_setuid: bool) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let ft = m.file_type();
        assert!(
            !ft.is_block_device() && !ft.is_char_device(),
            "device node {:?}",
            e.path()
        );
        if (ft.is_file() || ft.is_fifo()) && !allow_setuid {
            assert_eq!(m.mode() & 0o6000, 0, "set-ID file {:?}", e.path());
        }
        if ft.is_dir() {
            check_tree(&e.path(), allow_setuid);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (root, sentinel, archive) = (
        t.path().join("root"),
        t.path().join("sentinel"),
        t.path().join("archive"),
    );
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&sentinel).unwrap();
    std::fs::write(sentinel.join("keepme"), "x").unwrap();
    let sentinel_mode = std::fs::symlink_metadata(&sentinel).unwrap().mode();
    let (bytes, allow_setuid) = if mode & 1 == 0 {
        (rest.to_vec(), mode & 2 != 0)
    } else {
        let Ok(s) = Structured::arbitrary_take_rest(Unstructured::new(rest)) else {
            return;
        };
        (structured(&s, &sentinel), s.allow_setuid)
    };
    std::fs::write(&archive, &bytes).unwrap();

    let _ = sandtree_runtime::fuzzing::import_into_dir(&root, &archive, allow_setuid);

    let mut left: Vec<String> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["archive", "root", "sentinel"],
        "something was made beside the root"
    );
    let names: Vec<_> = std::fs::read_dir(&sentinel)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keepme"], "the sentinel dir changed");
    let m = std::fs::symlink_metadata(sentinel.join("keepme")).unwrap();
    assert!(
        m.file_type().is_file() && m.nlink() == 1,
        "the sentinel file was replaced or linked"
    );
    assert_eq!(std::fs::read(sentinel.join("keepme")).unwrap(), b"x");
    assert_eq!(
        std::fs::symlink_metadata(&sentinel).unwrap().mode(),
        sentinel_mode
    );
    check_tree(&root, allow_setuid);
});
