"""Fault injection: readers on two hosts check every value they get against
the history of what Redis held, while the tracking connections are killed,
Redis restarts empty, FLUSHALL runs and daemons are SIGKILLed.

The claim under test (shmcache.near's docstring): a read started at time R
never returns a value that Redis had already replaced, deleted or flushed
before ``R - max_staleness``. One process (this one) makes every change and
logs when each was issued and acknowledged; reader processes log each read's
start, end and result; the check afterwards is exact against that log.

The default run lasts FAULT_SECONDS; ``-m stress`` runs the long version.
"""

from __future__ import annotations

import bisect
import multiprocessing as mp
import os
import random
import signal
import time

import pytest

from near_support import REDIS, Host, RedisServer, wait_for
from procs import kill_alive

redis = pytest.importorskip("redis", reason="the near extra (redis-py) is installed by make test")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server missing (make test installs it)")

FAULT_SECONDS = 10.0
STRESS_SECONDS = float(os.environ.get("SHMCACHE_NEAR_STRESS_SECONDS", "120"))
PING = 0.1
BOUND = 2 * PING  # the tracker's max_staleness
KEYS = 12
FLUSH = -1
MAX_EVENTS = 400_000


def _reader(name, url, seed, stop, out_path):
    from shmcache.near import NearCache

    rnd = random.Random(seed)
    log = []
    n = NearCache(name, url, prefixes=["app:"])
    try:
        while not stop.is_set():
            k = rnd.randrange(KEYS)
            t0 = time.monotonic()
            try:
                v = n.get(f"app:f:{k}")
            except redis.RedisError:
                continue  # Redis is restarting: nothing was served
            t1 = time.monotonic()
            log.append((t0, t1, k, -2 if v is None else int(v)))
    finally:
        n.close()
        with open(out_path, "w") as f:
            f.write("\n".join(f"{a!r} {b!r} {k} {v}" for a, b, k, v in log))


def _check(events, reads):
    """Reads that returned something Redis had replaced before ``t0 - BOUND``."""
    per_key = {k: [] for k in range(KEYS)}
    for i, (kind, _issue, _ack) in enumerate(events):
        for k in (range(KEYS) if kind == FLUSH else (kind,)):
            per_key[k].append(i)
    acks = {k: [events[i][2] for i in idx] for k, idx in per_key.items()}
    bad = []
    for t0, t1, k, v in reads:
        idx = per_key[k]
        j = bisect.bisect_left(acks[k], t0 - BOUND) - 1
        last = idx[j] if j >= 0 else None  # the latest change to k acknowledged before the cutoff
        if v == -2:  # absent: fine if the key was flushed at or after `last` (issued before the read ended)
            ok = last is None or events[last][0] == FLUSH or any(
                events[i][0] == FLUSH and events[i][1] <= t1 for i in idx[j + 1:])
        else:
            assert events[v][0] == k, f"read a value never written to app:f:{k}: {v}"
            ok = last is None or v >= last
        if not ok:
            bad.append((t0, k, v, last, events[last]))
    return bad


def _run(tmp_path, seconds):
    server = RedisServer().start()
    hosts = []
    stop = mp.get_context("fork").Event()
    readers = []
    events = []  # (key or FLUSH, issued, acknowledged), in order: one process makes every change
    try:
        hosts = [Host(server, tmp_path, ping=PING, tag=f"fault{i}").start_daemon(wait=False) for i in range(2)]
        for h in hosts:
            h.wait_up()
        rc = redis.Redis.from_url(server.url, socket_timeout=2)

        def change(kind, do):
            issued = time.monotonic()
            do()
            events.append((kind, issued, time.monotonic()))

        for k in range(KEYS):
            change(k, lambda k=k: rc.set(f"app:f:{k}", len(events)))
        ctx = mp.get_context("fork")
        for i, h in enumerate(hosts):
            for j in range(2):
                p = ctx.Process(target=_reader, args=(h.name, server.url, 1000 * i + j, stop,
                                                      tmp_path / f"reads-{i}-{j}.txt"))
                p.start()
                readers.append(p)

        rnd = random.Random(12)
        faults = ["client-kill", "flushall", "restart", "sigkill-daemon", "client-kill", "flushall",
                  "sigkill-tracker"]
        seen = set()
        deadline = time.monotonic() + seconds
        next_fault = time.monotonic() + 0.5
        f = 0
        while time.monotonic() < deadline:
            k = rnd.randrange(KEYS)
            try:
                change(k, lambda: rc.set(f"app:f:{k}", len(events)))
            except redis.RedisError:
                time.sleep(0.01)
                continue
            time.sleep(0.0005)
            if time.monotonic() >= next_fault:
                fault = faults[f % len(faults)]
                f += 1
                seen.add(fault)
                if fault == "client-kill":
                    for line in server.cli("CLIENT", "LIST").splitlines():
                        if " flags=t" in line or "flags=" in line and "t" in line.split("flags=")[1].split()[0]:
                            server.cli("CLIENT", "KILL", "ID", line.split("id=")[1].split()[0])
                elif fault == "flushall":
                    change(FLUSH, lambda: rc.flushall())
                elif fault == "restart":
                    # Redis comes back empty (no persistence): as good as a flush
                    change(FLUSH, lambda: server.restart(signal.SIGKILL))
                    rc.connection_pool.disconnect()
                elif fault == "sigkill-daemon":
                    h = hosts[f % 2]
                    h.stop_daemon(signal.SIGKILL)
                    time.sleep(0.3)  # readers of that host bypass once the heartbeat is old
                    h.start_daemon(wait=False)
                elif fault == "sigkill-tracker":  # the daemon's child: it restarts it
                    pid = (hosts[f % 2].stats().get("tracker") or {}).get("pid")
                    if pid:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                next_fault = time.monotonic() + 0.5
                assert len(events) < MAX_EVENTS
        stop.set()
        for p in readers:
            p.join(30)
            assert p.exitcode == 0
        reads = []
        for path in sorted(tmp_path.glob("reads-*.txt")):
            for line in path.read_text().splitlines():
                a, b, k, v = line.split()
                reads.append((float(a), float(b), int(k), int(v)))
        stats = [h.stats() for h in hosts]
        return events, reads, stats, seen
    finally:
        stop.set()
        kill_alive(readers, 5)
        for h in hosts:
            h.close()
        server.close()


def _assert_no_stale_reads(tmp_path, seconds):
    events, reads, stats, seen = _run(tmp_path, seconds)
    bad = _check(events, reads)
    hits = sum(s["near_hits"] for s in stats)
    print(f"\n{len(events)} changes, {len(reads)} reads, near hits {hits}, faults {sorted(seen)}, "
          f"epoch bumps {[s['epoch_bumps'] for s in stats]}, bypassed {[s['bypassed_reads'] for s in stats]}")
    assert len(reads) > 100 and len(events) > 100
    assert {"client-kill", "flushall", "restart", "sigkill-daemon", "sigkill-tracker"} <= seen
    assert hits > 0, "the near cache never served anything: the test proves nothing"
    assert not bad, f"{len(bad)} stale reads beyond {BOUND} s, first: {bad[:5]}"


def test_no_stale_reads_beyond_the_bound_under_faults(tmp_path):
    _assert_no_stale_reads(tmp_path, FAULT_SECONDS)


@pytest.mark.stress
def test_no_stale_reads_beyond_the_bound_under_faults_long(tmp_path):
    _assert_no_stale_reads(tmp_path, STRESS_SECONDS)


def test_the_checker_catches_a_stale_read():
    """The check above can fail: a read of the old value well after the new
    one was acknowledged, or of a flushed value, is reported."""
    events = [(0, 0.0, 0.01), (0, 1.0, 1.01), (FLUSH, 2.0, 2.01)]
    assert _check(events, [(1.5, 1.5, 0, 1)]) == []
    assert _check(events, [(1.05, 1.06, 0, 0)]) == []  # within the bound
    assert len(_check(events, [(1.5, 1.5, 0, 0)])) == 1  # replaced 0.49 s before
    assert len(_check(events, [(2.5, 2.5, 0, 1)])) == 1  # flushed before
    assert _check(events, [(2.5, 2.5, 0, -2)]) == []
    assert len(_check(events, [(1.5, 1.5, 0, -2)])) == 1  # it existed
