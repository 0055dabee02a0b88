"""The public ``Cache``: a dict-like view of one shared memory segment."""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from multiprocessing import util as mp_util
from typing import Any, TypeVar, Union

from . import admin, stampede
from . import layout as L
from ._durations import MAX_SECONDS, MAX_WAIT, check_seconds  # noqa: F401 - check_seconds, MAX_SECONDS: re-exported
from ._sentinels import DEFAULT_TTL, MISSING
from .codec import BYTES, CUSTOM, STR, Codec, decode_key, encode_int, encode_key
from .errors import KeyTooLong, SettingsIgnored, SettingsMismatch, ValueTooLarge
from .lock import Client, Identity, StripeLocks, claim_client, lock_words, pure_atomics, release_client
from .segment import Segment
from .table import ADD, DELETE, REPLACE, SET, Table, Undecodable, key_hash

try:  # the C fast paths; without a compiler shmcache runs in pure Python
    from . import _speedups
except ImportError:  # pragma: no cover - exercised by installs without a compiler
    _speedups = None

#: Use the C fast paths when they are built. Tests switch this off to run the
#: same contract suite against the pure-Python paths (also: SHMCACHE_PURE_PYTHON=1).
USE_SPEEDUPS = _speedups is not None and not os.environ.get("SHMCACHE_PURE_PYTHON")


def _check_speedups_layout() -> None:
    """The C file hard-codes the offsets layout.py defines: refuse a mismatch."""
    want = speedups_layout()
    bad = {k: (getattr(_speedups, k, None), v) for k, v in want.items() if getattr(_speedups, k, None) != v}
    if bad:
        raise ImportError(f"shmcache._speedups was built for another layout (C, Python): {bad}; reinstall shmcache")


def speedups_layout() -> dict:
    """Every constant the C file hard-codes, as layout.py / codec.py / table.py define it."""
    from . import codec
    from .table import READ_RETRIES

    return {
        "LAYOUT_VERSION": L.LAYOUT_VERSION, "SLOT_SIZE": L.SLOT_SIZE, "SL_TAG": L.SL_TAG, "SL_LOC": L.SL_LOC,
        "SL_EXPIRE": L.SL_EXPIRE, "ENTRY_HDR": L.ENTRY_HEADER, "E_CHECKSUM": L.E_CHECKSUM, "E_VLEN": L.E_VLEN,
        "E_KLEN": L.E_KLEN, "E_FLAGS": L.E_FLAGS, "SEG_HEADER": L.SEG_HEADER, "ALIGN": L.ALIGN,
        "STRIPE_SIZE": L.STRIPE_SIZE, "C_COUNTERS": L.C_COUNTERS, "LOCK_WAITERS": L.LOCK_WAITERS,
        "S_VERSION": L.S_VERSION, "S_LOCK": L.S_LOCK, "S_ITEMS": L.S_ITEMS, "S_LIVE": L.S_LIVE,
        "S_RING": L.S_RING, "S_EVICTIONS": L.S_EVICTIONS,
        "CTR_HITS": L.C_HITS, "CTR_MISSES": L.C_MISSES, "CTR_SETS": L.C_SETS,
        "CTR_DELETES": L.C_DELETES, "CTR_EVICTIONS": L.C_EVICTIONS, "CTR_EXPIRATIONS": L.C_EXPIRATIONS,
        "FLAG_BYTES": codec.BYTES, "FLAG_STR": codec.STR, "FLAG_INT": codec.INT, "FLAG_FLOAT": codec.FLOAT,
        "READ_RETRIES": READ_RETRIES,
    }


if _speedups is not None:
    _check_speedups_layout()

_MISSING = MISSING
_DEFAULT = DEFAULT_TTL


_live_caches: "weakref.WeakSet[Cache]" = weakref.WeakSet()
#: States no live Cache covers any more whose release waits for a held fast
#: method (_State.on_death): a forked child must not keep using the parent's
#: client slot through them (see _after_fork_in_child).
_deferred_states: "weakref.WeakSet[_State]" = weakref.WeakSet()
#: Clients whose slot close() kept because a lock word still named it
#: (_State.release): their fds stay open until exit, in this process only.
_kept_clients: list = []


#: The instance attributes _bind points at C methods of the core.
_FAST_METHODS = ("get", "set", "add", "replace", "incr", "delete", "_contains", "_read")
_getrefcount = getattr(sys, "getrefcount", None)  # CPython; elsewhere, release at once as before


class _State:
    """What the finalizer needs (it must not reference the Cache itself)."""

    def __init__(self, seg: Segment, identity: Identity, client: Client):
        self.seg = seg
        self.identity = identity
        self.client = client
        self.views: list = []
        self.released = False
        #: The Cache's __dict__ (set once the Cache is built): where its C fast
        #: methods live. Not the Cache itself, which must die by refcount.
        self.attrs: dict | None = None
        self.deferred = False  # on_death is waiting for held fast methods to go

    def on_death(self) -> None:
        """The Cache was dropped. Release now, unless one of its C fast methods
        is still referenced: ``Cache(name).get(k)`` drops the Cache before the
        call starts, and ``g = Cache(name).get`` keeps using it. The C methods
        are bound to the core, not to the Cache, so they would find the
        mapping gone; instead the release waits until the last of them is gone.
        """
        if self.deferred and not mp_util.is_exiting():  # both finalizers call this
            return
        held = []
        attrs = self.attrs
        if attrs is not None and _getrefcount is not None:
            for name in _FAST_METHODS:
                m = attrs.get(name)
                # references: attrs, the local `m`, getrefcount's argument
                if m is not None and _getrefcount(m) > 3:
                    held.append(name)
        if not held or mp_util.is_exiting():  # at exit, give the slot back regardless
            self.release()
            return
        self.deferred = True
        _deferred_states.add(self)
        left = [len(held)]

        def one_gone() -> None:
            left[0] -= 1
            if not left[0]:
                self.release()

        for name in held:
            weakref.finalize(attrs.pop(name), one_gone)  # the dict's reference goes; the caller's stays

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        # Views (and the C core) first: from here no thread of ours can take a
        # stripe lock through this handle. Then the client slot, unless a lock
        # word still names it: another thread closed the cache under a writer
        # of this handle. Freeing the slot would make that live writer look
        # dead, and another process would take its stripe over while it still
        # writes; so the slot (and the kernel lock that says we are alive)
        # stays ours until this process exits, and that stripe's waiters time
        # out naming us rather than entering it twice.
        for release in self.views:
            release()
        self.views = []
        mine = self.client.word
        if self.client.fd < 0:
            pass  # a forked child that never got a slot of its own (Cache._disable): nothing is ours
        elif any(int(w) & ~L.LOCK_WAITERS == mine for w in lock_words(self.seg)):
            _kept_clients.append(self.client)
            warnings.warn(
                f"cache {self.seg.name!r} was closed while a thread of this process held one of its "
                "stripes; that stripe stays locked until this process exits",
                RuntimeWarning, stacklevel=3,
            )
        else:
            try:
                release_client(self.seg, self.client)
            except Exception:  # pragma: no cover - best effort at exit; the daemon reaps it
                pass
        self.seg.close()

    def orphan_in_child(self) -> None:
        """In a forked child, for a state whose release was deferred: its client
        slot, fd and lock word are the parent's. Drop the inherited fd (never
        unlock: that would free the parent's slot) and close the views, so a
        fast method still held raises "closed" instead of writing under the
        parent's name."""
        if self.released:
            return
        self.released = True
        self.client.abandon()
        for release in self.views:
            release()
        self.views = []
        self.seg.close()


def _check_ttl(ttl) -> float:
    if ttl is None:
        return 0.0
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    if not ttl > 0 or math.isinf(ttl):
        raise ValueError(f"ttl must be a positive, finite number of seconds or None, got {ttl!r}")
    return float(ttl)


#: A key: ``str`` and ``bytes`` are both stored (``"a"`` and ``b"a"`` are different keys).
Key = Union[str, bytes]
#: A ``ttl=`` argument: seconds, None (never expire), or omitted (``default_ttl``).
TTL = Union[float, None, Any]
T = TypeVar("T")


class Cache(MutableMapping[Any, Any]):
    """A cache shared by every process on this host that opens the same ``name``.

    ``Cache("app", size="256MiB")`` creates the segment ``/shmcache.app`` or
    attaches to it if it exists. Then the existing layout wins: ``size``,
    ``stripes``, ``max_items``, ``max_key_size``, ``max_value_size``,
    ``max_clients``, ``policy`` and ``mode`` given here that differ from it are
    ignored with a :class:`~shmcache.errors.SettingsIgnored` warning (once per
    process) naming each one and its real value, or raise
    :class:`~shmcache.errors.SettingsMismatch` with ``strict=True``. Every
    process may set its own ``default_ttl``, ``lock_timeout``, ``clock`` and
    ``serializer``.

    Args:
        name: 1-64 characters from ``[A-Za-z0-9_.-]``.
        size: bytes of the whole segment: int, or a string like ``"256MiB"``
            (default 64 MiB). All of it is reserved in /dev/shm at creation.
        create: False to attach only (raise CacheNotFound if missing).
        stripes: lock stripes, a power of two (default: one per 4 MiB, 4..64).
        max_items: most entries (default: one per 200 bytes of ``size``).
        max_key_size: most bytes in an encoded key (default 1024).
        max_value_size: most bytes in an encoded value (default: a quarter of a
            stripe's arena).
        max_clients: most processes attached at once (default 512).
        policy: ``"lru"`` evicts least recently used entries when full;
            ``"noeviction"`` raises CacheFull instead.
        mode: permission bits of the segment (default 0o600;
            0o660 to share with the group).
        default_ttl: seconds, used when ``set`` gets no ``ttl`` (None = forever).
        lock_timeout: a dead lock holder is noticed within milliseconds
            whatever this is (its client lock is gone); a live holder is
            waited for up to max(10 x lock_timeout, 5 s) before LockTimeout.
        clock: a ``time.time``-like function; deadlines are absolute values of it.
        serializer: object with ``dumps``/``loads`` used instead of pickle for
            values that are not bytes, str, int, float or numpy arrays.
        strict: raise SettingsMismatch instead of warning when the existing
            cache has other layout settings than the ones given.
        owner: a uid or user name trusted besides this process's own user: the
            segment must belong to one of the two, or the
            attach is refused (UntrustedSegment). On attach, ``mode`` is the
            loosest permission the segment may have.
        allow_pickle: None (default): unpickle only from a cache nobody but
            this user can write (it owns the segment, no group/other write
            bits); a shared cache stores bytes, str, int, float, numpy arrays
            and plain containers of them (list, tuple, dict, set, None, bool)
            and refuses values that would need a class to rebuild. True:
            always full pickle (every writer is trusted). False: never.
            See the README section "Security".

    Raises:
        ValueError / TypeError: a bad name or setting (the message gives the limit).
        CacheNotFound: ``create=False`` and the cache does not exist.
        OutOfSharedMemory: creating the cache would not fit in /dev/shm.
        PermissionDenied: the cache belongs to another user or group.
        SharedMemoryUnavailable: /dev/shm is missing or read-only.
        SettingsMismatch: ``strict=True`` and the existing layout differs.
        LayoutMismatch: the segment is not shmcache's or has another layout version.
        CacheFull: no free client slot (``max_clients`` live processes attached).
        UntrustedSegment: the segment belongs to an untrusted user, grants more
            than ``mode``, or is not a regular file.
    """

    def __init__(
        self,
        name: str,
        size: int | str | None = None,
        *,
        create: bool = True,
        stripes: int | None = None,
        max_items: int | None = None,
        max_key_size: int | None = None,
        max_value_size: int | None = None,
        max_clients: int | None = None,
        policy: str | None = None,
        mode: int | None = None,
        default_ttl: float | None = None,
        lock_timeout: float = 0.5,
        clock: Callable[[], float] = time.time,
        serializer: Any = None,
        init_timeout: float = 5.0,
        strict: bool = False,
        owner: int | str | None = None,
        allow_pickle: bool | None = None,
    ) -> None:
        self._closed = True  # until fully open, so close()/__del__ are safe
        default_ttl = _check_ttl(default_ttl) or None
        lock_timeout = check_seconds("lock_timeout", lock_timeout, maximum=MAX_WAIT)
        init_timeout = check_seconds("init_timeout", init_timeout, maximum=MAX_WAIT)
        if not callable(clock):
            raise TypeError("clock must be a function returning seconds, like time.time")
        if clock is not time.time:
            clock = _finite_clock(clock)
        if allow_pickle is not None and not isinstance(allow_pickle, bool):
            raise TypeError(f"allow_pickle must be True, False or None, not {type(allow_pickle).__name__}")
        codec = Codec(serializer)
        if not USE_SPEEDUPS:
            pure_atomics()  # the pure-Python stripe locks need libatomic: say so before creating anything
        # None = "not given": the default when creating, not compared when attaching.
        given = {k: v for k, v in dict(
            size=size, stripes=stripes, max_items=max_items, max_key_size=max_key_size,
            max_value_size=max_value_size, max_clients=max_clients, policy=policy, mode=mode,
        ).items() if v is not None}
        geometry_args = {**LAYOUT_DEFAULTS, **given}
        mode = geometry_args.pop("mode")
        seg = Segment.open(name, create=create, geometry_args=geometry_args, mode=mode, timeout=init_timeout,
                           owner=owner)
        try:
            if not seg.created:
                _check_settings(name, given, seg.geometry, strict)
        except BaseException:
            seg.close()
            raise
        codec.where = f"cache {name!r}"
        codec.allow_pickle = seg.private if allow_pickle is None else allow_pickle
        if allow_pickle is None and seg.private:
            codec.still_trusted = seg.still_private  # one fstat per full unpickle
        if not seg.private:
            codec.why = "users other than you can write it: see its owner and mode"
        try:
            identity = Identity()
            client = claim_client(seg, identity)
        except BaseException:
            seg.close()
            raise
        g = seg.geometry
        self.name = name
        self._core = None
        self._trust = dict(mode=given.get("mode"), owner=owner, allow_pickle=allow_pickle)
        self._default_ttl = default_ttl
        self.lock_timeout = float(lock_timeout)
        self._clock = clock
        self._codec = codec
        self._decode = codec.decode
        self._encode = codec.encode
        self._seg = seg
        self._g = g
        self._max_key = g.max_key_size
        self._max_value = g.max_value_size
        self._state = _State(seg, identity, client)
        self._ctr = memoryview(seg.mm).cast("Q")
        self._locks = StripeLocks(seg, identity, client, lock_timeout, repair=None)
        self._table = Table(seg, self._locks, clock, self._ctr, self._counter_base(client))
        self._locks.repair = self._table.repair
        self._state.views = [self._table.release_views, self._locks.release_views, self._ctr.release]
        if USE_SPEEDUPS:
            self._core = self._make_core(client, identity)
            self._state.views.insert(0, self._core.release)
            self._locks.attach_core(self._core)
        self._bind()
        self._state.attrs = self.__dict__
        self._finalizer = weakref.finalize(self, _State.on_death, self._state)
        self._register_mp_finalizer()
        mp_util.register_after_fork(self, Cache._register_mp_finalizer)
        self._closed = False
        _live_caches.add(self)

    # -- plumbing -----------------------------------------------------------
    def _counter_base(self, client: Client) -> int:
        return (self._g.client_table_off + client.slot * self._g.client_record_size + L.C_COUNTERS) >> 3

    def _make_core(self, client: Client, identity: Identity):
        g = self._g
        t = self._table
        return _speedups.Core(
            buffer=self._seg.mm, n_stripes=g.n_stripes, sps=g.slots_per_stripe,
            stripe_off=g.stripe_table_off, index_off=g.index_off, arena_off=g.arena_off,
            stripe_arena=g.stripe_arena, client_off=g.client_table_off,
            client_rec=g.client_record_size, client=client.slot, max_key=g.max_key_size,
            max_value=g.max_value_size, cap_items=g.items_per_stripe, refs_off=g.refs_off,
            seg_size=g.seg_size, evicts=t.policy.evicts,
            me=client.word,
            clock=None if self._clock is time.time else self._clock,
            decode=self._decode, encode=self._encode, slow_key=_weak(self, Cache._key), slow_read=t.read_locked,
            slow_write=t.write,
            slow_set=_weak(self, Cache.set), slow_add=_weak(self, Cache.add),
            slow_replace=_weak(self, Cache.replace), slow_incr=_weak(self, Cache.incr),
            slow_delete=_weak(self, Cache.delete), sentinel=_DEFAULT,
            default_ttl=self._default_ttl or 0.0,
        )

    def _bind(self) -> None:
        """Point the hot methods at the C fast paths when they are built.

        The instance attributes shadow the documented methods below, which
        remain the general (slow) path the fast ones fall back to, and the
        whole implementation without the accelerator.
        """
        t = self._table
        self._write = t.write
        cb = t.cbase
        self._i_hits = cb + L.C_HITS
        self._i_misses = cb + L.C_MISSES
        self._i_sets = cb + L.C_SETS
        self._i_deletes = cb + L.C_DELETES
        core = self._core
        if core is not None:
            st = self._state
            core.set_identity(st.client.slot, st.client.word)
            self._read = core.read
            self.get = core.get
            self.set = core.set
            self.add = core.add
            self.replace = core.replace
            self.incr = core.incr
            self.delete = core.delete
            self._contains = core.contains
        else:  # pure Python: the documented methods below are the implementation
            self._read = t.read
            self._contains = _weak(self, Cache._contains_py)

    @property
    def default_ttl(self) -> float | None:
        """Seconds applied by ``set`` when no ``ttl`` is given (None: never expire)."""
        return self._default_ttl

    @default_ttl.setter
    def default_ttl(self, ttl: float | None) -> None:
        self._default_ttl = _check_ttl(ttl) or None
        if self._core is not None:
            self._core.default_ttl = self._default_ttl or 0.0

    def _register_mp_finalizer(self) -> None:
        # multiprocessing children end with os._exit: atexit (and so
        # weakref.finalize) never runs there, only multiprocessing's own
        # finalizers do. Without this a pool worker's client slot would wait
        # to be reaped. The child clears that registry after fork, hence the
        # re-registration through register_after_fork.
        mp_util.Finalize(self, _State.on_death, args=(self._state,), exitpriority=10)

    def _after_fork(self) -> None:
        # The child must never use the parent's client slot: claim its own.
        if self._closed:
            return
        # The inherited client lock is the parent's: drop our reference to it
        # (never unlock it), or the parent would look alive after its death.
        self._state.client.abandon()
        identity = Identity()
        try:
            client = claim_client(self._seg, identity)
        except Exception as e:
            # Sharing the parent's slot would let the parent's exit free it
            # under us and make both processes one holder in lock words: refuse instead.
            warnings.warn(f"shmcache: forked child could not claim a client slot of {self.name!r} ({e}); "
                          "the cache is disabled in this process")
            self._disable(f"cache {self.name!r} is unusable in this forked process: {e}")
            return
        self._state.identity = identity
        self._state.client = client
        self._locks.after_fork(identity, client)
        self._table.set_counter_base(self._counter_base(client))
        self._bind()

    def _key(self, key) -> bytes:
        kb = encode_key(key)
        if len(kb) > self._max_key:
            raise KeyTooLong(
                f"key of {len(kb)} bytes exceeds max_key_size={self._max_key} bytes of cache {self.name!r}"
            )
        return kb

    def _value(self, value):
        flags, vb = self._encode(value)
        if len(vb) > self._max_value:
            raise ValueTooLarge(
                f"value of {len(vb)} bytes (encoded) exceeds max_value_size={self._max_value} bytes "
                f"of cache {self.name!r}; create the cache with a larger max_value_size (an entry lives "
                f"in one arena segment, {self._g.seg_size} bytes here, and each stripe needs at least "
                f"{L.MIN_SEGS} of them: larger values need a larger size or fewer stripes)"
            )
        return flags, vb

    def _deadline(self, ttl) -> float:
        if ttl is _DEFAULT:
            ttl = self.default_ttl
            if ttl is None:
                return 0.0
            return self._clock() + ttl
        t = _check_ttl(ttl)
        return self._clock() + t if t else 0.0

    # -- reads --------------------------------------------------------------
    def get(self, key: Key, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` if absent or expired.

        Raises:
            TypeError: the key is not str or bytes.
            KeyTooLong: the key exceeds ``max_key_size``.
            ValueError: the cache is closed, or a str key is not valid UTF-8.
            LockTimeout: a writer kept the stripe busy and a live process then
                held its lock too long (the lock-free read fell back to it).
            Exception: whatever unpickling (or ``serializer.loads``) raises.
        """
        if type(key) is str:
            kb = key.encode()
            if len(kb) > self._max_key:
                kb = self._key(key)
        else:
            kb = self._key(key)
        r = self._lookup(kb)
        if r is None:
            return default
        flags, val, _exp = r
        if flags == BYTES:
            return val
        if flags == STR:
            return val.decode()
        return self._decode(flags, val)

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        """True if ``key`` is present and unexpired (does not count as a hit).

        Raises:
            TypeError / KeyTooLong / ValueError: as :meth:`get`.
        """
        return self._contains(key)

    def _contains_py(self, key) -> bool:
        r = self._read(self._key(key))
        return r is not None and not (r[2] and r[2] <= self._clock())

    def ttl(self, key: Key) -> float | None:
        """Seconds until ``key`` expires, or None if it never does.

        Raises:
            KeyError: the key is absent or expired.
            TypeError / KeyTooLong / ValueError: as :meth:`get`.
        """
        r = self._read(self._key(key))
        now = self._clock()
        if r is None or (r[2] and r[2] <= now):
            raise KeyError(key)
        return r[2] - now if r[2] else None

    def get_many(self, keys: Iterable[Key]) -> dict[Any, Any]:
        """``{key: value}`` for the keys that are present (absent ones are left out).

        Raises:
            as :meth:`get`, for the first bad key.
        """
        out = {}
        for k in keys:
            v = self.get(k, _MISSING)
            if v is not _MISSING:
                out[k] = v
        return out

    # -- raw entries (for adapters such as shmcache.server) -------------------
    #: Returned by an :meth:`update_raw` function to delete the key.
    DELETE = DELETE

    @property
    def clock(self):
        """The clock deadlines are measured on (``time.time`` unless injected)."""
        return self._clock

    def get_raw(self, key):
        """The stored form of ``key``'s value: ``(tag, payload, expire)``, or None.

        ``tag`` is the codec's type tag (``shmcache.codec.BYTES``, ``STR``,
        ``INT``...), ``payload`` the encoded bytes, ``expire`` the absolute
        deadline on :attr:`clock` (0.0: never). Nothing is decoded or
        unpickled, so an adapter can refuse types it cannot show. Lock-free
        and counted as a hit or miss, like :meth:`get`.

        Raises:
            TypeError / KeyTooLong / ValueError: as :meth:`get`.
        """
        if type(key) is str:  # the adapters' case (a RESP key): what _key does, two calls fewer
            kb = key.encode()
            if len(kb) > self._max_key:
                kb = self._key(key)
        else:
            kb = self._key(key)
        return self._lookup(kb)

    def get_raw_many(self, keys: Iterable[Key]) -> list:
        """``[cache.get_raw(k) for k in keys]`` in one call, at a lower cost
        per key (what a Redis MGET needs): each item ``(tag, payload, expire)``
        or None. Each key is read lock-free on its own, not as a snapshot.

        Raises:
            TypeError / KeyTooLong / ValueError: as :meth:`get`, for the first bad key.
        """
        lookup = self._lookup
        max_key = self._max_key
        out = []
        for k in keys:
            if type(k) is str:
                kb = k.encode()
                if len(kb) > max_key:
                    kb = self._key(k)
            else:
                kb = self._key(k)
            out.append(lookup(kb))
        return out

    def _lookup(self, kb: bytes):
        """(flags, payload, expire) of a live entry, counted as a hit or miss."""
        r = self._read(kb)
        if r is None:
            self._ctr[self._i_misses] += 1
            return None
        flags, val, exp, p, ref = r
        if exp and exp <= self._clock():
            self._ctr[self._i_misses] += 1
            return None
        if not ref:  # second chance; stored only when clear (no store per hit of a hot key)
            self._table.mark(p)
        self._ctr[self._i_hits] += 1
        return flags, val, exp

    def update_raw(self, key, fn):
        """Atomically read-modify-write ``key``'s stored form across processes.

        ``fn(current)`` gets ``(tag, payload, expire)`` as :meth:`get_raw`
        gives it, or None if the key is absent or expired, and returns:
        None to change nothing, ``Cache.DELETE`` to delete the key, or a new
        ``(tag, payload, expire)`` to store (``expire`` absolute on
        :attr:`clock`, 0.0 = never; ``tag`` one the codec decodes). It runs
        holding the key's stripe lock, so it must be quick and must not use
        the cache; if it raises, nothing changes. Returns what ``fn`` returned.

        This is the one primitive behind Redis' read-modify-write commands
        (APPEND, SETRANGE, GETSET, SET ... GET/KEEPTTL, EXPIRE NX/XX/GT/LT...).

        Raises:
            TypeError / KeyTooLong / ValueError: bad key as :meth:`get`; ``fn``
                returned a bad tag or a payload that is not bytes.
            ValueTooLarge: the new payload exceeds ``max_value_size``.
            CacheFull / LockTimeout: as :meth:`set`.
            whatever ``fn`` raises.
        """
        kb = self._key(key)
        max_value = self._max_value
        changed = []

        def checked(cur):
            new = fn(cur)
            if new is None:
                return None
            if new is DELETE:
                changed.append(cur is not None)
                return new
            tag, payload, expire = new
            if not (isinstance(tag, int) and BYTES <= tag <= CUSTOM) or isinstance(tag, bool):
                raise ValueError(f"update_raw: unknown value type tag {tag!r}")
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise TypeError(f"update_raw: payload must be bytes, not {type(payload).__name__}")
            if len(payload) > max_value:
                self._value(payload)  # raises ValueTooLarge with the full message
            if not isinstance(expire, (int, float)) or not expire >= 0 or math.isinf(expire):
                raise ValueError(f"update_raw: expire must be an absolute deadline >= 0, got {expire!r}")
            changed.append(True)
            return tag, payload, float(expire)

        out = self._table.update(kb, checked)
        if changed:
            self._ctr[self._i_deletes if out is DELETE else self._i_sets] += changed[0]
        return out

    def scan(self, cursor: int = 0, count: int = 10) -> tuple[int, list]:
        """Iterate the keys in steps, as Redis' SCAN: ``(next_cursor, keys)``.

        Start with cursor 0 and call again with the returned cursor until it
        is 0. A key present from the first call to the last is returned at
        least once, whatever is written meanwhile (keys are visited stripe by
        stripe in the order of a hash of the key, and the cursor is the
        position in that order, not in the table); a key written or deleted
        meanwhile may or may not be. ``count`` is a hint: a step returns about
        that many keys, more when keys share a hash position. Each step reads
        one stripe's key list (at most ``max_items / stripes`` keys).

        Raises:
            ValueError: a cursor this cache did not hand out; the cache is closed.
        """
        self._check_open()
        if isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
            raise ValueError(f"invalid scan cursor {cursor!r}")
        s, pos = divmod(cursor - 1, 1 << 32) if cursor else (0, 0)  # 0 is "start" and "done"
        t = self._table
        if s >= t.n_stripes:
            raise ValueError(f"invalid scan cursor {cursor!r}")
        count = max(1, int(count))
        out = []
        while s < t.n_stripes:
            now = self._clock()
            keyed = sorted((key_hash(kb) >> 32, kb) for kb in t.keys_of(s, now))
            for i, (h, kb) in enumerate(keyed):
                if h < pos:
                    continue
                if len(out) >= count and h != keyed[i - 1][0]:
                    return (s << 32) + h + 1, out
                out.append(decode_key(kb))
            s += 1
            pos = 0
            if len(out) >= count:
                break
        return (0 if s >= t.n_stripes else (s << 32) + 1), out

    # -- writes -------------------------------------------------------------
    def set(self, key: Key, value: Any, ttl: TTL = _DEFAULT) -> bool:
        """Store ``value`` under ``key``, expiring after ``ttl`` seconds
        (``None``: never; default: the cache's ``default_ttl``). Returns True.

        Everything is checked before the first byte is written: a failed set
        leaves the cache as it was.

        Raises:
            TypeError: bad key type, unpicklable value, bad ttl type.
            ValueError: ttl not positive.
            KeyTooLong / ValueTooLarge: over ``max_key_size`` / ``max_value_size``.
            CacheFull: policy ``"noeviction"`` and no room.
            LockTimeout: a live process kept the stripe locked too long.
        """
        kb = self._key(key)
        flags, vb = self._value(value)
        stored = self._write(kb, flags, vb, self._deadline(ttl), SET)
        self._ctr[self._i_sets] += 1
        return stored

    def __setitem__(self, key, value) -> None:
        self.set(key, value)

    def add(self, key: Key, value: Any, ttl: TTL = _DEFAULT) -> bool:
        """Store only if ``key`` is absent (or expired). Returns whether it stored.
        Atomic across processes. Raises as :meth:`set`."""
        kb = self._key(key)
        flags, vb = self._value(value)
        stored = self._write(kb, flags, vb, self._deadline(ttl), ADD)
        if stored:
            self._ctr[self._i_sets] += 1
        return stored

    def replace(self, key: Key, value: Any, ttl: TTL = _DEFAULT) -> bool:
        """Store only if ``key`` is present. Returns whether it stored. Raises as :meth:`set`."""
        kb = self._key(key)
        flags, vb = self._value(value)
        stored = self._write(kb, flags, vb, self._deadline(ttl), REPLACE)
        if stored:
            self._ctr[self._i_sets] += 1
        return stored

    def set_many(self, mapping: Mapping[Any, Any] | Iterable[tuple[Any, Any]], ttl: TTL = _DEFAULT) -> None:
        """Store every item of ``mapping`` (each stripe locked once).

        All keys and values are encoded and checked first, so bad input stores
        nothing. Each key is stored atomically; the batch as a whole is not.

        Raises:
            as :meth:`set`.
        """
        expire = self._deadline(ttl)
        items = mapping.items() if hasattr(mapping, "items") else mapping
        entries = []
        for k, v in items:
            flags, vb = self._value(v)
            entries.append((self._key(k), flags, vb, expire))
        self._table.write_many(entries)
        self._ctr[self._i_sets] += len(entries)

    def update(self, other: Any = (), /, **kw: Any) -> None:
        """dict.update: store every item (no ttl beyond ``default_ttl``).

        Raises:
            as :meth:`set_many`.
        """
        self.set_many(dict(other, **kw))

    def delete(self, key: Key) -> bool:
        """Remove ``key``. Returns True if it was present (and unexpired).

        Raises:
            TypeError / KeyTooLong / ValueError: as :meth:`get`.
            LockTimeout: a live process kept the stripe locked too long.
        """
        done = self._table.delete(self._key(key))
        if done:
            self._ctr[self._i_deletes] += 1
        return done

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def delete_many(self, keys: Iterable[Key]) -> int:
        """Remove every key in ``keys`` (each stripe locked once); returns how
        many were present. Every key is checked before any is removed.

        Raises:
            as :meth:`delete`.
        """
        n = self._table.delete_many([self._key(k) for k in keys])
        self._ctr[self._i_deletes] += n
        return n

    def pop(self, key: Key, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value (atomically); ``default`` if absent.

        Raises:
            KeyError: absent and no default given.
            TypeError / KeyTooLong / ValueError: as :meth:`get`.
            LockTimeout: a live process kept the stripe locked too long.
        """
        # Decoded before it is removed (under the stripe lock): a value this
        # process cannot decode (a class it lacks, a refused pickle) stays.
        try:
            r = self._table.pop(self._key(key), decode=_Decoded.of(self._decode))
        except Undecodable as e:
            raise e.__cause__ from None
        if r is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        self._ctr[self._i_deletes] += 1
        return r.value

    def setdefault(self, key: Key, default: Any = None) -> Any:
        """``cache[key]`` if present, else store ``default`` (atomically, via add) and return it.

        Raises:
            as :meth:`get` and :meth:`add`.
        """
        while True:
            v = self.get(key, _MISSING)
            if v is not _MISSING:
                return v
            if self.add(key, default):
                return default

    def incr(self, key: Key, delta: int = 1, default: int | None = 0, ttl: float | None = None) -> int:
        """Add ``delta`` to the int under ``key`` atomically across processes; return the result.

        A missing key starts at ``default`` (None: raise KeyError) and gets
        ``ttl`` (seconds; handy for rate-limit windows); an existing key keeps
        its expiry.

        Raises:
            KeyError: missing key and ``default`` is None.
            TypeError: the stored value (or ``delta``) is not an int.
        """
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta must be an int, not {type(delta).__name__}")
        if default is not None and (isinstance(default, bool) or not isinstance(default, int)):
            raise TypeError(f"default must be an int or None, not {type(default).__name__}")
        kb = self._key(key)
        expire = self._deadline(ttl)
        try:
            value = self._table.incr(kb, delta, default, expire, encode_int)
        except KeyError:
            raise KeyError(key) from None
        self._ctr[self._i_sets] += 1
        return value

    def decr(self, key: Key, delta: int = 1, default: int | None = 0, ttl: float | None = None) -> int:
        """Subtract ``delta`` atomically; see :meth:`incr`."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"delta must be an int, not {type(delta).__name__}")
        return self.incr(key, -delta, default, ttl)

    def touch(self, key: Key, ttl: float | None = None) -> bool:
        """Give ``key`` a new ttl (None: never expire). False if absent or expired.

        Raises:
            TypeError / ValueError: a bad ttl (see :meth:`set`), a bad key (see :meth:`get`).
            KeyTooLong: the key exceeds ``max_key_size``.
            LockTimeout: a live process kept the stripe locked too long.
        """
        return self._table.touch(self._key(key), self._deadline(ttl))

    def expire(self, key: Key, ttl: float) -> bool:
        """Redis' EXPIRE: ``key`` expires ``ttl`` seconds from now. False if absent.

        Raises:
            ValueError: ttl is not a positive number.
            TypeError: ttl is not a number.
            as :meth:`touch` otherwise.
        """
        if ttl is None:
            raise ValueError("expire needs a ttl in seconds; use touch(key, None) to remove an expiry")
        return self.touch(key, ttl)

    def persist(self, key: Key) -> bool:
        """Remove ``key``'s expiry (Redis' PERSIST). False if absent.

        Raises:
            as :meth:`touch`.
        """
        return self.touch(key, None)

    def get_or_set(self, key: Key, factory: Callable[[], T], ttl: TTL = _DEFAULT, *, timeout: float = 10.0) -> T:
        """``cache[key]`` if present; otherwise compute ``factory()`` once across
        all processes, store it with ``ttl`` and return it.

        Concurrent callers wait for the one computing (at most ``timeout``
        seconds, then they compute themselves); if it dies, one takes over.
        See :mod:`shmcache.stampede`.

        Raises:
            whatever ``factory`` raises; otherwise as :meth:`set`.
        """
        return stampede.get_or_set(self, key, factory, ttl, timeout)

    def memoize(self, ttl: TTL = _DEFAULT, typed: bool = False, *, timeout: float = 10.0) -> Any:
        """Decorator caching a function's results across processes (via
        :meth:`get_or_set`); the wrapper has ``cache_clear()`` and
        ``invalidate(*args)``. See :func:`shmcache.stampede.memoize`.

        Raises:
            TypeError: at call time, an argument cannot be turned into a key.
        """
        return stampede.memoize(self, ttl, typed, timeout)

    def clear(self) -> int:
        """Remove every entry (each stripe under its lock). Returns how many were dropped.

        Raises:
            ValueError: the cache is closed.
            LockTimeout: a live process kept a stripe locked too long.
        """
        return self._table.clear()

    # -- iteration ----------------------------------------------------------
    def keys(self) -> list[Any]:  # type: ignore[override]  # a list, not a view
        """A list of the live keys (each stripe read consistently; the whole is a
        point-in-time view, not a snapshot across stripes).

        Raises:
            ValueError: the cache is closed.
        """
        self._check_open()
        now = self._clock()
        t = self._table
        return [decode_key(kb) for s in range(t.n_stripes) for kb in t.keys_of(s, now)]

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        """A list of ``(key, value)`` pairs, consistent per stripe.

        Raises:
            ValueError: the cache is closed.
            Exception: whatever unpickling (or ``serializer.loads``) raises.
        """
        self._check_open()
        now = self._clock()
        t = self._table
        dec = self._decode
        return [
            (decode_key(kb), dec(flags, vb))
            for s in range(t.n_stripes)
            for kb, flags, vb, exp, _ref, _age in t.stripe_records(s)
            if not (exp and exp <= now)
        ]

    def values(self) -> list[Any]:  # type: ignore[override]
        """A list of the live values.

        Raises:
            as :meth:`items`.
        """
        return [v for _k, v in self.items()]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys())

    def __len__(self) -> int:
        """Live, unexpired entries right now (a vectorised scan of the index).

        Raises:
            ValueError: the cache is closed.
        """
        self._check_open()
        return self._table.count(self._clock())

    # -- management ---------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters and fill: hits, misses, sets, deletes, evictions, expirations
        (all processes, including ones that exited), items, bytes used and
        free, per-stripe fill, lock waits (``lock_waits``,
        ``lock_wait_seconds``, ``lock_wait_max_seconds`` and per stripe
        ``stripe_lock_waits`` / ``stripe_lock_wait_seconds``), attached
        clients and daemon status.

        Raises:
            ValueError: the cache is closed.
        """
        self._check_open()
        g = self._g
        out: dict = admin.counters(self)
        del out["recoveries"]  # placed below, with the fill figures
        fill = admin.stripes(self)
        used = sum(x.bytes_used for x in fill)
        arena = g.stripe_arena * g.n_stripes
        lookups = out["hits"] + out["misses"]
        d = admin.daemon_info(self)
        last = d.last_snapshot
        out.update(
            name=self.name,
            layout_version=L.LAYOUT_VERSION,
            size=g.total_size,
            stripes=g.n_stripes,
            policy=L.POLICY_NAMES[g.policy],
            max_items=g.max_items,
            max_key_size=g.max_key_size,
            max_value_size=g.max_value_size,
            items=sum(x.items for x in fill),
            bytes_used=used,
            bytes_free=arena - used,
            bytes_garbage=sum(x.bytes_garbage for x in fill),
            arena_bytes=arena,
            hit_rate=(out["hits"] / lookups) if lookups else 0.0,
            stripe_fill=[round(x.fill, 4) for x in fill],
            recoveries=sum(x.recoveries for x in fill),
            lock_wait_seconds=sum(x.lock_wait_seconds for x in fill),
            lock_wait_max_seconds=max((x.lock_wait_max_seconds for x in fill), default=0.0),
            stripe_lock_waits=[x.lock_waits for x in fill],
            stripe_lock_wait_seconds=[x.lock_wait_seconds for x in fill],
            clients=sum(1 for c in admin.clients(self) if c.alive),
            generation=L.U64.unpack_from(self._seg.mm, L.H_GENERATION)[0],
            daemon_pid=d.pid,
            daemon_alive=d.alive,
            daemon_heartbeat_age=d.heartbeat_age,
            daemon_snapshot_path=d.snapshot_path,
            last_snapshot_time=last.time if last else None,
            last_snapshot_ok=last.ok if last else None,
            last_snapshot_entries=last.entries if last and last.ok else None,
            last_snapshot_error=last.error if last else None,
        )
        return out

    def check(self) -> list[str]:
        """Integrity check of every stripe (checksums, index reachability,
        segment entry chains, accounting), each under its lock. Returns the problems found; empty
        means sound.

        Raises:
            ValueError: the cache is closed.
            LockTimeout: a live process kept a stripe locked too long.
        """
        return admin.check(self)

    def _stuck_odd_version(self, s: int) -> int | None:
        """The stripe's version if it is odd while its lock is free, else None.

        A writer takes the lock word before it makes the version odd and makes
        it even before it frees the word, so an odd version that stays the same
        across a read of a free word was left by damage, not by a writer."""
        off = (self._g.stripe_table_off + s * L.STRIPE_SIZE + L.S_VERSION) >> 3
        v = self._ctr[off]
        if not v & 1:
            return None
        free = self._locks.word(s) == 0
        return v if free and self._ctr[off] == v else None

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"cache {self.name!r} is closed")

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _disable(self, message: str) -> None:
        """Make every operation raise ValueError(message), without touching the
        segment (used in a forked child that has no client slot of its own)."""

        def refuse(*_a, **_k):
            raise ValueError(message)

        self._closed = True
        _live_caches.discard(self)
        self._finalizer.detach()
        self._read = self._write = self.get = self.set = self.add = self.replace = refuse
        self.incr = self.delete = self._contains = refuse
        self._table = _Closed(refuse)

    def close(self) -> None:
        """Detach: give back this process's client slot and unmap. Idempotent.
        The cache itself stays for other processes; see :meth:`unlink`."""
        if self._closed:
            return
        self._closed = True
        _live_caches.discard(self)
        self._finalizer.detach()
        self._state.release()  # now, even if someone holds a fast method: it raises "closed"

        def closed(*_a, **_k):
            raise ValueError(f"cache {self.name!r} is closed")

        self._read = self._write = self.get = self.set = self.add = self.replace = self.incr = self.delete = self._contains = closed
        self._table = _Closed(closed)

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._g.total_size} bytes, {self._g.n_stripes} stripes"
        return f"<shmcache.Cache {self.name!r} ({state})>"

    def __reduce__(self):
        # Pickled (e.g. to a spawned process): the receiver attaches by name.
        return (_attach, (self.name, self.default_ttl, self.lock_timeout, self._trust))

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other

    @staticmethod
    def unlink(name: str) -> bool:
        """Destroy the cache ``name``: its segment. True if anything was removed.

        Processes still attached keep working on their mapping until they close
        it; new ones get a fresh, empty cache.

        Raises:
            ValueError / TypeError: bad name.
        """
        return Segment.unlink(name)

    @staticmethod
    def list() -> list[str]:
        """Names of the caches on this host."""
        return Segment.list_names()


#: Layout settings used when a cache is created without them.
LAYOUT_DEFAULTS = dict(size="64MiB", max_key_size=1024, max_clients=512, policy="lru", mode=0o600)

_warned_settings: set = set()


def _check_settings(name: str, given: dict, g: L.Geometry, strict: bool) -> None:
    """Warn (once per process) or, with ``strict``, raise SettingsMismatch when
    layout settings given to an attaching Cache differ from the segment's."""
    diffs = []
    if "size" in given and not _lays_out_as(L.parse_size(given["size"]), g):
        diffs.append(("size", given["size"], f"{g.total_size} bytes"))
    if "max_items" in given:
        n = g.n_stripes
        if -(-given["max_items"] // n) * n != g.max_items:
            diffs.append(("max_items", given["max_items"], str(g.max_items)))
    real = dict(stripes=g.n_stripes, max_key_size=g.max_key_size, max_value_size=g.max_value_size,
                max_clients=g.max_clients, policy=L.POLICY_NAMES.get(g.policy))
    for k, v in real.items():
        if k in given and given[k] != v:
            diffs.append((k, given[k], repr(v)))
    if "mode" in given and (given["mode"] & 0o777) != (g.mode & 0o777):
        diffs.append(("mode", f"0o{given['mode']:o}", f"0o{g.mode & 0o777:o}"))
    if not diffs:
        return
    what = ", ".join(f"{k}={a!r} (it has {b})" for k, a, b in diffs)
    msg = (f"cache {name!r} already exists with another layout, which wins: {what}; to change it, "
           f"remove the cache (shmcache rm {name}) and create it again (a snapshot keeps the entries: "
           "shmcache snapshot, rm, restore --size)")
    if strict:
        raise SettingsMismatch(msg)
    key = (name, g.created, tuple(diffs))
    if key not in _warned_settings:
        _warned_settings.add(key)
        warnings.warn(msg, SettingsIgnored, stacklevel=3)


def _lays_out_as(size: int, g: L.Geometry) -> bool:
    """Whether a segment created with ``size`` and this one's other settings
    would be this one: the creator cuts each stripe's arena into whole
    segments, so the segment is up to a segment per stripe smaller than the
    size asked for, and that is still the same size."""
    try:
        want = L.compute_geometry(
            size, stripes=g.n_stripes, max_items=g.max_items, max_key_size=g.max_key_size,
            max_value_size=g.max_value_size, max_clients=g.max_clients,
        )
    except ValueError:
        return False
    return want.total_size == g.total_size


def _finite_clock(clock):
    """``clock`` checked on every call: a NaN or infinite time would make every
    deadline unreachable (keys that never expire), so it raises instead."""

    def now() -> float:
        t = clock()
        if not math.isfinite(t):
            raise ValueError(f"the cache's clock returned {t!r}; it must return finite seconds like time.time")
        return t

    now.__wrapped__ = clock
    return now


def _weak(cache: "Cache", method):
    """``method`` bound to ``cache`` through a weak reference.

    The fast paths stored on the instance must not hold the Cache strongly:
    the cycle would leave a dropped Cache to the cyclic GC, and a process
    that exits with os._exit (multiprocessing children) would never give
    its client slot back.
    """
    ref = weakref.ref(cache)
    attrs = cache.__dict__

    def call(*args, **kwargs):
        c = ref()
        if c is None:  # a fast method outlived its Cache (see _State.on_death): same state, new face
            c = object.__new__(Cache)
            c.__dict__ = attrs
        return method(c, *args, **kwargs)

    return call


class _Decoded:
    """A decoded value, told apart from pop's None (absent) even when it is None."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    @staticmethod
    def of(decode):
        return lambda flags, vb: _Decoded(decode(flags, vb))


class _Closed:
    """Stands in for the table of a closed Cache: any use raises ValueError."""

    def __init__(self, fn):
        self._fn = fn

    def __getattr__(self, _name):
        self._fn()


def _attach(name, default_ttl, lock_timeout, trust=None):
    return Cache(name, create=False, default_ttl=default_ttl, lock_timeout=lock_timeout, **(trust or {}))


def _after_fork_in_child() -> None:
    for client in _kept_clients:  # the parent's liveness locks: the child must not keep them alive
        client.abandon()
    _kept_clients.clear()
    for st in list(_deferred_states):
        st.orphan_in_child()
    for c in list(_live_caches):
        c._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
