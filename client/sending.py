"""The device's sending half: the outbox and the sent log, driven by the relays' answers.

`Sender` holds every envelope the device sends (the application's messages
and its own receipts alike) from before the first byte is written until a
relay answers for good, and records that answer.  It acts on the rules of
`outbox` (what an answer means, when to seal again) and `tracking` (what
became of each message); `Device` hands it each new connection and each
ACCEPTED or ERROR.

Per entry: written to the state file with its tracking in one commit before
anything is sent; sent on every connection that has not carried it; after a
transient refusal sent again after a backoff; past the relay's clock window
sealed again (if the device sealed it) or, past its TTL, given up as
expired.  A relay's final answer is committed without fsync: a power cut can
only undo it, and then the same bytes go again and hear the same answer (or
REPLAY, which means stored).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from proto import Envelope, Identity, Kind, Limits, PublicKey, seal_envelope
from proto.errors import ProtocolError, RevokedError, StaleError
from proto.payloads import Receipt
from runtime.clock import now_ms
from runtime.logs import library_logger
from runtime.tasks import cancel_all_and_wait

from .connection import RelayConnection
from .manager import ConnectionManager, describe
from .outbox import Outbox, PendingSend, is_transient, needs_renewal, renewed
from .state import DeviceState, transaction
from .stats import DeviceStats
from .tracking import Outgoing, SentLog

log = library_logger("continuum.client")


class Sender:
    """Everything the device sends, until answered; see the module docstring."""

    def __init__(self, identities: Mapping[PublicKey, Identity], manager: ConnectionManager,
                 state: DeviceState | None, stats: DeviceStats, limits: Limits) -> None:
        # The device's keys (live): an entry is sent, and sealed again, only as the key that
        # signed it, the current one or one draining after a rotation.
        self._identities = identities
        self._manager = manager
        self._state = state
        self._stats = stats
        self._limits = limits
        self.outbox = Outbox(state)
        self.sent = SentLog(state=state)
        # Relay clock minus ours, from the last WELCOME: envelopes are stamped in relay time.
        self.clock_offset_ms = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def now_ms(self) -> int:
        """Relay time, as learned in the last WELCOME: what envelopes are stamped with."""
        return now_ms() + self.clock_offset_ms

    def seal(self, identity: Identity, kind: Kind, recipients: list[PublicKey], payload: bytes,
             ttl_s: int) -> Envelope:
        return seal_envelope(identity, kind, recipients, payload, ttl_s=ttl_s,
                             now_ms=self.now_ms(), limits=self._seal_limits())

    def _seal_limits(self) -> Limits:
        """The limit to seal (and pad) to: the connected relay's (never above this device's
        cap), so padding never pushes a message whose content fits past a relay's limit.
        Sealed while offline, a message is padded to its full bucket."""
        connection = self._manager.connection
        if connection is None:
            return self._limits
        return Limits(max_envelope_bytes=connection.limits.max_envelope_bytes,  # below the cap
                      max_recipients=self._limits.max_recipients)

    # -- the lifecycle of the device ------------------------------------------------------

    def load(self) -> None:
        """Take in what a previous run left in the outbox; nobody awaits those entries."""
        loaded = self.outbox.load()
        for entry in loaded:
            entry.accepted.add_done_callback(_log_unawaited_refusal(entry))
        if loaded:
            log.info("outbox_loaded", pending=len(loaded))

    async def stop(self) -> None:
        await cancel_all_and_wait(self._tasks)
        for entry in self.outbox.entries():
            if entry.retry_timer is not None:
                entry.retry_timer.cancel()

    async def connected(self, connection: RelayConnection) -> None:
        """A new connection: adopt its clock and send everything it has not carried."""
        self.clock_offset_ms = connection.clock_offset_ms
        for entry in self.outbox.entries():
            if entry.envelope.sender not in self._identities:  # left by a run before a rotation
                self._settle(entry, RevokedError("signed by a key this device rotated away from"))
        for entry in self.outbox.unsent_on(connection):
            await self.transmit(entry, connection)

    # -- entries --------------------------------------------------------------------------

    def enqueue(self, envelope: Envelope, plaintext: bytes | None,
                kind: Kind | None = None) -> tuple[Outgoing, PendingSend]:
        """Track and hold `envelope`, in one commit: from here on it is durable."""
        with transaction(self._state):
            outgoing = self.sent.track(envelope)  # before sending: a receipt may beat ACCEPTED
            entry = self.outbox.add(envelope, plaintext=plaintext, kind=kind)
        return outgoing, entry

    def enqueue_soon(self, envelope: Envelope, plaintext: bytes) -> Outgoing:
        """Hold it and, if a relay is connected, send it in the background."""
        outgoing, entry = self.enqueue(envelope, plaintext)
        self.spawn(self.send_now(entry))
        return outgoing

    async def submit(self, envelope: Envelope, plaintext: bytes | None,
                     timeout: float | None) -> Outgoing:
        """Hold, send, and wait for the final answer (see `Device.send`)."""
        outgoing, entry = self.enqueue(envelope, plaintext)
        try:
            await self.send_now(entry)
            done, _ = await asyncio.wait([entry.accepted], timeout=timeout)
        except asyncio.CancelledError:
            if not entry.accepted.done():
                self._withdraw(entry)
            raise
        if not done:
            raise TimeoutError(f"no relay accepted {envelope.msg_id.hex()} within {timeout:g}s"
                               f" (last error: {self._manager.last_error or 'none'}); it stays"
                               " in the outbox")
        entry.accepted.result()  # raises the refusal
        return outgoing

    def queue_receipt(self, identity: Identity, envelope: Envelope) -> PendingSend:
        """The receipt for `envelope`, sealed by `identity` and held in the outbox like any
        message; committing is the caller's (it goes with recording `envelope` as handled)."""
        return self.queue_reply(identity, Kind.RECEIPT, envelope,
                                 Receipt.of(envelope).encode())

    def queue_reply(self, identity: Identity, kind: Kind, envelope: Envelope,
                    plaintext: bytes) -> PendingSend:
        """A reply of `kind` to `envelope`'s sender, with its TTL, held in the outbox like a
        receipt (a configuration report, SPEC §21); committing is the caller's."""
        sealed = self.seal(identity, kind, [envelope.sender], plaintext, envelope.ttl_s)
        entry = self.outbox.add(sealed, plaintext=plaintext, reply=True)
        entry.accepted.add_done_callback(_log_unawaited_refusal(entry))
        return entry

    def hold_untracked(self, envelope: Envelope, *, awaited: bool) -> PendingSend:
        """Hold a call or a call's response (SPEC §18) like a reply: no receipt is awaited
        for it, and it is never sealed again (no plaintext kept, so it cannot be renewed as
        another kind): past the relay's clock window it is refused STALE, which its deadline
        bounds anyway.  Durable on return; send it with `send_now`.  A refusal of one not
        `awaited` (a response) is logged."""
        with transaction(self._state):
            entry = self.outbox.add(envelope, reply=True)
        if not awaited:
            entry.accepted.add_done_callback(_log_unawaited_refusal(entry))
        return entry

    def discard_untracked(self, entry: PendingSend) -> None:
        """Take back a held call nobody waits for any more (it timed out, or was cancelled)."""
        with transaction(self._state):
            self.outbox.discard(entry.msg_id)

    async def flush(self, timeout: float | None) -> int:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.outbox:
                    await asyncio.wait([entry.accepted for entry in self.outbox.entries()])
        return len(self.outbox)

    async def send_now(self, entry: PendingSend) -> None:
        """Send `entry` on the current connection, if there is one (else on the next)."""
        connection = self._manager.connection
        if connection is not None:
            await self.transmit(entry, connection)

    async def transmit(self, entry: PendingSend, connection: RelayConnection) -> None:
        if (entry.sent_on is connection or entry.msg_id not in self.outbox
                or entry.envelope.sender != connection.device_key):
            return  # sent there already, or waits for a connection of the key that signed it
        now = self.now_ms()
        if needs_renewal(entry, now) or now >= entry.envelope.expires_at_ms:
            signer = self._identities.get(entry.envelope.sender)
            envelope = renewed(entry, signer, now, self._seal_limits()) \
                if entry.plaintext is not None and signer is not None else None
            if envelope is None:
                self._settle(entry, StaleError("its ttl passed before any relay accepted it"),
                             lapsed=True)
                return
            with transaction(self._state):
                self.outbox.renew(entry, envelope)
                if not entry.reply:
                    self.sent.resealed(envelope)
        self.outbox.mark_sent(entry, connection)
        if entry.transmissions > 1:
            self._stats.resent += 1
        try:
            await connection.send(entry.envelope.raw)
        except ProtocolError as exc:  # too large for this relay: refused before it is sent
            self._settle(entry, exc)
        except ConnectionError:
            pass  # still in the outbox: the next connection sends it again

    # -- the relays' answers --------------------------------------------------------------

    def accepted(self, msg_id: bytes) -> None:
        entry = self.outbox.get(msg_id)
        if entry is None:
            return
        with transaction(self._state, durable=False):
            self.outbox.accepted(msg_id)
            if not entry.reply:
                self.sent.accepted(msg_id)
        if not entry.reply:
            self._stats.sent += 1

    def refused(self, msg_id: bytes, error: ProtocolError) -> bool:
        """A relay refused `msg_id`; False if it is none of ours."""
        entry = self.outbox.get(msg_id)
        if entry is None:
            return False
        if not is_transient(error):
            self._settle(entry, error)
            return True
        # Nothing was stored; the same bytes go again after a backoff (or on a new connection).
        self._manager.last_error = f"{error.code.name}: {error.message}"
        entry.sent_on = None
        if entry.retry_timer is not None:  # refused again on a new connection meanwhile
            entry.retry_timer.cancel()
        delay = entry.retry_backoff.next_delay()
        log.info("send_retry_later", msg_id=msg_id.hex(), code=error.code.name,
                 retry_in_s=round(delay, 2))
        entry.retry_timer = asyncio.get_running_loop().call_later(delay, self._retry, entry)
        return True

    def _retry(self, entry: PendingSend) -> None:
        entry.retry_timer = None
        self.spawn(self.send_now(entry))

    def _settle(self, entry: PendingSend, error: ProtocolError, *, lapsed: bool = False) -> None:
        """A final answer other than ACCEPTED (though REPLAY of a re-sent envelope is one)."""
        with transaction(self._state, durable=False):
            if not self.outbox.refused(entry.msg_id, error):
                return
            stored = entry.accepted.exception() is None
            if not entry.reply:
                if stored:
                    self.sent.accepted(entry.msg_id)
                elif lapsed:
                    self.sent.lapsed(entry.msg_id)
                else:
                    self.sent.refused(entry.msg_id, error)
        if entry.reply:
            return
        if stored:
            self._stats.sent += 1
            return
        self._stats.refused += 1
        log.info("send_refused", msg_id=entry.msg_id.hex(), code=error.code.name,
                 detail=error.message)

    def _withdraw(self, entry: PendingSend) -> None:
        with transaction(self._state):
            self.outbox.discard(entry.msg_id)
            self.sent.withdrawn(entry.msg_id)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background until it ends or the device stops."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _log_unawaited_refusal(entry: PendingSend) -> Callable[[asyncio.Future[None]], None]:
    """Nobody awaits a reply or an entry loaded at start: log its final refusal."""
    def log_refusal(future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.warning("reply_refused" if entry.reply else "queued_message_refused",
                        msg_id=entry.msg_id.hex(),
                        error=describe(future.exception()))  # type: ignore[arg-type]
    return log_refusal
