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

Key rotation (SPEC §15): `rotate_key()` has the current key vouch for a new
one to the oracle, then authenticates as the new key while a `Drain` keeps the
old key connected until its mailbox is empty.  Each connection knows the key it
authenticated as, and its deliveries are decided and its sends made with that
identity; replies (receipts) are always sealed by the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

import structlog

from proto import Envelope, Identity, Kind, Limits, PublicKey, seal_envelope
from proto.errors import ProtocolError, RevokedError, WrongSenderError
from proto.payloads import Receipt
from proto.rotation import KeyRotation, OracleKeyChain
from runtime.clock import now_ms

from .backoff import Backoff
from .connection import RelayConnection
from .dedup import RecentlySeen
from .drain import DEFAULT_QUIET_S, Drain
from .inbox import (Drop, ExpiryArrived, InboundMessage, InboxView, OracleKeyChanged,
                    PeerChangeArrived, ReceiptArrived, Surface, decide)
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


@dataclass(frozen=True)
class _Rotation:
    """A rotation waiting for the oracle's word: any peer list it seals to `new.public`."""

    old: Identity
    new: Identity
    on_confirmed: Callable[[Identity, Identity], None]
    confirmed: asyncio.Event


class Device:
    """A device identity talking to its peers through relays; use as `async with device:`.

    `on_oracle_key_change(chain)` is called when the device follows the oracle
    to a new key, before it confirms that to the oracle: persist the chain there
    (the CLI keeps it in its home), and pass the key it leads to as `oracle_key`
    on the next start.
    """

    def __init__(self, identity: Identity, relays: Iterable[str], peers: PeerList | None = None,
                 oracle_key: PublicKey | None = None, *, backoff: Backoff | None = None,
                 limits: Limits = DEVICE_LIMITS, handshake_timeout_s: float = 10.0,
                 relay_keys: Iterable[PublicKey] | None = None,
                 tls: ssl.SSLContext | None = None,
                 on_oracle_key_change: Callable[[OracleKeyChain], None] | None = None) -> None:
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
        self._handshake_timeout_s = handshake_timeout_s
        self._pinned_relay_keys = None if relay_keys is None else frozenset(relay_keys)
        self._tls = tls
        self._on_oracle_key_change = on_oracle_key_change
        self._seen = RecentlySeen()
        self._sent = SentLog()
        self._outbox = Outbox()
        # Every key this device may be addressed as: the current one, and old ones draining.
        self._identities = {identity.public: identity}
        self._rotation: _Rotation | None = None
        self._drains: dict[PublicKey, tuple[Drain, asyncio.Task[None]]] = {}
        self._inbound: deque[tuple[Surface, RelayConnection, str]] = deque()
        self._inbound_ready = asyncio.Event()
        self._receipt_listeners: list[asyncio.Queue[tuple[PublicKey, Receipt]]] = []
        self._clock_offset_ms = 0
        self._manager = ConnectionManager(
            identity, self.relays, max_envelope_bytes=limits.max_envelope_bytes,
            handshake_timeout_s=handshake_timeout_s,
            pinned_relay_keys=self._pinned_relay_keys, tls=tls,
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
        tasks = [task for _, task in self._drains.values()]
        if runner is not None:
            tasks.append(runner)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
        if entry.sent_on is connection or entry.envelope.sender != connection.device_key:
            return  # sent there already, or waits for a connection of the key that signed it
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
        identity = self._identities.get(connection.device_key)
        if identity is None:  # the closing connection of a key given up: not ACKed, kept
            return
        view = InboxView(identity, self.peers, self.relay_keys, self._seen, self._sent,
                         self.oracle_key)
        decision = decide(delivery.envelope, view, connection.limits)
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
            elif isinstance(decision, OracleKeyChanged):
                await self._on_oracle_key_changed(decision)
            else:
                await self._on_peer_change(decision, identity)
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

    async def _on_peer_change(self, decision: PeerChangeArrived, identity: Identity) -> None:
        change, oracle = decision.change, decision.envelope.sender
        rotation = self._rotation
        if rotation is not None and identity is rotation.new and not rotation.confirmed.is_set():
            # The oracle sealed a list to the new key: it took the rotation in.  Persisted by
            # the caller before this list is applied and acknowledged (a crash redelivers it).
            rotation.on_confirmed(rotation.old, rotation.new)
            rotation.confirmed.set()
            drain = self._drains.get(rotation.old.public)
            if drain is not None:
                drain[0].ready.set()  # from now on nothing more is stored for the old key
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

    async def _on_oracle_key_changed(self, decision: OracleKeyChanged) -> None:
        if decision.moved:
            former, current = self.oracle_key, decision.chain.current
            assert former is not None and current is not None
            if self._on_oracle_key_change is not None:
                self._on_oracle_key_change(decision.chain)  # persisted before it is confirmed
            self.oracle_key = current
            self.peers.follow_oracle(former, current)
            self.stats.oracle_key_changes += 1
            log.warning("oracle_key_followed", former=former.text, oracle_key=current.text)
        await self._send_receipt(decision.envelope)  # "this device follows you now"

    # -- key rotation ----------------------------------------------------------------------

    async def rotate_key(self, new_identity: Identity | None = None, *,
                         on_confirmed: Callable[[Identity, Identity], None] | None = None,
                         quiet_s: float = DEFAULT_QUIET_S) -> Identity:
        """Move this device to a new key that its current key vouches for; returns it.

        `new_identity` must be a key nobody has used (the default: a fresh one),
        or the one an interrupted call was given: any peer list the oracle seals
        to it counts as the confirmation.

        The current key sends the oracle a `KeyRotation` signed by both keys;
        then the device authenticates as the new key (refused until the relays
        hear of the rotation: sends wait meanwhile) and keeps the old key
        connected to drain its mailbox.  It returns once the oracle confirmed, by
        sealing a peer list to the new key; `on_confirmed(old, new)` runs before
        that list is acknowledged, so a caller that persists the new key there
        loses nothing to a crash.  The drain goes on (`draining`, `wait_drained`).

        Bound it with `asyncio.timeout`: interrupted before the confirmation, the
        device is the old key again, and calling again with the same
        `new_identity` resumes (the oracle applies a rotation once, and may still
        apply this one later: keep the new key before calling, as the CLI does).
        """
        oracle = self.oracle_key
        if oracle is None:
            raise ValueError("a key rotation needs an oracle (oracle_key)")
        if self._rotation is not None:
            raise RuntimeError("a key rotation is already under way")
        old, new = self.identity, new_identity or Identity.generate()
        statement = KeyRotation.sign(old, new, self._now_ms())
        envelope = seal_envelope(old, Kind.DATA, [oracle], statement.encode(),
                                 ttl_s=DEFAULT_TTL_S, now_ms=self._now_ms(), limits=self._limits)
        rotation = _Rotation(old, new, on_confirmed or (lambda old, new: None), asyncio.Event())
        self._rotation = rotation
        try:
            try:
                await self.send_envelope(envelope)
            except RevokedError:
                pass  # the old key may only drain: an earlier attempt took effect
            self._start_drain(old, quiet_s, ready=False)
            await self._use_identity(new)
            await rotation.confirmed.wait()
        except BaseException:
            if not rotation.confirmed.is_set() and self.identity is new:
                await self._stop_drain(old.public)
                await self._use_identity(old)
                del self._identities[new.public]
            raise
        finally:
            self._rotation = None
        log.info("key_rotated", old=old.public.text, new=new.public.text)
        return new

    def drain(self, identity: Identity, *, quiet_s: float = DEFAULT_QUIET_S) -> None:
        """Fetch what still waits for `identity`, a key this device rotated away from
        (after a restart cut a drain short); `wait_drained()` returns once it is empty."""
        self._start_drain(identity, quiet_s, ready=True)

    @property
    def draining(self) -> tuple[PublicKey, ...]:
        """Old keys whose mailboxes are still being drained."""
        return tuple(key for key, (drain, _) in self._drains.items() if not drain.done.is_set())

    async def wait_drained(self) -> None:
        """Return once every old key's mailbox is drained (bound it with asyncio.timeout)."""
        for drain, _ in list(self._drains.values()):
            await drain.done.wait()

    async def _use_identity(self, identity: Identity) -> None:
        self._identities[identity.public] = identity
        self.identity = identity
        await self._manager.use_identity(identity)

    def _start_drain(self, identity: Identity, quiet_s: float, *, ready: bool) -> None:
        if identity.public in self._drains:
            return
        self._identities[identity.public] = identity
        drain = Drain(identity, self.relays, max_envelope_bytes=self._limits.max_envelope_bytes,
                      handshake_timeout_s=self._handshake_timeout_s,
                      pinned_relay_keys=self._pinned_relay_keys, tls=self._tls, backoff=Backoff(),
                      on_connected=self._on_connected, on_event=self._on_event,
                      on_disconnected=self._on_disconnected, waiting=self._waiting_on,
                      quiet_s=quiet_s)
        if ready:
            drain.ready.set()
        task = asyncio.create_task(drain.run(), name="continuum-drain")
        task.add_done_callback(lambda _: self._forget(identity.public, task))
        self._drains[identity.public] = (drain, task)

    async def _stop_drain(self, key: PublicKey) -> None:
        entry = self._drains.get(key)
        if entry is not None:
            entry[1].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry[1]

    def _forget(self, key: PublicKey, task: asyncio.Task[None]) -> None:
        """A drain ended: the old key is no longer this device (unless it became it again)."""
        if self._drains.get(key, (None, None))[1] is task:
            del self._drains[key]
        if key != self.identity.public:
            self._identities.pop(key, None)

    def _waiting_on(self, connection: RelayConnection) -> int:
        return sum(1 for _, held_by, _ in self._inbound if held_by is connection)

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
