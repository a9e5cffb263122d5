"""Fixed-size keys by the millisecond they fall due, kept out of the garbage collector's sight.

The memory store remembers every message id for five minutes and indexes every body it
holds by expiry: at 7,000 messages a second, millions of entries.  Held as tuples in a
heap, every one of them was visited by each full collection (82 ms of the event loop for
a million), a stall that grew with the rate.  Here they are records in one bytearray per
tenth of a second of due time, which the collector does not look into; the only list is
the heap of those tenths, one int for each that has records.
"""

from __future__ import annotations

import heapq
import struct

# Due times are clamped into a record's unsigned 64 bits (ms since the epoch: any real one).
_LAST_MS = 2**64 - 1
# A bucket's width: the one being taken from when a sweep comes is sorted first, and a
# tenth of a second of a busy relay's records sorts in about a millisecond (a second's
# took 8 ms at 10,000 a second).
_BUCKET_MS = 100


class DueIndex:
    """Keys of `key_bytes` bytes, each taken once when its due time has come."""

    def __init__(self, key_bytes: int) -> None:
        # The due time big-endian, then the key: records sort as bytes in due-time order.
        self._record = struct.Struct(f">Q{key_bytes}s")
        self._buckets: dict[int, bytearray] = {}
        self._starts: list[int] = []  # a heap of the buckets, by due time // _BUCKET_MS
        # The one bucket whose records are in due-time order: the one being taken from.
        self._sorted: int | None = None

    def add(self, due_ms: int, key: bytes) -> None:
        due_ms = min(max(due_ms, 0), _LAST_MS)
        start = due_ms // _BUCKET_MS
        bucket = self._buckets.get(start)
        if bucket is None:
            bucket = self._buckets[start] = bytearray()
            heapq.heappush(self._starts, start)
        if start == self._sorted:
            self._sorted = None  # appended out of order, maybe
        bucket += self._record.pack(due_ms, key)

    def take(self, now_ms: int, most: int) -> list[bytes]:
        """Up to `most` keys due at or before `now_ms`, removed.

        A bucket wholly past is taken in any order; the current one is sorted the first
        time it is taken from (and again only if a key was added to it since), so each
        call reads only what it takes."""
        taken: list[bytes] = []
        now_start, size = now_ms // _BUCKET_MS, self._record.size
        now_bytes = min(max(now_ms, 0), _LAST_MS).to_bytes(8, "big")
        while self._starts and self._starts[0] <= now_start and len(taken) < most:
            start = self._starts[0]
            bucket = self._buckets[start]
            partly_due = start == now_start
            if partly_due and self._sorted != start:
                records = [bytes(bucket[at:at + size]) for at in range(0, len(bucket), size)]
                records.sort()
                bucket[:] = b"".join(records)
                self._sorted = start
            end = 0
            while end < len(bucket) and len(taken) < most:
                if partly_due and bucket[end:end + 8] > now_bytes:
                    break
                taken.append(bytes(bucket[end + 8:end + size]))
                end += size
            del bucket[:end]
            if bucket:
                break  # stopped by `most`, or by a key not due yet
            del self._buckets[start]
            heapq.heappop(self._starts)
        return taken
