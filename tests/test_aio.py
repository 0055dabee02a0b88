"""asyncio: AsyncCache.get_or_set / memoize never block the event loop, share
one computation with sync callers and other processes; the FastAPI example
under a real uvicorn with 4 workers; the fastapi-cache2 backend."""

import asyncio
import http.client
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shmcache import Cache, admin, stampede
from shmcache.aio import AsyncCache

ROOT = Path(__file__).resolve().parent.parent
CTX = mp.get_context("fork")


def _ticker_gaps(coro_factory):
    """Run coro_factory() next to a 5 ms ticker; return (result, longest gap between ticks)."""

    async def main():
        gaps = []
        done = asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0.012)  # the ticker runs before coro_factory(): a stall in its first step counts
        try:
            result = await coro_factory()
        finally:
            done.set()
            await t  # its last gap (a stall just before the result) is in only now
        return result, max(gaps or [0.0])

    return asyncio.run(main())


def _sync_builder(name, started, seconds):
    c = Cache(name, create=False)

    def build():
        started.set()
        time.sleep(seconds)
        return "from-sync-process"

    c.get_or_set("k", build, ttl=60)
    c.close()


def test_waiting_for_another_process_does_not_block_the_loop(make_cache):
    c = make_cache()
    started = CTX.Event()
    p = CTX.Process(target=_sync_builder, args=(c.name, started, 0.8))
    p.start()
    try:
        assert started.wait(20)
        ac = AsyncCache(c)
        runs = []
        value, gap = _ticker_gaps(lambda: ac.get_or_set("k", lambda: runs.append(1) or "mine"))
        assert value == "from-sync-process" and runs == []
        # the ticker kept ticking while we waited 0.8 s: far below the wait itself
        assert gap < 0.4, f"event loop stalled {gap:.3f} s"
    finally:
        p.join(30)
    assert p.exitcode == 0


def test_async_factory_runs_once_across_tasks(make_cache):
    c = make_cache()
    ac = AsyncCache(c)
    calls = []

    async def factory():
        calls.append(1)
        await asyncio.sleep(0.2)
        return {"v": len(calls)}

    async def main():
        return await asyncio.gather(*(ac.get_or_set("k", factory, ttl=30) for _ in range(20)))

    results, gap = _ticker_gaps(main)
    assert results == [{"v": 1}] * 20 and calls == [1]
    assert gap < 0.15
    assert c["k"] == {"v": 1}


def test_memoize_async_def_on_cache_and_async_cache(make_cache):
    c = make_cache()
    ac = AsyncCache(c)
    calls = []

    @c.memoize(ttl=60)  # the sync Cache's decorator handles async def too
    async def double(x):
        calls.append(x)
        await asyncio.sleep(0)
        return 2 * x

    @ac.memoize
    async def triple(x):
        calls.append(-x)
        return 3 * x

    async def main():
        return [await double(4), await double(4), await triple(2), await triple(2)]

    assert asyncio.run(main()) == [8, 8, 6, 6]
    assert calls == [4, -2]
    assert double.invalidate(4) and asyncio.run(double(4)) == 8 and calls == [4, -2, 4]


def test_sync_factory_runs_in_a_thread(make_cache):
    ac = AsyncCache(make_cache())
    seen = []

    def blocking():
        seen.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.3)
        return 7

    value, gap = _ticker_gaps(lambda: ac.get_or_set("k", blocking))
    assert value == 7 and seen == [False] and gap < 0.2


def _stripe(c, key) -> int:
    from shmcache.codec import encode_key
    from shmcache.table import key_hash

    return key_hash(encode_key(key)) & (admin.geometry(c).n_stripes - 1)


def _key_apart_from_its_lock_entry(c) -> tuple[str, int]:
    """A key whose single-flight lock entry lives in another stripe, and that stripe."""
    for i in range(1000):
        key = f"k{i}"
        s = _stripe(c, stampede.lock_key(key))
        if s != _stripe(c, key):
            return key, s
    raise AssertionError("no such key")  # pragma: no cover


def _hold_stripe(c, s, seconds):
    """Hold stripe ``s``'s lock for ``seconds`` from a thread (as a slow writer,
    or one that died, does to everyone else); returns once it is held."""
    locks = admin.storage(c).locks
    held = threading.Event()

    def hold():
        locks.lock(s)
        held.set()
        time.sleep(seconds)
        held.clear()  # before the unlock: nothing waiting for the stripe can see it set after
        locks.unlock(s)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(20)
    t.holding = held
    return t


def _ticks_while(holding: threading.Event, coro_factory):
    """Run ``coro_factory()`` next to a ticker on one loop; returns (result,
    ticks the ticker made while ``holding`` was set after the coroutine had
    started). A coroutine that blocks the loop until ``holding`` clears
    leaves 0: no clock is compared."""

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.005)
                ticks += holding.is_set()

        task = asyncio.create_task(coro_factory())
        await asyncio.sleep(0)  # the coroutine's first step runs before any tick is counted
        t = asyncio.create_task(ticker())
        try:
            return await task, ticks
        finally:
            done.set()
            await t

    return asyncio.run(main())


def _lock_entries(c) -> list:
    return [k for k in c.keys() if isinstance(k, str) and k.startswith(stampede.LOCK_PREFIX)]


@pytest.mark.parametrize("factory_kind", ["async", "sync"])
def test_a_miss_waiting_for_a_stripe_lock_does_not_block_the_loop(make_cache, factory_kind):
    """A miss writes the single-flight lock entry (then the value): that write
    waits for its stripe's lock in a worker thread, not on the loop (a dead
    holder would keep it waiting for lock_timeout, 0.5 s)."""
    c = make_cache(size="4MiB", stripes=4)
    ac = AsyncCache(c)
    key, s = _key_apart_from_its_lock_entry(c)

    async def afactory():
        return "built"

    holder = _hold_stripe(c, s, 0.6)
    try:
        value, ticks = _ticks_while(holder.holding,
                                    lambda: ac.get_or_set(key, afactory if factory_kind == "async" else lambda: "built"))
    finally:
        holder.join(20)
    assert value == "built" and c[key] == "built"
    assert ticks > 0, "the event loop did not run while the miss waited for a held stripe"
    assert admin.stripes(c)[s].lock_waits == 1  # the lock entry's add did wait, off the loop
    assert _lock_entries(c) == []  # and was released


async def _cancel_while_adding(ac, key) -> None:
    """Start a get_or_set of ``key`` whose lock entry's add waits for a held
    stripe, and cancel it there."""
    t = asyncio.create_task(ac.get_or_set(key, lambda: "never", timeout=30))
    await asyncio.sleep(0.1)  # t waits in the add: the stripe is held
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t


def test_cancelled_while_taking_the_lock_entry_gives_it_back(make_cache):
    """Cancelled while its add of the lock entry waits for a held stripe: the
    add still happens in its thread, and the entry is released, not left to
    make the next caller wait out its ttl."""
    c = make_cache(size="4MiB", stripes=4)
    ac = AsyncCache(c)
    key, s = _key_apart_from_its_lock_entry(c)

    async def main():
        await _cancel_while_adding(ac, key)
        holder.join(20)
        for _ in range(500):  # the release runs in a thread once the add returns
            if not _lock_entries(c):
                break
            await asyncio.sleep(0.01)
        assert _lock_entries(c) == [], "the cancelled caller's lock entry was left to its ttl (30 s)"
        return await ac.get_or_set(key, lambda: "next", timeout=30)

    holder = _hold_stripe(c, s, 0.4)
    try:
        assert asyncio.run(main()) == "next"
    finally:
        holder.join(20)
    assert c[key] == "next" and admin.stripes(c)[s].lock_waits >= 1


def test_regression_cancelled_while_taking_the_lock_entry_gives_it_back_after_the_loop_closed(make_cache):
    """As above, but the program ends right after the cancel: the add finishes
    once asyncio.run has closed its loop. The release hung on that loop and
    never ran: the entry stayed for its whole ttl (29 s left)."""
    c = make_cache(size="4MiB", stripes=4)
    ac = AsyncCache(c)
    key, s = _key_apart_from_its_lock_entry(c)

    holder = _hold_stripe(c, s, 0.4)
    try:
        asyncio.run(_cancel_while_adding(ac, key))  # the loop is closed; the add still waits for the stripe
    finally:
        holder.join(20)
    deadline = time.monotonic() + 20
    while _lock_entries(c) and time.monotonic() < deadline:  # the add, then the release, in their thread
        time.sleep(0.01)
    assert _lock_entries(c) == [], "the cancelled caller's lock entry was left to its ttl (30 s)"


def test_cancelled_owner_releases_the_lock(make_cache):
    c = make_cache()
    ac = AsyncCache(c)

    async def never():
        await asyncio.sleep(60)

    async def main():
        t = asyncio.create_task(ac.get_or_set("k", never, timeout=30))
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        return await ac.get_or_set("k", lambda: "next", timeout=30)

    assert asyncio.run(main()) == "next"


def test_sync_get_or_set_refuses_an_async_factory_clearly(make_cache):
    c = make_cache()

    async def factory():
        return 1

    with pytest.raises(TypeError, match="aio"):
        c.get_or_set("k", factory)
    assert "k" not in c
    assert c.get_or_set("k", lambda: 2) == 2  # the lock entry was released


def test_plain_calls_and_lifecycle(cache_name):
    async def main():
        async with AsyncCache(cache_name, size="1MiB") as ac:
            ac.set("a", 1)
            assert ac.incr("a") == 2 and "a" in ac and len(ac) == 1
            assert await ac.aset("b", b"x") and await ac.aincr("n") == 1
            assert await ac.adelete("b") and await ac.aclear() == 2
            return ac

    ac = asyncio.run(main())
    assert ac.cache.closed
    with pytest.raises(TypeError, match="options"):
        AsyncCache(Cache(cache_name, size="1MiB"), size="2MiB")


def test_fastapi_cache2_backend(make_cache, fake_clock):
    from shmcache.contrib.fastapi import ShmcacheBackend

    c = make_cache(clock=fake_clock)
    b = ShmcacheBackend(c)

    async def main():
        assert await b.get_with_ttl("x") == (0, None)
        await b.set("ns:a", b"1", expire=10)
        await b.set("ns:b", b"2")
        await b.set("other", b"3", expire=0)
        assert await b.get_with_ttl("ns:a") == (10, b"1")
        assert await b.get_with_ttl("ns:b") == (-1, b"2")
        assert await b.get("other") == b"3"
        assert await b.clear(namespace="ns") == 2
        assert await b.clear(key="other") == 1 and await b.get("other") is None

    asyncio.run(main())


# ---------------------------------------------------------- FastAPI + uvicorn
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port, method, path, timeout=30.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Connection": "close"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read() or b"null")
    finally:
        conn.close()


@pytest.fixture
def uvicorn_app(cache_name, tmp_path):
    pytest.importorskip("fastapi_cache")
    port = _free_port()
    log = open(tmp_path / "uvicorn.log", "wb")
    env = dict(os.environ, SHMCACHE_NAME=cache_name, SHMCACHE_SIZE="8MiB", SHMCACHE_DEMO_BUILD_SECONDS="1.0",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "workers.fastapi_app:app", "--workers", "4", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        pids = set()
        while len(pids) < 4:  # every worker answers (each has opened the cache)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"uvicorn did not bring up 4 workers:\n{(tmp_path / 'uvicorn.log').read_text()}")
            try:
                pids.add(_request(port, "GET", "/ping", timeout=5)[2]["pid"])
            except OSError:
                time.sleep(0.1)
        yield port, pids
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def test_fastapi_four_workers_build_once_and_keep_answering(uvicorn_app, cache_name):
    port, workers = uvicorn_app
    build = 1.0
    assert _request(port, "POST", "/reset")[0] == 200
    reports, pings, errors = [], [], []

    def ask_report():
        try:
            reports.append(_request(port, "GET", "/report")[2])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask_report) for _ in range(16)]
    for t in threads:
        t.start()
    # While the report is being built, ping until every worker has answered
    # (or the build is over): a worker whose loop were blocked waiting for
    # the build could not answer before the build ends.
    t_end = time.monotonic() + build * 3
    while time.monotonic() < t_end and any(t.is_alive() for t in threads):
        t0 = time.time()
        body = _request(port, "GET", "/ping", timeout=10)[2]
        pings.append((body["pid"], t0, body["answered"]))
        if {p for p, *_ in pings} >= workers:
            break
    for t in threads:
        t.join(60)
    assert not errors and len(reports) == 16
    built_by = {r["built_by"] for r in reports}
    assert len(built_by) == 1 and all(r["runs"] == 1 for r in reports)  # once across 4 workers
    finished = reports[0]["finished"]
    waiters = {r["pid"] for r in reports} - built_by
    assert waiters, "all 16 requests landed on the building worker; nothing was tested"
    # every worker that was waiting for the build answered a ping before the build ended
    answered_during_build = {pid for pid, _t0, t1 in pings if t1 < finished}
    assert waiters <= answered_during_build, (waiters, pings, finished)
    # and those pings took a small fraction of the build (generous: a loaded CI machine)
    slowest = max(t1 - t0 for pid, t0, t1 in pings if t1 < finished)
    assert slowest < build / 2, f"a ping took {slowest:.3f} s during a {build} s build"
    with Cache(cache_name, create=False) as c:
        assert c["demo:report:runs"] == 1

    first = _request(port, "GET", "/cached")
    again = [_request(port, "GET", "/cached") for _ in range(8)]
    assert first[1].get("x-fastapi-cache") == "MISS"
    assert all(r[1].get("x-fastapi-cache") == "HIT" and r[2] == first[2] for r in again)
