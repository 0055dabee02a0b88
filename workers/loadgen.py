"""Load generator: a realistic cache workload against one shmcache cache.

Each operation picks a key by Zipf popularity (rank r is chosen with
probability ~ 1/r**s over ``--keys`` keys, so a few hot keys take most of the
traffic, as in web caches), then:

* ``--set-ratio`` of the time writes it (an update, write-through);
* ``--delete-ratio`` of the time deletes it (an invalidation);
* otherwise gets it, and on a miss "computes" the value and stores it
  (cache-aside), as a web worker would.

Every stored value carries its own checksum (xxh64 of key and body in the
first 8 bytes), and every hit is verified, so a torn or misplaced value is
counted as ``corrupt``. TTLs: ``--short-ttl-frac`` of the writes get 1-2 s
(sessions, rate windows), the rest 1-10 min. Value sizes are log-normal
around ``--value-size`` bytes.

Run it::

    shmcache daemon --name app --size 256MiB &        # or any process creating the cache
    python workers/loadgen.py --name app --seconds 10 --workers 4
    shmcache stats --name app                          # watch hit rate and expirations

It prints one summary line per worker (``--json``: a JSON object) with ops,
hits, misses, sets, deletes, corrupt and ops/s. Reuse from benchmarks::

    from workers.loadgen import LoadSpec, run_worker
    result = run_worker("app", LoadSpec(seconds=5), seed=1)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import xxhash

try:
    from shmcache import Cache
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from shmcache import Cache

_BATCH = 4096  # random draws are made in numpy batches: per-op numpy calls would dominate


@dataclass
class LoadSpec:
    """The workload. Seconds, ratios in [0, 1], sizes in bytes."""

    seconds: float = 5.0
    keys: int = 100_000
    zipf: float = 1.0
    set_ratio: float = 0.10
    delete_ratio: float = 0.01
    short_ttl_frac: float = 0.30
    value_size: int = 300
    max_value_size: int = 4096
    prefix: str = "lg:"


def make_value(key: str, body: bytes) -> bytes:
    """A self-checking value: 8-byte xxh64 of key + body, then the body."""
    return xxhash.xxh64_digest(key.encode() + body) + body


def value_ok(key: str, value) -> bool:
    """True if ``value`` is a :func:`make_value` value made for ``key``."""
    return (
        isinstance(value, bytes)
        and len(value) >= 8
        and xxhash.xxh64_digest(key.encode() + value[8:]) == value[:8]
    )


def zipf_cdf(n: int, s: float) -> np.ndarray:
    """Cumulative distribution of a Zipf(s) law over ranks 1..n."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    c = np.cumsum(w)
    return c / c[-1]


def run_worker(name: str, spec: LoadSpec, seed: int = 0, cache: Cache | None = None) -> dict:
    """Run ``spec`` against cache ``name`` for ``spec.seconds``; return the counts.

    Raises:
        CacheNotFound: the cache does not exist (this worker never creates it).
    """
    own = cache is None
    if own:
        cache = Cache(name, create=False)
    rng = np.random.default_rng(seed)
    cdf = zipf_cdf(spec.keys, spec.zipf)
    pool = rng.bytes(1 << 20)
    counts = dict(ops=0, hits=0, misses=0, sets=0, deletes=0, corrupt=0)
    get, set_, delete = cache.get, cache.set, cache.delete
    p_set = spec.set_ratio
    p_del = spec.set_ratio + spec.delete_ratio
    sigma = 0.8
    mu = np.log(max(16, spec.value_size - 8))
    t_end = time.perf_counter() + spec.seconds
    try:
        while time.perf_counter() < t_end:
            ranks = np.searchsorted(cdf, rng.random(_BATCH)).tolist()
            rolls = rng.random(_BATCH).tolist()
            short = (rng.random(_BATCH) < spec.short_ttl_frac).tolist()
            ttl_s = rng.uniform(1.0, 2.0, _BATCH).tolist()
            ttl_l = rng.uniform(60.0, 600.0, _BATCH).tolist()
            sizes = np.clip(rng.lognormal(mu, sigma, _BATCH), 1, spec.max_value_size - 8).astype(int).tolist()
            offs = rng.integers(0, (1 << 20) - spec.max_value_size, _BATCH).tolist()
            for i in range(_BATCH):
                key = f"{spec.prefix}{ranks[i]}"
                r = rolls[i]
                if r < p_set or r >= p_del:
                    if r >= p_del:
                        v = get(key)
                        if v is not None:
                            counts["hits"] += 1
                            if not value_ok(key, v):
                                counts["corrupt"] += 1
                            counts["ops"] += 1
                            continue
                        counts["misses"] += 1
                    o = offs[i]
                    set_(key, make_value(key, pool[o : o + sizes[i]]), ttl=ttl_s[i] if short[i] else ttl_l[i])
                    counts["sets"] += 1
                else:
                    delete(key)
                    counts["deletes"] += 1
                counts["ops"] += 1
                if (i & 255) == 0 and time.perf_counter() >= t_end:
                    break
    finally:
        if own:
            cache.close()
    counts["seconds"] = spec.seconds
    counts["ops_per_s"] = counts["ops"] / spec.seconds if spec.seconds else 0.0
    return counts


def _child(name, spec, seed, q):
    try:
        q.put(run_worker(name, spec, seed))
    except BaseException as e:  # report, do not hang the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


def main(argv=None) -> int:
    """Command line entry point; see the module docstring."""
    d = LoadSpec()
    p = argparse.ArgumentParser(description="shmcache load generator (Zipf keys, get/set mix, TTLs)")
    p.add_argument("--name", required=True, help="cache to load (must exist)")
    p.add_argument("--seconds", type=float, default=d.seconds)
    p.add_argument("--keys", type=int, default=d.keys, help="key space size")
    p.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent (1.0: classic web skew)")
    p.add_argument("--set-ratio", type=float, default=d.set_ratio)
    p.add_argument("--delete-ratio", type=float, default=d.delete_ratio)
    p.add_argument("--short-ttl-frac", type=float, default=d.short_ttl_frac)
    p.add_argument("--value-size", type=int, default=d.value_size, help="typical value bytes")
    p.add_argument("--prefix", default=d.prefix)
    p.add_argument("--workers", type=int, default=1, help="processes (each with its own seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON lines")
    a = p.parse_args(argv)
    spec = LoadSpec(seconds=a.seconds, keys=a.keys, zipf=a.zipf, set_ratio=a.set_ratio,
                    delete_ratio=a.delete_ratio, short_ttl_frac=a.short_ttl_frac,
                    value_size=a.value_size, prefix=a.prefix)
    if a.workers <= 1:
        results = [run_worker(a.name, spec, a.seed)]
    else:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_child, args=(a.name, spec, a.seed + i, q)) for i in range(a.workers)]
        for pr in procs:
            pr.start()
        results = []
        try:
            for _ in procs:
                results.append(q.get(timeout=spec.seconds + 60))
        finally:
            for pr in procs:
                pr.join(10)
                if pr.is_alive():
                    pr.kill()
                    pr.join(5)
    rc = 0
    for r in results:
        if "error" in r:
            print(f"loadgen: {r['error']}", file=sys.stderr)
            rc = 1
        elif a.json:
            print(json.dumps(r))
        else:
            looks = r["hits"] + r["misses"]
            print(f"{r['ops']:,} ops ({r['ops_per_s']:,.0f}/s), hit rate "
                  f"{100 * r['hits'] / looks if looks else 0:.1f}%, {r['sets']:,} sets, "
                  f"{r['deletes']:,} deletes, {r['corrupt']} corrupt")
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # one line, like the shmcache command
        print(f"loadgen: {e}", file=sys.stderr)
        sys.exit(1)
