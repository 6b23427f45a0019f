#include <sys/prctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <string.h>
#include <unistd.h>
#include <signal.h>
#include <errno.h>

// struct ucred needs _GNU_SOURCE in the importer; this one has the same layout.
struct kms_ucred { pid_t pid; uid_t uid; gid_t gid; };

// SO_PEERPIDFD (Linux 6.5) is newer than Debian 12's headers.
static inline int kms_so_peerpidfd(void) { return 77; }

// A pidfd for `pid`, for kernels without SO_PEERPIDFD (before 6.5); -1 when unavailable.
static inline int kms_pidfd_open(pid_t pid) {
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    return -1;
#endif
}

// 1 if the process behind the pidfd still runs (so its pid was not reused), 0 if it is gone.
// Signal 0 checks existence only; EPERM (another user's process) still means it exists.
static inline int kms_pidfd_alive(int pidfd) {
#ifdef SYS_pidfd_send_signal
    if (syscall(SYS_pidfd_send_signal, pidfd, 0, NULL, 0) == 0) return 1;
    return errno == EPERM ? 1 : 0;
#else
    return 0;
#endif
}

// SO_PEERGROUPS into a fixed buffer. The kernel returns supplementary groups sorted ascending.
// The small buffer serves almost every caller; when the kernel answers ERANGE (more groups),
// the read is retried into one that holds NGROUPS_MAX (65536), so groups never come from /proc.
struct kms_peer_groups { gid_t gids[256]; };
struct kms_peer_groups_max { gid_t gids[65536]; };

// Clock ticks per second, the unit of a process's start time in /proc/PID/stat.
static inline long kms_clock_ticks_per_second(void) { return sysconf(_SC_CLK_TCK); }

static inline int kms_disable_core_dumps(void) {
    struct rlimit zero = {0, 0};
    return setrlimit(RLIMIT_CORE, &zero);
}
static inline int kms_set_nondumpable(void) { return prctl(PR_SET_DUMPABLE, 0, 0, 0, 0); }

static inline void kms_explicit_bzero(void *p, size_t n) { explicit_bzero(p, n); }

#ifndef MADV_WIPEONFORK
#define MADV_WIPEONFORK 18
#endif
static inline int kms_madvise_secret(void *p, size_t n) {
    if (madvise(p, n, MADV_DONTDUMP) != 0) return -1;
    if (madvise(p, n, MADV_WIPEONFORK) != 0) return -2;
    return 0;
}
