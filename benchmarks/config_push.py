"""A group's configuration change reaching a connected fleet (SPEC §21), on loopback.

Starts a relay process (unthrottled, `common.UNTHROTTLED`: the oracle sends
one envelope per device, above the default 50/s sender rate), an oracle in
this process (SQLite), and N devices (the real client `Device`, no home) in a
child process, all members of one group, all connected.  Then, per round, it
PUTs a new document on the group through the API and times, from the moment
the request is sent:

  answered  the API answered (the merged documents are issued, in one transaction)
  sent      every device's CONFIG envelope is stored by the relay
  reported  every device reported the new version (the oracle recorded it):
            the configuration change is done

Setup shortcut: the devices join the group in one SQL statement and their peer
lists are issued once (`reissue_peer_lists`) rather than one API call each,
which would issue N² peer-list versions first.

`--default-sender-rate` keeps the relay's default per-sender rate (50/s, burst 100), which
applies to the oracle too: what a deployment that did not raise it gets.

Run:  .venv/bin/python benchmarks/config_push.py [--devices 1000] [--rounds 3]
                                                  [--default-sender-rate]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import UNTHROTTLED, RelayProcess, raise_nofile  # noqa: E402
from client.config import ConfigUpdate  # noqa: E402
from client.device import Device  # noqa: E402
from oracle import OracleServer, OracleSettings  # noqa: E402
from proto import Identity, PublicKey  # noqa: E402
from runtime.logs import configure_logging  # noqa: E402


def _fleet(secrets: list[str], relay_url: str, oracle_key: str, pipe: Connection) -> None:
    """The child process: every device connected until the parent says stop."""
    configure_logging("error")
    raise_nofile()
    asyncio.run(_run_fleet(secrets, relay_url, PublicKey.from_text(oracle_key), pipe))


async def _run_fleet(secrets: list[str], relay_url: str, oracle_key: PublicKey,
                     pipe: Connection) -> None:
    def applied(update: ConfigUpdate) -> dict:
        return {"round": update.document.get("round")}

    devices = [Device(Identity.from_text(secret), [relay_url], oracle_key=oracle_key)
               for secret in secrets]
    for device in devices:
        device.on_config(applied)
        await device.__aenter__()
    try:
        await asyncio.gather(*(device.wait_connected(120) for device in devices))
        pipe.send("connected")
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
    finally:
        for device in devices:
            await device.__aexit__(None, None, None)


async def _until(check, timeout: float = 300.0, interval: float = 0.01) -> float:
    deadline = time.perf_counter() + timeout
    while not await check():
        if time.perf_counter() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(interval)
    return time.perf_counter()


def _relay_flags(default_sender_rate: bool) -> tuple[str, ...]:
    if not default_sender_rate:
        return UNTHROTTLED
    flags = list(UNTHROTTLED)
    for name in ("--rate-per-s", "--rate-burst"):
        del flags[flags.index(name):flags.index(name) + 2]
    return tuple(flags)


async def main(count: int, rounds: int, default_sender_rate: bool) -> None:
    configure_logging("error")
    raise_nofile()
    identities = [Identity.generate() for _ in range(count)]
    with tempfile.TemporaryDirectory() as tmp, \
            RelayProcess(*_relay_flags(default_sender_rate)) as relay:
        settings = replace(OracleSettings(), host="127.0.0.1", port=0,
                           database=f"sqlite:///{tmp}/oracle.db",
                           identity_file=f"{tmp}/oracle.key", relays=(relay.url,),
                           log_level="error")
        async with OracleServer(settings) as oracle, aiohttp.ClientSession() as http:
            assert oracle.oracle is not None
            registry = oracle.oracle.registry
            for number, identity in enumerate(identities):
                await registry.enroll(identity.public.text, f"dev-{number:04d}")
            group = await registry.create_group("fleet")
            async with registry.db.transaction() as conn:
                await conn.executemany(
                    "INSERT INTO memberships (group_id, device_key) VALUES ($1, $2)",
                    [(group.id, identity.public.text) for identity in identities])
            await registry.reissue_peer_lists()
            headers = {"Authorization": f"Bearer {await oracle.create_api_token('bench', 'write')}"}

            parent, child = multiprocessing.Pipe()
            fleet = multiprocessing.get_context("spawn").Process(
                target=_fleet, args=([i.secret_text() for i in identities], relay.url,
                                     oracle.identity.public.text, child))
            fleet.start()
            try:
                connected = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
                assert connected == "connected"
                await _until(lambda: _drained(registry))
                results = []
                for number in range(1, rounds + 1):
                    results.append(await _round(http, oracle.url, headers, group.id, registry,
                                                number))
            finally:
                parent.send("stop")
                await asyncio.get_running_loop().run_in_executor(None, fleet.join, 60)
                if fleet.is_alive():
                    fleet.kill()
    rate = "default sender rate" if default_sender_rate else "unthrottled"
    print(f"group configuration change to {count} connected devices, {rounds} rounds"
          f" (loopback, one relay process ({rate}), SQLite oracle, devices in one other"
          " process):")
    for name, index in (("answered", 0), ("sent", 1), ("reported", 2)):
        values = sorted(r[index] * 1000 for r in results)
        print(f"  {name:9s} median {statistics.median(values):8.1f} ms   min {values[0]:8.1f} ms"
              f"   max {values[-1]:8.1f} ms")


async def _drained(registry) -> bool:
    return (not await registry.pending_pushes(1) and not await registry.configs.pending(1)
            and not await registry.behind_keys(1))


async def _round(http: aiohttp.ClientSession, api: str, headers: dict[str, str], group_id: str,
                 registry, number: int) -> tuple[float, float, float]:
    started = time.perf_counter()
    async with http.put(f"{api}/v1/groups/{group_id}/config",
                        json={"round": number, "interval_s": 30 + number},
                        headers=headers) as response:
        assert response.status == 200, await response.text()
    answered = time.perf_counter()

    async def all_sent() -> bool:
        return not await registry.configs.pending(1)

    async def all_reported() -> bool:
        return not await registry.configs.behind(1)

    sent = await _until(all_sent)
    reported = await _until(all_reported)
    return answered - started, sent - started, reported - started


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--default-sender-rate", action="store_true",
                        help="keep the relay's default per-sender rate (50/s, burst 100)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.devices, arguments.rounds, arguments.default_sender_rate))
