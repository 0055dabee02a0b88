"""One adapter per store, so every contender is driven by the same loops.

A contender creates a fresh, empty store (``open``), hands out the operations
of this process (``ops(kind)``) or of a forked worker (``child_ops(kind)``),
bulk-loads (``populate``), reports shared bytes per entry (``memory``) and
destroys the store (``close``). Each adapter uses the library the way its
documentation says a user would, in the configuration a user would pick for a
host-local cache; the choices are commented where they matter for speed:

* values: bytes go in as bytes. The "obj" value (a small dict) is passed as
  the object to stores that serialize themselves (shmcache, diskcache, the
  Manager dict, UltraDict, dict) and ``pickle.dumps``/``loads`` (highest
  protocol) by the adapter for bytes-only stores (lmdb, Redis, memcached):
  either way the cost a user pays is in the number.
* keys: ``str`` everywhere except lmdb, which takes bytes only (encoded once,
  as a user would keep them).
* writes wait for the store's answer: pymemcache is built with
  ``default_noreply=False`` (its default sends and forgets), Redis always answers.
* incr is atomic across processes in every contender: native where the store
  has it (shmcache, Redis, memcached, diskcache), one write transaction in
  lmdb, get+set under a lock shared by forked workers otherwise.

Names of everything created start with ``bench-``; every creation is
registered with :mod:`benchmarks.cleanup` before anything else can fail.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import multiprocessing as mp
import os
import pickle
import shutil
import tempfile
import tracemalloc
import uuid
from types import SimpleNamespace

from . import cleanup
from .servers import Memcached, Redis, ServerUnavailable

SHM_DIR = "/dev/shm"
_dumps = pickle.dumps
_loads = pickle.loads
_P = pickle.HIGHEST_PROTOCOL


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _tmpdir(prefix: str) -> str:
    d = tempfile.mkdtemp(prefix=prefix, dir=SHM_DIR if os.path.isdir(SHM_DIR) else None)
    cleanup.track_shm(os.path.basename(d))
    cleanup.register(f"remove {d}", lambda: shutil.rmtree(d, ignore_errors=True))
    return d


def _dir_bytes(d: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(d):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def _pickling(get, set_):
    """Wrap a bytes-only store's get/set so they take and return objects."""

    def oget(k):
        b = get(k)
        return None if b is None else _loads(b)

    def oset(k, v):
        return set_(k, _dumps(v, _P))

    return oget, oset


class Servers:
    """redis-server and memcached, started on first use, stopped at cleanup."""

    def __init__(self):
        self._running = {}

    def get(self, cls):
        s = self._running.get(cls.name)
        if s is None:
            s = cls().start()
            self._running[cls.name] = s
        return s

    def versions(self) -> dict:
        return {c.name: c().version() for c in (Redis, Memcached)}

    def stop_all(self) -> None:
        for s in self._running.values():
            s.stop()
        self._running.clear()


class Contender:
    """Base: subclasses fill in the store-specific parts."""

    name = ""  # id used by --only
    label = ""  # shown in tables and plots
    modules: tuple[str, ...] = ()  # imports needed; missing -> skipped
    dists: tuple[str, ...] = ()  # distributions whose versions are reported
    shared = True  # False: each process has its own copy (the dict reference)
    key_bytes = False  # keys are bytes rather than str
    memory_method = ""

    def __init__(self, servers: Servers):
        self.servers = servers

    # -- availability ------------------------------------------------------
    def unavailable(self) -> str | None:
        """Why this contender cannot run here, or None."""
        for m in self.modules:
            try:
                importlib.import_module(m)
            except ImportError as e:
                return f"python package missing ({e.name or m}); pip install -e '.[bench]'"
        return None

    def versions(self) -> dict:
        return {d: _version(d) for d in self.dists}

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def ops(self, kind: str = "bytes") -> SimpleNamespace:
        """get(k), set(k, v), delete(k), incr(k) for this process.
        ``kind="obj"``: get/set take and return Python objects."""
        raise NotImplementedError

    def before_fork(self) -> None:
        """Called in the parent before forking workers."""

    def after_fork_parent(self) -> None:
        """Called in the parent after the workers are gone."""

    def child_ops(self, kind: str = "bytes") -> SimpleNamespace:
        """Operations for a freshly forked worker (default: the inherited ones)."""
        return self.ops(kind)

    def child_close(self) -> None:
        """Release what ``child_ops`` opened, in the worker."""

    def populate(self, items: dict) -> None:
        s = self.ops().set
        for k, v in items.items():
            s(k, v)

    def incr_init(self, keys) -> None:
        """Make ``keys`` hold the integer 0 (memcached cannot incr a missing key)."""

    def memory(self, items: dict) -> dict:
        """Populate a fresh store with ``items`` and return shared bytes/entry."""
        raise NotImplementedError

    def key(self, s: str):
        return s.encode() if self.key_bytes else s


# ---------------------------------------------------------------- shmcache
class ShmcacheContender(Contender):
    name = "shmcache"
    label = "shmcache"
    modules = ("shmcache",)
    dists = ("shmcache", "posix_ipc", "xxhash", "numpy")
    memory_method = (
        "arena bytes of live entries (stats()['bytes_used']) / items + the index share "
        "(slot + access bit, INDEX_BYTES_PER_SLOT 17 B / MAX_LOAD 0.75 = 22.7 B; layout 1: 32 B / 0.75)"
    )
    size = "256MiB"

    def open(self) -> None:
        from shmcache import Cache

        self.cache_name = f"bench-{uuid.uuid4().hex[:12]}"
        cleanup.track_shm(f"shmcache.{self.cache_name}", f"sem.shmcache.{self.cache_name}.")
        cleanup.register(f"unlink cache {self.cache_name}", lambda n=self.cache_name: Cache.unlink(n))
        self.cache = Cache(self.cache_name, size=self.size)
        cleanup.register(f"close cache {self.cache_name}", self.cache.close)

    def close(self) -> None:
        from shmcache import Cache

        self.cache.close()
        Cache.unlink(self.cache_name)

    def ops(self, kind="bytes"):
        c = self.cache
        return SimpleNamespace(get=c.get, set=c.set, delete=c.delete, incr=c.incr)

    def child_close(self) -> None:
        self.cache.close()  # gives this worker's client slot back

    def populate(self, items):
        self.cache.set_many(items)

    def memory(self, items):
        from shmcache import layout as L

        self.cache.set_many(items)
        st = self.cache.stats()
        slot = getattr(L, "INDEX_BYTES_PER_SLOT", getattr(L, "SLOT_SIZE", 32)) / getattr(L, "MAX_LOAD", 0.75)
        per = st["bytes_used"] / st["items"] + slot
        return dict(bytes_per_entry=per, items=st["items"], arena_bytes_used=st["bytes_used"],
                    index_bytes_per_entry=slot)


# ---------------------------------------------------------------- dict
class DictContender(Contender):
    name = "dict"
    label = "dict (in-process)"
    shared = False
    memory_method = "tracemalloc delta while filling (private memory of one process; nothing is shared)"

    def open(self) -> None:
        self.d = {}

    def close(self) -> None:
        self.d = None

    def ops(self, kind="bytes"):
        d = self.d

        def incr(k):
            d[k] = d.get(k, 0) + 1

        return SimpleNamespace(get=d.get, set=d.__setitem__, delete=lambda k: d.pop(k, None), incr=incr)

    def populate(self, items):
        self.d.update(items)

    def memory(self, items):
        # Fresh copies of keys and values, so the figure counts the objects the
        # dict holds (as after reading them from anywhere else), not just its table.
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for k, v in items.items():
                self.d[k.encode().decode()] = bytes(bytearray(v))
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        return dict(bytes_per_entry=(after - before) / len(items), items=len(self.d), shared=False)


# ---------------------------------------------------------------- lmdb
class LmdbContender(Contender):
    name = "lmdb"
    label = "lmdb"
    modules = ("lmdb",)
    dists = ("lmdb",)
    key_bytes = True
    memory_method = "B-tree pages (env.stat(): branch + leaf + overflow pages) x page size / entries"
    # On tmpfs durability is moot, so no fsyncs (sync/metasync off) and
    # writemap (writes go straight to the map): lmdb's fastest safe-enough setup.
    options = dict(map_size=4 << 30, subdir=True, sync=False, metasync=False, writemap=True,
                   readahead=False, max_readers=256, lock=True)

    def open(self) -> None:
        self.dir = _tmpdir("bench-lmdb-")
        self._open_env()

    def _open_env(self):
        import lmdb

        self.env = lmdb.open(self.dir, **self.options)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def versions(self) -> dict:
        import lmdb

        v = super().versions()
        v["liblmdb"] = ".".join(map(str, lmdb.version()))
        return v

    def ops(self, kind="bytes"):
        begin = self.env.begin

        def get(k):
            with begin() as txn:
                return txn.get(k)

        def set_(k, v):
            with begin(write=True) as txn:
                txn.put(k, v)

        def delete(k):
            with begin(write=True) as txn:
                txn.delete(k)

        def incr(k):
            with begin(write=True) as txn:
                n = int(txn.get(k) or 0) + 1
                txn.put(k, b"%d" % n)
                return n

        if kind == "obj":
            get, set_ = _pickling(get, set_)
        return SimpleNamespace(get=get, set=set_, delete=delete, incr=incr)

    # An lmdb environment must not be used across fork(): the parent closes it,
    # each worker opens the same directory itself, the parent reopens after.
    def before_fork(self):
        self.env.close()
        self.env = None

    def child_ops(self, kind="bytes"):
        self._open_env()
        return self.ops(kind)

    def child_close(self):
        self.env.close()

    def after_fork_parent(self):
        self._open_env()

    def populate(self, items):
        with self.env.begin(write=True) as txn:
            txn.cursor().putmulti(items.items())

    def memory(self, items):
        s = self.ops().set
        for k, v in items.items():  # one txn per put, as the cache workload writes
            s(k, v)
        st = self.env.stat()
        pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        info = self.env.info()
        out = dict(bytes_per_entry=pages * st["psize"] / st["entries"], items=st["entries"],
                   page_size=st["psize"], tree_pages=pages,
                   file_pages_per_entry=(info["last_pgno"] + 1) * st["psize"] / st["entries"])
        # For reference: the same entries inserted in sorted key order, which
        # lmdb packs into full pages (the best case, not what a cache sees).
        import lmdb

        d = _tmpdir("bench-lmdb-sorted-")
        try:
            env = lmdb.open(d, **self.options)
            with env.begin(write=True) as txn:
                for k in sorted(items):
                    txn.put(k, items[k])
            st = env.stat()
            env.close()
            pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            out["sorted_insert_bytes_per_entry"] = pages * st["psize"] / st["entries"]
        finally:
            shutil.rmtree(d, ignore_errors=True)
        return out


# ---------------------------------------------------------------- diskcache
class DiskcacheContender(Contender):
    name = "diskcache"
    label = "diskcache"
    modules = ("diskcache",)
    dists = ("diskcache",)
    memory_method = "file sizes in its directory (sqlite db + WAL), allocated blocks, delta / entries"

    def open(self) -> None:
        import diskcache

        self.dir = _tmpdir("bench-diskcache-")
        self.c = diskcache.Cache(self.dir)
        cleanup.register(f"close diskcache {self.dir}", self.c.close)

    def close(self) -> None:
        self.c.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def ops(self, kind="bytes"):
        c = self.c
        return SimpleNamespace(get=c.get, set=c.set, delete=c.delete, incr=c.incr)

    # sqlite connections must not cross fork(): each worker opens its own.
    def before_fork(self):
        self.c.close()

    def child_ops(self, kind="bytes"):
        import diskcache

        self.c = diskcache.Cache(self.dir)
        return self.ops(kind)

    def child_close(self):
        self.c.close()

    def populate(self, items):
        with self.c.transact():
            for k, v in items.items():
                self.c.set(k, v)

    def memory(self, items):
        before = _dir_bytes(self.dir)
        s = self.c.set
        for k, v in items.items():
            s(k, v)
        return dict(bytes_per_entry=(_dir_bytes(self.dir) - before) / len(items), items=len(self.c))


# ---------------------------------------------------------------- redis
class RedisContender(Contender):
    name = "redis"
    label = "Redis (unix socket)"
    modules = ("redis", "hiredis")
    dists = ("redis", "hiredis")
    memory_method = "INFO memory used_memory delta / entries"

    def unavailable(self):
        why = super().unavailable()
        if why:
            return why
        try:
            self.servers.get(Redis)
        except ServerUnavailable as e:
            return str(e)
        return None

    def _client(self):
        import redis

        return redis.Redis(unix_socket_path=self.servers.get(Redis).socket)

    def open(self) -> None:
        self.r = self._client()
        self.r.flushall()

    def close(self) -> None:
        self.r.flushall()
        self.r.close()

    def ops(self, kind="bytes", r=None):
        r = r or self.r
        get, set_ = r.get, r.set
        if kind == "obj":
            get, set_ = _pickling(get, set_)
        return SimpleNamespace(get=get, set=set_, delete=r.delete, incr=r.incr)

    def child_ops(self, kind="bytes"):
        self.r = self._client()
        return self.ops(kind)

    def child_close(self):
        self.r.close()

    def populate(self, items):
        it = list(items.items())
        for i in range(0, len(it), 1000):
            self.r.mset(dict(it[i : i + 1000]))

    def memory(self, items):
        before = self.r.info("memory")["used_memory"]
        self.populate(items)
        after = self.r.info("memory")["used_memory"]
        return dict(bytes_per_entry=(after - before) / len(items), items=self.r.dbsize())


# ---------------------------------------------------------------- memcached
class MemcachedContender(Contender):
    name = "memcached"
    label = "memcached (unix socket)"
    modules = ("pymemcache",)
    dists = ("pymemcache",)
    memory_method = "stats 'bytes' (item bytes incl. item headers) / curr_items; slab overhead not counted"

    def unavailable(self):
        why = super().unavailable()
        if why:
            return why
        try:
            self.servers.get(Memcached)
        except ServerUnavailable as e:
            return str(e)
        return None

    def _client(self):
        from pymemcache.client.base import Client

        # default_noreply=False: set/delete wait for the server's answer.
        return Client(self.servers.get(Memcached).socket, default_noreply=False, timeout=10)

    def open(self) -> None:
        self.c = self._client()
        self.c.flush_all()

    def close(self) -> None:
        self.c.flush_all()
        self.c.close()

    def ops(self, kind="bytes"):
        c = self.c
        get, set_ = c.get, c.set
        if kind == "obj":
            get, set_ = _pickling(get, set_)
        return SimpleNamespace(get=get, set=set_, delete=c.delete, incr=lambda k: c.incr(k, 1))

    def child_ops(self, kind="bytes"):
        self.c = self._client()
        return self.ops(kind)

    def child_close(self):
        self.c.close()

    def incr_init(self, keys):
        for k in keys:
            self.c.set(k, b"0")

    def populate(self, items):
        it = list(items.items())
        for i in range(0, len(it), 1000):
            self.c.set_many(dict(it[i : i + 1000]))

    def memory(self, items):
        self.populate(items)
        st = self.c.stats()
        n = st[b"curr_items"]
        return dict(bytes_per_entry=st[b"bytes"] / n, items=n)


# ---------------------------------------------------------------- Manager().dict()
class ManagerContender(Contender):
    name = "manager"
    label = "multiprocessing.Manager().dict()"
    memory_method = "USS delta of the manager's server process / entries (psutil)"

    def open(self) -> None:
        ctx = mp.get_context("fork")
        self.mgr = ctx.Manager()
        cleanup.register("shut down Manager", self.mgr.shutdown)
        self.d = self.mgr.dict()
        self.lock = ctx.Lock()  # makes incr atomic across forked workers

    def close(self) -> None:
        self.d = None
        self.mgr.shutdown()

    def versions(self):
        return {"multiprocessing": "stdlib"}

    def ops(self, kind="bytes"):
        d = self.d
        lock = self.lock

        def incr(k):
            with lock:
                n = d.get(k, 0) + 1
                d[k] = n
                return n

        return SimpleNamespace(get=d.get, set=d.__setitem__, delete=lambda k: d.pop(k, None), incr=incr)

    def populate(self, items):
        it = list(items.items())
        for i in range(0, len(it), 10000):
            self.d.update(dict(it[i : i + 10000]))

    def memory(self, items):
        import gc

        import psutil

        p = psutil.Process(self.mgr._process.pid)
        gc.collect()
        before = p.memory_full_info().uss
        self.populate(items)
        after = p.memory_full_info().uss
        return dict(bytes_per_entry=(after - before) / len(items), items=len(self.d))


# ---------------------------------------------------------------- UltraDict
class UltraDictContender(Contender):
    name = "ultradict"
    label = "UltraDict"
    modules = ("UltraDict",)
    dists = ("UltraDict",)
    memory_method = (
        "shared bytes of one full dump (pickled dict, what UltraDict keeps in shared memory) / entries; "
        "every attached process also holds a full private dict copy, not counted"
    )
    # UltraDict appends every write to a stream buffer and, when the buffer is
    # full, pickles the whole dict into a new segment that every reader then
    # unpickles. The default 10 kB buffer makes that happen every ~70 writes;
    # 64 MiB is the generous setting a user would pick for 100k keys.
    buffer_size = 64 << 20

    def open(self) -> None:
        from UltraDict import UltraDict

        self.ud_name = f"bench-ud-{uuid.uuid4().hex[:10]}"
        cleanup.track_shm(self.ud_name)
        self.ud = UltraDict(name=self.ud_name, create=True, buffer_size=self.buffer_size,
                            shared_lock=False, auto_unlink=False)
        cleanup.register(f"unlink UltraDict {self.ud_name}", self._unlink)

    def _unlink(self):
        ud, self.ud = getattr(self, "ud", None), None
        if ud is not None:
            try:
                ud.unlink()
            except Exception:
                pass
        from UltraDict import UltraDict

        for suffix in ("", "_memory", "_full"):
            try:
                UltraDict.unlink_by_name(self.ud_name + suffix, ignore_errors=True)
            except Exception:
                pass

    def close(self) -> None:
        self._unlink()

    def ops(self, kind="bytes"):
        ud = self.ud
        lock = ud.lock  # a multiprocessing RLock: shared by forked workers

        def delete(k):
            try:
                del ud[k]
            except KeyError:
                pass

        def incr(k):
            with lock:
                n = ud.get(k, 0) + 1
                ud[k] = n
                return n

        return SimpleNamespace(get=ud.get, set=ud.__setitem__, delete=delete, incr=incr)

    def populate(self, items):
        self.ud.update(items)

    def memory(self, items):
        self.ud.update(items)
        mem = self.ud.dump()  # what the stream does once it is full
        return dict(bytes_per_entry=mem.size / len(items), items=len(self.ud))


ALL = (
    ShmcacheContender,
    DictContender,
    LmdbContender,
    DiskcacheContender,
    RedisContender,
    MemcachedContender,
    ManagerContender,
    UltraDictContender,
)
NAMES = tuple(c.name for c in ALL)
