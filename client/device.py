"""The device's public API, and what it does with each event of its relay connection.

`Device` ties the pure parts together: the `ConnectionManager` keeps a relay
connection open and hands over its events, `inbox.decide` rules on each
delivery, `outbox` and `tracking` follow what was sent.

Acknowledgement rule: every delivery is ACKed once dealt with.  Receipts,
expiry notices, peer changes and drops are dealt with on arrival.  A DATA
message is dealt with when the application takes it from `messages()`: only
then is the receipt sent and the ACK written, so a crash before that leaves
it in the mailbox for the next run.  DATA waiting for the application holds
relay window slots, so an application that never reads `messages()` (a pure
sender) stops getting receipts once a window's worth of DATA is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncGenerator, Iterable
from types import TracebackType

import structlog

from proto import Envelope, Identity, Kind, Limits, PublicKey, seal_envelope
from proto.errors import ProtocolError, WrongSenderError
from proto.payloads import Receipt
from runtime.clock import now_ms

from .backoff import Backoff
from .connection import RelayConnection
from .dedup import RecentlySeen
from .inbox import (Drop, ExpiryArrived, InboundMessage, InboxView, PeerChangeArrived,
                    ReceiptArrived, Surface, decide)
from .manager import ConnectionManager, describe
from .outbox import Outbox, PendingSend
from .peers import PeerList, Standing
from .protocol import BadFrame, Delivered, Event, SendAccepted, SendRefused
from .stats import DeviceStats
from .tracking import DeliveryStatus, Outgoing, SentLog

log = structlog.get_logger("continuum.client")

DEFAULT_TTL_S = 24 * 3600
# This device's own caps.  The envelope cap bounds what it seals and the largest
# delivery it reads; each connection uses the relay's announced limit below it.
DEVICE_LIMITS = Limits(max_envelope_bytes=16 * 1024 * 1024)
_RECEIPT_QUEUE_SIZE = 10_000


class Device:
    """A device identity talking to its peers through relays; use as `async with device:`."""

    def __init__(self, identity: Identity, relays: Iterable[str], peers: PeerList | None = None,
                 oracle_key: PublicKey | None = None, *, backoff: Backoff | None = None,
                 limits: Limits = DEVICE_LIMITS, handshake_timeout_s: float = 10.0,
                 relay_keys: Iterable[PublicKey] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        """`relay_keys`: pin the relays this device talks to; a relay holding any other key
        is refused in the handshake (before HELLO), and only these keys' EXPIRY notices
        count.  None: any relay that proves its key.  `tls`: how `wss://` relays are
        verified (a private CA); None: the system's certificate store."""
        self.identity = identity
        self.relays = list(relays)
        if not self.relays:
            raise ValueError("a device needs at least one relay URL")
        self.peers = peers if peers is not None else PeerList()
        self.oracle_key = oracle_key
        self.stats = DeviceStats()
        # Keys of relays that proved them in a WELCOME: only these may send EXPIRY notices.
        self.relay_keys: set[PublicKey] = set()
        self._limits = limits
        self._seen = RecentlySeen()
        self._sent = SentLog()
        self._outbox = Outbox()
        self._view = InboxView(identity, self.peers, self.relay_keys, self._seen, self._sent,
                               oracle_key)
        self._inbound: deque[tuple[Surface, RelayConnection, str]] = deque()
        self._inbound_ready = asyncio.Event()
        self._receipt_listeners: list[asyncio.Queue[tuple[PublicKey, Receipt]]] = []
        self._clock_offset_ms = 0
        self._manager = ConnectionManager(
            identity, self.relays, max_envelope_bytes=limits.max_envelope_bytes,
            handshake_timeout_s=handshake_timeout_s,
            pinned_relay_keys=None if relay_keys is None else frozenset(relay_keys), tls=tls,
            backoff=backoff or Backoff(),
            stats=self.stats, on_connected=self._on_connected, on_event=self._on_event,
            on_disconnected=self._on_disconnected)
        self._runner: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Device:
        self._runner = asyncio.create_task(self._manager.run_forever(), name="continuum-device")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner

    @property
    def connected(self) -> bool:
        return self._manager.connection is not None

    @property
    def relay_url(self) -> str | None:
        """The relay currently connected to, if any."""
        connection = self._manager.connection
        return connection.url if connection is not None else None

    @property
    def last_error(self) -> str | None:
        """The last connection failure or relay refusal, for a human ("relay …: code: why")."""
        return self._manager.last_error

    async def wait_connected(self) -> None:
        await self._manager.connected.wait()

    # -- sending ---------------------------------------------------------------------------

    async def send(self, recipients: Iterable[PublicKey], payload: bytes, *,
                   ttl_s: int = DEFAULT_TTL_S) -> Outgoing:
        """Seal `payload` to all recipients as one DATA envelope; return once a relay stored it.

        Raises the relay's refusal as its proto exception (RateLimitedError, …).
        Waits through disconnections: bound it with `asyncio.timeout`, and on
        cancellation the envelope is no longer re-sent.
        """
        envelope = seal_envelope(self.identity, Kind.DATA, list(recipients), payload,
                                 ttl_s=ttl_s, now_ms=self._now_ms(), limits=self._seal_limits())
        return await self.send_envelope(envelope)

    async def send_envelope(self, envelope: Envelope) -> Outgoing:
        """Send an envelope sealed elsewhere (same bytes on every retry); see `send`."""
        if envelope.sender != self.identity.public:
            raise WrongSenderError("a device can only send envelopes it signed itself")
        outgoing = self._sent.track(envelope)  # before sending: a receipt may beat ACCEPTED
        entry = self._outbox.add(envelope)
        try:
            if self._manager.connection is not None:
                await self._transmit(entry, self._manager.connection)
            await entry.accepted
        except ProtocolError as exc:
            self.stats.refused += 1
            log.info("send_refused", msg_id=envelope.msg_id.hex(), code=exc.code.name,
                     detail=exc.message)
            raise
        finally:
            if not entry.accepted.done() or entry.accepted.cancelled():
                self._outbox.discard(envelope.msg_id)
        self.stats.sent += 1
        return outgoing

    async def _send_without_waiting(self, envelope: Envelope) -> None:
        """Send a protocol reply (a receipt) through the outbox, without waiting for ACCEPTED."""
        entry = self._outbox.add(envelope)
        entry.accepted.add_done_callback(_log_refused_reply)
        if self._manager.connection is not None:
            await self._transmit(entry, self._manager.connection)

    async def _transmit(self, entry: PendingSend, connection: RelayConnection) -> None:
        if entry.sent_on is connection:
            return
        self._outbox.mark_sent(entry, connection)
        if entry.transmissions > 1:
            self.stats.resent += 1
        try:
            await connection.send(entry.envelope.raw)
        except ProtocolError as exc:  # too large for this relay: refused before it is sent
            self._outbox.refused(entry.envelope.msg_id, exc)
        except ConnectionError:
            pass  # still in the outbox: the next connection sends it again

    async def _send_receipt(self, envelope: Envelope) -> None:
        receipt = seal_envelope(self.identity, Kind.RECEIPT, [envelope.sender],
                                Receipt.of(envelope).encode(), ttl_s=envelope.ttl_s,
                                now_ms=self._now_ms(), limits=self._seal_limits())
        await self._send_without_waiting(receipt)

    def _seal_limits(self) -> Limits:
        """The limit to seal (and pad) to: the connected relay's (never above this device's
        cap), so padding never pushes a message whose content fits past a relay's limit.
        Sealed while offline, a message is padded to its full bucket."""
        connection = self._manager.connection
        if connection is None:
            return self._limits
        return Limits(max_envelope_bytes=connection.limits.max_envelope_bytes,  # below the cap
                      max_recipients=self._limits.max_recipients)

    def _now_ms(self) -> int:
        return now_ms() + self._clock_offset_ms

    # -- receiving -------------------------------------------------------------------------

    async def messages(self) -> AsyncGenerator[InboundMessage, None]:
        """DATA messages from peers, in mailbox order, each once (receipt sent, then ACKed)."""
        while True:
            while not self._inbound:
                self._inbound_ready.clear()
                await self._inbound_ready.wait()
            surface, connection, tag = self._inbound.popleft()
            key = (surface.envelope.sender, surface.envelope.msg_id)
            if key in self._seen:  # a re-delivery queued before the first copy was taken
                self.stats.duplicates += 1
                await connection.ack(tag)
                continue
            self._seen.add(key)
            await self._send_receipt(surface.envelope)
            await connection.ack(tag)
            self.stats.surfaced += 1
            yield surface.message

    def receipts(self) -> AsyncGenerator[tuple[PublicKey, Receipt], None]:
        """Every accepted receipt as (who read it, receipt), from the moment of this call.

        Registration happens here, not at the first iteration, so no receipt
        arriving in between is missed; close the iterator when done with it.
        """
        queue: asyncio.Queue[tuple[PublicKey, Receipt]] = asyncio.Queue(_RECEIPT_QUEUE_SIZE)
        self._receipt_listeners.append(queue)
        return self._drain_receipts(queue)

    async def _drain_receipts(self, queue: asyncio.Queue[tuple[PublicKey, Receipt]]
                              ) -> AsyncGenerator[tuple[PublicKey, Receipt], None]:
        try:
            while True:
                yield await queue.get()
        finally:
            self._receipt_listeners.remove(queue)

    async def _on_event(self, event: Event, connection: RelayConnection) -> None:
        if isinstance(event, Delivered):
            await self._on_delivery(event, connection)
        elif isinstance(event, SendAccepted):
            self._outbox.accepted(event.msg_id)
        elif isinstance(event, SendRefused):
            error = event.error
            if event.msg_id is None or not self._outbox.refused(event.msg_id, error):
                self._manager.last_error = f"{error.code.name}: {error.message}"
                log.warning("relay_error", relay=connection.url, code=error.code.name,
                            detail=error.message)
        elif isinstance(event, BadFrame):
            self.stats.bad_frames += 1

    async def _on_delivery(self, delivery: Delivered, connection: RelayConnection) -> None:
        self.stats.deliveries += 1
        decision = decide(delivery.envelope, self._view, connection.limits)
        if isinstance(decision, Surface):
            self._inbound.append((decision, connection, delivery.tag))
            self._inbound_ready.set()
            return  # ACKed when the application takes it
        if isinstance(decision, Drop):
            self.stats.count_drop(decision.reason)
            envelope = decision.envelope
            log.info("delivery_dropped", reason=decision.reason.value, detail=decision.detail,
                     sender=envelope.sender.text if envelope else None)
        else:
            if isinstance(decision, ReceiptArrived):
                self._on_receipt(decision)
            elif isinstance(decision, ExpiryArrived):
                self.stats.expiry_notices += 1
                for msg_id, recipient in decision.notice.entries:
                    self._sent.record(msg_id, recipient, DeliveryStatus.EXPIRED)
            else:
                await self._on_peer_change(decision)
            # Only once handled: if handling failed (disk full), the re-delivery retries it.
            self._seen.add((decision.envelope.sender, decision.envelope.msg_id))
        await connection.ack(delivery.tag)

    def _on_receipt(self, decision: ReceiptArrived) -> None:
        sender = decision.envelope.sender
        self.stats.receipts += 1
        self._sent.record(decision.receipt.msg_id, sender, DeliveryStatus.DELIVERED)
        for queue in self._receipt_listeners:
            try:
                queue.put_nowait((sender, decision.receipt))
            except asyncio.QueueFull:
                log.warning("receipt_listener_full", sender=sender.text)

    async def _on_peer_change(self, decision: PeerChangeArrived) -> None:
        change, oracle = decision.change, decision.envelope.sender
        if decision.standing is Standing.OLDER:
            self.stats.peer_changes_older += 1
            log.warning("peer_change_older_than_held", offered=str(change.stamp),
                        held=str(self.peers.stamp), oracle=oracle.text)
            return  # no receipt: a receipt tells the oracle this very list is in force
        if decision.standing is Standing.NEWER:
            self.peers.replace(change.version, change.peers, epoch=change.epoch, oracle=oracle)
            self.stats.peer_list_updates += 1
            log.info("peer_list_replaced", stamp=str(change.stamp), peers=len(change.peers))
        # Applied now, or the one already held: the oracle may show this version as in force.
        await self._send_receipt(decision.envelope)

    # -- connection callbacks --------------------------------------------------------------

    async def _on_connected(self, connection: RelayConnection) -> None:
        self.relay_keys.add(connection.relay_key)
        self._clock_offset_ms = connection.clock_offset_ms
        log.info("relay_connected", relay=connection.url, relay_key=connection.relay_key.text,
                 outbox=len(self._outbox))
        for entry in self._outbox.unsent_on(connection):
            await self._transmit(entry, connection)

    def _on_disconnected(self, connection: RelayConnection) -> None:
        # Deliveries not yet taken can no longer be ACKed here; the relay re-delivers them.
        self._inbound = deque(item for item in self._inbound if item[1] is not connection)


def _log_refused_reply(future: asyncio.Future[None]) -> None:
    """Nobody awaits a reply's future: log its refusal (and mark the exception retrieved)."""
    if not future.cancelled() and future.exception() is not None:
        log.warning("reply_refused", error=describe(future.exception()))  # type: ignore[arg-type]
