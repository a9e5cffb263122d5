"""The allowed-peer list file, the duplicate memory and the reconnect backoff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.backoff import Backoff
from client.dedup import RecentlySeen
from client.peers import PeerList
from proto import Identity

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


def test_recently_seen_forgets_oldest_beyond_capacity() -> None:
    seen = RecentlySeen(capacity=2)
    for n in range(3):
        seen.add((bob, bytes([n]) * 16))
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
