"""Eviction policies: what reclaiming a segment does with a live entry.

A policy is an object the arena consults, not ``if`` branches in the write
path (cachetools overrides ``popitem`` per policy; Redis' ``performEvictions``
is one entry point with a written contract). The arena (arena.py) calls:

- ``keep(accessed, roomy)`` for each live, unexpired entry of the segment
  being reclaimed: True copies it forward to the head segment (a second
  chance), False evicts it. ``roomy``: the stripe's live entries fill at most
  3/4 of the segments a reclaim leaves in use (the rest is dead: overwritten,
  deleted or expired entries) and the stripe is below its item cap, so the
  reclaim is really a compaction and nothing needs to go. Expired entries are
  always dropped, whatever the policy.
- ``evicts``: whether the policy may drop live entries at all. A policy that
  may not (``noeviction``) has the arena check, before it changes anything,
  that everything live in the segment fits in the head; if not, the write
  raises ``CacheFull`` and the cache is as it was.

Second chance at segment granularity is CLOCK over a FIFO of segments, as in
Segcache (NSDI'21) and S3-FIFO (SOSP'23): an entry read since it was written
(or last copied forward) survives one more trip around the ring, with its bit
cleared; one that was not is evicted with its segment. Measured against an
exact LRU of the same number of items (benchmarks/bench_full.py) it is
within a point on Zipf traces and ahead on traces with one-time scans, since
a scanned key is never read again and so never copied forward.
"""

from __future__ import annotations

from . import layout as L


class Policy:
    """Base: the contract the arena relies on (see the module docstring)."""

    name = ""
    #: May live entries be dropped to make room?
    evicts = True

    def keep(self, accessed: bool, roomy: bool) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError


class SecondChance(Policy):
    """``"lru"``: approximated LRU. Accessed entries are copied forward once
    (bit cleared), the others are evicted, unless the stripe is roomy: a cache
    whose live data is small (most of its ring dead after overwrites, deletes
    or expiry) evicts nothing."""

    name = "lru"
    evicts = True

    def keep(self, accessed: bool, roomy: bool) -> bool:
        return accessed or roomy


class NoEviction(Policy):
    """``"noeviction"`` (Redis' name): never drop a live entry; a write that
    needs room that only eviction could give raises ``CacheFull``."""

    name = "noeviction"
    evicts = False

    def keep(self, accessed: bool, roomy: bool) -> bool:
        return True


POLICIES = {L.HEADER_POLICY_LRU: SecondChance(), L.HEADER_POLICY_NOEVICTION: NoEviction()}


def for_header(code: int) -> Policy:
    """The policy object for a header's policy code."""
    return POLICIES[code]
