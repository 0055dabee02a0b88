/* Why shmcache's stripe locks are not robust pthread mutexes (issue 9).
 *
 * A robust process-shared mutex names its holder by thread id, and thread ids
 * are per PID namespace. A thread blocked in pthread_mutex_lock has the mutex
 * in glibc's robust-list "list_op_pending"; when it dies, the kernel
 * (handle_futex_death) marks the mutex OWNER_DIED if the word's tid equals the
 * dying thread's own tid. So a waiter killed in one PID namespace takes the
 * lock of a live holder in another namespace whose tid is the same, which two
 * containers' workers sharing /dev/shm easily have. Run as root:
 *
 *   gcc -O1 -o /tmp/robust benchmarks/probes/robust_mutex_pidns.c -lpthread
 *   cd /tmp && ./robust init
 *   unshare --pid --fork ./robust hold &      # tid 1 in its namespace, locks, sleeps 30 s
 *   unshare --pid --fork ./robust wait &      # tid 1 in another namespace, blocks
 *   kill -9 <host pid of "./robust wait">     # the waiter dies while blocked
 *   ./robust try                              # EOWNERDEAD: the live holder's lock is gone
 *   kill <host pid of "./robust hold">; rm /dev/shm/robust-probe
 *
 * Output on this project's machine (2026-12-03, kernel of the CI image):
 *   holder tid 1 locked r=0 word=0x1
 *   waiter tid 1 waiting word=0x1
 *   try: r=130 (EOWNERDEAD: the live holder's lock was taken) word=0x800077de
 * (the holder was alive throughout). shmcache's lock words name client slots
 * instead, which mean the same in every namespace (shmcache/lock.py). */
// Probe: can a waiter killed in another PID namespace, whose tid equals the
// live holder's tid, make the kernel mark the holder's robust mutex dead?
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <sys/syscall.h>
static pthread_mutex_t *open_mutex(int create) {
    int fd = open("/dev/shm/robust-probe", O_RDWR | (create ? O_CREAT | O_TRUNC : 0), 0600);
    if (fd < 0) { perror("open"); exit(2); }
    if (create && ftruncate(fd, 4096)) { perror("ftruncate"); exit(2); }
    pthread_mutex_t *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (create) {
        pthread_mutexattr_t a; pthread_mutexattr_init(&a);
        pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        pthread_mutex_init(m, &a);
    }
    return m;
}
int main(int argc, char **argv) {
    if (!strcmp(argv[1], "init")) { open_mutex(1); return 0; }
    pthread_mutex_t *m = open_mutex(0);
    long tid = syscall(SYS_gettid);
    if (!strcmp(argv[1], "hold")) {   // lock and sleep
        int r = pthread_mutex_lock(m);
        printf("holder tid %ld locked r=%d word=%#x\n", tid, r, *(unsigned *)m); fflush(stdout);
        sleep(30); return 0;
    }
    if (!strcmp(argv[1], "wait")) {   // block on it (to be killed)
        printf("waiter tid %ld waiting word=%#x\n", tid, *(unsigned *)m); fflush(stdout);
        int r = pthread_mutex_lock(m);
        printf("waiter got it r=%d\n", r); return 0;
    }
    if (!strcmp(argv[1], "try")) {
        int r = pthread_mutex_trylock(m);
        printf("try: r=%d (%s) word=%#x\n", r, r == EOWNERDEAD ? "EOWNERDEAD: the live holder's lock was taken" : r == EBUSY ? "EBUSY: still held" : strerror(r), *(unsigned *)m);
        return 0;
    }
    return 1;
}
