"""Child processes that die with their parent: Linux ``prctl(PR_SET_PDEATHSIG)``.

The one helper for every child shmcache starts and must not outlive its
starter: the ``serve`` workers (forked), the ``serve`` child of
``shmcache daemon --serve`` and the near cache's tracker process (both
``subprocess`` with ``preexec_fn=functools.partial(die_with_parent,
os.getpid())``), and the daemon of the gunicorn hooks (run through this file
as a launcher, see below).

Standard library only, and no package-relative import, so that this file
also runs as a script: ``python -I _pdeathsig.py PARENT PROGRAM ARG...``
sets the parent-death signal, then execs PROGRAM (the signal survives exec).
The gunicorn hooks start the daemon that way because a ``preexec_fn`` would
run Python, shmcache's fork hooks included, in the child of a gunicorn
master between fork and exec; ``-I`` keeps the launcher from importing
anything from the current directory or the user's site-packages.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

__all__ = ["die_with_parent", "launcher_command"]

log = logging.getLogger("shmcache")

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent thread
    dies (Linux ``prctl(PR_SET_PDEATHSIG)``), so a SIGKILLed supervisor
    leaves no child behind (holding a port, or serving a cache nobody
    watches). ``parent`` is the pid the caller was started from: if it is
    already gone (it died before the prctl), exit now, as the signal would
    have made us. Elsewhere than Linux it does nothing: the parent's own
    SIGTERM is then the only stop.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:
        os._exit(0)


def launcher_command(argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` (a program and its arguments)
    through this file as a launcher, so it gets SIGTERM when the calling
    process dies, with no Python run in the child before the exec."""
    return [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), *argv]


if __name__ == "__main__":
    die_with_parent(int(sys.argv[1]))
    os.execvp(sys.argv[2], sys.argv[2:])
