"""The public maintenance API (shmcache.admin): what the daemon, snapshots, the
CLI and the adapters use instead of a Cache's private attributes."""

import ast
import multiprocessing as mp
import os
import pickle
import signal
import pydoc
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import shmcache
from shmcache import layout as L
from shmcache import Cache, admin
from shmcache._sentinels import DEFAULT_TTL, MISSING
from test_daemon import _snapshot_now, _wait, daemon  # noqa: F401 - the daemon fixture

CTX = mp.get_context("fork")


def _worker(name, wid, n):
    c = Cache(name, create=False)
    for i in range(n):
        c.set(f"w{wid}:{i}", i)
        c.get(f"w{wid}:{i}")
        c.get(f"absent:{wid}:{i}")
    c.delete(f"w{wid}:0")
    c.close()


def test_counters_are_the_sum_of_every_process(make_cache):
    c = make_cache()
    procs = [CTX.Process(target=_worker, args=(c.name, w, 50 + w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    n = sum(50 + w for w in range(3))
    got = admin.counters(c)
    assert (got["sets"], got["hits"], got["misses"], got["deletes"]) == (n, n, n, 3)
    assert admin.stored_items(c) == n - 3 == len(c)


def test_geometry_stripes_and_clients(make_cache):
    c = make_cache(size="4MiB", stripes=4)
    g = admin.geometry(c)
    assert g.n_stripes == 4 and g.total_size <= 4 * 2**20
    c.set_many({f"k{i}": b"x" * 100 for i in range(200)})
    st = admin.stripes(c)
    assert [s.index for s in st] == [0, 1, 2, 3]
    assert sum(s.items for s in st) == 200
    assert all(0 < s.fill < 1 and s.locked_by is None for s in st)
    assert sum(s.bytes_used for s in st) == c.stats()["bytes_used"]
    other = Cache(c.name, create=False)
    try:
        me = [x for x in admin.clients(c) if x.alive]
        assert len(me) == 2 and me[0].pid == me[1].pid
        assert sum(x.counters["sets"] for x in me) == 200
    finally:
        other.close()


def _report_client(name, q):
    c = Cache(name, create=False)
    q.put(admin.current_client(c))
    q.get(timeout=30)  # stay attached until the parent has looked
    c.close()


def test_current_client_is_checked_by_the_kernel_across_processes(make_cache):
    c = make_cache()
    me = admin.current_client(c)
    assert admin.client_attached(c, *me)
    assert not admin.client_attached(c, me[0], me[1] + 1)  # another generation of the slot
    assert not admin.client_attached(c, -1, 1) and not admin.client_attached(c, 10**6, 1)
    other = Cache(c.name, create=False)  # a second handle: a slot of its own, seen alive from the first
    theirs = admin.current_client(other)
    assert theirs != me and admin.client_attached(c, *theirs)
    other.close()
    assert not admin.client_attached(c, *theirs)
    q = CTX.Queue()
    p = CTX.Process(target=_report_client, args=(c.name, q))
    p.start()
    try:
        child = q.get(timeout=30)
        assert child != me and admin.client_attached(c, *child)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert not admin.client_attached(c, *child)  # at once: the kernel dropped its lock
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
    c.close()
    with pytest.raises(ValueError, match="closed"):
        admin.current_client(c)


def test_summarize_reads_a_cache_by_name_without_attaching(make_cache, cache_name):
    c = make_cache(size="2MiB", stripes=4)
    c.set_many({f"k{i}": i for i in range(25)})
    before = admin.counters(c)
    s = admin.summarize(cache_name)
    assert (s.name, s.items, s.clients, s.daemon_pid) == (cache_name, 25, 1, None)  # it is not a client
    assert s.size == admin.geometry(c).total_size
    assert admin.counters(c) == before
    assert admin.created(c) is True
    with Cache(cache_name, create=False) as d:
        assert admin.created(d) is False and admin.summarize(cache_name).clients == 2
    with pytest.raises(shmcache.CacheNotFound):
        admin.summarize(cache_name + "-absent")


def test_daemon_lock_is_one_per_cache(make_cache, cache_name):
    c = make_cache()
    assert admin.daemon_lock_holder(c) is None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: take the lock, say so, wait to be killed
        code = 1
        try:
            d = Cache(cache_name, create=False)
            os.write(w, b"1" if admin.claim_daemon_lock(d) else b"0")
            time.sleep(60)
        finally:
            os._exit(code)
    try:
        assert os.read(r, 1) == b"1"
        assert admin.daemon_lock_holder(c) == pid
        assert admin.claim_daemon_lock(c) is False
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    assert admin.daemon_lock_holder(c) is None  # the kernel dropped it with the process
    assert admin.claim_daemon_lock(c) is True


def test_inspect_and_entries_report_type_size_ttl_without_counting(make_cache, fake_clock):
    c = make_cache(clock=fake_clock)
    c.set("n", 5)
    c.set("s", "héllo", ttl=30)
    c.set("b", b"\0" * 1000)
    c.set("d", {"a": 1})
    c.set(b"raw", np.arange(4))
    c.set("gone", 1, ttl=1)
    fake_clock.advance(10)
    before = admin.counters(c)
    e = admin.inspect(c, "s")
    assert (e.key, e.type, e.size, e.ttl, e.expires_at) == ("s", "str", 6, 20.0, fake_clock.now + 20)
    assert admin.inspect(c, "n").type == "int" and admin.inspect(c, "n").ttl is None
    assert admin.inspect(c, "d").type == "pickle"
    assert admin.inspect(c, b"raw").type == "ndarray"
    assert admin.inspect(c, "b").size == 1000
    assert admin.inspect(c, "gone") is None and admin.inspect(c, "absent") is None
    keys = {x.key for x in admin.entries(c)}
    assert keys == {"n", "s", "b", "d", b"raw"}
    assert "gone" in {x.key for x in admin.entries(c, include_expired=True)}
    raw = {x.key: x.raw_value for x in admin.entries(c, raw=True)}
    assert raw["b"] == b"\0" * 1000
    assert admin.counters(c) == before  # inspection is not traffic
    with pytest.raises(ValueError, match="stripe must be in"):
        list(admin.entries(c, stripe=10_000))


def test_expire_reclaims_and_counts(make_cache, fake_clock):
    c = make_cache(clock=fake_clock)
    c.set_many({f"k{i}": i for i in range(300)}, ttl=5)
    c.set("keep", 1)
    fake_clock.advance(6)
    assert admin.stored_items(c) == 301
    assert admin.expire(c, limit=10) <= 10 * admin.geometry(c).n_stripes
    admin.expire(c)
    assert admin.stored_items(c) == 1 and c["keep"] == 1
    assert admin.counters(c)["expirations"] == 300
    assert admin.check(c) == []


def test_check_fix_repairs_a_damaged_entry(make_cache):
    c = make_cache()
    c.set("victim", b"v" * 64)
    c.set("other", b"o")
    st = admin.storage(c)
    s = admin.inspect(c, "victim").stripe
    sl = st.table.slots[s]
    i = next(int(i) for i in np.nonzero(sl["tag"])[0] if st.table._entry(s, int(sl["loc"][i]))[1] == 64)
    a = st.geometry.arena_off + s * st.geometry.stripe_arena + int(sl["loc"][i]) * L.ALIGN + L.ENTRY_HEADER + 20
    st.segment.mm[a] ^= 0xFF  # flip a byte of the stored value: checksum fails
    problems = admin.check(c, fix=True)
    assert problems and "stripe" in problems[0]
    assert admin.check(c) == []
    assert "victim" not in c and c["other"] == b"o"


def test_raw_writer_keeps_deadline_and_access_bit(make_cache, fake_clock):
    c = make_cache(clock=fake_clock)
    with admin.RawWriter(c) as w:
        assert w.write(b"k", 0, b"val", fake_clock.now + 50, 123.0)
        assert not w.write(b"k", 0, b"other", 0.0, 124.0, only_if_absent=True)
    e = admin.inspect(c, "k")
    assert (e.accessed, e.ttl, c["k"]) == (False, 50.0, b"val")  # written, not yet read
    assert admin.inspect(c, "k").accessed  # the read above set its access bit


def test_daemon_records_its_snapshot_path_and_outcome(daemon, cache_name, tmp_path):
    path = tmp_path / "snap" / "c.snap"
    d = daemon("--snapshot", str(path), "--snapshot-every", "0", "--size", "4MiB")
    with Cache(cache_name, create=False) as c:
        c.set("a", 1)
        info = admin.daemon_info(c)
        assert (info.pid, info.alive, info.snapshot_path, info.last_snapshot) == (d.pid, True, str(path), None)
        assert info.heartbeat_age is not None and info.heartbeat_age < 30
        _snapshot_now(d, path)
        _wait(lambda: admin.daemon_info(c).last_snapshot is not None, what="snapshot status")
        last = admin.daemon_info(c).last_snapshot
        assert last.ok and last.entries == 1 and last.error is None
        st = c.stats()
        assert st["daemon_snapshot_path"] == str(path) and st["last_snapshot_ok"] is True
        # `shmcache snapshot` finds the path in the header (no argv parsing)
        out = subprocess.run([sys.executable, "-m", "shmcache", "snapshot", "-n", cache_name],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and str(path) in out.stdout
        path.unlink()
        path.mkdir()  # the next attempt fails: the header says so
        t = last.time
        os.kill(d.pid, signal.SIGUSR1)
        _wait(lambda: (x := admin.daemon_info(c).last_snapshot) and x.time > t and not x.ok,
              what="failed snapshot status")
        assert "is a directory" in admin.daemon_info(c).last_snapshot.error
        assert c.stats()["last_snapshot_ok"] is False
        path.rmdir()
        assert d.stop() == 0
        assert admin.daemon_info(c).pid is None


def test_snapshot_path_too_long_is_refused(cache_name, tmp_path):
    from shmcache.daemon import Daemon
    from shmcache.errors import DaemonError

    with pytest.raises(DaemonError, match="longer than 1023 bytes"):
        Daemon(cache_name, size="1MiB", snapshot=str(tmp_path / ("x" * 200) / ("y" * 200) / ("z" * 700)))


def test_readable_sentinels():
    assert re.search(r"ttl(: \S+)? ?= ?DEFAULT_TTL\)", pydoc.render_doc(Cache.set))
    assert re.search(r"default(: \S+)? ?= ?MISSING\)", pydoc.render_doc(Cache.pop))
    assert "object at 0x" not in pydoc.render_doc(Cache)
    assert pickle.loads(pickle.dumps(DEFAULT_TTL)) is DEFAULT_TTL and repr(MISSING) == "MISSING"


def test_cache_and_stampede_import_in_either_order():
    for first in ("shmcache.stampede", "shmcache.cache", "shmcache.admin"):
        r = subprocess.run([sys.executable, "-c", f"import {first}; import shmcache; print('ok')"],
                           capture_output=True, text=True, timeout=60)
        assert r.stdout.strip() == "ok", r.stderr


def _module_imports(path, name: str, known: set) -> set:
    """The shmcache modules ``path`` imports when it is first imported: its
    top-level imports (inside if/try too), not those under ``if TYPE_CHECKING``
    nor those inside functions (run later, once every module is loaded)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()

    def walk(body):
        for n in body:
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
                walk(n.orelse)
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - n.level + 1] + ([n.module] if n.module else []))
                out.update(f"{base}.{a.name}" for a in n.names if f"{base}.{a.name}" in known)
                if base in known and not (name == base or name.startswith(base + ".")):
                    out.add(base)  # (a module's own packages are always loaded before it)
            elif isinstance(n, ast.Import):
                out.update(a.name for a in n.names if a.name in known)
            elif isinstance(n, (ast.If, ast.Try)):
                walk(n.body + n.orelse + [s for h in getattr(n, "handlers", []) for s in h.body]
                     + getattr(n, "finalbody", []))

    walk(ast.parse(path.read_text()).body)
    return out


def test_no_import_cycle_between_shmcache_modules():
    """cache.py and stampede.py used to import each other (for a private
    sentinel). No shmcache module may take part in an import cycle: the
    package's layers import in one direction (STYLE.md)."""
    root = Path(shmcache.__file__).resolve().parent
    files = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {m: _module_imports(f, m, set(files)) for m, f in files.items()}
    assert "shmcache.stampede" in graph["shmcache.cache"] and "shmcache.admin" in graph["shmcache.stampede"]

    def cycle_from(start):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for d in graph[node]:
                if d == start:
                    return path + [d]
                if d not in seen:
                    seen.add(d)
                    stack.append((d, path + [d]))
        return None

    cycles = [c for c in map(cycle_from, graph) if c]
    assert not cycles, f"import cycles: {cycles}"


def test_closed_cache_is_refused(make_cache):
    c = make_cache()
    c.close()
    for fn in (admin.geometry, admin.stripes, admin.counters, admin.clients, admin.daemon_info, admin.check):
        with pytest.raises(ValueError, match="closed"):
            fn(c)
