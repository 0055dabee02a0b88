"""Stampede protection: get_or_set runs the factory once across processes; memoize.

Real processes (fork), real SIGKILL. Every child is joined with a timeout and
killed in ``finally``; bounds on time are generous "did not hang" limits.
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from shmcache.stampede import args_digest, lock_key
from test_deploy import needs_pidns

CTX = multiprocessing.get_context("fork")
JOIN = 30.0  # seconds: no child may take longer (a hang, not a measurement)


def _wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _run(procs):
    for p in procs:
        p.start()


def _finish(procs, timeout=JOIN):
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"processes {hung} did not finish within {timeout} s"


def _kill_all(procs):
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join(5)


# -- single process -----------------------------------------------------------
def test_hit_does_not_call_factory(cache):
    cache.set("k", "v")
    assert cache.get_or_set("k", lambda: pytest.fail("factory called on a hit")) == "v"


def test_miss_stores_and_returns(cache):
    assert cache.get_or_set("k", lambda: [1, 2], ttl=60) == [1, 2]
    assert cache.get("k") == [1, 2]
    assert 0 < cache.ttl("k") <= 60
    assert lock_key("k") not in cache  # the lock entry is gone


def test_cached_none_is_a_hit(cache):
    calls = []
    assert cache.get_or_set("none", lambda: calls.append(1)) is None
    assert cache.get_or_set("none", lambda: calls.append(1)) is None
    assert calls == [1]


def test_factory_error_propagates_and_releases_the_lock(cache):
    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_set("k", boom)
    assert lock_key("k") not in cache
    assert "k" not in cache
    assert cache.get_or_set("k", lambda: 7) == 7


def test_bad_arguments(cache):
    with pytest.raises(TypeError):
        cache.get_or_set("k", "not callable")
    with pytest.raises(ValueError):
        cache.get_or_set("k", lambda: 1, timeout=0)
    with pytest.raises(TypeError):
        cache.get_or_set("k", lambda: 1, timeout="1")
    assert lock_key("k") not in cache


def test_bytes_and_long_keys(make_cache):
    c = make_cache(max_key_size=64)
    assert c.get_or_set(b"raw", lambda: 1) == 1
    k = "x" * 64  # fits; its lock key is fixed-length and fits too
    assert c.get_or_set(k, lambda: 2) == 2


def test_threads_of_one_process_single_flight(cache):
    import threading

    runs = []
    results = []
    barrier = threading.Barrier(8)

    def factory():
        runs.append(1)
        time.sleep(0.2)
        return "v"

    def worker():
        barrier.wait()
        results.append(cache.get_or_set("k", factory, timeout=20))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN)
    assert results == ["v"] * 8
    assert runs == [1]


# -- processes ----------------------------------------------------------------
def _racer(cache, i, barrier):
    def factory():
        cache.incr("runs")
        time.sleep(0.3)  # long enough for every racer to arrive meanwhile
        return f"value-from-{os.getpid()}"

    barrier.wait(10)
    cache.set(f"result:{i}", cache.get_or_set("hot", factory, ttl=60, timeout=20))


def test_eight_processes_race_factory_runs_once(cache):
    barrier = CTX.Barrier(8)
    procs = [CTX.Process(target=_racer, args=(cache, i, barrier)) for i in range(8)]
    try:
        _run(procs)
        _finish(procs)
        assert [p.exitcode for p in procs] == [0] * 8
        results = {cache.get(f"result:{i}") for i in range(8)}
        assert len(results) == 1 and None not in results
        assert cache.get("runs") == 1
        assert cache.get("hot") == results.pop()
        assert lock_key("hot") not in cache
    finally:
        _kill_all(procs)


def _stuck_owner(cache):
    def factory():
        cache.set("owner-started", os.getpid())
        time.sleep(60)  # killed long before this ends
        return "never"

    cache.get_or_set("hot", factory, timeout=30)


def _waiter(cache, i, timeout, barrier=None):
    def factory():
        cache.incr("runs")
        time.sleep(0.2)
        return f"value-from-{os.getpid()}"

    if barrier is not None:
        barrier.wait(10)
    t0 = time.monotonic()
    v = cache.get_or_set("hot", factory, ttl=60, timeout=timeout)
    cache.set(f"result:{i}", v)
    cache.set(f"waited:{i}", time.monotonic() - t0)


def test_owner_sigkilled_mid_factory_another_process_takes_over(cache):
    owner = CTX.Process(target=_stuck_owner, args=(cache,))
    barrier = CTX.Barrier(7)
    # timeout=30 on purpose: the waiters must finish well inside JOIN (30 s
    # for all), which they can only do by taking over, not by timing out.
    waiters = [CTX.Process(target=_waiter, args=(cache, i, 30.0, barrier)) for i in range(7)]
    try:
        owner.start()
        _wait_for(lambda: cache.get("owner-started") == owner.pid, what="the owner's factory to start")
        _run(waiters)
        _wait_for(lambda: sum(1 for p in waiters if p.is_alive()) == 7, what="waiters to start")
        time.sleep(0.3)  # let them reach the polling loop
        assert "hot" not in cache
        os.kill(owner.pid, signal.SIGKILL)
        _finish(waiters, timeout=20.0)
        assert [p.exitcode for p in waiters] == [0] * 7
        results = {cache.get(f"result:{i}") for i in range(7)}
        assert len(results) == 1 and None not in results
        assert cache.get("runs") == 1  # exactly one waiter took over
        assert all(cache.get(f"waited:{i}") < 30.0 for i in range(7))  # nobody hit its timeout
        assert lock_key("hot") not in cache
    finally:
        _kill_all([owner] + waiters)


def test_live_but_stuck_owner_waiters_compute_after_timeout(cache):
    owner = CTX.Process(target=_stuck_owner, args=(cache,))
    waiter = CTX.Process(target=_waiter, args=(cache, 0, 0.5))
    try:
        owner.start()
        _wait_for(lambda: cache.get("owner-started") == owner.pid, what="the owner's factory to start")
        waiter.start()
        _finish([waiter], timeout=15.0)
        assert waiter.exitcode == 0
        assert cache.get("result:0") == f"value-from-{waiter.pid}"
        assert cache.get("runs") == 1
        assert owner.is_alive()  # it was alive all along: the waiter did not wait for it
    finally:
        _kill_all([owner, waiter])


def _failing_owner(cache):
    def factory():
        cache.set("owner-started", os.getpid())
        time.sleep(0.5)
        raise RuntimeError("factory failed")

    try:
        cache.get_or_set("hot", factory, timeout=30)
    except RuntimeError:
        os._exit(3)


def test_owner_factory_raises_a_waiter_computes(cache):
    owner = CTX.Process(target=_failing_owner, args=(cache,))
    waiter = CTX.Process(target=_waiter, args=(cache, 0, 30.0))
    try:
        owner.start()
        _wait_for(lambda: cache.get("owner-started") == owner.pid, what="the owner's factory to start")
        waiter.start()
        _finish([owner, waiter], timeout=20.0)
        assert owner.exitcode == 3
        assert waiter.exitcode == 0
        assert cache.get("result:0") == f"value-from-{waiter.pid}"
    finally:
        _kill_all([owner, waiter])


# -- owners in another PID namespace ------------------------------------------
# The builder runs as pid 1 of its own PID namespace (sharing /dev/shm, as a
# sidecar container with `ipc: shareable` does): the host sees it under
# another pid, so only the kernel's answer about its client slot can tell
# whether it lives.
FOREIGN_BUILDER = """
import os, sys, time
from shmcache import Cache
name, flag = sys.argv[1], sys.argv[2]
c = Cache(name, create=False)
def factory():
    c.set("builder-started", os.getpid())
    print("BUILDING", os.getpid(), flush=True)
    while not os.path.exists(flag):
        time.sleep(0.01)
    return "from-the-namespace"
print("DONE", c.get_or_set("hot", factory, ttl=60, timeout=60), flush=True)
"""


def _start_foreign_builder(name, flag):
    """The builder in a new PID namespace, inside its factory; returns (unshare Popen, its host pid)."""
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c",
                          FOREIGN_BUILDER, name, flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("BUILDING 1"), (line, p.stderr.read() if p.poll() is not None else "")
    return p, psutil.Process(p.pid).children()[0].pid


def _stop_foreign(p):
    if p.poll() is None:
        p.kill()  # --kill-child: the builder dies with unshare
    p.wait(30)


@needs_pidns
@pytest.mark.timeout(120)
def test_regression_live_builder_in_another_pid_namespace_is_not_taken_over(cache, tmp_path):
    # The owner record was pid + start time: the host read "pid 1" (its own
    # init, another start time), judged the live builder dead at the first
    # poll and ran its own factory beside it.
    flag = str(tmp_path / "finish")
    p, _host_pid = _start_foreign_builder(cache.name, flag)
    waiter = CTX.Process(target=_waiter, args=(cache, 0, 60.0))
    try:
        waiter.start()
        time.sleep(2.0)  # ~40 owner checks at the 50 ms poll: it must still be waiting
        assert waiter.is_alive() and cache.get("runs") is None, "the waiter took over a live builder"
        assert "hot" not in cache
        open(flag, "w").close()
        _finish([waiter], timeout=20.0)
        assert waiter.exitcode == 0
        assert cache.get("result:0") == "from-the-namespace"
        assert cache.get("runs") is None  # the waiter's own factory never ran
        assert p.wait(30) == 0 and "DONE from-the-namespace" in p.stdout.read()
        assert lock_key("hot") not in cache
    finally:
        _kill_all([waiter])
        _stop_foreign(p)


@needs_pidns
@pytest.mark.timeout(120)
def test_sigkilled_builder_in_another_pid_namespace_is_taken_over_at_once(cache, tmp_path):
    # timeout=60 for the waiter: finishing within the bounded join below is
    # only possible by the kernel saying the builder's client lock is gone.
    p, host_pid = _start_foreign_builder(cache.name, str(tmp_path / "never"))
    waiter = CTX.Process(target=_waiter, args=(cache, 0, 60.0))
    try:
        waiter.start()
        time.sleep(0.5)  # the waiter is polling
        assert cache.get("runs") is None
        t_kill = time.monotonic()
        os.kill(host_pid, signal.SIGKILL)
        _finish([waiter], timeout=15.0)
        print(f"takeover after SIGKILL of a builder in another PID namespace: "
              f"{(time.monotonic() - t_kill) * 1e3:.0f} ms (incl. the waiter's 200 ms factory)")
        assert waiter.exitcode == 0
        assert cache.get("result:0") == f"value-from-{waiter.pid}"
        assert cache.get("runs") == 1 and cache.get("hot") == f"value-from-{waiter.pid}"
        assert cache.get("waited:0") < 15.0
        assert lock_key("hot") not in cache
    finally:
        _kill_all([waiter])
        _stop_foreign(p)


# -- memoize ------------------------------------------------------------------
def test_memoize_caches_per_arguments(cache):
    calls = []

    @cache.memoize(ttl=60)
    def add(a, b=0):
        calls.append((a, b))
        return a + b

    assert add(1, 2) == 3
    assert add(1, 2) == 3
    assert add(2, 2) == 4
    assert add(1, b=2) == 3  # keyword call: its own entry, like functools.lru_cache
    assert calls == [(1, 2), (2, 2), (1, 2)]
    assert add.__name__ == "add" and add.__wrapped__ is not None
    assert 0 < cache.ttl(add.cache_key(1, 2)) <= 60


def test_memoize_typed(cache):
    calls = []

    @cache.memoize()
    def untyped(x):
        calls.append(x)
        return x

    @cache.memoize(typed=True)
    def typed(x):
        calls.append(x)
        return x

    untyped(1)
    untyped(1.0)
    typed(1)
    typed(1.0)
    assert calls == [1, 1, 1.0]


def test_memoize_bare_decorator_and_none_result(cache):
    calls = []

    @cache.memoize
    def nothing():
        calls.append(1)

    assert nothing() is None
    assert nothing() is None
    assert calls == [1]


def test_memoize_invalidate_and_cache_clear(cache):
    calls = []

    @cache.memoize()
    def f(x):
        calls.append(x)
        return x * 10

    @cache.memoize()
    def g(x):
        return -x

    for x in (1, 2, 3):
        f(x)
    g(1)
    assert f.invalidate(2) is True
    assert f.invalidate(2) is False
    f(2)
    assert calls == [1, 2, 3, 2]
    assert f.cache_clear() == 3
    assert g.cache_key(1) in cache  # only f's results went
    f(1)
    assert calls == [1, 2, 3, 2, 1]


def test_memoize_unkeyable_argument(cache):
    import threading

    @cache.memoize()
    def f(x):
        return 1

    with pytest.raises(TypeError, match="memoize cannot build a cache key"):
        f(threading.Lock())


def _make_square(cache):
    @cache.memoize(ttl=60)
    def slow_square(x):
        cache.incr("square-runs")
        return x * x

    return slow_square


def _memo_child(cache):
    cache.set("child-result", _make_square(cache)(12))


def test_memoize_shares_results_across_processes(cache):
    square = _make_square(cache)  # same qualified name as the child's: same keys
    assert square.cache_key(12).endswith(args_digest((12,), {}))
    p = CTX.Process(target=_memo_child, args=(cache,))
    try:
        p.start()
        _finish([p])
        assert p.exitcode == 0
    finally:
        _kill_all([p])
    assert cache.get("child-result") == 144
    assert square(12) == 144
    assert cache.get("square-runs") == 1  # computed in the child, a hit here


def test_args_digest_is_stable_across_interpreters():
    """Keys must not depend on PYTHONHASHSEED (set and dict orders, hash())."""
    code = (
        "from shmcache.stampede import args_digest;"
        "print(args_digest((1, 'a', {'x': {'p', 'q', 'r'}}, frozenset('abcdef'), [1.5, None, b'z']),"
        " {'k': ('v', 2), 'a': True}))"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=str(seed)),
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()
        for seed in (1, 2, 3)
    }
    here = args_digest((1, "a", {"x": {"p", "q", "r"}}, frozenset("abcdef"), [1.5, None, b"z"]), {"k": ("v", 2), "a": True})
    assert digests == {here}


def test_args_digest_distinguishes():
    d = args_digest
    assert d((1,), {}) == d((1.0,), {}) == d((True,), {})
    assert d((1,), {}, typed=True) != d((1.0,), {}, typed=True)
    assert d(("1",), {}) != d((1,), {})
    assert d(("a", "b"), {}) != d(("ab",), {})
    assert d(((1, 2),), {}) != d(([1, 2],), {})
    assert d((), {"a": 1}) != d((1,), {})
    assert d((), {"a": 1, "b": 2}) == d((), {"b": 2, "a": 1})
