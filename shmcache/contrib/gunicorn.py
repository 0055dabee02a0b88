"""gunicorn server hooks: one shmcache for all workers, its daemon beside the master.

Use them as the whole config, naming your app::

    gunicorn -c python:shmcache.contrib.gunicorn myapp:app

or from your own config file (hooks and settings are plain module globals)::

    # gunicorn.conf.py
    from shmcache.contrib.gunicorn import *   # on_starting, when_ready, post_fork, worker_exit, on_exit
    workers = 8

What the hooks do, in the master unless said otherwise:

- ``on_starting``: create the cache (or attach: it may exist from a previous
  run kept with SHMCACHE_KEEP=1) and start the daemon,
  ``python -m shmcache daemon --name N --size S [--snapshot PATH]``, which
  expires keys, recovers locks of crashed workers and, with SHMCACHE_SNAPSHOT,
  snapshots to PATH (and restores from it at start, so a restart comes back warm).
- ``when_ready`` (still before the first worker is forked): wait until the
  daemon serves, i.e. has restored the snapshot, so no request writes into the
  cache before it is warm (the daemon only restores into an empty cache). It
  asks the cache (``shmcache.daemon.wait_ready``, what ``shmcache wait`` runs),
  not the daemon's log.
- the master's loop (gunicorn has no periodic hook: ``when_ready`` wraps the
  arbiter's once-a-second ``manage_workers``) and ``pre_fork``: if the daemon
  died (``kill -9``, OOM killer), log it and start a new one, so expiry,
  recovery and snapshots never silently stop.
- ``post_fork`` (in each new worker): attach the worker. The handle opened in
  the master is inherited; shmcache claims a client slot of the worker's own at
  fork, so the app (imported before the fork with ``--preload``, after it
  without) reuses it through ``shmcache.contrib.cache_from_env()``.
- ``worker_exit`` (in the worker): give the client slot back.
- ``on_exit``: SIGTERM the daemon (it writes a final snapshot), wait for it,
  then unlink the cache unless SHMCACHE_KEEP=1.

Settings (environment, read by the hooks and the app alike; relative paths
are taken from the directory gunicorn starts in):

=========================  ==============================================
SHMCACHE_NAME              cache name (default ``gunicorn-demo``)
SHMCACHE_SIZE              segment size (default ``64MiB``)
SHMCACHE_SNAPSHOT          snapshot file (default: none, no snapshots)
SHMCACHE_DAEMON            ``0`` to run without the daemon
SHMCACHE_DAEMON_ARGS       extra daemon arguments (shell syntax), e.g. ``--metrics 127.0.0.1:9464``
SHMCACHE_UPSTREAM          Redis URL: the daemon tracks it (read from its environment, never put on its command line)
                           for a near cache (``shmcache.near``)
SHMCACHE_TRACK_PREFIX      comma-separated key prefixes it tracks (default: all)
SHMCACHE_SERVE             a port: the daemon also serves the cache over the Redis
                           protocol there (``shmcache daemon --serve PORT``)
SHMCACHE_DAEMON_LOG        daemon log file (default ``<snapshot>.daemon.log``,
                           or ``$TMPDIR/shmcache-<name>.daemon.log``)
SHMCACHE_DAEMON_WAIT       seconds to wait for the daemon's restore (default 60)
SHMCACHE_KEEP              ``1`` to keep the cache when gunicorn exits
SHMCACHE_LOCK_TIMEOUT      seconds before a writer checks a stripe's holder
SHMCACHE_BIND              listen address (default ``127.0.0.1:8000``)
WEB_CONCURRENCY            workers (default 3)
=========================  ==============================================
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

from .. import Cache
from .._pdeathsig import launcher_command
from . import cache_from_env, env_settings

__all__ = ["bind", "workers", "on_starting", "when_ready", "pre_fork", "post_fork", "worker_exit", "on_exit",
           "daemon_command"]

bind = os.environ.get("SHMCACHE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "3"))

#: How long ``on_exit`` waits for the daemon's final snapshot (seconds).
DAEMON_STOP_TIMEOUT = 30.0

_daemon: subprocess.Popen | None = None
_daemon_log: tuple[str, int] = ("", 0)  # (path, size before this daemon started)
_cache: Cache | None = None



def _snapshot_path(name: str, environ=None) -> str | None:
    path = (os.environ if environ is None else environ).get("SHMCACHE_SNAPSHOT")
    return os.path.abspath(path) if path else None


def _daemon_log_path(name: str) -> str:
    log = os.environ.get("SHMCACHE_DAEMON_LOG")
    if log:
        return os.path.abspath(log)
    snap = _snapshot_path(name)
    return snap + ".daemon.log" if snap else os.path.join(tempfile.gettempdir(), f"shmcache-{name}.daemon.log")


def daemon_command(environ=None) -> list[str]:
    """The daemon's command line (without the launcher) for these settings."""
    env = os.environ if environ is None else environ
    s = env_settings(env)
    cmd = [sys.executable, "-m", "shmcache", "daemon", "--name", s["name"], "--size", str(s["size"])]
    snap = _snapshot_path(s["name"], env)
    if snap:
        cmd += ["--snapshot", snap]
    if env.get("SHMCACHE_UPSTREAM"):
        # Not on the command line (ps shows it to every user, password
        # included): the daemon inherits SHMCACHE_UPSTREAM and reads it there.
        for p in env.get("SHMCACHE_TRACK_PREFIX", "").split(","):
            if p.strip():
                cmd += ["--track-prefix", p.strip()]
    if env.get("SHMCACHE_SERVE"):  # the Redis-protocol endpoint, run and stopped with the daemon
        cmd += ["--serve", env["SHMCACHE_SERVE"]]
    return cmd + shlex.split(env.get("SHMCACHE_DAEMON_ARGS", ""))


def _start_daemon(server) -> None:
    global _daemon, _daemon_log
    if os.environ.get("SHMCACHE_DAEMON", "1") == "0":
        server.log.info("shmcache: daemon disabled (SHMCACHE_DAEMON=0)")
        return
    if importlib.util.find_spec("shmcache.__main__") is None:
        server.log.warning("shmcache: no 'python -m shmcache' in this install; running without the daemon")
        return
    name = env_settings()["name"]
    cmd = daemon_command()
    log_path = _daemon_log_path(name)
    for d in {os.path.dirname(_snapshot_path(name) or ""), os.path.dirname(log_path)}:
        if d:
            os.makedirs(d, exist_ok=True)
    # The daemon logs to a file, not through the master: a reader thread in
    # the master could hold stderr's lock at a fork and deadlock the worker.
    with open(log_path, "ab") as log:
        _daemon_log = (log_path, log.tell())
        _daemon = subprocess.Popen(
            # Through the launcher, so the daemon gets SIGTERM (and writes its
            # snapshot) even if the master dies without running on_exit
            # (SIGKILL, OOM killer); see shmcache._pdeathsig.
            launcher_command(cmd),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, close_fds=True,
        )
    server.log.info("shmcache: daemon started (pid %s, log %s): %s", _daemon.pid, log_path, shlex.join(cmd))


def _log_tail() -> str:
    log_path, offset = _daemon_log
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read()
    except OSError:
        return ""
    return " | ".join(text.decode(errors="replace").strip().splitlines()[-3:])


def _wait_for_daemon(server) -> None:
    """Block until the daemon serves (holds the daemon lock, snapshot restored:
    what ``shmcache wait`` checks), it exits, or SHMCACHE_DAEMON_WAIT seconds pass."""
    global _daemon
    from ..daemon import wait_ready
    from ..errors import DaemonError

    name = env_settings()["name"]
    deadline = time.monotonic() + float(os.environ.get("SHMCACHE_DAEMON_WAIT", "60"))
    while True:
        try:
            pid = wait_ready(name, timeout=0.5)
            server.log.info("shmcache: daemon serving (pid %s, log %s)", pid, _daemon_log[0])
            return
        except DaemonError as e:
            why = str(e)
        if _daemon.poll() is not None:
            server.log.error("shmcache: the daemon exited (status %s); running without it: %s",
                             _daemon.returncode, _log_tail())
            _daemon = None
            return
        if time.monotonic() > deadline:
            server.log.warning("shmcache: the daemon is not serving yet (%s; see %s); starting the workers anyway",
                               why, _daemon_log[0])
            return


def _check_daemon(server) -> None:
    """Start a new daemon if ours died (logged): without it expiry, lock
    recovery and snapshots would silently stop."""
    global _daemon
    proc = _daemon
    if proc is None or proc.poll() is None:
        return
    # (gunicorn's SIGCHLD handler may have reaped it first: then the status reads 0)
    server.log.error("shmcache: the daemon (pid %s) died (exit status %s): %s; starting a new one",
                     proc.pid, proc.returncode, _log_tail() or "no log")
    _daemon = None
    _start_daemon(server)
    if _daemon is not None:
        _wait_for_daemon(server)


def _watch_daemon(server) -> None:
    """Run _check_daemon from the master's loop, about once a second: gunicorn
    has no periodic hook, so wrap the arbiter's manage_workers, which its loop
    calls after every wake-up (at most a second apart)."""
    manage = server.manage_workers

    def manage_workers():
        _check_daemon(server)
        manage()

    server.manage_workers = manage_workers


def _stop_daemon(server) -> None:
    global _daemon
    proc, _daemon = _daemon, None
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the daemon writes a final snapshot, then exits
    try:
        proc.wait(DAEMON_STOP_TIMEOUT)
        server.log.info("shmcache: daemon stopped (exit status %s)", proc.returncode)
    except subprocess.TimeoutExpired:
        server.log.error("shmcache: daemon did not stop within %.0f s; killing it", DAEMON_STOP_TIMEOUT)
        proc.kill()
        proc.wait(5)


def on_starting(server):
    """Create (or attach) the cache and start its daemon, before any worker exists."""
    global _cache
    _cache = cache_from_env()
    server.log.info("shmcache: cache %r ready (%s bytes)", _cache.name, _cache.stats()["size"])
    _start_daemon(server)


def when_ready(server):
    """Before the first fork: wait for the daemon's restore (the cache works
    without a daemon), then watch it from the master's loop."""
    if _daemon is not None:
        _wait_for_daemon(server)
        _watch_daemon(server)


def pre_fork(server, worker):
    """Before each fork of a worker (also respawns): restart the daemon if it died."""
    _check_daemon(server)


def post_fork(server, worker):
    """In the new worker: attach to the cache (own client slot, claimed at fork)."""
    cache = cache_from_env()
    worker.log.info("shmcache: worker %s attached to %r", worker.pid, cache.name)


def worker_exit(server, worker):
    """In the exiting worker: give its client slot back."""
    try:
        cache_from_env().close()
    except Exception:  # pragma: no cover - never block an exit; the daemon reaps slots
        pass


def on_exit(server):
    """Stop the daemon (final snapshot), detach, unlink the cache unless SHMCACHE_KEEP=1."""
    _stop_daemon(server)
    name = env_settings()["name"]
    if _cache is not None:
        _cache.close()
    if os.environ.get("SHMCACHE_KEEP") == "1":
        server.log.info("shmcache: keeping cache %r (SHMCACHE_KEEP=1)", name)
    else:
        Cache.unlink(name)
        server.log.info("shmcache: cache %r unlinked", name)
