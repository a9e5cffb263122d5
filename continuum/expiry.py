"""Expire messages whose TTL passed and tell their senders, through their own mailboxes.

Every replica runs this loop; `take_expired` hands each expired entry to
exactly one of them, so a sender hears of each (message, recipient) once.
The notice is an ordinary envelope signed by the relay key and sealed to the
sender, so it waits for an offline sender like any other message.

A storm (thousands of messages to many recipients expiring together) must
not freeze the relay: the entries of one sweep step are grouped by sender
into batched notices (one signature per up to MAX_EXPIRY_ENTRIES entries, not
one per entry), and the sweep yields to the event loop after every step and
every notice, so WebSocket traffic and /healthz are served throughout.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from proto import Kind, Origin, PublicKey, seal_envelope
from proto.errors import ProtocolError
from proto.payloads import EXPIRY_ENTRY_BYTES, MAX_EXPIRY_ENTRIES, ExpiryNotice
from runtime.clock import now_ms

from .admission import replay_until_ms
from .context import RelayContext

# Entries taken from the store per step: about 3 ms of work, so a request waiting behind a
# storm (a few loop turns to be read, handled and answered) waits milliseconds, not seconds.
_STEP = 100
# Bytes of a one-recipient EXPIRY envelope around its entries (header, wrap, nonce,
# tag, signature), with room to spare.
_NOTICE_OVERHEAD_BYTES = 512


async def expire_forever(relay: RelayContext) -> None:
    """Sweep every `sweep_interval_s`; a store outage is logged and retried, never fatal."""
    while True:
        try:
            await expire_due(relay)
        except ProtocolError as exc:
            relay.log.warning("expiry_sweep_failed", error=exc.message)
        await asyncio.sleep(relay.settings.sweep_interval_s)


async def expire_due(relay: RelayContext) -> int:
    """Expire everything due now, one bounded step per loop turn; returns how many expired."""
    total = 0
    while True:
        expired = await relay.store.take_expired(now_ms(), _STEP)
        by_sender: defaultdict[PublicKey, list[tuple[bytes, PublicKey]]] = defaultdict(list)
        for message in expired:
            relay.metrics.expired.inc()
            if message.origin is Origin.DEVICE:  # a notice about a notice helps no one
                by_sender[message.sender].append((message.msg_id, message.recipient))
        for sender, entries in by_sender.items():
            per_notice = entries_per_notice(relay.settings.max_envelope_bytes)
            for start in range(0, len(entries), per_notice):
                await _notify_sender(relay, sender, entries[start:start + per_notice])
                await asyncio.sleep(0)
        total += len(expired)
        if len(expired) < _STEP:
            return total
        await asyncio.sleep(0)


def entries_per_notice(max_envelope_bytes: int) -> int:
    """As many entries as fit one envelope under this relay's limit (at least one)."""
    room = (max_envelope_bytes - _NOTICE_OVERHEAD_BYTES) // EXPIRY_ENTRY_BYTES
    return max(1, min(MAX_EXPIRY_ENTRIES, room))


async def _notify_sender(relay: RelayContext, sender: PublicKey,
                         entries: list[tuple[bytes, PublicKey]]) -> None:
    notice = seal_envelope(
        relay.identity, Kind.EXPIRY, [sender], ExpiryNotice(tuple(entries)).encode(),
        ttl_s=relay.settings.max_ttl_s, now_ms=now_ms(), limits=relay.settings.limits)
    try:
        await relay.store.accept(notice, replay_until_ms=replay_until_ms(notice, relay.settings),
                                 limits=relay.unmetered_mailbox_limits)
    except ProtocolError as exc:
        relay.metrics.expiry_notices_dropped.inc(len(entries))
        relay.log.warning("expiry_notice_dropped", sender=sender.text, entries=len(entries),
                          error=exc.message)
