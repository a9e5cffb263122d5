"""The device library for programs: timeouts, a home that survives restarts, receipts that are
retried, quiet by default, typed, and a docstring example that runs as written."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from fake_relay import FakeRelay, accept, refuse

import client
from client import DeliveryStatus, Device, InboundMessage, PeerList
from client.backoff import Backoff
from client.connection import connect
from client.state import DeviceState, StoredSend
from client.tracking import SentLog
from continuum.server import RelayServer, Settings
from proto import Envelope, Identity, Kind, PublicKey, decode_envelope, seal_envelope
from proto.calls import Call
from proto.channel import Layout
from proto.config import ConfigPush
from proto.errors import ErrorCode
from redis_server import RedisServer
from relay_process import RelayProcess, free_port
from runtime.clock import now_ms
from tally import FAULTS_SURVIVED, MESSAGES_LOST, TALLY

ROOT = Path(__file__).resolve().parent.parent


def device(identity: Identity, urls: Iterable[str], peers: Iterable[PublicKey] = (),
           **options: object) -> Device:
    return Device(identity, list(urls), PeerList(peers), backoff=Backoff(0.05, 0.2),
                  **options)  # type: ignore[arg-type]


async def next_message(receiver: Device, timeout: float = 10.0) -> InboundMessage:
    async with asyncio.timeout(timeout), contextlib.aclosing(receiver.messages()) as messages:
        async for message in messages:
            return message
    raise AssertionError("unreachable")


async def test_send_with_a_timeout_raises_and_the_message_goes_out_on_a_later_connection(
        tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    relay = RelayProcess(port=free_port(), log_path=tmp_path / "relay.log")
    try:
        async with device(alice, [relay.url], [bob.public]) as a:
            with pytest.raises(TimeoutError, match="stays in the outbox"):
                await a.send([bob.public], b"patience", timeout=0.5)
            assert a.queued == 1
            await relay.start()
            assert await a.flush(timeout=15) == 0
        async with device(bob, [relay.url], [alice.public]) as b:
            assert (await next_message(b)).payload == b"patience"
    finally:
        relay.stop()


async def test_wait_connected_has_a_timeout() -> None:
    async with device(Identity.generate(), [f"ws://127.0.0.1:{free_port()}/v1/connect"]) as d:
        with pytest.raises(TimeoutError):
            await d.wait_connected(timeout=0.3)


async def test_a_home_keeps_the_outbox_and_what_was_handled_across_restarts(
        relay: RelayServer, tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    dead = f"ws://127.0.0.1:{free_port()}/v1/connect"
    async with device(alice, [dead], home=tmp_path / "alice") as offline:
        queued = await offline.queue([bob.public], b"written while offline")
    async with device(alice, [relay.url], home=tmp_path / "alice") as restarted:
        assert await restarted.flush(timeout=10) == 0
        [sent] = restarted.sent_messages()
        assert sent.msg_id == queued.msg_id and sent.state.value == "accepted"
    async with device(bob, [relay.url], [alice.public], home=tmp_path / "bob") as b:
        assert (await next_message(b)).msg_id == queued.msg_id
    async with device(alice, [relay.url], home=tmp_path / "alice") as again:
        async with asyncio.timeout(10):
            while again.sent_messages()[0].recipients[bob.public] is not DeliveryStatus.DELIVERED:
                await asyncio.sleep(0.05)


def queued_long_ago(home: Path, sender: Identity, recipient: PublicKey, *, age_s: int,
                    ttl_s: int) -> Envelope:
    """What a device that queued a message `age_s` ago and was then switched off left behind."""
    envelope = seal_envelope(sender, Kind.DATA, [recipient], b"from before the outage",
                             ttl_s=ttl_s, now_ms=now_ms() - age_s * 1000)
    state = DeviceState.in_home(home)
    SentLog(state=state).track(envelope)
    state.put_outgoing(envelope.msg_id, StoredSend(envelope.raw, b"from before the outage",
                                                   False))
    state.close()
    return envelope


async def test_a_message_queued_beyond_the_relays_clock_window_is_sealed_again(
        relay: RelayServer, tmp_path: Path) -> None:
    """Byte for byte, the relay would refuse it STALE (created_at 400 s from its clock)."""
    alice, bob = Identity.generate(), Identity.generate()
    old = queued_long_ago(tmp_path / "alice", alice, bob.public, age_s=400, ttl_s=3600)
    async with device(alice, [relay.url], home=tmp_path / "alice") as a:
        assert await a.flush(timeout=10) == 0
        [sent] = a.sent_messages()
        assert (sent.msg_id, sent.state.value) == (old.msg_id, "accepted")
    async with device(bob, [relay.url], [alice.public]) as b:
        message = await next_message(b)
    assert message.msg_id == old.msg_id and message.payload == b"from before the outage"
    assert message.created_at_ms > old.created_at_ms + 390_000


async def test_a_queued_message_whose_ttl_passed_is_not_sent_and_shows_expired(
        tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    old = queued_long_ago(tmp_path / "alice", alice, bob.public, age_s=400, ttl_s=60)
    async with FakeRelay(answer=accept) as relay:
        async with device(alice, [relay.url], home=tmp_path / "alice") as a:
            assert await a.flush(timeout=10) == 0
            [sent] = a.sent_messages()
    assert relay.sends == []
    assert (sent.msg_id, sent.state.value) == (old.msg_id, "expired")
    assert sent.recipients == {bob.public: DeliveryStatus.EXPIRED}


async def test_a_message_left_by_a_key_rotated_away_from_is_settled_not_kept_forever(
        relay: RelayServer, tmp_path: Path) -> None:
    old, new, bob = Identity.generate(), Identity.generate(), Identity.generate()
    dead = f"ws://127.0.0.1:{free_port()}/v1/connect"
    async with device(old, [dead], home=tmp_path / "home") as before:
        await before.queue([bob.public], b"signed by the old key")
    async with device(new, [relay.url], home=tmp_path / "home") as after:
        assert await after.flush(timeout=10) == 0
        [sent] = after.sent_messages()
    assert sent.state.value == "refused" and sent.error is not None
    assert sent.error.startswith("REVOKED")


async def test_transient_refusals_are_retried_by_the_library(start_relay) -> None:  # type: ignore[no-untyped-def]
    """Found: a burst above the relay's rate raised RateLimitedError at the caller."""
    relay = await start_relay(rate_per_s=10.0, rate_burst=1)
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, [relay.url], [bob.public]) as a:
        await a.wait_connected(timeout=10)
        sent = await asyncio.gather(*(a.send([bob.public], bytes([n]), timeout=20)
                                      for n in range(4)))
        assert len({outgoing.msg_id for outgoing in sent}) == 4 and a.stats.refused == 0


async def test_a_receipt_refused_as_transient_is_sent_again_until_stored() -> None:
    """Found under chaos: a receipt refused STORE_UNAVAILABLE was dropped with a log line while
    the message it answers was ACKed, so its sender showed "pending" forever."""
    alice, bob = Identity.generate(), Identity.generate()
    message = seal_envelope(alice, Kind.DATA, [bob.public], b"read it", ttl_s=600,
                            now_ms=now_ms())
    async with FakeRelay(deliver=[message.raw],
                         answer=refuse(ErrorCode.STORE_UNAVAILABLE, times=2)) as relay:
        async with device(bob, [relay.url], [alice.public]) as b:
            assert (await next_message(b)).msg_id == message.msg_id
            await relay.wait_for(lambda: len(relay.sends) == 3)
            assert b.queued == 0  # the third copy was ACCEPTED
    assert len(set(relay.sends)) == 1  # the same receipt envelope each time


@pytest.mark.redis
async def test_receipts_reach_their_sender_through_a_store_outage(tmp_path: Path) -> None:
    """The chaos finding, with a real Redis: the receipt is refused STORE_UNAVAILABLE, the
    store comes back, the receipt arrives."""
    redis = RedisServer("--appendonly", "yes", "--appendfsync", "always").start()
    server = RelayServer(Settings(host="127.0.0.1", port=0, store=f"{redis.url}/0",
                                  log_level="warning"))
    await server.start()
    alice, bob = Identity.generate(), Identity.generate()
    try:
        async with device(alice, [server.url], [bob.public]) as a, \
                device(bob, [server.url], [alice.public]) as b:
            outgoing = await a.send([bob.public], b"read during the outage", timeout=10)
            async with asyncio.timeout(10):
                while b.stats.deliveries == 0:
                    await asyncio.sleep(0.01)
            redis.kill()
            assert (await next_message(b)).msg_id == outgoing.msg_id  # its receipt: refused
            await asyncio.sleep(1.0)
            redis.start()  # same port and AOF
            statuses = await outgoing.wait_receipts(timeout=30)
    finally:
        await server.stop()
        redis.remove()
    assert statuses == {bob.public: DeliveryStatus.DELIVERED}
    TALLY[FAULTS_SURVIVED] += 1


async def test_every_receipt_arrives_through_relay_kills(tmp_path: Path) -> None:
    relay = await RelayProcess("--store", f"sqlite:///{tmp_path / 'mail.db'}",
                               log_path=tmp_path / "relay.log").start()
    alice, bob = Identity.generate(), Identity.generate()
    try:
        async with device(alice, [relay.url], [bob.public]) as a, \
                device(bob, [relay.url], [alice.public]) as b:
            outgoing = [await a.send([bob.public], f"m{n}".encode(), timeout=20)
                        for n in range(30)]
            for n in range(30):
                if n in (10, 20):
                    relay.kill()
                    await relay.start()
                await next_message(b, timeout=30)
            statuses = await asyncio.gather(*(o.wait_receipts(timeout=30) for o in outgoing))
    finally:
        relay.kill()
    missing = sum(s[bob.public] is not DeliveryStatus.DELIVERED for s in statuses)
    TALLY[MESSAGES_LOST] += missing
    assert missing == 0
    TALLY[FAULTS_SURVIVED] += 2


async def test_keepalive_interval_is_a_setting() -> None:
    async with FakeRelay() as relay:
        async with device(Identity.generate(), [relay.url], keepalive_s=0.2) as d:
            await d.wait_connected(timeout=10)
            await relay.wait_for(lambda: relay.pings >= 3, timeout=5)


def test_the_library_writes_nothing_to_stdout_or_stderr_by_default(tmp_path: Path) -> None:
    """Found: an unconfigured structlog printed the library's warnings to the app's stdout."""
    script = f"""
import asyncio
from client import Device
from proto import Identity

async def main():
    async with Device(Identity.generate(), ["ws://127.0.0.1:{free_port()}/v1/connect"]) as d:
        try:
            await d.send([Identity.generate().public], b"x", timeout=1.5)
        except TimeoutError:
            pass

asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0 and (result.stdout, result.stderr) == ("", "")


def test_the_package_is_typed() -> None:
    assert (ROOT / "client" / "py.typed").exists()
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]
    assert "py.typed" in package_data["client"]


async def test_the_docstring_example_runs_as_written(relay: RelayServer, tmp_path: Path) -> None:
    [example] = re.findall(r"each normally runs on its own machine, with its own key file\)::\n\n"
                           r"((?:    .*\n|\n)+?)\n[A-Z]", client.__doc__ or "")
    code = "\n".join(line[4:] for line in example.splitlines())
    code = code.replace('"ws://127.0.0.1:8470/v1/connect"', repr(relay.url))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=tmp_path, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    first, second = out.decode().splitlines()
    assert first.endswith(" b'hello bob'") and "DELIVERED" in second
    assert (tmp_path / "alice.key").exists() and (tmp_path / "alice-state" / "state.db").exists()


async def test_a_relay_that_predates_the_detached_layout_gets_whole_sealed_frames() -> None:
    """FakeRelay selects no WebSocket subprotocol, as a relay from before SPEC §8's detached
    layout: the library, which offers it, keeps sealing whole frames there (every other test
    on FakeRelay carries mail that way)."""
    async with FakeRelay(answer=accept) as relay:
        async with connect(relay.url, Identity.generate(), max_envelope_bytes=65_536) as conn:
            assert conn.layout is Layout.SEALED


async def test_a_device_not_taking_commands_leaves_calls_and_configuration_unacked(
        tmp_path: Path) -> None:
    """`takes_commands=False` (the CLI's one-shot commands beside `listen`): a peer's CALL
    and the oracle's CONFIG stay in the mailbox, neither run, applied nor answered, while
    the rest of the mail is taken as usual."""
    oracle, caller, device_key = Identity.generate(), Identity.generate(), Identity.generate()
    now = now_ms()
    call = seal_envelope(caller, Kind.CALL, [device_key.public],
                         Call(os.urandom(16), "ping", now + 60_000, b"").encode(), ttl_s=60,
                         now_ms=now)
    config = seal_envelope(oracle, Kind.CONFIG, [device_key.public],
                           ConfigPush(1, 1, {"n": 1}).encode(), ttl_s=60, now_ms=now)
    message = seal_envelope(caller, Kind.DATA, [device_key.public], b"hello", ttl_s=60,
                            now_ms=now)
    handled: list[str] = []

    async def ping(incoming: object) -> bytes:
        handled.append("call")
        return b"pong"

    async with FakeRelay(deliver=[call.raw, config.raw, message.raw], answer=accept) as relay:
        async with Device(device_key, [relay.url], PeerList([caller.public]), oracle.public,
                          home=tmp_path / "home", takes_commands=False) as device:
            device.on_call("ping", ping)
            device.on_config(lambda update: handled.append("config"))
            got = await anext(device.messages())
            assert got.payload == b"hello"
            await relay.wait_for(lambda: len(relay.acks) == 1)
            await asyncio.sleep(0.3)  # time for anything else to be handled, had it been
            assert device.stats.commands_left == 2
            assert device.config.stamp.version == 0
    assert relay.acks == ["t2"] and handled == []
    # What it sent: the message's receipt, no RESPONSE and no CONFIG_REPORT.
    assert [decode_envelope(raw).open(caller).kind for raw in relay.sends] == [Kind.RECEIPT]
