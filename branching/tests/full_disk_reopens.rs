//! A full disk under the database fails the call that needed the space, with an error that names
//! the file and says the disk is full; nothing committed is lost; and once space is freed the same
//! `Tree` works again, without being opened anew by its owner. redb latches an I/O failure (every
//! later transaction on that `Database` fails), so this needs the tree's close-and-reopen.
//!
//! Real redb on a real, small tmpfs mounted for the test (root only; skipped otherwise, failed
//! under CI=true), always unmounted by a guard.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sandtree_branching::{NodeKind, Policy, Tree, VerdictKind};

/// A tmpfs of `size` bytes mounted on a fresh temporary directory; unmounted (lazily, so a
/// panicking test cannot leave it) and removed on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: u64) -> SmallDisk {
        let dir = tempfile::Builder::new()
            .prefix("sandtree-full-disk-")
            .tempdir()
            .expect("tempdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("sandtree-test-tmpfs")
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "mount tmpfs on {}", dir.path().display());
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn root_or_skip() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to this process's effective uid.
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() == Some(0) {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test needs root (it mounts a tmpfs)"
    );
    eprintln!("skipped: needs root to mount a tmpfs");
    false
}

/// Fills the file system holding `dir` with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0xa5u8; 64 << 10];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial block may have left a few bytes free: take them too.
    while f.write_all(&[0u8; 512]).is_ok() {}
    path
}

fn big_turn(action: &str) -> sandtree_branching::NewTurn {
    let mut t = common::step(action, VerdictKind::Fs, Some(NodeKind::Fs));
    // Far more than the few free bytes a full disk leaves: redb must grow its file.
    t.observation.stdout = "x".repeat(2 << 20);
    t
}

#[test]
fn a_full_disk_fails_one_call_and_the_tree_works_again_once_space_is_freed() {
    if !root_or_skip() {
        return;
    }
    let disk = SmallDisk::mount(16 << 20);
    let path = disk.path().join("sandtree.redb");
    let tree = Tree::open(&path).unwrap();
    let ep = tree.create_episode("img", Policy::Auto, vec![]).unwrap().id;
    let (t1, _) = tree
        .append_turn(&ep, common::step("one", VerdictKind::None, None))
        .unwrap();
    let before = tree.turns(&ep).unwrap();

    let filler = fill(disk.path());
    let mut failures = Vec::new();
    for i in 0..3 {
        // Each call on the full disk fails by itself, with the reason; none wedges the next.
        let err = tree
            .append_turn(&ep, big_turn(&format!("big{i}")))
            .expect_err("a 2 MiB turn cannot fit on a full disk");
        assert!(err.is_disk_full(), "not a disk-full error: {err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("full"),
            "the error names neither the file nor the full disk: {msg}"
        );
        failures.push(msg);
    }
    eprintln!("full-disk errors: {failures:#?}");

    // Nothing committed was lost, and nothing half-written appeared.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(tree.turns(&ep).unwrap(), before);
    assert_eq!(tree.episode(&ep).unwrap().turn, t1.turn);

    // Space is back: the same Tree writes again.
    let (t2, node) = tree.append_turn(&ep, big_turn("after")).unwrap();
    assert_eq!(t2.turn, t1.turn + 1);
    let node = node.expect("an fs node");
    tree.commit_node(node.id, common::artifacts(node.id, 1))
        .unwrap();
    let after = tree.turns(&ep).unwrap();
    assert_eq!(&after[..before.len()], &before[..]);
    assert_eq!(after.last().unwrap().action, "after");
    drop(tree);

    // And the file is sound for the next start.
    let tree = Tree::open(&path).unwrap();
    assert_eq!(tree.turns(&ep).unwrap(), after);
    tree.reconcile().unwrap();
}

#[test]
fn while_the_disk_stays_full_reads_answer_or_fail_with_the_reason() {
    if !root_or_skip() {
        return;
    }
    let disk = SmallDisk::mount(16 << 20);
    let path = disk.path().join("sandtree.redb");
    let tree = Tree::open(&path).unwrap();
    let ep = tree.create_episode("img", Policy::Auto, vec![]).unwrap().id;
    let before = tree.turns(&ep).unwrap();
    let filler = fill(disk.path());
    let err = tree.append_turn(&ep, big_turn("big")).unwrap_err();
    assert!(err.is_disk_full(), "{err:?}");
    // Reads on a full disk: either they work (the reopen needed no space) or they fail with the
    // disk's reason; never a bare "previous I/O error".
    for _ in 0..3 {
        match tree.turns(&ep) {
            Ok(t) => assert_eq!(t, before),
            Err(e) => assert!(e.is_disk_full(), "{e:?}"),
        }
    }
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(tree.turns(&ep).unwrap(), before);
    tree.append_turn(&ep, common::step("small", VerdictKind::None, None))
        .unwrap();
}
