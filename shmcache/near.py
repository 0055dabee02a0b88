"""A near cache in front of Redis: one shared copy of the hot keys per host.

::

    from shmcache.near import NearCache
    near = NearCache("app", "redis://10.0.0.5:6379/0", prefixes=["app:"], max_ttl=60)
    near.get("app:user:42")          # shared memory, or Redis (GET+PTTL) and kept
    near.set("app:user:42", b"...")  # Redis, then the local copy is dropped

    # beside it, once per host (holds the one tracking connection):
    #   shmcache daemon --name app --upstream redis://10.0.0.5:6379/0 --track-prefix app:

Every worker on the host reads one copy of a key at memory speed; the
daemon's :class:`Tracker` (run in a child process, :class:`TrackerProcess`)
holds one RESP3 connection (one per master of a Redis Cluster) with
``CLIENT TRACKING ON BCAST PREFIX ...`` and drops each key Redis says changed. Redis stays the
source of truth: a miss, a bypassed read and every write go to it.

**The bound** ("coherent" precisely): with the tracker running, a read
started at time R never returns a value that Redis had already replaced
(or deleted, or let expire) before ``R - max_staleness``, where
``max_staleness = 2 * ping_interval`` (0.2 s by default). In the normal case
the copy is dropped within about a millisecond of the write's acknowledgement
(benchmarks/bench_near.py measures it); the bound is what holds when
anything fails. A process that writes through the near cache reads its own
write at once.

Why it holds, piece by piece:

* **Heartbeat.** The tracker PINGs Redis every ``ping_interval`` seconds on
  the tracking connection and, when the PONG comes back, publishes the time
  the PING was *sent* (``time.monotonic()``, one clock for every process of
  the host on Linux). Redis writes a BCAST invalidation to the tracking
  connection before it acknowledges the write to the writer, and replies in
  order, so once that PONG is handled every write acknowledged before the
  PING was sent has been applied here. Readers trust shared memory only while
  the published PING time is at most ``max_staleness`` old, otherwise they
  read Redis (*bypass*, fail closed): a SIGKILLed daemon, a stuck tracker
  thread, a silent network partition all end up there within the bound.
* **Epoch.** Every entry is stored with the epoch it was filled under; the
  tracker draws a new random 64-bit epoch each time tracking (re)starts (a
  new daemon, a reconnect after ``CLIENT KILL``, a Redis restart or a
  failover) and on a ``null`` invalidation (FLUSHALL/FLUSHDB), and publishes
  it together with the heartbeat. Everything filled before is then invalid at
  once, O(1), without a scan (the dead entries go by TTL or LRU). While the
  connection is down the tracker publishes "down" and readers bypass.
* **Fill sequence.** Before it sends GET, a worker reads the invalidation
  sequence of the key's sequence stripe (one of 1024, by crc32 of the key);
  the tracker bumps that sequence *before* it deletes the key. The entry is
  stored with the sequence it was filled under and only counts as a hit while
  the stripe's sequence is still that value. So an invalidation that
  overtakes a fill (the race the Redis docs warn about) leaves an entry that
  is never served, even if the filler is killed between its checks.
* **Held control word.** A process re-reads the epoch and heartbeat only
  when the heartbeat it holds is older than ``max_staleness / 2``, and checks
  that age on every read. That keeps the bound: every write acknowledged
  before the held heartbeat was already applied when the word was read
  (sequence bumps are read fresh on each hit; a new epoch only ever follows
  writes acknowledged after the held heartbeat). A published "down" or a new
  epoch is therefore noticed within ``max_staleness / 2``; the bound itself
  never depended on them. Cost per hit: two ``Cache.get`` (sequence, entry).
* **Redis Cluster.** One tracking connection per master (each reports the
  writes to its own slots); the heartbeat is the oldest PING every master has
  answered, so the bound holds for every slot. The slot map is re-read every
  TOPOLOGY_SECONDS on the first connection: moved slots give a new epoch (a
  key's writes are then reported by its new master, which is tracked too; the
  epoch is belt and braces); other masters than the tracked ones, or a lost
  connection, end the session: "down", rediscover, re-track, new epoch.
* **TTL.** The local TTL is ``min(max_ttl, PTTL)`` with the PTTL counted from
  *before* the GET+PTTL round trip, so it never outlives the server's key.

**Why reserved keys and not a new Cache facility.** The epoch, heartbeat and
sequences are ordinary entries of the cache under the reserved prefix
``b"\\x00shmcache.near\\x00"`` (bytes keys), read with ``Cache.get`` and
written with ``Cache.set``/``Cache.incr`` like any user data, so this module
needs nothing from the table and survives its rewrites (STYLE.md: adapters
use the public API). The cost is one extra lookup per hit (the sequence;
the control word is held, see above), measured in benchmarks/bench_near.py;
a dedicated "sequence words" area in the header would save it at the price
of a layout change. Reserved entries can be evicted or cleared like any other: a missing
heartbeat means bypass, and a sequence key that comes back starts from a new
random value, so an eviction never makes an old entry valid again.

Values: with no ``serializer`` they go to Redis as redis-py sends them
(bytes, str, int, float) and come back as bytes (str if the client has
``decode_responses=True``), so plain Redis clients read what you wrote. With
``serializer`` (``dumps``/``loads``), every value goes through it.

**Pickle trust.** A value served from shared memory was written there by
whoever can write the segment, not by Redis; unpickling it runs code they
chose. So pickles are decoded under the cache's own rule (README "Security",
``Cache(allow_pickle=)``): full pickle only where the cache allows it (a
cache nobody but you can write, or ``allow_pickle=True``), else only pickles
that need no class (``PickleRefused`` otherwise, nothing of it runs).
:class:`TrustedPickle` applies it; ``serializer=pickle`` gets it, and the
Django and Flask backends put it under their Redis serializers. Other
serializers are yours: json or msgpack run no code.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import random
import select
import struct
import threading
import time
import weakref
import zlib
from collections import deque
from urllib.parse import unquote, urlparse

from . import admin
from ._pdeathsig import die_with_parent
from .cache import Cache
from .codec import BYTES, FLOAT, INT, PICKLE, STR, Codec
from .errors import CacheFull, Error, KeyTooLong, ValueTooLarge

log = logging.getLogger("shmcache.near")

#: Prefix of every key this module keeps in the cache (bytes keys, so they
#: never collide with str keys; a NUL byte, so not with sane bytes keys).
NS = b"\x00shmcache.near\x00"
#: The tracker's control word: epoch, heartbeat, max_staleness, up. Written by
#: the tracker only (Cache.set, so readers see all four fields or none).
CTL_KEY = NS + b"ctl"
#: JSON: what the tracker follows (upstream without password, prefixes, pid).
INFO_KEY = NS + b"tracker"
ENTRY_PREFIX = NS + b"k:"
STAT_PREFIX = NS + b"stat:"
#: Sequence stripes. More stripes: fewer fills lost to another key's
#: invalidation; each is one small entry.
N_SEQ = 1024
SEQ_KEYS = tuple(NS + b"seq:" + i.to_bytes(2, "big") for i in range(N_SEQ))

#: epoch (u64), heartbeat = monotonic time the acknowledged PING was sent
#: (f64), max_staleness seconds (f64), up (u8: 1 = tracking, 0 = down).
CTL = struct.Struct("<QddB")
#: entry header: epoch (u64), fill sequence (u64), kind (u8) + the raw value.
HDR = struct.Struct("<QQB")
VALUE, ABSENT = 0, 1

#: Counters kept under STAT_PREFIX (shared, all processes of the host).
WORKER_STATS = ("near_hits", "near_misses", "upstream_reads", "bypassed_reads", "fills_discarded")
TRACKER_STATS = ("invalidations", "flushes", "epoch_bumps", "reconnects")
#: A process adds its own counts to the shared ones at most this often (s).
STATS_FLUSH_SECONDS = 1.0

_MISS = object()
_live = weakref.WeakSet()
_CODEC = Codec()  # the reserved entries hold bytes and ints only
# bound once for the hit path
_CTL_SIZE = CTL.size
_ctl_unpack = CTL.unpack
_HDR_SIZE = HDR.size
_hdr_unpack_from = HDR.unpack_from
_monotonic = time.monotonic
_crc32 = zlib.crc32
_SEQ_MASK = N_SEQ - 1


def _new_epoch() -> int:
    # Random, not a counter: a restarted daemon, or a control word that was
    # evicted, must never reissue an epoch old entries carry (p = 2**-64).
    return random.SystemRandom().getrandbits(64) or 1


def _new_seq() -> int:
    return random.SystemRandom().getrandbits(62)


def seq_key(kb: bytes) -> bytes:
    """The sequence stripe key of the Redis key ``kb``."""
    return SEQ_KEYS[zlib.crc32(kb) & (N_SEQ - 1)]


def _redis_key(key) -> bytes:
    t = type(key)
    if t is bytes:
        return key
    if t is str or isinstance(key, str):
        return str.encode(key)
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"key must be str or bytes, not {type(key).__name__}")


class TrustedPickle:
    """``pickle.dumps``/``loads`` under the pickle trust of a cache (see the
    module docstring): full pickle where ``codec.allow_pickle``; else only
    values that need no class to rebuild are written (``TypeError``
    otherwise, before anything reaches Redis) or read (``PickleRefused``).

    Args:
        codec: a :class:`shmcache.codec.Codec` saying what is trusted
            (``shmcache.admin.pickle_trust(cache)``).
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        self.allow_pickle = codec.allow_pickle

    def dumps(self, value, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
        if self.allow_pickle:
            return pickle.dumps(value, protocol)
        tag, data = self.codec.encode(value)  # refuses what needs a class, naming the cache and why
        if tag == PICKLE:
            return bytes(data)
        if tag in (BYTES, STR, INT, FLOAT):  # pickled by opcode, no global
            return pickle.dumps(value, protocol)
        raise TypeError(f"{self.codec.where} does not trust pickle ({self.codec.why}), and a "
                        f"{type(value).__name__} needs a class to unpickle: store bytes, or pass "
                        f"allow_pickle=True if every writer is trusted")

    def loads(self, data):
        return self.codec.decode(PICKLE, bytes(data))  # full pickle only while the cache's rule allows it


def _prefixes(prefixes) -> tuple[bytes, ...]:
    if prefixes is None:
        return ()
    if isinstance(prefixes, (str, bytes)):
        raise TypeError("prefixes must be a list of str or bytes, e.g. ['app:']")
    out = tuple(_redis_key(p) for p in prefixes)
    if any(not p for p in out):
        raise ValueError("an empty prefix tracks every key: give prefixes=None for that")
    return out


def connect(url: str, **kwargs):
    """A redis-py client for ``url``.

    ``redis://``, ``rediss://`` and ``unix://`` are redis-py's own URLs.
    ``redis+cluster://[:password@]host:port[,host:port...]`` is a Redis
    Cluster found from those seed nodes (redis-py's ``RedisCluster``, which
    discovers the masters and follows MOVED/ASK).
    ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``
    asks those Sentinels for the master of ``service`` (redis-py's
    ``Sentinel.master_for``, which follows failovers).

    Raises:
        ValueError: a malformed URL.
        ImportError: redis-py is not installed (``pip install shmcache[near]``).
    """
    import redis

    if not isinstance(url, str):
        raise TypeError(f"upstream must be a redis:// URL or a redis-py client, not {type(url).__name__}")
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from redis.cluster import ClusterNode, RedisCluster

        u = urlparse(url)
        parts = [p for p in u.path.split("/") if p]
        if parts and parts != ["0"]:
            raise ValueError(f"{_safe_url(url)}: Redis Cluster has only database 0")
        nodes = []
        for hp in u.netloc.rpartition("@")[2].split(","):
            h, _, p = hp.rpartition(":")
            if not p.isdigit():
                raise ValueError(f"{_safe_url(url)}: give the seed nodes as host:port[,host:port...]")
            nodes.append(ClusterNode(h.strip("[]") or "127.0.0.1", int(p)))
        if u.password:
            kwargs.setdefault("password", unquote(u.password))
        if u.username:
            kwargs.setdefault("username", unquote(u.username))
        if url.startswith("rediss"):
            kwargs.setdefault("ssl", True)
        return RedisCluster(startup_nodes=nodes, **kwargs)
    if url.startswith("redis+sentinel://"):
        from redis.sentinel import Sentinel

        u = urlparse(url)
        parts = [p for p in u.path.split("/") if p]
        if not parts:
            raise ValueError(f"{_safe_url(url)}: give the Sentinel service name, e.g. redis+sentinel://h:26379/mymaster")
        hosts = []
        for hp in u.netloc.rpartition("@")[2].split(","):
            h, _, p = hp.rpartition(":")
            hosts.append((h or "127.0.0.1", int(p or 26379)))
        if u.password:
            kwargs.setdefault("password", unquote(u.password))
        db = int(parts[1]) if len(parts) > 1 else 0
        sentinel = Sentinel(hosts, socket_timeout=kwargs.get("socket_timeout", 1.0))
        return sentinel.master_for(parts[0], db=db, **kwargs)
    return redis.Redis.from_url(url, **kwargs)


def _safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and shared memory)."""
    try:
        u = urlparse(url)
    except ValueError:
        return "<bad url>"
    if u.password:
        host = u.netloc.rpartition("@")[2]
        user = u.username or ""
        return u._replace(netloc=f"{user}:***@{host}").geturl()
    return url


def _peek(cache: Cache, key: bytes, default=None):
    """``cache.get(key)`` that counts no hit or miss (stats must not move the stats)."""
    e = admin.inspect(cache, key, raw=True)
    return default if e is None else _CODEC.decode(e.flags, e.raw_value)


def read_stats(cache: Cache) -> dict | None:
    """The near-cache counters and tracker state of ``cache``, or None if no
    near cache or tracker ever used it. Public-API reads only."""
    raw = {name: _peek(cache, STAT_PREFIX + name.encode(), 0) for name in WORKER_STATS + TRACKER_STATS}
    ctl = _peek(cache, CTL_KEY)
    info = _peek(cache, INFO_KEY)
    if ctl is None and info is None and not any(raw.values()):
        return None
    out = dict(raw)
    if ctl is not None and len(ctl) == CTL.size:
        epoch, beat, max_age, up = CTL.unpack(ctl)
        age = time.monotonic() - beat
        out.update(tracker_up=bool(up) and 0 <= age <= max_age, tracker_state="up" if up else "down",
                   heartbeat_age=age if beat else None, max_staleness=max_age, epoch=epoch)
    else:
        out.update(tracker_up=False, tracker_state="none", heartbeat_age=None, max_staleness=None, epoch=None)
    if info is not None:
        try:
            out["tracker"] = json.loads(info)
        except ValueError:
            out["tracker"] = None
    return out


class NearCache:
    """Redis with one shared copy of the hot keys per host; see the module docstring.

    Args:
        cache: a :class:`shmcache.Cache`, or a cache name (attached, or created
            with default settings; the daemon usually creates it).
        redis: a redis-py client (``Redis``, a Sentinel's ``master_for``,
            ``RedisCluster``), or a URL for :func:`connect`.
        prefixes: only keys starting with one of these are kept locally (the
            rest go to Redis every time); None: every key the daemon tracks.
        max_ttl: seconds a local copy lives at most (never longer than the
            key's TTL in Redis).
        neg_ttl: seconds a "no such key" answer is kept (None: not kept).
        serializer: object with ``dumps(value) -> bytes`` and ``loads(bytes)``
            applied to every value; None: redis-py's own types (see above).
            The ``pickle`` module is replaced by :attr:`pickle`, which
            follows the cache's pickle trust.
        allow_pickle: None: unpickle as ``cache`` does (full pickle only if
            nobody else can write it); True / False: decide here (as
            ``Cache(allow_pickle=)``).

    Raises:
        TypeError / ValueError: a bad argument (the message names it).
        ImportError: redis-py is not installed (``pip install shmcache[near]``).
    """

    def __init__(self, cache, redis, prefixes=None, *, max_ttl: float = 60.0, neg_ttl: float | None = None,
                 serializer=None, allow_pickle: bool | None = None):
        for label, v, none_ok in (("max_ttl", max_ttl, False), ("neg_ttl", neg_ttl, True)):
            if v is None and none_ok:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{label} must be a positive number of seconds, got {v!r}")
        if serializer is not None and not (callable(getattr(serializer, "dumps", None))
                                           and callable(getattr(serializer, "loads", None))):
            raise TypeError("serializer must have dumps(value) -> bytes and loads(bytes) -> value")
        self.prefixes = _prefixes(prefixes)
        self.max_ttl = float(max_ttl)
        self.neg_ttl = float(neg_ttl) if neg_ttl else None
        self.serializer = serializer
        self._own_redis = isinstance(redis, str)
        self._redis = connect(redis) if self._own_redis else redis
        if not hasattr(self._redis, "pipeline"):
            raise TypeError(f"redis must be a redis-py client or a URL, not {type(redis).__name__}")
        self._cluster = _is_cluster(self._redis)
        try:
            self._decode = bool(self._redis.get_encoder().decode_responses)
        except AttributeError:
            self._decode = False
        self._own_cache = isinstance(cache, str)
        self._cache = Cache(cache) if self._own_cache else cache
        if not isinstance(self._cache, Cache):
            raise TypeError(f"cache must be a shmcache.Cache or a cache name, not {type(cache).__name__}")
        if allow_pickle is not None and not isinstance(allow_pickle, bool):
            raise TypeError(f"allow_pickle must be True, False or None, not {type(allow_pickle).__name__}")
        trust = admin.pickle_trust(self._cache)
        if allow_pickle is not None:  # said outright: as Cache(allow_pickle=...), no later re-check
            trust.allow_pickle = allow_pickle
            trust.still_trusted = None
            trust.why = "allow_pickle=False"
        #: pickle under the cache's trust rule (the Django and Flask backends use it)
        self.pickle = TrustedPickle(trust)
        if serializer is pickle or getattr(serializer, "loads", None) is pickle.loads:
            self.serializer = self.pickle
        #: longest Redis key kept locally (longer ones always go to Redis)
        self._max_key = self._cache.stats()["max_key_size"] - len(ENTRY_PREFIX) - 1
        self._epoch_seen = None
        self._tracked: tuple[bytes, ...] | None = None  # the tracker's prefixes, () = all; None: unusable
        #: (epoch, heartbeat, max_staleness / 2) of the control word as last
        #: read; hits trust it while the heartbeat is younger than half the
        #: bound, then re-read it (see "Held control word" in the docstring)
        self._held = None
        #: test hook, called as hook(redis_key, stage) with stage "reply" (the
        #: fill's reply is in, the sequence not yet re-checked) and "store"
        #: (re-checked, about to write): makes the invalidation-overtakes-fill
        #: races deterministic in tests. Never set it in production.
        self._fill_hook = None
        self._reset_counts()
        _live.add(self)

    # -- plumbing ---------------------------------------------------------
    def _reset_counts(self) -> None:
        self._counts = dict.fromkeys(WORKER_STATS, 0)
        self._hits = 0  # kept apart from _counts: the hit path is the hot one
        self._flushed = time.monotonic()

    def _flush_counts(self) -> None:
        c = self._counts
        c["near_hits"] += self._hits
        self._reset_counts()
        try:
            for name, n in c.items():
                if n:
                    self._cache.incr(STAT_PREFIX + name.encode(), n, ttl=None)
        except (Error, ValueError, TypeError) as e:  # full cache, closed cache: stats are best effort
            log.debug("near-cache stats not flushed: %s", e)

    def _usable(self, kb: bytes, now: float):
        """The epoch to read and fill under, or None when this read must go to
        Redis (tracker down or late, key not tracked)."""
        self._held = None
        ctl = self._cache.get(CTL_KEY)
        if ctl is None or len(ctl) != CTL.size:
            return None
        epoch, beat, max_age, up = CTL.unpack(ctl)
        if not up or not 0.0 <= now - beat <= max_age:
            return None
        self._held = (epoch, beat, max_age / 2)
        if epoch != self._epoch_seen:
            self._learn_tracker(epoch)
        tracked = self._tracked
        if tracked is None or (tracked and not kb.startswith(tracked)):
            return None
        return epoch

    def _learn_tracker(self, epoch: int) -> None:
        # Once per epoch: which prefixes does the tracker follow? A key it
        # does not follow would never be invalidated, so it must not be kept.
        self._epoch_seen = epoch
        self._tracked = None
        info = self._cache.get(INFO_KEY)
        try:
            d = json.loads(info)
            tracked = tuple(p.encode("latin-1") for p in d["prefixes"])
        except (TypeError, ValueError, KeyError, AttributeError):
            log.warning("near cache %r: the tracker left no readable description; reading Redis directly",
                        self._cache.name)
            return
        mine = self.prefixes
        if tracked and mine and not all(p.startswith(tracked) for p in mine):
            log.warning("near cache %r: the daemon tracks prefixes %r, which do not cover %r; keys outside "
                        "them are read from Redis every time", self._cache.name, tracked, mine)
        self._tracked = tracked

    def _in(self, value):
        return self.serializer.dumps(value) if self.serializer is not None else value

    def _out(self, raw):
        if self.serializer is not None:
            return self.serializer.loads(raw)
        if self._decode and type(raw) is bytes:
            return raw.decode()
        return raw

    def _local_key(self, kb: bytes):
        if self.prefixes and not kb.startswith(self.prefixes):
            return None
        if len(kb) > self._max_key:
            return None
        return ENTRY_PREFIX + kb

    def _count(self, name: str, n: int = 1) -> None:
        self._counts[name] += n
        if time.monotonic() - self._flushed > STATS_FLUSH_SECONDS:
            self._flush_counts()

    # -- reads ------------------------------------------------------------
    def get(self, key, default=None):
        """The value of ``key``: from shared memory when a fresh copy is there,
        else from Redis (GET + PTTL in one round trip), then kept locally.

        Raises:
            TypeError: the key is not str or bytes.
            redis.RedisError: Redis cannot be reached (nothing is served that
                cannot be known fresh).
        """
        kb = key.encode() if type(key) is str else _redis_key(key)
        # The hit path, inlined: each Python call or lookup here costs about
        # as much as one Cache.get. Anything unusual takes _get_raw.
        held = self._held
        if held is not None:
            now = _monotonic()
            prefixes = self.prefixes
            tracked = self._tracked
            if now - held[1] <= held[2] and (not prefixes or kb.startswith(prefixes)) \
                    and len(kb) <= self._max_key and (not tracked or kb.startswith(tracked)):
                c = self._cache
                seq = c.get(SEQ_KEYS[_crc32(kb) & _SEQ_MASK])
                e = c.get(ENTRY_PREFIX + kb)
                if e is not None and seq is not None:
                    e_epoch, e_seq, kind = _hdr_unpack_from(e)
                    if e_epoch == held[0] and e_seq == seq:
                        self._hits += 1
                        if now - self._flushed > STATS_FLUSH_SECONDS:
                            self._flush_counts()
                        if kind != VALUE:
                            return default
                        if self.serializer is None and not self._decode:
                            return e[_HDR_SIZE:]
                        return self._out(e[_HDR_SIZE:])
        raw = self._get_raw(kb)
        return default if raw is _MISS else self._out(raw)

    def __getitem__(self, key):
        raw = self._get_raw(_redis_key(key))
        if raw is _MISS:
            raise KeyError(key)
        return self._out(raw)

    def __contains__(self, key) -> bool:
        return self._get_raw(_redis_key(key)) is not _MISS

    def _get_raw(self, kb: bytes):
        lk = self._local_key(kb)
        if lk is None:
            return self._upstream_get(kb)
        now = time.monotonic()
        epoch = self._usable(kb, now)
        if epoch is None:
            self._counts["bypassed_reads"] += 1
            return self._upstream_get(kb)
        sk, seq, hit = self._valid_local(kb, lk, epoch)
        if hit is not None:
            if now - self._flushed > STATS_FLUSH_SECONDS:
                self._flush_counts()
            kind, payload = hit
            return payload if kind == VALUE else _MISS
        return self._fill(kb, lk, epoch, sk, seq)

    def _valid_local(self, kb: bytes, lk: bytes, epoch):
        """``(seq_key, seq, hit)``: ``hit`` is the local copy's ``(kind,
        payload)`` if it was filled under ``epoch`` and its key's fill sequence
        has not moved since (counted as a hit), else None. The one validity
        test of get and get_many."""
        c = self._cache
        sk = SEQ_KEYS[zlib.crc32(kb) & (N_SEQ - 1)]
        seq = c.get(sk)
        e = c.get(lk)
        if e is not None and seq is not None:
            e_epoch, e_seq, kind = HDR.unpack_from(e)
            if e_epoch == epoch and e_seq == seq:
                self._hits += 1
                return sk, seq, (kind, e[HDR.size:])
        return sk, seq, None

    def _upstream_get(self, kb: bytes):
        self._count("upstream_reads")
        v = self._redis.get(kb)
        if v is None:
            return _MISS
        return v.encode() if type(v) is str else v

    def _fill(self, kb: bytes, lk: bytes, epoch: int, sk: bytes, seq):
        c = self._cache
        if seq is None:
            c.add(sk, _new_seq(), ttl=None)
            seq = c.get(sk)
        t0 = time.monotonic()
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(kb)
        pipe.pttl(kb)
        val, pttl = pipe.execute()
        self._counts["near_misses"] += 1
        self._count("upstream_reads")
        if type(val) is str:
            val = val.encode()
        if self._fill_hook is not None:
            self._fill_hook(kb, "reply")
        if seq is not None:
            self._store(lk, sk, epoch, seq, val, pttl, t0)
        return _MISS if val is None else val

    def _store(self, lk, sk, epoch, seq, val, pttl, t0) -> None:
        """Keep a fill, tagged with the epoch and sequence read before its GET."""
        if val is None:
            if not self.neg_ttl:
                return
            ttl, kind, val = self.neg_ttl, ABSENT, b""
        elif pttl == -2:  # gone between GET and PTTL
            return
        else:
            kind = VALUE
            ttl = self.max_ttl
            if pttl >= 0:  # counted from before the request: never past the server's expiry
                ttl = min(ttl, pttl / 1000.0 - (time.monotonic() - t0))
            if ttl <= 0.001:
                return
        c = self._cache
        if c.get(sk) != seq:  # an invalidation overtook this fill: do not even write it
            self._counts["fills_discarded"] += 1
            return
        if self._fill_hook is not None:
            self._fill_hook(lk[len(ENTRY_PREFIX):], "store")
        try:
            c.set(lk, HDR.pack(epoch, seq, kind) + val, ttl=ttl)
        except (ValueTooLarge, KeyTooLong, CacheFull):
            pass  # too big to keep here: it is read from Redis each time

    def get_many(self, keys) -> dict:
        """``{key: value}`` for the keys that exist; the local misses are read in
        one round trip (MGET + their PTTLs).

        Raises:
            as :meth:`get`, for the first bad key.
        """
        keys = list(keys)
        kbs = [_redis_key(k) for k in keys]
        out = {}
        now = time.monotonic()
        c = self._cache
        fills = []  # (key, kb, lk, sk, seq, epoch)
        plain = []  # (key, kb): straight to Redis
        for key, kb in zip(keys, kbs):
            lk = self._local_key(kb)
            epoch = None if lk is None else self._usable(kb, now)
            if epoch is None:
                if lk is not None:
                    self._counts["bypassed_reads"] += 1
                plain.append((key, kb))
                continue
            sk, seq, hit = self._valid_local(kb, lk, epoch)
            if hit is not None:
                if hit[0] == VALUE:
                    out[key] = self._out(hit[1])
                continue
            if seq is None:
                c.add(sk, _new_seq(), ttl=None)
                seq = c.get(sk)
            fills.append((key, kb, lk, sk, seq, epoch))
        if not fills and not plain:
            self._count("near_hits", 0)
            return out
        t0 = time.monotonic()
        pipe = self._redis.pipeline(transaction=False)
        wanted = [kb for _k, kb, *_ in fills] + [kb for _k, kb in plain]
        if self._cluster:  # MGET needs one slot; redis-py routes each GET to its master
            for kb in wanted:
                pipe.get(kb)
        else:
            pipe.mget(wanted)
        for _key, kb, *_ in fills:
            pipe.pttl(kb)
        res = pipe.execute()
        if self._cluster:
            vals, pttls = res[:len(wanted)], res[len(wanted):]
        else:
            vals, pttls = res[0], res[1:]
        self._counts["near_misses"] += len(fills)
        self._count("upstream_reads", len(wanted))
        for i, (key, kb, lk, sk, seq, epoch) in enumerate(fills):
            v = vals[i]
            if type(v) is str:
                v = v.encode()
            if self._fill_hook is not None:
                self._fill_hook(kb, "reply")
            if seq is not None:
                self._store(lk, sk, epoch, seq, v, pttls[i], t0)
            if v is not None:
                out[key] = self._out(v)
        for j, (key, _kb) in enumerate(plain):
            v = vals[len(fills) + j]
            if v is not None:
                out[key] = self._out(v.encode() if type(v) is str else v)
        return out

    def ttl(self, key) -> float | None:
        """Seconds until ``key`` expires in Redis (None: never). Raises KeyError if absent."""
        kb = _redis_key(key)
        ms = self._redis.pttl(kb)
        if ms == -2:
            raise KeyError(key)
        return None if ms == -1 else ms / 1000.0

    # -- writes: Redis first, then the local copy goes --------------------
    def _drop(self, kbs) -> None:
        # Bump the key's sequence before deleting, like the tracker: a fill
        # on this host that started before the write can then never be kept,
        # so this process reads its own write at once (the tracker's
        # invalidation arrives a moment later and does the same on every host).
        c = self._cache
        lks = []
        for kb in kbs:
            lk = self._local_key(kb)
            if lk is not None:
                c.incr(seq_key(kb), 1, default=_new_seq(), ttl=None)
                lks.append(lk)
        if lks:
            c.delete_many(lks)

    def invalidate(self, *keys) -> None:
        """Drop this host's copies of ``keys`` now, after writing them to Redis
        by other means (the tracker would drop them anyway, a moment later;
        this makes the writing process read its own write at once)."""
        self._drop([_redis_key(k) for k in keys])

    @staticmethod
    def _px(ttl):
        if ttl is None:
            return None
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
        return max(1, int(round(ttl * 1000)))

    def set(self, key, value, ttl: float | None = None) -> bool:
        """SET in Redis (``ttl`` seconds, None: no expiry), then drop the local copy. Returns True.

        Raises:
            ValueError: a bad ttl.
            redis.DataError: a value redis-py cannot send (use ``serializer``).
            redis.RedisError: Redis cannot be reached.
        """
        kb = _redis_key(key)
        px = self._px(ttl)
        try:
            return bool(self._redis.set(kb, self._in(value), px=px))
        finally:
            self._drop((kb,))

    def __setitem__(self, key, value) -> None:
        self.set(key, value)

    def add(self, key, value, ttl: float | None = None) -> bool:
        """SET NX: store only if absent in Redis. Returns whether it stored. Raises as :meth:`set`."""
        kb = _redis_key(key)
        px = self._px(ttl)
        try:
            return bool(self._redis.set(kb, self._in(value), px=px, nx=True))
        finally:
            self._drop((kb,))

    def set_many(self, mapping, ttl: float | None = None) -> None:
        """SET every item in one round trip (a pipeline), then drop the local copies.
        Raises as :meth:`set`."""
        px = self._px(ttl)
        items = [(_redis_key(k), self._in(v)) for k, v in (mapping.items() if hasattr(mapping, "items") else mapping)]
        pipe = self._redis.pipeline(transaction=False)
        for kb, v in items:
            pipe.set(kb, v, px=px)
        try:
            pipe.execute()
        finally:
            self._drop([kb for kb, _v in items])

    def delete(self, key) -> bool:
        """DEL in Redis, then drop the local copy. True if Redis had the key."""
        kb = _redis_key(key)
        try:
            return bool(self._redis.delete(kb))
        finally:
            self._drop((kb,))

    def __delitem__(self, key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def delete_many(self, keys) -> int:
        """DEL every key at once; returns how many Redis had."""
        kbs = [_redis_key(k) for k in keys]
        if not kbs:
            return 0
        try:
            return int(self._redis.delete(*kbs))
        finally:
            self._drop(kbs)

    def incr(self, key, delta: int = 1) -> int:
        """INCRBY in Redis (atomic across every host); returns the new value.

        Raises:
            redis.ResponseError: the value is not an integer.
        """
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta must be an int, not {type(delta).__name__}")
        kb = _redis_key(key)
        try:
            return int(self._redis.incrby(kb, delta))
        finally:
            self._drop((kb,))

    def decr(self, key, delta: int = 1) -> int:
        """DECRBY; see :meth:`incr`."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta must be an int, not {type(delta).__name__}")
        return self.incr(key, -delta)

    def touch(self, key, ttl: float | None = None) -> bool:
        """EXPIRE (PEXPIRE) or, with ``ttl=None``, PERSIST. False if the key is absent."""
        kb = _redis_key(key)
        px = self._px(ttl)
        try:
            if px is None:
                return bool(self._redis.persist(kb)) or bool(self._redis.exists(kb))
            return bool(self._redis.pexpire(kb, px))
        finally:
            self._drop((kb,))

    # -- management ---------------------------------------------------------
    def stats(self) -> dict:
        """This host's near-cache counters (every process; each adds its own
        at most STATS_FLUSH_SECONDS late, this one's now) and the tracker's
        state: ``near_hits``, ``near_misses`` (fills), ``upstream_reads``,
        ``bypassed_reads``, ``fills_discarded`` (an invalidation overtook
        them), ``invalidations`` (keys), ``flushes`` (null invalidations),
        ``epoch_bumps``, ``reconnects``, ``tracker_up``, ``heartbeat_age``,
        ``max_staleness``, ``epoch``."""
        self._flush_counts()
        return read_stats(self._cache) or {}

    def close(self) -> None:
        """Add this process's counts to the shared ones; close what this object opened. Idempotent."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        _live.discard(self)
        if not self._cache.closed:
            self._flush_counts()
        if self._own_cache:
            self._cache.close()
        if self._own_redis:
            self._redis.close()

    def __enter__(self) -> "NearCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmcache.near.NearCache {self._cache.name!r} prefixes={list(self.prefixes)!r}>"


# ------------------------------------------------------ a redis-py look-alike
#: redis-py methods that change the key named by their first argument (or ``name=``).
_WRITES_ONE = frozenset({
    "set", "setex", "psetex", "setnx", "getset", "getdel", "getex", "append", "setrange", "incr", "incrby",
    "incrbyfloat", "decr", "decrby", "expire", "pexpire", "expireat", "pexpireat", "persist", "rename",
    "renamenx", "copy",
})
#: ... every key among their positional arguments.
_WRITES_ALL = frozenset({"delete", "unlink"})
#: ... the keys of their mapping.
_WRITES_MAPPING = frozenset({"mset", "msetnx"})


def _written_keys(method: str, args, kwargs) -> list:
    if method in _WRITES_ONE:
        keys = [kwargs.get("name", args[0] if args else None)]
        if method in ("rename", "renamenx", "copy"):  # the destination changes too
            keys.append(kwargs.get("dst", args[1] if len(args) > 1 else None))
        return [k for k in keys if isinstance(k, (str, bytes))]
    if method in _WRITES_ALL:
        return [k for k in args if isinstance(k, (str, bytes))]
    if method in _WRITES_MAPPING:
        mapping = kwargs.get("mapping", args[0] if args else {})
        return list(mapping)
    return []


class NearRedis:
    """A redis-py client whose ``get``, ``mget`` and ``exists`` are served by a
    :class:`NearCache`; every other method is the client's own, and the
    writes among them (SET, DEL, INCR, EXPIRE, MSET... also inside a
    ``pipeline()``) drop this host's copies of the keys they touch once Redis
    answered. For code that already talks to Redis through redis-py (Django's
    and Flask-Caching's Redis backends): wrap the client, keep the code.

    Reads follow NearCache: raw bytes, or str with a ``decode_responses`` client.
    """

    def __init__(self, near: NearCache):
        self.near = near
        self.client = near._redis

    def get(self, name):
        return self.near.get(name)

    def mget(self, keys, *args):
        keys = [keys, *args] if isinstance(keys, (str, bytes)) else list(keys) + list(args)
        found = self.near.get_many(keys)
        return [found.get(k) for k in keys]

    def exists(self, *names) -> int:
        return sum(1 for n in names if n in self.near)

    def pipeline(self, transaction: bool = True, shard_hint=None):
        return _NearPipeline(self.client.pipeline(transaction=transaction, shard_hint=shard_hint), self.near)

    def __getattr__(self, name):
        attr = getattr(self.client, name)
        if name not in _WRITES_ONE and name not in _WRITES_ALL and name not in _WRITES_MAPPING:
            return attr
        near = self.near

        def write(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            finally:
                near.invalidate(*_written_keys(name, args, kwargs))

        return write

    def __repr__(self) -> str:
        return f"<shmcache.near.NearRedis {self.near!r}>"


class _NearPipeline:
    """A redis-py pipeline that drops the local copies of the keys it wrote on execute()."""

    def __init__(self, pipe, near: NearCache):
        self._pipe = pipe
        self._near = near
        self._keys: list = []

    def __getattr__(self, name):
        attr = getattr(self._pipe, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args, **kwargs):
            self._keys.extend(_written_keys(name, args, kwargs))
            r = attr(*args, **kwargs)
            return self if r is self._pipe else r

        return call

    def execute(self, *args, **kwargs):
        keys, self._keys = self._keys, []
        try:
            return self._pipe.execute(*args, **kwargs)
        finally:
            if keys:
                self._near.invalidate(*keys)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pipe.reset()

    def __len__(self) -> int:
        return len(self._pipe)


def _after_fork_in_child() -> None:
    # The parent's unflushed counts are the parent's to report.
    for n in list(_live):
        n._reset_counts()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------ tracker
class Tracker:
    """The daemon's one tracking connection per host.

    Holds a RESP3 connection with ``CLIENT TRACKING ON BCAST [PREFIX p ...]``;
    for each invalidated key bumps its sequence stripe, then deletes the
    local copy; a ``null`` invalidation (FLUSHALL/FLUSHDB) publishes a new
    epoch. PINGs every ``ping_interval`` seconds and publishes the
    heartbeat; on any connection error publishes "down", reconnects with
    backoff (0.05 s doubling to 2 s), re-enables tracking and only then
    publishes a new epoch and "up".

    Args:
        cache: the daemon's :class:`Cache`.
        upstream: URL (see :func:`connect`) or a callable returning a
            redis-py client (created with ``protocol=3``); a ``RedisCluster``
            gets one tracking connection per master.
        prefixes: key prefixes to track (empty: every key).
        ping_interval: seconds between PINGs; readers trust shared memory for
            ``max_staleness = 2 * ping_interval``.
        nice: the tracker thread's own nice value (-20..19; only this thread,
            which sleeps between pushes), None: leave it. See "Invalidation
            delay" below.

    Raises:
        ValueError: a bad interval, nice value or overlapping prefixes (Redis refuses them).

    **Invalidation delay** (a write acknowledged to its writer -> the key
    gone from this host's shared memory). Handling one push takes ~0.1 ms
    (p99 ~0.3 ms); Redis writes the push before it acknowledges the write.
    What remained was *waiting for a CPU*: measured on a 2-CPU VM at load
    average ~4, the thread returned from poll() up to 13 ms after the ack
    (p99 2.5-8 ms) though the push was already in its socket; at nice -20 its
    p99 is ~0.2 ms there (benchmarks/bench_near.py). Rejected: SCHED_FIFO
    (p99 ~0.02 ms, but a storm of invalidations at real-time priority starves
    the host), a tighter poll timeout (poll() already returns on data) and
    batching (pushes arrive one per write; there is nothing to batch).
    Raising priority needs CAP_SYS_NICE or RLIMIT_NICE (systemd:
    ``LimitNICE=-20`` or ``AmbientCapabilities=CAP_SYS_NICE``); without it the
    tracker logs one warning and tracks at its inherited priority.
    """

    def __init__(self, cache: Cache, upstream, prefixes=(), ping_interval: float = 0.1, nice: int | None = None):
        if isinstance(ping_interval, bool) or not isinstance(ping_interval, (int, float)) \
                or not 0.001 <= ping_interval <= 60:
            raise ValueError(f"ping_interval must be 0.001..60 seconds, got {ping_interval!r}")
        if nice is not None and (isinstance(nice, bool) or not isinstance(nice, int) or not -20 <= nice <= 19):
            raise ValueError(f"nice must be an int in -20..19 or None, got {nice!r}")
        self.nice = nice
        self.prefixes = _prefixes(list(prefixes)) if prefixes else ()
        for a in self.prefixes:
            for b in self.prefixes:
                if a is not b and b.startswith(a):
                    raise ValueError(f"tracked prefixes {a!r} and {b!r} overlap (Redis refuses that); keep {a!r}")
        self.cache = cache
        self.upstream = upstream
        self.ping_interval = float(ping_interval)
        self.max_staleness = 2 * self.ping_interval
        #: a PING unanswered this long means the connection is dead (readers
        #: already bypass after max_staleness; this decides when to reconnect)
        self.ping_timeout = max(1.0, 10 * self.ping_interval)
        self.epoch = _new_epoch()
        self.up = False
        self._beat = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: list = []  # the live tracking connections (tests kill them)
        self._push_error: Exception | None = None
        self.connected = threading.Event()  # set while tracking is on (tests, launchers)

    # -- shared memory ------------------------------------------------------
    def _publish(self, beat: float) -> None:
        self._beat = beat
        self.cache.set(CTL_KEY, CTL.pack(self.epoch, beat, self.max_staleness, 1 if self.up else 0), ttl=None)

    def _bump(self, name: str, n: int = 1) -> None:
        self.cache.incr(STAT_PREFIX + name.encode(), n, ttl=None)

    def _describe(self, connections: int = 0) -> None:
        url = self.upstream if isinstance(self.upstream, str) else repr(self.upstream)
        self.cache.set(INFO_KEY, json.dumps({
            "upstream": _safe_url(url), "pid": os.getpid(), "ping_interval": self.ping_interval,
            "prefixes": [p.decode("latin-1") for p in self.prefixes], "connections": connections,
        }).encode(), ttl=None)

    def go_down(self) -> None:
        """Publish "down": readers bypass shared memory from now on."""
        self.up = False
        try:
            self._publish(0.0)
        except (Error, ValueError) as e:
            log.warning("could not publish tracker state: %s", e)

    def new_epoch(self) -> None:
        """Invalidate every entry filled so far (O(1))."""
        self.epoch = _new_epoch()
        self._bump("epoch_bumps")

    def on_invalidate(self, msg) -> None:
        """Handle one RESP3 ``invalidate`` push: ``[b"invalidate", keys | None]``."""
        keys = msg[1] if len(msg) > 1 else None
        c = self.cache
        if keys is None:  # FLUSHALL / FLUSHDB: everything filled so far goes
            # Republish the last acknowledged PING's time, not now: only the
            # pushes before this one are known to have arrived.
            self.new_epoch()
            self._publish(self._beat if self.up else 0.0)
            self._bump("flushes")
            return
        lks = []
        for k in keys:
            kb = k.encode() if type(k) is str else bytes(k)
            # The sequence first, then the delete: a fill that read the old
            # sequence is then never served, whichever of the two it races.
            c.incr(SEQ_KEYS[zlib.crc32(kb) & (N_SEQ - 1)], 1, default=_new_seq(), ttl=None)
            if len(ENTRY_PREFIX) + len(kb) < 1 << 16:
                lks.append(ENTRY_PREFIX + kb)
        if lks:
            try:
                c.delete_many(lks)
            except KeyTooLong:  # a key only too long to be kept: delete what can exist
                for lk in lks:
                    try:
                        c.delete(lk)
                    except KeyTooLong:
                        pass
        self._bump("invalidations", len(keys))

    # -- connection ---------------------------------------------------------
    def _client(self):
        kw = dict(protocol=3, socket_timeout=self.ping_timeout, socket_connect_timeout=self.ping_timeout,
                  health_check_interval=0)
        if callable(self.upstream):
            return self.upstream()
        return connect(self.upstream, **kw)

    def _targets(self, client) -> list:
        """The servers to track: the one Redis, or every master of a cluster
        (found afresh through redis-py's own discovery on each session)."""
        if _is_cluster(client):
            client.nodes_manager.initialize()
            return [(n.name, n.redis_connection.connection_pool.make_connection()) for n in client.get_primaries()]
        return [("redis", client.connection_pool.make_connection())]

    def _session(self, client) -> None:
        """Track on one connection per master until one fails (raises) or stop() is called."""
        states = []
        try:
            for name, conn in self._targets(client):
                st = _Link(name, conn)
                states.append(st)
                conn.connect()
                if str(conn.protocol) != "3":
                    raise ValueError("the tracking connection needs RESP3 (protocol=3)")
                _hook_invalidations(conn, self._on_push)
            self._conns = [st.conn for st in states]
            args = ["CLIENT", "TRACKING", "ON", "BCAST"]
            for p in self.prefixes:
                args += ["PREFIX", p]
            sent = time.monotonic()
            for st in states:
                st.conn.send_command(*args)
            for st in states:
                st.conn.read_response()
            cluster = _is_cluster(client)
            slots = None
            if cluster:
                # Read after tracking is on: a move from now on is noticed.
                states[0].conn.send_command("CLUSTER", "SLOTS")
                slots = self._check_slots(states, _read_reply(states[0].conn))
            # Tracking is on: whatever is written from now on reaches us. Only
            # now may readers trust shared memory again, under a new epoch.
            self.new_epoch()
            self.up = True
            self._describe(len(states))
            self._publish(sent)
            self.connected.set()
            log.info("tracking %s (%s; prefixes %s); readers may be %.3g s behind at most",
                     _safe_url(self.upstream) if isinstance(self.upstream, str) else "upstream",
                     f"{len(states)} masters" if cluster else "one server",
                     [p.decode("latin-1") for p in self.prefixes] or "all keys", self.max_staleness)
            for st in states:
                st.acked = sent
            poller = select.poll()
            by_fd = {}
            for st in states:
                # Layer breach: redis-py has no public way to wait on several
                # connections at once; the socket is only polled, never read.
                fd = st.conn._sock.fileno()
                poller.register(fd, select.POLLIN)
                by_fd[fd] = st
            next_ping = time.monotonic()
            next_slots = next_ping + TOPOLOGY_SECONDS
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_ping:
                    for st in states:
                        st.conn.send_command("PING")
                        st.pending.append(now)
                    next_ping = now + self.ping_interval
                if cluster and now >= next_slots:
                    states[0].conn.send_command("CLUSTER", "SLOTS")
                    states[0].pending.append(None)
                    next_slots = now + TOPOLOGY_SECONDS
                for st in states:
                    t = next((x for x in st.pending if x is not None), None)
                    if t is not None and now - t > self.ping_timeout:
                        raise TimeoutError(f"no PONG from {st.name} for {now - t:.2f} s")
                busy = False
                for st in states:  # whatever is buffered or already in a socket, in order per link
                    if st.conn.can_read(0):
                        busy = True
                        r = st.conn.read_response(push_request=True)
                        if r is _PUSHED:
                            continue
                        if r is _PUSH_FAILED:  # an invalidation not applied: end the session (new epoch)
                            raise InvalidationFailed(f"could not apply an invalidation from {st.name}: "
                                                     f"{self._push_error!r}") from self._push_error
                        if not st.pending:
                            raise ValueError(f"unexpected reply on the tracking connection to {st.name}: {r!r}")
                        t = st.pending.popleft()
                        if t is not None and r not in (b"PONG", "PONG"):
                            raise ValueError(f"expected PONG from {st.name}, got {r!r}")
                        if t is None:  # a CLUSTER SLOTS reply
                            now_slots = self._check_slots(states, r)
                            if now_slots != slots:
                                log.info("cluster slots moved between masters: new epoch")
                                slots = now_slots
                                self.new_epoch()
                                self._publish(self._beat)
                            continue
                        st.acked = t
                        beat = min(x.acked for x in states)
                        if beat > self._beat:
                            self._publish(beat)
                if not busy:
                    wait = max(0.0, min(next_ping - time.monotonic(), self.ping_interval))
                    poller.poll(wait * 1000.0)
        finally:
            self.connected.clear()
            self._conns = []
            for st in states:
                st.conn.disconnect()

    def _check_slots(self, states, reply) -> tuple:
        """The slot map of a CLUSTER SLOTS reply, as ``((first, last, master id), ...)``;
        raises if its masters are not the ones tracked (a master was added,
        removed or replaced: the session starts over, under a new epoch)."""
        slots, masters = [], set()
        for entry in reply:
            host, port, node_id = entry[2][0], int(entry[2][1]), entry[2][2]
            host = host.decode() if isinstance(host, bytes) else str(host)
            masters.add(f"{host}:{port}")
            slots.append((int(entry[0]), int(entry[1]), bytes(node_id) if isinstance(node_id, bytes) else node_id))
        tracked = {st.name for st in states}
        if masters != tracked:
            raise TopologyChanged(f"cluster masters are now {sorted(masters)}, tracking {sorted(tracked)}")
        return tuple(sorted(slots))

    def _on_push(self, msg):
        # redis-py calls this inside a try/except that logs any exception and
        # returns None from read_response (its parser's handle_push_response):
        # an invalidation that failed to apply would pass unnoticed, and the
        # None could be taken for a PONG. Keep the error; the loop raises it.
        try:
            self.on_invalidate(msg)
        except Exception as e:
            self._push_error = e
            return _PUSH_FAILED
        return _PUSHED

    def _set_priority(self) -> None:
        # Linux: setpriority(PRIO_PROCESS, tid) changes that one thread only.
        if self.nice is None:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        except OSError as e:
            log.warning("tracker: cannot set nice %d (%s): invalidations may wait for a CPU on a busy host; "
                        "grant CAP_SYS_NICE or RLIMIT_NICE (systemd: LimitNICE=%d), or pass --track-nice 0",
                        self.nice, e.strerror or e, self.nice)

    def run(self) -> None:
        """Track until :meth:`stop`: sessions, reconnects with backoff."""
        import redis
        from redis.exceptions import RedisClusterException

        self._set_priority()
        backoff = 0.05
        client = None
        self._describe()
        while not self._stop.is_set():
            try:
                if client is None:
                    client = self._client()
                self._session(client)
            except (redis.RedisError, RedisClusterException, TopologyChanged, OSError, ValueError) as e:
                if self._stop.is_set():
                    break
                was_up = self.up
                self.go_down()
                self._bump("reconnects")
                if was_up:
                    log.warning("tracking connection lost (%s); readers go to Redis until it is back", e)
                else:
                    log.warning("cannot track %s: %s; retrying in %.2f s",
                                _safe_url(self.upstream) if isinstance(self.upstream, str) else "upstream", e, backoff)
                self._stop.wait(backoff)
                backoff = min(2.0, backoff * 2) if not was_up else 0.05
            except Error as e:  # the cache itself failed (closed, locked): retry, readers bypass meanwhile
                log.error("tracker cannot update the cache: %s", e)
                self.go_down()
                self._stop.wait(0.5)
            else:
                backoff = 0.05
        self.go_down()

    def start(self) -> None:
        """Run in a daemon thread."""
        self.go_down()  # a restored or leftover "up" from an earlier daemon must not count
        self._thread = threading.Thread(target=self.run, name="shmcache-tracker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop tracking, publish "down" and wait for the thread (at most ``timeout`` s). Idempotent."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)


class TrackerProcess:
    """The daemon's tracker in a process of its own, restarted if it dies.

    Why not a thread of the daemon: the daemon's expiry, snapshots and
    metrics share its interpreter, and a push then waits behind them. With
    a CPU-bound writer churning the cache (short TTLs), invalidation delay
    p99 was 48-63 ms as a thread against 4.7-7.3 ms as a process at load ~4-5
    on 2 CPUs; at load 6-8, 53-78 ms against 19-66 ms (``bench_near.py
    --churn``). With the daemon's expiry off the thread gave 4.6-6.8 ms. The child gets the upstream URL through its
    environment (never its command line: ps shows that to every user), dies
    with the daemon (PR_SET_PDEATHSIG), and publishes "down" when it stops;
    if it dies, the daemon publishes "down" for it and starts another one
    (readers bypass meanwhile; the new one tracks under a new epoch).

    Args:
        tracker: the validated settings (its ``run`` happens in the child).
        name, mode, owner: how the child attaches the cache (as the daemon did).
    """

    #: seconds between restarts of a child that keeps dying
    RESTART_BACKOFF = (0.05, 2.0)

    def __init__(self, tracker: "Tracker", name: str, mode: int | None = None, owner=None):
        self.tracker = tracker
        self.name = name
        self.mode = mode
        self.owner = owner
        self.proc = None
        self._stopping = False
        self._backoff = self.RESTART_BACKOFF[0]
        self._next_start = 0.0

    def _settings(self) -> str:
        t = self.tracker
        if not isinstance(t.upstream, str):
            raise TypeError("a tracker process needs the upstream as a URL")
        return json.dumps({"name": self.name, "mode": self.mode, "owner": self.owner, "upstream": t.upstream,
                           "prefixes": [p.decode("latin-1") for p in t.prefixes], "ping": t.ping_interval,
                           "nice": t.nice, "log_level": logging.getLogger().getEffectiveLevel()})

    def start(self) -> None:
        """Publish "down" (nothing earlier counts), then start the child."""
        import subprocess
        import sys

        self.tracker.go_down()
        env = {**os.environ, _CHILD_ENV: self._settings()}
        self.proc = subprocess.Popen([sys.executable, "-m", "shmcache.near"], env=env, stdin=subprocess.DEVNULL,
                                     preexec_fn=functools.partial(die_with_parent, os.getpid()))
        log.info("tracker process pid %d started", self.proc.pid)

    def poll(self) -> None:
        """Restart a child that died (call it from the daemon's loop)."""
        if self._stopping or self.proc is None or self.proc.poll() is None:
            if self.proc is not None and self.proc.poll() is None and time.monotonic() > self._next_start + 60:
                self._backoff = self.RESTART_BACKOFF[0]  # it has lived a minute: forget earlier deaths
            return
        now = time.monotonic()
        if now < self._next_start:
            return
        log.error("tracker process pid %d exited with %s; readers go to Redis; restarting it",
                  self.proc.pid, self.proc.returncode)
        self._next_start = now + self._backoff
        self._backoff = min(self.RESTART_BACKOFF[1], self._backoff * 2)
        self.start()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the child (it publishes "down"), wait, then publish "down" here too. Idempotent."""
        self._stopping = True
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except Exception:
                p.kill()
                p.wait(5)
        self.tracker.go_down()


#: The environment variable carrying a tracker child's settings (JSON).
_CHILD_ENV = "SHMCACHE_TRACKER_CHILD"


def _child_main() -> int:
    """``python -m shmcache.near``, started by :class:`TrackerProcess`."""
    import signal
    import sys

    raw = os.environ.pop(_CHILD_ENV, None)
    if raw is None:
        print("shmcache.near: this module runs as the daemon's tracker process only "
              "(shmcache daemon --upstream URL)", file=sys.stderr)
        return 2
    cfg = json.loads(raw)
    logging.basicConfig(level=cfg["log_level"], stream=sys.stderr,
                        format="%(asctime)s shmcache-tracker[%(process)d] %(levelname)s %(message)s")
    cache = Cache(cfg["name"], create=False, mode=cfg["mode"], owner=cfg["owner"])
    t = Tracker(cache, cfg["upstream"], cfg["prefixes"], cfg["ping"], nice=cfg["nice"])
    signal.signal(signal.SIGTERM, lambda *_: t._stop.set())
    signal.signal(signal.SIGINT, lambda *_: t._stop.set())
    try:
        t.go_down()
        t.run()
    finally:
        cache.close()
    return 0


_PUSHED = object()
_PUSH_FAILED = object()
#: How often a cluster's slot map is re-read on the tracking connection (s).
TOPOLOGY_SECONDS = 1.0


class InvalidationFailed(Error):
    """A push could not be applied to the cache: the session ends (readers
    bypass, then a new epoch), since its keys may still hold valid copies."""


class TopologyChanged(Exception):
    """The cluster's masters are not the ones tracked: track them afresh."""


class _Link:
    """One tracking connection: its master and the send times of its unanswered PINGs."""

    __slots__ = ("name", "conn", "pending", "acked")

    def __init__(self, name, conn):
        self.name = name
        self.conn = conn
        self.pending: deque = deque()  # PING send times; None for a CLUSTER SLOTS
        self.acked = 0.0


def _is_cluster(client) -> bool:
    try:
        from redis.cluster import RedisCluster
    except ImportError:  # pragma: no cover - redis-py without cluster support
        return False
    return isinstance(client, RedisCluster)


def _read_reply(conn):
    while True:
        r = conn.read_response(push_request=True)
        if r is _PUSH_FAILED:
            raise InvalidationFailed("could not apply an invalidation")
        if r is not _PUSHED:
            return r


def _hook_invalidations(conn, handler) -> None:
    """Route the RESP3 ``invalidate`` pushes of ``conn`` to ``handler``.

    Private redis-py API, on purpose: redis-py (8.1) has no public hook for
    invalidation pushes. ``PubSub(push_handler_func=)`` only sees pub/sub
    pushes, and its client-side cache (``cache_config=``) keeps a cache per
    process with no callback, no BCAST and no prefixes. Its own client-side
    cache registers its handler exactly this way
    (``CacheProxyConnection._enable_tracking_callback``). If a redis-py
    release drops the method, tracking fails loudly here (readers then go to
    Redis) instead of silently losing invalidations.
    """
    setter = getattr(getattr(conn, "_parser", None), "set_invalidation_push_handler", None)
    if setter is None:
        import redis

        raise ValueError(f"redis-py {redis.__version__} offers no invalidation push handler "
                         "(parser.set_invalidation_push_handler); shmcache.near needs redis-py >= 5.1")
    setter(handler)


if __name__ == "__main__":
    raise SystemExit(_child_main())
