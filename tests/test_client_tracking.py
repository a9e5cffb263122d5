"""Per-recipient delivery status of sent messages: receipts, expiry notices, waiting."""

from __future__ import annotations

import asyncio

from client.tracking import DeliveryStatus, SentLog
from proto import Identity, Kind, seal_envelope

alice, bob, carol, mallory = (Identity.generate() for _ in range(4))


def envelope():  # type: ignore[no-untyped-def]
    return seal_envelope(alice, Kind.DATA, [bob.public, carol.public], b"x", ttl_s=60,
                         now_ms=1_700_000_000_000)


async def test_statuses_start_pending_and_follow_receipts_and_expiries() -> None:
    log, sealed = SentLog(), envelope()
    outgoing = log.track(sealed)
    assert outgoing.statuses == {bob.public: DeliveryStatus.PENDING,
                                 carol.public: DeliveryStatus.PENDING}
    assert log.record(sealed.msg_id, bob.public, DeliveryStatus.DELIVERED)
    assert log.record(sealed.msg_id, carol.public, DeliveryStatus.EXPIRED)
    assert outgoing.statuses == {bob.public: DeliveryStatus.DELIVERED,
                                 carol.public: DeliveryStatus.EXPIRED}


async def test_a_receipt_beats_an_expiry_but_not_the_other_way_round() -> None:
    log, sealed = SentLog(), envelope()
    outgoing = log.track(sealed)
    log.record(sealed.msg_id, bob.public, DeliveryStatus.EXPIRED)
    log.record(sealed.msg_id, bob.public, DeliveryStatus.DELIVERED)
    log.record(sealed.msg_id, carol.public, DeliveryStatus.DELIVERED)
    assert not log.record(sealed.msg_id, carol.public, DeliveryStatus.EXPIRED)
    assert set(outgoing.statuses.values()) == {DeliveryStatus.DELIVERED}


async def test_news_about_strangers_or_unknown_messages_changes_nothing() -> None:
    log, sealed = SentLog(), envelope()
    outgoing = log.track(sealed)
    assert not log.record(sealed.msg_id, mallory.public, DeliveryStatus.DELIVERED)
    assert not log.record(b"?" * 16, bob.public, DeliveryStatus.DELIVERED)
    assert set(outgoing.statuses.values()) == {DeliveryStatus.PENDING}
    assert (sealed.msg_id, bob.public) in log and (sealed.msg_id, mallory.public) not in log


async def test_wait_receipts_returns_as_soon_as_all_settle() -> None:
    log, sealed = SentLog(), envelope()
    outgoing = log.track(sealed)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, log.record, sealed.msg_id, bob.public, DeliveryStatus.DELIVERED)
    loop.call_later(0.05, log.record, sealed.msg_id, carol.public, DeliveryStatus.DELIVERED)
    started = loop.time()
    statuses = await outgoing.wait_receipts(timeout=10)
    assert loop.time() - started < 5
    assert set(statuses.values()) == {DeliveryStatus.DELIVERED}


async def test_wait_receipts_reports_pending_at_the_timeout() -> None:
    log, sealed = SentLog(), envelope()
    outgoing = log.track(sealed)
    log.record(sealed.msg_id, bob.public, DeliveryStatus.DELIVERED)
    statuses = await outgoing.wait_receipts(timeout=0.05)
    assert statuses == {bob.public: DeliveryStatus.DELIVERED, carol.public: DeliveryStatus.PENDING}


async def test_the_log_forgets_its_oldest_messages_beyond_capacity() -> None:
    log = SentLog(capacity=2)
    first, second, third = envelope(), envelope(), envelope()
    for sealed in (first, second, third):
        log.track(sealed)
    assert (first.msg_id, bob.public) not in log
    assert (third.msg_id, bob.public) in log and (second.msg_id, bob.public) in log
