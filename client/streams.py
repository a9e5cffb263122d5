"""Streams for the application (SPEC §16): `Stream`, `StreamRequest`, and the glue between
the device's pure stream rules (`stream_rules`) and its relay connection.

A stream is a live, end-to-end encrypted byte stream to one peer, through the
relay, never stored.  Its data is sealed with the stream's own keys, so the
relay can neither read it nor drop, repeat, reorder or cut it unnoticed: a
cut is an error (`StreamBrokenError`), never an early end of the data.

    stream = await device.open_stream(peer, "tcp/80", timeout=10)
    await stream.write(b"GET / HTTP/1.0\\r\\n\\r\\n")
    await stream.close()              # our FIN: we send no more; reading goes on
    while chunk := await stream.read():
        ...                           # b"" once the peer closed its side

    async def serve(request: StreamRequest) -> None:      # device.on_stream(serve)
        if request.service != "tcp/80":
            await request.refuse("no such service")
            return
        async with await request.accept() as stream:
            ...

Flow control is per stream: `write` waits while the peer has not granted
credit (its reader is slow), and the peer grants credit as its application
reads, so a slow reader slows its writer and nothing piles up anywhere.
Streams live on the device's relay connection: when it drops, every stream
ends with StreamBrokenError at both ends, and nothing is ever resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Container
from types import TracebackType

from proto import Envelope, Identity, PublicKey
from proto.errors import (PeerUnreachableError, ProtocolError, StreamBrokenError,
                          StreamRefusedError)
from proto.frames import StreamFrame
from proto.streams import OpenRequest
from runtime.clock import now_ms
from runtime.logs import library_logger

from .connection import RelayConnection
from .freshness import device_now_ms
from .stream_rules import DEFAULT_WINDOW, Changed, DeviceStreams, Offered, State, StreamEnd

log = library_logger("continuum.client")

# Largest chunk this device seals (the relay's envelope limit may make it smaller).
MAX_CHUNK_BYTES = 256 * 1024
DEFAULT_READ_BYTES = 64 * 1024
# A relay answers every open within its deadline (10 s by default); one that says nothing
# for this long does not carry streams (it predates them, SPEC §13).
ANSWER_TIMEOUT_S = 30.0

StreamHandler = Callable[["StreamRequest"], Awaitable[None]]


class _OneStream:
    """What a stream and a request for one both say: who is at the other end, and what was
    asked for."""

    _end: StreamEnd

    @property
    def peer(self) -> PublicKey:
        return self._end.peer

    @property
    def service(self) -> str:
        return self._end.service


class Stream(_OneStream):
    """One open stream; `peer` is the device at its other end, `service` what was asked for.

    `read` and `write` raise the stream's error once it has ended badly:
    StreamBrokenError (cut, aborted, a chunk that does not open, the connection
    lost), or the code the other end gave (e.g. StreamRefusedError).
    """

    def __init__(self, hub: StreamHub, end: StreamEnd) -> None:
        self._hub, self._end = hub, end
        self._changed = asyncio.Event()

    @property
    def stream_id(self) -> bytes:
        return self._end.stream_id

    @property
    def error(self) -> ProtocolError | None:
        """Why the stream ended, if it ended otherwise than by both ends' FIN."""
        return self._end.error

    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        """Up to `max_bytes` bytes, waiting for some; b"" once the peer closed its side
        and everything before was read."""
        while True:
            data = self._hub.rules.read(self._end, max_bytes)
            await self._hub.flush()  # the credit that reading gave back
            if data is None:
                return b""
            if data:
                return data
            await self._wait()

    async def write(self, data: bytes) -> None:
        """Send all of `data`, waiting while the peer's window is full."""
        view = memoryview(data)
        while view:
            taken = self._hub.rules.write(self._end, view, self._hub.max_chunk)
            await self._hub.flush()
            view = view[taken:]
            if view:
                await self._wait()

    async def close(self) -> None:
        """Send our FIN: we send nothing more (a half-close); the peer's data can still be
        read until its own FIN.  Does nothing if the stream has already ended."""
        end = self._end
        while not end.finished and end.error is None:
            if self._hub.rules.finish(end):
                self._hub.settle(end)
                await self._hub.flush()
                return
            await self._wait()

    def abort(self, reason: str = "aborted by the application") -> None:
        """End the stream now, both ways; the peer's reads and writes raise with `reason`."""
        self._hub.abort(self._end, StreamBrokenError(reason))

    @property
    def at_end(self) -> bool:
        """Both ends closed (FIN), or the stream ended otherwise."""
        return self._end.state is State.ENDED

    async def _wait(self) -> None:
        self._changed.clear()
        if self._end.state is State.ENDED and self._end.error is not None:
            raise self._end.error
        await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        """Leaving normally sends our FIN; leaving by an exception aborts."""
        if exc is not None:
            self.abort(f"the application failed: {type(exc).__name__}")
        else:
            await self.close()


class StreamRequest(_OneStream):
    """A peer asks to open a stream: `accept` it (giving a `Stream`) or `refuse` it.  One
    left unanswered when the handler returns is refused."""

    def __init__(self, hub: StreamHub, end: StreamEnd, envelope: Envelope,
                 request: OpenRequest, identity: Identity, connection: RelayConnection) -> None:
        self._hub, self._end, self._envelope, self._request = hub, end, envelope, request
        self._identity, self._connection = identity, connection

    @property
    def answered(self) -> bool:
        return self._end.state is not State.OFFERED

    async def accept(self, window: int = DEFAULT_WINDOW) -> Stream:
        """Open the stream; `window` is how many bytes the peer may send before we read."""
        if self._end.error is not None:
            raise self._end.error
        try:
            self._hub.rules.accept(self._end, self._identity, self._request, self._envelope,
                                   now_ms=self._hub.now_ms(self._connection),
                                   limits=self._connection.limits, window=window)
        except ProtocolError as exc:
            self._hub.abort(self._end, exc)
            raise
        stream = self._hub.adopt(self._end)
        await self._hub.flush()
        return stream

    def abort(self, reason: str) -> None:
        """End the stream, accepted or not (the handler failed)."""
        self._hub.abort(self._end, StreamBrokenError(reason))

    async def refuse(self, reason: str = "refused") -> None:
        """Refuse the stream: the opener's `open_stream` raises StreamRefusedError(reason)."""
        if self._end.state is State.OFFERED:
            self._hub.rules.abort(self._end, StreamRefusedError(reason))
            await self._hub.flush()


class StreamHub:
    """The device's streams: the pure rules, the `Stream` objects waiting on them, the
    connection they live on, and the application's handler of incoming streams."""

    def __init__(self, peers: Container[PublicKey], identity: Callable[[], Identity]) -> None:
        """`peers`: who may open streams here (the device's live peer list); `identity`: the
        device's key now (it changes with a rotation)."""
        self.rules = DeviceStreams(is_peer=peers)
        self._identity = identity
        self._streams: dict[bytes, Stream] = {}
        self._waiting_open: dict[bytes, asyncio.Future[None]] = {}
        self._connection: RelayConnection | None = None
        self._handler: StreamHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.max_chunk = MAX_CHUNK_BYTES

    def now_ms(self, connection: RelayConnection) -> int:
        return device_now_ms(now_ms(), connection.clock_offset_ms)

    def on_stream(self, handler: StreamHandler | None) -> None:
        self._handler = handler

    async def open(self, connection: RelayConnection, peer: PublicKey, service: str, *,
                   window: int) -> Stream:
        self._use(connection)
        end = self.rules.open(self._identity(), peer, service,
                              now_ms=self.now_ms(connection), limits=connection.limits,
                              window=window)
        stream = self.adopt(end)
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting_open[end.stream_id] = answered
        try:
            await self.flush()
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                await answered
        except TimeoutError:
            self._waiting_open.pop(end.stream_id, None)
            self.abort(end, StreamBrokenError("the opener gave up waiting"))
            raise PeerUnreachableError(
                f"no answer to the open within {ANSWER_TIMEOUT_S:g}s: a relay that carries"
                " streams answers every open within its own deadline, so this one may not"
                " (SPEC §16, versioning)") from None
        except BaseException:
            self._waiting_open.pop(end.stream_id, None)
            self.abort(end, StreamBrokenError("the opener gave up waiting"))
            raise
        if end.error is not None:
            raise end.error
        return stream

    def adopt(self, end: StreamEnd) -> Stream:
        stream = Stream(self, end)
        self._streams[end.stream_id] = stream
        return stream

    # -- from the relay --------------------------------------------------------------------------

    async def on_frame(self, frame: StreamFrame, connection: RelayConnection) -> None:
        identity = self._identity()
        if connection.device_key != identity.public:
            return  # an old key's connection, draining its mailbox: no streams there
        self._use(connection)
        local_ms = now_ms()
        event = self.rules.receive(
            frame, identity, now_ms=device_now_ms(local_ms, connection.clock_offset_ms),
            limits=connection.limits, local_ms=local_ms)
        if isinstance(event, Offered):
            self._offered(event, identity, connection)
        elif isinstance(event, Changed):
            self._changed(event.end)
        await self.flush()

    def _offered(self, event: Offered, identity: Identity, connection: RelayConnection) -> None:
        request = StreamRequest(self, event.end, event.envelope, event.request, identity,
                                connection)
        handler = self._handler
        if handler is None:
            self.rules.abort(event.end, StreamRefusedError("this device takes no streams"))
            return
        task = asyncio.create_task(self._serve(handler, request), name="continuum-stream")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, handler: StreamHandler, request: StreamRequest) -> None:
        try:
            await handler(request)
        except Exception:  # the application's bug ends its stream, never the device
            log.exception("stream_handler_failed", peer=request.peer.text,
                          service=request.service)
            request.abort("the peer's stream handler failed")
        finally:
            if not request.answered:
                await request.refuse("not accepted")

    def abort(self, end: StreamEnd, error: ProtocolError) -> None:
        """End a stream now and tell the other end (sent as soon as possible)."""
        if end.state is State.ENDED:
            return
        self.rules.abort(end, error)
        self._changed(end)
        self.flush_soon()

    def settle(self, end: StreamEnd) -> None:
        """Forget a stream that has ended (its `Stream` keeps what is unread)."""
        if end.state is State.ENDED:
            self._streams.pop(end.stream_id, None)

    def _changed(self, end: StreamEnd) -> None:
        answered = self._waiting_open.get(end.stream_id)
        if answered is not None and end.state is not State.OPENING:
            del self._waiting_open[end.stream_id]
            if not answered.done():
                answered.set_result(None)
        stream = self._streams.get(end.stream_id)
        if stream is not None:
            stream._wake()
        self.settle(end)

    def connection_lost(self, connection: RelayConnection) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        for end in self.rules.connection_lost():
            self._changed(end)

    # -- to the relay ----------------------------------------------------------------------------

    def _use(self, connection: RelayConnection) -> None:
        if self._connection is not connection:
            if self._connection is not None:  # the old one dropped without telling us yet
                for end in self.rules.connection_lost():
                    self._changed(end)
            self._connection = connection
            self.max_chunk = min(MAX_CHUNK_BYTES, connection.limits.max_envelope_bytes)

    async def flush(self) -> None:
        frames = self.rules.frames_to_send()
        connection = self._connection
        if not frames or connection is None:
            return
        try:
            await connection.send_stream(frames)
        except ConnectionError:
            pass  # the connection's end ends every stream (`connection_lost`)

    def flush_soon(self) -> None:
        """`flush` from code that cannot wait (an abort)."""
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
