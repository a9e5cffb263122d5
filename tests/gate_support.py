"""A connection for the connection gate that only records what the gate did to it."""

from __future__ import annotations


class Recorder:
    def __init__(self) -> None:
        self.evicted = self.superseded = False

    def evict(self) -> None:
        self.evicted = True

    def supersede(self) -> None:
        self.superseded = True
