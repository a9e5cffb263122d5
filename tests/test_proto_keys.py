"""Keys: the one text spelling, its checksum, and the key file's permissions."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.errors import InvalidFieldError, SignatureError
from proto.keys import PUBLIC_PREFIX, SECRET_PREFIX, Identity, PublicKey
from proto_support import ALICE, BOB

BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_text_round_trip(seed: bytes) -> None:
    identity = Identity(seed)
    text = identity.public.text
    assert text.startswith(PUBLIC_PREFIX) and text == text.lower() and "=" not in text
    assert PublicKey.from_text(text) == identity.public
    assert str(identity.public) == text
    restored = Identity.from_text(identity.secret_text())
    assert restored.secret_text().startswith(SECRET_PREFIX)
    assert restored.public == identity.public


def test_every_single_character_typo_is_caught() -> None:
    text = ALICE.public.text
    for index in range(len(PUBLIC_PREFIX), len(text)):
        for char in BASE32:
            if char == text[index]:
                continue
            typo = text[:index] + char + text[index + 1:]
            with pytest.raises(InvalidFieldError):
                PublicKey.from_text(typo)


def test_secret_typo_is_caught() -> None:
    text = ALICE.secret_text()
    typo = text[:10] + ("a" if text[10] != "a" else "b") + text[11:]
    with pytest.raises(InvalidFieldError):
        Identity.from_text(typo)


@pytest.mark.parametrize("text", [
    "cpx_" + "a" * 58, "", "cpk_", "cpk_!!!", "cpk_" + "a" * 57, "cpk_" + "a" * 64,
])
def test_malformed_text_refused(text: str) -> None:
    with pytest.raises(InvalidFieldError):
        PublicKey.from_text(text)


def test_wrong_prefix_refused() -> None:
    with pytest.raises(InvalidFieldError):
        PublicKey.from_text(ALICE.secret_text())
    with pytest.raises(InvalidFieldError):
        Identity.from_text(ALICE.public.text)
    with pytest.raises(InvalidFieldError):
        PublicKey.from_text(ALICE.public.text.replace(PUBLIC_PREFIX, SECRET_PREFIX, 1))


def test_a_body_under_the_other_prefix_fails_its_checksum() -> None:
    """Before, the checksum covered the key only: a secret's body pasted after "cpk_" read
    as a public key (and showed the secret wherever public keys are shown)."""
    secret_body = ALICE.secret_text()[len(SECRET_PREFIX):]
    public_body = ALICE.public.text[len(PUBLIC_PREFIX):]
    with pytest.raises(InvalidFieldError, match="checksum"):
        PublicKey.from_text(PUBLIC_PREFIX + secret_body)
    with pytest.raises(InvalidFieldError, match="checksum"):
        Identity.from_text(SECRET_PREFIX + public_body)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_no_key_reads_under_the_other_prefix(raw: bytes) -> None:
    identity = Identity(raw)
    with pytest.raises(InvalidFieldError):
        PublicKey.from_text(PUBLIC_PREFIX + identity.secret_text()[len(SECRET_PREFIX):])
    with pytest.raises(InvalidFieldError):
        Identity.from_text(SECRET_PREFIX + identity.public.text[len(PUBLIC_PREFIX):])


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from([PUBLIC_PREFIX, SECRET_PREFIX, ""]), body=st.text(max_size=70))
def test_garbage_text_is_refused_as_invalid_field_only(prefix: str, body: str) -> None:
    for parse in (PublicKey.from_text, Identity.from_text):
        try:
            parse(prefix + body)
        except InvalidFieldError:
            continue
        raise AssertionError(f"{prefix + body!r} parsed")


def protocol_1_secret_text(identity: Identity) -> str:
    """How protocol 1 spelled a secret key: its checksum covered the seed alone."""
    seed = identity.signing_key.encode()
    checksum = hashlib.blake2b(seed, digest_size=4).digest()
    return SECRET_PREFIX + base64.b32encode(seed + checksum).decode().rstrip("=").lower()


def test_public_key_texts_are_spelled_as_in_protocol_1() -> None:
    """Peer lists, the oracle's database and configuration hold public key texts: they stay
    valid (alice's key from protocol 1's keys.json, seed 00 01 … 1f)."""
    alice = Identity(bytes(range(32)))
    assert alice.public.text == "cpk_aoqqpp7tzyil4hlq3umoos6atft6jvrqtosq2xy53sdgiesvgg4f7phe7q"


def test_a_protocol_1_key_file_is_read_and_rewritten_in_todays_form(tmp_path: Path) -> None:
    identity = Identity.generate()
    path = tmp_path / "identity.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(protocol_1_secret_text(identity) + "\n")
    assert Identity.load(path).public == identity.public
    assert path.read_text().strip() == identity.secret_text()  # rewritten
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [entry.name for entry in tmp_path.iterdir()] == ["identity.key"]
    assert Identity.load(path).public == identity.public  # and read as today's form


def test_a_protocol_1_secret_text_is_refused_with_the_way_to_upgrade_it() -> None:
    with pytest.raises(InvalidFieldError, match="protocol 1.*key file"):
        Identity.from_text(protocol_1_secret_text(ALICE))


def test_raw_length_checked() -> None:
    with pytest.raises(InvalidFieldError):
        PublicKey(b"\x00" * 31)
    with pytest.raises(InvalidFieldError):
        Identity(b"\x00" * 33)


def test_secret_never_in_repr() -> None:
    assert ALICE.secret_text() not in repr(ALICE)
    assert ALICE.secret_text()[4:] not in repr(ALICE)


def test_sign_and_verify() -> None:
    signature = ALICE.sign(b"message")
    ALICE.public.verify(b"message", signature)
    with pytest.raises(SignatureError):
        BOB.public.verify(b"message", signature)
    with pytest.raises(SignatureError):
        ALICE.public.verify(b"messagE", signature)
    with pytest.raises(SignatureError):
        ALICE.public.verify(b"message", signature[:-1])


def test_save_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "device.key"
    ALICE.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).public == ALICE.public


def test_save_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    ALICE.save(path)
    with pytest.raises(FileExistsError):
        BOB.save(path)
    assert Identity.load(path).public == ALICE.public


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666])
def test_load_refuses_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "device.key"
    ALICE.save(path)
    os.chmod(path, mode)
    with pytest.raises(PermissionError):
        Identity.load(path)
