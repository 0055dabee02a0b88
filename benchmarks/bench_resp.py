"""``shmcache serve`` against ``redis-server``, with redis-benchmark, same run.

    python benchmarks/bench_resp.py                  # -n 200000 -c 50, unpipelined and -P 16
    python benchmarks/bench_resp.py -n 50000 --out benchmarks/results/tmp/resp.md
    python benchmarks/bench_resp.py -n 100000 --rounds 3    # interleaved rounds, median per test

For each pipeline depth it runs ``redis-benchmark -t set,get,incr,mset -n N
-c 50 [-P 16] --csv`` against redis-server, ``shmcache serve --workers 1``
and ``--workers 2`` (TCP on 127.0.0.1, each server on its own fresh cache),
in turn, and prints requests/s, p50/p99/max latency, the ratios to
redis-server, and what a request cost the server in CPU: the user + system
time of the server's processes (psutil; every worker of ``shmcache serve``)
over one test, divided by its requests. That figure is contention-insensitive
where requests/s is not (a shared machine slows the clock, not the work).
Each test is its own redis-benchmark run so its CPU time is its own. Every
server is started here and stopped by PID.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import psutil

TESTS = "set,get,incr,mset"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(10).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered PING on port {port} within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_redis(tmp: str):
    port = free_port()
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", tmp, "--loglevel", "warning"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, p)
    return p, port, None


def start_shmcache(workers: int, size: str):
    name = f"bench-resp-{uuid.uuid4().hex[:8]}"
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "shmcache", "serve", "-n", name, "--size", size,
                          "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, p)
    return p, port, name


def server_cpu(proc: subprocess.Popen) -> float:
    """User + system seconds used so far by ``proc`` and its live children
    (the workers of ``shmcache serve``; they outlive every test of a run)."""
    total = 0.0
    try:
        root = psutil.Process(proc.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return total
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def run_benchmark(proc: subprocess.Popen, port: int, n: int, clients: int, pipeline: int) -> dict:
    rows = {}
    for test in TESTS.split(","):
        cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", test, "-n", str(n),
               "-c", str(clients), "-P", str(pipeline), "--csv", "-r", "100000"]
        before = server_cpu(proc)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800).stdout
        cpu_us = (server_cpu(proc) - before) / n * 1e6
        for row in csv.DictReader(io.StringIO(out)):
            name = row["test"].split(" ")[0]
            rows[name] = {k: float(v) for k, v in row.items() if k != "test"}
            rows[name]["cpu_us"] = cpu_us
    return rows


def median_rows(rounds: list) -> dict:
    """Per test, the round with the median requests/s (its latencies with it)."""
    out = {}
    for test in rounds[0]:
        rows = sorted((r[test] for r in rounds if test in r), key=lambda row: row["rps"])
        out[test] = rows[len(rows) // 2]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200_000, help="requests per test (default 200000)")
    ap.add_argument("-c", type=int, default=50, help="parallel connections (default 50)")
    ap.add_argument("--pipelines", default="1,16", help="pipeline depths (default 1,16)")
    ap.add_argument("--size", default="256MiB", help="cache size for shmcache serve (default 256MiB)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every contender this many times, interleaved, and report the round with the "
                         "median requests/s per test (default 1; more evens out a busy machine)")
    ap.add_argument("--out", help="also write the markdown report here")
    a = ap.parse_args(argv)
    for tool in ("redis-server", "redis-benchmark"):
        if not shutil.which(tool):
            print(f"bench_resp: {tool} not found (make bench installs redis-server)", file=sys.stderr)
            return 1
    contenders = [("redis-server", lambda tmp: start_redis(tmp)),
                  ("shmcache w1", lambda tmp: start_shmcache(1, a.size)),
                  ("shmcache w2", lambda tmp: start_shmcache(2, a.size))]
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-resp-") as tmp:
        for rnd in range(a.rounds):
            for depth in [int(x) for x in a.pipelines.split(",")]:
                for label, start in contenders:
                    proc, port, name = start(tmp)
                    try:
                        runs.setdefault((depth, label), []).append(run_benchmark(proc, port, a.n, a.c, depth))
                    finally:
                        stop(proc)
                        if name:
                            from shmcache import Cache

                            Cache.unlink(name)
                    print(f"done: round {rnd + 1} -P {depth} {label}", file=sys.stderr)
    results = {k: median_rows(v) for k, v in runs.items()}
    lines = [
        f"`python benchmarks/bench_resp.py -n {a.n} -c {a.c} --pipelines {a.pipelines} --rounds {a.rounds}` on "
        f"{platform.node()} ({os.cpu_count()} CPUs, load average at the end "
        f"{os.getloadavg()[0]:.1f}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split(' sha')[0]}.",
        "",
        "server CPU: user + system time of the server's processes per request (µs), "
        "of the round shown.",
        "",
        "| pipeline | test | server | requests/s | p50 ms | p99 ms | max ms | vs redis-server | server CPU µs/req |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for depth in [int(x) for x in a.pipelines.split(",")]:
        for test in TESTS.split(","):
            key = test.upper()
            base = results.get((depth, "redis-server"), {}).get(key, {}).get("rps")
            for label, _ in contenders:
                r = results.get((depth, label), {}).get(key)
                if not r:
                    continue
                ratio = f"{r['rps'] / base:.2f}x" if base else "-"
                lines.append(f"| {depth} | {key} | {label} | {r['rps']:,.0f} | {r['p50_latency_ms']:.3f} | "
                             f"{r['p99_latency_ms']:.3f} | {r['max_latency_ms']:.3f} | {ratio} | {r['cpu_us']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
