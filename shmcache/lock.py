"""Stripe locks, seqlock versions, owner records, client slots and crash recovery.

A writer holds a stripe's POSIX semaphore and keeps the stripe's seqlock
version odd while it mutates. Readers never lock (see ``table.Table.get``).

POSIX semaphores are not released when their holder dies, so every holder
records itself (pid + process start time) in the stripe record right after
acquiring and clears it right before releasing. The two windows where the
semaphore may be held with no owner recorded (between sem_wait returning and
the owner store; between the owner clear and sem_post) are covered by a
per-client, per-stripe *marker* byte set for the duration of each window.

A writer whose acquire times out looks at the owner (and, if there is none, at
the markers): if every piece of evidence points at a dead process, it takes the
recovery lock (an fcntl lock the kernel releases if the recoverer dies too),
re-checks, repairs the stripe through the table's ``repair`` callback and keeps
the semaphore as its own. The daemon runs the same check on a timer and
releases the semaphore instead.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import posix_ipc
import psutil

from . import layout as L
from .errors import CacheFull, LockTimeout
from .segment import LOCK_CLIENTS, LOCK_RECOVERY, Segment

_ZERO16 = bytes(16)

#: Least seconds a recoverer waits (it waits lock_timeout if longer) before
#: trusting marker-only evidence (see StripeLocks._still_stuck). Paid only
#: when a process died in the few instructions between sem_wait and its
#: owner store, so it can be generous: a live process stalled that long in
#: that window (SIGSTOP, a starved CPU) is the one case that could be taken
#: for dead.
MARKER_GRACE = 1.0


def process_start(pid: int) -> float | None:
    """When process ``pid`` started, in clock ticks since boot, or None if it
    is gone or a zombie (a SIGKILLed child its parent has not reaped yet).

    Read from /proc/<pid>/stat (field 22) rather than psutil's create_time():
    that one adds the boot time, which the kernel derives from the wall clock,
    so an NTP step or `date -s` would make every live process look like
    another one (and so dead). Ticks since boot never move.
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


def is_alive(pid: int, start: float) -> bool:
    """True if ``pid`` runs and started at ``start`` (so a reused pid is not mistaken)."""
    if pid == 0:
        return False
    s = process_start(pid)
    if s is None:
        return False
    return s < 0 or s == start


_U64_MAX = 2**64 - 1

class Identity:
    """This process as the segment records it: pid and start time. Renewed after fork."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.start = process_start(self.pid)
        self.owner = L.OWNER.pack(self.pid, 0, self.start)


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
        client: int,
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
        self.set_client(client)

    def attach_core(self, core) -> None:
        """Use the C lock protocol of ``core`` (shmcache._speedups.Core)."""
        self._core = core
        self.lock = self._lock_c
        self.unlock = core.unlock

    def _lock_c(self, s: int) -> None:
        core = self._core
        if core.lock(s, self.lock_timeout):
            return
        hard = time.monotonic() + max(10 * self.lock_timeout, 5.0)
        while True:
            if self.try_recover(s, keep=True):
                core.take(s)  # we hold it as the recoverer: version odd, as lock() leaves it
                return
            if core.lock(s, self.lock_timeout):
                return
            if time.monotonic() > hard:
                self._timeout(s)

    def set_client(self, client: int) -> None:
        """Use client slot ``client`` for this process's markers."""
        g = self.geometry
        self.client = client
        self._marker_base = g.client_table_off + client * g.client_record_size + L.C_MARKERS

    def after_fork(self, identity: Identity, client: int) -> None:
        """In a forked child: new identity, fresh thread locks, own client slot."""
        self.identity = identity
        self._tlocks = [threading.Lock() for _ in range(self.geometry.n_stripes)]
        self.set_client(client)

    def release_views(self) -> None:
        """Drop the memoryview so the mapping can be closed."""
        self._q.release()

    # -- hot path -----------------------------------------------------------
    def lock(self, s: int) -> None:
        """Acquire stripe ``s`` for writing (seqlock version becomes odd).

        Raises:
            LockTimeout: a live process kept the stripe for too long.
        """
        tl = self._tlocks[s]
        tl.acquire()
        mm = self.mm
        mb = self._marker_base + s
        # Markers are counters, not flags: the C fast paths (_speedups.c) may
        # raise and lower the same byte from another thread of this process
        # while this one waits; they always leave it as they found it.
        mm[mb] += 1
        try:
            try:
                self._acquire(s, self.lock_timeout)
            except posix_ipc.BusyError:
                self._slow_acquire(s)
        except BaseException:
            mm[mb] -= 1
            tl.release()
            raise
        so = self.geometry.stripe_table_off + s * L.STRIPE_SIZE
        mm[so + L.S_OWNER_PID : so + L.S_OWNER_PID + 16] = self.identity.owner
        mm[mb] -= 1
        # Parity is set, not inverted (as in _speedups.c): a version damaged to
        # odd must not turn even while we mutate, or readers take torn values.
        self._q[so >> 3] = ((self._q[so >> 3] + 1) | 1) & _U64_MAX  # odd: readers of this stripe retry

    def unlock(self, s: int) -> None:
        """Release stripe ``s`` (seqlock version becomes even)."""
        mm = self.mm
        so = self.geometry.stripe_table_off + s * L.STRIPE_SIZE
        mb = self._marker_base + s
        self._q[so >> 3] = (self._q[so >> 3] + 2) & (_U64_MAX - 1)  # even: the stripe is consistent again
        mm[mb] += 1
        mm[so + L.S_OWNER_PID : so + L.S_OWNER_PID + 16] = _ZERO16
        self.sems[s].release()
        mm[mb] -= 1
        self._tlocks[s].release()

    # -- contention and recovery --------------------------------------------
    def _acquire(self, s: int, timeout: float) -> None:
        """sem_timedwait, retried when a signal interrupts it (PEP 475)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sems[s].acquire(max(0.0, deadline - time.monotonic()))
                return
            except posix_ipc.SignalError:
                continue

    def _slow_acquire(self, s: int) -> None:
        # Waited lock_timeout already. Keep waiting while a live process holds
        # the stripe, up to a hard bound; recover at once from a dead one.
        hard = time.monotonic() + max(10 * self.lock_timeout, 5.0)
        while True:
            if self.try_recover(s, keep=True):
                return
            try:
                self._acquire(s, self.lock_timeout)
                return
            except posix_ipc.BusyError:
                pass
            if time.monotonic() > hard:
                self._timeout(s)

    def _timeout(self, s: int):
        pid = L.OWNER.unpack_from(self.mm, self._stripe_off(s) + L.S_OWNER_PID)[0]
        raise LockTimeout(
            f"stripe {s} of cache {self.seg.name!r} has been held by live process "
            f"{pid or '(unknown)'} for more than {max(10 * self.lock_timeout, 5.0):.1f} s"
        )

    def _stripe_off(self, s: int) -> int:
        return self.geometry.stripe_table_off + s * L.STRIPE_SIZE

    def _evidence(self, s: int) -> tuple[bool, list[tuple[int, int, float]]] | None:
        """Who could hold stripe ``s``: None if a live process might; else
        (owner_is_dead, [(slot, pid, start) of dead clients with a marker on s]).

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
        pid, _, start = L.OWNER.unpack_from(mm, self._stripe_off(s) + L.S_OWNER_PID)
        if pid and is_alive(pid, start):
            return None
        dead_markers = []
        for c in range(g.max_clients):
            base = g.client_table_off + c * g.client_record_size
            if mm[base + L.C_MARKERS + s]:
                cpid, _, cstart = L.CLIENT_HEAD.unpack_from(mm, base)
                if cpid and not is_alive(cpid, cstart):
                    dead_markers.append((c, cpid, cstart))
        if pid:
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
            self.mm[so + L.S_OWNER_PID : so + L.S_OWNER_PID + 16] = self.identity.owner
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
            self.mm[so + L.S_OWNER_PID : so + L.S_OWNER_PID + 16] = self.identity.owner
            self.repair(s)
            self._q[(so + L.S_RECOVERIES) >> 3] += 1
            self._clear_dead_markers(s, ev[1])
            if not keep:
                self.mm[so + L.S_OWNER_PID : so + L.S_OWNER_PID + 16] = _ZERO16
                self.sems[s].release()
            return True

    def _clear_dead_markers(self, s: int, dead) -> None:
        # Under the client-table lock and only if the slot still belongs to the
        # dead client: the reaper may have handed it to a new process meanwhile.
        g = self.geometry
        with self.seg.file_lock(LOCK_CLIENTS, 10.0, what="client table"):
            for c, pid, start in dead:
                base = g.client_table_off + c * g.client_record_size
                cpid, _, cstart = L.CLIENT_HEAD.unpack_from(self.mm, base)
                if (cpid, cstart) == (pid, start):
                    self.mm[base + L.C_MARKERS + s] = 0

    def _still_stuck(self, s: int, ev) -> bool:
        """Marker-only evidence (no owner recorded) is the ambiguous case: a live
        process that just took the semaphore and has not yet stored its owner
        looks the same for an instant. Wait a grace period: a live holder
        records itself and bumps the version within microseconds; a dead one
        changes nothing."""
        vo = self._stripe_off(s)
        v = L.U64.unpack_from(self.mm, vo)[0]
        time.sleep(max(MARKER_GRACE, self.lock_timeout))
        if L.U64.unpack_from(self.mm, vo)[0] != v or self._evidence(s) != ev:
            return False
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

    def stripe_owner(self, s: int) -> tuple[int, float]:
        """(pid, start) recorded as the holder of stripe ``s``; (0, 0.0) if none."""
        pid, _, start = L.OWNER.unpack_from(self.mm, self._stripe_off(s) + L.S_OWNER_PID)
        return pid, start


# -- client table -------------------------------------------------------------
def _client_base(g: L.Geometry, c: int) -> int:
    return g.client_table_off + c * g.client_record_size


def claim_client(seg: Segment, identity: Identity, timeout: float = 10.0) -> int:
    """Claim a free client slot for this process (reaping dead ones). Returns its index.

    Raises:
        CacheFull: every slot belongs to a live process (raise ``max_clients``).
    """
    g = seg.geometry
    mm = seg.mm
    with seg.file_lock(LOCK_CLIENTS, timeout, what="client table"):
        free = None
        for c in range(g.max_clients):
            base = _client_base(g, c)
            pid, _, start = L.CLIENT_HEAD.unpack_from(mm, base)
            if pid == 0:
                free = c
                break
        if free is None:
            free = _reap_locked(seg, first_only=True)
        if free is None:
            raise CacheFull(
                f"all {g.max_clients} client slots of cache {seg.name!r} belong to live processes; "
                "create the cache with a larger max_clients"
            )
        base = _client_base(g, free)
        mm[base : base + g.client_record_size] = bytes(g.client_record_size)
        L.CLIENT_HEAD.pack_into(mm, base, identity.pid, 0, identity.start)
        return free


def _retire_locked(seg: Segment, c: int) -> None:
    """Fold client ``c``'s counters into the header totals and free the slot."""
    g = seg.geometry
    mm = seg.mm
    base = _client_base(g, c)
    for k in range(L.N_COUNTERS):
        v = L.U64.unpack_from(mm, base + L.C_COUNTERS + 8 * k)[0]
        off = L.H_RETIRED + 8 * k
        L.U64.pack_into(mm, off, L.U64.unpack_from(mm, off)[0] + v)
    mm[base : base + g.client_record_size] = bytes(g.client_record_size)


def release_client(seg: Segment, identity: Identity, c: int) -> None:
    """Give back client slot ``c`` if this process still holds it."""
    g = seg.geometry
    with seg.file_lock(LOCK_CLIENTS, 10.0, what="client table"):
        pid, _, start = L.CLIENT_HEAD.unpack_from(seg.mm, _client_base(g, c))
        if pid == identity.pid and start == identity.start:
            _retire_locked(seg, c)


def _reap_locked(seg: Segment, first_only: bool = False) -> int | list[int] | None:
    g = seg.geometry
    mm = seg.mm
    reaped = []
    for c in range(g.max_clients):
        base = _client_base(g, c)
        pid, _, start = L.CLIENT_HEAD.unpack_from(mm, base)
        if pid == 0 or is_alive(pid, start):
            continue
        if not _clear_stale_markers(seg, base, pid):
            continue  # evidence for a stuck stripe: recovery frees this slot
        _retire_locked(seg, c)
        if first_only:
            return c
        reaped.append(c)
    return None if first_only else reaped


def _clear_stale_markers(seg: Segment, base: int, pid: int) -> bool:
    """Clear the markers of dead client ``pid`` (record at ``base``) that
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
        owner, _, ostart = L.OWNER.unpack_from(mm, g.stripe_table_off + s * L.STRIPE_SIZE + L.S_OWNER_PID)
        if seg.sems[s].value > 0 or (owner and owner != pid and is_alive(owner, ostart)):
            mm[m] = 0
        else:
            left = True
    return not left


def reap_dead_clients(seg: Segment) -> list[int]:
    """Free the client slots of dead processes (keeping their counters). Returns the slots freed."""
    with seg.file_lock(LOCK_CLIENTS, 10.0, what="client table"):
        return _reap_locked(seg)


def live_clients(seg: Segment) -> list[tuple[int, int, float]]:
    """(slot, pid, start) of every claimed client slot."""
    g = seg.geometry
    out = []
    for c in range(g.max_clients):
        pid, _, start = L.CLIENT_HEAD.unpack_from(seg.mm, _client_base(g, c))
        if pid:
            out.append((c, pid, start))
    return out
