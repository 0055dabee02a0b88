"""Stall of a writer after the holder of its stripe lock is SIGKILLed.

    .venv/bin/python benchmarks/bench_recovery.py [--rounds 200] [--size 64MiB] [--lock-timeout 0.5] [--pidns]

Each round: a holder process takes stripe 0's lock and keeps it; a waiter
process starts a ``set`` on that stripe and blocks; the holder is SIGKILLed;
the stall is the time from the kill to the waiter's ``set`` returning
(CLOCK_MONOTONIC in both processes). The cache (``--size``, default 64 MiB)
is filled with 300-byte values until it evicts first, so the recovery repairs
a full stripe, as in production. With ``--pidns`` the holder runs in its
own PID namespace (``unshare --pid --fork``, root only), as a sidecar would.

Before liveness came from the kernel (client slot OFD locks), the waiter
suspected the holder only after ``lock_timeout`` (0.5 s by default), so every
round stalled at least that long. Prints median, p90, p99 and max in ms.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import psutil  # noqa: E402
import xxhash  # noqa: E402

from shmcache import Cache, admin  # noqa: E402
from shmcache.codec import encode_key  # noqa: E402

CTX = mp.get_context("fork")
HOLDER = """
import sys, time
from shmcache import Cache
c = Cache(sys.argv[1], create=False)
c._locks.lock(0)
print("HOLDING", flush=True)
time.sleep(600)
"""


def _hold(name, ready):
    c = Cache(name, create=False)
    c._locks.lock(0)
    ready.set()
    time.sleep(600)


def _wait(name, key, lock_timeout, started, done):
    c = Cache(name, create=False, lock_timeout=lock_timeout)
    started.set()
    c.set(key, b"v")
    done.value = time.monotonic()


def _pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--lock-timeout", type=float, default=0.5)
    ap.add_argument("--size", default="64MiB", help="cache size, filled until it evicts (default 64MiB)")
    ap.add_argument("--pidns", action="store_true", help="holder in its own PID namespace (root)")
    args = ap.parse_args()
    name = f"bench-recovery-{uuid.uuid4().hex[:8]}"
    cache = Cache(name, size=args.size)
    mask = admin.geometry(cache).n_stripes - 1
    key = next(f"k{i}" for i in range(10**6) if xxhash.xxh3_64_intdigest(encode_key(f"k{i}")) & mask == 0)
    n = 0
    while cache.stats()["evictions"] == 0:  # full: the repair walks a full stripe
        cache.set_many({f"fill{j}": b"v" * 300 for j in range(n, n + 10000)})
        n += 10000
    stalls = []
    try:
        for _ in range(args.rounds):
            if args.pidns:
                holder = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                                           HOLDER, name], stdout=subprocess.PIPE, text=True)
                assert holder.stdout.readline().startswith("HOLDING")
                victim = psutil.Process(holder.pid).children()[0].pid
            else:
                ready = CTX.Event()
                holder = CTX.Process(target=_hold, args=(name, ready))
                holder.start()
                assert ready.wait(30)
                victim = holder.pid
            started, done = CTX.Event(), CTX.Value("d", 0.0)
            w = CTX.Process(target=_wait, args=(name, key, args.lock_timeout, started, done))
            w.start()
            assert started.wait(30)
            time.sleep(0.02)  # the waiter is blocked in set() by now
            t_kill = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            w.join(60)
            assert w.exitcode == 0
            stalls.append(done.value - t_kill)
            if args.pidns:
                holder.wait(30)
            else:
                holder.join(30)
    finally:
        cache.close()
        Cache.unlink(name)
    stalls.sort()
    where = "another PID namespace" if args.pidns else "the same PID namespace"
    print(f"stall after SIGKILL of the lock holder ({where}), {args.rounds} rounds, "
          f"lock_timeout={args.lock_timeout} s, a full {args.size} cache ({n:,} values written):")
    print(f"  p50 {_pct(stalls, 0.5) * 1e3:.2f} ms   p90 {_pct(stalls, 0.9) * 1e3:.2f} ms   "
          f"p99 {_pct(stalls, 0.99) * 1e3:.2f} ms   max {stalls[-1] * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
