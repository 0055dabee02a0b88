"""The recovery prefault (``Repair._prefault``): a recoverer is usually a
process that never touched the dead holder's stripe, so repair first maps the
stripe's index, access bits and arena in one ``madvise(MADV_POPULATE_READ)``
instead of faulting page by page. Best effort: a kernel that refuses the
advice (older than 5.14: EINVAL) must leave the recovery exactly as correct.

Each recoverer is a *spawned* process (a fresh interpreter and a fresh
mapping: none of the stripe's pages are in its page tables). Whether the
stripe was mapped is read from the kernel (/proc/self/smaps: the Rss of the
segment's mapping), not from timing. The refusal is real too: the advice
number is replaced by one no kernel knows, so the kernel itself says EINVAL,
as an old one says to MADV_POPULATE_READ.
"""

import errno
import multiprocessing as mp

import pytest

from shmcache import Cache, admin
from shmcache.segment import shm_path
from test_crash import JOIN, _start_dead_holder, join_all, keys_in_stripe

SPAWN = mp.get_context("spawn")

#: An madvise advice no Linux defines: the kernel answers EINVAL.
UNKNOWN_ADVICE = 9999


def _mapped_kib(path: str) -> int:
    """Resident KiB of this process's mappings of ``path`` (smaps Rss)."""
    kib, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line
                inside = len(head) >= 6 and head[-1] == path
            elif inside and head[0] == "Rss:":
                kib += int(head[1])
    return kib


def _recover_in_a_fresh_process(name, key, unknown_advice, q):
    """Attach, write ``key`` to the dead holder's stripe (which recovers and
    repairs it) and report how much of the segment that mapped, then what
    the cache holds."""
    import mmap

    import shmcache.repair as repair

    refused = None
    if unknown_advice:
        repair.MADV_POPULATE_READ = unknown_advice
        probe = mmap.mmap(-1, mmap.PAGESIZE)
        try:
            probe.madvise(unknown_advice)
        except OSError as e:
            refused = e.errno
        finally:
            probe.close()
    c = Cache(name, create=False, lock_timeout=30.0)  # recovery can only come from the kernel lock
    path = shm_path(name)
    before = _mapped_kib(path)
    c.set(key, b"after the recovery")
    after = _mapped_kib(path)
    q.put(dict(mapped_kib=after - before, refused=refused, recoveries=c.stats()["recoveries"]))
    c.close()


def _kernel_populates() -> bool:
    """True if this kernel knows MADV_POPULATE_READ (Linux 5.14+)."""
    import mmap

    from shmcache.repair import MADV_POPULATE_READ

    m = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        m.madvise(MADV_POPULATE_READ)
        return True
    except OSError:
        return False
    finally:
        m.close()


def _shmem_huge_pages() -> bool:
    """True if /dev/shm may back pages with huge pages (one fault maps 2 MiB)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            if "[force]" in f.read():
                return True
    except OSError:
        pass
    with open("/proc/mounts") as f:
        return any(ln.split()[1] == "/dev/shm" and "huge=" in ln and "huge=never" not in ln for ln in f)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("madvise", ["populates", "refused by the kernel"])
def test_fresh_process_repairs_a_stripe_it_never_touched(make_cache, cache_name, madvise):
    if madvise == "populates" and not _kernel_populates():
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux 5.14+): the refused case covers it")
    cache = make_cache(size="8MiB", stripes=4)
    g = admin.geometry(cache)
    s = 1
    torn_key, new_key = keys_in_stripe(4, s, 2, "new")
    holder, expected = _start_dead_holder(cache_name, cache, s, "torn", torn_key=torn_key)
    r = None
    try:
        holder.kill()
        holder.join(JOIN)
        q = SPAWN.Queue()
        unknown = UNKNOWN_ADVICE if madvise != "populates" else None
        r = SPAWN.Process(target=_recover_in_a_fresh_process, args=(cache_name, new_key, unknown, q))
        r.start()
        out = q.get(timeout=60)
        r.join(JOIN)
        assert r.exitcode == 0
        assert out["recoveries"] == 1
        arena_kib = g.stripe_arena // 1024
        if madvise == "populates":
            # the whole stripe arena was mapped, though the repair reads a few pages of it
            assert out["mapped_kib"] >= arena_kib, (out, arena_kib)
        else:
            assert out["refused"] == errno.EINVAL
            if not _shmem_huge_pages():  # the measurement tells the two apart
                assert out["mapped_kib"] < arena_kib // 2, (out, arena_kib)
        # and the repair is the same either way
        for k, v in expected.items():
            assert cache.get(k) == v, k
        assert cache.get(torn_key) is None
        assert cache.get(new_key) == b"after the recovery"
        assert cache.check() == []
        assert admin.lock_holders(cache)[s] is None
    finally:
        join_all([holder] + ([r] if r else []), 1)

