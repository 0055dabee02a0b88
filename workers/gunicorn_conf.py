"""gunicorn configuration of the example app: shmcache's hooks plus the demo's settings.

Start (from the repository root)::

    gunicorn -c workers/gunicorn_conf.py workers.app:app
    gunicorn -c workers/gunicorn_conf.py --preload -k gthread --threads 4 workers.app:app

The hooks are ``shmcache.contrib.gunicorn``'s (see its docstring and the
README's "Using with gunicorn"); this file adds what the example needs: the
app, and a snapshot under ``demo-data/`` unless SHMCACHE_SNAPSHOT says
otherwise. Copy it as the start of your own config.

What to watch for: the master logs the daemon's pid and log file; ``ls /dev/shm`` shows
``shmcache.<name>`` while gunicorn runs and not after (unless kept);
``kill -9`` a worker and the others keep serving (``curl localhost:8000/stats``
shows ``recoveries`` if it died holding a lock).
"""

import os

from shmcache.contrib import env_settings

os.environ.setdefault("SHMCACHE_SNAPSHOT", os.path.join("demo-data", f"{env_settings()['name']}.snapshot"))

from shmcache.contrib.gunicorn import *  # noqa: E402,F401,F403 - the hooks and bind/workers

wsgi_app = "workers.app:app"
