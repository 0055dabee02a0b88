"""Lock waits must not stretch when the wall clock steps (issue 10, row 7), and a
signal handler that raises still ends them.

A writer waiting on a stripe whose holder died used ``sem_timedwait`` (via
posix_ipc) in the pure-Python path: its deadline is absolute on
CLOCK_REALTIME, so a step back of S seconds made the wait last S seconds
more. Since layout 6 both paths sleep on the stripe's lock word with
futex(2), whose relative timeout the kernel measures on CLOCK_MONOTONIC, and
keep their own deadlines on that clock too.

How it is tested without touching the host's clock: CLOCK_REALTIME has no
namespace (``unshare --time`` only offsets CLOCK_MONOTONIC and
CLOCK_BOOTTIME), and stepping the host clock would disturb every other
process on the machine. So the waiter runs with a tiny LD_PRELOAD shim (built
here with the C compiler the package build needs anyway) that shows it a
wall clock ``AHEAD`` seconds ahead of the kernel's: every absolute realtime
deadline it computes is then ``AHEAD`` seconds in the kernel's future, exactly
what a step back of ``AHEAD`` seconds right after computing it does. The
lock word, the dead holder (a real SIGKILLed process) and the kernel's wait are
real; only the waiter's reading of the wall clock is shifted.
"""

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shmcache import Cache, admin
from test_crash import keys_in_stripe

CTX = mp.get_context("fork")
AHEAD = 300  # seconds: the old wait would outlast the subprocess timeout many times over

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long ahead(void) {
    const char *s = getenv("SHIM_REALTIME_AHEAD");
    return s ? atol(s) : 0;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += ahead();
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    static int (*real)(struct timeval *, void *);
    if (!real) real = (int (*)(struct timeval *, void *))dlsym(RTLD_NEXT, "gettimeofday");
    int r = real(tv, tz);
    if (r == 0 && tv) tv->tv_sec += ahead();
    return r;
}
"""

# The waiter: attach, write one key of the dead holder's stripe, and report
# the wall clock it saw through libc so the test knows
# the shim really applied.
WAITER = textwrap.dedent("""
    import ctypes, sys, time
    from shmcache import Cache
    name, key = sys.argv[1], sys.argv[2]
    c = Cache(name, create=False, lock_timeout=30)
    t0 = time.monotonic()
    c.set(key, b"after the step")
    waited = time.monotonic() - t0
    class TV(ctypes.Structure):
        _fields_ = [("s", ctypes.c_long), ("us", ctypes.c_long)]
    tv = TV()
    ctypes.CDLL(None).gettimeofday(ctypes.byref(tv), None)
    print("SET", tv.s, f"{waited:.3f}", flush=True)
    c.close()
""")


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the clock shim")
    d = tmp_path_factory.mktemp("clockshim")
    (d / "shim.c").write_text(SHIM)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "shim.so"), str(d / "shim.c"), "-ldl"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode:
        pytest.skip(f"cannot build the clock shim: {r.stderr.strip()[:200]}")
    return str(d / "shim.so")


def _hold(name, s, ready):
    c = Cache(name, create=False)
    admin.storage(c).locks.lock(s)  # a writer's hold, through the engine handle on purpose
    ready.set()
    time.sleep(600)  # SIGKILLed long before


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pure", [True, False], ids=["pure-python", "c"])
def test_regression_wall_clock_step_does_not_stretch_a_wait_on_a_dead_holder(make_cache, cache_name, shim, pure):
    cache = make_cache(size="2MiB", stripes=4)
    s = 3
    key = keys_in_stripe(4, s, 1, "step")[0]
    ready = CTX.Event()
    holder = CTX.Process(target=_hold, args=(cache_name, s, ready))
    holder.start()
    try:
        assert ready.wait(30), "the holder did not take the stripe"
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(30)
        assert holder.exitcode == -signal.SIGKILL
        env = dict(os.environ, LD_PRELOAD=shim, SHIM_REALTIME_AHEAD=str(AHEAD))
        if pure:
            env["SHMCACHE_PURE_PYTHON"] = "1"
        else:
            env.pop("SHMCACHE_PURE_PYTHON", None)
        before = time.time()
        try:
            r = subprocess.run([sys.executable, "-c", WAITER, cache_name, key], env=env,
                               capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the writer waited on the dead holder for the wall-clock step ({AHEAD} s), "
                        "not on the monotonic clock")
        assert r.returncode == 0, r.stderr
        word, seen, waited = r.stdout.split()
        assert word == "SET"
        assert int(seen) >= before + AHEAD - 5, "the shim did not shift the waiter's wall clock"
        print(f"{'pure-python' if pure else 'C'}: wait on a SIGKILLed holder with the wall clock "
              f"{AHEAD} s off: {float(waited) * 1e3:.1f} ms")
        assert cache.get(key) == b"after the step"
        assert cache.stats()["recoveries"] == 1 and cache.check() == []
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join(5)


# The pure-Python wait is a ctypes call now: a signal handler that raises
# (Ctrl-C) must still end it at once, and leave the stripe usable.
INTERRUPTED = textwrap.dedent("""
    import signal, sys, time
    from shmcache import Cache, admin
    name, key = sys.argv[1], sys.argv[2]
    c = Cache(name, create=False, lock_timeout=30)
    assert not admin.accelerated(c)
    def ctrl_c(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGALRM, ctrl_c)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    t0 = time.monotonic()
    try:
        c.set(key, b"never")
        print("SET")
    except KeyboardInterrupt:
        print("INTERRUPTED", f"{time.monotonic() - t0:.3f}")
""")


def _hold_alive(name, s, ready, release):
    c = Cache(name, create=False)
    locks = admin.storage(c).locks
    locks.lock(s)
    ready.set()
    release.wait(60)
    locks.unlock(s)
    c.close()


@pytest.mark.timeout(120)
def test_ctrl_c_ends_a_pure_python_wait_on_a_live_holder(make_cache, cache_name):
    cache = make_cache(size="2MiB", stripes=4)
    s = 1
    key = keys_in_stripe(4, s, 1, "intr")[0]
    ready, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=_hold_alive, args=(cache_name, s, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        r = subprocess.run([sys.executable, "-c", INTERRUPTED, cache_name, key], capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, SHMCACHE_PURE_PYTHON="1"))
        assert r.returncode == 0, r.stderr
        word, waited = r.stdout.split()
        assert word == "INTERRUPTED" and float(waited) < 10.0  # not the 300 s LockTimeout
        release.set()
        holder.join(30)
        assert holder.exitcode == 0
        cache.set(key, b"after")  # the interrupted waiter left no marker or lock behind
        assert cache.get(key) == b"after" and cache.check() == [] and cache.stats()["recoveries"] == 0
    finally:
        release.set()
        if holder.is_alive():
            holder.kill()
            holder.join(5)


def _hold_and_die(cache, s, ready):
    admin.storage(cache).locks.lock(s)  # the inherited handle (its own client slot since the fork)
    ready.set()
    time.sleep(600)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("recreate", [False, True], ids=["removed", "removed-and-recreated"])
def test_regression_pure_python_wait_on_a_removed_cache_still_works(cache_name, monkeypatch, recreate):
    # Up to layout 5 the monotonic wait opened the stripe's semaphore by name.
    # A cache removed (Cache.unlink) while this process stays attached keeps
    # working on its old mapping; a contended write to it raised OSError
    # (sem_open: no such file), or with a new cache of that name could wait
    # on the new one's semaphore. It must wait on its own, old lock word.
    import shmcache.cache

    monkeypatch.setattr(shmcache.cache, "USE_SPEEDUPS", False)
    cache = Cache(cache_name, size="2MiB", stripes=4)
    s = 2
    key = keys_in_stripe(4, s, 1, "gone")[0]
    ready = CTX.Event()
    holder = CTX.Process(target=_hold_and_die, args=(cache, s, ready))
    holder.start()
    newer = None
    try:
        assert ready.wait(30)
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(30)
        assert Cache.unlink(cache_name)
        if recreate:
            newer = Cache(cache_name, size="1MiB", stripes=4)
        cache.set(key, b"old cache")  # waits on the dead holder's stripe, then recovers it
        assert cache.get(key) == b"old cache" and cache.stats()["recoveries"] == 1
        if newer is not None:
            assert key not in newer and newer.check() == []
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join(5)
        cache.close()
        if newer is not None:
            newer.close()
