"""The device's public API, and what it does with each event of its relay connection.

`Device` ties the parts together: the `ConnectionManager` keeps a relay
connection open and hands over its events, `inbox.decide` rules on each
delivery, `Sender` (`sending`) holds and follows what is sent, `dedup`
remembers what was handled.  With a `home`, all of it is kept in the state
file there (`state`), so a restart loses nothing; without one it lives in
memory for this run only.

Acknowledgement rule: every delivery is ACKed once dealt with, and "dealt
with" is committed before the ACK.  Receipts, expiry notices, peer changes
and drops are dealt with on arrival.  A DATA message is dealt with when the
application takes it from `messages()`: it is then recorded as seen, with
its receipt queued in the outbox, in one commit, and only then handed over,
receipted and ACKed.  So a crash before that commit leaves it in the
mailbox for the next run, and after it a re-delivery is a duplicate: the
application gets each message at most once, ever (with a home), and loses
one only to a crash in the instant between that commit and the hand-over.
DATA waiting for the application holds relay window slots, so an
application that never reads `messages()` (a pure sender) stops getting
receipts once a window's worth of DATA is waiting.

Replies (receipts) go through the same outbox as the application's
messages: durable with a home, re-sent on every connection, retried after
transient refusals, so none is lost to a relay or store restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from pathlib import Path
from types import TracebackType

from proto import Envelope, Identity, Kind, Limits, PublicKey
from proto.errors import WrongSenderError
from proto.payloads import Receipt
from runtime.clock import now_ms
from runtime.logs import library_logger

from .backoff import Backoff
from .connection import DEFAULT_KEEPALIVE_S, RelayConnection
from .dedup import RecentlySeen
from .freshness import device_now_ms, valid_until_ms
from .inbox import (Drop, DropReason, ExpiryArrived, InboundMessage, InboxView,
                    PeerChangeArrived, ReceiptArrived, Surface, decide)
from .manager import ConnectionManager
from .outbox import PendingSend
from .peers import PeerList, Standing
from .protocol import BadFrame, Delivered, Event, SendAccepted, SendRefused
from .sending import Sender
from .state import DeviceState, transaction
from .stats import DeviceStats
from .tracking import DeliveryStatus, Outgoing, SentMessage

log = library_logger("continuum.client")

DEFAULT_TTL_S = 24 * 3600
# This device's own caps.  The envelope cap bounds what it seals and the largest
# delivery it reads; each connection uses the relay's announced limit below it.
DEVICE_LIMITS = Limits(max_envelope_bytes=16 * 1024 * 1024)
_RECEIPT_QUEUE_SIZE = 10_000
# The state file is pruned on every connection and after this many deliveries.
_PRUNE_EVERY = 1024


class Device:
    """A device identity talking to its peers through relays; use as `async with device:`.

    `home`: the directory of the state file (outbox, sent messages, seen
    messages); None keeps them in memory, for this run only.  A device is
    entered once: leaving it closes the state file.
    `on_connect_error(url, error)` hears of each failed connection attempt,
    `on_drop(drop)` of each delivery dropped (a CLI tells its user at once).
    """

    def __init__(self, identity: Identity, relays: Iterable[str], peers: PeerList | None = None,
                 oracle_key: PublicKey | None = None, *, home: Path | str | None = None,
                 backoff: Backoff | None = None, limits: Limits = DEVICE_LIMITS,
                 handshake_timeout_s: float = 10.0, keepalive_s: float = DEFAULT_KEEPALIVE_S,
                 on_connect_error: Callable[[str, BaseException], None] | None = None,
                 on_drop: Callable[[Drop], None] | None = None) -> None:
        self.identity = identity
        self.relays = list(relays)
        if not self.relays:
            raise ValueError("a device needs at least one relay URL")
        self.peers = peers if peers is not None else PeerList()
        self.oracle_key = oracle_key
        self.stats = DeviceStats()
        # Keys of relays that proved them in a WELCOME: only these may send EXPIRY notices.
        self.relay_keys: set[PublicKey] = set()
        self._on_drop = on_drop
        self._state = DeviceState.in_home(Path(home)) if home is not None else None
        self._seen = RecentlySeen(state=self._state)
        self._inbound: deque[tuple[Surface, RelayConnection, str]] = deque()
        self._inbound_ready = asyncio.Event()
        self._receipt_listeners: list[asyncio.Queue[tuple[PublicKey, Receipt]]] = []
        self._manager = ConnectionManager(
            identity, self.relays, max_envelope_bytes=limits.max_envelope_bytes,
            handshake_timeout_s=handshake_timeout_s, backoff=backoff or Backoff(),
            stats=self.stats, on_connected=self._on_connected, on_event=self._on_event,
            on_disconnected=self._on_disconnected, keepalive_s=keepalive_s,
            on_connect_error=on_connect_error)
        self._sender = Sender(identity, self._manager, self._state, self.stats, limits)
        self._view = InboxView(identity, self.peers, self.relay_keys, self._seen,
                               self._sender.sent, oracle_key)
        self._runner: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Device:
        self._sender.load()
        self._runner = asyncio.create_task(self._manager.run_forever(), name="continuum-device")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        await self._sender.stop()
        self.close()

    def close(self) -> None:
        """Close the state file (done on leaving `async with`); needed only after `queue`
        without entering the device."""
        if self._state is not None:
            self._state.close()

    @property
    def connected(self) -> bool:
        return self._manager.connection is not None

    @property
    def relay_url(self) -> str | None:
        """The relay currently connected to, if any."""
        connection = self._manager.connection
        return connection.url if connection is not None else None

    @property
    def queued(self) -> int:
        """Envelopes in the outbox: not yet accepted, nor refused for good."""
        return len(self._sender.outbox)

    @property
    def last_error(self) -> str | None:
        """The last connection failure or relay refusal, for a human ("relay …: code: why")."""
        return self._manager.last_error

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once a relay connection is up; TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            await self._manager.connected.wait()

    # -- sending ---------------------------------------------------------------------------

    async def send(self, recipients: Iterable[PublicKey], payload: bytes, *,
                   ttl_s: int = DEFAULT_TTL_S, timeout: float | None = None) -> Outgoing:
        """Seal `payload` to all recipients as one DATA envelope; return once a relay stored it.

        The message is in the outbox (on disk, with a home) before anything
        is sent, and stays there until a relay accepts it, refuses it for
        good or its TTL passes; transient refusals (RATE_LIMITED,
        MAILBOX_FULL, STORE_UNAVAILABLE, QUOTA_EXCEEDED) are retried.  Raises
        the final refusal as its proto exception (RevokedError, NotPeerError,
        StaleError once the TTL passed unsent, …), or TimeoutError after
        `timeout` seconds: the message then stays in the outbox and is sent
        on a later connection (or run).  Cancelling the call withdraws it.
        """
        envelope = self._sender.seal(Kind.DATA, list(recipients), payload, ttl_s)
        return await self._sender.submit(envelope, payload, timeout)

    async def queue(self, recipients: Iterable[PublicKey], payload: bytes, *,
                    ttl_s: int = DEFAULT_TTL_S) -> Outgoing:
        """Put a message in the outbox and return at once; it is sent whenever a relay is up
        (this run, or with a home a later one).  Needs no connection, nor `async with`."""
        envelope = self._sender.seal(Kind.DATA, list(recipients), payload, ttl_s)
        return self._sender.enqueue_soon(envelope, payload)

    async def send_envelope(self, envelope: Envelope, *,
                            timeout: float | None = None) -> Outgoing:
        """Send an envelope sealed elsewhere (same bytes on every retry); see `send`."""
        if envelope.sender != self.identity.public:
            raise WrongSenderError("a device can only send envelopes it signed itself")
        return await self._sender.submit(envelope, None, timeout)

    async def flush(self, timeout: float | None = None) -> int:
        """Wait until the outbox is empty (everything accepted or refused for good), at most
        `timeout` seconds; return how many entries are still waiting."""
        return await self._sender.flush(timeout)

    def sent_messages(self) -> list[SentMessage]:
        """Messages sent and still remembered, oldest first: the relays' answer and each
        recipient's status."""
        return self._sender.sent.history()

    # -- receiving -------------------------------------------------------------------------

    async def messages(self) -> AsyncGenerator[InboundMessage, None]:
        """DATA messages from peers, in mailbox order, each once (see the module docstring)."""
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
            with transaction(self._state):
                self._seen.add(key, valid_until_ms(surface.envelope))
                receipt = self._sender.queue_receipt(surface.envelope)
            await self._sender.transmit(receipt, connection)
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
            self._sender.accepted(event.msg_id)
        elif isinstance(event, SendRefused):
            error = event.error
            if event.msg_id is None or not self._sender.refused(event.msg_id, error):
                self._manager.last_error = f"{error.code.name}: {error.message}"
                log.warning("relay_error", relay=connection.url, code=error.code.name,
                            detail=error.message)
        elif isinstance(event, BadFrame):
            self.stats.bad_frames += 1

    async def _on_delivery(self, delivery: Delivered, connection: RelayConnection) -> None:
        self.stats.deliveries += 1
        if self._state is not None and self.stats.deliveries % _PRUNE_EVERY == 0:
            self._prune()
        decision = decide(delivery.envelope, self._view, connection.limits,
                          now_ms=device_now_ms(now_ms(), connection.clock_offset_ms))
        if isinstance(decision, Surface):
            self._inbound.append((decision, connection, delivery.tag))
            self._inbound_ready.set()
            return  # ACKed when the application takes it
        reply: PendingSend | None = None
        if isinstance(decision, Drop):
            self._on_dropped(decision)
        else:
            # Handled and recorded as seen in one commit: if handling failed (disk full), the
            # re-delivery retries it; once committed, a re-delivery is a duplicate.
            with transaction(self._state):
                if isinstance(decision, ReceiptArrived):
                    self._on_receipt(decision)
                elif isinstance(decision, ExpiryArrived):
                    self.stats.expiry_notices += 1
                    for msg_id, recipient in decision.notice.entries:
                        self._sender.sent.record(msg_id, recipient, DeliveryStatus.EXPIRED)
                else:
                    reply = self._on_peer_change(decision)
                self._seen.add((decision.envelope.sender, decision.envelope.msg_id),
                               valid_until_ms(decision.envelope))
        if reply is not None:
            await self._sender.transmit(reply, connection)
        await connection.ack(delivery.tag)

    def _on_dropped(self, drop: Drop) -> None:
        self.stats.count_drop(drop.reason)
        envelope = drop.envelope
        log.info("delivery_dropped", reason=drop.reason.value, detail=drop.detail,
                 sender=envelope.sender.text if envelope else None)
        if self._on_drop is not None and drop.reason is not DropReason.DUPLICATE:
            self._on_drop(drop)

    def _on_receipt(self, decision: ReceiptArrived) -> None:
        sender = decision.envelope.sender
        self.stats.receipts += 1
        self._sender.sent.record(decision.receipt.msg_id, sender, DeliveryStatus.DELIVERED)
        for queue in self._receipt_listeners:
            try:
                queue.put_nowait((sender, decision.receipt))
            except asyncio.QueueFull:
                log.warning("receipt_listener_full", sender=sender.text)

    def _on_peer_change(self, decision: PeerChangeArrived) -> PendingSend | None:
        """Apply a newer list; the receipt to send, if the list is in force."""
        change, oracle = decision.change, decision.envelope.sender
        if decision.standing is Standing.OLDER:
            self.stats.peer_changes_older += 1
            log.warning("peer_change_older_than_held", offered=str(change.stamp),
                        held=str(self.peers.stamp), oracle=oracle.text)
            return None  # no receipt: a receipt tells the oracle this very list is in force
        if decision.standing is Standing.NEWER:
            # On disk (fsynced) before the receipt is committed: `peers`.
            self.peers.replace(change.version, change.peers, epoch=change.epoch, oracle=oracle)
            self.stats.peer_list_updates += 1
            log.info("peer_list_replaced", stamp=str(change.stamp), peers=len(change.peers))
        # Applied now, or the one already held: the oracle may show this version as in force.
        return self._sender.queue_receipt(decision.envelope)

    # -- connection callbacks --------------------------------------------------------------

    async def _on_connected(self, connection: RelayConnection) -> None:
        self.relay_keys.add(connection.relay_key)
        log.info("relay_connected", relay=connection.url, relay_key=connection.relay_key.text,
                 outbox=len(self._sender.outbox))
        await self._sender.connected(connection)
        if self._state is not None:
            self._prune()

    def _on_disconnected(self, connection: RelayConnection) -> None:
        # Deliveries not yet taken can no longer be ACKed here; the relay re-delivers them.
        self._inbound = deque(item for item in self._inbound if item[1] is not connection)

    def _prune(self) -> None:
        assert self._state is not None
        self._state.prune(device_now_ms(now_ms(), self._sender.clock_offset_ms),
                          max_seen=self._seen.capacity, max_sent=self._sender.sent.capacity)
