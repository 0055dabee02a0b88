"""Start and stop a real ``shmcache serve`` process for the RESP tests.

``ServeProcess(..., loop="asyncio")`` runs this file instead: the same
``serve`` options, but the server is :meth:`shmcache.server.Server.start`
inside an asyncio loop (the entry point for an application's own loop)
rather than the workers' epoll loop, so tests can run against both.
"""

import asyncio
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

_LISTEN = re.compile(r"tcp [^ ,]+:(\d+)")

#: The server loops a test can run against: the workers' own epoll loop
#: (``shmcache serve``) and asyncio (``Server.start()``).
LOOPS = ("epoll", "asyncio")


class ServeProcess:
    """``python -m shmcache serve`` on a free port, stopped by PID; with
    ``loop="asyncio"``, the same options served by ``Server.start()`` in an
    asyncio loop (one process: no ``--workers``)."""

    def __init__(self, name: str, *args: str, size: str | None = "16MiB", unix: str | None = None,
                 loop: str = "epoll", env: dict | None = None):
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
        self.loop = loop
        head = [sys.executable, "-m", "shmcache", "serve"] if loop == "epoll" else [sys.executable, __file__]
        cmd = [*head, "-n", name, *(["--size", size] if size else []), "--port", "0", "--log-level", "info", *args]
        if unix:
            cmd += ["--unix", unix]
        # unbuffered: a buffered readline could pull the "tcp ...:port" line into
        # its buffer with an earlier one, and select() would then wait for more
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0,
                                     env=None if env is None else {**os.environ, **env})
        self.log = []
        self.port = None  # stays None with --no-tcp
        deadline = time.monotonic() + 30
        listening = False
        while not listening:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("shmcache serve did not start:\n" + "".join(self.log))
            r, _, _ = select.select([self.proc.stderr], [], [], left)
            if r:
                line = self.proc.stderr.readline().decode()
                self.log.append(line)
                if "over RESP" in line:  # the line naming what it listens on
                    listening = True
                    m = _LISTEN.search(line)
                    self.port = int(m.group(1)) if m else None
        # the workers listen from the moment the sockets are bound (before the log line)
        # Keep draining the server's log: a full stderr pipe (64 KiB, e.g. one
        # "protocol error" line per fuzzed client) would block the server in
        # write() and it would stop answering.
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    def _read_log(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            self.log.append(line.decode(errors="replace"))

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        drain = getattr(self, "_drain", None)
        if drain is not None:
            drain.join(10)
        else:  # never started (the server did not come up): read what it said
            self.log.append(self.proc.stderr.read().decode(errors="replace"))
        self.proc.stderr.close()
        return self.proc.returncode

    def stderr(self) -> str:
        return "".join(self.log)


def worker_pids(parent: int) -> list[int]:
    """The server worker processes forked by ``parent``."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                out.append(int(pid))
    return out


def _serve_asyncio(argv: list) -> int:
    """``shmcache serve``'s options, served by ``Server.start()`` in
    ``asyncio.run`` until SIGTERM/SIGINT (public API only, as an application
    embedding the server would)."""
    from shmcache import Cache
    from shmcache.cli import build_parser
    from shmcache.server import LIMIT_DEFAULTS, Server, read_password

    a = build_parser().parse_args(["serve", *argv])
    if a.workers != 1:
        raise SystemExit("the asyncio entry point serves in one process: no --workers")
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s asyncio-serve[%(process)d] %(levelname)s %(message)s")
    limits = {k: getattr(a, k) for k in LIMIT_DEFAULTS if getattr(a, k, None) is not None}
    password = read_password(a.requirepass or os.environ.get("SHMCACHE_REQUIREPASS") or None, a.requirepass_file)

    async def main() -> None:
        with Cache(a.name, size=a.size, default_ttl=None) as cache:
            srv = Server(cache, host=a.bind or "127.0.0.1", bind_explicit=a.bind is not None,
                         port=None if a.no_tcp else a.port, unix=a.unix, unix_mode=int(a.unix_mode, 8),
                         password=password, **limits)
            await srv.start()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            where = ([f"tcp {srv.bind}:{srv.port}"] if not a.no_tcp else []) + ([f"unix {a.unix}"] if a.unix else [])
            logging.getLogger("shmcache.server").info("serving cache %r over RESP (asyncio): %s", a.name,
                                                      ", ".join(where))
            try:
                await stop.wait()
            finally:
                srv.close()

    asyncio.run(main())
    return 0


if __name__ == "__main__":
    sys.exit(_serve_asyncio(sys.argv[1:]))
