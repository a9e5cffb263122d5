"""Remember handled (sender, msg_id) pairs for as long as a copy could still be valid, bounded.

Delivery is at-least-once: a message whose ACK was lost comes again on the
next connection, after a restart too.  A copy is only ever taken while it is
fresh (`freshness`: until created_at + ttl + skew), so a pair need not be
kept longer.  With a `DeviceState` the set lives in the state file and
survives restarts; the device prunes it of pairs past their time and to at
most `capacity`.  Without one it is this run's memory, forgetting its
oldest entries beyond `capacity`.
"""

from __future__ import annotations

from collections import OrderedDict

from proto import PublicKey

from .state import DeviceState

MessageKey = tuple[PublicKey, bytes]


class RecentlySeen:
    """A set of (sender, msg_id), each needed until its `forget_at_ms`, at most `capacity`."""

    def __init__(self, capacity: int = 65_536, state: DeviceState | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._state = state
        self._entries: OrderedDict[MessageKey, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        if self._state is None:
            return key in self._entries
        if not isinstance(key, tuple) or len(key) != 2 or not isinstance(key[0], PublicKey):
            return False
        return self._state.seen(key[0].raw, key[1])

    def __len__(self) -> int:
        return len(self._entries) if self._state is None else self._state.count_seen()

    def add(self, key: MessageKey, forget_at_ms: int) -> None:
        if self._state is not None:
            self._state.add_seen(key[0].raw, key[1], forget_at_ms)
            return
        self._entries[key] = None
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
