"""shmcache: a cache shared by every process on one host, in POSIX shared memory.

>>> from shmcache import Cache
>>> cache = Cache("app", size="256MiB")   # create or attach
>>> cache["k"] = b"v"; cache.get("k")
"""

from . import admin
from .cache import Cache
from .errors import (
    CacheFull,
    CacheNotFound,
    DaemonError,
    Error,
    KeyTooLong,
    LayoutMismatch,
    LockTimeout,
    OutOfSharedMemory,
    PermissionDenied,
    SettingsIgnored,
    SettingsMismatch,
    SharedMemoryUnavailable,
    PickleRefused,
    SnapshotError,
    UntrustedSegment,
    ValueTooLarge,
)
from .layout import LAYOUT_VERSION, parse_size

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "admin",
    "CacheFull",
    "CacheNotFound",
    "DaemonError",
    "Error",
    "KeyTooLong",
    "LAYOUT_VERSION",
    "LayoutMismatch",
    "LockTimeout",
    "OutOfSharedMemory",
    "PermissionDenied",
    "SettingsIgnored",
    "SettingsMismatch",
    "SharedMemoryUnavailable",
    "PickleRefused",
    "UntrustedSegment",
    "ValueTooLarge",
    "SnapshotError",
    "parse_size",
]
