"""Build (and install) pam_callerid.so: a PAM module whose logic is Python.

    /opt/slurm-callerid/bin/python -m pam_callerid.build --venv /opt/slurm-callerid --out DIR
    /opt/slurm-callerid/bin/python -m pam_callerid.build --venv /opt/slurm-callerid \
        [--out DIR] --install [--install-dir /lib/x86_64-linux-gnu/security]

Mechanism: cffi *embedding* mode plus a small C shim (see the design notes). The C side exports
only ``pam_sm_*`` (a linker version script hides everything else) and:

* answers ``pam_sm_authenticate`` / ``pam_sm_setcred`` with PAM_IGNORE without touching Python;
* promotes libpython to RTLD_GLOBAL (libpam dlopen()s modules RTLD_LOCAL, and CPython's
  extension modules need libpython's symbols globally);
* initialises an *isolated* interpreter itself: no PYTHON* environment variables, no user
  site, no ``site`` import, no signal handlers, the module search path fixed at build time
  (Debian's stdlib, the venv's site-packages, the project's package location);
* calls ONE ``extern "Python"`` dispatcher whose result carries a marker bit; a result
  without it (Python could not start, the init code failed, an exception escaped) becomes
  PAM_SYSTEM_ERR (or PAM_IGNORE with ``onerror=ignore``) -- never PAM_SUCCESS by accident.
  Even then, services other than ``service=`` (default sshd) and root get PAM_IGNORE, as
  with pam_slurm_adopt, so a broken installation never locks root out;
* is linked ``-z nodelete`` (libpam dlclose()s modules at pam_end; the interpreter stays);
* takes the GIL around fork() (pthread_atfork) so a child never inherits a held GIL.

The interpreter must be the one the venv was built from (Debian's /usr/bin/python3).
"""
import argparse
import compileall
import os
import shutil
import sys
import sysconfig
import tempfile

MODNAME = "_pam_callerid_cffi"
OK_BIT = 0x10000
DEFAULT_INSTALL_DIR = "/lib/x86_64-linux-gnu/security"

CDEF = r"""
typedef struct pam_handle pam_handle_t;
int pam_get_item(const pam_handle_t *pamh, int item_type, const void **item);
int pam_putenv(pam_handle_t *pamh, const char *name_value);
const char *pam_getenv(pam_handle_t *pamh, const char *name);
int pam_prompt(pam_handle_t *pamh, int style, char **response, const char *fmt, ...);

#define PAM_SUCCESS ...
#define PAM_SYSTEM_ERR ...
#define PAM_PERM_DENIED ...
#define PAM_IGNORE ...
#define PAM_SESSION_ERR ...
#define PAM_USER_UNKNOWN ...
#define PAM_SERVICE ...
#define PAM_USER ...
#define PAM_RHOST ...
#define PAM_TTY ...
#define PAM_SILENT ...
#define PAM_TEXT_INFO ...
#define PAM_ERROR_MSG ...

void free(void *ptr);
int cid_set_data(pam_handle_t *pamh, const char *name, const char *value);
const char *cid_get_data(pam_handle_t *pamh, const char *name);
void cid_syslog(int prio, const char *msg);
double cid_init_ms(void);

extern "Python" int _cid_dispatch(int phase, pam_handle_t *pamh, int flags, int argc,
                                  const char **argv);
"""

C_SOURCE = r"""
#include <security/pam_modules.h>
#include <security/pam_ext.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#define CID_OK_BIT 0x%(okbit)x
#define CID_LIBPYTHON "%(libpython)s"
#define CID_HOME L"%(home)s"
#define CID_PROGRAM L"%(program)s"
static const wchar_t *cid_paths[] = { %(paths)s NULL };

static int _cid_dispatch(int phase, pam_handle_t *pamh, int flags, int argc, const char **argv);

/* ---- syslog without glibc's syslog(): no global openlog() state of the host is changed and
   no lock is shared with it.  Facility authpriv, ident pam_callerid; /dev/log may be absent. */
void cid_syslog(int prio, const char *msg)
{
    struct sockaddr_un sa;
    char buf[2048], ts[32];
    time_t now = time(NULL);
    struct tm tm;
    int fd, n;

    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    strcpy(sa.sun_path, "/dev/log");
    localtime_r(&now, &tm);
    strftime(ts, sizeof ts, "%%b %%e %%H:%%M:%%S", &tm);
    n = snprintf(buf, sizeof buf, "<%%d>%%s pam_callerid[%%d]: %%s", LOG_AUTHPRIV | (prio & 7),
                 ts, (int)getpid(), msg ? msg : "");
    if (n < 0)
        return;
    if (n >= (int)sizeof buf)
        n = sizeof buf - 1;
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    if (sendto(fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&sa, sizeof sa) < 0
            && errno == EPROTOTYPE) {
        close(fd);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            (void)!send(fd, buf, n + 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    if (fd >= 0)
        close(fd);
}

/* ---- per-handle state: a malloc()ed copy, freed by libpam at pam_end */
static void cid_free_data(pam_handle_t *pamh, void *data, int status)
{
    (void)pamh; (void)status;
    free(data);
}

int cid_set_data(pam_handle_t *pamh, const char *name, const char *value)
{
    char *copy = strdup(value);
    int r;
    if (!copy)
        return PAM_BUF_ERR;
    r = pam_set_data(pamh, name, copy, cid_free_data);
    if (r != PAM_SUCCESS)
        free(copy);
    return r;
}

const char *cid_get_data(pam_handle_t *pamh, const char *name)
{
    const void *p = NULL;
    if (pam_get_data(pamh, name, &p) != PAM_SUCCESS)
        return NULL;
    return (const char *)p;
}

/* ---- interpreter start-up */
static pthread_mutex_t cid_lock = PTHREAD_MUTEX_INITIALIZER;
static int cid_state = 0;             /* 0 not tried, 1 ready, -1 failed (stays failed) */
static double cid_init_ms_v = -1.0;
static PyGILState_STATE cid_fork_gil;
static int cid_fork_held = 0;

double cid_init_ms(void) { return cid_init_ms_v; }

static void cid_fork_prepare(void)
{
    if (__atomic_load_n(&cid_state, __ATOMIC_ACQUIRE) == 1 && Py_IsInitialized()) {
        cid_fork_gil = PyGILState_Ensure();
        PyOS_BeforeFork();
        cid_fork_held = 1;
    }
}

static void cid_fork_parent(void)
{
    if (cid_fork_held) {
        cid_fork_held = 0;
        PyOS_AfterFork_Parent();
        PyGILState_Release(cid_fork_gil);
    }
}

static void cid_fork_child(void)
{
    if (cid_fork_held) {
        cid_fork_held = 0;
        PyOS_AfterFork_Child();
        PyGILState_Release(cid_fork_gil);
    }
}

static void cid_log_status(const char *what, PyStatus s)
{
    char m[512];
    snprintf(m, sizeof m, "python start-up failed (%%s): %%s: %%s", what,
             s.func ? s.func : "?", s.err_msg ? s.err_msg : "?");
    cid_syslog(LOG_ERR, m);
}

static int cid_start(void)
{
    struct timespec t0, t1;
    int st = __atomic_load_n(&cid_state, __ATOMIC_ACQUIRE);
    if (st != 0)
        return st;
    pthread_mutex_lock(&cid_lock);
    if (cid_state != 0)
        goto out;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (!dlopen(CID_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD)) {
        char m[512];
        snprintf(m, sizeof m, "cannot make %%s global: %%s", CID_LIBPYTHON, dlerror());
        cid_syslog(LOG_WARNING, m);
    }
    if (!Py_IsInitialized()) {
        PyConfig c;
        PyStatus s;
        const wchar_t **p;
        PyConfig_InitIsolatedConfig(&c);      /* ignores PYTHON* env, no user site, safe_path */
        c.install_signal_handlers = 0;        /* the host's signal dispositions stay */
        c.site_import = 0;                    /* the search path below is complete */
        c.write_bytecode = 0;
        c.parse_argv = 0;
        c.pathconfig_warnings = 0;
        c.user_site_directory = 0;
        c.use_environment = 0;
        s = PyConfig_SetString(&c, &c.home, CID_HOME);
        if (!PyStatus_Exception(s))
            s = PyConfig_SetString(&c, &c.program_name, CID_PROGRAM);
        c.module_search_paths_set = 1;
        for (p = cid_paths; *p && !PyStatus_Exception(s); p++)
            s = PyWideStringList_Append(&c.module_search_paths, *p);
        if (!PyStatus_Exception(s))
            s = Py_InitializeFromConfig(&c);
        PyConfig_Clear(&c);
        if (PyStatus_Exception(s)) {
            cid_log_status("init", s);
            cid_state = -1;
            goto out;
        }
        PyEval_SaveThread();                  /* release the GIL; cffi takes it per call */
    }
    if (cffi_start_python() != 0) {           /* runs the embedding init code */
        cid_syslog(LOG_ERR, "python start-up failed: the module's init code raised");
        cid_state = -1;
        goto out;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    cid_init_ms_v = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
    pthread_atfork(cid_fork_prepare, cid_fork_parent, cid_fork_child);
    __atomic_store_n(&cid_state, 1, __ATOMIC_RELEASE);
out:
    st = cid_state;
    pthread_mutex_unlock(&cid_lock);
    return st;
}

/* ---- fallbacks used only when Python gave no valid answer */
static const char *cid_arg(int argc, const char **argv, const char *name)
{
    size_t n = strlen(name);
    int i;
    const char *v = NULL;
    for (i = 0; i < argc; i++)
        if (argv[i] && strncasecmp(argv[i], name, n) == 0)
            v = argv[i] + n;                  /* the last one wins, as in the Python parser */
    return v;
}

/* ---- cgroup warm-up.  The first write to any cgroup.procs after a quiet period waits for
   an RCU grace period in the kernel (the global cgroup_threadgroup_rwsem switching to its
   slow path: 5-15 ms measured on the test VM); writes in the following tens of ms take
   ~0.03 ms.  So at the start of each phase, before Python starts, a detached thread writes
   this process's pid into the cgroup it already is in (the kernel moves nothing) in one
   non-memory v1 hierarchy (freezer, else pids) or cgroup v2; the grace period passes while
   Python starts and decides, and the adoption itself finds the fast path.  Best effort: any
   failure is ignored; the memory controller is never touched; no malloc, no stdio (the
   thread may still run when sshd forks).  Off with the module option cgroup_warmup=no. */
static int cid_has_ctrl(const char *list, size_t n, const char *want)
{
    size_t w = strlen(want), i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && list[j] != ',')
            j++;
        if (j - i == w && memcmp(list + i, want, w) == 0)
            return 1;
        i = j + 1;
    }
    return 0;
}

static void *cid_warm_thread(void *arg)
{
    char buf[8192], path[4352];
    const char *rel = NULL;
    size_t rlen = 0;
    int fd, n, rank, best = 3;       /* rank 0 freezer, 1 pids, 2 cgroup v2 */
    ssize_t got;
    (void)arg;
    fd = open("/proc/self/cgroup", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    got = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (got <= 0)
        return NULL;
    buf[got] = 0;
    for (char *line = buf; line && *line; ) {             /* "ID:CONTROLLERS:/PATH" */
        char *nl = strchr(line, '\n'), *c1, *c2;
        if (nl)
            *nl = 0;
        c1 = strchr(line, ':');
        c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (c2 && c2[1] == '/') {
            size_t cl = c2 - c1 - 1;
            if (cid_has_ctrl(c1 + 1, cl, "memory"))
                rank = 3;
            else if (cid_has_ctrl(c1 + 1, cl, "freezer"))
                rank = 0;
            else if (cid_has_ctrl(c1 + 1, cl, "pids"))
                rank = 1;
            else if (cl == 0 && strncmp(line, "0:", 2) == 0)
                rank = 2;
            else
                rank = 3;
            if (rank < best) {
                best = rank;
                rel = c2 + 1;
                rlen = strlen(rel);
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    if (best > 2 || rlen > 4096)
        return NULL;
    if (best == 0 || best == 1)
        n = snprintf(path, sizeof path, "/sys/fs/cgroup/%%s%%s/cgroup.procs",
                     best == 0 ? "freezer" : "pids", rel);
    else if (access("/sys/fs/cgroup/cgroup.controllers", F_OK) == 0)
        n = snprintf(path, sizeof path, "/sys/fs/cgroup%%s/cgroup.procs", rel);
    else
        n = snprintf(path, sizeof path, "/sys/fs/cgroup/unified%%s/cgroup.procs", rel);
    if (n <= 0 || n >= (int)sizeof path)
        return NULL;
    fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    n = snprintf(buf, sizeof buf, "%%d", (int)getpid());
    (void)!write(fd, buf, n);
    close(fd);
    return NULL;
}

static void cid_warmup(int argc, const char **argv)
{
    pthread_t t;
    pthread_attr_t a;
    const char *v = cid_arg(argc, argv, "cgroup_warmup=");
    if (v && (v[0] == '0' || strncasecmp(v, "no", 2) == 0 || strncasecmp(v, "false", 5) == 0))
        return;                               /* the Python parser's words for "off" */
    if (geteuid() != 0 || pthread_attr_init(&a) != 0)
        return;
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&a, 64 * 1024);
    (void)pthread_create(&t, &a, cid_warm_thread, NULL);
    pthread_attr_destroy(&a);
}

static int cid_failval(pam_handle_t *pamh, int argc, const char **argv)
{
    const char *v = cid_arg(argc, argv, "onerror=");
    const char *svc = NULL, *user = NULL, *want = cid_arg(argc, argv, "service=");
    struct passwd pw, *res = NULL;
    char buf[8192];

    /* a service we are not configured for is none of our business (pam_slurm_adopt) */
    if (!want || !*want)
        want = "sshd";
    if (strcmp(want, "*") != 0 &&
            (pam_get_item(pamh, PAM_SERVICE, (const void **)&svc) != PAM_SUCCESS || !svc ||
             strcmp(svc, want) != 0))
        return PAM_IGNORE;
    /* root is always ignored (pam_slurm_adopt forces ignore_root=1 in every config that
       can deny), so a broken installation cannot lock root out */
    if (pam_get_item(pamh, PAM_USER, (const void **)&user) == PAM_SUCCESS && user &&
            getpwnam_r(user, &pw, buf, sizeof buf, &res) == 0 && res && res->pw_uid == 0)
        return PAM_IGNORE;
    if (v && strncasecmp(v, "ignore", 6) == 0)
        return PAM_IGNORE;
    return PAM_SYSTEM_ERR;
}

static int cid_call(int phase, pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    int r;
    cid_warmup(argc, argv);
    if (cid_start() != 1)
        return cid_failval(pamh, argc, argv);
    r = _cid_dispatch(phase, pamh, flags, argc, argv);
    if (!(r & CID_OK_BIT) || (r & ~(CID_OK_BIT | 0xff)) != 0) {
        cid_syslog(LOG_ERR, "internal error (no valid result from python); failing closed");
        return cid_failval(pamh, argc, argv);
    }
    return r & 0xff;
}

#define CID_EXPORT __attribute__((visibility("default")))
CID_EXPORT int pam_sm_authenticate(pam_handle_t *h, int f, int c, const char **v)
{ (void)h; (void)f; (void)c; (void)v; return PAM_IGNORE; }
CID_EXPORT int pam_sm_setcred(pam_handle_t *h, int f, int c, const char **v)
{ (void)h; (void)f; (void)c; (void)v; return PAM_IGNORE; }
CID_EXPORT int pam_sm_acct_mgmt(pam_handle_t *h, int f, int c, const char **v)
{ return cid_call(0, h, f, c, v); }
CID_EXPORT int pam_sm_open_session(pam_handle_t *h, int f, int c, const char **v)
{ return cid_call(1, h, f, c, v); }
CID_EXPORT int pam_sm_close_session(pam_handle_t *h, int f, int c, const char **v)
{ (void)h; (void)f; (void)c; (void)v; return PAM_IGNORE; }   /* nothing to undo */
"""

# The embedding init code: as small as possible; the hook is imported at the first call.
INIT_CODE = r"""
import sys
for _p in %(paths)r:
    if _p not in sys.path:          # only when the host itself is a Python program
        sys.path.append(_p)
from %(modname)s import ffi, lib

_PHASES = ("account", "open_session")
_hook = None


def _onerror(exc, val, tb):
    try:
        lib.cid_syslog(3, ("internal error: %%s: %%s" %% (exc.__name__, val)).encode()[:1500])
    except BaseException:
        pass


@ffi.def_extern(error=0, onerror=_onerror)      # 0 has no OK bit: the shim fails closed
def _cid_dispatch(phase, pamh, flags, argc, argv):
    global _hook
    if _hook is None:
        from pam_callerid import hook
        _hook = hook
    rc = _hook.dispatch(ffi, lib, _PHASES[phase], pamh, flags,
                        [ffi.string(argv[i]).decode("utf-8", "replace") for i in range(argc)])
    return (int(rc) & 0xff) | %(okbit)d
"""

VERSION_SCRIPT = """{
  global: pam_sm_authenticate; pam_sm_setcred; pam_sm_acct_mgmt; pam_sm_open_session;
          pam_sm_close_session;
  local: *;
};
"""


def _c_wstr(s):
    if '"' in s or "\\" in s or "\n" in s:
        raise SystemExit("unsupported character in path %r" % s)
    return 'L"%s"' % s


def search_path(venv, project):
    """The interpreter's module search path: Debian's stdlib, the venv, the project."""
    ver = "%d.%d" % sys.version_info[:2]
    base = sys.base_prefix
    paths = [os.path.join(base, "lib", "python%s.zip" % ver.replace(".", "")),
             sysconfig.get_path("stdlib"),
             os.path.join(sysconfig.get_path("stdlib"), "lib-dynload")]
    # the project before the venv: a stale pip-installed copy must not shadow the build's
    if project:
        paths.append(project)
    paths.append(os.path.join(venv, "lib", "python%s" % ver, "site-packages"))
    out = []
    for p in paths:
        p = os.path.realpath(p) if not p.endswith(".zip") else p
        if p not in out:
            out.append(p)
    return out


def build(venv, out, project=None, name="pam_callerid", verbose=False):
    """Compile the module into ``out``/<name>.so and return its path."""
    from cffi import FFI                   # build-time dependency only

    venv = os.path.realpath(venv)
    if os.path.realpath(sys.prefix) != venv:
        raise SystemExit("run this with the venv's interpreter: %s/bin/python (this is %s)"
                         % (venv, sys.executable))
    if sys.base_prefix != "/usr":
        raise SystemExit("the venv must be built from Debian's /usr/bin/python3 (base %s)"
                         % sys.base_prefix)
    if project is None:
        project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    project = os.path.realpath(project)
    if not os.path.isfile(os.path.join(project, "pam_callerid", "hook.py")):
        raise SystemExit("no pam_callerid package under %s" % project)
    paths = search_path(venv, project)
    libpython = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    ver = "%d.%d" % sys.version_info[:2]
    fmt = {"okbit": OK_BIT, "libpython": libpython, "home": sys.base_prefix,
           "program": os.path.join(sys.base_prefix, "bin", "python" + ver),
           "paths": " ".join(_c_wstr(p) + "," for p in paths), "modname": MODNAME}
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.embedding_api("")
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="build-", dir=out)
    try:
        vs = os.path.join(tmp, "exports.map")
        with open(vs, "w") as f:
            f.write(VERSION_SCRIPT)
        ffi.set_source(MODNAME, C_SOURCE % fmt, libraries=["pam"],
                       extra_compile_args=["-O2", "-Wall", "-Wno-unused-function",
                                           "-fvisibility=hidden"],
                       extra_link_args=["-Wl,-z,nodelete", "-Wl,-z,now",
                                        "-Wl,--version-script=" + vs])
        ffi.embedding_init_code(INIT_CODE % {"paths": paths, "modname": MODNAME,
                                             "okbit": OK_BIT})
        so = ffi.compile(tmpdir=tmp, target=name + ".so", verbose=verbose)
        final = os.path.join(out, name + ".so")
        shutil.copyfile(so, final + ".tmp")
        os.chmod(final + ".tmp", 0o644)
        os.replace(final + ".tmp", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # byte-compile what the module imports at login, so root never writes .pyc files then
    for pkg in ("pam_callerid", "cgroups", "daemon"):
        d = os.path.join(project, pkg)
        if os.path.isdir(d):
            compileall.compile_dir(d, quiet=1)
    return final


def install(so, install_dir=DEFAULT_INSTALL_DIR, name="pam_callerid.so"):
    """Copy the module into the PAM module directory (atomic replace, mode 0644)."""
    os.makedirs(install_dir, exist_ok=True)
    dst = os.path.join(install_dir, name)
    tmp = dst + ".tmp%d" % os.getpid()
    shutil.copyfile(so, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pam_callerid.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=os.path.realpath(sys.prefix),
                    help="the project's virtual environment (default: this interpreter's)")
    ap.add_argument("--out", default=None,
                    help="output directory for pam_callerid.so (default with --install: a "
                         "temporary directory, removed afterwards)")
    ap.add_argument("--project", default=None,
                    help="directory holding the pam_callerid package (default: this checkout)")
    ap.add_argument("--name", default="pam_callerid", help="module base name")
    ap.add_argument("--install", action="store_true", help="also install the module")
    ap.add_argument("--install-dir", default=DEFAULT_INSTALL_DIR,
                    help="PAM module directory (default %(default)s)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if a.out is None and not a.install:
        ap.error("give --out DIR, or --install")
    out = a.out or tempfile.mkdtemp(prefix="pam_callerid-build-")
    try:
        so = build(a.venv, out, a.project, a.name, a.verbose)
        print("built", so)
        if a.install:
            print("installed", install(so, a.install_dir, a.name + ".so"))
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
