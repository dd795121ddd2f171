/* sandtree's sandbox init: pid 1 of every sandbox's pid namespace.
 *
 * It reaps orphans and otherwise sleeps, making no other syscalls, so that it never shows up as
 * activity in the inspector and adds only a few KiB to a CRIU image. It is built freestanding
 * (-nostdlib -static) because it must run in any rootfs, including one without a libc. */
typedef long i64;

static i64 sys(i64 n, i64 a, i64 b, i64 c, i64 d) {
    i64 ret;
    register i64 r10 __asm__("r10") = d;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return ret;
}

#define SYS_rt_sigprocmask 14
#define SYS_wait4 61
#define SYS_rt_sigtimedwait 128
#define SYS_exit 60
#define WNOHANG 1
#define SIGCHLD 17

void _start(void) {
    /* Block every signal; wait for SIGCHLD synchronously. SIGKILL/SIGSTOP cannot be blocked,
     * and pid 1 of a namespace ignores signals without handlers from inside anyway. */
    unsigned long all = ~0UL;
    sys(SYS_rt_sigprocmask, 0 /* SIG_BLOCK */, (i64)&all, 0, 8);
    unsigned long chld = 1UL << (SIGCHLD - 1);
    for (;;) {
        while (sys(SYS_wait4, -1, 0, WNOHANG, 0) > 0) {
        }
        sys(SYS_rt_sigtimedwait, (i64)&chld, 0, 0, 8);
    }
    sys(SYS_exit, 0, 0, 0, 0);
}
