"""In-process fan-out of "your mailbox may have grown" to the connections that wait on it."""

from __future__ import annotations

from collections.abc import Callable


class WakeupHub:
    """Callbacks by mailbox key; a device may hold several connections at once."""

    def __init__(self) -> None:
        self._waiters: dict[bytes, set[Callable[[], None]]] = {}

    def add(self, key: bytes, wake: Callable[[], None]) -> None:
        self._waiters.setdefault(key, set()).add(wake)

    def remove(self, key: bytes, wake: Callable[[], None]) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.discard(wake)
            if not waiters:
                del self._waiters[key]

    def has(self, key: bytes) -> bool:
        return key in self._waiters

    def wake(self, key: bytes) -> None:
        for wake in tuple(self._waiters.get(key, ())):
            wake()

    def keys(self) -> list[bytes]:
        return list(self._waiters)
