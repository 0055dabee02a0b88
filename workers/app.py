"""A small WSGI app showing what a cache shared by all gunicorn workers is for.

Start it (from the repository root)::

    gunicorn -c workers/gunicorn_conf.py workers.app:app

then, in another terminal::

    curl -i localhost:8000/            # page views: one counter for all workers (incr)
    curl localhost:8000/expensive       # computed once, every worker serves the cached value
    for i in $(seq 25); do curl -s -o /dev/null -w '%{http_code} ' localhost:8000/limited; done
    curl localhost:8000/stats           # counters per worker, cache stats

What to watch for: ``X-Worker-Pid`` changes from request to request while the
page-view count goes up by exactly one; ``/expensive`` says ``runs: 1`` however
many workers asked at once (stampede protection, ``Cache.get_or_set``); the
21st request of a client within the window gets ``429`` whichever worker
serves it.

Settings (environment): SHMCACHE_NAME, SHMCACHE_SIZE (see
``shmcache.contrib.env_settings``), SHMCACHE_DEMO_RATE_LIMIT (requests per
window, default 20), SHMCACHE_DEMO_RATE_WINDOW (seconds, default 60),
SHMCACHE_DEMO_EXPENSIVE_SECONDS (how slow the computation is, default 0.5).
SHMCACHE_TEST_ENDPOINTS=1 enables ``/_test/hold-lock`` (tests only: it takes a
stripe lock and never lets go, so a test can SIGKILL the worker holding it).
"""

from __future__ import annotations

import json
import math
import os
import time
from urllib.parse import parse_qs

from shmcache import admin
from shmcache.contrib import cache_from_env

PAGEVIEWS = "demo:pageviews"
WORKER_PREFIX = "demo:worker:"
EXPENSIVE = "demo:expensive"
EXPENSIVE_RUNS = "demo:expensive:runs"
RATE_PREFIX = "demo:rate:"

RATE_LIMIT = int(os.environ.get("SHMCACHE_DEMO_RATE_LIMIT", "20"))
RATE_WINDOW = float(os.environ.get("SHMCACHE_DEMO_RATE_WINDOW", "60"))
EXPENSIVE_SECONDS = float(os.environ.get("SHMCACHE_DEMO_EXPENSIVE_SECONDS", "0.5"))
TEST_ENDPOINTS = os.environ.get("SHMCACHE_TEST_ENDPOINTS") == "1"

# Opened at import: in the master with --preload (each forked worker then
# claims its own client slot), else in each worker, where the handle the
# gunicorn hooks opened in the master is reused.
cache = cache_from_env()


def _respond(start_response, status: str, body, content_type="text/plain; charset=utf-8", headers=()):
    if not isinstance(body, bytes):
        body = (json.dumps(body, indent=1, sort_keys=True) + "\n").encode() if content_type.startswith(
            "application/json") else str(body).encode()
    start_response(status, [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("X-Worker-Pid", str(os.getpid())),
        *headers,
    ])
    return [body]


def count_primes(limit: int) -> int:
    """Primes below ``limit`` (a sieve): the stand-in for an expensive query."""
    sieve = bytearray([1]) * limit
    sieve[:2] = b"\x00\x00"
    for i in range(2, math.isqrt(limit - 1) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, limit, i)))
    return sum(sieve)


def _expensive() -> dict:
    runs = cache.incr(EXPENSIVE_RUNS)  # how often this really ran, all workers together
    time.sleep(EXPENSIVE_SECONDS)
    return {"primes_below_2e6": count_primes(2_000_000), "computed_by": os.getpid(), "run": runs}


def index(environ, start_response):
    """Page-view counter shared by all workers: one atomic ``incr``."""
    n = cache.incr(PAGEVIEWS)
    cache.incr(f"{WORKER_PREFIX}{os.getpid()}")
    return _respond(start_response, "200 OK", f"page views: {n} (served by worker {os.getpid()})\n")


def expensive(environ, start_response):
    """An expensive result computed once for all workers (``get_or_set``)."""
    value = cache.get_or_set(EXPENSIVE, _expensive, ttl=300)
    value = dict(value, runs=cache.get(EXPENSIVE_RUNS, 0))
    return _respond(start_response, "200 OK", value, "application/json")


def limited(environ, start_response):
    """A per-client fixed-window rate limit: ``incr`` with a ttl set on the
    window's first request; the window's count is shared by all workers."""
    client = environ.get("HTTP_X_CLIENT_ID") or environ.get("REMOTE_ADDR", "?")
    key = f"{RATE_PREFIX}{client}"
    n = cache.incr(key, ttl=RATE_WINDOW)
    if n > RATE_LIMIT:
        try:
            retry = max(1, math.ceil(cache.ttl(key) or RATE_WINDOW))
        except KeyError:  # the window ended just now
            retry = 1
        return _respond(start_response, "429 Too Many Requests", f"rate limit: {RATE_LIMIT} per "
                        f"{RATE_WINDOW:g} s; retry in {retry} s\n", headers=[("Retry-After", str(retry))])
    return _respond(start_response, "200 OK", f"ok: request {n} of {RATE_LIMIT} in this window\n")


def stats(environ, start_response):
    """What every worker did, and the cache's own counters."""
    per_worker = {
        k[len(WORKER_PREFIX):]: cache.get(k, 0) for k in cache.keys() if isinstance(k, str) and k.startswith(WORKER_PREFIX)
    }
    s = cache.stats()
    body = {
        "pageviews": cache.get(PAGEVIEWS, 0),
        "expensive_runs": cache.get(EXPENSIVE_RUNS, 0),
        "workers": per_worker,
        "served_by": os.getpid(),
        "cache": {k: s[k] for k in (
            "name", "items", "hits", "misses", "sets", "hit_rate", "clients", "recoveries",
            "daemon_pid", "daemon_alive", "bytes_used", "size",
        )},
    }
    return _respond(start_response, "200 OK", body, "application/json")


def healthz(environ, start_response):
    """Readiness probe: touches no counter."""
    return _respond(start_response, "200 OK", "ok\n")


def hold_lock(environ, start_response):
    """Tests only: take the stripe lock of ``?key=`` and hold it, streaming one
    line (``holding <stripe> <pid>``) first, so a test knows whom to SIGKILL."""
    from shmcache.codec import encode_key
    from shmcache.table import key_hash

    key = parse_qs(environ.get("QUERY_STRING", "")).get("key", [PAGEVIEWS])[0]
    stripe = key_hash(encode_key(key)) & (cache.stats()["stripes"] - 1)
    locks = admin.storage(cache).locks  # the engine's stripe lock, on purpose: we simulate a crash mid-write
    locks.lock(stripe)
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Worker-Pid", str(os.getpid()))])

    def body():
        try:
            yield f"holding {stripe} {os.getpid()}\n".encode()
            deadline = time.monotonic() + 120  # bounded even if no one kills us
            while time.monotonic() < deadline:
                time.sleep(0.1)
            yield b"released\n"
        finally:
            locks.unlock(stripe)

    return body()


ROUTES = {
    "/": index,
    "/expensive": expensive,
    "/limited": limited,
    "/stats": stats,
    "/healthz": healthz,
}
if TEST_ENDPOINTS:
    ROUTES["/_test/hold-lock"] = hold_lock


def app(environ, start_response):
    """The WSGI entry point: dispatch on the path."""
    handler = ROUTES.get(environ.get("PATH_INFO", "/"))
    if handler is None:
        return _respond(start_response, "404 Not Found", "not found\n")
    return handler(environ, start_response)
