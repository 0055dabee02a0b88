"""The C fast paths (shmcache/_speedups.c) against the pure-Python reference.

Every operation is run on two caches with the same fake clock, one through
the C paths and one through Python, and must give the same results; and both
implementations must read each other's writes in one segment.
"""

import multiprocessing as mp
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmcache.cache as cache_mod
from shmcache import Cache, admin
from names import fresh_name

needs_c = pytest.mark.skipif(cache_mod._speedups is None, reason="C accelerator not built")


def test_accelerator_built_when_required():
    """`make test` sets SHMCACHE_REQUIRE_SPEEDUPS=1: a silently missing build fails CI."""
    if os.environ.get("SHMCACHE_REQUIRE_SPEEDUPS"):
        assert cache_mod._speedups is not None, "shmcache._speedups did not build"
        assert cache_mod.USE_SPEEDUPS


def open_pair(name, clock, **kw):
    """(C cache, Python cache) on two separate segments."""
    c = Cache(name + "-c", clock=clock, **kw)
    old = cache_mod.USE_SPEEDUPS
    cache_mod.USE_SPEEDUPS = False
    try:
        p = Cache(name + "-p", clock=clock, **kw)
    finally:
        cache_mod.USE_SPEEDUPS = old
    return c, p


keys = st.one_of(st.sampled_from(["a", "b", "key:1", "ключ", ""]), st.binary(max_size=6))
values = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=50),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.none(),
    st.lists(st.integers(), max_size=3),
)
ttls = st.one_of(st.none(), st.floats(min_value=0.5, max_value=20))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, values, ttls),
        st.tuples(st.just("add"), keys, values, ttls),
        st.tuples(st.just("replace"), keys, values, ttls),
        st.tuples(st.just("get"), keys),
        st.tuples(st.just("contains"), keys),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("pop"), keys),
        st.tuples(st.just("incr"), keys, st.integers(-(2**64), 2**64)),
        st.tuples(st.just("touch"), keys, ttls),
        st.tuples(st.just("advance"), st.floats(0, 10)),
    ),
    max_size=60,
)


def apply(cache, op, clock):
    name = op[0]
    try:
        if name == "set":  # both call spellings reach the same fast path
            return cache.set(op[1], op[2], ttl=op[3]) if op[3] else cache.set(op[1], op[2], op[3])
        if name == "add":
            return cache.add(op[1], op[2], ttl=op[3])
        if name == "replace":
            return cache.replace(op[1], op[2], ttl=op[3])
        if name == "get":
            return ("v", cache.get(op[1], "<missing>"))
        if name == "contains":
            return op[1] in cache
        if name == "delete":
            return cache.delete(op[1])
        if name == "pop":
            return cache.pop(op[1], "<missing>")
        if name == "incr":
            return cache.incr(op[1], op[2]) if op[2] % 2 else cache.incr(op[1], delta=op[2], default=5)
        if name == "touch":
            return cache.touch(op[1], op[2])
    except Exception as e:  # the same error type from both paths
        return ("error", type(e).__name__)
    raise AssertionError(name)


@needs_c
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_c_and_python_paths_agree(ops, fake_clock):
    name = fresh_name("diff")
    c, p = open_pair(name, fake_clock, size="1MiB")
    try:
        assert admin.accelerated(c) and not admin.accelerated(p)
        for op in ops:
            if op[0] == "advance":
                fake_clock.advance(op[1])
                continue
            assert apply(c, op, fake_clock) == apply(p, op, fake_clock), op
        assert sorted(c.items(), key=repr) == sorted(p.items(), key=repr)
        assert len(c) == len(p)
        assert c.check() == [] and p.check() == []
        sc, sp = c.stats(), p.stats()
        for k in ("hits", "misses", "sets", "deletes", "items", "bytes_used"):
            assert sc[k] == sp[k], k
    finally:
        for x in (c, p):
            x.close()
        Cache.unlink(name + "-c")
        Cache.unlink(name + "-p")


@needs_c
def test_both_paths_share_one_segment(cache_name):
    """A C-path and a Python-path handle on one segment read each other's writes."""
    fast = Cache(cache_name, size="4MiB")
    cache_mod.USE_SPEEDUPS = False
    try:
        slow = Cache(cache_name)
    finally:
        cache_mod.USE_SPEEDUPS = True
    try:
        assert admin.accelerated(fast) and not admin.accelerated(slow)
        for i in range(500):
            (fast if i % 2 else slow)[f"k{i}"] = i
        for i in range(500):
            assert (slow if i % 2 else fast)[f"k{i}"] == i
        fast["n"] = 0
        for i in range(100):
            (fast if i % 3 else slow).incr("n")
        assert slow["n"] == fast["n"] == 100
        assert fast.delete("k1") and "k1" not in slow
        assert fast.check() == []
    finally:
        fast.close()
        slow.close()


def _incr_worker(name, pure, n):
    cache_mod.USE_SPEEDUPS = not pure
    c = Cache(name, create=False)
    for _ in range(n):
        c.incr("n")
        c.set("k", b"x" * (n % 200))
    c.close()


@needs_c
@pytest.mark.timeout(120)
def test_mixed_processes_exact_incr(cache_name):
    """C and Python writers in different processes contend on one stripe: no lost update."""
    c = Cache(cache_name, size="1MiB", stripes=1)
    try:
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_incr_worker, args=(cache_name, i % 2 == 0, 3000)) for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(90)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        assert c["n"] == 12000
        assert c.check() == []
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        c.close()


class _CountingSerializer:
    """json with a call counter: shows how often a value gets encoded."""

    def __init__(self):
        self.dumps_calls = 0

    def dumps(self, obj):
        import json

        self.dumps_calls += 1
        return json.dumps(obj)

    def loads(self, data):
        import json

        return json.loads(data)


@needs_c
def test_regression_fallback_does_not_encode_twice(cache_name):
    """When the C path hands a store over to Python (the stripe needs eviction
    or compaction, or its lock is busy), it passes the already-encoded entry:
    each value is serialized once, and the data and counters stay right."""
    ser = _CountingSerializer()
    c = Cache(cache_name, size="256KiB", stripes=1, serializer=ser)
    try:
        n = 3000  # far beyond what fits: most stores evict and compact on the Python path
        for i in range(n):
            c.set(f"k{i}", {"i": i, "pad": "x" * 60})
        c.add("fresh", {"i": -1})
        assert ser.dumps_calls == n + 1
        assert c.stats()["evictions"] > 0 and c.stats()["sets"] == n + 1
        assert c.get(f"k{n - 1}") == {"i": n - 1, "pad": "x" * 60}
        assert c["fresh"] == {"i": -1}
        assert c.check() == []
        # a busy stripe: another handle of this process holds the lock, so
        # the lock word's compare-and-swap fails and the store waits on the Python path
        other = Cache(cache_name)
        admin.storage(other).locks.lock(0)
        import threading

        t = threading.Timer(0.2, admin.storage(other).locks.unlock, args=(0,))
        t.start()
        c.set("busy", {"i": 7})
        t.join()
        other.close()
        assert ser.dumps_calls == n + 2 and c["busy"] == {"i": 7}
    finally:
        c.close()


_AVX2_CHILD = """
import os, sys, xxhash
from shmcache import Cache, _speedups
for n in (0, 240, 241, 4096, 16385):
    b = os.urandom(n)
    assert _speedups.xxh3_64(b) == xxhash.xxh3_64_intdigest(b), n
c = Cache(sys.argv[1])
for n in (300, 5000, 16000):
    assert c.get(f"parent{n}") == bytes([n % 251]) * n, n
    c.set(f"child{n}", bytes([n % 13]) * n)
c.close()
"""


@pytest.mark.skipif(cache_mod._speedups is None, reason="needs the C accelerator")
def test_entry_checksums_agree_with_and_without_the_avx2_hash(cache_name):
    """Entry checksums are xxh3 (layout 5), computed by a run-time chosen AVX2
    loop on long entries where the CPU has one: a process without it (or with
    SHMCACHE_NO_AVX2, or the pure-Python core) must compute the same sums, or
    every get of another process's long value would read as damage."""
    import subprocess
    import sys

    c = Cache(cache_name, size="8MiB")
    try:
        for n in (300, 5000, 16000):
            c.set(f"parent{n}", bytes([n % 251]) * n)
        env = {**os.environ, "SHMCACHE_NO_AVX2": "1"}
        r = subprocess.run([sys.executable, "-c", _AVX2_CHILD, cache_name], env=env, timeout=60,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        for n in (300, 5000, 16000):
            assert c.get(f"child{n}") == bytes([n % 13]) * n
        assert c.check() == []
    finally:
        c.close()
