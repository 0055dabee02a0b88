"""One place that undoes everything a benchmark run created.

Every cache segment, directory, server and worker process the suite makes is
registered here the moment it exists, and undone in reverse order by
``run_all()``: called from ``finally`` in ``__main__``, from ``atexit`` and
from SIGTERM/SIGHUP (turned into SystemExit so ``finally`` blocks run too).
Ctrl-C raises KeyboardInterrupt, which unwinds through the same ``finally``.

Only the process that registered an undo runs it: a forked worker inherits
the list but must not unlink the parent's caches or stop its servers when it
exits.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading

_lock = threading.Lock()
_undo: list[tuple[int, str, object]] = []  # (owner pid, label, callable)
_installed = False
_shm_names: set[str] = set()  # /dev/shm name stems this run created


def track_shm(*stems: str) -> None:
    """Remember /dev/shm names (or name prefixes) this process created, for the leak check."""
    _shm_names.update(stems)


def leftovers(shm_dir: str = "/dev/shm") -> list[str]:
    """Entries in /dev/shm that this run created and did not remove. Only
    our own names are checked: another benchmark run on the host may be busy."""
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if any(n == s or n.startswith(s) for s in _shm_names))


def register(label: str, fn) -> None:
    """Run ``fn()`` at cleanup time (in this process only, newest first)."""
    _install()
    with _lock:
        _undo.append((os.getpid(), label, fn))


def run_all() -> list[str]:
    """Undo everything registered by this process; returns what failed."""
    pid = os.getpid()
    failed = []
    while True:
        with _lock:
            mine = [i for i, (p, _l, _f) in enumerate(_undo) if p == pid]
            if not mine:
                break
            _p, label, fn = _undo.pop(mine[-1])
        try:
            fn()
        except Exception as e:  # keep going: one failure must not leak the rest
            failed.append(f"{label}: {e!r}")
            print(f"bench cleanup: {label} failed: {e!r}", file=sys.stderr)
    return failed


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def _install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    atexit.register(run_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)
