"""The oracle rotates its key (SPEC §15) and relays and devices follow, because the old key
signed the new one.

Real processes where restarts matter: the relay is a child process restarted with the old
oracle key still configured, `continuum-oracle rotate-key` runs as the operator runs it,
and one device is the CLI.  The relay's key is not in the oracle's --relay-key list: the
oracle only learns it by connecting, which the relay refuses to its new key until it has
followed the chain, so this also proves the relay does not wait for that forever.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from oracle_support import Admin, eventually, handshake_refusal, oracle_settings
from relay_process import RelayProcess, free_port
from test_client_cli import CLIENT, new_home, run_cli

from client import Device
from oracle import OracleServer
from proto import Identity, PublicKey
from proto.rotation import OracleKeyChain

ORACLE_CLI = str(Path(sys.executable).parent / "continuum-oracle")


async def test_oracle_rotates_and_relays_and_devices_follow(tmp_path: Path) -> None:
    port = free_port()
    first = Identity.load_or_create(tmp_path / "oracle.key")
    relay = RelayProcess("--oracle-url", f"http://127.0.0.1:{port}", "--oracle-key",
                         first.public.text, "--require-enrollment", "true", "--relay-key",
                         Identity.generate().secret_text(), "--store",
                         f"sqlite:///{tmp_path / 'mail.db'}", log_path=tmp_path / "relay.log")
    settings = oracle_settings(tmp_path, port=port, relays=(relay.url,), relay_keys=())
    alice, carol, dave = Identity.generate(), Identity.generate(), Identity.generate()
    bob_home = tmp_path / "bob"
    bob = PublicKey.from_text(new_home(bob_home))
    assert run_cli(bob_home, "enroll", "--oracle", first.public.text).returncode == 0
    followed: list[OracleKeyChain] = []
    await relay.start()
    listener = subprocess.Popen([CLIENT, "--home", str(bob_home), "--relay", relay.url, "listen",
                                 "--timeout", "120"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        async with Device(alice, [relay.url], oracle_key=first.public,
                          on_oracle_key_change=followed.append) as a:
            async with OracleServer(settings) as oracle:
                admin = await Admin.login(oracle, "first")
                group = (await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201))["id"]
                for key in (alice.public, bob, carol.public, dave.public):
                    await admin.call("POST", "/v1/devices", {"key": key.text,
                                                             "name": key.text[4:9]}, expect=201)
                # dave is offline: his list, signed by the old key, waits in his mailbox.
                for key in (alice.public, bob, dave.public):
                    await admin.call("PUT", f"/v1/groups/{group}/members/{key.text}")
                await eventually(lambda: _has(a, dave.public), timeout=15)
                await eventually(lambda: _file_lists(bob_home / "peers.json", alice.public),
                                 timeout=15)
                await admin.close()

            # The operator rotates the stopped oracle's key, and the relay restarts with the
            # configuration it had: the old oracle key.
            rotated = subprocess.run([ORACLE_CLI, "rotate-key", "--identity-file",
                                      str(tmp_path / "oracle.key")], capture_output=True,
                                     text=True, timeout=60)
            assert rotated.returncode == 0, rotated.stderr
            second = Identity.load(tmp_path / "oracle.key")
            assert rotated.stdout.strip() == second.public.text != first.public.text
            relay.stop()
            await relay.start()

            async with OracleServer(settings) as oracle:
                assert oracle.identity.public == second.public
                await eventually(lambda: _follows(a, second.public), timeout=30)
                assert [chain.current for chain in followed] == [second.public]
                assert a.stats.oracle_key_changes == 1
                await eventually(lambda: _file_says(bob_home / "oracle.pub", second.public.text),
                                 timeout=15)
                chain = OracleKeyChain.decode((bob_home / "oracle.chain").read_bytes())
                assert chain.follow(first.public) == second.public
                admin = await Admin.login(oracle, "second")

                async def behind() -> list[str]:
                    return (await admin.call("GET", "/v1/status"))["behind"]

                # dave reads the old key's list (his receipt for it goes to a key relays now
                # refuse), then the chain: the oracle sends that list again, and he is not
                # left "behind" on the dashboard.
                async with Device(dave, [relay.url], oracle_key=first.public) as d:
                    await eventually(lambda: _follows(d, second.public), timeout=30)
                    assert set(d.peers) == {alice.public, bob}
                    await eventually(lambda: _equals(behind, []), timeout=15)

                # Lists signed by the new key are in force on both devices...
                await admin.call("PUT", f"/v1/groups/{group}/members/{carol.public.text}")
                await eventually(lambda: _has(a, carol.public), timeout=15)
                await eventually(lambda: _file_lists(bob_home / "peers.json", carol.public),
                                 timeout=15)
                # carol never connects and dave is offline again: both are behind
                await eventually(lambda: _equals(behind, [carol.public.text, dave.public.text]),
                                 timeout=15)
                await admin.close()
                # ...and the relay no longer takes the old key for the oracle.
                assert await handshake_refusal(relay.url, first) == "REVOKED"

            # A device restarted with the old oracle key configured follows its stored chain.
            started = await asyncio.to_thread(
                run_cli, bob_home, "--relay", relay.url, "--oracle-key", first.public.text,
                "--log-level", "info", "listen", "--timeout", "1")
            assert f'"oracle_key": "{second.public.text}"' in started.stderr, started.stderr
    finally:
        listener.kill()
        listener.wait(10)
        relay.stop()


async def _has(device: Device, key: PublicKey) -> bool:
    return key in device.peers


async def _follows(device: Device, key: PublicKey) -> bool:
    return device.oracle_key == key


async def _file_says(path: Path, text: str) -> bool:
    return path.exists() and path.read_text().strip() == text


async def _file_lists(path: Path, key: PublicKey) -> bool:
    return path.exists() and key.text in path.read_text()


async def _equals(read, expected: list[str]) -> bool:
    return sorted(await read()) == sorted(expected)
