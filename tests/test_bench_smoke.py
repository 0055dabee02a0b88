"""The benchmark suite still runs: its quickest mode, in-process contenders only.

Not a performance test: numbers are not checked, only that every selected
contender produced every workload, the report and JSON were written, and
nothing was left in /dev/shm. Contenders whose packages are missing (lmdb,
diskcache) are left out, as the suite itself would skip them; servers, the
Manager and UltraDict are not run here to keep this under ~30 s.
"""

import importlib.util
import json

import pytest

bench_main = pytest.importorskip("benchmarks.__main__", reason="benchmarks package not importable")

IN_PROCESS = ["shmcache", "dict"] + [m for m in ("lmdb", "diskcache") if importlib.util.find_spec(m)]


@pytest.mark.timeout(120)
def test_quick_suite_runs(tmp_path, capsys):
    rc = bench_main.main([
        "--quick", "--only", ",".join(IN_PROCESS), "--procs", "1,2", "--duration", "0.1",
        "--latency-budget", "0.005", "--keys", "5000", "--entries", "2000", "--out", str(tmp_path), "--no-plots",
    ])
    cap = capsys.readouterr()
    out = cap.out
    assert rc == 0, cap.err[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert not res["errors"]
    for name in IN_PROCESS:
        assert res["latency"][name]["get_hit_100B"]["median"] > 0
        assert res["throughput"][name]["90/10"]["2"]["median"] > 0
        assert res["memory"][name]["bytes_per_entry"] > 0
    assert "## Headline" in (tmp_path / "results.md").read_text()
    assert "## Headline" in out
    from benchmarks import cleanup

    assert cleanup.leftovers() == []


def test_compare_two_runs(tmp_path, capsys):
    from benchmarks import report

    run = {"latency": {"shmcache": {"get_hit_100B": {"median": 100.0}}},
           "throughput": {"shmcache": {"90/10": {"1": {"median": 1e6}}}},
           "memory": {"shmcache": {"bytes_per_entry": 170.0}}}
    other = json.loads(json.dumps(run))
    other["latency"]["shmcache"]["get_hit_100B"]["median"] = 110.0
    diff = report.compare(run, other)
    assert diff["latency shmcache get_hit_100B"] == pytest.approx(10.0)
    assert diff["throughput shmcache 90/10 1p"] == pytest.approx(0.0)
    assert "median |diff|" in report.compare_text(run, other, "a", "b")


@pytest.mark.timeout(120)
def test_resp_bench_runs_workers_against_each_other(tmp_path):
    """benchmarks/bench_resp.py with two shmcache servers and one short test
    each: every column is filled, and the 2-vs-1 table pairs the rounds."""
    import shutil

    if shutil.which("redis-benchmark") is None or shutil.which("redis-server") is None:
        pytest.skip("redis-benchmark not installed (make test installs redis-server)")
    pytest.importorskip("hiredis", reason="shmcache serve needs hiredis")
    from benchmarks import bench_resp

    out = tmp_path / "resp.md"
    assert bench_resp.main(["-n", "2000", "-c", "5", "--pipelines", "1", "--servers", "w1,w2", "--tests", "get",
                            "--rounds", "2", "--size", "16MiB", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| 1 | GET | shmcache")]
    assert len(rows) == 3, text  # w1, w2, and w2's line in the 2-vs-1 table
    w1, w2, paired = rows
    assert float(w1[3].replace(",", "")) > 0 and float(w1[8]) > 0 and float(w1[10]) > 0  # rps, server/client CPU
    assert w1[12].strip() == "100" and len(w2[12].split("/")) in (1, 2)  # the workers' split of the CPU
    assert paired[4].strip().endswith("of 2")
