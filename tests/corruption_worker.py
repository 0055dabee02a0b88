"""Worker of tests/test_corruption_fuzz.py: exercises a (corrupted) cache on request.

Reads one line per trial on stdin (``<trial> <n_keys> <with_daemon> <churn>``), then
attaches to the cache named on the command line, runs ``check()`` (before
anything could repair the damage), if asked starts a daemon (one recovery
pass and one expiry sweep, before any writer rewrote a damaged record),
reads what an operator reads (stats, admin views, the status page,
Prometheus text), reads every key, writes (and ``churn`` new keys), reads back, scans
``items()``, deletes, runs ``check()`` (and, if asked, starts a daemon
again: a recovery pass, an expiry sweep and a snapshot), runs ``check()``
again, then
``check(fix=True)`` and a last ``check()``, and prints one JSON line with what
happened. A crash (SIGSEGV/SIGBUS) or a hang shows up in the parent as a dead
or silent worker.
"""

import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from values import bad_value, make_value  # noqa: E402

from shmcache import Cache, Error, admin  # noqa: E402
from shmcache import layout as L  # noqa: E402


def _recoveries(c: Cache) -> list[int]:
    """Each stripe's recoveries counter (bumped by every lock recovery's repair)."""
    return [int(x) for x in c._table.stripes[:, L.S_RECOVERIES // 8]]


def _inspect(c: Cache) -> None:
    """What an operator runs on a cache that misbehaves: stats, the admin
    views, ``shmcache ls``'s summary, the status page and Prometheus text."""
    from prometheus_client import CollectorRegistry, generate_latest

    from shmcache.contrib.prometheus import ShmcacheCollector
    from shmcache.contrib.status import render, status

    c.stats()
    admin.stripes(c)
    admin.clients(c)
    admin.counters(c)
    admin.daemon_info(c)
    admin.summarize(c.name)
    render(status(c))
    reg = CollectorRegistry()
    reg.register(ShmcacheCollector(c))
    generate_latest(reg)


def _run_daemon(name: str, snapshot: bool) -> str:
    """A daemon's start on this cache (attach, lock, a recovery pass, an
    expiry sweep) and, with ``snapshot``, a snapshot: "ok" or the shmcache
    error it refused with."""
    from shmcache.daemon import Daemon

    try:
        with tempfile.TemporaryDirectory() as d:
            dm = Daemon(name, snapshot=os.path.join(d, "s.snap"), restore=False)
            try:
                dm.recover_once()
                dm.expiry.sweep_all()
                if snapshot:
                    dm.take_snapshot()
            finally:
                dm.close()
        return "ok"
    except Error as e:
        return f"{type(e).__name__}: {e}"


def trial(name: str, n_keys: int, with_daemon: bool, churn: int = 0) -> dict:
    out = {"attach": "ok", "torn": [], "errors": [], "check_before": None, "check": None, "daemon": None,
           "daemon_first": None}
    try:
        c = Cache(name, create=False, lock_timeout=0.2, init_timeout=1.0)
    except Error as e:
        out["attach"] = f"{type(e).__name__}: {e}"
        return out
    try:
        try:  # what check finds before anything touched the damage (nothing repaired yet)
            out["check_before"] = c.check()
        except Error as e:
            out["check_before"] = [f"{type(e).__name__}: {e}"]
        recoveries = _recoveries(c)
        if with_daemon:  # a daemon starting on the damaged cache, before any writer rewrote a record
            out["daemon_first"] = _run_daemon(name, snapshot=False)
        for step in ("inspect", "read", "write", "churn", "read-back", "items", "delete", "check"):
            try:
                if step == "inspect":
                    _inspect(c)
                elif step in ("read", "read-back"):
                    for i in range(n_keys):
                        k = f"k{i}"
                        v = c.get(k)
                        if v is not None and bad_value(k, v):
                            out["torn"].append(f"{step} {k}: {bad_value(k, v)}")
                elif step == "write":
                    for i in range(0, n_keys, 7):
                        c.set(f"k{i}", make_value(f"k{i}", 1, i, 40 + i % 200))
                        c.set(f"n{i}", make_value(f"n{i}", 1, i, 60))
                    for i in range(0, n_keys, 7):
                        v = c.get(f"n{i}")
                        if v is not None and bad_value(f"n{i}", v):
                            out["torn"].append(f"new n{i}: {bad_value(f'n{i}', v)}")
                elif step == "items":  # the scan path (items, entries, snapshots)
                    for k, v in c.items():
                        if bad_value(k, v):
                            out["torn"].append(f"items {k}: {bad_value(k, v)}")
                elif step == "churn":  # new keys enough to reclaim every segment: walks the damaged ones
                    for i in range(churn):
                        c.set(f"c{i}", make_value(f"c{i}", 2, i, 200 + i % 64))
                    for i in range(0, churn, 13):
                        v = c.get(f"c{i}")
                        if v is not None and bad_value(f"c{i}", v):
                            out["torn"].append(f"churn c{i}: {bad_value(f'c{i}', v)}")
                elif step == "delete":
                    for i in range(3, n_keys, 11):
                        c.delete(f"k{i}")
                        c.pop(f"n{i}", None)
                else:
                    out["check"] = c.check()
            except Error as e:  # refused cleanly (LockTimeout, LayoutMismatch...): allowed
                out["errors"].append(f"{step}: {type(e).__name__}: {e}")
        if with_daemon:
            out["daemon"] = _run_daemon(name, snapshot=True)
        # stripes the operations repaired: a lock recovery, or a write that
        # met damage ("... was repaired ...: retry the write")
        out["repaired"] = sorted(
            {s for s, (a, b) in enumerate(zip(recoveries, _recoveries(c))) if a != b}
            | {int(m) for e in out["errors"] if "repaired" in e for m in re.findall(r"stripe (\d+)", e)})
        out["check_after"] = c.check()
        out["fixed"] = admin.check(c, fix=True)
        out["check_final"] = c.check()  # what repair could not make sound
    finally:
        c.close()
    return out


def main() -> None:
    name = sys.argv[1]
    for line in sys.stdin:
        t, n_keys, with_daemon, churn = line.split()
        res = trial(name, int(n_keys), with_daemon == "1", int(churn))
        res["trial"] = int(t)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
