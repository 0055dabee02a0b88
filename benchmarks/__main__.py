"""``python -m benchmarks``: shmcache against the alternatives, same run, same method.

    python -m benchmarks                 # full run (~10 min) -> benchmarks/results/
    python -m benchmarks --quick         # ~1-2 min, for development -> benchmarks/results/tmp/
    python -m benchmarks --only shmcache,lmdb --procs 1,2 --duration 1
    python -m benchmarks --compare a.json b.json   # how much two runs differ
    python -m benchmarks --render benchmarks/results  # redo tables/plots from results.json

A full run keeps the previous ``results.json`` of its output directory as
``previous.json`` and reports how much the two runs differ. Exit status: 0, or
1 if a contender failed or something of ours was left in /dev/shm.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time

from . import cleanup, report
from .contenders import ALL, NAMES, Servers
from .workloads import Config, run_all

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short points, 1 repeat (development, smoke test)")
    p.add_argument("--only", type=_csv, help=f"contenders, comma separated: {','.join(NAMES)}")
    p.add_argument("--skip", type=_csv, default=[], help="contenders to leave out")
    p.add_argument("--workloads", type=_csv, help="latency,throughput,memory (default: all)")
    p.add_argument("--procs", type=lambda s: [int(x) for x in _csv(s)], help="process counts (default 1,2,4)")
    p.add_argument("--duration", type=float, help="seconds per throughput point (default 1.5, quick 0.3)")
    p.add_argument("--repeats", type=int, help="repeats per point (default 3, quick 1)")
    p.add_argument("--latency-budget", type=float, help="seconds of batches per latency point (default 0.2)")
    p.add_argument("--keys", type=int, dest="tp_keys", help="throughput keyspace (default 100000)")
    p.add_argument("--entries", type=int, dest="mem_entries", help="entries for the memory test (default 100000)")
    p.add_argument("--out", help="output directory (default benchmarks/results, quick: benchmarks/results/tmp)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--render", metavar="DIR", help="re-render DIR/results.md and the plots from DIR/results.json, and exit")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print how two runs differ and exit")
    a = p.parse_args(argv)
    if a.only:
        bad = [n for n in a.only + a.skip if n not in NAMES]
        if bad:
            p.error(f"unknown contender(s) {bad}; choose from {', '.join(NAMES)}")
    if a.procs and any(n < 1 for n in a.procs):
        p.error("--procs must be positive")
    return a


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        return f"{kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        return "? RAM"


def _git(*args) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except Exception:
        return ""


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def meta(args, contenders, servers) -> dict:
    versions = {"python": platform.python_version()}
    for c in contenders:
        versions.update(c.versions())
    versions.update(servers.versions())
    try:
        import matplotlib

        versions["matplotlib"] = matplotlib.__version__
    except ImportError:
        versions["matplotlib"] = "missing (no plots)"
    commit = _git("rev-parse", "--short", "HEAD")
    # What actually ran: the tree may be dirty and the C extension rebuilt, so
    # hash the imported package's files (two runs with one hash ran one code).
    import hashlib

    import shmcache

    pkg = os.path.dirname(shmcache.__file__)
    h = hashlib.sha256()
    for name in sorted(os.listdir(pkg)):
        if name.endswith((".py", ".c", ".so")):
            with open(os.path.join(pkg, name), "rb") as f:
                h.update(name.encode() + f.read())
    speedups = "C speedups" if getattr(importlib.import_module("shmcache.cache"), "USE_SPEEDUPS", False) \
        else "pure Python"

    dirty = _git("status", "--porcelain", "--", "shmcache")
    return dict(
        command="python -m benchmarks " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "python -m benchmarks",
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=f"{_cpu()}, {os.cpu_count()} cores, {_mem_total()}, Linux {platform.release()}, "
                f"{platform.python_implementation()} {platform.python_version()}",
        shmcache=f"commit {commit or '?'}" + (" + uncommitted changes in shmcache/" if dirty else "")
        + f", files sha256 {h.hexdigest()[:12]}, {speedups}",
        versions=versions,
        load_before=_load(),
    )


def main(argv=None) -> int:
    args = parse(argv)
    if args.compare:
        a, b = (json.load(open(p)) for p in args.compare)
        print(report.compare_text(a, b, os.path.basename(args.compare[0]), os.path.basename(args.compare[1])))
        return 0
    if args.render:
        res = json.load(open(os.path.join(args.render, "results.json")))
        with open(os.path.join(args.render, "results.md"), "w") as f:
            f.write(report.markdown(res, res.get("comparison")))
        made = [] if args.no_plots else report.plots(res, args.render)
        print("rendered", os.path.join(args.render, "results.md"), *made)
        return 0
    cfg = Config.make(args.quick, procs=args.procs, duration=args.duration, repeats=args.repeats,
                      latency_budget=args.latency_budget, workloads=args.workloads, tp_keys=args.tp_keys,
                      mem_entries=args.mem_entries)
    out = args.out or (os.path.join(RESULTS, "tmp") if args.quick else RESULTS)
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    servers = Servers()
    cleanup.register("stop servers", servers.stop_all)
    status = 0
    try:
        chosen = [cls(servers) for cls in ALL if (not args.only or cls.name in args.only) and cls.name not in args.skip]
        info, runnable = {}, []
        for c in chosen:
            why = c.unavailable()
            info[c.name] = dict(label=c.label, shared=c.shared, memory_method=c.memory_method, skipped=why)
            if why:
                print(f"skipping {c.name}: {why}", file=sys.stderr)
            else:
                runnable.append(c)
        res = dict(meta=meta(args, runnable, servers), config=cfg.as_dict(), contenders=info)
        res.update(run_all(runnable, cfg))
        res["meta"]["load_after"] = _load()
        res["meta"]["wall_s"] = time.monotonic() - t0
        if res.get("errors"):
            status = 1
        # keep the previous run for the noise comparison
        jpath = os.path.join(out, "results.json")
        comparison = None
        if os.path.exists(jpath):
            prev_path = os.path.join(out, "previous.json")
            try:
                prev = json.load(open(jpath))
                if prev.get("config", {}).get("quick") == cfg.quick:
                    os.replace(jpath, prev_path)
                    comparison = report.compare_text(prev, res, f"previous run ({prev['meta']['date']})",
                                                     f"this run ({res['meta']['date']})")
            except (ValueError, KeyError, OSError) as e:
                print(f"could not compare with the previous run: {e}", file=sys.stderr)
        res["comparison"] = comparison
        report.write_json(res, jpath)
        md = report.markdown(res, comparison)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(md)
        made = [] if args.no_plots else report.plots(res, out)
        print(md)
        print(f"written: {jpath}, {os.path.join(out, 'results.md')}" + (", " + ", ".join(made) if made else ""),
              file=sys.stderr)
    finally:
        failed = cleanup.run_all()
        left = cleanup.leftovers()
        if left:
            print(f"LEAK: left in /dev/shm: {sorted(left)}", file=sys.stderr)
            status = 1
        if failed:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
