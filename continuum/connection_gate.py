"""Per-process caps on sockets, so one address cannot exhaust a relay with connections.

Only handshakes in progress are counted per address: an honest device
finishes its handshake in milliseconds, while a flood of sockets that never
authenticate piles up here.  Counting authenticated connections per address
would instead lock out fleets behind one NAT or a load balancer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class ConnectionRefused(Exception):
    """Why a socket was turned away before the WebSocket upgrade (HTTP status + reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Slot:
    """One socket's place in the gate; `authenticated()` ends its pending state."""

    def __init__(self, gate: ConnectionGate, address: str) -> None:
        self._gate, self._address, self._pending = gate, address, True

    def authenticated(self) -> None:
        if self._pending:
            self._pending = False
            self._gate._release_pending(self._address)


class ConnectionGate:
    def __init__(self, max_connections: int, max_pending_per_address: int) -> None:
        self._max_connections = max_connections
        self._max_pending_per_address = max_pending_per_address
        self._pending: Counter[str] = Counter()
        self.open_connections = 0

    @contextmanager
    def connection(self, address: str) -> Iterator[Slot]:
        """Hold a slot for the life of a socket; raises ConnectionRefused when full."""
        if self.open_connections >= self._max_connections:
            raise ConnectionRefused(
                503, f"relay is at its limit of {self._max_connections} connections")
        if self._pending[address] >= self._max_pending_per_address:
            raise ConnectionRefused(
                429, f"more than {self._max_pending_per_address} unauthenticated connections"
                     " from this address")
        self.open_connections += 1
        self._pending[address] += 1
        slot = Slot(self, address)
        try:
            yield slot
        finally:
            self.open_connections -= 1
            slot.authenticated()

    def _release_pending(self, address: str) -> None:
        self._pending[address] -= 1
        if self._pending[address] <= 0:
            del self._pending[address]
