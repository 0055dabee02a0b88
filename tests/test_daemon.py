"""The daemon as users run it: a real ``python -m shmcache daemon`` process,
real signals, real crashes. Plus in-process tests of its expiry machinery.

Every daemon is started through the ``daemon`` fixture, which kills it by PID
at the end of the test whatever happens; every wait is bounded.
"""

import glob
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import xxhash

from shmcache import Cache, admin
from shmcache import layout as L
from shmcache.cli import wait_for_daemon_snapshot
from shmcache.daemon import BULK_MIN, ExpiryCycle
from shmcache.expiry import place_slots
from shmcache.snapshot import PAUSE_ENV, restore_snapshot, verify_snapshot, write_snapshot

CTX = mp.get_context("spawn")


class DaemonProc:
    """One ``shmcache daemon`` child, its log file and a bounded way to stop it."""

    def __init__(self, name, log_path, args, env=None):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shmcache", "daemon", "--name", name, *args],
            stdout=self._log, stderr=self._log, env=env,
        )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if f"daemon pid {self.pid} serving" in self.log():
                return self
            time.sleep(0.02)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM, timeout=20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"daemon ignored signal {sig} for {timeout} s:\n{self.log()}")
        self._log.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def daemon(tmp_path, cache_name):
    """``daemon(*args, name=..., env=..., ready=True)`` starts a daemon; all are killed afterwards."""
    started = []

    def start(*args, name=None, env=None, ready=True):
        d = DaemonProc(name or cache_name, tmp_path / f"daemon-{len(started)}.log", args,
                       env=dict(os.environ, **(env or {})))
        started.append(d)
        return d.wait_ready() if ready else d

    yield start
    for d in started:
        d.kill()


def _wait(cond, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _snapshot_now(d: DaemonProc, path, timeout=30.0):
    since = time.time()
    os.kill(d.pid, signal.SIGUSR1)
    return wait_for_daemon_snapshot(str(path), since, timeout, d.pid)


# -------------------------------------------------------------- children
def _checked_value(key: str, seq: int, rnd) -> bytes:
    body = seq.to_bytes(8, "little") + rnd.randbytes(rnd.randint(0, 400))
    return xxhash.xxh64_digest(key.encode() + body) + body


def _value_ok(key, value) -> bool:
    return isinstance(value, bytes) and xxhash.xxh64_digest(key.encode() + value[8:]) == value[:8]


def _writer(name, wid, seconds, ttl):
    import random

    rnd = random.Random(wid)
    c = Cache(name, create=False)
    try:
        t_end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < t_end:
            k = f"w{wid}:{rnd.randrange(3000)}"
            c.set(k, _checked_value(k, i, rnd), ttl=ttl)
            i += 1
    finally:
        c.close()


def _hold_stripe_lock(name, stripe, ready):
    c = Cache(name, create=False)
    admin.storage(c).locks.lock(stripe)
    ready.set()
    time.sleep(120)


def _attach_and_sleep(name, ready):
    c = Cache(name, create=False)  # noqa: F841 - held until the SIGKILL
    ready.set()
    time.sleep(120)


def _run_children(target, args_list, timeout):
    procs = [CTX.Process(target=target, args=a) for a in args_list]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


# ------------------------------------------------------------------ expiry
def test_short_ttl_keys_disappear_without_reads(make_cache, daemon):
    c = make_cache(size="8MiB")
    c.set_many({f"short{i}": b"s" * 200 for i in range(3000)}, ttl=0.5)
    c.set_many({f"long{i}": b"l" * 200 for i in range(2000)}, ttl=600)
    st0 = c.stats()
    assert st0["items"] == 5000
    daemon("--expire-every", "0.05")
    _wait(lambda: c.stats()["items"] == 2000, what="the daemon to expire the short-TTL keys")
    st = c.stats()
    assert st["bytes_used"] < st0["bytes_used"] * 0.5
    assert st["expirations"] >= 3000
    assert st["hits"] == st0["hits"] and st["misses"] == st0["misses"]  # nobody read them
    assert all(c.get(f"long{i}") == b"l" * 200 for i in range(2000))
    assert c.check() == []


def test_expiry_with_concurrent_writers_keeps_the_cache_sound(make_cache, daemon):
    c = make_cache(size="4MiB", stripes=4)
    c.set_many({f"keep{i}": _checked_value(f"keep{i}", i, __import__("random").Random(i)) for i in range(500)})
    daemon("--expire-every", "0.02")
    _run_children(_writer, [(c.name, w, 2.0, 0.05) for w in range(2)], timeout=30)
    _wait(lambda: c.stats()["items"] == 500, what="every short-TTL write to expire")
    assert c.check() == []
    assert all(_value_ok(f"keep{i}", c.get(f"keep{i}")) for i in range(500))


def test_expiry_cycle_bulk_and_per_key_paths(make_cache, fake_clock):
    c = make_cache(size="8MiB", stripes=4, clock=fake_clock)
    c.set_many({f"bulk{i}": b"x" * 50 for i in range(BULK_MIN * 8)}, ttl=5)  # many per stripe: bulk path
    c.set_many({f"few{i}": b"y" for i in range(6)}, ttl=7)  # few per stripe: per-key path
    c.set_many({f"keep{i}": b"z" * 30 for i in range(3000)}, ttl=100)
    c.set_many({f"never{i}": b"n" for i in range(100)})
    cyc = ExpiryCycle(c, clock=fake_clock)
    assert cyc.sweep_all() == 0
    fake_clock.advance(6)
    assert cyc.sweep_all() == BULK_MIN * 8
    assert c.check() == []
    fake_clock.advance(2)
    assert cyc.sweep_all() == 6
    assert c.check() == [] and c.stats()["items"] == 3100
    assert all(c.get(f"keep{i}") == b"z" * 30 for i in range(3000))
    # the table still works after a rebuild: overwrite, delete, reinsert
    for i in range(0, 3000, 3):
        del c[f"keep{i}"]
        c[f"new{i}"] = i
    assert c.check() == []
    assert c.get("new3") == 3 and "keep3" not in c and c.get("keep4") == b"z" * 30


def test_expiry_tick_is_bounded_but_makes_progress(make_cache, fake_clock):
    c = make_cache(size="8MiB", stripes=8, clock=fake_clock)
    c.set_many({f"k{i}": b"x" for i in range(4000)}, ttl=1)
    fake_clock.advance(2)
    cyc = ExpiryCycle(c, expire_every=0.1, clock=fake_clock, slots_per_tick=1)
    total = 0
    for _ in range(100):
        total += cyc.tick(budget=0.0)  # one stripe per tick, whatever the budget
        if total == 4000:
            break
    assert total == 4000 and c.stats()["items"] == 0 and c.check() == []


def test_bulk_expire_backs_off_when_a_writer_got_in(make_cache, fake_clock, monkeypatch):
    c = make_cache(size="4MiB", stripes=1, clock=fake_clock)
    c.set_many({f"k{i}": b"x" for i in range(500)}, ttl=1)
    fake_clock.advance(2)
    real_lock = c._locks.lock

    def lock_after_a_write(s):  # a writer slips in between the copy and the lock
        c._locks.lock = real_lock
        c.set("intruder", b"i")
        real_lock(s)

    monkeypatch.setattr(c._locks, "lock", lock_after_a_write)
    assert c._table.expire_bulk(0, fake_clock.now) is None
    assert c.stats()["items"] == 501 and c.check() == []
    assert c._table.expire_bulk(0, fake_clock.now) == 500
    assert c.keys() == ["intruder"] and c.check() == []


def _probe_insert(sps, tags):
    """An index slice (sps, 4) u64 holding ``tags`` inserted one by one with
    linear probing (so a run's entries are not sorted by home); ``off`` numbers them."""
    cur = np.zeros((sps, L.SLOT_SIZE // 8), dtype=np.uint64)
    rec = cur.view(L.SLOT_DTYPE).reshape(sps)
    for n, t in enumerate(tags):
        i = t % sps
        while rec["tag"][i]:
            i = (i + 1) % sps
        rec["tag"][i] = t
        rec["loc"][i] = n
    return cur


def _backward_shift_delete(cur, gone):
    """Reference: delete the slots ``gone`` one at a time by backward shift."""
    cur = cur.copy()
    rec = cur.view(L.SLOT_DTYPE).reshape(len(cur))
    sps = len(cur)
    for off in rec["loc"][gone].tolist():
        j = int(np.nonzero((rec["loc"] == off) & (rec["tag"] != 0))[0][0])
        k = j
        while True:
            k = (k + 1) % sps
            t = int(rec["tag"][k])
            if t == 0:
                break
            if (k - t % sps) % sps >= (k - j) % sps:
                cur[j] = cur[k]
                j = k
        cur[j] = 0
    return cur


def test_place_builds_a_valid_linear_probing_index():
    """place_slots leaves exactly what backward-shift deletion of the dropped
    slots would: every kept entry reachable, none after its old place (in
    cyclic order from just after the first empty slot, where rewrite_order
    starts writing)."""
    rng = np.random.default_rng(7)
    for trial in range(300):
        sps = int(rng.integers(4, 300))
        m = int(rng.integers(0, int(sps * 0.9)))
        if trial % 2:  # homes crowded at the end: exercises the wrap-around
            tags = (rng.integers(sps - 4, sps + 3, m) % sps) + sps * rng.integers(1, 1000, m)
        else:
            tags = rng.integers(1, 2**31, m)
        cur = _probe_insert(sps, tags.tolist())
        rec = cur.view(L.SLOT_DTYPE).reshape(sps)
        keep = rng.random(sps) < rng.random()
        kept = (rec["tag"] != 0) & keep
        new = place_slots(cur, keep)
        assert (new == _backward_shift_delete(cur, np.nonzero((rec["tag"] != 0) & ~keep)[0])).all(), trial
        nrec = new.view(L.SLOT_DTYPE).reshape(sps)
        tags = nrec["tag"]
        assert sorted(nrec["loc"][tags != 0].tolist()) == sorted(rec["loc"][kept].tolist())
        start = int(np.nonzero(rec["tag"] == 0)[0][0]) + 1
        old_at = {int(o): i for i, o in zip(np.nonzero(kept)[0].tolist(), rec["loc"][kept].tolist())}
        for i in np.nonzero(tags)[0].tolist():
            assert (i - start) % sps <= (old_at[int(nrec["loc"][i])] - start) % sps, "moved past its old place"
            j = int(tags[i]) % sps
            while j != i:
                assert tags[j] != 0, f"slot {i} unreachable from its home {int(tags[i]) % sps}"
                j = (j + 1) % sps


# --------------------------------------------------------------- snapshots
def test_snapshot_round_trip_through_a_daemon_restart(make_cache, cache_name, daemon, tmp_path):
    snap = tmp_path / "data" / "app.snap"  # the daemon creates the directory
    c = make_cache(size="8MiB")
    values = {f"k{i}": (f"value {i}" if i % 3 else {"n": i}) for i in range(2000)}
    c.set_many({k: v for k, v in values.items() if int(k[1:]) % 2}, ttl=300)
    c.set_many({k: v for k, v in values.items() if not int(k[1:]) % 2})
    # brief: long enough to outlive a daemon start on a loaded machine (1 s did not)
    c.set_many({f"brief{i}": i for i in range(300)}, ttl=5.0)
    brief_deadline = time.time() + 5.0
    deadline = time.time() + 300
    d = daemon("--snapshot", str(snap), "--snapshot-every", "0", "--expire-every", "0")
    info = _snapshot_now(d, snap)
    assert info.entries == 2300
    d.kill()  # SIGKILL: only the file on disk survives
    c.close()
    Cache.unlink(cache_name)
    time.sleep(max(0.0, brief_deadline - time.time()) + 0.1)  # the brief keys expire while nothing runs
    d2 = daemon("--size", "8MiB", "--snapshot", str(snap), "--expire-every", "0")
    assert "restored" in d2.log()
    with Cache(cache_name, create=False) as c2:
        assert len(c2) == 2000
        for k, v in values.items():
            assert c2.get(k) == v
            if int(k[1:]) % 2:
                assert c2.ttl(k) == pytest.approx(deadline - time.time(), abs=2.0)
            else:
                assert c2.ttl(k) is None
        assert all(f"brief{i}" not in c2 for i in range(300))
        assert c2.check() == []


def test_snapshot_while_two_writers_hammer_the_cache(make_cache, cache_name, daemon, tmp_path):
    snap = tmp_path / "w.snap"
    c = make_cache(size="4MiB", stripes=4)
    d = daemon("--snapshot", str(snap), "--snapshot-every", "0", "--expire-every", "0.05")
    procs = [CTX.Process(target=_writer, args=(c.name, w, 3.0, None)) for w in range(2)]
    for p in procs:
        p.start()
    try:
        _wait(lambda: c.stats()["items"] > 1000, what="the writers to start")
        infos = [_snapshot_now(d, snap) for _ in range(3)]  # each verified (all checksums)
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert all(i.entries > 0 for i in infos)
    assert verify_snapshot(snap).entries == infos[-1].entries
    with Cache(f"{cache_name}-r", size="8MiB") as dst:
        try:
            r = restore_snapshot(dst, snap)
            assert r.loaded == infos[-1].entries
            items = dst.items()
            assert items and all(_value_ok(k, v) for k, v in items)
            assert dst.check() == []
        finally:
            Cache.unlink(dst.name)
    assert c.check() == []


def test_crash_during_a_snapshot_leaves_the_previous_one_intact(make_cache, daemon, tmp_path):
    snap = tmp_path / "c.snap"
    c = make_cache(size="8MiB", stripes=8)
    c.set_many({f"old{i}": f"v{i}" for i in range(1000)})
    write_snapshot(c, snap)  # the previous, good snapshot
    before = snap.read_bytes()
    c.set_many({f"new{i}": f"n{i}" for i in range(1000)})
    d = daemon("--snapshot", str(snap), "--snapshot-every", "0", env={PAUSE_ENV: "60"})
    os.kill(d.pid, signal.SIGUSR1)

    def temp():
        found = list(tmp_path.glob(f"c.snap.tmp.{d.pid}.*"))
        return found[0] if found and found[0].stat().st_size > 0 else None

    _wait(temp, what="the daemon to start writing")
    tmp = temp()
    d.kill()  # SIGKILL mid-file
    assert tmp.exists()  # the half-written temp file, never renamed
    assert snap.read_bytes() == before
    assert verify_snapshot(snap).entries == 1000
    with Cache(f"{c.name}-r", size="8MiB") as dst:
        try:
            assert restore_snapshot(dst, snap).loaded == 1000
            assert dst.get("old7") == "v7" and "new7" not in dst
        finally:
            Cache.unlink(dst.name)
    write_snapshot(c, snap)  # the next writer clears the dead one's temp file
    assert not tmp.exists()


def test_final_snapshot_on_sigterm_and_sigint(make_cache, daemon, tmp_path):
    c = make_cache()
    for sig in (signal.SIGTERM, signal.SIGINT):
        snap = tmp_path / f"{sig.name}.snap"
        d = daemon("--snapshot", str(snap), "--snapshot-every", "0")
        c[sig.name] = "bye"
        assert d.stop(sig) == 0
        assert verify_snapshot(snap).entries == len(c)
        assert "stopping" in d.log() and "daemon stopped" in d.log()


def test_periodic_snapshots_and_one_log_line_each(make_cache, daemon, tmp_path):
    snap = tmp_path / "p.snap"
    c = make_cache()
    c.update({"a": 1, "b": 2})
    d = daemon("--snapshot", str(snap), "--snapshot-every", "0.2")
    mark = f"snapshot {snap}: "
    _wait(lambda: d.log().count(mark) >= 2, what="two periodic snapshots")
    line = [ln for ln in d.log().splitlines() if mark in ln][0]
    assert "2 entries" in line and " B in " in line and " s (" in line
    assert verify_snapshot(snap).entries == 2


def test_corrupt_snapshot_at_start_is_set_aside_and_the_daemon_runs(make_cache, daemon, tmp_path):
    snap = tmp_path / "bad.snap"
    snap.write_bytes(b"SHMCSNAP" + b"\x01" * 100)
    c = make_cache()
    d = daemon("--snapshot", str(snap), "--snapshot-every", "0")
    assert "snapshot not loaded" in d.log()
    aside = glob.glob(str(snap) + ".bad-*")
    assert len(aside) == 1 and open(aside[0], "rb").read().startswith(b"SHMCSNAP")
    c["after"] = 1
    assert d.stop() == 0
    assert verify_snapshot(snap).entries == 1


def test_attaching_daemon_does_not_load_over_a_warm_cache(make_cache, daemon, tmp_path):
    snap = tmp_path / "s.snap"
    c = make_cache()
    c["k"] = "snapshot value"
    write_snapshot(c, snap)
    c["k"] = "newer value"
    d = daemon("--snapshot", str(snap), "--snapshot-every", "0")
    assert "not loading snapshot" in d.log()
    assert c["k"] == "newer value"


# ---------------------------------------------------------------- recovery
def test_daemon_releases_a_stripe_whose_holder_was_killed(make_cache, daemon):
    c = make_cache(size="4MiB", stripes=4)
    c.set_many({f"k{i}": i for i in range(400)})
    s = 2
    d = daemon("--recover-every", "0.1")
    ready = CTX.Event()
    p = CTX.Process(target=_hold_stripe_lock, args=(c.name, s, ready))
    p.start()
    try:
        assert ready.wait(20)
        assert admin.stripes(c)[s].locked_by == p.pid
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)

    _wait(lambda: admin.lock_holders(c)[s] is None, timeout=10, what="the daemon to release the dead holder's stripe")
    assert c.check() == []
    assert c.stats()["recoveries"] >= 1
    assert "recovered stripes [2]" in d.log()
    assert len(c) == 400 and c.get("k7") == 7


def test_daemon_frees_client_slots_of_dead_processes(make_cache, daemon):
    c = make_cache()
    ready = CTX.Event()
    p = CTX.Process(target=_attach_and_sleep, args=(c.name, ready))
    p.start()
    try:
        assert ready.wait(20)
        assert p.pid in [x.pid for x in admin.clients(c)]
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
    daemon("--recover-every", "0.1")
    _wait(lambda: p.pid not in [x.pid for x in admin.clients(c)],
          what="the dead client's slot to be freed")


# --------------------------------------------------------- one per cache
def test_second_daemon_refuses_with_a_clear_message(make_cache, cache_name, daemon):
    make_cache()
    d = daemon()
    r = subprocess.run([sys.executable, "-m", "shmcache", "daemon", "--name", cache_name],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == (
        f"shmcache: a daemon (pid {d.pid}) is already running for cache {cache_name!r}; "
        f"stop it first (kill -TERM {d.pid})"
    )
    assert "Traceback" not in r.stderr
    assert d.proc.poll() is None  # the first one is unharmed


def test_heartbeat_is_visible_in_stats(make_cache, daemon):
    c = make_cache()
    assert c.stats()["daemon_alive"] is False
    d = daemon("--expire-every", "0.05")
    st = c.stats()
    assert st["daemon_pid"] == d.pid and st["daemon_alive"] is True
    assert st["daemon_heartbeat_age"] < 5.0

    def beat():
        return admin.daemon_info(c).heartbeat

    b0 = beat()
    _wait(lambda: beat() > b0, what="the heartbeat to move")
    assert d.stop() == 0
    st = c.stats()
    assert st["daemon_alive"] is False and st["daemon_pid"] is None


def test_daemon_is_a_new_cache_creator_with_the_given_layout(cache_name, daemon):
    daemon("--size", "4MiB", "--stripes", "2")
    with Cache(cache_name, create=False) as c:
        st = c.stats()
        assert st["stripes"] == 2 and st["size"] <= 4 * 2**20


def test_recover_takes_over_a_lock_word_that_names_no_live_client(make_cache):
    """A stripe lock word that names no live client (damage, or a holder's
    slot long gone) would block that stripe's writers until one of them
    noticed; the daemon's recovery pass frees it, repairs the stripe, and
    leaves the held and the free stripes alone."""
    c = make_cache(size="1MiB", stripes=4)
    c.set_many({f"k{i}": i for i in range(100)})
    off = c._g.stripe_table_off + 2 * L.STRIPE_SIZE + L.S_LOCK
    L.U64.pack_into(c._seg.mm, off, L.lock_word(c._g.max_clients - 1, 3))  # a slot nobody holds
    c._locks.lock(1)  # a live holder: left alone
    try:
        assert admin.lock_holders(c) == [None, c._state.client.slot, c._g.max_clients - 1, None]
        assert admin.recover(c)[0] == [2]
        assert admin.lock_holders(c) == [None, c._state.client.slot, None, None]
    finally:
        c._locks.unlock(1)
    assert c.stats()["recoveries"] == 1
    c["k"] = b"v"
    assert c["k"] == b"v" and c.check() == [] and all(c[f"k{i}"] == i for i in range(100))


@pytest.mark.parametrize("bad", [dict(metrics="no-port"), dict(track_prefixes=["app:"])])
def test_regression_a_daemon_refused_for_a_bad_argument_keeps_no_snapshot_lock(cache_name, tmp_path, bad):
    # The snapshot file's lock was taken before --metrics was parsed: a bad
    # address raised with the lock's descriptor still open, and every later
    # Daemon in the process was refused as "another daemon writes" the file.
    from shmcache.daemon import Daemon

    snap = str(tmp_path / "c.snap")
    with pytest.raises(ValueError):
        Daemon(cache_name, size="1MiB", snapshot=snap, **bad)
    assert not os.path.exists(f"/dev/shm/shmcache.{cache_name}")  # refused before creating anything
    d = Daemon(cache_name, size="1MiB", snapshot=snap)
    d.close()
    Cache.unlink(cache_name)
