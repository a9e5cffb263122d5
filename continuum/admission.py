"""Pure decision: may this envelope, from this authenticated connection, be stored?

No I/O here: the session calls it with the connection's key and the current
time, so every rule (origin, sender binding, TTL bound, clock skew, signature) is
tested without a socket.  Cheap checks run before the signature verify, so
garbage costs a decode and nothing more; the recipient point check (a scalar
multiplication per key unless remembered) runs after it, so only a sender
that proved its key can make the relay spend it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proto import Envelope, PublicKey
from proto.envelope import check_sent_by_device
from proto.errors import InvalidFieldError, StaleError, WrongSenderError

from .settings import Settings


def admit(envelope: Envelope, connection_key: PublicKey, now_ms: int, settings: Settings,
          observe_verify: Callable[[float], None] | None = None) -> None:
    """Return if the decoded envelope may be stored; else raise the ProtocolError saying why."""
    check_sent_by_device(envelope)
    if envelope.sender != connection_key:
        raise WrongSenderError(
            f"envelope sender {envelope.sender.text} is not this connection's key")
    if envelope.ttl_s > settings.max_ttl_s:
        raise InvalidFieldError(
            f"ttl {envelope.ttl_s}s exceeds this relay's limit of {settings.max_ttl_s}s")
    skew_ms = settings.max_skew_s * 1000
    if not now_ms - skew_ms <= envelope.created_at_ms <= now_ms + skew_ms:
        raise StaleError(
            f"created_at is {(envelope.created_at_ms - now_ms) / 1000:+.1f}s from relay time;"
            f" allowed skew is ±{settings.max_skew_s}s")
    if envelope.expires_at_ms <= now_ms:
        raise StaleError("envelope has already expired (created_at + ttl is in the past)")
    started = time.perf_counter()
    envelope.verify()
    if observe_verify is not None:
        observe_verify(time.perf_counter() - started)
    for recipient in envelope.recipient_keys:
        if not recipient.is_valid_point():
            raise InvalidFieldError(
                f"recipient {recipient.text} is not an Ed25519 public key: no device can read it")


def replay_until_ms(envelope: Envelope, settings: Settings) -> int:
    """How long the relay must remember (sender, msg_id).

    After created_at + skew the clock-skew check refuses the envelope anyway,
    so remembering it longer would only grow the store: together the two
    checks refuse a replay for the message's whole life.
    """
    return envelope.created_at_ms + settings.max_skew_s * 1000 + 1000
