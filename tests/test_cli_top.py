"""`shmcache top` driven in a real terminal (tmux), `inspect`, `create`,
`--json` on the read commands, and `set` storing decimal text as an int."""

import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import types

import pytest

from shmcache import Cache
from shmcache.cli import main

CTX = mp.get_context("spawn")


def sh(*args, ok=True):
    """Run the shmcache command in this process (a subprocess costs a second of imports each)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    r = types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def test_set_decimal_text_is_an_int_so_incr_works(make_cache):
    c = make_cache()
    sh("set", "-n", c.name, "counter", "5")
    assert c.incr("counter") == 6
    sh("set", "-n", c.name, "neg", "-12")
    sh("set", "-n", c.name, "zip", "01234", "--type", "str")
    sh("set", "-n", c.name, "word", "5a")
    sh("set", "-n", c.name, "f", "1.5")
    assert (c["neg"], c["zip"], c["word"], c["f"]) == (-12, "01234", "5a", "1.5")


def test_inspect_and_json_read_commands(make_cache):
    c = make_cache()
    c.set("s", "hello", ttl=100)
    c.set(b"b", b"\x00\xff")
    c.set("d", {"a": [1, 2]})
    r = json.loads(sh("inspect", "-n", c.name, "s", "--json").stdout)
    assert (r["key"], r["type"], r["size"], r["stripe"] >= 0) == ("s", "str", 5, True)
    assert 90 < r["ttl"] <= 100 and r["accessed"] in (True, False)
    text = sh("inspect", "-n", c.name, "s").stdout
    assert re.search(r"type\s+str", text) and "ttl" in text
    missing = sh("inspect", "-n", c.name, "nope", ok=False)
    assert missing.returncode == 1 and missing.stderr.startswith("shmcache: key 'nope' not found")
    assert json.loads(sh("get", "-n", c.name, "d", "--json").stdout) == {"a": [1, 2]}
    assert json.loads(sh("get", "-n", c.name, "s", "--json").stdout) == "hello"
    assert sorted(json.loads(sh("keys", "-n", c.name, "--json").stdout), key=str) == ["d", "s", {"bytes": "b"}]
    chk = json.loads(sh("check", "-n", c.name, "--json").stdout)
    assert chk["sound"] is True and chk["problems"] == []
    st = json.loads(sh("stats", "-n", c.name, "--json").stdout)
    assert st["items"] == 3


def test_create(cache_name):
    r = json.loads(sh("create", "-n", cache_name, "--size", "8MiB", "--stripes", "4", "--json").stdout)
    assert r["stripes"] == 4 and r["size"] <= 8 * 2**20 and 0 < r["data_bytes"] < r["size"]
    with Cache(cache_name, create=False) as c:
        assert c.stats()["stripes"] == 4
    again = sh("create", "-n", cache_name, ok=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = sh("create", "-n", "x" + cache_name, "--stripes", "3", ok=False)
    assert bad.returncode == 1 and "power of two" in bad.stderr
    assert "x" + cache_name not in Cache.list()


def test_top_json_frames(make_cache):
    c = make_cache()
    r = sh("top", "-n", c.name, "--interval", "0.2", "--iterations", "2", "--json")
    frames = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(frames) == 2 and frames[0]["clients"] >= 2 and frames[0]["hit_rate"] is None


# ------------------------------------------------------------------ tmux
UNIT_OPS = 5  # per unit of load: 1 set, 3 gets that hit, 1 get that misses


def _paced_load(name, units_per_s, seconds, ready):
    c = Cache(name, create=False)
    ready.set()
    t0 = time.monotonic()
    n = 0
    while True:
        due = int((time.monotonic() - t0) * units_per_s)  # absolute schedule: catches up if behind
        if time.monotonic() - t0 >= seconds:
            break
        while n < due:
            k = f"k{n % 1000}"
            c.set(k, n)
            c.get(k), c.get(k), c.get(k)
            c.get("never-there")
            n += 1
        time.sleep(0.002)
    c.close()


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (make test installs it)")
    sock = f"shmcache-test-{os.getpid()}-{time.monotonic_ns()}"

    def run(*args):
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=30)

    yield run
    run("kill-server")  # our private server only (-L)


def _frames(pane):
    ops = re.search(r"ops/s\s+([\d,]+)", pane)
    hr = re.search(r"hit rate\s+([\d.]+)%", pane)
    return (int(ops.group(1).replace(",", "")) if ops else None, float(hr.group(1)) if hr else None)


def test_top_in_tmux_shows_the_known_load(make_cache, tmux):
    c = make_cache(size="8MiB")
    units = 300  # -> 1,500 ops/s, hit rate 75%
    cmd = f"{sys.executable} -m shmcache top -n {c.name} --interval 0.5"
    assert tmux("new-session", "-d", "-s", "top", "-x", "110", "-y", "30", cmd).returncode == 0
    ready = CTX.Event()
    p = CTX.Process(target=_paced_load, args=(c.name, units, 6.0, ready))
    p.start()
    try:
        assert ready.wait(30)
        seen = []
        deadline = time.monotonic() + 60
        while p.is_alive() and time.monotonic() < deadline:
            pane = tmux("capture-pane", "-p", "-t", "top").stdout
            ops, hr = _frames(pane)
            if ops:
                seen.append((ops, hr))
            time.sleep(0.5)
    finally:
        p.join(60)
    assert p.exitcode == 0
    assert "hottest stripes" in pane and "clients" in pane and "memory" in pane and "lock waits/s" in pane
    busy = [s for s in seen if s[0] > 0]
    assert len(busy) >= 4, seen
    # frames overlapping the start or end of the load show part of it: the median frame is a full one
    median = statistics.median(ops for ops, _ in busy)
    assert 0.5 * units * UNIT_OPS <= median <= 1.5 * units * UNIT_OPS, seen
    assert all(hr == pytest.approx(75.0, abs=2.0) for _, hr in busy), seen
    tmux("send-keys", "-t", "top", "q")
    deadline = time.monotonic() + 20
    while tmux("has-session", "-t", "top").returncode == 0:
        assert time.monotonic() < deadline, "top did not quit on q"
        time.sleep(0.1)
