"""Continuum device library: talk to peers through relays over one outbound WebSocket.

Public API::

    from client import Device, PeerList, DeliveryStatus
    from proto import Identity, PublicKey

    device = Device(identity, relays=["ws://relay-a:8470/v1/connect", "ws://relay-b:8470/v1/connect"],
                    peers=PeerList.load(path), oracle_key=None)
    async with device:                       # starts the connection manager
        await device.wait_connected()        # optional; `device.connected`, `device.relay_url`
        outgoing = await device.send([bob], b"hello", ttl_s=3600)   # returns once ACCEPTED,
                                             # raises the proto exception (RateLimitedError, …)
        statuses = await outgoing.wait_receipts(timeout=10)
        # {bob: DeliveryStatus.DELIVERED | EXPIRED | PENDING}
        async for message in device.messages():      # InboundMessage(sender, msg_id, payload,
            ...                                      #                kind, created_at_ms)

    device.stats       # DeviceStats counters: dropped_non_peer, dropped_invalid, bad_frames, …
    device.receipts()  # async iterator of (sender, Receipt), for senders like the oracle
    device.send_envelope(envelope)   # send an envelope sealed elsewhere, same bytes on retry

    new = await device.rotate_key(on_confirmed=save)   # SPEC §15: the old key vouches for a
                                     # new one; `save(old, new)` runs once the oracle confirmed
    await device.wait_drained()      # the old key's mailbox is empty; `device.drain(old)`
                                     # resumes a drain a restart cut short

Guarantees: messages are surfaced only from peers (the local list, or the
oracle's signed PEER_CHANGE when `oracle_key` is set), each once per run;
anything else is dropped, counted and ACKed.  Envelopes not yet accepted are
re-sent, byte for byte, on every new connection.  The private key is never
logged or sent.

Limits: each connection decodes envelopes up to the limit the relay
announced in WELCOME, never above the device's own cap (`limits`, default
`DEVICE_LIMITS`: 16 MiB).  A relay that announces more than the cap is
logged at connect: a delivery larger than the cap cannot be read at all.  A
delivery that is read but cannot be taken (undecodable, not for us) is
dropped, counted and ACKed, so it never blocks the mailbox.

Modules, one job each: `protocol` (the pure conversation with one relay:
handshake, frames in and out), `connection` (its socket shell), `manager`
(relay list, backoff, failover), `inbox` (pure decision per delivery),
`outbox` (sends awaiting ACCEPTED), `tracking` (receipts and expiries per
recipient), `peers`, `dedup`, `backoff`, `drain` (the old key's mailbox after
a rotation), `key_files` (the home's key files across a rotation), `device`
(the public API tying them together), `stats`, `settings` and `cli` (the
`continuum-client` command).
"""

from .device import Device
from .inbox import DropReason, InboundMessage
from .peers import PeerList
from .stats import DeviceStats
from .tracking import DeliveryStatus, Outgoing

__all__ = ["DeliveryStatus", "Device", "DeviceStats", "DropReason", "InboundMessage", "Outgoing",
           "PeerList"]
