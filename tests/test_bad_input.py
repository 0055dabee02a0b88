"""Bad input: a clear exception naming the limit, and the cache left exactly as it was.

Each test seeds a cache, takes a snapshot (its items and the item/byte counts
of ``stats()``), makes a bad call and checks the snapshot again.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest

import shmcache
from shmcache import admin
from shmcache import Cache, CacheNotFound, KeyTooLong, ValueTooLarge, parse_size

MAX_KEY = 100


def _snapshot(cache):
    st = cache.stats()
    return (
        sorted(cache.items(), key=repr),
        {k: st[k] for k in ("items", "bytes_used", "bytes_free", "bytes_garbage", "stripe_fill")},
    )


@pytest.fixture
def seeded(make_cache, fake_clock):
    """A cache with a few entries of several types (one with a ttl) and its snapshot."""
    c = make_cache(size="4MiB", max_key_size=MAX_KEY, clock=fake_clock)
    c["s"] = "text"
    c["b"] = b"bytes"
    c[b"raw"] = [1, 2, 3]
    c["n"] = 10
    c.set("t", b"ttl", ttl=100)
    return c


class Unchanged:
    """``with Unchanged(cache):`` asserts the cache is byte-for-byte the same afterwards."""

    def __init__(self, cache):
        self.cache = cache

    def __enter__(self):
        self.before = _snapshot(self.cache)
        return self

    def __exit__(self, *exc):
        if exc[0] is None or issubclass(exc[0], Exception):
            assert _snapshot(self.cache) == self.before
            assert self.cache.check() == []
        return False


def _shm_exists(name):
    return os.path.exists(f"/dev/shm/shmcache.{name}") or any(
        p.startswith(f"sem.shmcache.{name}.") for p in os.listdir("/dev/shm")
    )


# -- keys -------------------------------------------------------------------------
BAD_KEYS = [1, None, ("a",), 1.5, ["a"], object(), True]
KEY_OPS = {
    "get": lambda c, k: c.get(k),
    "getitem": lambda c, k: c[k],
    "set": lambda c, k: c.set(k, 1),
    "setitem": lambda c, k: c.__setitem__(k, 1),
    "add": lambda c, k: c.add(k, 1),
    "replace": lambda c, k: c.replace(k, 1),
    "delete": lambda c, k: c.delete(k),
    "delitem": lambda c, k: c.__delitem__(k),
    "contains": lambda c, k: k in c,
    "pop": lambda c, k: c.pop(k, None),
    "setdefault": lambda c, k: c.setdefault(k, 1),
    "incr": lambda c, k: c.incr(k),
    "decr": lambda c, k: c.decr(k),
    "touch": lambda c, k: c.touch(k, 5),
    "expire": lambda c, k: c.expire(k, 5),
    "persist": lambda c, k: c.persist(k),
    "ttl": lambda c, k: c.ttl(k),
    "get_many": lambda c, k: c.get_many(["s", k]),
    "set_many": lambda c, k: c.set_many([("new", 1), (k, 2)]),
    "delete_many": lambda c, k: c.delete_many(["s", k]),
}


@pytest.mark.parametrize("op", list(KEY_OPS), ids=list(KEY_OPS))
@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: type(k).__name__)
def test_wrong_key_type(seeded, op, key):
    with Unchanged(seeded), pytest.raises(TypeError, match="str or bytes"):
        KEY_OPS[op](seeded, key)


@pytest.mark.parametrize("op", list(KEY_OPS), ids=list(KEY_OPS))
@pytest.mark.parametrize(
    "key",
    ["k" * (MAX_KEY + 1), b"k" * MAX_KEY, "\u00e9" * (MAX_KEY // 2 + 1)],
    ids=["str", "bytes-with-marker", "utf8-multibyte"],
)
def test_key_too_long(seeded, op, key):
    with Unchanged(seeded), pytest.raises(KeyTooLong) as ei:
        KEY_OPS[op](seeded, key)
    assert f"max_key_size={MAX_KEY}" in str(ei.value)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, shmcache.Error)


def test_key_that_cannot_be_encoded(seeded):
    with Unchanged(seeded), pytest.raises(ValueError):
        seeded["\ud800"] = 1  # a lone surrogate has no UTF-8 form


# -- values ------------------------------------------------------------------------
def _too_large(limit):
    return {
        "bytes": b"x" * (limit + 1),
        "str": "y" * (limit + 1),
        "ndarray": np.zeros(limit // 8 + 1),
        "pickled": ["z" * (limit // 2 + 1), "w" * (limit // 2 + 1)],
        "huge-int": 1 << (8 * limit + 8),
    }


@pytest.mark.parametrize("kind", ["bytes", "str", "ndarray", "pickled", "huge-int"])
@pytest.mark.parametrize("op", ["set", "add", "replace", "set_many", "setitem"])
def test_value_too_large(seeded, kind, op):
    limit = admin.geometry(seeded).max_value_size
    value = _too_large(limit)[kind]
    call = {
        "set": lambda: seeded.set("b", value),
        "add": lambda: seeded.add("new", value),
        "replace": lambda: seeded.replace("b", value),
        "set_many": lambda: seeded.set_many({"new": 1, "b": value}),
        "setitem": lambda: seeded.__setitem__("s", value),
    }[op]
    with Unchanged(seeded), pytest.raises(ValueTooLarge) as ei:
        call()
    assert f"max_value_size={limit}" in str(ei.value)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, shmcache.Error)


def test_value_at_the_limit_is_accepted(seeded):
    limit = admin.geometry(seeded).max_value_size
    seeded["edge"] = b"e" * limit
    assert seeded["edge"] == b"e" * limit


def test_explicit_max_value_size(make_cache):
    c = make_cache(size="1MiB", max_value_size=1000)
    c["ok"] = b"x" * 1000
    with Unchanged(c), pytest.raises(ValueTooLarge, match="max_value_size=1000"):
        c["no"] = b"x" * 1001


@pytest.mark.parametrize("value", [lambda: 1, threading.Lock(), (x for x in ())], ids=["lambda", "lock", "generator"])
def test_unpicklable_value(seeded, value):
    with Unchanged(seeded), pytest.raises(TypeError, match="pickle"):
        seeded["new"] = value
    with Unchanged(seeded), pytest.raises(TypeError):
        seeded["b"] = value  # overwriting keeps the old value
    with Unchanged(seeded), pytest.raises(TypeError):
        seeded.add("new", value)
    assert "new" not in seeded
    assert seeded["b"] == b"bytes"


def test_incr_on_non_int_leaves_value(seeded):
    with Unchanged(seeded), pytest.raises(TypeError, match="not an int"):
        seeded.incr("s")
    with Unchanged(seeded), pytest.raises(TypeError):
        seeded.decr(b"raw", 3)
    assert seeded["s"] == "text" and seeded[b"raw"] == [1, 2, 3]


@pytest.mark.parametrize("default", [1.5, "0", True])
def test_incr_bad_default(seeded, default):
    with Unchanged(seeded), pytest.raises(TypeError):
        seeded.incr("new", default=default)


def test_regression_failed_incr_counts_no_set(seeded):
    sets = seeded.stats()["sets"]
    with pytest.raises(TypeError):
        seeded.incr("s")
    with pytest.raises(KeyError):
        seeded.incr("missing", default=None)
    assert seeded.stats()["sets"] == sets


# -- ttl ----------------------------------------------------------------------------
BAD_TTLS = [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, "10", True, b"1", [1]]
TTL_OPS = {
    "set": lambda c, t: c.set("b", b"new", ttl=t),
    "set-new-key": lambda c, t: c.set("new", b"new", ttl=t),
    "add": lambda c, t: c.add("new", 1, ttl=t),
    "replace": lambda c, t: c.replace("b", 1, ttl=t),
    "set_many": lambda c, t: c.set_many({"new": 1}, ttl=t),
    "incr": lambda c, t: c.incr("new", ttl=t),
    "touch": lambda c, t: c.touch("b", t),
    "expire": lambda c, t: c.expire("b", t),
}


@pytest.mark.parametrize("op", list(TTL_OPS), ids=list(TTL_OPS))
@pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
def test_bad_ttl(seeded, op, ttl):
    expected = TypeError if isinstance(ttl, (str, bytes, bool, list)) else ValueError
    with Unchanged(seeded), pytest.raises(expected) as ei:
        TTL_OPS[op](seeded, ttl)
    assert "ttl" in str(ei.value)
    if expected is ValueError:
        assert "positive" in str(ei.value)


@pytest.mark.parametrize("ttl", [0, -1, math.nan, "10", True])
def test_bad_default_ttl(cache_name, ttl):
    with pytest.raises((TypeError, ValueError), match="ttl"):
        Cache(cache_name, size="1MiB", default_ttl=ttl)
    assert not _shm_exists(cache_name)


# -- settings -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size,exc",
    [
        ("12XB", ValueError), ("", ValueError), ("-1", ValueError), ("abc", ValueError),
        ("1.2.3MiB", ValueError), ("MiB", ValueError), ("1e6", ValueError), ("0", ValueError),
        ("0.0001KiB", ValueError), (0, ValueError), (-5, ValueError),
        (1.5, TypeError), (True, TypeError), (b"1MiB", TypeError),
    ],
    ids=repr,
)
def test_bad_size(cache_name, size, exc):
    with pytest.raises(exc):
        parse_size(size)
    with pytest.raises(exc) as ei:
        Cache(cache_name, size=size)
    assert "size" in str(ei.value)
    assert not _shm_exists(cache_name)


@pytest.mark.parametrize("size", [1, 4096, 262143, "255KiB"])
def test_size_too_small(cache_name, size):
    with pytest.raises(ValueError) as ei:
        Cache(cache_name, size=size)
    assert "262144" in str(ei.value)
    assert not _shm_exists(cache_name)


def test_smallest_size_works(make_cache):
    c = make_cache(size="256KiB")
    c["k"] = b"v"
    assert c["k"] == b"v"
    assert c.stats()["size"] <= 256 * 1024


@pytest.mark.parametrize("stripes,exc", [(3, ValueError), (0, ValueError), (2048, ValueError), (-4, ValueError),
                                          (6, ValueError), ("4", TypeError), (4.0, TypeError)], ids=repr)
def test_bad_stripes(cache_name, stripes, exc):
    with pytest.raises(exc, match="stripes") as ei:
        Cache(cache_name, size="8MiB", stripes=stripes)
    if exc is ValueError:
        assert "1024" in str(ei.value) and "power of two" in str(ei.value)
    assert not _shm_exists(cache_name)


@pytest.mark.parametrize(
    "kw,exc,needle",
    [
        (dict(max_key_size=0), ValueError, "65535"),
        (dict(max_key_size=70000), ValueError, "65535"),
        (dict(max_key_size="10"), TypeError, "max_key_size"),
        (dict(max_items=2, stripes=4), ValueError, "max_items"),
        (dict(max_value_size=10**9), ValueError, "max_value_size"),
        (dict(max_value_size=0), ValueError, "max_value_size"),
        (dict(max_clients=0), ValueError, "65536"),
        (dict(policy="random"), ValueError, "noeviction"),
        (dict(lock_timeout=0), ValueError, "lock_timeout"),
        (dict(lock_timeout=-1), ValueError, "lock_timeout"),
        (dict(clock=42), TypeError, "clock"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_bad_settings(cache_name, kw, exc, needle):
    with pytest.raises(exc) as ei:
        Cache(cache_name, size="8MiB", **kw)
    assert needle in str(ei.value)
    assert not _shm_exists(cache_name)


@pytest.mark.parametrize(
    "name,exc",
    [("a/b", ValueError), ("", ValueError), ("x" * 65, ValueError), ("..", ValueError), (".", ValueError),
     ("a b", ValueError), ("caf\u00e9", ValueError), ("a\0b", ValueError), (5, TypeError), (None, TypeError),
     (b"abc", TypeError)],
    ids=repr,
)
def test_bad_names(name, exc):
    with pytest.raises(exc) as ei:
        Cache(name, size="1MiB")
    if exc is ValueError:
        assert "64" in str(ei.value)
    with pytest.raises(exc):
        Cache.unlink(name)
    if isinstance(name, str) and "\0" not in name:
        for p in (f"/dev/shm/shmcache.{name}", f"/dev/shm/sem.shmcache.{name}.0", "/dev/shm/shmcache."):
            assert not os.path.lexists(p), p


def test_name_of_64_characters_is_fine(cache_name):
    name = cache_name + "x" * (64 - len(cache_name))
    try:
        with Cache(name, size="1MiB") as c:
            c["k"] = 1
            assert c["k"] == 1
    finally:
        assert Cache.unlink(name) is True


def test_attach_missing_cache(cache_name):
    with pytest.raises(CacheNotFound) as ei:
        Cache(cache_name, create=False)
    assert cache_name in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    assert not _shm_exists(cache_name)


# -- batches -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        (5, b"bad key type"),
        ("k" * (MAX_KEY + 1), b"key too long"),
        ("big", "v" * (4 * 1024 * 1024)),
        ("fn", lambda: None),
    ],
    ids=["key-type", "key-too-long", "value-too-large", "unpicklable"],
)
def test_set_many_with_one_bad_item_stores_none(seeded, bad):
    items = [("b", b"overwritten?"), ("new1", 1)] + [bad] + [("new2", 2), ("s", "overwritten?")]
    with Unchanged(seeded), pytest.raises((TypeError, ValueError)):
        seeded.set_many(items)
    with Unchanged(seeded), pytest.raises((TypeError, ValueError)):
        seeded.set_many(dict(items) if not isinstance(bad[0], int) else items)
    assert "new1" not in seeded and "new2" not in seeded
    assert seeded["b"] == b"bytes" and seeded["s"] == "text"


def test_set_many_bad_ttl_stores_none(seeded):
    with Unchanged(seeded), pytest.raises(ValueError):
        seeded.set_many({"new": 1, "b": 2}, ttl=-1)


def test_delete_many_with_one_bad_key_deletes_none(seeded):
    with Unchanged(seeded), pytest.raises(TypeError):
        seeded.delete_many(["s", "b", 7])
    with Unchanged(seeded), pytest.raises(KeyTooLong):
        seeded.delete_many(["s", "k" * (MAX_KEY + 1)])
