"""Stream rules without sockets: relay stream tables wired together by a real router.

`Endpoint` plays a connection's session: it feeds frames to its `StreamTable`
as the device would send them, keeps what the table writes to its device,
and hands the rest to the `StreamRouter`, exactly as `DeviceSession` does.
"""

from __future__ import annotations

import time
from dataclasses import replace

import structlog

from continuum.access import AccessControl
from continuum.metrics import RelayMetrics
from continuum.settings import Settings
from continuum.streams.router import StreamRouter
from continuum.streams.table import (Address, Dropped, Output, Pause, Refused, StreamBudget,
                                     StreamTable, ToDevice)
from proto import Identity, PublicKey, decode_envelope
from proto.access import AccessList
from proto.frames import StreamFrame, StreamOpen
from proto.streams import Opening, StreamKeys, accept_open, begin_open, read_open
from proto_support import ALICE, BOB, CAROL, identity

ORACLE = identity("oracle")
NOW = 1_700_000_000_000
SETTINGS = Settings(max_streams_per_device=4, max_pending_streams_per_device=2,
                    stream_open_timeout_s=10.0, max_stream_window_bytes=256 * 1024,
                    stream_opens_per_s=1000.0, stream_open_burst=1000)


def access_list(version: int, groups: dict[Identity, set[int]],
                draining: tuple[Identity, ...] = ()) -> bytes:
    """A list signed by the oracle, valid for an hour from now."""
    until = time.time_ns() // 1_000_000 + 3_600_000
    return AccessList(1, version, NOW, until, ORACLE.public,
                      {key.public: frozenset(group) for key, group in groups.items()},
                      frozenset(), {key.public: until for key in draining}).sign(ORACLE)


def access() -> AccessControl:
    """alice and bob share a peer group; carol is enrolled in another."""
    control = AccessControl(Settings(oracle_url="http://oracle.invalid",
                                     oracle_key=ORACLE.public.text),
                            RelayMetrics(), structlog.get_logger("test"))
    control.apply(access_list(1, {ALICE: {0}, BOB: {0}, CAROL: {1}}))
    return control


class Endpoint:
    """One connection's stream table, as its session would drive it."""

    def __init__(self, world: World, device: Identity) -> None:
        self.world, self.identity = world, device
        self.table = StreamTable(device.public, world.settings, world.access, world.budget)
        self.device: list[StreamFrame] = []  # written to the device, in order
        self.refused: list[Refused] = []
        self.dropped: list[str] = []
        self.paused: list[float] = []
        self.address: Address | None = None

    def _keep(self, outputs: list[Output]) -> tuple[Output, ...]:
        rest: list[Output] = []
        for output in outputs:
            if isinstance(output, ToDevice):
                self.device.append(output.frame)
            elif isinstance(output, Refused):
                self.refused.append(output)
            elif isinstance(output, Dropped):
                self.dropped.append(output.reason)
            else:
                if isinstance(output, Pause):
                    self.paused.append(output.seconds)
                rest.append(output)
        return tuple(rest)

    def send(self, frame: StreamFrame) -> None:
        """The device sends `frame` to its relay."""
        assert self.address is not None
        self.world.router.dispatch(self.address, self.identity.public,
                                   self._keep(self.table.from_device(frame, self.world.now)))

    def take(self) -> list[StreamFrame]:
        out, self.device = self.device, []
        return out

    def codes(self) -> list[str]:
        return [r.error.code.name for r in self.refused]

    # -- the router's StreamEndpoint ------------------------------------------------------------

    def stream_from_peer(self, frame: StreamFrame, origin: Address,
                         peer: PublicKey) -> tuple[Output, ...]:
        return self._keep(self.table.from_peer(frame, origin, peer, self.world.now))

    def stream_unreachable(self, stream_id: bytes) -> tuple[Output, ...]:
        return self._keep(self.table.unreachable(stream_id))

    def expire_streams(self, now_ms: int) -> tuple[Output, ...]:
        return self._keep(self.table.expire(now_ms))

    def abort_streams_via(self, here: str, replica: str | None,
                          reason: str) -> tuple[Output, ...]:
        return self._keep(self.table.abort_via(here, replica, reason))

    def recheck_streams(self) -> tuple[Output, ...]:
        return self._keep(self.table.recheck())

    @property
    def streams_need_tick(self) -> bool:
        return self.table.needs_tick


class World:
    """One relay process: its settings, access list, stream budget, router and clock."""

    def __init__(self, settings: Settings = SETTINGS, **overrides: object) -> None:
        self.settings = replace(settings, **overrides)
        self.access = access()
        self.budget = StreamBudget(self.settings.max_streams,
                                   self.settings.stream_relay_window_bytes)
        self.router = StreamRouter("r1", self.settings.limits, structlog.get_logger("test"),
                                   tick_s=1.0)
        self.access.on_applied(self.router.access_changed)  # as the relay wires them
        self.now = NOW

    async def connect(self, device: Identity) -> Endpoint:
        endpoint = Endpoint(self, device)
        endpoint.address = await self.router.attach(device.public, endpoint)
        return endpoint

    async def disconnect(self, endpoint: Endpoint) -> None:
        assert endpoint.address is not None
        await self.router.detach(endpoint.address, tuple(endpoint.table.closed()))


def open_frame(opener: Identity, peer: Identity, window: int = 64 * 1024, *,
               now_ms: int = NOW, service: str = "tcp/22") -> tuple[StreamOpen, Opening]:
    opening = begin_open(opener, peer.public, service, now_ms=now_ms)
    return StreamOpen(window, opening.envelope.raw), opening


def answer(responder: Identity, offer: StreamOpen, *,
           now_ms: int = NOW) -> tuple[bytes, StreamKeys]:
    envelope = decode_envelope(offer.envelope)
    sealed, keys = accept_open(responder, envelope, read_open(envelope, responder),
                               now_ms=now_ms)
    return sealed.raw, keys
