"""Three regions on one machine: a Redis each, relays each, and a WAN between them.

Each region (eu, us, ap) has a redis-server of its own (AOF, fsync always, so a
SIGKILL loses nothing it acknowledged) and its relays run in this process.  A
relay reaches its own region's Redis directly and every other region's
through a `DelayProxy` of that pair of regions: 30-80 ms one way, so every
cross-region store call pays a real WAN round trip and races that only show
under latency show here.  A `FakeOracle` serves the signed access list that
places each device's mailbox in its home region (SPEC §19); every relay
polls it.  All relays share one relay key, as the chart's regions do, so a
device believes an expiry notice whichever region's relay wrote it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace

from continuum.server import RelayServer
from fake_oracle import FakeOracle
from proto import Identity, PublicKey
from proto.access import AccessList
from redis_server import RedisServer, unique_prefix
from runtime.clock import now_ms
from tcp_proxy import DelayProxy

from conftest import TEST_SETTINGS

REGIONS = ("ap", "eu", "us")
# One-way latency between two regions, seconds (a proxy delays each direction by this).
ONE_WAY_S = {frozenset({"eu", "us"}): 0.040, frozenset({"eu", "ap"}): 0.080,
             frozenset({"us", "ap"}): 0.060}


def one_way_s(a: str, b: str) -> float:
    return 0.0 if a == b else ONE_WAY_S[frozenset({a, b})]


@dataclass
class World:
    """Three regions: their Redis servers, the WAN proxies between them, the oracle's list."""

    redis: dict[str, RedisServer]
    proxies: dict[tuple[str, str], DelayProxy]  # (relay's region, store's region)
    oracle: FakeOracle
    prefix: str
    relay_identity: Identity = field(default_factory=Identity.generate)
    relays: list[RelayServer] = field(default_factory=list)
    version: int = 0

    def store_url(self, relay_region: str, store_region: str) -> str:
        """How a relay in `relay_region` reaches `store_region`'s Redis."""
        port = (self.redis[store_region].port if relay_region == store_region
                else self.proxies[(relay_region, store_region)].port)
        return f"redis://127.0.0.1:{port}/0?prefix={self.prefix}"

    def place(self, homes: Mapping[PublicKey, str], former: Mapping[PublicKey, str] | None = None,
              groups: Mapping[PublicKey, Iterable[int]] | None = None,
              default_home: str = "eu") -> None:
        """Serve a new list (the next version) placing each key in its home region; every
        key in one group unless `groups` says otherwise."""
        self.version += 1
        issued = now_ms()
        self.oracle.serve(AccessList(
            1, self.version, issued, issued + 600_000, self.oracle.identity.public,
            {key: frozenset((groups or {}).get(key, (1,))) for key in homes}, frozenset(),
            regions=REGIONS, homes=dict(homes), former_homes=dict(former or {}),
            default_home=default_home))

    async def relay(self, region: str, **overrides: object) -> RelayServer:
        """A relay of `region`, started, holding the list served now."""
        settings = replace(TEST_SETTINGS, **{
            "store": self.store_url(region, region), "region": region,
            "region_stores": tuple(f"{other}={self.store_url(region, other)}"
                                   for other in REGIONS if other != region),
            "relay_key": self.relay_identity.secret_text(), "oracle_url": self.oracle.url,
            "oracle_key": self.oracle.identity.public.text, **overrides})
        server = RelayServer(settings)
        await server.start()
        self.relays.append(server)
        assert server.relay is not None
        if settings.oracle_url:
            assert await server.relay.access.wait_loaded(10), "the relay got no access list"
        return server

    async def wait_applied(self, timeout_s: float = 10.0) -> None:
        """Until every relay holds the list served now."""
        import asyncio
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for server in self.relays:
            assert server.relay is not None
            while (server.relay.access.current is None
                   or server.relay.access.current.version != self.version):
                assert loop.time() < deadline, "a relay did not apply the new list"
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def three_regions(*redis_options: str) -> AsyncIterator[World]:
    """Three Redis servers (AOF, fsync always), six WAN proxies and an oracle; relays are
    started by the test (`world.relay(region)`) and all stopped at the end."""
    servers: dict[str, RedisServer] = {}
    try:
        for region in REGIONS:
            servers[region] = RedisServer("--appendonly", "yes", "--appendfsync", "always",
                                          *redis_options).start()
        async with contextlib.AsyncExitStack() as stack:
            proxies = {}
            for a in REGIONS:
                for b in REGIONS:
                    if a != b:
                        proxies[(a, b)] = await stack.enter_async_context(
                            DelayProxy(servers[b].port, one_way_s(a, b)))
            oracle = await stack.enter_async_context(FakeOracle(Identity.generate(), 0.3))
            world = World(servers, proxies, oracle, unique_prefix())
            try:
                yield world
            finally:
                for server in world.relays:
                    await server.stop()
    finally:
        for server in servers.values():
            server.remove()
