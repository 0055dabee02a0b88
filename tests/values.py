"""Self-checking values for concurrency and crash tests: a reader can tell,
from the bytes alone, whether a value is one some writer really wrote for
that key (never torn, never mixed, never another key's)."""

import xxhash


def make_value(key: str, wid: int, n: int, length: int) -> bytes:
    """A value that proves its own integrity: 8-byte xxh64 of the payload, then
    ``key|wid|n|`` and filler derived from it, ``length`` bytes in all (at least
    the header's length)."""
    head = f"{key}|{wid}|{n}|".encode()
    body_len = max(0, length - 8 - len(head))
    payload = head + (head * (body_len // len(head) + 1))[:body_len]
    return xxhash.xxh64_intdigest(payload).to_bytes(8, "little") + payload


def bad_value(key: str, val) -> str | None:
    """Why ``val`` is not a value some writer made for ``key`` (None: it is)."""
    if not isinstance(val, bytes):
        return f"type {type(val).__name__}"
    if len(val) < 8 or xxhash.xxh64_intdigest(val[8:]).to_bytes(8, "little") != val[:8]:
        return f"checksum mismatch ({len(val)} bytes)"
    parts = val[8:].split(b"|", 3)
    if len(parts) != 4 or parts[0] != key.encode():
        return f"value of another key: {val[8:40]!r}"
    if make_value(key, int(parts[1]), int(parts[2]), len(val)) != val:
        return "not a value any writer made"
    return None
