"""Revocation holds when the store is slow: no SEND from a revoked key is ACCEPTED a second
after the oracle published the list (issue "Trust that holds", Revocation → Race).

Before: a session awaited the store's subscription before it registered its
access-list watch, and SEND never re-checked the sender; with Redis 400 ms
away, a key revoked while that await ran kept sending, ACCEPTED, for as long
as it liked (9.3 s in the report).  The store here really is slow: the relay
reaches Redis through a TCP proxy that delays every chunk.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from oracle_support import Admin, oracle_settings
from redis_server import RedisServer
from tally import ATTACKS_REJECTED, TALLY
from tcp_proxy import DelayProxy

from oracle import OracleServer
from proto import Identity
from proto.errors import ErrorCode
from proto.frames import Accepted, Error, Send
from wire import RawDevice, sealed

pytestmark = pytest.mark.redis

ONE_WAY_DELAY_S = 0.2  # 400 ms per Redis round trip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_no_send_from_a_revoked_key_is_accepted_a_second_after_publication(
        start_relay, tmp_path) -> None:
    redis = RedisServer().start()
    try:
        async with DelayProxy(redis.port, ONE_WAY_DELAY_S) as proxy:
            oracle_port = free_port()
            oracle_identity = Identity.load_or_create(tmp_path / "oracle.key")
            relay = await start_relay(store=f"redis://127.0.0.1:{proxy.port}/0",
                                      oracle_key=oracle_identity.public.text,
                                      oracle_url=f"http://127.0.0.1:{oracle_port}",
                                      rate_per_s=1e6, rate_burst=10**6)
            settings = oracle_settings(tmp_path, relays=(relay.url,), port=oracle_port)
            async with OracleServer(settings) as oracle:
                admin = await Admin.login(oracle)
                try:
                    await _race(relay, admin)
                finally:
                    await admin.close()
    finally:
        redis.remove()


async def _race(relay, admin: Admin) -> None:
    victim, peer = Identity.generate(), Identity.generate()
    for number, who in enumerate((victim, peer)):
        await admin.call("POST", "/v1/devices", {"key": who.public.text, "name": f"d{number}"},
                         expect=201)
    group = await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201)
    for who in (victim, peer):
        await admin.call("PUT", f"/v1/groups/{group['id']}/members/{who.public.text}")
    access = relay.relay.access
    async with asyncio.timeout(10):  # the relay holds the list in which they are peers
        while access.current is None or victim.public not in access.current.enrolled:
            await asyncio.sleep(0.02)
    loop = asyncio.get_running_loop()
    async with await RawDevice.connect(relay.url, victim) as v:
        # The session's subscription to its mailbox is now on its way through the slow link.
        await admin.call("POST", f"/v1/devices/{victim.public.text}/revoke")
        published = loop.time()
        answers: list[tuple[float, object]] = []

        async def keep_sending() -> None:
            for _ in range(60):  # 3 s of SENDs, never waiting for their answers
                if v.ws.closed:
                    return
                await v.send_frame(Send(sealed(victim, [peer.public]).raw))
                await asyncio.sleep(0.05)

        sending = asyncio.create_task(keep_sending())
        try:
            async with asyncio.timeout(8):
                while True:
                    try:
                        frame = await v.recv(timeout=8)
                    except ConnectionError:
                        break  # closed by the relay
                    answers.append((loop.time() - published, frame))
        except TimeoutError:
            pass
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
    late = [at for at, frame in answers if isinstance(frame, Accepted) and at > 1.0]
    assert not late, f"ACCEPTED {len(late)} times after the revocation, up to {max(late):.1f} s"
    codes = {ErrorCode(frame.code) for _, frame in answers if isinstance(frame, Error)}
    assert ErrorCode.REVOKED in codes  # told why, then closed
    TALLY[ATTACKS_REJECTED] += 1
