"""Plaintexts of the protocol's own envelope kinds (everything but DATA).

These live inside the encrypted payload, so only the addressed device reads
them; each is a small canonical CBOR array decoded as strictly as the envelope.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import canonical
from .access import Stamp, uint63
from .envelope import MSG_ID_BYTES
from .errors import DecodeError, InvalidFieldError
from .keys import KEY_BYTES, PublicKey

_MAX_PAYLOAD_BYTES = 64 * 1024
MAX_PEERS = 1024


def _array(data: bytes, length: int, what: str) -> list:
    value = canonical.decode(data, max_size=_MAX_PAYLOAD_BYTES, what=what)
    if type(value) is not list or len(value) != length:
        raise DecodeError(f"{what} must be a CBOR array of {length} elements")
    return value


def _msg_id(value: object, what: str) -> bytes:
    if type(value) is not bytes or len(value) != MSG_ID_BYTES:
        raise InvalidFieldError(f"{what} message id must be {MSG_ID_BYTES} bytes")
    return value


def _key(value: object, what: str) -> PublicKey:
    if type(value) is not bytes or len(value) != KEY_BYTES:
        raise InvalidFieldError(f"{what} key must be {KEY_BYTES} bytes")
    return PublicKey(value)


@dataclass(frozen=True)
class Receipt:
    """Sent by a recipient after it decrypted `msg_id`: proof of delivery."""

    msg_id: bytes

    def encode(self) -> bytes:
        return canonical.encode([self.msg_id])

    @classmethod
    def decode(cls, data: bytes) -> Receipt:
        (msg_id,) = _array(data, 1, "receipt")
        return cls(_msg_id(msg_id, "receipt"))


@dataclass(frozen=True)
class ExpiryNotice:
    """Sent by a relay to a sender when `msg_id` expired unread in `recipient`'s mailbox."""

    msg_id: bytes
    recipient: PublicKey

    def encode(self) -> bytes:
        return canonical.encode([self.msg_id, self.recipient.raw])

    @classmethod
    def decode(cls, data: bytes) -> ExpiryNotice:
        msg_id, recipient = _array(data, 2, "expiry notice")
        return cls(_msg_id(msg_id, "expiry notice"), _key(recipient, "expiry notice"))


@dataclass(frozen=True)
class PeerChange:
    """The oracle's word on whom a device may talk to; its `stamp` only ever grows.

    `version` counts this device's lists; `epoch` is the oracle's epoch when
    the list was issued (see `Stamp`), so a restored oracle's lists outrank the
    ones it issued before the backup was taken.  Wire order: epoch, version, peers.
    """

    version: int
    peers: tuple[PublicKey, ...]
    epoch: int = 0

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.epoch, self.version)

    def encode(self) -> bytes:
        return canonical.encode([self.epoch, self.version,
                                 [p.raw for p in sorted(set(self.peers))]])

    @classmethod
    def decode(cls, data: bytes) -> PeerChange:
        epoch, version, peers = _array(data, 3, "peer change")
        uint63(epoch, "peer change epoch")
        uint63(version, "peer change version")
        if type(peers) is not list or len(peers) > MAX_PEERS:
            raise InvalidFieldError(f"peer change peers must be a list of at most {MAX_PEERS}")
        keys = tuple(_key(p, "peer change") for p in peers)
        # One encoding per peer set, as for envelope recipients.
        if any(a >= b for a, b in zip(keys, keys[1:])):
            raise InvalidFieldError("peer change peers must be sorted by key and unique")
        return cls(version, keys, epoch)
