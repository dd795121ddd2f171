//! The trainer API beyond `step CMD`, through the CLI on a real service (btrfs):
//! - files: a write is a turn of its own that fork and rewind see; paths resolve inside the
//!   sandbox's root (`..` and absolute links stay inside; a link to a host path finds nothing);
//!   a missing file, a directory and a file over the limit get clear errors and change nothing;
//! - step options: env and cwd for one step only, stdin, binary output, the output cap;
//! - streaming: output reaches the CLI while the command still runs;
//! - labels and per-episode limits: list filters, limits over the server's refused, a memory
//!   limit that the kernel enforces.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandtree_tests::*;

fn turn_of(svc: &Service, ep: &str) -> u64 {
    let tree: serde_json::Value = serde_json::from_str(&svc.ok(&["tree", ep, "--json"])).unwrap();
    tree["episode"]["turn"].as_u64().unwrap()
}

/// `sandtree write EP PATH` with `data` on stdin.
fn write(svc: &Service, ep: &str, path: &str, data: &[u8]) -> std::process::Output {
    let mut c = Command::new(bin())
        .arg("--socket")
        .arg(&svc.socket)
        .args(["write", ep, path, "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    c.wait_with_output().unwrap()
}

fn read(svc: &Service, ep: &str, path: &str) -> std::process::Output {
    svc.cli(&["read", ep, path])
}

#[test]
fn files_are_turns_and_stay_inside_the_sandbox() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let ep = svc.create("busybox", "auto");
    // 1 MiB of every byte value: binary-safe both ways.
    let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 256) as u8).collect();
    let o = write(&svc, &ep, "/workspace/blob", &data);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(w["turn"], 1);
    assert_eq!(w["verdict"], "fs", "{w}");
    let o = read(&svc, &ep, "/workspace/blob");
    assert!(o.status.success());
    assert!(o.stdout == data, "read back {} bytes", o.stdout.len());
    assert_eq!(
        svc.step(&ep, "wc -c < /workspace/blob")["stdout"],
        "1048576\n"
    );

    // A write is a turn: a fork at it has the file, a rewind before it does not.
    assert!(write(&svc, &ep, "/workspace/note", b"v2\n")
        .status
        .success());
    let t = turn_of(&svc, &ep);
    let fork = svc
        .ok(&["fork", &ep, "--turn", &t.to_string()])
        .trim()
        .to_string();
    assert_eq!(read(&svc, &fork, "/workspace/note").stdout, b"v2\n");
    svc.ok(&["rewind", &ep, "--turn", &(t - 1).to_string()]);
    let o = read(&svc, &ep, "/workspace/note");
    assert!(!o.status.success(), "rewound past the write");

    // Paths resolve inside the sandbox's root, whatever they say.
    let scratch = TempDir::new("sandtree-files-sentinel-");
    let sentinel_dir = &scratch.0;
    let sentinel = sentinel_dir.join("keep");
    std::fs::write(&sentinel, b"host\n").unwrap();
    svc.step(&ep, "echo inside > /tmp/x");
    assert_eq!(
        read(&svc, &ep, "/workspace/../../../../../tmp/x").stdout,
        b"inside\n"
    );
    svc.step(&ep, "ln -s /tmp/x /workspace/abs-link");
    assert_eq!(read(&svc, &ep, "/workspace/abs-link").stdout, b"inside\n");
    // A link to the host's sentinel names a path that does not exist in the sandbox.
    svc.step(
        &ep,
        &format!("ln -s {} /workspace/host-link", sentinel.display()),
    );
    let o = write(&svc, &ep, "/workspace/host-link", b"escaped\n");
    assert!(!o.status.success());
    let o = read(&svc, &ep, "/workspace/host-link");
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&sentinel).unwrap(), b"host\n");
    assert_eq!(std::fs::read_dir(sentinel_dir).unwrap().count(), 1);

    // Clear errors that change nothing.
    let before = turn_of(&svc, &ep);
    let o = read(&svc, &ep, "/workspace/missing");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No such file"),
        "{o:?}"
    );
    let o = read(&svc, &ep, "/workspace");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Is a directory"),
        "{o:?}"
    );
    let o = write(&svc, &ep, "/workspace", b"x");
    assert!(!o.status.success());
    let big = vec![b'x'; (32 << 20) + 1];
    let o = write(&svc, &ep, "/workspace/big", &big);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the limit is 33554432 bytes"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(turn_of(&svc, &ep), before, "refused writes record no turn");
    svc.ok(&["delete", &fork]);
    svc.ok(&["delete", &ep]);
}

#[test]
fn step_options_apply_to_one_step() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let ep = svc.create("busybox", "auto");
    svc.step(&ep, "export KEEP=session; mkdir -p /work/sub");
    let r: serde_json::Value = serde_json::from_str(&svc.ok(&[
        "step",
        &ep,
        "--json",
        "--env",
        "ONE=1",
        "--env",
        "KEEP=step",
        "--cwd",
        "/work/sub",
        "--",
        "echo $ONE $KEEP; pwd",
    ]))
    .unwrap();
    assert_eq!(r["stdout"], "1 step\n/work/sub\n", "{r}");
    let r = svc.step(&ep, "echo [$ONE] $KEEP; pwd");
    assert_eq!(
        r["stdout"], "[] session\n/\n",
        "the session is unchanged: {r}"
    );
    // stdin
    let mut c = Command::new(bin())
        .arg("--socket")
        .arg(&svc.socket)
        .args(["step", &ep, "--json", "--stdin", "--", "wc -c; cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(b"abc").unwrap();
    let o = c.wait_with_output().unwrap();
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["stdout"], "3\n", "{r}");
    // Binary output comes through byte for byte (the CLI prints it raw without --json).
    let o = svc.cli(&["step", &ep, "--", "printf '\\377\\376\\000A'"]);
    assert_eq!(o.stdout, b"\xff\xfe\x00A");
    // The output cap, and a cap over the server's maximum.
    let r: serde_json::Value = serde_json::from_str(&svc.ok(&[
        "step",
        &ep,
        "--json",
        "--max-output",
        "10",
        "--",
        "seq 1 100",
    ]))
    .unwrap();
    assert_eq!(r["stdout"], "1\n2\n3\n4\n5\n", "{r}");
    assert_eq!(r["stdout_truncated"], true);
    let o = svc.cli(&["step", &ep, "--max-output", "999999999", "--", "true"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("over this server's maximum"),
        "{o:?}"
    );
    // A step cwd that does not exist: the command does not run, the session is unchanged.
    svc.step(&ep, "cd /work");
    let r: serde_json::Value = serde_json::from_str(&svc.ok(&[
        "step",
        &ep,
        "--json",
        "--cwd",
        "/no/such/dir",
        "--",
        "touch /work/ran",
    ]))
    .unwrap();
    assert_eq!(r["exit_code"], 125, "{r}");
    assert!(
        r["stderr"]
            .as_str()
            .unwrap()
            .contains("is not a directory in the sandbox"),
        "{r}"
    );
    let r = svc.step(&ep, "pwd; ls /work/ran 2>&1 || true");
    assert!(r["stdout"].as_str().unwrap().starts_with("/work\n"), "{r}");
    assert!(
        r["stdout"].as_str().unwrap().contains("No such file"),
        "{r}"
    );
    for bad in [
        ["--env", "A"],
        ["--env", "__ST_CMD=x"],
        ["--cwd", "relative"],
    ] {
        let mut args = vec!["step", &ep];
        args.extend(bad);
        args.extend(["--", "true"]);
        let o = svc.cli(&args);
        assert!(!o.status.success(), "{bad:?} must be refused");
    }
    // Streaming: the first line arrives while the command still sleeps.
    let t = Instant::now();
    let mut c = Command::new(bin())
        .arg("--socket")
        .arg(&svc.socket)
        .args(["step", &ep, "--", "echo first; sleep 3; echo second"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "first");
    let first_at = t.elapsed();
    assert_eq!(lines.next().unwrap().unwrap(), "second");
    let second_at = t.elapsed();
    assert!(c.wait().unwrap().success());
    assert!(
        first_at + Duration::from_millis(2000) < second_at,
        "streamed: first line at {first_at:?}, second at {second_at:?}"
    );
    svc.ok(&["delete", &ep]);
}

#[test]
fn labels_filter_and_limits_hold() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start_with(Storage::Btrfs, &["--sandbox-memory-mib", "512"]);
    svc.image("busybox");
    let a = svc
        .ok(&[
            "create", "--image", "busybox", "--label", "task=t1", "--label", "g=1",
        ])
        .trim()
        .to_string();
    let b = svc
        .ok(&["create", "--image", "busybox", "--label", "task=t2"])
        .trim()
        .to_string();
    let listed = svc.ok(&["list", "--label", "task=t1"]);
    assert!(listed.contains(&a) && !listed.contains(&b), "{listed}");
    svc.step(&a, "true");
    let f = svc.ok(&["fork", &a, "--turn", "1"]).trim().to_string();
    let listed = svc.ok(&["list", "--label", "task=t1", "--json"]);
    assert!(listed.contains(&f), "forks inherit labels: {listed}");
    assert_eq!(svc.ok(&["list", "--label", "task=none"]).trim(), "");
    assert!(!svc.cli(&["list", "--status", "bogus"]).status.success());
    // Limits: over the server's maximum is refused, with the maximum named.
    let o = svc.cli(&["create", "--image", "busybox", "--memory-mib", "4096"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("maximum of 512 MiB"),
        "{o:?}"
    );
    let o = svc.cli(&["create", "--image", "busybox", "--pids", "100000"]);
    assert!(!o.status.success());
    let long = "k".repeat(300);
    let o = svc.cli(&[
        "create",
        "--image",
        "busybox",
        "--label",
        &format!("{long}=v"),
    ]);
    assert!(!o.status.success());
    // A 64 MiB sandbox cannot hold 200 MiB: the kernel kills the process that tries.
    let small = svc
        .ok(&["create", "--image", "busybox", "--memory-mib", "64"])
        .trim()
        .to_string();
    let r = svc.step(
        &small,
        "dd if=/dev/zero of=/dev/null bs=200M count=1 2>/dev/null; echo $?",
    );
    assert_eq!(r["stdout"], "137\n", "{r}");
    let r = svc.step(&small, "echo alive");
    assert_eq!(r["stdout"], "alive\n");
    // The whole tree across forks, from any member: a's turns once each, f forked at turn 1.
    svc.step(&f, "echo in-fork");
    let whole: serde_json::Value =
        serde_json::from_str(&svc.ok(&["tree", &f, "--whole", "--json"])).unwrap();
    assert_eq!(whole["family_root"], a.as_str(), "{whole}");
    let family = whole["family"].as_array().unwrap();
    assert_eq!(family.len(), 3, "turn 0, a's turn 1, f's turn 2: {whole}");
    let t1 = family.iter().find(|t| t["turn"] == 1).unwrap();
    assert_eq!(t1["forks"], serde_json::json!([f.as_str()]), "{whole}");
    assert_eq!(t1["episodes"].as_array().unwrap().len(), 2);
    for e in [&a, &b, &f, &small] {
        svc.ok(&["delete", e]);
    }
    // Deleting twice is an error, not a silent success.
    let o = svc.cli(&["delete", &a]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("deleted"),
        "{o:?}"
    );
    // Policy none keeps no checkpoint after turn 0: a fork there is refused, not wrong.
    let n = svc.create("busybox", "none");
    svc.step(&n, "echo x > /workspace/x");
    let o = svc.cli(&["fork", &n, "--turn", "1"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("policy none"),
        "{o:?}"
    );
    let z = svc.ok(&["fork", &n, "--turn", "0"]).trim().to_string();
    svc.ok(&["delete", &z]);
    svc.ok(&["delete", &n]);
}
