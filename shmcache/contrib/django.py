"""Django cache backend: every worker process of a site shares one cache.

::

    CACHES = {
        "default": {
            "BACKEND": "shmcache.contrib.django.ShmCache",
            "LOCATION": "myapp",            # the shmcache name (/dev/shm/shmcache.myapp)
            "TIMEOUT": 300,
            "OPTIONS": {"size": "256MiB"},
        }
    }

It behaves like Django's ``LocMemCache`` (the reference for every choice
below), except that the data lives in shared memory:

- timeouts: ``None`` = forever, ``0`` or negative = expire at once (nothing
  is stored and an existing value is removed), default ``TIMEOUT`` (300);
- ``KEY_PREFIX`` / ``VERSION`` / ``KEY_FUNCTION`` and memcached key warnings
  come from ``BaseCache``; keys longer than the segment's ``max_key_size`` are
  stored under a SHA-256 digest;
- ``incr``/``decr`` of a missing key raise ``ValueError``; of a non-number
  ``TypeError``; ints are updated atomically across processes in place, other
  numbers (float, Decimal) as ``LocMemCache`` does (value + delta);
- culling only when ``MAX_ENTRIES`` is given in ``OPTIONS`` (Django's
  memcached and Redis backends ignore it; by default the segment's own LRU
  bounds memory): before storing, if ``MAX_ENTRIES`` entries are stored,
  ``1/CULL_FREQUENCY`` of them are dropped (expired first, then least
  recently used); ``CULL_FREQUENCY`` 0 clears everything;
- django-redis' extras: ``ttl``, ``expire``, ``persist``, ``keys``,
  ``iter_keys``, ``delete_pattern``, ``lock``, and ``raw`` (the
  :class:`shmcache.Cache` itself);
- a value over the segment's ``max_value_size`` is not stored and the old
  value is removed (what Django's memcached backends do);
- ``get_or_set`` is stampede-protected: the callable runs once across all
  processes (see :mod:`shmcache.stampede`); ``"stampede_timeout"`` (seconds,
  default 10) bounds the wait;
- ``close()`` keeps the segment mapped (Django calls it at the end of every
  request); all backend objects of a process share one handle, forked workers
  claim their own client slot.

**A near cache in front of Redis** (see :mod:`shmcache.near`): give
``OPTIONS["upstream"]`` and the backend becomes Django's own ``RedisCache``
(same key format, serializer, timeouts and semantics, so an app moving from
``django.core.cache.backends.redis.RedisCache`` keeps its data by changing
BACKEND and adding ``upstream``) whose reads are served from this host's
shared memory::

    "default": {
        "BACKEND": "shmcache.contrib.django.ShmCache",
        "LOCATION": "myapp",              # the shmcache segment
        "KEY_PREFIX": "myapp",
        "OPTIONS": {"upstream": "redis://10.0.0.5:6379/0", "max_ttl": 60},
    }

with ``shmcache daemon --name myapp --upstream redis://10.0.0.5:6379/0
--track-prefix myapp:`` on each host. ``near_prefixes`` (default
``["<KEY_PREFIX>:"]``, or every tracked key without a prefix), ``max_ttl`` and
``neg_ttl`` go to :class:`~shmcache.near.NearCache`; :class:`shmcache.Cache`
arguments size the segment; the rest (``db``, ``pool_class``,
``parser_class``, ``serializer``...) are ``RedisCache``'s. Reads and writes
both go to the upstream named first (a replica could answer a fill with a
value older than an invalidation already applied).

The remaining ``OPTIONS`` are :class:`shmcache.Cache` arguments (``size``,
``stripes``, ``max_items``, ``max_key_size``, ``max_value_size``,
``max_clients``, ``policy``, ``mode``, ``lock_timeout``, ``clock``,
``serializer``, ``owner``, ``allow_pickle``); the size and layout ones only
matter to the process that creates the segment. Django pickles what it
caches, and so does this backend, but only for a cache no other user can
write: a cache shared with a group (``"mode": 0o660``) stores strings,
numbers, bytes and plain containers, and refuses model instances and other
objects unless ``"allow_pickle": True`` says every writer is trusted (see the
README section "Security").
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re

from asgiref.sync import sync_to_async
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache, default_key_func
from django.core.cache.backends.redis import RedisCache, RedisCacheClient, RedisSerializer
from django.core.exceptions import ImproperlyConfigured

from .. import admin, stampede
from ..cache import Cache
from ..errors import ValueTooLarge
from . import CACHE_OPTIONS, KeyLock, _number, fit_key, lru_keys, max_key_size, shared_cache, stored_items

logger = logging.getLogger("shmcache.contrib.django")

_MISSING = object()
_EXPIRED = object()  # a timeout of 0 or less: Django's "expire immediately"
_OWN_OPTIONS = {"MAX_ENTRIES", "CULL_FREQUENCY", "stampede_timeout"}


def _reraise_pickle_error(e: TypeError):
    # The codec wraps pickling failures in TypeError; Django's backends let
    # the pickle module's own exception (PickleError, AttributeError...) through.
    if e.__cause__ is not None and str(e).startswith("cannot pickle value"):
        raise e.__cause__ from None
    raise e


class ShmCache(BaseCache):
    """Django cache backend storing into a shmcache segment named ``LOCATION``.

    Raises (at construction):
        ImproperlyConfigured: an unknown ``OPTIONS`` key, or a bad name or size.
    """

    def __new__(cls, location=None, params=None, *args, **kwargs):
        # OPTIONS["upstream"]: the near cache in front of Redis instead.
        if cls is ShmCache and params and (params.get("OPTIONS") or {}).get("upstream"):
            return NearRedisCache(location, params)
        return super().__new__(cls)

    def __init__(self, location, params):
        super().__init__(params)
        options = dict(params.get("OPTIONS") or {})
        if options.get("MAX_ENTRIES") is None and "max_entries" not in params:
            # Culling only when MAX_ENTRIES is given, as Django's memcached and
            # Redis backends ignore it: LocMemCache's default of 300 would keep
            # 300 entries of a 256 MiB segment, at ~100x the cost per set
            # (culling scans the index). The segment's own LRU bounds memory.
            self._max_entries = None
        unknown = set(options) - CACHE_OPTIONS - _OWN_OPTIONS
        if unknown:
            raise ImproperlyConfigured(
                f"ShmCache: unknown OPTIONS {sorted(unknown)}; known: "
                f"{sorted(CACHE_OPTIONS | _OWN_OPTIONS)}"
            )
        try:  # checked now: a NaN or inf only failed at the first get_or_set
            self._stampede_timeout = stampede.check_timeout(_number(options.pop("stampede_timeout", stampede.DEFAULT_TIMEOUT), "stampede_timeout"),
                                                           "stampede_timeout")
        except (TypeError, ValueError) as e:
            raise ImproperlyConfigured(f"ShmCache: OPTIONS stampede_timeout: {e}") from e
        for k in _OWN_OPTIONS:
            options.pop(k, None)
        self._name = location or "django"
        try:
            self._cache = shared_cache(self._name, **options)
        except (TypeError, ValueError) as e:
            raise ImproperlyConfigured(f"ShmCache {self._name!r}: {e}") from e
        self._max_key = max_key_size(self._cache)

    # -- helpers ------------------------------------------------------------
    def _key(self, key, version=None) -> str:
        return fit_key(self.make_and_validate_key(key, version=version), self._max_key)

    def _ttl(self, timeout):
        """Seconds for the core (None = forever), or _EXPIRED."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        if timeout is None:
            return None
        timeout = float(timeout)
        if timeout <= 0:
            return _EXPIRED
        return timeout

    def _cull_if_full(self) -> None:
        # LocMemCache._set: cull before storing when MAX_ENTRIES are stored.
        if self._max_entries is None or stored_items(self._cache) < self._max_entries:
            return
        if self._cull_frequency == 0:
            self._cache.clear()
            return
        n = stored_items(self._cache) // self._cull_frequency
        self._cache.delete_many(lru_keys(self._cache, n))

    def _store(self, k: str, value, ttl) -> bool:
        self._cull_if_full()
        try:
            return self._cache.set(k, value, ttl)
        except TypeError as e:
            _reraise_pickle_error(e)
        except ValueTooLarge as e:
            # Like Django's memcached backends: never leave the old value behind.
            self._cache.delete(k)
            logger.warning("%s", e)
            return False

    # -- the BaseCache contract ---------------------------------------------
    def add(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        """Store ``value`` only if ``key`` is absent; True if stored. Atomic across
        processes. Raises the pickling error of an unpicklable value."""
        k = self._key(key, version)
        ttl = self._ttl(timeout)
        if k in self._cache:
            return False
        if ttl is _EXPIRED:
            return True  # LocMemCache stores it already expired
        self._cull_if_full()
        try:
            return self._cache.add(k, value, ttl)
        except TypeError as e:
            _reraise_pickle_error(e)
        except ValueTooLarge as e:
            logger.warning("%s", e)
            return False

    def get(self, key, default=None, version=None):
        """The value of ``key``, or ``default`` if absent or expired."""
        return self._cache.get(self._key(key, version), default)

    def set(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        """Store ``value`` under ``key`` (timeout 0 or less removes it instead).
        Raises the pickling error of an unpicklable value."""
        k = self._key(key, version)
        ttl = self._ttl(timeout)
        if ttl is _EXPIRED:
            self._cache.delete(k)
            return
        self._store(k, value, ttl)

    def touch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        """Give ``key`` a new timeout; False if it is absent or expired."""
        k = self._key(key, version)
        ttl = self._ttl(timeout)
        if ttl is _EXPIRED:
            return self._cache.delete(k)
        return self._cache.touch(k, ttl)

    def delete(self, key, version=None):
        """Remove ``key``; True if it was there."""
        return self._cache.delete(self._key(key, version))

    def get_many(self, keys, version=None):
        """``{key: value}`` for the keys present (a cached None included)."""
        made = {self._key(key, version): key for key in keys}
        found = self._cache.get_many(list(made))
        return {made[k]: v for k, v in found.items()}

    def set_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        """Store every item; returns the keys that could not be stored (too large)."""
        ttl = self._ttl(timeout)
        made = [(self._key(key, version), key, value) for key, value in data.items()]
        if ttl is _EXPIRED:
            self._cache.delete_many([k for k, _key, _v in made])
            return []
        if self._max_entries is None:
            try:
                self._cache.set_many({k: v for k, _key, v in made}, ttl)
                return []
            except TypeError as e:
                _reraise_pickle_error(e)
            except ValueTooLarge:
                pass  # find out which ones, one by one
        return [key for k, key, value in made if self._store(k, value, ttl) is False]

    def delete_many(self, keys, version=None):
        """Remove every key in ``keys``."""
        self._cache.delete_many([self._key(key, version) for key in keys])

    def has_key(self, key, version=None):
        """True if ``key`` is present and unexpired."""
        return self._key(key, version) in self._cache

    def incr(self, key, delta=1, version=None):
        """Add ``delta`` to the number under ``key`` and return it; ints change
        atomically across processes, keeping the key's expiry.

        Raises:
            ValueError: the key is absent.
            TypeError: the value does not support ``+ delta``.
        """
        k = self._key(key, version)
        try:
            return self._cache.incr(k, delta, default=None)
        except KeyError:
            raise ValueError("Key '%s' not found" % k) from None
        except TypeError:
            pass  # not an int64-able int (float, Decimal, None...): LocMemCache's way
        value = self._cache.get(k, _MISSING)
        if value is _MISSING:
            raise ValueError("Key '%s' not found" % k)
        new_value = value + delta
        try:
            remaining = self._cache.ttl(k)
        except KeyError:
            raise ValueError("Key '%s' not found" % k) from None
        if remaining is not None and remaining <= 0:
            raise ValueError("Key '%s' not found" % k)
        self._cache.set(k, new_value, remaining)
        return new_value

    def clear(self):
        """Remove every entry of the segment (all aliases sharing ``LOCATION``)."""
        self._cache.clear()

    def close(self, **kwargs):
        """Nothing to do: the mapping stays for the next request."""

    def get_or_set(self, key, default, timeout=DEFAULT_TIMEOUT, version=None):
        """The value of ``key``; if absent, store ``default`` (or its result if
        callable; computed once across processes) and return what is stored.

        Raises:
            whatever the callable raises; the pickling error of an unpicklable value.
        """
        k = self._key(key, version)
        v = self._cache.get(k, _MISSING)
        if v is not _MISSING:
            return v
        ttl = self._ttl(timeout)
        if ttl is _EXPIRED:
            return super().get_or_set(key, default, timeout=timeout, version=version)
        factory = default if callable(default) else (lambda: default)
        self._cull_if_full()
        try:
            return stampede.get_or_set(self._cache, k, factory, ttl, self._stampede_timeout)
        except TypeError as e:
            _reraise_pickle_error(e)
        except ValueTooLarge as e:
            logger.warning("%s", e)
            return default() if callable(default) else default

    # -- django-redis extras --------------------------------------------------
    @property
    def raw(self) -> Cache:
        """The :class:`shmcache.Cache` under this backend (shared by every alias
        with the same ``LOCATION``): for ``get_or_set`` with a ttl, ``memoize``,
        ``shmcache.admin``, ``shmcache.aio.AsyncCache(cache.raw)``... Keys there
        are raw: Django's prefix and version are not applied."""
        return self._cache

    def ttl(self, key, version=None):
        """Seconds until ``key`` expires (django-redis): None if it never does,
        0 if it is absent or expired."""
        try:
            left = self._cache.ttl(self._key(key, version))
        except KeyError:
            return 0
        return None if left is None else max(0, int(math.ceil(left)))

    def expire(self, key, timeout, version=None):
        """Give ``key`` a new timeout in seconds (django-redis; ``None`` = never
        expire, 0 or less deletes it). False if it is absent."""
        return self.touch(key, timeout, version)

    def persist(self, key, version=None):
        """Remove ``key``'s expiry (django-redis). False if it is absent."""
        return self._cache.persist(self._key(key, version))

    def _raw_pattern(self, search, version):
        # The pattern goes through KEY_PREFIX, VERSION and KEY_FUNCTION like a
        # key, so '*' matches inside this alias's namespace only.
        return re.compile(fnmatch.translate(self.make_key(search, version=version)), re.DOTALL)

    def _user_key(self, raw: str) -> str:
        # The inverse of Django's default key function ("prefix:version:key");
        # with a custom KEY_FUNCTION the stored key is returned as it is.
        if self.key_func is default_key_func:
            return raw.split(":", 2)[2]
        return raw

    def iter_keys(self, search="*", version=None, itersize=None):
        """The keys matching the glob ``search`` (django-redis), one stripe at
        a time, without this alias's prefix and version. Keys longer than the
        segment's ``max_key_size`` are stored under a digest and never match."""
        rx = self._raw_pattern(search, version)
        for e in admin.entries(self._cache):
            if isinstance(e.key, str) and rx.match(e.key):
                yield self._user_key(e.key)

    def keys(self, search="*", version=None):
        """A list of :meth:`iter_keys` (django-redis's ``keys``)."""
        return list(self.iter_keys(search, version))

    def delete_pattern(self, pattern, version=None, prefix=None, itersize=None):
        """Delete every key matching the glob ``pattern`` (django-redis).
        Returns how many were deleted."""
        rx = self._raw_pattern(pattern, version)
        raw = [e.key for e in admin.entries(self._cache) if isinstance(e.key, str) and rx.match(e.key)]
        return self._cache.delete_many(raw)

    def lock(self, key, timeout=None, sleep=0.1, blocking=True, blocking_timeout=None, version=None):
        """A lock shared by every process (django-redis / redis-py ``Lock``):
        ``with cache.lock("report", timeout=30): ...``. It is an entry under
        ``key`` (prefixed and versioned like any key) that lives ``timeout``
        seconds at most (None: until released). See :class:`shmcache.contrib.KeyLock`."""
        return KeyLock(self._cache, self._key(key, version), timeout=timeout, sleep=sleep, blocking=blocking,
                       blocking_timeout=blocking_timeout)

    # -- async: memory operations run inline (microseconds, no I/O) ---------
    async def aadd(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        """As :meth:`add`."""
        return self.add(key, value, timeout, version)

    async def aget(self, key, default=None, version=None):
        """As :meth:`get`."""
        return self.get(key, default, version)

    async def aset(self, key, value, timeout=DEFAULT_TIMEOUT, version=None):
        """As :meth:`set`."""
        return self.set(key, value, timeout, version)

    async def atouch(self, key, timeout=DEFAULT_TIMEOUT, version=None):
        """As :meth:`touch`."""
        return self.touch(key, timeout, version)

    async def adelete(self, key, version=None):
        """As :meth:`delete`."""
        return self.delete(key, version)

    async def aget_many(self, keys, version=None):
        """As :meth:`get_many`."""
        return self.get_many(keys, version)

    async def aset_many(self, data, timeout=DEFAULT_TIMEOUT, version=None):
        """As :meth:`set_many`."""
        return self.set_many(data, timeout, version)

    async def adelete_many(self, keys, version=None):
        """As :meth:`delete_many`."""
        return self.delete_many(keys, version)

    async def ahas_key(self, key, version=None):
        """As :meth:`has_key`."""
        return self.has_key(key, version)

    async def aincr(self, key, delta=1, version=None):
        """As :meth:`incr` (atomic, unlike BaseCache's get + set)."""
        return self.incr(key, delta, version)

    async def adecr(self, key, delta=1, version=None):
        """As :meth:`decr`."""
        return self.decr(key, delta, version)

    async def aclear(self):
        """As :meth:`clear`."""
        return self.clear()

    async def aclose(self, **kwargs):
        """As :meth:`close`."""
        return self.close(**kwargs)

    async def aget_or_set(self, key, default, timeout=DEFAULT_TIMEOUT, version=None):
        """As :meth:`get_or_set`; a miss waits in a thread, not on the event loop."""
        v = self.get(key, _MISSING, version)
        if v is not _MISSING:
            return v
        return await sync_to_async(self.get_or_set, thread_sensitive=False)(key, default, timeout, version)


# ------------------------------------------------- near cache in front of Redis
_NEAR_OPTIONS = {"near_prefixes": "prefixes", "max_ttl": "max_ttl", "neg_ttl": "neg_ttl"}


class NearRedisClient(RedisCacheClient):
    """Django's Redis client, with GET/MGET/EXISTS served by a per-process
    :class:`~shmcache.near.NearCache` over the host's shared segment."""

    def __init__(self, servers, near=None, **options):
        super().__init__(servers, **options)
        self._near_settings = near or {}
        self._near = None

    def get_client(self, key=None, *, write=False):
        """The :class:`~shmcache.near.NearRedis` of this process (always the first server)."""
        if self._near is None:
            from ..near import NearCache, NearRedis

            cfg = self._near_settings
            cache = shared_cache(cfg["name"], **cfg["cache_options"])
            near = NearCache(cache, super().get_client(write=True), cfg["prefixes"], max_ttl=cfg["max_ttl"],
                             neg_ttl=cfg["neg_ttl"])
            if type(self._serializer) is RedisSerializer:
                # Values read from shared memory were written by whoever can
                # write the segment: unpickle them under the cache's rule.
                self._serializer = _TrustedRedisSerializer(near.pickle, self._serializer.protocol)
            self._near = NearRedis(near)
        return self._near


class _TrustedRedisSerializer(RedisSerializer):
    """Django's ``RedisSerializer`` (ints raw, the rest pickled) whose pickles
    follow the near cache's pickle trust (``shmcache.near.TrustedPickle``)."""

    def __init__(self, trusted, protocol=None):
        super().__init__(protocol)
        self._trusted = trusted

    def dumps(self, obj):
        if type(obj) is int:
            return obj
        return self._trusted.dumps(obj, self.protocol)

    def loads(self, data):
        try:
            return int(data)
        except ValueError:
            return self._trusted.loads(data)


class NearRedisCache(RedisCache):
    """``ShmCache`` with ``OPTIONS["upstream"]``: Django's ``RedisCache`` whose
    reads come from this host's near cache. See the module docstring.

    Raises (at construction):
        ImproperlyConfigured: a bad near-cache or segment option.
    """

    def __init__(self, location, params):
        options = dict(params.get("OPTIONS") or {})
        upstream = options.pop("upstream")
        near = {"max_ttl": 60.0, "neg_ttl": None}
        for opt, arg in _NEAR_OPTIONS.items():
            if opt in options:
                near[arg] = options.pop(opt)
        cache_options = {k: options.pop(k) for k in list(options) if k in CACHE_OPTIONS and k != "serializer"}
        for k in _OWN_OPTIONS:
            options.pop(k, None)
        super().__init__(upstream, {**params, "OPTIONS": options})
        if "prefixes" not in near:
            near["prefixes"] = [f"{self.key_prefix}:"] if self.key_prefix else None
        self._class = NearRedisClient
        self._options = {**options, "near": {"name": location or "django", "cache_options": cache_options, **near}}
        try:
            from ..near import _prefixes

            _prefixes(near["prefixes"])
            for label in ("max_ttl", "neg_ttl"):
                v = near[label]
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                    raise ValueError(f"{label} must be a positive number of seconds, got {v!r}")
        except (TypeError, ValueError) as e:
            raise ImproperlyConfigured(f"ShmCache {location!r} with upstream: {e}") from e
