/* unified_only.so: an LD_PRELOAD shim for the TEST BED ONLY, needed on a HYBRID cgroup host
 * (cgroup v1 controllers plus cgroup2 at /sys/fs/cgroup/unified, like the development
 * machine). A pure cgroup-v2 host, i.e. any current distribution, does not need it.
 *
 * Slurm's cgroup/v2 plugin refuses a hybrid host: it reads /proc/self/cgroup and fatal()s
 * ("Hybrid mode is not supported") unless the file starts with the "0::" line
 * (src/plugins/cgroup/v2/cgroup_v2.c, _get_self_cg_path() at slurm-22-05-8-1 and
 * _get_proc_cg_path() at slurm-24-11-5-1). 24.11 also reads /proc/1/cgroup to find the OS's
 * cgroup root (_get_init_cg_path()). The test bed gives each node its own cgroup namespace
 * and cgroup2 mount, so in a node:
 *   /proc/self/cgroup, /proc/thread-self/cgroup, /proc/<own pid>/cgroup
 *       -> only the real "0::" line of the calling process;
 *   /proc/1/cgroup  -> "0::/" (the node's cgroup namespace root is its OS root).
 * Every other open() is passed through untouched. slurmd gets it through LD_PRELOAD and its
 * slurmstepds inherit it (slurmd execs them with its own environment).
 * Compiled by the test bed at bring-up (testbed/cgroup2.py): gcc -shared -fPIC ... -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

enum which { PASS, SELF, INIT };

static enum which classify(const char *path)
{
	char own[64];

	if (!path)
		return PASS;
	if (!strcmp(path, "/proc/1/cgroup") && getpid() != 1)
		return INIT;
	if (!strcmp(path, "/proc/self/cgroup") || !strcmp(path, "/proc/thread-self/cgroup"))
		return SELF;
	snprintf(own, sizeof(own), "/proc/%d/cgroup", (int) getpid());
	return strcmp(path, own) ? PASS : SELF;
}

/* An in-memory file holding `text`, positioned at its start. */
static int memfile(const char *text)
{
	size_t len = strlen(text), done = 0;
	int fd = memfd_create("unified_only", MFD_CLOEXEC);

	if (fd < 0)
		return -1;
	while (done < len) {
		ssize_t n = write(fd, text + done, len - done);
		if (n <= 0) {
			close(fd);
			return -1;
		}
		done += (size_t) n;
	}
	lseek(fd, 0, SEEK_SET);
	return fd;
}

/* The "0::..." line of the caller's real /proc/self/cgroup (read through the real open). */
static int unified_line(int (*real_open)(const char *, int, ...))
{
	char buf[16384], *line, *save = NULL;
	ssize_t n, got = 0;
	int fd = real_open("/proc/self/cgroup", O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -1;
	while (got < (ssize_t) sizeof(buf) - 1 && (n = read(fd, buf + got, sizeof(buf) - 1 - got)) > 0)
		got += n;
	close(fd);
	buf[got] = '\0';
	for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		if (!strncmp(line, "0::", 3)) {
			char out[16400];
			snprintf(out, sizeof(out), "%s\n", line);
			return memfile(out);
		}
	}
	return memfile("");
}

static int answer(enum which w, int (*real_open)(const char *, int, ...))
{
	return w == INIT ? memfile("0::/\n") : unified_line(real_open);
}

static mode_t mode_arg(int flags, va_list ap)
{
	return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
}

#define READ_ONLY(flags) (((flags) & O_ACCMODE) == O_RDONLY)

#define WRAP_OPEN(name)                                                      \
	int name(const char *path, int flags, ...)                               \
	{                                                                        \
		static int (*real)(const char *, int, ...);                          \
		va_list ap;                                                          \
		mode_t mode;                                                         \
		enum which w = classify(path);                                       \
		if (!real)                                                           \
			real = (int (*)(const char *, int, ...)) dlsym(RTLD_NEXT, #name); \
		if (w != PASS && READ_ONLY(flags))                                   \
			return answer(w, real);                                          \
		va_start(ap, flags);                                                 \
		mode = mode_arg(flags, ap);                                          \
		va_end(ap);                                                          \
		return real(path, flags, mode);                                      \
	}

#define WRAP_OPENAT(name)                                                    \
	int name(int dirfd, const char *path, int flags, ...)                    \
	{                                                                        \
		static int (*real)(int, const char *, int, ...);                     \
		static int (*real_open)(const char *, int, ...);                     \
		va_list ap;                                                          \
		mode_t mode;                                                         \
		enum which w = classify(path);                                       \
		if (!real)                                                           \
			real = (int (*)(int, const char *, int, ...)) dlsym(RTLD_NEXT, #name); \
		if (!real_open)                                                      \
			real_open = (int (*)(const char *, int, ...)) dlsym(RTLD_NEXT, "open"); \
		if (w != PASS && READ_ONLY(flags))                                   \
			return answer(w, real_open);                                     \
		va_start(ap, flags);                                                 \
		mode = mode_arg(flags, ap);                                          \
		va_end(ap);                                                          \
		return real(dirfd, path, flags, mode);                               \
	}

WRAP_OPEN(open)
WRAP_OPEN(open64)
WRAP_OPENAT(openat)
WRAP_OPENAT(openat64)
