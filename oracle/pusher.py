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
relays' clock-skew check, or was sealed by a key the oracle has since rotated
away from, is it sealed afresh.

Key rotation (SPEC §15) passes through here too.  After the oracle's own
rotation, every device that has not confirmed the new key is first sent the
oracle's key chain (a DATA envelope from the new key, which the device trusts
because the key it knows signed the chain), and only once a relay stored that
notice its next peer change: mailboxes keep order, so the device knows the
new key before it reads a list signed by it.  A device's own rotation arrives
as a DATA message from its old key carrying a `KeyRotation`.

Configuration (SPEC §21) goes the same way: each device's newest merged
document (`configuration`, one outbox row per device) is sealed as a CONFIG
envelope, stored before it is sent and resent byte for byte, held back like a
peer change from a device not yet told of a new oracle key; the devices'
CONFIG_REPORTs come back through the same connection and are recorded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Set

import structlog

from client.device import Device
from client.inbox import InboundMessage
from client.peers import PeerList
from proto import Envelope, Identity, Kind, PublicKey, decode_envelope, seal_envelope
from proto.config import ConfigPush, parse_document
from proto.errors import OversizeError, ProtocolError, ReplayError
from proto.payloads import MAX_PEERS, PeerChange
from proto.rotation import KEY_ROTATION_TTL_S, KeyRotation, OracleKeyChain
from runtime.clock import now_ms
from runtime.tasks import cancel_all_and_wait

from .configuration import PendingConfig
from .errors import OracleError
from .publisher import AccessListPublisher
from .records import PendingPush
from .registry import Registry
from .settings import OracleSettings

_RETRY_MIN_S, _RETRY_MAX_S = 0.2, 10.0
# Versions sent concurrently per round; the client library pipelines them on one connection.
_BATCH = 100
# A rotation statement dated further ahead of the oracle's clock than relays allow envelopes.
_MAX_ROTATION_SKEW_MS = 300_000


class Pusher:
    def __init__(self, registry: Registry, publisher: AccessListPublisher, identity: Identity,
                 settings: OracleSettings, log: structlog.typing.FilteringBoundLogger,
                 chain: OracleKeyChain = OracleKeyChain()) -> None:
        self._registry = registry
        self._publisher = publisher
        self._identity = identity
        self._settings = settings
        self._log = log
        self._chain = chain
        # Devices a relay stored this run's chain notice for, and notices awaiting a receipt.
        self._announced: set[str] = set()
        self._notices: dict[bytes, str] = {}
        self._wake = asyncio.Event()
        # Taken to seal one envelope: waiters are woken one per loop turn, so the sealing of
        # a batch is spread over turns and requests are answered in between.
        self._sealing = asyncio.Lock()
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
                       asyncio.create_task(self._take_data_forever(), name="oracle-data"),
                       asyncio.create_task(self._reports_forever(), name="oracle-reports")]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel_all_and_wait(tasks)
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
            configs = await self._registry.configs.pending(_BATCH)
            untold = await self._announce()
            sent = await asyncio.gather(*(self._push_one(push) for push in pending
                                          if push.device_key not in untold),
                                        *(self._push_config(push) for push in configs
                                          if push.device_key not in untold))
            if all(sent) and not untold:
                retry_s = _RETRY_MIN_S
                if len(pending) < _BATCH and len(configs) < _BATCH:  # drained: sleep until
                    # the next change
                    await self._wake.wait()
                continue
            # Retry after a backoff, or at once when a new change supersedes old work.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(retry_s):
                    await self._wake.wait()
            retry_s = min(retry_s * 2, _RETRY_MAX_S)

    async def _announce(self) -> set[str]:
        """Send the key chain to every device not yet told this run; the devices still untold."""
        if not self._chain.links:
            return set()
        unaware = await self._registry.unaware_of_oracle_key(self._identity.public.text)
        todo = [key for key in unaware if key not in self._announced]
        told = await asyncio.gather(*(self._announce_one(key) for key in todo))
        return {key for key, ok in zip(todo, told) if not ok}

    async def _announce_one(self, device_key: str) -> bool:
        assert self._device is not None
        envelope = seal_envelope(self._identity, Kind.DATA, [PublicKey.from_text(device_key)],
                                 self._chain.encode(), ttl_s=self._settings.push_ttl_s,
                                 now_ms=now_ms())
        self._notices[envelope.msg_id] = device_key
        try:
            async with asyncio.timeout(self._settings.send_timeout_s):
                await self._device.send_envelope(envelope)
        except (ProtocolError, TimeoutError) as exc:
            del self._notices[envelope.msg_id]
            self._log.info("oracle_key_notice_retry", device=device_key, error=repr(exc))
            return False
        self._announced.add(device_key)
        self._log.info("oracle_key_notice_sent", device=device_key)
        return True

    def _envelope(self, push: PendingPush) -> Envelope:
        """The stored envelope if still fresh and sealed by this key, else a newly sealed one."""
        if push.envelope is not None:
            envelope = decode_envelope(base64.b64decode(push.envelope))
            if (envelope.sender == self._identity.public
                    and now_ms() - envelope.created_at_ms < self._settings.reseal_after_s * 1000):
                return envelope
        if len(push.peers) > MAX_PEERS:
            raise OversizeError(f"its list has {len(push.peers)} peers and a peer list carries"
                                f" at most {MAX_PEERS} (SPEC §6): make its groups smaller")
        keys = self._publisher.keys
        change = PeerChange(push.version, tuple(keys(k) for k in push.peers), push.epoch)
        return seal_envelope(self._identity, Kind.PEER_CHANGE, [keys(push.device_key)],
                             change.encode(), ttl_s=self._settings.push_ttl_s, now_ms=now_ms())

    async def _push_one(self, push: PendingPush) -> bool:
        """Send one version; True once a relay stored it (ACCEPTED, or REPLAY of these bytes).

        Envelopes are sealed one per turn of the event loop (`_sealing`: a few ms each for
        1,000 peers), not a whole batch at once: 100 in one turn stalled the oracle's API.
        A list that cannot be sealed (more peers than a PEER_CHANGE carries: only from an
        oracle that let a group grow past 1,025) is marked failed with the reason and
        logged as an error, so the device's page shows it; the other lists still go out.
        """
        assert self._device is not None
        try:
            async with self._sealing:
                await asyncio.sleep(0)  # the rest of the batch queues on the lock meanwhile
                envelope = self._envelope(push)
        except ProtocolError as exc:
            await self._registry.mark_failed(push, f"cannot be sent: {exc}")
            self._log.error("peer_change_undeliverable", device=push.device_key,
                            version=push.version, peers=len(push.peers), error=str(exc))
            return False
        stored = base64.b64encode(envelope.raw).decode()
        if stored != push.envelope:
            await self._registry.record_sealed(push, stored, envelope.msg_id.hex())
        sent_at_ms = now_ms()
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
        await self._registry.mark_sent(push, sent_at_ms)
        self._log.info("peer_change_sent", device=push.device_key, epoch=push.epoch,
                       version=push.version, peers=len(push.peers))
        return True

    def _config_envelope(self, push: PendingConfig) -> Envelope:
        """The stored CONFIG envelope if still fresh and sealed by this key, else a new one."""
        if push.envelope is not None:
            envelope = decode_envelope(base64.b64decode(push.envelope))
            if (envelope.sender == self._identity.public
                    and now_ms() - envelope.created_at_ms < self._settings.reseal_after_s * 1000):
                return envelope
        config = ConfigPush(push.epoch, push.version, parse_document(push.document))
        return seal_envelope(self._identity, Kind.CONFIG, [PublicKey.from_text(push.device_key)],
                             config.encode(), ttl_s=self._settings.push_ttl_s, now_ms=now_ms())

    async def _push_config(self, push: PendingConfig) -> bool:
        """Send one device its newest configuration; True once a relay stored it."""
        assert self._device is not None
        envelope = self._config_envelope(push)
        stored = base64.b64encode(envelope.raw).decode()
        if stored != push.envelope:
            await self._registry.configs.record_sealed(push, stored)
        sent_at_ms = now_ms()
        try:
            async with asyncio.timeout(self._settings.send_timeout_s):
                await self._device.send_envelope(envelope)
        except ReplayError:
            pass  # a relay stored these very bytes before (ACCEPTED lost)
        except (ProtocolError, TimeoutError) as exc:
            reason = "no relay accepted it in time" if isinstance(exc, TimeoutError) else str(exc)
            await self._registry.configs.mark_failed(push, f"{type(exc).__name__}: {reason}")
            self._log.info("config_retry", device=push.device_key, version=push.version,
                           error=reason)
            return False
        await self._registry.configs.mark_sent(push, sent_at_ms)
        self._log.info("config_sent", device=push.device_key, epoch=push.epoch,
                       version=push.version)
        return True

    async def _reports_forever(self) -> None:
        """Each device answers a CONFIG with the version it applied and its reported state."""
        assert self._device is not None
        async for sender, report in self._device.config_reports():
            if await self._registry.configs.record_report(sender.text, report):
                self._log.info("config_reported", device=sender.text, epoch=report.epoch,
                               version=report.version)
            else:
                self._log.warning("config_report_ignored", device=sender.text,
                                  stamp=str(report.stamp),
                                  reason="older than the one kept, or the device is revoked")

    async def _receipts_forever(self) -> None:
        """Devices send a RECEIPT for every peer change they decrypt: that acknowledges a version."""
        assert self._device is not None
        async for sender, receipt in self._device.receipts():
            if self._notices.get(receipt.msg_id) == sender.text:
                del self._notices[receipt.msg_id]
                if await self._registry.record_oracle_key(sender.text,
                                                          self._identity.public.text):
                    self.notify()  # its newest list goes out again
                self._log.info("oracle_key_confirmed", device=sender.text)
                continue
            version = await self._registry.record_receipt(sender.text, receipt.msg_id.hex())
            if version is not None:
                self._log.info("peer_change_acknowledged", device=sender.text, version=version)

    async def _take_data_forever(self) -> None:
        """Data messages to the oracle are key rotations; anything else is logged and dropped
        (taking them keeps the relay window free for receipts).  A rotation counts within
        KEY_ROTATION_TTL_S of its `issued_at_ms` (SPEC §15): an abandoned one cannot take
        effect days later, when nobody may hold its new key any more."""
        assert self._device is not None
        async for message in self._device.messages():
            await self._on_data(message)

    async def _on_data(self, message: InboundMessage) -> None:
        try:
            rotation = KeyRotation.decode(message.payload)
        except ProtocolError:
            self._log.info("data_message_ignored", sender=message.sender.text,
                           bytes=len(message.payload))
            return
        log = self._log.bind(device=rotation.old.text, new_key=rotation.new.text)
        now = now_ms()
        if rotation.old != message.sender:
            log.warning("key_rotation_refused", sender=message.sender.text,
                        reason="a device rotates its own key only")
        elif rotation.issued_at_ms > now + _MAX_ROTATION_SKEW_MS:
            log.warning("key_rotation_refused", reason="issued in the future")
        elif rotation.issued_at_ms < now - KEY_ROTATION_TTL_S * 1000 - _MAX_ROTATION_SKEW_MS:
            # Left behind by a rotation its device gave up on (or resumed, with a fresh one).
            log.warning("key_rotation_refused", reason="issued too long ago")
        else:
            try:
                await self._registry.rotate_device(rotation.old.text, rotation.new.text,
                                                   now + self._settings.rotation_drain_s * 1000)
            except OracleError as exc:
                log.warning("key_rotation_refused", reason=exc.message)
            else:
                log.info("device_key_rotated")
