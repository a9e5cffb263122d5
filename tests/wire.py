"""A raw protocol speaker for relay tests: real WebSocket, hand-made frames.

The device library never sends forged or malformed traffic, so tests that
prove the relay refuses such traffic drive the socket directly with this.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp

from proto import Envelope, Identity, Kind, PublicKey, seal_envelope
from proto.frames import NONCE_BYTES, Ack, Deliver, Error, Frame, Send, decode_frame, encode_frame
from proto.handshake import DeviceHandshake, Established
from runtime.clock import now_ms
from tally import ATTACKS_REJECTED, TALLY

MAX_FRAME = 1 << 20


def sealed(sender: Identity, recipients: list[PublicKey], text: bytes = b"hi", *,
           kind: Kind = Kind.DATA, ttl_s: int = 60, created_at_ms: int | None = None) -> Envelope:
    return seal_envelope(sender, kind, recipients, text, ttl_s=ttl_s,
                         now_ms=now_ms() if created_at_ms is None else created_at_ms)


class RawDevice:
    """One authenticated connection; `recv` returns decoded frames."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 identity: Identity, terms: Established) -> None:
        self.session, self.ws, self.identity, self.terms = session, ws, identity, terms

    @classmethod
    async def connect(cls, url: str, identity: Identity, compress: int = 0) -> RawDevice:
        """`compress` 15 offers permessage-deflate, as browsers do."""
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(url, max_msg_size=MAX_FRAME, compress=compress)
            handshake = DeviceHandshake(identity, os.urandom(NONCE_BYTES), MAX_FRAME)
            await ws.send_bytes(handshake.receive_challenge(await ws.receive_bytes(timeout=5)))
            terms = handshake.receive_welcome(await ws.receive_bytes(timeout=5))
        except BaseException:
            await session.close()
            raise
        return cls(session, ws, identity, terms)

    async def send_raw(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def send(self, envelope: Envelope) -> Frame:
        """Send an envelope and return the relay's answer (ACCEPTED or ERROR)."""
        await self.ws.send_bytes(encode_frame(Send(envelope.raw)))
        return await self.recv_not_deliver()

    async def recv(self, timeout: float = 5.0) -> Frame:
        message = await self.ws.receive(timeout=timeout)
        if message.type != aiohttp.WSMsgType.BINARY:
            raise ConnectionError(f"relay sent {message.type.name}: {message.data!r}")
        return decode_frame(message.data, MAX_FRAME)

    async def recv_not_deliver(self, timeout: float = 5.0) -> Frame:
        """Next ACCEPTED/ERROR answer, skipping interleaved deliveries."""
        while True:
            frame = await self.recv(timeout)
            if not isinstance(frame, Deliver):
                return frame

    async def next_delivery(self, timeout: float = 5.0, ack: bool = True) -> Deliver:
        while True:
            frame = await self.recv(timeout)
            if isinstance(frame, Deliver):
                if ack:
                    await self.ws.send_bytes(encode_frame(Ack(frame.tag)))
                return frame

    async def expect_silence(self, seconds: float) -> None:
        try:
            frame = await self.recv(timeout=seconds)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"expected no frame, got {frame}")

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()

    async def __aenter__(self) -> RawDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def error_code(frame: Frame) -> str:
    """The refusal's code name; each one checked here counts as an attack rejected."""
    assert isinstance(frame, Error), f"expected ERROR, got {frame}"
    assert frame.error_code is not None
    TALLY[ATTACKS_REJECTED] += 1
    return frame.error_code.name
