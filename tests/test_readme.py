"""The README's Quick start runs as written, in a fresh interpreter, and does
what its comments say (other sections' snippets are run by the tests of their
feature: Django's CACHES block, Flask's lines, the ttl and size tables)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

from names import fresh_name

README = Path(__file__).resolve().parent.parent / "README.md"
_ASSIGN = re.compile(r"^[\w.]+\s*(\[.*\])?\s*=[^=]")  # a statement, not an expression to show


def _quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start\n"):]
    body = section[section.index("```python\n") + len("```python\n"):]
    return body[:body.index("```")]


def test_quick_start_runs_as_written_and_does_what_its_comments_say():
    block = _quick_start()
    assert 'Cache("app", size="256MiB")' in block and 'Cache.unlink("app")' in block
    name = fresh_name("readme")
    # The block, line by line, printing what each expression gives: its
    # comments ("# {'name': 'Ada'}", "-> 1") are checked against that.
    script, promised = [], []  # promised: (code, what its comment says it gives)
    for line in block.replace('"app"', repr(name)).splitlines():
        code, _, comment = (part.strip() for part in line.partition("  #"))
        if code and not _ASSIGN.match(code) and not code.startswith(("from ", "import ")):
            script.append(f"print(repr(({code})))")
            promised.append((code.replace(repr(name), '"app"'), _promise(comment)))
        else:
            script.append(code)
    def ours() -> set:  # this cache's segment (and any sem.* file, which no cache makes since layout 6),
        # whatever else the host has
        return {f for f in os.listdir("/dev/shm") if f == f"shmcache.{name}" or f.startswith(f"sem.shmcache.{name}.")}

    try:
        r = subprocess.run([sys.executable, "-c", "\n".join(script)], capture_output=True, text=True, timeout=120)
    finally:
        leftover = ours()
        if leftover:  # the block failed before its Cache.unlink: clean up, then say so below
            from shmcache import Cache

            Cache.unlink(name)
    assert r.returncode == 0, r.stderr
    assert not leftover, f"the Quick start left {sorted(leftover)} in /dev/shm"
    shown = dict(zip((c for c, _ in promised), r.stdout.splitlines()))
    checked = [(c, want, shown[c]) for c, want in promised if want is not None]
    assert [c for c, _, _ in checked] == ['cache.get("user:1")', 'cache.incr("hits")']
    for code, want, got in checked:
        assert got == want, f"README says {code} gives {want}; it gave {got}"
    assert shown['"user:1" in cache, len(cache)'] == "(True, 3)"


def _promise(comment: str) -> str | None:
    """The value a comment says its line gives ("# {'name': 'Ada'}", "# ... -> 1"), as repr; else None."""
    text = comment.rsplit("->", 1)[1].strip() if "->" in comment else comment
    try:
        return repr(ast.literal_eval(text))
    except (ValueError, SyntaxError):
        return None
