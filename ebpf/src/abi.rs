//! Map keys and values shared with bpf/inspector.bpf.c (same layout, `#[repr(C)]`), and the
//! names of its classes and of the x86_64 syscalls it reports.

pub(crate) const NSAMPLES: usize = 4;
pub(crate) const PATH1_LEN: usize = 192;
pub(crate) const PATH2_LEN: usize = 128;

/// `enum fs_class`, in order.
pub(crate) const FS_CLASSES: [&str; 17] = [
    "open",
    "write",
    "copy",
    "truncate",
    "fallocate",
    "unlink",
    "rename",
    "mkdir",
    "rmdir",
    "link",
    "symlink",
    "mknod",
    "chmod",
    "chown",
    "xattr",
    "utime",
    "mmap",
];
pub(crate) const FS_RENAME: u32 = 6;
pub(crate) const FS_LINK: u32 = 9;
pub(crate) const FS_SYMLINK: u32 = 10;

/// `enum ipc_class`, in order.
pub(crate) const IPC_CLASSES: [&str; 13] = [
    "bind",
    "listen",
    "connect",
    "accept",
    "shm",
    "sem",
    "msg",
    "mq",
    "signal",
    "ptrace",
    "namespace",
    "async_io",
    "compat32",
];

/// `enum ll_reason`.
pub(crate) const LL_READ: u32 = 0;
pub(crate) const LL_WRITE: u32 = 1;
pub(crate) const LL_FORK: u32 = 2;
pub(crate) const LL_THREAD: u32 = 3;
pub(crate) const LL_EXEC: u32 = 4;
pub(crate) const LL_EXIT: u32 = 5;
pub(crate) const LL_FS: u32 = 6;
pub(crate) const LL_IPC: u32 = 7;
pub(crate) const LL_SIGNAL: u32 = 8;

/// `enum fd_kind`, as "a fifo" etc.
pub(crate) fn kind_name(kind: u32) -> &'static str {
    match kind {
        1 => "a regular file",
        2 => "a directory",
        3 => "a pipe",
        4 => "a fifo",
        5 => "a socket",
        6 => "a character device",
        7 => "a block device",
        8 => "a symlink",
        9 => {
            "an anonymous inode or another process (eventfd, timerfd, inotify, process_vm_readv...)"
        }
        _ => "a closed fd",
    }
}

/// `struct config`: the value of the `watched` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Config {
    pub epoch: u64,
    pub ignore_dev: u64,
    pub init_tgid: u32,
    pub suspended: u32,
}

/// `struct epoch_key`: the key of the `stats` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct EpochKey {
    pub cgid: u64,
    pub epoch: u64,
}

/// `struct path_sample`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct PathSample {
    pub class: u32,
    pub nr: u32,
    pub aux: u32,
    pub pad: u32,
    pub path: [u8; PATH1_LEN],
    pub path2: [u8; PATH2_LEN],
}

/// `struct ll_sample`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LlSample {
    pub tgid: u32,
    pub nr: u32,
    pub reason: u32,
    pub detail: u32,
}

/// `struct epoch_stats`: the value of the `stats` map.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct EpochStats {
    pub fs: [u64; FS_CLASSES.len()],
    pub ipc: [u64; IPC_CLASSES.len()],
    pub created: u64,
    pub exited: u64,
    pub live_born: i64,
    pub ll_events: u64,
    pub ll_slots: u64,
    pub path_slots: u64,
    pub ll: [LlSample; NSAMPLES],
    pub paths: [PathSample; NSAMPLES],
}

impl Default for EpochStats {
    fn default() -> Self {
        let path = PathSample {
            class: 0,
            nr: 0,
            aux: 0,
            pad: 0,
            path: [0; PATH1_LEN],
            path2: [0; PATH2_LEN],
        };
        Self {
            fs: [0; FS_CLASSES.len()],
            ipc: [0; IPC_CLASSES.len()],
            created: 0,
            exited: 0,
            live_born: 0,
            ll_events: 0,
            ll_slots: 0,
            path_slots: 0,
            ll: [LlSample::default(); NSAMPLES],
            paths: [path; NSAMPLES],
        }
    }
}

/// `struct birth`: the value of the `births` map (key: tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Birth {
    pub cgid: u64,
    pub epoch: u64,
}

// SAFETY: plain #[repr(C)] integers without padding (checked by the size assertions below), so
// every byte pattern is a valid value and no uninitialised bytes are read.
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
unsafe impl aya::Pod for EpochKey {}
// SAFETY: as above (integers and byte arrays).
unsafe impl aya::Pod for EpochStats {}
// SAFETY: as above.
unsafe impl aya::Pod for Birth {}

const _: () = assert!(std::mem::size_of::<Config>() == 24);
const _: () = assert!(std::mem::size_of::<EpochKey>() == 16);
const _: () = assert!(std::mem::size_of::<PathSample>() == 336);
const _: () = assert!(std::mem::size_of::<LlSample>() == 16);
const _: () = assert!(std::mem::size_of::<EpochStats>() == 8 * (17 + 13 + 6) + 16 * 4 + 336 * 4);
const _: () = assert!(std::mem::size_of::<Birth>() == 16);

/// The NUL-terminated string at the start of buf.
pub(crate) fn c_str(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The name of an x86_64 syscall that the inspector reports.
pub(crate) fn syscall_name(nr: u32) -> String {
    let name = match nr {
        0 => "read",
        1 => "write",
        2 => "open",
        9 => "mmap",
        17 => "pread64",
        18 => "pwrite64",
        19 => "readv",
        20 => "writev",
        26 => "msync",
        29 => "shmget",
        30 => "shmat",
        31 => "shmctl",
        40 => "sendfile",
        42 => "connect",
        43 => "accept",
        44 => "sendto",
        45 => "recvfrom",
        46 => "sendmsg",
        47 => "recvmsg",
        49 => "bind",
        50 => "listen",
        56 => "clone",
        59 => "execve",
        64 => "semget",
        65 => "semop",
        66 => "semctl",
        67 => "shmdt",
        68 => "msgget",
        69 => "msgsnd",
        70 => "msgrcv",
        71 => "msgctl",
        76 => "truncate",
        77 => "ftruncate",
        82 => "rename",
        83 => "mkdir",
        84 => "rmdir",
        85 => "creat",
        86 => "link",
        87 => "unlink",
        88 => "symlink",
        90 => "chmod",
        91 => "fchmod",
        92 => "chown",
        93 => "fchown",
        94 => "lchown",
        101 => "ptrace",
        132 => "utime",
        133 => "mknod",
        155 => "pivot_root",
        165 => "mount",
        166 => "umount2",
        170 => "sethostname",
        171 => "setdomainname",
        188 => "setxattr",
        189 => "lsetxattr",
        190 => "fsetxattr",
        197 => "removexattr",
        198 => "lremovexattr",
        199 => "fremovexattr",
        209 => "io_submit",
        220 => "semtimedop",
        231 => "exit_group",
        235 => "utimes",
        240 => "mq_open",
        241 => "mq_unlink",
        242 => "mq_timedsend",
        243 => "mq_timedreceive",
        244 => "mq_notify",
        245 => "mq_getsetattr",
        257 => "openat",
        258 => "mkdirat",
        259 => "mknodat",
        260 => "fchownat",
        261 => "futimesat",
        263 => "unlinkat",
        264 => "renameat",
        265 => "linkat",
        266 => "symlinkat",
        268 => "fchmodat",
        275 => "splice",
        276 => "tee",
        278 => "vmsplice",
        280 => "utimensat",
        285 => "fallocate",
        288 => "accept4",
        295 => "preadv",
        296 => "pwritev",
        299 => "recvmmsg",
        304 => "open_by_handle_at",
        307 => "sendmmsg",
        310 => "process_vm_readv",
        311 => "process_vm_writev",
        316 => "renameat2",
        326 => "copy_file_range",
        327 => "preadv2",
        328 => "pwritev2",
        425 => "io_uring_setup",
        426 => "io_uring_enter",
        427 => "io_uring_register",
        429 => "move_mount",
        432 => "fsmount",
        437 => "openat2",
        438 => "pidfd_getfd",
        442 => "mount_setattr",
        452 => "fchmodat2",
        463 => "setxattrat",
        466 => "removexattrat",
        469 => "file_setattr",
        _ => return format!("syscall {nr}"),
    };
    name.to_string()
}

/// Open flags as "O_WRONLY|O_CREAT|O_TRUNC" (only the ones that make an open a mutation).
pub(crate) fn open_flags(flags: u32) -> String {
    let mut parts = Vec::new();
    match flags & 3 {
        1 => parts.push("O_WRONLY"),
        2 => parts.push("O_RDWR"),
        _ => {}
    }
    if flags & 0o100 != 0 {
        parts.push("O_CREAT");
    }
    if flags & 0o1000 != 0 {
        parts.push("O_TRUNC");
    }
    if flags & 0o2000 != 0 {
        parts.push("O_APPEND");
    }
    parts.join("|")
}
