/* A vfork child that never execs, with its parent blocked in vfork() until the child exits:
 * the shape of CRIU's zdtm vfork00, written for sandtree's tests.
 *
 * main forks a child; the child vforks; the vfork child waits for SIGTERM and _exit(0)s; its
 * parent, released from vfork() then, waits for it and exits with its status. main waits for
 * SIGUSR1 ("time to finish"), sends SIGTERM to its whole process group (it does not know the
 * vfork child's pid), waits for its child and appends PASS or FAIL to the result file.
 *
 * Lines of the result file (default /tmp/vfork.result): "READY main PID child PID",
 * "VFORKED PID" (written by the vfork child: its parent is now blocked), "USR1", then
 * "PASS" or "FAIL ...". */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *result_path = "/tmp/vfork.result";
static volatile sig_atomic_t got_usr1, got_term;

static void on_usr1(int s) { (void)s; got_usr1 = 1; }
static void on_term(int s) { (void)s; got_term = 1; }

/* Appends one line; only syscalls and a stack buffer, so the vfork child may call it too. */
static void report(const char *fmt, int a, int b) {
    char buf[128];
    int n = snprintf(buf, sizeof buf, fmt, a, b);
    int fd = open(result_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
        (void)!write(fd, buf, n);
        close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc > 1)
        result_path = argv[1];
    unlink(result_path);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    /* Blocked outside sigsuspend, so that no signal slips in before the wait starts. */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGTERM);
    sigprocmask(SIG_BLOCK, &block, &old);

    pid_t child = fork();
    if (child < 0) {
        report("FAIL fork errno %d%.0d\n", errno, 0);
        return 1;
    }
    if (child == 0) {
        pid_t v = vfork();
        if (v < 0)
            _exit(10);
        if (v == 0) {
            report("VFORKED %d%.0d\n", getpid(), 0);
            while (!got_term)
                sigsuspend(&old);
            _exit(0);
        }
        int st = 0;
        if (waitpid(v, &st, 0) != v)
            _exit(11);
        _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 12);
    }
    report("READY main %d child %d\n", getpid(), child);
    while (!got_usr1)
        sigsuspend(&old);
    report("USR1%.0d%.0d\n", 0, 0);
    /* main's own SIGTERM stays blocked (and pending): only the others act on it. */
    if (kill(0, SIGTERM) < 0)
        report("FAIL kill errno %d%.0d\n", errno, 0);
    int st = 0;
    pid_t w = waitpid(child, &st, 0);
    if (w != child)
        report("FAIL waitpid returned %d errno %d\n", (int)w, errno);
    else if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        report("PASS%.0d%.0d\n", 0, 0);
    else if (WIFEXITED(st))
        report("FAIL child exited %d%.0d\n", WEXITSTATUS(st), 0);
    else
        report("FAIL child killed by signal %d%.0d\n", WIFSIGNALED(st) ? WTERMSIG(st) : -1, 0);
    return 0;
}
