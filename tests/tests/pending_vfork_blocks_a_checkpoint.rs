//! Issue 10 (last item): a process blocked in vfork() — CRIU's zdtm vfork00 shape, a vfork child
//! that never execs — cannot be checkpointed, by sandtree or by CRIU itself, so there is no fork
//! of the turns it spans. What this pins:
//!
//! - The checkpoint of such a turn fails within about a second, before CRIU runs (it used to
//!   keep the sandbox ptrace-stopped for CRIU's 10 s seize timeout and fail with "Unseizable
//!   non-zombie ... state D"), and a fork of that turn is refused with a message that says why.
//! - The sandbox itself is unharmed: the program ends as it should (its SIGTERM to its process
//!   group releases the vfork, its child exits 0).
//! - Once the vfork has ended, later turns are checkpointed and forked (restored by CRIU) again.
//!
//! Why no fork can be made: the kernel waits for a vfork child killably (`wait_for_vfork_done`),
//! so PTRACE_INTERRUPT never stops the parent and CRIU cannot seize it; CRIU's own vfork00 is
//! marked `crfail` (its dump is expected to fail). The program is `tests/probes/vfork_pending.c`.

use std::path::{Path, PathBuf};

use sandtree_tests::*;

/// busybox with its applets in /bin, /tmp, and tests/probes/vfork_pending.c compiled static
/// at /vf.
fn image_dir(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    busybox_rootfs(&root, &["tmp"]);
    compile_static_probe("vfork_pending.c", &root.join("vf"));
    root
}

fn stdout(r: &serde_json::Value) -> &str {
    r["stdout"].as_str().unwrap_or_default()
}

fn pending_vfork(storage: Storage) {
    let tmp = TempDir::new("sandtree-vfork-");
    let root = image_dir(&tmp.0);
    let svc = Service::start(storage);
    let image = unique("vfork");
    svc.ok(&["image", "import", &image, root.to_str().unwrap()]);
    let ep = svc.create(&image, "full");

    // Turn 1: the program as a daemon; the turn ends once its vfork child has written, i.e. once
    // its parent is blocked in vfork().
    let r = svc.step(
        &ep,
        "/vf </dev/null >/dev/null 2>&1 & \
         i=0; until grep -q VFORKED /tmp/vfork.result 2>/dev/null || [ $i -ge 200 ]; do \
         sleep 0.05; i=$((i+1)); done; cat /tmp/vfork.result",
    );
    let main_pid = stdout(&r)
        .lines()
        .find_map(|l| l.strip_prefix("READY main "))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("the program did not start: {r}"));
    assert!(stdout(&r).contains("VFORKED"), "no vfork happened: {r}");

    // Turn 2 waits for turn 1's checkpoint: it fails at once, not after CRIU's 10 s timeout.
    let r = svc.step(&ep, "true");
    let waited_us = r["accepted_us"].as_u64().unwrap_or(u64::MAX);
    assert!(
        waited_us < 5_000_000,
        "turn 2 waited {waited_us} us for turn 1's checkpoint: with a task in vfork, sandtree \
         must give up about a second in, before CRIU keeps the sandbox stopped for 10 s: {r}"
    );

    // No fork of turn 1: refused with the reason.
    let o = svc.cli(&["fork", &ep, "--turn", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a fork of a turn with a task blocked in vfork cannot be a CRIU restore, yet it \
         succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.contains("not restorable") && err.contains("blocked in vfork()"),
        "the refused fork must say that a task is blocked in vfork(): {err}"
    );

    // Turn 3: the original is unharmed: its SIGTERM to the group ends the vfork, the child
    // exits 0.
    let r = svc.step(
        &ep,
        &format!(
            "kill -USR1 {main_pid}; i=0; until grep -qE 'PASS|FAIL' /tmp/vfork.result || \
             [ $i -ge 200 ]; do sleep 0.05; i=$((i+1)); done; cat /tmp/vfork.result"
        ),
    );
    assert!(
        stdout(&r).lines().any(|l| l == "PASS"),
        "the sandbox's program did not end as it does outside sandtree after the failed \
         checkpoints: {r}"
    );

    // Turn 4: with the vfork over, the sandbox is checkpointed (with a process in it) and forked.
    svc.step(&ep, "sleep 1000 </dev/null >/dev/null 2>&1 &");
    let fork = svc.ok(&["fork", &ep, "--turn", "4"]).trim().to_string();
    let r = svc.step(&fork, "pidof sleep; cat /tmp/vfork.result");
    let out = stdout(&r);
    assert!(
        r["exit_code"] == 0 && out.lines().next().is_some_and(|l| !l.trim().is_empty()),
        "the fork of turn 4 is not a CRIU restore (no background sleep): {r}"
    );
    assert!(
        out.lines().any(|l| l == "PASS"),
        "the fork lost the result file: {r}"
    );
    for e in [&fork, &ep] {
        svc.ok(&["delete", e]);
    }
}

/// The refusal happens before any snapshot is taken, so one storage backend is enough.
#[test]
fn pending_vfork_blocks_a_checkpoint_btrfs() {
    if require_sandbox_host() && require(have("gcc"), "gcc not found") {
        pending_vfork(Storage::Btrfs);
    }
}
