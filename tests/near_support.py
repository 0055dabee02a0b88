"""A real redis-server and real shmcache daemons for the near-cache tests.

``RedisServer`` runs redis-server as our child on 127.0.0.1 with a port
picked free at run time (persistence off, its own temp dir), and stops it by
PID: SIGTERM, then SIGKILL after a bounded wait. ``restart()`` brings it back
on the same port, empty, as a crashed Redis without persistence would.
``Host`` is one simulated host: a cache and its daemon tracking that Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from names import fresh_name
from shmcache import Cache
from shmcache.near import read_stats

REDIS = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout=10.0, what="condition", every=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop(owner, sig, timeout) -> None:
    """Stop ``owner.proc`` by PID: ``sig``, then SIGKILL after ``timeout`` s; close its log."""
    proc = owner.proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc is not None:
        owner._log.close()
    owner.proc = None


class RedisServer:
    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="near-redis-")
        self.proc = None
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.password = None

    def start(self) -> "RedisServer":
        self._log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "yes",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(self._pingable, 10, "redis-server to accept connections")
        return self

    def _pingable(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def cli(self, *args) -> str:
        """Run ``redis-cli`` against this server (a plain client, not redis-py)."""
        env = {**os.environ, "REDISCLI_AUTH": self.password} if self.password else None
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10,
                             env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def stop(self, sig=signal.SIGTERM) -> None:
        _stop(self, sig, 5)

    def restart(self, sig=signal.SIGKILL) -> None:
        self.stop(sig)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        p = free_port()
        if p + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue
    raise AssertionError("no free port pair for a cluster node")


class ClusterNodeServer(RedisServer):
    """One ``--cluster-enabled yes`` redis-server; its nodes.conf lives in
    its own dir, so ``restart()`` brings the same node back (empty)."""

    def __init__(self):
        super().__init__()
        self.port = free_cluster_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "ClusterNodeServer":
        self._log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "yes", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for(self._pingable, 10, "a cluster node to accept connections")
        return self


class LocalCluster:
    """``n`` masters (no replicas) on 127.0.0.1, joined by ``redis-cli --cluster
    create``, each stopped by PID. ``url`` is the ``redis+cluster://`` seed."""

    def __init__(self, n: int = 3):
        self.nodes = [ClusterNodeServer() for _ in range(n)]

    def start(self) -> "LocalCluster":
        try:
            for node in self.nodes:
                node.start()
            out = subprocess.run(["redis-cli", "--cluster", "create",
                                  *[f"127.0.0.1:{n.port}" for n in self.nodes], "--cluster-replicas", "0",
                                  "--cluster-yes"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def wait_ok(self, timeout=30.0) -> None:
        def ok():
            for n in self.nodes:
                if n.proc is None or "cluster_state:ok" not in n.cli("CLUSTER", "INFO"):
                    return False
            # every node also agrees on who owns every slot
            return len({_slot_owners(n) for n in self.nodes}) == 1

        wait_for(ok, timeout, "the cluster to be ok on every node", every=0.1)

    @property
    def url(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes).join(("redis+cluster://", "/"))

    def node_id(self, node) -> str:
        return node.cli("CLUSTER", "MYID")

    def owner(self, key: str):
        """The node serving ``key``'s slot."""
        n0 = next(n for n in self.nodes if n.proc is not None)
        slot = int(n0.cli("CLUSTER", "KEYSLOT", key))
        table = _slot_table(n0)
        port = next(p for a, b, p in table if a <= slot <= b)
        return next(n for n in self.nodes if n.port == port)

    def cli(self, *args) -> str:
        """``redis-cli -c`` (follows redirections) through the first live node."""
        n = next(n for n in self.nodes if n.proc is not None)
        out = subprocess.run(["redis-cli", "-c", "-p", str(n.port), *args], capture_output=True, text=True,
                             timeout=10)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def close(self) -> None:
        for n in self.nodes:
            n.close()


def _slot_table(node) -> list[tuple[int, int, int]]:
    """``[(first, last, master port)]`` as ``node`` sees it (CLUSTER SLOTS)."""
    import redis as redis_py

    r = redis_py.Redis(port=node.port, protocol=2)
    try:
        return sorted((int(e[0]), int(e[1]), int(e[2][1])) for e in r.execute_command("CLUSTER SLOTS"))
    finally:
        r.close()


def _slot_owners(node) -> tuple:
    return tuple(_slot_table(node))


class Host:
    """One simulated host: a cache and a daemon that tracks ``redis``."""

    def __init__(self, redis: RedisServer, tmp_path, prefixes=("app:",), ping=0.05, tag="near", url=None,
                 extra=(), env=None, wrap=(), cache_options=None):
        self.redis = redis
        # what the daemon tracks (a redis+sentinel:// URL, say; "": none on its command line)
        self.url = redis.url if url is None else url
        self.name = fresh_name(tag)
        self.prefixes = list(prefixes)
        self.ping = ping
        self.log_path = tmp_path / f"{self.name}.daemon.log"
        self.cache = Cache(self.name, **{"size": "8MiB", **(cache_options or {})})
        self.proc = None
        self.extra = list(extra)  # more daemon options
        self.env = env  # the daemon's environment (None: ours)
        self.wrap = list(wrap)  # a command the daemon runs under (setpriv ...)

    def start_daemon(self, wait=True) -> "Host":
        args = [*self.wrap, sys.executable, "-m", "shmcache", "daemon", "--name", self.name,
                "--track-ping", str(self.ping), *self.extra]
        if self.url:
            args += ["--upstream", self.url]
        for p in self.prefixes:
            args += ["--track-prefix", p]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env)
        if wait:
            self.wait_up()
        return self

    def tracker_pid(self) -> int:
        """The pid of the daemon's tracker process (it writes it in shared memory)."""
        return self.stats()["tracker"]["pid"]

    def thread_nices(self, pid=None) -> list[int]:
        """The nice value of each thread of ``pid`` (default: the daemon), from /proc."""
        pid = pid or self.proc.pid
        out = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                out.append(int(f.read().rpartition(")")[2].split()[16]))
        return out

    def stats(self) -> dict:
        return read_stats(self.cache) or {}

    def wait_up(self, timeout=20.0) -> dict:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            st = self.stats()
            return st if st.get("tracker_up") else None

        return wait_for(up, timeout, f"the tracker of {self.name} to be up\n")

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def stop_daemon(self, sig=signal.SIGTERM) -> None:
        _stop(self, sig, 20)

    def close(self) -> None:
        self.stop_daemon()
        self.cache.close()
        Cache.unlink(self.name)
