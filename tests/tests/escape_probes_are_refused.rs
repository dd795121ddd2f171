//! Issue 11 regression tests: from inside a sandbox, every escape route that the runtime closes
//! stays closed — new namespaces, the mount API, kernel-wide syscalls (io_uring, userfaultfd,
//! keyring, bpf, perf, modules, kexec, reboot...), the x32 and i386 syscall ABIs, writes to host
//! kernel settings under /proc, masked /proc files, device nodes, capabilities, no_new_privs,
//! seccomp, a nosuid,nodev root and no network but lo — in a fresh sandbox, in a fork restored
//! by CRIU, and in a fork of that fork.
//!
//! The attacks are `tests/probes/escape_probe.c`, compiled static here and imported into an
//! image of its own (busybox plus `/probe`). The probe refuses to run anywhere but inside a
//! sandtree sandbox; the only thing this test runs on the host is that refusal.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sandtree_tests::*;

/// Compiles tests/probes/escape_probe.c static into `dir`; returns the binary.
fn build_probe(dir: &Path) -> PathBuf {
    let out = dir.join("escape_probe");
    compile_static_probe("escape_probe.c", &out);
    out
}

/// An image directory: busybox with its applets in /bin, an empty /mnt and the probe at /probe.
fn image_dir(dir: &Path, probe: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    busybox_rootfs(&root, &["mnt", "tmp"]);
    std::fs::copy(probe, root.join("probe")).unwrap();
    std::fs::set_permissions(root.join("probe"), std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

/// How many `PROBE` lines the probe prints when all is well.
const PROBES: usize = 52;

/// Runs /probe as a turn of `ep`; returns what went wrong (nothing if it exits 0 with every
/// probe ok), so that one run reports every sandbox's failures.
fn run_probe(svc: &Service, ep: &str, what: &str) -> Option<String> {
    let r = svc.step(ep, "/probe");
    let out = r["stdout"].as_str().unwrap_or_default();
    let err = r["stderr"].as_str().unwrap_or_default();
    let probes: Vec<&str> = out.lines().filter(|l| l.starts_with("PROBE ")).collect();
    let failed: Vec<&str> = probes
        .iter()
        .copied()
        .filter(|l| !l.ends_with(" ok"))
        .collect();
    if r["exit_code"] == 0 && failed.is_empty() && probes.len() == PROBES {
        eprintln!("{what}: {} probes ok", probes.len());
        return None;
    }
    let report = format!(
        "{what}: escape probes failed (exit {}, {} of {PROBES} probes reported):\n{}\n\
         full output:\n{out}\nstderr:\n{err}",
        r["exit_code"],
        probes.len(),
        failed.join("\n")
    );
    eprintln!("{report}");
    Some(report)
}

/// Whether the sandbox's background `sleep 1000` is running: the fork was restored by CRIU,
/// not started fresh.
fn assert_restored(svc: &Service, ep: &str, what: &str) {
    let r = svc.step(ep, "pidof sleep");
    assert!(
        r["exit_code"] == 0 && !r["stdout"].as_str().unwrap_or_default().trim().is_empty(),
        "{what}: the background sleep is gone, so this was not a CRIU restore: {r}"
    );
}

fn probes_in_sandboxes(storage: Storage) {
    let tmp = TempDir::new("sandtree-probes-");
    let probe = build_probe(&tmp.0);
    let root = image_dir(&tmp.0, &probe);
    let svc = Service::start(storage);
    let image = unique("probes");
    svc.ok(&["image", "import", &image, root.to_str().unwrap()]);
    let ep = svc.create(&image, "full");
    let mut failures = Vec::new();
    // Turn 1.
    failures.extend(run_probe(&svc, &ep, "fresh sandbox"));
    // Turn 2: a process that outlives the turn, so the node has a CRIU image.
    svc.step(&ep, "sleep 1000 </dev/null >/dev/null 2>&1 &");
    let fork = svc.ok(&["fork", &ep, "--turn", "2"]).trim().to_string();
    // Turns 3 and 4 of the fork.
    failures.extend(run_probe(&svc, &fork, "fork restored by CRIU"));
    assert_restored(&svc, &fork, "fork");
    let nested = svc.ok(&["fork", &fork, "--turn", "4"]).trim().to_string();
    failures.extend(run_probe(
        &svc,
        &nested,
        "fork of the fork restored by CRIU",
    ));
    assert_restored(&svc, &nested, "fork of the fork");
    // The source is unchanged by its forks.
    failures.extend(run_probe(&svc, &ep, "source after forks"));
    for e in [&nested, &fork, &ep] {
        svc.ok(&["delete", e]);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn escape_probes_are_refused_btrfs() {
    if require_sandbox_host() && require(have("gcc"), "gcc not found") {
        probes_in_sandboxes(Storage::Btrfs);
    }
}

#[test]
fn escape_probes_are_refused_zfs_fuse() {
    if require_sandbox_host() && require_zfs() && require(have("gcc"), "gcc not found") {
        probes_in_sandboxes(Storage::Zfs);
    }
}

/// The one run on the host: the probe sees it is not in a sandbox and tries nothing.
#[test]
fn probe_refuses_outside_a_sandbox() {
    if !require(have("gcc"), "gcc not found") {
        return;
    }
    let tmp = TempDir::new("sandtree-probes-");
    let probe = build_probe(&tmp.0);
    let o = Command::new(&probe).output().expect("run the probe");
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(2),
        "the probe must refuse on the host: {out}"
    );
    assert_eq!(out, "refusing: not inside a sandtree sandbox\n");
}
