"""Create, attach, detach and unlink the shared memory segment.

One cache = one POSIX shared memory object ``/shmcache.<name>`` (on Linux
``/dev/shm/shmcache.<name>``). Its stripe locks live inside it (lock.py); up
to layout 5 each stripe also had a POSIX semaphore, ``sem.shmcache.<name>.<i>``,
which :meth:`Segment.unlink` still removes.

Create-or-attach race: every process opens the object with O_CREAT and then
takes the *init lock*, an ``fcntl`` byte lock on the object's fd that the
kernel releases if the holder dies. Under it, a process finds either a complete
header (attach) or an empty or half-written one (a creator died, or nobody has
initialized yet), which it initializes itself. The magic is written last, so
"magic present" means "header complete". An attacher with ``create=False``
waits (bounded) for the magic instead.

Reservation: the initializer reserves every page of the segment with
``posix_fallocate`` before anything is mapped, after checking the free space
first. On a small /dev/shm (Docker's
64 MiB default) a cache that does not fit is refused with
:class:`~shmcache.errors.OutOfSharedMemory` naming the fix, instead of a
SIGBUS in whichever process first touches a page the filesystem cannot back.
A sparse ``ftruncate`` alone (what POSIX shm gives) was rejected for exactly
that reason: the failure surfaced later, in another process, mid-write,
holding a stripe lock.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import grp
import mmap
import os
import pwd
import stat
import struct
import sys
import threading
import time
from contextlib import contextmanager

import posix_ipc

from . import layout

try:  # one fstat without a stat_result object, before each full unpickle
    from ._speedups import fd_private as _fd_private
except ImportError:  # pragma: no cover - pure-Python install
    _fd_private = None
from .errors import (
    CacheNotFound,
    LayoutMismatch,
    LockTimeout,
    OutOfSharedMemory,
    PermissionDenied,
    SharedMemoryUnavailable,
    UntrustedSegment,
)

if not sys.platform.startswith("linux"):  # pragma: no cover - macOS, BSDs
    raise ImportError(
        "shmcache runs on Linux only: its stripe locks sleep with futex(2) and its liveness "
        f"checks use OFD fcntl locks, which {sys.platform} lacks"
    )

# fcntl byte-range locks on the segment fd. The kernel drops them when the
# holder dies, which is why the rare paths use them (measured ~1.5 us per
# lock/unlock pair, too slow for every write: stripes have lock words).
# Bytes 0-2 are classic POSIX locks taken for a moment (per process, so a
# thread lock makes them exclusive between threads too); byte 3 and each
# client record's first byte are held for a lifetime: LOCK_DAEMON a POSIX
# lock (not inherited by fork), client bytes OFD locks (see lock.Client).
LOCK_INIT = 0  # create-or-attach
LOCK_CLIENTS = 1  # claim / release / reap client slots
# byte 2 took part in stripe recovery up to layout 5; unused since
LOCK_DAEMON = 3  # held by the running daemon for its lifetime

SHM_DIR = "/dev/shm"

# Returned by _try_open when the name was removed while we waited for the init
# lock (a creator that failed unlinks its empty file): open the name again.
_REOPEN = object()

# fcntl locks belong to the process, not the thread: two threads would both
# "get" one. A process-wide threading lock per (inode, byte) makes them
# exclusive between threads too.
_thread_locks: dict[tuple[int, int], threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _reset_thread_locks_after_fork() -> None:
    # A lock held by another thread at fork time would stay held forever in the
    # child; fcntl locks are not inherited across fork anyway.
    global _thread_locks_guard
    _thread_locks.clear()
    _thread_locks_guard = threading.Lock()


#: (inode, byte) of the lifetime locks this process holds (Segment.try_file_lock).
_held_for_life: set[tuple[int, int]] = set()


def _reset_after_fork() -> None:
    _reset_thread_locks_after_fork()
    _held_for_life.clear()  # classic POSIX locks are not inherited


os.register_at_fork(after_in_child=_reset_after_fork)


def shm_name(name: str) -> str:
    """The POSIX name of a cache's segment."""
    return f"/shmcache.{name}"


def sem_name(name: str, stripe: int) -> str:
    """The POSIX name a stripe's semaphore had up to layout 5 (see unlink)."""
    return f"/shmcache.{name}.{stripe}"


class Segment:
    """An open mapping of one cache's segment."""

    def __init__(self, name: str, shm, mm: mmap.mmap, geometry: layout.Geometry, created: bool):
        self.name = name
        self._shm = shm
        self.fd = shm.fd
        self.mm = mm
        self.geometry = geometry
        #: True if this process initialized the segment.
        self.created = created
        self._ino = os.fstat(self.fd).st_ino
        self._held: set[int] = set()  # try_file_lock bytes held by this Segment
        self.closed = False
        #: True if nobody but this process's user can write the segment (its
        #: owner is our euid and it has no group/other write bits): the only
        #: case in which values are unpickled by default (see codec.py).
        self.private = False
        self._uid = os.geteuid()  # the user privacy is judged for (the euid at open)
        #: uids trusted as writers (this process's user, or owner=)
        self.trusted_uids = frozenset({os.geteuid()})

    # -- open -------------------------------------------------------------
    @classmethod
    def open(
        cls,
        name: str,
        *,
        create: bool = True,
        geometry_args: dict | None = None,
        mode: int = 0o600,
        timeout: float = 5.0,
        owner: int | str | None = None,
    ) -> "Segment":
        """Create the named segment or attach to the existing one.

        ``geometry_args`` are passed to :func:`layout.compute_geometry` when
        this process ends up creating the segment; they are validated first
        either way, so a bad setting fails before anything is created.

        Creation is exclusive (``O_CREAT|O_EXCL``): a file this process did not
        create is never truncated, initialized or overwritten. Attaching
        checks the open descriptor (``fstat``, not the path) before reading a
        byte: the owner must be this process's effective uid or ``owner``
        (a uid or user name the caller trusts), and the mode may grant nothing
        beyond ``mode``. The header is then checked against its own settings
        and the file's real size.

        Raises:
            ValueError / TypeError: bad name, setting, mode or owner.
            CacheNotFound: ``create=False`` and no such cache.
            UntrustedSegment: the segment belongs to another
                user, grants more than ``mode``, or is not a regular file.
            LayoutMismatch: the segment is foreign, of another layout version,
                or damaged (a header inconsistent with itself or its size, no magic).
            LockTimeout: another process held the init lock (or left a
                half-initialized segment) for longer than ``timeout`` seconds.
            OutOfSharedMemory: creating it would not fit in /dev/shm (nothing is left behind).
            PermissionDenied: the cache belongs to another user or group.
            SharedMemoryUnavailable: /dev/shm is missing or read-only, or the
                name is taken by something that is not a segment.
        """
        layout.validate_name(name)
        mode = validate_mode(mode)
        trusted = {os.geteuid(), resolve_owner(owner)}
        # Validate the settings before touching the system (raises on bad input).
        layout.compute_geometry(**(geometry_args or {"size": layout.MIN_SIZE}))
        deadline = time.monotonic() + timeout
        shm, created = _create_or_open(name, create, mode, trusted)
        try:
            while True:
                seg = cls._try_open(name, shm, created, geometry_args, mode, trusted, deadline)
                if seg is _REOPEN:
                    shm.close_fd()
                    shm = None
                    shm, created = _create_or_open(name, create, mode, trusted)
                    continue
                if seg is not None:
                    seg.trusted_uids = frozenset(trusted)
                    return seg
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"cache {name!r} was not initialized within {timeout} s "
                        "(its creator may have died; remove it with Cache.unlink or 'shmcache rm')"
                    )
                time.sleep(0.002)
        except BaseException:
            if shm is not None:
                shm.close_fd()
            raise

    @classmethod
    def _try_open(cls, name, shm, created, geometry_args, mode, trusted, deadline):
        fd = shm.fd
        with _file_lock(fd, LOCK_INIT, max(0.0, deadline - time.monotonic()), what="init"):
            st = os.fstat(fd)
            if st.st_nlink == 0:
                return _REOPEN  # a creator that failed removed this file: open the name again
            if created:  # nobody else can have written to a file we created exclusively
                geometry = layout.compute_geometry(
                    **(geometry_args or {"size": layout.MIN_SIZE}), mode=mode, created=time.time()
                )
                return cls._initialize(name, shm, geometry, mode)
            size = st.st_size
            if size == 0:
                return None  # its creator has not taken the init lock yet: wait for the magic
            if size < layout.PAGE:
                # Our creator sizes the file under the init lock, so a non-empty
                # file smaller than a page was made by someone else.
                raise LayoutMismatch(
                    f"{SHM_DIR}{shm_name(name)} is a {size}-byte file, not a shmcache segment "
                    f"(this shmcache reads layout version {layout.LAYOUT_VERSION}); remove it or pick another name"
                )
            head = os.pread(fd, layout.HEADER.size, 0)
            if head[:8] == b"\0" * 8:
                # Under the init lock a live creator has either not started (size 0)
                # or finished (magic written): this one died mid-way, or the magic
                # of a live segment was wiped. Re-initializing would wipe every
                # attached process's data under it, so refuse and leave it alone.
                raise LayoutMismatch(
                    f"segment {shm_name(name)} has no shmcache magic: its creator died while "
                    f"creating it or it was damaged; nothing was changed. Remove it with "
                    f"'shmcache rm {name}' (or Cache.unlink) and create it again"
                )
            geometry = layout.Geometry.unpack_header(head, where=f"segment {shm_name(name)}")
            geometry.check(size, where=f"segment {shm_name(name)}", name=name)
            return cls._attach(name, shm, geometry, mode, trusted)

    @classmethod
    def _initialize(cls, name, shm, geometry, mode):
        fd = shm.fd
        os.ftruncate(fd, 0)  # zero any half-written header a dead creator left
        try:
            _reserve(name, fd, geometry)
            os.fchmod(fd, mode)  # shm_open applied the umask; the user asked for `mode`
        except BaseException:
            # Nothing of a cache that could not be made may stay behind: an
            # empty file would make the next opener fail the same way, and
            # leak. Under the init lock; waiters see nlink 0 and reopen.
            os.ftruncate(fd, 0)
            try:
                posix_ipc.unlink_shared_memory(shm_name(name))
            except posix_ipc.ExistentialError:
                pass
            raise
        mm = mmap.mmap(fd, geometry.total_size)
        mm[0 : layout.HEADER.size] = geometry.pack_header()
        mm[0:8] = layout.MAGIC  # last: the header is now complete
        seg = cls(name, shm, mm, geometry, created=True)
        seg.private = not mode & 0o022
        return seg

    @classmethod
    def _attach(cls, name, shm, geometry, mode, trusted):
        st = os.fstat(shm.fd)
        mm = mmap.mmap(shm.fd, geometry.total_size)
        seg = cls(name, shm, mm, geometry, created=False)
        seg.private = st.st_uid == os.geteuid() and not st.st_mode & 0o022
        return seg

    def trust(self) -> tuple[frozenset, int]:
        """(uids trusted as writers, the segment's mode bits now): what a
        snapshot restored into it is held to (snapshot.py). The mode is read
        from the open file, so a chmod since the open counts."""
        return self.trusted_uids, os.fstat(self.fd).st_mode & 0o777

    def still_private(self) -> bool:
        """Is the segment still writable only by this process's user (owner
        the euid it had when it opened the segment, no group or other write
        bit)? Asked of the open file, so a chmod or chown since it was opened
        counts; a process that drops privileges later (seteuid) keeps judging
        for the user whose segment it opened. (A process that opened it
        while it was shared keeps its write access: narrowing a mode later
        does not take that back.)"""
        if _fd_private is not None:
            return _fd_private(self.fd, self._uid)
        st = os.fstat(self.fd)
        return st.st_uid == self._uid and not st.st_mode & 0o022

    # -- locks --------------------------------------------------------------
    def file_lock(self, byte: int, timeout: float, what: str = "lock"):
        """Context manager: hold fcntl lock ``byte`` of this segment (kernel-released on death).

        Raises:
            LockTimeout: not acquired within ``timeout`` seconds.
        """
        return _file_lock(self.fd, byte, timeout, what, self._ino)

    def try_file_lock(self, byte: int) -> bool:
        """Take fcntl lock ``byte`` without waiting and keep it until the process exits
        or :meth:`close`. Returns False if another process holds it."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
            _held_for_life.add((self._ino, byte))
            self._held.add(byte)
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise

    def holds_file_lock(self, byte: int) -> bool:
        """True if this process took lock ``byte`` with :meth:`try_file_lock` (on
        any Segment of this file): F_GETLK does not report our own locks."""
        return (self._ino, byte) in _held_for_life

    def file_lock_holder(self, byte: int) -> int | None:
        """The pid holding fcntl lock ``byte``, or None (F_GETLK)."""
        res = fcntl.fcntl(self.fd, fcntl.F_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        ltype, _, _, _, pid = _FLOCK.unpack(res)
        return None if ltype == fcntl.F_UNLCK else pid

    # -- liveness (see lock.Client) -------------------------------------------
    def private_fd(self) -> int:
        """A new open file description of this segment (O_CLOEXEC): OFD locks
        taken through it belong to it alone, not to the fd the mapping came from
        (which a forked child shares for as long as it keeps the mapping)."""
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:  # no /proc: by name, then make sure it is the same file
            fd = os.open(shm_path(self.name), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        if os.fstat(fd).st_ino != self._ino:
            os.close(fd)
            raise LayoutMismatch(f"cache {self.name!r} was removed and recreated while attaching; try again")
        return fd

    def ofd_locked(self, byte: int) -> bool:
        """True if another open file description holds an OFD (or POSIX) lock on ``byte``."""
        res = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK

    @staticmethod
    def ofd_try_lock(fd: int, byte: int) -> bool:
        """Write-lock ``byte`` through open file description ``fd`` if free. True if taken."""
        return ofd_try_lock(fd, byte)

    @staticmethod
    def ofd_unlock(fd: int, byte: int) -> None:
        """Release ``fd``'s OFD lock on ``byte``."""
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, byte, 1, 0))

    # -- close / unlink -----------------------------------------------------
    def close(self) -> None:
        """Unmap and close the fd. Idempotent. Does not unlink."""
        if self.closed:
            return
        self.closed = True
        for byte in self._held:
            _held_for_life.discard((self._ino, byte))
        try:
            self.mm.close()
        except BufferError:  # a numpy view is still alive somewhere; the GC unmaps it
            pass
        self._shm.close_fd()

    @staticmethod
    def unlink(name: str) -> bool:
        """Remove a cache's segment (and the semaphores a layout-5 cache of this
        name had). True if anything was removed.

        Processes still attached keep their mapping until they close it.

        Raises:
            ValueError / TypeError: bad name.
        """
        layout.validate_name(name)
        removed = False
        try:
            posix_ipc.unlink_shared_memory(shm_name(name))
            removed = True
        except posix_ipc.ExistentialError:
            pass
        # Semaphores of a cache made before layout 6, one per stripe (also of
        # one whose segment is gone): /dev/shm/sem.shmcache.<name>.<i>.
        stripes = set()
        for p in glob.glob(os.path.join(SHM_DIR, f"sem.shmcache.{glob.escape(name)}.*")):
            suffix = p.rsplit(".", 1)[1]
            if suffix.isdigit():
                stripes.add(int(suffix))
        for i in sorted(stripes):
            try:
                posix_ipc.unlink_semaphore(sem_name(name, i))
                removed = True
            except posix_ipc.ExistentialError:
                pass
        return removed

    @staticmethod
    def list_names() -> list[str]:
        """Names of the caches whose segments exist on this host (Linux: /dev/shm)."""
        prefix = os.path.join(SHM_DIR, "shmcache.")
        return sorted(p[len(prefix):] for p in glob.glob(prefix + "*"))


def shm_path(name: str) -> str:
    """The file of a cache's segment (Linux)."""
    return os.path.join(SHM_DIR, shm_name(name).lstrip("/"))


def _create_or_open(name: str, create: bool, mode: int, trusted) -> tuple:
    """(shm, created): create the segment exclusively, or open the existing one
    and check that it is trusted (owner, mode, regular file) before anything
    reads it. A creator sets the mode it was asked for at once (shm_open
    applied the umask).

    Raises:
        as :func:`_open_shm`; UntrustedSegment.
    """
    for _ in range(3):  # the name may vanish between a failed create and the open
        if create:
            try:
                shm = _open_shm(name, True, mode)
                try:
                    os.fchmod(shm.fd, mode)
                except BaseException:
                    shm.close_fd()
                    raise
                return shm, True
            except posix_ipc.ExistentialError:
                pass  # it exists: attach
        try:
            shm = _open_shm(name, False, mode)
        except CacheNotFound:
            if not create:
                raise
            continue
        try:
            check_trusted(os.fstat(shm.fd), shm_path(name), name, trusted, mode)
        except BaseException:
            shm.close_fd()
            raise
        return shm, False
    raise LockTimeout(f"cache {name!r} kept appearing and disappearing while opening it; try again")  # pragma: no cover


def _open_shm(name: str, create: bool, mode: int):
    """shm_open the cache's segment (``create``: exclusively, O_CREAT|O_EXCL),
    turning every way the environment can refuse into a shmcache error that
    says what to do. glibc's shm_open adds O_NOFOLLOW: a symlink is never followed."""
    path = shm_name(name)
    try:
        if create:
            return posix_ipc.SharedMemory(path, posix_ipc.O_CREX, mode=mode)
        return posix_ipc.SharedMemory(path)
    except posix_ipc.PermissionsError:
        raise _permission_denied(name, shm_path(name)) from None
    except ValueError:  # posix_ipc's EINVAL/EISDIR: the name is not a regular file
        _check_foreign(name)
        raise
    except posix_ipc.ExistentialError:
        _check_shm_dir()
        if create:  # pragma: no cover - O_CREAT does not fail with ENOENT in an existing directory
            raise
        raise CacheNotFound(f"no cache named {name!r} on this host (no {path})") from None
    except OSError as e:
        if e.errno == errno.EROFS:
            raise SharedMemoryUnavailable(
                f"{SHM_DIR} is read-only, so cache {name!r} cannot be {'created' if create else 'opened'}: "
                f"shmcache needs a writable tmpfs there (Docker: do not mount {SHM_DIR} read-only; Kubernetes: "
                f"mount an emptyDir with medium: Memory at {SHM_DIR})"
            ) from None
        if e.errno in (errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENXIO, errno.EINVAL):
            _check_foreign(name)
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise _no_inodes(name) or OutOfSharedMemory(
                f"no room in {SHM_DIR} to create cache {name!r} ({e.strerror}); free some or give the "
                "container more (docker run --shm-size=...)"
            ) from None
        raise


def _check_foreign(name: str) -> None:
    """Raise SharedMemoryUnavailable if the cache's name is taken by something
    that is not a regular file (a directory, a device, a socket...)."""
    import stat

    try:
        st = os.lstat(shm_path(name))
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise SharedMemoryUnavailable(
            f"{shm_path(name)} exists and is not a shmcache segment (not a regular file); "
            "remove it or pick another cache name"
        )


def _check_shm_dir() -> None:
    if not os.path.isdir(SHM_DIR):
        raise SharedMemoryUnavailable(
            f"{SHM_DIR} does not exist: POSIX shared memory needs a tmpfs mounted there "
            f"(mount -t tmpfs -o size=512m tmpfs {SHM_DIR}; containers get one by default)"
        )


def _free_bytes(total: bool = False) -> int | None:
    """Bytes free in /dev/shm for us (``total``: its whole size); None if unknown."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:  # pragma: no cover
        return None
    return (st.f_blocks if total else st.f_bavail) * st.f_frsize


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def reservation_bytes(geometry: layout.Geometry) -> int:
    """The /dev/shm bytes a cache of this geometry takes (its segment)."""
    return geometry.total_size


def _no_room(name: str, geometry: layout.Geometry, free: int | None) -> OutOfSharedMemory:
    need = reservation_bytes(geometry)
    total = _free_bytes(total=True)
    have = "?" if free is None else f"{_human(free)} ({free} bytes)"
    of = f" of {_human(total)}" if total else ""
    mib = -(-need // 2**20)
    want = 1 << max(6, (mib - 1).bit_length())  # a power-of-two MiB size with room to spare
    fits = ""
    if free:
        fit = (free - layout.PAGE) // 2**20
        if fit * 2**20 >= layout.MIN_SIZE:
            fits = f' (size="{fit}MiB" fits now)'
    return OutOfSharedMemory(
        f"cache {name!r} needs {_human(need)} ({need} bytes) of shared memory, but {SHM_DIR} has {have} free{of}; "
        f"give it more (docker run --shm-size={want}m, compose shm_size: {want}m, Kubernetes: an emptyDir "
        f"{{medium: Memory, sizeLimit: {want}Mi}} mounted at {SHM_DIR}) or create the cache with a smaller "
        f"size{fits}"
    )


def _no_inodes(name: str) -> OutOfSharedMemory | None:
    """The error for a /dev/shm that has bytes left but no inodes (a tmpfs
    mounted with a small ``nr_inodes``), or None if it has inodes free."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:  # pragma: no cover
        return None
    if not st.f_files or st.f_favail > 0:
        return None
    return OutOfSharedMemory(
        f"cache {name!r} needs a file in {SHM_DIR}, but {SHM_DIR} has run out of inodes ({st.f_files} in all, "
        f"none free), though it has {_human(st.f_bavail * st.f_frsize)} free; remount it with more "
        f"(mount -o remount,nr_inodes=N {SHM_DIR}; Docker and Kubernetes size {SHM_DIR} by bytes only) or "
        f"remove caches you no longer use (shmcache ls, shmcache rm)"
    )


def _reserve(name: str, fd: int, geometry: layout.Geometry) -> None:
    """Size the segment and allocate every page of it now (posix_fallocate), so
    no later store can meet a page the filesystem cannot back (SIGBUS).

    Raises:
        OutOfSharedMemory: /dev/shm cannot hold the segment.
    """
    free = _free_bytes()
    if free is not None and reservation_bytes(geometry) > free:
        raise _no_room(name, geometry, free)
    os.ftruncate(fd, geometry.total_size)
    try:
        os.posix_fallocate(fd, 0, geometry.total_size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise _no_room(name, geometry, _free_bytes()) from None
        raise


def _who(uid: int | None = None, gid: int | None = None) -> str:
    if uid is not None:
        try:
            return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
        except KeyError:
            return f"uid {uid}"
    try:
        return f"{grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"gid {gid}"


def validate_mode(mode) -> int:
    """Check permission bits for a segment: 0o600 (owner read+write) up to 0o777.

    Raises:
        TypeError: not an int.
        ValueError: out of range, or without owner read and write.
    """
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(f"mode must be an int of permission bits like 0o600, not {type(mode).__name__}")
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise ValueError(
            f"mode must be permission bits between 0o600 and 0o777 that include owner read and write "
            f"(0o600 private, 0o660 shared with the group), got {mode!r}"
            + (f" (0o{mode:o})" if mode >= 0 else "")
        )
    return mode


def resolve_owner(owner) -> int:
    """The uid a caller trusts besides itself: None = this process's effective uid.

    Raises:
        TypeError: neither None, an int uid nor a user name.
        ValueError: a negative uid or an unknown user name.
    """
    if owner is None:
        return os.geteuid()
    if isinstance(owner, bool) or not isinstance(owner, (int, str)):
        raise TypeError(f"owner must be a uid (int) or a user name (str), not {type(owner).__name__}")
    if isinstance(owner, int):
        if owner < 0:
            raise ValueError(f"owner must be a uid >= 0, got {owner}")
        return owner
    if owner.isdigit():  # "1000" from a command line
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ValueError(f"owner {owner!r}: no such user on this host") from None


def check_trusted(st: os.stat_result, path: str, name: str, trusted, mode: int) -> None:
    """Refuse a segment file that is not a regular file owned by a
    trusted uid with no permission bits beyond ``mode``.

    Whoever can write a segment decides what every reader gets back (and, with
    pickle, what code it runs), so a file is trusted only by who made it.

    Raises:
        UntrustedSegment: naming the owner, the mode and what to do.
    """
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedSegment(f"{path} is not a regular file; shmcache does not use it (remove it)")
    if st.st_uid not in trusted:
        raise UntrustedSegment(
            f"{path} belongs to {_who(uid=st.st_uid)}, not to you ({_who(uid=os.geteuid())}); shmcache only "
            f"attaches to caches made by a user it trusts, because whoever can write one controls what "
            f"you read from it. If that user is trusted, pass owner={st.st_uid} (CLI/daemon: --owner "
            f"{st.st_uid}); otherwise remove it ('shmcache rm {name}' as that user or root)"
        )
    found = st.st_mode & 0o777
    if found & ~mode:
        raise UntrustedSegment(
            f"{path} has mode 0o{found:o}, which grants more than the mode=0o{mode:o} you asked for "
            f"(extra bits 0o{found & ~mode:o}); if sharing it that widely is intended pass mode=0o{found:o} "
            f"(CLI/daemon: --mode {found:o}), otherwise remove it ('shmcache rm {name}')"
        )


def _permission_denied(name: str, path: str) -> PermissionDenied:
    """The error for a cache this process may not open, with what to change."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    me = f"uid {os.geteuid()}, gid {os.getegid()}, groups {sorted(set(os.getgroups()))}"
    if st is None:
        what = f"{path} is not accessible"
        group = "a group every process is in"
    else:
        what = (f"{path} is owned by user {_who(uid=st.st_uid)}, group {_who(gid=st.st_gid)}, "
                f"mode {st.st_mode & 0o7777:04o}")
        group = f"its group {_who(gid=st.st_gid).split(' ')[0]}"
    return PermissionDenied(
        f"permission denied opening cache {name!r}: {what}; this process runs as {me}. To share a cache "
        f"between users, create it with mode=0o660 (shmcache daemon --mode 660), attach with mode=0o660 and "
        f"owner=<its owner>, and run every process in "
        f"{group} (usermod -aG GROUP USER; Docker --group-add); or remove it (shmcache rm {name}) and let "
        f"this user create it"
    )


# struct flock (x86-64 and arm64 Linux): type, whence, start, len, pid; l_pid
# must be 0 for OFD locks.
_FLOCK = struct.Struct("hhqqi4x")


def ofd_try_lock(fd: int, byte: int) -> bool:
    """Write-lock ``byte`` through open file description ``fd`` without waiting. True if taken."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


@contextmanager
def _file_lock(fd: int, byte: int, timeout: float, what: str, ino: int | None = None):
    if ino is None:
        ino = os.fstat(fd).st_ino
    key = (ino, byte)
    with _thread_locks_guard:
        tl = _thread_locks.setdefault(key, threading.Lock())
    deadline = time.monotonic() + timeout
    if not tl.acquire(timeout=max(0.0, timeout)):
        raise LockTimeout(f"could not take the {what} lock within {timeout} s (held by another thread)")
    try:
        delay = 0.0005
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            if time.monotonic() > deadline:
                raise LockTimeout(f"could not take the {what} lock within {timeout} s (held by another process)")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
        try:
            yield
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, byte)
    finally:
        tl.release()
