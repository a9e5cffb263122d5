"""Access control at the relay: the oracle's signed list, enforced over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from oracle_support import Admin, eventually, handshake_refusal, oracle_settings
from wire import RawDevice, error_code, now_ms, sealed

from proto.access import AccessList
from continuum.settings import Settings
from oracle import OracleServer
from proto import Identity, canonical
from proto.errors import DecodeError, InvalidFieldError, SignatureError
from proto.frames import Accepted, Error


@pytest.fixture
async def oracle(tmp_path) -> AsyncIterator[OracleServer]:
    async with OracleServer(oracle_settings(tmp_path)) as server:
        yield server


@pytest.fixture
async def admin(oracle: OracleServer) -> AsyncIterator[Admin]:
    client = await Admin.login(oracle)
    yield client
    await client.close()


def _list(oracle: Identity, version: int = 3, enrolled=(), revoked=()) -> AccessList:
    return AccessList(version, now_ms(), oracle.public, frozenset(enrolled), frozenset(revoked))


def test_access_list_round_trip_and_refusals() -> None:
    oracle, other, a, b = (Identity.generate() for _ in range(4))
    signed = _list(oracle, enrolled=[a.public, b.public], revoked=[b.public]).sign(oracle)
    decoded = AccessList.verify(signed, oracle.public)
    assert decoded.enrolled == {a.public, b.public} and decoded.revoked == {b.public}
    with pytest.raises(SignatureError):
        AccessList.verify(signed, other.public)  # names another oracle
    with pytest.raises(SignatureError):  # same content re-signed by an impostor claiming the name
        body = canonical.decode(signed, max_size=1 << 20, what="t")
        AccessList.verify(canonical.encode([*body[:-1], other.sign(b"x")]), oracle.public)
    with pytest.raises(InvalidFieldError):
        _list(other).sign(oracle)
    body = canonical.decode(signed, max_size=1 << 20, what="t")
    unsorted = [*body[:3], list(reversed(body[3])), *body[4:]]
    with pytest.raises((InvalidFieldError, SignatureError)):
        AccessList.verify(canonical.encode(unsorted), oracle.public)
    with pytest.raises(DecodeError):
        AccessList.verify(signed + b"\x00", oracle.public)


def test_relay_settings_parse_booleans_and_need_an_oracle_key() -> None:
    settings = Settings.from_sources([], {"CONTINUUM_REQUIRE_ENROLLMENT": "false"})
    assert settings.require_enrollment is False
    key = Identity.generate().public.text
    settings = Settings.from_sources(["--require-enrollment", "true", "--oracle-url", "http://x",
                                      "--oracle-key", key])
    assert settings.require_enrollment is True and settings.oracle_key == key
    with pytest.raises(ValueError):
        Settings(oracle_url="http://127.0.0.1:1").validate()


async def test_require_enrollment_refuses_unknown_keys(oracle, admin, start_relay) -> None:
    enrolled, stranger = Identity.generate(), Identity.generate()
    await admin.call("POST", "/v1/devices", {"key": enrolled.public.text, "name": "e"}, expect=201)
    relay = await start_relay(oracle_url=oracle.url, oracle_key=oracle.identity.public.text,
                              require_enrollment=True)
    assert await relay.relay.access.wait_loaded(5)
    assert await handshake_refusal(relay.url, stranger) == "NOT_ENROLLED"
    async with await RawDevice.connect(relay.url, enrolled):
        pass
    async with await RawDevice.connect(relay.url, oracle.identity):  # the oracle always may
        pass
    # Enrolling the stranger reaches the relay by long-poll, no restart needed.
    await admin.call("POST", "/v1/devices", {"key": stranger.public.text, "name": "s"}, expect=201)
    await eventually(lambda: _enrolled(relay, stranger))
    async with await RawDevice.connect(relay.url, stranger):
        pass


async def _enrolled(relay, identity: Identity) -> bool:
    return relay.relay.access.refusal(identity.public) is None


async def test_without_a_verified_list_enrollment_fails_closed(start_relay) -> None:
    with socket.socket() as probe:  # a port nobody listens on: the oracle is unreachable
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    oracle_identity, device = Identity.generate(), Identity.generate()
    relay = await start_relay(oracle_url=dead_url, oracle_key=oracle_identity.public.text,
                              require_enrollment=True)
    assert await handshake_refusal(relay.url, device) == "NOT_ENROLLED"
    async with await RawDevice.connect(relay.url, oracle_identity):
        pass


async def test_revocation_closes_live_session_and_refuses_key_and_sends(
        oracle, admin, start_relay) -> None:
    victim, peer = Identity.generate(), Identity.generate()
    for identity, name in ((victim, "victim"), (peer, "peer")):
        await admin.call("POST", "/v1/devices", {"key": identity.public.text, "name": name},
                         expect=201)
    relay = await start_relay(oracle_url=oracle.url, oracle_key=oracle.identity.public.text)
    assert await relay.relay.access.wait_loaded(5)
    async with await RawDevice.connect(relay.url, victim) as v, \
            await RawDevice.connect(relay.url, peer) as p:
        assert isinstance(await p.send(sealed(peer, [victim.public])), Accepted)
        started = asyncio.get_running_loop().time()
        await admin.call("POST", f"/v1/devices/{victim.public.text}/revoke")
        frame = await v.recv_not_deliver(timeout=5)
        elapsed = asyncio.get_running_loop().time() - started
        assert isinstance(frame, Error) and error_code(frame) == "REVOKED"
        closing = await v.ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.CLOSING)
        assert elapsed < 1.0, f"revocation took {elapsed:.3f}s"
        assert error_code(await p.send(sealed(peer, [victim.public]))) == "REVOKED"
    assert await handshake_refusal(relay.url, victim) == "REVOKED"
    await admin.call("POST", f"/v1/devices/{victim.public.text}/restore")
    await eventually(lambda: _enrolled(relay, victim))
    async with await RawDevice.connect(relay.url, victim):
        pass
