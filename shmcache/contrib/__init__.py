"""Framework adapters: ``shmcache.contrib.django`` and ``shmcache.contrib.flask``.

Importing this package imports neither Django nor Flask; each adapter module
imports its framework itself. What lives here is shared by the adapters and
the gunicorn example: one :class:`~shmcache.Cache` handle per process and
cache name, so the many backend objects a framework creates (Django makes one
per thread and alias) share one mapping and one client slot.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref

from .. import admin
from ..cache import MAX_SECONDS, MAX_WAIT, Cache, check_seconds
from ..errors import Error

__all__ = [
    "CACHE_OPTIONS", "KeyLock", "LockError", "cache_from_env", "env_settings", "fit_key", "lru_keys", "max_key_size",
    "shared_cache", "stored_items",
]

#: ``Cache`` keyword arguments an adapter passes through from its settings.
CACHE_OPTIONS = frozenset(
    {
        "size", "stripes", "max_items", "max_key_size", "max_value_size", "max_clients",
        "policy", "mode", "default_ttl", "lock_timeout", "clock", "serializer", "init_timeout", "strict",
        "owner", "allow_pickle",
    }
)
# Settings each process chooses for itself: handles differing in these are
# distinct objects. The rest only matter to whoever creates the segment.
_PER_PROCESS = ("default_ttl", "lock_timeout", "clock", "serializer", "mode", "owner", "allow_pickle")

_lock = threading.Lock()
_handles: dict[tuple, Cache] = {}


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_reset_after_fork)


def shared_cache(name: str, **options) -> Cache:
    """The process-wide :class:`~shmcache.Cache` for ``name`` (created or attached
    on first use with ``options``, reused afterwards, also in forked children,
    where the core claims a fresh client slot).

    Raises:
        TypeError: an unknown option.
        as :class:`~shmcache.Cache` (bad name or size, LayoutMismatch, ...).
    """
    unknown = set(options) - CACHE_OPTIONS
    if unknown:
        raise TypeError(f"unknown shmcache option(s) {sorted(unknown)}; known: {sorted(CACHE_OPTIONS)}")
    key = (name,) + tuple(options.get(k) for k in _PER_PROCESS)
    c = _handles.get(key)
    if c is not None and not c.closed:
        return c
    with _lock:
        c = _handles.get(key)
        if c is None or c.closed:
            c = _handles[key] = Cache(name, **options)
        return c


_max_keys: "weakref.WeakKeyDictionary[Cache, int]" = weakref.WeakKeyDictionary()


def max_key_size(cache: Cache) -> int:
    """The longest encoded key ``cache`` accepts, in bytes (fixed at creation)."""
    n = _max_keys.get(cache)
    if n is None:
        n = _max_keys[cache] = int(cache.stats()["max_key_size"])
    return n


def fit_key(key: str, max_key: int) -> str:
    """``key``, or a fixed-length digest of it when its UTF-8 form is longer
    than ``max_key`` bytes (frameworks allow keys of any length; a 256-bit
    digest keeps distinct keys distinct).

    Raises:
        TypeError: ``key`` is not a str.
    """
    if not isinstance(key, str):
        raise TypeError(f"cache keys must be str, not {type(key).__name__}")
    if len(key) * 4 <= max_key:  # at most 4 UTF-8 bytes per character: fits
        return key
    kb = key.encode("utf-8", "surrogatepass")
    if len(kb) <= max_key:
        return key
    return "__shmcache.long:" + hashlib.sha256(kb).hexdigest()


# -- entry counting and LRU order, for adapters that cull like Django ---------
def stored_items(cache: Cache) -> int:
    """Entries stored in ``cache`` right now, expired ones not yet reclaimed
    included (what Django's LocMemCache and FileBasedCache count before culling).
    See :func:`shmcache.admin.stored_items`."""
    return admin.stored_items(cache)


def lru_keys(cache: Cache, n: int) -> list:
    """Up to ``n`` keys to evict first: expired entries, then the ones not read
    since they were written (the ones the arena's second chance would evict),
    oldest first by their place in their stripe's ring (write order within a
    stripe, approximate across stripes). Reads every stripe once (lock-free),
    so call it only when culling."""
    if n <= 0:
        return []
    order = [(e.ttl is None or e.ttl > 0, e.accessed, e.age, e.key)
             for e in admin.entries(cache, include_expired=True)]
    order.sort(key=lambda r: r[:3])
    return [r[3] for r in order[:n]]


# -- configuration from the environment (gunicorn hooks and the example app) --
ENV_DEFAULTS = {
    "SHMCACHE_NAME": "gunicorn-demo",
    "SHMCACHE_SIZE": "64MiB",
}


def env_settings(environ=None) -> dict:
    """The cache settings the gunicorn example reads from the environment:
    ``name`` (SHMCACHE_NAME), ``size`` (SHMCACHE_SIZE) and, if set,
    ``lock_timeout`` (SHMCACHE_LOCK_TIMEOUT, seconds).

    Raises:
        ValueError: SHMCACHE_LOCK_TIMEOUT is not a number.
    """
    env = os.environ if environ is None else environ
    out = {
        "name": env.get("SHMCACHE_NAME") or ENV_DEFAULTS["SHMCACHE_NAME"],
        "size": env.get("SHMCACHE_SIZE") or ENV_DEFAULTS["SHMCACHE_SIZE"],
    }
    if env.get("SHMCACHE_LOCK_TIMEOUT"):
        out["lock_timeout"] = float(env["SHMCACHE_LOCK_TIMEOUT"])
    return out


def cache_from_env(environ=None) -> Cache:
    """:func:`shared_cache` configured by :func:`env_settings` (created or attached).

    Raises:
        as :func:`shared_cache`.
    """
    settings = env_settings(environ)
    return shared_cache(settings.pop("name"), **settings)


#: The longest KeyLock timeout or blocking_timeout (seconds; about 11.6 days,
#: as the daemon's intervals): bounded so no deadline or sleep overflows.
MAX_LOCK_SECONDS = MAX_SECONDS


def _number(value, label: str):
    """A setting that may come as text (from the environment or an ini file)
    as a float; anything else unchanged, for the caller's own checks."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{label} must be a number of seconds, got {value!r}") from None
    return value


def _blocking_timeout(value) -> float | None:
    return None if value is None else check_seconds("blocking_timeout", value, maximum=MAX_LOCK_SECONDS,
                                                    zero_ok=True)


class KeyLock:
    """A lock shared by every process, held as a cache entry (the shape of
    redis-py's ``Lock``): ``acquire()`` stores a random token with ``add``
    (atomic across processes), ``release()`` removes it if it is still ours.
    ``timeout`` (seconds, None = until released) bounds how long a crashed
    holder keeps it; a waiter polls every ``sleep`` seconds, at most
    ``blocking_timeout`` seconds (None = forever).

    Raises (at construction):
        ValueError / TypeError: a timeout, sleep or blocking_timeout that is
            not a finite number of seconds in range (NaN, inf, negative).

    Raises (from :meth:`release`):
        LockError: the lock is not held by this object (never acquired,
            released already, or expired and taken by another).
    """

    def __init__(self, cache: Cache, key: str, *, timeout: float | None = None, sleep: float = 0.1,
                 blocking: bool = True, blocking_timeout: float | None = None) -> None:
        self.cache = cache
        self.key = key
        # Checked here, not at the first acquire: a NaN blocking_timeout made
        # acquire() poll forever, a NaN or negative sleep raised mid-wait.
        self.timeout = None if timeout is None else check_seconds("timeout", timeout, maximum=MAX_LOCK_SECONDS)
        self.sleep = check_seconds("sleep", sleep, maximum=MAX_WAIT)
        self.blocking = blocking
        self.blocking_timeout = _blocking_timeout(blocking_timeout)
        self.token: bytes | None = None

    def acquire(self, blocking: bool | None = None, blocking_timeout: float | None = None) -> bool:
        """Take the lock; False if it could not within ``blocking_timeout``.

        Raises:
            ValueError / TypeError: a bad ``blocking_timeout``.
        """
        blocking = self.blocking if blocking is None else blocking
        wait = self.blocking_timeout if blocking_timeout is None else _blocking_timeout(blocking_timeout)
        token = os.urandom(16)
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            if self.cache.add(self.key, token, ttl=self.timeout):
                self.token = token
                return True
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                return False
            time.sleep(self.sleep if deadline is None else max(0.0, min(self.sleep, deadline - time.monotonic())))

    def locked(self) -> bool:
        """True if anyone holds the lock."""
        return self.key in self.cache

    def owned(self) -> bool:
        """True if this object holds the lock."""
        return self.token is not None and self.cache.get(self.key) == self.token

    def release(self) -> None:
        """Give the lock back. (Check and delete are two steps: the window only
        matters once the lock outlived its ``timeout``, as in stampede.py.)"""
        token, self.token = self.token, None
        if token is None or self.cache.get(self.key) != token:
            raise LockError(f"cannot release lock {self.key!r}: not held by this object")
        self.cache.delete(self.key)

    def __enter__(self) -> "KeyLock":
        if not self.acquire():
            raise LockError(f"could not acquire lock {self.key!r} within {self.blocking_timeout} s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockError(Error):
    """A :class:`KeyLock` could not be acquired in time, or was released by a non-owner."""
