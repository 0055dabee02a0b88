"""Bounded cleanup of child processes for the multi-process tests: a test
joins its children with a timeout and asserts their exit codes; these make
sure none outlives it, whatever failed first."""

import time

JOIN = 30.0  # seconds a child may take before the test calls it hung


def kill_alive(procs, timeout: float = 10.0) -> None:
    """SIGKILL every started process that is still alive, and reap it
    (``timeout`` seconds each at most). For ``finally:`` blocks."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join(timeout)


def join_all(procs, timeout: float = JOIN) -> None:
    """Join every started process within ``timeout`` seconds in all; kill the
    ones that overrun."""
    deadline = time.monotonic() + timeout
    for p in procs:
        if p.pid is not None:
            p.join(max(0.1, deadline - time.monotonic()))
    kill_alive(procs, 5)
