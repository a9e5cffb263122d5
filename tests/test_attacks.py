"""Abuse of a live relay: floods, slow readers and idle sockets hurt only the abuser."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
import redis
from redis_server import RedisServer
from wire import RawDevice, now_ms, sealed

from continuum.health import PROBE_EVERY_S
from continuum.protocol import MIN_READ_PAUSE_S
from proto import Identity, Kind, seal_envelope
from proto.errors import ErrorCode, RateLimitedError
from proto.frames import Accepted, Ack, Error, Send, StreamCredit, encode_frame


async def round_trip_seconds(url: str) -> float:
    """Time for a fresh pair of devices to pass one message: the 'others unaffected' probe."""
    alice, bob = Identity.generate(), Identity.generate()
    started = time.perf_counter()
    async with await RawDevice.connect(url, alice) as a, await RawDevice.connect(url, bob) as b:
        assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
        await b.next_delivery(timeout=5)
    return time.perf_counter() - started


async def test_flood_of_tiny_frames_is_rate_limited_then_cut_off(start_relay) -> None:
    server = await start_relay(rate_per_s=20.0, rate_burst=40, max_invalid_frames=200)
    flooder, target = Identity.generate(), Identity.generate()
    frames = [encode_frame(Send(sealed(flooder, [target.public], b"").raw)) for _ in range(2000)]
    async with await RawDevice.connect(server.url, flooder) as f:
        for frame in frames:
            if f.ws.closed:
                break
            await f.send_raw(frame)
        assert await round_trip_seconds(server.url) < 1.0
        answers = []
        while True:
            message = await f.ws.receive(timeout=10)
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            answers.append(message.data)
    assert f.ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    stored = await server.relay.store.depth(target.public)  # type: ignore[union-attr]
    assert 40 <= stored <= 60  # the burst plus what 20/s refilled while flooding
    assert len(answers) < len(frames)  # cut off before it was served in full


CHEAP_FRAMES: dict[str, Callable[[RawDevice], Awaitable[None]]] = {
    "ack_of_an_unknown_tag": lambda device: device.send_frame(Ack("never-delivered")),
    "credit_for_no_stream": lambda device: device.send_frame(StreamCredit(bytes(16), 1)),
    "ping": lambda device: device.ws.ping(),
}


@pytest.mark.parametrize("kind", sorted(CHEAP_FRAMES))
async def test_a_flood_of_cheap_frames_is_read_at_the_frame_rate_while_others_flow(
        start_relay, kind: str) -> None:
    """Frames that are no SEND (which spends a rate token) and break no rule (which counts
    toward the abuse limit): one connection made the relay handle them as fast as it could
    decode them, about 30,000 a second, a whole core.  Now every message of a connection
    costs a token of its frame rate (rate 500/s, burst 50 here) and one over it is read
    more slowly: the SEND after 1,000 of them is answered only once the rate allowed them
    all, the flooder is not cut off, and other devices' messages pass meanwhile."""
    rate, burst, count = 500, 50, 1_000
    server = await start_relay(frames_per_s=rate, frame_burst=burst)
    flooder = Identity.generate()
    async with await RawDevice.connect(server.url, flooder) as f:
        started = time.perf_counter()
        for _ in range(count):
            await CHEAP_FRAMES[kind](f)
        assert await round_trip_seconds(server.url) < 1.0  # while the flood waits to be read
        assert isinstance(await f.send(sealed(flooder, [flooder.public])), Accepted)
        elapsed = time.perf_counter() - started
    fastest = (count + 1 - burst) / rate - MIN_READ_PAUSE_S  # its last wait need not be over
    assert elapsed >= fastest, (
        f"{count} {kind} frames and a SEND handled in {elapsed:.2f}s; at {rate}/s (burst"
        f" {burst}) that takes at least {fastest:.2f}s")
    assert server.relay.metrics.frames_over_rate.value > 0  # type: ignore[union-attr]


async def test_slow_reader_holds_only_its_window_and_others_flow(start_relay) -> None:
    server = await start_relay(delivery_window=8, rate_per_s=1e6, rate_burst=10**6)
    sender, slow = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(server.url, sender) as s:
        for _ in range(200):
            envelope = seal_envelope(sender, Kind.DATA, [slow.public], b"x" * 30_000,
                                     ttl_s=60, now_ms=now_ms())
            assert isinstance(await s.send(envelope), Accepted)
    async with await RawDevice.connect(server.url, slow):  # connects, then never reads
        await asyncio.sleep(0.5)
        assert await round_trip_seconds(server.url) < 1.0
        delivered = server.relay.metrics.delivered.value  # type: ignore[union-attr]
    assert delivered <= 8 + 1  # its window, plus the probe's one delivery
    assert await server.relay.store.depth(slow.public) == 200  # type: ignore[union-attr]


async def test_connection_flood_from_one_address_is_capped(start_relay) -> None:
    """One address holds at most its share of pending handshakes: a 17th idle upgrade is
    served by closing one of the 16 (tests/test_hostile_load.py shows why not the 17th)."""
    server = await start_relay(max_pending_handshakes_per_address=16, handshake_timeout_s=5)
    async with aiohttp.ClientSession() as http:
        idle = [await http.ws_connect(server.url) for _ in range(17)]
        assert server.relay.gate.pending_handshakes == 16  # type: ignore[union-attr]
        # Devices at other addresses (127.0.0.2 is loopback too) are unaffected.
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=other) as elsewhere:
            ws = await elsewhere.ws_connect(server.url)
            assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.BINARY  # CHALLENGE
            await ws.close()
        for ws in idle:
            await ws.close()
    evicted = server.relay.metrics.handshake_failures.labels(  # type: ignore[union-attr]
        "evicted")._value.get()
    assert evicted == 1


async def test_idle_sockets_are_closed_after_the_handshake_timeout(start_relay) -> None:
    server = await start_relay(handshake_timeout_s=0.2, max_pending_handshakes_per_address=4)
    async with aiohttp.ClientSession() as http:
        idle = [await http.ws_connect(server.url) for _ in range(4)]
        for ws in idle:
            while (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.BINARY:
                pass  # CHALLENGE, then the UNAUTHENTICATED error, then the close
        # The timed-out sockets freed their slots.
        assert await round_trip_seconds(server.url) < 1.0
        fresh = await http.ws_connect(server.url)
        await fresh.close()



@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_envelopes_naming_another_sender_spend_the_connections_tokens_not_its(
        start_relay, redis_url: str, store: str) -> None:
    """A device that resends a victim's envelopes (it received them, they are validly
    signed) is refused WRONG_SENDER; the rate tokens those SENDs spent are its own, so the
    victim can still send its whole burst."""
    server = await start_relay(store=redis_url if store == "redis" else "memory",
                               rate_per_s=0.01, rate_burst=3, max_invalid_frames=200)
    thief, victim, bob = Identity.generate(), Identity.generate(), Identity.generate()
    async with await RawDevice.connect(server.url, thief) as t:
        codes = [(await t.send(sealed(victim, [bob.public]))) for _ in range(10)]
    assert all(isinstance(answer, Error) for answer in codes)
    assert [answer.code for answer in codes[:3]] == [ErrorCode.WRONG_SENDER] * 3
    assert {answer.code for answer in codes[3:]} == {ErrorCode.RATE_LIMITED}  # its own bucket
    async with await RawDevice.connect(server.url, victim) as v:
        for _ in range(3):
            assert isinstance(await v.send(sealed(victim, [bob.public])), Accepted)
        assert (await v.send(sealed(victim, [bob.public]))).code == ErrorCode.RATE_LIMITED


async def test_a_clients_own_forwarded_header_is_not_believed_over_the_proxys(
        start_relay) -> None:
    """Behind ingress-nginx (which appends X-Forwarded-For and passes a client's `Forwarded`
    on untouched) an attacker at 203.0.113.66 names the victim's address in `Forwarded` and
    opens the address's two connections: the victim, at 198.51.100.7, still gets in.  Before,
    `Forwarded` was read first and the victim was refused 429."""
    relay = await start_relay(trusted_proxies=("127.0.0.0/8",), max_connections_per_address=2)
    attacker = {"X-Forwarded-For": "203.0.113.66", "Forwarded": "for=198.51.100.7"}
    held = [await RawDevice.connect(relay.url, Identity.generate(), headers=attacker)
            for _ in range(2)]
    try:
        async with await RawDevice.connect(relay.url, Identity.generate(),
                                           headers={"X-Forwarded-For": "198.51.100.7"}):
            pass
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await RawDevice.connect(relay.url, Identity.generate(), headers=attacker)
        assert refused.value.status == 429  # the attacker's own address is full
    finally:
        for device in held:
            await device.close()


async def test_a_flood_of_healthz_requests_probes_the_store_at_most_once_a_second(
        start_relay) -> None:
    """/healthz answers anyone, and its probe commits a write: 300 requests in a loop made
    300 writes to the store.  Now one probe a second answers them all (continuum/health.py),
    and a request after that second probes again."""
    redis_server = RedisServer("--appendonly", "no").start()
    try:
        relay = await start_relay(store=f"{redis_server.url}/0")
        probe_writes = _counter(redis_server, "cmdstat_set")
        before = probe_writes()
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    async with http.get(relay.base_url + "/healthz") as response:
                        assert response.status == 200
                elapsed = time.monotonic() - started
                assert probe_writes() - before <= elapsed / PROBE_EVERY_S + 1
                await asyncio.sleep(PROBE_EVERY_S)
                written = probe_writes()
                async with http.get(relay.base_url + "/healthz") as response:
                    assert response.status == 200
                assert probe_writes() == written + 1
        finally:
            await relay.stop()  # before the Redis it writes to
    finally:
        redis_server.remove()


def _counter(server: RedisServer, command: str) -> Callable[[], int]:
    """How many times `command` ran on `server` so far (INFO commandstats)."""
    def calls() -> int:
        with redis.Redis.from_url(server.url) as client:
            stats = client.info("commandstats").get(command)
        return 0 if stats is None else int(stats["calls"])
    return calls


async def test_handshakes_from_addresses_of_one_ipv6_64_share_one_unknown_key_budget(
        start_relay) -> None:
    """A host holds a whole IPv6 /64 and may pick a new source address for every connection:
    each one a budget of its own, it had as many signature checks for fresh keys as it
    liked.  Fresh keys from four addresses of one /64, burst 3: the fourth is refused; a
    fresh key from the next /64 is not."""
    relay = await start_relay(trusted_proxies=("127.0.0.0/8",), unknown_key_rate_per_s=0.01,
                              unknown_key_burst=3, probation_sends=0)
    for host in range(1, 4):
        async with await RawDevice.connect(relay.url, Identity.generate(),
                                           headers={"X-Forwarded-For": f"2001:db8:0:1::{host}"}):
            pass
    with pytest.raises(RateLimitedError):
        await RawDevice.connect(relay.url, Identity.generate(),
                                headers={"X-Forwarded-For": "2001:db8:0:1::4"})
    async with await RawDevice.connect(relay.url, Identity.generate(),
                                       headers={"X-Forwarded-For": "2001:db8:0:2::1"}):
        pass


def _client_frame(first_byte: int, payload: bytes) -> bytes:
    """One masked client WebSocket frame (mask 0: the payload goes as it is)."""
    size = len(payload)
    if size < 126:
        header = bytes([first_byte, 0x80 | size])
    elif size < 65536:
        header = bytes([first_byte, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([first_byte, 0x80 | 127]) + size.to_bytes(8, "big")
    return header + bytes(4) + payload


_BINARY, _CONTINUATION, _FIN = 0x02, 0x00, 0x80


async def _closed_within(ws: aiohttp.ClientWebSocketResponse, timeout_s: float) -> bool:
    """Whether the relay ends the connection within `timeout_s` (anything else it sends first,
    a refusal or a CLOSE, is read past)."""
    try:
        async with asyncio.timeout(timeout_s):
            while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSED,
                                                    aiohttp.WSMsgType.ERROR):
                pass
    except TimeoutError:
        return False
    return True


@pytest.mark.parametrize("when", ["before HELLO", "after WELCOME"])
async def test_a_message_that_never_ends_in_empty_fragments_is_cut_off(
        start_relay, when: str) -> None:
    """A peer starts a binary message and sends empty continuation frames (6 bytes each)
    that never complete it: aiohttp parses each, but nothing reaches the session, so the
    frame rate and the PINGs-before-HELLO limit never saw them, and one connection had the
    relay parse millions a second.  Now the bytes a peer sends beyond the messages it
    completes are bounded (`continuum.framing`): the relay cuts it off, whether it said
    HELLO or not, while another device's messages pass (the handshake deadline, 30 s here,
    is not what ends the first)."""
    relay = await start_relay(handshake_timeout_s=30.0)
    flood = (_client_frame(_BINARY, b"")
             + _client_frame(_CONTINUATION, b"") * 1_000_000)  # 6 MB, far past either bound
    alice, bob = Identity.generate(), Identity.generate()
    async with aiohttp.ClientSession() as http:
        if when == "before HELLO":
            ws = await http.ws_connect(relay.url)
            await ws.receive_bytes(timeout=5)  # the CHALLENGE; no HELLO follows
            transport = ws._response.connection.transport  # type: ignore[union-attr]
        else:
            device = await RawDevice.connect(relay.url, alice)
            ws = device.ws
            transport = ws._response.connection.transport  # type: ignore[union-attr]
        try:
            transport.write(flood)
            assert await _closed_within(ws, 10), f"still open {when}"
            async with await RawDevice.connect(relay.url, bob) as other:
                assert isinstance(await other.send(sealed(bob, [alice.public])), Accepted)
        finally:
            await ws.close()
            if when == "after WELCOME":
                await device.session.close()


async def test_a_frame_sent_in_fragments_is_read_whole(start_relay) -> None:
    """Fragmentation itself is allowed (RFC 6455): a SEND split into eight WebSocket frames
    is one message, accepted, and the connection goes on."""
    relay = await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as device:
        envelope = sealed(alice, [bob.public])
        message = device.sealer.seal(Send(envelope.raw))
        step = -(-len(message) // 8)
        pieces = [message[i:i + step] for i in range(0, len(message), step)]
        frames = [_client_frame(_BINARY if n == 0 else _CONTINUATION, piece)
                  for n, piece in enumerate(pieces[:-1])]
        frames.append(_client_frame(_FIN | _CONTINUATION, pieces[-1]))
        device.ws._response.connection.transport.write(b"".join(frames))  # type: ignore[union-attr]
        assert await device.recv_not_deliver() == Accepted(envelope.msg_id)
        assert isinstance(await device.send(sealed(alice, [bob.public])), Accepted)
