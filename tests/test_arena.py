"""The segment-ring arena: reclaim, second chance, eviction, the item cap.

The C write path (shmcache/_speedups.c) and the Python reference (arena.py)
implement one algorithm: driven by the same operations with the same clock,
they must leave byte-for-byte the same index, access bits, arena and stripe
accounting, with stripes filled far past capacity so that sealing, reclaim,
copy-forward (second chance) and eviction all happen on both sides.
"""

import random

import numpy as np
import pytest

import shmcache.cache as cache_mod
from names import fresh_name
from shmcache import Cache, CacheFull, admin
from shmcache import layout as L
from test_speedups import open_pair as _pair

needs_c = pytest.mark.skipif(cache_mod._speedups is None, reason="C accelerator not built")


def _state(cache):
    """Everything the arena algorithm decides: index, access bits, arenas, and
    per stripe items, live bytes, ring, evictions."""
    g = cache._g
    mm = cache._seg.mm
    st = cache._table.stripes
    fields = [L.S_ITEMS // 8, L.S_LIVE // 8, L.S_RING // 8, L.S_EVICTIONS // 8]
    return bytes(mm[g.index_off : g.total_size]), st[:, fields].tolist()


def _drive(cache, clock, seed, n, nkeys, ttl_every=0, value_sizes=(20, 400)):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = f"k{rng.randrange(nkeys)}"
        r = rng.random()
        if r < 0.45:
            out.append(cache.get(k))
        elif r < 0.9:
            ttl = 5.0 if ttl_every and i % ttl_every == 0 else None
            out.append(cache.set(k, bytes([i % 251]) * rng.randint(*value_sizes), ttl=ttl))
        elif r < 0.95:
            out.append(cache.delete(k))
        elif r < 0.98:
            out.append(cache.incr(f"n{rng.randrange(50)}"))
        else:
            clock.advance(1.0)
    return out


@needs_c
@pytest.mark.parametrize(
    "kw,ttl_every",
    [
        (dict(size="512KiB", stripes=2), 0),  # bytes run out: seal, reclaim, second chance, evict
        (dict(size="512KiB", stripes=2, max_items=600), 0),  # the item cap runs out first
        (dict(size="512KiB", stripes=1), 7),  # with expiring entries dropped by reclaim
    ],
    ids=["bytes", "items", "ttl"],
)
def test_c_and_python_reclaim_identically(fake_clock, kw, ttl_every):
    name = fresh_name("arena")
    c, p = _pair(name, fake_clock, **kw)
    try:
        assert c._core is not None and p._core is None
        rc = _drive(c, fake_clock, 1, 20_000, 5000, ttl_every)
        fake_clock.now = 1_000_000.0  # the Python run sees the same clock readings
        rp = _drive(p, fake_clock, 1, 20_000, 5000, ttl_every)
        assert rc == rp
        assert c.stats()["evictions"] > 1000, "the stripes must have been reclaimed many times over"
        sc, sp = _state(c), _state(p)
        assert sc[1] == sp[1]
        assert sc[0] == sp[0], "index, access bits or arena bytes differ"
        assert c.check() == [] and p.check() == []
    finally:
        for x in (c, p):
            x.close()
        Cache.unlink(name + "-c")
        Cache.unlink(name + "-p")


def test_second_chance_keeps_keys_that_are_read(make_cache, fake_clock):
    """Keys read while the cache churns survive many generations of the ring;
    keys never read are evicted with their segment."""
    c = make_cache(size="1MiB", stripes=1, clock=fake_clock)
    hot = [f"hot{i}" for i in range(200)]
    for k in hot:
        c.set(k, b"h" * 200)
    for i in range(30_000):
        c.set(f"cold{i}", b"c" * 200)
        if i % 20 == 0:
            for k in hot[(i // 20) % 10 :: 10]:
                assert c.get(k) == b"h" * 200, k
    assert all(c.get(k) == b"h" * 200 for k in hot)
    assert c.get("cold0") is None and c.stats()["evictions"] > 20_000
    assert c.check() == []


def test_scan_does_not_flush_the_hot_set(make_cache, fake_clock):
    """A one-time scan larger than the cache evicts the scanned keys, not the
    keys that are being read (an LRU would lose them all)."""
    c = make_cache(size="1MiB", stripes=1, clock=fake_clock)
    hot = [f"hot{i}" for i in range(300)]
    for k in hot:
        c.set(k, b"h" * 100)
    for _ in range(3):
        for k in hot:
            c.get(k)
        for i in range(3000):
            c.set(f"scan{_}-{i}", b"s" * 300)
            if i % 100 == 0:
                for k in hot[i % 3 :: 3]:
                    c.get(k)
    kept = sum(c.get(k) is not None for k in hot)
    assert kept >= 0.9 * len(hot)


@pytest.mark.parametrize("py", [False, True], ids=["c", "python"])
def test_full_cache_overwrites_and_deletes_stay_sound(make_cache, fake_clock, monkeypatch, py):
    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", cache_mod.USE_SPEEDUPS and not py)
    c = make_cache(size="1MiB", stripes=2, clock=fake_clock)
    rng = random.Random(5)
    model = {}
    for i in range(20_000):
        k = f"k{rng.randrange(3000)}"
        if rng.random() < 0.2:
            c.delete(k)
            model.pop(k, None)
        else:
            v = bytes([i % 256]) * rng.choice([1, 50, 4096])
            c.set(k, v)
            model[k] = v
    # what is present is what was written last (never a stale or foreign value)
    for k, v in model.items():
        got = c.get(k)
        assert got is None or got == v, k
    st = c.stats()
    assert st["items"] == len(c) <= c._g.max_items
    assert c.check() == []


def test_item_cap_evicts_through_the_ring(make_cache, fake_clock):
    c = make_cache(size="1MiB", stripes=1, max_items=100, clock=fake_clock)
    for i in range(5000):
        c.set(f"k{i}", i)
        assert c.stats()["items"] <= 100
    assert c[f"k{4999}"] == 4999
    assert c.check() == []


def test_noeviction_fills_then_raises_and_keeps_every_value(make_cache, fake_clock):
    c = make_cache(size="512KiB", stripes=1, policy="noeviction", clock=fake_clock)
    stored = {}
    with pytest.raises(CacheFull, match="raise size or max_items"):
        for i in range(100_000):
            c.set(f"k{i}", bytes([i % 256]) * 300)
            stored[f"k{i}"] = bytes([i % 256]) * 300
    assert stored and all(c.get(k) == v for k, v in stored.items())
    # deletes make room again: reclaim copies the live entries forward
    for k in list(stored)[::2]:
        c.delete(k)
        del stored[k]
    for i in range(len(stored) // 2):
        c.set(f"again{i}", b"a" * 300)
        stored[f"again{i}"] = b"a" * 300
    assert all(c.get(k) == v for k, v in stored.items())
    assert c.stats()["evictions"] == 0 and c.check() == []


def test_expired_entries_free_their_slots_before_anything_is_evicted(make_cache, fake_clock):
    c = make_cache(size="1MiB", stripes=1, clock=fake_clock)
    for i in range(2000):
        c.set(f"t{i}", b"x" * 200, ttl=10)
    fake_clock.advance(11)
    for i in range(2000):
        c.set(f"k{i}", b"y" * 200)
    st = c.stats()
    assert st["expirations"] > 0
    assert all(c.get(f"k{i}") == b"y" * 200 for i in range(2000))


def test_geometry_segments():
    g = L.compute_geometry("64MiB")
    assert g.seg_size == L.SEG_SIZE and g.n_segs >= 2 * L.MIN_SEGS
    assert g.stripe_arena == g.n_segs * g.seg_size
    assert g.max_value_size == g.seg_size - L.SEG_HEADER - L.ENTRY_HEADER - g.max_key_size
    big = L.compute_geometry("64MiB", max_value_size=1 << 19)
    assert big.seg_size >= (1 << 19) + L.SEG_HEADER + L.ENTRY_HEADER + big.max_key_size
    with pytest.raises(ValueError, match="at least 4 segments"):
        L.compute_geometry("1MiB", stripes=4, max_value_size=200_000)


def test_memory_per_100_byte_entry_is_at_most_150_bytes(make_cache):
    """Shared bytes per entry as the comparison suite counts them: arena bytes
    of the live entries plus the index share (slot + access bit at the load
    cap). 100-byte values, 12-byte keys."""
    c = make_cache(size="64MiB")
    c.set_many({f"key:{i:08d}": b"v" * 100 for i in range(50_000)})
    st = c.stats()
    per = st["bytes_used"] / st["items"] + L.INDEX_BYTES_PER_SLOT / L.MAX_LOAD
    assert per <= 150, per


def test_index_never_points_into_a_free_segment(make_cache, fake_clock):
    c = make_cache(size="512KiB", stripes=1, clock=fake_clock)
    for i in range(10_000):
        c.set(f"k{i % 3000}", b"z" * (i % 500))
        if i % 3 == 0:
            c.get(f"k{(i * 7) % 3000}")
    t = c._table
    used = set(t.in_use(0))
    sl = t.slots[0]
    locs = sl["loc"][sl["tag"] != 0].astype(np.int64) * L.ALIGN
    assert set((locs // t.seg_size).tolist()) <= used


@pytest.mark.parametrize("py", [False, True], ids=["c", "python"])
def test_regression_lowered_head_fill_never_overwrites_a_published_entry(make_cache, monkeypatch, py):
    """The corruption fuzzer lowered the ring word's fill by 8 bytes: the next
    write landed on the last 8 bytes of the entry before it, whose key stayed
    intact, so readers returned a torn value. The head segment now mirrors its
    fill and writers take the larger of the two."""
    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", cache_mod.USE_SPEEDUPS and not py)
    c = make_cache(size="1MiB", stripes=1)
    c["a"] = b"A" * 200
    c["b"] = b"B" * 200
    st = c._table.stripes
    head, tail, fill = L.unpack_ring(int(st[0, L.S_RING // 8]))
    st[0, L.S_RING // 8] = L.pack_ring(head, tail, fill - 8)  # one damaged word
    c["c"] = b"C" * 200
    assert (c["a"], c["b"], c["c"]) == (b"A" * 200, b"B" * 200, b"C" * 200)
    assert c.check() == []


@pytest.mark.parametrize("py", [False, True], ids=["c", "python"])
def test_regression_ring_head_on_a_sealed_segment_is_refused(make_cache, monkeypatch, py):
    """A ring word whose head names a sealed segment (a flipped bit) would make
    writes land on that segment's published entries. Writers refuse it: the
    stripe is repaired (here emptied: which segment was the head cannot be
    known) and the write raises LayoutMismatch; no read is ever torn."""
    from shmcache import LayoutMismatch

    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", cache_mod.USE_SPEEDUPS and not py)
    c = make_cache(size="1MiB", stripes=1)
    t = c._table
    i = 0
    while t._ring(0)[0] < 2:  # two sealed segments behind the head
        c[f"k{i}"] = bytes([i % 256]) * 1000
        i += 1
    st = t.stripes
    head, tail, fill = L.unpack_ring(int(st[0, L.S_RING // 8]))
    st[0, L.S_RING // 8] = L.pack_ring(tail, tail, fill)
    with pytest.raises(LayoutMismatch):
        c["new"] = b"N" * 1000
    assert all(c.get(f"k{j}") in (None, bytes([j % 256]) * 1000) for j in range(i))
    assert c.check() == []
    c["new"] = b"N" * 1000
    assert c["new"] == b"N" * 1000


@pytest.mark.parametrize("py", [False, True], ids=["c", "python"])
def test_regression_item_cap_with_one_segment_in_use_keeps_read_keys(make_cache, monkeypatch, py):
    """At the item cap with the head the only segment in use, the insert
    sealed the head (its first attempt) and then reclaimed it without a second
    chance: every key of the stripe went, the ones just read included (found
    in review). Now the first item-cap reclaim of a write always gives one."""
    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", cache_mod.USE_SPEEDUPS and not py)
    c = make_cache(size="1MiB", stripes=1, max_items=100)
    cap = c.stats()["max_items"]
    for i in range(cap):
        c[f"k{i}"] = b"v"
    assert c._table._ring(0)[0] == c._table._ring(0)[1]  # all in the head segment
    hot = [f"k{i}" for i in range(0, cap, 2)]
    for k in hot:
        assert c[k] == b"v"
    c["new"] = b"n"
    assert all(c.get(k) == b"v" for k in hot)
    assert c["new"] == b"n" and c.stats()["evictions"] <= cap - len(hot)
    assert c.check() == []


@pytest.mark.parametrize("py", [False, True], ids=["c", "python"])
def test_regression_unaligned_ring_fill_is_damage(make_cache, monkeypatch, py):
    """A ring word whose fill was raised by 2 (not a multiple of ALIGN) was
    accepted: the next set stored its entry 2 bytes past where its slot points,
    so it vanished (found in review). Now it is damage: repaired, write refused."""
    from shmcache import LayoutMismatch

    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", cache_mod.USE_SPEEDUPS and not py)
    c = make_cache(size="1MiB", stripes=1)
    c["a"] = b"A" * 100
    st = c._table.stripes
    head, tail, fill = L.unpack_ring(int(st[0, L.S_RING // 8]))
    st[0, L.S_RING // 8] = L.pack_ring(head, tail, fill + 2)
    with pytest.raises(LayoutMismatch):
        c["b"] = b"B" * 100
    c["b"] = b"B" * 100
    assert c["b"] == b"B" * 100 and c.get("a") in (None, b"A" * 100)
    assert c.check() == []


@needs_c
def test_lock_hold_instrumentation_records_reclaims_and_resets(make_cache):
    """bench_full judges the longest stripe hold on Core.max_hold_ns (wall) and
    max_hold_cpu_ns (the reclaim's CPU time): both record once the ring
    reclaims, stay 0 with timing off, and a benchmark can reset them."""
    c = make_cache(size="1MiB", stripes=1)
    core = c._core
    for i in range(4000):  # past the ring's ~2,600 entries: reclaims, untimed
        c[f"a{i}"] = b"x" * 300
    assert c.stats()["evictions"] > 0 and (core.max_hold_ns, core.max_hold_cpu_ns) == (0, 0)
    core.timing = True
    for i in range(2000):
        c[f"b{i}"] = b"x" * 300
    assert core.max_hold_ns > 0 and core.max_hold_cpu_ns > 0
    core.max_hold_ns = core.max_hold_cpu_ns = 0
    assert (core.max_hold_ns, core.max_hold_cpu_ns) == (0, 0)


def _fill_until_pending(c):
    """Write 300-byte values until a write takes the stripe's last free segment
    (the tail's reclaim is then pending). Returns the keys written."""
    t = c._table
    keys = []
    while (t._ring(0)[0] + 1) % t.n_segs != t._ring(0)[1]:
        keys.append(f"k{len(keys)}")
        c[keys[-1]] = bytes([len(keys) % 251]) * 300
    return keys


def _tail_offsets(c):
    t = c._table
    tail = t._ring(0)[1]
    return tail, [e for e, _a, _k, _v in t._walk(0, tail, [False])]


def _cursor(c, seg):
    t = c._table
    return L.U32.unpack_from(c._seg.mm, t._seg_base(0, seg) + 8)[0]


@pytest.mark.parametrize("py", [False, True], ids=["c", "python"])
def test_reclaim_runs_in_steps_over_the_inserts_that_follow(make_cache, monkeypatch, py):
    """One set in ~130 of a full cache used to reclaim a whole 64 KiB segment
    under the stripe lock (40-150 us: the set p99.9). Now the write that takes
    the last free segment leaves the tail's reclaim pending, and it and each
    insert after it walk RECLAIM_STEP of the tail's entries, from the cursor
    stored in the tail's header, until the tail is free again."""
    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", cache_mod.USE_SPEEDUPS and not py)
    c = make_cache(size="1MiB", stripes=1)
    t = c._table
    keys = _fill_until_pending(c)
    tail, offs = _tail_offsets(c)
    assert len(offs) > 3 * L.RECLAIM_STEP
    assert _cursor(c, tail) == offs[L.RECLAIM_STEP]  # the taking write did one step, no more
    step = 1
    while t._ring(0)[1] == tail:
        ev = c.stats()["evictions"]
        c[f"n{step}"] = b"n" * 300
        assert c.stats()["evictions"] - ev <= L.RECLAIM_STEP
        step += 1
        if t._ring(0)[1] == tail:
            assert _cursor(c, tail) == offs[step * L.RECLAIM_STEP]
    assert step == -(-len(offs) // L.RECLAIM_STEP)  # ceil: every entry walked once
    assert _cursor(c, t._ring(0)[1]) == 0  # the next tail starts from its first entry
    assert all(c.get(k) in (None, bytes([(i + 1) % 251]) * 300) for i, k in enumerate(keys))
    assert c.check() == []


@pytest.mark.parametrize("py", [False, True], ids=["c", "python"])
@pytest.mark.parametrize("damage", ["unaligned", "past-end", "later-entry", "later-entry-unrepaired", "next-tail"])
def test_damaged_reclaim_cursor_never_returns_a_wrong_value(make_cache, monkeypatch, py, damage):
    """The cursor is segment input like any other field. Off an entry
    boundary or out of range it is ignored or makes the walk meet a torn
    header (then the index is swept); on a later entry boundary it skips live
    entries, which check reports and repair restores (left alone, their slots
    lead to other keys' bytes once the segment is reused: readers miss); a
    damaged cursor in the segment that becomes the tail next is zeroed before
    its reclaim starts."""
    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", cache_mod.USE_SPEEDUPS and not py)
    c = make_cache(size="1MiB", stripes=1)
    t = c._table
    mm = c._seg.mm
    keys = _fill_until_pending(c)
    vals = {k: bytes([(i + 1) % 251]) * 300 for i, k in enumerate(keys)}
    tail, offs = _tail_offsets(c)
    seg = (tail + 1) % t.n_segs if damage == "next-tail" else tail
    later = [e for e, _a, _k, _v in t._walk(0, seg, [False])][-3]
    poke = {"unaligned": offs[20] + 2, "past-end": t.seg_size + 64}.get(damage, later)
    L.U32.pack_into(mm, t._seg_base(0, seg) + 8, poke)
    if damage == "later-entry":
        assert any("reclaim cursor" in p for p in c.check())  # reported before a write acts on it
        admin.repair(c, 0)  # repair walks the tail again from its first entry
        assert c.check() == []
    n = 3 * t.seg_size // 300
    for j in range(n):
        c[f"after{j}"] = b"a" * 300
        if j % 50 == 0:
            assert all(c.get(k) in (None, v) for k, v in vals.items()), j
    assert all(c.get(k) in (None, v) for k, v in vals.items())
    assert all(c.get(f"after{j}") in (None, b"a" * 300) for j in range(n))
    if damage == "later-entry-unrepaired":
        admin.repair(c, 0)  # the skipped entries' slots now lead to other keys: dropped
    assert c.check() == []
