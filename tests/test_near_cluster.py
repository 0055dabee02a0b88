"""shmcache.near against a real Redis Cluster: 3 masters started here with
``redis-server --cluster-enabled yes`` on loopback ports and joined with
``redis-cli --cluster create``, each stopped by PID.

The daemon finds the masters through redis-py's own discovery
(``redis+cluster://`` seeds) and holds one tracking connection per master.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from near_support import REDIS, Host, LocalCluster, wait_for
from shmcache.near import ENTRY_PREFIX, NearCache

redis = pytest.importorskip("redis", reason="the near extra (redis-py) is installed by make test")
pytestmark = pytest.mark.skipif(REDIS is None, reason="redis-server missing (make test installs it)")

PING = 0.25


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(3)
    try:
        c.start()
    except AssertionError as e:  # the package or the kernel refused it: say so, do not fail others
        pytest.skip(f"cannot run a local Redis Cluster here: {e}")
    yield c
    c.close()


@pytest.fixture
def host(cluster, tmp_path):
    h = Host(cluster, tmp_path, tag="nearcl", ping=PING, url=cluster.url).start_daemon()
    yield h
    h.close()


@pytest.fixture
def near(host, cluster):
    n = NearCache(host.cache, cluster.url, prefixes=["app:"])
    yield n
    n.close()


def key_on(cluster, node, tag: str) -> str:
    """A key under ``app:`` whose slot ``node`` serves."""
    for i in range(10000):
        k = f"app:{tag}:{i}"
        if cluster.owner(k) is node:
            return k
    raise AssertionError("no key found for the node")


def local(host, key: str):
    return host.cache.get(ENTRY_PREFIX + key.encode())


def fill(near, host, key):
    wait_for(lambda: near.get(key) is not None and local(host, key) is not None, 10, f"{key} to be kept")


def node_cli(node, *args) -> str:
    out = subprocess.run(["redis-cli", "-p", str(node.port), *args], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def tracking_clients(node) -> int:
    """Clients of ``node`` with BCAST tracking on (flag B in CLIENT LIST)."""
    lines = node_cli(node, "CLIENT", "LIST").splitlines()
    return sum(1 for line in lines if "B" in line.split(" flags=")[1].split(" ")[0])


def test_one_tracking_connection_per_master_and_invalidations_from_each(cluster, host, near):
    assert host.stats()["tracker"]["connections"] == 3
    out = subprocess.run([sys.executable, "-m", "shmcache", "stats", "-n", host.name], capture_output=True,
                         text=True, timeout=60)
    assert "3 tracking connections" in out.stdout, out.stdout + out.stderr
    assert [tracking_clients(n) for n in cluster.nodes] == [1, 1, 1]
    keys = [key_on(cluster, n, "each") for n in cluster.nodes]
    for k in keys:
        cluster.cli("SET", k, "old")
        fill(near, host, k)
    before = host.stats()["invalidations"]
    for node, k in zip(cluster.nodes, keys):
        node_cli(node, "SET", k, "new")  # a plain client, straight to the key's master
        wait_for(lambda k=k: local(host, k) is None, 10, f"the invalidation of {k} from its master")
        assert near.get(k) == b"new"
    assert host.stats()["invalidations"] >= before + 3
    # a write through the near cache on a cluster, and get_many across slots
    near.set(keys[0], b"mine")
    assert near.get(keys[0]) == b"mine"
    assert near.get_many(keys + ["app:absent"]) == {keys[0]: b"mine", keys[1]: b"new", keys[2]: b"new"}


def _migrate(cluster, slot: int, src, dst) -> None:
    src_id, dst_id = cluster.node_id(src), cluster.node_id(dst)
    node_cli(dst, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", src_id)
    node_cli(src, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", dst_id)
    keys = node_cli(src, "CLUSTER", "GETKEYSINSLOT", str(slot), "1000").split()
    if keys:
        node_cli(src, "MIGRATE", "127.0.0.1", str(dst.port), "", "0", "5000", "KEYS", *keys)
    for n in (dst, src, *[n for n in cluster.nodes if n not in (src, dst)]):
        node_cli(n, "CLUSTER", "SETSLOT", str(slot), "NODE", dst_id)
    cluster.wait_ok()


def test_slot_migration_bumps_the_epoch_and_leaves_no_stale_read(cluster, host, near):
    src, dst = cluster.nodes[0], cluster.nodes[1]
    k = key_on(cluster, src, "mig")
    slot = int(node_cli(src, "CLUSTER", "KEYSLOT", k))
    cluster.cli("SET", k, "v1")
    fill(near, host, k)
    epoch = host.stats()["epoch"]
    _migrate(cluster, slot, src, dst)
    assert cluster.owner(k) is dst
    wait_for(lambda: host.stats().get("epoch") != epoch and host.stats().get("tracker_up"), 20,
             "a new epoch after the slot moved")
    assert near.get(k) == b"v1"
    fill(near, host, k)
    node_cli(dst, "SET", k, "v2")  # the new master: its tracking connection reports it
    wait_for(lambda: local(host, k) is None, 10, "the invalidation from the slot's new master")
    assert near.get(k) == b"v2"
    _migrate(cluster, slot, dst, src)  # leave the cluster as it was for the next test


def test_master_restart_bumps_the_epoch_and_serves_nothing_it_lost(cluster, host, near):
    node = cluster.nodes[2]
    k = key_on(cluster, node, "restart")
    cluster.cli("SET", k, "before")
    fill(near, host, k)
    epoch = host.stats()["epoch"]
    node.restart(signal.SIGKILL)  # same port and nodes.conf: the same master, empty (no persistence)
    cluster.wait_ok()
    wait_for(lambda: host.stats().get("tracker_up") and host.stats().get("epoch") != epoch, 30,
             "the tracker back up under a new epoch")
    assert host.stats()["reconnects"] >= 1

    def read():
        try:
            return ("ok", near.get(k))
        except (redis.RedisError, redis.exceptions.RedisClusterException) as e:  # redis-py rediscovering
            return ("error", e)

    status, v = wait_for(lambda: (lambda r: r if r[0] == "ok" else None)(read()), 20, "a read to succeed")
    assert v is None  # the restarted master lost the key; the old copy is never served
    assert [tracking_clients(n) for n in cluster.nodes] == [1, 1, 1]
