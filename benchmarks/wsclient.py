"""Raw protocol devices for load generation: a real handshake, then pre-encoded frames.

The load generator shares a 2-core machine with the relay it measures, so it
must cost much less per message than the relay: SEND frames are sealed and
encoded before the timed phase, and answers are classified by their first
bytes instead of being decoded and validated like the relay does.
"""

from __future__ import annotations

import os
import time

import aiohttp
import cbor2

from proto import Identity, Kind, PublicKey, canonical, seal_envelope
from proto.frames import NONCE_BYTES, FrameType, Send, encode_frame
from proto.handshake import DeviceHandshake

MAX_FRAME = 1 << 20
_ARRAY_OF_9 = 0x89
_BSTR_16 = 0x50


async def connect(http: aiohttp.ClientSession, url: str,
                  identity: Identity) -> aiohttp.ClientWebSocketResponse:
    """CHALLENGE → HELLO → WELCOME (checked with the relay's key); the socket is then live."""
    ws = await http.ws_connect(url, max_msg_size=MAX_FRAME, autoping=True)
    try:
        handshake = DeviceHandshake(identity, os.urandom(NONCE_BYTES), MAX_FRAME)
        await ws.send_bytes(handshake.receive_challenge(await ws.receive_bytes(timeout=30)))
        handshake.receive_welcome(await ws.receive_bytes(timeout=30))
    except BaseException:
        await ws.close()
        raise
    return ws


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
    """(tag, msg_id) of a DELIVER frame; the msg_id sits at a fixed offset of the envelope."""
    _type, tag, envelope = cbor2.loads(data)
    if envelope[0] != _ARRAY_OF_9 or envelope[3] != _BSTR_16:
        raise ValueError("unexpected envelope layout")
    return tag, envelope[4:20]


def ack_frame(tag: str) -> bytes:
    return canonical.encode([int(FrameType.ACK), tag])
