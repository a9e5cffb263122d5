"""A relay-like server for device tests: a real WebSocket and handshake, scripted behaviour.

A real relay never replays a stale envelope, never withholds ACCEPTED, never
refuses a handshake on cue.  This one does, so a device test can hold a
device process at exactly the step it kills it in, or replay what a fake
relay (or anyone on the path of a `ws://` link) would replay.  It records
every SEND, ACK and ping it gets.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence

from aiohttp import WSMsgType, web

from proto import Identity, Limits, decode_envelope
from proto.errors import ErrorCode, ProtocolError
from proto.frames import Accepted, Ack, Deliver, Error, Frame, Send, decode_frame, encode_frame
from proto.channel import CipherState
from proto.handshake import EPHEMERAL_SEED_BYTES, RelayHandshake
from runtime.clock import now_ms

# What to answer a SEND with (its envelope bytes, how many SENDs came before): a frame, or
# None for silence.
Answer = Callable[[bytes, int], Frame | None]


def silent(raw: bytes, count: int) -> Frame | None:
    return None


def accept(raw: bytes, count: int) -> Frame | None:
    return Accepted(decode_envelope(raw).msg_id)


def refuse(code: ErrorCode, times: int | None = None) -> Answer:
    """ERROR `code` for the first `times` SENDs (all if None), ACCEPTED after."""
    def answer(raw: bytes, count: int) -> Frame | None:
        if times is not None and count >= times:
            return accept(raw, count)
        return Error(decode_envelope(raw).msg_id, int(code), f"scripted {code.name}")
    return answer


class FakeRelay:
    """Serves ws://127.0.0.1:PORT/v1/connect; every connection gets the same script."""

    def __init__(self, *, deliver: Sequence[bytes] = (), answer: Answer = silent,
                 refuse_handshake: ProtocolError | None = None,
                 clock_offset_ms: int = 0, pace_s: float = 0.0) -> None:
        """`pace_s`: a pause before each delivery (a relay choosing when to deliver)."""
        self.identity = Identity.generate()
        self.deliver = list(deliver)
        self.pace_s = pace_s
        self.answer = answer
        self.refuse_handshake = refuse_handshake
        self.clock_offset_ms = clock_offset_ms
        self.sends: list[bytes] = []
        self.acks: list[str] = []
        self.pings = 0
        self.connections = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/connect"

    async def __aenter__(self) -> FakeRelay:
        app = web.Application()
        app.router.add_get("/v1/connect", self._serve)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.02)

    async def _serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        self.connections += 1
        handshake = RelayHandshake(self.identity, os.urandom(32),
                                   os.urandom(EPHEMERAL_SEED_BYTES), Limits())
        await ws.send_bytes(handshake.challenge())
        hello = await ws.receive(timeout=10)
        handshake.receive_hello(hello.data)
        if self.refuse_handshake is not None:
            await ws.send_bytes(handshake.refuse(self.refuse_handshake))
            await ws.close(code=1008)
            return ws
        welcome, terms = handshake.welcome(now_ms() + self.clock_offset_ms)
        await ws.send_bytes(welcome)
        sealer, opener = terms.channel.for_relay()
        if not self.pace_s:  # all at once, before anything is read
            await self._deliver(ws, sealer)
            await self._read(ws, opener, sealer)
            return ws
        delivering = asyncio.create_task(self._deliver(ws, sealer))
        try:
            await self._read(ws, opener, sealer)
        finally:
            delivering.cancel()
        return ws

    async def _deliver(self, ws: web.WebSocketResponse, sealer: CipherState) -> None:
        # Each frame is sealed and written with no await between (aiohttp writes a small
        # frame at once): the channel's nonces stay in order beside the answers.
        for number, raw in enumerate(self.deliver):
            if self.pace_s:
                await asyncio.sleep(self.pace_s)
            await ws.send_bytes(sealer.seal(encode_frame(Deliver(f"t{number}", raw))))

    async def _read(self, ws: web.WebSocketResponse, opener: CipherState,
                    sealer: CipherState) -> None:
        async for message in ws:
            if message.type is WSMsgType.PING:
                self.pings += 1
                await ws.pong(message.data)
            elif message.type is WSMsgType.BINARY:
                frame = decode_frame(opener.open(message.data), 1 << 20)
                await self._receive(ws, sealer, frame)

    async def _receive(self, ws: web.WebSocketResponse, sealer: CipherState,
                       frame: Frame) -> None:
        if isinstance(frame, Ack):
            self.acks.append(frame.tag)
        elif isinstance(frame, Send):
            count = len(self.sends)
            self.sends.append(frame.envelope)
            answer = self.answer(frame.envelope, count)
            if answer is not None:
                await ws.send_bytes(sealer.seal(encode_frame(answer)))
