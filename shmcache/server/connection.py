"""One client connection: RESP framing, limits, auth, MULTI/EXEC, and the
connection and server commands (PING, HELLO, AUTH, CLIENT, INFO...).

Requests are parsed by hiredis' ``Reader`` (C); a read's replies go out in one
``transport.write``. Inline commands (telnet, ``redis-benchmark``'s inline
mode) are split here, as Redis' ``sdssplitargs`` does.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import re
import socket
import time

try:
    import hiredis
except ImportError:  # no `server` extra: Server() and serve() refuse with how to install it
    hiredis = None

from .. import admin
from . import commands as C
from .commands import COMMANDS, CommandError, OK, array, bulk, bulk_array, error, integer, mapping
from .docs import command_docs

log = logging.getLogger("shmcache.server")

_ids = itertools.count(1)

#: Commands allowed before AUTH (Redis: AUTH, HELLO, QUIT, RESET).
_NOAUTH_OK = frozenset((b"auth", b"hello", b"quit", b"reset"))
#: Commands that run at once inside MULTI instead of being queued.
_TX_CONTROL = frozenset((b"exec", b"discard", b"multi", b"watch", b"quit", b"reset"))

REDIS_VERSION = b"7.2.0"


class ProtocolFailure(Exception):
    """Malformed input: reply ``-ERR Protocol error: <msg>`` and close."""


class OutputLimit(Exception):
    """The replies to one read passed ``max_output_buffer``: drop them and
    close the client (Redis closes a client over its output buffer limit)."""


class _NotAnArray(Exception):
    """hiredis parsed a frame that is not an array (Redis would read it inline)."""


class Connection:
    """State of one client; a transport drives it through :func:`handle_read`
    (the worker's epoll loop in ``eventloop``, or the asyncio Protocol in
    ``server`` inside an application's loop)."""

    def __init__(self, server, transport, addr: str, laddr: str):
        self.server = server
        self.cache = server.cache
        self.cache_max_value = server.max_value
        self.cache_max_key = server.max_key
        self.transport = transport
        self.id = next(_ids)
        self.addr = addr
        self.laddr = laddr
        self.name = b""
        self.lib_name = b""
        self.lib_ver = b""
        self.created = time.time()
        self.last_cmd = b"NULL"
        self.resp = 2
        self.null = b"$-1\r\n"
        self.null_array = b"*-1\r\n"
        self.authed = server.password is None
        self.multi: list | None = None
        self.multi_error = False
        self.watched: dict = {}
        self.reader = hiredis.Reader()
        self.partial = 0  # bytes fed to the reader for the frame not yet complete
        self.inline = b""  # an unfinished inline command line
        self.carry = b""  # the start of a count header cut by a read
        self.prev_nl = True  # the last byte fed to the reader was a newline
        self.head = b""  # the first bytes of the frame still incomplete
        self.closing = False
        self.out_bytes = 0  # replies produced for the read being handled

    # ------------------------------------------------------------ framing
    def feed(self, data: bytes) -> bytes:
        """Parse and run everything in ``data``; the replies, concatenated.

        Raises:
            ProtocolFailure: malformed input (the caller sends ``.out``, the
                replies before it, then the error, and closes).
        """
        out: list = []
        self.out_bytes = 0
        try:
            self._feed(data, out)
        except ProtocolFailure as e:
            e.out = b"".join(out)
            raise
        return b"".join(out)

    def _feed(self, data: bytes, out: list) -> None:
        srv = self.server
        while data and not self.closing:
            if self.carry:  # a count line held back from the last read (below)
                data = self.carry + data
                self.carry = b""
                at_line = True
            else:
                at_line = self.partial == 0 or self.prev_nl  # data[0] starts a line
            if self.partial == 0:
                if self.inline or data[0] != 42:  # 42: '*'
                    data = self._inline(data, out)
                    continue
                if data.startswith(_EMPTY_MULTIBULK):
                    # "*-10" / "*0": Redis skips an empty multibulk (hiredis
                    # only knows "*-1" as a reply), checked at frame starts
                    nl = data.find(b"\n")
                    if 0 < nl < 32:
                        data = data[nl + 1 :]
                        continue
            # The regex only where a count of 7+ digits can be: a "*" past the
            # first byte, or a first count line longer than 6 characters (a
            # single unpipelined command has neither; two finds cost a
            # quarter of the search).
            if data.find(b"*", 1) >= 0 or (data[0] == 42 and not 0 <= data.find(b"\n", 0, 9)):
                big = _BIG_COUNT.search(data)
                if big is not None:
                    _check_big_counts(data, big, srv.max_multibulk, at_line)
            if data[-1] == 10:  # the usual read, whole lines: no count line cut (_OPEN_COUNT ends at the end)
                self.prev_nl = True
            else:
                tail = _OPEN_COUNT.search(data, max(0, len(data) - 24))
                if tail is not None and (data[tail.start() - 1] == 10 if tail.start() else at_line):
                    # A "*123" count line cut by the read: hold it back until its
                    # digits are complete, so the check above sees the whole
                    # count before hiredis does (it allocates the list on reading
                    # it). At most 8 bytes: 7 digits are checked above already.
                    data, self.carry = data[: tail.start()], data[tail.start() :]
                    if not data:
                        return
                self.prev_nl = data[-1] == 10
            reader = self.reader
            reader.feed(data)
            gets = reader.gets
            # Bytes of the frames completed from this read (sizes are exact
            # for every frame Redis accepts: no leading zeros): tells whether
            # the read ended between frames. (hiredis' has_data() cannot: it
            # consumes an array element by element.)
            consumed = 0
            # The common case runs inline: an authenticated client outside
            # MULTI sending a command of _FAST (GET, SET k v, INCR, MGET...)
            # with its exact arity. Everything else goes through execute().
            fast = _FAST if self.authed and self.multi is None else None
            nfast = 0
            max_mb = srv.max_multibulk
            max_bulk = srv.max_bulk_len
            max_out = srv.max_output_buffer
            digits = _DIGITS
            last = b""
            try:
                while True:
                    try:
                        req = gets()
                    except TypeError:  # a RESP3 map or set with a list for a key: not a command either
                        raise _NotAnArray from None
                    if req is False:
                        break
                    if type(req) is not list:
                        if req is None:  # "*-1"
                            consumed += 5
                            continue
                        raise _NotAnArray
                    n = len(req)
                    consumed += 3 + 5 * n + (digits[n] if n < 10000 else len(str(n)))
                    if not n:
                        continue
                    for a in req:
                        if type(a) is not bytes:
                            raise ProtocolFailure("expected '$', got '" + ("*" if type(a) is list else ":") + "'")
                        n = len(a)
                        if n > max_bulk:  # a "$N" header past a frame's first 64 bytes is first seen here
                            raise ProtocolFailure("invalid bulk length")
                        consumed += n + (digits[n] if n < 10000 else len(str(n)))
                    if len(req) > max_mb:
                        raise ProtocolFailure("invalid multibulk length")
                    if fast is not None:
                        f = fast.get(req[0])
                        if f is not None and (len(req) == f[1] or (f[1] < 0 and len(req) >= -f[1])):
                            nfast += 1
                            last = req[0]
                            try:
                                r = f[0](self, req)
                            except Exception as e:
                                r = self._failed(req[0], e)
                            out.append(r)
                            # A few bytes of GETs can ask for gigabytes of
                            # replies: bound what one read makes us hold.
                            self.out_bytes += len(r)
                            if self.out_bytes > max_out:
                                raise OutputLimit(self.out_bytes)
                            continue
                    self.execute(req, out)
                    last = b""  # execute() named it
                    if self.closing:
                        return
                    fast = _FAST if self.authed and self.multi is None else None
            except (hiredis.ProtocolError, _NotAnArray) as e:
                # A frame that does not start with '*' right after a complete
                # one: Redis decides inline or multibulk per command, so the
                # rest of the read is inline ("PING\r\n" after "*1\r\n$4\r\nPING\r\n"),
                # or an empty "*0" / "*-5" multibulk it skips. Anywhere else
                # it is a protocol error.
                rest = self._after_frames(data, consumed)
                if rest is None:
                    if type(e) is _NotAnArray:
                        raise ProtocolFailure("expected '*', got '" + chr(data[0]) + "'") from None
                    raise ProtocolFailure(_redis_wording(str(e))) from None
                self.reader = hiredis.Reader()
                self.partial = 0
                data = rest
                continue
            finally:
                if nfast:
                    srv.commands_processed += nfast
                if last:
                    self.last_cmd = last.lower()
            if consumed - self.partial == len(data):
                self.partial = 0
            else:
                self._track_partial(data, consumed)
            return

    def _after_frames(self, data: bytes, consumed: int):
        """The part of ``data`` after the ``consumed`` bytes of frames that
        hiredis completed from it, if what follows them is a command Redis
        would parse anew (inline, or an empty multibulk); else None."""
        start = consumed - self.partial  # < 0: the failing frame began in an earlier read
        if not 0 <= start < len(data):
            return None
        if data[start] != 42:
            return data[start:]
        if data[start + 1 : start + 2] == b"-" or data[start + 1 : start + 3] == b"0\r":
            nl = data.find(b"\n", start)
            if 0 < nl - start < 32 and start + (nl - start) + 1 <= len(data):  # what _feed skips
                return data[start:]
        return None

    def _track_partial(self, data: bytes, consumed: int) -> None:
        """Account for the frame left incomplete at the end of ``data`` after
        ``consumed`` bytes of complete frames: bound its size, and check the
        lengths it declares (as Redis does on reading them) where they are
        in ``data``."""
        start = consumed - self.partial  # < 0: the pending frame goes on
        if start >= len(data):
            self.partial = 0
            return
        srv = self.server
        if start >= 0:
            self.partial = len(data) - start
            self.head = data[start : start + 64]
        else:
            self.partial += len(data)
            if len(self.head) < 64:  # a header line still arriving ("*" then garbage)
                self.head += data[: 64 - len(self.head)]
        if self.head[:1] == b"*":
            _check_header(self.head, 0, srv.max_multibulk, srv.max_bulk_len)
        if self.partial > srv.max_query_buffer:
            raise ProtocolFailure(
                f"query buffer of {self.partial} bytes exceeds max-query-buffer={srv.max_query_buffer}")

    def _inline(self, data: bytes, out: list) -> bytes:
        """Run inline command lines at the head of ``data``; return the rest
        (which starts with a RESP frame, or is empty)."""
        if self.inline:
            data = self.inline + data
            self.inline = b""
        while data and data[0] != 42:
            nl = data.find(b"\n")
            if nl < 0:
                if len(data) > self.server.max_inline:
                    raise ProtocolFailure("too big inline request")
                self.inline = data
                return b""
            if nl > self.server.max_inline:
                raise ProtocolFailure("too big inline request")
            line = data[:nl]
            data = data[nl + 1 :]
            args = split_inline(line)
            if args:
                if len(args) > self.server.max_multibulk:
                    raise ProtocolFailure("invalid multibulk length")
                self.execute(args, out)
                if self.closing:
                    return b""
        return data

    # ---------------------------------------------------------- dispatch
    def execute(self, args: list, out: list) -> None:
        name = args[0].lower()
        cmd = COMMANDS.get(name)
        srv = self.server
        srv.commands_processed += 1
        if cmd is None:
            out.append(error(_unknown(args)))
            if self.multi is not None:
                self.multi_error = True
            return
        if not self.authed and name not in _NOAUTH_OK:
            out.append(b"-NOAUTH Authentication required.\r\n")
            return
        n = cmd.arity
        if (n > 0 and len(args) != n) or (n < 0 and len(args) < -n):
            out.append(error(f"ERR wrong number of arguments for '{cmd.name}' command"))
            if self.multi is not None:
                self.multi_error = True
            return
        if self.multi is not None and name not in _TX_CONTROL:
            self.multi.append((cmd, args))
            out.append(C.QUEUED)
            return
        self.last_cmd = name
        try:
            r = cmd.fn(self, args)
        except Exception as e:
            r = self._failed(name, e)
        out.append(r)
        self.out_bytes += len(r)
        if self.out_bytes > self.server.max_output_buffer:
            raise OutputLimit(self.out_bytes)

    @staticmethod
    def _failed(name: bytes, e: Exception) -> bytes:
        """The error reply for a command that raised ``e``."""
        if isinstance(e, CommandError):
            return error(str(e))
        if isinstance(e, (ValueError, TypeError)):  # e.g. a closed cache, a bad key
            return error(f"ERR {e}")
        # never let one command take the server down
        log.exception("command %r failed", name)
        return error(C.check_errors(e))

    # ------------------------------------------------------------- state
    def set_resp(self, v: int) -> None:
        self.resp = v
        self.null = b"_\r\n" if v == 3 else b"$-1\r\n"
        self.null_array = b"_\r\n" if v == 3 else b"*-1\r\n"

    def info_line(self) -> bytes:
        now = time.time()
        return (
            b"id=%d addr=%s laddr=%s fd=-1 name=%s age=%d idle=0 flags=%s db=0 sub=0 psub=0 ssub=0 "
            b"multi=%d qbuf=%d qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=%d "
            b"tot-mem=0 events=r cmd=%s user=default redir=-1 resp=%d lib-name=%s lib-ver=%s"
            % (self.id, self.addr.encode(), self.laddr.encode(), self.name, int(now - self.created),
               b"x" if self.multi is not None else b"N", -1 if self.multi is None else len(self.multi),
               self.partial, self.transport.get_write_buffer_size() if self.transport else 0,
               self.last_cmd, self.resp, self.lib_name, self.lib_ver)
        )


def admit(srv, transport, sock, peer, local):
    """A new client of ``srv`` on ``transport``: its Connection, registered;
    or None when ``max_clients`` is reached (told so, and closed)."""
    srv.connections_received += 1
    if len(srv.connections) >= srv.max_clients:
        srv.rejected += 1
        transport.write(b"-ERR max number of clients reached\r\n")
        transport.close()
        return None
    if isinstance(peer, tuple):
        addr = f"{peer[0]}:{peer[1]}"
        laddr = f"{local[0]}:{local[1]}"
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        addr = f"{srv.unix}:0"
        laddr = addr
    conn = Connection(srv, transport, addr, laddr)
    conn.kill = transport.close
    srv.connections[conn.id] = conn
    return conn


def handle_read(srv, conn, transport, data: bytes, flow) -> None:
    """Run the requests in ``data`` (one read of ``conn``'s client) and write
    their replies in one ``transport.write``. The client is closed after
    malformed input (the replies before it, then the protocol error), QUIT,
    or a bug (which costs one client, never the server); dropped when the
    replies to this read, or those it has not read (``flow.paused``: past the
    transport's high-water mark, reading stopped), pass ``max_output_buffer``."""
    replies: list = []
    conn.out_bytes = 0
    try:
        conn._feed(data, replies)  # feed() without its frame: this runs once per read
    except ProtocolFailure as e:
        transport.write(b"".join(replies) + error(f"ERR Protocol error: {e}"))
        log.info("closing client %s: protocol error: %s", conn.addr, e)
        transport.close()
        conn.closing = True
        return
    except OutputLimit as e:
        log.warning("closing client %s: the replies to one read passed max-output-buffer=%d (%s bytes)",
                    conn.addr, srv.max_output_buffer, e)
        transport.close()
        conn.closing = True
        return
    except Exception:
        log.exception("closing client %s after an internal error", conn.addr)
        transport.close()
        return
    if replies:
        transport.write(b"".join(replies))
    if conn.closing:
        transport.close()
    elif flow.paused and transport.get_write_buffer_size() > srv.max_output_buffer:
        log.warning("closing client %s: output buffer over max-output-buffer=%d", conn.addr, srv.max_output_buffer)
        transport.abort()


#: hiredis allocates an array's list when it reads the "*N" header, and
#: freeing it walks all N slots: "*3000000000" alone would stall the loop for
#: half a minute. So counts of 7+ digits are checked before hiredis sees them
#: (a C-speed regex over each read; nothing else pays). A count is taken for a
#: header when it starts a line (a value holding "\n*99999999" is the one
#: false positive, refused as a protocol error).
_BIG_COUNT = re.compile(rb"\*-?[0-9]{7,}")
_OPEN_COUNT = re.compile(rb"\*-?[0-9]*\Z")
#: "*-10" / "*0": an empty multibulk, skipped at a frame start.
_EMPTY_MULTIBULK = (b"*-", b"*0\r")


def _check_big_counts(data: bytes, m, max_mb: int, at_line: bool) -> None:
    """Refuse a count over ``max_mb`` at a line start (``at_line``: data[0] is one)."""
    while m is not None:
        p = m.start()
        if (data[p - 1] == 10 if p else at_line) and not -1 <= int(m.group()[1:]) <= max_mb:
            raise ProtocolFailure("invalid multibulk length")
        m = _BIG_COUNT.search(data, m.end())


#: Decimal digits of each length below 10000 (frame sizes, counted per argument).
_DIGITS = bytes(len(str(i)) for i in range(10000))


def _check_header(data: bytes, p: int, max_mb: int, max_bulk: int) -> None:
    """Check the multibulk count and the bulk lengths declared in the part
    of a frame that is in ``data`` (from offset ``p``)."""
    n, q = _declared(data, p, "multibulk")
    if n is None:
        return
    if n > max_mb:
        raise ProtocolFailure("invalid multibulk length")
    for _ in range(max(n, 0)):
        if q >= len(data):
            return
        if data[q] != 36:  # '$'
            raise ProtocolFailure(f"expected '$', got '{chr(data[q])}'")
        blen, q = _declared(data, q, "bulk")
        if blen is None:
            return
        if blen < 0 or blen > max_bulk:
            raise ProtocolFailure("invalid bulk length")
        q += blen + 2


def _declared(data: bytes, p: int, what: str):
    """(the length in the "*N" / "$N" line at p, offset after it), or (None, p)
    when the line is not all in ``data`` yet."""
    nl = data.find(b"\r\n", p)
    if nl < 0:
        if len(data) - p > 32:
            raise ProtocolFailure(f"too big {'mbulk' if what == 'multibulk' else 'bulk'} count string")
        return None, p
    try:
        return int(data[p + 1 : nl]), nl + 2
    except ValueError:
        raise ProtocolFailure(f"invalid {what} length") from None


def _redis_wording(msg: str) -> str:
    if "multi-bulk" in msg.lower():
        return "invalid multibulk length"
    if "bulk" in msg.lower():
        return "invalid bulk length"
    if "reply type byte" in msg:
        got = msg.split('"')[1] if '"' in msg else "?"
        return f"expected '$', got '{got}'"
    return msg


def _unknown(args) -> str:
    """Redis' unknown-command text (each quoted argument cut to 128 bytes in total)."""
    shown = ""
    for a in args[1:]:
        if len(shown) >= 128:
            break
        shown += "'" + a[: 128 - len(shown)].decode("utf-8", "replace") + "' "
    name = args[0][:128].decode("utf-8", "replace")
    return f"ERR unknown command '{name}', with args beginning with: {shown}"


_ESC = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"


def _closing_quote(line: bytes, i: int) -> int:
    """Past a closing quote, which must end the word (Redis: unbalanced otherwise)."""
    if i + 1 < len(line) and line[i + 1] not in b" \n\r\t\0":
        raise ProtocolFailure("unbalanced quotes in request")
    return i + 1


def split_inline(line: bytes) -> list:
    """Redis' sdssplitargs: words, "double quoted" with \\xHH and \\n escapes,
    'single quoted'; a closing quote must be followed by a space.

    Raises:
        ProtocolFailure: unbalanced quotes.
    """
    if b'"' not in line and b"'" not in line:
        return line.split()
    args = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \n\r\t\0":
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        inq = insq = False
        while True:
            if inq:
                if i >= n:
                    raise ProtocolFailure("unbalanced quotes in request")
                c = line[i]
                if c == 92 and i + 3 < n and line[i + 1] == ord("x") and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    cur += _ESC.get(line[i], bytes([line[i]]))
                elif c == 34:
                    i = _closing_quote(line, i)
                    break
                else:
                    cur.append(c)
            elif insq:
                if i >= n:
                    raise ProtocolFailure("unbalanced quotes in request")
                c = line[i]
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    i += 1
                    cur.append(39)
                elif c == 39:
                    i = _closing_quote(line, i)
                    break
                else:
                    cur.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in b" \n\r\t\0":
                    break
                if c == 34:
                    inq = True
                elif c == 39:
                    insq = True
                else:
                    cur.append(c)
            i += 1
        args.append(bytes(cur))


# ============================================================ the commands
def _cmd(name, arity, flags="", group="connection", summary=""):
    return C.command(name, arity, flags, group=group, summary=summary)


@_cmd("ping", -1, "fast", summary="Returns the server's liveliness response.")
def c_ping(conn, args):
    if len(args) > 2:
        raise CommandError("ERR wrong number of arguments for 'ping' command")
    return bulk(args[1]) if len(args) == 2 else b"+PONG\r\n"


@_cmd("echo", 2, "fast", summary="Returns the given string.")
def c_echo(conn, args):
    return bulk(args[1])


@_cmd("quit", -1, "fast", summary="Closes the connection.")
def c_quit(conn, args):
    conn.closing = True
    return OK


def _check_password(conn, user: bytes, password: bytes) -> bool:
    pw = conn.server.password
    if pw is None:
        return user == b"default"
    return user == b"default" and hmac.compare_digest(password, pw)


@_cmd("auth", -2, "fast", summary="Authenticates the connection.")
def c_auth(conn, args):
    if len(args) > 3:
        raise CommandError(C.SYNTAX)
    if conn.server.password is None and len(args) == 2:
        raise CommandError("ERR AUTH <password> called without any password configured for the default user. "
                           "Are you sure your configuration is correct?")
    user, pw = (b"default", args[1]) if len(args) == 2 else (args[1], args[2])
    if not _check_password(conn, user, pw):
        raise CommandError("WRONGPASS invalid username-password pair or user is disabled.")
    conn.authed = True
    return OK


@_cmd("hello", -1, "fast", summary="Handshakes with the Redis server.")
def c_hello(conn, args):
    proto = None
    if len(args) >= 2:
        try:
            proto = C.parse_int(args[1])
        except CommandError:
            raise CommandError("ERR Protocol version is not an integer or out of range") from None
        if proto not in (2, 3):
            raise CommandError("NOPROTO unsupported protocol version")
    i = 2
    name = None
    while i < len(args):
        o = args[i].upper()
        if o == b"AUTH" and i + 2 < len(args):
            if not _check_password(conn, args[i + 1], args[i + 2]):
                raise CommandError("WRONGPASS invalid username-password pair or user is disabled.")
            conn.authed = True
            i += 3
        elif o == b"SETNAME" and i + 1 < len(args):
            name = args[i + 1]
            _check_name(name)
            i += 2
        else:
            raise CommandError(f"ERR Syntax error in HELLO option '{args[i].decode('utf-8', 'replace')}'")
    if not conn.authed:
        raise CommandError("NOAUTH HELLO must be called with the client already authenticated, otherwise the "
                           "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
                           "select the RESP protocol version at the same time")
    if name is not None:
        conn.name = name
    if proto is not None:
        conn.set_resp(proto)
    return mapping(conn, [
        (bulk(b"server"), bulk(b"redis")), (bulk(b"version"), bulk(REDIS_VERSION)),
        (bulk(b"proto"), integer(conn.resp)), (bulk(b"id"), integer(conn.id)),
        (bulk(b"mode"), bulk(b"standalone")), (bulk(b"role"), bulk(b"master")),
        (bulk(b"modules"), b"*0\r\n"),
    ])


@_cmd("select", 2, "fast", summary="Changes the selected database.")
def c_select(conn, args):
    n = C.parse_int(args[1])
    if n != 0:
        raise CommandError("ERR DB index is out of range (shmcache serves one keyspace: database 0)")
    return OK


def _check_name(name: bytes, what: str = "Client names") -> None:
    """Printable ASCII without spaces, as Redis requires: CLIENT LIST is
    split on spaces and newlines, so a value holding one could forge fields
    or whole client lines."""
    if any(c <= 32 or c > 126 for c in name):
        raise CommandError(f"ERR {what} cannot contain spaces, newlines or special characters.")


@_cmd("client", -2, "", summary="A container for client connection commands.")
def c_client(conn, args):
    sub = args[1].upper()
    n = len(args)
    if sub == b"ID" and n == 2:
        return integer(conn.id)
    if sub == b"SETNAME" and n == 3:
        _check_name(args[2])
        conn.name = args[2]
        return OK
    if sub == b"GETNAME" and n == 2:
        return bulk(conn.name) if conn.name else conn.null
    if sub == b"INFO" and n == 2:
        return C.verbatim(conn, conn.info_line() + b"\n")
    if sub == b"LIST":
        return C.verbatim(conn, b"".join(c.info_line() + b"\n" for c in conn.server.connections.values()))
    if sub == b"SETINFO" and n == 4:
        attr = args[2].upper()
        if attr not in (b"LIB-NAME", b"LIB-VER"):
            raise CommandError(f"ERR Unrecognized option '{args[2].decode('utf-8', 'replace')}'")
        _check_name(args[3], args[2].decode("utf-8", "replace"))  # Redis 7.2 checks both
        if attr == b"LIB-NAME":
            conn.lib_name = args[3]
        else:
            conn.lib_ver = args[3]
        return OK
    if sub == b"KILL" and n >= 3:
        return _client_kill(conn, args)
    if sub in (b"NO-EVICT", b"NO-TOUCH") and n == 3 and args[2].upper() in (b"ON", b"OFF"):
        return OK
    if sub == b"HELP":
        return bulk_array([b"CLIENT ID", b"CLIENT SETNAME <name>", b"CLIENT GETNAME", b"CLIENT INFO",
                           b"CLIENT LIST", b"CLIENT KILL <ip:port> | ID <id> | ADDR <ip:port>",
                           b"CLIENT SETINFO LIB-NAME|LIB-VER <value>"])
    raise CommandError(f"ERR unknown subcommand or wrong number of arguments for '{args[1].decode('utf-8', 'replace')}'. "
                       "Try CLIENT HELP.")


def _client_kill(conn, args):
    """Only connections of this server process: another worker's are not ours to see."""
    conns = conn.server.connections.values()
    if len(args) == 3:
        victims = [c for c in conns if c.addr.encode() == args[2]]
        if not victims:
            raise CommandError("ERR No such client")
        for c in victims:
            c.kill()
        return OK
    victims = list(conns)
    i = 2
    skipme = True
    while i + 1 < len(args):
        o, v = args[i].upper(), args[i + 1]
        if o == b"ID":
            victims = [c for c in victims if str(c.id).encode() == v]
        elif o == b"ADDR":
            victims = [c for c in victims if c.addr.encode() == v]
        elif o == b"LADDR":
            victims = [c for c in victims if c.laddr.encode() == v]
        elif o == b"SKIPME":
            skipme = v.lower() == b"yes"
        elif o == b"USER":
            victims = [c for c in victims if v == b"default"]
        else:
            raise CommandError(C.SYNTAX)
        i += 2
    if i != len(args):
        raise CommandError(C.SYNTAX)
    if skipme:
        victims = [c for c in victims if c is not conn]
    for c in victims:
        c.kill()
    return integer(len(victims))


@_cmd("time", 1, "fast", group="server", summary="Returns the server time.")
def c_time(conn, args):
    t = time.time()
    s = int(t)
    return bulk_array([b"%d" % s, b"%d" % int((t - s) * 1e6)])


@_cmd("reset", 1, "fast", summary="Resets the connection.")
def c_reset(conn, args):
    conn.multi = None
    conn.multi_error = False
    conn.watched.clear()
    conn.name = b""
    conn.set_resp(2)
    conn.authed = conn.server.password is None
    return b"+RESET\r\n"


@_cmd("debug", -2, "", group="server", summary="A container for debugging commands.")
def c_debug(conn, args):
    sub = args[1].upper()
    if sub == b"SLEEP" and len(args) == 3:
        secs = C.parse_float(args[2])
        if secs > 0:  # blocks this worker, as it blocks Redis
            time.sleep(min(secs, 60.0))
        return OK
    raise CommandError(f"ERR unknown subcommand '{args[1].decode('utf-8', 'replace')}'. Try DEBUG HELP.")


# ------------------------------------------------------------------ COMMAND
def _key_spec(cmd) -> tuple[int, int, int]:
    """Redis' (first key, last key, step) of a command (0, 0, 0: no keys)."""
    first = 1 if cmd.pure is not None or cmd.name in (
        "mget", "mset", "msetnx", "del", "unlink", "exists", "touch", "rename", "renamenx", "copy", "lcs") else 0
    last = -1 if cmd.name in ("mget", "del", "unlink", "exists", "touch") else (
        -1 if cmd.name in ("mset", "msetnx") else (2 if cmd.name in ("rename", "renamenx", "copy", "lcs") else first))
    step = 2 if cmd.name in ("mset", "msetnx") else (1 if first else 0)
    return first, last, step


def _command_info(cmd) -> bytes:
    first, last, step = _key_spec(cmd)
    flags = array([b"+%s\r\n" % f.encode() for f in cmd.flags])
    return array([bulk(cmd.name.encode()), integer(cmd.arity), flags, integer(first), integer(last),
                  integer(step), b"*0\r\n", b"*0\r\n", b"*0\r\n", b"*0\r\n"])


@_cmd("command", -1, "", group="server", summary="Returns detailed information about all commands.")
def c_command(conn, args):
    if len(args) == 1:
        return array([_command_info(c) for c in COMMANDS.values()])
    sub = args[1].upper()
    if sub == b"COUNT":
        return integer(len(COMMANDS))
    if sub == b"LIST":
        return bulk_array([n for n in COMMANDS])
    if sub == b"INFO":
        names = args[2:] or list(COMMANDS)
        return array([_command_info(COMMANDS[n.lower()]) if n.lower() in COMMANDS else conn.null_array
                      for n in names])
    if sub == b"DOCS":
        names = [n.lower() for n in args[2:]] or list(COMMANDS)
        pairs = []
        for n in names:
            c = COMMANDS.get(n)
            if c is None:
                continue
            pairs.append((bulk(n), command_docs(conn, c)))
        return mapping(conn, pairs)
    if sub == b"GETKEYS" and len(args) >= 4:
        c = COMMANDS.get(args[2].lower())
        if c is None:
            raise CommandError("ERR Invalid command specified")
        cargs = args[2:]
        if (c.arity > 0 and len(cargs) != c.arity) or (c.arity < 0 and len(cargs) < -c.arity):
            raise CommandError("ERR Invalid number of arguments specified for command")
        first, last, step = _key_spec(c)
        if not first:
            raise CommandError("ERR The command has no key arguments")
        return bulk_array(cargs[first : (len(cargs) + last if last < 0 else last) + 1 : step])
    raise CommandError(f"ERR unknown subcommand or wrong number of arguments for '{args[1].decode('utf-8', 'replace')}'. "
                       "Try COMMAND HELP.")


# ------------------------------------------------------------- INFO, CONFIG
@_cmd("info", -1, "", group="server", summary="Returns information and statistics about the server.")
def c_info(conn, args):
    srv = conn.server
    st = conn.cache.stats()
    want = {a.lower() for a in args[1:]} or {b"default"}
    every = bool(want & {b"all", b"everything", b"default"})
    sections = []

    def section(name: bytes, lines):
        if every or name in want:
            sections.append(b"# %s\r\n" % name.capitalize() + b"".join(b"%s:%s\r\n" % (k, v) for k, v in lines))

    up = time.time() - srv.started
    section(b"server", [
        (b"redis_version", REDIS_VERSION), (b"redis_mode", b"standalone"), (b"shmcache_cache", st["name"].encode()),
        (b"shmcache_workers", b"%d" % srv.workers), (b"os", os.uname().sysname.encode()),
        (b"process_id", b"%d" % os.getpid()), (b"tcp_port", b"%d" % srv.port),
        (b"uptime_in_seconds", b"%d" % up), (b"uptime_in_days", b"%d" % (up // 86400)),
    ])
    section(b"clients", [
        (b"connected_clients", b"%d" % len(srv.connections)), (b"maxclients", b"%d" % srv.max_clients),
    ])
    section(b"memory", [
        (b"used_memory", b"%d" % st["bytes_used"]), (b"maxmemory", b"%d" % st["arena_bytes"]),
        (b"maxmemory_policy", b"allkeys-lru" if st["policy"] == "lru" else b"noeviction"),
        (b"shmcache_segment_size", b"%d" % st["size"]),
    ])
    section(b"stats", [
        (b"total_connections_received", b"%d" % srv.connections_received),
        (b"total_commands_processed", b"%d" % srv.commands_processed),
        (b"rejected_connections", b"%d" % srv.rejected),
        (b"expired_keys", b"%d" % st["expirations"]), (b"evicted_keys", b"%d" % st["evictions"]),
        (b"keyspace_hits", b"%d" % st["hits"]), (b"keyspace_misses", b"%d" % st["misses"]),
    ])
    if every or b"shmcache" in want:
        # The cache's own figures, as `stats()` / Prometheus / `shmcache top` show
        # them. Per stripe only the stripes that ever waited, one line each in
        # Redis' `cmdstat_<name>:calls=..,usec=..` shape, so INFO parsers
        # (redis-py's parse_info) read each as a dict.
        stripes = admin.stripes(conn.cache)
        section(b"shmcache", [
            (b"shmcache_stripes", b"%d" % len(stripes)),
            (b"shmcache_lock_waits", b"%d" % sum(s.lock_waits for s in stripes)),
            (b"shmcache_lock_wait_usec", b"%d" % round(sum(s.lock_wait_seconds for s in stripes) * 1e6)),
            (b"shmcache_lock_wait_max_usec", b"%d" % round(max((s.lock_wait_max_seconds for s in stripes),
                                                                default=0.0) * 1e6)),
            (b"shmcache_recoveries", b"%d" % sum(s.recoveries for s in stripes)),
        ] + [(b"lockstat_stripe%d" % s.index, b"waits=%d,usec=%d,usec_per_wait=%.2f,max_usec=%d" % (
            s.lock_waits, round(s.lock_wait_seconds * 1e6), s.lock_wait_mean_seconds * 1e6,
            round(s.lock_wait_max_seconds * 1e6))) for s in stripes if s.lock_waits])
    if st["items"] and (every or b"keyspace" in want):
        expires, left = admin.expiry_summary(conn.cache, conn.cache.clock())
        section(b"keyspace", [(b"db0", b"keys=%d,expires=%d,avg_ttl=%d" % (st["items"], expires, int(left * 1000)))])
    else:
        section(b"keyspace", [])
    return C.verbatim(conn, b"\r\n".join(sections)) if conn.resp == 3 else bulk(b"\r\n".join(sections))


def _config_values(conn) -> dict:
    srv = conn.server
    st = conn.cache.stats()
    return {
        b"maxmemory": b"%d" % st["arena_bytes"],
        b"maxmemory-policy": b"allkeys-lru" if st["policy"] == "lru" else b"noeviction",
        b"databases": b"1", b"save": b"", b"appendonly": b"no", b"timeout": b"0",
        b"maxclients": b"%d" % srv.max_clients, b"port": b"%d" % srv.port,
        b"bind": srv.bind.encode(), b"proto-max-bulk-len": b"%d" % srv.max_bulk_len,
        b"client-query-buffer-limit": b"%d" % srv.max_query_buffer,
        b"cluster-enabled": b"no", b"protected-mode": b"yes", b"notify-keyspace-events": b"",
        b"lazyfree-lazy-user-del": srv.config.get(b"lazyfree-lazy-user-del", b"no"),
        b"lazyfree-lazy-user-flush": srv.config.get(b"lazyfree-lazy-user-flush", b"no"),
    }


def _config_int(minimum: int):
    def check(conn, name: bytes, v: bytes):
        try:
            n = C.parse_int(v)
        except CommandError:
            raise CommandError("argument couldn't be parsed into an integer") from None
        if n < minimum:
            raise CommandError(f"argument must be between {minimum} and 9223372036854775807 inclusive")
        return n
    return check


def _config_fixed(conn, name: bytes, v: bytes):
    """Settings fixed by the cache or by design: their one value is accepted."""
    if v.lower() != _config_values(conn)[name]:
        raise CommandError(f"shmcache serve keeps {name.decode()} at "
                           f"'{_config_values(conn)[name].decode()}' (set by the cache / the command line)")
    return None


def _config_yesno(conn, name: bytes, v: bytes):
    if v.lower() not in (b"yes", b"no"):
        raise CommandError("argument must be 'yes' or 'no'")
    return v.lower()


#: CONFIG SET: name -> (check(conn, name, value) -> parsed, attribute of the
#: Server it sets, or None: only recorded for CONFIG GET / accepted as is).
_CONFIG_SET = {
    b"maxclients": (_config_int(1), "max_clients"),
    b"proto-max-bulk-len": (_config_int(1024 * 1024), "max_bulk_len"),  # Redis' minimum too
    b"client-query-buffer-limit": (_config_int(1024 * 1024), "max_query_buffer"),
    b"lazyfree-lazy-user-del": (_config_yesno, None),  # deletes are immediate either way
    b"lazyfree-lazy-user-flush": (_config_yesno, None),
    b"save": (_config_fixed, None), b"appendonly": (_config_fixed, None), b"timeout": (_config_fixed, None),
    b"maxmemory": (_config_fixed, None), b"maxmemory-policy": (_config_fixed, None),
    b"notify-keyspace-events": (_config_fixed, None), b"protected-mode": (_config_fixed, None),
    b"databases": (_config_fixed, None),
}


def _config_set(conn, args):
    """Redis 7's CONFIG SET: several pairs, all checked before any applies.
    Applies to the worker process this connection is served by (see README)."""
    if len(args) < 4 or len(args) % 2:
        raise CommandError("ERR wrong number of arguments for 'config|set' command")
    todo = []
    seen = set()
    for i in range(2, len(args), 2):
        name, value = args[i].lower(), args[i + 1]
        if name not in _CONFIG_SET:
            raise CommandError("ERR Unknown option or number of arguments for CONFIG SET - "
                               f"'{args[i].decode('utf-8', 'replace')}'")
        check, attr = _CONFIG_SET[name]
        try:
            if name in seen:
                raise CommandError("duplicate parameter")
            seen.add(name)
            todo.append((name, attr, check(conn, name, value)))
        except CommandError as e:
            raise CommandError(f"ERR CONFIG SET failed (possibly related to argument "
                               f"'{args[i].decode('utf-8', 'replace')}') - {e}") from None
    srv = conn.server
    for name, attr, v in todo:
        if attr is not None:
            setattr(srv, attr, v)
        elif v is not None:
            srv.config[name] = v
    return OK


@_cmd("config", -2, "", group="server", summary="A container for server configuration commands.")
def c_config(conn, args):
    sub = args[1].upper()
    if sub == b"GET" and len(args) >= 3:
        values = _config_values(conn)
        pairs = []
        for pat in args[2:]:
            m = C.glob_match(pat.lower())
            pairs += [(bulk(k), bulk(v)) for k, v in values.items() if m(k) and (bulk(k), bulk(v)) not in pairs]
        return mapping(conn, pairs)
    if sub == b"SET":
        return _config_set(conn, args)
    if sub == b"RESETSTAT" and len(args) == 2:
        return OK
    if sub == b"HELP" and len(args) == 2:
        return bulk_array([b"CONFIG GET <pattern> [<pattern> ...]", b"CONFIG SET <directive> <value> [...]",
                           b"CONFIG RESETSTAT"])
    raise CommandError(f"ERR unknown subcommand or wrong number of arguments for '{args[1].decode('utf-8', 'replace')}'. "
                       "Try CONFIG HELP.")


# ------------------------------------------------------- MULTI/EXEC/WATCH
@_cmd("multi", 1, "fast", group="transactions", summary="Starts a transaction.")
def c_multi(conn, args):
    if conn.multi is not None:
        raise CommandError("ERR MULTI calls can not be nested")
    conn.multi = []
    conn.multi_error = False
    return OK


@_cmd("discard", 1, "fast", group="transactions", summary="Discards a transaction.")
def c_discard(conn, args):
    if conn.multi is None:
        raise CommandError("ERR DISCARD without MULTI")
    conn.multi = None
    conn.watched.clear()
    return OK


@_cmd("watch", -2, "fast", group="transactions", summary="Monitors changes to keys to determine the execution of a transaction.")
def c_watch(conn, args):
    if conn.multi is not None:
        raise CommandError("ERR WATCH inside MULTI is not allowed")
    for k in args[1:]:
        if k not in conn.watched:
            conn.watched[k] = C.watch_snapshot(conn.cache, k)
    return OK


@_cmd("unwatch", 1, "fast", group="transactions", summary="Forgets about watched keys of a transaction.")
def c_unwatch(conn, args):
    conn.watched.clear()
    return OK


@_cmd("exec", 1, "", group="transactions", summary="Executes all commands in a transaction.")
def c_exec(conn, args):
    queue, conn.multi = conn.multi, None
    watched, conn.watched = conn.watched, {}
    if queue is None:
        raise CommandError("ERR EXEC without MULTI")
    if conn.multi_error:
        conn.multi_error = False
        raise CommandError("EXECABORT Transaction discarded because of previous errors.")
    key = C.single_key(queue)
    if key is not None and set(watched) <= {key}:
        replies = C.exec_single_key(conn, key, queue, watched)
        return conn.null_array if replies is None else array(replies)
    for k, snap in watched.items():  # checked before running: see README, not isolated
        if C.watch_snapshot(conn.cache, k) != snap:
            return conn.null_array
    out: list = []
    for cmd, cargs in queue:
        before = len(out)
        conn.execute(cargs, out)
        if len(out) == before:
            out.append(conn.null)
    return array(out)


@_cmd("function", -2, "", group="scripting", summary="A container for function commands (there are none).")
def c_function(conn, args):
    """No scripting: FUNCTION FLUSH succeeds (there is nothing to flush; test
    harnesses and deploy scripts send it), FUNCTION LIST is empty."""
    sub = args[1].upper()
    if sub == b"FLUSH" and (len(args) == 2 or (len(args) == 3 and args[2].upper() in (b"ASYNC", b"SYNC"))):
        return OK
    if sub == b"LIST":
        return b"*0\r\n"
    raise CommandError(f"ERR unknown subcommand or wrong number of arguments for '{args[1].decode('utf-8', 'replace')}'. "
                       "Try FUNCTION HELP.")


#: Commands run inline by _feed (name as sent, lower or upper case) ->
#: (handler, Redis arity): the ones a cache's clients send most. None of
#: them may change the connection's state (auth, MULTI, closing).
_FAST = {}
for _name in (b"get", b"set", b"setex", b"setnx", b"getset", b"mget", b"mset", b"incr", b"decr", b"incrby",
              b"decrby", b"del", b"unlink", b"exists", b"expire", b"pexpire", b"ttl", b"pttl", b"strlen",
              b"append", b"ping", b"echo", b"type"):
    _c = COMMANDS[_name]
    _FAST[_name] = _FAST[_name.upper()] = (_c.fn, _c.arity)
del _name, _c
