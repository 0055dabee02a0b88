"""redis-server and memcached for the benchmark: unix sockets only, stopped by PID.

Each server runs as our child in a private temp dir (``/tmp/bench-srv-*``),
listens on a unix socket there and nowhere else (redis ``--port 0``, memcached
``-s`` which disables TCP and UDP), persists nothing, and is registered with
:mod:`benchmarks.cleanup` the moment it is spawned. Stopping sends SIGTERM to
that PID, waits at most ``STOP_TIMEOUT`` seconds, then SIGKILLs it: a run never
leaves a server behind and never waits on one forever.

The binaries come from Debian (``apt-get install redis-server memcached``);
``make bench`` installs them when missing. If one is absent here, the contender
that needs it is skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from . import cleanup

START_TIMEOUT = 10.0  # seconds to wait for the socket to accept connections
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL


class ServerUnavailable(RuntimeError):
    """The server binary is missing or did not come up."""


class Server:
    """A server process of ours listening on ``self.socket``."""

    binary = ""
    name = ""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.dir = None
        self.socket = None
        self.log = None

    def argv(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def version(self) -> str:
        exe = shutil.which(self.binary)
        if not exe:
            return "missing"
        flag = "--version" if self.binary == "redis-server" else "-V"
        try:
            out = subprocess.run([exe, flag], capture_output=True, text=True, timeout=5)
            return out.stdout.strip() or out.stderr.strip()
        except Exception as e:  # pragma: no cover
            return f"unknown ({e})"

    def start(self) -> "Server":
        exe = shutil.which(self.binary)
        if not exe:
            raise ServerUnavailable(f"{self.binary} not found (make bench installs it: apt-get install {self.name})")
        self.dir = tempfile.mkdtemp(prefix=f"bench-srv-{self.name}-")
        cleanup.register(f"remove {self.dir}", lambda d=self.dir: shutil.rmtree(d, ignore_errors=True))
        self.socket = os.path.join(self.dir, f"{self.name}.sock")
        self.log = open(os.path.join(self.dir, f"{self.name}.log"), "wb")
        self.proc = subprocess.Popen(
            [exe, *self.argv()], stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            cwd=self.dir, start_new_session=True,
        )
        cleanup.register(f"stop {self.name} pid {self.proc.pid}", self.stop)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"{self.name} exited with {self.proc.returncode}: {self._log_tail()}")
            if os.path.exists(self.socket):
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.settimeout(1.0)
                        s.connect(self.socket)
                    return self
                except OSError:
                    pass
            time.sleep(0.02)
        self.stop()
        raise ServerUnavailable(f"{self.name} did not listen on {self.socket} within {START_TIMEOUT} s")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        """SIGTERM our PID, wait up to STOP_TIMEOUT s, then SIGKILL. Idempotent."""
        p = self.proc
        if p is None:
            return
        self.proc = None
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(STOP_TIMEOUT)
        if self.log:
            self.log.close()
            self.log = None

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, f"{self.name}.log"), "rb") as f:
                return f.read()[-400:].decode(errors="replace")
        except OSError:
            return ""


class Redis(Server):
    binary = "redis-server"
    name = "redis"

    def argv(self) -> list[str]:
        # No TCP, no persistence, no eviction surprises; one server thread as shipped.
        return [
            "--port", "0", "--unixsocket", self.socket, "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
            "--protected-mode", "yes", "--loglevel", "warning",
        ]


class Memcached(Server):
    binary = "memcached"
    name = "memcached"

    def argv(self) -> list[str]:
        # -s: unix socket only (disables TCP/UDP); -m: MiB of item memory, enough
        # for 100k x 4 KiB values without eviction; -t 2: one thread per core.
        args = ["-s", self.socket, "-a", "0700", "-m", "1024", "-t", "2", "-c", "256"]
        if os.geteuid() == 0:
            args += ["-u", "root"]  # memcached refuses to run as root without it
        return args
