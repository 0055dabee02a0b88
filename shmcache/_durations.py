"""Durations given by a caller: one check and one bound for all of them.

A NaN compares false with every deadline, so a wait with a NaN timeout never
ends; ``inf`` or 1e300 overflows the kernel's timespec. Every duration the
library accepts (lock and init timeouts, the daemon's intervals, stampede
and KeyLock timeouts, the CLI's --timeout and --interval) is checked here,
where it is given, with a message that names the setting and its limit.
"""

from __future__ import annotations

#: The longest a caller may ask to wait for a lock or an initializing creator
#: (seconds). Beyond an hour a wait is a hang.
MAX_WAIT = 3600.0

#: The longest of every other duration (seconds, about 11.6 days): the
#: daemon's intervals, stampede and KeyLock timeouts, the CLI's --timeout.
MAX_SECONDS = 1e6


def check_seconds(label: str, value, *, maximum: float, zero_ok: bool = False) -> float:
    """A duration in seconds: a real number, finite, positive (or 0 if ``zero_ok``), at most ``maximum``.

    Raises:
        TypeError: not an int or float (bools are refused).
        ValueError: NaN, infinite, negative, zero (unless allowed) or above ``maximum``;
            the message names the setting and the limit.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{label} must be a number of seconds, not {type(value).__name__}")
    low = "0 or more" if zero_ok else "more than 0"
    if not (value >= 0 if zero_ok else value > 0) or not value <= maximum:
        raise ValueError(f"{label} must be a finite number of seconds, {low} and at most {maximum:g}, got {value!r}")
    return float(value)
