"""Snapshot files: round trips, restores into other shapes, refusals of bad files.

These run in-process (the writer and restorer are plain functions); the
daemon-driven snapshot tests (signals, crashes, concurrent writers) are in
test_daemon.py.
"""

import os
import random
import struct

import numpy as np
import pytest
import xxhash

from names import fresh_name
from shmcache import Cache, Error
from shmcache.snapshot import (
    FORMAT_VERSION,
    PAUSE_ENV,
    RECORD_DTYPE,
    SECTION,
    SNAP_HEADER,
    SnapshotError,
    read_header,
    restore_snapshot,
    verify_snapshot,
    write_snapshot,
)


@pytest.fixture
def other_name():
    """A second unique cache name (restore targets), unlinked afterwards."""
    name = fresh_name()
    yield name
    Cache.unlink(name)


def _contents(cache):
    return sorted((repr(k), repr(v)) for k, v in cache.items())


VALUES = {
    "s": "text é",
    b"b": b"\x00\xffraw",
    "i": 12345678901234,
    "big": 2**80,
    "f": 3.25,
    "l": [1, "two", {"three": 3}],
    "none": None,
    "arr": np.arange(12, dtype=np.int16).reshape(3, 4),
}


def _same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def test_round_trip_keeps_values_types_and_deadlines(make_cache, other_name, tmp_path, fake_clock):
    src = make_cache(clock=fake_clock)
    for k, v in VALUES.items():
        src.set(k, v)
    src.set("ttl", "soon", ttl=100)
    src.set("gone", "x", ttl=1)
    deadline = fake_clock.now + 100
    fake_clock.advance(2)  # "gone" is expired now; the writer leaves it out
    path = tmp_path / "a.snap"
    info = write_snapshot(src, path, now=fake_clock.now)
    assert info.entries == len(VALUES) + 1
    assert info.skipped_expired == 1
    assert verify_snapshot(path).entries == info.entries
    assert read_header(path).name == src.name

    dst = Cache(other_name, size="8MiB", clock=fake_clock)
    try:
        r = restore_snapshot(dst, path, now=fake_clock.now)
        assert r.loaded == len(VALUES) + 1
        for k, v in VALUES.items():
            assert _same(dst.get(k), v), k
        assert dst.ttl("ttl") == pytest.approx(deadline - fake_clock.now)
        assert "gone" not in dst
        assert dst.check() == []
        # a deadline passed between writing and restoring: skipped at restore
        fake_clock.advance(200)
        r = restore_snapshot(dst, path, now=fake_clock.now)
        assert r.skipped_expired == 1 and "ttl" not in dst and dst.get("s") == VALUES["s"]
    finally:
        dst.close()


def test_restore_replaces_contents_and_merge_adds_only_absent(make_cache, other_name, tmp_path):
    src = make_cache()
    src.update({"a": 1, "b": 2})
    path = tmp_path / "s.snap"
    write_snapshot(src, path)
    with Cache(other_name, size="4MiB") as dst:
        dst.update({"b": 20, "c": 30})
        gen = dst.stats()["generation"]
        restore_snapshot(dst, path)
        assert dict(dst.items()) == {"a": 1, "b": 2}
        assert dst.stats()["generation"] > gen
        dst.update({"b": 20, "c": 30})
        r = restore_snapshot(dst, path, merge=True)
        assert dict(dst.items()) == {"a": 1, "b": 20, "c": 30}
        assert (r.loaded, r.skipped_present) == (0, 2)


def test_restore_into_twice_as_large_with_other_stripes(make_cache, other_name, tmp_path):
    src = make_cache(size="8MiB", stripes=8)
    rng = random.Random(1)
    data = {f"k{i}": rng.randbytes(rng.randint(1, 900)) for i in range(4000)}
    src.set_many(data)
    path = tmp_path / "s.snap"
    write_snapshot(src, path)
    with Cache(other_name, size="16MiB", stripes=16) as dst:
        r = restore_snapshot(dst, path)
        assert r.loaded == len(data)
        assert dict(dst.items()) == data
        assert dst.check() == []


def test_restore_into_half_as_large_keeps_most_recently_used(make_cache, other_name, tmp_path):
    import time

    src = make_cache(size="8MiB", stripes=8)
    n = 5000
    keys = [f"k{i}" for i in range(n)]
    for k in keys:  # written in order: later keys are more recent
        src.set(k, b"v" * 900)
    time.sleep(0.05)
    rng = random.Random(2)
    hot = rng.sample(keys[: n // 2], 600)  # old keys, but read last: the most recently used
    for k in hot:
        assert src.get(k) is not None
    path = tmp_path / "s.snap"
    write_snapshot(src, path)
    with Cache(other_name, size="4MiB", stripes=4) as dst:
        r = restore_snapshot(dst, path)
        present = set(dst.keys())
        assert 0 < len(present) < n
        assert r.loaded == n  # all inserted; the oldest were evicted on the way
        assert set(hot) <= present, "recently read keys must survive"
        cold = [k for k in keys[: n // 2] if k not in set(hot)]
        assert not present & set(cold[: len(cold) // 2]), "the least recently used must go first"
        newest = keys[-(len(present) - len(hot)) // 2 :]
        assert set(newest) <= present
        assert dst.check() == []


def test_restore_skips_entries_over_the_targets_limits(make_cache, other_name, tmp_path):
    src = make_cache(size="8MiB")
    src.set("small", b"x" * 10)
    src.set("large", b"x" * 5000)
    src.set("k" * 300, b"long key")
    path = tmp_path / "s.snap"
    write_snapshot(src, path)
    with Cache(other_name, size="4MiB", max_value_size=1000, max_key_size=100) as dst:
        r = restore_snapshot(dst, path)
        assert (r.loaded, r.skipped_too_large) == (1, 2)
        assert dst.keys() == ["small"]


def test_restore_into_noeviction_cache_counts_what_did_not_fit(make_cache, other_name, tmp_path):
    src = make_cache(size="8MiB", stripes=4)
    src.set_many({f"k{i}": b"v" * 1000 for i in range(5000)})
    path = tmp_path / "s.snap"
    write_snapshot(src, path)
    with Cache(other_name, size="1MiB", stripes=4, policy="noeviction") as dst:
        r = restore_snapshot(dst, path)
        assert r.loaded > 0 and r.skipped_full > 0 and r.loaded + r.skipped_full == 5000
        assert len(dst) == r.loaded
        assert dst.check() == []


def test_layout_version_of_the_source_does_not_matter(make_cache, other_name, tmp_path):
    """The file carries entries, not the segment layout: a snapshot from another
    layout version (here: a header saying 99) restores the same."""
    src = make_cache()
    src.update({"a": "x", "b": b"y"})
    path = tmp_path / "s.snap"
    write_snapshot(src, path)
    raw = bytearray(path.read_bytes())
    fields = list(SNAP_HEADER.unpack_from(raw, 0))
    fields[4] = 99  # source layout version
    fields[-1] = 0
    head = SNAP_HEADER.pack(*fields)[:-8]
    raw[: SNAP_HEADER.size] = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    path.write_bytes(bytes(raw))
    assert verify_snapshot(path).source_layout_version == 99
    with Cache(other_name, size="4MiB", stripes=1) as dst:
        restore_snapshot(dst, path)
        assert dict(dst.items()) == {"a": "x", "b": b"y"}


def test_deleted_and_overwritten_values_are_not_written(make_cache, tmp_path):
    c = make_cache(stripes=1)
    c.set("keep", b"KEEP-ME")
    c.set("secret", b"DELETED-SECRET")
    c.set("old", b"OLD-VALUE-LONGER-THAN-THE-NEW-ONE-" * 3)
    c.set("old", b"NEW" * 100)  # does not fit in place: the old bytes become garbage
    del c["secret"]
    path = tmp_path / "s.snap"
    write_snapshot(c, path)
    raw = path.read_bytes()
    assert b"KEEP-ME" in raw and b"NEWNEW" in raw
    assert b"DELETED-SECRET" not in raw and b"OLD-VALUE" not in raw


def test_progress_is_reported(make_cache, other_name, tmp_path):
    c = make_cache()
    c.set_many({f"k{i}": b"x" * 100 for i in range(1000)})
    seen = []
    path = tmp_path / "s.snap"
    write_snapshot(c, path, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] > 0
    seen.clear()
    with Cache(other_name, size="4MiB") as dst:
        restore_snapshot(dst, path, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (1000, 1000)


def test_empty_cache_round_trip(make_cache, other_name, tmp_path):
    path = tmp_path / "s.snap"
    info = write_snapshot(make_cache(), path)
    assert info.entries == 0 and verify_snapshot(path).entries == 0
    with Cache(other_name, size="4MiB") as dst:
        dst["x"] = 1
        assert restore_snapshot(dst, path).loaded == 0
        assert len(dst) == 0


# ------------------------------------------------------------- bad files
@pytest.fixture
def good_snapshot(make_cache, tmp_path):
    c = make_cache(stripes=4)
    c.set_many({f"k{i}": f"value {i}" for i in range(300)})
    path = tmp_path / "good.snap"
    write_snapshot(c, path)
    return path


def _layout_offsets(raw: bytes):
    """(first record byte, last data byte, footer offset) of a snapshot."""
    pos = SNAP_HEADER.size
    n = SNAP_HEADER.unpack_from(raw, 0)[5]
    first_rec = pos + SECTION.size
    last_data = None
    for _ in range(n):
        _m, _i, n_rec, data_len, _c, _h = SECTION.unpack_from(raw, pos)
        data_off = pos + SECTION.size + n_rec * RECORD_DTYPE.itemsize
        if data_len:
            last_data = data_off + data_len - 1
        pos = data_off + data_len + (-data_len % 8)
    return first_rec, last_data, pos


def _corrupt(kind, good: bytes, tmp_path):
    path = tmp_path / f"bad-{kind}.snap"
    first_rec, last_data, footer = _layout_offsets(good)
    raw = bytearray(good)
    if kind == "empty":
        raw = bytearray()
    elif kind == "directory":
        path.mkdir()
        return path, "directory"
    elif kind == "missing":
        return path, "does not exist"
    elif kind == "wrong-magic":
        raw[:8] = b"NOTASNAP"
    elif kind == "foreign":
        raw = bytearray(b"hello, this is some text file that is not a snapshot\n" * 10)
    elif kind == "newer-format":
        raw[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    elif kind == "trunc-header":
        raw = raw[:40]
    elif kind == "trunc-section":
        raw = raw[: first_rec + 10]
    elif kind == "trunc-footer":
        raw = raw[:footer]
    elif kind == "trunc-1-byte":
        raw = raw[:-1]
    elif kind == "flip-header":
        raw[30] ^= 0x01
    elif kind == "flip-record":
        raw[first_rec + 3] ^= 0x40
    elif kind == "flip-data":
        raw[last_data] ^= 0x01
    elif kind == "flip-footer":
        raw[footer + 20] ^= 0x01
    elif kind == "trailing":
        raw += b"\0" * 16
    path.write_bytes(bytes(raw))
    return path, {
        "empty": "empty",
        "wrong-magic": "not a shmcache snapshot",
        "foreign": "not a shmcache snapshot",
        "newer-format": "format version",
        "trunc-header": "truncated",
        "trunc-section": "truncated",
        "trunc-footer": "truncated",
        "trunc-1-byte": "corrupt|truncated",
        "flip-header": "header",
        "flip-record": "checksum mismatch in section 0",
        "flip-data": "checksum mismatch in section",
        "flip-footer": "footer",
        "trailing": "after its footer",
    }[kind]


BAD = ["empty", "directory", "missing", "wrong-magic", "foreign", "newer-format", "trunc-header",
       "trunc-section", "trunc-footer", "trunc-1-byte", "flip-header", "flip-record", "flip-data",
       "flip-footer", "trailing"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_snapshot_is_refused_and_the_cache_is_unchanged(kind, good_snapshot, other_name, tmp_path):
    path, why = _corrupt(kind, good_snapshot.read_bytes(), tmp_path)
    with pytest.raises(SnapshotError, match=why):
        verify_snapshot(path)
    with Cache(other_name, size="4MiB") as dst:
        dst.update({"mine": "untouched", "other": 2})
        before = (_contents(dst), dst.stats()["generation"], dst.stats()["items"])
        with pytest.raises(SnapshotError, match=why) as ei:
            restore_snapshot(dst, path)
        assert str(path) in str(ei.value)
        assert isinstance(ei.value, Error)
        assert (_contents(dst), dst.stats()["generation"], dst.stats()["items"]) == before


# ------------------------------------------------------- crash safety (writer)
def test_failed_write_leaves_previous_snapshot_and_no_temp(make_cache, tmp_path, monkeypatch):
    from shmcache import snapshot as snapmod

    c = make_cache()
    c["a"] = 1
    path = tmp_path / "s.snap"
    write_snapshot(c, path)
    before = path.read_bytes()
    c["b"] = 2
    calls = []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    real = snapmod._pack_stripe
    monkeypatch.setattr(snapmod, "_pack_stripe", boom)
    with pytest.raises(OSError, match="No space"):
        write_snapshot(c, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.snap"]


def test_stale_temp_of_a_dead_writer_is_removed(make_cache, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    path = tmp_path / "s.snap"
    stale = tmp_path / f"s.snap.tmp.{dead.pid}"
    stale.write_bytes(b"half a snapshot")
    write_snapshot(make_cache(), path)
    assert not stale.exists() and path.exists()


def test_regression_stale_temp_with_our_own_pid_does_not_block_snapshots(make_cache, tmp_path):
    # Temp files were named <path>.tmp.<pid> and the cleaner spared our own
    # pid: a daemon that runs as pid 1 of its container, killed mid-snapshot
    # and restarted (pid 1 again), could never create its temp file again
    # (O_EXCL): every later snapshot failed with FileExistsError.
    path = tmp_path / "s.snap"
    stale = tmp_path / f"s.snap.tmp.{os.getpid()}"
    stale.write_bytes(b"half a snapshot of the previous incarnation")
    c = make_cache()
    c["k"] = 1
    assert write_snapshot(c, path).entries == 1
    assert not stale.exists() and sorted(os.listdir(tmp_path)) == ["s.snap"]


def test_regression_live_writers_temp_is_kept_whatever_its_pid(make_cache, tmp_path):
    # A writer in another PID namespace names its temp file with a pid that
    # may not exist here: the cleaner judged it dead by that pid and deleted
    # the file under the live writer, whose rename then failed.
    import fcntl

    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    path = tmp_path / "s.snap"
    live = tmp_path / f"s.snap.tmp.{pid_max + 1}"  # no such pid here, ever
    fd = os.open(live, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live writer holds until its rename
        write_snapshot(make_cache(), path)
        assert live.exists()
    finally:
        os.close(fd)
    write_snapshot(make_cache(), path)  # its writer is gone now: the next writer clears it
    assert not live.exists()


def test_writing_to_a_directory_fails_cleanly(make_cache, tmp_path):
    with pytest.raises(IsADirectoryError):
        write_snapshot(make_cache(), tmp_path)


def test_pause_hook_only_pauses(make_cache, tmp_path, monkeypatch):
    monkeypatch.setenv(PAUSE_ENV, "0.01")
    c = make_cache()
    c["a"] = 1
    write_snapshot(c, tmp_path / "s.snap")
    assert verify_snapshot(tmp_path / "s.snap").entries == 1


def test_snapshot_written_by_layout1_restores_into_this_layout(make_cache, fake_clock):
    """A snapshot taken before a layout upgrade (tests/data, written by the
    layout-1 code, see make_layout1_snapshot.py) restores into the current
    layout: every key with its value, type and deadline; the entry that was
    past its deadline when the snapshot was written stays out."""
    import sys

    here = os.path.join(os.path.dirname(__file__), "data")
    sys.path.insert(0, here)
    try:
        import make_layout1_snapshot as made
    finally:
        sys.path.remove(here)
    path = os.path.join(here, "snapshot_layout1.shmsnap")
    assert read_header(path).source_layout_version == 1
    fake_clock.now = made.CLOCK + 10.0
    c = make_cache(size="4MiB", clock=fake_clock)
    restore_snapshot(c, path, now=fake_clock.now)
    want = {k: v for k, v in made.expected().items() if k != "expired"}
    assert len(c) == len(want)
    for k, (v, ttl) in want.items():
        assert _same(c.get(k), v), k
        if ttl is None:
            assert c.ttl(k) is None
        else:
            assert c.ttl(k) == pytest.approx(made.CLOCK + ttl - fake_clock.now)
    assert c.get("expired") is None
    assert c.check() == []
