# make test  - create .venv if needed, install shmcache with its test extra, run pytest
# make demo  - run the demo (daemon + workers + snapshot + warm restart)
# make bench - run the benchmarks (the comparison suite, the full-cache workload, RESP, near;
#              NEAR_BENCH_ARGS for benchmarks/bench_near.py)
# make dist  - build the wheel and the sdist into dist/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean dist

$(STAMP): pyproject.toml setup.py shmcache/_speedups.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,django,flask,gunicorn,near,server]'
	touch $(STAMP)

# The near-cache tests (tests/test_near*.py) start a real redis-server; the
# `shmcache serve` tests drive its redis-cli (tests/test_server.py).
.PHONY: redis-server
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q redis-server; }

# ioredis from npm: the Node.js client in the `shmcache serve` tests (skipped without npm)
NODE_MODULES := tests/node/node_modules/.package-lock.json
$(NODE_MODULES): tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null; then cd tests/node && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the Node.js client test of shmcache serve will be skipped"; fi

# tcl: runs Redis' own test suite against `shmcache serve` (tests/test_server_redis_suite.py)
.PHONY: tclsh
tclsh:
	@command -v tclsh >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q tcl; }

test: $(STAMP) tools redis-server tclsh browser $(NODE_MODULES)
	SHMCACHE_REQUIRE_SPEEDUPS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# tmux: the `shmcache top` test drives it in a real terminal (send-keys/capture-pane)
.PHONY: tools
tools:
	@command -v tmux >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q tmux; }
	@# tests/test_deploy.py: systemd-analyze verifies the unit, useradd makes a real
	@# unprivileged user, unshare makes private /dev/shm and PID namespaces
	@command -v systemd-analyze >/dev/null && command -v useradd >/dev/null && command -v unshare >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q systemd passwd util-linux; }

# A headless Chromium renders the daemon's status page in tests/test_status_page.py
# (Debian's headless-only build: ~96 MB, ~35 s to install once; no browser download of its own)
.PHONY: browser
browser:
	@command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
	    --no-install-recommends chromium-headless-shell; }

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
	$(PY) -c 'import hiredis' 2>/dev/null || $(PY) -m pip install -q -e '.[server]'
	$(PY) benchmarks/bench_resp.py --out benchmarks/results/resp.md $(RESP_BENCH_ARGS)
	$(PY) benchmarks/bench_near.py $(NEAR_BENCH_ARGS)

.PHONY: bench-core
bench-core: $(STAMP)
	$(PY) benchmarks/bench_core.py $(BENCH_ARGS)
	$(PY) benchmarks/bench_full.py --quick --no-servers

# the full-cache workload alone; compare two checkouts in one run with
# BENCH_FULL_ARGS='--impl old=/path/to/old/checkout --impl new=.'
.PHONY: bench-full
bench-full: $(STAMP)
	$(PY) benchmarks/bench_full.py $(BENCH_FULL_ARGS)

dist: $(STAMP)
	$(PY) -c 'import build' 2>/dev/null || $(PY) -m pip install -q build
	rm -rf dist
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
