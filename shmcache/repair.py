"""Integrity: find and repair what a writer killed mid-operation left behind.

A stripe whose lock holder died is repaired by the process that recovers the
lock (lock.py calls :meth:`Repair.repair`) before anyone writes to it again.
What a SIGKILL can leave, and what repair does about it:

- an index slot pointing at an entry that is not whole (its checksum fails,
  its header disagrees, it lies outside the segments in use): the slot is
  dropped (at most the entry that was being written);
- the same key twice (a backward shift or copy-forward cut short): one is
  dropped;
- a slot a lookup cannot reach (a bulk index rewrite cut short): re-homed;
- the ring's head fill behind an entry already published: moved past it;
- a segment whose entry chain (what a reclaim walks, header to end) breaks
  before its end or passes over an indexed entry (only damage does that: a
  dead entry's length, a segment's end words): the entries after the break
  are dropped and the segment cut back to it;
- item and byte counts: recomputed from the index.

:meth:`Repair.check` reports the same problems without fixing them (the
``shmcache check`` command), holding each stripe's lock for one pass over its
index (~1 ms per 10k entries).
"""

from __future__ import annotations

import numpy as np
import xxhash

from . import layout as L
from .errors import Error

try:  # the C accelerator hashes a stripe's entries in one call (repair is a writer's stall)
    from ._speedups import chain_walk as _chain_walk
    from ._speedups import entry_sums as _entry_sums
except ImportError:  # pragma: no cover - no C compiler: the per-slot loop
    _entry_sums = _chain_walk = None

_xxh3 = xxhash.xxh3_64_intdigest
_entry_sum = L.entry_checksum
_HDR = L.ENTRY_HEADER
_SS = L.SLOT_SIZE
_SLOT_unpack = L.SLOT.unpack_from
_LENS_unpack = L.ENTRY_LENS.unpack_from

INT_FLAG = 2  # codec's tag for int (see table.incr)

_U64_MAX = 2**64 - 1

#: madvise(MADV_POPULATE_READ) (Linux 5.14+; Python's mmap module does not name it).
MADV_POPULATE_READ = 22

_SUMS = np.dtype([("h", "<u8"), ("chk", "<u4"), ("bad", "<u4")])  # _speedups.entry_sums' records

#: Repair._scan's codes, worded as Repair._slot_problem words them.
_WHY = {
    1: "entry location {o} is in segment {seg}, which is not in use",
    2: "entry location {o} outside its segment's entries",
    3: "entry at {o} (key {klen}, value {vlen} bytes) runs past its segment",
    4: "key hash does not match the slot tag",
    5: "checksum mismatch",
    6: "int checksum",
}


def entry_sums(buf, offs: np.ndarray, checksums: bool = True) -> np.ndarray:
    """For the entries at byte offsets ``offs`` of ``buf`` (a segment, or a
    copy of a stripe's arena), records of _SUMS: the xxh3-64 of each key, the
    checksum (layout.entry_checksum) its checksum field should hold (0 without ``checksums``) and
    ``bad`` = 1 where the header or bytes fall outside ``buf`` (sums then 0).
    The C accelerator's one call, or the same per entry in Python."""
    if _entry_sums is not None:
        return np.frombuffer(_entry_sums(buf, np.asarray(offs, dtype="<u8").tobytes(), checksums), dtype=_SUMS)
    out = np.zeros(len(offs), dtype=_SUMS)
    mv = memoryview(buf).cast("B")
    for j, a in enumerate(np.asarray(offs, dtype=np.int64).tolist()):
        if a + _HDR > len(mv):
            out["bad"][j] = 1
            continue
        _c, vlen, klen, _f, _p = L.ENTRY.unpack_from(mv, a)
        if a + _HDR + klen + vlen > len(mv):
            out["bad"][j] = 1
            continue
        out["h"][j] = _xxh3(mv[a + _HDR : a + _HDR + klen])
        if checksums:
            out["chk"][j] = _entry_sum(mv[a + 4 : a + _HDR + klen + vlen])
    return out


def _on_chain(offs: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Which of ``offs`` are entry starts of a chain (``starts``, ascending as
    a walk finds them). A binary search, not np.isin: isin's first call
    imports numpy.ma, ~23 ms that landed in the first recovery of every
    process (the stall of the writer that found the holder dead)."""
    if not len(starts):
        return np.zeros(len(offs), dtype=bool)
    at = np.minimum(np.searchsorted(starts, offs), len(starts) - 1)
    return starts[at] == offs


class Undecodable(Exception):
    """``pop``'s decode failed before anything changed; the error is ``__cause__``."""


#: What a locked mutation raises on purpose, before it changes anything (or,
#: for CacheFull, after only moving entries, which changes no key's value): no
#: repair needed. Anything else escaping the lock hold (KeyboardInterrupt,
#: MemoryError, a bug) may leave the stripe half-mutated, so the table repairs
#: it before unlocking.
CLEAN = (Error, TypeError, KeyError, Undecodable)


class Repair:
    """Check and repair for :class:`shmcache.table.Table` (a mixin)."""

    def _slot_problem(self, s: int, tag: int, loc: int, segs: dict, head: int | None = None) -> str | None:
        """Why the slot (tag, loc) of stripe s is damaged, or None if sound.
        ``segs``: segment -> the end its entries may reach (in-use segments only).
        With ``head``, the checksum only of entries a writer writes (see _scan)."""
        o = loc * L.ALIGN
        seg, e = divmod(o, self.seg_size)
        if seg not in segs:
            return f"entry location {o} is in segment {seg}, which is not in use"
        if e < L.SEG_HEADER or e + _HDR > self.seg_size:
            return f"entry location {o} outside its segment's entries"
        a = self.arena_off + s * self.stripe_arena + o
        chk, vlen, klen, flags, _p = L.ENTRY.unpack_from(self.mm, a)
        if klen > self.max_key or vlen > self.max_value or e + _HDR + klen + vlen > segs[seg]:
            return f"entry at {o} (key {klen}, value {vlen} bytes) runs past its segment"
        kb = self.mm[a + _HDR : a + _HDR + klen]
        if (_xxh3(kb) >> 32) | 1 != tag:
            return "key hash does not match the slot tag"
        if head is not None and seg != head and not (flags == INT_FLAG and vlen == 8):
            return None
        if _entry_sum(self.mv[a + 4 : a + _HDR + klen + vlen]) != chk:
            if flags == INT_FLAG and vlen == 8:
                return "int checksum"
            return "checksum mismatch"
        return None

    def _scan(self, s: int, segs: dict, head: int | None = None) -> tuple[dict[int, str], np.ndarray, np.ndarray]:
        """Every occupied slot of stripe s judged as :meth:`_slot_problem`
        judges one: ({slot: why} of the damaged ones, the other occupied slots
        in arena order, their keys' xxh3-64 — "int checksum" slots are in both).
        With ``head`` (repair after a dead writer), checksums are verified
        only where a writer writes entry bytes: the head segment (appends and
        copy-forwards) and 8-byte ints (incr in place); every slot's location,
        header and key are checked all the same. Vectorized, with
        the C accelerator's entry_sums for the key hashes and checksums: a
        repair is the stall of the writer that found the holder dead, and a
        per-slot Python loop took ~7 us per entry (80 ms for a 64 MiB cache's
        stripe). Without the accelerator, that loop."""
        sl = self.slots[s]
        occ = np.nonzero(sl["tag"] != 0)[0]
        if _entry_sums is None:
            bad, sound, hashes = {}, [], []
            ab = self.arena_off + s * self.stripe_arena
            for i in occ.tolist():
                why = self._slot_problem(s, int(sl["tag"][i]), int(sl["loc"][i]), segs, head)
                if why is None or why == "int checksum":
                    a = ab + int(sl["loc"][i]) * L.ALIGN
                    sound.append(i)
                    hashes.append(_xxh3(self.mm[a + _HDR : a + _HDR + L.ENTRY.unpack_from(self.mm, a)[2]]))
                if why is not None:
                    bad[i] = why
            return bad, np.array(sound, dtype=np.int64), np.array(hashes, dtype=np.uint64)
        o = sl["loc"][occ].astype(np.int64) * L.ALIGN
        order = np.argsort(o)  # arena order from here on: the header and key reads stream
        occ, o = occ[order], o[order]
        tags = sl["tag"][occ].astype(np.int64)
        seg = np.minimum(o // self.seg_size, self.n_segs)
        e = o % self.seg_size
        ab = self.arena_off + s * self.stripe_arena
        ends = np.zeros(self.n_segs + 1, dtype=np.int64)
        for k, end in segs.items():
            ends[k] = end
        why = np.zeros(len(occ), dtype=np.int8)  # 0 sound; see WHY below
        why[ends[seg] == 0] = 1
        why[(why == 0) & ((e < L.SEG_HEADER) | (e + _HDR > self.seg_size))] = 2
        ok = why == 0
        words = np.frombuffer(self.mm, dtype="<u4", count=self.stripe_arena // 4,
                              offset=self.arena_off + s * self.stripe_arena)
        w = np.where(ok, o // 4, 0)
        chk = words[w].astype(np.int64)
        vlen = words[w + 1].astype(np.int64)
        klen = (words[w + 2] & 0xFFFF).astype(np.int64)
        flags = (words[w + 2] >> 16) & 0xFF
        why[ok & ((klen > self.max_key) | (vlen > self.max_value) | (e + _HDR + klen + vlen > ends[seg]))] = 3
        ok = why == 0
        summed = ok if head is None else ok & ((seg == head) | ((flags == INT_FLAG) & (vlen == 8)))
        h = np.zeros(len(occ), dtype=np.uint64)
        good_sum = chk.copy()  # entries not summed pass the checksum test
        outside = np.zeros(len(occ), dtype=bool)
        for part, full in ((summed, True), (ok & ~summed, False)):
            at = np.nonzero(part)[0]
            sums = entry_sums(self.mm, ab + o[at], full)
            h[at] = sums["h"]
            if full:
                good_sum[at] = sums["chk"]
            outside[at] = sums["bad"] != 0
        why[ok & outside] = 3
        ok = why == 0
        why[ok & (((h >> np.uint64(32)) | np.uint64(1)).astype(np.int64) != tags)] = 4
        ok = why == 0
        torn = ok & (good_sum != chk)
        why[torn] = 5
        why[torn & (flags == INT_FLAG) & (vlen == 8)] = 6
        bad = {}
        for j in np.nonzero(why)[0].tolist():
            i = int(occ[j])
            bad[i] = _WHY[why[j]].format(o=int(o[j]), seg=int(o[j]) // self.seg_size, klen=int(klen[j]), vlen=int(vlen[j]))
        keep = (why == 0) | (why == 6)
        return bad, occ[keep].astype(np.int64), h[keep]

    def _segment_ends(self, s: int, fill_from_entries: bool) -> dict:
        head, tail, fill = self._ring(s)
        ends = {seg: self._seg_end(s, seg) for seg in self.in_use(s)}
        # The head's entries may run past the recorded fill only when its writer
        # died between publishing a slot and advancing the fill.
        ends[head] = self.seg_size if fill_from_entries else fill
        return ends

    def repair(self, s: int, full: bool = False) -> int:
        """Repair stripe s after its lock holder died: drop every slot whose entry
        fails its checks (and duplicates), re-home unreachable slots, move the
        head's fill past every published entry, recompute the accounting, leave
        the seqlock version even. Returns how many slots were dropped. Caller
        holds the stripe (as recoverer).

        Checksums are verified where a writer writes entry bytes (the head
        segment, ints incremented in place): that is all a killed writer can
        tear, and reading every value of a large stripe was most of the stall
        of the writer that recovers it. ``full``: verify every entry's
        checksum (``admin.repair``, ``check --fix``: damage from elsewhere).

        Crash-safe itself: the version is odd for the whole repair (the holder
        may have died with it even, e.g. between taking the lock word and the
        version bump),
        and slots are removed by backward-shift deletion, which keeps every
        surviving entry reachable at every step, so a recoverer killed midway
        loses nothing and the next one finishes the job.
        """
        st = self.stripes
        v = int(st[s, 0])
        if not v & 1:
            st[s, 0] = (v + 1) & _U64_MAX  # (a damaged version may be 2**64 - 1)
        dropped = self._repair_or_empty(s, full)
        st[s, 0] = (int(st[s, 0]) + 1) & _U64_MAX  # even again
        return dropped

    def _repair_or_empty(self, s: int, full: bool = False) -> int:
        """:meth:`repair` without touching the seqlock version (the caller keeps it odd)."""
        try:
            return self._repair(s, full)
        except Exception:  # never leave a stripe unusable: empty it instead
            self._empty_stripe(s)
            return -1

    def _prefault(self, s: int) -> None:
        """Map stripe s's index, access bits and arena into this process in one
        call. A recoverer is often a process that never touched the stripe:
        faulting its pages in one by one took 10-30 ms of a 64 MiB cache's
        recovery (the repair itself, 3-4 ms). Best effort: older kernels say
        EINVAL and the reads fault as before."""
        for off, n in ((self.index_off + s * self.sps * _SS, self.sps * _SS), (self.refs_off + s * self.sps, self.sps),
                       (self.arena_off + s * self.stripe_arena, self.stripe_arena)):
            lo = off & ~(L.PAGE - 1)
            try:
                self.mm.madvise(MADV_POPULATE_READ, lo, off + n - lo)
            except (OSError, ValueError):
                return

    def _repair(self, s: int, full: bool) -> int:
        self._prefault(s)
        mm = self.mm
        head, tail, fill = self._ring(s)  # ValueError on a garbage ring: emptied
        if head != tail:
            # The tail's reclaim walks again from its first entry: entries it
            # already handled are dead and skipped, so a damaged cursor can
            # never leave a live slot behind in a segment that is then freed.
            L.U32.pack_into(mm, self._seg_base(s, tail) + 8, 0)
        segs = self._segment_ends(s, fill_from_entries=True)
        base = self.index_off + s * self.sps * _SS
        ab = self.arena_off + s * self.stripe_arena
        victims = []  # raw slot records, one per instance to delete
        bad, sound, hashes = self._scan(s, segs, None if full else head)
        for i, why in sorted(bad.items()):
            p = base + i * _SS
            if why == "int checksum":
                # An in-place incr killed between the value store and the checksum
                # store: the value is one 8-byte store, so it is the old or the new
                # int, never a mix. Keep it.
                a = ab + _SLOT_unpack(mm, p)[1] * L.ALIGN
                L.U32.pack_into(mm, a, _entry_sum(self.mv[a + 4 : a + _HDR + L.ENTRY.unpack_from(mm, a)[2] + 8]))
            else:
                victims.append(mm[p : p + _SS])
        # The same key twice (a backward shift or copy-forward cut short; an
        # identical raw slot is the same key too): keep the lowest slot. Only
        # slots whose key hash repeats are compared, key bytes and all.
        hs = np.sort(hashes)
        for hv in sorted(set(hs[1:][hs[1:] == hs[:-1]].tolist())):
            kept: list[bytes] = []
            for i in sorted(sound[hashes == hv].tolist()):
                p = base + i * _SS
                a = ab + _SLOT_unpack(mm, p)[1] * L.ALIGN
                kb = mm[a + _HDR : a + _HDR + L.ENTRY.unpack_from(mm, a)[2]]
                if kb in kept:
                    victims.append(mm[p : p + _SS])
                else:
                    kept.append(kb)
        raw_view = self.raw_slots[s]
        for raw in victims:
            hit = np.nonzero((raw_view == np.frombuffer(raw, dtype="<u8")).all(axis=1))[0]
            if len(hit):
                self._delete_at(s, int(hit[-1]))
        self._rehome_unreachable(s)
        chained = self._repair_chains(s, full)
        head, tail, fill = self._ring(s)  # _repair_chains may have cut the head's fill back
        items, live, head_end = self._tally(s, head)
        L.ACCOUNT.pack_into(mm, self.stripe_off + s * L.STRIPE_SIZE + L.S_ITEMS, items, live)
        self._set_ring(s, head, tail, max(fill, head_end))
        if (head + 1) % self.n_segs == tail:
            # No free segment: the tail's reclaim is pending (Arena._advance left
            # it to the next inserts' steps, or its holder died mid-way): finish
            # it, so a segment is free again. Entries already handled are dead
            # and skipped; copies go to the head while they fit.
            self._reclaim(s, tail, 0, self.clock(), second_chance=True)
        return len(victims) + chained

    def _chain(self, s: int, seg: int, end: int) -> tuple[np.ndarray, int]:
        """Walk segment ``seg``'s entries from its header as a reclaim does
        (arena._walk): (the offsets of the entries on the chain, where the walk
        stopped). A whole segment's walk stops exactly at ``end``; a damaged
        entry or segment header makes it stop short (an implausible header, or
        fewer than a header's bytes left) or skip over an entry. In C when the
        accelerator is there: check walks every segment under the stripe's
        lock, and this loop in Python took ~0.4 us per entry (~40 ms of lock
        hold per 16 MiB stripe)."""
        if _chain_walk is not None:
            offs, stop = _chain_walk(self.mm, self._seg_base(s, seg), end, self.max_key, self.max_value)
            return np.frombuffer(offs, dtype=np.uint32).astype(np.int64), stop
        base = self._seg_base(s, seg) + L.E_VLEN
        mm = self.mm
        max_key, max_value, pad = self.max_key, self.max_value, _HDR + L.ALIGN - 1
        e = L.SEG_HEADER
        starts = []
        add = starts.append
        while e + _HDR <= end:  # one loop turn per entry
            vlen, klen = _LENS_unpack(mm, base + e)
            alloc = (pad + klen + vlen) & ~(L.ALIGN - 1)  # layout.entry_alloc
            if klen > max_key or vlen > max_value or e + alloc > end:
                break
            add(e)
            e += alloc
        return np.array(starts, dtype=np.int64), e

    @staticmethod
    def _chain_whole(is_head: bool, stop: int, end: int) -> bool:
        """Did a walk that stopped at ``stop`` cover the segment? The head's
        must reach its fill exactly (the next entry goes there); a sealed
        segment's may also stop with less than an entry header left (an end
        word raised by a few bytes hides nothing)."""
        return stop == end or (not is_head and end - stop < _HDR)

    def _by_segment(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stripe s's slots in use ordered by segment: (slot numbers, their
        segments, their entries' offsets in the segment); see _segment_rows."""
        sl = self.slots[s]
        used = np.nonzero(sl["tag"] != 0)[0]
        seg_of, e_of = np.divmod(sl["loc"][used].astype(np.int64) * L.ALIGN, self.seg_size)
        order = np.argsort(seg_of, kind="stable")
        return used[order], seg_of[order], e_of[order]

    @staticmethod
    def _segment_rows(seg_of: np.ndarray, seg: int) -> slice:
        """The rows of segment ``seg`` in _by_segment's order: two binary
        searches (comparing every slot with every segment took ~11 ms of
        check's lock hold per 16 MiB stripe)."""
        lo, hi = np.searchsorted(seg_of, (seg, seg + 1))
        return slice(int(lo), int(hi))

    def _chain_problems(self, s: int, segs: dict) -> list[str]:
        """check's walk of every segment in use (``segs``: segment -> its end):
        the reclaim of a segment whose walk stops short drops every entry after
        the break, and one whose walk skips over a live entry frees the segment
        under it, so both are damage even while every slot is sound."""
        problems = []
        used, seg_of, e_of = self._by_segment(s)
        head = self._ring(s)[0]
        for seg, end in segs.items():
            starts, stop = self._chain(s, seg, end)
            if not self._chain_whole(seg == head, stop, end):
                problems.append(f"stripe {s} segment {seg}: its entry chain breaks at {stop}, before its end "
                                f"{end} (a damaged entry or segment header)")
            here = self._segment_rows(seg_of, seg)
            off = ~_on_chain(e_of[here], starts)
            for i, e in zip(used[here][off].tolist(), e_of[here][off].tolist()):
                problems.append(f"stripe {s} slot {i}: its entry (segment {seg} at {e}) is not on its "
                                f"segment's entry chain (a damaged header before it)")
        return problems

    def _repair_chains(self, s: int, full: bool) -> int:
        """Make every in-use segment's walk whole again (see _chain_problems):
        drop the slots whose entries the walk cannot reach (a reclaim would lose
        them anyway) and cut the segment's end back to where its walk stops.
        Returns how many slots were dropped. Run after the slot checks, so every
        slot left points at a whole entry in a segment in use.

        Without ``full`` (a recoverer's repair after a dead writer), only the
        head segment is walked: a writer writes entry headers only there, and
        seals a segment with the fill its last entry reached (Arena._advance
        orders those stores so a crash leaves either end word right), so a
        crash can break no other chain; walking every segment in Python would
        have been most of a recovery's stall on a 64 MiB cache."""
        head, tail, fill = self._ring(s)
        used, seg_of, e_of = self._by_segment(s)
        ends_of = e_of + self._allocs(s, seg_of * self.seg_size + e_of)
        doomed = set()
        for seg in self.in_use(s) if full else [head]:
            here = self._segment_rows(seg_of, seg)
            e_here = e_of[here]
            if seg == head:  # entries a dead writer published past the fill are whole
                end = max(fill, int(ends_of[here].max())) if len(e_here) else fill
            else:
                end = self._seg_end(s, seg)
            starts, stop = self._chain(s, seg, end)
            lost = (e_here >= stop) | ~_on_chain(e_here, starts)
            if self._chain_whole(seg == head, stop, end) and not lost.any():
                continue
            # keep the entries before the break that the walk reaches
            doomed.update(self._slot_key(s, i) for i in used[here][lost].tolist())
            if seg == head:
                self._set_ring(s, head, tail, stop)
            else:  # the segment's end is the larger of its two end words (layout.SEG): set both
                base = self._seg_base(s, seg)
                L.U32.pack_into(self.mm, base, stop)
                L.U32.pack_into(self.mm, base + 4, stop)
        i = dropped = 0
        while doomed and i < self.sps:  # a delete shifts later slots back into i: look again
            key = self._slot_key(s, i)
            if key in doomed:
                doomed.discard(key)
                self._delete_at(s, i)
                dropped += 1
                continue
            i += 1
        return dropped

    def _allocs(self, s: int, o: np.ndarray) -> np.ndarray:
        """The allocation (layout.entry_alloc) of the entries at stripe arena
        offsets ``o``, from their headers' lengths, vectorized.

        Raises:
            ValueError: an entry lies outside the arena (only by damage).
        """
        if len(o) and int(o.max()) + _HDR > self.stripe_arena:
            raise ValueError(f"stripe {s}: entry location {int(o.max())} outside the arena")
        words = np.frombuffer(self.mm, dtype="<u4", count=self.stripe_arena // 4,
                              offset=self.arena_off + s * self.stripe_arena)
        alloc = (_HDR + (words[o // 4 + 2] & 0xFFFF).astype(np.int64) + words[o // 4 + 1].astype(np.int64)
                 + L.ALIGN - 1) & ~(L.ALIGN - 1)
        if len(o) and int((o + alloc).max()) > self.stripe_arena:
            raise ValueError(f"stripe {s}: an entry runs past the arena")
        return alloc

    def _slot_key(self, s: int, i: int) -> tuple:
        """(tag, loc) of slot i: what identifies it across backward shifts."""
        tag, loc, _exp = _SLOT_unpack(self.mm, self._slot_pos(s, i))
        return tag, loc

    def _tally(self, s: int, head: int) -> tuple[int, int, int]:
        """(items, live bytes, end of the head segment's last indexed entry).

        Raises:
            ValueError: a slot's entry lies outside the arena (only by damage).
        """
        sl = self.slots[s]
        o = np.sort(sl["loc"][sl["tag"] != 0].astype(np.int64) * L.ALIGN)  # arena order: the reads stream
        alloc = self._allocs(s, o)
        in_head = o // self.seg_size == head
        head_end = int((o[in_head] % self.seg_size + alloc[in_head]).max()) if in_head.any() else L.SEG_HEADER
        return len(o), int(alloc.sum()), max(head_end, L.SEG_HEADER)

    def _unreachable(self, s: int) -> np.ndarray:
        """Occupied slots of stripe s that a lookup cannot reach (an empty slot
        lies between their home and them), vectorized."""
        tags = self.slots[s]["tag"]
        sps = self.sps
        empty = tags == 0
        if not empty.any():
            return np.zeros(0, dtype=np.int64)  # no empty slot: every probe reaches every slot
        idx = np.arange(sps, dtype=np.int64)
        last = np.maximum.accumulate(np.where(empty, idx, -1))  # last empty at or before each slot
        last = np.where(last < 0, int(np.nonzero(empty)[0][-1]) - sps, last)  # wrapping round
        occ = np.nonzero(~empty)[0]
        home = tags[occ].astype(np.int64) % sps
        dist = (occ - home) % sps  # probe steps from the home slot
        return occ[(occ - last[occ]) <= dist]

    def _rehome_unreachable(self, s: int) -> int:
        """Move slots that a lookup cannot reach (an empty slot lies between
        their home and them: a rebuilt index slice written only in part, e.g.
        the daemon's bulk expiry killed mid-copy) to where a lookup finds them.
        Copy first, then delete the stray, so a crash in between leaves a
        duplicate (which the next repair removes), never a loss. Bounded: at
        most three passes over the stripe."""
        mm = self.mm
        sps = self.sps
        base = self.index_off + s * sps * _SS
        refs = self.refs_off + s * sps
        tags = self.slots[s]["tag"]  # a live view: it follows the moves below
        moved = 0
        if not self._unreachable(s).size:
            return 0
        for _ in range(3):
            found = False
            for i in np.nonzero(tags)[0].tolist():
                t = int(tags[i])
                if t == 0:
                    continue
                j = t % sps
                while j != i and tags[j] != 0:
                    j = j + 1 if j + 1 < sps else 0
                if j == i:
                    continue  # reachable
                e = self._empty_from(s, t)
                if e < 0:
                    raise RuntimeError(f"stripe {s}: no empty slot to re-home slot {i}")  # -> emptied
                p, q = base + i * _SS, base + e * _SS
                mm[q : q + _SS] = mm[p : p + _SS]
                mm[refs + e] = mm[refs + i]
                self._delete_at(s, i)
                moved += 1
                found = True
            if not found:
                break
        return moved

    def check(self, s: int) -> list[str]:
        """Integrity problems of stripe s (empty list if sound). Takes the lock."""
        problems = []
        self.locks.lock(s)
        try:
            try:
                head, tail, fill = self._ring(s)
            except ValueError as e:
                return [str(e)]
            segs = self._segment_ends(s, fill_from_entries=False)
            # Entries below the tail's reclaim cursor were handled: none is live.
            below = tail * self.seg_size + self._cursor(s, tail) if head != tail else -1
            sl = self.slots[s]
            found: dict[int, list[str]] = {}
            bad, sound, _h = self._scan(s, segs)
            for i, why in bad.items():
                found.setdefault(i, []).append(why)
            o = sl["loc"][sound].astype(np.int64) * L.ALIGN
            for i, oi in zip(sound[(tail * self.seg_size <= o) & (o < below)].tolist(),
                             o[(tail * self.seg_size <= o) & (o < below)].tolist()):
                if i not in bad:
                    found.setdefault(i, []).append(
                        f"entry at {oi} lies below the tail's reclaim cursor (a damaged cursor skipped it)")
            for i in self._unreachable(s).tolist():
                found.setdefault(i, []).append("unreachable from its home slot")
            for i in sorted(found):
                problems.extend(f"stripe {s} slot {i}: {why}" for why in found[i])
            if problems:
                return problems
            problems = self._chain_problems(s, segs)
            if problems:
                return problems
            items, live_bytes = L.ACCOUNT.unpack_from(self.mm, self.stripe_off + s * L.STRIPE_SIZE + L.S_ITEMS)
            n, total, head_end = self._tally(s, head)
            if items != n:
                problems.append(f"stripe {s}: item count {items} but {n} slots in use")
            if live_bytes != total:
                problems.append(f"stripe {s}: live bytes {live_bytes} but entries take {total}")
            if head_end > fill:
                problems.append(f"stripe {s}: head segment entries end at {head_end}, past its fill {fill}")
        finally:
            self.locks.unlock(s)
        return problems
