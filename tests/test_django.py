"""The Django cache backend, through ``django.core.cache.caches``.

Most of this file is Django's own BaseCacheTests (tests/cache/tests.py, Django
5.2) ported to ShmCache, plus the LocMemCache-specific tests that make sense
for a shared cache (LRU culling, incr keeping the expiry, isolation by
LOCATION). Sleeps are replaced by advancing the injected clock of the test
project (tests/django_project/settings.py); one test uses the real clock.
Left out: the tests needing a database (model instances) and the memcached-,
redis-, db- and file-specific ones.
"""

import contextlib
import io
import multiprocessing
import os
import pickle
import time
from pathlib import Path
from unittest import mock

from names import fresh_name
from payload import Payload

NAME = fresh_name("dj")
os.environ["SHMCACHE_DJANGO_TEST_NAME"] = NAME
os.environ["DJANGO_SETTINGS_MODULE"] = "django_project.settings"

import django  # noqa: E402

django.setup()

import pytest  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.cache import DEFAULT_CACHE_ALIAS, CacheKeyWarning, cache, caches  # noqa: E402
from django.core.cache.backends.base import BaseCache, InvalidCacheBackendError  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.middleware.cache import FetchFromCacheMiddleware, UpdateCacheMiddleware  # noqa: E402
from django.test import Client, RequestFactory, SimpleTestCase, override_settings  # noqa: E402
from django_project.settings import CLOCK  # noqa: E402

from shmcache import Cache, admin  # noqa: E402
from shmcache.contrib.django import ShmCache  # noqa: E402

CTX = multiprocessing.get_context("fork")


@pytest.fixture(scope="module", autouse=True)
def _unlink_segments():
    yield
    Cache.unlink(NAME)
    Cache.unlink(NAME + "-other")
    Cache.unlink(NAME + "-lru")


# functions/classes for complex data type tests
def f():
    return 42


class C:
    def m(n):
        return 24


class Unpicklable:
    def __getstate__(self):
        raise pickle.PickleError()


def empty_response(request):
    return HttpResponse()


KEY_ERRORS_WITH_MEMCACHED_MSG = "Cache key contains characters that will cause errors if used with memcached: %r"


class ShmCacheTests(SimpleTestCase):
    """Django's BaseCacheTests, run against shmcache.contrib.django.ShmCache."""

    factory = RequestFactory()
    incr_decr_type_error = TypeError

    def sleep(self, seconds):
        CLOCK.advance(seconds)

    def tearDown(self):
        cache.clear()
        caches["lru"].clear()  # the one alias with a segment of its own

    def test_backend_class(self):
        self.assertIsInstance(caches["default"], ShmCache)
        self.assertEqual(cache._cache.name, NAME)
        # Every alias and thread shares one handle per process.
        self.assertIs(caches["prefix"]._cache, cache._cache)

    def test_simple(self):
        cache.set("key", "value")
        self.assertEqual(cache.get("key"), "value")

    def test_default_used_when_none_is_set(self):
        cache.set("key_default_none", None)
        self.assertIsNone(cache.get("key_default_none", default="default"))

    def test_add(self):
        self.assertIs(cache.add("addkey1", "value"), True)
        self.assertIs(cache.add("addkey1", "newvalue"), False)
        self.assertEqual(cache.get("addkey1"), "value")

    def test_prefix(self):
        cache.set("somekey", "value")
        self.assertIs(caches["prefix"].has_key("somekey"), False)
        caches["prefix"].set("somekey", "value2")
        self.assertEqual(cache.get("somekey"), "value")
        self.assertEqual(caches["prefix"].get("somekey"), "value2")

    def test_non_existent(self):
        self.assertIsNone(cache.get("does_not_exist"))
        self.assertEqual(cache.get("does_not_exist", "bang!"), "bang!")

    def test_get_many(self):
        cache.set_many({"a": "a", "b": "b", "c": "c", "d": "d"})
        self.assertEqual(cache.get_many(["a", "c", "d"]), {"a": "a", "c": "c", "d": "d"})
        self.assertEqual(cache.get_many(["a", "b", "e"]), {"a": "a", "b": "b"})
        self.assertEqual(cache.get_many(iter(["a", "b", "e"])), {"a": "a", "b": "b"})
        cache.set_many({"x": None, "y": 1})
        self.assertEqual(cache.get_many(["x", "y"]), {"x": None, "y": 1})

    def test_delete(self):
        cache.set_many({"key1": "spam", "key2": "eggs"})
        self.assertEqual(cache.get("key1"), "spam")
        self.assertIs(cache.delete("key1"), True)
        self.assertIsNone(cache.get("key1"))
        self.assertEqual(cache.get("key2"), "eggs")

    def test_delete_nonexistent(self):
        self.assertIs(cache.delete("nonexistent_key"), False)

    def test_has_key(self):
        cache.set("hello1", "goodbye1")
        self.assertIs(cache.has_key("hello1"), True)
        self.assertIs(cache.has_key("goodbye1"), False)
        cache.set("no_expiry", "here", None)
        self.assertIs(cache.has_key("no_expiry"), True)
        cache.set("null", None)
        self.assertIs(cache.has_key("null"), True)

    def test_in(self):
        cache.set("hello2", "goodbye2")
        self.assertIn("hello2", cache)
        self.assertNotIn("goodbye2", cache)
        cache.set("null", None)
        self.assertIn("null", cache)

    def test_incr(self):
        cache.set("answer", 41)
        self.assertEqual(cache.incr("answer"), 42)
        self.assertEqual(cache.get("answer"), 42)
        self.assertEqual(cache.incr("answer", 10), 52)
        self.assertEqual(cache.get("answer"), 52)
        self.assertEqual(cache.incr("answer", -10), 42)
        with self.assertRaises(ValueError):
            cache.incr("does_not_exist")
        with self.assertRaises(ValueError):
            cache.incr("does_not_exist", -1)
        cache.set("null", None)
        with self.assertRaises(self.incr_decr_type_error):
            cache.incr("null")

    def test_decr(self):
        cache.set("answer", 43)
        self.assertEqual(cache.decr("answer"), 42)
        self.assertEqual(cache.get("answer"), 42)
        self.assertEqual(cache.decr("answer", 10), 32)
        self.assertEqual(cache.get("answer"), 32)
        self.assertEqual(cache.decr("answer", -10), 42)
        with self.assertRaises(ValueError):
            cache.decr("does_not_exist")
        with self.assertRaises(ValueError):
            cache.incr("does_not_exist", -1)
        cache.set("null", None)
        with self.assertRaises(self.incr_decr_type_error):
            cache.decr("null")

    def test_incr_non_int_numbers_like_locmem(self):
        # LocMemCache does value + delta: floats, Decimals, big ints all work.
        from decimal import Decimal

        cache.set("f", 1.5)
        self.assertEqual(cache.incr("f"), 2.5)
        cache.set("d", Decimal("1.1"))
        self.assertEqual(cache.incr("d", 2), Decimal("3.1"))
        cache.set("big", 2**63 - 1)
        self.assertEqual(cache.incr("big"), 2**63)
        self.assertEqual(cache.get("big"), 2**63)
        cache.set("t", True)
        self.assertEqual(cache.incr("t"), 2)
        cache.set("s", "text")
        with self.assertRaises(TypeError):
            cache.incr("s")

    def test_close(self):
        self.assertTrue(hasattr(cache, "close"))
        cache.close()
        # close() keeps the segment mapped: Django calls it after every request.
        cache.set("after-close", 1)
        self.assertEqual(cache.get("after-close"), 1)

    def test_data_types(self):
        tests = {
            "string": "this is a string",
            "int": 42,
            "bool": True,
            "list": [1, 2, 3, 4],
            "tuple": (1, 2, 3, 4),
            "dict": {"A": 1, "B": 2},
            "function": f,
            "class": C,
        }
        for key, value in tests.items():
            with self.subTest(key=key):
                cache.set(key, value)
                self.assertEqual(cache.get(key), value)
                self.assertIs(type(cache.get(key)), type(value))

    def test_expiration(self):
        cache.set("expire1", "very quickly", 1)
        cache.set("expire2", "very quickly", 1)
        cache.set("expire3", "very quickly", 1)

        self.sleep(2)
        self.assertIsNone(cache.get("expire1"))

        self.assertIs(cache.add("expire2", "newvalue"), True)
        self.assertEqual(cache.get("expire2"), "newvalue")
        self.assertIs(cache.has_key("expire3"), False)

    def test_expiration_real_clock(self):
        rt = caches["realtime"]
        rt.set("rt", "soon gone", 0.2)
        self.assertEqual(rt.get("rt"), "soon gone")
        time.sleep(0.3)
        self.assertIsNone(rt.get("rt"))

    def test_touch(self):
        cache.set("expire1", "very quickly", timeout=1)
        self.assertIs(cache.touch("expire1", timeout=4), True)
        self.sleep(2)
        self.assertIs(cache.has_key("expire1"), True)
        self.sleep(3)
        self.assertIs(cache.has_key("expire1"), False)
        cache.set("expire1", "very quickly", timeout=1)
        self.assertIs(cache.touch("expire1"), True)
        self.sleep(2)
        self.assertIs(cache.has_key("expire1"), True)

        self.assertIs(cache.touch("nonexistent"), False)

    def test_unicode(self):
        stuff = {
            "ascii": "ascii_value",
            "unicode_ascii": "Iñtërnâtiônàlizætiøn1",
            "Iñtërnâtiônàlizætiøn": "Iñtërnâtiônàlizætiøn2",
            "ascii2": {"x": 1},
        }
        for key, value in stuff.items():
            with self.subTest(key=key):
                cache.set(key, value)
                self.assertEqual(cache.get(key), value)
        for key, value in stuff.items():
            with self.subTest(key=key):
                self.assertIs(cache.delete(key), True)
                self.assertIs(cache.add(key, value), True)
                self.assertEqual(cache.get(key), value)
        for key, value in stuff.items():
            self.assertIs(cache.delete(key), True)
        cache.set_many(stuff)
        for key, value in stuff.items():
            with self.subTest(key=key):
                self.assertEqual(cache.get(key), value)

    def test_binary_string(self):
        from zlib import compress, decompress

        value = "value_to_be_compressed"
        compressed_value = compress(value.encode())

        cache.set("binary1", compressed_value)
        compressed_result = cache.get("binary1")
        self.assertEqual(compressed_value, compressed_result)
        self.assertEqual(value, decompress(compressed_result).decode())

        self.assertIs(cache.add("binary1-add", compressed_value), True)
        compressed_result = cache.get("binary1-add")
        self.assertEqual(compressed_value, compressed_result)
        self.assertEqual(value, decompress(compressed_result).decode())

        cache.set_many({"binary1-set_many": compressed_value})
        compressed_result = cache.get("binary1-set_many")
        self.assertEqual(compressed_value, compressed_result)
        self.assertEqual(value, decompress(compressed_result).decode())

    def test_set_many(self):
        cache.set_many({"key1": "spam", "key2": "eggs"})
        self.assertEqual(cache.get("key1"), "spam")
        self.assertEqual(cache.get("key2"), "eggs")

    def test_set_many_returns_empty_list_on_success(self):
        failing_keys = cache.set_many({"key1": "spam", "key2": "eggs"})
        self.assertEqual(failing_keys, [])

    def test_set_many_expiration(self):
        cache.set_many({"key1": "spam", "key2": "eggs"}, 1)
        self.sleep(2)
        self.assertIsNone(cache.get("key1"))
        self.assertIsNone(cache.get("key2"))

    def test_set_many_empty_data(self):
        self.assertEqual(cache.set_many({}), [])

    def test_delete_many(self):
        cache.set_many({"key1": "spam", "key2": "eggs", "key3": "ham"})
        cache.delete_many(["key1", "key2"])
        self.assertIsNone(cache.get("key1"))
        self.assertIsNone(cache.get("key2"))
        self.assertEqual(cache.get("key3"), "ham")

    def test_delete_many_no_keys(self):
        self.assertIsNone(cache.delete_many([]))

    def test_clear(self):
        cache.set_many({"key1": "spam", "key2": "eggs"})
        cache.clear()
        self.assertIsNone(cache.get("key1"))
        self.assertIsNone(cache.get("key2"))

    def test_long_timeout(self):
        cache.set("key1", "eggs", 60 * 60 * 24 * 30 + 1)  # 30 days + 1 second
        self.assertEqual(cache.get("key1"), "eggs")

        self.assertIs(cache.add("key2", "ham", 60 * 60 * 24 * 30 + 1), True)
        self.assertEqual(cache.get("key2"), "ham")

        cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 60 * 60 * 24 * 30 + 1)
        self.assertEqual(cache.get("key3"), "sausage")
        self.assertEqual(cache.get("key4"), "lobster bisque")

    def test_forever_timeout(self):
        cache.set("key1", "eggs", None)
        self.assertEqual(cache.get("key1"), "eggs")

        self.assertIs(cache.add("key2", "ham", None), True)
        self.assertEqual(cache.get("key2"), "ham")
        self.assertIs(cache.add("key1", "new eggs", None), False)
        self.assertEqual(cache.get("key1"), "eggs")

        cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, None)
        self.assertEqual(cache.get("key3"), "sausage")
        self.assertEqual(cache.get("key4"), "lobster bisque")

        cache.set("key5", "belgian fries", timeout=1)
        self.assertIs(cache.touch("key5", timeout=None), True)
        self.sleep(2)
        self.assertEqual(cache.get("key5"), "belgian fries")

    def test_zero_timeout(self):
        cache.set("key1", "eggs", 0)
        self.assertIsNone(cache.get("key1"))

        self.assertIs(cache.add("key2", "ham", 0), True)
        self.assertIsNone(cache.get("key2"))

        cache.set_many({"key3": "sausage", "key4": "lobster bisque"}, 0)
        self.assertIsNone(cache.get("key3"))
        self.assertIsNone(cache.get("key4"))

        cache.set("key5", "belgian fries", timeout=5)
        self.assertIs(cache.touch("key5", timeout=0), True)
        self.assertIsNone(cache.get("key5"))

    def test_zero_timeout_removes_existing_value(self):
        cache.set("key1", "eggs")
        cache.set("key1", "new eggs", 0)
        self.assertIsNone(cache.get("key1"))
        cache.set("key2", "ham")
        self.assertIs(cache.add("key2", "new ham", 0), False)
        self.assertEqual(cache.get("key2"), "ham")

    def test_negative_timeout(self):
        cache.set("key1", "eggs", -5)
        self.assertIsNone(cache.get("key1"))
        self.assertIs(cache.add("key2", "ham", -1), True)
        self.assertIsNone(cache.get("key2"))

    def test_float_timeout(self):
        cache.set("key1", "spam", 100.2)
        self.assertEqual(cache.get("key1"), "spam")

    def _perform_cull_test(self, cull_cache_name, initial_count, final_count):
        try:
            cull_cache = caches[cull_cache_name]
        except InvalidCacheBackendError:
            self.skipTest("Culling isn't implemented.")

        for i in range(1, initial_count):
            cull_cache.set("cull%d" % i, "value", 1000)
        count = 0
        for i in range(1, initial_count):
            if cull_cache.has_key("cull%d" % i):
                count += 1
        self.assertEqual(count, final_count)

    def test_cull(self):
        self._perform_cull_test("cull", 50, 29)

    def test_zero_cull(self):
        self._perform_cull_test("zero_cull", 50, 19)

    def test_cull_delete_when_store_empty(self):
        try:
            cull_cache = caches["cull"]
        except InvalidCacheBackendError:
            self.skipTest("Culling isn't implemented.")
        old_max_entries = cull_cache._max_entries
        cull_cache._max_entries = -1
        try:
            cull_cache.set("force_cull_delete", "value", 1000)
            self.assertIs(cull_cache.has_key("force_cull_delete"), True)
        finally:
            cull_cache._max_entries = old_max_entries

    def _perform_invalid_key_test(self, key, expected_warning, key_func=None):
        def func(key, *args):
            return key

        old_func = cache.key_func
        cache.key_func = key_func or func

        tests = [
            ("add", [key, 1]),
            ("get", [key]),
            ("set", [key, 1]),
            ("incr", [key]),
            ("decr", [key]),
            ("touch", [key]),
            ("delete", [key]),
            ("get_many", [[key, "b"]]),
            ("set_many", [{key: 1, "b": 2}]),
            ("delete_many", [[key, "b"]]),
        ]
        try:
            for operation, args in tests:
                with self.subTest(operation=operation):
                    with self.assertWarns(CacheKeyWarning) as cm:
                        getattr(cache, operation)(*args)
                    self.assertEqual(str(cm.warning), expected_warning)
        finally:
            cache.key_func = old_func

    def test_invalid_key_characters(self):
        key = "key with spaces and 清"
        self._perform_invalid_key_test(key, KEY_ERRORS_WITH_MEMCACHED_MSG % key)

    def test_invalid_key_length(self):
        key = ("a" * 250) + "清"
        expected_warning = "Cache key will cause errors if used with memcached: %r (longer than %s)" % (key, 250)
        self._perform_invalid_key_test(key, expected_warning)

    def test_invalid_with_version_key_length(self):
        def key_func(key, *args):
            return key + ":1"

        key = "a" * 249
        expected_warning = "Cache key will cause errors if used with memcached: %r (longer than %s)" % (
            key_func(key), 250)
        self._perform_invalid_key_test(key, expected_warning, key_func=key_func)

    def test_keys_longer_than_max_key_size(self):
        # LocMemCache takes keys of any length; so does ShmCache (via a digest).
        long_a, long_b = "a" * 5000, "a" * 4999 + "b"
        with self.assertWarns(CacheKeyWarning):
            cache.set(long_a, 1)
        with self.assertWarns(CacheKeyWarning):
            cache.set(long_b, 2)
        with self.assertWarns(CacheKeyWarning):
            self.assertEqual(cache.get_many([long_a, long_b]), {long_a: 1, long_b: 2})

    def test_cache_versioning_get_set(self):
        cache.set("answer1", 42)
        self.assertEqual(cache.get("answer1"), 42)
        self.assertEqual(cache.get("answer1", version=1), 42)
        self.assertIsNone(cache.get("answer1", version=2))

        self.assertIsNone(caches["v2"].get("answer1"))
        self.assertEqual(caches["v2"].get("answer1", version=1), 42)
        self.assertIsNone(caches["v2"].get("answer1", version=2))

        cache.set("answer2", 42, version=2)
        self.assertIsNone(cache.get("answer2"))
        self.assertIsNone(cache.get("answer2", version=1))
        self.assertEqual(cache.get("answer2", version=2), 42)

        self.assertEqual(caches["v2"].get("answer2"), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=1))
        self.assertEqual(caches["v2"].get("answer2", version=2), 42)

        caches["v2"].set("answer3", 42)
        self.assertIsNone(cache.get("answer3"))
        self.assertIsNone(cache.get("answer3", version=1))
        self.assertEqual(cache.get("answer3", version=2), 42)

        self.assertEqual(caches["v2"].get("answer3"), 42)
        self.assertIsNone(caches["v2"].get("answer3", version=1))
        self.assertEqual(caches["v2"].get("answer3", version=2), 42)

        caches["v2"].set("answer4", 42, version=1)
        self.assertEqual(cache.get("answer4"), 42)
        self.assertEqual(cache.get("answer4", version=1), 42)
        self.assertIsNone(cache.get("answer4", version=2))

        self.assertIsNone(caches["v2"].get("answer4"))
        self.assertEqual(caches["v2"].get("answer4", version=1), 42)
        self.assertIsNone(caches["v2"].get("answer4", version=2))

    def test_cache_versioning_add(self):
        self.assertIs(cache.add("answer1", 42, version=2), True)
        self.assertIsNone(cache.get("answer1", version=1))
        self.assertEqual(cache.get("answer1", version=2), 42)

        self.assertIs(cache.add("answer1", 37, version=2), False)
        self.assertIsNone(cache.get("answer1", version=1))
        self.assertEqual(cache.get("answer1", version=2), 42)

        self.assertIs(cache.add("answer1", 37, version=1), True)
        self.assertEqual(cache.get("answer1", version=1), 37)
        self.assertEqual(cache.get("answer1", version=2), 42)

        self.assertIs(caches["v2"].add("answer2", 42), True)
        self.assertIsNone(cache.get("answer2", version=1))
        self.assertEqual(cache.get("answer2", version=2), 42)

        self.assertIs(caches["v2"].add("answer2", 37), False)
        self.assertIsNone(cache.get("answer2", version=1))
        self.assertEqual(cache.get("answer2", version=2), 42)

        self.assertIs(caches["v2"].add("answer2", 37, version=1), True)
        self.assertEqual(cache.get("answer2", version=1), 37)
        self.assertEqual(cache.get("answer2", version=2), 42)

        self.assertIs(caches["v2"].add("answer3", 42, version=1), True)
        self.assertEqual(cache.get("answer3", version=1), 42)
        self.assertIsNone(cache.get("answer3", version=2))

        self.assertIs(caches["v2"].add("answer3", 37, version=1), False)
        self.assertEqual(cache.get("answer3", version=1), 42)
        self.assertIsNone(cache.get("answer3", version=2))

        self.assertIs(caches["v2"].add("answer3", 37), True)
        self.assertEqual(cache.get("answer3", version=1), 42)
        self.assertEqual(cache.get("answer3", version=2), 37)

    def test_cache_versioning_has_key(self):
        cache.set("answer1", 42)
        self.assertIs(cache.has_key("answer1"), True)
        self.assertIs(cache.has_key("answer1", version=1), True)
        self.assertIs(cache.has_key("answer1", version=2), False)

        self.assertIs(caches["v2"].has_key("answer1"), False)
        self.assertIs(caches["v2"].has_key("answer1", version=1), True)
        self.assertIs(caches["v2"].has_key("answer1", version=2), False)

    def test_cache_versioning_delete(self):
        cache.set("answer1", 37, version=1)
        cache.set("answer1", 42, version=2)
        self.assertIs(cache.delete("answer1"), True)
        self.assertIsNone(cache.get("answer1", version=1))
        self.assertEqual(cache.get("answer1", version=2), 42)

        cache.set("answer2", 37, version=1)
        cache.set("answer2", 42, version=2)
        self.assertIs(cache.delete("answer2", version=2), True)
        self.assertEqual(cache.get("answer2", version=1), 37)
        self.assertIsNone(cache.get("answer2", version=2))

        cache.set("answer3", 37, version=1)
        cache.set("answer3", 42, version=2)
        self.assertIs(caches["v2"].delete("answer3"), True)
        self.assertEqual(cache.get("answer3", version=1), 37)
        self.assertIsNone(cache.get("answer3", version=2))

        cache.set("answer4", 37, version=1)
        cache.set("answer4", 42, version=2)
        self.assertIs(caches["v2"].delete("answer4", version=1), True)
        self.assertIsNone(cache.get("answer4", version=1))
        self.assertEqual(cache.get("answer4", version=2), 42)

    def test_cache_versioning_incr_decr(self):
        cache.set("answer1", 37, version=1)
        cache.set("answer1", 42, version=2)
        self.assertEqual(cache.incr("answer1"), 38)
        self.assertEqual(cache.get("answer1", version=1), 38)
        self.assertEqual(cache.get("answer1", version=2), 42)
        self.assertEqual(cache.decr("answer1"), 37)
        self.assertEqual(cache.get("answer1", version=1), 37)
        self.assertEqual(cache.get("answer1", version=2), 42)

        cache.set("answer2", 37, version=1)
        cache.set("answer2", 42, version=2)
        self.assertEqual(cache.incr("answer2", version=2), 43)
        self.assertEqual(cache.get("answer2", version=1), 37)
        self.assertEqual(cache.get("answer2", version=2), 43)
        self.assertEqual(cache.decr("answer2", version=2), 42)
        self.assertEqual(cache.get("answer2", version=1), 37)
        self.assertEqual(cache.get("answer2", version=2), 42)

        cache.set("answer3", 37, version=1)
        cache.set("answer3", 42, version=2)
        self.assertEqual(caches["v2"].incr("answer3"), 43)
        self.assertEqual(cache.get("answer3", version=1), 37)
        self.assertEqual(cache.get("answer3", version=2), 43)
        self.assertEqual(caches["v2"].decr("answer3"), 42)
        self.assertEqual(cache.get("answer3", version=1), 37)
        self.assertEqual(cache.get("answer3", version=2), 42)

        cache.set("answer4", 37, version=1)
        cache.set("answer4", 42, version=2)
        self.assertEqual(caches["v2"].incr("answer4", version=1), 38)
        self.assertEqual(cache.get("answer4", version=1), 38)
        self.assertEqual(cache.get("answer4", version=2), 42)
        self.assertEqual(caches["v2"].decr("answer4", version=1), 37)
        self.assertEqual(cache.get("answer4", version=1), 37)
        self.assertEqual(cache.get("answer4", version=2), 42)

    def test_cache_versioning_get_set_many(self):
        cache.set_many({"ford1": 37, "arthur1": 42})
        self.assertEqual(cache.get_many(["ford1", "arthur1"]), {"ford1": 37, "arthur1": 42})
        self.assertEqual(cache.get_many(["ford1", "arthur1"], version=1), {"ford1": 37, "arthur1": 42})
        self.assertEqual(cache.get_many(["ford1", "arthur1"], version=2), {})

        self.assertEqual(caches["v2"].get_many(["ford1", "arthur1"]), {})
        self.assertEqual(caches["v2"].get_many(["ford1", "arthur1"], version=1), {"ford1": 37, "arthur1": 42})
        self.assertEqual(caches["v2"].get_many(["ford1", "arthur1"], version=2), {})

        cache.set_many({"ford2": 37, "arthur2": 42}, version=2)
        self.assertEqual(cache.get_many(["ford2", "arthur2"]), {})
        self.assertEqual(cache.get_many(["ford2", "arthur2"], version=1), {})
        self.assertEqual(cache.get_many(["ford2", "arthur2"], version=2), {"ford2": 37, "arthur2": 42})

        self.assertEqual(caches["v2"].get_many(["ford2", "arthur2"]), {"ford2": 37, "arthur2": 42})
        self.assertEqual(caches["v2"].get_many(["ford2", "arthur2"], version=1), {})
        self.assertEqual(caches["v2"].get_many(["ford2", "arthur2"], version=2), {"ford2": 37, "arthur2": 42})

        caches["v2"].set_many({"ford3": 37, "arthur3": 42})
        self.assertEqual(cache.get_many(["ford3", "arthur3"]), {})
        self.assertEqual(cache.get_many(["ford3", "arthur3"], version=1), {})
        self.assertEqual(cache.get_many(["ford3", "arthur3"], version=2), {"ford3": 37, "arthur3": 42})

        self.assertEqual(caches["v2"].get_many(["ford3", "arthur3"]), {"ford3": 37, "arthur3": 42})
        self.assertEqual(caches["v2"].get_many(["ford3", "arthur3"], version=1), {})
        self.assertEqual(caches["v2"].get_many(["ford3", "arthur3"], version=2), {"ford3": 37, "arthur3": 42})

        caches["v2"].set_many({"ford4": 37, "arthur4": 42}, version=1)
        self.assertEqual(cache.get_many(["ford4", "arthur4"]), {"ford4": 37, "arthur4": 42})
        self.assertEqual(cache.get_many(["ford4", "arthur4"], version=1), {"ford4": 37, "arthur4": 42})
        self.assertEqual(cache.get_many(["ford4", "arthur4"], version=2), {})

        self.assertEqual(caches["v2"].get_many(["ford4", "arthur4"]), {})
        self.assertEqual(caches["v2"].get_many(["ford4", "arthur4"], version=1), {"ford4": 37, "arthur4": 42})
        self.assertEqual(caches["v2"].get_many(["ford4", "arthur4"], version=2), {})

    def test_incr_version(self):
        cache.set("answer", 42, version=2)
        self.assertIsNone(cache.get("answer"))
        self.assertIsNone(cache.get("answer", version=1))
        self.assertEqual(cache.get("answer", version=2), 42)
        self.assertIsNone(cache.get("answer", version=3))

        self.assertEqual(cache.incr_version("answer", version=2), 3)
        self.assertIsNone(cache.get("answer"))
        self.assertIsNone(cache.get("answer", version=1))
        self.assertIsNone(cache.get("answer", version=2))
        self.assertEqual(cache.get("answer", version=3), 42)

        caches["v2"].set("answer2", 42)
        self.assertEqual(caches["v2"].get("answer2"), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=1))
        self.assertEqual(caches["v2"].get("answer2", version=2), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=3))

        self.assertEqual(caches["v2"].incr_version("answer2"), 3)
        self.assertIsNone(caches["v2"].get("answer2"))
        self.assertIsNone(caches["v2"].get("answer2", version=1))
        self.assertIsNone(caches["v2"].get("answer2", version=2))
        self.assertEqual(caches["v2"].get("answer2", version=3), 42)

        with self.assertRaises(ValueError):
            cache.incr_version("does_not_exist")

        cache.set("null", None)
        self.assertEqual(cache.incr_version("null"), 2)

    def test_decr_version(self):
        cache.set("answer", 42, version=2)
        self.assertIsNone(cache.get("answer"))
        self.assertIsNone(cache.get("answer", version=1))
        self.assertEqual(cache.get("answer", version=2), 42)

        self.assertEqual(cache.decr_version("answer", version=2), 1)
        self.assertEqual(cache.get("answer"), 42)
        self.assertEqual(cache.get("answer", version=1), 42)
        self.assertIsNone(cache.get("answer", version=2))

        caches["v2"].set("answer2", 42)
        self.assertEqual(caches["v2"].get("answer2"), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=1))
        self.assertEqual(caches["v2"].get("answer2", version=2), 42)

        self.assertEqual(caches["v2"].decr_version("answer2"), 1)
        self.assertIsNone(caches["v2"].get("answer2"))
        self.assertEqual(caches["v2"].get("answer2", version=1), 42)
        self.assertIsNone(caches["v2"].get("answer2", version=2))

        with self.assertRaises(ValueError):
            cache.decr_version("does_not_exist", version=2)

        cache.set("null", None, version=2)
        self.assertEqual(cache.decr_version("null", version=2), 1)

    def test_custom_key_func(self):
        cache.set("answer1", 42)
        self.assertEqual(cache.get("answer1"), 42)
        self.assertIsNone(caches["custom_key"].get("answer1"))
        self.assertIsNone(caches["custom_key2"].get("answer1"))

        caches["custom_key"].set("answer2", 42)
        self.assertIsNone(cache.get("answer2"))
        self.assertEqual(caches["custom_key"].get("answer2"), 42)
        self.assertEqual(caches["custom_key2"].get("answer2"), 42)

    @override_settings(CACHE_MIDDLEWARE_ALIAS=DEFAULT_CACHE_ALIAS)
    def test_cache_write_unpicklable_object(self):
        fetch_middleware = FetchFromCacheMiddleware(empty_response)

        request = self.factory.get("/cache/test")
        request._cache_update_cache = True
        get_cache_data = FetchFromCacheMiddleware(empty_response).process_request(request)
        self.assertIsNone(get_cache_data)

        content = "Testing cookie serialization."

        def get_response(req):
            response = HttpResponse(content)
            response.set_cookie("foo", "bar")
            return response

        update_middleware = UpdateCacheMiddleware(get_response)
        response = update_middleware(request)

        get_cache_data = fetch_middleware.process_request(request)
        self.assertIsNotNone(get_cache_data)
        self.assertEqual(get_cache_data.content, content.encode())
        self.assertEqual(get_cache_data.cookies, response.cookies)

        UpdateCacheMiddleware(lambda req: get_cache_data)(request)
        get_cache_data = fetch_middleware.process_request(request)
        self.assertIsNotNone(get_cache_data)
        self.assertEqual(get_cache_data.content, content.encode())
        self.assertEqual(get_cache_data.cookies, response.cookies)

    def test_add_fail_on_pickleerror(self):
        with self.assertRaises(pickle.PickleError):
            cache.add("unpicklable", Unpicklable())

    def test_set_fail_on_pickleerror(self):
        with self.assertRaises(pickle.PickleError):
            cache.set("unpicklable", Unpicklable())

    def test_get_or_set(self):
        self.assertIsNone(cache.get("projector"))
        self.assertEqual(cache.get_or_set("projector", 42), 42)
        self.assertEqual(cache.get("projector"), 42)
        self.assertIsNone(cache.get_or_set("null", None))
        self.assertIsNone(cache.get("null", "default"))

    def test_get_or_set_callable(self):
        def my_callable():
            return "value"

        self.assertEqual(cache.get_or_set("mykey", my_callable), "value")
        self.assertEqual(cache.get_or_set("mykey", my_callable()), "value")

        self.assertIsNone(cache.get_or_set("null", lambda: None))
        self.assertIsNone(cache.get("null", "default"))

    def test_get_or_set_version(self):
        msg = "get_or_set() missing 1 required positional argument: 'default'"
        self.assertEqual(cache.get_or_set("brian", 1979, version=2), 1979)
        with self.assertRaisesMessage(TypeError, msg):
            cache.get_or_set("brian")
        with self.assertRaisesMessage(TypeError, msg):
            cache.get_or_set("brian", version=1)
        self.assertIsNone(cache.get("brian", version=1))
        self.assertEqual(cache.get_or_set("brian", 42, version=1), 42)
        self.assertEqual(cache.get_or_set("brian", 1979, version=2), 1979)
        self.assertIsNone(cache.get("brian", version=3))

    def test_get_or_set_racing(self):
        with mock.patch("%s.%s" % (settings.CACHES["default"]["BACKEND"], "add")) as cache_add:
            cache_add.return_value = False
            self.assertEqual(cache.get_or_set("key", "default"), "default")

    def test_get_or_set_zero_timeout(self):
        self.assertEqual(cache.get_or_set("gone", "value", timeout=0), "value")
        self.assertIsNone(cache.get("gone"))

    # -- LocMemCacheTests that apply to a shared cache ------------------------
    @override_settings(
        CACHES={
            "default": {"BACKEND": "shmcache.contrib.django.ShmCache", "LOCATION": NAME},
            "other": {"BACKEND": "shmcache.contrib.django.ShmCache", "LOCATION": NAME + "-other"},
        }
    )
    def test_multiple_caches(self):
        "Caches with different LOCATIONs are isolated"
        cache.set("value", 42)
        self.assertEqual(caches["default"].get("value"), 42)
        self.assertIsNone(caches["other"].get("value"))

    def test_incr_decr_timeout(self):
        """incr/decr does not modify expiry time (matches memcached behavior)"""
        key = "value"
        _key = cache.make_key(key)
        cache.set(key, 1, timeout=cache.default_timeout * 10)
        expire = cache._cache.ttl(_key)
        self.assertEqual(cache.incr(key), 2)
        self.assertEqual(expire, cache._cache.ttl(_key))
        self.assertEqual(cache.decr(key), 1)
        self.assertEqual(expire, cache._cache.ttl(_key))

    # LRU order is recorded at shmcache.cache.ATIME_RESOLUTION (10 ms): the
    # clock moves on between the phases, as real requests would.
    def test_lru_get(self):
        """get() moves cache keys."""
        lru = caches["lru"]
        for key in range(9):
            lru.set(key, key, timeout=None)
            self.sleep(0.001)  # distinct access times, as a real clock gives
        self.sleep(1)
        for key in range(6):
            self.assertEqual(lru.get(key), key)
        self.sleep(1)
        lru.set(9, 9, timeout=None)
        for key in range(6):
            self.assertEqual(lru.get(key), key)
        for key in range(6, 9):
            self.assertIsNone(lru.get(key))
        self.assertEqual(lru.get(9), 9)

    def test_lru_set(self):
        """set() moves cache keys."""
        lru = caches["lru"]
        for key in range(9):
            lru.set(key, key, timeout=None)
            self.sleep(0.001)  # distinct access times, as a real clock gives
        self.sleep(1)
        for key in range(3, 9):
            lru.set(key, key, timeout=None)
        self.sleep(1)
        lru.set(9, 9, timeout=None)
        for key in range(3, 10):
            self.assertEqual(lru.get(key), key)
        for key in range(3):
            self.assertIsNone(lru.get(key))

    def test_lru_incr(self):
        """incr() moves cache keys."""
        lru = caches["lru"]
        for key in range(9):
            lru.set(key, key, timeout=None)
            self.sleep(0.001)  # distinct access times, as a real clock gives
        self.sleep(1)
        for key in range(6):
            self.assertEqual(lru.incr(key), key + 1)
        self.sleep(1)
        lru.set(9, 9, timeout=None)
        for key in range(6):
            self.assertEqual(lru.get(key), key + 1)
        for key in range(6, 9):
            self.assertIsNone(lru.get(key))
        self.assertEqual(lru.get(9), 9)

    def test_cull_drops_expired_entries_first(self):
        lru = caches["lru"]
        for key in range(3):
            lru.set(f"short{key}", key, timeout=1)
        for key in range(6):
            lru.set(f"long{key}", key, timeout=None)
        self.sleep(2)  # the short ones expired; nothing reclaimed them yet
        lru.set("new", 1)  # 9 stored: cull 3, the expired ones
        self.assertEqual(lru.get_many([f"long{k}" for k in range(6)] + ["new"]),
                         {**{f"long{k}": k for k in range(6)}, "new": 1})

    # -- what a memcached backend guarantees on oversized values ----------------
    def test_too_large_value_deletes_old_value(self):
        cache.set("small_value", "a")
        self.assertEqual(cache.get("small_value"), "a")
        large_value = "a" * (cache._cache.stats()["max_value_size"] + 1)
        with self.assertLogs("shmcache.contrib.django", "WARNING"):
            cache.set("small_value", large_value)
        self.assertIsNone(cache.get("small_value"))
        with self.assertLogs("shmcache.contrib.django", "WARNING"):
            self.assertEqual(cache.set_many({"big": large_value, "ok": 1}), ["big"])
        self.assertEqual(cache.get_many(["big", "ok"]), {"ok": 1})

    # -- configuration ----------------------------------------------------------
    def test_unknown_option(self):
        with self.assertRaisesMessage(ImproperlyConfigured, "unknown OPTIONS ['bogus']"):
            ShmCache(NAME, {"OPTIONS": {"bogus": 1}})

    def test_default_timeout_and_options(self):
        self.assertEqual(cache.default_timeout, 300)
        self.assertIsNone(cache._max_entries)  # no MAX_ENTRIES given: no culling
        self.assertEqual(caches["cull"]._max_entries, 30)
        self.assertIsNone(ShmCache(NAME, {"OPTIONS": {"MAX_ENTRIES": None}})._max_entries)
        cache.set("k", 1)
        self.assertAlmostEqual(cache._cache.ttl(cache.make_key("k")), 300, delta=1)

    def test_default_never_expiring_timeout(self):
        forever = caches["forever"]
        self.assertIsNone(forever.default_timeout)
        forever.set("infinite_foo", "bar")
        self.assertIsNone(forever._cache.ttl(forever.make_key("infinite_foo")))
        self.sleep(10**6)
        self.assertEqual(forever.get("infinite_foo"), "bar")

    # -- async (Django's a* methods) --------------------------------------------
    async def test_async_methods(self):
        await cache.aset("a", 1)
        self.assertEqual(await cache.aget("a"), 1)
        self.assertIs(await cache.aadd("a", 2), False)
        self.assertIs(await cache.aadd("b", 2), True)
        self.assertEqual(await cache.aget_many(["a", "b", "c"]), {"a": 1, "b": 2})
        self.assertEqual(await cache.aset_many({"c": 3, "d": None}), [])
        self.assertIs(await cache.ahas_key("d"), True)
        self.assertEqual(await cache.aincr("a", 10), 11)
        self.assertEqual(await cache.adecr("a"), 10)
        with self.assertRaises(ValueError):
            await cache.aincr("missing")
        self.assertIs(await cache.atouch("a", 1), True)
        self.sleep(2)
        self.assertIsNone(await cache.aget("a"))
        self.assertIs(await cache.adelete("b"), True)
        await cache.adelete_many(["c", "d"])
        self.assertEqual(await cache.aget_many(["b", "c", "d"]), {})
        self.assertEqual(await cache.aget_or_set("e", lambda: "computed"), "computed")
        self.assertEqual(await cache.aget_or_set("e", "other"), "computed")
        await cache.aset("v", "x", version=2)
        self.assertEqual(await cache.aincr_version("v", version=2), 3)
        self.assertEqual(await cache.aget("v", version=3), "x")
        await cache.aclose()
        await cache.aclear()
        self.assertIsNone(await cache.aget("e"))

    async def test_async_defaults_match_base(self):
        # The a* methods are ShmCache's own (inline, atomic incr), but keep
        # BaseCache's signatures.
        import inspect

        for name in ("aadd", "aget", "aset", "atouch", "adelete", "aget_many", "aset_many",
                     "adelete_many", "ahas_key", "aincr", "adecr", "aclear", "aclose", "aget_or_set"):
            with self.subTest(name=name):
                self.assertEqual(inspect.signature(getattr(ShmCache, name)),
                                 inspect.signature(getattr(BaseCache, name)))


class ProjectTests(SimpleTestCase):
    """The test project's views, through Django's test client."""

    def tearDown(self):
        cache.clear()

    def test_cache_page_serves_the_cached_response(self):
        c = Client()
        first = c.get("/cached/").content
        self.assertEqual(c.get("/cached/").content, first)
        CLOCK.advance(61)
        self.assertNotEqual(c.get("/cached/").content, first)

    def test_hits_counter(self):
        c = Client()
        self.assertEqual([c.get("/hits/").content for _ in range(3)], [b"1", b"2", b"3"])


# -- several processes -----------------------------------------------------------
def _incr_child(n):
    from django.core.cache import caches as child_caches

    c = child_caches["default"]
    for _ in range(n):
        c.incr("shared-counter")
    c.close()  # as at the end of a request: must not break the next one
    c.incr("shared-counter")


def _get_or_set_child(barrier):
    from django.core.cache import caches as child_caches

    def compute():
        child_caches["default"].incr("computed", 1)
        time.sleep(0.3)
        return f"from-{os.getpid()}"

    barrier.wait(10)
    v = child_caches["default"].get_or_set("expensive", compute, timeout=60)
    child_caches["default"].set(f"got-{os.getpid()}", v)


def _join_all(procs, timeout=30.0):
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        assert not any(p.is_alive() for p in procs), "a child process hung"
        assert [p.exitcode for p in procs] == [0] * len(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def test_counter_shared_by_forked_processes():
    cache.clear()
    cache.set("shared-counter", 0, timeout=None)
    procs = [CTX.Process(target=_incr_child, args=(200,)) for _ in range(4)]
    for p in procs:
        p.start()
    _join_all(procs)
    assert cache.get("shared-counter") == 4 * 201
    cache.clear()


def test_get_or_set_runs_once_across_processes():
    cache.clear()
    cache.set("computed", 0, timeout=None)
    barrier = CTX.Barrier(6)
    procs = [CTX.Process(target=_get_or_set_child, args=(barrier,)) for _ in range(6)]
    for p in procs:
        p.start()
    _join_all(procs)
    assert cache.get("computed") == 1
    got = {cache.get(f"got-{p.pid}") for p in procs}
    assert len(got) == 1 and got == {cache.get("expensive")}
    cache.clear()


def test_importing_shmcache_imports_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, shmcache, shmcache.contrib, shmcache.stampede;"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'django', 'flask', 'flask_caching', 'gunicorn'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- regressions and django-redis extras (issue 13) ---------------------------
def _readme_caches_setting() -> dict:
    """The ``CACHES`` of the README's Django section, run as a settings.py would run it."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("\n## Django\n"):]
    block = section[section.index("```python\n# settings.py\n") + len("```python\n"):]
    namespace: dict = {}
    exec(block[: block.index("```")], namespace)
    return namespace["CACHES"]


def test_readme_settings_block_keeps_1000_of_1000_entries(cache_name):
    """The README's settings block, as written: Django's MAX_ENTRIES=300 default
    used to cull it down to 203 entries at ~100x the cost per set. Only its
    LOCATION is swapped for a test name; the rest is read from README.md."""
    from django.utils.module_loading import import_string

    params = dict(_readme_caches_setting()["default"])
    backend = import_string(params.pop("BACKEND"))
    assert backend is ShmCache and params.pop("LOCATION") == "myapp"
    assert params["OPTIONS"]["size"] == "256MiB"
    readme = backend(cache_name, params)  # as django.core.cache.CacheHandler makes it
    try:
        assert readme.raw.stats()["size"] <= 256 * 2**20
        for i in range(1000):
            readme.set(f"k{i}", i)
        assert sum(1 for i in range(1000) if readme.get(f"k{i}") == i) == 1000
    finally:
        readme.raw.close()
        Cache.unlink(cache_name)


@pytest.mark.parametrize("frequency", [None, 2, 0])
def test_explicit_max_entries_culls_as_locmem_does(frequency):
    """MAX_ENTRIES given explicitly culls as LocMemCache does: after the same
    sets, the same number of entries is left (which ones may differ across
    stripes: LRU order there is approximate)."""
    from django.core.cache.backends.locmem import LocMemCache

    options = {"MAX_ENTRIES": 10} | ({} if frequency is None else {"CULL_FREQUENCY": frequency})
    culled = ShmCache(NAME, {"OPTIONS": options | {"size": "8MiB"}})
    locmem = LocMemCache(f"cull-{frequency}", {"OPTIONS": options})
    culled.clear()
    try:
        for i in range(25):
            culled.set(f"c{i}", i)
            locmem.set(f"c{i}", i)
            kept = sum(1 for k in range(i + 1) if culled.has_key(f"c{k}"))
            assert kept == sum(1 for k in range(i + 1) if locmem.has_key(f"c{k}")), (i, kept)
        assert 0 < kept <= 10
    finally:
        culled.clear()


def test_django_redis_ttl_expire_persist():
    CLOCK.advance(0)
    cache.clear()
    cache.set("t", 1, timeout=100)
    assert cache.ttl("t") == 100
    cache.set("forever", 1, timeout=None)
    assert cache.ttl("forever") is None and cache.ttl("absent") == 0
    assert cache.expire("forever", 20) and cache.ttl("forever") == 20
    assert cache.persist("forever") and cache.ttl("forever") is None
    assert not cache.expire("absent", 5) and not cache.persist("absent")
    CLOCK.advance(101)
    assert cache.ttl("t") == 0
    cache.clear()


def test_django_redis_keys_iter_keys_delete_pattern():
    cache.clear()
    other = caches["prefix"]
    for k in ("user:1", "user:2", "session:9"):
        cache.set(k, k)
    other.set("user:3", 3)
    v2 = caches["v2"]
    v2.set("user:4", 4)
    assert sorted(cache.keys("user:*")) == ["user:1", "user:2"]  # not the prefixed or version-2 alias's
    assert sorted(cache.iter_keys("*")) == ["session:9", "user:1", "user:2"]
    assert other.keys("user:*") == ["user:3"] and v2.keys("user:*") == ["user:4"]
    assert cache.delete_pattern("user:*") == 2
    assert cache.keys("*") == ["session:9"] and other.get("user:3") == 3
    custom = caches["custom_key"]
    custom.set("ck", 1)
    assert custom.keys("c*") == [custom.make_key("ck")]  # custom KEY_FUNCTION: the stored key
    cache.clear()


def _hold_lock(started, release):
    from django.core.cache import cache as child_cache

    with child_cache.lock("job", timeout=30):
        started.set()
        release.wait(30)


def test_django_redis_lock_across_processes():
    from shmcache.contrib import LockError

    cache.clear()
    started, release = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold_lock, args=(started, release))
    p.start()
    try:
        assert started.wait(30)
        lock = cache.lock("job", timeout=30, sleep=0.01)
        assert lock.locked() and not lock.acquire(blocking=False)
        assert not lock.acquire(blocking_timeout=0.05)
        with pytest.raises(LockError):
            lock.release()
        release.set()
        assert lock.acquire(blocking_timeout=20) and lock.owned()
        lock.release()
        assert not lock.locked()
    finally:
        release.set()
        p.join(30)
    assert p.exitcode == 0
    assert cache.raw is caches["v2"].raw  # one handle per LOCATION: the raw Cache
    cache.clear()


# -- the README's ttl/timeout table, cell by cell -----------------------------
OMITTED = object()


def _readme_ttl_table() -> dict:
    """{row: {column: cell}} of the README's "`ttl` and `timeout`: 0, None and negative" table."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = text[text.index("### `ttl` and `timeout`: 0, None and negative"):].splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next(i for i in range(first, len(lines)) if not lines[i].startswith("|"))
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines[first:end]]
    head, body = rows[0], rows[2:]
    return {r[0]: dict(zip(head[1:], r[1:])) for r in body}


def _expected(cell: str, same_as_cache: str | None = None) -> str:
    """What a README cell promises, in the words _lifetime measures."""
    if cell == "as `Cache`":
        return same_as_cache
    if "ValueError" in cell:
        return "ValueError"
    if cell.startswith("expire at once"):
        return "at once"
    if "never expire" in cell:
        return "never"
    if "300 s" in cell or cell == "`CACHE_DEFAULT_TIMEOUT`":
        return "300 s"  # the framework's default timeout, 300 s unless configured
    raise AssertionError(f"the test does not know what README's {cell!r} means: teach _expected")


def _lifetime(store, present) -> str:
    """Store through ``store()``, then watch the entry on the shared fake clock."""
    try:
        store()
    except ValueError:
        return "ValueError"
    if not present():
        return "at once"
    CLOCK.advance(299)
    if not present():
        return "under 300 s"
    CLOCK.advance(2)
    if not present():
        return "300 s"
    CLOCK.advance(10**8)
    return "never" if present() else "longer than 300 s"


def test_readme_ttl_table_is_what_each_api_does(cache_name):
    """Every cell of the README's table of what 0, None, negative and an
    omitted ttl/timeout mean, for the core, Django, Flask, AsyncCache and
    `shmcache set`, checked against what each one does."""
    from shmcache.aio import AsyncCache
    from shmcache.cli import main as cli
    from shmcache.contrib import shared_cache

    flask_backend = pytest.importorskip("shmcache.contrib.flask").ShmCache
    table = _readme_ttl_table()
    assert list(table) == ["omitted", "`None`", "`0`", "negative"]
    args = {"omitted": OMITTED, "`None`": None, "`0`": 0, "negative": -5}
    core = Cache(cache_name, size="8MiB", clock=CLOCK)
    flask = flask_backend(cache_name, clock=CLOCK)  # default_timeout 300, as CACHE_DEFAULT_TIMEOUT
    acore = AsyncCache(core)
    try:
        for row, arg in args.items():
            cells = table[row]
            kw = {} if arg is OMITTED else {"ttl": arg}
            key = f"{row}-core"
            core_got = _lifetime(lambda: core.set(key, 1, **kw), lambda: key in core)
            assert core_got == _expected(cells["`Cache` (`ttl=`)"]), (row, "Cache", core_got)
            akey = f"{row}-aio"
            got = _lifetime(lambda: acore.set(akey, 1, **kw), lambda: akey in acore)
            assert got == _expected(cells["`AsyncCache`, `shmcache set --ttl`"], core_got), (row, "AsyncCache")

            dkw = {} if arg is OMITTED else {"timeout": arg}
            cache.set(f"{row}-old", 0)
            got = _lifetime(lambda: cache.set(f"{row}-old", 1, **dkw), lambda: cache.has_key(f"{row}-old"))
            assert got == _expected(cells["Django backend (`timeout=`)"]), (row, "Django", got)
            if got == "at once":  # "old value removed": the earlier value is gone too
                assert cache.get(f"{row}-old") is None

            fkey = f"{row}-flask"
            got = _lifetime(lambda: flask.set(fkey, 1, **dkw), lambda: flask.has(fkey))
            assert got == _expected(cells["Flask backend (`timeout=`)"]), (row, "Flask", got)

            if arg is not None:  # the command line has no way to say None
                ckey = f"{row}-cli"
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    rc = cli(["set", "-n", cache_name, ckey, "1"] + ([] if arg is OMITTED else ["--ttl", str(arg)]))
                if rc:
                    assert "ttl" in err.getvalue(), err.getvalue()  # one line naming the bad ttl, exit 1
                    got = "ValueError"
                else:
                    got = "never" if admin.inspect(core, ckey).ttl is None else "expires"
                assert got == _expected(cells["`AsyncCache`, `shmcache set --ttl`"], core_got), (row, "cli")
    finally:
        cache.clear()
        core.close()
        shared_cache(cache_name).close()  # the Flask backend's handle (one per process and name)
        Cache.unlink(cache_name)


def test_a_group_shared_cache_follows_the_pickle_trust_rule(cache_name, tmp_path):
    # Issue 10: the backend pickles as Django does, but only where nobody else
    # can write the segment; a group member's planted pickle never runs.
    import fractions

    from shmcache import PickleRefused

    marker = tmp_path / "ran"
    shared = ShmCache(cache_name, {"OPTIONS": {"size": "1MiB", "mode": 0o660}})
    trusting = ShmCache(cache_name, {"OPTIONS": {"mode": 0o660, "allow_pickle": True}})
    try:
        shared.set("plain", {"a": [1, "two", b"3"], "b": (None, True)})
        assert shared.get("plain") == {"a": [1, "two", b"3"], "b": (None, True)}
        with pytest.raises(TypeError, match="does not trust pickle.*allow_pickle"):
            shared.set("obj", fractions.Fraction(1, 3))
        assert not shared.has_key("obj")
        with Cache(cache_name, mode=0o660, allow_pickle=True) as member:  # what any group member can do
            member.set(shared._key("planted"), Payload(str(marker)))
        for read in (lambda: shared.get("planted"), lambda: shared.get_many(["plain", "planted"])):
            with pytest.raises(PickleRefused, match="allow_pickle=True"):
                read()
        trusting.set("frac", fractions.Fraction(2, 3))  # "allow_pickle": True trusts every writer
        assert trusting.get("frac") == fractions.Fraction(2, 3)
        with pytest.raises(PickleRefused):
            shared.get("frac")
        assert not marker.exists()
    finally:
        shared.raw.close()
        trusting.raw.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "never"])
def test_a_bad_stampede_timeout_is_refused_at_construction(cache_name, value):
    # It was float()-ed and only failed at the first get_or_set.
    with pytest.raises(ImproperlyConfigured, match="stampede_timeout"):
        ShmCache(cache_name, {"OPTIONS": {"size": "1MiB", "stampede_timeout": value}})
    ok = ShmCache(cache_name, {"OPTIONS": {"size": "1MiB", "stampede_timeout": "2.5"}})
    assert ok._stampede_timeout == 2.5
    ok.raw.close()
