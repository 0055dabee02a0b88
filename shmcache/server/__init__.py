"""``shmcache serve``: a Redis-protocol (RESP2/RESP3) endpoint over one cache.

Any language's Redis client (and ``redis-cli``) reads and writes the same
keyspace that Python processes reach at memory speed through
:class:`shmcache.Cache`. The server is an adapter on the public ``Cache`` API
(``get_raw``, ``update_raw``, ``scan``...); the table never learns about sockets.

Unlike Redis the store is already shared, so ``workers=N`` runs N server
processes on one port (``SO_REUSEPORT``: the kernel spreads connections) over
the same segment, and the endpoint scales with cores.

Python entry points: :func:`serve` (blocking, with workers), :class:`Server`
(``await server.start()`` inside your own asyncio loop), :func:`start_in_thread`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import stat
import threading
import time

from .._pdeathsig import die_with_parent
from ..cache import Cache
from ..errors import CacheNotFound, Error
from . import connection as _connection
from .connection import Connection, admit, handle_read

log = logging.getLogger("shmcache.server")

__all__ = ["Server", "serve", "start_in_thread", "DEFAULT_PORT", "LIMIT_DEFAULTS"]

DEFAULT_PORT = 6380

#: Per-client limits (bytes unless said). Redis allows 512 MB bulks and a
#: 1 GB query buffer; a cache's values are bounded by ``max_value_size``, so
#: smaller ceilings lose nothing and bound what one client can make us hold.
LIMIT_DEFAULTS = dict(
    max_bulk_len=32 * 2**20,  # one argument
    max_multibulk=1024 * 1024,  # arguments in one command (Redis' limit too)
    max_query_buffer=64 * 2**20,  # an unfinished request held for a client
    max_output_buffer=64 * 2**20,  # replies a client has not read, or to one read: then it is dropped
    max_inline=64 * 1024,  # one inline command line (Redis' PROTO_INLINE_MAX_SIZE)
    max_clients=1000,  # connections per worker process
)


class ServerError(Error):
    """A server that cannot start as configured (the message says why)."""


def _require_parser() -> None:
    """hiredis parses requests; it is the optional ``server`` extra, so the
    rest of shmcache (and ``shmcache --help``) works without it."""
    if _connection.hiredis is None:
        raise ServerError("shmcache serve needs hiredis, the RESP parser: pip install 'shmcache[server]'")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, explicit: bool) -> None:
    """Redis' protected mode, at bind time: a non-loopback address needs an
    explicit ``--bind`` (and should have a password).

    Raises:
        ServerError: ``host`` is not loopback and was not given explicitly.
    """
    if not _is_loopback(host) and not explicit:
        raise ServerError(f"refusing to listen on non-loopback address {host!r} without an explicit --bind")


def read_password(password: str | bytes | None, password_file: str | None) -> bytes | None:
    """The AUTH password from a value or the first line of a file (which must
    not be readable by others).

    Raises:
        ServerError: both given, the file is unreadable or group/world readable, or empty.
    """
    if password is not None and password_file is not None:
        raise ServerError("give either requirepass or requirepass_file, not both")
    if password_file is not None:
        try:
            st = os.stat(password_file)
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ServerError(f"requirepass file {password_file!r} is accessible by group/others "
                                  f"(mode {oct(st.st_mode & 0o777)}); chmod 600 it")
            with open(password_file, "rb") as f:
                password = f.readline().rstrip(b"\r\n")
        except OSError as e:
            raise ServerError(f"cannot read requirepass file {password_file!r}: {e.strerror}") from None
        if not password:
            raise ServerError(f"requirepass file {password_file!r} is empty")
    if isinstance(password, str):
        password = password.encode()
    return password


class _Protocol(asyncio.Protocol):
    __slots__ = ("srv", "conn", "transport", "paused")

    def __init__(self, srv: "Server"):
        self.srv = srv
        self.conn = None
        self.transport = None
        self.paused = False  # the client's unread replies are over the high-water mark

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        conn = admit(self.srv, transport, transport.get_extra_info("socket"), peer, local)
        if conn is None:
            return
        self.conn = conn
        transport.set_write_buffer_limits(high=min(1 << 20, self.srv.max_output_buffer))

    def data_received(self, data):
        conn = self.conn
        if conn is None:
            return
        handle_read(self.srv, conn, self.transport, data, self)

    def pause_writing(self):
        # The client is not reading its replies: stop reading its requests
        # until it catches up (the buffer above 1 MiB), rather than growing it.
        self.paused = True
        self.transport.pause_reading()

    def resume_writing(self):
        self.paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc):
        if self.conn is not None:
            self.srv.connections.pop(self.conn.id, None)
            self.conn.closing = True


class Server:
    """The RESP endpoint of one cache inside an asyncio loop.

    Args:
        cache: an open :class:`~shmcache.Cache` (the server never closes it).
        host / port: TCP address (``port=None``: no TCP listener; 0: pick one).
        bind_explicit: the caller asked for ``host`` explicitly (needed for a
            non-loopback address).
        unix / unix_mode: a unix socket path and its permission bits (0o600).
        password: AUTH password (None: no AUTH, as Redis without requirepass).
        sock: an already-bound listening socket to serve instead (workers).
        workers: shown in INFO (the number of sibling processes).
        **limits: see :data:`LIMIT_DEFAULTS`.
    """

    def __init__(self, cache: Cache, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT, *,
                 bind_explicit: bool = False, unix: str | None = None, unix_mode: int = 0o600,
                 password: bytes | str | None = None, sock=None, unix_sock=None, workers: int = 1, **limits):
        _require_parser()
        unknown = set(limits) - set(LIMIT_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown server settings: {sorted(unknown)}")
        for k, v in {**LIMIT_DEFAULTS, **limits}.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
            setattr(self, k, v)
        if port is not None or sock is not None:
            check_bind(host, bind_explicit)
        self.cache = cache
        st = cache.stats()
        self.max_value = st["max_value_size"]
        self.max_key = st["max_key_size"]
        self.stripes = st["stripes"]
        self.bind = host
        self.port = port or 0  # the real port once listening; 0 without TCP (Redis' "port 0")
        self._tcp = port is not None
        self.unix = unix
        self.unix_mode = unix_mode
        self.password = password.encode() if isinstance(password, str) else password
        self.workers = workers
        self._sock = sock
        self._unix_sock = unix_sock
        self.connections: dict[int, Connection] = {}
        self.connections_received = 0
        self.config: dict[bytes, bytes] = {}  # CONFIG SET values kept only to be read back
        self.commands_processed = 0
        self.rejected = 0
        self.started = time.time()
        self._servers: list = []
        self._unix_made = None  # (path, inode) of the unix socket this server bound

    async def start(self) -> "Server":
        """Listen (TCP and/or unix socket). Returns self; ``self.port`` is the real port.

        Raises:
            OSError: the address is in use or not allowed.
        """
        loop = asyncio.get_running_loop()
        factory = lambda: _Protocol(self)  # noqa: E731
        for sock in self._listening_sockets():
            if sock.family == socket.AF_UNIX:
                self._servers.append(await loop.create_unix_server(factory, sock=sock))
            else:
                self._servers.append(await loop.create_server(factory, sock=sock))
        return self

    def run(self) -> None:
        """Serve on this (main) thread until SIGTERM or SIGINT, with the
        worker's epoll loop (less CPU per request than asyncio; what
        :func:`serve` runs). Then drops every client and stops listening.

        Raises:
            OSError: the address is in use or not allowed.
        """
        from .eventloop import run_until_signal

        try:
            run_until_signal(self, self._listening_sockets())
        finally:
            self._remove_unix_socket()

    def _listening_sockets(self) -> list:
        """The TCP and unix sockets to accept on (given, or bound now);
        ``self.port`` becomes the real port."""
        socks = []
        if self._sock is not None:
            socks.append(self._sock)
            self.port = self._sock.getsockname()[1]
        elif self._tcp and self.bind:
            sock = listen_tcp(self.bind, self.port, reuse_port=False)
            socks.append(sock)
            self.port = sock.getsockname()[1]
        if self._unix_sock is not None:
            socks.append(self._unix_sock)
        elif self.unix:
            sock = listen_unix(self.unix, self.unix_mode)
            socks.append(sock)
            self._unix_made = (self.unix, os.stat(self.unix).st_ino)
        return socks

    def _remove_unix_socket(self) -> None:
        """Unlink the socket file this server created (one given to it, as
        ``serve()``'s workers are, is its creator's), unless something else
        has replaced it since."""
        made, self._unix_made = self._unix_made, None
        if made is not None:
            try:
                if os.stat(made[0]).st_ino == made[1]:
                    os.unlink(made[0])
            except OSError:
                pass

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    def close(self) -> None:
        """Stop listening (removing the unix socket file it created) and drop
        every client. Idempotent."""
        for s in self._servers:
            s.close()
        self._servers = []
        self._remove_unix_socket()
        for c in list(self.connections.values()):
            c.kill()


def listen_tcp(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket (``SO_REUSEPORT`` for sibling workers)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.listen(511)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def listen_unix(path: str, mode: int = 0o600) -> socket.socket:
    """A listening unix socket created with ``mode`` (no window with wider
    permissions: the umask is tightened around bind). A stale socket file is
    replaced; any other file at ``path`` is refused.

    Raises:
        ServerError: ``path`` exists and is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ServerError(f"{path!r} exists and is not a socket; refusing to replace it")
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        s.bind(path)
        os.chmod(path, mode)
        s.listen(511)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    finally:
        os.umask(old)
    return s


def _open_cache(name: str, size, create: bool) -> Cache:
    return Cache(name, size=size, create=create, default_ttl=None)


def _attach(name: str, size) -> Cache:
    """A worker's cache: the one ``serve()`` created or checked before
    forking (which already warned, once, if it exists with another size).
    Attaching with ``size`` again would repeat that check, and its warning,
    in every worker. Only a worker restarted after the cache was removed
    creates it."""
    try:
        return Cache(name, create=False, default_ttl=None)
    except CacheNotFound:
        return _open_cache(name, size, True)


def _run_worker(name: str, size, kw: dict, sock, unix_sock, workers: int) -> None:
    """Body of one server process: open the cache, serve until SIGTERM/SIGINT."""
    cache = _attach(name, size)
    try:
        Server(cache, sock=sock, unix_sock=unix_sock, workers=workers, **kw).run()
    finally:
        cache.close()


def serve(name: str, *, size=None, host: str = "127.0.0.1", port: int | None = DEFAULT_PORT,
          bind_explicit: bool = False, unix: str | None = None, unix_mode: int = 0o600, workers: int = 1,
          password: str | bytes | None = None, password_file: str | None = None, ready=None, **limits) -> int:
    """Serve cache ``name`` over RESP until SIGTERM/SIGINT (blocking). Returns 0.

    The cache is created with ``size`` (default 64 MiB) if absent; an
    existing cache is served as it is, and a ``size`` it was not created
    with is named in a SettingsIgnored warning. ``workers > 1`` forks that
    many server processes on the same port (``SO_REUSEPORT``) and the same
    unix socket; the parent restarts any that dies. ``ready(port)`` is called
    once listening (the real port when ``port=0``). A worker process dies
    with the process that forked it (even one killed by SIGKILL), so no
    orphan keeps the port.

    Raises:
        ServerError: hiredis (the ``server`` extra) is not installed, or a
            refused setting (non-loopback bind without ``bind_explicit``, a bad
            password file, a non-socket at ``unix``).
        OSError: the port is in use.
        ValueError / TypeError: a bad name, size or limit.
    """
    _require_parser()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if port is None and unix is None:
        raise ValueError("nothing to listen on: give a port or a unix socket path")
    if port is not None:
        check_bind(host, bind_explicit)
    pw = read_password(password, password_file)
    kw = dict(host=host, port=port, bind_explicit=bind_explicit, unix=unix, unix_mode=unix_mode,
              password=pw, **limits)
    probe = _open_cache(name, size, True)  # create it once, before the workers race to
    try:
        Server(probe, **{**kw, "port": None, "unix": None})
    finally:
        probe.close()
    socks = []
    unix_sock = None
    try:
        if port is not None:
            first = listen_tcp(host, port, reuse_port=True)
            port = first.getsockname()[1]
            socks = [first] + [listen_tcp(host, port, reuse_port=True) for _ in range(workers - 1)]
        if unix:
            unix_sock = listen_unix(unix, unix_mode)
        kw["port"] = port
        log.info("serving cache %r over RESP with %d worker(s): %s", name, workers, ", ".join(
            ([f"tcp {host}:{port}"] if port is not None else []) + ([f"unix {unix}"] if unix else [])))
        if ready is not None:
            ready(port)
        if workers == 1:
            _run_worker(name, size, kw, socks[0] if socks else None, unix_sock, 1)
            return 0
        return _supervise(name, size, kw, socks, unix_sock, workers)
    finally:
        for s in socks:
            s.close()
        if unix_sock is not None:
            unix_sock.close()
            try:
                os.unlink(unix)
            except OSError:
                pass


def _supervise(name, size, kw, socks, unix_sock, workers) -> int:
    """Fork ``workers`` server processes and keep them running until told to stop."""
    stopping = False

    def stop(*_a):
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    pids: dict[int, int] = {}

    parent = os.getpid()

    def spawn(i: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for s in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(s, signal.SIG_DFL)
                die_with_parent(parent)
                for j, s in enumerate(socks):
                    if j != i:
                        s.close()
                _run_worker(name, size, kw, socks[i] if socks else None, unix_sock, workers)
            except BaseException:
                log.exception("worker %d failed", i)
                code = 1
            finally:
                os._exit(code)
        pids[pid] = i

    try:
        for i in range(workers):
            spawn(i)
        while not stopping:
            # Polled: a blocking waitpid is retried after the SIGTERM handler
            # runs (PEP 475), so the stop would wait for a worker to die.
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                time.sleep(0.1)
                continue
            i = pids.pop(pid, None)
            if i is not None and not stopping:
                log.warning("worker %d (pid %d) exited with status %d; restarting it", i, pid, status)
                time.sleep(0.2)
                spawn(i)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                pids.pop(pid, None)
            else:
                time.sleep(0.05)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def start_in_thread(cache: Cache, **kw) -> tuple["Server", threading.Thread]:
    """Run a :class:`Server` for ``cache`` on a daemon thread with its own
    loop (the daemon's ``--serve``, a gunicorn master). Returns it once
    listening; stop it with ``server.stop_thread()``.
    """
    started = threading.Event()
    box: dict = {}

    def run():
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            srv = Server(cache, **kw)
            loop.run_until_complete(srv.start())
        except BaseException as e:
            box["error"] = e
            started.set()
            loop.close()
            return
        box["server"] = srv
        stop = asyncio.Event()

        def stop_thread():
            loop.call_soon_threadsafe(stop.set)
            t.join(10)

        srv.stop_thread = stop_thread
        started.set()

        async def wait():
            await stop.wait()
            srv.close()

        loop.run_until_complete(wait())
        loop.close()

    t = threading.Thread(target=run, name="shmcache-serve", daemon=True)
    t.start()
    started.wait()
    if "error" in box:
        raise box["error"]
    return box["server"], t
