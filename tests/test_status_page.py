"""The daemon's read-only status page (``--metrics``: ``/``, ``/status.json``
next to ``/metrics``), fetched over real HTTP and rendered by a real headless
browser (Chromium, installed by ``make test``), whose script polls the JSON
and fills the page; untrusted text from the segment must stay text."""

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest

from shmcache import Cache, admin
from test_daemon import daemon  # noqa: F401 - the fixture

pytest.importorskip("prometheus_client")

BROWSER = next((b for b in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium (make test installs "
                                                             "chromium-headless-shell)")
HOSTILE = '<img src=x onerror="document.title=1"><script>document.title=2</script>'


@pytest.fixture
def page(daemon, cache_name):
    """A daemon serving the status page on a free port, over a cache with known
    traffic; yields (base URL, the cache)."""
    with Cache(cache_name, size="4MiB", stripes=4) as c:
        d = daemon("--metrics", "127.0.0.1:0", "--expire-every", "0")
        m = re.search(r"status page at (http://127\.0\.0\.1:\d+/)", d.log())
        assert m, d.log()
        for i in range(40):
            c.set(f"k{i}", b"v" * 100)
        for i in range(40):
            c.get(f"k{i}")
        for i in range(10):
            c.get(f"absent{i}")
        yield m.group(1), c


def _get(url, method="GET"):
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_page_json_and_metrics_over_http(page):
    base, c = page
    status, headers, body = _get(base)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    text = body.decode()
    assert f"shmcache <span id=\"name\">{c.name}</span>" in text
    assert '<td id="items">40 of ' in text and '<span id="hit-rate">80.0%</span>' in text
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    status, headers, body = _get(base + "status.json")
    st = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    ctr = admin.counters(c)
    assert st["counters"]["sets"] == ctr["sets"] == 40 and st["counters"]["hits"] == 40
    assert st["counters"]["misses"] == 10 and st["items"] == admin.stored_items(c) == 40
    assert st["daemon"]["pid"] is not None and len(st["stripes"]) == 4
    assert "k1" not in body.decode()  # figures only, never keys
    status, headers, body = _get(base + "metrics")
    assert status == 200 and b"shmcache_hits_total" in body
    assert _get(base + "nope")[0] == 404
    assert _get(base, "POST")[0] == 405 and _get(base + "status.json", "DELETE")[0] == 405
    status, _h, body = _get(base, "HEAD")
    assert status == 200 and body == b""


def _render(url, tmp_path) -> tuple[str, str]:
    """The DOM of ``url`` after the page's scripts ran for 6 s of virtual time, and the browser's log."""
    args = [BROWSER, "--headless", "--disable-gpu", "--virtual-time-budget=6000", "--enable-logging=stderr",
            "--v=0", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, r.stderr


@needs_browser
@pytest.mark.timeout(180)
def test_headless_browser_runs_the_page_and_keeps_segment_text_inert(page, tmp_path):
    base, c = page
    # The snapshot error text comes from the segment: untrusted. A hostile
    # writer of the segment must not get markup or script into the page.
    admin.record_snapshot(c, ok=False, error=HOSTILE)
    dom, log = _render(base, tmp_path)
    assert "Uncaught" not in log, log[-2000:]
    assert re.search(r'id="refreshed">live, refreshed ', dom), dom[:3000]  # the script polled status.json
    assert re.search(r'<td id="items">40 of [\d,]+</td>', dom)
    assert '<span id="hit-rate">80.0%</span>' in dom
    assert re.search(r'<td id="ops">\d[\d,]*</td>', dom), "rates need two polls"
    assert re.search(r'<td class="n" id="c-sets">40</td>', dom)
    assert 'id="daemon">pid ' in dom
    # the hostile text is there, as text: no element was made of it
    assert "FAILED: &lt;img src=x onerror=" in dom and "<img" not in dom
    assert dom.count("<script") == 1
    assert "<title>shmcache " in dom  # neither payload set the title
