"""shmcache._pdeathsig: the one parent-death helper behind the `serve` workers,
`daemon --serve`, the near cache's tracker and the gunicorn hooks' daemon.
A SIGKILLed parent takes its child along, both through ``preexec_fn`` and
through the launcher script."""

import subprocess
import sys
import textwrap
import time

import pytest

from shmcache import _pdeathsig
from shmcache.lock import process_start

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]

PREEXEC_PARENT = textwrap.dedent("""
    import functools, os, subprocess, sys, time
    from shmcache._pdeathsig import die_with_parent
    child = subprocess.Popen({sleeper!r}, preexec_fn=functools.partial(die_with_parent, os.getpid()))
    print(child.pid, flush=True)
    time.sleep(120)
""")

LAUNCHER_PARENT = textwrap.dedent("""
    import subprocess, time
    from shmcache._pdeathsig import launcher_command
    child = subprocess.Popen(launcher_command({sleeper!r}))
    print(child.pid, flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("script", [PREEXEC_PARENT, LAUNCHER_PARENT], ids=["preexec_fn", "launcher"])
def test_child_dies_with_a_sigkilled_parent(script):
    parent = subprocess.Popen([sys.executable, "-c", script.format(sleeper=SLEEPER)], stdout=subprocess.PIPE,
                              text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        assert process_start(child) is not None
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 20
        while process_start(child) is not None:  # gone, or a zombie nobody reaped yet
            assert time.monotonic() < deadline, "the child outlived its SIGKILLed parent"
            time.sleep(0.02)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        parent.stdout.close()


def test_launcher_exits_without_running_the_program_if_its_parent_is_gone():
    """The launcher was given a pid that is not its parent (the parent died
    between fork and prctl): it exits at once, as the signal would have made it."""
    r = subprocess.run([sys.executable, "-I", _pdeathsig.__file__, "1", sys.executable, "-c", "raise SystemExit(3)"],
                       timeout=30)
    assert r.returncode == 0
    ok = subprocess.run(_pdeathsig.launcher_command([sys.executable, "-c", "raise SystemExit(3)"]), timeout=30)
    assert ok.returncode == 3  # its parent (this process) is alive: the program ran
