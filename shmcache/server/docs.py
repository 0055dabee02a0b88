"""What ``COMMAND DOCS`` says of each command: its syntax, the version of
Redis that introduced it, and the subcommands of the container commands.

redis-cli builds its ``help`` and its as-you-type hints from ``COMMAND DOCS``
whenever the server answers it (the table compiled into it is used only when
the server does not), so a command documented without its arguments has no
hint at all. Each syntax is kept here as the one line Redis' documentation
prints (``key value [NX|XX] [GET]``) and turned into Redis' argument maps
(name, type, token, flags, nested arguments) by :func:`parse`; redis-cli
renders those maps back into the same line.
"""

from __future__ import annotations

import re

from .commands import array, bulk, mapping

#: command -> (since, syntax). Containers have their subcommands in SUBCOMMANDS.
SYNTAX = {
    "get": ("1.0.0", "key"),
    "set": ("1.0.0", "key value [NX|XX] [GET] [EX seconds|PX milliseconds|EXAT unix-time-seconds|"
                     "PXAT unix-time-milliseconds|KEEPTTL]"),
    "setnx": ("1.0.0", "key value"),
    "setex": ("2.0.0", "key seconds value"),
    "psetex": ("2.6.0", "key milliseconds value"),
    "getset": ("1.0.0", "key value"),
    "getdel": ("6.2.0", "key"),
    "getex": ("6.2.0", "key [EX seconds|PX milliseconds|EXAT unix-time-seconds|PXAT unix-time-milliseconds|PERSIST]"),
    "mget": ("1.0.0", "key [key ...]"),
    "mset": ("1.0.1", "key value [key value ...]"),
    "msetnx": ("1.0.1", "key value [key value ...]"),
    "append": ("2.0.0", "key value"),
    "strlen": ("2.2.0", "key"),
    "getrange": ("2.4.0", "key start end"),
    "substr": ("1.0.0", "key start end"),
    "setrange": ("2.2.0", "key offset value"),
    "setbit": ("2.2.0", "key offset value"),
    "getbit": ("2.2.0", "key offset"),
    "bitcount": ("2.6.0", "key [start end [BYTE|BIT]]"),
    "lcs": ("7.0.0", "key1 key2 [LEN] [IDX] [MINMATCHLEN min-match-len] [WITHMATCHLEN]"),
    "incr": ("1.0.0", "key"),
    "decr": ("1.0.0", "key"),
    "incrby": ("1.0.0", "key increment"),
    "decrby": ("1.0.0", "key decrement"),
    "incrbyfloat": ("2.6.0", "key increment"),
    "del": ("1.0.0", "key [key ...]"),
    "unlink": ("4.0.0", "key [key ...]"),
    "exists": ("1.0.0", "key [key ...]"),
    "touch": ("3.2.1", "key [key ...]"),
    "type": ("1.0.0", "key"),
    "keys": ("1.0.0", "pattern"),
    "scan": ("2.8.0", "cursor [MATCH pattern] [COUNT count] [TYPE type]"),
    "randomkey": ("1.0.0", ""),
    "dbsize": ("1.0.0", ""),
    "flushdb": ("1.0.0", "[ASYNC|SYNC]"),
    "flushall": ("1.0.0", "[ASYNC|SYNC]"),
    "rename": ("1.0.0", "key newkey"),
    "renamenx": ("1.0.0", "key newkey"),
    "copy": ("6.2.0", "source destination [DB destination-db] [REPLACE]"),
    "expire": ("1.0.0", "key seconds [NX|XX|GT|LT]"),
    "pexpire": ("2.6.0", "key milliseconds [NX|XX|GT|LT]"),
    "expireat": ("1.2.0", "key unix-time-seconds [NX|XX|GT|LT]"),
    "pexpireat": ("2.6.0", "key unix-time-milliseconds [NX|XX|GT|LT]"),
    "ttl": ("1.0.0", "key"),
    "pttl": ("2.6.0", "key"),
    "expiretime": ("7.0.0", "key"),
    "pexpiretime": ("7.0.0", "key"),
    "persist": ("2.2.0", "key"),
    "ping": ("1.0.0", "[message]"),
    "echo": ("1.0.0", "message"),
    "quit": ("1.0.0", ""),
    "hello": ("6.0.0", "[protover [AUTH username password] [SETNAME clientname]]"),
    "auth": ("1.0.0", "[username] password"),
    "select": ("1.0.0", "index"),
    "time": ("2.6.0", ""),
    "reset": ("6.2.0", ""),
    "debug": ("1.0.0", "SLEEP seconds"),
    "info": ("1.0.0", "[section [section ...]]"),
    "multi": ("1.2.0", ""),
    "exec": ("1.2.0", ""),
    "discard": ("2.0.0", ""),
    "watch": ("2.2.0", "key [key ...]"),
    "unwatch": ("2.2.0", ""),
    "client": ("2.4.0", None),
    "command": ("2.8.13", ""),
    "config": ("2.0.0", None),
    "object": ("2.2.3", None),
    "function": ("7.0.0", None),
}

#: container -> subcommand -> (since, syntax, summary)
SUBCOMMANDS = {
    "client": {
        "id": ("5.0.0", "", "Returns the unique client ID of the connection."),
        "setname": ("2.6.9", "connection-name", "Sets the connection name."),
        "getname": ("2.6.9", "", "Returns the name of the connection."),
        "info": ("6.2.0", "", "Returns information about the connection."),
        "list": ("2.4.0", "[TYPE NORMAL|MASTER|REPLICA|PUBSUB] [ID client-id [client-id ...]]",
                 "Lists open connections (of the worker serving this one)."),
        "kill": ("2.4.0", "ip:port|[ID client-id] [ADDR ip:port] [LADDR ip:port] [USER username] [SKIPME yes|no]",
                 "Terminates open connections (of the worker serving this one)."),
        "setinfo": ("7.2.0", "LIB-NAME libname|LIB-VER libver", "Sets information specific to the client or connection."),
        "no-evict": ("7.0.0", "ON|OFF", "Accepted; eviction follows the cache's policy."),
        "no-touch": ("7.2.0", "ON|OFF", "Accepted; reads update the access bit as usual."),
    },
    "command": {
        "count": ("2.8.13", "", "Returns a count of commands."),
        "info": ("2.8.13", "[command-name [command-name ...]]", "Returns information about one, multiple or all commands."),
        "docs": ("7.0.0", "[command-name [command-name ...]]", "Returns documentary information about one, multiple or all commands."),
        "list": ("7.0.0", "", "Returns a list of command names."),
        "getkeys": ("2.8.13", "command [arg [arg ...]]", "Extracts the key names from an arbitrary command."),
    },
    "config": {
        "get": ("2.0.0", "parameter [parameter ...]", "Returns the effective values of configuration parameters."),
        "set": ("2.0.0", "parameter value [parameter value ...]", "Sets configuration parameters in-flight."),
        "resetstat": ("2.0.0", "", "Resets the server's statistics (accepted; the cache's counters are kept)."),
    },
    "object": {
        "encoding": ("2.2.3", "key", "Returns the internal encoding of a value's text."),
    },
    "function": {
        "flush": ("7.0.0", "[ASYNC|SYNC]", "Deletes all libraries (there are none)."),
        "list": ("7.0.0", "[LIBRARYNAME library-name-pattern] [WITHCODE]", "Returns information about all libraries (none)."),
    },
}

_TOKENS = re.compile(r"\[|\]|\.\.\.|\|| |[^\s\[\]|]+")
#: Argument names that Redis types other than "string".
_TYPES = {"key": "key", "key1": "key", "key2": "key", "source": "key", "destination": "key", "newkey": "key",
          "pattern": "pattern", "seconds": "integer", "milliseconds": "integer", "start": "integer",
          "end": "integer", "offset": "integer", "increment": "integer", "decrement": "integer",
          "cursor": "integer", "count": "integer", "index": "integer", "protover": "integer",
          "unix-time-seconds": "unix-time", "unix-time-milliseconds": "unix-time", "min-match-len": "integer",
          "destination-db": "integer", "client-id": "integer"}


def parse(syntax: str) -> list[dict]:
    """Redis' argument maps for a syntax line: ``key [key ...]`` is one
    ``key`` with the flag ``multiple``, ``[EX seconds|KEEPTTL]`` an optional
    ``oneof`` of a token with a value and a pure token, ``ON|OFF`` one
    ``oneof``.

    Raises:
        ValueError: unbalanced brackets (a typo in the tables above).
    """
    toks = [t for t in _TOKENS.findall(syntax) if t != " "]
    alts = []
    i = 0
    while True:
        args, i = _seq(toks, i)
        alts.append(args)
        if i < len(toks) and toks[i] == "|":
            i += 1
            continue
        break
    if i != len(toks):
        raise ValueError(f"unbalanced syntax: {syntax!r}")
    return alts[0] if len(alts) == 1 else [_one(alts)]


def _seq(toks: list, i: int) -> tuple[list, int]:
    """Arguments up to a closing ``]``, ``|`` or ``...`` (not consumed)."""
    out: list = []
    while i < len(toks) and toks[i] not in ("]", "|", "..."):
        t = toks[i]
        if t == "[":
            inner, j = _seq(toks, i + 1)
            if j < len(toks) and toks[j] == "...":  # "[key value ...]" repeats what precedes it
                n = len(inner)
                if n == 0 or n > len(out) or j + 1 >= len(toks) or toks[j + 1] != "]":
                    raise ValueError("'...' must close a repetition")
                rep = out[-n:] if n > 1 else None
                if rep is None:
                    out[-1]["flags"] = out[-1].get("flags", []) + ["multiple"]
                else:
                    del out[-n:]
                    out.append({"name": "data", "type": "block", "flags": ["multiple"], "arguments": rep})
                i = j + 2
                continue
            alts = [inner]
            while j < len(toks) and toks[j] == "|":
                more, j = _seq(toks, j + 1)
                alts.append(more)
            if j >= len(toks) or toks[j] != "]":
                raise ValueError("unclosed '['")
            arg = _one(alts)
            arg["flags"] = arg.get("flags", []) + ["optional"]
            out.append(arg)
            i = j + 1
            continue
        if t.isupper() and i + 1 < len(toks) and toks[i + 1] not in ("[", "]", "|", "...") \
                and not toks[i + 1].isupper():
            value = toks[i + 1]
            out.append({"name": value, "type": _TYPES.get(value, "string"), "token": t})
            i += 2
            continue
        if t.isupper():
            out.append({"name": t.lower(), "type": "pure-token", "token": t})
        else:
            out.append({"name": t, "type": _TYPES.get(t, "string")})
        i += 1
    return out, i


def _one(alts: list) -> dict:
    """One argument from alternatives (each a list of arguments)."""
    items = [a[0] if len(a) == 1 else {"name": "block", "type": "block", "arguments": a} for a in alts]
    if len(items) == 1:
        return items[0]
    return {"name": "choice", "type": "oneof", "arguments": items}


def render(args: list, sep: str = " ") -> str:
    """The line redis-cli prints for argument maps (its cliConcatArguments):
    what :func:`parse` was given, for the tables above."""
    parts = []
    for a in args:
        t = a["type"]
        token = a.get("token", "")
        if t == "oneof":
            rep = render(a["arguments"], "|")
        elif t == "block":
            rep = render(a["arguments"], " ")
        elif t == "pure-token":
            rep = ""
        else:
            rep = a["name"]
        s = (token + " " if token and t != "pure-token" else token) + rep
        if "multiple" in a.get("flags", ()):
            s += " [" + rep + " ...]"
        if "optional" in a.get("flags", ()):
            s = "[" + s + "]"
        parts.append(s)
    return sep.join(parts)


def _encode_arg(conn, a: dict) -> bytes:
    pairs = [(bulk(b"name"), bulk(a["name"].encode())), (bulk(b"type"), bulk(a["type"].encode()))]
    if "token" in a:
        pairs.append((bulk(b"token"), bulk(a["token"].encode())))
    if a.get("flags"):
        pairs.append((bulk(b"flags"), array([b"+%s\r\n" % f.encode() for f in a["flags"]])))
    if "arguments" in a:
        pairs.append((bulk(b"arguments"), array([_encode_arg(conn, x) for x in a["arguments"]])))
    return mapping(conn, pairs)


def _doc(conn, since: str, syntax: str | None, summary: str, group: str, subs: dict | None = None,
         parent: str = "") -> bytes:
    pairs = [(bulk(b"summary"), bulk(summary.encode())), (bulk(b"since"), bulk(since.encode())),
             (bulk(b"group"), bulk(group.encode()))]
    if syntax:
        pairs.append((bulk(b"arguments"), array([_encode_arg(conn, a) for a in parse(syntax)])))
    if subs:
        pairs.append((bulk(b"subcommands"), mapping(conn, [
            (bulk(f"{parent}|{name}".encode()), _doc(conn, s_since, s_syntax, s_summary, group))
            for name, (s_since, s_syntax, s_summary) in subs.items()])))
    return mapping(conn, pairs)


def command_docs(conn, cmd) -> bytes:
    """The ``COMMAND DOCS`` map of one command (a Command of the table)."""
    since, syntax = SYNTAX.get(cmd.name, ("1.0.0", None))
    return _doc(conn, since, syntax, cmd.summary, cmd.group, SUBCOMMANDS.get(cmd.name), cmd.name)
