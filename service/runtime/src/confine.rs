//! What every process that sandtree starts inside a sandbox goes through just before exec:
//! capabilities dropped to a small set, no_new_privs, and a seccomp filter.

use std::collections::BTreeMap;

/// Capabilities a sandboxed root keeps (docker's default set minus NET_RAW, MKNOD, AUDIT_WRITE
/// and SETFCAP), with the names Docker's seccomp profile uses for them. Everything else,
/// CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_SYS_PTRACE included, is dropped from every set, the
/// bounding set too.
const KEEP_CAPS: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
    (10, "CAP_NET_BIND_SERVICE"),
    (18, "CAP_SYS_CHROOT"),
];

/// Docker's default seccomp profile, as data (provenance in service/runtime/seccomp/README.md).
const DOCKER_PROFILE: &str = include_str!("../seccomp/docker-default.json");

/// Syscalls denied whatever the profile says. Docker 20.10's profile allows io_uring, which
/// bypasses seccomp for the operations it submits; it already leaves out userfaultfd (a favourite
/// of kernel exploits) and the keyring (not namespaced), which stay listed so that a newer
/// profile cannot let them in. CRIU cannot checkpoint a process that uses any of them.
const EXTRA_DENIED: &[&str] = &[
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
];

/// Docker's name for this architecture in the profile's `arches` lists.
const ARCH: &str = "amd64";

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn last_err(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Drops capabilities, sets no_new_privs and installs the seccomp filter. Called in a
/// single-threaded child right before exec.
pub fn confine(seccomp: &Seccomp) -> std::io::Result<()> {
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last_cap {
        if !KEEP_CAPS.iter().any(|&(c, _)| c == cap) {
            // SAFETY: prctl(PR_CAPBSET_DROP) takes an integer argument and touches no memory.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                return Err(last_err("prctl(PR_CAPBSET_DROP)"));
            }
        }
    }
    // SAFETY: clears the ambient set; integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let mut mask = [0u32; 2];
    for &(c, _) in KEEP_CAPS {
        mask[(c / 32) as usize] |= 1 << (c % 32);
    }
    let mut hdr = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask[0],
            permitted: mask[0],
            inheritable: 0,
        },
        CapData {
            effective: mask[1],
            permitted: mask[1],
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) with a v3 header and two data structs, both valid for the call.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if r != 0 {
        return Err(last_err("capset"));
    }
    // SAFETY: integer-only prctl.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(last_err("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    // Never run a sandboxed process without its filter, whatever the caller passed.
    if seccomp.0.is_empty() || seccomp.0.iter().any(|p| p.is_empty()) {
        return Err(std::io::Error::other("seccomp: no programs to install"));
    }
    for f in seccomp.programs() {
        seccompiler::apply_filter(&f)
            .map_err(|e| std::io::Error::other(format!("seccomp: {e}")))?;
    }
    Ok(())
}

/// The sandbox's compiled seccomp programs, as the service hands them to the shim: translating
/// the profile costs milliseconds, so the service does it once ([`Seccomp::get`]) instead of
/// every shim on every step. Each instruction is packed as code<<48 | jt<<40 | jf<<32 | k.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Seccomp(Vec<Vec<u64>>);

impl Seccomp {
    /// The programs of [`seccomp_filters`], computed once per process.
    pub fn get() -> Result<Seccomp, String> {
        static CACHE: std::sync::OnceLock<Result<Seccomp, String>> = std::sync::OnceLock::new();
        CACHE
            .get_or_init(|| {
                Ok(Seccomp(
                    seccomp_filters()?
                        .into_iter()
                        .map(|p| {
                            p.iter()
                                .map(|i| {
                                    (u64::from(i.code) << 48)
                                        | (u64::from(i.jt) << 40)
                                        | (u64::from(i.jf) << 32)
                                        | u64::from(i.k)
                                })
                                .collect()
                        })
                        .collect(),
                ))
            })
            .clone()
    }

    fn programs(&self) -> Vec<seccompiler::BpfProgram> {
        self.0
            .iter()
            .map(|p| {
                p.iter()
                    .map(|&w| seccompiler::sock_filter {
                        code: (w >> 48) as u16,
                        jt: (w >> 40) as u8,
                        jf: (w >> 32) as u8,
                        k: w as u32,
                    })
                    .collect()
            })
            .collect()
    }
}

#[derive(Debug, serde::Deserialize)]
struct Profile {
    syscalls: Vec<Entry>,
}

#[derive(Debug, serde::Deserialize)]
struct Entry {
    names: Vec<String>,
    action: String,
    #[serde(default)]
    args: Option<Vec<Arg>>,
    #[serde(rename = "errnoRet")]
    errno_ret: Option<u32>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Debug, Default, serde::Deserialize)]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(rename = "minKernel")]
    min_kernel: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct Arg {
    index: u8,
    value: u64,
    #[serde(rename = "valueTwo", default)]
    value_two: u64,
    op: String,
}

/// What the profile says for this architecture and these capabilities: syscall -> rules that
/// allow it (an empty list: unconditionally), and errno -> syscalls answered with it.
#[derive(Debug, Default)]
struct Translated {
    allow: BTreeMap<i64, Vec<seccompiler::SeccompRule>>,
    errno: BTreeMap<u32, BTreeMap<i64, Vec<seccompiler::SeccompRule>>>,
}

/// "6.18.0-foo" -> (6, 18)
fn kernel_version(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|x| x.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Whether a profile entry applies here, as Docker decides it: every `includes` holds and no
/// `excludes` does.
fn applies(e: &Entry, caps: &[&str], kernel: (u32, u32)) -> bool {
    let inc = &e.includes;
    let exc = &e.excludes;
    (inc.arches.is_empty() || inc.arches.iter().any(|a| a == ARCH))
        && inc.caps.iter().all(|c| caps.contains(&c.as_str()))
        && inc
            .min_kernel
            .as_deref()
            .is_none_or(|k| kernel >= kernel_version(k))
        && !exc.arches.iter().any(|a| a == ARCH)
        && !exc.caps.iter().any(|c| caps.contains(&c.as_str()))
}

fn condition(a: &Arg) -> Result<seccompiler::SeccompCondition, String> {
    use seccompiler::SeccompCmpOp::*;
    let (op, value) = match a.op.as_str() {
        "SCMP_CMP_EQ" => (Eq, a.value),
        "SCMP_CMP_NE" => (Ne, a.value),
        "SCMP_CMP_LT" => (Lt, a.value),
        "SCMP_CMP_LE" => (Le, a.value),
        "SCMP_CMP_GT" => (Gt, a.value),
        "SCMP_CMP_GE" => (Ge, a.value),
        // libseccomp: (arg & value) == valueTwo
        "SCMP_CMP_MASKED_EQ" => (MaskedEq(a.value), a.value_two),
        other => return Err(format!("unknown seccomp operator {other}")),
    };
    seccompiler::SeccompCondition::new(a.index, seccompiler::SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| e.to_string())
}

/// Translates Docker's profile for x86_64, the capabilities in [`KEEP_CAPS`] and kernel
/// `kernel`, then removes [`EXTRA_DENIED`].
fn translate(profile: &str, kernel: (u32, u32)) -> Result<Translated, String> {
    let profile: Profile = serde_json::from_str(profile).map_err(|e| e.to_string())?;
    let caps: Vec<&str> = KEEP_CAPS.iter().map(|&(_, n)| n).collect();
    let mut t = Translated::default();
    // Syscalls some entry allows unconditionally: later conditional entries do not narrow them.
    let mut unconditional = std::collections::BTreeSet::new();
    for e in profile
        .syscalls
        .iter()
        .filter(|e| applies(e, &caps, kernel))
    {
        let rule = match e.args.as_deref() {
            None | Some([]) => None,
            Some(args) => Some(
                seccompiler::SeccompRule::new(
                    args.iter().map(condition).collect::<Result<Vec<_>, _>>()?,
                )
                .map_err(|e| e.to_string())?,
            ),
        };
        for name in &e.names {
            // Names of other architectures (or of syscalls this table does not know) do not
            // exist here.
            let Ok(nr) = name.parse::<syscalls::Sysno>() else {
                continue;
            };
            let nr = nr.id() as i64;
            let target = match (e.action.as_str(), e.errno_ret) {
                ("SCMP_ACT_ALLOW", _) => &mut t.allow,
                ("SCMP_ACT_ERRNO", Some(errno)) => t.errno.entry(errno).or_default(),
                // ERRNO without a value is EPERM, the default for what is not allowed.
                ("SCMP_ACT_ERRNO", None) => continue,
                (other, _) => return Err(format!("unsupported seccomp action {other}")),
            };
            let rules = target.entry(nr).or_default();
            match &rule {
                None => {
                    rules.clear();
                    unconditional.insert((e.errno_ret, nr));
                }
                Some(r) if !unconditional.contains(&(e.errno_ret, nr)) => rules.push(r.clone()),
                Some(_) => {}
            }
        }
    }
    for name in EXTRA_DENIED {
        let nr = name
            .parse::<syscalls::Sysno>()
            .map_err(|()| format!("unknown syscall {name}"))?
            .id() as i64;
        t.allow.remove(&nr);
        for m in t.errno.values_mut() {
            m.remove(&nr);
        }
    }
    Ok(t)
}

/// The sandbox's seccomp programs, to be installed in this order: an allow-list (what is not on
/// it fails with EPERM; what the profile answers with another errno passes it unconditionally),
/// then one program per such errno (e.g. `clone3` -> ENOSYS, so that libc falls back to `clone`,
/// whose namespace flags the allow-list refuses).
pub fn seccomp_filters() -> Result<Vec<seccompiler::BpfProgram>, String> {
    let kernel = nix::sys::utsname::uname()
        .map(|u| kernel_version(&u.release().to_string_lossy()))
        .map_err(|e| e.to_string())?;
    let mut t = translate(DOCKER_PROFILE, kernel)?;
    let compile = |rules, mismatch, matched| -> Result<seccompiler::BpfProgram, String> {
        seccompiler::SeccompFilter::new(rules, mismatch, matched, seccompiler::TargetArch::x86_64)
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: seccompiler::BackendError| e.to_string())
    };
    for m in t.errno.values() {
        for &nr in m.keys() {
            t.allow.insert(nr, Vec::new());
        }
    }
    let mut progs = vec![compile(
        t.allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::SeccompAction::Allow,
    )?];
    for (errno, rules) in t.errno {
        progs.push(compile(
            rules,
            seccompiler::SeccompAction::Allow,
            seccompiler::SeccompAction::Errno(errno),
        )?);
    }
    Ok(progs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nr(name: &str) -> i64 {
        name.parse::<syscalls::Sysno>().unwrap().id() as i64
    }

    #[test]
    fn docker_profile_translates_to_an_allow_list() {
        let t = translate(DOCKER_PROFILE, (6, 18)).unwrap();
        for ok in [
            "read", "write", "openat", "execve", "wait4", "chroot", "ptrace", "seccomp",
        ] {
            assert_eq!(t.allow.get(&nr(ok)), Some(&Vec::new()), "{ok} allowed");
        }
        // Not allowed without CAP_SYS_ADMIN (and so EPERM): the mount API, namespaces, bpf.
        for no in [
            "mount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "bpf",
            "perf_event_open",
            "open_tree",
            "move_mount",
            "fsopen",
            "kexec_load",
            "init_module",
            "reboot",
            "swapon",
            "acct",
            "settimeofday",
            "process_vm_readv",
        ] {
            assert!(!t.allow.contains_key(&nr(no)), "{no} must not be allowed");
        }
        for no in EXTRA_DENIED {
            assert!(!t.allow.contains_key(&nr(no)), "{no} must not be allowed");
        }
        // clone: only with no namespace flag (one masked-equality rule); clone3: ENOSYS.
        assert_eq!(t.allow[&nr("clone")].len(), 1);
        assert!(t.errno[&(libc::ENOSYS as u32)].contains_key(&nr("clone3")));
        // personality: five exact values.
        assert_eq!(t.allow[&nr("personality")].len(), 5);
    }

    #[test]
    fn min_kernel_is_honoured() {
        let old = translate(DOCKER_PROFILE, (4, 4)).unwrap();
        assert!(!old.allow.contains_key(&nr("ptrace")));
    }

    #[test]
    fn seccomp_programs_compile() {
        let progs = seccomp_filters().expect("filters build");
        assert_eq!(progs.len(), 2, "allow-list + ENOSYS for clone3");
    }

    #[test]
    fn packed_programs_round_trip() {
        let progs = seccomp_filters().unwrap();
        let back = Seccomp::get().unwrap().programs();
        assert_eq!(back.len(), progs.len());
        for (a, b) in back.iter().zip(&progs) {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert_eq!((x.code, x.jt, x.jf, x.k), (y.code, y.jt, y.jf, y.k));
            }
        }
    }
}
