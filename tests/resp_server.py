"""Start and stop a real ``shmcache serve`` process for the RESP tests."""

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

_LISTEN = re.compile(r"tcp [^ ,]+:(\d+)")


class ServeProcess:
    """``python -m shmcache serve`` on a free port, stopped by PID."""

    def __init__(self, name: str, *args: str, size: str = "16MiB", unix: str | None = None):
        cmd = [sys.executable, "-m", "shmcache", "serve", "-n", name, "--size", size, "--port", "0",
               "--log-level", "info", *args]
        if unix:
            cmd += ["--unix", unix]
        # unbuffered: a buffered readline could pull the "tcp ...:port" line into
        # its buffer with an earlier one, and select() would then wait for more
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, bufsize=0)
        self.log = []
        self.port = None
        deadline = time.monotonic() + 30
        while self.port is None:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("shmcache serve did not start:\n" + "".join(self.log))
            r, _, _ = select.select([self.proc.stderr], [], [], left)
            if r:
                line = self.proc.stderr.readline().decode()
                self.log.append(line)
                m = _LISTEN.search(line)
                if m:
                    self.port = int(m.group(1))
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
