"""Per-recipient fate of the messages this device sent: delivered, expired or pending.

A relay's ACCEPTED only says the envelope is stored.  What a sender wants to
know is whether each recipient *read* it: a signed RECEIPT from the recipient
proves that, a relay EXPIRY notice says it never will.  `SentLog` keeps the
last messages sent (bounded, so a long-running device stays small) and
routes both kinds of news to the matching `Outgoing`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from enum import StrEnum

from proto import Envelope, PublicKey


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    EXPIRED = "expired"


class Outgoing:
    """One accepted envelope and what each of its recipients did with it."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self._statuses = {key: DeliveryStatus.PENDING for key in envelope.recipient_keys}
        self._settled = asyncio.Event()

    @property
    def msg_id(self) -> bytes:
        return self.envelope.msg_id

    @property
    def statuses(self) -> dict[PublicKey, DeliveryStatus]:
        return dict(self._statuses)

    def record(self, recipient: PublicKey, status: DeliveryStatus) -> bool:
        """Note news about `recipient`; False if it changes nothing.

        A receipt is proof of reading, so DELIVERED is final and overrides an
        earlier EXPIRED (a relay may expire one copy while another was read).
        """
        current = self._statuses.get(recipient)
        if current is None or current is DeliveryStatus.DELIVERED or current is status:
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


class SentLog:
    """The last `capacity` messages sent, by msg_id, for matching receipts and expiries."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._sent: OrderedDict[bytes, Outgoing] = OrderedDict()

    def track(self, envelope: Envelope) -> Outgoing:
        outgoing = self._sent.get(envelope.msg_id)
        if outgoing is None:
            outgoing = self._sent[envelope.msg_id] = Outgoing(envelope)
            while len(self._sent) > self._capacity:
                self._sent.popitem(last=False)
        return outgoing

    def __contains__(self, pair: object) -> bool:
        """(msg_id, key): did we send msg_id to key (and still remember it)?"""
        if not isinstance(pair, tuple) or len(pair) != 2:
            return False
        outgoing = self._sent.get(pair[0])
        return outgoing is not None and pair[1] in outgoing.envelope.recipient_keys

    def content_hash_of(self, msg_id: bytes) -> bytes | None:
        """What a receipt for `msg_id` must name (None: not a message we still track)."""
        outgoing = self._sent.get(msg_id)
        return outgoing.envelope.content_hash() if outgoing is not None else None

    def record(self, msg_id: bytes, recipient: PublicKey, status: DeliveryStatus) -> bool:
        outgoing = self._sent.get(msg_id)
        return outgoing is not None and outgoing.record(recipient, status)
