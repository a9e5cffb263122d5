"""`continuum-client` in scripts: fail fast on permanent refusals, retry transient ones, plain
words on stderr, stdin input, exit codes a script can act on."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cli_support import (CliProcess, new_home, peer_homes, run_cli, run_cli_async,
                         sent_listing)
from fake_relay import FakeRelay, refuse

from client.cli import EXIT_CODES
from proto import Identity
from proto.errors import ErrorCode, NotEnrolledError, RevokedError
from relay_process import RelayProcess, free_port

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
async def relay_process(tmp_path: Path) -> AsyncIterator[RelayProcess]:
    relay = await RelayProcess(log_path=tmp_path / "relay.log").start()
    yield relay
    relay.stop()


def dead_url() -> str:
    return f"ws://127.0.0.1:{free_port()}/v1/connect"


@pytest.mark.parametrize("code", [ErrorCode.NOT_PEER, ErrorCode.REVOKED, ErrorCode.BAD_SIGNATURE,
                                  ErrorCode.INVALID_FIELD], ids=lambda code: code.name)
async def test_a_permanent_refusal_ends_send_at_once_with_one_line(tmp_path: Path,
                                                                   code: ErrorCode) -> None:
    (home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    async with FakeRelay(answer=refuse(code)) as relay:
        started = time.monotonic()
        status, out, err = await run_cli_async("--home", str(home), "--relay", relay.url, "send",
                                               bob, "never", "--timeout", "60")
    assert time.monotonic() - started < 10  # not the 60 s timeout
    assert status == 1 and out == ""
    assert err.splitlines() == [f"continuum-client: refused: {code.name}: scripted {code.name}"]
    assert len(relay.sends) == 1
    [listed] = sent_listing(home).values()
    assert listed["state"] == "refused" and listed["error"] == f"{code.name}: scripted {code.name}"


@pytest.mark.parametrize("refusal", [RevokedError("key revoked"),
                                     NotEnrolledError("unknown key")], ids=["revoked", "unknown"])
async def test_a_relay_refusing_the_device_at_connect_ends_send_and_listen(
        tmp_path: Path, refusal: Exception) -> None:
    (home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    async with FakeRelay(refuse_handshake=refusal) as relay:  # type: ignore[arg-type]
        for command in (["send", bob, "anything", "--timeout", "60"], ["listen"]):
            started = time.monotonic()
            status, out, err = await run_cli_async("--home", str(home), "--relay", relay.url,
                                                   *command)
            assert time.monotonic() - started < 10
            assert status == 1 and out == "", err
            assert f"refused: {refusal.code.name}" in err  # type: ignore[attr-defined]


async def test_an_oversize_message_is_refused_before_it_is_sent(tmp_path: Path) -> None:
    (home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    relay = await RelayProcess("--max-envelope-bytes", "4096").start()
    try:
        status, out, err = await run_cli_async("--home", str(home), "--relay", relay.url, "send",
                                               bob, "x" * 5000)
    finally:
        relay.stop()
    assert status == 1 and out == "" and "refused: OVERSIZE" in err


@pytest.mark.parametrize("code", [ErrorCode.RATE_LIMITED, ErrorCode.STORE_UNAVAILABLE,
                                  ErrorCode.MAILBOX_FULL, ErrorCode.QUOTA_EXCEEDED],
                         ids=lambda code: code.name)
async def test_transient_refusals_are_retried_with_the_same_bytes(tmp_path: Path,
                                                                  code: ErrorCode) -> None:
    (home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    async with FakeRelay(answer=refuse(code, times=2)) as relay:
        status, out, err = await run_cli_async("--home", str(home), "--relay", relay.url, "send",
                                               bob, "eventually", "--timeout", "30")
    assert status == 0 and out.startswith("accepted "), err
    assert len(relay.sends) == 3 and len(set(relay.sends)) == 1


async def test_a_transient_refusal_that_lasts_ends_at_the_timeout_and_stays_queued(
        tmp_path: Path) -> None:
    (home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    async with FakeRelay(answer=refuse(ErrorCode.STORE_UNAVAILABLE)) as relay:
        status, out, err = await run_cli_async("--home", str(home), "--relay", relay.url, "send",
                                               bob, "store down", "--timeout", "2")
    assert status == 3 and out == ""
    assert "not accepted within 2s" in err and "STORE_UNAVAILABLE" in err
    assert "stays in the outbox" in err and len(relay.sends) >= 2
    [listed] = sent_listing(home).values()
    assert listed["state"] == "queued"


async def test_unreachable_relays_get_one_plain_line_per_attempt(tmp_path: Path) -> None:
    """Like mosquitto_pub's "Error: Connection refused": words, not JSON log lines."""
    new_home(tmp_path / "alice")
    first, second = dead_url(), dead_url()
    status, out, err = await run_cli_async("--home", str(tmp_path / "alice"), "--relay", first,
                                           "--relay", second, "send",
                                           Identity.generate().public.text, "anyone?",
                                           "--timeout", "2")
    assert status == 3 and out == ""
    *attempts, last = err.splitlines()
    assert "{" not in err
    assert last.startswith("continuum-client: not accepted within 2s")
    assert attempts and set(attempts) == {
        f"continuum-client: {url}: cannot connect: Connection refused" for url in (first, second)}
    # One line per attempt: they alternate between the two relays.
    assert all(a != b for a, b in zip(attempts, attempts[1:]))


async def test_send_reads_stdin_with_a_dash_and_one_message_per_line_with_lines(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    (alice_home, alice), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    base = ["--home", str(alice_home), "--relay", relay_process.url, "send", bob]
    status, out, err = await run_cli_async(*base, "-", input=b"from stdin\nwith two lines\n")
    assert status == 0 and out.startswith("accepted "), err
    status, out, err = await run_cli_async(*base, "--lines", input=b"one\n\ntwo\nthree")
    assert status == 0, err
    assert [line.split()[0] for line in out.splitlines()] == ["accepted"] * 3
    status, out, err = await run_cli_async("--home", str(bob_home), "--relay", relay_process.url,
                                           "listen", "--json", "--count", "4", "--timeout", "20")
    assert status == 0, err
    texts = [json.loads(line)["text"] for line in out.splitlines()]
    assert texts == ["from stdin\nwith two lines\n", "one", "two", "three"]


async def test_lines_are_sent_as_they_arrive(tmp_path: Path,
                                             relay_process: RelayProcess) -> None:
    (alice_home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    sender = CliProcess(alice_home, "--relay", relay_process.url, "send", bob, "--lines",
                        stdin=-1)
    try:
        assert sender.process is not None and sender.process.stdin is not None
        sender.process.stdin.write(b"first reading\n")
        sender.process.stdin.flush()
        await sender.wait_output(lambda out, err: out.count("accepted") == 1)
        sender.process.stdin.write(b"second reading\n")
        sender.process.stdin.close()
        await sender.wait_output(lambda out, err: out.count("accepted") == 2)
        assert sender.process.wait(10) == 0
    finally:
        sender.kill()


async def test_listen_exits_3_if_it_never_connected_and_4_if_too_few_came(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    (alice_home, _), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    status, out, err = await run_cli_async("--home", str(bob_home), "--relay", dead_url(),
                                           "listen", "--timeout", "1")
    assert status == 3 and out == "" and "never connected within 1s" in err
    assert run_cli(alice_home, "--relay", relay_process.url, "send", bob, "only one").returncode == 0
    status, out, err = await run_cli_async("--home", str(bob_home), "--relay", relay_process.url,
                                           "listen", "--count", "2", "--timeout", "3")
    assert status == 4 and out.endswith("only one\n"), err


async def test_listen_says_it_dropped_a_non_peers_message_when_it_drops_it(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    """The README's own steps lost the first message silently when a peer was missing."""
    stranger_home, bob_home = tmp_path / "stranger", tmp_path / "bob"
    stranger, bob = new_home(stranger_home), new_home(bob_home)
    listener = CliProcess(bob_home, "--relay", relay_process.url, "listen", "--timeout", "60")
    try:
        await listener.wait_output(lambda out, err: "listening as" in err)
        assert run_cli(stranger_home, "--relay", relay_process.url, "send", bob,
                       "hello?").returncode == 0
        await listener.wait_output(lambda out, err: "dropped a message" in err, timeout=10)
        assert listener.process is not None and listener.process.poll() is None  # still running
        assert (f"continuum-client: dropped a message from {stranger}: not a peer (to accept"
                f" its messages: continuum-client peers add {stranger})") in listener.stderr
        assert listener.stdout == ""
    finally:
        listener.kill()


async def test_a_queued_message_is_delivered_by_a_later_listen(
        tmp_path: Path, relay_process: RelayProcess) -> None:
    (alice_home, _), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    queued = run_cli(alice_home, "--relay", dead_url(), "send", bob, "while offline", "--queue")
    assert queued.returncode == 0 and queued.stdout.startswith("queued "), queued.stderr
    msg_id = queued.stdout.split()[1]
    status, _out, err = await run_cli_async("--home", str(alice_home), "--relay",
                                            relay_process.url, "listen", "--timeout", "2")
    assert status == 0, err
    assert sent_listing(alice_home)[msg_id]["state"] == "accepted"
    status, out, err = await run_cli_async("--home", str(bob_home), "--relay", relay_process.url,
                                           "listen", "--count", "1", "--timeout", "10")
    assert status == 0 and msg_id in out and "while offline" in out, err


def test_ws_to_another_host_warns_once_and_loopback_or_wss_do_not(tmp_path: Path) -> None:
    (home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    queue = ["send", bob, "later", "--queue"]  # no network needed to hear the warning
    remote = run_cli(home, "--relay", "ws://relay.example.com:8470/v1/connect", *queue)
    assert remote.returncode == 0
    assert remote.stderr.splitlines() == [
        "continuum-client: warning: ws://relay.example.com:8470/v1/connect is not encrypted and"
        " leaves this machine: anyone on the path can read and replay the connection; use wss://"]
    for url in ("ws://127.0.0.1:8470/v1/connect", "ws://localhost:8470/v1/connect",
                "ws://[::1]:8470/v1/connect", "wss://relay.example.com/v1/connect"):
        quiet = run_cli(home, "--relay", url, *queue)
        assert quiet.returncode == 0 and quiet.stderr == "", url


def test_exit_codes_are_in_help_and_in_the_readme() -> None:
    help_text = run_cli(Path("/nonexistent"), "--help").stdout
    assert EXIT_CODES in help_text
    readme = README.read_text()
    for code in re.findall(r"^  (\d+) ", EXIT_CODES, re.MULTILINE):
        assert re.search(rf"^\| `{code}` \|", readme, re.MULTILINE), f"exit code {code}"


async def test_keepalive_is_a_setting(tmp_path: Path) -> None:
    new_home(tmp_path / "bob")
    async with FakeRelay() as relay:
        listener = CliProcess(tmp_path / "bob", "--relay", relay.url, "--keepalive", "0.2",
                              "listen")
        try:
            await relay.wait_for(lambda: relay.pings >= 3, timeout=10)
        finally:
            listener.kill()
    status, _out, err = await run_cli_async("--home", str(tmp_path / "bob"), "--relay",
                                            relay.url, "--keepalive", "0", "listen")
    assert status == 2 and "keepalive must be a positive number" in err


def test_an_unreadable_state_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    (home / "state.db").write_bytes(b"garbage" * 1000)
    result = run_cli(home, "--relay", dead_url(), "send", bob, "x", "--queue")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "state.db" in result.stderr

