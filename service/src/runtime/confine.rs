//! What every process that sandtree starts inside a sandbox goes through just before exec:
//! capabilities dropped to a small set, no_new_privs, and a seccomp filter.

use std::collections::BTreeMap;

/// Capabilities a sandboxed root keeps (docker's default set minus NET_RAW, MKNOD, AUDIT_WRITE
/// and SETFCAP). Everything else, CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_SYS_PTRACE included, is
/// dropped from every set, the bounding set too.
const KEEP_CAPS: &[u32] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    18, // CAP_SYS_CHROOT
];

/// Syscalls that fail with EPERM inside a sandbox.
const DENIED_SYSCALLS: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_fsconfig,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_open_by_handle_at,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_userfaultfd,
    libc::SYS_unshare,
    libc::SYS_setns,
];

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
pub fn confine() -> std::io::Result<()> {
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40);
    for cap in 0..=last_cap {
        if !KEEP_CAPS.contains(&cap) {
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
    for &c in KEEP_CAPS {
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
    let filter = seccomp_filter().map_err(|e| std::io::Error::other(format!("seccomp: {e}")))?;
    seccompiler::apply_filter(&filter)
        .map_err(|e| std::io::Error::other(format!("seccomp: {e}")))?;
    Ok(())
}

/// The sandbox's seccomp program: allow by default, EPERM for [`DENIED_SYSCALLS`].
pub fn seccomp_filter() -> Result<seccompiler::BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|&s| (s, Vec::new())).collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        seccompiler::TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn seccomp_filter_compiles() {
        let prog = super::seccomp_filter().expect("filter builds");
        assert!(prog.len() > super::DENIED_SYSCALLS.len());
    }
}
