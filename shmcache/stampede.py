"""Stampede protection: ``get_or_set`` runs the factory once across processes.

When a popular key expires, every worker that asks for it at that moment
would recompute it (a "cache stampede" or "dog-pile"). ``get_or_set`` lets one
caller compute while the others wait for its value:

1. ``get(key)``: a hit returns at once (the only cost on the hot path).
2. A miss tries ``add(lock_key, owner_record, ttl=timeout)``. ``add`` is
   atomic across processes, so exactly one caller becomes the *owner*. It
   re-checks the key (someone may have stored it between 1 and 2), calls the
   factory, stores the value with ``set`` and deletes the lock entry.
3. Everyone else polls the key with a short backoff (2 ms growing to 50 ms).
   Between polls a waiter looks at the lock entry: the owner record is the
   owner's client slot in this cache and that slot's generation (+ a random
   token per call, so threads of one process are told apart). If the owner
   is gone (its slot's kernel lock is free: :func:`shmcache.admin.client_attached`,
   the same test the stripe locks use), the waiters take over instead of
   waiting for the lock entry to expire: one of them wins a per-owner *takeover* key
   (``add`` again, so exactly one), swaps the dead record for its own and
   computes. If the lock entry disappears without a value (the owner's
   factory raised), the next ``add`` decides a new owner.
4. A waiter never waits longer than ``timeout`` seconds: then it computes the
   value itself and stores it (the owner may be alive but stuck). The lock
   entry has the same ttl, so a stuck owner blocks newcomers no longer.

Rejected alternatives: a semaphore or fcntl lock per key (unbounded numbers of
kernel objects, and a semaphore is not released when its holder dies);
holding a stripe lock during the factory (blocks every key of the stripe);
pid + process start time as the owner (used before: meaningless across PID
namespaces, so a waiter in a sidecar container judged a live owner dead and
ran the factory a second time, and it needs a readable /proc).

The lock and takeover entries are ordinary keys named
``__shmcache.sf:<128-bit hash>`` (at most 48 characters whatever the key's
length); they live at most ``timeout`` seconds.

``memoize`` builds on ``get_or_set``: the key is the function's module and
qualified name plus a stable digest of its arguments (xxh3-128 over a
canonical encoding, never Python's per-process ``hash()``), so every process
computes the same key for the same call.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import pickle
import random
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import xxhash

from . import admin
from ._durations import MAX_SECONDS, check_seconds
from ._sentinels import DEFAULT_TTL as _DEFAULT
from .codec import encode_key

#: Seconds a waiter waits for another process's factory before computing the
#: value itself; also the ttl of the lock entry.
DEFAULT_TIMEOUT = 10.0

#: Polling backoff of a waiter: first sleep, growth factor, longest sleep (s).
#: At most 1 / 0.002 polls in the first few ms, then 20 per second: each poll
#: is one lock-free read plus, for the lock entry, one fcntl (is its owner's
#: client slot still locked, see _owner_alive).
POLL_FIRST = 0.002
POLL_GROWTH = 1.5
POLL_MAX = 0.05

LOCK_PREFIX = "__shmcache.sf:"
MEMO_PREFIX = "shmcache.memoize:"

# Who computes a key: a format tag (4s), the owner's client slot (I) and its
# generation (I) in this cache (what liveness is judged by), its pid as it
# sees itself (q, for people only: another PID namespace numbers it
# differently) and a random token per call (8s).
_OWNER = struct.Struct("<4sIIq8s")
_OWNER_TAG = b"sfo2"
_MISSING = object()


def _owner_record(cache) -> bytes:
    slot, gen = admin.current_client(cache)
    return _OWNER.pack(_OWNER_TAG, slot, gen, os.getpid(), os.urandom(8))


def lock_key(key) -> str:
    """The name of the lock entry that guards the computation of ``key``.

    Raises:
        TypeError: ``key`` is neither str nor bytes.
    """
    return LOCK_PREFIX + xxhash.xxh3_128_hexdigest(encode_key(key))


#: The longest stampede timeout (seconds; as the daemon's intervals): a
#: waiter's deadline, so 1e300 would mean "wait forever".
MAX_TIMEOUT = MAX_SECONDS


def check_timeout(timeout, label: str = "timeout") -> float:
    """``timeout`` as seconds: a positive finite number, at most MAX_TIMEOUT.

    Raises:
        TypeError / ValueError: anything else, naming ``label``.
    """
    return check_seconds(label, timeout, maximum=MAX_TIMEOUT)


def _owner_alive(cache, record) -> bool:
    """False only if the kernel says the owner in ``record`` is gone."""
    if not isinstance(record, bytes) or len(record) != _OWNER.size or record[:4] != _OWNER_TAG:
        return True  # not ours to judge (an older version's record): let it expire by its ttl
    _tag, slot, gen, _pid, _token = _OWNER.unpack(record)
    if (slot, gen) == admin.current_client(cache):
        return True  # a thread of this very process: alive by definition
    return admin.client_attached(cache, slot, gen)


def _release(cache, lkey: str, record: bytes) -> None:
    # Delete the lock entry only if it is still ours: after our ttl ran out
    # another caller may own it now. (get + delete is not one atomic step;
    # the window only exists once the lock has outlived its ttl.)
    try:
        if cache.get(lkey) == record:
            cache.delete(lkey)
    except Exception:  # pragma: no cover - never mask the factory's outcome
        pass


def _check_value(v):
    """Refuse what a sync factory must not return: an awaitable (it would be
    pickled, or fail to be, instead of awaited)."""
    if inspect.isawaitable(v):
        if inspect.iscoroutine(v):
            v.close()  # no "never awaited" warning on top of the error
        raise TypeError(
            "factory returned an awaitable; with an async factory or an async def, use "
            "`await shmcache.aio.AsyncCache(cache).get_or_set(...)` or its memoize"
        )
    return v


def _compute_as_owner(cache, key, factory, ttl, lkey: str, record: bytes):
    try:
        v = cache.get(key, _MISSING)
        if v is not _MISSING:
            return v
        v = _check_value(factory())
        cache.set(key, v, ttl)
        return v
    finally:
        _release(cache, lkey, record)


def _take_over(cache, lkey: str, dead: bytes, record: bytes, timeout: float) -> bool:
    """Replace the dead owner's record ``dead`` by ours. True if we own the lock now."""
    # Only one waiter per dead owner may do the swap, or two of them could
    # each pop-and-add and both believe they own the lock. The takeover entry
    # is left to expire (ttl ``timeout``) rather than deleted: a waiter that
    # read the dead record just before the swap must not get a second turn.
    tkey = LOCK_PREFIX + "t:" + xxhash.xxh3_128_hexdigest(lkey.encode() + dead)
    if not cache.add(tkey, record, ttl=timeout):
        return False
    popped = cache.pop(lkey, None)
    if popped is None:  # expired or released meanwhile: plain contest
        return cache.add(lkey, record, ttl=timeout)
    if popped != dead:  # replaced meanwhile (only possible after its ttl): give it back
        cache.add(lkey, popped, ttl=timeout)
        return False
    return cache.add(lkey, record, ttl=timeout)


def get_or_set(cache, key, factory, ttl=_DEFAULT, timeout: float = DEFAULT_TIMEOUT):
    """``cache[key]`` if present; otherwise compute ``factory()`` once across
    every process, store it with ``ttl`` and return it.

    Concurrent callers for the same missing key wait for the one computing it
    and return its value. If that process dies, a waiter takes over at once;
    a waiter never waits more than ``timeout`` seconds (then it computes and
    stores the value itself). A cached ``None`` is a hit, not a miss.

    Args:
        cache: an open :class:`shmcache.Cache`.
        key: str or bytes.
        factory: callable with no arguments returning the value.
        ttl: seconds the value lives (None: forever; default: the cache's
            ``default_ttl``).
        timeout: seconds to wait for another process's factory (and the ttl of
            the lock entry).

    Raises:
        Whatever ``factory`` raises (in the caller that ran it; waiters then
        retry, and one of them runs its own factory).
        TypeError / ValueError: bad key, ttl or timeout.
        KeyTooLong / ValueTooLarge / CacheFull: as :meth:`Cache.set`.
    """
    v = cache.get(key, _MISSING)
    if v is not _MISSING:
        return v
    steps = _contest(cache, key, factory, timeout)
    try:
        while True:
            what, arg = next(steps)
            if what is _SLEEP:
                time.sleep(arg)
            elif what is _OWN:
                return _compute_as_owner(cache, key, factory, ttl, *arg)
            else:  # _ALONE: the owner is alive but slow (or stuck): do not wait longer
                v = _check_value(factory())
                cache.set(key, v, ttl)
                return v
    except StopIteration as stop:
        return stop.value


_SLEEP, _OWN, _ALONE, _DONE = "sleep", "own", "alone", "done"


def _contest(cache, key, factory, timeout):
    """The waiting protocol of get_or_set, free of any way to sleep or call the
    factory, so the threaded and the asyncio callers share it. A generator
    yielding ``(_SLEEP, seconds)`` (sleep, then resume it), ``(_OWN, (lkey,
    record))`` (this caller computes, holding the lock entry) or ``(_ALONE,
    None)`` (timed out: compute without it); it returns the value when
    another caller stored it."""
    if not callable(factory):
        raise TypeError(f"factory must be callable, not {type(factory).__name__}")
    timeout = check_timeout(timeout)
    lkey = lock_key(key)
    record = _owner_record(cache)
    deadline = time.monotonic() + timeout
    while True:
        if cache.add(lkey, record, ttl=timeout):
            yield _OWN, (lkey, record)
            return None  # pragma: no cover - the driver never resumes after _OWN
        delay = POLL_FIRST
        while True:
            if time.monotonic() >= deadline:
                yield _ALONE, None
                return None  # pragma: no cover
            yield _SLEEP, min(delay, max(0.0, deadline - time.monotonic())) * random.uniform(0.8, 1.2)
            delay = min(delay * POLL_GROWTH, POLL_MAX)
            if key in cache:  # does not count as a hit; the get below does
                v = cache.get(key, _MISSING)
                if v is not _MISSING:
                    return v
            owner = cache.get(lkey, _MISSING)
            if owner is _MISSING:
                break  # released without a value (factory raised) or expired: contest again
            if not _owner_alive(cache, owner):
                if _take_over(cache, lkey, owner, record, timeout):
                    yield _OWN, (lkey, record)
                    return None  # pragma: no cover


async def _await_value(factory):
    """Run ``factory``: awaited if it is async (or returns an awaitable); a
    plain function runs in a worker thread, so a slow one (a database call)
    does not stall the event loop."""
    if inspect.iscoroutinefunction(factory):
        return await factory()
    v = await asyncio.to_thread(factory)
    if inspect.isawaitable(v):
        v = await v
    return v


#: Threads of the executor the asyncio path writes in (per process). Its own,
#: not the loop's default one: that one runs the sync factories, and a few
#: slow ones must not hold up every other caller's microsecond-long polls.
AIO_THREADS = 4
_aio_executor: tuple[int, ThreadPoolExecutor] | None = None
_aio_executor_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """This process's executor for the asyncio path's writes (made anew in a
    forked child: the parent's threads do not exist there)."""
    global _aio_executor
    made = _aio_executor
    if made is None or made[0] != os.getpid():
        with _aio_executor_lock:
            made = _aio_executor
            if made is None or made[0] != os.getpid():
                made = _aio_executor = (os.getpid(), ThreadPoolExecutor(AIO_THREADS, "shmcache-aio"))
    return made[1]


def _in_thread(fn, *args) -> asyncio.Future:
    """``fn(*args)`` in :func:`_executor`: a bare future (asyncio.run's teardown
    cancels tasks, not this), so a write once started always finishes."""
    return asyncio.get_running_loop().run_in_executor(_executor(), fn, *args)


def _step(steps):
    """``next(steps)``, with the generator's return as ``(_DONE, value)``: a
    StopIteration cannot cross from a worker thread into an asyncio future."""
    try:
        return next(steps)
    except StopIteration as stop:
        return _DONE, stop.value


async def _next_step(cache, steps):
    """One step of the contest, in a worker thread (it may write the lock
    entry, so it may wait for a stripe's lock)."""
    step = _executor().submit(_step, steps)
    try:
        return await asyncio.shield(asyncio.wrap_future(step))
    except asyncio.CancelledError:
        # The step runs on in its thread. If it makes this caller the owner,
        # that thread gives the lock entry back at once, loop or no loop (the
        # caller's loop may be closed by then: asyncio.run returned), instead
        # of leaving every waiter to wait out its ttl.
        if step.done():  # (a callback added now would run here, on the loop)
            _executor().submit(_release_if_owned, cache, step)
        else:
            step.add_done_callback(functools.partial(_release_if_owned, cache))
        raise


def _release_if_owned(cache, step) -> None:
    if not step.cancelled() and step.exception() is None:
        what, arg = step.result()
        if what is _OWN:
            _release(cache, *arg)


async def aget_or_set(cache, key, factory, ttl=_DEFAULT, timeout: float = DEFAULT_TIMEOUT):
    """:func:`get_or_set` for asyncio: the same protocol across processes (and
    with synchronous callers), but waiting is ``asyncio.sleep`` and the factory
    is awaited (async) or run in a thread (sync), so the event loop never
    blocks on another caller's computation. Cancelling the caller that
    computes releases the lock entry: a waiter then computes.

    A hit is one lock-free read on the loop. On a miss, every step of the
    protocol (the lock entry's add, the polls, a takeover, the store, the
    release) runs in a worker thread: a write waits for its stripe's lock,
    and for ``lock_timeout`` (0.5 s) before recovering a stripe whose holder
    died, and that wait must not stall the loop. It costs a few thread hops
    (tens of microseconds each) per miss, next to a factory worth caching.
    (The hit's read waits too in one case, as every reader does: when the
    writer of its stripe died mid-write, until the stripe is recovered.)

    Raises:
        as :func:`get_or_set`.
    """
    v = cache.get(key, _MISSING)
    if v is not _MISSING:
        return v
    steps = _contest(cache, key, factory, timeout)
    while True:
        what, arg = await _next_step(cache, steps)
        if what is _SLEEP:
            await asyncio.sleep(arg)
        elif what is _DONE:
            return arg
        elif what is _OWN:
            lkey, record = arg
            try:
                v = await _in_thread(cache.get, key, _MISSING)
                if v is _MISSING:
                    v = await _await_value(factory)
                    await _in_thread(cache.set, key, v, ttl)
                return v
            finally:
                # shielded: a second cancel must not drop the release (a thread
                # not yet started would never run; the lock entry would then
                # make every waiter wait out its ttl)
                await asyncio.shield(_in_thread(_release, cache, lkey, record))
        else:
            v = await _await_value(factory)
            await _in_thread(cache.set, key, v, ttl)
            return v


# -- memoize ------------------------------------------------------------------
def _qualified_name(fn) -> str:
    module = getattr(fn, "__module__", None) or "?"
    if module == "__mp_main__":  # multiprocessing's spawn imports __main__ under this name
        module = "__main__"
    return f"{module}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}"


def _canon(obj, typed: bool, out: list) -> None:
    """Append a byte encoding of ``obj`` that is equal in every process for
    equal values (lru_cache's equality: with ``typed`` False, 1 == 1.0 == True)."""
    t = type(obj)
    if typed:
        out.append(f"<{t.__module__}.{t.__qualname__}>".encode())
    if obj is None:
        out.append(b"N")
    elif t is bool or t is int:
        out.append(b"i%d;" % obj)
    elif t is float:
        if not typed and obj.is_integer():
            out.append(b"i%d;" % int(obj))
        else:
            out.append(b"f" + repr(obj).encode() + b";")
    elif t is str:
        b = obj.encode("utf-8", "surrogatepass")
        out.append(b"s%d:" % len(b) + b)
    elif t is bytes:
        out.append(b"y%d:" % len(obj) + obj)
    elif t is tuple or t is list:
        out.append(b"t(" if t is tuple else b"l(")
        for x in obj:
            _canon(x, typed, out)
        out.append(b")")
    elif t is dict:
        items = []
        for k, v in obj.items():
            kb, vb = [], []
            _canon(k, typed, kb)
            _canon(v, typed, vb)
            items.append((b"".join(kb), b"".join(vb)))
        out.append(b"d(")
        for kb, vb in sorted(items):
            out.append(kb + b"=" + vb)
        out.append(b")")
    elif t is set or t is frozenset:
        parts = []
        for x in obj:
            xb = []
            _canon(x, typed, xb)
            parts.append(b"".join(xb))
        out.append(b"S(" + b"".join(sorted(parts)) + b")")
    else:
        # Anything else is keyed by its pickled state (and its type).
        try:
            data = pickle.dumps(obj, protocol=4)
        except Exception as e:
            raise TypeError(
                f"memoize cannot build a cache key from an argument of type {t.__qualname__} ({e}); "
                "pass values that can be pickled"
            ) from e
        out.append(f"p{t.__module__}.{t.__qualname__}:{len(data)}:".encode() + data)


def args_digest(args: tuple, kwargs: dict, typed: bool = False) -> str:
    """A stable hex digest of a call's arguments (same in every process).

    Raises:
        TypeError: an argument is not a plain value and cannot be pickled.
    """
    out: list[bytes] = []
    _canon(tuple(args), typed, out)
    for name in sorted(kwargs):
        out.append(b"k" + name.encode() + b"=")
        _canon(kwargs[name], typed, out)
    return xxhash.xxh3_128_hexdigest(b"".join(out))


def memoize(cache, ttl=_DEFAULT, typed: bool = False, timeout: float = DEFAULT_TIMEOUT):
    """Decorator: cache a function's results in ``cache``, shared by every process.

    The key is ``shmcache.memoize:<module>.<qualname>:<digest of the arguments>``,
    the same in every process. Calls go through :func:`get_or_set`, so
    concurrent calls with the same arguments run the function once. ``typed``
    keys ``f(1)`` and ``f(1.0)`` apart (as ``functools.lru_cache``). Usable
    bare (``@cache.memoize``) or called (``@cache.memoize(ttl=60)``). An
    ``async def`` gets an async wrapper that waits with ``asyncio.sleep``
    (see :func:`aget_or_set`): the event loop never blocks on another
    process's computation.

    The wrapper has ``cache_key(*args, **kwargs)`` (the key of one call),
    ``invalidate(*args, **kwargs)`` (drop one call's result; True if it was
    cached) and ``cache_clear()`` (drop every result of this function; returns
    how many).

    Raises:
        TypeError / ValueError: a bad ``timeout`` (at decoration, not at the first call).
        TypeError: at call time, an argument cannot be turned into a key.
    """
    if callable(ttl) and not isinstance(ttl, (int, float)):  # used bare: @cache.memoize
        return memoize(cache)(ttl)
    timeout = check_timeout(timeout)

    def decorator(fn):
        prefix = f"{MEMO_PREFIX}{_qualified_name(fn)}:"

        def cache_key(*args, **kwargs) -> str:
            """The cache key of ``fn(*args, **kwargs)``."""
            return prefix + args_digest(args, kwargs, typed)

        if inspect.iscoroutinefunction(fn):  # waits with asyncio.sleep, awaits fn
            @functools.wraps(fn)
            async def wrapper(*args, **kwargs):
                return await aget_or_set(cache, cache_key(*args, **kwargs), functools.partial(fn, *args, **kwargs),
                                         ttl, timeout)
        else:
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                return get_or_set(cache, cache_key(*args, **kwargs), lambda: fn(*args, **kwargs), ttl, timeout)

        def invalidate(*args, **kwargs) -> bool:
            """Drop the cached result of ``fn(*args, **kwargs)``. True if there was one."""
            return cache.delete(cache_key(*args, **kwargs))

        def cache_clear() -> int:
            """Drop every cached result of this function (all processes). Returns how many."""
            return cache.delete_many([k for k in cache.keys() if isinstance(k, str) and k.startswith(prefix)])

        wrapper.cache_key = cache_key
        wrapper.invalidate = invalidate
        wrapper.cache_clear = cache_clear
        return wrapper

    return decorator
