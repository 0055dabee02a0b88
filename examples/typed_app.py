"""A small application typed end to end: `mypy --strict examples/typed_app.py`
passes against an installed shmcache (it ships py.typed). The packaging test
runs exactly that against the built wheel.

Run it: ``python examples/typed_app.py`` (creates and removes a cache named
``typed-example-<pid>``).
"""

from __future__ import annotations

import asyncio
import os

from shmcache import Cache, admin
from shmcache.aio import AsyncCache


def page_views(cache: Cache) -> int:
    return cache.incr("pageviews")


def greeting(cache: Cache, user: str) -> str:
    value = cache.get(f"greeting:{user}")
    if isinstance(value, str):
        return value
    text = f"hello {user}"
    cache.set(f"greeting:{user}", text, ttl=60)
    return text


async def report(acache: AsyncCache) -> dict[str, int]:
    async def build() -> dict[str, int]:
        await asyncio.sleep(0)
        return {"rows": 3}

    result: dict[str, int] = await acache.get_or_set("report", build, ttl=30)
    return result


def main() -> None:
    name = f"typed-example-{os.getpid()}"
    with Cache(name, size="1MiB") as cache:
        assert page_views(cache) == 1
        assert greeting(cache, "ada") == "hello ada"
        assert asyncio.run(report(AsyncCache(cache))) == {"rows": 3}
        info = admin.inspect(cache, "pageviews")
        assert info is not None and info.type == "int"
        fills: list[float] = [s.fill for s in admin.stripes(cache)]
        stats = cache.stats()
        print(f"ok: {stats['items']} items, fullest stripe {max(fills):.1%}")
    Cache.unlink(name)


if __name__ == "__main__":
    main()
