"""Per-stripe lock waits: every writer that finds its stripe locked counts one
wait (and the time it waited) in shared memory, so one process reads the
totals of all of them: admin.stripes, Cache.stats, `shmcache stats --json`,
`shmcache top` and the Prometheus collector.

The counts are exact, not sampled, and the tests know how many waits happened
without any timing: this process holds the stripe's lock (through the public
storage handle) while N writer processes each set one key of that stripe, and
releases it only once the kernel shows all N asleep on the stripe's lock
word (futex). Each of them therefore found the lock taken and waited once.
"""

import json
import platform
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

import pytest

import shmcache.cache as cache_mod
from procs import kill_alive
from shmcache import Cache, admin
from shmcache import lock as lock_mod
from shmcache.cli import _Sample, render_top, top_frame

parser = pytest.importorskip("prometheus_client.parser")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from shmcache.contrib.prometheus import ShmcacheCollector  # noqa: E402

needs_c = pytest.mark.skipif(cache_mod._speedups is None, reason="C accelerator not built")
N_WRITERS = 3
ROUNDS = 3


class FutexWatch:
    """Sees writers asleep on a stripe's lock word: a thread of theirs inside
    futex(FUTEX_WAIT) with the shared op (0), which only the lock word's wait
    uses (Python's own locks and semaphores use other ops), read from
    /proc/<pid>/task/<tid>/syscall. Sightings are kept until :meth:`reset`:
    a waiter wakes every POLL_MAX to check its holder, and one sighting is
    proof enough that it found the lock taken (it counts a wait then)."""

    def __init__(self, pids=None):
        self.nr = lock_mod._SYS_FUTEX.get(platform.machine())
        if self.nr is None:
            pytest.skip("no futex syscall number known for this architecture")
        try:
            with open("/proc/self/syscall") as f:
                f.read()
        except OSError:
            pytest.skip("/proc/<pid>/syscall is not readable here (no CONFIG_HAVE_ARCH_TRACEHOOK?)")
        self.pids = pids or [os.getpid()]
        self.seen: set = set()

    def reset(self) -> None:
        self.seen = set()

    def _scan(self) -> None:
        for pid in self.pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                        fields = f.read().split()
                except OSError:
                    continue
                if len(fields) > 2 and fields[0] == str(self.nr) and int(fields[2], 16) == 0:
                    self.seen.add((pid, tid))

    def await_waiters(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._scan()
            if len(self.seen) >= n:
                return
            assert time.monotonic() < deadline, f"{len(self.seen)} of {n} writers ever slept on the lock"
            time.sleep(0.0002)


def _keys_of_stripe(c: Cache, s: int, n: int) -> list[str]:
    """``n`` keys that hash to stripe ``s`` (found by storing candidates)."""
    out = []
    i = 0
    while len(out) < n:
        k = f"k{i}"
        c.set(k, 0)
        if admin.inspect(c, k).stripe == s:
            out.append(k)
        c.delete(k)
        i += 1
    return out


def _writer(name, pure, keys, go, acks):
    cache_mod.USE_SPEEDUPS = not pure
    c = Cache(name, create=False)
    try:
        for r, k in enumerate(keys):
            if not go[r].wait(60):
                raise SystemExit(f"round {r} never started")
            c.set(k, r)  # the stripe is locked by the test: this set waits
            acks.put(r)
    finally:
        c.close()


def _contend(c: Cache, s: int, ctx, pure: bool) -> None:
    """ROUNDS rounds: hold stripe ``s`` until N_WRITERS writer processes all
    block on it, release, wait for their sets. Exactly ROUNDS * N_WRITERS waits."""
    keys = _keys_of_stripe(c, s, ROUNDS * N_WRITERS)
    locks = admin.storage(c).locks
    go = [ctx.Event() for _ in range(ROUNDS)]
    acks = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(c.name, pure, keys[w::N_WRITERS], go, acks))
             for w in range(N_WRITERS)]
    try:
        for p in procs:
            p.start()
        watch = FutexWatch([p.pid for p in procs])
        for r in range(ROUNDS):
            locks.lock(s)  # free: the writers finished the previous round
            try:
                watch.reset()
                go[r].set()
                watch.await_waiters(N_WRITERS)
            finally:
                locks.unlock(s)
            assert sorted(acks.get(timeout=60) for _ in range(N_WRITERS)) == [r] * N_WRITERS
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * N_WRITERS
    finally:
        kill_alive(procs)


def _scrape(c: Cache) -> dict:
    reg = CollectorRegistry()
    reg.register(ShmcacheCollector(c))
    out = {}
    for fam in parser.text_string_to_metric_families(generate_latest(reg).decode()):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pure,start", [
    pytest.param(False, "fork", marks=needs_c, id="c-fork"),
    pytest.param(True, "spawn", id="python-spawn"),
])
def test_waits_of_writer_processes_are_counted_exactly(make_cache, pure, start):
    c = make_cache(size="4MiB", stripes=4)
    s = 2
    before = _Sample(c)
    _contend(c, s, mp.get_context(start), pure)
    after = _Sample(c)
    want = ROUNDS * N_WRITERS

    st = admin.stripes(c)
    assert [x.lock_waits for x in st] == [want if i == s else 0 for i in range(4)]
    waited = st[s].lock_wait_seconds
    assert 0 < st[s].lock_wait_max_seconds <= waited
    assert st[s].lock_wait_mean_seconds == pytest.approx(waited / want)
    assert all(x.lock_wait_seconds == 0 for i, x in enumerate(st) if i != s)
    assert admin.counters(c)["lock_waits"] == want
    stats = c.stats()
    assert stats["lock_waits"] == want and stats["stripe_lock_waits"][s] == want
    assert stats["lock_wait_seconds"] == pytest.approx(waited)
    assert stats["lock_wait_max_seconds"] == st[s].lock_wait_max_seconds

    # Prometheus, parsed with prometheus_client's own parser
    m = _scrape(c)
    lab = (("cache", c.name), ("stripe", str(s)))
    assert m[("shmcache_stripe_lock_waits_total", lab)] == want
    assert m[("shmcache_stripe_lock_wait_seconds_total", lab)] == pytest.approx(waited)
    assert m[("shmcache_stripe_lock_wait_max_seconds", lab)] == pytest.approx(st[s].lock_wait_max_seconds)
    assert m[("shmcache_stripe_lock_waits_total", (("cache", c.name), ("stripe", "0")))] == 0
    assert m[("shmcache_lock_waits_total", (("cache", c.name),))] == want
    assert m[("shmcache_lock_wait_seconds_total", (("cache", c.name),))] == pytest.approx(waited)

    # shmcache top: the contended stripe leads, with the interval's waits
    frame = top_frame(c.name, before, after)
    top = frame["contended_stripes"][0]
    assert top["stripe"] == s and len(frame["contended_stripes"]) == 1
    assert top["lock_waits_per_s"] * (after.t - before.t) == pytest.approx(want)
    assert frame["lock_waits_per_s"] == pytest.approx(top["lock_waits_per_s"])
    assert top["lock_wait_mean_s"] == pytest.approx(waited / want)
    assert "most contended stripes" in "\n".join(render_top(frame))


def test_stats_json_lists_lock_waits_per_stripe(make_cache):
    c = make_cache(size="4MiB", stripes=4)
    r = subprocess.run([sys.executable, "-m", "shmcache", "stats", "-n", c.name, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["lock_waits"] == 0 and st["stripe_lock_waits"] == [0, 0, 0, 0]
    assert st["lock_wait_seconds"] == 0.0 and st["stripe_lock_wait_seconds"] == [0.0] * 4
    text = subprocess.run([sys.executable, "-m", "shmcache", "stats", "-n", c.name],
                          capture_output=True, text=True, timeout=60).stdout
    assert "lock waits  " in text


def test_uncontended_writes_count_no_waits(make_cache):
    c = make_cache(size="4MiB", stripes=4)
    for i in range(2000):
        c.set(f"k{i}", i)
        c.delete(f"k{i // 2}")
    c.clear()
    assert [x.lock_waits for x in admin.stripes(c)] == [0] * 4
    assert admin.counters(c)["lock_waits"] == 0


def _wait_once_in_a_thread(c: Cache, s: int, writer: Cache, key: str) -> None:
    """Hold stripe ``s`` while a thread of this process sets ``key`` through
    ``writer``; release once the thread is blocked on the stripe's lock."""
    locks = admin.storage(c).locks
    watch = FutexWatch()
    t = threading.Thread(target=writer.set, args=(key, b"v"))
    locks.lock(s)
    try:
        t.start()
        watch.await_waiters(1)
    finally:
        locks.unlock(s)
    t.join(30)
    assert not t.is_alive()


@needs_c
@pytest.mark.timeout(60)
def test_a_thread_waiting_for_another_thread_counts(make_cache):
    """Threads of one process contend on the lock word too (the C core
    releases the GIL while it waits): that is a lock wait as well."""
    c = make_cache(size="4MiB", stripes=4)
    s = 1
    (key,) = _keys_of_stripe(c, s, 1)
    _wait_once_in_a_thread(c, s, c, key)
    assert c[key] == b"v"
    assert [x.lock_waits for x in admin.stripes(c)] == [1 if i == s else 0 for i in range(4)]


@pytest.mark.timeout(60)
def test_clear_keeps_the_lock_wait_counters(make_cache):
    """Lock waits are the segment's history, like evictions: clear() keeps
    them. The waiter here is a second, pure-Python handle used from a thread
    of this process (each handle has its own client slot, so it sleeps on the
    lock word as another process would)."""
    c = make_cache(size="4MiB", stripes=4)
    s = 3
    (key,) = _keys_of_stripe(c, s, 1)
    old = cache_mod.USE_SPEEDUPS
    cache_mod.USE_SPEEDUPS = False
    try:
        other = Cache(c.name, create=False)
    finally:
        cache_mod.USE_SPEEDUPS = old
    try:
        _wait_once_in_a_thread(c, s, other, key)
    finally:
        other.close()
    assert c[key] == b"v" and admin.stripes(c)[s].lock_waits == 1
    c.clear()
    assert admin.stripes(c)[s].lock_waits == 1 and admin.counters(c)["lock_waits"] == 1


def _hold_and_hang(name, s, ready):
    c = Cache(name, create=False)
    admin.storage(c).locks.lock(s)
    ready.set()
    time.sleep(120)  # SIGKILLed holding the stripe


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pure", [pytest.param(False, marks=needs_c, id="c"), pytest.param(True, id="python")])
def test_a_wait_that_recovers_a_dead_holder_counts_once(make_cache, pure):
    """The writer that finds the stripe held by a SIGKILLed process waits,
    recovers it and keeps it: one wait, its time including the repair."""
    c = make_cache(size="4MiB", stripes=4)
    s = 0
    (key,) = _keys_of_stripe(c, s, 1)
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_and_hang, args=(c.name, s, ready))
    p.start()
    try:
        assert ready.wait(30)
    finally:
        p.kill()
        p.join(10)
    old = cache_mod.USE_SPEEDUPS
    cache_mod.USE_SPEEDUPS = not pure
    try:
        writer = Cache(c.name, create=False)
    finally:
        cache_mod.USE_SPEEDUPS = old
    try:
        writer.set(key, b"after")
    finally:
        writer.close()
    st = admin.stripes(c)[s]
    assert (st.recoveries, st.lock_waits) == (1, 1) and st.lock_wait_seconds > 0
    assert c[key] == b"after" and c.check() == []


@needs_c
@pytest.mark.timeout(120)
def test_resp_info_shows_the_lock_waits(make_cache):
    """`shmcache serve`'s INFO carries the lock waits stats()/Prometheus/top
    show, in a `# Shmcache` section redis-py's own INFO parser reads (RESP2
    and RESP3): totals, and one `lockstat_stripeN` line per stripe that ever
    waited."""
    redis = pytest.importorskip("redis")
    pytest.importorskip("hiredis")
    from resp_server import ServeProcess

    c = make_cache(size="4MiB", stripes=4)
    k1 = _keys_of_stripe(c, 1, 2)
    (k3,) = _keys_of_stripe(c, 3, 1)
    for k in k1:
        _wait_once_in_a_thread(c, 1, c, k)
    _wait_once_in_a_thread(c, 3, c, k3)
    st = admin.stripes(c)
    assert [x.lock_waits for x in st] == [0, 2, 0, 1]

    srv = ServeProcess(c.name, size="4MiB")
    try:
        replies = {}
        for protocol in (2, 3):
            r = redis.Redis(port=srv.port, protocol=protocol, socket_timeout=10)
            try:
                replies[protocol] = r.info("shmcache"), r.info()
            finally:
                r.close()
    finally:
        assert srv.stop() == 0, srv.stderr()
    usec = [round(x.lock_wait_seconds * 1e6) for x in st]
    for protocol, (info, everything) in replies.items():
        assert info["shmcache_stripes"] == 4, protocol
        assert info["shmcache_lock_waits"] == 3
        assert info["shmcache_lock_wait_usec"] == round(sum(x.lock_wait_seconds for x in st) * 1e6)
        assert info["shmcache_lock_wait_max_usec"] == round(max(x.lock_wait_max_seconds for x in st) * 1e6)
        assert info["shmcache_recoveries"] == 0
        assert info["lockstat_stripe1"]["waits"] == 2 and info["lockstat_stripe1"]["usec"] == usec[1]
        assert info["lockstat_stripe1"]["max_usec"] == round(st[1].lock_wait_max_seconds * 1e6)
        assert info["lockstat_stripe1"]["usec_per_wait"] == pytest.approx(st[1].lock_wait_mean_seconds * 1e6,
                                                                           abs=0.01)
        assert info["lockstat_stripe3"]["waits"] == 1 and info["lockstat_stripe3"]["usec"] == usec[3]
        assert "lockstat_stripe0" not in info and "lockstat_stripe2" not in info  # never waited: no line
        assert "keyspace_hits" not in info  # INFO shmcache is that section only
        # the default INFO has it too, next to the sections Redis clients expect
        assert everything["shmcache_lock_waits"] == 3 and everything["lockstat_stripe3"]["waits"] == 1
        assert "keyspace_hits" in everything and "redis_version" in everything
