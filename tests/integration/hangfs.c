/* hangfs: a FUSE passthrough to a backing directory whose operations can be
 * made to block, to test what the agent does when storage hangs.
 *
 *     hangfs BACKING_DIR MOUNTPOINT
 *
 * Runs in the foreground. SIGUSR1 makes every new operation block until
 * SIGUSR2 releases them; SIGHUP only those that change something (writes,
 * syncs, creations, renames, removals, truncations), reads answering.
 * Prints "ready" once the kernel finished the FUSE handshake, "hung",
 * "hung writes" and "released" once a switch took effect (one line each,
 * flushed). SIGTERM unmounts and exits.
 *
 * Caches are off (entry, attr and negative timeouts 0, direct I/O), so every
 * access of a caller reaches this process and blocks while hung: a request
 * the daemon has read cannot be killed, as on a dead FUSE server. Built by
 * tests/integration/hangfs.py; test-only.
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/time.h>
#include <unistd.h>

static int backing = -1;
static pthread_mutex_t gate_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_open = PTHREAD_COND_INITIALIZER;
enum { OPEN, HUNG, WRITES_HUNG };
static int hung = OPEN;

static void say(const char *word)
{
    printf("%s\n", word);
    fflush(stdout);
}

/* Every operation passes here first; `change`: one that changes something. */
static void gate_for(int change)
{
    pthread_mutex_lock(&gate_lock);
    while (hung == HUNG || (change && hung == WRITES_HUNG))
        pthread_cond_wait(&gate_open, &gate_lock);
    pthread_mutex_unlock(&gate_lock);
}

static void gate(void)
{
    gate_for(0);
}

static void gate_write(void)
{
    gate_for(1);
}

static void *switcher(void *arg)
{
    sigset_t *set = arg;
    for (;;) {
        int sig;
        if (sigwait(set, &sig) != 0)
            continue;
        pthread_mutex_lock(&gate_lock);
        hung = sig == SIGUSR1 ? HUNG : sig == SIGHUP ? WRITES_HUNG : OPEN;
        pthread_cond_broadcast(&gate_open);
        pthread_mutex_unlock(&gate_lock);
        say(sig == SIGUSR1 ? "hung" : sig == SIGHUP ? "hung writes" : "released");
    }
    return NULL;
}

/* "/a/b" -> "a/b", "/" -> ".": paths relative to the backing directory. */
static const char *rel(const char *path)
{
    while (*path == '/')
        path++;
    return *path ? path : ".";
}

#define RET(expr) return (expr) < 0 ? -errno : 0

static void *hf_init(struct fuse_conn_info *conn, struct fuse_config *cfg)
{
    (void)conn;
    cfg->entry_timeout = 0;
    cfg->attr_timeout = 0;
    cfg->negative_timeout = 0;
    cfg->direct_io = 1;
    cfg->hard_remove = 1;
    cfg->use_ino = 1;
    say("ready");
    return NULL;
}

static int hf_getattr(const char *path, struct stat *st, struct fuse_file_info *fi)
{
    gate();
    if (fi)
        RET(fstat(fi->fh, st));
    RET(fstatat(backing, rel(path), st, AT_SYMLINK_NOFOLLOW));
}

static int hf_access(const char *path, int mask)
{
    gate();
    RET(faccessat(backing, rel(path), mask, 0));
}

static int hf_readlink(const char *path, char *buf, size_t size)
{
    gate();
    ssize_t n = readlinkat(backing, rel(path), buf, size - 1);
    if (n < 0)
        return -errno;
    buf[n] = '\0';
    return 0;
}

static int hf_mkdir(const char *path, mode_t mode)
{
    gate_write();
    RET(mkdirat(backing, rel(path), mode));
}

static int hf_unlink(const char *path)
{
    gate_write();
    RET(unlinkat(backing, rel(path), 0));
}

static int hf_rmdir(const char *path)
{
    gate_write();
    RET(unlinkat(backing, rel(path), AT_REMOVEDIR));
}

static int hf_symlink(const char *target, const char *path)
{
    gate_write();
    RET(symlinkat(target, backing, rel(path)));
}

static int hf_rename(const char *from, const char *to, unsigned int flags)
{
    gate_write();
    RET(renameat2(backing, rel(from), backing, rel(to), flags));
}

static int hf_link(const char *from, const char *to)
{
    gate_write();
    RET(linkat(backing, rel(from), backing, rel(to), 0));
}

static int hf_chmod(const char *path, mode_t mode, struct fuse_file_info *fi)
{
    gate_write();
    if (fi)
        RET(fchmod(fi->fh, mode));
    RET(fchmodat(backing, rel(path), mode, 0));
}

static int hf_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi)
{
    gate_write();
    if (fi)
        RET(fchown(fi->fh, uid, gid));
    RET(fchownat(backing, rel(path), uid, gid, AT_SYMLINK_NOFOLLOW));
}

static int hf_truncate(const char *path, off_t size, struct fuse_file_info *fi)
{
    gate_write();
    if (fi)
        RET(ftruncate(fi->fh, size));
    int fd = openat(backing, rel(path), O_WRONLY);
    if (fd < 0)
        return -errno;
    int rc = ftruncate(fd, size) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

static int hf_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi)
{
    gate_write();
    if (fi)
        RET(futimens(fi->fh, tv));
    RET(utimensat(backing, rel(path), tv, AT_SYMLINK_NOFOLLOW));
}

/* The backing file system may not do O_DIRECT; this one bypasses caches anyway. */
static int backing_flags(int flags)
{
    return flags & ~O_DIRECT;
}

static int hf_open(const char *path, struct fuse_file_info *fi)
{
    gate_for(fi->flags & O_TRUNC);     /* opening for writing changes nothing yet */
    int fd = openat(backing, rel(path), backing_flags(fi->flags));
    if (fd < 0)
        return -errno;
    fi->fh = fd;
    return 0;
}

static int hf_create(const char *path, mode_t mode, struct fuse_file_info *fi)
{
    gate_write();
    int fd = openat(backing, rel(path), backing_flags(fi->flags) | O_CREAT, mode);
    if (fd < 0)
        return -errno;
    fi->fh = fd;
    return 0;
}

static int hf_read(const char *path, char *buf, size_t size, off_t off,
                   struct fuse_file_info *fi)
{
    (void)path;
    gate();
    ssize_t n = pread(fi->fh, buf, size, off);
    return n < 0 ? -errno : (int)n;
}

static int hf_write(const char *path, const char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    (void)path;
    gate_write();
    ssize_t n = pwrite(fi->fh, buf, size, off);
    return n < 0 ? -errno : (int)n;
}

static int hf_statfs(const char *path, struct statvfs *st)
{
    (void)path;
    gate();
    RET(fstatvfs(backing, st));
}

static int hf_flush(const char *path, struct fuse_file_info *fi)
{
    (void)path;
    (void)fi;
    gate();
    return 0;
}

static int hf_release(const char *path, struct fuse_file_info *fi)
{
    (void)path;
    /* Not gated: the kernel sends RELEASE without waiting for an answer. */
    close(fi->fh);
    return 0;
}

static int hf_fsync(const char *path, int datasync, struct fuse_file_info *fi)
{
    (void)path;
    gate_write();
    RET(datasync ? fdatasync(fi->fh) : fsync(fi->fh));
}

static int hf_opendir(const char *path, struct fuse_file_info *fi)
{
    gate();
    int fd = openat(backing, rel(path), O_RDONLY | O_DIRECTORY);
    if (fd < 0)
        return -errno;
    DIR *dir = fdopendir(fd);
    if (dir == NULL) {
        int err = errno;
        close(fd);
        return -err;
    }
    fi->fh = (uint64_t)(uintptr_t)dir;
    return 0;
}

static int hf_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags)
{
    (void)path;
    (void)off;
    (void)flags;
    gate();
    DIR *dir = (DIR *)(uintptr_t)fi->fh;
    rewinddir(dir);
    struct dirent *d;
    errno = 0;
    while ((d = readdir(dir)) != NULL) {
        struct stat st = {.st_ino = d->d_ino, .st_mode = (mode_t)d->d_type << 12};
        if (fill(buf, d->d_name, &st, 0, 0))
            break;
    }
    return errno ? -errno : 0;
}

static int hf_releasedir(const char *path, struct fuse_file_info *fi)
{
    (void)path;
    closedir((DIR *)(uintptr_t)fi->fh);
    return 0;
}

static int hf_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi)
{
    (void)path;
    gate_write();
    int fd = dirfd((DIR *)(uintptr_t)fi->fh);
    RET(datasync ? fdatasync(fd) : fsync(fd));
}

static int hf_fallocate(const char *path, int mode, off_t off, off_t len,
                        struct fuse_file_info *fi)
{
    (void)path;
    gate_write();
    RET(fallocate(fi->fh, mode, off, len));
}

static off_t hf_lseek(const char *path, off_t off, int whence, struct fuse_file_info *fi)
{
    (void)path;
    gate();
    off_t r = lseek(fi->fh, off, whence);
    return r < 0 ? -errno : r;
}

static const struct fuse_operations ops = {
    .init = hf_init,
    .getattr = hf_getattr,
    .access = hf_access,
    .readlink = hf_readlink,
    .mkdir = hf_mkdir,
    .unlink = hf_unlink,
    .rmdir = hf_rmdir,
    .symlink = hf_symlink,
    .rename = hf_rename,
    .link = hf_link,
    .chmod = hf_chmod,
    .chown = hf_chown,
    .truncate = hf_truncate,
    .utimens = hf_utimens,
    .open = hf_open,
    .create = hf_create,
    .read = hf_read,
    .write = hf_write,
    .statfs = hf_statfs,
    .flush = hf_flush,
    .release = hf_release,
    .fsync = hf_fsync,
    .opendir = hf_opendir,
    .readdir = hf_readdir,
    .releasedir = hf_releasedir,
    .fsyncdir = hf_fsyncdir,
    .fallocate = hf_fallocate,
    .lseek = hf_lseek,
};

int main(int argc, char *argv[])
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s BACKING_DIR MOUNTPOINT\n", argv[0]);
        return 2;
    }
    backing = open(argv[1], O_RDONLY | O_DIRECTORY);
    if (backing < 0) {
        perror(argv[1]);
        return 1;
    }
    /* Blocked in every thread (they inherit the mask); the switcher takes them. */
    static sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGUSR2);
    sigaddset(&set, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_t tid;
    if (pthread_create(&tid, NULL, switcher, &set) != 0) {
        fprintf(stderr, "cannot start the switch thread\n");
        return 1;
    }
    /* Many callers may block at once; each holds a daemon thread. */
    char *args[] = {argv[0], argv[2], "-f", "-o", "fsname=hangfs,subtype=hangfs,max_threads=64",
                    NULL};
    return fuse_main(5, args, &ops, NULL);
}
