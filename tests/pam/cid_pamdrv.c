/* In-process PAM driver for the pam_callerid tests and benchmark.
 *
 *   cid_pamdrv SERVICE USER MODE [N]
 *
 * MODE  first   : one pam_start + timed pam_acct_mgmt (+ timed 2nd call), prints
 *                 "first_ms=<t> second_ms=<t> rc=<rc>"
 *       cycles  : N x (pam_start, pam_acct_mgmt, pam_end); prints rc of each distinct result,
 *                 "rss_kb_before=<> rss_kb_after=<>"
 *       fork    : acct_mgmt in the parent, then fork(); the child calls acct_mgmt again
 *                 while a parent thread is inside the module; prints "child_rc=<rc>"
 *       threads : N threads x 20 (pam_start, acct_mgmt, pam_end); prints "ok=<n> bad=<n>"
 * Exit status 0 when the driver itself worked (the PAM results are printed).
 */
#include <security/pam_appl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *svc, *usr;
static int verbose;
static int conv(int n, const struct pam_message **m, struct pam_response **r, void *d)
{
    int i;
    (void)d;
    for (i = 0; i < n && verbose; i++)
        fprintf(stderr, "msg[%d]: %s\n", m[i]->msg_style, m[i]->msg);
    *r = calloc(n, sizeof **r);
    return *r ? PAM_SUCCESS : PAM_BUF_ERR;
}
static struct pam_conv pc = { conv, NULL };

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static long rss_kb(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long a = 0, b = 0;
    if (f) { if (fscanf(f, "%ld %ld", &a, &b) != 2) b = 0; fclose(f); }
    return b * (sysconf(_SC_PAGESIZE) / 1024);
}

static int one(void)
{
    pam_handle_t *h = NULL;
    int rc = pam_start(svc, usr, &pc, &h);
    if (rc != PAM_SUCCESS)
        return -1;
    rc = pam_acct_mgmt(h, PAM_SILENT);
    pam_end(h, rc);
    return rc;
}

static void *thr(void *arg)
{
    int i, *bad = arg;
    for (i = 0; i < 20; i++)
        if (one() < 0)
            __atomic_add_fetch(bad, 1, __ATOMIC_RELAXED);
    return NULL;
}

/* keeps calling into the module on ONE handle (no dlopen/dlclose in this thread, so a
   fork() can only catch it inside the module / Python, which is what is tested) */
static void *busy(void *arg)
{
    int i;
    pam_handle_t *h = arg;
    for (i = 0; i < 100; i++)
        pam_acct_mgmt(h, PAM_SILENT);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *mode;
    int n;
    if (argc < 4) {
        fprintf(stderr, "usage: %s SERVICE USER first|cycles|fork|threads [N]\n", argv[0]);
        return 2;
    }
    svc = argv[1]; usr = argv[2]; mode = argv[3];
    n = argc > 4 ? atoi(argv[4]) : 20;
    verbose = !strcmp(mode, "first");
    if (!strcmp(mode, "first")) {
        pam_handle_t *h = NULL;
        double t0, t1, t2;
        int rc, rc2;
        if (pam_start(svc, usr, &pc, &h) != PAM_SUCCESS)
            return 1;
        t0 = now_ms();
        rc = pam_acct_mgmt(h, 0);
        t1 = now_ms();
        rc2 = pam_acct_mgmt(h, 0);
        t2 = now_ms();
        pam_end(h, rc);
        printf("first_ms=%.3f second_ms=%.3f rc=%d rc2=%d\n", t1 - t0, t2 - t1, rc, rc2);
        return 0;
    }
    if (!strcmp(mode, "cycles")) {
        long before, after;
        int i, rc = one(), same = 1;
        before = rss_kb();
        for (i = 0; i < n; i++)
            if (one() != rc)
                same = 0;
        after = rss_kb();
        printf("rc=%d same=%d rss_kb_before=%ld rss_kb_after=%ld\n", rc, same, before, after);
        return 0;
    }
    if (!strcmp(mode, "fork")) {
        int i, st, rc = one(), hung = 0, bad = 0;
        pam_handle_t *bh = NULL;
        if (pam_start(svc, usr, &pc, &bh) != PAM_SUCCESS)
            return 1;
        for (i = 0; i < n; i++) {
            pthread_t t;
            pid_t p;
            pthread_create(&t, NULL, busy, bh);
            usleep(2000);
            p = fork();
            if (p == 0) {
                alarm(20);
                _exit(one() == rc ? 0 : 1);
            }
            pthread_join(t, NULL);
            if (waitpid(p, &st, 0) < 0 || !WIFEXITED(st))
                hung++;
            else if (WEXITSTATUS(st) != 0)
                bad++;
        }
        printf("rc=%d children=%d hung=%d bad=%d\n", rc, n, hung, bad);
        return 0;
    }
    if (!strcmp(mode, "threads")) {
        pthread_t t[64];
        int i, bad = 0;
        if (n > 64) n = 64;
        for (i = 0; i < n; i++)
            pthread_create(&t[i], NULL, thr, &bad);
        for (i = 0; i < n; i++)
            pthread_join(t[i], NULL);
        printf("threads=%d bad=%d\n", n, bad);
        return 0;
    }
    return 2;
}
