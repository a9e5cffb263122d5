"""Sends awaiting ACCEPTED: re-sent per connection, REPLAY after a re-send means stored."""

from __future__ import annotations

import pytest

from client.outbox import Outbox
from proto import Identity, Kind, seal_envelope
from proto.errors import RateLimitedError, ReplayError

alice, bob = Identity.generate(), Identity.generate()


def envelope(text: bytes = b"x"):  # type: ignore[no-untyped-def]
    return seal_envelope(alice, Kind.DATA, [bob.public], text, ttl_s=60, now_ms=1_700_000_000_000)


async def test_each_connection_carries_each_pending_envelope_once_in_order() -> None:
    outbox = Outbox()
    first, second = outbox.add(envelope(b"1")), outbox.add(envelope(b"2"))
    connection_a, connection_b = object(), object()
    assert outbox.unsent_on(connection_a) == [first, second]
    outbox.mark_sent(first, connection_a)
    assert outbox.unsent_on(connection_a) == [second]
    assert outbox.unsent_on(connection_b) == [first, second]  # a new connection re-sends both
    outbox.mark_sent(first, connection_b)
    assert first.transmissions == 2


async def test_adding_the_same_envelope_twice_keeps_one_entry() -> None:
    outbox, sealed = Outbox(), envelope()
    assert outbox.add(sealed) is outbox.add(sealed) and len(outbox) == 1


async def test_accepted_resolves_and_removes() -> None:
    outbox, sealed = Outbox(), envelope()
    entry = outbox.add(sealed)
    assert outbox.accepted(sealed.msg_id)
    assert entry.accepted.done() and entry.accepted.result() is None and len(outbox) == 0
    assert not outbox.accepted(sealed.msg_id)  # a late duplicate answer changes nothing


async def test_replay_after_a_resend_counts_as_accepted() -> None:
    outbox, sealed = Outbox(), envelope()
    entry = outbox.add(sealed)
    outbox.mark_sent(entry, object())
    outbox.mark_sent(entry, object())  # the connection dropped before ACCEPTED came back
    outbox.refused(sealed.msg_id, ReplayError("seen"))
    assert entry.accepted.result() is None and len(outbox) == 0


async def test_replay_on_the_first_transmission_is_a_refusal() -> None:
    outbox, sealed = Outbox(), envelope()
    entry = outbox.add(sealed)
    outbox.mark_sent(entry, object())
    outbox.refused(sealed.msg_id, ReplayError("seen"))
    with pytest.raises(ReplayError):
        entry.accepted.result()


async def test_other_refusals_raise_the_proto_exception_and_stop_resending() -> None:
    outbox, sealed = Outbox(), envelope()
    entry = outbox.add(sealed)
    outbox.mark_sent(entry, object())
    outbox.mark_sent(entry, object())
    outbox.refused(sealed.msg_id, RateLimitedError("slow down"))
    with pytest.raises(RateLimitedError, match="slow down"):
        entry.accepted.result()
    assert outbox.unsent_on(object()) == []


async def test_discarded_envelope_is_not_sent_again() -> None:
    outbox, sealed = Outbox(), envelope()
    outbox.add(sealed)
    outbox.discard(sealed.msg_id)
    assert outbox.unsent_on(object()) == []
