"""shmcache alone: ns/op of the hot path and 1- vs 2-process throughput.

    python benchmarks/bench_core.py            # ~30 s
    python benchmarks/bench_core.py --quick    # ~5 s
    make bench-core

Prints median / p90 / p99 / max ns per op for get (hit, miss), set and incr
with 100-byte values and get/set with a 4 KiB value, then total ops/s of 1 and
2 forked processes on a 90% get / 10% set mix over 100k keys (Zipf 0.99), and
checks the core targets: get hit <= 1.5 µs median, set <= 3 µs, 2 processes
>= 1.7x one. Same timing method as the full suite (``benchmarks/measure.py``:
batches of 100 ops per sample, max from an unbatched pass); nothing is pinned,
so on a shared machine compare runs, not single numbers.

Watch for: a spread of more than ~10% between repeats means the machine was
busy (the load average is printed); re-run before believing a regression.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cleanup, measure  # noqa: E402
from benchmarks.contenders import Servers, ShmcacheContender  # noqa: E402
from benchmarks.workloads import ZIPF_S, values  # noqa: E402

TARGETS = {"get_hit_100B": 1500.0, "set_100B": 3000.0}  # ns, median
SCALING_TARGET = 1.7


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repeat, short points")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--duration", type=float, help="seconds per throughput point (default 2)")
    a = ap.parse_args(argv)
    repeats = a.repeats or (1 if a.quick else 3)
    duration = a.duration or (0.5 if a.quick else 2.0)
    budget = 0.05 if a.quick else 0.3
    nkeys = 2_000 if a.quick else 10_000

    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"shmcache core benchmark: {repeats} repeat(s), load average {load}, {os.cpu_count()} cores")
    c = ShmcacheContender(Servers())
    vals = values(1)
    try:
        c.open()
        ops = c.ops()
        keys = [f"key:{i:08d}" for i in range(nkeys)]
        miss = [f"miss:{i:08d}" for i in range(nkeys)]
        ctrs = [f"ctr:{i:08d}" for i in range(nkeys)]
        rows = []
        for vname in ("100B", "4KiB"):
            v = vals[vname]
            for k in keys:
                ops.set(k, v)
            plan = [(f"get_hit_{vname}", "k", (ops.get,), keys), (f"set_{vname}", "kv", (ops.set,), keys)]
            if vname == "100B":
                plan[1:1] = [("get_miss", "k", (ops.get,), miss)]
                plan.append(("incr", "k", (ops.incr,), ctrs))
            reps = {op: [] for op, *_ in plan}
            for _ in range(repeats):
                for op, shape, fns, ks in plan:
                    reps[op].append(measure.time_op(shape, fns, ks, v, budget))
            rows += [(op, measure.combine_repeats(r)) for op, r in reps.items()]
        c.close()

        print("\nlatency, ns per op (median/p90/p99 of 100-op batches; max: slowest single call incl. timer)")
        print(f"{'operation':<14}{'median':>9}{'p90':>9}{'p99':>9}{'max':>10}{'spread':>8}  target")
        for op, d in rows:
            t = TARGETS.get(op)
            verdict = "" if t is None else f"<= {t:.0f}: {'met' if d['median'] <= t else 'MISSED'}"
            print(f"{op:<14}{d['median']:>9.0f}{d['p90']:>9.0f}{d['p99']:>9.0f}{d['max']:>10.0f}"
                  f"{d['spread_pct']:>7.0f}%  {verdict}")

        c.open()
        tkeys = [f"key:{i:08d}" for i in range(100_000)]
        c.populate({k: vals["100B"] for k in tkeys})
        cdf = measure.zipf_cdf(len(tkeys), ZIPF_S)
        perm = __import__("numpy").random.default_rng(1).permutation(len(tkeys))
        tp = {1: [], 2: []}
        cores = {1: [], 2: []}
        for r in range(repeats):
            for p in (1, 2):
                pt = measure.throughput_point(c, p, tkeys, cdf, perm, 0.10, vals["100B"], duration, seed=r * 10 + p)
                tp[p].append(pt["ops_per_s"])
                cores[p].append(sum(pt["cpu_share"]))
        c.close()
        one, two = statistics.median(tp[1]), statistics.median(tp[2])
        print(f"\nthroughput, 90% get / 10% set, 100k keys, Zipf({ZIPF_S}), {duration} s per point")
        for p, xs in tp.items():
            s = measure.summarize(xs)
            print(f"{p} process{'es' if p > 1 else '  '}  {s['median']:>12,.0f} ops/s  (spread {s['spread_pct']:.0f}%, "
                  f"workers got {statistics.median(cores[p]):.2f} cores)")
        ratio = two / one
        print(f"2 / 1 = {ratio:.2f}x  target >= {SCALING_TARGET}x: {'met' if ratio >= SCALING_TARGET else 'MISSED'}")
        if statistics.median(cores[2]) < 1.8:
            print("  (the 2 workers did not get 2 cores: other load on the machine; re-run when it is quiet)")
        print(f"load average after: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        cleanup.run_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
