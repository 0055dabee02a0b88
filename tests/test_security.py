"""Trust boundaries: whose segment a process attaches to, and what it unpickles.

Regression tests for the rows of issue 10's table are named ``test_row<N>_...``.
The user tests create a real unprivileged user (useradd) and act as it in a
forked child (setgid/setuid), so the kernel's owner and mode checks are real.
"""

from __future__ import annotations

import fractions
import hashlib
import multiprocessing as mp
import os
import pwd
import struct
import subprocess
import sys
import time
import uuid

import posix_ipc
import pytest
from names import fresh_name
from payload import Payload

from shmcache import Cache, LayoutMismatch, PermissionDenied, PickleRefused, SettingsIgnored, UntrustedSegment, admin
from shmcache.daemon import Daemon

SHM = "/dev/shm"


def _seg_path(name: str) -> str:
    return f"{SHM}/shmcache.{name}"


def _sem_paths(name: str) -> list[str]:
    """The stripe semaphore files of cache ``name``: a layout-5 cache had one per
    stripe; a cache has none now (its stripe locks are words in its segment)."""
    pre = f"sem.shmcache.{name}."
    return sorted(f"{SHM}/{n}" for n in os.listdir(SHM) if n.startswith(pre) and n[len(pre):].isdigit())


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def other_user():
    """An unprivileged user made for these tests, removed afterwards: (name, uid, gid)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a user")
    name = f"shmct{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(name)
        yield name, pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def _as_user(uid: int, gid: int, fn, *args, timeout: float = 30.0):
    """Run ``fn(*args)`` in a forked child that became ``uid``/``gid``; return what it returns."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            q.put(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            q.put(("err", f"{type(e).__name__}: {e}"))

    p = ctx.Process(target=child)
    p.start()
    status, value = q.get(timeout=timeout)
    p.join(timeout)
    assert p.exitcode == 0
    if status == "err":
        raise AssertionError(f"as uid {uid}: {value}")
    return value


# -- row 1: a squatted segment --------------------------------------------------------------
def test_row1_root_refuses_a_segment_squatted_by_another_user_and_runs_no_payload(
        other_user, cache_name, tmp_path):
    user, uid, gid = other_user
    marker = tmp_path / "payload-ran"
    # The squat: a complete segment, mode 0666, owned by the other user, with a pickle planted.
    with Cache(cache_name, size="1MiB", mode=0o666, allow_pickle=True) as c:
        c.set("k", Payload(str(marker)))
    assert _sem_paths(cache_name) == []  # the segment is the whole cache
    os.chown(_seg_path(cache_name), uid, gid)
    os.chmod(_seg_path(cache_name), 0o666)

    for kwargs in (dict(size="64MiB", mode=0o600), dict(create=False), dict(mode=0o666)):
        with pytest.raises(UntrustedSegment) as ei:
            Cache(cache_name, **kwargs).get("k")
        msg = str(ei.value)
        assert f"{user} (uid {uid})" in msg and "owner=" in msg
        assert isinstance(ei.value, PermissionDenied)  # one family with the kernel's refusals
    # Naming the owner is not enough while the mode is looser than asked for.
    with pytest.raises(UntrustedSegment, match=r"mode 0o666.*mode=0o600"):
        Cache(cache_name, owner=user)
    # The daemon applies the same check before it touches anything.
    with pytest.raises(UntrustedSegment):
        Daemon(cache_name, snapshot=str(tmp_path / "s.snap"))
    # Trusting the user and the mode explicitly attaches, but a shared cache does not unpickle.
    with Cache(cache_name, owner=user, mode=0o666) as c:
        with pytest.raises(PickleRefused, match="posix.system"):
            c.get("k")
        with pytest.raises(PickleRefused):
            c.pop("k")
        assert "k" in c  # pop decoded first: the refused value stays
    assert not marker.exists()
    assert os.stat(_seg_path(cache_name)).st_uid == uid  # never taken over, never re-initialized


def _given_away(name: str, uid: int, gid: int) -> str:
    """A 0600 cache holding k=b"v", then chowned (its one file, the segment) to
    ``uid``: another user's private cache. Returns the segment's digest."""
    with Cache(name, size="1MiB", mode=0o600) as c:
        c["k"] = b"v"
    os.chown(_seg_path(name), uid, gid)
    return _digest(_seg_path(name))


def test_row1_creation_never_reuses_a_file_it_did_not_create(other_user, cache_name):
    user, uid, gid = other_user
    before = _given_away(cache_name, uid, gid)
    with pytest.raises(UntrustedSegment, match="belongs to"):
        Cache(cache_name, size="2MiB")
    assert _digest(_seg_path(cache_name)) == before


def _squat_semaphores(name: str, n: int) -> None:
    """As another user: the stripe semaphores a layout-5 cache ``name`` would
    use, mode 0666, every one taken (value 0): a layout-5 writer would block."""
    for i in range(n):
        posix_ipc.Semaphore(f"/shmcache.{name}.{i}", posix_ipc.O_CREX, mode=0o666, initial_value=0).close()
        os.chmod(f"{SHM}/sem.shmcache.{name}.{i}", 0o666)


def test_row1_squatted_semaphores_have_no_say_over_the_cache(other_user, cache_name):
    # Up to layout 5 the stripe locks were semaphore files beside the segment,
    # which another user could squat to hold or release a cache's locks (such
    # a cache was refused). The locks are words inside the trusted segment
    # now: files of the old names neither stop nor steer a cache, which never
    # opens them, and unlink (`shmcache rm`) still removes them.
    user, uid, gid = other_user
    _as_user(uid, gid, _squat_semaphores, cache_name, 4)
    squat = {p: (os.stat(p).st_uid, os.stat(p).st_ino) for p in _sem_paths(cache_name)}
    assert len(squat) == 4 and {o for o, _ in squat.values()} == {uid}
    try:
        with Cache(cache_name, size="1MiB", stripes=4, lock_timeout=0.2) as c, \
                Cache(cache_name, create=False, lock_timeout=0.2) as d:
            c.set_many({f"k{i}": i for i in range(200)})  # every stripe; a squatted lock would block
            assert all(d[f"k{i}"] == i for i in range(200)) and d.incr("k0") == 1
            assert admin.lock_holders(c) == [None] * 4
            assert os.stat(_seg_path(cache_name)).st_uid == 0 and c.check() == []
        after = {p: (os.stat(p).st_uid, os.stat(p).st_ino) for p in _sem_paths(cache_name)}
        assert after == squat  # neither used nor taken over
        for i in range(4):
            sem = posix_ipc.Semaphore(f"/shmcache.{cache_name}.{i}")
            try:
                assert sem.value == 0  # nobody posted or waited on them
            finally:
                sem.close()
    finally:
        assert Cache.unlink(cache_name) is True
    assert _sem_paths(cache_name) == [] and not os.path.exists(_seg_path(cache_name))


def test_row1_symlink_and_fifo_in_place_of_a_segment_are_refused(cache_name, tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"\0" * 4096)
    os.symlink(target, _seg_path(cache_name))
    try:
        with pytest.raises(OSError):  # shm_open uses O_NOFOLLOW: ELOOP
            Cache(cache_name, size="1MiB")
        assert target.read_bytes() == b"\0" * 4096
    finally:
        os.unlink(_seg_path(cache_name))
    # A FIFO: refused from the open descriptor's fstat, in a subprocess in case an open blocks.
    os.mkfifo(_seg_path(cache_name), 0o600)
    try:
        for create in (True, False):
            r = subprocess.run([sys.executable, "-c", "import sys; from shmcache import Cache; "
                                f"Cache(sys.argv[1], size='1MiB', create={create})", cache_name],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and "UntrustedSegment" in r.stderr and "not a regular file" in r.stderr, \
                r.stderr[-500:]
    finally:
        os.unlink(_seg_path(cache_name))


@pytest.mark.parametrize("owner, exc", [(-1, ValueError), ("no-such-user-shmcache", ValueError), (1.5, TypeError),
                                        (True, TypeError), (b"root", TypeError)])
def test_row1_a_bad_owner_is_refused_before_anything_is_opened(cache_name, owner, exc):
    with pytest.raises(exc, match="owner"):
        Cache(cache_name, size="1MiB", owner=owner)
    assert not os.path.exists(_seg_path(cache_name))


def _shmcache_as_root(*args):
    return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(180)
def test_row1_the_cli_and_a_real_daemon_refuse_a_squat_unless_owner_is_given(other_user, cache_name, tmp_path):
    user, uid, gid = other_user
    before = _given_away(cache_name, uid, gid)
    _planted_snapshot(fresh_name(), tmp_path / "p.snap", tmp_path / "payload-ran")
    for args in (["get", "-n", cache_name, "k"], ["set", "-n", cache_name, "k", "x"], ["check", "-n", cache_name],
                 ["restore", "-n", cache_name, str(tmp_path / "p.snap")],
                 ["daemon", "-n", cache_name, "--snapshot", str(tmp_path / "d.snap")]):
        r = _shmcache_as_root(*args)
        assert r.returncode == 1 and f"belongs to {user} (uid {uid})" in r.stderr and "--owner" in r.stderr, \
            (args, r.stderr)
    assert _digest(_seg_path(cache_name)) == before  # nothing read, nothing written
    assert not os.path.exists(tmp_path / "d.snap")
    r = _shmcache_as_root("get", "-n", cache_name, "k", "--owner", user)
    assert r.returncode == 0 and r.stdout.strip() == "b'v'", r.stderr
    r = _shmcache_as_root("ls")
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith(cache_name))
    assert "belongs to" in row
    # A real daemon trusting the owner attaches, serves and stops on SIGTERM.
    from test_daemon import DaemonProc

    d = DaemonProc(cache_name, tmp_path / "d.log", ["--owner", str(uid), "--snapshot", str(tmp_path / "d.snap")])
    try:
        d.wait_ready(60)
        assert d.stop() == 0
    finally:
        d.kill()
    assert os.stat(tmp_path / "d.snap").st_uid == 0  # root's own snapshot of the cache it trusted


def _planted_snapshot(name: str, path, marker) -> None:
    """A valid snapshot whose one entry is a pickle that runs ``touch marker``."""
    from shmcache.snapshot import write_snapshot

    try:
        with Cache(name, size="1MiB", allow_pickle=True) as src:
            src.set("k", Payload(str(marker)))
            write_snapshot(src, str(path))
    finally:
        Cache.unlink(name)


def test_a_snapshot_another_user_wrote_is_never_restored_into_a_private_cache(other_user, make_cache, cache_name,
                                                                             tmp_path):
    # Restored values read back as the cache's own: a snapshot file another
    # user wrote (or could write) was loaded into root's 0600 cache, whose
    # readers then unpickled what that user planted.
    from shmcache.snapshot import restore_snapshot

    user, uid, gid = other_user
    marker, snap = tmp_path / "payload-ran", tmp_path / "planted.snap"
    _planted_snapshot(cache_name + "-src", snap, marker)
    os.chown(snap, uid, gid)
    c = make_cache(size="1MiB")
    c["keep"] = b"mine"
    with pytest.raises(UntrustedSegment, match=rf"belongs to {user} \(uid {uid}\).*nothing was changed"):
        restore_snapshot(c, snap)
    r = subprocess.run([sys.executable, "-m", "shmcache", "restore", "-n", cache_name, str(snap)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and f"belongs to {user}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert dict(c.items()) == {"keep": b"mine"}
    empty = fresh_name()
    try:
        r = subprocess.run([sys.executable, "-m", "shmcache", "restore", "-n", empty, "--size", "1MiB", str(snap)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and f"belongs to {user}" in r.stderr, r.stderr
        assert not os.path.exists(_seg_path(empty))  # the cache made for the refused file is gone again
        # A daemon starting on an empty cache refuses the file and exits, loading nothing.
        r = subprocess.run([sys.executable, "-m", "shmcache", "daemon", "-n", empty, "--size", "1MiB",
                            "--snapshot", str(snap)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and f"belongs to {user}" in r.stderr, r.stderr
        with Cache(empty, create=False) as e:
            assert len(e) == 0
    finally:
        Cache.unlink(empty)
    # Our own file, but writable by group or others: anyone of them may have written it.
    os.chown(snap, 0, 0)
    for loose, who in ((0o666, "group and others"), (0o620, "its group"), (0o602, "others")):
        os.chmod(snap, loose)
        with pytest.raises(UntrustedSegment, match=f"writable by {who}"):
            restore_snapshot(c, snap)
    assert dict(c.items()) == {"keep": b"mine"}
    assert not marker.exists()
    # Read bits do not matter; owner= extends the trust to that user's files.
    os.chmod(snap, 0o644)
    assert restore_snapshot(c, snap).loaded == 1 and "keep" not in c
    os.chown(snap, uid, gid)
    with Cache(cache_name, owner=user) as trusting:
        assert restore_snapshot(trusting, snap, merge=True).loaded == 0  # trusted; "k" is already there
    assert not marker.exists()  # nothing above read the value


def test_a_snapshot_is_held_to_the_segments_mode_now_not_at_open(make_cache, cache_name, tmp_path):
    # The mode was recorded when the segment was opened: after a chmod 600 of
    # a cache opened shared, a group-writable snapshot was still restored into
    # what every later opener reads as private (and unpickles).
    from shmcache.snapshot import restore_snapshot, write_snapshot

    c = make_cache(size="1MiB", mode=0o660)
    c["k"] = b"v"
    snap = tmp_path / "c.snap"
    write_snapshot(c, str(snap))
    os.chmod(snap, 0o620)
    assert restore_snapshot(c, snap, merge=True).loaded == 0  # as loose as the segment: accepted
    os.chmod(_seg_path(cache_name), 0o600)
    with pytest.raises(UntrustedSegment, match="writable by its group"):
        restore_snapshot(c, snap)


@pytest.mark.parametrize("mode", [-1, 0o7777, 0o4600, 0o400, 0o1000, 1.5, True, "0o600"])
def test_row12_bad_modes_are_refused(cache_name, mode):
    with pytest.raises((ValueError, TypeError), match="mode"):
        Cache(cache_name, size="1MiB", mode=mode)
    assert not os.path.exists(_seg_path(cache_name))


def test_a_looser_segment_than_asked_for_is_refused(make_cache, cache_name):
    make_cache(size="1MiB", mode=0o660)
    with pytest.raises(UntrustedSegment, match=r"mode 0o660.*mode=0o600.*pass mode=0o660"):
        Cache(cache_name)
    with Cache(cache_name, mode=0o660) as c, pytest.warns(SettingsIgnored), Cache(cache_name, mode=0o666) as c2:
        c["k"] = b"v"
        assert c2["k"] == b"v"


# -- row 2: the pickle trust boundary -------------------------------------------------------
def test_row2_private_cache_pickles_by_default(make_cache):
    c = make_cache(size="1MiB")
    c["f"] = fractions.Fraction(1, 3)
    assert c["f"] == fractions.Fraction(1, 3)


def _user_creates_shared_cache(name):
    with Cache(name, size="1MiB", mode=0o660) as c:
        c["from_user"] = {"list": [1, 2.5, "x", b"y", None, True], "tuple": (1, 2), "set": {3}}
        try:
            c["obj"] = fractions.Fraction(1, 3)
            refused = False
        except TypeError:
            refused = True
    return refused


def _user_plants(name, marker):
    with Cache(name, mode=0o660, allow_pickle=True) as c:
        c["planted"] = Payload(marker)
        c["frac"] = fractions.Fraction(2, 3)
        return os.stat(_seg_path(name)).st_uid


def _user_reads(name):
    with Cache(name, mode=0o660) as c:
        return c["from_root"]


def test_row2_a_0660_cache_shared_by_two_users_uses_the_safe_encoding(other_user, cache_name, tmp_path):
    user, uid, gid = other_user
    marker = str(tmp_path / "payload-ran")
    os.chmod(tmp_path, 0o777)
    # The other user creates a group-shared cache: it may not store objects needing pickle.
    assert _as_user(uid, gid, _user_creates_shared_cache, cache_name) is True
    assert os.stat(_seg_path(cache_name)).st_mode & 0o777 == 0o660
    with Cache(cache_name, owner=user, mode=0o660) as c:
        assert c["from_user"] == {"list": [1, 2.5, "x", b"y", None, True], "tuple": (1, 2), "set": {3}}
        c["from_root"] = [b"raw", 7, {"nested": (1.5,)}]
        with pytest.raises(TypeError, match=r"does not trust pickle.*fractions.Fraction.*allow_pickle=True"):
            c["obj"] = fractions.Fraction(1, 3)
        assert "obj" not in c
    assert _as_user(uid, gid, _user_reads, cache_name) == [b"raw", 7, {"nested": (1.5,)}]
    # A group member plants pickles: root refuses them unless it says it trusts every writer.
    assert _as_user(uid, gid, _user_plants, cache_name, marker) == uid
    with Cache(cache_name, owner=user, mode=0o660) as c:
        for k in ("planted", "frac"):
            with pytest.raises(PickleRefused, match="allow_pickle=True"):
                c.get(k)
        with pytest.raises(PickleRefused):
            c.items()
    assert not os.path.exists(marker)
    with Cache(cache_name, owner=user, mode=0o660, allow_pickle=True) as c:
        assert c["frac"] == fractions.Fraction(2, 3)
    assert not os.path.exists(marker)  # (the planted payload was never read with pickle allowed)


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_row2_a_cache_opened_to_a_group_after_attach_stops_unpickling(make_cache, cache_name, tmp_path, pure,
                                                                       monkeypatch):
    # Privacy was judged once, at open: after `chmod 660` a process attached
    # before went on unpickling whatever the group's members wrote.
    import shmcache.cache as cm

    import shmcache.segment as sm

    monkeypatch.setattr(cm, "USE_SPEEDUPS", cm.USE_SPEEDUPS and not pure)
    if pure:  # the os.fstat fallback of the C fd_private check
        monkeypatch.setattr(sm, "_fd_private", None)
    c = make_cache(size="1MiB")
    c["f"] = fractions.Fraction(1, 3)
    c["plain"] = {"a": [1, (2, b"3")]}
    assert c["f"] == fractions.Fraction(1, 3)
    os.chmod(_seg_path(cache_name), 0o660)  # the owner opens it to the group
    marker = tmp_path / "payload-ran"
    # what any member can now do (the header still says 0o600: a chmod changes only the file)
    with pytest.warns(SettingsIgnored), Cache(cache_name, mode=0o660, allow_pickle=True) as member:
        member["planted"] = Payload(str(marker))
    for k in ("planted", "f"):
        with pytest.raises(PickleRefused, match="since it was opened"):
            c[k]
    assert c["plain"] == {"a": [1, (2, b"3")]}  # plain values still read
    assert not marker.exists()
    with Cache(cache_name, mode=0o660, allow_pickle=True) as trusting:  # saying so still works
        assert trusting["f"] == fractions.Fraction(1, 3)


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_still_private_follows_chmod_and_chown_of_the_open_file(make_cache, cache_name, pure, monkeypatch):
    import shmcache.segment as sm

    if pure:
        monkeypatch.setattr(sm, "_fd_private", None)
    elif sm._fd_private is None:
        pytest.skip("the C accelerator is not built")
    seg = make_cache(size="1MiB")._seg
    path = _seg_path(cache_name)
    assert seg.still_private()
    for mode, private in ((0o640, True), (0o620, False), (0o602, False), (0o600, True)):
        os.chmod(path, mode)
        assert seg.still_private() is private, oct(mode)
    os.chown(path, 54321, -1)  # given away: no longer ours
    assert seg.still_private() is False
    os.chown(path, os.geteuid(), -1)
    assert seg.still_private() is True


def test_row2_the_near_caches_pickles_follow_a_later_chmod_too(make_cache, cache_name):
    import pickle

    from shmcache.near import TrustedPickle

    c = make_cache(size="1MiB")
    tp = TrustedPickle(admin.pickle_trust(c))  # what NearCache(serializer=pickle) and the adapters use
    data = pickle.dumps(fractions.Fraction(1, 3))
    assert tp.loads(data) == fractions.Fraction(1, 3)
    os.chmod(_seg_path(cache_name), 0o660)
    with pytest.raises(PickleRefused, match="since it was opened"):
        tp.loads(data)
    assert tp.loads(pickle.dumps([1, "two"])) == [1, "two"]


def test_row2_allow_pickle_false_refuses_even_a_private_cache(make_cache, cache_name):
    c = make_cache(size="1MiB")
    c["f"] = fractions.Fraction(1, 3)
    with Cache(cache_name, allow_pickle=False) as strict:
        with pytest.raises(PickleRefused, match="fractions.Fraction"):
            strict["f"]
        strict["plain"] = {"a": [1, (2, 3)], "b": frozenset({4}), "c": bytearray(b"z")}
        assert strict["plain"] == {"a": [1, (2, 3)], "b": frozenset({4}), "c": bytearray(b"z")}
    with pytest.raises(TypeError, match="allow_pickle"):
        Cache(cache_name, allow_pickle=1)


def test_row2_shared_cache_with_a_serializer_stores_objects(make_cache, cache_name):
    import json

    c = make_cache(size="1MiB", mode=0o660, serializer=json)
    c["doc"] = {"a": [1, 2]}
    assert c["doc"] == {"a": [1, 2]}


# -- row 6: a zeroed magic never re-initializes ---------------------------------------------
def test_row6_zeroed_magic_of_a_live_segment_is_refused_not_reinitialized(make_cache, cache_name):
    c = make_cache(size="4MiB")
    c.set_many({f"k{i}": i for i in range(2000)})
    ino = os.stat(_seg_path(cache_name)).st_ino
    magic = bytes(c._seg.mm[0:8])
    c._seg.mm[0:8] = b"\0" * 8
    for create in (True, False):
        with pytest.raises(Exception, match="no shmcache magic.*nothing was changed"):
            Cache(cache_name, size="4MiB", create=create, init_timeout=0.5)
    c._seg.mm[0:8] = magic
    assert len(c) == 2000 and c["k1999"] == 1999  # the attached writer lives on, data intact
    assert os.stat(_seg_path(cache_name)).st_ino == ino == os.fstat(c._seg.fd).st_ino  # segment not recreated


def test_row6_a_foreign_file_with_zero_first_bytes_is_not_overwritten(cache_name):
    path = _seg_path(cache_name)
    data = b"\0" * 8 + os.urandom(2**20 - 8)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    try:
        with pytest.raises(Exception, match="no shmcache magic"):
            Cache(cache_name, size="1MiB")
        with open(path, "rb") as f:
            assert f.read() == data
    finally:
        os.unlink(path)


# -- rows 8 and 9: snapshot paths ----------------------------------------------------------
def _shmcache(*args, timeout=60):
    """The CLI in a subprocess; a regression that blocks shows up as TimeoutExpired, not a hung test."""
    return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(180)
def test_row8_a_fifo_or_symlink_at_a_snapshot_path_is_refused_at_once(make_cache, cache_name, tmp_path):
    # open() of a FIFO blocked forever: restore, check --snapshot, and a daemon
    # at start (which then ignored SIGTERM).
    c = make_cache(size="1MiB")
    c["keep"] = b"v"
    fifo = tmp_path / "fifo.snap"
    os.mkfifo(fifo)
    real = tmp_path / "real.snap"
    from shmcache.snapshot import write_snapshot

    write_snapshot(c, str(real))
    link = tmp_path / "link.snap"
    os.symlink(real, link)
    for path, why in ((fifo, "not a regular file"), (link, "symbolic link")):
        for args in (("restore", "-n", cache_name, str(path)), ("check", "--snapshot", str(path))):
            r = _shmcache(*args, timeout=30)
            assert r.returncode == 1 and why in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        daemon_of = fresh_name()
        try:
            r = _shmcache("daemon", "-n", daemon_of, "--size", "1MiB", "--snapshot", str(path), timeout=30)
            assert r.returncode == 1 and why in r.stderr, r.stderr
            assert not os.path.exists(_seg_path(daemon_of))  # refused before creating anything
        finally:
            Cache.unlink(daemon_of)
    # the daemon's lock file beside the snapshot gets the same treatment
    os.mkfifo(str(real) + ".lock")
    daemon_of = fresh_name()
    try:
        r = _shmcache("daemon", "-n", daemon_of, "--size", "1MiB", "--snapshot", str(real), timeout=30)
        assert r.returncode == 1 and f"{real}.lock is not a regular file" in r.stderr, r.stderr
    finally:
        Cache.unlink(daemon_of)
    assert dict(c.items()) == {"keep": b"v"}


@pytest.mark.timeout(240)
def test_row9_rm_force_stops_the_daemon_and_one_daemon_writes_a_snapshot_file(cache_name, tmp_path):
    # `rm --force` removed the cache and left its daemon running: it and the
    # next cache's daemon both wrote the snapshot file, so after a restart
    # deleted keys came back and newer ones were lost.
    from test_daemon import DaemonProc

    from shmcache.snapshot import verify_snapshot

    snap = tmp_path / "s.snap"
    args = ["--size", "1MiB", "--snapshot", str(snap), "--snapshot-every", "0"]
    other = fresh_name()
    daemons = []

    def start(tag):
        daemons.append(DaemonProc(cache_name, tmp_path / f"{tag}.log", args).wait_ready(60))
        return daemons[-1]

    try:
        d1 = start("d1")
        with Cache(cache_name, create=False) as c:
            c.set_many({"old": 1, "deleted-later": 2})
        r = _shmcache("rm", "-n", cache_name, "--force", "--timeout", "60", timeout=90)
        assert r.returncode == 0 and f"stopped daemon pid {d1.pid}" in r.stdout, (r.stdout, r.stderr)
        assert d1.proc.wait(10) == 0  # stopped, after its final snapshot
        assert not os.path.exists(_seg_path(cache_name)) and verify_snapshot(str(snap)).entries == 2
        d2 = start("d2")  # the new cache's daemon loads that snapshot
        with Cache(cache_name, create=False) as c:
            assert c["old"] == 1
            c.delete("deleted-later")
            c["newer"] = 3
        # A daemon of another cache given the same file is refused while d2 writes it.
        r = _shmcache("daemon", "-n", other, "--size", "1MiB", "--snapshot", str(snap), timeout=30)
        assert r.returncode == 1 and f"written by another daemon (pid {d2.pid}" in r.stderr, r.stderr
        assert not os.path.exists(_seg_path(other))  # refused before creating its cache
        assert d2.stop() == 0
        r = _shmcache("rm", "-n", cache_name, timeout=30)
        assert r.returncode == 0, r.stderr
        start("d3")
        with Cache(cache_name, create=False) as c:
            assert dict(c.items()) == {"old": 1, "newer": 3}  # nothing deleted came back, nothing newer lost
    finally:
        for d in daemons:
            d.kill()
        Cache.unlink(other)


# -- row 10/11/12: operations that cannot lose data, time that cannot stall --------------------
def test_row11_pop_of_an_undecodable_value_keeps_the_key(make_cache, cache_name):
    import json

    writer = make_cache(size="1MiB", serializer=json)
    writer["k"] = {"a": 1}
    with Cache(cache_name) as reader:  # no serializer: cannot decode tag CUSTOM
        with pytest.raises(ValueError, match="serializer"):
            reader.pop("k")
        assert "k" in reader
    assert writer.pop("k") == {"a": 1}
    assert "k" not in writer
    writer["none"] = None
    assert writer.pop("none", "dflt") is None  # a stored None is a value, not "absent"


@pytest.mark.parametrize("value", [float("inf"), 1e300, float("nan"), -1.0, 0, 3601.0, True, "1"])
def test_row12_lock_and_init_timeouts_must_be_finite_positive_and_bounded(cache_name, value):
    for kw in ("lock_timeout", "init_timeout"):
        with pytest.raises((ValueError, TypeError), match=kw):
            Cache(cache_name, size="1MiB", **{kw: value})
    assert not os.path.exists(_seg_path(cache_name))


@pytest.mark.parametrize("label", ["snapshot_every", "expire_every", "recover_every"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 1e300])
def test_row12_daemon_intervals_nan_and_inf_are_refused(cache_name, label, value):
    with pytest.raises(ValueError, match=label):
        Daemon(cache_name, **{label: value})
    assert not os.path.exists(_seg_path(cache_name))


def test_row12_daemon_cli_refuses_nan_interval(cache_name):
    r = subprocess.run([sys.executable, "-m", "shmcache", "daemon", "-n", cache_name, "--recover-every", "nan"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "recover_every" in r.stderr
    assert not os.path.exists(_seg_path(cache_name))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e300", "soon"])
def test_row12_every_cli_wait_is_finite_and_bounded(cache_name, value, capsys):
    # `wait --timeout nan` never returned (no deadline compares true with NaN);
    # so did `snapshot` and `rm --force` on a daemon that did not answer.
    from shmcache.cli import main

    for args in (["wait", "--timeout", value], ["snapshot", "--timeout", value],
                 ["rm", "--force", "--timeout", value], ["top", "--interval", value],
                 ["demo", "--seconds", value]):  # demo's load ran until an inf deadline
        with pytest.raises(SystemExit) as ei:
            main([args[0], "-n", cache_name, *args[1:]])
        err = capsys.readouterr().err
        assert ei.value.code == 1 and f"{args[-2]}: {value!r} is not a number of seconds" in err, err
    assert main(["wait", "-n", cache_name, "--timeout", "0"]) == 1  # 0: look once, no daemon: exit 1
    assert "after 0 s" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 1e300, "1"])
def test_row12_wait_ready_and_key_lock_timeouts_are_checked_where_given(make_cache, cache_name, value):
    from shmcache.contrib import KeyLock
    from shmcache.daemon import wait_ready

    c = make_cache(size="1MiB")
    with pytest.raises((ValueError, TypeError), match="timeout"):
        wait_ready(cache_name, value)
    for kw in ("timeout", "sleep", "blocking_timeout"):
        with pytest.raises((ValueError, TypeError), match=kw):
            KeyLock(c, "job", **{kw: value})
    with pytest.raises((ValueError, TypeError), match="timeout"):
        c.memoize(timeout=value)  # at decoration, not at every call
    lock = KeyLock(c, "job", timeout=30, sleep=0.01)
    assert lock.acquire()
    with pytest.raises((ValueError, TypeError), match="blocking_timeout"):
        KeyLock(c, "job").acquire(blocking_timeout=value)  # NaN: polled forever
    lock.release()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "never"])
def test_row12_framework_stampede_timeouts_are_checked_at_construction(cache_name, value):
    from shmcache.contrib.flask import ShmCache as FlaskShmCache

    # The message names the setting (it said "timeout" before, as README's promise did not).
    with pytest.raises((ValueError, TypeError), match="stampede_timeout"):
        FlaskShmCache(cache_name, size="1MiB", stampede_timeout=value)
    assert FlaskShmCache(cache_name, size="1MiB", stampede_timeout="2.5").stampede_timeout == 2.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("pure", [False, True])
def test_row12_a_nan_clock_is_refused_not_a_key_that_never_expires(cache_name, bad, pure, monkeypatch):
    import shmcache.cache as cm

    monkeypatch.setattr(cm, "USE_SPEEDUPS", cm.USE_SPEEDUPS and not pure)
    now = [1000.0]
    with Cache(cache_name, size="1MiB", clock=lambda: now[0]) as c:
        c.set("k", b"v", ttl=5)
        now[0] = bad
        for op in (lambda: c.set("k2", b"v", ttl=5), lambda: c.get("k"), lambda: c.delete("k")):
            with pytest.raises(ValueError, match="clock returned"):
                op()
        now[0] = 1006.0
        assert "k" not in c and "k2" not in c


# -- rows 3-5: the segment is untrusted input -----------------------------------------------
HEADER_FIELDS = ["magic", "layout_version", "header_size", "total_size", "n_stripes", "max_clients",
                 "slots_per_stripe", "max_key_size", "max_value_size", "stripe_arena", "max_items",
                 "stripe_table_off", "client_table_off", "client_record_size", "index_off", "arena_off",
                 "created", "policy", "mode"]
_HEADER_SCRIPT = r"""
import struct, sys
from shmcache import Cache, Error, layout as L
name = sys.argv[1]
fmt = L.HEADER.format
codes = [c for c in fmt.lstrip("<").replace("8s", "s")]
offs, o = [], 0
for c in codes:
    offs.append(o)
    o += 8 if c in "sQd" else 4
import mmap, os
fd = os.open(f"/dev/shm/shmcache.{name}", os.O_RDWR)
mm = mmap.mmap(fd, L.PAGE)
results = []
for i, c in enumerate(codes[2:], start=2):
    if c == "d":
        continue
    width = 8 if c == "Q" else 4
    f = "<Q" if width == 8 else "<I"
    old = struct.unpack_from(f, mm, offs[i])[0]
    for new in (old + 4096, old // 2, old * 2 + 1, 0, (1 << (8 * width)) - 1):
        new &= (1 << (8 * width)) - 1
        if new == old:
            continue
        struct.pack_into(f, mm, offs[i], new)
        try:
            with Cache(name, create=False) as c:
                c.set("x", b"y")
                got = c.get("x")
            results.append(f"{i} {new}: attached")
        except Error as e:
            results.append(f"{i} {new}: {type(e).__name__}")
        struct.pack_into(f, mm, offs[i], old)
print("\n".join(results))
"""


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_row3_every_corrupted_header_field_is_refused_never_a_segfault(make_cache, cache_name, pure):
    c = make_cache(size="2MiB", stripes=4)
    c.set_many({f"k{i}": i for i in range(200)})
    env = dict(os.environ, **({"SHMCACHE_PURE_PYTHON": "1"} if pure else {}))
    if pure:
        env.pop("SHMCACHE_REQUIRE_SPEEDUPS", None)
    r = subprocess.run([sys.executable, "-c", _HEADER_SCRIPT, cache_name], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]  # a SIGSEGV/SIGBUS would show as -11 / -7
    lines = r.stdout.strip().split("\n")
    # Limits that place nothing (max_key_size 7, max_value_size 8, policy 17, mode 18)
    # may attach with another in-range value; every size and offset is refused.
    placing = [ln for ln in lines if int(ln.split()[0]) not in (7, 8, 17, 18)]
    assert all(ln.endswith("LayoutMismatch") for ln in placing), placing
    assert len(placing) > 40
    assert c.check() == [] and c["k199"] == 199  # the live handle never noticed


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_row3_a_wrapped_bump_pointer_never_writes_outside_the_arena(make_cache, cache_name, pure, monkeypatch):
    import shmcache.cache as cm
    from shmcache import layout as L

    monkeypatch.setattr(cm, "USE_SPEEDUPS", cm.USE_SPEEDUPS and not pure)
    c = make_cache(size="2MiB", stripes=4)
    c.set_many({f"k{i}": b"v%d" % i for i in range(400)})
    g = c._seg.geometry
    for s in range(4):
        struct.pack_into("<Q", c._seg.mm, g.stripe_table_off + s * L.STRIPE_SIZE + L.S_RING, 2**64 - 8)
    for i in range(50):  # every stripe gets writes with the wrapped pointer
        try:
            c.set(f"new{i}", b"x" * 100)
        except Exception as e:  # noqa: BLE001 - only shmcache errors are acceptable
            assert isinstance(e, __import__("shmcache").Error), e
    assert all(c.get(f"k{i}") in (None, b"v%d" % i) for i in range(400))
    assert all(c.get(f"new{i}") in (None, b"x" * 100) for i in range(50))
    c.check()
    assert c.check() == []


def _fill_slice(c, s: int) -> None:
    from shmcache import layout as L

    g = c._seg.geometry
    base = g.index_off + s * g.slots_per_stripe * L.SLOT_SIZE
    for i in range(g.slots_per_stripe):
        if not struct.unpack_from("<I", c._seg.mm, base + i * L.SLOT_SIZE)[0]:
            struct.pack_into("<I", c._seg.mm, base + i * L.SLOT_SIZE, (i * 2654435761 | 1) & 0xFFFFFFFF)


_SLICE_SCRIPT = r"""
import sys
from shmcache import Cache, Error
from shmcache.daemon import Daemon
name = sys.argv[1]
out = []
with Cache(name, create=False, lock_timeout=0.2) as c:
    for i in range(64):
        try:
            c.set(f"new{i}", b"v")
        except Error as e:
            out.append(type(e).__name__)
    got = [c.get(f"k{i}") for i in range(200)]
    assert all(v in (None, i) for i, v in enumerate(got)), got
    c.delete("k1"); c.pop("k2", None)
    out.append(f"check {len(c.check())}")
    out.append(f"check-after {len(c.check())}")
d = Daemon(name, recover_every=0.5)
d.recover_once(); d.expiry.sweep_all(); d.close()
print(" ".join(out))
"""


@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_row4_a_stripe_index_with_no_empty_slot_never_hangs(make_cache, cache_name, pure):
    # small slices: repairing a full slice is quadratic in its size (backward-shift deletes)
    c = make_cache(size="2MiB", stripes=4, max_items=800)
    c.set_many({f"k{i}": i for i in range(200)})
    for s in range(4):
        _fill_slice(c, s)
    env = dict(os.environ, **({"SHMCACHE_PURE_PYTHON": "1"} if pure else {}))
    if pure:
        env.pop("SHMCACHE_REQUIRE_SPEEDUPS", None)
    r = subprocess.run([sys.executable, "-c", _SLICE_SCRIPT, cache_name], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "check-after 0" in r.stdout  # the first write or check repaired every slice
    assert c.check() == []


@pytest.mark.timeout(120)
def test_row4_a_real_daemon_started_on_full_slices_serves_and_stops_on_sigterm(make_cache, cache_name, tmp_path):
    # The daemon used to hang in recovery's probe loop and ignore SIGTERM.
    from test_daemon import DaemonProc

    c = make_cache(size="2MiB", stripes=4, max_items=800)
    c.set_many({f"k{i}": i for i in range(200)})
    for s in range(4):
        _fill_slice(c, s)
    d = DaemonProc(cache_name, tmp_path / "d.log", ["--recover-every", "0.05", "--expire-every", "0.05",
                                                    "--snapshot", str(tmp_path / "s.snap")])
    try:
        d.wait_ready(60)
        try:  # a writer meanwhile: the first write to a damaged stripe repairs it and says so
            c.set("after", b"the daemon started")
        except LayoutMismatch as e:
            assert "retry the write" in str(e)
            c.set("after", b"the daemon started")
        time.sleep(0.3)  # a few recovery and expiry passes over the damage
        assert d.stop() == 0, d.log()  # raises if SIGTERM is ignored for 20 s
    finally:
        d.kill()
    assert c["after"] == b"the daemon started" and all(c.get(f"k{i}") in (None, i) for i in range(200))
    admin.check(c, fix=True)
    assert c.check() == []


def test_row5_an_odd_seqlock_version_is_reported_and_its_parity_restored(make_cache):
    from shmcache import layout as L

    c = make_cache(size="2MiB", stripes=4)
    c.set_many({f"k{i}": b"v%d" % i for i in range(200)})
    g = c._seg.geometry
    q = memoryview(c._seg.mm).cast("Q")
    try:
        ver = [(g.stripe_table_off + s * L.STRIPE_SIZE + L.S_VERSION) >> 3 for s in range(4)]
        q[ver[0]] |= 1  # one flipped bit
        q[ver[1]] = 2**64 - 1
        problems = c.check()
        assert sum("was odd while no writer held the lock" in p for p in problems) == 2, problems
        assert all(q[v] % 2 == 0 for v in ver)
        assert c.check() == []
        # A writer sets parity, it does not invert it: odd while it mutates, even after.
        q[ver[2]] |= 1
        c._locks.lock(2)
        assert q[ver[2]] % 2 == 1
        c._locks.unlock(2)
        assert q[ver[2]] % 2 == 0
        q[ver[3]] |= 1
        for i in range(200):
            c.set(f"k{i}", b"w%d" % i)
        assert q[ver[3]] % 2 == 0
        assert all(c[f"k{i}"] == b"w%d" % i for i in range(200))
    finally:
        q.release()


# -- row 10: a temporary handle -------------------------------------------------------------
@pytest.mark.parametrize("pure", [False, True], ids=["c", "pure"])
def test_row10_a_temporary_handle_works_for_the_whole_call(make_cache, cache_name, pure, monkeypatch):
    import gc

    import shmcache.cache as cm
    from shmcache import KeyTooLong

    monkeypatch.setattr(cm, "USE_SPEEDUPS", cm.USE_SPEEDUPS and not pure)
    keep = make_cache(size="1MiB", max_clients=4, max_key_size=64)
    keep["k"] = b"v"
    for i in range(40):  # ten times max_clients: every temporary handle gives its slot back
        assert Cache(cache_name).get("k") == b"v"
        assert Cache(cache_name).set(f"t{i}", i) is True
        assert Cache(cache_name).add(f"t{i}", 0) is False
        assert Cache(cache_name).incr(f"n{i}") == 1
        assert Cache(cache_name).delete(f"t{i}") is True
        assert "k" in Cache(cache_name) and Cache(cache_name)["k"] == b"v"
    g = Cache(cache_name).get  # a method kept beyond its handle keeps the handle working
    gc.collect()
    assert g("k") == b"v" and g("absent", 7) == 7
    with pytest.raises(TypeError):  # the slow paths (key checks) work without the handle too
        g(5)
    with pytest.raises(KeyTooLong):
        g("x" * 100)
    del g
    gc.collect()
    assert keep.stats()["clients"] == 1
    c = Cache(cache_name)
    s = c.set
    c.close()
    with pytest.raises(ValueError, match="closed"):  # close() still closes at once
        s("k", b"w")
