"""Stripe locks, seqlock versions, client slots and crash recovery.

A writer holds a stripe's lock word and keeps the stripe's seqlock version
odd while it mutates. Readers never lock (see ``table.Table.get``).

**Liveness comes from the kernel.** Every attached process claims a client
slot and, for as long as it is attached, holds an OFD ``fcntl`` lock on that
slot's byte of the segment (a private open file description, see
:class:`Client`). The kernel drops the lock when the process dies, however it
dies, and answers "is that byte locked" the same in every PID namespace that
shares the file. So a process is alive exactly when its slot's byte is locked:
no pid, no start time, no /proc, no timeout guess. (pid + start time, used
before, meant nothing across PID namespaces or with ``hidepid=2``: a live
holder in a sidecar container was "recovered" while it wrote.)

**The stripe lock is a word that names its holder** (layout.S_LOCK): 0 when
free, else the holder's client slot and that slot's generation (bumped at
every claim, so a slot reused by a new process is not taken for the old
holder). One compare-and-swap both takes the lock and records who took it,
and one frees it, so there is no instant at which the lock is held by
nobody known: a holder SIGKILLed anywhere leaves a free word or its own name.
Waiters sleep on the word with futex(2) (keyed by the shared file, so across
processes and namespaces) in slices of POLL_FIRST up to POLL_MAX seconds, and
between slices ask whether the named client is still alive: a dead holder is
noticed within a slice of its death, never taken for alive and a live one
never for dead. Its word is then taken over by one more compare-and-swap
(exactly one recoverer wins; none if the word moved), the stripe repaired
through the table's ``repair`` callback and kept (a writer) or released (the
daemon, which runs the same check on a timer). The daemon frees client slots
by the same test.

Why not the alternatives (issue 9):

- POSIX semaphores, used up to layout 5, are not released when their holder
  dies and record no holder, so every holder wrote its name right after
  ``sem_wait``; a holder killed between the two left a held semaphore naming
  nobody, which a waiter could not tell from a live holder in that window
  and so recovered only after a one-second grace (about one kill in
  1,000-3,000 in the kill storms; and a live holder stopped longer than that in its window would
  have been taken for dead).
- A robust process-shared ``pthread_mutex_t`` closes that window (the
  kernel marks it OWNER_DIED at exit) but names its holder by thread id, and
  thread ids are per PID namespace: a waiter killed while blocked on the
  mutex makes the kernel mark it OWNER_DIED if the *waiter's* tid equals the
  holder's (glibc's ``list_op_pending``), which two containers' workers
  sharing /dev/shm easily have. That would take a live holder's lock away
  (benchmarks/probes/robust_mutex_pidns.c shows it: EOWNERDEAD while the
  holder, tid 1 in its namespace, still runs).

Every ``lock()`` that finds the stripe taken counts one *lock wait* and the
nanoseconds it waited (first try to acquisition, recovery included) in the
stripe record's cold line, right after acquiring: per stripe, all processes
together (``admin.stripes``, Prometheus, ``shmcache top``). With the C core
the first try is one ``Core.lock(s, 0)`` call and the wait starts only after
it failed, so an uncontended lock costs what it did before.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
import time
from typing import Callable

import numpy as np
import psutil

from . import layout as L
from .errors import CacheFull, Error, LockTimeout
from .segment import LOCK_CLIENTS, LOCK_DAEMON, Segment

#: A writer waiting on a busy stripe wakes after POLL_FIRST seconds, then
#: after twice as long each time up to POLL_MAX, to check whether the holder
#: died (one fcntl F_OFD_GETLK, ~1 us). A release wakes it at once anyway, so
#: this bounds only the stall after a holder's death (at most POLL_MAX plus
#: the repair) and costs a live holder's waiters one syscall per POLL_MAX.
POLL_FIRST = 0.0005
POLL_MAX = 0.001


def process_start(pid: int) -> float | None:
    """When process ``pid`` started, in clock ticks since boot, or None if it
    is gone or a zombie (a SIGKILLed child its parent has not reaped yet).

    Read from /proc/<pid>/stat (field 22) rather than psutil's create_time():
    that one adds the boot time, which the kernel derives from the wall clock,
    so an NTP step or `date -s` would make every live process look like
    another one (and so dead). Ticks since boot never move.

    Informational only (client records show it): liveness is the client
    slot's lock, for the stripe locks and ``shmcache.stampede`` alike.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:  # pragma: no cover - no procfs: fall back to psutil
        return _psutil_start(pid)
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X", b"x"):
        return None
    return float(int(fields[19]))


def _psutil_start(pid: int) -> float | None:  # pragma: no cover - non-Linux
    try:
        p = psutil.Process(pid)
        if p.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return p.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0


_U64_MAX = 2**64 - 1


# -- the pure-Python path's atomics ---------------------------------------------
# The C core takes and frees lock words with the compiler's atomics. Without
# it, Python has no compare-and-swap of its own: it calls libatomic's (the
# GCC runtime library behind those same builtins) through ctypes, and sleeps
# with the futex system call through libc's syscall().
class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


# Little-endian machines only: a waiter sleeps on the word's low half, its first 4 bytes.
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "i686": 240, "armv7l": 240}
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_SEQ_CST = 5


def _load_atomics():
    """(compare_exchange_8, exchange_8) of libatomic, or None. Called through
    PyDLL, which keeps the GIL: neither ever blocks, and releasing and
    retaking the GIL cost more than the instruction itself."""
    try:
        lib = ctypes.PyDLL("libatomic.so.1")
        cas = getattr(lib, "__atomic_compare_exchange_8")
        xchg = getattr(lib, "__atomic_exchange_8")
    except (OSError, AttributeError):
        return None
    cas.restype = ctypes.c_bool
    cas.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
    xchg.restype = ctypes.c_uint64
    xchg.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
    return cas, xchg


def _load_futex():
    nr = _SYS_FUTEX.get(platform.machine())
    if nr is None:  # pragma: no cover - another architecture: waits poll
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    call = libc.syscall
    call.restype = ctypes.c_long
    call.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                     ctypes.c_void_p, ctypes.c_uint32]
    return lambda addr, op, val, ts: call(nr, addr, op, val, ts, None, 0)


_CAS = None
_FUTEX = None
_ATOMICS_LOADED = False


def pure_atomics():
    """((cas, xchg), futex) for the pure-Python path, loaded on first use.

    Raises:
        Error: libatomic is not installed (only the pure-Python path needs it).
    """
    global _CAS, _FUTEX, _ATOMICS_LOADED
    if not _ATOMICS_LOADED:
        _CAS, _FUTEX, _ATOMICS_LOADED = _load_atomics(), _load_futex(), True
    if _CAS is None:
        raise Error(
            "shmcache is running without its C extension, and its pure-Python stripe locks need "
            "libatomic.so.1 for compare-and-swap, which this system lacks; install it "
            "(Debian/Ubuntu: apt-get install libatomic1; Fedora: dnf install libatomic) or "
            "reinstall shmcache with a C compiler present so its extension builds"
        )
    return _CAS, _FUTEX


#: Longest sleep between two tries when futex(2) is unavailable (seconds).
_TRY_MAX_SLEEP = 0.001


class _PureWords:
    """The lock words of one mapping, taken and freed from Python (see above).

    Holds a ctypes export of the mapping for as long as it lives, not just
    until the cache is closed: a thread may be between its check of
    ``closed`` and its call into libatomic when another thread closes the
    cache, and that call must find the memory still mapped (``Segment.close``
    then leaves the unmapping to the garbage collector)."""

    def __init__(self, seg: Segment) -> None:
        self.closed = False
        self.name = seg.name
        (self.cas, self.xchg), self.futex = pure_atomics()
        self._buf = (ctypes.c_char * len(seg.mm)).from_buffer(seg.mm)
        self.base = ctypes.addressof(self._buf) + seg.geometry.stripe_table_off + L.S_LOCK
        self._q = memoryview(seg.mm).cast("Q")
        self._first = (seg.geometry.stripe_table_off + L.S_LOCK) >> 3
        self._tls = threading.local()

    def addr(self, s: int) -> int:
        return self.base + s * L.STRIPE_SIZE

    def swap(self, s: int, old: int, new: int) -> bool:
        """Compare-and-swap stripe ``s``'s word from ``old`` to ``new``. (The
        expected value goes in a buffer of this thread's: libatomic writes the
        word's value into it on failure, and a buffer shared between threads
        could be changed by another thread's failed swap between our store and
        our call. Passed by address: a new c_uint64 and byref each call cost
        more than the swap.)"""
        if self.closed:
            raise ValueError(f"cache {self.name!r} is closed")
        try:
            e, ea = self._tls.buf
        except AttributeError:
            e = ctypes.c_uint64()
            ea = ctypes.addressof(e)
            self._tls.buf = (e, ea)
        e.value = old
        return self.cas(self.addr(s), ea, new, _SEQ_CST, _SEQ_CST)

    def acquire(self, s: int, me: int, timeout: float) -> bool:
        """What Core.lock does: take the word within ``timeout`` seconds of
        CLOCK_MONOTONIC (futex timeouts are relative, on that clock)."""
        if self.swap(s, 0, me):
            return True
        if not timeout > 0:
            return False
        deadline = time.monotonic() + timeout
        i = self._first + s * (L.STRIPE_SIZE >> 3)
        pause = 0.00005
        while True:
            left = deadline - time.monotonic()
            if left <= 0:  # before every try: a word kept changing must not hold us past it
                return False
            v = self._q[i]
            if v == 0:
                if self.swap(s, 0, me | L.LOCK_WAITERS):
                    return True
                continue
            if not v & L.LOCK_WAITERS:
                if not self.swap(s, v, v | L.LOCK_WAITERS):
                    continue
                v |= L.LOCK_WAITERS
            if self.futex is None:  # pragma: no cover - unknown architecture
                time.sleep(min(pause, left))
                pause = min(pause * 2, _TRY_MAX_SLEEP)
                continue
            sec = int(left)
            ts = _Timespec(sec, int((left - sec) * 1e9))
            if self.futex(self.addr(s), _FUTEX_WAIT, v & 0xFFFFFFFF, ctypes.byref(ts)) != 0:
                e = ctypes.get_errno()
                if e not in (errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT):
                    raise OSError(e, f"futex: {os.strerror(e)}")
            # EINTR: the eval loop runs the signal's Python handler at the
            # next check; if it raises, so does this call.

    def _hand_over(self, s: int, me: int, to: int, wake: int, always: bool) -> None:
        """What _speedups.c hand_over does: only while the word names us, swap
        it to ``to`` (from our word, then from it with LOCK_WAITERS: an
        exchange after a check could free the lock of a recoverer that took
        the word over in between), then wake ``wake`` sleepers if there were
        any (or ``always``)."""
        for old in (me, me | L.LOCK_WAITERS):
            if self.swap(s, old, to):
                if (always or old & L.LOCK_WAITERS) and self.futex is not None:
                    self.futex(self.addr(s), _FUTEX_WAKE, wake, None)
                return

    def release(self, s: int, me: int) -> None:
        """Free the word if it names us; wake one sleeper if any."""
        self._hand_over(s, me, 0, 1, False)

    def abandon(self, s: int, me: int) -> None:
        """What Core.abandon does: hand a stripe whose repair failed on to the
        next recoverer (the word names nobody; every sleeper woken)."""
        self._hand_over(s, me, L.LOCK_WAITERS, 2**31 - 1, True)

    def close(self) -> None:
        """No more swaps (they raise ValueError); the memory stays mapped (see the class)."""
        self.closed = True


class Identity:
    """This process as the segment records it: pid and start time (for
    people and messages, not for liveness). Renewed after fork."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.start = process_start(self.pid) or 0.0


class Client:
    """One attached process's client slot and the lock that says it is alive.

    ``fd`` is a private open file description of the segment (never mapped,
    never shared with another Cache) holding an OFD lock on the slot's byte.
    OFD locks, not classic POSIX ones: a POSIX lock is dropped when the
    process closes *any* fd of the file (another Cache of the same name, a
    ``Cache.unlink``), and is per process, so no test could tell our own slot
    from a dead one. An OFD lock lives exactly as long as the open file
    description: it dies with the process, and only with it.

    Fork: the child inherits ``fd``, so parent and child share the lock. The
    child must drop its reference (:meth:`abandon`, which closes without
    unlocking: an unlock would free the parent's slot) and claim a slot of its
    own; until it does, a dead parent would still look alive. ``fd`` is
    O_CLOEXEC, so exec'd children never keep it.
    """

    __slots__ = ("slot", "gen", "fd", "word")

    def __init__(self, slot: int, gen: int, fd: int, pid: int):
        self.slot = slot
        self.gen = gen
        self.fd = fd
        #: What this process's stripe locks hold while it holds them (layout.lock_word).
        self.word = L.lock_word(slot, gen)

    def abandon(self) -> None:
        """In a forked child: drop the inherited reference to the parent's lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def client_alive(seg: Segment, c: int, gen: int | None = None) -> bool:
    """True if client slot ``c`` (of generation ``gen``, if given) belongs to a
    process that is still attached: its byte is locked. Cross-namespace, exact.
    A slot number outside the client table (a damaged lock word) names no
    process: False, never a read past the table or the mapping."""
    if not 0 <= c < seg.geometry.max_clients:
        return False
    pid, cgen, _ = L.CLIENT_HEAD.unpack_from(seg.mm, _client_base(seg.geometry, c))
    if pid == 0 or (gen is not None and cgen != gen):
        return False
    return seg.ofd_locked(_client_base(seg.geometry, c))


def lock_words(seg: Segment) -> np.ndarray:
    """Every stripe's lock word, in stripe order (a copy; 0 = free)."""
    g = seg.geometry
    a = np.frombuffer(seg.mm, dtype="<u8", count=g.n_stripes * (L.STRIPE_SIZE >> 3), offset=g.stripe_table_off)
    return a[L.S_LOCK >> 3 :: L.STRIPE_SIZE >> 3].copy()


class StripeLocks:
    """The per-stripe write locks of one attached segment, for one process.

    ``lock(s)`` / ``unlock(s)`` bracket every mutation of stripe ``s``: they
    take the stripe's lock word (naming us) and bump the seqlock version to
    odd; ``unlock`` does the reverse. Always call ``unlock`` in ``finally``.

    With the C accelerator (:meth:`attach_core`) each of them is one C call, so
    a signal handler that raises (Ctrl-C, gunicorn's SIGABRT) can never run
    between taking the lock and making the version odd. The pure-Python
    fallback does the same steps in Python (libatomic's compare-and-swap through
    ctypes) under a per-process thread lock per stripe; there a handler raising
    between two of them can leave the stripe held by this live process until it
    exits (documented limitation of that fallback).
    """

    def __init__(
        self,
        seg: Segment,
        identity: Identity,
        client: Client,
        lock_timeout: float,
        repair: Callable[[int], None],
    ) -> None:
        g = seg.geometry
        self.seg = seg
        self.mm = seg.mm
        self.geometry = g
        self.lock_timeout = float(lock_timeout)
        self.repair = repair
        self.identity = identity
        self._q = memoryview(seg.mm).cast("Q")
        self._tlocks = [threading.Lock() for _ in range(g.n_stripes)]
        self._core = None
        self._pure: _PureWords | None = None
        self._closed = False
        self.set_client(client)

    def attach_core(self, core) -> None:
        """Use the C lock protocol of ``core`` (shmcache._speedups.Core)."""
        self._core = core
        self.lock = self._lock_c
        self.unlock = core.unlock

    def _words(self) -> _PureWords:
        """The pure-Python lock words (made on first use: the C path never needs them)."""
        if self._closed:
            raise ValueError(f"cache {self.seg.name!r} is closed")
        if self._pure is None:
            self._pure = _PureWords(self.seg)
        return self._pure

    def _lock_c(self, s: int) -> None:
        core = self._core
        if core.lock(s, 0.0):  # one try: taken unless busy
            return
        t0 = time.monotonic_ns()
        if not core.lock(s, POLL_FIRST):
            self._wait(s, core.lock)
        self._count_wait(s, t0)

    def set_client(self, client: Client) -> None:
        """Use client slot ``client`` for this process's lock words."""
        self.client = client
        self.me = client.word

    def after_fork(self, identity: Identity, client: Client) -> None:
        """In a forked child: new identity, fresh thread locks, own client slot."""
        self.identity = identity
        self._tlocks = [threading.Lock() for _ in range(self.geometry.n_stripes)]
        self.set_client(client)

    def release_views(self) -> None:
        """Drop the memoryview so the mapping can be closed; no more pure-Python swaps."""
        self._closed = True
        self._q.release()
        if self._pure is not None:
            self._pure.close()

    def word(self, s: int) -> int:
        """Stripe ``s``'s lock word right now (0 = free)."""
        return self._q[(self._stripe_off(s) + L.S_LOCK) >> 3]

    # -- hot path (pure Python; the C core replaces lock and unlock) ------------
    def lock(self, s: int) -> None:
        """Acquire stripe ``s`` for writing (seqlock version becomes odd).

        Raises:
            LockTimeout: a live process kept the stripe for too long.
        """
        tl = self._tlocks[s]
        t0 = None  # when a wait began (monotonic ns): another thread or process held the stripe
        if not tl.acquire(False):
            t0 = time.monotonic_ns()
            tl.acquire()
        try:
            words = self._words()
            if not words.acquire(s, self.me, 0.0):
                if t0 is None:
                    t0 = time.monotonic_ns()
                acquire = lambda s, timeout: words.acquire(s, self.me, timeout)  # noqa: E731
                if not acquire(s, POLL_FIRST):
                    self._wait(s, acquire)
        except BaseException:
            # An exception raised by a signal handler may land after the word
            # became ours: give it back (release frees it only if it names us,
            # and our thread lock means no other thread of this handle holds it).
            try:
                if not self._closed:
                    self._words().release(s, self.me)
            finally:
                tl.release()
            raise
        self._set_odd(s)
        if t0 is not None:
            self._count_wait(s, t0)

    def _set_odd(self, s: int) -> None:
        # Parity is set, not inverted (as in _speedups.c): a version damaged to
        # odd must not turn even while we mutate, or readers take torn values.
        i = self._stripe_off(s) >> 3
        self._q[i] = ((self._q[i] + 1) | 1) & _U64_MAX  # odd: readers of this stripe retry

    def unlock(self, s: int) -> None:
        """Release stripe ``s`` (seqlock version becomes even)."""
        try:
            i = self._stripe_off(s) >> 3
            self._q[i] = (self._q[i] + 2) & (_U64_MAX - 1)  # even: the stripe is consistent again
            self._words().release(s, self.me)
        finally:
            self._tlocks[s].release()

    # -- contention and recovery --------------------------------------------
    def _count_wait(self, s: int, t0: int) -> None:
        """Count one lock wait of stripe ``s`` that began at ``t0`` (monotonic
        ns) in the stripe's cold line (layout.LOCK_WAITS). Only right after
        acquiring: the stripe lock makes the read-modify-writes safe across
        processes without atomics. Costs three stores per wait, none when
        the lock was free."""
        ns = time.monotonic_ns() - t0
        q = self._q
        i = (self._stripe_off(s) + L.S_LOCK_WAITS) >> 3
        q[i] = (q[i] + 1) & _U64_MAX  # the segment is untrusted: a damaged counter wraps
        q[i + 1] = (q[i + 1] + ns) & _U64_MAX
        if ns > q[i + 2]:
            q[i + 2] = ns

    def _wait(self, s: int, acquire) -> None:
        """Wait for busy stripe ``s``: in slices of POLL_FIRST..POLL_MAX seconds,
        checking between them whether its holder died (then take it over and
        repair it at once). ``acquire(s, timeout) -> bool`` waits one slice.

        Raises:
            LockTimeout: a live process kept the stripe for max(10 x lock_timeout, 5 s).
        """
        hard = time.monotonic() + max(10 * self.lock_timeout, 5.0)
        poll = POLL_FIRST
        while True:
            if self._closed:  # by another thread while we waited
                raise ValueError(f"cache {self.seg.name!r} is closed")
            if self.try_recover(s, keep=True):
                return
            poll = min(poll * 2, POLL_MAX)
            if acquire(s, poll):
                return
            if time.monotonic() > hard:
                self._timeout(s)

    def _timeout(self, s: int):
        pid, _c = self.stripe_owner(s)
        raise LockTimeout(
            f"stripe {s} of cache {self.seg.name!r} has been held by live process "
            f"{pid or '(unknown)'} for more than {max(10 * self.lock_timeout, 5.0):.1f} s"
        )

    def _stripe_off(self, s: int) -> int:
        return self.geometry.stripe_table_off + s * L.STRIPE_SIZE

    def try_recover(self, s: int, keep: bool) -> bool:
        """If stripe ``s`` is held by a dead process, take it over and repair it.

        With ``keep`` the caller ends up holding it (the writer's path; in the
        pure-Python path it already holds the stripe's thread lock); without it
        the stripe is released again (the daemon's path). Returns True if this
        call acquired (keep) or freed (not keep) the stripe.
        """
        v = self.word(s)
        h = L.lock_holder(v)
        if h is None or client_alive(self.seg, *h):
            return False
        if self._core is not None:
            if not self._core.take(s, v):
                return False  # the word moved: somebody else recovered it, or the holder was not it
        else:
            tl = self._tlocks[s]
            if not keep:  # keep: the caller's lock() holds it
                tl.acquire()
            taken = False
            try:
                taken = self._words().swap(s, v, self.me | L.LOCK_WAITERS)
                if taken:
                    self._set_odd(s)
            finally:
                if not taken and not keep:
                    tl.release()
            if not taken:
                return False
        # We hold the stripe (version odd) as its new owner: one CAS, so of
        # several recoverers exactly one gets here for this death.
        ok = False
        try:
            self.repair(s)
            i = (self._stripe_off(s) + L.S_RECOVERIES) >> 3
            self._q[i] = (self._q[i] + 1) & _U64_MAX  # wraps
            if keep:
                # The repair leaves the version even (the stripe consistent);
                # we go on to mutate it as its holder, so odd again: lock-free
                # readers and snapshot copies must see that a writer is in.
                self._set_odd(s)
            ok = True
        finally:
            if not ok:
                # Repair raised (an interrupt, MemoryError): the stripe is still
                # broken, so it must not be published as sound. Hand it on with
                # its version odd and a word naming nobody: the next writer or
                # the daemon takes it over and repairs it again.
                if self._core is not None:
                    self._core.abandon(s)
                else:
                    self._words().abandon(s, self.me)
                    if not keep:
                        self._tlocks[s].release()  # keep: the caller's lock() releases it
            elif not keep:
                self.unlock(s)
        return True

    def stripe_owner(self, s: int) -> tuple[int, int]:
        """(pid, client slot) of the holder of stripe ``s``; (0, -1) if it is
        free. The pid is as the holder sees itself (its own PID namespace), read
        from its client record: 0 if the slot is out of range or now belongs to
        another process (another generation: the holder died)."""
        h = L.lock_holder(self.word(s))
        if h is None:
            return 0, -1
        c, gen = h
        if not 0 <= c < self.geometry.max_clients:
            return 0, c
        pid, cgen, _ = L.CLIENT_HEAD.unpack_from(self.mm, _client_base(self.geometry, c))
        return (pid if cgen == gen else 0), c


# -- client table -------------------------------------------------------------
def _client_base(g: L.Geometry, c: int) -> int:
    return g.client_table_off + c * g.client_record_size


def claim_client(seg: Segment, identity: Identity, timeout: float = 10.0) -> Client:
    """Claim a free client slot for this process (reaping dead ones) and lock
    its byte for as long as we stay attached. Returns the :class:`Client`.

    Raises:
        CacheFull: every slot belongs to a live process (raise ``max_clients``).
    """
    g = seg.geometry
    mm = seg.mm
    fd = seg.private_fd()
    try:
        with seg.file_lock(LOCK_CLIENTS, timeout, what="client table"):
            for c in range(g.max_clients):
                base = _client_base(g, c)
                if L.CLIENT_HEAD.unpack_from(mm, base)[0] == 0 and seg.ofd_try_lock(fd, base):
                    return _take_slot(seg, c, fd, identity)
            c = _reap_locked(seg, first_only=True)
            if c is not None and seg.ofd_try_lock(fd, _client_base(g, c)):
                return _take_slot(seg, c, fd, identity)
        raise CacheFull(
            f"all {g.max_clients} client slots of cache {seg.name!r} belong to live processes; "
            "create the cache with a larger max_clients"
        )
    except BaseException:
        os.close(fd)
        raise


def _take_slot(seg: Segment, c: int, fd: int, identity: Identity) -> Client:
    """Under the client-table lock, with slot ``c``'s byte locked by ``fd``:
    write our record with the slot's next generation."""
    g = seg.geometry
    base = _client_base(g, c)
    gen = (L.CLIENT_HEAD.unpack_from(seg.mm, base)[1] + 1) & 0xFFFFFFFF or 1
    seg.mm[base : base + g.client_record_size] = bytes(g.client_record_size)
    L.CLIENT_HEAD.pack_into(seg.mm, base, identity.pid, gen, identity.start)
    return Client(c, gen, fd, identity.pid)


def _retire_locked(seg: Segment, c: int) -> None:
    """Fold client ``c``'s counters into the header totals and free the slot
    (keeping its generation, so a lock word naming the old holder stays stale)."""
    g = seg.geometry
    mm = seg.mm
    base = _client_base(g, c)
    for k in range(L.N_COUNTERS):
        v = L.U64.unpack_from(mm, base + L.C_COUNTERS + 8 * k)[0]
        off = L.H_RETIRED + 8 * k
        # u64 counters wrap, as the C paths' do: a damaged one must not make
        # every later detach raise struct.error
        L.U64.pack_into(mm, off, (L.U64.unpack_from(mm, off)[0] + v) & _U64_MAX)
    gen = L.CLIENT_HEAD.unpack_from(mm, base)[1]
    mm[base : base + g.client_record_size] = bytes(g.client_record_size)
    L.CLIENT_HEAD.pack_into(mm, base, 0, gen, 0.0)


def release_client(seg: Segment, client: Client) -> None:
    """Give back ``client``'s slot if this process still holds it, and its lock."""
    g = seg.geometry
    try:
        with seg.file_lock(LOCK_CLIENTS, 10.0, what="client table"):
            base = _client_base(g, client.slot)
            pid, gen, _ = L.CLIENT_HEAD.unpack_from(seg.mm, base)
            if pid and gen == client.gen and client.fd >= 0:
                _retire_locked(seg, client.slot)
                seg.ofd_unlock(client.fd, base)
    finally:
        # Closed only now: closing any fd of the file drops this process's
        # classic POSIX locks on it, the client-table lock among them.
        client.abandon()


def _reap_locked(seg: Segment, first_only: bool = False) -> int | list[int] | None:
    g = seg.geometry
    mm = seg.mm
    reaped = []
    # A slot whose dead client still holds a stripe is freed too: the next
    # claim bumps its generation, and the lock word keeps the old one, so the
    # holder still reads as dead (lock.client_alive compares generations).
    for c in range(g.max_clients):
        base = _client_base(g, c)
        pid = L.CLIENT_HEAD.unpack_from(mm, base)[0]
        if pid == 0 or seg.ofd_locked(base):
            continue
        _retire_locked(seg, c)
        if first_only:
            return c
        reaped.append(c)
    return None if first_only else reaped


def reap_dead_clients(seg: Segment) -> list[int]:
    """Free the client slots of dead processes (keeping their counters). Returns the slots freed."""
    with seg.file_lock(LOCK_CLIENTS, 10.0, what="client table"):
        return _reap_locked(seg)


def live_clients(seg: Segment) -> list[tuple[int, int, float]]:
    """(slot, pid, start) of every claimed client slot, dead ones not yet reaped included.
    The pid is as each process sees itself (its own PID namespace)."""
    g = seg.geometry
    out = []
    for c in range(g.max_clients):
        pid, _gen, start = L.CLIENT_HEAD.unpack_from(seg.mm, _client_base(g, c))
        if pid:
            out.append((c, pid, start))
    return out


def attached_clients(seg: Segment) -> int:
    """How many processes are attached right now (client slots whose lock is held)."""
    return sum(1 for c, _pid, _start in live_clients(seg) if client_alive(seg, c))


def daemon_pid(seg: Segment) -> int | None:
    """The pid of the daemon serving this cache (as the daemon sees itself), or
    None if none runs. The kernel answers (is LOCK_DAEMON held?), so a daemon in
    another PID namespace counts and a dead one's leftover header does not."""
    holder = seg.file_lock_holder(LOCK_DAEMON)
    if holder is None and not seg.holds_file_lock(LOCK_DAEMON):
        return None
    return L.U64.unpack_from(seg.mm, L.H_DAEMON_PID)[0] or holder or None


def daemon_local_pid(seg: Segment) -> int | None:
    """The daemon's pid in the caller's PID namespace: the holder of
    LOCK_DAEMON as the kernel reports it (the caller itself if it is the
    daemon). None if no daemon runs, or if it runs in a PID namespace the
    caller cannot see (the kernel reports pid 0 then). The only pid to
    signal the daemon by: the header's is the daemon's own view of itself,
    which in another namespace names some other process here."""
    if seg.holds_file_lock(LOCK_DAEMON):
        return os.getpid()
    return seg.file_lock_holder(LOCK_DAEMON) or None
