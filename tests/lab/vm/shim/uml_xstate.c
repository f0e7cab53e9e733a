/* LD_PRELOAD shim for linux.uml (Debian user-mode-linux 6.1): on a host whose
 * CPU has AMX (or any XSAVE area larger than UML 6.1's fixed buffer), the
 * host kernel's PTRACE_SETREGSET(NT_X86_XSTATE) accepts only a whole XSAVE
 * buffer (xstateregs_set: count != fpu_user_cfg.max_size -> EFAULT), while
 * UML 6.1 passes its own, smaller one: the guest panics at boot with
 * "ptrace set fp regs failed, errno = 14". Newer UML sizes the buffer from
 * the host (Linux 6.13, "um: switch to regset API and depend on XSTATE").
 *
 * Here a short SETREGSET is completed: the tracee's current XSAVE area is
 * read whole (GETREGSET gives the host's size), UML's bytes laid over its
 * start (the standard, non-compacted layout is the same), and the whole area
 * set. What lies past UML's buffer (AMX tiles, which guest code cannot use
 * without arch_prctl permission) keeps the tracee's own state.
 * Built by tests/lab/vm/install.sh into tests/lab/vm/build/uml_xstate.so. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif
#define XSTATE_MAX (64 * 1024)

typedef long (*ptrace_fn)(enum __ptrace_request, ...);
static __thread unsigned char *whole;

long ptrace(enum __ptrace_request req, ...)
{
    static ptrace_fn real;
    va_list ap;
    va_start(ap, req);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real)
        real = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    if (req == PTRACE_SETREGSET && (unsigned long)addr == NT_X86_XSTATE && data) {
        struct iovec *iov = data;
        if (!whole && !(whole = malloc(XSTATE_MAX)))
            return real(req, pid, addr, data);
        struct iovec all = { whole, XSTATE_MAX };
        if (real(PTRACE_GETREGSET, pid, addr, &all) == 0 && all.iov_len > iov->iov_len) {
            memcpy(whole, iov->iov_base, iov->iov_len);
            return real(PTRACE_SETREGSET, pid, addr, &all);
        }
    }
    return real(req, pid, addr, data);
}
