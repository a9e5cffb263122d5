"""Cutting a bounded table down fairly: the largest holders first, to one common level.

Used where a table of entries held for many senders is capped (the device's seen
set, `dedup`, and its state file's copy, `state.DeviceState.prune`): whoever fills
the table pays for it, not whoever holds the entries soonest to expire.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

K = TypeVar("K")


def fair_trim(counts: Mapping[K, int], excess: int) -> dict[K, int]:
    """How many of `excess` entries each holder gives up: the largest holders are cut down
    to one common level, so nobody loses an entry while another holds more than it keeps.

    The level is the lowest one at which cutting everyone above it frees no more than
    `excess`; the few still missing come one each from holders left at that level (in
    `counts`' order of size, then insertion), so the total is exactly `excess`."""
    if excess <= 0:
        return {}
    if excess > sum(counts.values()):
        raise ValueError("cannot trim more entries than are held")

    def freed(level: int) -> int:
        return sum(count - level for count in counts.values() if count > level)

    low, high = 0, max(counts.values())
    while low < high:  # the lowest level freeing at most `excess`
        middle = (low + high) // 2
        if freed(middle) <= excess:
            high = middle
        else:
            low = middle + 1
    trim = {holder: count - low for holder, count in counts.items() if count > low}
    missing = excess - sum(trim.values())
    for holder in sorted((h for h, c in counts.items() if c >= low),
                         key=lambda h: -counts[h])[:missing]:
        trim[holder] = trim.get(holder, 0) + 1
    return trim
