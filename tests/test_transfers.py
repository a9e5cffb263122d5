"""Large transfers (SPEC §17) over real relays on 127.0.0.1: a file as a manifest and chunks.

What is proved here: a multi-megabyte file arrives byte for byte, is offered once and
answered with one receipt; either side restarting (the sender killed with SIGKILL)
resumes without sending everything again; chunks that are tampered with, forged,
spliced, duplicated, out of range or of a file that does not match its manifest are
refused and nothing surfaces; a file over a maximum is refused with a clear message on
either side; and a relay's quota refusals pace the sender instead of failing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from cli_support import CliProcess, peer_homes, run_cli_async
from relay_process import RelayProcess, free_port
from wire import RawDevice, error_code

from client import DeliveryStatus, Device, PeerList, ReceivedFile, TransferError
from client.backoff import Backoff
from client.cli import _save
from client.inbox import ChunkArrived, Drop, DropReason, InboxView, ManifestArrived, decide
from client.dedup import RecentlySeen
from client.state import DeviceState
from client.tracking import SentLog
from client.transfer_in import IncomingTransfers
from continuum.server import RelayServer
from proto import Envelope, Identity, Kind, PublicKey, seal_envelope
from proto.frames import Accepted, Send
from proto.transfers import Chunk, Manifest, file_hasher

pytestmark = pytest.mark.timeout(120)

StartRelay = Callable[..., Awaitable[RelayServer]]


def make_device(identity: Identity, relay: str, peers: list[PublicKey], home: Path,
                drops: list[Drop] | None = None, **options: object) -> Device:
    return Device(identity, [relay], PeerList(peers), home=home,  # type: ignore[arg-type]
                  backoff=Backoff(0.05, 0.2),
                  on_drop=drops.append if drops is not None else None, **options)


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


async def first_file(device: Device, timeout: float = 30.0) -> ReceivedFile:
    async with asyncio.timeout(timeout):
        async for received in device.files():
            return received
    raise AssertionError("files() ended")


async def no_file(device: Device, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for received in device.files():
                raise AssertionError(f"a file surfaced: {received}")


def state_value(home: Path, sql: str) -> int:
    """One number from a running device's state file (read-only, beside its writer)."""
    path = home / "state.db"
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        try:
            row = db.execute(sql).fetchone()
        except sqlite3.OperationalError:  # not created yet
            return 0
    return int(row[0]) if row and row[0] is not None else 0


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def relay_counters(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("continuum_messages_"):
            name, value = line.rsplit(" ", 1)
            counters[name] = float(value)
    return counters


# -- a whole file --------------------------------------------------------------------------


async def test_a_multi_megabyte_file_arrives_byte_identical_once_with_one_receipt(
        start_relay: StartRelay, tmp_path: Path) -> None:
    relay = await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    source = random_file(tmp_path / "photo.jpg", 3_000_000)
    progress: list[tuple[int, int]] = []
    async with make_device(alice, relay.url, [bob.public], tmp_path / "alice") as a:
        receipts = a.receipts()
        async with make_device(bob, relay.url, [alice.public], tmp_path / "bob") as b:
            sent = await a.send_file(bob.public, source, timeout=60,
                                     progress=lambda done, total: progress.append((done, total)))
            received = await first_file(b)
            assert received.path.read_bytes() == source.read_bytes()
            assert (received.name, received.size, received.media_type) == (
                "photo.jpg", 3_000_000, "image/jpeg")
            assert (received.sender, received.msg_id, received.transfer_id) == (
                alice.public, sent.msg_id, sent.transfer_id)
            assert sent.chunks == -(-3_000_000 // (64 * 1024 - 512)) == 47
            await no_file(b, 0.5)
        assert progress[-1] == (3_000_000, 3_000_000)
        assert [done for done, _ in progress] == sorted(done for done, _ in progress)
        # Bob again, from its home: the file was taken, nothing is offered twice.
        async with make_device(bob, relay.url, [alice.public], tmp_path / "bob") as b:
            await b.wait_connected(10)
            await no_file(b, 1.0)
        got = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.5):
                async for who, receipt in receipts:
                    got.append((who, receipt.msg_id))
        assert got == [(bob.public, sent.msg_id)]  # one receipt, for the manifest
        [message] = a.sent_messages()  # chunks are not followed as messages
        assert message.msg_id == sent.msg_id
        assert message.recipients == {bob.public: DeliveryStatus.DELIVERED}
    assert not any((tmp_path / "bob" / "transfers" / "partial").iterdir())
    assert state_value(tmp_path / "bob", "SELECT count(*) FROM transfer_in_chunk") == 0
    assert state_value(tmp_path / "alice", "SELECT count(*) FROM outbox") == 0


async def test_an_empty_file_arrives_on_its_manifest(start_relay: StartRelay,
                                                      tmp_path: Path) -> None:
    relay = await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    source = random_file(tmp_path / "empty", 0)
    async with make_device(alice, relay.url, [bob.public], tmp_path / "alice") as a, \
            make_device(bob, relay.url, [alice.public], tmp_path / "bob") as b:
        sent = await a.send_file(bob.public, source, timeout=30)
        received = await first_file(b)
        assert sent.chunks == 0 and received.size == 0 and received.path.read_bytes() == b""


# -- restarts ------------------------------------------------------------------------------


async def test_the_receiver_restarted_mid_transfer_resumes_where_it_was(
        start_relay: StartRelay, tmp_path: Path) -> None:
    relay = await start_relay(rate_per_s=40.0, rate_burst=10)  # slow enough to stop midway
    alice, bob = Identity.generate(), Identity.generate()
    source = random_file(tmp_path / "data.bin", 4_000_000)  # 62 chunks
    bob_home = tmp_path / "bob"
    async with make_device(alice, relay.url, [bob.public], tmp_path / "alice") as a:
        async with make_device(bob, relay.url, [alice.public], bob_home):
            sending = asyncio.create_task(a.send_file(bob.public, source, timeout=90))
            await until(lambda: state_value(
                bob_home, "SELECT max(received) FROM transfer_in") >= 10)
        held = state_value(bob_home, "SELECT max(received) FROM transfer_in")
        assert 10 <= held < 62
        sent = await sending  # the rest waits in bob's mailbox
        async with make_device(bob, relay.url, [alice.public], bob_home) as b:
            received = await first_file(b)
            assert received.path.read_bytes() == source.read_bytes()
            assert received.msg_id == sent.msg_id
            # Only what was not yet on disk came again (a chunk or two in flight at the stop).
            assert b.stats.deliveries <= 62 - held + 3


async def test_the_sender_killed_mid_transfer_resumes_without_sending_everything_again(
        tmp_path: Path) -> None:
    (alice_home, _alice), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    source = random_file(tmp_path / "video.bin", 3_000_000)  # 47 chunks
    relay = RelayProcess("--rate-per-s", "20", "--rate-burst", "8", port=free_port(),
                         log_path=tmp_path / "relay.log")
    await relay.start()
    sender = CliProcess(alice_home, "--relay", relay.url, "send", bob, f"@{source}",
                        "--timeout", "60")
    try:
        await until(lambda: state_value(
            alice_home, "SELECT max(next_index) FROM transfer_out") >= 20, timeout=60)
        sender.kill()  # SIGKILL: no clean-up of any kind
        queued_at_kill = state_value(alice_home, "SELECT max(next_index) FROM transfer_out")
        assert queued_at_kill < 47
        code, out, err = await run_cli_async("--home", str(alice_home), "transfers", "--json")
        [listed] = [json.loads(line) for line in out.splitlines()]
        assert (listed["direction"], listed["file"], listed["state"]) == (
            "out", "video.bin", "sending")
        assert listed["chunks"] <= queued_at_kill and listed["chunk_count"] == 47
        code, out, err = await run_cli_async("--home", str(alice_home), "--relay", relay.url,
                                             "send", bob, f"@{source}", "--timeout", "60")
        assert code == 0, err
        assert out.startswith("accepted file video.bin (3000000 bytes, 47 chunks)"), out
        counters = await relay_counters(relay.port)
        # Stored: the manifest and each chunk once.  Sent again: at most the window that
        # was in flight at the kill (answered REPLAY: already stored), nothing before it.
        assert counters["continuum_messages_accepted_total"] == 1 + 47
        replays = counters.get('continuum_messages_rejected_total{reason="replay"}', 0)
        assert replays <= 16 + 1
        save = tmp_path / "save"
        save.mkdir()
        code, out, err = await run_cli_async("--home", str(bob_home), "--relay", relay.url,
                                             "listen", "--count", "1", "--timeout", "30",
                                             "--save-dir", str(save))
        assert code == 0, err
        assert f"file video.bin (3000000 bytes) saved to {save / 'video.bin'}" in out
        assert (save / "video.bin").read_bytes() == source.read_bytes()
        code, out, err = await run_cli_async("--home", str(alice_home), "--relay", relay.url,
                                             "flush", "--timeout", "20")
        assert code == 0, err
        code, out, err = await run_cli_async("--home", str(alice_home), "outbox")
        assert out.count("\n") == 1 and f"{bob}=delivered" in out, out  # the manifest only
        code, out, err = await run_cli_async("--home", str(alice_home), "transfers")
        assert out.endswith(f"video.bin (3000000 bytes) to {bob} sent 47/47 chunks\n"), out
        code, out, err = await run_cli_async("--home", str(bob_home), "transfers")
        assert out.startswith("in ") and out.endswith(" surfaced 47/47 chunks\n"), out
    finally:
        sender.kill()
        relay.stop()


# -- what must never surface ---------------------------------------------------------------


def _sealed(sender: Identity, recipient: Identity, kind: Kind, plaintext: bytes):  # noqa: ANN202
    return seal_envelope(sender, kind, [recipient.public], plaintext, ttl_s=3600,
                         now_ms=_now_ms())


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_tampered_forged_spliced_duplicate_and_out_of_range_chunks_never_surface(
        start_relay: StartRelay, tmp_path: Path) -> None:
    relay = await start_relay()
    alice, bob, carol, mallory = (Identity.generate() for _ in range(4))
    content = os.urandom(2500)
    hasher = file_hasher()
    hasher.update(content)
    manifest = Manifest.for_file(os.urandom(16), 2500, hasher.digest(), 1000, "plan.pdf")
    tid = manifest.transfer_id

    def chunk(sender: Identity, index: int, data: bytes, transfer_id: bytes = tid):  # noqa: ANN202
        return _sealed(sender, bob, Kind.TRANSFER_CHUNK, Chunk(transfer_id, index, data).encode())

    drops: list[Drop] = []
    bob_home = tmp_path / "bob"
    async with make_device(bob, relay.url, [alice.public, carol.public], bob_home, drops) as b, \
            await RawDevice.connect(relay.url, alice) as raw_alice, \
            await RawDevice.connect(relay.url, carol) as raw_carol, \
            await RawDevice.connect(relay.url, mallory) as raw_mallory:
        good = chunk(alice, 0, content[:1000])
        tampered = bytearray(good.raw)
        tampered[-100] ^= 1  # a bit of the ciphertext: the signature no longer holds
        await raw_alice.send_frame(Send(bytes(tampered)))
        assert error_code(await raw_alice.recv_not_deliver()) == "BAD_SIGNATURE"
        for sender_raw, envelope in [
            (raw_alice, _sealed(alice, bob, Kind.TRANSFER_MANIFEST, manifest.encode())),
            (raw_alice, chunk(alice, 5, content[:1000])),  # out of range
            (raw_alice, chunk(alice, 1, content[1000:1999])),  # one byte short
            (raw_mallory, chunk(mallory, 1, content[1000:2000])),  # not a peer
            (raw_carol, chunk(carol, 1, content[1000:2000])),  # a peer, not this transfer's
            (raw_alice, good),
            (raw_alice, chunk(alice, 0, b"\x00" * 1000)),  # a second chunk 0: duplicate
            (raw_alice, chunk(alice, 1, content[1000:2000])),
            (raw_alice, chunk(alice, 2, b"\x00" * 500)),  # right size, not the file's bytes
        ]:
            assert isinstance(await sender_raw.send(envelope), Accepted)
        await until(lambda: len(drops) >= 5)
        await no_file(b, 1.0)
        assert b.stats.duplicates == 1  # the second chunk 0 (duplicates are only counted)
    details = [(drop.reason, drop.detail) for drop in drops]
    assert [reason for reason, _ in details] == [
        DropReason.INVALID, DropReason.INVALID, DropReason.NON_PEER, DropReason.INVALID,
        DropReason.INVALID]
    assert "outside the transfer's 3 chunks" in details[0][1]
    assert "holds 999 bytes, the manifest says 1000" in details[1][1]
    assert "does not hold" in details[3][1]  # transfers are keyed by (sender, id)
    assert "does not match its manifest" in details[4][1] and "never offered" in details[4][1]
    assert not any((bob_home / "transfers" / "partial").iterdir())  # deleted
    assert not (bob_home / "transfers" / "received").exists()

    # A relay that delivered the tampered bytes anyway: the device refuses them.
    view = InboxView(bob, PeerList([alice.public]), set(), RecentlySeen(), SentLog())
    decision = decide(bytes(tampered), view, now_ms=_now_ms())
    assert isinstance(decision, Drop) and decision.reason is DropReason.INVALID


async def test_a_stored_copy_delivered_again_is_a_duplicate_after_completion(
        start_relay: StartRelay, tmp_path: Path) -> None:
    """Chunk and manifest envelopes are sent again by a sender that restarted (same bytes,
    answered REPLAY) or by a peer: after the file surfaced they change nothing."""
    relay = await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    content = os.urandom(1500)
    hasher = file_hasher()
    hasher.update(content)
    manifest = Manifest.for_file(os.urandom(16), 1500, hasher.digest(), 1000, "a.txt")
    drops: list[Drop] = []
    async with make_device(bob, relay.url, [alice.public], tmp_path / "bob", drops) as b, \
            await RawDevice.connect(relay.url, alice) as raw:
        parts = [(Kind.TRANSFER_MANIFEST, manifest.encode()),
                 (Kind.TRANSFER_CHUNK, Chunk(manifest.transfer_id, 0, content[:1000]).encode()),
                 (Kind.TRANSFER_CHUNK, Chunk(manifest.transfer_id, 1, content[1000:]).encode())]
        for kind, plaintext in parts:
            assert isinstance(await raw.send(_sealed(alice, bob, kind, plaintext)), Accepted)
        received = await first_file(b)
        assert received.path.read_bytes() == content
        for kind, plaintext in parts:  # new envelopes, same transfer
            assert isinstance(await raw.send(_sealed(alice, bob, kind, plaintext)), Accepted)
        await until(lambda: b.stats.duplicates >= 3)
        await no_file(b, 0.5)
    assert drops == []  # duplicates are counted, not reported


# -- bounds --------------------------------------------------------------------------------


async def test_a_file_over_the_maximum_is_refused_with_a_clear_message_on_either_side(
        start_relay: StartRelay, tmp_path: Path) -> None:
    relay = await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    source = random_file(tmp_path / "big.iso", 200_000)
    drops: list[Drop] = []
    async with make_device(alice, relay.url, [bob.public], tmp_path / "alice",
                           max_transfer_bytes=100_000) as a:
        with pytest.raises(TransferError, match="big.iso is 200000 bytes, over the maximum"
                                                " of 100000"):
            await a.send_file(bob.public, source, timeout=10)
    async with make_device(alice, relay.url, [bob.public], tmp_path / "alice") as a, \
            make_device(bob, relay.url, [alice.public], tmp_path / "bob", drops,
                        max_transfer_bytes=100_000) as b:
        sent = await a.send_file(bob.public, source, timeout=30)  # the relays take it
        await until(lambda: b.stats.duplicates >= sent.chunks)
        await no_file(b, 0.5)
    [refusal] = drops  # told once: its chunks are dropped as part of a refused transfer
    assert refusal.reason is DropReason.REFUSED_TRANSFER
    assert refusal.detail == ("file 'big.iso' of 200000 bytes exceeds this device's maximum"
                              " of 100000")
    assert b.stats.dropped_refused_transfer == 1
    assert not (tmp_path / "bob" / "transfers").exists()  # nothing written for it


async def test_the_cli_refuses_a_file_over_its_maximum_before_any_relay(tmp_path: Path) -> None:
    (alice_home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    source = random_file(tmp_path / "big.iso", 5000)
    code, out, err = await run_cli_async(
        "--home", str(alice_home), "--relay", f"ws://127.0.0.1:{free_port()}/v1/connect",
        "--max-file-bytes", "1000", "send", bob, f"@{source}", "--file")
    assert (code, out) == (1, "")
    assert "refused: big.iso is 5000 bytes, over the maximum of 1000 for one transfer" in err
    usage = {("send", bob, "x", "--file"): "--file needs KEY @FILE",
             ("send", bob, bob, f"@{source}", "--file"): "a file goes to one peer at a time",
             ("send", bob, f"@{source}", "--file", "--queue"): "--queue does not apply to files",
             ("send", bob, f"@{tmp_path / 'missing'}"): "cannot read",
             ("listen", "--save-dir", str(source)): "is not a directory"}
    for args, message in usage.items():
        code, _, err = await run_cli_async("--home", str(alice_home), *args)
        assert code == 2 and message in err, (args, err)


async def test_beyond_the_transfers_under_way_a_manifest_is_refused(
        start_relay: StartRelay, tmp_path: Path) -> None:
    relay = await start_relay()
    alice, bob = Identity.generate(), Identity.generate()
    drops: list[Drop] = []
    async with make_device(bob, relay.url, [alice.public], tmp_path / "bob", drops,
                           max_incoming_transfers=2, max_incoming_transfers_per_peer=2) as b, \
            await RawDevice.connect(relay.url, alice) as raw:
        for name in ("one", "two", "three"):
            manifest = Manifest.for_file(os.urandom(16), 10, bytes(32), 4, name)
            sent = await raw.send(_sealed(alice, bob, Kind.TRANSFER_MANIFEST, manifest.encode()))
            assert isinstance(sent, Accepted)
        await until(lambda: len(drops) >= 1)
        await no_file(b, 0.3)
    assert drops[0].reason is DropReason.REFUSED_TRANSFER
    assert "'three': 2 files are already under way or waiting to be taken" in drops[0].detail


async def test_a_relay_quota_refusal_paces_the_sender_rather_than_failing_it(
        start_relay: StartRelay, tmp_path: Path) -> None:
    relay = await start_relay(mailbox_max_bytes=300_000)  # about four chunks for bob
    alice, bob = Identity.generate(), Identity.generate()
    source = random_file(tmp_path / "log.tar", 1_000_000)  # 16 chunks
    async with make_device(alice, relay.url, [bob.public], tmp_path / "alice") as a:
        sending = asyncio.create_task(a.send_file(bob.public, source, timeout=60))
        await asyncio.sleep(1.5)  # bob is away: his mailbox fills and the relay says so
        assert not sending.done()
        assert a.last_error is not None and a.last_error.startswith("MAILBOX_FULL")
        assert state_value(tmp_path / "alice",
                           "SELECT count(*) FROM transfer_out WHERE state = 'sending'") == 1
        async with make_device(bob, relay.url, [alice.public], tmp_path / "bob") as b:
            received = await first_file(b, timeout=60)
            sent = await sending
    assert received.path.read_bytes() == source.read_bytes() and sent.chunks == 16


# -- the inbox rule, without a network -----------------------------------------------------


@pytest.mark.parametrize("kind", [Kind.TRANSFER_MANIFEST, Kind.TRANSFER_CHUNK])
def test_the_inbox_takes_transfer_envelopes_from_peers_only_and_parsed_strictly(
        kind: Kind) -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    view = InboxView(bob, PeerList([alice.public]), set(), RecentlySeen(), SentLog())
    manifest = Manifest.for_file(bytes(16), 10, bytes(32), 4, "a")
    good = manifest.encode() if kind is Kind.TRANSFER_MANIFEST else Chunk(bytes(16), 0,
                                                                           b"abcd").encode()
    taken = decide(_sealed(alice, bob, kind, good).raw, view, now_ms=_now_ms())
    assert not isinstance(taken, Drop)
    stranger = decide(_sealed(mallory, bob, kind, good).raw, view, now_ms=_now_ms())
    assert isinstance(stranger, Drop) and stranger.reason is DropReason.NON_PEER
    for garbage in (good[:-1], b"", b"\xa0", good + b"\x00"):  # truncated, empty, wrong shape
        dropped = decide(_sealed(alice, bob, kind, garbage).raw, view, now_ms=_now_ms())
        assert isinstance(dropped, Drop) and dropped.reason is DropReason.INVALID


async def test_a_file_changed_while_it_is_sent_fails_its_transfer_and_leaves_nothing_queued(
        start_relay: StartRelay, tmp_path: Path) -> None:
    relay = await start_relay(rate_per_s=20.0, rate_burst=4)  # slow: time to change the file
    alice, bob = Identity.generate(), Identity.generate()
    source = random_file(tmp_path / "growing.log", 2_000_000)  # 31 chunks
    accepted: list[int] = []
    async with make_device(alice, relay.url, [bob.public], tmp_path / "alice") as a:
        sending = asyncio.create_task(a.send_file(
            bob.public, source, timeout=60, progress=lambda done, _: accepted.append(done)))
        await until(lambda: bool(accepted))
        with source.open("ab") as log:
            log.write(b"one more line\n")
        with pytest.raises(TransferError, match="growing.log changed since its transfer began"):
            await sending
    assert state_value(tmp_path / "alice", "SELECT count(*) FROM outbox") == 0
    assert state_value(tmp_path / "alice",
                       "SELECT count(*) FROM transfer_out WHERE state = 'failed'") == 1


async def test_listen_prints_messages_and_files_as_they_come(start_relay: StartRelay,
                                                             tmp_path: Path) -> None:
    relay = await start_relay()
    (alice_home, _), (bob_home, bob) = peer_homes(tmp_path, "alice", "bob")
    source = random_file(tmp_path / "report.pdf", 200_000)
    base = ("--relay", relay.url)
    code, out, err = await run_cli_async("--home", str(alice_home), *base, "send", bob, "hello")
    assert code == 0, err
    listener = CliProcess(bob_home, *base, "listen", "--count", "2", "--timeout", "30", "--json")
    try:
        code, out, err = await run_cli_async("--home", str(alice_home), *base, "send", bob,
                                             f"@{source}", "--wait", "20", "--progress")
        assert code == 0, err
        assert "\rreport.pdf: 200000/200000 bytes (100%)\n" in err  # one line, rewritten
        accepted, delivered = out.splitlines()
        assert accepted.startswith("accepted file report.pdf (200000 bytes, 4 chunks)")
        assert delivered == f"{bob} delivered"  # the transfer's one receipt
        await listener.wait_output(lambda out, _: out.count("\n") == 2)
    finally:
        listener.kill()
    message, received = (json.loads(line) for line in listener.stdout.splitlines())
    assert message["text"] == "hello"
    assert (received["file"], received["size"], received["media_type"]) == (
        "report.pdf", 200_000, "application/pdf")
    assert Path(received["path"]).read_bytes() == source.read_bytes()  # left in the home
    assert Path(received["path"]).is_relative_to(bob_home / "transfers" / "received")


async def test_the_cli_gives_up_after_its_timeout_without_progress_and_keeps_the_transfer(
        start_relay: StartRelay, tmp_path: Path) -> None:
    relay = await start_relay(mailbox_max_bytes=300_000)  # bob is away: it fills at once
    (alice_home, _), (_, bob) = peer_homes(tmp_path, "alice", "bob")
    source = random_file(tmp_path / "dump.sql", 1_000_000)
    code, out, err = await run_cli_async("--home", str(alice_home), "--relay", relay.url,
                                         "send", bob, f"@{source}", "--timeout", "3")
    assert (code, out) == (3, "")
    assert "no chunk accepted within 3s (last error: MAILBOX_FULL" in err
    assert "the transfer stays under way" in err
    assert state_value(alice_home,
                       "SELECT count(*) FROM transfer_out WHERE state = 'sending'") == 1


async def test_a_transfer_begun_by_a_key_rotated_away_from_fails_rather_than_mislead(
        start_relay: StartRelay, tmp_path: Path) -> None:
    """Chunks are signed by the manifest's key (a receiver keys transfers by sender): a home
    whose device moved to a new key ends the old key's transfers, with the reason."""
    relay = await start_relay(rate_per_s=20.0, rate_burst=4)
    alice, alice_next, bob = Identity.generate(), Identity.generate(), Identity.generate()
    source = random_file(tmp_path / "old.bin", 2_000_000)
    home = tmp_path / "alice"
    accepted: list[int] = []
    async with make_device(alice, relay.url, [bob.public], home) as a:
        sending = asyncio.create_task(a.send_file(
            bob.public, source, timeout=60, progress=lambda done, _: accepted.append(done)))
        await until(lambda: bool(accepted))
    sending.cancel()
    async with make_device(alice_next, relay.url, [bob.public], home):
        await until(lambda: state_value(
            home, "SELECT count(*) FROM transfer_out WHERE state = 'failed'") == 1)
    with contextlib.closing(sqlite3.connect(home / "state.db")) as db:
        [(error,)] = db.execute("SELECT error FROM transfer_out").fetchall()
    assert "rotated away" in error


async def test_a_transfer_past_its_manifests_validity_is_forgotten_with_its_partial_file(
        tmp_path: Path) -> None:
    """Bounded disk: what was written of a transfer that never completed goes once its
    manifest can no longer be valid; a verified file nobody took yet stays."""
    alice, bob = Identity.generate(), Identity.generate()
    state = DeviceState(tmp_path / "state.db")
    incoming = IncomingTransfers(tmp_path, state, RecentlySeen(state=state))
    partial = Manifest.for_file(os.urandom(16), 10, bytes(32), 4, "partial.bin")
    whole_bytes = b"done"
    hasher = file_hasher()
    hasher.update(whole_bytes)
    whole = Manifest.for_file(os.urandom(16), 4, hasher.digest(), 4, "whole.bin")
    for manifest, chunk_data in ((partial, b"abcd"), (whole, whole_bytes)):
        envelope = _sealed(alice, bob, Kind.TRANSFER_MANIFEST, manifest.encode())
        assert await incoming.on_delivery(ManifestArrived(envelope, manifest)) is None
        chunk = Chunk(manifest.transfer_id, 0, chunk_data)
        sealed = _sealed(alice, bob, Kind.TRANSFER_CHUNK, chunk.encode())
        assert await incoming.on_delivery(ChunkArrived(sealed, chunk)) is None
    [ready] = incoming.ready
    assert ready.name == "whole.bin"
    [written] = (tmp_path / "transfers" / "partial").iterdir()
    incoming.expire(_now_ms())  # still valid: nothing goes
    assert written.exists()
    incoming.expire(envelope.expires_at_ms + 300_001)
    assert not written.exists()
    assert state.transfers_in("receiving") == []
    assert [row.transfer_id for row in state.transfers_in("complete")] == [whole.transfer_id]
    assert ready.path.read_bytes() == whole_bytes
    state.close()


async def test_a_file_moved_before_its_commit_is_offered_at_the_next_start_not_a_crash(
        tmp_path: Path) -> None:
    """A file is moved to `received/` before COMPLETE is committed; a run killed (or whose
    commit failed) between the two left the row receiving and the partial file gone, and
    every later start raised FileNotFoundError: the home could not be used again.  Now the
    next start verifies the file where it is and offers it; a file gone from both places
    fails its transfer."""
    alice, bob = Identity.generate(), Identity.generate()
    state = DeviceState(tmp_path / "state.db")
    incoming = IncomingTransfers(tmp_path, state, RecentlySeen(state=state))
    manifests = []
    for name in ("moved.bin", "lost.bin"):
        data = name.encode()
        hasher = file_hasher()
        hasher.update(data)
        manifest = Manifest.for_file(os.urandom(16), len(data), hasher.digest(), 64, name)
        envelope = _sealed(alice, bob, Kind.TRANSFER_MANIFEST, manifest.encode())
        assert await incoming.on_delivery(ManifestArrived(envelope, manifest)) is None
        chunk = Chunk(manifest.transfer_id, 0, data)
        sealed = _sealed(alice, bob, Kind.TRANSFER_CHUNK, chunk.encode())
        assert await incoming.on_delivery(ChunkArrived(sealed, chunk)) is None
        manifests.append(manifest)
    moved, lost = incoming.ready
    for manifest in manifests:  # as if the process had stopped before each commit
        state.set_transfer_in_state(alice.public.raw, manifest.transfer_id, "receiving")
    lost.path.unlink()
    again = IncomingTransfers(tmp_path, state, RecentlySeen(state=state))
    await again.load()
    assert [(f.name, f.path.read_bytes()) for f in again.ready] == [("moved.bin", b"moved.bin")]
    assert [row.transfer_id for row in state.transfers_in("failed")] == [lost.transfer_id]
    state.close()


async def test_a_peer_reusing_a_transfer_id_cannot_replace_a_file_already_given(
        tmp_path: Path) -> None:
    """A received file's path is its sender, transfer id and name.  Once the row of a taken
    transfer was forgotten, its peer could send the same id and name again and the new file
    replaced the one the application was given, at the path it was told.  Now that manifest
    is refused and the first file stays as it was."""
    alice, bob = Identity.generate(), Identity.generate()
    state = DeviceState(tmp_path / "state.db")
    incoming = IncomingTransfers(tmp_path, state, RecentlySeen(state=state))
    transfer_id = os.urandom(16)

    async def send(content: bytes) -> Drop | None:
        hasher = file_hasher()
        hasher.update(content)
        manifest = Manifest.for_file(transfer_id, len(content), hasher.digest(), 64,
                                     "invoice.pdf")
        envelope = _sealed(alice, bob, Kind.TRANSFER_MANIFEST, manifest.encode())
        refused = await incoming.on_delivery(ManifestArrived(envelope, manifest))
        chunk = Chunk(transfer_id, 0, content)
        await incoming.on_delivery(ChunkArrived(_sealed(alice, bob, Kind.TRANSFER_CHUNK,
                                                        chunk.encode()), chunk))
        return refused

    assert await send(b"PAY TO ACCOUNT 111") is None
    first = incoming.ready.popleft()
    incoming.taken(first)
    incoming.expire(_now_ms() + 10**9)  # the taken transfer's row is forgotten
    assert state.transfer_in(alice.public.raw, transfer_id) is None
    refused = await send(b"PAY TO ACCOUNT 999")
    assert refused is not None and refused.reason is DropReason.REFUSED_TRANSFER
    assert "already in" in refused.detail and not incoming.ready
    assert first.path.read_bytes() == b"PAY TO ACCOUNT 111"
    state.close()


async def test_a_relay_killed_mid_transfer_loses_nothing_and_the_transfer_completes(
        tmp_path: Path) -> None:
    """The relay (SQLite store) is killed with SIGKILL while chunks flow and started again on
    the same port and file: both devices reconnect, and the file arrives whole, once."""
    relay = RelayProcess("--store", f"sqlite:///{tmp_path / 'mail.db'}", "--rate-per-s", "40",
                         "--rate-burst", "8", port=free_port(), log_path=tmp_path / "relay.log")
    await relay.start()
    alice, bob = Identity.generate(), Identity.generate()
    source = random_file(tmp_path / "firmware.img", 3_000_000)
    accepted: list[int] = []
    try:
        async with make_device(alice, relay.url, [bob.public], tmp_path / "alice") as a, \
                make_device(bob, relay.url, [alice.public], tmp_path / "bob") as b:
            sending = asyncio.create_task(a.send_file(
                bob.public, source, timeout=90, progress=lambda done, _: accepted.append(done)))
            await until(lambda: len(accepted) >= 10)
            relay.kill()
            await relay.start()
            received = await first_file(b, timeout=60)
            sent = await sending
            assert received.path.read_bytes() == source.read_bytes()
            assert received.msg_id == sent.msg_id
            await no_file(b, 0.5)
    finally:
        relay.kill()


def _received_file(path: Path, name: str) -> ReceivedFile:
    return ReceivedFile(sender=Identity.generate().public, transfer_id=os.urandom(16),
                        msg_id=os.urandom(16), name=name, media_type="application/octet-stream",
                        size=path.stat().st_size, path=path)


def test_listen_saves_beside_existing_files_of_the_name_without_trying_each_one(
        tmp_path: Path) -> None:
    """A peer's files of one name each cost `listen --save-dir` a try or two, not one try per
    file already there: numbering NAME.1, NAME.2, … stat-ed every number in turn, so the
    10,000th file of one name took 54 ms (the timing is compared with that many look-ups in
    this run, not with a fixed figure).  Nothing already in the directory is overwritten."""
    save = tmp_path / "save"
    save.mkdir()
    existing = 3000
    (save / "log.txt").write_bytes(b"first")
    for number in range(1, existing):
        (save / f"log.txt.{number}").write_bytes(b"older")
    started = time.perf_counter()
    for number in range(existing):
        (save / f"log.txt.{number}").exists()
    one_lookup_per_file = time.perf_counter() - started
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    saved: list[Path] = []
    started = time.perf_counter()
    for number in range(10):
        source = incoming / f"r{number}"
        source.write_bytes(b"new %d" % number)
        saved.append(_save(_received_file(source, "log.txt"), save))
    took = time.perf_counter() - started
    assert took < one_lookup_per_file, (took, one_lookup_per_file)
    assert [path.read_bytes() for path in saved] == [b"new %d" % n for n in range(10)]
    assert len({path.name for path in saved}) == 10
    assert all(path.parent == save and path.name.startswith("log.txt.") for path in saved)
    assert (save / "log.txt").read_bytes() == b"first"
    assert all((save / f"log.txt.{n}").read_bytes() == b"older" for n in range(1, existing))
    assert len(list(save.iterdir())) == existing + 10
    assert not any(incoming.iterdir())


async def test_a_stalled_transfer_holds_its_place_no_longer_than_the_devices_cap(
        tmp_path: Path) -> None:
    """A TTL is the sender's to sign: a peer's manifests valid for a year whose chunks never
    come held their places (and refused that peer's next files) for the year, through any
    relay that does not cap TTLs.  The device forgets them `max_hold_ms` after they began,
    by its own clock; the envelope stays remembered as seen for its whole validity."""
    alice, bob = Identity.generate(), Identity.generate()
    state = DeviceState(tmp_path / "state.db")
    clock = [_now_ms()]
    incoming = IncomingTransfers(tmp_path, state, RecentlySeen(state=state), max_incoming=2,
                                 max_incoming_per_peer=1, max_hold_ms=3_600_000,
                                 clock=lambda: clock[0])
    year_s = 365 * 24 * 3600

    def manifest_from_alice(name: str) -> tuple[Envelope, Manifest]:
        manifest = Manifest.for_file(os.urandom(16), 10, bytes(32), 4, name)
        envelope = seal_envelope(alice, Kind.TRANSFER_MANIFEST, [bob.public],
                                 manifest.encode(), ttl_s=year_s, now_ms=clock[0])
        return envelope, manifest

    stalled = manifest_from_alice("stalled.bin")
    assert await incoming.on_delivery(ManifestArrived(*stalled)) is None
    refused = await incoming.on_delivery(ManifestArrived(*manifest_from_alice("next.bin")))
    assert refused is not None and refused.reason == DropReason.REFUSED_TRANSFER
    clock[0] += 3_600_000 + 1
    incoming.expire(clock[0])
    assert state.transfers_in("receiving") == []
    assert not any((tmp_path / "transfers" / "partial").iterdir())
    assert await incoming.on_delivery(ManifestArrived(*manifest_from_alice("later.bin"))) is None
    assert state.seen(alice.public.raw, stalled[0].msg_id)
    state.close()


async def test_chunks_of_one_transfer_arriving_on_two_connections_at_once_complete_it(
        tmp_path: Path) -> None:
    """While a rotated-away key's mailbox drains beside the new key's, one sender's chunks
    reach the device on two connections at once.  Each chunk read its transfer's row before
    writing, so the last two handled together each counted one chunk short and the file,
    whole on disk, was never verified nor offered; the same chunk twice at once failed its
    commit."""
    alice, bob = Identity.generate(), Identity.generate()
    state = DeviceState(tmp_path / "state.db")
    incoming = IncomingTransfers(tmp_path, state, RecentlySeen(state=state))
    data = os.urandom(12)
    hasher = file_hasher()
    hasher.update(data)
    manifest = Manifest.for_file(os.urandom(16), len(data), hasher.digest(), 4, "pair.bin")
    envelope = _sealed(alice, bob, Kind.TRANSFER_MANIFEST, manifest.encode())
    assert await incoming.on_delivery(ManifestArrived(envelope, manifest)) is None

    def arrival(index: int) -> ChunkArrived:
        chunk = Chunk(manifest.transfer_id, index, data[index * 4:(index + 1) * 4])
        return ChunkArrived(_sealed(alice, bob, Kind.TRANSFER_CHUNK, chunk.encode()), chunk)

    assert await incoming.on_delivery(arrival(0)) is None
    twice = arrival(1)
    outcomes = await asyncio.gather(incoming.on_delivery(twice), incoming.on_delivery(twice),
                                    incoming.on_delivery(arrival(2)))
    assert outcomes[0] is None and outcomes[2] is None
    assert outcomes[1] is not None and outcomes[1].reason == DropReason.DUPLICATE
    [ready] = incoming.ready
    assert ready.path.read_bytes() == data
    assert [row.transfer_id for row in state.transfers_in("complete")] == [manifest.transfer_id]
    state.close()
