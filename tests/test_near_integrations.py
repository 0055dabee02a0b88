"""The near cache behind Django's and Flask-Caching's Redis backends, the
redis-py look-alike they use, and the gunicorn config's daemon command.

One real redis-server and one real daemon (tracking the prefixes the
backends use) for the whole module.
"""

from __future__ import annotations

import pytest

from near_support import REDIS, Host, RedisServer, wait_for
from payload import Payload
from shmcache.near import ENTRY_PREFIX, NearCache, NearRedis

redis = pytest.importorskip("redis", reason="the near extra (redis-py) is installed by make test")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server missing (make test installs it)")

PREFIXES = ["app:", "dj:", "fl:"]


def _redis_and_host(tmp_path_factory, tag, **kw):
    s = RedisServer().start()
    h = Host(s, tmp_path_factory.mktemp(tag), prefixes=PREFIXES, ping=0.25, tag=tag, **kw)
    try:
        h.start_daemon()
        yield s, h
    finally:
        h.close()
        s.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    yield from _redis_and_host(tmp_path_factory, "nint")


def kept(host, key: str) -> bool:
    return host.cache.get(ENTRY_PREFIX + key.encode()) is not None


# ------------------------------------------------------------- NearRedis
def test_near_redis_serves_reads_and_invalidates_its_writes(env):
    server, h = env
    plain = redis.Redis.from_url(server.url)
    with NearCache(h.cache, server.url, prefixes=["app:"]) as near:
        r = NearRedis(near)
        r.set("app:a", b"1")
        wait_for(lambda: r.get("app:a") == b"1" and kept(h, "app:a"), 10, "app:a kept")
        r.set(name="app:a", value=b"2")  # keyword form, as cachelib calls it
        assert not kept(h, "app:a") and r.get("app:a") == b"2"
        r.incr("app:n")
        r.mset({"app:m1": b"x", "app:m2": b"y"})
        assert r.mget(["app:m1", "app:m2", "app:none"]) == [b"x", b"y", None]
        assert r.mget("app:m1", "app:m2") == [b"x", b"y"]
        assert r.exists("app:m1", "app:none") == 1
        wait_for(lambda: r.get("app:m1") and kept(h, "app:m1"), 10, "app:m1 kept")
        pipe = r.pipeline(transaction=False)
        pipe.set("app:m1", b"z").expire("app:m1", 100)
        assert pipe.execute() == [True, True]
        assert not kept(h, "app:m1") and r.get("app:m1") == b"z"
        wait_for(lambda: r.get("app:m2") and kept(h, "app:m2"), 10, "app:m2 kept")
        r.delete("app:m2", "app:none")
        assert not kept(h, "app:m2") and r.get("app:m2") is None
        assert r.ttl("app:m1") > 0  # anything else is the client's own
        assert plain.get("app:m1") == b"z"
    plain.close()


# ------------------------------------------------------------- Django
def _django_backend(server, h, **options):
    from shmcache.contrib.django import NearRedisCache, ShmCache

    backend = ShmCache(h.name, {"KEY_PREFIX": "dj", "TIMEOUT": 300,
                                "OPTIONS": {"upstream": server.url, **options}})
    assert isinstance(backend, NearRedisCache)
    return backend


def test_django_backend_with_upstream_is_redis_cache_with_a_near_cache(env):
    from django.core.cache.backends.redis import RedisCache

    server, h = env
    c = _django_backend(server, h, max_ttl=30)
    d = RedisCache(server.url, {"KEY_PREFIX": "dj", "TIMEOUT": 300})  # what the app used before
    d.set("k", {"a": 1})
    assert c.get("k") == {"a": 1}  # same keys, same serializer
    wait_for(lambda: c.get("k") == {"a": 1} and kept(h, "dj:1:k"), 10, "dj:1:k kept")
    d.set("k", {"a": 2})  # another host writes through Django's plain RedisCache
    wait_for(lambda: not kept(h, "dj:1:k"), 5, "the invalidation")
    assert c.get("k") == {"a": 2}
    c.set("k", "mine")
    assert c.get("k") == "mine" and d.get("k") == "mine"  # read-your-write at once
    assert c.add("k", "no") is False and c.add("k2", 5) is True
    assert c.incr("k2", 3) == 8 and c.get("k2") == 8
    with pytest.raises(ValueError):
        c.incr("missing")
    c.set_many({"m1": 1, "m2": [2]})
    assert c.get_many(["m1", "m2", "none"]) == {"m1": 1, "m2": [2]}
    assert c.has_key("m1") and not c.has_key("none")
    assert c.touch("m1", 100) and c.delete("m1") and c.get("m1") is None
    c.delete_many(["m2", "k2"])
    assert c.get_many(["m2", "k2"]) == {}
    assert c.get_or_set("gos", lambda: "computed") == "computed" and d.get("gos") == "computed"
    d.close()
    c.close()


def test_django_backend_with_upstream_refuses_bad_options(env):
    from django.core.exceptions import ImproperlyConfigured

    from shmcache.contrib.django import ShmCache

    server, h = env
    with pytest.raises(ImproperlyConfigured, match="max_ttl"):
        ShmCache(h.name, {"OPTIONS": {"upstream": server.url, "max_ttl": 0}})
    with pytest.raises(ImproperlyConfigured, match="prefixes"):
        ShmCache(h.name, {"OPTIONS": {"upstream": server.url, "near_prefixes": "dj:"}})


# ------------------------------------------------------------- Flask
def test_flask_backend_with_upstream_is_redis_cache_with_a_near_cache(env):
    import flask
    import flask_caching

    from shmcache.contrib.flask import NearRedisCache

    server, h = env
    app = flask.Flask(__name__)
    app.config.update(CACHE_TYPE="shmcache.contrib.flask.ShmCache", CACHE_SHMCACHE_NAME=h.name,
                      CACHE_SHMCACHE_UPSTREAM=server.url, CACHE_KEY_PREFIX="fl:", CACHE_DEFAULT_TIMEOUT=300)
    cache = flask_caching.Cache(app)
    with app.app_context():
        backend = cache.cache
        assert isinstance(backend, NearRedisCache)
        before = flask.Flask("before")
        before.config.update(CACHE_TYPE="RedisCache", CACHE_REDIS_URL=server.url, CACHE_KEY_PREFIX="fl:")
        plain = flask_caching.Cache(before)
        with before.app_context():
            plain.set("k", {"v": 1})
        assert cache.get("k") == {"v": 1}
        wait_for(lambda: cache.get("k") == {"v": 1} and kept(h, "fl:k"), 10, "fl:k kept")
        with before.app_context():
            plain.set("k", {"v": 2})
        wait_for(lambda: not kept(h, "fl:k"), 5, "the invalidation")
        assert cache.get("k") == {"v": 2}
        cache.set("k", 3)
        assert cache.get("k") == 3  # read-your-write at once
        assert backend.inc("n") == 1 and backend.inc("n") == 2 and cache.get("n") == 2
        cache.set_many({"a": 1, "b": 2})
        assert cache.get_many("a", "b", "c") == [1, 2, None]
        assert cache.has("a") and cache.delete("a") and not cache.has("a")
        assert backend.near.stats()["near_hits"] >= 1


def test_flask_shmcache_without_upstream_is_unchanged(env, cache_name):
    from shmcache import Cache
    from shmcache.contrib.flask import ShmCache

    c = ShmCache(cache_name, size="4MiB")
    assert type(c) is ShmCache
    c.set("x", 1)
    assert c.get("x") == 1
    Cache.unlink(cache_name)


# ------------------------------------------------------------- gunicorn
def test_gunicorn_config_starts_the_daemon_with_upstream_when_asked():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "gconf", os.path.join(os.path.dirname(__file__), "..", "workers", "gunicorn_conf.py"))
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    plain = conf.daemon_command({"SHMCACHE_NAME": "n"})
    assert "--upstream" not in plain
    cmd = conf.daemon_command({"SHMCACHE_NAME": "n", "SHMCACHE_UPSTREAM": "redis://:s3cret@127.0.0.1:1/0",
                               "SHMCACHE_TRACK_PREFIX": "app:, dj:"})
    # the daemon reads SHMCACHE_UPSTREAM from the environment it inherits: no password in ps
    assert "--upstream" not in cmd and not any("s3cret" in a for a in cmd)
    assert [cmd[j + 1] for j, a in enumerate(cmd) if a == "--track-prefix"] == ["app:", "dj:"]


# ------------------------------------------------------------- pickle trust
@pytest.fixture(scope="module")
def group_env(tmp_path_factory):
    """A host whose cache is shared with a group (mode 0660): shmcache does not trust pickle there."""
    yield from _redis_and_host(tmp_path_factory, "ngrp", cache_options={"mode": 0o660}, extra=["--mode", "660"])


def _plant(h, redis_key: str, payload: bytes) -> None:
    """What any user who can write the segment can do: overwrite the near
    cache's valid copy of ``redis_key`` with bytes of their choosing."""
    from shmcache.near import HDR

    lk = ENTRY_PREFIX + redis_key.encode()
    old = h.cache.get(lk)
    assert old is not None, "fill the key first"
    h.cache.set(lk, old[:HDR.size] + payload, ttl=30)


@pytest.mark.parametrize("backend", ["django", "flask", "near"])
def test_a_pickle_planted_in_a_group_shared_near_cache_never_runs(group_env, tmp_path, backend):
    """Regression: the near backends unpickled whatever shared memory held,
    so any user able to write a group-shared segment could run code in
    every worker. They now follow the core's rule (README "Security")."""
    import pickle

    server, h = group_env
    marker = tmp_path / "ran"
    payload = pickle.dumps(Payload(str(marker)))
    if backend == "django":
        c = _django_backend(server, h, mode=0o660)
        c.set("t", {"plain": [1, "two", b"3"]})  # plain containers still work
        key = c.make_key("t")
        wait_for(lambda: c.get("t") == {"plain": [1, "two", b"3"]} and kept(h, key), 10, "the Django value kept")
        with pytest.raises(TypeError, match="does not trust pickle"):
            c.set("obj", Payload(str(marker)))  # refused before it reaches Redis, as the core does
        _plant(h, key, payload)
        read = lambda: c.get("t")  # noqa: E731
    elif backend == "flask":
        from shmcache.contrib.flask import ShmCache

        c = ShmCache(h.name, upstream=server.url, key_prefix="fl:", mode=0o660)
        c.set("t", {"plain": [1, "two"]})
        wait_for(lambda: c.get("t") == {"plain": [1, "two"]} and kept(h, "fl:t"), 10, "the Flask value kept")
        _plant(h, "fl:t", b"!" + payload)
        read = lambda: c.get("t")  # noqa: E731
    else:
        c = NearCache(h.cache, server.url, prefixes=["app:"], serializer=pickle)
        c.set("app:t", ("plain", 1))
        wait_for(lambda: c.get("app:t") == ("plain", 1) and kept(h, "app:t"), 10, "the value kept")
        _plant(h, "app:t", payload)
        read = lambda: c.get("app:t")  # noqa: E731
    from shmcache import PickleRefused

    def refused():
        # A read made while the heartbeat looks late goes to Redis (and gets
        # the safe value): retry until the planted copy is what is read.
        try:
            read()
        except PickleRefused as e:
            assert "needs posix.system" in str(e)  # names the global it would have called
            return True
        return False

    wait_for(refused, 10, "the planted copy to be read, and refused")
    assert not marker.exists()


def test_a_private_near_cache_or_allow_pickle_keeps_full_pickle(env, group_env):
    import fractions

    server, h = env  # a 0600 cache: nobody else can write it
    c = _django_backend(server, h)
    c.set("frac", fractions.Fraction(1, 3))
    wait_for(lambda: c.get("frac") == fractions.Fraction(1, 3) and kept(h, c.make_key("frac")), 10, "kept")
    gserver, g = group_env
    trusting = _django_backend(gserver, g, mode=0o660, allow_pickle=True)
    trusting.set("frac", fractions.Fraction(2, 3))
    wait_for(lambda: trusting.get("frac") == fractions.Fraction(2, 3) and kept(g, trusting.make_key("frac")),
             10, "kept")
