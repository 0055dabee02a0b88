"""asyncio front end: ``AsyncCache``, for FastAPI, Starlette, aiohttp...

Most cache operations take well under a microsecond and never wait for
another process's *work*, so they stay plain calls: ``acache.get(k)``, not
``await acache.get(k)`` (a coroutine would cost more than the operation).
Only two things can wait for long, and they never block the event loop here:

* ``await acache.get_or_set(key, factory)`` and ``@acache.memoize``: while
  another process (or task) computes the value, waiters poll with
  ``asyncio.sleep`` (2 ms growing to 50 ms); an ``async def`` factory is
  awaited, a plain one runs in a worker thread (``asyncio.to_thread``).
  The protocol is :mod:`shmcache.stampede`'s, so async and sync callers in
  any process share one computation.
* a write waiting for its stripe's lock: held by another writer (usually
  well under a microsecond), or by one that died, which a write first waits
  ``lock_timeout`` (0.5 s) for before recovering the stripe. The writes of
  ``get_or_set`` and ``memoize`` on a miss (the lock entry, the store, the
  release) run in a worker thread, so a hit costs one lock-free read on the
  loop and a miss a few thread hops. ``await acache.aset(...)`` and the
  other ``a*`` writes run in a thread too, for callers that cannot afford
  even that rare stall; the plain calls are the fast path.

::

    from shmcache.aio import AsyncCache

    cache = AsyncCache("app", size="256MiB")      # or AsyncCache(existing_cache)

    @cache.memoize(ttl=60)
    async def report(day: str) -> dict:
        ...                                       # runs once across every worker

    value = await cache.get_or_set("k", fetch, ttl=30)
    cache.incr("hits")                            # plain call
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import stampede
from ._sentinels import DEFAULT_TTL
from .cache import Cache

__all__ = ["AsyncCache"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class AsyncCache:
    """An asyncio view of a :class:`~shmcache.Cache` (same data, same processes).

    Args:
        cache: an open ``Cache``, or the name of one to create or attach
            (then ``**options`` are ``Cache``'s keyword arguments and
            :meth:`close` closes it).

    The fast operations are plain methods delegating to the ``Cache``:
    ``get``, ``set``, ``add``, ``replace``, ``delete``, ``pop``, ``incr``,
    ``decr``, ``touch``, ``expire``, ``persist``, ``ttl``, ``get_many``,
    ``set_many``, ``delete_many``, ``in``, ``len``. ``aset``, ``aadd``,
    ``adelete``, ``aincr`` and ``aclear`` are awaitable versions that run in a
    thread (see the module docstring for when that matters).

    Raises:
        as :class:`~shmcache.Cache`.
    """

    def __init__(self, cache: Cache | str, **options: Any) -> None:
        if isinstance(cache, Cache):
            if options:
                raise TypeError("options are only for opening a cache by name, not for an open Cache")
            self.cache = cache
            self._owned = False
        else:
            self.cache = Cache(cache, **options)
            self._owned = True
        c = self.cache
        self.get = c.get
        self.set = c.set
        self.add = c.add
        self.replace = c.replace
        self.delete = c.delete
        self.pop = c.pop
        self.incr = c.incr
        self.decr = c.decr
        self.touch = c.touch
        self.expire = c.expire
        self.persist = c.persist
        self.ttl = c.ttl
        self.get_many = c.get_many
        self.set_many = c.set_many
        self.delete_many = c.delete_many

    @property
    def name(self) -> str:
        """The cache's name."""
        return self.cache.name

    def __contains__(self, key: str | bytes) -> bool:
        return key in self.cache

    def __len__(self) -> int:
        return len(self.cache)

    # -- the operations that may wait ----------------------------------------
    async def get_or_set(self, key: str | bytes, factory: Callable[[], T | Awaitable[T]],
                         ttl: float | None | Any = DEFAULT_TTL, *, timeout: float = stampede.DEFAULT_TIMEOUT) -> T:
        """``cache[key]`` if present; otherwise compute ``factory()`` once across
        every process and task, store it with ``ttl`` and return it. Waiting
        never blocks the event loop. See :func:`shmcache.stampede.aget_or_set`.

        Raises:
            whatever ``factory`` raises; otherwise as :meth:`Cache.set`.
        """
        result: T = await stampede.aget_or_set(self.cache, key, factory, ttl, timeout)
        return result

    def memoize(self, ttl: float | None | Any = DEFAULT_TTL, typed: bool = False, *,
                timeout: float = stampede.DEFAULT_TIMEOUT) -> Callable[[F], F]:
        """Decorator caching an ``async def``'s results across processes (a
        plain ``def`` is memoized as :meth:`Cache.memoize` does). The wrapper
        has ``cache_key``, ``invalidate`` and ``cache_clear``.

        Raises:
            TypeError: at call time, an argument cannot be turned into a key.
        """
        if callable(ttl) and not isinstance(ttl, (int, float)):  # bare @acache.memoize
            fn: Any = ttl
            wrapped: F = stampede.memoize(self.cache)(fn)
            return wrapped  # type: ignore[return-value]
        deco: Callable[[F], F] = stampede.memoize(self.cache, ttl, typed, timeout)
        return deco

    async def aset(self, key: str | bytes, value: Any, ttl: float | None | Any = DEFAULT_TTL) -> bool:
        """:meth:`Cache.set` in a worker thread."""
        return await asyncio.to_thread(self.cache.set, key, value, ttl)

    async def aadd(self, key: str | bytes, value: Any, ttl: float | None | Any = DEFAULT_TTL) -> bool:
        """:meth:`Cache.add` in a worker thread."""
        return await asyncio.to_thread(self.cache.add, key, value, ttl)

    async def adelete(self, key: str | bytes) -> bool:
        """:meth:`Cache.delete` in a worker thread."""
        return await asyncio.to_thread(self.cache.delete, key)

    async def aincr(self, key: str | bytes, delta: int = 1, default: int | None = 0, ttl: float | None = None) -> int:
        """:meth:`Cache.incr` in a worker thread."""
        return await asyncio.to_thread(self.cache.incr, key, delta, default, ttl)

    async def aclear(self) -> int:
        """:meth:`Cache.clear` in a worker thread (it locks every stripe in turn)."""
        return await asyncio.to_thread(self.cache.clear)

    # -- lifecycle -----------------------------------------------------------
    def close(self) -> None:
        """Close the ``Cache`` if this object opened it (by name). Idempotent."""
        if self._owned:
            self.cache.close()

    async def __aenter__(self) -> "AsyncCache":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmcache.aio.AsyncCache {self.cache!r}>"

