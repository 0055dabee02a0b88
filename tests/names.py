"""Unique cache names for tests: ``fresh_name("dj")`` -> ``test-<run>-dj-<random>``.

Every name carries this test run's token (``SHMCACHE_TEST_RUN``, made once
per run and inherited by subprocesses), so the end-of-run /dev/shm leak check
counts only what this run created, even while another checkout runs its own
suite on the same host.
"""

import os
import uuid

RUN = os.environ.setdefault("SHMCACHE_TEST_RUN", uuid.uuid4().hex[:6])
PREFIX = f"test-{RUN}-"


def fresh_name(tag: str = "") -> str:
    """A cache name no other test (or test run) uses."""
    return f"{PREFIX}{tag + '-' if tag else ''}{uuid.uuid4().hex[:10]}"
