"""Access control at the relay: the oracle's signed list, enforced over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
import structlog
from oracle_support import Admin, eventually, handshake_refusal, oracle_settings, trusted_relay
from wire import RawDevice, error_code, now_ms, sealed

from continuum.access import AccessControl
from continuum.metrics import RelayMetrics
from continuum.settings import Settings
from oracle import OracleServer
from proto import Identity, canonical
from proto.access import AccessList, Stamp
from proto.errors import DecodeError, InvalidFieldError, ProtocolError, SignatureError
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
    return AccessList(1, version, now_ms(), now_ms() + 600_000, oracle.public,
                      {k: frozenset() for k in enrolled}, frozenset(revoked))


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
    unsorted = [*body[:4], list(reversed(body[4])), *body[5:]]
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
    relay = await start_relay(**trusted_relay(oracle, require_enrollment=True))
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


@pytest.mark.parametrize("require_enrollment, on_expiry, refused", [
    (True, "fail-closed", True), (False, "fail-closed", True), (True, "alarm", True),
    (False, "alarm", False)])
async def test_without_a_verified_list_the_relay_fails_closed(
        start_relay, require_enrollment: bool, on_expiry: str, refused: bool) -> None:
    """Before its first list a relay knows no revocation: it admits only the oracle, unless
    it was told to alarm rather than refuse and requires no enrollment."""
    with socket.socket() as probe:  # a port nobody listens on: the oracle is unreachable
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    oracle_identity, device = Identity.generate(), Identity.generate()
    relay = await start_relay(oracle_url=dead_url, oracle_key=oracle_identity.public.text,
                              require_enrollment=require_enrollment,
                              access_list_expired=on_expiry)
    if refused:
        assert await handshake_refusal(relay.url, device) == "ACCESS_LIST_UNAVAILABLE"
    else:
        async with await RawDevice.connect(relay.url, device):
            pass
    async with await RawDevice.connect(relay.url, oracle_identity):
        pass


async def test_revocation_closes_live_session_and_refuses_key_and_sends(
        oracle, admin, start_relay) -> None:
    victim, peer = Identity.generate(), Identity.generate()
    for identity, name in ((victim, "victim"), (peer, "peer")):
        await admin.call("POST", "/v1/devices", {"key": identity.public.text, "name": name},
                         expect=201)
    group = await admin.call("POST", "/v1/groups", {"name": "pair"}, expect=201)
    for identity in (victim, peer):  # peers, so the relay lets one write to the other
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{identity.public.text}")
    relay = await start_relay(**trusted_relay(oracle))
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


def _control(require_enrollment: bool = False) -> tuple[AccessControl, Identity]:
    oracle = Identity.generate()
    control = AccessControl(Settings(oracle_url="http://oracle.invalid",
                                     oracle_key=oracle.public.text,
                                     require_enrollment=require_enrollment),
                            RelayMetrics(), structlog.get_logger("test"))
    return control, oracle


def _groups_list(oracle: Identity, epoch: int, version: int, groups: dict, revoked=()) -> bytes:
    return AccessList(epoch, version, now_ms(), now_ms() + 600_000, oracle.public,
                      {key.public: frozenset(g) for key, g in groups.items()},
                      frozenset(k.public for k in revoked)).sign(oracle)


def _refusal(control: AccessControl, sender: Identity, *recipients: Identity) -> str | None:
    try:
        control.check_send(sender.public, tuple(r.public for r in recipients))
    except ProtocolError as exc:
        return exc.code.name
    return None


@pytest.mark.parametrize("required", [False, True], ids=["open", "enrollment-required"])
def test_send_rules_of_the_access_list(required: bool) -> None:
    """SPEC §12 "Enforcement", one row at a time, without sockets."""
    control, oracle = _control(required)
    alice, bob, carol, dave, revoked, stranger = (Identity.generate() for _ in range(6))
    # alice+bob share group 0, bob+carol group 1, dave is enrolled in no group.
    control.apply(_groups_list(oracle, 5, 1, {alice: {0}, bob: {0, 1}, carol: {1}, dave: set()},
                               revoked=[revoked]))
    assert _refusal(control, alice, bob) is None and _refusal(control, bob, alice) is None
    assert _refusal(control, bob, alice, carol) is None
    assert _refusal(control, alice, carol) == "NOT_PEER"  # no common group
    assert _refusal(control, alice, bob, carol) == "NOT_PEER"  # one non-peer refuses all
    assert _refusal(control, alice, dave) == "NOT_PEER" and _refusal(control, dave, alice) == "NOT_PEER"
    assert _refusal(control, oracle, dave) is None  # the oracle writes to anyone it manages
    assert _refusal(control, dave, oracle) is None  # anyone enrolled writes to the oracle
    assert _refusal(control, alice, revoked) == "REVOKED"
    assert _refusal(control, oracle, revoked) == "REVOKED"
    assert _refusal(control, revoked, alice) == "REVOKED"
    if required:
        assert _refusal(control, stranger, alice) == "NOT_ENROLLED"
        assert _refusal(control, alice, stranger) == "NOT_ENROLLED"
        assert _refusal(control, oracle, stranger) == "NOT_ENROLLED"
    else:
        assert _refusal(control, stranger, alice) == "NOT_PEER"  # a managed mailbox
        assert _refusal(control, stranger, oracle) == "NOT_PEER"
        assert _refusal(control, alice, stranger) is None  # a key the oracle does not manage
        assert _refusal(control, stranger, Identity.generate()) is None


def test_without_an_oracle_every_key_writes_to_every_key() -> None:
    control = AccessControl(Settings(), RelayMetrics(), structlog.get_logger("test"))
    assert _refusal(control, Identity.generate(), Identity.generate()) is None


def test_stamps_order_by_epoch_then_version_and_an_older_list_is_alarmed() -> None:
    oracle, alice = Identity.generate(), Identity.generate()
    metrics = RelayMetrics()
    control = AccessControl(Settings(oracle_url="http://oracle.invalid",
                                     oracle_key=oracle.public.text),
                            metrics, structlog.get_logger("test"))

    def count() -> float:
        return metrics.registry.get_sample_value("continuum_access_list_backwards_total") or 0.0

    first = _groups_list(oracle, 100, 7, {alice: set()})
    assert control.apply(first)
    assert not control.apply(first) and count() == 0  # the same list again: no change
    # Other content under the stamp in force, even valid for longer: refused, counted.
    other = AccessList(100, 7, now_ms(), now_ms() + 900_000, oracle.public, {},
                       frozenset()).sign(oracle)
    assert not control.apply(other) and count() == 1
    assert alice.public in control.current.enrolled
    # A restored oracle: the version went back (7 → 3) but a new epoch began: applied.
    assert control.apply(_groups_list(oracle, 200, 3, {}))
    assert control.current.stamp == Stamp(200, 3) and alice.public not in control.current.enrolled
    # Replays of lists from before the restore, whatever their version: refused, counted.
    for epoch, version in ((100, 7), (100, 9), (199, 10**6), (200, 2)):
        assert not control.apply(_groups_list(oracle, epoch, version, {alice: set()}))
    assert control.current.stamp == Stamp(200, 3) and count() == 5
