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

_xxh3 = xxhash.xxh3_64_intdigest
_xxh32 = xxhash.xxh32_intdigest
_HDR = L.ENTRY_HEADER
_SS = L.SLOT_SIZE
_SLOT_unpack = L.SLOT.unpack_from
_LENS_unpack = L.ENTRY_LENS.unpack_from

INT_FLAG = 2  # codec's tag for int (see table.incr)

_U64_MAX = 2**64 - 1


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

    def _slot_problem(self, s: int, tag: int, loc: int, segs: dict) -> str | None:
        """Why the slot (tag, loc) of stripe s is damaged, or None if sound.
        ``segs``: segment -> the end its entries may reach (in-use segments only)."""
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
        if _xxh32(self.mv[a + 4 : a + _HDR + klen + vlen]) != chk:
            if flags == INT_FLAG and vlen == 8:
                return "int checksum"
            return "checksum mismatch"
        return None

    def _segment_ends(self, s: int, fill_from_entries: bool) -> dict:
        head, tail, fill = self._ring(s)
        ends = {seg: self._seg_end(s, seg) for seg in self.in_use(s)}
        # The head's entries may run past the recorded fill only when its writer
        # died between publishing a slot and advancing the fill.
        ends[head] = self.seg_size if fill_from_entries else fill
        return ends

    def repair(self, s: int) -> int:
        """Repair stripe s after its lock holder died: drop every slot whose entry
        fails its checks (and duplicates), re-home unreachable slots, move the
        head's fill past every published entry, recompute the accounting, leave
        the seqlock version even. Returns how many slots were dropped. Caller
        holds the stripe (as recoverer).

        Crash-safe itself: the version is odd for the whole repair (the holder
        may have died with it even, e.g. between sem_wait and the version bump),
        and slots are removed by backward-shift deletion, which keeps every
        surviving entry reachable at every step, so a recoverer killed midway
        loses nothing and the next one finishes the job.
        """
        st = self.stripes
        v = int(st[s, 0])
        if not v & 1:
            st[s, 0] = (v + 1) & _U64_MAX  # (a damaged version may be 2**64 - 1)
        dropped = self._repair_or_empty(s)
        st[s, 0] = (int(st[s, 0]) + 1) & _U64_MAX  # even again
        return dropped

    def _repair_or_empty(self, s: int) -> int:
        """:meth:`repair` without touching the seqlock version (the caller keeps it odd)."""
        try:
            return self._repair(s)
        except Exception:  # never leave a stripe unusable: empty it instead
            self._empty_stripe(s)
            return -1

    def _repair(self, s: int) -> int:
        mm = self.mm
        head, tail, fill = self._ring(s)  # ValueError on a garbage ring: emptied
        segs = self._segment_ends(s, fill_from_entries=True)
        base = self.index_off + s * self.sps * _SS
        ab = self.arena_off + s * self.stripe_arena
        victims = []  # raw slot records, one per instance to delete
        seen_raw = set()
        seen_keys = set()
        for i in np.nonzero(self.slots[s]["tag"] != 0)[0].tolist():
            p = base + i * _SS
            raw = mm[p : p + _SS]
            tag, loc, _exp = _SLOT_unpack(raw)
            why = self._slot_problem(s, tag, loc, segs)
            if why == "int checksum":
                # An in-place incr killed between the value store and the checksum
                # store: the value is one 8-byte store, so it is the old or the new
                # int, never a mix. Keep it.
                a = ab + loc * L.ALIGN
                L.U32.pack_into(mm, a, _xxh32(self.mv[a + 4 : a + _HDR + L.ENTRY.unpack_from(mm, a)[2] + 8]))
                why = None
            if why is None:
                a = ab + loc * L.ALIGN
                kb = mm[a + _HDR : a + _HDR + L.ENTRY.unpack_from(mm, a)[2]]
                if raw in seen_raw or kb in seen_keys:  # duplicated by a torn shift or copy
                    why = "duplicate"
                seen_raw.add(raw)
                seen_keys.add(kb)
            if why is not None:
                victims.append(raw)
        raw_view = self.raw_slots[s]
        for raw in victims:
            hit = np.nonzero((raw_view == np.frombuffer(raw, dtype="<u8")).all(axis=1))[0]
            if len(hit):
                self._delete_at(s, int(hit[-1]))
        self._rehome_unreachable(s)
        chained = self._repair_chains(s)
        head, tail, fill = self._ring(s)  # _repair_chains may have cut the head's fill back
        items, live, head_end = self._tally(s, head)
        L.ACCOUNT.pack_into(mm, self.stripe_off + (s << 6) + L.S_ITEMS, items, live)
        self._set_ring(s, head, tail, max(fill, head_end))
        if (head + 1) % self.n_segs == tail:
            # The holder died mid-reclaim, after taking the last free segment
            # (Arena._advance): finish that reclaim, so a segment is free again.
            # Entries it already handled are dead and skipped; the head was
            # fresh when it began, so what it would copy still fits.
            self._reclaim(s, tail, 0, self.clock(), second_chance=True)
        return len(victims) + chained

    def _chain(self, s: int, seg: int, end: int) -> tuple[set, int]:
        """Walk segment ``seg``'s entries from its header as a reclaim does
        (arena._walk): (the offsets of the entries on the chain, where the walk
        stopped). A whole segment's walk stops exactly at ``end``; a damaged
        entry or segment header makes it stop short (an implausible header, or
        fewer than a header's bytes left) or skip over an entry."""
        base = self._seg_base(s, seg) + L.E_VLEN
        mm = self.mm
        max_key, max_value, pad = self.max_key, self.max_value, _HDR + L.ALIGN - 1
        e = L.SEG_HEADER
        starts = set()
        add = starts.add
        while e + _HDR <= end:  # one loop turn per entry: check's cost is mostly this walk
            vlen, klen = _LENS_unpack(mm, base + e)
            alloc = (pad + klen + vlen) & ~(L.ALIGN - 1)  # layout.entry_alloc
            if klen > max_key or vlen > max_value or e + alloc > end:
                break
            add(e)
            e += alloc
        return starts, e

    @staticmethod
    def _chain_whole(is_head: bool, stop: int, end: int) -> bool:
        """Did a walk that stopped at ``stop`` cover the segment? The head's
        must reach its fill exactly (the next entry goes there); a sealed
        segment's may also stop with less than an entry header left (an end
        word raised by a few bytes hides nothing)."""
        return stop == end or (not is_head and end - stop < _HDR)

    def _live_by_segment(self, s: int) -> dict:
        """segment -> [(slot, offset in the segment, end of its entry)] of the
        stripe's slots in use (whose entries passed their checks)."""
        by_seg: dict = {}
        sl = self.slots[s]
        for i in np.nonzero(sl["tag"] != 0)[0].tolist():
            loc = int(sl["loc"][i])
            seg, e = divmod(loc * L.ALIGN, self.seg_size)
            _a, vlen, klen, _f = self._entry(s, loc)
            by_seg.setdefault(seg, []).append((i, e, e + L.entry_alloc(klen, vlen)))
        return by_seg

    def _chain_problems(self, s: int, segs: dict) -> list[str]:
        """check's walk of every segment in use (``segs``: segment -> its end):
        the reclaim of a segment whose walk stops short drops every entry after
        the break, and one whose walk skips over a live entry frees the segment
        under it, so both are damage even while every slot is sound."""
        problems = []
        sl = self.slots[s]
        used = np.nonzero(sl["tag"] != 0)[0]
        seg_of, e_of = np.divmod(sl["loc"][used].astype(np.int64) * L.ALIGN, self.seg_size)
        head = self._ring(s)[0]
        for seg, end in segs.items():
            starts, stop = self._chain(s, seg, end)
            if not self._chain_whole(seg == head, stop, end):
                problems.append(f"stripe {s} segment {seg}: its entry chain breaks at {stop}, before its end "
                                f"{end} (a damaged entry or segment header)")
            here = seg_of == seg
            off = np.isin(e_of[here], np.fromiter(starts, np.int64, len(starts)), invert=True)
            for i, e in zip(used[here][off].tolist(), e_of[here][off].tolist()):
                problems.append(f"stripe {s} slot {i}: its entry (segment {seg} at {e}) is not on its "
                                f"segment's entry chain (a damaged header before it)")
        return problems

    def _repair_chains(self, s: int) -> int:
        """Make every in-use segment's walk whole again (see _chain_problems):
        drop the slots whose entries the walk cannot reach (a reclaim would lose
        them anyway) and cut the segment's end back to where its walk stops.
        Returns how many slots were dropped. Run after the slot checks, so every
        slot left points at a whole entry in a segment in use."""
        head, tail, fill = self._ring(s)
        by_seg = self._live_by_segment(s)
        doomed = set()
        for seg in self.in_use(s):
            live = by_seg.get(seg, [])
            if seg == head:  # entries a dead writer published past the fill are whole
                end = max([fill] + [x[2] for x in live])
            else:
                end = self._seg_end(s, seg)
            starts, stop = self._chain(s, seg, end)
            if self._chain_whole(seg == head, stop, end) and all(e in starts for _i, e, _x in live):
                continue
            # keep the entries before the break that the walk reaches
            doomed.update(self._slot_key(s, i) for i, e, _x in live if e >= stop or e not in starts)
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

    def _slot_key(self, s: int, i: int) -> tuple:
        """(tag, loc) of slot i: what identifies it across backward shifts."""
        tag, loc, _exp = _SLOT_unpack(self.mm, self._slot_pos(s, i))
        return tag, loc

    def _tally(self, s: int, head: int) -> tuple[int, int, int]:
        """(items, live bytes, end of the head segment's last indexed entry)."""
        live = np.nonzero(self.slots[s]["tag"] != 0)[0]
        total = 0
        head_end = L.SEG_HEADER
        for loc in self.slots[s]["loc"][live].tolist():
            _a, vlen, klen, _f = self._entry(s, loc)
            alloc = (_HDR + klen + vlen + L.ALIGN - 1) & ~(L.ALIGN - 1)
            total += alloc
            seg, e = divmod(loc * L.ALIGN, self.seg_size)
            if seg == head:
                head_end = max(head_end, e + alloc)
        return len(live), total, head_end

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
            sl = self.slots[s]
            sps = self.sps
            tags = sl["tag"]
            live = np.nonzero(tags != 0)[0]
            for i in live.tolist():
                why = self._slot_problem(s, int(tags[i]), int(sl["loc"][i]), segs)
                if why:
                    problems.append(f"stripe {s} slot {i}: {why}")
                # reachable from its home without crossing an empty slot
                j = int(tags[i]) % sps
                while j != i:
                    if tags[j] == 0:
                        problems.append(f"stripe {s} slot {i}: unreachable from its home slot")
                        break
                    j = (j + 1) % sps
            if problems:
                return problems
            problems = self._chain_problems(s, segs)
            if problems:
                return problems
            items, live_bytes = L.ACCOUNT.unpack_from(self.mm, self.stripe_off + (s << 6) + L.S_ITEMS)
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
