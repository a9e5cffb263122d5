"""MQTT and NATS JetStream sender/receiver processes: the relay load shape through the brokers.

They are `loadgen.Clients` for `loadgen.run_load`, so the brokers are driven
and measured exactly like the relay: the same processes per side, start time,
deadlines, window of un-answered sends per sender connection and the same
result dicts (latency matched by msg_id, client CPU per process).  A pair's
topic/subject is its receiver's public key in hex, the name of its Continuum
mailbox; a message's id is the first 16 bytes of its payload, which is padded
to the plan's payload size and built before the clock starts.

- MQTT (paho-mqtt): QoS 1.  The sender's PUBACK is the relay's ACCEPTED, the
  receiver's PUBACK (sent by paho once `on_message` returns) its ACK.  Receivers
  keep a persistent session (clean_session False), the MQTT form of a mailbox.
  A process drives all its connections from one thread through `selectors` and
  paho's loop_read/loop_write, as a loadgen process drives its devices from one
  event loop, rather than from paho's thread per connection (`loop_start`).
- NATS JetStream (nats-py): one work-queue stream on file storage; a durable
  push consumer per receiver with explicit acks and the relay's delivery window
  as max_ack_pending.  The sender's PubAck (the message is in the stream) is the
  ACCEPTED, the receiver's +ACK (the message leaves the work queue) the ACK.

paho and nats are imported where they are used, so this module (and run_all.py)
imports without the `bench` extra; benchmarks/peers.py skips what is missing.
"""

from __future__ import annotations

import asyncio
import collections
import os
import selectors
import socket
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from urllib.parse import urlsplit

from brokers import DELIVERY_WINDOW
from loadgen import _DRAIN_GRACE_S, Clients, LoadPlan, _cpu_now

from proto import Identity

MSG_ID_BYTES = 16
_TOPIC_PREFIX = "continuum-peer"
_STREAM = "CONTINUUM_PEER"
_SETUP_TIMEOUT_S = 30.0


def mailbox_name(receiver_key: bytes) -> str:
    """A receiver's mailbox: the hex of its public key, as a topic level or subject token."""
    return receiver_key.hex()


def _messages(plan: LoadPlan) -> list[tuple[bytes, bytes]]:
    """(msg_id, payload) pairs: a random id, padded with zeros to the plan's payload size."""
    padding = b"\x00" * max(0, plan.payload_bytes - MSG_ID_BYTES)
    return [(msg_id, msg_id + padding)
            for msg_id in (os.urandom(MSG_ID_BYTES) for _ in range(plan.per_sender))]


def _receiver_key(seed: bytes) -> bytes:
    return Identity(seed).public.raw


def _sender_stats() -> dict:
    return {"sent_ns": {}, "accepted": 0, "last_accept_ns": 0, "unanswered_connections": 0,
            "errors": collections.Counter()}


def _sender_result(stats: dict, cpu_s: float) -> dict:
    return {**stats, "errors": dict(stats["errors"]), "cpu_s": cpu_s}


def _sleep_until_ns(due_ns: int) -> None:
    time.sleep(max(0.0, (due_ns - time.monotonic_ns()) / 1e9))


# --- MQTT (paho-mqtt) ----------------------------------------------------------------------

class _Link:
    """One paho connection in manual-loop mode (driven by `_pump`); `ready` once CONNACKed."""

    def __init__(self, url: str, client_id: str, *, clean_session: bool) -> None:
        from paho.mqtt import client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=clean_session, protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(DELIVERY_WINDOW)  # above any plan's window
        self.client.max_queued_messages_set(0)
        self.ready = False
        self.client.on_connect = self._connected
        parts = urlsplit(url)
        self.client.connect(parts.hostname, parts.port, keepalive=60)
        # paho leaves Nagle on; aiohttp, asyncio (nats-py) and both brokers turn it off.
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _connected(self, _client, _userdata, _flags, reason, _properties) -> None:
        self.ready = not reason.is_failure


def _pump(links: list[_Link], done: Callable[[], bool], until_ns: int) -> bool:
    """Read and write every link's socket from this one thread until `done()` or `until_ns`;
    True when done.  Writes queued by callbacks (a PUBACK, the next PUBLISH) go out after
    each read."""
    clients = [link.client for link in links]
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.socket(), selectors.EVENT_READ, client)
    next_misc = time.monotonic()
    unwritten = False
    try:
        while not done():
            if time.monotonic_ns() >= until_ns:
                return False
            for key, _ in selector.select(timeout=0.001 if unwritten else 0.05):
                key.data.loop_read()
            for client in clients:
                if client.want_write():
                    client.loop_write()
            unwritten = any(client.want_write() for client in clients)  # a full send buffer
            if time.monotonic() >= next_misc:  # keepalive pings, as paho's own loop does
                next_misc += 1.0
                for client in clients:
                    client.loop_misc()
        return True
    finally:
        selector.close()


def _connect_all(links: list[_Link]) -> None:
    if not _pump(links, lambda: all(link.ready for link in links),
                 time.monotonic_ns() + int(_SETUP_TIMEOUT_S * 1e9)):
        raise TimeoutError(f"MQTT CONNECT not answered within {_SETUP_TIMEOUT_S:.0f}s")


def _disconnect_all(links: list[_Link]) -> None:
    for link in links:
        link.client.disconnect()


class _Publisher(_Link):
    """One sender connection: keeps `window` QoS 1 PUBLISHes un-answered until all are sent."""

    def __init__(self, url: str, topic: str, messages: list[tuple[bytes, bytes]], window: int,
                 stats: dict) -> None:
        super().__init__(url, f"tx-{os.urandom(8).hex()}", clean_session=True)
        self.topic, self.messages, self.window, self.stats = topic, messages, window, stats
        self.next = self.in_flight = 0
        self.deadline_ns = 0
        self.stopped = False
        self.client.on_publish = self._answered

    def top_up(self) -> None:
        """Send until the window is full, every message is out, or the deadline passed."""
        while self.in_flight < self.window and self.next < len(self.messages) and not self.stopped:
            now = time.monotonic_ns()
            if now > self.deadline_ns:
                self.stopped = True
                return
            msg_id, payload = self.messages[self.next]
            self.next += 1
            self.stats["sent_ns"][msg_id] = now
            info = self.client.publish(self.topic, payload, qos=1)
            if info.rc:
                self.stats["errors"][f"publish rc {info.rc}"] += 1
            else:
                self.in_flight += 1

    def _answered(self, _client, _userdata, _mid, reason, _properties) -> None:
        self.in_flight -= 1
        if reason.is_failure:
            self.stats["errors"][str(reason)] += 1
        else:
            self.stats["accepted"] += 1
            self.stats["last_accept_ns"] = time.monotonic_ns()
        self.top_up()

    @property
    def sending(self) -> bool:
        return not self.stopped and self.next < len(self.messages)

    @property
    def done(self) -> bool:
        return not self.sending and self.in_flight == 0


def mqtt_sender(pipe: Connection, url: str, plan: LoadPlan,
                devices: list[tuple[int, bytes, bytes]]) -> None:
    stats = _sender_stats()
    publishers = [_Publisher(url, f"{_TOPIC_PREFIX}/{mailbox_name(recipient)}", _messages(plan),
                             plan.window, stats)
                  for _index, _seed, recipient in devices]
    _connect_all(publishers)
    pipe.send("ready")
    start_ns = pipe.recv()
    deadline_ns = start_ns + int(plan.deadline_s * 1e9)
    _sleep_until_ns(start_ns)
    cpu_start = _cpu_now()
    for publisher in publishers:
        publisher.deadline_ns = deadline_ns
        publisher.top_up()
    _pump(publishers, lambda: not any(p.sending for p in publishers), deadline_ns)
    _pump(publishers, lambda: all(p.done for p in publishers),
          time.monotonic_ns() + int(_DRAIN_GRACE_S * 1e9))
    stats["unanswered_connections"] = sum(not p.done for p in publishers)
    cpu = _cpu_now() - cpu_start
    _disconnect_all(publishers)
    pipe.send(_sender_result(stats, cpu))


class _Subscriber(_Link):
    """One receiver connection: notes each delivery; paho PUBACKs it when the callback returns."""

    def __init__(self, url: str, receiver_key: bytes, expected: int,
                 received_ns: dict[bytes, int]) -> None:
        name = mailbox_name(receiver_key)
        super().__init__(url, f"rx-{name[:20]}", clean_session=False)
        self.topic, self.expected, self.received_ns = f"{_TOPIC_PREFIX}/{name}", expected, received_ns
        self.got = self.duplicates = 0
        self.subscribed = False
        self.client.on_message = self._delivered
        self.client.on_subscribe = self._subscribed

    def _subscribed(self, *_args: object) -> None:
        self.subscribed = True

    def _delivered(self, _client, _userdata, message) -> None:
        now = time.monotonic_ns()
        msg_id = message.payload[:MSG_ID_BYTES]
        if msg_id in self.received_ns:
            self.duplicates += 1
        else:
            self.received_ns[msg_id] = now
            self.got += 1


def mqtt_receiver(pipe: Connection, url: str, plan: LoadPlan, seeds: list[bytes]) -> None:
    received_ns: dict[bytes, int] = {}
    subscribers = [_Subscriber(url, _receiver_key(seed), plan.per_sender, received_ns)
                   for seed in seeds]
    _connect_all(subscribers)
    for subscriber in subscribers:
        subscriber.client.subscribe(subscriber.topic, qos=1)
    if not _pump(subscribers, lambda: all(s.subscribed for s in subscribers),
                 time.monotonic_ns() + int(_SETUP_TIMEOUT_S * 1e9)):
        raise TimeoutError(f"MQTT SUBSCRIBE not answered within {_SETUP_TIMEOUT_S:.0f}s")
    pipe.send("ready")
    start_ns = pipe.recv()
    cpu_start = _cpu_now()
    _pump(subscribers, lambda: all(s.got >= s.expected for s in subscribers),
          start_ns + int((plan.deadline_s + _DRAIN_GRACE_S) * 1e9))
    cpu = _cpu_now() - cpu_start
    _disconnect_all(subscribers)
    pipe.send({"received_ns": received_ns, "duplicates": sum(s.duplicates for s in subscribers),
               "cpu_s": cpu})


# --- NATS JetStream (nats-py) --------------------------------------------------------------

async def _nats_connect(url: str):
    import nats

    return await nats.connect(url, allow_reconnect=False, connect_timeout=_SETUP_TIMEOUT_S)


async def _publish_all(js, subject: str, messages: list[tuple[bytes, bytes]], plan: LoadPlan,
                       deadline_ns: int, stats: dict) -> None:
    """Keep `plan.window` publishes awaiting their PubAck until all are sent, then await the rest."""
    room = asyncio.Semaphore(plan.window)

    def answered(future: asyncio.Future) -> None:
        room.release()
        if future.cancelled() or future.exception() is not None:
            error = "cancelled" if future.cancelled() else type(future.exception()).__name__
            stats["errors"][error] += 1
        else:
            stats["accepted"] += 1
            stats["last_accept_ns"] = time.monotonic_ns()

    try:
        for msg_id, payload in messages:
            await room.acquire()
            now = time.monotonic_ns()
            if now > deadline_ns:
                room.release()
                break
            stats["sent_ns"][msg_id] = now
            future = await js.publish_async(subject, payload)
            future.add_done_callback(answered)
        async with asyncio.timeout(_DRAIN_GRACE_S):
            for _ in range(plan.window):  # the whole window back: every publish answered
                await room.acquire()
    except TimeoutError:
        stats["unanswered_connections"] += 1


async def _nats_senders(pipe: Connection, url: str, plan: LoadPlan,
                        devices: list[tuple[int, bytes, bytes]]) -> None:
    connections = [await _nats_connect(url) for _ in devices]
    streams = [connection.jetstream() for connection in connections]
    subjects = [f"{_TOPIC_PREFIX}.{mailbox_name(recipient)}" for _i, _s, recipient in devices]
    messages = [_messages(plan) for _ in devices]
    pipe.send("ready")
    loop = asyncio.get_running_loop()
    start_ns = await loop.run_in_executor(None, pipe.recv)
    deadline_ns = start_ns + int(plan.deadline_s * 1e9)
    await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
    cpu_start = _cpu_now()
    stats = _sender_stats()
    await asyncio.gather(*(_publish_all(js, subject, batch, plan, deadline_ns, stats)
                           for js, subject, batch in zip(streams, subjects, messages)))
    cpu = _cpu_now() - cpu_start
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    pipe.send(_sender_result(stats, cpu))


async def _make_mailbox(js, subject: str, durable: str, expected: int,
                        received_ns: dict[bytes, int], counts: dict):
    """The stream (every receiver asks; an identical config is accepted again) and this
    receiver's durable push consumer; returns the event set once `expected` arrived."""
    from nats.js.api import (AckPolicy, ConsumerConfig, RetentionPolicy, StorageType,
                             StreamConfig)
    from nats.js.errors import BadRequestError

    try:
        await js.add_stream(StreamConfig(name=_STREAM, subjects=[f"{_TOPIC_PREFIX}.>"],
                                         storage=StorageType.FILE,
                                         retention=RetentionPolicy.WORK_QUEUE))
    except BadRequestError:
        # Two receivers' creations at the same moment: nats-server 2.9 may answer one with
        # "subjects overlap with an existing stream", which then exists (else this raises).
        await js.stream_info(_STREAM)
    finished = asyncio.Event()
    got = 0

    async def delivered(msg) -> None:
        nonlocal got
        now = time.monotonic_ns()
        msg_id = msg.data[:MSG_ID_BYTES]
        if msg_id in received_ns:
            counts["duplicates"] += 1
        else:
            received_ns[msg_id] = now
            got += 1
        await msg.ack()
        if got >= expected:
            finished.set()

    await js.subscribe(subject, durable=durable, cb=delivered, manual_ack=True,
                       config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                             max_ack_pending=DELIVERY_WINDOW))
    return finished


async def _nats_receivers(pipe: Connection, url: str, plan: LoadPlan, seeds: list[bytes]) -> None:
    received_ns: dict[bytes, int] = {}
    counts = {"duplicates": 0}
    connections, finished = [], []
    for seed in seeds:
        name = mailbox_name(_receiver_key(seed))
        connection = await _nats_connect(url)
        connections.append(connection)
        finished.append(await _make_mailbox(connection.jetstream(), f"{_TOPIC_PREFIX}.{name}",
                                            f"rx-{name[:20]}", plan.per_sender, received_ns,
                                            counts))
    pipe.send("ready")
    start_ns = await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    cpu_start = _cpu_now()
    deadline_s = (start_ns - time.monotonic_ns()) / 1e9 + plan.deadline_s + _DRAIN_GRACE_S
    try:
        async with asyncio.timeout(max(0.0, deadline_s)):
            await asyncio.gather(*(event.wait() for event in finished))
    except TimeoutError:
        pass
    cpu = _cpu_now() - cpu_start
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    pipe.send({"received_ns": received_ns, "duplicates": counts["duplicates"], "cpu_s": cpu})


def nats_sender(pipe: Connection, url: str, plan: LoadPlan,
                devices: list[tuple[int, bytes, bytes]]) -> None:
    asyncio.run(_nats_senders(pipe, url, plan, devices))


def nats_receiver(pipe: Connection, url: str, plan: LoadPlan, seeds: list[bytes]) -> None:
    asyncio.run(_nats_receivers(pipe, url, plan, seeds))


MQTT = Clients(mqtt_sender, mqtt_receiver)
NATS = Clients(nats_sender, nats_receiver)
