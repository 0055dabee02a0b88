"""A fastapi-cache2 backend: ``@cache(expire=60)`` on FastAPI routes, shared by
every uvicorn/gunicorn worker on the host.

Why fastapi-cache2 and not aiocache: it is the cache library written for
FastAPI (route decorator, Cache-Control/ETag handling, ``FastAPICache.init``
in the lifespan), so it is what FastAPI users reach for; aiocache is a
general asyncio cache whose users mostly call it directly, and they can
use :class:`shmcache.aio.AsyncCache` the same way.

::

    from fastapi_cache import FastAPICache
    from fastapi_cache.decorator import cache
    from shmcache.contrib.fastapi import ShmcacheBackend

    @asynccontextmanager
    async def lifespan(app):
        FastAPICache.init(ShmcacheBackend("myapp", size="256MiB"), prefix="api")
        yield

Every method is one shared-memory operation (no network, no thread hop).
fastapi-cache2's decorator does no stampede protection; for a value that
is expensive to build use ``AsyncCache.memoize`` / ``get_or_set``.
"""

from __future__ import annotations

from typing import Any

from fastapi_cache.backends import Backend

from .. import admin
from ..cache import Cache
from . import shared_cache

__all__ = ["ShmcacheBackend"]


class ShmcacheBackend(Backend):
    """fastapi-cache2 ``Backend`` over a shmcache ``Cache``.

    Args:
        cache: an open ``Cache`` or a cache name (then opened through
            :func:`shmcache.contrib.shared_cache` with ``**options``, one
            handle per process).
    """

    def __init__(self, cache: Cache | str, **options: Any) -> None:
        self.cache = cache if isinstance(cache, Cache) else shared_cache(cache, **options)

    async def get_with_ttl(self, key: str) -> tuple[int, bytes | None]:
        """(seconds left, value); Redis' conventions: -1 = no expiry, 0 and None if absent."""
        e = admin.inspect(self.cache, key)
        if e is None:
            return 0, None
        v = self.cache.get(key)
        if v is None:
            return 0, None
        return (-1 if e.ttl is None else max(1, int(e.ttl))), v

    async def get(self, key: str) -> bytes | None:
        """The stored bytes, or None."""
        v: bytes | None = self.cache.get(key)
        return v

    async def set(self, key: str, value: bytes, expire: int | None = None) -> None:
        """Store ``value``; ``expire`` seconds (None or 0: never expire, as Redis' SET without EX)."""
        self.cache.set(key, value, ttl=expire if expire else None)

    async def clear(self, namespace: str | None = None, key: str | None = None) -> int:
        """Delete every key under ``namespace`` (``namespace:*``), or ``key``. Returns how many."""
        if namespace:
            prefix = f"{namespace}:"
            return self.cache.delete_many(
                [e.key for e in admin.entries(self.cache) if isinstance(e.key, str) and e.key.startswith(prefix)]
            )
        if key:
            return int(self.cache.delete(key))
        return 0
