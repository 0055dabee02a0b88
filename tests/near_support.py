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

    def start(self) -> "RedisServer":
        self._log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--protected-mode", "yes"],
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
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def cli(self, *args) -> str:
        """Run ``redis-cli`` against this server (a plain client, not redis-py)."""
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10)
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


class Host:
    """One simulated host: a cache and a daemon that tracks ``redis``."""

    def __init__(self, redis: RedisServer, tmp_path, prefixes=("app:",), ping=0.05, tag="near", url=None,
                 extra=(), env=None, wrap=()):
        self.redis = redis
        self.url = url or redis.url  # what the daemon tracks (a redis+sentinel:// URL, say)
        self.name = fresh_name(tag)
        self.prefixes = list(prefixes)
        self.ping = ping
        self.log_path = tmp_path / f"{self.name}.daemon.log"
        self.cache = Cache(self.name, size="8MiB")
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

    def thread_nices(self) -> list[int]:
        """The nice value of each thread of the daemon (from /proc)."""
        out = []
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            with open(f"/proc/{self.proc.pid}/task/{tid}/stat") as f:
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
