"""Where shmcache is deployed: small or missing /dev/shm, other users, other
settings. Each test runs the real thing (root, which CI is): private mount
namespaces with their own tmpfs on /dev/shm (`unshare -m`), real users.
Skipped with the reason when the kernel or the tools refuse.
"""

import json
import multiprocessing as mp
import os
import shutil
import signal
import re
import subprocess
import sys
import textwrap
import time
import warnings

import psutil
import pytest

import shmcache
from shmcache import Cache, admin, layout
from shmcache.segment import shm_path
from test_crash import keys_in_stripe
from names import fresh_name
from test_daemon import daemon  # noqa: F401 - the fixture

CTX = mp.get_context("fork")

ROOT = os.geteuid() == 0


def _can_unshare() -> str | None:
    if not ROOT:
        return "needs root (CI runs as root)"
    if not shutil.which("unshare"):
        return "no unshare(1)"
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if r.returncode:
        return f"the kernel refuses unshare -m: {r.stderr.strip()}"
    return None


NO_UNSHARE = _can_unshare()
needs_unshare = pytest.mark.skipif(NO_UNSHARE is not None, reason=NO_UNSHARE or "")


def catch(expr: str, exc: str) -> str:
    """Python source printing ``ERR <message>`` when ``expr`` raises shmcache.<exc>."""
    return f"import shmcache\ntry:\n    {expr}\nexcept shmcache.{exc} as e:\n    print('ERR', e)\n"


def in_private_shm(code: str, mount: str = "mount -t tmpfs -o size=64m tmpfs /dev/shm", timeout: float = 120):
    """Run Python ``code`` in a private mount namespace after ``mount``: a fresh
    tmpfs on /dev/shm by default (Docker's 64 MiB). A new superblock, so nothing
    done inside (filling it, a read-only mount) reaches the host's /dev/shm."""
    script = f"{mount} && exec {sys.executable} -c \"$0\""
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=timeout)
    return r


# ---------------------------------------------------------------- reservation
@needs_unshare
def test_regression_cache_larger_than_dev_shm_is_refused_not_sigbus():
    # Docker's default 64 MiB /dev/shm: a 256 MiB cache used to open fine and
    # die of SIGBUS once writes passed 64 MiB.
    r = in_private_shm("""
        import os, shmcache
        try:
            shmcache.Cache("big", size="256MiB")
        except shmcache.OutOfSharedMemory as e:
            print("ERR", e)
        print("LEFT", sorted(os.listdir("/dev/shm")))
    """)
    assert r.returncode == 0, r.stderr
    err = r.stdout.split("ERR ", 1)[1].splitlines()[0]
    # the size it needs: the laid-out segment (whole arena segments only), the cache's one file
    needs = re.search(r"'big' needs ([0-9.]+) MiB \((\d+) bytes\) of shared memory", err)
    assert needs and 250 < float(needs[1]) <= 256.3, err
    assert int(needs[2]) == layout.compute_geometry("256MiB").total_size, err
    assert "64.0 MiB" in err and "free" in err  # the free space
    assert "--shm-size=" in err and "emptyDir" in err and "medium: Memory" in err and "smaller" in err
    assert "LEFT []" in r.stdout  # nothing of the refused cache stays behind


@needs_unshare
def test_default_cache_needs_exactly_its_segment():
    # The reservation is the segment and nothing else (up to layout 5 it was
    # also a page per stripe semaphore): the default cache fits a tmpfs
    # exactly its segment's size and fills it to eviction; one page less and
    # it is refused, naming the segment's size and what would fit.
    seg = layout.compute_geometry("64MiB").total_size
    assert seg % 4096 == 0
    r = in_private_shm("""
        import os, shmcache
        c = shmcache.Cache("dflt")
        v = os.urandom(4000)
        for i in range(20000):
            c.set(f"k{i}", v)
        print("OK", c.stats()["evictions"] > 0, c.check() == [], sorted(os.listdir("/dev/shm")))
    """, mount=f"mount -t tmpfs -o size={seg} tmpfs /dev/shm")
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "OK True True ['shmcache.dflt']" in r.stdout, r.stdout
    r = in_private_shm(catch('shmcache.Cache("dflt")', "OutOfSharedMemory") + "import os\nprint('LEFT', os.listdir('/dev/shm'))",
                       mount=f"mount -t tmpfs -o size={seg - 4096} tmpfs /dev/shm")
    assert r.returncode == 0, r.stderr
    assert f"ERR cache 'dflt' needs 63.3 MiB ({seg} bytes) of shared memory, but /dev/shm has " in r.stdout, r.stdout
    assert f"({seg - 4096} bytes) free" in r.stdout and 'size="63MiB" fits now' in r.stdout, r.stdout
    assert "LEFT []" in r.stdout, r.stdout


@needs_unshare
def test_default_cache_fits_dockers_default_dev_shm():
    # The default 64 MiB cache lays out whole arena segments, a little under
    # 64 MiB, so it fits Docker's default /dev/shm and fills
    # to eviction there without a signal.
    r = in_private_shm("""
        import os, shmcache
        c = shmcache.Cache("dflt")
        v = os.urandom(4000)
        for i in range(20000):  # ~80 MB of values
            c.set(f"k{i}", v)
        st = c.stats()
        print("OK", st["evictions"] > 0, c.get("k19999") == v)
        c.close(); shmcache.Cache.unlink("dflt")
    """)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "OK True True" in r.stdout, r.stdout


@needs_unshare
def test_cache_that_fits_fills_to_eviction_without_a_signal():
    r = in_private_shm("""
        import os, shmcache
        c = shmcache.Cache("fits", size="48MiB")
        v = os.urandom(4000)
        for i in range(16000):  # ~64 MB of values into a 48 MiB cache
            c.set(str(i), v)
        st = c.stats()
        print("EVICTED", st["evictions"], "CHECK", c.check(), "LAST", c.get("15999") == v)
        c.close(); shmcache.Cache.unlink("fits")
        print("LEFT", sorted(os.listdir("/dev/shm")))
    """)
    assert r.returncode == 0, (r.returncode, r.stderr)  # -7 / 135 would be SIGBUS
    evicted = int(r.stdout.split("EVICTED ")[1].split()[0])
    assert evicted > 0
    assert "CHECK [] LAST True" in r.stdout and "LEFT []" in r.stdout


@needs_unshare
def test_snapshot_restore_into_a_new_cache_too_large_is_refused(tmp_path):
    snap = tmp_path / "s.snap"
    with Cache("i9-restore-src-" + os.urandom(4).hex(), size="1MiB") as src:
        try:
            src.set("k", b"v")
            r0 = subprocess.run([sys.executable, "-m", "shmcache", "snapshot", "-n", src.name, str(snap)],
                                capture_output=True, text=True, timeout=60)
            assert r0.returncode == 0, r0.stderr
        finally:
            Cache.unlink(src.name)
    r = in_private_shm(f"""
        import os, sys
        from shmcache.cli import main
        rc = main(["restore", "-n", "dst", "--size", "256MiB", {str(snap)!r}])
        print("RC", rc, "LEFT", sorted(os.listdir("/dev/shm")))
    """)
    assert "RC 1 LEFT []" in r.stdout, (r.stdout, r.stderr)
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("shmcache: cache 'dst' needs") and "--shm-size" in line[0]


@needs_unshare
def test_no_inode_left_for_the_segment_is_a_clear_error_and_one_is_enough():
    # Enough bytes, no inode (a tmpfs mounted with a small nr_inodes, all taken
    # by other files): creating the segment's file fails, and the error names
    # the cause (inodes, not bytes: 64 MiB were free) and the fix. Nothing of
    # the refused cache stays behind. One free inode is enough for a cache of
    # any stripe count: it is one file (up to layout 5, one more per stripe).
    r = in_private_shm("""
        import os, shmcache
        n = 0
        while True:
            try:
                open(f"/dev/shm/other.{n}", "w").close()
            except OSError:
                break
            n += 1
        print("OTHERS", n, "FREE", os.statvfs("/dev/shm").f_favail)
        try:
            shmcache.Cache("ino", size="16MiB", stripes=64)
        except shmcache.OutOfSharedMemory as e:
            print("ERR", e)
        print("LEFT", sorted(os.listdir("/dev/shm")))
        os.unlink("/dev/shm/other.0")
        with shmcache.Cache("ino", size="16MiB", stripes=64) as c:
            c.set_many({f"k{i}": i for i in range(1000)})
            print("MADE", len(c), c.check(), sorted(f for f in os.listdir("/dev/shm") if not f.startswith("other.")))
    """, mount="mount -t tmpfs -o size=64m,nr_inodes=6 tmpfs /dev/shm")
    assert r.returncode == 0, r.stderr
    assert "OTHERS 5 FREE 0" in r.stdout, r.stdout
    assert "ERR cache 'ino' needs a file in /dev/shm, but /dev/shm has run out of inodes (6 in all, none free)" \
        in r.stdout, r.stdout
    assert "64.0 MiB free" in r.stdout and "nr_inodes" in r.stdout and "shmcache rm" in r.stdout, r.stdout
    assert "LEFT ['other.0', 'other.1', 'other.2', 'other.3', 'other.4']" in r.stdout, r.stdout
    assert "MADE 1000 [] ['shmcache.ino']" in r.stdout, r.stdout


# ---------------------------------------------------------- environment errors
@needs_unshare
def test_read_only_dev_shm_is_a_clear_error():
    r = in_private_shm(catch('shmcache.Cache("ro")', "SharedMemoryUnavailable"), mount="mount -t tmpfs -o ro,size=1m tmpfs /dev/shm")
    assert r.returncode == 0, r.stderr
    assert "ERR /dev/shm is read-only" in r.stdout and "emptyDir" in r.stdout
    # the CLI says the same in one line
    r = in_private_shm("from shmcache.cli import main\nraise SystemExit(main(['create', '-n', 'ro']))",
                       mount="mount -t tmpfs -o ro,size=1m tmpfs /dev/shm")
    assert r.returncode == 1 and r.stderr.startswith("shmcache: /dev/shm is read-only") and r.stderr.count("\n") == 1


@needs_unshare
def test_missing_dev_shm_is_a_clear_error():
    r = in_private_shm(catch('shmcache.Cache("nodir")', "SharedMemoryUnavailable"), mount="mount -t tmpfs -o size=1m tmpfs /dev")
    assert r.returncode == 0, r.stderr
    assert "ERR /dev/shm does not exist" in r.stdout and "mount -t tmpfs" in r.stdout
    r = in_private_shm("from shmcache.cli import main\nraise SystemExit(main(['create', '-n', 'nodir']))",
                       mount="mount -t tmpfs -o size=1m tmpfs /dev")
    assert r.returncode == 1 and r.stderr.startswith("shmcache: /dev/shm does not exist") and r.stderr.count("\n") == 1


def test_name_taken_by_a_directory_is_a_clear_error(cache_name):
    path = f"/dev/shm/shmcache.{cache_name}"
    os.mkdir(path)
    try:
        with pytest.raises(shmcache.SharedMemoryUnavailable, match="not a shmcache segment"):
            Cache(cache_name, size="1MiB")
    finally:
        os.rmdir(path)


# ------------------------------------------------------- attach, other settings
def test_attach_with_other_settings_warns_once_naming_each(make_cache, cache_name):
    make_cache(size="1MiB")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        make_cache(size="64MiB", policy="noeviction")
        make_cache(size="64MiB", policy="noeviction")
    msgs = [str(x.message) for x in w if issubclass(x.category, shmcache.SettingsIgnored)]
    assert len(msgs) == 1, msgs
    assert "size='64MiB' (it has 1" in msgs[0] and "policy='noeviction' (it has 'lru')" in msgs[0]
    assert f"shmcache rm {cache_name}" in msgs[0]


def test_attach_without_layout_settings_or_with_the_same_ones_is_silent(make_cache):
    make_cache(size="1MiB", policy="noeviction")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_cache(size=None)
        make_cache(size="1MiB", policy="noeviction", lock_timeout=2.0)


@pytest.mark.parametrize("size", ["16MiB", "64MiB", "3MiB", "1000000", "12345678"])
def test_regression_reopening_with_the_size_it_was_created_with_is_silent(make_cache, size):
    # The creator cuts each stripe's arena into whole segments, so a 16 MiB
    # cache is 16,658,432 bytes; reopening with size="16MiB" warned that the
    # size was ignored (the check allowed only a page per stripe of rounding).
    make_cache(size=size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_cache(size=size, strict=True)
        make_cache(size=size)
    with pytest.raises(shmcache.SettingsMismatch, match="size="):
        make_cache(size=layout.parse_size(size) * 2, strict=True)


def test_attach_with_other_settings_strict_is_an_error(make_cache):
    make_cache(size="1MiB", mode=0o600)
    with pytest.raises(shmcache.SettingsMismatch, match=r"mode='0o660' \(it has 0o600\)"):
        make_cache(size="1MiB", mode=0o660, strict=True)


# Every layout setting a cache keeps from its creation, and another value of each.
CREATED = dict(size="2MiB", stripes=4, max_items=4000, max_key_size=256, max_value_size=8192, max_clients=64,
               policy="lru")
OTHER = dict(size="4MiB", stripes=8, max_items=8000, max_key_size=512, max_value_size=4096, max_clients=128,
             policy="noeviction")


def test_attach_with_every_creation_setting_again_is_silent_even_strict(make_cache):
    make_cache(**CREATED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_cache(**CREATED, strict=True)
        make_cache(**CREATED)


@pytest.mark.parametrize("setting", sorted(OTHER))
def test_attach_names_each_ignored_setting_with_its_real_value(make_cache, cache_name, setting):
    g = admin.geometry(make_cache(**CREATED))
    real = dict(size=f"{g.total_size} bytes", stripes="4", max_items=str(g.max_items), max_key_size="256",
                max_value_size="8192", max_clients="64", policy="'lru'")
    other = {**CREATED, setting: OTHER[setting]}
    probe = make_cache(size=None)
    clients = probe.stats()["clients"]
    with pytest.raises(shmcache.SettingsMismatch) as e:
        make_cache(**other, strict=True)
    msg = str(e.value)
    assert f"{setting}={OTHER[setting]!r} (it has {real[setting]})" in msg and msg.count("(it has ") == 1, msg
    assert probe.stats()["clients"] == clients  # the refused attach kept no client slot
    # Without strict: the same words once, as a warning pointing at the caller's line.
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        Cache(cache_name, **other).close()
        Cache(cache_name, **other).close()
    ignored = [x for x in w if issubclass(x.category, shmcache.SettingsIgnored)]
    assert [str(x.message) for x in ignored] == [msg]
    assert ignored[0].filename == __file__


# ------------------------------------------- liveness across PID namespaces
def _can_unshare_pid() -> str | None:
    if NO_UNSHARE:
        return NO_UNSHARE
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    return f"the kernel refuses a PID namespace: {r.stderr.strip()}" if r.returncode else None


NO_PIDNS = _can_unshare_pid()
needs_pidns = pytest.mark.skipif(NO_PIDNS is not None, reason=NO_PIDNS or "")

# The holder, pid 1 of its own PID namespace (its own /proc): attach, take
# stripe S, say so (with its client slot, which its lock word names), hold it
# until the flag file appears, release, write once more.
HOLDER = """
import os, sys, time
from shmcache import Cache, admin, layout
name, s, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = Cache(name, create=False)
locks = admin.storage(c).locks
locks.lock(s)
print("HOLDING", os.getpid(), admin.current_client(c)[0], flush=True)
while not os.path.exists(flag):
    time.sleep(0.01)
locks.unlock(s)
c.set("from-the-holder", b"h" * 100)
print("RELEASED", flush=True)
"""


def _writer(name, keys, lock_timeout, done, t_first):
    c = Cache(name, create=False, lock_timeout=lock_timeout)
    for i, k in enumerate(keys):
        c.set(k, k.encode() * 50)
        if i == 0:
            t_first.value = time.monotonic()
        done.value += 1
    c.close()


def _start_foreign_holder(name, s, flag):
    """The holder in a new PID namespace; returns (unshare Popen, holder's host pid, its client slot)."""
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", HOLDER,
                          name, str(s), flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("HOLDING 1 "), (line, p.stderr.read() if p.poll() is not None else "")
    host_pid = psutil.Process(p.pid).children()[0].pid
    return p, host_pid, int(line.split()[2])


@needs_pidns
@pytest.mark.timeout(120)
def test_regression_live_holder_in_another_pid_namespace_is_never_taken_over(make_cache, cache_name, tmp_path):
    # A pid + start time owner record meant nothing across PID namespaces: the
    # host judged this live holder (pid 1 over there) dead after lock_timeout
    # and "recovered" its stripe while it held it (in layout 5 the semaphore
    # then ended at 2). Now the stripe's lock word must keep naming the stopped
    # holder's client slot, never free, never another slot, until it releases.
    cache = make_cache(size="2MiB", stripes=4)
    s = 1
    keys = keys_in_stripe(4, s, 20, "host")
    flag = str(tmp_path / "release")
    p, host_pid, slot = _start_foreign_holder(cache_name, s, flag)
    assert admin.lock_holders(cache)[s] == slot
    done, t_first = CTX.Value("i", 0), CTX.Value("d", 0.0)
    w = CTX.Process(target=_writer, args=(cache_name, keys, 0.2, done, t_first))
    try:
        os.kill(host_pid, signal.SIGSTOP)
        w.start()
        holders = set()
        t_end = time.monotonic() + 3.0  # 15 x lock_timeout
        while time.monotonic() < t_end:
            holders.add(admin.lock_holders(cache)[s])
            time.sleep(0.01)
        assert done.value == 0, "the writer took over a stopped, live holder's stripe"
        assert holders == {slot}, holders
        assert cache.stats()["recoveries"] == 0
        open(flag, "w").close()
        os.kill(host_pid, signal.SIGCONT)
        assert p.wait(30) == 0 and "RELEASED" in p.stdout.read()
        w.join(30)
        assert w.exitcode == 0 and done.value == len(keys)
        assert admin.lock_holders(cache)[s] is None
        for k in keys:
            assert cache.get(k) == k.encode() * 50
        assert cache.get("from-the-holder") == b"h" * 100
        assert cache.check() == [] and cache.stats()["recoveries"] == 0
    finally:
        _stop_all(p, host_pid, w)


@needs_pidns
@pytest.mark.timeout(120)
def test_killed_holder_in_another_pid_namespace_is_recovered_at_once(make_cache, cache_name, tmp_path):
    # lock_timeout=30: progress within the bounded join below can only come
    # from the kernel saying the holder's client lock is gone, not a timeout.
    cache = make_cache(size="2MiB", stripes=4)
    s = 2
    before = {k: k.encode() * 50 for k in keys_in_stripe(4, s, 10, "pre")}
    for k, v in before.items():
        cache.set(k, v)
    keys = keys_in_stripe(4, s, 20, "host")
    p, host_pid, slot = _start_foreign_holder(cache_name, s, str(tmp_path / "never"))
    done, t_first = CTX.Value("i", 0), CTX.Value("d", 0.0)
    w = CTX.Process(target=_writer, args=(cache_name, keys, 30.0, done, t_first))
    try:
        os.kill(host_pid, signal.SIGSTOP)
        w.start()
        time.sleep(1.0)
        assert done.value == 0
        assert admin.lock_holders(cache)[s] == slot and cache.stats()["recoveries"] == 0
        t_kill = time.monotonic()
        os.kill(host_pid, signal.SIGKILL)
        w.join(10)  # a third of lock_timeout
        assert w.exitcode == 0, "the writer did not get past the killed holder"
        print(f"stall after SIGKILL of a holder in another PID namespace: {(t_first.value - t_kill) * 1e3:.1f} ms")
        assert admin.lock_holders(cache)[s] is None
        for k, v in {**before, **{k: k.encode() * 50 for k in keys}}.items():
            assert cache.get(k) == v
        assert cache.check() == [] and cache.stats()["recoveries"] == 1
    finally:
        _stop_all(p, host_pid, w)


def _stop_all(p, host_pid, w):
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(host_pid, sig)
        except ProcessLookupError:
            pass
    p.wait(30)
    if w.pid is not None:
        w.join(30)
        if w.exitcode is None:
            w.kill()
            w.join(5)


def _wait_zombie(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the killed process did not die"
        time.sleep(0.01)


def _hold_with_a_forked_child(name, s, ready, child_pid):
    c = Cache(name, create=False)
    pid = os.fork()
    if pid == 0:  # the child keeps the mapping and everything fork copied, and lives on
        time.sleep(60)
        os._exit(0)
    child_pid.value = pid
    admin.storage(c).locks.lock(s)
    ready.set()
    time.sleep(60)


@pytest.mark.timeout(120)
def test_regression_forked_child_does_not_keep_a_dead_parent_alive(make_cache, cache_name):
    # OFD locks are shared with a forked child through the inherited open file
    # description: unless the child drops it, a parent killed while holding a
    # stripe would look alive for as long as the child lives.
    cache = make_cache(size="2MiB", stripes=4)
    s = 3
    ready, child = CTX.Event(), CTX.Value("i", 0)
    p = CTX.Process(target=_hold_with_a_forked_child, args=(cache_name, s, ready, child))
    p.start()
    try:
        assert ready.wait(30)
        assert psutil.pid_exists(child.value)
        p.kill()
        # not p.join(): the child inherited p's sentinel pipe, which stays open
        _wait_zombie(p.pid)
        done, t_first = CTX.Value("i", 0), CTX.Value("d", 0.0)
        w = CTX.Process(target=_writer, args=(cache_name, keys_in_stripe(4, s, 3, "w"), 30.0, done, t_first))
        w.start()
        w.join(10)  # lock_timeout is 30 s
        assert w.exitcode == 0 and done.value == 3
        assert cache.stats()["recoveries"] == 1 and cache.check() == []
    finally:
        if child.value:
            os.kill(child.value, signal.SIGKILL)
        p.join(5)


def test_closing_another_handle_of_the_same_cache_keeps_us_alive(make_cache, cache_name):
    # Classic POSIX locks die when the process closes *any* fd of the file; the
    # client locks are OFD locks, which only their own descriptor's close ends.
    a = make_cache(size="1MiB")
    b = make_cache(size="1MiB")
    me = admin.current_client(a)
    b.close()
    Cache.unlink("no-such-cache-" + os.urandom(4).hex())
    assert admin.client_attached(a, *me)
    assert a.stats()["clients"] == 1


# ------------------------------------------------------------- daemon ops
def _shmcache(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_regression_daemon_with_snapshot_under_a_file_exits_at_once(cache_name, tmp_path):
    (tmp_path / "file").write_text("x")
    r = _shmcache("daemon", "-n", cache_name, "--snapshot", str(tmp_path / "file" / "x.snap"), timeout=30)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "not writable" in r.stderr and str(tmp_path / "file") in r.stderr
    assert not os.path.exists(f"/dev/shm/shmcache.{cache_name}")  # refused before creating anything


@needs_unshare
def test_regression_daemon_with_read_only_snapshot_dir_exits_at_once(cache_name, tmp_path):
    # It used to start, log an error every interval, and exit 0.
    ro = tmp_path / "ro"
    ro.mkdir()
    r = in_private_shm(f"""
        import sys
        from shmcache.cli import main
        sys.exit(main(["daemon", "-n", {cache_name!r}, "--snapshot", {str(ro / 'x.snap')!r}]))
    """, mount=f"mount -t tmpfs -o ro,size=1m tmpfs {ro}", timeout=30)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"shmcache: snapshot directory {ro} is not writable (Read-only file system)")


def test_daemon_exits_1_when_its_last_snapshot_failed(daemon, tmp_path, cache_name):
    d = daemon("--snapshot", str(tmp_path / "d" / "x.snap"), "--snapshot-every", "0")
    shutil.rmtree(tmp_path / "d")
    (tmp_path / "d").write_text("the directory is gone")  # the final snapshot cannot be written
    assert d.stop() == 1
    assert "last snapshot failed" in d.log()


def test_daemon_exits_0_when_its_last_snapshot_worked(daemon, tmp_path):
    d = daemon("--snapshot", str(tmp_path / "x.snap"), "--snapshot-every", "0")
    assert d.stop() == 0


def test_sd_notify_ready_status_watchdog_stopping(daemon, tmp_path, cache_name):
    s, addr = _notify_socket()
    try:
        d = daemon("--snapshot", str(tmp_path / "x.snap"), "--snapshot-every", "0",
                   env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "200000"})
        got = []
        while sum("WATCHDOG=1" in m for m in got) < 3:
            got.append(s.recv(4096).decode())
        ready = [m for m in got if "READY=1" in m]
        assert len(ready) == 1 and f"STATUS=serving cache {cache_name!r}" in ready[0]
        assert got.index(ready[0]) <= 1  # READY comes first (a watchdog ping may precede it)
        d.proc.send_signal(signal.SIGTERM)
        _recv_until(s, "STOPPING=1", [])
        assert d.stop() == 0
    finally:
        s.close()


def _notify_socket():
    """A datagram socket in the abstract namespace, as systemd may pass: (socket, NOTIFY_SOCKET value)."""
    import socket

    addr = f"@shmcache-test-{os.urandom(6).hex()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + addr[1:])
    s.settimeout(30)
    return s, addr


def _recv_until(s, word, got):
    """Append the datagrams received to ``got`` up to the first one containing ``word``; return that one."""
    while True:
        m = s.recv(4096).decode()
        got.append(m)
        if word in m:
            return m


@pytest.mark.timeout(120)
def test_sd_notify_ready_after_the_restore_status_after_each_snapshot_no_foreign_watchdog(daemon, tmp_path,
                                                                                         cache_name):
    from shmcache.snapshot import write_snapshot

    # A snapshot the daemon restores at start: READY=1 must wait for it
    # (systemd then starts the web service, which expects a warm cache).
    snap_dir = tmp_path / "snaps"
    snap_dir.mkdir()
    snap = snap_dir / "x.snap"
    n = 20000
    src = fresh_name("notify-src")
    with Cache(src, size="16MiB") as c:
        try:
            c.set_many({f"k{i}": b"v" * 50 for i in range(n)})
            assert len(c) == n
            write_snapshot(c, str(snap))
        finally:
            Cache.unlink(src)
    s, addr = _notify_socket()
    try:
        # WATCHDOG_PID names another process (systemd passes the main pid):
        # the watchdog is not ours, so not one WATCHDOG=1 may come.
        d = daemon("--size", "16MiB", "--snapshot", str(snap), "--snapshot-every", "0", ready=False,
                   env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
        got = []
        ready = _recv_until(s, "READY=1", got)
        with Cache(cache_name, create=False) as c:
            assert len(c) == n  # restored before READY=1
        assert f"STATUS=serving cache {cache_name!r}" in ready
        d.proc.send_signal(signal.SIGUSR1)
        ok = _recv_until(s, "last snapshot", got)
        assert re.fullmatch(rf"STATUS=serving cache {re.escape(repr(cache_name))}; last snapshot "
                            rf"\d\d:\d\d:\d\d: {n} entries", ok), ok
        shutil.rmtree(snap_dir)
        snap_dir.write_text("the directory is gone")  # every snapshot from now on fails
        d.proc.send_signal(signal.SIGUSR1)
        failed = _recv_until(s, "last snapshot", got)
        assert failed.startswith(f"STATUS=serving cache {cache_name!r}; last snapshot FAILED: ") and str(snap_dir) in failed
        d.proc.send_signal(signal.SIGTERM)
        _recv_until(s, "STOPPING=1", got)
        assert d.stop() == 1  # the final snapshot failed too
        assert not any("WATCHDOG=1" in m for m in got), got
    finally:
        s.close()


@pytest.mark.timeout(120)
def test_regression_watchdog_keeps_pinging_through_a_long_snapshot(daemon, tmp_path, cache_name):
    # The loop pinged between jobs only: a snapshot longer than half of
    # WatchdogSec (a large cache, a slow disk) got a working daemon killed
    # by systemd. The test hook pauses the snapshot 1.5 s after its first
    # stripe, longer than the 1 s between pings WATCHDOG_USEC asks for.
    from shmcache.snapshot import PAUSE_ENV

    s, addr = _notify_socket()
    try:
        d = daemon("--size", "1MiB", "--snapshot", str(tmp_path / "x.snap"), "--snapshot-every", "0",
                   env={"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "2000000", PAUSE_ENV: "1.5"})
        got = []
        _recv_until(s, "READY=1", got)
        _recv_until(s, "WATCHDOG=1", got)  # the loop's ping: the next is due in 1 s
        d.proc.send_signal(signal.SIGUSR1)
        during = []
        _recv_until(s, "last snapshot", during)
        assert any("WATCHDOG=1" in m for m in during[:-1]), during
        assert d.stop() == 0
    finally:
        s.close()


def test_shmcache_wait_returns_when_the_daemon_serves_and_times_out_without_one(daemon, make_cache, cache_name):
    r = _shmcache("wait", "-n", cache_name, "--timeout", "0.5")
    assert r.returncode == 1 and r.stderr == f"shmcache: no cache named {cache_name!r} after 0.5 s\n"
    make_cache(size="1MiB")
    r = _shmcache("wait", "-n", cache_name, "--timeout", "0.5")
    assert r.returncode == 1 and r.stderr == f"shmcache: no daemon serves cache {cache_name!r} after 0.5 s\n"
    d = daemon(ready=False)
    r = _shmcache("wait", "-n", cache_name, "--timeout", "60")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"daemon pid {d.pid} serves cache {cache_name!r}\n"
    assert d.stop() == 0
    r = _shmcache("wait", "-n", cache_name, "--timeout", "0.2")
    assert r.returncode == 1


@pytest.mark.parametrize("bad", ["nan", "inf", "-1"])
def test_regression_shmcache_wait_with_a_nan_timeout_is_refused_not_endless(cache_name, bad):
    # A NaN deadline is never reached: `shmcache wait --timeout nan` waited forever.
    r = _shmcache("wait", "-n", cache_name, "--timeout", bad)
    assert r.returncode == 1
    assert r.stderr == (f"shmcache: argument --timeout: {bad!r} is not a number of seconds: it must be finite, "
                        "0 or more and at most 1e+06 (see 'shmcache wait --help')\n")


def test_shmcache_wait_times_out_while_the_daemon_starts_and_after_it_died(daemon, cache_name):
    from shmcache.daemon import Daemon

    # Holds the daemon lock and is recorded, but has not finished starting
    # (run() restores the snapshot, then says it is ready).
    starting = Daemon(cache_name, size="1MiB")
    try:
        r = _shmcache("wait", "-n", cache_name, "--timeout", "0.5")
        assert r.returncode == 1
        assert r.stderr == (f"shmcache: the daemon (pid {os.getpid()}) of cache {cache_name!r} "
                            "is still starting after 0.5 s\n")
    finally:
        starting.close()
    # One that served, then was SIGKILLed: its header still says ready, the kernel says it is gone.
    d = daemon()
    assert _shmcache("wait", "-n", cache_name, "--timeout", "60").returncode == 0
    d.proc.kill()
    assert d.proc.wait(30) == -signal.SIGKILL
    r = _shmcache("wait", "-n", cache_name, "--timeout", "0.5")
    assert r.returncode == 1 and r.stderr == f"shmcache: no daemon serves cache {cache_name!r} after 0.5 s\n"


def test_regression_shmcache_wait_accepts_a_0660_cache_and_honours_owner(daemon, cache_name):
    # The systemd unit's daemon makes a --mode 660 cache, owned by its service
    # user: `shmcache wait` opened it as a 0600 cache and refused it at once,
    # and ignored --owner.
    d = daemon("--mode", "660", "--size", "1MiB")
    r = _shmcache("wait", "-n", cache_name, "--timeout", "30")
    assert r.returncode == 0 and r.stdout == f"daemon pid {d.pid} serves cache {cache_name!r}\n", r.stderr
    if not ROOT:
        return
    os.chown(shm_path(cache_name), 65534, -1)  # now the cache of another (service) user
    r = _shmcache("wait", "-n", cache_name, "--timeout", "30")
    assert r.returncode == 1 and "belongs to" in r.stderr and "--owner 65534" in r.stderr, r.stderr
    r = _shmcache("wait", "-n", cache_name, "--owner", "65534", "--timeout", "30")
    assert r.returncode == 0, r.stderr


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (make test installs systemd when it can)")
    unit = tmp_path / "shmcache-app.service"
    r = _shmcache("systemd-unit", "-n", "app", "--user", "root", "--size", "256MiB")
    assert r.returncode == 0, r.stderr
    unit.write_text(r.stdout)
    lines = r.stdout.splitlines()
    assert "RemoveIPC=no" in lines and not any(x.startswith("DynamicUser=") for x in lines)
    v = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    if v.returncode and "Failed to" in v.stderr and "bus" in v.stderr.lower():
        pytest.skip(f"systemd-analyze refuses to run here: {v.stderr.strip()}")
    assert v.returncode == 0 and v.stderr == "", v.stderr


# ------------------------------------------------------------ other users
needs_useradd = pytest.mark.skipif(not ROOT or not shutil.which("useradd"), reason="needs root and useradd")


def _as_user(uid, gid, groups, fn, q):
    """In a forked child: become ``uid`` for real (setgroups/setgid/setuid), then
    run ``fn`` and report its result. (The interpreter lives under /root, so the
    unprivileged user could not exec it: it is forked as root and drops.)"""
    try:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        q.put(("ok", fn()))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put(("err", f"{type(e).__name__}: {e}"))


def _run_as(user, fn, groups=()):
    import grp
    import pwd

    pw = pwd.getpwnam(user)
    q = CTX.Queue()
    p = CTX.Process(target=_as_user, args=(pw.pw_uid, pw.pw_gid, [pw.pw_gid] + [grp.getgrnam(g).gr_gid for g in groups],
                                           fn, q))
    p.start()
    out = q.get(timeout=60)
    p.join(30)
    assert p.exitcode == 0
    return out


def _open_and_cli(name):
    import contextlib
    import io

    from shmcache.cli import main

    out = {}
    try:
        Cache(name, create=False)
    except shmcache.PermissionDenied as e:
        out["error"] = str(e)
    err, so = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
        out["get_rc"] = main(["get", "-n", name, "k"])
        out["ls_rc"] = main(["ls"])
    out["stderr"], out["stdout"] = err.getvalue(), so.getvalue()
    so = io.StringIO()
    with contextlib.redirect_stdout(so):
        out["ls_json_rc"] = main(["ls", "--json"])
    out["ls_json"] = so.getvalue()
    return out


def _share(name):
    # a cache another user owns: trust that owner and accept the group bits
    with Cache(name, create=False, owner="root", mode=0o660) as c:
        got = c.get("k")
        c.set("from-user", b"hello")
        return got


@pytest.fixture
def user_and_group():
    tag = os.urandom(3).hex()
    user, group = f"shmcu{tag}", f"shmcg{tag}"
    subprocess.run(["groupadd", group], check=True, capture_output=True)
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", "-U", user], check=True, capture_output=True)
    try:
        yield user, group
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        subprocess.run(["groupdel", user], capture_output=True)  # its own group, if userdel left it
        subprocess.run(["groupdel", group], capture_output=True)


@needs_useradd
@pytest.mark.timeout(120)
def test_regression_other_user_gets_permission_denied_naming_owner_and_mode(user_and_group, make_cache, cache_name):
    # It was a raw posix_ipc.PermissionsError; the CLI said "internal error";
    # `shmcache ls` failed outright.
    user, _group = user_and_group
    make_cache(size="1MiB", mode=0o600).set("k", b"v")
    status, out = _run_as(user, lambda: _open_and_cli(cache_name))
    assert status == "ok", out
    err = out["error"]
    assert f"cache {cache_name!r}" in err and "owned by user root (uid 0), group root (gid 0), mode 0600" in err
    assert "mode=0o660" in err and "usermod -aG" in err
    assert out["get_rc"] == 1 and out["stderr"].startswith("shmcache: permission denied opening cache")
    assert out["stderr"].count("\n") == 1
    assert out["ls_rc"] == 0
    row = next(line for line in out["stdout"].splitlines() if line.startswith(cache_name))
    assert row.rstrip().endswith("no access")
    assert out["ls_json_rc"] == 0
    row = next(r for r in json.loads(out["ls_json"]) if r["name"] == cache_name)
    assert row["status"] == "no access" and row["size"] is None and row["items"] is None


@pytest.mark.skipif(not ROOT, reason="needs root to give a cache to another uid")
def test_ls_lists_caches_it_may_not_use_or_that_are_damaged_and_still_succeeds(make_cache, cache_name):
    untrusted, damaged = cache_name, fresh_name("damaged")
    try:
        make_cache(size="1MiB").close()
        os.chown(shm_path(untrusted), 65534, -1)  # now another user's: root must not trust it either
        with Cache(damaged, size="1MiB"):
            pass
        with open(shm_path(damaged), "r+b") as f:
            f.write(bytes(8))  # no magic
        r = _shmcache("ls")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
        assert f"{shm_path(untrusted)} belongs to " in rows[untrusted] and "uid 65534" in rows[untrusted]
        assert "has no shmcache magic" in rows[damaged]
        r = _shmcache("ls", "--json")
        assert r.returncode == 0, r.stderr
        js = {row["name"]: row for row in json.loads(r.stdout)}
        assert js[untrusted]["status"].startswith(f"{shm_path(untrusted)} belongs to ") and js[untrusted]["size"] is None
        assert "has no shmcache magic" in js[damaged]["status"] and js[damaged]["items"] is None
        r = _shmcache("ls", "--json", "--owner", "65534")  # trusting that user, it is listed in full
        mine = next(row for row in json.loads(r.stdout) if row["name"] == untrusted)
        assert mine["status"] == "ok" and mine["items"] == 0 and mine["size"] > 0
    finally:
        Cache.unlink(damaged)


def _create_in_group(name, gid, **kw):
    """Create 0660 cache ``name`` (holding k = b"root wrote this") from a child
    whose group is ``gid``, as a service running with the shared group would."""
    q = CTX.Queue()

    def create():
        os.setgid(gid)
        with Cache(name, mode=0o660, **kw) as c:
            c.set("k", b"root wrote this")
        q.put(True)

    p = CTX.Process(target=create)
    p.start()
    assert q.get(timeout=60)
    p.join(30)


@needs_useradd
@pytest.mark.timeout(120)
def test_other_user_in_the_group_shares_a_0660_cache(user_and_group, cache_name):
    import grp

    user, group = user_and_group
    _create_in_group(cache_name, grp.getgrnam(group).gr_gid, size="1MiB")
    try:
        status, got = _run_as(user, lambda: _share(cache_name), groups=[group])
        assert (status, got) == ("ok", b"root wrote this")
        with Cache(cache_name, create=False, mode=0o660) as c:
            assert c.get("from-user") == b"hello"
            assert c.stats()["clients"] == 1  # the user's process detached
    finally:
        Cache.unlink(cache_name)


def _kernel_at_least(major, minor):
    got = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    return got >= (major, minor)


# As the other user, in a mount namespace whose /proc hides other users'
# processes (hidepid=2, a hardened host): check the holder is hidden, then
# write to its stripe and say whether the holder had released it by then.
HIDEPID_WRITER = """
import os, sys
from shmcache import Cache
name, uid, gid, holder, key, flag = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5], sys.argv[6]
os.setgroups([gid]); os.setgid(gid); os.setuid(uid)
print("HIDDEN", not os.path.exists(f"/proc/{holder}"), flush=True)
c = Cache(name, create=False, owner=0, mode=0o660, lock_timeout=0.2)
c.set(key, b"from the other user")
print("WROTE", "after the release" if os.path.exists(flag) else "BEFORE THE RELEASE", flush=True)
c.close()
"""


def _hold_until_flag(name, s, flag, ready, slot):
    c = Cache(name, create=False, mode=0o660)
    c._locks.lock(s)
    slot.value = admin.current_client(c)[0]
    ready.set()
    while not os.path.exists(flag):
        time.sleep(0.01)
    c._locks.unlock(s)
    c.close()


@needs_useradd
@needs_unshare
@pytest.mark.skipif(not _kernel_at_least(5, 8), reason="a private proc mount with its own hidepid needs Linux 5.8")
@pytest.mark.timeout(120)
def test_regression_holder_hidden_by_hidepid_is_never_taken_over(user_and_group, cache_name, tmp_path):
    # With /proc mounted hidepid=2, pid + start time read nothing for another
    # user's process: a live holder of another user was taken for dead.
    import grp
    import pwd

    user, group = user_and_group
    gid = grp.getgrnam(group).gr_gid
    _create_in_group(cache_name, gid, size="2MiB", stripes=4)
    s = 1
    key = keys_in_stripe(4, s, 1, "hidden")[0]
    import tempfile

    pub = tempfile.mkdtemp(prefix="shmcache-test-")  # tmp_path is 0700: the other user could not see the flag
    os.chmod(pub, 0o755)
    flag = os.path.join(pub, "release")
    ready, slot = CTX.Event(), CTX.Value("i", -1)
    holder = CTX.Process(target=_hold_until_flag, args=(cache_name, s, flag, ready, slot))
    holder.start()
    w = None
    try:
        assert ready.wait(30)
        w = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                              f"mount -t proc -o hidepid=2 proc /proc && exec {sys.executable} -c \"$0\" \"$@\"",
                              HIDEPID_WRITER, cache_name, str(pwd.getpwnam(user).pw_uid), str(gid), str(holder.pid),
                              key, flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = w.stdout.readline()
        assert line == "HIDDEN True\n", (line, w.stderr.read() if w.poll() is not None else "")
        time.sleep(2.0)  # 10 x the writer's lock_timeout
        with Cache(cache_name, create=False, mode=0o660) as c:
            assert w.poll() is None and admin.lock_holders(c)[s] == slot.value >= 0
            assert c.stats()["recoveries"] == 0
            open(flag, "w").close()
            out, err = w.communicate(timeout=30)
            assert w.returncode == 0 and out == "WROTE after the release\n", (out, err)
            holder.join(30)
            assert holder.exitcode == 0
            assert c.get(key) == b"from the other user" and c.get("k") == b"root wrote this"
            assert admin.lock_holders(c)[s] is None and c.stats()["recoveries"] == 0 and c.check() == []
    finally:
        open(flag, "w").close()
        if w is not None and w.poll() is None:
            w.kill()
            w.wait(10)
        holder.join(30)
        shutil.rmtree(pub)
        Cache.unlink(cache_name)


def _hammer(name, keys, seconds, errors):
    c = Cache(name, create=False)
    t_end = time.monotonic() + seconds
    i = 0
    try:
        while time.monotonic() < t_end:
            k = keys[i % len(keys)]
            c.set(k, k.encode() * 20)
            v = c.get(k)
            if v is not None and v != k.encode() * 20:
                errors.value += 1
            i += 1
    except Exception:  # noqa: BLE001 - counted: the old sidecar caused struct.error / IndexError here
        errors.value += 1000
    c.close()


@needs_pidns
@pytest.mark.timeout(120)
def test_regression_sidecar_daemon_in_another_pid_namespace_never_recovers_live_stripes(make_cache, cache_name,
                                                                                        tmp_path):
    # A daemon sharing /dev/shm but not the PID namespace (a pod sidecar) took
    # every host writer for dead: 175 "recoveries" of live stripes in 15 s,
    # corrupt reads, struct.error/IndexError in the writers, reaped live slots.
    cache = make_cache(size="4MiB", stripes=4)
    log = open(tmp_path / "daemon.log", "wb")
    # --kill-child: the daemon (pid 1 over there) dies with unshare, whatever happens to this test
    d = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-m",
                          "shmcache", "daemon", "-n", cache_name, "--recover-every", "0.01"], stdout=log, stderr=log)
    errors = CTX.Value("i", 0)
    ws = [CTX.Process(target=_hammer, args=(cache_name, [f"w{w}-{i}" for i in range(200)], 3.0, errors))
          for w in range(2)]
    try:
        r = _shmcache("wait", "-n", cache_name, "--timeout", "60")
        assert r.returncode == 0, (r.stderr, (tmp_path / "daemon.log").read_text())
        for w in ws:
            w.start()
        for w in ws:
            w.join(60)
            assert w.exitcode == 0
        st = cache.stats()
        assert errors.value == 0 and st["recoveries"] == 0, (errors.value, st["recoveries"])
        assert admin.lock_holders(cache) == [None] * 4
        assert cache.check() == [] and st["clients"] == 2  # us and the daemon: no live slot reaped
    finally:
        for p in psutil.Process(d.pid).children():  # the daemon; unshare --fork ignores SIGTERM
            p.terminate()
        try:
            d.wait(30)
        except subprocess.TimeoutExpired:
            d.kill()  # and --kill-child takes the daemon with it
            d.wait(5)
        log.close()
        for w in ws:
            if w.pid is not None and w.exitcode is None:
                w.kill()
                w.join(5)
