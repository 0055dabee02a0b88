"""A pickle that runs code: the proof a trust test looks for."""

from __future__ import annotations

import os


class Payload:
    """Unpickling this runs ``os.system`` and leaves a marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
