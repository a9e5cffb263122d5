"""One device's WebSocket: authenticate, then accept its sends and push its mailbox.

The session owns only connection bookkeeping (the delivery cursor and the
tags in flight); anything another replica would need is in the store, so a
device may reconnect anywhere.  Bad input produces an ERROR frame and the
connection stays up, until `max_invalid_frames` says it is abuse.
"""

from __future__ import annotations

import asyncio
import os

import structlog
from aiohttp import WSMsgType, web

from proto import PublicKey, decode_envelope
from proto.errors import (DecodeError, OversizeError, ProtocolError, RateLimitedError, UnauthenticatedError,
                          UnexpectedFrameError)
from proto.frames import (Accepted, Ack, Challenge, Deliver, Error, Hello, Send, Welcome,
                          decode_frame, encode_frame, welcome_signed_bytes)
from proto.limits import PROTOCOL_VERSION

from .admission import admit, replay_until_ms
from .context import RelayContext, now_ms
from .websocket import DeviceWebSocket

_CLOSE_POLICY_VIOLATION = 1008
_CLOSE_INTERNAL_ERROR = 1011


async def authenticate(ws: web.WebSocketResponse, relay: RelayContext) -> PublicKey | None:
    """Run CHALLENGE → HELLO → WELCOME; None (socket closed) if the device fails it."""
    challenge = Challenge(PROTOCOL_VERSION, os.urandom(32), relay.identity.public)
    await ws.send_bytes(encode_frame(challenge))
    try:
        async with asyncio.timeout(relay.settings.handshake_timeout_s):
            message = await ws.receive()
    except TimeoutError:
        await _refuse(ws, relay, "timeout", UnauthenticatedError(
            f"no HELLO within {relay.settings.handshake_timeout_s}s"))
        return None
    if message.type != WSMsgType.BINARY:
        await _refuse(ws, relay, "not_binary",
                      UnauthenticatedError("expected a binary HELLO frame"))
        return None
    try:
        hello = decode_frame(message.data, relay.settings.limits.max_frame_bytes)
        if not isinstance(hello, Hello):
            raise UnexpectedFrameError(f"expected HELLO, got {type(hello).__name__.upper()}")
        hello.verify(challenge)
    except ProtocolError as exc:
        await _refuse(ws, relay, exc.code.name.lower(), UnauthenticatedError(exc.message))
        return None
    refusal = relay.access.refusal(hello.device_key)
    if refusal is not None:
        await _refuse(ws, relay, refusal.code.name.lower(), refusal)
        return None
    signature = relay.identity.sign(
        welcome_signed_bytes(challenge, hello.device_key, hello.client_nonce))
    await ws.send_bytes(encode_frame(
        Welcome(now_ms(), signature, relay.settings.max_envelope_bytes)))
    return hello.device_key


async def _refuse(ws: web.WebSocketResponse, relay: RelayContext, reason: str,
                  error: ProtocolError) -> None:
    relay.metrics.handshake_failures.labels(reason).inc()
    relay.log.info("handshake_refused", reason=reason, detail=error.message)
    if not ws.closed:
        await ws.send_bytes(encode_frame(Error(None, int(error.code), error.message)))
        await ws.close(code=_CLOSE_POLICY_VIOLATION, message=b"unauthenticated")
    return None


class DeviceSession:
    """Most devices sit idle, so an idle session holds no task and no event of its own:
    the mailbox wake-up starts a delivery pass, which ends when nothing is left to push."""

    def __init__(self, ws: DeviceWebSocket, device: PublicKey, relay: RelayContext) -> None:
        self._ws = ws
        self._device = device
        self._relay = relay
        self._delivery: asyncio.Task[None] | None = None  # a pass running, or the one that failed
        self._pending_wake = False  # set by a wake-up: the running pass must fetch again
        self._cursor: str | None = None
        self._in_flight: set[str] = set()
        self._invalid_frames = 0
        self._closing: asyncio.Task[object] | None = None

    @property
    def _log(self) -> structlog.typing.FilteringBoundLogger:
        """Bound per call (connect, disconnect, refusals), not kept per idle connection."""
        return self._relay.log.bind(device=self._device.text)

    async def run(self) -> None:
        """Serve until the device disconnects or abuses the connection."""
        subscription = await self._relay.store.subscribe(self._device, self._wake)
        self._start_delivery(observe_depth=True)
        unwatch = self._relay.access.watch(self._device, self._refused)
        self._relay.metrics.connected.inc()
        self._log.info("device_connected")
        try:
            await self._read_forever()
        except ConnectionError:
            pass  # the device went away mid-write; its mailbox is intact
        finally:
            unwatch()
            self._relay.metrics.connected.dec()
            await subscription.close()  # first: no wake-up may start a pass after the cancel
            if self._delivery is not None:
                self._delivery.cancel()
                await asyncio.gather(self._delivery, return_exceptions=True)
            if self._closing is not None:
                await asyncio.gather(self._closing, return_exceptions=True)
            self._log.info("device_disconnected")

    def _refused(self, error: ProtocolError) -> None:
        """A newer access list refuses this key (revoked): end the session now, not at reconnect."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close_refused(error), name="close-refused")

    async def _close_refused(self, error: ProtocolError) -> None:
        self._log.info("session_closed_by_access_list", reason=error.code.name.lower())
        try:
            await self._ws.send_frames([encode_frame(Error(None, int(error.code), error.message))])
        finally:
            await self._ws.close(code=_CLOSE_POLICY_VIOLATION, message=error.code.name.encode())

    async def _read_forever(self) -> None:
        async for message in self._ws:
            if message.type == WSMsgType.ERROR:
                break  # protocol-level failure, e.g. a frame beyond the hard cap (close 1009)
            if message.type != WSMsgType.BINARY:
                await self._reject(None, DecodeError("frames must be binary WebSocket messages"))
            else:
                await self._handle(message.data)
            if self._invalid_frames >= self._relay.settings.max_invalid_frames:
                self._log.warning("closing_abusive_connection", invalid=self._invalid_frames)
                await self._ws.close(code=_CLOSE_POLICY_VIOLATION, message=b"too many invalid frames")
                break

    async def _handle(self, data: bytes) -> None:
        if len(data) > self._relay.settings.limits.max_frame_bytes:
            await self._reject(None, OversizeError(
                f"frame of {len(data)} bytes exceeds the limit of"
                f" {self._relay.settings.limits.max_frame_bytes}"))
            return
        try:
            frame = decode_frame(data, self._relay.settings.limits.max_frame_bytes)
        except ProtocolError as exc:
            await self._reject(None, exc)
            return
        if isinstance(frame, Send):
            await self._accept(frame.envelope)
        elif isinstance(frame, Ack):
            await self._ack(frame.tag)
        else:
            await self._reject(None, UnexpectedFrameError(
                f"a device may send SEND or ACK here, not {type(frame).__name__.upper()}"))

    async def _accept(self, raw: bytes) -> None:
        relay, settings = self._relay, self._relay.settings
        try:
            envelope = decode_envelope(raw, settings.limits)
        except ProtocolError as exc:
            await self._reject(None, exc)
            return
        try:
            if not await relay.store.allow(self._device, now_ms(), settings.rate_per_s,
                                           settings.rate_burst):
                raise RateLimitedError(
                    f"more than {settings.rate_per_s:g} messages/s (burst {settings.rate_burst})")
            admit(envelope, self._device, now_ms(), settings, relay.metrics.verify_seconds.observe)
            relay.access.check_recipients(envelope.recipient_keys)
            await relay.store.accept(envelope, replay_until_ms=replay_until_ms(envelope, settings),
                                     limits=relay.mailbox_limits)
        except ProtocolError as exc:
            await self._reject(envelope.msg_id, exc)
            return
        relay.metrics.accepted.inc()
        await self._ws.send_frames([encode_frame(Accepted(envelope.msg_id))])

    async def _ack(self, tag: str) -> None:
        if await self._relay.store.ack(self._device, tag):
            self._relay.metrics.acked.inc()
        if tag in self._in_flight:
            # Only a full window can have stopped the last pass short of the mailbox's
            # end; otherwise new mail wakes us anyway, and a fetch per ACK is wasted.
            window_was_full = len(self._in_flight) >= self._relay.settings.delivery_window
            self._in_flight.discard(tag)
            if window_was_full:
                self._wake()

    async def _reject(self, msg_id: bytes | None, error: ProtocolError) -> None:
        self._invalid_frames += 1
        reason = error.code.name.lower()
        self._relay.metrics.rejected.labels(reason).inc()
        self._log.debug("rejected", reason=reason, detail=error.message)
        await self._ws.send_frames([encode_frame(Error(msg_id, int(error.code), error.message))])

    def _wake(self) -> None:
        """The mailbox may have grown or the window opened: make sure a delivery pass runs."""
        self._pending_wake = True
        if self._delivery is None:
            self._start_delivery()

    def _start_delivery(self, observe_depth: bool = False) -> None:
        self._delivery = asyncio.create_task(self._deliver(observe_depth), name="deliver")
        self._delivery.add_done_callback(self._delivery_ended)

    def _delivery_ended(self, task: asyncio.Task[None]) -> None:
        """A pass that failed (store down) closes the socket at once, even if the device is
        idle: it reconnects with backoff and its mailbox is fetched afresh, nothing is lost."""
        if task.cancelled() or task.exception() is None or self._closing is not None:
            return
        self._log.warning("delivery_failed", error=repr(task.exception()))
        self._closing = asyncio.create_task(
            self._ws.close(code=_CLOSE_INTERNAL_ERROR, message=b"mailbox store unavailable"),
            name="close-failed-delivery")

    async def _deliver(self, observe_depth: bool = False) -> None:
        """Push the mailbox in order, never more than `delivery_window` un-acked, then end.

        A pass that raises stays in `_delivery`, so no wake-up starts another, and
        `_delivery_ended` closes the socket.  Clearing `_delivery` and returning happen
        in one step of the loop, so no wake-up can fall between them.
        """
        store, window = self._relay.store, self._relay.settings.delivery_window
        if observe_depth:
            self._relay.metrics.mailbox_depth.observe(await store.depth(self._device))
        self._pending_wake = True
        while self._pending_wake:
            self._pending_wake = False
            room = window - len(self._in_flight)
            batch = await store.fetch(self._device, self._cursor, room) if room > 0 else []
            if batch:
                self._in_flight.update(entry.tag for entry in batch)
                self._cursor = batch[-1].tag
                await self._ws.send_frames([encode_frame(Deliver(entry.tag, entry.raw))
                                           for entry in batch])
                self._relay.metrics.delivered.inc(len(batch))
                self._pending_wake = True  # the mailbox may hold more than one batch
        self._delivery = None
