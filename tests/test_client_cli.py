"""`continuum-client` as a user runs it: separate processes, a real relay process, real files."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client import Device
from proto import Identity, Kind, PublicKey, seal_envelope
from proto.payloads import PeerChange
from relay_process import RelayProcess, free_port

CLIENT = str(Path(sys.executable).parent / "continuum-client")


def run_cli(home: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLIENT, "--home", str(home), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


async def run_cli_async(*args: str, env: dict[str, str] | None = None,
                        timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        CLIENT, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    async with asyncio.timeout(timeout):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def new_home(path: Path) -> str:
    result = run_cli(path, "keygen")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


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
