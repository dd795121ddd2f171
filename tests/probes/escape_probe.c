/*
 * escape_probe: tries, from inside a sandtree sandbox, what a sandboxed agent must not be able
 * to do (new namespaces, the mount API, kernel-wide syscalls, other syscall ABIs, host kernel
 * settings, device nodes, capabilities, network) and prints one line per probe:
 *
 *     PROBE <name> ok
 *     PROBE <name> FAIL <detail>
 *
 * It exits 0 if every probe is ok, 1 otherwise. Built static by
 * tests/tests/escape_probes_are_refused.rs and run only inside sandboxes.
 *
 * Before anything else it checks that it runs inside a sandtree sandbox (/.sandtree/init exists,
 * pid 1 is sandtree's init, the hostname is `sandbox`); if not, it prints
 * `refusing: not inside a sandtree sandbox` and exits 2 without trying anything. Every probe is
 * chosen so that it would fail harmlessly or undo itself even if the sandbox let it through
 * (invalid magic numbers and flags, nonexistent paths, nothing written to /proc).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures;

static void ok(const char *name) { printf("PROBE %s ok\n", name); }

/* "EPERM" for EPERM. */
static const char *ename(int e) {
    const char *n = strerrorname_np(e);
    return n ? n : "an unknown errno";
}

static void fail(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(const char *name, const char *fmt, ...) {
    va_list ap;
    failures++;
    printf("PROBE %s FAIL ", name);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

/* ---- the sandbox check ---- */

static int read_small(const char *path, char *buf, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0) return -1;
    buf[n] = 0;
    return (int)n;
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int inside_sandbox(void) {
    char buf[256];
    if (access("/.sandtree/init", F_OK) != 0) return 0;
    if (read_small("/proc/1/comm", buf, sizeof buf) < 0 || strcmp(buf, "init\n") != 0) return 0;
    if (gethostname(buf, sizeof buf) != 0) return 0;
    buf[sizeof buf - 1] = 0;
    if (strcmp(buf, "sandbox") != 0) return 0;
    ssize_t n = readlink("/proc/1/exe", buf, sizeof buf - 1);
    if (n <= 0) return 0;
    buf[n] = 0;
    if (!ends_with(buf, "/.sandtree/init")) return 0;
    return 1;
}

/* ---- helpers ---- */

/* A syscall that must fail with `want` (0: any errno). */
static void expect_errno(const char *name, long ret, int err, int want) {
    if (ret >= 0)
        fail(name, "succeeded (returned %ld)", ret);
    else if (want && err != want)
        fail(name, "failed with %s, expected %s", ename(err), ename(want));
    else
        ok(name);
}

/* A syscall that may return a new fd: close it if it does. */
static void expect_errno_fd(const char *name, long ret, int err, int want) {
    expect_errno(name, ret, err, want);
    if (ret >= 0 && ret < 1 << 20) close((int)ret);
}

/* A clone-like syscall result: a child (0) exits at once, a parent reaps it. */
static void expect_clone_refused(const char *name, long ret, int err, int want) {
    if (ret == 0) _exit(0);
    if (ret > 0) waitpid((pid_t)ret, NULL, __WALL);
    expect_errno(name, ret, err, want);
}

/* ---- namespaces and clone ---- */

static void probe_namespaces(void) {
    long r;
    r = unshare(CLONE_NEWUSER);
    expect_errno("unshare-newuser", r, errno, EPERM);
    r = unshare(CLONE_NEWNET);
    expect_errno("unshare-newnet", r, errno, EPERM);

    int fd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fail("setns-net", "open /proc/self/ns/net: %s", strerror(errno));
    } else {
        r = setns(fd, 0);
        expect_errno("setns-net", r, errno, EPERM);
        close(fd);
    }

    static const struct {
        const char *name;
        unsigned long flags;
    } clones[] = {
        {"clone-newuser-newnet", CLONE_NEWUSER | CLONE_NEWNET},
        {"clone-newuser", CLONE_NEWUSER},
        {"clone-newns", CLONE_NEWNS},
        {"clone-newpid", CLONE_NEWPID},
    };
    for (size_t i = 0; i < sizeof clones / sizeof clones[0]; i++) {
        fflush(stdout);
        r = syscall(SYS_clone, clones[i].flags | SIGCHLD, 0, 0, 0, 0);
        expect_clone_refused(clones[i].name, r, errno, EPERM);
    }

    /* struct clone_args (CLONE_ARGS_SIZE_VER2 = 88 bytes). */
    struct {
        uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
            set_tid, set_tid_size, cgroup;
    } args;
    static const struct {
        const char *name;
        uint64_t flags;
    } clone3s[] = {
        {"clone3-newuser", CLONE_NEWUSER},
        {"clone3-plain", 0},
    };
    for (size_t i = 0; i < sizeof clone3s / sizeof clone3s[0]; i++) {
        memset(&args, 0, sizeof args);
        args.flags = clone3s[i].flags;
        args.exit_signal = SIGCHLD;
        fflush(stdout);
        r = syscall(SYS_clone3, &args, sizeof args);
        expect_clone_refused(clone3s[i].name, r, errno, ENOSYS);
    }

    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    if (pid < 0) {
        fail("fork", "fork: %s", strerror(errno));
    } else {
        int st;
        if (waitpid(pid, &st, 0) != pid)
            fail("fork", "waitpid: %s", strerror(errno));
        else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
            fail("fork", "child status 0x%x", st);
        else
            ok("fork");
    }
}

/* ---- mounts ---- */

static void probe_mounts(void) {
    long r;
    r = mount("none", "/mnt", "tmpfs", 0, NULL);
    if (r == 0) umount2("/mnt", MNT_DETACH);
    expect_errno("mount-tmpfs", r, errno, EPERM);
    r = umount2("/proc", MNT_DETACH);
    expect_errno("umount-proc", r, errno, EPERM);
    r = syscall(SYS_pivot_root, "/tmp", "/tmp");
    expect_errno("pivot_root", r, errno, EPERM);
    r = syscall(428 /* open_tree */, AT_FDCWD, "/", 0);
    expect_errno_fd("open_tree", r, errno, EPERM);
    r = syscall(430 /* fsopen */, "tmpfs", 0);
    expect_errno_fd("fsopen", r, errno, EPERM);
    r = syscall(429 /* move_mount */, -1, "", -1, "", 0);
    expect_errno("move_mount", r, errno, EPERM);
    r = syscall(442 /* mount_setattr */, -1, "", 0, NULL, 0);
    expect_errno("mount_setattr", r, errno, EPERM);
    /* Newer than some kernels: ENOSYS or EPERM, anything but success. */
    r = syscall(467 /* open_tree_attr */, AT_FDCWD, "/", 0, NULL, 0);
    expect_errno_fd("open_tree_attr", r, errno, 0);
}

/* ---- kernel-wide syscalls ---- */

static void probe_kernel(void) {
    long r;
    char params[120];
    memset(params, 0, sizeof params);
    r = syscall(425 /* io_uring_setup */, 1, params);
    expect_errno_fd("io_uring_setup", r, errno, EPERM);
    r = syscall(323 /* userfaultfd */, O_CLOEXEC);
    expect_errno_fd("userfaultfd", r, errno, EPERM);
    r = syscall(250 /* keyctl */, 0 /* KEYCTL_GET_KEYRING_ID */, -3 /* session */, 0);
    expect_errno("keyctl", r, errno, EPERM);
    r = syscall(SYS_add_key, "user", "sandtree-probe", "x", 1, -2 /* process keyring */);
    expect_errno("add_key", r, errno, EPERM);
    char attr[256];
    memset(attr, 0, sizeof attr);
    r = syscall(321 /* bpf */, 0 /* BPF_MAP_CREATE */, attr, 72);
    expect_errno_fd("bpf", r, errno, EPERM);
    r = syscall(298 /* perf_event_open */, attr, 0, -1, -1, 0);
    expect_errno_fd("perf_event_open", r, errno, EPERM);
    /* Too many segments and a foreign architecture: EINVAL even where permitted. */
    r = syscall(SYS_kexec_load, 0, 1000, NULL, 40UL << 16);
    expect_errno("kexec_load", r, errno, EPERM);
    /* An empty module: ENOEXEC even where permitted. */
    r = syscall(SYS_init_module, NULL, 0, "");
    expect_errno("init_module", r, errno, EPERM);
    /* Wrong magic: EINVAL even where permitted. */
    r = syscall(SYS_reboot, 0, 0, 0x4321fedc /* RESTART */, NULL);
    expect_errno("reboot", r, errno, EPERM);
    r = syscall(SYS_swapon, "/nonexistent-sandtree-probe", 0);
    expect_errno("swapon", r, errno, EPERM);
    r = syscall(SYS_acct, "/nonexistent-sandtree-probe");
    expect_errno("acct", r, errno, EPERM);
    /* Neither time nor zone: changes nothing even where permitted. */
    r = syscall(SYS_settimeofday, NULL, NULL);
    expect_errno("settimeofday", r, errno, EPERM);
}

/* ---- other syscall ABIs ---- */

static void probe_abis(void) {
    long r = syscall(0x40000000L | 39 /* x32 getpid */);
    expect_errno("x32-getpid", r, errno, EPERM);

    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        long ret;
        __asm__ volatile("int $0x80"
                         : "=a"(ret)
                         : "a"(20L /* i386 getpid */)
                         : "memory", "r8", "r9", "r10", "r11");
        /* Only reached if the kernel did not kill us: 0 for an error, 3 for a pid. */
        _exit((int)ret < 0 ? 0 : 3);
    }
    if (pid < 0) {
        fail("int80-getpid", "fork: %s", strerror(errno));
        return;
    }
    int st;
    if (waitpid(pid, &st, 0) != pid)
        fail("int80-getpid", "waitpid: %s", strerror(errno));
    else if (WIFSIGNALED(st) || (WIFEXITED(st) && WEXITSTATUS(st) == 0))
        ok("int80-getpid");
    else
        fail("int80-getpid", "the 32-bit syscall returned a pid (child status 0x%x)", st);
}

/* ---- host kernel settings and masked /proc files ---- */

static void probe_proc(void) {
    /* optional: the kernel may lack the file (sysrq-trigger without CONFIG_MAGIC_SYSRQ); the
     * sandbox's /proc is the kernel's procfs, so ENOENT there means there is nothing to write. */
    static const struct {
        const char *path;
        int optional;
    } writable[] = {
        {"/proc/sys/kernel/core_pattern", 0}, {"/proc/sys/kernel/panic", 0},
        {"/proc/sys/vm/drop_caches", 0},      {"/proc/sys/fs/file-max", 0},
        {"/proc/sysrq-trigger", 1},
    };
    for (size_t i = 0; i < sizeof writable / sizeof writable[0]; i++) {
        char name[128];
        snprintf(name, sizeof name, "write%s", writable[i].path);
        /* Only opened, never written: an open that succeeds is closed and reported. */
        int fd = open(writable[i].path, O_WRONLY | O_CLOEXEC | O_NOCTTY);
        if (fd >= 0) {
            close(fd);
            fail(name, "opened for writing (nothing was written)");
        } else if (errno == ENOENT && writable[i].optional) {
            ok(name);
        } else if (errno != EROFS && errno != EACCES) {
            fail(name, "open failed with %s, expected EROFS or EACCES", ename(errno));
        } else {
            ok(name);
        }
    }

    static const char *masked[] = {"/proc/kcore", "/proc/keys", "/proc/timer_list",
                                   "/proc/sched_debug"};
    for (size_t i = 0; i < sizeof masked / sizeof masked[0]; i++) {
        char name[128], buf[4096];
        snprintf(name, sizeof name, "masked%s", masked[i]);
        int fd = open(masked[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            if (errno == ENOENT)
                ok(name);
            else
                fail(name, "open failed with %s: neither absent nor masked",
                     ename(errno));
            continue;
        }
        ssize_t n = read(fd, buf, sizeof buf);
        int e = errno;
        close(fd);
        if (n == 0)
            ok(name);
        else if (n > 0)
            fail(name, "read %zd bytes", n);
        else
            fail(name, "read failed with %s: neither absent nor masked", ename(e));
    }
}

/* ---- devices ---- */

static void probe_devices(void) {
    static const struct {
        const char *name, *path;
        mode_t type;
        unsigned maj, min;
    } nodes[] = {
        {"mknod-block-loop0", "/tmp/sandtree-probe-blk", S_IFBLK, 7, 0},
        {"mknod-char-mem", "/tmp/sandtree-probe-mem", S_IFCHR, 1, 1},
    };
    for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
        long r = mknod(nodes[i].path, nodes[i].type | 0600, makedev(nodes[i].maj, nodes[i].min));
        int e = errno;
        if (r == 0) unlink(nodes[i].path);
        expect_errno(nodes[i].name, r, e, EPERM);
    }

    /* /dev holds exactly what the runtime puts there. */
    static const struct {
        const char *name;
        mode_t type;
        unsigned maj, min;
    } allowed[] = {
        {"null", S_IFCHR, 1, 3},   {"zero", S_IFCHR, 1, 5},   {"full", S_IFCHR, 1, 7},
        {"random", S_IFCHR, 1, 8}, {"urandom", S_IFCHR, 1, 9}, {"tty", S_IFCHR, 5, 0},
        {"fd", S_IFLNK, 0, 0},     {"stdin", S_IFLNK, 0, 0},   {"stdout", S_IFLNK, 0, 0},
        {"stderr", S_IFLNK, 0, 0}, {"shm", S_IFDIR, 0, 0},
    };
    DIR *d = opendir("/dev");
    if (!d) {
        fail("dev-contents", "opendir /dev: %s", strerror(errno));
        return;
    }
    int bad = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        struct stat st;
        if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            fail("dev-contents", "stat /dev/%s: %s", de->d_name, strerror(errno));
            bad = 1;
            continue;
        }
        size_t i;
        for (i = 0; i < sizeof allowed / sizeof allowed[0]; i++)
            if (!strcmp(allowed[i].name, de->d_name)) break;
        if (i == sizeof allowed / sizeof allowed[0]) {
            fail("dev-contents", "unexpected /dev/%s (mode 0%o, rdev %u:%u)", de->d_name,
                 (unsigned)st.st_mode, major(st.st_rdev), minor(st.st_rdev));
            bad = 1;
        } else if ((st.st_mode & S_IFMT) != allowed[i].type ||
                   (allowed[i].type == S_IFCHR &&
                    (major(st.st_rdev) != allowed[i].maj || minor(st.st_rdev) != allowed[i].min))) {
            fail("dev-contents", "/dev/%s has mode 0%o, rdev %u:%u", de->d_name,
                 (unsigned)st.st_mode, major(st.st_rdev), minor(st.st_rdev));
            bad = 1;
        }
    }
    closedir(d);
    if (!bad) ok("dev-contents");
}

/* ---- capabilities, no_new_privs, seccomp ---- */

static void probe_privileges(void) {
    char status[8192];
    if (read_small("/proc/self/status", status, sizeof status) < 0) {
        fail("capabilities", "read /proc/self/status: %s", strerror(errno));
        return;
    }
    static const struct {
        int bit;
        const char *name;
    } forbidden[] = {
        {21, "CAP_SYS_ADMIN"}, {12, "CAP_NET_ADMIN"}, {19, "CAP_SYS_PTRACE"},
        {16, "CAP_SYS_MODULE"}, {27, "CAP_MKNOD"},    {17, "CAP_SYS_RAWIO"},
    };
    static const char *sets[] = {"CapEff", "CapPrm", "CapBnd", "CapAmb"};
    for (size_t s = 0; s < sizeof sets / sizeof sets[0]; s++) {
        char name[64], key[64];
        snprintf(name, sizeof name, "caps-%s", sets[s]);
        snprintf(key, sizeof key, "\n%s:", sets[s]);
        char *p = strstr(status, key);
        if (!p) {
            fail(name, "no %s line in /proc/self/status", sets[s]);
            continue;
        }
        unsigned long long mask = strtoull(p + strlen(key), NULL, 16);
        int bad = 0;
        for (size_t i = 0; i < sizeof forbidden / sizeof forbidden[0]; i++) {
            if (mask & (1ULL << forbidden[i].bit)) {
                fail(name, "%s is set (%s %016llx)", forbidden[i].name, sets[s], mask);
                bad = 1;
            }
        }
        if (!bad) ok(name);
    }

    int nnp = prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
    if (nnp == 1)
        ok("no_new_privs");
    else
        fail("no_new_privs", "PR_GET_NO_NEW_PRIVS returned %d", nnp);

    char *p = strstr(status, "\nSeccomp:");
    if (!p)
        fail("seccomp-mode", "no Seccomp line in /proc/self/status");
    else if (strtol(p + strlen("\nSeccomp:"), NULL, 10) != 2)
        fail("seccomp-mode", "Seccomp:%ld, expected 2 (filter)",
             strtol(p + strlen("\nSeccomp:"), NULL, 10));
    else
        ok("seccomp-mode");
}

/* ---- the root mount and the network ---- */

static int has_option(const char *opts, const char *opt) {
    size_t n = strlen(opt);
    for (const char *p = opts; p && *p;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (len == n && !strncmp(p, opt, n)) return 1;
        p = comma ? comma + 1 : NULL;
    }
    return 0;
}

static void probe_root_mount(void) {
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f) {
        fail("root-nosuid-nodev", "open mountinfo: %s", strerror(errno));
        return;
    }
    char line[4096];
    int roots = 0, bad = 0;
    while (fgets(line, sizeof line, f)) {
        /* id parent major:minor root mountpoint options ... */
        char mountpoint[1024], options[1024];
        if (sscanf(line, "%*s %*s %*s %*s %1023s %1023s", mountpoint, options) != 2) continue;
        if (strcmp(mountpoint, "/") != 0) continue;
        roots++;
        if (!has_option(options, "nosuid") || !has_option(options, "nodev")) {
            line[strcspn(line, "\n")] = 0;
            fail("root-nosuid-nodev", "/ mounted without nosuid,nodev: %s", line);
            bad = 1;
        }
    }
    fclose(f);
    if (!roots)
        fail("root-nosuid-nodev", "no / mount in /proc/self/mountinfo");
    else if (!bad)
        ok("root-nosuid-nodev");
}

static void probe_network(void) {
    FILE *f = fopen("/proc/net/dev", "re");
    if (!f) {
        fail("only-loopback", "open /proc/net/dev: %s", strerror(errno));
        return;
    }
    char line[1024];
    int n = 0, bad = 0, lo = 0;
    while (fgets(line, sizeof line, f)) {
        if (n++ < 2) continue; /* two header lines */
        char *colon = strchr(line, ':');
        if (!colon) continue;
        *colon = 0;
        char *name = line + strspn(line, " ");
        if (!strcmp(name, "lo")) {
            lo = 1;
        } else {
            fail("only-loopback", "interface %s", name);
            bad = 1;
        }
    }
    fclose(f);
    if (!bad && !lo) fail("only-loopback", "no lo in /proc/net/dev");
    if (!bad && lo) ok("only-loopback");
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!inside_sandbox()) {
        printf("refusing: not inside a sandtree sandbox\n");
        return 2;
    }
    probe_namespaces();
    probe_mounts();
    probe_kernel();
    probe_abis();
    probe_proc();
    probe_devices();
    probe_privileges();
    probe_root_mount();
    probe_network();
    fflush(stdout);
    return failures ? 1 : 0;
}
