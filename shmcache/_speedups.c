/*
 * shmcache._speedups: the hot paths (get, set, incr, delete, read) in C.
 *
 * Why C: in pure Python a get is ~15k instructions (~1.5-2 us) because every
 * struct unpack, slice and attribute lookup allocates; here it is one call.
 * The Python implementation in table.py / cache.py stays the reference and
 * the fallback: whenever this code meets anything unusual it returns to it
 * ("slow path") instead of handling it twice:
 *   - a writer finds the stripe lock busy (its lock word is taken): the
 *     Python path waits with a timeout, detects dead owners and recovers;
 *   - a stripe at its item cap or out of segments under "noeviction" (the
 *     Python path drops expired entries or raises CacheFull), or a stripe
 *     whose ring word is out of range (the Python path repairs it);
 *   - a reader keeps seeing a writer (odd or changing seqlock version);
 *   - keys/values/ttls of other types, errors (the Python path raises them
 *     with the messages users see).
 * The segment-ring allocator with its reclaim (arena.py: seal the head, reclaim
 * the tail segment with second chance, evict the rest) runs here too, the
 * same algorithm step for step, so a full cache stays on the fast path.
 * So this file never blocks and never raises shmcache errors itself.
 *
 * The segment is untrusted input: every location and length read from it is
 * bounds-checked before it is followed, and every probe and walk is bounded
 * (by the slice's slot count, the segment's size).
 *
 * Threads: these functions hold the GIL throughout and never release it, so
 * within one process they are atomic with respect to other threads. (Only
 * Core.lock releases it, while it sleeps on a busy stripe holding nothing.)
 *
 * Layout: mirrors shmcache/layout.py (the single source of truth); the
 * constants below are exported and checked against it when cache.py
 * imports this module (_check_speedups_layout).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define XXH_INLINE_ALL
#if defined(__x86_64__) && defined(__GNUC__)
/* Also compile xxh3's AVX2 loop (for long inputs, chosen at run time: a wheel
 * must run on any x86-64). Every get checksums its entry, and the baseline
 * SSE2 loop took ~1 us per 16 KiB value, the AVX2 one a third of that. */
#define XXH_DISPATCH_AVX2 1
#define XXH_TARGET_AVX2 __attribute__((target("avx2")))
#include <immintrin.h>
#endif
#include "_vendor/xxhash.h"

#if defined(XXH_DISPATCH_AVX2)
static int have_avx2;
XXH_TARGET_AVX2 static uint64_t xxh3_long_avx2(const void *p, size_t n) {
    /* what XXH3_64bits does past XXH3_MIDSIZE_MAX bytes, with the AVX2 kernels */
    return XXH3_hashLong_64b_internal(p, n, XXH3_kSecret, sizeof(XXH3_kSecret), XXH3_accumulate_avx2,
                                      XXH3_scrambleAcc_avx2);
}
#endif

/* XXH3_64bits (seed 0), the same value on every CPU. */
static inline uint64_t xxh3(const void *p, size_t n) {
#if defined(XXH_DISPATCH_AVX2)
    if (n > XXH3_MIDSIZE_MAX && have_avx2) return xxh3_long_avx2(p, n);
#endif
    return XXH3_64bits(p, n);
}

#define LAYOUT_VERSION 6
#define SLOT_SIZE 16
#define SL_TAG 0
#define SL_LOC 4
#define SL_EXPIRE 8
#define ENTRY_HDR 12
#define E_CHECKSUM 0
#define E_VLEN 4
#define E_KLEN 8
#define E_FLAGS 10
#define SEG_HEADER 12
#define RECLAIM_STEP 16 /* layout.RECLAIM_STEP: entries per incremental reclaim step */
#define ALIGN 4
#define STRIPE_SIZE 128 /* the hot line (S_*) + the cold lock-wait line, which only lock.py writes */
#define S_VERSION 0
#define S_LOCK 8 /* layout.S_LOCK: the stripe's lock word, see lock.py */
#define LOCK_WAITERS 0x80000000u
#define S_ITEMS 24
#define S_LIVE 32
#define S_RING 40
#define S_EVICTIONS 48
#define C_COUNTERS 16
#define CTR_HITS 0
#define CTR_MISSES 1
#define CTR_SETS 2
#define CTR_DELETES 3
#define CTR_EVICTIONS 4
#define CTR_EXPIRATIONS 5
#define READ_RETRIES 16
#define READ_SPIN_NS 50000L
#define KEY_STACK 512

enum { MODE_SET = 0, MODE_ADD = 1, MODE_REPLACE = 2 };
enum { FLAG_BYTES = 0, FLAG_STR = 1, FLAG_INT = 2, FLAG_FLOAT = 3 };

typedef struct {
    uint32_t tag, loc; /* loc: entry offset in the stripe arena / ALIGN */
    double expire;
} slot_t;
_Static_assert(sizeof(slot_t) == SLOT_SIZE, "slot layout");

typedef struct {
    uint32_t chk, vlen;
    uint16_t klen;
    uint8_t flags, pad;
} ehdr_t;
_Static_assert(sizeof(ehdr_t) == ENTRY_HDR, "entry header layout");

/* The Python objects a Core owns, listed once for init, GC traverse and clear. */
#define CORE_OBJECTS(X) \
    X(clock) X(decode) X(encode) X(slow_key) X(slow_read) X(slow_write) X(slow_set) X(slow_add) X(slow_replace) \
    X(slow_incr) X(slow_delete) X(sentinel)

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    char *base;
    uint64_t mask, sps, stripe_off, index_off, arena_off, stripe_arena;
    uint64_t client_off, client_rec, client, max_key, max_value, cap_items;
    uint64_t cap_steps; /* pending(): items from which a stripe near its cap reclaims in steps */
    uint64_t refs_off, seg_size, n_segs;
    int evicts;     /* the policy may evict (lru); else reclaim goes to Python */
    int timing;     /* measure lock holds of the C write paths into max_hold_ns */
    uint64_t max_hold_ns, max_hold_cpu_ns; /* wall time (preemption included) and this thread's CPU time */
    double default_ttl;
    /* This process's lock word (layout.lock_word: client slot + 1 in the low
     * half, the slot's generation in the high half), built by lock.Client. */
    uint64_t me;
    PyObject *clock, *decode, *encode, *slow_key, *slow_read, *slow_write, *slow_set, *slow_add, *slow_replace, *slow_incr,
        *slow_delete, *sentinel;
} Core;

/* After close() (or while a callback into Python let another thread close the
 * cache) the mapping is gone: every entry point and every return from a
 * Python callback checks this before touching shared memory. */
#define CLOSED(c) ((c)->base == NULL)
/* Seqlock versions set parity instead of inverting it: a version left odd by
 * damage (one flipped bit) would otherwise be even while the next writer
 * mutates, and lock-free readers would take torn values for consistent ones.
 * Both always change the value, so a reader that straddles them retries. */
#define LOCKED_VERSION(v) (((v) + 1) | 1)
#define UNLOCKED_VERSION(v) (((v) + 2) & ~(uint64_t)1)
static PyObject *closed_error(void) {
    PyErr_SetString(PyExc_ValueError, "cache is closed");
    return NULL;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

#define BARRIER() __atomic_signal_fence(__ATOMIC_SEQ_CST)

static inline char *stripe_rec(Core *c, uint64_t s) { return c->base + c->stripe_off + s * STRIPE_SIZE; }
static inline char *slots_of(Core *c, uint64_t s) { return c->base + c->index_off + s * c->sps * SLOT_SIZE; }
static inline char *arena_of(Core *c, uint64_t s) { return c->base + c->arena_off + s * c->stripe_arena; }
static inline uint8_t *refs_of(Core *c, uint64_t s) { return (uint8_t *)(c->base + c->refs_off + s * c->sps); }
static inline uint64_t *counter(Core *c, int k) {
    return (uint64_t *)(c->base + c->client_off + c->client * c->client_rec + C_COUNTERS + 8 * k);
}
static inline uint64_t *lock_word(Core *c, uint64_t s) { return (uint64_t *)(stripe_rec(c, s) + S_LOCK); }
static inline uint64_t *u64at(char *p) { return (uint64_t *)p; }

static int get_now(Core *c, double *out) {
    if (c->clock == Py_None) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        *out = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        return 0;
    }
    PyObject *r = PyObject_CallNoArgs(c->clock);
    if (!r) return -1;
    *out = PyFloat_AsDouble(r);
    Py_DECREF(r);
    if (*out == -1.0 && PyErr_Occurred()) return -1;
    if (!isfinite(*out)) { /* NaN would make every deadline unreachable: keys that never expire */
        PyErr_Format(PyExc_ValueError, "the cache's clock returned %s; it must return finite seconds like time.time",
                     isnan(*out) ? "nan" : (*out > 0 ? "inf" : "-inf"));
        return -1;
    }
    return 0;
}

/* Encoded key: str -> UTF-8 (cached in the str), bytes -> 0xFF + bytes.
 * Returns 1 with (*p, *n) set, 0 if the Python path must handle the key
 * (other types, too long: it raises the right error), -1 on error. */
static int key_fast(Core *c, PyObject *key, const char **p, Py_ssize_t *n, char *stack) {
    if (PyUnicode_CheckExact(key)) {
        *p = PyUnicode_AsUTF8AndSize(key, n);
        if (!*p) { /* lone surrogate: the Python path raises a clear ValueError */
            PyErr_Clear();
            return 0;
        }
        return (uint64_t)*n <= c->max_key;
    }
    if (PyBytes_CheckExact(key)) {
        Py_ssize_t len = PyBytes_GET_SIZE(key);
        if ((uint64_t)len + 1 > c->max_key || len + 1 > KEY_STACK) return 0;
        stack[0] = (char)0xFF;
        memcpy(stack + 1, PyBytes_AS_STRING(key), len);
        *p = stack;
        *n = len + 1;
        return 1;
    }
    return 0;
}

/* The encoded key, from the fast path or from Python's encoder (other types,
 * too long: it raises the error users see). *owned is set when the bytes
 * belong to a new object the caller must release. 0 ok, -1 error. */
static int resolve_key(Core *c, PyObject *key, const char **k, Py_ssize_t *klen, char *stack, PyObject **owned) {
    int kf = key_fast(c, key, k, klen, stack);
    if (kf < 0) return -1;
    if (kf == 1) return 0;
    *owned = PyObject_CallOneArg(c->slow_key, key);
    if (!*owned) return -1;
    if (CLOSED(c)) { /* the encoder ran Python: another thread may have closed us */
        Py_CLEAR(*owned);
        closed_error();
        return -1;
    }
    *k = PyBytes_AS_STRING(*owned);
    *klen = PyBytes_GET_SIZE(*owned);
    return 0;
}

/* Probe stripe s for the key. Returns the slot index or -1, with the slot
 * and its entry header. The memory may be mid-write (lock-free readers):
 * every location is bounds-checked against the stripe's arena and the loop
 * is bounded; the caller validates with the seqlock. */
static int64_t probe(Core *c, uint64_t s, uint32_t tag, const char *k, Py_ssize_t klen, slot_t *out, ehdr_t *eh) {
    char *slots = slots_of(c, s);
    char *arena = arena_of(c, s);
    uint64_t sps = c->sps, i = tag % sps, lim = c->stripe_arena;
    for (uint64_t n = 0; n < sps; n++) {
        slot_t sl;
        memcpy(&sl, slots + i * SLOT_SIZE, SLOT_SIZE);
        if (sl.tag == 0) return -1;
        if (sl.tag == tag) {
            uint64_t o = (uint64_t)sl.loc * ALIGN;
            if (o + ENTRY_HDR + (uint64_t)klen <= lim) {
                ehdr_t h;
                memcpy(&h, arena + o, ENTRY_HDR);
                if (h.klen == klen && o + ENTRY_HDR + (uint64_t)klen + h.vlen <= lim &&
                    memcmp(arena + o + ENTRY_HDR, k, klen) == 0) {
                    *out = sl;
                    *eh = h;
                    return (int64_t)i;
                }
            }
        }
        if (++i == sps) i = 0;
    }
    return -1;
}

/* An entry's checksum field (layout.entry_checksum): the low 32 bits of the
 * xxh3-64 of its `n` bytes after the field. */
static inline uint32_t entry_sum(const char *a, size_t n) {
    return (uint32_t)xxh3(a + 4, n - 4);
}

/* Lock-free read. 1 found (value copied into *val), 0 absent (or an entry
 * whose checksum fails: damage is never returned as a value; check reports it
 * and a write of the key replaces it), 2 busy (a writer kept interfering:
 * caller takes the Python locked path), -1 error. */
static int read_core(Core *c, const char *k, Py_ssize_t klen, slot_t *sl, ehdr_t *eh, int64_t *ref_pos, int *ref,
                     PyObject **val) {
    uint64_t h = XXH3_64bits(k, (size_t)klen);
    uint64_t s = h & c->mask;
    uint32_t tag = (uint32_t)(h >> 32) | 1u;
    uint64_t *ver = u64at(stripe_rec(c, s) + S_VERSION);
    struct timespec deadline = {0, 0};
    for (int attempt = 0;; attempt++) {
        if (attempt >= READ_RETRIES) {
            /* A writer's critical section is ~0.1-10 us in C, longer on the
             * Python path (eviction, compaction): spin up to READ_SPIN_NS
             * before queueing on the stripe lock word. */
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            if (deadline.tv_sec == 0) {
                deadline = now;
                deadline.tv_nsec += READ_SPIN_NS;
                if (deadline.tv_nsec >= 1000000000L) {
                    deadline.tv_sec += 1;
                    deadline.tv_nsec -= 1000000000L;
                }
            } else if (now.tv_sec > deadline.tv_sec ||
                       (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec)) {
                break;
            }
        }
        uint64_t v1 = __atomic_load_n(ver, __ATOMIC_ACQUIRE);
        if (v1 & 1) {
            cpu_relax();
            continue;
        }
        int64_t i = probe(c, s, tag, k, klen, sl, eh);
        PyObject *v = NULL;
        int r = 0;
        uint32_t sum = 0;
        if (i >= 0) {
            const char *a = arena_of(c, s) + (uint64_t)sl->loc * ALIGN;
            v = PyBytes_FromStringAndSize(a + ENTRY_HDR + klen, eh->vlen);
            if (!v) return -1;
            /* The checksum of the entry in place, inside the read section: if
             * the version check below passes, these bytes were the copies'. */
            sum = entry_sum(a, ENTRY_HDR + (size_t)klen + eh->vlen);
            r = __atomic_load_n(refs_of(c, s) + i, __ATOMIC_RELAXED);
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(ver, __ATOMIC_RELAXED) == v1) {
            /* A mismatch now is damage, not a writer: never returned as a value. */
            if (i >= 0 && sum != eh->chk) {
                Py_DECREF(v);
                v = NULL;
                i = -1;
            }
            *ref_pos = i < 0 ? -1 : (int64_t)(c->refs_off + s * c->sps + (uint64_t)i);
            *ref = r;
            *val = v;
            return i >= 0;
        }
        Py_XDECREF(v);
    }
    return 2;
}

/* ---- writer side: lock, mutate, unlock (never blocks) ---------------- */

/* The stripe lock is one u64 word in the stripe record (layout.S_LOCK): 0
 * when free, else the holder's client slot + 1 (low half, with LOCK_WAITERS
 * set once somebody sleeps on it) and that slot's generation (high half).
 * Taking it is one compare-and-swap that writes who holds it, so there is no
 * instant at which the lock is held and its holder unknown: a holder killed
 * anywhere leaves either a free word or its own name, and "is it alive" is
 * the kernel's answer about its client slot (lock.client_alive). Waiters
 * sleep on the low half with futex(2), keyed by the shared file, so in any
 * process and any PID namespace. */
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "shmcache's lock words sleep on their low half, which is their first 4 bytes only on little-endian CPUs"
#endif
static inline void futex_wake(uint64_t *w, int n) {
    syscall(SYS_futex, (uint32_t *)w, FUTEX_WAKE, n, NULL, NULL, 0);
}

static inline void set_locked_version(Core *c, uint64_t s) {
    uint64_t *ver = u64at(stripe_rec(c, s) + S_VERSION);
    __atomic_store_n(ver, LOCKED_VERSION(__atomic_load_n(ver, __ATOMIC_RELAXED)), __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static int lock_fast(Core *c, uint64_t s) {
    uint64_t exp = 0;
    if (!__atomic_compare_exchange_n(lock_word(c, s), &exp, c->me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) return 0;
    set_locked_version(c, s);
    return 1;
}

/* Swaps the word to `to` only while it names us: one damaged by another
 * process stays as it is (a waiter finds its "holder" dead and recovers the
 * stripe) instead of us releasing somebody else's lock. Then wakes `wake`
 * sleepers if there were any (or `always`). */
static void hand_over(Core *c, uint64_t s, uint64_t to, int wake, int always) {
    uint64_t *w = lock_word(c, s);
    uint64_t old = __atomic_load_n(w, __ATOMIC_RELAXED);
    while ((old & ~(uint64_t)LOCK_WAITERS) == c->me)
        if (__atomic_compare_exchange_n(w, &old, to, 0, __ATOMIC_RELEASE, __ATOMIC_RELAXED)) {
            if (always || (old & LOCK_WAITERS)) futex_wake(w, wake);
            return;
        }
}

static void unlock_fast(Core *c, uint64_t s) {
    uint64_t *ver = u64at(stripe_rec(c, s) + S_VERSION);
    __atomic_store_n(ver, UNLOCKED_VERSION(__atomic_load_n(ver, __ATOMIC_RELAXED)), __ATOMIC_RELEASE);
    hand_over(c, s, 0, 1, 0);
}

static inline uint64_t alloc_of(uint64_t klen, uint64_t vlen) {
    return (ENTRY_HDR + klen + vlen + ALIGN - 1) & ~(uint64_t)(ALIGN - 1);
}

/* Header, key and value, checksum last; the slot that publishes the entry is
 * written after (see arena.py). */
static void write_entry(char *a, const char *k, Py_ssize_t klen, int flags, const char *v, Py_ssize_t vlen) {
    ehdr_t h = {0, (uint32_t)vlen, (uint16_t)klen, (uint8_t)flags, 0};
    memcpy(a, &h, ENTRY_HDR);
    memcpy(a + ENTRY_HDR, k, klen);
    memcpy(a + ENTRY_HDR + klen, v, vlen);
    BARRIER();
    uint32_t chk = entry_sum(a, (size_t)(ENTRY_HDR + klen + vlen));
    memcpy(a, &chk, 4);
}

/* ---- the segment ring (arena.py, step for step) ------------------------ */

typedef struct {
    uint32_t head, tail, fill;
} ring_t;

/* 0 ok, -1 out of range (a damaged stripe: the Python path repairs it). */
static inline uint32_t *seg_hdr(Core *c, uint64_t s, uint32_t seg) {
    return (uint32_t *)(arena_of(c, s) + (uint64_t)seg * c->seg_size); /* [end, mirrored fill, reclaim cursor] */
}

/* Arena._ring: the head's fill is the larger of the ring word's and the head
 * segment's mirror; a head that is sealed is damage. */
static int ring_get(Core *c, uint64_t s, ring_t *r) {
    uint64_t w = __atomic_load_n(u64at(stripe_rec(c, s) + S_RING), __ATOMIC_RELAXED);
    r->head = (uint32_t)(w & 0xFFFF);
    r->tail = (uint32_t)((w >> 16) & 0xFFFF);
    r->fill = (uint32_t)(w >> 32);
    if (r->fill == 0) r->fill = SEG_HEADER;
    if (!(r->head < c->n_segs && r->tail < c->n_segs && r->fill <= c->seg_size) || r->fill % ALIGN) return -1;
    uint32_t *h = seg_hdr(c, s, r->head);
    if (h[0]) return -1;
    if (h[1] > r->fill && h[1] <= c->seg_size && !(h[1] % ALIGN)) r->fill = h[1];
    return 0;
}

/* Arena._set_ring: the ring word, then the head segment's mirror of the fill. */
static void ring_set(Core *c, uint64_t s, uint32_t head, uint32_t tail, uint32_t fill) {
    BARRIER();
    __atomic_store_n(u64at(stripe_rec(c, s) + S_RING),
                     (uint64_t)head | ((uint64_t)tail << 16) | ((uint64_t)fill << 32), __ATOMIC_RELAXED);
    BARRIER();
    seg_hdr(c, s, head)[1] = fill;
    BARRIER();
}

/* Slot of the entry at `loc` (reclaim's liveness test), or -1. Bounded. */
static int64_t locate(Core *c, uint64_t s, uint32_t tag, uint32_t loc) {
    char *slots = slots_of(c, s);
    uint64_t sps = c->sps, i = tag % sps;
    for (uint64_t n = 0; n < sps; n++) {
        slot_t sl;
        memcpy(&sl, slots + i * SLOT_SIZE, SLOT_SIZE);
        if (sl.tag == 0) return -1;
        if (sl.tag == tag && sl.loc == loc) return (int64_t)i;
        if (++i == sps) i = 0;
    }
    return -1;
}

/* Backward-shift delete of slot i (lock held), access bits moving with their
 * slots, with accounting (alloc: the entry's arena bytes). Bounded by sps. */
static void drop_slot(Core *c, uint64_t s, uint64_t i, uint64_t alloc) {
    char *slots = slots_of(c, s);
    uint8_t *refs = refs_of(c, s);
    char *rec = stripe_rec(c, s);
    uint64_t sps = c->sps, j = i, k = i;
    for (uint64_t n = 1; n < sps; n++) { /* at most one lap, even with no empty slot */
        if (++k == sps) k = 0;
        uint32_t t;
        memcpy(&t, slots + k * SLOT_SIZE, 4);
        if (t == 0) break;
        uint64_t home = t % sps;
        if ((k + sps - home) % sps >= (k + sps - j) % sps) {
            memcpy(slots + j * SLOT_SIZE, slots + k * SLOT_SIZE, SLOT_SIZE);
            refs[j] = refs[k];
            j = k;
        }
    }
    memset(slots + j * SLOT_SIZE, 0, SLOT_SIZE);
    refs[j] = 0;
    uint64_t *items = u64at(rec + S_ITEMS), *live = u64at(rec + S_LIVE);
    *items = *items ? *items - 1 : 0;
    *live = *live > alloc ? *live - alloc : 0;
}

/* The arena bytes of the entry a slot points at (0 if out of bounds). */
static uint64_t slot_alloc(Core *c, uint64_t s, uint64_t i) {
    slot_t sl;
    memcpy(&sl, slots_of(c, s) + i * SLOT_SIZE, SLOT_SIZE);
    uint64_t o = (uint64_t)sl.loc * ALIGN;
    if (o + ENTRY_HDR > c->stripe_arena) return 0;
    ehdr_t h;
    memcpy(&h, arena_of(c, s) + o, ENTRY_HDR);
    uint64_t a = alloc_of(h.klen, h.vlen);
    return o + a <= c->stripe_arena ? a : 0;
}

/* Drop every slot pointing into segment `seg` (its walk met a torn header). */
static uint64_t drop_into(Core *c, uint64_t s, uint64_t seg) {
    uint64_t lo = seg * c->seg_size / ALIGN, hi = (seg + 1) * c->seg_size / ALIGN, n = 0;
    char *slots = slots_of(c, s);
    for (uint64_t i = 0, steps = 0; i < c->sps && steps < 2 * c->sps; steps++) {
        slot_t sl;
        memcpy(&sl, slots + i * SLOT_SIZE, SLOT_SIZE);
        if (sl.tag && sl.loc >= lo && sl.loc < hi) {
            drop_slot(c, s, i, slot_alloc(c, s, i));
            n++;
            continue; /* a later slot may have shifted into i */
        }
        i++;
    }
    return n;
}

/* Reclaim sealed segment `seg` (the tail): dead entries skipped, expired ones
 * dropped, accessed ones copied to the head while it keeps `keep_room` bytes
 * free (second chance, bit cleared), the rest evicted; then the tail moves
 * on. Work: one walk of at most seg_size bytes, one probe per entry. */
#define RECLAIM_AHEAD 8

static void reclaim_walk(Core *c, uint64_t s, uint32_t seg, uint64_t keep_room, double now, int second_chance,
                         uint64_t budget);

/* One reclaim (budget 0: to the segment's end) or one step of it (budget:
 * entries); with timing on, its CPU time (a syscall pair, so only here, not
 * around every write) goes into max_hold_cpu_ns. */
static void reclaim(Core *c, uint64_t s, uint32_t seg, uint64_t keep_room, double now, int second_chance,
                    uint64_t budget) {
    if (!c->timing) {
        reclaim_walk(c, s, seg, keep_room, now, second_chance, budget);
        return;
    }
    struct timespec u0, u1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &u0);
    reclaim_walk(c, s, seg, keep_room, now, second_chance, budget);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &u1);
    uint64_t cpu = (uint64_t)(u1.tv_sec - u0.tv_sec) * 1000000000ull + (uint64_t)(u1.tv_nsec - u0.tv_nsec);
    if (cpu > c->max_hold_cpu_ns) c->max_hold_cpu_ns = cpu;
}

/* Arena._pending: no free segment, or within RECLAIM_STEP items of the cap
 * (and a policy that evicts, and a tail that is not the head). */
static int pending(Core *c, uint64_t s, const ring_t *r) {
    if (r->head == r->tail || !c->evicts) return 0;
    if ((r->head + 1) % (uint32_t)c->n_segs == r->tail) return 1;
    return *u64at(stripe_rec(c, s) + S_ITEMS) >= c->cap_steps;
}

static void reclaim_walk(Core *c, uint64_t s, uint32_t seg, uint64_t keep_room, double now, int second_chance,
                         uint64_t budget) {
    char *arena = arena_of(c, s);
    char *base = arena + (uint64_t)seg * c->seg_size;
    char *slots = slots_of(c, s);
    uint8_t *refs = refs_of(c, s);
    uint32_t end, mirror; /* Arena._seg_end: the larger of the sealed end and the mirrored fill */
    memcpy(&end, base, 4);
    memcpy(&mirror, base + 4, 4);
    if (mirror > end) end = mirror;
    if (end < SEG_HEADER) end = SEG_HEADER;
    if (end > c->seg_size) end = (uint32_t)c->seg_size;
    /* Arena._cursor: resume at the stored cursor if plausible */
    uint32_t done;
    memcpy(&done, base + 8, 4);
    uint64_t start = (done >= SEG_HEADER && done <= end && !(done % ALIGN)) ? done : SEG_HEADER;
    uint64_t e = start, evicted = 0, expired = 0, nxt = 0;
    int torn = 0, cut = 0;
    /* roomy (arena.py Arena._roomy): a quarter of the in-use ring is dead and the
     * stripe is below its item cap: keep every live entry (a compaction). */
    char *rec = stripe_rec(c, s);
    /* (live <= 3/4 of it, without 4 * live wrapping for a damaged count; exact,
     * as seg_size is a multiple of 4) */
    int roomy = second_chance && *u64at(rec + S_ITEMS) < c->cap_items &&
                *u64at(rec + S_LIVE) <= 3 * (c->n_segs - 1) * (c->seg_size / 4);
    /* A scout walks up to RECLAIM_AHEAD entries ahead, hashing each key and
     * prefetching its home slot and access bit, so the index misses of one
     * reclaim overlap instead of queueing (the walk is the stripe's longest
     * lock hold). The segment being reclaimed does not change meanwhile:
     * copies go to the head, drops touch only the index. */
    uint64_t qe[RECLAIM_AHEAD], qh[RECLAIM_AHEAD], pe = start, scouted = 0;
    unsigned qn = 0, qi = 0;
    int scouting = 1;
    for (;;) {
        while (scouting && qn < RECLAIM_AHEAD) {
            if (pe + ENTRY_HDR > end) {
                scouting = 0;
                break;
            }
            ehdr_t ph;
            memcpy(&ph, base + pe, ENTRY_HDR);
            uint64_t pa = alloc_of(ph.klen, ph.vlen);
            if (ph.klen > c->max_key || ph.vlen > c->max_value || pe + pa > end) {
                torn = 1; /* an implausible header: the walk stops here */
                scouting = 0;
                break;
            }
            if (budget && scouted == budget) { /* the step ends here: the next one resumes at pe */
                cut = 1;
                nxt = pe;
                scouting = 0;
                break;
            }
            uint64_t ph_hash = XXH3_64bits(base + pe + ENTRY_HDR, ph.klen);
            uint64_t home = (((uint32_t)(ph_hash >> 32)) | 1u) % c->sps;
            __builtin_prefetch(slots + home * SLOT_SIZE);
            __builtin_prefetch(refs + home);
            unsigned at = (qi + qn) % RECLAIM_AHEAD;
            qe[at] = pe;
            qh[at] = ph_hash;
            qn++;
            scouted++;
            pe += pa;
        }
        if (qn == 0) break;
        e = qe[qi];
        uint64_t hh = qh[qi];
        qi = (qi + 1) % RECLAIM_AHEAD;
        qn--;
        ehdr_t h;
        memcpy(&h, base + e, ENTRY_HDR);
        uint64_t alloc = alloc_of(h.klen, h.vlen);
        uint32_t loc = (uint32_t)(((uint64_t)seg * c->seg_size + e) / ALIGN);
        int64_t i = locate(c, s, (uint32_t)(hh >> 32) | 1u, loc);
        if (i >= 0) {
            slot_t sl;
            memcpy(&sl, slots + (uint64_t)i * SLOT_SIZE, SLOT_SIZE);
            ring_t r;
            if (sl.expire != 0.0 && sl.expire <= now) {
                drop_slot(c, s, (uint64_t)i, alloc);
                expired++;
            } else if (second_chance && (refs[i] || roomy) && ring_get(c, s, &r) == 0 && r.fill + alloc + keep_room <= c->seg_size) {
                uint64_t dst = (uint64_t)r.head * c->seg_size + r.fill;
                memcpy(arena + dst, base + e, alloc);
                BARRIER();
                uint32_t nloc = (uint32_t)(dst / ALIGN);
                memcpy(slots + (uint64_t)i * SLOT_SIZE + SL_LOC, &nloc, 4); /* repoint */
                refs[i] = 0;
                ring_set(c, s, r.head, r.tail, r.fill + (uint32_t)alloc);
            } else {
                drop_slot(c, s, (uint64_t)i, alloc);
                evicted++;
            }
        }
    }
    if (torn) evicted += drop_into(c, s, seg);
    if (evicted) {
        *counter(c, CTR_EVICTIONS) += evicted;
        *u64at(stripe_rec(c, s) + S_EVICTIONS) += evicted;
    }
    if (expired) *counter(c, CTR_EXPIRATIONS) += expired;
    if (cut) {
        uint32_t cur = (uint32_t)nxt;
        memcpy(base + 8, &cur, 4);
        return;
    }
    ring_t r;
    if (ring_get(c, s, &r) == 0 && r.tail == seg) {
        /* the next tail's reclaim has not started: zero its cursor, then move on */
        uint32_t nt = (seg + 1) % (uint32_t)c->n_segs;
        seg_hdr(c, s, nt)[2] = 0;
        BARRIER();
        ring_set(c, s, r.head, nt, r.fill);
    }
}

/* Seal the head, move to the next (free) segment; if that was the last free
 * one, the tail's reclaim is pending (arena_alloc runs it in steps). -1: the
 * policy may not evict (Python path). */
static int advance(Core *c, uint64_t s, uint64_t need, double now) {
    ring_t r;
    if (ring_get(c, s, &r) < 0) return -1;
    uint32_t n = (uint32_t)c->n_segs, nxt = (r.head + 1) % n;
    if (nxt == r.tail) {
        /* No free segment: the tail's pending reclaim did not finish before the
         * head filled (or its writer died). Never make the tail the head:
         * finish that reclaim first (see Arena._advance). */
        if (!c->evicts) return -1;
        reclaim(c, s, r.tail, 0, now, 1, 0);
        if (ring_get(c, s, &r) < 0 || (r.head + 1) % n == r.tail) return -1;
    }
    int last = (nxt + 1) % n == r.tail;
    if (last && !c->evicts) return -1;
    /* open the next segment, move the ring onto it, then seal the old head */
    uint32_t *nh = seg_hdr(c, s, nxt);
    nh[0] = 0;
    nh[1] = SEG_HEADER;
    nh[2] = 0;
    ring_set(c, s, nxt, r.tail, SEG_HEADER);
    seg_hdr(c, s, r.head)[0] = r.fill;
    BARRIER();
    return 0;
}

/* Room for `need` bytes (+ one item if new_item) at the head: the offset in
 * the stripe arena, or -1 for the Python path (noeviction at a limit, or a
 * damaged ring). *moved: entries moved or went (slot positions are stale). */
static int64_t arena_alloc(Core *c, uint64_t s, uint64_t need, int new_item, double now, int *moved) {
    char *rec = stripe_rec(c, s);
    int reclaimed = 0; /* only the first item-cap reclaim of this call gives a second chance */
    int stepped = 0;   /* at most one incremental reclaim step per insert */
    for (int attempt = 0; attempt < 7; attempt++) {
        ring_t r;
        if (ring_get(c, s, &r) < 0) return -1;
        if (new_item && *u64at(rec + S_ITEMS) >= c->cap_items) {
            if (!c->evicts) return -1;
            *moved = 1;
            if (r.head == r.tail) {
                if (advance(c, s, need, now) < 0) return -1;
            } else {
                reclaim(c, s, r.tail, need, now, !reclaimed, 0);
                reclaimed = 1;
            }
            continue;
        }
        if (r.fill + need <= c->seg_size) {
            if (stepped || !pending(c, s, &r)) return (int64_t)((uint64_t)r.head * c->seg_size + r.fill);
            /* one step of the tail's pending reclaim, leaving the head room for this entry */
            reclaim(c, s, r.tail, need, now, 1, RECLAIM_STEP);
            stepped = 1;
            *moved = 1;
            continue;
        }
        if (advance(c, s, need, now) < 0) return -1;
        *moved = 1;
    }
    return -1;
}

static int64_t empty_from(Core *c, uint64_t s, uint32_t tag) {
    char *slots = slots_of(c, s);
    uint64_t sps = c->sps, pos = tag % sps;
    for (uint64_t n = 0; n < sps; n++) {
        uint32_t t;
        memcpy(&t, slots + pos * SLOT_SIZE, 4);
        if (t == 0) return (int64_t)pos;
        if (++pos == sps) pos = 0;
    }
    return -1;
}

/* Store under the held lock. 1 stored, 0 not stored (add/replace), 2 the
 * Python path must do it (noeviction at a limit, damaged stripe). */
static int write_locked(Core *c, uint64_t s, uint32_t tag, const char *k, Py_ssize_t klen, int flags,
                        const char *v, Py_ssize_t vlen, double expire, int mode, double now) {
    char *rec = stripe_rec(c, s);
    slot_t old;
    ehdr_t oh;
    int64_t i = probe(c, s, tag, k, klen, &old, &oh);
    if (i >= 0) {
        if (old.expire != 0.0 && old.expire <= now) {
            if (mode == MODE_REPLACE) return 0;
        } else if (mode == MODE_ADD) {
            return 0;
        }
    } else if (mode == MODE_REPLACE) {
        return 0;
    }
    uint64_t need = alloc_of((uint64_t)klen, (uint64_t)vlen);
    int moved = 0;
    int64_t off = arena_alloc(c, s, need, i < 0, now, &moved);
    if (off < 0) return 2;
    if (moved && i >= 0) i = probe(c, s, tag, k, klen, &old, &oh); /* reclaim may have moved or evicted it */
    write_entry(arena_of(c, s) + off, k, klen, flags, v, vlen);
    uint64_t pos;
    if (i >= 0) {
        pos = (uint64_t)i;
        uint64_t oa = alloc_of(oh.klen, oh.vlen), *live = u64at(rec + S_LIVE);
        *live = *live > oa ? *live - oa : 0;
    } else {
        int64_t e = empty_from(c, s, tag);
        if (e < 0) return 2; /* no empty slot: a damaged stripe (the load cap keeps a quarter free) */
        pos = (uint64_t)e;
        /* a new key starts without a second chance: an empty slot's access bit is 0 already */
        *u64at(rec + S_ITEMS) += 1;
    }
    slot_t sl = {tag, (uint32_t)((uint64_t)off / ALIGN), expire};
    BARRIER();
    memcpy(slots_of(c, s) + pos * SLOT_SIZE, &sl, SLOT_SIZE); /* publish */
    ring_t r;
    ring_get(c, s, &r);
    ring_set(c, s, r.head, r.tail, r.fill + (uint32_t)need);
    *u64at(rec + S_LIVE) += need;
    return 1;
}

/* ---- Python methods ---------------------------------------------------- */

static PyObject *decode_value(Core *c, int flags, PyObject *val) {
    switch (flags) {
    case FLAG_BYTES:
        Py_INCREF(val);
        return val;
    case FLAG_STR:
        return PyUnicode_DecodeUTF8(PyBytes_AS_STRING(val), PyBytes_GET_SIZE(val), "strict");
    case FLAG_INT:
        if (PyBytes_GET_SIZE(val) == 8) {
            int64_t x;
            memcpy(&x, PyBytes_AS_STRING(val), 8);
            return PyLong_FromLongLong(x);
        }
        break;
    case FLAG_FLOAT:
        if (PyBytes_GET_SIZE(val) == 8) {
            double d;
            memcpy(&d, PyBytes_AS_STRING(val), 8);
            return PyFloat_FromDouble(d);
        }
        break;
    }
    PyObject *f = PyLong_FromLong(flags);
    if (!f) return NULL;
    PyObject *r = PyObject_CallFunctionObjArgs(c->decode, f, val, NULL);
    Py_DECREF(f);
    return r;
}

/* Fetch (flags, value bytes, expire, access-bit offset, access bit) for an
 * encoded key, falling back to Python's locked read when writers keep
 * interfering. Returns 1 found, 0 absent, -1 error. */
static int fetch(Core *c, const char *k, Py_ssize_t klen, int *flags, PyObject **val, double *exp,
                 int64_t *pos, int *ref) {
    slot_t sl;
    ehdr_t eh;
    int r = read_core(c, k, klen, &sl, &eh, pos, ref, val);
    if (r == 1) {
        *flags = eh.flags;
        *exp = sl.expire;
        return 1;
    }
    if (r != 2) return r;
    PyObject *kb = PyBytes_FromStringAndSize(k, klen);
    if (!kb) return -1;
    PyObject *t = PyObject_CallOneArg(c->slow_read, kb);
    Py_DECREF(kb);
    if (!t) return -1;
    if (t == Py_None) {
        Py_DECREF(t);
        return 0;
    }
    PyObject *fv = NULL;
    long long p;
    if (!PyArg_ParseTuple(t, "iSdLi", flags, &fv, exp, &p, ref)) {
        Py_DECREF(t);
        return -1;
    }
    Py_INCREF(fv);
    *val = fv;
    *pos = p;
    Py_DECREF(t);
    return 1;
}

static int gather(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *const *names,
                  int n, PyObject **out);

static PyObject *Core_get(Core *c, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    static const char *const names[] = {"key", "default"};
    PyObject *a[2];
    if (!gather(args, PyVectorcall_NARGS(nargsf), kwnames, names, 2, a) || !a[0]) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    if (CLOSED(c)) return closed_error();
    PyObject *key = a[0], *dflt = a[1] ? a[1] : Py_None;
    char stack[KEY_STACK];
    const char *k;
    Py_ssize_t klen;
    PyObject *owned = NULL;
    if (resolve_key(c, key, &k, &klen, stack, &owned) < 0) return NULL;
    int flags, ref;
    PyObject *val = NULL;
    double exp, now;
    int64_t pos;
    int r = fetch(c, k, klen, &flags, &val, &exp, &pos, &ref);
    Py_XDECREF(owned);
    if (r < 0) return NULL;
    if (r == 1 && (get_now(c, &now) < 0 || CLOSED(c))) {
        Py_DECREF(val);
        return PyErr_Occurred() ? NULL : closed_error();
    }
    if (r == 0 || (exp != 0.0 && exp <= now)) {
        Py_XDECREF(val);
        *counter(c, CTR_MISSES) += 1;
        Py_INCREF(dflt);
        return dflt;
    }
    /* Access bit for second chance: stored only when clear, so a hot key read
     * by many processes does not bounce its cache line on every hit. Racy by
     * design (a hint): one byte, apart from the slot's fields. */
    if (!ref && pos >= 0) __atomic_store_n((uint8_t *)(c->base + pos), 1, __ATOMIC_RELAXED);
    *counter(c, CTR_HITS) += 1;
    PyObject *out = decode_value(c, flags, val);
    Py_DECREF(val);
    return out;
}

static PyObject *Core_read(Core *c, PyObject *kb) {
    if (!PyBytes_Check(kb)) {
        PyErr_SetString(PyExc_TypeError, "read(encoded_key: bytes)");
        return NULL;
    }
    if (CLOSED(c)) return closed_error();
    int flags, ref;
    PyObject *val = NULL;
    double exp;
    int64_t pos;
    int r = fetch(c, PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb), &flags, &val, &exp, &pos, &ref);
    if (r < 0) return NULL;
    if (r == 0) Py_RETURN_NONE;
    return Py_BuildValue("iNdLi", flags, val, exp, (long long)pos, ref);
}

/* Value -> (flags, ptr, len) for the raw types; 0 = let Python encode it. */
static int value_fast(PyObject *value, int *flags, const char **p, Py_ssize_t *n, char *scratch8) {
    if (PyBytes_CheckExact(value)) {
        *flags = FLAG_BYTES;
        *p = PyBytes_AS_STRING(value);
        *n = PyBytes_GET_SIZE(value);
        return 1;
    }
    if (PyUnicode_CheckExact(value)) {
        *flags = FLAG_STR;
        *p = PyUnicode_AsUTF8AndSize(value, n);
        if (!*p) {
            PyErr_Clear();
            return 0;
        }
        return 1;
    }
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow || (x == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        int64_t y = x;
        memcpy(scratch8, &y, 8);
        *flags = FLAG_INT;
        *p = scratch8;
        *n = 8;
        return 1;
    }
    if (PyFloat_CheckExact(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        memcpy(scratch8, &d, 8);
        *flags = FLAG_FLOAT;
        *p = scratch8;
        *n = 8;
        return 1;
    }
    return 0;
}

/* ttl argument -> absolute deadline. 1 ok, 0 let Python handle (it raises). */
static int deadline_fast(Core *c, PyObject *ttl, double now, double *expire) {
    double t;
    if (ttl == c->sentinel) {
        t = c->default_ttl;
        *expire = t > 0 ? now + t : 0.0;
        return 1;
    }
    if (ttl == Py_None) {
        *expire = 0.0;
        return 1;
    }
    if (PyFloat_CheckExact(ttl))
        t = PyFloat_AS_DOUBLE(ttl);
    else if (PyLong_CheckExact(ttl)) {
        t = PyLong_AsDouble(ttl);
        if (t == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return 0;
        }
    } else
        return 0;
    if (!(t > 0) || isinf(t)) return 0;
    *expire = now + t;
    return 1;
}

/* Gather positional + keyword arguments into out[0..n) by parameter name.
 * Returns 1, or 0 if anything is off (unknown or repeated name, too many):
 * the Python path then raises the proper TypeError. Missing ones stay NULL. */
static int gather(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *const *names,
                  int n, PyObject **out) {
    if (nargs > n) return 0;
    for (int i = 0; i < n; i++) out[i] = i < nargs ? args[i] : NULL;
    if (!kwnames) return 1;
    Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t j = 0; j < nkw; j++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, j);
        int found = 0;
        for (int i = 0; i < n; i++) {
            if (PyUnicode_CompareWithASCIIString(kw, names[i]) == 0) {
                if (out[i]) return 0;
                out[i] = args[nargs + j];
                found = 1;
                break;
            }
        }
        if (!found) return 0;
    }
    return 1;
}

/* The rest of a store on the Python path (it waits for the lock, recovers a
 * dead holder, reclaims, evicts, compacts): the key and value are already
 * encoded and checked and the deadline computed, so nothing is done twice. */
static PyObject *handoff(Core *c, const char *k, Py_ssize_t klen, int flags, const char *v, Py_ssize_t vlen,
                         double expire, int mode) {
    PyObject *kb = PyBytes_FromStringAndSize(k, klen);
    PyObject *vb = kb ? PyBytes_FromStringAndSize(v, vlen) : NULL;
    PyObject *res = vb ? PyObject_CallFunction(c->slow_write, "OiOdi", kb, flags, vb, expire, mode) : NULL;
    Py_XDECREF(kb);
    Py_XDECREF(vb);
    if (res == Py_True && !CLOSED(c)) *counter(c, CTR_SETS) += 1;
    return res;
}

static PyObject *store(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int mode) {
    /* set/add/replace(key, value, ttl=DEFAULT) */
    static const char *const names[] = {"key", "value", "ttl"};
    PyObject *a[3];
    if (!gather(args, nargs, kwnames, names, 3, a) || !a[0] || !a[1]) goto slow;
    if (CLOSED(c)) return closed_error();
    PyObject *key = a[0], *value = a[1], *ttl = a[2] ? a[2] : c->sentinel;
    char stack[KEY_STACK], scratch[8];
    const char *k, *v;
    Py_ssize_t klen, vlen;
    int flags;
    int kf = key_fast(c, key, &k, &klen, stack);
    if (kf < 0) return NULL;
    if (kf == 0) goto slow;
    PyObject *encoded = NULL; /* (flags, payload) from the codec: pickle, numpy, serializer */
    if (!value_fast(value, &flags, &v, &vlen, scratch)) {
        encoded = PyObject_CallOneArg(c->encode, value); /* before any lock: it runs Python */
        if (!encoded) return NULL;
        PyObject *payload;
        if (!PyTuple_Check(encoded) || PyTuple_GET_SIZE(encoded) != 2 ||
            !PyBytes_Check(payload = PyTuple_GET_ITEM(encoded, 1))) {
            Py_DECREF(encoded);
            goto slow;
        }
        flags = (int)PyLong_AsLong(PyTuple_GET_ITEM(encoded, 0));
        if (flags == -1 && PyErr_Occurred()) {
            Py_DECREF(encoded);
            return NULL;
        }
        v = PyBytes_AS_STRING(payload);
        vlen = PyBytes_GET_SIZE(payload);
    }
    double now, expire;
    if ((uint64_t)vlen > c->max_value || get_now(c, &now) < 0 || !deadline_fast(c, ttl, now, &expire)) {
        Py_XDECREF(encoded);
        if (PyErr_Occurred()) return NULL;
        goto slow;
    }
    if (CLOSED(c)) { /* the encoder or the clock ran Python: another thread may have closed us */
        Py_XDECREF(encoded);
        return closed_error();
    }
    uint64_t h = XXH3_64bits(k, (size_t)klen);
    uint64_t s = h & c->mask;
    int r = 2;
    if (lock_fast(c, s)) {
        struct timespec t0, t1;
        if (c->timing) clock_gettime(CLOCK_MONOTONIC, &t0);
        r = write_locked(c, s, (uint32_t)(h >> 32) | 1u, k, klen, flags, v, vlen, expire, mode, now);
        if (c->timing) {
            clock_gettime(CLOCK_MONOTONIC, &t1);
            uint64_t ns = (uint64_t)(t1.tv_sec - t0.tv_sec) * 1000000000ull + (uint64_t)(t1.tv_nsec - t0.tv_nsec);
            if (ns > c->max_hold_ns) c->max_hold_ns = ns;
        }
        unlock_fast(c, s);
    }
    if (r == 2) { /* busy lock, noeviction at a limit, damage: hand the checked, encoded entry to Table.write */
        PyObject *res = handoff(c, k, klen, flags, v, vlen, expire, mode);
        Py_XDECREF(encoded);
        return res;
    }
    Py_XDECREF(encoded);
    if (r == 0) Py_RETURN_FALSE;
    *counter(c, CTR_SETS) += 1;
    Py_RETURN_TRUE;
slow:
    return PyObject_Vectorcall(mode == MODE_SET ? c->slow_set : mode == MODE_ADD ? c->slow_add : c->slow_replace,
                               args, nargs, kwnames);
}

static PyObject *Core_set(Core *c, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    return store(c, args, PyVectorcall_NARGS(nargsf), kwnames, MODE_SET);
}

static PyObject *Core_add(Core *c, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    return store(c, args, PyVectorcall_NARGS(nargsf), kwnames, MODE_ADD);
}

static PyObject *Core_replace(Core *c, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    return store(c, args, PyVectorcall_NARGS(nargsf), kwnames, MODE_REPLACE);
}

static PyObject *Core_delete(Core *c, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    static const char *const names[] = {"key"};
    PyObject *a[1];
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (!gather(args, nargs, kwnames, names, 1, a) || !a[0])
        return PyObject_Vectorcall(c->slow_delete, args, nargs, kwnames);
    if (CLOSED(c)) return closed_error();
    PyObject *key = a[0];
    char stack[KEY_STACK];
    const char *k;
    Py_ssize_t klen;
    int kf = key_fast(c, key, &k, &klen, stack);
    if (kf < 0) return NULL;
    if (kf == 0) return PyObject_CallOneArg(c->slow_delete, key);
    double now;
    if (get_now(c, &now) < 0) return NULL;
    if (CLOSED(c)) return closed_error();
    uint64_t h = XXH3_64bits(k, (size_t)klen);
    uint64_t s = h & c->mask;
    if (!lock_fast(c, s)) return PyObject_CallOneArg(c->slow_delete, key);
    slot_t sl;
    ehdr_t eh;
    int64_t i = probe(c, s, (uint32_t)(h >> 32) | 1u, k, klen, &sl, &eh);
    int live = 0;
    if (i >= 0) {
        live = !(sl.expire != 0.0 && sl.expire <= now);
        drop_slot(c, s, (uint64_t)i, alloc_of(eh.klen, eh.vlen));
    }
    unlock_fast(c, s);
    if (i >= 0) *counter(c, live ? CTR_DELETES : CTR_EXPIRATIONS) += 1;
    return PyBool_FromLong(live);
}

static PyObject *Core_incr(Core *c, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    /* incr(key, delta=1, default=0, ttl=None): fast only for the plain cases */
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    static const char *const names[] = {"key", "delta", "default", "ttl"};
    PyObject *a[4];
    if (!gather(args, nargs, kwnames, names, 4, a) || !a[0]) goto slow;
    if (CLOSED(c)) return closed_error();
    PyObject *key = a[0];
    long long delta = 1, dflt = 0;
    int have_default = 1, overflow = 0;
    if (a[1]) {
        if (!PyLong_CheckExact(a[1])) goto slow;
        delta = PyLong_AsLongLongAndOverflow(a[1], &overflow);
        if (overflow || (delta == -1 && PyErr_Occurred())) goto slow_clear;
    }
    if (a[2]) {
        if (a[2] == Py_None)
            have_default = 0;
        else if (!PyLong_CheckExact(a[2]))
            goto slow;
        else {
            dflt = PyLong_AsLongLongAndOverflow(a[2], &overflow);
            if (overflow || (dflt == -1 && PyErr_Occurred())) goto slow_clear;
        }
    }
    char stack[KEY_STACK];
    const char *k;
    Py_ssize_t klen;
    int kf = key_fast(c, key, &k, &klen, stack);
    if (kf < 0) return NULL;
    if (kf == 0) goto slow;
    double now, expire = 0.0;
    if (get_now(c, &now) < 0) return NULL;
    if (CLOSED(c)) return closed_error();
    if (a[3] && !deadline_fast(c, a[3], now, &expire)) goto slow;
    uint64_t h = XXH3_64bits(k, (size_t)klen);
    uint64_t s = h & c->mask;
    uint32_t tag = (uint32_t)(h >> 32) | 1u;
    if (!lock_fast(c, s)) goto slow;
    slot_t sl;
    ehdr_t eh;
    int64_t i = probe(c, s, tag, k, klen, &sl, &eh);
    long long result;
    if (i >= 0 && !(sl.expire != 0.0 && sl.expire <= now)) {
        if (eh.flags != FLAG_INT || eh.vlen != 8) {
            unlock_fast(c, s);
            goto slow; /* TypeError or a big int: Python handles it */
        }
        char *a = arena_of(c, s) + (uint64_t)sl.loc * ALIGN;
        int64_t cur;
        memcpy(&cur, a + ENTRY_HDR + klen, 8);
        if (__builtin_add_overflow((long long)cur, delta, &result)) {
            unlock_fast(c, s);
            goto slow;
        }
        int64_t nv = result;
        memcpy(a + ENTRY_HDR + klen, &nv, 8);
        BARRIER();
        uint32_t chk = entry_sum(a, (size_t)(ENTRY_HDR + klen + 8));
        memcpy(a, &chk, 4);
        uint8_t *ref = refs_of(c, s) + i; /* an update in place is an access (see table.incr) */
        if (!*ref) *ref = 1;
    } else {
        if (!have_default || __builtin_add_overflow(dflt, delta, &result)) {
            unlock_fast(c, s);
            goto slow;
        }
        int64_t nv = result;
        int r = write_locked(c, s, tag, k, klen, FLAG_INT, (const char *)&nv, 8, expire, MODE_SET, now);
        if (r != 1) {
            unlock_fast(c, s);
            goto slow;
        }
    }
    unlock_fast(c, s);
    *counter(c, CTR_SETS) += 1;
    return PyLong_FromLongLong(result);
slow_clear:
    PyErr_Clear();
slow:
    return PyObject_Vectorcall(c->slow_incr, args, nargs, kwnames);
}

static PyObject *Core_contains(Core *c, PyObject *key) {
    if (CLOSED(c)) return closed_error();
    char stack[KEY_STACK];
    const char *k;
    Py_ssize_t klen;
    PyObject *owned = NULL;
    if (resolve_key(c, key, &k, &klen, stack, &owned) < 0) return NULL;
    int flags, ref;
    PyObject *val = NULL;
    double exp, now = 0;
    int64_t pos;
    int r = fetch(c, k, klen, &flags, &val, &exp, &pos, &ref);
    Py_XDECREF(owned);
    Py_XDECREF(val);
    if (r < 0) return NULL;
    if (r == 0) Py_RETURN_FALSE;
    if (exp != 0.0) {
        if (get_now(c, &now) < 0) return NULL;
        if (exp <= now) Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *Core_set_identity(Core *c, PyObject *args) {
    unsigned long long client, me;
    if (!PyArg_ParseTuple(args, "KK", &client, &me)) return NULL;
    c->client = client;
    c->me = me;
    Py_RETURN_NONE;
}

/* release(): drop the buffer export so the mapping can be unmapped. A
 * thread of this process may be asleep in Core.lock (GIL released, holding
 * nothing) while another closes the cache: it wakes within its slice, sees
 * CLOSED and raises without touching the mapping. */
static void release_view(Core *c) {
    if (c->has_view) {
        PyBuffer_Release(&c->view);
        c->has_view = 0;
    }
    c->base = NULL;
}


static PyObject *Core_release(Core *c, PyObject *unused) {
    release_view(c);
    Py_RETURN_NONE;
}

/* ---- the lock protocol for the Python paths -----------------------------
 * lock.py used to do its lock steps as separate Python statements; a signal
 * handler raising between two of them (Ctrl-C, gunicorn's SIGABRT ->
 * sys.exit) could leak a held stripe. Here each of lock/unlock/take is one C
 * call: Python code (signal handlers included) cannot run inside it except
 * while waiting, when nothing is held yet. */

static int stripe_arg(Core *c, unsigned long long s) {
    if (CLOSED(c)) {
        closed_error();
        return 0;
    }
    if (s > c->mask) {
        PyErr_SetString(PyExc_IndexError, "stripe out of range");
        return 0;
    }
    return 1;
}

/* Waits sleep on the futex with a relative timeout, which the kernel measures
 * on CLOCK_MONOTONIC: a wall-clock step never lengthens a lock wait. */
static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* lock(stripe, timeout): take the stripe within timeout seconds. Sleepers
 * set LOCK_WAITERS in the word so that its release wakes one of them
 * (Drepper, "Futexes are tricky", mutex2): whoever takes the lock after a
 * sleep keeps the flag set, as others may still sleep. */
static PyObject *Core_lock(Core *c, PyObject *args) {
    unsigned long long s;
    double timeout;
    if (!PyArg_ParseTuple(args, "Kd", &s, &timeout) || !stripe_arg(c, s)) return NULL;
    if (lock_fast(c, s)) Py_RETURN_TRUE;
    if (!(timeout > 0)) Py_RETURN_FALSE; /* a try only: lock.StripeLocks times the wait it starts next */
    double deadline = mono_now() + timeout;
    for (;;) {
        /* Checked before every try, a failed compare-and-swap included: a
         * word that another process keeps changing must not hold us (and the
         * GIL) past the deadline. */
        double left = deadline - mono_now();
        if (left <= 0) Py_RETURN_FALSE;
        uint64_t *w = lock_word(c, s);
        uint64_t v = __atomic_load_n(w, __ATOMIC_RELAXED);
        if (v == 0) {
            if (__atomic_compare_exchange_n(w, &v, c->me | LOCK_WAITERS, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) break;
            continue;
        }
        if (!(v & LOCK_WAITERS)) {
            if (!__atomic_compare_exchange_n(w, &v, v | LOCK_WAITERS, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) continue;
            v |= LOCK_WAITERS;
        }
        struct timespec rel;
        rel.tv_sec = (time_t)left;
        rel.tv_nsec = (long)((left - (double)rel.tv_sec) * 1e9);
        long r;
        int err;
        Py_BEGIN_ALLOW_THREADS
        r = syscall(SYS_futex, (uint32_t *)w, FUTEX_WAIT, (uint32_t)v, &rel, NULL, 0);
        err = errno;
        Py_END_ALLOW_THREADS
        if (CLOSED(c)) return closed_error(); /* closed by another thread meanwhile; we hold nothing */
        if (r != 0 && err == EINTR && PyErr_CheckSignals() < 0) return NULL; /* PEP 475: retry unless a handler raised */
        if (r != 0 && err != EINTR && err != EAGAIN && err != ETIMEDOUT) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    set_locked_version(c, s);
    Py_RETURN_TRUE;
}

static PyObject *Core_unlock(Core *c, PyObject *arg) {
    unsigned long long s = PyLong_AsUnsignedLongLong(arg);
    if ((s == (unsigned long long)-1 && PyErr_Occurred()) || !stripe_arg(c, s)) return NULL;
    unlock_fast(c, s);
    Py_RETURN_NONE;
}

/* take(stripe, word) -> bool: a recoverer takes over a stripe whose lock word
 * still reads `word` (a dead holder's): one compare-and-swap, so of several
 * recoverers exactly one wins, and none if the word moved meanwhile. The
 * winner holds the stripe (version odd) and repairs it. */
static PyObject *Core_take(Core *c, PyObject *args) {
    unsigned long long s, word;
    if (!PyArg_ParseTuple(args, "KK", &s, &word) || !stripe_arg(c, s)) return NULL;
    uint64_t exp = word;
    if (exp == 0 || !__atomic_compare_exchange_n(lock_word(c, s), &exp, c->me | LOCK_WAITERS, 0, __ATOMIC_ACQUIRE,
                                                  __ATOMIC_RELAXED))
        Py_RETURN_FALSE;
    set_locked_version(c, s);
    Py_RETURN_TRUE;
}

/* abandon(stripe): a recoverer whose repair failed (an exception in the
 * middle of it) hands the stripe on as still broken: the version stays odd
 * and the word, if it names us, becomes one that names no client, so the
 * next writer or the daemon takes it over and repairs it again. Every
 * sleeper is woken to find that out. */
static PyObject *Core_abandon(Core *c, PyObject *arg) {
    unsigned long long s = PyLong_AsUnsignedLongLong(arg);
    if ((s == (unsigned long long)-1 && PyErr_Occurred()) || !stripe_arg(c, s)) return NULL;
    hand_over(c, s, LOCK_WAITERS, INT32_MAX, 1);
    Py_RETURN_NONE;
}

static int Core_init(Core *c, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"buffer", "n_stripes", "sps", "stripe_off", "index_off", "arena_off",
                             "stripe_arena", "client_off", "client_rec", "client", "max_key",
                             "max_value", "cap_items", "refs_off", "seg_size", "evicts", "me",
                             "clock", "decode", "encode",
                             "slow_key", "slow_read", "slow_write", "slow_set", "slow_add", "slow_replace", "slow_incr", "slow_delete",
                             "sentinel", "default_ttl", NULL};
    PyObject *buffer;
    unsigned long long n_stripes;
    if (c->has_view || c->clock) { /* before parsing: it writes into the fields */
        PyErr_SetString(PyExc_RuntimeError, "Core is already initialized");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(
            args, kw, "OKKKKKKKKKKKKKKpKOOOOOOOOOOOOd", kwlist, &buffer, &n_stripes, &c->sps, &c->stripe_off,
            &c->index_off, &c->arena_off, &c->stripe_arena, &c->client_off, &c->client_rec, &c->client,
            &c->max_key, &c->max_value, &c->cap_items, &c->refs_off, &c->seg_size, &c->evicts, &c->me,
            &c->clock, &c->decode, &c->encode,
            &c->slow_key, &c->slow_read, &c->slow_write, &c->slow_set, &c->slow_add, &c->slow_replace, &c->slow_incr,
            &c->slow_delete, &c->sentinel, &c->default_ttl))
        return -1;
#define INCREF_FIELD(f) Py_INCREF(c->f);
    CORE_OBJECTS(INCREF_FIELD) /* owned from here on */
#undef INCREF_FIELD
    if (n_stripes == 0 || (n_stripes & (n_stripes - 1))) {
        PyErr_SetString(PyExc_ValueError, "n_stripes must be a power of two");
        return -1;
    }
    c->mask = n_stripes - 1;
    if (c->seg_size < 1024 || c->stripe_arena % c->seg_size || c->stripe_arena / c->seg_size < 4 ||
        c->stripe_arena / c->seg_size > 65535 || c->sps == 0) {
        PyErr_SetString(PyExc_ValueError, "segment geometry out of range");
        return -1;
    }
    c->n_segs = c->stripe_arena / c->seg_size;
    if (c->n_segs == 0) {
        PyErr_SetString(PyExc_ValueError, "a stripe arena holds no segment");
        return -1;
    }
    { /* Arena.cap_steps: computed once, not a division per insert */
        uint64_t per_seg = c->cap_items / c->n_segs;
        c->cap_steps = c->cap_items - (per_seg < RECLAIM_STEP ? per_seg : RECLAIM_STEP);
    }
    if (PyObject_GetBuffer(buffer, &c->view, PyBUF_WRITABLE) < 0) return -1;
    c->has_view = 1;
    c->base = c->view.buf;
    return 0;
}

/* Core holds bound methods of its Cache (the slow paths), and the Cache holds
 * the Core: a cycle, so Core takes part in garbage collection. */
static int Core_traverse(Core *c, visitproc visit, void *arg) {
#define VISIT_FIELD(f) Py_VISIT(c->f);
    CORE_OBJECTS(VISIT_FIELD)
#undef VISIT_FIELD
    return 0;
}

static int Core_clear(Core *c) {
#define CLEAR_FIELD(f) Py_CLEAR(c->f);
    CORE_OBJECTS(CLEAR_FIELD)
#undef CLEAR_FIELD
    return 0;
}

static void Core_dealloc(Core *c) {
    PyObject_GC_UnTrack(c);
    release_view(c);
    Core_clear(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyObject *Core_get_default_ttl(Core *c, void *unused) { return PyFloat_FromDouble(c->default_ttl); }
static int Core_set_default_ttl(Core *c, PyObject *v, void *unused) {
    double d = PyFloat_AsDouble(v);
    if (d == -1.0 && PyErr_Occurred()) return -1;
    c->default_ttl = d;
    return 0;
}

static PyObject *Core_get_timing(Core *c, void *unused) { return PyBool_FromLong(c->timing); }
static int Core_set_timing(Core *c, PyObject *v, void *unused) {
    int t = PyObject_IsTrue(v);
    if (t < 0) return -1;
    c->timing = t;
    return 0;
}

/* Plain counters, settable (a benchmark resets them): members, not getters. */
static PyMemberDef Core_members[] = {
    {"max_hold_ns", T_ULONGLONG, offsetof(Core, max_hold_ns), 0,
     "longest stripe-lock hold of a C write path (reclaim included) while timing was on, ns of wall time "
     "(a preempted holder included); settable"},
    {"max_hold_cpu_ns", T_ULONGLONG, offsetof(Core, max_hold_cpu_ns), 0,
     "longest segment reclaim (the bulk of the longest holds) in the holder's own CPU time, ns: the work "
     "done under the lock, preemption excluded; settable"},
    {NULL}};

static PyGetSetDef Core_getset[] = {
    {"default_ttl", (getter)Core_get_default_ttl, (setter)Core_set_default_ttl,
     "seconds used when set() gets no ttl; 0 = never expire", NULL},
    {"timing", (getter)Core_get_timing, (setter)Core_set_timing,
     "measure the stripe-lock holds of the C write paths (off by default: two clock reads per write)", NULL},
    {NULL}};

static PyMethodDef Core_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Core_get, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None): the value, or default if absent or expired."},
    {"read", (PyCFunction)Core_read, METH_O,
     "read(encoded_key) -> (flags, value_bytes, expire, ref_offset, ref) or None."},
    {"set", (PyCFunction)(void (*)(void))Core_set, METH_FASTCALL | METH_KEYWORDS,
     "set(key, value, ttl=DEFAULT) -> True."},
    {"add", (PyCFunction)(void (*)(void))Core_add, METH_FASTCALL | METH_KEYWORDS,
     "add(key, value, ttl=DEFAULT) -> True if stored (the key was absent or expired)."},
    {"replace", (PyCFunction)(void (*)(void))Core_replace, METH_FASTCALL | METH_KEYWORDS,
     "replace(key, value, ttl=DEFAULT) -> True if stored (the key was present)."},
    {"incr", (PyCFunction)(void (*)(void))Core_incr, METH_FASTCALL | METH_KEYWORDS,
     "incr(key, delta=1, default=0, ttl=None) -> new value."},
    {"delete", (PyCFunction)(void (*)(void))Core_delete, METH_FASTCALL | METH_KEYWORDS,
     "delete(key) -> True if a live key was removed."},
    {"contains", (PyCFunction)Core_contains, METH_O, "contains(key) -> bool."},
    {"set_identity", (PyCFunction)Core_set_identity, METH_VARARGS,
     "set_identity(client, me): after fork, use this client slot and lock word (layout.lock_word)."},
    {"release", (PyCFunction)Core_release, METH_NOARGS, "Drop the buffer export (the cache is closed)."},
    {"lock", (PyCFunction)Core_lock, METH_VARARGS,
     "lock(stripe, timeout) -> True when held (lock word names us, version odd), False on timeout "
     "(timeout <= 0: one try, no wait)."},
    {"unlock", (PyCFunction)Core_unlock, METH_O, "unlock(stripe): version even, lock word freed, a sleeper woken."},
    {"abandon", (PyCFunction)Core_abandon, METH_O,
     "abandon(stripe): after a failed repair, leave the stripe to the next recoverer (version odd, word naming nobody)."},
    {"take", (PyCFunction)Core_take, METH_VARARGS,
     "take(stripe, word) -> True if the lock word still read `word` and now names us (version odd)."},
    {NULL}};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmcache._speedups.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
    .tp_members = Core_members,
    .tp_doc = "The C fast paths over one attached segment (see shmcache/_speedups.c).",
};

static PyObject *mod_xxh3(PyObject *m, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t h = xxh3(b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(h);
}

/* entry_sums(buffer, offsets, checksums): for each u64 offset of an entry in
 * `buffer` (repair.py's vectorized scan), 16 bytes: the xxh3-64 of its key and
 * (if `checksums`, else 0) the checksum its checksum field should hold, then a u32
 * that is 1 if the entry's header or bytes fall outside the buffer (then the
 * sums are 0). Bounds are checked here too: the offsets and headers come from
 * an untrusted segment. */
static PyObject *mod_entry_sums(PyObject *m, PyObject *args) {
    Py_buffer b, o;
    int checksums = 1;
    if (!PyArg_ParseTuple(args, "y*y*|p", &b, &o, &checksums)) return NULL;
    Py_ssize_t n = o.len / 8;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 16);
    if (out != NULL) {
        char *w = PyBytes_AS_STRING(out);
        const char *buf = (const char *)b.buf;
        uint64_t len = (uint64_t)b.len;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t off, h = 0;
            uint32_t chk = 0, bad = 1;
            memcpy(&off, (const char *)o.buf + i * 8, 8);
            if (off <= len && len - off >= ENTRY_HDR) {
                ehdr_t eh;
                memcpy(&eh, buf + off, ENTRY_HDR);
                uint64_t total = (uint64_t)ENTRY_HDR + eh.klen + eh.vlen;
                if (len - off >= total) {
                    h = XXH3_64bits(buf + off + ENTRY_HDR, eh.klen);
                    if (checksums) chk = entry_sum(buf + off, (size_t)total);
                    bad = 0;
                }
            }
            memcpy(w + i * 16, &h, 8);
            memcpy(w + i * 16 + 8, &chk, 4);
            memcpy(w + i * 16 + 12, &bad, 4);
        }
    }
    PyBuffer_Release(&b);
    PyBuffer_Release(&o);
    return out;
}

/* chain_walk(buffer, base, end, max_key, max_value) -> (offsets, stop): walk
 * the entries of the segment at `base` of `buffer` from its header as a
 * reclaim does (repair.py Repair._chain, step for step): `offsets` packs the
 * u32 segment offset of each entry on the chain, `stop` is where the walk
 * stopped (`end` exactly when the chain is whole). The lengths come from an
 * untrusted segment: the walk stays inside [base, base + end). */
static PyObject *mod_chain_walk(PyObject *m, PyObject *args) {
    Py_buffer b;
    unsigned long long base, end;
    unsigned long max_key, max_value;
    if (!PyArg_ParseTuple(args, "y*KKkk", &b, &base, &end, &max_key, &max_value)) return NULL;
    if (base > (unsigned long long)b.len || end > (unsigned long long)b.len - base || end > UINT32_MAX) {
        PyBuffer_Release(&b);
        return PyErr_Format(PyExc_ValueError, "chain_walk: segment [%llu, +%llu) outside the buffer", base, end);
    }
    const char *seg = (const char *)b.buf + base;
    size_t cap = 64, n = 0;
    uint32_t *out = PyMem_Malloc(cap * sizeof(uint32_t));
    if (!out) {
        PyBuffer_Release(&b);
        return PyErr_NoMemory();
    }
    uint64_t e = SEG_HEADER;
    while (e + ENTRY_HDR <= end) {
        ehdr_t eh;
        memcpy(&eh, seg + e, ENTRY_HDR);
        uint64_t alloc = ((uint64_t)ENTRY_HDR + eh.klen + eh.vlen + ALIGN - 1) & ~(uint64_t)(ALIGN - 1);
        if (eh.klen > max_key || eh.vlen > max_value || e + alloc > end) break;
        if (n == cap) {
            uint32_t *bigger = PyMem_Realloc(out, 2 * cap * sizeof(uint32_t));
            if (!bigger) {
                PyMem_Free(out);
                PyBuffer_Release(&b);
                return PyErr_NoMemory();
            }
            out = bigger;
            cap *= 2;
        }
        out[n++] = (uint32_t)e;
        e += alloc;
    }
    PyBuffer_Release(&b);
    PyObject *r = Py_BuildValue("(y#K)", (const char *)out, (Py_ssize_t)(n * sizeof(uint32_t)), (unsigned long long)e);
    PyMem_Free(out);
    return r;
}

/* fd_private(fd, uid) -> bool: is the open file still owned by uid with no
 * group or other write bit? One fstat, no stat_result object: it runs before
 * every full unpickle (Segment.still_private), where os.fstat + os.geteuid
 * cost ~1.9 us on a VM whose syscalls are slow, and this ~0.5 us. */
static PyObject *mod_fd_private(PyObject *self, PyObject *args) {
    int fd;
    unsigned long uid;
    if (!PyArg_ParseTuple(args, "ik", &fd, &uid)) return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(st.st_uid == (uid_t)uid && !(st.st_mode & 022));
}

static PyMethodDef mod_methods[] = {
    {"fd_private", (PyCFunction)mod_fd_private, METH_VARARGS,
     "fd_private(fd, uid) -> bool: the open file is owned by uid and has no group or other write bit."},
    {"xxh3_64", (PyCFunction)mod_xxh3, METH_O, "xxh3_64(buffer) -> int (same as xxhash.xxh3_64_intdigest)."},
    {"entry_sums", (PyCFunction)mod_entry_sums, METH_VARARGS,
     "entry_sums(buffer, offsets, checksums=True) -> bytes: per u64 offset, key xxh3-64, entry checksum, out-of-bounds flag."},
    {"chain_walk", (PyCFunction)mod_chain_walk, METH_VARARGS,
     "chain_walk(buffer, base, end, max_key, max_value) -> (u32 offsets as bytes, stop): a segment's entry chain."},
    {NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "shmcache._speedups", NULL, -1, mod_methods};

PyMODINIT_FUNC PyInit__speedups(void) {
#if defined(XXH_DISPATCH_AVX2)
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2") && getenv("SHMCACHE_NO_AVX2") == NULL;
#endif
    if (PyType_Ready(&CoreType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    /* Every offset and tag this file hard-codes, checked against layout.py and
     * codec.py when cache.py imports this module. */
#define EXPORT(name) PyModule_AddIntConstant(m, #name, name);
    EXPORT(LAYOUT_VERSION) EXPORT(SLOT_SIZE) EXPORT(SL_TAG) EXPORT(SL_LOC) EXPORT(SL_EXPIRE)
    EXPORT(ENTRY_HDR) EXPORT(E_CHECKSUM) EXPORT(E_VLEN) EXPORT(E_KLEN) EXPORT(E_FLAGS)
    EXPORT(SEG_HEADER) EXPORT(ALIGN) EXPORT(STRIPE_SIZE) EXPORT(C_COUNTERS) EXPORT(LOCK_WAITERS)
    EXPORT(S_VERSION) EXPORT(S_LOCK) EXPORT(S_ITEMS) EXPORT(S_LIVE) EXPORT(S_RING) EXPORT(S_EVICTIONS)
    EXPORT(CTR_HITS) EXPORT(CTR_MISSES) EXPORT(CTR_SETS) EXPORT(CTR_DELETES) EXPORT(CTR_EVICTIONS)
    EXPORT(CTR_EXPIRATIONS) EXPORT(FLAG_BYTES) EXPORT(FLAG_STR) EXPORT(FLAG_INT) EXPORT(FLAG_FLOAT)
    EXPORT(READ_RETRIES) EXPORT(RECLAIM_STEP)
#undef EXPORT
    return m;
}
