"""End-to-end revocation latency on loopback: revoke API call → relay refuses → peers dropped it.

Starts a relay with access control, an oracle pushing through it, and for each
round a fresh victim (a raw connection, to see the relay's REVOKED frame) and
a peer (the real client `Device`) in one group.  It then times, from the
moment the revoke request is sent:

  refused  the relay sent the victim's live session REVOKED (and closes it)
  dropped  the peer's peer list no longer contains the victim
  both     the later of the two: revocation complete

Run:  .venv/bin/python benchmarks/revocation_latency.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from client.device import Device  # noqa: E402
from continuum.server import RelayServer, Settings  # noqa: E402
from oracle import OracleServer, OracleSettings  # noqa: E402
from proto import Identity  # noqa: E402
from proto.frames import Error  # noqa: E402
from runtime.logs import configure_logging  # noqa: E402
from wire import RawDevice  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def _until(check, timeout: float = 5.0) -> float:
    """Poll `check()` every 0.5 ms; return the perf_counter time it first held."""
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.0005)
    return time.perf_counter()


async def _round(http: aiohttp.ClientSession, api: str, headers: dict[str, str],
                 relay: RelayServer, oracle_key) -> tuple[float, float]:
    victim, peer = Identity.generate(), Identity.generate()
    for identity, name in ((victim, "victim"), (peer, "peer")):
        async with http.post(f"{api}/v1/devices", json={"key": identity.public.text, "name": name},
                             headers=headers) as response:
            assert response.status == 201, await response.text()
    async with http.post(f"{api}/v1/groups", json={"name": f"g-{victim.public.text[4:12]}"},
                         headers=headers) as response:
        group = await response.json()
    async with Device(peer, relays=[relay.url], oracle_key=oracle_key) as device:
        await device.wait_connected()
        # The relay must know the victim is enrolled before it can connect.
        await _until(lambda: relay.relay.access.refusal(victim.public) is None)
        async with await RawDevice.connect(relay.url, victim) as raw:
            for who in (victim, peer):
                async with http.put(f"{api}/v1/groups/{group['id']}/members/{who.public.text}",
                                    headers=headers) as response:
                    assert response.status == 200
            await _until(lambda: victim.public in device.peers)
            started = time.perf_counter()
            revoke = asyncio.create_task(http.post(
                f"{api}/v1/devices/{victim.public.text}/revoke", headers=headers))
            frame = await raw.recv_not_deliver(timeout=5)
            refused = time.perf_counter()
            assert isinstance(frame, Error) and frame.code == 10, frame
            dropped = await _until(lambda: victim.public not in device.peers)
            (await revoke).release()
    return refused - started, dropped - started


def _summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return (f"{name:8s} min {ms[0]:7.1f} ms   median {statistics.median(ms):7.1f} ms   "
            f"p95 {p95:7.1f} ms   max {ms[-1]:7.1f} ms")


async def main(rounds: int) -> None:
    configure_logging("error")
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "oracle.key"
        oracle_key = Identity.load_or_create(key_file).public
        oracle_port = _free_port()
        relay_settings = Settings(host="127.0.0.1", port=0, log_level="error",
                                  oracle_url=f"http://127.0.0.1:{oracle_port}",
                                  oracle_key=oracle_key.text)
        async with RelayServer(relay_settings) as relay:
            settings = replace(OracleSettings(), host="127.0.0.1", port=oracle_port,
                               database=f"sqlite:///{tmp}/oracle.db", identity_file=str(key_file),
                               relays=(relay.url,), log_level="error")
            async with OracleServer(settings) as oracle, aiohttp.ClientSession() as http:
                headers = {"Authorization": f"Bearer {await oracle.create_api_token('bench', 'write')}"}
                refused, dropped = [], []
                for _ in range(rounds):
                    r, d = await _round(http, oracle.url, headers, relay, oracle_key)
                    refused.append(r)
                    dropped.append(d)
    print(f"revocation latency over {rounds} rounds (loopback, SQLite oracle, one relay):")
    print(_summary("refused", refused))
    print(_summary("dropped", dropped))
    print(_summary("both", [max(r, d) for r, d in zip(refused, dropped, strict=True)]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    asyncio.run(main(parser.parse_args().rounds))
