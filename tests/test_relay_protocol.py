"""The relay's protocol object, driven frame by frame without a socket or a store.

Each test plays the shell: it feeds bytes in, performs (by hand) the store
call the protocol asks for, reports the result, and asserts on the frames
the protocol wants written.  After the handshake it also plays the device's
end of the sealed channel (`Conversation`).  The socket-level behaviour of
the same rules is covered by tests/test_relay.py.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from continuum.access import AccessControl
from continuum.connection_gate import AddressBudget, ConnectionGate
from continuum.metrics import RelayMetrics
from continuum.protocol import (CLOSE_INTERNAL_ERROR, CLOSE_NORMAL, CLOSE_POLICY_VIOLATION,
                                MAX_CONTROL_BEFORE_HELLO, MIN_READ_PAUSE_S, Authenticated,
                                CheckRate, Fetch, Phase, RelayProtocol, RemoveDelivered,
                                StoreEnvelope)
from continuum.settings import Settings
from continuum.streams.table import Address, ToPeer
from continuum.store import NewEntry, StoredMessage
from proto import Identity, Kind, seal_envelope
from proto.access import AccessList
from proto.errors import ErrorCode, MailboxFullError, RevokedError, StoreUnavailableError
from proto.frames import (Accepted, Ack, Deliver, Error, Frame, Hello, Send, StreamAbort,
                          StreamAccept, StreamCredit, StreamData, StreamFrame, decode_frame,
                          encode_frame)
from proto.channel import ChannelKeys
from proto.handshake import ephemeral_keypair
from proto_support import ALICE, BOB, MALLORY, identity
from gate_support import Recorder
from wire import device_handshake

RELAY = identity("relay")
ORACLE = identity("oracle")
NOW = 1_700_000_000_000
WINDOW = 4
MAX = 1 << 20


def access(revoked: frozenset = frozenset()) -> AccessControl:
    """A relay's access control with the oracle's signed list applied (no polling):
    alice and bob enrolled in one peer group."""
    control = AccessControl(Settings(oracle_url="http://oracle.invalid",
                                     oracle_key=ORACLE.public.text),
                            RelayMetrics(), structlog.get_logger("test"))
    # Valid by the real clock, which the relay's access control reads.
    control.apply(AccessList(1, 1, NOW, time.time_ns() // 1_000_000 + 3_600_000, ORACLE.public,
                             {ALICE.public: frozenset({0}), BOB.public: frozenset({0})},
                             revoked).sign(ORACLE))
    return control


def gate(settings: Settings) -> ConnectionGate:
    return ConnectionGate(
        max_pending_per_address=settings.max_pending_handshakes_per_address,
        max_per_address=settings.max_connections_per_address,
        max_per_key=settings.max_connections_per_key,
        unknown_key_rate_per_s=settings.unknown_key_rate_per_s,
        unknown_key_burst=settings.unknown_key_burst, known_keys=settings.known_keys)


def new_protocol(*, control: AccessControl | None = None, budget: AddressBudget | None = None,
                 **overrides) -> RelayProtocol:
    settings = Settings(delivery_window=WINDOW, **overrides)
    return RelayProtocol(RELAY, settings, control or access(),
                         budget or AddressBudget(gate(settings), "192.0.2.1"), RelayMetrics(),
                         structlog.get_logger("test"), relay_nonce=os.urandom(32),
                         ephemeral_seed=os.urandom(32))


class Conversation:
    """An authenticated protocol, and the device's end of its sealed channel: `receive`
    seals what the test sends, `frames` opens what the relay wants written.  Every other
    attribute is the protocol's."""

    def __init__(self, protocol: RelayProtocol, channel: ChannelKeys) -> None:
        self.protocol = protocol
        self.sealer, self.opener = channel.for_device()

    def receive(self, data: bytes, now_ms: int = NOW) -> object:
        return self.protocol.receive(self.sealer.seal(data), now_ms)

    def opened(self) -> list[bytes]:
        return [self.opener.open(data) for data in self.protocol.data_to_send()]

    def __getattr__(self, name: str) -> object:
        return getattr(self.protocol, name)


def frames(protocol: RelayProtocol | Conversation) -> list[Frame]:
    """What the relay wants written: in the clear during the handshake, opened after it."""
    out = (protocol.opened() if isinstance(protocol, Conversation)
           else protocol.data_to_send())
    return [decode_frame(data, MAX) for data in out]


def authenticated(device: Identity = ALICE, **overrides) -> Conversation:
    protocol = new_protocol(**overrides)
    handshake = device_handshake(device)
    hello = handshake.receive_challenge(protocol.data_to_send()[0])
    assert protocol.receive(hello, NOW) == Authenticated(device.public)
    terms = handshake.receive_welcome(protocol.data_to_send()[0])
    return Conversation(protocol, terms.channel)


def send_frame(sender: Identity = ALICE, created_at_ms: int = NOW) -> tuple[bytes, bytes]:
    envelope = seal_envelope(sender, Kind.DATA, [BOB.public], b"hi", ttl_s=60,
                             now_ms=created_at_ms)
    return encode_frame(Send(envelope.raw)), envelope.msg_id


def error_codes(protocol: RelayProtocol) -> list[ErrorCode]:
    out = frames(protocol)
    assert all(isinstance(f, Error) for f in out), out
    return [ErrorCode(f.code) for f in out]  # type: ignore[union-attr]


def stored(tags: list[str]) -> list[StoredMessage]:
    return [StoredMessage(tag, b"envelope " + tag.encode()) for tag in tags]


# -- handshake -------------------------------------------------------------------------------

def test_challenge_first_then_welcome_for_a_proven_key() -> None:
    protocol = authenticated()
    assert protocol.phase is Phase.OPEN and protocol.device_key == ALICE.public
    assert protocol.close is None


def test_bad_hello_gets_one_error_and_a_policy_close() -> None:
    protocol = new_protocol()
    protocol.data_to_send()
    assert protocol.receive(b"\x00", NOW) is None
    assert error_codes(protocol) == [ErrorCode.UNAUTHENTICATED]
    assert protocol.close is not None and protocol.close.code == CLOSE_POLICY_VIOLATION
    assert protocol.receive(b"\x00", NOW) is None and protocol.data_to_send() == []


def test_revoked_key_is_refused_at_the_handshake_with_its_code() -> None:
    protocol = new_protocol(control=access(revoked=frozenset({ALICE.public})))
    handshake = device_handshake(ALICE)
    hello = handshake.receive_challenge(protocol.data_to_send()[0])
    assert protocol.receive(hello, NOW) is None
    assert error_codes(protocol) == [ErrorCode.REVOKED]
    assert protocol.device_key is None and protocol.close is not None


@pytest.mark.parametrize("fail,reason", [
    (lambda p: p.handshake_timed_out(10.0), "timeout"),
    (lambda p: p.receive_non_binary(NOW), "not_binary"),
])
def test_handshake_failures_are_counted_by_reason(fail, reason: str) -> None:
    protocol = new_protocol()
    protocol.data_to_send()
    fail(protocol)
    assert error_codes(protocol) == [ErrorCode.UNAUTHENTICATED]
    assert protocol._metrics.handshake_failures.labels(reason)._value.get() == 1


def test_a_few_pings_before_hello_are_answered_and_then_the_next_is_refused_as_hello() -> None:
    """A peer that has not authenticated pays no frame rate: the relay answers at most
    MAX_CONTROL_BEFORE_HELLO PINGs or PONGs before its HELLO, and takes the next one for a
    bad HELLO (a flood of them was answered until the handshake deadline).  A device that
    pinged a few times still completes its handshake."""
    protocol = new_protocol()
    protocol.data_to_send()
    assert all(protocol.receive_control(NOW) for _ in range(MAX_CONTROL_BEFORE_HELLO))
    assert protocol.close is None and protocol.data_to_send() == []
    assert not protocol.receive_control(NOW)
    assert error_codes(protocol) == [ErrorCode.UNAUTHENTICATED]
    assert protocol.close is not None and protocol.close.code == CLOSE_POLICY_VIOLATION
    assert protocol._metrics.handshake_failures.labels("not_binary")._value.get() == 1

    patient = new_protocol()
    handshake = device_handshake(ALICE)
    hello = handshake.receive_challenge(patient.data_to_send()[0])
    assert all(patient.receive_control(NOW) for _ in range(MAX_CONTROL_BEFORE_HELLO))
    patient.receive(hello, NOW)
    assert patient.device_key == ALICE.public and patient.close is None


# -- sending ---------------------------------------------------------------------------------

def test_send_is_rate_checked_admitted_stored_then_accepted() -> None:
    protocol = authenticated()
    data, msg_id = send_frame()
    request = protocol.receive(data, NOW)
    assert isinstance(request, CheckRate) and request.envelope.msg_id == msg_id
    store = protocol.rate_checked(request.envelope, True, NOW)
    assert isinstance(store, StoreEnvelope)
    assert protocol.data_to_send() == []  # nothing is said before the store answered
    protocol.stored(msg_id)
    assert frames(protocol) == [Accepted(msg_id)]


def test_only_the_oracles_sends_skip_the_senders_bucket() -> None:
    """The oracle pushes one change to the whole fleet at once; a device's rate (50/s)
    would spread it over minutes and count its refusals as abuse."""
    device = authenticated(ALICE).receive(send_frame(ALICE)[0], NOW)
    assert isinstance(device, CheckRate) and device.metered
    oracle = authenticated(ORACLE).receive(send_frame(ORACLE)[0], NOW)
    assert isinstance(oracle, CheckRate) and not oracle.metered


def refusal_of(protocol: RelayProtocol, data: bytes, allowed: bool = True) -> tuple[bytes | None,
                                                                                    ErrorCode]:
    request = protocol.receive(data, NOW)
    assert isinstance(request, CheckRate)
    assert protocol.rate_checked(request.envelope, allowed, NOW) is None
    out = frames(protocol)
    assert len(out) == 1 and isinstance(out[0], Error)
    return out[0].msg_id, ErrorCode(out[0].code)


def test_rate_limited_and_stale_sends_are_refused_by_msg_id() -> None:
    protocol = authenticated()
    data, msg_id = send_frame()
    assert refusal_of(protocol, data, allowed=False) == (msg_id, ErrorCode.RATE_LIMITED)
    data, msg_id = send_frame(created_at_ms=NOW - 400_000)
    assert refusal_of(protocol, data) == (msg_id, ErrorCode.STALE)


def test_another_keys_signature_is_refused() -> None:
    protocol = authenticated()
    envelope = seal_envelope(ALICE, Kind.DATA, [BOB.public], b"hi", ttl_s=60, now_ms=NOW)
    forged = envelope.raw[:-64] + MALLORY.sign(envelope.raw[:-64])
    assert refusal_of(protocol, encode_frame(Send(forged))) == (envelope.msg_id,
                                                                ErrorCode.BAD_SIGNATURE)


def test_an_envelope_from_another_key_is_wrong_sender() -> None:
    protocol = authenticated(ALICE)
    data, msg_id = send_frame(sender=BOB)
    assert refusal_of(protocol, data) == (msg_id, ErrorCode.WRONG_SENDER)


def test_store_refusal_is_an_error_for_that_message() -> None:
    protocol = authenticated()
    data, msg_id = send_frame()
    request = protocol.receive(data, NOW)
    assert isinstance(request, CheckRate)
    assert protocol.rate_checked(request.envelope, True, NOW) is not None
    protocol.store_refused(msg_id, MailboxFullError("full"))
    out = frames(protocol)
    assert isinstance(out[0], Error) and out[0].msg_id == msg_id
    assert out[0].code == ErrorCode.MAILBOX_FULL


@pytest.mark.parametrize("data,code", [
    (b"\xff", ErrorCode.MALFORMED),
    (encode_frame(Send(b"not an envelope")), ErrorCode.MALFORMED),
    (encode_frame(Deliver("t", b"x")), ErrorCode.UNEXPECTED_FRAME),
    (b"\x00" * (Settings().limits.max_frame_bytes + 1), ErrorCode.OVERSIZE),
])
def test_bad_frames_get_an_error_and_the_connection_stays(data: bytes, code: ErrorCode) -> None:
    protocol = authenticated()
    assert protocol.receive(data, NOW) is None
    assert error_codes(protocol) == [code]
    assert protocol.close is None


def test_a_frame_not_sealed_by_the_device_ends_the_connection() -> None:
    """Before: a transparent proxy ACKed every DELIVER itself, and the relay removed them."""
    protocol = authenticated()
    protocol.wake()
    protocol.fetched(stored(["1"]))
    protocol.opened()
    assert protocol.protocol.receive(encode_frame(Ack("1")), NOW) is None  # in the clear
    assert error_codes(protocol) == [ErrorCode.UNAUTHENTICATED]
    assert protocol.close is not None and protocol.close.code == CLOSE_POLICY_VIOLATION
    assert protocol._metrics.acked.value == 0  # nothing was removed


def test_a_replayed_sealed_frame_ends_the_connection() -> None:
    protocol = authenticated()
    sealed_ack = protocol.sealer.seal(encode_frame(Ack("1")))
    assert protocol.protocol.receive(sealed_ack, NOW) == RemoveDelivered("1")
    assert protocol.protocol.receive(sealed_ack, NOW) is None
    assert protocol.close is not None


def test_abuse_threshold_closes_after_exactly_max_invalid_frames() -> None:
    protocol = authenticated(max_invalid_frames=3)
    for _ in range(2):
        protocol.receive(b"\xff", NOW)
        assert protocol.close is None
    protocol.receive(b"\xff", NOW)
    assert error_codes(protocol) == [ErrorCode.MALFORMED] * 3
    assert protocol.close is not None and protocol.close.code == CLOSE_POLICY_VIOLATION
    assert protocol.receive(send_frame()[0], NOW) is None  # nothing more is read


# -- the delivery window and the ACK rule ----------------------------------------------------

def test_first_wake_fetches_a_full_window_from_the_start() -> None:
    protocol = authenticated()
    assert protocol.wake() == Fetch(None, WINDOW)


def test_a_full_window_waits_for_an_ack_and_the_ack_fetches_one_more() -> None:
    protocol = authenticated()
    fetch = protocol.wake()
    assert fetch is not None
    assert protocol.fetched(stored(["1", "2", "3", "4"])) is None  # window full: no fetch
    assert [f.tag for f in frames(protocol)] == ["1", "2", "3", "4"]  # type: ignore[union-attr]
    assert protocol.wake() is None  # new mail while full waits for the window
    request = protocol.receive(encode_frame(Ack("2")), NOW)
    assert request == RemoveDelivered("2")
    assert protocol.removed("2", existed=True) == Fetch("4", 1)


def test_an_ack_below_a_full_window_fetches_nothing() -> None:
    protocol = authenticated()
    protocol.wake()
    assert protocol.fetched(stored(["1", "2"])) is None  # short of what was asked: the end
    assert protocol.removed("1", existed=True) is None   # new mail would wake us


def test_only_a_batch_that_filled_what_was_asked_fetches_again() -> None:
    protocol = authenticated()  # window 4
    assert protocol.wake() == Fetch(None, 4)
    assert protocol.fetched(stored(["1", "2"])) is None  # short of 4: the mailbox's end
    assert protocol.wake() == Fetch("2", 2)  # new mail
    assert protocol.removed("1", existed=True) is None  # the window was not full
    assert protocol.fetched(stored(["3", "4"])) == Fetch("4", 1)  # filled the 2 asked: more?


def test_a_wake_during_a_fetch_is_served_when_it_returns() -> None:
    protocol = authenticated()
    assert protocol.wake() == Fetch(None, WINDOW)
    assert protocol.wake() is None  # one fetch at a time
    assert protocol.fetched([]) == Fetch(None, WINDOW)  # but the wake is not lost


def test_the_cursor_moves_past_what_was_delivered() -> None:
    protocol = authenticated()
    protocol.wake()
    assert protocol.fetched(stored(["a1"])) is None
    assert protocol.wake() == Fetch("a1", WINDOW - 1)
    assert protocol.fetched(stored(["a2"])) is None
    assert protocol.wake() == Fetch("a2", WINDOW - 2)


# -- wake-ups that carry their entry (`pushed`) ------------------------------------------------

def entry(tag: str, previous: str | None) -> NewEntry:
    return NewEntry(tag, previous, b"envelope " + tag.encode())


def test_an_entry_that_follows_the_cursor_is_delivered_without_a_fetch() -> None:
    protocol = authenticated()
    protocol.wake()
    assert protocol.fetched(stored(["1"])) is None
    assert protocol.pushed(entry("2", "1")) is None  # no fetch
    assert protocol.pushed(entry("3", "2")) is None
    assert [(f.tag, f.envelope) for f in frames(protocol)] == [  # type: ignore[union-attr]
        ("1", b"envelope 1"), ("2", b"envelope 2"), ("3", b"envelope 3")]
    assert protocol._metrics.delivered_from_wakeups.value == 2
    assert protocol.removed("2", existed=True) is None  # acked like any delivery
    assert protocol.wake() == Fetch("3", WINDOW - 2)  # the cursor is past them


def test_the_first_entry_of_a_mailbox_that_held_none_is_delivered() -> None:
    protocol = authenticated()
    protocol.wake()
    assert protocol.fetched([]) is None
    assert protocol.pushed(entry("1", None)) is None
    assert [f.tag for f in frames(protocol)] == ["1"]  # type: ignore[union-attr]


def test_the_first_entry_after_a_fetch_found_the_mailbox_empty_is_delivered() -> None:
    """The mailbox held entries before this connection (delivered and acked on an earlier
    one): the entry before the new one is none this connection saw, yet none can be
    missing, since its fetch found the mailbox empty and nothing was delivered since."""
    protocol = authenticated()
    protocol.wake()
    assert protocol.fetched([]) is None
    assert protocol.pushed(entry("9", "8")) is None
    assert protocol.pushed(entry("10", "9")) is None
    assert [f.tag for f in frames(protocol)] == ["9", "10"]  # type: ignore[union-attr]


def test_an_entry_after_history_before_the_first_fetch_is_fetched() -> None:
    protocol = authenticated()
    assert protocol.pushed(entry("9", "8")) == Fetch(None, WINDOW)  # "8" may still wait
    assert protocol.fetched(stored(["8", "9"])) is None
    assert [f.tag for f in frames(protocol)] == ["8", "9"]  # type: ignore[union-attr]


def test_an_entry_after_one_not_delivered_here_is_fetched_from_the_cursor() -> None:
    """Between the cursor and the entry may lie others: a wake-up lost, or one too large to
    carry its entry.  Fetched, they come in order; nothing is skipped."""
    protocol = authenticated()
    protocol.wake()
    protocol.fetched(stored(["1"]))
    assert protocol.pushed(entry("3", "2")) == Fetch("1", WINDOW - 1)
    assert protocol.fetched(stored(["2", "3"])) is None
    assert [f.tag for f in frames(protocol)] == ["1", "2", "3"]  # type: ignore[union-attr]


def test_an_entry_that_comes_during_a_fetch_waits_for_it() -> None:
    """The fetch may return the entry itself (or ones before it): delivering it now
    would send it twice, or out of order."""
    protocol = authenticated()
    assert protocol.wake() == Fetch(None, WINDOW)
    assert protocol.pushed(entry("1", None)) is None  # nothing now, nothing lost
    assert frames(protocol) == []
    assert protocol.fetched(stored(["1"])) == Fetch("1", WINDOW - 1)  # the wake-up is kept
    assert protocol.fetched([]) is None
    assert [f.tag for f in frames(protocol)] == ["1"]  # type: ignore[union-attr]


def test_an_entry_a_fetch_already_delivered_is_not_delivered_again() -> None:
    """Pub/sub and the fetch's reply travel on different connections: the entry's wake-up
    may come after a fetch that returned it."""
    protocol = authenticated()
    protocol.wake()
    protocol.fetched(stored(["1", "2"]))
    assert protocol.pushed(entry("2", "1")) == Fetch("2", WINDOW - 2)  # a fetch, not a DELIVER
    assert [f.tag for f in frames(protocol)] == ["1", "2"]  # type: ignore[union-attr]


def test_an_entry_waits_for_room_in_the_window() -> None:
    protocol = authenticated()
    protocol.wake()
    assert protocol.fetched(stored(["1", "2", "3", "4"])) is None  # window full
    frames(protocol)
    assert protocol.pushed(entry("5", "4")) is None
    assert frames(protocol) == []
    assert protocol.removed("1", existed=True) == Fetch("4", 1)  # the ACK fetches it


def test_an_entry_before_the_first_fetch_moves_where_that_fetch_starts() -> None:
    """A mailbox that held nothing before it: nothing can be skipped, and the first fetch
    (the session asks for it right after subscribing) starts after it."""
    protocol = authenticated()
    assert protocol.pushed(entry("1", None)) is None
    assert protocol.pushed(entry("3", "2")) == Fetch("1", WINDOW - 1)
    assert [f.tag for f in frames(protocol)] == ["1"]  # type: ignore[union-attr]


def test_acks_of_unknown_tags_change_no_window() -> None:
    protocol = authenticated()
    protocol.wake()
    protocol.fetched(stored(["1", "2", "3", "4"]))
    assert protocol.removed("other-connection", existed=True) is None
    assert protocol.removed("other-connection", existed=False) is None
    assert protocol._metrics.acked.value == 1  # counted only when something was removed


# -- the frame rate: every message of an authenticated device costs a token ------------------

CHEAP = {  # what a device can send without a SEND's rate token or an abuse count
    "ack": lambda p, now: p.receive(encode_frame(Ack("not-delivered-here")), now),
    "credit": lambda p, now: p.receive(encode_frame(StreamCredit(bytes(16), 1)), now),
    "ping": lambda p, now: p.receive_control(now),
}


def test_messages_beyond_the_frame_burst_are_read_more_slowly_never_refused() -> None:
    protocol = authenticated(frames_per_s=100, frame_burst=10)
    for _ in range(10):
        assert isinstance(protocol.receive(encode_frame(Ack("t")), NOW), RemoveDelivered)
        assert protocol.read_pause_s() == 0
    protocol.receive_control(NOW)  # one frame in debt: 10 ms, the shortest wait
    assert protocol.read_pause_s() == pytest.approx(MIN_READ_PAUSE_S)
    assert isinstance(protocol.receive(encode_frame(Ack("t")), NOW), RemoveDelivered)
    assert protocol.read_pause_s() == pytest.approx(0.02)
    assert protocol.receive(encode_frame(Ack("t")), NOW + 20) is not None  # paid back
    assert protocol.read_pause_s() == pytest.approx(MIN_READ_PAUSE_S)
    assert frames(protocol) == [] and protocol.close is None  # nothing refused
    assert protocol._metrics.frames_over_rate.value == 3


def test_the_handshake_costs_no_frame_token() -> None:
    protocol = new_protocol(frames_per_s=1, frame_burst=1)
    protocol.receive_control(NOW)  # a PING before HELLO: the listener's budget bounds those
    handshake = device_handshake(ALICE)
    hello = handshake.receive_challenge(protocol.data_to_send()[0])
    assert protocol.receive(hello, NOW) == Authenticated(ALICE.public)
    assert protocol.read_pause_s() == 0 and protocol._frames is None  # made at the first frame
    protocol.receive_control(NOW)
    assert protocol.read_pause_s() == 0  # the one token of the burst
    protocol.receive_control(NOW)
    assert protocol.read_pause_s() == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(rate=st.integers(20, 5_000), burst=st.integers(1, 200),
       sent=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(sorted(CHEAP))),
                     min_size=1, max_size=300))
def test_a_shell_that_waits_as_told_reads_no_more_than_the_rate_allows(
        rate: int, burst: int, sent: list[tuple[int, str]]) -> None:
    """Whatever a device sends and when (`sent`: ms after the one before, and what), a shell
    that waits `read_pause_s()` after each message reads by any time at most the burst,
    the rate's worth of the time since the first, and the shortest wait's worth more."""
    protocol = authenticated(frames_per_s=rate, frame_burst=burst)
    first = arrival = ready = NOW
    for count, (gap_ms, kind) in enumerate(sent, start=1):
        arrival += gap_ms
        read_at = max(arrival, ready)
        CHEAP[kind](protocol, read_at)
        ready = read_at + math.ceil(protocol.read_pause_s() * 1000)
        assert count <= burst + rate * (read_at - first) / 1000 + rate * MIN_READ_PAUSE_S + 1
    assert protocol.close is None


@settings(max_examples=40, deadline=None)
@given(rate=st.integers(1, 2_000), burst=st.integers(1, 50), slack_ms=st.lists(
    st.integers(0, 50), min_size=1, max_size=200), kinds=st.lists(st.sampled_from(sorted(CHEAP))))
def test_a_device_within_its_frame_rate_is_never_slowed(
        rate: int, burst: int, slack_ms: list[int], kinds: list[str]) -> None:
    protocol = authenticated(frames_per_s=rate, frame_burst=burst)
    now = NOW
    for index, slack in enumerate(slack_ms):
        CHEAP[kinds[index % len(kinds)] if kinds else "ack"](protocol, now)
        assert protocol.read_pause_s() == 0
        now += math.ceil(1000 / rate) + slack
    assert protocol._metrics.frames_over_rate.value == 0


def test_deliveries_stop_once_closed() -> None:
    protocol = authenticated()
    protocol.wake()
    protocol.store_failed(StoreUnavailableError("down"))
    assert protocol.close is not None and protocol.close.code == CLOSE_INTERNAL_ERROR
    assert protocol.fetched(stored(["1"])) is None
    assert protocol.data_to_send() == []
    assert protocol.wake() is None


def test_revocation_sends_the_reason_and_closes() -> None:
    protocol = authenticated()
    protocol.revoked(RevokedError("revoked by the oracle"))
    assert error_codes(protocol) == [ErrorCode.REVOKED]
    assert protocol.close is not None and protocol.close.code == CLOSE_POLICY_VIOLATION
    assert protocol.wake() is None


def test_a_home_moved_to_another_region_closes_for_a_reconnect() -> None:
    """SPEC §19: not the device's fault, so STORE_UNAVAILABLE and 1011, as for a store that
    cannot be read: the device reconnects and is served from its new home."""
    protocol = authenticated()
    protocol.revoked(StoreUnavailableError("the mailbox moved from region eu to us: reconnect"))
    assert error_codes(protocol) == [ErrorCode.STORE_UNAVAILABLE]
    assert protocol.close is not None and protocol.close.code == CLOSE_INTERNAL_ERROR
    assert protocol.wake() is None


# -- budgets, faults and endings (issue "The relay holds under hostile load") -----------------

def test_an_unknown_key_over_the_address_budget_is_refused_before_its_signature_is_checked(
        ) -> None:
    """The HELLO's signature is bad, yet the answer is RATE_LIMITED: no verify was spent."""
    settings = Settings(unknown_key_rate_per_s=1.0, unknown_key_burst=1)
    budget = AddressBudget(gate(settings), "192.0.2.1")
    assert budget.take_unknown_key_token(NOW)  # someone else from the address spent it
    protocol = new_protocol(budget=budget, unknown_key_rate_per_s=1.0, unknown_key_burst=1)
    protocol.data_to_send()
    forged = encode_frame(Hello(ALICE.public, bytes(32), ephemeral_keypair(bytes(32))[0],
                                bytes(64)))
    assert protocol.receive(forged, NOW) is None
    assert error_codes(protocol) == [ErrorCode.RATE_LIMITED]
    assert protocol._metrics.handshake_failures.labels("unknown_key_budget")._value.get() == 1


def test_a_known_key_spends_nothing_and_has_no_probation() -> None:
    settings = Settings(unknown_key_rate_per_s=1.0, unknown_key_burst=1, probation_sends=5)
    the_gate = gate(settings)
    budget = AddressBudget(the_gate, "192.0.2.1")
    slot = the_gate.admit("192.0.2.1", Recorder())
    slot.authenticated(ALICE.public)  # alice authenticated here before: known
    assert budget.take_unknown_key_token(NOW)  # the address's only token is gone
    protocol = authenticated(ALICE, budget=budget, unknown_key_rate_per_s=1.0,
                             unknown_key_burst=1, probation_sends=5)
    assert isinstance(protocol.receive(send_frame()[0], NOW), CheckRate)


def test_probation_sends_of_an_unknown_key_draw_on_the_address_budget() -> None:
    settings = Settings(unknown_key_rate_per_s=1.0, unknown_key_burst=3, probation_sends=4)
    budget = AddressBudget(gate(settings), "192.0.2.1")
    protocol = authenticated(budget=budget, unknown_key_rate_per_s=1.0, unknown_key_burst=3,
                             probation_sends=4)  # the handshake took the first token
    results = [protocol.receive(send_frame()[0], NOW) for _ in range(3)]
    assert [isinstance(r, CheckRate) for r in results] == [True, True, False]
    assert error_codes(protocol) == [ErrorCode.RATE_LIMITED]


def test_a_store_outage_is_answered_but_never_counted_as_the_devices_abuse() -> None:
    protocol = authenticated(max_invalid_frames=2)
    for _ in range(5):
        data, msg_id = send_frame()
        request = protocol.receive(data, NOW)
        assert isinstance(request, CheckRate)
        protocol.rate_checked(request.envelope, True, NOW)
        protocol.store_refused(msg_id, StoreUnavailableError("redis down"))
    assert error_codes(protocol) == [ErrorCode.STORE_UNAVAILABLE] * 5
    assert protocol.close is None


def test_a_superseded_connection_is_told_why_and_closed_normally() -> None:
    protocol = authenticated()
    protocol.superseded()
    assert error_codes(protocol) == [ErrorCode.SUPERSEDED]
    assert protocol.close is not None and protocol.close.code == CLOSE_NORMAL


def test_an_evicted_handshake_is_told_why() -> None:
    protocol = new_protocol()
    protocol.data_to_send()
    protocol.evicted()
    assert error_codes(protocol) == [ErrorCode.UNAUTHENTICATED]
    assert protocol._metrics.handshake_failures.labels("evicted")._value.get() == 1


@pytest.mark.parametrize("frame", [StreamAccept(b"s" * 16, 65_536, b""),
                                   StreamData(b"s" * 16, b"data"), StreamCredit(b"s" * 16, 1)])
def test_a_stream_frame_reaching_a_closing_connection_ends_the_other_half(
        frame: StreamFrame) -> None:
    """A connection superseded (or otherwise closing) stays attached while it closes.  An
    ACCEPT that reached it then was swallowed, and nothing ever ended the acceptor's half:
    it held a stream slot on its relay and, behind a tunnel, a TCP connection to the
    service, for as long as the service stayed silent (a peer could repeat it at will)."""
    protocol = authenticated()
    protocol.superseded()
    origin = Address("replica", 7)
    [answer] = protocol.stream_from_peer(frame, origin, BOB.public, NOW)
    assert answer == ToPeer(origin, BOB.public, StreamAbort(
        b"s" * 16, int(ErrorCode.STREAM_BROKEN), "the peer's connection just closed"))
    assert protocol.stream_from_peer(StreamAbort(b"s" * 16, 1, "x"), origin, BOB.public,
                                     NOW) == ()
