"""The public maintenance API: what the daemon, snapshots, the CLI, the
framework adapters, metrics and tests use instead of a ``Cache``'s private
attributes.

Every function takes an open :class:`shmcache.Cache`. Readers take no lock
unless they say so (they read counters that a writer may change meanwhile:
each figure is exact for the instant it was read, the set of them is not one
snapshot). This module is the one place outside ``cache.py`` that reaches
into a ``Cache``'s table, locks and segment: it delegates to them in one line
each, so the storage engine can change underneath without its callers
changing (diskcache's ``check``/``expire``/``cull`` and py-lmdb's
``reader_check`` are the models).

::

    from shmcache import Cache, admin

    cache = Cache("app")
    admin.geometry(cache).n_stripes       # the fixed layout
    admin.counters(cache)["hits"]         # every process, exited ones too
    [s.fill for s in admin.stripes(cache)]
    admin.daemon_info(cache).last_snapshot
    admin.inspect(cache, "user:1")        # type, size, ttl, last access
    for e in admin.entries(cache): ...    # every entry with its metadata
    admin.check(cache)                    # integrity problems, [] if sound
    admin.expire(cache)                   # reclaim expired entries now
    admin.summarize("app")                # by name, without attaching: what `shmcache ls` shows
    me = admin.current_client(cache)      # this process, as every sharer can check it:
    admin.client_attached(cache, *me)     #   alive? (the kernel answers, in any PID namespace)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import codec
from . import layout as L
from .codec import decode_key
from .errors import Error
from .lock import (
    attached_clients,
    client_alive,
    daemon_local_pid,
    daemon_pid,
    live_clients,
    lock_words,
    reap_dead_clients,
)
from .segment import LOCK_DAEMON, Segment

if TYPE_CHECKING:  # pragma: no cover
    from .cache import Cache

__all__ = [
    "ClientInfo", "DaemonInfo", "EntryInfo", "SnapshotStatus", "StripeInfo", "TYPE_NAMES",
    "CacheSummary", "SNAPSHOT_PATH_MAX_BYTES", "accelerated",
    "check", "claim_daemon_lock", "client_attached", "clients", "counters", "created", "current_client",
    "daemon_info", "daemon_lock_holder", "lock_holders", "pickle_trust", "summarize", "entries", "expire",
    "expiry_summary", "geometry", "inspect",
    "RawWriter", "Storage", "expiring", "heartbeat", "mark_daemon_ready", "publish_daemon",
    "reap_clients",
    "record_snapshot", "recover", "recover_stripes", "repair", "storage", "stored_items", "stripes",
    "withdraw_daemon",
]

#: What :attr:`EntryInfo.type` says for each stored value type.
TYPE_NAMES = {
    codec.BYTES: "bytes", codec.STR: "str", codec.INT: "int", codec.FLOAT: "float",
    codec.NDARRAY: "ndarray", codec.PICKLE: "pickle", codec.CUSTOM: "custom",
}


# ----------------------------------------------------------------- geometry
def geometry(cache: "Cache") -> L.Geometry:
    """The segment's fixed layout (sizes, stripes, limits), as created."""
    cache._check_open()
    return cache._g


def created(cache: "Cache") -> bool:
    """True if this handle created the cache's segment (False: it attached to
    an existing one, whose layout won over the settings it was given)."""
    cache._check_open()
    return bool(cache._seg.created)


def accelerated(cache: "Cache") -> bool:
    """True if this handle runs the C accelerator's fast paths; False if it
    runs the pure-Python fallback (the extension could not be built at
    install, or ``SHMCACHE_PURE_PYTHON`` was set). Both read and write the
    same segment; the fallback is several times slower per call."""
    cache._check_open()
    return cache._core is not None


def _stripe_table(cache: "Cache") -> np.ndarray:
    cache._check_open()
    return cache._table.stripes


# ------------------------------------------------------------------ stripes
@dataclass(frozen=True)
class StripeInfo:
    """One stripe's fill and counters (a lock-free read of its record)."""

    index: int
    items: int  #: entries stored, expired ones not yet reclaimed included
    bytes_used: int  #: arena bytes held by live entries
    bytes_garbage: int  #: arena bytes of the segments in use not held by live entries (freed by reclaim)
    arena_bytes: int  #: the stripe's arena size
    evictions: int  #: entries evicted by LRU in this stripe, ever
    recoveries: int  #: times the stripe was repaired after its lock holder died
    locked_by: int | None  #: pid recorded as the lock holder right now
    writes: int = 0  #: write-lock holds so far (the seqlock version / 2): a rate of it shows hot stripes
    lock_waits: int = 0  #: lock acquisitions that found the stripe locked and waited, all processes, ever
    lock_wait_seconds: float = 0.0  #: total seconds those waits took (first try to acquisition)
    lock_wait_max_seconds: float = 0.0  #: the longest single wait

    @property
    def lock_wait_mean_seconds(self) -> float:
        """Mean seconds per lock wait (0.0 if none yet)."""
        return self.lock_wait_seconds / self.lock_waits if self.lock_waits else 0.0

    @property
    def fill(self) -> float:
        """Share of the arena held by live entries, 0..1."""
        return self.bytes_used / self.arena_bytes if self.arena_bytes else 0.0


def stripes(cache: "Cache") -> list[StripeInfo]:
    """Every stripe's fill and counters, lock waits included, in stripe order.

    A lock wait is a write (or a reader's locked fallback) that found the
    stripe's lock taken by another process or thread and waited for it; each
    waiter counts its own wait right after acquiring, so the figures cover
    every process, exited ones included. Rates of ``lock_waits`` and
    ``lock_wait_seconds`` show contended stripes (``shmcache top``)."""
    st = _stripe_table(cache).copy()  # one pass; numbers may move while we format
    g = cache._g
    arena = g.stripe_arena
    out = []
    locks = cache._locks
    for i, row in enumerate(st.tolist()):
        owner = locks.stripe_owner(i)[0] if row[L.S_LOCK // 8] else 0
        live = row[L.S_LIVE // 8]
        head, tail, fill = L.unpack_ring(row[L.S_RING // 8])
        in_use = ((head - tail) % g.n_segs) * g.seg_size + min(fill, g.seg_size)
        out.append(StripeInfo(
            index=i, items=row[L.S_ITEMS // 8], bytes_used=live, bytes_garbage=max(0, in_use - live),
            arena_bytes=arena, evictions=row[L.S_EVICTIONS // 8], recoveries=row[L.S_RECOVERIES // 8],
            locked_by=owner or None, writes=row[L.S_VERSION // 8] >> 1,
            lock_waits=row[L.S_LOCK_WAITS // 8], lock_wait_seconds=row[L.S_LOCK_WAIT_NS // 8] / 1e9,
            lock_wait_max_seconds=row[L.S_LOCK_WAIT_MAX_NS // 8] / 1e9,
        ))
    return out


def lock_holders(cache: "Cache") -> list[int | None]:
    """Who holds each stripe's lock, in stripe order: None if it is free, else
    the holder's client slot (-1 for a lock word that names no slot: damage,
    which the next writer or the daemon takes over like a dead holder's).
    A lock-free read."""
    cache._check_open()
    return [None if h is None else h[0] for h in map(L.lock_holder, lock_words(cache._seg).tolist())]


_REMOVED = {
    "lock_values": "stripe locks are lock words since layout 6: admin.lock_holders(cache) says who holds each",
    "fix_overcount": "stripe locks are lock words since layout 6, which cannot be over-released; there is "
                     "nothing to fix (admin.recover frees stripes of dead holders)",
}


def __getattr__(name: str):
    if name in _REMOVED:
        raise AttributeError(f"shmcache.admin.{name} was removed: {_REMOVED[name]}")
    raise AttributeError(f"module 'shmcache.admin' has no attribute {name!r}")


def stored_items(cache: "Cache") -> int:
    """Entries stored right now, expired ones not yet reclaimed included.

    A lock-free sum of the per-stripe counters: O(stripes), microseconds,
    where ``len(cache)`` scans the whole index to leave expired entries out.
    """
    return int(_stripe_table(cache)[:, L.S_ITEMS // 8].sum())


# ----------------------------------------------------------------- counters
def counters(cache: "Cache") -> dict[str, int]:
    """Operation totals of every process that ever attached: ``hits``,
    ``misses``, ``sets``, ``deletes``, ``evictions``, ``expirations`` (the sum
    of the live clients' own counters and those folded into the header when a
    client detached), plus ``recoveries`` (stripes repaired after a dead
    holder) and ``lock_waits`` (lock acquisitions that had to wait; per
    stripe and with their seconds in :func:`stripes`). Each process writes
    only its own counters, so the totals are exact: monotonic, and nothing
    is counted twice."""
    cache._check_open()
    g = cache._g
    mm = cache._seg.mm
    totals = [L.U64.unpack_from(mm, L.H_RETIRED + 8 * k)[0] for k in range(L.N_COUNTERS)]
    for c, _pid, _start in live_clients(cache._seg):
        base = g.client_table_off + c * g.client_record_size + L.C_COUNTERS
        for k in range(L.N_COUNTERS):
            totals[k] += L.U64.unpack_from(mm, base + 8 * k)[0]
    out = dict(zip(L.COUNTERS, totals))
    st = _stripe_table(cache)
    out["recoveries"] = int(st[:, L.S_RECOVERIES // 8].sum())
    out["lock_waits"] = int(st[:, L.S_LOCK_WAITS // 8].sum())
    return out


# ------------------------------------------------------------------ clients
@dataclass(frozen=True)
class ClientInfo:
    """One attached process (a claimed client slot)."""

    slot: int
    pid: int
    alive: bool  #: False: it died without detaching (the daemon frees the slot)
    counters: dict[str, int]  #: this process's own operation counters


def clients(cache: "Cache") -> list[ClientInfo]:
    """Every claimed client slot, with its process's counters and liveness."""
    cache._check_open()
    g = cache._g
    mm = cache._seg.mm
    out = []
    for c, pid, start in live_clients(cache._seg):
        base = g.client_table_off + c * g.client_record_size + L.C_COUNTERS
        ctr = {name: L.U64.unpack_from(mm, base + 8 * k)[0] for k, name in enumerate(L.COUNTERS)}
        out.append(ClientInfo(slot=c, pid=pid, alive=client_alive(cache._seg, c), counters=ctr))
    return out


def current_client(cache: "Cache") -> tuple[int, int]:
    """(slot, generation) of the client slot this process holds in ``cache``:
    an identity of this process that every other process sharing the cache
    can check with :func:`client_attached`, whatever PID namespace either
    runs in (a pid cannot be). The generation tells apart successive
    processes in one slot. It changes in a forked child (which claims a slot
    of its own), so read it when needed rather than keeping it.

    Raises:
        ValueError: the cache is closed.
    """
    cache._check_open()
    client = cache._state.client
    return client.slot, client.gen


def client_attached(cache: "Cache", slot: int, generation: int) -> bool:
    """True while the process that held client ``slot`` at ``generation``
    (an identity from :func:`current_client`) is still attached to ``cache``.

    The kernel answers: the slot's byte of the segment is locked (an OFD
    ``fcntl`` lock) exactly as long as its process lives and keeps the cache
    open, so the answer is right across PID namespaces and never wrong after
    a SIGKILL or a reused pid. One ``fcntl`` call (~1 us), no lock taken.

    Raises:
        ValueError: the cache is closed.
    """
    cache._check_open()
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < cache._g.max_clients:
        return False
    return client_alive(cache._seg, slot, generation)


# ------------------------------------------------------------------- daemon
@dataclass(frozen=True)
class SnapshotStatus:
    """The daemon's last snapshot attempt, as it recorded it in the header."""

    time: float  #: wall clock when the attempt ended
    ok: bool
    entries: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None  #: why it failed (None if it succeeded)


@dataclass(frozen=True)
class DaemonInfo:
    """Who serves the cache: ``pid`` is None if no daemon ever did."""

    pid: int | None
    alive: bool
    heartbeat: float | None  #: wall clock of its last tick
    snapshot_path: str | None  #: where it writes snapshots (None: snapshots off)
    last_snapshot: SnapshotStatus | None  #: None: no attempt yet
    heartbeat_age: float | None = field(default=None)  #: seconds since ``heartbeat``
    ready: bool = False  #: alive and serving: its start-up snapshot restore is done
    #: its pid in this process's PID namespace (the kernel's answer), None if
    #: it is not alive or runs in a namespace this process cannot see (another
    #: container). Signal it by this one, never by ``pid`` (its own view).
    local_pid: int | None = None


def _read_text(mm: Any, off: int, size: int) -> str | None:
    raw = bytes(mm[off : off + size]).split(b"\0", 1)[0]
    return raw.decode("utf-8", "surrogateescape") if raw else None


def _write_text(mm: Any, off: int, size: int, text: str | None) -> None:
    raw = (text or "").encode("utf-8", "surrogateescape")[: size - 1]
    mm[off : off + size] = raw + bytes(size - len(raw))


def daemon_info(cache: "Cache") -> DaemonInfo:
    """The daemon's pid, liveness, heartbeat, snapshot path and last snapshot."""
    cache._check_open()
    mm = cache._seg.mm
    pid = L.U64.unpack_from(mm, L.H_DAEMON_PID)[0]
    beat = L.F64.unpack_from(mm, L.H_DAEMON_HEARTBEAT)[0]
    status = L.U64.unpack_from(mm, L.H_SNAPSHOT_STATUS)[0]
    last = None
    if status in (L.SNAPSHOT_OK, L.SNAPSHOT_FAILED):
        ok = status == L.SNAPSHOT_OK
        last = SnapshotStatus(
            time=L.F64.unpack_from(mm, L.H_SNAPSHOT_TIME)[0], ok=ok,
            entries=L.U64.unpack_from(mm, L.H_SNAPSHOT_ENTRIES)[0],
            bytes=L.U64.unpack_from(mm, L.H_SNAPSHOT_BYTES)[0],
            seconds=L.F64.unpack_from(mm, L.H_SNAPSHOT_SECONDS)[0],
            error=None if ok else _read_text(mm, L.H_SNAPSHOT_ERROR, L.SNAPSHOT_ERROR_MAX),
        )
    alive = bool(pid) and daemon_pid(cache._seg) is not None
    return DaemonInfo(
        pid=pid or None,
        alive=alive,
        local_pid=daemon_local_pid(cache._seg) if alive else None,
        ready=alive and L.U64.unpack_from(mm, L.H_DAEMON_READY)[0] == pid,
        heartbeat=beat or None,
        heartbeat_age=(time.time() - beat) if beat else None,
        snapshot_path=_read_text(mm, L.H_SNAPSHOT_PATH, L.SNAPSHOT_PATH_MAX) if pid else None,
        last_snapshot=last,
    )


def publish_daemon(cache: "Cache", pid: int, start: float, snapshot_path: str | None) -> None:
    """Record ``pid`` (process start time ``start``) as the cache's daemon and
    where it writes snapshots; forget the previous daemon's last snapshot.
    For a daemon process only (``shmcache.daemon`` calls it at start).

    Raises:
        ValueError: ``snapshot_path`` is longer than the header holds
            (``layout.SNAPSHOT_PATH_MAX`` - 1 bytes in UTF-8).
    """
    cache._check_open()
    if snapshot_path is not None and len(snapshot_path.encode("utf-8", "surrogateescape")) >= L.SNAPSHOT_PATH_MAX:
        raise ValueError(f"snapshot path is longer than {L.SNAPSHOT_PATH_MAX - 1} bytes: {snapshot_path!r}")
    mm = cache._seg.mm
    L.U64.pack_into(mm, L.H_SNAPSHOT_STATUS, L.SNAPSHOT_NONE)
    _write_text(mm, L.H_SNAPSHOT_PATH, L.SNAPSHOT_PATH_MAX, snapshot_path)
    L.U64.pack_into(mm, L.H_DAEMON_READY, 0)
    L.U64.pack_into(mm, L.H_DAEMON_PID, pid)
    L.F64.pack_into(mm, L.H_DAEMON_START, start)
    heartbeat(cache)


#: Longest snapshot path a daemon can record in the header (bytes, UTF-8).
SNAPSHOT_PATH_MAX_BYTES = L.SNAPSHOT_PATH_MAX - 1


def claim_daemon_lock(cache: "Cache") -> bool:
    """Take the cache's daemon lock (an fcntl lock the kernel drops when the
    process dies, or when ``cache`` is closed): at most one daemon per cache.
    True if this process holds it now; False if another process does (see
    :func:`daemon_lock_holder`). For a daemon process only."""
    cache._check_open()
    return cache._seg.try_file_lock(LOCK_DAEMON)


def daemon_lock_holder(cache: "Cache") -> int | None:
    """The pid holding the cache's daemon lock as the kernel reports it (in
    this process's PID namespace; 0 if it runs in another one), or None if
    nobody holds it or this process does."""
    cache._check_open()
    return cache._seg.file_lock_holder(LOCK_DAEMON)


def mark_daemon_ready(cache: "Cache", pid: int) -> None:
    """Record that daemon ``pid`` serves (its start-up restore is done): what
    ``shmcache wait`` waits for. Daemon only."""
    cache._check_open()
    L.U64.pack_into(cache._seg.mm, L.H_DAEMON_READY, pid)


def heartbeat(cache: "Cache", now: float | None = None) -> None:
    """Record a daemon tick at ``now`` (wall clock, default: now). Daemon only."""
    cache._check_open()
    L.F64.pack_into(cache._seg.mm, L.H_DAEMON_HEARTBEAT, time.time() if now is None else now)


def withdraw_daemon(cache: "Cache", pid: int) -> None:
    """Clear the daemon record if ``pid`` is the recorded daemon (at its exit).
    The last snapshot status stays readable."""
    cache._check_open()
    mm = cache._seg.mm
    if L.U64.unpack_from(mm, L.H_DAEMON_PID)[0] == pid:
        L.U64.pack_into(mm, L.H_DAEMON_READY, 0)
        L.U64.pack_into(mm, L.H_DAEMON_PID, 0)
        L.F64.pack_into(mm, L.H_DAEMON_HEARTBEAT, 0.0)


def record_snapshot(cache: "Cache", *, ok: bool, entries: int = 0, nbytes: int = 0, seconds: float = 0.0,
                    error: str | None = None, now: float | None = None) -> None:
    """Record the outcome of a snapshot attempt in the header (status last, so
    a reader that sees the new status sees its figures). Daemon only."""
    cache._check_open()
    mm = cache._seg.mm
    L.U64.pack_into(mm, L.H_SNAPSHOT_STATUS, L.SNAPSHOT_NONE)
    L.F64.pack_into(mm, L.H_SNAPSHOT_TIME, time.time() if now is None else now)
    L.U64.pack_into(mm, L.H_SNAPSHOT_ENTRIES, entries)
    L.U64.pack_into(mm, L.H_SNAPSHOT_BYTES, nbytes)
    L.F64.pack_into(mm, L.H_SNAPSHOT_SECONDS, seconds)
    _write_text(mm, L.H_SNAPSHOT_ERROR, L.SNAPSHOT_ERROR_MAX, None if ok else (error or "failed"))
    L.U64.pack_into(mm, L.H_SNAPSHOT_STATUS, L.SNAPSHOT_OK if ok else L.SNAPSHOT_FAILED)


# ------------------------------------------------------------ by name
@dataclass(frozen=True)
class CacheSummary:
    """What ``shmcache ls`` shows of one cache."""

    name: str
    size: int  #: bytes of the segment
    items: int  #: entries stored, expired ones not yet reclaimed included
    clients: int  #: processes attached right now
    daemon_pid: int | None  #: the serving daemon (as it sees itself), None if none runs
    #: the serving daemon's pid in this process's PID namespace; None if none
    #: runs or it runs in one this process cannot see (see DaemonInfo.local_pid)
    daemon_local_pid: int | None = None


def summarize(name: str, *, owner: int | str | None = None, timeout: float = 0.5) -> CacheSummary:
    """Size, items, attached processes and daemon of cache ``name``, read
    without attaching as a client: it needs no free client slot, is not
    counted among the clients, and reads no value (so any ``mode`` is
    accepted; the owner check still holds, ``owner`` as for :class:`Cache`).

    Raises:
        CacheNotFound: no such cache.
        PermissionDenied / UntrustedSegment: it belongs to someone else.
        shmcache.Error: it is damaged or still being created after ``timeout`` s.
    """
    seg = Segment.open(name, create=False, timeout=timeout, mode=0o777, owner=owner)
    try:
        g = seg.geometry
        st = np.frombuffer(seg.mm, dtype=np.uint64, count=g.n_stripes * L.STRIPE_SIZE // 8,
                           offset=g.stripe_table_off)
        try:
            items = int(st.reshape(g.n_stripes, L.STRIPE_SIZE // 8)[:, L.S_ITEMS // 8].sum())
        finally:
            del st
        running = daemon_pid(seg)
        return CacheSummary(name=name, size=g.total_size, items=items, clients=attached_clients(seg),
                            daemon_pid=running, daemon_local_pid=daemon_local_pid(seg) if running else None)
    finally:
        seg.close()


# ------------------------------------------------------------------ entries
@dataclass(frozen=True)
class EntryInfo:
    """One stored entry and its metadata. ``value`` is None unless asked for."""

    key: str | bytes
    type: str  #: one of TYPE_NAMES' values: bytes, str, int, float, ndarray, pickle, custom
    size: int  #: bytes of the encoded value
    key_size: int  #: bytes of the encoded key
    expires_at: float | None  #: absolute deadline on the cache's clock; None = never
    ttl: float | None  #: seconds left at the time of the read; None = never expires
    accessed: bool  #: read since written (or since its last second chance): survives its segment's next reclaim
    age: float  #: place in its stripe's ring: 0.0 = reclaimed next .. 1.0 = written last (1.0 from inspect)
    stripe: int
    flags: int  #: the codec's type tag (for raw copies, e.g. snapshots)
    raw_key: bytes = b""  #: the encoded key
    raw_value: bytes | None = None  #: the encoded value, when asked for with ``raw=True``


def _entry(cache: "Cache", s: int, kb: Any, flags: int, vb: Any, exp: float, at: float, now: float,
           raw: bool, age: float = 1.0) -> EntryInfo:
    kb = bytes(kb)
    return EntryInfo(
        key=decode_key(kb), type=TYPE_NAMES.get(flags, f"unknown({flags})"), size=len(vb), key_size=len(kb),
        expires_at=exp or None, ttl=(exp - now) if exp else None, accessed=bool(at), age=age, stripe=s, flags=flags,
        raw_key=kb, raw_value=bytes(vb) if raw else None,
    )


def entries(cache: "Cache", *, include_expired: bool = False, raw: bool = False,
            stripe: int | None = None) -> Iterator[EntryInfo]:
    """Every entry with its metadata, stripe by stripe (each stripe copied
    consistently, lock-free with seqlock retries; the whole is not one
    point in time). Expired entries not yet reclaimed are left out unless
    ``include_expired``. ``raw=True`` also gives each encoded value.
    Reading does not count as a hit and does not refresh LRU times.

    Raises:
        ValueError: the cache is closed, or ``stripe`` is out of range.
    """
    cache._check_open()
    t = cache._table
    if stripe is not None and not 0 <= stripe < t.n_stripes:
        raise ValueError(f"stripe must be in 0..{t.n_stripes - 1}, got {stripe}")
    for s in (range(t.n_stripes) if stripe is None else (stripe,)):
        now = cache._clock()
        for kb, flags, vb, exp, at, age in t.stripe_records(s):
            if include_expired or not (exp and exp <= now):
                yield _entry(cache, s, kb, flags, vb, exp, at, now, raw, age)


def inspect(cache: "Cache", key: str | bytes, *, raw: bool = False) -> EntryInfo | None:
    """Metadata of ``key``: type, size, ttl, last access (None if absent or
    expired). Does not count as a hit and does not refresh its LRU time.
    ``raw=True`` also gives the encoded value (``raw_value``, with ``flags``).

    Raises:
        TypeError / KeyTooLong / ValueError: a bad key, as :meth:`Cache.get`.
    """
    cache._check_open()
    kb = cache._key(key)
    r = cache._read(kb)
    now = cache._clock()
    if r is None or (r[2] and r[2] <= now):
        return None
    flags, vb, exp, p, at = r  # p: the key's access-bit offset, at: the bit
    s = (p - cache._g.refs_off) // cache._g.slots_per_stripe
    return _entry(cache, s, kb, flags, vb, exp, at, now, raw)


def pickle_trust(cache: "Cache") -> codec.Codec:
    """A codec that unpickles exactly as ``cache`` does (README "Security"):
    full pickle only where the cache allows it, else global-free pickles
    only (``PickleRefused`` for the rest). For adapters that decode values
    the cache holds on their behalf (``shmcache.near``)."""
    cache._check_open()
    c = cache._codec
    out = codec.Codec(allow_pickle=c.allow_pickle, where=c.where, why=c.why)
    out.still_trusted = c.still_trusted  # a private cache opened to a group later stops unpickling
    return out


# -------------------------------------------------------------- maintenance
def check(cache: "Cache", *, fix: bool = False) -> list[str]:
    """Integrity problems of every stripe (checksums, reachability from the
    home slot, each segment's entry chain as a reclaim walks it, accounting);
    ``[]`` means sound. Each stripe is checked under
    its lock (a 64 MiB stripe takes a few ms). With ``fix=True`` a damaged
    stripe is then repaired: entries failing their checksum are dropped and
    its index rebuilt, and a segment whose chain is broken is cut back to
    where it breaks (the entries after it dropped); the problems found before
    repair are returned.

    Raises:
        LockTimeout: a live process kept a stripe locked too long.
    """
    cache._check_open()
    problems = []
    for s in range(cache._g.n_stripes):
        stuck = cache._stuck_odd_version(s)
        found = cache._table.check(s)  # its lock and unlock set the version's parity right
        if stuck is not None:
            found.append(
                f"stripe {s}: seqlock version {stuck} was odd while no writer held the lock "
                f"(damage): lock-free readers had to fall back to the lock; repaired"
            )
        if found and fix:
            repair(cache, s)
        problems.extend(found)
    return problems


def repair(cache: "Cache", stripe: int) -> int:
    """Rebuild one stripe under its lock, dropping entries that fail their
    checksum. Returns how many were dropped.

    Raises:
        ValueError: ``stripe`` is out of range.
        LockTimeout: a live process kept the stripe locked too long.
    """
    cache._check_open()
    if not 0 <= stripe < cache._g.n_stripes:
        raise ValueError(f"stripe must be in 0..{cache._g.n_stripes - 1}, got {stripe}")
    locks = cache._locks
    locks.lock(stripe)
    try:
        return cache._table.repair(stripe, full=True)
    finally:
        locks.unlock(stripe)


def expire(cache: "Cache", stripe: int | None = None, *, limit: int | None = None,
           now: float | None = None, timing: dict | None = None) -> int:
    """Reclaim entries expired at ``now`` (default: the cache's clock) in one
    stripe or all of them; returns how many went. Reads never return expired
    entries anyway: this frees their room early (the daemon does it on a
    timer). With ``limit`` at most that many go per stripe, through the
    per-key path (each stripe held for about 5 us per entry); without it
    each stripe is rebuilt in one lock hold (~0.5 ms for a 64 MiB stripe,
    longest hold kept in ``timing["max_lock_hold"]``), falling back to the
    per-key path when a writer got in meanwhile.

    Raises:
        ValueError: ``stripe`` is out of range.
        LockTimeout: a live process kept a stripe locked too long.
    """
    cache._check_open()
    t = cache._table
    if stripe is not None and not 0 <= stripe < t.n_stripes:
        raise ValueError(f"stripe must be in 0..{t.n_stripes - 1}, got {stripe}")
    when = cache._clock() if now is None else now
    n = 0
    for s in (range(t.n_stripes) if stripe is None else (stripe,)):
        if limit is not None:
            n += t.sweep_expired(s, when, limit)
            continue
        done = t.expire_bulk(s, when, timing)
        if done is None:
            while True:
                k = t.sweep_expired(s, when, 4096)
                n += k
                if k < 4096:
                    break
        else:
            n += done
    return n


def expiring(cache: "Cache", now: float, first: int = 0, count: int | None = None) -> np.ndarray:
    """How many entries of stripes ``first .. first+count`` are expired at
    ``now``: a vectorised, lock-free scan of the index's expiry column (what
    the daemon's active expiry uses to pick stripes)."""
    cache._check_open()
    sl = cache._table.slots
    end = cache._g.n_stripes if count is None else min(cache._g.n_stripes, first + count)
    exp = sl["expire"][first:end]
    return np.count_nonzero((exp > 0.0) & (exp <= now), axis=1)


def expiry_summary(cache: "Cache", now: float) -> tuple[int, float]:
    """``(keys that have a deadline, their mean seconds left)`` among the
    entries live at ``now`` (0.0 when none): what Redis' ``INFO keyspace``
    shows as ``expires=`` and ``avg_ttl=``. The same vectorised, lock-free
    scan of the index's expiry column as :func:`expiring`."""
    cache._check_open()
    sl = cache._table.slots
    exp = sl["expire"]
    live = (sl["tag"] != 0) & (exp > now) & np.isfinite(exp)
    n = int(np.count_nonzero(live))
    return n, (float(exp[live].mean()) - now) if n else 0.0


def recover_stripes(cache: "Cache") -> list[int]:
    """Repair and release every stripe whose lock holder died. Returns the
    stripes recovered.

    Only held stripes are looked at (one numpy read of the lock words), so an
    idle cache costs no fcntl calls. "Dead" is the kernel's answer (the
    holder's client slot lock is free), so a live holder in another PID
    namespace is never taken over.
    """
    cache._check_open()
    locks = cache._locks
    done, failed = [], []
    for s in np.nonzero(lock_words(cache._seg))[0].tolist():
        try:  # one stripe's failure (damage its repair cannot handle) must not stop the others
            if locks.try_recover(s, keep=False):
                done.append(s)
        except Exception as e:  # noqa: BLE001 - reported below, after the other stripes
            failed.append((s, e))
    if failed:
        s, e = failed[0]
        raise Error(
            f"recovering stripe(s) {[f for f, _ in failed]} of cache {cache.name!r} failed "
            f"(stripe {s}: {type(e).__name__}: {e}); recovered {done}; the next writer or pass retries them"
        ) from e
    return done


def reap_clients(cache: "Cache") -> list[int]:
    """Free the client slots of dead processes (their counters are kept in the
    header totals). Returns the slots freed.

    Raises:
        LockTimeout: the client-table lock stayed busy.
    """
    cache._check_open()
    return reap_dead_clients(cache._seg)


def recover(cache: "Cache") -> tuple[list[int], list[int]]:
    """Everything the daemon's recovery timer does, once: :func:`recover_stripes`,
    then :func:`reap_clients`. Returns (stripes recovered, client slots freed).
    Dead clients are reaped even when a stripe's recovery failed (that raises
    Error, after the other stripes were tried)."""
    try:
        stripes_done = recover_stripes(cache)
    finally:
        clients = reap_clients(cache)  # whatever happened to the stripes
    return stripes_done, clients


# ------------------------------------------------------------ raw storage
@dataclass(frozen=True)
class Storage:
    """The storage engine under a cache, for code that must copy stripes raw
    (snapshots copy arenas at ~1 GB/s under each stripe's seqlock; going
    through per-entry calls would be ~50x slower). This is the one sanctioned
    layer breach: such code depends on the engine's layout, not just on the
    API, and changes with it."""

    segment: Any
    table: Any
    locks: Any
    geometry: L.Geometry


def storage(cache: "Cache") -> Storage:
    """The :class:`Storage` under an open cache (see there why it exists)."""
    cache._check_open()
    return Storage(segment=cache._seg, table=cache._table, locks=cache._locks, geometry=cache._g)


class _SetClock:
    """A clock that reads whatever it was set to: restored entries keep their
    original last-access time, so LRU order survives a restore."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RawWriter:
    """Stores already-encoded entries with their own deadline and last-access
    time (what a snapshot restore needs: ``Cache.set`` would stamp them with
    the current time). Counts as this process's sets. Use as a context
    manager, or call :meth:`close`.

    Raises (from :meth:`write`):
        CacheFull: policy noeviction and no room.
        LockTimeout: a live process kept the stripe locked too long.
    """

    def __init__(self, cache: "Cache") -> None:
        from .table import Table

        cache._check_open()
        self._clock = _SetClock()
        self._table = Table(cache._seg, cache._locks, self._clock, cache._ctr, cache._table.cbase)

    def write(self, kb: Any, flags: int, vb: Any, expire: float, atime: float, *,
              only_if_absent: bool = False) -> bool:
        """Store encoded key ``kb`` -> (``flags``, ``vb``) with absolute
        ``expire`` (0 = never) and last access ``atime``. With
        ``only_if_absent`` a present key is kept. Returns whether it stored."""
        from .table import ADD, SET

        self._clock.now = atime
        return self._table.write(kb, flags, vb, expire, ADD if only_if_absent else SET)

    def close(self) -> None:
        """Drop the views onto the segment. Idempotent."""
        if self._table is not None:
            self._table.release_views()
            self._table = None

    def __enter__(self) -> "RawWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
