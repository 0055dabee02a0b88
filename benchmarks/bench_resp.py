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
import re
import resource
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


def start_shmcache(workers: int, size: str, batch: bool = False):
    """``shmcache serve --workers N``; with ``batch``, its worker processes
    are switched to SCHED_BATCH (no preemption of a running process when
    they wake; the same CPU share), an experiment, not a serve option."""
    name = f"bench-resp-{uuid.uuid4().hex[:8]}"
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "shmcache", "serve", "-n", name, "--size", size,
                          "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, p)
    if batch:
        deadline = time.monotonic() + 10
        while workers > 1 and len(psutil.Process(p.pid).children()) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        for w in (psutil.Process(p.pid).children() if workers > 1 else [psutil.Process(p.pid)]):
            os.sched_setscheduler(w.pid, os.SCHED_BATCH, os.sched_param(0))
    return p, port, name


def server_usage(proc: subprocess.Popen) -> dict:
    """pid -> (user + system seconds, voluntary context switches: sleeps in
    epoll_wait, mostly) so far of ``proc`` and
    its live children (the workers of ``shmcache serve``; they outlive every
    test of a run)."""
    out = {}
    try:
        root = psutil.Process(proc.pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            cs = p.num_ctx_switches()
        except psutil.NoSuchProcess:
            continue
        out[p.pid] = (t.user + t.system, cs.voluntary)
    return out


def run_benchmark(proc: subprocess.Popen, port: int, n: int, clients: int, pipeline: int, tests: str = TESTS) -> dict:
    """One redis-benchmark run per test. Besides its own figures: the
    server's CPU and sleeps per request, the client's CPU and preemptions
    per request (redis-benchmark needs a core of its own too), and how the
    server's CPU split over its processes (``serve --workers 2``: the share
    of each worker; the supervisor is idle)."""
    rows = {}
    for test in tests.split(","):
        cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", test, "-n", str(n),
               "-c", str(clients), "-P", str(pipeline), "--csv", "-r", "100000"]
        before = server_usage(proc)
        client_before = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children: redis-benchmark only
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800).stdout
        client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        after = server_usage(proc)
        delta = {pid: (after[pid][0] - before.get(pid, (0.0, 0))[0], after[pid][1] - before.get(pid, (0.0, 0))[1])
                 for pid in after}
        cpu = sum(d[0] for d in delta.values())
        busy = sorted((d[0] for d in delta.values() if d[0] > 0.05 * cpu), reverse=True)
        client_cpu = (client_after.ru_utime + client_after.ru_stime) - (client_before.ru_utime + client_before.ru_stime)
        for row in csv.DictReader(io.StringIO(out)):
            name = row["test"].split(" ")[0]
            rows[name] = {k: float(v) for k, v in row.items() if k != "test"}
            rows[name]["cpu_us"] = cpu / n * 1e6
            rows[name]["sleeps_per_req"] = sum(d[1] for d in delta.values()) / n
            rows[name]["client_cpu_us"] = client_cpu / n * 1e6
            # the client preempted (involuntary switches): it lost its CPU to a server process
            rows[name]["client_preempted"] = (client_after.ru_nivcsw - client_before.ru_nivcsw) / n
            rows[name]["split"] = "/".join(f"{100 * b / cpu:.0f}" for b in busy) if cpu else "-"
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
    ap.add_argument("--servers", default="redis,w1,w2",
                    help="which servers to run, in this order each round: redis (redis-server), w1, w2 "
                         "(shmcache serve --workers 1 / 2; wN for N workers; wNb: its workers as SCHED_BATCH); "
                         "default redis,w1,w2")
    ap.add_argument("--tests", default=TESTS, help=f"redis-benchmark tests (default {TESTS})")
    ap.add_argument("--out", help="also write the markdown report here")
    a = ap.parse_args(argv)
    for tool in ("redis-server", "redis-benchmark"):
        if not shutil.which(tool):
            print(f"bench_resp: {tool} not found (make bench installs redis-server)", file=sys.stderr)
            return 1
    contenders = []
    for label in a.servers.split(","):
        if label == "redis":
            contenders.append(("redis-server", start_redis))
        elif re.fullmatch(r"w[1-9][0-9]*b?", label):
            contenders.append((f"shmcache {label}", lambda tmp, w=int(label[1:].rstrip("b")), b=label.endswith("b"):
                               start_shmcache(w, a.size, b)))
        else:
            ap.error(f"unknown server {label!r} in --servers")
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-resp-") as tmp:
        for rnd in range(a.rounds):
            for depth in [int(x) for x in a.pipelines.split(",")]:
                for label, start in contenders:
                    proc, port, name = start(tmp)
                    try:
                        runs.setdefault((depth, label), []).append(run_benchmark(proc, port, a.n, a.c, depth, a.tests))
                    finally:
                        stop(proc)
                        if name:
                            from shmcache import Cache

                            Cache.unlink(name)
                    print(f"done: round {rnd + 1} -P {depth} {label}", file=sys.stderr)
    results = {k: median_rows(v) for k, v in runs.items()}
    lines = [
        f"`python benchmarks/bench_resp.py -n {a.n} -c {a.c} --pipelines {a.pipelines} --rounds {a.rounds} "
        f"--servers {a.servers} --tests {a.tests}` on "
        f"{platform.node()} ({os.cpu_count()} CPUs, load average at the end "
        f"{os.getloadavg()[0]:.1f}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.split(' sha')[0]}.",
        "",
        "server CPU: user + system time of the server's processes per request (µs), "
        "of the round shown; sleeps/req: the server processes' voluntary context switches (waits "
        "for work) per request; client CPU: redis-benchmark's own user + system time per request (µs); "
        "client preempted/req: its involuntary context switches per request (it lost its CPU); "
        "split: each busy server process's share of the server CPU (%).",
        "",
        "| pipeline | test | server | requests/s | p50 ms | p99 ms | max ms | vs redis-server | server CPU µs/req "
        "| sleeps/req | client CPU µs/req | client preempted/req | split |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for depth in [int(x) for x in a.pipelines.split(",")]:
        for test in a.tests.split(","):
            key = test.upper()
            base = results.get((depth, "redis-server"), {}).get(key, {}).get("rps")
            for label, _ in contenders:
                r = results.get((depth, label), {}).get(key)
                if not r:
                    continue
                ratio = f"{r['rps'] / base:.2f}x" if base else "-"
                lines.append(f"| {depth} | {key} | {label} | {r['rps']:,.0f} | {r['p50_latency_ms']:.3f} | "
                             f"{r['p99_latency_ms']:.3f} | {r['max_latency_ms']:.3f} | {ratio} | {r['cpu_us']:.1f} | "
                             f"{r['sleeps_per_req']:.3f} | {r['client_cpu_us']:.1f} | {r['client_preempted']:.3f} | "
                             f"{r['split']} |")
    lines += _workers_compared(runs, contenders, a)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    return 0


def _workers_compared(runs: dict, contenders: list, a) -> list:
    """Each shmcache wN against w1, round by round: the rounds ran
    interleaved, so round i of both saw about the same machine."""
    labels = [label for label, _ in contenders]
    if "shmcache w1" not in labels:
        return []
    out = ["", "| pipeline | test | server | requests/s vs w1 (median round) | rounds it beat w1 |",
           "| --- | --- | --- | ---: | ---: |"]
    for depth in [int(x) for x in a.pipelines.split(",")]:
        base_rounds = runs.get((depth, "shmcache w1"), [])
        for label in labels:
            if not label.startswith("shmcache w") or label == "shmcache w1":
                continue
            for test in a.tests.split(","):
                key = test.upper()
                pairs = [(mine[key]["rps"], base[key]["rps"]) for mine, base in zip(runs.get((depth, label), []),
                                                                                      base_rounds)
                         if key in mine and key in base]
                if not pairs:
                    continue
                ratios = sorted(m / b for m, b in pairs)
                wins = sum(m > b for m, b in pairs)
                out.append(f"| {depth} | {key} | {label} | {ratios[len(ratios) // 2]:.2f}x | {wins} of {len(pairs)} |")
    return out


if __name__ == "__main__":
    sys.exit(main())
