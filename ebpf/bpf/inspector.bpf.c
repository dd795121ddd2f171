// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0-only
/*
 * sandtree turn inspector (after the Crab paper).
 *
 * Watches the syscalls of the processes in watched cgroup v2 leaves (one per sandbox) and counts,
 * per sandbox and per turn epoch, what could have changed the sandbox: file system mutations,
 * process creation/exit, activity of processes that outlived an earlier turn ("long-lived"), and
 * sockets/IPC. User space (src/lib.rs) owns the per-sandbox config, including the epoch counter,
 * and reads the per-epoch stats at each turn boundary.
 *
 * Everything is filtered in the kernel by the `watched` map (cgroup id -> config): processes in
 * other cgroups cost one helper call and one hash lookup per syscall exit.
 *
 * Syscalls are analysed at exit (tp_btf/sys_exit), so that only syscalls that succeeded count and
 * a syscall that blocks across a turn boundary (a read on a fifo) counts in the epoch in which it
 * completed. x86_64 only; 32-bit (ia32) syscalls are not analysed and count as `compat32`.
 *
 * Kernel structs are declared by hand with only the fields used, and relocated with CO-RE
 * (preserve_access_index) against the running kernel's BTF.
 *
 * Keep the structs under "shared with user space" in sync with src/abi.rs.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <asm/unistd_64.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __s32 s32;
typedef __u64 u64;
typedef __s64 s64;

/* Syscalls newer than the uapi headers of the build host. */
#ifndef __NR_openat2
#define __NR_openat2 437
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif
#ifndef __NR_mount_setattr
#define __NR_mount_setattr 442
#endif
#ifndef __NR_fchmodat2
#define __NR_fchmodat2 452
#endif
#ifndef __NR_setxattrat
#define __NR_setxattrat 463
#endif
#ifndef __NR_removexattrat
#define __NR_removexattrat 466
#endif
#ifndef __NR_file_setattr
#define __NR_file_setattr 469
#endif

/* ---- constants ---------------------------------------------------------------------------- */

#define MAX_SANDBOXES 1024
#define MAX_STATS (2 * MAX_SANDBOXES)
#define MAX_PROCS 32768
#define NSAMPLES 4
#define PATH1_LEN 192
#define PATH2_LEN 128

#define O_WRONLY 01
#define O_RDWR 02
#define O_CREAT 0100
#define O_TRUNC 01000
#define AT_FDCWD -100
#define AT_REMOVEDIR 0x200
#define PROT_WRITE 0x2
#define MAP_SHARED 0x01
#define EINPROGRESS 115
#define TS_COMPAT 0x0002
#define AF_NETLINK 16
#define NETLINK_ROUTE 0

#define S_IFMT 0170000
#define S_IFSOCK 0140000
#define S_IFLNK 0120000
#define S_IFREG 0100000
#define S_IFBLK 0060000
#define S_IFDIR 0040000
#define S_IFCHR 0020000
#define S_IFIFO 0010000

/* Super block magics of pseudo file systems whose files are not part of the sandbox's files. */
#define PROC_SUPER_MAGIC 0x9fa0
#define SYSFS_MAGIC 0x62656572
#define CGROUP_SUPER_MAGIC 0x27e0eb
#define CGROUP2_SUPER_MAGIC 0x63677270
#define DEBUGFS_MAGIC 0x64626720
#define TRACEFS_MAGIC 0x74726163
#define SECURITYFS_MAGIC 0x73636673
#define BPF_FS_MAGIC 0xcafe4a11
#define DEVPTS_SUPER_MAGIC 0x1cd1
#define PIPEFS_MAGIC 0x50495045

/* TRACE_SIGNAL_* results of signal_generate. */
#define TRACE_SIGNAL_DELIVERED 0
#define TRACE_SIGNAL_LOSE_INFO 4

/* ---- shared with user space (src/abi.rs) -------------------------------------------------- */

enum fs_class {
	FS_OPEN,
	FS_WRITE,
	FS_COPY,
	FS_TRUNCATE,
	FS_FALLOCATE,
	FS_UNLINK,
	FS_RENAME,
	FS_MKDIR,
	FS_RMDIR,
	FS_LINK,
	FS_SYMLINK,
	FS_MKNOD,
	FS_CHMOD,
	FS_CHOWN,
	FS_XATTR,
	FS_UTIME,
	FS_MMAP,
	FS_NCLASS,
};

enum ipc_class {
	IPC_BIND,
	IPC_LISTEN,
	IPC_CONNECT,
	IPC_ACCEPT,
	IPC_SHM,
	IPC_SEM,
	IPC_MSG,
	IPC_MQ,
	IPC_SIGNAL,
	IPC_PTRACE,
	IPC_NAMESPACE,
	IPC_ASYNC_IO,
	IPC_COMPAT32,
	IPC_NCLASS,
};

enum ll_reason {
	LL_READ,
	LL_WRITE,
	LL_FORK,
	LL_THREAD,
	LL_EXEC,
	LL_EXIT,
	LL_FS,
	LL_IPC,
	LL_SIGNAL,
};

enum fd_kind {
	KIND_NONE,
	KIND_REG,
	KIND_DIR,
	KIND_PIPE,
	KIND_FIFO,
	KIND_SOCK,
	KIND_CHR,
	KIND_BLK,
	KIND_LNK,
	KIND_OTHER,
};

struct config {
	u64 epoch;       /* current epoch, bumped by user space at each turn boundary */
	u64 ignore_dev;  /* kernel dev_t (i_sb->s_dev) of the sandbox's private tmpfs; 0: none */
	u32 init_tgid;   /* the sandbox init (global tgid): never counted as long-lived */
	u32 suspended;   /* non-zero: record nothing (CRIU dump/restore in progress) */
};

struct epoch_key {
	u64 cgid;
	u64 epoch;
};

struct path_sample {
	u32 class;  /* enum fs_class, or 0x100 + enum ipc_class */
	u32 nr;     /* syscall number */
	u32 aux;    /* open flags, or mkdir/mknod mode */
	u32 pad;
	char path[PATH1_LEN];
	char path2[PATH2_LEN];
};

struct ll_sample {
	u32 tgid;
	u32 nr;      /* syscall number, or signal number for LL_SIGNAL */
	u32 reason;  /* enum ll_reason */
	u32 detail;  /* enum fd_kind for LL_READ/LL_WRITE; fs_class for LL_FS; ipc_class for LL_IPC */
};

struct epoch_stats {
	u64 fs[FS_NCLASS];
	u64 ipc[IPC_NCLASS];
	u64 created;
	u64 exited;
	s64 live_born;   /* processes born in this epoch minus those of them that exited in it */
	u64 ll_events;
	u64 ll_slots;
	u64 path_slots;
	struct ll_sample ll[NSAMPLES];
	struct path_sample paths[NSAMPLES];
};

struct birth {
	u64 cgid;
	u64 epoch;
};

/* ---- maps --------------------------------------------------------------------------------- */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SANDBOXES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* replaced elements are freed after an RCU grace period */
	__type(key, u64);
	__type(value, struct config);
} watched SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STATS);
	__type(key, struct epoch_key);
	__type(value, struct epoch_stats);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PROCS);
	__type(key, u32);
	__type(value, struct birth);
} births SEC(".maps");

/* Events lost per cgroup (map full); entries are created by user space in watch(). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SANDBOXES);
	__type(key, u64);
	__type(value, u64);
} overflow SEC(".maps");

/* One all-zero epoch_stats, the initial value of entries created here (too big for the stack). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct epoch_stats);
} zero_stats SEC(".maps");

/* ---- kernel types (CO-RE) ----------------------------------------------------------------- */

struct super_block {
	u32 s_dev;
	unsigned long s_magic;
} __attribute__((preserve_access_index));

struct inode {
	u16 i_mode;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));

struct dentry {
	struct super_block *d_sb;
} __attribute__((preserve_access_index));

struct path {
	void *mnt;
	struct dentry *dentry;
} __attribute__((preserve_access_index));

struct file {
	struct inode *f_inode;
	void *private_data;
} __attribute__((preserve_access_index));

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
} __attribute__((preserve_access_index));

struct files_struct {
	struct fdtable *fdt;
} __attribute__((preserve_access_index));

struct fs_struct {
	struct path pwd;
} __attribute__((preserve_access_index));

struct kernfs_node {
	u64 id;
} __attribute__((preserve_access_index));

struct cgroup_root {
	int hierarchy_id;
} __attribute__((preserve_access_index));

struct cgroup {
	struct kernfs_node *kn;
	struct cgroup_root *root;
} __attribute__((preserve_access_index));

struct css_set {
	struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));

struct thread_info {
	u32 status;
} __attribute__((preserve_access_index));

struct task_struct {
	struct thread_info thread_info;
	int pid;
	int tgid;
	struct files_struct *files;
	struct fs_struct *fs;
	struct css_set *cgroups;
} __attribute__((preserve_access_index));

struct sock_common {
	unsigned short skc_family;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	u16 sk_protocol;
} __attribute__((preserve_access_index));

struct socket {
	struct sock *sk;
} __attribute__((preserve_access_index));

/* The kernel's struct pt_regs (x86_64); the ___st flavour keeps it apart from the uapi one. */
struct pt_regs___st {
	unsigned long r10;
	unsigned long r8;
	unsigned long dx;
	unsigned long si;
	unsigned long di;
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

/* ---- helpers ------------------------------------------------------------------------------ */

/* One event being analysed. */
struct ev {
	struct config *cfg;
	struct task_struct *task;
	struct epoch_stats *st; /* looked up lazily */
	u64 cg;
	u64 epoch;
	u32 tgid;
	u32 nr;
	int long_lived; /* -1: not computed yet */
};

static __always_inline void note_overflow(u64 cg)
{
	u64 *n = bpf_map_lookup_elem(&overflow, &cg);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline struct epoch_stats *stats_for(u64 cg, u64 epoch)
{
	struct epoch_key k = { .cgid = cg, .epoch = epoch };
	struct epoch_stats *s = bpf_map_lookup_elem(&stats, &k);
	if (s)
		return s;
	u32 zero = 0;
	struct epoch_stats *z = bpf_map_lookup_elem(&zero_stats, &zero);
	if (!z)
		return 0;
	/* EEXIST when another CPU created it meanwhile: fine, look it up again. */
	bpf_map_update_elem(&stats, &k, z, BPF_NOEXIST);
	s = bpf_map_lookup_elem(&stats, &k);
	if (!s)
		note_overflow(cg);
	return s;
}

static __always_inline struct epoch_stats *ev_stats(struct ev *e)
{
	if (!e->st)
		e->st = stats_for(e->cg, e->epoch);
	return e->st;
}

/* Whether tgid counts as long-lived: born (or moved into the sandbox) before the current epoch,
 * or unknown (already there when the sandbox was watched, or restored by CRIU). */
static __always_inline int is_long_lived(struct config *cfg, u64 cg, u64 epoch, u32 tgid)
{
	if (tgid == cfg->init_tgid)
		return 0;
	struct birth *b = bpf_map_lookup_elem(&births, &tgid);
	if (!b || b->cgid != cg)
		return 1;
	return b->epoch < epoch;
}

static __always_inline int ev_long_lived(struct ev *e)
{
	if (e->long_lived < 0)
		e->long_lived = is_long_lived(e->cfg, e->cg, e->epoch, e->tgid);
	return e->long_lived;
}

static __always_inline void mark_ll(struct epoch_stats *st, u32 tgid, u32 nr, u32 reason, u32 detail)
{
	__sync_fetch_and_add(&st->ll_events, 1);
	for (int i = 0; i < NSAMPLES; i++) {
		if (st->ll[i].tgid == tgid)
			return;
	}
	u64 slot = __sync_fetch_and_add(&st->ll_slots, 1);
	if (slot >= NSAMPLES)
		return;
	struct ll_sample *s = &st->ll[slot & (NSAMPLES - 1)];
	s->nr = nr;
	s->reason = reason;
	s->detail = detail;
	s->tgid = tgid;
}

static __always_inline void ev_mark_ll(struct ev *e, u32 reason, u32 detail)
{
	if (!ev_long_lived(e))
		return;
	struct epoch_stats *st = ev_stats(e);
	if (st)
		mark_ll(st, e->tgid, e->nr, reason, detail);
}

static __always_inline void ev_ipc(struct ev *e, u32 class)
{
	struct epoch_stats *st = ev_stats(e);
	if (!st)
		return;
	if (class < IPC_NCLASS)
		__sync_fetch_and_add(&st->ipc[class], 1);
	ev_mark_ll(e, LL_IPC, class);
}

/* The file of fd in task (the current task: a trusted BTF pointer, read with direct loads). */
static __always_inline struct file *fd_file(struct task_struct *task, long fd)
{
	if (fd < 0)
		return 0;
	struct files_struct *files = task->files;
	if (!files)
		return 0;
	struct fdtable *fdt = files->fdt;
	if (!fdt || (unsigned long)fd >= fdt->max_fds)
		return 0;
	struct file **arr = fdt->fd;
	struct file *f = 0;
	bpf_probe_read_kernel(&f, sizeof(f), &arr[fd]);
	return f;
}

static __always_inline int sb_pseudo(struct super_block *sb)
{
	unsigned long magic = BPF_CORE_READ(sb, s_magic);
	switch (magic) {
	case PROC_SUPER_MAGIC:
	case SYSFS_MAGIC:
	case CGROUP_SUPER_MAGIC:
	case CGROUP2_SUPER_MAGIC:
	case DEBUGFS_MAGIC:
	case TRACEFS_MAGIC:
	case SECURITYFS_MAGIC:
	case BPF_FS_MAGIC:
	case DEVPTS_SUPER_MAGIC:
		return 1;
	}
	return 0;
}

/* Whether files on sb are not the sandbox's files: its ignored device or a pseudo file system. */
static __always_inline int sb_ignored(struct config *cfg, struct super_block *sb)
{
	if (!sb)
		return 1;
	u64 dev = BPF_CORE_READ(sb, s_dev);
	if (cfg->ignore_dev && dev == cfg->ignore_dev)
		return 1;
	return sb_pseudo(sb);
}

static __always_inline u32 mode_kind(u16 mode, struct super_block *sb)
{
	switch (mode & S_IFMT) {
	case S_IFREG:
		return KIND_REG;
	case S_IFDIR:
		return KIND_DIR;
	case S_IFIFO:
		return BPF_CORE_READ(sb, s_magic) == PIPEFS_MAGIC ? KIND_PIPE : KIND_FIFO;
	case S_IFSOCK:
		return KIND_SOCK;
	case S_IFCHR:
		return KIND_CHR;
	case S_IFBLK:
		return KIND_BLK;
	case S_IFLNK:
		return KIND_LNK;
	}
	return KIND_OTHER;
}

static __always_inline u32 fd_kind(struct task_struct *task, long fd)
{
	struct file *f = fd_file(task, fd);
	if (!f)
		return KIND_NONE;
	struct inode *ino = BPF_CORE_READ(f, f_inode);
	if (!ino)
		return KIND_OTHER;
	return mode_kind(BPF_CORE_READ(ino, i_mode), BPF_CORE_READ(ino, i_sb));
}

/* A mutation through a file descriptor: counts if fd is a regular file (or, for attribute
 * changes, a directory) of the sandbox. */
static __always_inline void fd_mutation(struct ev *e, u32 class, long fd, int dirs_too)
{
	struct file *f = fd_file(e->task, fd);
	if (!f)
		return;
	struct inode *ino = BPF_CORE_READ(f, f_inode);
	if (!ino)
		return;
	u16 fmt = BPF_CORE_READ(ino, i_mode) & S_IFMT;
	if (fmt != S_IFREG && !(dirs_too && fmt == S_IFDIR))
		return;
	if (sb_ignored(e->cfg, BPF_CORE_READ(ino, i_sb)))
		return;
	struct epoch_stats *st = ev_stats(e);
	if (!st)
		return;
	if (class < FS_NCLASS)
		__sync_fetch_and_add(&st->fs[class], 1);
	ev_mark_ll(e, LL_FS, class);
}

enum prefix {
	PFX_NONE,   /* unreadable or empty */
	PFX_REL,    /* relative path */
	PFX_ABS,    /* an absolute path of the sandbox's files */
	PFX_SKIP,   /* /dev/, /proc/, /sys/, /.sandtree/ */
	PFX_SHM,    /* /dev/shm/ (POSIX shared memory and semaphores) */
	PFX_SYSCTL, /* /proc/sys/ */
};

static __always_inline int path_prefix(const char *upath)
{
	char b[16] = {};
	if (!upath)
		return PFX_NONE;
	long n = bpf_probe_read_user_str(b, sizeof(b), upath);
	if (n <= 1)
		return PFX_NONE;
	if (b[0] != '/')
		return PFX_REL;
	if (b[1] == 'd' && b[2] == 'e' && b[3] == 'v' && b[4] == '/') {
		if (b[5] == 's' && b[6] == 'h' && b[7] == 'm' && b[8] == '/')
			return PFX_SHM;
		return PFX_SKIP;
	}
	if (b[1] == 'p' && b[2] == 'r' && b[3] == 'o' && b[4] == 'c' && b[5] == '/') {
		if (b[6] == 's' && b[7] == 'y' && b[8] == 's' && b[9] == '/')
			return PFX_SYSCTL;
		return PFX_SKIP;
	}
	if (b[1] == 's' && b[2] == 'y' && b[3] == 's' && b[4] == '/')
		return PFX_SKIP;
	if (b[1] == '.' && b[2] == 's' && b[3] == 'a' && b[4] == 'n' && b[5] == 'd' && b[6] == 't' &&
	    b[7] == 'r' && b[8] == 'e' && b[9] == 'e' && (b[10] == '/' || b[10] == 0))
		return PFX_SKIP;
	return PFX_ABS;
}

/* Whether a relative path resolved from dirfd lands on an ignored file system (by its base
 * directory: the working directory for AT_FDCWD). */
static __always_inline int base_ignored(struct ev *e, long dirfd)
{
	struct super_block *sb;
	struct task_struct *task = e->task;
	if ((int)dirfd == AT_FDCWD) {
		sb = BPF_CORE_READ(task, fs, pwd.dentry, d_sb);
	} else {
		struct file *f = fd_file(e->task, dirfd);
		if (!f)
			return 0;
		sb = BPF_CORE_READ(f, f_inode, i_sb);
	}
	return sb_ignored(e->cfg, sb);
}

/* What a path argument means: PFX_SKIP when it is not the sandbox's files. */
static __always_inline int classify_path(struct ev *e, long dirfd, const char *p)
{
	int pfx = path_prefix(p);
	if (pfx == PFX_REL && base_ignored(e, dirfd))
		return PFX_SKIP;
	return pfx;
}

static __always_inline void sample(struct epoch_stats *st, u32 class, u32 nr, u32 aux, const char *p1,
				   const char *p2)
{
	u64 slot = __sync_fetch_and_add(&st->path_slots, 1);
	if (slot >= NSAMPLES)
		return;
	struct path_sample *s = &st->paths[slot & (NSAMPLES - 1)];
	s->class = class;
	s->nr = nr;
	s->aux = aux;
	if (p1)
		bpf_probe_read_user_str(s->path, sizeof(s->path), p1);
	if (p2)
		bpf_probe_read_user_str(s->path2, sizeof(s->path2), p2);
}

/* A mutation named by one or two paths (p2: the second path of rename/link/symlink, whose
 * directory is dirfd2). */
static __always_inline void path_mutation(struct ev *e, u32 class, long dirfd, const char *p1,
					  long dirfd2, const char *p2, u32 aux)
{
	int c1 = classify_path(e, dirfd, p1);
	int c2 = p2 ? classify_path(e, dirfd2, p2) : PFX_SKIP;
	if (c1 == PFX_SHM || c2 == PFX_SHM) {
		ev_ipc(e, IPC_SHM);
		return;
	}
	if (c1 == PFX_SYSCTL || c2 == PFX_SYSCTL) {
		ev_ipc(e, IPC_NAMESPACE);
		return;
	}
	if (c1 == PFX_SKIP && (!p2 || c2 == PFX_SKIP))
		return;
	struct epoch_stats *st = ev_stats(e);
	if (!st)
		return;
	if (class < FS_NCLASS)
		__sync_fetch_and_add(&st->fs[class], 1);
	sample(st, class, e->nr, aux, p1, p2);
	ev_mark_ll(e, LL_FS, class);
}

/* open/openat/openat2/creat that returned fd: counts if opened for writing, creating or
 * truncating, and fd is a regular file of the sandbox. */
static __always_inline void open_mutation(struct ev *e, const char *p, u64 flags, long fd)
{
	if (!(flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC)))
		return;
	int pfx = path_prefix(p);
	if (pfx == PFX_SHM) {
		ev_ipc(e, IPC_SHM);
		return;
	}
	if (pfx == PFX_SYSCTL) {
		ev_ipc(e, IPC_NAMESPACE);
		return;
	}
	if (pfx == PFX_SKIP)
		return;
	struct file *f = fd_file(e->task, fd);
	if (!f)
		return;
	struct inode *ino = BPF_CORE_READ(f, f_inode);
	if (!ino || (BPF_CORE_READ(ino, i_mode) & S_IFMT) != S_IFREG)
		return;
	if (sb_ignored(e->cfg, BPF_CORE_READ(ino, i_sb)))
		return;
	struct epoch_stats *st = ev_stats(e);
	if (!st)
		return;
	__sync_fetch_and_add(&st->fs[FS_OPEN], 1);
	sample(st, FS_OPEN, e->nr, (u32)flags, p, 0);
	ev_mark_ll(e, LL_FS, FS_OPEN);
}

/* Data read by a long-lived process from anything but a regular file or directory (pipes, fifos,
 * sockets, ttys and other devices, eventfd/timerfd/inotify...): input from outside. */
static __always_inline void read_input(struct ev *e, long fd, long ret)
{
	if (ret <= 0 || !ev_long_lived(e))
		return;
	u32 kind = fd_kind(e->task, fd);
	if (kind == KIND_REG || kind == KIND_DIR || kind == KIND_NONE)
		return;
	struct epoch_stats *st = ev_stats(e);
	if (st)
		mark_ll(st, e->tgid, e->nr, LL_READ, kind);
}

static __always_inline void write_output(struct ev *e, long fd)
{
	if (!ev_long_lived(e))
		return;
	struct epoch_stats *st = ev_stats(e);
	if (st)
		mark_ll(st, e->tgid, e->nr, LL_WRITE, fd_kind(e->task, fd));
}

/* The socket of fd, or NULL when fd is not a socket. */
static __always_inline struct sock *fd_sock(struct task_struct *task, long fd)
{
	struct file *f = fd_file(task, fd);
	if (!f)
		return 0;
	struct inode *ino = BPF_CORE_READ(f, f_inode);
	if (!ino || (BPF_CORE_READ(ino, i_mode) & S_IFMT) != S_IFSOCK)
		return 0;
	struct socket *sock = BPF_CORE_READ(f, private_data);
	return BPF_CORE_READ(sock, sk);
}

static __always_inline int is_netlink(struct sock *sk)
{
	return sk && BPF_CORE_READ(sk, __sk_common.skc_family) == AF_NETLINK;
}

/* Messages sent on netlink sockets can reconfigure the sandbox's network namespace; rtnetlink
 * GET requests (getaddrinfo, if_nameindex) cannot. buf: the first message. */
static __always_inline void netlink_send(struct ev *e, long fd, const void *buf)
{
	struct sock *sk = fd_sock(e->task, fd);
	if (!is_netlink(sk))
		return;
	if (BPF_CORE_READ(sk, sk_protocol) == NETLINK_ROUTE && buf) {
		u16 type = 0;
		/* struct nlmsghdr { u32 nlmsg_len; u16 nlmsg_type; ... } */
		bpf_probe_read_user(&type, sizeof(type), (const char *)buf + 4);
		if (type >= 16 && (type & 3) == 2)
			return;
	}
	ev_ipc(e, IPC_NAMESPACE);
}

/* The first iovec's base of a user struct msghdr. */
static __always_inline const void *msghdr_base(const void *msg)
{
	const void *iov = 0, *base = 0;
	if (!msg)
		return 0;
	/* struct msghdr { void *name; int namelen; struct iovec *iov; ... } */
	bpf_probe_read_user(&iov, sizeof(iov), (const char *)msg + 16);
	if (iov)
		bpf_probe_read_user(&base, sizeof(base), iov);
	return base;
}

/* ---- programs ----------------------------------------------------------------------------- */

SEC("tp_btf/sys_exit")
int sandtree_sys_exit(u64 *ctx)
{
	u64 cg = bpf_get_current_cgroup_id();
	struct config *cfg = bpf_map_lookup_elem(&watched, &cg);
	if (!cfg || cfg->suspended)
		return 0;

	struct pt_regs___st *regs = (struct pt_regs___st *)ctx[0];
	long ret = (long)ctx[1];
	struct task_struct *task = bpf_get_current_task_btf();
	struct ev e = {
		.cfg = cfg,
		.task = task,
		.st = 0,
		.cg = cg,
		.epoch = cfg->epoch,
		.tgid = bpf_get_current_pid_tgid() >> 32,
		.nr = (u32)regs->orig_ax,
		.long_lived = -1,
	};

	if (task->thread_info.status & TS_COMPAT) {
		if (ret >= 0)
			ev_ipc(&e, IPC_COMPAT32);
		return 0;
	}
	if (ret < 0 && !(e.nr == __NR_connect && ret == -EINPROGRESS))
		return 0;

	/* Syscall arguments (x86_64: di, si, dx, r10, r8), still in the saved user registers. */
	long a0 = regs->di;
	long a1 = regs->si;
	long a2 = regs->dx;
	long a3 = regs->r10;
	long a4 = regs->r8;

	switch (e.nr) {
	/* input */
	case __NR_read:
	case __NR_readv:
	case __NR_pread64:
	case __NR_preadv:
	case __NR_preadv2:
	case __NR_recvfrom:
	case __NR_recvmsg:
	case __NR_recvmmsg:
		read_input(&e, a0, ret);
		break;
	case __NR_process_vm_readv: /* another process's memory: input too */
		if (ret > 0)
			ev_mark_ll(&e, LL_READ, KIND_OTHER);
		break;

	/* output */
	case __NR_write:
	case __NR_pwrite64:
	case __NR_writev:
	case __NR_pwritev:
	case __NR_pwritev2:
		if (ret > 0) {
			fd_mutation(&e, FS_WRITE, a0, 0);
			write_output(&e, a0);
		}
		break;
	case __NR_sendfile:
		if (ret > 0) {
			fd_mutation(&e, FS_COPY, a0, 0);
			write_output(&e, a0);
		}
		break;
	case __NR_copy_file_range:
	case __NR_splice:
		if (ret > 0) {
			fd_mutation(&e, FS_COPY, a2, 0);
			write_output(&e, a2);
		}
		break;
	case __NR_tee:
	case __NR_vmsplice:
		if (ret > 0)
			write_output(&e, a0);
		break;
	case __NR_sendto:
		netlink_send(&e, a0, (const void *)a1);
		write_output(&e, a0);
		break;
	case __NR_sendmsg:
		netlink_send(&e, a0, msghdr_base((const void *)a1));
		write_output(&e, a0);
		break;
	case __NR_sendmmsg:
		/* struct mmsghdr starts with its struct msghdr */
		netlink_send(&e, a0, msghdr_base((const void *)a1));
		write_output(&e, a0);
		break;

	/* file system: through a file descriptor */
	case __NR_ftruncate:
		fd_mutation(&e, FS_TRUNCATE, a0, 0);
		break;
	case __NR_fallocate:
		fd_mutation(&e, FS_FALLOCATE, a0, 0);
		break;
	case __NR_fchmod:
		fd_mutation(&e, FS_CHMOD, a0, 1);
		break;
	case __NR_fchown:
		fd_mutation(&e, FS_CHOWN, a0, 1);
		break;
	case __NR_fsetxattr:
	case __NR_fremovexattr:
		fd_mutation(&e, FS_XATTR, a0, 1);
		break;
	case __NR_mmap:
		if ((a2 & PROT_WRITE) && (a3 & MAP_SHARED))
			fd_mutation(&e, FS_MMAP, a4, 0);
		break;
	case __NR_msync: {
		struct epoch_stats *st = ev_stats(&e);
		if (st)
			__sync_fetch_and_add(&st->fs[FS_MMAP], 1);
		ev_mark_ll(&e, LL_FS, FS_MMAP);
		break;
	}

	/* file system: opens */
	case __NR_open:
		open_mutation(&e, (const char *)a0, a1, ret);
		break;
	case __NR_creat:
		open_mutation(&e, (const char *)a0, O_CREAT | O_WRONLY | O_TRUNC, ret);
		break;
	case __NR_openat:
		open_mutation(&e, (const char *)a1, a2, ret);
		break;
	case __NR_openat2: {
		u64 flags = 0; /* struct open_how { u64 flags; ... } */
		bpf_probe_read_user(&flags, sizeof(flags), (const void *)a2);
		open_mutation(&e, (const char *)a1, flags, ret);
		break;
	}
	case __NR_open_by_handle_at:
		open_mutation(&e, 0, a2, ret);
		break;

	/* file system: by path */
	case __NR_truncate:
		path_mutation(&e, FS_TRUNCATE, AT_FDCWD, (const char *)a0, 0, 0, 0);
		break;
	case __NR_unlink:
		path_mutation(&e, FS_UNLINK, AT_FDCWD, (const char *)a0, 0, 0, 0);
		break;
	case __NR_unlinkat:
		path_mutation(&e, (a2 & AT_REMOVEDIR) ? FS_RMDIR : FS_UNLINK, a0, (const char *)a1, 0, 0, 0);
		break;
	case __NR_rmdir:
		path_mutation(&e, FS_RMDIR, AT_FDCWD, (const char *)a0, 0, 0, 0);
		break;
	case __NR_rename:
		path_mutation(&e, FS_RENAME, AT_FDCWD, (const char *)a0, AT_FDCWD, (const char *)a1, 0);
		break;
	case __NR_renameat:
	case __NR_renameat2:
		path_mutation(&e, FS_RENAME, a0, (const char *)a1, a2, (const char *)a3, 0);
		break;
	case __NR_mkdir:
		path_mutation(&e, FS_MKDIR, AT_FDCWD, (const char *)a0, 0, 0, a1);
		break;
	case __NR_mkdirat:
		path_mutation(&e, FS_MKDIR, a0, (const char *)a1, 0, 0, a2);
		break;
	case __NR_link: /* sample: the new name, then the old one */
		path_mutation(&e, FS_LINK, AT_FDCWD, (const char *)a1, AT_FDCWD, (const char *)a0, 0);
		break;
	case __NR_linkat:
		path_mutation(&e, FS_LINK, a2, (const char *)a3, a0, (const char *)a1, 0);
		break;
	case __NR_symlink: /* sample: the link, then its target (not checked: any string) */
		path_mutation(&e, FS_SYMLINK, AT_FDCWD, (const char *)a1, 0, 0, 0);
		break;
	case __NR_symlinkat:
		path_mutation(&e, FS_SYMLINK, a1, (const char *)a2, 0, 0, 0);
		break;
	case __NR_mknod:
		path_mutation(&e, FS_MKNOD, AT_FDCWD, (const char *)a0, 0, 0, a1);
		break;
	case __NR_mknodat:
		path_mutation(&e, FS_MKNOD, a0, (const char *)a1, 0, 0, a2);
		break;
	case __NR_chmod:
		path_mutation(&e, FS_CHMOD, AT_FDCWD, (const char *)a0, 0, 0, a1);
		break;
	case __NR_fchmodat:
	case __NR_fchmodat2:
		path_mutation(&e, FS_CHMOD, a0, (const char *)a1, 0, 0, a2);
		break;
	case __NR_chown:
	case __NR_lchown:
		path_mutation(&e, FS_CHOWN, AT_FDCWD, (const char *)a0, 0, 0, 0);
		break;
	case __NR_fchownat:
		path_mutation(&e, FS_CHOWN, a0, (const char *)a1, 0, 0, 0);
		break;
	case __NR_setxattr:
	case __NR_lsetxattr:
	case __NR_removexattr:
	case __NR_lremovexattr:
		path_mutation(&e, FS_XATTR, AT_FDCWD, (const char *)a0, 0, 0, 0);
		break;
	case __NR_setxattrat:
	case __NR_removexattrat:
	case __NR_file_setattr:
		path_mutation(&e, FS_XATTR, a0, (const char *)a1, 0, 0, 0);
		break;
	case __NR_utime:
	case __NR_utimes:
		path_mutation(&e, FS_UTIME, AT_FDCWD, (const char *)a0, 0, 0, 0);
		break;
	case __NR_futimesat:
		path_mutation(&e, FS_UTIME, a0, (const char *)a1, 0, 0, 0);
		break;
	case __NR_utimensat:
		if (a1) /* utimensat(dirfd, path, ...) */
			path_mutation(&e, FS_UTIME, a0, (const char *)a1, 0, 0, 0);
		else /* futimens(fd, ...) */
			fd_mutation(&e, FS_UTIME, a0, 1);
		break;

	/* sockets and IPC */
	case __NR_bind: /* binding a netlink socket only names it, for the process's lifetime */
		if (!is_netlink(fd_sock(task, a0)))
			ev_ipc(&e, IPC_BIND);
		break;
	case __NR_listen:
		ev_ipc(&e, IPC_LISTEN);
		break;
	case __NR_connect:
		if (!is_netlink(fd_sock(task, a0)))
			ev_ipc(&e, IPC_CONNECT);
		break;
	case __NR_accept:
	case __NR_accept4:
		ev_ipc(&e, IPC_ACCEPT);
		break;
	case __NR_shmget:
	case __NR_shmat:
	case __NR_shmdt:
	case __NR_shmctl:
		ev_ipc(&e, IPC_SHM);
		break;
	case __NR_semget:
	case __NR_semop:
	case __NR_semtimedop:
	case __NR_semctl:
		ev_ipc(&e, IPC_SEM);
		break;
	case __NR_msgget:
	case __NR_msgsnd:
	case __NR_msgrcv:
	case __NR_msgctl:
		ev_ipc(&e, IPC_MSG);
		break;
	case __NR_mq_open:
	case __NR_mq_unlink:
	case __NR_mq_timedsend:
	case __NR_mq_timedreceive:
	case __NR_mq_notify:
	case __NR_mq_getsetattr:
		ev_ipc(&e, IPC_MQ);
		break;
	case __NR_ptrace:
	case __NR_process_vm_writev:
	case __NR_pidfd_getfd:
		ev_ipc(&e, IPC_PTRACE);
		break;
	case __NR_mount:
	case __NR_umount2:
	case __NR_pivot_root:
	case __NR_move_mount:
	case __NR_mount_setattr:
	case __NR_fsmount:
	case __NR_sethostname:
	case __NR_setdomainname:
		ev_ipc(&e, IPC_NAMESPACE);
		break;
	case __NR_io_uring_setup:
	case __NR_io_uring_enter:
	case __NR_io_uring_register:
	case __NR_io_submit:
		ev_ipc(&e, IPC_ASYNC_IO);
		break;
	}
	return 0;
}

static __always_inline u64 task_cgid(struct task_struct *t)
{
	return BPF_CORE_READ(t, cgroups, dfl_cgrp, kn, id);
}

/* A new process or thread. Runs in the parent; the child's cgroup is the one that counts
 * (clone3 with CLONE_INTO_CGROUP). */
SEC("tp_btf/sched_process_fork")
int sandtree_fork(u64 *ctx)
{
	struct task_struct *parent = (struct task_struct *)ctx[0];
	struct task_struct *child = (struct task_struct *)ctx[1];
	u64 cg = task_cgid(child);
	struct config *cfg = bpf_map_lookup_elem(&watched, &cg);
	if (!cfg || cfg->suspended)
		return 0;
	u64 epoch = cfg->epoch;
	u32 ptgid = BPF_CORE_READ(parent, tgid);
	u32 ctgid = BPF_CORE_READ(child, tgid);
	u32 cpid = BPF_CORE_READ(child, pid);
	struct epoch_stats *st = stats_for(cg, epoch);
	if (!st)
		return 0;
	if (cpid == ctgid) {
		struct birth b = { .cgid = cg, .epoch = epoch };
		if (bpf_map_update_elem(&births, &ctgid, &b, BPF_ANY))
			note_overflow(cg);
		__sync_fetch_and_add(&st->created, 1);
		__sync_fetch_and_add(&st->live_born, 1);
		if (is_long_lived(cfg, cg, epoch, ptgid))
			mark_ll(st, ptgid, __NR_clone, LL_FORK, 0);
	} else if (is_long_lived(cfg, cg, epoch, ctgid)) {
		mark_ll(st, ctgid, __NR_clone, LL_THREAD, 0);
	}
	return 0;
}

SEC("tp_btf/sched_process_exec")
int sandtree_exec(u64 *ctx)
{
	u64 cg = bpf_get_current_cgroup_id();
	struct config *cfg = bpf_map_lookup_elem(&watched, &cg);
	if (!cfg || cfg->suspended)
		return 0;
	u64 epoch = cfg->epoch;
	u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!is_long_lived(cfg, cg, epoch, tgid))
		return 0;
	struct epoch_stats *st = stats_for(cg, epoch);
	if (st)
		mark_ll(st, tgid, __NR_execve, LL_EXEC, 0);
	return 0;
}

/* sched_process_exit(struct task_struct *p, bool group_dead): p is the current task. */
SEC("tp_btf/sched_process_exit")
int sandtree_exit(u64 *ctx)
{
	struct task_struct *p = (struct task_struct *)ctx[0];
	int group_dead = (u8)ctx[1];
	u32 tgid = BPF_CORE_READ(p, tgid);
	u64 cg = bpf_get_current_cgroup_id();
	struct config *cfg = bpf_map_lookup_elem(&watched, &cg);
	if (cfg && !cfg->suspended) {
		u64 epoch = cfg->epoch;
		int ll = is_long_lived(cfg, cg, epoch, tgid);
		struct epoch_stats *st = (group_dead || ll) ? stats_for(cg, epoch) : 0;
		if (st && group_dead) {
			__sync_fetch_and_add(&st->exited, 1);
			struct birth *b = bpf_map_lookup_elem(&births, &tgid);
			if (b && b->cgid == cg && b->epoch == epoch)
				__sync_fetch_and_add(&st->live_born, -1);
		}
		if (st && ll)
			mark_ll(st, tgid, __NR_exit_group, group_dead ? LL_EXIT : LL_THREAD, group_dead ? 0 : 1);
	}
	/* Unconditionally, so that processes that left their sandbox leave no entry behind. */
	if (group_dead)
		bpf_map_delete_elem(&births, &tgid);
	return 0;
}

/* A task moved into a cgroup: a process moved into a watched sandbox cgroup is new to it. */
SEC("tp_btf/cgroup_attach_task")
int sandtree_attach(u64 *ctx)
{
	struct cgroup *dst = (struct cgroup *)ctx[0];
	struct task_struct *task = (struct task_struct *)ctx[2];
	if (BPF_CORE_READ(dst, root, hierarchy_id) != 0) /* not the cgroup v2 hierarchy */
		return 0;
	u64 cg = BPF_CORE_READ(dst, kn, id);
	struct config *cfg = bpf_map_lookup_elem(&watched, &cg);
	if (!cfg || cfg->suspended)
		return 0;
	u32 pid = BPF_CORE_READ(task, pid);
	u32 tgid = BPF_CORE_READ(task, tgid);
	if (pid != tgid)
		return 0;
	struct birth *old = bpf_map_lookup_elem(&births, &tgid);
	if (old && old->cgid == cg)
		return 0;
	u64 epoch = cfg->epoch;
	struct birth b = { .cgid = cg, .epoch = epoch };
	if (bpf_map_update_elem(&births, &tgid, &b, BPF_ANY))
		note_overflow(cg);
	struct epoch_stats *st = stats_for(cg, epoch);
	if (st) {
		__sync_fetch_and_add(&st->created, 1);
		__sync_fetch_and_add(&st->live_born, 1);
	}
	return 0;
}

/* signal_generate(int sig, struct kernel_siginfo *info, struct task_struct *task, int type,
 * int result): a signal queued to a long-lived process of a sandbox, by anyone but itself. */
SEC("tp_btf/signal_generate")
int sandtree_signal(u64 *ctx)
{
	int sig = (int)ctx[0];
	struct task_struct *target = (struct task_struct *)ctx[2];
	int result = (int)ctx[4];
	if (result != TRACE_SIGNAL_DELIVERED && result != TRACE_SIGNAL_LOSE_INFO)
		return 0; /* ignored, already pending or not queued: nothing changed */
	u64 cg = task_cgid(target);
	struct config *cfg = bpf_map_lookup_elem(&watched, &cg);
	if (!cfg || cfg->suspended)
		return 0;
	u32 tgid = BPF_CORE_READ(target, tgid);
	if (tgid == (u32)(bpf_get_current_pid_tgid() >> 32))
		return 0;
	u64 epoch = cfg->epoch;
	if (!is_long_lived(cfg, cg, epoch, tgid))
		return 0;
	struct epoch_stats *st = stats_for(cg, epoch);
	if (!st)
		return 0;
	__sync_fetch_and_add(&st->ipc[IPC_SIGNAL], 1);
	mark_ll(st, tgid, (u32)sig, LL_SIGNAL, IPC_SIGNAL);
	return 0;
}

/* "GPL" makes the tracing helpers available; the file is dual-licensed (see SPDX above). */
char LICENSE[] SEC("license") = "GPL";
