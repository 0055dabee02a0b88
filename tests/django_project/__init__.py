"""A minimal Django project whose caches are shmcache (see settings.py)."""
