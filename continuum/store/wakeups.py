"""In-process fan-out of "your mailbox may have grown" to the connections that wait on it."""

from __future__ import annotations

from .base import NewEntry, Wake


class WakeupHub:
    """Callbacks by mailbox key; a device may hold several connections at once."""

    def __init__(self) -> None:
        self._waiters: dict[bytes, set[Wake]] = {}

    def add(self, key: bytes, wake: Wake) -> None:
        self._waiters.setdefault(key, set()).add(wake)

    def remove(self, key: bytes, wake: Wake) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.discard(wake)
            if not waiters:
                del self._waiters[key]

    def has(self, key: bytes) -> bool:
        return key in self._waiters

    def wake(self, key: bytes, entry: NewEntry | None = None) -> None:
        for wake in tuple(self._waiters.get(key, ())):
            wake(entry)

    def keys(self) -> list[bytes]:
        return list(self._waiters)
