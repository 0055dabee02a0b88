"""Sizes, geometry, headers, permissions, the create-or-attach race and unlink."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import os
import queue
import re
import struct
from pathlib import Path

import posix_ipc
import pytest

from shmcache import admin
from shmcache import LAYOUT_VERSION, Cache, CacheNotFound, LayoutMismatch, parse_size
from shmcache import layout as L

SHM = "/dev/shm"


def _seg_path(name):
    return f"{SHM}/shmcache.{name}"


def _sem_files(name):
    """Semaphore files of this name: a layout-5 cache had one per stripe; a cache never has any now."""
    pre = f"sem.shmcache.{name}."
    return sorted(p for p in os.listdir(SHM) if p.startswith(pre) and p[len(pre):].isdigit())


def _cache_files(name):
    """Every /dev/shm file of cache ``name``, by file name: its segment and any semaphores."""
    return sorted(_sem_files(name) + [p for p in os.listdir(SHM) if p == f"shmcache.{name}"])


def _legacy_sems(name, stripes):
    """Create the stripe semaphores a layout-5 cache ``name`` had: ``sem.shmcache.<name>.<i>``."""
    for i in stripes:
        posix_ipc.Semaphore(f"/shmcache.{name}.{i}", posix_ipc.O_CREX).close()


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- parse_size ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        (1, 1),
        (123456789, 123456789),
        ("1", 1),
        ("1048576", 1048576),
        ("1B", 1),
        ("1b", 1),
        ("1K", 1024),
        ("1k", 1024),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("1KB", 1000),
        ("1kb", 1000),
        ("64M", 64 * 2**20),
        ("256MiB", 256 * 2**20),
        ("1MB", 10**6),
        ("1G", 2**30),
        ("1GiB", 2**30),
        ("1GB", 10**9),
        ("2T", 2 * 2**40),
        ("1TiB", 2**40),
        ("1TB", 10**12),
        ("1.5KiB", 1536),
        ("0.5G", 2**29),
        (" 2 MiB ", 2 * 2**20),
        ("2mib", 2 * 2**20),
    ],
    ids=repr,
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected
    assert type(parse_size(text)) is int


# -- geometry ----------------------------------------------------------------------------
SIZES = [256 * 1024, "1MiB", "3MiB", "8MiB", "17MiB", "64MiB", "300MiB", "1GiB", 10**8 + 12345]


@pytest.mark.parametrize("size", SIZES, ids=repr)
@pytest.mark.parametrize("stripes", [None, 1, 4, 16])
def test_geometry(size, stripes):
    requested = parse_size(size)
    try:
        g = L.compute_geometry(size, stripes=stripes)
    except ValueError as e:  # too many stripes for a tiny size: must say so
        assert stripes and requested < 2**20 and "raise size" in str(e)
        return
    n = g.n_stripes
    assert n & (n - 1) == 0 and 1 <= n <= L.MAX_STRIPES
    if stripes is None:
        assert 4 <= n <= 64
        assert n == min(64, max(4, 1 << max(0, (requested // (4 * 2**20)).bit_length() - 1)))
    else:
        assert n == stripes
    # offsets: in order, page-aligned, nothing overlaps
    assert g.stripe_table_off == L.PAGE
    assert g.client_table_off >= g.stripe_table_off + n * L.STRIPE_SIZE
    assert g.index_off >= g.client_table_off + g.max_clients * g.client_record_size
    assert g.arena_off >= g.index_off + n * g.slots_per_stripe * L.SLOT_SIZE
    for off in (g.client_table_off, g.index_off, g.arena_off):
        assert off % L.PAGE == 0
    # a client record is one cache line (head + counters), whatever the stripe count
    assert g.client_record_size == L.CLIENT_RECORD_SIZE == L.CACHE_LINE
    assert L.C_COUNTERS + 8 * L.N_COUNTERS <= g.client_record_size
    # arenas
    assert g.stripe_arena % 1024 == 0 and g.stripe_arena >= L.MIN_STRIPE_ARENA
    assert g.total_size == g.arena_off + n * g.stripe_arena
    assert g.total_size <= requested
    assert requested - g.total_size < n * (g.seg_size + L.PAGE)  # at most a segment per stripe is left over
    # limits
    assert g.stripe_arena == g.n_segs * g.seg_size and g.n_segs >= L.MIN_SEGS
    assert g.max_value_size == g.seg_size - L.SEG_HEADER - L.ENTRY_HEADER - g.max_key_size
    assert g.max_items >= max(n * 16, requested // 200)
    assert g.items_per_stripe * n == g.max_items
    assert g.items_per_stripe <= g.slots_per_stripe * L.MAX_LOAD
    # the header carries the geometry
    hdr = bytearray(g.pack_header())
    hdr[0:8] = L.MAGIC
    assert L.Geometry.unpack_header(bytes(hdr)) == g


def test_geometry_respects_settings():
    g = L.compute_geometry("16MiB", stripes=8, max_items=1000, max_key_size=64, max_value_size=5000, max_clients=10)
    assert (g.n_stripes, g.max_key_size, g.max_value_size, g.max_clients) == (8, 64, 5000, 10)
    assert g.max_items >= 1000 and g.items_per_stripe >= 125
    assert g.max_items < 1000 + 8


def test_geometry_caps_stripe_arena_at_u32():
    g = L.compute_geometry("9GiB", stripes=1)
    assert g.stripe_arena <= L.MAX_STRIPE_ARENA
    assert g.total_size <= 9 * 2**30


@pytest.mark.parametrize("size,kw", [("8MiB", {}), ("32MiB", dict(stripes=64)), ("5000000", dict(stripes=2))])
def test_segment_file_matches_geometry(make_cache, cache_name, size, kw):
    c = make_cache(size=size, **kw)
    g = admin.geometry(c)
    assert os.stat(_seg_path(cache_name)).st_size == g.total_size <= parse_size(size)
    assert c.stats()["size"] == g.total_size
    # a cache is one file, whatever its stripe count: the stripe locks are words in it
    assert _cache_files(cache_name) == [f"shmcache.{cache_name}"]
    # an attacher with other settings gets the creator's layout
    d = make_cache(size="1MiB", stripes=1, max_key_size=7)
    assert admin.geometry(d) == g
    assert admin.created(d) is False


# -- foreign and mismatched segments -----------------------------------------------------
def test_other_layout_version_is_refused(make_cache, cache_name):
    c = make_cache(size="1MiB")
    c["k"] = b"v"
    c.close()
    path = _seg_path(cache_name)
    with open(path, "r+b") as f:  # layout_version: the u32 right after the 8-byte magic
        f.seek(8)
        assert struct.unpack("<I", f.read(4))[0] == LAYOUT_VERSION
        f.seek(8)
        f.write(struct.pack("<I", LAYOUT_VERSION + 98))
    before = _digest(path)
    for create in (True, False):
        with pytest.raises(LayoutMismatch) as ei:
            Cache(cache_name, size="1MiB", create=create)
        msg = str(ei.value)
        assert f"layout version {LAYOUT_VERSION + 98}" in msg
        assert f"layout version {LAYOUT_VERSION}" in msg
        assert _digest(path) == before  # nothing was touched
    assert Cache.unlink(cache_name) is True
    assert not os.path.exists(path) and _sem_files(cache_name) == []


@pytest.mark.parametrize("filler", [b"\xab", b"GIF89a\x01\x00", b"\x00\x00\x00\x00\x00\x00\x00\x01"])
def test_foreign_segment_is_refused(cache_name, filler):
    path = _seg_path(cache_name)
    data = (filler * (2**20 // len(filler) + 1))[: 2**20]
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # trusted owner and mode: only the content is foreign
    try:
        for create in (True, False):
            with pytest.raises(LayoutMismatch) as ei:
                Cache(cache_name, size="1MiB", create=create)
            assert "not a shmcache segment" in str(ei.value)
            assert f"layout version {LAYOUT_VERSION}" in str(ei.value)
            with open(path, "rb") as f:
                assert f.read() == data
        assert _sem_files(cache_name) == []
    finally:
        os.unlink(path)


def test_regression_small_foreign_segment_is_refused(cache_name):
    path = _seg_path(cache_name)
    data = b"\xab" * 100
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    try:
        with pytest.raises(LayoutMismatch):
            Cache(cache_name, size="1MiB").close()
    finally:
        with open(path, "rb") as f:
            kept = f.read()
        Cache.unlink(cache_name)
    assert kept == data


def test_truncated_segment_is_refused(make_cache, cache_name):
    make_cache(size="1MiB").close()
    os.truncate(_seg_path(cache_name), 2 * L.PAGE)
    with pytest.raises(LayoutMismatch, match="damaged"):
        Cache(cache_name, size="1MiB")


def test_layout5_cache_is_refused_and_unlink_removes_its_semaphores(make_cache, cache_name):
    # What an upgrade meets: a layout-5 cache, i.e. a segment saying version 5
    # and one semaphore file per stripe. It is refused untouched (its
    # semaphores too), naming both versions; unlink removes every file of it.
    make_cache(size="1MiB", stripes=4).close()
    path = _seg_path(cache_name)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 5))
    _legacy_sems(cache_name, range(4))
    before = _digest(path)
    sems = {p: os.stat(f"{SHM}/{p}").st_ino for p in _sem_files(cache_name)}
    assert len(sems) == 4
    for create in (True, False):
        with pytest.raises(LayoutMismatch, match=f"layout version 5, this shmcache reads layout version "
                                                 f"{LAYOUT_VERSION}"):
            Cache(cache_name, size="1MiB", create=create)
        assert _digest(path) == before
        assert {p: os.stat(f"{SHM}/{p}").st_ino for p in _sem_files(cache_name)} == sems
    assert Cache.unlink(cache_name) is True
    assert _cache_files(cache_name) == []


# -- create-or-attach race ------------------------------------------------------------------
N_RACERS = 8


def _racer(name, i, start, written, results):
    start.wait(timeout=60)
    # Each racer asks for another size: whoever creates decides for everyone.
    c = Cache(name, size=f"{1 + i}MiB", stripes=[1, 2, 4, 8][i % 4])
    try:
        c[f"w{i}"] = i
        c.incr("count")
        results.put(("opened", i, admin.created(c), dataclasses.asdict(admin.geometry(c))))
        written.wait(timeout=60)
        seen = {k: c.get(k) for k in [f"w{j}" for j in range(N_RACERS)] + ["count"]}
        results.put(("seen", i, seen, c.check()))
    finally:
        c.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_create_or_attach_race(cache_name, method):
    ctx = mp.get_context(method)
    start = ctx.Barrier(N_RACERS)
    written = ctx.Barrier(N_RACERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(cache_name, i, start, written, results)) for i in range(N_RACERS)]
    for p in procs:
        p.start()
    msgs = []
    try:
        for _ in range(2 * N_RACERS):
            msgs.append(results.get(timeout=90))
    except queue.Empty:
        pass
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert [p.exitcode for p in procs] == [0] * N_RACERS
    assert len(msgs) == 2 * N_RACERS
    opened = [m for m in msgs if m[0] == "opened"]
    seen = [m for m in msgs if m[0] == "seen"]
    assert sorted(m[1] for m in opened) == list(range(N_RACERS))
    assert sum(1 for m in opened if m[2] is True) == 1
    geometries = [m[3] for m in opened]
    assert all(g == geometries[0] for g in geometries)
    creator = next(m[1] for m in opened if m[2])
    assert geometries[0]["n_stripes"] == [1, 2, 4, 8][creator % 4]
    expected = {f"w{j}": j for j in range(N_RACERS)} | {"count": N_RACERS}
    for m in seen:
        assert m[2] == expected
        assert m[3] == []
    with Cache(cache_name, create=False) as c:  # the cache outlives its creators
        assert c.get("count") == N_RACERS
        assert c.stats()["clients"] == 1


# -- permissions ------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(name):
    """{file name: mode} of every /dev/shm file of cache ``name``."""
    return {p: os.stat(f"{SHM}/{p}").st_mode & 0o777 for p in _cache_files(name)}


def test_default_mode_is_0600(make_cache, cache_name, umask_022):
    make_cache(size="1MiB", stripes=4)
    assert _modes(cache_name) == {f"shmcache.{cache_name}": 0o600}


def test_default_mode_ignores_permissive_umask(make_cache, cache_name):
    old = os.umask(0)
    try:
        make_cache(size="1MiB", stripes=4)
    finally:
        os.umask(old)
    assert _modes(cache_name) == {f"shmcache.{cache_name}": 0o600}


def test_group_mode_on_segment(make_cache, cache_name, umask_022):
    c = make_cache(size="1MiB", stripes=4, mode=0o660)
    assert os.stat(_seg_path(cache_name)).st_mode & 0o777 == 0o660
    assert admin.geometry(c).mode == 0o660


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000], ids=oct)
@pytest.mark.parametrize("mode", [0o600, 0o660, 0o666], ids=oct)
def test_regression_a_cache_is_one_file_with_its_mode_whatever_the_umask(make_cache, cache_name, mode, umask):
    # Up to layout 5 a cache also had a semaphore per stripe, which sem_open
    # made with the umask applied (0o660 became 0o640: the group could not
    # attach). Now the one file is the cache, and it has exactly `mode`.
    old = os.umask(umask)
    try:
        c = make_cache(size="1MiB", stripes=16, mode=mode)
        c["k"] = 1
    finally:
        os.umask(old)
    assert _modes(cache_name) == {f"shmcache.{cache_name}": mode}


# -- unlink --------------------------------------------------------------------------------------
def test_unlink_removes_the_segment(make_cache, cache_name):
    c = make_cache(size="8MiB", stripes=16)
    c["k"] = 1
    assert _cache_files(cache_name) == [f"shmcache.{cache_name}"]
    c.close()
    assert Cache.unlink(cache_name) is True
    assert _cache_files(cache_name) == []
    assert cache_name not in Cache.list()
    assert Cache.unlink(cache_name) is False
    with pytest.raises(CacheNotFound):
        Cache(cache_name, create=False)


def test_unlink_removes_stray_semaphores(make_cache, cache_name):
    # A cache made over the semaphores a layout-5 cache of its name left
    # neither uses nor needs them; unlink still removes them, even those of
    # stripes the new cache does not have.
    _legacy_sems(cache_name, (0, 1, 9))
    c = make_cache(size="1MiB", stripes=2)
    c["k"] = 1
    assert c.check() == []
    c.close()
    assert Cache.unlink(cache_name) is True
    assert _cache_files(cache_name) == []


def test_unlink_semaphores_without_segment(cache_name):
    _legacy_sems(cache_name, (0, 1, 5))  # a layout-5 cache whose segment is gone
    assert Cache.unlink(cache_name) is True
    assert _sem_files(cache_name) == []
    assert Cache.unlink(cache_name) is False


def test_unlink_spares_caches_with_longer_names(make_cache, cache_name):
    # sem.shmcache.<name>.* also matches the semaphores of a cache named
    # "<name>.b": unlinking <name> must leave that cache's files alone.
    other = cache_name + ".b"
    make_cache(size="1MiB", stripes=4)
    _legacy_sems(cache_name, range(2))
    try:
        with Cache(other, size="1MiB", stripes=4) as o:
            _legacy_sems(other, range(4))
            o["k"] = 1
            assert Cache.unlink(cache_name) is True
            assert _cache_files(cache_name) == []
            assert _cache_files(other) == [f"sem.shmcache.{other}.{i}" for i in range(4)] + [f"shmcache.{other}"]
            o["k2"] = 2  # still fully usable
        with Cache(other, create=False) as o:
            assert o["k"] == 1 and o["k2"] == 2
    finally:
        Cache.unlink(other)
    assert _cache_files(other) == []


def test_list_names(make_cache, cache_name):
    assert cache_name not in Cache.list()
    make_cache(size="1MiB")
    assert cache_name in Cache.list()


def _readme_size_section() -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### How much of `size` is data"):]
    return " ".join(section[: section.index("\n### ", 5)].split("\n"))


def _size_text(n: int) -> str:
    return f"{n / 2**10:.0f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def test_readme_size_table_is_what_the_layout_makes():
    """The README's "How much of `size` is data" (its table, share and
    per-entry figures) is what layout.compute_geometry makes with the
    defaults. It once said 78% and 805 KiB values, two layouts ago."""
    text = _readme_size_section()
    share = int(re.search(r"About (\d+)% of it holds entries", text).group(1))
    rows = [[c.strip() for c in row.split("|")] for row in re.findall(r"\| (\d+[MG]iB \|[^|]+\|[^|]+\|[^|]+\|[^|]+)\|", text)]
    assert [r[0] for r in rows] == ["64MiB", "256MiB", "1GiB"], rows
    for size, stripes, max_items, data, largest in rows:
        g = L.compute_geometry(size)
        data_bytes = g.stripe_arena * g.n_stripes
        assert (int(stripes), int(max_items.replace(",", ""))) == (g.n_stripes, g.max_items), size
        assert data == f"{data_bytes / 2**20:.1f} MiB", size
        assert largest == _size_text(g.max_value_size), size
        assert abs(100 * data_bytes / L.parse_size(size) - share) < 1.5, (size, data_bytes / L.parse_size(size))
        assert g.total_size <= L.parse_size(size)  # "/dev/shm shows a little less"
    per_slot, load = re.search(r"the index \((\d+) bytes per slot, `max_items` / ([\d.]+) slots", text).groups()
    assert (int(per_slot), float(load)) == (L.INDEX_BYTES_PER_SLOT, L.MAX_LOAD)
    header, align = re.search(r"Each entry takes (\d+) bytes of header plus its key and value, rounded up to "
                              r"(\d+) bytes", text).groups()
    assert (int(header), int(align)) == (L.ENTRY_HEADER, L.ALIGN)
    largest_default = int(re.search(r"default, ([\d,]+) bytes\)", text).group(1).replace(",", ""))
    assert largest_default == L.compute_geometry("64MiB").max_value_size
