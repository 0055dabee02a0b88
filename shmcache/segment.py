"""Create, attach, detach and unlink the shared memory segment and its semaphores.

One cache = one POSIX shared memory object ``/shmcache.<name>`` plus one
POSIX semaphore per stripe, ``/shmcache.<name>.<i>`` (on Linux these appear as
``/dev/shm/shmcache.<name>`` and ``/dev/shm/sem.shmcache.<name>.<i>``).

Create-or-attach race: every process opens the object with O_CREAT and then
takes the *init lock*, an ``fcntl`` byte lock on the object's fd that the
kernel releases if the holder dies. Under it, a process finds either a complete
header (attach) or an empty or half-written one (a creator died, or nobody has
initialized yet), which it initializes itself. The magic is written last, so
"magic present" means "header complete". An attacher with ``create=False``
waits (bounded) for the magic instead.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import mmap
import os
import threading
import time
from contextlib import contextmanager

import posix_ipc

from . import layout
from .errors import CacheNotFound, LayoutMismatch, LockTimeout

if not posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED:  # pragma: no cover - macOS
    raise ImportError(
        "shmcache needs timed semaphore waits (sem_timedwait), which this platform "
        "lacks (posix_ipc.SEMAPHORE_TIMEOUT_SUPPORTED is False); without them a dead "
        "lock holder could hang every writer. Linux is supported."
    )

# fcntl byte-range locks on the segment fd. The kernel drops them when the
# holder dies, which is why the rare paths use them instead of semaphores
# (measured ~1.5 us per lock/unlock pair, too slow for every write).
LOCK_INIT = 0  # create-or-attach
LOCK_CLIENTS = 1  # claim / release / reap client slots
LOCK_RECOVERY = 2  # repair a stripe whose lock owner died
LOCK_DAEMON = 3  # held by the running daemon for its lifetime

SHM_DIR = "/dev/shm"

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


os.register_at_fork(after_in_child=_reset_thread_locks_after_fork)


def shm_name(name: str) -> str:
    """The POSIX name of a cache's segment."""
    return f"/shmcache.{name}"


def sem_name(name: str, stripe: int) -> str:
    """The POSIX name of a stripe's semaphore."""
    return f"/shmcache.{name}.{stripe}"


class Segment:
    """An open mapping of one cache's segment plus its stripe semaphores."""

    def __init__(self, name: str, shm, mm: mmap.mmap, geometry: layout.Geometry, sems, created: bool):
        self.name = name
        self._shm = shm
        self.fd = shm.fd
        self.mm = mm
        self.geometry = geometry
        self.sems = sems
        #: True if this process initialized the segment.
        self.created = created
        self._ino = os.fstat(self.fd).st_ino
        self.closed = False

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
    ) -> "Segment":
        """Create the named segment or attach to the existing one.

        ``geometry_args`` are passed to :func:`layout.compute_geometry` when
        this process ends up creating the segment; they are validated first
        either way, so a bad setting fails before anything is created.

        Raises:
            ValueError / TypeError: bad name or setting.
            CacheNotFound: ``create=False`` and no such cache.
            LayoutMismatch: the segment is foreign or of another layout version.
            LockTimeout: another process held the init lock (or left a
                half-initialized segment) for longer than ``timeout`` seconds.
        """
        layout.validate_name(name)
        # Validate the settings before touching the system (raises on bad input).
        layout.compute_geometry(**(geometry_args or {"size": layout.MIN_SIZE}))
        path = shm_name(name)
        deadline = time.monotonic() + timeout
        if create:
            shm = posix_ipc.SharedMemory(path, posix_ipc.O_CREAT, mode=mode)
        else:
            try:
                shm = posix_ipc.SharedMemory(path)
            except posix_ipc.ExistentialError:
                raise CacheNotFound(f"no cache named {name!r} on this host (no {path})") from None
        try:
            while True:
                seg = cls._try_open(name, shm, create, geometry_args, mode, deadline)
                if seg is not None:
                    return seg
                if time.monotonic() > deadline:
                    raise LockTimeout(
                        f"cache {name!r} was not initialized within {timeout} s "
                        "(its creator may have died; remove it with Cache.unlink or 'shmcache rm')"
                    )
                time.sleep(0.002)
        except BaseException:
            shm.close_fd()
            raise

    @classmethod
    def _try_open(cls, name, shm, create, geometry_args, mode, deadline):
        fd = shm.fd
        with _file_lock(fd, LOCK_INIT, max(0.0, deadline - time.monotonic()), what="init"):
            size = os.fstat(fd).st_size
            if 0 < size < layout.PAGE:
                # Our creator truncates to 0 and then to the full size, so a
                # non-empty file smaller than a page was made by someone else.
                raise LayoutMismatch(
                    f"{SHM_DIR}{shm_name(name)} is a {size}-byte file, not a shmcache segment "
                    f"(this shmcache reads layout version {layout.LAYOUT_VERSION}); remove it or pick another name"
                )
            if size >= layout.PAGE:
                head = os.pread(fd, layout.HEADER.size, 0)
                if head[:8] != b"\0" * 8:
                    geometry = layout.Geometry.unpack_header(head, where=f"segment {shm_name(name)}")
                    if size < geometry.total_size:
                        raise LayoutMismatch(
                            f"segment {shm_name(name)} is {size} bytes but its header says "
                            f"{geometry.total_size}; it is damaged: remove it with 'shmcache rm {name}'"
                        )
                    return cls._attach(name, shm, geometry)
            if not create:
                return None  # someone is about to initialize; wait for the magic
            geometry = layout.compute_geometry(**geometry_args, mode=mode, created=time.time())
            return cls._initialize(name, shm, geometry, mode)

    @classmethod
    def _initialize(cls, name, shm, geometry, mode):
        fd = shm.fd
        os.ftruncate(fd, 0)  # zero any half-written header a dead creator left
        os.ftruncate(fd, geometry.total_size)
        os.fchmod(fd, mode)  # shm_open applied the umask; the user asked for `mode`
        sems = []
        try:
            for i in range(geometry.n_stripes):
                sname = sem_name(name, i)
                try:  # a semaphore left from an earlier cache of this name
                    posix_ipc.unlink_semaphore(sname)
                except posix_ipc.ExistentialError:
                    pass
                sems.append(posix_ipc.Semaphore(sname, posix_ipc.O_CREX, mode=mode, initial_value=1))
                _chmod_sem(sname, mode)
        except BaseException:
            for s in sems:
                s.close()
            raise
        mm = mmap.mmap(fd, geometry.total_size)
        mm[0 : layout.HEADER.size] = geometry.pack_header()
        mm[0:8] = layout.MAGIC  # last: the header is now complete
        return cls(name, shm, mm, geometry, sems, created=True)

    @classmethod
    def _attach(cls, name, shm, geometry):
        sems = []
        try:
            for i in range(geometry.n_stripes):
                sems.append(posix_ipc.Semaphore(sem_name(name, i)))
        except posix_ipc.ExistentialError:
            for s in sems:
                s.close()
            raise LayoutMismatch(
                f"cache {name!r} is missing semaphore {sem_name(name, len(sems))}; it is damaged: "
                f"remove it with 'shmcache rm {name}' (or Cache.unlink)"
            ) from None
        mm = mmap.mmap(shm.fd, geometry.total_size)
        return cls(name, shm, mm, geometry, sems, created=False)

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
            return True
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise

    def file_lock_holder(self, byte: int) -> int | None:
        """The pid holding fcntl lock ``byte``, or None (F_GETLK)."""
        import struct

        flock = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
        res = fcntl.fcntl(self.fd, fcntl.F_GETLK, flock)
        ltype, _, _, _, pid = struct.unpack("hhqqi", res)
        return None if ltype == fcntl.F_UNLCK else pid

    # -- close / unlink -----------------------------------------------------
    def close(self) -> None:
        """Unmap, close the semaphores and the fd. Idempotent. Does not unlink."""
        if self.closed:
            return
        self.closed = True
        try:
            self.mm.close()
        except BufferError:  # a numpy view is still alive somewhere; the GC unmaps it
            pass
        for s in self.sems:
            try:
                s.close()
            except posix_ipc.ExistentialError:
                pass
        self.sems = []
        self._shm.close_fd()

    @staticmethod
    def unlink(name: str) -> bool:
        """Remove a cache's segment and all its semaphores. True if anything was removed.

        Processes still attached keep their mapping until they close it.

        Raises:
            ValueError / TypeError: bad name.
        """
        layout.validate_name(name)
        removed = False
        n = 0
        try:
            shm = posix_ipc.SharedMemory(shm_name(name))
        except posix_ipc.ExistentialError:
            shm = None
        if shm is not None:
            try:
                head = os.pread(shm.fd, layout.HEADER.size, 0)
                if head[:8] == layout.MAGIC and len(head) == layout.HEADER.size:
                    n = layout.HEADER.unpack_from(head)[4]
            finally:
                shm.close_fd()
            try:
                posix_ipc.unlink_shared_memory(shm_name(name))
                removed = True
            except posix_ipc.ExistentialError:
                pass
        stripes = set(range(n))
        # Semaphores of a half-created cache, or of one whose header is gone.
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


def _chmod_sem(sname: str, mode: int) -> None:
    # sem_open applies the umask, so 0o660 would become 0o640 and group
    # members could not attach. Linux keeps named semaphores in /dev/shm.
    path = os.path.join(SHM_DIR, "sem." + sname.lstrip("/"))
    try:
        os.chmod(path, mode)
    except FileNotFoundError:  # pragma: no cover - not Linux
        pass


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
