"""Crash recovery: writers SIGKILLed while holding a stripe lock.

A child takes a stripe lock exactly as a writer does (``cache._locks.lock``)
or dies between taking the lock word and making the version odd, then gets a
real SIGKILL. Other processes must recover the stripe (bounded: every child
is joined with a timeout and must exit 0), lose nothing that was fully
written, serve no corruption, and never mistake a live holder for a dead one.

Internals used to reach exact states (no mocks): ``_locks.lock/unlock``,
the stripe's lock word (layout.S_LOCK), and the table's own entry/slot
structs to leave a half-written entry behind.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import xxhash

from procs import join_all
from shmcache import Cache, admin
from shmcache import layout as L
from shmcache.codec import encode_key
from shmcache.lock import live_clients
from values import bad_value, make_value

CTX = mp.get_context("fork")
LOCK_TIMEOUT = 0.2  # seconds: short, so recovery is quick
BOUND = 10.0  # seconds a recovering write may take before we call it hung
JOIN = 30.0


# ----------------------------------------------------------------- helpers
def stripe_of(cache: Cache, key) -> int:
    return xxhash.xxh3_64_intdigest(encode_key(key)) & (cache._g.n_stripes - 1)


def keys_in_stripe(n_stripes: int, s: int, n: int, prefix: str = "k") -> list[str]:
    out = []
    i = 0
    while len(out) < n:
        k = f"{prefix}{i}"
        i += 1
        if xxhash.xxh3_64_intdigest(encode_key(k)) & (n_stripes - 1) == s:
            out.append(k)
    return out


def good(key: str) -> bytes:
    return make_value(key, 0, 0, 40 + len(key) * 37 % 900)


def word_off(cache: Cache, s: int) -> int:
    return cache._g.stripe_table_off + s * L.STRIPE_SIZE + L.S_LOCK


def version(cache: Cache, s: int) -> int:
    return L.U64.unpack_from(cache._seg.mm, cache._g.stripe_table_off + s * L.STRIPE_SIZE)[0]


def wait_zombie(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "killed child never became a zombie"
        time.sleep(0.005)


def scribble_torn_entry(cache: Cache, s: int, key: str) -> None:
    """Leave stripe s as a writer killed mid-insert of ``key`` would: half an
    entry at the head segment's fill (stale checksum), its index slot already
    published, the ring's fill not yet advanced, and junk beyond it."""
    g = cache._g
    t = cache._table
    mm = cache._seg.mm
    kb = encode_key(key)
    h = xxhash.xxh3_64_intdigest(kb)
    tag = (h >> 32) | 1
    vb = make_value(key, 9, 9, 600)
    head, _tail, fill = t._ring(s)
    off = head * g.seg_size + fill
    a = g.arena_off + s * g.stripe_arena + off
    L.ENTRY.pack_into(mm, a, 0xDEADBEEF, len(vb), len(kb), 0, 0)
    e = a + L.ENTRY_HEADER
    mm[e : e + len(kb)] = kb
    mm[e + len(kb) : e + len(kb) + len(vb) // 2] = vb[: len(vb) // 2]
    junk = a + L.entry_alloc(len(kb), len(vb))
    end = g.arena_off + s * g.stripe_arena + (head + 1) * g.seg_size
    mm[junk : min(end, junk + 512)] = random.Random(s).randbytes(max(0, min(end, junk + 512) - junk))
    i = t._empty_from(s, tag)
    L.SLOT.pack_into(mm, g.index_off + (s * g.slots_per_stripe + i) * L.SLOT_SIZE, tag, off // L.ALIGN, 0.0)


# ------------------------------------------------ child programs (module level)
def _die_holding(name, s, keys, mode, torn_key, ready):
    """Write ``keys``, then hold stripe s the way ``mode`` says and wait to be killed.

    owner:  lock taken like a writer (lock word naming us, version odd).
    torn:   as owner, plus a half-written entry for ``torn_key``.
    word:   lock word taken (naming us) with the version still even: killed
            right after the compare-and-swap, before the version store.
    incr:   as owner, killed halfway through an in-place incr of ``torn_key``
            (new int stored, checksum not yet updated).
    """
    cache = Cache(name, create=False, lock_timeout=LOCK_TIMEOUT)
    for k in keys:
        cache.set(k, good(k))
    if mode == "incr":
        cache.set(torn_key, 41)
    if mode == "word":  # nobody else writes stripe s here: a store is the CAS from 0
        assert L.U64.unpack_from(cache._seg.mm, word_off(cache, s))[0] == 0
        L.U64.pack_into(cache._seg.mm, word_off(cache, s), cache._locks.me)
    else:
        cache._locks.lock(s)
        if mode == "torn":
            scribble_torn_entry(cache, s, torn_key)
        elif mode == "incr":
            t = cache._table
            kb = encode_key(torn_key)
            h = xxhash.xxh3_64_intdigest(kb)
            i = t._find(s, (h >> 32) | 1, kb)
            p = cache._g.index_off + (s * cache._g.slots_per_stripe + i) * L.SLOT_SIZE
            loc = L.SLOT.unpack_from(cache._seg.mm, p)[1]
            a, _vlen, klen, _flags = t._entry(s, loc)
            v = a + L.ENTRY_HEADER + klen
            old = int.from_bytes(cache._seg.mm[v : v + 8], "little", signed=True)
            cache._seg.mm[v : v + 8] = (old + 1).to_bytes(8, "little", signed=True)
    ready.set()
    time.sleep(120)


def _write_one(name, key, value, go=None):
    cache = Cache(name, create=False, lock_timeout=LOCK_TIMEOUT)
    if go is not None and not go.wait(JOIN):
        sys.exit(2)
    cache.set(key, value)
    if cache.get(key) != value:
        sys.exit(4)
    cache.close()


def _read_one(name, key, value):
    cache = Cache(name, create=False, lock_timeout=LOCK_TIMEOUT)
    if cache.get(key) != value:
        sys.exit(4)
    cache.close()


def _hold_alive(name, s, seconds, ready):
    cache = Cache(name, create=False)
    cache._locks.lock(s)
    try:
        ready.set()
        time.sleep(seconds)
    finally:
        cache._locks.unlock(s)
    cache.close()


def _start_dead_holder(cache_name, cache, s, mode, n_keys=20, torn_key=None):
    """Start a child that writes keys (n_keys in stripe s, a few elsewhere),
    then holds stripe s per ``mode``. Returns (process, {key: value})."""
    n = cache._g.n_stripes
    keys = keys_in_stripe(n, s, n_keys, "pre") + keys_in_stripe(n, (s + 1) % n, 5, "other")
    ready = CTX.Event()
    p = CTX.Process(target=_die_holding, args=(cache_name, s, keys, mode, torn_key, ready))
    p.start()
    assert ready.wait(JOIN), "child never took the lock"
    return p, {k: good(k) for k in keys}


def assert_intact(cache: Cache, expected: dict) -> None:
    for k, v in expected.items():
        assert cache.get(k) == v, k
    assert cache.check() == []


# ------------------------------------------------------------------- tests
@pytest.mark.timeout(60)
@pytest.mark.parametrize("recoverer", ["other-process", "parent"])
@pytest.mark.parametrize("mode", ["owner", "torn"])
def test_lock_holder_killed_is_recovered(make_cache, cache_name, mode, recoverer):
    cache = make_cache(size="2MiB", stripes=4, lock_timeout=LOCK_TIMEOUT)
    s = 2
    torn_key, new1, new2 = keys_in_stripe(4, s, 3, "new")
    p, expected = _start_dead_holder(cache_name, cache, s, mode, torn_key=torn_key)
    helpers = []
    try:
        assert cache._locks.stripe_owner(s)[0] == p.pid
        assert version(cache, s) & 1
        p.kill()
        p.join(JOIN)
        if recoverer == "other-process":
            w = CTX.Process(target=_write_one, args=(cache_name, new1, good(new1)))
            helpers.append(w)
            w.start()
            w.join(BOUND)
            assert w.exitcode == 0, "write to the dead holder's stripe hung or failed"
            cache.set(new2, good(new2))
        else:
            t0 = time.monotonic()
            cache.set(new1, good(new1))
            assert time.monotonic() - t0 < BOUND
            w = CTX.Process(target=_write_one, args=(cache_name, new2, good(new2)))
            helpers.append(w)
            w.start()
            w.join(BOUND)
            assert w.exitcode == 0
        expected.update({new1: good(new1), new2: good(new2)})
        assert_intact(cache, expected)
        assert cache.get(torn_key) is None  # the half-written entry is never served
        assert cache.stats()["recoveries"] >= 1
        assert cache._locks.stripe_owner(s)[0] == 0
        assert version(cache, s) % 2 == 0
    finally:
        join_all([p] + helpers, 1)


@pytest.mark.timeout(60)
def test_zombie_lock_holder_counts_as_dead(make_cache, cache_name):
    """Killed but not reaped yet: its pid still exists, as a zombie."""
    cache = make_cache(size="2MiB", stripes=4, lock_timeout=LOCK_TIMEOUT)
    s = 1
    torn_key, new = keys_in_stripe(4, s, 2, "new")
    p, expected = _start_dead_holder(cache_name, cache, s, "torn", torn_key=torn_key)
    # Started before the kill: multiprocessing reaps finished children in start().
    go = CTX.Event()
    w = CTX.Process(target=_write_one, args=(cache_name, new, good(new), go))
    try:
        w.start()
        os.kill(p.pid, signal.SIGKILL)  # no join: it stays a zombie
        wait_zombie(p.pid)
        cache.set(torn_key, good(torn_key))  # the parent recovers the stripe
        assert psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE  # still unreaped
        go.set()
        w.join(BOUND)
        assert w.exitcode == 0
        expected.update({new: good(new), torn_key: good(torn_key)})
        assert_intact(cache, expected)
        assert cache.stats()["recoveries"] >= 1
    finally:
        join_all([p, w], 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("recoverer", ["other-process", "parent"])
def test_death_right_after_taking_the_lock_word_is_recovered(make_cache, cache_name, recoverer):
    """Lock word taken, version not yet odd: killed there. (Layout 5's
    equivalent, a semaphore taken with no owner recorded yet, cost a 1 s
    grace; the word names its holder from the instant it is taken.)"""
    cache = make_cache(size="2MiB", stripes=4, lock_timeout=LOCK_TIMEOUT)
    s = 3
    new1, new2 = keys_in_stripe(4, s, 2, "new")
    p, expected = _start_dead_holder(cache_name, cache, s, "word")
    helpers = []
    try:
        assert cache._locks.stripe_owner(s)[0] == p.pid and version(cache, s) % 2 == 0
        p.kill()
        p.join(JOIN)
        if recoverer == "other-process":
            w = CTX.Process(target=_write_one, args=(cache_name, new1, good(new1)))
            helpers.append(w)
            w.start()
            w.join(BOUND)
            assert w.exitcode == 0
        else:
            cache.set(new1, good(new1))
        cache.set(new2, good(new2))
        expected.update({new1: good(new1), new2: good(new2)})
        assert_intact(cache, expected)
        assert cache.stats()["recoveries"] >= 1
        assert admin.lock_holders(cache)[s] is None
        # the dead client held nothing any more, so its slot can be reaped
        admin.reap_clients(cache)
        assert p.pid not in [pid for _c, pid, _st in live_clients(cache._seg)]
    finally:
        join_all([p] + helpers, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", ["other-process", "parent"])
def test_reader_does_not_hang_on_dead_writers_stripe(make_cache, cache_name, reader):
    """The dead writer left the seqlock odd: readers fall back to the lock,
    recover the stripe and return the right value."""
    cache = make_cache(size="2MiB", stripes=4, lock_timeout=LOCK_TIMEOUT)
    s = 0
    p, expected = _start_dead_holder(cache_name, cache, s, "owner")
    helpers = []
    key = next(k for k in expected if stripe_of(cache, k) == s)
    try:
        assert version(cache, s) & 1
        p.kill()
        p.join(JOIN)
        if reader == "other-process":
            r = CTX.Process(target=_read_one, args=(cache_name, key, expected[key]))
            helpers.append(r)
            r.start()
            r.join(BOUND)
            assert r.exitcode == 0, "reader hung or got a wrong value"
        else:
            t0 = time.monotonic()
            assert cache.get(key) == expected[key]
            assert time.monotonic() - t0 < BOUND
        assert cache.stats()["recoveries"] >= 1
        assert version(cache, s) % 2 == 0
        assert_intact(cache, expected)
    finally:
        join_all([p] + helpers, 1)


@pytest.mark.timeout(60)
def test_live_holder_is_not_mistaken_for_dead(make_cache, cache_name):
    cache = make_cache(size="2MiB", stripes=4, lock_timeout=LOCK_TIMEOUT)
    s = 1
    (key,) = keys_in_stripe(4, s, 1, "live")
    ready = CTX.Event()
    p = CTX.Process(target=_hold_alive, args=(cache_name, s, 1.5, ready))
    try:
        p.start()
        assert ready.wait(JOIN)
        assert cache._locks.stripe_owner(s)[0] == p.pid
        cache.set(key, b"after the live holder")  # waits well past lock_timeout
        assert cache._locks.stripe_owner(s)[0] == 0
        p.join(JOIN)
        assert p.exitcode == 0  # its own unlock found the stripe still its own
        assert cache.get(key) == b"after the live holder"
        assert cache.stats()["recoveries"] == 0
        assert cache.check() == []
    finally:
        join_all([p], 1)


# ------------------------------------------------------------ regressions
def _spin_reader(name, keys, stop, misses, reads):
    cache = Cache(name, create=False)
    while not stop.is_set():
        for k in keys:
            if cache.get(k) is None:
                misses.value += 1
            reads.value += 1


@pytest.mark.timeout(60)
def test_regression_repair_at_even_version_gives_false_misses(make_cache, cache_name):
    cache = make_cache(size="8MiB", stripes=4, lock_timeout=LOCK_TIMEOUT)
    s = 0
    keys = keys_in_stripe(4, s, 2000, "many")
    cache.set_many({k: b"v" for k in keys})
    new = keys_in_stripe(4, s, 10, "new")
    stop = CTX.Event()
    misses = CTX.Value("q", 0, lock=False)
    reads = CTX.Value("q", 0, lock=False)
    reader = CTX.Process(target=_spin_reader, args=(cache_name, keys, stop, misses, reads))
    procs = [reader]
    try:
        reader.start()
        deadline = time.monotonic() + JOIN
        while reads.value < 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(8):  # each round: a holder dies with its word taken, version even; the parent recovers
            p, _ = _start_dead_holder(cache_name, cache, s, "word", n_keys=0)
            procs.append(p)
            p.kill()
            p.join(JOIN)
            assert version(cache, s) % 2 == 0
            cache.set(new[i], b"n")
            if misses.value:
                break
        assert cache.stats()["recoveries"] >= 1
        assert cache.check() == []
        assert all(cache.get(k) == b"v" for k in keys)
        assert misses.value == 0, f"{misses.value} false misses in {reads.value} reads"
    finally:
        stop.set()
        join_all(procs, 5)


def _wait_for_stripe(cache, key_other, key, ready):
    """Fork child using its parent's Cache: one write, then block on a held stripe."""
    cache.set(key_other, b"before")
    ready.set()
    cache.set(key, b"never")  # the parent holds this stripe: we wait here and get killed


@pytest.mark.timeout(60)
def test_regression_killed_lock_waiter_slot_never_reaped(make_cache, cache_name):
    cache = make_cache(size="2MiB", stripes=4, max_clients=4, lock_timeout=LOCK_TIMEOUT)
    s = 2
    (key,) = keys_in_stripe(4, s, 1, "held")
    (other,) = keys_in_stripe(4, 3, 1, "other")
    ready = CTX.Event()
    p = CTX.Process(target=_wait_for_stripe, args=(cache, other, key, ready))
    extra = []
    cache._locks.lock(s)  # a live writer in a long operation
    locked = True
    try:
        p.start()
        assert ready.wait(JOIN)
        deadline = time.monotonic() + JOIN
        while True:  # until the child is inside lock(s), asleep on the word
            if L.U64.unpack_from(cache._seg.mm, word_off(cache, s))[0] & L.LOCK_WAITERS:
                break
            assert time.monotonic() < deadline
            time.sleep(0.005)
        p.kill()
        p.join(JOIN)
        cache._locks.unlock(s)
        locked = False
        cache.set(key, b"after")
        admin.recover(cache)  # the daemon's pass does not free it either
        # 4 slots: parent, the dead child, 2 free. The third open must reap the child.
        for _ in range(3):
            extra.append(Cache(cache_name, create=False))
        assert p.pid not in [pid for _c, pid, _st in live_clients(cache._seg)]
        assert cache.stats()["sets"] == 2  # the child's set survives as a retired counter
    finally:
        if locked:
            cache._locks.unlock(s)
        for c in extra:
            c.close()
        join_all([p], 1)


@pytest.mark.timeout(60)
def test_regression_torn_in_place_incr_drops_counter(make_cache, cache_name):
    cache = make_cache(size="2MiB", stripes=4, lock_timeout=LOCK_TIMEOUT)
    s = 1
    (ctr,) = keys_in_stripe(4, s, 1, "ctr")
    p, expected = _start_dead_holder(cache_name, cache, s, "incr", torn_key=ctr)
    try:
        p.kill()
        p.join(JOIN)
        assert_intact(cache, expected)  # recovers the stripe; the other keys survive
        assert cache.stats()["recoveries"] >= 1
        assert cache.get(ctr) in (41, 42)  # old or new value; never gone
    finally:
        join_all([p], 1)


def _write_after(name, key, go):
    cache = Cache(name, create=False, lock_timeout=LOCK_TIMEOUT)
    if not go.wait(JOIN):
        sys.exit(2)
    cache.set(key, b"x")  # recovers the dead holder's stripe
    cache.close()


@pytest.mark.timeout(60)
def test_regression_recoverer_killed_mid_repair_loses_entries(make_cache, cache_name):
    """Recoverers SIGKILLed at random points of a long repair (a gunicorn worker
    timed out while recovering) lose no intact entry: repair deletes in place,
    it never empties and refills the index."""
    cache = make_cache(size="16MiB", stripes=1, lock_timeout=LOCK_TIMEOUT)
    n = 20000
    keys = [f"e{i}" for i in range(n)]
    cache.set_many({k: k.encode() for k in keys})
    p, expected = _start_dead_holder(cache_name, cache, 0, "owner", n_keys=0)
    procs = [p]
    rng = random.Random(20261121)
    try:
        p.kill()
        p.join(JOIN)
        for _ in range(6):
            go = CTX.Event()
            r = CTX.Process(target=_write_after, args=(cache_name, "trigger", go))
            procs.append(r)
            r.start()
            go.set()
            time.sleep(LOCK_TIMEOUT + rng.uniform(0.0, 0.15))  # its lock wait, then mid-repair
            r.kill()
            r.join(JOIN)
        cache.set("after", b"a")  # recovers from whichever recoverer died holding the stripe
        assert cache.check() == []
        assert cache.stats()["recoveries"] >= 1
        lost = [k for k in keys if cache.get(k) != k.encode()]
        assert lost == [], f"{len(lost)} of {n} intact entries lost"
    finally:
        join_all(procs, 1)


# ------------------------------------------------------- random-kill loop
CHAOS_KEYS = [f"key{i}" for i in range(500)]


def _chaos_writer(name, wid, seed, ready, acked):
    """set/incr/delete as fast as possible until killed. ``acked`` holds the
    last value an incr of "ctr" returned (so it is committed)."""
    cache = Cache(name, create=False)
    rng = random.Random(seed)
    n = 0
    ready.set()
    while True:
        n += 1
        r = rng.random()
        k = rng.choice(CHAOS_KEYS)
        if r < 0.1:
            acked.value = cache.incr("ctr")
        elif r < 0.75:
            # mostly small, some large: fills the stripes, so eviction and compaction run
            length = rng.randint(1, 300) if rng.random() < 0.3 else rng.randint(300, 4000)
            cache.set(k, make_value(k, wid, n, length))
        elif r < 0.85:
            cache.set_many({k2: make_value(k2, wid, n, rng.randint(1, 2000)) for k2 in rng.sample(CHAOS_KEYS, 4)})
        elif r < 0.95:
            cache.delete(k)
        else:
            v = cache.get(k)
            if v is not None and bad_value(k, v):
                os._exit(3)


def _chaos_recover(name, stripe_keys, stall):
    """Write every stripe (recovering the one a killed writer held), then
    check every value. ``stall``: the longest of those writes, seconds."""
    cache = Cache(name, create=False, lock_timeout=0.05)
    for k in stripe_keys:
        t0 = time.perf_counter()
        cache.set(k, make_value(k, 99, 0, 50))
        stall.value = max(stall.value, time.perf_counter() - t0)
    for k in CHAOS_KEYS:
        v = cache.get(k)
        if v is not None and bad_value(k, v):
            print(f"recoverer: bad value for {k!r}: {bad_value(k, v)}", file=sys.stderr, flush=True)
            os._exit(3)
    cache.close()


def run_chaos(make_cache, cache_name, iterations, seed):
    cache = make_cache(size="1MiB", stripes=8)
    rng = random.Random(seed)
    stripe_keys = [keys_in_stripe(8, s, 1, "fix")[0] for s in range(8)]
    acked = CTX.Value("q", 0, lock=False)
    last = 0
    # Exists from the start: a writer killed before its first incr committed
    # would otherwise leave no "ctr" at all, which the invariant below could
    # not tell from a lost one (seed 12345 kills the first writer 0.5 ms in).
    cache.set("ctr", 0)
    cs = stripe_of(cache, "ctr")
    stall = CTX.Value("d", 0.0, lock=False)
    stalls = []
    for it in range(iterations):
        ready = CTX.Event()
        acked.value = last
        w = CTX.Process(target=_chaos_writer, args=(cache_name, it, rng.random(), ready, acked))
        r = None
        ev0 = int(cache._table.stripes[cs, L.S_EVICTIONS // 8])
        rec0 = int(cache._table.stripes[cs, L.S_RECOVERIES // 8])
        try:
            w.start()
            assert ready.wait(JOIN)
            time.sleep(rng.uniform(0, 0.05))
            w.kill()
            w.join(JOIN)
            assert w.exitcode == -signal.SIGKILL, f"iteration {it}: writer saw a bad value"
            stall.value = 0.0
            r = CTX.Process(target=_chaos_recover, args=(cache_name, stripe_keys, stall))
            r.start()
            r.join(BOUND)
            assert r.exitcode == 0, f"iteration {it}: recovery hung or found a bad value"
            stalls.append(stall.value)
        finally:
            join_all([w] + ([r] if r else []), 1)
        problems = cache.check()
        assert problems == [], f"iteration {it}: {problems}"
        for k in CHAOS_KEYS:
            v = cache.get(k)
            assert v is None or bad_value(k, v) is None, (it, k, bad_value(k, v))
        # Read last, so "ctr" is the freshest entry of its stripe for LRU: the
        # next writer increments it long before it could become the oldest.
        ctr = cache.get("ctr")
        acked_now = acked.value
        st = cache._table.stripes[cs]
        diag = dict(it=it, ctr=ctr, acked=acked_now, evictions=int(st[L.S_EVICTIONS // 8]) - ev0,
                    recoveries=int(st[L.S_RECOVERIES // 8]) - rec0)
        # committed increments are never lost; at most one more was in flight
        assert ctr is not None and acked_now <= ctr <= acked_now + 1, diag
        last = ctr
    st = cache.stats()
    assert st["evictions"] > 0  # the small cache really was under pressure
    stalls.sort()
    print(f"{iterations} kills: longest write right after each (stall, ms): p50 "
          f"{stalls[len(stalls) // 2] * 1e3:.2f}, p99 {stalls[int(len(stalls) * 0.99)] * 1e3:.2f}, "
          f"max {stalls[-1] * 1e3:.2f}; {st['recoveries']} recoveries")
    return st


def _sequential_writer(name, wid, ready, acked):
    """Write keys w<wid>-0, -1, ... in order until killed; ``acked`` holds the
    last n whose set returned (so it is committed)."""
    cache = Cache(name, create=False)
    ready.set()
    n = 0
    while True:
        k = f"w{wid}-{n}"
        cache.set(k, make_value(k, wid, n, 60 + n % 200))
        acked.value = n
        n += 1


ROUNDS = 30


@pytest.mark.timeout(120)
def test_kill_storm_loses_no_committed_entry(make_cache, cache_name):
    """Two writers SIGKILLed at random under load, ROUNDS times: every entry whose
    set returned is there with its value, nothing beyond the one write in
    flight appeared or was lost, the cache is sound after each round. (The
    random kill loop above cannot tell a lost entry from an evicted one: this
    cache never evicts, and each round's keys are deleted once checked.)"""
    cache = make_cache(size="32MiB", stripes=8)
    rng = random.Random(7)
    acked = [CTX.Value("q", -1, lock=False) for _ in range(2)]
    for it in range(ROUNDS):
        ready = [CTX.Event() for _ in range(2)]
        ws = [CTX.Process(target=_sequential_writer, args=(cache_name, 2 * it + w, ready[w], acked[w]))
              for w in range(2)]
        try:
            for w, p in enumerate(ws):
                acked[w].value = -1
                p.start()
            assert all(e.wait(JOIN) for e in ready)
            for p in ws:
                time.sleep(rng.uniform(0, 0.01))
                p.kill()
            for p in ws:
                p.join(JOIN)
                assert p.exitcode == -signal.SIGKILL
        finally:
            join_all(ws, 1)
        for w in range(2):
            wid, last = 2 * it + w, acked[w].value
            keys = [f"w{wid}-{n}" for n in range(last + 3)]
            got = cache.get_many(keys)  # recovers a stripe a killed writer held
            for n, k in enumerate(keys):
                v = got.get(k)
                if n <= last:  # committed
                    assert v is not None and bad_value(k, v) is None, (it, k, last)
                elif n == last + 1:  # in flight when killed: there or not, never torn
                    assert v is None or bad_value(k, v) is None, (it, k)
                else:
                    assert v is None, (it, k, last)
            cache.delete_many(keys)
        if it % 10 == 9:  # a full check walks every dead entry too: not every round
            assert cache.check() == [], it
    st = cache.stats()
    assert st["evictions"] == 0, st["evictions"]
    print(f"{2 * ROUNDS} kills: {st['recoveries']} stripes recovered, no committed entry lost")


@pytest.mark.timeout(120)
def test_random_kill_loop(make_cache, cache_name):
    run_chaos(make_cache, cache_name, iterations=50, seed=1)


@pytest.mark.stress
@pytest.mark.timeout(1800)
def test_random_kill_loop_long(make_cache, cache_name):
    """Opt in: ``pytest -m stress tests/test_crash.py``; SHMCACHE_STRESS_SEED and
    SHMCACHE_STRESS_ITERATIONS (default 1000, about 2 minutes) to vary it."""
    seed = int(os.environ.get("SHMCACHE_STRESS_SEED", random.randrange(1 << 30)))
    print(f"seed={seed}")
    run_chaos(make_cache, cache_name, iterations=int(os.environ.get("SHMCACHE_STRESS_ITERATIONS", 1000)), seed=seed)


def test_regression_torn_bulk_expiry_index_write_loses_no_live_key(make_cache, fake_clock):
    """The daemon's bulk expiry rewrites the changed rows of a stripe's index
    slice in rewrite_order; killed after any row, recovery must leave every
    live key readable and check() clean. (One memcpy of the whole slice could
    write the tail first and lose keys whose old slot went before their new one.)"""
    import random

    from shmcache.expiry import place_slots, rewrite_order

    rng = random.Random(7)
    cache = make_cache(size="8MiB", stripes=1, max_items=8000, clock=fake_clock)
    live = {f"live{i}": f"v{i}".encode() for i in range(3000)}
    for i in range(3000):  # interleaved, so removing the expired ones shifts the live ones
        cache.set(f"live{i}", live[f"live{i}"])
        cache.set(f"old{i}", b"x", ttl=5)
    fake_clock.advance(10)
    t = cache._table
    words = t.raw_slots[0]
    cur = words.copy()
    rec = cur.view(L.SLOT_DTYPE).reshape(len(cur))
    new = place_slots(cur, ~((rec["expire"] > 0) & (rec["expire"] <= fake_clock.now)))
    changed = rewrite_order(cur, new)
    assert len(changed) > 1000  # the live entries really move
    for cut in sorted(rng.sample(range(len(changed)), 12)) + [len(changed) // 2]:
        words[:] = cur  # back to the state before the daemon's write
        cache._locks.lock(0)  # stand in for the daemon, then "die" after `cut` rows
        words[changed[:cut]] = new[changed[:cut]]
        t.repair(0)
        t.stripes[0, 0] += 1  # repair leaves the version even; unlock makes it even again
        cache._locks.unlock(0)
        assert cache.check() == [], cut
        assert {k: cache.get(k) for k in live} == live, cut
        cur = words.copy()  # repair may have moved rows: re-plan from here
        rec = cur.view(L.SLOT_DTYPE).reshape(len(cur))
        new = place_slots(cur, ~((rec["expire"] > 0) & (rec["expire"] <= fake_clock.now)))
        changed = rewrite_order(cur, new)


def test_repair_rehomes_an_unreachable_slot(make_cache):
    """A slot separated from its home by an empty slot (an index written in an
    unexpected order) is moved back where lookups find it."""
    cache = make_cache(size="1MiB", stripes=1)
    cache["a"] = b"1"
    t = cache._table
    words = t.raw_slots[0]
    i = int(np.nonzero(t.slots[0]["tag"])[0][0])
    far = (i + 5) % t.sps
    cache._locks.lock(0)
    words[far] = words[i]
    words[i] = 0
    t.repair(0)
    cache._locks.unlock(0)
    assert cache.check() == []
    assert cache["a"] == b"1"


def _key_with_home(t, home: int, prefix: str) -> str:
    """A key of stripe 0 whose index home slot is ``home``."""
    i = 0
    while True:
        k = f"{prefix}{i}"
        h = xxhash.xxh3_64_intdigest(encode_key(k))
        if h & t.mask == 0 and ((h >> 32) | 1) % t.sps == home:
            return k
        i += 1


def _as_if_recovered(cache, s, restore) -> None:
    """Put stripe s in the state ``restore()`` writes, as a writer SIGKILLed
    mid-mutation leaves it, and repair it the way a recoverer does."""
    cache._locks.lock(s)
    try:
        restore()
        cache._table.repair(s)
        cache._table.stripes[s, 0] += 1  # repair leaves the version even; unlock makes it even again
    finally:
        cache._locks.unlock(s)


def test_regression_bulk_expiry_reordering_a_cluster_loses_no_live_key(make_cache, fake_clock):
    """Bulk expiry placed kept entries sorted by home, which can move one past
    its old slot: cluster 4:B(home 4) 5:A(home 5) 6:C(home 4) became B, C, A,
    rows written 5, 6, ...; killed after row 5, A was gone for good. Clusters
    with interleaved homes (one wrapping around the index end), the write cut
    after every row: repair must keep every live key, and check() stay clean."""
    cache = make_cache(size="256KiB", stripes=1, max_items=30, clock=fake_clock)
    t = cache._table
    sps = t.sps
    assert sps >= 41
    # (name, home, expected slot after inserting in this order, expires?)
    plan = [
        ("B", 4, 4, False), ("A", 5, 5, False), ("C", 4, 6, False), ("X", 10, 10, True),  # the review's repro
        ("Y", 14, 14, True), ("D", 15, 15, False), ("E", 14, 16, False), ("F", 15, 17, False),
        ("P", 20, 20, False), ("Q", 20, 21, True), ("R", 21, 22, False), ("S", 20, 23, False), ("T", 22, 24, True),
        ("G", sps - 2, sps - 2, False), ("Z", sps - 1, sps - 1, True), ("H", sps - 2, 0, False), ("J", 0, 1, False),
    ]
    keys = {name: _key_with_home(t, home, name) for name, home, _at, _x in plan}
    live = {}
    for name, _home, _at, expires in plan:
        value = f"value of {name}".encode()
        cache.set(keys[name], value, ttl=5 if expires else None)
        if not expires:
            live[keys[name]] = value
    tags = t.slots[0]["tag"]
    for name, _home, at, _x in plan:  # the layout really is the one planned
        assert tags[at] == (xxhash.xxh3_64_intdigest(encode_key(keys[name])) >> 32) | 1, name
    fake_clock.advance(10)

    from shmcache.expiry import rewrite_order

    words = t.raw_slots[0]
    cur = words.copy()
    acct = t.stripes[0].copy()
    assert t.expire_bulk(0, fake_clock.now) == 5
    new = words.copy()
    changed = rewrite_order(cur, new)  # the order expire_bulk wrote the rows in
    for cut in range(len(changed) + 1):
        def torn():
            words[:] = cur
            t.stripes[0, 3:6] = acct[3:6]  # items, live bytes, ring as before the write
            words[changed[:cut]] = new[changed[:cut]]

        _as_if_recovered(cache, 0, torn)
        assert cache.check() == [], cut
        assert {k: cache.get(k) for k in live} == live, f"cut after {cut} of rows {changed.tolist()}"


@pytest.mark.parametrize("old, new", [
    (1234567, 2.5), (2.5, 1234567), (1234567, b"8 bytes!"), (1234567, "8 chars!"),
    (b"8 bytes!", 1234567), (1234567, 7654321),
])
def test_regression_torn_same_size_type_change_is_never_garbage(make_cache, monkeypatch, old, new):
    """An in-place overwrite at the same 8-byte length that changes the type
    wrote the value before the header: killed in between, header and slot still
    said "8-byte int" over the float's (or str's) bytes, and repair's torn-incr
    exemption kept that garbage as an int. Now the header goes first: after
    repair, at every point of the write, the key is absent or holds exactly
    the old or the new value."""
    import shmcache.cache

    monkeypatch.setattr(shmcache.cache, "USE_SPEEDUPS", False)  # the Python write path
    cache = make_cache(size="256KiB", stripes=1)
    cache["other"] = b"bystander"
    cache["k"] = old
    states, restore = _states_while(cache, 0, lambda: cache.set("k", new))
    assert len(states) >= 6  # entry header, key, value, checksum, slot, ring: out of place now
    for n, state in enumerate(states):
        _as_if_recovered(cache, 0, lambda: restore(state))
        assert cache.check() == [], n
        got = cache.get("k", KeyError)
        assert got is KeyError or (type(got), got) in ((type(old), old), (type(new), new)), (n, got)
        assert cache["other"] == b"bystander"
    assert cache["k"] == new


def _states_while(cache, s, fn):
    """Run ``fn()`` and return (states, restore): every distinct state of
    stripe s (index slice, access bits, arena, stripe accounting and ring)
    before each line the table's write path executes (reclaim and
    copy-forward included), and after. A line makes at most one store, so each
    is a state a SIGKILL could leave; ``restore(state)`` puts one back."""
    import shmcache.arena as A
    import shmcache.table as T

    g = cache._g
    mm = cache._seg.mm
    spans = [
        (g.index_off + s * g.slots_per_stripe * L.SLOT_SIZE, g.slots_per_stripe * L.SLOT_SIZE),
        (g.refs_off + s * g.slots_per_stripe, g.slots_per_stripe),
        (g.arena_off + s * g.stripe_arena, g.stripe_arena),
        (g.stripe_table_off + s * L.STRIPE_SIZE + L.S_ITEMS, L.S_RECOVERIES - L.S_ITEMS),
    ]
    codes = {f.__code__ for f in (
        T.Table.write, T.Table._write_locked, T.Table._write_entry, T.Table._drop, T.Table._delete_at,
        A.Arena._alloc, A.Arena._advance, A.Arena._reclaim, A.Arena._set_ring,
    )}
    states = []
    seen = set()

    def snap():
        st = tuple(mm[a : a + n] for a, n in spans)
        h = hash(st)
        if h not in seen:
            seen.add(h)
            states.append(st)

    def line(frame, event, arg):
        if event in ("line", "return"):
            snap()
        return line

    def call(frame, event, arg):
        return line if frame.f_code in codes else None

    prev = sys.gettrace()
    sys.settrace(call)
    try:
        fn()
    finally:
        sys.settrace(prev)
    snap()

    def restore(state):
        for (a, n), b in zip(spans, state):
            mm[a : a + n] = b

    return states, restore


@pytest.mark.parametrize("second_chance", [False, True], ids=["evicting", "copying-forward"])
def test_kill_mid_reclaim_loses_nothing_but_the_write(make_cache, monkeypatch, second_chance):
    """A write that seals the head and the writes whose steps reclaim the tail
    segment, killed at every store they make (eviction of the tail's cold
    entries, or copy-forward of its read ones to the head, the reclaim cursor):
    after repair the stripe checks clean, every
    key holds its own value or is gone, no key that was read (second chance)
    is lost, and keys outside the reclaimed segment are all still there."""
    import shmcache.cache

    monkeypatch.setattr(shmcache.cache, "USE_SPEEDUPS", False)  # the Python reference, traced line by line
    cache = make_cache(size="256KiB", stripes=1, max_clients=4)
    t = cache._table
    assert t.n_segs >= 4
    vals = {}
    i = 0
    while True:  # fill until every segment but the head's successor is used
        head, tail, fill = t._ring(0)
        if (head + 2) % t.n_segs == tail and fill + L.entry_alloc(8, 900) > t.seg_size:
            break  # the next write of 900+ bytes seals the head and reclaims the tail
        k = f"k{i:05d}"
        vals[k] = bytes([i % 251]) * (600 + i % 300)
        cache[k] = vals[k]
        i += 1
    tail = t._ring(0)[1]
    in_tail = [k for k in vals
               if int(t.slots[0]["loc"][t._find(0, (xxhash.xxh3_64_intdigest(encode_key(k)) >> 32) | 1,
                                                     encode_key(k))]) * L.ALIGN // t.seg_size == tail]
    assert len(in_tail) > 6
    hot = in_tail[::3] if second_chance else []
    for k in hot:
        assert cache[k] == vals[k]  # sets the access bit: copied forward, not evicted
    new = b"N" * 1000

    def write_until_reclaimed():
        # The write takes the last free segment; the tail's reclaim is then
        # pending and each following insert advances it by one step.
        cache.set("new", new)
        j = 0
        while (t._ring(0)[0] + 1) % t.n_segs == t._ring(0)[1]:
            cache.set(f"step{j}", b"s")
            j += 1
        assert j >= 1  # in steps: more than one write did the reclaim

    states, restore = _states_while(cache, 0, write_until_reclaimed)
    assert len(states) > 3 * len(in_tail)  # the whole reclaim was traced
    assert cache.stats()["evictions"] >= len(in_tail) - len(hot)
    for n, state in enumerate(states):
        _as_if_recovered(cache, 0, lambda: restore(state))
        assert cache.check() == [], n
        got = {k: cache.get(k) for k in vals}
        assert all(v is None or v == vals[k] for k, v in got.items()), n
        assert all(got[k] == vals[k] for k in hot), n
        assert all(got[k] == vals[k] for k in vals if k not in in_tail), n
        assert cache.get("new") in (None, new), n
        # The recovery finished the interrupted reclaim: a segment is free again,
        # so the next advance cannot make the tail (live entries) the head.
        head, tail, _fill = t._ring(0)
        assert (head + 1) % t.n_segs != tail, n
        if n % 8 == 0:  # and writing on through two more advances keeps every survivor
            survivors = {k: v for k, v in got.items() if v is not None}
            for j in range(2 * t.seg_size // 1000):
                cache[f"after{j}"] = b"a" * 900
            assert cache.check() == [], n
            assert all(cache.get(k) in (None, v) for k, v in survivors.items()), n
    assert cache["new"] == new


def _damage(cache, rnd):
    """Damage stripe 0 the ways a killed writer (or a stray byte) can, at
    random: a torn head entry, a torn int, a wrong tag, a location outside
    the segments, an implausible header, a duplicated and an unreachable slot,
    a flipped byte in an old (non-head) entry."""
    t = cache._table
    mm = cache._seg.mm
    head = t._ring(0)[0]
    sl = t.slots[0]
    occ = np.nonzero(sl["tag"] != 0)[0].tolist()
    rnd.shuffle(occ)
    ab = t.arena_off
    ints = [i for i in occ if L.ENTRY.unpack_from(mm, ab + int(sl["loc"][i]) * L.ALIGN)[3] == 2]
    in_head = [i for i in occ if int(sl["loc"][i]) * L.ALIGN // t.seg_size == head and i not in ints]
    old = [i for i in occ if i not in in_head and i not in ints]

    def byte(i, at):  # flip one byte of slot i's entry, `at` bytes in
        a = ab + int(sl["loc"][i]) * L.ALIGN + at
        mm[a] ^= 0x5A

    byte(in_head[0], L.ENTRY_HEADER + 3)  # torn head entry
    byte(old[0], L.ENTRY_HEADER + 5)  # a stray byte in an old entry
    byte(ints[0], L.ENTRY_HEADER + 2)  # torn incr
    sl["tag"][old[1]] ^= 0x100  # wrong tag
    sl["loc"][old[2]] = t.n_segs * t.seg_size // L.ALIGN + 7  # outside the arena
    L.ENTRY.pack_into(mm, ab + int(sl["loc"][old[3]]) * L.ALIGN, 0, 10**6, 3, 0, 0)  # implausible header
    empty = int(np.nonzero(sl["tag"] == 0)[0][0])
    t.raw_slots[0][empty] = t.raw_slots[0][old[4]]  # the same slot twice
    return head


@pytest.mark.parametrize("seed", range(3))
def test_vectorized_repair_matches_the_per_slot_reference(make_cache, monkeypatch, seed):
    """repair() is a writer's stall after a SIGKILL: it judges every slot with
    numpy and the C accelerator's entry_sums (~0.5 us per entry instead of
    ~7: 80 ms -> 4 ms for a 64 MiB cache's stripe). The per-slot Python loop
    (used without the accelerator) is the reference: on the same damage both
    report the same problems and leave the same bytes."""
    import shmcache.repair as R

    rnd = random.Random(seed)
    c = make_cache(size="1MiB", stripes=1)
    for i in range(3000):
        if i % 7:
            c[f"k{i}"] = bytes([i % 251]) * (50 + i % 200)
        else:
            c[f"k{i}"] = i
            c.incr(f"k{i}")  # in place
    _damage(c, rnd)
    g = c._g
    span = (g.index_off, g.total_size)
    before = bytes(c._seg.mm[span[0] : span[1]])
    results = []
    for sums in (R._entry_sums, None):
        monkeypatch.setattr(R, "_entry_sums", sums)
        c._seg.mm[span[0] : span[1]] = before
        problems = c.check()
        assert problems, "the damage must show"
        t = c._table
        c._locks.lock(0)
        try:
            dropped = t.repair(0)  # a recoverer's: checksums where writers write
        finally:
            c._locks.unlock(0)
        left = t.check(0)
        admin.repair(c, 0)  # every checksum
        # what a killed writer cannot have torn (a stray byte in an old entry) is
        # left to check and the full repair
        assert len(left) == 1 and "checksum mismatch" in left[0], left
        results.append((problems, dropped, left, bytes(c._seg.mm[span[0] : span[1]])))
        assert c.check() == []
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1] >= 5
    assert results[0][2:] == results[1][2:]


def test_a_recovery_imports_nothing_new(cache_name):
    """The first recovery in a process spent ~23 ms importing numpy.ma
    (np.isin's first call, in the segment-chain repair), inside the stall of
    the writer that found the lock holder dead: 17-22 ms of a 2 MiB cache's
    ~20 ms stall. A recovery must run on what attaching already imported."""
    code = """
import sys
from shmcache import Cache
c = Cache(sys.argv[1], size="2MiB")
for i in range(20000):
    c.set(f"k{i}", b"v" * 300)
before = set(sys.modules)
c._locks.lock(0)
try:
    c._table.repair(0)
finally:
    c._locks.unlock(0)
new = sorted(set(sys.modules) - before)
assert not new, new
c.close()
"""
    r = subprocess.run([sys.executable, "-c", code, cache_name], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
