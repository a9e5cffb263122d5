"""A listening socket whose every accepted TCP socket is counted until it is really gone.

aiohttp's own sites accept without limit, and a socket that never completes a
request (slowloris) reaches no handler, middleware or connection gate; a
socket whose handler has ended can still hold unsent data in the kernel.  So
both services count here, in the protocol factory, the first code that sees
an accepted socket: from `connection_made` to `connection_lost`, whatever
state the socket dies in.  One over the cap is aborted (RST) before aiohttp
allocates anything for it.

Only public API: aiohttp's `runner.server` is the protocol factory its own
sites hand to `loop.create_server`; `SocketCap` wraps each protocol it makes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable


class SocketCap:
    """A protocol factory for `loop.create_server`: `inner`'s protocols, at most `limit` open.

    `on_refused(first)` is called for every socket refused, `first` being True
    for the first of an episode (since the last socket admitted), so a caller
    can log once and count always.
    """

    def __init__(self, inner: Callable[[], asyncio.Protocol], limit: int,
                 on_refused: Callable[[bool], None] = lambda first: None) -> None:
        self._inner = inner
        self.limit = limit
        self._on_refused = on_refused
        self.open = 0
        self.refused = 0
        self._refusing = False

    def __call__(self) -> asyncio.Protocol:
        return _Counted(self)

    def _admit(self) -> bool:
        if self.open >= self.limit:
            self.refused += 1
            self._on_refused(not self._refusing)
            self._refusing = True
            return False
        self.open += 1
        self._refusing = False
        return True


class _Counted(asyncio.Protocol):
    """Forwards every protocol event to the inner protocol, created only once admitted."""

    __slots__ = ("_cap", "_inner")

    def __init__(self, cap: SocketCap) -> None:
        self._cap = cap
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._cap._admit():
            transport.abort()  # connection_lost follows; nothing else ever saw this socket
            return
        self._inner = self._cap._inner()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            self._cap.open -= 1
            inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


async def listen(cap: SocketCap, host: str, port: int,
                 tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """Serve `cap`'s protocols on host:port (port 0: a free one), over TLS with `tls`."""
    return await asyncio.get_running_loop().create_server(cap, host, port, reuse_address=True,
                                                          ssl=tls)
