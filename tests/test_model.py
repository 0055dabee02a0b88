"""A hypothesis state machine checks ``Cache`` against a plain dict model with deadlines.

Two variants:

* ``TestExactModel``: a cache far bigger than anything the rules write, so it
  never evicts; after every step the cache must equal the model exactly.
* ``TestLRUModel``: a tiny cache (few items per stripe, small arenas) that
  evicts all the time. Whatever the cache returns must equal the model's value
  (never stale, never an expired key, never garbage); a key the model holds
  but the cache lacks is allowed only if the evictions counter went up since
  that key was last written.

The clock is injected; TTLs and clock steps are whole or half seconds, so
deadlines are exact and "expired at exactly the deadline" is exercised.
"""

from __future__ import annotations


from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shmcache import Cache
from names import fresh_name

_ABSENT = object()


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def _values(max_bytes: int):
    return st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.integers(min_value=-5, max_value=5),
        st.builds(lambda n, b: bytes([b]) * n, st.sampled_from([0, 1, 9, 100, max_bytes // 4, max_bytes]),
                  st.integers(0, 255)),
        st.text(max_size=8),
        st.floats(allow_nan=False),
        st.none(),
        st.booleans(),
        st.tuples(st.integers(), st.text(max_size=3)),
    )


TTLS = st.one_of(st.none(), st.sampled_from([0.5, 1, 2, 3, 5]))
DELTAS = st.one_of(st.integers(-3, 3), st.sampled_from([2**62, -(2**63), 2**64]))


def make_machine(name, keys, values, cache_kw, exact):
    """A state machine class over ``keys`` and ``values`` for a cache made with ``cache_kw``."""
    all_keys = list(keys)
    keys = st.sampled_from(all_keys)

    class CacheModel(RuleBasedStateMachine):
        CACHE_KW = cache_kw
        EXACT = exact

        def __init__(self):
            super().__init__()
            self.clock = Clock()
            self.name = fresh_name("model")
            self.cache = Cache(self.name, clock=self.clock, **self.CACHE_KW)
            self.model: dict = {}  # key -> (value, deadline or None)
            self.stamp: dict = {}  # key -> evictions counter right after its last write

        def teardown(self):
            try:
                assert self.cache.check() == []
                if self.EXACT:
                    assert self.cache.stats()["evictions"] == 0
            finally:
                self.cache.close()
                Cache.unlink(self.name)

        # -- model helpers ---------------------------------------------------------------
        def _evictions(self) -> int:
            return self.cache.stats()["evictions"]

        def _live(self, k) -> bool:
            if k not in self.model:
                return False
            d = self.model[k][1]
            return d is None or d > self.clock.now

        def _expect(self, k):
            return self.model[k][0] if self._live(k) else _ABSENT

        def _put(self, k, value, deadline):
            self.model[k] = (value, deadline)
            self.stamp[k] = self._evictions()

        def _deadline(self, ttl):
            return None if ttl is None else self.clock.now + ttl

        def _vanished(self, k) -> None:
            """The cache lacks k though the model holds it live: only eviction may explain it."""
            assert not self.EXACT, f"{k!r} vanished from a cache that must not evict"
            assert self._evictions() > self.stamp[k], f"{k!r} vanished without an eviction"
            del self.model[k]

        def _same(self, got, want) -> bool:
            return type(got) is type(want) and got == want

        # -- rules ---------------------------------------------------------------------------
        @rule(k=keys, v=values, ttl=TTLS)
        def set(self, k, v, ttl):
            assert self.cache.set(k, v, ttl=ttl) is True
            self._put(k, v, self._deadline(ttl))

        @rule(k=keys, v=values, ttl=TTLS)
        def add(self, k, v, ttl):
            stored = self.cache.add(k, v, ttl=ttl)
            if stored and self._live(k):
                self._vanished(k)
            assert stored is not self._live(k)
            if stored:
                self._put(k, v, self._deadline(ttl))

        @rule(k=keys, v=values)
        def replace(self, k, v):
            stored = self.cache.replace(k, v, ttl=None)
            if not stored and self._live(k):
                self._vanished(k)
            assert stored is self._live(k)
            if stored:
                self._put(k, v, None)

        @rule(k=keys)
        def delete(self, k):
            done = self.cache.delete(k)
            if not done and self._live(k):
                self._vanished(k)
            assert done is self._live(k)
            self.model.pop(k, None)

        @rule(k=keys)
        def pop(self, k):
            got = self.cache.pop(k, _ABSENT)
            if got is _ABSENT and self._live(k):
                self._vanished(k)
            want = self._expect(k)
            assert got is want if want is _ABSENT else self._same(got, want)
            self.model.pop(k, None)

        @rule(k=keys, delta=DELTAS, ttl=TTLS)
        def incr(self, k, delta, ttl):
            want = self._expect(k)
            try:
                got = self.cache.incr(k, delta, ttl=ttl)
            except TypeError:
                assert want is not _ABSENT and type(want) is not int, "TypeError on an int or absent key"
                return
            if want is not _ABSENT and (type(want) is not int or got != want + delta):
                self._vanished(k)  # started from 0: the old value must have been evicted
                want = _ABSENT
            if want is _ABSENT:
                assert got == delta
                self._put(k, got, self._deadline(ttl))
            else:
                assert got == want + delta
                deadline = self.model[k][1]  # an existing key keeps its deadline ...
                if want == 0 and not self.EXACT and self._evictions() > self.stamp[k]:
                    # ... unless a 0 was evicted and incr started afresh: same value, new deadline
                    left = self.cache.ttl(k)
                    now_deadline = None if left is None else self.clock.now + left
                    assert now_deadline in (deadline, self._deadline(ttl))
                    deadline = now_deadline
                self._put(k, got, deadline)

        @rule(k=keys, ttl=TTLS)
        def touch(self, k, ttl):
            done = self.cache.touch(k, ttl)
            if not done and self._live(k):
                self._vanished(k)
            assert done is self._live(k)
            if done:
                self.model[k] = (self.model[k][0], self._deadline(ttl))

        @rule(seconds=st.sampled_from([0.5, 1, 2, 3]))
        def advance(self, seconds):
            self.clock.now += seconds

        @rule(k=keys)
        def get(self, k):
            got = self.cache.get(k, _ABSENT)
            if got is _ABSENT and self._live(k):
                self._vanished(k)
            want = self._expect(k)
            assert got is want if want is _ABSENT else self._same(got, want), (k, got, want)

        @rule(k=keys)
        def contains(self, k):
            present = k in self.cache
            if not present and self._live(k):
                self._vanished(k)
            assert present is self._live(k)

        @rule(k=keys)
        def ttl(self, k):
            try:
                left = self.cache.ttl(k)
            except KeyError:
                if self._live(k):
                    self._vanished(k)
                assert not self._live(k)
                return
            assert self._live(k)
            d = self.model[k][1]
            assert left == (None if d is None else d - self.clock.now)

        @rule()
        def clear(self):
            self.cache.clear()
            self.model.clear()

        @precondition(lambda self: not self.EXACT)
        @rule()
        def length(self):
            live = [k for k in self.model if self._live(k)]
            assert len(self.cache) <= len(live)

        # -- invariants --------------------------------------------------------------------------
        @invariant()
        def every_key_agrees_with_model(self):
            for k in all_keys:
                present = k in self.cache  # no side effects: safe to ask after every step
                if self._live(k):
                    if not present:
                        self._vanished(k)
                else:
                    assert not present, f"{k!r} is absent or expired in the model but in the cache"
                    assert self.cache.get(k, _ABSENT) is _ABSENT

        @invariant()
        def returned_entries_match_model(self):
            items = self.cache.items()
            keys = [k for k, _v in items]
            assert len(keys) == len(set(keys)), "a key listed twice"
            for k, v in items:
                assert self._live(k), f"{k!r} listed but absent or expired in the model"
                assert self._same(v, self.model[k][0]), (k, v, self.model[k][0])
            assert sorted(self.cache.keys(), key=repr) == sorted(keys, key=repr)
            assert len(self.cache) == len(keys)
            if self.EXACT:
                live = {k for k in self.model if self._live(k)}
                assert set(keys) == live
                assert self._evictions() == 0

    CacheModel.__name__ = CacheModel.__qualname__ = name
    return CacheModel


# database=None: no .hypothesis/ in the repo; print_blob lets a failure be replayed.
SETTINGS = dict(
    deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ExactModel = make_machine(
    "ExactModel",
    keys=["a", "b", "c", "d", "e", "f", b"a", b"b", "\u00e9", "long-key-" + "x" * 40],
    values=_values(2000),
    cache_kw=dict(size="1MiB", stripes=2),
    exact=True,
)
TestExactModel = ExactModel.TestCase
TestExactModel.settings = settings(max_examples=100, stateful_step_count=50, **SETTINGS)

# 1 stripe, 4 items, ~180 KB of arena in 4 segments (max_value_size sizes them):
# 30 keys of up to 40 KB evict on items and on bytes.
LRUModel = make_machine(
    "LRUModel",
    keys=[f"k{i}" for i in range(26)] + [b"k0", b"k1", b"k2", b"k3"],
    values=_values(40_000),
    cache_kw=dict(size="256KiB", stripes=1, max_items=4, max_value_size=41_000),
    exact=False,
)
TestLRUModel = LRUModel.TestCase
TestLRUModel.settings = settings(max_examples=100, stateful_step_count=50, **SETTINGS)
