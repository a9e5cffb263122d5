"""Property: whatever bytes an authenticated device sends, the relay answers with a
clear ERROR frame, stores nothing, and keeps serving everyone.

CI runs a modest number of examples; `pytest -m fuzz` runs the same properties
against a live relay with CONTINUUM_FUZZ_EXAMPLES (default 100 000) each."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fuzz_settings import long_run, quick

from conftest import TEST_SETTINGS, LoopThread
from continuum.server import RelayServer
from proto import Identity
from proto.channel import LENGTH_BYTES, Layout
from proto.errors import DecodeError, ErrorCode
from proto.frames import Accepted, Error, Send, decode_frame, encode_frame
from tally import ATTACKS_REJECTED, INPUTS_TRIED, TALLY
from wire import MAX_FRAME, RawDevice, sealed


@dataclass
class FuzzTarget:
    loop: LoopThread
    server: RelayServer
    sender: RawDevice
    sender_identity: Identity
    recipient: Identity

    def depth(self) -> int:
        assert self.server.relay is not None
        return self.loop.run(self.server.relay.store.depth(self.recipient.public))


@pytest.fixture(scope="module")
def target(loop_thread: LoopThread) -> Iterator[FuzzTarget]:
    server = RelayServer(replace(TEST_SETTINGS, max_invalid_frames=10**9,
                                 rate_per_s=1e9, rate_burst=10**9))
    loop_thread.run(server.start())
    sender_identity, recipient = Identity.generate(), Identity.generate()
    sender = loop_thread.run(RawDevice.connect(server.url, sender_identity))
    yield FuzzTarget(loop_thread, server, sender, sender_identity, recipient)
    loop_thread.run(sender.close())
    loop_thread.run(server.stop())


def _answer(target: FuzzTarget, data: bytes) -> object:
    TALLY[INPUTS_TRIED] += 1

    async def exchange() -> object:
        await target.sender.send_raw(data)
        return await target.sender.recv_not_deliver()
    return target.loop.run(exchange())


def _valid_send(target: FuzzTarget) -> bytes:
    envelope = sealed(target.sender_identity, [target.recipient.public], b"fuzz")
    return encode_frame(Send(envelope.raw))


random_bytes = st.binary(min_size=0, max_size=2048)


def check_random_bytes(target: FuzzTarget, data: bytes) -> None:
    before = target.depth()
    answer = _answer(target, data)
    assert isinstance(answer, Error)
    assert answer.error_code is not None and answer.error_code is not ErrorCode.INTERNAL
    assert target.depth() == before
    TALLY[ATTACKS_REJECTED] += 1


def check_mutated_frame(target: FuzzTarget, data: st.DataObject) -> None:
    original = _valid_send(target)
    frame = bytearray(original)
    mutation = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if mutation == "flip":
        index = data.draw(st.integers(0, len(frame) - 1))
        frame[index] ^= 1 << data.draw(st.integers(0, 7))
    elif mutation == "truncate":
        del frame[data.draw(st.integers(0, len(frame) - 1)):]
    elif mutation == "extend":
        frame += data.draw(st.binary(min_size=1, max_size=64))
    else:
        start = data.draw(st.integers(0, len(frame) - 1))
        frame[start:start + 8] = data.draw(st.binary(min_size=0, max_size=16))
    before = target.depth()
    answer = _answer(target, bytes(frame))
    if bytes(frame) == original:  # a splice that changed nothing: still a valid send
        assert isinstance(answer, Accepted) and target.depth() == before + 1
        return
    assert isinstance(answer, Error)
    assert answer.error_code is not None and answer.error_code is not ErrorCode.INTERNAL
    assert target.depth() == before
    TALLY[ATTACKS_REJECTED] += 1


@quick(150)
@given(data=random_bytes)
def test_random_bytes_are_refused_with_an_error_frame(target: FuzzTarget, data: bytes) -> None:
    check_random_bytes(target, data)


@quick(150)
@given(data=st.data())
def test_mutated_valid_frames_are_refused_and_not_stored(target: FuzzTarget,
                                                         data: st.DataObject) -> None:
    check_mutated_frame(target, data)


@long_run
@given(data=random_bytes)
def test_random_bytes_long(target: FuzzTarget, data: bytes) -> None:
    check_random_bytes(target, data)


@long_run
@given(data=st.data())
def test_mutated_valid_frames_long(target: FuzzTarget, data: st.DataObject) -> None:
    check_mutated_frame(target, data)


@pytest.fixture(scope="module")
def detached_target(target: FuzzTarget) -> Iterator[FuzzTarget]:
    """The same relay through a connection that negotiated the detached layout (SPEC §8),
    where a keyed device chooses how a message splits into a sealed head and a chunk."""
    identity = Identity.generate()
    device = target.loop.run(RawDevice.connect(target.server.url, identity,
                                               layout=Layout.DETACHED))
    yield replace(target, sender=device, sender_identity=identity)
    target.loop.run(device.close())


def check_detached(target: FuzzTarget, head: bytes, detached: bytes) -> None:
    try:
        decode_frame(head, MAX_FRAME, detached)
    except DecodeError:
        pass
    else:
        assume(False)  # the one head that encodes a chunk's frame: not garbage
    before = target.depth()
    TALLY[INPUTS_TRIED] += 1
    device = target.sender

    async def exchange() -> object:
        await device.ws.send_bytes(len(detached).to_bytes(LENGTH_BYTES, "big")
                                   + device.cipher.seal(head, detached) + detached)
        return await device.recv_not_deliver()
    answer = target.loop.run(exchange())
    assert isinstance(answer, Error)
    assert answer.error_code is not None and answer.error_code is not ErrorCode.INTERNAL
    assert target.depth() == before
    TALLY[ATTACKS_REJECTED] += 1


detached_parts = {"head": st.binary(max_size=64), "detached": st.binary(min_size=1, max_size=2048)}


@quick(150)
@given(**detached_parts)
def test_any_head_with_a_detached_part_is_refused_and_not_stored(
        detached_target: FuzzTarget, head: bytes, detached: bytes) -> None:
    check_detached(detached_target, head, detached)


@long_run
@given(**detached_parts)
def test_detached_parts_long(detached_target: FuzzTarget, head: bytes, detached: bytes) -> None:
    check_detached(detached_target, head, detached)


def test_relay_still_serves_after_fuzzing(target: FuzzTarget) -> None:
    before = target.depth()
    assert isinstance(_answer(target, _valid_send(target)), Accepted)
    assert target.depth() == before + 1
