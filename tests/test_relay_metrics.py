"""The relay's /metrics beyond message counts: store call latency and outages, the process's
own figures, and sockets by connection state, read over real sockets."""

from __future__ import annotations

import asyncio

import aiohttp
from access_support import metric
from relay_process import free_port
from test_peer_groups import StartRelay
from wire import RawDevice, sealed

from proto import Identity
from proto.frames import Accepted


async def test_store_calls_are_timed_by_operation(start_relay: StartRelay) -> None:
    relay = await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as a:
        assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
    async with await RawDevice.connect(relay.url, bob) as b:
        await b.next_delivery()
        await b.expect_silence(0.2)  # the ACK is processed
    for operation in ("allow", "accept", "subscribe", "fetch", "ack", "depth"):
        count = await metric(relay.base_url, "continuum_store_operation_seconds_count",
                             operation=operation)
        assert count is not None and count >= 1, operation
    assert await metric(relay.base_url, "continuum_store_errors_total", operation="accept") == 0
    assert (await metric(relay.base_url, "process_cpu_seconds_total") or 0) > 0
    assert (await metric(relay.base_url, "process_resident_memory_bytes") or 0) > 1 << 20
    assert await metric(relay.base_url, "python_gc_objects_collected_total",
                        generation="0") is not None


async def test_message_counts_and_verify_times_read_as_prometheus_counters_and_histogram(
        start_relay: StartRelay) -> None:
    """Kept in plain integers by the event loop (`metrics.LoopCounter`, `LoopHistogram`), they
    are exposed as prometheus_client's own counters and histograms are."""
    relay = await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as a:
        for _ in range(3):
            assert isinstance(await a.send(sealed(alice, [bob.public])), Accepted)
    async with await RawDevice.connect(relay.url, bob) as b:
        for _ in range(3):
            await b.next_delivery()
        await b.expect_silence(0.2)  # the ACKs are processed
    for name in ("accepted", "delivered", "acked"):
        assert await metric(relay.base_url, f"continuum_messages_{name}_total") == 3, name
        assert (await metric(relay.base_url, f"continuum_messages_{name}_created") or 0) > 1e9
    buckets = [await metric(relay.base_url, "continuum_verify_seconds_bucket", le=bound)
               for bound in ("2.5e-05", "5e-05", "0.0001", "0.0002", "0.0005", "0.001", "0.005",
                             "+Inf")]
    assert buckets == sorted(buckets) and buckets[-1] == 3  # cumulative, as Prometheus reads them
    assert await metric(relay.base_url, "continuum_verify_seconds_count") == 3
    assert 0 < (await metric(relay.base_url, "continuum_verify_seconds_sum") or 0) < 3
    assert (await metric(relay.base_url, "continuum_verify_seconds_created") or 0) > 1e9


async def test_a_store_that_cannot_be_reached_is_counted_per_operation(
        start_relay: StartRelay) -> None:
    relay = await start_relay(store=f"redis://127.0.0.1:{free_port()}/0")  # nobody listens
    async with aiohttp.ClientSession() as http, http.get(relay.base_url + "/healthz") as response:
        assert response.status == 503
    assert (await metric(relay.base_url, "continuum_store_errors_total", operation="ping")
            or 0) >= 1


async def test_sockets_are_counted_by_state(start_relay: StartRelay) -> None:
    relay = await start_relay()
    alice = Identity.generate()

    async def states() -> dict[str, float]:
        return {state: await metric(relay.base_url, "continuum_connections", state=state) or 0
                for state in ("upgrading", "handshake", "open", "closing")}

    # A TCP connection that never completes its upgrade request.
    _, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(b"GET /v1/connect HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    async with aiohttp.ClientSession() as http:
        upgraded = await http.ws_connect(relay.url)  # CHALLENGE sent, no HELLO yet
        await upgraded.receive_bytes(timeout=5)
        device = await RawDevice.connect(relay.url, alice)
        try:
            now = await states()
            # The scrape itself is one more socket being served over plain HTTP.
            assert now["handshake"] == 1 and now["open"] == 1 and now["closing"] == 0
            assert now["upgrading"] >= 2, now
        finally:
            await device.close()
            await upgraded.close()
            writer.close()
    for _ in range(100):
        now = await states()
        if now["open"] == 0 and now["handshake"] == 0:
            break
        await asyncio.sleep(0.05)
    assert now["open"] == 0 and now["handshake"] == 0 and now["closing"] == 0
