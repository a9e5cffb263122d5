"""Access lists lapse: the oracle refreshes them, and a relay that stops hearing from it acts.

Before, `issued_at_ms` was parsed and never checked and a list never lapsed,
so cutting a relay off from its oracle froze revocations with no alarm.  Now
each list carries `valid_until_ms`; the oracle signs it again at half its
validity, and when the list in force lapses the relay fails closed (admits
only the oracle, disconnects the rest) or, if told to, alarms and goes on
with it; both log a warning, set `continuum_access_list_expired` and say so
on /healthz.  The partition is real: the relay process reaches a real oracle
through a TCP proxy that stops forwarding.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import structlog
from access_support import admission, healthz, log_events, metric
from oracle_support import TRUSTED_RELAY, Admin, eventually, oracle_settings, trusted_relay
from relay_process import RelayProcess
from tcp_proxy import DelayProxy
from tls_support import self_signed
from wire import RawDevice, now_ms

from continuum.access import AccessControl, ListState
from continuum.metrics import RelayMetrics
from continuum.settings import Settings
from oracle import OracleServer
from proto import Identity
from proto.access import ORACLE_CLOCK_SKEW_MS, AccessList
from proto.errors import ErrorCode
from proto.frames import Error

VALIDITY_S = 2.0


def _control(oracle: Identity, on_expiry: str, metrics: RelayMetrics) -> AccessControl:
    return AccessControl(Settings(oracle_url="http://oracle.invalid",
                                  oracle_key=oracle.public.text, require_enrollment=True,
                                  access_list_expired=on_expiry),
                         metrics, structlog.get_logger("test"))


def _signed(oracle: Identity, issued_at_ms: int, valid_for_ms: int, version: int = 1,
            enrolled: tuple[Identity, ...] = (), revoked: tuple[Identity, ...] = ()) -> bytes:
    return AccessList(7, version, issued_at_ms, issued_at_ms + valid_for_ms, oracle.public,
                      {key.public: frozenset() for key in enrolled},
                      frozenset(key.public for key in revoked)).sign(oracle)


def _code(control: AccessControl, key: Identity) -> str | None:
    refusal = control.refusal(key.public)
    return refusal.code.name if refusal is not None else None


def test_lists_issued_ahead_of_the_clock_or_lapsed_are_refused_and_counted() -> None:
    oracle, alice = Identity.generate(), Identity.generate()
    metrics = RelayMetrics()
    control = _control(oracle, "fail-closed", metrics)
    now = now_ms()

    def untimely(reason: str) -> float:
        return metrics.registry.get_sample_value("continuum_access_list_untimely_total",
                                                 {"reason": reason}) or 0.0

    assert not control.apply(_signed(oracle, now - 700_000, 600_000, enrolled=(alice,)))
    assert not control.apply(_signed(oracle, now + ORACLE_CLOCK_SKEW_MS + 5_000, 600_000))
    assert (untimely("expired"), untimely("future")) == (1, 1)
    assert control.current is None and _code(control, alice) == "ACCESS_LIST_UNAVAILABLE"
    # Within the allowance ahead of this clock: applied.
    assert control.apply(_signed(oracle, now + ORACLE_CLOCK_SKEW_MS - 5_000, 600_000,
                                 enrolled=(alice,)))
    assert _code(control, alice) is None and control.state is ListState.VALID


def test_a_refresh_extends_the_list_in_force_and_nothing_else_does() -> None:
    oracle, alice = Identity.generate(), Identity.generate()
    control = _control(oracle, "fail-closed", RelayMetrics())
    now = now_ms()
    assert control.apply(_signed(oracle, now - 1_000, 60_000, enrolled=(alice,)))
    assert control.apply(_signed(oracle, now, 60_000, enrolled=(alice,)))  # the refresh
    assert control.current.valid_until_ms == now + 60_000
    assert not control.apply(_signed(oracle, now - 500, 60_000, enrolled=(alice,)))  # older signing
    assert control.current.valid_until_ms == now + 60_000


@pytest.mark.parametrize("on_expiry", ["fail-closed", "alarm"])
async def test_when_the_list_in_force_lapses_the_setting_decides(on_expiry: str) -> None:
    oracle, alice, bob = (Identity.generate() for _ in range(3))
    metrics = RelayMetrics()
    control = _control(oracle, on_expiry, metrics)
    await control.start()
    try:
        closed: list[str] = []
        control.watch(alice.public, lambda error: closed.append(error.code.name))
        assert control.apply(_signed(oracle, now_ms(), 300, enrolled=(alice,), revoked=(bob,)))
        assert control.state is ListState.VALID and _code(control, alice) is None
        assert metrics.registry.get_sample_value("continuum_access_list_expired") == 0
        await asyncio.sleep(0.5)
        assert control.state is ListState.EXPIRED
        assert metrics.registry.get_sample_value("continuum_access_list_expired") == 1
        assert control.health()["state"] == "expired"
        assert _code(control, oracle) is None  # the oracle is always admitted
        if on_expiry == "fail-closed":
            assert closed == ["ACCESS_LIST_UNAVAILABLE"]  # its session was closed
            assert _code(control, alice) == _code(control, bob) == "ACCESS_LIST_UNAVAILABLE"
        else:  # the lapsed list stays in force, revocations it knows included
            assert closed == []
            assert _code(control, alice) is None and _code(control, bob) == "REVOKED"
    finally:
        await control.stop()


@pytest.mark.parametrize("on_expiry", ["fail-closed", "alarm"])
async def test_a_relay_cut_off_from_its_oracle_notices_within_the_validity_window(
        tmp_path: Path, on_expiry: str) -> None:
    settings = oracle_settings(tmp_path, access_list_validity_s=VALIDITY_S)
    alice, bob, carol = (Identity.generate() for _ in range(3))
    log = tmp_path / "relay.log"
    async with OracleServer(settings) as oracle:
        admin = await Admin.login(oracle)
        try:
            for identity in (alice, bob, carol):
                await admin.call("POST", "/v1/devices", {"key": identity.public.text,
                                                         "name": identity.public.text[:12]},
                                 expect=201)
            async with DelayProxy(oracle.port, count=b"GET /v1/access-list") as proxy:
                relay = RelayProcess(
                    "--oracle-url", f"http://127.0.0.1:{proxy.port}",
                    "--oracle-key", oracle.identity.public.text,
                    "--relay-key", TRUSTED_RELAY.secret_text(), "--require-enrollment", "true",
                    "--access-list-expired", on_expiry, log_path=log)
                await relay.start()
                try:
                    await _cut_off_and_back(relay, proxy, admin, oracle, alice, bob, carol,
                                            on_expiry, log)
                finally:
                    relay.kill()
        finally:
            await admin.close()


async def _cut_off_and_back(relay: RelayProcess, proxy: DelayProxy, admin: Admin,
                            oracle: OracleServer, alice: Identity, bob: Identity,
                            carol: Identity, on_expiry: str, log: Path) -> None:
    base = f"http://127.0.0.1:{relay.port}"
    await eventually(lambda: _status_is(base, "ok"), timeout=10)
    async with await RawDevice.connect(relay.url, alice) as connected:
        # 1. Three validity windows with the oracle answering: refreshed, never lapsed,
        # and polled about once per refresh (a busy loop would be thousands of requests).
        first = (await healthz(base))["access_list"]
        polls_before, started = proxy.counted, time.monotonic()
        while time.monotonic() - started < 3 * VALIDITY_S:
            assert (await healthz(base))["access_list"]["state"] == "valid"
            await asyncio.sleep(0.1)
        last = (await healthz(base))["access_list"]
        assert last["stamp"] == first["stamp"]
        assert last["valid_until_ms"] >= first["valid_until_ms"] + 2 * VALIDITY_S * 1000 * 0.9
        polls = proxy.counted - polls_before
        assert 3 <= polls <= 3 * 2 + 4, f"{polls} polls in three validity windows"

        # 2. The oracle goes silent (packets dropped), and bob is revoked meanwhile.
        proxy.blocked = True
        cut_at = time.monotonic()
        await admin.call("POST", f"/v1/devices/{bob.public.text}/revoke")
        await eventually(lambda: _status_is(base, "access_list_expired"), timeout=VALIDITY_S + 5)
        assert time.monotonic() - cut_at <= VALIDITY_S + 1.0  # within one validity window
        health = await healthz(base)
        assert health["access_list"]["state"] == "expired"
        assert health["access_list"]["on_expiry"] == on_expiry
        assert await metric(base, "continuum_access_list_expired") == 1
        assert await metric(base, "continuum_access_list_age_seconds") >= VALIDITY_S / 2
        [warning, *_] = log_events(log, "access_list_expired")
        assert warning["level"] == "warning" and warning["on_expiry"] == on_expiry
        assert await admission(relay.url, oracle.identity) == "WELCOME"
        if on_expiry == "fail-closed":
            frame = await connected.recv_not_deliver(timeout=5)
            assert isinstance(frame, Error) and frame.code == ErrorCode.ACCESS_LIST_UNAVAILABLE
            assert await admission(relay.url, carol) == "ACCESS_LIST_UNAVAILABLE"
            assert await admission(relay.url, bob) == "ACCESS_LIST_UNAVAILABLE"
        else:  # the price of availability: the revocation it never heard of is not in force
            assert await admission(relay.url, carol) == "WELCOME"
            assert await admission(relay.url, bob) == "WELCOME"

    # 3. The oracle is heard again: a fresh list, with bob's revocation, is in force.
    proxy.blocked = False
    await eventually(lambda: _status_is(base, "ok"), timeout=20)
    assert await admission(relay.url, carol) == "WELCOME"
    assert await admission(relay.url, bob) == "REVOKED"
    assert await metric(base, "continuum_access_list_expired") == 0
    assert log_events(log, "access_list_valid_again")


async def _status_is(base: str, status: str) -> bool:
    return (await healthz(base))["status"] == status


async def test_relays_fetch_from_an_https_oracle_verified_against_a_private_ca(
        tmp_path: Path, start_relay) -> None:
    cert, key = self_signed(tmp_path, "oracle-tls")
    async with OracleServer(oracle_settings(tmp_path, tls_cert=str(cert),
                                            tls_key=str(key))) as oracle:
        assert oracle.url.startswith("https://")
        trusting = await start_relay(**trusted_relay(oracle, oracle_ca_file=str(cert)))
        assert await trusting.relay.access.wait_loaded(5)
        untrusting = await start_relay(**trusted_relay(oracle))  # the system store: no such CA
        assert not await untrusting.relay.access.wait_loaded(1.0)
        assert untrusting.relay.access.state is ListState.MISSING
