/*
 * A minimal PTRACE_SEIZE tracer, the yardstick for vpstag's ptrace backend in vpstag-bench.
 *
 * Runs CMD and every process it creates under ptrace with the options vpstag's ptrace backend
 * sets (fork, vfork, clone, exec and exit events; EXITKILL) and does nothing at each stop but
 * resume the tracee (re-injecting signals). No decoding, no table, no /proc reads, one thread:
 * what the stops alone cost. Exits with CMD's status (128 + signal when it was killed).
 *
 * Built by vpstag-bench at run time: cc -O2 -o seize-tracer seize_tracer.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s CMD [ARG...]\n", argv[0]);
        return 2;
    }
    int gate[2];
    if (pipe(gate) != 0) {
        perror("seize-tracer: pipe");
        return 2;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("seize-tracer: fork");
        return 2;
    }
    if (child == 0) {
        /* Wait until the tracer has seized us (it closes the pipe), then run CMD. */
        char c;
        close(gate[1]);
        while (read(gate[0], &c, 1) < 0 && errno == EINTR)
            ;
        close(gate[0]);
        execvp(argv[1], argv + 1);
        perror(argv[1]);
        _exit(127);
    }
    close(gate[0]);
    long opts = PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC |
                PTRACE_O_TRACEEXIT | PTRACE_O_EXITKILL;
    if (ptrace(PTRACE_SEIZE, child, 0, (void *)opts) != 0) {
        perror("seize-tracer: PTRACE_SEIZE");
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        return 2;
    }
    close(gate[1]);
    int code = -1;
    for (;;) {
        int st;
        pid_t p = waitpid(-1, &st, __WALL);
        if (p < 0) {
            if (errno == EINTR)
                continue;
            if (errno == ECHILD)
                break;
            perror("seize-tracer: waitpid");
            return 2;
        }
        if (WIFEXITED(st) || WIFSIGNALED(st)) {
            if (p == child)
                code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            continue;
        }
        if (!WIFSTOPPED(st))
            continue;
        int sig = WSTOPSIG(st);
        int event = (unsigned)st >> 16;
        /* Event stops (fork, exec, exit, a new tracee's first stop): resume as is. A
         * signal-delivery stop: resume, delivering the signal. (No group stops in the workload.) */
        if (ptrace(PTRACE_CONT, p, 0, (void *)(long)(event ? 0 : sig)) != 0 && errno != ESRCH) {
            perror("seize-tracer: PTRACE_CONT");
            return 2;
        }
    }
    return code < 0 ? 2 : code;
}
