"""The oracle's key file and the chain of keys it went through: loading, and rotating safely.

Files, side by side (`oracle.key` is `--identity-file`):

    oracle.key         the current secret key (0600)
    oracle.key.chain   the `OracleKeyChain` (canonical CBOR, public), from the first rotation on
    oracle.key.next    the successor's secret, only while a rotation is being written
    oracle.key.lock    a running oracle holds a shared lock on it; a rotation needs it alone

The chain lives with the key, not in the database: it is the key's history,
and restoring the database from a backup (README) must not lose it.

A rotation writes in an order that a crash at any point leaves recoverable:

1. the successor's secret to `.next` (a crash here: `.next` is not in the chain,
   nobody has heard of it, so the next load deletes it);
2. the chain with the new link to `.chain`, atomically (a crash here: the chain
   ends at `.next`'s key, so the next load finishes the rotation);
3. `.next` over `oracle.key`, atomically: the old secret is gone, which is what
   a rotation is for.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from proto import Identity
from proto.rotation import OracleKeyChain, OracleKeyChange
from runtime.files import sibling, sync, write_atomically

from .errors import IdentityError


def load_chain(path: Path) -> OracleKeyChain:
    chain_path = sibling(path, ".chain")
    if not chain_path.exists():
        return OracleKeyChain()
    return OracleKeyChain.decode(chain_path.read_bytes())


def load_identity(path: Path) -> tuple[Identity, OracleKeyChain]:
    """The oracle's key (created on first start) and its chain, finishing an interrupted
    rotation; IdentityError if the key is not where its chain ends."""
    next_path = sibling(path, ".next")
    chain = load_chain(path)
    if next_path.exists():
        successor = Identity.load(next_path)
        if chain.current == successor.public:  # crashed after step 2: finish step 3
            os.replace(next_path, path)
            sync(path.parent)
        else:  # crashed before step 2: the successor was never announced
            next_path.unlink()
    identity = Identity.load_or_create(path)
    if chain.current is not None and chain.current != identity.public:
        raise IdentityError(f"{path} holds {identity.public.text}, but its key chain"
                            f" {sibling(path, '.chain')} ends at {chain.current.text}")
    return identity, chain


@contextlib.contextmanager
def running(path: Path) -> Iterator[None]:
    """Held while an oracle serves with this key, so that no rotation runs under it.

    A key in a read-only directory (the chart mounts it so) cannot be rotated
    under the oracle anyway: then it serves without the lock.
    """
    with _locked(path, fcntl.LOCK_SH, read_only_ok=True):
        yield


@contextlib.contextmanager
def _locked(path: Path, mode: int, read_only_ok: bool = False) -> Iterator[None]:
    try:
        handle = open(sibling(path, ".lock"), "a")  # noqa: SIM115 (held for the block)
    except OSError:
        if not read_only_ok:
            raise
        yield
        return
    with handle:
        try:
            fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IdentityError(f"an oracle is running with {path}: stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def rotate(path: Path, now_ms: int) -> OracleKeyChange:
    """Move the oracle to a fresh key that the current one vouches for; the new link.

    Run while the oracle is stopped; the next start serves with the new key,
    and relays and devices follow the chain to it (SPEC §15).
    """
    with _locked(path, fcntl.LOCK_EX):
        current, chain = load_identity(path)
        successor = Identity.generate()
        successor.save(sibling(path, ".next"))
        last = chain.links[-1].issued_at_ms if chain.links else -1
        change = OracleKeyChange.sign(current, successor, max(now_ms, last + 1))
        write_atomically(sibling(path, ".chain"), chain.extended(change).encode())
        os.replace(sibling(path, ".next"), path)
        sync(path.parent)
        return change
