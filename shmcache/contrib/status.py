"""A read-only HTML status page for a cache (what APCu's ``apc.php`` and
memcached's ``stats`` give), served by the daemon next to its Prometheus
metrics: ``shmcache daemon -n app --metrics 127.0.0.1:9464`` serves

* ``/``            the page: memory, items, hit rate, operation counts and
  rates, evictions, expirations, clients, daemon and last snapshot, and the
  fill of every stripe; it refreshes itself every 2 s (and reads fine
  without JavaScript: the first figures are rendered on the server);
* ``/status.json`` the same figures as JSON (what the page polls);
* ``/metrics``     the Prometheus text format (:mod:`shmcache.contrib.prometheus`).

Read-only by construction: the page shows figures only, never a key or a
value (they may be secrets), and accepts GET and HEAD only. It listens where
``--metrics`` says (127.0.0.1 unless given otherwise): it has no
authentication, so do not expose it beyond the host or a trusted network.

Every string shown comes from the segment (the snapshot path and error text
the daemon recorded), which is untrusted input like any other byte of it:
the server escapes it, and the page's script sets text only (``textContent``,
never ``innerHTML``).
"""

from __future__ import annotations

import html
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .. import admin
from .. import layout as L
from ..cache import Cache

__all__ = ["status", "render", "make_app", "serve"]

log = logging.getLogger("shmcache.status")

#: Seconds between two refreshes of the page.
REFRESH = 2.0


def status(cache: Cache) -> dict[str, Any]:
    """The page's figures for ``cache``, JSON-able: one lock-free read of the
    counters, stripes, clients and daemon record (O(stripes + clients))."""
    g = admin.geometry(cache)
    stripes = admin.stripes(cache)
    ctr = admin.counters(cache)
    d = admin.daemon_info(cache)
    last = d.last_snapshot
    lookups = ctr["hits"] + ctr["misses"]
    return {
        "name": cache.name,
        "time": time.time(),
        "size": g.total_size,
        "capacity": g.stripe_arena * g.n_stripes,
        "bytes_used": sum(s.bytes_used for s in stripes),
        "bytes_garbage": sum(s.bytes_garbage for s in stripes),
        "items": sum(s.items for s in stripes),
        "max_items": g.max_items,
        "policy": L.POLICY_NAMES.get(g.policy, str(g.policy)),
        "counters": ctr,
        "hit_rate": ctr["hits"] / lookups if lookups else None,
        "clients": sum(1 for c in admin.clients(cache) if c.alive),
        "daemon": {
            "pid": d.pid if d.alive else None,
            "heartbeat_age": d.heartbeat_age if d.alive else None,
            "snapshot_path": d.snapshot_path,
        },
        "last_snapshot": None if last is None else {
            "time": last.time, "ok": last.ok, "entries": last.entries, "error": last.error,
        },
        "stripes": [{"index": s.index, "fill": round(s.fill, 4), "items": s.items, "evictions": s.evictions,
                     "locked": s.locked_by is not None, "lock_waits": s.lock_waits} for s in stripes],
    }


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _daemon_text(st: dict[str, Any]) -> str:
    d = st["daemon"]
    if d["pid"] is None:
        return "not running"
    age = d["heartbeat_age"]
    return f"pid {d['pid']}, heartbeat {age:.1f} s ago" if age is not None else f"pid {d['pid']}"


def _snapshot_text(st: dict[str, Any]) -> str:
    s = st["last_snapshot"]
    if s is None:
        return "none yet"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["time"]))
    return f"{when}, {s['entries']:,} entries" if s["ok"] else f"{when}, FAILED: {s['error']}"


# every key of admin.counters() needs its row: the page's script fills them all
_COUNTERS = ("hits", "misses", "sets", "deletes", "evictions", "expirations", "recoveries", "lock_waits")

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shmcache {name}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; }} td, th {{ padding: .15em .8em .15em 0; text-align: left; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.bar {{ background: #eee; width: 16em; height: .8em; display: inline-block; }}
.bar > span {{ background: #4a7; height: 100%; display: block; }}
#stripes {{ display: flex; flex-wrap: wrap; gap: 2px; }}
#stripes div {{ width: 10px; height: 40px; background: #eee; position: relative; }}
#stripes div span {{ position: absolute; bottom: 0; width: 100%; background: #4a7; }}
#stripes div.locked span {{ background: #c63; }}
.muted {{ color: #888; }}
</style></head>
<body>
<h1>shmcache <span id="name">{name}</span> <span class="muted" id="refreshed">rendered by the server</span></h1>
<table>
<tr><th>memory</th><td><span class="bar"><span id="mem-bar" style="width:{mem_pct:.1f}%"></span></span>
 <span id="memory">{memory}</span></td></tr>
<tr><th>items</th><td id="items">{items}</td></tr>
<tr><th>hit rate</th><td><span id="hit-rate">{hit_rate}</span> all time,
 <span id="hit-rate-now">-</span> over the last refresh</td></tr>
<tr><th>ops/s</th><td id="ops">-</td></tr>
<tr><th>clients</th><td id="clients">{clients}</td></tr>
<tr><th>daemon</th><td id="daemon">{daemon}</td></tr>
<tr><th>last snapshot</th><td id="snapshot">{snapshot}</td></tr>
<tr><th>layout</th><td>{size}, {n_stripes} stripes, policy {policy}</td></tr>
</table>
<h2>Counters (every process)</h2>
<table><tr><th></th><th>total</th><th>per second</th></tr>
{counter_rows}
</table>
<h2>Stripe fill</h2>
<div id="stripes">{stripe_cells}</div>
<p class="muted">Read-only. Figures only, never keys or values. JSON at <a href="status.json">status.json</a>,
Prometheus at <a href="metrics">metrics</a>.</p>
<script>
"use strict";
const REFRESH_MS = {refresh_ms};
let prev = null;
const fmt = (n) => Math.round(n).toLocaleString("en-US");
const pct = (x) => x === null ? "-" : (100 * x).toFixed(1) + "%";
function set(id, text) {{ document.getElementById(id).textContent = text; }}
function daemonText(d) {{
  if (d.pid === null) return "not running";
  return d.heartbeat_age === null ? "pid " + d.pid : "pid " + d.pid + ", heartbeat " + d.heartbeat_age.toFixed(1) + " s ago";
}}
function snapshotText(s) {{
  if (s === null) return "none yet";
  const when = new Date(s.time * 1000).toLocaleString();
  return s.ok ? when + ", " + fmt(s.entries) + " entries" : when + ", FAILED: " + s.error;
}}
function show(st) {{
  const mib = (n) => (n / 1048576).toFixed(1) + " MiB";
  set("memory", mib(st.bytes_used) + " of " + mib(st.capacity) + " (" + mib(st.bytes_garbage) + " garbage)");
  document.getElementById("mem-bar").style.width = (100 * st.bytes_used / st.capacity).toFixed(1) + "%";
  set("items", fmt(st.items) + " of " + fmt(st.max_items));
  set("hit-rate", pct(st.hit_rate));
  set("clients", String(st.clients));
  set("daemon", daemonText(st.daemon));
  set("snapshot", snapshotText(st.last_snapshot));
  for (const k of Object.keys(st.counters)) set("c-" + k, fmt(st.counters[k]));
  if (prev !== null && st.time > prev.time) {{
    const dt = st.time - prev.time, d = (k) => st.counters[k] - prev.counters[k];
    for (const k of Object.keys(st.counters)) set("r-" + k, fmt(d(k) / dt));
    set("ops", fmt((d("hits") + d("misses") + d("sets") + d("deletes")) / dt));
    const l = d("hits") + d("misses");
    set("hit-rate-now", l ? pct(d("hits") / l) : "-");
  }}
  const cells = document.getElementById("stripes").children;
  st.stripes.forEach((s, i) => {{
    if (i >= cells.length) return;
    cells[i].className = s.locked ? "locked" : "";
    cells[i].title = "stripe " + s.index + ": " + pct(s.fill) + ", " + fmt(s.items) + " items, " +
      fmt(s.lock_waits) + " lock waits";
    cells[i].firstChild.style.height = (100 * s.fill).toFixed(1) + "%";
  }});
  prev = st;
  set("refreshed", "live, refreshed " + new Date().toLocaleTimeString());
}}
async function refresh() {{
  try {{
    const r = await fetch("status.json", {{cache: "no-store"}});
    if (!r.ok) throw new Error("HTTP " + r.status);
    show(await r.json());
  }} catch (e) {{
    set("refreshed", "not refreshed: " + e.message);
  }}
  setTimeout(refresh, REFRESH_MS);
}}
refresh();
</script>
</body></html>
"""


def render(st: dict[str, Any]) -> str:
    """The page for the figures ``st`` (from :func:`status`), every string escaped."""
    e = html.escape
    rows = "\n".join(
        f'<tr><td>{k}</td><td class="n" id="c-{k}">{st["counters"][k]:,}</td><td class="n" id="r-{k}">-</td></tr>'
        for k in _COUNTERS if k in st["counters"])
    cells = "".join(
        f'<div class="{"locked" if s["locked"] else ""}" title="stripe {s["index"]}: {_pct(s["fill"])}, '
        f'{s["items"]:,} items, {s["lock_waits"]:,} lock waits"><span style="height:{100 * s["fill"]:.1f}%"></span></div>'
        for s in st["stripes"])
    return _PAGE.format(
        name=e(st["name"]), memory=e(f"{_mib(st['bytes_used'])} of {_mib(st['capacity'])} "
                                     f"({_mib(st['bytes_garbage'])} garbage)"),
        mem_pct=100 * st["bytes_used"] / st["capacity"] if st["capacity"] else 0.0,
        items=e(f"{st['items']:,} of {st['max_items']:,}"), hit_rate=e(_pct(st["hit_rate"])),
        clients=st["clients"], daemon=e(_daemon_text(st)), snapshot=e(_snapshot_text(st)),
        size=e(_mib(st["size"])), n_stripes=len(st["stripes"]), policy=e(str(st["policy"])),
        counter_rows=rows, stripe_cells=cells, refresh_ms=int(REFRESH * 1000),
    )


StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def make_app(cache: Cache, metrics_app: WSGIApp | None = None) -> WSGIApp:
    """A WSGI app serving the page at ``/``, its figures at ``/status.json``
    and, if given, ``metrics_app`` (Prometheus) at ``/metrics``. Read-only:
    anything but GET/HEAD is 405, any other path 404."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics" and metrics_app is not None:
            return metrics_app(environ, start_response)
        if path not in ("/", "/status.json"):
            return _reply(start_response, "404 Not Found", "text/plain", b"not found\n", method)
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Type", "text/plain")])
            return [b"read-only: GET or HEAD\n"]
        st = status(cache)
        if path == "/status.json":
            return _reply(start_response, "200 OK", "application/json", json.dumps(st).encode(), method)
        return _reply(start_response, "200 OK", "text/html; charset=utf-8", render(st).encode(), method)

    return app


def _reply(start_response: StartResponse, status_line: str, ctype: str, body: bytes, method: str) -> list[bytes]:
    start_response(status_line, [
        ("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
        # the page loads nothing from elsewhere and may not be framed
        ("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; "
                                    "script-src 'unsafe-inline'; frame-ancestors 'none'"),
        ("X-Content-Type-Options", "nosniff"),
    ])
    return [] if method == "HEAD" else [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s %s", self.address_string(), format % args)


def serve(app: WSGIApp, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``app`` on ``host:port`` (port 0: a free one) from a daemon thread,
    one thread per request. Returns (server, thread); ``server.shutdown()`` stops it.

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        address_family = family
        daemon_threads = True

    server = make_server(host, port, app, server_class=Server, handler_class=_QuietHandler)
    t = threading.Thread(target=server.serve_forever, name="shmcache-status", daemon=True)
    t.start()
    return server, t
