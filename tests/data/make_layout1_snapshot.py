"""Writes tests/data/snapshot_layout1.shmsnap: a snapshot made by layout 1.

Run once with the code of commit 1198359 (the last one with layout version 1,
the bump allocator): ``PYTHONPATH=<that checkout> python tests/data/make_layout1_snapshot.py``.
The file is committed; test_snapshot.py restores it into the current layout,
so a cache snapshotted before an upgrade comes back after it. Kept only so
the file's contents are documented by the code that made them.
"""

import os
import sys

from shmcache import Cache
from shmcache import layout as L
from shmcache.snapshot import write_snapshot

CLOCK = 1_000_000.0  # the fake clock both this script and the test use


def expected():
    """key -> (value, ttl) as stored; ttl None = never expires."""
    out = {}
    for i in range(300):
        out[f"s:{i:04d}"] = (f"value {i} " * (i % 7 + 1), None)
    for i in range(100):
        out[b"b:%d" % i] = (bytes(range(i % 256)) * 3, 3600.0)
    out["int"] = (-(2**40), None)
    out["float"] = (2.5, None)
    out["pickled"] = ({"a": [1, 2, 3], "b": ("x", None)}, 60.0)
    out["expired"] = ("gone by restore", 1.0)
    out["big"] = (b"x" * 20_000, None)
    return out


def main(path):
    assert L.LAYOUT_VERSION == 1, L.LAYOUT_VERSION
    t = [CLOCK]
    name = f"mklayout1-{os.getpid()}"
    c = Cache(name, size="1MiB", stripes=4, clock=lambda: t[0])
    try:
        for k, (v, ttl) in expected().items():
            c.set(k, v, ttl=ttl)
        t[0] = CLOCK + 10.0  # "expired" is past its deadline now
        write_snapshot(c, path, now=t[0])
    finally:
        c.close()
        Cache.unlink(name)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "snapshot_layout1.shmsnap"))
