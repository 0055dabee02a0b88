"""shmcache.near: a near cache in front of a real redis-server, kept coherent by
real daemons (one tracking connection per simulated host).

Every test starts its own redis-server on 127.0.0.1 (a free port) and stops
it by PID; two "hosts" are two caches with two daemons on that one Redis.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from near_support import REDIS, Host, RedisServer, wait_for
from shmcache import Cache
from shmcache.near import CTL, CTL_KEY, ENTRY_PREFIX, HDR, NearCache, Tracker, connect, seq_key

redis = pytest.importorskip("redis", reason="the near extra (redis-py) is installed by make test")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server missing (make test installs it)")


#: Tests ping every 0.25 s (readers trust shared memory for 0.5 s): on a
#: loaded CI machine a daemon can be descheduled for 100 ms, and a bypass,
#: though safe, would make "was it kept?" checks flaky.
PING = 0.25


def _hosts_factory(server, tmp_path):
    made = []

    def make(n=1, ping=PING, **kw):
        new = [Host(server, tmp_path, tag=f"near{len(made) + i}", ping=ping, **kw).start_daemon(wait=False)
               for i in range(n)]
        for h in new:
            h.wait_up()
        made.extend(new)
        return new

    return make, made


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One Redis and two hosts for the tests that break nothing (each uses its own keys)."""
    s = RedisServer().start()
    make, made = _hosts_factory(s, tmp_path_factory.mktemp("near"))
    try:
        a, b = make(2)
        yield s, a, b
    finally:
        for h in made:
            h.close()
        s.close()


@pytest.fixture
def server():
    s = RedisServer().start()
    yield s
    s.close()


@pytest.fixture
def hosts(server, tmp_path):
    """Hosts on this test's own Redis (for the tests that inject faults)."""
    make, made = _hosts_factory(server, tmp_path)
    yield make
    for h in made:
        h.close()


@pytest.fixture
def rc(server):
    r = redis.Redis.from_url(server.url)
    yield r
    r.close()


def fill(n, host, key: str):
    """Read ``key`` through ``n`` until its copy is in ``host``'s memory (a read
    made while the heartbeat looks late is bypassed and keeps nothing)."""
    wait_for(lambda: n.get(key) is not None and local(host, key.encode()) is not None, 10, f"{key} to be kept")
    return n.get(key)


_clients = []


def _client(server):
    r = redis.Redis.from_url(server.url)
    _clients.append(r)
    return r


def near_of(host, server, **kw):
    kw.setdefault("prefixes", ["app:"])
    return NearCache(host.cache, server.url, **kw)


def local(host, key: bytes):
    """The raw entry of ``key`` in the host's shared memory (None if absent)."""
    return host.cache.get(ENTRY_PREFIX + key)


def gone_from(host, key: bytes):
    return lambda: local(host, key) is None


# --------------------------------------------------------------- basic reads
def test_miss_fills_and_second_read_is_a_near_hit(shared):
    server, a, b = shared
    rc = _client(server)
    rc.set("app:x", b"v1")
    with near_of(a, server) as n:
        assert fill(n, a, "app:x") == b"v1"
        assert n.get("app:x") == b"v1"
        assert n.get("app:missing", "dflt") == "dflt"
        st = n.stats()
    assert st["near_hits"] >= 1 and st["near_misses"] >= 1
    assert st["tracker_up"] and st["epoch_bumps"] >= 1


def test_keys_outside_prefixes_are_never_kept(shared):
    server, a, b = shared
    rc = _client(server)
    rc.set("other:x", b"1")
    with near_of(a, server) as n:
        assert n.get("other:x") == b"1"
        assert n.get("other:x") == b"1"
    assert local(a, b"other:x") is None


def test_keys_the_daemon_does_not_track_are_never_kept(shared):
    server, a, b = shared
    rc = _client(server)
    rc.set("zzz:x", b"1")
    with NearCache(a.cache, server.url, prefixes=None) as n:  # wants every key
        assert n.get("zzz:x") == b"1"
        assert n.get("app:y") is None
    assert local(a, b"zzz:x") is None


def test_local_ttl_never_exceeds_the_servers(shared):
    server, a, b = shared
    rc = _client(server)
    rc.set("app:short", b"v", px=400)
    rc.set("app:long", b"v")
    with near_of(a, server, max_ttl=30) as n:
        fill(n, a, "app:short")
        fill(n, a, "app:long")
    assert 0 < a.cache.ttl(ENTRY_PREFIX + b"app:short") <= 0.4
    assert 29 < a.cache.ttl(ENTRY_PREFIX + b"app:long") <= 30


def test_negative_caching_is_invalidated_when_the_key_appears(shared):
    server, a, b = shared
    rc = _client(server)
    with near_of(a, server, neg_ttl=30) as n:
        entry = wait_for(lambda: n.get("app:later") is None and local(a, b"app:later"), 10, "the absence kept")
        assert entry is not None and HDR.unpack_from(entry)[2] == 1  # kept as "absent"
        assert n.get("app:later") is None
        server.cli("SET", "app:later", "here")
        wait_for(gone_from(a, b"app:later"), 5, "the invalidation")
        assert n.get("app:later") == b"here"


def test_get_many_batches_misses_and_returns_present_keys(shared):
    server, a, b = shared
    rc = _client(server)
    rc.mset({"app:1": b"one", "app:2": b"two", "other:3": b"three"})
    with near_of(a, server) as n:
        assert fill(n, a, "app:1") == b"one"  # now local
        assert n.get_many(["app:1", "app:2", "app:none", "other:3"]) == {
            "app:1": b"one", "app:2": b"two", "other:3": b"three"}
        wait_for(lambda: n.get_many(["app:2"]) and local(a, b"app:2") is not None, 10, "app:2 kept")
        assert n.get_many(["app:1", "app:2"]) == {"app:1": b"one", "app:2": b"two"}


def test_writes_go_to_redis_in_plain_types_and_are_read_back(shared):
    server, a, b = shared
    rc = _client(server)
    with near_of(a, server) as n:
        n.set("app:b", b"\x00\xff")
        n.set("app:s", "héllo")
        n.set("app:i", 42)
        n["app:f"] = 1.5
        assert rc.get("app:b") == b"\x00\xff" and rc.get("app:s") == "héllo".encode()
        assert server.cli("GET", "app:i") == "42"
        assert n.get("app:i") == b"42" and n["app:f"] == b"1.5"
        assert n.incr("app:i", 8) == 50 and n.get("app:i") == b"50"
        assert n.decr("app:i") == 49
        assert n.add("app:i", 1) is False and n.add("app:new", 1) is True
        assert n.delete("app:new") is True and n.get("app:new") is None
        n.set_many({"app:m1": 1, "app:m2": 2}, ttl=60)
        assert n.get_many(["app:m1", "app:m2"]) == {"app:m1": b"1", "app:m2": b"2"}
        assert 59 < n.ttl("app:m1") <= 60
        assert n.touch("app:m1", None) is True and n.ttl("app:m1") is None
        assert n.delete_many(["app:m1", "app:m2", "app:none"]) == 2
        with pytest.raises(KeyError):
            n.ttl("app:m1")
        with pytest.raises(KeyError):
            del n["app:m1"]
        assert "app:b" in n and "app:m1" not in n


def test_serializer_round_trips_any_value(shared):
    import pickle

    server, a, b = shared
    with near_of(a, server, serializer=pickle) as n:
        n.set("app:obj", {"a": [1, 2]})
        assert n.get("app:obj") == {"a": [1, 2]}
        assert n.get("app:obj") == {"a": [1, 2]}  # the near hit decodes the same


def test_decode_responses_client_returns_str(shared):
    server, a, b = shared
    client = redis.Redis.from_url(server.url, decode_responses=True)
    with NearCache(a.cache, client, prefixes=["app:"]) as n:
        n.set("app:s", "text")
        assert n.get("app:s") == "text" and n.get("app:s") == "text"
    client.close()


def test_regression_allow_pickle_true_said_outright_survives_a_chmod(shared, make_cache, cache_name):
    # NearCache(allow_pickle=True) kept the cache's "still private?" re-check,
    # so after a chmod to 0660 it refused the pickles it was told to allow
    # (and the message said to pass allow_pickle=True). Cache(allow_pickle=True)
    # never re-checks: both now agree.
    import fractions
    import pickle

    from shmcache import PickleRefused
    from shmcache.segment import shm_path

    server, _a, _b = shared
    c = make_cache(size="1MiB")
    data = pickle.dumps(fractions.Fraction(1, 3))
    told = NearCache(c, server.url, allow_pickle=True)
    default = NearCache(c, server.url)
    try:
        os.chmod(shm_path(cache_name), 0o660)
        assert told.pickle.loads(data) == fractions.Fraction(1, 3)
        with pytest.raises(PickleRefused, match="since it was opened"):
            default.pickle.loads(data)
    finally:
        told.close()
        default.close()


def test_bad_arguments_are_refused_clearly(shared):
    server, a, b = shared
    with pytest.raises(ValueError, match="max_ttl"):
        NearCache(a.cache, server.url, max_ttl=0)
    with pytest.raises(ValueError, match="neg_ttl"):
        NearCache(a.cache, server.url, neg_ttl=-1)
    with pytest.raises(TypeError, match="prefixes"):
        NearCache(a.cache, server.url, prefixes="app:")
    with pytest.raises(TypeError, match="serializer"):
        NearCache(a.cache, server.url, serializer=object())
    with pytest.raises(ValueError, match="overlap"):
        Tracker(a.cache, server.url, ["app:", "app:x"])
    with pytest.raises(ValueError, match="nice"):
        Tracker(a.cache, server.url, ["app:"], nice=-21)
    with pytest.raises(TypeError, match="allow_pickle"):
        NearCache(a.cache, server.url, allow_pickle="yes")
    with pytest.raises(ValueError, match="only database 0"):
        connect("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(ValueError, match="host:port") as e:
        connect("redis+cluster://:pw@127.0.0.1")
    assert "pw" not in str(e.value)
    with near_of(a, server) as n:
        with pytest.raises(TypeError, match="key"):
            n.get(3)
        with pytest.raises(ValueError, match="ttl"):
            n.set("app:x", 1, ttl=0)


# ------------------------------------------------------------- two hosts
def test_write_through_host_a_invalidates_host_b(shared):
    server, a, b = shared
    with near_of(a, server) as na, near_of(b, server) as nb:
        na.set("app:k", b"old")
        assert fill(nb, b, "app:k") == b"old"
        na.set("app:k", b"new")
        assert na.get("app:k") == b"new"  # read-your-write, at once
        wait_for(gone_from(b, b"app:k"), 5, "host B's invalidation")
        assert nb.get("app:k") == b"new"
        assert b.stats()["invalidations"] >= 1


def test_plain_redis_cli_write_invalidates_every_host(shared):
    server, a, b = shared
    server.cli("SET", "app:k", "old")
    with near_of(a, server) as na, near_of(b, server) as nb:
        assert fill(na, a, "app:k") == fill(nb, b, "app:k") == b"old"
        server.cli("SET", "app:k", "new")
        for h in (a, b):
            wait_for(gone_from(h, b"app:k"), 5, "the invalidation")
        assert na.get("app:k") == nb.get("app:k") == b"new"
        server.cli("DEL", "app:k")
        wait_for(gone_from(b, b"app:k"), 5, "the invalidation of DEL")
        assert nb.get("app:k") is None


def test_expiry_on_the_server_is_never_outlived(shared):
    server, a, b = shared
    rc = _client(server)
    rc.set("app:e", b"v", px=150)
    with near_of(a, server) as n:
        assert n.get("app:e") == b"v"
        time.sleep(0.2)
        assert n.get("app:e") is None


# ------------------------------------------------- the fill race, made exact
@pytest.mark.parametrize("stage", ["reply", "store"])
def test_invalidation_overtaking_a_fill_never_leaves_a_stale_entry(shared, stage):
    """The write lands, and its invalidation is fully handled, between the
    fill's GET reply (old value) and its store: at "reply" the fill notices
    before writing; at "store" it writes the old value anyway (as a filler
    killed between its checks would leave it) and readers must not serve it."""
    server, a, b = shared
    server.cli("SET", "app:race", "old")
    fired = []
    with near_of(a, server) as n:
        sk = seq_key(b"app:race")

        def overtake(kb, st):
            if kb == b"app:race" and st == stage and not fired:
                fired.append(True)
                before = a.cache.get(sk)
                server.cli("SET", "app:race", "new")
                wait_for(lambda: a.cache.get(sk) != before, 5, "the tracker to handle the invalidation")

        n._fill_hook = overtake
        # What Redis answered at the time (a read bypassed for a late
        # heartbeat fills nothing and is simply tried again).
        assert wait_for(lambda: n.get("app:race") == b"old" and fired, 10, "a fill")
        n._fill_hook = None
        if stage == "store":
            entry = local(a, b"app:race")
            assert entry is not None and entry.endswith(b"old")  # the stale fill was written...
        assert n.get("app:race") == b"new"  # ...and is never served
        assert n.get("app:race") == b"new"
        if stage == "reply":
            assert n.stats()["fills_discarded"] >= 1


# ------------------------------------------------------------- failures
def test_flushall_drops_everything_the_near_cache_filled(hosts, server, rc):
    (a,) = hosts(1)
    rc.mset({f"app:{i}": b"v" for i in range(20)})
    with near_of(a, server) as n:
        assert len(n.get_many([f"app:{i}" for i in range(20)])) == 20
        epoch = a.stats()["epoch"]
        server.cli("FLUSHALL")
        wait_for(lambda: a.stats()["epoch"] != epoch, 5, "the new epoch after FLUSHALL")
        assert a.stats()["flushes"] >= 1
        assert n.get_many([f"app:{i}" for i in range(20)]) == {}


def _tracking_client_id(server) -> str:
    for line in server.cli("CLIENT", "LIST").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "t" in fields.get("flags", "") and fields.get("resp") == "3":
            return fields["id"]
    raise AssertionError("no tracking connection in CLIENT LIST")


def test_client_kill_of_the_tracking_connection_reconnects_under_a_new_epoch(hosts, server):
    (a,) = hosts(1)
    server.cli("SET", "app:k", "old")
    with near_of(a, server) as n:
        assert fill(n, a, "app:k") == b"old"
        before = a.stats()
        server.cli("CLIENT", "KILL", "ID", _tracking_client_id(server))
        # Written while nobody tracks: no invalidation will ever come for it.
        server.cli("SET", "app:k", "new")
        wait_for(lambda: a.stats()["reconnects"] > before["reconnects"] and a.stats()["tracker_up"], 10,
                 "the reconnect")
        assert a.stats()["epoch"] != before["epoch"]
        assert local(a, b"app:k") is not None  # still in memory, but of the old epoch
        # A reader notices the new epoch once its held control word is half
        # the bound old (the old entry was fine until then: see the bound).
        time.sleep(a.ping)
        assert n.get("app:k") == b"new"


def test_redis_restart_invalidates_everything(hosts, server):
    (a,) = hosts(1)
    server.cli("SET", "app:k", "before-restart")
    with near_of(a, server) as n:
        assert n.get("app:k") == b"before-restart"
        epoch = a.stats()["epoch"]
        server.restart()  # SIGKILL, no persistence: Redis comes back empty
        wait_for(lambda: a.stats().get("tracker_up") and a.stats()["epoch"] != epoch, 15, "tracking after restart")
        time.sleep(a.ping)  # the reader re-reads the epoch within half the bound
        assert n.get("app:k") is None


def test_readers_bypass_while_the_daemon_is_dead_and_not_after(hosts, server):
    (a,) = hosts(1)
    server.cli("SET", "app:k", "old")
    with near_of(a, server) as n:
        assert n.get("app:k") == b"old"
        a.stop_daemon(signal.SIGKILL)
        server.cli("SET", "app:k", "new")  # no tracker to see it
        time.sleep(2 * a.ping + 0.05)  # past max_staleness: the heartbeat is too old now
        bypassed = n.stats()["bypassed_reads"]
        assert n.get("app:k") == b"new"
        assert n.stats()["bypassed_reads"] == bypassed + 1
        ctl = a.cache.get(CTL_KEY)
        epoch_dead = CTL.unpack(ctl)[0]
        a.start_daemon()  # a new daemon: new epoch, fills again
        assert CTL.unpack(a.cache.get(CTL_KEY))[0] != epoch_dead
        assert n.get("app:k") == b"new" and n.get("app:k") == b"new"
        assert local(a, b"app:k") is not None


def test_daemon_stop_publishes_down_and_readers_bypass(hosts, server):
    (a,) = hosts(1, ping=1.0)  # a long bound: only the published "down" can explain a bypass
    server.cli("SET", "app:k", "v")
    with near_of(a, server) as n:
        fill(n, a, "app:k")
        a.stop_daemon()
        assert a.stats()["tracker_state"] == "down"
        # Past half the bound (1 s) the reader re-reads the control word; the
        # heartbeat alone would still be trusted (2 s), "down" is not.
        time.sleep(1.05)
        bypassed = n.stats()["bypassed_reads"]
        assert n.get("app:k") == b"v"
        assert n.stats()["bypassed_reads"] == bypassed + 1


def test_a_stale_heartbeat_left_by_an_earlier_boot_is_not_trusted(hosts, server, make_cache):
    """The control word can come back from a snapshot written before a reboot,
    when its monotonic heartbeat may lie in the future: never trust it."""
    c = make_cache()
    c.set(CTL_KEY, CTL.pack(7, time.monotonic() + 3600, 0.2, 1), ttl=None)
    server.cli("SET", "app:k", "v")
    with NearCache(c, server.url, prefixes=["app:"]) as n:
        assert n.get("app:k") == b"v"
        assert n.stats()["bypassed_reads"] == 1


def test_daemon_without_upstream_refuses_track_prefix(cache_name):
    from shmcache.daemon import Daemon

    with pytest.raises(ValueError, match="--upstream"):
        Daemon(cache_name, track_prefixes=["app:"])
    Cache.unlink(cache_name)


def test_shmcache_stats_shows_the_near_cache_and_its_tracker(shared):
    import subprocess
    import sys

    server, a, b = shared
    with near_of(a, server) as n:
        n.get("app:stats")
    out = subprocess.run([sys.executable, "-m", "shmcache", "stats", "-n", a.name], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "near cache" in out.stdout and "upstream reads" in out.stdout
    assert server.url in out.stdout and "epoch bumps" in out.stdout
    js = subprocess.run([sys.executable, "-m", "shmcache", "stats", "-n", a.name, "--json"], capture_output=True,
                        text=True, timeout=60)
    near = json.loads(js.stdout)["near"]
    assert near["upstream_reads"] >= 1 and near["tracker"]["prefixes"] == ["app:"]
    for key in ("near_hits", "bypassed_reads", "invalidations", "epoch_bumps", "reconnects", "tracker_up"):
        assert key in near, key
    assert near["epoch_bumps"] >= 1 and near["tracker"]["connections"] == 1


# ------------------------------------------------------- invalidation delay
def _may_renice(n: int) -> bool:
    import os
    import resource

    if os.geteuid() == 0:
        return True
    return 20 - resource.getrlimit(resource.RLIMIT_NICE)[0] <= n


@pytest.mark.skipif(not _may_renice(-20), reason="needs root or RLIMIT_NICE >= 40 to raise a thread's priority")
def test_tracker_thread_runs_at_track_nice_and_only_it(hosts):
    """Regression: the tracker waited for a CPU (p99 2.5-8 ms on a busy
    2-CPU host) though its push was already in the socket. The tracker
    thread runs at --track-nice; the daemon's own threads keep their priority."""
    (h,) = hosts(1)
    pid = h.tracker_pid()
    assert pid != h.proc.pid  # a process of its own (TrackerProcess)
    assert -20 in h.thread_nices(pid), h.thread_nices(pid)
    assert -20 not in h.thread_nices(), h.thread_nices()


def test_track_nice_zero_leaves_the_priority_alone(hosts):
    (h,) = hosts(1, extra=["--track-nice", "0"])

    assert set(h.thread_nices(h.tracker_pid())) == {os.getpriority(os.PRIO_PROCESS, 0)}


def test_the_tracker_process_is_restarted_and_never_outlives_the_daemon(hosts, server):
    """The tracker runs in a child of the daemon (on a thread, the daemon's
    expiry delayed invalidations by tens of ms): SIGKILLed, it is replaced
    under a new epoch; the daemon SIGKILLed, the kernel stops it too."""
    (h,) = hosts(1)
    first, epoch = h.tracker_pid(), h.stats()["epoch"]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: h.stats().get("tracker_up") and h.tracker_pid() != first, 20, "a new tracker process")
    assert h.stats()["epoch"] != epoch and "restarting it" in h.log()
    second = h.tracker_pid()
    with near_of(h, server) as n:
        server.cli("SET", "app:child", "1")
        fill(n, h, "app:child")
        server.cli("SET", "app:child", "2")
        wait_for(gone_from(h, b"app:child"), 10, "the new tracker's invalidation")
    h.proc.kill()
    h.proc.wait(10)

    def gone():
        try:
            os.kill(second, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{second}/stat") as f:  # a zombie until init reaps it counts as gone
            return f.read().rpartition(")")[2].split()[0] == "Z"

    wait_for(gone, 10, "the tracker process to die with the daemon")
    assert not h.stats()["tracker_up"]


@pytest.mark.skipif(__import__("shutil").which("setpriv") is None, reason="setpriv (util-linux) missing")
def test_tracker_without_the_right_to_renice_warns_and_still_tracks(hosts, server):
    """Without CAP_SYS_NICE (dropped here with setpriv) setpriority fails:
    the daemon says what to grant and tracks anyway."""
    import os
    import resource

    if os.geteuid() != 0 and resource.getrlimit(resource.RLIMIT_NICE)[0] > 20:
        pytest.skip("RLIMIT_NICE already allows raising priority")
    wrap = ["setpriv", "--inh-caps=-sys_nice", "--bounding-set=-sys_nice"] if os.geteuid() == 0 else []
    (h,) = hosts(1, wrap=wrap)
    assert "cannot set nice -20" in h.log() and "LimitNICE" in h.log()
    with near_of(h, server) as n:
        server.cli("SET", "app:renice", "1")
        fill(n, h, "app:renice")
        server.cli("SET", "app:renice", "2")
        wait_for(gone_from(h, b"app:renice"), 10, "the invalidation")
        assert n.get("app:renice") == b"2"


# ------------------------------------------------------- upstream password
SECRET = "n3ar-s3cret-pw"


@pytest.fixture
def locked_server():
    s = RedisServer()
    s.password = SECRET
    s.start()
    yield s
    s.close()


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _assert_password_hidden(h):
    st = h.wait_up()  # it authenticated: tracking is on
    assert SECRET.encode() not in _cmdline(h.proc.pid)
    assert SECRET not in json.dumps(st["tracker"]) and "***" in st["tracker"]["upstream"]
    assert SECRET not in h.log()


def test_upstream_from_the_environment_keeps_the_password_out_of_ps(locked_server, tmp_path):
    """Regression: the gunicorn config put SHMCACHE_UPSTREAM (password
    included) on the daemon's command line, which every user reads in ps."""
    url = f"redis://:{SECRET}@127.0.0.1:{locked_server.port}/0"
    h = Host(locked_server, tmp_path, tag="pwenv", url="", env={**os.environ, "SHMCACHE_UPSTREAM": url})
    try:
        h.start_daemon(wait=False)
        _assert_password_hidden(h)
        with NearCache(h.cache, url, prefixes=["app:"]) as n:
            locked_server.cli("SET", "app:pw", "1")
            fill(n, h, "app:pw")
            locked_server.cli("SET", "app:pw", "2")
            wait_for(gone_from(h, b"app:pw"), 10, "the invalidation")
    finally:
        h.close()


def test_upstream_file_keeps_the_password_out_of_ps_and_must_be_private(locked_server, tmp_path):
    url = f"redis://:{SECRET}@127.0.0.1:{locked_server.port}/0"
    f = tmp_path / "upstream"
    f.write_text(url + "\n")
    f.chmod(0o644)
    h = Host(locked_server, tmp_path, tag="pwfile", url="", extra=["--upstream-file", str(f)])
    try:
        h.start_daemon(wait=False)
        assert h.proc.wait(30) == 1
        assert "chmod 600" in h.log() and SECRET not in h.log()
        f.chmod(0o600)
        h.start_daemon(wait=False)
        _assert_password_hidden(h)
    finally:
        h.close()


def test_a_password_on_the_command_line_is_warned_about(locked_server, tmp_path):
    url = f"redis://:{SECRET}@127.0.0.1:{locked_server.port}/0"
    h = Host(locked_server, tmp_path, tag="pwarg", url=url)
    try:
        h.start_daemon()
        assert "--upstream-file" in h.log() and "ps" in h.log()
        assert SECRET not in h.log()
    finally:
        h.close()


# ------------------------------------------------------------------- metrics
def test_prometheus_collector_exports_the_near_cache_counters(hosts, server):
    pytest.importorskip("prometheus_client", reason="the prometheus extra is installed by make test")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from shmcache.contrib.prometheus import ShmcacheCollector

    (h,) = hosts(1)
    server.cli("SET", "app:m", "1")
    with near_of(h, server) as n:
        fill(n, h, "app:m")
        for _ in range(5):
            n.get("app:m")
        server.cli("SET", "app:m", "2")
        wait_for(gone_from(h, b"app:m"), 10, "the invalidation")
        n.get("app:nottracked-but-prefixed")
        st = n.stats()  # adds this process's counts to the shared ones
    reg = CollectorRegistry()
    reg.register(ShmcacheCollector(h.cache))
    got = {s.name: s.value for f in text_string_to_metric_families(generate_latest(reg).decode())
           for s in f.samples if s.labels.get("cache") == h.name}
    for key in ("near_hits", "near_misses", "upstream_reads", "bypassed_reads", "invalidations", "epoch_bumps"):
        name = key if key.startswith("near_") else f"near_{key}"
        assert got[f"shmcache_{name}_total"] >= st[key], key
    assert got["shmcache_near_hits_total"] >= 5 and got["shmcache_near_invalidations_total"] >= 1
    assert got["shmcache_near_epoch_bumps_total"] >= 1 and got["shmcache_near_tracker_up"] == 1.0
    assert 0 <= got["shmcache_near_heartbeat_age_seconds"] < 60


def test_an_invalidation_that_cannot_be_applied_ends_the_session_not_the_coherence(hosts, server):
    """Regression: redis-py's parser calls the push handler inside a
    try/except that logs and swallows any exception, and read_response then
    returns None. When applying a push failed halfway (here the sequence
    entry of its first key was overwritten with garbage, as anyone who can
    write the segment may do), the later keys of the push kept valid stale
    copies and the tracker carried on. Now the session ends: a new epoch
    once the tracker is back, and no stale copy is served."""
    (h,) = hosts(1)
    a = b"app:inv-a"
    b = next(k for k in (b"app:inv-b%d" % i for i in range(100)) if seq_key(k) != seq_key(a))
    server.cli("SET", b.decode(), "old")
    with near_of(h, server) as n:
        fill(n, h, b.decode())
        epoch = h.stats()["epoch"]
        h.cache.set(seq_key(a), b"not a number", ttl=None)
        server.cli("MSET", a.decode(), "1", b.decode(), "new")  # one push: [a, b], a first
        wait_for(lambda: h.stats().get("epoch") not in (None, epoch) and h.stats().get("tracker_up"), 20,
                 "the tracker back up under a new epoch")
        for _ in range(20):
            assert n.get(b.decode()) == b"new"
    assert "could not apply an invalidation" in h.log()
