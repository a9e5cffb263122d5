"""`continuum-client rotate-key` as a user runs it, killed mid-rotation and run again (SPEC §15).

Real processes and files: the CLI runs as a child process against a relay that
enforces the oracle's list; the oracle is stopped while the first rotate-key
waits for its confirmation, so the SIGKILL lands at a known step (the oracle's
mailbox holds the rotation statement), not at a time.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from oracle_support import TRUSTED_RELAY, Admin, eventually, oracle_settings
from relay_process import free_port
from tcp_proxy import DelayProxy
from test_client_cli import CLIENT, new_home, run_cli, run_cli_async

from client import Device
from oracle import OracleServer
from proto import Identity, PublicKey
from proto.errors import RevokedError


async def test_rotate_key_killed_mid_rotation_resumes_and_loses_no_mail(
        tmp_path: Path, start_relay) -> None:
    port = free_port()
    oracle_identity = Identity.load_or_create(tmp_path / "oracle.key")
    relay = await start_relay(oracle_url=f"http://127.0.0.1:{port}", require_enrollment=True,
                              oracle_key=oracle_identity.public.text,
                              relay_key=TRUSTED_RELAY.secret_text())
    settings = oracle_settings(tmp_path, port=port, relays=(relay.url,), rotation_drain_s=30)
    home, bob = tmp_path / "alice", Identity.generate()
    alice = PublicKey.from_text(new_home(home))
    assert run_cli(home, "enroll", "--oracle", oracle_identity.public.text).returncode == 0
    cli = ["--home", str(home), "--relay", relay.url]

    async with Device(bob, [relay.url], oracle_key=oracle_identity.public) as b:
        async with OracleServer(settings) as oracle:
            admin = await Admin.login(oracle, "first")
            group = (await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201))["id"]
            for key in (alice, bob.public):
                await admin.call("POST", "/v1/devices", {"key": key.text, "name": key.text[4:9]},
                                 expect=201)
                await admin.call("PUT", f"/v1/groups/{group}/members/{key.text}")
            await eventually(lambda: _has(b, alice), timeout=10)
            await admin.close()
        # Mail for alice's old key, waiting while she is offline.
        await b.send([alice], b"waiting for the old key")

        # 1. rotate-key with the oracle down: the statement waits in the oracle's mailbox,
        #    the CLI waits for a confirmation that cannot come, and is killed.
        rotating = await asyncio.create_subprocess_exec(
            CLIENT, *cli, "rotate-key", "--timeout", "60", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            await eventually(lambda: _mailbox_holds(relay, oracle_identity.public), timeout=30)
        finally:
            rotating.send_signal(signal.SIGKILL)
            await rotating.wait()
        pending = Identity.load(home / "identity.key.next")
        assert Identity.load(home / "identity.key").public == alice  # still the old key
        assert not (home / "identity.key.old").exists()

        # 2. The oracle comes back and applies the statement; rotate-key, run again, resumes
        #    with the same new key (the old one may now only drain) and is confirmed.
        async with OracleServer(settings) as oracle:
            code, out, err = await run_cli_async(*cli, "rotate-key", "--timeout", "30")
            assert code == 0, err
            assert "resuming rotation" in err and out.strip() == pending.public.text
            assert Identity.load(home / "identity.key").public == pending.public
            assert Identity.load(home / "identity.key.old").public == alice
            assert not (home / "identity.key.next").exists()
            assert run_cli(home, "whoami").stdout.strip() == pending.public.text

            # 3. Peers are told the new key; writing to the old one is refused, not lost.
            await eventually(lambda: _has(b, pending.public), timeout=10)
            assert alice not in b.peers
            try:
                await b.send([alice], b"to the old key, too late")
                raise AssertionError("a send to the rotated key was accepted")
            except RevokedError:
                pass
            await b.send([pending.public], b"to the new key")

            # 4. listen drains the old key's mailbox, then forgets the old key.
            code, out, err = await run_cli_async(*cli, "listen", "--json", "--count", "2",
                                                 "--timeout", "20")
            assert code == 0, err
            texts = sorted(json.loads(line)["text"] for line in out.splitlines())
            assert texts == ["to the new key", "waiting for the old key"]
            await _listen_until_drained(cli, home)
            assert not (home / "identity.key.old").exists()

            admin = await Admin.login(oracle, "second")
            new_record = await admin.call("GET", f"/v1/devices/{pending.public.text}")
            assert new_record["rotated_from"] == alice.text and new_record["groups"] == ["g"]
            await admin.close()


async def _listen_until_drained(cli: list[str], home: Path) -> None:
    """listen exits at its count before the drain's quiet period: run it until it deleted .old."""
    for _ in range(5):
        if not (home / "identity.key.old").exists():
            return
        code, _, err = await run_cli_async(*cli, "listen", "--timeout", "3")
        assert code == 0, err


async def _has(device: Device, key: PublicKey) -> bool:
    return key in device.peers


async def _mailbox_holds(relay, key: PublicKey) -> bool:
    return await relay.relay.store.depth(key) >= 1


async def test_rotate_key_waits_until_the_relays_apply_the_new_list(
        tmp_path: Path, start_relay) -> None:
    """Before: the CLI took its new key's NOT_ENROLLED for a refusal no retry can change and
    exited 1 whenever the relay applied the oracle's list after the device reconnected as
    the new key (SPEC §15 step 4: it reconnects with backoff).  A relay that hears from the
    oracle a second late makes that the usual order."""
    port = free_port()
    oracle_identity = Identity.load_or_create(tmp_path / "oracle.key")
    async with DelayProxy(port, delay_s=1.0) as slow_oracle:
        relay = await start_relay(oracle_url=f"http://127.0.0.1:{slow_oracle.port}",
                                  require_enrollment=True,
                                  oracle_key=oracle_identity.public.text,
                                  relay_key=TRUSTED_RELAY.secret_text())
        settings = oracle_settings(tmp_path, port=port, relays=(relay.url,))
        home = tmp_path / "alice"
        alice = PublicKey.from_text(new_home(home))
        assert run_cli(home, "enroll", "--oracle", oracle_identity.public.text).returncode == 0
        async with OracleServer(settings) as oracle:
            admin = await Admin.login(oracle, "first")
            await admin.call("POST", "/v1/devices", {"key": alice.text, "name": "alice"},
                             expect=201)
            await admin.close()
            await eventually(lambda: _admitted(relay, alice), timeout=15)
            code, out, err = await run_cli_async("--home", str(home), "--relay", relay.url,
                                                 "rotate-key", "--timeout", "30")
            assert code == 0, err
            new = Identity.load(home / "identity.key").public
            assert out.strip() == new.text and new != alice
            assert "NOT_ENROLLED" in err  # it was refused meanwhile, and waited it out


async def _admitted(relay, key: PublicKey) -> bool:
    return relay.relay.access.refusal(key) is None
