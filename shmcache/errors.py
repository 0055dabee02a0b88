"""Exceptions raised by shmcache. Each names what the user can do about it."""


class Error(Exception):
    """Base class of every shmcache-specific error."""


class CacheFull(Error):
    """No room for the entry under the ``"noeviction"`` policy (or no free client slot).

    The message says which setting to raise (``size``, ``max_items`` or
    ``max_clients``) or suggests ``policy="lru"``.
    """


class KeyTooLong(Error, ValueError):
    """The encoded key is longer than the cache's ``max_key_size`` (in the message)."""


class ValueTooLarge(Error, ValueError):
    """The encoded value is larger than the cache's ``max_value_size`` (in the message)."""


class LayoutMismatch(Error):
    """The segment is not a shmcache segment, or was made by another layout version.

    The message names both versions. Nothing is guessed and nothing is changed.
    """


class LockTimeout(Error, TimeoutError):
    """A stripe lock stayed held by a live process for longer than the timeout."""


class CacheNotFound(Error, FileNotFoundError):
    """Attaching (``create=False``) to a cache that does not exist."""


class SnapshotError(Error, ValueError):
    """A snapshot file is missing, truncated, corrupt, foreign or of a newer
    format. The message names the file and what failed; nothing was changed."""


class DaemonError(Error):
    """The daemon cannot run: another daemon serves the cache, or a setting is unusable."""
