"""The arena of one stripe: a ring of fixed-size segments, reclaimed oldest first.

Each stripe's arena is cut into ``n_segs`` segments of ``seg_size`` bytes
(64 KiB by default, see layout.py). Entries ``[header | key | value]`` are
appended at the *head* segment and never move in place; an overwrite appends
a new entry and repoints the index slot, leaving the old bytes dead. Segments
``tail .. head`` (mod n_segs) are in use, oldest first; the rest are free
(none only while the tail's reclaim is pending, see below).

When the head is full the next free segment is opened (its header zeroed),
the ring word moves onto it, and the old head is sealed (its end written into
its header). The head segment's header also mirrors the ring word's fill,
stored after it on every change: a write takes the larger of the two, and a
head whose header says sealed is damage (refused, the stripe repaired), so
one damaged word can never make a write land on a published entry. If that
used the last free segment, the *tail* (oldest) segment's reclaim is
*pending*: the inserts that follow each walk the next ``RECLAIM_STEP`` (16)
of its entries, from the cursor stored in its header, copying into the new
head:

- an entry whose index slot no longer points at it is already dead: skipped;
- an expired one: its slot is dropped;
- a live one the policy keeps (``lru``: its access bit is set, a second
  chance, or the stripe is *roomy*; ``noeviction``: always) is copied to the
  head and its slot repointed, bit cleared;
- the rest are evicted (slot dropped).

When the walk reaches the segment's end the tail moves on and the segment is
free again. *Roomy* (decided at each step, before it walks): the stripe is
below its item cap and its live
bytes are at most 3/4 of the ``n_segs - 1`` segments in use, i.e. at least a
quarter of what the ring holds is dead. Then the reclaim is a compaction:
every live entry is kept (as far as the head has room), so a cache whose
keys are overwritten, deleted or expired faster than it fills never evicts a
live key, as the old compacting arena did not; a cache full of live data
evicts exactly as second chance says. Copy-forward keeps room in the head for
the entry being written. No sort, no whole-stripe compaction, no numpy.

Why in steps: one segment's reclaim (~190 entries of 300 bytes in 64 KiB)
held the stripe 40-150 us, so 1 set in ~130 of a full cache took that long
and the set p99.9 sat near 60 us. A step is 16 entries (~3 us); a segment's
reclaim finishes ~12 inserts after it became pending, long before the head
(a fresh segment) fills. If the head does fill first (a tail that is nearly
all live and read, or a writer that died mid-way), the advance that needs a
free segment finishes the reclaim at once, into the full head: the rest of
the tail is evicted, as a whole-segment reclaim into a full head would. So
the most one insert can trigger is still one segment (one walk of at most
``seg_size`` bytes, one index probe per entry, at most ``seg_size`` bytes
copied), but in steady state it is one step. Rejected: 32 KiB segments
(p99.9 ~30 us, but half the largest value) and reclaiming in a background
thread or the daemon (a writer would still wait for it when the ring is
full, and a dead daemon would stop every write).

The item cap (``max_items``) goes through the same mechanism: within
RECLAIM_STEP items of its cap, a stripe's tail reclaim is pending too (steps
evict cold entries ahead of the cap); an insert into a stripe at its cap
reclaims the rest of the tail segment at once (after sealing the head if the
head is the only segment in use); if every entry of that segment earned a
second chance, the next segment is reclaimed without one. ``noeviction``
never evicts, so its reclaims stay whole (at the advance that takes the last
free segment, after checking the live entries fit); it drops only expired
entries at the item cap and raises ``CacheFull`` otherwise.

Crash safety (a writer SIGKILLed at any instant loses at most the entry it
was writing): an entry is written completely before the slot that publishes
it, and the head's fill is advanced after that (one u64 store of the ring
word: head, tail and fill change together). Killed before the slot store,
the bytes are unreachable and the next write reuses them; killed after it,
the entry is whole and repair moves the fill past it. A copy-forward writes
the copy, then repoints the slot, then advances the fill: the entry is whole
at its old or its new place throughout. A step stores the cursor after its
entries are handled, and the tail moves on only after the walk is complete,
so a reclaim killed midway is resumed by the next step (entries already
handled are dead by then and skipped; repair restarts the walk at the first
entry). The cursor is untrusted like every other field: one off an entry
boundary makes the walk meet an implausible header, and then every slot
pointing into the segment is dropped by an index sweep; one on a later
boundary skips live entries, whose slots then lead to bytes of another key
once the segment is reused (readers compare the key, so they miss, and
``check`` reports the slot) — the same as a damaged slot location. Readers never lock: the
stripe's seqlock version is odd for the whole reclaim, and a reader compares
the key bytes of the entry it lands on, so it never returns bytes of a reused
segment or of another key.

Rejected: a per-segment generation stored in each slot (checked by readers
against the segment's). The seqlock already makes every lock-free read of a
reclaimed segment retry, and the index never points into a free segment
(reclaim drops or repoints every slot into the segment it frees, and repair
drops any slot outside the in-use segments), so the generation would cost
slot bytes (the memory target is 150 shared bytes per 100-byte entry) for a
check that cannot fail.
"""

from __future__ import annotations

import xxhash

from . import layout as L
from .errors import CacheFull, LayoutMismatch

_xxh3 = xxhash.xxh3_64_intdigest
_ENTRY_unpack = L.ENTRY.unpack_from
_SLOT_unpack = L.SLOT.unpack_from
_HDR = L.ENTRY_HEADER
_SS = L.SLOT_SIZE
_SEG_HDR = L.SEG_HEADER


class Arena:
    """Segment-ring allocation and reclaim for :class:`shmcache.table.Table`
    (a mixin: it works on the table's mapping, index and stripe records; every
    method runs under the stripe's lock)."""

    # ----------------------------------------------------------- ring word
    def _ring(self, s: int) -> tuple[int, int, int]:
        """(head, tail, fill) of stripe s, the fill being the larger of the ring
        word's and the head segment's mirror of it (see layout.SEG).

        Raises:
            ValueError: the ring word is out of range, or names a sealed
                segment as the head (both only by damage).
        """
        head, tail, fill = L.unpack_ring(int(self.stripes[s, L.S_RING // 8]))
        if head >= self.n_segs or tail >= self.n_segs or fill > self.seg_size or fill % L.ALIGN:
            raise ValueError(f"stripe {s}: ring word out of range (head {head}, tail {tail}, fill {fill})")
        end, mirror, _done = L.SEG.unpack_from(self.mm, self._seg_base(s, head))
        if end:
            raise ValueError(f"stripe {s}: the ring word's head segment {head} is sealed (at {end})")
        if fill < mirror <= self.seg_size and not mirror % L.ALIGN:
            fill = mirror
        return head, tail, fill

    def _set_ring(self, s: int, head: int, tail: int, fill: int) -> None:
        """Store the ring word, then the head segment's mirror of its fill."""
        self.stripes[s, L.S_RING // 8] = L.pack_ring(head, tail, fill)
        L.U32.pack_into(self.mm, self._seg_base(s, head) + 4, fill)

    def _add(self, s: int, field: int, delta: int) -> None:
        self.stripes[s, field // 8] = (int(self.stripes[s, field // 8]) + delta) & 0xFFFFFFFFFFFFFFFF  # a damaged counter wraps

    def in_use(self, s: int) -> list[int]:
        """The stripe's segments in use, oldest (tail) first, head last."""
        head, tail, _fill = self._ring(s)
        n = self.n_segs
        return [(tail + k) % n for k in range((head - tail) % n + 1)]

    # ----------------------------------------------------------- allocation
    def _alloc(self, s: int, need: int, new_item: bool, now: float) -> tuple[int, bool]:
        """Room for an entry of ``need`` bytes (and one more item if
        ``new_item``) at the head: returns (offset in the stripe arena, whether
        entries moved or went, so slot positions found earlier are stale).

        Work: at most one seal + one segment reclaim for bytes, plus at most
        two seals and two segment reclaims for the item cap (the first with a
        second chance, also when the head had to be sealed first).

        Raises:
            CacheFull: the policy may not evict and the room needs eviction
                (nothing was changed).
        """
        moved = False
        reclaimed = False  # only this call's first item-cap reclaim gives a second chance
        stepped = False  # at most one incremental reclaim step per insert
        for _attempt in range(7):
            try:
                head, tail, fill = self._ring(s)
            except ValueError as e:  # a damaged ring word: repair (emptying if need be), then refuse this write
                dropped = self._repair_or_empty(s, full=True)
                raise LayoutMismatch(f"{e} (damaged); the stripe was repaired "
                                     f"({'emptied' if dropped < 0 else f'{dropped} bad slots dropped'}): retry the write") from None
            if new_item and int(self.stripes[s, L.S_ITEMS // 8]) >= self.cap_items:
                moved = True
                if not self.policy.evicts:
                    self._drop_expired(s, now)
                    if int(self.stripes[s, L.S_ITEMS // 8]) >= self.cap_items:
                        raise self._full(s, need, "items")
                elif head == tail:
                    self._advance(s, need, now)
                else:
                    self._reclaim(s, tail, need, now, second_chance=not reclaimed)
                    reclaimed = True
                continue
            if fill + need <= self.seg_size:
                if stepped or not self._pending(s, head, tail):
                    return head * self.seg_size + fill, moved
                # One step of the tail's pending reclaim (its copies leave the
                # head room for this entry), then take the room.
                self._reclaim(s, tail, need, now, second_chance=True, budget=L.RECLAIM_STEP)
                stepped = moved = True
                continue
            self._advance(s, need, now)
            moved = True
        raise self._full(s, need, "bytes")  # pragma: no cover - one advance always makes room

    def _advance(self, s: int, need: int, now: float) -> None:
        """Seal the head and make the next free segment the head; if that was
        the last free one, the tail's reclaim is pending (in steps, see
        _alloc), or under noeviction done at once (keeping ``need`` bytes)."""
        head, tail, fill = self._ring(s)
        n = self.n_segs
        nxt = (head + 1) % n
        if nxt == tail:
            # No free segment: the tail's pending reclaim did not finish before
            # the head filled (or its writer died). Making the tail the head
            # would overwrite its live entries: finish that reclaim first, into
            # the full head, so whatever is still live in it goes.
            if not self.policy.evicts:
                raise self._full(s, need, "bytes")
            self._reclaim(s, tail, 0, now, second_chance=True)
            head, tail, fill = self._ring(s)
        last = (nxt + 1) % n == tail
        if last and not self.policy.evicts:
            live = self._live_bytes(s, tail, now)
            if live + need > self.seg_size - _SEG_HDR:
                raise self._full(s, need, "bytes")
        # Open the next segment, move the ring onto it, then seal the old head:
        # killed at any point, the head is an open segment and the old head's
        # end is its sealed end or (unsealed) its mirrored fill.
        L.SEG.pack_into(self.mm, self._seg_base(s, nxt), 0, _SEG_HDR, 0)
        self._set_ring(s, nxt, tail, _SEG_HDR)
        L.U32.pack_into(self.mm, self._seg_base(s, head), fill)
        if last and not self.policy.evicts:
            self._reclaim(s, tail, need, now, second_chance=True)
        # (evicting: the tail's reclaim is now pending; each insert that follows
        # advances it by one step, see _alloc)

    def _seg_base(self, s: int, seg: int) -> int:
        return self.arena_off + s * self.stripe_arena + seg * self.seg_size

    def _seg_end(self, s: int, seg: int) -> int:
        """End of a segment's entries: the larger of its sealed end and its
        mirrored fill, clamped into it (the segment is untrusted)."""
        end, mirror, _done = L.SEG.unpack_from(self.mm, self._seg_base(s, seg))
        return min(max(end, mirror, _SEG_HDR), self.seg_size)

    def _pending(self, s: int, head: int, tail: int) -> bool:
        """Does the tail have a reclaim to advance by one step? Yes when no
        segment is free (the advance that took the last one left the tail's
        reclaim to the inserts that follow) or the stripe is within
        RECLAIM_STEP items of its cap; never under a policy that may not
        evict (its reclaims stay whole, see _advance)."""
        if head == tail or not self.policy.evicts:
            return False
        if (head + 1) % self.n_segs == tail:
            return True
        return int(self.stripes[s, L.S_ITEMS // 8]) >= self.cap_steps

    def _cursor(self, s: int, seg: int) -> int:
        """Where the reclaim of ``seg`` goes on: its stored cursor if plausible
        (aligned, inside the segment's entries), else its first entry. A
        damaged cursor off an entry boundary makes the walk meet a torn header
        (then the index sweep drops what points in); see the module docstring."""
        done = L.U32.unpack_from(self.mm, self._seg_base(s, seg) + 8)[0]
        if _SEG_HDR <= done <= self._seg_end(s, seg) and not done % L.ALIGN:
            return done
        return _SEG_HDR

    def _walk(self, s: int, seg: int, torn: list, start: int = _SEG_HDR):
        """Yield (offset in segment, alloc, klen, vlen) of each entry of a sealed
        segment from offset ``start``; stops at the first implausible header
        (then ``torn[0]`` is True and the caller sweeps the index instead).
        ``torn`` is the caller's own flag: threads sharing a Table reclaim
        different stripes at once."""
        base = self._seg_base(s, seg)
        end = self._seg_end(s, seg)
        mm = self.mm
        e = start
        torn[0] = False
        while e + _HDR <= end:
            _chk, vlen, klen, _flags, _p = _ENTRY_unpack(mm, base + e)
            alloc = (_HDR + klen + vlen + L.ALIGN - 1) & ~(L.ALIGN - 1)
            if klen > self.max_key or vlen > self.max_value or e + alloc > end:
                torn[0] = True
                return
            yield e, alloc, klen, vlen
            e += alloc

    def _entry_slot(self, s: int, seg: int, e: int, klen: int) -> int:
        """Index slot (within stripe s) pointing at the entry at offset ``e`` of
        segment ``seg``, or -1 if none does (the entry is dead)."""
        a = self._seg_base(s, seg) + e
        kb = self.mm[a + _HDR : a + _HDR + klen]
        return self._locate(s, (_xxh3(kb) >> 32) | 1, (seg * self.seg_size + e) // L.ALIGN)

    def _live_bytes(self, s: int, seg: int, now: float) -> int:
        """Bytes of the live, unexpired entries of a sealed segment (what
        reclaiming it under noeviction would copy forward)."""
        total = 0
        torn = [False]
        for e, alloc, klen, _vlen in self._walk(s, seg, torn):
            i = self._entry_slot(s, seg, e, klen)
            if i >= 0:
                exp = L.F64.unpack_from(self.mm, self._slot_pos(s, i) + L.SL_EXPIRE)[0]
                if not (exp and exp <= now):
                    total += alloc
        if torn[0]:  # cannot tell what a damaged segment holds: count it all
            return self.seg_size
        return total

    def _reclaim(self, s: int, seg: int, keep_room: int, now: float, second_chance: bool,
                 budget: int = 0) -> bool:
        """Empty the tail segment ``seg`` from its cursor on (see the module
        docstring) and free it; with a ``budget``, handle at most that many
        entries, store the cursor and return False if entries remain. Copies
        forward only while the head keeps ``keep_room`` bytes free. True once
        the segment is free (the tail moved on)."""
        mm = self.mm
        refs = self.refs_off + s * self.sps
        base = self._seg_base(s, seg)
        policy = self.policy
        evicted = expired = 0
        roomy = second_chance and self._roomy(s)
        torn = [False]
        left = budget
        nxt = -1  # the cursor to store if the budget runs out
        for e, alloc, klen, _vlen in self._walk(s, seg, torn, self._cursor(s, seg)):
            if budget:
                if not left:
                    nxt = e
                    break
                left -= 1
            i = self._entry_slot(s, seg, e, klen)
            if i < 0:
                continue
            p = self._slot_pos(s, i)
            exp = L.F64.unpack_from(mm, p + L.SL_EXPIRE)[0]
            if exp and exp <= now:
                self._drop(s, i, alloc)
                expired += 1
                continue
            head, tail, fill = self._ring(s)
            keep = policy.keep(bool(mm[refs + i]), roomy) if second_chance else not policy.evicts
            if keep and fill + alloc + keep_room <= self.seg_size:
                dst = self._seg_base(s, head) + fill
                mm[dst : dst + alloc] = mm[base + e : base + e + alloc]
                L.U32.pack_into(mm, p + L.SL_LOC, (head * self.seg_size + fill) // L.ALIGN)  # repoint
                mm[refs + i] = 0
                self._set_ring(s, head, tail, fill + alloc)
            else:
                self._drop(s, i, alloc)
                evicted += 1
        if torn[0]:
            evicted += self._drop_into(s, seg)
        if evicted:
            self.ctr[self.cbase + L.C_EVICTIONS] += evicted
            self._add(s, L.S_EVICTIONS, evicted)
        if expired:
            self.ctr[self.cbase + L.C_EXPIRATIONS] += expired
        if nxt >= 0:
            L.U32.pack_into(mm, base + 8, nxt)
            return False
        head, tail, fill = self._ring(s)
        if tail == seg:
            # The next tail's reclaim has not started: zero its cursor (a
            # damaged one would skip live entries), then move the tail on.
            nt = (seg + 1) % self.n_segs
            L.U32.pack_into(mm, self._seg_base(s, nt) + 8, 0)
            self._set_ring(s, head, nt, fill)
        return True

    def _roomy(self, s: int) -> bool:
        """Is at least a quarter of the in-use ring dead, with the stripe below
        its item cap? (see the module docstring; the C core decides the same)"""
        st = self.stripes
        if int(st[s, L.S_ITEMS // 8]) >= self.cap_items:
            return False
        return 4 * int(st[s, L.S_LIVE // 8]) <= 3 * (self.n_segs - 1) * self.seg_size

    def _drop_into(self, s: int, seg: int) -> int:
        """Drop every slot pointing into segment ``seg`` (a torn segment whose
        walk stopped early). Scans the stripe's index once. Returns how many."""
        lo = seg * self.seg_size // L.ALIGN
        hi = (seg + 1) * self.seg_size // L.ALIGN
        n = 0
        i = 0
        while i < self.sps:  # a drop shifts later slots back into i: look again
            tag, loc, _exp = _SLOT_unpack(self.mm, self._slot_pos(s, i))
            if tag and lo <= loc < hi:
                self._drop(s, i)
                n += 1
                continue
            i += 1
        return n

    def _full(self, s: int, need: int, what: str) -> CacheFull:
        items = int(self.stripes[s, L.S_ITEMS // 8])
        live = int(self.stripes[s, L.S_LIVE // 8])
        return CacheFull(
            f"cache {self.seg.name!r} is full (stripe {s}: {items} of {self.cap_items} items, "
            f"{live} of {self.stripe_arena} arena bytes live; entry needs {need} bytes, out of {what}): "
            f"raise size or max_items, or create it with policy='lru'"
        )
