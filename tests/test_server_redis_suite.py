"""Redis' own Tcl tests (unit/type/string, unit/type/incr, unit/expire,
unit/keyspace, unit/protocol, unit/multi, unit/scan, unit/quit) against ``shmcache serve`` in their
external-server mode (about a minute, plus a 3 MB download the first time).

The suite comes from Debian's ``redis`` source package, fetched with
``apt-get source`` through a private apt configuration (nothing of the
system's apt setup changes) into ~/.cache/shmcache/redis-tests, or from
$SHMCACHE_REDIS_TESTS (a directory holding ``runtest`` and ``tests/``).
Tests needing what shmcache deliberately lacks (lists, sets, hashes, streams,
DEBUG, CONFIG SET, replication) fail or are skipped by tag; the test asserts
that no run crashes and that the passing count does not fall below what the
README records.
"""

import glob
import os
import re
import shutil
import subprocess
import tarfile

import pytest

from names import fresh_name
from resp_server import ServeProcess
from shmcache import Cache

#: passing tests per unit, as measured for the README (a floor: more is fine)
FLOORS = {"unit/type/string": 70, "unit/type/incr": 21, "unit/expire": 57, "unit/keyspace": 33, "unit/protocol": 15,
          "unit/multi": 21, "unit/scan": 5, "unit/quit": 3}
SKIP_TAGS = ["needs:debug", "needs:repl", "needs:config-maxmemory", "needs:save", "needs:reset"]
_RESULT = re.compile(r"^\[(ok|err|exception|ignore|skip)\]", re.M)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fetch_suite() -> str:
    """A directory with Redis' ``runtest`` and ``tests/`` (see module doc)."""
    env = os.environ.get("SHMCACHE_REDIS_TESTS")
    if env:
        return env
    root = os.path.expanduser("~/.cache/shmcache/redis-tests")
    done = glob.glob(os.path.join(root, "redis-*", "runtest"))
    if done:
        return os.path.dirname(done[0])
    if not shutil.which("apt-get"):
        pytest.skip("no apt-get to fetch Redis' test suite (set SHMCACHE_REDIS_TESTS)")
    os.makedirs(os.path.join(root, "lists", "partial"), exist_ok=True)
    os.makedirs(os.path.join(root, "cache", "archives", "partial"), exist_ok=True)
    src = os.path.join(root, "sources.list")
    with open(src, "w") as f:
        for suite in ("bookworm", "bookworm-updates"):
            f.write(f"deb-src http://deb.debian.org/debian {suite} main\n")
        f.write("deb-src http://deb.debian.org/debian-security bookworm-security main\n")
    opts = ["-o", f"Dir::Etc::SourceList={src}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={root}/lists", "-o", f"Dir::Cache={root}/cache", "-q"]
    subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True, timeout=600)
    subprocess.run(["apt-get", *opts, "source", "--download-only", "redis"], check=True, capture_output=True,
                   cwd=root, timeout=600)
    orig = glob.glob(os.path.join(root, "redis_*.orig.tar.gz"))[0]
    with tarfile.open(orig) as t:
        members = [m for m in t.getmembers() if re.match(r"redis-[^/]+/(tests/|runtest$)", m.name)]
        t.extractall(root, members=members, filter="tar")
    return os.path.dirname(glob.glob(os.path.join(root, "redis-*", "runtest"))[0])


def run_unit(suite: str, port: int, unit: str) -> dict:
    cmd = ["./runtest", "--host", "127.0.0.1", "--port", str(port), "--singledb", "--ignore-encoding",
           "--ignore-digest", "--durable", "--clients", "1", "--single", unit]
    for tag in SKIP_TAGS:
        cmd += ["--tags", "-" + tag]
    out = subprocess.run(cmd, cwd=suite, capture_output=True, text=True, timeout=900).stdout
    text = _ANSI.sub("", out)
    counts = {k: 0 for k in ("ok", "err", "exception", "ignore", "skip")}
    for m in _RESULT.finditer(text):
        counts[m.group(1)] += 1
    counts["log"] = text
    return counts


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("unit", sorted(FLOORS))
def test_redis_tcl_suite_unit(unit):
    if not shutil.which("tclsh"):
        pytest.skip("tclsh not installed (apt-get install tcl)")
    suite = fetch_suite()
    name = fresh_name("tcl")
    # values of up to 8 MiB: the suite's "very big payload" test stores 4 MB. An
    # entry lives in one arena segment, so the segments are 8 MiB and each
    # stripe needs at least 4 of them: 2 stripes of 128 MiB hold 7 each.
    Cache(name, size="128MiB", stripes=2, max_value_size=8 << 20).close()
    try:
        srv = ServeProcess(name)  # a server that fails to start must not leak the cache
        try:
            counts = run_unit(suite, srv.port, unit)
        finally:
            rc = srv.stop()
    finally:
        Cache.unlink(name)
    print(f"{unit}: {counts['ok']} ok, {counts['err']} err, {counts['ignore'] + counts['skip']} skipped")
    assert counts["exception"] == 0, counts["log"][-3000:]
    assert counts["ok"] >= FLOORS[unit], counts["log"][-3000:]
    assert rc == 0 and "Traceback" not in srv.stderr(), srv.stderr()[-3000:]
