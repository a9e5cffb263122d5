"""The one wall clock of the project, in the protocol's unit: Unix milliseconds.

`proto` never reads a clock (callers pass `now_ms` in), so every caller that
stamps or checks an envelope reads it here.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the Unix epoch, from the system's real-time clock."""
    return time.time_ns() // 1_000_000
