"""Deliver peer changes: the persisted outbox, sent through the relays until one accepts.

The oracle is a device like any other: it connects to its relays with the
client library and sends each device a PEER_CHANGE envelope sealed to it.
The outbox rows are written in the same transaction as the change that
caused them, so this loop only has to drain them; a relay that is down means
a retry, an oracle restart means the loop starts again from the table.

The exact envelope is stored before it is sent and resent byte for byte on
retry, so a relay that did store it but whose ACCEPTED was lost answers
REPLAY, which counts as accepted, and the device's receipt (matched by
msg_id) still finds its row.  Only when a stored envelope is too old for the
relays' clock-skew check is it sealed afresh.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Set

import structlog

from client.device import Device
from client.peers import PeerList
from proto import Envelope, Identity, Kind, PublicKey, decode_envelope, seal_envelope
from proto.errors import ProtocolError, ReplayError
from proto.payloads import PeerChange
from runtime.clock import now_ms

from .publisher import AccessListPublisher
from .records import PendingPush
from .registry import Registry
from .settings import OracleSettings

_RETRY_MIN_S, _RETRY_MAX_S = 0.2, 10.0
# Versions sent concurrently per round; the client library pipelines them on one connection.
_BATCH = 100


class Pusher:
    def __init__(self, registry: Registry, publisher: AccessListPublisher, identity: Identity,
                 settings: OracleSettings, log: structlog.typing.FilteringBoundLogger) -> None:
        self._registry = registry
        self._publisher = publisher
        self._identity = identity
        self._settings = settings
        self._log = log
        self._wake = asyncio.Event()
        # The oracle's "peers" are the active devices: the client library then accepts
        # their receipts even for envelopes sent before an oracle restart.
        self._peers = PeerList()
        self._device: Device | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def connected(self) -> bool:
        return self._device is not None and self._device.connected

    @property
    def relay_keys(self) -> Set[PublicKey]:
        """Keys the configured relays proved in WELCOME when this oracle connected to them."""
        return self._device.relay_keys if self._device is not None else frozenset()

    def notify(self) -> None:
        """New outbox rows were committed: drain now."""
        self._wake.set()

    async def start(self) -> None:
        if not self._settings.relays:
            self._log.warning("no_relays_configured",
                              detail="peer changes stay in the outbox until relays are configured")
            return
        await self._refresh_peers()
        self._device = Device(self._identity, relays=list(self._settings.relays),
                              peers=self._peers)
        await self._device.__aenter__()
        self._tasks = [asyncio.create_task(self._push_forever(), name="oracle-push"),
                       asyncio.create_task(self._receipts_forever(), name="oracle-receipts"),
                       asyncio.create_task(self._discard_data_forever(), name="oracle-data")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        device, self._device = self._device, None
        if device is not None:
            await device.__aexit__(None, None, None)

    async def _refresh_peers(self) -> None:
        active = set((await self._publisher.current()).access.enrolled)
        current = set(self._peers)
        self._peers.add(active - current)
        self._peers.remove(current - active)

    async def _push_forever(self) -> None:
        retry_s = _RETRY_MIN_S
        while True:
            self._wake.clear()
            await self._refresh_peers()
            pending = await self._registry.pending_pushes(_BATCH)
            sent = await asyncio.gather(*(self._push_one(push) for push in pending))
            if all(sent):
                retry_s = _RETRY_MIN_S
                if len(pending) < _BATCH:  # drained: sleep until the next change
                    await self._wake.wait()
                continue
            # Retry after a backoff, or at once when a new change supersedes old work.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry_s):
                    await self._wake.wait()
            retry_s = min(retry_s * 2, _RETRY_MAX_S)

    def _envelope(self, push: PendingPush) -> Envelope:
        """The stored envelope if still fresh, else a newly sealed one."""
        if push.envelope is not None:
            envelope = decode_envelope(base64.b64decode(push.envelope))
            if now_ms() - envelope.created_at_ms < self._settings.reseal_after_s * 1000:
                return envelope
        change = PeerChange(push.version, tuple(PublicKey.from_text(k) for k in push.peers),
                            push.epoch)
        return seal_envelope(self._identity, Kind.PEER_CHANGE,
                             [PublicKey.from_text(push.device_key)], change.encode(),
                             ttl_s=self._settings.push_ttl_s, now_ms=now_ms())

    async def _push_one(self, push: PendingPush) -> bool:
        """Send one version; True once a relay stored it (ACCEPTED, or REPLAY of these bytes)."""
        assert self._device is not None
        envelope = self._envelope(push)
        stored = base64.b64encode(envelope.raw).decode()
        if stored != push.envelope:
            await self._registry.record_sealed(push, stored, envelope.msg_id.hex())
        try:
            async with asyncio.timeout(self._settings.send_timeout_s):
                await self._device.send_envelope(envelope)
        except ReplayError:
            pass  # a relay stored these very bytes before (ACCEPTED lost): delivered to the mailbox
        except (ProtocolError, TimeoutError) as exc:
            reason = "no relay accepted it in time" if isinstance(exc, TimeoutError) else str(exc)
            await self._registry.mark_failed(push, f"{type(exc).__name__}: {reason}")
            self._log.info("peer_change_retry", device=push.device_key, epoch=push.epoch,
                           version=push.version, error=reason)
            return False
        await self._registry.mark_sent(push)
        self._log.info("peer_change_sent", device=push.device_key, epoch=push.epoch,
                       version=push.version, peers=len(push.peers))
        return True

    async def _receipts_forever(self) -> None:
        """Devices send a RECEIPT for every peer change they decrypt: that acknowledges a version."""
        assert self._device is not None
        async for sender, receipt in self._device.receipts():
            version = await self._registry.record_receipt(sender.text, receipt.msg_id.hex())
            if version is not None:
                self._log.info("peer_change_acknowledged", device=sender.text, version=version)

    async def _discard_data_forever(self) -> None:
        """The oracle takes no data messages; draining them keeps its relay window free for receipts."""
        assert self._device is not None
        async for message in self._device.messages():
            self._log.info("data_message_ignored", sender=message.sender.text,
                           bytes=len(message.payload))
