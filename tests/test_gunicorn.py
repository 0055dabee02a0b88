"""A real gunicorn (workers/gunicorn_conf.py + workers/app.py), real requests, real SIGKILL.

Each test starts gunicorn with 3 workers on 127.0.0.1 and a free port, under
a ``test-`` cache name, and stops it in ``finally`` (SIGTERM to the master,
then SIGKILL to whatever is left); the cache must be gone afterwards.
"""

import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import psutil
import pytest

from shmcache import Cache, admin
from names import fresh_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUEST_TIMEOUT = 15.0  # seconds per request: a hang, not a measurement

pytest.importorskip("gunicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_option(cli: str) -> bool:
    from gunicorn import config

    return any(cli in (getattr(s, "cli", None) or []) for s in config.KNOWN_SETTINGS)


class Gunicorn:
    """One gunicorn master started with workers/gunicorn_conf.py."""

    def __init__(self, tmp_path, worker_class="sync", preload=False, env=None, name=None,
                 config="workers/gunicorn_conf.py", cwd=ROOT):
        self.name = name or fresh_name("gu")
        self.snapshot = tmp_path / "cache.snapshot"
        self.port = _free_port()
        self.log_path = tmp_path / "gunicorn.log"
        args = [
            sys.executable, "-m", "gunicorn", "-c", config,
            "-b", f"127.0.0.1:{self.port}", "-w", "3", "-k", worker_class, "--graceful-timeout", "5",
        ]
        if worker_class == "gthread":
            args += ["--threads", "4"]
        if preload:
            args.append("--preload")
        if _has_option("--no-control-socket"):
            args.append("--no-control-socket")  # gunicorn >= 25 opens one in $HOME otherwise
        args.append("workers.app:app")
        self.env = dict(
            os.environ,
            SHMCACHE_NAME=self.name,
            SHMCACHE_SIZE="16MiB",
            SHMCACHE_SNAPSHOT=str(self.snapshot),
            SHMCACHE_DEMO_RATE_LIMIT="25",
            SHMCACHE_DEMO_RATE_WINDOW="600",
            SHMCACHE_DEMO_EXPENSIVE_SECONDS="0.5",
        )
        self.env.update(env or {})
        self.args = args
        self.cwd = cwd
        self.proc = None
        self.started = self.stopped = False

    def start(self):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited ({self.proc.returncode}):\n{self.log()}")
            try:
                status, _h, _b = self.get("/healthz", timeout=2)
                if status == 200 and len(self.worker_pids()) == 3:
                    self.started = True
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gunicorn not ready after 30 s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        out = []
        for path in (self.log_path, f"{self.snapshot}.daemon.log"):
            try:
                with open(path, errors="replace") as f:
                    out.append(f"--- {path}\n" + f.read()[-5000:])
            except OSError:
                pass
        return "\n".join(out)

    def worker_pids(self) -> set[int]:
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return set()
        out = set()
        for c in children:
            try:
                if "gunicorn" in " ".join(c.cmdline()) and c.status() != psutil.STATUS_ZOMBIE:
                    out.add(c.pid)
            except psutil.Error:
                pass
        return out

    def get(self, path, headers=None, timeout=REQUEST_TIMEOUT):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def stats(self) -> dict:
        status, _h, body = self.get("/stats")
        assert status == 200
        return json.loads(body)

    def stop(self):
        if self.proc is None or self.stopped:
            return
        self.stopped = True
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for p in family:  # workers or daemon left behind by a master that did not finish
            try:
                p.kill()  # (psutil checks the pid still is that process)
            except psutil.Error:
                pass
        self._log.close()


@pytest.fixture
def gunicorn(tmp_path):
    servers = []

    def start(**kw):
        g = Gunicorn(tmp_path, **kw)
        servers.append(g)
        return g.start()

    yield start
    for g in servers:
        g.stop()
    for g in servers:
        leftover = os.path.exists(f"/dev/shm/shmcache.{g.name}")
        Cache.unlink(g.name)
        if g.started:  # (a server that failed to start has failed its test already)
            assert not leftover, f"on_exit did not unlink the cache:\n{g.log()}"


def _clients(n_threads, fn):
    """Run fn(i) in n_threads threads; re-raise the first error."""
    errors = []

    def run(i):
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize(
    "worker_class,preload",
    [("sync", False), ("sync", True), ("gthread", False), ("gthread", True)],
    ids=["sync", "sync-preload", "gthread", "gthread-preload"],
)
def test_workers_share_one_cache(gunicorn, worker_class, preload):
    g = gunicorn(worker_class=worker_class, preload=preload)
    threads, pages_per_thread, limited_per_thread = 6, 40, 10
    barrier = threading.Barrier(threads)
    lock = threading.Lock()
    seen_counts, page_pids, limited, expensive = [], Counter(), Counter(), []

    def client(i):
        barrier.wait(30)
        # Everyone asks for the expensive value at once: it must be computed once.
        status, headers, body = g.get("/expensive")
        assert status == 200, body
        with lock:
            expensive.append(json.loads(body))
        for j in range(pages_per_thread):
            status, headers, body = g.get("/")
            assert status == 200, body
            n = int(re.match(rb"page views: (\d+)", body).group(1))
            with lock:
                seen_counts.append(n)
                page_pids[int(headers["X-Worker-Pid"])] += 1
            if j < limited_per_thread:
                status, headers, _ = g.get("/limited", {"X-Client-Id": "one-client"})
                assert status in (200, 429)
                with lock:
                    limited[status] += 1

    _clients(threads, client)
    total = threads * pages_per_thread

    # The counter: every increment landed exactly once, whichever worker did it.
    assert sorted(seen_counts) == list(range(1, total + 1))
    # The expensive computation ran exactly once, and everyone got its result.
    assert len({e["computed_by"] for e in expensive}) == 1
    assert {e["run"] for e in expensive} == {1}
    # The rate limit holds across workers: 25 allowed in the window, the rest refused.
    assert limited == {200: 25, 429: threads * limited_per_thread - 25}

    st = g.stats()
    assert st["pageviews"] == total
    assert st["expensive_runs"] == 1
    # /stats reflects all workers: the per-worker counts are the ones we saw.
    assert {int(pid): n for pid, n in st["workers"].items()} == dict(page_pids)
    assert len(page_pids) >= 2, f"only {len(page_pids)} worker(s) served 240 requests"
    assert set(page_pids) <= g.worker_pids()
    assert st["cache"]["clients"] >= 3


@pytest.mark.skipif(importlib.util.find_spec("shmcache.__main__") is None, reason="no shmcache daemon")
def test_restart_comes_back_warm(gunicorn):
    """on_exit stops the daemon, which writes a final snapshot; the next start restores it
    before the first worker runs."""
    g = gunicorn()
    for _ in range(5):
        assert g.get("/")[0] == 200
    g.stop()
    assert not os.path.exists(f"/dev/shm/shmcache.{g.name}")  # unlinked at exit
    assert g.snapshot.exists(), g.log()

    g2 = gunicorn(name=g.name)
    status, _h, body = g2.get("/")
    assert (status, body.split(b" (")[0]) == (200, b"page views: 6"), g2.log()
    assert "daemon serving" in g2.log()


def _hold_lock(g):
    """Ask a worker to take the page-view counter's stripe lock and stop there.
    Returns (connection, pid of that worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=REQUEST_TIMEOUT)
    conn.request("GET", "/_test/hold-lock?key=demo:pageviews")
    resp = conn.getresponse()
    assert resp.status == 200
    line = resp.readline().decode()
    m = re.match(r"holding (\d+) (\d+)", line)
    assert m, line
    return conn, int(m.group(2))


def _check_respawn(g, before, victim):
    """The master replaced the victim; the new worker serves and the cache is sound."""
    deadline = time.monotonic() + 20
    while True:
        pids = g.worker_pids()
        if len(pids) == 3 and victim not in pids:
            break
        assert time.monotonic() < deadline, f"no replacement worker:\n{g.log()}"
        time.sleep(0.1)
    new = pids - before
    assert len(new) == 1
    deadline = time.monotonic() + 20
    while True:
        status, headers, _ = g.get("/")
        assert status == 200, g.log()
        if int(headers["X-Worker-Pid"]) in new:
            break
        assert time.monotonic() < deadline, "the new worker never served a request"
    st = g.stats()
    assert st["cache"]["recoveries"] >= 1
    assert str(new.pop()) in st["workers"]
    assert st["pageviews"] == sum(st["workers"].values())  # no increment lost
    c = Cache(g.name, create=False)
    try:
        assert c.check() == []
    finally:
        c.close()


def test_worker_sigkilled_holding_a_stripe_lock(gunicorn):
    """SIGKILL a worker inside the lock; the others go on serving, one request
    at a time (the next test has clients already waiting)."""
    g = gunicorn(env={"SHMCACHE_TEST_ENDPOINTS": "1", "SHMCACHE_LOCK_TIMEOUT": "0.2"})
    before = g.worker_pids()
    for _ in range(10):
        assert g.get("/")[0] == 200
    conn, victim = _hold_lock(g)
    try:
        assert victim in before
        os.kill(victim, signal.SIGKILL)
        for i in range(30):  # each within REQUEST_TIMEOUT
            status, _h, body = g.get("/")
            assert status == 200, (i, body, g.log())
    finally:
        conn.close()
    assert g.stats()["pageviews"] == 40
    _check_respawn(g, before, victim)


def test_worker_sigkilled_holding_a_stripe_lock_while_clients_wait(gunicorn):
    """As above, but clients are already waiting on the stripe when the holder dies."""
    g = gunicorn(env={"SHMCACHE_TEST_ENDPOINTS": "1", "SHMCACHE_LOCK_TIMEOUT": "0.2"})
    before = g.worker_pids()
    conn, victim = _hold_lock(g)
    statuses, lock = Counter(), threading.Lock()
    try:
        def client(i):
            for _ in range(10):
                try:
                    status = g.get("/")[0]
                except (http.client.HTTPException, OSError):
                    status = "dropped"
                with lock:
                    statuses[status] += 1
                if status != 200:
                    return

        t = threading.Thread(target=_clients, args=(3, client))
        t.start()
        time.sleep(0.5)  # both live workers are now waiting for the stripe
        os.kill(victim, signal.SIGKILL)
        t.join(120)
        assert not t.is_alive()
    finally:
        conn.close()
    assert statuses == {200: 30}
    _check_respawn(g, before, victim)


# -- regression: waiters' markers used to block each other's recovery ------------
def _holder(name, s, fd):
    c = Cache(name, create=False)
    admin.storage(c).locks.lock(s)  # the engine's lock on purpose: a crash mid-write
    os.write(fd, b"locked\n")
    time.sleep(60)


def _writer(name, key, lock_timeout):
    from shmcache.errors import LockTimeout

    c = Cache(name, create=False, lock_timeout=lock_timeout)
    try:
        c.set(key, os.getpid())
    except LockTimeout:
        os._exit(3)
    os._exit(0)


def test_regression_two_waiters_recover_stripe_of_sigkilled_holder():
    """Two writers already blocked on a stripe when its holder is SIGKILLed:
    one of them recovers it and both finish (each waiter's marker used to count
    as "a live process may hold it" and blocked the other's recovery)."""
    import multiprocessing

    from shmcache.codec import encode_key
    from shmcache.table import key_hash

    ctx = multiprocessing.get_context("fork")
    name = fresh_name("gu")
    c = Cache(name, size="4MiB")
    procs = []
    try:
        s = key_hash(encode_key("k")) & (c.stats()["stripes"] - 1)
        r, w = os.pipe()
        holder = ctx.Process(target=_holder, args=(name, s, w))
        procs.append(holder)
        holder.start()
        assert os.read(r, 7) == b"locked\n"
        writers = [ctx.Process(target=_writer, args=(name, "k", 0.1)) for _ in range(2)]
        procs += writers
        for p in writers:
            p.start()
        time.sleep(0.5)  # both writers are waiting for the stripe
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(5)
        for p in writers:
            p.join(30)
        assert [p.exitcode for p in writers] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        c.close()
        Cache.unlink(name)


def test_packaged_hooks_work_from_any_directory(gunicorn, tmp_path):
    """`gunicorn -c python:shmcache.contrib.gunicorn APP` as a pip user runs it:
    no workers/ directory, started elsewhere, no snapshot configured."""
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    g = gunicorn(config="python:shmcache.contrib.gunicorn", cwd=run_dir,
                 env={"SHMCACHE_SNAPSHOT": "", "SHMCACHE_DAEMON_LOG": str(tmp_path / "daemon.log"),
                      "PYTHONPATH": str(ROOT)})
    assert g.get("/")[0] == 200
    with Cache(g.name, create=False) as c:
        st = c.stats()
        assert st["daemon_alive"] and st["daemon_snapshot_path"] is None
    assert "serving" in (tmp_path / "daemon.log").read_text()
    assert not list(run_dir.iterdir())  # nothing written where it was started


def test_regression_daemon_sigkilled_is_restarted_and_logged(gunicorn):
    # kill -9 of the daemon: nobody noticed, and expiry and snapshots silently stopped.
    g = gunicorn()
    m = re.search(r"shmcache: daemon started \(pid (\d+)", g.log())
    assert m, g.log()
    old = int(m.group(1))
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "died" not in g.log():
        assert time.monotonic() < deadline, f"the master did not notice:\n{g.log()}"
        time.sleep(0.1)
    assert re.search(rf"shmcache: the daemon \(pid {old}\) died .*starting a new one", g.log()), g.log()
    r = subprocess.run([sys.executable, "-m", "shmcache", "wait", "-n", g.name, "--timeout", "30"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.stderr, g.log())
    new = int(re.search(r"daemon pid (\d+) serves", r.stdout).group(1))
    assert new != old
    assert g.get("/")[0] == 200 and g.stats()["cache"]["daemon_alive"] is True
