"""`continuum-client call` and `listen --handle` as a user runs them: separate processes, a
real relay process, real handler commands (SPEC §18)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cli_support import CliProcess, peer_homes, run_cli, run_cli_async

from client.calls import IncomingCall
from client.calls_cli import command_handler
from proto import Identity
from proto.calls import CallStatus
from relay_process import RelayProcess, free_port

HANDLERS = [
    "--handle", "echo=cat",
    "--handle", "who=sh -c 'printf \"%s %s\" \"$CONTINUUM_METHOD\" \"$CONTINUUM_CALLER\"'",
    "--handle", "fail=sh -c 'echo disk on fire; exit 3'",
    "--handle", "slow=sleep 30",
    "--handle", "flood=head -c 200000 /dev/zero",
]


@pytest.fixture
async def relay_process(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    relay = await RelayProcess(log_path=tmp_path / "relay.log").start()
    yield relay
    relay.stop()


async def test_call_and_listen_handle_end_to_end(tmp_path: Path,
                                                 relay_process: RelayProcess) -> None:
    (alice_home, alice), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    listener = CliProcess(bob_home, "--relay", relay_process.url, "listen", *HANDLERS,
                          "--handle-timeout", "1")
    try:
        await listener.wait_output(lambda out, err: "listening as" in err)
        base = ["--home", str(alice_home), "--relay", relay_process.url, "call", bob]
        code, out, err = await run_cli_async(*base, "echo", '{"volume": 11}', "--timeout", "20")
        assert (code, out) == (0, '{"volume": 11}\n'), err
        code, out, err = await run_cli_async(*base, "who", "--timeout", "20")
        assert (code, out) == (0, f"who {alice}\n"), err
        body = tmp_path / "body.json"
        body.write_bytes(b'{"from": "a file"}\n')
        code, out, err = await run_cli_async(*base, "echo", f"@{body}", "--timeout", "20")
        assert (code, out) == (0, '{"from": "a file"}\n'), err
        code, out, err = await run_cli_async(*base, "echo", "-", "--timeout", "20",
                                             input=b"from stdin")
        assert (code, out) == (0, "from stdin\n"), err
        code, out, err = await run_cli_async(*base, "fail", "--timeout", "20")
        assert (code, out) == (12, "") and "ERROR: disk on fire" in err
        code, out, err = await run_cli_async(*base, "nothing", "--timeout", "20")
        assert (code, out) == (11, "") and "NOT_FOUND" in err
        code, out, err = await run_cli_async(*base, "slow", "--timeout", "20")
        assert (code, out) == (14, "") and "TIMEOUT" in err  # killed after --handle-timeout
        code, out, err = await run_cli_async(*base, "flood", "--timeout", "20")
        assert code == 12 and "output passed 61440 bytes" in err
    finally:
        listener.stop()


async def test_a_call_to_a_peer_that_does_not_listen_exits_5(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    (alice_home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    code, out, err = await run_cli_async("--home", str(alice_home), "--relay",
                                         relay_process.url, "call", bob, "echo", "--timeout", "1")
    assert (code, out) == (5, "") and f"no response from {bob} within 1s" in err
    assert run_cli(alice_home, "outbox").stdout == ""  # calls are not listed as messages


async def test_a_call_with_no_relay_exits_3_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    (alice_home, _), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    dead = f"ws://127.0.0.1:{free_port()}/v1/connect"
    code, _, err = await run_cli_async("--home", str(alice_home), "--relay", dead, "call", bob,
                                       "echo", "--timeout", "1")
    assert code == 3 and "no relay connected within 1s" in err
    code, _, err = await run_cli_async("--home", str(alice_home), "--relay", dead, "call", bob,
                                       "bad method")
    assert code == 2 and "method" in err
    for spec in ("echo", "bad name=cat", "echo=", "echo=unterminated 'quote"):
        code, _, err = await run_cli_async("--home", str(bob_home), "--relay", dead, "listen",
                                           "--handle", spec)
        assert code == 2 and "--handle" in err, (spec, err)


async def test_a_handler_command_that_does_not_read_its_stdin_or_does_not_exist() -> None:
    call = IncomingCall(Identity.generate().public, "m", b"x" * 1_000_000, 0, bytes(16))
    result = await command_handler(["true"], 10)(call)
    assert (result.status, result.body) == (CallStatus.OK, b"")
    result = await command_handler(["/nonexistent/handler"], 10)(call)
    assert result.status is CallStatus.ERROR and b"could not be started" in result.body


async def test_a_handler_cancelled_at_the_deadline_leaves_no_process_behind(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    call = IncomingCall(Identity.generate().public, "m", b"", 0, bytes(16))
    task = asyncio.create_task(command_handler(
        ["sh", "-c", f"sleep 30 & echo $! > {marker}; wait"], 60)(call))
    async with asyncio.timeout(10):
        while not marker.exists() or not marker.read_text().strip():
            await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    grandchild = Path(f"/proc/{int(marker.read_text())}/stat")  # the shell's own child
    async with asyncio.timeout(5):
        while grandchild.exists() and ") Z " not in grandchild.read_text():
            await asyncio.sleep(0.02)
