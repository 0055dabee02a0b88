"""Expiry in bulk: the daemon's sweeps (Redis' active expire cycle).

An expired entry is never returned (readers check the deadline in the slot),
and reclaim drops it when its segment comes round; these sweeps give the
index slots (and the item count) back sooner, without waiting for that. The
arena bytes of a swept entry are dead from then on and cost nothing more:
reclaim skips an entry no slot points at.

Two ways, both under the stripe lock: :meth:`Expiry.sweep_expired` removes
up to ``limit`` entries one by one (backward-shift deletion), and
:meth:`Expiry.expire_bulk` rewrites the stripe's index slice in one hold,
computed beforehand from a lock-free copy (:func:`place_slots`) and written
in a crash-safe order (:func:`rewrite_order`).
"""

from __future__ import annotations

import os
import time

import numpy as np

from . import layout as L
from .repair import CLEAN as _CLEAN

#: Index slots handled as rows of plain u64 words: numpy copies, boolean
#: selections and scatters of a structured dtype run element by element
#: (~20x slower than the memcpy they are); field access goes through
#: L.SLOT_DTYPE views of the same bytes, so no offset is hard-coded here.
_W = L.SLOT_SIZE // 8


def as_slots(words: np.ndarray) -> np.ndarray:
    """A (n, _W) u64 array seen as n index slots (L.SLOT_DTYPE), no copy."""
    return words.view(L.SLOT_DTYPE).reshape(len(words))


def _first_free(homes: list) -> list:
    """Each home in turn takes the first slot at or after it not taken by an
    earlier one (union-find over unwrapped slot numbers, path-compressed)."""
    nxt: dict = {}
    out = []
    for x in homes:
        r = x
        while r in nxt:
            r = nxt[r]
        while x != r:  # path compression: every slot passed now points at r
            nxt[x], x = r, nxt[x]
        nxt[r] = r + 1
        out.append(r)
    return out


def place_slots(cur: np.ndarray, keep: np.ndarray) -> np.ndarray | None:
    """The index slice ``cur`` ((sps, _W) u64 slot rows) with only the slots
    where ``keep`` (bool, sps) is True left: what backward-shift deletion of
    every other occupied slot would leave, computed without a Python loop over
    the common case. Returns the new (sps, _W) slice, or None if ``cur`` is not
    a sound linear-probing index (no empty slot, or an entry not reachable from
    its home: the caller then keeps the per-key path, which repair backs).

    Positions are unwrapped from just after the first empty slot of ``cur``
    (the start :func:`rewrite_order` writes from), so no run of occupied slots
    wraps. Kept entries, in their current order, each take the first free slot
    at or after their home. No entry then lands after its old place nor leaves
    its run, which is what makes the row-by-row rewrite crash-safe. A plain
    running maximum over that order (entry k at max(home_k, place_{k-1} + 1))
    is the same thing except where it leaves a slot empty that a later entry of
    the run, homed at or before it, must fill (that entry would be
    unreachable); only runs where that happens, and in them only the entries
    after the first removed slot, are redone by :func:`_first_free`. Sorting by
    home instead (the rejected first version) may move an entry past its old
    place, so a write cut short could lose it. (Backward-shift deletion gives
    the same slice whatever order the entries are deleted in.)

    Work, all before the caller takes the lock: a few numpy passes over the
    occupied slots, plus ~0.4 us of Python per redone entry. For a 1 GiB
    cache's stripe (112k slots) with half its entries expired: ~3 ms at a
    quarter full, ~15-20 ms at the 0.75 load cap (where about half the kept
    entries are redone).
    """
    sps = len(cur)
    new = np.empty((sps, _W), dtype=np.uint64)
    new.fill(0)  # touch every page now: np.zeros maps them lazily, and the faults would land in the locked copy
    tag = as_slots(cur)["tag"]
    occ = tag != 0
    e = int(np.argmin(occ))  # the first empty slot
    if occ[e]:
        return None
    start = e + 1
    # Occupied slots in cyclic order from start, unwrapped (every array below
    # has one element per occupied or kept slot, not per slot).
    o = np.flatnonzero(occ)
    if len(o) == 0:
        return new
    o = np.roll(o, -int(np.searchsorted(o, start)))
    ou = o - start
    ou %= sps
    first = np.empty(len(o), dtype=bool)
    first[0] = True
    np.not_equal(ou[1:], ou[:-1] + 1, out=first[1:])  # first slot of each run
    run = np.cumsum(first) - 1
    run_start = ou[first][run]
    kept = keep[o]
    u = ou[kept]  # old places, ascending
    m = len(u)
    if m == 0:
        return new
    h = (tag[o[kept]] % sps).astype(np.int64)
    h -= start
    h %= sps
    run_kept = run[kept]
    if (h < run_start[kept]).any() or (h > u).any():
        return None
    k = np.arange(m)
    nu = k + np.maximum.accumulate(h - k)
    # nu is increasing: an empty slot lies between an entry's home and its
    # place iff its home is before the first place of its run of places.
    gap = np.empty(m, dtype=bool)
    gap[0] = True
    np.greater(nu[1:], nu[:-1] + 1, out=gap[1:])
    bad = h < nu[np.maximum.accumulate(np.where(gap, k, 0))]
    if bad.any():
        bad_run = np.zeros(int(run[-1]) + 1, dtype=bool)
        bad_run[run_kept[bad]] = True
        redo = np.flatnonzero(bad_run[run_kept])
        gone = np.append(ou[~kept], sps)
        first_gone = gone[np.searchsorted(gone, run_start[kept][redo])]  # first removed slot of the run
        # Entries before their run's first removed slot stay put, so the
        # others may not go below it.
        after = first_gone < u[redo]
        redo = redo[after]
        nu[redo] = _first_free(np.maximum(h[redo], first_gone[after]).tolist())
    if (nu > u).any():
        return None
    taken = np.zeros(sps, dtype=bool)
    taken[nu] = True
    if np.count_nonzero(taken) != m:
        return None
    nu += start
    nu %= sps
    # Rows as 32-byte scalars: take/put copy each with one memcpy, ~4x
    # faster than fancy indexing of a 2-D array.
    row = np.dtype((np.void, _W * 8))
    np.put(new.view(row).reshape(sps), nu, np.ascontiguousarray(cur).view(row).reshape(sps).take(o[kept]))
    return new


def rewrite_order(cur: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The rows to write to turn index slice ``cur`` into ``new`` (both
    (slots, _W) u64) after entries were only *removed*, in an order that is
    crash-safe when written one row after another (numpy fancy assignment
    goes index by index).

    Removing entries moves the others towards their homes, never past them
    (as :func:`place_slots` places them), and no run of occupied slots
    crosses a slot that was empty in ``cur``.
    Written in cyclic order from just after such an empty slot, each entry's
    new place comes before its old one, so a kill after any row leaves every
    live entry at its new place (written) or at its intact old place, and
    reachable either way; repair drops the duplicates. One memcpy of the
    whole slice may write the tail first and lose entries whose old place
    went before their new one.
    """
    changed = np.nonzero((cur != new).any(axis=1))[0]
    empty = np.nonzero(as_slots(cur)["tag"] == 0)[0]
    if len(changed) and len(empty):
        start = int(empty[0]) + 1
        changed = changed[np.argsort((changed - start) % len(cur), kind="stable")]
    return changed



class Expiry:
    """Bulk expiry for :class:`shmcache.table.Table` (a mixin)."""

    def _alloc_at(self, s: int, loc: int) -> int:
        _a, vlen, klen, _f = self._entry(s, loc)
        return (L.ENTRY_HEADER + klen + vlen + L.ALIGN - 1) & ~(L.ALIGN - 1)

    def sweep_expired(self, s: int, now: float, limit: int) -> int:
        """Remove up to ``limit`` expired entries of stripe s under its lock. Returns how many."""
        self.locks.lock(s)
        try:
            return self._drop_expired(s, now, limit)
        except _CLEAN:
            raise
        except BaseException:
            self._undo(s)
            raise
        finally:
            self.locks.unlock(s)

    def expire_bulk(self, s: int, now: float, timing: dict | None = None) -> int | None:
        """Remove every entry of stripe ``s`` expired at ``now`` in one lock hold.

        The new index slice is computed from a lock-free copy; under the lock the
        stripe's seqlock version must be unchanged (else None: a writer got in, use
        the per-key path), then the changed rows are written in :func:`rewrite_order`
        (at most the whole slice: ~0.5 ms for a 1 GiB cache's 3.6 MB) and the
        accounting fixed. Killed mid-write, it loses no live entry. The entries'
        arena bytes are dead from then on; reclaim skips them when their
        segment's turn comes. Returns how many were removed.
        If ``timing`` is a dict, its ``"max_lock_hold"`` (seconds) is kept up to date.

        Raises:
            LockTimeout: a live process held the stripe for too long.
        """
        stripes = self.stripes
        words = self.raw_slots[s]
        v = int(stripes[s, 0])
        if v & 1:
            return None
        cur = words.copy()
        if int(stripes[s, 0]) != v:
            return None
        rec = as_slots(cur)
        exp = rec["expire"]
        occupied = rec["tag"] != 0
        dead = occupied & (exp > 0.0) & (exp <= now)
        n = int(np.count_nonzero(dead))
        if n == 0:
            return 0
        kept = int(np.count_nonzero(occupied)) - n
        new = place_slots(cur, ~dead)
        if new is None:
            return None
        changed = rewrite_order(cur, new)
        rows = new[changed]
        try:
            freed = sum(self._alloc_at(s, loc) for loc in rec["loc"][dead].tolist())
        except ValueError:  # a damaged entry: the per-key path (and repair) handle it
            return None
        # Access bits follow their entries: a row's first word (tag | loc << 32)
        # names its entry uniquely, so each changed row finds its old bit.
        refs = self.refs[s]
        w0 = cur[:, 0]
        order = np.argsort(w0, kind="stable")
        src = order[np.searchsorted(w0[order], rows[:, 0])]
        new_refs = np.where(rows[:, 0] != 0, refs[src], 0).astype(np.uint8)
        acct_off = self.stripe_off + s * L.STRIPE_SIZE + L.S_ITEMS
        mm = self.mm
        locks = self.locks
        os.sched_yield()  # a fresh time slice: preemption inside the hold is what stretches it
        locks.lock(s)
        t0 = time.perf_counter()
        try:
            if int(stripes[s, 0]) != v + 1:  # lock() made it odd; anything else is a writer's change
                return None
            words[changed] = rows
            refs[changed] = new_refs
            _items, live = L.ACCOUNT.unpack_from(mm, acct_off)
            L.ACCOUNT.pack_into(mm, acct_off, kept, max(0, live - freed))
        except BaseException:
            self._undo(s)
            raise
        finally:
            held = time.perf_counter() - t0
            locks.unlock(s)
            if timing is not None:
                timing["max_lock_hold"] = max(timing.get("max_lock_hold", 0.0), held)
        self.ctr[self.cbase + L.C_EXPIRATIONS] += n
        return n

