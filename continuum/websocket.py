"""The device WebSocket: a session's frames go out in one system call per event-loop turn.

aiohttp's `send_bytes` costs one `send()` system call per frame, which was a
fifth of the relay's CPU under load (benchmarks/profile_relay.py).  Under load
the reader answers every SEND buffered in one TCP read, and a mailbox fetch
yields up to `delivery_window` DELIVERs, all in the same loop turn.  So
`write_frames` queues complete frames and one `transport.write` at the end of
the turn sends them all.  Queuing and writing are synchronous and whole, so
frames from the reader and the delivery pass never interleave and need no lock.

Frames are RFC 6455 unmasked binary frames without RSV1: valid whether or not
permessage-deflate was negotiated (sealed envelopes do not compress anyway).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from aiohttp import WSMessage, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from .framing import FramingBudget

_FIN_BINARY = 0x82
_FIN_CLOSE = 0x88
_FIN_PONG = 0x8A
_CLOSE_CODE = struct.Struct("!H")
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def ws_header(size: int) -> bytes:
    """The header of a server-to-client binary WebSocket frame of `size` bytes (RFC 6455
    §5.2).  It is queued apart from its payload, which is then copied once, into the turn's
    single write, rather than twice (a stream chunk is 64 KiB)."""
    if size < 126:
        return _SHORT.pack(_FIN_BINARY, size)
    if size < 65536:
        return _MEDIUM.pack(_FIN_BINARY, 126, size)
    return _LONG.pack(_FIN_BINARY, 127, size)


class DeviceWebSocket(web.WebSocketResponse):
    """A WebSocketResponse with `write_frames`: binary frames written once per loop turn."""

    # Slots, not new keys in the inherited instance __dict__, which would make
    # it resize and cost about 1 KiB more per connection.
    __slots__ = ("_stream", "_queued", "_drainer", "_framing")

    def __init__(self, **kwargs: Any) -> None:
        # No CLOSE answered from inside `receive`: the session first answers the SENDs still
        # in flight when the device's CLOSE arrives, then closes (session.py).  No PING
        # answered there either: `receive` would answer a flood of them without returning,
        # so the session sees each one, pays for it (its frame rate) and answers it.
        super().__init__(autoclose=False, autoping=False, **kwargs)
        self._stream: AbstractStreamWriter | None = None
        self._queued: list[bytes] | None = None  # frames waiting for the end of this loop turn
        self._drainer: asyncio.Future[None] | None = None  # see `drain`
        self._framing = FramingBudget()

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter:
        self._stream = await super().prepare(request)
        # Every byte the peer sends passes `_Measured` on its way to aiohttp's parser.
        protocol = request.protocol
        protocol._payload_parser = _Measured(protocol._payload_parser, self._framing,
                                             self._stream.transport)
        return self._stream

    def authenticated(self) -> None:
        """The peer is a device: it may send messages as large as this WebSocket reads."""
        self._framing.authenticated(self._max_msg_size)

    async def receive(self, timeout: float | None = None) -> WSMessage:
        message = await super().receive(timeout)
        data = message.data
        self._framing.taken(len(data) if isinstance(data, (bytes, str)) else 0)
        return message

    def write_frames(self, payloads: list[bytes]) -> None:
        """Queue these frames, in order, for one write at the end of this loop turn.

        Raises ConnectionResetError once the WebSocket is closing, as aiohttp
        does: no data frame may follow a CLOSE.  Callers that must not outrun
        a slow reader then await `drain()`.
        """
        if self._no_more_frames():
            raise ConnectionResetError("cannot write to a closing WebSocket")
        queued = self._queue()
        for payload in payloads:
            queued += (ws_header(len(payload)), payload)

    def write_pong(self, payload: bytes) -> None:
        """Queue the PONG that answers a PING carrying `payload` (at most 125 bytes, as the
        reader checks of every control frame), with this turn's other frames.  Nothing once
        the WebSocket is closing: no frame may follow a CLOSE, and a PING needs no answer
        then."""
        if self._no_more_frames():
            return
        self._queue().extend((_SHORT.pack(_FIN_PONG, len(payload)), payload))

    def _no_more_frames(self) -> bool:
        """No frame may be queued any more: closed, or its socket is going."""
        assert self._stream is not None, "write before prepare"
        transport = self._stream.transport
        return self.closed or transport is None or transport.is_closing()

    def _queue(self) -> list[bytes]:
        """This turn's queue, and its write at the end of the turn, started by the first frame."""
        if self._queued is None:
            self._queued = []
            asyncio.get_running_loop().call_soon(self.flush)
        return self._queued

    async def drain(self, timeout_s: float) -> bool:
        """Wait while the device reads too slowly; False if what is queued did not drain within
        `timeout_s`.  ConnectionResetError if the socket went away meanwhile.

        aiohttp's drain waits on one future shared by every writer of the
        socket, and cancelling a wait for it (a timeout) cancels that future
        for all of them; so the wait runs in one task of its own per socket,
        which callers watch with a deadline but never cancel.
        """
        assert self._stream is not None, "drain before prepare"
        transport = self._stream.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the WebSocket is closing")
        if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[0]:
            return True  # below the low-water mark writing is never paused: the usual case
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._stream.drain())
        done, _ = await asyncio.wait((self._drainer,), timeout=timeout_s)
        if not done or self._drainer.cancelled():
            return False
        if self._drainer.exception() is not None:
            raise ConnectionResetError("the WebSocket went away while draining")
        return True

    def buffered_bytes(self) -> int:
        """Bytes written but not yet taken by the kernel (0 once the transport is gone)."""
        transport = self._stream.transport if self._stream is not None else None
        return transport.get_write_buffer_size() if transport is not None else 0

    def abort(self) -> None:
        """Drop the socket now, with whatever it still had to send.

        A plain close keeps a socket open until its unsent data is read, which
        a device that stopped reading never does: it would hold that memory for
        good.
        """
        transport = self._stream.transport if self._stream is not None else None
        if transport is not None:
            transport.abort()
        self._stop_heartbeat()

    def flush(self) -> None:
        """Write every queued frame now, in one system call."""
        queued, self._queued = self._queued, None
        if queued and not self._no_more_frames():
            assert self._stream is not None and self._stream.transport is not None
            self._stream.transport.write(b"".join(queued))

    def close_at_once(self, code: int, reason: bytes) -> None:
        """Send what is queued and a CLOSE frame, then end the TCP connection without waiting
        for the peer's CLOSE (RFC 6455 §7.1.1 lets the server close TCP first).

        For peers that never authenticated: a flood that ignores our CLOSE would
        otherwise keep each refused socket, and the objects behind it, alive for
        the whole close timeout.  What the kernel does not take at once (only a
        peer that reads nothing leaves any) is dropped rather than kept.
        """
        self.flush()
        self._stop_heartbeat()
        transport = self._stream.transport if self._stream is not None else None
        if transport is None or transport.is_closing():
            return
        payload = _CLOSE_CODE.pack(code) + reason[:123]  # control frames carry <= 125 bytes
        transport.write(_SHORT.pack(_FIN_CLOSE, len(payload)) + payload)
        transport.close()
        if transport.get_write_buffer_size():
            transport.abort()

    async def close(self, *, code: int = 1000, message: bytes = b"", drain: bool = True) -> bool:
        """Frames queued before the close go out before the CLOSE frame, as if sent at once.

        aiohttp itself calls close() when the device closes or breaks the
        protocol, so a SEND answered in the same loop turn still gets its answer,
        and once more when the handler returns.  A transport already closing
        (closed at once, aborted, gone) takes no CLOSE frame: aiohttp would try
        to write one anyway, fail, and keep the exception, whose traceback holds
        this response and the whole connection behind it in a reference cycle
        that only the garbage collector frees; under a flood of refused
        handshakes those cycles made the collections that paused known devices.
        """
        transport = self._stream.transport if self._stream is not None else None
        if transport is None or transport.is_closing():
            self._stop_heartbeat()
            return False
        self.flush()
        return await super().close(code=code, message=message, drain=drain)

    def _stop_heartbeat(self) -> None:
        """Cancel aiohttp's heartbeat timer once we end the connection ourselves.

        aiohttp cancels it in its own close paths, which a connection we close
        at once or abort never takes; the timer then holds this response, its
        request handler and transport (about 35 objects) until it fires, up to
        `heartbeat_s` later.  A flood of refused handshakes (2,000/s) kept some
        60,000 such connections alive, and each full garbage collection over them
        stalled the relay for 0.3-0.5 s.
        """
        self._cancel_heartbeat()


class _Measured:
    """aiohttp's WebSocket parser, behind a `FramingBudget`: a peer whose bytes go beyond
    the messages it completes is cut off (see `continuum.framing`)."""

    __slots__ = ("_parser", "_budget", "_transport")

    def __init__(self, parser: Any, budget: FramingBudget,
                 transport: asyncio.BaseTransport | None) -> None:
        self._parser = parser
        self._budget = budget
        self._transport = transport

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self._budget.read(len(data)):
            return self._parser.feed_data(data)
        if self._transport is not None:
            self._transport.abort()
        return True, b""

    def feed_eof(self) -> None:
        self._parser.feed_eof()
