"""The device's state file, reopened as a restart would: outbox, sent messages, seen set, bounds."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.dedup import RecentlySeen
from client.fair_trim import fair_trim
from client.inbox import InboxView, ReceiptArrived, Surface, decide
from client.outbox import Outbox, needs_renewal, renewed
from client.peers import PeerList
from client.state import SCHEMA_VERSION, DeviceState, StoredSend
from client.tracking import DeliveryStatus, SendState, SentLog
from proto import Contents, Identity, Kind, Limits, seal_envelope
from proto.errors import NotPeerError, ReplayError
from proto.payloads import Receipt

NOW_MS = 1_700_000_000_000
alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()


def sealed(text: bytes = b"x", *, ttl_s: int = 60, now_ms: int = NOW_MS,
           sender: Identity = alice, to: tuple[Identity, ...] = (bob,)):  # type: ignore[no-untyped-def]
    return seal_envelope(sender, Kind.DATA, [r.public for r in to], text, ttl_s=ttl_s,
                         now_ms=now_ms)


def reopened(state: DeviceState) -> DeviceState:
    """What the next run opens: the same file, a new connection."""
    state.close()
    return DeviceState(state.path)


def test_the_file_is_owner_only_in_wal_mode_with_its_schema_version(tmp_path: Path) -> None:
    state = DeviceState.in_home(tmp_path / "home")
    path = tmp_path / "home" / "state.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    state.put_outgoing(b"m" * 16, StoredSend(b"bytes", None, False))
    state.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_file_of_another_version_or_not_a_database_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ValueError, match=f"state.db: schema version {SCHEMA_VERSION + 1}"):
        DeviceState(path)
    path.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ValueError, match="state.db"):
        DeviceState(path)


def test_a_transaction_commits_all_or_nothing(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state.db")
    with pytest.raises(RuntimeError):
        with state.transaction():
            state.add_seen(bob.public.raw, b"1" * 16, NOW_MS)
            state.put_outgoing(b"2" * 16, StoredSend(b"receipt", b"plain", True))
            raise RuntimeError("crash between the two")
    state = reopened(state)
    assert not state.seen(bob.public.raw, b"1" * 16) and state.outgoing() == []


async def test_the_outbox_survives_a_restart_byte_for_byte_and_counts_as_sent(
        tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state.db")
    first, second = sealed(b"1"), sealed(b"2")
    outbox = Outbox(state)
    outbox.add(first, plaintext=b"1")
    outbox.add(second, plaintext=b"2")
    state = reopened(state)
    restarted = Outbox(state)
    loaded = restarted.load()
    assert [entry.envelope.raw for entry in loaded] == [first.raw, second.raw]  # in order
    assert [entry.plaintext for entry in loaded] == [b"1", b"2"]
    # The last run may have written it just before dying: REPLAY to this run's first
    # transmission means "stored".
    restarted.mark_sent(loaded[0], object())
    restarted.refused(first.msg_id, ReplayError("already stored"))
    assert loaded[0].accepted.result() is None
    restarted.refused(second.msg_id, NotPeerError("no group"))
    with pytest.raises(NotPeerError):
        loaded[1].accepted.result()
    assert Outbox(reopened(state)).load() == []  # both answered for good: gone from the file


async def test_a_discarded_entry_is_not_loaded_again(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state.db")
    outbox, envelope = Outbox(state), sealed()
    outbox.add(envelope)
    outbox.discard(envelope.msg_id)
    assert Outbox(reopened(state)).load() == []


async def test_renewal_keeps_msg_id_and_never_extends_the_expiry(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state.db")
    outbox = Outbox(state)
    envelope = sealed(b"later", ttl_s=3600)
    entry = outbox.add(envelope, plaintext=b"later")
    assert not needs_renewal(entry, NOW_MS + 240_000)
    assert needs_renewal(entry, NOW_MS + 240_001)
    later = NOW_MS + 1_000_500
    again = renewed(entry, alice, later, Limits())
    assert again is not None
    assert again.msg_id == envelope.msg_id and again.created_at_ms == later
    assert again.expires_at_ms <= envelope.expires_at_ms
    again.verify()
    assert again.open(bob) == Contents(Kind.DATA, b"later")
    outbox.renew(entry, again)
    assert [e.envelope.raw for e in Outbox(reopened(state)).load()] == [again.raw]
    assert renewed(entry, alice, envelope.expires_at_ms - 999, Limits()) is None  # < 1 s left
    foreign = Outbox().add(sealed(b"sealed elsewhere"))
    assert not needs_renewal(foreign, NOW_MS + 10**9)


async def test_a_receipt_is_sealed_again_as_a_receipt_after_a_restart(tmp_path: Path) -> None:
    """The envelope cannot say what it carries (its kind is sealed): the outbox knows."""
    state = DeviceState(tmp_path / "state.db")
    receipt = Receipt(b"r" * 16, bytes(32)).encode()
    envelope = seal_envelope(alice, Kind.RECEIPT, [bob.public], receipt, ttl_s=3600,
                             now_ms=NOW_MS)
    Outbox(state).add(envelope, plaintext=receipt, reply=True)
    [entry] = Outbox(reopened(state)).load()
    again = renewed(entry, alice, NOW_MS + 1_000_500, Limits())
    assert again is not None and again.open(bob) == Contents(Kind.RECEIPT, receipt)


def test_a_file_of_the_previous_version_is_upgraded_keeping_its_rows(tmp_path: Path) -> None:
    """Version 1 kept each sent message's kind, which the device no longer knows for an
    envelope sealed elsewhere: the column goes, the rows stay."""
    path = tmp_path / "state.db"
    state = DeviceState(path)
    envelope = sealed(b"from version 1")
    SentLog(state=state).track(envelope)
    state.close()
    with sqlite3.connect(path) as db:  # what version 1 wrote
        _back_to_version_2(db)
        db.execute("ALTER TABLE sent ADD COLUMN kind INTEGER NOT NULL DEFAULT 1")
        db.execute("PRAGMA user_version = 1")
    [message] = SentLog(state=DeviceState(path)).history()
    assert message.msg_id == envelope.msg_id and bob.public in message.recipients
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert "kind" not in {row[1] for row in db.execute("PRAGMA table_info(sent)")}


async def test_news_that_arrives_after_a_restart_finds_its_message(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state.db")
    envelope = sealed(b"to two", to=(bob, carol))
    log = SentLog(state=state)
    log.track(envelope)
    log.accepted(envelope.msg_id)
    state = reopened(state)
    log = SentLog(state=state)
    assert (envelope.msg_id, bob.public) in log and (envelope.msg_id, alice.public) not in log
    assert log.record(envelope.msg_id, bob.public, DeliveryStatus.DELIVERED)
    assert log.record(envelope.msg_id, carol.public, DeliveryStatus.EXPIRED)
    assert not log.record(envelope.msg_id, bob.public, DeliveryStatus.EXPIRED)  # final
    assert log.record(envelope.msg_id, carol.public, DeliveryStatus.DELIVERED)
    [message] = SentLog(state=reopened(state)).history()
    assert (message.msg_id, message.state, message.error) == (
        envelope.msg_id, SendState.ACCEPTED, None)
    assert message.recipients == {bob.public: DeliveryStatus.DELIVERED,
                                  carol.public: DeliveryStatus.DELIVERED}


async def test_a_receipt_after_a_restart_may_name_any_sealing_of_its_message(
        tmp_path: Path) -> None:
    """A message sealed again (same msg_id) may have been read as either copy."""
    state = DeviceState(tmp_path / "state.db")
    first = sealed(b"twice", ttl_s=3600)
    log = SentLog(state=state)
    log.track(first)
    entry = Outbox(state).add(first, plaintext=b"twice")
    again = renewed(entry, alice, NOW_MS + 400_000, Limits())
    assert again is not None
    log.resealed(again)
    restarted = SentLog(state=reopened(state))
    assert restarted.sealed_as(first.msg_id) == {first.content_hash(), again.content_hash()}
    view = InboxView(alice, PeerList([bob.public]), set(), RecentlySeen(), restarted)
    for copy in (first, again):
        receipt = seal_envelope(bob, Kind.RECEIPT, [alice.public], Receipt.of(copy).encode(),
                                ttl_s=60, now_ms=NOW_MS + 400_000)
        assert isinstance(decide(receipt.raw, view, now_ms=NOW_MS + 400_000), ReceiptArrived)
    forged = seal_envelope(bob, Kind.RECEIPT, [alice.public],
                           Receipt(first.msg_id, bytes(32)).encode(), ttl_s=60,
                           now_ms=NOW_MS + 400_000)
    assert not isinstance(decide(forged.raw, view, now_ms=NOW_MS + 400_000), ReceiptArrived)


async def test_refusals_and_lapses_are_recorded_with_their_code(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state.db")
    log, refused, lapsed = SentLog(state=state), sealed(b"r"), sealed(b"l")
    log.track(refused)
    log.track(lapsed)
    log.refused(refused.msg_id, NotPeerError("no common group"))
    SentLog(state=reopened(state)).lapsed(lapsed.msg_id)
    by_id = {m.msg_id: m for m in SentLog(state=DeviceState(state.path)).history()}
    assert by_id[refused.msg_id].state is SendState.REFUSED
    assert by_id[refused.msg_id].error == "NOT_PEER: no common group"
    assert by_id[lapsed.msg_id].state is SendState.EXPIRED
    assert by_id[lapsed.msg_id].recipients == {bob.public: DeliveryStatus.EXPIRED}


def test_the_seen_set_survives_a_restart_and_makes_a_redelivery_a_duplicate(
        tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state.db")
    envelope = sealed(b"once", sender=bob, to=(alice,))
    view = InboxView(alice, PeerList([bob.public]), set(), RecentlySeen(state=state), set())
    assert isinstance(decide(envelope.raw, view, now_ms=NOW_MS), Surface)
    view.seen.add((bob.public, envelope.msg_id), NOW_MS + 360_000)  # type: ignore[attr-defined]
    restarted = InboxView(alice, PeerList([bob.public]), set(),
                          RecentlySeen(state=reopened(state)), set())
    decision = decide(envelope.raw, restarted, now_ms=NOW_MS + 1)
    assert not isinstance(decision, Surface) and decision.reason.value == "duplicate"


def test_prune_forgets_what_can_no_longer_matter_and_caps_each_table(tmp_path: Path) -> None:
    state = DeviceState(tmp_path / "state.db")
    for n in range(10):
        state.add_seen(bob.public.raw, bytes([n]) * 16, NOW_MS + n * 1000)
    state.prune(NOW_MS + 2_500, max_seen=5, max_sent=100)
    kept = [n for n in range(10) if state.seen(bob.public.raw, bytes([n]) * 16)]
    assert kept == [5, 6, 7, 8, 9]  # 0–2 were past their time, 3–4 the oldest over the cap

    log = SentLog(state=state)
    old, young = sealed(b"old", ttl_s=1), sealed(b"young", ttl_s=3600)
    unsent = sealed(b"unsent", ttl_s=1)
    for envelope in (old, young, unsent):
        log.track(envelope)
    state.put_outgoing(unsent.msg_id, StoredSend(unsent.raw, None, False))
    # old is kept until its receipt could still come: expiry + ttl + skew.
    state.prune(old.expires_at_ms + 1_000 + 300_000, max_seen=100, max_sent=100)
    assert {m.msg_id for m in log.history()} == {old.msg_id, young.msg_id, unsent.msg_id}
    state.prune(old.expires_at_ms + 1_000 + 300_001, max_seen=100, max_sent=100)
    # Still in the outbox, it stays whatever its age.
    assert {m.msg_id for m in log.history()} == {young.msg_id, unsent.msg_id}
    for n in range(5):
        log.track(sealed(bytes([n]), ttl_s=3600))
    state.prune(NOW_MS, max_seen=100, max_sent=3)
    assert len(log.history()) == 3 and unsent.msg_id in {m.msg_id for m in log.history()}


def _back_to_version_2(db: sqlite3.Connection) -> None:
    """Undo what version 3 added: the transfer tables and the outbox's kind column."""
    for table in ("transfer_in_chunk", "transfer_in", "transfer_out"):
        db.execute(f"DROP TABLE {table}")
    db.execute("ALTER TABLE outbox DROP COLUMN kind")
    db.execute("PRAGMA user_version = 2")


def test_version_2_gains_the_transfer_tables_and_keeps_its_outbox(tmp_path: Path) -> None:
    """Version 3 adds transfers (SPEC §17) and the outbox's sealed kind; a version 2 outbox
    row stays, its kind unknown (NULL: DATA or RECEIPT, as `reply` says)."""
    path = tmp_path / "state.db"
    state = DeviceState(path)
    state.close()
    with sqlite3.connect(path) as db:
        _back_to_version_2(db)
        db.execute("INSERT INTO outbox (msg_id, envelope, plaintext, reply)"
                   " VALUES (?, ?, ?, ?)", (b"m" * 16, b"bytes", b"plain", 0))
    state = DeviceState(path)
    assert state.outgoing() == [StoredSend(b"bytes", b"plain", False, None)]
    state.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert {"transfer_out", "transfer_in", "transfer_in_chunk"} <= tables


def test_finished_incoming_transfers_are_capped_oldest_first(tmp_path: Path) -> None:
    """Rows of transfers taken, failed or refused hold no file, only what makes their chunks
    known; a peer sending manifest after manifest cannot grow them without bound."""
    from client.state import TransferInRow
    state = DeviceState(tmp_path / "state.db")
    for n in range(6):
        state.add_transfer_in(TransferInRow(b"s" * 32, bytes([n]) * 16, b"m", b"", 0,
                                            "refused", 10_000 + n))
    state.add_transfer_in(TransferInRow(b"s" * 32, b"r" * 16, b"m", b"", 0, "receiving", 1))
    state.prune(0, max_seen=10, max_sent=10, max_finished_transfers=4)
    kept = {row.transfer_id[0] for row in state.transfers_in("refused")}
    assert kept == {2, 3, 4, 5}
    assert [row.transfer_id for row in state.transfers_in("receiving")] == [b"r" * 16]


def test_a_peers_flood_of_long_lived_messages_pushes_out_only_its_own_seen_pairs(
        tmp_path: Path) -> None:
    """The cap on seen pairs took the soonest to expire of all: a peer sending many messages
    signed with long TTLs pushed out another's short-lived call, which a relay could then
    deliver again, after a restart, as new (run twice).  Now the senders holding the most
    give up theirs first, whether in the state file or in memory."""
    carol, mallory = Identity.generate(), Identity.generate()
    week_ms = 7 * 86_400_000
    state = DeviceState(tmp_path / "state.db")
    state.add_seen(carol.public.raw, b"c" * 16, NOW_MS + 900_000)
    for n in range(150):
        state.add_seen(mallory.public.raw, n.to_bytes(16, "big"), NOW_MS + week_ms + n)
    state = reopened(state)  # a restart: only what the file kept counts
    state.prune(NOW_MS, max_seen=100, max_sent=100)
    assert state.seen(carol.public.raw, b"c" * 16)
    assert state.count_seen() == 100
    kept = [n for n in range(150) if state.seen(mallory.public.raw, n.to_bytes(16, "big"))]
    assert kept == list(range(51, 150))  # its soonest to expire went
    state.close()
    seen = RecentlySeen(capacity=100)
    seen.add((carol.public, b"c" * 16), NOW_MS + 900_000)
    for n in range(150):
        seen.add((mallory.public, n.to_bytes(16, "big")), NOW_MS + week_ms)
    assert (carol.public, b"c" * 16) in seen and len(seen) == 100
    assert (mallory.public, (149).to_bytes(16, "big")) in seen
    assert (mallory.public, (50).to_bytes(16, "big")) not in seen


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=12),
       st.integers(min_value=0, max_value=500))
def test_fair_trim_takes_exactly_the_excess_from_the_largest_holders(
        counts: list[int], excess: int) -> None:
    held = dict(enumerate(counts))
    excess = min(excess, sum(counts))
    trim = fair_trim(held, excess)
    assert sum(trim.values()) == excess
    kept = {holder: count - trim.get(holder, 0) for holder, count in held.items()}
    assert all(0 <= kept[h] <= held[h] for h in held)
    for loser in trim:  # nobody gave up an entry while another keeps more than it does
        assert all(kept[other] <= kept[loser] + 1 for other in held)
