"""The Flask-Caching backend ``shmcache.contrib.flask.ShmCache``.

Ported from Flask-Caching's own suite: tests/test_backend_cache.py
(GenericCacheTests, the contract every backend passes), and the parts of
tests/test_cache.py, tests/test_memoize.py and tests/test_timeout.py that go
through the backend (cache.* calls, @cached, @memoize, delete_memoized,
timedelta timeouts). Sleeps are replaced by the cache's injected clock.
"""

import datetime
import multiprocessing
import os
import random
import time

import flask
import pytest
from flask_caching import Cache as FlaskCache
from payload import Payload

from shmcache import Cache
from shmcache.contrib import shared_cache
from shmcache.contrib.flask import ShmCache

CTX = multiprocessing.get_context("fork")


@pytest.fixture
def clock(fake_clock):
    return fake_clock


@pytest.fixture
def make_cache(cache_name, clock):
    """Factory for backends on the test's cache, closed (and unlinked) afterwards."""

    def make(**kw):
        kw.setdefault("size", "8MiB")
        kw.setdefault("clock", clock)
        return ShmCache(cache_name, **kw)

    yield make
    shared_cache(cache_name, size="8MiB", clock=clock).close()


@pytest.fixture
def c(make_cache):
    return make_cache()


@pytest.fixture
def app(cache_name, clock):
    app = flask.Flask(__name__)
    app.testing = True
    app.config.update(
        CACHE_TYPE="shmcache.contrib.flask.ShmCache",
        CACHE_SHMCACHE_NAME=cache_name,
        CACHE_SHMCACHE_SIZE="8MiB",
        CACHE_OPTIONS={"clock": clock},
    )
    yield app
    shared_cache(cache_name, size="8MiB", clock=clock).close()


@pytest.fixture
def cache(app):
    return FlaskCache(app)


# -- GenericCacheTests (tests/test_backend_cache.py) ------------------------------
class TestGenericCacheTests:
    def test_generic_get_dict(self, c):
        assert c.set("a", "a")
        assert c.set("b", "b")
        d = c.get_dict("a", "b")
        assert "a" in d
        assert "a" == d["a"]
        assert "b" in d
        assert "b" == d["b"]

    def test_generic_set_get(self, c):
        for i in range(3):
            assert c.set(str(i), i * i)
        for i in range(3):
            result = c.get(str(i))
            assert result == i * i, result

    def test_generic_get_set(self, c):
        assert c.set("foo", ["bar"])
        assert c.get("foo") == ["bar"]

    def test_generic_get_many(self, c):
        assert c.set("foo", ["bar"])
        assert c.set("spam", "eggs")
        assert c.get_many("foo", "spam") == [["bar"], "eggs"]

    def test_generic_set_many(self, c):
        assert c.set_many({"foo": "bar", "spam": ["eggs"]})
        assert c.get("foo") == "bar"
        assert c.get("spam") == ["eggs"]

    def test_generic_add(self, c):
        assert c.add("foo", "bar")
        assert c.get("foo") == "bar"
        assert not c.add("foo", "qux")
        assert c.get("foo") == "bar"

    def test_generic_delete(self, c):
        assert c.add("foo", "bar")
        assert c.get("foo") == "bar"
        assert c.delete("foo")
        assert c.get("foo") is None

    def test_generic_delete_many(self, c):
        assert c.add("foo", "bar")
        assert c.add("spam", "eggs")
        assert c.delete_many("foo", "spam")
        assert c.get("foo") is None
        assert c.get("spam") is None

    def test_generic_inc_dec(self, c):
        assert c.set("foo", 1)
        assert c.inc("foo") == c.get("foo") == 2
        assert c.dec("foo") == c.get("foo") == 1
        assert c.delete("foo")

    def test_generic_true_false(self, c):
        assert c.set("foo", True)
        assert c.get("foo") in (True, 1)
        assert c.set("bar", False)
        assert c.get("bar") in (False, 0)

    def test_generic_timeout(self, c, clock):
        c.set("foo", "bar", 0)
        assert c.get("foo") == "bar"
        c.set("baz", "qux", 1)
        assert c.get("baz") == "qux"
        clock.advance(3)
        # timeout of zero means no timeout
        assert c.get("foo") == "bar"
        assert c.get("baz") is None

    def test_generic_has(self, c):
        assert c.has("foo") in (False, 0)
        assert c.has("spam") in (False, 0)
        assert c.set("foo", "bar")
        assert c.has("foo") in (True, 1)
        assert c.has("spam") in (False, 0)
        c.delete("foo")
        assert c.has("foo") in (False, 0)
        assert c.has("spam") in (False, 0)

    def test_generic_get_bytes(self, c):
        assert c.set("foo", b"bar")
        assert c.get("foo") == b"bar"


# -- the rest of the backend contract (cachelib.BaseCache docstrings) ---------------
def test_timeouts(c, clock):
    c.set("default", 1)  # default_timeout 300
    c.set("td", 1, datetime.timedelta(seconds=30))
    c.set("gone", 1, -1)
    assert c.get("gone") is None and not c.has("gone")
    assert c.add("gone-too", 1, -1) is True and c.get("gone-too") is None
    clock.advance(29)
    assert c.get("td") == 1
    clock.advance(2)
    assert c.get("td") is None
    clock.advance(268)
    assert c.get("default") == 1
    clock.advance(2)
    assert c.get("default") is None


def test_default_timeout_zero_never_expires(make_cache, clock):
    c = make_cache(default_timeout=0)
    c.set("k", 1)
    assert c.inc("n") == 1
    clock.advance(10**7)
    assert c.get("k") == 1 and c.get("n") == 1


def test_inc_dec_missing_and_non_int(c, clock):
    assert c.inc("new") == 1
    assert c.dec("new2", 5) == -5
    c.set("f", 1.5)
    assert c.inc("f") == 2.5
    assert c.get("f") == 2.5
    c.set("s", "text")
    with pytest.raises(TypeError):
        c.inc("s")
    clock.advance(301)  # inc on a missing key uses the default timeout, like SimpleCache
    assert c.get("new") is None


def test_delete_many_returns_the_keys_gone(c):
    c.set("a", 1)
    assert c.delete_many("a", "never-there") == ["a", "never-there"]
    assert c.delete_many() == []


def test_cached_none_is_indistinguishable_but_has_knows(c):
    c.set("none", None)
    assert c.get("none") is None
    assert c.has("none")


def test_key_prefix_and_clear(make_cache):
    a = make_cache(key_prefix="a:")
    b = make_cache(key_prefix=lambda: "b:")
    a.set("k", 1)
    b.set("k", 2)
    assert (a.get("k"), b.get("k")) == (1, 2)
    assert a.clear()
    assert (a.get("k"), b.get("k")) == (None, 2)
    plain = make_cache()
    assert plain.clear()
    assert b.get("k") is None


def test_long_keys(c):
    k1, k2 = "x" * 5000, "x" * 4999 + "y"
    assert c.set(k1, 1) and c.set(k2, 2)
    assert c.get_many(k1, k2) == [1, 2]


def test_too_large_value_is_not_stored_and_old_value_dropped(c, caplog):
    c.set("k", "small")
    big = "a" * (c._cache.stats()["max_value_size"] + 1)
    assert c.set("k", big) is False
    assert c.get("k") is None
    assert c.add("k", big) is False
    assert "max_value_size" in caplog.text


def test_get_or_set_extension(c):
    calls = []
    assert c.get_or_set("k", lambda: calls.append(1) or "v") == "v"
    assert c.get_or_set("k", lambda: calls.append(1) or "w") == "v"
    assert calls == [1]


def test_unknown_option(cache_name):
    with pytest.raises(TypeError, match="unknown shmcache option"):
        ShmCache(cache_name, bogus=1)


# -- through flask_caching.Cache (tests/test_cache.py, test_memoize.py, test_timeout.py)
def test_cache_type_config(app, cache, cache_name):
    assert isinstance(cache.cache, ShmCache)
    assert cache.cache._cache.name == cache_name
    assert cache.cache.key_prefix == "flask_cache_"
    assert cache.cache.default_timeout == 300


def test_readme_counters_through_flask_caching(app, cache):
    """The README's Flask snippet: Flask-Caching's Cache has no inc/dec (the
    README once said `cache.inc`); the backend, `cache.cache`, has them."""
    assert not hasattr(cache, "inc")
    assert cache.cache.inc("hits") == 1 and cache.cache.inc("hits") == 2
    assert cache.cache.dec("stock:A-1", delta=2) == -2
    assert cache.cache.get_or_set("report", lambda: {"rows": 3}, timeout=300) == {"rows": 3}
    assert cache.get("hits") == 2  # the same key through Flask-Caching's own get


def test_cache_set(app, cache):
    cache.set("hi", "hello")
    assert cache.get("hi") == "hello"


def test_cache_add(app, cache):
    cache.add("hi", "hello")
    assert cache.get("hi") == "hello"
    cache.add("hi", "foobar")
    assert cache.get("hi") == "hello"


def test_cache_delete(app, cache):
    cache.set("hi", "hello")
    cache.delete("hi")
    assert cache.get("hi") is None


def test_cache_delete_many(app, cache):
    cache.set("hi", "hello")
    cache.delete_many("ho", "hi")
    assert cache.get("hi") is None


def test_cache_unlink_falls_back_to_delete_many(app, cache):
    cache.set("biggerkey", "test" * 100)
    cache.unlink("biggerkey")
    assert cache.get("biggerkey") is None


def test_cache_cached_function(app, cache, clock):
    with app.test_request_context():

        @cache.cached(1, key_prefix="MyBits")
        def get_random_bits():
            return [random.randrange(0, 2) for i in range(50)]

        my_list = get_random_bits()
        his_list = get_random_bits()
        assert my_list == his_list

        clock.advance(2)
        for _ in range(10):  # 50 random bits could repeat by chance; 10 draws will not
            if get_random_bits() != my_list:
                break
        else:
            pytest.fail("the cached value did not expire")


def test_cached_none(app, cache):
    with app.test_request_context():
        from collections import Counter

        call_counter = Counter()

        @cache.cached(cache_none=True)  # without it, Flask-Caching recomputes None (SimpleCache too)
        def cache_none(param):
            call_counter[param] += 1
            return None

        cache_none(1)
        assert call_counter[1] == 1
        assert cache_none(1) is None
        assert call_counter[1] == 1

        cache.clear()

        cache_none(1)
        assert call_counter[1] == 2


def test_cache_forced_update(app, cache):
    from collections import Counter

    with app.test_request_context():
        need_update = False
        call_counter = Counter()

        @cache.cached(1, forced_update=lambda: need_update)
        def cached_function(param):
            call_counter[param] += 1
            return 1

        cached_function(1)
        assert call_counter[1] == 1
        assert cached_function(1) == 1
        assert call_counter[1] == 1
        need_update = True
        assert cached_function(1) == 1
        assert call_counter[1] == 2


def test_cached_view(app, cache, clock):
    counter = iter(range(10**6))

    @app.route("/")
    @cache.cached(datetime.timedelta(seconds=30))
    def view():
        return str(next(counter))

    tc = app.test_client()
    first = tc.get("/").data
    clock.advance(29)
    assert tc.get("/").data == first
    clock.advance(2)
    assert tc.get("/").data != first


def test_memoize(app, cache, clock):
    with app.test_request_context():

        @cache.memoize(3)
        def big_foo(a, b):
            return a + b + random.randrange(0, 100000)

        result = big_foo(5, 2)
        clock.advance(1)
        assert big_foo(5, 2) == result
        result2 = big_foo(5, 3)
        assert result2 != result
        clock.advance(3)
        assert big_foo(5, 2) != result
        clock.advance(1)
        assert big_foo(5, 3) != result2


def test_memoize_timeout(app, clock):
    app.config["CACHE_DEFAULT_TIMEOUT"] = 1
    cache = FlaskCache(app)
    with app.test_request_context():

        @cache.memoize()
        def big_foo(a, b):
            return a + b + random.randrange(0, 100000)

        result = big_foo(5, 2)
        assert big_foo(5, 2) == result
        clock.advance(2)
        assert big_foo(5, 2) != result


def test_memoize_delete(app, cache, clock):
    with app.test_request_context():

        @cache.memoize(5)
        def big_foo(a, b):
            return a + b + random.randrange(0, 100000)

        result = big_foo(5, 2)
        result2 = big_foo(5, 3)
        clock.advance(1)
        assert big_foo(5, 2) == result
        assert big_foo(5, 2) == result
        assert big_foo(5, 3) != result
        assert big_foo(5, 3) == result2

        cache.delete_memoized(big_foo)

        assert big_foo(5, 2) != result
        assert big_foo(5, 3) != result2


def test_memoize_no_timeout_delete(app, cache):
    with app.test_request_context():

        @cache.memoize()
        def big_foo(a, b):
            return a + b + random.randrange(0, 100000)

        result_a = big_foo(5, 1)
        result_b = big_foo(5, 2)
        assert big_foo(5, 1) == result_a
        assert big_foo(5, 2) == result_b
        cache.delete_memoized(big_foo, 5, 2)
        assert big_foo(5, 1) == result_a
        assert big_foo(5, 2) != result_b


def test_memoize_kwargs(app, cache):
    with app.test_request_context():

        @cache.memoize()
        def big_foo(a, b=None):
            return a + sum(b.values()) + random.randrange(0, 100000)

        result_a = big_foo(1, dict(one=1, two=2))
        result_b = big_foo(5, dict(three=3, four=4))
        assert big_foo(1, dict(one=1, two=2)) == result_a
        assert big_foo(5, dict(three=3, four=4)) == result_b
        cache.delete_memoized(big_foo, 1, dict(one=1, two=2))
        assert big_foo(1, dict(one=1, two=2)) != result_a
        assert big_foo(5, dict(three=3, four=4)) == result_b


def test_memoize_classfunc_delete(app, cache):
    with app.test_request_context():

        class Adder:
            def __init__(self, initial):
                self.initial = initial

            @cache.memoize()
            def add(self, b):
                return self.initial + b + random.random()

        adder1 = Adder(1)
        adder2 = Adder(2)
        a1 = adder1.add(3)
        a2 = adder2.add(3)
        assert a1 != a2
        assert adder1.add(3) == a1
        assert adder2.add(3) == a2

        cache.delete_memoized(adder1.add)
        a3 = adder1.add(3)
        a4 = adder2.add(3)
        assert a1 != a3
        assert a2 == a4

        cache.delete_memoized(Adder.add)
        a5 = adder1.add(3)
        a6 = adder2.add(3)
        assert a5 != a6
        assert a3 != a5
        assert a4 != a6


def test_default_timeout_config_timedelta(app):
    app.config["CACHE_DEFAULT_TIMEOUT"] = datetime.timedelta(minutes=2)
    cache = FlaskCache(app)
    assert cache.cache.default_timeout == 120


def test_serializer_setting_warns_not_crashes(app):
    # shmcache's codec serializes; Flask-Caching warns for backends without a
    # ``serializer`` attribute and carries on.
    from cachelib.serializers import SimpleSerializer

    app.config["CACHE_SERIALIZER"] = SimpleSerializer()
    with pytest.warns(UserWarning, match="does not use"):
        cache = FlaskCache(app)
    cache.set("k", [1, 2])
    assert cache.get("k") == [1, 2]


# -- several processes ---------------------------------------------------------------
def _flask_child(app_config, n):
    app = flask.Flask("child")
    app.config.update(app_config)
    fc = FlaskCache(app)
    with app.app_context():
        for _ in range(n):
            fc.cache.inc("hits")

        @fc.memoize(60)
        def slow(x):
            fc.cache.inc("slow-runs")
            return x * 2

        fc.set(f"child-{os.getpid()}", slow(21))


def test_backend_shared_by_processes(cache_name):
    config = dict(
        CACHE_TYPE="shmcache.contrib.flask.ShmCache",
        CACHE_SHMCACHE_NAME=cache_name,
        CACHE_SHMCACHE_SIZE="8MiB",
        CACHE_DEFAULT_TIMEOUT=0,
    )
    app = flask.Flask("parent")
    app.config.update(config)
    fc = FlaskCache(app)
    procs = [CTX.Process(target=_flask_child, args=(config, 100)) for _ in range(4)]
    try:
        with app.app_context():
            fc.set("warm", 1)  # creates the segment before the children attach
            for p in procs:
                p.start()
            deadline = time.monotonic() + 30
            for p in procs:
                p.join(max(0.1, deadline - time.monotonic()))
            assert [p.exitcode for p in procs] == [0] * 4
            assert fc.cache.get("hits") == 400
            assert {fc.get(f"child-{p.pid}") for p in procs} == {42}
            assert 1 <= fc.cache.get("slow-runs") <= 4  # memoize shares results (no single-flight in Flask-Caching)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        fc.cache._cache.close()
        Cache.unlink(cache_name)


def test_a_group_shared_cache_follows_the_pickle_trust_rule(cache_name, tmp_path, clock):
    # Issue 10: values are pickled only where nobody else can write the
    # segment; a group member's planted pickle never runs.
    import fractions

    from shmcache import PickleRefused

    marker = tmp_path / "ran"
    shared = ShmCache(cache_name, size="1MiB", mode=0o660, clock=clock)
    trusting = ShmCache(cache_name, mode=0o660, allow_pickle=True, clock=clock)
    try:
        shared.set("plain", [1, "two", {"x": b"3"}])
        assert shared.get("plain") == [1, "two", {"x": b"3"}]
        with pytest.raises(TypeError, match="does not trust pickle.*allow_pickle"):
            shared.set("obj", fractions.Fraction(1, 3))
        assert not shared.has("obj")
        with Cache(cache_name, mode=0o660, allow_pickle=True) as member:  # what any group member can do
            member.set(shared._key("planted"), Payload(str(marker)))
        for read in (lambda: shared.get("planted"), lambda: shared.get_many("plain", "planted")):
            with pytest.raises(PickleRefused, match="allow_pickle=True"):
                read()
        trusting.set("frac", fractions.Fraction(2, 3))
        assert trusting.get("frac") == fractions.Fraction(2, 3)
        assert not marker.exists()
    finally:
        shared._cache.close()
        trusting._cache.close()
