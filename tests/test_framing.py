"""`FramingBudget`: honest framing never reaches the bound; empty fragments soon do."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from continuum.framing import BEFORE_HELLO_BYTES, FRAMING_PER_MESSAGE, FramingBudget

MAX_MESSAGE = 2 * (64 * 1024 + 512)


def _header(size: int) -> int:
    """A masked client frame's header bytes for a payload of `size` (RFC 6455 §5.2)."""
    return 6 if size < 126 else 8 if size < 65536 else 14


@given(st.lists(st.tuples(st.integers(0, MAX_MESSAGE), st.integers(1, 4),
                          st.integers(1, 65536)), max_size=60))
def test_honest_messages_in_up_to_four_fragments_never_reach_the_bound(messages) -> None:
    """Each message: its payload in 1-4 frames, read in chunks of any size, then taken by
    the session before the next (the session reads as it goes)."""
    budget = FramingBudget()
    budget.authenticated(MAX_MESSAGE)
    for payload, fragments, chunk in messages:
        cut = -(-payload // fragments) or 1
        wire = sum(_header(len(part)) + len(part) for part in
                   (range(payload)[i:i + cut] for i in range(0, payload, cut))) or _header(0)
        for start in range(0, wire, chunk):
            assert budget.read(min(chunk, wire - start))
        budget.taken(payload)


def test_before_hello_a_few_pings_pass_and_a_stream_of_empty_fragments_does_not() -> None:
    budget = FramingBudget()
    for _ in range(8):  # PINGs answered before HELLO, each taken
        assert budget.read(6 + 125)
        budget.taken(125)
    assert budget.read(_header(300) + 300)  # the HELLO
    budget.taken(300)
    flood = FramingBudget()
    sent = 0
    while flood.read(6):
        sent += 6
    assert BEFORE_HELLO_BYTES - 6 <= sent <= BEFORE_HELLO_BYTES


def test_a_message_taken_pays_for_a_few_fragments_only() -> None:
    """Fragments riding along with messages the session takes: each message pays back its
    payload and FRAMING_PER_MESSAGE bytes, so empty fragments beyond about ten a message
    add up to the bound however many messages come."""
    budget = FramingBudget(limit=10_000)
    spent_per_message = 6 * 30 + 6 + 100  # 30 empty fragments, then a 100-byte message
    messages = 0
    while budget.read(spent_per_message):
        budget.taken(100)
        messages += 1
    assert messages <= 10_000 // (spent_per_message - 100 - FRAMING_PER_MESSAGE) + 1
