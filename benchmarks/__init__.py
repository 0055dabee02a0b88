"""The comparison suite: shmcache against the tools a user would pick instead.

Run it with ``make bench`` (full run, results under ``benchmarks/results/``)
or ``python -m benchmarks --quick`` while developing (results under
``benchmarks/results/tmp/``, which git ignores). ``benchmarks/README.md`` says
what is measured and how; ``python -m benchmarks --help`` lists the options.

Modules, one job each:

=================  =========================================================
``cleanup``        undo everything a run created (finally, atexit, SIGTERM)
``servers``        start/stop redis-server and memcached on unix sockets
``contenders``     one adapter per store: same operations, same handles
``measure``        the timing loops (batched latency, fixed-time throughput)
``workloads``      which operations, values, key sets, mixes and sizes
``report``         markdown tables, ratios, target checks, JSON, PNG plots
``bench_core``     the standalone shmcache-only script (``make bench-core``)
``bench_daemon``   the daemon's snapshot/restore/expiry benchmark (standalone)
=================  =========================================================

Nothing here is collected by pytest (``testpaths = ["tests"]`` and no file is
named ``test_*``); ``tests/test_bench_smoke.py`` runs the quickest mode.
"""
