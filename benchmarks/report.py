"""Turn a results dict into markdown tables, target checks, JSON and PNG plots.

Ratios are always "how many times better shmcache is" (> 1: shmcache wins,
< 1: the contender wins): contender ns / shmcache ns for latency, shmcache
ops/s / contender ops/s for throughput, contender bytes / shmcache bytes for
memory.
"""

from __future__ import annotations

import json
import math

from .workloads import LATENCY_OPS, OP_LABELS

REF = "shmcache"


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def fmt_ns(ns: float | None) -> str:
    if ns is None or (isinstance(ns, float) and math.isnan(ns)):
        return "—"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def fmt_ops(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M/s"
    if x >= 1e3:
        return f"{x / 1e3:.0f} k/s"
    return f"{x:.0f} /s"


def fmt_ratio(r: float | None) -> str:
    if r is None or math.isnan(r):
        return ""
    if r < 1:
        return f"{r:.2f}x"
    return f"{r:.1f}x" if r < 100 else f"{r:.0f}x"


def _lat(res, c, op, stat="median"):
    try:
        return res["latency"][c][op][stat]
    except KeyError:
        return None


def _tp(res, c, mix, p):
    try:
        return res["throughput"][c][mix][str(p)]["median"]
    except KeyError:
        return None


def _mem(res, c):
    try:
        return res["memory"][c]["bytes_per_entry"]
    except KeyError:
        return None


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def contenders_in(res) -> list[str]:
    order = [c for c in res["contenders"] if not res["contenders"][c].get("skipped")]
    return order


def label(res, c) -> str:
    return res["contenders"][c]["label"]


# ------------------------------------------------------------------ tables
def headline(res) -> str:
    """One row per contender: the key numbers and shmcache's advantage."""
    cs = contenders_in(res)
    procs = res["config"]["procs"]
    cols = [("get hit 100 B", "lat", "get_hit_100B"), ("set 100 B", "lat", "set_100B"),
            ("get miss", "lat", "get_miss"), ("incr", "lat", "incr")]
    cols += [(f"90/10 mix, {p} proc", "tp", ("90/10", p)) for p in procs]
    cols += [("bytes/entry", "mem", None)]
    head = "| contender | " + " | ".join(c[0] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for c in cs:
        cells = []
        for _title, kind, arg in cols:
            if kind == "lat":
                v, ref = _lat(res, c, arg), _lat(res, REF, arg)
                txt, r = fmt_ns(v), _ratio(v, ref)
            elif kind == "tp":
                v, ref = _tp(res, c, *arg), _tp(res, REF, *arg)
                txt, r = fmt_ops(v), _ratio(ref, v)
            else:
                v, ref = _mem(res, c), _mem(res, REF)
                txt, r = (f"{v:.0f}" if v is not None else "—"), _ratio(v, ref)
            if c != REF and r is not None:
                txt += f" ({fmt_ratio(r)})"
            cells.append(txt)
        lines.append(f"| {label(res, c)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latency_tables(res) -> str:
    cs = [c for c in contenders_in(res) if c in res.get("latency", {})]
    if not cs:
        return ""
    out = ["Median per-op latency (batches of 100 ops), and shmcache's advantage:\n",
           "| operation | " + " | ".join(label(res, c) for c in cs) + " |",
           "|" + "---|" * (len(cs) + 1)]
    for op in LATENCY_OPS:
        cells = []
        for c in cs:
            v = _lat(res, c, op)
            t = fmt_ns(v)
            r = _ratio(v, _lat(res, REF, op))
            if c != REF and r is not None:
                t += f" ({fmt_ratio(r)})"
            cells.append(t)
        out.append(f"| {OP_LABELS[op]} | " + " | ".join(cells) + " |")
    out.append("\nDistribution per contender (median / p90 / p99 of 100-op batches; max = slowest "
               "single unbatched call, timer included; spread = (max - min) / median of the repeat medians):\n")
    for c in cs:
        out.append(f"**{label(res, c)}**\n")
        out.append("| operation | median | p90 | p99 | max | spread |")
        out.append("|---|---|---|---|---|---|")
        for op in LATENCY_OPS:
            d = res["latency"][c].get(op)
            if d:
                out.append(f"| {OP_LABELS[op]} | {fmt_ns(d['median'])} | {fmt_ns(d['p90'])} | "
                           f"{fmt_ns(d['p99'])} | {fmt_ns(d['max'])} | {d['spread_pct']:.0f}% |")
        out.append("")
    return "\n".join(out)


def throughput_tables(res) -> str:
    cs = [c for c in contenders_in(res) if c in res.get("throughput", {})]
    if not cs:
        return ""
    procs = res["config"]["procs"]
    out = []
    for mix in res["config"]["mixes"]:
        out.append(f"\n{mix} get/set mix, {_k(res['config']['tp_keys'])} keys, Zipf(0.99), {res['config']['duration']} s per point "
                   f"(median of {res['config']['repeats']}; spread between repeats in brackets; "
                   f"ratio = shmcache advantage):\n")
        out.append("| contender | " + " | ".join(f"{p} proc" for p in procs) + f" | scaling {procs[0]}→{procs[-1]} |"
                   if len(procs) > 1 else "| contender | " + " | ".join(f"{p} proc" for p in procs) + " |")
        out.append("|" + "---|" * (len(procs) + 1 + (len(procs) > 1)))
        for c in cs:
            cells = []
            for p in procs:
                d = res["throughput"][c].get(mix, {}).get(str(p))
                if not d:
                    cells.append("—")
                    continue
                t = f"{fmt_ops(d['median'])} [±{d['spread_pct'] / 2:.0f}%]"
                r = _ratio(_tp(res, REF, mix, p), d["median"])
                if c != REF and r is not None:
                    t += f" ({fmt_ratio(r)})"
                cells.append(t)
            if len(procs) > 1:
                a, b = _tp(res, c, mix, procs[0]), _tp(res, c, mix, procs[1])
                z = _tp(res, c, mix, procs[-1])
                if not (a and b and z):
                    cells.append("—")
                elif len(procs) == 2:
                    cells.append(f"{b / a:.2f}x")
                else:
                    cells.append(f"{b / a:.2f}x at {procs[1]}, {z / a:.2f}x at {procs[-1]}")
            out.append(f"| {label(res, c)} | " + " | ".join(cells) + " |")
        out.append(f"\nCPU the {mix} workers got: cores = sum over workers of CPU s per wall s (at most 2 "
                   "here; low = other load on the machine, or waiting on a lock/socket/server), and ops per "
                   "CPU-second of the workers (server CPU not included), which the machine's load "
                   "disturbs less than ops/s:\n")
        out.append("| contender | " + " | ".join(f"{p} proc" for p in procs) + " |")
        out.append("|" + "---|" * (len(procs) + 1))
        for c in cs:
            cells = []
            for p in procs:
                d = res["throughput"][c].get(mix, {}).get(str(p))
                if d and d.get("cpu_cores"):
                    cells.append(f"{d['cpu_cores']:.2f} ({fmt_ops(d['median'] / d['cpu_cores']).replace('/s', '')})")
                else:
                    cells.append("—")
            out.append(f"| {label(res, c)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def memory_table(res) -> str:
    cs = [c for c in contenders_in(res) if c in res.get("memory", {})]
    if not cs:
        return ""
    out = ["| contender | bytes/entry | vs shmcache | method |", "|---|---|---|---|"]
    for c in cs:
        m = res["memory"][c]
        r = _ratio(m["bytes_per_entry"], _mem(res, REF))
        method = m["method"]
        if "sorted_insert_bytes_per_entry" in m:
            method += f" (keys inserted in sorted order instead: {m['sorted_insert_bytes_per_entry']:.0f})"
        out.append(f"| {label(res, c)} | {m['bytes_per_entry']:.0f} | {fmt_ratio(r) if c != REF else ''} | "
                   f"{method} |")
    return "\n".join(out)


# ------------------------------------------------------------------ targets
def targets(res) -> list[dict]:
    """The issue's targets for shmcache, as ratios in this run."""
    out = []

    def add(what, have, want, ok):
        out.append(dict(target=what, value=have, want=want, met=ok))

    def lat_ratio(c, op):
        return _ratio(_lat(res, c, op), _lat(res, REF, op))

    r = lat_ratio("lmdb", "get_hit_100B")
    if r is not None:
        add("get hit <= lmdb get", r, ">= 1.0x", r >= 1.0)
    r = lat_ratio("diskcache", "get_hit_100B")
    if r is not None:
        add("get hit >= 10x faster than diskcache", r, ">= 10x", r >= 10)
    r = lat_ratio("lmdb", "set_100B")
    if r is not None:
        add("set >= 2x faster than lmdb put", r, ">= 2x", r >= 2)
    r = lat_ratio("diskcache", "set_100B")
    if r is not None:
        add("set >= 15x faster than diskcache", r, ">= 15x", r >= 15)
    s2 = _tp(res, REF, "90/10", 2)
    l2 = _tp(res, "lmdb", "90/10", 2)
    s1 = _tp(res, REF, "90/10", 1)
    r = _ratio(s2, l2)
    if r is not None:
        add("90/10 mix, 2 procs >= 1.8x lmdb 2 procs", r, ">= 1.8x", r >= 1.8)
    r = _ratio(s2, s1)
    if r is not None:
        add("90/10 mix, 2 procs >= 1.7x shmcache 1 proc", r, ">= 1.7x", r >= 1.7)
    r = _ratio(_mem(res, "lmdb"), _mem(res, REF))
    if r is not None:
        add("bytes/entry (100 B) <= lmdb", r, ">= 1.0x (lmdb / shmcache)", r >= 1.0)
    return out


def cpu_scaling(res, c=REF, mix="90/10", p=2):
    """Throughput at p procs / 1 proc, and the same per CPU-second the workers got
    (x p): what p processes would give with p free cores, if nothing else changed."""
    try:
        one = res["throughput"][c][mix]["1"]
        many = res["throughput"][c][mix][str(p)]
        eff = (many["median"] / many["cpu_cores"]) / (one["median"] / one["cpu_cores"])
        return dict(measured=many["median"] / one["median"], cores=many["cpu_cores"], per_cpu=eff,
                    projected=p * eff)
    except (KeyError, ZeroDivisionError, TypeError):
        return None


def targets_table(res) -> str:
    ts = targets(res)
    if not ts:
        return "(no target could be checked: lmdb/diskcache not in this run)"
    lines = ["| target | this run | wanted | |", "|---|---|---|---|"]
    for t in ts:
        lines.append(f"| {t['target']} | {t['value']:.2f}x | {t['want']} | {'met' if t['met'] else '**missed**'} |")
    sc = cpu_scaling(res)
    if sc:
        one = res["throughput"][REF]["90/10"]["1"]["cpu_cores"]
        if sc["cores"] >= 1.8:
            why = "so the 2/1 ratio was measured with two cores free"
        else:
            why = (f"so the measured 2/1 ratio ({sc['measured']:.2f}x) says as much about the machine's "
                   "other load as about shmcache")
        lines.append(
            f"\nThe 2 shmcache workers got {sc['cores']:.2f} cores between them (the 1-process worker "
            f"{one:.2f}), {why}. Per CPU-second the 2-process run did {sc['per_cpu']:.2f}x the 1-process "
            f"work, i.e. ~{sc['projected']:.2f}x with two free cores (a projection, not a measurement)."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ compare
def compare(a: dict, b: dict) -> dict:
    """Relative difference b vs a for every point both runs have: {point: pct}."""
    d = {}
    for c, ops in a.get("latency", {}).items():
        for op, x in ops.items():
            y = b.get("latency", {}).get(c, {}).get(op)
            if y:
                d[f"latency {c} {op}"] = 100.0 * (y["median"] - x["median"]) / x["median"]
    for c, mixes in a.get("throughput", {}).items():
        for mix, ps in mixes.items():
            for p, x in ps.items():
                y = b.get("throughput", {}).get(c, {}).get(mix, {}).get(p)
                if y:
                    d[f"throughput {c} {mix} {p}p"] = 100.0 * (y["median"] - x["median"]) / x["median"]
    for c, x in a.get("memory", {}).items():
        y = b.get("memory", {}).get(c)
        if y:
            d[f"memory {c}"] = 100.0 * (y["bytes_per_entry"] - x["bytes_per_entry"]) / x["bytes_per_entry"]
    return d


def compare_text(a: dict, b: dict, name_a: str, name_b: str) -> str:
    d = compare(a, b)
    if not d:
        return "no common points"
    absd = sorted(abs(v) for v in d.values())
    med = absd[len(absd) // 2]
    lines = [f"Run-to-run difference, {name_b} vs {name_a}, over {len(d)} points: median |diff| "
             f"{med:.1f}%, 90th percentile {absd[int(0.9 * (len(absd) - 1))]:.1f}%, largest {absd[-1]:.1f}%.",
             ""]
    for part in ("latency", "throughput", "memory"):
        sel = {k: v for k, v in d.items() if k.startswith(part)}
        if sel:
            xs = sorted(abs(v) for v in sel.values())
            lines.append(f"- {part}: median |diff| {xs[len(xs) // 2]:.1f}%, largest {xs[-1]:.1f}% "
                         f"({max(sel, key=lambda k: abs(sel[k]))})")
    sh = {k: v for k, v in d.items() if f" {REF} " in k + " "}
    if sh:
        lines.append("")
        lines.append("shmcache points: " + ", ".join(f"{k.split(' ', 2)[2] if k.count(' ') >= 2 else k} "
                                                     f"{v:+.0f}%" for k, v in sorted(sh.items())))
    # Headline targets in both runs
    ta = {t["target"]: t for t in targets(a)}
    tb = {t["target"]: t for t in targets(b)}
    if ta and tb:
        lines += ["", "| target | " + name_a + " | " + name_b + " |", "|---|---|---|"]
        for k in ta:
            if k in tb:
                lines.append(f"| {k} | {ta[k]['value']:.2f}x {'met' if ta[k]['met'] else 'missed'} | "
                             f"{tb[k]['value']:.2f}x {'met' if tb[k]['met'] else 'missed'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ whole document
def markdown(res, comparison: str | None = None) -> str:
    m = res["meta"]
    cfg = res["config"]
    parts = [
        f"# shmcache benchmark results ({'quick' if cfg['quick'] else 'full'} run)\n",
        f"- Command: `{m['command']}`",
        f"- Date: {m['date']}; wall time {m['wall_s']:.0f} s",
        f"- Machine: {m['machine']}",
        f"- Load average (1/5/15 min): before {m['load_before']}, after {m['load_after']} "
        f"(the 2 cores are shared with other work: see the spreads)",
        f"- shmcache: {m['shmcache']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items())),
        f"- Settings: {cfg['repeats']} repeats per point; latency {cfg['latency_budget']} s of 100-op "
        f"batches per point over {cfg['latency_keys']} keys; throughput {cfg['duration']} s per point over "
        f"{cfg['tp_keys']} keys at {cfg['procs']} processes; memory {cfg['mem_entries']} entries of 100 B.",
        "",
    ]
    skipped = {c: d["skipped"] for c, d in res["contenders"].items() if d.get("skipped")}
    if skipped:
        parts.append("Skipped: " + "; ".join(f"{c} ({why})" for c, why in skipped.items()) + "\n")
    if res.get("errors"):
        parts.append("Errors: " + "; ".join(f"{c} {w}: {e}" for c, ws in res["errors"].items()
                                            for w, e in ws.items()) + "\n")
    parts += ["## Headline\n", "Ratios in brackets: how many times better shmcache is (< 1: the contender wins).\n",
              headline(res), "", "## Targets\n", targets_table(res), ""]
    if comparison:
        parts += ["## Noise: two runs compared\n", comparison, ""]
    if res.get("latency"):
        parts += ["## Latency (one process)\n", latency_tables(res), ""]
    if res.get("throughput"):
        parts += ["## Throughput (forked processes)\n",
                  "dict is a private copy per process (nothing shared): the ceiling, not a shared cache. "
                  "The machine has 2 cores, so 4 processes oversubscribe it.\n",
                  throughput_tables(res), ""]
    if res.get("memory"):
        parts += [f"## Memory: shared bytes per entry ({_k(cfg['mem_entries'])} entries, 100 B values, 12 B keys)\n",
                  memory_table(res), ""]
    return "\n".join(parts) + "\n"


def write_json(res, path) -> None:
    with open(path, "w") as f:
        json.dump(res, f, indent=1, sort_keys=False, default=str)
        f.write("\n")


# ------------------------------------------------------------------ plots
def plots(res, outdir) -> list[str]:
    """latency.png (per op per contender, log scale) and throughput.png (vs procs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    cs = [c for c in contenders_in(res) if c in res.get("latency", {})]
    if cs:
        ops = LATENCY_OPS
        fig, ax = plt.subplots(figsize=(14, 6.5))
        w = 0.8 / len(cs)
        for j, c in enumerate(cs):
            ys = [_lat(res, c, op) or float("nan") for op in ops]
            ax.bar([i + (j - (len(cs) - 1) / 2) * w for i in range(len(ops))], ys, w, label=label(res, c))
        ax.set_yscale("log")
        ax.set_xticks(range(len(ops)))
        ax.set_xticklabels([OP_LABELS[o] for o in ops], rotation=25, ha="right")
        ax.set_ylabel("median ns per op (log)")
        ax.set_title("Latency per operation, one process (lower is better)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
        fig.tight_layout()
        p = f"{outdir}/latency.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    cs = [c for c in contenders_in(res) if c in res.get("throughput", {})]
    if cs:
        mixes = res["config"]["mixes"]
        procs = res["config"]["procs"]
        fig, axes = plt.subplots(1, len(mixes), figsize=(6.5 * len(mixes), 5.8), squeeze=False)
        for ax, mix in zip(axes[0], mixes):
            for c in cs:
                ys = [_tp(res, c, mix, p) or float("nan") for p in procs]
                ax.plot(procs, ys, marker="o", label=label(res, c), linewidth=2.5 if c == REF else 1.2)
            ax.set_yscale("log")
            ax.set_xticks(procs)
            ax.set_xlabel("processes (machine has 2 cores)")
            ax.set_ylabel("total ops/s (log)")
            ax.set_title(f"{mix} get/set, {_k(res['config']['tp_keys'])} keys, Zipf(0.99)")
            ax.grid(which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, ncol=4, loc="lower center", frameon=False)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
        p = f"{outdir}/throughput.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    return made
