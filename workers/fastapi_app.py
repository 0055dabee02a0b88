"""A FastAPI app whose uvicorn workers share one cache, through asyncio.

Start it (from the repository root; ``pip install fastapi uvicorn fastapi-cache2``)::

    SHMCACHE_NAME=api uvicorn workers.fastapi_app:app --workers 4

then, in other terminals::

    curl localhost:8000/report        # built once (1 s) for every worker: "runs": 1
    curl localhost:8000/ping          # answers at once, even while /report is being built
    curl -i localhost:8000/cached     # fastapi-cache2 @cache: X-FastAPI-Cache: MISS, then HIT from any worker
    curl localhost:8000/stats

What to watch for: fire a dozen ``/report`` requests at once after a
``/reset``: one worker builds the report, the others wait for it with
``asyncio.sleep`` — so ``/ping`` keeps answering in milliseconds on every
worker meanwhile (``pid`` changes), and every ``/report`` returns the same
``built_by`` and ``runs: 1``. With a blocking ``Cache.get_or_set`` the
waiting workers' event loops would stall for the whole build.

Settings (environment): SHMCACHE_NAME (default ``fastapi-demo``),
SHMCACHE_SIZE (default 64MiB), SHMCACHE_DEMO_BUILD_SECONDS (default 1.0).
The cache outlives the server; remove it with ``shmcache rm -n NAME``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_cache import FastAPICache
from fastapi_cache.decorator import cache as cached_route

from shmcache.aio import AsyncCache
from shmcache.contrib.fastapi import ShmcacheBackend

NAME = os.environ.get("SHMCACHE_NAME") or "fastapi-demo"
SIZE = os.environ.get("SHMCACHE_SIZE") or "64MiB"
BUILD_SECONDS = float(os.environ.get("SHMCACHE_DEMO_BUILD_SECONDS") or 1.0)
REPORT = "demo:report"
RUNS = "demo:report:runs"

cache = AsyncCache(NAME, size=SIZE)  # one handle per worker process


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    FastAPICache.init(ShmcacheBackend(cache.cache), prefix="demo-api")
    yield
    cache.close()


app = FastAPI(lifespan=lifespan)


async def build_report() -> dict:
    """The slow computation (a stand-in for a heavy query): runs once across workers."""
    cache.incr(RUNS)
    started = time.time()
    await asyncio.sleep(BUILD_SECONDS)
    return {"built_by": os.getpid(), "started": started, "finished": time.time()}


@app.get("/report")
async def report() -> dict:
    t0 = time.time()
    value = await cache.get_or_set(REPORT, build_report, ttl=300)
    return {**value, "pid": os.getpid(), "runs": cache.get(RUNS, 0), "asked": t0, "answered": time.time()}


@app.get("/ping")
async def ping() -> dict:
    return {"pid": os.getpid(), "pings": cache.incr("demo:pings"), "answered": time.time()}


@app.get("/cached")
@cached_route(expire=30)
async def cached() -> dict:
    return {"rendered_by": os.getpid(), "at": time.time()}


@app.post("/reset")
async def reset() -> dict:
    cache.delete_many([REPORT, RUNS])
    return {"ok": True}


@app.get("/stats")
async def stats() -> dict:
    st = cache.cache.stats()
    return {k: st[k] for k in ("hits", "misses", "sets", "items", "clients")} | {"pid": os.getpid()}
