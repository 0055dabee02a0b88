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


class PickleRefused(Error, ValueError):
    """A value would need full pickle, and this cache does not trust pickle.

    Unpickling runs code chosen by whoever wrote the value. By default only a
    cache that nobody but this user can write (owner is this user, no group or
    other write bits) uses full pickle; a shared cache stores bytes, str, int,
    float, numpy arrays and plain containers of them (list, tuple, dict, set,
    None, bool), a ``serializer=``, or full pickle with ``allow_pickle=True``.
    """


class DaemonError(Error):
    """The daemon cannot run: another daemon serves the cache, or a setting is unusable."""


class OutOfSharedMemory(Error, MemoryError):
    """Creating the cache would not fit in the shared memory filesystem (/dev/shm).

    Raised at creation, before the cache exists, instead of a SIGBUS later: the
    segment is reserved with ``posix_fallocate``. The message names the space
    free, the size asked for and the fix (``docker run --shm-size``, a
    Kubernetes memory-backed ``emptyDir``, or a smaller ``size``).
    """


class SharedMemoryUnavailable(Error, OSError):
    """``/dev/shm`` is missing, read-only, or the cache's name is taken by
    something that is not a shmcache segment; the message says which."""


class PermissionDenied(Error, PermissionError):
    """This process may not open the cache: the message names the cache, its
    owner, group and mode, and how to share it (``mode=0o660`` and a group
    every process is in)."""


class UntrustedSegment(PermissionDenied):
    """The segment (or a snapshot file) is not one this process may trust:
    it belongs to another user, grants more access than the caller's ``mode``,
    or is not a regular file. Nothing was read from it and nothing was changed.

    A PermissionDenied that shmcache decides, not the kernel. The message
    names the owner and mode found and what to do (pass ``owner=``
    or ``mode=`` if that is intended; otherwise remove the file).
    """


class SettingsMismatch(Error, ValueError):
    """``strict=True`` and the existing cache was created with other layout
    settings (each named with its real value) than the ones given."""


class SettingsIgnored(UserWarning):
    """Attached to an existing cache whose layout settings differ from the ones
    given; the existing ones win. Issued once per cache and settings per process."""
