"""Carries stream frames between the two halves of each stream: in this process, or to
another replica through the shared store (`redis_bus`).

The router decides nothing about a stream: each connection's `StreamTable`
does (reached through the session, the `StreamEndpoint` here).  It only
knows where connections are: every authenticated connection is attached
under an `Address` (this process's replica id and a number), and by its
device key for offers.  A frame for a connection that is gone is answered
with STREAM_ABORT on its behalf, so the other end is never left waiting.

Dispatching is synchronous and iterative (a queue, not recursion): a frame
handed to one connection's table may produce frames for another, and so on,
all within the one call; frames for other replicas are queued, in order, on
the remote path.  A ticker ends opens that wait past their deadline.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog

from proto import Limits, PublicKey
from proto.frames import StreamAbort, StreamFrame, StreamOpen
from runtime.clock import now_ms
from runtime.tasks import cancel_and_wait

from .table import Address, Offer, Output, ToPeer, Withdraw, answer_gone


class StreamEndpoint(Protocol):
    """One authenticated connection, as the router reaches it (`session.DeviceSession`).
    Each call gives its table the frame and returns what must go further."""

    def stream_from_peer(self, frame: StreamFrame, origin: Address,
                         peer: PublicKey) -> tuple[Output, ...]: ...

    def stream_unreachable(self, stream_id: bytes) -> tuple[Output, ...]: ...

    def expire_streams(self, now_ms: int) -> tuple[Output, ...]: ...

    def abort_streams_via(self, here: str, replica: str | None,
                          reason: str) -> tuple[Output, ...]: ...

    def recheck_streams(self) -> tuple[Output, ...]: ...

    @property
    def streams_need_tick(self) -> bool: ...


class RemoteStreams(Protocol):
    """The path to other replicas (`redis_bus.RedisStreamBus`)."""

    async def start(self, router: StreamRouter) -> None: ...

    async def stop(self) -> None: ...

    async def watch(self, key: PublicKey) -> None: ...

    async def unwatch(self, key: PublicKey) -> None: ...

    def send(self, route: Address, peer: PublicKey, origin: Address, origin_key: PublicKey,
             frame: StreamFrame) -> None: ...

    def offer(self, peer: PublicKey, origin: Address, origin_key: PublicKey, frame: StreamOpen,
              stream_id: bytes, delivered_here: int) -> None: ...

    def withdraw(self, peer: PublicKey, origin: Address, origin_key: PublicKey,
                 frame: StreamAbort) -> None: ...


class StreamRouter:
    def __init__(self, replica: str, limits: Limits, log: structlog.typing.FilteringBoundLogger,
                 *, tick_s: float, remote: RemoteStreams | None = None,
                 bus_lost: Callable[[], None] = lambda: None) -> None:
        self.replica = replica
        self._bus_lost = bus_lost  # counts `lost_replica(None)`: the metric of those losses
        self._limits = limits
        self._log = log
        self._tick_s = tick_s
        self._remote = remote
        self._endpoints: dict[int, tuple[PublicKey, StreamEndpoint]] = {}
        # Each device's connections here, by number (a list: most devices have one, and an
        # idle connection's every byte counts).
        self._by_key: dict[PublicKey, list[int]] = {}
        self._numbers = 0
        self._queue: deque[tuple[Address, PublicKey, Iterable[Output]]] = deque()
        self._dispatching = False
        # Connections whose tables have deadlines to watch or credit held for the relay's pool.
        self._ticking: set[int] = set()
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._remote is not None:
            await self._remote.start(self)
        self._ticker = asyncio.create_task(self._tick_forever(), name="stream-deadlines")

    async def stop(self) -> None:
        ticker, self._ticker = self._ticker, None
        await cancel_and_wait(ticker)
        if self._remote is not None:
            await self._remote.stop()

    # -- connections -------------------------------------------------------------------------

    async def attach(self, key: PublicKey, endpoint: StreamEndpoint) -> Address:
        """Make a connection reachable; offers to `key` reach it from any replica once this
        returns (a store failure to watch is logged: it is then reachable here only)."""
        self._numbers += 1
        number = self._numbers
        self._endpoints[number] = (key, endpoint)
        self._by_key.setdefault(key, []).append(number)
        if self._remote is not None:
            await self._remote.watch(key)
        return Address(self.replica, number)

    async def detach(self, address: Address, outputs: tuple[Output, ...]) -> None:
        """The connection is gone: nothing more reaches it; `outputs` (its tables' aborts)
        go to the other ends."""
        entry = self._endpoints.pop(address.connection, None)
        self._ticking.discard(address.connection)
        if entry is None:
            return
        key = entry[0]
        local = self._by_key.get(key)
        if local is not None:
            local.remove(address.connection)
            if not local:
                del self._by_key[key]
        self.dispatch(address, key, outputs)
        if self._remote is not None:
            await self._remote.unwatch(key)

    # -- dispatching -------------------------------------------------------------------------

    def dispatch(self, origin: Address, origin_key: PublicKey, outputs: Iterable[Output]) -> None:
        """Carry out what the table of the connection at `origin` decided, and whatever that
        makes other tables decide in turn."""
        self._queue.append((origin, origin_key, outputs))
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._queue:
                sender, sender_key, items = self._queue.popleft()
                for output in items:
                    if isinstance(output, ToPeer):
                        self._to_peer(output, sender, sender_key)
                    elif isinstance(output, Offer):
                        self._offer(output, sender, sender_key)
                    elif isinstance(output, Withdraw):
                        self._withdraw(output, sender, sender_key)
                self._watch(sender)
        finally:
            self._dispatching = False

    def _to_peer(self, output: ToPeer, origin: Address, origin_key: PublicKey) -> None:
        route = output.route
        if route.replica == self.replica:
            self.deliver(route.connection, output.peer, output.frame, origin, origin_key)
        elif self._remote is not None:
            self._remote.send(route, output.peer, origin, origin_key, output.frame)
        else:
            self._log.error("stream_route_unknown", replica=route.replica)

    def _watch(self, address: Address) -> None:
        """Tick the connection at `address` from now on if its table needs it."""
        if address.replica == self.replica and address.connection not in self._ticking:
            entry = self._endpoints.get(address.connection)
            if entry is not None and entry[1].streams_need_tick:
                self._ticking.add(address.connection)

    def _offer(self, offer: Offer, origin: Address, origin_key: PublicKey) -> None:
        delivered = self.to_connections_of(offer.peer, offer.frame, origin, origin_key)
        if self._remote is not None:
            self._remote.offer(offer.peer, origin, origin_key, offer.frame, offer.stream_id,
                               delivered)
        elif not delivered:
            self.unreachable(origin, offer.stream_id)

    def _withdraw(self, withdraw: Withdraw, origin: Address, origin_key: PublicKey) -> None:
        self.to_connections_of(withdraw.peer, withdraw.frame, origin, origin_key)
        if self._remote is not None:
            self._remote.withdraw(withdraw.peer, origin, origin_key, withdraw.frame)

    def to_connections_of(self, peer: PublicKey, frame: StreamOpen | StreamAbort,
                          origin: Address, origin_key: PublicKey) -> int:
        """Offer an open (or withdraw one) to every connection of `peer` in this process; how
        many there were."""
        numbers = list(self._by_key.get(peer, ()))
        for number in numbers:
            endpoint = self._endpoints[number][1]
            self.dispatch(Address(self.replica, number), peer,
                          endpoint.stream_from_peer(frame, origin, origin_key))
        return len(numbers)

    def deliver(self, connection: int, peer: PublicKey, frame: StreamFrame, origin: Address,
                origin_key: PublicKey) -> None:
        """A frame from the half at `origin` for the connection numbered `connection` here,
        whose device should be `peer`; if it is gone, the origin hears so."""
        entry = self._endpoints.get(connection)
        here = Address(self.replica, connection)
        if entry is None or entry[0] != peer:
            self.dispatch(here, peer, answer_gone(
                frame, origin, origin_key, f"{peer.text}'s connection to its relay closed",
                self._limits))
            return
        self.dispatch(here, peer, entry[1].stream_from_peer(frame, origin, origin_key))

    def unreachable(self, origin: Address, stream_id: bytes) -> None:
        """No connection of the peer took the open from the connection at `origin`."""
        entry = self._endpoints.get(origin.connection) if origin.replica == self.replica else None
        if entry is not None:
            self.dispatch(origin, entry[0], entry[1].stream_unreachable(stream_id))

    def lost_replica(self, replica: str | None, reason: str) -> None:
        """Frames to or from `replica` (None: every other replica) may have been lost: end
        every stream whose other half is there, at both ends that can still hear it."""
        if replica is None:
            self._bus_lost()
        for number, (key, endpoint) in list(self._endpoints.items()):
            self.dispatch(Address(self.replica, number), key,
                          endpoint.abort_streams_via(self.replica, replica, reason))

    def access_changed(self) -> None:
        """A new access list is in force: end every stream it no longer allows (a draining
        key's, one between keys that no longer share a peer group), at both ends."""
        for number, (key, endpoint) in list(self._endpoints.items()):
            self.dispatch(Address(self.replica, number), key, endpoint.recheck_streams())

    # -- deadlines ---------------------------------------------------------------------------

    def expire(self, now: int) -> None:
        """End opens past their deadline and pass on credit held for the relay's pool."""
        for number in list(self._ticking):
            entry = self._endpoints.get(number)
            if entry is None or not entry[1].streams_need_tick:
                self._ticking.discard(number)
                continue
            self.dispatch(Address(self.replica, number), entry[0], entry[1].expire_streams(now))

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                self.expire(now_ms())
            except Exception:  # a bug must not stop every other deadline
                self._log.exception("stream_deadlines_failed")
