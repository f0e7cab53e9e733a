/* LD_PRELOAD shim: make setrlimit()/setrlimit64()/prlimit()/prlimit64() report
 * success when the kernel refuses with EPERM. This sandbox lacks
 * CAP_SYS_RESOURCE, so raising the RLIMIT_MEMLOCK hard limit fails and
 * sanlock's setup_limits() aborts daemon startup ("cannot set the limits for
 * memlock"). Used only to run sanlock on the host without a VM.
 * Built by tests/lab/vm/install.sh into tests/lab/vm/build/fake_rlimit.so. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/types.h>

/* no <sys/resource.h>: its prototypes use enum types; we only pass pointers */
typedef int (*set_fn)(int, const void *);
typedef int (*pr_fn)(pid_t, int, const void *, void *);

static int set_wrap(const char *name, int res, const void *rlim)
{
    set_fn real = (set_fn)dlsym(RTLD_NEXT, name);
    int rv = real(res, rlim);
    if (rv < 0 && errno == EPERM) { errno = 0; return 0; }
    return rv;
}
static int pr_wrap(const char *name, pid_t pid, int res, const void *n, void *o)
{
    pr_fn real = (pr_fn)dlsym(RTLD_NEXT, name);
    int rv = real(pid, res, n, o);
    if (rv < 0 && errno == EPERM && n) { errno = 0; return 0; }
    return rv;
}
int setrlimit(int r, const void *l) { return set_wrap("setrlimit", r, l); }
int setrlimit64(int r, const void *l) { return set_wrap("setrlimit64", r, l); }
int prlimit(pid_t p, int r, const void *n, void *o) { return pr_wrap("prlimit", p, r, n, o); }
int prlimit64(pid_t p, int r, const void *n, void *o) { return pr_wrap("prlimit64", p, r, n, o); }
