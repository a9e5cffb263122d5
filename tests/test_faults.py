"""Crashes: a relay killed mid-stream loses nothing it acknowledged."""

from __future__ import annotations

import asyncio

import pytest

from proto import Identity, decode_envelope
from proto.frames import Accepted, Error, Send, encode_frame
from relay_process import RelayProcess
from tally import FAULTS_SURVIVED, MESSAGES_LOST, TALLY
from wire import RawDevice, sealed


async def send_until_killed(relay: RelayProcess, sender: Identity, recipient: Identity,
                            count: int, kill_after: int, window: int = 64) -> set[bytes]:
    """Keep `window` sends in flight (of `count`), SIGKILL the relay after `kill_after`
    answers; return the ACCEPTED ids.  The window, not timing, makes the kill land
    mid-stream: however fast the relay, it cannot have answered more than
    kill_after + window sends when it dies."""
    accepted: set[bytes] = set()
    device = await RawDevice.connect(relay.url, sender)
    sent = answered = 0
    try:
        while True:
            while sent < count and sent - answered < window:
                await device.send_raw(encode_frame(Send(sealed(sender, [recipient.public]).raw)))
                sent += 1
            try:
                frame = await device.recv(timeout=5)
            except (ConnectionError, asyncio.TimeoutError):
                break  # the relay is gone
            answered += 1
            if isinstance(frame, Accepted):
                accepted.add(frame.msg_id)
            else:
                assert isinstance(frame, Error), frame
            if len(accepted) == kill_after:
                relay.kill()
                sent = count  # send nothing more: the relay is going down
    finally:
        await device.session.close()
    return accepted


async def drain(url: str, identity: Identity, expected: int) -> list[bytes]:
    """Receive until `expected` deliveries or 2 s of silence; returns msg ids in order."""
    ids: list[bytes] = []
    async with await RawDevice.connect(url, identity) as device:
        while True:
            try:
                delivery = await device.next_delivery(timeout=2 if len(ids) >= expected else 10)
            except asyncio.TimeoutError:
                return ids
            ids.append(decode_envelope(delivery.envelope).msg_id)


@pytest.mark.timeout(60)
async def test_sigkill_during_sends_loses_no_acknowledged_message(tmp_path) -> None:
    store = f"sqlite:///{tmp_path / 'mail.db'}"
    relay = await RelayProcess("--store", store, "--rate-per-s", "1e6",
                               "--rate-burst", "1000000").start()
    sender, recipient = Identity.generate(), Identity.generate()
    try:
        accepted = await send_until_killed(relay, sender, recipient, count=2000, kill_after=150)
        assert 150 <= len(accepted) < 2000, "the kill must land mid-stream"
        await relay.start()  # same port, same file
        delivered = await drain(relay.url, recipient, expected=len(accepted))
    finally:
        relay.stop()
    TALLY[MESSAGES_LOST] += len(accepted - set(delivered))
    TALLY[FAULTS_SURVIVED] += 1
    assert accepted <= set(delivered), "a message the relay acknowledged was lost"
    assert len(delivered) == len(set(delivered)), "a stored message was delivered twice"
