"""Write a session's outgoing frames straight to the socket, a batch per system call.

aiohttp's `send_bytes` costs one `send()` system call per frame, which was a
fifth of the relay's CPU under load (benchmarks/profile_relay.py), and a
mailbox fetch yields up to `delivery_window` DELIVERs at once.  Here a batch
of frames becomes one `transport.write`.  Each write is synchronous and whole,
so frames from the reader and the delivery pass never interleave and need no
lock.  Frames are RFC 6455 unmasked binary frames without RSV1: valid whether
or not permessage-deflate was negotiated, and sealed envelopes do not compress.
"""

from __future__ import annotations

import struct

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

_FIN_BINARY = 0x82
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def ws_frame(payload: bytes) -> bytes:
    """One complete server-to-client binary WebSocket frame (RFC 6455 §5.2)."""
    size = len(payload)
    if size < 126:
        return _SHORT.pack(_FIN_BINARY, size) + payload
    if size < 65536:
        return _MEDIUM.pack(_FIN_BINARY, 126, size) + payload
    return _LONG.pack(_FIN_BINARY, 127, size) + payload


class FrameWriter:
    """The write side of one prepared WebSocket; `stream` is what `ws.prepare()` returned."""

    __slots__ = ("_ws", "_stream")  # one per connected device

    def __init__(self, ws: web.WebSocketResponse, stream: AbstractStreamWriter) -> None:
        self._ws = ws
        self._stream = stream

    async def write(self, payloads: list[bytes]) -> None:
        """Send these frames in order in one write, then wait while the device reads slowly.

        Raises ConnectionResetError once the WebSocket is closing, as aiohttp
        does: no data frame may follow a CLOSE.
        """
        transport = self._stream.transport
        if self._ws.closed or transport is None or transport.is_closing():
            raise ConnectionResetError("cannot write to a closing WebSocket")
        transport.write(b"".join([ws_frame(payload) for payload in payloads]))
        await self._stream.drain()  # returns at once unless the socket's buffer is full
