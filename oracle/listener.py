"""The oracle's listening socket: every accepted connection is counted, those over a cap aborted.

aiohttp's own TCPSite accepts without limit, and a socket that never completes
a request reaches no handler or middleware, so the cap sits in the protocol
factory, the first code that sees an accepted socket: a connection over the
cap is aborted (RST) before aiohttp allocates anything for it, and one that
is admitted counts until its connection_lost, whatever state it dies in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog


class ConnectionCap:
    """A protocol factory for `loop.create_server`: `inner`'s protocols, at most `limit` open at once."""

    def __init__(self, inner: Callable[[], asyncio.Protocol], limit: int,
                 log: structlog.typing.FilteringBoundLogger) -> None:
        self._inner, self.limit, self._log = inner, limit, log
        self.open = 0
        self.refused = 0
        self._refusing = False

    def __call__(self) -> asyncio.Protocol:
        return _Counted(self)

    def _admit(self) -> bool:
        if self.open >= self.limit:
            self.refused += 1
            if not self._refusing:  # log once per episode, not once per refused socket
                self._refusing = True
                self._log.warning("connections_over_cap", limit=self.limit)
            return False
        self.open += 1
        self._refusing = False
        return True

    def _closed(self) -> None:
        self.open -= 1


class _Counted(asyncio.Protocol):
    """Forwards every protocol event to aiohttp's handler, created only once admitted."""

    def __init__(self, cap: ConnectionCap) -> None:
        self._cap = cap
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._cap._admit():
            transport.abort()
            return
        self._inner = self._cap._inner()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._cap._closed()
            self._inner.connection_lost(exc)
            self._inner = None

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
