"""The relay's pure admission rules, without a socket."""

from __future__ import annotations

from dataclasses import replace

import pytest

from continuum.admission import admit, replay_until_ms
from continuum.settings import Settings
from proto import Identity, Kind, seal_envelope
from proto.errors import InvalidFieldError, SignatureError, StaleError, WrongSenderError

NOW = 1_800_000_000_000
SETTINGS = Settings(max_skew_s=300, max_ttl_s=3600)


def envelope(sender: Identity, created_at_ms: int = NOW, ttl_s: int = 60):
    return seal_envelope(sender, Kind.DATA, [Identity.generate().public], b"x",
                         ttl_s=ttl_s, now_ms=created_at_ms)


def test_valid_envelope_from_its_sender_is_admitted() -> None:
    alice = Identity.generate()
    verified: list[float] = []
    admit(envelope(alice), alice.public, NOW, SETTINGS, verified.append)
    assert len(verified) == 1 and verified[0] > 0


def test_a_relay_notice_is_refused_before_anything_else() -> None:
    alice = Identity.generate()
    notice = seal_envelope(alice, Kind.EXPIRY, [Identity.generate().public], b"x", ttl_s=60,
                           now_ms=NOW)
    with pytest.raises(InvalidFieldError, match="relay's own notice"):
        admit(notice, Identity.generate().public, NOW, SETTINGS)  # not even its sender's


def test_other_connection_key_is_wrong_sender() -> None:
    with pytest.raises(WrongSenderError):
        admit(envelope(Identity.generate()), Identity.generate().public, NOW, SETTINGS)


@pytest.mark.parametrize("offset_ms", [-300_001, 300_001, -10**9])
def test_created_at_beyond_skew_is_stale(offset_ms: int) -> None:
    alice = Identity.generate()
    with pytest.raises(StaleError):
        admit(envelope(alice, created_at_ms=NOW + offset_ms), alice.public, NOW, SETTINGS)


@pytest.mark.parametrize("offset_ms", [-300_000, 0, 300_000])
def test_created_at_within_skew_is_admitted(offset_ms: int) -> None:
    alice = Identity.generate()
    admit(envelope(alice, created_at_ms=NOW + offset_ms, ttl_s=600), alice.public, NOW, SETTINGS)


def test_already_expired_envelope_is_stale() -> None:
    alice = Identity.generate()
    with pytest.raises(StaleError, match="expired"):
        admit(envelope(alice, created_at_ms=NOW - 2000, ttl_s=2), alice.public, NOW, SETTINGS)


def test_ttl_beyond_relay_limit_is_refused() -> None:
    alice = Identity.generate()
    with pytest.raises(InvalidFieldError, match="ttl"):
        admit(envelope(alice, ttl_s=3601), alice.public, NOW, SETTINGS)


def test_tampered_payload_fails_verify() -> None:
    alice = Identity.generate()
    honest = envelope(alice)
    tampered = replace(honest, payload=bytes([honest.payload[0] ^ 1]) + honest.payload[1:])
    with pytest.raises(SignatureError):
        admit(tampered, alice.public, NOW, SETTINGS)


def test_replay_is_remembered_until_the_skew_check_takes_over() -> None:
    alice = Identity.generate()
    env = envelope(alice)
    until = replay_until_ms(env, SETTINGS)
    # At `until` the relay forgets the id; by then the same envelope is already stale.
    with pytest.raises(StaleError):
        admit(env, alice.public, until, SETTINGS)
