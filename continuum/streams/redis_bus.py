"""Stream frames between replicas that share a Redis store: pub/sub, nothing kept.

Two kinds of channel, under the store's key prefix:

- `streams:relay:<replica>`: each replica subscribes to its own, for the
  frames of streams whose other half is on another replica (the message
  names the connection there);
- `streams:device:<key hex>`: a replica subscribes while one of its
  connections is that device's, for offers of new streams (and their
  withdrawals, below); PUBLISH answers how many replicas heard, so an open to
  a device connected nowhere fails at once (PEER_UNREACHABLE) instead of
  waiting for its deadline.

A message is the canonical CBOR array

    [connection uint | null, peer bstr(32), origin_replica tstr, origin_connection uint,
     origin_key bstr(32), frame bstr]

(`connection` null for an offer or a withdrawal).  Nothing is stored in Redis: a frame lives
in a subscriber's output buffer until that replica reads it, and the credit
rules bound what a stream can have there to its window, as on any path.

What is published goes out in order, from one task, pipelined: frames of a
stream keep their order end to end.  When the subscriber connection is lost,
or a publish fails, frames may have been lost, and a lost credit would stall
a stream for good: every stream with a half on another replica is aborted
(STREAM_BROKEN) at the ends this replica serves, and the other ends are sent
the abort; an offer that could not be published fails as PEER_UNREACHABLE.
The answer to an open may have been lost too, leaving the half that sent it
open for good (a stream slot, a tunnel's TCP connection), and this replica
cannot tell where that half is: so every open of a device here still waiting
for its answer ends as well, and is withdrawn (a STREAM_ABORT on the peer's
device channel, on which the half that took it ends, wherever it is).  A
frame published on a replica's channel that no subscriber heard (PUBLISH
answers 0: that replica is resubscribing, or gone) is lost as surely: its
stream ends at the end this replica serves.  Other replicas abort their
halves when the aborts, or their own failures, reach them.  "Lost" includes
the reconnects redis-py makes without raising (`ReportingPubSub`): Redis
drops a subscriber that reads too slowly (`client-output-buffer-limit
pubsub`), and a silent resubscribe would lose frames just the same.  Each
loss is logged (`stream_bus_lost`) and counted by the router
(`continuum_stream_bus_lost`).

A replica that dies without a word (SIGKILL, a lost host) cannot send those
aborts, so every replica publishes its id on `streams:alive` every second;
one that has not been heard for `SILENT_S` is taken for gone, and the streams
with a half there are aborted at the ends here.  (A restarted replica has a
new id: streams never resume.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import structlog
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.client import PubSub

from proto import PublicKey, canonical
from proto.errors import ErrorCode, ProtocolError
from proto.frames import (STREAM_FRAMES, StreamAbort, StreamFrame, StreamOpen, decode_frame,
                          encode_frame)
from proto.limits import Limits
from runtime.tasks import cancel_all_and_wait

from ..store.redis_pubsub import ReportingPubSub
from .router import StreamRouter
from .table import Address

_log = structlog.get_logger("continuum.streams")
_RECONNECT_DELAY_S = 0.5
HEARTBEAT_S = 1.0
SILENT_S = 5.0  # a replica not heard for this long is taken for gone
_BATCH = 256  # messages per pipeline
_MAX_MESSAGE_BYTES = 2 * 1024 * 1024
_UNREACHABLE_STORE = ("this relay cannot reach the store that carries the stream to the other"
                      " relay")
_NOT_LISTENING = ("the other end's relay was not listening to the store that carries the stream"
                  " (it lost its subscription, or is gone): what this relay passed on was lost")


class RedisStreamBus:
    """One per relay process; see the module docstring."""

    def __init__(self, publisher: Redis | RedisCluster, subscriber: Redis, prefix: str) -> None:
        self._publisher = publisher
        self._subscriber = subscriber
        self._prefix = prefix
        self._router: StreamRouter | None = None
        self._pubsub: PubSub | None = None
        self._watched: dict[PublicKey, int] = {}
        self._commands = asyncio.Lock()
        self._outbox: deque[tuple[str, bytes, Callable[[int | None], None]]] = deque()
        self._ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._limits = Limits(max_envelope_bytes=_MAX_MESSAGE_BYTES)
        self._alive_channel = f"{prefix}streams:alive"
        self._heard: dict[str, float] = {}  # other replicas, when last heard

    def _relay_channel(self, replica: str) -> str:
        return f"{self._prefix}streams:relay:{replica}"

    def _device_channel(self, key: PublicKey) -> str:
        return f"{self._prefix}streams:device:{key.raw.hex()}"

    async def start(self, router: StreamRouter) -> None:
        self._router = router
        self._pubsub = ReportingPubSub(self._subscriber, self._reconnected)
        try:
            async with self._commands:
                await self._pubsub.subscribe(self._relay_channel(router.replica),
                                             self._alive_channel)
        except Exception as exc:  # noqa: BLE001 - the listener retries; streams wait for it
            _log.warning("stream_bus_subscribe_failed", error=repr(exc))
        self._tasks = [asyncio.create_task(self._listen(), name="stream-bus-listen"),
                       asyncio.create_task(self._publish_forever(), name="stream-bus-publish"),
                       asyncio.create_task(self._heartbeat(), name="stream-bus-heartbeat")]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_all_and_wait(tasks)
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    # -- who is connected here ----------------------------------------------------------------

    async def watch(self, key: PublicKey) -> None:
        self._watched[key] = self._watched.get(key, 0) + 1
        if self._watched[key] == 1 and self._pubsub is not None:
            try:
                async with self._commands:
                    await self._pubsub.subscribe(self._device_channel(key))
            except Exception as exc:  # noqa: BLE001 - redone by the listener's recovery
                _log.warning("stream_bus_subscribe_failed", error=repr(exc))

    async def unwatch(self, key: PublicKey) -> None:
        count = self._watched.get(key, 0) - 1
        if count > 0:
            self._watched[key] = count
            return
        self._watched.pop(key, None)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                async with self._commands:
                    await self._pubsub.unsubscribe(self._device_channel(key))

    # -- out ------------------------------------------------------------------------------------

    def send(self, route: Address, peer: PublicKey, origin: Address, origin_key: PublicKey,
             frame: StreamFrame) -> None:
        def sent(receivers: int | None) -> None:
            if isinstance(frame, StreamAbort):
                return
            if receivers is None:
                self._failed(route, peer, origin, origin_key, frame, _UNREACHABLE_STORE)
            elif not receivers:
                self._failed(route, peer, origin, origin_key, frame, _NOT_LISTENING)

        self._queue(self._relay_channel(route.replica),
                    self._message(route.connection, peer, origin, origin_key, frame), sent)

    def offer(self, peer: PublicKey, origin: Address, origin_key: PublicKey, frame: StreamOpen,
              stream_id: bytes, delivered_here: int) -> None:
        here = 1 if peer in self._watched else 0

        def offered(receivers: int | None) -> None:
            elsewhere = 0 if receivers is None else receivers - here
            if elsewhere <= 0 and not delivered_here and self._router is not None:
                self._router.unreachable(origin, stream_id)

        self._queue(self._device_channel(peer),
                    self._message(None, peer, origin, origin_key, frame), offered)

    def withdraw(self, peer: PublicKey, origin: Address, origin_key: PublicKey,
                 frame: StreamAbort) -> None:
        """Withdraw an open from every replica serving `peer`, as it was offered."""
        self._queue(self._device_channel(peer),
                    self._message(None, peer, origin, origin_key, frame), lambda receivers: None)

    @staticmethod
    def _message(connection: int | None, peer: PublicKey, origin: Address,
                 origin_key: PublicKey, frame: StreamFrame) -> bytes:
        return canonical.encode([connection, peer.raw, origin.replica, origin.connection,
                                 origin_key.raw, encode_frame(frame)])

    def _queue(self, channel: str, message: bytes,
               done: Callable[[int | None], None]) -> None:
        if not self._tasks:
            done(None)  # stopped
            return
        self._outbox.append((channel, message, done))
        self._ready.set()

    async def _publish_forever(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(_BATCH, len(self._outbox)))]
                results = await self._publish(batch)
                for (_, _, done), result in zip(batch, results):
                    done(result)

    async def _publish(self, batch: list[tuple[str, bytes, Callable[[int | None], None]]]
                       ) -> list[int | None]:
        """Receivers per message, None where the publish failed."""
        try:
            if isinstance(self._publisher, Redis):
                pipe = self._publisher.pipeline(transaction=False)
                for channel, message, _ in batch:
                    pipe.publish(channel, message)
                return [int(n) for n in await pipe.execute()]
            return [int(await self._publisher.publish(channel, message))
                    for channel, message, _ in batch]
        except Exception as exc:  # noqa: BLE001 - any failure: those frames are lost
            _log.warning("stream_bus_publish_failed", error=repr(exc), messages=len(batch))
            return [None] * len(batch)

    def _failed(self, route: Address, peer: PublicKey, origin: Address, origin_key: PublicKey,
                frame: StreamFrame, reason: str) -> None:
        """A frame that could not be published, or that no replica heard: its stream ends
        at the end this replica serves (the other end hears of it when the path works
        again, or from its own replica's loss, or not at all)."""
        if self._router is None or isinstance(frame, StreamOpen):
            return
        self._router.deliver(origin.connection, origin_key, StreamAbort(
            frame.stream_id, int(ErrorCode.STREAM_BROKEN), reason), route, peer)

    # -- in -------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            pubsub = self._pubsub
            assert pubsub is not None
            try:
                message = await pubsub.get_message(timeout=None)
            except Exception as exc:  # noqa: BLE001 - redis-py raises more than RedisError
                self._lost(repr(exc))
                await asyncio.sleep(_RECONNECT_DELAY_S)
                await self._resubscribe(pubsub)
                continue
            if message is not None and message["type"] == "message":
                if message["channel"] == self._alive_channel.encode():
                    self._heard_from(message["data"])
                    continue
                try:
                    self._deliver(message["data"])
                except (ProtocolError, ValueError, TypeError) as exc:
                    _log.warning("stream_bus_bad_message", error=repr(exc))

    def _reconnected(self) -> None:
        """redis-py re-made the subscriber connection without raising: the same loss."""
        self._lost("the subscriber connection was dropped and re-made")

    def _lost(self, error: str) -> None:
        """Frames published to this replica may be gone: end every stream with a half on
        another replica, since a lost credit would stall it at both ends for good."""
        _log.warning("stream_bus_lost", error=error)
        if self._router is not None:
            self._router.lost_replica(None, "the relay of one end lost its connection to the"
                                            " store that carries streams between relays")

    def _deliver(self, data: bytes) -> None:
        value = canonical.decode(data, max_size=_MAX_MESSAGE_BYTES, what="stream bus message")
        if type(value) is not list or len(value) != 6:
            raise ProtocolError("a stream bus message is a 6-element array")
        connection, peer, replica, origin_connection, origin_key, frame_bytes = value
        router = self._router
        assert router is not None
        frame = decode_frame(frame_bytes, self._limits.max_frame_bytes)
        if not isinstance(frame, STREAM_FRAMES) or type(replica) is not str \
                or type(origin_connection) is not int:
            raise ValueError("not a stream frame from a relay")
        origin = Address(replica, origin_connection)
        if connection is None:
            if replica != router.replica and isinstance(frame, (StreamOpen, StreamAbort)):
                router.to_connections_of(PublicKey(peer), frame, origin, PublicKey(origin_key))
            return
        router.deliver(connection, PublicKey(peer), frame, origin, PublicKey(origin_key))

    # -- who else is alive ---------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        router = self._router
        assert router is not None
        while True:
            self._queue(self._alive_channel, router.replica.encode(), lambda receivers: None)
            now = asyncio.get_running_loop().time()
            for replica, heard in list(self._heard.items()):
                if now - heard > SILENT_S:
                    del self._heard[replica]  # reported once; heard again, it is back
                    _log.warning("stream_relay_silent", replica=replica, silent_s=SILENT_S)
                    router.lost_replica(replica, "the relay that carried the other end of this"
                                                 f" stream has not been heard for {SILENT_S:g}s")
            await asyncio.sleep(HEARTBEAT_S)

    def _heard_from(self, data: bytes) -> None:
        router = self._router
        replica = data.decode(errors="replace")
        if router is not None and replica != router.replica:
            self._heard[replica] = asyncio.get_running_loop().time()

    async def _resubscribe(self, pubsub: PubSub) -> None:
        router = self._router
        assert router is not None
        try:
            async with self._commands:
                await pubsub.aclose()
                await pubsub.subscribe(self._relay_channel(router.replica), self._alive_channel,
                                       *(self._device_channel(key) for key in self._watched))
        except Exception as exc:  # noqa: BLE001 - still down: the next read fails and retries
            _log.warning("stream_bus_resubscribe_failed", error=repr(exc))
