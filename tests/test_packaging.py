"""Packaging as a pip user meets it: `python -m build` (what `make dist` runs)
makes an sdist and a wheel; the wheel, installed into a fresh venv, imports
with its C accelerator, runs, ships py.typed (mypy --strict passes on an
example script against it) and the gunicorn hooks; built without a C
compiler, the sdist gives a pure-Python wheel that works."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from names import fresh_name

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd, timeout=600, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT)  # the sdist, then the wheel built from it
    wheels = list(out.glob("shmcache-*.whl"))
    sdists = list(out.glob("shmcache-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return wheels[0], sdists[0]


@pytest.fixture(scope="module")
def venv(built, tmp_path_factory):
    """A fresh venv with the built wheel (and its dependencies) installed."""
    wheel, _sdist = built
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel)
    return venv


def test_wheel_in_a_fresh_venv(built, venv, tmp_path):
    wheel, _sdist = built
    names = zipfile.ZipFile(wheel).namelist()
    assert "shmcache/py.typed" in names and "shmcache/contrib/gunicorn.py" in names
    assert any(n.startswith("shmcache/_speedups") and n.endswith(".so") for n in names), names
    py = venv / "bin" / "python"
    name = fresh_name("wheel")
    smoke = (
        "import shmcache, shmcache.cache as core, shmcache.contrib.gunicorn as g\n"
        "assert core.USE_SPEEDUPS, 'no C accelerator in the wheel'\n"
        f"c = shmcache.Cache({name!r}, size='1MiB')\n"
        "c['a'] = {'x': 1}; assert c['a'] == {'x': 1} and c.incr('n') == 1\n"
        "assert callable(g.on_starting) and 'wsgi_app' not in vars(g)\n"
        # the base install has no hiredis (the `server` extra): the CLI still
        # works, and serving says how to get it instead of a traceback
        "try:\n    import hiredis\nexcept ImportError:\n"
        "    import shmcache.server as srv\n"
        "    try:\n        srv.serve('unused-name', port=0)\n"
        "    except srv.ServerError as e:\n        assert 'shmcache[server]' in str(e), e\n"
        "    else:\n        raise AssertionError('serve ran without hiredis')\n"
        "print(shmcache.__file__)\n"
        "c.close()\n"
    )
    try:
        out = run(py, "-c", smoke, cwd=tmp_path).stdout  # cwd: not the checkout, so the wheel is what runs
        assert str(venv) in out
        assert "shmcache 0." in run(venv / "bin" / "shmcache", "--version").stdout
        assert run(venv / "bin" / "shmcache", "get", "-n", name, "n").stdout.strip() == "1"
    finally:
        run(py, "-c", f"import shmcache; shmcache.Cache.unlink({name!r})", cwd=tmp_path)
    # the typed example passes mypy --strict against the installed package
    if shutil.which("mypy", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("mypy is not installed (the test extra has it)")
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--python-executable", str(py), "--cache-dir",
         str(tmp_path / "mypy-cache"), str(ROOT / "examples" / "typed_app.py")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    run(py, ROOT / "examples" / "typed_app.py", cwd=tmp_path)


def test_sdist_carries_the_sources_to_build(built):
    _wheel, sdist = built
    import tarfile

    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in ("shmcache/_speedups.c", "shmcache/_vendor/xxhash.h", "shmcache/py.typed", "setup.py",
                   "pyproject.toml", "README.md"):
        assert needed in names, needed


def test_without_a_compiler_the_sdist_installs_pure_python(built, venv, tmp_path):
    """No C compiler (CC=false): the sdist still builds a wheel, without the
    accelerator, and that wheel works in pure Python, reporting it."""
    _wheel, sdist = built
    out = tmp_path / "pure-dist"
    env = dict(os.environ)
    built_log = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", out, sdist,
                    env=dict(env, CC="false", CXX="false"))
    (pure,) = out.glob("shmcache-*.whl")
    names = zipfile.ZipFile(pure).namelist()
    assert "shmcache/cache.py" in names and not [n for n in names if n.endswith(".so")], (names, built_log.stderr)
    target = tmp_path / "pure"
    py = venv / "bin" / "python"
    run(py, "-m", "pip", "install", "-q", "--no-deps", "--target", target, pure)
    name = fresh_name("pure")
    smoke = (
        "import shmcache, shmcache.cache as core\n"
        f"assert shmcache.__file__.startswith({str(target)!r}), shmcache.__file__\n"
        "assert core._speedups is None and not core.USE_SPEEDUPS\n"
        f"c = shmcache.Cache({name!r}, size='1MiB')\n"
        "assert not shmcache.admin.accelerated(c)\n"
        "c['a'] = {'x': 1}; assert c['a'] == {'x': 1} and c.incr('n') == 1 and c.check() == []\n"
        "c.close(); shmcache.Cache.unlink(c.name); print('pure ok')\n"
    )
    try:
        r = run(py, "-c", smoke, cwd=tmp_path, env=dict(env, PYTHONPATH=str(target)))
        assert "pure ok" in r.stdout
    finally:
        subprocess.run([str(py), "-c", f"import shmcache; shmcache.Cache.unlink({name!r})"], cwd=tmp_path,
                       env=dict(env, PYTHONPATH=str(target)), capture_output=True, timeout=120)
