"""CALL and RESPONSE (SPEC §18) without a network: their decoders under hostile input, the
device's decisions on them (forged, misaddressed, replayed, truncated, oversize, non-peer),
and the caller's and callee's bookkeeping."""

from __future__ import annotations

import pytest
from fuzz_settings import quick
from hypothesis import given
from hypothesis import strategies as st
from proto_support import cbor_values, encode_any, field_replacements, mutations

from client.calls import Admission, Answering, CallResult, PendingCalls, ResponseFate
from client.dedup import RecentlySeen
from client.inbox import CallArrived, Drop, DropReason, InboxView, ResponseArrived, decide
from client.peers import PeerList
from client.tracking import SentLog
from proto import Envelope, Identity, Kind, Limits, PublicKey, canonical, seal_envelope
from proto.calls import CORRELATION_ID_BYTES, Call, CallStatus, Response
from proto.errors import (CallRejectedError, DecodeError, InvalidFieldError, OversizeError,
                          ProtocolError)

NOW_MS = 1_700_000_000_000
CID = bytes(range(CORRELATION_ID_BYTES))
alice, bob, carol, oracle = (Identity.generate() for _ in range(4))
CALL = Call(CID, "reboot", NOW_MS + 5_000, b'{"delay": 3}')
RESPONSE = Response(CID, CallStatus.OK, b"rebooting")


def sealed(sender: Identity, recipients: list[Identity], kind: Kind, plaintext: bytes,
           ttl_s: int = 10, now_ms: int = NOW_MS) -> Envelope:
    return seal_envelope(sender, kind, [r.public for r in recipients], plaintext, ttl_s=ttl_s,
                         now_ms=now_ms)


def view(peers: tuple[Identity, ...] = (alice,), seen: RecentlySeen | None = None,
         oracle_key: PublicKey | None = oracle.public) -> InboxView:
    """bob's device: alice is its peer."""
    return InboxView(identity=bob, peers=PeerList([p.public for p in peers]), relay_keys=set(),
                     seen=seen or RecentlySeen(), awaiting_receipt=SentLog(),
                     oracle_key=oracle_key)


# -- payloads ----------------------------------------------------------------------------------


@quick(200)
@given(cid=st.binary(min_size=16, max_size=16),
       method=st.from_regex(r"[A-Za-z0-9._/-]{1,64}", fullmatch=True),
       deadline=st.integers(0, 2**64 - 1), body=st.binary(max_size=256),
       status=st.sampled_from(list(CallStatus)))
def test_calls_and_responses_round_trip(cid: bytes, method: str, deadline: int, body: bytes,
                                        status: CallStatus) -> None:
    call = Call(cid, method, deadline, body)
    assert Call.decode(call.encode()) == call
    response = Response(cid, status, body)
    assert Response.decode(response.encode()) == response


def _only_protocol_errors(decoder: object, data: bytes) -> None:
    try:
        decoder(data)  # type: ignore[operator]
    except ProtocolError:
        pass


CALL_FIELDS = canonical.decode(CALL.encode(), max_size=1024, what="test")
RESPONSE_FIELDS = canonical.decode(RESPONSE.encode(), max_size=1024, what="test")


@quick(500)
@given(data=st.one_of(st.binary(max_size=300), mutations(CALL.encode()),
                      field_replacements(CALL_FIELDS), cbor_values.map(encode_any)))
def test_call_decoder_refuses_garbage_with_protocol_errors_only(data: bytes) -> None:
    _only_protocol_errors(Call.decode, data)


@quick(500)
@given(data=st.one_of(st.binary(max_size=300), mutations(RESPONSE.encode()),
                      field_replacements(RESPONSE_FIELDS), cbor_values.map(encode_any)))
def test_response_decoder_refuses_garbage_with_protocol_errors_only(data: bytes) -> None:
    _only_protocol_errors(Response.decode, data)


@pytest.mark.parametrize("decoder,valid", [(Call.decode, CALL.encode()),
                                           (Response.decode, RESPONSE.encode())])
def test_every_truncation_is_refused(decoder: object, valid: bytes) -> None:
    for length in range(len(valid)):
        with pytest.raises(DecodeError):
            decoder(valid[:length])  # type: ignore[operator]


@pytest.mark.parametrize("fields,error", [
    ([CID[:15], "reboot", NOW_MS, b""], InvalidFieldError),
    ([CID, "", NOW_MS, b""], InvalidFieldError),
    ([CID, "a" * 65, NOW_MS, b""], InvalidFieldError),
    ([CID, "re boot", NOW_MS, b""], InvalidFieldError),
    ([CID, "réboot", NOW_MS, b""], InvalidFieldError),
    ([CID, b"reboot", NOW_MS, b""], InvalidFieldError),
    ([CID, "reboot", -1, b""], InvalidFieldError),
    ([CID, "reboot", NOW_MS, "text"], InvalidFieldError),
    ([CID, "reboot", NOW_MS], DecodeError),
    ([CID, "reboot", NOW_MS, b"", b""], DecodeError),
])
def test_bad_call_fields_are_refused(fields: list, error: type[ProtocolError]) -> None:
    with pytest.raises(error):
        Call.decode(encode_any(fields))


@pytest.mark.parametrize("fields", [[CID, 5, b""], [CID, -1, b""], [CID, True, b""],
                                    [CID + b"\x00", 0, b""], [CID, 0, None]])
def test_bad_response_fields_are_refused(fields: list) -> None:
    with pytest.raises(InvalidFieldError):
        Response.decode(encode_any(fields))


def test_oversize_calls_are_refused_when_sealed_and_when_decoded() -> None:
    limits = Limits(max_envelope_bytes=4096)
    big = Call(CID, "upload", NOW_MS + 5_000, bytes(5000)).encode()
    with pytest.raises(OversizeError):
        seal_envelope(alice, Kind.CALL, [bob.public], big, ttl_s=10, now_ms=NOW_MS,
                      limits=limits)
    with pytest.raises(OversizeError):
        Call.decode(big, limits)
    with pytest.raises(OversizeError):
        Response.decode(Response(CID, CallStatus.OK, bytes(5000)).encode(), limits)


def test_a_call_is_refused_past_its_deadline_and_outside_its_envelopes_life() -> None:
    envelope = sealed(alice, [bob], Kind.CALL, CALL.encode(), ttl_s=10)
    CALL.check(envelope, NOW_MS + 5_000)  # at the deadline: still runs
    with pytest.raises(CallRejectedError):
        CALL.check(envelope, NOW_MS + 5_001)
    for deadline in (NOW_MS - 1, NOW_MS + 10_001):
        with pytest.raises(InvalidFieldError):
            Call(CID, "reboot", deadline, b"").check(envelope, NOW_MS)


# -- what a device decides ---------------------------------------------------------------------


def test_a_peers_call_and_anyones_response_are_taken() -> None:
    decision = decide(sealed(alice, [bob], Kind.CALL, CALL.encode()).raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, CallArrived) and decision.call == CALL
    response = sealed(carol, [bob], Kind.RESPONSE, RESPONSE.encode())  # matched by the device
    decision = decide(response.raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, ResponseArrived) and decision.response == RESPONSE


def test_a_non_peers_call_is_dropped_and_the_oracles_is_taken() -> None:
    decision = decide(sealed(carol, [bob], Kind.CALL, CALL.encode()).raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.NON_PEER
    from_oracle = sealed(oracle, [bob], Kind.CALL, CALL.encode())
    assert isinstance(decide(from_oracle.raw, view(), now_ms=NOW_MS), CallArrived)
    assert isinstance(decide(from_oracle.raw, view(oracle_key=None), now_ms=NOW_MS), Drop)


@pytest.mark.parametrize("kind,plaintext", [(Kind.CALL, CALL.encode()),
                                            (Kind.RESPONSE, RESPONSE.encode())])
def test_forged_misaddressed_replayed_truncated_and_stale_ones_are_dropped(
        kind: Kind, plaintext: bytes) -> None:
    envelope = sealed(alice, [bob], kind, plaintext)
    forged = bytearray(envelope.raw)
    forged[-1] ^= 0x01
    assert _dropped(bytes(forged)) is DropReason.INVALID
    assert _dropped(sealed(alice, [carol], kind, plaintext).raw) is DropReason.INVALID
    seen = RecentlySeen()
    seen.add((alice.public, envelope.msg_id), NOW_MS + 60_000)
    assert _dropped(envelope.raw, view(seen=seen)) is DropReason.DUPLICATE
    for cut in (1, len(envelope.raw) // 2, len(envelope.raw) - 1):
        assert _dropped(envelope.raw[:cut]) is DropReason.INVALID
    assert _dropped(envelope.raw, now_ms=NOW_MS + 10_000 + 300_001) is DropReason.STALE
    assert _dropped(sealed(alice, [bob], kind, plaintext[:-1]).raw) is DropReason.INVALID


def test_an_oversize_call_is_dropped_by_the_connections_limit() -> None:
    big = sealed(alice, [bob], Kind.CALL, Call(CID, "x", NOW_MS + 5_000, bytes(8000)).encode())
    decision = decide(big.raw, view(), Limits(max_envelope_bytes=4096), now_ms=NOW_MS)
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID


def _dropped(raw: bytes, inbox: InboxView | None = None, now_ms: int = NOW_MS) -> DropReason:
    decision = decide(raw, inbox or view(), now_ms=now_ms)
    assert isinstance(decision, Drop), decision
    return decision.reason


# -- the caller's and the callee's bookkeeping ------------------------------------------------


async def test_a_response_counts_only_from_the_callee_for_a_call_still_awaited() -> None:
    pending = PendingCalls()
    cid, answered = pending.start(bob.public)
    assert pending.resolve(carol.public, Response(cid, CallStatus.OK, b"")) \
        is ResponseFate.UNMATCHED
    assert pending.resolve(bob.public, Response(CID, CallStatus.OK, b"")) \
        is ResponseFate.UNMATCHED
    assert pending.resolve(bob.public, Response(cid, CallStatus.OK, b"yes")) \
        is ResponseFate.MATCHED
    assert answered.result() == CallResult(CallStatus.OK, b"yes")
    pending.give_up(cid)  # answered: nothing to remember
    assert pending.resolve(bob.public, Response(cid, CallStatus.OK, b"")) \
        is ResponseFate.UNMATCHED
    late_cid, _ = pending.start(bob.public)
    pending.give_up(late_cid)
    assert pending.resolve(bob.public, Response(late_cid, CallStatus.TIMEOUT, b"")) \
        is ResponseFate.LATE
    assert len(pending) == 0


async def handler(call: object) -> bytes:
    return b""


def test_the_callee_admits_each_correlation_id_once_and_only_in_time() -> None:
    answering = Answering(max_running=1)
    answering.on_call("reboot", handler)
    envelope = sealed(alice, [bob], Kind.CALL, CALL.encode())
    assert answering.admit(envelope, CALL, NOW_MS) is Admission.RUN
    assert answering.admit(envelope, CALL, NOW_MS) is Admission.REPLAY
    late = Call(bytes(16), "reboot", NOW_MS + 1_000, b"")
    assert answering.admit(envelope, late, NOW_MS + 1_001) is Admission.LATE
    unknown = Call(bytes([1]) * 16, "nope", NOW_MS + 1_000, b"")
    assert answering.admit(envelope, unknown, NOW_MS) is Admission.NOT_FOUND
    answering.running = 1
    busy = Call(bytes([2]) * 16, "reboot", NOW_MS + 1_000, b"")
    assert answering.admit(envelope, busy, NOW_MS) is Admission.BUSY
    invalid = Call(bytes([3]) * 16, "reboot", NOW_MS + 60_000, b"")
    assert answering.admit(envelope, invalid, NOW_MS) is Admission.INVALID
    with pytest.raises(InvalidFieldError):
        answering.on_call("bad name", handler)


def test_the_callees_memory_is_bounded() -> None:
    answering = Answering(taken_capacity=100)
    answering.on_call("reboot", handler)
    envelope = sealed(alice, [bob], Kind.CALL, CALL.encode())
    for n in range(1000):
        call = Call(n.to_bytes(16, "big"), "reboot", NOW_MS + 5_000, b"")
        assert answering.admit(envelope, call, NOW_MS) is Admission.RUN
    assert len(answering._taken) == 100
    # Past their deadline, pairs are forgotten (a copy would be refused as late anyway).
    answering.admit(envelope, Call(bytes(16), "reboot", NOW_MS + 9_000, b""), NOW_MS + 6_000)
    assert len(answering._taken) == 1



@quick(300)
@given(kind=st.sampled_from([Kind.CALL, Kind.RESPONSE]),
       plaintext=st.one_of(st.binary(max_size=200), mutations(CALL.encode()),
                           mutations(RESPONSE.encode()), field_replacements(CALL_FIELDS),
                           field_replacements(RESPONSE_FIELDS), cbor_values.map(encode_any)))
def test_a_peers_garbage_call_or_response_is_dropped_never_raised(kind: Kind,
                                                                  plaintext: bytes) -> None:
    """Sealed and signed by a peer, so every rule before the plaintext's passes."""
    decision = decide(sealed(alice, [bob], kind, plaintext).raw, view(), now_ms=NOW_MS)
    assert isinstance(decision, (CallArrived, ResponseArrived, Drop))
    if isinstance(decision, Drop):
        assert decision.reason is DropReason.INVALID
