/*
 * pam_callerid.so: the PAM module, a thin client of the node's `callerid daemon`.
 *
 * The decision (policy, job listing, caller-ID query, adoption, audit) is made by the daemon
 * (pam_callerid/service.py).  This client decides only what must never wait on anything:
 *
 *   - a PAM service other than `service=` (default sshd; "*" = any)  -> PAM_IGNORE
 *   - root (the user named "root", or any user with uid 0)           -> PAM_IGNORE
 *
 * both before any I/O.  Then ONE exchange with the daemon over its root-only unix
 * SOCK_SEQPACKET socket (`socket=PATH`, default /run/callerid/pam.sock), bounded by ONE
 * deadline (`daemon_timeout=SECONDS`, default 2.0) that covers connect, send and reply:
 *
 *   request  "callerid-pam 1\n" then key=value lines: phase, service, user, rhost, tty,
 *            conn (the TCP connection found among this process's fds), ssh_connection,
 *            silent, module (this client's version), and every module argument as
 *            arg=... in order;
 *   reply    "callerid-pam 1\n" then rc= (once), error=, info=, env= (repeatable),
 *            setns=mnt with exactly one fd attached (SCM_RIGHTS), setns_fail=,
 *            enter=N with N more fds: cgroup v1 `tasks` files of the job's extern step,
 *            enter_fail=, enter_error=, enter_info= (once each: what to do if entering
 *            them fails);
 *   ack      after a reply with enter=: "callerid-pam 1\nentered=ok\n" (or
 *            "entered=failed: REASON"), once "0" was written into each of those files.
 *
 * Writing "0" moves the calling thread only, which for this single-threaded process is the
 * whole process, and lets the kernel skip its global threadgroup lock and the RCU grace
 * period that comes with it (6-20 ms here; see cgroups/adoption.py).  The daemon sends
 * enter= only for a process it has checked is single-threaded.
 *
 * Every message is UTF-8 text of at most 16384 bytes, one "key=value\n" per line, no NUL; a
 * value never holds a newline (an argument or PAM item that does is not sent, and logged).
 * The daemon's side of the same protocol is pam_callerid/wire.py.
 *
 * The server must be root (SO_PEERCRED).  Any failure (no daemon, a daemon that is not root,
 * a full backlog, no reply in time, a malformed reply) returns `action_generic_failure`
 * (ignore -> PAM_IGNORE, allow -> PAM_SUCCESS, deny -> PAM_PERM_DENIED in account,
 * PAM_SESSION_ERR in session; default ignore, as pam_slurm_adopt) and logs one line.
 *
 * Rules of this file: no threads, no stdio, no recursion, bounded buffers, every fd closed on
 * every path, EINTR retried against the same deadline.  Only pam_sm_* is exported.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pwd.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <security/pam_ext.h>
#include <security/pam_modules.h>

#define CID_EXPORT __attribute__((visibility("default")))

/* pam_callerid/build.py defines both: the version is sent with each request, and kept in
   the file as pamconf.IDENT + version for `callerid check` (and `strings`). */
#if !defined(CALLERID_VERSION) || !defined(CALLERID_IDENT)
#error "build with pam_callerid/build.py: it defines CALLERID_VERSION and CALLERID_IDENT"
#endif
__attribute__((used)) static const char ident[] = CALLERID_IDENT;

#define MAGIC "callerid-pam 1"
#define MAX_MSG 16384                 /* protocol v1: the longest message, both ways */
#define MAX_ENTER 12                  /* enter=N: at most this many tasks files */
#define MAX_FDS (1 + MAX_ENTER)       /* control-data room: the namespace fd + the tasks files */
#define DEFAULT_SOCKET "/run/callerid/pam.sock"
#define DEFAULT_TIMEOUT_MS 2000
#define MIN_TIMEOUT_MS 50
#define MAX_TIMEOUT_MS 60000
#define ADDR_TEXT 64                  /* > INET6_ADDRSTRLEN */

enum phase { ACCOUNT, SESSION };
static const char *const PHASE_NAME[] = { "account", "session" };

/* action_generic_failure */
enum generic { GF_IGNORE, GF_ALLOW, GF_DENY };
static const char *const GENERIC_NAME[] = { "ignore", "allow", "deny" };

/* ---------------------------------------------------------------- module arguments */

struct opts {
    const char *service;          /* service=  (default sshd, "*" = every service) */
    const char *socket;           /* socket=   */
    int timeout_ms;               /* daemon_timeout= */
    enum generic generic;         /* action_generic_failure= */
    const char *bad_socket;       /* a rejected value, logged once the login is ours */
    const char *bad_timeout;
};

/* The matching rule of pam_callerid/options.py (and pam_slurm_adopt): an argument is option X
   when it starts with "X=", compared case-insensitively; values are matched by prefix too. */
static int prefix_ci(const char *s, const char *prefix)
{
    return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

/* "SECONDS" as a plain decimal ("2", "0.5", "1.25") -> milliseconds, or -1.  Not strtod(),
   which follows the host program's locale. */
static long seconds_to_ms(const char *s)
{
    long whole = 0, frac = 0, scale = 100;
    int digits = 0;

    for (; *s >= '0' && *s <= '9'; s++, digits++)
        if (whole < 1000000)
            whole = whole * 10 + (*s - '0');
    if (*s == '.')
        for (s++; *s >= '0' && *s <= '9'; s++, digits++, scale /= 10)
            frac += (*s - '0') * scale;
    if (*s != '\0' || digits == 0)
        return -1;
    return whole * 1000 + frac;
}

static void parse_opts(int argc, const char **argv, struct opts *o)
{
    const char *v;
    long ms;
    int i;

    o->service = "sshd";
    o->socket = DEFAULT_SOCKET;
    o->timeout_ms = DEFAULT_TIMEOUT_MS;
    o->generic = GF_IGNORE;
    o->bad_socket = o->bad_timeout = NULL;
    for (i = 0; i < argc; i++) {           /* the last occurrence wins, as in options.py */
        const char *a = argv[i];
        if (!a)
            continue;
        if (prefix_ci(a, "service=")) {
            v = a + strlen("service=");
            if (*v)                         /* empty: options.py keeps "sshd" */
                o->service = v;
        } else if (prefix_ci(a, "action_generic_failure=")) {
            v = a + strlen("action_generic_failure=");
            /* an unrecognised value selects the most restrictive one (options.py) */
            o->generic = prefix_ci(v, "ignore") ? GF_IGNORE
                       : prefix_ci(v, "allow") ? GF_ALLOW : GF_DENY;
        } else if (prefix_ci(a, "socket=")) {
            v = a + strlen("socket=");
            if (v[0] == '/' && strlen(v) < sizeof(((struct sockaddr_un *)0)->sun_path))
                o->socket = v;
            else
                o->bad_socket = v;
        } else if (prefix_ci(a, "daemon_timeout=")) {
            v = a + strlen("daemon_timeout=");
            ms = seconds_to_ms(v);
            if (ms < 0) {
                o->bad_timeout = v;
                o->timeout_ms = DEFAULT_TIMEOUT_MS;
            } else {
                o->timeout_ms = ms < MIN_TIMEOUT_MS ? MIN_TIMEOUT_MS
                              : ms > MAX_TIMEOUT_MS ? MAX_TIMEOUT_MS : (int)ms;
            }
        }
    }
}

static void log_bad_opts(pam_handle_t *pamh, const struct opts *o)
{
    if (o->bad_socket)
        pam_syslog(pamh, LOG_ERR, "socket=%s is not an absolute path shorter than %zu bytes; "
                   "using %s", o->bad_socket, sizeof(((struct sockaddr_un *)0)->sun_path),
                   o->socket);
    if (o->bad_timeout)
        pam_syslog(pamh, LOG_ERR, "daemon_timeout=%s is not a number of seconds; using %d.%03d",
                   o->bad_timeout, o->timeout_ms / 1000, o->timeout_ms % 1000);
}

/* ---------------------------------------------------------------- text */

/* Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF): what the daemon's
   strict decoder accepts. */
static int utf8_ok(const char *text, size_t n)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0, k, j;
    unsigned long cp, min;

    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        if ((s[i] & 0xE0) == 0xC0) {
            k = 1; cp = s[i] & 0x1F; min = 0x80;
        } else if ((s[i] & 0xF0) == 0xE0) {
            k = 2; cp = s[i] & 0x0F; min = 0x800;
        } else if ((s[i] & 0xF8) == 0xF0) {
            k = 3; cp = s[i] & 0x07; min = 0x10000;
        } else {
            return 0;
        }
        if (n - i - 1 < k)
            return 0;
        for (j = 1; j <= k; j++) {
            if ((s[i + j] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += k + 1;
    }
    return 1;
}

/* A value that may go on a protocol line. */
static int sendable(const char *s)
{
    return strchr(s, '\n') == NULL && utf8_ok(s, strlen(s));
}

static char *put_uint(char *p, unsigned v)
{
    char tmp[12];
    int n = 0;

    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

/* The request under construction: a fixed buffer; what does not fit marks it overflowed. */
struct msg {
    char *p;
    size_t len, cap;
    int overflow;
};

static void put(struct msg *m, const char *s)
{
    size_t n = strlen(s);

    if (m->overflow || n > m->cap - m->len) {
        m->overflow = 1;
        return;
    }
    memcpy(m->p + m->len, s, n);
    m->len += n;
}

static void put_line(struct msg *m, const char *key, const char *value)
{
    put(m, key);
    put(m, "=");
    put(m, value);
    put(m, "\n");
}

/* ---------------------------------------------------------------- the TCP connection */

/* One end of a TCP connection; an IPv4-mapped IPv6 address compares as the IPv4 one. */
struct endpoint {
    int family;
    unsigned char addr[16];
    unsigned port;
};

static int same_endpoint(const struct endpoint *a, const struct endpoint *b)
{
    return a->family == b->family && a->port == b->port &&
           memcmp(a->addr, b->addr, a->family == AF_INET ? 4 : 16) == 0;
}

/* From a socket address; `text` gets the address as inet_ntop prints it (mapped kept). */
static int endpoint_of(const struct sockaddr_storage *ss, struct endpoint *e, char *text)
{
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        e->family = AF_INET;
        memcpy(e->addr, &sin->sin_addr, 4);
        e->port = ntohs(sin->sin_port);
        return inet_ntop(AF_INET, &sin->sin_addr, text, ADDR_TEXT) ? 0 : -1;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            e->family = AF_INET;
            memcpy(e->addr, sin6->sin6_addr.s6_addr + 12, 4);
        } else {
            e->family = AF_INET6;
            memcpy(e->addr, sin6->sin6_addr.s6_addr, 16);
        }
        e->port = ntohs(sin6->sin6_port);
        return inet_ntop(AF_INET6, &sin6->sin6_addr, text, ADDR_TEXT) ? 0 : -1;
    }
    return -1;
}

/* "ADDR" (a "%zone" suffix ignored) and "PORT" tokens of SSH_CONNECTION. */
static int endpoint_parse(const char *addr, size_t alen, const char *port, size_t plen,
                          struct endpoint *e)
{
    char tmp[ADDR_TEXT];
    const char *pct = memchr(addr, '%', alen);
    unsigned long p = 0;
    size_t i;

    if (pct)
        alen = (size_t)(pct - addr);
    if (alen == 0 || alen >= sizeof tmp || plen == 0 || plen > 5)
        return -1;
    for (i = 0; i < plen; i++) {
        if (port[i] < '0' || port[i] > '9')
            return -1;
        p = p * 10 + (unsigned long)(port[i] - '0');
    }
    if (p == 0 || p > 65535)
        return -1;
    e->port = (unsigned)p;
    memcpy(tmp, addr, alen);
    tmp[alen] = '\0';
    if (inet_pton(AF_INET, tmp, e->addr) == 1) {
        e->family = AF_INET;
        return 0;
    }
    if (inet_pton(AF_INET6, tmp, e->addr) != 1)
        return -1;
    e->family = AF_INET6;
    if (IN6_IS_ADDR_V4MAPPED((const struct in6_addr *)e->addr)) {
        memmove(e->addr, e->addr + 12, 4);
        e->family = AF_INET;
    }
    return 0;
}

/* SSH_CONNECTION = "CLIENT_IP CLIENT_PORT SERVER_IP SERVER_PORT" */
static int parse_ssh_connection(const char *s, struct endpoint *client, struct endpoint *server)
{
    const char *tok[4];
    size_t len[4];
    int n = 0;

    while (*s && n < 4) {
        while (*s == ' ')
            s++;
        if (!*s)
            break;
        tok[n] = s;
        while (*s && *s != ' ')
            s++;
        len[n] = (size_t)(s - tok[n]);
        n++;
    }
    while (*s == ' ')
        s++;
    if (n != 4 || *s)
        return -1;
    if (endpoint_parse(tok[0], len[0], tok[1], len[1], client) ||
            endpoint_parse(tok[2], len[2], tok[3], len[3], server))
        return -1;
    return 0;
}

/* The connection as "PEER_IP PEER_PORT LOCAL_IP LOCAL_PORT" (SSH_CONNECTION's order). */
static void format_conn(char *out, const char *peer, unsigned pport, const char *local,
                        unsigned lport)
{
    size_t n = strlen(peer);

    memcpy(out, peer, n);
    out += n;
    *out++ = ' ';
    out = put_uint(out, pport);
    *out++ = ' ';
    n = strlen(local);
    memcpy(out, local, n);
    out += n;
    *out++ = ' ';
    out = put_uint(out, lport);
    *out = '\0';
}

#define CONN_TEXT (2 * ADDR_TEXT + 16)

/* The connected TCP socket among this process's fds: the only one, or with several the one
   SSH_CONNECTION names.  Returns 0 with `out` filled, or -1 (none, or several and none named
   by SSH_CONNECTION). */
static int find_conn(const char *ssh_connection, char *out)
{
    struct endpoint want_client, want_server, peer, local;
    struct sockaddr_storage ps, ls;
    char ptext[ADDR_TEXT], ltext[ADDR_TEXT];
    struct dirent *de;
    struct stat st;
    socklen_t len;
    int want, proto, count = 0, matched = 0;
    DIR *d;

    want = ssh_connection && parse_ssh_connection(ssh_connection, &want_client,
                                                  &want_server) == 0;
    d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    while (!matched && (de = readdir(d)) != NULL) {
        char *end;
        long fd = strtol(de->d_name, &end, 10);
        if (de->d_name[0] < '0' || de->d_name[0] > '9' || *end || fd == dirfd(d))
            continue;
        if (fstat((int)fd, &st) != 0 || !S_ISSOCK(st.st_mode))
            continue;
        len = sizeof proto;
        if (getsockopt((int)fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) != 0 ||
                proto != IPPROTO_TCP)
            continue;
        len = sizeof ps;
        if (getpeername((int)fd, (struct sockaddr *)&ps, &len) != 0)
            continue;                       /* listening or not yet connected */
        len = sizeof ls;
        if (getsockname((int)fd, (struct sockaddr *)&ls, &len) != 0)
            continue;
        if (endpoint_of(&ps, &peer, ptext) || endpoint_of(&ls, &local, ltext))
            continue;
        matched = want && same_endpoint(&peer, &want_client) &&
                  same_endpoint(&local, &want_server);
        if (++count == 1 || matched)
            format_conn(out, ptext, peer.port, ltext, local.port);
    }
    closedir(d);
    return matched || count == 1 ? 0 : -1;
}

/* ---------------------------------------------------------------- the request */

static const char *item(pam_handle_t *pamh, int type)
{
    const void *v = NULL;

    if (pam_get_item(pamh, type, &v) != PAM_SUCCESS)
        return NULL;
    return (const char *)v;
}

/* An item's line; a value that cannot be sent is sent empty, and logged. */
static void put_item(pam_handle_t *pamh, struct msg *m, const char *key, const char *value)
{
    if (value && !sendable(value)) {
        pam_syslog(pamh, LOG_ERR, "the PAM item %s holds a newline or is not UTF-8; sent empty",
                   key);
        value = NULL;
    }
    put_line(m, key, value ? value : "");
}

static void build_request(pam_handle_t *pamh, enum phase ph, int flags, int argc,
                          const char **argv, struct msg *m)
{
    const char *ssh = pam_getenv(pamh, "SSH_CONNECTION");
    char conn[CONN_TEXT];
    int i;

    if (!ssh)
        ssh = getenv("SSH_CONNECTION");
    put(m, MAGIC "\n");
    put_line(m, "phase", PHASE_NAME[ph]);
    put_item(pamh, m, "service", item(pamh, PAM_SERVICE));
    put_item(pamh, m, "user", item(pamh, PAM_USER));
    put_item(pamh, m, "rhost", item(pamh, PAM_RHOST));
    put_item(pamh, m, "tty", item(pamh, PAM_TTY));
    if (find_conn(ssh, conn) == 0)
        put_line(m, "conn", conn);
    if (ssh && sendable(ssh))
        put_line(m, "ssh_connection", ssh);
    else if (ssh)
        pam_syslog(pamh, LOG_ERR, "SSH_CONNECTION holds a newline or is not UTF-8; not sent");
    if (flags & PAM_SILENT)
        put(m, "silent=1\n");
    put(m, "module=" CALLERID_VERSION "\n");
    for (i = 0; i < argc; i++) {
        if (!argv[i])
            continue;
        if (sendable(argv[i]))
            put_line(m, "arg", argv[i]);
        else
            pam_syslog(pamh, LOG_ERR, "module argument %d holds a newline or is not UTF-8; "
                       "not sent", i + 1);
    }
}

/* ---------------------------------------------------------------- the exchange */

static long long now_ns(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Wait until `fd` is ready for `events` or the deadline passes: 1 ready (or hung up: the
   next call tells), 0 deadline, -1 error (errno). */
static int wait_fd(int fd, short events, long long deadline)
{
    struct pollfd p;
    long long left;
    int r;

    for (;;) {
        left = deadline - now_ns();
        if (left <= 0)
            return 0;
        p.fd = fd;
        p.events = events;
        p.revents = 0;
        r = poll(&p, 1, (int)((left + 999999) / 1000000));
        if (r > 0)
            return 1;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

/* What went wrong, for the log line: "WHAT[: DETAIL][: strerror(ERR)]". */
struct failure {
    const char *what;
    const char *detail;           /* or NULL */
    int err;                      /* errno, or 0 */
};

static void fail(struct failure *f, const char *what, const char *detail, int err)
{
    f->what = what;
    f->detail = detail;
    f->err = err;
}

static void close_fds(int *fds, int n)
{
    int i;

    for (i = 0; i < n; i++)
        close(fds[i]);
}

/* A connection to the daemon whose listener is root, or -1. */
static int open_conn(const struct opts *o, struct failure *f)
{
    struct sockaddr_un sa;
    struct ucred cred;
    socklen_t len = sizeof cred;
    int fd, r;

    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, o->socket, strlen(o->socket));     /* length checked by parse_opts */
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        fail(f, "cannot create a socket", NULL, errno);
        return -1;
    }
    /* a non-blocking connect on a unix socket never waits: EAGAIN means the backlog is full */
    while ((r = connect(fd, (struct sockaddr *)&sa, sizeof sa)) != 0 && errno == EINTR)
        ;
    if (r != 0 && errno == EAGAIN) {
        fail(f, "cannot connect: the daemon's backlog is full", NULL, 0);
    } else if (r != 0) {
        fail(f, "cannot connect", NULL, errno);
    } else if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        fail(f, "cannot read the server's credentials", NULL, errno);
    } else if (cred.uid != 0) {
        fail(f, "refused: the server is not root", NULL, 0);
    } else {
        return fd;
    }
    close(fd);
    return -1;
}

/* Send the request as one message before the deadline: 0, or -1. */
static int send_request(int fd, const struct msg *req, long long deadline, struct failure *f)
{
    ssize_t n;
    int r;

    for (;;) {
        n = send(fd, req->p, req->len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n == (ssize_t)req->len)
            return 0;
        if (n >= 0 || (errno != EAGAIN && errno != EINTR)) {
            fail(f, "cannot send the request", NULL, n >= 0 ? EMSGSIZE : errno);
            return -1;
        }
        if ((r = wait_fd(fd, POLLOUT, deadline)) <= 0) {
            fail(f, "the daemon did not take the request in time", NULL,
                 r < 0 ? errno : 0);
            return -1;
        }
    }
}

/* Receive one message before the deadline into `rep` (room for MAX_MSG + 1 bytes: one more
   than allowed shows an oversized reply) and the fds attached to it.  Returns 0, or -1 with
   every received fd closed. */
static int recv_reply(int fd, char *rep, size_t *replen, int *fds, int *nfds,
                      long long deadline, struct failure *f)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
    } ctl;
    struct cmsghdr *c;
    struct msghdr mh;
    struct iovec iov;
    ssize_t n;
    int r, k;

    for (;;) {
        if ((r = wait_fd(fd, POLLIN, deadline)) <= 0) {
            fail(f, "no reply in time", NULL, r < 0 ? errno : 0);
            return -1;
        }
        iov.iov_base = rep;
        iov.iov_len = MAX_MSG + 1;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = ctl.buf;
        mh.msg_controllen = sizeof ctl.buf;
        n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
        if (n >= 0)
            break;
        if (errno != EAGAIN && errno != EINTR) {
            fail(f, "cannot receive the reply", NULL, errno);
            return -1;
        }
    }
    for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        if (k > MAX_FDS - *nfds)            /* cannot happen with this control buffer */
            k = MAX_FDS - *nfds;
        memcpy(fds + *nfds, CMSG_DATA(c), (size_t)k * sizeof(int));
        *nfds += k;
    }
    if (n == 0) {
        fail(f, "the daemon closed the connection without a reply", NULL, 0);
    } else if ((mh.msg_flags & MSG_TRUNC) || n > MAX_MSG) {
        fail(f, "malformed reply", "longer than 16384 bytes", 0);
    } else if (mh.msg_flags & MSG_CTRUNC) {
        fail(f, "malformed reply", "too many fds attached", 0);
    } else {
        *replen = (size_t)n;
        return 0;
    }
    close_fds(fds, *nfds);
    *nfds = 0;
    return -1;
}

/* The whole exchange under one deadline: the connection (still open, for the ack) with the
   reply and its fds, or -1. */
static int exchange(const struct opts *o, const struct msg *req, char *rep, size_t *replen,
                    int *fds, int *nfds, struct failure *f)
{
    long long deadline = now_ns() + o->timeout_ms * 1000000LL;
    int fd;

    *nfds = 0;
    fd = open_conn(o, f);
    if (fd < 0)
        return -1;
    if (send_request(fd, req, deadline, f) == 0 &&
        recv_reply(fd, rep, replen, fds, nfds, deadline, f) == 0)
        return fd;
    close(fd);
    return -1;
}

/* After enter=: tell the daemon whether every cgroup was entered (it then has the stepd
   register the pid).  Never waits: the message is small and the socket's buffer empty. */
static void send_ack(pam_handle_t *pamh, int fd, int err)
{
    struct msg m;
    char buf[256];

    m.p = buf;
    m.len = 0;
    m.cap = sizeof buf;
    m.overflow = 0;
    put(&m, MAGIC "\nentered=");
    put(&m, err ? "failed: " : "ok");
    if (err)
        put(&m, strerror(err));
    put(&m, "\n");
    if (m.overflow || send(fd, m.p, m.len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
        pam_syslog(pamh, LOG_WARNING, "cannot tell the daemon the job's cgroups were entered: "
                   "%s", m.overflow ? "message too long" : strerror(errno));
}

/* ---------------------------------------------------------------- the reply */

static const struct {
    const char *name;
    int code;
} RC[] = {
    { "success", PAM_SUCCESS }, { "ignore", PAM_IGNORE }, { "perm_denied", PAM_PERM_DENIED },
    { "session_err", PAM_SESSION_ERR }, { "system_err", PAM_SYSTEM_ERR },
    { "auth_err", PAM_AUTH_ERR },
};

static int rc_code(const char *name)
{
    size_t i;

    for (i = 0; i < sizeof RC / sizeof RC[0]; i++)
        if (strcmp(name, RC[i].name) == 0)
            return RC[i].code;
    return -1;
}

/* NAME=VALUE with NAME a shell-style variable name */
static int env_ok(const char *s)
{
    const char *p = s;

    if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || *p == '_'))
        return 0;
    for (p++; *p && *p != '='; p++)
        if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || *p == '_' ||
              (*p >= '0' && *p <= '9')))
            return 0;
    return *p == '=';
}

struct reply {
    int rc;                       /* a PAM code */
    int setns;                    /* setns=mnt given */
    int setns_fail;               /* a PAM code, or -1 */
    int enter;                    /* enter=N: N tasks files after the namespace fd */
    int enter_fail;               /* a PAM code, or -1 */
    const char *body;             /* the lines after the header, each NUL-terminated */
    const char *end;
};

static int key_is(const char *line, size_t klen, const char *key)
{
    return strlen(key) == klen && memcmp(line, key, klen) == 0;
}

/* "1".."99" -> the number, else -1 */
static int small_count(const char *s)
{
    if (s[0] < '1' || s[0] > '9')
        return -1;
    if (s[1] == '\0')
        return s[0] - '0';
    if (s[1] < '0' || s[1] > '9' || s[2] != '\0')
        return -1;
    return (s[0] - '0') * 10 + (s[1] - '0');
}

/* Check the whole reply before anything of it is used; its lines get NUL-terminated in
   place.  Returns NULL or what is wrong with it. */
static const char *parse_reply(char *msg, size_t len, int nfds, struct reply *r)
{
    char *line, *nl, *eq, *end = msg + len;
    int have_rc = 0, have_fail = 0, have_enter_fail = 0, have_enter_msg[2] = { 0, 0 };
    size_t klen;

    r->rc = -1;
    r->setns = 0;
    r->setns_fail = -1;
    r->enter = 0;
    r->enter_fail = -1;
    if (len == 0)
        return "empty";
    if (memchr(msg, '\0', len))
        return "a NUL byte";
    if (msg[len - 1] != '\n')
        return "truncated (no final newline)";
    if (!utf8_ok(msg, len))
        return "not UTF-8";
    nl = memchr(msg, '\n', len);
    *nl = '\0';
    if (strcmp(msg, MAGIC) != 0)
        return "not a callerid-pam 1 reply";
    r->body = nl + 1;
    r->end = end;
    for (line = nl + 1; line < end; line = nl + 1) {
        nl = memchr(line, '\n', (size_t)(end - line));
        *nl = '\0';
        eq = strchr(line, '=');
        if (!eq)
            return "a line without '='";
        klen = (size_t)(eq - line);
        if (key_is(line, klen, "rc")) {
            if (have_rc++)
                return "two rc= lines";
            if ((r->rc = rc_code(eq + 1)) < 0)
                return "an unknown rc= value";
        } else if (key_is(line, klen, "setns_fail")) {
            if (have_fail++)
                return "two setns_fail= lines";
            if ((r->setns_fail = rc_code(eq + 1)) < 0)
                return "an unknown setns_fail= value";
        } else if (key_is(line, klen, "enter_fail")) {
            if (have_enter_fail++)
                return "two enter_fail= lines";
            if ((r->enter_fail = rc_code(eq + 1)) < 0)
                return "an unknown enter_fail= value";
        } else if (key_is(line, klen, "enter_error") || key_is(line, klen, "enter_info")) {
            if (have_enter_msg[line[6] == 'i']++)
                return "two enter_error= or enter_info= lines";
        } else if (key_is(line, klen, "enter")) {
            if (r->enter)
                return "two enter= lines";
            if ((r->enter = small_count(eq + 1)) < 1 || r->enter > MAX_ENTER)
                return "an enter= value that is not 1..12";
        } else if (key_is(line, klen, "setns")) {
            if (r->setns++)
                return "two setns= lines";
            if (strcmp(eq + 1, "mnt") != 0)
                return "an unknown setns= value";
        } else if (key_is(line, klen, "env")) {
            if (!env_ok(eq + 1))
                return "an env= line that is not NAME=VALUE";
        } else if (!key_is(line, klen, "error") && !key_is(line, klen, "info")) {
            return "an unknown key";
        }
    }
    if (!have_rc)
        return "no rc= line";
    if (have_fail && !r->setns)
        return "setns_fail= without setns=";
    if ((have_enter_fail || have_enter_msg[0] || have_enter_msg[1]) && !r->enter)
        return "enter_fail=, enter_error= or enter_info= without enter=";
    if (r->setns + r->enter != nfds)
        return "the number of fds attached differs from setns= + enter=";
    return NULL;
}

/* enter=: write "0" into each tasks file (fds[0..n-1]).  Returns 0, or the errno of the
   first write that failed with its index in *which. */
static int enter_cgroups(const int *fds, int n, int *which)
{
    int i;

    for (i = 0; i < n; i++) {
        while (write(fds[i], "0", 1) != 1) {
            if (errno != EINTR) {
                *which = i;
                return errno ? errno : EIO;
            }
        }
    }
    return 0;
}

/* Carry out a checked reply: enter the job's cgroups, join the namespace, set the
   environment, show the messages (in their order).  fds: the namespace fd (if setns) then
   the tasks files.  Returns the PAM code; *enter_err: 0 or the errno of a failed entry. */
static int apply(pam_handle_t *pamh, const struct reply *r, const int *fds, int silent,
                 int *enter_err)
{
    const char *line, *v;
    int rc = r->rc, which = 0, nsfd = r->setns ? fds[0] : -1;

    *enter_err = r->enter ? enter_cgroups(fds + r->setns, r->enter, &which) : 0;
    if (*enter_err) {
        if (r->enter_fail >= 0)
            rc = r->enter_fail;
        pam_syslog(pamh, LOG_ERR, "cannot enter the job's cgroups (tasks file %d of %d): %s; "
                   "returning %s", which + 1, r->enter, strerror(*enter_err),
                   pam_strerror(pamh, rc));
    }
    if (r->setns && setns(nsfd, CLONE_NEWNS) != 0) {
        int e = errno;
        if (r->setns_fail >= 0)
            rc = r->setns_fail;
        pam_syslog(pamh, LOG_ERR, "cannot join the job's mount namespace: %s; returning %s",
                   strerror(e), pam_strerror(pamh, rc));
    }
    for (line = r->body; line < r->end; line += strlen(line) + 1) {
        v = strchr(line, '=') + 1;
        if (strncmp(line, "env=", 4) == 0) {
            if (pam_putenv(pamh, v) != PAM_SUCCESS)
                pam_syslog(pamh, LOG_ERR, "cannot set %s in the PAM environment", v);
        } else if (strncmp(line, "error=", 6) == 0) {
            pam_error(pamh, "%s", v);
        } else if (strncmp(line, "info=", 5) == 0 && !silent) {
            pam_info(pamh, "%s", v);
        } else if (strncmp(line, "enter_error=", 12) == 0 && *enter_err) {
            pam_error(pamh, "%s", v);
        } else if (strncmp(line, "enter_info=", 11) == 0 && *enter_err && !silent) {
            pam_info(pamh, "%s", v);
        }
    }
    return rc;
}

/* ---------------------------------------------------------------- the module */

static int generic_failure(pam_handle_t *pamh, const struct opts *o, enum phase ph,
                           const struct failure *f)
{
    pam_syslog(pamh, LOG_ERR, "daemon at %s (daemon_timeout %d.%03d s): %s%s%s%s%s; "
               "action_generic_failure=%s", o->socket, o->timeout_ms / 1000,
               o->timeout_ms % 1000, f->what, f->detail ? ": " : "", f->detail ? f->detail : "",
               f->err ? ": " : "", f->err ? strerror(f->err) : "", GENERIC_NAME[o->generic]);
    switch (o->generic) {
    case GF_IGNORE:
        return PAM_IGNORE;
    case GF_ALLOW:
        return PAM_SUCCESS;
    default:
        return ph == ACCOUNT ? PAM_PERM_DENIED : PAM_SESSION_ERR;
    }
}

/* Root never waits on anything: the name "root" needs no lookup; another name is root when
   its uid is 0 (pam_callerid/options.py forces ignore_root=1, as policy.pre_decide relies on).
   getpwnam_r, not pam_modutil_getpwnam: that one loops forever when called outside libpam's
   dispatch (its pam_set_data fails there). */
static int is_root(const char *user)
{
    struct passwd pw, *res = NULL;
    size_t size = 16384;
    int r, root;
    char *buf;

    if (!user || !*user)
        return 0;
    if (strcmp(user, "root") == 0)
        return 1;
    for (;;) {
        buf = malloc(size);
        if (!buf)
            return 0;
        r = getpwnam_r(user, &pw, buf, size, &res);
        root = r == 0 && res != NULL && pw.pw_uid == 0;
        free(buf);
        if (r != ERANGE || size >= (1u << 20))
            return root;
        size *= 4;
    }
}

static int run(pam_handle_t *pamh, enum phase ph, int flags, int argc, const char **argv)
{
    const char *service = item(pamh, PAM_SERVICE), *why;
    struct failure f = { NULL, NULL, 0 };
    struct reply r;
    struct msg req;
    struct opts o;
    size_t replen = 0;
    int fds[MAX_FDS], nfds = 0, rc, conn = -1, enter_err;
    char *mem;

    parse_opts(argc, argv, &o);
    if (strcmp(o.service, "*") != 0 && (!service || strcmp(service, o.service) != 0))
        return PAM_IGNORE;
    if (is_root(item(pamh, PAM_USER)))
        return PAM_IGNORE;
    log_bad_opts(pamh, &o);

    mem = malloc(2 * MAX_MSG + 1);          /* the request, then the reply (+1: oversize) */
    if (!mem) {
        fail(&f, "out of memory", NULL, ENOMEM);
        return generic_failure(pamh, &o, ph, &f);
    }
    req.p = mem;
    req.len = 0;
    req.cap = MAX_MSG;
    req.overflow = 0;
    build_request(pamh, ph, flags, argc, argv, &req);
    if (req.overflow) {
        fail(&f, "the request would be longer than 16384 bytes", NULL, 0);
        rc = generic_failure(pamh, &o, ph, &f);
    } else if ((conn = exchange(&o, &req, mem + MAX_MSG, &replen, fds, &nfds, &f)) < 0) {
        rc = generic_failure(pamh, &o, ph, &f);
    } else if ((why = parse_reply(mem + MAX_MSG, replen, nfds, &r)) != NULL) {
        fail(&f, "malformed reply", why, 0);
        close_fds(fds, nfds);
        nfds = 0;
        rc = generic_failure(pamh, &o, ph, &f);
    } else {
        rc = apply(pamh, &r, fds, flags & PAM_SILENT, &enter_err);
        close_fds(fds, nfds);
        if (r.enter)
            send_ack(pamh, conn, enter_err);
    }
    if (conn >= 0)
        close(conn);
    free(mem);
    return rc;
}

CID_EXPORT int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    return run(pamh, ACCOUNT, flags, argc, argv);
}

CID_EXPORT int pam_sm_open_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    return run(pamh, SESSION, flags, argc, argv);
}

CID_EXPORT int pam_sm_close_session(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;                      /* nothing to undo */
}

CID_EXPORT int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}

CID_EXPORT int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}
