"""A Sentinel failover under the near cache: master SIGKILLed, the replica
promoted by a real redis-sentinel, the daemon's tracker following it through
redis-py's Sentinel discovery under a new epoch.

All three servers are our children on 127.0.0.1 (free ports), stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from near_support import REDIS, Host, RedisServer, _stop, free_port, wait_for
from shmcache.near import ENTRY_PREFIX, NearCache

redis = pytest.importorskip("redis", reason="the near extra (redis-py) is installed by make test")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server missing (make test installs it)")


class Replica(RedisServer):
    def __init__(self, master: RedisServer):
        super().__init__()
        self.master = master

    def start(self):
        self._log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--replicaof", "127.0.0.1", str(self.master.port)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(self._pingable, 10, "the replica to accept connections")
        return self


class Sentinel:
    def __init__(self, master: RedisServer, replica: RedisServer, tmp_path):
        self.port = free_port()
        conf = tmp_path / "sentinel.conf"  # sentinel rewrites its config: a file of its own
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor near 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds near 300\n"
            "sentinel failover-timeout near 3000\n"
            # known at once: otherwise found by an INFO poll up to 10 s later
            f"sentinel known-replica near 127.0.0.1 {replica.port}\n"
        )
        self._log = open(tmp_path / "sentinel.log", "ab")
        self.proc = subprocess.Popen([REDIS, str(conf), "--sentinel"], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.url = f"redis+sentinel://127.0.0.1:{self.port}/near"

    def client(self):
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def stop(self):
        _stop(self, signal.SIGTERM, 5)


def test_sentinel_failover_brings_a_new_epoch_and_the_new_masters_values(tmp_path):
    master = RedisServer().start()
    replica = Replica(master).start()
    sentinel = Sentinel(master, replica, tmp_path)
    host = None
    try:
        sc = sentinel.client()
        wait_for(lambda: _known_replicas(sc) >= 1, 20, "sentinel to discover the replica", every=0.1)
        host = Host(master, tmp_path, ping=0.25, tag="sent", url=sentinel.url).start_daemon()
        m = redis.Redis.from_url(master.url)
        m.set("app:k", b"before")
        assert m.wait(1, 5000) == 1  # on the replica too
        with NearCache(host.cache, sentinel.url, prefixes=["app:"]) as near:
            wait_for(lambda: near.get("app:k") == b"before"
                     and host.cache.get(ENTRY_PREFIX + b"app:k") is not None, 10, "app:k kept")
            epoch = host.stats()["epoch"]
            master.stop(signal.SIGKILL)
            wait_for(lambda: _master_port(sc) == replica.port, 30, "sentinel to promote the replica", every=0.1)
            r = redis.Redis.from_url(replica.url)
            wait_for(lambda: _is_master(r), 10, "the replica to be master", every=0.05)
            r.set("app:k", b"after")  # the new master's value
            wait_for(lambda: host.stats().get("tracker_up") and host.stats()["epoch"] != epoch, 30,
                     "the tracker to follow the failover", every=0.05)
            _read_through_failover(near, "app:k", b"after")
            r.set("app:k", b"after2")  # tracked on the new master: invalidated as usual
            wait_for(lambda: host.cache.get(ENTRY_PREFIX + b"app:k") is None or near.get("app:k") == b"after2",
                     10, "the invalidation from the new master")
            assert near.get("app:k") == b"after2"
            assert host.stats()["reconnects"] >= 1
        r.close()
        m.close()
        sc.close()
    finally:
        if host is not None:
            host.close()
        sentinel.stop()
        replica.close()
        master.close()


def _read_through_failover(near, key, want, timeout=10.0):
    """Read ``key`` until it is ``want``. Right after a promotion the
    Sentinel pool may still raise (connection closed, no master found): an
    error is retried, as an application would retry it, but a value other
    than ``want`` is a stale read and fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = near.get(key)
        except redis.ConnectionError as e:  # MasterNotFoundError is one
            assert time.monotonic() < deadline, f"{key} unreadable {timeout} s after the failover: {e!r}"
            time.sleep(0.05)
            continue
        assert got == want, f"stale read after the failover: {got!r}, want {want!r}"
        return


def _known_replicas(sc) -> int:
    try:
        return len(sc.sentinel_slaves("near"))
    except redis.RedisError:
        return 0


def _master_port(sc):
    try:
        return int(sc.sentinel_get_master_addr_by_name("near")[1])
    except (redis.RedisError, TypeError):
        return None


def _is_master(r) -> bool:
    try:
        return r.info("replication")["role"] == "master"
    except redis.RedisError:
        return False
