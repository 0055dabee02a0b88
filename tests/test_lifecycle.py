"""Attach/detach lifecycle: client slots come back without an explicit close()."""

import gc
import multiprocessing as mp
import os

import pytest

import shmcache.cache as cache_mod
from shmcache import Cache, admin


@pytest.fixture(params=["c", "python"])
def impl(request, monkeypatch):
    if request.param == "c" and cache_mod._speedups is None:
        pytest.skip("C accelerator not built")
    monkeypatch.setattr(cache_mod, "USE_SPEEDUPS", request.param == "c")
    return request.param


def test_regression_dropped_cache_frees_its_slot_without_gc(impl, cache_name):
    """A Cache dropped without close() frees its client slot at once (no reference
    cycle left for the cyclic GC), so multiprocessing children that exit with
    os._exit do not leak slots."""
    keeper = Cache(cache_name, size="1MiB")
    gc.disable()
    try:
        c = Cache(cache_name)
        c["x"] = 1
        c.get("x")
        c.incr("n")
        "x" in c
        c.delete("x")
        assert len(admin.clients(keeper)) == 2
        del c
        assert len(admin.clients(keeper)) == 1
    finally:
        gc.enable()
        keeper.close()


def _open_and_return(name):
    c = Cache(name, create=False)
    c["child"] = 1  # no close(): the process ends with os._exit


def test_multiprocessing_child_frees_every_slot_at_exit(impl, cache_name):
    """A multiprocessing child ends with os._exit (no atexit): both its own handle
    and the inherited one (which claimed a slot after fork) still give their
    slots back, and its counters stay in stats()."""
    keeper = Cache(cache_name, size="1MiB")
    try:
        sets_before = keeper.stats()["sets"]
        p = mp.get_context("fork").Process(target=_open_and_return, args=(cache_name,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert keeper["child"] == 1
        assert [x.pid for x in admin.clients(keeper)] == [os.getpid()]
        assert admin.reap_clients(keeper) == []
        assert keeper.stats()["sets"] == sets_before + 1
    finally:
        keeper.close()


def test_close_is_idempotent_and_final(impl, cache_name):
    c = Cache(cache_name, size="1MiB")
    c["k"] = b"v"
    c.close()
    c.close()
    assert c.closed
    for op in (lambda: c.get("k"), lambda: c.set("k", 1), lambda: c["k"], lambda: c.incr("k"),
               lambda: c.delete("k"), lambda: "k" in c):
        with pytest.raises(ValueError, match="closed"):
            op()
    with Cache(cache_name) as again:  # the data outlives the handle
        assert again["k"] == b"v"
    assert again.closed
