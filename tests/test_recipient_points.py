"""Recipients must be Ed25519 public keys (issue 13, item 5): mail to made-up bytes is refused.

Any 32 bytes decode as a key, and nobody can ever read mail addressed to bytes
that are not a point of the prime-order subgroup; the relay refuses such an
envelope with INVALID_FIELD before anything is stored.
"""

from __future__ import annotations

import os

import pytest

from continuum.admission import admit
from continuum.settings import Settings
from proto import PROTOCOL_VERSION, Identity, PublicKey, canonical, decode_envelope
from proto.envelope import MSG_ID_BYTES, SIGNING_DOMAIN
from proto.errors import InvalidFieldError
from proto.frames import Accepted, Send, encode_frame
from proto.sealing import PAYLOAD_OVERHEAD_BYTES, WRAPPED_KEY_BYTES, ephemeral_public
from wire import RawDevice, error_code, now_ms, sealed

# The small-order identity point, and bytes that decode to no point at all.
NOT_POINTS = [b"\x01" + bytes(31), bytes.fromhex("02" * 32)]


def signed_to_raw_keys(sender: Identity, keys: list[bytes]) -> bytes:
    """A well-formed, correctly signed envelope addressed to arbitrary 32-byte keys,
    as an attacker builds it (sealing to a non-point is impossible)."""
    header = [PROTOCOL_VERSION, 1, os.urandom(MSG_ID_BYTES), sender.public.raw, now_ms(), 60,
              ephemeral_public(os.urandom(32))]
    recipients = sorted([key, os.urandom(WRAPPED_KEY_BYTES)] for key in keys)
    payload = os.urandom(PAYLOAD_OVERHEAD_BYTES + 16)
    signature = sender.sign(SIGNING_DOMAIN + canonical.encode([*header, recipients, payload]))
    return canonical.encode([*header, recipients, payload, signature])


def test_only_real_points_are_valid_keys() -> None:
    assert Identity.generate().public.is_valid_point()
    assert not any(PublicKey(raw).is_valid_point() for raw in NOT_POINTS)


def test_admission_refuses_an_envelope_to_a_non_point() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    envelope = decode_envelope(signed_to_raw_keys(alice, [bob.public.raw, NOT_POINTS[0]]))
    with pytest.raises(InvalidFieldError, match="not an Ed25519 public key"):
        admit(envelope, alice.public, now_ms(), Settings())


async def test_recipients_that_are_not_points_are_refused_before_anything_is_stored(
        relay) -> None:
    alice, bob = Identity.generate(), Identity.generate()
    async with await RawDevice.connect(relay.url, alice) as device:
        for bogus in NOT_POINTS:
            await device.send_raw(encode_frame(Send(signed_to_raw_keys(
                alice, [bob.public.raw, bogus]))))
            assert error_code(await device.recv_not_deliver()) == "INVALID_FIELD"
        assert isinstance(await device.send(sealed(alice, [bob.public])), Accepted)  # still open
    assert await relay.relay.store.depth(bob.public) == 1  # only the real message
    assert await relay.relay.store.depth(PublicKey(NOT_POINTS[0])) == 0
