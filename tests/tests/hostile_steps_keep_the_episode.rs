//! Steps that attack the service's own plumbing, run inside real sandboxes on btrfs and
//! zfs-fuse: each must give a clear result for that step and leave the episode usable.
//! - a FIFO planted where the shim reads the turn's output, and a symlink planted where it reads
//!   the shell's environment (the shim hung on the FIFO past the step's timeout);
//! - an exported environment too large to pass to the next turn's execve (every later step
//!   failed with E2BIG);
//! - a command over the kernel's limit for one string (it was recorded as a failed turn);
//! - a client that goes away in the middle of a step (the next step overlapped it and reused
//!   its turn number).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandtree_tests::*;

fn turn_of(svc: &Service, ep: &str) -> u64 {
    let tree: serde_json::Value = serde_json::from_str(&svc.ok(&["tree", ep, "--json"])).unwrap();
    tree["episode"]["turn"].as_u64().unwrap()
}

fn planted_fifo_and_link(svc: &Service) {
    let ep = svc.create("busybox", "auto");
    // Turn 2 is next: plant its output file as a FIFO and its env file as a link to /dev/zero.
    let r = svc.step(
        &ep,
        "mkfifo /.sandtree/io/t2.out && ln -s /dev/zero /.sandtree/io/t2.env && echo planted",
    );
    assert_eq!(r["stdout"], "planted\n", "{r}");
    let t = Instant::now();
    let out = svc.ok(&["step", &ep, "--json", "--timeout", "3", "--", "echo hi"]);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the step took {:?}",
        t.elapsed()
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["stdout"], "hi\n", "{r}");
    assert_eq!(r["exit_code"], 0, "{r}");
    assert!(
        r["stderr"].as_str().unwrap().contains("env was not kept"),
        "{r}"
    );
    // The episode goes on with the previous shell state.
    let r = svc.step(&ep, "echo $HOME; pwd");
    assert_eq!(r["stdout"], "/root\n/\n", "{r}");
    assert_eq!(turn_of(svc, &ep), 3);
    svc.ok(&["delete", &ep]);
}

fn huge_environment(svc: &Service) {
    let ep = svc.create("busybox", "auto");
    svc.step(&ep, "export KEEP=1");
    // 125,000 bytes in one variable: over the kept-environment limit (below it, no variable can
    // reach the kernel's 128 KiB cap on one execve string).
    let r = svc.step(
        &ep,
        "export BIG=$(head -c 125000 /dev/zero | tr '\\0' x); echo ${#BIG}",
    );
    assert_eq!(r["stdout"], "125000\n", "{r}");
    assert!(
        r["stderr"]
            .as_str()
            .unwrap()
            .contains("over the 122880-byte limit"),
        "{r}"
    );
    let r = svc.step(&ep, "echo ${KEEP}-${#BIG}");
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(
        r["stdout"], "1-0\n",
        "the previous environment is kept: {r}"
    );
    // The shell's exit trap is the agent's to replace: a 10 MB working directory record.
    svc.step(&ep, "mkdir -p /tmp/w && cd /tmp/w");
    let r = svc.step(
        &ep,
        "trap 'head -c 10000000 /dev/zero | tr \"\\0\" a > \"$__st_s.cwd\"' EXIT; echo set",
    );
    assert_eq!(r["stdout"], "set\n", "{r}");
    assert!(
        r["stderr"]
            .as_str()
            .unwrap()
            .contains("cwd after this step is 10000000 bytes"),
        "{r}"
    );
    let r = svc.step(&ep, "pwd");
    assert_eq!(r["stdout"], "/tmp/w\n", "{r}");
    svc.ok(&["delete", &ep]);
}

fn command_over_the_limit(svc: &Service) {
    let ep = svc.create("busybox", "auto");
    svc.step(&ep, "true");
    // Two CLI arguments (one would be over the CLI's own execve limit) that it joins into one
    // 200 KB command.
    let half = "y".repeat(100_000);
    let o = svc.cli(&["step", &ep, "--json", "--", "echo", &half, &half]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the limit is"), "{err}");
    assert_eq!(turn_of(svc, &ep), 1, "no turn recorded");
    assert_eq!(svc.step(&ep, "echo ok")["stdout"], "ok\n");
    svc.ok(&["delete", &ep]);
}

fn client_goes_away(svc: &Service) {
    let ep = svc.create("busybox", "auto");
    let mut c = Command::new(bin())
        .arg("--socket")
        .arg(&svc.socket)
        .args(["step", &ep, "--json", "--", "sleep 2; echo done > /tmp/x"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    c.kill().unwrap();
    let _ = c.wait();
    // The next step waits for the first one, which ran to its end and took turn 1.
    let r = svc.step(&ep, "cat /tmp/x");
    assert_eq!(r["stdout"], "done\n", "{r}");
    assert_eq!(r["turn"], 2, "{r}");
    let tree: serde_json::Value = serde_json::from_str(&svc.ok(&["tree", &ep, "--json"])).unwrap();
    let actions: Vec<String> = tree["turns"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["action"].as_str().map(String::from))
        .collect();
    assert!(
        actions.iter().any(|a| a.contains("sleep 2")),
        "the abandoned step has its turn: {tree}"
    );
    svc.ok(&["delete", &ep]);
}

/// A sandbox filling its disk: the writes past the limit fail inside the sandbox, the episode
/// goes on, and another episode on the same pool can still write.
fn disk_full(storage: Storage) {
    let svc = Service::start_with(storage, &["--sandbox-disk-mib", "64"]);
    let ep = svc.create("busybox", "auto");
    let other = svc.create("busybox", "auto");
    let r = svc.step(
        &ep,
        "dd if=/dev/zero of=/tmp/big bs=1M count=200 2>&1; sync; \
         echo size $(($(wc -c < /tmp/big) / 1048576))",
    );
    let out = r["stdout"].as_str().unwrap();
    let size: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("size "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{r}"));
    assert!(
        size < 64,
        "the sandbox wrote {size} MiB past a 64 MiB disk: {r}"
    );
    assert!(
        out.contains("quota") || out.contains("space"),
        "dd says why it stopped: {r}"
    );
    svc.step(&ep, "rm /tmp/big");
    assert_eq!(
        svc.step(&ep, "echo ok > /tmp/small && cat /tmp/small")["stdout"],
        "ok\n"
    );
    let r = svc.step(
        &other,
        "dd if=/dev/zero of=/tmp/f bs=1M count=16 2>/dev/null; wc -c < /tmp/f",
    );
    assert_eq!(r["stdout"], "16777216\n", "{r}");
    svc.ok(&["delete", &ep]);
    svc.ok(&["delete", &other]);
}

fn all(storage: Storage) {
    let svc = Service::start(storage);
    planted_fifo_and_link(&svc);
    huge_environment(&svc);
    command_over_the_limit(&svc);
    client_goes_away(&svc);
}

#[test]
fn hostile_steps_keep_the_episode_btrfs() {
    if require_sandbox_host() {
        all(Storage::Btrfs);
    }
}

#[test]
fn a_full_disk_stays_in_its_sandbox_btrfs() {
    if require_sandbox_host() {
        disk_full(Storage::Btrfs);
    }
}

#[test]
fn a_full_disk_stays_in_its_sandbox_zfs_fuse() {
    if require_sandbox_host() && require_zfs() {
        disk_full(Storage::Zfs);
    }
}

#[test]
fn hostile_steps_keep_the_episode_zfs_fuse() {
    if require_sandbox_host() && require_zfs() {
        all(Storage::Zfs);
    }
}
