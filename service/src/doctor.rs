//! Probes of kernel and tool features, run once at start and by `sandtree doctor`.

use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub name: String,
    pub ok: bool,
    /// Required probes fail `doctor`; optional ones only warn.
    pub required: bool,
    pub detail: String,
    pub fix: String,
}

fn probe(name: &str, required: bool, ok: bool, detail: impl Into<String>, fix: &str) -> Probe {
    Probe {
        name: name.into(),
        ok,
        required,
        detail: detail.into(),
        fix: if ok { String::new() } else { fix.into() },
    }
}

fn output(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    Some(s.trim().to_string()).filter(|_| o.status.success())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

/// capability(7) number of CAP_SYS_RESOURCE.
const CAP_SYS_RESOURCE: u32 = 24;

/// The bounding set of this process, from /proc/self/status.
fn bounding_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

const SETUP: &str = "run `bash scripts/setup.sh` as root";

pub fn probes() -> Vec<Probe> {
    let mut v = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    v.push(probe(
        "root",
        true,
        root,
        if root { "running as root" } else { "not root" },
        "sandtree runs sandboxes and must run as root",
    ));

    let criu = sandtree_runtime::criu::Criu::locate();
    match criu.version() {
        Some(ver) => {
            let new_enough = ver.0 >= 4;
            v.push(probe(
                "criu",
                true,
                new_enough,
                format!("{} {}.{}.{}", criu.bin.display(), ver.0, ver.1, ver.2),
                "CRIU >= 4.0 is needed (Debian 12's 3.17 fails on this kernel); scripts/setup.sh builds 4.1.1",
            ));
            let check = Command::new(&criu.bin).arg("check").output();
            let (ok, detail) = match check {
                Ok(o) => {
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    (
                        o.status.success() && text.contains("Looks good"),
                        text.lines().last().unwrap_or("").to_string(),
                    )
                }
                Err(e) => (false, e.to_string()),
            };
            v.push(probe(
                "criu check",
                true,
                ok,
                detail,
                "see `criu check --all`; the kernel lacks a feature CRIU needs",
            ));
        }
        None => v.push(probe("criu", true, false, "not found", SETUP)),
    }

    let (has_resource, detail) = match bounding_caps() {
        Some(bnd) if bnd & (1 << CAP_SYS_RESOURCE) != 0 => {
            (true, format!("in the bounding set (CapBnd {bnd:016x})"))
        }
        Some(bnd) => (
            false,
            format!(
                "missing from the bounding set (CapBnd {bnd:016x}): CRIU cannot dump a task whose \
                 uid/gid differ from its own (reading its rlimits fails, \"Can't get rlimit\"), so \
                 a sandbox that ran setuid/setresuid to a non-root user cannot be checkpointed; \
                 CRIU also logs a harmless \"Can't setup RLIMIT_NOFILE for self\" on every run"
            ),
        ),
        None => (false, "cannot read CapBnd from /proc/self/status".into()),
    };
    v.push(probe(
        "cap_sys_resource",
        false,
        has_resource,
        detail,
        "run the service with CAP_SYS_RESOURCE (on a VM or container host, allow it in the bounding set); everything else works without it",
    ));

    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    v.push(probe("bpf: btf", false, btf, if btf { "/sys/kernel/btf/vmlinux" } else { "no kernel BTF" }, "a kernel with CONFIG_DEBUG_INFO_BTF is needed for the eBPF inspector; without it the conservative verdict is used"));
    let is_mounted = |p: &str, fstype: &str| {
        std::fs::read_to_string("/proc/self/mounts")
            .map(|m| {
                m.lines().any(|l| {
                    l.split_whitespace().nth(1) == Some(p)
                        && l.split_whitespace().nth(2) == Some(fstype)
                })
            })
            .unwrap_or(false)
    };
    let tracefs = is_mounted("/sys/kernel/tracing", "tracefs")
        || Path::new("/sys/kernel/tracing/events").exists();
    v.push(probe(
        "bpf: tracefs",
        false,
        tracefs,
        "/sys/kernel/tracing",
        "mount -t tracefs tracefs /sys/kernel/tracing",
    ));
    let bpffs = is_mounted("/sys/fs/bpf", "bpf");
    v.push(probe(
        "bpf: bpffs",
        false,
        bpffs,
        "/sys/fs/bpf",
        "mount -t bpf bpf /sys/fs/bpf",
    ));
    // The real thing: load and attach the programs, then drop them.
    let (ok, detail) = match sandtree_ebpf::Inspector::load() {
        Ok(i) => (
            true,
            format!(
                "programs load and attach ({} KiB of maps)",
                i.map_memory_bytes() / 1024
            ),
        ),
        Err(e) => (false, e.to_string()),
    };
    v.push(probe(
        "bpf: inspector",
        false,
        ok,
        detail,
        "without the inspector the auto policy uses the conservative verdict (surviving processes, storage changes): more checkpoints, never fewer",
    ));
    let clang = output("clang", &["--version"]).map(|s| first_line(&s));
    v.push(probe(
        "clang",
        false,
        clang.is_some(),
        clang.unwrap_or_else(|| "not found".into()),
        "apt-get install clang libbpf-dev",
    ));

    let cg2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .find(|p| Path::new(p).join("cgroup.controllers").exists());
    let layout = match cg2 {
        Some(p) => {
            let ctrls = std::fs::read_to_string(Path::new(p).join("cgroup.controllers"))
                .unwrap_or_default();
            let pure = ctrls.contains("memory") && ctrls.contains("pids");
            format!(
                "cgroup2 at {p} ({}; controllers: {})",
                if pure {
                    "pure v2"
                } else {
                    "hybrid: memory/pids from v1"
                },
                ctrls.trim()
            )
        }
        None => "no cgroup2 mount".into(),
    };
    v.push(probe(
        "cgroup2",
        true,
        cg2.is_some(),
        layout,
        "mount -t cgroup2 none /sys/fs/cgroup/unified",
    ));

    // What the sandbox limits (serve --sandbox-memory-mib, --sandbox-pids, --sandbox-cpus) and
    // the device allow-list can be enforced with here.
    let v1 = |c: &str| {
        Path::new("/sys/fs/cgroup")
            .join(c)
            .join("cgroup.procs")
            .exists()
    };
    let v2_ctrls = cg2
        .map(|p| {
            std::fs::read_to_string(Path::new(p).join("cgroup.controllers")).unwrap_or_default()
        })
        .unwrap_or_default();
    let has = |c: &str| v2_ctrls.split_whitespace().any(|x| x == c) || v1(c);
    let swap = Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
        || v2_ctrls.split_whitespace().any(|x| x == "memory");
    let devices = v1("devices");
    let mut missing = Vec::new();
    for (ok, what) in [
        (has("memory"), "memory"),
        (swap, "swap accounting"),
        (has("pids"), "pids"),
        (has("cpu"), "cpu"),
        (devices, "device allow-list (v1 devices; pure cgroup v2 needs a BPF device program, not loaded yet)"),
    ] {
        if !ok {
            missing.push(what);
        }
    }
    v.push(probe(
        "sandbox limits",
        false,
        missing.is_empty(),
        if missing.is_empty() {
            "memory with swap, pids, cpu quota and the device allow-list are enforced".to_string()
        } else {
            format!("not enforced here: {}", missing.join(", "))
        },
        "a host with the cgroup controllers listed (hybrid v1, or pure v2 for all but devices)",
    ));

    let btrfs = output("btrfs", &["--version"]).map(|s| first_line(&s));
    v.push(probe(
        "btrfs",
        true,
        btrfs.is_some(),
        btrfs.unwrap_or_else(|| "not found".into()),
        SETUP,
    ));
    for tool in ["zfs", "zpool"] {
        let found = which(tool);
        v.push(probe(
            tool,
            false,
            found.is_some(),
            found.unwrap_or_else(|| "not found".into()),
            "apt-get install zfs-fuse (or zfsutils-linux with the OpenZFS module)",
        ));
    }
    let fuse_daemon = Command::new("pgrep")
        .args(["-x", "zfs-fuse"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let openzfs = Path::new("/sys/module/zfs").exists();
    v.push(probe(
        "zfs daemon",
        false,
        fuse_daemon || openzfs,
        if openzfs {
            "OpenZFS kernel module".into()
        } else if fuse_daemon {
            "zfs-fuse running".to_string()
        } else {
            "neither zfs-fuse nor the zfs module".into()
        },
        "start it with `zfs-fuse` (scripts/setup.sh does)",
    ));
    for (tool, pkg) in [
        ("busybox", "busybox-static"),
        ("debootstrap", "debootstrap"),
        ("runc", "runc (bench baseline only)"),
    ] {
        let found = which(tool);
        v.push(probe(
            tool,
            false,
            found.is_some(),
            found.unwrap_or_else(|| "not found".into()),
            &format!("apt-get install {pkg}"),
        ));
    }
    v
}

fn which(tool: &str) -> Option<String> {
    sandtree_storage::cmd::find_program(tool).map(|p| p.display().to_string())
}
