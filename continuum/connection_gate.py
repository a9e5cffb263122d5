"""Per-process budgets for handshakes, addresses and keys, so none of them can exhaust a relay.

Sockets in all (`max_connections`) are counted from accept() by `listener`;
this gate sees a socket once its upgrade request has arrived and knows the
client's address (`client_address`).  Each bound, and what it guarantees:

- **Pending handshakes per address** (`max_pending_handshakes_per_address`, C).
  When an address has C, one of them *chosen at random* is closed to make
  room: a newcomer is never refused for it.  So a flood from one address holds
  at most C sockets, and an honest device behind the same NAT is not locked
  out: if n other upgrades from its address arrive while its own handshake
  runs (one round trip), it survives with probability about e^(-n/C), so it
  needs about e^(n/C) attempts on average (3 at n = C), however long the flood
  lasts.  Evicting the oldest instead would lose every attempt once n >= C.
- **Authenticated connections per address** (`max_connections_per_address`):
  beyond it new upgrades from that address get 429.
- **Connections per key** (`max_connections_per_key`, default 1): a key that
  authenticates once more *supersedes* its oldest connection on this relay
  (ERROR SUPERSEDED, then closed), so a device that reconnects while its old
  socket lingers is served on the new one only, and one key cannot take
  every slot.  Replicas do not see each other's connections: across relays a
  key may hold one connection per replica.
- **Signature checks for unknown keys per address** (`unknown_key_rate_per_s`,
  `unknown_key_burst`).  A HELLO claiming a key this relay does not know, and
  the first `probation_sends` SENDs of such a connection, each take a token
  from the address's bucket, *before* any signature is checked; an empty
  bucket answers RATE_LIMITED.  A key is known when the oracle's access list
  enrolls it or it authenticated here recently (the last `known_keys`
  distinct keys).  So rotating keys buys an attacker no more verifies than the
  bucket, and known devices never wait for it.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Protocol

from proto import PublicKey

from .store.token_bucket import TokenBuckets


class ConnectionRefused(Exception):
    """Why a socket was turned away before the WebSocket upgrade (HTTP status + reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class GatedConnection(Protocol):
    """What the gate may do to a connection it admitted."""

    def evict(self) -> None:
        """Still in its handshake, it lost its place to a newer one from its address."""

    def supersede(self) -> None:
        """Authenticated, it was replaced by a newer connection of the same key."""


class Slot:
    """One connection's place in the gate, from its upgrade request until it is released."""

    __slots__ = ("_gate", "address", "_connection", "key")

    def __init__(self, gate: ConnectionGate, address: str, connection: GatedConnection) -> None:
        self._gate, self.address, self._connection = gate, address, connection
        self.key: PublicKey | None = None

    def authenticated(self, key: PublicKey) -> None:
        """The connection proved `key`: it leaves the pending set and joins the key's list."""
        self._gate._authenticated(self, key)

    def release(self) -> None:
        """The socket is gone (or never got past the gate); safe to call more than once."""
        self._gate._release(self)


class AddressBudget:
    """One connection's view of its address's budget for unknown keys (what the protocol
    object consults before it spends a signature check)."""

    __slots__ = ("_gate", "_address")

    def __init__(self, gate: ConnectionGate, address: str) -> None:
        self._gate, self._address = gate, address

    def is_known(self, key: PublicKey) -> bool:
        return self._gate.is_known(key)

    def take_unknown_key_token(self, now_ms: int) -> bool:
        return self._gate.take_unknown_key_token(self._address, now_ms)


class ConnectionGate:
    def __init__(self, *, max_pending_per_address: int, max_per_address: int, max_per_key: int,
                 unknown_key_rate_per_s: float, unknown_key_burst: int, known_keys: int,
                 enrolled: Callable[[PublicKey], bool] = lambda key: False,
                 choose: Callable[[int], int] = random.randrange) -> None:
        self._max_pending_per_address = max_pending_per_address
        self._max_per_address = max_per_address
        self._max_per_key = max_per_key
        self._unknown_rate = unknown_key_rate_per_s
        self._unknown_burst = unknown_key_burst
        self._known_capacity = known_keys
        self._enrolled = enrolled
        self._choose = choose  # which pending handshake makes room: index below its argument
        self._pending: dict[str, dict[Slot, None]] = {}
        self._authenticated_per_address: Counter[str] = Counter()
        self._by_key: dict[PublicKey, OrderedDict[Slot, None]] = {}  # oldest first
        self._known: OrderedDict[PublicKey, None] = OrderedDict()
        self._unknown_buckets = TokenBuckets()

    def admit(self, address: str, connection: GatedConnection) -> Slot:
        """A slot for a socket that sent its upgrade request; ConnectionRefused (429) if its
        address already holds its share of authenticated connections."""
        if self._authenticated_per_address[address] >= self._max_per_address:
            raise ConnectionRefused(
                429, f"more than {self._max_per_address} connections from this address")
        pending = self._pending.setdefault(address, {})
        while len(pending) >= self._max_pending_per_address:
            victim = list(pending)[self._choose(len(pending))]
            del pending[victim]
            victim._connection.evict()
        slot = Slot(self, address, connection)
        pending[slot] = None
        return slot

    def is_known(self, key: PublicKey) -> bool:
        return key in self._known or self._enrolled(key)

    def take_unknown_key_token(self, address: str, now_ms: int) -> bool:
        """Spend one of `address`'s signature checks for unknown keys; False: none left."""
        return self._unknown_buckets.take(address.encode(), now_ms, self._unknown_rate,
                                          self._unknown_burst)

    @property
    def pending_handshakes(self) -> int:
        return sum(len(slots) for slots in self._pending.values())

    @property
    def authenticated(self) -> int:
        """Connections that authenticated and are not released yet (serving or closing)."""
        return sum(self._authenticated_per_address.values())

    def _authenticated(self, slot: Slot, key: PublicKey) -> None:
        self._drop_pending(slot)
        slot.key = key
        self._authenticated_per_address[slot.address] += 1
        self._known[key] = None
        self._known.move_to_end(key)
        while len(self._known) > self._known_capacity:
            self._known.popitem(last=False)
        connections = self._by_key.setdefault(key, OrderedDict())
        connections[slot] = None
        while len(connections) > self._max_per_key:
            oldest, _ = connections.popitem(last=False)
            oldest._connection.supersede()

    def _release(self, slot: Slot) -> None:
        self._drop_pending(slot)
        key, slot.key = slot.key, None
        if key is None:
            return
        self._authenticated_per_address[slot.address] -= 1
        if self._authenticated_per_address[slot.address] <= 0:
            del self._authenticated_per_address[slot.address]
        connections = self._by_key.get(key)
        if connections is not None:
            connections.pop(slot, None)
            if not connections:
                del self._by_key[key]

    def _drop_pending(self, slot: Slot) -> None:
        pending = self._pending.get(slot.address)
        if pending is not None:
            pending.pop(slot, None)
            if not pending:
                del self._pending[slot.address]
