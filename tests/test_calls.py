"""Calls between peers over real relays (SPEC §18): answered, answered after the callee
connects, timed out, refused to non-peers (by the callee, and by relays with peer groups),
bounded, and never run twice."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from test_peer_groups import StartRelay, caught_up, deployment, enroll, group_of

from client import CallResult, Device, IncomingCall, PeerList
from client.backoff import Backoff
from continuum.server import RelayServer
from proto import Identity, Kind, PublicKey, seal_envelope
from proto.calls import Call, CallStatus, Response
from proto.errors import CallTimeoutError, NotPeerError
from runtime.clock import now_ms


def device(identity: Identity, url: str, peers: Iterable[PublicKey] = (),
           **options: object) -> Device:
    return Device(identity, [url], PeerList(peers), backoff=Backoff(0.05, 0.2),
                  **options)  # type: ignore[arg-type]


async def until(condition: Callable[[], bool], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def echo(call: IncomingCall) -> bytes:
    return call.method.encode() + b":" + call.body


async def test_a_call_is_answered_with_the_handlers_body_and_status(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    seen: list[IncomingCall] = []

    async def reboot(call: IncomingCall) -> CallResult:
        seen.append(call)
        return CallResult(CallStatus.REFUSED, b"not now")

    async def broken(call: IncomingCall) -> bytes:
        raise RuntimeError("secret internals /etc/shadow")

    async with device(alice, relay.url, [bob.public]) as a, \
            device(bob, relay.url, [alice.public]) as b:
        b.on_call("echo", echo)
        b.on_call("reboot", reboot)
        b.on_call("broken", broken)
        await b.wait_connected(10)
        result = await a.call(bob.public, "echo", b'{"x": 1}', timeout=10)
        assert result == CallResult(CallStatus.OK, b'echo:{"x": 1}') and result.ok
        assert await a.call(bob.public, "reboot", timeout=10) == CallResult(CallStatus.REFUSED,
                                                                            b"not now")
        assert [c.caller for c in seen] == [alice.public]
        missing = await a.call(bob.public, "nothing.here", timeout=10)
        assert missing.status is CallStatus.NOT_FOUND
        failed = await a.call(bob.public, "broken", timeout=10)
        assert failed == CallResult(CallStatus.ERROR, b"the handler failed")  # nothing leaks
        assert b.stats.calls_received == 4 and b.stats.responses_sent == 4
        assert b.stats.calls_not_ok == 3
        assert a.queued == 0 and b.queued == 0  # calls and responses left no outbox entry
        assert a.sent_messages() == []  # calls are not tracked as messages awaiting receipts


async def test_a_call_to_an_offline_device_is_answered_once_it_connects(
        relay: RelayServer, tmp_path: Path) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, relay.url, [bob.public], home=tmp_path / "alice") as a:
        await a.wait_connected(10)
        pending = asyncio.create_task(a.call(bob.public, "echo", b"while you were out",
                                             timeout=15))
        await asyncio.sleep(1.0)  # the call waits in bob's mailbox
        assert not pending.done()
        async with device(bob, relay.url, [alice.public], home=tmp_path / "bob") as b:
            b.on_call("echo", echo)
            result = await asyncio.wait_for(pending, 15)
            assert result == CallResult(CallStatus.OK, b"echo:while you were out")
            assert b.stats.calls_received == 1


async def test_a_call_to_a_device_that_stays_offline_times_out(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, relay.url, [bob.public]) as a:
        await a.wait_connected(10)
        started = asyncio.get_running_loop().time()
        with pytest.raises(CallTimeoutError, match="no response to 'echo'") as raised:
            await a.call(bob.public, "echo", b"anyone?", timeout=1.0)
        assert isinstance(raised.value, TimeoutError)
        assert 0.9 <= asyncio.get_running_loop().time() - started < 3.0
        assert a.stats.calls_timed_out == 1 and a.queued == 0
        # Its envelope's TTL is the deadline: the relay expires it unread, and says so.
        await until(lambda: a.stats.expiry_notices == 1, timeout=10)
    async with device(bob, relay.url, [alice.public]) as b:
        ran: list[IncomingCall] = []

        async def record(call: IncomingCall) -> bytes:
            ran.append(call)
            return b""

        b.on_call("echo", record)
        await b.wait_connected(10)
        await asyncio.sleep(1.0)
        assert ran == [] and b.stats.calls_received == 0


async def test_a_call_with_no_relay_times_out_and_leaves_nothing_queued() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with device(alice, "ws://127.0.0.1:9/v1/connect", [bob.public]) as a:
        with pytest.raises(CallTimeoutError):
            await a.call(bob.public, "echo", timeout=0.5)
        assert a.queued == 0  # withdrawn: it will not be sent on a later connection


async def test_a_slow_handler_answers_timeout_and_the_late_response_is_discarded_and_counted(
        relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()

    async def slow(call: IncomingCall) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            # Cancelled at the deadline, it takes a while to stop, so bob's TIMEOUT answer
            # surely comes after alice gave up: at the deadline itself the two race (bob's
            # timer starts from the deadline, alice's a few ms later, after sealing).
            await asyncio.sleep(0.5)
            raise
        return b"too late"

    async with device(alice, relay.url, [bob.public]) as a, \
            device(bob, relay.url, [alice.public]) as b:
        b.on_call("slow", slow)
        await b.wait_connected(10)
        with pytest.raises(CallTimeoutError):
            await a.call(bob.public, "slow", timeout=1.0)
        # bob cancels the handler at the deadline and answers TIMEOUT; it reaches alice late.
        await until(lambda: a.stats.responses_late == 1, timeout=10)
        assert b.stats.calls_not_ok == 1 and a.stats.responses_unmatched == 0


async def test_a_non_peers_call_never_reaches_a_handler(relay: RelayServer) -> None:
    bob, carol = Identity.generate(), Identity.generate()
    ran: list[IncomingCall] = []

    async def reboot(call: IncomingCall) -> bytes:
        ran.append(call)
        return b"rebooting"

    async with device(carol, relay.url, [bob.public]) as c, \
            device(bob, relay.url, []) as b:  # carol is not bob's peer
        b.on_call("reboot", reboot)
        await b.wait_connected(10)
        with pytest.raises(CallTimeoutError):
            await c.call(bob.public, "reboot", timeout=1.5)
        assert ran == [] and b.stats.dropped_non_peer == 1
        assert b.stats.calls_received == 0 and b.stats.responses_sent == 0


async def test_relays_with_peer_groups_refuse_a_non_peers_call_not_peer(
        tmp_path: Path, start_relay: StartRelay) -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    async with deployment(tmp_path, start_relay) as (relay, oracle, admin):
        await enroll(admin, alice, bob, mallory)
        await group_of(admin, alice, bob)
        await caught_up(relay, admin)
        async with device(mallory, relay.url, [bob.public]) as m, \
                device(alice, relay.url, [bob.public]) as a, \
                device(bob, relay.url, [alice.public, mallory.public]) as b:
            b.on_call("echo", echo)
            await b.wait_connected(10)
            with pytest.raises(NotPeerError):
                await m.call(bob.public, "echo", b"let me in", timeout=10)
            assert (await a.call(bob.public, "echo", b"hi", timeout=10)).body == b"echo:hi"
            assert b.stats.calls_received == 1  # mallory's never reached bob's mailbox


async def test_the_oracle_may_call_a_device_it_manages(relay: RelayServer) -> None:
    oracle, bob = Identity.generate(), Identity.generate()
    async with device(oracle, relay.url) as o, \
            device(bob, relay.url, [], oracle_key=oracle.public) as b:
        b.on_call("echo", echo)
        await b.wait_connected(10)
        assert (await o.call(bob.public, "echo", b"status?", timeout=10)).body == b"echo:status?"


async def test_calls_beyond_the_running_bound_are_refused(relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    release = asyncio.Event()

    async def hold(call: IncomingCall) -> bytes:
        await release.wait()
        return b"done"

    async with device(alice, relay.url, [bob.public]) as a, \
            device(bob, relay.url, [alice.public], max_running_calls=1) as b:
        b.on_call("hold", hold)
        await b.wait_connected(10)
        first = asyncio.create_task(a.call(bob.public, "hold", timeout=10))
        await until(lambda: b.stats.calls_received == 1, timeout=10)
        second = await a.call(bob.public, "hold", timeout=10)
        assert second.status is CallStatus.REFUSED
        release.set()
        assert (await first).body == b"done"


async def test_a_replayed_correlation_id_is_not_run_twice_and_a_strangers_response_is_discarded(
        relay: RelayServer) -> None:
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()
    ran: list[IncomingCall] = []
    answer = asyncio.Event()

    async def record(call: IncomingCall) -> bytes:
        ran.append(call)
        await answer.wait()
        return b"once"

    async with device(alice, relay.url, [bob.public, carol.public]) as a, \
            device(bob, relay.url, [alice.public]) as b, \
            device(carol, relay.url, [alice.public]) as c:
        b.on_call("once", record)
        await b.wait_connected(10)
        pending = asyncio.create_task(a.call(bob.public, "once", b"x", timeout=10))
        await until(lambda: len(ran) == 1, timeout=10)
        call = ran[0]
        # The same call in a new envelope (a new msg_id): bob drops it.
        again = Call(call.correlation_id, "once", call.deadline_ms, b"x").encode()
        await a.send_envelope(seal_envelope(alice, Kind.CALL, [bob.public], again, ttl_s=10,
                                            now_ms=now_ms()), timeout=10)
        await until(lambda: b.stats.calls_dropped == 1, timeout=10)
        # carol (alice's peer, but not the callee) answers bob's call first: discarded, and
        # not remembered among the messages alice has seen (a flood of such responses, kept
        # for their TTL, would push out what peers sent: a re-delivery would surface twice).
        forged = seal_envelope(carol, Kind.RESPONSE, [alice.public], Response(
            call.correlation_id, CallStatus.OK, b"from carol").encode(), ttl_s=10, now_ms=now_ms())
        await c.send_envelope(forged, timeout=10)
        await until(lambda: a.stats.responses_unmatched == 1, timeout=10)
        assert (carol.public, forged.msg_id) not in a._seen
        assert not pending.done()
        answer.set()
        assert (await pending) == CallResult(CallStatus.OK, b"once")
        assert len(ran) == 1


async def test_a_handler_returning_something_else_than_bytes_or_a_result_answers_error(
        relay: RelayServer) -> None:
    alice, bob = Identity.generate(), Identity.generate()

    async def wrong(call: IncomingCall) -> bytes:
        return "text, not bytes"  # type: ignore[return-value]

    async def bad_status(call: IncomingCall) -> CallResult:
        return CallResult(42, b"")  # type: ignore[arg-type]

    async with device(alice, relay.url, [bob.public]) as a, \
            device(bob, relay.url, [alice.public]) as b:
        b.on_call("wrong", wrong)
        b.on_call("bad_status", bad_status)
        await b.wait_connected(10)
        for method in ("wrong", "bad_status"):
            result = await a.call(bob.public, method, timeout=10)
            assert result == CallResult(CallStatus.ERROR, b"the handler failed")
