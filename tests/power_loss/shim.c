/*
 * A power-loss recorder for the power_loss test, loaded into the real broker with
 * LD_PRELOAD. Every change the broker makes under WARRENMQ_SHIM_DIR (writes,
 * truncations, creations, renames, unlinks, mkdirs) and every fsync/fdatasync is
 * appended, in the order it happened, to the journal WARRENMQ_SHIM_JOURNAL. The
 * test then rebuilds the directory as a power cut at any point of the journal
 * would have left it: only what a completed fsync or fdatasync covered is kept.
 * sync_file_range is journalled but promises nothing, as on a real power cut
 * (it neither flushes the drive's cache nor the file's metadata).
 *
 * The journal is written with one unbuffered write per record, so killing the
 * broker with SIGKILL loses nothing it holds.
 *
 * Record: u8 op, u64 index, u64 monotonic ns, u64 a, u64 b, u16 len1, path1,
 * u16 len2, path2, then b bytes of data for WRITE.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { OP_WRITE = 1, OP_TRUNCATE = 2, OP_SYNC = 3, OP_CREATE = 4, OP_UNLINK = 5,
       OP_RENAME = 6, OP_MKDIR = 7, OP_RMDIR = 8, OP_RANGE_SYNC = 9 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int journal = -1;
static char watched[PATH_MAX];
static size_t watched_len;
static uint64_t next_index;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off64_t);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_sync_file_range)(int, off64_t, off64_t, unsigned int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned int);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);
static int (*real_mkdir)(const char *, mode_t);
static int (*real_mkdirat)(int, const char *, mode_t);
static int (*real_rmdir)(const char *);
static int (*real_fallocate64)(int, int, off64_t, off64_t);

static void die(const char *what) {
    char msg[256];
    int n = snprintf(msg, sizeof msg, "power-loss shim: %s: %s\n", what, strerror(errno));
    syscall(SYS_write, 2, msg, (size_t)n);
    _exit(99);
}

#define RESOLVE(name, sym) do { \
        name = dlsym(RTLD_NEXT, sym); \
        if (!name) { errno = ENOSYS; die("dlsym " sym); } \
    } while (0)

__attribute__((constructor)) static void init(void) {
    RESOLVE(real_write, "write");
    RESOLVE(real_pwrite64, "pwrite64");
    RESOLVE(real_writev, "writev");
    RESOLVE(real_pwritev64, "pwritev64");
    RESOLVE(real_open64, "open64");
    RESOLVE(real_openat64, "openat64");
    RESOLVE(real_ftruncate64, "ftruncate64");
    RESOLVE(real_fsync, "fsync");
    RESOLVE(real_fdatasync, "fdatasync");
    RESOLVE(real_sync_file_range, "sync_file_range");
    RESOLVE(real_rename, "rename");
    RESOLVE(real_renameat, "renameat");
    RESOLVE(real_renameat2, "renameat2");
    RESOLVE(real_unlink, "unlink");
    RESOLVE(real_unlinkat, "unlinkat");
    RESOLVE(real_mkdir, "mkdir");
    RESOLVE(real_mkdirat, "mkdirat");
    RESOLVE(real_rmdir, "rmdir");
    RESOLVE(real_fallocate64, "fallocate64");
    const char *dir = getenv("WARRENMQ_SHIM_DIR");
    const char *path = getenv("WARRENMQ_SHIM_JOURNAL");
    if (!dir || !path) return;
    if (!realpath(dir, watched)) die("realpath of WARRENMQ_SHIM_DIR");
    watched_len = strlen(watched);
    journal = real_open64(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (journal < 0) die("open the journal");
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The watched path of `p` (absolute or relative to dirfd), relative to the
 * watched directory ("" for the directory itself), or NULL when outside it. */
static const char *inside(int dirfd, const char *p, char *buf) {
    char joined[PATH_MAX * 2];
    if (journal < 0 || !p) return NULL;
    if (p[0] == '/') {
        snprintf(joined, sizeof joined, "%s", p);
    } else {
        char base[PATH_MAX];
        if (dirfd == AT_FDCWD) {
            if (!getcwd(base, sizeof base)) return NULL;
        } else {
            char link[64];
            snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
            ssize_t n = readlink(link, base, sizeof base - 1);
            if (n < 0) return NULL;
            base[n] = 0;
        }
        snprintf(joined, sizeof joined, "%s/%s", base, p);
    }
    /* Normalise "//" and "/./"; the broker's paths hold no "..". */
    char *o = buf;
    for (const char *s = joined; *s && o - buf < PATH_MAX - 1;) {
        if (s[0] == '/' && (s[1] == '/' )) { s++; continue; }
        if (s[0] == '/' && s[1] == '.' && (s[2] == '/' || s[2] == 0)) { s += 2; continue; }
        *o++ = *s++;
    }
    if (o > buf + 1 && o[-1] == '/') o--;
    *o = 0;
    if (strncmp(buf, watched, watched_len) != 0) return NULL;
    if (buf[watched_len] == 0) return buf + watched_len;
    if (buf[watched_len] != '/') return NULL;
    return buf + watched_len + 1;
}

static const char *fd_inside(int fd, char *buf) {
    char link[64], target[PATH_MAX];
    if (journal < 0) return NULL;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n <= 0) return NULL;
    target[n] = 0;
    /* A file already unlinked: nothing a restart could find. */
    if (n > 10 && strcmp(target + n - 10, " (deleted)") == 0) return NULL;
    return inside(AT_FDCWD, target, buf);
}

/* Writes all of `v` (n entries, `total` bytes), resuming after partial writes. */
static int writev_all(int fd, struct iovec *v, int n, size_t total) {
    while (total > 0) {
        ssize_t w = real_writev(fd, v, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        total -= (size_t)w;
        while (n > 0 && (size_t)w >= v[0].iov_len) {
            w -= (ssize_t)v[0].iov_len;
            v++;
            n--;
        }
        if (n > 0) {
            v[0].iov_base = (char *)v[0].iov_base + w;
            v[0].iov_len -= (size_t)w;
        }
    }
    return 0;
}

/* Appends one record; the caller holds `lock`. */
static void record(uint8_t op, uint64_t a, uint64_t b, const char *p1, const char *p2,
                   const struct iovec *data, int data_count) {
    uint8_t head[1 + 8 * 4 + 2];
    uint16_t l1 = p1 ? (uint16_t)strlen(p1) : 0, l2 = p2 ? (uint16_t)strlen(p2) : 0;
    uint64_t index = next_index++, t = now_ns();
    head[0] = op;
    memcpy(head + 1, &index, 8);
    memcpy(head + 9, &t, 8);
    memcpy(head + 17, &a, 8);
    memcpy(head + 25, &b, 8);
    memcpy(head + 33, &l1, 2);
    struct iovec v[64];
    int n = 0;
    v[n++] = (struct iovec){ head, sizeof head };
    if (l1) v[n++] = (struct iovec){ (void *)p1, l1 };
    v[n++] = (struct iovec){ &l2, 2 };
    if (l2) v[n++] = (struct iovec){ (void *)p2, l2 };
    size_t total = 0;
    for (int i = 0; i < n; i++) total += v[i].iov_len;
    uint64_t left = b;
    for (int i = 0; i < data_count && left > 0; i++) {
        size_t len = data[i].iov_len < left ? data[i].iov_len : left;
        if (n == 64) {
            /* Flush what is gathered; the journal is O_APPEND and under `lock`. */
            if (writev_all(journal, v, n, total) < 0) die("write the journal");
            n = 0;
            total = 0;
        }
        v[n++] = (struct iovec){ data[i].iov_base, len };
        total += len;
        left -= len;
    }
    if (writev_all(journal, v, n, total) < 0) die("write the journal");
}

static void record_write(int fd, const char *rel, uint64_t offset, const struct iovec *iov,
                         int iovcnt, ssize_t written) {
    (void)fd;
    if (written > 0) record(OP_WRITE, offset, (uint64_t)written, rel, NULL, iov, iovcnt);
}

ssize_t write(int fd, const void *buf, size_t count) {
    char pbuf[PATH_MAX];
    const char *rel = fd_inside(fd, pbuf);
    if (!rel) return real_write(fd, buf, count);
    pthread_mutex_lock(&lock);
    ssize_t n = real_write(fd, buf, count);
    int saved = errno;
    if (n > 0) {
        off64_t end = lseek64(fd, 0, SEEK_CUR);
        struct iovec v = { (void *)buf, (size_t)n };
        record_write(fd, rel, (uint64_t)(end - n), &v, 1, n);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    char pbuf[PATH_MAX];
    const char *rel = fd_inside(fd, pbuf);
    if (!rel) return real_pwrite64(fd, buf, count, offset);
    pthread_mutex_lock(&lock);
    ssize_t n = real_pwrite64(fd, buf, count, offset);
    int saved = errno;
    struct iovec v = { (void *)buf, n > 0 ? (size_t)n : 0 };
    record_write(fd, rel, (uint64_t)offset, &v, 1, n);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    return pwrite64(fd, buf, count, offset);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    char pbuf[PATH_MAX];
    const char *rel = fd_inside(fd, pbuf);
    if (!rel) return real_writev(fd, iov, iovcnt);
    pthread_mutex_lock(&lock);
    ssize_t n = real_writev(fd, iov, iovcnt);
    int saved = errno;
    if (n > 0) {
        off64_t end = lseek64(fd, 0, SEEK_CUR);
        record_write(fd, rel, (uint64_t)(end - n), iov, iovcnt, n);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off64_t offset) {
    char pbuf[PATH_MAX];
    const char *rel = fd_inside(fd, pbuf);
    if (!rel) return real_pwritev64(fd, iov, iovcnt, offset);
    pthread_mutex_lock(&lock);
    ssize_t n = real_pwritev64(fd, iov, iovcnt, offset);
    int saved = errno;
    record_write(fd, rel, (uint64_t)offset, iov, iovcnt, n);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return n;
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset) {
    return pwritev64(fd, iov, iovcnt, offset);
}

/* Opening with O_CREAT records a creation when the file did not exist, and
 * O_TRUNC a truncation to 0 when it did. */
static int opened(int dirfd, const char *path, int flags, mode_t mode, int at) {
    char pbuf[PATH_MAX];
    const char *rel = (flags & (O_CREAT | O_TRUNC)) ? inside(dirfd, path, pbuf) : NULL;
    if (!rel) return at ? real_openat64(dirfd, path, flags, mode) : real_open64(path, flags, mode);
    pthread_mutex_lock(&lock);
    struct stat st;
    int existed = fstatat(dirfd, path, &st, 0) == 0;
    int fd = at ? real_openat64(dirfd, path, flags, mode) : real_open64(path, flags, mode);
    int saved = errno;
    if (fd >= 0) {
        if (!existed) record(OP_CREATE, 0, 0, rel, NULL, NULL, 0);
        else if ((flags & O_TRUNC) && S_ISREG(st.st_mode) && st.st_size > 0)
            record(OP_TRUNCATE, 0, 0, rel, NULL, NULL, 0);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return fd;
}

static mode_t mode_arg(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? (mode_t)va_arg(ap, int) : 0;
}

int open64(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(AT_FDCWD, path, flags, mode, 0);
}

int open(const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(AT_FDCWD, path, flags, mode, 0);
}

int openat64(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(dirfd, path, flags, mode, 1);
}

int openat(int dirfd, const char *path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return opened(dirfd, path, flags, mode, 1);
}

int ftruncate64(int fd, off64_t length) {
    char pbuf[PATH_MAX];
    const char *rel = fd_inside(fd, pbuf);
    if (!rel) return real_ftruncate64(fd, length);
    pthread_mutex_lock(&lock);
    int r = real_ftruncate64(fd, length);
    int saved = errno;
    if (r == 0) record(OP_TRUNCATE, (uint64_t)length, 0, rel, NULL, NULL, 0);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

int ftruncate(int fd, off_t length) { return ftruncate64(fd, length); }

int fallocate64(int fd, int mode, off64_t offset, off64_t len) {
    char pbuf[PATH_MAX];
    const char *rel = fd_inside(fd, pbuf);
    if (!rel || mode != 0) return real_fallocate64(fd, mode, offset, len);
    /* Growing the file with zeros: a truncation upwards, when it grows. */
    pthread_mutex_lock(&lock);
    struct stat st;
    int grew = fstat(fd, &st) == 0 && (off64_t)st.st_size < offset + len;
    int r = real_fallocate64(fd, mode, offset, len);
    int saved = errno;
    if (r == 0 && grew) record(OP_TRUNCATE, (uint64_t)(offset + len), 0, rel, NULL, NULL, 0);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

int fallocate(int fd, int mode, off_t offset, off_t len) { return fallocate64(fd, mode, offset, len); }

/* A sync covers every change journalled before it began; it is journalled once
 * it has returned, with the index it began at. */
static int synced(int fd, int (*real)(int)) {
    char pbuf[PATH_MAX];
    const char *rel = fd_inside(fd, pbuf);
    if (!rel) return real(fd);
    pthread_mutex_lock(&lock);
    uint64_t began = next_index;
    pthread_mutex_unlock(&lock);
    int r = real(fd);
    int saved = errno;
    if (r == 0) {
        pthread_mutex_lock(&lock);
        record(OP_SYNC, began, 0, rel, NULL, NULL, 0);
        pthread_mutex_unlock(&lock);
    }
    errno = saved;
    return r;
}

int fsync(int fd) { return synced(fd, real_fsync); }
int fdatasync(int fd) { return synced(fd, real_fdatasync); }

int sync_file_range(int fd, off64_t offset, off64_t nbytes, unsigned int flags) {
    char pbuf[PATH_MAX];
    const char *rel = fd_inside(fd, pbuf);
    int r = real_sync_file_range(fd, offset, nbytes, flags);
    if (rel && r == 0) {
        int saved = errno;
        pthread_mutex_lock(&lock);
        record(OP_RANGE_SYNC, (uint64_t)offset, 0, rel, NULL, NULL, 0);
        pthread_mutex_unlock(&lock);
        errno = saved;
    }
    return r;
}

static int renamed(int olddirfd, const char *oldp, int newdirfd, const char *newp,
                   unsigned int flags, int kind) {
    char b1[PATH_MAX], b2[PATH_MAX];
    const char *r1 = inside(olddirfd, oldp, b1), *r2 = inside(newdirfd, newp, b2);
    pthread_mutex_lock(&lock);
    int r = kind == 0 ? real_rename(oldp, newp)
          : kind == 1 ? real_renameat(olddirfd, oldp, newdirfd, newp)
                      : real_renameat2(olddirfd, oldp, newdirfd, newp, flags);
    int saved = errno;
    if (r == 0 && (r1 || r2)) {
        if (r1 && r2) record(OP_RENAME, 0, 0, r1, r2, NULL, 0);
        else if (r1) record(OP_UNLINK, 0, 0, r1, NULL, NULL, 0);
        else { errno = EXDEV; die("a file renamed into the watched directory from outside"); }
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

int rename(const char *o, const char *n) { return renamed(AT_FDCWD, o, AT_FDCWD, n, 0, 0); }
int renameat(int od, const char *o, int nd, const char *n) { return renamed(od, o, nd, n, 0, 1); }
int renameat2(int od, const char *o, int nd, const char *n, unsigned int f) {
    return renamed(od, o, nd, n, f, 2);
}

static int removed(int dirfd, const char *path, int flags, int kind) {
    char pbuf[PATH_MAX];
    const char *rel = inside(dirfd, path, pbuf);
    pthread_mutex_lock(&lock);
    int r = kind == 0 ? real_unlink(path) : kind == 1 ? real_rmdir(path) : real_unlinkat(dirfd, path, flags);
    int saved = errno;
    if (r == 0 && rel) {
        int dir = kind == 1 || (kind == 2 && (flags & AT_REMOVEDIR));
        record(dir ? OP_RMDIR : OP_UNLINK, 0, 0, rel, NULL, NULL, 0);
    }
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

int unlink(const char *p) { return removed(AT_FDCWD, p, 0, 0); }
int rmdir(const char *p) { return removed(AT_FDCWD, p, 0, 1); }
int unlinkat(int d, const char *p, int f) { return removed(d, p, f, 2); }

static int made(int dirfd, const char *path, mode_t mode, int at) {
    char pbuf[PATH_MAX];
    const char *rel = inside(dirfd, path, pbuf);
    pthread_mutex_lock(&lock);
    int r = at ? real_mkdirat(dirfd, path, mode) : real_mkdir(path, mode);
    int saved = errno;
    if (r == 0 && rel) record(OP_MKDIR, 0, 0, rel, NULL, NULL, 0);
    pthread_mutex_unlock(&lock);
    errno = saved;
    return r;
}

int mkdir(const char *p, mode_t m) { return made(AT_FDCWD, p, m, 0); }
int mkdirat(int d, const char *p, mode_t m) { return made(d, p, m, 1); }
