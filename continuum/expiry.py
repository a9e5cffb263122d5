"""Expire messages whose TTL passed and tell their senders, through their own mailboxes.

Every replica runs this loop; `take_expired` hands each expired entry to
exactly one of them, so a sender gets one notice per (message, recipient).
The notice is an ordinary envelope signed by the relay key and sealed to the
sender, so it waits for an offline sender like any other message.
"""

from __future__ import annotations

import asyncio

from proto import Kind, seal_envelope
from proto.errors import ProtocolError
from proto.payloads import ExpiryNotice
from runtime.clock import now_ms

from .admission import replay_until_ms
from .context import RelayContext
from .store import ExpiredMessage

_BATCH = 500


async def expire_forever(relay: RelayContext) -> None:
    """Sweep every `sweep_interval_s`; a store outage is logged and retried, never fatal."""
    while True:
        try:
            await expire_due(relay)
        except ProtocolError as exc:
            relay.log.warning("expiry_sweep_failed", error=exc.message)
        await asyncio.sleep(relay.settings.sweep_interval_s)


async def expire_due(relay: RelayContext) -> int:
    """Expire everything due now; returns how many messages expired."""
    total = 0
    while True:
        expired = await relay.store.take_expired(now_ms(), _BATCH)
        for message in expired:
            relay.metrics.expired.inc()
            if message.kind is not Kind.EXPIRY:  # a notice about a notice helps no one
                await _notify_sender(relay, message)
        total += len(expired)
        if len(expired) < _BATCH:
            return total


async def _notify_sender(relay: RelayContext, message: ExpiredMessage) -> None:
    notice = seal_envelope(
        relay.identity, Kind.EXPIRY, [message.sender],
        ExpiryNotice(message.msg_id, message.recipient).encode(),
        ttl_s=relay.settings.max_ttl_s, now_ms=now_ms(), limits=relay.settings.limits)
    try:
        await relay.store.accept(notice, replay_until_ms=replay_until_ms(notice, relay.settings),
                                 limits=relay.mailbox_limits)
    except ProtocolError as exc:
        relay.metrics.expiry_notices_dropped.inc()
        relay.log.warning("expiry_notice_dropped", sender=message.sender.text, error=exc.message)
