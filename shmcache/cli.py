"""The ``shmcache`` command: run the daemon, inspect and edit caches, snapshots, the demo.

Every subcommand takes ``-n/--name`` (default: ``$SHMCACHE_NAME``). Errors are
one line ``shmcache: <what went wrong>`` on stderr and exit status 1; add
``--debug`` (before the subcommand) for the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

from . import __version__, admin
from . import layout as L
from ._durations import MAX_SECONDS, check_seconds
from .cache import Cache
from .errors import CacheNotFound, Error, PermissionDenied, SettingsIgnored, UntrustedSegment

NAME_ENV = "SHMCACHE_NAME"
#: Inspection commands attach whatever the mode (the owner check still holds).
ANY_MODE = 0o777


class CliError(Exception):
    """A user-facing failure: printed as ``shmcache: <message>``, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 1, like every other error
        sys.stderr.write(f"shmcache: {message} (see '{self.prog} --help')\n")
        raise SystemExit(1)


# ----------------------------------------------------------------- helpers
def _seconds(zero_ok: bool):
    """An argparse type: a finite number of seconds (0 too if ``zero_ok``) up
    to MAX_SECONDS. NaN compares false with every deadline: a wait with a NaN
    --timeout never ended, and inf or 1e300 overflowed a sleep."""

    def parse(text: str) -> float:
        try:
            return check_seconds("seconds", float(text), maximum=MAX_SECONDS, zero_ok=zero_ok)
        except ValueError:  # not a number, or out of range: one wording for both
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds: it must be finite, "
                f"{'0 or more' if zero_ok else 'more than 0'} and at most {MAX_SECONDS:g}") from None

    parse.__name__ = "seconds"  # argparse names the type in its messages
    return parse


def _mib(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024**3:.2f} GiB"


def _name(args) -> str:
    name = args.name or os.environ.get(NAME_ENV)
    if not name:
        raise CliError(f"no cache name: give -n NAME (or set {NAME_ENV})")
    L.validate_name(name)
    return name


def _attach(args) -> Cache:
    # Inspection accepts any mode: the owner check still applies, and values
    # are unpickled only from a cache nobody else can write (see Cache's allow_pickle).
    with warnings.catch_warnings():  # ANY_MODE is a limit here, not a setting that was ignored
        warnings.simplefilter("ignore", SettingsIgnored)
        return Cache(_name(args), create=False, mode=ANY_MODE, owner=getattr(args, "owner", None))


def _serving_daemon(args, name: str) -> tuple[int | None, int | None]:
    """(pid as the daemon sees itself, pid in this PID namespace) of the daemon
    serving cache ``name`` (the kernel's answer: it holds the daemon lock);
    (None, None) if none runs; (pid, None) if it runs in a PID namespace this
    process cannot see.

    Raises:
        CacheNotFound, PermissionDenied, shmcache.Error: as admin.summarize.
    """
    s = admin.summarize(name, owner=getattr(args, "owner", None))
    return s.daemon_pid, s.daemon_local_pid


def _not_visible(pid: int, name: str, do: str) -> CliError:
    """The error for a daemon this command cannot signal: it runs in another
    PID namespace (a sidecar container), where ``pid`` names it; here that
    number is some other process (pid 1 is this container's init)."""
    return CliError(f"daemon pid {pid} of cache {name!r} runs in another PID namespace (another container), "
                    f"where this command cannot signal it; {do}")


def _octal_mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise CliError(f"--mode {text!r} is not octal permission bits like 600 or 660") from None


def _stop_daemon(args, pid: int, local: int | None, name: str, timeout: float) -> None:
    """SIGTERM the daemon of cache ``name`` (``pid`` as it sees itself, ``local``
    in this PID namespace) and wait until it released the daemon lock.

    Raises:
        CliError: it runs in a PID namespace this process cannot see, or it is
            still running after ``timeout`` seconds (nothing is removed either way).
    """
    if local is None:
        raise _not_visible(pid, name, "stop it there first; nothing was removed")
    pid = local
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _serving_daemon(args, name)[1] == pid:
        if time.monotonic() > deadline:
            raise CliError(f"daemon pid {pid} of cache {name!r} did not stop within {timeout:g} s of SIGTERM; "
                           "nothing was removed")
        time.sleep(0.02)
    print(f"stopped daemon pid {pid} of cache {name!r}")


def _parse_value(text: str, kind: str):
    if kind == "str":
        return text
    if kind == "bytes":
        return text.encode()
    try:
        if kind == "int":
            return int(text, 0)
        if kind == "float":
            return float(text)
        if kind == "json":
            return json.loads(text)
    except ValueError as e:
        raise CliError(f"value {text!r} is not a valid {kind}: {e}") from None
    raise CliError(f"unknown value type {kind!r}")  # pragma: no cover - argparse checks choices


def _show_key(k) -> str:
    return k if isinstance(k, str) else repr(k)


#: Values `shmcache set` stores as an int when no --type is given.
_DECIMAL = re.compile(r"[+-]?[0-9]+")


def _print_json(obj) -> None:
    """One JSON document on stdout (what every ``--json`` prints)."""
    print(json.dumps(obj, indent=2, sort_keys=True))


def _jsonable(v):
    """``v`` as JSON can carry it: bytes as {"bytes": text with escapes}, numpy arrays as lists,
    anything else JSON cannot hold as its repr."""
    if isinstance(v, bytes):
        return {"bytes": v.decode("utf-8", "backslashreplace")}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {k: _jsonable(x) for k, x in v.items()}
    if hasattr(v, "tolist"):
        return v.tolist()
    return {"repr": repr(v)}


# --------------------------------------------------------------- commands
def cmd_daemon(args) -> int:
    """``shmcache daemon``: run the daemon in this process until SIGTERM/SIGINT (see shmcache.daemon)."""
    from .daemon import serve

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s shmcache[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    resp = _start_resp_child(args) if args.serve is not None else None
    try:
        return _daemon_serve(serve, args)
    finally:
        if resp is not None:
            _stop(resp, timeout=10)


#: The daemon's upstream when neither --upstream nor --upstream-file is given
#: (an environment is private to its user; a command line is not: ps shows it).
UPSTREAM_ENV = "SHMCACHE_UPSTREAM"


def _upstream(args) -> str | None:
    """The Redis URL the daemon tracks: --upstream, the first line of
    --upstream-file (no group/other access), or $SHMCACHE_UPSTREAM."""
    from urllib.parse import urlparse

    if args.upstream and args.upstream_file:
        raise CliError("give either --upstream or --upstream-file, not both")
    if args.upstream_file:
        path = args.upstream_file
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise CliError(f"--upstream-file {path!r} is not a regular file")
                if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                    raise CliError(f"--upstream-file {path!r} is accessible by group/others "
                                   f"(mode {oct(st.st_mode & 0o777)}); chmod 600 it")
                url = f.readline(8192).decode("utf-8", "replace").strip()
        except OSError as e:
            raise CliError(f"cannot read --upstream-file {path!r}: {e.strerror}") from None
        if not url:
            raise CliError(f"--upstream-file {path!r} is empty")
        return url
    if args.upstream:
        try:
            has_password = bool(urlparse(args.upstream).password)
        except ValueError:
            has_password = False
        if has_password:
            logging.getLogger("shmcache.daemon").warning(
                "the --upstream URL carries a password, which every user on this host can read in ps "
                "(/proc/PID/cmdline): pass it in --upstream-file FILE (mode 600) or $%s instead", UPSTREAM_ENV)
        return args.upstream
    return os.environ.get(UPSTREAM_ENV) or None


def _start_resp_child(args) -> subprocess.Popen:
    """``daemon --serve PORT``: a ``shmcache serve`` process beside the daemon,
    stopped with it (and by the kernel if the daemon is SIGKILLed)."""
    cmd = [sys.executable, "-m", "shmcache", "serve", "--name", _name(args),
           "--port", str(args.serve), "--log-level", args.log_level]
    if args.size is not None:  # the daemon created the cache already; only a size said outright is compared
        cmd += ["--size", str(args.size)]
    for flag in ("bind", "unix", "workers", "requirepass_file"):
        v = getattr(args, flag)
        if v is not None and v is not False:
            cmd += ["--" + flag.replace("_", "-"), str(v)]
    if args.unix_mode != "600":
        cmd += ["--unix-mode", args.unix_mode]
    for k in _SERVE_LIMITS:
        if getattr(args, k) is not None:
            cmd += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    env = dict(os.environ)
    if args.requirepass is not None:  # through the environment: not visible in ps
        env["SHMCACHE_REQUIREPASS"] = args.requirepass
    from ._pdeathsig import die_with_parent

    return subprocess.Popen(cmd, env=env, preexec_fn=functools.partial(die_with_parent, os.getpid()))


def _daemon_serve(serve, args) -> int:
    return serve(
        _name(args),
        size=args.size,
        stripes=args.stripes,
        max_items=args.max_items,
        mode=_octal_mode(args.mode) if args.mode else None,
        owner=args.owner,
        snapshot=args.snapshot,
        snapshot_every=args.snapshot_every,
        expire_every=args.expire_every,
        recover_every=args.recover_every,
        restore=not args.no_restore,
        metrics=args.metrics,
        upstream=_upstream(args),
        track_prefixes=args.track_prefix or (),
        track_ping=args.track_ping,
        track_nice=args.track_nice or None,
    )


def cmd_serve(args) -> int:
    """``shmcache serve``: a Redis-protocol endpoint over the cache (see shmcache.server)."""
    from .server import serve

    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s shmcache-serve[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    limits = {k: getattr(args, k) for k in _SERVE_LIMITS if getattr(args, k) is not None}
    return serve(
        _name(args), size=args.size, host=args.bind or "127.0.0.1", bind_explicit=args.bind is not None,
        port=None if args.no_tcp else args.port, unix=args.unix, unix_mode=int(args.unix_mode, 8),
        workers=args.workers, password=args.requirepass or os.environ.get("SHMCACHE_REQUIREPASS") or None,
        password_file=args.requirepass_file, **limits,
    )


_SERVE_LIMITS = ("max_bulk_len", "max_multibulk", "max_query_buffer", "max_output_buffer", "max_clients")


def _serve_parser(p: argparse.ArgumentParser, port_flag: str = "--port") -> argparse.ArgumentParser:
    """Options of ``shmcache serve`` (also ``daemon --serve``)."""
    if port_flag == "--port":
        p.add_argument("--port", type=int, default=6380,
                       help="TCP port (default 6380; 0: pick a free one, logged at start)")
        p.add_argument("--no-tcp", action="store_true", help="listen on the --unix socket only")
    p.add_argument("--bind", help="address to listen on (default 127.0.0.1; a non-loopback address "
                                  "must be given here explicitly)")
    p.add_argument("--unix", metavar="PATH", help="also listen on this unix socket")
    p.add_argument("--unix-mode", default="600", help="permission bits (octal) of the unix socket (default 600)")
    p.add_argument("--workers", type=int, default=1, help="server processes sharing the port (SO_REUSEPORT; default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--requirepass", metavar="PASSWORD", help="require AUTH with this password (visible in "
                                                             "ps: prefer --requirepass-file or $SHMCACHE_REQUIREPASS)")
    g.add_argument("--requirepass-file", metavar="FILE", help="require AUTH with the first line of FILE (mode 600)")
    for k in _SERVE_LIMITS:
        a = p.add_argument("--" + k.replace("_", "-"), type=int, metavar="N",
                           help="per-client limit (default %(limit_default)s)")
        a.limit_default = _ServeDefault(k)  # argparse formats help with the action's attributes
    return p


class _ServeDefault:
    """A limit's default, looked up only when help is printed: importing the
    RESP server (hiredis, hmac, ...) to build the parser made every command
    slower, and failed for a process that dropped privileges and can no
    longer read the interpreter's library (the CLI run as another user)."""

    def __init__(self, k: str):
        self.k = k

    def __str__(self) -> str:
        from .server import LIMIT_DEFAULTS

        return str(LIMIT_DEFAULTS[self.k])


def cmd_stats(args) -> int:
    """``shmcache stats``: print the cache's counters as a table or JSON."""
    from .near import read_stats as near_stats

    with _attach(args) as c:
        st = c.stats()
        near = near_stats(c)
        # the daemon's pid here; the header's is its own view (1 in a sidecar container)
        st["daemon_local_pid"] = admin.daemon_info(c).local_pid
    if near is not None:
        st["near"] = near
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    fill = st["stripe_fill"]
    if st["daemon_alive"]:
        age = st["daemon_heartbeat_age"]
        who = f"pid {st['daemon_local_pid']}" if st["daemon_local_pid"] else \
            f"pid {st['daemon_pid']} in another PID namespace"
        daemon = f"{who}, alive, last heartbeat {age:.2f} s ago" if age is not None else f"{who}, alive"
    elif st["daemon_pid"]:
        daemon = f"not running (last was pid {st['daemon_pid']})"
    else:
        daemon = "not running"
    rows = [
        ("cache", st["name"]),
        ("size", f"{_mib(st['size'])} ({st['stripes']} stripes, layout v{st['layout_version']}, "
                 f"policy {st['policy']})"),
        ("items", f"{st['items']:,} of {st['max_items']:,} max"),
        ("memory", f"{_mib(st['bytes_used'])} used, {_mib(st['bytes_free'])} free, "
                   f"{_mib(st['bytes_garbage'])} garbage"),
        ("hits", f"{st['hits']:,}"),
        ("misses", f"{st['misses']:,}"),
        ("hit rate", f"{100 * st['hit_rate']:.1f}%"),
        ("sets", f"{st['sets']:,}"),
        ("deletes", f"{st['deletes']:,}"),
        ("evictions", f"{st['evictions']:,}"),
        ("expirations", f"{st['expirations']:,}"),
        ("stripe fill", f"min {100 * min(fill):.0f}% / mean {100 * sum(fill) / len(fill):.0f}% / "
                        f"max {100 * max(fill):.0f}%"),
        ("clients", f"{st['clients']} (this command included)"),
        ("recoveries", f"{st['recoveries']}"),
        ("lock waits", f"{st['lock_waits']:,}, {st['lock_wait_seconds']:.3f} s in all, longest "
                       f"{_us(st['lock_wait_max_seconds'] or None)}"),
        ("generation", f"{st['generation']}"),
        ("daemon", daemon),
    ]
    if st["daemon_snapshot_path"] or st["last_snapshot_time"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st["last_snapshot_time"])) \
            if st["last_snapshot_time"] else "none yet"
        outcome = "" if st["last_snapshot_ok"] is None else (
            f", {st['last_snapshot_entries']:,} entries" if st["last_snapshot_ok"]
            else f", FAILED: {st['last_snapshot_error']}")
        rows.append(("snapshot", f"{st['daemon_snapshot_path'] or '-'}; last {when}{outcome}"))
    if near is not None:
        rows += _near_rows(near)
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def _near_rows(near: dict) -> list[tuple[str, str]]:
    """``shmcache stats`` rows for a cache used as a near cache (shmcache.near)."""
    t = near.get("tracker") or {}
    if near["tracker_up"]:
        state = f"up, heartbeat {near['heartbeat_age']:.2f} s ago (readers trust it for {near['max_staleness']:g} s)"
    else:
        state = f"{near['tracker_state']}: workers read Redis"
    return [
        ("near cache", f"{near['near_hits']:,} hits, {near['near_misses']:,} fills, "
                       f"{near['upstream_reads']:,} upstream reads, {near['bypassed_reads']:,} bypassed"),
        ("tracker", f"{t.get('upstream', '?')} {t.get('prefixes') or 'all keys'}"
                    + (f", {t['connections']} tracking connections" if t.get("connections", 1) > 1 else "")
                    + f"; {state}"),
        ("invalidations", f"{near['invalidations']:,} keys, {near['flushes']:,} flushes, "
                          f"{near['epoch_bumps']:,} epoch bumps, {near['reconnects']:,} reconnects"),
    ]


def cmd_get(args) -> int:
    """``shmcache get``: print one value. Raises CliError if the key is absent."""
    with _attach(args) as c:
        missing = object()
        v = c.get(args.key, missing)
        if v is missing:
            raise CliError(f"key {args.key!r} not found in cache {c.name!r}")
    if args.json:
        print(json.dumps(_jsonable(v)))
    elif isinstance(v, bytes) and args.raw:
        sys.stdout.buffer.write(v)
        sys.stdout.flush()
    elif isinstance(v, str):
        print(v)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        print(v)
    else:
        print(repr(v))
    return 0


def cmd_set(args) -> int:
    """``shmcache set``: store one value. Raises CliError on a bad value or (--nx) a present key."""
    if args.type is None:  # like Redis: SET n 5 then INCR n works
        kind = "int" if _DECIMAL.fullmatch(args.value) else "str"
    else:
        kind = args.type
    value = _parse_value(args.value, kind)
    with _attach(args) as c:
        if args.nx:
            if not c.add(args.key, value, ttl=args.ttl):
                raise CliError(f"key {args.key!r} already exists in cache {c.name!r} (--nx)")
        else:
            c.set(args.key, value, ttl=args.ttl)
    return 0


def cmd_delete(args) -> int:
    """``shmcache delete``: delete keys, print how many existed."""
    with _attach(args) as c:
        n = c.delete_many(args.keys)
    if args.json:
        _print_json({"deleted": n})
    else:
        print(n)
    return 0


def cmd_ttl(args) -> int:
    """``shmcache ttl``: seconds until a key expires ("never" if it does not).
    Raises CliError if the key is absent."""
    with _attach(args) as c:
        e = admin.inspect(c, args.key)
    if e is None:
        raise CliError(f"key {args.key!r} not found in cache {c.name!r}")
    if args.json:
        _print_json({"key": _jsonable(e.key), "ttl": None if e.ttl is None else round(e.ttl, 3),
                     "expires_at": e.expires_at})
    else:
        print("never" if e.ttl is None else f"{e.ttl:.3f}")
    return 0


def cmd_keys(args) -> int:
    """``shmcache keys``: print the live keys matching a glob pattern, sorted."""
    rx = re.compile(fnmatch.translate(args.pattern), re.DOTALL)
    out = []
    with _attach(args) as c:
        for e in admin.entries(c):
            k = e.key
            text = k if isinstance(k, str) else k.decode("utf-8", "backslashreplace")
            if rx.match(text):
                out.append(k)
                if args.limit and len(out) >= args.limit:
                    break
    out.sort(key=lambda k: (not isinstance(k, str), k if isinstance(k, str) else repr(k)))
    if args.limit:
        out = out[: args.limit]
    if args.json:
        print(json.dumps([_jsonable(k) for k in out]))
        return 0
    for k in out:
        print(_show_key(k))
    return 0


def _daemon_snapshot_path(name: str) -> tuple[int, str]:
    """(pid in this PID namespace, snapshot path) of the daemon serving cache
    ``name``; the path as the daemon recorded it in the header.

    Raises:
        CliError: no daemon runs, it runs without --snapshot, or in a PID
            namespace this process cannot see (it could not be signalled).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SettingsIgnored)
        c = Cache(name, create=False, mode=ANY_MODE)
    with c:
        d = admin.daemon_info(c)
    if not d.alive or not d.pid:
        raise CliError(f"no daemon runs for cache {name!r}; give a PATH to write a snapshot from this process")
    if not d.snapshot_path:
        raise CliError(f"daemon pid {d.pid} runs without --snapshot; give a PATH to write a snapshot from here")
    if d.local_pid is None:
        raise _not_visible(d.pid, name, f"run 'shmcache snapshot -n {name}' there, or give a PATH to write a "
                                        "snapshot from this process")
    return d.local_pid, d.snapshot_path


def wait_for_daemon_snapshot(path: str, since: float, timeout: float, pid: int | None = None):
    """Wait until the snapshot at ``path`` was started at or after ``since``
    (wall clock); return its verified SnapshotInfo.

    Raises:
        CliError: timeout, or the daemon ``pid`` died meanwhile.
    """
    from .snapshot import SnapshotError, read_header, verify_snapshot

    deadline = time.monotonic() + timeout
    while True:
        try:
            if read_header(path).created >= since:
                return verify_snapshot(path)
        except SnapshotError:
            pass  # not there yet (first snapshot)
        if pid is not None:
            import psutil

            if not psutil.pid_exists(pid):
                raise CliError(f"daemon pid {pid} exited before writing the snapshot")
        if time.monotonic() > deadline:
            raise CliError(f"the daemon did not write {path} within {timeout:g} s")
        time.sleep(0.02)


def cmd_snapshot(args) -> int:
    """``shmcache snapshot``: write a snapshot here (PATH) or ask the daemon.

    Raises:
        CliError: no daemon runs (and no PATH), or it did not write in time.
    """
    from .snapshot import terminal_progress, write_snapshot

    if args.path:
        with _attach(args) as c:
            bar = terminal_progress(f"snapshot {os.path.basename(args.path)}")
            try:
                info = write_snapshot(c, args.path, progress=None if args.json else bar)
            finally:
                if bar:
                    bar.finish()
        if args.json:
            _print_json({**dataclasses.asdict(info), "daemon_pid": None})
        else:
            print(f"wrote {info.path}: {info.entries:,} entries, {_mib(info.bytes)} in {info.seconds:.3f} s")
            if info.skipped_damaged:
                print(f"left out {info.skipped_damaged:,} damaged entries (failing their checksums): "
                      f"run 'shmcache check -n {c.name}'", file=sys.stderr)
        return 0
    pid, path = _daemon_snapshot_path(_name(args))
    since = time.time()
    os.kill(pid, signal.SIGUSR1)
    info = wait_for_daemon_snapshot(path, since, args.timeout, pid)
    if args.json:
        _print_json({**dataclasses.asdict(info), "daemon_pid": pid})
    else:
        print(f"daemon pid {pid} wrote {info.path}: {info.entries:,} entries, {_mib(info.bytes)}")
    return 0


def cmd_restore(args) -> int:
    """``shmcache restore``: verify a snapshot file, then load it. Raises SnapshotError for a bad file."""
    from .snapshot import restore_snapshot, terminal_progress, verify_snapshot

    name = _name(args)
    verify_snapshot(args.path)  # refuse a bad file before creating anything
    if args.size:
        c = Cache(name, size=args.size, owner=getattr(args, "owner", None))
    else:
        c = _attach(args)
    created = admin.created(c)
    try:
        with c:
            bar = None if args.json else terminal_progress(f"restore {os.path.basename(args.path)}", unit="entries")
            try:
                r = restore_snapshot(c, args.path, merge=args.merge, progress=bar)
            finally:
                if bar:
                    bar.finish()
    except UntrustedSegment:
        if created:  # refused before a byte was loaded: the cache made for it goes too
            Cache.unlink(name)
        raise
    if args.json:
        _print_json(dataclasses.asdict(r))
        return 0
    skipped = []
    for label, n in (("expired", r.skipped_expired), ("too large", r.skipped_too_large),
                     ("no room", r.skipped_full), ("already present", r.skipped_present)):
        if n:
            skipped.append(f"{n:,} {label}")
    print(f"restored {r.loaded:,} entries from {args.path} in {r.seconds:.3f} s"
          + (f" (skipped {', '.join(skipped)})" if skipped else ""))
    return 0


def cmd_check(args) -> int:
    """``shmcache check``: check every stripe (or a snapshot file); status 1 on damage."""
    if args.snapshot:
        from .snapshot import SnapshotError, verify_snapshot

        if args.json:  # a bad file is a result here, not an error: {"sound": false, "error": why}
            try:
                info = verify_snapshot(args.snapshot)
            except SnapshotError as e:
                _print_json({"path": args.snapshot, "sound": False, "error": str(e)})
                return 1
            _print_json({**dataclasses.asdict(info), "sound": True, "error": None})
            return 0
        info = verify_snapshot(args.snapshot)
        print(f"snapshot {info.path} is sound: {info.entries:,} entries in {info.sections} sections, "
              f"{_mib(info.bytes)}, of cache {info.name!r} taken {time.ctime(info.created)}")
        return 0
    with _attach(args) as c:
        problems = admin.check(c)
        n = admin.geometry(c).n_stripes
    if args.json:
        print(json.dumps({"name": c.name, "stripes": n, "sound": not problems, "problems": problems}, indent=2))
        return 1 if problems else 0
    if problems:
        for p in problems:
            print(p)
        sys.stderr.write(f"shmcache: cache {c.name!r} is damaged: {len(problems)} problem(s)\n")
        return 1
    print(f"cache {c.name!r}: all {n} stripes sound")
    return 0


def _entry_dict(e: "admin.EntryInfo", now: float) -> dict:
    return {
        "key": _jsonable(e.key), "type": e.type, "size": e.size, "key_size": e.key_size,
        "ttl": None if e.ttl is None else round(e.ttl, 3), "expires_at": e.expires_at,
        "accessed": e.accessed, "stripe": e.stripe,
    }


def cmd_inspect(args) -> int:
    """``shmcache inspect``: a key's type, size, TTL and last access. Raises CliError if absent."""
    with _attach(args) as c:
        e = admin.inspect(c, args.key)
        now = time.time()
    if e is None:
        raise CliError(f"key {args.key!r} not found in cache {c.name!r}")
    d = _entry_dict(e, now)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    ttl = "never expires" if e.ttl is None else f"{e.ttl:.3f} s (at {time.ctime(e.expires_at)})"
    rows = [("key", _show_key(e.key)), ("type", e.type), ("size", f"{e.size:,} bytes (key {e.key_size} bytes)"),
            ("ttl", ttl), ("accessed", "yes (kept on reclaim)" if e.accessed else "no"), ("stripe", str(e.stripe))]
    for k, v in rows:
        print(f"{k:<12} {v}")
    return 0


def cmd_create(args) -> int:
    """``shmcache create``: create a cache with the given layout. Raises CliError if it exists."""
    name = _name(args)
    if name in Cache.list():
        raise CliError(f"cache {name!r} already exists (shmcache rm -n {name} first, or just attach to it)")
    c = Cache(name, size=args.size, stripes=args.stripes, max_items=args.max_items, max_key_size=args.max_key_size,
              max_value_size=args.max_value_size, max_clients=args.max_clients, policy=args.policy,
              mode=int(args.mode, 8))
    with c:
        g = admin.geometry(c)
    info = {"name": name, "size": g.total_size, "data_bytes": g.stripe_arena * g.n_stripes, "stripes": g.n_stripes,
            "max_items": g.max_items, "max_key_size": g.max_key_size, "max_value_size": g.max_value_size,
            "max_clients": g.max_clients, "policy": L.POLICY_NAMES[g.policy], "mode": oct(g.mode)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"created cache {name!r}: {_mib(g.total_size)}, of which {_mib(info['data_bytes'])} for entries "
          f"({g.n_stripes} stripes); up to {g.max_items:,} items, values up to {_mib(g.max_value_size)}, "
          f"policy {info['policy']}")
    return 0


# -------------------------------------------------------------------- top
class _Sample:
    """One reading of the counters top turns into rates."""

    def __init__(self, c: Cache):
        self.t = time.monotonic()
        self.ctr = admin.counters(c)
        self.stripes = admin.stripes(c)
        self.clients = sum(1 for x in admin.clients(c) if x.alive)
        self.daemon = admin.daemon_info(c)
        self.geometry = admin.geometry(c)


def top_frame(name: str, prev: _Sample, cur: _Sample, hottest: int = 5) -> dict:
    """Rates over the interval between two samples, and the current state."""
    dt = max(cur.t - prev.t, 1e-9)
    d = {k: cur.ctr[k] - prev.ctr[k] for k in cur.ctr}
    lookups = d["hits"] + d["misses"]
    total_lookups = cur.ctr["hits"] + cur.ctr["misses"]
    g = cur.geometry
    used = sum(s.bytes_used for s in cur.stripes)
    per = [(cur_s.writes - prev_s.writes, cur_s.lock_waits - prev_s.lock_waits,
            cur_s.lock_wait_seconds - prev_s.lock_wait_seconds, cur_s)
           for prev_s, cur_s in zip(prev.stripes, cur.stripes)]
    waits = sum(r[1] for r in per)
    waited = sum(r[2] for r in per)

    def row(r: tuple) -> dict:
        n, w, ws, s = r
        return {"stripe": s.index, "writes_per_s": n / dt, "lock_waits_per_s": w / dt,
                "lock_wait_mean_s": ws / w if w else None, "fill": round(s.fill, 4), "items": s.items}
    daemon = cur.daemon
    last = daemon.last_snapshot
    return {
        "name": name, "interval": round(dt, 3),
        "ops_per_s": (lookups + d["sets"] + d["deletes"]) / dt,
        "gets_per_s": lookups / dt, "sets_per_s": d["sets"] / dt, "deletes_per_s": d["deletes"] / dt,
        "hit_rate": d["hits"] / lookups if lookups else None,
        "hit_rate_all_time": cur.ctr["hits"] / total_lookups if total_lookups else None,
        "evictions_per_s": d["evictions"] / dt, "expirations_per_s": d["expirations"] / dt,
        "items": sum(s.items for s in cur.stripes), "max_items": g.max_items,
        "bytes_used": used, "bytes_capacity": g.stripe_arena * g.n_stripes,
        "bytes_garbage": sum(s.bytes_garbage for s in cur.stripes), "clients": cur.clients,
        # lock waits: acquisitions that found the stripe locked; busy = share of the
        # interval that writers (all together) spent waiting, so it can exceed 1
        "lock_waits_per_s": waits / dt, "lock_wait_mean_s": waited / waits if waits else None,
        "lock_wait_busy": waited / dt,
        "hottest_stripes": [row(r) for r in sorted(per, key=lambda r: -r[0])[:hottest]],
        "contended_stripes": [row(r) for r in sorted(per, key=lambda r: (-r[2], -r[1])) if r[1]][:hottest],
        "daemon_pid": daemon.pid if daemon.alive else None,
        "daemon_heartbeat_age": daemon.heartbeat_age if daemon.alive else None,
        "last_snapshot": None if last is None else {"time": last.time, "ok": last.ok, "entries": last.entries,
                                                     "error": last.error},
    }


def render_top(f: dict, width: int = 100) -> list[str]:
    """The text lines of one ``shmcache top`` screen."""
    hr = "-" if f["hit_rate"] is None else f"{100 * f['hit_rate']:.1f}%"
    hra = "-" if f["hit_rate_all_time"] is None else f"{100 * f['hit_rate_all_time']:.1f}%"
    cap = f["bytes_capacity"]
    if f["daemon_pid"]:
        daemon = f"pid {f['daemon_pid']}, heartbeat {f['daemon_heartbeat_age']:.1f} s ago"
    else:
        daemon = "not running"
    snap = f["last_snapshot"]
    if snap:
        snap_s = (f"{time.strftime('%H:%M:%S', time.localtime(snap['time']))} "
                  + (f"ok, {snap['entries']:,} entries" if snap["ok"] else f"FAILED: {snap['error']}"))
    else:
        snap_s = "none yet"
    lines = [
        f"shmcache top - cache {f['name']!r} - {time.strftime('%H:%M:%S')} - every {f['interval']:.1f} s "
        "(q quits)",
        "",
        f"ops/s          {f['ops_per_s']:>12,.0f}   gets {f['gets_per_s']:,.0f}  sets {f['sets_per_s']:,.0f}  "
        f"deletes {f['deletes_per_s']:,.0f}",
        f"hit rate       {hr:>12}   all time {hra}",
        f"memory         {_mib(f['bytes_used']):>12}   of {_mib(cap)} ({100 * f['bytes_used'] / cap:.1f}%), "
        f"{_mib(f['bytes_garbage'])} garbage",
        f"items          {f['items']:>12,}   of {f['max_items']:,}",
        f"evictions/s    {f['evictions_per_s']:>12,.0f}",
        f"expirations/s  {f['expirations_per_s']:>12,.0f}",
        f"lock waits/s   {f['lock_waits_per_s']:>12,.0f}   mean wait {_us(f['lock_wait_mean_s'])}, "
        f"writers waited {f['lock_wait_busy']:.3f} s/s",
        f"clients        {f['clients']:>12}",
        f"daemon         {daemon}; last snapshot {snap_s}",
        "",
        "hottest stripes   writes/s  lock waits/s  mean wait     fill    items",
    ]

    def row(h: dict) -> str:
        return (f"  stripe {h['stripe']:>5}  {h['writes_per_s']:>10,.0f}  {h['lock_waits_per_s']:>12,.0f}  "
                f"{_us(h['lock_wait_mean_s']):>9}  {100 * h['fill']:>6.1f}%  {h['items']:>7,}")

    lines += [row(h) for h in f["hottest_stripes"]]
    if f["contended_stripes"]:
        lines += ["", "most contended stripes (by time waited)"] + [row(h) for h in f["contended_stripes"]]
    return [ln[:width] for ln in lines]


def _us(seconds: float | None) -> str:
    """A wait for display: microseconds below 10 ms, else milliseconds; '-' for none."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:,.0f} us" if seconds < 0.01 else f"{seconds * 1e3:,.1f} ms"


def cmd_top(args) -> int:
    """``shmcache top``: a live view of rates and state, redrawn every --interval seconds."""
    import select

    tty = sys.stdin.isatty() and sys.stdout.isatty() and not args.json
    old = None
    if tty:
        import termios
        import tty as ttymod

        old = termios.tcgetattr(sys.stdin.fileno())
        ttymod.setcbreak(sys.stdin.fileno())
        sys.stdout.write("\x1b[?25l")  # hide the cursor
    try:
        with _attach(args) as c:
            prev = _Sample(c)
            n = 0
            while not args.iterations or n < args.iterations:
                deadline = time.monotonic() + args.interval
                while (left := deadline - time.monotonic()) > 0:
                    if not tty:
                        time.sleep(left)
                        continue
                    r, _, _ = select.select([sys.stdin], [], [], left)
                    if r and sys.stdin.read(1) in ("q", "Q"):
                        return 0
                cur = _Sample(c)
                frame = top_frame(c.name, prev, cur)
                prev = cur
                n += 1
                if args.json:
                    print(json.dumps(frame), flush=True)
                    continue
                width = os.get_terminal_size().columns if tty else 100
                text = "\n".join(render_top(frame, width))
                sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + text + "\n")
                sys.stdout.flush()
    finally:
        if old is not None:
            import termios

            sys.stdout.write("\x1b[?25h")
            sys.stdout.flush()
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, old)
    return 0


def _describe(args, name: str) -> dict:
    row = {"name": name, "size": None, "items": None, "clients": None, "daemon_pid": None,
           "daemon_local_pid": None, "status": "ok"}
    try:
        summary = admin.summarize(name, owner=getattr(args, "owner", None))
    except PermissionDenied as e:  # another user's cache: list it, do not fail
        row["status"] = str(e).split(";")[0] if isinstance(e, UntrustedSegment) else "no access"
        return row
    except Error as e:
        row["status"] = str(e).split(";")[0]
        return row
    row.update(size=summary.size, items=summary.items, clients=summary.clients, daemon_pid=summary.daemon_pid,
               daemon_local_pid=summary.daemon_local_pid)
    return row


def cmd_ls(args) -> int:
    """``shmcache ls``: list the caches on this host."""
    rows = [_describe(args, n) for n in Cache.list()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no caches on this host")
        return 0
    table = [("NAME", "SIZE", "ITEMS", "CLIENTS", "DAEMON")]
    for r in rows:
        if r["status"] != "ok":
            table.append((r["name"], "-", "-", "-", r["status"]))
            continue
        if r["daemon_local_pid"]:
            d = f"alive (pid {r['daemon_local_pid']})"
        elif r["daemon_pid"]:
            d = f"alive (pid {r['daemon_pid']} in another PID namespace)"
        else:
            d = "none"
        table.append((r["name"], _mib(r["size"]), f"{r['items']:,}", str(r["clients"]), d))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_wait(args) -> int:
    """``shmcache wait``: return once a daemon serves the cache; exit 1 after --timeout."""
    from .daemon import wait_ready

    name = _name(args)
    pid = wait_ready(name, args.timeout, owner=args.owner)
    if args.json:
        _print_json({"name": name, "daemon_pid": pid, "ready": True})
    elif not args.quiet:
        print(f"daemon pid {pid} serves cache {name!r}")
    return 0


def cmd_systemd_unit(args) -> int:
    """``shmcache systemd-unit``: print a systemd service unit for the cache's daemon."""
    from .contrib.systemd import unit

    sys.stdout.write(unit(_name(args), user=args.user, group=args.group, size=args.size, mode=args.mode,
                          snapshot=args.snapshot))
    return 0


def cmd_rm(args) -> int:
    """``shmcache rm``: unlink a cache. Raises CliError if absent, or if its daemon runs
    (without --force; with it, when the daemon does not stop within --timeout seconds)."""
    name = _name(args)
    try:
        pid, local = _serving_daemon(args, name)
    except CacheNotFound:
        raise CliError(f"no cache named {name!r} on this host") from None
    except Error:
        pid = local = None  # damaged, foreign or untrusted: removing it is the fix
    if pid and not args.force:
        raise CliError(f"daemon pid {local or pid} is running for cache {name!r}; stop it first or use --force")
    if pid:
        # A daemon left running on a removed cache would go on writing its
        # snapshot file, over the snapshots of the cache that replaces it:
        # stop it (it writes its final snapshot) before removing anything.
        _stop_daemon(args, pid, local, name, args.timeout)
    Cache.unlink(name)
    print(f"removed cache {name!r}")
    return 0


def cmd_demo(args) -> int:
    """``shmcache demo``: see :func:`run_demo`."""
    return run_demo(args)


# ------------------------------------------------------------------- demo
def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 20.0) -> int | None:
    """Signal one child by its PID and wait for it; SIGKILL if it does not exit."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)
    return proc.returncode


def _wait_daemon(proc: subprocess.Popen, log_path: Path, timeout: float = 20.0) -> None:
    """Wait until the daemon started by ``proc`` logs that it serves (after its
    start-up restore)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CliError(f"the demo daemon exited with status {proc.returncode}; see {log_path}")
        try:
            text = log_path.read_text()
        except OSError:
            text = ""
        if f"daemon pid {proc.pid} serving" in text:
            return
        time.sleep(0.05)
    raise CliError(f"the demo daemon did not come up within {timeout:g} s; see {log_path}")


def run_demo(args) -> int:
    """``make demo``: daemon + load generators + snapshot + warm restart, < 30 s.

    Everything it starts is stopped by PID and the demo cache is unlinked in
    ``finally``; the snapshot and the daemon log stay in ``args.dir``.
    Returns 0 if the cache came back warm with identical values, else 1.

    Raises:
        CliError: no workers/loadgen.py (not a source checkout), another demo
            runs, or a child failed or did not come up in time.
    """
    t_start = time.monotonic()
    root = Path(__file__).resolve().parent.parent
    loadgen = root / "workers" / "loadgen.py"
    if not loadgen.exists():
        raise CliError(f"the demo needs workers/loadgen.py from a source checkout (not found at {loadgen})")
    data = Path(args.dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    snap = data / "demo.snap"
    log_path = data / "daemon.log"
    name = args.demo_name
    for p in (snap, log_path):
        if p.exists():
            p.unlink()
    # A cache left by an interrupted demo: reuse nothing, unless its daemon lives.
    try:
        pid = admin.summarize(name).daemon_pid
    except CacheNotFound:
        pid = None
    except Error:
        pid = None
        Cache.unlink(name)
    if pid:
        raise CliError(f"a daemon (pid {pid}) already serves cache {name!r}: is another demo running?")
    Cache.unlink(name)

    py = sys.executable
    procs: list[subprocess.Popen] = []
    logf = open(log_path, "ab")

    def start_daemon() -> subprocess.Popen:
        p = subprocess.Popen(
            [py, "-m", "shmcache", "daemon", "--name", name, "--size", args.size, "--snapshot", str(snap),
             "--snapshot-every", "0", "--expire-every", "0.1", "--recover-every", "0.5"],
            stdout=logf, stderr=logf, start_new_session=True,
        )
        procs.append(p)
        _wait_daemon(p, log_path)
        return p

    def log_lines(word: str) -> list[str]:
        return [ln.split(" INFO ", 1)[-1] for ln in log_path.read_text().splitlines() if word in ln]

    cache = None
    print(f"shmcache demo: cache {name!r} ({args.size}), snapshot {os.path.relpath(snap)}, "
          f"daemon log {os.path.relpath(log_path)}")
    try:
        daemon = start_daemon()
        print(f"[1/6] daemon started (pid {daemon.pid}): active expiry every 0.1 s, crash recovery, heartbeat")
        cache = Cache(name, create=False)
        print(f"[2/6] {args.workers} load generators for {args.seconds:g} s: Zipf(1.0) over {args.keys:,} keys, "
              "90% get / 10% set, cache-aside fills on miss, 30% of TTLs 1-2 s, the rest 1-10 min")
        workers = []
        for i in range(args.workers):
            w = subprocess.Popen(
                [py, str(loadgen), "--name", name, "--seconds", str(args.seconds), "--keys", str(args.keys),
                 "--seed", str(1000 + i), "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            )
            procs.append(w)
            workers.append(w)
        prev = cache.stats()
        t_prev = time.monotonic()
        t0 = t_prev
        while any(w.poll() is None for w in workers):
            time.sleep(0.5 if time.monotonic() - t0 < args.seconds + 10 else 0)
            if time.monotonic() - t0 > args.seconds + 20:
                raise CliError("the load generators did not finish in time")
            st = cache.stats()
            t = time.monotonic()
            ops = sum(st[k] - prev[k] for k in ("hits", "misses", "sets", "deletes"))
            if ops == 0 and st["sets"] == 0:  # the workers are still starting
                prev, t_prev = st, t
                continue
            looks = (st["hits"] - prev["hits"]) + (st["misses"] - prev["misses"])
            hr = (st["hits"] - prev["hits"]) / looks if looks else 0.0
            print(f"      t={t - t0:4.1f}s  ops/s {ops / (t - t_prev):>9,.0f}  hit rate {100 * hr:5.1f}%  "
                  f"items {st['items']:>7,}  used {_mib(st['bytes_used']):>9}  evictions {st['evictions']:,}",
                  flush=True)
            prev, t_prev = st, t
        totals = {"ops": 0, "corrupt": 0}
        for w in workers:
            out, err = w.communicate(timeout=10)
            if w.returncode != 0:
                raise CliError(f"load generator pid {w.pid} failed: {err.decode().strip().splitlines()[-1:]}")
            r = json.loads(out.decode().strip().splitlines()[-1])
            totals["ops"] += r["ops"]
            totals["corrupt"] += r["corrupt"]
        print(f"      {totals['ops']:,} operations, {totals['corrupt']} corrupt values seen")

        before = cache.stats()["items"]
        t_exp = time.monotonic()
        while time.monotonic() - t_exp < 2.5:
            time.sleep(0.25)
        after = cache.stats()["items"]
        print(f"[3/6] active expiry, nobody reading: items {before:,} -> {after:,} in 2.5 s "
              f"(the 1-2 s TTL keys are gone; the daemon reclaimed them)")

        since = time.time()
        daemon.send_signal(signal.SIGUSR1)
        info = wait_for_daemon_snapshot(str(snap), since, 30.0, daemon.pid)
        line = log_lines("snapshot ")[-1:]
        print(f"[4/6] snapshot on SIGUSR1: {info.entries:,} entries, {_mib(info.bytes)}"
              + (f"\n      daemon: {line[0]}" if line else ""))

        items = len(cache)
        sample_keys = [k for k in cache.keys()[:500]]
        sample = {k: cache.get(k) for k in sample_keys}
        rc = _stop(daemon)
        cache.close()
        Cache.unlink(name)  # like a reboot: the shared memory is gone, the snapshot file is not
        print(f"[5/6] stopped the daemon (SIGTERM, exit {rc}; final snapshot written), removed the shared "
              f"memory, started a new daemon:")
        daemon = start_daemon()
        cache = Cache(name, create=False)
        again = len(cache)
        same = sum(1 for k, v in sample.items() if cache.get(k) == v)
        line = log_lines("restored ")[-1:]
        if line:
            print(f"      daemon: {line[0]}")
        warm = "warm" if again == items else "NOT the same count"
        print(f"      items before {items:,}, after restart {again:,}: {warm}; "
              f"{same} of {len(sample)} sampled values identical")
        ok = again == items and same == len(sample) and totals["corrupt"] == 0
        rc = _stop(daemon)
        cache.close()
        cache = None
        Cache.unlink(name)
        print(f"[6/6] cleaned up: daemon pid {daemon.pid} stopped (exit {rc}), cache {name!r} removed; "
              f"snapshot kept in {os.path.relpath(snap)}")
        print(f"demo {'finished' if ok else 'FAILED'} in {time.monotonic() - t_start:.1f} s")
        return 0 if ok else 1
    finally:
        if cache is not None and not cache.closed:
            cache.close()
        for p in procs:
            _stop(p, timeout=10)
        logf.close()
        Cache.unlink(name)


# ----------------------------------------------------------------- parser
def _daemon_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("-n", "--name", help=f"cache name (default ${NAME_ENV})")
    p.add_argument("--size", help="segment size if the cache is created, e.g. 256MiB (default 64MiB)")
    p.add_argument("--stripes", type=int, help="lock stripes if created (power of two; default one per 4 MiB, 4..64)")
    p.add_argument("--max-items", type=int, help="most entries if created (default one per 200 bytes)")
    p.add_argument("--mode", help="permission bits (octal) if created; on attach the loosest accepted (default 600)")
    p.add_argument("--owner", metavar="USER", help="also trust a cache owned by this user (name or uid)")
    p.add_argument("--snapshot", metavar="PATH", help="snapshot file: restored at start, written periodically, "
                                                      "on SIGUSR1 and at exit")
    p.add_argument("--snapshot-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between snapshots, 0 = only on SIGUSR1 and at exit (default 60)")
    p.add_argument("--expire-every", type=float, default=0.1, metavar="SECONDS",
                   help="seconds between active expiry ticks, 0 = off (default 0.1)")
    p.add_argument("--recover-every", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between dead lock owner / dead client checks (default 1)")
    p.add_argument("--no-restore", action="store_true", help="do not load the snapshot at start")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics "
                                                          "and a read-only status page at http://HOST:PORT/ "
                                                          "(a bare PORT listens on 127.0.0.1; needs prometheus_client)")
    p.add_argument("--upstream", metavar="URL", help="Redis to track for the near cache (shmcache.near): "
                                                     "redis://, rediss://, unix://, redis+sentinel:// or "
                                                     "redis+cluster://host:port[,host:port] URL (a URL with a "
                                                     "password: use --upstream-file or $SHMCACHE_UPSTREAM, ps "
                                                     "shows a command line to every user)")
    p.add_argument("--upstream-file", metavar="FILE",
                   help="read the --upstream URL from the first line of FILE (mode 600); without either, "
                        "$SHMCACHE_UPSTREAM is used")
    p.add_argument("--track-prefix", action="append", metavar="PREFIX",
                   help="key prefix to track (repeatable; default: every key)")
    p.add_argument("--track-ping", type=float, default=0.1, metavar="SECONDS",
                   help="seconds between tracker PINGs; near-cache reads are at most twice that behind (default 0.1)")
    p.add_argument("--track-nice", type=int, default=-20, metavar="N",
                   help="nice value of the tracker thread alone, so an invalidation does not wait for a CPU on a "
                        "busy host (-20..19, 0 = leave it; needs CAP_SYS_NICE or LimitNICE, else a warning; "
                        "default -20)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--serve", type=int, metavar="PORT",
                   help="also serve the cache over the Redis protocol on PORT (a 'shmcache serve' process "
                        "stopped with the daemon; the serve options below apply)")
    _serve_parser(p, port_flag=None)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``shmcache`` command."""
    p = _Parser(prog="shmcache", description="A cache shared by every process on this host through POSIX "
                                              "shared memory: daemon, inspection, snapshots.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("-V", "--version", action="version", version=f"shmcache {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name, func, help, description=None):
        sp = sub.add_parser(name, help=help, description=description or help)
        sp.set_defaults(func=func)
        # also accepted after the subcommand; SUPPRESS keeps a global --debug
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
        return sp

    def named(sp):
        sp.add_argument("-n", "--name", help=f"cache name (default ${NAME_ENV})")
        sp.add_argument("--owner", metavar="USER", help="also trust a cache owned by this user (name or uid)")
        return sp

    _daemon_parser(add(
        "daemon", cmd_daemon, "run the daemon of a cache until SIGTERM/SIGINT",
        "Create or attach the cache, load the snapshot if one exists and the cache is empty, then "
        "expire keys actively, recover stripes and client slots of dead processes, and write "
        "snapshots (every --snapshot-every seconds, on SIGUSR1, and at exit). One daemon per cache.",
    ))
    sp = _serve_parser(named(add(
        "serve", cmd_serve, "serve the cache over the Redis protocol (RESP2/RESP3)",
        "Any language's Redis client, and redis-cli, reads and writes the same keys as Python. "
        "Binds 127.0.0.1 unless --bind is given. See 'Redis protocol' in the README.",
    )))
    sp.add_argument("--size", help="segment size if the cache is created (default 64MiB)")
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sp = named(add("stats", cmd_stats, "show counters, fill and daemon status"))
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp = named(add("get", cmd_get, "print the value of a key (exit 1 if absent)"))
    sp.add_argument("key")
    sp.add_argument("--raw", action="store_true", help="write bytes values raw to stdout")
    sp.add_argument("--json", action="store_true", help="print the value as JSON")
    sp = named(add("inspect", cmd_inspect, "show a key's type, size, TTL and last access (exit 1 if absent)"))
    sp.add_argument("key")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp = named(add("set", cmd_set, "store a value"))
    sp.add_argument("key")
    sp.add_argument("value")
    sp.add_argument("--ttl", type=float, help="seconds until it expires (default: never)")
    sp.add_argument("--type", choices=["str", "bytes", "int", "float", "json"],
                    help="how to store VALUE (default: an int if VALUE is a decimal integer, as Redis "
                         "users expect for INCR, else str; json stores the parsed object)")
    sp.add_argument("--nx", action="store_true", help="only if the key is absent (exit 1 otherwise)")
    sp = named(add("ttl", cmd_ttl, "print the seconds until a key expires, or never (exit 1 if absent)"))
    sp.add_argument("key")
    sp.add_argument("--json", action="store_true", help="print JSON: key, ttl (null: never), expires_at")
    sp = named(add("delete", cmd_delete, "delete keys; prints how many existed"))
    sp.add_argument("keys", nargs="+", metavar="key")
    sp.add_argument("--json", action="store_true", help='print JSON: {"deleted": N}')
    sp = named(add("keys", cmd_keys, "list keys matching a glob pattern (like Redis KEYS / SCAN MATCH)"))
    sp.add_argument("pattern", nargs="?", default="*", help="glob: * ? [abc] (default *)")
    sp.add_argument("--limit", type=int, default=0, help="print at most this many")
    sp.add_argument("--json", action="store_true", help="print a JSON list")
    sp = named(add(
        "snapshot", cmd_snapshot, "write a snapshot",
        "Without PATH: ask the running daemon (SIGUSR1) and wait for its snapshot. "
        "With PATH: write a snapshot from this process.",
    ))
    sp.add_argument("path", nargs="?", help="write here from this process instead of asking the daemon")
    sp.add_argument("--timeout", type=_seconds(True), default=120.0, help="seconds to wait for the daemon (default 120)")
    sp.add_argument("--json", action="store_true", help="print what was written as JSON")
    sp = named(add(
        "restore", cmd_restore, "load a snapshot into a cache",
        "Verify the whole file, then replace the cache's contents with it (or --merge: add absent keys "
        "only). Expired entries are skipped; when the cache is smaller the most recently used win.",
    ))
    sp.add_argument("path")
    sp.add_argument("--merge", action="store_true", help="keep current entries, add only absent keys")
    sp.add_argument("--size", help="create the cache with this size if it does not exist")
    sp.add_argument("--json", action="store_true", help="print what was loaded and skipped as JSON")
    sp = named(add("check", cmd_check, "integrity check of every stripe (exit 1 on damage)"))
    sp.add_argument("--snapshot", metavar="PATH", help="verify a snapshot file instead")
    sp.add_argument("--json", action="store_true",
                    help='print JSON ("sound", "problems" or, with --snapshot, the file\'s details or "error")')
    sp = named(add("top", cmd_top, "live view: ops/s, hit rate, memory, evictions, expirations, hot stripes",
                   "Redraw the cache's rates and state every --interval seconds, like redis-cli --stat "
                   "(q or Ctrl-C quits). Rates are over the last interval, across every process."))
    sp.add_argument("--interval", type=_seconds(False), default=1.0, help="seconds between updates (default 1)")
    sp.add_argument("--iterations", type=int, default=0, help="stop after this many updates (default: never)")
    sp.add_argument("--json", action="store_true", help="print one JSON object per update instead")
    sp = named(add("create", cmd_create, "create a cache with a given layout (exit 1 if it exists)"))
    sp.add_argument("--size", default="64MiB", help="segment size, e.g. 256MiB (default 64MiB)")
    sp.add_argument("--stripes", type=int, help="lock stripes (power of two; default one per 4 MiB, 4..64)")
    sp.add_argument("--max-items", type=int, help="most entries (default one per 200 bytes)")
    sp.add_argument("--max-key-size", type=int, default=1024, help="bytes (default 1024)")
    sp.add_argument("--max-value-size", type=int, help="bytes (default a quarter of a stripe's arena)")
    sp.add_argument("--max-clients", type=int, default=512, help="processes attached at once (default 512)")
    sp.add_argument("--policy", default="lru", choices=["lru", "noeviction"])
    sp.add_argument("--mode", default="600", help="permission bits (octal, default 600)")
    sp.add_argument("--json", action="store_true", help="print the layout as JSON")
    sp = add("ls", cmd_ls, "list the caches on this host with size, items and daemon")
    sp.add_argument("--json", action="store_true", help="print a JSON list, one object per cache")
    sp.add_argument("--owner", metavar="USER", help="also trust caches owned by this user (name or uid)")
    sp = named(add(
        "wait", cmd_wait, "wait until a daemon serves the cache (exit 1 after --timeout)",
        "Return (exit 0) once a daemon holds the cache's daemon lock and has finished its start-up "
        "snapshot restore; exit 1 with the reason after --timeout seconds. For scripts, gunicorn "
        "hooks and container entrypoints, instead of reading the daemon's log.",
    ))
    sp.add_argument("--timeout", type=_seconds(True), default=30.0, help="seconds to wait (default 30)")
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    sp.add_argument("--json", action="store_true", help="print the daemon's pid as JSON on success")
    sp = named(add(
        "systemd-unit", cmd_systemd_unit, "print a systemd service unit for the cache's daemon",
        "Print a Type=notify unit running 'shmcache daemon' for the cache as USER:GROUP, with "
        "RemoveIPC=no (RemoveIPC=yes, implied by DynamicUser=yes, deletes the cache when the unit "
        "stops), snapshots in /var/lib/shmcache and a watchdog. Redirect it to "
        "/etc/systemd/system/shmcache-NAME.service.",
    ))
    sp.add_argument("--user", default="shmcache", help="system user the daemon runs as (default shmcache)")
    sp.add_argument("--group", help="group every process using the cache is in (default: --user)")
    sp.add_argument("--size", help="segment size if the daemon creates the cache (default 64MiB)")
    sp.add_argument("--mode", default="660", help="permission bits (octal) of the cache (default 660)")
    sp.add_argument("--snapshot", metavar="PATH", help="snapshot file (default /var/lib/shmcache/NAME.snapshot)")
    sp = named(add("rm", cmd_rm, "remove a cache (its shared memory segment)"))
    sp.add_argument("--force", action="store_true", help="even while its daemon runs: stop it first (SIGTERM)")
    sp.add_argument("--timeout", type=_seconds(True), default=30.0,
                    help="seconds --force waits for the daemon to stop (default 30)")
    sp = add("demo", cmd_demo, "daemon + load generators + snapshot + warm restart, in under 30 s")
    sp.add_argument("--seconds", type=_seconds(False), default=5.0, help="how long the load generators run (default 5)")
    sp.add_argument("--workers", type=int, default=3, help="load generator processes (default 3)")
    sp.add_argument("--keys", type=int, default=200_000, help="key space of the load (default 200000)")
    sp.add_argument("--size", default="64MiB", help="demo cache size (default 64MiB)")
    sp.add_argument("--dir", default="demo-data", help="where the snapshot and daemon log go (default ./demo-data)")
    sp.add_argument("--demo-name", default="demo", help="name of the demo cache (default demo)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shmcache`` command. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 1
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `shmcache keys | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:  # pragma: no cover
            pass
        return 0
    except SystemExit:
        raise
    except BaseException as e:
        if args.debug:
            raise
        if isinstance(e, (CliError, Error, OSError, ValueError, TypeError)):
            msg = str(e) or type(e).__name__
            if isinstance(e, OSError) and e.filename and e.strerror:
                msg = f"{e.filename}: {e.strerror}"
        else:
            msg = f"internal error: {type(e).__name__}: {e} (run 'shmcache --debug ...' for the traceback)"
        sys.stderr.write(f"shmcache: {msg.splitlines()[0] if msg else type(e).__name__}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
