"""Shared fixtures: every test gets its own cache name and leaves nothing in /dev/shm.

Names made here start with ``test-<run>-`` (tests/names.py) so the
end-of-session check can tell this run's leftovers from anything else on the
host, other test runs included.
"""

import os

import pytest

from names import PREFIX, fresh_name
from shmcache import Cache

SHM = "/dev/shm"


def _ours():
    try:
        return {n for n in os.listdir(SHM) if n.startswith((f"shmcache.{PREFIX}", f"sem.shmcache.{PREFIX}"))}
    except FileNotFoundError:  # pragma: no cover - not Linux
        return set()


_before = _ours()


def pytest_sessionfinish(session, exitstatus):
    left = _ours() - _before
    if left:
        print(f"\n/dev/shm leak check FAILED: tests left {len(left)} object(s): {sorted(left)[:10]}")
        session.exitstatus = 1


class FakeClock:
    """An injectable clock: ``clock()`` returns ``now``; ``advance(s)`` moves it."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock():
    return FakeClock()


@pytest.fixture
def cache_name():
    """A unique cache name; whatever was created under it is unlinked afterwards."""
    name = fresh_name()
    yield name
    Cache.unlink(name)


@pytest.fixture
def make_cache(cache_name):
    """Factory: ``make_cache(size=..., **kw)`` opens the test's cache; all are closed after."""
    opened = []

    def make(size="8MiB", name=None, **kw):
        c = Cache(name or cache_name, size=size, **kw)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


@pytest.fixture
def cache(make_cache):
    """An 8 MiB cache, closed and unlinked after the test."""
    return make_cache()
