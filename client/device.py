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
its receipt queued in the outbox, in one commit, and handed over at once,
while the receipt is sent and the delivery ACKed in the background.  So a
crash before that commit leaves it in the mailbox for the next run, and
after it a re-delivery is a duplicate: the application gets each message at
most once, ever (with a home), and loses one only to a crash in the instant
between that commit and the hand-over.
DATA waiting for the application holds relay window slots, so an
application that never reads `messages()` (a pure sender) stops getting
receipts once a window's worth of DATA is waiting.

Replies (receipts) go through the same outbox as the application's
messages: durable with a home, re-sent on every connection, retried after
transient refusals, so none is lost to a relay or store restart.

Files (SPEC §17, `transfer_out`, `transfer_in`, both need a home): `send_file`
sends one as a manifest and a window of chunks through the same outbox, and
goes on after a restart; `files()` hands over each file a peer sent once it is
complete and verified, once, with the transfer's one receipt queued in the same
commit that marks it taken (as `messages()` does for DATA).  Manifests and
chunks are dealt with (written, recorded) on arrival, then ACKed.

Key rotation (SPEC §15): `rotate_key(new)` has the current key vouch for a new
one to the oracle, then authenticates as the new key while a `Drain` keeps the
old key connected until its mailbox is empty.  Each connection knows the key it
authenticated as, and its deliveries are decided and its sends made with that
identity; replies (receipts) are always sealed by the current one.  The new key
is the caller's, kept (persisted) before the call: once the statement naming it
may have left, the oracle may apply it at any time, so the key is never drawn
here, and an interrupted rotation stays `pending_rotation` until it is finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from proto import Envelope, Identity, Kind, Limits, PublicKey
from proto.config import ConfigReport, JsonObject
from proto.errors import RevokedError, WrongSenderError
from proto.payloads import ExpiryNotice, Receipt
from proto.rotation import KEY_ROTATION_TTL_S, KeyRotation, OracleKeyChain
from runtime.clock import now_ms
from runtime.logs import library_logger

from .backoff import Backoff
from .calling import Calls
from .calls import DEFAULT_MAX_RUNNING, CallHandler, CallResult, ResponseFate
from .config import AppliedConfig, ConfigUpdate
from .connection import DEFAULT_KEEPALIVE_S, RelayConnection
from .dedup import MessageKey, RecentlySeen
from .drain import DEFAULT_DEADLINE_S, DEFAULT_QUIET_S, Drain
from .freshness import CLOCK_SKEW_MS, device_now_ms, valid_until_ms
from .inbox import (CallArrived, ChunkArrived, ConfigArrived, ConfigReportArrived, Drop,
                    DropReason, ExpiryArrived, InboundMessage, InboxView, ManifestArrived,
                    OracleKeyChanged, PeerChangeArrived, ReceiptArrived, ResponseArrived, Surface,
                    decide)
from .manager import ConnectionManager
from .outbox import PendingSend
from .peers import PeerList, Standing
from .protocol import BadFrame, Delivered, Event, SendAccepted, SendRefused, StreamArrived
from .sending import Sender
from .state import DeviceState, transaction
from .stats import DeviceStats
from .stream_rules import DEFAULT_WINDOW
from .streams import Stream, StreamHandler, StreamHub
from .tracking import DeliveryStatus, Outgoing, SentMessage
from .transfer_in import (DEFAULT_MAX_INCOMING, DEFAULT_MAX_TRANSFER_BYTES, IncomingTransfers,
                          ReceivedFile)
from .transfer_out import DEFAULT_TRANSFER_WINDOW, OutgoingTransfers, Progress, SentFile

log = library_logger("continuum.client")

DEFAULT_TTL_S = 24 * 3600
# This device's own caps.  The envelope cap bounds what it seals and the largest
# delivery it reads; each connection uses the relay's announced limit below it.
DEVICE_LIMITS = Limits(max_envelope_bytes=16 * 1024 * 1024)
_RECEIPT_QUEUE_SIZE = 10_000
# The state file is pruned on every connection and after this many deliveries.
_PRUNE_EVERY = 1024

# What `on_config` takes: the update in, the reported state (a JSON object, or None for {}) out.
ConfigHandler = Callable[[ConfigUpdate], "JsonObject | None | Awaitable[JsonObject | None]"]


@dataclass(frozen=True)
class _Rotation:
    """A rotation waiting for the oracle's word: any peer list it seals to `new.public`."""

    old: Identity
    new: Identity
    on_confirmed: Callable[[Identity, Identity], None]
    confirmed: asyncio.Event


class Device:
    """A device identity talking to its peers through relays; use as `async with device:`.

    `home`: the directory of the state file (outbox, sent messages, seen
    messages) and, unless `peers` is given, of the peer list (`peers.json`,
    with the stamp of the oracle's list); None keeps them in memory, for this
    run only: then a PEER_CHANGE replayed after a restart is refused only once
    it is stale (created_at + ttl + skew, the oracle's push TTL).  A device is
    entered once: leaving it closes the state file.
    `on_connect_error(url, error)` hears of each failed connection attempt,
    `on_drop(drop)` of each delivery dropped (a CLI tells its user at once).

    `on_oracle_key_change(chain)` is called when the device follows the oracle
    to a new key, before it confirms that to the oracle: persist the chain there
    (the CLI keeps it in its home), and pass the key it leads to as `oracle_key`
    on the next start.
    """

    def __init__(self, identity: Identity, relays: Iterable[str], peers: PeerList | None = None,
                 oracle_key: PublicKey | None = None, *, home: Path | str | None = None,
                 backoff: Backoff | None = None, limits: Limits = DEVICE_LIMITS,
                 handshake_timeout_s: float = 10.0, keepalive_s: float = DEFAULT_KEEPALIVE_S,
                 relay_keys: Iterable[PublicKey] | None = None,
                 tls: ssl.SSLContext | None = None,
                 on_oracle_key_change: Callable[[OracleKeyChain], None] | None = None,
                 on_connect_error: Callable[[str, BaseException], None] | None = None,
                 on_drop: Callable[[Drop], None] | None = None,
                 max_running_calls: int = DEFAULT_MAX_RUNNING,
                 max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES,
                 max_incoming_transfers: int = DEFAULT_MAX_INCOMING,
                 max_incoming_transfers_per_peer: int | None = None,
                 transfer_window: int = DEFAULT_TRANSFER_WINDOW,
                 takes_commands: bool = True) -> None:
        """`relay_keys`: pin the relays this device talks to; a relay holding any other key
        is refused in the handshake (before HELLO), and only these keys' EXPIRY notices
        count.  None: any relay that proves its key.  `tls`: how `wss://` relays are
        verified (a private CA); None: the system's certificate store.
        `max_running_calls`: call handlers running at once; beyond, calls are answered
        REFUSED (SPEC §18).
        `max_transfer_bytes`: the largest file sent or received (SPEC §17);
        `max_incoming_transfers`: files arriving or waiting to be taken at once (beyond,
        the next manifest is refused), and `max_incoming_transfers_per_peer` of them from
        one peer (None: half, at least one); `transfer_window`: chunks of a
        file in the outbox at once.
        `takes_commands`: False for a run that shares its home with the one answering
        calls and applying configuration (the CLI's one-shot commands beside `listen`):
        CALL and CONFIG deliveries are then left unacknowledged, for the relay to deliver
        again on a later connection.  Taken here, a configuration was applied and reported
        with no handler to run it, and a call answered NOT_FOUND."""
        self.identity = identity
        self.relays = list(relays)
        if not self.relays:
            raise ValueError("a device needs at least one relay URL")
        # With a home and no list given, the one kept there: its stamp must outlive this run,
        # or a replayed older PEER_CHANGE would be taken after a restart.
        self.peers = peers if peers is not None else (
            PeerList.in_home(Path(home)) if home is not None else PeerList())
        self.oracle_key = oracle_key
        self.stats = DeviceStats()
        # Keys of relays that proved them in a WELCOME: only these may send EXPIRY notices.
        self.relay_keys: set[PublicKey] = set()
        self._on_drop = on_drop
        self._takes_commands = takes_commands
        self._limits = limits
        self._handshake_timeout_s = handshake_timeout_s
        self._pinned_relay_keys = None if relay_keys is None else frozenset(relay_keys)
        self._tls = tls
        self._on_oracle_key_change = on_oracle_key_change
        self._state = DeviceState.in_home(Path(home)) if home is not None else None
        # The oracle's configuration in force (SPEC §21), kept in the home like the peer list.
        self.config = AppliedConfig.in_home(Path(home)) if home is not None else AppliedConfig()
        self._config_handler: ConfigHandler | None = None
        self._config_turn = asyncio.Lock()  # configurations are handled one at a time
        self._report_listeners: list[asyncio.Queue[tuple[PublicKey, ConfigReport]]] = []
        self._seen = RecentlySeen(state=self._state)
        # Every key this device may be addressed as: the current one, and old ones draining.
        self._identities = {identity.public: identity}
        self._rotation: _Rotation | None = None
        # The new key of a rotation started and not confirmed: its statement may be applied.
        self._pending_rotation: Identity | None = None
        self._drains: dict[PublicKey, tuple[Drain, asyncio.Task[None]]] = {}
        self._inbound: deque[tuple[Surface, RelayConnection, str]] = deque()
        self._waiting: Counter[MessageKey] = Counter()  # the (sender, msg_id) of each inbound
        self._inbound_ready = asyncio.Event()
        self._receipt_listeners: list[asyncio.Queue[tuple[PublicKey, Receipt]]] = []
        self._manager = ConnectionManager(
            identity, self.relays, max_envelope_bytes=limits.max_envelope_bytes,
            handshake_timeout_s=handshake_timeout_s,
            pinned_relay_keys=self._pinned_relay_keys, tls=tls,
            backoff=backoff or Backoff(),
            stats=self.stats, on_connected=self._on_connected, on_event=self._on_event,
            on_disconnected=self._on_disconnected, keepalive_s=keepalive_s,
            on_connect_error=on_connect_error)
        self._sender = Sender(self._identities, self._manager, self._state, self.stats, limits)
        self._streams = StreamHub(self.peers, lambda: self.identity)
        self._calls = Calls(self._sender, self.stats, lambda: self.identity,
                            max_running=max_running_calls)
        self._incoming: IncomingTransfers | None = None
        self._outgoing: OutgoingTransfers | None = None
        if home is not None and self._state is not None:
            self._incoming = IncomingTransfers(Path(home), self._state, self._seen,
                                               max_bytes=max_transfer_bytes,
                                               max_incoming=max_incoming_transfers,
                                               max_incoming_per_peer=(
                                                   max_incoming_transfers_per_peer))
            self._outgoing = OutgoingTransfers(self._sender, self._state, lambda: self.identity,
                                               self._identities, max_bytes=max_transfer_bytes,
                                               window=transfer_window)
        self._runner: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Device:
        self._sender.load()
        if self._incoming is not None and self._outgoing is not None:
            await self._incoming.load()
            self._outgoing.resume()
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
        await self._streams.stop()
        await self._calls.stop()
        if self._outgoing is not None:
            await self._outgoing.stop()
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
        envelope = self._sender.seal(self.identity, Kind.DATA, list(recipients), payload, ttl_s)
        return await self._sender.submit(envelope, payload, timeout)

    async def queue(self, recipients: Iterable[PublicKey], payload: bytes, *,
                    ttl_s: int = DEFAULT_TTL_S) -> Outgoing:
        """Put a message in the outbox and return at once; it is sent whenever a relay is up
        (this run, or with a home a later one).  Needs no connection, nor `async with`."""
        envelope = self._sender.seal(self.identity, Kind.DATA, list(recipients), payload, ttl_s)
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

    # -- files (SPEC §17) -----------------------------------------------------------------

    async def send_file(self, peer: PublicKey, path: Path | str, *, ttl_s: int = DEFAULT_TTL_S,
                        media_type: str | None = None, progress: Progress | None = None,
                        timeout: float | None = None) -> SentFile:
        """Send the file at `path` to `peer` as a transfer; return once a relay accepted every
        chunk (the receipt for `SentFile.msg_id` then says the peer has it, verified).

        Needs a home.  Waits for a relay connection first (its envelope limit sizes the
        chunks).  The same file (path, size, modification time) to the same peer goes on
        with the transfer already under way, from this run or an earlier one, instead of
        starting again.  `progress(accepted_bytes, total)` hears of each chunk accepted.
        Raises TransferError (too large, unreadable, changed, a chunk refused for good) or
        TimeoutError after `timeout` seconds: the transfer then goes on while the device
        runs, and on its next start.
        """
        if self._outgoing is None:
            raise ValueError("sending files needs a device home")
        self._outgoing.check(Path(path))  # before waiting for a relay: a clear answer at once
        async with asyncio.timeout(timeout):
            while (connection := self._manager.connection) is None:
                await self._manager.connected.wait()
            limit = connection.limits.max_envelope_bytes  # sizes the chunks
            return await self._outgoing.send(peer, Path(path), ttl_s=ttl_s,
                                             max_envelope_bytes=limit, media_type=media_type,
                                             progress=progress)

    async def files(self) -> AsyncGenerator[ReceivedFile, None]:
        """Files peers sent, complete and verified, each once, ever (see the module docstring).

        Taking one commits it as surfaced with its receipt queued; the file at its `path` is
        then the application's to move or delete.  Needs a home.
        """
        incoming = self._incoming
        if incoming is None:
            raise ValueError("receiving files needs a device home")
        while True:
            while not incoming.ready:
                incoming.ready_event.clear()
                await incoming.ready_event.wait()
            received = incoming.ready.popleft()
            with transaction(self._state):
                manifest_envelope = incoming.taken(received)
                receipt = self._sender.queue_receipt(self.identity, manifest_envelope)
            self._sender.spawn(self._sender.send_now(receipt))  # nothing to interrupt (above)
            self.stats.files_surfaced += 1
            yield received

    # -- streams (SPEC §16) ----------------------------------------------------------------

    async def open_stream(self, peer: PublicKey, service: str, *, window: int = DEFAULT_WINDOW,
                          timeout: float | None = None) -> Stream:
        """Open a live, end-to-end encrypted stream to `peer`, asking for `service` (its
        meaning is the peer's: the tunnel uses "tcp/PORT"); returns once the peer accepted.

        Raises StreamRefusedError (the peer said no: not a peer of it, no such service),
        PeerUnreachableError (connected to no relay of the deployment, or no answer in
        time: a relay answers every open within its own deadline, 10 s by default, and one
        that says nothing for 30 s does not carry streams), NotPeerError (the relay's peer
        groups), StreamLimitError or RateLimitedError (bounds: retry later), or
        TimeoutError (no relay connection, or no answer, within `timeout`).  `window` is
        how many bytes the peer may send before we read.
        """
        async with asyncio.timeout(timeout):
            while True:
                await self._manager.connected.wait()
                connection = self._manager.connection
                if connection is not None:
                    return await self._streams.open(connection, peer, service, window=window)

    def on_stream(self, handler: StreamHandler | None) -> None:
        """Call `handler(request)` (in a task of its own) for each stream a peer opens; it
        accepts or refuses the `StreamRequest`.  Without a handler every open is refused."""
        self._streams.on_stream(handler)

    # -- calls (SPEC §18) ------------------------------------------------------------------

    async def call(self, peer: PublicKey, method: str, body: bytes = b"", *,
                   timeout: float) -> CallResult:
        """Call `method` on `peer` with `body`; return its response (status and body).

        The call waits in the peer's mailbox if it is offline, until `timeout`
        seconds have passed: then CallTimeoutError (a TimeoutError), whether the
        peer never connected or did not answer in time.  A relay's final refusal
        is raised as its proto exception (NotPeerError at relays that enforce
        peer groups, …).  A handler's failure is a response (ERROR), not an
        exception.  Each call runs at most once at the peer.
        """
        return await self._calls.call(peer, method, body, timeout)

    def on_call(self, method: str, handler: CallHandler | None) -> None:
        """Answer calls of `method` from peers (and the oracle) with `handler(call)`, run in a
        task of its own and cancelled at the call's deadline; it returns the body of an OK
        response, or a `CallResult` for another status.  None removes it: then such calls
        are answered NOT_FOUND."""
        self._calls.on_call(method, handler)

    # -- receiving -------------------------------------------------------------------------

    async def messages(self) -> AsyncGenerator[InboundMessage, None]:
        """DATA messages from peers, in mailbox order, each once (see the module docstring)."""
        while True:
            while not self._inbound:
                self._inbound_ready.clear()
                await self._inbound_ready.wait()
            surface, connection, tag = self._inbound.popleft()
            key = (surface.envelope.sender, surface.envelope.msg_id)
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
            if key in self._seen:  # a re-delivery queued before the first copy was taken
                self.stats.duplicates += 1
                await connection.ack(tag)
                continue
            with transaction(self._state):
                self._seen.add(key, valid_until_ms(surface.envelope))
                receipt = self._sender.queue_receipt(self.identity, surface.envelope)
            # Sent and ACKed in the background, so that nothing between the commit and the
            # hand-over can be interrupted: a caller that cancels a pending `anext()` (to
            # stop listening) loses no message taken.  The receipt is sealed by the current
            # key: its connection.
            self._sender.spawn(self._reply_and_ack(receipt, connection, tag))
            self.stats.surfaced += 1
            yield surface.message

    async def _reply_and_ack(self, receipt: PendingSend, connection: RelayConnection,
                             tag: str) -> None:
        await self._sender.send_now(receipt)
        await connection.ack(tag)

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

    # -- configuration (SPEC §21) ----------------------------------------------------------

    def on_config(self, handler: ConfigHandler | None) -> None:
        """Call `handler(update)` (sync or async) for each newer configuration from the oracle;
        it applies `update.document` and returns the state to report (a JSON object; None
        reports {}).  Only once it returned is the configuration held as applied (in the
        home's `config.json`) and its report sent.  If it raises, nothing is applied and the
        oracle is sent a report of the configuration still applied, so it shows the device
        as behind until a later version (the next change) is applied.  Without a handler
        every newer configuration is applied as it comes, reporting {}."""
        self._config_handler = handler

    def config_reports(self) -> AsyncGenerator[tuple[PublicKey, ConfigReport], None]:
        """Every configuration report sent to this device (the oracle reads them) as
        (device, report), from the moment of this call; like `receipts()`."""
        queue: asyncio.Queue[tuple[PublicKey, ConfigReport]] = asyncio.Queue(_RECEIPT_QUEUE_SIZE)
        self._report_listeners.append(queue)
        return self._drain_reports(queue)

    async def _drain_reports(self, queue: asyncio.Queue[tuple[PublicKey, ConfigReport]]
                             ) -> AsyncGenerator[tuple[PublicKey, ConfigReport], None]:
        try:
            while True:
                yield await queue.get()
        finally:
            self._report_listeners.remove(queue)

    async def _on_config(self, decision: ConfigArrived) -> PendingSend | None:
        """Apply a newer configuration through the handler; the report to send, if any.

        One at a time, and ranked again once its turn comes: a rotated key's mailbox draining
        beside its successor's hands in two configurations at once, and the older one,
        ranked NEWER against what was held when it arrived, was given to the application
        after the newer one and kept (a rollback a relay can order)."""
        async with self._config_turn:
            return await self._apply_config(decision.update, decision.envelope,
                                            self.config.standing(decision.update.stamp,
                                                                 decision.envelope.sender))

    async def _apply_config(self, update: ConfigUpdate, envelope: Envelope,
                            standing: Standing) -> PendingSend | None:
        seen = (envelope.sender, envelope.msg_id)
        if standing is Standing.OLDER:
            self.stats.configs_older += 1
            log.warning("config_older_than_applied", offered=str(update.stamp),
                        applied=str(self.config.stamp), oracle=envelope.sender.text)
            with transaction(self._state):
                self._seen.add(seen, valid_until_ms(envelope))
            return None  # no report: a report says which configuration is in force
        reported: JsonObject | None = self.config.reported
        if standing is Standing.NEWER:
            try:
                reported = await self._run_config_handler(update)
            except Exception as exc:  # the application's refusal: report what is still in force
                log.warning("config_not_applied", stamp=str(update.stamp), error=repr(exc))
                reported = None
        with transaction(self._state):
            if reported is not None and standing is Standing.NEWER:
                self.config.apply(update, envelope.sender, reported)  # on disk before the report
                self.stats.config_updates += 1
                log.info("config_applied", stamp=str(update.stamp))
            report = ConfigReport(self.config.stamp.epoch, self.config.stamp.version,
                                  self.config.reported)
            self._seen.add(seen, valid_until_ms(envelope))
            return self._sender.queue_reply(self.identity, Kind.CONFIG_REPORT, envelope,
                                            report.encode())

    async def _run_config_handler(self, update: ConfigUpdate) -> JsonObject:
        handler = self._config_handler
        result = handler(update) if handler is not None else None
        if inspect.isawaitable(result):
            result = await result
        reported = {} if result is None else result
        if not isinstance(reported, dict):
            raise TypeError("an on_config handler returns a JSON object or None")
        ConfigReport(update.epoch, update.version, reported).encode()  # within the bounds
        return reported

    def _on_config_report(self, decision: ConfigReportArrived) -> None:
        sender = decision.envelope.sender
        for queue in self._report_listeners:
            try:
                queue.put_nowait((sender, decision.report))
            except asyncio.QueueFull:
                log.warning("config_report_listener_full", sender=sender.text)

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
        elif isinstance(event, StreamArrived):
            await self._streams.on_frame(event.frame, connection)
        elif isinstance(event, BadFrame):
            self.stats.bad_frames += 1

    async def _on_delivery(self, delivery: Delivered, connection: RelayConnection) -> None:
        self.stats.deliveries += 1
        identity = self._identities.get(connection.device_key)
        if identity is None:  # the closing connection of a key given up: not ACKed, kept
            return
        if self._state is not None and self.stats.deliveries % _PRUNE_EVERY == 0:
            self._prune()
        view = InboxView(identity, self.peers, self.relay_keys, self._seen, self._sender.sent,
                         self.oracle_key, self.config)
        decision = decide(delivery.envelope, view, connection.limits,
                          now_ms=device_now_ms(now_ms(), connection.clock_offset_ms))
        if isinstance(decision, Surface):
            key = (decision.envelope.sender, decision.envelope.msg_id)
            if self._waiting[key]:
                # A copy of a message already waiting to be taken, which no honest relay
                # sends: each copy held (up to the envelope limit, a signature check and a
                # decryption each) let a relay re-delivering one message grow this queue
                # without end.  The copy is ACKed; the first is taken as usual.
                self.stats.duplicates += 1
                await connection.ack(delivery.tag)
                return
            self._waiting[key] += 1
            self._inbound.append((decision, connection, delivery.tag))
            self._inbound_ready.set()
            return  # ACKed when the application takes it
        if isinstance(decision, (CallArrived, ConfigArrived)) and not self._takes_commands:
            self.stats.commands_left += 1
            return  # not ACKed: the relay delivers it again on a later connection
        if isinstance(decision, CallArrived):
            # Taken once: recorded as seen before its handler runs, so a re-delivery (an ACK
            # lost with its connection) is a duplicate: calls run at most once.
            self._remember(decision.envelope)
            self._calls.on_call_arrived(decision)
            await connection.ack(delivery.tag)
            return
        if isinstance(decision, ResponseArrived):
            # Remembered only if it answered a call of ours: anyone may send a RESPONSE, and
            # unmatched ones kept for their TTL would push peers' messages out of the bounded
            # seen set (a message redelivered after a lost ACK would then surface twice).
            if self._calls.on_response(decision) is ResponseFate.MATCHED:
                self._remember(decision.envelope)
            await connection.ack(delivery.tag)
            return
        if isinstance(decision, (ManifestArrived, ChunkArrived)):
            if self._incoming is None:
                self._on_dropped(Drop(DropReason.REFUSED_TRANSFER,
                                      "this device has no home to receive files in",
                                      decision.envelope))
            else:
                dropped = await self._incoming.on_delivery(decision)  # committed if taken in
                if dropped is not None:
                    self._on_dropped(dropped)
            await connection.ack(delivery.tag)
            return
        reply: PendingSend | None = None
        if isinstance(decision, Drop):
            self._on_dropped(decision)
        elif isinstance(decision, ConfigArrived):
            reply = await self._on_config(decision)  # the handler may take its time
        elif isinstance(decision, ExpiryArrived):
            # Not remembered as seen: marking its messages EXPIRED again changes nothing, and
            # a relay signs its own notices with any ttl, whose entries would push peers'
            # messages out of the bounded seen set (to be replayed as new).
            self.stats.expiry_notices += 1
            with transaction(self._state):
                self._on_expiry(decision.notice)
        else:
            # Handled and recorded as seen in one commit: if handling failed (disk full), the
            # re-delivery retries it; once committed, a re-delivery is a duplicate.
            with transaction(self._state):
                if isinstance(decision, ReceiptArrived):
                    self._on_receipt(decision)
                elif isinstance(decision, OracleKeyChanged):
                    reply = self._on_oracle_key_changed(decision)
                elif isinstance(decision, ConfigReportArrived):
                    self._on_config_report(decision)
                else:
                    reply = self._on_peer_change(decision, identity)
                self._remember(decision.envelope)
        if reply is not None:
            await self._sender.send_now(reply)
        await connection.ack(delivery.tag)

    def _on_expiry(self, notice: ExpiryNotice) -> None:
        """Mark what a relay says expired unread, unless the device's own clock says it
        cannot have expired yet (a relay's clock does not count here: it could announce any).
        Before, any relay key ever proven could settle a message as expired at once."""
        sent, now = self._sender.sent, now_ms()
        for msg_id, recipient in notice.entries:
            expires_at = sent.expires_at(msg_id)
            if expires_at is not None and expires_at - CLOCK_SKEW_MS > now:
                log.warning("expiry_notice_too_early", msg_id=msg_id.hex(),
                            expires_in_s=(expires_at - now) // 1000)
                continue
            sent.record(msg_id, recipient, DeliveryStatus.EXPIRED)

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

    def _on_peer_change(self, decision: PeerChangeArrived,
                        identity: Identity) -> PendingSend | None:
        """Apply a newer list; the receipt to send, if the list is in force."""
        change, oracle = decision.change, decision.envelope.sender
        rotation = self._rotation
        if rotation is not None and identity is rotation.new and not rotation.confirmed.is_set():
            # The oracle sealed a list to the new key: it took the rotation in.  Persisted by
            # the caller before this list is applied and acknowledged (a crash redelivers it).
            rotation.on_confirmed(rotation.old, rotation.new)
            rotation.confirmed.set()
            self._pending_rotation = None
            drain = self._drains.get(rotation.old.public)
            if drain is not None:
                drain[0].ready.set()  # from now on nothing more is stored for the old key
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
        return self._sender.queue_receipt(self.identity, decision.envelope)

    def _on_oracle_key_changed(self, decision: OracleKeyChanged) -> PendingSend:
        if decision.moved:
            former, current = self.oracle_key, decision.chain.current
            assert former is not None and current is not None
            if self._on_oracle_key_change is not None:
                self._on_oracle_key_change(decision.chain)  # persisted before it is confirmed
            self.oracle_key = current
            self.peers.follow_oracle(former, current)
            self.config.follow_oracle(former, current)
            self.stats.oracle_key_changes += 1
            log.warning("oracle_key_followed", former=former.text, oracle_key=current.text)
        return self._sender.queue_receipt(self.identity, decision.envelope)  # "I follow you"

    # -- key rotation ----------------------------------------------------------------------

    async def rotate_key(self, new_identity: Identity, *,
                         on_confirmed: Callable[[Identity, Identity], None] | None = None,
                         quiet_s: float = DEFAULT_QUIET_S) -> Identity:
        """Move this device to `new_identity`, a key its current key vouches for; returns it.

        `new_identity` is required, and the caller keeps it (on disk) BEFORE
        calling: the statement naming it may reach the oracle whatever becomes
        of this call (it waits in the oracle's mailbox, possibly in this
        device's outbox too), and once the oracle applies it the old key may
        only drain, so a new key drawn here and lost with an interrupted call
        would lock the device out for good.  `KeyFiles.begin()` keeps one as
        the CLI does (`identity.key.next`), or returns the one still pending.

        The current key sends the oracle a `KeyRotation` signed by both keys;
        then the device authenticates as the new key (refused until the relays
        hear of the rotation: sends wait meanwhile) and keeps the old key
        connected to drain its mailbox.  It returns once the oracle confirmed, by
        sealing a peer list to the new key; `on_confirmed(old, new)` runs before
        that list is acknowledged (`KeyFiles.confirm` makes the new key the one
        on disk), so a crash loses nothing.  The drain goes on (`draining`,
        `wait_drained`).

        Bound it with `asyncio.timeout`.  Interrupted before the confirmation,
        the device is the old key again and `pending_rotation` is
        `new_identity` until a call with that same key is confirmed; a call
        with any other key is refused (ValueError): the oracle applies the
        first statement it reads, and a second one would then wait for ever.
        Whether or not the oracle applied the pending statement meanwhile,
        calling again with the same key finishes the rotation: the statement
        is sent again (refused REVOKED if the oracle already applied it, which
        is fine), and the confirming list waits in the new key's mailbox.
        What it does not do is switch on its own: until it is called again,
        the oracle may apply the statement and the old key's sends are then
        refused REVOKED.  After a restart, pass the kept key (CLI: `listen`
        says "run rotate-key to finish it" while `identity.key.next` exists).
        """
        if not isinstance(new_identity, Identity):
            raise TypeError("rotate_key needs the new key, kept by the caller before the call"
                            " (KeyFiles.begin()): the oracle may apply the rotation even if"
                            " this call is interrupted")
        oracle = self.oracle_key
        if oracle is None:
            raise ValueError("a key rotation needs an oracle (oracle_key)")
        if self._rotation is not None:
            raise RuntimeError("a key rotation is already under way")
        pending = self._pending_rotation
        if pending is not None and pending.public != new_identity.public:
            raise ValueError(f"a rotation to {pending.public.text} is pending (the oracle may"
                             " still apply it): finish it with that key (pending_rotation)")
        old, new = self.identity, new_identity
        statement = KeyRotation.sign(old, new, self._sender.now_ms())
        envelope = self._sender.seal(old, Kind.DATA, [oracle], statement.encode(),
                                     KEY_ROTATION_TTL_S)
        rotation = _Rotation(old, new, on_confirmed or (lambda old, new: None), asyncio.Event())
        self._rotation = rotation
        self._pending_rotation = new  # before anything is sent
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

    @property
    def pending_rotation(self) -> Identity | None:
        """The new key of a rotation this device started and the oracle has not confirmed
        (an interrupted `rotate_key`): the oracle may still apply it, so finish it with
        `rotate_key(device.pending_rotation)`.  Kept in memory only: the caller persists the
        key before `rotate_key` (KeyFiles), which is what survives a restart."""
        return self._pending_rotation

    @property
    def rotating(self) -> bool:
        """A key rotation is under way: until the relays apply the oracle's list, the new key
        is refused NOT_ENROLLED, which reconnecting outlasts (SPEC §15)."""
        return self._rotation is not None

    def drain(self, identity: Identity, *, quiet_s: float = DEFAULT_QUIET_S,
              deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        """Fetch what still waits for `identity`, a key this device rotated away from
        (after a restart cut a drain short); `wait_drained()` returns once it is empty, or
        `deadline_s` from now whatever the relays do (`drain.Drain`)."""
        self._start_drain(identity, quiet_s, ready=True, deadline_s=deadline_s)

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

    def _start_drain(self, identity: Identity, quiet_s: float, *, ready: bool,
                     deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        if identity.public in self._drains:
            return
        self._identities[identity.public] = identity
        drain = Drain(identity, self.relays, max_envelope_bytes=self._limits.max_envelope_bytes,
                      handshake_timeout_s=self._handshake_timeout_s,
                      pinned_relay_keys=self._pinned_relay_keys, tls=self._tls, backoff=Backoff(),
                      on_connected=self._on_connected, on_event=self._on_event,
                      on_disconnected=self._on_disconnected, waiting=self._waiting_on,
                      quiet_s=quiet_s, deadline_s=deadline_s)
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
        log.info("relay_connected", relay=connection.url, relay_key=connection.relay_key.text,
                 outbox=len(self._sender.outbox))
        await self._sender.connected(connection)
        if self._state is not None:
            self._prune()

    def _on_disconnected(self, connection: RelayConnection) -> None:
        self._streams.connection_lost(connection)
        # Deliveries not yet taken can no longer be ACKed here; the relay re-delivers them.
        self._inbound = deque(item for item in self._inbound if item[1] is not connection)
        self._waiting = Counter((item[0].envelope.sender, item[0].envelope.msg_id)
                                for item in self._inbound)

    def _remember(self, envelope: Envelope) -> None:
        """Record a taken envelope as seen, durably (a re-delivery, even after a restart, is
        then a duplicate); within an outer transaction, with what handling it changed."""
        with transaction(self._state):
            self._seen.add((envelope.sender, envelope.msg_id), valid_until_ms(envelope))

    def _prune(self) -> None:
        """Forget by the device's own clock, never the relay's (client/freshness.py)."""
        assert self._state is not None
        now = now_ms()
        self._state.prune(now, max_seen=self._seen.capacity, max_sent=self._sender.sent.capacity)
        if self._incoming is not None:
            self._incoming.expire(now)
