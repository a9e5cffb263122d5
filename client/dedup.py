"""Remember recently handled (sender, msg_id) pairs, in bounded memory.

Delivery is at-least-once: a message whose ACK was lost comes again on the
next connection.  The relay refuses replays for a message's whole life, so
duplicates are only re-deliveries of recent messages; remembering the last
`capacity` of them is enough, and a device with little RAM stays bounded.
"""

from __future__ import annotations

from collections import OrderedDict

from proto import PublicKey

MessageKey = tuple[PublicKey, bytes]


class RecentlySeen:
    """A set of (sender, msg_id) that forgets its oldest entries beyond `capacity`."""

    def __init__(self, capacity: int = 65_536) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._entries: OrderedDict[MessageKey, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: MessageKey) -> None:
        self._entries[key] = None
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
