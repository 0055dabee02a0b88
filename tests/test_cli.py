"""The ``shmcache`` command, run as users run it: ``python -m shmcache ...`` in a subprocess."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shmcache import Cache
from shmcache.snapshot import write_snapshot
from names import fresh_name

SUBCOMMANDS = ["daemon", "stats", "get", "set", "delete", "keys", "snapshot", "restore", "check", "ls", "rm", "demo",
               "wait", "systemd-unit", "ttl", "inspect", "top", "create"]
#: Every command that reports something a script may want to read.
JSON_COMMANDS = ["stats", "get", "ttl", "inspect", "keys", "check", "ls", "top", "create", "delete", "snapshot",
                 "restore", "wait"]


def run(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "shmcache", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def ok(*args, **kw):
    r = run(*args, **kw)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def fails(*args, match, **kw):
    """The command must fail with exactly one line ``shmcache: ...`` and exit 1."""
    r = run(*args, **kw)
    assert r.returncode == 1, (args, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shmcache: "), r.stderr
    assert "Traceback" not in r.stderr
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cache(make_cache):
    # a small value limit, so "too large" fits on a command line (128 KiB per argument)
    return make_cache(size="4MiB", max_value_size=50_000)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help_of_every_subcommand(sub):
    out = ok(sub, "--help")
    assert out.startswith("usage: shmcache " + sub)
    assert len(out.splitlines()) > 3


def test_regression_parsing_a_command_does_not_import_the_resp_server():
    # Building the parser imported shmcache.server (hiredis, hmac, ...) for the
    # --max-* help texts: every command paid for it, and `shmcache get` run by
    # a process that had dropped privileges (and could no longer read the
    # interpreter's library) died with ModuleNotFoundError.
    code = ("import sys\nfrom shmcache.cli import build_parser\nbuild_parser().parse_args(['get', '-n', 'x', 'k'])\n"
            "print(sorted(m for m in sys.modules if m.startswith('shmcache.server') or m == 'hiredis'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
    assert "per-client limit (default 33554432)" in " ".join(ok("serve", "--help").split())


def test_top_level_help_lists_every_subcommand():
    out = ok("--help")
    for sub in SUBCOMMANDS:
        assert sub in out
    assert ok("--version").startswith("shmcache ")


def test_set_get_delete(cache):
    n = cache.name
    ok("set", "-n", n, "greeting", "hello world")
    assert ok("get", "-n", n, "greeting") == "hello world\n"
    assert cache["greeting"] == "hello world"
    ok("set", "-n", n, "count", "41", "--type", "int")
    assert cache.incr("count") == 42
    assert ok("get", "-n", n, "count") == "42\n"
    ok("set", "-n", n, "obj", '{"a": [1, 2]}', "--type", "json")
    assert cache["obj"] == {"a": [1, 2]}
    assert ok("get", "-n", n, "obj") == "{'a': [1, 2]}\n"
    ok("set", "-n", n, "raw", "bytes!", "--type", "bytes")
    assert ok("get", "-n", n, "raw") == "b'bytes!'\n"
    assert subprocess.run([sys.executable, "-m", "shmcache", "get", "-n", n, "raw", "--raw"],
                          capture_output=True, timeout=60).stdout == b"bytes!"
    ok("set", "-n", n, "t", "v", "--ttl", "100")
    assert 90 < cache.ttl("t") <= 100  # (a loaded machine can take seconds to run the command)
    fails("set", "-n", n, "t", "other", "--nx", match="already exists")
    assert ok("delete", "-n", n, "greeting", "nothere") == "1\n"
    fails("get", "-n", n, "greeting", match="key 'greeting' not found")


def test_name_from_the_environment(cache):
    cache["k"] = "v"
    assert ok("get", "k", env={"SHMCACHE_NAME": cache.name}) == "v\n"


def test_keys_with_glob_patterns(cache):
    cache.update({"user:1": 1, "user:2": 2, "user:10": 10, "session:1": 1})
    cache.set(b"user:bin", 1)
    cache.set("user:gone", 1, ttl=0.01)
    time.sleep(0.05)
    n = cache.name
    assert ok("keys", "-n", n, "user:?").split() == ["user:1", "user:2"]
    assert ok("keys", "-n", n, "user:*").splitlines() == ["user:1", "user:10", "user:2", "b'user:bin'"]
    assert len(ok("keys", "-n", n).splitlines()) == 5
    assert ok("keys", "-n", n, "session:[0-9]") == "session:1\n"
    assert len(ok("keys", "-n", n, "*", "--limit", "2").splitlines()) == 2
    assert ok("keys", "-n", n, "nomatch*") == ""


def test_stats_table_and_json(cache):
    cache.update({"a": 1, "b": 2})
    cache.get("a")
    cache.get("zzz")
    out = ok("stats", "-n", cache.name)
    assert "items" in out and "2 of" in out and "hit rate" in out and "50.0%" in out
    assert "daemon" in out and "not running" in out
    st = json.loads(ok("stats", "-n", cache.name, "--json"))
    assert st["items"] == 2 and st["hits"] == 1 and st["misses"] == 1 and st["name"] == cache.name
    assert st["daemon_alive"] is False


def test_check_sound_and_damaged(cache):
    cache.set_many({f"k{i}": f"v{i}" for i in range(100)})
    assert "sound" in ok("check", "-n", cache.name)
    # damage one entry's bytes behind the table's back: its checksum fails
    t = cache._table
    s = next(s for s in range(t.n_stripes) if t.stripes[s, 3])
    sl = t.slots[s]
    i = int((sl["tag"] != 0).nonzero()[0][0])
    from shmcache import layout as L

    a = t.arena_off + s * t.stripe_arena + int(sl["loc"][i]) * L.ALIGN
    _chk, vlen, klen, _f, _p = L.ENTRY.unpack_from(cache._seg.mm, a)
    cache._seg.mm[a + L.ENTRY_HEADER + klen + vlen - 1] ^= 0xFF  # the value's last byte
    r = run("check", "-n", cache.name)
    assert r.returncode == 1
    assert "checksum mismatch" in r.stdout
    assert r.stderr == f"shmcache: cache {cache.name!r} is damaged: 1 problem(s)\n"


def test_snapshot_to_a_path_restore_and_check_the_file(cache, tmp_path, cache_name):
    cache.set_many({f"k{i}": i for i in range(500)})
    path = tmp_path / "cli.snap"
    out = ok("snapshot", "-n", cache.name, str(path))
    assert "500 entries" in out
    assert "sound" in ok("check", "--snapshot", str(path))
    other = fresh_name()
    try:
        out = ok("restore", "-n", other, str(path), "--size", "8MiB")
        assert "restored 500 entries" in out
        with Cache(other, create=False) as c:
            assert len(c) == 500 and c["k7"] == 7
        # merge keeps what is there
        with Cache(other, create=False) as c:
            c["k7"] = "mine"
            c["extra"] = 1
        assert "already present" in ok("restore", "-n", other, str(path), "--merge")
        with Cache(other, create=False) as c:
            assert c["k7"] == "mine" and c["extra"] == 1
        ok("restore", "-n", other, str(path))
        with Cache(other, create=False) as c:
            assert c["k7"] == 7 and "extra" not in c
    finally:
        Cache.unlink(other)


def test_snapshot_through_the_daemon(cache, tmp_path):
    snap = tmp_path / "d.snap"
    cache.update({"a": 1, "b": 2})
    fails("snapshot", "-n", cache.name, match="no daemon runs")
    log = open(tmp_path / "daemon.log", "wb")
    d = subprocess.Popen([sys.executable, "-m", "shmcache", "daemon", "-n", cache.name, "--snapshot", str(snap),
                          "--snapshot-every", "0"], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while f"daemon pid {d.pid} serving" not in (tmp_path / "daemon.log").read_text():
            assert time.monotonic() < deadline and d.poll() is None
            time.sleep(0.02)
        out = ok("snapshot", "-n", cache.name)
        assert f"daemon pid {d.pid} wrote {snap}: 2 entries" in out
        w = json.loads(ok("wait", "-n", cache.name, "--json"))
        assert w == {"name": cache.name, "daemon_pid": d.pid, "ready": True}
        info = json.loads(ok("snapshot", "-n", cache.name, "--json"))
        assert info["daemon_pid"] == d.pid and info["path"] == str(snap) and info["entries"] == 2
        st = json.loads(ok("stats", "-n", cache.name, "--json"))
        assert st["daemon_alive"] is True and st["daemon_pid"] == d.pid
        assert f"alive (pid {d.pid})" in ok("ls")
        fails("rm", "-n", cache.name, match=f"daemon pid {d.pid} is running")
    finally:
        d.send_signal(signal.SIGTERM)
        try:
            d.wait(20)
        finally:
            if d.poll() is None:
                d.kill()
                d.wait(5)
            log.close()


def test_ls_and_rm(cache_name):
    with Cache(cache_name, size="4MiB") as c:
        c.set_many({f"k{i}": i for i in range(7)})
        out = ok("ls")
        row = next(ln for ln in out.splitlines() if ln.startswith(cache_name))
        assert " 7 " in row and "none" in row and "MiB" in row
        rows = json.loads(ok("ls", "--json"))
        mine = next(r for r in rows if r["name"] == cache_name)
        assert mine["items"] == 7 and mine["daemon_pid"] is None and mine["clients"] >= 1
    assert ok("rm", "-n", cache_name) == f"removed cache {cache_name!r}\n"
    assert not os.path.exists(f"/dev/shm/shmcache.{cache_name}")
    fails("rm", "-n", cache_name, match=f"no cache named {cache_name!r}")


def test_every_reporting_command_offers_json():
    import argparse

    from shmcache.cli import build_parser

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [sub for sub in JSON_COMMANDS if "--json" not in subs[sub]._option_string_actions]
    assert not missing, f"no --json on {missing}"


def test_json_output_of_every_reporting_command_parses(cache, tmp_path, cache_name):
    n = cache.name
    cache.update({"user:1": "ann", "user:2": b"\xff\x00", "n": 41})
    cache.set("t", [1, 2], ttl=100)
    cache.get("user:1")
    cache.get("absent")

    def js(*args):
        return json.loads(ok(*args, "--json"))

    st = js("stats", "-n", n)
    assert st["items"] == 4 and st["hits"] == 1 and st["misses"] == 1
    assert js("get", "-n", n, "user:1") == "ann"
    assert js("get", "-n", n, "user:2") == {"bytes": "\\xff\x00"}
    assert js("get", "-n", n, "t") == [1, 2]
    t = js("ttl", "-n", n, "t")
    assert t["key"] == "t" and 90 < t["ttl"] <= 100 and t["expires_at"] > 0
    assert js("ttl", "-n", n, "n") == {"key": "n", "ttl": None, "expires_at": None}
    assert ok("ttl", "-n", n, "n") == "never\n" and 90 < float(ok("ttl", "-n", n, "t")) <= 100
    fails("ttl", "-n", n, "absent", match="key 'absent' not found")
    e = js("inspect", "-n", n, "user:1")
    assert (e["key"], e["type"], e["size"], e["ttl"]) == ("user:1", "str", 3, None)
    assert js("keys", "-n", n, "user:*") == ["user:1", "user:2"]
    c = js("check", "-n", n)
    assert c["sound"] is True and c["problems"] == [] and c["name"] == n
    mine = next(r for r in js("ls") if r["name"] == n)
    assert mine["items"] == 4 and mine["status"] == "ok"
    frame = json.loads(ok("top", "-n", n, "--interval", "0.05", "--iterations", "1", "--json"))
    assert frame["name"] == n and frame["items"] == 4
    assert js("delete", "-n", n, "user:1", "nothere") == {"deleted": 1}

    path = tmp_path / "j.snap"
    w = js("snapshot", "-n", n, str(path))
    assert w["path"] == str(path) and w["entries"] == 3 and w["bytes"] == path.stat().st_size
    assert w["daemon_pid"] is None
    v = js("check", "--snapshot", str(path))
    assert v["sound"] is True and v["error"] is None and v["entries"] == 3 and v["name"] == n
    other = fresh_name()
    try:
        r = js("restore", "-n", other, str(path), "--size", "8MiB")
        assert r["loaded"] == 3 and r["skipped_expired"] == 0 and r["path"] == str(path)
        created = fresh_name()
        try:
            g = js("create", "-n", created, "--size", "8MiB", "--stripes", "4")
            assert g["name"] == created and g["stripes"] == 4 and g["size"] <= 8 * 2**20
        finally:
            Cache.unlink(created)
    finally:
        Cache.unlink(other)


@pytest.mark.parametrize("kind", ["missing", "garbage", "fifo"])
def test_check_snapshot_json_reports_a_bad_file_as_json(kind, tmp_path):
    path = tmp_path / "bad.snap"
    if kind == "garbage":
        path.write_bytes(b"not a snapshot at all" * 10)
    elif kind == "fifo":
        os.mkfifo(path)
    r = run("check", "--snapshot", str(path), "--json", timeout=30)
    assert r.returncode == 1, (r.stdout, r.stderr)
    v = json.loads(r.stdout)
    assert v["sound"] is False and v["path"] == str(path)
    assert {"missing": "does not exist", "garbage": "not a shmcache snapshot",
            "fifo": "not a regular file"}[kind] in v["error"]


# ------------------------------------------------------------------ errors
def test_errors_are_one_line_and_exit_1(cache, tmp_path, cache_name):
    n = cache.name
    fails("get", "-n", "test-does-not-exist", "k", match="no cache named 'test-does-not-exist'")
    fails("stats", "-n", "bad/name", match="bad cache name")
    fails("get", "k", match="no cache name")
    fails("set", "-n", n, "k", "v", "--ttl", "-1", match="ttl must be")
    fails("set", "-n", n, "k", "abc", "--type", "int", match="not a valid int")
    fails("set", "-n", n, "k", "x" * 60_000, match="exceeds max_value_size")
    fails("set", "-n", n, "k" * 2000, "v", match="exceeds max_key_size")
    fails("frobnicate", match="invalid choice")
    fails("get", "-n", n, match="the following arguments are required")
    fails("set", "-n", n, "k", "v", "--ttl", "soon", match="invalid float value")
    fails("daemon", "-n", n, "--snapshot", str(tmp_path), match="is a directory")
    fails("daemon", "-n", n, "--expire-every", "-1", match="expire_every")
    fails("snapshot", "-n", n, str(tmp_path), match="directory")
    assert len(cache) == 0  # nothing above changed the cache


@pytest.mark.parametrize("kind", ["missing", "empty", "directory", "garbage", "truncated"])
def test_restore_refuses_bad_files_and_leaves_the_cache(kind, cache, tmp_path):
    cache["keep"] = "me"
    path = tmp_path / "x.snap"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"#!/bin/sh\necho not a snapshot\n")
    elif kind == "truncated":
        write_snapshot(cache, path)
        path.write_bytes(path.read_bytes()[:-30])
    why = {"missing": "does not exist", "empty": "empty", "directory": "directory",
           "garbage": "not a shmcache snapshot", "truncated": "truncated"}[kind]
    fails("restore", "-n", cache.name, str(path), match=why)
    fails("check", "--snapshot", str(path), match=why)
    assert dict(cache.items()) == {"keep": "me"}


def test_debug_shows_the_traceback():
    r = run("--debug", "get", "-n", "test-does-not-exist", "k")
    assert r.returncode == 1 and "Traceback" in r.stderr and "CacheNotFound" in r.stderr


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "shmcache")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("shmcache ")


def test_demo_runs_end_to_end(tmp_path):
    name = fresh_name("demo")
    try:
        r = run("demo", "--demo-name", name, "--dir", str(tmp_path / "d"), "--seconds", "1.5",
                "--workers", "2", "--keys", "5000", "--size", "8MiB", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "warm" in r.stdout and "500 of 500 sampled values identical" in r.stdout
        assert "0 corrupt" in r.stdout and "demo finished" in r.stdout
        assert (tmp_path / "d" / "demo.snap").exists()
        assert not os.path.exists(f"/dev/shm/shmcache.{name}")
    finally:
        Cache.unlink(name)
