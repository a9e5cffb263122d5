"""The TCP side of a tunnel: one connection, read as the pieces the kernel handed over.

asyncio's StreamReader copies every byte it receives into a bytearray and out
again, pausing and resuming the socket each time that buffer fills; through a
tunnel, where each piece goes straight into a stream chunk, that was about a
sixth of the sending side's CPU (benchmarks/README, "Tunnels").  `TcpSide`
keeps each received `bytes` object whole and hands it on as it is.  What it
holds unread is bounded: past `limit` bytes it stops reading the socket until
the tunnel takes them, so a fast sender meets the stream's flow control.
Writing waits while the kernel's buffer is full (`drain`), as a StreamWriter's
does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from collections.abc import Callable

# Bytes held unread before the socket is no longer read: a few of the largest chunks.
DEFAULT_LIMIT = 1024 * 1024


class TcpSide(asyncio.Protocol):
    """One TCP connection for a tunnel: `read` whole pieces, `write` and `drain`,
    `write_eof` for a half-close, `reset` for an error the application must see.

    One task reads and another writes (the tunnel's two directions), so each has its own
    waiter."""

    def __init__(self, limit: int = DEFAULT_LIMIT,
                 on_connected: Callable[[TcpSide], None] | None = None) -> None:
        self._limit = limit
        self._on_connected = on_connected  # an accepted connection's handler starts here
        self._pieces: deque[bytes] = deque()
        self._held = 0
        self._reading_paused = False
        self._at_eof = False
        self._error: Exception | None = None  # the reset that ended the connection, if one did
        self._writing_paused = False
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()  # done when the socket is

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # interactive traffic (a shell, request/response) must not wait
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._on_connected is not None:
            self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        self._pieces.append(data)
        self._held += len(data)
        if self._held >= self._limit and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._readable = _woken(self._readable)

    def eof_received(self) -> bool:
        self._at_eof = True
        self._readable = _woken(self._readable)
        return True  # keep the socket: the other direction may still write (a half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._at_eof, self._error = True, exc
        self._readable = _woken(self._readable)
        self._writable = _woken(self._writable)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._writable = _woken(self._writable)

    # -- for the tunnel ----------------------------------------------------------------

    @property
    def held(self) -> int:
        """Bytes received and not yet read: about `limit` at most, plus one piece."""
        return self._held

    async def read(self) -> bytes:
        """The next piece received; b"" at the end of the data (the peer's FIN, or our own
        close).  The error if the connection was reset: what it held is not a clean end."""
        while True:
            if self._error is not None:
                raise self._error
            if self._pieces:
                break
            if self._at_eof:
                return b""
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable
        data = self._pieces.popleft()
        self._held -= len(data)
        if self._reading_paused and self._held < self._limit and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        """Return once the kernel takes more; ConnectionResetError once the socket is gone."""
        while True:
            if self.closed.done():
                raise ConnectionResetError("the connection closed")
            if not self._writing_paused:
                return
            self._writable = asyncio.get_running_loop().create_future()
            await self._writable

    def write_eof(self) -> None:
        """Our FIN: the peer reads to its end, and may still send."""
        if self.transport is not None and self.transport.can_write_eof() \
                and not self.transport.is_closing():
            self.transport.write_eof()

    def reset(self) -> None:
        """End the connection with a reset (RST), not a FIN: its application must see an
        error, not the clean end of data that was cut short."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    async def close(self) -> None:
        """Close (after what is written is sent) and wait until the socket is gone."""
        if self.transport is not None:
            self.transport.close()
        await self.closed


def _woken(waiter: asyncio.Future[None] | None) -> None:
    """Wake the task waiting on `waiter`, if one is; there is then none."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
    return None
