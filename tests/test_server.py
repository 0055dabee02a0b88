"""``shmcache serve``: real Redis clients (redis-cli, redis-py RESP2/RESP3)
against a real server process, sharing the keyspace with Python's Cache."""

import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import time

import numpy as np
import pytest

redis = pytest.importorskip("redis", reason="make test installs redis-py (the 'server' extra's test deps)")
pytest.importorskip("hiredis", reason="shmcache serve needs hiredis: pip install 'shmcache[server]'")

from names import fresh_name  # noqa: E402
from resp_server import LOOPS, ServeProcess, worker_pids  # noqa: E402
from shmcache import Cache, admin  # noqa: E402
from shmcache.server import ServerError, check_bind, read_password  # noqa: E402

REDIS_CLI = shutil.which("redis-cli")


def client(port=None, **kw):
    """redis-py without its retries (which wait seconds on an expected error)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kw.setdefault("socket_timeout", 10)
    return redis.Redis(port=port, retry=Retry(NoBackoff(), 0), **kw)


@pytest.fixture(scope="module", params=LOOPS)
def served(request):
    """One server per loop for the module: (ServeProcess, Cache attached to
    the same segment). Every test on it runs against the workers' epoll loop
    and against ``Server.start()`` in asyncio: the two drive the same
    Connection code through different transports."""
    name = fresh_name("resp")
    srv = ServeProcess(name, loop=request.param)
    cache = Cache(name, create=False)
    try:
        yield srv, cache
    finally:
        cache.close()
        rc = srv.stop()
        Cache.unlink(name)
        assert rc == 0, srv.stderr()


@pytest.fixture
def server(served):
    srv, cache = served
    cache.clear()
    return srv, cache


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def r(server, request):
    srv, cache = server
    c = client(port=srv.port, protocol=request.param)
    yield c
    c.close()


def raw(port: int, data: bytes | list, wait: float = 0.3) -> bytes:
    """Send bytes (a list: each chunk 50 ms apart, so each is its own read)
    on a fresh connection; everything the server answers until it closes or goes quiet."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        try:
            for chunk in data if isinstance(data, list) else [data]:
                s.sendall(chunk)
                time.sleep(0.05 if isinstance(data, list) else 0)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on an error: read what it said
        out = b""
        s.settimeout(wait)
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def frame(*args) -> bytes:
    """One RESP request."""
    args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Conversation:
    """A raw connection that sends one command and reads its one reply
    (parsed by hiredis: errors come back as ``hiredis.ReplyError`` values),
    so a test sees exactly what the server answered, RESP2 or RESP3,
    whatever state (MULTI, RESET, QUIT) the connection is in."""

    def __init__(self, port: int | None = None, unix: str | None = None):
        import hiredis

        self.s = socket.socket(socket.AF_UNIX) if unix else socket.socket()
        self.s.settimeout(10)
        self.s.connect(unix or ("127.0.0.1", port))
        self.reader = hiredis.Reader()

    def __call__(self, *args):
        self.s.sendall(frame(*args))
        return self.reply()

    def reply(self):
        while True:
            r = self.reader.gets()
            if r is not False:
                return r
            data = self.s.recv(65536)
            if not data:
                raise ConnectionError("closed by the server")
            self.reader.feed(data)

    def close(self) -> None:
        self.s.close()


def is_error(reply, text: str) -> bool:
    import hiredis

    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith(text)


def closed_by_server(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        while s.recv(65536):
            pass
        return True
    except (ConnectionResetError, socket.timeout):
        return False


# ------------------------------------------------------------ type mapping
def test_python_values_read_over_resp(r, server):
    _, cache = server
    cache["b"] = b"\x00bin\xff"
    cache["s"] = "héllo"
    cache["i"] = -42
    cache["big"] = 2**70
    cache["f"] = 2.5
    cache["f3"] = 3.0
    assert r.get("b") == b"\x00bin\xff"
    assert r.get("s") == "héllo".encode()
    assert r.get("i") == b"-42"
    assert r.get("big") == str(2**70).encode()
    assert r.get("f") == b"2.5"
    assert r.get("f3") == b"3"
    assert r.strlen("s") == len("héllo".encode())
    assert r.type("s") in (b"string", "string") and r.type("i") in (b"string", "string")


def test_pickled_and_numpy_values_are_wrongtype_never_raw_pickle(r, server):
    _, cache = server
    cache["p"] = {"a": 1}
    cache["arr"] = np.arange(4)
    for k in ("p", "arr"):
        with pytest.raises(redis.ResponseError, match="^WRONGTYPE"):
            r.get(k)
        with pytest.raises(redis.ResponseError, match="^WRONGTYPE"):
            r.append(k, "x")
        with pytest.raises(redis.ResponseError, match="^WRONGTYPE"):
            r.incr(k)
    assert r.mget("p", "arr") == [None, None]
    assert r.type("p") in (b"python", "python")
    assert r.type("arr") in (b"ndarray", "ndarray")
    assert r.exists("p", "arr") == 2
    assert cache["p"] == {"a": 1}  # untouched by the refused writes


def test_resp_writes_read_in_python(r, server):
    _, cache = server
    r.set("k", "v")
    assert cache["k"] == b"v"
    r.set(b"\xff\x00", b"binary key")  # not UTF-8: a Python bytes key
    assert cache[b"\xff\x00"] == b"binary key"
    assert r.get(b"\xff\x00") == b"binary key"
    r.incr("n")
    r.incrby("n", 41)
    assert cache["n"] == 42
    assert type(cache["n"]) is int


def test_incr_and_cache_incr_agree_on_one_key(r, server):
    _, cache = server
    r.set("c", "10")  # decimal text from RESP: INCR converts it to an int
    assert r.incr("c") == 11
    assert cache.incr("c", 5) == 16
    assert r.decrby("c", 6) == 10
    assert r.get("c") == b"10"
    cache.set("c2", 7)
    assert r.incr("c2") == 8


def test_incr_concurrently_from_python_processes_and_resp(r, server):
    import multiprocessing as mp

    _, cache = server
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(cache.name, 500)) for _ in range(2)]
    for p in procs:
        p.start()
    for _ in range(500):
        r.incr("ctr")
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert int(r.get("ctr")) == 1500 == cache["ctr"]


def _bump(name, n):
    c = Cache(name, create=False)
    for _ in range(n):
        c.incr("ctr")
    c.close()


def test_ttls_are_shared_both_ways(r, server):
    _, cache = server
    cache.set("py", b"x", ttl=100)
    assert 98 <= r.ttl("py") <= 100
    assert 98_000 <= r.pttl("py") <= 100_000
    r.set("rs", "y", ex=50)
    assert 48 < cache.ttl("rs") <= 50
    r.persist("rs")
    assert cache.ttl("rs") is None
    assert r.ttl("rs") == -1
    assert r.ttl("missing") == -2
    r.set("gone", "z", px=1)
    time.sleep(0.05)
    assert r.get("gone") is None
    assert "gone" not in cache


# ----------------------------------------------------------------- strings
def test_set_options(r):
    assert r.set("a", "1", nx=True)
    assert r.set("a", "2", nx=True) is None
    assert r.set("a", "3", xx=True)
    assert r.set("nope", "3", xx=True) is None
    assert r.get("nope") is None
    assert r.set("a", "4", get=True) == b"3"
    r.set("a", "5", ex=100)
    r.set("a", "6", keepttl=True)
    assert 98 <= r.ttl("a") <= 100
    r.set("a", "7")
    assert r.ttl("a") == -1
    r.set("a", "8", exat=int(time.time()) + 100)
    assert 98 <= r.ttl("a") <= 100
    r.set("a", "9", pxat=int(time.time() * 1000) + 100_000)
    assert 98 <= r.ttl("a") <= 100
    with pytest.raises(redis.ResponseError, match="invalid expire time in 'set' command"):
        r.set("a", "x", ex=0)
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("SET", "a", "x", "NX", "XX")
    assert r.get("a") == b"9"


def test_string_commands(r):
    assert r.setnx("s", "x") and not r.setnx("s", "y")
    r.setex("e", 100, "v")
    assert 98 <= r.ttl("e") <= 100
    r.psetex("pe", 100_000, "v")
    assert 98 <= r.ttl("pe") <= 100
    assert r.getset("s", "z") == b"x"
    assert r.getdel("s") == b"z" and r.get("s") is None
    r.set("g", "v")
    assert r.getex("g", ex=100) == b"v" and 98 <= r.ttl("g") <= 100
    assert r.getex("g", persist=True) == b"v" and r.ttl("g") == -1
    r.mset({"m1": "a", "m2": "b"})
    assert r.mget("m1", "m2", "m3") == [b"a", b"b", None]
    assert not r.msetnx({"m1": "x", "m4": "y"})
    assert r.get("m4") is None
    assert r.msetnx({"m4": "x", "m5": "y"})
    assert r.append("ap", "Hello") == 5 and r.append("ap", " World") == 11
    assert r.getrange("ap", 0, 4) == b"Hello"
    assert r.getrange("ap", -5, -1) == b"World"
    assert r.getrange("ap", 5, 1) == b""
    assert r.setrange("ap", 6, "Redis") == 11 and r.get("ap") == b"Hello Redis"
    assert r.setrange("pad", 3, "x") == 4 and r.get("pad") == b"\x00\x00\x00x"
    assert r.strlen("ap") == 11 and r.strlen("missing") == 0


def test_mset_with_one_pair_over_the_limits_stores_nothing(r, server):
    _, cache = server
    st = cache.stats()
    with pytest.raises(redis.ResponseError, match="max_key_size"):
        r.mset({"ok1": "a", "k" * (st["max_key_size"] + 1): "b"})
    with pytest.raises(redis.ResponseError, match="max_value_size"):
        r.mset({"ok2": "a", "big": b"x" * (st["max_value_size"] + 1)})
    with pytest.raises(redis.ResponseError, match="max_key_size"):  # a non-UTF-8 key takes one byte more
        r.mset({"ok3": "a", b"\xff" * st["max_key_size"]: "b"})
    assert len(cache) == 0
    r.mset({b"\xff" * (st["max_key_size"] - 1): "c", "m": 1, "e": b""})
    assert cache[b"\xff" * (st["max_key_size"] - 1)] == b"c" and cache["m"] == b"1" and cache["e"] == b""
    assert r.mget(b"\xff" * (st["max_key_size"] - 1), "m", "nope", "e") == [b"c", b"1", None, b""]


def test_incr_family_errors(r):
    r.set("t", "abc")
    with pytest.raises(redis.ResponseError, match="value is not an integer or out of range"):
        r.incr("t")
    r.set("t", " 1")
    with pytest.raises(redis.ResponseError, match="value is not an integer or out of range"):
        r.incr("t")
    r.set("t", str(2**63 - 1))
    with pytest.raises(redis.ResponseError, match="increment or decrement would overflow"):
        r.incr("t")
    assert r.get("t") == str(2**63 - 1).encode()
    r.set("t", 2**63 - 2)
    r.incr("t")  # now the stored form is an int
    with pytest.raises(redis.ResponseError, match="increment or decrement would overflow"):
        r.incr("t")
    assert r.get("t") == str(2**63 - 1).encode()
    assert r.incrbyfloat("fl", 10.5) == 10.5
    assert r.incrbyfloat("fl", 0.1) == pytest.approx(10.6)
    assert r.get("fl") == b"10.6"
    r.set("fl", "1.5")
    assert r.incrbyfloat("fl", 1.5) == 3.0 and r.get("fl") == b"3"
    with pytest.raises(redis.ResponseError, match="value is not a valid float"):
        r.incrbyfloat("fl", "x")


# ---------------------------------------------------------------- keyspace
def test_keyspace_commands(r, server):
    _, cache = server
    r.mset({"k1": "a", "k2": "b", "other": "c"})
    assert sorted(r.keys("k*")) == [b"k1", b"k2"]
    assert sorted(r.keys("k[12]")) == [b"k1", b"k2"]
    assert r.keys("k?x") == []
    assert r.exists("k1", "k1", "nope") == 2
    assert r.dbsize() == 3 == len(cache)
    assert r.delete("k1", "nope") == 1
    assert r.unlink("k2") == 1
    assert r.touch("other", "nope") == 1
    r.rename("other", "moved")
    assert r.get("moved") == b"c" and r.get("other") is None
    with pytest.raises(redis.ResponseError, match="no such key"):
        r.rename("other", "x")
    r.set("taken", "t")
    assert not r.renamenx("moved", "taken")
    assert r.copy("moved", "copied") and r.get("copied") == b"c"
    assert not r.copy("moved", "taken")
    assert r.copy("moved", "taken", replace=True) and r.get("taken") == b"c"
    assert r.randomkey() in {b"moved", b"copied", b"taken"}
    r.flushdb()
    assert r.dbsize() == 0 and r.randomkey() is None
    cache["from-python"] = 1
    assert r.flushall() and len(cache) == 0 and r.dbsize() == 0


def test_expire_options(r):
    r.set("k", "v")
    assert r.expire("k", 100, xx=True) is False
    assert r.expire("k", 100, nx=True) is True
    assert r.expire("k", 50, nx=True) is False
    assert r.expire("k", 50, gt=True) is False
    assert r.expire("k", 200, gt=True) is True
    assert r.expire("k", 300, lt=True) is False
    assert r.expire("k", 150, lt=True) is True
    assert 148 <= r.ttl("k") <= 150
    at = int(time.time()) + 500
    assert r.expireat("k", at)
    assert r.expiretime("k") == at
    assert abs(r.pexpiretime("k") - at * 1000) < 2
    assert r.pexpire("k", 100_000) and 98 <= r.ttl("k") <= 100
    assert r.expire("k", -1) and r.get("k") is None  # a past deadline deletes
    assert r.expire("nokey", 10) is False


def test_scan_returns_every_key_present_throughout_despite_concurrent_writes(r, server):
    srv, cache = server
    stable = {f"stable:{i}" for i in range(2000)}
    cache.set_many({k: b"x" for k in stable}, ttl=None)
    stop = threading.Event()

    def churn():
        c = client(port=srv.port)
        i = 0
        while not stop.is_set():
            c.set(f"churn:{i}", "y")
            if i % 3 == 0:
                c.delete(f"churn:{i // 2}")
            i += 1
        c.close()

    t = threading.Thread(target=churn)
    t.start()
    try:
        seen = set()
        cursor = 0
        while True:
            cursor, keys = r.scan(cursor, match="stable:*", count=50)
            seen.update(k.decode() for k in keys)
            if cursor == 0:
                break
    finally:
        stop.set()
        t.join(30)
    assert seen == stable
    assert set(k.decode() for k in r.scan_iter(_type="string", match="stable:1*")) == {k for k in stable if k.startswith("stable:1")}


# ------------------------------------------------------------- connection
def test_connection_commands(r, server):
    assert r.ping()
    assert r.echo("hi") == b"hi"
    assert r.client_setname("app1") and r.client_getname() in (b"app1", "app1")
    cid = r.client_id()
    assert isinstance(cid, int)
    assert any(c["name"] == "app1" for c in r.client_list())
    assert r.execute_command("SELECT", 0)
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        r.execute_command("SELECT", 1)
    with pytest.raises(redis.ResponseError) as e:
        r.execute_command("NOSUCH", "a", "b")
    assert str(e.value) == "unknown command 'NOSUCH', with args beginning with: 'a' 'b' "
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'get' command"):
        r.execute_command("GET")
    info = r.info()
    assert info["redis_version"] and "connected_clients" in info
    assert "keyspace_hits" in r.info("stats")
    assert r.config_get("maxmemory")["maxmemory"]
    assert r.command_count() > 50
    t = r.time()
    assert abs(t[0] - time.time()) < 5
    assert r.execute_command("DEBUG", "SLEEP", "0")
    assert r.execute_command("OBJECT", "ENCODING", "nope") is None


def test_client_kill_own_connections(server):
    srv, _ = server
    a = client(port=srv.port)
    b = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    b.sendall(b"CLIENT ID\r\n")
    bid = int(b.recv(100)[1:-2])
    assert a.client_kill_filter(_id=bid) == 1
    assert closed_by_server(b)
    b.close()
    a.close()


def test_multi_exec_single_key_is_atomic_and_watch_aborts(r, server):
    _, cache = server
    r.set("acct", "100")
    with r.pipeline(transaction=True) as p:
        p.incrby("acct", -30).get("acct").expire("acct", 100).ttl("acct")
        assert p.execute() == [70, b"70", True, 100]
    # WATCH + a change from Python before EXEC: the transaction is aborted
    with r.pipeline(transaction=True) as p:
        p.watch("acct")
        p.multi()
        p.set("acct", "0")
        cache.set("acct", b"changed")
        with pytest.raises(redis.WatchError):
            p.execute()
    assert cache["acct"] == b"changed"
    # an error in one command does not undo the others, as in Redis
    r.set("w", "abc")
    with r.pipeline(transaction=True) as p:
        p.append("w", "d").incr("w").get("w")
        res = p.execute(raise_on_error=False)
    assert res[0] == 4 and isinstance(res[1], redis.ResponseError) and res[2] == b"abcd"


def test_multi_exec_many_keys_and_errors(r):
    with r.pipeline(transaction=True) as p:
        p.set("x", "1").set("y", "2").mget("x", "y")
        assert p.execute() == [True, True, [b"1", b"2"]]
    c = r.connection_pool.get_connection("MULTI")
    try:
        c.send_command("MULTI")
        assert c.read_response() in (b"OK", "OK")
        c.send_command("NOSUCH")
        with pytest.raises(redis.ResponseError):
            c.read_response()
        c.send_command("EXEC")
        with pytest.raises(redis.exceptions.ExecAbortError):
            c.read_response()
        c.send_command("EXEC")
        with pytest.raises(redis.ResponseError, match="EXEC without MULTI"):
            c.read_response()
    finally:
        r.connection_pool.release(c)


def test_discard_and_unwatch(server):
    """DISCARD drops the queue and what was watched; UNWATCH forgets the
    watched keys, so a later change of them no longer aborts EXEC."""
    _, cache = server
    c = Conversation(server[0].port)
    try:
        assert c("SET", "d", "1") == b"OK"
        assert c("MULTI") == b"OK" and c("SET", "d", "2") == b"QUEUED" and c("INCR", "d") == b"QUEUED"
        assert c("DISCARD") == b"OK"
        assert c("GET", "d") == b"1" and cache["d"] == b"1"
        assert is_error(c("DISCARD"), "ERR DISCARD without MULTI")
        for forget in (("UNWATCH",), ("MULTI",)):  # MULTI then DISCARD below
            assert c("WATCH", "d") == b"OK"
            assert c(*forget) == b"OK"
            if forget == ("MULTI",):
                assert c("DISCARD") == b"OK"
            cache["d"] = b"changed by python"
            assert c("MULTI") == b"OK" and c("APPEND", "d", "!") == b"QUEUED"
            assert c("EXEC") == [len("changed by python!")]
        assert cache["d"] == b"changed by python!"
        assert c("WATCH", "d") == b"OK"  # and still watching aborts
        cache["d"] = b"again"
        assert c("MULTI") == b"OK" and c("SET", "d", "lost") == b"QUEUED" and c("EXEC") is None
        assert cache["d"] == b"again"
    finally:
        c.close()


def test_reset_leaves_multi_watch_name_and_resp3(server):
    _, cache = server
    c = Conversation(server[0].port)
    try:
        assert c("HELLO", "3")[b"proto"] == 3
        assert c("CLIENT", "SETNAME", "before-reset") == b"OK"
        assert c("WATCH", "rk") == b"OK"
        assert c("MULTI") == b"OK" and c("SET", "rk", "queued") == b"QUEUED"
        assert c("RESET") == b"RESET"
        assert "rk" not in cache  # the queue was dropped, not run
        cache["rk"] = b"changed"  # no longer watched: the next EXEC runs
        assert c("MULTI") == b"OK" and c("SET", "rk", "mine") == b"QUEUED" and c("EXEC") == [b"OK"]
        assert cache["rk"] == b"mine"
        assert c("CLIENT", "GETNAME") is None
        hello = c("HELLO")
        assert isinstance(hello, list) and hello[hello.index(b"proto") + 1] == 2  # RESP2 again: a flat array
    finally:
        c.close()


def test_quit_replies_ok_then_closes(server):
    c = Conversation(server[0].port)
    try:
        assert c("QUIT") == b"OK"
        assert closed_by_server(c.s)
    finally:
        c.close()


def test_client_info_and_setinfo(r, server):
    """redis-py names itself with CLIENT SETINFO on connect; a value with a
    space or newline is refused (it would forge fields or whole lines of
    CLIENT LIST), for LIB-VER as for LIB-NAME, as Redis 7.2 does."""
    info = r.client_info()
    assert info["lib-name"] == "redis-py" and info["lib-ver"] == redis.__version__
    assert int(info["id"]) == r.client_id() and int(info["resp"]) == r.get_connection_kwargs()["protocol"]
    c = Conversation(server[0].port)
    try:
        assert c("CLIENT", "SETNAME", "raw") == b"OK"
        assert c("CLIENT", "SETINFO", "lib-name", "mylib") == b"OK"
        assert c("CLIENT", "SETINFO", "LIB-VER", "1.2.3") == b"OK"
        line = c("CLIENT", "INFO")
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        fields = dict(kv.split(b"=", 1) for kv in line.split())
        assert fields[b"name"] == b"raw" and fields[b"lib-name"] == b"mylib" and fields[b"lib-ver"] == b"1.2.3"
        assert int(fields[b"id"]) == c("CLIENT", "ID")
        for attr, bad in (("LIB-VER", "1 name=forged"), ("LIB-VER", "1\nid=1 name=fake"), ("lib-name", "a b")):
            assert is_error(c("CLIENT", "SETINFO", attr, bad), f"ERR {attr} cannot contain spaces, newlines")
        assert is_error(c("CLIENT", "SETINFO", "nope", "x"), "ERR Unrecognized option 'nope'")
        listing = r.execute_command("CLIENT", "LIST")
        listing = listing.decode() if isinstance(listing, bytes) else listing
        mine = [ln for ln in listing.splitlines() if " name=raw " in ln]
        assert len(mine) == 1 and "lib-ver=1.2.3 " in mine[0] + " " and "forged" not in listing
    finally:
        c.close()


def test_command_info(server):
    c = Conversation(server[0].port)
    try:
        get, missing, mset = c("COMMAND", "INFO", "get", "nosuch", "MSET")
        assert get[:2] == [b"get", 2] and get[3:6] == [1, 1, 1] and b"readonly" in get[2]
        assert missing is None
        assert mset[:2] == [b"mset", -3] and mset[3:6] == [1, -1, 2] and b"write" in mset[2]
        everything = c("COMMAND")
        assert len(everything) == c("COMMAND", "COUNT") and {e[0] for e in everything} >= {b"get", b"exec", b"scan"}
    finally:
        c.close()


def test_single_key_transaction_is_atomic_against_concurrent_writers(r, server):
    """MULTI/EXEC whose commands all name one key runs inside one
    update_raw: two Python processes incrementing the key as fast as they
    can never get between its commands (a transaction run command by
    command would see their increments between its two INCRs)."""
    import multiprocessing as mp

    _, cache = server
    cache["tx"] = 0
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    procs = [ctx.Process(target=_bump_until, args=(cache.name, stop)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        before = cache["tx"]
        deadline = time.monotonic() + 20
        while cache["tx"] < before + 1000 and time.monotonic() < deadline:  # the writers are running
            time.sleep(0.01)
        for _ in range(300):
            with r.pipeline(transaction=True) as p:
                first, second, text, ttl = p.incr("tx").incr("tx").get("tx").ttl("tx").execute()
            assert second == first + 1 and int(text) == second and ttl == -1
    finally:
        stop.set()
        for p in procs:
            p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert cache["tx"] > before + 1000


def _bump_until(name, stop):
    c = Cache(name, create=False)
    while not stop.is_set():
        for _ in range(100):
            c.incr("tx")
    c.close()


def test_pipelining_many_commands_one_round_trip(r):
    with r.pipeline(transaction=False) as p:
        for i in range(1000):
            p.set(f"p{i}", i)
        for i in range(1000):
            p.get(f"p{i}")
        res = p.execute()
    assert res[1000:] == [str(i).encode() for i in range(1000)]


# --------------------------------------------------------------- protocol
def test_inline_commands(server):
    srv, _ = server
    out = raw(srv.port, b'PING\r\nSET a "hello world"\r\nGET a\r\nset b \'x y\'\nget b\n')
    assert out == b"+PONG\r\n+OK\r\n$11\r\nhello world\r\n+OK\r\n$3\r\nx y\r\n"


@pytest.mark.parametrize("bad, message", [
    (b"*1\r\nfoo\r\n", b"-ERR Protocol error: expected '$', got 'f'\r\n"),
    (b"*3000000000\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
    (b"*3\r\n$3\r\nSET\r\n$2000000000\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b"*1\r\n$abc\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b'SET a "unbalanced\r\n', b"-ERR Protocol error: unbalanced quotes in request\r\n"),
    (b"x" * 70000, b"-ERR Protocol error: too big inline request\r\n"),
])
def test_malformed_input_gets_protocol_error_and_close(server, bad, message):
    srv, cache = server
    cache["keep"] = b"me"
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert s.recv(100) == b"+PONG\r\n"
        s.sendall(bad)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    assert out == message
    assert cache["keep"] == b"me" and len(cache) == 1
    assert client(port=srv.port).ping()


def test_negative_multibulk_is_ignored(server):
    srv, _ = server
    assert raw(srv.port, b"*-10\r\n*1\r\n$4\r\nPING\r\n") == b"+PONG\r\n"


@pytest.mark.parametrize("loop", LOOPS)
def test_query_buffer_limit(loop):
    name = fresh_name("resp")
    srv = ServeProcess(name, "--max-query-buffer", "100000", "--max-bulk-len", "1000000", loop=loop)
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$900000\r\n")
        try:
            for _ in range(20):
                s.sendall(b"x" * 10000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = s.recv(1000)
        assert out.startswith(b"-ERR Protocol error: query buffer of ")
        assert b"max-query-buffer=100000" in out
        s.close()
        assert client(port=srv.port).ping()
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("set_by", ["option", "config-set"])
def test_max_clients(set_by, loop):
    name = fresh_name("resp")
    srv = ServeProcess(name, *(["--max-clients", "2"] if set_by == "option" else []), loop=loop)
    try:
        a = client(port=srv.port)
        if set_by == "config-set":
            assert a.config_set("maxclients", 2)
        b = client(port=srv.port)
        a.ping(), b.ping()
        with pytest.raises(redis.ConnectionError, match="max number of clients reached"):
            client(port=srv.port).ping()
        a.close()
        b.close()
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)


# ----------------------------------------------------------- safe defaults
@pytest.mark.parametrize("loop", LOOPS)
def test_auth_and_unix_socket_mode(tmp_path, loop):
    name = fresh_name("resp")
    pwfile = tmp_path / "pw"
    pwfile.write_text("s3cret\n")
    pwfile.chmod(0o600)
    sock = str(tmp_path / "s.sock")
    srv = ServeProcess(name, "--requirepass-file", str(pwfile), unix=sock, loop=loop)
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        noauth = client(port=srv.port, protocol=2)
        with pytest.raises(redis.AuthenticationError):
            noauth.get("x")
        with pytest.raises(redis.AuthenticationError):
            client(port=srv.port, password="wrong").ping()
        for proto in (2, 3):
            ok = client(unix_socket_path=sock, password="s3cret", protocol=proto)
            assert ok.set("x", "1") and ok.get("x") == b"1"
            ok.close()
        assert raw(srv.port, b"GET x\r\n") == b"-NOAUTH Authentication required.\r\n"
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)
    assert not os.path.exists(sock)


def test_refuses_non_loopback_bind_unless_explicit(tmp_path):
    with pytest.raises(ServerError, match="non-loopback"):
        check_bind("0.0.0.0", explicit=False)
    check_bind("0.0.0.0", explicit=True)
    check_bind("::1", explicit=False)
    loose = tmp_path / "pw"
    loose.write_text("x")
    loose.chmod(0o644)
    with pytest.raises(ServerError, match="chmod 600"):
        read_password(None, str(loose))


def test_serve_and_server_refuse_a_non_loopback_address_before_creating_anything():
    """The Python entry points apply protected mode too (the CLI can only
    reach a non-loopback address through --bind, which is explicit)."""
    from shmcache.server import Server, serve

    name = fresh_name("resp")
    with pytest.raises(ServerError, match="non-loopback"):
        serve(name, host="0.0.0.0", port=0)
    assert not os.path.exists(f"/dev/shm/shmcache.{name}")  # refused before the cache was created
    with Cache(name, size="4MiB") as cache:
        try:
            with pytest.raises(ServerError, match="non-loopback"):
                Server(cache, host="10.1.2.3", port=0)
            Server(cache, host="::1", port=0)  # loopback: fine without bind_explicit
        finally:
            Cache.unlink(name)


def test_serve_from_python_calls_ready_with_the_port_and_stops_on_sigterm():
    """``shmcache.server.serve(...)`` as a program embedding it calls it:
    ``ready(port)`` once listening (the real port for ``port=0``), serving
    until SIGTERM, then 0."""
    import multiprocessing as mp

    name = fresh_name("resp")
    ctx = mp.get_context("fork")
    got = ctx.Queue()
    p = ctx.Process(target=_serve_in_child, args=(name, got))
    p.start()
    try:
        port = got.get(timeout=30)
        c = client(port=port)
        assert c.set("from", "python serve()") and c.info("server")["process_id"] == p.pid
        c.close()
        os.kill(p.pid, 15)
        p.join(30)
        assert p.exitcode == 0 and got.get(timeout=5) == ("returned", 0)
    finally:
        if p.is_alive():
            p.kill()
            p.join(10)
        with Cache(name, create=False) as cache:
            assert cache["from"] == b"python serve()"
        Cache.unlink(name)


def _serve_in_child(name, got):
    from shmcache.server import serve

    got.put(("returned", serve(name, size="4MiB", port=0, ready=got.put)))


@pytest.mark.parametrize("how", ["option", "environment"])
def test_requirepass_from_the_command_line_or_the_environment(how):
    name = fresh_name("resp")
    if how == "option":
        srv = ServeProcess(name, "--requirepass", "pw-1")
    else:
        srv = ServeProcess(name, env={"SHMCACHE_REQUIREPASS": "pw-1"})
    try:
        with pytest.raises(redis.AuthenticationError):
            client(port=srv.port).get("x")
        with pytest.raises(redis.AuthenticationError):
            client(port=srv.port, password="pw-2").ping()
        ok = client(port=srv.port, password="pw-1")
        assert ok.set("x", "1") and ok.get("x") == b"1"
        ok.close()
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)


@pytest.mark.parametrize("loop", LOOPS)
def test_regression_no_tcp_listens_on_the_unix_socket_only(tmp_path, loop):
    """--no-tcp --unix PATH --unix-mode 660: the socket has that mode and is
    removed at exit, and the absent cache is created with --size. Each
    server also listened on a random loopback TCP port (``port=None`` was
    turned into 0, "any port"), which INFO then reported."""
    name = fresh_name("resp")
    sock = str(tmp_path / "only.sock")
    srv = ServeProcess(name, "--no-tcp", "--unix-mode", "660", unix=sock, size="8MiB", loop=loop)
    try:
        assert srv.port is None and "tcp " not in srv.stderr()
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
        import psutil

        c = client(unix_socket_path=sock)
        assert c.set("u", "1")
        assert c.info("server")["tcp_port"] == 0
        proc = psutil.Process(srv.proc.pid)
        assert (getattr(proc, "net_connections", None) or proc.connections)(kind="inet") == []
        c.close()
        with Cache(name, size="8MiB", create=False) as cache:  # a different size would be refused
            assert cache["u"] == b"1"
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)
    assert not os.path.exists(sock)


@pytest.mark.parametrize("loop", LOOPS)
def test_max_multibulk_and_max_bulk_len_options(loop):
    name = fresh_name("resp")
    srv = ServeProcess(name, "--max-multibulk", "3", "--max-bulk-len", "1000", loop=loop)
    try:
        c = Conversation(srv.port)
        assert c("MGET", "a", "b") == [None, None]
        assert c("SET", "k" * 100, "v" * 1000) == b"OK"
        c.close()
        assert raw(srv.port, frame("MGET", "a", "b", "c")) == b"-ERR Protocol error: invalid multibulk length\r\n"
        assert raw(srv.port, b"MGET a b c\r\n") == b"-ERR Protocol error: invalid multibulk length\r\n"
        # the header of the argument over the limit is within the first 64
        # bytes of a frame that is not complete yet: refused on reading it
        assert raw(srv.port, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1001\r\n") == (
            b"-ERR Protocol error: invalid bulk length\r\n")
        with Cache(name, create=False) as cache:
            assert cache["k" * 100] == b"v" * 1000 and len(cache) == 1
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)


@pytest.mark.parametrize("loop", LOOPS)
def test_regression_a_whole_frame_with_an_argument_over_max_bulk_len_is_refused(loop):
    """A "$N" header past a frame's first 64 bytes was never checked
    against --max-bulk-len: a frame that arrived whole (one read) with a
    1001-byte value after a 100-byte key was run. Redis refuses it as a
    protocol error; so do we now, when the frame completes."""
    name = fresh_name("resp")
    srv = ServeProcess(name, "--max-bulk-len", "1000", loop=loop)
    try:
        assert raw(srv.port, b"PING\r\n" + frame("SET", "k" * 100, "w" * 1001)) == (
            b"+PONG\r\n-ERR Protocol error: invalid bulk length\r\n")
        with Cache(name, create=False) as cache:
            assert len(cache) == 0
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)


# ------------------------------------------------------------------ workers
def test_two_workers_share_the_keyspace_and_a_dead_worker_is_replaced():
    name = fresh_name("resp")
    srv = ServeProcess(name, "--workers", "2")
    try:
        clients = [client(port=srv.port) for _ in range(8)]
        pids = set()
        for i, c in enumerate(clients):
            c.set(f"w{i}", i)
            pids.add(c.info("server")["process_id"])
        assert len(pids) == 2  # SO_REUSEPORT spread 8 connections over both
        assert all(c.get(f"w{j}") == str(j).encode() for c in clients for j in range(8))
        victim = worker_pids(srv.proc.pid)[0]
        os.kill(victim, 9)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            kids = worker_pids(srv.proc.pid)
            if len(kids) == 2 and victim not in kids:
                break
            time.sleep(0.1)
        assert len(worker_pids(srv.proc.pid)) == 2
        fresh = client(port=srv.port)
        assert fresh.get("w3") == b"3"
        for c in clients:
            c.close()
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)
    # regression: each worker attached with --size again and logged SettingsIgnored
    # for the cache serve() had just created with that size
    assert "another layout" not in srv.stderr(), srv.stderr()


# ---------------------------------------------------------------- redis-cli
@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli not installed (make test installs redis-tools)")
def test_redis_cli(server):
    srv, cache = server

    def cli(*args):
        return subprocess.run([REDIS_CLI, "-p", str(srv.port), "--raw", *args], capture_output=True,
                              timeout=30, check=True).stdout.decode()

    cache["from_py"] = "snake"
    cache["n"] = 5
    cache.set("ttl", b"x", ttl=60)
    assert cli("GET", "from_py") == "snake\n"
    assert cli("INCR", "n") == "6\n"
    assert 58 <= int(cli("TTL", "ttl")) <= 60
    assert cli("SET", "from_cli", "hello", "EX", "30") == "OK\n"
    assert cache["from_cli"] == b"hello" and 28 < cache.ttl("from_cli") <= 30
    assert cli("PING") == "PONG\n"
    assert cli("HELLO", "3").startswith("server redis\n")
    assert "unknown command" in cli("NOSUCH")
    assert cli("SETBIT", "bits", "1", "1") == "0\n" and cli("GETBIT", "bits", "1") == "1\n"
    assert cache["bits"] == b"\x40" and cli("BITCOUNT", "bits") == "1\n"
    cache["l1"], cache["l2"] = "ohmytext", b"mynewtext"
    assert cli("LCS", "l1", "l2") == "mytext\n" and cli("LCS", "l1", "l2", "LEN") == "6\n"
    assert cli("CONFIG", "SET", "lazyfree-lazy-user-flush", "yes") == "OK\n"
    assert cli("COMMAND", "GETKEYS", "LCS", "l1", "l2") == "l1\nl2\n"
    assert cli("COMMAND", "GETKEYS", "MSET", "a", "1", "b", "2") == "a\nb\n"
    assert cli("COMMAND", "GETKEYS", "GET", "k") == "k\n"
    assert "has no key arguments" in cli("COMMAND", "GETKEYS", "PING", "x")
    assert "Invalid number of arguments" in cli("COMMAND", "GETKEYS", "GET", "a", "b")
    assert "Invalid command specified" in cli("COMMAND", "GETKEYS", "NOSUCH", "a")
    piped = subprocess.run([REDIS_CLI, "-p", str(srv.port), "--pipe"], input=b"SET a 1\r\nSET b 2\r\n",
                           capture_output=True, timeout=30)
    assert b"errors: 0, replies: 2" in piped.stdout
    assert cache["a"] == b"1" and cache["b"] == b"2"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_every_command_has_docs_that_render_back_to_its_syntax():
    """COMMAND DOCS covers every command served; each syntax line parses into
    Redis' argument maps and renders back the same (redis-cli's rendering)."""
    import shmcache.server.connection  # noqa: F401 - registers the connection commands
    from shmcache.server import docs
    from shmcache.server.commands import COMMANDS

    assert set(docs.SYNTAX) == {c.name for c in COMMANDS.values()}
    lines = [syntax for _since, syntax in docs.SYNTAX.values() if syntax is not None]
    lines += [sub[1] for subs in docs.SUBCOMMANDS.values() for sub in subs.values()]
    for syntax in lines:
        assert docs.render(docs.parse(syntax)) == syntax
    assert docs.parse("key [key ...]") == [{"name": "key", "type": "key", "flags": ["multiple"]}]
    assert docs.parse("[NX|XX]") == [{"name": "choice", "type": "oneof", "flags": ["optional"], "arguments": [
        {"name": "nx", "type": "pure-token", "token": "NX"}, {"name": "xx", "type": "pure-token", "token": "XX"}]}]
    for bad in ("[a", "a]", "a ...", "[...]"):
        with pytest.raises(ValueError):
            docs.parse(bad)


@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli not installed (make test installs redis-tools)")
@pytest.mark.parametrize("resp", ["2", "3"])
def test_redis_cli_help_shows_each_commands_syntax_from_command_docs(server, resp):
    """redis-cli builds `help` and its hints from COMMAND DOCS when the
    server answers it (its own table only otherwise): arguments documented
    as empty showed nothing."""
    srv, _ = server

    def helps(*topic):
        out = subprocess.run([REDIS_CLI, "-p", str(srv.port), f"-{resp}", "help", *topic], capture_output=True,
                             timeout=30, check=True).stdout.decode()
        return " ".join(_ANSI.sub("", out).split())

    assert "SET key value [NX|XX] [GET] [EX seconds|PX milliseconds|EXAT unix-time-seconds|" \
           "PXAT unix-time-milliseconds|KEEPTTL] summary: Sets the string value of a key" in helps("SET")
    assert "since: 1.0.0" in helps("SET") and "since: 7.0.0" in helps("LCS")
    assert "MSET key value [key value ...]" in helps("MSET")
    assert "BITCOUNT key [start end [BYTE|BIT]]" in helps("BITCOUNT")
    assert "CLIENT SETNAME connection-name" in helps("CLIENT", "SETNAME")
    assert "EXPIRE key seconds [NX|XX|GT|LT]" in helps("@generic")


@pytest.mark.skipif(REDIS_CLI is None or shutil.which("tmux") is None,
                    reason="redis-cli or tmux not installed (make test installs both)")
def test_redis_cli_hints_as_you_type(server, tmp_path):
    """Interactive redis-cli in a real terminal: after "SET greeting " it
    hints the arguments still to type, as it does against Redis."""
    srv, _ = server
    sock = f"shmcache-test-{os.getpid()}-{time.monotonic_ns()}"

    def tmux(*args):
        return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=30)

    try:
        cmd = f"env REDISCLI_HISTFILE=/dev/null {REDIS_CLI} -p {srv.port}"
        assert tmux("new-session", "-d", "-s", "cli", "-x", "220", "-y", "10", cmd).returncode == 0
        deadline = time.monotonic() + 20
        while f"127.0.0.1:{srv.port}>" not in tmux("capture-pane", "-p", "-t", "cli").stdout:
            assert time.monotonic() < deadline, "no redis-cli prompt"
            time.sleep(0.1)
        for typed, hint in (("SET greeting ", "value [NX|XX] [GET] [EX seconds|"),
                            ("CLIENT SETNAME ", "connection-name"), ("GETEX k ", "[EX seconds|PX milliseconds|")):
            tmux("send-keys", "-t", "cli", "-l", typed)
            deadline = time.monotonic() + 20
            while True:
                pane = tmux("capture-pane", "-p", "-t", "cli").stdout
                if typed + hint in pane:
                    break
                assert time.monotonic() < deadline, pane
                time.sleep(0.1)
            tmux("send-keys", "-t", "cli", "C-u")
        tmux("send-keys", "-t", "cli", "-l", "quit")
        tmux("send-keys", "-t", "cli", "Enter")
    finally:
        tmux("kill-server")  # our private server only (-L)


# ------------------------------------------------- daemon --serve, gunicorn
def _daemon_serving(name: str, stderr=subprocess.PIPE):
    """``shmcache daemon --serve PORT --workers 2`` on a free port: (process, port)."""
    import sys

    with socket.socket() as s:  # a free port for the daemon's server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = subprocess.Popen([sys.executable, "-m", "shmcache", "daemon", "-n", name, "--size", "8MiB",
                          "--serve", str(port), "--workers", "2"], stdout=subprocess.DEVNULL, stderr=stderr)
    return d, port


def test_regression_serve_without_size_serves_an_existing_cache_without_a_warning():
    # serve defaulted --size to 64MiB, so serving any other existing cache
    # warned SettingsIgnored (size='64MiB'); `daemon --serve` without --size
    # passed "--size None" to its serve child, which refused to start.
    import sys

    name = fresh_name("resp")
    Cache(name, size="8MiB").close()
    try:
        srv = ServeProcess(name, size=None)
        try:
            assert client(port=srv.port).ping()
        finally:
            assert srv.stop() == 0
        assert not [ln for ln in srv.log if "SettingsIgnored" in ln], srv.log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        d = subprocess.Popen([sys.executable, "-m", "shmcache", "daemon", "-n", name, "--serve", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert client(port=port).ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline and d.poll() is None, "the daemon's server never came up"
                    time.sleep(0.1)
        finally:
            d.terminate()
            assert d.wait(30) == 0
            err = d.stderr.read().decode()
            d.stderr.close()
        assert "SettingsIgnored" not in err and "Traceback" not in err, err
        with Cache(name, create=False) as c:
            assert admin.geometry(c).total_size < 9 * 2**20  # still the 8 MiB cache
    finally:
        Cache.unlink(name)


def test_daemon_serve_runs_and_stops_a_resp_server(tmp_path):
    name = fresh_name("resp")
    d, port = _daemon_serving(name)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                c = client(port=port)
                c.set("via-daemon", "1")
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and d.poll() is None, d.stderr.read().decode()
                time.sleep(0.1)
        with Cache(name, create=False) as cache:
            assert cache["via-daemon"] == b"1"
        c.close()
    finally:
        d.terminate()
        assert d.wait(30) == 0
        d.stderr.close()
    with pytest.raises(redis.ConnectionError):
        client(port=port).ping()
    Cache.unlink(name)


def test_gunicorn_config_passes_serve_to_the_daemon():
    from shmcache.contrib.gunicorn import daemon_command

    cmd = daemon_command({"SHMCACHE_NAME": "x", "SHMCACHE_SERVE": "6390"})
    assert cmd[cmd.index("--serve") + 1] == "6390"
    assert "--serve" not in daemon_command({"SHMCACHE_NAME": "x"})


def test_regression_keys_pattern_with_many_stars_does_not_stall_the_server(r):
    """A glob translated to a regex backtracked exponentially on this pattern
    (from Redis' own keyspace tests), blocking the worker; the client's
    socket timeout bounds the call."""
    r.set("a" * 64, 1)
    assert r.keys("a*" * 36 + "b") == []
    assert r.keys("a*" * 36) == [b"a" * 64]
    assert r.scan(0, match="a*" * 36 + "b", count=1000)[1] == []


def test_expire_rejects_seconds_that_overflow_in_milliseconds(r):
    r.set("foo", "bar")
    with pytest.raises(redis.ResponseError, match="invalid expire time in 'expire' command"):
        r.expire("foo", -9223372036854776)
    assert r.get("foo") == b"bar"


def test_function_flush_and_list_with_no_scripting(r):
    assert r.execute_command("FUNCTION", "FLUSH")
    assert r.execute_command("FUNCTION", "LIST") == []


def test_regression_randomkey_returns_each_of_two_keys(r):
    """RANDOMKEY took the first key after a random position: two keys in one
    stripe with close hashes made one of them (nearly) never returned."""
    r.set("foo", "x")
    r.set("bar", "y")
    seen = {r.randomkey() for _ in range(100)}
    assert seen == {b"foo", b"bar"}


def test_regression_garbage_after_star_is_a_protocol_error_not_a_wait(server):
    """'*' then a line that never ends ('\\n' but no '\\r\\n'): Redis answers
    'too big mbulk count string'; we waited for the query buffer limit."""
    srv, _ = server
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    s.sendall(b"*\x00")
    time.sleep(0.05)
    out = b""
    try:
        for _ in range(50):
            s.sendall(b"A" * 1024 + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while True:
            chunk = s.recv(1000)
            if not chunk:
                break
            out += chunk
    except ConnectionResetError:
        pass
    s.close()
    assert out.startswith(b"-ERR Protocol error: ")


# Replies redis-server 7.0 gives to the same bytes (checked by hand against it).
@pytest.mark.parametrize("chunks, expected", [
    ([b"PING\r\n*1\r\n$4\r\nPING\r\nECHO a\r\n*2\r\n$4\r\nECHO\r\n$1\r\nb\r\n"],
     b"+PONG\r\n+PONG\r\n$1\r\na\r\n$1\r\nb\r\n"),
    ([b"*1\r\n$4\r\nPING\r\nPING\r\n"], b"+PONG\r\n+PONG\r\n"),
    ([b"*2\r\n$4\r\nECHO\r\n$1\r\nc\r\n\r\nPING\n*1\r\n$4\r\nPI"], b"$1\r\nc\r\n+PONG\r\n"),
    ([b"*1\r\n$4\r\nPI", b"NG\r\nECHO x\r\n"], b"+PONG\r\n$1\r\nx\r\n"),
    ([b"*1\r\n$4\r\nPING\r\n+foo\r\n"], b"+PONG\r\n-ERR unknown command '+foo', with args beginning with: \r\n"),
    ([b"*1\r\n$4\r\nPING\r\n*-5\r\n*0\r\nPING\r\n"], b"+PONG\r\n+PONG\r\n"),
    ([b"*1\r\n$4\r\nPING\r\n*1\r\nfoo\r\n"], b"+PONG\r\n-ERR Protocol error: expected '$', got 'f'\r\n"),
    ([b"*1\r\n$4\r\nPING\r\n*1", b"\r\n$4\r\nPING\r\n"], b"+PONG\r\n+PONG\r\n"),
    ([b"*1\r\n$4\r\nPING\r\n*-", b"1\r\nPING\r\n"], b"+PONG\r\n+PONG\r\n"),
    ([b"*1\r\n$4\r\nPING\r\n%1\r\n*1\r\n$1\r\nx\r\n$1\r\ny\r\n"],
     b"+PONG\r\n-ERR unknown command '%1', with args beginning with: \r\n-ERR unknown command 'x', with args "
     b"beginning with: \r\n-ERR unknown command '$1', with args beginning with: \r\n-ERR unknown command 'y', "
     b"with args beginning with: \r\n"),
], ids=["inline-resp-inline-resp", "resp-then-inline", "resp-empty-line-inline-partial", "split-then-inline",
        "status-looking-inline", "empty-multibulks-skipped", "bad-frame-after-good-one", "count-cut-after-a-frame",
        "null-count-cut-after-a-frame",
        "resp3-map-with-list-key-read-inline"])
def test_regression_inline_and_resp_mixed_in_one_read(server, chunks, expected):
    """Redis chooses inline or multibulk afresh for every command; hiredis
    was fed the whole read, so an inline command right after a RESP frame
    was a protocol error."""
    srv, _ = server
    assert raw(srv.port, chunks) == expected


def test_workers_die_with_a_killed_supervisor():
    """SIGKILL of ``serve --workers 2`` (no chance to stop its workers): the
    kernel's parent-death signal stops them, and the port is free again."""
    name = fresh_name("resp")
    srv = ServeProcess(name, "--workers", "2")
    try:
        deadline = time.monotonic() + 20
        while len(worker_pids(srv.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        kids = worker_pids(srv.proc.pid)
        assert len(kids) == 2
        client(port=srv.port).ping()
        os.kill(srv.proc.pid, 9)
        srv.proc.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in kids)
        with pytest.raises(redis.ConnectionError):
            client(port=srv.port).ping()
    finally:
        srv.stop()
        Cache.unlink(name)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_regression_huge_count_sent_byte_by_byte_is_refused_before_allocating(server):
    """'*2147483648' one byte per read reached hiredis whole (the check for
    big counts saw only one digit per read), which allocated a list of 2^31
    slots and stalled the worker for seconds; now the count line is held
    back until complete and refused."""
    srv, _ = server
    data = b"*2147483648\r\n"
    assert raw(srv.port, [data[i : i + 1] for i in range(len(data))]) == (
        b"-ERR Protocol error: invalid multibulk length\r\n")
    assert raw(srv.port, [b"*1" + b"0" * 39]) == b"-ERR Protocol error: invalid multibulk length\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(100) == b"+PONG\r\n"


@pytest.mark.parametrize("data", [
    b"*1048577\r\n",  # 7 digits, the shortest count over the limit, alone in the read
    b"*1\r\n$4\r\nPING\r\n*2147483648\r\n",  # after a whole frame
    b"*2\r\n$4\r\nECHO\r\n$1\r\n*\r\n*1048577\r\n",  # after a value holding "*"
], ids=["alone", "after-a-frame", "after-a-star-value"])
def test_big_counts_are_refused_wherever_they_sit_in_a_read(server, data):
    """The count check runs its regex only where a 7-digit count can be (a
    "*" past the first byte, or a long first count line): each place."""
    srv, _ = server
    out = raw(srv.port, data)
    assert out.endswith(b"-ERR Protocol error: invalid multibulk length\r\n"), out
    assert out.count(b"\r\n") <= 3


# ------------------------------------------------------ bits, LCS, CONFIG SET
def test_setbit_getbit_bitcount(r, server):
    _, cache = server
    assert r.setbit("b", 7, 1) == 0 and r.get("b") == b"\x01"
    assert r.setbit("b", 7, 1) == 1 and r.setbit("b", 7, 0) == 1 and r.get("b") == b"\x00"
    assert r.setbit("b", 17, 1) == 0 and r.get("b") == b"\x00\x00\x40"  # zero-padded
    assert r.getbit("b", 17) == 1 and r.getbit("b", 16) == 0 and r.getbit("b", 10_000) == 0
    assert r.getbit("missing", 3) == 0
    cache["py"] = "a"  # 0x61 = 0110 0001, a Python str
    assert r.setbit("py", 6, 1) == 0 and cache["py"] == "c"  # still UTF-8: still a str
    cache["n"] = 1  # a Python int reads as its text "1" (0x31)
    assert r.getbit("n", 2) == 1 and r.setbit("n", 6, 1) == 0 and cache["n"] == b"3"
    for bad in (-1, 4 * 1024**3):
        with pytest.raises(redis.ResponseError, match="bit offset is not an integer or out of range"):
            r.setbit("b", bad, 1)
    for bad in ("2", "-1", "x"):
        with pytest.raises(redis.ResponseError, match="bit is not an integer or out of range"):
            r.execute_command("SETBIT", "b", 0, bad)
    cache["p"] = [1]
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.setbit("p", 0, 1)
    assert cache["p"] == [1]
    r.set("s", "foobar")
    assert r.bitcount("s") == 26
    assert r.bitcount("s", 1, 1) == 6 and r.bitcount("s", 0, -1) == 26 and r.bitcount("s", -2, -1) == 7
    assert r.bitcount("s", 5, 30, "BIT") == 17 and r.bitcount("s", -3, -1, "bit") == 1
    assert r.bitcount("s", 3, 1) == 0 and r.bitcount("missing") == 0
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("BITCOUNT", "s", 1)
    with pytest.raises(redis.ResponseError, match="syntax error"):  # Redis 7.2: arguments before the key
        r.execute_command("BITCOUNT", "missing", 1, 2, "WORD")


def test_lcs_as_redis_7(r, server):
    r.mset({"a": "ohmytext", "b": "mynewtext"})
    assert r.lcs("a", "b") == b"mytext"
    assert r.lcs("a", "b", len=True) == 6
    idx = r.lcs("a", "b", idx=True, withmatchlen=True, minmatchlen=4)
    if isinstance(idx, list):  # RESP2: a flat array
        idx = dict(zip(idx[::2], idx[1::2]))
    idx = {k.decode() if isinstance(k, bytes) else k: v for k, v in idx.items()}
    assert idx == {"matches": [[[4, 7], [5, 8], 4]], "len": 6}
    assert r.lcs("a", "missing") == b""
    with pytest.raises(redis.ResponseError, match="If you want both the length and indexes"):
        r.execute_command("LCS", "a", "b", "IDX", "LEN")
    server[1]["p"] = {"x": 1}
    with pytest.raises(redis.ResponseError, match="The specified keys must contain string values"):
        r.lcs("a", "p")
    r.set("big", "x" * 2500)  # a 2501 x 2501 table of uint32: within 32 MiB
    assert r.lcs("big", "big", len=True) == 2500


def test_lcs_table_bounded_by_proto_max_bulk_len(tmp_path):
    name = fresh_name("resp")
    srv = ServeProcess(name, "--max-bulk-len", str(1 << 20))
    try:
        c = client(port=srv.port)
        c.set("x", "a" * 600)
        with pytest.raises(redis.ResponseError, match="transient memory for LCS exceeds proto-max-bulk-len"):
            c.lcs("x", "x")
        c.close()
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)


def test_config_set_as_redis_7(r, server):
    assert r.config_set("maxclients", 500)
    assert r.config_get("maxclients") == {"maxclients": "500"}
    assert r.execute_command("CONFIG", "SET", "save", "", "lazyfree-lazy-user-del", "yes")
    assert r.config_get("lazyfree-lazy-user-del") == {"lazyfree-lazy-user-del": "yes"}
    with pytest.raises(redis.ResponseError,
                       match=r"CONFIG SET failed \(possibly related to argument 'maxclients'\) - argument couldn't be"):
        r.config_set("maxclients", "many")
    with pytest.raises(redis.ResponseError, match="Unknown option or number of arguments for CONFIG SET - 'nosuch'"):
        r.config_set("nosuch", 1)
    with pytest.raises(redis.ResponseError, match="duplicate parameter"):
        r.execute_command("CONFIG", "SET", "maxclients", 10, "maxclients", 11)
    with pytest.raises(redis.ResponseError, match="keeps maxmemory-policy at"):  # fixed by the cache
        r.config_set("maxmemory-policy", "volatile-ttl")
    with pytest.raises(redis.ResponseError, match="'appendonly'"):  # all or nothing
        r.execute_command("CONFIG", "SET", "maxclients", 7, "appendonly", "yes")
    assert r.config_get("maxclients") == {"maxclients": "500"}
    assert r.config_set("maxclients", 1000)


def test_info_sections_come_from_the_cache_and_the_server(r, server):
    _, cache = server
    r.set("i1", "x" * 100)
    cache["i2"] = b"y"
    assert r.get("i1") and r.get("nope") is None
    st = cache.stats()
    mem = r.info("memory")
    assert mem["used_memory"] == st["bytes_used"] > 100 and mem["maxmemory"] == st["arena_bytes"]
    assert mem["maxmemory_policy"] == ("allkeys-lru" if st["policy"] == "lru" else "noeviction")
    stats = r.info("stats")
    assert stats["keyspace_hits"] == st["hits"] and stats["keyspace_misses"] == st["misses"]
    assert stats["evicted_keys"] == st["evictions"] and stats["expired_keys"] == st["expirations"]
    before = stats["total_commands_processed"]
    r.ping()
    assert r.info("stats")["total_commands_processed"] == before + 2  # the PING and this INFO
    assert r.info("clients")["connected_clients"] >= 1
    assert set(r.info()) >= {"redis_version", "connected_clients", "used_memory", "keyspace_hits"}


def test_info_keyspace_counts_expires_and_avg_ttl(r, server):
    _, cache = server
    assert "db0" not in r.info("keyspace")
    cache.set("a", 1, ttl=100)
    cache.set("b", 2, ttl=300)
    r.set("c", "forever")
    db0 = r.info("keyspace")["db0"]
    assert db0["keys"] == 3 and db0["expires"] == 2
    assert 190_000 < db0["avg_ttl"] <= 200_000


@pytest.mark.parametrize("loop", LOOPS)
def test_regression_replies_to_one_read_are_bounded_by_max_output_buffer(loop):
    """270 bytes of pipelined GETs asked for 3 MB of replies (a 64 KiB read
    of them, for gigabytes): all were built in memory before any limit was
    looked at. Now a read whose replies pass --max-output-buffer closes the
    client, as Redis closes a client over its output limit."""
    name = fresh_name("resp")
    srv = ServeProcess(name, "--max-output-buffer", "1000000", loop=loop)
    try:
        with Cache(name, create=False) as cache:
            cache["big"] = b"x" * 60_000  # the most one 64 KiB arena segment holds, about
        ok = raw(srv.port, b"GET big\r\n" * 5)
        assert ok.count(b"$60000\r\n") == 5
        for request in (b"GET big\r\n" * 30, b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" * 30,
                        b"MGET" + b" big" * 30 + b"\r\n"):
            assert raw(srv.port, request, wait=5) == b""  # closed, nothing sent
        assert client(port=srv.port).strlen("big") == 60_000
    finally:
        assert srv.stop() == 0
        Cache.unlink(name)
    assert "passed max-output-buffer=1000000" in srv.stderr()


def test_daemon_serve_child_dies_with_a_killed_daemon():
    """``daemon --serve``: SIGKILL the daemon; its ``serve`` child and that
    child's workers get the parent-death signal and exit."""
    name = fresh_name("resp")
    d, port = _daemon_serving(name, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        tree: list = []
        while time.monotonic() < deadline:
            kids = worker_pids(d.pid)
            tree = kids + [w for k in kids for w in worker_pids(k)]
            if len(tree) >= 3:
                break
            time.sleep(0.1)
        assert len(tree) >= 3, tree  # the serve supervisor and its 2 workers
        client(port=port).ping()
        d.kill()
        d.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in tree)
    finally:
        if d.poll() is None:
            d.kill()
            d.wait(10)
        Cache.unlink(name)


def _read_replies(s: socket.socket, n: int, size: int) -> int:
    """Read ``n`` bulk replies of ``size`` bytes of b"x" from ``s``; how many came whole."""
    want = b"$%d\r\n%s\r\n" % (size, b"x" * size)
    buf = b""
    got = 0
    while got < n:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
        while buf.startswith(want):
            buf = buf[len(want):]
            got += 1
        assert want.startswith(buf[: len(want)]), buf[:80]  # nothing but whole, ordered replies
    return got


def test_a_client_that_does_not_read_its_replies_is_paused_then_served_in_full(server):
    """The worker's own event loop buffers only what the socket refuses and,
    past 1 MiB buffered, stops reading that client's requests (its other
    clients are served meanwhile) until the client reads; then every reply
    arrives, in order."""
    srv, cache = server
    size = 60_000
    cache["big"] = b"x" * size
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    try:
        s.sendall(b"CLIENT SETNAME slowreader\r\n")
        assert s.recv(100) == b"+OK\r\n"
        for _ in range(40):  # 24 MB of replies asked for, 10 GETs per read
            s.sendall(b"GET big\r\n" * 10)
            time.sleep(0.01)
        time.sleep(0.3)
        other = client(port=srv.port)
        assert other.ping()
        [me] = [c for c in other.client_list() if c["name"] == "slowreader"]
        # at most the 1 MiB mark plus the replies of the read that crossed it
        assert int(me["omem"]) < 2 * 2**20, me
        other.close()
        assert _read_replies(s, 400, size) == 400
        s.sendall(b"PING\r\n")
        assert s.recv(100) == b"+PONG\r\n"
    finally:
        s.close()


def test_asyncio_entry_point_serves_the_same_commands(tmp_path):
    """``Server.start()`` inside an asyncio loop (here ``start_in_thread``)
    drives the same connections as the workers' epoll loop: commands,
    pipelining, replies that do not fit the socket, a protocol error."""
    from shmcache.server import start_in_thread

    name = fresh_name("resp")
    with Cache(name, size="16MiB") as cache:
        srv, thread = start_in_thread(cache, port=0)
        try:
            r = client(port=srv.port, protocol=3)
            assert r.set("a", "1") and r.incr("a") == 2 and cache["a"] == 2
            with r.pipeline(transaction=False) as p:
                for i in range(500):
                    p.set(f"k{i}", i).get(f"k{i}")
                assert p.execute()[1::2] == [str(i).encode() for i in range(500)]
            cache["big"] = b"x" * 60_000
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(b"GET big\r\n" * 100)
            assert _read_replies(s, 100, 60_000) == 100
            s.close()
            assert raw(srv.port, b"*1\r\nfoo\r\n") == b"-ERR Protocol error: expected '$', got 'f'\r\n"
            assert r.ping()
            r.close()
        finally:
            srv.stop_thread()
        assert not thread.is_alive()
    Cache.unlink(name)


def test_regression_accept_out_of_descriptors_pauses_instead_of_spinning():
    """With the worker's descriptors used up, accept() fails while the
    connection waits in the backlog, so the listening socket stays readable:
    retried at once, the loop would spin at 100% CPU writing a warning per
    turn. It stops accepting for a second instead (as asyncio does), keeps
    serving its clients, and accepts the waiting ones once descriptors free up."""
    import resource

    name = fresh_name("resp")
    srv = ServeProcess(name)
    waiting = []
    try:
        a = client(port=srv.port)
        assert a.ping()
        pid = srv.proc.pid
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), limits[1]))
        try:
            waiting = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(3)]
            time.sleep(1.5)
            assert a.ping()  # the connected client is still served
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        for s in waiting:  # accepted once the pause is over
            s.sendall(b"PING\r\n")
            assert s.recv(100) == b"+PONG\r\n"
        a.close()
    finally:
        for s in waiting:
            s.close()
        assert srv.stop() == 0
        Cache.unlink(name)
    warnings = srv.stderr().count("cannot accept a connection")
    assert 1 <= warnings <= 4, srv.stderr()[-2000:]
