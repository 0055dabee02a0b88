"""Corruption fuzzer: the segment is untrusted input.

Each trial builds a live cache (every third one with ``policy="noeviction"``,
whose reclaim differs), corrupts one field (a header field, a stripe
record field, an index slot field or access bit, a whole stripe's index
slice filled so it has no empty slot, a field or key/value byte of an entry in the arena, a
u32 of a segment header, or a field of a client record, live or left by a
dead process), then a separate worker process
(tests/corruption_worker.py) attaches, runs ``check()``, reads every key,
writes (every fourth trial also enough new keys to reclaim every segment, so
reclaim walks the damage), deletes, runs ``check()`` again, starts a daemon
for one sweep, recovery pass and snapshot (every fourth trial), then runs
``check(fix=True)`` and a last ``check()``.

Asserted for every trial: the worker neither dies of a signal (SIGSEGV,
SIGBUS) nor stops answering (a timeout), no read returns a value that is not
one a writer stored for that key (values check themselves, tests/values.py),
only shmcache errors are raised, and what ``check`` says follows this
classification (``_corrupt`` gives each trial's class):

detect -- the damage is a structural problem check must report before any
  operation ran (nothing has repaired it yet; a header attach refuses counts
  as reported too):
  - an odd seqlock version; an item count or live-bytes count that is not
    what the index holds;
  - a slot's tag (the key's hash no longer matches, or a slot went missing
    and the count disagrees); a slot's location moved anywhere but onto a
    whole older version of the same key of the same size; a slice with no
    empty slot;
  - any changed byte of a live entry (the checksum covers the header after
    itself, the key and the value; the key hash and lengths are checked too);
  - a dead entry, a segment header word (end, fill mirror) or the ring word
    changed so that the stripe's arena breaks: the ring is out of range or
    names a sealed head, an indexed entry lies outside the segments in use,
    or a segment's walk from its header to its end (what a reclaim does)
    stops short (at a header it cannot follow, the head's before its fill) or passes over an indexed entry (``_arena_damaged``, the
    test's own model of layout.SEG and layout.STRIPE).
clean -- undetectable by design, so check must say nothing: the value is one
  a sound cache could hold or is never read:
  - the lock word (a value naming a dead or no client slot reads as a dead
    holder: the next writer takes the stripe over and repairs it), the evictions,
    recoveries and lock-wait counters, an even seqlock version;
  - a client record's fields (check reads none; a dead one's counters are
    folded into the header's totals, which wrap like every u64 counter);
  - a slot's deadline (any number is a deadline); an empty slot's location;
    an access bit (a second-chance hint: any byte only changes what a reclaim
    keeps);
    a slot moved onto an older whole version of the same key (a stale value
    of that key, which values.py accepts);
  - a dead entry's bytes, segment header words and ring changes that leave
    every walk whole and every indexed entry on it (e.g. a lowered mirror:
    the larger end word wins); a free segment's header (rewritten when it is
    opened); the header page's dynamic part (generation, daemon fields,
    retired clients' counter totals, the snapshot path: check reads none of them).
not asserted -- a static header field attach accepts (a setting the rest of
  the header is consistent with, e.g. mode or created) and segment header
  words after the first two (layout.SEG grows a field in issue 8; this test
  fuzzes every u32 of SEG_HEADER but does not know what a new one means).

Always, after the operations: check names only stripes it named before them
(operations on a damaged cache repair damage or leave it, never spread it)
and none that the operations repaired (a lock recovery, or a write that met
damage and repaired the stripe: what they repaired leaves check clean), and
after ``check(fix=True)`` check reports nothing (repair leaves every stripe
sound). ``SHMCACHE_FUZZ_TRIALS`` / ``SHMCACHE_FUZZ_SEED`` run it
longer or replay a seed.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import struct
import subprocess
import sys
import time

import pytest
import xxhash

from shmcache import Cache, admin
from shmcache import layout as L
from values import make_value

HERE = os.path.dirname(os.path.abspath(__file__))
N_KEYS = 300
TRIAL_TIMEOUT = 30.0
#: New keys every fourth trial writes (~5000 x ~230 bytes: the 1 MiB cache
#: twice over), so every segment is reclaimed: reclaim walks the damage.
CHURN = 5000


def _fields(*names):
    """(offset, width) of index slot fields, from layout.SLOT_DTYPE."""
    return [(L.SLOT_DTYPE.fields[f][1], L.SLOT_DTYPE.fields[f][0].itemsize) for f in names]


# The index's structure: which key a slot holds, where a probe goes, when it expires.
STRUCTURE_FIELDS = _fields("tag", "expire")
# Stripe record words: seqlock version, lock word, item count, eviction and
# recovery counters. The arena allocator's words (live bytes, the ring word)
# are fuzzed apart (a ring whose fill is lowered makes the next write overwrite
# live entries in the head segment; readers then miss them, as they compare
# the key bytes the slot leads to).
STRIPE_WORDS = [L.S_VERSION, L.S_LOCK, L.S_LOCK + 8, L.S_ITEMS, L.S_EVICTIONS, L.S_RECOVERIES,
                L.S_LOCK_WAITS, L.S_LOCK_WAIT_NS, L.S_LOCK_WAIT_MAX_NS]
#: Stripe words any value of which a sound cache could hold: counters, and the
#: lock word (damage there names a dead or no client slot, so the next writer
#: takes the stripe over and repairs it; naming a live client exactly would
#: take a 64-bit slot-and-generation match).
STRIPE_HARMLESS = {L.S_LOCK, L.S_LOCK + 8, L.S_EVICTIONS, L.S_RECOVERIES,
                   L.S_LOCK_WAITS, L.S_LOCK_WAIT_NS, L.S_LOCK_WAIT_MAX_NS}
ALLOCATOR_WORDS = [L.S_LIVE, L.S_RING]
# Where the entry is: readers follow it only within the stripe's arena and
# only to an entry header whose key length and bytes match.
PAYLOAD_FIELDS = _fields("loc")


def _values(rnd: random.Random, width: int, old: int) -> int:
    top = (1 << (8 * width)) - 1
    return rnd.choice([
        0, top, old ^ (1 << rnd.randrange(8 * width)), rnd.getrandbits(8 * width),
        (old + 1) & top, (old - 1) & top, top >> 1, rnd.randrange(1, 4096) & top,
    ])


_FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def _poke(mm, off: int, width: int, rnd: random.Random) -> tuple[str, int, int]:
    """Store a damaging value at ``off``: (what was done, old, new)."""
    fmt = _FMT[width]
    old = struct.unpack_from(fmt, mm, off)[0]
    new = _values(rnd, width, old)
    struct.pack_into(fmt, mm, off, new)
    return f"@{off} u{8 * width} {old:#x} -> {new:#x}", old, new


def _struct_fields(st: struct.Struct) -> list[tuple[int, int]]:
    """(offset, width) of every field of a little-endian struct, padding fields included."""
    out, off = [], 0
    for ch in st.format.lstrip("<"):
        w = struct.calcsize("<" + ch)
        out.append((off, w))
        off += w
    return out


ENTRY_FIELDS = _struct_fields(L.ENTRY)  # checksum, vlen, klen, flags, pad
SEG_WORDS = range(0, L.SEG_HEADER, 4)  # every u32 of a segment header (a field added later is covered too)


def _live_locs(c: Cache, s: int) -> list[int]:
    sl = c._table.slots[s]
    return [int(x) for x in sl["loc"][sl["tag"] != 0]]


def _walk(mm, base: int, end: int, g) -> tuple[set, int]:
    """The test's own model of a reclaim's walk of one segment: (entry offsets, where it stops)."""
    e, starts = L.SEG_HEADER, set()
    while e + L.ENTRY_HEADER <= end:
        _chk, vlen, klen, _f, _p = L.ENTRY.unpack_from(mm, base + e)
        a = L.entry_alloc(klen, vlen)
        if klen > g.max_key_size or vlen > g.max_value_size or e + a > end:
            break
        starts.add(e)
        e += a
    return starts, e


def _arena_damaged(c: Cache, s: int, locs: list[int]) -> bool:
    """Would a reclaim or write of stripe s go wrong, given its index points
    at ``locs``? The ring word is out of range or names a sealed head; an
    entry lies outside the segments in use; or some segment's walk (from its
    header to its end: the head's fill as a write reads it, a sealed
    segment's larger end word) stops short or passes over an indexed entry.
    Written from layout.SEG / layout.STRIPE, apart from repair.py's code."""
    mm, g, ss = c._seg.mm, c._seg.geometry, c._seg.geometry.seg_size
    n = g.stripe_arena // ss
    base = g.arena_off + s * g.stripe_arena
    word = struct.unpack_from("<Q", mm, g.stripe_table_off + s * L.STRIPE_SIZE + L.S_RING)[0]
    head, tail, fill = L.unpack_ring(word)
    if head >= n or tail >= n or fill > ss or fill % L.ALIGN:
        return True
    end, mirror = struct.unpack_from("<II", mm, base + head * ss)
    if end:
        return True
    if fill < mirror <= ss and not mirror % L.ALIGN:
        fill = mirror
    in_use = [(tail + k) % n for k in range((head - tail) % n + 1)]
    at = [divmod(loc * L.ALIGN, ss) for loc in locs]
    if any(seg not in in_use for seg, _e in at):
        return True
    for seg in in_use:
        if seg == head:
            stop_at = fill
        else:
            end, mirror = struct.unpack_from("<II", mm, base + seg * ss)
            stop_at = min(max(end, mirror, L.SEG_HEADER), ss)
        starts, stop = _walk(mm, base + seg * ss, stop_at, g)
        # the head's walk must end at its fill (the next entry goes there); a
        # sealed one's may leave fewer bytes than an entry header
        if (stop != stop_at if seg == head else stop_at - stop >= L.ENTRY_HEADER) or any(sg == seg and e not in starts for sg, e in at):
            return True
    return False


def _same_entry(mm, a: int, b: int) -> bool:
    """Are the entries at a and b whole versions of the same key, of one size?"""
    ca, va, ka, _f, _p = L.ENTRY.unpack_from(mm, a)
    cb, vb, kb, _f, _p = L.ENTRY.unpack_from(mm, b)
    whole = L.entry_checksum(mm[b + 4 : b + L.ENTRY_HEADER + kb + vb]) == cb
    return (whole and ka == kb and L.entry_alloc(ka, va) == L.entry_alloc(kb, vb)
            and mm[a + L.ENTRY_HEADER : a + L.ENTRY_HEADER + ka] == mm[b + L.ENTRY_HEADER : b + L.ENTRY_HEADER + kb])


# What check must say about a corruption (module docstring): "detect" = a
# problem before anything repaired it, "clean" = no problem, None = not asserted.
DETECT, CLEAN, ANY = "detect", "clean", None


def _corrupt(c: Cache, rnd: random.Random, kinds, slot_fields,
             stripe_words=STRIPE_WORDS) -> tuple[str, str | None]:
    """Damage one field of c's segment: (what was done, what check must say)."""
    mm = c._seg.mm
    g = c._seg.geometry
    kind = rnd.choice(kinds)
    if kind == "header":
        # the static header's fields (after the magic), then the dynamic part of the page
        if rnd.random() < 0.7:
            off = rnd.randrange(8, L.HEADER.size - 4, 4)
            what, _o, _n = _poke(mm, off, rnd.choice([4, 8]) if off % 8 == 0 else 4, rnd)
            return "header " + what, ANY
        # generation, daemon and snapshot fields, the retired clients' counter
        # totals, the start of the snapshot path text
        off = rnd.randrange(L.HEADER.size + 8 - L.HEADER.size % 8, L.H_SNAPSHOT_PATH + 64, 8)
        what, _o, _n = _poke(mm, off, 8, rnd)
        return "header-dyn " + what, CLEAN
    if kind == "client":
        # A client record: the filling process's own (alive, detaching after
        # the trial) or one a killed process left (its byte unlocked: reapers
        # fold its counters into the header, recoverers read its generation).
        rs = g.client_record_size
        slot = c._state.client.slot
        if rnd.random() < 0.5:
            slot = next(i for i in range(g.max_clients) if i != slot
                        and not struct.unpack_from("<I", mm, g.client_table_off + i * rs)[0])
            L.CLIENT_HEAD.pack_into(mm, g.client_table_off + slot * rs, rnd.randrange(2, 2**22),
                                    rnd.randrange(1, 2**32), 12345.0)
        base = g.client_table_off + slot * rs
        fields = [(L.C_PID, 4), (L.C_GEN, 4), (L.C_START, 8)] + \
            [(L.C_COUNTERS + 8 * k, 8) for k in range(L.N_COUNTERS)]
        foff, width = rnd.choice(fields)
        what, _o, _n = _poke(mm, base + foff, width, rnd)
        alive = "live" if slot == c._state.client.slot else "dead"
        return f"client {slot} ({alive}) +{foff} " + what, CLEAN  # check reads no client record
    s = rnd.randrange(g.n_stripes)
    base = g.arena_off + s * g.stripe_arena
    locs = _live_locs(c, s)
    if kind == "stripe":
        word = rnd.choice(stripe_words)
        what, old, new = _poke(mm, g.stripe_table_off + s * L.STRIPE_SIZE + word, 8, rnd)
        what = f"stripe {s} " + what
        if old == new or word in STRIPE_HARMLESS:
            return what, CLEAN
        if word == L.S_VERSION:
            return what, DETECT if new & 1 else CLEAN
        if word == L.S_RING:
            return what, DETECT if _arena_damaged(c, s, locs) else CLEAN
        return what, DETECT  # items, live bytes: the tally disagrees
    if kind == "slot":
        sbase = g.index_off + s * g.slots_per_stripe * L.SLOT_SIZE
        tags = [i for i in range(g.slots_per_stripe)
                if struct.unpack_from("<I", mm, sbase + i * L.SLOT_SIZE)[0]]
        i = rnd.choice(tags) if tags and rnd.random() < 0.9 else rnd.randrange(g.slots_per_stripe)
        p = sbase + i * L.SLOT_SIZE
        tag, loc, _exp = L.SLOT.unpack_from(mm, p)
        foff, width = rnd.choice(slot_fields)
        what, old, new = _poke(mm, p + foff, width, rnd)
        what = f"slot {s}/{i} " + what
        if old == new or foff == L.SL_EXPIRE:
            return what, CLEAN  # any deadline is plausible
        if foff == L.SL_LOC and tag:
            new_locs = _live_locs(c, s)
            moved = (new * L.ALIGN + L.ENTRY_HEADER <= g.stripe_arena
                     and _same_entry(mm, base + loc * L.ALIGN, base + new * L.ALIGN))
            return what, CLEAN if moved and not _arena_damaged(c, s, new_locs) else DETECT
        if foff == L.SL_LOC:
            return what, CLEAN  # an empty slot's location is never read
        return what, DETECT  # a tag: the key's hash or the item count disagrees
    if kind == "ref":  # an access bit: a second-chance hint, any byte is harmless
        what, _o, _n = _poke(mm, g.refs_off + s * g.slots_per_stripe + rnd.randrange(g.slots_per_stripe), 1, rnd)
        return f"ref {s} " + what, CLEAN
    if kind == "entry":
        ss = g.seg_size
        e_live = {divmod(loc * L.ALIGN, ss) for loc in locs}
        head, tail, _fill = c._table._ring(s)
        n = c._table.n_segs
        in_use = [(tail + k) % n for k in range((head - tail) % n + 1)]
        entries = []
        for seg in in_use:
            starts, _stop = _walk(mm, base + seg * ss, c._table._segment_ends(s, False)[seg], g)
            entries += [(seg, e) for e in starts]
        live = [x for x in entries if x in e_live]
        dead = [x for x in entries if x not in e_live]
        seg, e = rnd.choice(live if live and (not dead or rnd.random() < 0.6) else dead)
        a = base + seg * ss + e
        if rnd.random() < 0.8:
            foff, width = rnd.choice(ENTRY_FIELDS)
        else:  # a key or value byte (the checksum covers them)
            _c, vlen, klen, _f, _p = L.ENTRY.unpack_from(mm, a)
            foff, width = rnd.randrange(L.ENTRY_HEADER, L.ENTRY_HEADER + klen + vlen), 1
        what, old, new = _poke(mm, a + foff, width, rnd)
        what = f"entry {s}/{seg}@{e} {'live' if (seg, e) in e_live else 'dead'} +{foff} " + what
        if old == new:
            return what, CLEAN
        if (seg, e) in e_live:
            return what, DETECT  # the checksum, key hash or lengths disagree
        return what, DETECT if _arena_damaged(c, s, locs) else CLEAN
    if kind == "seg":
        n = c._table.n_segs
        head, tail, _fill = c._table._ring(s)
        in_use = [(tail + k) % n for k in range((head - tail) % n + 1)]
        free = [x for x in range(n) if x not in in_use]
        seg = rnd.choice(free if free and rnd.random() < 0.15 else in_use)
        word = rnd.choice(SEG_WORDS)
        what, old, new = _poke(mm, base + seg * g.seg_size + word, 4, rnd)
        what = f"seg {s}/{seg} {'in use' if seg in in_use else 'free'} +{word} " + what
        if old == new or seg not in in_use:
            return what, CLEAN  # a free segment's header is rewritten when it is opened
        if word >= 8:
            return what, ANY  # a field this test does not know the meaning of
        return what, DETECT if _arena_damaged(c, s, locs) else CLEAN
    # full-slice: every slot of one stripe's index slice in use (row 4: no empty slot)
    sbase = g.index_off + s * g.slots_per_stripe * L.SLOT_SIZE
    for i in range(g.slots_per_stripe):
        p = sbase + i * L.SLOT_SIZE
        if not struct.unpack_from("<I", mm, p)[0]:
            struct.pack_into("<I", mm, p, rnd.getrandbits(32) | 1)
    return f"full-slice {s}", DETECT


class Worker:
    def __init__(self, name: str, pure: bool):
        env = dict(os.environ)
        if pure:
            env["SHMCACHE_PURE_PYTHON"] = "1"
        env.pop("SHMCACHE_REQUIRE_SPEEDUPS", None) if pure else None
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "corruption_worker.py"), name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )

    def run(self, trial: int, with_daemon: bool, churn: int = 0) -> dict | str:
        """The worker's JSON answer, or why there was none ("signal 11", "timeout")."""
        self.proc.stdin.write(f"{trial} {N_KEYS} {int(with_daemon)} {churn}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TRIAL_TIMEOUT)
        if not ready:
            self.proc.kill()
            self.proc.wait(10)
            return f"timeout after {TRIAL_TIMEOUT} s"
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait(10)
            err = self.proc.stderr.read()[-2000:]
            return f"worker died (exit {rc}{', signal ' + str(-rc) if rc < 0 else ''}): {err}"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _fill(name: str, policy: str = "lru") -> Cache:
    Cache.unlink(name)
    c = Cache(name, size="1MiB", stripes=4, max_items=1200, policy=policy)
    for i in range(N_KEYS):
        c.set(f"k{i}", make_value(f"k{i}", 0, i, 40 + (i * 37) % 300), ttl=(0.5 if i % 10 == 0 else None))
        if i % 4 == 3:  # overwritten: the first version stays in the arena, dead
            c.set(f"k{i}", make_value(f"k{i}", 0, i + N_KEYS, 40 + (i * 53) % 300))
    return c


def _stripes_named(problems) -> set:
    return {int(m) for p in problems or () for m in re.findall(r"stripe (\d+)", p)}


def _judge(what: str, expect: str | None, res: dict) -> list[str]:
    """Why the worker's answer breaks the rules (module docstring), [] if it does not."""
    bad = []
    if res["torn"]:
        bad.append(f"torn reads {res['torn'][:3]}")
    if res["attach"] != "ok":
        if expect == CLEAN:
            bad.append(f"attach refused a harmless change: {res['attach']}")
        return bad  # refused at attach, naming the damage: reported
    before = res["check_before"]
    if expect == DETECT and not before:
        bad.append("check found nothing before anything repaired the damage")
    if expect == CLEAN and before:
        bad.append(f"check reported a harmless change: {before[:3]}")
    spread = _stripes_named(res["check_after"]) - _stripes_named(before)
    if spread:
        bad.append(f"after the operations check names stripes {sorted(spread)} it found sound before: "
                   f"{res['check_after'][:3]}")
    healed = set(res["repaired"]) & _stripes_named(res["check_after"])
    if healed:
        bad.append(f"stripes {sorted(healed)} were repaired by the operations, yet check still finds: "
                   f"{res['check_after'][:3]}")
    if res["check_final"]:
        bad.append(f"check(fix=True) left problems: {res['check_final'][:3]} (it found {res['fixed'][:3]})")
    return bad


def _fuzz(name: str, pure: bool, kinds, slot_fields, default_trials: int, stripe_words=STRIPE_WORDS) -> None:
    seed = int(os.environ.get("SHMCACHE_FUZZ_SEED", random.randrange(2**32)))
    trials = int(os.environ.get("SHMCACHE_FUZZ_TRIALS", default_trials))
    rnd = random.Random(seed)
    failures, summary = [], {"refused": 0, "check-found": 0, "clean": 0, "detect": 0, "harmless": 0,
                             "ops-repaired": 0}
    w = Worker(name, pure)
    try:
        for t in range(trials):
            c = _fill(name, "noeviction" if t % 3 == 2 else "lru")  # noeviction reclaims its own way
            try:
                assert c.check() == [], "the filled cache is not sound before any damage"
                what, expect = _corrupt(c, rnd, kinds, slot_fields, stripe_words)
                res = w.run(t, with_daemon=(t % 4 == 0), churn=CHURN if t % 4 == 1 else 0)
            finally:
                c.close()
            if isinstance(res, str):
                failures.append(f"trial {t} [{what}]: {res}")
                w = Worker(name, pure)  # go on with a fresh worker, to report everything
                continue
            failures += [f"trial {t} [{what}] (expected {expect}): {why}" for why in _judge(what, expect, res)]
            if expect:
                summary["detect" if expect == DETECT else "harmless"] += 1
            summary["ops-repaired"] += bool(res.get("repaired"))
            if res["attach"] != "ok":
                summary["refused"] += 1
            elif res["check_before"]:
                summary["check-found"] += 1
            else:
                summary["clean"] += 1
    finally:
        w.close()
        Cache.unlink(name)
    print(f"corruption fuzz seed={seed} trials={trials} pure={pure}: {summary}")
    assert not failures, f"seed {seed} (replay: SHMCACHE_FUZZ_SEED={seed}):\n" + "\n".join(failures)


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_corruption_fuzz_no_crash_no_hang_no_torn_value(cache_name, pure):
    """Rows 3-5 of issue 10: header fields, stripe records (counts, bump pointer,
    seqlock version, owner, lock-wait counters), index structure and access
    bits, a slice with no empty slot, and client records (live and dead)."""
    _fuzz(cache_name, pure, ["header", "stripe", "stripe", "slot", "slot", "full-slice", "ref", "client"],
          STRUCTURE_FIELDS, 40)


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_corruption_fuzz_slot_payload_and_allocator_fields(cache_name, pure):
    """Issue 10's torn-value rows on the segment-ring arena (issue 8): a slot's
    entry location and the stripe's live-bytes and ring words, corrupted while
    writers run. Readers follow a location only inside the stripe's arena, to
    an entry whose key length and bytes match, so no read is torn or of
    another key; a write takes the head's fill as the larger of the ring word's
    and the head segment's mirror of it, and refuses a head that is sealed."""
    _fuzz(cache_name, pure, ["slot", "stripe"], PAYLOAD_FIELDS, 25, ALLOCATOR_WORDS)


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_corruption_fuzz_entry_and_segment_headers(cache_name, pure):
    """Issue 10's entry headers inside the arena (every field of layout.ENTRY,
    and key/value bytes) of live and dead entries, and every u32 of the
    segment headers (layout.SEG) of segments in use and free."""
    _fuzz(cache_name, pure, ["entry", "entry", "seg"], PAYLOAD_FIELDS, 40)


@pytest.mark.stress
@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
@pytest.mark.parametrize("fuzz", [test_corruption_fuzz_no_crash_no_hang_no_torn_value,
                                  test_corruption_fuzz_slot_payload_and_allocator_fields,
                                  test_corruption_fuzz_entry_and_segment_headers],
                         ids=["structure", "payload", "arena"])
def test_corruption_fuzz_long(cache_name, monkeypatch, fuzz, pure):
    """Every fuzz above on both cores, 400 trials each unless SHMCACHE_FUZZ_TRIALS says otherwise."""
    monkeypatch.setenv("SHMCACHE_FUZZ_TRIALS", os.environ.get("SHMCACHE_FUZZ_TRIALS", "400"))
    fuzz(cache_name, pure)


# ------------------------------------------------------------------ regressions
# Bugs the fuzzer found, each pinned on both cores.

@pytest.fixture(params=["c", "pure"])
def small_cache(request, cache_name, monkeypatch):
    import shmcache.cache as cache_mod

    if request.param == "c" and not cache_mod.USE_SPEEDUPS:
        pytest.skip("the C accelerator is not in use")
    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", request.param == "c")
    c = Cache(cache_name, size="1MiB", stripes=4, max_items=1200)
    yield c
    c.close()


def _entry_of(c: Cache, key: str) -> tuple[int, int]:
    """(stripe, segment address of key's entry)."""
    t = c._table
    kb = c._key(key)
    h = xxhash.xxh3_64_intdigest(kb)
    s = h & t.mask
    i = t._find(s, (h >> 32) | 1, kb)
    assert i >= 0
    loc = L.SLOT.unpack_from(c._seg.mm, t._slot_pos(s, i))[1]
    return s, t.arena_off + s * t.stripe_arena + loc * L.ALIGN


def _assert_reported_then_repaired(c: Cache, s: int) -> None:
    found = c.check()
    assert found and all(f"stripe {s}" in p for p in found), found
    admin.check(c, fix=True)
    assert c.check() == []


@pytest.mark.parametrize("client", [2**32 - 1, 2**31 - 1, "max_clients"])
def test_a_dead_holders_owner_record_naming_no_client_slot_is_recovered(small_cache, client):
    """A stripe whose lock word names a slot past the client table: recovery
    read that "client" past the table (struct.error beyond the mapping: the
    daemon's recovery pass died) or inside the index. A slot number outside
    the table names no process; the recoveries counter, at its limit, wraps."""
    c = small_cache
    c.set_many({f"k{i}": i for i in range(100)})
    mm, g = c._seg.mm, c._seg.geometry
    s = 1
    so = g.stripe_table_off + s * L.STRIPE_SIZE
    low = g.max_clients + 1 if client == "max_clients" else client  # the word's low half: slot + 1
    L.U64.pack_into(mm, so + L.S_LOCK, low | 7 << 32)  # the "dead holder"
    L.U64.pack_into(mm, so + L.S_RECOVERIES, 2**64 - 1)
    assert admin.recover_stripes(c) == [s]
    assert L.U64.unpack_from(mm, so + L.S_RECOVERIES)[0] == 0
    assert admin.lock_holders(c) == [None] * 4 and c.check() == []
    assert all(c[f"k{i}"] == i for i in range(100))


def test_counters_at_their_limit_wrap_instead_of_failing_clear_and_detach(small_cache, cache_name):
    """The header's retired-client totals and generation are u64s any writer
    of the segment can set: at 2**64 - 1, clear() raised ValueError and every
    detach (which folds the client's counters into the totals) struct.error."""
    c = small_cache
    c.set("k", b"v")
    assert c.get("k") == b"v" and c.get("absent") is None
    mm = c._seg.mm
    for k in range(L.N_COUNTERS):
        L.U64.pack_into(mm, L.H_RETIRED + 8 * k, 2**64 - 1)
    L.U64.pack_into(mm, L.H_GENERATION, 2**64 - 1)
    c.clear()
    assert L.U64.unpack_from(mm, L.H_GENERATION)[0] == 0
    c.close()
    with Cache(cache_name) as again:
        assert again.stats()["hits"] == 0 and again.check() == []  # 2**64 - 1 + 1 hit wrapped


@pytest.mark.parametrize("where", ["value byte", "flags", "vlen - 1", "key byte"])
def test_get_of_an_entry_failing_its_checksum_is_a_miss_not_a_torn_value(small_cache, where):
    """A damaged entry (a value byte, its type tag, its length) was returned
    as a value by get: wrong bytes, a value of another type, or a
    UnicodeDecodeError. Readers now verify the entry's checksum (on the copy,
    after the seqlock said it is consistent): damage reads as absent."""
    c = small_cache
    c.set("k", "héllo wörld, a str value")
    s, a = _entry_of(c, "k")
    klen = L.ENTRY.unpack_from(c._seg.mm, a)[2]
    off = {"value byte": L.ENTRY_HEADER + klen + 1, "flags": L.E_FLAGS, "vlen - 1": L.E_VLEN,
           "key byte": L.ENTRY_HEADER}[where]
    mm = c._seg.mm
    mm[a + off] = (mm[a + off] - 1) & 0xFF if where == "vlen - 1" else mm[a + off] ^ 0xC0
    assert c.get("k") is None
    _assert_reported_then_repaired(c, s)
    c.set("k", "new")
    assert c.get("k") == "new"


def test_overwrite_of_an_entry_with_a_damaged_length_stores_the_new_value(small_cache):
    """Pure Python: set() of a key whose old entry's vlen was damaged raised
    ValueError ("entry ... runs past the arena") from the live-bytes
    accounting, after emptying the stripe's damage the hard way."""
    c = small_cache
    c.set("k", b"x" * 100)
    s, a = _entry_of(c, "k")
    L.U32.pack_into(c._seg.mm, a + L.E_VLEN, 0x40000000)
    c.set("k", b"y" * 50)
    assert c.get("k") == b"y" * 50
    admin.check(c, fix=True)
    assert c.check() == []


def test_check_reports_a_segment_walk_broken_by_a_dead_entry_header(small_cache):
    """A dead (overwritten) entry's length changed: every slot is still sound,
    but a reclaim walking the segment would stop at it or skip the live
    entries after it (dropping them, or freeing the segment under them).
    check walked only the live slots and said sound; it now walks each
    segment in use, and repair cuts the segment back to where its walk stops."""
    c = small_cache
    c.set("a", b"1" * 40)
    _s, dead = _entry_of(c, "a")
    c.set("a", b"2" * 40)  # the first version is dead now, the second follows it
    s, _a = _entry_of(c, "a")
    assert c.check() == []
    L.U32.pack_into(c._seg.mm, dead + L.E_VLEN, L.ENTRY.unpack_from(c._seg.mm, dead)[1] + 4)
    _assert_reported_then_repaired(c, s)
    assert c.get("a") in (None, b"2" * 40)
    for i in range(3000):  # the stripe keeps working through reclaims
        c.set(f"k{i}", b"v" * 200)
    assert c.check() == []


def test_check_reports_a_raised_head_fill_mirror(small_cache):
    """The head segment's fill mirror (layout.SEG) raised by one ALIGN: the
    next entry lands 4 bytes past the last, so the segment's walk would break
    there at its reclaim (dropping every entry after it). check said sound."""
    c = small_cache
    c.set("a", b"1" * 40)
    s, _a = _entry_of(c, "a")
    t = c._table
    head, _tail, fill = t._ring(s)
    L.U32.pack_into(c._seg.mm, t._seg_base(s, head) + 4, fill + L.ALIGN)
    _assert_reported_then_repaired(c, s)
    assert c.get("a") == b"1" * 40


def test_delete_of_an_entry_with_a_damaged_length_removes_it(small_cache):
    """Pure Python: delete()/pop() of a key whose entry's vlen was damaged
    raised ValueError ("entry ... runs past the arena"). A damaged entry is
    absent to pop (as to get) and the removal goes ahead."""
    c = small_cache
    c.set("k", b"x" * 100)
    c.set("j", b"z" * 100)
    _s, a = _entry_of(c, "k")
    L.U32.pack_into(c._seg.mm, a + L.E_VLEN, 0xFFFFFFFF)
    c.delete("k")
    assert c.pop("k", None) is None and c.get("k") is None
    _s, a = _entry_of(c, "j")
    c._seg.mm[a + L.ENTRY_HEADER + 3] ^= 1
    assert c.pop("j", "gone") == "gone"
    admin.check(c, fix=True)
    assert c.check() == []


@pytest.mark.parametrize("where", ["value byte", "vlen past the arena"])
def test_items_and_entries_leave_out_an_entry_failing_its_checksum(small_cache, where):
    """items(), keys(), admin.entries (and so snapshots) copied a damaged
    entry's bytes as its value (or raised ValueError for a length past the
    arena). The scan path now checks each entry as get does."""
    c = small_cache
    for k in ("a", "b", "c"):
        c.set(k, k.encode() * 50)
    s, a = _entry_of(c, "b")
    if where == "value byte":
        c._seg.mm[a + L.ENTRY_HEADER + 1 + 7] ^= 0x10
    else:
        L.U32.pack_into(c._seg.mm, a + L.E_VLEN, 0x7FFFFFFF)
    assert dict(c.items()) == {"a": b"a" * 50, "c": b"c" * 50}
    assert sorted(c.keys()) == ["a", "c"]
    assert sorted(e.key for e in admin.entries(c)) == ["a", "c"]
    _assert_reported_then_repaired(c, s)


@pytest.mark.parametrize("where", ["value byte", "key byte", "flags"])
def test_snapshot_leaves_out_an_entry_failing_its_checksum(small_cache, tmp_path, where):
    """A snapshot copied a damaged entry's raw bytes, and restore stored them
    with a fresh checksum: garbage every reader then returned as the key's
    value (or under another key). The snapshot writer now checks each entry's
    checksum and key hash and leaves damage out (counted in the info)."""
    from shmcache.snapshot import restore_snapshot, write_snapshot

    c = small_cache
    for k in ("a", "b", "c"):
        c.set(k, k * 50)
    _s, a = _entry_of(c, "b")
    klen = L.ENTRY.unpack_from(c._seg.mm, a)[2]
    off = {"value byte": L.ENTRY_HEADER + klen + 7, "key byte": L.ENTRY_HEADER, "flags": L.E_FLAGS}[where]
    c._seg.mm[a + off] ^= 0x10
    info = write_snapshot(c, str(tmp_path / "snap"))
    assert (info.entries, info.skipped_damaged) == (2, 1)
    c.clear()
    r = restore_snapshot(c, str(tmp_path / "snap"))
    assert r.loaded == 2
    assert dict(c.items()) == {"a": "a" * 50, "c": "c" * 50}
    assert c.check() == []


@pytest.mark.parametrize("seed", range(6))
def test_c_chain_walk_matches_the_python_walk(cache_name, monkeypatch, seed):
    """check walks every segment's entry chain under the stripe's lock; the
    walk is in C (_speedups.chain_walk: a Python loop held a 16 MiB stripe
    ~40 ms). The Python walk, used without the accelerator, is the
    reference: on the same damage (entry lengths, a segment's end words)
    both find the same chains, report the same problems and repair to the
    same bytes."""
    import shmcache.repair as R

    if R._chain_walk is None:
        pytest.skip("needs the C accelerator")
    rnd = random.Random(seed)
    c = Cache(cache_name, size="1MiB", stripes=1)
    try:
        for i in range(4000):  # overwrites leave dead entries between live ones
            c[f"k{i % 1500}"] = bytes([i % 251]) * (20 + i % 300)
        t = c._table
        mm = c._seg.mm
        for _ in range(3):
            seg = rnd.choice(t.in_use(0)[:-1])
            base = t._seg_base(0, seg)
            starts, _stop = t._chain(0, seg, t._seg_end(0, seg))
            e = int(rnd.choice(starts.tolist()))
            field, width = rnd.choice([(L.E_VLEN, 4), (L.E_KLEN, 2), (-1, 4)])
            if field < 0:  # a segment end word
                L.U32.pack_into(mm, base + rnd.choice((0, 4)), rnd.randrange(L.SEG_HEADER, t.seg_size + 64))
            else:
                mm[base + e + field : base + e + field + width] = rnd.randrange(1 << (8 * width)).to_bytes(width, "little")
        g = c._g
        span = (g.index_off, g.total_size)
        before = bytes(mm[span[0] : span[1]])
        results = []
        for walk in (R._chain_walk, None):
            monkeypatch.setattr(R, "_chain_walk", walk)
            mm[span[0] : span[1]] = before
            chains = []
            for seg in t.in_use(0):
                starts, stop = t._chain(0, seg, t._seg_end(0, seg))
                chains.append((starts.tolist(), stop))
            problems = c.check()
            admin.check(c, fix=True)
            assert c.check() == []
            results.append((chains, problems, bytes(mm[span[0] : span[1]])))
        assert results[0][0] == results[1][0]
        assert results[0][1] == results[1][1]
        assert results[0][2] == results[1][2]
    finally:
        c.close()
