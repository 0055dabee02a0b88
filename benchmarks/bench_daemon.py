"""Daemon benchmarks: snapshot and restore throughput, stripe blocking, expiry sweep rate.

Run (takes about a minute and ~3.5 GiB of RAM; run it on a quiet machine)::

    .venv/bin/python benchmarks/bench_daemon.py                 # 1 GiB cache, ~4 KiB values
    .venv/bin/python benchmarks/bench_daemon.py --size 256MiB   # quicker

What it prints, and the targets from the daemon issue:

* snapshot MB/s: snapshot file bytes / seconds of ``write_snapshot`` of a
  full cache to a file on /dev/shm (target >= 500 MB/s);
* restore MB/s: the same file restored into an empty cache of the same size;
* longest stripe block: the longest time the snapshot writer held any stripe
  lock while a writer process hammered the cache (target <= 5 ms), next to the
  worst set() latency that writer saw during the snapshot and outside it;
* sweep: expired keys reclaimed per second by the daemon's expiry machinery
  (``ExpiryCycle.sweep_all``) on a cache full of expired small keys, and on
  one where half the keys are expired (target >= 1 M keys/s).

Everything it creates (caches ``bench-daemon-*``, a directory on /dev/shm,
the writer process) is removed in ``finally``, also on SIGTERM and Ctrl-C.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from shmcache import Cache  # noqa: E402
from shmcache.daemon import ExpiryCycle  # noqa: E402
from shmcache.snapshot import restore_snapshot, verify_snapshot, write_snapshot  # noqa: E402


def _fill(cache: Cache, value_size: int, fill: float, ttl=None, prefix="k") -> tuple[int, int]:
    """Fill ``cache`` to about ``fill`` of its arena with values of ~value_size bytes.
    Returns (entries, value bytes)."""
    rng = np.random.default_rng(1)
    pool = rng.bytes(1 << 22)
    st = cache.stats()
    target = int(st["arena_bytes"] * fill)
    target_items = int(st["max_items"] * fill)
    n = 0
    used = 0
    batch = 20_000
    while used < target and n < target_items:
        sizes = rng.integers(value_size // 2, value_size * 3 // 2 + 1, batch).tolist()
        offs = rng.integers(0, (1 << 22) - 2 * value_size, batch).tolist()
        m = {f"{prefix}{n + i}": pool[offs[i] : offs[i] + sizes[i]] for i in range(batch)}
        cache.set_many(m, ttl=ttl)
        n += batch
        used = cache.stats()["bytes_used"]
    return n, used


def _hammer(name, ready, stop, out_q, value_size, n_keys):
    """Overwrite random existing keys as fast as possible; report (time, latency) of slow sets."""
    c = Cache(name, create=False)
    rng = np.random.default_rng(2)
    pool = rng.bytes(1 << 20)
    lat_slow = []
    count = 0
    ready.set()
    try:
        while not stop.is_set():
            keys = rng.integers(0, n_keys, 1000).tolist()
            for k in keys:
                t0 = time.monotonic()
                c.set(f"k{k}", pool[:value_size])
                dt = time.monotonic() - t0
                count += 1
                if dt > 2e-4:
                    lat_slow.append((t0, dt))
    finally:
        c.close()
        out_q.put((count, lat_slow))


def bench_snapshot_restore(args, tmpdir) -> dict:
    name = f"bench-daemon-{uuid.uuid4().hex[:8]}"
    other = name + "-r"
    res = {}
    try:
        c = Cache(name, size=args.size)
        t = time.perf_counter()
        n, used = _fill(c, args.value_size, 0.75)
        st = c.stats()
        print(f"filled {args.size} cache: {st['items']:,} entries, {used / 2**20:,.0f} MiB of values+keys "
              f"in {time.perf_counter() - t:.1f} s ({st['stripes']} stripes)")
        path = os.path.join(tmpdir, "bench.snap")

        # 1. snapshot throughput, quiet cache
        times = []
        for _ in range(args.repeat):
            info = write_snapshot(c, path)
            times.append(info.seconds)
        size = info.bytes
        res["snapshot_mb_s"] = size / 1e6 / min(times)
        res["snapshot_mb_s_median"] = size / 1e6 / statistics.median(times)
        print(f"snapshot: {size / 1e6:,.0f} MB, {info.entries:,} entries: best {min(times):.3f} s "
              f"= {res['snapshot_mb_s']:,.0f} MB/s, median {res['snapshot_mb_s_median']:,.0f} MB/s "
              f"(quiet cache: {info.locked_stripes} stripes needed the lock)")
        t = time.perf_counter()
        verify_snapshot(path)
        print(f"verify: {size / 1e6 / (time.perf_counter() - t):,.0f} MB/s")

        # 2. snapshot while a writer hammers every stripe
        ctx = mp.get_context("spawn")
        ready, stop, q = ctx.Event(), ctx.Event(), ctx.Queue()
        w = ctx.Process(target=_hammer, args=(name, ready, stop, q, args.value_size, st["items"]))
        w.start()
        try:
            if not ready.wait(60):
                raise RuntimeError("the writer process did not start")
            time.sleep(0.5)
            holds = []
            windows = []
            for _ in range(args.repeat):
                t0 = time.monotonic()
                info = write_snapshot(c, path)
                windows.append((t0, time.monotonic()))
                holds.append(info)
                time.sleep(0.3)
            time.sleep(0.5)
            stop.set()
            count, slow = q.get(timeout=60)
            w.join(30)
        finally:
            if w.is_alive():
                w.kill()
                w.join(5)
        inside = [dt for t0, dt in slow if any(a <= t0 <= b for a, b in windows)]
        outside = [dt for t0, dt in slow if not any(a <= t0 <= b for a, b in windows)]
        res["max_lock_hold_ms"] = max(i.max_lock_hold for i in holds) * 1e3
        all_holds = np.array([h for i in holds for h in i.lock_holds] or [0.0]) * 1e3
        res["lock_hold_ms_p50"] = float(np.percentile(all_holds, 50))
        res["lock_hold_ms_p99"] = float(np.percentile(all_holds, 99))
        res["locked_stripes"] = max(i.locked_stripes for i in holds)
        res["writer_max_set_ms_during"] = max(inside, default=0.0) * 1e3
        res["writer_max_set_ms_outside"] = max(outside, default=0.0) * 1e3
        busy_t = [i.seconds for i in holds]
        during = sum(b - a for a, b in windows)
        print(f"snapshot under a writer ({count:,} sets, {len(inside)} of them slower than 0.2 ms during "
              f"{during:.2f} s of snapshots): {size / 1e6 / min(busy_t):,.0f} MB/s; "
              f"stripe lock held by the snapshot: median {res['lock_hold_ms_p50']:.2f} ms, "
              f"p99 {res['lock_hold_ms_p99']:.2f} ms, longest {res['max_lock_hold_ms']:.2f} ms "
              f"({res['locked_stripes']} of {st['stripes']} stripes needed the lock); writer's worst set() "
              f"{res['writer_max_set_ms_during']:.2f} ms during snapshots, "
              f"{res['writer_max_set_ms_outside']:.2f} ms outside")
        c.close()
        Cache.unlink(name)

        # 3. restore throughput into an empty cache of the same size
        info = verify_snapshot(path)
        times = []
        for _ in range(max(1, args.repeat - 1)):
            with Cache(other, size=args.size) as dst:
                r = restore_snapshot(dst, path)
                times.append(r.seconds)
                assert r.loaded == info.entries, (r.loaded, info.entries)
            Cache.unlink(other)
        res["restore_mb_s"] = info.bytes / 1e6 / min(times)
        print(f"restore: {info.entries:,} entries in {min(times):.2f} s = {res['restore_mb_s']:,.0f} MB/s "
              f"({info.entries / min(times):,.0f} entries/s)")
    finally:
        Cache.unlink(name)
        Cache.unlink(other)
    return res


def bench_sweep(args) -> dict:
    name = f"bench-daemon-{uuid.uuid4().hex[:8]}"
    res = {}
    ttl = 1.0
    value = b"x" * 24
    try:
        for label, half in (("all expired", False), ("half expired", True)):
            c = Cache(name, size=args.size)
            n_total = int(c.stats()["max_items"] * args.sweep_fill)
            for a in range(0, n_total, 50_000):
                keys = range(a, min(n_total, a + 50_000))
                if half:  # expiring and lasting keys interleaved: every stripe holds both
                    c.set_many({f"e{i}": value for i in keys if i % 2 == 0}, ttl=ttl)
                    c.set_many({f"l{i}": value for i in keys if i % 2}, ttl=3600)
                else:
                    c.set_many({f"e{i}": value for i in keys}, ttl=ttl)
            items = c.stats()["items"]
            time.sleep(ttl + 0.05)  # every short-TTL key has expired now
            cyc = ExpiryCycle(c)
            t = time.perf_counter()
            swept = cyc.sweep_all()
            dt = time.perf_counter() - t
            left = c.stats()["items"]
            problems = c.check()
            key = "sweep_keys_s_half" if half else "sweep_keys_s"
            res[key] = swept / dt
            res[key + "_max_lock_ms"] = cyc.timing.get("max_lock_hold", 0.0) * 1e3
            print(f"sweep ({label}): {swept:,} of {items:,} keys reclaimed in {dt:.3f} s = {res[key]:,.0f} keys/s; "
                  f"{left:,} left; longest lock hold {res[key + '_max_lock_ms']:.2f} ms; "
                  f"check: {'sound' if not problems else problems[:2]}")
            c.close()
            Cache.unlink(name)
    finally:
        Cache.unlink(name)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1GiB", help="cache size (default 1GiB)")
    p.add_argument("--value-size", type=int, default=4096, help="typical value bytes (default 4096)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--skip-snapshot", action="store_true")
    p.add_argument("--sweep-fill", type=float, default=0.3, help="keys in the sweep test, as a share of max_items")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    tmpdir = tempfile.mkdtemp(prefix="bench-daemon-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    print(f"shmcache daemon benchmark: {args.size} cache, values ~{args.value_size} B, snapshot file in {tmpdir}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    res = {}
    try:
        if not args.skip_snapshot:
            res.update(bench_snapshot_restore(args, tmpdir))
        if not args.skip_sweep:
            res.update(bench_sweep(args))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    print()
    print("summary")
    checks = []
    if "snapshot_mb_s" in res:
        checks += [
            ("snapshot MB/s (best)", res["snapshot_mb_s"], ">=", 500),
            ("restore MB/s (best)", res["restore_mb_s"], None, None),
            ("longest stripe block ms", res["max_lock_hold_ms"], "<=", 5),
            ("locked stripe copy ms, median", res["lock_hold_ms_p50"], None, None),
            ("locked stripe copy ms, p99", res["lock_hold_ms_p99"], None, None),
            ("writer worst set() ms during snapshot", res["writer_max_set_ms_during"], None, None),
        ]
    if "sweep_keys_s" in res:
        checks += [("sweep keys/s (all expired)", res["sweep_keys_s"], ">=", 1_000_000),
                   ("sweep keys/s (half expired)", res["sweep_keys_s_half"], ">=", 1_000_000)]
    for label, v, op, target in checks:
        verdict = ""
        if op:
            good = v >= target if op == ">=" else v <= target
            verdict = f"  target {op} {target:,}: {'met' if good else 'MISSED'}"
        print(f"  {label:<40} {v:>14,.2f}{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
