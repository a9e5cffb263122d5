"""The oracle's side of presence over real HTTP, on SQLite and PostgreSQL: signed reports in,
online/offline, relays, message totals and history out; silence, check-in intervals, the
`online` and `silent` filters, the webhook (to a real local receiver) and /metrics.

Reports are built and signed here as a relay builds them (`proto.presence`), so every
rule of SPEC §20 is exercised at the oracle: forged, foreign, stale, replayed, garbage,
oversize and too many at once are refused and change nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from oracle_support import TRUSTED_RELAY, Admin, eventually, oracle_settings
from test_oracle_api import admin, server  # noqa: F401  (fixtures on both databases)
from web_server import serving

from oracle import OracleServer
from oracle.presence import HISTORY_PER_DEVICE
from oracle.presence_web import MAX_CONCURRENT_REPORTS, watch_once
from oracle.webhook import SIGNATURE_HEADER, verify_webhook
from proto import Identity, PublicKey
from proto.errors import SignatureError
from proto.presence import (MAX_PRESENCE_REPORT_BYTES, PRESENCE_CONTENT_TYPE, PRESENCE_PATH,
                            ConnectionState, PresenceReport)
from runtime.clock import now_ms


class Relay:
    """One relay process as the oracle sees it: an instance id and its report sequence."""

    def __init__(self, oracle: OracleServer, identity: Identity = TRUSTED_RELAY) -> None:
        self.oracle, self.identity = oracle, identity
        self.instance = os.urandom(16)
        self.sequence = 0

    def report(self, *connections: ConnectionState, snapshot: int | None = None,
               last: bool = False, lease_ms: int = 90_000, sequence: int | None = None,
               issued_at_ms: int | None = None, oracle: PublicKey | None = None) -> bytes:
        """The next report's bytes; `snapshot` is the sequence its snapshot began at (0/None:
        a changes report)."""
        self.sequence = sequence if sequence is not None else self.sequence + 1
        return PresenceReport(
            self.identity.public, oracle or self.oracle.identity.public,
            issued_at_ms if issued_at_ms is not None else now_ms(), os.urandom(16),
            self.instance, self.sequence, lease_ms, snapshot or 0, last,
            connections).sign(self.identity)

    def snapshot(self, *connections: ConnectionState) -> bytes:
        return self.report(*connections, snapshot=self.sequence + 1, last=True)


async def post(oracle: OracleServer, body: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(
            oracle.url + PRESENCE_PATH, data=body,
            headers={"Content-Type": PRESENCE_CONTENT_TYPE}) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, {"text": await response.text()}  # aiohttp's own 413


async def applied(oracle: OracleServer, body: bytes) -> bool:
    """POST a report the oracle must take; whether it asked for a snapshot."""
    status, answer = await post(oracle, body)
    assert status == 200, answer
    return answer["snapshot"]


def conn(key: Identity, at: int, ended: int | None = None, sent: int = 0, received: int = 0,
         refused: int = 0) -> ConnectionState:
    return ConnectionState(key.public, at, ended, sent, received, refused)


async def enrolled(admin: Admin, *names: str) -> list[Identity]:
    identities = []
    for name in names:
        identity = Identity.generate()
        await admin.call("POST", "/v1/devices", {"key": identity.public.text, "name": name},
                         expect=201)
        identities.append(identity)
    return identities


async def presence_of(admin: Admin, identity: Identity) -> dict:
    return (await admin.call("GET", f"/v1/devices/{identity.public.text}"))["presence"]


async def test_reports_make_devices_online_and_count_each_message_once(
        server: OracleServer, admin: Admin) -> None:
    alice, bob = await enrolled(admin, "alice", "bob")
    relay = Relay(server)
    t = now_ms() - 60_000
    assert await applied(server, relay.snapshot(conn(alice, t, sent=3, received=1))) is False
    p = await presence_of(admin, alice)
    assert p["online"] and p["relay_key"] == TRUSTED_RELAY.public.text
    assert p["relay_instance"] == relay.instance.hex() and p["connected_at_ms"] == t
    assert p["messages"] == {"sent": 3, "received": 1, "refused": 0}
    assert (await presence_of(admin, bob))["last_seen_ms"] is None

    # Counts are cumulative per connection: the same state twice adds nothing, more adds
    # only the difference, and a report the oracle never got costs nothing once a later
    # one arrives (it asks for a snapshot, since it noticed the gap).
    assert await applied(server, relay.report(conn(alice, t, sent=3, received=1))) is False
    assert await applied(server, relay.report(conn(alice, t, sent=5, received=1))) is False
    relay.sequence += 1  # this one is lost on the way
    assert await applied(server, relay.report(conn(alice, t, t + 9000, sent=9, received=2,
                                                   refused=1))) is True
    p = await presence_of(admin, alice)
    assert not p["online"] and p["last_seen_ms"] == t + 9000 and p["relay_key"] is None
    assert p["messages"] == {"sent": 9, "received": 2, "refused": 1}
    # A report from before (a sequence already applied) is ignored, whatever it says.
    assert await applied(server, relay.report(conn(alice, t, sent=50), sequence=2)) is False
    assert (await presence_of(admin, alice))["messages"]["sent"] == 9

    assert await applied(server, relay.report(conn(alice, t + 20_000, sent=1),
                                              sequence=relay.sequence + 100)) is True
    history = (await admin.call("GET", f"/v1/devices/{alice.public.text}"))["presence_history"]
    assert [(h["connected_at_ms"], h["disconnected_at_ms"], h["messages"]["sent"])
            for h in history] == [(t + 20_000, None, 1), (t, t + 9000, 9)]
    assert (await presence_of(admin, alice))["messages"]["sent"] == 10


async def test_a_revoked_device_is_offline_and_no_relay_report_brings_it_back(
        server: OracleServer, admin: Admin) -> None:
    """Revoking ends what the oracle shows of the device's connections, at once; a relay
    that reports it afterwards (its access list not yet the new one) changes nothing shown,
    while the same report's other devices are applied.  Restored, it is reported again."""
    alice, bob = await enrolled(admin, "alice", "bob")
    relay = Relay(server)
    t = now_ms() - 60_000
    await applied(server, relay.snapshot(conn(alice, t, sent=3), conn(bob, t)))
    assert (await presence_of(admin, alice))["online"]
    await admin.call("POST", f"/v1/devices/{alice.public.text}/revoke")
    revoked = await admin.call("GET", f"/v1/devices/{alice.public.text}")
    p = revoked["presence"]
    assert not p["online"] and p["last_seen_ms"] >= revoked["revoked_at_ms"]
    assert p["messages"]["sent"] == 3
    assert "continuum_oracle_devices_online 1.0" in await metrics_text(admin)  # bob

    # A relay still holding alice's connection, and a new one, with more messages.
    await applied(server, relay.report(conn(alice, t, sent=40), conn(alice, now_ms(), sent=7),
                                       conn(bob, t, sent=2)))
    after = await admin.call("GET", f"/v1/devices/{alice.public.text}")
    assert (after["presence"], after["presence_history"]) == (p, revoked["presence_history"])
    assert (await presence_of(admin, bob))["messages"]["sent"] == 2

    await admin.call("POST", f"/v1/devices/{alice.public.text}/restore")
    later = now_ms()
    await applied(server, relay.report(conn(alice, later, sent=1)))
    p = await presence_of(admin, alice)
    assert p["online"] and p["connected_at_ms"] == later and p["messages"]["sent"] == 4


async def test_a_device_that_moved_relays_stays_online_whatever_order_reports_arrive_in(
        server: OracleServer, admin: Admin) -> None:
    (alice,) = await enrolled(admin, "alice")
    first, second = Relay(server), Relay(server)
    t = now_ms() - 60_000
    await applied(server, first.snapshot(conn(alice, t)))
    await applied(server, second.snapshot(conn(alice, t + 1000)))  # it reconnected elsewhere
    await applied(server, first.report(conn(alice, t, t + 1500)))  # the old one's end, late
    p = await presence_of(admin, alice)
    assert p["online"] and p["relay_instance"] == second.instance.hex()
    assert p["connected_at_ms"] == t + 1000
    await applied(server, second.report(conn(alice, t + 1000, t + 5000)))
    p = await presence_of(admin, alice)
    assert not p["online"] and p["last_seen_ms"] == t + 5000


async def test_a_whole_snapshot_ends_what_it_does_not_list_and_a_partial_one_asks_again(
        server: OracleServer, admin: Admin) -> None:
    alice, bob, carol = await enrolled(admin, "alice", "bob", "carol")
    relay = Relay(server)
    t = now_ms() - 60_000
    await applied(server, relay.snapshot(conn(alice, t), conn(bob, t), conn(carol, t)))
    # A snapshot in two parts that lists alice and carol: bob's connection is over.
    start = relay.sequence + 1
    await applied(server, relay.report(conn(alice, t), snapshot=start))
    await applied(server, relay.report(conn(carol, t), snapshot=start, last=True))
    assert [(await presence_of(admin, d))["online"] for d in (alice, bob, carol)] == \
        [True, False, True]
    # A snapshot whose first part was lost ends nothing, and the oracle asks for another.
    start = relay.sequence + 1
    relay.sequence += 1
    assert await applied(server, relay.report(conn(carol, t), snapshot=start, last=True)) is True
    assert (await presence_of(admin, alice))["online"] is True
    listed = await admin.call("GET", "/v1/devices?online=true&limit=10")
    assert {d["key"] for d in listed["devices"]} == {alice.public.text, carol.public.text}
    assert all(d["presence"]["online"] for d in listed["devices"])
    offline = await admin.call("GET", "/v1/devices?online=false")
    assert [d["key"] for d in offline["devices"]] == [bob.public.text]
    await admin.call("GET", "/v1/devices?online=maybe", expect=400)


async def test_a_relay_process_whose_lease_passes_is_taken_for_dead(
        server: OracleServer, admin: Admin) -> None:
    alice, bob = await enrolled(admin, "alice", "bob")
    dead, alive = Relay(server), Relay(server)
    t = now_ms() - 60_000
    await applied(server, dead.report(conn(alice, t), snapshot=1, last=True, lease_ms=1000))
    await applied(server, alive.report(conn(bob, t), snapshot=1, last=True, lease_ms=600_000))
    assert server.oracle is not None
    presence = server.oracle.presence
    now = now_ms()
    # Heard before this oracle started: the lease again and a minute's grace from the start.
    assert await presence.expire_leases(now + 5000, started_ms=now) == 0
    # Heard since: the lease alone.
    assert await presence.expire_leases(now + 5000, started_ms=now - 120_000) == 1
    a, b = await presence_of(admin, alice), await presence_of(admin, bob)
    assert not a["online"] and a["last_seen_ms"] <= now + 5000
    assert b["online"]
    # The dead process comes back (a partition healed): it is asked for a snapshot.
    assert await applied(server, dead.report(conn(alice, t))) is True
    assert (await presence_of(admin, alice))["online"]


async def test_the_history_keeps_the_newest_connections_and_the_totals_keep_everything(
        server: OracleServer, admin: Admin) -> None:
    (alice,) = await enrolled(admin, "alice")
    relay = Relay(server)
    t = now_ms() - 3_600_000
    await applied(server, relay.snapshot())
    for n in range(HISTORY_PER_DEVICE + 10):
        await applied(server, relay.report(conn(alice, t + 1000 * n, t + 1000 * n + 500,
                                                sent=1)))
    assert server.oracle is not None
    rows = await server.oracle.registry.db.fetchval(
        "SELECT COUNT(*) FROM presence_history WHERE device_key = $1", alice.public.text)
    assert rows == HISTORY_PER_DEVICE
    history = await server.oracle.presence.history(alice.public.text, limit=1000)
    assert history[-1].connected_at_ms == t + 10_000  # the ten oldest went
    assert (await presence_of(admin, alice))["messages"]["sent"] == HISTORY_PER_DEVICE + 10


async def test_forged_foreign_stale_replayed_garbage_and_oversize_reports_change_nothing(
        server: OracleServer, admin: Admin) -> None:
    (alice,) = await enrolled(admin, "alice")
    relay = Relay(server)
    t = now_ms()
    good = relay.snapshot(conn(alice, t, sent=1))
    flipped = bytearray(good)
    flipped[-1] ^= 1
    stranger = Relay(server, Identity.generate())  # a key the oracle does not know
    refusals = {
        "forged": (bytes(flipped), 401),
        "unknown relay": (stranger.snapshot(conn(alice, t)), 401),
        # Refused by its key alone, before the rest is decoded (nothing else here decodes).
        "unknown relay, then garbage": (bytes([0x8B, 0x58, 0x20]) + stranger.identity.public.raw
                                        + b"\xff" * 100, 401),
        "other oracle": (relay.report(conn(alice, t), snapshot=1, last=True, sequence=1,
                                      oracle=Identity.generate().public), 401),
        "stale": (relay.report(conn(alice, t), snapshot=1, last=True, sequence=1,
                               issued_at_ms=t - 120_000), 401),
        "garbage": (b"\xff" * 100, 400),
        "truncated": (good[:-10], 400),
        "oversize": (bytes(MAX_PRESENCE_REPORT_BYTES + 1), 413),
        "far too big": (bytes(3 * 1024 * 1024), 413),
    }
    for name, (body, status) in refusals.items():
        got, answer = await post(server, body)
        assert got == status, (name, got, answer)
        assert (await presence_of(admin, alice))["last_seen_ms"] is None, name
    assert await applied(server, good) is False
    got, answer = await post(server, good)  # the very same bytes again: a replay
    assert got == 401 and "replay" in answer["error"]
    assert (await presence_of(admin, alice))["messages"]["sent"] == 1


async def test_too_many_reports_at_once_are_told_to_come_back(
        server: OracleServer, admin: Admin) -> None:
    from oracle.presence_web import _WATCH_KEY
    assert server._runner is not None
    busy = server._runner.app[_WATCH_KEY].busy
    for _ in range(MAX_CONCURRENT_REPORTS):
        await busy.acquire()  # as if that many reports were being applied
    try:
        async with aiohttp.ClientSession() as http, http.post(
                server.url + PRESENCE_PATH, data=Relay(server).snapshot()) as response:
            assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
    finally:
        for _ in range(MAX_CONCURRENT_REPORTS):
            busy.release()
    assert await applied(server, Relay(server).snapshot()) is False


async def test_check_in_intervals_make_offline_devices_silent_until_they_return(
        server: OracleServer, admin: Admin) -> None:
    alice, bob, carol = await enrolled(admin, "alice", "bob", "carol")
    group = await admin.call("POST", "/v1/groups", {"name": "meters"}, expect=201)
    for device in (alice, bob):
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{device.public.text}")
    await admin.call("PUT", f"/v1/groups/{group['id']}/check-in", {"interval_s": 1})
    own = await admin.call("PUT", f"/v1/devices/{bob.public.text}/check-in",
                           {"interval_s": 3600})  # its own wins over the group's
    assert own == {"interval_s": 3600, "own_interval_s": 3600, "group_interval_s": 1}
    for bad in ({"interval_s": 0}, {"interval_s": "60"}, {"interval_s": 10**9}, {}, [1]):
        await admin.call("PUT", f"/v1/devices/{bob.public.text}/check-in", bad, expect=400)
    await admin.call("PUT", f"/v1/devices/{Identity.generate().public.text}/check-in",
                     {"interval_s": 5}, expect=404)
    await admin.call("PUT", "/v1/groups/nope/check-in", {"interval_s": 5}, expect=404)

    await asyncio.sleep(1.1)  # alice: enrolled over a second ago, never connected
    assert server._runner is not None
    await watch_once(server._runner.app)
    silent = await admin.call("GET", "/v1/devices?silent=true")
    assert [d["key"] for d in silent["devices"]] == [alice.public.text]
    assert silent["devices"][0]["silent_since_ms"] is not None
    assert "continuum_oracle_devices_silent 1.0" in await metrics_text(admin)

    relay = Relay(server)
    await applied(server, relay.snapshot(conn(alice, now_ms())))  # alice checks in
    await watch_once(server._runner.app)
    assert (await admin.call("GET", "/v1/devices?silent=true"))["devices"] == []
    assert (await admin.call("GET", f"/v1/devices/{alice.public.text}"))["check_in"] == {
        "interval_s": 1, "own_interval_s": None, "group_interval_s": 1}
    actions = [e["action"] for e in (await admin.call("GET", "/v1/audit"))["entries"]]
    assert "device.checkin" in actions and "group.checkin" in actions
    text = await metrics_text(admin)
    for line in ("continuum_oracle_devices_silent 0.0", "continuum_oracle_devices_online 1.0",
                 "continuum_oracle_relay_processes 1.0",
                 'continuum_oracle_presence_reports_total{result="applied"} 1.0'):
        assert line in text, line
    assert "continuum_oracle_push_queue " in text
    del carol


async def metrics_text(admin: Admin) -> str:
    async with admin.session.get(admin.base_url + "/metrics") as response:
        assert response.status == 200
        return await response.text()


@asynccontextmanager
async def receiver(failures: int, signed: list[tuple[bytes, str | None]] | None = None
                   ) -> AsyncIterator[tuple[str, list[dict]]]:
    """A real HTTP endpoint on 127.0.0.1 that answers 500 `failures` times, then 204; each
    body and its signature header also go to `signed`."""
    posts: list[dict] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if signed is not None:
            signed.append((body, request.headers.get(SIGNATURE_HEADER)))
        posts.append(json.loads(body))
        return web.Response(status=500 if len(posts) <= failures else 204)

    app = web.Application()
    app.router.add_post("/hook/secret", hook)
    async with serving(app) as port:
        yield f"http://127.0.0.1:{port}/hook/secret", posts


@asynccontextmanager
async def watched_device(settings_dir: Path, webhook_url: str, attempts: int, name: str
                         ) -> AsyncIterator[tuple[OracleServer, Admin, Identity]]:
    """An oracle that posts silences to `webhook_url` (`attempts` tries each), with one device
    enrolled as `name` and expected every second, so soon silent: (oracle, admin, device)."""
    settings = oracle_settings(settings_dir, silence_check_s=0.1,
                               silence_webhook_url=webhook_url,
                               silence_webhook_attempts=attempts)
    async with OracleServer(settings) as oracle:
        admin = await Admin.login(oracle)
        try:
            (device,) = await enrolled(admin, name)
            await admin.call("PUT", f"/v1/devices/{device.public.text}/check-in",
                             {"interval_s": 1})
            yield oracle, admin, device
        finally:
            await admin.close()


async def test_the_webhook_is_told_retried_and_given_up_without_holding_the_oracle(
        tmp_path: Path) -> None:
    signed: list[tuple[bytes, str | None]] = []
    async with receiver(failures=2, signed=signed) as (url, posts):
        async with watched_device(tmp_path, url, 3, "alice") as (oracle, admin, alice):
            await eventually(lambda: _at_least(posts, 3), timeout=10)
            assert [p["event"] for p in posts] == ["silent"] * 3  # two 500s, then taken
            assert posts[-1]["devices"][0]["key"] == alice.public.text
            assert posts[-1]["devices"][0]["interval_s"] == 1
            assert posts[-1]["oracle_key"] == oracle.identity.public.text
            # Signed by the oracle's key: a receiver can tell it from anyone's POST.
            for body, header in signed:
                verify_webhook(oracle.identity.public, body, header)
            body, header = signed[-1]
            for forged in (body.replace(b"silent", b"recovered"), body + b" "):
                with pytest.raises(SignatureError):
                    verify_webhook(oracle.identity.public, forged, header)
            with pytest.raises(SignatureError):
                verify_webhook(Identity.generate().public, body, header)
            with pytest.raises(SignatureError):
                verify_webhook(oracle.identity.public, body, None)
            text = await metrics_text(admin)
            assert 'continuum_oracle_silence_webhook_posts_total{result="delivered"} 1.0' \
                in text
            assert "secret" not in str(oracle.settings.describe())

    # Nobody listens at all: three tries, then given up; the oracle answers meanwhile.
    async with receiver(failures=0) as (url, _):
        pass  # the port is free again: connections are refused
    async with watched_device(tmp_path / "2", url, 2, "bob") as (_, admin, _):

        async def gave_up() -> bool:
            started = time.perf_counter()
            text = await metrics_text(admin)
            assert time.perf_counter() - started < 1.0  # never held up by the webhook
            return 'continuum_oracle_silence_webhook_posts_total{result="failed"} 1.0' in text
        await eventually(gave_up, timeout=15, interval=0.1)


async def _at_least(posts: list, count: int) -> bool:
    return len(posts) >= count


@pytest.mark.parametrize("status", [302, 307])
async def test_the_webhook_does_not_follow_a_redirect(tmp_path: Path, status: int) -> None:
    """A webhook URL answering 3xx is a failed delivery: the oracle does not follow it to
    where it points (an internal address, say) with the signed body and its headers.  307
    keeps the method and body; 302 turns them into a GET; neither may reach the target."""
    reached: list[tuple[str, str, bytes, str | None]] = []

    async def internal(request: web.Request) -> web.Response:  # any method, any path
        reached.append((request.method, request.path, await request.read(),
                        request.headers.get(SIGNATURE_HEADER)))
        return web.Response(status=204)

    target = web.Application()
    target.router.add_route("*", "/{tail:.*}", internal)
    asked: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        asked.append(request.method)
        return web.Response(status=status, headers={"Location": f"{internal_url}/admin/do"})

    redirector = web.Application()
    redirector.router.add_post("/hook", redirect)
    async with serving(target) as internal_port, serving(redirector) as port:
        internal_url = f"http://127.0.0.1:{internal_port}"
        async with watched_device(tmp_path, f"http://127.0.0.1:{port}/hook", 2,
                                  "alice") as (_, admin, _):

            async def settled() -> str | None:  # given up, or (wrongly) delivered
                text = await metrics_text(admin)
                return text if 'silence_webhook_posts_total{result="failed"} 1.0' in text \
                    or 'silence_webhook_posts_total{result="delivered"}' in text else None
            text = await eventually(settled, timeout=15, interval=0.1)
    assert reached == []  # nothing went where the redirect pointed
    assert asked == ["POST", "POST"]  # each try was one POST to the configured URL
    assert 'silence_webhook_posts_total{result="failed"} 1.0' in text


@pytest.mark.parametrize("bad", ["ftp://x", "not a url"])
def test_a_bad_webhook_url_is_refused_at_start(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="silence_webhook_url"):
        OracleServer(oracle_settings(tmp_path, silence_webhook_url=bad))


async def test_a_relay_key_cannot_report_unbounded_processes(
        server: OracleServer, admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each relay process costs the oracle a row until it is taken for dead: a key that
    claims more live processes than the bound is refused (429) and nothing is applied."""
    import oracle.presence
    monkeypatch.setattr(oracle.presence, "MAX_INSTANCES_PER_RELAY_KEY", 3)
    (alice,) = await enrolled(admin, "alice")
    for _ in range(3):
        assert await applied(server, Relay(server).snapshot()) is False
    status, answer = await post(server, Relay(server).snapshot(conn(alice, now_ms())))
    assert status == 429 and "live processes" in answer["error"]
    assert (await presence_of(admin, alice))["last_seen_ms"] is None
    other = Relay(server, Identity.generate())  # another key has its own allowance: but
    status, _ = await post(server, other.snapshot())  # the oracle does not know this one
    assert status == 401


async def test_a_relay_key_keeps_at_most_as_many_processes_taken_for_dead_as_live_ones(
        server: OracleServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key that reports fresh processes with a 1 ms lease has each taken for dead at the
    next check, which makes room for more live ones: those taken for dead were kept a week,
    whatever their number.  Now the key's most recently heard ones are kept, as many as it
    may have live."""
    import oracle.presence
    monkeypatch.setattr(oracle.presence, "MAX_INSTANCES_PER_RELAY_KEY", 3)
    assert server.oracle is not None
    presence = server.oracle.presence
    for _ in range(4):
        for _ in range(3):
            assert await applied(server, Relay(server).report(snapshot=1, last=True,
                                                              lease_ms=1)) is False
        assert await presence.expire_leases(now_ms() + 10, started_ms=0) == 3
    remembered = await presence.db.fetchval(
        "SELECT COUNT(*) FROM relay_instances WHERE relay_key = $1", TRUSTED_RELAY.public.text)
    assert remembered == 3


async def test_a_relay_process_cannot_be_taken_over_by_another_relay_key(
        tmp_path: Path) -> None:
    """Two allowed relay keys: one cannot report as the other's process (409), so it cannot
    end that process's connections by a snapshot that leaves them out."""
    other = Identity.generate()
    settings = oracle_settings(tmp_path, relay_keys=(TRUSTED_RELAY.public.text, other.public.text))
    async with OracleServer(settings) as oracle:
        admin = await Admin.login(oracle)
        try:
            (alice,) = await enrolled(admin, "alice")
            owner = Relay(oracle)
            await applied(oracle, owner.snapshot(conn(alice, now_ms())))
            intruder = Relay(oracle, other)
            intruder.instance, intruder.sequence = owner.instance, owner.sequence
            status, answer = await post(oracle, intruder.snapshot())
            assert status == 409 and "another relay key" in answer["error"]
            assert (await presence_of(admin, alice))["online"] is True
        finally:
            await admin.close()
