"""The allowed-peer list file, the duplicate memory and the reconnect backoff."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from client.backoff import Backoff
from client.dedup import RecentlySeen
from client.peers import PeerList, Standing
from proto import Identity
from proto.access import Stamp

bob, carol, mallory = (Identity.generate().public for _ in range(3))


def test_peer_list_round_trips_through_its_file(tmp_path: Path) -> None:
    path = tmp_path / "home" / "peers.json"
    peers = PeerList.load(path)
    assert len(peers) == 0 and peers.version == 0
    peers.add([bob, carol])
    peers.remove([carol])
    reloaded = PeerList.load(path)
    assert list(reloaded) == [bob] and mallory not in reloaded
    assert json.loads(path.read_text()) == {"version": 0, "peers": [bob.text]}


def test_newer_version_replaces_and_persists_older_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    peers = PeerList([bob], path=path)
    assert peers.replace(3, [carol])
    assert not peers.replace(2, [mallory]) and not peers.replace(3, [mallory])
    reloaded = PeerList.load(path)
    assert (reloaded.version, list(reloaded)) == (3, [carol])


def test_a_malformed_peer_file_is_refused_not_emptied(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    path.write_text(json.dumps({"version": 1, "peers": ["cpk_not-a-key"]}))
    with pytest.raises(ValueError):
        PeerList.load(path)
    path.write_text("[]")
    with pytest.raises(ValueError):
        PeerList.load(path)


def test_a_saved_list_is_on_disk_before_it_replaces_the_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found: the list was renamed into place unsynced, while the device's receipt for it is
    committed to disk at once; after a power cut the oracle could hold a receipt for a list
    the device lost (and the re-delivery of the change is then a duplicate)."""
    events: list[str] = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd: int) -> None:
        events.append("fsync directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        fsync(fd)

    def recorded_replace(source: str | Path, target: str | Path) -> None:
        events.append("rename")
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    peers = PeerList.load(tmp_path / "peers.json")
    peers.replace(3, [bob], epoch=1, oracle=carol)
    assert events == ["fsync file", "rename", "fsync directory"]
    assert PeerList.load(tmp_path / "peers.json").stamp == Stamp(1, 3)


def test_recently_seen_forgets_oldest_beyond_capacity() -> None:
    seen = RecentlySeen(capacity=2)
    for n in range(3):
        seen.add((bob, bytes([n]) * 16), forget_at_ms=2_000_000_000_000)
    assert (bob, b"\x00" * 16) not in seen
    assert (bob, b"\x01" * 16) in seen and (bob, b"\x02" * 16) in seen and len(seen) == 2


def test_backoff_grows_exponentially_to_its_cap_and_resets() -> None:
    ceiling = Backoff(0.1, 5.0, uniform=lambda low, high: high)
    delays = [ceiling.next_delay() for _ in range(10)]
    assert delays[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert max(delays) == 5.0 and delays[-1] == 5.0
    ceiling.reset()
    assert ceiling.next_delay() == pytest.approx(0.1)


def test_backoff_jitter_stays_within_bounds() -> None:
    backoff = Backoff(0.1, 5.0)
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0.1 <= d <= 5.0 for d in delays)
    assert len(set(delays)) > 100  # jittered, not a fixed schedule every device shares


def test_stamps_compare_epoch_first_and_the_oracle_is_remembered(tmp_path: Path) -> None:
    path = tmp_path / "peers.json"
    oracle, other = Identity.generate().public, Identity.generate().public
    peers = PeerList(path=path)
    assert peers.replace(7, [bob], epoch=100, oracle=oracle)
    assert peers.standing(Stamp(100, 7), oracle) is Standing.HELD
    assert peers.standing(Stamp(100, 6), oracle) is Standing.OLDER
    assert peers.standing(Stamp(99, 10**9), oracle) is Standing.OLDER  # an earlier epoch
    assert peers.standing(Stamp(101, 1), oracle) is Standing.NEWER  # a restored oracle's list
    assert not peers.replace(6, [mallory], epoch=100, oracle=oracle)
    reloaded = PeerList.load(path)
    assert (reloaded.stamp, reloaded.oracle, list(reloaded)) == (Stamp(100, 7), oracle, [bob])
    assert json.loads(path.read_text()) == {"version": 7, "peers": [bob.text],
                                            "oracle": oracle.text, "epoch": 100}
    # Another oracle (after `enroll --replace`) starts afresh, whatever its stamp.
    assert reloaded.standing(Stamp(0, 1), other) is Standing.NEWER
    assert reloaded.replace(1, [carol], epoch=0, oracle=other)
    assert PeerList.load(path).oracle == other and list(PeerList.load(path)) == [carol]


def test_a_list_of_unknown_origin_is_compared_by_stamp(tmp_path: Path) -> None:
    """A file from before oracles were recorded: epoch 0, so any epoch-stamped list is newer."""
    path = tmp_path / "peers.json"
    path.write_text(json.dumps({"version": 2, "peers": [bob.text]}))
    peers = PeerList.load(path)
    assert peers.oracle is None and peers.stamp == Stamp(0, 2)
    oracle = Identity.generate().public
    assert peers.standing(Stamp(0, 1), oracle) is Standing.OLDER
    assert peers.standing(Stamp(1_700_000_000_000, 1), oracle) is Standing.NEWER
    path.write_text(json.dumps({"version": 2, "epoch": -1, "peers": []}))
    with pytest.raises(ValueError):
        PeerList.load(path)
