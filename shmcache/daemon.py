"""The shmcache daemon: active expiry, snapshots, crash recovery and a heartbeat.

One daemon per cache (``shmcache daemon --name app ...``). It holds the
segment's ``LOCK_DAEMON`` fcntl lock for its lifetime, so a second daemon is
refused, and the kernel frees the lock if the daemon dies. Its loop, on one
thread:

* **expiry** every ``expire_every`` seconds, like Redis' active expire cycle:
  a vectorised numpy scan of the index's expiry column (at most one full pass
  over the index per FULL_SCAN_SECONDS, so an idle cache costs little) finds
  stripes holding expired entries; each is then cleaned under its own lock,
  within a time budget of EXPIRE_CPU_SHARE of the tick. A stripe with many
  expired entries is rebuilt vectorised (computed without the lock, published
  under it in one copy); a stripe with few loses them through the table's
  per-key sweep, SWEEP_LIMIT entries per lock hold.
* **recovery** every ``recover_every`` seconds: stripes whose lock owner is
  dead are repaired and released, client slots of dead processes are freed.
* **snapshots** every ``snapshot_every`` seconds, on SIGUSR1, and a final one
  on SIGTERM/SIGINT (see ``shmcache.snapshot``).
* **heartbeat**: daemon pid, start time and the time of the last tick in the
  header, read by ``Cache.stats()`` and ``shmcache stats``/``ls``.
* **tracking** (with ``upstream``): the near cache's one Redis tracking
  connection for the host, in a child process of its own
  (``shmcache.near.TrackerProcess``, restarted if it dies): on a thread,
  expiry ticks in the same interpreter delayed invalidations by tens of ms.

Once the start-up restore is done the daemon logs ``daemon pid <pid> serving
cache ...`` (keep its wording: scripts read it), marks itself ready in the
header (``shmcache wait -n NAME`` returns then; the gunicorn hooks use it) and
tells systemd ``READY=1`` when started as a ``Type=notify`` service, with
``STATUS=`` lines after each snapshot and ``WATCHDOG=1`` at half of
``WatchdogSec``. It refuses to start if the snapshot directory is not
writable, and exits with status 1 if its last snapshot failed.

While a snapshot is being written the loop does nothing else (a 1 GiB cache
takes about a second); reads still never return expired entries.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import socket
import stat
import tempfile
import time
import warnings
from collections import deque

import numpy as np

from . import admin
from . import layout as L
from .cache import MAX_SECONDS, Cache, check_seconds
from .errors import DaemonError, Error
from .lock import Identity
from .snapshot import SnapshotError, restore_snapshot, terminal_progress, write_snapshot

log = logging.getLogger("shmcache.daemon")

#: Share of each expiry tick the cycle may spend scanning and deleting
#: (Redis' ACTIVE_EXPIRE_CYCLE_SLOW_TIME_PERC is 25 too).
EXPIRE_CPU_SHARE = 0.25
#: The scan covers the whole index at most once per this many seconds: a full
#: pass over a 1 GiB cache's 7 M slots costs ~50 ms, too much for every tick.
FULL_SCAN_SECONDS = 1.0
#: Expired entries removed one by one per lock hold (the table's per-key path
#: costs ~5 us each, so the stripe is held ~1 ms at most).
SWEEP_LIMIT = 256
#: From this many expired entries in one stripe, rebuild its index slice
#: vectorised instead: one copy under the lock, however many go.
BULK_MIN = 128


# ------------------------------------------------------------------- expiry
class ExpiryCycle:
    """Redis-style active expiry over one cache: scan a window of the index per
    tick, clean the stripes it finds, within a time budget.

    ``slots_per_tick`` bounds the scan (default: a full pass per
    FULL_SCAN_SECONDS at one tick per ``expire_every`` seconds).
    """

    def __init__(self, cache: Cache, expire_every: float = 0.1, clock=time.time, slots_per_tick: int | None = None):
        self.cache = cache
        self.clock = clock
        g = admin.geometry(cache)
        self.n_stripes = g.n_stripes
        self.sps = g.slots_per_stripe
        if slots_per_tick is None:
            ticks = max(1.0, FULL_SCAN_SECONDS / max(expire_every, 1e-3))
            slots_per_tick = int(np.ceil(g.n_stripes * g.slots_per_stripe / ticks))
        self.stripes_per_tick = max(1, min(g.n_stripes, -(-slots_per_tick // g.slots_per_stripe)))
        self.cursor = 0
        self.pending: deque = deque()  # (stripe, expired count seen by the scan)
        self.reclaimed = 0
        #: "max_lock_hold": longest single lock hold of the bulk path, seconds.
        self.timing: dict = {}

    def scan(self, now: float, stripes: int) -> None:
        """Queue the stripes among the next ``stripes`` (from the cursor) that hold expired entries."""
        a = self.cursor
        b = min(self.n_stripes, a + stripes)
        counts = admin.expiring(self.cache, now, a, b - a)
        for i in np.nonzero(counts)[0].tolist():
            self.pending.append((a + i, int(counts[i])))
        self.cursor = 0 if b >= self.n_stripes else b

    def sweep_stripe(self, s: int, now: float, expected: int) -> tuple[int, bool]:
        """Clean stripe s. Returns (removed, more_left)."""
        if expected >= BULK_MIN:
            return admin.expire(self.cache, s, now=now, timing=self.timing), False
        n = admin.expire(self.cache, s, limit=SWEEP_LIMIT, now=now)
        return n, n >= SWEEP_LIMIT

    def tick(self, budget: float) -> int:
        """One cycle: finish pending stripes, then scan and clean the next window,
        stopping after ``budget`` seconds. Returns entries reclaimed."""
        deadline = time.perf_counter() + budget
        now = self.clock()
        n = 0
        scanned = 0
        first = True  # always make some progress, however small the budget
        while first or time.perf_counter() < deadline:
            first = False
            if not self.pending:
                if scanned >= self.stripes_per_tick:
                    break
                k = self.stripes_per_tick - scanned
                k = min(k, self.n_stripes - self.cursor)
                self.scan(now, k)
                scanned += k
                continue
            n += self._sweep_next(now)
        self.reclaimed += n
        return n

    def _sweep_next(self, now: float) -> int:
        """Clean the next pending stripe once; requeue it if entries remain."""
        s, expected = self.pending.popleft()
        removed, more = self.sweep_stripe(s, now, expected)
        if more:
            self.pending.append((s, max(0, expected - removed)))
        return removed

    def sweep_all(self) -> int:
        """Reclaim every entry expired now, whatever it costs (benchmarks, tests)."""
        now = self.clock()
        self.pending.clear()
        self.cursor = 0
        n = 0
        self.scan(now, self.n_stripes)
        while self.pending:
            n += self._sweep_next(now)
        self.reclaimed += n
        return n


# ------------------------------------------------------------------ daemon
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class Daemon:
    """Keeps one cache healthy until told to stop; see the module docstring.

    Args:
        name: the cache (created with the layout settings below if missing).
        size, stripes, max_items: layout, only used when creating.
        mode: permission bits if created; on attach, the loosest accepted.
        owner: a uid or user name trusted besides the daemon's own user.
        snapshot: snapshot file path (None: no snapshots).
        snapshot_every: seconds between periodic snapshots (0: only on
            SIGUSR1 and at exit).
        expire_every: seconds between expiry ticks (0: no active expiry).
        recover_every: seconds between dead-owner / dead-client checks.
        restore: load ``snapshot`` at start when it exists and the cache is empty.
        metrics: ``"HOST:PORT"`` to serve Prometheus metrics at ``/metrics``
            (``shmcache.contrib.prometheus``; needs ``prometheus_client``) and
            the read-only status page at ``/`` (``shmcache.contrib.status``).
            A bare ``PORT`` listens on 127.0.0.1; port 0 picks a free one.
        upstream: Redis URL to track for :mod:`shmcache.near` (None: no tracking).
        track_prefixes: key prefixes to track (empty: every key).
        track_ping: seconds between the tracker's PINGs (readers trust the near
            cache for twice that after the last answered one).
        track_nice: nice value of the tracker thread alone (None: inherited);
            see ``shmcache.near.Tracker``.

    Raises:
        DaemonError: another daemon serves the cache or writes ``snapshot``,
            or ``snapshot`` is a directory, FIFO, device or symlink.
        ValueError / TypeError: a bad name, size or interval (NaN, infinite,
            negative or above MAX_INTERVAL).
        UntrustedSegment: the existing segment belongs to an untrusted user
            or is looser than ``mode`` (pass ``owner``/``mode``).
        LayoutMismatch: the existing segment has another layout version.
        OSError: the snapshot's directory cannot be created.
    """

    def __init__(
        self,
        name: str,
        size: int | str | None = None,
        *,
        stripes: int | None = None,
        max_items: int | None = None,
        mode: int | None = None,
        owner: int | str | None = None,
        snapshot: str | None = None,
        snapshot_every: float = 60.0,
        expire_every: float = 0.1,
        recover_every: float = 1.0,
        restore: bool = True,
        metrics: str | None = None,
        upstream: str | None = None,
        track_prefixes=(),
        track_ping: float = 0.1,
        track_nice: int | None = None,
    ):
        # NaN compares false with everything: unchecked, it silently turned
        # recovery or snapshots off. Bounded so a sleep can never overflow.
        check_seconds("snapshot_every", snapshot_every, maximum=MAX_INTERVAL, zero_ok=True)
        check_seconds("expire_every", expire_every, maximum=MAX_INTERVAL, zero_ok=True)
        check_seconds("recover_every", recover_every, maximum=MAX_INTERVAL)
        if track_prefixes and not upstream:
            raise ValueError("track_prefixes (--track-prefix) needs upstream (--upstream URL)")
        self.name = name
        self.snapshot_path = os.path.abspath(snapshot) if snapshot else None
        self._snap_lock = None
        self.snapshot_every = float(snapshot_every)
        self.expire_every = float(expire_every)
        self.recover_every = float(recover_every)
        self.restore = restore
        self.metrics_addr = parse_listen(metrics) if metrics else None
        self.metrics_server = None
        self.tracker = None
        if self.snapshot_path:
            if len(os.fsencode(self.snapshot_path)) > admin.SNAPSHOT_PATH_MAX_BYTES:
                # recorded in the header so `shmcache snapshot` finds it
                raise DaemonError(f"snapshot path {self.snapshot_path} is longer than "
                                  f"{admin.SNAPSHOT_PATH_MAX_BYTES} bytes; use a shorter one")
            _check_writable_dir(os.path.dirname(self.snapshot_path))
            _check_snapshot_path(self.snapshot_path)
        # Every argument is checked above: from here on, whatever fails
        # releases what was taken (the snapshot lock first: a daemon refused
        # for another's snapshot file creates no cache).
        cache = None
        try:
            if self.snapshot_path:
                self._snap_lock = _lock_snapshot_path(self.snapshot_path)
            cache = self.cache = Cache(name, size=size, stripes=stripes, max_items=max_items, mode=mode,
                                       owner=owner)
            if not admin.claim_daemon_lock(cache):
                holder = admin.daemon_lock_holder(cache)
                how = f"stop it first (kill -TERM {holder})" if holder else "stop it first"
                raise DaemonError(
                    f"a daemon (pid {holder or '?'}) is already running for cache {name!r}; {how}"
                )
            if upstream:
                from .near import Tracker, TrackerProcess

                tracker = Tracker(cache, upstream, track_prefixes, track_ping, nice=track_nice)
                # a process of its own: see TrackerProcess for why not a thread
                self.tracker = TrackerProcess(tracker, name, mode, owner) if isinstance(upstream, str) else tracker
        except BaseException:
            if cache is not None:
                cache.close()
            self._release_snapshot_lock()
            raise
        self.identity = Identity()
        self.expiry = ExpiryCycle(self.cache, expire_every or 0.1)
        self._stop = False
        self._snap_requested = False
        self._wake_r = self._wake_w = None
        self.snapshots = 0
        #: None: no snapshot attempted yet; else whether the last attempt failed
        self.last_snapshot_failed: bool | None = None
        self._watchdog_every = _watchdog_interval()
        self._next_watchdog = 0.0
        admin.publish_daemon(self.cache, self.identity.pid, self.identity.start, self.snapshot_path)

    # -- header fields -----------------------------------------------------
    def _beat(self) -> None:
        admin.heartbeat(self.cache)

    def _clear_beat(self) -> None:
        admin.withdraw_daemon(self.cache, self.identity.pid)

    def _watchdog(self) -> None:
        """Ping systemd's watchdog (``WATCHDOG=1``) if one is due. Called by the
        loop and by snapshot and restore progress: a snapshot longer than
        half of ``WatchdogSec`` would otherwise get a working daemon killed."""
        if self._watchdog_every:
            now = time.monotonic()
            if now >= self._next_watchdog:
                sd_notify("WATCHDOG=1")
                self._next_watchdog = now + self._watchdog_every

    # -- jobs --------------------------------------------------------------
    def load_snapshot(self) -> None:
        """Restore the snapshot file if it exists and the cache is empty. A bad
        file is logged and renamed to ``<path>.bad-<time>``; the daemon goes on.
        Never raises for a bad file (a corrupt snapshot must not keep the cache
        from being served)."""
        path = self.snapshot_path
        if not (self.restore and path and os.path.exists(path)):
            return
        items = admin.stored_items(self.cache)
        if items:
            log.info("cache %r already holds %d items; not loading snapshot %s", self.name, items, path)
            return
        bar = terminal_progress(f"restoring {os.path.basename(path)}", unit="entries")

        def progress(done, total):
            self._beat()
            self._watchdog()
            if bar:
                bar(done, total)

        try:
            # merge: a client that attached first and already wrote a key has
            # a newer value than the snapshot's, so the snapshot only fills gaps
            r = restore_snapshot(self.cache, path, merge=True, progress=progress)
        except SnapshotError as e:
            bad = f"{path}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
            try:
                os.replace(path, bad)
                where = f"moved to {bad}"
            except OSError as e2:
                where = f"left in place ({e2.strerror})"
            log.error("snapshot not loaded: %s; starting empty (the file was %s)", e, where)
            return
        finally:
            if bar:
                bar.finish()
        log.info(
            "restored %s: %d entries in %.3f s (%s; skipped %d expired, %d too large, %d no room)",
            path, r.loaded, r.seconds, _fmt_bytes(r.bytes), r.skipped_expired, r.skipped_too_large, r.skipped_full,
        )

    def take_snapshot(self):
        """Write a snapshot now (logs one line). Returns its SnapshotInfo, or
        None if there is no snapshot path or writing failed (logged)."""
        if not self.snapshot_path:
            log.warning("snapshot requested but the daemon has no --snapshot path")
            return None
        bar = terminal_progress(f"snapshot {os.path.basename(self.snapshot_path)}")

        def progress(done, total):
            self._beat()
            self._watchdog()
            if bar:
                bar(done, total)

        try:
            info = write_snapshot(self.cache, self.snapshot_path, progress=progress)
        except (OSError, Error) as e:
            log.error("snapshot to %s failed: %s", self.snapshot_path, e)
            admin.record_snapshot(self.cache, ok=False, error=str(e))
            self.last_snapshot_failed = True
            sd_notify(f"STATUS=serving cache {self.name!r}; last snapshot FAILED: {e}")
            return None
        finally:
            if bar:
                bar.finish()
        admin.record_snapshot(self.cache, ok=True, entries=info.entries, nbytes=info.bytes, seconds=info.seconds)
        self.last_snapshot_failed = False
        sd_notify(f"STATUS=serving cache {self.name!r}; last snapshot {time.strftime('%H:%M:%S')}: "
                  f"{info.entries} entries")
        self.snapshots += 1
        log.info(
            "snapshot %s: %d entries, %s in %.3f s (%.0f MB/s); longest stripe lock %.2f ms",
            info.path, info.entries, _fmt_bytes(info.bytes), info.seconds,
            info.bytes / 1e6 / max(info.seconds, 1e-9), info.max_lock_hold * 1e3,
        )
        if info.skipped_damaged:
            log.warning("snapshot %s left out %d damaged entries (failing their checksums): "
                        "run 'shmcache check -n %s' (and 'check --fix' to drop them)",
                        info.path, info.skipped_damaged, self.name)
        return info

    def recover_once(self) -> None:
        """Run the dead-owner and dead-client checks once (logs what it fixed)."""
        try:
            stripes, clients = admin.recover(self.cache)
        except Error as e:  # e.g. the client-table lock timed out: try again next time
            log.warning("recovery check failed: %s", e)
            return
        if stripes:
            log.warning("recovered stripes %s: their lock holder had died", stripes)
        if clients:
            log.info("freed %d client slot(s) of dead processes", len(clients))

    def start_metrics(self) -> tuple[str, int] | None:
        """Serve Prometheus metrics (``/metrics``) and the read-only status page
        (``/``, ``/status.json``; see :mod:`shmcache.contrib.status`) on
        ``metrics_addr`` in a thread (both only read shared memory). Returns
        the bound (host, port).

        Raises:
            DaemonError: prometheus_client is missing or the address is taken.
        """
        if self.metrics_addr is None:
            return None
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app

            from .contrib.prometheus import ShmcacheCollector
            from .contrib.status import make_app, serve
        except ImportError as e:
            raise DaemonError(f"--metrics needs prometheus_client: pip install 'shmcache[prometheus]' ({e})") from e
        registry = CollectorRegistry()
        registry.register(ShmcacheCollector(self.cache))
        host, port = self.metrics_addr
        try:
            self.metrics_server, _thread = serve(make_app(self.cache, make_wsgi_app(registry)), host, port)
        except OSError as e:
            raise DaemonError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
        bound = self.metrics_server.server_address[:2]
        where = "%s:%d" % ((f"[{bound[0]}]" if ":" in bound[0] else bound[0]), bound[1])
        log.info("metrics at http://%s/metrics, status page at http://%s/", where, where)
        return bound

    # -- loop --------------------------------------------------------------
    def request_stop(self, *_a) -> None:
        """Ask the loop to finish (final snapshot, then return). Signal-safe."""
        self._stop = True

    def request_snapshot(self, *_a) -> None:
        """Ask the loop for a snapshot at its next wake-up. Signal-safe."""
        self._snap_requested = True

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGUSR1 snapshots; a wakeup pipe ends waits at once."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w)
        self._old_handlers = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, self.request_stop),
            signal.SIGINT: signal.signal(signal.SIGINT, self.request_stop),
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, self.request_snapshot),
        }

    def _wait(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self._wake_r is None:
            time.sleep(seconds)
            return
        r, _, _ = select.select([self._wake_r], [], [], seconds)
        if r:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def run(self) -> None:
        """Serve until :meth:`request_stop` (SIGTERM/SIGINT); then take the final
        snapshot, clear the heartbeat and detach."""
        g = admin.geometry(self.cache)
        if not admin.created(self.cache):
            log.info("attached to the existing cache %r; its layout wins over --size/--stripes/--max-items",
                     self.name)
        self.load_snapshot()
        self.start_metrics()
        if self.tracker is not None:
            self.tracker.start()
        # Logged once the start-up restore is done: scripts wait for this line.
        if not self.snapshot_path:
            snaps = "snapshots off"
        elif self.snapshot_every:
            snaps = f"snapshot {self.snapshot_path} every {self.snapshot_every:g} s, on SIGUSR1 and at exit"
        else:
            snaps = f"snapshot {self.snapshot_path} on SIGUSR1 and at exit"
        expiry = f"active expiry every {self.expire_every:g} s" if self.expire_every else "active expiry off"
        log.info(
            "daemon pid %d serving cache %r (%s, %d stripes, %d items max); %s; %s",
            os.getpid(), self.name, _fmt_bytes(g.total_size), g.n_stripes, g.max_items, snaps, expiry,
        )
        admin.mark_daemon_ready(self.cache, self.identity.pid)  # what `shmcache wait` waits for
        sd_notify(f"READY=1\nSTATUS=serving cache {self.name!r} ({_fmt_bytes(g.total_size)}); {snaps}")
        tick = self.expire_every if self.expire_every > 0 else 0.5
        now = time.monotonic()
        next_expire = now
        next_recover = now
        next_snapshot = now + self.snapshot_every if self.snapshot_every else float("inf")
        while not self._stop:
            now = time.monotonic()
            self._beat()
            self._watchdog()
            if self._snap_requested:
                self._snap_requested = False
                self.take_snapshot()
                if self.snapshot_every:
                    next_snapshot = time.monotonic() + self.snapshot_every
            if self.expire_every and now >= next_expire:
                try:
                    self.expiry.tick(self.expire_every * EXPIRE_CPU_SHARE)
                except Error as e:  # a live process kept a stripe locked: next tick retries
                    log.warning("expiry tick failed: %s", e)
                next_expire = now + self.expire_every
            if self.tracker is not None and hasattr(self.tracker, "poll"):
                self.tracker.poll()
            if now >= next_recover:
                self.recover_once()
                next_recover = now + self.recover_every
            if now >= next_snapshot:
                self.take_snapshot()
                next_snapshot = time.monotonic() + self.snapshot_every
            if self._stop or self._snap_requested:
                continue
            wake = min(next_expire if self.expire_every else now + tick, next_recover, next_snapshot, now + tick)
            if self._watchdog_every:
                wake = min(wake, self._next_watchdog)
            self._wait(wake - time.monotonic())
        log.info("stopping")
        sd_notify("STOPPING=1\nSTATUS=writing the final snapshot" if self.snapshot_path else "STOPPING=1")
        if self.snapshot_path:
            self.take_snapshot()

    def close(self) -> None:
        """Clear the heartbeat, stop serving metrics, restore signal handlers and detach. Idempotent."""
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self._wake_w is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for sig, old in self._old_handlers.items():
                if sig == signal.SIGUSR1 and old in (signal.SIG_DFL, None):
                    old = signal.SIG_IGN  # a late snapshot request must not kill a stopping daemon
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None
        if self.tracker is not None:
            self.tracker.stop()
        if not self.cache.closed:
            self._clear_beat()
            self.cache.close()  # also drops LOCK_DAEMON (closing the fd releases fcntl locks)
        self._release_snapshot_lock()

    def _release_snapshot_lock(self) -> None:
        if self._snap_lock is not None:
            os.close(self._snap_lock)  # drops the flock
            self._snap_lock = None


#: The longest interval a daemon timer accepts (seconds; about 11.6 days).
MAX_INTERVAL = MAX_SECONDS


def _check_snapshot_path(path: str) -> None:
    """Refuse a snapshot path that exists and is not a regular file (a FIFO
    would block the restore's open() forever), and create its directory.

    Raises:
        DaemonError: a directory, FIFO, device, socket or symlink.
        OSError: the directory cannot be created.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else \
            "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise DaemonError(f"snapshot path {path} is {kind}; give the path of a regular file")
    os.makedirs(os.path.dirname(path), exist_ok=True)


def _lock_snapshot_path(path: str) -> int:
    """Make this daemon the only writer of snapshot ``path``: an ``flock`` on
    ``<path>.lock``, held until the daemon exits (the kernel drops it if the
    daemon dies). Two daemons writing one file (a cache removed and recreated
    while its old daemon lived on, or two caches configured with one path)
    would each overwrite the other's newer snapshot. Returns the lock's fd.

    Raises:
        DaemonError: another daemon holds the lock (the message names its pid),
            or the lock file cannot be opened.
    """
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise DaemonError(f"cannot open the snapshot lock file {lock_path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DaemonError(f"snapshot lock file {lock_path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise DaemonError(
                f"snapshot file {path} is written by another daemon (pid {holder}, lock {lock_path}); "
                f"two daemons must not share one snapshot file: stop that daemon or give another --snapshot"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def parse_listen(addr: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"[::1]:9464"`` or ``"9464"`` (127.0.0.1) -> (host, port).

    Raises:
        ValueError: not of that form, or the port is out of range.
    """
    host, sep, port = addr.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", addr
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad listen address {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


def _check_writable_dir(path: str) -> None:
    """Create ``path`` if needed and prove we can write there by creating a
    file: os.access answers for the permission bits (root passes them all), not
    for a read-only mount, a full disk or a security module.

    Raises:
        DaemonError: naming the directory and the system's reason.
    """
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".shmcache-probe-"):
            pass
    except OSError as e:
        raise DaemonError(
            f"snapshot directory {path} is not writable ({e.strerror or e}); "
            "fix its permissions or give another --snapshot path"
        ) from None


def _watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings: half of systemd's WatchdogSec (passed
    as WATCHDOG_USEC, for our pid only if WATCHDOG_PID is set), or 0 if off."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    wpid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (wpid and wpid != str(os.getpid())):
        return 0.0
    return int(usec) / 2e6


def sd_notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` ...) to systemd
    over $NOTIFY_SOCKET, as sd_notify(3) does: one datagram on an AF_UNIX
    socket (a leading ``@`` means the abstract namespace). Returns False when
    not run by systemd (no NOTIFY_SOCKET) or the send failed (logged once at
    debug level: the daemon must keep serving either way). No dependency on
    libsystemd or a Python binding: the protocol is this one datagram.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode("utf-8", "replace"), addr)
        return True
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", addr, e)
        return False


def wait_ready(name: str, timeout: float, poll: float = 0.05, *, owner: int | str | None = None) -> int:
    """Wait until a daemon serves cache ``name`` (holds its daemon lock and has
    finished its start-up restore). Returns the daemon's pid.

    Reads only the header, so any ``mode`` is accepted (a ``--mode 660``
    cache, as the systemd unit makes, included); the owner check holds:
    ``owner`` also trusts a cache of that user (name or uid), as for
    :class:`Cache`.

    Raises:
        DaemonError: not serving within ``timeout`` seconds (the message says
            what was missing: the cache, a daemon, or its restore).
        ValueError: a bad name, or a ``timeout`` that is NaN, infinite,
            negative or above MAX_INTERVAL (a NaN deadline was never reached).
        PermissionDenied / UntrustedSegment: the cache belongs to another
            user (not ``owner``) or this process may not open it.
    """
    from .errors import CacheNotFound, SettingsIgnored

    L.validate_name(name)
    timeout = check_seconds("timeout", timeout, maximum=MAX_INTERVAL, zero_ok=True)
    deadline = time.monotonic() + timeout
    why = f"no cache named {name!r}"
    while True:
        try:
            with warnings.catch_warnings():  # mode 0o777 is a limit here, not a setting that was ignored
                warnings.simplefilter("ignore", SettingsIgnored)
                c = Cache(name, create=False, mode=0o777, owner=owner,
                          init_timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            with c:
                info = admin.daemon_info(c)
                if info.ready:
                    return int(info.pid)
                why = f"the daemon (pid {info.pid}) of cache {name!r} is still starting" if info.alive \
                    else f"no daemon serves cache {name!r}"
        except CacheNotFound:
            pass
        if time.monotonic() >= deadline:
            raise DaemonError(f"{why} after {timeout:g} s")
        time.sleep(poll)


def serve(name: str, **kw) -> int:
    """Run a daemon for cache ``name`` in this process until SIGTERM/SIGINT.
    Keyword arguments are :class:`Daemon`'s. Returns the exit status: 0, or 1
    if the last snapshot attempt (the final one, when snapshots are on) failed.

    Raises:
        DaemonError: another daemon serves the cache, or the snapshot path is a directory.
        ValueError / TypeError: a bad name or setting.
        LayoutMismatch: the existing segment is of another layout version.
    """
    # SIGUSR1's default action is to terminate: hold it until the handler is
    # in place (a `shmcache snapshot` may find this daemon as soon as it holds
    # the daemon lock), then let a pending one through.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        d = Daemon(name, **kw)
        try:
            d.install_signals()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
            d.run()
        finally:
            d.close()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    if d.last_snapshot_failed:
        log.error("daemon stopped; its last snapshot failed (see above): exit status 1")
        return 1
    log.info("daemon stopped")
    return 0
