"""Many processes and threads on one cache: exact counters, no torn reads,
fork after open, client slots.

Real processes (multiprocessing ``fork`` and ``spawn``, bare ``os.fork``),
real shared memory and futexes, no mocks. Every child is joined with a timeout (killed if it
overruns) in a ``finally``, so a failing test leaves nothing running.

Values written by the hammer tests carry their own checksum (see
``make_value``): a reader that gets a torn, mixed or misplaced value notices
on its own and exits non-zero.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time

import pytest

from procs import join_all
from shmcache import Cache, admin
from values import bad_value, make_value

FORK = mp.get_context("fork")
SPAWN = mp.get_context("spawn")

JOIN = 30.0  # seconds a child may take before the test calls it hung


# ----------------------------------------------------------------- helpers
def wait_pid(pid: int, timeout: float = JOIN) -> int | None:
    """waitpid with a bound: the child's exit code, or None (then it was SIGKILLed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def slot_pid(cache: Cache, c: int) -> int:
    """The pid recorded in client slot ``c`` (0 if the slot is free)."""
    return next((x.pid for x in admin.clients(cache) if x.slot == c), 0)


def my_slot(cache: Cache) -> int:
    return admin.current_client(cache)[0]


def client_pids(cache: Cache) -> list[int]:
    """The pid of every claimed client slot, dead ones not yet reaped included."""
    return [x.pid for x in admin.clients(cache)]


# ------------------------------------------------ child programs (module level)
def _incr_child(target, key, m, go):
    cache = Cache(target, create=False) if isinstance(target, str) else target
    if not go.wait(20):
        sys.exit(2)
    for _ in range(m):
        cache.incr(key)
    cache.close()


def _hammer_writer(name, wid, keys, seconds, seed, count):
    cache = Cache(name, create=False)
    rng = random.Random(seed)
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        n += 1
        k = rng.choice(keys)
        r = rng.random()
        if r < 0.85:
            cache.set(k, make_value(k, wid, n, rng.randint(1, 4000)))
        elif r < 0.95:
            cache.delete(k)
        else:
            cache.set_many({k2: make_value(k2, wid, n, rng.randint(1, 400)) for k2 in rng.sample(keys, 5)})
    count.value = n
    cache.close()


def _hammer_reader(name, keys, seconds, seed, count):
    cache = Cache(name, create=False)
    rng = random.Random(seed)
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if rng.random() < 0.05:
            many = cache.get_many(rng.sample(keys, 10))
            got = list(many.items())
        else:
            k = rng.choice(keys)
            got = [(k, cache.get(k))]
        for k, v in got:
            if v is None:
                continue
            why = bad_value(k, v)
            if why:
                print(f"reader: bad value for {k!r}: {why}", file=sys.stderr, flush=True)
                os._exit(3)
            n += 1
    count.value = n
    cache.close()


def _forked_user(cache, key, n, q):
    """A multiprocessing-fork child using the cache its parent opened."""
    for i in range(n):
        cache.set(f"{key}-{i}", i)
    ok = all(cache.get(f"{key}-{i}") == i for i in range(n))
    q.put((os.getpid(), my_slot(cache), slot_pid(cache, my_slot(cache)), ok))


_KEEP = []  # like a worker's module-level ``cache = Cache(...)``


def _open_and_exit(name, n):
    cache = Cache(name, create=False)
    _KEEP.append(cache)
    for i in range(n):
        cache.set(f"child-{os.getpid()}-{i}", i)
    # returns without close(): the finalizer must give the slot back at exit


def _open_and_sleep(target, n, ready):
    cache = Cache(target, create=False) if isinstance(target, str) else target
    for i in range(n):
        cache.set(f"child-{os.getpid()}-{i}", i)
    ready.set()
    time.sleep(120)


# ------------------------------------------------------------------- tests
N_PROCS = 4
M_INCRS = 2000


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "method,how",
    [("fork", "name"), ("fork", "object"), ("spawn", "name"), ("spawn", "pickle")],
)
def test_incr_across_processes_is_exact(make_cache, cache_name, method, how):
    cache = make_cache(size="1MiB")
    ctx = FORK if method == "fork" else SPAWN
    go = ctx.Event()
    target = cache_name if how == "name" else cache
    procs = [ctx.Process(target=_incr_child, args=(target, "n", M_INCRS, go)) for _ in range(N_PROCS)]
    try:
        for p in procs:
            p.start()
        go.set()
        join_all(procs, 60)
        assert [p.exitcode for p in procs] == [0] * N_PROCS
        assert cache.get("n") == N_PROCS * M_INCRS
        assert cache.stats()["sets"] == N_PROCS * M_INCRS  # every incr counted, children retired
        assert cache.check() == []
    finally:
        join_all(procs, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size,seconds", [("8MiB", 3.0), ("1MiB", 2.0)])
def test_no_torn_reads_under_concurrent_writers(make_cache, cache_name, size, seconds):
    """2 writers + 2 readers on 200 overlapping keys with values of 1..4000
    bytes; in 1 MiB the writers also evict and compact under the readers."""
    cache = make_cache(size=size)
    keys = [f"key{i}" for i in range(200)]
    counts = [FORK.Value("q", 0, lock=False) for _ in range(4)]
    procs = [
        FORK.Process(target=_hammer_writer, args=(cache_name, w, keys, seconds, 100 + w, counts[w]))
        for w in range(2)
    ] + [
        FORK.Process(target=_hammer_reader, args=(cache_name, keys, seconds, 200 + r, counts[2 + r]))
        for r in range(2)
    ]
    try:
        for p in procs:
            p.start()
        join_all(procs, seconds + 30)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0], "a reader saw a bad value (see stderr)"
        assert all(c.value > 0 for c in counts), [c.value for c in counts]
        for k in keys:
            v = cache.get(k)
            assert v is None or bad_value(k, v) is None, (k, bad_value(k, v))
        assert cache.check() == []
    finally:
        join_all(procs, 1)


@pytest.mark.timeout(60)
def test_threads_incr_is_exact(cache):
    errors = []

    def work():
        try:
            for _ in range(5000):
                cache.incr("n")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert cache.get("n") == 20000
    assert cache.stats()["sets"] == 20000
    assert cache.check() == []


@pytest.mark.timeout(60)
def test_threads_set_get_never_see_bad_values(make_cache):
    cache = make_cache(size="1MiB")
    keys = [f"key{i}" for i in range(100)]
    stop = time.monotonic() + 1.5
    bad = []
    reads = [0]

    def writer(wid):
        rng = random.Random(wid)
        n = 0
        while time.monotonic() < stop and not bad:
            n += 1
            k = rng.choice(keys)
            if rng.random() < 0.9:
                cache.set(k, make_value(k, wid, n, rng.randint(1, 4000)))
            else:
                cache.delete(k)

    def reader(rid):
        rng = random.Random(100 + rid)
        while time.monotonic() < stop and not bad:
            k = rng.choice(keys)
            v = cache.get(k)
            if v is not None:
                why = bad_value(k, v)
                if why:
                    bad.append((k, why))
                reads[0] += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    threads += [threading.Thread(target=reader, args=(r,)) for r in range(2)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, mid-operation
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        sys.setswitchinterval(old)
    assert not any(t.is_alive() for t in threads)
    assert bad == []
    assert reads[0] > 0
    assert cache.check() == []


@pytest.mark.timeout(60)
def test_fork_after_open_children_get_own_slots(cache):
    """gunicorn --preload: the master opens the cache, then forks workers."""
    parent_client = my_slot(cache)
    cache.set("from-parent", b"p")
    results = []
    pids = []
    try:
        # bare os.fork children
        for w in range(2):
            r, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: never return into pytest
                code = 1
                try:
                    os.close(r)
                    for i in range(50):
                        cache.set(f"osfork{w}-{i}", i)
                    ok = all(cache.get(f"osfork{w}-{i}") == i for i in range(50))
                    ok = ok and cache.get("from-parent") == b"p"
                    c = my_slot(cache)
                    os.write(wfd, f"{os.getpid()} {c} {slot_pid(cache, c)} {int(ok)}".encode())
                    code = 0
                finally:
                    os._exit(code)
            os.close(wfd)
            pids.append((pid, r))
        for pid, r in pids:
            assert wait_pid(pid) == 0
            cpid, c, spid, ok = map(int, os.read(r, 200).split())
            os.close(r)
            results.append((cpid, c, spid, bool(ok)))
        pids = []
        # multiprocessing fork children that use the inherited Cache object
        q = FORK.Queue()
        procs = [FORK.Process(target=_forked_user, args=(cache, f"mpfork{w}", 50, q)) for w in range(2)]
        try:
            for p in procs:
                p.start()
            for _ in procs:
                results.append(q.get(timeout=JOIN))
            join_all(procs)
            assert [p.exitcode for p in procs] == [0, 0]
        finally:
            join_all(procs, 1)
    finally:
        for pid, r in pids:
            wait_pid(pid, 5)
            os.close(r)

    assert len(results) == 4
    for cpid, c, spid, ok in results:
        assert ok
        assert c != parent_client
        assert spid == cpid  # the child recorded itself in its own slot
    assert my_slot(cache) == parent_client
    assert slot_pid(cache, parent_client) == os.getpid()
    # the parent still works, and sees what the children wrote
    cache.set("after", b"a")
    assert cache.get("after") == b"a"
    for w in range(2):
        assert cache.get(f"osfork{w}-49") == 49
        assert cache.get(f"mpfork{w}-49") == 49
    assert cache.stats()["sets"] == 1 + 4 * 50 + 1  # dead children's slots still count
    assert cache.check() == []


@pytest.mark.timeout(60)
def test_spawned_child_slot_freed_at_exit(cache, cache_name):
    """A child that opens the cache and exits normally without close(): the
    finalizer gives its slot back (pid 0) and its counters stay in stats."""
    p = SPAWN.Process(target=_open_and_exit, args=(cache_name, 10))
    try:
        p.start()
        join_all([p])
        assert p.exitcode == 0
        assert p.pid not in client_pids(cache)
        assert client_pids(cache) == [os.getpid()]
        assert cache.stats()["sets"] == 10
        assert cache.get(f"child-{p.pid}-9") == 9
    finally:
        join_all([p], 1)


@pytest.mark.timeout(60)
def test_regression_mp_fork_child_slot_not_freed_at_exit(cache, cache_name):
    p = FORK.Process(target=_open_and_exit, args=(cache_name, 10))
    try:
        p.start()
        join_all([p])
        assert p.exitcode == 0
        assert client_pids(cache) == [os.getpid()]
    finally:
        join_all([p], 1)


@pytest.mark.timeout(60)
def test_killed_child_slot_reaped_and_counters_kept(make_cache, cache_name):
    cache = make_cache(max_clients=4)
    ready = [FORK.Event() for _ in range(2)]
    # fork children using the parent's Cache object: one slot each, claimed after fork
    procs = [FORK.Process(target=_open_and_sleep, args=(cache, 10, ready[i])) for i in range(2)]
    extra = []
    try:
        for p in procs:
            p.start()
        for e in ready:
            assert e.wait(JOIN)
        dead = {p.pid for p in procs}
        assert dead <= set(client_pids(cache))
        for p in procs:
            p.kill()
            p.join(JOIN)
        assert cache.stats()["sets"] == 20
        # claiming slots now must reap the dead children's
        for _ in range(3):
            extra.append(Cache(cache_name, create=False))
        pids = client_pids(cache)
        assert not dead & set(pids)
        assert pids.count(os.getpid()) == 4
        st = cache.stats()
        assert st["sets"] == 20  # folded into the retired totals, not lost
        assert st["clients"] == 4
        assert cache.get(f"child-{procs[0].pid}-9") == 9
    finally:
        for c in extra:
            c.close()
        join_all(procs, 1)
