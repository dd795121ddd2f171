//! Image import never writes, removes or links outside the image root, and refuses what an
//! image may not carry (device nodes; set-ID files unless allowed).
//!
//! Every hostile archive is built here, in the test service's throwaway dir. Escapes aim at a
//! sentinel directory in that same throwaway dir (never at a real host path): after each import,
//! succeeded or refused, the sentinel must hold exactly what it held before. A refused import
//! must leave no image and no half-built subvolume or staging dir behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sandtree_tests::*;
use tar::{EntryType, Header};

/// A layer (or outer archive) built in memory, with raw entry names: the tar crate's own path
/// setters refuse `..` and strip a leading `/`, which is what these tests need to write.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn put(&mut self, name: &str, kind: EntryType, mode: u32, link: &str, data: &[u8]) {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        let old = h.as_old_mut();
        assert!(name.len() < old.name.len() && link.len() < old.linkname.len());
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.0.append(&h, data).unwrap();
    }

    fn dir(&mut self, name: &str) -> &mut Tar {
        self.put(name, EntryType::Directory, 0o755, "", b"");
        self
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Tar {
        self.put(name, EntryType::Regular, mode, "", data);
        self
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Tar {
        self.put(name, EntryType::Symlink, 0o777, target, b"");
        self
    }

    fn hardlink(&mut self, name: &str, target: &str) -> &mut Tar {
        self.put(name, EntryType::Link, 0o644, target, b"");
        self
    }

    fn device(&mut self, name: &str, kind: EntryType, major: u32, minor: u32) -> &mut Tar {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o660);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_path(name).unwrap();
        h.set_cksum();
        self.0.append(&h, &b""[..]).unwrap();
        self
    }

    /// busybox with the applets the tests' steps use: a rootfs the service accepts.
    fn busybox(&mut self, mode: u32) -> &mut Tar {
        self.dir("bin/")
            .file("bin/busybox", mode, &std::fs::read("/bin/busybox").unwrap());
        for a in ["sh", "cat", "ls", "readlink", "stat", "test"] {
            self.symlink(&format!("bin/{a}"), "busybox");
        }
        self
    }

    fn bytes(&mut self) -> Vec<u8> {
        self.0.finish().unwrap();
        self.0.get_ref().clone()
    }
}

/// A `docker save` archive of `layers`, bottom first.
fn docker_save(layers: Vec<Vec<u8>>) -> Vec<u8> {
    let mut outer = Tar::new();
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let n = format!("layer{}/layer.tar", i + 1);
        outer.dir(&format!("layer{}/", i + 1)).file(&n, 0o644, l);
        names.push(n);
    }
    let manifest = serde_json::json!([{"Config": "c.json", "RepoTags": ["t:1"], "Layers": names}]);
    outer.file("manifest.json", 0o644, manifest.to_string().as_bytes());
    outer.bytes()
}

/// An OCI image layout archive of `layers` (gzipped), bottom first. Digests are not checked by
/// the import, so they are made up.
fn oci_archive(layers: Vec<Vec<u8>>) -> Vec<u8> {
    use std::io::Write;
    let mut outer = Tar::new();
    outer.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    outer.dir("blobs/").dir("blobs/sha256/");
    let mut descs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(l).unwrap();
        let hex = format!("{:064x}", i + 1);
        outer.file(&format!("blobs/sha256/{hex}"), 0o644, &gz.finish().unwrap());
        descs.push(serde_json::json!({"digest": format!("sha256:{hex}")}));
    }
    let manifest = serde_json::json!({"schemaVersion": 2, "layers": descs});
    let hex = format!("{:064x}", 0xabc);
    outer.file(
        &format!("blobs/sha256/{hex}"),
        0o644,
        manifest.to_string().as_bytes(),
    );
    let index = serde_json::json!({"manifests": [{"digest": format!("sha256:{hex}")}]});
    outer.file("index.json", 0o644, index.to_string().as_bytes());
    outer.bytes()
}

/// A throwaway dir with a sentinel dir holding `keepme`, which no import may touch.
struct Scratch {
    dir: PathBuf,
    sentinel: PathBuf,
}

impl Scratch {
    fn new(svc: &Service) -> Scratch {
        let dir = svc.dir.join("scratch");
        let sentinel = svc.dir.join("sentinel");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(sentinel.join("sub")).unwrap();
        std::fs::write(sentinel.join("keepme"), "keep").unwrap();
        std::fs::write(sentinel.join("sub/also"), "keep").unwrap();
        Scratch { dir, sentinel }
    }

    fn s(&self) -> &str {
        self.sentinel.to_str().unwrap()
    }

    fn write(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// The sentinel is exactly as made: same names, same contents, no extra link to keepme.
    fn assert_intact(&self, after: &str) {
        let mut names: Vec<String> = Vec::new();
        walk(&self.sentinel, &self.sentinel, &mut names);
        names.sort();
        assert_eq!(names, ["keepme", "sub", "sub/also"], "after {after}");
        let keep = self.sentinel.join("keepme");
        assert_eq!(
            std::fs::read_to_string(&keep).unwrap(),
            "keep",
            "after {after}"
        );
        assert_eq!(
            std::fs::symlink_metadata(&keep).unwrap().nlink(),
            1,
            "after {after}"
        );
        assert_eq!(
            std::fs::read_to_string(self.sentinel.join("sub/also")).unwrap(),
            "keep"
        );
    }
}

fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        out.push(p.strip_prefix(base).unwrap().to_str().unwrap().to_string());
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            walk(base, &p, out);
        }
    }
}

/// Runs `image import` (extra flags after the path); returns (succeeded, stderr).
fn import(svc: &Service, name: &str, path: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["image", "import", name, path];
    args.extend_from_slice(extra);
    let o = svc.cli(&args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A refused import: fails with `expect` in its error, and leaves no image, no half-built
/// subvolume and no staging dir.
fn assert_refused(svc: &Service, name: &str, path: &str, expect: &str) {
    let (ok, err) = import(svc, name, path, &[]);
    assert!(
        !ok,
        "import {name} succeeded; expected an error with {expect:?}"
    );
    assert!(
        err.contains(expect),
        "import {name}: {err:?} lacks {expect:?}"
    );
    assert_no_leftovers(svc, name);
}

fn assert_no_leftovers(svc: &Service, name: &str) {
    assert!(
        !svc.ok(&["image", "list"]).lines().any(|l| l == name),
        "a refused import left image {name}"
    );
    let tree = svc.dir.join("data/storage/mnt/sandtree");
    for sub in ["tmp", "images"] {
        for e in std::fs::read_dir(tree.join(sub)).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !n.contains(name) && !n.starts_with(".import-"),
                "a refused import of {name} left {sub}/{n}"
            );
        }
    }
}

/// Runs one command in a fresh episode on `image`; returns its stdout.
fn run_in(svc: &Service, image: &str, cmd: &str) -> String {
    let ep = svc.ok(&["create", "--image", image, "--policy", "none"]);
    let ep = ep.trim();
    let r = svc.step(ep, cmd);
    svc.ok(&["delete", ep]);
    r["stdout"].as_str().unwrap().to_string()
}

#[test]
fn layered_symlinks_never_lead_writes_or_whiteouts_out() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let sc = Scratch::new(&svc);
    let layer1 = Tar::new()
        .busybox(0o755)
        .symlink("x", sc.s())
        .symlink("y", sc.s())
        .symlink("z", sc.s())
        .symlink("w", &format!("../../../../../../../../..{}", sc.s()))
        .bytes();

    // The issue's archive: layer 2 writes through x, whites out through y, empties z.
    let layer2 = Tar::new()
        .file("x/file", 0o644, b"escaped")
        .file("y/.wh.keepme", 0o644, b"")
        .file("z/.wh..wh..opq", 0o644, b"")
        .bytes();
    let p = sc.write("issue.tar", &docker_save(vec![layer1.clone(), layer2]));
    let (ok, err) = import(&svc, "issue", &p, &[]);
    sc.assert_intact("the issue's archive");
    if ok {
        // Had it been accepted, x/file must be inside the image, at the sentinel's path.
        let out = run_in(&svc, "issue", &format!("cat {}/file", sc.s()));
        assert_eq!(out, "escaped");
    } else {
        // Refused: x/file's directory (the sentinel's path) does not exist inside the image.
        assert!(err.contains("entry x/file"), "{err}");
        assert_no_leftovers(&svc, "issue");
    }

    // Whiteouts and an opaque dir through the links, with nothing else: the import succeeds,
    // resolves them inside the image (where nothing is at the sentinel's path) and removes
    // nothing outside; a whiteout of a link removes the link itself.
    let layer2 = Tar::new()
        .file("y/.wh.keepme", 0o644, b"")
        .file("y/.wh.sub", 0o644, b"")
        .file("z/.wh..wh..opq", 0o644, b"")
        .file("w/.wh..wh..opq", 0o644, b"")
        .file(".wh.x", 0o644, b"")
        .bytes();
    let p = sc.write(
        "whiteouts.tar",
        &docker_save(vec![layer1.clone(), layer2.clone()]),
    );
    let (ok, err) = import(&svc, "whiteouts", &p, &[]);
    assert!(ok, "{err}");
    sc.assert_intact("whiteouts through symlinks");
    // The same as an OCI layout with gzipped layers.
    let p = sc.write("whiteouts-oci.tar", &oci_archive(vec![layer1, layer2]));
    let (ok, err) = import(&svc, "whiteouts-oci", &p, &[]);
    assert!(ok, "{err}");
    sc.assert_intact("whiteouts through symlinks, OCI layout");
    let out = run_in(
        &svc,
        "whiteouts",
        "test -e /x || test -L /x || echo x-gone; readlink /y",
    );
    assert_eq!(out, format!("x-gone\n{}\n", sc.s()));

    // A later layer's directory replaces an earlier layer's symlink; its files land inside.
    let layer1 = Tar::new().busybox(0o755).symlink("d", sc.s()).bytes();
    let layer2 = Tar::new().dir("d/").file("d/inside", 0o644, b"in").bytes();
    let p = sc.write("replace.tar", &docker_save(vec![layer1, layer2]));
    let (ok, err) = import(&svc, "replace", &p, &[]);
    assert!(ok, "{err}");
    sc.assert_intact("a directory over a symlink");
    assert_eq!(run_in(&svc, "replace", "cat /d/inside"), "in");
}

#[test]
fn escaping_paths_and_hard_links_stay_inside_or_are_refused() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let sc = Scratch::new(&svc);

    // `..` entries are refused.
    let p = sc.write(
        "dotdot.tar",
        &Tar::new()
            .busybox(0o755)
            .file("../escape", 0o644, b"x")
            .bytes(),
    );
    assert_refused(&svc, "dotdot", &p, "entry ../escape has a `..` component");
    let deep = format!("../../../../../../../../../..{}/escape", sc.s());
    let p = sc.write(
        "deep.tar",
        &Tar::new().busybox(0o755).file(&deep, 0o644, b"x").bytes(),
    );
    assert_refused(&svc, "deep", &p, "has a `..` component");
    sc.assert_intact("`..` entries");
    let mut stray = Vec::new();
    walk(&svc.dir, &svc.dir, &mut stray);
    assert!(
        !stray
            .iter()
            .any(|p| p.ends_with("/escape") || p == "escape"),
        "an escape file was written: {stray:?}"
    );

    // An absolute entry naming the sentinel lands inside the image at that path.
    let abs = format!("{}/abs", sc.s());
    let p = sc.write(
        "abs.tar",
        &Tar::new()
            .busybox(0o755)
            .file("/abs", 0o644, b"top")
            .file(&abs, 0o644, b"deep")
            .bytes(),
    );
    let (ok, err) = import(&svc, "abs", &p, &[]);
    assert!(ok, "{err}");
    sc.assert_intact("absolute entries");
    assert_eq!(run_in(&svc, "abs", &format!("cat /abs {abs}")), "topdeep");

    // Hard links to a path outside: absolute (resolved inside, where it does not exist), with
    // `..`, and through a symlink planted by an earlier layer.
    let keep = format!("{}/keepme", sc.s());
    let p = sc.write(
        "hl-abs.tar",
        &Tar::new().busybox(0o755).hardlink("h", &keep).bytes(),
    );
    assert_refused(&svc, "hl-abs", &p, "not inside the image");
    let p = sc.write(
        "hl-dotdot.tar",
        &Tar::new()
            .busybox(0o755)
            .hardlink("h", &format!("../../../../../../../..{keep}"))
            .bytes(),
    );
    assert_refused(&svc, "hl-dotdot", &p, "leaves the image");
    let layer1 = Tar::new().busybox(0o755).symlink("s", sc.s()).bytes();
    let layer2 = Tar::new().hardlink("h", "s/keepme").bytes();
    let p = sc.write("hl-link.tar", &docker_save(vec![layer1, layer2]));
    assert_refused(&svc, "hl-link", &p, "not inside the image");
    sc.assert_intact("hard links");

    // A hard link inside the image is kept.
    let p = sc.write(
        "hl-ok.tar",
        &Tar::new()
            .busybox(0o755)
            .file("a", 0o644, b"same")
            .hardlink("b", "a")
            .bytes(),
    );
    let (ok, err) = import(&svc, "hl-ok", &p, &[]);
    assert!(ok, "{err}");
    assert_eq!(run_in(&svc, "hl-ok", "stat -c %h /b; cat /b"), "2\nsame");

    // A layer path of a docker-save archive that is a symlink out of the archive is not read.
    let mut outer = Tar::new();
    outer.symlink("layer.tar", &keep);
    let manifest = r#"[{"Config":"c.json","Layers":["layer.tar"]}]"#;
    outer.file("manifest.json", 0o644, manifest.as_bytes());
    let p = sc.write("outer-link.tar", &outer.bytes());
    let (ok, _) = import(&svc, "outer-link", &p, &[]);
    assert!(!ok, "a layer read through a symlink out of the archive");
    sc.assert_intact("a layer symlink");
}

#[test]
fn device_nodes_and_setuid_files_are_refused() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let sc = Scratch::new(&svc);

    let p = sc.write(
        "blockdev.tar",
        &Tar::new()
            .busybox(0o755)
            .dir("dev/")
            .device("dev/loop0", EntryType::Block, 7, 0)
            .bytes(),
    );
    assert_refused(
        &svc,
        "blockdev",
        &p,
        "image layer 1: entry dev/loop0 is a block device; images may not carry device nodes",
    );
    let layer2 = Tar::new().device("mem", EntryType::Char, 1, 1).bytes();
    let p = sc.write(
        "chardev.tar",
        &docker_save(vec![Tar::new().busybox(0o755).bytes(), layer2]),
    );
    assert_refused(
        &svc,
        "chardev",
        &p,
        "image layer 2: entry mem is a character device; images may not carry device nodes",
    );

    // Set-user-ID: refused without --allow-setuid, kept with it.
    let p = sc.write("setuid.tar", &Tar::new().busybox(0o4755).bytes());
    assert_refused(
        &svc,
        "setuid",
        &p,
        "entry bin/busybox is set-user-ID or set-group-ID",
    );
    let (ok, err) = import(&svc, "setuid", &p, &["--allow-setuid"]);
    assert!(ok, "{err}");
    assert_eq!(run_in(&svc, "setuid", "stat -c %a /bin/busybox"), "4755\n");
    let p = sc.write(
        "setgid.tar",
        &Tar::new()
            .busybox(0o755)
            .file("bin/wall", 0o2755, b"")
            .bytes(),
    );
    assert_refused(
        &svc,
        "setgid",
        &p,
        "entry bin/wall is set-user-ID or set-group-ID",
    );

    // A directory import: a symlink out is copied as a link (not followed), hard links are
    // kept, and the same refusals apply.
    let src = sc.dir.join("rootfs");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", src.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "readlink", "stat"] {
        std::os::unix::fs::symlink("busybox", src.join("bin").join(a)).unwrap();
    }
    std::os::unix::fs::symlink(&sc.sentinel, src.join("out")).unwrap();
    std::fs::write(src.join("a"), "a").unwrap();
    std::fs::hard_link(src.join("a"), src.join("b")).unwrap();
    let srcs = src.to_str().unwrap();
    let (ok, err) = import(&svc, "dir-ok", srcs, &[]);
    assert!(ok, "{err}");
    sc.assert_intact("a directory import");
    assert_eq!(
        run_in(&svc, "dir-ok", "readlink /out; stat -c %h /b"),
        format!("{}\n2\n", sc.s())
    );
    let suid = src.join("bin/su");
    std::fs::write(&suid, "").unwrap();
    std::fs::set_permissions(&suid, std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
    assert_refused(&svc, "dir-suid", srcs, "entry bin/su is set-user-ID");
    std::fs::remove_file(&suid).unwrap();
    let node = std::ffi::CString::new(src.join("null").to_str().unwrap()).unwrap();
    // SAFETY: mknod(2) on a NUL-terminated path in the test's own throwaway dir.
    let rc = unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(rc, 0, "mknod {}", src.join("null").display());
    assert_refused(
        &svc,
        "dir-dev",
        srcs,
        "entry null is a character device; images may not carry device nodes",
    );
    sc.assert_intact("refused directory imports");
}

/// A `docker save` archive whose image config sets Env, WorkingDir and User.
fn docker_save_with_config(layers: Vec<Vec<u8>>, config: serde_json::Value) -> Vec<u8> {
    let mut outer = Tar::new();
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let n = format!("layer{}/layer.tar", i + 1);
        outer.dir(&format!("layer{}/", i + 1)).file(&n, 0o644, l);
        names.push(n);
    }
    outer.file("c.json", 0o644, config.to_string().as_bytes());
    let manifest = serde_json::json!([{"Config": "c.json", "RepoTags": ["t:1"], "Layers": names}]);
    outer.file("manifest.json", 0o644, manifest.to_string().as_bytes());
    outer.bytes()
}

/// The image config's Env, WorkingDir and User are what an episode starts with (as SWE-style
/// images need); a User the image does not have fails the import, leaving nothing.
#[test]
fn image_config_sets_env_workdir_and_user() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let scratch = Scratch::new(&svc);
    let mut l = Tar::new();
    l.busybox(0o755);
    for a in ["id", "pwd", "echo", "touch"] {
        l.symlink(&format!("bin/{a}"), "busybox");
    }
    l.dir("etc/")
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1001:agent:/home/agent:/bin/sh\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\nagents:x:1001:\n")
        .dir("testbed/");
    let layer = l.bytes();
    let config = serde_json::json!({"config": {
        "Env": ["PATH=/bin:/usr/bin", "TASK=fix-bug"],
        "WorkingDir": "/testbed",
        "User": "agent",
    }});
    let archive = scratch.dir.join("cfg.tar");
    std::fs::write(
        &archive,
        docker_save_with_config(vec![layer.clone()], config),
    )
    .unwrap();
    let name = unique("cfg");
    let (ok, out) = import(&svc, &name, archive.to_str().unwrap(), &[]);
    assert!(ok, "{out}");
    let ep = svc.ok(&["create", "--image", &name]).trim().to_string();
    let r = svc.step(
        &ep,
        "id -u; id -g; pwd; echo $TASK; touch /root/x 2>/dev/null || echo denied",
    );
    assert_eq!(
        r["stdout"], "1000\n1001\n/testbed\nfix-bug\ndenied\n",
        "{r}"
    );
    // The session is recorded for that user too: cd and export carry to the next step.
    svc.step(&ep, "cd /tmp && export NEXT=1");
    let r = svc.step(&ep, "pwd; echo $NEXT; id -u");
    assert_eq!(r["stdout"], "/tmp\n1\n1000\n", "{r}");
    svc.ok(&["delete", &ep]);

    let bad = serde_json::json!({"config": {"User": "nobody-here"}});
    let archive = scratch.dir.join("bad.tar");
    std::fs::write(&archive, docker_save_with_config(vec![layer], bad)).unwrap();
    let name = unique("badcfg");
    assert_refused(
        &svc,
        &name,
        archive.to_str().unwrap(),
        "names a user that is not in its /etc/passwd",
    );
}
