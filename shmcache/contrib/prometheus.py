"""Prometheus metrics for a shmcache cache: one scrape covers every process.

shmcache's counters already live in shared memory, one set per attached
process plus the totals of processes that exited, so any single process can
export exact figures for all of them — no ``PROMETHEUS_MULTIPROC_DIR``, no
per-worker files to merge. The daemon serves them (``shmcache daemon -n app
--metrics 127.0.0.1:9464``, text format at ``/metrics``), or register the
collector in your own app::

    from prometheus_client import REGISTRY, make_asgi_app
    from shmcache.contrib.prometheus import ShmcacheCollector

    REGISTRY.register(ShmcacheCollector(cache))
    app.mount("/metrics", make_asgi_app())

A scrape reads the counters lock-free: O(clients + stripes), well under a
millisecond for the defaults.

Metrics (label ``cache`` = the cache name; ``stripe`` on per-stripe ones):

===================================  =========  ==========================================
``shmcache_hits_total``              counter    gets that found a live entry
``shmcache_misses_total``            counter    gets that found nothing (or an expired entry)
``shmcache_sets_total``              counter    stores (set/add/replace/incr/set_many items)
``shmcache_deletes_total``           counter    entries removed by delete/pop
``shmcache_evictions_total``         counter    entries evicted by LRU to make room
``shmcache_expirations_total``       counter    expired entries reclaimed (daemon or writers)
``shmcache_recoveries_total``        counter    stripes repaired after their lock holder died
``shmcache_lock_waits_total``        counter    lock acquisitions that found the stripe locked and waited
``shmcache_lock_wait_seconds_total``  counter   seconds those waits took, all stripes
``shmcache_items``                   gauge      entries stored (expired-not-yet-reclaimed included)
``shmcache_bytes_used``              gauge      arena bytes held by live entries
``shmcache_bytes_capacity``          gauge      arena bytes in all (what entries can use)
``shmcache_bytes_garbage``           gauge      arena bytes of dead entries awaiting compaction
``shmcache_size_bytes``              gauge      the whole segment
``shmcache_clients``                 gauge      live attached processes
``shmcache_stripe_fill_ratio``       gauge      per stripe: live bytes / arena bytes
``shmcache_stripe_evictions_total``  counter    per stripe evictions (a hot stripe shows here)
``shmcache_stripe_locked``           gauge      per stripe: 1 while a writer holds the lock
``shmcache_stripe_lock_waits_total``  counter   per stripe lock waits (a contended stripe shows here)
``shmcache_stripe_lock_wait_seconds_total``  counter  per stripe seconds waited for its lock
``shmcache_stripe_lock_wait_max_seconds``  gauge  per stripe: the longest single wait so far
``shmcache_daemon_up``               gauge      1 if a live daemon serves the cache
``shmcache_daemon_heartbeat_age_seconds``  gauge  seconds since its last tick
``shmcache_last_snapshot_timestamp_seconds``  gauge  when the last snapshot attempt ended
``shmcache_last_snapshot_success``   gauge      1 if it was written, 0 if it failed
``shmcache_last_snapshot_entries``   gauge      entries in the last written snapshot
===================================  =========  ==========================================

A cache used as a near cache in front of Redis (:mod:`shmcache.near`) adds,
all processes of the host together (each adds its own counts at most a
second late):

=========================================  =========  ====================================
``shmcache_near_hits_total``               counter    reads served from shared memory
``shmcache_near_misses_total``             counter    reads that filled the copy from Redis
``shmcache_near_upstream_reads_total``     counter    keys read from Redis (fills, bypasses, untracked)
``shmcache_near_bypassed_reads_total``     counter    reads sent to Redis because the tracker was down or late
``shmcache_near_fills_discarded_total``    counter    fills an invalidation overtook (not kept)
``shmcache_near_invalidations_total``      counter    keys invalidated by Redis (tracker)
``shmcache_near_flushes_total``            counter    null invalidations (FLUSHALL / FLUSHDB)
``shmcache_near_epoch_bumps_total``        counter    new epochs (reconnects, flushes, moved slots)
``shmcache_near_reconnects_total``         counter    tracking connections lost
``shmcache_near_tracker_up``               gauge      1 while workers may trust shared memory
``shmcache_near_heartbeat_age_seconds``    gauge      seconds since the last answered PING was sent
=========================================  =========  ====================================

A lock wait is a write (or a reader's locked fallback) that found its
stripe's lock taken by another process or thread; the waiter counts it in the
stripe's record right after acquiring, so the counts cover every process.
``rate(shmcache_stripe_lock_wait_seconds_total[1m])`` is the share of a
second that writers spent waiting for that stripe; divided by the rate of
``shmcache_stripe_lock_waits_total`` it is the mean wait.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import admin
from ..cache import Cache
from ..near import read_stats as near_stats

__all__ = ["ShmcacheCollector", "COUNTER_HELP", "NEAR_HELP"]

NEAR_HELP = {
    "near_hits": "Near-cache reads served from shared memory, all processes.",
    "near_misses": "Near-cache reads that filled the local copy from Redis.",
    "upstream_reads": "Keys the near cache read from Redis (fills, bypassed and untracked reads).",
    "bypassed_reads": "Near-cache reads sent to Redis because the tracker was down or late.",
    "fills_discarded": "Near-cache fills not kept because an invalidation overtook them.",
    "invalidations": "Keys invalidated by Redis, as received by the tracker.",
    "flushes": "Null invalidations (FLUSHALL / FLUSHDB) received by the tracker.",
    "epoch_bumps": "New near-cache epochs (reconnects, flushes, moved cluster slots).",
    "reconnects": "Tracking connections lost.",
}

COUNTER_HELP = {
    "hits": "Gets that found a live entry, all processes.",
    "misses": "Gets that found no live entry, all processes.",
    "sets": "Entries stored, all processes.",
    "deletes": "Entries removed by delete or pop, all processes.",
    "evictions": "Entries evicted (LRU) to make room.",
    "expirations": "Expired entries reclaimed.",
    "recoveries": "Stripes repaired after their lock holder died.",
    "lock_waits": "Stripe lock acquisitions that found the lock taken and waited, all processes.",
}


class ShmcacheCollector(Collector):
    """A ``prometheus_client`` collector over one or more open caches."""

    def __init__(self, *caches: Cache) -> None:
        if not caches:
            raise TypeError("ShmcacheCollector needs at least one open shmcache.Cache")
        self.caches = caches

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families are known only at collect time

    def collect(self) -> Iterator[Metric]:
        fams: dict[str, Metric] = {}

        def fam(kind: type, name: str, doc: str, labels: tuple[str, ...] = ("cache",)) -> Metric:
            if name not in fams:
                fams[name] = kind(name, doc, labels=list(labels))
            return fams[name]

        for cache in self.caches:
            if cache.closed:
                continue
            n = cache.name
            for key, value in admin.counters(cache).items():
                fam(CounterMetricFamily, f"shmcache_{key}", COUNTER_HELP[key]).add_metric([n], value)
            g = admin.geometry(cache)
            stripes = admin.stripes(cache)
            gauge = GaugeMetricFamily
            fam(gauge, "shmcache_items", "Entries stored (expired ones not yet reclaimed included).").add_metric(
                [n], sum(s.items for s in stripes))
            fam(gauge, "shmcache_bytes_used", "Arena bytes held by live entries.").add_metric(
                [n], sum(s.bytes_used for s in stripes))
            fam(gauge, "shmcache_bytes_capacity", "Arena bytes entries can use.").add_metric(
                [n], g.stripe_arena * g.n_stripes)
            fam(gauge, "shmcache_bytes_garbage", "Arena bytes of dead entries awaiting compaction.").add_metric(
                [n], sum(s.bytes_garbage for s in stripes))
            fam(gauge, "shmcache_size_bytes", "Bytes of the whole shared memory segment.").add_metric(
                [n], g.total_size)
            fam(gauge, "shmcache_clients", "Live processes attached.").add_metric(
                [n], sum(1 for c in admin.clients(cache) if c.alive))
            fam(CounterMetricFamily, "shmcache_lock_wait_seconds",
                "Seconds spent waiting for stripe locks, all processes.").add_metric(
                [n], sum(s.lock_wait_seconds for s in stripes))
            per = ("cache", "stripe")
            fill = fam(gauge, "shmcache_stripe_fill_ratio", "Live bytes / arena bytes, per stripe.", per)
            ev = fam(CounterMetricFamily, "shmcache_stripe_evictions", "Entries evicted, per stripe.", per)
            locked = fam(gauge, "shmcache_stripe_locked", "1 while a writer holds the stripe's lock.", per)
            waits = fam(CounterMetricFamily, "shmcache_stripe_lock_waits",
                        "Lock acquisitions that found the stripe locked and waited, per stripe.", per)
            waited = fam(CounterMetricFamily, "shmcache_stripe_lock_wait_seconds",
                         "Seconds spent waiting for the stripe's lock, per stripe.", per)
            longest = fam(gauge, "shmcache_stripe_lock_wait_max_seconds",
                          "The longest single wait for the stripe's lock so far.", per)
            for s in stripes:
                lab = [n, str(s.index)]
                fill.add_metric(lab, s.fill)
                ev.add_metric(lab, s.evictions)
                locked.add_metric(lab, 1.0 if s.locked_by else 0.0)
                waits.add_metric(lab, s.lock_waits)
                waited.add_metric(lab, s.lock_wait_seconds)
                longest.add_metric(lab, s.lock_wait_max_seconds)
            d = admin.daemon_info(cache)
            fam(gauge, "shmcache_daemon_up", "1 if a live daemon serves the cache.").add_metric(
                [n], 1.0 if d.alive else 0.0)
            if d.alive and d.heartbeat_age is not None:
                fam(gauge, "shmcache_daemon_heartbeat_age_seconds", "Seconds since the daemon's last tick.") \
                    .add_metric([n], d.heartbeat_age)
            last = d.last_snapshot
            if last is not None:
                fam(gauge, "shmcache_last_snapshot_timestamp_seconds", "When the last snapshot attempt ended.") \
                    .add_metric([n], last.time)
                fam(gauge, "shmcache_last_snapshot_success", "1 if the last snapshot was written.") \
                    .add_metric([n], 1.0 if last.ok else 0.0)
                if last.ok:
                    fam(gauge, "shmcache_last_snapshot_entries", "Entries in the last written snapshot.") \
                        .add_metric([n], last.entries)
            near = near_stats(cache)
            if near is not None:
                for key, doc in NEAR_HELP.items():
                    name = key if key.startswith("near_") else f"near_{key}"
                    fam(CounterMetricFamily, f"shmcache_{name}", doc).add_metric([n], near[key])
                fam(gauge, "shmcache_near_tracker_up", "1 while near-cache readers may trust shared memory.") \
                    .add_metric([n], 1.0 if near["tracker_up"] else 0.0)
                if near["heartbeat_age"] is not None:
                    fam(gauge, "shmcache_near_heartbeat_age_seconds",
                        "Seconds since the tracker's last answered PING was sent.").add_metric([n], near["heartbeat_age"])
        yield from fams.values()
