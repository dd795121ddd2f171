//! Turn verdicts through the real service: one tiny command per effect class, asserting the
//! verdict and its reason (the eBPF inspector), and the conservative fallback without it.

use sandtree_tests::*;

fn verdict(svc: &Service, ep: &str, cmd: &str) -> (String, String) {
    let r = svc.step(ep, cmd);
    assert_eq!(r["exit_code"], 0, "`{cmd}` failed: {r}");
    (
        r["verdict"].as_str().unwrap().to_string(),
        r["reasons"].to_string(),
    )
}

fn expect(svc: &Service, ep: &str, cmd: &str, kind: &str, reason: &str) {
    let (v, reasons) = verdict(svc, ep, cmd);
    assert_eq!(v, kind, "`{cmd}`: {reasons}");
    assert!(
        reasons.contains(reason),
        "`{cmd}`: reasons {reasons} lack {reason:?}"
    );
    assert!(
        !reasons.contains("UNSAFE"),
        "`{cmd}`: the cross-check upgraded it: {reasons}"
    );
}

#[test]
fn each_effect_class_gets_its_verdict_and_reason() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let ep = svc.create("busybox", "auto");
    // none: reads, session state, a process that ends within the turn.
    expect(&svc, &ep, "cat /etc/passwd >/dev/null; ls /", "none", "[]");
    expect(&svc, &ep, "cd /tmp && export X=1", "none", "[]");
    expect(&svc, &ep, "sleep 0.1", "none", "[]");
    // fs, with the path.
    expect(&svc, &ep, "echo hi > /tmp/a", "fs", "/tmp/a");
    expect(&svc, &ep, "mv /tmp/a /tmp/b", "fs", "rename");
    expect(&svc, &ep, "rm /tmp/b", "fs", "unlink");
    expect(&svc, &ep, "mkdir /workspace/d", "fs", "mkdir");
    expect(&svc, &ep, "chmod 700 /workspace/d", "fs", "chmod");
    // proc: a process that outlives the turn. Background jobs keep running after the turn
    // ends, and what they do then lands in the next turn; the sleeps keep these tests exact.
    expect(
        &svc,
        &ep,
        "mkfifo /tmp/q; sleep 1000 & sleep 0.2",
        "proc",
        "outlives the turn",
    );
    // A sleeping long-lived process changes nothing.
    expect(&svc, &ep, "true", "none", "[]");
    // proc: a long-lived process reading input.
    expect(
        &svc,
        &ep,
        "(while read l < /tmp/q; do echo $l > /tmp/last; done) </dev/null >/dev/null 2>&1 & sleep 0.2",
        "proc",
        "outlives the turn",
    );
    expect(
        &svc,
        &ep,
        "echo tick > /tmp/q; sleep 0.2",
        "proc",
        "long-lived pid",
    );
    // proc: signalling a long-lived process (it dies).
    expect(&svc, &ep, "kill $(pidof sleep)", "proc", "long-lived pid");
    // proc: a listening socket (the sleep keeps the listen inside this turn's epoch).
    expect(
        &svc,
        &ep,
        "nc -l -p 9000 </dev/null >/dev/null 2>&1 & sleep 0.3",
        "proc",
        "listen",
    );
    svc.ok(&["delete", &ep]);
    let stats: serde_json::Value = serde_json::from_str(&svc.ok(&["stats", "--json"])).unwrap();
    assert_eq!(stats["verdicts_unsafe"], 0, "{stats}");
}

#[test]
fn without_the_inspector_auto_is_conservative_and_says_so() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start_with(Storage::Btrfs, &["--no-inspector"]);
    let stats: serde_json::Value = serde_json::from_str(&svc.ok(&["stats", "--json"])).unwrap();
    assert_eq!(stats["inspector_loaded"], false, "{stats}");
    assert!(
        stats["inspector"]
            .as_str()
            .unwrap()
            .contains("conservative"),
        "{stats}"
    );
    assert!(
        svc.log().contains("ebpf inspector unavailable"),
        "no start-up message: {}",
        tail(&svc.log())
    );
    let ep = svc.create("busybox", "auto");
    expect(&svc, &ep, "true", "none", "conservative");
    expect(&svc, &ep, "echo hi > /tmp/a", "fs", "conservative: volume");
    expect(&svc, &ep, "sleep 1000 &", "proc", "conservative:");
    // Conservative: while any process survives, every turn is proc, even a quiet one.
    expect(&svc, &ep, "true", "proc", "conservative:");
    svc.ok(&["delete", &ep]);
}

/// An fs turn while a daemon runs: the turn changed only files, but its node must still bring
/// the daemon back (the bench found this in shell-httpd: a fork of the fs turn had no server).
#[test]
fn a_fork_of_an_fs_turn_beside_a_daemon_has_the_daemon() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let ep = svc.create("busybox", "auto");
    expect(
        &svc,
        &ep,
        "sleep 1000 & sleep 0.2",
        "proc",
        "outlives the turn",
    );
    let r = svc.step(&ep, "echo x > /tmp/f");
    assert_eq!(r["verdict"], "fs", "{r}");
    assert!(r["reasons"].to_string().contains("full node"), "{r}");
    let fork = svc.ok(&["fork", &ep, "--turn", "2"]).trim().to_string();
    let r = svc.step(&fork, "cat /tmp/f; pidof sleep >/dev/null && echo daemon");
    assert_eq!(r["stdout"], "x\ndaemon\n", "{r}");
    svc.ok(&["delete", &fork]);
    svc.ok(&["delete", &ep]);
}
