"""What became of the messages this device sent: the relay's answer, then each recipient's fate.

A relay's ACCEPTED only says the envelope is stored.  What a sender wants to
know is whether each recipient *read* it: a signed RECEIPT from the recipient
proves that, a relay EXPIRY notice says it never will.  `SentLog` follows
each message from the moment it is queued and routes both kinds of news to
it.

With a `DeviceState` every message and every piece of news is written to the
state file, so a receipt or an expiry notice that arrives after a restart
still finds its message, and `continuum-client outbox` lists them all; a
message is kept until its receipts can no longer arrive (expiry + ttl + skew,
a receipt lives as long as the message) and at most `capacity` of them.
Without one, the last `capacity` messages of this run are remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from proto import Envelope, ProtocolError, PublicKey

from .freshness import CLOCK_SKEW_MS
from .state import DeviceState


class DeliveryStatus(StrEnum):
    """One recipient's fate."""

    PENDING = "pending"  # no news yet
    DELIVERED = "delivered"  # its signed receipt arrived: it decrypted the message
    EXPIRED = "expired"  # the relay expired it unread, or it never left this device in time


class SendState(StrEnum):
    """The relays' answer to the message as a whole."""

    QUEUED = "queued"  # durable here, no relay has accepted it yet
    ACCEPTED = "accepted"  # a relay stored it
    REFUSED = "refused"  # a relay refused it for good (`error` says why)
    EXPIRED = "expired"  # its TTL passed before any relay accepted it
    WITHDRAWN = "withdrawn"  # the sender gave up before any relay answered (one may hold it)


def changes(current: DeliveryStatus, news: DeliveryStatus) -> bool:
    """Whether `news` about a recipient replaces `current`.

    A receipt is proof of reading, so DELIVERED is final and overrides an
    earlier EXPIRED (a relay may expire one copy while another was read).
    """
    return current is not DeliveryStatus.DELIVERED and current is not news


class Outgoing:
    """One message sent and what each of its recipients did with it."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.state = SendState.QUEUED
        self.error: str | None = None
        # What a receipt names (`Envelope.content_hash`): one per sealing of this msg_id.
        self.content_hashes = {envelope.content_hash()}
        self._statuses = {key: DeliveryStatus.PENDING for key in envelope.recipient_keys}
        self._settled = asyncio.Event()

    @property
    def msg_id(self) -> bytes:
        return self.envelope.msg_id

    @property
    def statuses(self) -> dict[PublicKey, DeliveryStatus]:
        return dict(self._statuses)

    def record(self, recipient: PublicKey, status: DeliveryStatus) -> bool:
        """Note news about `recipient`; False if it changes nothing (see `changes`)."""
        current = self._statuses.get(recipient)
        if current is None or not changes(current, status):
            return False
        self._statuses[recipient] = status
        if DeliveryStatus.PENDING not in self._statuses.values():
            self._settled.set()
        return True

    async def wait_receipts(self, timeout: float) -> dict[PublicKey, DeliveryStatus]:
        """Wait until no recipient is pending, or `timeout` seconds; return the statuses."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        return self.statuses


@dataclass(frozen=True)
class SentMessage:
    """A row of the sent-message listing."""

    msg_id: bytes
    created_at_ms: int
    expires_at_ms: int
    state: SendState
    error: str | None
    recipients: dict[PublicKey, DeliveryStatus]


class SentLog:
    """Messages sent, by msg_id, for matching receipts and expiries (see the module docstring)."""

    def __init__(self, capacity: int = 10_000, state: DeviceState | None = None) -> None:
        self.capacity = capacity
        self._state = state
        self._sent: OrderedDict[bytes, Outgoing] = OrderedDict()

    def track(self, envelope: Envelope) -> Outgoing:
        outgoing = self._sent.get(envelope.msg_id)
        if outgoing is None:
            outgoing = self._sent[envelope.msg_id] = Outgoing(envelope)
            while len(self._sent) > self.capacity:
                self._sent.popitem(last=False)
        if self._state is not None:
            self._state.track_sent(
                envelope.msg_id, envelope.created_at_ms, envelope.expires_at_ms,
                envelope.expires_at_ms + envelope.ttl_s * 1000 + CLOCK_SKEW_MS,
                SendState.QUEUED.value,
                {key.raw: DeliveryStatus.PENDING.value for key in envelope.recipient_keys},
                envelope.content_hash())
        return outgoing

    def __contains__(self, pair: object) -> bool:
        """(msg_id, key): did we send msg_id to key (and still remember it)?"""
        if not isinstance(pair, tuple) or len(pair) != 2 or not isinstance(pair[1], PublicKey):
            return False
        msg_id, key = pair
        outgoing = self._sent.get(msg_id)
        if outgoing is not None:
            return key in outgoing.envelope.recipient_keys
        return self._state is not None and self._state.recipient_status(msg_id, key.raw) is not None

    def expires_at(self, msg_id: bytes) -> int | None:
        """When the message `msg_id` expires (None: not one we remember sending)."""
        outgoing = self._sent.get(msg_id)
        if outgoing is not None:
            return outgoing.envelope.expires_at_ms
        return self._state.sent_expires_at(msg_id) if self._state is not None else None

    def accepted(self, msg_id: bytes) -> None:
        self._settle(msg_id, SendState.ACCEPTED, None)

    def refused(self, msg_id: bytes, error: ProtocolError) -> None:
        self._settle(msg_id, SendState.REFUSED, f"{error.code.name}: {error.message}")

    def withdrawn(self, msg_id: bytes) -> None:
        self._settle(msg_id, SendState.WITHDRAWN, None)

    def lapsed(self, msg_id: bytes) -> None:
        """Its TTL passed before any relay accepted it: no recipient will ever read it."""
        self._settle(msg_id, SendState.EXPIRED, None)
        outgoing = self._sent.get(msg_id)
        if outgoing is not None:
            keys = list(outgoing.envelope.recipient_keys)
        else:
            keys = [PublicKey(raw) for raw in self._state.recipients(msg_id)] if self._state else []
        for key in keys:
            self.record(msg_id, key, DeliveryStatus.EXPIRED)

    def sealed_as(self, msg_id: bytes) -> frozenset[bytes] | None:
        """The content hashes a receipt for `msg_id` may name: one per time it was sealed
        (None: not a message we still track)."""
        outgoing = self._sent.get(msg_id)
        if outgoing is not None:
            return frozenset(outgoing.content_hashes)
        hashes = self._state.content_hashes(msg_id) if self._state is not None else []
        return frozenset(hashes) if hashes else None

    def resealed(self, envelope: Envelope) -> None:
        """`envelope` is a message sealed again (same msg_id): a receipt may name either copy."""
        outgoing = self._sent.get(envelope.msg_id)
        if outgoing is not None:
            outgoing.content_hashes.add(envelope.content_hash())
        if self._state is not None:
            self._state.add_content_hash(envelope.msg_id, envelope.content_hash())

    def record(self, msg_id: bytes, recipient: PublicKey, status: DeliveryStatus) -> bool:
        """Note news about one recipient; False if it changes nothing or the message is unknown."""
        outgoing = self._sent.get(msg_id)
        if outgoing is not None:
            changed = outgoing.record(recipient, status)
        elif self._state is not None:
            current = self._state.recipient_status(msg_id, recipient.raw)
            changed = current is not None and changes(DeliveryStatus(current), status)
        else:
            changed = False
        if changed and self._state is not None:
            self._state.set_recipient_status(msg_id, recipient.raw, status.value)
        return changed

    def history(self) -> list[SentMessage]:
        """Every message still remembered, oldest first."""
        if self._state is None:
            return [SentMessage(o.msg_id, o.envelope.created_at_ms, o.envelope.expires_at_ms,
                                o.state, o.error, o.statuses)
                    for o in self._sent.values()]
        return [SentMessage(row.msg_id, row.created_at_ms, row.expires_at_ms,
                            SendState(row.state), row.error,
                            {PublicKey(key): DeliveryStatus(status)
                             for key, status in sorted(row.recipients.items())})
                for row in self._state.sent_rows()]

    def _settle(self, msg_id: bytes, state: SendState, error: str | None) -> None:
        outgoing = self._sent.get(msg_id)
        if outgoing is not None:
            outgoing.state, outgoing.error = state, error
        if self._state is not None:
            self._state.set_sent_state(msg_id, state.value, error)
