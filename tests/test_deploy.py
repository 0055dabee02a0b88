"""Where shmcache is deployed: small or missing /dev/shm, other users, other
settings. Each test runs the real thing (root, which CI is): private mount
namespaces with their own tmpfs on /dev/shm (`unshare -m`), real users.
Skipped with the reason when the kernel or the tools refuse.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

import shmcache
from shmcache import Cache

ROOT = os.geteuid() == 0


def _can_unshare() -> str | None:
    if not ROOT:
        return "needs root (CI runs as root)"
    if not shutil.which("unshare"):
        return "no unshare(1)"
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if r.returncode:
        return f"the kernel refuses unshare -m: {r.stderr.strip()}"
    return None


NO_UNSHARE = _can_unshare()
needs_unshare = pytest.mark.skipif(NO_UNSHARE is not None, reason=NO_UNSHARE or "")


def catch(expr: str, exc: str) -> str:
    """Python source printing ``ERR <message>`` when ``expr`` raises shmcache.<exc>."""
    return f"import shmcache\ntry:\n    {expr}\nexcept shmcache.{exc} as e:\n    print('ERR', e)\n"


def in_private_shm(code: str, mount: str = "mount -t tmpfs -o size=64m tmpfs /dev/shm", timeout: float = 120):
    """Run Python ``code`` in a private mount namespace after ``mount``: a fresh
    tmpfs on /dev/shm by default (Docker's 64 MiB). A new superblock, so nothing
    done inside (filling it, a read-only mount) reaches the host's /dev/shm."""
    script = f"{mount} && exec {sys.executable} -c \"$0\""
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, textwrap.dedent(code)],
                       capture_output=True, text=True, timeout=timeout)
    return r


# ---------------------------------------------------------------- reservation
@needs_unshare
def test_regression_cache_larger_than_dev_shm_is_refused_not_sigbus():
    # Docker's default 64 MiB /dev/shm: a 256 MiB cache used to open fine and
    # die of SIGBUS once writes passed 64 MiB.
    r = in_private_shm("""
        import os, shmcache
        try:
            shmcache.Cache("big", size="256MiB")
        except shmcache.OutOfSharedMemory as e:
            print("ERR", e)
        print("LEFT", sorted(os.listdir("/dev/shm")))
    """)
    assert r.returncode == 0, r.stderr
    err = r.stdout.split("ERR ", 1)[1].splitlines()[0]
    assert "'big'" in err and "256.2 MiB" in err  # the size asked for (segment + semaphores)
    assert "64.0 MiB" in err and "free" in err  # the free space
    assert "--shm-size=" in err and "emptyDir" in err and "medium: Memory" in err and "smaller" in err
    assert "LEFT []" in r.stdout  # nothing of the refused cache stays behind


@needs_unshare
def test_default_size_counts_the_semaphores():
    # 64 MiB of segment plus 16 semaphore pages does not fit a 64 MiB tmpfs.
    r = in_private_shm(catch('shmcache.Cache("dflt")', "OutOfSharedMemory"))
    assert r.returncode == 0, r.stderr
    assert "16 semaphores" in r.stdout and 'size="63MiB" fits now' in r.stdout


@needs_unshare
def test_cache_that_fits_fills_to_eviction_without_a_signal():
    r = in_private_shm("""
        import os, shmcache
        c = shmcache.Cache("fits", size="48MiB")
        v = os.urandom(4000)
        for i in range(16000):  # ~64 MB of values into a 48 MiB cache
            c.set(str(i), v)
        st = c.stats()
        print("EVICTED", st["evictions"], "CHECK", c.check(), "LAST", c.get("15999") == v)
        c.close(); shmcache.Cache.unlink("fits")
        print("LEFT", sorted(os.listdir("/dev/shm")))
    """)
    assert r.returncode == 0, (r.returncode, r.stderr)  # -7 / 135 would be SIGBUS
    evicted = int(r.stdout.split("EVICTED ")[1].split()[0])
    assert evicted > 0
    assert "CHECK [] LAST True" in r.stdout and "LEFT []" in r.stdout


@needs_unshare
def test_snapshot_restore_into_a_new_cache_too_large_is_refused(tmp_path):
    snap = tmp_path / "s.snap"
    with Cache("i9-restore-src-" + os.urandom(4).hex(), size="1MiB") as src:
        try:
            src.set("k", b"v")
            r0 = subprocess.run([sys.executable, "-m", "shmcache", "snapshot", "-n", src.name, str(snap)],
                                capture_output=True, text=True, timeout=60)
            assert r0.returncode == 0, r0.stderr
        finally:
            Cache.unlink(src.name)
    r = in_private_shm(f"""
        import os, sys
        from shmcache.cli import main
        rc = main(["restore", "-n", "dst", "--size", "256MiB", {str(snap)!r}])
        print("RC", rc, "LEFT", sorted(os.listdir("/dev/shm")))
    """)
    assert "RC 1 LEFT []" in r.stdout, (r.stdout, r.stderr)
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("shmcache: cache 'dst' needs") and "--shm-size" in line[0]


# ---------------------------------------------------------- environment errors
@needs_unshare
def test_read_only_dev_shm_is_a_clear_error():
    r = in_private_shm(catch('shmcache.Cache("ro")', "SharedMemoryUnavailable"), mount="mount -t tmpfs -o ro,size=1m tmpfs /dev/shm")
    assert r.returncode == 0, r.stderr
    assert "ERR /dev/shm is read-only" in r.stdout and "emptyDir" in r.stdout


@needs_unshare
def test_missing_dev_shm_is_a_clear_error():
    r = in_private_shm(catch('shmcache.Cache("nodir")', "SharedMemoryUnavailable"), mount="mount -t tmpfs -o size=1m tmpfs /dev")
    assert r.returncode == 0, r.stderr
    assert "ERR /dev/shm does not exist" in r.stdout and "mount -t tmpfs" in r.stdout


def test_name_taken_by_a_directory_is_a_clear_error(cache_name):
    path = f"/dev/shm/shmcache.{cache_name}"
    os.mkdir(path)
    try:
        with pytest.raises(shmcache.SharedMemoryUnavailable, match="not a shmcache segment"):
            Cache(cache_name, size="1MiB")
    finally:
        os.rmdir(path)


# ------------------------------------------------------- attach, other settings
def test_attach_with_other_settings_warns_once_naming_each(make_cache, cache_name):
    make_cache(size="1MiB")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        make_cache(size="64MiB", policy="noeviction")
        make_cache(size="64MiB", policy="noeviction")
    msgs = [str(x.message) for x in w if issubclass(x.category, shmcache.SettingsIgnored)]
    assert len(msgs) == 1, msgs
    assert "size='64MiB' (it has 1" in msgs[0] and "policy='noeviction' (it has 'lru')" in msgs[0]
    assert f"shmcache rm {cache_name}" in msgs[0]


def test_attach_without_layout_settings_or_with_the_same_ones_is_silent(make_cache):
    make_cache(size="1MiB", policy="noeviction")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_cache(size=None)
        make_cache(size="1MiB", policy="noeviction", lock_timeout=2.0)


def test_attach_with_other_settings_strict_is_an_error(make_cache):
    make_cache(size="1MiB", mode=0o600)
    with pytest.raises(shmcache.SettingsMismatch, match=r"mode='0o660' \(it has 0o600\)"):
        make_cache(size="1MiB", mode=0o660, strict=True)
