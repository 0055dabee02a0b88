"""The timing loops. Every contender goes through exactly these.

Latency (one process)
    ``perf_counter_ns`` costs ~60-80 ns a call here, more than a dict lookup,
    so single calls are not timed one by one: a *sample* is one timed batch of
    ``BATCH`` consecutive operations (different keys), and its time / BATCH is
    one per-op observation. Median, p90 and p99 are taken over those
    observations (so they describe 100-op averages, which hides single-op
    outliers), and ``max`` comes from a separate unbatched pass that times
    ``MAX_PASS_OPS`` single calls (it includes one timer call, ~70 ns). The
    Python ``for`` loop around the call (~10-15 ns) is included for every
    contender alike, as it would be in user code. GC is collected before and
    disabled during each timed pass (like ``timeit``).

Throughput (N processes)
    Forked workers open their own handles, run a short warm-up, meet at a
    barrier, then each runs a precomputed operation sequence for the same
    fixed wall time (``duration`` s) and reports ops done and time taken. The
    point's throughput is the sum of each worker's ops / its elapsed time.
    Each worker also reports the CPU time it got (``cpu_share``, CPU s per
    wall s), which tells a slow store from a busy machine.
    Workers are joined with a timeout and killed (by their Process handle,
    i.e. their PID) if they overrun; a worker that fails breaks the barrier so
    the parent never waits on it.
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import statistics
import threading
import time

import numpy as np

BATCH = 100  # ops per timed sample
MAX_PASS_OPS = 500  # single-op timings for the max
_pc = time.perf_counter_ns


def quantile(xs, q: float) -> float:
    """Linear-interpolated quantile of a non-empty sequence (numpy's default)."""
    return float(np.quantile(np.asarray(xs, dtype=np.float64), q))


# ------------------------------------------------------------------ latency
def _loop_k(fn, ks, pc=_pc):
    t0 = pc()
    for k in ks:
        fn(k)
    return pc() - t0


def _loop_kv(fn, ks, v, pc=_pc):
    t0 = pc()
    for k in ks:
        fn(k, v)
    return pc() - t0


def _loop_del_set(delete, set_, ks, v, pc=_pc):
    t0 = pc()
    for k in ks:
        delete(k)
        set_(k, v)
    return pc() - t0


def time_op(shape: str, fns: tuple, keys: list, value, budget_s: float, min_samples: int = 20,
            max_samples: int = 20000) -> dict:
    """Time one operation. ``shape``: "k" (fn(k)), "kv" (fn(k, v)) or "del_set"
    (delete(k); set(k, v), one op). ``keys`` are cycled in order, BATCH at a time.

    Runs batches until ``budget_s`` seconds of wall time have passed (at least
    ``min_samples``), then the unbatched max pass. Returns per-op ns stats.
    """
    batches = [keys[i : i + BATCH] for i in range(0, len(keys) - BATCH + 1, BATCH)]
    if not batches:
        raise ValueError(f"need at least {BATCH} keys, got {len(keys)}")
    if shape == "k":
        (fn,) = fns
        run = lambda ks: _loop_k(fn, ks)  # noqa: E731
        one = lambda k: fn(k)  # noqa: E731
    elif shape == "kv":
        (fn,) = fns
        run = lambda ks: _loop_kv(fn, ks, value)  # noqa: E731
        one = lambda k: fn(k, value)  # noqa: E731
    elif shape == "del_set":
        d, s = fns
        run = lambda ks: _loop_del_set(d, s, ks, value)  # noqa: E731

        def one(k):
            d(k)
            s(k, value)
    else:
        raise ValueError(shape)

    run(batches[0])  # warm-up: caches, connections, code paths
    gc.collect()
    gc.disable()
    try:
        samples = []
        deadline = time.perf_counter() + budget_s
        i = 0
        nb = len(batches)
        while len(samples) < max_samples and (len(samples) < min_samples or time.perf_counter() < deadline):
            samples.append(run(batches[i]) / BATCH)
            i += 1
            if i == nb:
                i = 0
        worst = 0
        n_single = min(MAX_PASS_OPS, len(keys))
        pc = _pc
        for k in keys[:n_single]:
            t0 = pc()
            one(k)
            t = pc() - t0
            if t > worst:
                worst = t
    finally:
        gc.enable()
    return dict(
        median=statistics.median(samples),
        p90=quantile(samples, 0.90),
        p99=quantile(samples, 0.99),
        max=float(worst),
        samples=len(samples),
        single_ops=n_single,
    )


def combine_repeats(reps: list[dict]) -> dict:
    """Median of each statistic over repeats, the largest max, and the spread
    of the repeat medians ((max - min) / median, in percent)."""
    meds = [r["median"] for r in reps]
    m = statistics.median(meds)
    return dict(
        median=m,
        p90=statistics.median(r["p90"] for r in reps),
        p99=statistics.median(r["p99"] for r in reps),
        max=max(r["max"] for r in reps),
        spread_pct=100.0 * (max(meds) - min(meds)) / m if m else 0.0,
        repeats=[{k: r[k] for k in ("median", "p90", "p99", "max", "samples")} for r in reps],
    )


# --------------------------------------------------------------- throughput
def zipf_cdf(n: int, s: float) -> np.ndarray:
    """CDF over ranks 1..n with P(rank r) proportional to 1 / r**s."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    c = np.cumsum(w)
    return c / c[-1]


def op_sequence(keys: list, cdf: np.ndarray, perm: np.ndarray, write_frac: float, length: int,
                seed: int, chunk: int = 256) -> list[list]:
    """``length`` operations as chunks of ``(key, is_write)``: keys drawn by
    Zipf rank (``cdf``), rank mapped to a key by ``perm`` (so the hot keys are
    spread over the keyspace), writes with probability ``write_frac``."""
    rng = np.random.default_rng(seed)
    ranks = np.searchsorted(cdf, rng.random(length), side="right")
    ranks = np.minimum(ranks, len(cdf) - 1)
    idx = perm[ranks].tolist()
    writes = (rng.random(length) < write_frac).tolist()
    pairs = [(keys[i], w) for i, w in zip(idx, writes)]
    return [pairs[i : i + chunk] for i in range(0, length, chunk)]


def _worker(contender, seq_args, value, duration, warmup_s, barrier, conn):
    code = 0
    try:
        ops = contender.child_ops("bytes")
        chunks = op_sequence(*seq_args)
        get, set_ = ops.get, ops.set
        mono = time.monotonic

        def run(until):
            n = 0
            nchunks = len(chunks)
            c = 0
            while True:
                for k, w in chunks[c]:
                    if w:
                        set_(k, value)
                    else:
                        get(k)
                n += len(chunks[c])
                c += 1
                if c == nchunks:
                    c = 0
                if mono() >= until:
                    return n

        run(mono() + warmup_s)
        gc.collect()
        gc.disable()
        barrier.wait(timeout=120)
        c0 = time.process_time()
        t0 = mono()
        n = run(t0 + duration)
        elapsed = mono() - t0
        cpu = time.process_time() - c0
        gc.enable()
        conn.send((n, elapsed, None, cpu))  # a pipe write: done before we return
        try:
            contender.child_close()
        except Exception:
            pass
    except BaseException as e:  # report, never hang the parent
        code = 1
        try:
            barrier.abort()
        except Exception:
            pass
        try:
            conn.send((0, 0.0, f"{type(e).__name__}: {e}", 0.0))
        except Exception:
            pass
    finally:
        os._exit(code)


def throughput_point(contender, procs: int, keys: list, cdf, perm, write_frac: float, value,
                     duration: float, seed: int, warmup_s: float = 0.2, seq_len: int = 200_000) -> dict:
    """Run ``procs`` forked workers for ``duration`` s; return ops/s and per-worker detail."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    contender.before_fork()
    workers, conns = [], []
    try:
        for r in range(procs):
            seq_args = (keys, cdf, perm, write_frac, seq_len, seed * 1000 + r)
            rx, tx = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(contender, seq_args, value, duration, warmup_s, barrier, tx),
                            daemon=True)
            p.start()
            tx.close()
            workers.append(p)
            conns.append(rx)
        try:
            barrier.wait(timeout=120 + 30 * procs)
        except threading.BrokenBarrierError:
            ready = mp_connection.wait(conns, timeout=5)
            why = ready[0].recv()[2] if ready else "a worker did not reach the start barrier"
            raise RuntimeError(f"{contender.name} worker failed: {why}") from None
        got = {}
        deadline = time.monotonic() + duration + 60
        while len(got) < procs:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{contender.name}: workers did not report within {duration + 60:.0f} s")
            for rx in mp_connection.wait([c for c in conns if c not in got], timeout=left):
                try:
                    got[rx] = rx.recv()
                except EOFError:
                    got[rx] = (0, 0.0, "worker exited without a result", 0.0)
        errors = [g[2] for g in got.values() if g[2]]
        if errors:
            raise RuntimeError(f"{contender.name} worker failed: {errors[0]}")
    finally:
        for p in workers:
            p.join(timeout=10)
            _kill(p)
        for c in conns:
            c.close()
        contender.after_fork_parent()
    per = [got[c][0] / got[c][1] for c in conns]
    # CPU seconds each worker got per wall second: well under 1 means the
    # machine (other load) or blocking (locks, sockets) kept it off a core.
    cpu = [got[c][3] / got[c][1] for c in conns]
    return dict(ops_per_s=sum(per), per_worker=per, cpu_share=cpu)


def _kill(p) -> None:
    if p.is_alive():
        p.kill()
        p.join(timeout=5)


def summarize(values: list[float]) -> dict:
    m = statistics.median(values)
    return dict(median=m, spread_pct=100.0 * (max(values) - min(values)) / m if m else 0.0,
                repeats=list(values))


def geomean(xs) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")
