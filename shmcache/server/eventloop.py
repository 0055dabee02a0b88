"""The loop of a ``shmcache serve`` worker process: epoll, no asyncio.

An unpipelined request is one ``recv``, the parse and the command, one
``send``. asyncio's loop, handles and transports cost more CPU than the
parse and the command together: measured with ``redis-benchmark -t get -c
50``, the server used ~33 µs of CPU per request under asyncio and ~23 µs
under this loop (redis-server: ~13). :meth:`Server.start` keeps asyncio for
serving inside an application's own loop; ``serve()`` (the CLI, ``--workers``,
the daemon's ``--serve``) runs this one. Both drive the same
:class:`~shmcache.server.connection.Connection` through the same
:func:`~shmcache.server.connection.handle_read`, with the transport semantics asyncio
has: a write is sent at once and only what the socket refuses is buffered;
above ``high`` buffered bytes the client's requests are not read until the
buffer drains to a quarter of it; ``close()`` sends what is buffered, then
closes; ``abort()`` closes at once.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import time

from .connection import admit, handle_read

log = logging.getLogger("shmcache.server")

#: What one recv() takes (asyncio's selector transport reads 256 KiB too).
READ_SIZE = 64 * 1024
#: Connections accepted per readiness of a listening socket (Redis: 1000).
ACCEPTS_PER_EVENT = 100
#: Seconds a listening socket is left alone after accept() ran out of file
#: descriptors or memory (asyncio waits 1 s too): the pending connection
#: keeps it readable, and retrying at once would spin and flood the log.
ACCEPT_RETRY_DELAY = 1.0

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
#: read(2)/write(2) on the socket's fd: what recv/send with no flags do, but
#: os.read/os.write parse their arguments in C (argument clinic) where the
#: socket methods go through PyArg_ParseTuple: ~2% of a request's CPU.
_read, _write = os.read, os.write
_IN_ERR = _IN | select.EPOLLERR | select.EPOLLHUP
_RETRY = (BlockingIOError, InterruptedError)


class Client:
    """One accepted socket: the ``transport`` a Connection writes to."""

    __slots__ = ("loop", "sock", "fd", "conn", "out", "mask", "paused", "closing", "closed", "high", "low")

    def __init__(self, loop: "Loop", sock: socket.socket, high: int):
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = None
        self.out = bytearray()  # what the socket has not taken yet
        self.mask = _IN
        self.paused = False  # reading stopped: over `high` bytes buffered
        self.closing = False  # close() called: closed once `out` is sent
        self.closed = False
        self.high = high
        self.low = high // 4

    # -- the transport interface Connection and handle_read use
    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if not self.out:
            try:
                n = _write(self.fd, data)
            except _RETRY:
                n = 0
            except OSError:  # reset by the peer: nobody to answer
                self.abort()
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
        self.out += data
        if not self.paused and len(self.out) > self.high:
            self.paused = True
        self._update_mask()

    def get_write_buffer_size(self) -> int:
        return len(self.out)

    def close(self) -> None:
        """Stop reading; close once the buffered replies are sent (at the
        end of this event, so a reply written after close() still goes out)."""
        if not self.closing and not self.closed:
            self.closing = True
            self.loop.closing.append(self)

    def abort(self) -> None:
        """Close now, dropping what is buffered."""
        if self.closed:
            return
        self.closed = True
        self.out = bytearray()
        loop = self.loop
        loop.clients.pop(self.fd, None)
        try:
            loop.epoll.unregister(self.fd)
        except (OSError, ValueError):
            pass
        self.sock.close()
        conn = self.conn
        if conn is not None:
            loop.server.connections.pop(conn.id, None)
            conn.closing = True

    # -- the loop's side
    def _update_mask(self) -> None:
        mask = (0 if self.paused or self.closing else _IN) | (_OUT if self.out else 0)
        if mask != self.mask:
            self.mask = mask
            self.loop.epoll.modify(self.fd, mask)

    def flush(self) -> None:
        """Send what is buffered (the socket said it has room)."""
        out = self.out
        if out:
            try:
                n = _write(self.fd, out)
            except _RETRY:
                return
            except OSError:
                self.abort()
                return
            del out[:n]
        if self.paused and len(out) <= self.low:
            self.paused = False
        if self.closing and not out:
            self.abort()
            return
        self._update_mask()


class Loop:
    """Accept on ``listeners`` and serve their clients until ``stop()`` is true
    (checked whenever ``wake`` — a socket the signal handlers write to — is
    readable, and at least every second)."""

    def __init__(self, server, listeners: list, wake: socket.socket | None = None):
        self.server = server
        self.listeners = {s.fileno(): s for s in listeners}
        self.wake = wake
        self.epoll = select.epoll()
        self.clients: dict[int, Client] = {}
        self.closing: list[Client] = []  # close() called during this event
        self.accept_paused: list = []  # listeners out of descriptors, until accept_resume_at
        self.accept_resume_at = 0.0

    def accept(self, lsock: socket.socket) -> None:
        srv = self.server
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                sock, peer = lsock.accept()
            except _RETRY:  # none left, or a sibling worker took it
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("cannot accept a connection (%s); not accepting for %g s", e.strerror,
                                ACCEPT_RETRY_DELAY)
                    self.epoll.unregister(lsock.fileno())
                    self.accept_paused.append(lsock)
                    self.accept_resume_at = time.monotonic() + ACCEPT_RETRY_DELAY
                return  # ECONNABORTED & co: that one is gone
            sock.setblocking(False)
            client = Client(self, sock, min(1 << 20, srv.max_output_buffer))
            self.clients[client.fd] = client
            self.epoll.register(client.fd, _IN)
            local = sock.getsockname() if isinstance(peer, tuple) else None
            client.conn = admit(srv, client, sock, peer, local)
            self.finish_closing()

    def finish_closing(self) -> None:
        todo, self.closing = self.closing, []
        for c in todo:
            if c.out:
                c._update_mask()  # stop reading; flush() closes once it is sent
            else:
                c.abort()

    def run(self, stop) -> None:
        epoll = self.epoll
        for fd in self.listeners:
            epoll.register(fd, _IN)
        wake_fd = -1
        if self.wake is not None:
            wake_fd = self.wake.fileno()
            epoll.register(wake_fd, _IN)
        clients = self.clients
        srv = self.server
        try:
            while not stop():
                if self.accept_paused and time.monotonic() >= self.accept_resume_at:
                    for lsock in self.accept_paused:
                        epoll.register(lsock.fileno(), _IN)
                    self.accept_paused = []
                for fd, ev in epoll.poll(1.0):
                    c = clients.get(fd)
                    if c is None:
                        if fd in self.listeners:
                            self.accept(self.listeners[fd])
                        elif fd == wake_fd:
                            try:
                                self.wake.recv(4096)
                            except OSError:
                                pass
                        continue
                    try:
                        if ev & _OUT or (c.out and ev & (select.EPOLLERR | select.EPOLLHUP)):
                            c.flush()
                            if c.closed:
                                continue
                        if ev & _IN_ERR and c.mask & _IN:
                            try:
                                data = _read(fd, READ_SIZE)
                            except _RETRY:
                                continue
                            except OSError:
                                c.abort()
                                continue
                            if not data:  # the client closed its side
                                c.close()
                            else:
                                handle_read(srv, c.conn, c, data, c)
                        if self.closing:
                            self.finish_closing()
                    except Exception:  # a bug must cost one client, not the worker (handle_read has its own)
                        log.exception("closing a client after an internal error")
                        c.abort()
                        self.finish_closing()
        finally:
            for c in list(clients.values()):
                c.abort()
            epoll.close()


def run_until_signal(server, listeners: list) -> None:
    """Serve on this (main) thread until SIGTERM or SIGINT; then drop every
    client and close ``listeners``."""
    stopping = []
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    old_wake = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    old = {s: signal.signal(s, lambda *_a: stopping.append(1)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        Loop(server, listeners, wake=r).run(lambda: stopping)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(old_wake)
        r.close()
        w.close()
        for s in listeners:
            s.close()
