"""Prometheus: the daemon's /metrics, scraped over HTTP and parsed with
prometheus_client's own parser, adds up what every worker process did."""

import multiprocessing as mp
import re
import time
import urllib.request

import pytest

from procs import kill_alive
from shmcache import Cache
from test_aio import _free_port
from test_daemon import _snapshot_now, daemon  # noqa: F401 - the daemon fixture

parser = pytest.importorskip("prometheus_client.parser")
CTX = mp.get_context("spawn")


def _work(name, wid, n):
    c = Cache(name, create=False)
    for i in range(n):
        c.set(f"w{wid}:{i}", b"x" * 100)
    for i in range(n):
        c.get(f"w{wid}:{i}")  # hit
    for i in range(wid + 1):
        c.get(f"absent:{wid}:{i}")  # miss
    c.delete(f"w{wid}:0")
    c.close()


def _scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_daemon_metrics_equal_the_sum_of_the_workers(daemon, cache_name, tmp_path):
    port = _free_port()
    snap = tmp_path / "m.snap"
    d = daemon("--size", "8MiB", "--stripes", "4", "--metrics", f"127.0.0.1:{port}", "--snapshot", str(snap),
               "--snapshot-every", "0", "--expire-every", "0")
    assert f"metrics at http://127.0.0.1:{port}/metrics" in d.log()
    workers = [CTX.Process(target=_work, args=(cache_name, w, 100 * (w + 1))) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    _snapshot_now(d, snap)
    m = _scrape(port)
    c = (("cache", cache_name),)
    sets = sum(100 * (w + 1) for w in range(3))
    assert m[("shmcache_sets_total", c)] == sets
    assert m[("shmcache_hits_total", c)] == sets
    assert m[("shmcache_misses_total", c)] == 1 + 2 + 3
    assert m[("shmcache_deletes_total", c)] == 3
    assert m[("shmcache_items", c)] == sets - 3
    assert m[("shmcache_evictions_total", c)] == 0 and m[("shmcache_recoveries_total", c)] == 0
    assert m[("shmcache_clients", c)] == 1  # the daemon itself; the workers detached
    assert m[("shmcache_daemon_up", c)] == 1
    assert 0 <= m[("shmcache_daemon_heartbeat_age_seconds", c)] < 30
    assert m[("shmcache_last_snapshot_success", c)] == 1
    assert m[("shmcache_last_snapshot_entries", c)] == sets - 3
    fills = [m[("shmcache_stripe_fill_ratio", (("cache", cache_name), ("stripe", str(s))))] for s in range(4)]
    assert all(0 < f < 1 for f in fills)
    # lock waits: present for the cache and every stripe (how many the 3 workers had is up to the scheduler;
    # tests/test_lock_waits.py makes them happen and counts them exactly)
    waits = [m[("shmcache_stripe_lock_waits_total", (("cache", cache_name), ("stripe", str(s))))] for s in range(4)]
    assert m[("shmcache_lock_waits_total", c)] == sum(waits)
    assert all(("shmcache_stripe_lock_wait_seconds_total", (("cache", cache_name), ("stripe", str(s)))) in m
               for s in range(4))
    used = m[("shmcache_bytes_used", c)]
    assert used == pytest.approx(sum(fills) * m[("shmcache_bytes_capacity", c)] / 4, rel=1e-3)
    # a second scrape after more traffic moves only what changed
    with Cache(cache_name, create=False) as cache:
        cache.get("w0:1")
        m2 = _scrape(port)
    assert m2[("shmcache_hits_total", c)] == sets + 1 and m2[("shmcache_sets_total", c)] == sets
    assert d.stop() == 0


def test_metrics_address_errors_are_clear(daemon, cache_name):
    from shmcache.daemon import parse_listen

    assert parse_listen("9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen("localhost:http")
    busy = _free_port()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen()
        d = daemon("--size", "1MiB", "--metrics", f"127.0.0.1:{busy}", ready=False)
        assert d.proc.wait(30) == 1
    assert re.search(r"shmcache: cannot serve metrics on 127\.0\.0\.1:\d+", d.log())


def _expiring_then_overflowing(name, wid, phase):
    c = Cache(name, create=False)
    if phase == "ttl":
        for i in range(50):
            c.set(f"ttl{wid}:{i}", b"x", ttl=60)
    else:
        for i in range(2000):  # ~2 MiB of values into a 1 MiB cache: LRU evicts
            c.set(f"big{wid}:{i}", b"v" * 1000)
    c.close()


def _run_workers(name, phase):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_expiring_then_overflowing, args=(name, w, phase)) for w in range(3)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    finally:
        kill_alive(procs)


def test_collector_mounted_in_an_app_counts_expirations_and_evictions(make_cache):
    """The collector as the README mounts it in your own app (a real WSGI
    server: make_wsgi_app under status.make_app): expirations and evictions
    made by worker processes show up exactly, per stripe summing to the total."""
    from prometheus_client import CollectorRegistry, make_wsgi_app

    from shmcache import admin
    from shmcache.contrib import status
    from shmcache.contrib.prometheus import ShmcacheCollector

    c = make_cache(size="1MiB", stripes=4)
    reg = CollectorRegistry()
    reg.register(ShmcacheCollector(c))
    server, thread = status.serve(status.make_app(c, make_wsgi_app(reg)), "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        _run_workers(c.name, "ttl")
        assert admin.expire(c, now=time.time() + 120) == 150  # every worker's ttl keys, now
        _run_workers(c.name, "overflow")
        m = _scrape(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.status == 200 and c.name in r.read().decode()  # the status page, same app
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    lab = (("cache", c.name),)
    ctr = admin.counters(c)
    assert m[("shmcache_expirations_total", lab)] == 150
    assert m[("shmcache_sets_total", lab)] == 3 * 50 + 3 * 2000
    evicted = m[("shmcache_evictions_total", lab)]
    assert evicted == ctr["evictions"] > 0
    per_stripe = [m[("shmcache_stripe_evictions_total", lab + (("stripe", str(s)),))] for s in range(4)]
    assert sum(per_stripe) == evicted
    assert m[("shmcache_items", lab)] == admin.stored_items(c) == 3 * 2000 - evicted
