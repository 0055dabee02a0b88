"""Snapshot files: write a cache to disk, verify a file, restore it into a cache.

A snapshot holds *entries* (encoded key, value flags, encoded value, absolute
deadline, last access), not the segment's layout, so it restores into a cache
of another size, stripe count or layout version. Values stay encoded (codec
tag + bytes): nothing is unpickled on the way in or out.

File format, version 1 (all integers little-endian)::

    header   SNAP_HEADER: magic "SHMCSNAP", format version, header size,
             created (wall clock at the start), source layout version,
             source stripes, source size, cache name, xxh3 of the header
    section  one per source stripe, in stripe order:
               SECTION: magic "SECT", stripe, n_records, data_len,
                        xxh3 of (records + data), xxh3 of this header
               records  n_records x RECORD_DTYPE (40 bytes each):
                        koff, klen, vlen, expire, atime, flags
               data     data_len bytes; the key of a record is
                        data[koff : koff+klen] and its value follows at once;
                        bytes no record points at are ignored
               padding  to a multiple of 8 bytes
    footer   SNAP_FOOTER: magic "SNAPEND\\0", sections, entries, file offset
             of the footer, xxh3 of every section checksum, xxh3 of the footer

Writing copies each stripe under its seqlock (two raw memcpys: the stripe's
index slice and its arena), so writers are not blocked; only
if writers keep changing the stripe during the copy does it take the stripe
lock, and then only for that one copy (~2 ms for a 1 GiB cache's 16 MiB
stripe). Picking live entries, packing records and checksums happen on the
copy, outside any lock, vectorised (numpy, no Python object per entry), and a
second thread writes stripe s to the file while stripe s+1 is being copied.
The file is written to ``<path>.tmp.<pid>.<random>`` (flock-ed by its writer
until the rename, so a temp file whose writer died is told apart by the
kernel, in any PID namespace), fsynced and renamed over ``path``, then the
directory is fsynced: a crash at any point leaves the previous snapshot whole.

Restoring reads the whole file and checks every checksum and bound before it
touches the cache; a bad file raises SnapshotError naming what failed and the
cache stays exactly as it was.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import mmap
import os
import stat
import struct
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import xxhash

from . import layout as L
from .errors import CacheFull, SnapshotError, UntrustedSegment
from . import admin
from .repair import entry_sums

MAGIC = b"SHMCSNAP"
FOOTER_MAGIC = b"SNAPEND\0"
SECTION_MAGIC = b"SECT"
#: Bumped whenever the file format changes; readers refuse newer versions.
FORMAT_VERSION = 1

SNAP_HEADER = struct.Struct(
    "<8s"  # magic
    "I"  # format version
    "I"  # header size (bytes, this struct)
    "d"  # created: wall clock when the snapshot started
    "I"  # layout version of the source segment (information only)
    "I"  # stripes of the source (= number of sections)
    "Q"  # total size of the source segment (information only)
    "Q"  # reserved, 0
    "64s"  # cache name, UTF-8, NUL padded
    "Q"  # xxh3_64 of every byte above
)
SECTION = struct.Struct(
    "<4s"  # magic
    "I"  # stripe index (= section index)
    "Q"  # n_records
    "Q"  # data_len (before padding)
    "Q"  # xxh3_64 of the record bytes followed by the data bytes
    "Q"  # xxh3_64 of every byte above
)
SNAP_FOOTER = struct.Struct(
    "<8s"  # magic
    "I"  # sections
    "I"  # reserved, 0
    "Q"  # entries (sum of n_records)
    "Q"  # file offset of this footer
    "Q"  # xxh3_64 of the section checksums, packed as u64 in order
    "Q"  # xxh3_64 of every byte above
)
RECORD_DTYPE = np.dtype(
    {
        "names": ["koff", "klen", "vlen", "expire", "atime", "flags"],
        "formats": ["<u8", "<u4", "<u4", "<f8", "<f8", "u1"],
        "offsets": [0, 8, 12, 16, 24, 32],
        "itemsize": 40,
    }
)

#: Lock-free copy attempts of one stripe before taking its lock. One attempt
#: copies the stripe (a few ms for a 16 MiB arena); a writer that keeps
#: changing it that often would starve the snapshot, so after this many the
#: stripe is locked for exactly one copy.
SEQLOCK_TRIES = 4

#: Test hook: seconds to sleep after the first section is written, so a test
#: can SIGKILL the writer while the temp file is half written.
PAUSE_ENV = "SHMCACHE_TEST_SNAPSHOT_PAUSE"

_u64 = struct.Struct("<Q")
_W = L.SLOT_SIZE // 8  # u64 words per index slot


@dataclass
class SnapshotInfo:
    """What :func:`write_snapshot` wrote or :func:`verify_snapshot` found."""

    path: str
    entries: int
    bytes: int  #: size of the file
    seconds: float = 0.0
    sections: int = 0
    created: float = 0.0
    name: str = ""
    source_layout_version: int = 0
    source_stripes: int = 0
    source_size: int = 0
    format_version: int = FORMAT_VERSION
    #: Longest time one stripe lock was held by the writer (seconds; 0.0 if
    #: every stripe was copied lock-free) and how many stripes needed the lock.
    max_lock_hold: float = 0.0
    locked_stripes: int = 0
    skipped_expired: int = 0
    #: Entries left out because they fail their checksum (damage in the
    #: segment; ``shmcache check`` reports it, ``check --fix`` drops it).
    skipped_damaged: int = 0
    #: Seconds of each locked copy, in stripe order (for benchmarks).
    lock_holds: list = field(default_factory=list)


@dataclass
class RestoreInfo:
    """What :func:`restore_snapshot` did."""

    path: str
    loaded: int = 0
    skipped_expired: int = 0
    skipped_too_large: int = 0  #: key or value over the target's limits
    skipped_full: int = 0  #: no room under policy "noeviction"
    skipped_present: int = 0  #: merge=True and the key was already there
    entries: int = 0  #: records in the file
    bytes: int = 0  #: size of the file
    seconds: float = 0.0
    created: float = 0.0


# ----------------------------------------------------------------- writing
def write_snapshot(cache, path: str, *, now: float | None = None, progress=None) -> SnapshotInfo:
    """Write every live entry of ``cache`` to ``path`` atomically.

    Each stripe is copied consistently (seqlock, or its lock for one copy);
    the cache as a whole is not frozen, so entries written to other stripes
    meanwhile may or may not be included. Entries already expired at ``now``
    (default: the wall clock) are left out. ``progress(done_bytes,
    total_bytes)`` is called after each stripe.

    Raises:
        OSError: the file could not be written (full disk, permissions, the
            path is a directory); the previous snapshot at ``path`` is intact.
        LockTimeout: a live process held a stripe lock for too long.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "snapshot path is a directory", path)
    t0 = time.perf_counter()
    created = time.time()
    if now is None:
        now = created
    _remove_stale_temps(path)
    engine = admin.storage(cache)  # raw stripe copies: see admin.Storage
    seg = engine.segment
    g = engine.geometry
    table = engine.table
    locks = engine.locks
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    info = SnapshotInfo(path=path, entries=0, bytes=0, sections=g.n_stripes, created=created,
                        name=cache.name, source_layout_version=L.LAYOUT_VERSION,
                        source_stripes=g.n_stripes, source_size=g.total_size)
    total_est = g.stripe_arena * g.n_stripes
    done = 0
    sums = []
    # Two arena buffers: the file-writer thread writes stripe s from one while
    # this thread copies stripe s+1 into the other (write() releases the GIL,
    # and a new file's page allocation, not the copy, is the slow part).
    # Reused across stripes: a fresh 16 MiB buffer per stripe would
    # page-fault during the copy, stretching the time a stripe may be held.
    bufs = [memoryview(bytearray(g.stripe_arena)) for _ in range(2)]
    ibuf = np.empty((g.slots_per_stripe, _W), dtype=np.uint64)
    # Fault every page in now: the kernel maps large allocations lazily, and
    # a first touch inside a locked copy costs ~1 us per page (~5 ms per stripe).
    for b in bufs:
        np.frombuffer(b, dtype=np.uint8)[:: mmap.PAGESIZE] = 0
    ibuf.fill(0)
    words = np.frombuffer(seg.mm, dtype=np.uint64, count=g.n_stripes * g.slots_per_stripe * _W,
                          offset=g.index_off).reshape(g.n_stripes, g.slots_per_stripe, _W)
    tmp, fd = _create_temp(path)
    lock_fd = os.dup(fd)  # the flock lives as long as this: past the file's close, until the rename
    try:
        with open(fd, "wb", buffering=0) as f, memoryview(seg.mm) as mv, \
                ThreadPoolExecutor(1, thread_name_prefix="shmcache-snapshot") as writer:
            name_b = cache.name.encode()[:64]
            head = SNAP_HEADER.pack(MAGIC, FORMAT_VERSION, SNAP_HEADER.size, created, L.LAYOUT_VERSION,
                                    g.n_stripes, g.total_size, 0, name_b, 0)
            _write_all(f, [head[:-8] + _u64.pack(xxhash.xxh3_64_intdigest(head[:-8]))])
            pos = SNAP_HEADER.size
            jobs: deque = deque()

            def drain():
                while jobs:
                    jobs.popleft().result()

            for s in range(g.n_stripes):
                if len(jobs) == len(bufs):  # the buffer we are about to fill is still being written
                    jobs.popleft().result()
                bv = bufs[s % len(bufs)]
                slots, ring, held = _copy_stripe(table, locks, words, ibuf, mv, bv, s, drain)
                if held is not None:
                    info.lock_holds.append(held)
                    info.locked_stripes += 1
                    info.max_lock_hold = max(info.max_lock_hold, held)
                records, runs, data_len, n_expired, n_damaged = _pack_stripe(slots, bv, ring, g, now)
                info.skipped_expired += n_expired
                info.skipped_damaged += n_damaged
                h = xxhash.xxh3_64()
                rb = records.tobytes()
                h.update(rb)
                pieces = [bv[a:b] for a, b in runs]
                for piece in pieces:
                    h.update(piece)
                chk = h.intdigest()
                sums.append(chk)
                sh = SECTION.pack(SECTION_MAGIC, s, len(records), data_len, chk, 0)[:-8]
                pad = -data_len % 8
                jobs.append(writer.submit(
                    _write_all, f, [sh + _u64.pack(xxhash.xxh3_64_intdigest(sh)), rb, *pieces, b"\0" * pad]
                ))
                pos += SECTION.size + len(rb) + data_len + pad
                info.entries += len(records)
                done += g.stripe_arena
                if progress is not None:
                    progress(min(done, total_est), total_est)
                if pause and s == 0:
                    jobs.popleft().result()
                    time.sleep(pause)
            drain()
            all_sums = b"".join(_u64.pack(x) for x in sums)
            foot = SNAP_FOOTER.pack(FOOTER_MAGIC, g.n_stripes, 0, info.entries, pos,
                                    xxhash.xxh3_64_intdigest(all_sums), 0)[:-8]
            _write_all(f, [foot + _u64.pack(xxhash.xxh3_64_intdigest(foot))])
            pos += SNAP_FOOTER.size
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(lock_fd)
        del words  # no view into the segment may outlive the call (close() needs none)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    info.bytes = pos
    info.seconds = time.perf_counter() - t0
    return info


def _write_all(f, pieces) -> None:
    """Write every buffer in ``pieces`` to the raw file ``f`` (retrying short writes)."""
    for p in pieces:
        p = memoryview(p)
        while len(p):
            n = f.write(p)
            p = p[n:]


def _copy_stripe(table, locks, words, ibuf, mv, bv, s, quiesce=None):
    """Copy stripe s's index slice and arena consistently; return
    (live slots, ring word, seconds the lock was held or None if lock-free).

    Inside the seqlock window (or the lock) there are only two plain memcpys:
    the index slice into ``ibuf`` and the arena into ``bv``. Picking the live
    slots happens afterwards on the copy: a selection on the shared structured
    array ran element by element and tripled the time the copy needed the
    stripe to itself. A stripe that took two or more writes during one
    attempt is hot: the next attempt would fail too, so it is locked at once.
    ``quiesce()`` runs before taking the lock (the caller lets its file
    writer drain, so the locked memcpy has the memory bandwidth to itself).
    """
    stripes = table.stripes
    g = table.g
    a0 = g.arena_off + s * g.stripe_arena
    src = words[s]
    held = None
    hot = False
    for attempt in range(SEQLOCK_TRIES + 1):
        locked = hot or attempt == SEQLOCK_TRIES
        if locked:
            if quiesce is not None:
                quiesce()
            # Start the locked copy on a fresh time slice: being descheduled
            # while holding the lock is what makes a 2 ms hold take 10 ms.
            os.sched_yield()
            locks.lock(s)
            t = time.perf_counter()
            try:
                np.copyto(ibuf, src)
                ring = int(stripes[s, L.S_RING // 8])
                refs = table.refs[s].copy()
                bv[:] = mv[a0 : a0 + g.stripe_arena]
            finally:
                held = time.perf_counter() - t
                locks.unlock(s)
            break
        v1 = int(stripes[s, 0])
        if v1 & 1:  # a writer is inside: its critical section is microseconds
            time.sleep(0)
            continue
        np.copyto(ibuf, src)
        ring = int(stripes[s, L.S_RING // 8])
        refs = table.refs[s].copy()
        bv[:] = mv[a0 : a0 + g.stripe_arena]
        v2 = int(stripes[s, 0])
        if v2 == v1:
            break
        hot = v2 - v1 >= 4
    occupied = ibuf.view(L.SLOT_DTYPE).reshape(len(ibuf))["tag"] != 0
    rows = ibuf[occupied]  # plain-word row selection
    return (rows.view(L.SLOT_DTYPE).reshape(len(rows)), refs[occupied]), ring, held


def _pack_stripe(slots_refs, arena, ring: int, g, now: float):
    """Turn a stripe copy into snapshot records plus the arena byte ranges to write.

    Only runs of bytes that hold live entries are written (garbage from
    deleted, overwritten and expired entries is dropped: smaller files, and a
    deleted value does not linger on disk). Key and value lengths and types
    come from the entry headers in the arena copy, gathered with numpy (no
    Python object per entry); an entry whose header or bytes fall outside
    the arena is damage and skipped. ``atime`` records the entry's age rank
    (entries read since they were written after those that were not, each
    group in ring order, oldest segment first; restore re-inserts oldest
    first, so what would be evicted first still is), as seconds just before
    ``now``.
    Entries that fail their checksum or key hash are damage and left out.
    Returns (records, runs, data_len, expired_dropped, damaged_dropped)."""
    slots, refs = slots_refs
    hdr = L.ENTRY_HEADER
    size = len(arena)
    words = np.frombuffer(arena, dtype="<u4", count=size // 4)
    offs = slots["loc"].astype(np.int64) * L.ALIGN
    exp = slots["expire"]
    inside = offs + hdr <= size
    offs = np.where(inside, offs, 0)
    vlen = words[offs // 4 + 1].astype(np.int64)
    w2 = words[offs // 4 + 2]
    klen = (w2 & 0xFFFF).astype(np.int64)
    flags = ((w2 >> 16) & 0xFF).astype(np.uint8)
    allocs = (hdr + klen + vlen + L.ALIGN - 1) & ~(L.ALIGN - 1)
    expired = (exp > 0.0) & (exp <= now)
    n_expired = int(np.count_nonzero(expired))
    keep = ~expired & inside & (offs + allocs <= size) & (klen <= g.max_key_size) & (vlen <= g.max_value_size)
    # An entry failing its checksum or its slot's key hash is damage (readers
    # treat it as absent): restore would store it with a fresh checksum,
    # turning garbage into a value every reader returns. Leave it out.
    at = np.nonzero(keep)[0]
    sums = entry_sums(arena, offs[at])
    sound = (sums["bad"] == 0) & (sums["chk"] == words[offs[at] // 4]) \
        & (((sums["h"] >> np.uint64(32)) | np.uint64(1)) == slots["tag"][at].astype(np.uint64))
    keep[at[~sound]] = False
    n_damaged = int(np.count_nonzero(~sound))
    order = np.nonzero(keep)[0]
    order = order[np.argsort(offs[order], kind="stable")]
    n = len(order)
    records = np.zeros(n, dtype=RECORD_DTYPE)
    if n == 0:
        return records, [], 0, n_expired, n_damaged
    head, tail, _fill = L.unpack_ring(ring)
    rank = ((offs[order] // g.seg_size - tail) % g.n_segs) * g.seg_size + offs[order] % g.seg_size
    rank += (refs[order] != 0) * g.stripe_arena
    age = np.empty(n, dtype=np.float64)
    age[np.argsort(rank, kind="stable")] = np.arange(n, dtype=np.float64)
    klen = klen[order]
    vlen = vlen[order]
    offs = offs[order]
    ends = offs + allocs[order]
    brk = np.nonzero(offs[1:] != ends[:-1])[0] + 1
    starts = np.concatenate(([0], brk))
    stops = np.concatenate((brk, [n]))
    src_a = offs[starts]
    src_b = ends[stops - 1]  # entries inside a run are back to back
    lens = src_b - src_a
    dst_a = np.cumsum(lens) - lens
    shift = np.repeat(src_a - dst_a, stops - starts)
    records["koff"] = offs - shift + hdr
    records["klen"] = klen
    records["vlen"] = vlen
    records["expire"] = exp[order]
    records["atime"] = now - (n - age) * 1e-6
    records["flags"] = flags[order]
    runs = list(zip(src_a.tolist(), src_b.tolist()))
    return records, runs, int(lens.sum()), n_expired, n_damaged


def _create_temp(path: str) -> tuple[str, int]:
    """Create ``<path>.tmp.<pid>.<random>`` exclusively and flock it; returns
    (its name, an fd holding the lock). The random part, not the pid, makes
    the name unique: every container's daemon may be pid 1, and one killed
    mid-snapshot left a ``.tmp.1`` its restarted successor could never create."""
    while True:
        tmp = f"{path}.tmp.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # A cleaner may have locked and removed it between our create and
            # our lock: then the name is gone (or another file's); try anew.
            if os.stat(tmp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except (BlockingIOError, FileNotFoundError):
            pass  # a cleaner holds it for an instant, and removes it
        os.close(fd)


def _remove_stale_temps(path: str) -> None:
    """Delete ``<path>.tmp.*`` files left by writers that died mid-snapshot:
    those no writer holds its flock on. The kernel drops a flock when its
    holder dies and answers the same in every PID namespace, where a pid in
    the name meant nothing (a cleaner in one container deleted a live
    writer's file in another). Temp files of writers older than this scheme
    hold no lock and count as dead."""
    for p in glob.glob(glob.escape(path) + ".tmp.*"):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone, a symlink, or not ours to read
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            if os.stat(p, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                os.unlink(p)
        except OSError:
            pass
        finally:
            os.close(fd)


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # pragma: no cover - e.g. no permission to open the dir
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on dirs
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------- reading
class _Loaded:
    """A verified snapshot mapped in memory: header fields plus each section's
    records (numpy views into the mapping) and the file offset of its data."""

    def __init__(self, path, mm, info, sections):
        self.path = path
        self.mm = mm
        self.info = info
        self.sections = sections  # [(records, data_offset)]

    def close(self):
        self.sections = []
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # pragma: no cover - a view outlived us; the GC unmaps
                pass
            self.mm = None


def open_snapshot_fd(path: str) -> int:
    """A read-only fd of the regular file at ``path``.

    Opened with O_NOFOLLOW (a symlink planted at the path is not followed) and
    O_NONBLOCK (a FIFO would otherwise block open() forever); anything but a
    regular file is refused before a byte is read.

    Raises:
        SnapshotError: missing, a directory, a symlink, a FIFO/device/socket, or unreadable.
    """
    what = f"snapshot {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotError(f"{what} does not exist") from None
    except IsADirectoryError:
        raise SnapshotError(f"{what} is a directory, not a snapshot file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SnapshotError(f"{what} is a symbolic link; give the real file's path") from None
        raise SnapshotError(f"cannot open {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise SnapshotError(f"{what} is a directory, not a snapshot file")
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"{what} is not a regular file (a FIFO, device or socket); refused")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_snapshot_trusted(st: os.stat_result, path: str, cache) -> None:
    """Refuse to restore into ``cache`` a snapshot file written by a user the
    cache does not trust as a writer: restored values are read back as if
    the cache's own writers had stored them (and a private cache unpickles
    them), so the file must pass the segment's own rule (segment.check_trusted):
    owned by this process's user or the cache's ``owner=``, and with no
    group or other write bit the segment itself lacks. Read bits do not matter.

    Raises:
        UntrustedSegment: naming the file's owner and mode and what to do.
    """
    from .segment import _who

    trusted, mode = admin.storage(cache).segment.trust()
    if st.st_uid not in trusted:
        raise UntrustedSegment(
            f"snapshot {path} belongs to {_who(uid=st.st_uid)}, whom cache {cache.name!r} does not trust as a "
            f"writer: restoring it would let that user choose what the cache's readers get back (and, with "
            f"pickle, run code in them). Restore only snapshots written by you or by the cache's owner=; if "
            f"this file is trusted, chown it (or attach with owner={st.st_uid}); nothing was changed"
        )
    loose = st.st_mode & 0o022 & ~mode
    if loose:
        raise UntrustedSegment(
            f"snapshot {path} has mode 0o{st.st_mode & 0o777:o}: writable by "
            f"{'group and others' if loose == 0o022 else 'its group' if loose == 0o020 else 'others'}, "
            f"beyond the cache's own mode 0o{mode:o}, so any of them may have written it; check it, "
            f"'chmod go-w' it and restore again; nothing was changed"
        )


def _open_verified(path, trust=None) -> _Loaded:
    """Open, map and verify the snapshot at ``path``; ``trust(fstat)`` (if
    given) judges the open file before a byte of it is read."""
    path = os.fspath(path)
    what = f"snapshot {path}"
    fd = open_snapshot_fd(path)
    try:
        if trust is not None:
            trust(os.fstat(fd))
        size = os.fstat(fd).st_size
        if size == 0:
            raise SnapshotError(f"{what} is empty (0 bytes): not a snapshot")
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        return _verify_mapped(path, mm, size)
    except BaseException:
        try:
            mm.close()
        except BufferError:  # numpy views live on in the traceback; the GC unmaps
            pass
        raise


def _verify_mapped(path, mm, size) -> _Loaded:
    what = f"snapshot {path}"
    if size < 8 or mm[:8] != MAGIC:
        raise SnapshotError(
            f"{path} is not a shmcache snapshot (magic {bytes(mm[:8])!r}, expected {MAGIC!r})"
        )
    if size < SNAP_HEADER.size:
        raise SnapshotError(f"{what} is truncated: {size} bytes, shorter than its {SNAP_HEADER.size}-byte header")
    (magic, fmt, hsize, created, src_layout, n_sections, src_size, _r, name_b, hchk) = SNAP_HEADER.unpack_from(mm, 0)
    if fmt != FORMAT_VERSION:
        raise SnapshotError(
            f"{what} has snapshot format version {fmt}; this shmcache reads format version {FORMAT_VERSION}"
        )
    if hsize != SNAP_HEADER.size or xxhash.xxh3_64_intdigest(mm[: SNAP_HEADER.size - 8]) != hchk:
        raise SnapshotError(f"{what}: header checksum mismatch (the header is corrupt)")
    if not 1 <= n_sections <= 1 << 20:
        raise SnapshotError(f"{what}: header claims {n_sections} sections (corrupt)")
    info = SnapshotInfo(path=path, entries=0, bytes=size, sections=n_sections, created=created,
                        name=name_b.rstrip(b"\0").decode("utf-8", "replace"),
                        source_layout_version=src_layout, source_stripes=n_sections, source_size=src_size,
                        format_version=fmt)
    pos = SNAP_HEADER.size
    sections = []
    sums = []
    with memoryview(mm) as mv:
        for i in range(n_sections):
            if pos + SECTION.size > size:
                raise SnapshotError(
                    f"{what} is truncated: section {i} of {n_sections} starts at byte {pos} "
                    f"but the file ends at {size}"
                )
            smagic, idx, n_rec, data_len, chk, shchk = SECTION.unpack_from(mm, pos)
            if smagic != SECTION_MAGIC or idx != i or xxhash.xxh3_64_intdigest(mv[pos : pos + SECTION.size - 8]) != shchk:
                raise SnapshotError(f"{what}: the header of section {i} (byte {pos}) is corrupt")
            rec_off = pos + SECTION.size
            data_off = rec_off + n_rec * RECORD_DTYPE.itemsize
            end = data_off + data_len
            if end > size:
                raise SnapshotError(
                    f"{what} is truncated: section {i} needs bytes up to {end} but the file ends at {size}"
                )
            h = xxhash.xxh3_64()
            h.update(mv[rec_off:end])
            if h.intdigest() != chk:
                raise SnapshotError(f"{what}: checksum mismatch in section {i} (bytes {pos}-{end}): the data is corrupt")
            rec = np.frombuffer(mm, dtype=RECORD_DTYPE, count=n_rec, offset=rec_off)
            koff = rec["koff"]
            span = rec["klen"].astype(np.uint64) + rec["vlen"].astype(np.uint64)
            bad = (rec["klen"] == 0) | (koff > data_len) | (span > np.uint64(data_len) - np.minimum(koff, np.uint64(data_len)))
            if bad.any():
                j = int(np.nonzero(bad)[0][0])
                raise SnapshotError(f"{what}: section {i} record {j} points outside the section's data")
            sections.append((rec, data_off))
            sums.append(chk)
            info.entries += n_rec
            pos = end + (-data_len % 8)
    if pos + SNAP_FOOTER.size > size:
        raise SnapshotError(f"{what} is truncated: the footer is missing (the file ends at byte {size})")
    fmagic, fsec, _r, fentries, fpos, fsums, fchk = SNAP_FOOTER.unpack_from(mm, pos)
    if fmagic != FOOTER_MAGIC or xxhash.xxh3_64_intdigest(mm[pos : pos + SNAP_FOOTER.size - 8]) != fchk:
        raise SnapshotError(f"{what}: the footer (byte {pos}) is corrupt")
    all_sums = b"".join(_u64.pack(x) for x in sums)
    if (fsec, fentries, fpos) != (n_sections, info.entries, pos) or xxhash.xxh3_64_intdigest(all_sums) != fsums:
        raise SnapshotError(f"{what}: the footer does not match the sections (the file is corrupt)")
    if pos + SNAP_FOOTER.size != size:
        raise SnapshotError(f"{what} has {size - pos - SNAP_FOOTER.size} unexpected bytes after its footer")
    return _Loaded(path, mm, info, sections)


def verify_snapshot(path) -> SnapshotInfo:
    """Check every checksum and bound of the snapshot at ``path``.

    Returns what it holds (entries, sections, creation time, source cache).

    Raises:
        SnapshotError: the file is missing, a directory, empty, truncated,
            corrupt, not a snapshot, or of a newer format (the message says which).
    """
    loaded = _open_verified(path)
    try:
        return loaded.info
    finally:
        loaded.close()


def read_header(path) -> SnapshotInfo:
    """The header of the snapshot at ``path`` only (cheap; checksum of the header only).

    Raises:
        SnapshotError: the header is missing, corrupt or not a snapshot's.
    """
    path = os.fspath(path)
    try:
        with open(open_snapshot_fd(path), "rb") as f:
            head = f.read(SNAP_HEADER.size)
    except OSError as e:
        raise SnapshotError(f"cannot read snapshot {path}: {e.strerror}") from None
    if len(head) < SNAP_HEADER.size or head[:8] != MAGIC:
        raise SnapshotError(f"{path} is not a shmcache snapshot (or is truncated)")
    f = SNAP_HEADER.unpack(head)
    if f[1] != FORMAT_VERSION or xxhash.xxh3_64_intdigest(head[:-8]) != f[-1]:
        raise SnapshotError(f"snapshot {path}: unreadable header (format {f[1]}, or corrupt)")
    return SnapshotInfo(path=path, entries=0, bytes=0, sections=f[5], created=f[3],
                        name=f[8].rstrip(b"\0").decode("utf-8", "replace"),
                        source_layout_version=f[4], source_stripes=f[5], source_size=f[6])


def restore_snapshot(cache, path, *, merge: bool = False, now: float | None = None, progress=None) -> RestoreInfo:
    """Load the snapshot at ``path`` into ``cache``.

    The whole file is verified first (every checksum and bound); only then is
    the cache changed. Without ``merge`` the cache is cleared first and ends
    up holding the snapshot's entries; with ``merge`` entries are added only
    where the key is absent. Entries expired at ``now`` (default: the wall
    clock) are skipped; the rest keep their absolute deadline. Entries are
    inserted oldest access first, so when the cache is smaller than the
    snapshot, LRU eviction keeps the most recently used. Keys or values over
    the cache's limits are skipped and counted. ``progress(done, total)``
    counts entries.

    The file must be one the cache trusts as a writer (see
    :func:`check_snapshot_trusted`).

    Raises:
        SnapshotError: the file is unusable (the message says why); the cache
            is unchanged.
        UntrustedSegment: the file belongs to a user the cache does not
            trust, or is writable beyond the cache's mode; the cache is unchanged.
        LockTimeout: a live process held a stripe lock for too long (the
            cache may then hold part of the snapshot).
    """
    t0 = time.perf_counter()
    loaded = _open_verified(path, lambda st: check_snapshot_trusted(st, os.fspath(path), cache))
    try:
        info = RestoreInfo(path=loaded.path, entries=loaded.info.entries, bytes=loaded.info.bytes,
                           created=loaded.info.created)
        g = admin.geometry(cache)
        if now is None:
            now = time.time()
        # Gather every record with its absolute data position, then order.
        parts = []
        for sec, data_off in loaded.sections:
            if len(sec):
                cols = np.empty(len(sec), dtype=[("pos", "<u8"), ("klen", "<u4"), ("vlen", "<u4"),
                                                 ("expire", "<f8"), ("atime", "<f8"), ("flags", "u1")])
                cols["pos"] = sec["koff"] + np.uint64(data_off)
                for k in ("klen", "vlen", "expire", "atime", "flags"):
                    cols[k] = sec[k]
                parts.append(cols)
        sec = None  # no view into the mapping may outlive it
        if parts:
            allrec = np.concatenate(parts)
        else:
            allrec = np.zeros(0, dtype=[("pos", "<u8"), ("klen", "<u4"), ("vlen", "<u4"),
                                        ("expire", "<f8"), ("atime", "<f8"), ("flags", "u1")])
        exp = allrec["expire"]
        expired = (exp > 0.0) & (exp <= now)
        too_large = (allrec["klen"] > g.max_key_size) | (allrec["vlen"] > g.max_value_size)
        info.skipped_expired = int(np.count_nonzero(expired))
        info.skipped_too_large = int(np.count_nonzero(too_large & ~expired))
        keep = allrec[~(expired | too_large)]
        keep = keep[np.argsort(keep["atime"], kind="stable")]
        total = len(keep)
        if not merge:
            cache.clear()
        mm = loaded.mm
        writer = admin.RawWriter(cache)
        write = writer.write
        step = max(1, total // 200)
        try:
            for i, (p, kl, vl, ex, at, fl) in enumerate(zip(
                keep["pos"].tolist(), keep["klen"].tolist(), keep["vlen"].tolist(),
                keep["expire"].tolist(), keep["atime"].tolist(), keep["flags"].tolist(),
            )):
                try:
                    if write(mm[p : p + kl], fl, mm[p + kl : p + kl + vl], ex, at, only_if_absent=merge):
                        info.loaded += 1
                    else:
                        info.skipped_present += 1
                except CacheFull:
                    info.skipped_full += 1
                if progress is not None and i % step == 0:
                    progress(i, total)
        finally:
            writer.close()
        if progress is not None:
            progress(total, total)
        info.seconds = time.perf_counter() - t0
        return info
    finally:
        loaded.close()


# ------------------------------------------------------------ progress line
class TerminalProgress:
    """A ``progress(done, total)`` callback drawing one self-updating line on a
    terminal, at most 10 times a second. Call :meth:`finish` when done."""

    def __init__(self, label: str, unit: str = "bytes", stream=None):
        import sys

        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        t = time.monotonic()
        if t - self._last < 0.1 and done < total:
            return
        self._last = t
        pct = 100.0 * done / total if total else 100.0
        if self.unit == "bytes":
            amount = f"{done / 2**20:,.0f} of {total / 2**20:,.0f} MiB"
        else:
            amount = f"{done:,} of {total:,} {self.unit}"
        self.stream.write(f"\r{self.label}: {pct:5.1f}% ({amount})\x1b[K")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the line (only if something was drawn)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def terminal_progress(label: str, unit: str = "bytes", stream=None) -> TerminalProgress | None:
    """A :class:`TerminalProgress` if ``stream`` (default stderr) is a terminal, else None."""
    import sys

    stream = stream if stream is not None else sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return TerminalProgress(label, unit, stream) if tty else None
