"""The byte layout of a shmcache segment: the one module that knows offsets.

Everything about the segment's bytes lives here: the magic, the layout
version, every ``struct.Struct`` and numpy dtype, and the arithmetic that turns
user-facing settings (``size``, ``stripes``, ``max_items`` ...) into a fixed
geometry. Nothing in a segment ever moves or grows after creation.

::

    offset 0          +-------------------------------------------+
                      | header (one 4 KiB page)                   |
    stripe_table_off  +-------------------------------------------+
                      | stripe records, 128 B each: a hot line    |
                      | (lock, seqlock, ring) + a cold one (waits)|
    client_table_off  +-------------------------------------------+
                      | client records: 64 B + 1 B per stripe     |
    index_off         +-------------------------------------------+
                      | index: stripes x slots_per_stripe x 16 B  |
                      |   stripe 0 slots | stripe 1 slots | ...   |
    refs_off          +-------------------------------------------+
                      | access bits: 1 B per index slot           |
    arena_off         +-------------------------------------------+
                      | arenas: stripes x stripe_arena bytes,     |
                      | each a ring of n_segs segments:           |
                      |   [seg hdr|entry|entry|..][seg hdr|..]... |
                      +-------------------------------------------+

Every field below is commented with who writes it, who reads it and whether a
stale read is safe. "Under the stripe lock" means: written only while holding
that stripe's lock word with the stripe's seqlock version odd.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass

import numpy as np
import xxhash

from .errors import LayoutMismatch

MAGIC = b"SHMCACHE"
#: Bumped whenever any offset or field below changes meaning. Attaching to a
#: segment of another version raises LayoutMismatch; snapshots carry entries,
#: not layouts, so they restore across versions.
LAYOUT_VERSION = 6  # 2: owners are client slots + generation, clients locked (OFD) for liveness
#                     3: segment-ring arena, 16-byte slots, access bits, 12-byte entry header
#                     4: stripe records are two cache lines; the second counts lock waits;
#                        segment headers hold a reclaim cursor (reclaim in steps)
#                     5: entry checksums are xxh3 (low 32 bits), not xxh32: readers
#                        verify them on every get, and xxh32 cost 2.6 us per 16 KiB
#                     6: stripe locks are a lock word in the stripe record (CAS of the
#                        holder's client slot + generation, futex waits), not POSIX
#                        semaphores; client records lose their marker bytes

PAGE = 4096
CACHE_LINE = 64

# --------------------------------------------------------------------------
# Header: one page at offset 0.
#
# Written once by the initializer (under the init lock), magic last, so an
# attacher that sees the magic sees a complete header. After that only the
# generation, daemon fields and retired counters change.
HEADER = struct.Struct(
    "<8s"  # magic            initializer, last of all; readers: attach
    "I"  # layout_version     initializer
    "I"  # header_size        initializer (PAGE)
    "Q"  # total_size         initializer: bytes of the whole segment
    "I"  # n_stripes          initializer: power of two
    "I"  # max_clients        initializer
    "I"  # slots_per_stripe   initializer
    "I"  # max_key_size       initializer: bytes of the encoded key
    "Q"  # max_value_size     initializer: bytes of the encoded value
    "Q"  # stripe_arena       initializer: arena bytes per stripe
    "Q"  # max_items          initializer: items per stripe x stripes
    "Q"  # stripe_table_off
    "Q"  # client_table_off
    "Q"  # client_record_size
    "Q"  # index_off
    "Q"  # arena_off
    "d"  # created            wall clock seconds
    "I"  # policy             0 = lru, 1 = noeviction
    "I"  # mode               permission bits the segment was created with
    "Q"  # seg_size           initializer: bytes per arena segment
    "Q"  # refs_off           initializer: the access-bit array
)
HEADER_POLICY_LRU = 0
HEADER_POLICY_NOEVICTION = 1
POLICIES = {"lru": HEADER_POLICY_LRU, "noeviction": HEADER_POLICY_NOEVICTION}
POLICY_NAMES = {v: k for k, v in POLICIES.items()}

# Mutable header fields live at fixed offsets after the static part, each
# 8-byte aligned so a single aligned store/load is never torn on x86-64.
#   generation: bumped by clear() and restore (under every stripe lock).
#     Readers: stats, snapshot; stale read safe.
H_GENERATION = 256
#   daemon pid / daemon process start time / heartbeat (wall clock): written
#   by the daemon only; stale reads are safe (liveness is the kernel's: is the
#   daemon's fcntl lock (LOCK_DAEMON) held, see lock.daemon_pid).
H_DAEMON_PID = 264
H_DAEMON_START = 272
H_DAEMON_HEARTBEAT = 280
#   Last snapshot the daemon attempted (written by the daemon only, after each
#   attempt, status last; read by shmcache.admin.daemon_info for stats, top and
#   Prometheus). A stale read is safe: it only describes the previous attempt.
#   time: wall clock when the attempt ended (0.0 = none yet); status: 0 none,
#   1 written, 2 failed; entries/bytes/seconds of the written file.
H_SNAPSHOT_TIME = 288
H_SNAPSHOT_STATUS = 296
H_SNAPSHOT_ENTRIES = 304
H_SNAPSHOT_BYTES = 312
H_SNAPSHOT_SECONDS = 320
SNAPSHOT_NONE, SNAPSHOT_OK, SNAPSHOT_FAILED = 0, 1, 2
#   The daemon's pid once it serves (its start-up restore is done); 0 while it
#   starts and after it stops. Written by the daemon only (admin.publish_daemon
#   zeroes it, admin.mark_daemon_ready sets it, admin.withdraw_daemon clears it);
#   read by `shmcache wait` and daemon_info, together with the kernel's answer
#   on the daemon lock, so a stale value of a dead daemon is never "ready".
H_DAEMON_READY = 328
#   Retired counters: a client's counters are added here when its slot is
#   released (close, exit, or reaped after death) under the client-table lock,
#   so totals never go backwards when a process exits.
H_RETIRED = 512  # N_COUNTERS x u64
#   The daemon's snapshot path and the last snapshot error, UTF-8
#   (surrogateescape), NUL-padded: written by the daemon at start / after a
#   failed attempt; readers (`shmcache snapshot`, stats) see at worst a torn
#   string while it is rewritten, which they only display or retry.
H_SNAPSHOT_PATH = 1024
SNAPSHOT_PATH_MAX = 1024
H_SNAPSHOT_ERROR = 2048
SNAPSHOT_ERROR_MAX = 256

# --------------------------------------------------------------------------
# Stripe record: two 64-byte cache lines per stripe, at stripe_table_off.
# The first (STRIPE) is the hot line every writer of the stripe touches; the
# second (LOCK_WAITS) is cold: only a writer that had to wait for the lock
# writes it, once per wait. Lock-wait counters were put in a second line of
# the same record rather than in a separate per-stripe array because that
# needs no new header field or geometry offset (only STRIPE_SIZE changes),
# and rather than in the hot line because it is full and a waiter's stores
# must not dirty the line that lock-free readers poll. (With 128-byte records
# two stripes' hot lines no longer share one 128-byte pair, the unit in which
# x86's adjacent-line prefetcher pulls lines: a side benefit, not measured.)
STRIPE_SIZE = 2 * CACHE_LINE
STRIPE = struct.Struct(
    "<Q"  # version    seqlock: odd while a writer mutates. Writer only, under lock.
    #                  Readers compare before/after; a stale read just retries.
    # lock (u64, see lock_word): the stripe's write lock. 0 = free; else the holder, written
    #   by the compare-and-swap that takes the lock (C lock_fast, lock.StripeLocks), so the
    #   lock is never held with its holder unknown. Waiters sleep on its low half (futex),
    #   and ask the kernel whether the named client slot's lock is still held
    #   (lock.client_alive); a dead holder's word is taken over by one more CAS.
    "I"  # lock_client   holder's client slot + 1, | LOCK_WAITERS (bit 31) once someone sleeps
    "I"  # lock_gen      that slot's generation when the holder claimed it (a reused slot differs)
    "Q"  # _pad
    "Q"  # items       live index slots in this stripe. Under lock; stale read safe.
    "Q"  # live        bytes taken by the entries the index points at. Under lock; stats only.
    "Q"  # ring        the segment ring, one u64 so it changes in one store (a writer
    #                  killed mid-update leaves the old or the new ring, never a mix):
    #                  head u16 (segment being appended to) | tail u16 (oldest segment
    #                  in use) | fill u32 (bytes of the head segment in use, its
    #                  header included; 0 = fresh, read as SEG_HEADER). Segments
    #                  tail, tail+1 .. head (mod n_segs) are in use, the others free.
    #                  Under lock; readers never need it.
    "Q"  # evictions   entries evicted in this stripe. Under lock.
    "Q"  # recoveries  times this stripe was repaired after a dead owner.
)
S_VERSION = 0
S_LOCK = 8
S_ITEMS = 24
S_LIVE = 32
S_RING = 40
S_EVICTIONS = 48
S_RECOVERIES = 56
# The cold line: lock waits of this stripe, all processes together. A "wait" is
# a lock() call (lock.StripeLocks) that found the stripe's lock taken (by
# another process, or another thread of this one) and had to wait for it; it
# is counted once, however many wait slices or a recovery it took. Written
# only by that waiter, right after it acquired the lock (so under the lock: no
# atomics across processes), never reset (Cache.clear keeps them). A wait
# that never gets the lock (LockTimeout, an interrupt) is not counted: it
# holds no lock to write under, and a racy store could lose others' counts. Readers
# (admin.stripes, stats, Prometheus, top) read them lock-free; a stale read is
# safe (each u64 is one aligned store). Nanoseconds of CLOCK_MONOTONIC.
LOCK_WAITS = struct.Struct(
    "<Q"  # waits         lock() calls of this stripe that had to wait
    "Q"  # wait_ns       total nanoseconds they waited (first try to acquisition)
    "Q"  # wait_max_ns   the longest single wait, ns
)
S_LOCK_WAITS = CACHE_LINE  # 64: the start of the cold line
S_LOCK_WAIT_NS = S_LOCK_WAITS + 8
S_LOCK_WAIT_MAX_NS = S_LOCK_WAITS + 16
assert STRIPE.size == CACHE_LINE and S_LOCK_WAITS + LOCK_WAITS.size <= STRIPE_SIZE  # layout self-check at import
#: Set in a lock word's low half while some process sleeps on it (its release
#: then wakes one); see _speedups.c Core_lock.
LOCK_WAITERS = 0x80000000


def lock_word(slot: int, gen: int) -> int:
    """The lock word of client slot ``slot`` with generation ``gen`` (see STRIPE)."""
    return (slot + 1) | (gen << 32)


def lock_holder(word: int) -> tuple[int, int] | None:
    """(client slot, generation) a lock word names, or None if it is free."""
    # A non-zero word with no slot in it (damage) names slot -1: nobody alive,
    # so a waiter takes it over like a dead holder's.
    return None if word == 0 else ((word & 0x7FFFFFFF) - 1, word >> 32)


ACCOUNT = struct.Struct("<QQ")  # items, live at S_ITEMS
RING = struct.Struct("<HHI")  # head, tail, fill at S_RING


def pack_ring(head: int, tail: int, fill: int) -> int:
    """The ring word (see STRIPE) as one u64."""
    return head | (tail << 16) | (fill << 32)


def unpack_ring(word: int) -> tuple[int, int, int]:
    """(head, tail, fill) of a ring word; fill 0 (a fresh segment) reads as SEG_HEADER."""
    return word & 0xFFFF, (word >> 16) & 0xFFFF, (word >> 32) or SEG_HEADER


# --------------------------------------------------------------------------
# Client record: claimed by each attached process, at client_table_off +
# i * client_record_size (64 bytes).
# Liveness: the claimer holds an OFD fcntl write lock on the record's first
# byte (file offset client_table_off + i * client_record_size) for as long as
# it is attached; the kernel drops it when the process dies. "Client i is
# alive" = "that byte is locked" (lock.client_alive), in every PID namespace.
# The head is written under the client-table lock (LOCK_CLIENTS) by the
# claimer (lock._take_slot), and by whoever retires the slot (its owner at
# close, or a reaper once the byte is unlocked), which zeroes the record but
# keeps gen. Read by recoverers, reapers, stats and `shmcache ls`.
CLIENT_HEAD = struct.Struct("<IId")  # pid, gen, start; pid 0 = free slot
#   pid: the claimer's pid in its own PID namespace (display only)
#   gen: bumped at every claim of this slot (never 0 once claimed); stripe
#        lock words carry it, so an owner whose slot was reused is dead
#   start: the claimer's start in clock ticks since boot (display only)
C_PID = 0
C_GEN = 4
C_START = 8
C_COUNTERS = 16  # N_COUNTERS x u64, written only by the owning process
COUNTERS = ("hits", "misses", "sets", "deletes", "evictions", "expirations")
N_COUNTERS = len(COUNTERS)
C_HITS, C_MISSES, C_SETS, C_DELETES, C_EVICTIONS, C_EXPIRATIONS = range(N_COUNTERS)
CLIENT_RECORD_SIZE = CACHE_LINE  # head + counters

# --------------------------------------------------------------------------
# Index slot: 16 bytes, open addressing with linear probing inside each
# stripe's own slice. Written only under the stripe lock; readers use the
# seqlock. `tag` 0 means empty; deletion is backward-shift (no tombstones).
# Key length, value length and type live in the entry header (the reader
# reads the entry anyway), which is what keeps the slot at 16 bytes.
SLOT_SIZE = 16
SLOT = struct.Struct(
    "<I"  # tag     (hash >> 32) | 1, never 0. Home slot = tag % slots_per_stripe.
    "I"  # loc     entry offset from the stripe arena start / ALIGN
    "d"  # expire  absolute deadline (clock seconds); 0.0 = never
)
SL_TAG = 0
SL_LOC = 4
SL_EXPIRE = 8
F64 = struct.Struct("<d")
U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
SLOT_DTYPE = np.dtype([("tag", "<u4"), ("loc", "<u4"), ("expire", "<f8")])
assert SLOT_DTYPE.itemsize == SLOT.size == SLOT_SIZE  # layout self-check at import
#: Access bits: one byte per index slot at refs_off + (stripe * slots_per_stripe
#: + slot), apart from the slots so that readers' stores never touch a slot's
#: fields. A hit stores 1 only when it reads 0 (a hot key read by many
#: processes does not bounce a cache line on every get); reclaim reads it
#: (second chance) and clears it. Racy by design: a hint, a lost or misplaced
#: store only changes which entry gets a second chance. Moves with its slot.
REF_SIZE = 1
#: Index bytes per slot, for memory accounting.
INDEX_BYTES_PER_SLOT = SLOT_SIZE + REF_SIZE

# --------------------------------------------------------------------------
# Arena: per stripe, a ring of n_segs = stripe_arena / seg_size segments.
# Each segment: [SEG_HEADER | entry | entry | ...]. Entries are appended at the
# head segment's fill and never move or change size afterwards (only incr's
# 8-byte in-place update and its checksum), so a segment is walked entry by
# entry from its header to its sealed end.
SEG = struct.Struct(
    "<I"  # end     bytes in use when the segment was sealed (left as head), 0 while
    #               it is the head; written by the writer that seals it, after the
    #               ring word moved on. Under lock.
    "I"  # fill    a mirror of the ring word's fill, stored after it on every change
    #               while the segment is the head (its final fill afterwards). The
    #               head's fill is the larger of the two and a sealed segment's end
    #               the larger of end and fill, so one damaged (lowered) word can
    #               never make a write land on a published entry. Under lock.
    "I"  # done    reclaim cursor of the tail segment: the offset of the first entry a
    #               reclaim has not handled yet (0 = none handled, read as SEG_HEADER).
    #               A reclaim runs in steps of RECLAIM_STEP entries, one per insert
    #               (see arena.py), and stores it after each step; every entry below
    #               it is dead. Zeroed when the segment opens as the head. Under lock.
)
SEG_HEADER = SEG.size  # 12
#: Entries one incremental reclaim step walks (arena.py: a pending reclaim of the
#: tail advances by this much per insert, so no write holds a stripe for a whole
#: segment's reclaim unless the pacing falls behind).
RECLAIM_STEP = 16
# Entry: [entry header | key | value], padded to ALIGN bytes.
ENTRY = struct.Struct(
    "<I"  # checksum  entry_checksum of bytes [4:entry_len): rest of header, key, value
    "I"  # vlen
    "H"  # klen
    "B"  # flags     value type tag (codec)
    "B"  # _pad
)
ENTRY_HEADER = ENTRY.size  # 12


def entry_checksum(b) -> int:
    """An entry's checksum field: the low 32 bits of the xxh3-64 of its bytes
    after the field (the rest of the header, key, value). xxh3 runs ~7x
    faster than xxh32 on a 16 KiB value, and every get verifies it."""
    return xxhash.xxh3_64_intdigest(b) & 0xFFFFFFFF

ENTRY_LENS = struct.Struct("<IH")  # vlen, klen of an entry header, at E_VLEN (a segment walk reads only these)
E_CHECKSUM = 0
E_VLEN = 4
E_KLEN = 8
E_FLAGS = 10
ALIGN = 4
#: Default segment size: reclaiming one (the most work one insert can trigger)
#: walks at most this many bytes under the stripe lock (~500 100-byte entries).
SEG_SIZE = 64 * 1024
#: A stripe's ring has at least this many segments (head, tail, one free, ...).
MIN_SEGS = 4

#: A hash table slice is never filled beyond this load factor; inserting past
#: it evicts (lru) or raises CacheFull (noeviction).
MAX_LOAD = 0.75

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}

MIN_SIZE = 256 * 1024
MIN_STRIPE_ARENA = 4096
MAX_STRIPES = 1024
MAX_KEY_LIMIT = 65535  # klen is a u16 in the slot and the entry header
MAX_STRIPE_ARENA = 2**32 * ALIGN // 2  # loc is a u32 in ALIGN units; half of it keeps margin
MAX_SEGS = 65535  # head and tail are u16


def parse_size(size: int | str) -> int:
    """Turn ``256MiB``, ``1GB``, ``64M``, ``"1048576"`` or an int into bytes.

    Binary units: ``KiB MiB GiB TiB`` and bare ``K M G T``; decimal units:
    ``KB MB GB TB``. Case-insensitive.

    Raises:
        TypeError: ``size`` is neither an int nor a str.
        ValueError: the string is not a size, or the size is not positive.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"size must be an int (bytes) or a string like '256MiB', not {type(size).__name__}")
    if isinstance(size, int):
        n = size
    else:
        m = _SIZE_RE.fullmatch(size)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"bad size {size!r}: expected a number with an optional unit "
                "(B, KiB, MiB, GiB, TiB, K, M, G, T binary; KB, MB, GB, TB decimal), e.g. '256MiB'"
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return n


def validate_name(name: str) -> str:
    """Check a cache name: 1-64 characters from ``[A-Za-z0-9_.-]``.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: the name is empty, too long or has other characters
            (a slash, for instance).
    """
    if not isinstance(name, str):
        raise TypeError(f"cache name must be a str, not {type(name).__name__}")
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"bad cache name {name!r}: use 1-64 characters from A-Z a-z 0-9 _ . - (no slashes)"
        )
    return name


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@dataclass(frozen=True)
class Geometry:
    """The fixed shape of one segment, computed at creation, read at attach."""

    total_size: int
    n_stripes: int
    max_clients: int
    slots_per_stripe: int
    max_key_size: int
    max_value_size: int
    stripe_arena: int
    max_items: int
    stripe_table_off: int
    client_table_off: int
    client_record_size: int
    index_off: int
    arena_off: int
    created: float = 0.0
    policy: int = HEADER_POLICY_LRU
    mode: int = 0o600
    seg_size: int = SEG_SIZE
    refs_off: int = 0

    @property
    def n_segs(self) -> int:
        """Segments in one stripe's ring."""
        return self.stripe_arena // self.seg_size

    @property
    def items_per_stripe(self) -> int:
        """Most live slots one stripe may hold (the load-factor cap)."""
        return self.max_items // self.n_stripes

    def pack_header(self) -> bytes:
        """The static header with an all-zero magic (written last, separately)."""
        return HEADER.pack(
            b"\0" * 8, LAYOUT_VERSION, PAGE, self.total_size, self.n_stripes,
            self.max_clients, self.slots_per_stripe, self.max_key_size,
            self.max_value_size, self.stripe_arena, self.max_items,
            self.stripe_table_off, self.client_table_off, self.client_record_size,
            self.index_off, self.arena_off, self.created, self.policy, self.mode,
            self.seg_size, self.refs_off,
        )

    @classmethod
    def unpack_header(cls, buf, where: str = "segment") -> "Geometry":
        """Read a header; raise LayoutMismatch if it is not ours or another version."""
        if len(buf) < HEADER.size:
            raise LayoutMismatch(f"{where} is {len(buf)} bytes, too small to hold a shmcache header")
        f = HEADER.unpack_from(buf, 0)
        magic, version = f[0], f[1]
        if magic != MAGIC:
            raise LayoutMismatch(
                f"{where} is not a shmcache segment (magic {magic!r}, expected {MAGIC!r}); "
                f"this shmcache reads layout version {LAYOUT_VERSION}"
            )
        if version != LAYOUT_VERSION:
            raise LayoutMismatch(
                f"{where} has layout version {version}, this shmcache reads layout version "
                f"{LAYOUT_VERSION}; restore it from a snapshot or remove it (shmcache rm)"
            )
        if f[2] != PAGE:
            raise LayoutMismatch(
                f"{where} is damaged: its header says the header is {f[2]} bytes, not {PAGE}; "
                f"remove it (shmcache rm) and recreate it"
            )
        return cls(*f[3:])

    def check(self, file_size: int, where: str = "segment", name: str = "NAME") -> None:
        """Refuse a header that disagrees with itself or with the file it heads.

        A segment is input like any other: a corrupted or hostile header must
        not steer an offset outside the mapping. Every derived field (offsets,
        arena sizes, limits) must be what :func:`compute_geometry` makes of the
        header's own settings, and the file must be at least ``total_size``.

        Raises:
            LayoutMismatch: naming the field that is off and what to do.
        """
        fix = f"remove it with 'shmcache rm {name}' (or Cache.unlink) and recreate it"
        if self.policy not in POLICY_NAMES:
            raise LayoutMismatch(f"{where} is damaged: its header names eviction policy {self.policy}; {fix}")
        try:
            want = compute_geometry(
                self.total_size, stripes=self.n_stripes, max_items=self.max_items,
                max_key_size=self.max_key_size, max_value_size=self.max_value_size,
                max_clients=self.max_clients, policy=POLICY_NAMES[self.policy],
                mode=self.mode, created=self.created, laid_out=True,
            )
        except (TypeError, ValueError) as e:
            raise LayoutMismatch(f"{where} is damaged: its header settings are impossible ({e}); {fix}") from None
        bad = [f for f in self.__dataclass_fields__ if getattr(self, f) != getattr(want, f)]
        if bad:
            f = bad[0]
            raise LayoutMismatch(
                f"{where} is damaged: its header says {f}={getattr(self, f)}, but its own settings imply "
                f"{getattr(want, f)}; {fix}"
            )
        if file_size < self.total_size:
            raise LayoutMismatch(
                f"{where} is {file_size} bytes but its header says {self.total_size}; it is damaged: {fix}"
            )


def compute_geometry(
    size: int | str,
    *,
    stripes: int | None = None,
    max_items: int | None = None,
    max_key_size: int = 1024,
    max_value_size: int | None = None,
    max_clients: int = 512,
    policy: str = "lru",
    mode: int = 0o600,
    created: float = 0.0,
    laid_out: bool = False,
) -> Geometry:
    """Lay out a segment of ``size`` bytes; every limit is checked here.

    ``size`` is the most the segment may take (what /dev/shm shows is that,
    less what is left over after cutting each stripe's arena into whole
    segments; ``laid_out=True``: ``size`` is such a laid-out segment's
    ``total_size``, recomputed to check its header). ``max_items`` defaults
    to one item per 200 bytes, ``stripes`` to one per 4 MiB (a power of two
    between 4 and 64), ``max_value_size`` to what one arena segment holds
    (64 KiB segments by default, smaller for small stripes; a larger
    ``max_value_size`` makes the segments larger).

    Raises:
        TypeError / ValueError: a setting has the wrong type or is out of range;
            the message names the setting and its limit.
    """
    total = parse_size(size)
    # A laid-out segment may end up to a segment per stripe below the size asked
    # for (whole segments only); Geometry.check recomputes from that smaller
    # size (laid_out=True), so the floor it must pass again is a little lower.
    if total < (MIN_SIZE * 3 // 4 if laid_out else MIN_SIZE):
        raise ValueError(f"size {total} bytes is too small: the minimum is {MIN_SIZE} bytes (256KiB)")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)}, not {policy!r}")
    for label, v in (("stripes", stripes), ("max_items", max_items), ("max_value_size", max_value_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise TypeError(f"{label} must be an int, not {type(v).__name__}")
    for label, v in (("max_key_size", max_key_size), ("max_clients", max_clients)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{label} must be an int, not {type(v).__name__}")

    if stripes is None:
        stripes = min(64, max(4, _pow2_at_most(total // (4 * 1024 * 1024))))
    if stripes < 1 or stripes > MAX_STRIPES or stripes & (stripes - 1):
        raise ValueError(f"stripes must be a power of two between 1 and {MAX_STRIPES}, got {stripes}")
    if not 1 <= max_key_size <= MAX_KEY_LIMIT:
        raise ValueError(f"max_key_size must be between 1 and {MAX_KEY_LIMIT} bytes, got {max_key_size}")
    if not 1 <= max_clients <= 65536:
        raise ValueError(f"max_clients must be between 1 and 65536, got {max_clients}")

    if max_items is None:
        max_items = max(stripes * 16, total // 200)
    if max_items < stripes:
        raise ValueError(f"max_items must be at least the number of stripes ({stripes}), got {max_items}")
    per_stripe = math.ceil(max_items / stripes)
    sps = math.ceil(per_stripe / MAX_LOAD) + 1
    if sps >= 2**31:
        raise ValueError(f"max_items {max_items} is too large for {stripes} stripes")

    stripe_table_off = PAGE
    client_table_off = _align(stripe_table_off + stripes * STRIPE_SIZE, PAGE)
    client_record_size = CLIENT_RECORD_SIZE
    index_off = _align(client_table_off + max_clients * client_record_size, PAGE)
    refs_off = _align(index_off + stripes * sps * SLOT_SIZE, PAGE)
    arena_off = _align(refs_off + stripes * sps * REF_SIZE, PAGE)
    room = ((total - arena_off) // stripes) if total > arena_off else 0
    room = min(room, MAX_STRIPE_ARENA)
    # Segment size: SEG_SIZE, smaller for small stripes (at least MIN_SEGS * 2
    # segments), larger when max_value_size asks for it (an entry lives in one
    # segment; then a multiple of 4 KiB) or the ring would exceed MAX_SEGS.
    # Bigger segments mean longer reclaim holds, so the default keeps them small.
    need = SEG_HEADER + ENTRY_HEADER + max_key_size + (max_value_size or 1)
    seg = min(SEG_SIZE, _pow2_at_most(max(room // (2 * MIN_SEGS), 1)))
    seg = max(seg, _align(need, 1024 if need <= SEG_SIZE else PAGE), _pow2_at_least(math.ceil(room / MAX_SEGS)), 1024)
    n_segs = room // seg
    if n_segs < MIN_SEGS:
        raise ValueError(
            f"size {total} bytes leaves {max(0, total - arena_off)} bytes of arena for {stripes} stripes "
            f"after the index for max_items={max_items}: each stripe needs at least {MIN_SEGS} segments of "
            f"{seg} bytes (an entry of max_key_size={max_key_size} + max_value_size="
            f"{max_value_size or 1} bytes fits one segment); raise size, or lower max_items, stripes, "
            f"max_key_size or max_value_size"
        )
    stripe_arena = n_segs * seg
    entry_room = seg - SEG_HEADER - ENTRY_HEADER - max_key_size
    if max_value_size is None:
        max_value_size = max(1, entry_room)
    if not 1 <= max_value_size <= entry_room:  # pragma: no cover - seg is sized for it above
        raise ValueError(f"max_value_size must be between 1 and {entry_room} bytes, got {max_value_size}")
    total = arena_off + stripes * stripe_arena
    return Geometry(
        total_size=total,
        n_stripes=stripes,
        max_clients=max_clients,
        slots_per_stripe=sps,
        max_key_size=max_key_size,
        max_value_size=max_value_size,
        stripe_arena=stripe_arena,
        max_items=per_stripe * stripes,
        stripe_table_off=stripe_table_off,
        client_table_off=client_table_off,
        client_record_size=client_record_size,
        index_off=index_off,
        arena_off=arena_off,
        created=created,
        policy=POLICIES[policy],
        mode=mode,
        seg_size=seg,
        refs_off=refs_off,
    )


def entry_alloc(klen: int, vlen: int) -> int:
    """Arena bytes taken by an entry with this key and value length."""
    return (ENTRY_HEADER + klen + vlen + ALIGN - 1) & ~(ALIGN - 1)
