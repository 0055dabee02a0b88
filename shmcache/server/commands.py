"""Redis commands over the public :class:`~shmcache.Cache` API.

Every key command that reads and then writes one key is written as a pure
function of the key's stored entry, ``fn(conn, args, cur, now) -> (new,
reply)``, where ``cur`` and ``new`` are ``(tag, payload, expire)`` or None
(absent), and ``new is cur`` means "unchanged". The command runs it inside
:meth:`Cache.update_raw`, so it is atomic across processes; a MULTI/EXEC
whose commands all name one key chains those functions inside a single
``update_raw`` (see :func:`exec_single_key`). GET, plain SET, INCR/DECR and
friends take the cache's lock-free / C fast paths instead.

Type mapping (see the README): a value stored from Python as bytes or str
reads as its bytes, an int as its decimal text, a float as its shortest text;
anything pickled, a numpy array or a custom-serialized value is
``-WRONGTYPE``. RESP writes store bytes; INCR and friends store an int (so
``cache.incr`` and INCR on one key agree).
"""

from __future__ import annotations

import decimal
import math
import random
import re
import struct

from .. import codec
from ..cache import Cache
from ..errors import CacheFull, KeyTooLong, ValueTooLarge

BYTES, STR, INT, FLOAT = codec.BYTES, codec.STR, codec.INT, codec.FLOAT
_F64 = struct.Struct("<d")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_DELETE = Cache.DELETE

OK = b"+OK\r\n"
QUEUED = b"+QUEUED\r\n"
ZERO = b":0\r\n"
ONE = b":1\r\n"


class CommandError(Exception):
    """A ``-ERR ...`` reply: the message is the text after the ``-``."""


WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"
NOT_INT = "ERR value is not an integer or out of range"
NOT_FLOAT = "ERR value is not a valid float"
SYNTAX = "ERR syntax error"


# ---------------------------------------------------------------- encoding
#: "$<n>\r\n" for n < 1024: GET's reply is built by a join, not % formatting (~40% less).
_BULK_HEAD = tuple(b"$%d\r\n" % n for n in range(1024))


def bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def error(msg: str) -> bytes:
    return b"-%s\r\n" % msg.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


def array(items) -> bytes:
    """An array of already-encoded replies."""
    return b"*%d\r\n%s" % (len(items), b"".join(items))


def bulk_array(items) -> bytes:
    return b"*%d\r\n%s" % (len(items), b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in items))


def mapping(conn, pairs) -> bytes:
    """A map in RESP3, a flat array in RESP2; ``pairs`` of encoded replies."""
    if conn.resp == 3:
        return b"%%%d\r\n%s" % (len(pairs), b"".join(k + v for k, v in pairs))
    return b"*%d\r\n%s" % (2 * len(pairs), b"".join(k + v for k, v in pairs))


def verbatim(conn, text: bytes) -> bytes:
    if conn.resp == 3:
        return b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text)
    return bulk(text)


def double(conn, x: float) -> bytes:
    t = fmt_float(x)
    return b",%s\r\n" % t if conn.resp == 3 else bulk(t)


# ---------------------------------------------------------------- mapping
def key_of(b: bytes):
    """A RESP key as the Python key: str when it is UTF-8 (what Python code
    uses), else bytes. So ``SET foo`` and ``cache["foo"]`` are one key."""
    try:
        return b.decode()
    except UnicodeDecodeError:
        return b


def key_bytes(k):
    """A cache key as RESP shows it, or None for a Python bytes key that is
    valid UTF-8: RESP cannot name it apart from the str key of the same text."""
    if type(k) is str:
        return k.encode()
    try:
        k.decode()
    except UnicodeDecodeError:
        return k
    return None


def fmt_float(x: float) -> bytes:
    """Redis' human-friendly float text: no exponent, no trailing ``.0``."""
    if math.isnan(x):
        return b"nan"
    if math.isinf(x):
        return b"inf" if x > 0 else b"-inf"
    if x == int(x) and abs(x) < 1e17:
        return b"%d" % int(x)
    r = repr(x)
    if "e" in r:
        r = format(decimal.Decimal(r), "f")
    return r.encode()


def text_of(cur) -> bytes:
    """The RESP string of a stored entry; WRONGTYPE for what is not a string."""
    tag, payload, _exp = cur
    if tag == BYTES or tag == STR:
        return payload
    if tag == INT:
        return b"%d" % int.from_bytes(payload, "little", signed=True)
    if tag == FLOAT:
        return fmt_float(_F64.unpack(payload)[0])
    raise CommandError(WRONGTYPE)


TYPE_NAMES = {BYTES: b"string", STR: b"string", INT: b"string", FLOAT: b"string",
              codec.NDARRAY: b"ndarray", codec.PICKLE: b"python", codec.CUSTOM: b"python"}

_INT_RE = re.compile(rb"-?(?:0|[1-9][0-9]{0,19})\Z")
_FLOAT_RE = re.compile(rb"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity)\Z", re.I)


def parse_int(b: bytes, msg: str = NOT_INT) -> int:
    """Redis' strict integer parse (no spaces, no '+', no leading zeros, int64)."""
    if _INT_RE.match(b) is None or b == b"-0":
        raise CommandError(msg)
    n = int(b)
    if not _I64_MIN <= n <= _I64_MAX:
        raise CommandError(msg)
    return n


def parse_float(b: bytes) -> float:
    if _FLOAT_RE.match(b) is None:
        raise CommandError(NOT_FLOAT)
    return float(b)


def int_of(cur) -> int:
    """The integer an entry holds (INCR's view), or raise Redis' error."""
    tag, payload, _exp = cur
    if tag == INT:
        n = int.from_bytes(payload, "little", signed=True)
        if not _I64_MIN <= n <= _I64_MAX:
            raise CommandError(NOT_INT)
        return n
    if tag == BYTES or tag == STR:
        return parse_int(bytes(payload))
    if tag == FLOAT:
        return parse_int(fmt_float(_F64.unpack(payload)[0]))
    raise CommandError(WRONGTYPE)


def _as_int_entry(n: int, exp: float):
    return (INT, codec.encode_int(n), exp)


# ------------------------------------------------------- glob (stringmatch)
_glob_cache: dict = {}
_STAR = None


def _glob_tokens(pattern: bytes) -> list:
    """Redis' glob (``* ? [a-z] [^x] \\x``) as tokens: None for ``*``, else a
    set of the bytes one position accepts (or a frozenset to exclude)."""
    toks: list = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 42:  # *
            if not toks or toks[-1] is not _STAR:
                toks.append(_STAR)
        elif c == 63:  # ?
            toks.append(frozenset())
        elif c == 92 and i + 1 < n:  # backslash
            i += 1
            toks.append({pattern[i]})
        elif c == 91:  # [
            j = i + 1
            neg = j < n and pattern[j] == 94  # ^
            if neg:
                j += 1
            chars: set = set()
            while j < n and pattern[j] != 93:  # ]
                if pattern[j] == 92 and j + 1 < n:
                    j += 1
                    chars.add(pattern[j])
                elif j + 2 < n and pattern[j + 1] == 45 and pattern[j + 2] != 93:  # a-z
                    a, z = sorted((pattern[j], pattern[j + 2]))
                    chars.update(range(a, z + 1))
                    j += 2
                else:
                    chars.add(pattern[j])
                j += 1
            toks.append(frozenset(chars) if neg else chars)
            i = j
        else:
            toks.append({c})
        i += 1
    return toks


def _match_tokens(toks: list, s: bytes) -> bool:
    """Wildcard match that backtracks only to the last ``*``: O(len(s) *
    len(toks)) at worst. (A translated regex backtracks exponentially on
    ``a*a*a*...b``, which Redis' own tests send: that would stall a worker.)"""
    p = i = 0
    star = -1
    mark = 0
    n, m = len(s), len(toks)
    while i < n:
        if p < m and toks[p] is not _STAR and (s[i] not in toks[p] if type(toks[p]) is frozenset else s[i] in toks[p]):
            p += 1
            i += 1
        elif p < m and toks[p] is _STAR:
            star = p
            mark = i
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            i = mark
        else:
            return False
    while p < m and toks[p] is _STAR:
        p += 1
    return p == m


def glob_match(pattern: bytes):
    """A matcher (``m(key) -> bool``) for Redis' glob patterns on bytes."""
    m = _glob_cache.get(pattern)
    if m is not None:
        return m
    toks = _glob_tokens(pattern)
    if all(type(t) is set and len(t) == 1 for t in toks if t is not _STAR) and toks.count(_STAR) <= 1:
        # literal text around at most one star: plain bytes operations
        lit = [b"" if t is _STAR else bytes(t) for t in toks]
        if _STAR not in toks:
            whole = b"".join(lit)
            m = whole.__eq__
        else:
            k = toks.index(_STAR)
            head, tail = b"".join(lit[:k]), b"".join(lit[k + 1:])
            m = lambda s: len(s) >= len(head) + len(tail) and s.startswith(head) and s.endswith(tail)  # noqa: E731
    else:
        m = lambda s: _match_tokens(toks, s)  # noqa: E731
    if len(_glob_cache) > 256:
        _glob_cache.clear()
    _glob_cache[pattern] = m
    return m


# ------------------------------------------------------------ the registry
class Command:
    """One command: handler, Redis arity (n exact, -n at least n), flags,
    and ``pure`` for single-key read-modify-write commands (see module doc)."""

    __slots__ = ("name", "fn", "arity", "flags", "pure", "group", "summary")

    def __init__(self, name, fn, arity, flags, pure, group, summary):
        self.name, self.fn, self.arity, self.flags = name, fn, arity, flags
        self.pure, self.group, self.summary = pure, group, summary


COMMANDS: dict[bytes, Command] = {}


def command(name: str, arity: int, flags: str = "", group: str = "string", summary: str = "", pure=None):
    def deco(fn):
        COMMANDS[name.encode()] = Command(name, fn, arity, tuple(flags.split()), pure, group, summary)
        return fn

    return deco


def keyed(name: str, arity: int, flags: str = "write", group: str = "string", summary: str = ""):
    """Register a pure single-key command; its handler runs it in update_raw."""

    def deco(pure):
        def run(conn, args):
            return run_pure(conn.cache, pure, conn, args)

        COMMANDS[name.encode()] = Command(name, run, arity, tuple(flags.split()), pure, group, summary)
        return pure

    return deco


def run_pure(cache, pure, conn, args) -> bytes:
    reply = []

    def fn(cur):
        new, r = pure(conn, args, cur, cache.clock())
        reply.append(r)
        if new is cur:
            return None
        return _DELETE if new is None else new

    cache.update_raw(key_of(args[1]), fn)
    return reply[0]


def _deadline_from(unit_ms: bool, absolute: bool, n: int, now: float, cmd: str) -> float:
    """An absolute deadline (seconds on the cache clock) from EX/PX/EXAT/PXAT."""
    if n <= 0 and not absolute:
        raise CommandError(f"ERR invalid expire time in '{cmd}' command")
    if absolute and n <= 0:
        raise CommandError(f"ERR invalid expire time in '{cmd}' command")
    ms = n if unit_ms else n * 1000
    if ms > _I64_MAX - int(now * 1000):
        raise CommandError(f"ERR invalid expire time in '{cmd}' command")
    return ms / 1000.0 if absolute else now + ms / 1000.0


# ------------------------------------------------------------------ strings
@command("get", 2, "readonly fast", summary="Returns the string value of a key.")
def c_get(conn, args):
    cur = conn.cache.get_raw(key_of(args[1]))
    if cur is None:
        return conn.null
    tag = cur[0]
    if tag == BYTES or tag == STR:
        v = cur[1]
        n = len(v)
        return b"".join((_BULK_HEAD[n], v, b"\r\n")) if n < 1024 else b"$%d\r\n%s\r\n" % (n, v)
    return bulk(text_of(cur))


def p_get(conn, args, cur, now):
    return cur, (conn.null if cur is None else bulk(text_of(cur)))


COMMANDS[b"get"].pure = p_get


def _set_options(args, now):
    """Parse SET's options: (mode, deadline or None=no change, keepttl, get)."""
    mode = None
    deadline = 0.0
    keepttl = get = False
    expiry_seen = False
    i = 3
    n = len(args)
    while i < n:
        o = args[i].upper()
        if o == b"NX" and mode is None:
            mode = "nx"
        elif o == b"XX" and mode is None:
            mode = "xx"
        elif o == b"GET":
            get = True
        elif o == b"KEEPTTL" and not expiry_seen:
            keepttl = expiry_seen = True
        elif o in (b"EX", b"PX", b"EXAT", b"PXAT") and not expiry_seen and i + 1 < n:
            expiry_seen = True
            i += 1
            v = parse_int(args[i])
            deadline = _deadline_from(o in (b"PX", b"PXAT"), o in (b"EXAT", b"PXAT"), v, now, "set")
        else:
            raise CommandError(SYNTAX)
        i += 1
    return mode, deadline, keepttl, get


def p_set(conn, args, cur, now):
    mode, deadline, keepttl, get = _set_options(args, now)
    old = None
    if get and cur is not None:
        old = bulk(text_of(cur))  # WRONGTYPE before anything changes, as Redis
    ok = not ((mode == "nx" and cur is not None) or (mode == "xx" and cur is None))
    if ok:
        exp = cur[2] if (keepttl and cur is not None) else deadline
        new = (BYTES, args[2], exp) if not (exp and exp <= now) else None
    else:
        new = cur
    if get:
        return new, (old if old is not None else conn.null)
    return new, (OK if ok else conn.null)


@command("set", -3, "write", summary="Sets the string value of a key, ignoring its type.")
def c_set(conn, args):
    cache = conn.cache
    if len(args) == 3:
        cache.set(key_of(args[1]), args[2], None)
        return OK
    if len(args) == 5:  # SET k v EX n / PX n: the fast path, no read needed
        o = args[3].upper()
        if o == b"EX" or o == b"PX":
            n = parse_int(args[4])
            if n <= 0 or n > 10**15:
                raise CommandError("ERR invalid expire time in 'set' command")
            cache.set(key_of(args[1]), args[2], n / 1000.0 if o == b"PX" else float(n))
            return OK
    return run_pure(cache, p_set, conn, args)


COMMANDS[b"set"].pure = p_set


@keyed("setnx", 3, summary="Set the string value of a key only when the key doesn't exist.")
def p_setnx(conn, args, cur, now):
    if cur is not None:
        return cur, ZERO
    return (BYTES, args[2], 0.0), ONE


def _p_setex(unit_ms, name):
    def p(conn, args, cur, now):
        n = parse_int(args[2])
        exp = _deadline_from(unit_ms, False, n, now, name)
        return (BYTES, args[3], exp), OK

    return p


keyed("setex", 4, summary="Sets the string value and expiration time of a key.")(_p_setex(False, "setex"))
keyed("psetex", 4, summary="Sets the string value and expiration time in milliseconds of a key.")(
    _p_setex(True, "psetex"))


@keyed("getset", 3, summary="Returns the previous string value of a key after setting it to a new value.")
def p_getset(conn, args, cur, now):
    old = conn.null if cur is None else bulk(text_of(cur))
    return (BYTES, args[2], 0.0), old


@keyed("getdel", 2, summary="Returns the string value of a key after deleting the key.")
def p_getdel(conn, args, cur, now):
    if cur is None:
        return cur, conn.null
    return None, bulk(text_of(cur))


@keyed("getex", -2, summary="Returns the string value of a key after setting its expiration time.")
def p_getex(conn, args, cur, now):
    deadline = None
    i, n = 2, len(args)
    while i < n:
        o = args[i].upper()
        if o == b"PERSIST" and deadline is None:
            deadline = 0.0
        elif o in (b"EX", b"PX", b"EXAT", b"PXAT") and deadline is None and i + 1 < n:
            i += 1
            deadline = _deadline_from(o in (b"PX", b"PXAT"), o in (b"EXAT", b"PXAT"), parse_int(args[i]), now, "getex")
        else:
            raise CommandError(SYNTAX)
        i += 1
    if cur is None:
        return cur, conn.null
    reply = bulk(text_of(cur))
    if deadline is None or deadline == cur[2]:
        return cur, reply
    if deadline and deadline <= now:
        return None, reply
    return (cur[0], cur[1], deadline), reply


@command("mget", -2, "readonly fast", summary="Atomically returns the string values of one or more keys.")
def c_mget(conn, args):
    null = conn.null
    out = []
    for cur in conn.cache.get_raw_many([key_of(k) for k in args[1:]]):
        if cur is None:
            out.append(null)
            continue
        tag = cur[0]
        if tag == BYTES or tag == STR:
            v = cur[1]
            out.append(b"$%d\r\n%s\r\n" % (len(v), v))
        elif tag == INT or tag == FLOAT:
            out.append(bulk(text_of(cur)))
        else:
            out.append(null)  # Redis: MGET gives nil for a key of another type
    return b"*%d\r\n%s" % (len(out), b"".join(out))


@command("mset", -3, "write", summary="Atomically creates or modifies the string values of one or more keys.")
def c_mset(conn, args):
    """Each key through the cache's C ``set`` (atomic per key, as ``set_many``;
    ``set_many``'s batch path is Python and ~30x slower per key). Every key and
    value is checked against the cache's limits first, so a bad pair stores
    nothing: then ``set_many`` runs only to raise the cache's own error."""
    n = len(args)
    if n % 2 == 0:
        raise CommandError("ERR wrong number of arguments for 'mset' command")
    max_key, max_value = conn.cache_max_key, conn.cache_max_value
    pairs = []
    for i in range(1, n, 2):
        k, v = key_of(args[i]), args[i + 1]
        if len(args[i]) + (type(k) is bytes) > max_key or len(v) > max_value:
            conn.cache.set_many(dict(pairs + [(k, v)]), ttl=None)  # raises KeyTooLong / ValueTooLarge
        pairs.append((k, v))
    cset = conn.cache.set
    for k, v in pairs:
        cset(k, v, None)
    return OK


@command("msetnx", -3, "write", summary="Sets the string values of keys only when none of them exist.")
def c_msetnx(conn, args):
    if len(args) % 2 == 0:
        raise CommandError("ERR wrong number of arguments for 'msetnx' command")
    cache = conn.cache
    pairs = {key_of(args[i]): args[i + 1] for i in range(1, len(args), 2)}
    if any(k in cache for k in pairs):
        return ZERO
    done = []
    for k, v in pairs.items():
        if not cache.add(k, v, ttl=None):  # lost a race with another writer: undo ours
            for d in done:
                cache.update_raw(d, lambda cur, v=pairs[d]: _DELETE if cur is not None and cur[0] == BYTES and cur[1] == v else None)
            return ZERO
        done.append(k)
    return ONE


def _text_tag(cur):
    """The tag a string edit (APPEND, SETRANGE) keeps: str stays str if still UTF-8."""
    return STR if cur is not None and cur[0] == STR else BYTES


def _edited(cur, data: bytes, now):
    tag = _text_tag(cur)
    if tag == STR:
        try:
            data.decode()
        except UnicodeDecodeError:
            tag = BYTES
    return (tag, data, cur[2] if cur is not None else 0.0)


@keyed("append", 3, summary="Appends a string to the value of a key. Creates the key if it doesn't exist.")
def p_append(conn, args, cur, now):
    data = (text_of(cur) if cur is not None else b"") + args[2]
    _check_size(conn, len(data))
    return _edited(cur, data, now), integer(len(data))


def _check_size(conn, n):
    if n > conn.cache_max_value:
        raise CommandError("ERR string exceeds maximum allowed size (max_value_size)")


@command("strlen", 2, "readonly fast", summary="Returns the length of a string value.")
def c_strlen(conn, args):
    cur = conn.cache.get_raw(key_of(args[1]))
    return ZERO if cur is None else integer(len(text_of(cur)))


def p_strlen(conn, args, cur, now):
    return cur, (ZERO if cur is None else integer(len(text_of(cur))))


COMMANDS[b"strlen"].pure = p_strlen


def _getrange(text: bytes, start: int, end: int) -> bytes:
    n = len(text)
    if start < 0 and end < 0 and start > end:
        return b""
    if start < 0:
        start = max(n + start, 0)
    if end < 0:
        end = max(n + end, 0)
    end = min(end, n - 1)
    if start > end or n == 0:
        return b""
    return text[start : end + 1]


def p_getrange(conn, args, cur, now):
    start, end = parse_int(args[2]), parse_int(args[3])
    if cur is None:
        return cur, bulk(b"")
    return cur, bulk(_getrange(text_of(cur), start, end))


@command("getrange", 4, "readonly", summary="Returns a substring of the string stored at a key.")
def c_getrange(conn, args):
    start, end = parse_int(args[2]), parse_int(args[3])
    cur = conn.cache.get_raw(key_of(args[1]))
    return bulk(b"") if cur is None else bulk(_getrange(text_of(cur), start, end))


COMMANDS[b"getrange"].pure = p_getrange
COMMANDS[b"substr"] = Command("substr", c_getrange, 4, ("readonly",), p_getrange, "string",
                              "Returns a substring from a string value.")


@keyed("setrange", 4, summary="Overwrites a part of a string value with another by an offset.")
def p_setrange(conn, args, cur, now):
    off = parse_int(args[2])
    if off < 0:
        raise CommandError("ERR offset is out of range")
    value = args[3]
    text = text_of(cur) if cur is not None else b""
    if not value:
        return cur, integer(len(text))
    _check_size(conn, off + len(value))
    if len(text) < off:
        text = text + bytes(off - len(text))
    data = text[:off] + value + text[off + len(value):]
    return _edited(cur, data, now), integer(len(data))


# ------------------------------------------------------------------- bits
_BIT_OFFSET = "ERR bit offset is not an integer or out of range"


def _bit_offset(conn, b: bytes) -> int:
    """Redis' getBitOffsetFromArgument: 0 <= offset, offset / 8 < proto-max-bulk-len."""
    off = parse_int(b, _BIT_OFFSET)
    if off < 0 or (off >> 3) >= conn.server.max_bulk_len:
        raise CommandError(_BIT_OFFSET)
    return off


@keyed("setbit", 4, "write", group="bitmap", summary="Sets or clears the bit at offset of the string value. Creates the key if it doesn't exist.")
def p_setbit(conn, args, cur, now):
    off = _bit_offset(conn, args[2])
    bit = parse_int(args[3], "ERR bit is not an integer or out of range")
    if bit & ~1:
        raise CommandError("ERR bit is not an integer or out of range")
    text = text_of(cur) if cur is not None else b""
    byte, mask = off >> 3, 0x80 >> (off & 7)
    if byte >= len(text):
        _check_size(conn, byte + 1)
        data = bytearray(text)
        data.extend(bytes(byte + 1 - len(text)))
    else:
        data = bytearray(text)
    old = 1 if data[byte] & mask else 0
    if bit:
        data[byte] |= mask
    else:
        data[byte] &= ~mask & 0xFF
    if cur is not None and bytes(data) == text:
        return cur, integer(old)
    return _edited(cur, bytes(data), now), integer(old)


def p_getbit(conn, args, cur, now):
    off = _bit_offset(conn, args[2])
    if cur is None:
        return cur, ZERO
    text = text_of(cur)
    byte = off >> 3
    return cur, (ONE if byte < len(text) and text[byte] & (0x80 >> (off & 7)) else ZERO)


def p_bitcount(conn, args, cur, now):
    """Redis 7.2's BITCOUNT: the arguments are checked before the key."""
    n = len(args)
    if n == 2:
        if cur is None:
            return cur, ZERO
        return cur, integer(int.from_bytes(text_of(cur), "big").bit_count())
    if n not in (4, 5):
        raise CommandError(SYNTAX)
    start, end = parse_int(args[2]), parse_int(args[3])
    isbit = False
    if n == 5:
        unit = args[4].upper()
        if unit not in (b"BIT", b"BYTE"):
            raise CommandError(SYNTAX)
        isbit = unit == b"BIT"
    if cur is None:
        return cur, ZERO
    text = text_of(cur)
    total = len(text) * 8 if isbit else len(text)
    if start < 0 and end < 0 and start > end:
        return cur, ZERO
    if start < 0:
        start = max(total + start, 0)
    if end < 0:
        end = max(total + end, 0)
    end = min(end, total - 1)
    if start > end:
        return cur, ZERO
    if not isbit:
        return cur, integer(int.from_bytes(text[start : end + 1], "big").bit_count())
    chunk = int.from_bytes(text[start >> 3 : (end >> 3) + 1], "big")
    chunk >>= 7 - (end & 7)  # drop the bits after ``end`` in its byte
    return cur, integer((chunk & ((1 << (end - start + 1)) - 1)).bit_count())


def _lcs_table(a: bytes, b: bytes):
    """The LCS length table, ``L[i, j]`` = LCS of a[:i] and b[:j], built one
    row of numpy per byte of the shorter string (the DP step along a row is a
    running maximum: row = maximum.accumulate(prev[j-1] + 1 where a[i-1] ==
    b[j-1], else prev[j]))."""
    import numpy as np

    swap = len(a) > len(b)
    x, y = (b, a) if swap else (a, b)  # one row per byte of the shorter string
    yv = np.frombuffer(y, dtype=np.uint8)
    t = np.zeros((len(x) + 1, len(y) + 1), dtype=np.uint32)
    for i in range(1, len(x) + 1):
        prev = t[i - 1]
        cand = np.where(yv == x[i - 1], prev[:-1] + 1, prev[1:])
        np.maximum.accumulate(cand, out=t[i, 1:])
    return t.T if swap else t


@command("lcs", -3, "readonly", summary="Finds the longest common substring.")
def c_lcs(conn, args):
    """Redis 7's LCS, its dynamic programming table and its walk back (so
    IDX lists the same ranges in the same order)."""
    cache = conn.cache
    ca, cb = cache.get_raw(key_of(args[1])), cache.get_raw(key_of(args[2]))
    try:
        a = b"" if ca is None else bytes(text_of(ca))
        b = b"" if cb is None else bytes(text_of(cb))
    except CommandError:
        raise CommandError("ERR The specified keys must contain string values") from None
    getlen = getidx = withmatchlen = False
    minmatchlen = 0
    i = 3
    while i < len(args):
        o = args[i].upper()
        if o == b"IDX":
            getidx = True
        elif o == b"LEN":
            getlen = True
        elif o == b"WITHMATCHLEN":
            withmatchlen = True
        elif o == b"MINMATCHLEN" and i + 1 < len(args):
            minmatchlen = max(parse_int(args[i + 1]), 0)
            i += 1
        else:
            raise CommandError(SYNTAX)
        i += 1
    if getidx and getlen:
        raise CommandError("ERR If you want both the length and indexes, please just use IDX.")
    if (len(a) + 1) * (len(b) + 1) * 4 > conn.server.max_bulk_len:
        raise CommandError("ERR Insufficient memory, transient memory for LCS exceeds proto-max-bulk-len")
    t = _lcs_table(a, b)
    alen, blen = len(a), len(b)
    idx = int(t[alen, blen])
    if getlen:
        return integer(idx)
    result = bytearray(idx)
    ranges = []
    ast, aend, bst, bend = alen, 0, 0, 0  # ast == alen: no range open
    i, j = alen, blen
    while i > 0 and j > 0:
        emit = False
        if a[i - 1] == b[j - 1]:
            result[idx - 1] = a[i - 1]
            if ast == alen:
                ast = aend = i - 1
                bst = bend = j - 1
            elif ast == i and bst == j:
                ast -= 1
                bst -= 1
            else:
                emit = True
            if ast == 0 or bst == 0:
                emit = True
            idx -= 1
            i -= 1
            j -= 1
        else:
            if t[i - 1, j] > t[i, j - 1]:
                i -= 1
            else:
                j -= 1
            if ast != alen:
                emit = True
        if emit:
            mlen = aend - ast + 1
            if minmatchlen == 0 or mlen >= minmatchlen:
                ranges.append(array([array([integer(ast), integer(aend)]), array([integer(bst), integer(bend)])]
                                    + ([integer(mlen)] if withmatchlen else [])))
            ast = alen
    if getidx:
        return mapping(conn, [(bulk(b"matches"), array(ranges)), (bulk(b"len"), integer(int(t[alen, blen])))])
    return bulk(bytes(result))


# INCR & co: the cache's atomic incr (C fast path) when the key holds an int
# or nothing; a key holding decimal text (SET from RESP) goes through
# update_raw, which parses and stores it back as an int.
def _incr(conn, key_b: bytes, delta: int) -> bytes:
    cache = conn.cache
    key = key_of(key_b)
    try:
        n = cache.incr(key, delta, default=0, ttl=None)
    except TypeError:
        return run_pure(cache, _p_incr_by(delta), conn, [b"incrby", key_b])
    if not _I64_MIN <= n <= _I64_MAX:
        cache.incr(key, -delta, default=0, ttl=None)  # put back what overflowed
        raise CommandError("ERR increment or decrement would overflow")
    return b":%d\r\n" % n


def _p_incr_by(delta):
    def p(conn, args, cur, now):
        old = 0 if cur is None else int_of(cur)
        n = old + delta
        if not _I64_MIN <= n <= _I64_MAX:
            raise CommandError("ERR increment or decrement would overflow")
        return _as_int_entry(n, cur[2] if cur is not None else 0.0), integer(n)

    return p


_P_INCR, _P_DECR = _p_incr_by(1), _p_incr_by(-1)


@command("incr", 2, "write fast", summary="Increments the integer value of a key by one.")
def c_incr(conn, args):
    return _incr(conn, args[1], 1)


@command("decr", 2, "write fast", summary="Decrements the integer value of a key by one.")
def c_decr(conn, args):
    return _incr(conn, args[1], -1)


@command("incrby", 3, "write fast", summary="Increments the integer value of a key by a number.")
def c_incrby(conn, args):
    return _incr(conn, args[1], parse_int(args[2]))


@command("decrby", 3, "write fast", summary="Decrements a number from the integer value of a key.")
def c_decrby(conn, args):
    d = parse_int(args[2])
    if d == _I64_MIN:
        raise CommandError("ERR decrement would overflow")
    return _incr(conn, args[1], -d)


COMMANDS[b"incr"].pure = lambda conn, args, cur, now: _P_INCR(conn, args, cur, now)
COMMANDS[b"decr"].pure = lambda conn, args, cur, now: _P_DECR(conn, args, cur, now)
COMMANDS[b"incrby"].pure = lambda conn, args, cur, now: _p_incr_by(parse_int(args[2]))(conn, args, cur, now)


def _p_decrby(conn, args, cur, now):
    d = parse_int(args[2])
    if d == _I64_MIN:
        raise CommandError("ERR decrement would overflow")
    return _p_incr_by(-d)(conn, args, cur, now)


COMMANDS[b"decrby"].pure = _p_decrby


@keyed("incrbyfloat", 3, summary="Increment the floating point value of a key by a number.")
def p_incrbyfloat(conn, args, cur, now):
    d = parse_float(args[2])
    if cur is None:
        old = 0.0
    elif cur[0] == FLOAT:
        old = _F64.unpack(cur[1])[0]
    else:
        old = parse_float(bytes(text_of(cur)))
    n = old + d
    if math.isnan(n) or math.isinf(n):
        raise CommandError("ERR increment would produce NaN or Infinity")
    text = fmt_float(n)
    exp = cur[2] if cur is not None else 0.0
    new = (FLOAT, _F64.pack(n), exp) if cur is not None and cur[0] == FLOAT else (BYTES, text, exp)
    return new, bulk(text)


# ----------------------------------------------------------------- keyspace
def _list_keys(keys):
    out = []
    for k in keys:
        b = key_bytes(k)
        if b is not None:
            out.append(b)
    return out


@command("del", -2, "write", group="generic", summary="Deletes one or more keys.")
def c_del(conn, args):
    cache = conn.cache
    if len(args) == 2:
        return ONE if cache.delete(key_of(args[1])) else ZERO
    return integer(cache.delete_many([key_of(k) for k in args[1:]]))


def p_del(conn, args, cur, now):
    return None, (ZERO if cur is None else ONE)


COMMANDS[b"del"].pure = p_del
COMMANDS[b"unlink"] = Command("unlink", c_del, -2, ("write", "fast"), p_del, "generic",
                              "Asynchronously deletes one or more keys.")


@command("exists", -2, "readonly fast", group="generic", summary="Determines whether one or more keys exist.")
def c_exists(conn, args):
    cache = conn.cache
    return integer(sum(1 for k in args[1:] if key_of(k) in cache))


def p_exists(conn, args, cur, now):
    return cur, (ZERO if cur is None else ONE)


COMMANDS[b"exists"].pure = p_exists


@command("touch", -2, "readonly fast", group="generic",
         summary="Returns the number of existing keys out of those specified after updating the time they were last accessed.")
def c_touch(conn, args):
    get = conn.cache.get_raw  # a read refreshes the LRU clock
    return integer(sum(1 for k in args[1:] if get(key_of(k)) is not None))


COMMANDS[b"touch"].pure = p_exists


@command("type", 2, "readonly fast", group="generic", summary="Determines the type of value stored at a key.")
def c_type(conn, args):
    cur = conn.cache.get_raw(key_of(args[1]))
    return b"+%s\r\n" % (b"none" if cur is None else TYPE_NAMES.get(cur[0], b"none"))


COMMANDS[b"type"].pure = lambda conn, args, cur, now: (cur, c_type_of(cur))


def c_type_of(cur):
    return b"+%s\r\n" % (b"none" if cur is None else TYPE_NAMES.get(cur[0], b"none"))


@command("keys", 2, "readonly", group="generic", summary="Returns all key names that match a pattern.")
def c_keys(conn, args):
    pat = args[1]
    keys = _list_keys(conn.cache.keys())
    if pat != b"*":
        m = glob_match(pat)
        keys = [k for k in keys if m(k)]
    return bulk_array(keys)


@command("scan", -2, "readonly", group="generic", summary="Iterates over the key names in the database.")
def c_scan(conn, args):
    try:
        cursor = int(args[1]) if args[1].isdigit() else -1
    except ValueError:
        cursor = -1
    if cursor < 0:
        raise CommandError("ERR invalid cursor")
    count, match, typ = 10, None, None
    i = 2
    while i < len(args):
        o = args[i].upper()
        if i + 1 >= len(args):
            raise CommandError(SYNTAX)
        if o == b"COUNT":
            count = parse_int(args[i + 1])
            if count < 1:
                raise CommandError(SYNTAX)
        elif o == b"MATCH":
            match = glob_match(args[i + 1]) if args[i + 1] != b"*" else None
        elif o == b"TYPE":
            typ = args[i + 1].lower()
        else:
            raise CommandError(SYNTAX)
        i += 2
    cache = conn.cache
    try:
        nxt, keys = cache.scan(cursor, count)
    except ValueError:
        raise CommandError("ERR invalid cursor") from None
    out = _list_keys(keys)
    if match is not None:
        out = [k for k in out if match(k)]
    if typ is not None:
        kept = []
        for k in out:
            cur = cache.get_raw(key_of(k))
            if cur is not None and TYPE_NAMES.get(cur[0]) == typ:
                kept.append(k)
        out = kept
    return b"*2\r\n" + bulk(b"%d" % nxt) + bulk_array(out)


@command("randomkey", 1, "readonly", group="generic", summary="Returns a random key name from the database.")
def c_randomkey(conn, args):
    """Uniform over the keys when there are at most 1000; beyond, the first
    key at or after a random SCAN position (one stripe read, not the whole
    keyspace; a key after a wide hash gap is likelier, as a sampled pick is)."""
    cache = conn.cache
    if len(cache) <= 1000:
        keys = _list_keys(cache.keys())
        return bulk(random.choice(keys)) if keys else conn.null
    stripes = conn.server.stripes
    for cursor in (random.randrange(stripes << 32) + 1, 0):
        while True:
            cursor, keys = cache.scan(cursor, 1)
            keys = _list_keys(keys)
            if keys:
                return bulk(random.choice(keys))
            if cursor == 0:
                break
    return conn.null


@command("dbsize", 1, "readonly fast", group="server", summary="Returns the number of keys in the database.")
def c_dbsize(conn, args):
    return integer(len(conn.cache))


def _flush(conn, args):
    if len(args) > 2 or (len(args) == 2 and args[1].upper() not in (b"ASYNC", b"SYNC")):
        raise CommandError(SYNTAX)
    conn.cache.clear()
    return OK


COMMANDS[b"flushdb"] = Command("flushdb", _flush, -1, ("write",), None, "server", "Removes all keys from the current database.")
COMMANDS[b"flushall"] = Command("flushall", _flush, -1, ("write",), None, "server", "Removes all keys from all databases.")


def _move(conn, src_b, dst_b, *, nx: bool, replace: bool = True, delete_src: bool = True):
    """RENAME/RENAMENX/COPY: read src, write dst (only if absent when not
    ``replace``), then delete src if it is still what was copied. Each step is
    atomic; the move as a whole is not (see README)."""
    cache = conn.cache
    src, dst = key_of(src_b), key_of(dst_b)
    cur = cache.get_raw(src)
    if cur is None:
        return None
    if src_b == dst_b:
        return not nx and delete_src
    entry = (cur[0], bytes(cur[1]), cur[2])
    stored = []

    def put(d):
        if d is not None and not replace:
            return None
        stored.append(True)
        return entry

    cache.update_raw(dst, put)
    if not stored:
        return False
    if delete_src:
        cache.update_raw(src, lambda c: _DELETE if c is not None and (c[0], bytes(c[1]), c[2]) == entry else None)
    return True


@command("rename", 3, "write", group="generic", summary="Renames a key and overwrites the destination.")
def c_rename(conn, args):
    r = _move(conn, args[1], args[2], nx=False)
    if r is None:
        raise CommandError("ERR no such key")
    return OK


@command("renamenx", 3, "write fast", group="generic", summary="Renames a key only when the target key name doesn't exist.")
def c_renamenx(conn, args):
    if conn.cache.get_raw(key_of(args[1])) is None:
        raise CommandError("ERR no such key")
    if args[1] == args[2]:
        return ZERO
    r = _move(conn, args[1], args[2], nx=True, replace=False)
    if r is None:
        raise CommandError("ERR no such key")
    return ONE if r else ZERO


@command("copy", -3, "write", group="generic", summary="Copies the value of a key to a new key.")
def c_copy(conn, args):
    replace = False
    i = 3
    while i < len(args):
        o = args[i].upper()
        if o == b"REPLACE":
            replace = True
        elif o == b"DB" and i + 1 < len(args):
            i += 1
            if parse_int(args[i]) != 0:
                raise CommandError("ERR DB index is out of range")
        else:
            raise CommandError(SYNTAX)
        i += 1
    if args[1] == args[2]:
        raise CommandError("ERR source and destination objects are the same")
    r = _move(conn, args[1], args[2], nx=not replace, replace=replace, delete_src=False)
    return ONE if r else ZERO


# --------------------------------------------------------------------- TTLs
def _p_expire(unit_ms: bool, absolute: bool, name: str):
    def p(conn, args, cur, now):
        n = parse_int(args[2])
        flags = set()
        for o in args[3:]:
            o = o.upper()
            if o not in (b"NX", b"XX", b"GT", b"LT"):
                raise CommandError(f"ERR Unsupported option {o.decode('utf-8', 'replace')}")
            flags.add(o)
        if b"NX" in flags and (len(flags) > 1):
            raise CommandError("ERR NX and XX, GT or LT options at the same time are not compatible")
        if b"GT" in flags and b"LT" in flags:
            raise CommandError("ERR GT and LT options at the same time are not compatible")
        ms = n if unit_ms else n * 1000
        base = 0 if absolute else int(now * 1000)
        if (not unit_ms and not -(2**63 // 1000) <= n <= _I64_MAX // 1000) or ms > _I64_MAX - base:  # C truncation
            raise CommandError(f"ERR invalid expire time in '{name}' command")
        deadline = (base + ms) / 1000.0
        if cur is None:
            return cur, ZERO
        old = cur[2]  # 0: no expiry, which GT/LT treat as infinite
        if b"NX" in flags and old:
            return cur, ZERO
        if b"XX" in flags and not old:
            return cur, ZERO
        if b"GT" in flags and (not old or deadline <= old):
            return cur, ZERO
        if b"LT" in flags and old and deadline >= old:
            return cur, ZERO
        if deadline <= now:
            return None, ONE
        return (cur[0], cur[1], deadline), ONE

    return p


for _n, _ms, _abs, _s in (("expire", False, False, "Sets the expiration time of a key in seconds."),
                          ("pexpire", True, False, "Sets the expiration time of a key in milliseconds."),
                          ("expireat", False, True, "Sets the expiration time of a key to a Unix timestamp."),
                          ("pexpireat", True, True, "Sets the expiration time of a key to a Unix milliseconds timestamp.")):
    keyed(_n, -3, "write fast", group="generic", summary=_s)(_p_expire(_ms, _abs, _n))


def _p_ttl(ms: bool, absolute: bool):
    def p(conn, args, cur, now):
        if cur is None:
            return cur, b":-2\r\n"
        exp = cur[2]
        if not exp:
            return cur, b":-1\r\n"
        if absolute:
            return cur, integer(int(round(exp * 1000)) if ms else int(exp))
        left = max(0, int(round((exp - now) * 1000)))
        return cur, integer(left if ms else (left + 500) // 1000)

    return p


def _reader(pure):
    def run(conn, args):
        cache = conn.cache
        cur = cache.get_raw(key_of(args[1]))
        return pure(conn, args, cur, cache.clock())[1]

    return run


for _n, _ms, _abs, _s in (("ttl", False, False, "Returns the expiration time in seconds of a key."),
                          ("pttl", True, False, "Returns the expiration time in milliseconds of a key."),
                          ("expiretime", False, True, "Returns the expiration time of a key as a Unix timestamp."),
                          ("pexpiretime", True, True, "Returns the expiration time of a key as a Unix milliseconds timestamp.")):
    _p = _p_ttl(_ms, _abs)
    COMMANDS[_n.encode()] = Command(_n, _reader(_p), 2, ("readonly", "fast"), _p, "generic", _s)


COMMANDS[b"getbit"] = Command("getbit", _reader(p_getbit), 3, ("readonly", "fast"), p_getbit, "bitmap",
                              "Returns a bit value by offset.")
COMMANDS[b"bitcount"] = Command("bitcount", _reader(p_bitcount), -2, ("readonly",), p_bitcount, "bitmap",
                                "Counts the number of set bits (population counting) in a string.")


@keyed("persist", 2, "write fast", group="generic", summary="Removes the expiration time of a key.")
def p_persist(conn, args, cur, now):
    if cur is None or not cur[2]:
        return cur, ZERO
    return (cur[0], cur[1], 0.0), ONE


@command("object", -2, "readonly", group="generic", summary="A container for object introspection commands.")
def c_object(conn, args):
    sub = args[1].upper()
    if sub == b"ENCODING" and len(args) == 3:
        cur = conn.cache.get_raw(key_of(args[2]))
        if cur is None:
            return conn.null
        tag = cur[0]
        if tag == INT:
            return bulk(b"int")
        if tag in (BYTES, STR, FLOAT):
            t = text_of(cur)
            return bulk(b"int" if _INT_RE.match(t) and len(t) <= 20 and t != b"-0" else b"embstr" if len(t) <= 44 else b"raw")
        return bulk(TYPE_NAMES.get(tag, b"none"))
    if sub == b"HELP":
        return bulk_array([b"OBJECT ENCODING <key>"])
    raise CommandError(f"ERR unknown subcommand or wrong number of arguments for '{args[1].decode('utf-8', 'replace')}'. Try OBJECT HELP.")


# ------------------------------------------------- MULTI/EXEC on one key
#: Commands a single-key transaction may chain inside one update_raw.
def single_key(queue) -> bytes | None:
    """The one key every queued command names, if each is a pure single-key
    command (DEL/EXISTS/TOUCH/UNLINK with one key count); else None."""
    key = None
    for cmd, args in queue:
        if cmd.pure is None or len(args) < 2:
            return None
        if cmd.arity < 0 and cmd.name in ("del", "unlink", "exists", "touch") and len(args) != 2:
            return None
        if key is None:
            key = args[1]
        elif args[1] != key:
            return None
    return key


def exec_single_key(conn, key_b: bytes, queue, watched):
    """Run a transaction on one key atomically: every command, and the WATCH
    check, inside one update_raw (one stripe lock hold). Returns the replies,
    or None if a watched key changed."""
    cache = conn.cache
    replies: list = []
    aborted = []

    def fn(cur):
        replies.clear()
        if watched and _snap(cur) != watched.get(key_b, _snap(cur)):
            aborted.append(True)
            return None
        now = cache.clock()
        state = cur
        for cmd, args in queue:
            try:
                state, r = cmd.pure(conn, args, state, now)
            except CommandError as e:
                r = error(str(e))
            replies.append(r)
        if state is cur:
            return None
        return _DELETE if state is None else state

    cache.update_raw(key_of(key_b), fn)
    return None if aborted else replies


def _snap(cur):
    return None if cur is None else (cur[0], bytes(cur[1]), cur[2])


def watch_snapshot(cache, key_b: bytes):
    return _snap(cache.get_raw(key_of(key_b)))


def check_errors(exc) -> str:
    """Redis' wording for the cache's own exceptions."""
    if isinstance(exc, CacheFull):
        return f"OOM command not allowed when used memory > 'maxmemory'. ({exc})"
    if isinstance(exc, (KeyTooLong, ValueTooLarge)):
        return f"ERR {exc}"
    return f"ERR {type(exc).__name__}: {exc}"

