"""One authenticated WebSocket to one relay: the handshake, then frames in and out.

This is the thin I/O shell: it moves frames and proves identities, and
decides nothing about messages (that is `inbox` and `device`).  The
handshake authenticates both ends: the device signs the relay's nonce, the
relay signs ours, and only then does its key become one whose EXPIRY notices
the device trusts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import aiohttp
import structlog

from proto import DEFAULT_LIMITS, Identity, Limits, PublicKey
from proto.errors import ProtocolError, UnexpectedFrameError, error_for_code
from proto.frames import (NONCE_BYTES, Ack, Challenge, Error, Frame, Hello, Welcome,
                          decode_frame, encode_frame)

log = structlog.get_logger("continuum.client")
F = TypeVar("F", bound=Frame)

# Pings from our side find a relay that vanished without closing (NAT timeout, power cut).
HEARTBEAT_S = 20.0


class RelayConnection:
    """An open, authenticated connection; `frames()` ends when the socket closes."""

    def __init__(self, url: str, ws: aiohttp.ClientWebSocketResponse, relay_key: PublicKey,
                 welcome: Welcome, received_at_ms: int, limits: Limits) -> None:
        self.url = url
        self.relay_key = relay_key
        self.max_envelope_bytes = welcome.max_envelope_bytes
        # Relay clock minus ours: envelopes are stamped in relay time, so a device
        # with a wrong clock is not refused as STALE.
        self.clock_offset_ms = welcome.server_time_ms - received_at_ms
        self._ws = ws
        self._limits = limits

    @property
    def closed(self) -> bool:
        return self._ws.closed

    async def send_frame(self, frame: Frame) -> None:
        """Write one frame; ConnectionError if the socket is gone."""
        if self._ws.closed:
            raise ConnectionResetError(f"connection to {self.url} is closed")
        await self._ws.send_bytes(encode_frame(frame))

    async def ack(self, tag: str) -> None:
        """Acknowledge a delivery; on a closed socket the relay re-delivers it, so ignore."""
        try:
            await self.send_frame(Ack(tag))
        except ConnectionError:
            pass

    async def frames(self) -> AsyncIterator[Frame]:
        async for message in self._ws:
            if message.type is not aiohttp.WSMsgType.BINARY:
                if message.type is aiohttp.WSMsgType.ERROR:
                    return
                log.warning("relay_sent_non_binary_message", relay=self.url)
                continue
            try:
                yield decode_frame(message.data, self._limits.max_frame_bytes)
            except ProtocolError as exc:
                log.warning("relay_sent_bad_frame", relay=self.url, error=exc.message)

    async def close(self) -> None:
        await self._ws.close()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _receive_frame(ws: aiohttp.ClientWebSocketResponse, limits: Limits) -> Frame:
    message = await ws.receive()
    if message.type is not aiohttp.WSMsgType.BINARY:
        raise ConnectionResetError(f"relay closed the connection during the handshake "
                                   f"({message.type.name}: {message.extra or message.data})")
    return decode_frame(message.data, limits.max_frame_bytes)


def _expect(frame: Frame, expected: type[F]) -> F:
    """The frame if it is `expected`; the relay's own error if it refused us."""
    if isinstance(frame, Error):
        raise error_for_code(frame.code, frame.message)
    if not isinstance(frame, expected):
        raise UnexpectedFrameError(
            f"expected {expected.__name__.upper()}, got {type(frame).__name__.upper()}")
    return frame


@asynccontextmanager
async def connect(url: str, identity: Identity, *, limits: Limits = DEFAULT_LIMITS,
                  handshake_timeout_s: float = 10.0) -> AsyncIterator[RelayConnection]:
    """Open `url` and authenticate, or raise (OSError, aiohttp.ClientError, TimeoutError,
    ProtocolError: e.g. UnauthenticatedError when the relay refuses this key)."""
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(handshake_timeout_s):
            ws = await http.ws_connect(url, heartbeat=HEARTBEAT_S, autoping=True,
                                       max_msg_size=2 * limits.max_frame_bytes)
        try:
            async with asyncio.timeout(handshake_timeout_s):
                challenge = _expect(await _receive_frame(ws, limits), Challenge)
                client_nonce = os.urandom(NONCE_BYTES)
                await ws.send_bytes(encode_frame(Hello.answer(challenge, identity, client_nonce)))
                welcome = _expect(await _receive_frame(ws, limits), Welcome)
                welcome.verify(challenge, identity.public, client_nonce)
            yield RelayConnection(url, ws, challenge.relay_key, welcome, _now_ms(), limits)
        finally:
            await ws.close()
