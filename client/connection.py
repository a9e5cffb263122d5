"""One authenticated WebSocket to one relay: the I/O shell around `DeviceProtocol`.

It moves bytes and enforces the handshake deadline; every rule (what the
handshake proves, which limits apply, what a frame means) is the protocol
object's, and what a message means to the device is `inbox`'s and `device`'s.
The handshake authenticates both ends: the device signs the relay's nonce,
the relay signs ours, and only then does its key become one whose EXPIRY
notices the device trusts.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager

import aiohttp

from proto import Identity, Limits, PublicKey
from proto.channel import DETACHED_SUBPROTOCOL, OVERHEAD_BYTES, Layout
from proto.frames import NONCE_BYTES, StreamFrame
from proto.handshake import EPHEMERAL_SEED_BYTES, HANDSHAKE_FRAME_MAX_BYTES
from runtime.clock import now_ms
from runtime.logs import library_logger

from .protocol import BadFrame, Connected, DeviceProtocol, Event

log = library_logger("continuum.client")

# Pings from our side find a relay that vanished without closing (NAT timeout, power cut).
# A setting (`Device(keepalive_s=…)`, `--keepalive`): a battery-powered device pings less often.
DEFAULT_KEEPALIVE_S = 20.0


class RelayConnection:
    """An open, authenticated connection; `events()` ends when the socket closes."""

    def __init__(self, url: str, ws: aiohttp.ClientWebSocketResponse, protocol: DeviceProtocol,
                 connected: Connected, device_key: PublicKey) -> None:
        self.url = url
        # The key this connection authenticated as: a device that rotates holds two at once.
        self.device_key = device_key
        self.relay_key: PublicKey = connected.terms.relay_key
        self.limits: Limits = connected.terms.limits
        self.clock_offset_ms = connected.clock_offset_ms
        self.layout: Layout = protocol.layout
        self._ws = ws
        self._protocol = protocol
        # One writer at a time: aiohttp may wait for the socket to drain between two frames
        # of one writer, and a frame of another writer written then would leave the channel
        # out of order (each frame is sealed with its place in the sequence).
        self._writing = asyncio.Lock()

    @property
    def closed(self) -> bool:
        return self._ws.closed

    async def send(self, envelope: bytes) -> None:
        """Write one SEND; OversizeError if the relay would refuse it, ConnectionError if the
        socket is gone."""
        if self._ws.closed:
            raise ConnectionResetError(f"connection to {self.url} is closed")
        self._protocol.send(envelope)
        await self._flush()

    async def ack(self, tag: str) -> None:
        """Acknowledge a delivery; on a closed socket the relay re-delivers it, so ignore."""
        if self._ws.closed:
            return
        self._protocol.ack(tag)
        try:
            await self._flush()
        except ConnectionError:
            pass

    async def send_stream(self, frames: list[StreamFrame]) -> None:
        """Write stream frames, in order; ConnectionError if the socket is gone (the
        streams then end with the connection)."""
        if self._ws.closed:
            raise ConnectionResetError(f"connection to {self.url} is closed")
        self._protocol.send_stream(frames)
        await self._flush()

    async def events(self) -> AsyncIterator[Event]:
        async for message in self._ws:
            if message.type is aiohttp.WSMsgType.ERROR:
                return
            if message.type is aiohttp.WSMsgType.BINARY:
                event = self._protocol.receive(message.data, now_ms())
            else:
                event = self._protocol.receive_non_binary()
            if isinstance(event, BadFrame):
                log.warning("relay_sent_bad_frame", relay=self.url, error=event.detail)
            if event is not None:
                yield event

    async def close(self) -> None:
        await self._ws.close()

    async def _flush(self) -> None:
        async with self._writing:
            for frame in self._protocol.data_to_send():
                await self._ws.send_bytes(frame)


async def _receive_handshake_message(ws: aiohttp.ClientWebSocketResponse) -> bytes:
    message = await ws.receive()
    if message.type is not aiohttp.WSMsgType.BINARY:
        raise ConnectionResetError(f"relay closed the connection during the handshake "
                                   f"({message.type.name}: {message.extra or message.data})")
    return bytes(message.data)


@asynccontextmanager
async def connect(url: str, identity: Identity, *, max_envelope_bytes: int,
                  handshake_timeout_s: float = 10.0,
                  keepalive_s: float = DEFAULT_KEEPALIVE_S,
                  pinned_relay_keys: Collection[PublicKey] | None = None,
                  tls: ssl.SSLContext | None = None) -> AsyncIterator[RelayConnection]:
    """Open `url` and authenticate, or raise (OSError, aiohttp.ClientError, TimeoutError,
    ProtocolError: e.g. UnauthenticatedError when the relay refuses this key, or holds a
    key that is not among `pinned_relay_keys`).

    `max_envelope_bytes` is this device's cap: the largest envelope it will read,
    whatever the relay announces.  `keepalive_s` is the interval of our pings.  A
    `wss://` URL is verified against `tls` (for a private CA), else the system's
    certificate store.
    """
    read_cap = max(Limits(max_envelope_bytes=max_envelope_bytes).max_frame_bytes
                   + OVERHEAD_BYTES, HANDSHAKE_FRAME_MAX_BYTES)
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(handshake_timeout_s):
            # Offering the detached layout: a relay that predates it selects nothing, and
            # the channel then seals whole frames (SPEC §8).
            ws = await http.ws_connect(url, heartbeat=keepalive_s, autoping=True,
                                       max_msg_size=read_cap, protocols=(DETACHED_SUBPROTOCOL,),
                                       ssl=tls if tls is not None else True)
        try:
            protocol = DeviceProtocol(identity, os.urandom(NONCE_BYTES),
                                      os.urandom(EPHEMERAL_SEED_BYTES), max_envelope_bytes,
                                      pinned_relay_keys, Layout.negotiated(ws.protocol))
            async with asyncio.timeout(handshake_timeout_s):
                connected: Event | None = None
                while connected is None:
                    connected = protocol.receive(await _receive_handshake_message(ws), now_ms())
                    for frame in protocol.data_to_send():
                        await ws.send_bytes(frame)
            assert isinstance(connected, Connected)
            if connected.terms.relay_limit_above_cap:
                log.warning("relay_limit_above_device_cap", relay=url,
                            device_cap=max_envelope_bytes,
                            detail="deliveries larger than the cap cannot be read")
            yield RelayConnection(url, ws, protocol, connected, identity.public)
        finally:
            await ws.close()
