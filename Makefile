# make test  - create .venv if needed, install shmcache with its test extra, run pytest
# make demo  - run the demo (daemon + workers + snapshot + warm restart)
# make bench - run the benchmarks (the comparison suite, then the full-cache workload)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml setup.py shmcache/_speedups.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,django,flask,gunicorn,near]'
	touch $(STAMP)

# The near-cache tests (tests/test_near*.py) start a real redis-server.
.PHONY: redis-server
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q redis-server; }

test: $(STAMP) tools redis-server
	SHMCACHE_REQUIRE_SPEEDUPS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# tmux: the `shmcache top` test drives it in a real terminal (send-keys/capture-pane)
.PHONY: tools
tools:
	@command -v tmux >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q tmux; }

demo: $(STAMP)
	$(PY) -m shmcache.cli demo

bench: $(STAMP)
	command -v redis-server >/dev/null && command -v memcached >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q redis-server memcached; }
	$(PY) -c 'import lmdb, diskcache, redis, hiredis, pymemcache, UltraDict, matplotlib' 2>/dev/null \
	  || $(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks $(BENCH_ARGS)
	$(PY) benchmarks/bench_full.py

.PHONY: bench-core
bench-core: $(STAMP)
	$(PY) benchmarks/bench_core.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_full.py --quick --no-servers

# the full-cache workload alone; compare two checkouts in one run with
# BENCH_FULL_ARGS='--impl old=/path/to/old/checkout --impl new=.'
.PHONY: bench-full
bench-full: $(STAMP)
	$(PY) benchmarks/bench_full.py $(BENCH_FULL_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
