"""Sentinels with readable reprs, shared by ``cache`` and ``stampede``.

They live apart so neither module imports the other for them, and so
``help(Cache.set)`` shows ``ttl=DEFAULT_TTL`` instead of ``<object object at 0x...>``.
"""

from __future__ import annotations


class _Sentinel:
    """A named singleton: compared by identity, pickles to itself."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name  # pickled by reference to the module-level name

    def __copy__(self) -> "_Sentinel":
        return self

    def __deepcopy__(self, _memo: object) -> "_Sentinel":
        return self


#: "Use the cache's ``default_ttl``" (the default of every ``ttl=`` argument).
DEFAULT_TTL = _Sentinel("DEFAULT_TTL")
#: "No default given" (``pop``'s second argument, internal misses).
MISSING = _Sentinel("MISSING")
