"""Stripe locks, seqlock versions, owner records, client slots and crash recovery.

A writer holds a stripe's POSIX semaphore and keeps the stripe's seqlock
version odd while it mutates. Readers never lock (see ``table.Table.get``).

**Liveness comes from the kernel.** Every attached process claims a client
slot and, for as long as it is attached, holds an OFD ``fcntl`` lock on that
slot's byte of the segment file (a private open file description, see
:class:`Client`). The kernel drops the lock when the process dies, however it
dies, and answers "is that byte locked" the same in every PID namespace that
shares the file. So a process is alive exactly when its slot's byte is locked:
no pid, no start time, no /proc, no timeout guess. (pid + start time, used
before, meant nothing across PID namespaces or with ``hidepid=2``: a live
holder in a sidecar container was "recovered" while it wrote, leaving the
semaphore at 2. A robust process-shared futex was the other candidate; it
would have replaced the semaphores, the C fast paths and every waiter, while
this keeps them and adds one fcntl per attach.)

POSIX semaphores are not released when their holder dies, so every holder
records itself in the stripe record right after acquiring and clears it
right before releasing: its client slot and that slot's generation (bumped at
every claim, so a slot reused by a new process is not taken for the old
owner). The two windows where the semaphore may be held with no owner
recorded (between sem_wait returning and the owner store; between the owner
clear and sem_post) are covered by a per-client, per-stripe *marker* byte set
for the duration of each window.

A writer that finds the stripe busy waits in short slices (POLL_FIRST up to
POLL_MAX seconds) and, between slices, asks whether the recorded owner's byte
is still locked: a dead holder is noticed within one slice of its death, not
after ``lock_timeout``. Then it takes the recovery lock (an fcntl lock the
kernel releases if the recoverer dies too), re-checks, repairs the stripe
through the table's ``repair`` callback and keeps the semaphore as its own.
The daemon runs the same check on a timer and releases the semaphore instead,
and frees client slots by the same test.

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
import threading
import time
from typing import Callable

import posix_ipc
import psutil

from . import layout as L
from .errors import CacheFull, LockTimeout
from .segment import LOCK_CLIENTS, LOCK_DAEMON, LOCK_RECOVERY, Segment, shm_path

_ZERO16 = bytes(16)

#: Least seconds a recoverer waits (it waits lock_timeout if longer) before
#: trusting marker-only evidence (see StripeLocks._still_stuck). Paid only
#: when a process died in the few instructions between sem_wait and its
#: owner store, so it can be generous: a live process stalled that long in
#: that window (SIGSTOP, a starved CPU) is the one case that could be taken
#: for dead.
MARKER_GRACE = 1.0

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


# -- lock waits on CLOCK_MONOTONIC ----------------------------------------------
# posix_ipc's timed acquire is sem_timedwait, whose deadline is absolute on
# CLOCK_REALTIME: an NTP or manual step back of S seconds while a writer
# waits on a dead holder stretched that one wait by S seconds, and short
# slices do not help (each slice's deadline moves back with the clock).
# sem_clockwait (glibc 2.30+, what _speedups.c uses) takes a CLOCK_MONOTONIC
# deadline. posix_ipc does not expose its sem_t*, so the pure-Python path
# opens the same named semaphore once more through libc: glibc finds it
# already mapped (same inode) and hands back the same sem_t*. Without
# sem_clockwait (other libcs), or when the name no longer leads to our
# semaphore (the cache was removed or recreated while we stay attached),
# waits poll sem_trywait between sleeps on the monotonic clock instead:
# immune to steps, at the price of waking up to 1 ms after a release.
class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _libc_sem_calls():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sem_open, sem_close, clockwait = libc.sem_open, libc.sem_close, libc.sem_clockwait
    except (OSError, AttributeError):  # pragma: no cover - not glibc >= 2.30
        return None
    sem_open.restype = ctypes.c_void_p
    sem_open.argtypes = [ctypes.c_char_p, ctypes.c_int]
    sem_close.restype = ctypes.c_int
    sem_close.argtypes = [ctypes.c_void_p]
    clockwait.restype = ctypes.c_int
    clockwait.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Timespec)]
    return sem_open, sem_close, clockwait


_SEM_CALLS = _libc_sem_calls()

#: Longest sleep between two sem_trywait of the fallback (seconds).
_TRYWAIT_MAX_SLEEP = 0.001


class MonotonicWaits:
    """Timed waits on a segment's stripe semaphores whose deadline is on
    CLOCK_MONOTONIC, so a wall-clock step never lengthens a lock wait."""

    def __init__(self, seg: Segment) -> None:
        self.seg = seg
        self._ptrs: dict[int, int] = {}
        self._open_lock = threading.Lock()

    def _ptr(self, s: int) -> int:
        """libc's sem_t* of stripe ``s``, or 0: then waits poll instead."""
        p = self._ptrs.get(s)
        if p is None:
            with self._open_lock:
                p = self._ptrs.get(s)
                if p is None:
                    p = _SEM_CALLS[0](self.seg.sems[s].name.encode(), 0) or 0
                    # Opened by name: the name must still mean the cache we
                    # mapped. It does not if the cache was removed (sem_open
                    # failed) or removed and recreated (a new segment file
                    # comes with new semaphores); our posix_ipc handles still
                    # work on the old semaphores, so wait on those by polling.
                    if p and not self._same_segment():
                        _SEM_CALLS[1](p)
                        p = 0
                    self._ptrs[s] = p
        return p

    def _same_segment(self) -> bool:
        try:
            return os.stat(shm_path(self.seg.name)).st_ino == os.fstat(self.seg.fd).st_ino
        except FileNotFoundError:
            return False

    def after_fork(self) -> None:
        """In a forked child: another thread may have held the open lock."""
        self._open_lock = threading.Lock()

    def acquire(self, s: int, timeout: float) -> bool:
        """Take stripe ``s``'s semaphore, waiting at most ``timeout`` seconds
        of CLOCK_MONOTONIC. True if taken. A signal handler that raises
        (Ctrl-C) interrupts the wait; one that returns resumes it (PEP 475)."""
        sem = self.seg.sems[s]
        try:
            sem.acquire(0)
            return True
        except posix_ipc.BusyError:
            pass
        deadline = time.clock_gettime(time.CLOCK_MONOTONIC) + max(0.0, timeout)
        p = self._ptr(s) if _SEM_CALLS is not None else 0
        if not p:
            return self._poll(sem, deadline)
        sec = int(deadline)
        ts = _Timespec(sec, min(int((deadline - sec) * 1e9), 999_999_999))
        clockwait = _SEM_CALLS[2]
        while True:
            if clockwait(p, time.CLOCK_MONOTONIC, ctypes.byref(ts)) == 0:
                return True
            e = ctypes.get_errno()
            if e == errno.ETIMEDOUT:
                return False
            if e != errno.EINTR:
                raise OSError(e, f"sem_clockwait: {os.strerror(e)}")
            # EINTR: the eval loop runs the signal's Python handler at the
            # next check; if it raises, so does this call.

    @staticmethod
    def _poll(sem, deadline: float) -> bool:
        pause = 0.00005
        while True:
            left = deadline - time.clock_gettime(time.CLOCK_MONOTONIC)
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, _TRYWAIT_MAX_SLEEP)
            try:
                sem.acquire(0)
                return True
            except posix_ipc.BusyError:
                pass

    def close(self) -> None:
        """Drop the extra references to the semaphores. Idempotent."""
        ptrs, self._ptrs = self._ptrs, {}
        for p in ptrs.values():
            if p:
                _SEM_CALLS[1](p)

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

    __slots__ = ("slot", "gen", "fd", "owner")

    def __init__(self, slot: int, gen: int, fd: int, pid: int):
        self.slot = slot
        self.gen = gen
        self.fd = fd
        #: What this process stores as a stripe's owner record (layout.OWNER).
        self.owner = L.OWNER.pack(slot + 1, gen, pid, 0)

    def abandon(self) -> None:
        """In a forked child: drop the inherited reference to the parent's lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def client_alive(seg: Segment, c: int, gen: int | None = None) -> bool:
    """True if client slot ``c`` (of generation ``gen``, if given) belongs to a
    process that is still attached: its byte is locked. Cross-namespace, exact.
    A slot number outside the client table (a damaged owner record) names no
    process: False, never a read past the table or the mapping."""
    if not 0 <= c < seg.geometry.max_clients:
        return False
    pid, cgen, _ = L.CLIENT_HEAD.unpack_from(seg.mm, _client_base(seg.geometry, c))
    if pid == 0 or (gen is not None and cgen != gen):
        return False
    return seg.ofd_locked(_client_base(seg.geometry, c))


class StripeLocks:
    """The per-stripe write locks of one attached segment, for one process.

    ``lock(s)`` / ``unlock(s)`` bracket every mutation of stripe ``s``: they
    take the stripe semaphore, record the owner and bump the seqlock version
    to odd; ``unlock`` does the reverse. Always call ``unlock`` in ``finally``.

    With the C accelerator (:meth:`attach_core`) each of them is one C call, so
    a signal handler that raises (Ctrl-C, gunicorn's SIGABRT) can never run
    between taking the semaphore and recording the owner. The pure-Python
    fallback does the same steps in Python under a per-process thread lock
    per stripe; there a handler raising between two of them can leave the
    stripe held with no record (documented limitation of that fallback).
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
        self.sems = seg.sems
        self.geometry = g
        self.lock_timeout = float(lock_timeout)
        self.repair = repair
        self.identity = identity
        self._q = memoryview(seg.mm).cast("Q")
        self._tlocks = [threading.Lock() for _ in range(g.n_stripes)]
        self._core = None
        self._waits = MonotonicWaits(seg)
        self.set_client(client)

    def attach_core(self, core) -> None:
        """Use the C lock protocol of ``core`` (shmcache._speedups.Core)."""
        self._core = core
        self.lock = self._lock_c
        self.unlock = core.unlock

    def _lock_c(self, s: int) -> None:
        core = self._core
        if core.lock(s, 0.0):  # one try: taken unless busy
            return
        t0 = time.monotonic_ns()
        if not core.lock(s, POLL_FIRST):
            self._wait(s, core.lock, core.take)
        self._count_wait(s, t0)

    def set_client(self, client: Client) -> None:
        """Use client slot ``client`` for this process's markers and owner records."""
        g = self.geometry
        self.client = client
        self.owner = client.owner
        self._marker_base = g.client_table_off + client.slot * g.client_record_size + L.C_MARKERS

    def after_fork(self, identity: Identity, client: Client) -> None:
        """In a forked child: new identity, fresh thread locks, own client slot."""
        self.identity = identity
        self._tlocks = [threading.Lock() for _ in range(self.geometry.n_stripes)]
        self._waits.after_fork()
        self.set_client(client)

    def release_views(self) -> None:
        """Drop the memoryview so the mapping can be closed, and the extra
        semaphore references of the monotonic waits."""
        self._q.release()
        self._waits.close()

    # -- hot path -----------------------------------------------------------
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
        mm = self.mm
        mb = self._marker_base + s
        # Markers are counters, not flags: the C fast paths (_speedups.c) may
        # raise and lower the same byte from another thread of this process
        # while this one waits; they always leave it as they found it.
        mm[mb] += 1
        try:
            try:
                self.sems[s].acquire(0)
            except posix_ipc.BusyError:
                if t0 is None:
                    t0 = time.monotonic_ns()
                if not self._acquire(s, POLL_FIRST):
                    self._wait(s, self._acquire, None)
        except BaseException:
            mm[mb] -= 1
            tl.release()
            raise
        so = self.geometry.stripe_table_off + s * L.STRIPE_SIZE
        mm[so + L.S_OWNER : so + L.S_OWNER + 16] = self.owner
        mm[mb] -= 1
        # Parity is set, not inverted (as in _speedups.c): a version damaged to
        # odd must not turn even while we mutate, or readers take torn values.
        self._q[so >> 3] = ((self._q[so >> 3] + 1) | 1) & _U64_MAX  # odd: readers of this stripe retry
        if t0 is not None:
            self._count_wait(s, t0)

    def unlock(self, s: int) -> None:
        """Release stripe ``s`` (seqlock version becomes even)."""
        mm = self.mm
        so = self.geometry.stripe_table_off + s * L.STRIPE_SIZE
        mb = self._marker_base + s
        self._q[so >> 3] = (self._q[so >> 3] + 2) & (_U64_MAX - 1)  # even: the stripe is consistent again
        mm[mb] += 1
        mm[so + L.S_OWNER : so + L.S_OWNER + 16] = _ZERO16
        self.sems[s].release()
        mm[mb] -= 1
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

    def _acquire(self, s: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds (CLOCK_MONOTONIC) for the semaphore. True if taken."""
        return self._waits.acquire(s, timeout)

    def _wait(self, s: int, acquire, take) -> None:
        """Wait for busy stripe ``s``: in slices of POLL_FIRST..POLL_MAX seconds,
        checking between them whether its holder died (then recover at once).
        ``acquire(s, timeout) -> bool`` waits one slice; ``take(s)`` (C path)
        records us as holder after a recovery that kept the semaphore.

        A recorded owner is checked every slice; marker-only evidence (a holder
        that died before recording itself) only once ``lock_timeout`` has passed,
        as it needs a grace period to rule out a live holder mid-step.

        Raises:
            LockTimeout: a live process kept the stripe for max(10 x lock_timeout, 5 s).
        """
        t0 = time.monotonic()
        hard = t0 + max(10 * self.lock_timeout, 5.0)
        poll = POLL_FIRST
        while True:
            if self.owner_dead(s) or time.monotonic() - t0 >= self.lock_timeout:
                if self.try_recover(s, keep=True):
                    if take is not None:
                        take(s)  # we hold it as the recoverer: version odd, as lock() leaves it
                    return
            poll = min(poll * 2, POLL_MAX)
            if acquire(s, poll):
                return
            if time.monotonic() > hard:
                self._timeout(s)

    def _timeout(self, s: int):
        _c, _g, pid, _ = L.OWNER.unpack_from(self.mm, self._stripe_off(s) + L.S_OWNER)
        raise LockTimeout(
            f"stripe {s} of cache {self.seg.name!r} has been held by live process "
            f"{pid or '(unknown)'} for more than {max(10 * self.lock_timeout, 5.0):.1f} s"
        )

    def _stripe_off(self, s: int) -> int:
        return self.geometry.stripe_table_off + s * L.STRIPE_SIZE

    def owner_dead(self, s: int) -> bool:
        """True if stripe ``s`` records an owner whose process is gone (its
        client slot's byte is unlocked, or the slot was reused). One fcntl."""
        c, gen, _pid, _ = L.OWNER.unpack_from(self.mm, self._stripe_off(s) + L.S_OWNER)
        return c != 0 and not client_alive(self.seg, c - 1, gen)

    def _evidence(self, s: int) -> tuple[bool, list[tuple[int, int]]] | None:
        """Who could hold stripe ``s``: None if a live process might; else
        (owner_is_dead, [(slot, gen) of dead clients with a marker on s]).

        A recorded owner is authoritative: only the holder writes it, right
        after sem_wait, and clears it right before sem_post. Markers matter
        only when no owner is recorded, and then only dead ones are evidence:
        live markers belong to waiters blocked in sem_wait (which must not
        stop them from recovering a dead holder) or to a live process in its
        few-instruction window, which the grace re-check in
        :meth:`_still_stuck` rules out.
        """
        mm = self.mm
        g = self.geometry
        c, gen, _pid, _ = L.OWNER.unpack_from(mm, self._stripe_off(s) + L.S_OWNER)
        if c and client_alive(self.seg, c - 1, gen):
            return None
        dead_markers = []
        # Stripe s's marker byte of every client record, read as one strided
        # slice: a Python loop over 512 records took ~0.3 ms of each recovery.
        rs = g.client_record_size
        first = g.client_table_off + L.C_MARKERS + s
        for m in _nonzero(mm[first : first + g.max_clients * rs : rs]):
            base = g.client_table_off + m * rs
            mpid, mgen, _ = L.CLIENT_HEAD.unpack_from(mm, base)
            if mpid and not client_alive(self.seg, m, mgen):
                dead_markers.append((m, mgen))
        if c:
            return True, dead_markers
        if not dead_markers:
            return None  # nobody to blame: a live holder is mid-step; wait
        return False, dead_markers

    def try_recover(self, s: int, keep: bool) -> bool:
        """If stripe ``s`` is held by a dead process, repair it and take it over.

        With ``keep`` the caller ends up holding the semaphore (the writer's
        path); without it the semaphore is released (the daemon's path).
        Returns True if this call acquired (keep) or freed (not keep) the stripe.

        Raises:
            LockTimeout: another recoverer kept the recovery lock too long.
        """
        if self._evidence(s) is None:
            return False
        # The probes below take the semaphore for an instant with no owner
        # recorded: our marker must be up, so dying inside one is evidence too.
        if self._core is not None:
            self._core.mark(s, 1)
            try:
                return self._recover(s, keep)
            finally:
                self._core.mark(s, -1)
        if keep:  # the Python lock(): its marker is up and it holds the thread lock
            return self._recover(s, keep)
        mb = self._marker_base + s
        with self._tlocks[s]:
            self.mm[mb] += 1
            try:
                return self._recover(s, keep)
            finally:
                self.mm[mb] -= 1

    def _probe(self, s: int, keep: bool) -> bool:
        """Take the semaphore if it is free right now; with ``keep`` hold it
        (owner recorded at once), else give it straight back."""
        try:
            self.sems[s].acquire(0)
        except posix_ipc.BusyError:
            return False
        so = self._stripe_off(s)
        if keep:
            self.mm[so + L.S_OWNER : so + L.S_OWNER + 16] = self.owner
        else:
            self.sems[s].release()
        return True

    def _recover(self, s: int, keep: bool) -> bool:
        with self.seg.file_lock(LOCK_RECOVERY, timeout=max(30.0, 10 * self.lock_timeout), what="recovery"):
            if self._probe(s, keep):  # someone else recovered (or the holder finished) meanwhile
                return keep
            ev = self._evidence(s)
            if ev is None:
                return False
            # Confirm the semaphore is still taken after the evidence: a live
            # process that grabbed it in between would show as owner or marker.
            if self._probe(s, keep):
                return keep
            if self._evidence(s) != ev:
                return False
            if not ev[0] and not self._still_stuck(s, ev):
                return False
            so = self._stripe_off(s)
            self.mm[so + L.S_OWNER : so + L.S_OWNER + 16] = self.owner
            self.repair(s)
            self._q[(so + L.S_RECOVERIES) >> 3] = (self._q[(so + L.S_RECOVERIES) >> 3] + 1) & _U64_MAX  # wraps
            self._clear_dead_markers(s, ev[1])
            if not keep:
                self.mm[so + L.S_OWNER : so + L.S_OWNER + 16] = _ZERO16
                self.sems[s].release()
            return True

    def _clear_dead_markers(self, s: int, dead) -> None:
        # Under the client-table lock and only if the slot still belongs to the
        # dead client: the reaper may have handed it to a new process meanwhile.
        g = self.geometry
        with self.seg.file_lock(LOCK_CLIENTS, 10.0, what="client table"):
            for c, gen in dead:
                base = g.client_table_off + c * g.client_record_size
                cpid, cgen, _ = L.CLIENT_HEAD.unpack_from(self.mm, base)
                if cpid and cgen == gen:
                    self.mm[base + L.C_MARKERS + s] = 0

    def _still_stuck(self, s: int, ev) -> bool:
        """Marker-only evidence (no owner recorded) is the ambiguous case: a live
        process that just took the semaphore and has not yet stored its owner
        looks the same for an instant. Wait a grace period: a live holder
        records itself and bumps the version within microseconds; a dead one
        changes nothing."""
        vo = self._stripe_off(s)
        v = L.U64.unpack_from(self.mm, vo)[0]
        # Looked at every POLL_MAX, not once at the end: a live holder that
        # was in its window records itself within microseconds, and the
        # waiter (holding the recovery lock, which every other waiter of a
        # dead holder queues on) used to sleep out the whole grace anyway.
        # Only "nothing changed for the whole grace" leads to a recovery.
        deadline = time.monotonic() + max(MARKER_GRACE, self.lock_timeout)
        while True:
            time.sleep(max(0.0, min(POLL_MAX, deadline - time.monotonic())))
            if L.U64.unpack_from(self.mm, vo)[0] != v or self._evidence(s) != ev:
                return False
            if time.monotonic() >= deadline:
                return not self._probe(s, keep=False)

    def fix_overcount(self, s: int) -> int:
        """Bring stripe ``s``'s semaphore back to 1 if it is above (two releases
        for one acquire: only possible if a live holder was ever taken for
        dead). Returns how many surplus units were removed."""
        n = 0
        while self.sems[s].value > 1:
            try:
                self.sems[s].acquire(0)
            except posix_ipc.BusyError:
                break
            n += 1
        return n

    def stripe_owner(self, s: int) -> tuple[int, int]:
        """(pid, client slot) recorded as the holder of stripe ``s``; (0, -1) if
        none. The pid is as the holder sees itself (its own PID namespace)."""
        c, _gen, pid, _ = L.OWNER.unpack_from(self.mm, self._stripe_off(s) + L.S_OWNER)
        return (pid, c - 1) if c else (0, -1)


_NONZERO = bytes([0] + [1] * 255)


def _nonzero(col: bytes) -> list[int]:
    """Indices of the non-zero bytes of ``col`` (usually one or two)."""
    flags = col.translate(_NONZERO)
    out = []
    i = flags.find(1)
    while i >= 0:
        out.append(i)
        i = flags.find(1, i + 1)
    return out


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
    (keeping its generation, so an owner record of the old holder stays stale)."""
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
    for c in range(g.max_clients):
        base = _client_base(g, c)
        pid = L.CLIENT_HEAD.unpack_from(mm, base)[0]
        if pid == 0 or seg.ofd_locked(base):
            continue
        if not _clear_stale_markers(seg, base, c):
            continue  # evidence for a stuck stripe: recovery frees this slot
        _retire_locked(seg, c)
        if first_only:
            return c
        reaped.append(c)
    return None if first_only else reaped


def _clear_stale_markers(seg: Segment, base: int, c: int) -> bool:
    """Clear the markers of dead client ``c`` (record at ``base``) that
    cannot mean it holds a stripe: the stripe's semaphore is free, or a
    different live process is its recorded owner (a waiter killed in sem_wait
    leaves such a marker). Returns True if no marker is left."""
    mm = seg.mm
    g = seg.geometry
    left = False
    for s in range(g.n_stripes):
        m = base + L.C_MARKERS + s
        if not mm[m]:
            continue
        owner, ogen, _pid, _ = L.OWNER.unpack_from(mm, g.stripe_table_off + s * L.STRIPE_SIZE + L.S_OWNER)
        if seg.sems[s].value > 0 or (owner and owner != c + 1 and client_alive(seg, owner - 1, ogen)):
            mm[m] = 0
        else:
            left = True
    return not left


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
