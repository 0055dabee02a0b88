"""The CLI and a daemon in different PID namespaces (issue 9): a sidecar
container sharing /dev/shm, simulated with ``unshare --pid --fork --mount-proc``.

The header records the daemon's pid as the daemon sees itself: pid 1 in its
own namespace. ``shmcache snapshot`` (SIGUSR1) and ``shmcache rm --force``
(SIGTERM) used to signal that number, which in the caller's namespace is
another process: its own init (in a container, the application). They must
signal the daemon by the pid the kernel reports for the daemon lock's holder
(translated into the caller's namespace), and refuse when the daemon runs in
a namespace the caller cannot see.

The regression test runs the CLI as pid 1 of its own namespace, so before
the fix it only signalled itself (the kernel drops default-handled signals a
namespace's init sends itself): nothing outside the test is ever signalled.
"""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from shmcache import Cache
from test_deploy import needs_pidns

SHMCACHE = [sys.executable, "-m", "shmcache"]
IN_NEW_PIDNS = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


ENTRIES = 10


def _run(*args, timeout=60):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def _ls_row(name, *prefix):
    """`shmcache ls --json`'s row for cache ``name``, run after ``prefix`` (e.g. in another namespace)."""
    return next(row for row in json.loads(_run(*prefix, *SHMCACHE, "ls", "--json").stdout) if row["name"] == name)


@pytest.fixture
def ns_daemon(cache_name, tmp_path):
    """A daemon of ``cache_name`` as pid 1 of a new PID namespace, serving,
    with ENTRIES entries stored; yields (its pid on the host, its snapshot path)."""
    snap = tmp_path / "ns.snap"
    log = open(tmp_path / "daemon.log", "wb")
    p = subprocess.Popen(IN_NEW_PIDNS + SHMCACHE + ["daemon", "-n", cache_name, "--size", "4MiB",
                                                    "--snapshot", str(snap), "--snapshot-every", "0"],
                         stdout=log, stderr=log)
    try:
        r = _run(*SHMCACHE, "wait", "-n", cache_name, "--timeout", "60", "--json", timeout=90)
        assert r.returncode == 0, (r.stderr, (tmp_path / "daemon.log").read_text())
        assert json.loads(r.stdout)["daemon_pid"] == 1  # the header holds its own view of itself
        host_pid = psutil.Process(p.pid).children()[0].pid
        with Cache(cache_name, create=False) as c:
            c.set_many({f"k{i}": i for i in range(ENTRIES)})
        yield host_pid, snap
    finally:
        for child in psutil.Process(p.pid).children() if p.poll() is None else []:
            child.terminate()  # unshare --fork does not pass SIGTERM on
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()  # --kill-child: the daemon dies with it
            p.wait(10)
        log.close()


@needs_pidns
@pytest.mark.timeout(180)
def test_regression_cli_in_another_pid_namespace_never_signals_pid_1_for_the_daemon(ns_daemon, cache_name):
    host_pid, snap = ns_daemon
    t0 = time.monotonic()
    r = _run(*IN_NEW_PIDNS, *SHMCACHE, "snapshot", "-n", cache_name, "--timeout", "10")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "runs in another PID namespace" in r.stderr and "give a PATH" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 10, "it waited for a snapshot nobody was asked for"
    r = _run(*IN_NEW_PIDNS, *SHMCACHE, "rm", "-n", cache_name, "--force", "--timeout", "10")
    assert r.returncode == 1 and "runs in another PID namespace" in r.stderr and "nothing was removed" in r.stderr, \
        (r.stdout, r.stderr)
    assert cache_name in Cache.list() and psutil.pid_exists(host_pid)
    mine = _ls_row(cache_name, *IN_NEW_PIDNS)
    assert mine["daemon_pid"] == 1 and mine["daemon_local_pid"] is None
    assert "pid 1 in another PID namespace, alive" in _run(*IN_NEW_PIDNS, *SHMCACHE, "stats", "-n", cache_name).stdout
    # a PATH written from that namespace needs no signal at all
    path = snap.with_name("from-the-sidecar.snap")
    r = _run(*IN_NEW_PIDNS, *SHMCACHE, "snapshot", "-n", cache_name, str(path), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["entries"] == ENTRIES, r.stderr


@needs_pidns
@pytest.mark.timeout(180)
def test_cli_on_the_host_signals_a_daemon_in_a_child_pid_namespace_by_its_host_pid(ns_daemon, cache_name):
    host_pid, snap = ns_daemon
    mine = _ls_row(cache_name)
    assert mine["daemon_pid"] == 1 and mine["daemon_local_pid"] == host_pid
    assert f"alive (pid {host_pid})" in _run(*SHMCACHE, "ls").stdout
    st = json.loads(_run(*SHMCACHE, "stats", "-n", cache_name, "--json").stdout)
    assert st["daemon_pid"] == 1 and st["daemon_local_pid"] == host_pid
    assert f"pid {host_pid}, alive" in _run(*SHMCACHE, "stats", "-n", cache_name).stdout
    r = _run(*SHMCACHE, "snapshot", "-n", cache_name, "--json", "--timeout", "60", timeout=90)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["daemon_pid"] == host_pid and info["path"] == str(snap) and info["entries"] == ENTRIES
    r = _run(*SHMCACHE, "rm", "-n", cache_name, "--force", "--timeout", "60", timeout=90)
    assert r.returncode == 0, r.stderr
    assert f"stopped daemon pid {host_pid}" in r.stdout and f"removed cache {cache_name!r}" in r.stdout
    assert cache_name not in Cache.list()
