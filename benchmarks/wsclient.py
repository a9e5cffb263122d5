"""Raw protocol devices for load generation: a real handshake, then pre-encoded frames.

The load generator shares a 2-core machine with the relay it measures, so it
must cost much less per message than the relay: envelopes are sealed and SEND
frames encoded before the timed phase (only the channel's seal, a few µs, is
left for the send), and answers are classified by their first bytes instead
of being decoded and validated like the relay does.
"""

from __future__ import annotations

import os
import time

import aiohttp
import cbor2

from proto import Identity, Kind, PublicKey, canonical, seal_envelope
from proto.frames import NONCE_BYTES, FrameType, Send, encode_frame
from proto.handshake import EPHEMERAL_SEED_BYTES, DeviceHandshake

MAX_FRAME = 1 << 20
_ARRAY_OF_10 = 0x8A  # an envelope of protocol 2 is an array of ten elements
_BSTR_16 = 0x50


class Link:
    """An authenticated device connection: frames go out and come in through its channel."""

    __slots__ = ("ws", "_sealer", "_opener")

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, handshake_terms: object) -> None:
        self.ws = ws
        self._sealer, self._opener = handshake_terms.channel.for_device()  # type: ignore[attr-defined]

    async def send(self, frame: bytes) -> None:
        await self.ws.send_bytes(self._sealer.seal(frame))

    async def receive(self, timeout: float | None = None) -> bytes | None:
        """The next frame, opened; None once the socket is closing."""
        message = await self.ws.receive(timeout=timeout)
        if message.type != aiohttp.WSMsgType.BINARY:
            return None
        return self._opener.open(message.data)

    async def close(self) -> None:
        await self.ws.close()


async def connect(http: aiohttp.ClientSession, url: str, identity: Identity) -> Link:
    """CHALLENGE → HELLO → WELCOME (checked with the relay's key); the link is then live."""
    ws = await http.ws_connect(url, max_msg_size=MAX_FRAME, autoping=True)
    try:
        handshake = DeviceHandshake(identity, os.urandom(NONCE_BYTES),
                                    os.urandom(EPHEMERAL_SEED_BYTES), MAX_FRAME)
        await ws.send_bytes(handshake.receive_challenge(await ws.receive_bytes(timeout=30)))
        terms = handshake.receive_welcome(await ws.receive_bytes(timeout=30))
    except BaseException:
        await ws.close()
        raise
    return Link(ws, terms)


def sealed_sends(sender: Identity, recipient: PublicKey, count: int,
                 payload_bytes: int) -> list[tuple[bytes, bytes]]:
    """(msg_id, SEND frame) pairs, really sealed and signed, built before any clock starts."""
    now = time.time_ns() // 1_000_000
    plaintext = b"\x00" * payload_bytes
    result = []
    for _ in range(count):
        envelope = seal_envelope(sender, Kind.DATA, [recipient], plaintext, ttl_s=3600, now_ms=now)
        result.append((envelope.msg_id, encode_frame(Send(envelope.raw))))
    return result


def frame_type(data: bytes) -> int:
    """Every frame is a short CBOR array whose first element is a one-byte type."""
    return data[1]


def deliver_parts(data: bytes) -> tuple[str, bytes]:
    """(tag, msg_id) of a DELIVER frame; the msg_id sits at a fixed offset of the envelope,
    after the array header, the version and the origin (one byte each)."""
    _type, tag, envelope = cbor2.loads(data)
    if envelope[0] != _ARRAY_OF_10 or envelope[3] != _BSTR_16:
        raise ValueError("unexpected envelope layout")
    return tag, envelope[4:20]


def ack_frame(tag: str) -> bytes:
    return canonical.encode([int(FrameType.ACK), tag])
