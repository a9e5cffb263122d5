"""The oracle's key file and key chain across `rotate-key`: each crash point recovers on load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from oracle_support import oracle_settings

from oracle import OracleServer
from oracle.errors import IdentityError
from oracle.identity import load_chain, load_identity, rotate
from proto import Identity
from proto.rotation import OracleKeyChange


def test_rotation_replaces_the_key_and_extends_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "oracle.key"
    first, _ = load_identity(path)  # created on first use, as before
    change = rotate(path, 1_000)
    second, chain = load_identity(path)
    assert (change.old, change.new) == (first.public, second.public)
    assert chain.links == (change,) and chain.current == second.public
    again = rotate(path, 1_000)  # the same clock reading: still strictly later
    third, chain = load_identity(path)
    assert again.issued_at_ms == 1_001 and chain.follow(first.public) == third.public
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert not (tmp_path / "oracle.key.next").exists()


def test_a_crash_before_the_chain_was_written_forgets_the_unannounced_key(tmp_path: Path) -> None:
    path = tmp_path / "oracle.key"
    first, _ = load_identity(path)
    Identity.generate().save(tmp_path / "oracle.key.next")  # step 1 done, then the crash
    identity, chain = load_identity(path)
    assert identity.public == first.public and not chain.links
    assert not (tmp_path / "oracle.key.next").exists()


def test_a_crash_after_the_chain_was_written_finishes_the_rotation(tmp_path: Path) -> None:
    path = tmp_path / "oracle.key"
    first, _ = load_identity(path)
    successor = Identity.generate()
    successor.save(tmp_path / "oracle.key.next")
    (tmp_path / "oracle.key.chain").write_bytes(
        load_chain(path).extended(OracleKeyChange.sign(first, successor, 5)).encode())
    identity, chain = load_identity(path)  # steps 1 and 2 done, then the crash
    assert identity.public == successor.public == chain.current
    assert not (tmp_path / "oracle.key.next").exists()


def test_a_key_that_is_not_where_its_chain_ends_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "oracle.key"
    rotate(path, 1)
    path.unlink()
    Identity.generate().save(path)  # e.g. a key file restored without its chain
    with pytest.raises(IdentityError, match="ends at"):
        load_identity(path)


async def test_no_rotation_while_an_oracle_serves_with_the_key(tmp_path: Path) -> None:
    async with OracleServer(oracle_settings(tmp_path)):
        with pytest.raises(IdentityError, match="stop it first"):
            rotate(tmp_path / "oracle.key", 1)
    assert rotate(tmp_path / "oracle.key", 1).old is not None


async def test_an_oracle_serves_where_it_cannot_write_a_lock_file(tmp_path: Path) -> None:
    """As the chart mounts the key (read only): no lock file can be made, and none is needed.
    (Tests may run as root, whom a read-only mode does not stop, so the lock file's place is
    taken by a directory: opening it fails as on a read-only mount.)"""
    Identity.generate().save(tmp_path / "oracle.key")
    (tmp_path / "oracle.key.lock").mkdir()
    async with OracleServer(oracle_settings(tmp_path)) as oracle:
        assert oracle.identity.public == Identity.load(tmp_path / "oracle.key").public
    with pytest.raises(OSError):
        rotate(tmp_path / "oracle.key", 1)  # a rotation, though, needs the lock
