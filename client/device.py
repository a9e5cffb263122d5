"""The device's public API, and what it does with each event of its relay connection.

`Device` ties the pure parts together: the `ConnectionManager` keeps a relay
connection open and hands over its events, `inbox.decide` rules on each
delivery, `outbox` and `tracking` follow what was sent, `dedup` what was
handled.  With a `home`, all three keep their state in the state file there
(`state`), so a restart loses nothing; without one they live in memory for
this run only.

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
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any

from proto import Envelope, Identity, Kind, Limits, PublicKey, seal_envelope
from proto.errors import ProtocolError, StaleError, WrongSenderError
from proto.payloads import Receipt
from runtime.clock import now_ms
from runtime.logs import library_logger

from .backoff import Backoff
from .connection import DEFAULT_KEEPALIVE_S, RelayConnection
from .dedup import RecentlySeen
from .freshness import device_now_ms, valid_until_ms
from .inbox import (Drop, DropReason, ExpiryArrived, InboundMessage, InboxView,
                    PeerChangeArrived, ReceiptArrived, Surface, decide)
from .manager import ConnectionManager, describe
from .outbox import Outbox, PendingSend, is_transient, needs_renewal, renewed
from .peers import PeerList, Standing
from .protocol import BadFrame, Delivered, Event, SendAccepted, SendRefused
from .state import DeviceState
from .stats import DeviceStats
from .tracking import DeliveryStatus, Outgoing, SentLog, SentMessage

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
        self._limits = limits
        self._on_drop = on_drop
        self._state = DeviceState.in_home(Path(home)) if home is not None else None
        self._seen = RecentlySeen(state=self._state)
        self._sent = SentLog(state=self._state)
        self._outbox = Outbox(self._state)
        self._view = InboxView(identity, self.peers, self.relay_keys, self._seen, self._sent,
                               oracle_key)
        self._inbound: deque[tuple[Surface, RelayConnection, str]] = deque()
        self._inbound_ready = asyncio.Event()
        self._receipt_listeners: list[asyncio.Queue[tuple[PublicKey, Receipt]]] = []
        self._clock_offset_ms = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._manager = ConnectionManager(
            identity, self.relays, max_envelope_bytes=limits.max_envelope_bytes,
            handshake_timeout_s=handshake_timeout_s, backoff=backoff or Backoff(),
            stats=self.stats, on_connected=self._on_connected, on_event=self._on_event,
            on_disconnected=self._on_disconnected, keepalive_s=keepalive_s,
            on_connect_error=on_connect_error)
        self._runner: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Device:
        loaded = self._outbox.load()
        for entry in loaded:
            entry.accepted.add_done_callback(self._log_unawaited_refusal(entry))
        if loaded:
            log.info("outbox_loaded", pending=len(loaded))
        self._runner = asyncio.create_task(self._manager.run_forever(), name="continuum-device")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        runner, self._runner = self._runner, None
        for task in [*self._tasks, *([runner] if runner is not None else [])]:
            task.cancel()
        for task in [*self._tasks, *([runner] if runner is not None else [])]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for entry in self._outbox.entries():
            if entry.retry_timer is not None:
                entry.retry_timer.cancel()
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
        return len(self._outbox)

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
        envelope = self._seal(recipients, payload, ttl_s)
        return await self._submit(envelope, payload, timeout)

    async def queue(self, recipients: Iterable[PublicKey], payload: bytes, *,
                    ttl_s: int = DEFAULT_TTL_S) -> Outgoing:
        """Put a message in the outbox and return at once; it is sent whenever a relay is up
        (this run, or with a home a later one).  Needs no connection, nor `async with`."""
        envelope = self._seal(recipients, payload, ttl_s)
        outgoing, entry = self._enqueue(envelope, payload)
        connection = self._manager.connection
        if connection is not None:
            self._spawn(self._transmit(entry, connection))
        return outgoing

    async def send_envelope(self, envelope: Envelope, *,
                            timeout: float | None = None) -> Outgoing:
        """Send an envelope sealed elsewhere (same bytes on every retry); see `send`."""
        if envelope.sender != self.identity.public:
            raise WrongSenderError("a device can only send envelopes it signed itself")
        return await self._submit(envelope, None, timeout)

    async def flush(self, timeout: float | None = None) -> int:
        """Wait until the outbox is empty (everything accepted or refused for good), at most
        `timeout` seconds; return how many entries are still waiting."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._outbox:
                    await asyncio.wait([entry.accepted for entry in self._outbox.entries()])
        return len(self._outbox)

    def sent_messages(self) -> list[SentMessage]:
        """Messages sent and still remembered, oldest first: the relays' answer and each
        recipient's status."""
        return self._sent.history()

    def _seal(self, recipients: Iterable[PublicKey], payload: bytes, ttl_s: int) -> Envelope:
        return seal_envelope(self.identity, Kind.DATA, list(recipients), payload, ttl_s=ttl_s,
                             now_ms=self._now_ms(), limits=self._limits)

    def _enqueue(self, envelope: Envelope,
                 plaintext: bytes | None) -> tuple[Outgoing, PendingSend]:
        """Track and hold `envelope`, in one commit: from here on it is durable."""
        with self._transaction():
            outgoing = self._sent.track(envelope)  # before sending: a receipt may beat ACCEPTED
            entry = self._outbox.add(envelope, plaintext=plaintext)
        return outgoing, entry

    async def _submit(self, envelope: Envelope, plaintext: bytes | None,
                      timeout: float | None) -> Outgoing:
        outgoing, entry = self._enqueue(envelope, plaintext)
        try:
            connection = self._manager.connection
            if connection is not None:
                await self._transmit(entry, connection)
            done, _ = await asyncio.wait([entry.accepted], timeout=timeout)
        except asyncio.CancelledError:
            if not entry.accepted.done():
                self._withdraw(entry)
            raise
        if not done:
            raise TimeoutError(f"no relay accepted {envelope.msg_id.hex()} within {timeout:g}s"
                               f" (last error: {self.last_error or 'none'}); it stays in the"
                               " outbox")
        entry.accepted.result()  # raises the refusal
        return outgoing

    def _withdraw(self, entry: PendingSend) -> None:
        with self._transaction():
            self._outbox.discard(entry.msg_id)
            self._sent.withdrawn(entry.msg_id)

    def _queue_receipt(self, envelope: Envelope) -> PendingSend:
        """The receipt for `envelope`, held in the outbox like any message (commit is the
        caller's)."""
        receipt = Receipt(envelope.msg_id).encode()
        sealed = seal_envelope(self.identity, Kind.RECEIPT, [envelope.sender], receipt,
                               ttl_s=envelope.ttl_s, now_ms=self._now_ms(), limits=self._limits)
        entry = self._outbox.add(sealed, plaintext=receipt, reply=True)
        entry.accepted.add_done_callback(self._log_unawaited_refusal(entry))
        return entry

    async def _transmit(self, entry: PendingSend, connection: RelayConnection) -> None:
        if entry.sent_on is connection or entry.msg_id not in self._outbox:
            return
        now = self._now_ms()
        if needs_renewal(entry, now) or now >= entry.envelope.expires_at_ms:
            envelope = renewed(entry, self.identity, now, self._limits) \
                if entry.plaintext is not None else None
            if envelope is None:
                self._settle_refused(entry, StaleError(
                    "its ttl passed before any relay accepted it"), lapsed=True)
                return
            self._outbox.renew(entry, envelope)
        self._outbox.mark_sent(entry, connection)
        if entry.transmissions > 1:
            self.stats.resent += 1
        try:
            await connection.send(entry.envelope.raw)
        except ProtocolError as exc:  # too large for this relay: refused before it is sent
            self._settle_refused(entry, exc)
        except ConnectionError:
            pass  # still in the outbox: the next connection sends it again

    def _on_accepted(self, msg_id: bytes) -> None:
        entry = self._outbox.get(msg_id)
        if entry is None:
            return
        with self._transaction(durable=False):  # lost to a power cut: re-sent, REPLAY
            self._outbox.accepted(msg_id)
            if not entry.reply:
                self._sent.accepted(msg_id)
        if not entry.reply:
            self.stats.sent += 1

    def _on_refused(self, entry: PendingSend, error: ProtocolError) -> None:
        if not is_transient(error):
            self._settle_refused(entry, error)
            return
        # Nothing was stored; the same bytes go again after a backoff (or on a new connection).
        self._manager.last_error = f"{error.code.name}: {error.message}"
        entry.sent_on = None
        delay = entry.retry_backoff.next_delay()
        log.info("send_retry_later", msg_id=entry.msg_id.hex(), code=error.code.name,
                 retry_in_s=round(delay, 2))
        entry.retry_timer = asyncio.get_running_loop().call_later(delay, self._retry, entry)

    def _retry(self, entry: PendingSend) -> None:
        entry.retry_timer = None
        connection = self._manager.connection
        if connection is not None:
            self._spawn(self._transmit(entry, connection))

    def _settle_refused(self, entry: PendingSend, error: ProtocolError, *,
                        lapsed: bool = False) -> None:
        """A final answer other than ACCEPTED (though REPLAY of a re-sent envelope is one)."""
        with self._transaction(durable=False):  # lost to a power cut: re-sent, same answer
            if not self._outbox.refused(entry.msg_id, error):
                return
            stored = entry.accepted.exception() is None
            if not entry.reply:
                if stored:
                    self._sent.accepted(entry.msg_id)
                elif lapsed:
                    self._sent.lapsed(entry.msg_id)
                else:
                    self._sent.refused(entry.msg_id, error)
        if entry.reply:
            return
        if stored:
            self.stats.sent += 1
            return
        self.stats.refused += 1
        log.info("send_refused", msg_id=entry.msg_id.hex(), code=error.code.name,
                 detail=error.message)

    def _log_unawaited_refusal(self, entry: PendingSend) -> Callable[[asyncio.Future[None]], None]:
        """Nobody awaits a reply or an entry loaded at start: log its final refusal."""
        def log_refusal(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is not None:
                log.warning("reply_refused" if entry.reply else "queued_message_refused",
                            msg_id=entry.msg_id.hex(),
                            error=describe(future.exception()))  # type: ignore[arg-type]
        return log_refusal

    def _now_ms(self) -> int:
        """Relay time, as learned in the last WELCOME: what envelopes are stamped with."""
        return now_ms() + self._clock_offset_ms

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
            with self._transaction():
                self._seen.add(key, valid_until_ms(surface.envelope))
                receipt = self._queue_receipt(surface.envelope)
            await self._transmit(receipt, connection)
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
            self._on_accepted(event.msg_id)
        elif isinstance(event, SendRefused):
            error = event.error
            entry = self._outbox.get(event.msg_id) if event.msg_id is not None else None
            if entry is not None:
                self._on_refused(entry, error)
            else:
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
            with self._transaction():
                if isinstance(decision, ReceiptArrived):
                    self._on_receipt(decision)
                elif isinstance(decision, ExpiryArrived):
                    self.stats.expiry_notices += 1
                    for msg_id, recipient in decision.notice.entries:
                        self._sent.record(msg_id, recipient, DeliveryStatus.EXPIRED)
                else:
                    reply = self._on_peer_change(decision)
                self._seen.add((decision.envelope.sender, decision.envelope.msg_id),
                               valid_until_ms(decision.envelope))
        if reply is not None:
            await self._transmit(reply, connection)
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
        self._sent.record(decision.receipt.msg_id, sender, DeliveryStatus.DELIVERED)
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
            self.peers.replace(change.version, change.peers, epoch=change.epoch, oracle=oracle)
            self.stats.peer_list_updates += 1
            log.info("peer_list_replaced", stamp=str(change.stamp), peers=len(change.peers))
        # Applied now, or the one already held: the oracle may show this version as in force.
        return self._queue_receipt(decision.envelope)

    # -- connection callbacks --------------------------------------------------------------

    async def _on_connected(self, connection: RelayConnection) -> None:
        self.relay_keys.add(connection.relay_key)
        self._clock_offset_ms = connection.clock_offset_ms
        log.info("relay_connected", relay=connection.url, relay_key=connection.relay_key.text,
                 outbox=len(self._outbox))
        if self._state is not None:
            self._prune()
        for entry in self._outbox.unsent_on(connection):
            await self._transmit(entry, connection)

    def _on_disconnected(self, connection: RelayConnection) -> None:
        # Deliveries not yet taken can no longer be ACKed here; the relay re-delivers them.
        self._inbound = deque(item for item in self._inbound if item[1] is not connection)

    # -- helpers ---------------------------------------------------------------------------

    def _transaction(self, *, durable: bool = True) -> AbstractContextManager[None]:
        if self._state is None:
            return contextlib.nullcontext()
        return self._state.transaction(durable=durable)

    def _prune(self) -> None:
        assert self._state is not None
        self._state.prune(device_now_ms(now_ms(), self._clock_offset_ms),
                          max_seen=self._seen.capacity, max_sent=self._sent.capacity)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
