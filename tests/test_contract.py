"""The behaviour contract of ``shmcache.Cache``, run against every configuration.

One class, ``TestContract``, holds the behaviour tests; the ``c`` fixture is
parametrized over cache configurations (cachetools' ``CacheTestMixin`` idea),
so each behaviour is checked with the default geometry, a single stripe, many
stripes and a tiny ``max_key_size``. Every cache uses the injectable
``fake_clock``: TTL tests advance it instead of sleeping.

Keys in this file are at most 20 bytes (encoded) so they fit every
configuration, the tiny one included.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random

import numpy as np
import pytest

from shmcache import admin
from shmcache import Cache

CONFIGS = {
    "default-8MiB": dict(size="8MiB"),
    "1-stripe": dict(size="8MiB", stripes=1),
    "64-stripes-32MiB": dict(size="32MiB", stripes=64),
    "tiny-max_key_size": dict(size="8MiB", max_key_size=24),
    # the same contract through the pure-Python paths (the C fast paths' fallback)
    "pure-python": dict(size="8MiB", _pure=True),
}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def config(request, monkeypatch):
    cfg = dict(CONFIGS[request.param])
    if cfg.pop("_pure", False):
        import shmcache.cache

        monkeypatch.setattr(shmcache.cache, "USE_SPEEDUPS", False)
    return cfg


@pytest.fixture
def c(make_cache, config, fake_clock):
    """A fresh cache of the parametrized configuration on the fake clock."""
    return make_cache(clock=fake_clock, **config)


def _same(a, b) -> bool:
    """Equality that also holds for nan, numpy arrays and nested containers of them."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


_F = np.arange(12, dtype=np.float64).reshape(3, 4)
VALUES = {
    "bytes": b"\x00\xffbinary\x00",
    "empty-bytes": b"",
    "str": "h\u00e9llo w\u00f6rld \U0001f600",
    "empty-str": "",
    "int-0": 0,
    "int": 42,
    "int-negative": -7,
    "int64-max": 2**63 - 1,
    "int64-min": -(2**63),
    "int-huge": 10**40,
    "int-huge-negative": -(10**40) - 3,
    "int-2**64": 2**64,
    "float": 3.25,
    "float-negative-zero": -0.0,
    "float-nan": float("nan"),
    "float-inf": float("inf"),
    "float-minus-inf": float("-inf"),
    "bool-true": True,
    "bool-false": False,
    "none": None,
    "tuple": (1, "two", b"3", (4.0,)),
    "empty-tuple": (),
    "list": [1, [2, 3], {"x": None}],
    "dict": {"a": 1, "b": [1, 2], 3: (4, 5)},
    "set": {1, 2, 3},
    "bytearray": bytearray(b"mutable"),
    "complex": 1 + 2j,
    "nd-float64-2d": _F,
    "nd-int8": np.arange(-5, 5, dtype=np.int8),
    "nd-uint64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "nd-float32-3d": np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 3, 4),
    "nd-float16": np.array([1.5, -2.0, np.nan], dtype=np.float16),
    "nd-complex128": np.array([1 + 1j, -2j]),
    "nd-bool": np.array([[True, False], [False, True]]),
    "nd-big-endian": np.arange(6, dtype=">i4"),
    "nd-unicode": np.array(["a", "bcd", "\u00e9"]),
    "nd-datetime64": np.array(["2024-01-01", "2025-06-30"], dtype="datetime64[D]"),
    "nd-0d": np.array(7.5),
    "nd-0d-int": np.array(3, dtype=np.int16),
    "nd-empty": np.array([], dtype=np.float64),
    "nd-empty-2d": np.zeros((0, 3), dtype=np.int32),
    "nd-fortran": np.asfortranarray(_F),
    "nd-noncontiguous-slice": _F[:, ::2],
    "nd-transposed": _F.T,
    "nd-reversed": np.arange(10)[::-3],
    "nd-structured": np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    "nd-object": np.array([1, "x", None], dtype=object),
}


class TestContract:
    # -- mapping basics -------------------------------------------------------
    def test_set_then_get(self, c):
        assert c.set("k", b"v") is True
        assert c.get("k") == b"v"
        assert c["k"] == b"v"

    def test_get_missing_returns_default(self, c):
        assert c.get("nope") is None
        assert c.get("nope", "dflt") == "dflt"
        with pytest.raises(KeyError):
            c["nope"]

    def test_setitem_overwrites(self, c):
        c["k"] = b"one"
        c["k"] = b"a much longer second value" * 10
        assert c["k"] == b"a much longer second value" * 10
        c["k"] = b"3"
        assert c["k"] == b"3"
        assert len(c) == 1

    def test_delitem_and_delete(self, c):
        c["k"] = 1
        del c["k"]
        assert "k" not in c
        with pytest.raises(KeyError):
            del c["k"]
        c["k"] = 2
        assert c.delete("k") is True
        assert c.delete("k") is False
        assert c.get("k") is None

    def test_contains(self, c):
        assert "k" not in c
        c["k"] = None
        assert "k" in c
        assert b"k" not in c

    def test_len_iter_keys_items_values(self, c):
        data = {f"key{i}": i * 10 for i in range(50)}
        for k, v in data.items():
            c[k] = v
        assert len(c) == 50
        assert sorted(c) == sorted(data)
        assert sorted(c.keys()) == sorted(data)
        assert sorted(c.items()) == sorted(data.items())
        assert sorted(c.values()) == sorted(data.values())
        assert dict(c.items()) == data

    def test_empty_cache(self, c):
        assert len(c) == 0
        assert list(c) == []
        assert c.keys() == [] and c.items() == [] and c.values() == []

    def test_update_is_dict_update(self, c):
        c.update({"a": 1}, b=2)
        c.update([("c", 3)])
        assert dict(c.items()) == {"a": 1, "b": 2, "c": 3}

    def test_str_and_bytes_keys_are_distinct(self, c):
        c["a"] = "str key"
        c[b"a"] = "bytes key"
        assert c["a"] == "str key"
        assert c[b"a"] == "bytes key"
        assert len(c) == 2
        keys = c.keys()
        assert sorted(keys, key=repr) == sorted(["a", b"a"], key=repr)
        assert {type(k) for k in keys} == {str, bytes}
        del c["a"]
        assert c.keys() == [b"a"]

    def test_empty_keys(self, c):
        c[""] = "empty str"
        c[b""] = "empty bytes"
        assert c[""] == "empty str" and c[b""] == "empty bytes"
        assert sorted(c.keys(), key=repr) == sorted(["", b""], key=repr)
        del c[""]
        assert c.keys() == [b""]

    def test_binary_keys(self, c):
        keys = [b"\xff", b"\xff\xff", b"\x00", b"\xffa", bytes(range(250, 256))]
        for i, k in enumerate(keys):
            c[k] = i
        assert sorted(c.keys()) == sorted(keys)
        assert all(c[k] == i for i, k in enumerate(keys))
        assert "a" not in c  # b"\xffa" is not the str key "a"

    def test_bytes_like_keys_map_to_bytes(self, c):
        c[bytearray(b"ba")] = 1
        assert c[b"ba"] == 1
        assert c[memoryview(b"ba")] == 1
        assert c.keys() == [b"ba"]

    def test_keys_up_to_max_key_size(self, c):
        n = admin.geometry(c).max_key_size
        c["k" * n] = 1  # a str key is stored as its UTF-8 bytes
        c[b"b" * (n - 1)] = 2  # a bytes key takes one more byte (its type marker)
        assert c["k" * n] == 1 and c[b"b" * (n - 1)] == 2
        assert sorted(c.keys(), key=len) == [b"b" * (n - 1), "k" * n]

    def test_unicode_keys(self, c):
        c["\u00e9t\u00e9"] = 1
        c["\U0001f600"] = 2
        assert c["\u00e9t\u00e9"] == 1 and c["\U0001f600"] == 2
        assert sorted(c.keys()) == sorted(["\u00e9t\u00e9", "\U0001f600"])

    # -- add / replace / pop / setdefault --------------------------------------
    def test_add(self, c):
        assert c.add("k", 1) is True
        assert c.add("k", 2) is False
        assert c["k"] == 1

    def test_replace(self, c):
        assert c.replace("k", 1) is False
        assert "k" not in c
        c["k"] = 1
        assert c.replace("k", 2) is True
        assert c["k"] == 2

    def test_pop(self, c):
        c["k"] = (1, 2)
        assert c.pop("k") == (1, 2)
        assert "k" not in c
        with pytest.raises(KeyError):
            c.pop("k")
        assert c.pop("k", "dflt") == "dflt"
        assert c.pop("k", None) is None

    def test_setdefault(self, c):
        assert c.setdefault("k", [1]) == [1]
        assert c.setdefault("k", [2]) == [1]
        assert c["k"] == [1]
        assert c.setdefault("n") is None
        assert "n" in c and c["n"] is None

    # -- incr / decr ------------------------------------------------------------
    def test_incr_decr_start_at_default_zero(self, c):
        assert c.incr("n") == 1
        assert c.incr("n", 5) == 6
        assert c.decr("n") == 5
        assert c.decr("n", 10) == -5
        assert c["n"] == -5 and type(c["n"]) is int
        assert c.decr("m") == -1

    def test_incr_custom_default(self, c):
        assert c.incr("n", 2, default=100) == 102
        assert c.incr("n", 2, default=100) == 104

    def test_incr_default_none_raises_keyerror(self, c):
        with pytest.raises(KeyError):
            c.incr("n", default=None)
        with pytest.raises(KeyError):
            c.decr("n", default=None)
        assert "n" not in c
        c["n"] = 1
        assert c.incr("n", default=None) == 2

    def test_incr_existing_int_set_by_set(self, c):
        c["n"] = 41
        assert c.incr("n") == 42
        assert c.get("n") == 42

    @pytest.mark.parametrize("value", [b"1", "1", 1.0, True, None, [1]], ids=repr)
    def test_incr_non_int_raises_typeerror(self, c, value):
        c["v"] = value
        with pytest.raises(TypeError):
            c.incr("v")
        with pytest.raises(TypeError):
            c.decr("v")
        assert _same(c["v"], value)

    def test_incr_bad_delta_raises_typeerror(self, c):
        for delta in (1.5, "1", None, True):
            with pytest.raises(TypeError):
                c.incr("n", delta)
        assert "n" not in c

    def test_incr_beyond_int64(self, c):
        c["n"] = 2**63 - 1
        assert c.incr("n") == 2**63
        assert c["n"] == 2**63
        assert c.incr("n", 2**70) == 2**63 + 2**70
        assert c.decr("n", 2**70 + 2) == 2**63 - 2
        assert c.incr("n") == 2**63 - 1
        assert c["n"] == 2**63 - 1
        c["m"] = -(2**63)
        assert c.decr("m") == -(2**63) - 1
        assert c.incr("m", -(10**30)) == -(2**63) - 1 - 10**30
        assert c["m"] == -(2**63) - 1 - 10**30
        c["h"] = 10**50
        assert c.incr("h") == 10**50 + 1
        assert c.check() == []

    def test_incr_ttl_applies_only_when_creating(self, c, fake_clock):
        assert c.incr("n", ttl=10) == 1
        assert c.ttl("n") == pytest.approx(10)
        fake_clock.advance(4)
        assert c.incr("n", ttl=100) == 2
        assert c.ttl("n") == pytest.approx(6)  # kept its deadline
        c["p"] = 1
        assert c.incr("p", ttl=5) == 2
        assert c.ttl("p") is None  # an existing key without expiry keeps none

    def test_incr_keeps_ttl_when_growing_beyond_int64(self, c, fake_clock):
        c.set("n", 2**63 - 1, ttl=10)
        fake_clock.advance(3)
        assert c.incr("n") == 2**63
        assert c.ttl("n") == pytest.approx(7)

    def test_incr_on_expired_key_restarts(self, c, fake_clock):
        c.incr("n", 5, ttl=10)
        fake_clock.advance(10)
        assert c.incr("n", ttl=20) == 1
        assert c.ttl("n") == pytest.approx(20)

    # -- expiry ---------------------------------------------------------------
    def test_ttl_of_key(self, c, fake_clock):
        c.set("k", 1, ttl=30)
        assert c.ttl("k") == pytest.approx(30)
        fake_clock.advance(12.5)
        assert c.ttl("k") == pytest.approx(17.5)
        c["forever"] = 1
        assert c.ttl("forever") is None
        with pytest.raises(KeyError):
            c.ttl("missing")

    def test_expired_key_is_never_returned(self, c, fake_clock):
        c.set("gone", b"x", ttl=10)
        c.set("stays", b"y", ttl=11)
        c["forever"] = b"z"
        fake_clock.advance(9.5)
        assert c.get("gone") == b"x"
        fake_clock.advance(0.5)  # exactly at the deadline: expired
        assert c.get("gone") is None
        assert c.get("gone", "d") == "d"
        with pytest.raises(KeyError):
            c["gone"]
        assert "gone" not in c
        assert sorted(c.keys()) == ["forever", "stays"]
        assert sorted(c) == ["forever", "stays"]
        assert len(c) == 2
        assert dict(c.items()) == {"stays": b"y", "forever": b"z"}
        assert sorted(c.values()) == [b"y", b"z"]
        assert c.get_many(["gone", "stays"]) == {"stays": b"y"}
        with pytest.raises(KeyError):
            c.ttl("gone")
        assert c.touch("gone", 100) is False
        assert c.replace("gone", 1) is False
        assert c.pop("gone", "d") == "d"
        assert "gone" not in c

    def test_expired_key_delete_and_add(self, c, fake_clock):
        c.set("k", 1, ttl=1)
        fake_clock.advance(1)
        assert c.delete("k") is False
        c.set("k", 1, ttl=1)
        fake_clock.advance(2)
        assert c.add("k", 2) is True
        assert c["k"] == 2 and c.ttl("k") is None

    def test_touch(self, c, fake_clock):
        c.set("k", 1, ttl=5)
        assert c.touch("k", 100) is True
        fake_clock.advance(50)
        assert c.ttl("k") == pytest.approx(50)
        assert c.touch("k") is True  # None: never expires
        assert c.ttl("k") is None
        assert c.touch("missing", 5) is False
        assert "missing" not in c

    def test_expire_and_persist(self, c, fake_clock):
        c["k"] = 1
        assert c.expire("k", 3) is True
        assert c.ttl("k") == pytest.approx(3)
        assert c.persist("k") is True
        fake_clock.advance(10)
        assert c["k"] == 1 and c.ttl("k") is None
        assert c.expire("missing", 3) is False
        assert c.persist("missing") is False
        with pytest.raises(ValueError):
            c.expire("k", None)
        c.expire("k", 1)
        fake_clock.advance(1)
        assert c.persist("k") is False
        assert "k" not in c

    def test_set_overwrite_resets_ttl(self, c, fake_clock):
        c.set("k", 1, ttl=5)
        c.set("k", 2)
        fake_clock.advance(100)
        assert c["k"] == 2

    def test_default_ttl(self, c, make_cache, config, fake_clock):
        d = make_cache(clock=fake_clock, default_ttl=10, **config)
        d.set("a", 1)
        d["b"] = 2
        d.add("c", 3)
        d.set_many({"e": 5})
        d.set("forever", 4, ttl=None)
        d.set("short", 4, ttl=2)
        for k in "abce":
            assert d.ttl(k) == pytest.approx(10), k
        assert d.ttl("forever") is None
        assert d.ttl("short") == pytest.approx(2)
        assert c.ttl("a") == pytest.approx(10)  # the deadline is in the cache, not the process
        c.set("from_c", 1)  # c has no default_ttl
        assert d.ttl("from_c") is None
        fake_clock.advance(10)
        assert sorted(d.keys()) == ["forever", "from_c"]

    # -- batches ----------------------------------------------------------------
    def test_get_many_set_many_delete_many(self, c, fake_clock):
        data = {f"m{i}": i for i in range(40)}
        assert c.set_many(data) is None
        assert c.get_many(list(data) + ["absent"]) == data
        assert c.get_many([]) == {}
        c.set_many([("p1", 1), ("p2", 2)], ttl=5)
        assert c.ttl("p1") == pytest.approx(5)
        fake_clock.advance(5)
        assert c.get_many(["p1", "p2", "m0"]) == {"m0": 0}
        assert c.delete_many([f"m{i}" for i in range(20)] + ["absent", "p1"]) == 20
        assert sorted(c.keys()) == sorted(f"m{i}" for i in range(20, 40))
        assert c.delete_many([]) == 0

    def test_clear(self, c, fake_clock):
        for i in range(30):
            c[f"k{i}"] = b"v" * i
        c.set("t", 1, ttl=1)
        assert c.clear() == 31
        assert len(c) == 0 and c.keys() == []
        st = c.stats()
        assert st["items"] == 0 and st["bytes_used"] == 0
        c["after"] = 1
        assert c.keys() == ["after"]
        assert c.check() == []

    # -- stats --------------------------------------------------------------------
    def test_stats_counters(self, c, fake_clock):
        s0 = c.stats()
        for k in ("hits", "misses", "sets", "deletes", "evictions", "expirations", "items"):
            assert s0[k] == 0, k
        c["a"] = 1
        c["b"] = b"x" * 100
        c.add("a", 2)  # refused: not a set
        c.get("a")
        c["b"]
        c.get("zz")
        c.get_many(["a", "zz"])
        "a" in c  # noqa: B015 - membership is not a lookup
        c.delete("a")
        c.delete("a")  # absent: not a delete
        c.set("t", 1, ttl=1)
        fake_clock.advance(1)
        c.get("t")  # expired: a miss
        c.pop("t", None)  # removes the expired entry
        s = c.stats()
        assert s["hits"] == 3
        assert s["misses"] == 3
        assert s["sets"] == 3
        assert s["deletes"] == 1
        assert s["expirations"] == 1
        assert s["evictions"] == 0
        assert s["items"] == 1
        assert s["hit_rate"] == pytest.approx(0.5)

    def test_stats_bytes_and_fill(self, c):
        s0 = c.stats()
        assert s0["bytes_used"] == 0
        assert s0["bytes_used"] + s0["bytes_free"] == s0["arena_bytes"]
        assert len(s0["stripe_fill"]) == s0["stripes"] == admin.geometry(c).n_stripes
        c["k"] = b"x" * 1000
        s1 = c.stats()
        assert 1000 < s1["bytes_used"] < 1100
        assert s1["bytes_used"] + s1["bytes_free"] == s1["arena_bytes"]
        assert sum(1 for f in s1["stripe_fill"] if f > 0) == 1
        assert all(0.0 <= f <= 1.0 for f in s1["stripe_fill"])
        del c["k"]
        assert c.stats()["bytes_used"] == 0

    def test_stats_clients(self, c, make_cache, config, fake_clock):
        assert c.stats()["clients"] == 1
        d = make_cache(clock=fake_clock, **config)
        assert c.stats()["clients"] == 2
        d.close()
        assert c.stats()["clients"] == 1

    def test_stats_survive_close_of_other_client(self, c, make_cache, config):
        d = make_cache(**config)
        d["a"] = 1
        d.get("a")
        d.close()
        s = c.stats()
        assert s["sets"] == 1 and s["hits"] == 1

    # -- lifecycle ------------------------------------------------------------------
    def test_close_is_idempotent(self, c):
        c["k"] = 1
        c.close()
        assert c.closed
        c.close()
        assert c.closed

    @pytest.mark.parametrize(
        "op",
        [
            lambda c: c.get("k"),
            lambda c: c["k"],
            lambda c: c.set("k", 1),
            lambda c: c.__setitem__("k", 1),
            lambda c: c.add("k", 1),
            lambda c: c.replace("k", 1),
            lambda c: c.delete("k"),
            lambda c: c.__delitem__("k"),
            lambda c: "k" in c,
            lambda c: len(c),
            lambda c: c.pop("k", None),
            lambda c: c.incr("k"),
            lambda c: c.touch("k", 1),
            lambda c: c.ttl("k"),
            lambda c: c.get_many(["k"]),
            lambda c: c.set_many({"k": 1}),
            lambda c: c.delete_many(["k"]),
            lambda c: c.clear(),
            lambda c: c.stats(),
            lambda c: c.check(),
        ],
        ids=[
            "get", "getitem", "set", "setitem", "add", "replace", "delete", "delitem", "contains",
            "len", "pop", "incr", "touch", "ttl", "get_many", "set_many", "delete_many", "clear",
            "stats", "check",
        ],
    )
    def test_ops_after_close_raise_valueerror(self, c, op):
        c["k"] = 1
        c.close()
        with pytest.raises(ValueError):
            op(c)

    def test_close_leaves_data_for_others(self, c, make_cache, config):
        c["k"] = b"kept"
        c.close()
        d = make_cache(**config)
        assert admin.created(d) is False
        assert d["k"] == b"kept"

    def test_context_manager(self, c, cache_name, config):
        with Cache(cache_name, **config) as d:
            assert d is not c and not d.closed
            d["k"] = 1
        assert d.closed
        assert c["k"] == 1
        with pytest.raises(ValueError):
            d.get("k")

    def test_unlink(self, c, cache_name):
        path = f"/dev/shm/shmcache.{cache_name}"
        assert os.path.exists(path)
        c.close()
        assert Cache.unlink(cache_name) is True
        assert not os.path.exists(path)
        assert Cache.unlink(cache_name) is False

    def test_unlink_while_attached_keeps_old_mapping(self, c, cache_name, config, make_cache):
        c["k"] = 1
        assert Cache.unlink(cache_name) is True
        assert c["k"] == 1  # this process keeps its mapping
        d = make_cache(**config)  # a new cache of the same name starts empty
        assert admin.created(d) is True
        assert "k" not in d

    # -- type fidelity ------------------------------------------------------------
    @pytest.mark.parametrize("value", list(VALUES.values()), ids=list(VALUES))
    def test_type_fidelity(self, c, value):
        c["v"] = value
        got = c["v"]
        assert _same(got, value), (got, value)
        assert _same(c.get("v"), value)
        assert _same(dict(c.items())["v"], value)
        assert _same(c.values()[0], value)
        assert _same(c.pop("v"), value)

    @pytest.mark.parametrize("name", [k for k in VALUES if k.startswith("nd-")])
    def test_array_is_new_writable_and_independent(self, c, name):
        a = VALUES[name]
        original = a.copy()
        c["a"] = a
        got = c["a"]
        assert got is not a
        assert got.flags.writeable
        assert _same(got, original)
        if got.size:
            flat = got.reshape(-1)
            flat[0] = flat[-1]
            again = c["a"]
            assert again is not got
            assert _same(again, original)  # mutating what get returned changes nothing stored
        assert _same(a, original)  # nor the array that was stored

    def test_large_values(self, c):
        big = os.urandom(admin.geometry(c).max_value_size)
        c["big"] = big
        assert c["big"] == big
        arr = np.random.default_rng(1).random(admin.geometry(c).max_value_size // 8 - 64)
        c["arr"] = arr
        assert np.array_equal(c["arr"], arr)

    def test_custom_serializer(self, c, make_cache, config, fake_clock):
        j = make_cache(clock=fake_clock, serializer=json, **config)
        j["obj"] = {"a": [1, 2], "b": None}
        j["tup"] = (1, 2)
        j["raw"] = b"raw"  # bytes, str, int, float never go through the serializer
        j["n"] = 5
        assert j["obj"] == {"a": [1, 2], "b": None}
        assert j["tup"] == [1, 2]  # json's view of a tuple: proof json was used
        assert j["raw"] == b"raw" and j["n"] == 5
        assert c["raw"] == b"raw" and c["n"] == 5
        with pytest.raises(TypeError):
            j["bad"] = {1, 2}  # json cannot encode a set
        assert "bad" not in j
        with pytest.raises(ValueError):
            c["obj"]  # a reader without the serializer is told so, not handed garbage

    def test_bad_serializer_object(self, cache_name):
        with pytest.raises(TypeError):
            Cache(cache_name, size="1MiB", serializer=object())

    # -- sharing --------------------------------------------------------------------
    def test_two_objects_one_cache(self, c, make_cache, config, fake_clock):
        d = make_cache(clock=fake_clock, **config)
        assert admin.created(c) is True and admin.created(d) is False
        c["x"] = 1
        assert d["x"] == 1
        d["y"] = [2]
        assert c["y"] == [2]
        assert d.incr("x") == 2 and c["x"] == 2
        del c["y"]
        assert "y" not in d
        assert sorted(c.keys()) == sorted(d.keys()) == ["x"]
        d.clear()
        assert len(c) == 0

    def test_pickled_cache_attaches(self, c):
        c["x"] = b"shared"
        d = pickle.loads(pickle.dumps(c))
        try:
            assert d is not c
            assert d.name == c.name
            assert admin.created(d) is False
            assert d["x"] == b"shared"
            d["y"] = 2
            assert c["y"] == 2
        finally:
            d.close()
        assert c["y"] == 2  # closing the copy leaves the original working

    # -- integrity ------------------------------------------------------------------
    def test_check_after_heavy_mixed_use(self, c, fake_clock):
        rng = random.Random(1234)
        model: dict = {}
        deadline: dict = {}
        keys = [f"h{i}" for i in range(300)] + [f"h{i}".encode() for i in range(50)]

        def live(k):
            return k in model and (deadline.get(k) is None or deadline[k] > fake_clock())

        for step in range(4000):
            k = rng.choice(keys)
            op = rng.random()
            if op < 0.35:
                v = os.urandom(rng.choice([0, 1, 7, 8, 60, 300, 2000]))
                ttl = rng.choice([None, None, 1, 5, 50])
                c.set(k, v, ttl=ttl)
                model[k] = v
                deadline[k] = None if ttl is None else fake_clock() + ttl
            elif op < 0.45:
                assert c.delete(k) is live(k)
                model.pop(k, None)
            elif op < 0.55:
                if live(k) and not isinstance(model[k], int):
                    continue
                exp = deadline.get(k) if live(k) else None
                base = model[k] if live(k) else 0
                delta = rng.choice([1, -3, 2**62])
                assert c.incr(k, delta) == base + delta
                model[k] = base + delta
                deadline[k] = exp
            elif op < 0.62:
                assert c.pop(k, "absent") == (model[k] if live(k) else "absent")
                model.pop(k, None)
            elif op < 0.67:
                was_live = live(k)
                assert c.touch(k, 30) is was_live
                if was_live:
                    deadline[k] = fake_clock() + 30
            elif op < 0.75:
                fake_clock.advance(rng.choice([0.5, 1, 3]))
            elif op < 0.7502:
                c.clear()
                model.clear()
            else:
                want = model[k] if live(k) else None
                assert c.get(k) == want
        expected = {k: v for k, v in model.items() if live(k)}
        assert dict(c.items()) == expected
        assert len(c) == len(expected)
        assert c.stats()["evictions"] == 0
        assert c.check() == []


@pytest.mark.parametrize("op", ["keys", "items", "values", "__iter__"])
def test_regression_iteration_after_close_raises_valueerror(cache, op):
    cache["k"] = 1
    cache.close()
    with pytest.raises(ValueError):
        getattr(cache, op)()


class _Color(str, __import__("enum").Enum):
    RED = "red"


def test_regression_str_subclass_key_uses_its_value(cache):
    # dict semantics: _Color.RED == "red" and hash(_Color.RED) == hash("red"), so they are one key.
    cache[_Color.RED] = 1
    assert cache.get("red") == 1
    assert cache.keys() == ["red"]
