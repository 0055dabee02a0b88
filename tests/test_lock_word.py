"""The stripe lock word (layout 6): taking the lock and naming its holder are
one compare-and-swap, so a holder killed at any instant leaves either a free
word or its own name, and the next writer recovers at once.

Real processes (fork), real SIGKILLs, the real C core and the pure-Python
path. No wall-clock assertions: a recovery that needed a grace period shows
up as a writer that never gets the lock, which the test's timeout catches.
"""

import ctypes
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from shmcache import Cache, admin
from shmcache import layout as L
from shmcache import lock as lock_mod
from shmcache.cache import USE_SPEEDUPS
from shmcache.errors import Error

S = 1  # the stripe every test here works on

BOTH_PATHS = pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])


def _run(pure: bool, code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    if pure:
        env["SHMCACHE_PURE_PYTHON"] = "1"
    else:
        env.pop("SHMCACHE_PURE_PYTHON", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def _wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _spin_child(name: str, go_fd: int) -> None:
    """In a forked child: attach and take and free stripe S as fast as it can
    until killed, so a kill lands inside the lock steps themselves."""
    try:
        c = Cache(name)
        locks = c._locks
        os.write(go_fd, b"x")
        while True:
            locks.lock(S)
            locks.unlock(S)
    finally:
        os._exit(1)


@pytest.mark.timeout(240)
@BOTH_PATHS
def test_regression_a_holder_killed_anywhere_in_its_lock_steps_never_costs_a_grace_period(cache_name, pure):
    """Layout 5 took a POSIX semaphore and then wrote the holder's name: a
    holder killed between the two left a held semaphore naming nobody, which a
    waiter could not tell from a live holder in that window. It waited
    ``max(lock_timeout, 1 s)`` before recovering (the kill storm's one stall
    of 1,053 ms). Here lock_timeout is 10 minutes, so one kill in that window
    would stall the writer past this test's timeout; a child that only takes
    and frees the lock is killed 150 times at random instants."""
    code = f"""
import os, random, signal, sys, time
from shmcache import Cache, admin
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_lock_word import _spin_child, S
c = Cache({cache_name!r}, size="4MiB", stripes=4, lock_timeout=600.0)
rnd = random.Random(20261203)
kills = 0
for i in range(150):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _spin_child({cache_name!r}, w)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    time.sleep(rnd.random() * 0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    kills += 1
    c._locks.lock(S)  # a dead holder is recovered now, or it was free
    c._locks.unlock(S)
    c.set(f"after{{i}}", i)  # and the cache works
assert admin.lock_holders(c) == [None] * 4, admin.lock_holders(c)
assert c.check() == []
assert all(c.get(f"after{{i}}") == i for i in range(150))
rec = c.stats()["recoveries"]
assert 0 < rec <= kills, rec
print("recoveries", rec, "of", kills)
c.close()
"""
    r = _run(pure, code, timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recoveries" in r.stdout


@BOTH_PATHS
def test_a_waiter_killed_in_its_sleep_takes_nothing_from_the_live_holder(cache_name, pure):
    """A waiter asleep on the word (its LOCK_WAITERS bit set) and SIGKILLed
    leaves the holder's lock alone. (A robust pthread mutex would mark the
    holder's lock OWNER_DIED here whenever the waiter's thread id equals the
    holder's, as two PID namespaces' processes easily do.)"""
    code = f"""
import os, signal, time
from shmcache import Cache, admin
from shmcache import layout as L
c = Cache({cache_name!r}, size="4MiB", stripes=4)
c.set("k", b"v")
c._locks.lock({S})
me = c._locks.word({S})
pid = os.fork()
if pid == 0:
    try:
        d = Cache({cache_name!r})  # kept: a dropped Cache closes itself
        d._locks.lock({S})
    finally:
        os._exit(3)
deadline = time.monotonic() + 30
while not c._locks.word({S}) & L.LOCK_WAITERS:  # the child sleeps on the word
    assert time.monotonic() < deadline, "the waiter never slept on the word"
    time.sleep(0.001)
time.sleep(0.05)
os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
assert c._locks.word({S}) & ~L.LOCK_WAITERS == me  # still ours
assert admin.recover_stripes(c) == []  # the daemon's pass finds nothing to take
assert c._locks.word({S}) & ~L.LOCK_WAITERS == me
c._locks.unlock({S})
assert admin.lock_holders(c)[{S}] is None
c.set("k2", b"w")
assert c.get("k") == b"v" and c.get("k2") == b"w" and c.stats()["recoveries"] == 0
print("ok")
c.close()
"""
    r = _run(pure, code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


@BOTH_PATHS
def test_a_sleeping_writer_is_woken_by_the_release(cache_name, pure):
    """A writer that found the stripe taken sleeps on the word and takes it as
    soon as the holder frees it (the holder's release sees LOCK_WAITERS and
    wakes it), and counts one lock wait."""
    code = f"""
import os, time
from shmcache import Cache, admin
from shmcache import layout as L
c = Cache({cache_name!r}, size="4MiB", stripes=4)
c._locks.lock({S})
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    d = Cache({cache_name!r})
    d._locks.lock({S})
    os.write(w, b"got")
    d._locks.unlock({S})
    d.close()
    os._exit(0)
deadline = time.monotonic() + 30
while not c._locks.word({S}) & L.LOCK_WAITERS:
    assert time.monotonic() < deadline
    time.sleep(0.001)
waits = admin.stripes(c)[{S}].lock_waits
c._locks.unlock({S})
assert os.read(r, 3) == b"got"
assert os.waitpid(pid, 0)[1] == 0
assert admin.stripes(c)[{S}].lock_waits == waits + 1
assert admin.lock_holders(c)[{S}] is None and c.stats()["recoveries"] == 0
print("ok")
c.close()
"""
    r = _run(pure, code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_the_lock_word_names_the_holders_client_slot_and_generation(make_cache):
    c = make_cache(size="4MiB", stripes=4)
    client = c._state.client
    assert admin.lock_holders(c) == [None] * 4
    c._locks.lock(S)
    try:
        assert c._locks.word(S) == L.lock_word(client.slot, client.gen)
        assert L.lock_holder(c._locks.word(S)) == (client.slot, client.gen)
        assert admin.lock_holders(c)[S] == client.slot
        assert admin.stripes(c)[S].locked_by == os.getpid()
        assert c._locks.stripe_owner(S) == (os.getpid(), client.slot)
    finally:
        c._locks.unlock(S)
    assert c._locks.word(S) == 0 and admin.stripes(c)[S].locked_by is None


@pytest.mark.parametrize("word", [0x80000000, 1, 5 << 32, (1 << 64) - 1], ids=["waiters-bit", "gen-0", "no-slot", "all-ones"])
def test_a_damaged_lock_word_is_taken_over_like_a_dead_holders(make_cache, word):
    """A lock word no live client holds (damage: another process wrote
    anything there) must not block the stripe: it names a dead or no slot, so
    the next writer takes it over and repairs the stripe."""
    c = make_cache(size="4MiB", stripes=4, lock_timeout=600.0)
    c.set_many({f"k{i}": i for i in range(50)})
    L.U64.pack_into(c._seg.mm, c._g.stripe_table_off + S * L.STRIPE_SIZE + L.S_LOCK, word)
    ver = c._g.stripe_table_off + S * L.STRIPE_SIZE + L.S_VERSION
    c._locks.lock(S)
    # regression: the C path went on holding the recovered stripe with the even
    # version its repair left, so lock-free readers took a stripe being written
    # for a consistent one
    assert L.U64.unpack_from(c._seg.mm, ver)[0] & 1
    c._locks.unlock(S)
    assert not L.U64.unpack_from(c._seg.mm, ver)[0] & 1
    assert admin.lock_holders(c) == [None] * 4 and c.stats()["recoveries"] == 1
    assert c.check() == [] and all(c[f"k{i}"] == i for i in range(50))


def test_a_damaged_word_naming_us_is_not_released_by_another_slot(make_cache):
    """unlock frees the word only while it names the caller: a stripe whose
    word another process overwrote is left for recovery, not freed from under
    whoever it names."""
    c = make_cache(size="4MiB", stripes=4)
    c._locks.lock(S)
    off = c._g.stripe_table_off + S * L.STRIPE_SIZE + L.S_LOCK
    L.U64.pack_into(c._seg.mm, off, L.lock_word(c._g.max_clients - 1, 9))  # not us
    c._locks.unlock(S)
    assert L.U64.unpack_from(c._seg.mm, off)[0] == L.lock_word(c._g.max_clients - 1, 9)
    assert admin.recover_stripes(c) == [S]  # slot max_clients-1 is free: its holder is dead
    assert admin.lock_holders(c)[S] is None


@pytest.mark.skipif(not USE_SPEEDUPS, reason="compares the C core with the pure-Python path")
def test_the_c_core_and_the_pure_python_path_exclude_each_other(cache_name):
    """Processes of both kinds on one cache take the same lock words: counters
    incremented by both, under the stripe lock, lose nothing."""
    c = Cache(cache_name, size="4MiB", stripes=4)
    code = f"""
from shmcache import Cache
c = Cache({cache_name!r})
for i in range(3000):
    c.incr("n")
c.close()
"""
    procs = []
    for pure in (False, True, False, True):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        env.pop("SHMCACHE_PURE_PYTHON", None)
        if pure:
            env["SHMCACHE_PURE_PYTHON"] = "1"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env))
    for p in procs:
        assert p.wait(timeout=120) == 0
    assert c.get("n") == 12000
    c.close()


def test_threads_of_one_process_hold_the_stripe_in_turn(make_cache):
    """Threads share their process's client slot, hence its lock word: the word
    alone cannot tell them apart, so a thread that finds it taken by a sibling
    must wait for the sibling, not take it as its own."""
    c = make_cache(size="4MiB", stripes=4)
    inside = []
    errors = []

    def work():
        try:
            for _ in range(300):
                c._locks.lock(S)
                try:
                    inside.append(1)
                    assert len(inside) == 1, "two threads inside one stripe"
                    inside.pop()
                finally:
                    c._locks.unlock(S)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in ts)
    assert admin.lock_holders(c)[S] is None


def test_pure_python_without_libatomic_is_refused_naming_the_fix(cache_name):
    """The pure-Python path needs libatomic for compare-and-swap. Without it,
    opening a cache fails at once with what to install, and creates nothing."""
    code = f"""
import ctypes, os
def refusing(real):
    class NoAtomic(real):
        def __init__(self, name, *a, **k):
            if name and "libatomic" in str(name):
                raise OSError("libatomic.so.1: cannot open shared object file")
            super().__init__(name, *a, **k)
    return NoAtomic
ctypes.CDLL, ctypes.PyDLL = refusing(ctypes.CDLL), refusing(ctypes.PyDLL)
from shmcache import Cache
from shmcache.errors import Error
try:
    Cache({cache_name!r}, size="4MiB")
except Error as e:
    print("refused:", e)
print("exists:", os.path.exists("/dev/shm/shmcache.{cache_name}"))
"""
    r = _run(True, code)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "libatomic" in r.stdout and "apt-get install libatomic1" in r.stdout
    assert "exists: False" in r.stdout


def test_no_semaphore_files(make_cache, cache_name):
    """A cache is one file in /dev/shm now: no sem.* files to squat, leak or
    run out of inodes for."""
    make_cache(size="4MiB", stripes=8)
    assert [n for n in os.listdir("/dev/shm") if cache_name in n] == [f"shmcache.{cache_name}"]


def _take_and_die(name: str) -> None:
    c = Cache(name)
    c._locks.lock(S)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_dead_holders_slot_taken_by_a_new_process_does_not_make_the_holder_look_alive(make_cache, cache_name):
    """A dead holder's slot is freed and claimed again while its lock word
    still names it: the claim bumps the slot's generation, so the word's
    holder still reads as dead and the stripe is recovered (no ABA)."""
    c = make_cache(size="4MiB", stripes=4, max_clients=2)
    # a spawned child: a forked one would also claim a slot for the inherited handle
    r = _run(not USE_SPEEDUPS, f"""
import os, signal, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_lock_word import _take_and_die
_take_and_die({cache_name!r})
""")
    assert r.returncode == -signal.SIGKILL, r.stderr
    slot = admin.lock_holders(c)[S]
    assert slot is not None and slot != c._state.client.slot
    assert admin.reap_clients(c) == [slot]
    d = Cache(cache_name)  # the only free slot: the dead holder's, with the next generation
    try:
        assert d._state.client.slot == slot
        assert admin.lock_holders(c)[S] == slot  # the word still names the slot, but the old generation
        assert c._locks.stripe_owner(S) == (0, slot)  # not the new process's pid
        d.set("k", b"v")
        c._locks.lock(S)
        c._locks.unlock(S)
        assert c.stats()["recoveries"] == 1 and admin.lock_holders(c) == [None] * 4 and c.check() == []
    finally:
        d.close()


def test_regression_every_slot_dead_while_holding_a_stripe_still_lets_a_process_attach(make_cache, cache_name):
    """With every client slot left by a process killed while it held a
    stripe, attaching raised CacheFull ("belong to live processes") when the
    reaper kept such slots for the stripes' recovery, which only an attached
    process can do: nobody could ever attach again."""
    import multiprocessing as mp

    c = make_cache(size="4MiB", stripes=4, max_clients=2)
    c.close()
    ctx = mp.get_context("fork")
    for _ in range(2):
        p = ctx.Process(target=_take_and_die, args=(cache_name,))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
    d = Cache(cache_name)  # reaps a dead slot
    try:
        assert admin.lock_holders(d)[S] is not None
        d.set_many({f"k{i}": i for i in range(50)})  # recovers stripe S on the way
        assert admin.lock_holders(d) == [None] * 4 and d.check() == []
        assert all(d[f"k{i}"] == i for i in range(50))
    finally:
        d.close()


def test_closing_a_cache_under_a_holding_thread_keeps_its_slot_alive(make_cache, cache_name):
    """close() from one thread while another thread of the process holds a
    stripe: the client slot used to be freed first, which made that live
    writer look dead, and another process took its stripe over while it
    wrote. Now the slot stays claimed (a RuntimeWarning says so) and no
    other process recovers the stripe."""
    c = make_cache(size="4MiB", stripes=4)
    other = make_cache(size="4MiB", stripes=4)  # another handle: its own client slot
    c._locks.lock(S)  # "another thread" mid-write: the lock is held when close() runs
    slot = c._state.client.slot
    with pytest.warns(RuntimeWarning, match="held one of its stripes"):
        c.close()
    assert lock_mod.client_alive(other._seg, slot)
    assert admin.recover_stripes(other) == []
    assert admin.lock_holders(other)[S] == slot and other.stats()["recoveries"] == 0


@BOTH_PATHS
def test_a_repair_that_fails_leaves_the_stripe_to_the_next_recoverer(cache_name, pure):
    """A recoverer whose repair raised (an interrupt, MemoryError) released the
    half-repaired stripe as sound. Now it hands it on: version odd, a word
    naming nobody; the next writer takes it over and repairs it again."""
    code = f"""
import os, signal
from shmcache import Cache, admin
from shmcache import layout as L
c = Cache({cache_name!r}, size="4MiB", stripes=4)
c.set_many({{f"k{{i}}": i for i in range(100)}})
pid = os.fork()
if pid == 0:
    d = Cache({cache_name!r})
    d._locks.lock({S})
    os.kill(os.getpid(), signal.SIGKILL)
os.waitpid(pid, 0)
real = c._locks.repair
def broken(s):
    raise KeyboardInterrupt("in the middle of a repair")
c._locks.repair = broken
try:
    c._locks.lock({S})
except KeyboardInterrupt:
    pass
else:
    raise AssertionError("the repair did not run")
v = L.U64.unpack_from(c._seg.mm, c._g.stripe_table_off + {S} * L.STRIPE_SIZE)[0]
assert v & 1, "a broken stripe published with an even version"
assert admin.lock_holders(c)[{S}] == -1  # names nobody
c._locks.repair = real
c._locks.lock({S})
c._locks.unlock({S})
assert admin.lock_holders(c) == [None] * 4 and c.check() == []
assert all(c[f"k{{i}}"] == i for i in range(100))
print("ok", c.stats()["recoveries"])
c.close()
"""
    r = _run(pure, code)
    assert r.returncode == 0 and "ok 1" in r.stdout, r.stdout + r.stderr


def test_pure_python_words_of_a_closed_cache_raise_instead_of_touching_memory(cache_name):
    """A thread of the pure-Python path that reaches a swap after another
    thread closed the cache called libatomic on an unmapped address
    (segfault). Now its words say the cache is closed, and the memory stays
    mapped until the words are gone."""
    code = f"""
from shmcache import Cache
c = Cache({cache_name!r}, size="4MiB", stripes=4)
c.set("k", b"v")
words = c._locks._words()
c.close()
for call in (lambda: words.swap(1, 0, 1), lambda: words.acquire(1, 5, 0.0), lambda: c._locks.lock(1)):
    try:
        call()
    except ValueError as e:
        assert "closed" in str(e), e
    else:
        raise AssertionError("a closed cache's lock word was swapped")
print("ok")
"""
    r = _run(True, code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_removed_admin_calls_say_what_replaced_them():
    with pytest.raises(AttributeError, match="lock_holders"):
        admin.lock_values
    with pytest.raises(AttributeError, match="nothing to fix"):
        admin.fix_overcount


def test_regression_a_slot_kept_by_close_is_not_kept_alive_by_a_forked_child(cache_name):
    """close() keeps the client slot (and its fd's liveness lock) while a lock
    word names it; a child forked afterwards inherited that fd and kept the
    dead parent's slot alive, so its stripe was never recovered."""
    code = f"""
import os, sys, time, warnings
from shmcache import Cache
c = Cache({cache_name!r}, size="4MiB", stripes=4)
c._locks.lock({S})
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    c.close()
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
os._exit(0)  # the parent dies holding stripe S; its child lives on
"""
    p = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                         stdout=subprocess.PIPE, text=True)
    child = int(p.stdout.readline())
    try:
        assert p.wait(30) == 0
        c = Cache(cache_name)
        try:
            slot = admin.lock_holders(c)[S]
            assert slot is not None
            assert not lock_mod.client_alive(c._seg, slot)  # the child does not hold the parent's lock
            assert admin.recover_stripes(c) == [S]
        finally:
            c.close()
    finally:
        os.kill(child, signal.SIGKILL)


def test_regression_a_deferred_release_in_a_forked_child_leaves_the_parents_slot_alone(cache_name):
    """``g = Cache(name).set`` keeps the dead Cache's state for g. A forked
    child inherited it; when the child dropped g, the release retired the
    parent's client record and unlocked the parent's liveness lock (shared
    through the inherited fd), so the live parent looked dead. Now the child
    drops the inherited fd and its g says the cache is closed."""
    code = f"""
import os, sys
from shmcache import Cache, admin
from shmcache import lock as lock_mod
g = Cache({cache_name!r}, size="4MiB", stripes=4).set
obs = Cache({cache_name!r})
slot = [c for c, pid, _ in lock_mod.live_clients(obs._seg) if pid == os.getpid() and c != obs._state.client.slot]
assert len(slot) == 1, slot
slot = slot[0]
pid = os.fork()
if pid == 0:
    try:
        g("k", b"from the child")
        os._exit(5)  # wrote under the parent's name
    except ValueError as e:
        assert "closed" in str(e), e
    del g
    os._exit(0)
_, st = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(st) == 0, st
assert lock_mod.client_alive(obs._seg, slot), "the parent's slot looks dead"
g("k", b"from the parent")
assert obs.get("k") == b"from the parent"
print("ok")
"""
    r = _run(not USE_SPEEDUPS, code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_regression_a_disabled_forked_child_does_not_warn_about_the_parents_stripes(cache_name):
    """A multiprocessing child that could not claim a slot (max_clients full)
    runs with the cache disabled; at its exit the release scanned the lock
    words for the parent's word and warned about a stripe the parent held."""
    code = f"""
import multiprocessing as mp, sys, warnings
from shmcache import Cache
c = Cache({cache_name!r}, size="4MiB", stripes=4, max_clients=1)
def child():
    warnings.simplefilter("error")
if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the child's "could not claim a client slot" warning
        c._locks.lock({S})
        p = mp.get_context("fork").Process(target=child)
        p.start()
        p.join(30)
    c._locks.unlock({S})
    print("exit", p.exitcode)
    c.close()
"""
    r = _run(not USE_SPEEDUPS, code)
    assert r.returncode == 0 and "exit 0" in r.stdout, r.stdout + r.stderr
    assert "RuntimeWarning" not in r.stderr and "held one of its stripes" not in r.stderr, r.stderr


def test_regression_pure_lock_interrupted_after_taking_the_word_gives_it_back(make_cache, monkeypatch):
    """An exception from a signal handler can land right after the pure-Python
    path's compare-and-swap took the word; lock() then released only its
    thread lock, and the word kept naming this live process."""
    import shmcache.cache as cache_mod

    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", False)
    c = make_cache(size="4MiB", stripes=4)
    words = c._locks._words()
    real = words.acquire

    def interrupted(s, me, timeout):
        assert real(s, me, timeout)
        raise KeyboardInterrupt("a signal right after the swap")

    monkeypatch.setattr(words, "acquire", interrupted)
    with pytest.raises(KeyboardInterrupt):
        c._locks.lock(S)
    monkeypatch.setattr(words, "acquire", real)
    assert admin.lock_holders(c)[S] is None
    c.set_many({f"k{i}": i for i in range(40)})  # every stripe still takes writers
    assert c.check() == []


def test_a_recovery_pass_goes_on_past_a_stripe_it_cannot_repair(make_cache):
    """One stripe whose repair fails must not stop the daemon's pass: the
    other dead holders' stripes are recovered, dead clients reaped, and the
    failure is an Error naming the stripe."""
    c = make_cache(size="4MiB", stripes=4)
    for s in (1, 2):
        L.U64.pack_into(c._seg.mm, c._g.stripe_table_off + s * L.STRIPE_SIZE + L.S_LOCK, L.lock_word(7, 1))
    real = c._locks.repair

    def repair(s):
        if s == 1:
            raise RuntimeError("damage this repair cannot handle")
        real(s)

    c._locks.repair = repair
    with pytest.raises(Error, match=r"stripe\(s\) \[1\].*RuntimeError.*recovered \[2\]"):
        admin.recover(c)
    c._locks.repair = real
    assert admin.lock_holders(c)[2] is None and admin.lock_holders(c)[1] == -1  # handed on, naming nobody
    assert admin.recover(c)[0] == [1]
    assert admin.lock_holders(c) == [None] * 4 and c.check() == []
