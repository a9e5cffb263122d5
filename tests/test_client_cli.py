"""`continuum-client` as a user runs it: separate processes, a real relay process, real files."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cli_support import CLIENT, new_home, run_cli, run_cli_async
from oracle_support import Admin, eventually, oracle_settings

from client import Device
from oracle import OracleServer
from proto import Identity, Kind, PublicKey, seal_envelope
from proto.payloads import PeerChange
from relay_process import RelayProcess, free_port


@pytest.fixture
async def relay_process(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    relay = await RelayProcess(log_path=tmp_path / "relay.log").start()
    yield relay
    relay.stop()


def test_keygen_creates_an_owner_only_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    home = tmp_path / "device"
    result = run_cli(home, "keygen")
    assert result.returncode == 0, result.stderr
    public = result.stdout.strip()
    key_file = home / "identity.key"
    assert public.startswith("cpk_")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert Identity.load(key_file).public.text == public
    secret = key_file.read_text()
    assert secret.strip() not in result.stdout + result.stderr

    again = run_cli(home, "keygen")
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert key_file.read_text() == secret
    assert run_cli(home, "whoami").stdout.strip() == public


def test_whoami_without_a_key_says_how_to_make_one(tmp_path: Path) -> None:
    result = run_cli(tmp_path / "empty", "whoami")
    assert result.returncode == 2 and "keygen" in result.stderr


def test_peers_add_list_remove_and_bad_keys_refused(tmp_path: Path) -> None:
    bob, carol = Identity.generate().public.text, Identity.generate().public.text
    assert run_cli(tmp_path, "peers", "add", bob, carol).returncode == 0
    listed = run_cli(tmp_path, "peers", "list").stdout.split()
    assert listed == sorted([bob, carol], key=PublicKey.from_text)
    assert run_cli(tmp_path, "peers", "remove", carol).returncode == 0
    assert run_cli(tmp_path, "peers", "list").stdout.split() == [bob]
    typo = bob[:-3] + ("a" if bob[-3] != "a" else "b") + bob[-2:]
    refused = run_cli(tmp_path, "peers", "add", typo)
    assert refused.returncode == 2 and "public key" in refused.stderr
    assert run_cli(tmp_path, "peers", "list").stdout.split() == [bob]


async def test_send_and_listen_end_to_end_with_receipt(tmp_path: Path,
                                                       relay_process: RelayProcess) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice, bob = new_home(alice_home), new_home(bob_home)
    assert run_cli(alice_home, "peers", "add", bob).returncode == 0
    assert run_cli(bob_home, "peers", "add", alice).returncode == 0
    binary = tmp_path / "reading.bin"
    binary.write_bytes(b"\xff\x00\x01 not text")

    listener = await asyncio.create_subprocess_exec(
        CLIENT, "--home", str(bob_home), "--relay", relay_process.url, "listen",
        "--count", "2", "--json", "--timeout", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert listener.stderr is not None and listener.stdout is not None
        async with asyncio.timeout(30):
            banner = ""
            while "listening as" not in banner:  # skip any log lines before it
                banner = (await listener.stderr.readline()).decode()
                assert banner, "listener exited before connecting"
        assert f"listening as {bob} on {relay_process.url}" in banner

        base = ["--home", str(alice_home), "--relay", relay_process.url, "send"]
        code, out, err = await run_cli_async(*base, bob, "hello from the shell", "--wait", "20")
        assert code == 0, err
        accepted, receipt = out.splitlines()
        msg_id = accepted.split()[1]
        assert accepted == f"accepted {msg_id} via {relay_process.url}"
        assert receipt == f"{bob} delivered"
        code, out, err = await run_cli_async(*base, bob, f"@{binary}")
        assert code == 0 and out.startswith("accepted "), err

        async with asyncio.timeout(30):
            lines = (await listener.stdout.read()).decode().splitlines()
            assert await listener.wait() == 0
    finally:
        if listener.returncode is None:
            listener.kill()
            await listener.wait()
    first, second = (json.loads(line) for line in lines)
    assert first == {"from": alice, "msg_id": msg_id, "created_at_ms": first["created_at_ms"],
                     "text": "hello from the shell"}
    assert second["from"] == alice and base64.b64decode(second["base64"]) == binary.read_bytes()


async def test_refused_send_exits_non_zero_naming_the_error_code(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    home = tmp_path / "alice"
    new_home(home)
    env = {**os.environ, "CONTINUUM_HOME": str(home), "CONTINUUM_RELAYS": relay_process.url}
    bob = Identity.generate().public.text
    code, out, err = await run_cli_async("send", bob, "forever", "--ttl", "700000", env=env)
    assert code == 1 and out == ""
    assert "refused: INVALID_FIELD" in err and "ttl" in err


async def test_send_with_no_reachable_relay_gives_up_after_its_timeout(tmp_path: Path) -> None:
    home = tmp_path / "alice"
    new_home(home)
    dead = f"ws://127.0.0.1:{free_port()}/v1/connect"
    code, out, err = await run_cli_async("--home", str(home), "--relay", dead, "send",
                                         Identity.generate().public.text, "anyone?",
                                         "--timeout", "1")
    assert code == 3 and out == ""
    assert "not accepted within 1s" in err and "Cannot connect" in err


def test_enroll_records_the_oracle_and_refuses_a_silent_switch(tmp_path: Path) -> None:
    device_key = new_home(tmp_path)
    oracle, other = Identity.generate().public.text, Identity.generate().public.text
    result = run_cli(tmp_path, "enroll", "--oracle", oracle)
    assert result.returncode == 0, result.stderr
    assert device_key in result.stdout
    assert (tmp_path / "oracle.pub").read_text().strip() == oracle
    switch = run_cli(tmp_path, "enroll", "--oracle", other)
    assert switch.returncode == 2 and "--replace" in switch.stderr
    assert (tmp_path / "oracle.pub").read_text().strip() == oracle
    assert run_cli(tmp_path, "enroll", "--oracle", other, "--replace").returncode == 0
    assert (tmp_path / "oracle.pub").read_text().strip() == other


async def test_enrolled_oracle_sets_the_peer_list_through_the_relay(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    device_key = PublicKey.from_text(new_home(tmp_path))
    oracle, peer = Identity.generate(), Identity.generate()
    assert run_cli(tmp_path, "enroll", "--oracle", oracle.public.text).returncode == 0
    change = PeerChange(1, (peer.public,)).encode()
    async with Device(oracle, [relay_process.url]) as pusher:
        await pusher.wait_connected()
        envelope = seal_envelope(oracle, Kind.PEER_CHANGE, [device_key], change, ttl_s=600,
                                 now_ms=time.time_ns() // 1_000_000)
        await pusher.send_envelope(envelope)
    code, _out, err = await run_cli_async("--home", str(tmp_path), "--relay", relay_process.url,
                                          "listen", "--timeout", "2")
    assert code == 0, err
    assert run_cli(tmp_path, "peers", "list").stdout.split() == [peer.public.text]


async def _push_peer_change(oracle: Identity, relay_url: str, device: PublicKey,
                            change: PeerChange, receipt_wait_s: float = 0.0) -> str:
    """Send one PEER_CHANGE as `oracle`; the device's receipt status after `receipt_wait_s`."""
    async with Device(oracle, [relay_url]) as pusher:
        await pusher.wait_connected()
        envelope = seal_envelope(oracle, Kind.PEER_CHANGE, [device], change.encode(), ttl_s=600,
                                 now_ms=time.time_ns() // 1_000_000)
        outgoing = await pusher.send_envelope(envelope)
        if not receipt_wait_s:
            return "not awaited"
        return (await outgoing.wait_receipts(receipt_wait_s))[device].value


async def _listening(home: Path, relay_url: str, seconds: float) -> asyncio.subprocess.Process:
    listener = await asyncio.create_subprocess_exec(
        CLIENT, "--home", str(home), "--relay", relay_url, "listen", "--timeout", str(seconds),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert listener.stderr is not None
    async with asyncio.timeout(30):
        line = ""
        while "listening as" not in line:
            line = (await listener.stderr.readline()).decode()
            assert line, "listener exited before connecting"
    return listener


async def _stopped(listener: asyncio.subprocess.Process) -> None:
    if listener.returncode is None:
        listener.kill()
    await listener.wait()


async def test_a_peer_change_older_than_the_held_list_gets_no_receipt(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    """A receipt tells the oracle the list is in force; for an older list it would lie."""
    device_key = PublicKey.from_text(new_home(tmp_path))
    oracle, peer, stale_peer = Identity.generate(), Identity.generate(), Identity.generate()
    assert run_cli(tmp_path, "enroll", "--oracle", oracle.public.text).returncode == 0
    listener = await _listening(tmp_path, relay_process.url, 60)
    try:
        url = relay_process.url
        assert await _push_peer_change(oracle, url, device_key,
                                       PeerChange(5, (peer.public,)), 10) == "delivered"
        assert await _push_peer_change(oracle, url, device_key,
                                       PeerChange(3, (stale_peer.public,)), 2) == "pending"
        # The list already held, sent again: it is in force, so it is receipted.
        assert await _push_peer_change(oracle, url, device_key,
                                       PeerChange(5, (peer.public,)), 10) == "delivered"
    finally:
        await _stopped(listener)
    assert run_cli(tmp_path, "peers", "list").stdout.split() == [peer.public.text]


async def test_after_enroll_replace_the_new_oracles_first_list_is_applied(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    """The found bug: the new oracle's version 1 lost to the old oracle's 2, yet was receipted,
    so the new oracle's dashboard showed the device up to date with an empty peer list."""
    home = tmp_path / "device"
    device_key = PublicKey.from_text(new_home(home))
    old_oracle, old_peer, new_peer = Identity.generate(), Identity.generate(), Identity.generate()
    assert run_cli(home, "enroll", "--oracle", old_oracle.public.text).returncode == 0
    for version in (1, 2):
        await _push_peer_change(old_oracle, relay_process.url, device_key,
                                PeerChange(version, (old_peer.public,)))
    code, _out, err = await run_cli_async("--home", str(home), "--relay", relay_process.url,
                                          "listen", "--timeout", "2")
    assert code == 0, err
    assert run_cli(home, "peers", "list").stdout.split() == [old_peer.public.text]

    settings = oracle_settings(tmp_path / "new-oracle", relays=(relay_process.url,))
    async with OracleServer(settings) as new_oracle:
        admin = await Admin.login(new_oracle)
        try:
            assert run_cli(home, "enroll", "--oracle", new_oracle.identity.public.text,
                           "--replace").returncode == 0
            for key, name in ((device_key.text, "device"), (new_peer.public.text, "peer")):
                await admin.call("POST", "/v1/devices", {"key": key, "name": name}, expect=201)
            group = await admin.call("POST", "/v1/groups", {"name": "g"}, expect=201)
            for key in (device_key.text, new_peer.public.text):
                await admin.call("PUT", f"/v1/groups/{group['id']}/members/{key}")
            path = f"/v1/devices/{device_key.text}"

            async def stored_at_the_relay() -> bool:
                pushes = (await admin.call("GET", path))["pushes"]
                return bool(pushes) and pushes[0]["sent_at_ms"] is not None
            await eventually(stored_at_the_relay, timeout=10)
            listener = await _listening(home, relay_process.url, 60)
            try:
                async def acknowledged() -> bool:
                    return (await admin.call("GET", path))["acked_version"] == 1
                await eventually(acknowledged, timeout=15)
            finally:
                await _stopped(listener)
            shown = await admin.call("GET", path)
        finally:
            await admin.close()
    assert shown["peer_version"] == 1 and not shown["behind"]
    assert shown["peers"] == [new_peer.public.text]
    # "Up to date" is true: the device holds exactly what the dashboard shows.
    assert run_cli(home, "peers", "list").stdout.split() == [new_peer.public.text]


async def test_a_new_oracle_starts_the_count_afresh_whatever_the_old_oracles_epoch(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    device_key = PublicKey.from_text(new_home(tmp_path))
    old_oracle, new_oracle, old_peer, new_peer = (Identity.generate() for _ in range(4))
    url = relay_process.url
    assert run_cli(tmp_path, "enroll", "--oracle", old_oracle.public.text).returncode == 0
    listener = await _listening(tmp_path, url, 60)
    try:  # the old oracle's clock ran far ahead: its epoch outranks anything the new one issues
        assert await _push_peer_change(old_oracle, url, device_key,
                                       PeerChange(9, (old_peer.public,), 2**62), 10) == "delivered"
    finally:
        await _stopped(listener)
    assert run_cli(tmp_path, "enroll", "--oracle", new_oracle.public.text,
                   "--replace").returncode == 0
    listener = await _listening(tmp_path, url, 60)
    try:
        assert await _push_peer_change(new_oracle, url, device_key,
                                       PeerChange(1, (new_peer.public,), 1), 10) == "delivered"
        # The old oracle is no longer trusted at all.
        await _push_peer_change(old_oracle, url, device_key,
                                PeerChange(10, (old_peer.public,), 2**62))
        await asyncio.sleep(1.0)
    finally:
        await _stopped(listener)
    assert run_cli(tmp_path, "peers", "list").stdout.split() == [new_peer.public.text]
