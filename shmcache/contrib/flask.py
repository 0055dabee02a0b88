"""Flask-Caching backend: every worker process of an app shares one cache.

::

    app.config.update(
        CACHE_TYPE="shmcache.contrib.flask.ShmCache",
        CACHE_SHMCACHE_NAME="myapp",        # the shmcache name (/dev/shm/shmcache.myapp)
        CACHE_SHMCACHE_SIZE="256MiB",
        CACHE_DEFAULT_TIMEOUT=300,
    )
    cache = flask_caching.Cache(app)

The backend contract is cachelib's ``BaseCache``, as Flask-Caching's own
backends honour it: ``timeout=None`` means the default timeout, ``0`` means
never expire, a negative one expires at once; a ``timedelta`` works too.
``get`` returns None for a miss; ``set``/``add`` return whether they stored;
``delete_many`` returns the keys that are gone; ``inc``/``dec`` start a
missing key at 0 (with the default timeout, as ``SimpleCache`` does) and are
atomic across processes for ints. ``clear()`` removes the keys under
``CACHE_KEY_PREFIX`` (like ``RedisCache``), or every key when the prefix is
empty. Keys longer than the segment's ``max_key_size`` are stored under a
SHA-256 digest. ``CACHE_OPTIONS`` may carry any :class:`shmcache.Cache`
argument (``size``, ``max_value_size``, ``lock_timeout``, ``clock``...).
Values are pickled only in a cache no other user can write; a cache shared
with a group (``"mode": 0o660``) stores strings, numbers, bytes and plain
containers unless ``"allow_pickle": True`` (README section "Security").

**A near cache in front of Redis** (see :mod:`shmcache.near`): with
``CACHE_SHMCACHE_UPSTREAM="redis://10.0.0.5:6379/0"`` (or ``upstream=`` in
``CACHE_OPTIONS`` or the constructor) the backend becomes Flask-Caching's own
``RedisCache`` (same serializer, key prefix and semantics, so an app moving
from ``CACHE_TYPE="RedisCache"`` keeps its data) whose reads are served from
this host's shared memory, kept coherent by ``shmcache daemon --name NAME
--upstream URL --track-prefix <CACHE_KEY_PREFIX>`` on each host.
``near_prefixes`` (default ``[CACHE_KEY_PREFIX]``, or every tracked key),
``max_ttl`` and ``neg_ttl`` go to :class:`~shmcache.near.NearCache`.
"""

from __future__ import annotations

import datetime as dt
import logging
import pickle
from typing import Any

from flask_caching.backends.base import BaseCache
from cachelib.serializers import RedisSerializer
from flask_caching.backends.rediscache import RedisCache as FlaskRedisCache

from .. import stampede
from ..errors import ValueTooLarge
from . import _number, fit_key, max_key_size, shared_cache

logger = logging.getLogger("shmcache.contrib.flask")

_MISSING = object()


class ShmCache(BaseCache):
    """Flask-Caching backend over the shmcache segment ``name``.

    Args:
        name: the shmcache name (default ``"flask"``).
        default_timeout: seconds (or timedelta) for ``timeout=None``; 0 = never.
        ignore_delete_many_errors: as every Flask-Caching backend.
        key_prefix: str (or a function returning one) put before every key.
        stampede_timeout: seconds ``get_or_set`` waits for another process.
        **options: :class:`shmcache.Cache` arguments (``size``...).

    Raises:
        TypeError / ValueError: an unknown option, a bad name or size.
    """

    def __new__(cls, *args, upstream=None, **kwargs):
        if cls is ShmCache and upstream:
            return NearRedisCache(*args, upstream=upstream, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        name: str = "flask",
        default_timeout: int | dt.timedelta = 300,
        ignore_delete_many_errors: bool = False,
        key_prefix: Any = "",
        stampede_timeout: float = stampede.DEFAULT_TIMEOUT,
        **options,
    ) -> None:
        super().__init__(default_timeout=default_timeout, ignore_delete_many_errors=ignore_delete_many_errors)
        self.key_prefix = key_prefix or ""
        self.stampede_timeout = stampede.check_timeout(_number(stampede_timeout, "stampede_timeout"), "stampede_timeout")  # not at the first get_or_set
        self._cache = shared_cache(name, **options)
        self._max_key = max_key_size(self._cache)

    @classmethod
    def factory(cls, app, config, args, kwargs):
        """Build the backend from the Flask config (``CACHE_SHMCACHE_NAME``,
        ``CACHE_SHMCACHE_SIZE``, ``CACHE_KEY_PREFIX``, ``CACHE_OPTIONS``)."""
        kwargs.setdefault("name", config.get("CACHE_SHMCACHE_NAME") or "flask")
        if config.get("CACHE_SHMCACHE_SIZE"):
            kwargs.setdefault("size", config["CACHE_SHMCACHE_SIZE"])
        if config.get("CACHE_KEY_PREFIX"):
            kwargs.setdefault("key_prefix", config["CACHE_KEY_PREFIX"])
        if config.get("CACHE_SHMCACHE_UPSTREAM"):
            kwargs.setdefault("upstream", config["CACHE_SHMCACHE_UPSTREAM"])
        return cls(*args, **kwargs)

    # -- helpers ------------------------------------------------------------
    def _prefix(self) -> str:
        p = self.key_prefix
        return p if isinstance(p, str) else p()

    def _key(self, key: str) -> str:
        return fit_key(f"{self._prefix()}{key}", self._max_key)

    def _ttl(self, timeout):
        """Seconds for the core (None = never), or 0 for "expired already"."""
        t = self._normalize_timeout(timeout)
        if t == 0:
            return None
        return t if t > 0 else 0

    # -- the backend contract -------------------------------------------------
    def get(self, key: str) -> Any:
        """The value of ``key``, or None if absent or expired."""
        return self._cache.get(self._key(key))

    def set(self, key: str, value: Any, timeout=None) -> bool:
        """Store ``value``; False if it could not be (too large: the old value is dropped).

        Raises:
            TypeError: the value cannot be pickled.
        """
        k = self._key(key)
        ttl = self._ttl(timeout)
        if ttl == 0:
            self._cache.delete(k)
            return True
        try:
            return self._cache.set(k, value, ttl)
        except ValueTooLarge as e:
            self._cache.delete(k)
            logger.warning("%s", e)
            return False

    def add(self, key: str, value: Any, timeout=None) -> bool:
        """Store ``value`` only if ``key`` is absent (atomic across processes).

        Raises:
            TypeError: the value cannot be pickled.
        """
        k = self._key(key)
        ttl = self._ttl(timeout)
        if ttl == 0:
            return k not in self._cache
        try:
            return self._cache.add(k, value, ttl)
        except ValueTooLarge as e:
            logger.warning("%s", e)
            return False

    def delete(self, key: str) -> bool:
        """Remove ``key``; whether it existed."""
        return self._cache.delete(self._key(key))

    def get_many(self, *keys: str) -> list:
        """The values of ``keys`` in order (None for misses)."""
        get = self._cache.get
        return [get(self._key(k)) for k in keys]

    def set_many(self, mapping, timeout=None) -> list:
        """Store every item; returns the keys stored."""
        return [key for key, value in mapping.items() if self.set(key, value, timeout)]

    def delete_many(self, *keys: str) -> list:
        """Remove ``keys``; returns them (a key that is gone counts as deleted)."""
        self._cache.delete_many([self._key(k) for k in keys])
        return list(keys)

    def has(self, key: str) -> bool:
        """True if ``key`` is present and unexpired."""
        return self._key(key) in self._cache

    def clear(self) -> bool:
        """Remove the keys under this backend's prefix (every key if it has none)."""
        prefix = self._prefix()
        if not prefix:
            self._cache.clear()
        else:
            self._cache.delete_many([k for k in self._cache.keys() if isinstance(k, str) and k.startswith(prefix)])
        return True

    def inc(self, key: str, delta: int = 1) -> Any:
        """Add ``delta`` (a missing key starts at 0) and return the new value.

        Raises:
            TypeError: the stored value does not support ``+ delta``.
        """
        k = self._key(key)
        ttl = self._ttl(None)
        try:
            return self._cache.incr(k, delta, default=0, ttl=ttl or None)
        except TypeError:
            pass  # a float or other number: cachelib's get + set
        value = (self._cache.get(k) or 0) + delta
        return value if self.set(key, value) else None

    def dec(self, key: str, delta: int = 1) -> Any:
        """Subtract ``delta`` (a missing key starts at 0) and return the new value."""
        return self.inc(key, -delta)

    def get_or_set(self, key: str, factory, timeout=None) -> Any:
        """The value of ``key``; if absent, ``factory()`` computed once across
        processes (see :mod:`shmcache.stampede`), stored and returned.

        Raises:
            whatever ``factory`` raises.
        """
        ttl = self._ttl(timeout)
        if ttl == 0:
            return factory()
        return stampede.get_or_set(self._cache, self._key(key), factory, ttl, self.stampede_timeout)


class NearRedisCache(FlaskRedisCache):
    """``ShmCache`` with ``upstream``: Flask-Caching's ``RedisCache`` whose reads
    come from this host's near cache. See the module docstring.

    Args:
        name: the shmcache segment (default ``"flask"``).
        upstream: a Redis URL (see :func:`shmcache.near.connect`) or a redis-py client.
        default_timeout, key_prefix: as ``RedisCache``.
        near_prefixes, max_ttl, neg_ttl: as :class:`~shmcache.near.NearCache`.
        **options: :class:`shmcache.Cache` arguments (``size``...).

    Raises:
        TypeError / ValueError: an unknown option or a bad setting.
    """

    def __init__(self, name: str = "flask", upstream=None, default_timeout=300, key_prefix="",
                 near_prefixes=None, max_ttl: float = 60.0, neg_ttl: float | None = None,
                 ignore_delete_many_errors: bool = False, **options):
        from ..near import NearCache, NearRedis, connect

        cache = shared_cache(name, **options)
        client = connect(upstream) if isinstance(upstream, str) else upstream
        if near_prefixes is None and isinstance(key_prefix, str) and key_prefix:
            near_prefixes = [key_prefix]
        self.near = NearCache(cache, client, near_prefixes, max_ttl=max_ttl, neg_ttl=neg_ttl)
        super().__init__(host=NearRedis(self.near), default_timeout=default_timeout, key_prefix=key_prefix,
                         ignore_delete_many_errors=ignore_delete_many_errors)
        # Values read from shared memory were written by whoever can write the
        # segment: unpickle them under the cache's rule (shmcache.near.TrustedPickle).
        self.serializer = _TrustedRedisSerializer(self.near.pickle)


class _TrustedRedisSerializer(RedisSerializer):
    """cachelib's ``RedisSerializer`` (ints as ASCII, the rest ``!`` + pickle)
    whose pickles follow the near cache's pickle trust. A refused pickle
    raises ``PickleRefused`` instead of reading as a miss: it was planted."""

    def __init__(self, trusted):
        self._trusted = trusted

    def dumps(self, value, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
        if type(value) is int:
            return str(value).encode("ascii")
        return b"!" + self._trusted.dumps(value, protocol)

    def loads(self, value):
        if value is None:
            return None
        if value.startswith(b"!"):
            try:
                return self._trusted.loads(value[1:])
            except pickle.PickleError:  # (PickleRefused is not one: it propagates)
                return None
        try:
            return int(value)
        except ValueError:
            return value
