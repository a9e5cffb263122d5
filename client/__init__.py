"""Continuum device library: talk to peers through relays over one outbound WebSocket.

From nothing to a message and its receipt (two devices in one script here;
each normally runs on its own machine, with its own key file)::

    import asyncio
    from pathlib import Path

    from client import Device, PeerList
    from proto import Identity

    RELAY = "ws://127.0.0.1:8470/v1/connect"   # start one: continuum --port 8470

    async def main() -> None:
        alice = Identity.load_or_create(Path("alice.key"))   # 0600; the same key every run
        bob = Identity.generate()
        alices_peers = PeerList([bob.public])   # or PeerList.load(Path("peers.json")): on disk
        async with Device(alice, [RELAY], alices_peers, home=Path("alice-state")) as a, \
                Device(bob, [RELAY], PeerList([alice.public])) as b:
            await a.wait_connected(timeout=10)
            outgoing = await a.send([bob.public], b"hello bob", ttl_s=3600, timeout=30)
            async for message in b.messages():
                print(message.sender.text, message.payload)
                break
            print(await outgoing.wait_receipts(timeout=10))   # {bob: DeliveryStatus.DELIVERED}

    asyncio.run(main())

Public API::

    device = Device(identity, relays=[url, backup_url], peers=PeerList.load(path),
                    oracle_key=None, home=None, keepalive_s=20.0,
                    relay_keys=None, tls=None)   # pin relay keys; CA for wss://
    # peers=None with a home: the list kept there (peers.json), stamp and all, so a peer
    # change older than the one held stays refused after a restart; without either, in memory.
    async with device:                       # starts the connection manager
        await device.wait_connected(timeout=10)   # TimeoutError; `device.connected`, `relay_url`
        outgoing = await device.send([bob], b"hello", ttl_s=3600, timeout=30)
        # returns once ACCEPTED; raises the final refusal as its proto exception
        # (NotPeerError, RevokedError, OversizeError, …) or TimeoutError (still queued)
        statuses = await outgoing.wait_receipts(timeout=10)
        # {bob: DeliveryStatus.DELIVERED | EXPIRED | PENDING}
        async for message in device.messages():      # InboundMessage(sender, msg_id, payload,
            ...                                      #                kind, created_at_ms)
    await device.queue([bob], b"later")   # into the outbox only; sent whenever a relay is up
    await device.flush(timeout=30)        # wait until the outbox is empty; returns what is left
    device.sent_messages()   # SentMessage per message: relay answer, each recipient's status
    device.stats       # DeviceStats counters: dropped_non_peer, dropped_stale, bad_frames, …
    device.receipts()  # async iterator of (sender, Receipt), for senders like the oracle
    device.send_envelope(envelope)   # send an envelope sealed elsewhere, same bytes on retry

    # Streams (SPEC §16): live, end-to-end encrypted byte streams to one peer, never stored.
    stream = await device.open_stream(bob, "tcp/80", timeout=10)   # once bob accepted; raises
    #   StreamRefusedError (bob said no), PeerUnreachableError (not connected anywhere, or no
    #   answer), NotPeerError (the relay's peer groups), StreamLimitError, TimeoutError
    await stream.write(b"GET / HTTP/1.0\r\n\r\n")   # waits while bob's window is full
    await stream.close()                     # our FIN (half-close); bob may still send
    data = await stream.read()               # b"" once bob closed its side; raises
    #   StreamBrokenError if the stream was cut (bob or a relay went away, a chunk did not
    #   open): a cut is never taken for the end of the data
    stream.abort("why")                      # ends it both ways, now

    async def serve(request: StreamRequest) -> None:     # request.peer, request.service
        if request.service != "tcp/80":
            await request.refuse("no such service")      # the opener gets StreamRefusedError
            return
        async with await request.accept() as stream:     # leaving sends our FIN
            while chunk := await stream.read():
                await stream.write(chunk)
    device.on_stream(serve)   # each open from a peer runs serve() in a task of its own;
                              # without a handler, and from non-peers, opens are refused
    # client.tunnel: expose(device, [80]) and forward(device, bob, 80, local_port=8080),
    # what `continuum-client expose` and `tunnel` run: one TCP connection per stream

    def apply(update: ConfigUpdate) -> dict:   # SPEC §21: the oracle's merged configuration
        settings.update(update.document)       # update.epoch, update.version: its stamp
        return {"applied": True}               # the state reported to the oracle (or None)
    device.on_config(apply)   # sync or async; raising applies nothing (the oracle sees the
                              # device behind); device.config: the one applied (config.json)

    keys = KeyFiles(Path("alice.key"))   # SPEC §15: the old key vouches for a new one
    new = await device.rotate_key(keys.begin(), on_confirmed=keys.confirm)
                                     # begin(): the new key, on disk (alice.key.next) before the
                                     # statement is sent, since the oracle may apply it even if
                                     # this call is cut short (or the key still pending);
                                     # confirm(): it becomes alice.key once the oracle confirmed.
                                     # Cut short: device.pending_rotation is that key, and
                                     # calling again with it (keys.begin()) finishes the rotation
    await device.wait_drained()      # the old key's mailbox is empty; `device.drain(old)`
                                     # resumes a drain a restart cut short

State: with `home` (a directory) the outbox, the messages sent with what
became of them, and the messages already handled live in `home/state.db`
(SQLite), so a restart loses nothing: a message is on disk before `send`
returns and is sent by a later run if this one cannot; receipts and expiry
notices that arrive after a restart find their message; a re-delivery after
a restart is not surfaced again.  Without `home` (the default) the same
state is kept in memory for this run only: what was not yet accepted when
the process ends is lost.

Guarantees: messages are surfaced only from peers (the local list, or the
oracle's signed PEER_CHANGE when `oracle_key` is set), and only while fresh
(created_at + ttl + the relays' 300 s skew, SPEC §11: later copies are
replays), each at most once (per run without a home, ever with one);
anything else is dropped, counted and ACKed.  Envelopes not yet accepted are
re-sent, byte for byte, on every new connection; transient refusals
(RATE_LIMITED, MAILBOX_FULL, STORE_UNAVAILABLE, QUOTA_EXCEEDED) are retried,
receipts included.  The private key is never logged or sent.  The library
logs nothing unless the application configures logging (structlog or the
standard `logging` module, logger "continuum.client").

Limits: each connection decodes envelopes up to the limit the relay
announced in WELCOME, never above the device's own cap (`limits`, default
`DEVICE_LIMITS`: 16 MiB).  A relay that announces more than the cap is
logged at connect: a delivery larger than the cap cannot be read at all.  A
delivery that is read but cannot be taken (undecodable, not for us) is
dropped, counted and ACKed, so it never blocks the mailbox.

Streams: each stream is accepted only from a peer, only while its open is
fresh and never a second time (a replayed open is refused), and its data is
sealed with keys only the two ends hold (ephemeral X25519, libsodium
secretstream), so a relay can neither read, alter, drop, reorder nor cut it
unnoticed.  Flow control is per stream: `write` waits while the other end's
window is full, and the window is granted back as the application reads, so
a reader that stops slows its writer and nothing piles up (`window=` on
`open_stream` and `accept`, default 4 MiB; relays may lower it).  Streams
live on the relay connection they were opened on: when it drops every stream
ends with StreamBrokenError at both ends, and none is ever resumed.

Calls (SPEC §18): `device.on_call("reboot", handler)` answers a method;
`await device.call(peer, "reboot", body, timeout=5)` returns a `CallResult`
(status, body).  A call is taken only from a peer (or the oracle), never
after its deadline nor a second time for one correlation id, and runs at most
once; it waits in an offline callee's mailbox until its deadline, and the
caller gets CallTimeoutError then.  A response counts only from the callee
for a call still awaited; others are discarded and counted (`DeviceStats`).

Modules, one job each: `protocol` (the pure conversation with one relay:
handshake, frames in and out), `connection` (its socket shell), `manager`
(relay list, backoff, failover), `inbox` (pure decision per delivery),
`freshness` (how long an envelope can be valid), `outbox` (sends awaiting
ACCEPTED and the rules for them), `tracking` (what became of each message
sent), `sending` (both driven by the relays' answers), `dedup` (messages
already handled), `state` (the SQLite file behind outbox, tracking and
dedup), `peers`, `backoff`, `drain` (the old key's mailbox after a
rotation), `key_files` (the home's key files across a rotation),
`stream_rules` (streams, pure) and `streams` (`Stream`, `StreamRequest`),
`tunnel` (TCP ports over streams), `transfer_out` and `transfer_in` (files
as a manifest and chunks, SPEC §17), `calls` (calls, pure) and `calling`
(their shell), `device` (the public API tying them
together), `stats`, `settings`, `cli`, `tunnel_cli` and `calls_cli` (the
`continuum-client` command).
"""

from .calls import CallResult, IncomingCall
from .config import ConfigUpdate
from .device import Device
from .inbox import DropReason, InboundMessage
from .key_files import KeyFiles
from .peers import PeerList
from .stats import DeviceStats
from .streams import Stream, StreamRequest
from .tracking import DeliveryStatus, Outgoing, SendState, SentMessage
from .transfer_in import ReceivedFile
from .transfer_out import SentFile, TransferError

__all__ = ["CallResult", "ConfigUpdate", "DeliveryStatus", "Device", "DeviceStats", "DropReason",
           "InboundMessage", "IncomingCall", "KeyFiles", "Outgoing", "PeerList", "ReceivedFile",
           "SendState", "SentFile", "SentMessage", "Stream", "StreamRequest", "TransferError"]
