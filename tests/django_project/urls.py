"""Two views: a page cached with ``cache_page`` and a counter shared by all processes."""

import itertools
import os

from django.core.cache import caches
from django.http import HttpResponse
from django.urls import path
from django.views.decorators.cache import cache_page

_renders = itertools.count(1)


@cache_page(60)
def cached_page(request):
    """Rendered once per minute for every worker (the response is in shmcache)."""
    return HttpResponse(f"render {next(_renders)} in {os.getpid()}")


def hits(request):
    """A counter shared by all processes: atomic ``incr`` (``add`` creates it)."""
    cache = caches["default"]
    cache.add("hits", 0, timeout=None)
    return HttpResponse(str(cache.incr("hits")))


urlpatterns = [
    path("cached/", cached_page),
    path("hits/", hits),
]
