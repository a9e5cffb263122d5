"""Devices that are killed (SIGKILL) at each step lose nothing and surface nothing twice.

Every test runs `continuum-client` as separate processes on a real home,
kills one at a chosen step and checks what the next run does.  A fake relay
(`fake_relay.FakeRelay`) holds the process exactly at the step: it takes a
SEND and never answers, or delivers an envelope on every connection whatever
was acknowledged, as a relay whose ACK was lost would.
"""

from __future__ import annotations

import time
from pathlib import Path

from cli_support import CliProcess, outbox_rows, peer_homes, run_cli_async, sent_listing
from fake_relay import FakeRelay, refuse

from proto import Identity, Kind, PublicKey, decode_envelope, seal_envelope
from proto.errors import ErrorCode
from relay_process import RelayProcess, free_port
from tally import FAULTS_SURVIVED, MESSAGES_LOST, TALLY
from wire import RawDevice

TEN_DAYS_MS = 10 * 24 * 3600 * 1000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_a_send_killed_before_any_relay_answered_is_sent_by_the_next_run(
        tmp_path: Path) -> None:
    """No relay is up: `send` has only written its outbox when it is killed."""
    (alice_home, _alice), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    relay = RelayProcess(port=free_port(), log_path=tmp_path / "relay.log")
    sender = CliProcess(alice_home, "--relay", relay.url, "send", bob, "survives the kill",
                        "--timeout", "60")
    try:
        await sender.wait_output(lambda out, err: bool(outbox_rows(alice_home)))
        sender.kill()
        [stored] = outbox_rows(alice_home)
        await relay.start()
        code, out, err = await run_cli_async("--home", str(alice_home), "--relay", relay.url,
                                             "flush", "--timeout", "20")
        msg_id = decode_envelope(stored).msg_id.hex()
        assert code == 0 and out == f"accepted {msg_id}\n", err
        bob_identity = Identity.load(bob_home / "identity.key")
        async with await RawDevice.connect(relay.url, bob_identity) as receiver:
            assert (await receiver.next_delivery()).envelope == stored  # byte for byte
            await receiver.expect_silence(0.5)
        assert sent_listing(alice_home)[msg_id]["state"] == "accepted"
        assert outbox_rows(alice_home) == []
    finally:
        sender.kill()
        relay.stop()
    TALLY[FAULTS_SURVIVED] += 1


async def test_a_send_killed_after_the_relay_stored_it_is_resent_byte_for_byte_and_counted_sent(
        tmp_path: Path) -> None:
    """The relay got the SEND (and may have stored it) but the ACCEPTED never came back."""
    (alice_home, _alice), (_bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    async with FakeRelay() as deaf:
        sender = CliProcess(alice_home, "--relay", deaf.url, "send", bob, "in flight",
                            "--timeout", "60")
        try:
            await deaf.wait_for(lambda: bool(deaf.sends))
        finally:
            sender.kill()
    [first] = deaf.sends
    # The next run reaches a relay that did store it: REPLAY to these bytes means stored.
    async with FakeRelay(answer=refuse(ErrorCode.REPLAY)) as storing:
        code, out, err = await run_cli_async("--home", str(alice_home), "--relay", storing.url,
                                             "flush", "--timeout", "20")
    msg_id = decode_envelope(first).msg_id.hex()
    assert code == 0 and out == f"accepted {msg_id}\n", err
    assert storing.sends == [first]
    assert sent_listing(alice_home)[msg_id]["state"] == "accepted"
    TALLY[FAULTS_SURVIVED] += 1


async def test_a_listen_killed_after_surfacing_but_before_the_ack_does_not_surface_it_again(
        tmp_path: Path) -> None:
    (alice_home, alice), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    message = seal_envelope(Identity.load(alice_home / "identity.key"), Kind.DATA,
                            [PublicKey.from_text(bob)], b"open the gate", ttl_s=600,
                            now_ms=now_ms())
    async with FakeRelay(deliver=[message.raw]) as replaying:  # on every connection
        listener = CliProcess(bob_home, "--relay", replaying.url, "listen")
        try:
            await listener.wait_output(lambda out, err: message.msg_id.hex() in out)
            # Its receipt is stored before the message surfaces but sent just after: wait
            # for it, so the run below is compared with what this one sent.
            await replaying.wait_for(lambda: bool(replaying.sends))
        finally:
            listener.kill()
        receipts = list(replaying.sends)
        code, out, err = await run_cli_async("--home", str(bob_home), "--relay", replaying.url,
                                             "listen", "--timeout", "3")
    assert code == 0 and out == "", err
    assert "duplicates=1" in err
    assert replaying.acks[-1] == "t0"  # the duplicate is ACKed, so a real relay drops it
    # The receipt was durable: the second run sends the very same envelope again.
    assert len(receipts) == 1 and replaying.sends[1:] == receipts
    TALLY[FAULTS_SURVIVED] += 1


async def test_a_replayed_ten_day_old_envelope_is_dropped_after_every_restart(
        tmp_path: Path) -> None:
    """The found attack: a genuine "unlock" with a 60 s ttl, replayed by a fake relay."""
    (alice_home, alice), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    unlock = seal_envelope(Identity.load(alice_home / "identity.key"), Kind.DATA,
                           [PublicKey.from_text(bob)], b"UNLOCK front door", ttl_s=60,
                           now_ms=now_ms() - TEN_DAYS_MS)
    # The fake relay even claims a clock of ten days ago: the device's own clock decides.
    async with FakeRelay(deliver=[unlock.raw], clock_offset_ms=-TEN_DAYS_MS) as replaying:
        for run in (1, 2):
            code, out, err = await run_cli_async("--home", str(bob_home), "--relay",
                                                 replaying.url, "listen", "--timeout", "2")
            assert code == 0 and out == "", err
            assert f"dropped a stale message from {alice}" in err
            assert "dropped_stale=1" in err
            assert replaying.acks == ["t0"] * run
    assert replaying.sends == []  # no receipt for it either
    TALLY[FAULTS_SURVIVED] += 1


async def test_receipts_and_expiry_notices_that_arrive_after_a_restart_are_recorded(
        tmp_path: Path) -> None:
    (alice_home, _alice), (bob_home, bob), (_carol_home, carol) = peer_homes(
        tmp_path, "alice", "bob", "carol")
    relay = await RelayProcess("--sweep-interval-s", "0.1",
                               log_path=tmp_path / "relay.log").start()
    try:
        base = ["--home", str(alice_home), "--relay", relay.url]
        code, out, err = await run_cli_async(*base, "send", bob, "read me")
        assert code == 0, err
        read = out.split()[1]
        code, out, err = await run_cli_async(*base, "send", carol, "never read", "--ttl", "1")
        assert code == 0, err
        unread = out.split()[1]
        code, out, err = await run_cli_async("--home", str(bob_home), "--relay", relay.url,
                                             "listen", "--count", "1", "--timeout", "20")
        assert code == 0 and read in out, err
        listing = sent_listing(alice_home)
        assert listing[read]["recipients"] == {bob: "pending"}
        assert listing[unread]["recipients"] == {carol: "pending"}
        time.sleep(1.5)  # carol's copy expires; the relay queues a notice for alice
        code, out, err = await run_cli_async(*base, "flush", "--timeout", "20")
        assert code == 0, err
        listing = sent_listing(alice_home)
    finally:
        relay.stop()
    assert listing[read]["state"] == "accepted" and listing[read]["recipients"] == {
        bob: "delivered"}
    assert listing[unread]["recipients"] == {carol: "expired"}


async def test_a_send_stream_killed_mid_way_loses_nothing_it_made_durable(
        tmp_path: Path) -> None:
    """`send --lines` killed five times with lines accepted, in flight and unread: every message
    it had written to its state file arrives, once (benchmarks/device_kills.py: 100 kills at
    random instants)."""
    (alice_home, _alice), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    relay = await RelayProcess("--store", f"sqlite:///{tmp_path / 'mail.db'}",
                               log_path=tmp_path / "relay.log").start()
    durable: set[bytes] = set()
    try:
        for round_number in range(5):
            sender = CliProcess(alice_home, "--relay", relay.url, "send", bob, "--lines",
                                stdin=-1)
            assert sender.process is not None and sender.process.stdin is not None
            for line in range(20):
                sender.process.stdin.write(f"r{round_number}-{line}\n".encode())
            sender.process.stdin.flush()
            await sender.wait_output(lambda out, err: out.count("accepted") >= 3 + round_number)
            sender.kill()
            durable |= {decode_envelope(raw).msg_id for raw in outbox_rows(alice_home)}
            durable |= {bytes.fromhex(msg_id) for msg_id in sent_listing(alice_home)}
        code, out, err = await run_cli_async("--home", str(alice_home), "--relay", relay.url,
                                             "flush", "--timeout", "20")
        assert code == 0, err
        bob_identity = Identity.load(bob_home / "identity.key")
        received: list[bytes] = []
        async with await RawDevice.connect(relay.url, bob_identity) as receiver:
            while len(received) < len(durable):
                received.append(decode_envelope((await receiver.next_delivery()).envelope).msg_id)
            await receiver.expect_silence(0.5)
    finally:
        relay.stop()
    TALLY[MESSAGES_LOST] += len(durable - set(received))
    assert set(received) == durable and len(received) == len(durable)
    TALLY[FAULTS_SURVIVED] += 5
