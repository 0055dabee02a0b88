"""Capacity: LRU eviction, compaction, expiry before eviction, noeviction, max_items.

Small caches (1 MiB, one or four stripes) on the fake clock, so "recently
used" is decided by clock steps, not by timing.
"""

from __future__ import annotations

import random

import pytest

from shmcache import CacheFull, admin
from shmcache import layout as L


def _snapshot(c):
    st = c.stats()
    return sorted(c.items(), key=repr), {k: st[k] for k in ("items", "bytes_used", "bytes_garbage", "evictions")}


@pytest.mark.parametrize("stripes", [1, 4])
def test_lru_accepts_writes_far_beyond_capacity(make_cache, fake_clock, stripes):
    c = make_cache(size="1MiB", stripes=stripes, clock=fake_clock)
    arena = c.stats()["arena_bytes"]
    rng = random.Random(stripes)
    model = {}
    written = 0
    n = 0
    while written < 10 * arena:
        k = f"k{n}"
        v = rng.randbytes(rng.randrange(50, 5000))
        assert c.set(k, v) is True
        assert c[k] == v  # the entry just written is always there
        model[k] = v
        written += len(v)
        n += 1
        fake_clock.advance(0.01)
        if n % 500 == 0:
            assert c.check() == []
    st = c.stats()
    assert st["evictions"] > 0
    assert st["items"] == len(c) == n - st["evictions"]  # every key written once: items = writes - evictions
    assert st["bytes_used"] <= arena
    items = dict(c.items())
    assert all(model[k] == v for k, v in items.items())  # survivors hold their own value, never garbage
    assert c.check() == []


def _fill_until_first_reclaim(c, prefix, value, clock) -> list[str]:
    """Write new keys until the ring runs out of free segments and the first
    reclaim evicts (the oldest segment, nothing read yet); return the keys
    still stored, oldest first: a full cache's working set."""
    n = 0
    while c.stats()["evictions"] == 0:
        c[f"{prefix}{n}"] = value
        n += 1
        clock.advance(0.001)
    alive = set(c.keys())
    return [f"{prefix}{i}" for i in range(n) if f"{prefix}{i}" in alive]


def test_recently_read_keys_survive(make_cache, fake_clock):
    c = make_cache(size="1MiB", stripes=1, clock=fake_clock)
    value = b"x" * 1000
    olds = _fill_until_first_reclaim(c, "old", value, fake_clock)
    ev0 = c.stats()["evictions"]
    fake_clock.advance(10)
    hot = olds[::4]
    cold = [k for i, k in enumerate(olds) if i % 4]
    for _ in range(3):  # read the hot subset repeatedly, the clock moving on each round
        for k in hot:
            assert c[k] == value
        fake_clock.advance(10)
    n = len(olds)
    for j in range(n // 2):  # churn: half the capacity in new keys
        c[f"new{j}"] = value
        fake_clock.advance(0.001)
    assert c.stats()["evictions"] - ev0 >= n // 4  # the churn did evict (a segment at a time)
    alive = set(c.keys())
    hot_rate = sum(k in alive for k in hot) / len(hot)
    cold_rate = sum(k in alive for k in cold) / len(cold)
    assert hot_rate >= 0.95, (hot_rate, cold_rate)
    assert cold_rate <= 0.5, (hot_rate, cold_rate)
    assert c.check() == []


def test_written_keys_count_as_recent(make_cache, fake_clock):
    c = make_cache(size="1MiB", stripes=1, clock=fake_clock)
    ks = _fill_until_first_reclaim(c, "k", b"v" * 500, fake_clock)
    n = len(ks)
    fake_clock.advance(10)
    rewritten = ks[::5]
    for k in rewritten:
        c[k] = b"w" * 500  # an overwrite is an access too
    fake_clock.advance(10)
    for j in range(n // 3):
        c[f"new{j}"] = b"n" * 500
        fake_clock.advance(0.001)
    alive = set(c.keys())
    assert sum(k in alive for k in rewritten) / len(rewritten) >= 0.95
    assert all(c[k] == b"w" * 500 for k in rewritten if k in alive)


@pytest.mark.parametrize("stripes", [1, 4])
def test_overwrites_of_changing_sizes_under_churn(make_cache, fake_clock, stripes):
    c = make_cache(size="1MiB", stripes=stripes, clock=fake_clock)
    rng = random.Random(7 + stripes)
    model = {}
    compactions = 0
    garbage = 0
    for step in range(2500):
        k = f"c{rng.randrange(700)}"
        r = rng.random()
        if r < 0.05:
            c.delete(k)
            model.pop(k, None)
        elif r < 0.10 and isinstance(model.get(k), int) and k in c:
            model[k] = c.incr(k, 3)
            assert model[k] == c[k]
        else:
            v = rng.choice([step, rng.randbytes(rng.choice([1, 8, 30, 200, 1500, 6000, 12000]))])
            c[k] = v
            model[k] = v
            assert c[k] == v
        fake_clock.advance(0.01)
        g = c.stats()["bytes_garbage"]
        if g < garbage:  # only compaction gives garbage back
            compactions += 1
        garbage = g
    assert compactions > 0  # the churn really did force compaction
    assert c.stats()["evictions"] > 0
    items = dict(c.items())
    assert items  # something survived
    for k, v in items.items():
        assert model[k] == v, k
    assert c.check() == []


def test_noeviction_raises_cachefull_and_changes_nothing(make_cache, fake_clock):
    c = make_cache(size="1MiB", stripes=1, policy="noeviction", clock=fake_clock)
    n = 0
    with pytest.raises(CacheFull) as ei:
        while True:
            c[f"k{n}"] = b"x" * 1000
            n += 1
    msg = str(ei.value)
    assert "size" in msg and "max_items" in msg and "lru" in msg
    assert f"k{n}" not in c
    assert n > 500
    before = _snapshot(c)
    for attempt in (lambda: c.set("another", b"y" * 1000), lambda: c.add("another", b"y" * 1000),
                    lambda: c.set_many({"another": b"y" * 2000}), lambda: c.set("k0", b"z" * 5000)):
        with pytest.raises(CacheFull):
            attempt()
        assert _snapshot(c) == before
    assert c["k0"] == b"x" * 1000
    assert c.stats()["evictions"] == 0
    assert c.check() == []
    # deleting makes room again (and nothing was evicted meanwhile)
    for i in range(5):
        del c[f"k{i}"]
    c["another"] = b"y" * 1000
    assert c["another"] == b"y" * 1000
    assert len(c) == n - 5 + 1
    assert c.check() == []


def test_noeviction_reclaims_expired_entries(make_cache, fake_clock):
    c = make_cache(size="1MiB", stripes=1, policy="noeviction", clock=fake_clock)
    n = 0
    with pytest.raises(CacheFull):
        while True:
            c.set(f"t{n}", b"x" * 1000, ttl=10)
            n += 1
    fake_clock.advance(10)
    for i in range(n // 2):
        c[f"k{i}"] = b"y" * 1000
    st = c.stats()
    assert st["evictions"] == 0 and st["expirations"] >= n // 2
    assert len(c) == n // 2
    assert c.check() == []


def test_regression_noeviction_cachefull_after_reclaiming_expired(make_cache, fake_clock):
    c = make_cache(size="256KiB", stripes=1, policy="noeviction", clock=fake_clock)
    for i in range(5):
        c.set(f"t{i}", b"", ttl=5)  # small expiring entries: reclaiming them frees too little
    with pytest.raises(CacheFull):
        for i in range(10_000):
            c[f"k{i}"] = b"y" * 1000
    fake_clock.advance(10)
    with pytest.raises(CacheFull):
        c["big"] = b"z" * 2000
    assert c.check() == []
    # the accounting still counts what is stored (the 5 expired ones included
    # until their segment is reclaimed or the daemon's expiry drops them)
    assert c.stats()["items"] == len(list(admin.entries(c, include_expired=True)))
    assert admin.expire(c) == 5 and c.stats()["items"] == len(c)


@pytest.mark.parametrize("stripes", [1, 4])
def test_expired_entries_are_reclaimed_before_eviction(make_cache, fake_clock, stripes):
    c = make_cache(size="1MiB", stripes=stripes, clock=fake_clock)
    keep = {f"keep{i}": bytes([i]) * 500 for i in range(20)}
    c.set_many(keep)
    n_segs = admin.geometry(c).n_segs
    n = 0
    # until some stripe's ring is one segment short of wrapping (its last free
    # segment is reclaim's): a full arena, without evicting yet
    while max(c.stats()["stripe_fill"]) < (n_segs - 2) / n_segs:
        c.set(f"ttl{n}", b"t" * 1000, ttl=30)
        n += 1
    assert c.stats()["evictions"] == 0
    fake_clock.advance(60)  # every ttl key is now expired, none read or touched
    # The daemon's expiry (admin.expire on a timer) drops the expired slots;
    # their bytes are then dead, and reclaim compacts instead of evicting.
    assert admin.expire(c) == n
    for j in range(n // 2):  # more than the free room: the expired entries must make way
        c[f"new{j}"] = b"n" * 1000
        fake_clock.advance(0.001)
    st = c.stats()
    assert st["evictions"] == 0
    assert st["expirations"] > 0
    assert all(c.get(k) == v for k, v in keep.items())
    assert all(f"new{j}" in c for j in range(n // 2))
    assert len(c) == len(keep) + n // 2
    assert c.check() == []


@pytest.mark.parametrize("stripes", [1, 4])
def test_max_items_triggers_eviction(make_cache, fake_clock, stripes):
    c = make_cache(size="1MiB", stripes=stripes, max_items=64, clock=fake_clock)
    cap = c.stats()["max_items"]
    assert 64 <= cap < 64 + stripes
    for i in range(500):
        c[f"k{i}"] = i  # tiny values: bytes never run out, the item cap does
        fake_clock.advance(0.001)
        assert len(c) <= cap
        assert c[f"k{i}"] == i
    st = c.stats()
    assert st["evictions"] > 0
    assert st["items"] == 500 - st["evictions"]
    assert st["bytes_free"] > st["arena_bytes"] // 2
    assert all(c[k] == int(k[1:]) for k in c.keys())
    assert c.check() == []


def test_max_items_with_noeviction(make_cache):
    c = make_cache(size="1MiB", stripes=1, max_items=32, policy="noeviction")
    for i in range(32):
        c[f"k{i}"] = i
    before = _snapshot(c)
    with pytest.raises(CacheFull, match="max_items"):
        c["k32"] = 32
    assert _snapshot(c) == before
    c["k0"] = "overwrite is not a new item"
    assert c["k0"] == "overwrite is not a new item"
    assert c.check() == []

# The compaction regression tests that stood here (an overwrite compacting
# twice, a memmove onto itself) went with compaction: the segment-ring arena
# (shmcache/arena.py) never moves an entry onto itself and never compacts a
# whole stripe. Its own tests are in test_arena.py.
