"""A restarted relay does not roll back its access list: the highest stamp lives in the store.

Before, a relay kept the list in memory only and took the first validly
signed list after it started, so whoever could answer its first poll (anyone
on a plain-http path, a rogue endpoint) could hand a restarted relay an old
list that still enrolled a revoked key.  Now the relay reads the floor from
its store (a SQLite file, or the Redis its replicas share) before applying
anything, and refuses, logs and counts a list below it; a year-old list is
also refused as lapsed.  Real relay processes, killed with SIGKILL, and an
HTTP endpoint serving lists signed with the oracle's key over real sockets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from access_support import admission, healthz, log_events, metric
from fake_oracle import FakeOracle
from oracle_support import eventually
from relay_process import RelayProcess
from wire import now_ms

from proto import Identity
from proto.access import AccessList

EPOCH = 1_700_000_000_000
YEAR_MS = 365 * 24 * 3600 * 1000


def signed_list(epoch: int, version: int, oracle: Identity, enrolled: list[Identity],
                revoked: list[Identity], issued_at_ms: int | None = None) -> AccessList:
    issued = now_ms() if issued_at_ms is None else issued_at_ms
    return AccessList(epoch, version, issued, issued + 600_000, oracle.public,
                      {key.public: frozenset({0}) for key in enrolled},
                      frozenset(key.public for key in revoked))


@pytest.fixture(params=["sqlite-file", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        return request.getfixturevalue("redis_url")
    return f"sqlite:///{tmp_path / 'mail.db'}"


async def test_a_restarted_relay_refuses_lists_older_than_it_obeyed(
        tmp_path: Path, store_url: str) -> None:
    oracle, alice, bob, carol = (Identity.generate() for _ in range(4))
    log = tmp_path / "relay.log"
    async with FakeOracle(oracle) as endpoint:
        relay = RelayProcess("--store", store_url, "--oracle-url", endpoint.url,
                             "--oracle-key", oracle.public.text, "--require-enrollment", "true",
                             log_path=log)
        base = f"http://127.0.0.1:{relay.port}"

        async def stamp_is(stamp: str) -> bool:
            return (await healthz(base))["access_list"].get("stamp") == stamp

        # 1. bob was enrolled in version 5 and revoked in version 6, which the relay obeys.
        endpoint.serve(signed_list(EPOCH, 6, oracle, [alice], [bob]))
        await relay.start()
        try:
            await eventually(lambda: stamp_is(f"{EPOCH}.6"), timeout=10)
            assert await admission(relay.url, bob) == "REVOKED"
        finally:
            relay.kill()

        # 2. Restarted (SIGKILL: nothing saved on the way out) while the endpoint hands out
        # a year-old list, then version 5, both genuinely signed and both enrolling bob.
        ancient = signed_list(EPOCH - YEAR_MS, 99, oracle, [alice, bob], [],
                              issued_at_ms=now_ms() - YEAR_MS)
        endpoint.serve(ancient)
        await relay.start()
        try:
            await eventually(lambda: _counted(base, "continuum_access_list_untimely_total",
                                              reason="expired"), timeout=10)
            endpoint.serve(signed_list(EPOCH, 5, oracle, [alice, bob], []))
            await eventually(lambda: _counted(base, "continuum_access_list_backwards_total"),
                             timeout=10)
            health = await healthz(base)
            assert health["status"] == "access_list_missing", health
            assert await admission(relay.url, bob) == "ACCESS_LIST_UNAVAILABLE"
            assert await admission(relay.url, alice) == "ACCESS_LIST_UNAVAILABLE"
            refused = log_events(log, "access_list_went_backwards")
            assert refused and refused[-1]["offered"] == f"{EPOCH}.5"
            assert refused[-1]["floor"] == f"{EPOCH}.6"
            assert log_events(log, "access_list_untimely")[0]["reason"] == "expired"

            # 3. The oracle's next list is applied: bob stays out, carol comes in.
            endpoint.serve(signed_list(EPOCH, 7, oracle, [alice, carol], [bob]))
            await eventually(lambda: stamp_is(f"{EPOCH}.7"), timeout=10)
            assert await admission(relay.url, bob) == "REVOKED"
            assert await admission(relay.url, carol) == "WELCOME"
            assert (await healthz(base))["status"] == "ok"
        finally:
            relay.kill()


async def test_a_new_replica_gets_the_floor_another_one_raised(redis_url: str,
                                                             tmp_path: Path) -> None:
    """Replicas share the store, so one that starts later refuses what another outgrew."""
    oracle, alice, bob = (Identity.generate() for _ in range(3))
    async with FakeOracle(oracle) as first_endpoint, FakeOracle(oracle) as second_endpoint:
        args = ("--store", redis_url, "--oracle-key", oracle.public.text,
                "--require-enrollment", "true")
        first = RelayProcess(*args, "--oracle-url", first_endpoint.url)
        second = RelayProcess(*args, "--oracle-url", second_endpoint.url,
                              log_path=tmp_path / "second.log")
        first_endpoint.serve(signed_list(EPOCH, 6, oracle, [alice], [bob]))
        second_endpoint.serve(signed_list(EPOCH, 5, oracle, [alice, bob], []))
        await first.start()
        try:
            await eventually(lambda: _stamp(f"http://127.0.0.1:{first.port}", f"{EPOCH}.6"),
                             timeout=10)
            await second.start()
            try:
                await eventually(lambda: _counted(f"http://127.0.0.1:{second.port}",
                                                  "continuum_access_list_backwards_total"),
                                 timeout=10)
                assert await admission(second.url, bob) == "ACCESS_LIST_UNAVAILABLE"
            finally:
                second.kill()
        finally:
            first.kill()


async def _counted(base: str, name: str, **labels: str) -> bool:
    return (await metric(base, name, **labels) or 0) >= 1


async def _stamp(base: str, stamp: str) -> bool:
    return (await healthz(base))["access_list"].get("stamp") == stamp

