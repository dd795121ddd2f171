//! The CLI contract: step semantics (exit codes, stdout/stderr, cwd and env carry-over, timeout,
//! background processes surviving) and clear one-line errors.

use std::time::Instant;

use sandtree_tests::*;

#[test]
fn step_semantics_and_errors() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let ep = svc.create("busybox", "auto");

    // Plain step: stdout to stdout, stderr to stderr, the command's exit code.
    let o = svc.cli(&["step", &ep, "--", "echo out; echo err >&2; exit 3"]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");

    // cwd and exported env carry over; unexported variables do not.
    svc.step(
        &ep,
        "mkdir -p /workspace/d && cd /workspace/d && export A=1 && B=2",
    );
    let r = svc.step(&ep, "pwd; echo \"$A-$B\"");
    assert_eq!(r["stdout"], "/workspace/d\n1-\n");
    assert_eq!(r["cwd"], "/workspace/d");
    assert_eq!(r["turn"], 3);
    for key in [
        "turn",
        "stdout",
        "stderr",
        "exit_code",
        "duration_ms",
        "cwd",
        "verdict",
        "node",
    ] {
        assert!(r.get(key).is_some(), "step --json lacks {key}: {r}");
    }

    // A background process survives the turn and the step returns while it runs.
    let t = Instant::now();
    svc.step(&ep, "sleep 300 &");
    assert!(
        t.elapsed().as_secs() < 30,
        "step waited for a background process"
    );
    let r = svc.step(&ep, "ps | grep -c '[s]leep 300'");
    assert_eq!(r["stdout"], "1\n");

    // The timeout kills the step's process group and says so.
    let t = Instant::now();
    let o = svc.cli(&["step", &ep, "--json", "--timeout", "1", "--", "sleep 100"]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["timed_out"], true);
    assert!(t.elapsed().as_secs() < 20);

    // Output is capped with a truncated flag.
    let r = svc.step(&ep, "head -c 3000000 /dev/zero | tr '\\0' a");
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1 << 20);

    // No network but loopback.
    let r = svc.step(
        &ep,
        "ip link 2>/dev/null | grep -c '^[0-9]' || cat /proc/net/dev | tail -n +3 | wc -l",
    );
    assert_eq!(r["stdout"], "1\n", "only lo: {r}");

    // Confinement: mount is refused, capabilities are dropped.
    let r = svc.step(
        &ep,
        "mount -t tmpfs x /mnt 2>&1; echo rc=$?; grep CapEff /proc/self/status",
    );
    let out = r["stdout"].as_str().unwrap();
    assert!(
        out.contains("rc=") && !out.contains("rc=0"),
        "mount must fail: {out}"
    );
    assert!(
        !out.contains("CapEff:\t000001ffffffffff"),
        "full capabilities: {out}"
    );

    // Clear one-line errors with a non-zero exit.
    let err = |args: &[&str]| {
        let o = svc.cli(args);
        assert!(!o.status.success(), "{args:?} should fail");
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: not one line: {e}");
        e
    };
    assert!(
        err(&["step", "ep-000000000000", "--", "true"]).contains("unknown episode ep-000000000000")
    );
    assert!(err(&["fork", &ep, "--turn", "99"]).contains("out of range"));
    assert!(err(&["create", "--image", "nope"]).contains("unknown image nope"));
    assert!(err(&["create", "--image", "../etc"]).contains("invalid image name"));
    let o = svc.cli(&["create", "--image", "busybox", "--policy", "sometimes"]);
    assert_eq!(o.status.code(), Some(2), "bad flag");
    let o = std::process::Command::new(bin())
        .args(["--socket", "/nonexistent/s.sock", "stats"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not running"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The socket is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&svc.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    svc.ok(&["delete", &ep]);
    assert!(err(&["step", &ep, "--", "true"]).contains("deleted"));
}

#[test]
fn image_import_rejects_bad_input_and_applies_whiteouts() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let dir = svc.dir.join("src");
    std::fs::create_dir_all(&dir).unwrap();
    // A corrupt tarball.
    std::fs::write(dir.join("bad.tar"), b"this is not a tar archive at all").unwrap();
    let o = svc.cli(&[
        "image",
        "import",
        "bad",
        dir.join("bad.tar").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        !svc.ok(&["image", "list"]).lines().any(|l| l == "bad"),
        "a failed import left an image"
    );
    let o = svc.cli(&["image", "import", "x", "/nonexistent/rootfs"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"));
    let o = svc.cli(&["image", "import", "a/b", "/tmp"]);
    assert!(!o.status.success());

    // A two-layer docker-save archive: layer 2 deletes a file and makes a dir opaque.
    let sh = |c: &str| {
        assert!(
            std::process::Command::new("sh")
                .args(["-c", c])
                .current_dir(&dir)
                .status()
                .unwrap()
                .success(),
            "{c}"
        )
    };
    sh("mkdir -p l1/bin l1/keep l1/opq l2/opq && cp /bin/busybox l1/bin/busybox && ln -s busybox l1/bin/sh && ln -s busybox l1/bin/cat && ln -s busybox l1/bin/ls \
        && echo gone > l1/keep/gone && echo stay > l1/keep/stay && echo old > l1/opq/old \
        && touch l2/keep.tmp && mkdir -p l2/keep && touch l2/keep/.wh.gone && touch l2/opq/.wh..wh..opq && echo new > l2/opq/new && rm l2/keep.tmp \
        && tar -cf layer1.tar -C l1 . && tar -cf layer2.tar -C l2 . \
        && mkdir -p arch && mv layer1.tar layer2.tar arch/ \
        && echo '[{\"Config\":\"c.json\",\"RepoTags\":[\"t:1\"],\"Layers\":[\"layer1.tar\",\"layer2.tar\"]}]' > arch/manifest.json \
        && tar -cf image.tar -C arch .");
    svc.ok(&[
        "image",
        "import",
        "layered",
        dir.join("image.tar").to_str().unwrap(),
    ]);
    let ep = svc.create("layered", "none");
    let r = svc.step(&ep, "ls /keep /opq");
    assert_eq!(r["stdout"], "/keep:\nstay\n\n/opq:\nnew\n");
    svc.ok(&["delete", &ep]);
}
