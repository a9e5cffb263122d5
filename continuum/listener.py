"""The relay's listening socket: every accepted TCP socket is counted until it is really gone.

Counting at the WebSocket handler misses sockets that never send a complete
request (slowloris) and sockets whose handler ended while the kernel still
holds their unsent data.  So the count is kept here, from `connection_made`
to `connection_lost`, around aiohttp's own per-socket protocol, and a socket
beyond `max_sockets` is aborted the moment it is accepted.

Only public API is used: aiohttp's `runner.server` is the protocol factory
its own sites hand to `loop.create_server`; this wraps each protocol it makes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class SocketCount:
    """Open sockets of one relay process, against the cap."""

    def __init__(self, max_sockets: int, on_refused: Callable[[], None]) -> None:
        self.max_sockets = max_sockets
        self.open = 0
        self._on_refused = on_refused


class _CountedProtocol(asyncio.Protocol):
    """Delegates every callback to aiohttp's protocol; counts the socket while it exists."""

    __slots__ = ("_inner", "_count", "_counted")

    def __init__(self, inner: asyncio.Protocol, count: SocketCount) -> None:
        self._inner, self._count, self._counted = inner, count, False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        count = self._count
        if count.open >= count.max_sockets:
            count._on_refused()
            transport.abort()  # connection_lost follows; the inner protocol never saw it
            return
        count.open += 1
        self._counted = True
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._count.open -= 1
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._counted:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._counted else None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


async def listen(factory: Callable[[], asyncio.Protocol], host: str, port: int,
                 count: SocketCount) -> asyncio.Server:
    """Serve `factory`'s protocols on host:port, each socket counted in `count`."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _CountedProtocol(factory(), count), host, port,
                                    reuse_address=True)
