"""A client of another language (Node.js, ioredis from npm) shares the cache
with Python through ``shmcache serve``: each reads what the other wrote, TTLs
included. ``make test`` installs tests/node/node_modules with ``npm ci``."""

import json
import os
import shutil
import subprocess

import pytest

pytest.importorskip("hiredis", reason="shmcache serve needs hiredis: pip install 'shmcache[server]'")

from names import fresh_name  # noqa: E402
from resp_server import ServeProcess  # noqa: E402
from shmcache import Cache  # noqa: E402

NODE_DIR = os.path.join(os.path.dirname(__file__), "node")
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None or not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "ioredis")),
                    reason="node or tests/node/node_modules missing (make test runs npm ci there)")
def test_node_ioredis_and_python_share_keys_and_ttls():
    name = fresh_name("node")
    srv = ServeProcess(name)
    cache = Cache(name, create=False)
    try:
        cache["py:str"] = "héllo from python"
        cache["py:int"] = 41
        cache["py:float"] = 0.25
        cache.set("py:ttl", b"x", ttl=90)
        cache["py:pickled"] = {"not": "for node"}
        run = subprocess.run([NODE, os.path.join(NODE_DIR, "interop.js"), str(srv.port)],
                             capture_output=True, timeout=60)
        assert run.returncode == 0, run.stderr.decode()
        seen = json.loads(run.stdout)
        assert seen["str"] == "héllo from python"
        assert seen["int"] == "41" and seen["incr"] == 42
        assert seen["float"] == "0.25"
        assert 85 <= seen["ttl"] <= 90
        assert seen["pickled"].startswith("WRONGTYPE")
        assert seen["type"] == "python"
        assert seen["tx"] == [1, 2, "2"]
        assert seen["keys"] == 100
        # and Python reads what Node wrote
        assert cache["py:int"] == 42
        assert cache["node:str"] == "from node ✓".encode()
        assert 110 < cache.ttl("node:str") <= 120
        assert cache["node:bin"] == bytes([0, 1, 2, 255])
        assert cache["node:counter"] == 7 and cache["node:tx"] == 2
        assert cache["node:p99"] == b"99"
    finally:
        cache.close()
        assert srv.stop() == 0
        Cache.unlink(name)
