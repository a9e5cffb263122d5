"""Envelopes not yet ACCEPTED: kept until a relay answers for good, resent on every connection.

A connection can drop between SEND and ACCEPTED, so the relay may or may not
have stored the envelope.  Re-sending the *same bytes* on the next connection
makes that safe: if the first copy was stored, the relay's replay check
answers REPLAY, which for a re-sent envelope means "already stored" and is
treated as accepted.  A REPLAY on the first transmission is a real refusal
(the caller re-used an envelope) and is reported as such.

With a `DeviceState` every entry is in the state file before `add` returns,
and a restart loads them again: each counts as possibly sent already (the
last run may have written it just before it died), so REPLAY means stored.

Two rules keep an entry sendable for its whole TTL, not just for the
relay's ±300 s clock window:
- transient refusals (`is_transient`: the relay or its store is busy or
  full) leave the entry in place, to be sent again later (`sending`);
- an entry the device sealed itself (its plaintext is kept) is sealed again
  once its `created_at` nears the edge of that window (`needs_renewal`),
  with the same msg_id and no later expiry, so a copy a relay may already
  hold is answered REPLAY and recipients de-duplicate any second copy.
An envelope sealed elsewhere (`send_envelope`) is only ever sent as it is.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from proto import Envelope, ErrorCode, Identity, Kind, Limits, decode_envelope, seal_envelope
from proto.errors import ProtocolError, ReplayError

from .backoff import Backoff
from .freshness import CLOCK_SKEW_MS
from .state import DeviceState, StoredSend

# Refusals that mean "retry later" (SPEC §9/§10): nothing was stored, the same envelope may
# be sent again.  Every other refusal is final for that envelope.
TRANSIENT = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.MAILBOX_FULL,
                       ErrorCode.STORE_UNAVAILABLE, ErrorCode.QUOTA_EXCEEDED,
                       ErrorCode.ACCESS_LIST_UNAVAILABLE})
# Seal again this long after created_at: a minute inside the relay's clock window.
RENEW_AFTER_MS = CLOCK_SKEW_MS - 60_000


def is_transient(error: ProtocolError) -> bool:
    return error.code in TRANSIENT


@dataclass(eq=False)
class PendingSend:
    envelope: Envelope
    # What was sealed, to seal it again later; None for an envelope sealed elsewhere.
    plaintext: bytes | None = None
    # A protocol reply (a receipt): nobody awaits it, nobody tracks it.  With the
    # plaintext it is also the kind the device sealed (`sealed_kind`): the envelope
    # cannot say, its kind is inside the ciphertext.
    reply: bool = False
    accepted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    transmissions: int = 0
    # The connection it was last written to, so one connection never sends it twice.
    sent_on: object | None = None
    # Delays between retries after transient refusals, and the pending retry.
    retry_backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 30.0))
    retry_timer: asyncio.TimerHandle | None = None
    # What the device sealed, when neither DATA nor RECEIPT (a transfer's manifest or chunk).
    kind: Kind | None = None

    @property
    def msg_id(self) -> bytes:
        return self.envelope.msg_id

    @property
    def sealed_kind(self) -> Kind:
        """What the device sealed `plaintext` as: `kind` if given, else its reply (a receipt)
        or the application's DATA; whatever else it sends was sealed elsewhere."""
        if self.kind is not None:
            return self.kind
        return Kind.RECEIPT if self.reply else Kind.DATA


class Outbox:
    """Pending sends in the order they were made; answers resolve their futures."""

    def __init__(self, state: DeviceState | None = None) -> None:
        self._state = state
        self._pending: OrderedDict[bytes, PendingSend] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._pending

    def get(self, msg_id: bytes) -> PendingSend | None:
        return self._pending.get(msg_id)

    def entries(self) -> list[PendingSend]:
        return list(self._pending.values())

    def add(self, envelope: Envelope, *, plaintext: bytes | None = None,
            reply: bool = False, kind: Kind | None = None) -> PendingSend:
        """Hold `envelope` until answered; durable in the state file (if any) on return.

        `reply`: nobody tracks it in the sent log (a receipt, or a transfer's chunk, whose
        one receipt is its manifest's); `kind`: what was sealed, if neither DATA nor RECEIPT.
        """
        entry = self._pending.get(envelope.msg_id)
        if entry is None:
            if self._state is not None:
                self._state.put_outgoing(envelope.msg_id, StoredSend(
                    envelope.raw, plaintext, reply, None if kind is None else int(kind)))
            entry = self._pending[envelope.msg_id] = PendingSend(envelope, plaintext, reply,
                                                                 kind=kind)
            entry.accepted.add_done_callback(_retrieve)
        return entry

    def load(self) -> list[PendingSend]:
        """Take in the entries a previous run left in the state file; return them."""
        loaded = []
        for stored in self._state.outgoing() if self._state is not None else ():
            envelope = decode_envelope(stored.envelope,
                                       Limits(max_envelope_bytes=len(stored.envelope)))
            if envelope.msg_id in self._pending:
                continue
            entry = PendingSend(envelope, stored.plaintext, stored.reply, transmissions=1,
                                kind=None if stored.kind is None else Kind(stored.kind))
            entry.accepted.add_done_callback(_retrieve)
            self._pending[envelope.msg_id] = entry
            loaded.append(entry)
        return loaded

    def unsent_on(self, connection: object) -> list[PendingSend]:
        """Entries `connection` has not carried yet, oldest first."""
        return [entry for entry in self._pending.values() if entry.sent_on is not connection]

    def mark_sent(self, entry: PendingSend, connection: object) -> None:
        entry.sent_on = connection
        entry.transmissions += 1

    def renew(self, entry: PendingSend, envelope: Envelope) -> None:
        """`envelope` (same msg_id, sealed again) replaces the entry's bytes from now on."""
        if self._state is not None:
            self._state.replace_outgoing(entry.msg_id, envelope.raw)
        entry.envelope = envelope

    def accepted(self, msg_id: bytes) -> bool:
        entry = self._remove(msg_id)
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
        self._remove(msg_id)
        if not entry.accepted.done():
            entry.accepted.set_exception(error)
        return True

    def discard(self, msg_id: bytes) -> None:
        """The caller withdrew it: do not send it on later connections (nor after a restart)."""
        self._remove(msg_id)

    def _remove(self, msg_id: bytes) -> PendingSend | None:
        entry = self._pending.pop(msg_id, None)
        if entry is not None:
            if entry.retry_timer is not None:
                entry.retry_timer.cancel()
            if self._state is not None:
                self._state.remove_outgoing(msg_id)
        return entry


def needs_renewal(entry: PendingSend, now_ms: int) -> bool:
    """Would the relay soon refuse these bytes as STALE, and can the device seal them again?"""
    return entry.plaintext is not None and now_ms - entry.envelope.created_at_ms > RENEW_AFTER_MS


def renewed(entry: PendingSend, identity: Identity, now_ms: int,
            limits: Limits) -> Envelope | None:
    """The entry sealed again at `now_ms` with its msg_id and at most its expiry; None once
    its TTL has passed."""
    assert entry.plaintext is not None
    old = entry.envelope
    ttl_s = (old.expires_at_ms - now_ms) // 1000
    if ttl_s < 1:
        return None
    envelope = seal_envelope(identity, entry.sealed_kind, list(old.recipient_keys),
                             entry.plaintext, ttl_s=ttl_s, now_ms=now_ms, limits=limits,
                             random_bytes=_first_draw(old.msg_id))
    if envelope.msg_id != old.msg_id:  # proto drew something else first: never send that
        raise RuntimeError("seal_envelope no longer draws the msg_id first")
    return envelope


def _first_draw(msg_id: bytes) -> Callable[[int], bytes]:
    """Random bytes whose first draw is `msg_id` (seal_envelope's first draw is the msg_id)."""
    drawn = False

    def random_bytes(count: int) -> bytes:
        nonlocal drawn
        if drawn:
            return os.urandom(count)
        drawn = True
        return msg_id

    return random_bytes


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a refusal retrieved: an entry may have no waiter (a reply, one loaded at start, a
    caller that timed out), and the device reports refusals itself."""
    if not future.cancelled():
        future.exception()
