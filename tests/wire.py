"""A raw protocol speaker for relay tests: real WebSocket, hand-made frames.

The device library never sends forged or malformed traffic, so tests that
prove the relay refuses such traffic drive the socket directly with this.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp

from proto import Envelope, Identity, Kind, PublicKey, seal_envelope
from proto.channel import DETACHED_SUBPROTOCOL, LENGTH_BYTES, FrameOpener, FrameSealer, Layout
from proto.frames import NONCE_BYTES, Accepted, Ack, Deliver, Error, Frame, Send, decode_frame
from proto.handshake import EPHEMERAL_SEED_BYTES, DeviceHandshake, Established
from runtime.clock import now_ms
from tally import ATTACKS_REJECTED, TALLY

MAX_FRAME = 1 << 20


def sealed(sender: Identity, recipients: list[PublicKey], text: bytes = b"hi", *,
           kind: Kind = Kind.DATA, ttl_s: int = 60, created_at_ms: int | None = None) -> Envelope:
    return seal_envelope(sender, kind, recipients, text, ttl_s=ttl_s,
                         now_ms=now_ms() if created_at_ms is None else created_at_ms)


def device_handshake(identity: Identity, cap: int = MAX_FRAME) -> DeviceHandshake:
    """A device's side of the handshake with fresh nonce and ephemeral key."""
    return DeviceHandshake(identity, os.urandom(NONCE_BYTES), os.urandom(EPHEMERAL_SEED_BYTES), cap)


class RawDevice:
    """One authenticated connection; `recv` returns decoded frames."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 identity: Identity, terms: Established) -> None:
        self.session, self.ws, self.identity, self.terms = session, ws, identity, terms
        self.layout = Layout.negotiated(ws.protocol)
        self.cipher, receiving = terms.channel.for_device()
        self.sealer = FrameSealer(self.cipher, self.layout)
        self.opener = FrameOpener(receiving, self.layout)

    @classmethod
    async def connect(cls, url: str, identity: Identity, compress: int = 0,
                      layout: Layout = Layout.SEALED,
                      headers: dict[str, str] | None = None) -> RawDevice:
        """`compress` 15 offers permessage-deflate, as browsers do; `layout` DETACHED offers
        the detached channel layout, as the device library does (SPEC §8); `headers` go
        with the upgrade request (what a proxy in front of the relay would add)."""
        session = aiohttp.ClientSession()
        offered = (DETACHED_SUBPROTOCOL,) if layout is Layout.DETACHED else ()
        try:
            ws = await session.ws_connect(url, max_msg_size=MAX_FRAME, compress=compress,
                                          protocols=offered, headers=headers)
            handshake = device_handshake(identity)
            await ws.send_bytes(handshake.receive_challenge(await ws.receive_bytes(timeout=5)))
            terms = handshake.receive_welcome(await ws.receive_bytes(timeout=5))
        except BaseException:
            await session.close()
            raise
        return cls(session, ws, identity, terms)

    async def send_raw(self, data: bytes) -> None:
        """Any bytes as one frame inside the sealed channel (what a hostile device can send)."""
        prefix = bytes(LENGTH_BYTES) if self.layout is Layout.DETACHED else b""
        await self.ws.send_bytes(prefix + self.cipher.seal(data))

    async def send_frame(self, frame: Frame) -> None:
        await self.ws.send_bytes(self.sealer.seal(frame))

    async def send(self, envelope: Envelope) -> Frame:
        """Send an envelope and return the relay's answer (ACCEPTED or ERROR)."""
        await self.send_frame(Send(envelope.raw))
        return await self.recv_not_deliver()

    async def recv(self, timeout: float = 5.0) -> Frame:
        message = await self.ws.receive(timeout=timeout)
        if message.type != aiohttp.WSMsgType.BINARY:
            raise ConnectionError(f"relay sent {message.type.name}: {message.data!r}")
        head, detached = self.opener.open(message.data)
        return decode_frame(head, MAX_FRAME, detached)

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
                    await self.send_frame(Ack(frame.tag))
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


async def send_until_gone(device: RawDevice, sender: Identity, recipient: PublicKey,
                          accepted: list[bytes]) -> None:
    """SEND one message after another until the connection breaks (a relay killed under it);
    the msg_ids answered ACCEPTED are appended to `accepted` as they come."""
    for i in range(10_000):
        envelope = sealed(sender, [recipient], f"m{i}".encode())
        try:
            answer = await device.send(envelope)
        except (ConnectionError, asyncio.TimeoutError, OSError):
            return
        if isinstance(answer, Accepted):
            accepted.append(envelope.msg_id)
