"""What is measured: operations, values, key sets, mixes and sizes.

Latency, one process, for each value kind (100 B bytes, 4 KiB bytes, a small
dict that is pickled): get hit, set (overwrite of an existing key) and
delete+set (one op = both calls); plus get miss and incr (integer counters).
Keys are ``key:%08d`` (12 bytes), visited in a shuffled order.

Throughput: 100k keys of 100 B, Zipf(0.99) popularity (rank -> key through a
fixed random permutation), a 90% get / 10% set mix and a 50/50 mix, at each
process count, for ``duration`` wall seconds per point.

Memory: 100k entries of 100 B (distinct objects, shuffled key order) into a
fresh store; bytes per entry by each contender's own accounting (see
``Contender.memory_method``).

Every point is repeated ``repeats`` times (repeat loop outermost, so slow drift
of the machine's load spreads over all points rather than hitting one); the
report shows the median and the spread between repeats.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

import numpy as np

from . import measure

ZIPF_S = 0.99
MIXES = {"90/10": 0.10, "50/50": 0.50}
OBJ_VALUE = {"id": 123456, "name": "Ada Lovelace", "email": "ada@example.org", "tags": ["admin", "beta"],
             "score": 97.5, "active": True}


@dataclass
class Config:
    quick: bool = False
    repeats: int = 3
    duration: float = 1.5  # wall seconds per throughput point
    latency_budget: float = 0.2  # wall seconds of batches per latency point
    latency_keys: int = 10_000
    tp_keys: int = 100_000
    mem_entries: int = 100_000
    procs: list = field(default_factory=lambda: [1, 2, 4])
    mixes: list = field(default_factory=lambda: list(MIXES))
    workloads: list = field(default_factory=lambda: ["latency", "throughput", "memory"])
    seed: int = 20240601

    @classmethod
    def make(cls, quick: bool, **over) -> "Config":
        c = cls(quick=quick)
        if quick:
            c.repeats = 1
            c.duration = 0.3
            c.latency_budget = 0.03
            c.latency_keys = 1_000
            c.mem_entries = 20_000
        for k, v in over.items():
            if v is not None:
                setattr(c, k, v)
        return c

    def as_dict(self) -> dict:
        return asdict(self)


def values(seed: int) -> dict:
    rng = random.Random(seed)
    return {
        "100B": rng.randbytes(100),
        "4KiB": rng.randbytes(4096),
        "obj": OBJ_VALUE,
    }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


#: (op id, shape, which ops function(s)) per value kind
PER_VALUE_OPS = [("get_hit", "k", ("get",)), ("set", "kv", ("set",)), ("del_set", "del_set", ("delete", "set"))]
LATENCY_OPS = (
    ["get_hit_100B", "get_miss", "set_100B", "del_set_100B", "incr"]
    + [f"{o}_{v}" for v in ("4KiB", "obj") for o, _s, _f in PER_VALUE_OPS]
)
OP_LABELS = {
    "get_hit_100B": "get hit 100 B", "get_miss": "get miss", "set_100B": "set 100 B",
    "del_set_100B": "delete+set 100 B", "incr": "incr",
    "get_hit_4KiB": "get hit 4 KiB", "set_4KiB": "set 4 KiB", "del_set_4KiB": "delete+set 4 KiB",
    "get_hit_obj": "get hit dict", "set_obj": "set dict", "del_set_obj": "delete+set dict",
}


# ------------------------------------------------------------------ latency
def run_latency(c, cfg: Config) -> dict:
    vals = values(cfg.seed)
    n = cfg.latency_keys
    rng = random.Random(cfg.seed)
    order = list(range(n))
    rng.shuffle(order)
    keys = [c.key(f"key:{i:08d}") for i in order]
    miss = [c.key(f"miss:{i:07d}") for i in order]
    ctrs = [c.key(f"ctr:{i:08d}") for i in order]
    reps: dict[str, list] = {op: [] for op in LATENCY_OPS}
    c.open()
    try:
        for vname in ("100B", "4KiB", "obj"):
            kind = "obj" if vname == "obj" else "bytes"
            ops = c.ops(kind)
            v = vals[vname]
            for k in keys:
                ops.set(k, v)
            if vname == "100B":
                c.incr_init(ctrs)
            plan = [(f"{o}_{vname}", shape, tuple(getattr(ops, f) for f in fns), keys)
                    for o, shape, fns in PER_VALUE_OPS]
            if vname == "100B":
                plan.insert(1, ("get_miss", "k", (ops.get,), miss))
                plan.append(("incr", "k", (ops.incr,), ctrs))
            for _r in range(cfg.repeats):
                for op, shape, fns, ks in plan:
                    reps[op].append(measure.time_op(shape, fns, ks, v, cfg.latency_budget))
            # sanity: what we timed really was a hit / a miss
            if vname != "obj" and ops.get(keys[0]) != v:
                raise AssertionError(f"{c.name}: get after set returned {ops.get(keys[0])!r:.40}")
            if vname == "obj" and ops.get(keys[0]) != v:
                raise AssertionError(f"{c.name}: dict value did not round-trip")
            if ops.get(miss[0]) is not None:
                raise AssertionError(f"{c.name}: a missing key was found")
    finally:
        c.close()
    out = {op: measure.combine_repeats(r) for op, r in reps.items() if r}
    _log("  latency  " + "  ".join(f"{op}={out[op]['median']:.0f}ns" for op in
                                    ("get_hit_100B", "get_miss", "set_100B", "incr") if op in out))
    return out


# --------------------------------------------------------------- throughput
def run_throughput(c, cfg: Config) -> dict:
    vals = values(cfg.seed)
    n = cfg.tp_keys
    keys = [c.key(f"key:{i:08d}") for i in range(n)]
    cdf = measure.zipf_cdf(n, ZIPF_S)
    perm = np.random.default_rng(cfg.seed).permutation(n)
    res = {mix: {p: [] for p in cfg.procs} for mix in cfg.mixes}
    cpu = {mix: {p: [] for p in cfg.procs} for mix in cfg.mixes}
    c.open()
    try:
        t0 = time.perf_counter()
        c.populate({k: vals["100B"] for k in keys})
        _log(f"  populated {n} keys in {time.perf_counter() - t0:.1f} s")
        for r in range(cfg.repeats):
            for mix in cfg.mixes:
                for p in cfg.procs:
                    pt = measure.throughput_point(c, p, keys, cdf, perm, MIXES[mix], vals["100B"],
                                                  cfg.duration, seed=cfg.seed + 7919 * r + p)
                    res[mix][p].append(pt["ops_per_s"])
                    cpu[mix][p].append(sum(pt["cpu_share"]))
    finally:
        c.close()
    out = {mix: {str(p): dict(measure.summarize(v), cpu_cores=statistics.median(cpu[mix][p]))
                 for p, v in d.items()} for mix, d in res.items()}
    _log("  throughput " + "  ".join(f"{mix}@{p}={out[mix][str(p)]['median'] / 1e3:.0f}k/s"
                                    for mix in cfg.mixes for p in cfg.procs))
    return out


# ------------------------------------------------------------------ memory
def run_memory(c, cfg: Config) -> dict:
    v = values(cfg.seed)["100B"][:92]
    # A distinct value object per entry (the last 8 bytes are the index): with
    # one shared object, pickling stores (UltraDict, the Manager) would store
    # it once and report a few bytes per entry.
    # Inserted in a shuffled key order, as a cache sees them: B-trees (lmdb,
    # sqlite) fill their pages completely on sorted inserts and ~70% otherwise.
    order = list(range(cfg.mem_entries))
    random.Random(cfg.seed).shuffle(order)
    items = {c.key(f"key:{i:08d}"): v + i.to_bytes(8, "little") for i in order}
    c.open()
    try:
        out = c.memory(items)
    finally:
        c.close()
    out["method"] = c.memory_method
    out["entries"] = cfg.mem_entries
    _log(f"  memory   {out['bytes_per_entry']:.1f} B/entry")
    return out


RUNNERS = {"latency": run_latency, "throughput": run_throughput, "memory": run_memory}


def run_all(contenders: list, cfg: Config) -> dict:
    """Run every selected workload for every contender; a failing contender is
    recorded with its error and the run goes on."""
    results: dict = {w: {} for w in cfg.workloads}
    errors: dict = {}
    for c in contenders:
        _log(f"== {c.label}")
        for w in cfg.workloads:
            try:
                results[w][c.name] = RUNNERS[w](c, cfg)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                errors.setdefault(c.name, {})[w] = f"{type(e).__name__}: {e}"
                _log(f"  {w} FAILED: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stderr)
    results["errors"] = errors
    return results
