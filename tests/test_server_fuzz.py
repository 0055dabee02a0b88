"""Fuzzed RESP input against a real ``shmcache serve``: random bytes,
truncated and mutated frames, huge declared lengths, deep nesting. For a
bounded time (FUZZ_SECONDS, longer under ``-m stress``): the server stays up,
its memory stays bounded, and the cache is unchanged."""

import os
import random
import socket
import time

import pytest

hiredis = pytest.importorskip("hiredis", reason="shmcache serve needs hiredis: pip install 'shmcache[server]'")

from names import fresh_name  # noqa: E402
from resp_server import LOOPS, ServeProcess  # noqa: E402
from shmcache import Cache  # noqa: E402

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "6"))


def _frame(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


# read-only commands: whatever a mutation makes of them, it should not write
_SEEDS = [
    _frame(b"GET", b"seed:1"), _frame(b"MGET", b"seed:1", b"seed:2"), _frame(b"PING"),
    _frame(b"EXISTS", b"seed:2"), _frame(b"TTL", b"seed:1"), _frame(b"ECHO", b"x" * 100),
    _frame(b"STRLEN", b"seed:3"), _frame(b"GETRANGE", b"seed:3", b"0", b"-1"), b"PING\r\n",
    b"GET seed:1\r\n", b'ECHO "a\\x41b"\r\n',
]


def _case(rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    seed = rng.choice(_SEEDS)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 2000))
    if kind == 1:  # truncated frame
        return seed[: rng.randrange(1, len(seed))]
    if kind == 2:  # byte mutations
        b = bytearray(seed * rng.randrange(1, 4))
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 3:  # huge declared lengths
        return rng.choice([b"*%d\r\n", b"*1\r\n$%d\r\n", b"*2\r\n$3\r\nGET\r\n$%d\r\nab"]) % rng.choice(
            [2**31, 2**32 + 5, 10**12, 2**63 - 1, 10**30, 1 << 20, 10**7])
    if kind == 4:  # deep nesting
        return b"*1\r\n" * rng.choice([10, 1000, 100_000]) + b"$1\r\nx\r\n"
    if kind == 5:  # negative and odd lengths
        return rng.choice([b"*-%d\r\n", b"*1\r\n$-%d\r\n", b"$%d\r\n", b"*%d\r\n$x\r\n"]) % rng.randrange(10**6)
    if kind == 6:  # non-bulk elements
        return rng.choice([b"*2\r\n:1\r\n+OK\r\n", b"*1\r\n*1\r\n$4\r\nPING\r\n", b"*1\r\n_\r\n", b"%1\r\n"])
    if kind == 7:  # long inline line
        return b"GET " + b"a" * rng.choice([100, 70_000]) + rng.choice([b"", b"\r\n"])
    return seed * rng.randrange(1, 50)  # plain pipelines


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fuzz(seconds: float, seed: int, loop: str = "epoll") -> None:
    name = fresh_name("fuzz")
    srv = ServeProcess(name, loop=loop)
    cache = Cache(name, create=False)
    try:
        cache["seed:1"] = b"one"
        cache.set("seed:2", 2, ttl=3600)
        cache["seed:3"] = "three"
        cache["seed:pickled"] = [1, 2, 3]
        before = {k: cache[k] for k in cache.keys()}
        base = _rss_kib(srv.proc.pid)
        peak = base
        rng = random.Random(seed)
        deadline = time.monotonic() + seconds
        cases = 0
        while time.monotonic() < deadline:
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            try:
                for _ in range(rng.randrange(1, 6)):
                    data = _case(rng)
                    step = rng.choice([len(data), 1, 7, 1000])
                    for i in range(0, len(data), step):
                        s.sendall(data[i : i + step])
                    cases += 1
                s.settimeout(0.02)
                try:
                    while s.recv(1 << 16):
                        pass
                except (socket.timeout, ConnectionResetError):
                    pass
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed on a protocol error, as it should
            finally:
                s.close()
            peak = max(peak, _rss_kib(srv.proc.pid))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(100) == b"+PONG\r\n"
            # every fuzzed connection was let go (a Connection kept after its
            # socket closed is a leak no RSS bound would see)
            reader = hiredis.Reader()
            deadline = time.monotonic() + 10
            while True:
                s.sendall(b"INFO clients\r\n")
                info = False
                while info is False:
                    reader.feed(s.recv(4096))
                    info = reader.gets()
                if b"connected_clients:1\r\n" in info or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert b"connected_clients:1\r\n" in info, info
        assert srv.proc.poll() is None
        assert {k: cache[k] for k in cache.keys()} == before
        assert cache.check() == []
        # bounded: no growth beyond the few buffers one client may hold
        assert peak - base < 256 * 1024, f"RSS grew from {base} KiB to {peak} KiB over {cases} cases"
        assert "Traceback" not in "".join(srv.log)
    finally:
        cache.close()
        rc = srv.stop()
        Cache.unlink(name)
    assert rc == 0
    assert "Traceback" not in srv.stderr(), srv.stderr()[-3000:]


@pytest.mark.parametrize("loop", LOOPS)
def test_fuzzed_input_leaves_server_up_memory_bounded_cache_unchanged(loop):
    """Each loop: the workers' epoll loop and asyncio's ``Server.start()``."""
    _fuzz(FUZZ_SECONDS, seed=11, loop=loop)


@pytest.mark.stress
@pytest.mark.parametrize("loop", LOOPS)
def test_fuzz_long(loop):
    _fuzz(float(os.environ.get("FUZZ_LONG_SECONDS", "120")), seed=int(time.time()), loop=loop)
