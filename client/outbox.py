"""Envelopes sent but not yet ACCEPTED: kept until a relay answers, resent on every connection.

A connection can drop between SEND and ACCEPTED, so the relay may or may not
have stored the envelope.  Re-sending the *same bytes* on the next connection
makes that safe: if the first copy was stored, the relay's replay check
answers REPLAY, which for a re-sent envelope means "already stored" and is
treated as accepted.  A REPLAY on the first transmission is a real refusal
(the caller re-used an envelope) and is reported as such.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from proto import Envelope
from proto.errors import ProtocolError, ReplayError


@dataclass(eq=False)
class PendingSend:
    envelope: Envelope
    accepted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    transmissions: int = 0
    # The connection it was last written to, so one connection never sends it twice.
    sent_on: object | None = None


class Outbox:
    """Pending sends in the order they were made; answers resolve their futures."""

    def __init__(self) -> None:
        self._pending: OrderedDict[bytes, PendingSend] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, envelope: Envelope) -> PendingSend:
        entry = self._pending.get(envelope.msg_id)
        if entry is None:
            entry = self._pending[envelope.msg_id] = PendingSend(envelope)
        return entry

    def unsent_on(self, connection: object) -> list[PendingSend]:
        """Entries `connection` has not carried yet, oldest first."""
        return [entry for entry in self._pending.values() if entry.sent_on is not connection]

    def mark_sent(self, entry: PendingSend, connection: object) -> None:
        entry.sent_on = connection
        entry.transmissions += 1

    def accepted(self, msg_id: bytes) -> bool:
        entry = self._pending.pop(msg_id, None)
        if entry is None:
            return False
        if not entry.accepted.done():
            entry.accepted.set_result(None)
        return True

    def refused(self, msg_id: bytes, error: ProtocolError) -> bool:
        """Resolve `msg_id` with the relay's refusal (REPLAY after a re-send counts as accepted)."""
        entry = self._pending.get(msg_id)
        if entry is None:
            return False
        if isinstance(error, ReplayError) and entry.transmissions > 1:
            return self.accepted(msg_id)
        del self._pending[msg_id]
        if not entry.accepted.done():
            entry.accepted.set_exception(error)
        return True

    def discard(self, msg_id: bytes) -> None:
        """The caller stopped waiting: do not send it on later connections."""
        self._pending.pop(msg_id, None)
