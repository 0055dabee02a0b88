"""The table's own guarantees that no public call shows directly: a locked
mutation interrupted by an unexpected exception leaves its stripe sound, and
clear() holds every stripe lock while it empties the cache and bumps the
generation.

The Python write path is forced (``USE_SPEEDUPS`` off), since the faults are
injected into ``Table`` methods.
"""

from __future__ import annotations

import pytest

import shmcache.cache
from shmcache import admin
from shmcache import layout as L


@pytest.fixture
def py_cache(make_cache, fake_clock, monkeypatch):
    monkeypatch.setattr(shmcache.cache, "USE_SPEEDUPS", False)

    def make(**kw):
        return make_cache(size="1MiB", stripes=1, clock=fake_clock, **kw)

    return make


def _fail_once(monkeypatch, obj, name, after=False):
    """Make ``obj.name`` raise KeyboardInterrupt on its next call (``after``:
    once the real call has run), then behave normally."""
    real = getattr(obj, name)
    armed = [True]

    def wrapper(*args, **kw):
        if not armed[0]:
            return real(*args, **kw)
        armed[0] = False
        if after:
            real(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(obj, name, wrapper)


def _fill(c, n=50, value=b"v" * 100):
    c.set_many({f"k{i}": value for i in range(n)})


OPS = {
    "set new key": lambda c: c.set("new", b"x" * 50),
    "set_many": lambda c: c.set_many({"new": b"x", "new2": b"y"}),
    "overwrite out of place": lambda c: c.set("k1", b"y" * 500),
    "pop": lambda c: c.pop("k1"),
    "delete": lambda c: c.delete("k1"),
    "delete_many": lambda c: c.delete_many(["k1", "k2", "k3"]),
    "incr new key": lambda c: c.incr("counter"),
    "clear": lambda c: c.clear(),
    "sweep_expired": lambda c: c._table.sweep_expired(0, c._clock() + 100, 10),
}


@pytest.mark.parametrize("op", list(OPS))
def test_regression_interrupt_mid_mutation_leaves_accounting_sound(py_cache, monkeypatch, op):
    """A KeyboardInterrupt (or MemoryError...) after the slots changed but
    before the accounting was saved left the stripe's item and byte counts
    stale. Now the stripe is repaired before the lock is released."""
    c = py_cache()
    _fill(c)
    c.set_many({f"exp{i}": b"e" for i in range(5)}, ttl=1)
    # the step after which the accounting is stale: a write's publish (then the
    # ring and byte counts follow), a removal's slot shift, clear's first stripe
    hook = {"clear": "_empty_stripe"}.get(op, "_set_ring" if "set" in op or "incr" in op or "overwrite" in op else "_delete_at")
    _fail_once(monkeypatch, c._table, hook, after=True)
    with pytest.raises(KeyboardInterrupt):
        OPS[op](c)
    assert c.check() == []
    c["after"] = b"ok"  # the lock was released and the stripe is usable
    assert c["after"] == b"ok" and c.check() == []


def test_regression_interrupt_after_eviction_leaves_accounting_sound(py_cache, monkeypatch, fake_clock):
    """Interrupted after LRU eviction removed entries (the write making room),
    before the accounting was saved: the item count went stale. (Now: after
    a segment reclaim, before the write that needed it.)"""
    c = py_cache()
    value = b"v" * 4000
    _fail_once(monkeypatch, c._table, "_reclaim", after=True)
    n = 0
    with pytest.raises(KeyboardInterrupt):
        for n in range(10 * c._g.stripe_arena // len(value)):  # the ring fills: a write reclaims
            c[f"k{n}"] = value
            fake_clock.advance(1)
    assert c.check() == []
    assert all(c.get(f"k{i}", value) == value for i in range(n))  # evicted or intact
    c["big"] = b"b" * 10000
    assert c.check() == [] and c["big"] == b"b" * 10000


def test_deliberate_errors_do_not_repair(py_cache, monkeypatch):
    """KeyError / TypeError / CacheFull are raised before anything changes:
    they must not cost a repair of the whole stripe."""
    c = py_cache()
    c["s"] = "text"
    calls = []
    real = c._table._repair_or_empty
    monkeypatch.setattr(c._table, "_repair_or_empty", lambda s: calls.append(s) or real(s))
    with pytest.raises(TypeError):
        c.incr("s")
    with pytest.raises(KeyError):
        c.incr("missing", default=None)
    assert calls == []


def test_regression_clear_bumps_generation_under_every_stripe_lock(make_cache, monkeypatch):
    """clear() bumped the generation after releasing the stripe locks (an
    unguarded read-modify-write two clears could race on). Now it takes every
    stripe lock in ascending order, clears, bumps, and releases in reverse."""
    c = make_cache(size="1MiB", stripes=4)
    c.set_many({f"k{i}": i for i in range(100)})
    locks = c._locks
    gen = lambda: L.U64.unpack_from(c._seg.mm, L.H_GENERATION)[0]  # noqa: E731
    g0 = gen()
    events = []
    real_lock, real_unlock = locks.lock, locks.unlock
    monkeypatch.setattr(locks, "lock", lambda s: (real_lock(s), events.append(("lock", s, gen())))[0])
    monkeypatch.setattr(locks, "unlock", lambda s: (events.append(("unlock", s, gen())), real_unlock(s))[0])
    assert c.clear() == 100
    n = admin.geometry(c).n_stripes
    assert events == [("lock", s, g0) for s in range(n)] + [("unlock", s, g0 + 1) for s in reversed(range(n))]
    monkeypatch.undo()
    assert len(c) == 0 and c.check() == [] and c.stats()["generation"] == g0 + 1


def test_clear_releases_the_locks_it_took_when_one_times_out(make_cache, monkeypatch):
    from shmcache import LockTimeout

    c = make_cache(size="1MiB", stripes=4)
    c.set_many({f"k{i}": i for i in range(100)})
    locks = c._locks
    real_lock = locks.lock

    def lock(s):
        if s == 2:
            raise LockTimeout("stripe 2 held")
        real_lock(s)

    monkeypatch.setattr(locks, "lock", lock)
    with pytest.raises(LockTimeout):
        c.clear()
    monkeypatch.undo()
    assert len(c) == 100 and c.check() == []  # nothing cleared, every lock free again
    c["x"] = 1
    assert c.clear() == 101


@pytest.mark.parametrize("s", [1, 3])
def test_regression_pure_python_read_uses_its_own_stripes_seqlock(make_cache, monkeypatch, s):
    """When stripe records grew to two cache lines (lock waits), the Python
    read path still found stripe s's seqlock version at s * 64: for s >= 1
    it read another stripe's words, which no writer of stripe s changes, so a
    lock-free read during a write returned the half-written value. A read
    that overlaps a write must wait for it and return the whole value."""
    import threading
    import time

    from test_crash import keys_in_stripe

    monkeypatch.setattr(shmcache.cache, "USE_SPEEDUPS", False)
    c = make_cache(size="1MiB", stripes=4)
    k = keys_in_stripe(4, s, 1)[0]
    c[k] = b"A" * 200
    t = c._table
    i = t._find(s, (__import__("xxhash").xxh3_64_intdigest(k.encode()) >> 32) | 1, k.encode())
    a = t.arena_off + s * t.stripe_arena + int(t.slots[s]["loc"][i]) * L.ALIGN + L.ENTRY_HEADER + len(k)
    mm = c._seg.mm
    holding, done = threading.Event(), threading.Event()

    def writer():  # a write in progress: version odd, value half overwritten
        c._locks.lock(s)
        try:
            mm[a : a + 100] = b"B" * 100
            holding.set()
            time.sleep(0.3)
            mm[a : a + 100] = b"A" * 100  # (this write puts the value back)
        finally:
            c._locks.unlock(s)
            done.set()

    th = threading.Thread(target=writer)
    th.start()
    assert holding.wait(10)
    got = c.get(k)
    th.join(10)
    assert done.is_set() and got == b"A" * 200
