"""Cache.get_raw / update_raw / scan: the public entry points adapters (the
RESP server) use instead of the table's internals."""

import multiprocessing as mp

import pytest

from shmcache import Cache
from shmcache.codec import BYTES, INT, PICKLE, STR
from shmcache.errors import KeyTooLong, ValueTooLarge


def test_get_raw_gives_tag_payload_and_deadline_without_decoding(make_cache, fake_clock):
    cache = make_cache(clock=fake_clock)
    cache.set("s", "hé", ttl=10)
    cache["i"] = 7
    cache["p"] = {"x": 1}
    assert cache.get_raw("s") == (STR, "hé".encode(), fake_clock.now + 10)
    assert cache.get_raw("i")[0] == INT
    assert cache.get_raw("p")[0] == PICKLE
    assert cache.get_raw("missing") is None
    fake_clock.advance(11)
    assert cache.get_raw("s") is None


def test_get_raw_many_is_get_raw_of_each_key_in_order(make_cache, fake_clock):
    cache = make_cache(clock=fake_clock, max_key_size=16)
    cache.set("s", "hé", ttl=10)
    cache[b"\xffb"] = b"bin"
    cache["i"] = 7
    cache["p"] = {"x": 1}
    keys = ["s", b"\xffb", "missing", "i", "p"]
    assert cache.get_raw_many(keys) == [cache.get_raw(k) for k in keys]
    assert cache.get_raw_many(keys)[:3] == [(STR, "hé".encode(), fake_clock.now + 10), (BYTES, b"bin", 0.0), None]
    assert cache.get_raw_many([]) == []
    fake_clock.advance(11)
    assert cache.get_raw_many(["s"]) == [None]
    with pytest.raises(KeyTooLong, match="max_key_size=16"):
        cache.get_raw_many(["i", "k" * 17])
    with pytest.raises(TypeError):
        cache.get_raw_many(["i", 5])


def test_update_raw_stores_deletes_and_leaves_alone(cache):
    assert cache.update_raw("k", lambda cur: (BYTES, b"v", 0.0)) == (BYTES, b"v", 0.0)
    assert cache["k"] == b"v"
    seen = []
    assert cache.update_raw("k", lambda cur: seen.append(cur)) is None
    assert seen == [(BYTES, b"v", 0.0)] and cache["k"] == b"v"
    assert cache.update_raw("k", lambda cur: Cache.DELETE) is Cache.DELETE
    assert "k" not in cache
    assert cache.update_raw("k", lambda cur: Cache.DELETE) is Cache.DELETE  # absent: a no-op


def test_update_raw_that_raises_or_returns_garbage_changes_nothing(cache):
    cache["k"] = b"old"

    def boom(cur):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.update_raw("k", boom)
    with pytest.raises(ValueTooLarge, match="max_value_size"):
        cache.update_raw("k", lambda cur: (BYTES, b"x" * (cache.stats()["max_value_size"] + 1), 0.0))
    with pytest.raises(ValueError, match="tag"):
        cache.update_raw("k", lambda cur: (99, b"x", 0.0))
    with pytest.raises(TypeError, match="bytes"):
        cache.update_raw("k", lambda cur: (BYTES, "str", 0.0))
    with pytest.raises(ValueError, match="deadline"):
        cache.update_raw("k", lambda cur: (BYTES, b"x", -1.0))
    assert cache["k"] == b"old"
    assert cache.check() == []
    cache["k2"] = b"still works"  # the stripe lock was released
    assert cache["k2"] == b"still works"


def _append(name, n):
    c = Cache(name, create=False)
    for _ in range(n):
        c.update_raw("log", lambda cur: (BYTES, (cur[1] if cur else b"") + b"x", 0.0))
    c.close()


def test_update_raw_is_atomic_across_processes(cache):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append, args=(cache.name, 300)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert cache["log"] == b"x" * 900


def test_scan_visits_every_key_once_in_steps(cache):
    keys = {f"k{i}" for i in range(3000)} | {b"\xff\x01"}
    cache.set_many({k: b"" for k in keys}, ttl=None)
    seen = []
    cursor = 0
    steps = 0
    while True:
        cursor, batch = cache.scan(cursor, count=100)
        seen += batch
        steps += 1
        if cursor == 0:
            break
    assert sorted(map(repr, seen)) == sorted(map(repr, keys))
    assert steps >= 3000 // 100 // 2  # it really steps


def test_scan_keeps_keys_present_throughout_while_others_churn(cache):
    stable = {f"s{i}" for i in range(1000)}
    cache.set_many({k: b"" for k in stable}, ttl=None)
    seen = set()
    cursor = 0
    i = 0
    while True:
        cursor, batch = cache.scan(cursor, count=20)
        seen.update(batch)
        for _ in range(30):  # writes and deletes between steps move slots around
            cache[f"c{i}"] = b"x"
            cache.delete(f"c{i // 2}")
            i += 1
        if cursor == 0:
            break
    assert stable <= seen


def test_scan_refuses_a_foreign_cursor(cache):
    with pytest.raises(ValueError, match="cursor"):
        cache.scan(-1)
    with pytest.raises(ValueError, match="cursor"):
        cache.scan(1 << 60)
