"""One device's WebSocket: the I/O shell around `RelayProtocol`, deciding nothing itself.

It reads a message, feeds it to the protocol, performs the store call the
protocol asks for and reports the result back, and writes what the protocol
says to write, closing when it says so.  It also owns what a pure object
cannot: the deadlines (HELLO, a device that stops reading, a close that never
completes, after which the socket is aborted), and the callbacks from
elsewhere in the process (the store's wake-ups, the access-list watch, the
connection gate's eviction and superseding, and the stream router, for which
a session is the `StreamEndpoint` of its connection).

Anything another replica would need is in the store, so a device may
reconnect anywhere.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

from aiohttp import WSMessage, WSMsgType

from proto import PublicKey
from proto.channel import Layout
from proto.errors import InternalError, ProtocolError
from proto.frames import NONCE_BYTES, StreamFrame
from proto.handshake import EPHEMERAL_SEED_BYTES
from runtime.clock import now_ms

from .connection_gate import AddressBudget, Slot
from .context import RelayContext
from .protocol import (Authenticated, CheckRate, Fetch, RelayProtocol, RemoveDelivered,
                       RouteStreams)
from .rate_ahead import RateTokens
from .store import NewEntry, Subscription
from .streams.table import Address, Output, Pause
from .websocket import DeviceWebSocket

# Messages `receive` returns that are not the device's frames: the session answers a PING
# itself (`DeviceWebSocket` has aiohttp's autoping off), so each one is paid for.
_CONTROL = (WSMsgType.PING, WSMsgType.PONG)

# How often a connection with stream frames still unread is looked at (`_watch_writes`).
_WATCH_INTERVAL_S = 0.2


# ACKs of one connection being applied at once (see `_start_removal`): as many as its SENDs
# (below), so a busy receiver's ACKs keep pace with a busy sender's accepts.
ACKS_IN_FLIGHT = 32

# SENDs of one connection in flight at once (see `_start_send`).  Across a WAN a SEND waits
# one round trip for its store: 32 in flight carry 32 per round trip (400 msg/s at 80 ms),
# as many as a device's usual window of unanswered SENDs (client and loadgen: 32), while
# what one connection can queue in the relay and its store stays small.
SENDS_IN_FLIGHT = 32


class DeviceSession:
    """Most devices sit idle, so an idle session holds no task of its own: a wake-up
    starts a delivery task, which ends when the protocol asks for no further fetch."""

    __slots__ = ("_ws", "_relay", "_protocol", "_delivery", "_next_fetch", "_closing",
                 "_address", "_watchdog", "_removals", "_sends", "_tokens")

    def __init__(self, ws: DeviceWebSocket, relay: RelayContext, address: str,
                 layout: Layout = Layout.SEALED) -> None:
        self._ws = ws
        self._relay = relay
        self._protocol = RelayProtocol(relay.identity, relay.settings, relay.access,
                                       AddressBudget(relay.gate, address), relay.metrics,
                                       relay.log, relay_nonce=os.urandom(NONCE_BYTES),
                                       ephemeral_seed=os.urandom(EPHEMERAL_SEED_BYTES),
                                       stream_budget=relay.stream_budget, layout=layout)
        self._delivery: asyncio.Task[None] | None = None
        self._next_fetch: Fetch | None = None
        self._closing: asyncio.Task[None] | None = None
        self._address: Address | None = None  # in the stream router, while authenticated
        self._watchdog: asyncio.Task[None] | None = None  # see `_watch_writes`
        self._removals: set[asyncio.Task[None]] = set()
        # SENDs in flight, oldest first: at most SENDS_IN_FLIGHT, so a list (an empty deque
        # costs ~0.7 KiB, on every idle connection).
        self._sends: list[_InFlight] = []
        self._tokens = RateTokens()

    # -- what the gate asks of this connection ---------------------------------------------

    def evict(self) -> None:
        self._protocol.evicted()
        self._write()

    def supersede(self) -> None:
        self._protocol.superseded()
        self._write()

    # -- the connection's life -------------------------------------------------------------

    async def handshake(self, slot: Slot) -> bool:
        """CHALLENGE → HELLO → WELCOME within the deadline; False (socket closing) if refused."""
        protocol, timeout_s = self._protocol, self._relay.settings.handshake_timeout_s
        self._write()
        try:
            async with asyncio.timeout(timeout_s):
                while True:  # a few PINGs are answered; HELLO is still to come after them
                    message = await self._ws.receive()
                    self._feed(message)
                    if message.type not in _CONTROL or protocol.close is not None:
                        break
        except TimeoutError:
            protocol.handshake_timed_out(timeout_s)
        if protocol.device_key is not None and protocol.close is None:
            # Reachable for streams before the device hears WELCOME: an open sent to it as
            # soon as it is connected must find it (on Redis: its channel subscribed).
            self._address = await self._relay.streams.attach(protocol.device_key, self)
        self._write()
        if protocol.device_key is None:
            await self._finish_closing()
            return False
        slot.authenticated(protocol.device_key)  # may supersede this key's older connection
        if protocol.close is not None and self._address is not None:
            await self._relay.streams.detach(self._address, protocol.close_streams())
            self._address = None
        return protocol.close is None

    async def serve(self) -> None:
        """Serve an authenticated device until it disconnects or the protocol closes."""
        device = self._protocol.device_key
        assert device is not None
        relay = self._relay
        # Watch before any await: a revocation published meanwhile must still close us.
        unwatch = relay.access.watch(device, self._revoked)
        subscription: Subscription | None = None
        relay.metrics.connected.inc()
        presence = relay.presence
        tracked = presence.connected(device, self._protocol.counts) if presence else None
        log = relay.log.bind(device=device.text)
        log.info("device_connected")
        try:
            try:
                subscription = await relay.store.subscribe(device, self._wake)
            except ProtocolError as exc:
                self._protocol.store_failed(exc)
            else:
                self._start_delivery(self._protocol.wake(), device, observe_depth=True)
            self._write()
            await self._read_until_closed()
        except ConnectionError:
            pass  # the device went away mid-write; its mailbox is intact
        finally:
            self._protocol.connection_lost()  # from here on no wake-up starts a fetch
            if self._address is not None:
                await relay.streams.detach(self._address, self._protocol.close_streams())
            if self._watchdog is not None:
                self._watchdog.cancel()
            unwatch()
            relay.metrics.connected.dec()
            if presence is not None:
                presence.disconnected(tracked)
            if subscription is not None:
                await subscription.close()
            if self._delivery is not None:
                self._delivery.cancel()
                await asyncio.gather(self._delivery, return_exceptions=True)
            await asyncio.gather(*self._removals, *(send.task for send in self._sends),
                                 return_exceptions=True)
            await self._tokens.close()
            await self._finish_closing()
            log.info("device_disconnected")

    async def _read_until_closed(self) -> None:
        protocol, store = self._protocol, self._relay.store
        device = protocol.device_key
        assert device is not None
        while protocol.close is None:
            message = await self._ws.receive()
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                                WSMsgType.ERROR):
                # Closed by the device, or a frame beyond the hard cap (1009).  SENDs it made
                # before are answered first: our CLOSE goes out only after (no autoclose).
                if self._sends:
                    await self._sends[-1].answered  # they are answered in arrival order
                return
            request = self._feed(message)
            pause = 0.0
            if isinstance(request, RouteStreams):
                pause = self._route(request.outputs)
            elif isinstance(request, CheckRate):
                # A store in this process answers a token at once: nothing to take ahead.
                ahead = (request.metered and store.answers_later(device)
                         and self._tokens.arrived())
                # Inline only with nothing in flight: it must not overtake those (their order).
                if self._sends or any(map(store.answers_later,
                                          request.envelope.recipient_keys)):
                    await self._start_send(request, ahead)
                else:
                    await self._admit(request, ahead)  # answered within this loop turn
            elif isinstance(request, RemoveDelivered):
                if store.answers_later(device):
                    await self._start_removal(request)
                else:
                    await self._remove(request)
            self._write()
            await self._drain()  # a device that sends without reading is not outrun
            # Over its frame rate or its stream byte rate: read it more slowly.
            pause = max(pause, protocol.read_pause_s())
            if pause:
                await asyncio.sleep(pause)

    def _feed(self, message: WSMessage
              ) -> Authenticated | CheckRate | RemoveDelivered | RouteStreams | None:
        if message.type == WSMsgType.BINARY:
            return self._protocol.receive(message.data, now_ms())
        if message.type in _CONTROL:
            if self._protocol.receive_control(now_ms()) and message.type == WSMsgType.PING:
                self._ws.write_pong(message.data)
        else:
            self._protocol.receive_non_binary(now_ms())
        return None

    async def _start_send(self, request: CheckRate, ahead: bool) -> None:
        """Admit one SEND without waiting for the ones before it: up to SENDS_IN_FLIGHT at
        once, so a store a network round trip away (a Redis that answers a batch per loop
        turn; across a WAN, SPEC §19) takes several of this device's SENDs per round trip,
        not one.  A device that sends more is read no further until its oldest SEND is
        answered."""
        sends = self._sends
        while len(sends) >= SENDS_IN_FLIGHT:
            await sends[0].answered
        previous = sends[-1] if sends else None
        send = _InFlight()
        sends.append(send)
        send.task = asyncio.create_task(self._admit(request, ahead, previous, send), name="send")
        send.task.add_done_callback(lambda _task: send.done(sends))

    async def _admit(self, request: CheckRate, ahead: bool, previous: _InFlight | None = None,
                     this: _InFlight | None = None) -> None:
        """Rate token, verify (`rate_checked`), accept, answer: the token is taken before
        the verify, as always.  A SEND that came after an idle gap (`ahead`, see
        `RateTokens`), once answered with no other SEND in flight, takes the next SEND's
        token ahead.  Awaited by the reader (`this` None), or one of the SENDs in flight
        (`this`), which keeps order with the SEND before it (`previous`):

        - its accept is issued only after the previous SEND's was: the store applies calls
          in the order they were issued (`MailboxStore`), so per-mailbox order is SEND
          order.  Issued means started: the accept runs as a task created before `issued`
          is set, and tasks start in the order they were created, so the next SEND's
          accept, started once it wakes up from `issued`, starts after this one;
        - its answer (ACCEPTED, or a store's refusal) is reported only once the previous
          SEND's was, so ACCEPTED order is SEND order.  (A refusal of the relay's own,
          such as a bad signature, is answered as soon as it is known.)
        """
        protocol, store = self._protocol, self._relay.store
        envelope = request.envelope
        outcome: ProtocolError | None = None
        accepting: Awaitable[None] | None = None
        answered = allowed = False
        try:
            try:
                allowed = not request.metered or await self._tokens.spend(self._spend_token)
            except ProtocolError as exc:
                outcome = exc
            if previous is not None:
                await previous.issued
            if outcome is None:
                store_request = protocol.rate_checked(envelope, allowed, now_ms())
                answered = store_request is None  # refused by the relay's own checks
                if answered:
                    self._write()
                else:
                    limits = (self._relay.mailbox_limits if request.metered
                              else self._relay.unmetered_mailbox_limits)
                    accepting = store.accept(envelope, limits=limits,
                                             replay_until_ms=store_request.replay_until_ms)
                    if this is not None:
                        accepting = asyncio.create_task(accepting, name="accept")
            if this is not None:
                _settle(this.issued)
            if accepting is not None:
                try:
                    await accepting
                except ProtocolError as exc:
                    outcome = exc
            if previous is not None:
                await previous.answered
            if answered:
                return
            if outcome is None:
                protocol.stored(envelope.msg_id)
            else:
                protocol.store_refused(envelope.msg_id, outcome)
            self._write()
            if ahead and allowed and all(send is this for send in self._sends):
                self._tokens.take_ahead(self._spend_token)
        finally:
            if this is not None:
                this.done(self._sends)

    def _spend_token(self) -> Awaitable[bool]:
        """One token of this connection's device's bucket: the device's, whatever sender an
        envelope names, so a device resending another's envelopes (refused WRONG_SENDER
        after the token) spends its own rate, not the other's."""
        device, settings = self._protocol.device_key, self._relay.settings
        assert device is not None
        return self._relay.store.allow(device, now_ms(), settings.rate_per_s,
                                       settings.rate_burst)

    async def _start_removal(self, request: RemoveDelivered) -> None:
        """ACKs of a device served from a store a network round trip away (Redis; across a
        WAN, SPEC §19) run side by side (their order does not matter), so it has several
        acknowledged per round trip, not one.  At most ACKS_IN_FLIGHT at once: a device
        that sends more waits, and many busy devices do not queue thousands of calls."""
        removals = self._removals
        while len(removals) >= ACKS_IN_FLIGHT:
            await asyncio.wait(removals, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(self._remove(request), name="ack")
        removals.add(task)
        task.add_done_callback(removals.discard)

    async def _remove(self, request: RemoveDelivered) -> None:
        device = self._protocol.device_key
        assert device is not None
        try:
            existed = await self._relay.store.ack(device, request.tag)
        except ProtocolError as exc:
            self._protocol.store_failed(exc)
        else:
            self._start_delivery(self._protocol.removed(request.tag, existed), device)
        self._write()

    # -- streams: this connection as the router's endpoint ---------------------------------

    def _route(self, outputs: tuple[Output, ...]) -> float:
        """Hand the table's decisions to the router; the pause it asked for, in seconds."""
        device = self._protocol.device_key
        assert device is not None and self._address is not None
        self._relay.streams.dispatch(self._address, device, outputs)
        return max((o.seconds for o in outputs if isinstance(o, Pause)), default=0.0)

    def stream_from_peer(self, frame: StreamFrame, origin: Address,
                         peer: PublicKey) -> tuple[Output, ...]:
        return self._written(self._protocol.stream_from_peer(frame, origin, peer, now_ms()))

    def stream_unreachable(self, stream_id: bytes) -> tuple[Output, ...]:
        return self._written(self._protocol.stream_unreachable(stream_id))

    def expire_streams(self, now: int) -> tuple[Output, ...]:
        return self._written(self._protocol.expire_streams(now))

    def abort_streams_via(self, here: str, replica: str | None,
                          reason: str) -> tuple[Output, ...]:
        return self._written(self._protocol.abort_streams_via(here, replica, reason))

    def recheck_streams(self) -> tuple[Output, ...]:
        if not self._protocol.has_streams:
            return ()  # most connections, on every list: nothing to check, nothing to watch
        return self._written(self._protocol.recheck_streams())

    @property
    def streams_need_tick(self) -> bool:
        return self._protocol.streams_need_tick

    def _written(self, outputs: tuple[Output, ...]) -> tuple[Output, ...]:
        """Write what the protocol queued for this device, and watch that it is read.

        What can wait here for a device is bounded without this watch: the exposure pool
        of its streams (`streams.table`: passed credit minus what it said it read), its
        delivery window, and, for a device that says it read what it did not, one frame's
        credit: `_read_until_closed` reads nothing more from a device whose frames wait
        (`_drain`), so its next credit is not even read.  The watch frees it in time.
        """
        self._write()
        if self._watchdog is None and self._protocol.close is None:
            self._watchdog = asyncio.create_task(self._watch_writes(), name="stream-writes")
        return outputs

    async def _watch_writes(self) -> None:
        """Stream frames from other connections are written here without this session's
        reader waiting for them: a device that stops reading them is cut off, as `_drain`
        cuts off one that stops reading its deliveries (what can wait is bounded anyway:
        the credit passed on toward it).

        Stopped reading means: bytes wait, and their amount has not changed for the write
        timeout.  A device that reads gets more only as it grants credit, so while it
        reads the amount keeps changing; one that does not is sent nothing more, and the
        amount stays put, however far below the transport's high-water mark it is.
        """
        timeout_s = self._relay.settings.write_timeout_s
        loop = asyncio.get_running_loop()
        last, since = -1, loop.time()
        try:
            while self._protocol.close is None:
                await asyncio.sleep(_WATCH_INTERVAL_S)
                waiting = self._ws.buffered_bytes()
                if not waiting:
                    return
                if waiting != last:
                    last, since = waiting, loop.time()
                elif loop.time() - since >= timeout_s:
                    self._protocol.write_stalled(timeout_s)
                    self._ws.abort()
                    return
        finally:
            self._watchdog = None

    # -- delivery: one task while fetches are wanted ---------------------------------------

    def _wake(self, entry: NewEntry | None) -> None:
        """The store's callback: the mailbox may have grown, by `entry` if it says which."""
        protocol = self._protocol
        device = protocol.device_key
        if device is None:
            return
        fetch = protocol.wake() if entry is None else protocol.pushed(entry)
        # A DELIVER of an entry that came with its wake-up is written without a drain: what
        # waits is bounded all the same (at most a window of entries of at most
        # WAKE_ENTRY_MAX_BYTES), and the next fetched batch drains.
        self._write()
        self._start_delivery(fetch, device)

    def _start_delivery(self, fetch: Fetch | None, device: PublicKey,
                        observe_depth: bool = False) -> None:
        if fetch is None:
            return
        if self._delivery is not None:
            # The running task is still waiting for its last batch to drain: it runs this
            # fetch next (the protocol hands out one Fetch at a time, so there is no other).
            self._next_fetch = fetch
            return
        self._delivery = asyncio.create_task(self._deliver(fetch, device, observe_depth),
                                             name="deliver")

    async def _deliver(self, fetch: Fetch | None, device: PublicKey, observe_depth: bool) -> None:
        """Run the fetches the protocol asks for, each once the last batch has left: at most
        one window of frames waits in memory, and a device that reads nothing is closed."""
        store, protocol = self._relay.store, self._protocol
        try:
            if observe_depth:
                self._relay.metrics.mailbox_depth.observe(await store.depth(device))
            while fetch is not None:
                batch = await store.fetch(device, fetch.after, fetch.limit)
                fetch = protocol.fetched(batch)
                self._write()
                await self._drain()
                if fetch is None:
                    fetch, self._next_fetch = self._next_fetch, None
        except ProtocolError as exc:
            protocol.store_failed(exc)
            self._write()
        except ConnectionError:
            pass  # closing, or closed for not reading: the reader side ends the session
        except Exception as exc:  # a bug must cost this connection (1011), not its deliveries
            self._relay.log.exception("delivery_crashed")
            protocol.store_failed(InternalError(repr(exc)))
            self._write()
        finally:
            self._delivery = self._next_fetch = None

    # -- writing and closing ---------------------------------------------------------------

    def _revoked(self, error: ProtocolError) -> None:
        """The access list's callback: this key is refused from now on."""
        self._protocol.revoked(error)
        self._write()

    def _write(self) -> None:
        """Queue what the protocol produced; start the close it asked for, once."""
        protocol = self._protocol
        frames = protocol.data_to_send()
        if frames:
            try:
                self._ws.write_frames(frames)
            except ConnectionError:
                protocol.connection_lost()
                return
        close = protocol.close
        if close is not None and self._closing is None:
            self._closing = asyncio.create_task(self._close(close.code, close.reason),
                                                name="close")

    async def _drain(self) -> None:
        """Wait for a slow reader, but not forever: one that reads nothing is aborted (a
        close handshake would only queue behind what it does not read)."""
        timeout_s = self._relay.settings.write_timeout_s
        if not await self._ws.drain(timeout_s):
            self._protocol.write_stalled(timeout_s)
            self._ws.abort()
            raise ConnectionResetError("device stopped reading")

    async def _close(self, code: int, reason: str) -> None:
        """The WebSocket close handshake, bounded: a peer that does not answer (or does not
        read our CLOSE) is aborted, so its socket and unsent data are freed now.  A peer
        that never authenticated gets no handshake at all: refusals cost no lingering."""
        if self._protocol.device_key is None:
            self._ws.close_at_once(code, reason.encode())
            return
        try:
            async with asyncio.timeout(self._relay.settings.close_timeout_s):
                await self._ws.close(code=code, message=reason.encode())
        except TimeoutError:
            self._ws.abort()

    async def _finish_closing(self) -> None:
        if self._closing is not None:
            await asyncio.gather(self._closing, return_exceptions=True)
        if self._ws.buffered_bytes():
            self._ws.abort()  # closed, but the device will never read what is left


class _InFlight:
    """One SEND in flight: its task, and what the SEND after it waits for."""

    __slots__ = ("task", "issued", "answered")

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.task: asyncio.Task[None] | None = None
        self.issued: asyncio.Future[None] = loop.create_future()  # its accept started, or none will
        self.answered: asyncio.Future[None] = loop.create_future()  # its answer reported, or none will

    def done(self, sends: list[_InFlight]) -> None:
        """Ended (answered, failed or cancelled, even before it started): never waited on again."""
        _settle(self.issued)
        _settle(self.answered)
        if self in sends:
            sends.remove(self)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
