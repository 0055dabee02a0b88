"""The hash table inside one segment: bytes in, bytes out.

Each stripe owns a contiguous slice of the index (open addressing, linear
probing, backward-shift deletion so there are no tombstones; 16-byte slots:
tag, entry location, deadline) with an access bit per slot beside it, and its
own arena: a ring of segments the entries are appended to (arena.py), whose
oldest segment is reclaimed under the policy (eviction.py) when the ring is
full. Writers run under the stripe lock with the seqlock version odd; readers
never lock.

The pieces, one module each:

- ``table.py`` (this): probe, read, write, delete, incr, touch, clear and the
  stripe-level scans; the class :class:`Table` that puts the rest together.
- ``arena.py``: the segment ring: allocation, sealing, reclaim (the only
  place entries move or go for lack of room).
- ``eviction.py``: the policy object reclaim consults (``lru`` second chance,
  ``noeviction``).
- ``expiry.py``: removing expired entries in bulk (the daemon's sweeps).
- ``repair.py``: integrity check and repair after a writer died.

Writes go out of place (append, then publish by writing the index slot) so a
writer killed mid-write loses at most the entry it was writing, and the
per-entry checksum lets :meth:`check` find damage.

No serialization here and no clock but the one handed in.
"""

from __future__ import annotations

import struct
import time

import numpy as np
import xxhash

from . import layout as L
from .arena import Arena
from .eviction import for_header
from .expiry import Expiry
from .lock import StripeLocks
from .errors import LayoutMismatch
from .repair import CLEAN as _CLEAN
from .repair import _U64_MAX, Repair, Undecodable  # noqa: F401 - Undecodable is part of pop's API

_xxh3 = xxhash.xxh3_64_intdigest  # checksums: its low 32 bits (layout.entry_checksum), inline
_SLOT_unpack = L.SLOT.unpack_from
_SLOT_pack = L.SLOT.pack_into
_ENTRY_unpack = L.ENTRY.unpack_from
_ENTRY_pack = L.ENTRY.pack_into
_U64_unpack = L.U64.unpack_from
_F64_pack = L.F64.pack_into
_HDR = L.ENTRY_HEADER
_SS = L.SLOT_SIZE
_AL = L.ALIGN
_CHK = struct.Struct("<I")
_I64 = struct.Struct("<q")

SET, ADD, REPLACE = 0, 1, 2

#: Lock-free read attempts before a reader takes the stripe lock instead. A
#: writer's critical section is a few microseconds, so a handful of retries
#: covers it; a writer that is descheduled or dead is waited for on the lock
#: (which recovers a dead one) instead of burning the CPU.
READ_RETRIES = 16

INT_FLAG = 2  # codec's tag for int; incr works in place on 8-byte ints

_MISSING = object()

#: What an :meth:`Table.update` function returns to delete the key.
DELETE = object()


def key_hash(kb: bytes) -> int:
    """The stable 64-bit hash every process uses for a key (xxh3)."""
    return _xxh3(kb)


def alloc_of(klen: int, vlen: int) -> int:
    return (_HDR + klen + vlen + _AL - 1) & ~(_AL - 1)


class Table(Arena, Expiry, Repair):
    """Probe, insert, delete, reclaim inside one attached segment."""

    def __init__(self, seg, locks: StripeLocks, clock, counters: memoryview, counter_base: int):
        g = seg.geometry
        self.seg = seg
        self.g = g
        self.mm = seg.mm
        self.mv = memoryview(seg.mm)
        self.locks = locks
        self.clock = clock
        self.ctr = counters  # memoryview cast to u64 over the whole segment
        self.cbase = counter_base  # index in ctr of this client's first counter
        self.n_stripes = g.n_stripes
        self.mask = g.n_stripes - 1
        self.sps = g.slots_per_stripe
        self.index_off = g.index_off
        self.refs_off = g.refs_off
        self.arena_off = g.arena_off
        self.stripe_arena = g.stripe_arena
        self.seg_size = g.seg_size
        self.n_segs = g.n_segs
        self.stripe_off = g.stripe_table_off
        self.cap_items = g.items_per_stripe
        #: Arena._pending: from this many items a stripe reclaims in steps
        #: (within RECLAIM_STEP of its cap), computed once, not per insert
        self.cap_steps = self.cap_items - min(self.cap_items // max(self.n_segs, 1), L.RECLAIM_STEP)
        self.max_key = g.max_key_size
        self.max_value = g.max_value_size
        self.policy = for_header(g.policy)
        self.slots = np.frombuffer(
            seg.mm, dtype=L.SLOT_DTYPE, count=g.n_stripes * g.slots_per_stripe, offset=g.index_off
        ).reshape(g.n_stripes, g.slots_per_stripe)
        self.refs = np.frombuffer(
            seg.mm, dtype=np.uint8, count=g.n_stripes * g.slots_per_stripe, offset=g.refs_off
        ).reshape(g.n_stripes, g.slots_per_stripe)
        self.stripes = np.frombuffer(
            seg.mm, dtype=np.uint64, count=g.n_stripes * L.STRIPE_SIZE // 8, offset=g.stripe_table_off
        ).reshape(g.n_stripes, L.STRIPE_SIZE // 8)
        # The same index as raw u64 words: repair finds a slot by its exact bytes.
        self.raw_slots = np.frombuffer(
            seg.mm, dtype="<u8", count=g.n_stripes * g.slots_per_stripe * (_SS // 8), offset=g.index_off
        ).reshape(g.n_stripes, g.slots_per_stripe, _SS // 8)

    def set_counter_base(self, counter_base: int) -> None:
        """Point this process's counters at another client slot (after fork)."""
        self.cbase = counter_base

    def release_views(self) -> None:
        """Drop every buffer export so the mapping can be closed."""
        self.mv.release()
        self.slots = self.refs = self.stripes = self.raw_slots = None

    # ------------------------------------------------------------------ read
    def read(self, kb: bytes):
        """Find ``kb`` without locking.

        Returns ``(flags, value_bytes, expire, ref_offset, ref)`` or None:
        ``ref_offset`` is where the key's access bit lives in the segment and
        ``ref`` its value when read (the caller sets it with :meth:`mark`
        when it was clear). The caller checks ``expire`` against its clock.
        Never returns a torn value: the stripe's seqlock version is the same
        before and after the copy, else it retries, and after READ_RETRIES
        takes the lock. Every location read from the index is bounds-checked
        against the stripe's arena before it is followed.
        """
        h = _xxh3(kb)
        s = h & self.mask
        tag = (h >> 32) | 1
        mm = self.mm
        vo = self.stripe_off + s * L.STRIPE_SIZE
        sps = self.sps
        base = self.index_off + s * sps * _SS
        refs = self.refs_off + s * sps
        ab = self.arena_off + s * self.stripe_arena
        limit = self.stripe_arena
        klen = len(kb)
        home = tag % sps
        for _ in range(READ_RETRIES):
            v1 = _U64_unpack(mm, vo)[0]
            if v1 & 1:
                continue
            result = None
            try:
                i = home
                for _ in range(sps):
                    t, loc, exp = _SLOT_unpack(mm, base + i * _SS)
                    if t == 0:
                        break
                    if t == tag:
                        o = loc * _AL
                        if o + _HDR + klen <= limit:
                            a = ab + o
                            _c, vlen, kl, flags, _p = _ENTRY_unpack(mm, a)
                            if kl == klen and o + _HDR + klen + vlen <= limit and mm[a + _HDR : a + _HDR + klen] == kb:
                                v = a + _HDR + klen
                                if (_xxh3(self.mv[a + 4 : v + vlen]) & 0xFFFFFFFF) == _c:  # else damage: absent
                                    result = (flags, mm[v : v + vlen], exp, refs + i, mm[refs + i])
                                break
                    i += 1
                    if i == sps:
                        i = 0
            except Exception:  # garbage seen mid-write; the version check decides
                if _U64_unpack(mm, vo)[0] == v1:
                    raise
                continue
            if _U64_unpack(mm, vo)[0] == v1:
                return result
        return self.read_locked(kb)

    def read_locked(self, kb: bytes):
        """:meth:`read` under the stripe lock: for a reader that keeps meeting a
        writer, or one that died mid-write (the lock path recovers the stripe)."""
        h = _xxh3(kb)
        s = h & self.mask
        self.locks.lock(s)
        try:
            i = self._find(s, (h >> 32) | 1, kb)
            if i < 0:
                return None
            p = self._slot_pos(s, i)
            _t, loc, exp = _SLOT_unpack(self.mm, p)
            a = self.arena_off + s * self.stripe_arena + loc * _AL
            _c, vlen, klen, flags, _p = _ENTRY_unpack(self.mm, a)
            if not self._whole(a, klen, vlen):
                return None  # damage (check reports it): never returned as a value
            r = self.refs_off + s * self.sps + i
            return (flags, self.mm[a + _HDR + klen : a + _HDR + klen + vlen], exp, r, self.mm[r])
        finally:
            self.locks.unlock(s)

    def mark(self, ref_offset: int) -> None:
        """Set a key's access bit (racy by design: a hint, not data). Callers
        do it only when :meth:`read` saw it clear, so a hot key costs no
        shared-memory store per hit."""
        self.mm[ref_offset] = 1

    # --------------------------------------------------------------- helpers
    def _slot_pos(self, s: int, i: int) -> int:
        return self.index_off + (s * self.sps + i) * _SS

    def _entry(self, s: int, loc: int):
        """(segment offset of the entry, vlen, klen, flags) for a slot's loc;
        ValueError if the location or lengths fall outside the arena."""
        o = loc * _AL
        if o + _HDR > self.stripe_arena:
            raise ValueError(f"stripe {s}: entry location {o} outside the arena")
        a = self.arena_off + s * self.stripe_arena + o
        _c, vlen, klen, flags, _p = _ENTRY_unpack(self.mm, a)
        if o + _HDR + klen + vlen > self.stripe_arena:
            raise ValueError(f"stripe {s}: entry at {o} runs past the arena")
        return a, vlen, klen, flags

    def _whole(self, a: int, klen: int, vlen: int) -> bool:
        """Does the entry at segment offset ``a`` pass its checksum? (False:
        damage, which every reader treats as absent and check reports.)"""
        return (_xxh3(self.mv[a + 4 : a + _HDR + klen + vlen]) & 0xFFFFFFFF) == _CHK.unpack_from(self.mm, a)[0]

    def _find(self, s: int, tag: int, kb: bytes) -> int:
        """Slot index (within stripe s) holding kb, or -1. Caller holds the lock."""
        mm = self.mm
        sps = self.sps
        base = self.index_off + s * sps * _SS
        ab = self.arena_off + s * self.stripe_arena
        limit = self.stripe_arena
        klen = len(kb)
        i = tag % sps
        for _ in range(sps):
            t, loc, _exp = _SLOT_unpack(mm, base + i * _SS)
            if t == 0:
                return -1
            if t == tag:
                o = loc * _AL
                if o + _HDR + klen <= limit:
                    a = ab + o
                    if _ENTRY_unpack(mm, a)[2] == klen and mm[a + _HDR : a + _HDR + klen] == kb:
                        return i
            i += 1
            if i == sps:
                i = 0
        return -1

    def _locate(self, s: int, tag: int, loc: int) -> int:
        """Slot index of the entry at ``loc`` (reclaim's liveness test), or -1."""
        mm = self.mm
        sps = self.sps
        base = self.index_off + s * sps * _SS
        i = tag % sps
        for _ in range(sps):
            t, lc, _exp = _SLOT_unpack(mm, base + i * _SS)
            if t == 0:
                break
            if t == tag and lc == loc:
                return i
            i += 1
            if i == sps:
                i = 0
        return -1

    def _empty_from(self, s: int, tag: int) -> int:
        mm = self.mm
        sps = self.sps
        base = self.index_off + s * sps * _SS
        i = tag % sps
        for _ in range(sps):
            if not _U64_unpack(mm, base + i * _SS)[0] & 0xFFFFFFFF:
                return i
            i += 1
            if i == sps:
                i = 0
        return -1  # no empty slot: only damage fills a slice (the load cap keeps a quarter free)

    def _write_entry(self, a: int, kb: bytes, flags: int, vb) -> None:
        """Write the entry ``[header | kb | vb]`` at segment offset ``a``
        (checksum last; the slot that publishes it is written after)."""
        mm = self.mm
        klen = len(kb)
        vlen = len(vb)
        e = a + _HDR
        _ENTRY_pack(mm, a, 0, vlen, klen, flags, 0)
        mm[e : e + klen] = kb
        mm[e + klen : e + klen + vlen] = vb
        _CHK.pack_into(mm, a, (_xxh3(self.mv[a + 4 : e + klen + vlen]) & 0xFFFFFFFF))

    def _delete_at(self, s: int, i: int) -> None:
        """Remove slot i of stripe s (backward shift, access bits moving with
        their slots). Caller holds the lock and does the accounting."""
        mm = self.mm
        sps = self.sps
        base = self.index_off + s * sps * _SS
        refs = self.refs_off + s * sps
        j = i
        k = i
        for _ in range(sps - 1):  # at most one lap, even in a slice with no empty slot
            k += 1
            if k == sps:
                k = 0
            pk = base + k * _SS
            t = _U64_unpack(mm, pk)[0] & 0xFFFFFFFF
            if t == 0:
                break
            home = t % sps
            if (k - home) % sps >= (k - j) % sps:
                pj = base + j * _SS
                mm[pj : pj + _SS] = mm[pk : pk + _SS]
                mm[refs + j] = mm[refs + k]
                j = k
        pj = base + j * _SS
        mm[pj : pj + _SS] = bytes(_SS)
        mm[refs + j] = 0

    def _drop(self, s: int, i: int, alloc: int | None = None) -> None:
        """Remove slot i with its accounting (items, live bytes)."""
        if alloc is None:
            try:
                _a, vlen, klen, _f = self._entry(s, _SLOT_unpack(self.mm, self._slot_pos(s, i))[1])
                alloc = alloc_of(klen, vlen)
            except ValueError:
                alloc = 0
        self._delete_at(s, i)
        st = self.stripes
        st[s, L.S_ITEMS // 8] = max(0, int(st[s, L.S_ITEMS // 8]) - 1)
        st[s, L.S_LIVE // 8] = max(0, int(st[s, L.S_LIVE // 8]) - alloc)

    def _drop_expired(self, s: int, now: float, limit: int | None = None) -> int:
        """Drop up to ``limit`` expired slots of stripe s (one scan of its
        index column). Returns how many."""
        sl = self.slots[s]
        exp = sl["expire"]
        hit = np.nonzero((exp > 0.0) & (exp <= now) & (sl["tag"] != 0))[0]
        if limit is not None:
            hit = hit[:limit]
        if len(hit) == 0:
            return 0
        for tag, loc in zip(sl["tag"][hit].tolist(), sl["loc"][hit].tolist()):
            i = self._locate(s, tag, loc)
            if i >= 0:
                self._drop(s, i)
        self.ctr[self.cbase + L.C_EXPIRATIONS] += len(hit)
        return len(hit)

    def _undo(self, s: int) -> None:
        """Make stripe s consistent again after an unexpected exception (e.g.
        KeyboardInterrupt, MemoryError) inside a mutation that holds its lock:
        the repair a recoverer would run, leaving the seqlock version odd for
        the caller's unlock. Every mutation below calls it from
        ``except BaseException`` after letting the deliberate errors (_CLEAN)
        through, so the happy path pays nothing (zero-cost try in Python 3.11;
        a ``with`` block would cost an object and two calls per write)."""
        self._repair_or_empty(s)

    # ------------------------------------------------------------- mutations
    def write(self, kb: bytes, flags: int, vb, expire: float, mode: int = SET) -> bool:
        """Store kb -> (flags, vb) with absolute deadline ``expire`` (0 = never).

        ``mode`` SET always stores; ADD only if the key is absent (or expired);
        REPLACE only if present. Returns whether it stored.

        Raises:
            CacheFull: noeviction and no room.
            LockTimeout: the stripe stayed locked by a live process.
        """
        h = _xxh3(kb)
        s = h & self.mask
        tag = (h >> 32) | 1
        self.locks.lock(s)
        try:
            return self._write_locked(s, tag, kb, flags, vb, expire, mode, self.clock())
        except _CLEAN:
            raise
        except BaseException:
            self._undo(s)
            raise
        finally:
            self.locks.unlock(s)

    def _write_locked(self, s, tag, kb, flags, vb, expire, mode, now):
        mm = self.mm
        i = self._find(s, tag, kb)
        if i >= 0:
            oexp = L.F64.unpack_from(mm, self._slot_pos(s, i) + L.SL_EXPIRE)[0]
            if oexp and oexp <= now:  # expired: it counts as absent
                if mode == REPLACE:
                    return False
            elif mode == ADD:
                return False
        elif mode == REPLACE:
            return False
        need = alloc_of(len(kb), len(vb))
        off, moved = self._alloc(s, need, i < 0, now)
        if moved and i >= 0:
            i = self._find(s, tag, kb)  # reclaim may have moved or evicted it
        self._write_entry(self.arena_off + s * self.stripe_arena + off, kb, flags, vb)
        st = self.stripes
        if i >= 0:
            p = self._slot_pos(s, i)
            try:
                _a, ovlen, oklen, _f = self._entry(s, _SLOT_unpack(mm, p)[1])
                old = alloc_of(oklen, ovlen)
            except ValueError:  # the replaced entry's header is damaged (check reports the count)
                old = 0
            st[s, L.S_LIVE // 8] = max(0, int(st[s, L.S_LIVE // 8]) - old)
        else:
            i = self._empty_from(s, tag)
            if i < 0:  # writers keep a slot free (MAX_LOAD): only damage fills a slice
                dropped = self._repair_or_empty(s, full=True)
                raise LayoutMismatch(
                    f"stripe {s}'s index had no empty slot (damaged); it was repaired "
                    f"({'emptied' if dropped < 0 else f'{dropped} bad slots dropped'}): retry the write"
                )
            p = self._slot_pos(s, i)
            # A new key starts without a second chance: an empty slot's access
            # bit is 0 already (every removal clears it; storing it again here
            # cost a cache miss per insert, +40% on a set with room).
            st[s, L.S_ITEMS // 8] = (int(st[s, L.S_ITEMS // 8]) + 1) & _U64_MAX  # (a damaged count may be 2**64 - 1)
        _SLOT_pack(mm, p, tag, off // _AL, expire)  # publish
        head, tail, fill = self._ring(s)
        self._set_ring(s, head, tail, fill + need)
        st[s, L.S_LIVE // 8] = (int(st[s, L.S_LIVE // 8]) + need) & _U64_MAX
        return True

    def write_many(self, entries) -> None:
        """Store many (kb, flags, vb, expire) tuples, taking each stripe lock once.

        Raises:
            as :meth:`write`; the entries stored before the error stay.
        """
        by_stripe: dict[int, list] = {}
        for e in entries:
            h = _xxh3(e[0])
            by_stripe.setdefault(h & self.mask, []).append(((h >> 32) | 1, e))
        for s, items in by_stripe.items():
            self.locks.lock(s)
            try:
                now = self.clock()
                for tag, (kb, flags, vb, expire) in items:
                    self._write_locked(s, tag, kb, flags, vb, expire, SET, now)
            except _CLEAN:
                raise
            except BaseException:
                self._undo(s)
                raise
            finally:
                self.locks.unlock(s)

    def delete(self, kb: bytes) -> bool:
        """Remove kb. True if a live (unexpired) entry was removed."""
        return self.pop(kb, want_value=False) is not None

    def pop(self, kb: bytes, want_value: bool = True, decode=None):
        """Remove kb and return (flags, value_bytes), or None if absent/expired.

        With ``decode(flags, value_bytes)``, return what it returns instead; it
        runs under the stripe lock before the entry is removed, so a value this
        process cannot decode stays in the cache (raises Undecodable from the error).
        """
        h = _xxh3(kb)
        s = h & self.mask
        tag = (h >> 32) | 1
        self.locks.lock(s)
        try:
            i = self._find(s, tag, kb)
            if i < 0:
                return None
            mm = self.mm
            _t, loc, exp = _SLOT_unpack(mm, self._slot_pos(s, i))
            try:
                a, vlen, klen, flags = self._entry(s, loc)
                whole = self._whole(a, klen, vlen)
            except ValueError:
                whole = False
            if not whole:  # damage (check reports it): absent, as for a read; the removal goes ahead
                self._drop(s, i)
                return None
            live = not (exp and exp <= self.clock())
            out = None
            if live:
                out = (flags, mm[a + _HDR + klen : a + _HDR + klen + vlen] if want_value else b"")
                if want_value and decode is not None:
                    try:
                        out = decode(*out)
                    except Exception as e:
                        raise Undecodable() from e
            self._drop(s, i, alloc_of(klen, vlen))
            if not live:
                self.ctr[self.cbase + L.C_EXPIRATIONS] += 1
            return out
        except _CLEAN:
            raise
        except BaseException:
            self._undo(s)
            raise
        finally:
            self.locks.unlock(s)

    def delete_many(self, kbs) -> int:
        """Remove many keys, taking each stripe lock once. Returns how many were live."""
        by_stripe: dict[int, list] = {}
        for kb in kbs:
            h = _xxh3(kb)
            by_stripe.setdefault(h & self.mask, []).append(((h >> 32) | 1, kb))
        n = 0
        for s, keys in by_stripe.items():
            self.locks.lock(s)
            try:
                now = self.clock()
                for tag, kb in keys:
                    i = self._find(s, tag, kb)
                    if i < 0:
                        continue
                    exp = L.F64.unpack_from(self.mm, self._slot_pos(s, i) + L.SL_EXPIRE)[0]
                    if not (exp and exp <= now):
                        n += 1
                    else:
                        self.ctr[self.cbase + L.C_EXPIRATIONS] += 1
                    self._drop(s, i)
            except _CLEAN:
                raise
            except BaseException:
                self._undo(s)
                raise
            finally:
                self.locks.unlock(s)
        return n

    def incr(self, kb: bytes, delta: int, default, expire_if_new: float, encode_int) -> int:
        """Add ``delta`` to the int at kb atomically and return the result.

        A missing or expired key starts from ``default`` (KeyError if None) and
        gets ``expire_if_new``; an existing key keeps its deadline.

        Raises:
            KeyError: missing and ``default`` is None.
            TypeError: the stored value is not an int.
        """
        h = _xxh3(kb)
        s = h & self.mask
        tag = (h >> 32) | 1
        self.locks.lock(s)
        try:
            now = self.clock()
            i = self._find(s, tag, kb)
            mm = self.mm
            if i >= 0:
                _t, loc, exp = _SLOT_unpack(mm, self._slot_pos(s, i))
                if exp and exp <= now:
                    i = -1
            if i < 0:
                if default is None:
                    raise KeyError(kb)
                value = default + delta
                self._write_locked(s, tag, kb, INT_FLAG, encode_int(value), expire_if_new, SET, now)
                return value
            a, vlen, klen, flags = self._entry(s, loc)
            if flags != INT_FLAG:
                raise TypeError(f"cannot increment key {kb!r}: its value is not an int")
            v = a + _HDR + klen
            value = int.from_bytes(mm[v : v + vlen], "little", signed=True) + delta
            if vlen == 8 and -(2**63) <= value < 2**63:
                # In place: one 8-byte store of the value, then the checksum
                # (repair keeps an 8-byte int whose checksum lags: it is the old
                # or the new value, never a mix).
                _I64.pack_into(mm, v, value)
                _CHK.pack_into(mm, a, (_xxh3(self.mv[a + 4 : v + 8]) & 0xFFFFFFFF))
                r = self.refs_off + s * self.sps + i
                if not mm[r]:  # an update in place is an access: it ages with its segment otherwise
                    mm[r] = 1
            else:
                self._write_locked(s, tag, kb, INT_FLAG, encode_int(value), exp, SET, now)
            return value
        except _CLEAN:
            raise
        except BaseException:
            self._undo(s)
            raise
        finally:
            self.locks.unlock(s)

    def update(self, kb: bytes, fn):
        """Atomic read-modify-write of one key under its stripe lock.

        ``fn(current)`` gets ``(flags, value_bytes, expire)`` or None (absent or
        expired) and returns None (change nothing), :data:`DELETE`, or a new
        ``(flags, value_bytes, expire)`` to store (``expire`` absolute, 0 =
        never). It runs with the stripe locked: it must be short and must not
        use the cache. An exception from ``fn`` propagates with nothing changed.
        Returns what ``fn`` returned.

        Raises:
            CacheFull: noeviction and no room for the new value.
            LockTimeout: the stripe stayed locked by a live process.
        """
        h = _xxh3(kb)
        s = h & self.mask
        tag = (h >> 32) | 1
        self.locks.lock(s)
        try:
            now = self.clock()
            mm = self.mm
            i = self._find(s, tag, kb)
            cur = None
            if i >= 0:
                _t, loc, exp = _SLOT_unpack(mm, self._slot_pos(s, i))
                if not (exp and exp <= now):
                    a, vlen, klen, flags = self._entry(s, loc)
                    v = a + _HDR + klen
                    cur = (flags, mm[v : v + vlen], exp)
            new = fn(cur)  # before any change: whatever it raises leaves the stripe as it was
        except BaseException:
            self.locks.unlock(s)
            raise
        try:
            if new is DELETE:
                if i >= 0:
                    self._drop(s, i)
                    if cur is None:
                        self.ctr[self.cbase + L.C_EXPIRATIONS] += 1
            elif new is not None:
                self._write_locked(s, tag, kb, new[0], new[1], new[2], SET, now)
            return new
        except _CLEAN:
            raise
        except BaseException:
            self._undo(s)
            raise
        finally:
            self.locks.unlock(s)

    def touch(self, kb: bytes, expire: float) -> bool:
        """Give a live key a new deadline (0 = never). False if absent or expired."""
        h = _xxh3(kb)
        s = h & self.mask
        tag = (h >> 32) | 1
        self.locks.lock(s)
        try:
            now = self.clock()
            i = self._find(s, tag, kb)
            if i < 0:
                return False
            p = self._slot_pos(s, i)
            exp = L.F64.unpack_from(self.mm, p + L.SL_EXPIRE)[0]
            if exp and exp <= now:
                return False
            _F64_pack(self.mm, p + L.SL_EXPIRE, expire)
            return True
        except _CLEAN:
            raise
        except BaseException:
            self._undo(s)
            raise
        finally:
            self.locks.unlock(s)

    def _empty_stripe(self, s: int) -> None:
        """Zero stripe s's index, access bits and ring (caller holds the lock)."""
        base = self.index_off + s * self.sps * _SS
        self.mm[base : base + self.sps * _SS] = bytes(self.sps * _SS)
        r = self.refs_off + s * self.sps
        self.mm[r : r + self.sps] = bytes(self.sps)
        st = self.stripes
        st[s, L.S_ITEMS // 8] = 0
        st[s, L.S_LIVE // 8] = 0
        st[s, L.S_RING // 8] = 0
        L.SEG.pack_into(self.mm, self._seg_base(s, 0), 0, 0, 0)  # segment 0 is the (open) head again

    def clear(self) -> int:
        """Empty every stripe and bump the generation, holding every stripe
        lock at once (taken in ascending order, released in reverse; nothing
        else holds two stripe locks, so this cannot deadlock). Returns how many
        entries were dropped.

        Raises:
            LockTimeout: a live process kept some stripe locked too long
                (nothing was cleared).
        """
        locks = self.locks
        held = []
        try:
            for s in range(self.n_stripes):
                locks.lock(s)
                held.append(s)
            n = 0
            try:
                for s in held:
                    n += int(self.stripes[s, L.S_ITEMS // 8])
                    self._empty_stripe(s)
                self.ctr[L.H_GENERATION >> 3] = (self.ctr[L.H_GENERATION >> 3] + 1) & _U64_MAX  # wraps
            except BaseException:
                for s in held:
                    self._undo(s)
                raise
            return n
        finally:
            for s in reversed(held):
                locks.unlock(s)

    # -------------------------------------------------------------- scanning
    def stripe_records(self, s: int) -> list:
        """A consistent copy of stripe s's live entries:
        ``[(kb, flags, value_bytes, expire, ref, age), ...]`` (expired ones
        included). ``age`` is the entry's place in the ring, 0.0 at the tail
        (reclaimed next) to 1.0 at the head (written last): write order within
        the stripe, comparable across stripes only roughly.
        Lock-free with seqlock retries; takes the lock if a writer keeps interfering."""
        mm = self.mm
        vo = self.stripe_off + s * L.STRIPE_SIZE
        for attempt in range(4):
            locked = attempt == 3
            if locked:
                self.locks.lock(s)
            try:
                v1 = _U64_unpack(mm, vo)[0]
                if v1 & 1 and not locked:
                    time.sleep(0)
                    continue
                head, tail, fill = L.unpack_ring(int(self.stripes[s, L.S_RING // 8]))
                span = ((head - tail) % self.n_segs) * self.seg_size + fill or 1
                sl = self.slots[s]
                occ = np.nonzero(sl["tag"] != 0)[0]
                rec = sl[occ]
                refs = self.refs[s][occ]
                out = []
                try:
                    for loc, exp, ref in zip(rec["loc"].tolist(), rec["expire"].tolist(), refs.tolist()):
                        try:
                            a, vlen, klen, flags = self._entry(s, loc)
                        except ValueError:
                            continue  # damage (or a writer: the version check below decides)
                        if not self._whole(a, klen, vlen):
                            continue  # damage reads as absent, as for get (check reports it)
                        k = a + _HDR
                        o = loc * _AL
                        age = (((o // self.seg_size - tail) % self.n_segs) * self.seg_size + o % self.seg_size) / span
                        out.append((mm[k : k + klen], flags, mm[k + klen : k + klen + vlen], exp, ref, age))
                except Exception:
                    if locked or _U64_unpack(mm, vo)[0] == v1:
                        raise
                    continue
                if locked or _U64_unpack(mm, vo)[0] == v1:
                    return out
            finally:
                if locked:
                    self.locks.unlock(s)
        raise AssertionError("unreachable")  # pragma: no cover

    def keys_of(self, s: int, now: float) -> list[bytes]:
        """Encoded keys of stripe s that are live at ``now`` (consistent per stripe)."""
        return [kb for kb, _f, _v, exp, _r, _a in self.stripe_records(s) if not (exp and exp <= now)]

    def count(self, now: float) -> int:
        """Live, unexpired entries (a point-in-time count over the whole index)."""
        sl = self.slots
        exp = sl["expire"]
        return int(np.count_nonzero((sl["tag"] != 0) & ((exp == 0.0) | (exp > now))))
