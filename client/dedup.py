"""Remember handled (sender, msg_id) pairs for as long as a copy could still be valid, bounded.

Delivery is at-least-once: a message whose ACK was lost comes again on the
next connection, after a restart too.  A copy is only ever taken while it is
fresh (`freshness`: until created_at + ttl + skew), so a pair need not be
kept longer.  With a `DeviceState` the set lives in the state file and
survives restarts; the device prunes it of pairs past their time and to at
most `capacity`.  Without one it is this run's memory.

Beyond `capacity`, what goes is taken from the senders holding the most pairs
(`fair_trim`), each losing its soonest to expire (in memory: its oldest).
Taking the soonest to expire of all let one peer, sending many messages
signed with long TTLs, push out everyone else's pairs, whose copies a relay
could then deliver again as new: a call run twice.  Now a peer's flood only
pushes out its own.
"""

from __future__ import annotations

from collections import OrderedDict

from proto import PublicKey

from .fair_trim import fair_trim
from .state import DeviceState

MessageKey = tuple[PublicKey, bytes]


class RecentlySeen:
    """A set of (sender, msg_id), each needed until its `forget_at_ms`, at most `capacity`."""

    def __init__(self, capacity: int = 65_536, state: DeviceState | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._state = state
        self._by_sender: dict[PublicKey, OrderedDict[bytes, None]] = {}
        self._count = 0

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, tuple) or len(key) != 2 or not isinstance(key[0], PublicKey):
            return False
        if self._state is None:
            return key[1] in self._by_sender.get(key[0], ())
        return self._state.seen(key[0].raw, key[1])

    def __len__(self) -> int:
        return self._count if self._state is None else self._state.count_seen()

    def add(self, key: MessageKey, forget_at_ms: int) -> None:
        if self._state is not None:
            self._state.add_seen(key[0].raw, key[1], forget_at_ms)
            return
        sender, msg_id = key
        entries = self._by_sender.setdefault(sender, OrderedDict())
        if msg_id not in entries:
            self._count += 1
        entries[msg_id] = None
        entries.move_to_end(msg_id)
        if self._count > self.capacity:
            self._forget(self._count - self.capacity)

    def _forget(self, excess: int) -> None:
        counts = {sender: len(entries) for sender, entries in self._by_sender.items()}
        for sender, drop in fair_trim(counts, excess).items():
            entries = self._by_sender[sender]
            for _ in range(drop):
                entries.popitem(last=False)
            if not entries:
                del self._by_sender[sender]
        self._count -= excess

