"""Settings of the test Django project: every cache alias is a ShmCache.

All aliases share one segment (``LOCATION``), as all of Django's own cache
tests share one LocMemCache store, so prefix / version / key-function tests
see each other's keys. The segment name comes from SHMCACHE_DJANGO_TEST_NAME
(set by tests/test_django.py to a ``test-`` name it unlinks afterwards).
Most aliases use ``CLOCK``, a clock the tests advance instead of sleeping;
``realtime`` uses the real one.
"""

import os

NAME = os.environ.get("SHMCACHE_DJANGO_TEST_NAME") or f"test-django-{os.getpid()}"


class FakeClock:
    """``time.time`` stand-in: ``advance(seconds)`` moves it."""

    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


CLOCK = FakeClock()


def custom_key_func(key, key_prefix, version):
    "A customized cache key function (as in Django's tests/cache/tests.py)."
    return "CUSTOM-" + "-".join([key_prefix, str(version), key])


def _cache(clock=CLOCK, **params):
    options = {"size": "8MiB", "clock": clock} if clock else {"size": "8MiB"}
    options.update(params.pop("OPTIONS", {}))
    return {"BACKEND": "shmcache.contrib.django.ShmCache", "LOCATION": NAME, "OPTIONS": options, **params}


SECRET_KEY = "shmcache-tests"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
USE_TZ = True
INSTALLED_APPS = []
DATABASES = {}
ROOT_URLCONF = "django_project.urls"
MIDDLEWARE = []
CACHES = {
    "default": _cache(),
    "prefix": _cache(KEY_PREFIX=f"cacheprefix{os.getpid()}"),
    "v2": _cache(VERSION=2),
    "custom_key": _cache(KEY_FUNCTION=custom_key_func),
    "custom_key2": _cache(KEY_FUNCTION="django_project.settings.custom_key_func"),
    "cull": _cache(OPTIONS={"MAX_ENTRIES": 30}),
    "zero_cull": _cache(OPTIONS={"CULL_FREQUENCY": 0, "MAX_ENTRIES": 30}),
    # its own one-stripe segment: culling order is exact write order within a
    # stripe, approximate across stripes (and the default segment has many)
    "lru": _cache(LOCATION=NAME + "-lru", OPTIONS={"MAX_ENTRIES": 9, "stripes": 1}),
    "realtime": _cache(clock=None),
    "forever": _cache(TIMEOUT=None),
    "other": _cache(LOCATION=NAME + "-other"),
}
